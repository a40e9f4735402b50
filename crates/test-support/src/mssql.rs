//! SQL Server for the tests: the TDS test server in-process, or a real server when
//! `TEST_MSSQL_URL` names one (the opt-in lane), reached through the real `tiberius` client.

use tiberius::{AuthMethod, Client, ColumnData, Config, EncryptionLevel};
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use crate::tds::{ServerOptions, TdsServer};
use dap_replica::sink::{ConnectionString, SslMode};

pub type MssqlClient = Client<Compat<tokio::net::TcpStream>>;

/// A fresh database: the connection string `dap` is given, and the test server behind it
/// (`None` on a real server).
pub async fn fresh_mssql(name: &str) -> (String, Option<TdsServer>) {
    match std::env::var("TEST_MSSQL_URL") {
        Ok(admin) => {
            let db = format!("dapt_{name}");
            let mut c = connect(&admin).await;
            for sql in [
                format!(
                    "IF DB_ID(N'{db}') IS NOT NULL BEGIN ALTER DATABASE [{db}] SET SINGLE_USER WITH ROLLBACK IMMEDIATE; DROP DATABASE [{db}] END"
                ),
                format!("CREATE DATABASE [{db}] COLLATE Latin1_General_100_CI_AS_SC_UTF8"),
            ] {
                c.simple_query(sql).await.unwrap().into_results().await.unwrap();
            }
            (crate::servers::with_database(&admin, &db), None)
        }
        Err(_) => {
            let server =
                TdsServer::start(ServerOptions { database: format!("dapt_{name}"), ..ServerOptions::default() }).await;
            (server.url(), Some(server))
        }
    }
}

/// A client on the database of a `mssql://` connection string.
pub async fn connect(url: &str) -> MssqlClient {
    let u = ConnectionString::parse(url).expect("an mssql:// URL");
    let mut config = Config::new();
    config.host(u.host.clone().unwrap_or_else(|| "localhost".into()));
    config.port(u.port.unwrap_or(1433));
    config.database(&u.database);
    config.authentication(AuthMethod::sql_server(
        u.user.clone().unwrap_or_default(),
        u.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default(),
    ));
    config.command_timeout(None);
    if u.ssl == Some(SslMode::Disable) {
        config.encryption(EncryptionLevel::NotSupported);
    } else {
        config.trust_cert();
    }
    let tcp = tokio::net::TcpStream::connect(config.get_addr())
        .await
        .unwrap_or_else(|e| panic!("cannot reach SQL Server at {}: {e}", u.redacted()));
    let mut c = Client::connect(config, tcp.compat_write())
        .await
        .unwrap_or_else(|e| panic!("cannot log into {}: {e}", u.redacted()));
    c.simple_query("SET QUOTED_IDENTIFIER ON; SET ANSI_NULLS ON").await.unwrap().into_results().await.unwrap();
    c
}

/// Runs statements, each as its own batch (CREATE VIEW must stand alone in one).
/// Runs a script as one batch, as sqlcmd sends a file without `GO`.
pub async fn exec_batch(url: &str, sql: &str) {
    let mut c = connect(url).await;
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"))
        .into_results()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"));
}

pub async fn exec(url: &str, sql: &str) {
    let mut c = connect(url).await;
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        c.simple_query(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"))
            .into_results()
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// The first column of every row of a query, as text.
pub async fn column(url: &str, sql: &str) -> Vec<Option<String>> {
    let mut c = connect(url).await;
    let rows = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_first_result()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter()
        .map(|r| match r.into_iter().next() {
            Some(ColumnData::String(s)) => s.map(|s| s.into_owned()),
            Some(ColumnData::I64(v)) => v.map(|v| v.to_string()),
            Some(ColumnData::I32(v)) => v.map(|v| v.to_string()),
            Some(ColumnData::I16(v)) => v.map(|v| v.to_string()),
            Some(ColumnData::U8(v)) => v.map(|v| v.to_string()),
            Some(ColumnData::Bit(v)) => v.map(|v| (v as u8).to_string()),
            Some(other) => Some(format!("{other:?}")),
            None => None,
        })
        .collect()
}
