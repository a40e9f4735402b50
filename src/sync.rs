//! `initdb`, `syncdb` and `dropdb`, written once against a [`Source`] and a [`Sink`]: this file
//! knows neither HTTP nor SQL. The source reads its parts into a feed while the target applies
//! it, so downloading, decoding and writing overlap.
//!
//! initdb asks the target for a staging area (resuming the parts an interrupted run of the same
//! job loaded), loads the snapshot part by part, then publishes it with its bookkeeping row. A
//! target gets a feed only once its first piece is there, so a table waiting for its download
//! slot holds no database connection (tables holding slots could otherwise wait for it forever).
//! syncdb computes the schema delta from the stored description once, then the target applies
//! delta, changes and the new watermark together. A failure anywhere keeps the previous
//! consistent state; a corrupt object or a database error that a retry may clear is tried again.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;

use crate::progress::TableProgress;
use crate::schema::SchemaError;
use crate::schema::delta::{Refused, SchemaDelta};
use crate::sink::{Bookkeeping, Retry, Sink, SinkError};
use crate::source::{Reading, Source, SourceError};
use crate::tables::Fatal;
use crate::time;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("{table} is already initialised; run syncdb to update it (or initdb --replace to load it again)")]
    AlreadyInitialised { table: String },
    #[error("{table} is not initialised; run initdb first")]
    NotInitialised { table: String },
    #[error(
        "{namespace}.{table}: the server needs a new snapshot ({reason}); run `{}` on the same target, or syncdb with --auto-reinit",
        crate::term::command(&["initdb", "--replace", "--namespace", namespace, "--table", table])
    )]
    SnapshotRequired { namespace: String, table: String, reason: String },
}

impl Fatal for SyncError {
    fn is_fatal(&self) -> bool {
        matches!(self, SyncError::Source(e) if e.is_fatal())
    }
}

impl SyncError {
    /// Whether the same table operation may succeed when run again at once.
    fn worth_retrying(&self) -> bool {
        match self {
            SyncError::Source(SourceError::CorruptObject { .. }) => true,
            SyncError::Sink(e) => e.retry() == Retry::MayHelp,
            _ => false,
        }
    }
}

/// What a table operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Initialised,
    Synced,
    /// Left alone: the target holds newer data than the source (see `SourceError::TargetAhead`).
    Ahead,
}

/// What one table's replication did (the `--json` result).
#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub action: Action,
    pub job_id: String,
    /// Rows in the table after the run.
    pub rows: u64,
    /// Changes applied by a sync (upserts and deletes), the overlap a source re-sends left out;
    /// none for a snapshot.
    pub changes: Option<u64>,
    pub watermark: String,
    pub schema_version: u32,
}

impl TableReport {
    /// The report as a log line says it: `initialised, 2000 rows, watermark …`.
    pub fn describe(&self) -> String {
        match (self.action, self.changes) {
            (Action::Synced, Some(changes)) => {
                format!("synced, {changes} changes, {} rows, watermark {}", self.rows, self.watermark)
            }
            (Action::Ahead, _) => format!("left alone (ahead of its source), {} rows", self.rows),
            _ => format!("initialised, {} rows, watermark {}", self.rows, self.watermark),
        }
    }
}

/// Replicates tables from a source into a target.
pub struct Replicator {
    pub source: Arc<dyn Source>,
    pub sink: Arc<dyn Sink>,
    /// When the source cannot give changes (snapshot required, out of range), re-snapshot the
    /// table atomically instead of stopping.
    pub auto_reinit: bool,
    /// Attempts per table for failures a retry may clear.
    pub attempts: u32,
}

/// Waits for the target to consume a feed and for the source that fills it, and gives the
/// source's count of records; the error that caused a failure wins (the source's when the feed
/// stopped early, else the target's).
async fn consume(
    task: JoinHandle<Result<u64, SourceError>>,
    apply: impl Future<Output = Result<u64, SinkError>>,
) -> Result<u64, SyncError> {
    let applied = apply.await;
    if matches!(applied, Err(ref e) if !matches!(e, SinkError::FeedAborted)) {
        task.abort();
    }
    let read = task.await;
    match (applied, read) {
        (Ok(_), Ok(Ok(n))) => Ok(n),
        (Err(SinkError::FeedAborted), Ok(Err(source))) | (Ok(_), Ok(Err(source))) => Err(source.into()),
        (Err(e), _) => Err(e.into()),
        (Ok(_), Err(joined)) if joined.is_panic() => std::panic::resume_unwind(joined.into_panic()),
        (Ok(_), Err(_)) => Err(SinkError::FeedAborted.into()),
    }
}

