//! The databases a test replicates into, behind one interface: a fresh one per test, its rows
//! read back by column type, raw SQL for what users do to it (indexes, views), and the values it
//! documents it cannot keep. Contract and acceptance tests run one body over [`backends`].

use std::path::PathBuf;
use std::sync::Arc;

use dap_replica::schema::TableDef;
use dap_replica::sink::{self, Sink, SinkOptions, TargetSpec};
use serde_json::{Map, Value as Json};

use super::truth::{self, Limit};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// SQLite always; PostgreSQL when `TEST_POSTGRES_URL` is set (scripts/test starts it and sets it,
/// so CI runs every backend).
pub fn backends() -> Vec<Backend> {
    let mut out = vec![Backend::Sqlite];
    if std::env::var_os("TEST_POSTGRES_URL").is_some() {
        out.push(Backend::Postgres);
    } else {
        eprintln!("TEST_POSTGRES_URL is not set: PostgreSQL is skipped (scripts/test sets it)");
    }
    out
}

/// A fresh database of one backend.
pub struct TestTarget {
    pub backend: Backend,
    /// The connection string `dap` is given.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<tokio_postgres::Client>,
}

impl TestTarget {
    /// A new, empty database named after the test (`name` must be unique per test).
    pub async fn fresh(backend: Backend, name: &str) -> TestTarget {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join(format!("{name}.db")).display());
                TestTarget { backend, url, _dir: Some(dir), postgres: None }
            }
            Backend::Postgres => {
                let (url, client) = super::fresh_postgres(name).await;
                TestTarget { backend, url, _dir: None, postgres: Some(client) }
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

    pub async fn open(&self, namespace: &str) -> Arc<dyn Sink> {
        sink::open(&self.spec(), namespace, &SinkOptions::default()).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The values this backend documents it cannot keep exactly.
    pub fn limits(&self) -> &'static [Limit] {
        match self.backend {
            Backend::Sqlite => &[Limit::NoNegativeZero],
            Backend::Postgres => &[],
        }
    }

    /// A table's name in raw SQL.
    pub fn table(&self, namespace: &str, table: &str) -> String {
        match self.backend {
            Backend::Sqlite => format!("\"{table}\""),
            Backend::Postgres => format!("\"{namespace}\".\"{table}\""),
        }
    }

    pub async fn rows(&self, def: &TableDef) -> Vec<Map<String, Json>> {
        match self.backend {
            Backend::Sqlite => truth::sqlite_rows(&self.file(), def),
            Backend::Postgres => truth::postgres_rows(self.postgres.as_ref().unwrap(), def).await,
        }
    }

    /// Runs statements (no results).
    pub async fn exec(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => rusqlite::Connection::open(self.file()).unwrap().execute_batch(sql).unwrap(),
            Backend::Postgres => self.postgres.as_ref().unwrap().batch_execute(sql).await.unwrap(),
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
        }
    }

    /// Whether a table exists.
    pub async fn has_table(&self, namespace: &str, table: &str) -> bool {
        let sql = match self.backend {
            Backend::Sqlite => format!("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'"),
            Backend::Postgres => {
                format!("SELECT count(*) FROM pg_tables WHERE schemaname = '{namespace}' AND tablename = '{table}'")
            }
        };
        self.column(&sql).await[0].as_deref() == Some("1")
    }

    /// The bookkeeping table's name in raw SQL.
    pub fn bookkeeping_table(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "instructure_dap__table_sync",
            Backend::Postgres => "\"instructure_dap\".\"table_sync\"",
        }
    }

    /// Whether a table has its bookkeeping row.
    pub async fn initialised(&self, table: &str) -> bool {
        let exists = match self.backend {
            Backend::Sqlite => self.has_table("", "instructure_dap__table_sync").await,
            Backend::Postgres => self.has_table("instructure_dap", "table_sync").await,
        };
        let sql = format!("SELECT count(*) FROM {} WHERE source_table = '{table}'", self.bookkeeping_table());
        exists && self.column(&sql).await[0].as_deref() != Some("0")
    }

    /// Whether an index of this name exists.
    pub async fn has_index(&self, name: &str) -> bool {
        let sql = match self.backend {
            Backend::Sqlite => format!("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = '{name}'"),
            Backend::Postgres => format!("SELECT count(*) FROM pg_indexes WHERE indexname = '{name}'"),
        };
        self.column(&sql).await[0].as_deref() == Some("1")
    }

    /// Asserts that a table holds exactly the truth's rows, within the backend's limits.
    pub async fn assert_rows(&self, def: &TableDef, truth: &[Map<String, Json>], what: &str) {
        truth::assert_same_rows_within(def, &self.rows(def).await, truth, what, self.limits());
    }
}
