//! PostgreSQL, in the official client's layout (spec §4.5-§4.7, §5.2): a schema per namespace,
//! `"ns"."table"`, enum types `"ns"."table__col"`, `instructure_dap.table_sync` and
//! `database_version` = 1, comments from the schema's descriptions. A [`Dialect`] of the load
//! protocol (`protocol.rs`).
//!
//! Bulk paths: initdb streams `COPY` into a staging table in our own schema (`dap_replica`), one
//! transaction per object with its checkpoint, then moves it into place with its primary key and
//! bookkeeping row in one transaction (or, when the table exists, replaces its rows in one
//! transaction, so the user's views, indexes, columns and constraints stay). syncdb copies the
//! changes into a temporary table and applies them set-based: upsert of whole rows, delete by
//! join, the new watermark, all in one transaction. Values travel as COPY text. A table's writer
//! holds a session advisory lock on a connection of its own; every connection waits for a
//! database lock at most the lock timeout (`lock_timeout`) and notices a dead peer by keepalives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::layout::{self, BOOKKEEPING_SCHEMA, DATABASE_VERSION, OUR_SCHEMA, StoredVersion, SyncColumnKind};
use super::protocol::{
    self, Dialect, Provision, Replaces, Staged, StoredBookkeeping, history_load_statements, history_table_statements,
    latest_change_of, latest_change_sql, lock_keys, lock_name,
};
use super::{
    Access, Bookkeeping, ConnectionString, Refusal, SinkError, SinkOptions, SslMode, VersionLoad, VersionScope,
};
use crate::decode::Record;
use crate::error::Retry;
use crate::feed::Pump;
use crate::schema::delta::{Change, SchemaDelta};
use crate::schema::versions::history_name;
use crate::schema::{Column, ColumnType, TableDef};
use crate::time;
use crate::value::{Value, format_float, format_uuid};

#[async_trait::async_trait]
impl Provision for PostgresDialect {
    async fn open(url: &ConnectionString, options: &SinkOptions) -> Result<Self, SinkError> {
        PostgresDialect::open(url, options).await
    }

    fn bookkeeping_statements() -> Vec<String> {
        bookkeeping_statements()
    }

    fn version_statements() -> Vec<String> {
        vec![version_statement()]
    }

    fn table_statements(def: &TableDef) -> Vec<String> {
        table_statements(def)
    }
}

/// Bytes of COPY data sent at a time.
const COPY_CHUNK: usize = 1 << 16;

/// A PostgreSQL database as the load protocol drives it.
pub struct PostgresDialect {
    shown: String,
    database: String,
    pool: Pool,
    lock_timeout: Duration,
}

