//! The databases a test replicates into, behind one interface: a fresh one per test, its rows
//! read back by column type, raw SQL for what users do to it (indexes, views), and the values it
//! documents it cannot keep. Contract and acceptance tests run one body over [`backends`].

use std::path::PathBuf;
use std::sync::Arc;

use dap_replica::schema::TableDef;
use dap_replica::sink::{NonFinite, Sink, SinkOptions};
use dap_replica::target::{self, TargetSpec};
use serde_json::{Map, Value as Json};

use crate::truth::{self, Limit};

/// What the official MySQL layout cannot keep: fractions of seconds (`datetime`, `time`), the
/// sign of a zero double, and an IPv4 address in a `binary(16)` column of IPv4-or-IPv6 is padded
/// with zero bytes.
/// The tests run it with `--non-finite null` (the refusal has its own test), so NaN and infinity
/// are NULL.
pub const MYSQL_LIMITS: &[Limit] =
    &[Limit::WholeSeconds, Limit::NoNegativeZero, Limit::PaddedIpv4, Limit::NonFiniteAsNull];

/// What the official SQL Server layout cannot keep: an IPv4 address in a `binary(16)` column is
/// padded with zero bytes; NaN and infinity are NULL (the tests run with `--non-finite null`).
pub const MSSQL_LIMITS: &[Limit] = &[Limit::PaddedIpv4, Limit::NonFiniteAsNull];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mysql,
    Mssql,
}

/// Every backend this machine can test: SQLite and SQL Server (the TDS test server, or a real
/// one named by `TEST_MSSQL_URL`) always; PostgreSQL and MariaDB when `TEST_POSTGRES_URL` and
/// `TEST_MYSQL_URL` name them (scripts/test starts both servers and sets them). See [`require`].
pub fn backends() -> Vec<Backend> {
    [Backend::Sqlite, Backend::Postgres, Backend::Mysql, Backend::Mssql].into_iter().filter(|b| require(*b)).collect()
}

/// Whether a test of `backend` can run here. A server that is not configured skips the test
/// with a note on a developer's machine, and fails it under `CI=true`: CI never passes by
/// skipping.
pub fn require(backend: Backend) -> bool {
    let var = match backend {
        Backend::Sqlite | Backend::Mssql => return true,
        Backend::Postgres => "TEST_POSTGRES_URL",
        Backend::Mysql => "TEST_MYSQL_URL",
    };
    require_var(var).is_some()
}

/// The value of a prerequisite variable (a server's URL, a certificate): the one rule for every
/// test that needs one. Missing, it is a failure under `CI=true` and a skip with a note otherwise.
pub fn require_var(var: &str) -> Option<String> {
    if let Some(value) = std::env::var_os(var) {
        return Some(value.to_string_lossy().into_owned());
    }
    missing(&format!("{var} is not set"));
    None
}

/// A prerequisite that is absent (`what` says which): a failure under `CI=true`, where
/// `scripts/test` provides every one, and a note on the part skipped otherwise.
pub fn missing(what: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(!ci, "{what} under CI=true: the check would be skipped (scripts/test provides it)");
    eprintln!("{what}: skipped (scripts/test provides it)");
}

/// A fresh database of one backend.
pub struct TestTarget {
    pub backend: Backend,
    /// The connection string `dap` is given.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<tokio_postgres::Client>,
    mysql: Option<mysql_async::Pool>,
    /// The TDS test server behind an SQL Server target (`None` on a real server).
    pub tds: Option<crate::tds::TdsServer>,
}

