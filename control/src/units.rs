//! Sizes on cairnctl's command line and in its tables.
//!
//! [`parse_size`] accepts exactly what `cairn_engine::units::parse_size` accepts (a test
//! checks both against the same inputs); it is repeated here only because this crate must
//! not depend on the engine.

/// Parses `4096`, `4k`, `512M`, `4G` or `1T` (binary units, case-insensitive) into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let (digits, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        Some('T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 4096, 4k, 512M or 4G"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// `bytes` for humans: `512`, `64K`, `1.5G` (binary units, one decimal when not whole).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
    for (unit, shift) in UNITS {
        let scale = 1u64 << shift;
        if bytes >= scale {
            return if bytes.is_multiple_of(scale) {
                format!("{}{unit}", bytes / scale)
            } else {
                format!("{:.1}{unit}", bytes as f64 / scale as f64)
            };
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_the_engine_parser() {
        for s in [
            "0",
            "4096",
            "4k",
            "4K",
            " 512M ",
            "4G",
            "1T",
            "",
            "12Q",
            "G",
            "-1",
            "99999999T",
            "1.5G",
            "18446744073709551615",
            "18446744073709551616",
        ] {
            assert_eq!(
                parse_size(s),
                cairn_engine::units::parse_size(s),
                "parsers disagree on {s:?}"
            );
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(512), "512");
        assert_eq!(human_size(64 << 10), "64K");
        assert_eq!(human_size(3 << 29), "1.5G");
        assert_eq!(human_size(16 << 30), "16G");
    }
}
