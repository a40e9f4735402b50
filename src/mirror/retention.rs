//! A bounded mirror of an append-only table (web_logs) that loses nothing: `dap archive` records
//! in the mirror file each day it wrote ([`ARCHIVED`]), and `syncdb --keep-days N` removes a day
//! older than N days only when the archive holds it whole: written as complete (the watermark
//! had passed the day's end), with the row count the mirror has for it now, its file present.
//! Any other old day stays, and the run says why. A removed day's keys leave the change index
//! too, so `dap replicate` never sends them to a target as deletes: targets keep every log.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::format::{BOOKKEEPING, CHANGES, DICTIONARY_COLUMNS, has_table_named, quote};
use crate::schema::APPEND_ONLY_TIME_COLUMN;
use crate::time::{self, MICROS_PER_DAY, Micros};

/// The days of append-only tables an archive holds: rows, the partition file, whether the day
/// was complete when written, and whether the mirror has since removed it.
pub const ARCHIVED: &str = "dap_replica__archived";

/// A day as `dap archive` wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedDay {
    /// `YYYY-MM-DD` (UTC), the hive partition's `date`.
    pub day: String,
    pub rows: u64,
    /// The partition file (absolute).
    pub part: PathBuf,
    pub complete: bool,
}

fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {ARCHIVED} (
           source_namespace TEXT NOT NULL, source_table TEXT NOT NULL, day TEXT NOT NULL, rows INTEGER NOT NULL,
           part TEXT NOT NULL, complete INTEGER NOT NULL, pruned INTEGER NOT NULL DEFAULT 0,
           PRIMARY KEY (source_namespace, source_table, day))"
    ))
}

/// Records what an archive holds, in one transaction: each day as written (a day the mirror
/// removed already keeps its mark).
pub fn record_archived(
    conn: &mut Connection,
    namespace: &str,
    table: &str,
    days: &[ArchivedDay],
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    create(&tx)?;
    {
        let mut upsert = tx.prepare(&format!(
            "INSERT INTO {ARCHIVED} (source_namespace, source_table, day, rows, part, complete) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (source_namespace, source_table, day) DO UPDATE SET rows = excluded.rows, part = excluded.part,
             complete = excluded.complete WHERE NOT pruned"
        ))?;
        for d in days {
            upsert.execute(params![namespace, table, d.day, d.rows as i64, d.part.to_string_lossy(), d.complete])?;
        }
    }
    tx.commit()
}

/// The days of `table` the archive holds that the mirror still has (not removed), in day order.
pub fn archived_days(conn: &Connection, namespace: &str, table: &str) -> rusqlite::Result<Vec<ArchivedDay>> {
    if !has_table_named(conn, ARCHIVED)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT day, rows, part, complete FROM {ARCHIVED}
         WHERE source_namespace = ?1 AND source_table = ?2 AND NOT pruned ORDER BY day"
    ))?;
    stmt.query_map([namespace, table], |r| {
        Ok(ArchivedDay {
            day: r.get(0)?,
            rows: r.get::<_, i64>(1)? as u64,
            part: PathBuf::from(r.get::<_, String>(2)?),
            complete: r.get(3)?,
        })
    })?
    .collect()
}

/// The days the mirror removed after archiving them: an archive never rewrites those (the
/// mirror no longer holds their rows).
pub fn pruned_days(
    conn: &Connection,
    schema: &str,
    namespace: &str,
    table: &str,
) -> rusqlite::Result<BTreeSet<String>> {
    let exists: bool = conn.query_row(
        &format!("SELECT count(*) > 0 FROM {}.sqlite_master WHERE type = 'table' AND name = ?1", quote(schema)),
        [ARCHIVED],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(BTreeSet::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT day FROM {}.{ARCHIVED} WHERE source_namespace = ?1 AND source_table = ?2 AND pruned",
        quote(schema)
    ))?;
    stmt.query_map([namespace, table], |r| r.get(0))?.collect()
}

/// What `--keep-days` did to one table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pruned {
    #[serde(skip)]
    pub table: String,
    /// Days before this one (`YYYY-MM-DD`) are older than the kept period.
    pub before: String,
    /// Days removed from the mirror, and their rows.
    pub days: Vec<String>,
    pub rows: u64,
    /// Old days kept because the archive does not hold them whole: `(day, rows, why)`.
    pub kept: Vec<(String, u64, String)>,
}

