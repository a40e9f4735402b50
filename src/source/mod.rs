//! Sources of replicated tables. A source yields, per table, a schema and either a snapshot or
//! the changes since a watermark (or says a new snapshot is needed), and reads their parts into a
//! [`Feed`] of typed records. DAP is one source ([`dap`]); the local mirror, for outward
//! replication, is the other (`mirror::reader`).

pub mod dap;

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::api::ApiError;
use crate::error::{BoxError, Classify, Retry};
use crate::feed::Feed;
use crate::fetch::FetchError;
use crate::progress::TableProgress;
use crate::schema::{SchemaError, TableDef};
use crate::time::Micros;

/// A table's schema as the source serves it.
#[derive(Debug, Clone)]
pub struct Schema {
    pub def: TableDef,
    /// The schema as the bookkeeping table stores it: compact JSON without `meta`.
    pub description: String,
}

/// A snapshot or a set of changes, ready to read.
#[derive(Debug, Clone)]
pub struct Extract {
    /// The job (or mirror epoch) that produced it: an interrupted initdb of the same extract
    /// resumes after the parts it loaded.
    pub id: String,
    /// The snapshot's `at`, or the changes' `until`: the watermark once the extract is applied.
    pub watermark: Micros,
    pub parts: Vec<String>,
    /// Changes committed at or before this time were applied by the previous sync: a source
    /// that is given more (DAP: the commit at `since` again, and the `since` jitter) leaves them
    /// out of the feed.
    pub applied_through: Option<Micros>,
}

/// Why a source needs a new snapshot: for a log table, whether rows were lost to the source's
/// window (a gap to record) or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotCause {
    /// The watermark is older than the source keeps (DAP's `OutOfRangeError`): changes between
    /// it and the window's start are gone.
    OutOfWindow,
    /// Anything else (DAP's `SnapshotRequiredError`, a mirror that started its table over).
    Other,
}

/// Why a source could not give what was asked, in terms any source has (DAP, the mirror):
/// the underlying error is kept as the source of the error.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The target holds changes the source has not got yet (synced straight from DAP after it
    /// was replicated from the mirror): it is left alone until the source catches up.
    #[error(
        "the target is ahead of the mirror (it holds {}, the mirror {}): left alone until the mirror's next syncdb catches up",
        crate::time::format_wire(*target),
        crate::time::format_wire(*mirror)
    )]
    TargetAhead { mirror: Micros, target: Micros },
    /// The source cannot give changes since the watermark (DAP: snapshot required, out of range).
    #[error("the source needs a new snapshot ({reason})")]
    SnapshotRequired { reason: String, cause: SnapshotCause },
    /// A part arrived corrupt or incomplete: reading it again may help.
    #[error("{table}: object {part} is corrupt or incomplete ({detail}); the table keeps its previous state")]
    Corrupt { table: String, part: String, detail: String },
    /// A part holds what its schema does not allow: reading it again does not help.
    #[error("{table}: object {part}: {source}; the table keeps its previous state")]
    Undecodable {
        table: String,
        part: String,
        #[source]
        source: BoxError,
    },
    /// The source failed to answer (a request, a file); `retry` and `fatal` classify the cause.
    #[error("{}{source}", if context.is_empty() { String::new() } else { format!("{context}: ") })]
    Failed {
        context: String,
        retry: Retry,
        /// No other table can succeed after this (authentication, account).
        fatal: bool,
        #[source]
        source: BoxError,
    },
}

impl SourceError {
    /// A failure of the source that a retry does not mend and that concerns this table only.
    pub fn failed(context: impl Into<String>, source: impl Into<BoxError>) -> SourceError {
        SourceError::Failed { context: context.into(), retry: Retry::Useless, fatal: false, source: source.into() }
    }
}

impl Classify for SourceError {
    fn retry(&self) -> Retry {
        match self {
            SourceError::Corrupt { .. } => Retry::MayHelp,
            SourceError::Failed { retry, .. } => *retry,
            _ => Retry::Useless,
        }
    }

    fn is_fatal(&self) -> bool {
        matches!(self, SourceError::Failed { fatal: true, .. })
    }
}

impl From<ApiError> for SourceError {
    fn from(e: ApiError) -> SourceError {
        SourceError::Failed { context: String::new(), retry: e.retry(), fatal: e.is_fatal(), source: Box::new(e) }
    }
}

impl From<FetchError> for SourceError {
    fn from(e: FetchError) -> SourceError {
        match e {
            FetchError::Api(api) => api.into(),
            other => SourceError::failed("", other),
        }
    }
}

impl From<SchemaError> for SourceError {
    fn from(e: SchemaError) -> SourceError {
        SourceError::failed("", e)
    }
}

/// A feed being read, and the task reading it: its result names the source's failure when the
/// feed stops early.
pub struct Reading {
    pub feed: Feed,
    pub task: JoinHandle<Result<u64, SourceError>>,
}

/// Where replicated tables come from.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// The tables of a namespace.
    async fn tables(&self, namespace: &str) -> Result<Vec<String>, SourceError>;
    /// A table's current schema.
    async fn schema(&self, namespace: &str, table: &str) -> Result<Schema, SourceError>;
    /// A snapshot of the table; `watch` is told what the wait for it is (job queued, running).
    async fn snapshot(&self, def: &TableDef, watch: &TableProgress) -> Result<Extract, SourceError>;
    /// The changes since `watermark`, or [`SourceError::SnapshotRequired`].
    async fn changes(&self, def: &TableDef, watermark: Micros, watch: &TableProgress) -> Result<Extract, SourceError>;
    /// Reads `parts` of `extract` in order into a feed: `Begin`, rows, `End` per part, then `Done`.
    /// `watch` is told of the transfer (objects, bytes); the orchestrator counts the rows.
    fn read(&self, def: &TableDef, extract: &Extract, parts: Vec<String>, watch: Arc<TableProgress>) -> Reading;
}
