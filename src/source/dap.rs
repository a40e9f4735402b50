//! DAP as a source: schemas and jobs through the Query API; objects fetched (compressed, as
//! sent) into a spool folder a few at a time, then inflated, CRC-checked and decoded on a thread of
//! their own into the feed, so that downloading, decoding and the target's writing overlap and the
//! spool never holds the whole table.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;

use super::{Extract, Reading, Schema, SnapshotCause, Source, SourceError};
use crate::api::types::{Format, Mode, Query};
use crate::api::{ApiError, Client, CompleteJob, JobStage, ServerErrorKind};
use crate::decode::Record;
use crate::decode::tsv::TsvDecoder;
use crate::feed::{Feed, FeedSender, Piece};
use crate::fetch;
use crate::progress::TableProgress;
use crate::schema::TableDef;
use crate::time::{self, Micros};

/// Rows per batch handed from the decoder to the target. The few batches in flight are most of
/// the loader's memory (a decoded row of a wide table takes a couple of kilobytes): at 2,000 rows
/// they were 34 MB of a 69 MB peak for `submissions`; at 500 they fit in cache and load faster.
const BATCH_ROWS: usize = 500;

/// Pieces in flight between the decoder and the target.
const FEED_DEPTH: usize = 4;

/// Reads tables from DAP.
pub struct DapSource {
    pub client: Client,
    /// Where objects wait (compressed) between download and decoding.
    pub spool: PathBuf,
    pub download_concurrency: usize,
    /// Tables that download at once; the others wait for their job or for a slot.
    pub transfers: Arc<tokio::sync::Semaphore>,
}

fn query(since: Option<Micros>) -> Query {
    Query { format: Format::Tsv, mode: Some(Mode::Condensed), since: since.map(time::format_wire), until: None }
}

/// The schema as the bookkeeping table stores it: compact JSON without `meta`.
fn schema_description(envelope: &serde_json::Value) -> String {
    let mut schema = envelope.get("schema").cloned().unwrap_or_default();
    if let Some(props) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
        props.shift_remove("meta");
    }
    schema.to_string()
}

/// The `since` of an incremental: the watermark less a random fraction of a second. DAP answers
/// an identical query with the existing job for a day, so a sync that found nothing would
/// otherwise get that same empty job back until it expires. The overlap is safe: incrementals
/// carry the latest version of each key, and re-applying a state already in the target changes
/// nothing.
fn fresh_since(watermark: Micros) -> Micros {
    watermark - fastrand::i64(1..1_000_000)
}

fn job_time(value: Option<&str>, what: &'static str) -> Result<Micros, SourceError> {
    value
        .map(time::parse_rfc3339)
        .transpose()
        .ok()
        .flatten()
        .ok_or_else(|| SourceError::failed("", format!("the job reported no `{what}`")))
}

impl DapSource {
    /// Runs the job of a query, submitting it again with backoff while DAP reports the job
    /// failed (a `ProcessingError` is usually transient on DAP's side), up to the attempts of
    /// the client's retry policy. `query` is asked for each attempt: an incremental's `since`
    /// varies (see [`fresh_since`]), so DAP cannot hand back the failed job from its cache.
    async fn run_job(
        &self,
        def: &TableDef,
        query: impl Fn() -> Query,
        watch: &TableProgress,
    ) -> Result<CompleteJob, ApiError> {
        let policy = self.client.retry_policy();
        let mut attempt = 1;
        loop {
            let on_stage = |stage: JobStage| match stage {
                JobStage::WaitingForSlot => {
                    watch.waiting_for_slot(self.client.next_job_slot(), &self.client.job_limit())
                }
                stage => watch.stage(stage.describe()),
            };
            match self.client.run_job(&def.namespace, &def.name, &query(), on_stage).await {
                Err(ApiError::JobFailed { id, kind, message, uuid, .. }) if attempt < policy.attempts => {
                    let wait = policy.backoff(attempt, None);
                    tracing::warn!(
                        "{}.{}: job {id} failed on DAP's side ({kind}: {message}, uuid {uuid}); submitting the query again in {:.1} s (attempt {} of {})",
                        def.namespace,
                        def.name,
                        wait.as_secs_f64(),
                        attempt + 1,
                        policy.attempts
                    );
                    watch.stage("job failed on DAP's side; submitting the query again");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(ApiError::JobFailed { id, kind, message, uuid, .. }) => {
                    return Err(ApiError::JobFailed { id, kind, message, uuid, attempts: attempt });
                }
                outcome => return outcome,
            }
        }
    }
}

#[async_trait::async_trait]
impl Source for DapSource {
    async fn tables(&self, namespace: &str) -> Result<Vec<String>, SourceError> {
        Ok(self.client.tables(namespace).await?)
    }

