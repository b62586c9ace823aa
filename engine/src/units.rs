//! Human sizes on command lines: the one parser every Cairn tool uses for `--size 4G` and
//! the like, so all of them accept the same forms and name the same errors.

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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_and_bad_ones_are_named() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size(" 512M "), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert!(parse_size("12Q").unwrap_err().contains("12Q"));
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999T").unwrap_err().contains("too large"));
    }
}
