//! The local SQLite mirror as a source, for outward replication: it needs no DAP access at all.
//!
//! A target's position is the DAP watermark its `table_sync` row holds (written in the same
//! transaction as its rows, by whichever client wrote them). Against the mirror's change index
//! (`writer.rs`) that says what the target lacks: the keys changed in the mirror's commits
//! after that watermark, sent as their current rows (or as deletes when the mirror no longer has
//! them). A target older than the mirror's epoch (the mirror took a new snapshot of the table
//! since) needs a full reload; a target ahead of the mirror (synced straight from DAP since) is
//! left alone until the mirror catches up. Positions live in the targets, so a copied mirror
//! file knows nothing false about them, and any mirror of the same DAP data can serve any target.

use crate::source::SnapshotCause;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, params};

use super::format::{BOOKKEEPING, CHANGES, COMMITS, LeaveNoTrace, from_sql, open_read_only, quote};
use crate::decode::Record;
use crate::feed::{Feed, FeedSender, Piece};
use crate::progress::TableProgress;
use crate::schema::TableDef;
use crate::source::{Extract, Reading, Schema, Source, SourceError};
use crate::time::{self, Micros};
use crate::value::Value;
/// Rows per snapshot part (an interrupted initdb of a target resumes after whole parts).
const PART_ROWS: i64 = 100_000;
/// Records per feed batch.
const BATCH: usize = 2_000;

pub struct MirrorSource {
    path: PathBuf,
    /// Reading leaves no `-wal`/`-shm` behind (dropped with the last clone of the source).
    _tidy: Arc<LeaveNoTrace>,
}

impl MirrorSource {
    /// The mirror file at `path`, which must exist (replication never creates a mirror).
    pub fn open(path: &Path) -> Result<MirrorSource, SourceError> {
        let source = MirrorSource { path: path.to_path_buf(), _tidy: Arc::new(LeaveNoTrace::note([path])) };
        let present =
            crate::mirror::folder::mirror_file_present(path).map_err(|e| SourceError::failed("", e.to_string()))?;
        if !present {
            return Err(SourceError::failed(
                "",
                format!(
                    "there is no mirror at {}; make it with `dap initdb` first (or name another with --from sqlite:///PATH.db)",
                    path.display()
                ),
            ));
        }
        source.connect()?;
        Ok(source)
    }

    fn io(&self, e: rusqlite::Error) -> SourceError {
        SourceError::failed(format!("reading the mirror {}", self.path.display()), e)
    }

    /// A read-only connection (the mirror's writer may be syncing meanwhile: WAL readers see a
    /// consistent snapshot per transaction).
    fn connect(&self) -> Result<Connection, SourceError> {
        open_read_only(&self.path).map_err(|e| self.io(e))
    }

    /// The table's bookkeeping row: version, description and watermark.
    fn bookkeeping(
        &self,
        conn: &Connection,
        namespace: &str,
        table: &str,
    ) -> Result<(u32, String, Micros), SourceError> {
        let row: Option<(u32, String, String)> = conn
            .query_row(
                &format!(
                    "SELECT schema_version, schema_description, timestamp FROM {BOOKKEEPING} WHERE source_namespace = ?1 AND source_table = ?2"
                ),
                params![namespace, table],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })
            .map_err(|e| self.io(e))?;
        let (version, description, watermark) = row.ok_or_else(|| {
            SourceError::failed(
                "",
                format!(
                    "{namespace}.{table} is not in the mirror {}; add it with `{}`",
                    self.path.display(),
                    crate::term::command(&["initdb", "--namespace", namespace, "--table", table])
                ),
            )
        })?;
        let watermark = time::parse_rfc3339(&watermark)
            .map_err(|e| SourceError::failed(format!("the mirror's watermark of {namespace}.{table}"), e))?;
        Ok((version, description, watermark))
    }

    /// The watermark of commit `seq` of a table's change index, if it has it.
    fn commit_watermark(conn: &Connection, def: &TableDef, seq: i64) -> rusqlite::Result<Option<Micros>> {
        let text: Option<String> = conn
            .query_row(
                &format!(
                    "SELECT watermark FROM {COMMITS} WHERE source_namespace = ?1 AND source_table = ?2 AND seq = ?3"
                ),
                params![def.namespace, def.name, seq],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })?;
        Ok(text.and_then(|t| time::parse_rfc3339(&t).ok()))
    }
}

