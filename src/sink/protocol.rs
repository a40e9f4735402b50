//! The load protocol, written once for every backend: [`Protocol`] is the [`Sink`] of any
//! [`Dialect`]. It keeps the rules that must not differ between databases:
//!
//! - **one writer per (target, table)**: a dialect's session lock (PostgreSQL advisory lock,
//!   MySQL `GET_LOCK`, SQL Server `sp_getapplock`, the mirror file's lock), taken by the
//!   orchestrator before it reads a table's state and held to its last write; a second writer
//!   waits, saying who holds it, up to the lock timeout, then gives up with a clear message;
//! - **stage, load, resume, publish**: staging is made afresh unless an interrupted run of the
//!   same job left it with checkpoints, whose parts are then skipped; each part is loaded in a
//!   transaction with its checkpoint; before publishing, staging must hold the rows this run
//!   loaded (another writer's work in the same staging is refused, never published);
//! - **bookkeeping**: the first row of a table counts (as for the official client), and a
//!   watermark that cannot be read is refused with the way out, never taken as 1970;
//! - **connections**: one goes back to the pool only after work that ended cleanly; after a
//!   failure it is rolled back and dropped.
//!
//! A dialect answers narrow questions in its own SQL: its connections and transactions, its
//! bookkeeping rows, creating staging, writing one part's rows, recording a checkpoint, the swap
//! of a publish and the merge of a sync.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{
    Bookkeeping, ConnectionString, EndedGone, Gap, HistoryHeld, Refusal, RunRecord, Sink, SinkError, SinkOptions,
    TableLock, VersionLoad, VersionScope,
};
use crate::feed::{Feed, Pump, Span, next_part};
use crate::progress::TableProgress;
use crate::schema::delta::SchemaDelta;
use crate::schema::versions::{VALID_FROM, VALID_TO, history_name};
use crate::schema::{Column, TableDef};
use crate::time::Micros;

/// A bookkeeping row as a dialect reads it, before the protocol's rules.
#[derive(Debug, Clone)]
pub struct StoredBookkeeping {
    pub namespace: String,
    pub table: String,
    /// The watermark, or the stored text when it cannot be read as a time.
    pub watermark: Result<Micros, String>,
    pub schema_version: i64,
    pub schema_description: String,
}

/// What a staging table holds of the records loaded into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// Every record (repeated keys are resolved when publishing).
    EveryRecord,
    /// The latest record of each key (repeated keys replace each other as they load).
    LatestPerKey,
}

/// What a new snapshot replaces of a table that is live already. Append-only tables (web_logs)
/// are served for DAP's window only, so a snapshot of them holds the window, not the table: it
/// replaces the rows it holds and keeps every older one, or each re-snapshot would delete every
/// log older than 30 days, on every target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaces {
    EveryRow,
    /// Only the rows whose key the snapshot holds.
    ItsKeys,
}

impl Replaces {
    pub fn of(def: &TableDef) -> Replaces {
        if def.is_append_only() { Replaces::ItsKeys } else { Replaces::EveryRow }
    }

    /// For a publish that keeps the live table and refills it: the rows to remove first
    /// (names quoted by the dialect).
    pub fn delete_sql(self, live: &str, staging: &str, key: &str) -> String {
        match self {
            Replaces::EveryRow => format!("DELETE FROM {live}"),
            Replaces::ItsKeys => format!("DELETE FROM {live} WHERE {key} IN (SELECT s.{key} FROM {staging} s)"),
        }
    }

    /// For a publish that swaps staging in: the rows of the live table to copy into staging
    /// first (those whose key staging lacks), over `columns`, the columns both tables have.
    pub fn carry_over_sql(self, live: &str, staging: &str, key: &str, columns: &[String]) -> Option<String> {
        let columns = columns.join(", ");
        (self == Replaces::ItsKeys).then(|| {
            format!(
                "INSERT INTO {staging} ({columns}) SELECT {columns} FROM {live} l \
                 WHERE NOT EXISTS (SELECT 1 FROM {staging} s WHERE s.{key} = l.{key})"
            )
        })
    }
}

/// The columns of `def` the live table has too: all but those the delta adds.
pub fn shared_columns<'a>(def: &'a TableDef, delta: &SchemaDelta) -> impl Iterator<Item = &'a str> {
    let added: Vec<&str> = delta
        .changes
        .iter()
        .filter_map(|c| match c {
            crate::schema::delta::Change::Add(column) => Some(column.name.as_str()),
            _ => None,
        })
        .collect();
    def.columns().map(|c| c.name.as_str()).filter(move |n| !added.contains(n))
}