impl TestTarget {
    /// A new, empty database named after the test (`name` must be unique per test).
    pub async fn fresh(backend: Backend, name: &str) -> TestTarget {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join(format!("{name}.db")).display());
                TestTarget { backend, url, _dir: Some(dir), postgres: None, mysql: None, tds: None }
            }
            Backend::Postgres => {
                let (url, client) = crate::servers::fresh_postgres(name).await;
                TestTarget { backend, url, _dir: None, postgres: Some(client), mysql: None, tds: None }
            }
            Backend::Mysql => {
                let url = crate::servers::fresh_mysql(name).await;
                let pool = crate::servers::mysql_pool(&url);
                TestTarget { backend, url, _dir: None, postgres: None, mysql: Some(pool), tds: None }
            }
            Backend::Mssql => {
                let (url, tds) = crate::mssql::fresh_mssql(name).await;
                TestTarget { backend, url, _dir: None, postgres: None, mysql: None, tds }
            }
        }
    }

    pub fn spec(&self) -> TargetSpec {
        TargetSpec::parse(Some(&self.url)).unwrap()
    }

    /// The SQLite file (SQLite targets only).
    pub fn file(&self) -> PathBuf {
        PathBuf::from(self.url.strip_prefix("sqlite://").expect("a SQLite target"))
    }

    /// The target through the registry (NaN and infinity stored as NULL where there are none).
    pub async fn open(&self, namespace: &str) -> Arc<dyn Sink> {
        self.open_with(namespace, SinkOptions { non_finite: NonFinite::Null, ..SinkOptions::default() }).await
    }

    /// The options `dap` is run with against this target (NULL for NaN and infinity on MySQL
    /// and SQL Server).
    pub fn dap_options(&self) -> &'static [&'static str] {
        match self.backend {
            Backend::Mysql | Backend::Mssql => &["--non-finite", "null"],
            _ => &[],
        }
    }

    pub async fn open_with(&self, namespace: &str, options: SinkOptions) -> Arc<dyn Sink> {
        target::open(&self.spec(), namespace, &options).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The values this backend documents it cannot keep exactly.
    pub fn limits(&self) -> &'static [Limit] {
        match self.backend {
            Backend::Sqlite => &[Limit::NoNegativeZero],
            Backend::Postgres => &[],
            Backend::Mysql => MYSQL_LIMITS,
            Backend::Mssql => MSSQL_LIMITS,
        }
    }

    /// A table's name in raw SQL.
    pub fn table(&self, namespace: &str, table: &str) -> String {
        match self.backend {
            Backend::Sqlite => format!("\"{table}\""),
            Backend::Postgres | Backend::Mssql => format!("\"{namespace}\".\"{table}\""),
            Backend::Mysql => format!("`{namespace}__{table}`"),
        }
    }

    pub async fn rows(&self, def: &TableDef) -> Vec<Map<String, Json>> {
        match self.backend {
            Backend::Sqlite => truth::sqlite_rows(&self.file(), def),
            Backend::Postgres => truth::postgres_rows(self.postgres.as_ref().unwrap(), def).await,
            Backend::Mysql => truth::mysql_rows(self.mysql.as_ref().unwrap(), def).await,
            Backend::Mssql => truth::mssql_rows(&self.url, def).await,
        }
    }

    /// Runs statements (no results).
    pub async fn exec(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => rusqlite::Connection::open(self.file()).unwrap().execute_batch(sql).unwrap(),
            Backend::Postgres => self.postgres.as_ref().unwrap().batch_execute(sql).await.unwrap(),
            Backend::Mysql => {
                use mysql_async::prelude::Queryable;
                let mut conn = self.mysql.as_ref().unwrap().get_conn().await.unwrap();
                conn.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Backend::Mssql => crate::mssql::exec(&self.url, sql).await,
        }
    }

    /// The first column of every row of a query, as text.
    pub async fn column(&self, sql: &str) -> Vec<Option<String>> {
        match self.backend {
            Backend::Sqlite => {
                let conn = rusqlite::Connection::open(self.file()).unwrap();
                let mut stmt = conn.prepare(sql).unwrap();
                stmt.query_map([], |r| {
                    Ok(match r.get_ref(0)? {
                        rusqlite::types::ValueRef::Null => None,
                        rusqlite::types::ValueRef::Integer(i) => Some(i.to_string()),
                        rusqlite::types::ValueRef::Real(f) => Some(f.to_string()),
                        rusqlite::types::ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                        rusqlite::types::ValueRef::Blob(_) => Some("<blob>".into()),
                    })
                })
                .unwrap()
                .map(Result::unwrap)
                .collect()
            }
            Backend::Postgres => {
                let rows = self.postgres.as_ref().unwrap().simple_query(sql).await.unwrap();
                rows.into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(String::from)),
                        _ => None,
                    })
                    .collect()
            }
            Backend::Mysql => {
                use mysql_async::prelude::Queryable;
                let mut conn = self.mysql.as_ref().unwrap().get_conn().await.unwrap();
                let rows: Vec<mysql_async::Row> = conn.query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
                rows.into_iter()
                    .map(|r| match r.as_ref(0) {
                        Some(mysql_async::Value::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                        Some(mysql_async::Value::NULL) | None => None,
                        Some(other) => Some(other.as_sql(true).trim_matches('\'').to_string()),
                    })
                    .collect()
            }
            Backend::Mssql => crate::mssql::column(&self.url, sql).await,
        }
    }

    /// Whether a table exists.
    pub async fn has_table(&self, namespace: &str, table: &str) -> bool {
        let sql = match self.backend {
            Backend::Sqlite => format!("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'"),
            Backend::Postgres => {
                format!("SELECT count(*) FROM pg_tables WHERE schemaname = '{namespace}' AND tablename = '{table}'")
            }
            Backend::Mysql => format!(
                "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = '{namespace}__{table}'"
            ),
            Backend::Mssql => {
                format!("SELECT CASE WHEN OBJECT_ID(N'\"{namespace}\".\"{table}\"', N'U') IS NULL THEN 0 ELSE 1 END")
            }
        };
        self.column(&sql).await[0].as_deref() == Some("1")
    }

    /// The bookkeeping table's name in raw SQL.
    pub fn bookkeeping_table(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "instructure_dap__table_sync",
            Backend::Postgres | Backend::Mssql => "\"instructure_dap\".\"table_sync\"",
            Backend::Mysql => "instructure_dap__table_sync",
        }
    }

    /// Whether a table has its bookkeeping row.
    pub async fn initialised(&self, table: &str) -> bool {
        let exists = match self.backend {
            Backend::Sqlite => self.has_table("", "instructure_dap__table_sync").await,
            Backend::Postgres | Backend::Mysql | Backend::Mssql => {
                self.has_table("instructure_dap", "table_sync").await
            }
        };
        let sql = format!("SELECT count(*) FROM {} WHERE source_table = '{table}'", self.bookkeeping_table());
        exists && self.column(&sql).await[0].as_deref() != Some("0")
    }

    /// How many initdb parts the target has loaded with their checkpoints and not yet published,
    /// or None while it cannot say (no checkpoint table yet, or the file is busy): so that a test
    /// can interrupt a run at the point where it has something to resume.
    pub async fn checkpoints(&self) -> Option<u64> {
        let (schema, table, sql) = match self.backend {
            Backend::Sqlite => {
                let conn = rusqlite::Connection::open(self.file()).ok()?;
                let n: i64 = conn.query_row("SELECT count(*) FROM _dap_checkpoint", [], |r| r.get(0)).ok()?;
                return u64::try_from(n).ok();
            }
            Backend::Postgres | Backend::Mssql => {
                ("dap_replica", "checkpoints", "SELECT count(*) FROM \"dap_replica\".\"checkpoints\"")
            }
            Backend::Mysql => ("dap_replica", "checkpoints", "SELECT count(*) FROM dap_replica__checkpoints"),
        };
        if !self.has_table(schema, table).await {
            return None;
        }
        self.column(sql).await[0].as_deref()?.parse().ok()
    }

    /// Whether a publish of `table` was interrupted after its swap and before its bookkeeping
    /// row, which only MySQL can leave (its `RENAME TABLE` commits at once): the table is whole,
    /// and the next run writes the row.
    pub async fn publish_pending(&self, table: &str) -> bool {
        self.backend == Backend::Mysql
            && self.has_table("dap_replica", "publishing").await
            && self.column(&format!("SELECT count(*) FROM dap_replica__publishing WHERE table_name = '{table}'")).await
                [0]
            .as_deref()
                != Some("0")
    }

    /// Whether an index of this name exists.
    pub async fn has_index(&self, name: &str) -> bool {
        let sql = match self.backend {
            Backend::Sqlite => format!("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = '{name}'"),
            Backend::Postgres => format!("SELECT count(*) FROM pg_indexes WHERE indexname = '{name}'"),
            Backend::Mysql => format!(
                "SELECT count(DISTINCT INDEX_NAME) FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() AND INDEX_NAME = '{name}'"
            ),
            Backend::Mssql => format!("SELECT COUNT(*) FROM sys.indexes WHERE name = N'{name}'"),
        };
        self.column(&sql).await[0].as_deref() == Some("1")
    }

    /// Asserts that a table holds exactly the truth's rows, within the backend's limits.
    pub async fn assert_rows(&self, def: &TableDef, truth: &[Map<String, Json>], what: &str) {
        truth::assert_same_rows_within(def, &self.rows(def).await, truth, what, self.limits());
    }
}
