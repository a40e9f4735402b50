//! `initdb`, `syncdb` and `dropdb`, written once against [`Sink`].
//!
//! Objects are fetched (compressed as sent) into a spool folder, then decoded and loaded one at
//! a time on a blocking thread that owns the target: one writer per database file. Decoding
//! inflates and CRC-checks every byte, so a corrupt object is caught there, and the table is
//! then tried again from where it stopped. initdb fills a staging table and swaps it in with its
//! bookkeeping row in one transaction; syncdb applies upserts, deletes and the new watermark in
//! one transaction. A failure anywhere keeps the previous consistent state.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;

use serde::Serialize;

use crate::api::types::{Format, Mode, Query};
use crate::api::{ApiError, Client, ServerErrorKind};
use crate::decode::tsv::TsvDecoder;
use crate::decode::{DecodeError, Record};
use crate::fetch::{self, FetchError, FetchProgress};
use crate::schema::{SchemaError, TableDef};
use crate::sink::{Bookkeeping, Sink, SinkError};
use crate::tables::Fatal;
use crate::time;

/// Rows per batch handed from the decoder to the writer. The few batches in flight are most of
/// the loader's memory (a decoded row of a wide table takes a couple of kilobytes): at 2,000 rows
/// they were 34 MB of a 69 MB peak for `submissions`; at 500 they fit in cache and load faster.
const BATCH_ROWS: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("{table}: object {object}: {source}; the table keeps its previous state")]
    Decode { table: String, object: String, source: DecodeError },
    #[error("{table}: object {object} is corrupt or incomplete ({detail}); the table keeps its previous state")]
    CorruptObject { table: String, object: String, detail: String },
    #[error("{table}: cannot read {}: {source}", path.display())]
    Io { table: String, path: PathBuf, source: std::io::Error },
    #[error("{table} is already initialised; run syncdb to update it (or initdb --replace to load it again)")]
    AlreadyInitialised { table: String },
    #[error(
        "{namespace}.{table}: this database already holds a table {table} of namespace {owner}; use another file for {namespace} (--connection-string)"
    )]
    OwnedByAnotherNamespace { namespace: String, table: String, owner: String },
    #[error("{table} is not initialised; run initdb first")]
    NotInitialised { table: String },
    #[error(
        "{namespace}.{table}: the server needs a new snapshot ({reason}); run `dap initdb --replace --namespace {namespace} --table {table}` on the same target, or syncdb with --auto-reinit"
    )]
    SnapshotRequired { namespace: String, table: String, reason: String },
    #[error("stopped because the database write failed")]
    Stopped,
    #[error("the incremental job reported no `{what}`")]
    MissingTime { what: &'static str },
}

impl Fatal for SyncError {
    fn is_fatal(&self) -> bool {
        match self {
            SyncError::Api(e) | SyncError::Fetch(FetchError::Api(e)) => e.is_fatal(),
            _ => false,
        }
    }
}

/// What one table's replication did (the `--json` result).
#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub job_id: String,
    pub rows: u64,
    pub watermark: String,
    pub schema_version: u32,
}

struct Silent;

impl FetchProgress for Silent {
    fn bytes(&self, _: u64) {}
    fn object_done(&self) {}
}

/// Replicates tables from DAP into one target.
pub struct Replicator<S: Sink> {
    pub client: Client,
    pub sink: Arc<Mutex<S>>,
    /// Where objects wait (compressed) between download and load.
    pub spool: PathBuf,
    pub download_concurrency: usize,
    /// Tables that download and load at once; the others wait for their job or for a slot.
    pub transfers: tokio::sync::Semaphore,
    /// When the server refuses an incremental (snapshot required, out of range), re-snapshot
    /// the table atomically instead of stopping.
    pub auto_reinit: bool,
}

/// The schema as the bookkeeping table stores it: compact JSON without `meta`.
fn schema_description(envelope: &serde_json::Value) -> String {
    let mut schema = envelope.get("schema").cloned().unwrap_or_default();
    if let Some(props) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
        props.shift_remove("meta");
    }
    schema.to_string()
}