/// A time as a literal every server compares with its timestamp columns
/// (`'2026-01-02 03:04:05.000000'`).
pub fn timestamp_literal(at: Micros) -> String {
    let fixed = crate::time::format_fixed(at);
    format!("'{}'", fixed.trim_end_matches('Z').replacen('T', " ", 1))
}

/// The DDL of a history table (`table`, quoted; its indexes named after `name`): the columns of
/// `versions` typed by the dialect, and two indexes: a key's versions (`dap history`, and the
/// replacement of a key's versions) and the versions by end (pruning).
pub fn history_table_statements(
    table: &str,
    name: &str,
    versions: &TableDef,
    ident: fn(&str) -> String,
    type_of: impl Fn(&Column) -> String,
) -> Vec<String> {
    let columns: Vec<String> = versions
        .columns()
        .map(|c| format!("{} {}{}", ident(&c.name), type_of(c), if c.required { " NOT NULL" } else { "" }))
        .collect();
    vec![
        format!("CREATE TABLE {table} ({})", columns.join(", ")),
        format!(
            "CREATE INDEX {} ON {table} ({}, {})",
            ident(&format!("{name}__by_key")),
            ident(&versions.key.name),
            ident(VALID_FROM)
        ),
        format!("CREATE INDEX {} ON {table} ({})", ident(&format!("{name}__by_end")), ident(VALID_TO)),
    ]
}

/// What moves loaded versions from `scratch` into the history table `history` (both quoted):
/// the replaced keys' versions out, the loaded ones in, then the ended versions the source no
/// longer has out.
pub fn history_load_statements(
    history: &str,
    scratch: &str,
    versions: &TableDef,
    ident: fn(&str) -> String,
    load: VersionLoad,
) -> Vec<String> {
    let key = ident(&versions.key.name);
    let columns: Vec<String> = versions.columns().map(|c| ident(&c.name)).collect();
    let columns = columns.join(", ");
    let mut sql = Vec::new();
    if load.scope == VersionScope::OfKeys {
        sql.push(format!("DELETE FROM {history} WHERE {key} IN (SELECT s.{key} FROM {scratch} AS s)"));
    }
    sql.push(format!("INSERT INTO {history} ({columns}) SELECT {columns} FROM {scratch}"));
    if load.scope == VersionScope::OfKeys {
        let ended = ident(VALID_TO);
        sql.push(match load.gone {
            EndedGone::Before(at) => format!("DELETE FROM {history} WHERE {ended} < {}", timestamp_literal(at)),
            EndedGone::All => format!("DELETE FROM {history} WHERE {ended} IS NOT NULL"),
        });
    }
    sql
}

/// The latest start or end of a version in a history table, as one SQL expression over it.
pub fn latest_change_sql(ident: fn(&str) -> String) -> String {
    let (from, to) = (ident(VALID_FROM), ident(VALID_TO));
    format!("CASE WHEN max({to}) IS NULL OR max({from}) > max({to}) THEN max({from}) ELSE max({to}) END")
}

/// A server's text of a timestamp (`2026-01-02 03:04:05.123456`, fractions optional) as a time.
pub fn parse_server_timestamp(text: &str) -> Option<Micros> {
    crate::time::parse_rfc3339(&format!("{}Z", text.trim().replacen(' ', "T", 1))).ok()
}

/// The latest change of a history table as a server wrote it (`text`), for
/// [`Dialect::latest_version_change`].
pub fn latest_change_of(target: &str, table: &str, text: Option<String>) -> Result<Option<Micros>, SinkError> {
    text.map(|t| {
        parse_server_timestamp(&t).ok_or_else(|| {
            SinkError::refused(
                target,
                Refusal::Damaged,
                format!("{table} holds {t}, which is no time; drop the table and replicate --with-history again"),
            )
        })
    })
    .transpose()
}

/// The refusal of a target that carries no history tables.
fn carries_no_history(target: &str) -> SinkError {
    SinkError::refused(
        target,
        Refusal::Input,
        "replicate --with-history carries history to PostgreSQL, MySQL and SQL Server targets; a mirror file keeps \
         its own (initdb/syncdb --keep-history on it)",
    )
}

