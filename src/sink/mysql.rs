//! MySQL and MariaDB, in the official client's layout (spec §4.5-§4.7, §5.1-§5.2): tables
//! `"ns__table"` in the connection's database, inline `ENUM(…) CHARACTER SET ascii COLLATE
//! ascii_bin`, `binary(16)` UUIDs and packed IPs, `json`, `mediumtext`, `datetime`, `tinyint`
//! booleans, first-line comments, `instructure_dap__table_sync` and `…__database_version` = 1;
//! sessions in `ANSI_QUOTES` strict mode on UTC.
//!
//! Bulk path: `LOAD DATA LOCAL INFILE` streamed from our own encoder (multi-row INSERTs under
//! `max_allowed_packet` when the server forbids it); any warning of a load is an error (with
//! LOCAL, MySQL turns bad rows into warnings and skips them). DDL commits implicitly here, so the
//! invariant is kept by order: initdb loads a staging table (per-object transactions with their
//! checkpoints), records that it is about to publish, swaps it in with `RENAME TABLE`, then writes
//! the bookkeeping row; a run that finds a published table whose bookkeeping row is missing
//! completes it. syncdb applies DDL first (each change idempotent, so a rerun can repeat it),
//! then loads the changes into a temporary table and applies them, with the watermark, in one
//! transaction.
//!
//! Timestamps and times lose their fraction (the official layout has none): we truncate, so a
//! watermark is never rounded up past a change not applied (MySQL 8 would round); the exact
//! watermark is kept in our own table beside `table_sync`, in the same transaction. NaN and
//! ±infinity have no MySQL form: refused before anything is published, naming the row, or
//! stored as NULL with `--non-finite null`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, SslOpts};

use super::layout::{self, BOOKKEEPING_SCHEMA, DATABASE_VERSION, OUR_SCHEMA, StoredVersion, SyncColumnKind};
use super::protocol::{
    self, Dialect, Provision, Replaces, Staged, StoredBookkeeping, history_load_statements, history_table_statements,
    latest_change_of, latest_change_sql, lock_name, shared_columns,
};
use super::{
    Access, Bookkeeping, ConnectionString, NonFinite, Refusal, SinkError, SinkOptions, SslMode, VersionLoad,
    VersionScope,
};
use crate::decode::Record;
use crate::error::Retry;
use crate::feed::Pump;
use crate::schema::delta::{Change, SchemaDelta};
use crate::schema::versions::history_name;
use crate::schema::{Column, ColumnType, TableDef};
use crate::time::{self, MICROS_PER_SECOND};
use crate::value::{Value, format_float};

#[async_trait::async_trait]
impl Provision for MysqlDialect {
    async fn open(url: &ConnectionString, options: &SinkOptions) -> Result<Self, SinkError> {
        MysqlDialect::open(url, options).await
    }

    fn bookkeeping_statements() -> Vec<String> {
        bookkeeping_statements()
    }

    fn version_statements() -> Vec<String> {
        vec![version_statement()]
    }

    fn script_preamble() -> Vec<String> {
        vec![SQL_MODE.into()]
    }

    fn table_statements(def: &TableDef) -> Vec<String> {
        table_statements(def)
    }
}

/// The official client's SQL mode: `"` quotes names, as the layout's DDL does.
const SQL_MODE: &str = "SET SESSION sql_mode = 'ANSI_QUOTES,NO_AUTO_VALUE_ON_ZERO,STRICT_ALL_TABLES'";

/// Stores version 1; a second run of the same script leaves the row as it is.
fn version_statement() -> String {
    format!("INSERT IGNORE INTO {} (\"version\") VALUES ({DATABASE_VERSION})", bookkeeping_table("database_version"))
}

/// The session settings of the official client (spec §5.1), and no wait for a table or row lock
/// longer than the lock timeout (MySQL waits a year for a metadata lock by default).
fn session(lock_timeout: Duration) -> Vec<String> {
    let wait = lock_timeout.as_secs().max(1);
    vec![
        SQL_MODE.into(),
        "SET SESSION time_zone = '+00:00'".into(),
        "SET NAMES utf8mb4".into(),
        format!("SET SESSION lock_wait_timeout = {wait}, innodb_lock_wait_timeout = {wait}"),
    ]
}

/// Bytes of load data handed to the driver at a time.
const CHUNK: usize = 1 << 16;

/// What differs between MySQL 8 and MariaDB in the SQL we send, chosen from `VERSION()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    MariaDb,
    Mysql,
}

impl Flavor {
    pub fn of_version(version: &str) -> Flavor {
        if version.to_ascii_lowercase().contains("mariadb") { Flavor::MariaDb } else { Flavor::Mysql }
    }

    /// `INSERT … SELECT … ON DUPLICATE KEY UPDATE` of whole rows. MariaDB reads the new row with
    /// `VALUES(col)`; MySQL deprecated that in 8.0.20 for a row alias.
    pub fn upsert(self, table: &str, columns: &[String], values: &[String], source: &str) -> String {
        let list = columns.join(", ");
        match self {
            Flavor::MariaDb => {
                let set: Vec<String> = values.iter().map(|c| format!("{c} = VALUES({c})")).collect();
                let action = if set.is_empty() { format!("{0} = {0}", columns[0]) } else { set.join(", ") };
                format!("INSERT INTO {table} ({list}) SELECT {list} FROM {source} ON DUPLICATE KEY UPDATE {action}")
            }
            Flavor::Mysql => {
                let set: Vec<String> = values.iter().map(|c| format!("{c} = new.{c}")).collect();
                let action = if set.is_empty() { format!("{0} = new.{0}", columns[0]) } else { set.join(", ") };
                format!(
                    "INSERT INTO {table} ({list}) SELECT * FROM (SELECT {list} FROM {source}) AS new ON DUPLICATE KEY UPDATE {action}"
                )
            }
        }
    }

    /// `ADD COLUMN` that a rerun may repeat: MariaDB has `IF NOT EXISTS`; on MySQL the adapter
    /// looks first.
    pub fn add_column(self, table: &str, column: &str) -> String {
        match self {
            Flavor::MariaDb => format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}"),
            Flavor::Mysql => format!("ALTER TABLE {table} ADD COLUMN {column}"),
        }
    }
}