/// Decodes one gzip TSV object in batches, handing each batch to `load`.
fn load_object(
    path: &Path,
    def: &TableDef,
    mut load: impl FnMut(Vec<Record>) -> Result<(), SyncError>,
) -> Result<u64, SyncError> {
    let table = format!("{}.{}", def.namespace, def.name);
    let object = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let file = std::fs::File::open(path).map_err(|source| SyncError::Io {
        table: table.clone(),
        path: path.to_path_buf(),
        source,
    })?;
    // Reading fails only when inflating does (bad data, a CRC mismatch, a cut-off stream) or on
    // text that is no UTF-8: either way the object as downloaded is unusable.
    let corrupt = |e: std::io::Error| SyncError::CorruptObject {
        table: table.clone(),
        object: object.clone(),
        detail: e.to_string(),
    };
    let mut lines = std::io::BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(file)).lines();
    let Some(header) = lines.next().transpose().map_err(corrupt)? else { return Ok(0) };
    let decoder = TsvDecoder::new(&header, def).map_err(|source| SyncError::Decode {
        table: table.clone(),
        object: object.clone(),
        source,
    })?;
    let mut batch = Vec::with_capacity(BATCH_ROWS);
    let mut rows = 0;
    for (i, line) in lines.enumerate() {
        let line = line.map_err(corrupt)?;
        if line.is_empty() {
            continue;
        }
        batch.push(decoder.decode(&line, i as u64 + 2).map_err(|source| SyncError::Decode {
            table: table.clone(),
            object: object.clone(),
            source,
        })?);
        if batch.len() == BATCH_ROWS {
            rows += batch.len() as u64;
            load(std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS)))?;
        }
    }
    rows += batch.len() as u64;
    load(batch)?;
    Ok(rows)
}

/// What the decoding thread hands the writer.
enum Piece {
    /// An object starts.
    Begin,
    Rows(Vec<Record>),
    /// The object (its id) is complete.
    End(String),
}

/// Downloaded objects as they arrive (or the error that stopped the downloads).
type Arrivals = Box<dyn Iterator<Item = Result<fetch::Fetched, SyncError>> + Send>;

/// Decodes `files` on a thread of its own while `write` stores what it produced, so that
/// decompressing and decoding overlap with the database's work; each file is deleted once
/// decoded. Returns the rows decoded.
fn decode_and_write(
    files: Arrivals,
    def: &TableDef,
    mut write: impl FnMut(Piece) -> Result<(), SyncError>,
) -> Result<u64, SyncError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Piece, SyncError>>(4);
    let decode_def = def.clone();
    let decoder = std::thread::spawn(move || {
        let mut rows = 0;
        for f in files {
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    break;
                }
            };
            let sent = tx.send(Ok(Piece::Begin)).is_ok()
                && match load_object(&f.path, &decode_def, |batch| {
                    tx.send(Ok(Piece::Rows(batch))).map_err(|_| SyncError::Stopped)
                }) {
                    Ok(n) => {
                        rows += n;
                        tx.send(Ok(Piece::End(f.object_id))).is_ok()
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        false
                    }
                };
            let _ = std::fs::remove_file(&f.path);
            if !sent {
                break;
            }
        }
        rows
    });
    let mut outcome = Ok(());
    while let Ok(piece) = rx.recv() {
        if let Err(e) = piece.and_then(&mut write) {
            outcome = Err(e);
            break;
        }
    }
    drop(rx); // stops the decoder if the writer failed
    let rows = decoder.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    outcome.map(|()| rows)
}

