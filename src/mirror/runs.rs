//! The record of every run (`dap_runs`): each mirror file remembers the initdb and syncdb runs
//! that wrote it, when they started and ended, on which tables, how many rows and changes, and
//! how they ended, so that a mirror kept current unattended for years can say what happened
//! (`dap status --runs`). The newest [`KEPT`] runs are kept (`DAP_KEEP_RUNS` changes it).

use std::path::Path;

use rusqlite::{Connection, params};
use serde::Serialize;

use super::format::{has_table_named, open_read_only};

/// The table, named for users (beside `dap_tables` and `dap_columns`).
pub const RUNS: &str = "dap_runs";

/// Runs kept per file unless `DAP_KEEP_RUNS` says otherwise.
pub const KEPT: u32 = 1000;

/// One run as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    /// RFC 3339, UTC.
    pub started: String,
    pub ended: String,
    /// `initdb`, `initdb --replace`, `syncdb`, …
    pub command: String,
    /// The tables it worked on, comma-separated.
    pub tables: String,
    /// Rows the tables held after the run, summed over those that succeeded.
    pub rows: u64,
    /// Changes applied by syncs; `None` for snapshots only.
    pub changes: Option<u64>,
    pub result: RunResult,
    /// What failed, per table (`users: …; courses: …`).
    pub error: Option<String>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunResult {
    /// Every table succeeded (or was skipped with nothing to do).
    Succeeded,
    /// At least one table failed; the others kept what they did.
    Failed,
}

impl RunResult {
    fn as_str(self) -> &'static str {
        match self {
            RunResult::Succeeded => "succeeded",
            RunResult::Failed => "failed",
        }
    }

    fn parse(text: &str) -> RunResult {
        if text == "succeeded" { RunResult::Succeeded } else { RunResult::Failed }
    }
}

fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {RUNS} (
           id INTEGER PRIMARY KEY, started TEXT NOT NULL, ended TEXT NOT NULL, command TEXT NOT NULL,
           tables TEXT NOT NULL, rows INTEGER NOT NULL, changes INTEGER, result TEXT NOT NULL, error TEXT)"
    ))
}

/// How many runs a file keeps: `DAP_KEEP_RUNS`, else [`KEPT`].
pub fn kept() -> u32 {
    std::env::var("DAP_KEEP_RUNS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(KEPT)
}

/// Appends `run` to the record of `conn`'s file and drops the oldest beyond `keep`, in one
/// transaction.
pub fn record(conn: &mut Connection, run: &Run, keep: u32) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    create(&tx)?;
    tx.execute(
        &format!(
            "INSERT INTO {RUNS} (started, ended, command, tables, rows, changes, result, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ),
        params![
            run.started,
            run.ended,
            run.command,
            run.tables,
            run.rows as i64,
            run.changes.map(|c| c as i64),
            run.result.as_str(),
            run.error
        ],
    )?;
    tx.execute(
        &format!("DELETE FROM {RUNS} WHERE id NOT IN (SELECT id FROM {RUNS} ORDER BY id DESC LIMIT ?1)"),
        [i64::from(keep)],
    )?;
    tx.commit()
}

/// The newest `n` runs of the file at `path`, newest first (none when it has no record yet).
pub fn newest(path: &Path, n: u32) -> rusqlite::Result<Vec<Run>> {
    let conn = open_read_only(path)?;
    if !has_table_named(&conn, RUNS)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT started, ended, command, tables, rows, changes, result, error FROM {RUNS} ORDER BY id DESC LIMIT ?1"
    ))?;
    stmt.query_map([i64::from(n)], |r| {
        Ok(Run {
            started: r.get(0)?,
            ended: r.get(1)?,
            command: r.get(2)?,
            tables: r.get(3)?,
            rows: r.get::<_, i64>(4)? as u64,
            changes: r.get::<_, Option<i64>>(5)?.map(|c| c as u64),
            result: RunResult::parse(&r.get::<_, String>(6)?),
            error: r.get(7)?,
        })
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(i: u32, result: RunResult) -> Run {
        Run {
            started: format!("2026-01-01T00:00:{i:02}Z"),
            ended: format!("2026-01-01T00:00:{i:02}Z"),
            command: "syncdb".into(),
            tables: "users".into(),
            rows: u64::from(i),
            changes: Some(1),
            result,
            error: (result == RunResult::Failed).then(|| "users: boom".into()),
        }
    }

    #[test]
    fn the_newest_runs_are_kept_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("canvas.db");
        let mut conn = Connection::open(&path).unwrap();
        for i in 1..=5 {
            let result = if i == 4 { RunResult::Failed } else { RunResult::Succeeded };
            record(&mut conn, &run(i, result), 3).unwrap();
        }
        let runs = newest(&path, 10).unwrap();
        assert_eq!(runs, vec![run(5, RunResult::Succeeded), run(4, RunResult::Failed), run(3, RunResult::Succeeded)]);
        assert_eq!(newest(&path, 1).unwrap().len(), 1);
    }
}