/// Connections for the tables in flight: at most `parallelism`, reused while they stay healthy.
struct Pool {
    config: tokio_postgres::Config,
    tls: Tls,
    shown: String,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

/// A pooled connection, holding its place in the pool until it is released or dropped.
pub struct PgConn {
    client: Client,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for PgConn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

#[derive(Clone)]
enum Tls {
    Off,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Pool {
    async fn connect(&self, config: &tokio_postgres::Config) -> Result<Client, SinkError> {
        let fail = |e: tokio_postgres::Error| connect_error(&self.shown, config, e);
        let client = match &self.tls {
            Tls::Off => {
                let (client, conn) = config.connect(NoTls).await.map_err(fail)?;
                tokio::spawn(conn);
                client
            }
            Tls::Rustls(tls) => {
                let (client, conn) = config.connect(tls.clone()).await.map_err(fail)?;
                tokio::spawn(conn);
                client
            }
        };
        Ok(client)
    }

    async fn get(&self) -> Result<PgConn, SinkError> {
        let permit = self.permits.clone().acquire_owned().await.expect("the pool's semaphore is never closed");
        let idle = self.idle.lock().expect("pool lock").pop();
        let client = match idle {
            Some(c) if !c.is_closed() => c,
            _ => self.connect(&self.config).await?,
        };
        Ok(PgConn { client, _permit: permit })
    }
}

/// A quoted identifier: `"name"` with `"` doubled.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal; `E'…'` with backslash escapes when it holds control characters (as the
/// official client writes comments).
fn literal(s: &str) -> String {
    if s.chars().any(|c| c.is_control()) {
        let mut out = String::from("E'");
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\'' => out.push_str("''"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('\'');
        out
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

fn table_name(def: &TableDef) -> String {
    format!("{}.{}", ident(&def.namespace), ident(&def.name))
}

/// The staging table of an initdb, in our own schema.
fn staging_name(def: &TableDef) -> String {
    format!("{}.{}", ident(OUR_SCHEMA), ident(&staging_table(def)))
}

fn staging_table(def: &TableDef) -> String {
    format!("{}__{}", def.namespace, def.name)
}

/// The column type, as the official client's generator writes it (spec §4.5).
pub fn column_type(def: &TableDef, c: &Column) -> String {
    fn scalar(def: &TableDef, c: &Column, ty: &ColumnType) -> String {
        match ty {
            ColumnType::Int(16) => "smallint".into(),
            ColumnType::Int(32) => "integer".into(),
            ColumnType::Int(_) => "bigint".into(),
            ColumnType::IntEnum(values) => scalar(def, c, &ColumnType::Int(layout::int_enum_bits(values))),
            ColumnType::Float(32) => "real".into(),
            ColumnType::Float(_) => "double precision".into(),
            ColumnType::Decimal { precision, scale } => format!("decimal({precision}, {scale})"),
            ColumnType::Bool => "boolean".into(),
            ColumnType::Str { max_length: Some(n), .. } => format!("varchar({n})"),
            ColumnType::Str { max_length: None, .. } => "text".into(),
            ColumnType::Enum(_) => {
                format!("{}.{}", ident(&def.namespace), ident(&layout::column_enum(def, c).expect("an enum column")))
            }
            ColumnType::Timestamp => "timestamp".into(),
            ColumnType::Date => "date".into(),
            ColumnType::Time => "time".into(),
            ColumnType::Uuid => "uuid".into(),
            ColumnType::Ip | ColumnType::Ipv4 | ColumnType::Ipv6 => "inet".into(),
            // Arrays of objects or arrays are JSON (the official client's DDL breaks on them).
            ColumnType::Array(item)
                if matches!(**item, ColumnType::Object(_) | ColumnType::Array(_) | ColumnType::Json) =>
            {
                "jsonb".into()
            }
            ColumnType::Array(item) => format!("{} ARRAY", scalar(def, c, item)),
            ColumnType::Object(_) | ColumnType::Json => "jsonb".into(),
        }
    }
    scalar(def, c, &c.ty)
}

fn column_sql(def: &TableDef, c: &Column) -> String {
    format!("{} {}{}", ident(&c.name), column_type(def, c), if c.required { " NOT NULL" } else { "" })
}

/// `CREATE TYPE` for each enum of the table (nested ones too, as the official client does).
fn enum_statements(def: &TableDef) -> Vec<String> {
    layout::enum_types(def)
        .into_iter()
        .map(|e| {
            let labels: Vec<String> = e.values.iter().map(|v| literal(v)).collect();
            format!("CREATE TYPE {}.{} AS ENUM ({})", ident(&def.namespace), ident(&e.name), labels.join(", "))
        })
        .collect()
}

fn comment_statements(def: &TableDef, table: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = &def.comment {
        out.push(format!("COMMENT ON TABLE {table} IS {}", literal(c)));
    }
    for c in def.columns() {
        if let Some(text) = &c.comment {
            out.push(format!("COMMENT ON COLUMN {table}.{} IS {}", ident(&c.name), literal(text)));
        }
    }
    out
}

/// The bookkeeping tables exactly as the official client creates them.
pub fn bookkeeping_statements() -> Vec<String> {
    let schema = ident(BOOKKEEPING_SCHEMA);
    let columns: Vec<String> = layout::TABLE_SYNC_COLUMNS
        .iter()
        .map(|c| {
            let ty = match c.kind {
                SyncColumnKind::Identity => "bigint GENERATED BY DEFAULT AS IDENTITY",
                SyncColumnKind::Name => "varchar(64)",
                SyncColumnKind::Timestamp => "timestamp",
                SyncColumnKind::BigInt => "bigint",
                SyncColumnKind::Text => "text",
            };
            let not_null = if c.required && c.kind != SyncColumnKind::Identity { " NOT NULL" } else { "" };
            format!("{} {ty}{not_null}", ident(c.name))
        })
        .collect();
    let mut out = vec![
        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
        format!(
            "CREATE TABLE {schema}.\"database_version\" (\"version\" bigint GENERATED BY DEFAULT AS IDENTITY, CONSTRAINT \"pk_database_version\" PRIMARY KEY (\"version\"))"
        ),
        format!("COMMENT ON TABLE {schema}.\"database_version\" IS {}", literal(layout::DATABASE_VERSION_COMMENT)),
        format!(
            "COMMENT ON COLUMN {schema}.\"database_version\".\"version\" IS {}",
            literal(layout::VERSION_COLUMN_COMMENT)
        ),
        format!(
            "CREATE TABLE {schema}.\"table_sync\" ({}, CONSTRAINT \"pk_table_sync\" PRIMARY KEY (\"id\"))",
            columns.join(", ")
        ),
        format!("COMMENT ON TABLE {schema}.\"table_sync\" IS {}", literal(layout::TABLE_SYNC_COMMENT)),
    ];
    for c in layout::TABLE_SYNC_COLUMNS.iter().filter(|c| !c.comment.is_empty()) {
        out.push(format!("COMMENT ON COLUMN {schema}.\"table_sync\".{} IS {}", ident(c.name), literal(c.comment)));
    }
    out
}

/// Stores version 1; a second run of the same script leaves the row as it is.
fn version_statement() -> String {
    format!(
        "INSERT INTO {}.\"database_version\" (\"version\") VALUES ({DATABASE_VERSION}) ON CONFLICT DO NOTHING",
        ident(BOOKKEEPING_SCHEMA)
    )
}

/// The DDL of a table as the official client's initdb creates it on an empty database: its
/// schema, enum types, the table with its primary key, and comments.
pub fn table_statements(def: &TableDef) -> Vec<String> {
    let mut out = vec![format!("CREATE SCHEMA IF NOT EXISTS {}", ident(&def.namespace))];
    out.extend(enum_statements(def));
    let columns: Vec<String> = def.columns().map(|c| column_sql(def, c)).collect();
    out.push(format!(
        "CREATE TABLE {} ({}, CONSTRAINT {} PRIMARY KEY ({}))",
        table_name(def),
        columns.join(", "),
        ident(&format!("pk_{}", def.name)),
        ident(&def.key.name)
    ));
    out.extend(comment_statements(def, &table_name(def)));
    out
}

/// Whether a retry of the same work may succeed after this error.
fn retry_of(e: &tokio_postgres::Error) -> Retry {
    if e.is_closed() {
        return Retry::MayHelp;
    }
    match e.code() {
        Some(code)
            if code == &SqlState::T_R_SERIALIZATION_FAILURE
                || code == &SqlState::T_R_DEADLOCK_DETECTED
                || code == &SqlState::ADMIN_SHUTDOWN
                || code == &SqlState::CRASH_SHUTDOWN
                || code == &SqlState::CANNOT_CONNECT_NOW
                || code == &SqlState::LOCK_NOT_AVAILABLE
                || code.code().starts_with("08")
                || code.code().starts_with("53") =>
        {
            Retry::MayHelp
        }
        Some(_) => Retry::Useless,
        None => Retry::MayHelp, // an I/O error: the connection is gone
    }
}

/// The server's message with its detail and hint, or the driver's (and its causes').
fn message_of(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = db.message().to_string();
        if let Some(d) = db.detail() {
            m.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            m.push_str(&format!("; hint: {h}"));
        }
        return m;
    }
    let mut m = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !m.contains(&text) {
            m.push_str(&format!(": {text}"));
        }
        source = s.source();
    }
    m
}

fn database_error(shown: &str, action: &str, e: tokio_postgres::Error) -> SinkError {
    SinkError::Database {
        target: shown.to_string(),
        action: action.to_string(),
        detail: message_of(&e),
        retry: retry_of(&e),
        source: Some(Box::new(e)),
    }
}

/// A failed connection, explained: what failed, and what to do.
fn connect_error(shown: &str, config: &tokio_postgres::Config, e: tokio_postgres::Error) -> SinkError {
    let user = config.get_user().unwrap_or("?");
    let db = config.get_dbname().unwrap_or("?");
    let detail = message_of(&e);
    let (hint, retry) = match e.code() {
        Some(c) if c == &SqlState::INVALID_PASSWORD || c == &SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            (format!("the server refused the login of user {user}; check the user and password"), Retry::Useless)
        }
        Some(c) if c == &SqlState::INVALID_CATALOG_NAME => {
            (format!("database {db} does not exist; create it (CREATE DATABASE \"{db}\") or fix the name"), Retry::Useless)
        }
        Some(_) => ("the server refused the connection".into(), Retry::Useless),
        None if detail.contains("does not support TLS") => (
            "the server does not offer TLS but ?ssl= requires it; enable TLS on the server or use ?ssl=prefer".into(),
            Retry::Useless,
        ),
        None if detail.contains("certificate") || detail.contains("TLS") || detail.contains("tls") => (
            "the server's TLS certificate was not accepted; give its CA with ?sslrootcert=FILE, or use ?ssl=require to encrypt without verifying".into(),
            Retry::Useless,
        ),
        None => ("cannot reach the server; check the host and port, and that it is running".into(), Retry::MayHelp),
    };
    SinkError::Database {
        target: shown.to_string(),
        action: "connecting".into(),
        detail: format!("{hint} ({detail})"),
        retry,
        source: Some(Box::new(e)),
    }
}

/// The rustls configuration for an `ssl` mode: `require` (and `prefer`, `allow`) encrypt
/// without verifying, as the official client does; `verify-ca` checks the chain, `verify-full`
/// the chain and the host name, against `sslrootcert` or the system's roots.
fn tls_config(url: &ConnectionString, shown: &str) -> Result<Option<rustls::ClientConfig>, SinkError> {
    use rustls::pki_types::pem::PemObject;
    let mode = url.ssl.unwrap_or(SslMode::Prefer);
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SinkError::refused(shown, Refusal::NotAllowed, format!("TLS setup failed: {e}")))?;
    if matches!(mode, SslMode::Allow | SslMode::Prefer | SslMode::Require) {
        let verifier = Arc::new(tls::AcceptAny(provider));
        return Ok(Some(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()));
    }
    let mut roots = rustls::RootCertStore::empty();
    match &url.ssl_root_cert {
        Some(file) => {
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(file)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    SinkError::refused(
                        shown,
                        Refusal::NotAllowed,
                        format!("cannot read sslrootcert {}: {e}", file.display()),
                    )
                })?;
            for c in certs {
                roots.add(c).map_err(|e| {
                    SinkError::refused(shown, Refusal::NotAllowed, format!("sslrootcert {}: {e}", file.display()))
                })?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| SinkError::refused(shown, Refusal::NotAllowed, format!("TLS setup failed: {e}")))?;
    let config = if mode == SslMode::VerifyCa {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(tls::ChainOnly(webpki))).with_no_client_auth()
    } else {
        builder.with_webpki_verifier(webpki).with_no_client_auth()
    };
    Ok(Some(config))
}

mod tls {
    //! Certificate checks for the `require` and `verify-ca` modes.
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

