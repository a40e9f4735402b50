//! SQL Server, in the official client's layout (spec §4.5-§4.7, §5.2): tables `"ns"."table"`,
//! `varchar(4n)` (a UTF-8 byte budget) or `varchar(max)`, `datetime2`, `bit`, `binary(16)` UUIDs
//! in RFC byte order and packed IPs, JSON as `varchar(max)` text, enum columns as `integer` ids
//! into lookup tables `"ns"."table__col"` (IDENTITY `id`, UNIQUE `value`) with their foreign
//! key, no comments, and `"instructure_dap"."table_sync"` with `varchar(256)` names.
//!
//! Bulk path, through the `tiberius` client: rows go by TDS bulk load into a staging table of our
//! own (`"dap_replica"."ns__table"`, text as NVARCHAR, or NTEXT where it is unbounded, so every
//! character survives whatever the database's collation; a sequence column so the last of a
//! repeated key wins). initdb loads
//! snapshot parts there (each part with its checkpoint in one transaction), then publishes in one
//! transaction: the enum values are MERGEd into the lookup tables, and the rows inserted with
//! their ids by one set-based `INSERT … SELECT` joined to the lookups, with the bookkeeping row.
//! A table that already exists (a re-snapshot) keeps its object (and the user's views, indexes
//! and grants on it): its rows are replaced in the same transaction. syncdb bulk-loads the
//! changes into a scratch table, then in one transaction applies the schema delta, MERGEs the
//! upserts and deletes by join, and writes the watermark. No statement runs per row, and the
//! driver's command timeout is off: a long MERGE is not cut short.
//!
//! Strings are read back as NVARCHAR (`tiberius` decodes `varchar` by code page, not UTF-8).
//! NaN and ±infinity have no SQL Server form: refused, naming the row, or NULL with
//! `--non-finite null`. The database's collation is checked as the official client does: one
//! that is not `_UTF8` gets a warning, since `varchar` then keeps only its code page.

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::Duration;

use tiberius::{AuthMethod, Client, ColumnData, Config, EncryptionLevel, TokenRow};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use super::layout::{self, BOOKKEEPING_SCHEMA, DATABASE_VERSION, OUR_SCHEMA, StoredVersion, SyncColumnKind};
use super::protocol::{
    self, Dialect, Provision, Replaces, Staged, StoredBookkeeping, history_load_statements, history_table_statements,
    lock_name,
};
use super::{
    Access, Bookkeeping, ConnectionString, NonFinite, Refusal, SinkError, SinkOptions, SslMode, VersionLoad,
    VersionScope,
};
use crate::decode::Record;
use crate::error::Retry;
use crate::feed::Pump;
pub use crate::feed::Span;
use crate::schema::delta::{Change, SchemaDelta};
use crate::schema::versions::{VALID_FROM, VALID_TO, history_name};
use crate::schema::{Column, ColumnType, TableDef};
use crate::time::{self, MICROS_PER_DAY, Micros};
use crate::value::Value;

type Conn = Client<Compat<TcpStream>>;

#[async_trait::async_trait]
impl Provision for MssqlDialect {
    async fn open(url: &ConnectionString, options: &SinkOptions) -> Result<Self, SinkError> {
        MssqlDialect::open(url, options).await
    }

    fn bookkeeping_statements() -> Vec<String> {
        bookkeeping_statements()
    }

    fn version_statements() -> Vec<String> {
        version_statements()
    }

    /// sqlcmd starts with `QUOTED_IDENTIFIER OFF` (its `-I` turns it on); the layout quotes
    /// names with `"`.
    fn script_preamble() -> Vec<String> {
        SESSION.split("; ").filter(|s| !s.contains("XACT_ABORT")).map(String::from).collect()
    }

    fn table_statements(def: &TableDef) -> Vec<String> {
        table_statements(def)
    }
}

/// Stores version 1 in the identity column.
fn version_statements() -> Vec<String> {
    let version = bookkeeping_table("database_version");
    vec![
        format!("SET IDENTITY_INSERT {version} ON"),
        format!("INSERT INTO {version} (\"version\") VALUES ({DATABASE_VERSION})"),
        format!("SET IDENTITY_INSERT {version} OFF"),
    ]
}

/// Days from 0001-01-01 (day 0 of `date` and `datetime2`) to 1970-01-01.
const DAYS_BEFORE_UNIX_EPOCH: i64 = 719_162;
/// The last day `date` holds: 9999-12-31.
const LAST_DAY: i64 = 3_652_058;
/// The largest TDS packet SQL Server negotiates: fewer, fuller packets for bulk loads.
const PACKET_SIZE: u32 = 32_767;
/// The session every connection runs in: quoted identifiers (the layout quotes with `"`), and
/// an error aborts the whole transaction, so a failed publish or sync leaves nothing behind.
const SESSION: &str = "SET QUOTED_IDENTIFIER ON; SET ANSI_NULLS ON; SET XACT_ABORT ON";

/// A SQL Server database as the load protocol drives it.
pub struct MssqlDialect {
    shown: String,
    database: String,
    config: Config,
    idle: Mutex<Vec<Conn>>,
    non_finite: NonFinite,
    lock_timeout: Duration,
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A name for `tiberius`' bulk load, which takes `[schema].[table]`.
fn bracketed(schema: &str, table: &str) -> String {
    format!("[{}].[{}]", schema.replace(']', "]]"), table.replace(']', "]]"))
}

/// An NVARCHAR literal: `N'…'` with `'` doubled.
fn literal(s: &str) -> String {
    format!("N'{}'", s.replace('\'', "''"))
}

pub fn table_name(namespace: &str, table: &str) -> String {
    format!("{}.{}", ident(namespace), ident(table))
}

/// The lookup table of an enum column: `"ns"."table__col"`.
fn lookup_name(def: &TableDef, enum_name: &str) -> String {
    table_name(&def.namespace, enum_name)
}

fn staging_table(def: &TableDef) -> String {
    format!("{}__{}", def.namespace, def.name)
}

/// Forgets the parts a staging table had recorded, so a new staging starts clean.
fn forget_checkpoints_sql(def: &TableDef) -> String {
    format!(
        "DELETE FROM {} WHERE \"namespace\" = {} AND \"table_name\" = {}",
        ours("checkpoints"),
        literal(&def.namespace),
        literal(&def.name)
    )
}

fn changes_table(def: &TableDef) -> String {
    format!("{}__{}__changes", def.namespace, def.name)
}

fn ours(name: &str) -> String {
    table_name(OUR_SCHEMA, name)
}

fn bookkeeping_table(name: &str) -> String {
    table_name(BOOKKEEPING_SCHEMA, name)
}

/// `IF NOT EXISTS (…) EXEC('CREATE SCHEMA …')`, as the official client creates schemas.
fn create_schema_sql(schema: &str) -> String {
    format!(
        "IF NOT EXISTS ( SELECT * FROM sys.schemas WHERE name = {} ) EXEC('CREATE SCHEMA {}')",
        literal(schema),
        ident(schema).replace('\'', "''")
    )
}

/// The column type, as the official client's generator writes it for SQL Server (spec §4.5).
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
            ColumnType::Bool => "bit".into(),
            // maxLength counts characters; a UTF-8 character takes up to four bytes.
            ColumnType::Str { max_length: Some(n), .. } if *n as u64 * 4 <= 8000 => format!("varchar({})", n * 4),
            ColumnType::Str { .. } => "varchar(max)".into(),
            ColumnType::Enum(_) => "integer".into(),
            ColumnType::Timestamp => "datetime2".into(),
            ColumnType::Date => "date".into(),
            ColumnType::Time => "time".into(),
            ColumnType::Uuid | ColumnType::Ipv6 | ColumnType::Ip => "binary(16)".into(),
            ColumnType::Ipv4 => "binary(4)".into(),
            ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json => "varchar(max)".into(),
        }
    }
    of(&c.ty)
}

