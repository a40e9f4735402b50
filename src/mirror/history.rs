//! History in the mirror: every version of every row of the tables a user asked for, in
//! `<table>__history` beside the table, written in the same transaction as the data and the
//! watermark (so history and data never disagree, through crashes too).
//!
//! A version holds the table's columns plus `dap_valid_from` (the change time DAP gives for the
//! record; the snapshot's time for a row a snapshot brought), `dap_valid_to` (NULL while current)
//! and `dap_deleted` (1 for the version a delete ended). Times are stored as the mirror stores
//! every timestamp (fixed-width RFC 3339 text, so they compare as text). The granularity is the
//! sync: a row changed twice between two syncs shows its last change only, because DAP sends
//! only that one.
//!
//! Which tables keep history is remembered in the file ([`SETTINGS`]); `--keep-history` and
//! `--no-history` change it, on the tables of the run that writes them.

use rusqlite::{Connection, OptionalExtension, params};

pub use super::format::{HISTORY_SETTINGS as SETTINGS, history_table as table_name};
use super::format::{quote, quote_literal, sql_type};
use crate::decode::Record;
pub use crate::history_choice::{Choice, Recorded, Selection};
use crate::schema::TableDef;
use crate::time::{self, MICROS_PER_DAY, Micros};

/// The three columns a history table adds to the table's own.
pub const VALID_FROM: &str = "dap_valid_from";
pub const VALID_TO: &str = "dap_valid_to";
pub const DELETED: &str = "dap_deleted";

/// A table's history setting, as the file remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// When history began (the watermark of the run that turned it on), stored text.
    pub since: String,
    pub days: Option<u32>,
}

fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    super::format::has_table_named(conn, name)
}

/// The history setting of a table, if it keeps history.
pub fn setting(conn: &Connection, namespace: &str, table: &str) -> rusqlite::Result<Option<Setting>> {
    if !has_table(conn, SETTINGS)? {
        return Ok(None);
    }
    conn.query_row(
        &format!("SELECT since, days FROM {SETTINGS} WHERE source_namespace = ?1 AND source_table = ?2"),
        params![namespace, table],
        |r| Ok(Setting { since: r.get(0)?, days: r.get(1)? }),
    )
    .optional()
}

/// Every table of a file that keeps history, with its setting, in name order.
pub fn settings(conn: &Connection) -> rusqlite::Result<Vec<(String, String, Setting)>> {
    if !has_table(conn, SETTINGS)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT source_namespace, source_table, since, days FROM {SETTINGS} ORDER BY source_namespace, source_table"
    ))?;
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, Setting { since: r.get(2)?, days: r.get(3)? })))?.collect()
}

/// The columns of a history table as it is in the file (the table's columns it has had, then
/// the three of history).
pub fn stored_columns(conn: &Connection, history: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("SELECT name FROM pragma_table_info({})", quote_literal(history)))?;
    stmt.query_map([], |r| r.get(0))?.collect()
}

/// The data columns of a history table in the attached file `schema` (without history's own
/// three).
pub fn data_columns_in(conn: &Connection, schema: &str, history: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1, ?2) ORDER BY cid")?;
    let columns: Vec<String> = stmt.query_map([history, schema], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(columns.into_iter().filter(|c| ![VALID_FROM, VALID_TO, DELETED].contains(&c.as_str())).collect())
}

/// Whether a table keeps history, after a run's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keeping {
    No,
    /// It did before this run.
    Yes,
    /// From this run on: the rows it has are its first versions.
    FromNow,
}