/// A row of a mirror table as a record: the key, then the values in the definition's order.
fn record(row: &rusqlite::Row<'_>, def: &TableDef, offset: usize) -> Result<Record, String> {
    let mut values = Vec::with_capacity(def.values.len());
    let key = from_sql(row.get_ref(offset).map_err(|e| e.to_string())?, &def.key.ty)?;
    for (i, c) in def.values.iter().enumerate() {
        let v = row.get_ref(offset + 1 + i).map_err(|e| e.to_string())?;
        values.push(from_sql(v, &c.ty).map_err(|e| format!("{}: {e}", c.name))?);
    }
    Ok(Record { ts: None, action: Some('U'), key, values })
}

/// A part of an extract: a range of row ids of a snapshot, or the keys changed since a commit.
enum Part {
    Rows(i64, i64),
    ChangedSince(i64),
}

impl Part {
    fn parse(text: &str) -> Option<Part> {
        if let Some(range) = text.strip_prefix("rows:") {
            let (a, b) = range.split_once('-')?;
            return Some(Part::Rows(a.parse().ok()?, b.parse().ok()?));
        }
        text.strip_prefix("changes-since:").and_then(|s| s.parse().ok()).map(Part::ChangedSince)
    }
}

/// Reads the parts into the feed, in one read transaction (one consistent state of the mirror).
fn read_parts(source: &MirrorSource, def: &TableDef, parts: &[String], tx: &FeedSender) -> Result<u64, SourceError> {
    let conn = source.connect()?;
    conn.execute_batch("BEGIN").map_err(|e| source.io(e))?;
    let columns: Vec<String> = def.columns().map(|c| format!("t.{}", quote(&c.name))).collect();
    let table = quote(&def.name);
    let mut total = 0u64;
    let send =
        |piece: Piece| tx.blocking_send(piece).map_err(|_| SourceError::failed("", "the target stopped reading"));
    for part in parts {
        let bad = |e: String| SourceError::Corrupt { table: def.name.clone(), part: part.clone(), detail: e };
        send(Piece::Begin(part.clone()))?;
        let mut batch = Vec::with_capacity(BATCH);
        match Part::parse(part).ok_or_else(|| bad("not a part of the mirror".into()))? {
            Part::Rows(first, last) => {
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT {} FROM {table} AS t WHERE t.rowid BETWEEN ?1 AND ?2 ORDER BY t.rowid",
                        columns.join(", ")
                    ))
                    .map_err(|e| source.io(e))?;
                let mut rows = stmt.query(params![first, last]).map_err(|e| source.io(e))?;
                while let Some(row) = rows.next().map_err(|e| source.io(e))? {
                    batch.push(record(row, def, 0).map_err(bad)?);
                    if batch.len() == BATCH {
                        total += batch.len() as u64;
                        send(Piece::Rows(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))?;
                    }
                }
            }
            Part::ChangedSince(seq) => {
                // The current row of every key changed since the commit; none: it was deleted.
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT c.key, t.{key} IS NOT NULL, {} FROM {CHANGES} AS c LEFT JOIN {table} AS t ON t.{key} = c.key
                         WHERE c.source_namespace = ?1 AND c.source_table = ?2 AND c.seq >= ?3",
                        columns.join(", "),
                        key = quote(&def.key.name)
                    ))
                    .map_err(|e| source.io(e))?;
                let mut rows = stmt.query(params![def.namespace, def.name, seq]).map_err(|e| source.io(e))?;
                while let Some(row) = rows.next().map_err(|e| source.io(e))? {
                    let present: bool = row.get(1).map_err(|e| source.io(e))?;
                    let r = if present {
                        record(row, def, 2).map_err(bad)?
                    } else {
                        let key = from_sql(row.get_ref(0).map_err(|e| source.io(e))?, &def.key.ty).map_err(bad)?;
                        Record { ts: None, action: Some('D'), key, values: vec![Value::Null; def.values.len()] }
                    };
                    batch.push(r);
                    if batch.len() == BATCH {
                        total += batch.len() as u64;
                        send(Piece::Rows(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))?;
                    }
                }
            }
        }
        if !batch.is_empty() {
            total += batch.len() as u64;
            send(Piece::Rows(batch))?;
        }
        send(Piece::End(part.clone()))?;
    }
    send(Piece::Done)?;
    let _ = conn.execute_batch("COMMIT");
    Ok(total)
}