impl Replicator {
    /// Runs `attempt` again while it fails in a way a retry may clear (a corrupt object, a lost
    /// connection): the failed attempt rolled back, and initdb resumes after the parts loaded.
    async fn retrying<F, Fut>(&self, attempt: F) -> Result<TableReport, SyncError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<TableReport, SyncError>>,
    {
        let limit = self.attempts.max(1);
        let mut tries = 1;
        loop {
            match attempt().await {
                Err(e) if tries < limit && e.worth_retrying() => {
                    let again = match e {
                        SyncError::Source(SourceError::CorruptObject { .. }) => "downloading it again",
                        _ => "trying again",
                    };
                    tracing::warn!("{e}; {again} (attempt {} of {limit})", tries + 1);
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await;
                    tries += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// Snapshots a table into a staging area and publishes it with its bookkeeping row.
    /// `watch` shows its phases.
    pub async fn initdb(
        &self,
        namespace: &str,
        table: &str,
        replace: bool,
        watch: &Arc<TableProgress>,
    ) -> Result<TableReport, SyncError> {
        self.retrying(|| self.initdb_once(namespace, table, replace, watch)).await
    }

    /// Applies the changes since the stored watermark, with the new watermark.
    pub async fn syncdb(
        &self,
        namespace: &str,
        table: &str,
        watch: &Arc<TableProgress>,
    ) -> Result<TableReport, SyncError> {
        self.retrying(|| self.syncdb_once(namespace, table, watch)).await
    }

    async fn initdb_once(
        &self,
        namespace: &str,
        table: &str,
        replace: bool,
        watch: &Arc<TableProgress>,
    ) -> Result<TableReport, SyncError> {
        let stored = self.sink.bookkeeping(namespace, table).await?;
        match &stored {
            Some(_) if !replace => return Err(SyncError::AlreadyInitialised { table: format!("{namespace}.{table}") }),
            Some(_) => {}
            None => self.sink.check_unowned(namespace, table).await?,
        }
        let schema = self.source.schema(namespace, table).await?;
        let delta = match &stored {
            Some(b) => SchemaDelta::for_reload(&b.table_def()?, &schema.def),
            None => SchemaDelta::default(),
        };
        let extract = self.source.snapshot(&schema.def, watch).await?;
        let done = self.sink.stage(&schema.def, &extract.id).await?;
        if !done.is_empty() {
            tracing::info!(
                "{namespace}.{table}: resuming job {}: {} of {} objects were already loaded",
                extract.id,
                done.len(),
                extract.parts.len()
            );
        }
        let todo: Vec<String> = extract.parts.iter().filter(|p| !done.contains(p)).cloned().collect();
        let Reading { mut feed, task } = self.source.read(&schema.def, &extract, todo, watch.clone());
        let load = async {
            feed.ready().await?;
            self.sink.load(&schema.def, &extract.id, feed.watched_by(watch.clone())).await
        };
        consume(task, load).await?;
        watch.stage("publishing");
        let bookkeeping = Bookkeeping {
            namespace: namespace.into(),
            table: table.into(),
            watermark: extract.watermark,
            schema_version: schema.def.version,
            schema_description: schema.description,
        };
        self.sink.publish(&schema.def, &delta, &bookkeeping).await?;
        Ok(TableReport {
            action: Action::Initialised,
            job_id: extract.id,
            rows: self.sink.row_count(namespace, table).await?,
            changes: None,
            watermark: time::format_wire(extract.watermark),
            schema_version: schema.def.version,
        })
    }

    async fn syncdb_once(
        &self,
        namespace: &str,
        table: &str,
        watch: &Arc<TableProgress>,
    ) -> Result<TableReport, SyncError> {
        let stored = self
            .sink
            .bookkeeping(namespace, table)
            .await?
            .ok_or_else(|| SyncError::NotInitialised { table: format!("{namespace}.{table}") })?;
        let schema = self.source.schema(namespace, table).await?;
        let delta = SchemaDelta::between(&stored.table_def()?, &schema.def)?;
        // The mirror's check of the table runs while DAP prepares the job.
        let (extract, intact) = tokio::join!(
            self.source.changes(&schema.def, stored.watermark, watch),
            self.sink.check_intact(namespace, table)
        );
        intact?;
        let extract = match extract {
            Ok(extract) => extract,
            Err(SourceError::SnapshotRequired { reason }) if self.auto_reinit => {
                tracing::warn!("{namespace}.{table}: {reason}; taking a new snapshot (--auto-reinit)");
                return Box::pin(self.initdb_once(namespace, table, true, watch)).await;
            }
            Err(SourceError::SnapshotRequired { reason }) => {
                return Err(SyncError::SnapshotRequired { namespace: namespace.into(), table: table.into(), reason });
            }
            Err(e) => return Err(e.into()),
        };
        let bookkeeping = Bookkeeping {
            namespace: namespace.into(),
            table: table.into(),
            watermark: extract.watermark,
            schema_version: schema.def.version,
            schema_description: schema.description,
        };
        let Reading { mut feed, task } = self.source.read(&schema.def, &extract, extract.parts.clone(), watch.clone());
        let apply = async {
            feed.ready().await?;
            self.sink.apply_changes(&schema.def, &delta, feed.watched_by(watch.clone()), &bookkeeping).await
        };
        let changes = consume(task, apply).await?;
        Ok(TableReport {
            action: Action::Synced,
            job_id: extract.id,
            rows: self.sink.row_count(namespace, table).await?,
            changes: Some(changes),
            watermark: time::format_wire(extract.watermark),
            schema_version: schema.def.version,
        })
    }

    /// Drops a table and its bookkeeping row (no source access needed).
    pub async fn dropdb(sink: &dyn Sink, namespace: &str, table: &str) -> Result<(), SyncError> {
        if sink.drop_table(namespace, table).await? {
            Ok(())
        } else {
            Err(SyncError::NotInitialised { table: format!("{namespace}.{table}") })
        }
    }
}