fn column_sql(c: &Column) -> String {
    format!("{} {}{}", ident(&c.name), column_type(c), if c.required { " NOT NULL" } else { "" })
}

/// What a value is sent as in a bulk load, by the staging column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    SmallInt,
    Int,
    BigInt,
    Real,
    Float,
    Decimal,
    Bit,
    Text,
    Binary,
    DateTime2,
    Date,
    Time,
}

/// The staging column type of a column, and how its values travel: the layout's type, except
/// text (NVARCHAR, so no character depends on the collation) and enums (their labels).
fn staging_type(c: &Column) -> (String, Wire) {
    fn int(bits: u8) -> (String, Wire) {
        match bits {
            16 => ("smallint".into(), Wire::SmallInt),
            32 => ("int".into(), Wire::Int),
            _ => ("bigint".into(), Wire::BigInt),
        }
    }
    match &c.ty {
        ColumnType::Int(bits) => int(*bits),
        ColumnType::IntEnum(values) => int(layout::int_enum_bits(values)),
        ColumnType::Float(32) => ("real".into(), Wire::Real),
        ColumnType::Float(_) => ("float".into(), Wire::Float),
        ColumnType::Decimal { precision, scale } => (format!("decimal({precision}, {scale})"), Wire::Decimal),
        ColumnType::Bool => ("bit".into(), Wire::Bit),
        ColumnType::Str { max_length: Some(n), .. } if *n as u64 * 2 <= 4000 => {
            (format!("nvarchar({})", n * 2), Wire::Text)
        }
        ColumnType::Enum(_) => ("nvarchar(256)".into(), Wire::Text),
        // Not nvarchar(max): tiberius' bulk load refuses values of more than 65535 bytes there
        // (tiberius-rs/tiberius#322); ntext carries any length, and is only ever copied from.
        ColumnType::Str { .. } | ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json => {
            ("ntext".into(), Wire::Text)
        }
        ColumnType::Timestamp => ("datetime2(7)".into(), Wire::DateTime2),
        ColumnType::Date => ("date".into(), Wire::Date),
        ColumnType::Time => ("time(7)".into(), Wire::Time),
        // Exact bytes: an IPv4 address is 4 bytes until the layout's binary(16) pads it.
        ColumnType::Uuid | ColumnType::Ipv4 | ColumnType::Ipv6 | ColumnType::Ip => {
            ("varbinary(16)".into(), Wire::Binary)
        }
    }
}

/// The enum columns of a table: the column and its lookup table's name.
fn enum_columns(def: &TableDef) -> Vec<(&Column, String)> {
    def.values
        .iter()
        .filter(|c| matches!(c.ty, ColumnType::Enum(_)))
        .map(|c| (c, format!("{}__{}", def.name, c.name)))
        .collect()
}

/// A lookup table and its UNIQUE constraint (spec §4.7).
fn lookup_statements(def: &TableDef, enum_name: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE {} (\"id\" integer NOT NULL IDENTITY, \"value\" varchar(256) NOT NULL, CONSTRAINT {} PRIMARY KEY (\"id\"))",
            lookup_name(def, enum_name),
            ident(&format!("pk_{}_{enum_name}", def.namespace))
        ),
        format!(
            "ALTER TABLE {} ADD CONSTRAINT {} UNIQUE (\"value\")",
            lookup_name(def, enum_name),
            ident(&format!("uq_{enum_name}"))
        ),
    ]
}

fn foreign_key_sql(def: &TableDef, column: &Column, enum_name: &str) -> String {
    format!(
        "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} (\"id\")",
        table_name(&def.namespace, &def.name),
        ident(&foreign_key_name(def, &column.name)),
        ident(&column.name),
        lookup_name(def, enum_name)
    )
}

fn foreign_key_name(def: &TableDef, column: &str) -> String {
    format!("fk_{}_{}_{column}", def.namespace, def.name)
}

fn create_table_sql(def: &TableDef) -> String {
    let columns: Vec<String> = def.columns().map(column_sql).collect();
    format!(
        "CREATE TABLE {} ({}, CONSTRAINT {} PRIMARY KEY ({}))",
        table_name(&def.namespace, &def.name),
        columns.join(", "),
        ident(&format!("pk_{}_{}", def.namespace, def.name)),
        ident(&def.key.name)
    )
}

/// The bookkeeping tables exactly as the official client creates them on SQL Server.
pub fn bookkeeping_statements() -> Vec<String> {
    let columns: Vec<String> = layout::TABLE_SYNC_COLUMNS
        .iter()
        .map(|c| {
            let ty = match c.kind {
                SyncColumnKind::Identity => "bigint NOT NULL IDENTITY",
                SyncColumnKind::Name if c.required => "varchar(256) NOT NULL",
                SyncColumnKind::Name => "varchar(256)",
                SyncColumnKind::Timestamp => "datetime2 NOT NULL",
                SyncColumnKind::BigInt => "bigint NOT NULL",
                SyncColumnKind::Text => "varchar(max) NOT NULL",
            };
            format!("{} {ty}", ident(c.name))
        })
        .collect();
    vec![
        create_schema_sql(BOOKKEEPING_SCHEMA),
        format!(
            "CREATE TABLE {} (\"version\" bigint NOT NULL IDENTITY, CONSTRAINT \"pk_instructure_dap_database_version\" PRIMARY KEY (\"version\"))",
            bookkeeping_table("database_version")
        ),
        format!(
            "CREATE TABLE {} ({}, CONSTRAINT \"pk_instructure_dap_table_sync\" PRIMARY KEY (\"id\"))",
            bookkeeping_table("table_sync"),
            columns.join(", ")
        ),
    ]
}

/// The lookup tables of a table: one per enum column, and one per array-of-enum column (which
/// the official client creates though no column uses it); none for enums inside nested objects.
fn lookup_tables(def: &TableDef) -> Vec<String> {
    layout::enum_types(def).into_iter().filter(|e| e.used).map(|e| e.name).collect()
}

/// The DDL of a table as initdb creates it on an empty database: its schema, its lookup tables,
/// the table, its foreign keys.
pub fn table_statements(def: &TableDef) -> Vec<String> {
    let mut out = vec![create_schema_sql(&def.namespace)];
    for name in lookup_tables(def) {
        out.extend(lookup_statements(def, &name));
    }
    out.push(create_table_sql(def));
    for (column, enum_name) in enum_columns(def) {
        out.push(foreign_key_sql(def, column, &enum_name));
    }
    out
}

/// A database error while doing `action`.
fn database_error(shown: &str, action: &str, e: tiberius::error::Error) -> SinkError {
    use tiberius::error::Error as E;
    let (detail, retry) = match &e {
        // Deadlock victim, lock timeout, connection-level failures: the same work may succeed.
        E::Server(t) => (
            format!("{} (error {})", t.message(), t.code()),
            if matches!(t.code(), 1205 | 1222 | 40197 | 40501 | 40613) { Retry::MayHelp } else { Retry::Useless },
        ),
        E::Io { .. } => (e.to_string(), Retry::MayHelp),
        other => (other.to_string(), Retry::Useless),
    };
    SinkError::Database { target: shown.into(), action: action.into(), detail, retry, source: Some(Box::new(e)) }
}