    /// `require`: encrypted, the certificate not checked (libpq's and the official client's meaning).
    #[derive(Debug)]
    pub struct AcceptAny(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `verify-ca`: the chain must lead to a trusted root; the host name is not compared.
    #[derive(Debug)]
    pub struct ChainOnly(pub Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end: &CertificateDer<'_>,
            chain: &[CertificateDer<'_>],
            name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self.0.verify_server_cert(end, chain, name, ocsp, now) {
                Err(Error::InvalidCertificate(CertificateError::NotValidForName))
                | Err(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                    Ok(ServerCertVerified::assertion())
                }
                other => other,
            }
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

/// Appends `s` escaped for COPY text format.
fn copy_escape(s: &str, out: &mut Vec<u8>) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// A JSON array as a PostgreSQL array literal: `{"a","b\"q",NULL,3}`.
fn array_literal(items: &[serde_json::Value]) -> String {
    let mut s = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        match item {
            serde_json::Value::Null => s.push_str("NULL"),
            serde_json::Value::String(text) => {
                s.push('"');
                for c in text.chars() {
                    if c == '"' || c == '\\' {
                        s.push('\\');
                    }
                    s.push(c);
                }
                s.push('"');
            }
            other => s.push_str(&other.to_string()),
        }
    }
    s.push('}');
    s
}

/// Appends one value in COPY text form.
fn encode(v: &Value, ty: &ColumnType, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"\\N"),
        Value::Bool(b) => out.push(if *b { b't' } else { b'f' }),
        Value::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Value::Float(f) => out.extend_from_slice(format_float(*f).as_bytes()),
        Value::Decimal(d) => out.extend_from_slice(d.to_string().as_bytes()),
        Value::Str(s) => copy_escape(s, out),
        Value::Timestamp(us) => {
            let fixed = time::format_fixed(*us); // YYYY-MM-DDTHH:MM:SS.ffffffZ
            out.extend_from_slice(&fixed.as_bytes()[..10]);
            out.push(b' ');
            out.extend_from_slice(&fixed.as_bytes()[11..fixed.len() - 1]);
        }
        Value::Date(d) => out.extend_from_slice(time::format_date(*d).as_bytes()),
        Value::Time(us) => out.extend_from_slice(time::format_time_of_day(*us).as_bytes()),
        Value::Uuid(u) => out.extend_from_slice(format_uuid(*u).as_bytes()),
        Value::Ip(ip) => out.extend_from_slice(ip.to_string().as_bytes()),
        Value::Json(j) => match (ty, j) {
            (ColumnType::Array(item), serde_json::Value::Array(items))
                if !matches!(**item, ColumnType::Object(_) | ColumnType::Array(_) | ColumnType::Json) =>
            {
                copy_escape(&array_literal(items), out)
            }
            _ => copy_escape(&j.to_string(), out),
        },
    }
}

/// Appends a record as one COPY line: optionally its action, then the key and value columns.
fn encode_record(def: &TableDef, r: &Record, with_action: bool, out: &mut Vec<u8>) {
    if with_action {
        out.push(if r.action == Some('D') { b'D' } else { b'U' });
        out.push(b'\t');
    }
    encode(&r.key, &def.key.ty, out);
    for (v, c) in r.values.iter().zip(&def.values) {
        out.push(b'\t');
        encode(v, &c.ty, out);
    }
    out.push(b'\n');
}

fn column_list(def: &TableDef) -> String {
    def.columns().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ")
}

impl PostgresDialect {
    pub async fn open(url: &ConnectionString, options: &SinkOptions) -> Result<PostgresDialect, SinkError> {
        let shown = url.redacted();
        let mut config = tokio_postgres::Config::new();
        config.host(url.host.as_deref().unwrap_or("localhost"));
        config.port(url.port_or_default());
        config.dbname(&url.database);
        config.application_name("dap-replica");
        if let Some(u) = &url.user {
            config.user(u);
        }
        if let Some(p) = &url.password {
            config.password(p.expose());
        }
        config.connect_timeout(Duration::from_secs(30));
        // A peer that stops answering is noticed (and the work rolled back) within minutes.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(60));
        config.keepalives_interval(Duration::from_secs(15));
        config.keepalives_retries(4);
        // Notices ("already exists, skipping") are not news to anyone; no statement waits for a
        // database lock longer than the lock timeout.
        config.options(format!(
            "-c client_min_messages=warning -c lock_timeout={}",
            options.lock_timeout.as_millis().max(1)
        ));
        let tls = match tls_config(url, &shown)? {
            None => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                Tls::Off
            }
            Some(rustls_config) => {
                config.ssl_mode(match url.ssl.unwrap_or(SslMode::Prefer) {
                    SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                    _ => tokio_postgres::config::SslMode::Require,
                });
                Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(rustls_config))
            }
        };
        let pool = Pool {
            config,
            tls,
            shown: shown.clone(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(options.parallelism.max(1))),
        };
        let dialect =
            PostgresDialect { shown, database: url.database.clone(), pool, lock_timeout: options.lock_timeout };
        let c = dialect.pool.get().await?;
        if options.access == Access::Write {
            protocol::prepared_alone(&dialect, dialect.prepare(&c)).await?;
        }
        dialect.release(c);
        Ok(dialect)
    }