/// A MySQL or MariaDB database as the load protocol drives it.
pub struct MysqlDialect {
    shown: String,
    database: String,
    pool: Pool,
    /// Options for the lock sessions, which live outside the pool.
    opts: Opts,
    lock_timeout: Duration,
    flavor: Flavor,
    non_finite: NonFinite,
    /// Whether the server takes `LOAD DATA LOCAL INFILE`; else multi-row INSERTs.
    local_infile: bool,
    /// Bytes one INSERT statement may take (under `max_allowed_packet`).
    statement_budget: usize,
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal: `'` doubled and backslashes escaped (MySQL reads `\` as an escape).
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The first line of a comment, as the official client keeps it on MySQL.
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// A table of a namespace: `"ns__table"`.
pub fn table_name(namespace: &str, table: &str) -> String {
    ident(&format!("{namespace}__{table}"))
}

fn staging_name(def: &TableDef) -> String {
    ident(&format!("{OUR_SCHEMA}__{}__{}", def.namespace, def.name))
}

fn retired_name(def: &TableDef) -> String {
    ident(&format!("{OUR_SCHEMA}__retired__{}__{}", def.namespace, def.name))
}

fn our_table(name: &str) -> String {
    ident(&format!("{OUR_SCHEMA}__{name}"))
}

fn bookkeeping_table(name: &str) -> String {
    ident(&format!("{BOOKKEEPING_SCHEMA}__{name}"))
}

/// The column type, as the official client's generator writes it for MySQL (spec §4.5).
pub fn column_type(c: &Column) -> String {
    fn of(ty: &ColumnType) -> String {
        match ty {
            ColumnType::Int(16) => "smallint".into(),
            ColumnType::Int(32) => "integer".into(),
            ColumnType::Int(_) => "bigint".into(),
            ColumnType::IntEnum(values) => of(&ColumnType::Int(layout::int_enum_bits(values))),
            ColumnType::Float(32) => "real".into(),
            ColumnType::Float(_) => "double precision".into(),
            ColumnType::Decimal { precision, scale } => format!("decimal({precision}, {scale})"),
            ColumnType::Bool => "tinyint".into(),
            ColumnType::Str { max_length: Some(n), .. } if *n < 65_536 => format!("varchar({n})"),
            ColumnType::Str { max_length: Some(n), .. } if *n < 16_777_216 => "mediumtext".into(),
            ColumnType::Str { max_length: Some(_), .. } => "longtext".into(),
            ColumnType::Str { max_length: None, .. } => "mediumtext".into(),
            ColumnType::Enum(values) => {
                let labels: Vec<String> = values.iter().map(|v| literal(v)).collect();
                format!("ENUM ({}) CHARACTER SET ascii COLLATE ascii_bin", labels.join(", "))
            }
            ColumnType::Timestamp => "datetime".into(),
            ColumnType::Date => "date".into(),
            ColumnType::Time => "time".into(),
            ColumnType::Uuid | ColumnType::Ipv6 | ColumnType::Ip => "binary(16)".into(),
            ColumnType::Ipv4 => "binary(4)".into(),
            ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json => "json".into(),
        }
    }
    of(&c.ty)
}

/// A column's full definition: type, nullability, comment.
fn column_sql(c: &Column) -> String {
    let mut sql = format!("{} {}", ident(&c.name), column_type(c));
    if c.required {
        sql.push_str(" NOT NULL");
    }
    if let Some(text) = c.comment.as_deref().map(first_line).filter(|t| !t.is_empty()) {
        sql.push_str(&format!(" COMMENT {}", literal(text)));
    }
    sql
}

fn create_table_sql(name: &str, def: &TableDef) -> String {
    let columns: Vec<String> = def.columns().map(column_sql).collect();
    let mut sql = format!(
        "CREATE TABLE {name} ({}, CONSTRAINT {} PRIMARY KEY ({}))",
        columns.join(", "),
        ident(&format!("pk_{}__{}", def.namespace, def.name)),
        ident(&def.key.name)
    );
    if let Some(text) = def.comment.as_deref().map(first_line).filter(|t| !t.is_empty()) {
        sql.push_str(&format!(" COMMENT = {}", literal(text)));
    }
    sql
}

/// The bookkeeping tables exactly as the official client creates them on MySQL.
pub fn bookkeeping_statements() -> Vec<String> {
    let columns: Vec<String> = layout::TABLE_SYNC_COLUMNS
        .iter()
        .map(|c| {
            let ty = match c.kind {
                SyncColumnKind::Identity => "bigint NOT NULL AUTO_INCREMENT",
                SyncColumnKind::Name if c.required => "varchar(64) NOT NULL",
                SyncColumnKind::Name => "varchar(64)",
                SyncColumnKind::Timestamp => "datetime NOT NULL",
                SyncColumnKind::BigInt => "bigint NOT NULL",
                SyncColumnKind::Text => "mediumtext NOT NULL",
            };
            let comment = if c.comment.is_empty() { String::new() } else { format!(" COMMENT {}", literal(c.comment)) };
            format!("{} {ty}{comment}", ident(c.name))
        })
        .collect();
    vec![
        format!(
            "CREATE TABLE {} (\"version\" bigint NOT NULL AUTO_INCREMENT COMMENT {}, CONSTRAINT \"pk_instructure_dap__database_version\" PRIMARY KEY (\"version\")) COMMENT = {}",
            bookkeeping_table("database_version"),
            literal(layout::VERSION_COLUMN_COMMENT),
            literal(layout::DATABASE_VERSION_COMMENT)
        ),
        format!(
            "CREATE TABLE {} ({}, CONSTRAINT \"pk_instructure_dap__table_sync\" PRIMARY KEY (\"id\")) COMMENT = {}",
            bookkeeping_table("table_sync"),
            columns.join(", "),
            literal(layout::TABLE_SYNC_COMMENT)
        ),
    ]
}

/// The DDL of a table as the official client's initdb creates it on an empty database.
pub fn table_statements(def: &TableDef) -> Vec<String> {
    vec![create_table_sql(&table_name(&def.namespace, &def.name), def)]
}

/// Whether a column's values travel as hex (binary columns, loaded through `UNHEX`).
fn is_binary(ty: &ColumnType) -> bool {
    matches!(ty, ColumnType::Uuid | ColumnType::Ipv4 | ColumnType::Ipv6 | ColumnType::Ip)
}

fn hex(bytes: &[u8], out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 15) as usize]);
    }
}

/// How a value is written: as a field of LOAD DATA text, or as a literal of an INSERT.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    LoadField,
    Literal,
}

/// A value NaN or ±infinity in a float column, which MySQL cannot store.
struct NonFiniteValue {
    column: String,
    value: f64,
}

/// Appends one value: text escaped for `LOAD DATA` (`\N` for NULL), or a SQL literal.
fn encode(v: &Value, c: &Column, form: Form, non_finite: NonFinite, out: &mut Vec<u8>) -> Result<(), NonFiniteValue> {
    let null: &[u8] = if form == Form::LoadField { b"\\N" } else { b"NULL" };
    let text = |s: &str, out: &mut Vec<u8>| match form {
        Form::LoadField => {
            for b in s.bytes() {
                match b {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    0 => out.extend_from_slice(b"\\0"),
                    _ => out.push(b),
                }
            }
        }
        Form::Literal => out.extend_from_slice(literal(s).as_bytes()),
    };
    match v {
        Value::Null => out.extend_from_slice(null),
        Value::Bool(b) => out.push(if *b { b'1' } else { b'0' }),
        Value::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
        // NULL cannot stand in for a value of a required column either.
        Value::Float(f) if !f.is_finite() => match non_finite {
            NonFinite::Null if !c.required => out.extend_from_slice(null),
            _ => return Err(NonFiniteValue { column: c.name.clone(), value: *f }),
        },
        Value::Float(f) => out.extend_from_slice(format_float(*f).as_bytes()),
        Value::Decimal(d) => out.extend_from_slice(d.to_string().as_bytes()),
        Value::Str(s) => text(s, out),
        Value::Timestamp(us) => {
            let whole = us - us.rem_euclid(MICROS_PER_SECOND); // truncated, never rounded up
            let fixed = time::format_fixed(whole);
            text(&format!("{} {}", &fixed[..10], &fixed[11..19]), out)
        }
        Value::Date(d) => text(&time::format_date(*d), out),
        Value::Time(us) => text(&time::format_time_of_day(us - us.rem_euclid(MICROS_PER_SECOND)), out),
        Value::Uuid(u) => {
            if form == Form::Literal {
                out.extend_from_slice(b"X'");
            }
            hex(&u.to_be_bytes(), out);
            if form == Form::Literal {
                out.push(b'\'');
            }
        }
        Value::Ip(ip) => {
            let bytes: Vec<u8> = match ip {
                std::net::IpAddr::V4(a) => a.octets().to_vec(),
                std::net::IpAddr::V6(a) => a.octets().to_vec(),
            };
            if form == Form::Literal {
                out.extend_from_slice(b"X'");
            }
            hex(&bytes, out);
            if form == Form::Literal {
                out.push(b'\'');
            }
        }
        Value::Json(j) => text(&j.to_string(), out),
    }
    Ok(())
}

/// The load column list and SET clause: binary columns arrive as hex in a variable.
fn load_columns(def: &TableDef, with_action: bool) -> (String, String) {
    let mut list = Vec::new();
    let mut set = Vec::new();
    if with_action {
        list.push(ident("_dap_action"));
    }
    for (i, c) in def.columns().enumerate() {
        if is_binary(&c.ty) {
            list.push(format!("@b{i}"));
            set.push(format!("{} = UNHEX(@b{i})", ident(&c.name)));
        } else {
            list.push(ident(&c.name));
        }
    }
    let set = if set.is_empty() { String::new() } else { format!(" SET {}", set.join(", ")) };
    (list.join(", "), set)
}

fn database_error(shown: &str, action: &str, e: mysql_async::Error) -> SinkError {
    let (detail, retry) = match &e {
        mysql_async::Error::Server(s) => (
            format!("{} (error {})", s.message, s.code),
            // Deadlock, lock wait timeout, server gone: the same work may succeed.
            if matches!(s.code, 1205 | 1213 | 1927 | 2006 | 2013) { Retry::MayHelp } else { Retry::Useless },
        ),
        mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => (e.to_string(), Retry::MayHelp),
        other => (other.to_string(), Retry::Useless),
    };
    SinkError::Database {
        target: shown.to_string(),
        action: action.to_string(),
        detail,
        retry,
        source: Some(Box::new(e)),
    }
}

/// A failed connection, explained.
fn connect_error(shown: &str, url: &ConnectionString, e: mysql_async::Error) -> SinkError {
    let user = url.user.as_deref().unwrap_or("?");
    let (hint, retry) = match &e {
        mysql_async::Error::Server(s) if s.code == 1045 => {
            (format!("the server refused the login of user {user}; check the user and password"), Retry::Useless)
        }
        mysql_async::Error::Server(s) if s.code == 1049 => (
            format!("database {} does not exist; create it (CREATE DATABASE `{0}`) or fix the name", url.database),
            Retry::Useless,
        ),
        mysql_async::Error::Server(s) if s.code == 1044 => {
            (format!("user {user} may not use database {}", url.database), Retry::Useless)
        }
        mysql_async::Error::Server(_) => ("the server refused the connection".into(), Retry::Useless),
        other if ["tls", "ssl", "certificate"].iter().any(|w| other.to_string().to_lowercase().contains(w)) => (
            "TLS failed: the server's certificate was not accepted, or the server offers no TLS; check ?ssl= (require encrypts without checking the certificate; verify-* need the server's CA, given with &sslrootcert=FILE)".into(),
            Retry::Useless,
        ),
        _ => ("cannot reach the server; check the host and port, and that it is running".into(), Retry::MayHelp),
    };
    let detail = match &e {
        mysql_async::Error::Server(s) => s.message.clone(),
        other => other.to_string(),
    };
    SinkError::Database {
        target: shown.to_string(),
        action: "connecting".into(),
        detail: format!("{hint} ({detail})"),
        retry,
        source: Some(Box::new(e)),
    }
}

fn ssl_opts(url: &ConnectionString) -> Option<SslOpts> {
    let base = || {
        let opts = SslOpts::default();
        match &url.ssl_root_cert {
            Some(file) => opts.with_root_certs(vec![file.clone().into()]),
            None => opts,
        }
    };
    match url.ssl.unwrap_or(SslMode::Disable) {
        SslMode::Disable | SslMode::Allow | SslMode::Prefer => None,
        SslMode::Require => Some(SslOpts::default().with_danger_accept_invalid_certs(true)),
        SslMode::VerifyCa => Some(base().with_danger_skip_domain_validation(true)),
        SslMode::VerifyFull => Some(base()),
    }
}

impl MysqlDialect {
    pub async fn open(url: &ConnectionString, options: &SinkOptions) -> Result<MysqlDialect, SinkError> {
        let shown = url.redacted();
        // The driver reports an unreadable CA file as a failed connection: say what it is.
        if let Some(file) = &url.ssl_root_cert
            && let Err(e) = std::fs::read(file)
        {
            return Err(SinkError::refused(
                &shown,
                Refusal::NotAllowed,
                format!(
                    "cannot read sslrootcert {} ({e}); give a CA certificate file (PEM) you can read",
                    file.display()
                ),
            ));
        }
        let constraints = PoolConstraints::new(1, options.parallelism.max(1) + 1).expect("min <= max");
        let builder = OptsBuilder::default()
            .ip_or_hostname(url.host.clone().unwrap_or_else(|| "localhost".into()))
            .tcp_port(url.port_or_default())
            .user(url.user.clone())
            .pass(url.password.as_ref().map(|p| p.expose().to_string()))
            .db_name(Some(url.database.clone()))
            .setup(session(options.lock_timeout))
            // A peer that stops answering is noticed (and the work rolled back) within minutes.
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .ssl_opts(ssl_opts(url))
            .pool_opts(PoolOpts::default().with_constraints(constraints));
        let opts = Opts::from(builder);
        let pool = Pool::new(opts.clone());
        let mut conn = pool.get_conn().await.map_err(|e| connect_error(&shown, url, e))?;
        let version: String = conn
            .query_first("SELECT VERSION()")
            .await
            .map_err(|e| database_error(&shown, "reading the version", e))?
            .unwrap_or_default();
        let (local_infile, packet): (Option<i64>, Option<i64>) = conn
            .query_first("SELECT @@local_infile, @@max_allowed_packet")
            .await
            .map_err(|e| database_error(&shown, "reading the server settings", e))?
            .unwrap_or((None, None));
        let (charset, collation): (Option<String>, Option<String>) = conn
            .query_first("SELECT @@character_set_database, @@collation_database")
            .await
            .map_err(|e| database_error(&shown, "reading the collation", e))?
            .unwrap_or((None, None));
        if charset.as_deref() != Some("utf8mb4") || !collation.as_deref().unwrap_or_default().starts_with("utf8mb4_") {
            tracing::warn!(
                "{shown}: the database's character set is {charset:?} ({collation:?}); text outside it cannot be stored. \
                 Use utf8mb4 (ALTER DATABASE `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci)",
                url.database
            );
        }
        let sink = MysqlDialect {
            shown,
            database: url.database.clone(),
            pool,
            opts,
            lock_timeout: options.lock_timeout,
            flavor: Flavor::of_version(&version),
            non_finite: options.non_finite,
            local_infile: local_infile == Some(1),
            statement_budget: (packet.unwrap_or(4 << 20) as usize / 2).clamp(64 << 10, 16 << 20),
        };
        if !sink.local_infile && options.access == Access::Write {
            tracing::info!(
                "{}: the server forbids LOAD DATA LOCAL INFILE (local_infile = 0); loading with multi-row statements",
                sink.shown
            );
        }
        if options.access == Access::Write {
            protocol::prepared_alone(&sink, sink.prepare(&mut conn)).await?;
        }
        Ok(sink)
    }

    fn fail(&self, action: &str) -> impl Fn(mysql_async::Error) -> SinkError + '_ {
        let action = action.to_string();
        move |e| database_error(&self.shown, &action, e)
    }

    /// Commits when `result` is Ok, else rolls back.
    async fn end<T>(&self, c: &mut Conn, result: Result<T, SinkError>) -> Result<T, SinkError> {
        match result {
            Ok(v) => {
                c.query_drop("COMMIT").await.map_err(self.fail("committing"))?;
                Ok(v)
            }
            Err(e) => {
                let _ = c.query_drop("ROLLBACK").await;
                Err(e)
            }
        }
    }

    async fn exists(&self, c: &mut Conn, name: &str) -> Result<bool, SinkError> {
        let n: Option<i64> = c
            .exec_first(
                "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (name,),
            )
            .await
            .map_err(self.fail("reading the catalog"))?;
        Ok(n.unwrap_or(0) > 0)
    }

    /// Creates the bookkeeping tables with version 1 when missing (and our own), and refuses a
    /// database of another version; finishes any publish a crash interrupted.
    async fn prepare(&self, c: &mut Conn) -> Result<(), SinkError> {
        let sync = format!("{BOOKKEEPING_SCHEMA}__table_sync");
        if !self.exists(c, &sync).await? {
            for sql in bookkeeping_statements() {
                c.query_drop(&sql).await.map_err(|e| match &e {
                    mysql_async::Error::Server(s) if matches!(s.code, 1142 | 1044) => SinkError::refused(
                        &self.shown,
                        Refusal::NotAllowed,
                        format!(
                            "the user may not create tables in database {} ({}); grant CREATE, or have an administrator run the output of `dap ddl --dialect mysql`",
                            self.database, s.message
                        ),
                    ),
                    _ => database_error(&self.shown, "creating the bookkeeping tables", e),
                })?;
            }
        }
        let versions: Vec<i64> = c
            .query(format!("SELECT \"version\" FROM {}", bookkeeping_table("database_version")))
            .await
            .map_err(self.fail("reading the database version"))?;
        let stored = StoredVersion::of(&versions);
        let watermarks: Option<i64> = match stored {
            StoredVersion::Missing => c
                .query_first(format!("SELECT count(*) FROM {}", bookkeeping_table("table_sync")))
                .await
                .map_err(self.fail("reading the watermarks"))?,
            _ => None,
        };
        if let Some(why) = stored.refusal(
            "instructure_dap__database_version",
            "instructure_dap__table_sync",
            watermarks.unwrap_or(0) as u64,
        ) {
            return Err(SinkError::refused(&self.shown, Refusal::Incompatible, why));
        }
        if stored == StoredVersion::Missing {
            c.query_drop(version_statement()).await.map_err(self.fail("writing the database version"))?;
        }
        // Our own tables, created once (a sync issues no DDL at all when nothing changed).
        for (name, columns) in [
            (
                "checkpoints",
                "namespace varchar(64) NOT NULL, table_name varchar(64) NOT NULL, job_id varchar(255) NOT NULL, object varchar(512) NOT NULL, PRIMARY KEY (namespace, table_name, object)",
            ),
            (
                "publishing",
                "namespace varchar(64) NOT NULL, table_name varchar(64) NOT NULL, watermark varchar(40) NOT NULL, schema_version bigint NOT NULL, schema_description mediumtext NOT NULL, PRIMARY KEY (namespace, table_name)",
            ),
            (
                "watermarks",
                "namespace varchar(64) NOT NULL, table_name varchar(64) NOT NULL, watermark varchar(40) NOT NULL, PRIMARY KEY (namespace, table_name)",
            ),
            (
                "locks",
                "namespace varchar(64) NOT NULL, table_name varchar(64) NOT NULL, holder varchar(512) NOT NULL, PRIMARY KEY (namespace, table_name)",
            ),
        ] {
            if !self.exists(c, &format!("{OUR_SCHEMA}__{name}")).await? {
                c.query_drop(format!("CREATE TABLE IF NOT EXISTS {} ({columns})", our_table(name)))
                    .await
                    .map_err(self.fail(&format!("creating {OUR_SCHEMA}__{name}")))?;
            }
        }
        self.finish_interrupted_publishes(c).await
    }

    /// A publish interrupted between its `RENAME TABLE` and its bookkeeping row: the table is
    /// complete, so the row is written now; one interrupted before the rename is forgotten (its
    /// staging table is still there for the next initdb).
    async fn finish_interrupted_publishes(&self, c: &mut Conn) -> Result<(), SinkError> {
        let pending: Vec<(String, String, String, i64, String)> = c
            .query(format!(
                "SELECT namespace, table_name, watermark, schema_version, schema_description FROM {}",
                our_table("publishing")
            ))
            .await
            .map_err(self.fail("reading dap_replica__publishing"))?;
        for (ns, table, watermark, version, description) in pending {
            let staged = self.exists(c, &format!("{OUR_SCHEMA}__{ns}__{table}")).await?;
            let live = self.exists(c, &format!("{ns}__{table}")).await?;
            if !staged && live {
                let b = Bookkeeping {
                    namespace: ns.clone(),
                    table: table.clone(),
                    watermark: time::parse_rfc3339(&watermark).unwrap_or(0),
                    schema_version: u32::try_from(version).unwrap_or(0),
                    schema_description: description,
                };
                c.query_drop("START TRANSACTION").await.map_err(self.fail("starting a transaction"))?;
                let result = self.finish_publish(c, &b).await;
                self.end(c, result).await?;
                tracing::info!("{ns}.{table}: finished the publish a previous run was interrupted in");
            } else {
                c.exec_drop(
                    format!("DELETE FROM {} WHERE namespace = ? AND table_name = ?", our_table("publishing")),
                    (&ns, &table),
                )
                .await
                .map_err(self.fail("clearing dap_replica__publishing"))?;
            }
            let _ = c
                .query_drop(format!("DROP TABLE IF EXISTS {}", ident(&format!("{OUR_SCHEMA}__retired__{ns}__{table}"))))
                .await;
        }
        Ok(())
    }

    /// The bookkeeping row, the end of the publishing record and of the checkpoints, in the
    /// caller's transaction.
    async fn finish_publish(&self, c: &mut Conn, b: &Bookkeeping) -> Result<(), SinkError> {
        self.write_table_sync(c, b).await?;
        for table in ["publishing", "checkpoints"] {
            c.exec_drop(
                format!("DELETE FROM {} WHERE namespace = ? AND table_name = ?", our_table(table)),
                (&b.namespace, &b.table),
            )
            .await
            .map_err(self.fail("clearing our bookkeeping"))?;
        }
        Ok(())
    }

    /// The bookkeeping row (its `datetime` keeps whole seconds), and beside it, in our own table
    /// and the same transaction, the exact watermark: a sync then resumes from exactly where it
    /// stopped, and a replication knows exactly which mirror commit the target holds.
    async fn write_table_sync(&self, c: &mut Conn, b: &Bookkeeping) -> Result<(), SinkError> {
        c.exec_drop(
            format!("REPLACE INTO {} (namespace, table_name, watermark) VALUES (?, ?, ?)", our_table("watermarks")),
            (&b.namespace, &b.table, time::format_wire(b.watermark)),
        )
        .await
        .map_err(self.fail("recording the exact watermark"))?;
        let sync = bookkeeping_table("table_sync");
        // datetime has whole seconds: truncated, so the next `since` is never past a change.
        let whole = b.watermark - b.watermark.rem_euclid(MICROS_PER_SECOND);
        let fixed = time::format_fixed(whole);
        let ts = format!("{} {}", &fixed[..10], &fixed[11..19]);
        let id: Option<i64> = c
            .exec_first::<Option<i64>, _, _>(
                format!("SELECT min(id) FROM {sync} WHERE source_namespace = ? AND source_table = ?"),
                (&b.namespace, &b.table),
            )
            .await
            .map_err(self.fail("reading instructure_dap__table_sync"))?
            .flatten();
        match id {
            Some(id) => c
                .exec_drop(
                    format!("UPDATE {sync} SET \"timestamp\" = ?, schema_version = ?, schema_description = ? WHERE id = ?"),
                    (&ts, b.schema_version, &b.schema_description, id),
                )
                .await
                .map_err(self.fail("updating instructure_dap__table_sync"))?,
            None => c
                .exec_drop(
                    format!(
                        "INSERT INTO {sync} (source_namespace, source_table, \"timestamp\", schema_version, target_schema, target_table, schema_description_format, schema_description) VALUES (?, ?, ?, ?, ?, ?, 'json', ?)"
                    ),
                    (&b.namespace, &b.table, &ts, b.schema_version, &b.namespace, &b.table, &b.schema_description),
                )
                .await
                .map_err(self.fail("writing instructure_dap__table_sync"))?,
        }
        Ok(())
    }

    /// The stored rows of `table_sync`, each with the exact watermark kept beside it when it
    /// still matches (another client that synced since wrote only `table_sync`).
    async fn stored_rows(
        &self,
        c: &mut Conn,
        namespace: &str,
        table: Option<&str>,
    ) -> Result<Vec<StoredBookkeeping>, SinkError> {
        if !self.exists(c, &format!("{BOOKKEEPING_SCHEMA}__table_sync")).await? {
            return Ok(Vec::new());
        }
        let exact_known = self.exists(c, &format!("{OUR_SCHEMA}__watermarks")).await?;
        let exact = if exact_known {
            format!(
                "(SELECT w.watermark FROM {} w WHERE w.namespace = s.source_namespace AND w.table_name = s.source_table)",
                our_table("watermarks")
            )
        } else {
            "NULL".to_string()
        };
        let rows: Vec<StoredRow> = c
            .exec(
                format!(
                    "SELECT source_namespace, source_table, DATE_FORMAT(\"timestamp\", '%Y-%m-%dT%H:%i:%sZ'), schema_version, schema_description, {exact}
                     FROM {} s WHERE source_namespace = ? AND (? IS NULL OR source_table = ?) ORDER BY source_table, id",
                    bookkeeping_table("table_sync")
                ),
                (namespace, table, table),
            )
            .await
            .map_err(self.fail("reading instructure_dap__table_sync"))?;
        Ok(rows
            .into_iter()
            .map(|(ns, t, ts, version, description, exact)| {
                let ts = ts.unwrap_or_default();
                let watermark = time::parse_rfc3339(&ts).map_err(|_| ts.clone()).map(|stored| {
                    // The exact watermark counts only while table_sync still holds it truncated.
                    match exact.and_then(|e| time::parse_rfc3339(&e).ok()) {
                        Some(e) if e - e.rem_euclid(MICROS_PER_SECOND) == stored => e,
                        _ => stored,
                    }
                });
                StoredBookkeeping {
                    namespace: ns,
                    table: t,
                    watermark,
                    schema_version: version,
                    schema_description: description,
                }
            })
            .collect())
    }

    /// Streams records into `table` with `LOAD DATA LOCAL INFILE … REPLACE` (the later of two
    /// rows with one key wins), or with multi-row `REPLACE` statements when the server forbids
    /// local files, until the pump's span ends. Changes carry their action first. Any warning is
    /// an error.
    async fn load_into(
        &self,
        c: &mut Conn,
        def: &TableDef,
        table: &str,
        with_action: bool,
        rows: &mut Pump<'_>,
    ) -> Result<(), SinkError> {
        if !self.local_infile {
            return self.insert_into(c, def, table, with_action, rows).await;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        c.set_infile_handler(async move { Ok(stream.boxed()) });
        let (list, set) = load_columns(def, with_action);
        let sql = format!(
            "LOAD DATA LOCAL INFILE 'dap-feed' REPLACE INTO TABLE {table} CHARACTER SET utf8mb4 \
             FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' LINES TERMINATED BY '\\n' ({list}){set}"
        );
        let non_finite = self.non_finite;
        let encoder = async move {
            let mut buf = Vec::with_capacity(CHUNK * 2);
            loop {
                let batch = match rows.next_batch().await {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other("the source stopped"))).await;
                        return Err(SinkError::from(e));
                    }
                };
                for r in &batch {
                    if let Err(bad) = encode_record(def, r, with_action, Form::LoadField, non_finite, &mut buf) {
                        let _ = tx.send(Err(std::io::Error::other("a value cannot be stored"))).await;
                        return Err(self.non_finite_error(def, r, bad));
                    }
                    if buf.len() >= CHUNK {
                        let chunk = Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK * 2)));
                        if tx.send(Ok(chunk)).await.is_err() {
                            return Err(SinkError::FeedAborted);
                        }
                    }
                }
            }
            if !buf.is_empty() && tx.send(Ok(Bytes::from(buf))).await.is_err() {
                return Err(SinkError::FeedAborted);
            }
            Ok(())
        };
        let (loaded, encoded) = tokio::join!(c.query_drop(&sql), encoder);
        encoded?;
        loaded.map_err(self.fail(&format!("loading rows into {table}")))?;
        self.check_warnings(c, table).await
    }

    /// The fallback without local files: multi-row `REPLACE` statements under the packet size.
    async fn insert_into(
        &self,
        c: &mut Conn,
        def: &TableDef,
        table: &str,
        with_action: bool,
        rows: &mut Pump<'_>,
    ) -> Result<(), SinkError> {
        let mut columns: Vec<String> = def.columns().map(|c| ident(&c.name)).collect();
        if with_action {
            columns.insert(0, ident("_dap_action"));
        }
        let head = format!("REPLACE INTO {table} ({}) VALUES ", columns.join(", "));
        let mut sql = head.clone().into_bytes();
        let take = |sql: &mut Vec<u8>| {
            String::from_utf8(std::mem::replace(sql, head.clone().into_bytes())).expect("UTF-8 SQL")
        };
        while let Some(batch) = rows.next_batch().await? {
            for r in &batch {
                if sql.len() > head.len() {
                    sql.push(b',');
                }
                sql.push(b'(');
                if let Err(bad) = encode_record(def, r, with_action, Form::Literal, self.non_finite, &mut sql) {
                    return Err(self.non_finite_error(def, r, bad));
                }
                sql.push(b')');
                if sql.len() >= self.statement_budget {
                    c.query_drop(take(&mut sql)).await.map_err(self.fail(&format!("inserting rows into {table}")))?;
                    self.check_warnings(c, table).await?;
                }
            }
        }
        if sql.len() > head.len() {
            c.query_drop(take(&mut sql)).await.map_err(self.fail(&format!("inserting rows into {table}")))?;
            self.check_warnings(c, table).await?;
        }
        Ok(())
    }

    fn non_finite_error(&self, def: &TableDef, r: &Record, bad: NonFiniteValue) -> SinkError {
        SinkError::non_finite(&self.shown, "MySQL", def, &r.key, &bad.column, bad.value, self.non_finite)
    }

    /// MySQL reports rows it changed or skipped on a load as warnings: each is an error here.
    async fn check_warnings(&self, c: &mut Conn, table: &str) -> Result<(), SinkError> {
        if c.get_warnings() == 0 {
            return Ok(());
        }
        let warnings: Vec<(String, i64, String)> =
            c.query("SHOW WARNINGS LIMIT 5").await.map_err(self.fail("reading the load's warnings"))?;
        let text: Vec<String> =
            warnings.into_iter().map(|(level, code, message)| format!("{level} {code}: {message}")).collect();
        Err(SinkError::refused(
            &self.shown,
            Refusal::Input,
            format!("loading {table} gave warnings, so the load was rolled back: {}", text.join("; ")),
        ))
    }

    /// The column definitions and indexes a user added to a live table, to carry over to its
    /// replacement.
    async fn user_additions(&self, c: &mut Conn, def: &TableDef) -> Result<(Vec<String>, Vec<String>), SinkError> {
        let live = format!("{}__{}", def.namespace, def.name);
        let columns: Vec<(String, String, String, Option<String>, String)> = c
            .exec(
                "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT, COLUMN_COMMENT FROM information_schema.COLUMNS
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (&live,),
            )
            .await
            .map_err(self.fail("reading the table's columns"))?;
        let added: Vec<String> = columns
            .into_iter()
            .filter(|(name, ..)| !def.columns().any(|col| &col.name == name))
            .map(|(name, ty, nullable, default, comment)| {
                let mut sql = format!("ADD COLUMN {} {ty}", ident(&name));
                if nullable == "NO" {
                    sql.push_str(" NOT NULL");
                }
                if let Some(d) = default {
                    sql.push_str(&format!(" DEFAULT {d}"));
                }
                if !comment.is_empty() {
                    sql.push_str(&format!(" COMMENT {}", literal(&comment)));
                }
                sql
            })
            .collect();
        let indexes: Vec<(String, i64, String)> = c
            .exec(
                "SELECT INDEX_NAME, NON_UNIQUE, GROUP_CONCAT(CONCAT('\"', COLUMN_NAME, '\"') ORDER BY SEQ_IN_INDEX) FROM information_schema.STATISTICS
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME <> 'PRIMARY' GROUP BY INDEX_NAME, NON_UNIQUE",
                (&live,),
            )
            .await
            .map_err(self.fail("reading the table's indexes"))?;
        let indexes = indexes
            .into_iter()
            .map(|(name, non_unique, cols)| {
                format!("ADD {}INDEX {} ({cols})", if non_unique == 0 { "UNIQUE " } else { "" }, ident(&name))
            })
            .collect();
        Ok((added, indexes))
    }

    /// The DDL of a delta, each statement one a rerun may repeat (MySQL commits DDL at once).
    async fn apply_delta(&self, c: &mut Conn, def: &TableDef, delta: &SchemaDelta) -> Result<(), SinkError> {
        let table = table_name(&def.namespace, &def.name);
        let live = format!("{}__{}", def.namespace, def.name);
        for change in &delta.changes {
            let sql = match change {
                Change::Add(col) => {
                    if self.flavor == Flavor::Mysql {
                        let present: Option<i64> = c
                            .exec_first(
                                "SELECT count(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
                                (&live, &col.name),
                            )
                            .await
                            .map_err(self.fail("reading the table's columns"))?;
                        if present.unwrap_or(0) > 0 {
                            continue;
                        }
                    }
                    self.flavor.add_column(&table, &column_sql(col))
                }
                Change::Widen { column, from } => {
                    let before = Column { ty: from.clone(), ..column.clone() };
                    if column_type(&before) == column_type(column) {
                        continue; // a new member of a nested object: the column is JSON either way
                    }
                    format!("ALTER TABLE {table} MODIFY COLUMN {}", column_sql(column))
                }
                Change::Retype { column, .. } => format!("ALTER TABLE {table} MODIFY COLUMN {}", column_sql(column)),
                Change::DropNotNull(name) | Change::SetNotNull(name) => {
                    let column = def.columns().find(|c| &c.name == name).cloned().unwrap_or(Column {
                        name: name.clone(),
                        ty: ColumnType::Str { max_length: None, truncatable: false },
                        required: false,
                        comment: None,
                    });
                    if let Change::SetNotNull(_) = change {
                        let nulls: Option<i64> = c
                            .query_first(format!("SELECT count(*) FROM {table} WHERE {} IS NULL", ident(name)))
                            .await
                            .map_err(self.fail(&format!("checking {name} for NULLs")))?;
                        if nulls.unwrap_or(0) > 0 {
                            return Err(SinkError::required_over_nulls(
                                &self.shown,
                                def,
                                name,
                                nulls.map(|n| n as u64),
                            ));
                        }
                    }
                    format!("ALTER TABLE {table} MODIFY COLUMN {}", column_sql(&column))
                }
            };
            c.query_drop(&sql).await.map_err(self.fail(&format!("changing the schema of {}", def.name)))?;
        }
        Ok(())
    }
}

