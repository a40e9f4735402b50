//! Replication targets: one interface of a few verbs, one file per database, chosen by the
//! connection string's scheme ([`open`]). The orchestration (`sync.rs`) drives every target through
//! [`Sink`] and never knows which database it talks to; what differs between dialects (DDL, types,
//! bulk paths) lives in the adapter.
//!
//! The contract every target keeps, however it keeps it (a transaction, or an ordered sequence of
//! steps where the database has no transactional DDL):
//! - a watermark is never durable before the rows it covers;
//! - a table is never visible half-initialised: initdb loads a staging area and publishes it whole;
//! - a feed that stops before its [`Piece::Done`] (the source failed) leaves nothing of its
//!   unfinished part behind.

pub mod layout;
pub mod mssql;
pub mod mysql;
pub mod postgres;
pub mod sqlite;
mod url;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::decode::Record;
use crate::privacy::SharedFiles;
use crate::progress::TableProgress;
use crate::schema::TableDef;
use crate::schema::delta::SchemaDelta;
use crate::time::Micros;
use crate::value::Value;

pub use url::{ConnectionString, Scheme, Secret, SslMode, UrlError, has_password, redact};

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

/// Whether trying again can help after a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A lost connection, a serialization failure, a deadlock: the same work may succeed.
    MayHelp,
    /// A constraint, a permission, bad data: the same work fails the same way.
    Useless,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    #[error("{target}: {detail}")]
    Refused { target: String, detail: String },
    /// The source stopped before the end of the feed (its own error says why); nothing of the
    /// unfinished part was kept.
    #[error("the source stopped before the end of its rows; nothing of the unfinished part was kept")]
    FeedAborted,
}

impl SinkError {
    pub fn retry(&self) -> Retry {
        match self {
            SinkError::Database { retry, .. } => *retry,
            _ => Retry::Useless,
        }
    }

    /// A replicated table's name is taken by a table without a bookkeeping row: another client
    /// (likely the official one) stopped while loading it. `table` and `bookkeeping` are named
    /// as the target's layout names them.
    pub fn unowned_table(target: &str, table: &str, bookkeeping: &str, drop: &str) -> SinkError {
        SinkError::refused(
            target,
            format!(
                "{table} exists but {bookkeeping} has no row for it: another client (likely the official one) stopped while loading it. \
                 Drop it with `DROP TABLE {drop}` (its rows are incomplete), then run initdb again"
            ),
        )
    }

    pub fn refused(target: &str, detail: impl Into<String>) -> SinkError {
        SinkError::Refused { target: target.to_string(), detail: detail.into() }
    }