    fn fail(&self, action: &str) -> impl Fn(tokio_postgres::Error) -> SinkError + '_ {
        let action = action.to_string();
        move |e| database_error(&self.shown, &action, e)
    }

    fn refused(&self, kind: Refusal, detail: String) -> SinkError {
        SinkError::refused(&self.shown, kind, detail)
    }

    /// Whether the database has the official client's bookkeeping table.
    async fn has_bookkeeping(&self, c: &Client) -> Result<bool, SinkError> {
        let row = c
            .query_one("SELECT to_regclass('\"instructure_dap\".\"table_sync\"') IS NOT NULL", &[])
            .await
            .map_err(self.fail("reading the catalog"))?;
        Ok(row.get(0))
    }

    /// Creates the bookkeeping tables with version 1 when missing, in one transaction, and our
    /// own schema with its tables; refuses a database whose version is not 1 (the official
    /// client would migrate or overwrite it).
    async fn prepare(&self, c: &Client) -> Result<(), SinkError> {
        let exists = self.has_bookkeeping(c).await?;
        if !exists {
            let mut statements = bookkeeping_statements();
            statements.push(version_statement());
            let sql = format!("BEGIN; {}; COMMIT", statements.join(";\n"));
            if let Err(e) = c.batch_execute(&sql).await {
                let _ = c.batch_execute("ROLLBACK").await;
                if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                    return Err(self.refused(
                        Refusal::NotAllowed,
                        format!(
                            "the user may not create the bookkeeping schema instructure_dap ({}); grant CREATE on database {} (or have an administrator run the output of `dap ddl --dialect postgresql`)",
                            message_of(&e),
                            self.database
                        ),
                    ));
                }
                return Err(database_error(&self.shown, "creating the bookkeeping tables", e));
            }
        }
        let versions: Vec<i64> = c
            .query(&format!("SELECT \"version\" FROM {}.\"database_version\"", ident(BOOKKEEPING_SCHEMA)), &[])
            .await
            .map_err(self.fail("reading the database version"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let stored = StoredVersion::of(&versions);
        if stored == StoredVersion::Missing {
            let watermarks: i64 = c
                .query_one(&format!("SELECT count(*) FROM {}.\"table_sync\"", ident(BOOKKEEPING_SCHEMA)), &[])
                .await
                .map_err(self.fail("reading the watermarks"))?
                .get(0);
            if let Some(why) =
                stored.refusal("instructure_dap.database_version", "instructure_dap.table_sync", watermarks as u64)
            {
                return Err(self.refused(Refusal::Incompatible, why));
            }
            c.batch_execute(&version_statement()).await.map_err(self.fail("writing the database version"))?;
        } else if let Some(why) = stored.refusal("instructure_dap.database_version", "instructure_dap.table_sync", 0) {
            return Err(self.refused(Refusal::Incompatible, why));
        }
        // Our own schema: checkpoints of unfinished initdbs, and who holds which table's lock.
        c.batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('dap_replica ddl'));
             CREATE SCHEMA IF NOT EXISTS {ours};
             CREATE TABLE IF NOT EXISTS {ours}.\"checkpoints\" (namespace text NOT NULL, table_name text NOT NULL, job_id text NOT NULL, object text NOT NULL, PRIMARY KEY (namespace, table_name, object));
             CREATE TABLE IF NOT EXISTS {ours}.\"locks\" (namespace text NOT NULL, table_name text NOT NULL, holder text NOT NULL, PRIMARY KEY (namespace, table_name));
             COMMIT",
            ours = ident(OUR_SCHEMA)
        ))
        .await
        .map_err(self.fail("creating the schema dap_replica"))
    }

    async fn exists(&self, c: &Client, schema: &str, table: &str) -> Result<bool, SinkError> {
        Ok(c.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2)",
            &[&schema, &table],
        )
        .await
        .map_err(self.fail("reading the catalog"))?
        .get(0))
    }

    /// Creates the namespace's schema and the
    /// table's enum types when missing, and adds enum values the types lack, committed before
    /// any row needs them (PostgreSQL cannot use an enum value in the transaction that added
    /// it). Tables in flight at once serialise this on an advisory lock, since `IF NOT EXISTS`
    /// does not keep two sessions from creating the same schema. Harmless to repeat.
    async fn ensure_types(&self, c: &Client, def: &TableDef) -> Result<(), SinkError> {
        c.batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('dap_replica ddl'));
             CREATE SCHEMA IF NOT EXISTS {ns}",
            ns = ident(&def.namespace)
        ))
        .await
        .map_err(self.fail(&format!("creating schema {}", def.namespace)))?;
        let created = self.ensure_enum_types(c, def).await;
        let ended = c.batch_execute(if created.is_ok() { "COMMIT" } else { "ROLLBACK" }).await;
        created?;
        ended.map_err(self.fail("committing the enum types"))
    }

    async fn ensure_enum_types(&self, c: &Client, def: &TableDef) -> Result<(), SinkError> {
        for e in layout::enum_types(def) {
            let existing: Vec<String> = c
                .query(
                    "SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
                     JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = $1 AND t.typname = $2 ORDER BY e.enumsortorder",
                    &[&def.namespace, &e.name],
                )
                .await
                .map_err(self.fail("reading enum types"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let qualified = format!("{}.{}", ident(&def.namespace), ident(&e.name));
            if existing.is_empty() {
                let labels: Vec<String> = e.values.iter().map(|v| literal(v)).collect();
                c.batch_execute(&format!("CREATE TYPE {qualified} AS ENUM ({})", labels.join(", ")))
                    .await
                    .map_err(self.fail(&format!("creating type {}", e.name)))?;
                continue;
            }
            for v in e.values.iter().filter(|v| !existing.contains(v)) {
                c.batch_execute(&format!("ALTER TYPE {qualified} ADD VALUE IF NOT EXISTS {}", literal(v)))
                    .await
                    .map_err(self.fail(&format!("adding value {v} to type {}", e.name)))?;
            }
        }
        Ok(())
    }

    /// Streams records into `COPY … FROM STDIN` until the pump's span ends. Changes carry their
    /// action as the first column.
    async fn copy_rows(
        &self,
        c: &Client,
        def: &TableDef,
        copy_sql: &str,
        with_action: bool,
        rows: &mut Pump<'_>,
    ) -> Result<(), SinkError> {
        let copying = format!("copying rows into {}", def.name);
        let sink = c.copy_in::<_, bytes::Bytes>(copy_sql).await.map_err(self.fail("starting COPY"))?;
        let mut sink = std::pin::pin!(sink);
        let mut buf = Vec::with_capacity(COPY_CHUNK * 2);
        while let Some(batch) = rows.next_batch().await? {
            for r in &batch {
                encode_record(def, r, with_action, &mut buf);
                if buf.len() >= COPY_CHUNK {
                    let chunk = bytes::Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(COPY_CHUNK * 2)));
                    sink.send(chunk).await.map_err(self.fail(&copying))?;
                }
            }
        }
        if !buf.is_empty() {
            sink.send(bytes::Bytes::from(buf)).await.map_err(self.fail(&copying))?;
        }
        sink.as_mut().finish().await.map_err(self.fail(&copying))?;
        Ok(())
    }

    async fn write_table_sync(&self, c: &Client, b: &Bookkeeping) -> Result<(), SinkError> {
        let schema = ident(BOOKKEEPING_SCHEMA);
        let ts = time::format_fixed(b.watermark).replace('T', " ").trim_end_matches('Z').to_string();
        let version = i64::from(b.schema_version);
        let updated = c
            .execute(
                &format!(
                    "UPDATE {schema}.\"table_sync\" SET \"timestamp\" = CAST($1::text AS timestamp), schema_version = $2, schema_description = $3
                     WHERE id = (SELECT min(id) FROM {schema}.\"table_sync\" WHERE source_namespace = $4 AND source_table = $5)"
                ),
                &[&ts, &version, &b.schema_description, &b.namespace, &b.table],
            )
            .await
            .map_err(self.fail("updating instructure_dap.table_sync"))?;
        if updated == 0 {
            c.execute(
                &format!(
                    "INSERT INTO {schema}.\"table_sync\" (source_namespace, source_table, \"timestamp\", schema_version, target_schema, target_table, schema_description_format, schema_description)
                     VALUES ($1, $2, CAST($3::text AS timestamp), $4, $1, $2, 'json', $5)"
                ),
                &[&b.namespace, &b.table, &ts, &version, &b.schema_description],
            )
            .await
            .map_err(self.fail("writing instructure_dap.table_sync"))?;
        }
        Ok(())
    }

    /// The DDL of a delta, in the transaction that applies it. PostgreSQL refuses to change the
    /// type of a column a view uses, so the views on the table (and on those views) are set
    /// aside around type changes and recreated as they were, in the same transaction.
    async fn apply_delta(&self, c: &Client, def: &TableDef, delta: &SchemaDelta) -> Result<(), SinkError> {
        let retypes = delta.changes.iter().any(|ch| match ch {
            Change::Widen { column, from } => {
                column_type(def, &Column { ty: from.clone(), ..column.clone() }) != column_type(def, column)
            }
            Change::Retype { .. } => true,
            _ => false,
        });
        let views = if retypes { self.set_views_aside(c, def).await? } else { Vec::new() };
        self.delta_statements(c, def, delta).await?;
        for sql in views {
            c.batch_execute(&sql).await.map_err(self.fail(&format!("recreating a view on {}", def.name)))?;
        }
        Ok(())
    }

    /// Drops the views that depend on the table (directly or through other views) and returns
    /// the statements that recreate them, with their comments and grants, in dependency order.
    async fn set_views_aside(&self, c: &Client, def: &TableDef) -> Result<Vec<String>, SinkError> {
        let rows = c
            .query(
                "WITH RECURSIVE deps(oid, depth) AS (
                   SELECT DISTINCT r.ev_class, 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                   WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = to_regclass($1) AND r.ev_class <> d.refobjid
                   UNION
                   SELECT DISTINCT r.ev_class, deps.depth + 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                   JOIN deps ON d.refobjid = deps.oid
                   WHERE d.classid = 'pg_rewrite'::regclass AND r.ev_class <> deps.oid AND deps.depth < 50)
                 SELECT format('%I.%I', n.nspname, v.relname), v.relkind::text, pg_get_viewdef(v.oid),
                        obj_description(v.oid, 'pg_class'), array_to_string(v.reloptions, ', '), max(deps.depth)
                 FROM deps JOIN pg_class v ON v.oid = deps.oid JOIN pg_namespace n ON n.oid = v.relnamespace
                 GROUP BY 1, 2, 3, 4, 5 ORDER BY max(deps.depth)",
                &[&table_name(def)],
            )
            .await
            .map_err(self.fail("reading the views on the table"))?;
        let mut recreate = Vec::new();
        for r in &rows {
            let (name, kind, body): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let (comment, options): (Option<String>, Option<String>) = (r.get(3), r.get(4));
            let materialized = kind == "m";
            let with = options.filter(|o| !o.is_empty()).map(|o| format!(" WITH ({o})")).unwrap_or_default();
            let what = if materialized { "MATERIALIZED VIEW" } else { "VIEW" };
            recreate.push(format!("CREATE {what} {name}{with} AS {}", body.trim_end_matches(';')));
            if let Some(text) = comment {
                recreate.push(format!("COMMENT ON {what} {name} IS {}", literal(&text)));
            }
            let grants = c
                .query(
                    "SELECT DISTINCT format('GRANT %s ON %s TO %s', privilege_type, $1::text,
                            CASE WHEN grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(grantee) END)
                     FROM information_schema.role_table_grants
                     WHERE format('%I.%I', table_schema, table_name) = $1 AND grantee <> current_user",
                    &[&name],
                )
                .await
                .map_err(self.fail("reading the grants of a view"))?;
            recreate.extend(grants.iter().map(|g| g.get::<_, String>(0)));
        }
        for r in rows.iter().rev() {
            let (name, kind): (String, String) = (r.get(0), r.get(1));
            let what = if kind == "m" { "MATERIALIZED VIEW" } else { "VIEW" };
            c.batch_execute(&format!("DROP {what} {name}"))
                .await
                .map_err(self.fail(&format!("setting view {name} aside")))?;
        }
        Ok(recreate)
    }

    async fn delta_statements(&self, c: &Client, def: &TableDef, delta: &SchemaDelta) -> Result<(), SinkError> {
        let table = table_name(def);
        for change in &delta.changes {
            let sql = match change {
                Change::Add(col) => {
                    let mut sql = format!("ALTER TABLE {table} ADD COLUMN {}", column_sql(def, col));
                    if let Some(text) = &col.comment {
                        sql.push_str(&format!("; COMMENT ON COLUMN {table}.{} IS {}", ident(&col.name), literal(text)));
                    }
                    sql
                }
                Change::Widen { column, from } => {
                    let before = column_type(def, &Column { ty: from.clone(), ..column.clone() });
                    let after = column_type(def, column);
                    if before == after {
                        continue; // new enum values or nested members: no column DDL
                    }
                    format!(
                        "ALTER TABLE {table} ALTER COLUMN {0} SET DATA TYPE {after} USING {0}::{after}",
                        ident(&column.name)
                    )
                }
                Change::DropNotNull(name) => format!("ALTER TABLE {table} ALTER COLUMN {} DROP NOT NULL", ident(name)),
                Change::SetNotNull(name) => format!("ALTER TABLE {table} ALTER COLUMN {} SET NOT NULL", ident(name)),
                Change::Retype { column, .. } => {
                    let after = column_type(def, column);
                    format!(
                        "ALTER TABLE {table} ALTER COLUMN {} SET DATA TYPE {after} USING NULL::{after}",
                        ident(&column.name)
                    )
                }
            };
            c.batch_execute(&sql).await.map_err(|e| {
                if let (Some(&SqlState::NOT_NULL_VIOLATION), Change::SetNotNull(name)) = (e.code(), change) {
                    SinkError::required_over_nulls(&self.shown, def, name, None)
                } else {
                    database_error(&self.shown, &format!("changing the schema of {}", def.name), e)
                }
            })?;
        }
        Ok(())
    }

    /// Applies the staged changes: the latest record per key wins; upserts of whole rows (the
    /// schema's columns; a user's own columns keep their values), then deletes by join.
    async fn merge(&self, c: &Client, def: &TableDef, table: &str, key: &str) -> Result<(), SinkError> {
        let columns = column_list(def);
        let updates: Vec<String> = def.values.iter().map(|v| format!("{0} = EXCLUDED.{0}", ident(&v.name))).collect();
        // Rows that arrive unchanged (the overlap a sync re-reads) are not rewritten.
        let values: Vec<String> = def.values.iter().map(|v| ident(&v.name)).collect();
        let unchanged = format!(
            "({}) IS DISTINCT FROM ({})",
            values.iter().map(|v| format!("{table}.{v}")).collect::<Vec<_>>().join(", "),
            values.iter().map(|v| format!("EXCLUDED.{v}")).collect::<Vec<_>>().join(", ")
        );
        let on_conflict = if updates.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {} WHERE {unchanged}", updates.join(", "))
        };
        // A consolidated feed has each key once; only a repeated key needs the (wide) sort that
        // keeps its latest record.
        let repeated: bool = c
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM \"_dap_changes\" GROUP BY {key} HAVING count(*) > 1)"),
                &[],
            )
            .await
            .map_err(self.fail("looking for repeated keys"))?
            .get(0);
        let latest = if repeated {
            format!("SELECT DISTINCT ON ({key}) * FROM \"_dap_changes\" ORDER BY {key}, \"_dap_seq\" DESC")
        } else {
            "SELECT * FROM \"_dap_changes\"".to_string()
        };
        c.batch_execute(&format!(
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM ({latest}) latest WHERE \"_dap_action\" = 'U' ON CONFLICT ({key}) {on_conflict};
             DELETE FROM {table} t USING ({latest}) latest WHERE latest.\"_dap_action\" = 'D' AND t.{key} = latest.{key}"
        ))
        .await
        .map_err(self.fail(&format!("applying the changes to {}", def.name)))
    }
}

