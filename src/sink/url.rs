//! Connection strings as the official client reads them: `dialect://user:password@host:port/db`
//! with percent-decoded user and password and an optional `?ssl=` mode (spec §5.1), plus our
//! `sqlite:///ABS/PATH.db` and `sqlite://REL/PATH.db`. A password is never shown: every message
//! and log line uses [`ConnectionString::redacted`].

use std::fmt;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;

/// The database a connection string names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Sqlite,
    Postgres,
    Mysql,
    Mssql,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Sqlite => "sqlite",
            Scheme::Postgres => "postgresql",
            Scheme::Mysql => "mysql",
            Scheme::Mssql => "mssql",
        }
    }
}

/// The official client's `?ssl=` modes (libpq's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A parsed connection string.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionString {
    pub scheme: Scheme,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// The database name (server targets) or the file (SQLite).
    pub database: String,
    pub ssl: Option<SslMode>,
    /// `sslrootcert=FILE`: the CA that `verify-ca`/`verify-full` trust instead of the system's.
    pub ssl_root_cert: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "invalid connection string {shown}: {reason} (expected e.g. postgresql://user:password@host:5432/database, mysql://…, mssql://… or sqlite:///path/to/file.db)"
)]
pub struct UrlError {
    /// The string with any password replaced by `***`.
    pub shown: String,
    pub reason: String,
}

/// `scheme://user:***@host/db`: the text with the password (between `:` and `@` of the
/// authority) hidden, for messages about strings that may not even parse.
pub fn redact(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else { return "(not a URL)".into() };
    let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    match path {
        Some(p) => format!("{scheme}://{authority}/{}", p.split('?').next().unwrap_or_default()),
        None => format!("{scheme}://{authority}"),
    }
}

