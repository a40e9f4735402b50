//! One table's replication, written once against a [`Source`] and a [`Sink`]: this file knows
//! neither HTTP nor SQL. The source reads its parts into a feed while the target applies it, so
//! downloading, decoding and writing overlap.
//!
//! Every table operation holds the target's lock for the table from the moment it reads the
//! table's state to its last write, so two processes never interleave on one table. The long
//! wait for DAP's job happens before the lock is taken: the state read before the wait is read
//! again under the lock, and if another writer changed it meanwhile, the work starts over from
//! the new state (a sync) or stops (an initdb of a table that got initialised).
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

use crate::error::{Classify, Retry};
use crate::progress::TableProgress;
use crate::schema::SchemaError;
use crate::schema::delta::{Refused, SchemaDelta};
use crate::sink::{Bookkeeping, Sink, SinkError};
use crate::source::{Reading, SnapshotCause, Source, SourceError};
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
    /// Another writer changed the table between the first look at it and the lock.
    #[error("{table} was written by another process meanwhile; its changes are asked for again from the new state")]
    Moved { table: String },
}

impl Classify for SyncError {
    fn retry(&self) -> Retry {
        match self {
            SyncError::Source(e) => e.retry(),
            SyncError::Sink(e) => e.retry(),
            SyncError::Moved { .. } => Retry::MayHelp,
            _ => Retry::Useless,
        }
    }

    fn is_fatal(&self) -> bool {
        matches!(self, SyncError::Source(e) if e.is_fatal())
    }

    fn skip_reason(&self) -> Option<String> {
        matches!(self, SyncError::AlreadyInitialised { .. }).then(|| {
            "already initialised: `dap syncdb` brings it up to date, `dap initdb --replace` takes a new snapshot"
                .to_string()
        })
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

/// The watermarks around a snapshot: the table's before (none when new) and the snapshot's.
struct Replaced {
    before: Option<time::Micros>,
    after: time::Micros,
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
    /// What `--keep-days` removed from the mirror after the run, and the old days it kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruned: Option<crate::mirror::retention::Pruned>,
    /// What `replicate --with-history` carried of the table's history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Carried>,
}

/// What `replicate --with-history` carried of a table's history to a target.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Carried {
    /// `whole` (the target's history table made afresh) or `of_keys` (the versions of the keys
    /// changed since its copy replaced theirs).
    pub scope: crate::sink::VersionScope,
    /// Versions sent.
    pub versions: u64,
}

impl TableReport {
    /// The report as a log line says it: `initialised, 2000 rows, watermark …`.
    pub fn describe(&self) -> String {
        let line = match (self.action, self.changes) {
            (Action::Synced, Some(changes)) => {
                format!("synced, {changes} changes, {} rows, watermark {}", self.rows, self.watermark)
            }
            (Action::Ahead, _) => format!("left alone (ahead of its source), {} rows", self.rows),
            _ => format!("initialised, {} rows, watermark {}", self.rows, self.watermark),
        };
        match self.history {
            Some(Carried { scope: crate::sink::VersionScope::Whole, versions }) => {
                format!("{line}; history copied whole, {versions} versions")
            }
            Some(Carried { versions, .. }) => format!("{line}; history: {versions} versions of changed keys"),
            None => line,
        }
    }
}

/// Whether initdb may replace a table that is initialised already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Only a table the target lacks; an initialised one is an error.
    Fresh,
    /// Load it again (`--replace`); the old rows stay queryable until the swap.
    Replace,
}

/// What a sync does when the source cannot give changes (snapshot required, out of range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reinit {
    /// Stop that table, with the command that fixes it.
    Stop,
    /// Take a new snapshot atomically (`--auto-reinit`).
    Automatically,
}

/// Replicates tables from a source into a target.
pub struct Replicator {
    pub source: Arc<dyn Source>,
    pub sink: Arc<dyn Sink>,
    pub reinit: Reinit,
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

/// Whether two reads of a table's bookkeeping describe the same state.
fn same_state(a: &Option<Bookkeeping>, b: &Option<Bookkeeping>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.watermark == b.watermark && a.schema_version == b.schema_version,
        _ => false,
    }
}