/// Appends a record as one load line (or an INSERT's values): optionally its action, then the
/// key and value columns.
fn encode_record(
    def: &TableDef,
    r: &Record,
    with_action: bool,
    form: Form,
    non_finite: NonFinite,
    out: &mut Vec<u8>,
) -> Result<(), NonFiniteValue> {
    let sep: &[u8] = if form == Form::LoadField { b"\t" } else { b"," };
    if with_action {
        let action = if r.action == Some('D') { "D" } else { "U" };
        match form {
            Form::LoadField => out.extend_from_slice(action.as_bytes()),
            Form::Literal => out.extend_from_slice(format!("'{action}'").as_bytes()),
        }
        out.extend_from_slice(sep);
    }
    encode(&r.key, &def.key, form, non_finite, out)?;
    for (v, c) in r.values.iter().zip(&def.values) {
        out.extend_from_slice(sep);
        // A deleted row's values are NULL and never stored: nothing to refuse there.
        let policy = if r.action == Some('D') { NonFinite::Null } else { non_finite };
        encode(v, c, form, policy, out)?;
    }
    if form == Form::LoadField {
        out.push(b'\n');
    }
    Ok(())
}

/// A row of `table_sync` as read back: namespace, table, watermark (to the second), schema
/// version and description, and our exact watermark when we keep one.
type StoredRow = (String, String, Option<String>, i64, String, Option<String>);

