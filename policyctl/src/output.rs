//! `-o table|json|yaml` for every read command, the kubectl way: a table for people, JSON and
//! YAML for scripts (and, for policies and subscriptions, files `apply` reads back).

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    #[default]
    Table,
    /// Pretty-printed JSON.
    Json,
    /// YAML.
    Yaml,
}

/// The `-o` flag and the older `--json`, which is `-o json`.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct OutputArgs {
    /// How to print: table (for people), json or yaml (for scripts).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
    /// The same as -o json.
    #[arg(long, hide = true)]
    json: bool,
}

impl OutputArgs {
    pub fn get(self) -> Output {
        if self.json {
            Output::Json
        } else {
            self.output
        }
    }
}

/// Prints `value` as JSON or YAML, or calls `table` for the table.
pub fn print<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match output {
        Output::Table => table(),
        Output::Json => Ok(crate::print::line(&serde_json::to_string_pretty(value)?)?),
        Output::Yaml => {
            let text = serde_norway::to_string(value)?;
            Ok(crate::print::line(text.trim_end())?)
        }
    }
}

/// Rows as columns as wide as their widest cell (the last column is left ragged).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| match i == last {
                true => c,
                false => format!("{c:<w$}", w = widths[i]),
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = vec![
            vec!["new-connection".into(), "acl".into(), "10".into()],
            vec![
                "service-list-request".into(),
                "rate-limit".into(),
                "5".into(),
            ],
        ];
        let lines = table(&["EVENT", "AGENT", "PRIORITY"], &rows);
        assert_eq!(lines[0], "EVENT                 AGENT       PRIORITY");
        assert_eq!(lines[1], "new-connection        acl         10");
        assert_eq!(lines[2], "service-list-request  rate-limit  5");
    }
}