/// A session holding advisory locks: a connection of its own, outside the pool.
pub struct PgLockSession {
    client: Client,
}

#[async_trait::async_trait]
impl Dialect for PostgresDialect {
    type Conn = PgConn;
    type LockSession = PgLockSession;

    fn target(&self) -> &str {
        &self.shown
    }

    fn table_sql(&self, namespace: &str, table: &str) -> String {
        format!("{}.{}", ident(namespace), ident(table))
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

    async fn connect(&self) -> Result<PgConn, SinkError> {
        self.pool.get().await
    }

    fn release(&self, c: PgConn) {
        if !c.client.is_closed() {
            self.pool.idle.lock().expect("pool lock").push(c.client);
        }
    }

    async fn begin(&self, c: &mut PgConn) -> Result<(), SinkError> {
        c.batch_execute("BEGIN").await.map_err(self.fail("starting a transaction"))
    }

    async fn commit(&self, c: &mut PgConn) -> Result<(), SinkError> {
        c.batch_execute("COMMIT").await.map_err(self.fail("committing"))
    }

    async fn stored_bookkeeping(
        &self,
        c: &mut PgConn,
        namespace: &str,
        table: Option<&str>,
    ) -> Result<Vec<StoredBookkeeping>, SinkError> {
        let exists = self.has_bookkeeping(c).await?;
        if !exists {
            return Ok(Vec::new());
        }
        let rows = c
            .query(
                &format!(
                    "SELECT source_namespace, source_table, \"timestamp\"::text, schema_version, schema_description
                     FROM {}.\"table_sync\" WHERE source_namespace = $1 AND ($2::text IS NULL OR source_table = $2) ORDER BY source_table, id",
                    ident(BOOKKEEPING_SCHEMA)
                ),
                &[&namespace, &table],
            )
            .await
            .map_err(self.fail("reading instructure_dap.table_sync"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let ts: String = r.get(2);
                StoredBookkeeping {
                    namespace: r.get(0),
                    table: r.get(1),
                    watermark: time::parse_rfc3339(&format!("{}Z", ts.replace(' ', "T"))).map_err(|_| ts.clone()),
                    schema_version: r.get(3),
                    schema_description: r.get(4),
                }
            })
            .collect())
    }