/// A failed connection, explained.
fn connect_error(shown: &str, url: &ConnectionString, e: tiberius::error::Error) -> SinkError {
    use tiberius::error::Error as E;
    let user = url.user.as_deref().unwrap_or("?");
    let (hint, retry) = match &e {
        E::Server(t) if t.code() == 18456 => {
            (format!("the server refused the login of user {user}; check the user and password"), Retry::Useless)
        }
        E::Server(t) if t.code() == 4060 => (
            format!("database {} does not exist or the user may not open it; create it (CREATE DATABASE \"{0}\") or fix the name", url.database),
            Retry::Useless,
        ),
        E::Server(_) => ("the server refused the connection".into(), Retry::Useless),
        E::Protocol(p) if p.contains("encryption") => (
            "the server does not offer TLS, which the connection asks for by default; enable TLS on the server, or connect unencrypted with ?ssl=disable".into(),
            Retry::Useless,
        ),
        E::Tls(_) => (
            "TLS failed: the server's certificate was not accepted, or the server offers no TLS; check ?ssl= (the default trusts the server's certificate as the official client does; verify-full needs its CA, given with &sslrootcert=FILE; disable turns TLS off)".into(),
            Retry::Useless,
        ),
        _ => ("cannot reach the server; check the host and port, and that it is running".into(), Retry::MayHelp),
    };
    let detail = match &e {
        E::Server(t) => t.message().to_string(),
        other => other.to_string(),
    };
    SinkError::Database {
        target: shown.into(),
        action: "connecting".into(),
        detail: format!("{hint} ({detail})"),
        retry,
        source: Some(Box::new(e)),
    }
}

/// The driver's configuration for a connection string. `?ssl=disable` speaks plain TDS;
/// otherwise the connection is encrypted, trusting the server's certificate as the official
/// client does (`TrustServerCertificate=yes`), unless `verify-ca`/`verify-full` ask for it to
/// be checked (against `sslrootcert`, or the system's roots).
fn config(url: &ConnectionString) -> Config {
    let mut c = Config::new();
    c.host(url.host.clone().unwrap_or_else(|| "localhost".into()));
    c.port(url.port_or_default());
    c.database(&url.database);
    c.application_name("dap-replica");
    c.authentication(AuthMethod::sql_server(
        url.user.clone().unwrap_or_default(),
        url.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default(),
    ));
    c.packet_size(PACKET_SIZE);
    c.command_timeout(None);
    match url.ssl {
        Some(SslMode::Disable) => c.encryption(EncryptionLevel::NotSupported),
        Some(SslMode::VerifyCa | SslMode::VerifyFull) => {
            c.encryption(EncryptionLevel::Required);
            if let Some(ca) = &url.ssl_root_cert {
                c.trust_cert_ca(ca.display().to_string());
            }
        }
        _ => {
            c.encryption(EncryptionLevel::Required);
            c.trust_cert();
        }
    }
    c
}

/// The days of a timestamp or date since 0001-01-01, if `datetime2` can hold it.
fn day_number(unix_days: i64) -> Option<u32> {
    let d = unix_days + DAYS_BEFORE_UNIX_EPOCH;
    (0..=LAST_DAY).contains(&d).then_some(d as u32)
}

/// Why a value cannot travel: NaN or infinity without `--non-finite null`, or a date before
/// year 1 or after 9999 (SQL Server's range).
#[derive(Debug)]
pub enum BadValue {
    NonFinite(f64),
    OutOfRange(String),
}

/// A record that cannot be loaded, with the key and column that say which value.
#[derive(Debug)]
pub struct Unstorable {
    pub key: Box<Value>,
    pub column: String,
    pub reason: BadValue,
}

/// Turns records into the bulk-load rows of a staging table (for a sync, each row's action
/// first).
pub struct BulkEncoder<'a> {
    def: &'a TableDef,
    wires: Vec<Wire>,
    span: Span,
    non_finite: NonFinite,
}

impl<'a> BulkEncoder<'a> {
    pub fn new(def: &'a TableDef, span: Span, non_finite: NonFinite) -> BulkEncoder<'a> {
        BulkEncoder { def, wires: def.columns().map(|c| staging_type(c).1).collect(), span, non_finite }
    }

    pub fn row(&self, r: Record) -> Result<TokenRow<'static>, Unstorable> {
        let deleted = r.action == Some('D');
        let mut row = TokenRow::with_capacity(self.wires.len() + 1);
        if self.span == Span::Feed {
            row.push(ColumnData::String(Some(Cow::Borrowed(if deleted { "D" } else { "U" }))));
        }
        // A deleted row's values are NULL and never stored: nothing to refuse there.
        let policy = if deleted { NonFinite::Null } else { self.non_finite };
        let key = r.key.clone();
        for ((v, wire), column) in std::iter::once(r.key).chain(r.values).zip(&self.wires).zip(self.def.columns()) {
            // NULL cannot stand in for a value of a required column either.
            let policy = if column.required { NonFinite::Refuse } else { policy };
            match column_data(v, *wire, policy) {
                Ok(d) => row.push(d),
                Err(reason) => return Err(Unstorable { key: Box::new(key), column: column.name.clone(), reason }),
            }
        }
        Ok(row)
    }
}

/// A value as bulk-load data for a staging column.
fn column_data(v: Value, wire: Wire, non_finite: NonFinite) -> Result<ColumnData<'static>, BadValue> {
    let null = |w: Wire| match w {
        Wire::SmallInt => ColumnData::I16(None),
        Wire::Int => ColumnData::I32(None),
        Wire::BigInt => ColumnData::I64(None),
        Wire::Real => ColumnData::F32(None),
        Wire::Float => ColumnData::F64(None),
        Wire::Decimal => ColumnData::Numeric(None),
        Wire::Bit => ColumnData::Bit(None),
        Wire::Text => ColumnData::String(None),
        Wire::Binary => ColumnData::Binary(None),
        Wire::DateTime2 => ColumnData::DateTime2(None),
        Wire::Date => ColumnData::Date(None),
        Wire::Time => ColumnData::Time(None),
    };
    let time_of_day = |us: Micros| tiberius::time::Time::new(us as u64 * 10, 7);
    Ok(match (v, wire) {
        (Value::Null, w) => null(w),
        (Value::Int(i), Wire::SmallInt) => ColumnData::I16(Some(i as i16)),
        (Value::Int(i), Wire::Int) => ColumnData::I32(Some(i as i32)),
        (Value::Int(i), _) => ColumnData::I64(Some(i)),
        (Value::Float(f), w) if !f.is_finite() => match non_finite {
            NonFinite::Null => null(w),
            NonFinite::Refuse => return Err(BadValue::NonFinite(f)),
        },
        (Value::Float(f), Wire::Real) => ColumnData::F32(Some(f as f32)),
        (Value::Float(f), _) => ColumnData::F64(Some(f)),
        (Value::Decimal(d), _) => {
            ColumnData::Numeric(Some(tiberius::numeric::Numeric::new_with_scale(d.mantissa, d.scale)))
        }
        (Value::Bool(b), _) => ColumnData::Bit(Some(b)),
        (Value::Str(s), _) => ColumnData::String(Some(Cow::Owned(s))),
        (Value::Json(j), _) => ColumnData::String(Some(Cow::Owned(j.to_string()))),
        (Value::Timestamp(us), _) => {
            let days = us.div_euclid(MICROS_PER_DAY);
            let Some(day) = day_number(days) else {
                return Err(BadValue::OutOfRange(time::format_wire(us)));
            };
            ColumnData::DateTime2(Some(tiberius::time::DateTime2::new(
                tiberius::time::Date::new(day),
                time_of_day(us.rem_euclid(MICROS_PER_DAY)),
            )))
        }
        (Value::Date(d), _) => match day_number(d as i64) {
            Some(day) => ColumnData::Date(Some(tiberius::time::Date::new(day))),
            None => return Err(BadValue::OutOfRange(time::format_date(d))),
        },
        (Value::Time(us), _) => ColumnData::Time(Some(time_of_day(us))),
        (Value::Uuid(u), _) => ColumnData::Binary(Some(Cow::Owned(u.to_be_bytes().to_vec()))),
        (Value::Ip(std::net::IpAddr::V4(a)), _) => ColumnData::Binary(Some(Cow::Owned(a.octets().to_vec()))),
        (Value::Ip(std::net::IpAddr::V6(a)), _) => ColumnData::Binary(Some(Cow::Owned(a.octets().to_vec()))),
    })
}