#[async_trait::async_trait]
impl Source for MirrorSource {
    async fn tables(&self, namespace: &str) -> Result<Vec<String>, SourceError> {
        let conn = self.connect()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT source_table FROM {BOOKKEEPING} WHERE source_namespace = ?1 ORDER BY source_table"
            ))
            .map_err(|e| self.io(e))?;
        let rows = stmt.query_map([namespace], |r| r.get::<_, String>(0)).map_err(|e| self.io(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.io(e))
    }

    async fn schema(&self, namespace: &str, table: &str) -> Result<Schema, SourceError> {
        let conn = self.connect()?;
        let (version, description, _) = self.bookkeeping(&conn, namespace, table)?;
        let def = TableDef::from_description(namespace, table, version, &description)?;
        Ok(Schema { def, description })
    }

    async fn snapshot(&self, def: &TableDef, _watch: &TableProgress) -> Result<Extract, SourceError> {
        let conn = self.connect()?;
        conn.execute_batch("BEGIN").map_err(|e| self.io(e))?;
        let (_, _, watermark) = self.bookkeeping(&conn, &def.namespace, &def.name)?;
        let (first, last): (Option<i64>, Option<i64>) = conn
            .query_row(&format!("SELECT MIN(rowid), MAX(rowid) FROM {}", quote(&def.name)), [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(|e| self.io(e))?;
        let mut parts = Vec::new();
        if let (Some(first), Some(last)) = (first, last) {
            let mut at = first;
            while at <= last {
                let end = at.saturating_add(PART_ROWS - 1).min(last);
                parts.push(format!("rows:{at}-{end}"));
                at = end + 1;
            }
        }
        let epoch = Self::commit_watermark(&conn, def, 0).map_err(|e| self.io(e))?.unwrap_or(watermark);
        // The same mirror state gives the same extract, so an interrupted load resumes.
        let id = format!("mirror-epoch-{}-at-{}", time::format_wire(epoch), time::format_wire(watermark));
        Ok(Extract { id, watermark, parts, applied_through: None })
    }

    async fn changes(&self, def: &TableDef, since: Micros, _watch: &TableProgress) -> Result<Extract, SourceError> {
        let conn = self.connect()?;
        conn.execute_batch("BEGIN").map_err(|e| self.io(e))?;
        let (_, _, watermark) = self.bookkeeping(&conn, &def.namespace, &def.name)?;
        if since > watermark {
            return Err(SourceError::TargetAhead { mirror: watermark, target: since });
        }
        let Some(epoch) = Self::commit_watermark(&conn, def, 0).map_err(|e| self.io(e))? else {
            return Err(SourceError::SnapshotRequired {
                reason: "the mirror has no change index for the table yet (made by an older dap); it is reloaded once"
                    .into(),
                cause: SnapshotCause::Other,
            });
        };
        // A target that keeps whole seconds (MySQL) holds the epoch's start truncated.
        let whole_second_of_epoch =
            since % time::MICROS_PER_SECOND == 0 && since >= epoch - epoch.rem_euclid(time::MICROS_PER_SECOND);
        if since < epoch && !whole_second_of_epoch {
            return Err(SourceError::SnapshotRequired {
                reason: format!(
                    "the target holds {} but the mirror's copy starts at its snapshot of {}",
                    time::format_wire(since),
                    time::format_wire(epoch)
                ),
                cause: SnapshotCause::Other,
            });
        }
        // The first commit the target lacks: the one after the last whose watermark it holds.
        let first: Option<i64> = conn
            .query_row(
                &format!(
                    "SELECT MIN(seq) FROM {COMMITS} WHERE source_namespace = ?1 AND source_table = ?2 AND seq > 0 AND watermark > ?3"
                ),
                params![def.namespace, def.name, time::format_fixed(since)],
                |r| r.get(0),
            )
            .map_err(|e| self.io(e))?;
        let id = format!("mirror-since-{}-at-{}", time::format_wire(since), time::format_wire(watermark));
        let parts = first.map(|seq| vec![format!("changes-since:{seq}")]).unwrap_or_default();
        Ok(Extract { id, watermark, parts, applied_through: None })
    }

    fn read(&self, def: &TableDef, _extract: &Extract, parts: Vec<String>, watch: Arc<TableProgress>) -> Reading {
        // A snapshot's parts are rowid ranges: their sizes bound the rows (an ETA's total).
        let rows: u64 = parts
            .iter()
            .filter_map(|p| match Part::parse(p)? {
                Part::Rows(first, last) => Some((last - first + 1).max(0) as u64),
                Part::ChangedSince(_) => None,
            })
            .sum();
        watch.reading("reading the mirror", rows);
        let (tx, feed): (FeedSender, Feed) = Feed::channel(4);
        let source = MirrorSource { path: self.path.clone(), _tidy: self._tidy.clone() };
        let def = def.clone();
        let task = tokio::task::spawn(async move {
            tokio::task::spawn_blocking(move || read_parts(&source, &def, &parts, &tx))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        });
        Reading { feed, task }
    }
}