    /// A NaN or ±infinity that `database` (MySQL, SQL Server) has no value for, refused before
    /// anything of the table is published.
    pub fn non_finite(
        target: &str,
        database: &str,
        def: &TableDef,
        key: &Value,
        column: &str,
        value: f64,
    ) -> SinkError {
        SinkError::refused(
            target,
            format!(
                "{}.{}: key {} column {column} holds {}, which {database} cannot store; nothing was published. \
                 Run with --non-finite null to store NULL for such values instead",
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

/// One item of a feed of records from a source.
#[derive(Debug)]
pub enum Piece {
    /// A part (a downloaded object) begins.
    Begin(String),
    Rows(Vec<Record>),
    /// The part is complete: for initdb, its rows and its checkpoint commit now.
    End(String),
    /// The feed is complete.
    Done,
}

/// The receiving end of a feed. A feed that closes before [`Piece::Done`] was aborted by its
/// source: the target must keep nothing of the unfinished part.
pub struct Feed {
    rx: tokio::sync::mpsc::Receiver<Piece>,
    /// The first piece, once [`Feed::ready`] has waited for it.
    first: Option<Piece>,
    /// Told of the rows the target takes, for the progress line.
    watch: Option<Arc<TableProgress>>,
}

/// The sending end of a feed.
pub type FeedSender = tokio::sync::mpsc::Sender<Piece>;

impl Feed {
    /// A feed holding at most `depth` pieces in flight (a few batches: memory stays bounded).
    pub fn channel(depth: usize) -> (FeedSender, Feed) {
        let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
        (tx, Feed { rx, first: None, watch: None })
    }

    /// The same feed, counting the rows the target takes into `watch`.
    pub fn watched_by(self, watch: Arc<TableProgress>) -> Feed {
        Feed { watch: Some(watch), ..self }
    }

    /// Hands a piece on, counting its rows.
    fn counted(&self, piece: Piece) -> Piece {
        if let (Some(watch), Piece::Rows(rows)) = (&self.watch, &piece) {
            watch.rows(rows.len() as u64);
        }
        piece
    }

    /// Waits until the source has produced its first piece (kept for [`Feed::next`]). The
    /// orchestrator hands a feed to a target only then, so that a table still waiting for its
    /// download slot never holds a database connection that a downloading table needs.
    pub async fn ready(&mut self) -> Result<(), SinkError> {
        if self.first.is_none() {
            self.first = Some(self.rx.recv().await.ok_or(SinkError::FeedAborted)?);
        }
        Ok(())
    }

    /// The next piece, or [`SinkError::FeedAborted`] when the source stopped early.
    pub async fn next(&mut self) -> Result<Piece, SinkError> {
        let piece = match self.first.take() {
            Some(p) => p,
            None => self.rx.recv().await.ok_or(SinkError::FeedAborted)?,
        };
        Ok(self.counted(piece))
    }

    /// [`Feed::next`] for a target that works on a blocking thread.
    pub fn blocking_next(&mut self) -> Result<Piece, SinkError> {
        let piece = match self.first.take() {
            Some(p) => p,
            None => self.rx.blocking_recv().ok_or(SinkError::FeedAborted)?,
        };
        Ok(self.counted(piece))
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

/// What opening a target needs besides its connection string.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub access: Access,
    /// Tables that may load at once (a connection each on a server).
    pub parallelism: usize,
    pub non_finite: NonFinite,
    /// What to do when others can read a local mirror.
    pub shared: SharedFiles,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions { access: Access::Write, parallelism: 4, non_finite: NonFinite::Refuse, shared: SharedFiles::Warn }
    }
}

/// A database that holds replicated tables. Every method may be called for several tables at
/// once; each adapter decides how much of that it runs in parallel.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// The target as messages name it (never with a password).
    fn describe(&self) -> String;
    /// The file of a local target (its `state.json` lives beside it); `None` for servers.
    fn local_file(&self) -> Option<&Path> {
        None
    }

    /// The bookkeeping row of a table, if it is initialised.
    async fn bookkeeping(&self, namespace: &str, table: &str) -> Result<Option<Bookkeeping>, SinkError>;
    /// Every bookkeeping row of a namespace, by table name.
    async fn all_bookkeeping(&self, namespace: &str) -> Result<Vec<Bookkeeping>, SinkError>;
    /// Rows in a replicated table.
    async fn row_count(&self, namespace: &str, table: &str) -> Result<u64, SinkError>;
    /// syncdb, first: refuses a table whose storage the target finds damaged, so that nothing is
    /// written to it. Runs while DAP prepares the job. A server guards its own storage, so only a
    /// file checks.
    async fn check_intact(&self, _namespace: &str, _table: &str) -> Result<(), SinkError> {
        Ok(())
    }
    /// Refuses a table initdb must not touch: one that exists without a bookkeeping row (left
    /// half-loaded by another client), or whose name another namespace already owns here.
    async fn check_unowned(&self, namespace: &str, table: &str) -> Result<(), SinkError>;

    /// initdb, step 1: a staging area for `def` loading `job` (the live table is untouched).
    /// Returns the parts an interrupted run of the same job already loaded, so that they are
    /// skipped; for any other job staging starts empty.
    async fn stage(&self, def: &TableDef, job: &str) -> Result<Vec<String>, SinkError>;
    /// initdb, step 2: loads snapshot parts into staging. At each [`Piece::End`] the part's rows
    /// and its checkpoint become durable together; a repeated key replaces the earlier row.
    async fn load(&self, def: &TableDef, job: &str, feed: Feed) -> Result<u64, SinkError>;
    /// initdb, step 3: the staged rows become the table, with its bookkeeping row, at once. When
    /// the table exists (a re-snapshot), `delta` leads from its schema to `def`'s; a target that
    /// keeps the table object (for its views) applies it before replacing the rows.
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

    /// Gives the space of dropped tables back to the file system. Servers do so when a table is
    /// dropped; a database file keeps its pages until it is compacted.
    async fn reclaim_space(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The default mirror folder: `DAP_MIRROR_DIR`, else the platform data folder.
pub fn default_mirror_dir() -> Result<PathBuf, SinkError> {
    if let Some(d) = std::env::var_os("DAP_MIRROR_DIR") {
        return Ok(PathBuf::from(d));
    }
    directories::ProjectDirs::from("", "", "dap-replica").map(|p| p.data_dir().to_path_buf()).ok_or_else(|| {
        SinkError::refused(
            "the default mirror",
            "there is no home folder to keep it in; pass --connection-string sqlite:///PATH.db",
        )
    })
}

/// Where a target is: a connection string, or the default mirror (one file per namespace).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetSpec {
    DefaultMirror,
    Url(ConnectionString),
}

impl TargetSpec {
    /// `None` or an empty string is the default mirror.
    pub fn parse(text: Option<&str>) -> Result<TargetSpec, UrlError> {
        match text.map(str::trim).filter(|s| !s.is_empty()) {
            None => Ok(TargetSpec::DefaultMirror),
            Some(s) => ConnectionString::parse(s)?.with_password_from_files().map(TargetSpec::Url),
        }
    }

    /// The SQLite file of a local target for a namespace; `None` for servers.
    pub fn local_file(&self, namespace: &str) -> Result<Option<PathBuf>, SinkError> {
        Ok(match self {
            TargetSpec::DefaultMirror => {
                Some(default_mirror_dir()?.join(format!("{}.db", crate::fetch::safe_component(namespace))))
            }
            TargetSpec::Url(c) if c.scheme == Scheme::Sqlite => Some(PathBuf::from(&c.database)),
            TargetSpec::Url(_) => None,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            TargetSpec::DefaultMirror => "the default mirror".into(),
            TargetSpec::Url(c) => c.redacted(),
        }
    }
}

/// The SQL dialects `dap ddl` writes, one per adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dialect {
    Postgresql,
    Mysql,
    Mssql,
    Sqlite,
}

/// The DDL `initdb` runs for `defs` on an empty database of `dialect`: bookkeeping tables first,
/// then each table (its schema, enum types, table, comments), generated by the adapter's own code.
pub fn ddl(dialect: Dialect, defs: &[TableDef]) -> Vec<String> {
    type TableDdl = fn(&TableDef) -> Vec<String>;
    let (mut out, table): (Vec<String>, TableDdl) = match dialect {
        Dialect::Postgresql => (postgres::bookkeeping_statements(), postgres::table_statements),
        Dialect::Mysql => (mysql::bookkeeping_statements(), mysql::table_statements),
        Dialect::Mssql => (mssql::bookkeeping_statements(), mssql::table_statements),
        Dialect::Sqlite => (sqlite::bookkeeping_statements(), sqlite::table_statements),
    };
    for def in defs {
        out.extend(table(def));
    }
    out
}

/// Opens the target of `spec` for `namespace`: the registry of adapters, keyed by scheme.
pub async fn open(spec: &TargetSpec, namespace: &str, options: &SinkOptions) -> Result<Arc<dyn Sink>, SinkError> {
    // Two TLS providers are linked (ring, and aws-lc through tiberius' tokio-rustls): drivers that
    // take the process default need one chosen.
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    if let Some(file) = spec.local_file(namespace)? {
        crate::privacy::check_mirror(&file, options.shared);
        return Ok(Arc::new(sqlite::SqliteSink::open(&file, options.access)?));
    }
    let TargetSpec::Url(url) = spec else { unreachable!("the default mirror is a local file") };
    match url.scheme {
        Scheme::Sqlite => unreachable!("sqlite:// is a local file"),
        Scheme::Postgres => Ok(Arc::new(postgres::PostgresSink::open(url, options).await?)),
        Scheme::Mysql => Ok(Arc::new(mysql::MysqlSink::open(url, options).await?)),
        Scheme::Mssql => Ok(Arc::new(mssql::MssqlSink::open(url, options).await?)),
    }
}