impl Replicator {
    /// Runs `attempt` again while it fails in a way a retry may clear (a corrupt object, a lost
    /// connection, another writer): the failed attempt rolled back, and initdb resumes after the
    /// parts loaded.
    async fn retrying<T, F, Fut>(&self, attempt: F) -> Result<T, SyncError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SyncError>>,
    {
        let limit = self.attempts.max(1);
        let mut tries = 1;
        loop {
            match attempt().await {
                Err(e) if tries < limit && e.retry() == Retry::MayHelp => {
                    let again = match e {
                        SyncError::Source(SourceError::Corrupt { .. }) => "downloading it again",
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

    /// `replicate --with-history`, after the table itself: brings the target's copy of the table's
    /// history (`<table>__history`, a plain table beside it) up to the mirror's, under the table's
    /// lock. The copy is made whole when the target has none (or one of other columns: the schema
    /// changed) or the mirror's history started over since its latest change; otherwise the
    /// versions of the keys changed in the mirror's commits since then replace theirs, and ended
    /// versions the mirror pruned go. `None` when the mirror keeps no history of the table. A
    /// failure a retry may clear is retried: a carry replaces versions, so it can run again.
    pub async fn carry_history(
        &self,
        mirror: &crate::mirror::reader::MirrorSource,
        namespace: &str,
        table: &str,
        watch: &Arc<TableProgress>,
    ) -> Result<Option<Carried>, SyncError> {
        self.retrying(|| self.carry_history_once(mirror, namespace, table, watch)).await
    }

    async fn carry_history_once(
        &self,
        mirror: &crate::mirror::reader::MirrorSource,
        namespace: &str,
        table: &str,
        watch: &Arc<TableProgress>,
    ) -> Result<Option<Carried>, SyncError> {
        let sink = self.sink.as_ref();
        let schema = mirror.schema(namespace, table).await?;
        let versions = crate::schema::versions::versions_def(&schema.def);
        let _lock = sink.lock(namespace, table, watch).await?;
        let names: Vec<&str> = versions.columns().map(|c| c.name.as_str()).collect();
        let held = sink.history_held(namespace, table).await?;
        let latest = held.filter(|h| h.columns == names).and_then(|h| h.latest);
        let Some(crate::mirror::reader::VersionReading { load, reading: Reading { mut feed, task } }) =
            mirror.history(&versions, latest, watch.clone())?
        else {
            return Ok(None);
        };
        watch.stage("carrying history");
        let apply = async {
            feed.ready().await?;
            sink.replace_history(&versions, load, feed.watched_by(watch.clone())).await
        };
        let sent = consume(task, apply).await?;
        Ok(Some(Carried { scope: load.scope, versions: sent }))
    }

    /// Snapshots a table into a staging area and publishes it with its bookkeeping row.
    /// `watch` shows its phases.
    pub async fn initdb(
        &self,
        namespace: &str,
        table: &str,
        init: Init,
        watch: &Arc<TableProgress>,
    ) -> Result<TableReport, SyncError> {
        let (report, Replaced { before, after }) =
            self.retrying(|| self.initdb_once(namespace, table, init, watch)).await?;
        // DAP may answer a snapshot query with a job it made earlier for the same query: a
        // replaced table must not move back in time, so it catches up with the changes since.
        match before {
            Some(before) if before > after => {
                tracing::warn!(
                    "{namespace}.{table}: DAP answered with a snapshot as of {}, older than the {} the table had; catching up with the changes since",
                    report.watermark,
                    time::format_wire(before)
                );
                let caught_up = self.syncdb(namespace, table, watch).await?;
                Ok(TableReport { action: Action::Initialised, job_id: report.job_id, ..caught_up })
            }
            _ => Ok(report),
        }
    }

    /// A snapshot of a table the target lacks; its changes instead when another writer
    /// initialised it meanwhile (`syncdb --init-missing` racing another process).
    pub async fn initdb_missing(
        &self,
        namespace: &str,
        table: &str,
        watch: &Arc<TableProgress>,
    ) -> Result<TableReport, SyncError> {
        match self.initdb(namespace, table, Init::Fresh, watch).await {
            Err(SyncError::AlreadyInitialised { .. }) => {
                tracing::info!(
                    "{namespace}.{table}: another writer initialised it meanwhile; applying its changes instead"
                );
                self.syncdb(namespace, table, watch).await
            }
            done => done,
        }
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

    /// Brings a table of the target up to its source: a snapshot when the target lacks it (or
    /// another writer initialised it meanwhile: then its changes), else the changes since its
    /// watermark, and nothing when the target is ahead of its source.
    pub async fn replicate(
        &self,
        namespace: &str,
        table: &str,
        watch: &Arc<TableProgress>,
    ) -> Result<TableReport, SyncError> {
        let stored = match self.sink.bookkeeping(namespace, table).await? {
            None => match self.initdb(namespace, table, Init::Fresh, watch).await {
                Err(SyncError::AlreadyInitialised { .. }) => self.sink.bookkeeping(namespace, table).await?,
                done => return done,
            },
            stored => stored,
        };
        match self.syncdb(namespace, table, watch).await {
            Err(SyncError::Source(e @ SourceError::TargetAhead { .. })) => {
                let stored =
                    stored.ok_or_else(|| SyncError::NotInitialised { table: format!("{namespace}.{table}") })?;
                tracing::warn!("{} {namespace}.{table}: {e}", self.sink.describe());
                Ok(TableReport {
                    action: Action::Ahead,
                    job_id: String::new(),
                    rows: self.sink.row_count(namespace, table).await?,
                    changes: Some(0),
                    watermark: time::format_wire(stored.watermark),
                    schema_version: stored.schema_version,
                    pruned: None,
                    history: None,
                })
            }
            other => other,
        }
    }

    async fn initdb_once(
        &self,
        namespace: &str,
        table: &str,
        init: Init,
        watch: &Arc<TableProgress>,
    ) -> Result<(TableReport, Replaced), SyncError> {
        let already = || SyncError::AlreadyInitialised { table: format!("{namespace}.{table}") };
        // A first look, so that no job is asked for a table that is not to be loaded.
        let peek = self.sink.bookkeeping(namespace, table).await?;
        if let (Some(_), Init::Fresh) = (&peek, init) {
            return Err(already());
        }
        let schema = self.source.schema(namespace, table).await?;
        let mut held = None;
        if peek.is_none()
            && let Err(refused) = self.sink.check_unowned(&schema.def).await
        {
            // Another writer may be publishing it this moment (its table there, its row not
            // yet): asked again under the table's lock, which that writer holds until it is done.
            held = Some(self.sink.lock(namespace, table, watch).await?);
            if self.sink.bookkeeping(namespace, table).await?.is_none() {
                self.sink.check_unowned(&schema.def).await.map_err(|_| refused)?;
            }
        }
        let extract = self.source.snapshot(&schema.def, watch).await?;
        let _lock = match held {
            Some(lock) => lock,
            None => self.sink.lock(namespace, table, watch).await?,
        };
        let stored = self.sink.bookkeeping(namespace, table).await?;
        match (&stored, init) {
            (Some(_), Init::Fresh) => return Err(already()),
            (None, _) if peek.is_some() => self.sink.check_unowned(&schema.def).await?,
            _ => {}
        }
        let delta = match &stored {
            Some(b) => SchemaDelta::for_reload(&b.table_def()?, &schema.def),
            None => SchemaDelta::default(),
        };
        let done = self.sink.stage(&schema.def, &extract.id).await?;
        if !done.is_empty() {
            // The job's id is an internal name (a DAP job's, or the mirror's epoch): debug only.
            tracing::debug!("{namespace}.{table}: resuming job {}", extract.id);
            tracing::info!(
                "{namespace}.{table}: resuming the interrupted load: {} of {} objects were already loaded",
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
        let report = TableReport {
            action: Action::Initialised,
            job_id: extract.id,
            rows: self.sink.row_count(namespace, table).await?,
            changes: None,
            watermark: time::format_wire(extract.watermark),
            schema_version: schema.def.version,
            pruned: None,
            history: None,
        };
        Ok((report, Replaced { before: stored.map(|b| b.watermark), after: extract.watermark }))
    }

    async fn syncdb_once(
        &self,
        namespace: &str,
        table: &str,
        watch: &Arc<TableProgress>,
    ) -> Result<TableReport, SyncError> {
        let not_initialised = || SyncError::NotInitialised { table: format!("{namespace}.{table}") };
        let stored = self.sink.bookkeeping(namespace, table).await?.ok_or_else(not_initialised)?;
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
            Err(SourceError::SnapshotRequired { reason, cause }) if schema.def.is_append_only() => {
                // A new snapshot of a log table loses nothing (it replaces only the rows it
                // holds), so it is taken without asking. When DAP has dropped logs this target
                // never fetched, the gap is recorded first (its end once known), so that a crash
                // cannot hide it; a source that started over (a mirror) lost nothing.
                tracing::warn!("{namespace}.{table}: {reason}; taking a new snapshot, keeping every older row");
                let lost = cause == SnapshotCause::OutOfWindow;
                if lost {
                    self.sink.record_gap(namespace, table, stored.watermark).await?;
                }
                let (report, _) = Box::pin(self.initdb_once(namespace, table, Init::Replace, watch)).await?;
                if lost && let Some(gap) = self.sink.record_gap(namespace, table, stored.watermark).await? {
                    let until = gap.before.map_or("the oldest row of the new snapshot".into(), time::format_wire);
                    tracing::warn!(
                        "{namespace}.{table}: no rows between {} and {until}: they had left the source's window (DAP keeps {} days) before this sync",
                        time::format_wire(gap.after),
                        crate::schema::APPEND_ONLY_WINDOW_DAYS
                    );
                }
                return Ok(report);
            }
            Err(SourceError::SnapshotRequired { reason, .. }) if self.reinit == Reinit::Automatically => {
                tracing::warn!("{namespace}.{table}: {reason}; taking a new snapshot (--auto-reinit)");
                return Box::pin(self.initdb_once(namespace, table, Init::Replace, watch))
                    .await
                    .map(|(report, _)| report);
            }
            Err(SourceError::SnapshotRequired { reason, .. }) => {
                return Err(SyncError::SnapshotRequired { namespace: namespace.into(), table: table.into(), reason });
            }
            Err(e) => return Err(e.into()),
        };
        let _lock = self.sink.lock(namespace, table, watch).await?;
        let now = self.sink.bookkeeping(namespace, table).await?;
        if !same_state(&Some(stored), &now) {
            return Err(SyncError::Moved { table: format!("{namespace}.{table}") });
        }
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
            pruned: None,
            history: None,
        })
    }

    /// Drops a table and its bookkeeping row (no source access needed), under its lock.
    pub async fn dropdb(sink: &dyn Sink, namespace: &str, table: &str, watch: &TableProgress) -> Result<(), SyncError> {
        let _lock = sink.lock(namespace, table, watch).await?;
        if sink.drop_table(namespace, table).await? {
            Ok(())
        } else {
            Err(SyncError::NotInitialised { table: format!("{namespace}.{table}") })
        }
    }
}