/// Applies the run's choice to one table inside the open transaction, before its rows are
/// written. `started` is when history begins if this turns it on: the table's watermark before
/// this run (a sync), or the snapshot's (an initdb).
pub fn apply_choice(conn: &Connection, def: &TableDef, choice: &Choice, started: Micros) -> rusqlite::Result<Keeping> {
    let current = setting(conn, &def.namespace, &def.name)?;
    let history = table_name(&def.name);
    if choice.stop.selects(&def.name) {
        if current.is_some() {
            conn.execute(
                &format!("DELETE FROM {SETTINGS} WHERE source_namespace = ?1 AND source_table = ?2"),
                params![def.namespace, def.name],
            )?;
        }
        if choice.recorded == Recorded::Drop {
            conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&history)))?;
        }
        return Ok(Keeping::No);
    }
    if current.is_none() && !choice.keep.selects(&def.name) {
        return Ok(Keeping::No);
    }
    if current.is_none() {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {SETTINGS} (
               source_namespace TEXT NOT NULL, source_table TEXT NOT NULL, since TEXT NOT NULL, days INTEGER,
               PRIMARY KEY (source_namespace, source_table))"
        ))?;
        conn.execute(
            &format!("INSERT INTO {SETTINGS} (source_namespace, source_table, since, days) VALUES (?1, ?2, ?3, ?4)"),
            params![def.namespace, def.name, time::format_fixed(started), choice.days],
        )?;
    } else if let Some(days) = choice.days {
        conn.execute(
            &format!("UPDATE {SETTINGS} SET days = ?3 WHERE source_namespace = ?1 AND source_table = ?2"),
            params![def.namespace, def.name, days],
        )?;
    }
    ensure_table(conn, def)?;
    Ok(if current.is_some() { Keeping::Yes } else { Keeping::FromNow })
}

/// Creates the history table, or adds the columns the table gained since (older versions hold
/// NULL in them).
fn ensure_table(conn: &Connection, def: &TableDef) -> rusqlite::Result<()> {
    let history = table_name(&def.name);
    if !has_table(conn, &history)? {
        // Versions are appended (rowid order is time order per key); one index on the key finds
        // a key's few versions, and ending one changes no indexed column. Measured at 1,000,000
        // rows (bench/run history): a partial index of current versions beside a (key, time)
        // index cost a 100,000-change sync 66% more than no history; a WITHOUT ROWID table
        // clustered by (key, time) 101% (its wide rows split pages), and an as-of count 2.8x.
        let columns: Vec<String> = def.columns().map(|c| format!("{} {}", quote(&c.name), sql_type(&c.ty))).collect();
        conn.execute_batch(&format!(
            "CREATE TABLE {h} ({columns}, {VALID_FROM} TEXT NOT NULL, {VALID_TO} TEXT, {DELETED} INTEGER NOT NULL);
             CREATE INDEX {by_key} ON {h} ({key});",
            h = quote(&history),
            columns = columns.join(", "),
            by_key = quote(&format!("{history}__by_key")),
            key = quote(&def.key.name),
        ))?;
        return Ok(());
    }
    let stored = stored_columns(conn, &history)?;
    for c in def.columns().filter(|c| !stored.contains(&c.name)) {
        conn.execute_batch(&format!(
            "ALTER TABLE {} ADD COLUMN {} {}",
            quote(&history),
            quote(&c.name),
            sql_type(&c.ty)
        ))?;
    }
    Ok(())
}

/// After a snapshot replaced the table (or history began on a table with rows), at `at`: the
/// current versions of keys the table no longer has end as deleted, those of rows that differ
/// end, and every row without a current version equal to it opens one. History is never
/// dropped, nor rewritten: a snapshot older than what history already knows (DAP answering
/// with an older cached job, which the sync then brings forward) adds nothing to it.
pub fn open_versions_of_snapshot(conn: &Connection, def: &TableDef, at: Micros) -> rusqlite::Result<()> {
    let (h, t, key) = (quote(&table_name(&def.name)), quote(&def.name), quote(&def.key.name));
    let at = time::format_fixed(at);
    let known: Option<String> =
        conn.query_row(&format!("SELECT max(max({VALID_FROM}), coalesce(max({VALID_TO}), '')) FROM {h}"), [], |r| {
            r.get(0)
        })?;
    if known.is_some_and(|k| k > at) {
        tracing::debug!("{}: a snapshot at {at} is older than its history; history keeps what it knows", def.name);
        return Ok(());
    }
    let differs: Vec<String> = def.values.iter().map(|c| format!("t.{0} IS NOT h.{0}", quote(&c.name))).collect();
    let differs = if differs.is_empty() { "0".to_string() } else { differs.join(" OR ") };
    let names: Vec<String> = def.columns().map(|c| quote(&c.name)).collect();
    let names = names.join(", ");
    conn.execute(
        &format!(
            "UPDATE {h} AS h SET {VALID_TO} = max(?1, h.{VALID_FROM}), {DELETED} = 1
             WHERE h.{VALID_TO} IS NULL AND NOT EXISTS (SELECT 1 FROM {t} t WHERE t.{key} = h.{key})"
        ),
        [&at],
    )?;
    conn.execute(
        &format!(
            "UPDATE {h} AS h SET {VALID_TO} = max(?1, h.{VALID_FROM})
             WHERE h.{VALID_TO} IS NULL AND EXISTS (SELECT 1 FROM {t} t WHERE t.{key} = h.{key} AND ({differs}))"
        ),
        [&at],
    )?;
    conn.execute(
        // A version that began at the snapshot's time and just ended there was never current.
        &format!("DELETE FROM {h} WHERE {VALID_TO} = ?1 AND {VALID_FROM} = ?1"),
        [&at],
    )?;
    conn.execute(
        &format!(
            "INSERT INTO {h} ({names}, {VALID_FROM}, {VALID_TO}, {DELETED})
             SELECT {names}, ?1, NULL, 0 FROM {t} t
             WHERE NOT EXISTS (SELECT 1 FROM {h} h WHERE h.{key} = t.{key} AND h.{VALID_TO} IS NULL)"
        ),
        [&at],
    )?;
    Ok(())
}