    async fn schema(&self, namespace: &str, table: &str) -> Result<Schema, SourceError> {
        let envelope = self.client.schema(namespace, table).await?;
        Ok(Schema {
            def: TableDef::from_versioned(namespace, table, &envelope)?,
            description: schema_description(&envelope),
        })
    }

    async fn snapshot(&self, def: &TableDef, watch: &TableProgress) -> Result<Extract, SourceError> {
        let job = self.run_job(def, || query(None), watch).await?;
        Ok(Extract {
            watermark: job_time(job.at.as_deref(), "at")?,
            id: job.id,
            parts: job.objects,
            applied_through: None,
        })
    }

    async fn changes(&self, def: &TableDef, watermark: Micros, watch: &TableProgress) -> Result<Extract, SourceError> {
        let job = match self.run_job(def, || query(Some(fresh_since(watermark))), watch).await {
            Ok(job) => job,
            Err(e) => {
                let cause = match e.server_kind() {
                    Some(ServerErrorKind::OutOfRange) => SnapshotCause::OutOfWindow,
                    Some(ServerErrorKind::SnapshotRequired) => SnapshotCause::Other,
                    _ => return Err(e.into()),
                };
                return Err(SourceError::SnapshotRequired { reason: e.to_string(), cause });
            }
        };
        let until = job_time(job.until.as_deref(), "until")?.max(watermark);
        Ok(Extract { watermark: until, id: job.id, parts: job.objects, applied_through: Some(watermark) })
    }

