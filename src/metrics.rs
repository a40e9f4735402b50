//! `--metrics-file PATH`: after every run, the state of each table as OpenMetrics text, for the
//! node_exporter textfile collector (or anything that scrapes Prometheus text): per table its
//! rows, lag, watermark, last success and whether its last run failed; per run its duration and
//! failed tables. Written whole or not at all (a temporary file beside it, then a rename), so a
//! collector never reads half a file. The values are `dap status`'s.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use crate::status::TableStatus;
use crate::time;

/// The run the file describes besides its tables.
#[derive(Debug, Clone)]
pub struct RunSummary<'a> {
    pub namespace: &'a str,
    pub command: &'a str,
    pub seconds: f64,
    pub failed_tables: usize,
}

/// A label value as the exposition format writes it.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The OpenMetrics text for `tables` and `run`.
pub fn render(tables: &[TableStatus], run: &RunSummary<'_>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, unit: Option<&str>, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# TYPE {name} gauge");
        if let Some(unit) = unit {
            let _ = writeln!(out, "# UNIT {name} {unit}");
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let per_table = |f: &dyn Fn(&TableStatus) -> Option<String>| -> Vec<(String, String)> {
        tables
            .iter()
            .filter_map(|t| {
                f(t).map(|v| (format!("namespace=\"{}\",table=\"{}\"", label(&t.namespace), label(&t.table)), v))
            })
            .collect()
    };
    let seconds_of = |text: &Option<String>| {
        text.as_deref().and_then(|s| time::parse_rfc3339(s).ok()).map(|us| format!("{:.6}", us as f64 / 1e6))
    };
    family("dap_table_rows", "Rows in the table.", None, per_table(&|t| Some(t.rows.to_string())));
    family(
        "dap_table_lag_seconds",
        "Age of the table's data: now minus its watermark.",
        Some("seconds"),
        per_table(&|t| Some(t.staleness_seconds.to_string())),
    );
    family(
        "dap_table_watermark_timestamp_seconds",
        "The table's watermark (DAP's time of its newest change), as a Unix time.",
        Some("seconds"),
        per_table(&|t| Some(format!("{:.6}", t.watermark as f64 / 1e6))),
    );
    family(
        "dap_table_last_success_timestamp_seconds",
        "When a run last succeeded on the table, as a Unix time.",
        Some("seconds"),
        per_table(&|t| seconds_of(&t.last_success)),
    );
    family(
        "dap_table_last_run_failed",
        "1 when the table's last run failed, else 0.",
        None,
        per_table(&|t| t.last_result.as_ref().map(|r| u8::from(r != "ok").to_string())),
    );
    let run_labels = format!("namespace=\"{}\",command=\"{}\"", label(run.namespace), label(run.command));
    family(
        "dap_run_duration_seconds",
        "How long the last run took.",
        Some("seconds"),
        vec![(run_labels.clone(), format!("{:.3}", run.seconds))],
    );
    family(
        "dap_run_failed_tables",
        "Tables the last run failed on.",
        None,
        vec![(run_labels, run.failed_tables.to_string())],
    );
    out.push_str("# EOF\n");
    out
}

/// Writes `text` to `path` atomically: a temporary file in the same folder, synced, renamed.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new().prefix(".dap-metrics-").tempfile_in(folder)?;
    file.write_all(text.as_bytes())?;
    file.as_file().sync_all()?;
    // Collectors run as another user: the metrics hold no secret and must be readable.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