impl MssqlDialect {
    pub async fn open(url: &ConnectionString, options: &SinkOptions) -> Result<MssqlDialect, SinkError> {
        let shown = url.redacted();
        let sink = MssqlDialect {
            shown,
            database: url.database.clone(),
            config: config(url),
            idle: Mutex::new(Vec::new()),
            non_finite: options.non_finite,
            lock_timeout: options.lock_timeout,
        };
        let mut c = sink.connect_new().await.map_err(|e| connect_error(&sink.shown, url, e))?;
        if url.ssl == Some(SslMode::Disable) {
            tracing::warn!("{}: ?ssl=disable: the login and the data travel unencrypted", sink.shown);
        }
        let collation = sink
            .text_query(&mut c, "SELECT CAST(DATABASEPROPERTYEX(DB_NAME(), 'Collation') AS nvarchar(128))")
            .await?
            .pop()
            .flatten()
            .unwrap_or_default();
        if !collation.to_ascii_uppercase().ends_with("_UTF8") {
            tracing::warn!(
                "{}: the database's collation is {collation:?}, not a _UTF8 one: varchar columns keep only its code page, so other characters are stored as '?'. \
                 Use a _UTF8 collation (ALTER DATABASE \"{}\" COLLATE Latin1_General_100_CI_AS_SC_UTF8)",
                sink.shown,
                url.database
            );
        }
        if options.access == Access::Write {
            protocol::prepared_alone(&sink, sink.prepare(&mut c)).await?;
        }
        sink.release(c);
        Ok(sink)
    }