/// Removes from `table` of the mirror file `conn` the days older than `keep_days` days before
/// its watermark that the archive holds whole (see the module's documentation), with their
/// keys in the change index, in one transaction.
pub fn prune(conn: &mut Connection, namespace: &str, table: &str, keep_days: u32) -> rusqlite::Result<Pruned> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let watermark: Option<String> = tx
        .query_row(
            &format!("SELECT timestamp FROM {BOOKKEEPING} WHERE source_namespace = ?1 AND source_table = ?2"),
            [namespace, table],
            |r| r.get(0),
        )
        .optional()?;
    let Some(watermark) = watermark.and_then(|w| time::parse_rfc3339(&w).ok()) else {
        return Ok(Pruned { table: table.into(), ..Pruned::default() });
    };
    let before = day_of(watermark - i64::from(keep_days) * MICROS_PER_DAY);
    let mut report = Pruned { table: table.into(), before: before.clone(), ..Pruned::default() };
    let (t, column) = (quote(table), quote(APPEND_ONLY_TIME_COLUMN));
    let old: Vec<(String, u64)> = {
        let mut stmt = tx.prepare(&format!(
            "SELECT substr({column}, 1, 10), count(*) FROM {t} WHERE {column} < ?1 GROUP BY 1 ORDER BY 1"
        ))?;
        stmt.query_map([&before], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?.collect::<Result<_, _>>()?
    };
    let any_archived = has_table_named(&tx, ARCHIVED)?;
    let archived = |day: &str| -> rusqlite::Result<Option<ArchivedDay>> {
        if !any_archived {
            return Ok(None);
        }
        tx.query_row(
            &format!(
                "SELECT rows, part, complete FROM {ARCHIVED} WHERE source_namespace = ?1 AND source_table = ?2 AND day = ?3"
            ),
            [namespace, table, day],
            |r| {
                Ok(ArchivedDay {
                    day: day.to_string(),
                    rows: r.get::<_, i64>(0)? as u64,
                    part: PathBuf::from(r.get::<_, String>(1)?),
                    complete: r.get(2)?,
                })
            },
        )
        .optional()
    };
    for (day, rows) in old {
        let why = match archived(&day)? {
            None => "not archived".to_string(),
            Some(a) if !a.complete => "archived while the day was still filling".to_string(),
            Some(a) if a.rows != rows => format!("the archive holds {} rows of it, the mirror {rows}", a.rows),
            Some(a) if !is_file(&a.part) => format!("its archive file {} is gone", a.part.display()),
            Some(_) => {
                let key: String = tx.query_row(
                    &format!("SELECT column_name FROM {DICTIONARY_COLUMNS} WHERE table_name = ?1 AND is_key"),
                    [table],
                    |r| r.get(0),
                )?;
                let key = quote(&key);
                let day_rows = format!("SELECT {key} FROM {t} WHERE substr({column}, 1, 10) = ?3");
                tx.execute(
                    &format!(
                        "DELETE FROM {CHANGES} WHERE source_namespace = ?1 AND source_table = ?2 AND key IN ({day_rows})"
                    ),
                    params![namespace, table, day],
                )?;
                let removed = tx.execute(&format!("DELETE FROM {t} WHERE substr({column}, 1, 10) = ?1"), [&day])?;
                tx.execute(
                    &format!(
                        "UPDATE {ARCHIVED} SET pruned = 1 WHERE source_namespace = ?1 AND source_table = ?2 AND day = ?3"
                    ),
                    params![namespace, table, day],
                )?;
                report.rows += removed as u64;
                report.days.push(day);
                continue;
            }
        };
        report.kept.push((day, rows, why));
    }
    tx.commit()?;
    Ok(report)
}

fn is_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() > 0)
}

/// The UTC day of `at`, `YYYY-MM-DD`.
fn day_of(at: Micros) -> String {
    time::format_fixed(at)[..10].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_is_the_utc_date() {
        assert_eq!(day_of(time::parse_rfc3339("2026-03-01T23:59:59.999999Z").unwrap()), "2026-03-01");
        assert_eq!(day_of(time::parse_rfc3339("2026-03-02T00:00:00Z").unwrap()), "2026-03-02");
    }
}
