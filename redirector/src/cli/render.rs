//! The one renderer of the CLI's output: a table or key-value list for
//! people, one JSON document for scripts.

use std::fmt::Display;

/// How a command prints what it found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    pub fn from_json_flag(json: bool) -> Self {
        if json { Format::Json } else { Format::Text }
    }
}

/// Prints `value` as one line of JSON.
pub fn json(value: &serde_json::Value) {
    println!("{value}");
}

/// Rows under upper-case headers, each column as wide as its widest cell;
/// the last column is not padded.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let last = cells.len().saturating_sub(1);
            let text: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i == last {
                        c.to_string()
                    } else {
                        format!("{c:<w$}", w = widths[i])
                    }
                })
                .collect();
            println!("{}", text.join("  ").trim_end());
        };
        line(self.headers.clone());
        for row in &self.rows {
            line(row.iter().map(String::as_str).collect());
        }
    }
}

/// A titled list of `name  value` lines, names aligned.
pub fn fields<N: Display, V: Display>(title: &str, fields: &[(N, V)]) {
    println!("{title}");
    let names: Vec<String> = fields.iter().map(|(n, _)| n.to_string()).collect();
    let width = names.iter().map(String::len).max().unwrap_or(0);
    for (name, (_, value)) in names.iter().zip(fields) {
        println!("  {name:<width$}  {value}");
    }
}

/// `yes` or `no`.
pub fn yes_no(flag: bool) -> &'static str {
    if flag { "yes" } else { "no" }
}