    fn read(&self, def: &TableDef, extract: &Extract, parts: Vec<String>, watch: Arc<TableProgress>) -> Reading {
        let (tx, feed) = Feed::channel(FEED_DEPTH);
        let (client, spool, transfers) = (self.client.clone(), self.spool.clone(), self.transfers.clone());
        let (def, job, concurrency) = (def.clone(), extract.id.clone(), self.download_concurrency);
        let applied_through = extract.applied_through;
        let task = tokio::spawn(async move {
            if transfers.available_permits() == 0 {
                watch.stage("waiting for a download slot");
            }
            let _slot = transfers.acquire_owned().await.expect("the transfer semaphore is never closed");
            watch.downloading(parts.len());
            let io = |source: std::io::Error| {
                SourceError::failed(format!("{}.{}: cannot use {}", def.namespace, def.name, spool.display()), source)
            };
            std::fs::create_dir_all(&spool).map_err(io)?;
            let folder = tempfile::Builder::new()
                .prefix(&format!("job_{}_", fetch::safe_component(&job)))
                .tempdir_in(&spool)
                .map_err(io)?;
            let downloads = fetch::fetch_in_order(
                &client,
                &parts,
                folder.path(),
                Format::Tsv,
                fetch::Delivery::Spool,
                concurrency,
                watch,
            )
            .await?;
            // Objects reach the decoder in order through a queue of two, so the spool holds a few.
            let (arrived, mut arrivals) = tokio::sync::mpsc::channel::<Result<fetch::Fetched, SourceError>>(2);
            let feed_downloads = async move {
                let mut downloads = std::pin::pin!(downloads);
                while let Some(fetched) = downloads.next().await {
                    if arrived.send(fetched.map_err(SourceError::from)).await.is_err() {
                        break; // the decoder stopped
                    }
                }
            };
            let decoding = tokio::task::spawn_blocking(move || {
                decode_all(std::iter::from_fn(|| arrivals.blocking_recv()), &def, applied_through, &tx)
            });
            let ((), decoded) = tokio::join!(feed_downloads, decoding);
            drop(folder);
            decoded.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        });
        Reading { feed, task }
    }
}

/// Decodes each arrived object into the feed (`Begin`, rows, `End`), deleting it once decoded,
/// then sends `Done`. Records committed at or before `applied_through` are left out: the
/// previous extract ended there, and DAP's `until` is inclusive (`since < ts <= until`), so they
/// were applied then; DAP may deliver the commit at its `since` again, and the `since` jitter
/// asks for a little more still. Leaving them out before they reach the target halves a round
/// of changes that re-delivers its previous commit. Gives the count of records sent. On any
/// failure the feed closes without `Done`.
fn decode_all(
    files: impl Iterator<Item = Result<fetch::Fetched, SourceError>>,
    def: &TableDef,
    applied_through: Option<Micros>,
    tx: &FeedSender,
) -> Result<u64, SourceError> {
    let stopped = || SourceError::failed("", "the target stopped reading");
    let mut new = 0;
    for f in files {
        let f = f?;
        tx.blocking_send(Piece::Begin(f.object_id.clone())).map_err(|_| stopped())?;
        let decoded = decode_object(&f.path, def, applied_through, |batch| {
            new += batch.len() as u64;
            tx.blocking_send(Piece::Rows(batch)).map_err(|_| stopped())
        });
        let _ = std::fs::remove_file(&f.path);
        decoded?;
        tx.blocking_send(Piece::End(f.object_id)).map_err(|_| stopped())?;
    }
    tx.blocking_send(Piece::Done).map_err(|_| stopped())?;
    Ok(new)
}

/// Decodes one gzip TSV object in batches, handing each non-empty batch to `load`; records
/// committed at or before `applied_through` are skipped undecoded (only their `meta.ts` is read).
fn decode_object(
    path: &Path,
    def: &TableDef,
    applied_through: Option<Micros>,
    mut load: impl FnMut(Vec<Record>) -> Result<(), SourceError>,
) -> Result<u64, SourceError> {
    let table = format!("{}.{}", def.namespace, def.name);
    let object = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let file = std::fs::File::open(path)
        .map_err(|source| SourceError::failed(format!("{table}: cannot use {}", path.display()), source))?;
    // Reading fails only when inflating does (bad data, a CRC mismatch, a cut-off stream) or on
    // text that is no UTF-8: either way the object as downloaded is unusable.
    let corrupt =
        |e: std::io::Error| SourceError::Corrupt { table: table.clone(), part: object.clone(), detail: e.to_string() };
    let mut lines = std::io::BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(file)).lines();
    let Some(header) = lines.next().transpose().map_err(corrupt)? else { return Ok(0) };
    let undecodable = |source: crate::decode::DecodeError| SourceError::Undecodable {
        table: table.clone(),
        part: object.clone(),
        source: Box::new(source),
    };
    let decoder = TsvDecoder::new(&header, def).map_err(undecodable)?;
    let mut batch = Vec::with_capacity(BATCH_ROWS);
    let mut rows = 0;
    for (i, line) in lines.enumerate() {
        let line = line.map_err(corrupt)?;
        if line.is_empty() {
            continue;
        }
        if let Some(through) = applied_through
            && decoder.ts_of(&line).is_some_and(|ts| ts <= through)
        {
            continue;
        }
        batch.push(decoder.decode(&line, i as u64 + 2).map_err(undecodable)?);
        if batch.len() == BATCH_ROWS {
            rows += batch.len() as u64;
            load(std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS)))?;
        }
    }
    rows += batch.len() as u64;
    if !batch.is_empty() {
        load(batch)?;
    }
    Ok(rows)
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

    /// The commit at the watermark and anything before it were applied by the previous sync:
    /// only later records reach the target, and the count says so.
    #[test]
    fn records_through_the_watermark_stay_out_of_the_feed() {
        use crate::emulator::output::{Format, Mode, tests::render, tests::sample_def};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part-0.tsv.gz");
        std::fs::write(&path, render(Format::Tsv, Mode::Condensed, true)).unwrap();
        let def = sample_def();
        let read = |through: Option<Micros>| {
            let (tx, mut feed) = Feed::channel(16);
            // decode_all deletes what it decoded: it reads a copy.
            let copy = dir.path().join("copy.tsv.gz");
            std::fs::copy(&path, &copy).unwrap();
            let fetched = fetch::Fetched { object_id: "o".into(), path: copy, bytes: 0 };
            let sent = decode_all(std::iter::once(Ok(fetched)), &def, through, &tx).unwrap();
            drop(tx);
            let mut keys = Vec::new();
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            while let Ok(piece) = runtime.block_on(feed.next()) {
                if let crate::feed::Piece::Rows(rows) = piece {
                    keys.extend(rows.into_iter().map(|r| r.key));
                }
            }
            (sent, keys)
        };
        use crate::value::Value::Int;
        assert_eq!(read(None), (3, vec![Int(1), Int(2), Int(3)]));
        // The sample's records are at …800.0, …801.5 and …802.0 seconds.
        assert_eq!(read(Some(1_714_564_801_500_000)), (1, vec![Int(3)]), "the commit at the watermark is left out");
        assert_eq!(read(Some(1_714_564_801_499_999)), (2, vec![Int(2), Int(3)]));
    }
}