    async fn write_bookkeeping(&self, c: &mut PgConn, b: &Bookkeeping) -> Result<(), SinkError> {
        self.write_table_sync(c, b).await
    }

    async fn row_count(&self, c: &mut PgConn, namespace: &str, table: &str) -> Result<u64, SinkError> {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {}.{}", ident(namespace), ident(table)), &[])
            .await
            .map_err(self.fail(&format!("counting {namespace}.{table}")))?
            .get(0);
        Ok(n as u64)
    }

    async fn table_exists(&self, c: &mut PgConn, namespace: &str, table: &str) -> Result<bool, SinkError> {
        self.exists(c, namespace, table).await
    }

    async fn column_names(&self, c: &mut PgConn, namespace: &str, table: &str) -> Result<Vec<String>, SinkError> {
        Ok(c.query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&format!("{}.{}", ident(namespace), ident(table))],
        )
        .await
        .map_err(self.fail("reading the table's columns"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
    }

    async fn checkpoints(&self, c: &mut PgConn, def: &TableDef) -> Result<Vec<(String, String)>, SinkError> {
        Ok(c.query(
            &format!(
                "SELECT job_id, object FROM {}.\"checkpoints\" WHERE namespace = $1 AND table_name = $2",
                ident(OUR_SCHEMA)
            ),
            &[&def.namespace, &def.name],
        )
        .await
        .map_err(self.fail("reading checkpoints"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }

    async fn checkpoint_counts(&self, c: &mut PgConn, namespace: &str) -> Result<Vec<(String, u64)>, SinkError> {
        if !self.exists(c, OUR_SCHEMA, "checkpoints").await? {
            return Ok(Vec::new());
        }
        Ok(c.query(
            &format!(
                "SELECT table_name, count(*) FROM {}.\"checkpoints\" WHERE namespace = $1 GROUP BY table_name ORDER BY table_name",
                ident(OUR_SCHEMA)
            ),
            &[&namespace],
        )
        .await
        .map_err(self.fail("reading checkpoints"))?
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
        .collect())
    }

    async fn staging_exists(&self, c: &mut PgConn, def: &TableDef) -> Result<bool, SinkError> {
        self.exists(c, OUR_SCHEMA, &staging_table(def)).await
    }

    async fn create_staging(&self, c: &mut PgConn, def: &TableDef) -> Result<(), SinkError> {
        self.ensure_types(c, def).await?;
        let columns: Vec<String> = def.columns().map(|col| column_sql(def, col)).collect();
        c.batch_execute(&format!(
            "BEGIN;
             DELETE FROM {0}.\"checkpoints\" WHERE namespace = {1} AND table_name = {2};
             DROP TABLE IF EXISTS {3};
             CREATE TABLE {3} ({4});
             COMMIT",
            ident(OUR_SCHEMA),
            literal(&def.namespace),
            literal(&def.name),
            staging_name(def),
            columns.join(", ")
        ))
        .await
        .map_err(self.fail(&format!("creating the staging table of {}", def.name)))
    }

    async fn drop_staging(&self, c: &mut PgConn, def: &TableDef) -> Result<(), SinkError> {
        c.batch_execute(&format!(
            "BEGIN;
             DELETE FROM {0}.\"checkpoints\" WHERE namespace = {1} AND table_name = {2};
             DROP TABLE IF EXISTS {3};
             COMMIT",
            ident(OUR_SCHEMA),
            literal(&def.namespace),
            literal(&def.name),
            staging_name(def),
        ))
        .await
        .map_err(self.fail(&format!("dropping the staging table of {}", def.name)))
    }

    async fn load_part(&self, c: &mut PgConn, def: &TableDef, rows: &mut Pump<'_>) -> Result<(), SinkError> {
        let copy_sql = format!("COPY {} ({}) FROM STDIN", staging_name(def), column_list(def));
        self.copy_rows(c, def, &copy_sql, false, rows).await
    }

    async fn record_checkpoint(&self, c: &mut PgConn, def: &TableDef, job: &str, part: &str) -> Result<(), SinkError> {
        c.execute(
            &format!(
                "INSERT INTO {}.\"checkpoints\" (namespace, table_name, job_id, object) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                ident(OUR_SCHEMA)
            ),
            &[&def.namespace, &def.name, &job, &part],
        )
        .await
        .map_err(self.fail("recording a checkpoint"))?;
        Ok(())
    }

    async fn staged_rows(&self, c: &mut PgConn, def: &TableDef) -> Result<u64, SinkError> {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {}", staging_name(def)), &[])
            .await
            .map_err(self.fail(&format!("counting the staged rows of {}", def.name)))?
            .get(0);
        Ok(n as u64)
    }

    async fn publish(
        &self,
        c: &mut PgConn,
        def: &TableDef,
        delta: &SchemaDelta,
        b: &Bookkeeping,
    ) -> Result<(), SinkError> {
        let live = self.exists(c, &def.namespace, &def.name).await?;
        let (table, staging, key) = (table_name(def), staging_name(def), ident(&def.key.name));
        self.begin(c).await?;
        if live {
            // Replace the rows, keep the table: views, indexes, user columns and constraints stay.
            self.apply_delta(c, def, delta).await?;
            let columns = column_list(def);
            let delete = Replaces::of(def).delete_sql(&table, &staging, &key);
            c.batch_execute(&format!(
                "{delete};
                 INSERT INTO {table} ({columns}) SELECT {columns} FROM (SELECT DISTINCT ON ({key}) * FROM {staging} ORDER BY {key}, ctid DESC) latest;
                 DROP TABLE {staging}"
            ))
            .await
            .map_err(self.fail(&format!("replacing the rows of {}", def.name)))?;
        } else {
            let pk = ident(&format!("pk_{}", def.name));
            let add_key = format!("ALTER TABLE {staging} ADD CONSTRAINT {pk} PRIMARY KEY ({key})");
            match c.batch_execute(&format!("SAVEPOINT before_key; {add_key}")).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    // Repeated keys (web_logs is delivered at least once): the later row wins.
                    c.batch_execute(&format!(
                        "ROLLBACK TO SAVEPOINT before_key;
                         DELETE FROM {staging} a USING {staging} b WHERE a.{key} = b.{key} AND a.ctid < b.ctid;
                         {add_key}"
                    ))
                    .await
                    .map_err(self.fail(&format!("removing repeated keys of {}", def.name)))?;
                }
                Err(e) => {
                    return Err(database_error(&self.shown, &format!("adding the primary key of {}", def.name), e));
                }
            }
            let mut sql = vec![
                format!("ALTER TABLE {staging} SET SCHEMA {}", ident(&def.namespace)),
                format!(
                    "ALTER TABLE {}.{} RENAME TO {}",
                    ident(&def.namespace),
                    ident(&staging_table(def)),
                    ident(&def.name)
                ),
            ];
            sql.extend(comment_statements(def, &table));
            c.batch_execute(&sql.join(";\n")).await.map_err(self.fail(&format!("publishing {}", def.name)))?;
        }
        c.execute(
            &format!("DELETE FROM {}.\"checkpoints\" WHERE namespace = $1 AND table_name = $2", ident(OUR_SCHEMA)),
            &[&def.namespace, &def.name],
        )
        .await
        .map_err(self.fail("clearing checkpoints"))?;
        self.write_table_sync(c, b).await?;
        self.commit(c).await
    }

    async fn apply_changes(
        &self,
        c: &mut PgConn,
        def: &TableDef,
        delta: &SchemaDelta,
        rows: &mut Pump<'_>,
        b: &Bookkeeping,
    ) -> Result<(), SinkError> {
        self.ensure_types(c, def).await?;
        let (table, key) = (table_name(def), ident(&def.key.name));
        // The staging table lives in the session's temp buffers, 8 MB by default: a round of
        // changes overflows them and every page then goes through the file system. They can
        // grow only before the session's first temporary table, hence the guard.
        c.batch_execute(
            "DO $$ BEGIN PERFORM set_config('temp_buffers', '256MB', false); EXCEPTION WHEN OTHERS THEN NULL; END $$",
        )
        .await
        .map_err(self.fail("sizing the session's temporary buffers"))?;
        self.begin(c).await?;
        self.apply_delta(c, def, delta).await?;
        let columns: Vec<String> =
            def.columns().map(|col| format!("{} {}", ident(&col.name), column_type(def, col))).collect();
        c.batch_execute(&format!(
            "CREATE TEMP TABLE \"_dap_changes\" (\"_dap_seq\" bigserial, \"_dap_action\" char(1) NOT NULL, {}) ON COMMIT DROP",
            columns.join(", ")
        ))
        .await
        .map_err(self.fail("creating a temporary table"))?;
        let copy_sql = format!("COPY \"_dap_changes\" (\"_dap_action\", {}) FROM STDIN", column_list(def));
        self.copy_rows(c, def, &copy_sql, true, rows).await?;
        self.merge(c, def, &table, &key).await?;
        self.write_table_sync(c, b).await?;
        self.commit(c).await
    }

    async fn drop_table(&self, c: &mut PgConn, namespace: &str, table: &str) -> Result<bool, SinkError> {
        self.begin(c).await?;
        let removed = c
            .execute(
                &format!(
                    "DELETE FROM {}.\"table_sync\" WHERE source_namespace = $1 AND source_table = $2",
                    ident(BOOKKEEPING_SCHEMA)
                ),
                &[&namespace, &table],
            )
            .await
            .map_err(self.fail("removing the bookkeeping row"))?;
        if removed > 0 {
            c.batch_execute(&format!("DROP TABLE IF EXISTS {}.{}", ident(namespace), ident(table)))
                .await
                .map_err(self.fail(&format!("dropping {namespace}.{table}")))?;
        }
        self.commit(c).await?;
        Ok(removed > 0)
    }

    async fn latest_version_change(
        &self,
        c: &mut PgConn,
        namespace: &str,
        history: &str,
    ) -> Result<Option<time::Micros>, SinkError> {
        let table = format!("{}.{}", ident(namespace), ident(history));
        let sql = format!("SELECT ({})::text FROM {table}", latest_change_sql(ident));
        let row = c.query_one(&sql, &[]).await.map_err(self.fail(&format!("reading {namespace}.{history}")))?;
        latest_change_of(&self.shown, &table, row.get(0))
    }

    async fn replace_versions(
        &self,
        c: &mut PgConn,
        versions: &TableDef,
        load: VersionLoad,
        rows: &mut Pump<'_>,
    ) -> Result<(), SinkError> {
        let name = history_name(&versions.name);
        let history = format!("{}.{}", ident(&versions.namespace), ident(&name));
        let writing = format!("writing {}.{name}", versions.namespace);
        let typed = |col: &Column| column_type(versions, col);
        let mut sql = Vec::new();
        if load.scope == VersionScope::Whole {
            sql.push(format!("DROP TABLE IF EXISTS {history}"));
            sql.extend(history_table_statements(&history, &name, versions, ident, typed));
        }
        let scratch: Vec<String> =
            versions.columns().map(|col| format!("{} {}", ident(&col.name), typed(col))).collect();
        sql.push(format!("CREATE TEMP TABLE \"_dap_versions\" ({}) ON COMMIT DROP", scratch.join(", ")));
        self.begin(c).await?;
        for statement in &sql {
            c.batch_execute(statement).await.map_err(self.fail(&writing))?;
        }
        let copy_sql = format!("COPY \"_dap_versions\" ({}) FROM STDIN", column_list(versions));
        self.copy_rows(c, versions, &copy_sql, false, rows).await?;
        for statement in history_load_statements(&history, "\"_dap_versions\"", versions, ident, load) {
            c.batch_execute(&statement).await.map_err(self.fail(&writing))?;
        }
        self.commit(c).await
    }

    async fn lock_session(&self) -> Result<PgLockSession, SinkError> {
        let mut config = self.pool.config.clone();
        config.application_name("dap-replica table lock");
        Ok(PgLockSession { client: self.pool.connect(&config).await? })
    }

    async fn try_lock(&self, s: &mut PgLockSession, namespace: &str, table: &str) -> Result<bool, SinkError> {
        let (a, b) = lock_keys(&lock_name(&self.database, namespace, table));
        Ok(s.client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&a, &b])
            .await
            .map_err(self.fail(&format!("taking the lock of {namespace}.{table}")))?
            .get(0))
    }

