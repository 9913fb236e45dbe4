//! The CLI's aligned tables and detail lines; the renderers of single
//! values are `gpupool_common::display`'s (the console uses them too).

pub use gpupool_common::display::*;

/// A table with upper-case headers and columns aligned on the widest cell.
#[derive(Debug)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers (upper-cased).
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; empty cells are shown as `-`.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| dash(c)).collect());
    }

    /// The table, one line per row, each ending with a newline.
    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate().take(columns) {
                if i > 0 {
                    text.push_str("   ");
                }
                text.push_str(cell);
                let pad = widths[i].saturating_sub(cell.chars().count());
                text.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `Key:   value` lines with the values aligned.
#[derive(Debug, Default)]
pub struct Details {
    lines: Vec<(String, String)>,
}

impl Details {
    /// Adds a line; an empty value is shown as `-`.
    pub fn add(&mut self, key: &str, value: impl Into<String>) {
        self.lines.push((key.to_string(), dash(&value.into())));
    }

    /// The lines, each ending with a newline.
    pub fn render(&self) -> String {
        let width = self
            .lines
            .iter()
            .map(|(k, _)| k.chars().count() + 1)
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (key, value) in &self.lines {
            out.push_str(&format!("{:<width$} {value}\n", format!("{key}:")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_never_carry_control_characters() {
        let mut t = super::Table::new(&["a"]);
        t.row(vec!["1.4.0\u{1b}[2J\nforged".into()]);
        let text = t.render();
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert_eq!(text.lines().count(), 2, "{text:?}");
        assert!(text.contains("\\u{1b}[2J\\nforged"), "{text:?}");
        let mut d = super::Details::default();
        d.add("Reason", "x\u{7}y");
        assert_eq!(d.render(), "Reason: x\\u{7}y\n");
    }

    #[test]
    fn table_alignment() {
        let mut t = Table::new(&["job", "state", "reason"]);
        t.row(vec!["j-1".into(), "Running".into(), String::new()]);
        t.row(vec![
            "j-10000".into(),
            "Queued".into(),
            "no capacity".into(),
        ]);
        assert_eq!(
            t.render(),
            "JOB       STATE     REASON\n\
             j-1       Running   -\n\
             j-10000   Queued    no capacity\n"
        );
    }

    #[test]
    fn details_alignment() {
        let mut d = Details::default();
        d.add("Job", "j-1");
        d.add("Reason", "");
        assert_eq!(d.render(), "Job:    j-1\nReason: -\n");
    }
}