/// A session holding `GET_LOCK` locks: a connection of its own, outside the pool.
pub struct MysqlLockSession {
    conn: Conn,
}

#[async_trait::async_trait]
impl Dialect for MysqlDialect {
    type Conn = Conn;
    type LockSession = MysqlLockSession;

    fn target(&self) -> &str {
        &self.shown
    }

    fn table_sql(&self, namespace: &str, table: &str) -> String {
        table_name(namespace, table)
    }

    fn bookkeeping_name(&self) -> &'static str {
        "instructure_dap__table_sync"
    }

    fn staging_keeps(&self) -> Staged {
        Staged::LatestPerKey
    }

    fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    async fn connect(&self) -> Result<Conn, SinkError> {
        self.pool.get_conn().await.map_err(self.fail("connecting"))
    }

    /// A pooled connection goes back to the pool when dropped.
    fn release(&self, _conn: Conn) {}

    async fn begin(&self, c: &mut Conn) -> Result<(), SinkError> {
        c.query_drop("START TRANSACTION").await.map_err(self.fail("starting a transaction"))
    }

    async fn commit(&self, c: &mut Conn) -> Result<(), SinkError> {
        c.query_drop("COMMIT").await.map_err(self.fail("committing"))
    }

    async fn stored_bookkeeping(
        &self,
        c: &mut Conn,
        namespace: &str,
        table: Option<&str>,
    ) -> Result<Vec<StoredBookkeeping>, SinkError> {
        self.stored_rows(c, namespace, table).await
    }

    async fn write_bookkeeping(&self, c: &mut Conn, b: &Bookkeeping) -> Result<(), SinkError> {
        self.write_table_sync(c, b).await
    }

    async fn row_count(&self, c: &mut Conn, namespace: &str, table: &str) -> Result<u64, SinkError> {
        let n: Option<u64> = c
            .query_first(format!("SELECT count(*) FROM {}", table_name(namespace, table)))
            .await
            .map_err(self.fail(&format!("counting {namespace}.{table}")))?;
        Ok(n.unwrap_or(0))
    }

    async fn table_exists(&self, c: &mut Conn, namespace: &str, table: &str) -> Result<bool, SinkError> {
        self.exists(c, &format!("{namespace}__{table}")).await
    }

    async fn column_names(&self, c: &mut Conn, namespace: &str, table: &str) -> Result<Vec<String>, SinkError> {
        c.exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (format!("{namespace}__{table}"),),
        )
        .await
        .map_err(self.fail("reading the table's columns"))
    }

    async fn checkpoints(&self, c: &mut Conn, def: &TableDef) -> Result<Vec<(String, String)>, SinkError> {
        c.exec(
            format!("SELECT job_id, object FROM {} WHERE namespace = ? AND table_name = ?", our_table("checkpoints")),
            (&def.namespace, &def.name),
        )
        .await
        .map_err(self.fail("reading checkpoints"))
    }

    async fn checkpoint_counts(&self, c: &mut Conn, namespace: &str) -> Result<Vec<(String, u64)>, SinkError> {
        if !self.exists(c, &format!("{OUR_SCHEMA}__checkpoints")).await? {
            return Ok(Vec::new());
        }
        c.exec(
            format!(
                "SELECT table_name, count(*) FROM {} WHERE namespace = ? GROUP BY table_name ORDER BY table_name",
                our_table("checkpoints")
            ),
            (namespace,),
        )
        .await
        .map_err(self.fail("reading checkpoints"))
    }

    async fn staging_exists(&self, c: &mut Conn, def: &TableDef) -> Result<bool, SinkError> {
        self.exists(c, &format!("{OUR_SCHEMA}__{}__{}", def.namespace, def.name)).await
    }

    async fn create_staging(&self, c: &mut Conn, def: &TableDef) -> Result<(), SinkError> {
        self.drop_staging(c, def).await?;
        c.query_drop(create_table_sql(&staging_name(def), def))
            .await
            .map_err(self.fail(&format!("creating the staging table of {}", def.name)))
    }

    async fn drop_staging(&self, c: &mut Conn, def: &TableDef) -> Result<(), SinkError> {
        c.exec_drop(
            format!("DELETE FROM {} WHERE namespace = ? AND table_name = ?", our_table("checkpoints")),
            (&def.namespace, &def.name),
        )
        .await
        .map_err(self.fail("clearing checkpoints"))?;
        c.query_drop(format!("DROP TABLE IF EXISTS {}", staging_name(def)))
            .await
            .map_err(self.fail(&format!("dropping the staging table of {}", def.name)))
    }

    async fn load_part(&self, c: &mut Conn, def: &TableDef, rows: &mut Pump<'_>) -> Result<(), SinkError> {
        self.load_into(c, def, &staging_name(def), false, rows).await
    }

    async fn record_checkpoint(&self, c: &mut Conn, def: &TableDef, job: &str, part: &str) -> Result<(), SinkError> {
        c.exec_drop(
            format!(
                "REPLACE INTO {} (namespace, table_name, job_id, object) VALUES (?, ?, ?, ?)",
                our_table("checkpoints")
            ),
            (&def.namespace, &def.name, job, part),
        )
        .await
        .map_err(self.fail("recording a checkpoint"))
    }

    async fn staged_rows(&self, c: &mut Conn, def: &TableDef) -> Result<u64, SinkError> {
        let n: Option<u64> = c
            .query_first(format!("SELECT count(*) FROM {}", staging_name(def)))
            .await
            .map_err(self.fail(&format!("counting the staged rows of {}", def.name)))?;
        Ok(n.unwrap_or(0))
    }

    async fn publish(
        &self,
        c: &mut Conn,
        def: &TableDef,
        delta: &SchemaDelta,
        b: &Bookkeeping,
    ) -> Result<(), SinkError> {
        let live = table_name(&def.namespace, &def.name);
        let staging = staging_name(def);
        let replacing = self.exists(c, &format!("{}__{}", def.namespace, def.name)).await?;
        if replacing {
            // The replacement takes over what the user added to the table it replaces.
            let (columns, indexes) = self.user_additions(c, def).await?;
            for sql in columns.iter().chain(&indexes) {
                c.query_drop(format!("ALTER TABLE {staging} {sql}"))
                    .await
                    .map_err(self.fail(&format!("carrying your columns and indexes over to {}", def.name)))?;
            }
        }
        let shared: Vec<String> = shared_columns(def, delta).map(ident).collect();
        if replacing
            && let Some(sql) = Replaces::of(def).carry_over_sql(&live, &staging, &ident(&def.key.name), &shared)
        {
            c.query_drop(sql).await.map_err(self.fail(&format!("keeping the older rows of {}", def.name)))?;
        }
        // Recorded before the swap, so that a run after a crash between the swap and the
        // bookkeeping row completes the publish.
        c.exec_drop(
            format!(
                "REPLACE INTO {} (namespace, table_name, watermark, schema_version, schema_description) VALUES (?, ?, ?, ?, ?)",
                our_table("publishing")
            ),
            (&def.namespace, &def.name, time::format_wire(b.watermark), b.schema_version, &b.schema_description),
        )
        .await
        .map_err(self.fail("recording the publish"))?;
        let rename = if replacing {
            format!("RENAME TABLE {live} TO {}, {staging} TO {live}", retired_name(def))
        } else {
            format!("RENAME TABLE {staging} TO {live}")
        };
        c.query_drop(&rename).await.map_err(self.fail(&format!("swapping in {}", def.name)))?;
        self.begin(c).await?;
        self.finish_publish(c, b).await?;
        self.commit(c).await?;
        if replacing {
            c.query_drop(format!("DROP TABLE IF EXISTS {}", retired_name(def)))
                .await
                .map_err(self.fail(&format!("dropping the replaced {}", def.name)))?;
        }
        Ok(())
    }

    async fn apply_changes(
        &self,
        c: &mut Conn,
        def: &TableDef,
        delta: &SchemaDelta,
        rows: &mut Pump<'_>,
        b: &Bookkeeping,
    ) -> Result<(), SinkError> {
        self.apply_delta(c, def, delta).await?;
        let table = table_name(&def.namespace, &def.name);
        // Keyed by the table's key: a later record of a key replaces the earlier one as it loads.
        let mut columns: Vec<String> = vec!["\"_dap_action\" char(1) NOT NULL".into()];
        columns.extend(def.columns().map(|col| format!("{} {}", ident(&col.name), column_type(col))));
        c.query_drop("DROP TEMPORARY TABLE IF EXISTS \"_dap_changes\"")
            .await
            .map_err(self.fail("dropping a temporary table"))?;
        c.query_drop(format!(
            "CREATE TEMPORARY TABLE \"_dap_changes\" ({}, PRIMARY KEY ({})) ENGINE = InnoDB",
            columns.join(", "),
            ident(&def.key.name)
        ))
        .await
        .map_err(self.fail("creating a temporary table"))?;
        self.begin(c).await?;
        self.load_into(c, def, "\"_dap_changes\"", true, rows).await?;
        let names: Vec<String> = def.columns().map(|col| ident(&col.name)).collect();
        let values: Vec<String> = def.values.iter().map(|col| ident(&col.name)).collect();
        let upsert = self.flavor.upsert(&table, &names, &values, "\"_dap_changes\" WHERE \"_dap_action\" = 'U'");
        c.query_drop(&upsert).await.map_err(self.fail(&format!("applying the changes to {}", def.name)))?;
        let key = ident(&def.key.name);
        c.query_drop(format!(
            "DELETE t FROM {table} t JOIN \"_dap_changes\" d ON t.{key} = d.{key} WHERE d.\"_dap_action\" = 'D'"
        ))
        .await
        .map_err(self.fail(&format!("deleting from {}", def.name)))?;
        self.write_table_sync(c, b).await?;
        self.commit(c).await?;
        c.query_drop("DROP TEMPORARY TABLE IF EXISTS \"_dap_changes\"")
            .await
            .map_err(self.fail("dropping a temporary table"))
    }

    async fn drop_table(&self, c: &mut Conn, namespace: &str, table: &str) -> Result<bool, SinkError> {
        let removed = c
            .exec_iter(
                format!(
                    "DELETE FROM {} WHERE source_namespace = ? AND source_table = ?",
                    bookkeeping_table("table_sync")
                ),
                (namespace, table),
            )
            .await
            .map_err(self.fail("removing the bookkeeping row"))?
            .affected_rows();
        if removed > 0 {
            c.query_drop(format!("DROP TABLE IF EXISTS {}", table_name(namespace, table)))
                .await
                .map_err(self.fail(&format!("dropping {namespace}.{table}")))?;
            c.exec_drop(
                format!("DELETE FROM {} WHERE namespace = ? AND table_name = ?", our_table("watermarks")),
                (namespace, table),
            )
            .await
            .map_err(self.fail("removing the exact watermark"))?;
        }
        Ok(removed > 0)
    }

    async fn latest_version_change(
        &self,
        c: &mut Conn,
        namespace: &str,
        history: &str,
    ) -> Result<Option<time::Micros>, SinkError> {
        let table = table_name(namespace, history);
        let text: Option<Option<String>> = c
            .query_first(format!("SELECT CAST({} AS CHAR) FROM {table}", latest_change_sql(ident)))
            .await
            .map_err(self.fail(&format!("reading {namespace}.{history}")))?;
        latest_change_of(&self.shown, &table, text.flatten())
    }

    async fn replace_versions(
        &self,
        c: &mut Conn,
        versions: &TableDef,
        load: VersionLoad,
        rows: &mut Pump<'_>,
    ) -> Result<(), SinkError> {
        let name = history_name(&versions.name);
        let history = table_name(&versions.namespace, &name);
        let writing = format!("writing {}.{name}", versions.namespace);
        // DDL commits at once here: the table is made before the transaction, so a crash in
        // between leaves it empty, which the next run (finding no versions) makes whole again.
        let mut ddl = Vec::new();
        if load.scope == VersionScope::Whole {
            ddl.push(format!("DROP TABLE IF EXISTS {history}"));
            ddl.extend(history_table_statements(&history, &name, versions, ident, column_type));
        }
        let scratch: Vec<String> =
            versions.columns().map(|col| format!("{} {}", ident(&col.name), column_type(col))).collect();
        ddl.push("DROP TEMPORARY TABLE IF EXISTS \"_dap_versions\"".into());
        ddl.push(format!("CREATE TEMPORARY TABLE \"_dap_versions\" ({}) ENGINE = InnoDB", scratch.join(", ")));
        for statement in ddl {
            c.query_drop(statement).await.map_err(self.fail(&writing))?;
        }
        self.begin(c).await?;
        self.load_into(c, versions, "\"_dap_versions\"", false, rows).await?;
        for statement in history_load_statements(&history, "\"_dap_versions\"", versions, ident, load) {
            c.query_drop(statement).await.map_err(self.fail(&writing))?;
        }
        self.commit(c).await?;
        c.query_drop("DROP TEMPORARY TABLE IF EXISTS \"_dap_versions\"").await.map_err(self.fail(&writing))
    }

    async fn lock_session(&self) -> Result<MysqlLockSession, SinkError> {
        let conn = Conn::new(self.opts.clone()).await.map_err(self.fail("connecting for a table lock"))?;
        Ok(MysqlLockSession { conn })
    }

    async fn try_lock(&self, s: &mut MysqlLockSession, namespace: &str, table: &str) -> Result<bool, SinkError> {
        let got: Option<Option<i64>> = s
            .conn
            .exec_first("SELECT GET_LOCK(?, 0)", (lock_name(&self.database, namespace, table),))
            .await
            .map_err(self.fail(&format!("taking the lock of {namespace}.{table}")))?;
        Ok(got.flatten() == Some(1))
    }

    async fn write_holder(
        &self,
        s: &mut MysqlLockSession,
        namespace: &str,
        table: &str,
        holder: &str,
    ) -> Result<(), SinkError> {
        s.conn
            .exec_drop(
                format!("REPLACE INTO {} (namespace, table_name, holder) VALUES (?, ?, ?)", our_table("locks")),
                (namespace, table, holder),
            )
            .await
            .map_err(self.fail("recording who holds a table's lock"))
    }

    async fn read_holder(
        &self,
        s: &mut MysqlLockSession,
        namespace: &str,
        table: &str,
    ) -> Result<Option<String>, SinkError> {
        s.conn
            .exec_first(
                format!("SELECT holder FROM {} WHERE namespace = ? AND table_name = ?", our_table("locks")),
                (namespace, table),
            )
            .await
            .map_err(self.fail("reading who holds a table's lock"))
    }
}