/// How a dialect is opened from a connection string and how it provisions an empty database:
/// what the registry (`crate::target`) needs of a backend, so that each entry is built by
/// [`open_sink`] and [`ddl`] instead of written again per backend.
#[async_trait::async_trait]
pub trait Provision: Dialect + Sized {
    /// Connects to (or opens) the database a connection string names, checking what it can.
    async fn open(url: &ConnectionString, options: &SinkOptions) -> Result<Self, SinkError>;
    /// The DDL of the bookkeeping tables.
    fn bookkeeping_statements() -> Vec<String>;
    /// What stores the database version (1) in the bookkeeping tables just created; without it
    /// the official client takes the database for a pre-1.0 one. A file mirror has no version.
    fn version_statements() -> Vec<String> {
        Vec::new()
    }
    /// What a script of this DDL needs first to run as printed by the database's own client
    /// (MySQL: `ANSI_QUOTES`, since the layout quotes names with `"`).
    fn script_preamble() -> Vec<String> {
        Vec::new()
    }
    /// The DDL of one table, as initdb creates it.
    fn table_statements(def: &TableDef) -> Vec<String>;
}

/// Opens a dialect as a target: the registry's `open` of every backend.
pub fn open_sink<'a, D: Provision>(
    url: &'a ConnectionString,
    options: &'a SinkOptions,
) -> BoxFuture<'a, Result<Arc<dyn Sink>, SinkError>> {
    Box::pin(async move {
        let sink: Arc<dyn Sink> = Arc::new(Protocol::new(D::open(url, options).await?));
        Ok(sink)
    })
}

/// The DDL initdb runs on an empty database: the bookkeeping tables with the version row, then
/// each table (`dap ddl`), as a script the database's own client runs as printed.
pub fn ddl<D: Provision>(defs: &[TableDef]) -> Vec<String> {
    let mut out = D::script_preamble();
    out.extend(D::bookkeeping_statements());
    out.extend(D::version_statements());
    for def in defs {
        out.extend(D::table_statements(def));
    }
    out
}