    /// A new connection in the session every statement of dap expects, with no wait for a
    /// database lock longer than the lock timeout.
    async fn connect_new(&self) -> Result<Conn, tiberius::error::Error> {
        let addr = self.config.get_addr();
        let tcp = tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(&addr)).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {addr} timed out"))
        })??;
        tcp.set_nodelay(true)?;
        let mut c = Client::connect(self.config.clone(), tcp.compat_write()).await?;
        c.simple_query(SESSION).await?.into_results().await?;
        c.simple_query(format!("SET LOCK_TIMEOUT {}", self.lock_timeout.as_millis().clamp(1, i32::MAX as u128)))
            .await?
            .into_results()
            .await?;
        Ok(c)
    }

    fn fail(&self, action: &str) -> impl Fn(tiberius::error::Error) -> SinkError + '_ {
        let action = action.to_string();
        move |e| database_error(&self.shown, &action, e)
    }

    /// Runs statements that return nothing, as one batch.
    async fn batch(&self, c: &mut Conn, sql: &str, action: &str) -> Result<(), SinkError> {
        c.simple_query(sql).await.map_err(self.fail(action))?.into_results().await.map_err(self.fail(action))?;
        Ok(())
    }

    /// The rows of a statement's first result set: a batch without parameters, an
    /// `sp_executesql` call with them; `action` names it in errors.
    async fn first_result(
        &self,
        c: &mut Conn,
        sql: &str,
        params: &[&dyn tiberius::ToSql],
        action: &str,
    ) -> Result<Vec<tiberius::Row>, SinkError> {
        let stream = if params.is_empty() { c.simple_query(sql).await } else { c.query(sql, params).await };
        stream.map_err(self.fail(action))?.into_first_result().await.map_err(self.fail(action))
    }

    /// The first column of every row of a query, as text.
    async fn text_query(&self, c: &mut Conn, sql: &str) -> Result<Vec<Option<String>>, SinkError> {
        let rows = self.first_result(c, sql, &[], "reading the catalog").await?;
        Ok(rows.iter().map(|r| r.get::<&str, _>(0).map(str::to_string)).collect())
    }

    /// Whether a table exists.
    async fn exists(&self, c: &mut Conn, schema: &str, table: &str) -> Result<bool, SinkError> {
        let name = format!("{}.{}", ident(schema), ident(table));
        let rows = self.first_result(c, "SELECT OBJECT_ID(@P1)", &[&name.as_str()], "reading the catalog").await?;
        Ok(rows.first().and_then(|r| r.get::<i32, _>(0)).is_some())
    }

    /// Creates the bookkeeping tables with version 1 when missing (and our own), and refuses a
    /// database of another version.
    async fn prepare(&self, c: &mut Conn) -> Result<(), SinkError> {
        if !self.exists(c, BOOKKEEPING_SCHEMA, "table_sync").await? {
            let mut sql = vec!["BEGIN TRANSACTION".to_string()];
            sql.extend(bookkeeping_statements());
            sql.extend(version_statements());
            sql.push("COMMIT".into());
            let created = match c.simple_query(sql.join(";\n")).await {
                Ok(stream) => stream.into_results().await.map(|_| ()),
                Err(e) => Err(e),
            };
            created.map_err(|e| match &e {
                tiberius::error::Error::Server(t) if matches!(t.code(), 262 | 2760 | 1088) => SinkError::refused(
                    &self.shown,
                    Refusal::NotAllowed,
                    format!(
                        "the user may not create schemas or tables here ({}); grant CREATE SCHEMA and CREATE TABLE, or have an administrator run the output of `dap ddl --dialect mssql`",
                        t.message()
                    ),
                ),
                _ => database_error(&self.shown, "creating the bookkeeping tables", e),
            })?;
        }
        let rows = self
            .first_result(
                c,
                &format!("SELECT \"version\" FROM {}", bookkeeping_table("database_version")),
                &[],
                "reading the database version",
            )
            .await?;
        let versions: Vec<i64> = rows.iter().filter_map(|r| r.get::<i64, _>(0)).collect();
        let stored = StoredVersion::of(&versions);
        let watermarks = match stored {
            StoredVersion::Missing => {
                let rows = self
                    .first_result(
                        c,
                        &format!("SELECT count_big(*) FROM {}", bookkeeping_table("table_sync")),
                        &[],
                        "reading the watermarks",
                    )
                    .await?;
                rows.first().and_then(|r| r.get::<i64, _>(0)).unwrap_or(0)
            }
            _ => 0,
        };
        if let Some(why) =
            stored.refusal("instructure_dap.database_version", "instructure_dap.table_sync", watermarks as u64)
        {
            return Err(SinkError::refused(&self.shown, Refusal::Incompatible, why));
        }
        if stored == StoredVersion::Missing {
            self.batch(c, &version_statements().join(";\n"), "writing the database version").await?;
        }
        if !self.exists(c, OUR_SCHEMA, "checkpoints").await? {
            let sql = [
                create_schema_sql(OUR_SCHEMA),
                format!(
                    "CREATE TABLE {} (\"namespace\" nvarchar(128) NOT NULL, \"table_name\" nvarchar(128) NOT NULL, \"job_id\" nvarchar(256) NOT NULL, \"object\" nvarchar(400) NOT NULL, CONSTRAINT \"pk_dap_replica_checkpoints\" PRIMARY KEY (\"namespace\", \"table_name\", \"object\"))",
                    ours("checkpoints")
                ),
            ];
            self.batch(c, &sql.join(";\n"), "creating dap_replica.checkpoints").await?;
        }
        if !self.exists(c, OUR_SCHEMA, "locks").await? {
            let sql = format!(
                "CREATE TABLE {} (\"namespace\" nvarchar(128) NOT NULL, \"table_name\" nvarchar(128) NOT NULL, \"holder\" nvarchar(512) NOT NULL, CONSTRAINT \"pk_dap_replica_locks\" PRIMARY KEY (\"namespace\", \"table_name\"))",
                ours("locks")
            );
            self.batch(c, &sql, "creating dap_replica.locks").await?;
        }
        Ok(())
    }

    /// The bookkeeping row, in the caller's transaction: the first row of the table updated, as
    /// the official client does, or a new one.
    async fn write_table_sync(&self, c: &mut Conn, b: &Bookkeeping) -> Result<(), SinkError> {
        let sync = bookkeeping_table("table_sync");
        let at = chrono::DateTime::from_timestamp_micros(b.watermark)
            .ok_or_else(|| {
                SinkError::refused(&self.shown, Refusal::Input, format!("watermark {} is out of range", b.watermark))
            })?
            .naive_utc();
        let version = b.schema_version as i64;
        let rows = self
            .first_result(
                c,
                &format!("SELECT MIN(\"id\") FROM {sync} WHERE \"source_namespace\" = @P1 AND \"source_table\" = @P2"),
                &[&b.namespace.as_str(), &b.table.as_str()],
                "reading instructure_dap.table_sync",
            )
            .await?;
        match rows.first().and_then(|r| r.get::<i64, _>(0)) {
            Some(id) => c
                .execute(
                    format!("UPDATE {sync} SET \"timestamp\" = @P1, \"schema_version\" = @P2, \"schema_description\" = @P3 WHERE \"id\" = @P4"),
                    &[&at, &version, &b.schema_description.as_str(), &id],
                )
                .await
                .map_err(self.fail("updating instructure_dap.table_sync"))?,
            None => c
                .execute(
                    format!(
                        "INSERT INTO {sync} (\"source_namespace\", \"source_table\", \"timestamp\", \"schema_version\", \"target_schema\", \"target_table\", \"schema_description_format\", \"schema_description\") VALUES (@P1, @P2, @P3, @P4, @P5, @P6, 'json', @P7)"
                    ),
                    &[
                        &b.namespace.as_str(),
                        &b.table.as_str(),
                        &at,
                        &version,
                        &b.namespace.as_str(),
                        &b.table.as_str(),
                        &b.schema_description.as_str(),
                    ],
                )
                .await
                .map_err(self.fail("writing instructure_dap.table_sync"))?,
        };
        Ok(())
    }

    /// Bulk-loads records into a scratch table until the pump's span ends.
    async fn bulk_load(
        &self,
        c: &mut Conn,
        def: &TableDef,
        name: &str,
        span: Span,
        rows: &mut Pump<'_>,
    ) -> Result<(), SinkError> {
        let encoder = BulkEncoder::new(def, span, self.non_finite);
        let target = bracketed(OUR_SCHEMA, name);
        let action = format!("loading rows into {OUR_SCHEMA}.{name}");
        let mut request = c.bulk_insert(&target).await.map_err(self.fail(&action))?;
        while let Some(batch) = rows.next_batch().await? {
            for r in batch {
                let row = encoder.row(r).map_err(|Unstorable { key, column, reason }| match reason {
                    BadValue::NonFinite(value) => {
                        SinkError::non_finite(&self.shown, "SQL Server", def, &key, &column, value, self.non_finite)
                    }
                    BadValue::OutOfRange(shown) => SinkError::refused(
                        &self.shown,
                        Refusal::Input,
                        format!(
                            "{}.{}: key {} column {column} holds {shown}, outside SQL Server's dates (years 1 to 9999); nothing was published",
                            def.namespace,
                            def.name,
                            key.to_text().unwrap_or_default()
                        ),
                    ),
                })?;
                request.send(row).await.map_err(self.fail(&action))?;
            }
        }
        request.finalize().await.map_err(self.fail(&action))?;
        Ok(())
    }

    /// Keeps only the last row (highest `_dap_seq`) of each key of a scratch table.
    fn dedupe_sql(def: &TableDef, name: &str) -> String {
        let key = ident(&def.key.name);
        let t = ours(name);
        format!(
            "DELETE s FROM {t} AS s JOIN (SELECT {key}, MAX(\"_dap_seq\") AS \"_dap_last\" FROM {t} GROUP BY {key}) AS k ON s.{key} = k.{key} WHERE s.\"_dap_seq\" < k.\"_dap_last\""
        )
    }

    /// MERGEs the enum labels a scratch table holds into the lookup tables (the official client
    /// does the same per batch, then maps labels to ids).
    fn lookup_merges(def: &TableDef, name: &str, filter: &str) -> Vec<String> {
        enum_columns(def)
            .into_iter()
            .map(|(c, enum_name)| {
                format!(
                    "MERGE INTO {} AS l USING (SELECT DISTINCT {col} AS \"value\" FROM {} WHERE {col} IS NOT NULL{filter}) AS s ON l.\"value\" = s.\"value\" WHEN NOT MATCHED THEN INSERT (\"value\") VALUES (s.\"value\");",
                    lookup_name(def, &enum_name),
                    ours(name),
                    col = ident(&c.name)
                )
            })
            .collect()
    }

    /// The scratch table's rows in the layout's columns: enum labels replaced by their ids.
    fn mapped_select(def: &TableDef, name: &str, filter: &str) -> String {
        let mut select = Vec::new();
        let mut joins = Vec::new();
        let enums = enum_columns(def);
        for c in def.columns() {
            match enums.iter().position(|(e, _)| e.name == c.name) {
                Some(i) => {
                    select.push(format!("e{i}.\"id\" AS {}", ident(&c.name)));
                    joins.push(format!(
                        " LEFT JOIN {} AS e{i} ON e{i}.\"value\" = s.{}",
                        lookup_name(def, &enums[i].1),
                        ident(&c.name)
                    ));
                }
                None => select.push(format!("s.{}", ident(&c.name))),
            }
        }
        let filter = filter.strip_prefix(" AND ").map(|f| format!(" WHERE {f}")).unwrap_or_default();
        format!("SELECT {} FROM {} AS s{}{filter}", select.join(", "), ours(name), joins.concat())
    }

    /// The DDL of a delta, in the caller's transaction (SQL Server's DDL is transactional).
    async fn apply_delta(&self, c: &mut Conn, def: &TableDef, delta: &SchemaDelta) -> Result<(), SinkError> {
        let table = table_name(&def.namespace, &def.name);
        let mut sql = Vec::new();
        for change in &delta.changes {
            match change {
                Change::Add(col) => {
                    sql.push(format!("ALTER TABLE {table} ADD {}", column_sql(col)));
                    if let ColumnType::Enum(_) = col.ty {
                        let enum_name = format!("{}__{}", def.name, col.name);
                        if !self.exists(c, &def.namespace, &enum_name).await? {
                            sql.extend(lookup_statements(def, &enum_name));
                        }
                        sql.push(foreign_key_sql(def, col, &enum_name));
                    }
                }
                Change::Widen { column, from } | Change::Retype { column, from } => {
                    let before = Column { ty: from.clone(), ..column.clone() };
                    if column_type(&before) == column_type(column) {
                        continue; // a new enum label, a new member of a nested object: same column
                    }
                    let (was_enum, is_enum) =
                        (matches!(from, ColumnType::Enum(_)), matches!(column.ty, ColumnType::Enum(_)));
                    if was_enum {
                        sql.push(format!(
                            "ALTER TABLE {table} DROP CONSTRAINT {}",
                            ident(&foreign_key_name(def, &column.name))
                        ));
                    }
                    sql.push(format!("ALTER TABLE {table} ALTER COLUMN {}", column_sql_nullable(column)));
                    if is_enum && !was_enum {
                        let enum_name = format!("{}__{}", def.name, column.name);
                        if !self.exists(c, &def.namespace, &enum_name).await? {
                            sql.extend(lookup_statements(def, &enum_name));
                        }
                        sql.push(foreign_key_sql(def, column, &enum_name));
                    }
                }
                Change::DropNotNull(name) | Change::SetNotNull(name) => {
                    let Some(column) = def.columns().find(|col| &col.name == name).cloned() else {
                        // A column the schema no longer names: its stored type, made nullable.
                        let stored = self.stored_type(c, def, name).await?;
                        sql.push(format!("ALTER TABLE {table} ALTER COLUMN {} {stored} NULL", ident(name)));
                        continue;
                    };
                    if let Change::SetNotNull(_) = change {
                        let rows = self
                            .first_result(
                                c,
                                &format!("SELECT COUNT_BIG(*) FROM {table} WHERE {} IS NULL", ident(name)),
                                &[],
                                &format!("checking {name} for NULLs"),
                            )
                            .await?;
                        let nulls = rows.first().and_then(|r| r.get::<i64, _>(0)).unwrap_or(0);
                        if nulls > 0 {
                            return Err(SinkError::required_over_nulls(&self.shown, def, name, Some(nulls as u64)));
                        }
                    }
                    sql.push(format!("ALTER TABLE {table} ALTER COLUMN {}", column_sql_nullable(&column)));
                }
            }
        }
        for statement in sql {
            self.batch(c, &statement, &format!("changing the schema of {}", def.name)).await?;
        }
        Ok(())
    }

    /// The stored type of a column, as `ALTER COLUMN` takes it.
    async fn stored_type(&self, c: &mut Conn, def: &TableDef, column: &str) -> Result<String, SinkError> {
        let sql = format!(
            "SELECT TOP 1 CAST(DATA_TYPE AS nvarchar(128)), CHARACTER_MAXIMUM_LENGTH FROM INFORMATION_SCHEMA.COLUMNS WHERE TABLE_SCHEMA = {} AND TABLE_NAME = {} AND COLUMN_NAME = {}",
            literal(&def.namespace),
            literal(&def.name),
            literal(column)
        );
        let rows = self.first_result(c, &sql, &[], "reading the table's columns").await?;
        let row = rows.first().ok_or_else(|| {
            SinkError::refused(
                &self.shown,
                Refusal::Schema,
                format!("{}.{} has no column {column}", def.namespace, def.name),
            )
        })?;
        let ty = row.get::<&str, _>(0).unwrap_or("varchar").to_string();
        Ok(match row.get::<i32, _>(1) {
            Some(-1) => format!("{ty}(max)"),
            Some(n) => format!("{ty}({n})"),
            None => ty,
        })
    }
}

