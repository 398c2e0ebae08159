//! The one renderer of the CLI's output: a table or key-value list for
//! people, one JSON or YAML document for scripts, chosen with kubectl's
//! `-o`.

use std::{
    fmt::Display,
    io::{self, Write as _},
};

/// Writes `text` and a newline to stdout: every line the CLI prints goes
/// through here. A reader that went away (`ambridge pods | head`) ends the
/// command quietly, as for other Unix tools, where `println!` would panic;
/// SIGPIPE stays ignored, so a daemon gone mid-call is an error naming it,
/// not a silent signal.
pub fn line(text: impl Display) {
    write(format_args!("{text}\n"));
}

/// Writes `text` to stdout as it is (see [`line`]).
pub fn text(text: &str) {
    write(format_args!("{text}"));
}

fn write(args: std::fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("ambridge: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// How a command prints what it found (`-o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table or key-value list.
    Table,
    /// The table with more columns.
    Wide,
    /// One JSON document.
    Json,
    /// One YAML document (the JSON document's fields).
    Yaml,
}

/// The output flags every reporting command takes.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Format,
    /// Same as `-o json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
}

impl OutputArgs {
    pub fn format(self) -> Format {
        if self.json { Format::Json } else { self.output }
    }
}

/// Prints `value` as one JSON line, or as YAML; `false` for the table
/// formats, which the command prints itself.
pub fn document(format: Format, value: impl FnOnce() -> serde_json::Value) -> anyhow::Result<bool> {
    match format {
        Format::Json => line(value()),
        Format::Yaml => text(
            &serde_saphyr::to_string(&value()).map_err(|e| anyhow::anyhow!("writing YAML: {e}"))?,
        ),
        Format::Table | Format::Wide => return Ok(false),
    }
    Ok(true)
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
            line(text.join("  ").trim_end());
        };
        line(self.headers.clone());
        for row in &self.rows {
            line(row.iter().map(String::as_str).collect());
        }
    }
}

/// A titled list of `name  value` lines, names aligned.
pub fn fields<N: Display, V: Display>(title: &str, fields: &[(N, V)]) {
    line(title);
    let names: Vec<String> = fields.iter().map(|(n, _)| n.to_string()).collect();
    let width = names.iter().map(String::len).max().unwrap_or(0);
    for (name, (_, value)) in names.iter().zip(fields) {
        line(format_args!("  {name:<width$}  {value}"));
    }
}

/// `yes` or `no`.
pub fn yes_no(flag: bool) -> &'static str {
    if flag { "yes" } else { "no" }
}