impl<S: Sink + 'static> Replicator<S> {
    fn query(&self, since: Option<String>) -> Query {
        Query { format: Format::Tsv, mode: Some(Mode::Condensed), since, until: None }
    }

    async fn schema(&self, namespace: &str, table: &str) -> Result<(TableDef, String), SyncError> {
        let envelope = self.client.schema(namespace, table).await?;
        Ok((TableDef::from_versioned(namespace, table, &envelope)?, schema_description(&envelope)))
    }

    /// Runs `work` on the target, on a blocking thread; an error rolls back what it left open.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut S) -> Result<T, SyncError> + Send + 'static,
    ) -> Result<T, SyncError> {
        let sink = self.sink.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let result = work(&mut s);
            if result.is_err() {
                s.abort();
            }
            result
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Downloads `objects` while `load` stores them: objects reach the loader in order as they
    /// arrive, through a queue of two, and each is deleted once loaded. So the spool holds a few
    /// objects, never the whole table, and downloading overlaps loading.
    async fn download_and_load<T: Send + 'static>(
        &self,
        job_id: &str,
        objects: &[String],
        load: impl FnOnce(&mut S, Arrivals) -> Result<T, SyncError> + Send + 'static,
    ) -> Result<T, SyncError> {
        let _slot = self.transfers.acquire().await.expect("the transfer semaphore is never closed");
        let io = |source| SyncError::Io { table: job_id.into(), path: self.spool.clone(), source };
        std::fs::create_dir_all(&self.spool).map_err(io)?;
        let spool = tempfile::Builder::new()
            .prefix(&format!("job_{}_", fetch::safe_component(job_id)))
            .tempdir_in(&self.spool)
            .map_err(io)?;
        let downloads = fetch::fetch_in_order(
            &self.client,
            objects,
            spool.path(),
            Format::Tsv,
            fetch::Delivery::Spool,
            self.download_concurrency,
            Arc::new(Silent),
        )
        .await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<fetch::Fetched, SyncError>>(2);
        let feed = async move {
            let mut downloads = std::pin::pin!(downloads);
            while let Some(fetched) = downloads.next().await {
                if tx.send(fetched.map_err(SyncError::from)).await.is_err() {
                    break; // the loader stopped
                }
            }
        };
        let arrivals: Arrivals = Box::new(std::iter::from_fn(move || rx.blocking_recv()));
        let ((), loaded) = tokio::join!(feed, self.blocking(move |s| load(s, arrivals)));
        drop(spool);
        loaded
    }

    /// Runs `attempt` again while an object turns out corrupt, up to the client's attempt limit:
    /// the failed attempt rolled back, and the next downloads the object anew (initdb resumes
    /// after the objects already loaded).
    async fn retry_corrupt<F, Fut>(&self, attempt: F) -> Result<TableReport, SyncError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<TableReport, SyncError>>,
    {
        let limit = self.client.config().retry.attempts.max(1);
        let mut tries = 1;
        loop {
            match attempt().await {
                Err(SyncError::CorruptObject { table, object, detail }) if tries < limit => {
                    tracing::warn!(
                        "{table}: object {object} is corrupt or incomplete ({detail}); downloading it again"
                    );
                    tries += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// Snapshots a table into a staging table and swaps it in with its bookkeeping row.
    pub async fn initdb(&self, namespace: &str, table: &str, replace: bool) -> Result<TableReport, SyncError> {
        self.retry_corrupt(|| self.initdb_once(namespace, table, replace)).await
    }

    /// Applies the changes since the stored watermark, with the new watermark, in one transaction.
    pub async fn syncdb(&self, namespace: &str, table: &str) -> Result<TableReport, SyncError> {
        self.retry_corrupt(|| self.syncdb_once(namespace, table)).await
    }

    async fn initdb_once(&self, namespace: &str, table: &str, replace: bool) -> Result<TableReport, SyncError> {
        let (ns, t) = (namespace.to_string(), table.to_string());
        let (initialised, owner) =
            self.blocking(move |s| Ok((s.bookkeeping(&ns, &t)?.is_some(), s.owner(&t)?))).await?;
        if let Some(owner) = owner.filter(|o| o != namespace) {
            return Err(SyncError::OwnedByAnotherNamespace { namespace: namespace.into(), table: table.into(), owner });
        }
        if initialised && !replace {
            return Err(SyncError::AlreadyInitialised { table: format!("{namespace}.{table}") });
        }
        let (def, description) = self.schema(namespace, table).await?;
        let job = self.client.run_job(namespace, table, &self.query(None), |_| {}).await?;
        let at = job
            .at
            .as_deref()
            .map(time::parse_rfc3339)
            .transpose()
            .map_err(|_| SyncError::MissingTime { what: "at" })?
            .ok_or(SyncError::MissingTime { what: "at" })?;
        let (stage_def, job_id) = (def.clone(), job.id.clone());
        let done = self.blocking(move |s| Ok(s.stage(&stage_def, &job_id)?)).await?;
        if !done.is_empty() {
            tracing::info!(
                "{namespace}.{table}: resuming job {}: {} of {} objects were already loaded",
                job.id,
                done.len(),
                job.objects.len()
            );
        }
        let todo: Vec<String> = job.objects.iter().filter(|o| !done.contains(o)).cloned().collect();
        let bookkeeping = Bookkeeping {
            namespace: namespace.into(),
            table: table.into(),
            watermark: at,
            schema_version: def.version,
            schema_description: description,
        };
        let (schema_version, job_id) = (def.version, job.id.clone());
        let rows = self
            .download_and_load(&job.id, &todo, move |s, arrivals| {
                let rows = decode_and_write(arrivals, &def, |piece| {
                    match piece {
                        Piece::Begin => s.begin_object()?,
                        Piece::Rows(batch) => s.stage_rows(&def, &batch)?,
                        Piece::End(object) => s.finish_object(&def, &job_id, &object)?,
                    }
                    Ok(())
                })?;
                s.publish(&def, &bookkeeping)?;
                Ok(rows)
            })
            .await?;
        Ok(TableReport { job_id: job.id, rows, watermark: time::format_wire(at), schema_version })
    }

    async fn syncdb_once(&self, namespace: &str, table: &str) -> Result<TableReport, SyncError> {
        let (ns, t) = (namespace.to_string(), table.to_string());
        let stored = self
            .blocking(move |s| Ok(s.bookkeeping(&ns, &t)?))
            .await?
            .ok_or_else(|| SyncError::NotInitialised { table: format!("{namespace}.{table}") })?;
        let (def, description) = self.schema(namespace, table).await?;
        let query = self.query(Some(time::format_wire(fresh_since(stored.watermark))));
        let job = match self.client.run_job(namespace, table, &query, |_| {}).await {
            Ok(job) => job,
            Err(e)
                if matches!(e.server_kind(), Some(ServerErrorKind::SnapshotRequired | ServerErrorKind::OutOfRange)) =>
            {
                if !self.auto_reinit {
                    return Err(SyncError::SnapshotRequired {
                        namespace: namespace.into(),
                        table: table.into(),
                        reason: e.to_string(),
                    });
                }
                tracing::warn!("{namespace}.{table}: {e}; taking a new snapshot (--auto-reinit)");
                return Box::pin(self.initdb(namespace, table, true)).await;
            }
            Err(e) => return Err(e.into()),
        };
        let until = job
            .until
            .as_deref()
            .map(time::parse_rfc3339)
            .transpose()
            .map_err(|_| SyncError::MissingTime { what: "until" })?
            .ok_or(SyncError::MissingTime { what: "until" })?;
        let until = until.max(stored.watermark);
        let bookkeeping = Bookkeeping {
            namespace: namespace.into(),
            table: table.into(),
            watermark: until,
            schema_version: def.version,
            schema_description: description,
        };
        let schema_version = def.version;
        let rows = self
            .download_and_load(&job.id, &job.objects, move |s, arrivals| {
                s.begin_changes(&def)?;
                let rows = decode_and_write(arrivals, &def, |piece| {
                    if let Piece::Rows(batch) = piece {
                        s.apply(&def, &batch)?;
                    }
                    Ok(())
                })?;
                s.commit_changes(&bookkeeping)?;
                Ok(rows)
            })
            .await?;
        Ok(TableReport { job_id: job.id, rows, watermark: time::format_wire(until), schema_version })
    }
}

/// The `since` of an incremental: the watermark less a random fraction of a second. DAP answers
/// an identical query with the existing job for a day, so a sync that found nothing would
/// otherwise get that same empty job back until it expires. The overlap is safe: incrementals
/// carry the latest version of each key, and re-applying a state already in the mirror changes
/// nothing.
fn fresh_since(watermark: time::Micros) -> time::Micros {
    watermark - fastrand::i64(1..1_000_000)
}

/// Drops a table and its bookkeeping row (no DAP access needed).
pub fn dropdb<S: Sink>(sink: &mut S, namespace: &str, table: &str) -> Result<(), SyncError> {
    if sink.drop_table(namespace, table)? {
        Ok(())
    } else {
        Err(SyncError::NotInitialised { table: format!("{namespace}.{table}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_overlaps_the_watermark_slightly_and_varies_between_runs() {
        let w = 1_700_000_000_000_000;
        let runs: std::collections::HashSet<i64> = (0..100).map(|_| fresh_since(w)).collect();
        assert!(runs.iter().all(|s| *s < w && w - s < 1_000_000));
        assert!(runs.len() > 95, "runs ask different queries");
    }
}