/// A staging or scratch table `"dap_replica"."name"`, created anew: a sequence (the later of two
/// rows of one key wins), for a sync each record's action, then the table's columns in staging
/// types.
pub fn create_scratch_sql(def: &TableDef, name: &str, span: Span) -> String {
    let mut columns = vec!["\"_dap_seq\" bigint NOT NULL IDENTITY".to_string()];
    if span == Span::Feed {
        columns.push("\"_dap_action\" nchar(1) NOT NULL".into());
    }
    columns.extend(def.columns().map(|c| format!("{} {}", ident(&c.name), staging_type(c).0)));
    format!("DROP TABLE IF EXISTS {0}; CREATE TABLE {0} ({1})", ours(name), columns.join(", "))
}

/// A column's definition with its nullability spelled out, as `ALTER COLUMN` wants it.
fn column_sql_nullable(c: &Column) -> String {
    format!("{} {} {}", ident(&c.name), column_type(c), if c.required { "NOT NULL" } else { "NULL" })
}

/// A session holding `sp_getapplock` locks: a connection of its own, outside the pool.
pub struct MssqlLockSession {
    conn: Conn,
}

#[async_trait::async_trait]
impl Dialect for MssqlDialect {
    type Conn = Conn;
    type LockSession = MssqlLockSession;

    fn target(&self) -> &str {
        &self.shown
    }

    fn table_sql(&self, namespace: &str, table: &str) -> String {
        table_name(namespace, table)
    }