impl ConnectionString {
    pub fn parse(text: &str) -> Result<ConnectionString, UrlError> {
        let fail = |reason: &str| UrlError { shown: redact(text), reason: reason.to_string() };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| fail("no scheme"))?;
        let scheme = match scheme {
            "sqlite" => Scheme::Sqlite,
            "postgresql" | "postgres" => Scheme::Postgres,
            "mysql" | "mariadb" => Scheme::Mysql,
            "mssql" | "sqlserver" => Scheme::Mssql,
            other => return Err(fail(&format!("unknown database {other:?}; use sqlite, postgresql, mysql or mssql"))),
        };
        if scheme == Scheme::Sqlite {
            if rest.is_empty() {
                return Err(fail("no file after sqlite://"));
            }
            let path = percent_decode_str(rest).decode_utf8().map_err(|_| fail("the path is not UTF-8"))?;
            return Ok(ConnectionString {
                scheme,
                user: None,
                password: None,
                host: None,
                port: None,
                database: path.into_owned(),
                ssl: None,
                ssl_root_cert: None,
            });
        }
        let (before_query, query) = rest.split_once('?').map_or((rest, None), |(a, q)| (a, Some(q)));
        let (authority, database) = before_query.split_once('/').ok_or_else(|| fail("no /database"))?;
        if database.is_empty() || database.contains('/') {
            return Err(fail("the path must be exactly one database name"));
        }
        let decode = |s: &str, what: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| fail(&format!("the {what} is not valid percent-encoded UTF-8")))
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (Some(decode(user, "user")?), Some(Secret(decode(pass, "password")?))),
                None => (Some(decode(u, "user")?), None),
            },
            None => (None, None),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| fail("unclosed [ in the host"))?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().map_err(|_| fail(&format!("port {p:?} is not a number from 1 to 65535"))))
            .transpose()?;
        let mut ssl = None;
        let mut ssl_root_cert = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| fail(&format!("query parameter {pair:?} has no value")))?;
            match k {
                "ssl" | "sslmode" => {
                    if ssl.is_some() {
                        return Err(fail("ssl is given twice"));
                    }
                    ssl = Some(match v {
                        "disable" => SslMode::Disable,
                        "allow" => SslMode::Allow,
                        "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(fail(&format!(
                                "ssl={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                            )));
                        }
                    });
                }
                "sslrootcert" => ssl_root_cert = Some(PathBuf::from(decode(v, "sslrootcert")?)),
                _ => {} // the official client ignores other parameters too
            }
        }
        if let Some(p) = &password {
            crate::secrets::register(p.expose());
            crate::secrets::register(userinfo.and_then(|u| u.split_once(':')).map_or("", |(_, raw)| raw));
        }
        Ok(ConnectionString {
            scheme,
            user,
            password,
            host: (!host.is_empty()).then_some(host),
            port,
            database: decode(database, "database name")?,
            ssl,
            ssl_root_cert,
        })
    }

    /// The port the adapters connect to when the string names none.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(match self.scheme {
            Scheme::Postgres => 5432,
            Scheme::Mysql => 3306,
            Scheme::Mssql => 1433,
            Scheme::Sqlite => 0,
        })
    }

    /// Fills in the password a server's string leaves out from a pgpass-format file
    /// ([`crate::config::passfiles`]), so that it need not be written in the URL.
    pub fn with_password_from_files(mut self) -> Result<ConnectionString, UrlError> {
        let (Some(user), None) = (&self.user, &self.password) else { return Ok(self) };
        if self.scheme == Scheme::Sqlite {
            return Ok(self);
        }
        let files = crate::config::passfiles(self.scheme == Scheme::Postgres);
        let host = self.host.as_deref().unwrap_or("localhost");
        let found = crate::config::lookup_password(&files, host, self.port_or_default(), &self.database, user)
            .map_err(|e| UrlError { shown: self.redacted(), reason: format!("its password file is refused: {e}") })?;
        if let Some(password) = found {
            crate::secrets::register(&password);
            self.password = Some(Secret(password));
        }
        Ok(self)
    }

    /// The string for messages and logs: no password.
    pub fn redacted(&self) -> String {
        if self.scheme == Scheme::Sqlite {
            return format!("sqlite://{}", self.database);
        }
        let user = match (&self.user, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (Some(u), None) => format!("{u}@"),
            _ => String::new(),
        };
        let host = self.host.as_deref().unwrap_or("localhost");
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        format!("{}://{user}{host}{port}/{}", self.scheme.name(), self.database)
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_official_form_with_percent_decoding() {
        let c =
            ConnectionString::parse("postgresql://us%40er:p%40ss%3Aw@db.example:6543/dap?ssl=verify-full&x=1").unwrap();
        assert_eq!(c.scheme, Scheme::Postgres);
        assert_eq!(c.user.as_deref(), Some("us@er"));
        assert_eq!(c.password.as_ref().unwrap().expose(), "p@ss:w");
        assert_eq!((c.host.as_deref(), c.port, c.database.as_str()), (Some("db.example"), Some(6543), "dap"));
        assert_eq!(c.ssl, Some(SslMode::VerifyFull));
        assert_eq!(c.redacted(), "postgresql://us@er:***@db.example:6543/dap");
        assert!(!format!("{c:?}").contains("p@ss"), "Debug hides the password too");
        let s = ConnectionString::parse("sqlite:///data/canvas.db").unwrap();
        assert_eq!(s.database, "/data/canvas.db");
        assert_eq!(ConnectionString::parse("mysql://u:p@[::1]:3306/d").unwrap().host.as_deref(), Some("::1"));
    }

    #[test]
    fn bad_strings_are_refused_without_showing_the_password() {
        for bad in [
            "postgresql://u:hunter2@h:99999/db",
            "postgresql://u:hunter2@h/db?ssl=sometimes",
            "postgresql://u:hunter2@h/db?ssl=require&ssl=disable",
            "postgresql://u:hunter2@h",
            "oracle://u:hunter2@h/db",
            "u:hunter2@h/db",
        ] {
            let e = ConnectionString::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.contains("invalid connection string"), "{e}");
        }
    }
}
