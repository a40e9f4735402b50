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
    /// `None` while the run is going (or when it was killed before it could say).
    pub ended: Option<String>,
    /// `initdb`, `initdb --replace`, `syncdb`, `dropdb`, …
    pub command: String,
    /// The Canvas instance (`--profile`) it ran for; `None` for the default one.
    pub profile: Option<String>,
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
    /// Started and not ended, by a process that is still alive.
    Running,
    /// Started and not ended, by a process that is gone (killed, crashed, machine stopped):
    /// its tables are each as their last commit left them.
    Interrupted,
}

impl RunResult {
    fn as_str(self) -> &'static str {
        match self {
            RunResult::Succeeded => "succeeded",
            RunResult::Failed => "failed",
            RunResult::Running => "running",
            RunResult::Interrupted => "interrupted",
        }
    }
}

/// A run as it starts: recorded at once, so that a run that never ends still shows.
#[derive(Debug, Clone)]
pub struct Start {
    pub started: String,
    pub command: String,
    pub profile: Option<String>,
    pub tables: String,
}

fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {RUNS} (
           id INTEGER PRIMARY KEY, started TEXT NOT NULL, ended TEXT NOT NULL, command TEXT NOT NULL,
           tables TEXT NOT NULL, rows INTEGER NOT NULL, changes INTEGER, result TEXT NOT NULL, error TEXT)"
    ))?;
    // Columns added since the first version of the table (files written by it stay readable).
    for (column, kind) in [("profile", "TEXT"), ("pid", "INTEGER"), ("host", "TEXT")] {
        if !has_column(conn, column)? {
            conn.execute_batch(&format!("ALTER TABLE {RUNS} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

fn has_column(conn: &Connection, column: &str) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{RUNS}') WHERE name = ?1"))?;
    stmt.exists([column])
}

/// How many runs a file keeps: `DAP_KEEP_RUNS`, else [`KEPT`].
pub fn kept() -> u32 {
    std::env::var("DAP_KEEP_RUNS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(KEPT)
}

/// Records that a run started (by this process, on this machine); returns its id for [`finish`].
pub fn begin(conn: &mut Connection, start: &Start, keep: u32) -> rusqlite::Result<i64> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    create(&tx)?;
    tx.execute(
        &format!(
            "INSERT INTO {RUNS} (started, ended, command, profile, tables, rows, result, pid, host)
             VALUES (?1, ?1, ?2, ?3, ?4, 0, 'running', ?5, ?6)"
        ),
        params![start.started, start.command, start.profile, start.tables, std::process::id(), this_host()],
    )?;
    let id = tx.last_insert_rowid();
    prune(&tx, keep)?;
    tx.commit()?;
    Ok(id)
}

/// Records how the run `id` (from [`begin`]; `None`: not recorded at its start) ended, and drops
/// the oldest runs beyond `keep`, in one transaction.
pub fn finish(conn: &mut Connection, id: Option<i64>, run: &Run, keep: u32) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    create(&tx)?;
    let ended = run.ended.clone().unwrap_or_else(|| run.started.clone());
    // The row of its start replaced whole (`id` NULL: a new row).
    tx.execute(
        &format!(
            "INSERT OR REPLACE INTO {RUNS} (id, started, ended, command, profile, tables, rows, changes, result, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ),
        params![
            id,
            run.started,
            ended,
            run.command,
            run.profile,
            run.tables,
            run.rows as i64,
            run.changes.map(|c| c as i64),
            run.result.as_str(),
            run.error
        ],
    )?;
    prune(&tx, keep)?;
    tx.commit()
}

fn prune(conn: &Connection, keep: u32) -> rusqlite::Result<()> {
    conn.execute(
        &format!("DELETE FROM {RUNS} WHERE id NOT IN (SELECT id FROM {RUNS} ORDER BY id DESC LIMIT ?1)"),
        [i64::from(keep.max(1))],
    )?;
    Ok(())
}

/// The newest `n` runs of the file at `path`, newest first (none when it has no record yet). A
/// run recorded as going whose process is gone reads as [`RunResult::Interrupted`].
pub fn newest(path: &Path, n: u32) -> rusqlite::Result<Vec<Run>> {
    let conn = open_read_only(path)?;
    if !has_table_named(&conn, RUNS)? {
        return Ok(Vec::new());
    }
    let who =
        |column: &str| if has_column(&conn, column).unwrap_or(false) { column.to_string() } else { "NULL".to_string() };
    let (profile, pid, host) = (who("profile"), who("pid"), who("host"));
    let mut stmt = conn.prepare(&format!(
        "SELECT started, ended, command, {profile}, tables, rows, changes, result, error, {pid}, {host}
         FROM {RUNS} ORDER BY id DESC LIMIT ?1"
    ))?;
    stmt.query_map([i64::from(n)], |r| {
        let going = r.get::<_, String>(7)? == "running";
        let result = match r.get::<_, String>(7)?.as_str() {
            "succeeded" => RunResult::Succeeded,
            "running" if still_running(r.get(9)?, r.get(10)?) => RunResult::Running,
            "running" => RunResult::Interrupted,
            _ => RunResult::Failed,
        };
        Ok(Run {
            started: r.get(0)?,
            ended: if going { None } else { Some(r.get(1)?) },
            command: r.get(2)?,
            profile: r.get(3)?,
            tables: r.get(4)?,
            rows: r.get::<_, i64>(5)? as u64,
            changes: r.get::<_, Option<i64>>(6)?.map(|c| c as u64),
            result,
            error: r.get(8)?,
        })
    })?
    .collect()
}

fn this_host() -> String {
    crate::sink::protocol::hostname()
}

/// Whether the process that recorded a run as going is still alive: only a process on this
/// machine can be asked; one on another machine (a shared folder) is taken at its word.
fn still_running(pid: Option<i64>, host: Option<String>) -> bool {
    let (Some(pid), Some(host)) = (pid, host) else { return false };
    if host != this_host() {
        return true;
    }
    process_alive(pid)
}

#[cfg(unix)]
fn process_alive(pid: i64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // Signal 0 asks without sending; EPERM means it exists under another user.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

#[cfg(not(unix))]
fn process_alive(_pid: i64) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(i: u32, result: RunResult) -> Run {
        Run {
            started: format!("2026-01-01T00:00:{i:02}Z"),
            ended: Some(format!("2026-01-01T00:00:{i:02}Z")),
            command: "syncdb".into(),
            profile: None,
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
            finish(&mut conn, None, &run(i, result), 3).unwrap();
        }
        let runs = newest(&path, 10).unwrap();
        assert_eq!(runs, vec![run(5, RunResult::Succeeded), run(4, RunResult::Failed), run(3, RunResult::Succeeded)]);
        assert_eq!(newest(&path, 1).unwrap().len(), 1);
    }

    #[test]
    fn a_run_is_recorded_as_it_starts_and_reads_as_interrupted_once_its_process_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("canvas.db");
        let mut conn = Connection::open(&path).unwrap();
        // A file written before the record had profiles and processes.
        conn.execute_batch(&format!(
            "CREATE TABLE {RUNS} (id INTEGER PRIMARY KEY, started TEXT NOT NULL, ended TEXT NOT NULL,
             command TEXT NOT NULL, tables TEXT NOT NULL, rows INTEGER NOT NULL, changes INTEGER,
             result TEXT NOT NULL, error TEXT);
             INSERT INTO {RUNS} VALUES (1, 'a', 'b', 'syncdb', 'users', 3, 1, 'succeeded', NULL);"
        ))
        .unwrap();
        assert_eq!(newest(&path, 5).unwrap()[0].profile, None, "an old record reads");
        let start = Start {
            started: "2026-01-01T00:00:00Z".into(),
            command: "syncdb".into(),
            profile: Some("east".into()),
            tables: "users".into(),
        };
        let id = begin(&mut conn, &start, 10).unwrap();
        let going = &newest(&path, 1).unwrap()[0];
        assert_eq!((going.result, &going.ended, going.profile.as_deref()), (RunResult::Running, &None, Some("east")));

        // The same record left by a process that has exited.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        conn.execute(&format!("UPDATE {RUNS} SET pid = ?1 WHERE id = ?2"), params![dead, id]).unwrap();
        assert_eq!(newest(&path, 1).unwrap()[0].result, RunResult::Interrupted);

        let ended = Run { profile: Some("east".into()), ..run(7, RunResult::Succeeded) };
        finish(&mut conn, Some(id), &ended, 10).unwrap();
        let runs = newest(&path, 5).unwrap();
        assert_eq!(runs.len(), 2, "the start and the end are one record");
        assert_eq!(runs[0], ended);
    }
}
