//! Targets by location: the registry of backends by URL scheme, and opening the target a
//! `--connection-string`/`--to` names (or the default mirror). It sits above `sink` (the
//! interface and the server adapters) and `mirror` (the SQLite backend), so that neither needs
//! the other.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::mirror::{self, writer::SqliteDialect};
use crate::schema::TableDef;
use crate::sink::mssql::MssqlDialect;
use crate::sink::mysql::MysqlDialect;
use crate::sink::postgres::PostgresDialect;
use crate::sink::protocol::{self, open_sink};
use crate::sink::{ConnectionString, Scheme, Sink, SinkError, SinkOptions, UrlError};

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
                Some(mirror::folder::default_dir()?.join(format!("{}.db", crate::fetch::safe_component(namespace))))
            }
            TargetSpec::Url(c) if c.scheme == Scheme::SQLITE => Some(PathBuf::from(&c.database)),
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

/// Opens a backend's target for a connection string.
pub type Opener = for<'a> fn(&'a ConnectionString, &'a SinkOptions) -> BoxFuture<'a, Result<Arc<dyn Sink>, SinkError>>;

/// One backend: how it is opened and provisioned (how connection strings name it is
/// [`crate::sink::SCHEMES`]).
pub struct Backend {
    pub scheme: Scheme,
    pub open: Opener,
    /// The DDL `initdb` runs for `defs` on an empty database: bookkeeping tables first, then each
    /// table, from the backend's own code (`dap ddl`).
    pub ddl: fn(&[TableDef]) -> Vec<String>,
}

/// Every backend, by scheme: adding one is its file, a line here and a line in
/// [`crate::sink::SCHEMES`] (a test checks that the two agree).
pub static BACKENDS: &[Backend] = &[
    Backend { scheme: Scheme::SQLITE, open: open_sink::<SqliteDialect>, ddl: protocol::ddl::<SqliteDialect> },
    Backend { scheme: Scheme::POSTGRESQL, open: open_sink::<PostgresDialect>, ddl: protocol::ddl::<PostgresDialect> },
    Backend { scheme: Scheme::MYSQL, open: open_sink::<MysqlDialect>, ddl: protocol::ddl::<MysqlDialect> },
    Backend { scheme: Scheme::MSSQL, open: open_sink::<MssqlDialect>, ddl: protocol::ddl::<MssqlDialect> },
];

/// The backend of a scheme.
pub fn backend(scheme: Scheme) -> &'static Backend {
    BACKENDS.iter().find(|b| b.scheme == scheme).expect("every scheme has a backend (tested below)")
}

/// The DDL `initdb` runs for `defs` on an empty database of `scheme`.
pub fn ddl(scheme: Scheme, defs: &[TableDef]) -> Vec<String> {
    (backend(scheme).ddl)(defs)
}

/// Opens the target of `spec` for `namespace`, through the backend its scheme names.
pub async fn open(spec: &TargetSpec, namespace: &str, options: &SinkOptions) -> Result<Arc<dyn Sink>, SinkError> {
    // Two TLS providers are linked (ring, and aws-lc through tiberius' tokio-rustls): drivers that
    // take the process default need one chosen.
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let url = match spec {
        TargetSpec::DefaultMirror => {
            let file = spec.local_file(namespace)?.expect("the default mirror is a file");
            ConnectionString::sqlite(&file)
        }
        TargetSpec::Url(url) => url.clone(),
    };
    (backend(url.scheme).open)(&url, options).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SCHEMES;

    #[test]
    fn every_scheme_has_exactly_one_backend_and_every_backend_a_scheme() {
        for facts in SCHEMES {
            let named = BACKENDS.iter().filter(|b| b.scheme.name() == facts.scheme).count();
            assert_eq!(named, 1, "{}: {named} backends", facts.scheme);
        }
        for b in BACKENDS {
            assert!(SCHEMES.iter().any(|f| f.scheme == b.scheme.name()), "{:?} has no scheme facts", b.scheme);
        }
    }
}
