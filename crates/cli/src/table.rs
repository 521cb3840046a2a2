//! Plain-text tables for the CLI (`runtimes`, `list`): each column as wide
//! as its widest cell, measured in characters, so no value pushes the rest
//! of its row out of line.

/// A table of text cells under a header row.
#[derive(Debug)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with this header row.
    pub fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Adds a row (missing cells are blank).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines, columns two spaces apart, no trailing blanks.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut t = Table::new(&["RUNTIME", "VERSION", "INTERPRETER"]);
        t.row(vec![
            "python".into(),
            "Python 3.11.2".into(),
            "/usr/bin/python3".into(),
        ]);
        t.row(vec![
            "java".into(),
            "openjdk 17.0.13 2024-10-15 (a long one)".into(),
            "/usr/lib/jvm/bin/java".into(),
        ]);
        let text = t.render();
        let starts: Vec<usize> = text
            .lines()
            .map(|l| {
                l.find('/')
                    .or_else(|| l.find("INTERPRETER"))
                    .expect("a third column")
            })
            .collect();
        assert!(starts.windows(2).all(|w| w[0] == w[1]), "{text}");
        assert!(text.lines().all(|l| !l.ends_with(' ')), "{text}");
    }
}
