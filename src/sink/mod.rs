//! Replication targets: one interface of a few verbs ([`Sink`]); each backend is registered by URL
//! scheme in `crate::target`, which opens them. The orchestration (`sync.rs`, `run.rs`) drives
//! every target through [`Sink`] and never knows which database it talks to.
//!
//! Every backend is a [`protocol::Dialect`]: the load protocol (the per-table lock, staging,
//! per-part checkpoints, resuming, the check of what is published, bookkeeping rules) is written
//! once in `protocol.rs`; a dialect answers a few narrow questions in its own file. The contract
//! every target keeps, however it keeps it (a transaction, or an ordered sequence of steps where
//! the database has no transactional DDL):
//! - one writer per (target, table): a second waits for the first, up to the lock timeout;
//! - a watermark is never durable before the rows it covers;
//! - a table is never visible half-initialised: initdb loads a staging area and publishes it whole;
//! - a feed that stops before its `Done` (the source failed) leaves nothing of its unfinished
//!   part behind.

pub mod layout;
pub mod mssql;
pub mod mysql;
pub mod postgres;
pub mod protocol;
mod url;

use std::time::Duration;

use crate::error::{BoxError, Classify, Retry};
use crate::feed::Feed;
use crate::privacy::SharedFiles;
use crate::progress::TableProgress;
use crate::schema::TableDef;
use crate::schema::delta::SchemaDelta;
use crate::time::Micros;
use crate::value::Value;

pub use url::{
    ConnectionString, SCHEMES, Scheme, SchemeFacts, Secret, SslMode, UrlError, has_password, redact, scheme_names,
};

/// The bookkeeping row of one replicated table (the official client's `table_sync`).
#[derive(Debug, Clone, PartialEq)]
pub struct Bookkeeping {
    pub namespace: String,
    pub table: String,
    /// The snapshot's `at` after initdb, the incremental's `until` after syncdb.
    pub watermark: Micros,
    pub schema_version: u32,
    /// The table's schema as compact JSON, without `meta`.
    pub schema_description: String,
}

impl Bookkeeping {
    /// The table definition this row was replicated with.
    pub fn table_def(&self) -> Result<TableDef, crate::schema::SchemaError> {
        TableDef::from_description(&self.namespace, &self.table, self.schema_version, &self.schema_description)
    }
}

/// Why a target refused to do what was asked; the message says what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Bad input that no retry mends: a malformed location, a value the target cannot store.
    Input,
    /// The target's files or tables are damaged.
    Damaged,
    /// A table dap does not own is in the way (another client's, another namespace's).
    NotOurs,
    /// The database was made by another version, or is not a database of this kind.
    Incompatible,
    /// The user may not do this here (rights, TLS, a file that cannot be read).
    NotAllowed,
    /// The schema changed in a way that needs a new snapshot.
    Schema,
    /// Another process writes the table and did not finish within the lock timeout.
    Locked,
    /// What the target holds is not what the run expected (another writer changed it): doing
    /// the same work again from the new state may succeed.
    Moved,
    /// Nothing to work on (no mirror, no table).
    Missing,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A database error while doing `action`; the unfinished work was rolled back.
    #[error("{target}: {action}: {detail}")]
    Database {
        target: String,
        action: String,
        /// The database's own message, without the driver's wrapping.
        detail: String,
        retry: Retry,
        #[source]
        source: Option<BoxError>,
    },
    /// The target is in a state the command cannot work on; `detail` says what to do.
    #[error("{}", named_once(target, detail))]
    Refused {
        target: String,
        kind: Refusal,
        detail: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The source stopped before the end of the feed (its own error says why); nothing of the
    /// unfinished part was kept.
    #[error("the source stopped before the end of its rows; nothing of the unfinished part was kept")]
    FeedAborted,
    /// The source sent rows outside a part: a bug of the source, not of the data.
    #[error("the source sent rows outside a part (rows or an end before the part's beginning)")]
    BrokenFeed,
}

/// `detail` after the target it is about, unless it already names it: a line names its target once.
fn named_once(target: &str, detail: &str) -> String {
    if target.is_empty() || detail.contains(target) { detail.to_string() } else { format!("{target}: {detail}") }
}

impl From<crate::feed::FeedError> for SinkError {
    fn from(e: crate::feed::FeedError) -> Self {
        match e {
            crate::feed::FeedError::Aborted => SinkError::FeedAborted,
            crate::feed::FeedError::Broken => SinkError::BrokenFeed,
        }
    }
}

impl Classify for SinkError {
    fn retry(&self) -> Retry {
        match self {
            SinkError::Database { retry, .. } => *retry,
            SinkError::Refused { kind: Refusal::Moved, .. } => Retry::MayHelp,
            _ => Retry::Useless,
        }
    }
}

impl SinkError {
    pub fn refused(target: &str, kind: Refusal, detail: impl Into<String>) -> SinkError {
        SinkError::Refused { target: target.to_string(), kind, detail: detail.into(), source: None }
    }