/// Writes the version a sync's record made, right after the record changed the table's row:
/// the key's current version ends at the record's change time, and an upsert opens a new one
/// copied from the row as it is now. `fallback` is the time of a record without one (the
/// sync's watermark). A change no later than the current version's start is one history has
/// already (a sync bringing an older snapshot forward again): it is not recorded twice.
pub struct VersionWriter {
    close: String,
    open: String,
    open_unless_current: String,
    fallback: Micros,
}

impl VersionWriter {
    pub fn new(def: &TableDef, fallback: Micros) -> VersionWriter {
        let (h, t, key) = (quote(&table_name(&def.name)), quote(&def.name), quote(&def.key.name));
        let names: Vec<String> = def.columns().map(|c| quote(&c.name)).collect();
        let names = names.join(", ");
        // Two statements per change, each a lookup of the key's few versions: the current
        // version ends if it began before the change; a new one opens from the row as written.
        // When none ended, the key is new, or its current version is not older than the change
        // (one history has already): then a version opens only where none is current.
        let open = format!(
            "INSERT INTO {h} ({names}, {VALID_FROM}, {VALID_TO}, {DELETED}) SELECT {names}, ?2, NULL, 0 FROM {t} WHERE {key} = ?1"
        );
        VersionWriter {
            close: format!(
                "UPDATE {h} SET {VALID_TO} = ?2, {DELETED} = ?3 WHERE {key} = ?1 AND {VALID_TO} IS NULL AND {VALID_FROM} < ?2"
            ),
            open_unless_current: format!(
                "{open} AND NOT EXISTS (SELECT 1 FROM {h} WHERE {key} = ?1 AND {VALID_TO} IS NULL)"
            ),
            open,
            fallback,
        }
    }

    /// Records the change `record` made (its key's row is already written or deleted).
    pub fn record(&self, conn: &Connection, record: &Record, key: &dyn rusqlite::ToSql) -> rusqlite::Result<()> {
        let at = time::format_fixed(record.ts.unwrap_or(self.fallback));
        let deleted = record.action == Some('D');
        let ended = conn.prepare_cached(&self.close)?.execute(params![key, at, deleted as i64])?;
        if !deleted {
            let open = if ended > 0 { &self.open } else { &self.open_unless_current };
            conn.prepare_cached(open)?.execute(params![key, at])?;
        }
        Ok(())
    }
}

/// `--history-days`: versions that ended more than `days` days before `watermark` go.
pub fn prune(conn: &Connection, table: &str, days: u32, watermark: Micros) -> rusqlite::Result<usize> {
    let cutoff = time::format_fixed(watermark - i64::from(days) * MICROS_PER_DAY);
    conn.execute(
        &format!("DELETE FROM {} WHERE {VALID_TO} IS NOT NULL AND {VALID_TO} < ?1", quote(&table_name(table))),
        [cutoff],
    )
}

/// Removes a table's history and its setting (dropdb).
pub fn forget(conn: &Connection, namespace: &str, table: &str) -> rusqlite::Result<()> {
    if has_table(conn, SETTINGS)? {
        conn.execute(
            &format!("DELETE FROM {SETTINGS} WHERE source_namespace = ?1 AND source_table = ?2"),
            params![namespace, table],
        )?;
    }
    conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&table_name(table))))
}

/// Versions and the size of a table's history, for `dap status`.
pub fn version_count(conn: &Connection, table: &str) -> rusqlite::Result<u64> {
    conn.query_row(&format!("SELECT count(*) FROM {}", quote(&table_name(table))), [], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}