    fn bookkeeping_name(&self) -> &'static str {
        "instructure_dap.table_sync"
    }

    fn staging_keeps(&self) -> Staged {
        Staged::EveryRecord
    }

    fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    async fn connect(&self) -> Result<Conn, SinkError> {
        let idle = self.idle.lock().expect("the pool lock").pop();
        match idle {
            Some(c) => Ok(c),
            None => self.connect_new().await.map_err(|e| database_error(&self.shown, "connecting", e)),
        }
    }

    fn release(&self, c: Conn) {
        self.idle.lock().expect("the pool lock").push(c);
    }

    async fn begin(&self, c: &mut Conn) -> Result<(), SinkError> {
        self.batch(c, "BEGIN TRANSACTION", "starting a transaction").await
    }

    async fn commit(&self, c: &mut Conn) -> Result<(), SinkError> {
        self.batch(c, "COMMIT", "committing").await
    }

    async fn stored_bookkeeping(
        &self,
        c: &mut Conn,
        namespace: &str,
        table: Option<&str>,
    ) -> Result<Vec<StoredBookkeeping>, SinkError> {
        if !self.exists(c, BOOKKEEPING_SCHEMA, "table_sync").await? {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT CAST(\"source_table\" AS nvarchar(256)), \"timestamp\", \"schema_version\", CAST(\"schema_description\" AS nvarchar(max)) \
             FROM {} WHERE \"source_namespace\" = @P1 ORDER BY \"source_table\", \"id\"",
            bookkeeping_table("table_sync")
        );
        let rows = self.first_result(c, &sql, &[&namespace], "reading instructure_dap.table_sync").await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let t: String = r.get::<&str, _>(0).unwrap_or_default().to_string();
                if table.is_some_and(|want| want != t) {
                    return None;
                }
                let at: Option<chrono::NaiveDateTime> = r.get(1);
                Some(StoredBookkeeping {
                    namespace: namespace.to_string(),
                    table: t,
                    // datetime2 keeps 100 ns; the watermark keeps microseconds, truncated.
                    watermark: at.map(|at| at.and_utc().timestamp_micros()).ok_or_else(|| "NULL".to_string()),
                    schema_version: r.get::<i64, _>(2).unwrap_or(-1),
                    schema_description: r.get::<&str, _>(3).unwrap_or_default().to_string(),
                })
            })
            .collect())
    }

    async fn write_bookkeeping(&self, c: &mut Conn, b: &Bookkeeping) -> Result<(), SinkError> {
        self.write_table_sync(c, b).await
    }

    async fn row_count(&self, c: &mut Conn, namespace: &str, table: &str) -> Result<u64, SinkError> {
        let action = format!("counting {namespace}.{table}");
        let rows = self
            .first_result(c, &format!("SELECT COUNT_BIG(*) FROM {}", table_name(namespace, table)), &[], &action)
            .await?;
        Ok(rows.first().and_then(|r| r.get::<i64, _>(0)).unwrap_or(0) as u64)
    }

    async fn table_exists(&self, c: &mut Conn, namespace: &str, table: &str) -> Result<bool, SinkError> {
        self.exists(c, namespace, table).await
    }

    async fn column_names(&self, c: &mut Conn, namespace: &str, table: &str) -> Result<Vec<String>, SinkError> {
        let action = "reading the table's columns";
        let mut stream = c
            .simple_query(format!("SELECT TOP 0 * FROM {}", table_name(namespace, table)))
            .await
            .map_err(self.fail(action))?;
        let names = stream
            .columns()
            .await
            .map_err(self.fail(action))?
            .map(|columns| columns.iter().map(|c| c.name().to_string()).collect())
            .unwrap_or_default();
        stream.into_results().await.map_err(self.fail(action))?;
        Ok(names)
    }

    async fn checkpoints(&self, c: &mut Conn, def: &TableDef) -> Result<Vec<(String, String)>, SinkError> {
        let rows = self
            .first_result(
                c,
                &format!(
                    "SELECT \"job_id\", \"object\" FROM {} WHERE \"namespace\" = @P1 AND \"table_name\" = @P2",
                    ours("checkpoints")
                ),
                &[&def.namespace.as_str(), &def.name.as_str()],
                "reading checkpoints",
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<&str, _>(0).unwrap_or_default().into(), r.get::<&str, _>(1).unwrap_or_default().into()))
            .collect())
    }

    async fn checkpoint_counts(&self, c: &mut Conn, namespace: &str) -> Result<Vec<(String, u64)>, SinkError> {
        if !self.exists(c, OUR_SCHEMA, "checkpoints").await? {
            return Ok(Vec::new());
        }
        let rows = self.first_result(c, &format!(
                    "SELECT \"table_name\", count_big(*) FROM {} WHERE \"namespace\" = @P1 GROUP BY \"table_name\" ORDER BY \"table_name\"",
                    ours("checkpoints")
                ), &[&namespace], "reading checkpoints").await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<&str, _>(0).unwrap_or_default().into(), r.get::<i64, _>(1).unwrap_or_default() as u64))
            .collect())
    }

    async fn staging_exists(&self, c: &mut Conn, def: &TableDef) -> Result<bool, SinkError> {
        self.exists(c, OUR_SCHEMA, &staging_table(def)).await
    }

    async fn create_staging(&self, c: &mut Conn, def: &TableDef) -> Result<(), SinkError> {
        // One batch: the scratch SQL drops an old staging table before creating it.
        let sql =
            format!("{}; {}", forget_checkpoints_sql(def), create_scratch_sql(def, &staging_table(def), Span::Part));
        self.batch(c, &sql, &format!("creating the staging table of {}", def.name)).await
    }

    async fn drop_staging(&self, c: &mut Conn, def: &TableDef) -> Result<(), SinkError> {
        let sql = format!("{}; DROP TABLE IF EXISTS {}", forget_checkpoints_sql(def), ours(&staging_table(def)));
        self.batch(c, &sql, &format!("dropping the staging table of {}", def.name)).await
    }

    async fn load_part(&self, c: &mut Conn, def: &TableDef, rows: &mut Pump<'_>) -> Result<(), SinkError> {
        self.bulk_load(c, def, &staging_table(def), Span::Part, rows).await
    }

    async fn record_checkpoint(&self, c: &mut Conn, def: &TableDef, job: &str, part: &str) -> Result<(), SinkError> {
        c.execute(
            format!(
                "INSERT INTO {} (\"namespace\", \"table_name\", \"job_id\", \"object\") VALUES (@P1, @P2, @P3, @P4)",
                ours("checkpoints")
            ),
            &[&def.namespace.as_str(), &def.name.as_str(), &job, &part],
        )
        .await
        .map_err(self.fail("recording a checkpoint"))?;
        Ok(())
    }

    async fn staged_rows(&self, c: &mut Conn, def: &TableDef) -> Result<u64, SinkError> {
        let action = format!("counting the staged rows of {}", def.name);
        let rows = self
            .first_result(c, &format!("SELECT COUNT_BIG(*) FROM {}", ours(&staging_table(def))), &[], &action)
            .await?;
        Ok(rows.first().and_then(|r| r.get::<i64, _>(0)).unwrap_or(0) as u64)
    }

    async fn publish(
        &self,
        c: &mut Conn,
        def: &TableDef,
        delta: &SchemaDelta,
        b: &Bookkeeping,
    ) -> Result<(), SinkError> {
        let table = table_name(&def.namespace, &def.name);
        let staging = staging_table(def);
        let replacing = self.exists(c, &def.namespace, &def.name).await?;
        let mut missing_lookups = Vec::new();
        for name in lookup_tables(def) {
            if !self.exists(c, &def.namespace, &name).await? {
                missing_lookups.push(name);
            }
        }
        self.begin(c).await?;
        let mut sql = vec![create_schema_sql(&def.namespace)];
        for name in &missing_lookups {
            sql.extend(lookup_statements(def, name));
        }
        if replacing {
            // The table object stays (with the user's views, indexes and grants): its rows are
            // replaced, after its columns follow the new schema.
            sql.push(Replaces::of(def).delete_sql(&table, &ours(&staging), &ident(&def.key.name)));
            self.batch(c, &sql.join(";\n"), &format!("preparing {}", def.name)).await?;
            sql.clear();
            self.apply_delta(c, def, delta).await?;
        } else {
            sql.push(create_table_sql(def));
            for (column, enum_name) in enum_columns(def) {
                sql.push(foreign_key_sql(def, column, &enum_name));
            }
        }
        sql.push(Self::dedupe_sql(def, &staging));
        sql.extend(Self::lookup_merges(def, &staging, ""));
        let columns: Vec<String> = def.columns().map(|c| ident(&c.name)).collect();
        sql.push(format!("INSERT INTO {table} ({}) {}", columns.join(", "), Self::mapped_select(def, &staging, "")));
        sql.push(format!("DROP TABLE {}", ours(&staging)));
        sql.push(format!(
            "DELETE FROM {} WHERE \"namespace\" = {} AND \"table_name\" = {}",
            ours("checkpoints"),
            literal(&def.namespace),
            literal(&def.name)
        ));
        for statement in sql {
            self.batch(c, &statement, &format!("publishing {}", def.name)).await?;
        }
        self.write_table_sync(c, b).await?;
        self.commit(c).await
    }

    async fn apply_changes(
        &self,
        c: &mut Conn,
        def: &TableDef,
        delta: &SchemaDelta,
        rows: &mut Pump<'_>,
        b: &Bookkeeping,
    ) -> Result<(), SinkError> {
        let scratch = changes_table(def);
        self.batch(c, &create_scratch_sql(def, &scratch, Span::Feed), "creating the changes table").await?;
        self.bulk_load(c, def, &scratch, Span::Feed, rows).await?;
        let table = table_name(&def.namespace, &def.name);
        self.begin(c).await?;
        self.apply_delta(c, def, delta).await?;
        let upserts = " AND s.\"_dap_action\" = N'U'";
        let mut sql = vec![Self::dedupe_sql(def, &scratch)];
        sql.extend(Self::lookup_merges(def, &scratch, " AND \"_dap_action\" = N'U'"));
        let key = ident(&def.key.name);
        let columns: Vec<String> = def.columns().map(|c| ident(&c.name)).collect();
        let values: Vec<String> = def.values.iter().map(|c| format!("{0} = s.{0}", ident(&c.name))).collect();
        let matched = if values.is_empty() {
            String::new()
        } else {
            format!(" WHEN MATCHED THEN UPDATE SET {}", values.join(", "))
        };
        sql.push(format!(
            "MERGE INTO {table} AS t USING ({}) AS s ON t.{key} = s.{key}{matched} WHEN NOT MATCHED THEN INSERT ({}) VALUES ({});",
            Self::mapped_select(def, &scratch, upserts),
            columns.join(", "),
            columns.iter().map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", ")
        ));
        sql.push(format!(
            "DELETE t FROM {table} AS t JOIN {} AS d ON t.{key} = d.{key} WHERE d.\"_dap_action\" = N'D'",
            ours(&scratch)
        ));
        for statement in sql {
            self.batch(c, &statement, &format!("applying the changes to {}", def.name)).await?;
        }
        self.write_table_sync(c, b).await?;
        self.commit(c).await?;
        self.batch(c, &format!("DROP TABLE IF EXISTS {}", ours(&scratch)), "dropping the changes table").await
    }

    async fn drop_table(&self, c: &mut Conn, namespace: &str, table: &str) -> Result<bool, SinkError> {
        let result = c
            .execute(
                format!(
                    "DELETE FROM {} WHERE \"source_namespace\" = @P1 AND \"source_table\" = @P2",
                    bookkeeping_table("table_sync")
                ),
                &[&namespace, &table],
            )
            .await
            .map_err(self.fail("removing the bookkeeping row"))?;
        let removed = result.total() > 0;
        if removed {
            // The lookup tables stay, as the official client leaves them.
            self.batch(
                c,
                &format!("DROP TABLE IF EXISTS {}", table_name(namespace, table)),
                &format!("dropping {namespace}.{table}"),
            )
            .await?;
        }
        Ok(removed)
    }

    async fn latest_version_change(
        &self,
        c: &mut Conn,
        namespace: &str,
        history: &str,
    ) -> Result<Option<time::Micros>, SinkError> {
        let table = table_name(namespace, history);
        let reading = format!("reading {namespace}.{history}");
        let sql = format!("SELECT max({}), max({}) FROM {table}", ident(VALID_FROM), ident(VALID_TO));
        let rows = self.first_result(c, &sql, &[], &reading).await?;
        let at = |i: usize| {
            let at: Option<chrono::NaiveDateTime> = rows.first().and_then(|r| r.get(i));
            at.map(|at| at.and_utc().timestamp_micros())
        };
        Ok(at(0).max(at(1)))
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
        let scratch = format!("{}__{}__versions", versions.namespace, versions.name);
        self.batch(c, &create_scratch_sql(versions, &scratch, Span::Part), "creating the versions table").await?;
        self.bulk_load(c, versions, &scratch, Span::Part, rows).await?;
        let mut sql = Vec::new();
        if load.scope == VersionScope::Whole {
            sql.push(format!("DROP TABLE IF EXISTS {history}"));
            sql.extend(history_table_statements(&history, &name, versions, ident, column_type));
        }
        sql.extend(history_load_statements(&history, &ours(&scratch), versions, ident, load));
        self.begin(c).await?;
        for statement in sql {
            self.batch(c, &statement, &format!("writing {}.{name}", versions.namespace)).await?;
        }
        self.commit(c).await?;
        self.batch(c, &format!("DROP TABLE IF EXISTS {}", ours(&scratch)), "dropping the versions table").await
    }

    async fn lock_session(&self) -> Result<MssqlLockSession, SinkError> {
        let conn =
            self.connect_new().await.map_err(|e| database_error(&self.shown, "connecting for a table lock", e))?;
        Ok(MssqlLockSession { conn })
    }

    async fn try_lock(&self, s: &mut MssqlLockSession, namespace: &str, table: &str) -> Result<bool, SinkError> {
        let name = lock_name(&self.database, namespace, table);
        let action = format!("taking the lock of {namespace}.{table}");
        let rows = self
            .first_result(
                &mut s.conn,
                "DECLARE @result int; EXEC @result = sp_getapplock @Resource = @P1, @LockMode = 'Exclusive', @LockOwner = 'Session', @LockTimeout = 0; SELECT @result",
                &[&name.as_str()],
                &action,
            )
            .await?;
        Ok(rows.first().and_then(|r| r.get::<i32, _>(0)).is_some_and(|result| result >= 0))
    }

    async fn write_holder(
        &self,
        s: &mut MssqlLockSession,
        namespace: &str,
        table: &str,
        holder: &str,
    ) -> Result<(), SinkError> {
        let locks = ours("locks");
        s.conn
            .execute(
                format!(
                    "DELETE FROM {locks} WHERE \"namespace\" = @P1 AND \"table_name\" = @P2; INSERT INTO {locks} (\"namespace\", \"table_name\", \"holder\") VALUES (@P1, @P2, @P3)"
                ),
                &[&namespace, &table, &holder],
            )
            .await
            .map_err(self.fail("recording who holds a table's lock"))?;
        Ok(())
    }

    async fn read_holder(
        &self,
        s: &mut MssqlLockSession,
        namespace: &str,
        table: &str,
    ) -> Result<Option<String>, SinkError> {
        let action = "reading who holds a table's lock";
        let sql = format!(
            "SELECT CAST(\"holder\" AS nvarchar(512)) FROM {} WHERE \"namespace\" = @P1 AND \"table_name\" = @P2",
            ours("locks")
        );
        let rows = self.first_result(&mut s.conn, &sql, &[&namespace, &table], action).await?;
        Ok(rows.first().and_then(|r| r.get::<&str, _>(0)).map(str::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: ColumnType, required: bool) -> Column {
        Column { name: name.into(), ty, required, comment: None }
    }

    #[test]
    fn varchar_is_a_utf8_byte_budget_of_four_per_character() {
        let s = |n| col("s", ColumnType::Str { max_length: n, truncatable: false }, false);
        assert_eq!(column_type(&s(Some(255))), "varchar(1020)");
        assert_eq!(column_type(&s(Some(2000))), "varchar(8000)");
        assert_eq!(column_type(&s(Some(2001))), "varchar(max)");
        assert_eq!(column_type(&s(None)), "varchar(max)");
        assert_eq!(staging_type(&s(Some(255))).0, "nvarchar(510)", "room for 255 characters outside the BMP");
        assert_eq!(staging_type(&s(None)).0, "ntext", "any length survives the bulk load");
    }

    #[test]
    fn long_statements_are_not_cut_and_the_default_trusts_the_servers_certificate() {
        let url = ConnectionString::parse("mssql://u:p@db.example/dap").unwrap();
        let c = config(&url);
        assert_eq!(c.get_command_timeout(), None, "a long MERGE runs to its end");
        assert_eq!(c.get_addr(), "db.example:1433");
    }

    #[test]
    fn values_travel_at_full_precision_and_outside_the_range_are_refused() {
        let ts = column_data(Value::Timestamp(-1), Wire::DateTime2, NonFinite::Refuse).ok().unwrap();
        let ColumnData::DateTime2(Some(dt)) = ts else { panic!("a datetime2") };
        assert_eq!(dt.date().days(), 719_161, "1969-12-31");
        assert_eq!(dt.time().increments(), 863_999_999_990, "23:59:59.999999 in 100 ns");
        assert!(matches!(
            column_data(Value::Timestamp(-62_200_000_000_000_000), Wire::DateTime2, NonFinite::Refuse),
            Err(BadValue::OutOfRange(_))
        ));
        assert!(matches!(
            column_data(Value::Float(f64::NAN), Wire::Float, NonFinite::Refuse),
            Err(BadValue::NonFinite(_))
        ));
        assert!(matches!(
            column_data(Value::Float(f64::INFINITY), Wire::Float, NonFinite::Null),
            Ok(ColumnData::F64(None))
        ));
        let u =
            column_data(Value::Uuid(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff), Wire::Binary, NonFinite::Refuse).ok();
        assert!(matches!(u, Some(ColumnData::Binary(Some(b))) if b[0] == 0x00 && b[15] == 0xff), "RFC byte order");
    }
}