    /// The kind of a refusal, if it is one.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            SinkError::Refused { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// A NaN or ±infinity that `database` (MySQL, SQL Server) has no value for, refused before
    /// anything of the table is published; under `--non-finite null` (`policy`), one in a
    /// required column, where NULL cannot stand in for it either.
    pub fn non_finite(
        target: &str,
        database: &str,
        def: &TableDef,
        key: &Value,
        column: &str,
        value: f64,
        policy: NonFinite,
    ) -> SinkError {
        let way_out = match policy {
            NonFinite::Refuse => "Run with --non-finite null to store NULL for such values instead".to_string(),
            NonFinite::Null => format!(
                "--non-finite null cannot store NULL there either: {column} is required (NOT NULL) in DAP's schema. \
                 Keep this table in the mirror or on PostgreSQL, which store NaN and infinity"
            ),
        };
        SinkError::refused(
            target,
            Refusal::Input,
            format!(
                "{}.{}: key {} column {column} holds {}, which {database} cannot store; nothing was published and nothing of it kept. {way_out}",
                def.namespace,
                def.name,
                key.to_text().unwrap_or_default(),
                crate::value::format_float(value)
            ),
        )
    }

    /// An optional column became required while `nulls` rows (when counted) hold NULL there.
    pub fn required_over_nulls(target: &str, def: &TableDef, column: &str, nulls: Option<u64>) -> SinkError {
        let rows = nulls.map_or("rows".to_string(), |n| format!("{n} rows"));
        SinkError::refused(
            target,
            Refusal::Schema,
            format!(
                "{}.{}: column {column} became required, but {rows} hold NULL there; nothing was changed. \
                 Re-snapshot the table with `{}`",
                def.namespace,
                def.name,
                crate::term::command(&["initdb", "--replace", "--namespace", &def.namespace, "--table", &def.name])
            ),
        )
    }
}

/// What NaN and ±infinity become on a target that has no such values (MySQL, SQL Server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NonFinite {
    /// Refuse the table before anything is written, naming the row and column.
    #[default]
    Refuse,
    /// Store NULL instead.
    Null,
}

/// How a command uses its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `status`, `listdb`: nothing is created or changed; a target that does not exist is an error.
    Read,
    /// `initdb`, `syncdb`, `dropdb`: the bookkeeping tables are created when missing.
    Write,
}

/// How long a writer waits for another to finish with a table (or a mirror file) by default.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// What opening a target needs besides its connection string.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub access: Access,
    /// Tables that may load at once (a connection each on a server).
    pub parallelism: usize,
    pub non_finite: NonFinite,
    /// What to do when others can read a local mirror.
    pub shared: SharedFiles,
    /// How long to wait for another writer of a table (or of a mirror file); also the limit of
    /// any single wait for a database lock.
    pub lock_timeout: Duration,
    /// Which tables keep history (the mirror only; servers ignore it).
    pub history: crate::history_choice::Choice,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            access: Access::Write,
            parallelism: 4,
            non_finite: NonFinite::Refuse,
            shared: SharedFiles::Warn,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            history: Default::default(),
        }
    }
}

/// The right to write one table of a target, held until dropped (a database session holding an
/// advisory lock, or nothing where the file lock already covers it).
pub struct TableLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl TableLock {
    pub fn new(held: impl Send + Sync + 'static) -> TableLock {
        TableLock(Box::new(held))
    }
}

/// A period of an append-only table no sync could fetch: DAP had dropped it from its window
/// before a sync came (the mirror was not synced within 30 days).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    /// The last sync's watermark: every log up to it is kept.
    pub after: Micros,
    /// The oldest log the new snapshot brought (`None` when it brought none).
    pub before: Option<Micros>,
}

/// How a table's run on a target ended, for the targets that keep a record of runs.
/// What a target holds of a table's history (`replicate --with-history`): a plain table beside
/// the replicated one (`"canvas"."users__history"`, MySQL `canvas__users__history`).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryHeld {
    /// Its columns, in order.
    pub columns: Vec<String>,
    /// The latest start or end of a version in it; `None` when it is empty.
    pub latest: Option<Micros>,
}

/// Which versions of the target's history a load of versions replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionScope {
    /// All: the history table is made afresh with the versions loaded.
    Whole,
    /// Those of the keys loaded: each key's versions are replaced by the ones loaded.
    OfKeys,
}

/// The ended versions the source no longer has (it pruned them), removed after a load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedGone {
    /// Versions that ended before this time (whole seconds: a target may keep no fractions).
    Before(Micros),
    /// Every ended version: the source has none.
    All,
}

/// How a load of versions changes the target's history of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionLoad {
    pub scope: VersionScope,
    pub gone: EndedGone,
}

#[derive(Debug, Clone)]
pub struct RunRecord {
    pub command: String,
    pub job: Option<String>,
    /// Rows the table holds after the run, when it succeeded.
    pub rows: Option<u64>,
    pub result: Result<(), String>,
}

