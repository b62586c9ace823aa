//! Aligned text tables for cairnctl's default output: left-aligned columns separated by two
//! spaces, numbers right-aligned, a header row in capitals.

/// A table being built row by row.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    right: Vec<bool>,
}

impl Table {
    /// Columns named in `header`; a name starting with `>` is right-aligned (the `>` is not
    /// printed).
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            header: header.iter().map(|h| h.trim_start_matches('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(
            cells.len(),
            self.header.len(),
            "row width matches the header"
        );
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&header).chain(&self.rows) {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .zip(&self.right)
                .map(|((c, w), right)| {
                    if *right {
                        format!("{c:>w$}")
                    } else {
                        format!("{c:<w$}")
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn columns_align() {
        let mut t = Table::new(&["NAME", ">SIZE", "ORIGIN"]);
        t.row(vec!["a".into(), "64M".into(), "".into()]);
        t.row(vec!["longer".into(), "1.5G".into(), "snap".into()]);
        assert_eq!(
            t.render(),
            "NAME    SIZE  ORIGIN\na        64M\nlonger  1.5G  snap\n"
        );
    }
}