/// A database as the load protocol drives it. Every method gets the connection to work on; the
/// protocol opens and ends the transactions around `load_part` + `record_checkpoint`, while
/// `create_staging`, `publish` and `apply_changes` keep their own (a database without
/// transactional DDL orders its steps so that a crash between them is completed by the next run).
#[async_trait::async_trait]
pub trait Dialect: Send + Sync + 'static {
    /// A connection, in use by one table at a time.
    type Conn: Send + 'static;
    /// A session that holds table locks.
    type LockSession: Send + Sync + 'static;

    /// The target as messages name it (never with a password).
    fn target(&self) -> &str;
    /// A replicated table as SQL names it on this target, quoted (`"canvas"."users"`).
    fn table_sql(&self, namespace: &str, table: &str) -> String;
    /// The bookkeeping table as a person names it (`instructure_dap.table_sync`).
    fn bookkeeping_name(&self) -> &'static str;
    fn staging_keeps(&self) -> Staged;
    /// How long to wait for another writer.
    fn lock_timeout(&self) -> Duration;

    /// A connection from the pool (or a new one).
    async fn connect(&self) -> Result<Self::Conn, SinkError>;
    /// Gives a connection whose work ended cleanly back to the pool.
    fn release(&self, conn: Self::Conn);
    async fn begin(&self, c: &mut Self::Conn) -> Result<(), SinkError>;
    async fn commit(&self, c: &mut Self::Conn) -> Result<(), SinkError>;
    /// Ends a connection whose work failed, undoing whatever it left uncommitted. A server
    /// connection is closed, which the server rolls back: nothing is sent on it, since it may be
    /// in the middle of a statement or a bulk load that would never answer.
    async fn abandon(&self, conn: Self::Conn) {
        drop(conn);
    }

    /// The bookkeeping rows of a namespace (one table's when `table` is given), in the table's
    /// row order (`id`): the protocol keeps the first of each table.
    async fn stored_bookkeeping(
        &self,
        c: &mut Self::Conn,
        namespace: &str,
        table: Option<&str>,
    ) -> Result<Vec<StoredBookkeeping>, SinkError>;
    /// Writes a table's bookkeeping in the open transaction: its first row updated, or a new one.
    async fn write_bookkeeping(&self, c: &mut Self::Conn, b: &Bookkeeping) -> Result<(), SinkError>;
    async fn row_count(&self, c: &mut Self::Conn, namespace: &str, table: &str) -> Result<u64, SinkError>;
    /// Whether the replicated table itself exists.
    async fn table_exists(&self, c: &mut Self::Conn, namespace: &str, table: &str) -> Result<bool, SinkError>;
    /// The names of an existing table's columns, in order: a table provisioned empty by
    /// `dap ddl` is adopted when they are the official layout's.
    async fn column_names(&self, c: &mut Self::Conn, namespace: &str, table: &str) -> Result<Vec<String>, SinkError>;
    /// Refuses what else makes a table not ours to initialise (the mirror: another namespace's
    /// table of that name in the same file).
    async fn check_owner(&self, _c: &mut Self::Conn, _namespace: &str, _table: &str) -> Result<(), SinkError> {
        Ok(())
    }
    /// Refuses a table whose storage is damaged (a file; a server guards its own).
    async fn check_intact(&self, _namespace: &str, _table: &str) -> Result<(), SinkError> {
        Ok(())
    }

    /// The `(job, part)` checkpoints of a table's staging.
    async fn checkpoints(&self, c: &mut Self::Conn, def: &TableDef) -> Result<Vec<(String, String)>, SinkError>;
    /// Per table of `namespace` with checkpoints, how many objects they record (none where no
    /// load of ours ever ran).
    async fn checkpoint_counts(&self, c: &mut Self::Conn, namespace: &str) -> Result<Vec<(String, u64)>, SinkError>;
    async fn staging_exists(&self, c: &mut Self::Conn, def: &TableDef) -> Result<bool, SinkError>;
    /// A new, empty staging table for `def`, any old one and its checkpoints gone.
    async fn create_staging(&self, c: &mut Self::Conn, def: &TableDef) -> Result<(), SinkError>;
    /// Drops the staging table and its checkpoints: a load refused for a value the target cannot
    /// store would be refused again on resuming, so nothing of it is kept.
    async fn drop_staging(&self, c: &mut Self::Conn, def: &TableDef) -> Result<(), SinkError>;
    /// Writes one part's records into staging, in the open transaction.
    async fn load_part(&self, c: &mut Self::Conn, def: &TableDef, rows: &mut Pump<'_>) -> Result<(), SinkError>;
    async fn record_checkpoint(
        &self,
        c: &mut Self::Conn,
        def: &TableDef,
        job: &str,
        part: &str,
    ) -> Result<(), SinkError>;
    /// Rows staging holds.
    async fn staged_rows(&self, c: &mut Self::Conn, def: &TableDef) -> Result<u64, SinkError>;
    /// Makes staging the table, with its bookkeeping row (`delta` from the live table's schema
    /// when it exists), at once.
    async fn publish(
        &self,
        c: &mut Self::Conn,
        def: &TableDef,
        delta: &SchemaDelta,
        b: &Bookkeeping,
    ) -> Result<(), SinkError>;
    /// Applies the delta, the records and the bookkeeping row together.
    async fn apply_changes(
        &self,
        c: &mut Self::Conn,
        def: &TableDef,
        delta: &SchemaDelta,
        rows: &mut Pump<'_>,
        b: &Bookkeeping,
    ) -> Result<(), SinkError>;
    /// Drops a table and its bookkeeping row (and what else the target keeps of it); false when
    /// it had no bookkeeping row.
    async fn drop_table(&self, c: &mut Self::Conn, namespace: &str, table: &str) -> Result<bool, SinkError>;
    async fn reclaim_space(&self, _c: &mut Self::Conn) -> Result<(), SinkError> {
        Ok(())
    }
    async fn record_run(&self, _namespace: &str, _table: &str, _run: &RunRecord) {}
    /// See [`Sink::record_start`].
    async fn record_start(&self, _c: &mut Self::Conn, _start: &crate::mirror::runs::Start) -> Option<i64> {
        None
    }
    /// See [`Sink::record_gap`]; targets keep no record of gaps unless they say otherwise.
    async fn record_gap(
        &self,
        _c: &mut Self::Conn,
        _namespace: &str,
        _table: &str,
        _after: Micros,
    ) -> Result<Option<Gap>, SinkError> {
        Ok(None)
    }

    /// `replicate --with-history`: the latest start or end of a version in the history table
    /// `history` of `namespace` (it exists; [`latest_change_sql`]), `None` when it is empty.
    /// A target that carries no history refuses.
    async fn latest_version_change(
        &self,
        _c: &mut Self::Conn,
        _namespace: &str,
        _history: &str,
    ) -> Result<Option<Micros>, SinkError> {
        Err(carries_no_history(self.target()))
    }
    /// `replicate --with-history` ([`Sink::replace_history`]): the versions into a scratch table,
    /// then [`history_table_statements`] (a `Whole` load) and [`history_load_statements`], at once.
    async fn replace_versions(
        &self,
        _c: &mut Self::Conn,
        _versions: &TableDef,
        _load: VersionLoad,
        _rows: &mut Pump<'_>,
    ) -> Result<(), SinkError> {
        Err(carries_no_history(self.target()))
    }

    /// A session in which table locks are taken (a dedicated connection on a server).
    async fn lock_session(&self) -> Result<Self::LockSession, SinkError>;
    /// Takes the table's lock in the session without waiting; false when another holds it.
    async fn try_lock(&self, s: &mut Self::LockSession, namespace: &str, table: &str) -> Result<bool, SinkError>;
    /// Says, beside the lock, who holds it now (`holder`), for those who wait.
    async fn write_holder(
        &self,
        s: &mut Self::LockSession,
        namespace: &str,
        table: &str,
        holder: &str,
    ) -> Result<(), SinkError>;
    /// Who holds the table's lock, as its holder said.
    async fn read_holder(
        &self,
        s: &mut Self::LockSession,
        namespace: &str,
        table: &str,
    ) -> Result<Option<String>, SinkError>;
}