impl Drop for MysqlDialect {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = pool.disconnect().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_and_mysql_upserts_differ_in_one_place() {
        let cols = vec!["\"id\"".to_string(), "\"name\"".to_string()];
        let vals = vec!["\"name\"".to_string()];
        let m = Flavor::of_version("10.11.19-MariaDB-0+deb12u1");
        assert_eq!(m, Flavor::MariaDb);
        assert_eq!(
            m.upsert("\"t\"", &cols, &vals, "s"),
            "INSERT INTO \"t\" (\"id\", \"name\") SELECT \"id\", \"name\" FROM s ON DUPLICATE KEY UPDATE \"name\" = VALUES(\"name\")"
        );
        let y = Flavor::of_version("8.0.36");
        assert_eq!(y, Flavor::Mysql);
        assert_eq!(
            y.upsert("\"t\"", &cols, &vals, "s"),
            "INSERT INTO \"t\" (\"id\", \"name\") SELECT * FROM (SELECT \"id\", \"name\" FROM s) AS new ON DUPLICATE KEY UPDATE \"name\" = new.\"name\""
        );
        assert_eq!(m.add_column("\"t\"", "\"c\" int"), "ALTER TABLE \"t\" ADD COLUMN IF NOT EXISTS \"c\" int");
        assert_eq!(y.add_column("\"t\"", "\"c\" int"), "ALTER TABLE \"t\" ADD COLUMN \"c\" int");
    }

    #[test]
    fn load_fields_escape_and_truncate() {
        let c = Column { name: "x".into(), ty: ColumnType::Timestamp, required: false, comment: None };
        let mut out = Vec::new();
        encode(&Value::Timestamp(1_714_564_800_999_999), &c, Form::LoadField, NonFinite::Refuse, &mut out).ok();
        assert_eq!(out, b"2024-05-01 12:00:00", "the fraction is cut, never rounded up");
        let mut out = Vec::new();
        let s = Column { ty: ColumnType::Str { max_length: None, truncatable: false }, ..c.clone() };
        encode(&Value::Str("a\tb\\c\nd\0".into()), &s, Form::LoadField, NonFinite::Refuse, &mut out).ok();
        assert_eq!(out, b"a\\tb\\\\c\\nd\\0");
        let f = Column { ty: ColumnType::Float(64), ..c };
        assert!(encode(&Value::Float(f64::NAN), &f, Form::LoadField, NonFinite::Refuse, &mut Vec::new()).is_err());
        let mut out = Vec::new();
        encode(&Value::Float(f64::INFINITY), &f, Form::LoadField, NonFinite::Null, &mut out).ok();
        assert_eq!(out, b"\\N");
    }
}