/// A database that holds replicated tables. Every method may be called for several tables at
/// once; each backend decides how much of that it runs in parallel.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// The target as messages name it (never with a password).
    fn describe(&self) -> String;

    /// The bookkeeping row of a table, if it is initialised.
    async fn bookkeeping(&self, namespace: &str, table: &str) -> Result<Option<Bookkeeping>, SinkError>;
    /// Every bookkeeping row of a namespace, by table name.
    async fn all_bookkeeping(&self, namespace: &str) -> Result<Vec<Bookkeeping>, SinkError>;
    /// The tables of `namespace` whose initdb was interrupted after loading objects and never
    /// published: per table, the objects loaded (what a rerun resumes).
    async fn unfinished_loads(&self, namespace: &str) -> Result<Vec<(String, u64)>, SinkError>;
    /// Rows in a replicated table.
    async fn row_count(&self, namespace: &str, table: &str) -> Result<u64, SinkError>;
    /// syncdb, first: refuses a table whose storage the target finds damaged, so that nothing is
    /// written to it. Runs while DAP prepares the job.
    async fn check_intact(&self, namespace: &str, table: &str) -> Result<(), SinkError>;
    /// Refuses a table initdb must not touch: one that exists without a bookkeeping row (left
    /// half-loaded by another client), or whose name another namespace already owns here. An
    /// empty table of exactly the official columns (provisioned by `dap ddl`) is taken over.
    async fn check_unowned(&self, def: &TableDef) -> Result<(), SinkError>;

    /// The right to write a table, waiting for another writer (`watch` shows whom) up to the
    /// lock timeout. Held from the first read of the table's state to its last write.
    async fn lock(&self, namespace: &str, table: &str, watch: &TableProgress) -> Result<TableLock, SinkError>;

    /// initdb, step 1: a staging area for `def` loading `job` (the live table is untouched).
    /// Returns the parts an interrupted run of the same job already loaded, so that they are
    /// skipped; for any other job staging starts empty.
    async fn stage(&self, def: &TableDef, job: &str) -> Result<Vec<String>, SinkError>;
    /// initdb, step 2: loads snapshot parts into staging. At each part's end its rows and its
    /// checkpoint become durable together; a repeated key replaces the earlier row.
    async fn load(&self, def: &TableDef, job: &str, feed: Feed) -> Result<u64, SinkError>;
    /// initdb, step 3: the staged rows become the table, with its bookkeeping row, at once,
    /// after checking that staging holds the rows loaded. When the table exists (a re-snapshot),
    /// `delta` leads from its schema to `def`'s.
    async fn publish(&self, def: &TableDef, delta: &SchemaDelta, bookkeeping: &Bookkeeping) -> Result<(), SinkError>;

    /// syncdb: applies `delta` to the table, then the feed's upserts (`U`, whole rows) and
    /// deletes (`D`), then `bookkeeping`; the watermark never becomes durable before the rows.
    /// Returns the records applied.
    async fn apply_changes(
        &self,
        def: &TableDef,
        delta: &SchemaDelta,
        feed: Feed,
        bookkeeping: &Bookkeeping,
    ) -> Result<u64, SinkError>;

    /// Drops a table and its bookkeeping row; false when it was not initialised.
    async fn drop_table(&self, namespace: &str, table: &str) -> Result<bool, SinkError>;

    /// Gives the space of dropped tables back to the file system (a database file keeps its
    /// pages until it is compacted; servers do it themselves).
    async fn reclaim_space(&self) -> Result<(), SinkError>;

    /// Records how a table's run ended, for targets that keep such a record (the mirror's
    /// `state.json`); called once per table by whoever runs it.
    async fn record_run(&self, namespace: &str, table: &str, run: &RunRecord);

    /// Records that a run of the whole command is going, for targets that keep a record of runs
    /// (a mirror file's `dap_runs`), and returns its id there; called once the run has changed
    /// the target (its first table committed), so that a target refused at the start is left as
    /// it was. `None` from targets that keep no such record, or when it could not be written.
    async fn record_start(&self, _start: &crate::mirror::runs::Start) -> Option<i64> {
        None
    }

    /// `replicate --with-history`: what the target holds of `table`'s history; `None` when it
    /// has no history table of it.
    async fn history_held(&self, namespace: &str, table: &str) -> Result<Option<HistoryHeld>, SinkError>;
    /// `replicate --with-history`: loads versions (`versions`, from
    /// [`crate::schema::versions::versions_def`]) into the table's history as `load` says, then
    /// removes the ended versions gone from the source, all at once (a crash leaves the history
    /// as it was, or one a rerun makes whole). Returns the versions loaded. Called under the
    /// table's lock.
    async fn replace_history(&self, versions: &TableDef, load: VersionLoad, feed: Feed) -> Result<u64, SinkError>;

    /// Records that an append-only table has no rows between `after` (the watermark of the last
    /// sync) and the oldest row a new snapshot brought, and returns the gap; `None` from targets
    /// that keep no such record.
    async fn record_gap(&self, namespace: &str, table: &str, after: Micros) -> Result<Option<Gap>, SinkError>;
}