/// Runs `prepare` (a server's check and creation of the bookkeeping tables and our own) holding
/// the target's preparation lock. Every writer reads whether the tables exist and creates what
/// is missing: two that open an empty target at once would both create them and one fail
/// (`already exists`), or both write the version row. The lock is a session of
/// [`Dialect::lock_session`], given back (and the lock with it) when this returns.
pub async fn prepared_alone<D: Dialect, T>(
    d: &D,
    prepare: impl Future<Output = Result<T, SinkError>>,
) -> Result<T, SinkError> {
    const LOCK: (&str, &str) = (super::layout::OUR_SCHEMA, "bookkeeping");
    let mut session = d.lock_session().await?;
    let started = Instant::now();
    while !d.try_lock(&mut session, LOCK.0, LOCK.1).await? {
        let waited = started.elapsed();
        if waited >= d.lock_timeout() {
            return Err(SinkError::refused(
                d.target(),
                Refusal::Locked,
                format!(
                    "another process has been creating the bookkeeping tables for {} s (--lock-timeout); \
                     run the command again once it finishes, or give it a longer --lock-timeout",
                    waited.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let prepared = prepare.await;
    drop(session);
    prepared
}

/// What the current run loaded into a table's staging, for the check before publishing.
#[derive(Debug, Default, Clone, Copy)]
struct Loaded {
    rows: u64,
    /// Parts of an interrupted run were kept (their rows were not counted by this run).
    resumed: bool,
}

/// The [`Sink`] of a [`Dialect`]: the load protocol.
pub struct Protocol<D: Dialect> {
    d: D,
    loaded: Mutex<HashMap<(String, String), Loaded>>,
}

impl<D: Dialect> Protocol<D> {
    pub fn new(dialect: D) -> Protocol<D> {
        Protocol { d: dialect, loaded: Mutex::new(HashMap::new()) }
    }

    pub fn dialect(&self) -> &D {
        &self.d
    }

    /// Ends work on a connection: back to the pool after success, dropped after a failure.
    /// Drops what a refused load staged (the refusal is what the user sees; a failure to tidy
    /// is only a warning, and the next run's staging replaces it anyway).
    async fn forget_staging(&self, def: &TableDef) {
        let dropped = async {
            let mut c = self.d.connect().await?;
            let dropped = self.d.drop_staging(&mut c, def).await;
            self.finish(c, dropped).await
        };
        if let Err(e) = dropped.await {
            tracing::warn!("{}: could not drop the staging of {}: {e}", self.d.target(), def.name);
        }
    }

    async fn finish<T>(&self, c: D::Conn, result: Result<T, SinkError>) -> Result<T, SinkError> {
        match result {
            Ok(_) => self.d.release(c),
            Err(_) => self.d.abandon(c).await,
        }
        result
    }

    /// The protocol's reading of stored rows: the first row of each table counts, and a
    /// watermark or version that cannot be read is refused with the way out.
    fn rules(&self, rows: Vec<StoredBookkeeping>) -> Result<Vec<Bookkeeping>, SinkError> {
        let mut out: Vec<Bookkeeping> = Vec::new();
        for row in rows {
            if out.iter().any(|b| b.table == row.table) {
                continue; // the first row of a table counts, as for the official client
            }
            let fix =
                crate::term::command(&["initdb", "--replace", "--namespace", &row.namespace, "--table", &row.table]);
            let watermark = row.watermark.map_err(|text| {
                SinkError::refused(
                    self.d.target(),
                    Refusal::Damaged,
                    format!(
                        "{} holds a watermark dap cannot read for {}.{} ({}); nothing was changed. Re-snapshot the table with `{fix}`",
                        self.d.bookkeeping_name(),
                        row.namespace,
                        row.table,
                        crate::term::safe(&text)
                    ),
                )
            })?;
            let schema_version = u32::try_from(row.schema_version).map_err(|_| {
                SinkError::refused(
                    self.d.target(),
                    Refusal::Damaged,
                    format!(
                        "{} holds schema version {} for {}.{}, which is no version; nothing was changed. Re-snapshot the table with `{fix}`",
                        self.d.bookkeeping_name(),
                        row.schema_version,
                        row.namespace,
                        row.table
                    ),
                )
            })?;
            out.push(Bookkeeping {
                namespace: row.namespace,
                table: row.table,
                watermark,
                schema_version,
                schema_description: row.schema_description,
            });
        }
        Ok(out)
    }

    async fn read_bookkeeping(&self, namespace: &str, table: Option<&str>) -> Result<Vec<Bookkeeping>, SinkError> {
        let mut c = self.d.connect().await?;
        let rows = self.d.stored_bookkeeping(&mut c, namespace, table).await;
        let rows = self.finish(c, rows).await?;
        self.rules(rows)
    }
}

/// Who this process is, as a lock's waiters see it.
fn this_process() -> String {
    let host = hostname();
    format!("dap pid {} on {host} since {}", std::process::id(), crate::time::format_wire(crate::time::now()))
}

/// The machine's name, for telling who holds a lock.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    #[cfg(unix)]
    // SAFETY: gethostname writes at most `len` bytes into the buffer it is given.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    #[cfg(not(unix))]
    let ok = false;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(0);
    if ok && end > 0 { String::from_utf8_lossy(&buf[..end]).into_owned() } else { "this host".into() }
}

#[async_trait::async_trait]
impl<D: Dialect> Sink for Protocol<D> {
    fn describe(&self) -> String {
        self.d.target().to_string()
    }

    async fn bookkeeping(&self, namespace: &str, table: &str) -> Result<Option<Bookkeeping>, SinkError> {
        Ok(self.read_bookkeeping(namespace, Some(table)).await?.into_iter().find(|b| b.table == table))
    }

    async fn all_bookkeeping(&self, namespace: &str) -> Result<Vec<Bookkeeping>, SinkError> {
        self.read_bookkeeping(namespace, None).await
    }

    async fn row_count(&self, namespace: &str, table: &str) -> Result<u64, SinkError> {
        let mut c = self.d.connect().await?;
        let n = self.d.row_count(&mut c, namespace, table).await;
        self.finish(c, n).await
    }

    async fn unfinished_loads(&self, namespace: &str) -> Result<Vec<(String, u64)>, SinkError> {
        let mut c = self.d.connect().await?;
        let counts = self.d.checkpoint_counts(&mut c, namespace).await;
        let counts = self.finish(c, counts).await?;
        if counts.is_empty() {
            return Ok(counts);
        }
        // A table published since keeps no checkpoints; one with a bookkeeping row and
        // checkpoints is a re-snapshot under way, which `status` shows as the table it is.
        let published: Vec<String> = self.all_bookkeeping(namespace).await?.into_iter().map(|b| b.table).collect();
        Ok(counts.into_iter().filter(|(table, _)| !published.contains(table)).collect())
    }

    async fn check_intact(&self, namespace: &str, table: &str) -> Result<(), SinkError> {
        self.d.check_intact(namespace, table).await
    }

    async fn check_unowned(&self, def: &TableDef) -> Result<(), SinkError> {
        let (namespace, table) = (def.namespace.as_str(), def.name.as_str());
        let mut c = self.d.connect().await?;
        let checked = async {
            self.d.check_owner(&mut c, namespace, table).await?;
            if !self.d.table_exists(&mut c, namespace, table).await? {
                return Ok(());
            }
            // Provisioned beforehand (`dap ddl`): an empty table of exactly the official
            // columns is taken over; anything else may be someone's data.
            let rows = self.d.row_count(&mut c, namespace, table).await?;
            let columns = self.d.column_names(&mut c, namespace, table).await?;
            let official: Vec<&str> = def.columns().map(|c| c.name.as_str()).collect();
            if rows == 0 && columns == official {
                tracing::info!("{namespace}.{table}: taking over the empty table provisioned beforehand");
                return Ok(());
            }
            let why = if rows > 0 {
                format!("it holds {rows} rows: another client (likely the official one) stopped while loading it, or it is not a replicated table")
            } else {
                format!(
                    "it is empty, but its columns ({}) are not the official layout's ({}): provision it with `dap ddl`",
                    columns.join(", "),
                    official.join(", ")
                )
            };
            let drop = format!("DROP TABLE {}", self.d.table_sql(namespace, table));
            Err(SinkError::refused(
                self.d.target(),
                Refusal::NotOurs,
                format!(
                    "{namespace}.{table} exists but {} has no row for it, and {why}. \
                     Drop it with `{drop}`, or use another database, then run initdb again",
                    self.d.bookkeeping_name()
                ),
            ))
        }
        .await;
        self.finish(c, checked).await
    }

    async fn lock(&self, namespace: &str, table: &str, watch: &TableProgress) -> Result<TableLock, SinkError> {
        let mut session = self.d.lock_session().await?;
        let timeout = self.d.lock_timeout();
        let started = Instant::now();
        let mut told = false;
        loop {
            if self.d.try_lock(&mut session, namespace, table).await? {
                self.d.write_holder(&mut session, namespace, table, &this_process()).await?;
                if told {
                    tracing::info!("{namespace}.{table}: the other writer finished; going on");
                }
                return Ok(TableLock::new(session));
            }
            let holder = self
                .d
                .read_holder(&mut session, namespace, table)
                .await?
                .map_or_else(|| "another process".to_string(), |h| crate::term::safe(&h).into_owned());
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(SinkError::refused(
                    self.d.target(),
                    Refusal::Locked,
                    format!(
                        "{namespace}.{table} is being written by {holder}; waited {} s for it (--lock-timeout) and left the table alone. \
                         Run the command again once that one finishes, or give it a longer --lock-timeout",
                        waited.as_secs()
                    ),
                ));
            }
            if !told {
                tracing::warn!(
                    "{namespace}.{table}: {holder} is writing it; waiting up to {} s for it to finish",
                    timeout.as_secs()
                );
                told = true;
            }
            watch.stage(&format!("waiting for {holder} to finish writing it"));
            tokio::time::sleep((timeout - waited).min(Duration::from_millis(250))).await;
        }
    }

    async fn stage(&self, def: &TableDef, job: &str) -> Result<Vec<String>, SinkError> {
        let mut c = self.d.connect().await?;
        let staged = async {
            let done = self.d.checkpoints(&mut c, def).await?;
            // The resume rule: the same job's staging, with its checkpoints, is carried on.
            if !done.is_empty() && done.iter().all(|(j, _)| j == job) && self.d.staging_exists(&mut c, def).await? {
                return Ok(done.into_iter().map(|(_, part)| part).collect::<Vec<_>>());
            }
            self.d.create_staging(&mut c, def).await?;
            Ok(Vec::new())
        }
        .await;
        let done = self.finish(c, staged).await?;
        let key = (def.namespace.clone(), def.name.clone());
        self.loaded.lock().expect("the load record").insert(key, Loaded { rows: 0, resumed: !done.is_empty() });
        Ok(done)
    }

    async fn load(&self, def: &TableDef, job: &str, mut feed: Feed) -> Result<u64, SinkError> {
        let mut c = self.d.connect().await?;
        let mut rows = 0;
        loop {
            let part = match next_part(&mut feed).await {
                Ok(Some(part)) => part,
                Ok(None) => break,
                Err(e) => {
                    self.d.abandon(c).await;
                    return Err(e.into());
                }
            };
            if let Err(e) = self.d.begin(&mut c).await {
                self.d.abandon(c).await;
                return Err(e);
            }
            let mut pump = Pump::new(&mut feed, Span::Part);
            let loaded = async {
                self.d.load_part(&mut c, def, &mut pump).await?;
                // A part that does not end as it began is no part: nothing of it is kept.
                let ended = pump.ended_part()?;
                if ended != part {
                    return Err(SinkError::BrokenFeed);
                }
                self.d.record_checkpoint(&mut c, def, job, &part).await?;
                Ok(pump.rows())
            }
            .await;
            match loaded {
                Ok(n) => {
                    if let Err(e) = self.d.commit(&mut c).await {
                        self.d.abandon(c).await;
                        return Err(e);
                    }
                    rows += n;
                }
                Err(e) => {
                    self.d.abandon(c).await;
                    if e.refusal() == Some(Refusal::Input) {
                        self.forget_staging(def).await;
                    }
                    return Err(e);
                }
            }
        }
        self.d.release(c);
        let key = (def.namespace.clone(), def.name.clone());
        self.loaded.lock().expect("the load record").entry(key).or_default().rows += rows;
        Ok(rows)
    }

    async fn publish(&self, def: &TableDef, delta: &SchemaDelta, bookkeeping: &Bookkeeping) -> Result<(), SinkError> {
        let key = (def.namespace.clone(), def.name.clone());
        let loaded = self.loaded.lock().expect("the load record").remove(&key).unwrap_or_default();
        let mut c = self.d.connect().await?;
        let published = async {
            // Staging must hold what this run loaded: anything else was changed by another
            // writer, and is never published.
            let staged = self.d.staged_rows(&mut c, def).await?;
            let expected = loaded.rows;
            let consistent = match (self.d.staging_keeps(), loaded.resumed) {
                (Staged::EveryRecord, false) => staged == expected,
                (Staged::EveryRecord, true) => staged >= expected,
                (Staged::LatestPerKey, false) => staged <= expected && (staged > 0) == (expected > 0),
                (Staged::LatestPerKey, true) => expected == 0 || staged > 0,
            };
            if !consistent {
                self.d.create_staging(&mut c, def).await?;
                return Err(SinkError::refused(
                    self.d.target(),
                    Refusal::Moved,
                    format!(
                        "{}.{}: staging holds {staged} rows, but this run loaded {expected}: something else changed it, so nothing was published (the table keeps its previous state)",
                        def.namespace, def.name
                    ),
                ));
            }
            self.d.publish(&mut c, def, delta, bookkeeping).await
        }
        .await;
        self.finish(c, published).await
    }

    async fn apply_changes(
        &self,
        def: &TableDef,
        delta: &SchemaDelta,
        mut feed: Feed,
        bookkeeping: &Bookkeeping,
    ) -> Result<u64, SinkError> {
        let mut c = self.d.connect().await?;
        let mut pump = Pump::new(&mut feed, Span::Feed);
        let applied = self.d.apply_changes(&mut c, def, delta, &mut pump, bookkeeping).await;
        let rows = pump.rows();
        self.finish(c, applied.map(|()| rows)).await
    }

    async fn history_held(&self, namespace: &str, table: &str) -> Result<Option<HistoryHeld>, SinkError> {
        let name = history_name(table);
        let mut c = self.d.connect().await?;
        let held = async {
            if !self.d.table_exists(&mut c, namespace, &name).await? {
                return Ok(None);
            }
            let columns = self.d.column_names(&mut c, namespace, &name).await?;
            let latest = self.d.latest_version_change(&mut c, namespace, &name).await?;
            Ok(Some(HistoryHeld { columns, latest }))
        }
        .await;
        self.finish(c, held).await
    }

    async fn replace_history(&self, versions: &TableDef, load: VersionLoad, mut feed: Feed) -> Result<u64, SinkError> {
        let mut c = self.d.connect().await?;
        let mut pump = Pump::new(&mut feed, Span::Feed);
        let replaced = self.d.replace_versions(&mut c, versions, load, &mut pump).await;
        let rows = pump.rows();
        self.finish(c, replaced.map(|()| rows)).await
    }

    async fn drop_table(&self, namespace: &str, table: &str) -> Result<bool, SinkError> {
        let mut c = self.d.connect().await?;
        let dropped = self.d.drop_table(&mut c, namespace, table).await;
        self.finish(c, dropped).await
    }

    async fn reclaim_space(&self) -> Result<(), SinkError> {
        let mut c = self.d.connect().await?;
        let done = self.d.reclaim_space(&mut c).await;
        self.finish(c, done).await
    }

    async fn record_run(&self, namespace: &str, table: &str, run: &RunRecord) {
        self.d.record_run(namespace, table, run).await
    }

    async fn record_start(&self, start: &crate::mirror::runs::Start) -> Option<i64> {
        let mut c = self.d.connect().await.ok()?;
        let id = self.d.record_start(&mut c, start).await;
        self.d.release(c);
        id
    }

    async fn record_gap(&self, namespace: &str, table: &str, after: Micros) -> Result<Option<Gap>, SinkError> {
        let mut c = self.d.connect().await?;
        let gap = self.d.record_gap(&mut c, namespace, table, after).await;
        self.finish(c, gap).await
    }
}

/// A lock name that fits every database's limit (MySQL: 64 characters), the same for every
/// process that writes the table: `dap_replica:` and a hash of the database, namespace and table.
pub fn lock_name(database: &str, namespace: &str, table: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{database}\u{0}{namespace}\u{0}{table}").as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("dap_replica:{hex}")
}

/// The two 32-bit keys of a PostgreSQL advisory lock for `name`.
pub fn lock_keys(name: &str) -> (i32, i32) {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let a = i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let b = i32::from_be_bytes([digest[4], digest[5], digest[6], digest[7]]);
    (a, b)
}