    async fn write_holder(
        &self,
        s: &mut PgLockSession,
        namespace: &str,
        table: &str,
        holder: &str,
    ) -> Result<(), SinkError> {
        s.client
            .execute(
                &format!(
                    "INSERT INTO {}.\"locks\" (namespace, table_name, holder) VALUES ($1, $2, $3)
                     ON CONFLICT (namespace, table_name) DO UPDATE SET holder = EXCLUDED.holder",
                    ident(OUR_SCHEMA)
                ),
                &[&namespace, &table, &holder],
            )
            .await
            .map_err(self.fail("recording who holds a table's lock"))?;
        Ok(())
    }

    async fn read_holder(
        &self,
        s: &mut PgLockSession,
        namespace: &str,
        table: &str,
    ) -> Result<Option<String>, SinkError> {
        Ok(s.client
            .query_opt(
                &format!("SELECT holder FROM {}.\"locks\" WHERE namespace = $1 AND table_name = $2", ident(OUR_SCHEMA)),
                &[&namespace, &table],
            )
            .await
            .map_err(self.fail("reading who holds a table's lock"))?
            .map(|r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn copy_text_escapes_and_arrays() {
        let mut out = Vec::new();
        copy_escape("a\tb\nc\\d\re", &mut out);
        assert_eq!(out, b"a\\tb\\nc\\\\d\\re");
        assert_eq!(array_literal(&[json!("b\"q"), json!("x\\y"), json!(null), json!(3)]), r#"{"b\"q","x\\y",NULL,3}"#);
        let mut out = Vec::new();
        encode(&Value::Timestamp(-62_135_596_800_000_000), &ColumnType::Timestamp, &mut out);
        assert_eq!(out, b"0001-01-01 00:00:00.000000");
    }

    #[test]
    fn comments_use_escape_strings_for_control_characters() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\n\nb \\ c"), "E'a\\n\\nb \\\\ c'");
    }
}
