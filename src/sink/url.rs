//! Connection strings as the official client reads them: `dialect://user:password@host:port/db`
//! with percent-decoded user and password and an optional `?ssl=` mode (spec §5.1), plus our
//! `sqlite:///ABS/PATH.db` and `sqlite://REL/PATH.db`. A password is never shown: every message
//! and log line uses [`ConnectionString::redacted`].

use std::fmt;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;

/// How connection strings name one database: its scheme as `dap` writes it, its other
/// spellings, its default port and where its passwords may be kept. Opening it is
/// `crate::target`'s registry, which has one backend per entry here.
pub struct SchemeFacts {
    pub scheme: &'static str,
    pub aliases: &'static [&'static str],
    /// The port a connection string without one uses (0: a file).
    pub default_port: u16,
    /// libpq's password file (`~/.pgpass`) also holds passwords for it.
    pub reads_pgpass: bool,
}

/// Every database `dap` knows, by scheme.
pub static SCHEMES: &[SchemeFacts] = &[
    SchemeFacts { scheme: "sqlite", aliases: &[], default_port: 0, reads_pgpass: false },
    SchemeFacts { scheme: "postgresql", aliases: &["postgres"], default_port: 5432, reads_pgpass: true },
    SchemeFacts { scheme: "mysql", aliases: &["mariadb"], default_port: 3306, reads_pgpass: false },
    SchemeFacts { scheme: "mssql", aliases: &["sqlserver"], default_port: 1433, reads_pgpass: false },
];

/// The schemes `dap` knows, for messages.
pub fn scheme_names() -> String {
    let names: Vec<&str> = SCHEMES.iter().map(|f| f.scheme).collect();
    names.join(", ")
}

/// The database a connection string names, by its canonical scheme (one of [`SCHEMES`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Scheme(&'static str);

impl Scheme {
    /// The local mirror's files, whose locations have a syntax of their own.
    pub const SQLITE: Scheme = Scheme("sqlite");
    pub const POSTGRESQL: Scheme = Scheme("postgresql");
    pub const MYSQL: Scheme = Scheme("mysql");
    pub const MSSQL: Scheme = Scheme("mssql");

    /// The scheme as `dap` writes it (`postgresql`).
    pub fn name(self) -> &'static str {
        self.0
    }

    /// How connection strings name this database.
    pub fn facts(self) -> &'static SchemeFacts {
        SCHEMES.iter().find(|f| f.scheme == self.0).expect("a Scheme is only made from SCHEMES")
    }

    /// The scheme a connection string's prefix names (any spelling, any case).
    pub fn of(name: &str) -> Option<Scheme> {
        let name = name.to_ascii_lowercase();
        SCHEMES.iter().find(|f| f.scheme == name || f.aliases.contains(&name.as_str())).map(|f| Scheme(f.scheme))
    }
}

impl fmt::Debug for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
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

/// Splits what follows `scheme://` into its userinfo (`user:password`, when there is an `@`) and
/// the rest (`host:port/database?query`). The userinfo ends at the last `@` that a host follows,
/// so a password may hold `@`, `/`, `:`, `#` or `?` without percent-encoding; where that is
/// ambiguous more is taken as userinfo, which only hides more when redacting.
fn split_userinfo(rest: &str) -> (Option<&str>, &str) {
    // A host (and port), then the `/database` a server's string needs, or nothing at all.
    let host_follows = |after: &str, database_required: bool| {
        let end = after.find(['/', '?']).unwrap_or(after.len());
        let host = &after[..end];
        let valid = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']' | b'%');
        !host.is_empty() && host.bytes().all(valid) && (!database_required || after[end..].starts_with('/'))
    };
    let ats: Vec<usize> = rest.match_indices('@').map(|(at, _)| at).collect();
    let at = ats
        .iter()
        .rev()
        .find(|&&at| host_follows(&rest[at + 1..], true))
        .or_else(|| ats.iter().rev().find(|&&at| host_follows(&rest[at + 1..], false)));
    at.map_or((None, rest), |&at| (Some(&rest[..at]), &rest[at + 1..]))
}

/// Whether a connection string holds a password, even one that does not parse.
pub fn has_password(text: &str) -> bool {
    text.split_once("://").is_some_and(|(_, rest)| split_userinfo(rest).0.is_some_and(|u| u.contains(':')))
}

/// `scheme://user:***@host/db`: the text with the password hidden, and nothing after the
/// database name, for messages about strings that may not even parse. A SQLite location holds
/// no secret and is shown whole.
pub fn redact(text: &str) -> String {
    if strip_prefix_ignore_case(text, "sqlite:").is_some() {
        return text.to_string();
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return "(not a URL: expected scheme://…)".into();
    };
    let (userinfo, hostpart) = split_userinfo(rest);
    let shown_user = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((user, _)) => format!("{user}:***@"),
            None if hostpart.is_empty() => "***@".to_string(),
            None => format!("{u}@"),
        },
        None if rest.contains('@') => "***@".to_string(),
        None => String::new(),
    };
    let hostpart = if userinfo.is_none() && rest.contains('@') { "…" } else { hostpart };
    let hostpart = hostpart.split('?').next().unwrap_or_default();
    format!("{scheme}://{shown_user}{hostpart}")
}

/// `text` without `prefix`, compared without regard to case (schemes are case-insensitive).
fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// The file a SQLite location names, from what follows `sqlite:`. Every form people type is
/// read the same way (README, "Where the mirror is"):
/// - `sqlite:///ABS`, `sqlite:////ABS` (SQLAlchemy's absolute form) and `sqlite:/ABS`: the
///   absolute path `/ABS` (leading slashes collapse into one);
/// - `sqlite://REL` and `sqlite:REL`: `REL`, relative to the current folder;
/// - a Windows drive in any of them (`sqlite:///C:/data/canvas.db`, `sqlite:C:\data\canvas.db`);
/// - `%XX` is decoded (`%20` is a space); `?` and `#` are part of the file name, since a SQLite
///   location has no parameters.
fn sqlite_file(location: &str) -> Result<String, String> {
    let path = location.strip_prefix("//").unwrap_or(location);
    let path = if path.starts_with('/') { format!("/{}", path.trim_start_matches('/')) } else { path.to_string() };
    let decoded = percent_decode_str(&path).decode_utf8().map_err(|_| "the path is not UTF-8".to_string())?;
    // `/C:/…`: a Windows drive behind the URL's slash.
    let decoded = match decoded.as_bytes() {
        [b'/', drive, b':', ..] if drive.is_ascii_alphabetic() => decoded[1..].to_string(),
        _ => decoded.into_owned(),
    };
    if decoded.is_empty() || decoded == "/" {
        return Err("no file after sqlite: (e.g. sqlite:///home/me/canvas.db)".into());
    }
    if decoded.ends_with('/') || decoded.ends_with(std::path::MAIN_SEPARATOR) {
        return Err(format!("{decoded} names a folder; name the database file in it (e.g. {decoded}canvas.db)"));
    }
    Ok(decoded)
}

impl ConnectionString {
    pub fn parse(text: &str) -> Result<ConnectionString, UrlError> {
        let fail = |reason: &str| UrlError { shown: redact(text), reason: reason.to_string() };
        if let Some(location) = strip_prefix_ignore_case(text, "sqlite:") {
            let path = sqlite_file(location).map_err(|reason| fail(&reason))?;
            return Ok(ConnectionString {
                scheme: Scheme::SQLITE,
                user: None,
                password: None,
                host: None,
                port: None,
                database: path,
                ssl: None,
                ssl_root_cert: None,
            });
        }
        let (scheme, rest) = text.split_once("://").ok_or_else(|| fail("no scheme"))?;
        // SQLAlchemy's `dialect+driver` names the same database.
        let dialect = scheme.split('+').next().unwrap_or_default().to_ascii_lowercase();
        let scheme = match Scheme::of(&dialect) {
            Some(s) if s != Scheme::SQLITE => s,
            _ => {
                return Err(fail(&format!("unknown database {dialect:?}; use one of {}", scheme_names())));
            }
        };
        let (userinfo, hostpart) = split_userinfo(rest);
        if let Some((_, raw)) = userinfo.and_then(|u| u.split_once(':')) {
            crate::secrets::register(raw); // before any message could quote it
        }
        let (before_query, query) = hostpart.split_once('?').map_or((hostpart, None), |(a, q)| (a, Some(q)));
        let (hostport, database) = before_query.split_once('/').ok_or_else(|| fail("no /database"))?;
        if database.is_empty() || database.contains('/') {
            return Err(fail("the path must be exactly one database name"));
        }
        let decode = |s: &str, what: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| fail(&format!("the {what} is not valid percent-encoded UTF-8")))
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

    /// The location of a mirror file.
    pub fn sqlite(file: &std::path::Path) -> ConnectionString {
        ConnectionString {
            scheme: Scheme::SQLITE,
            user: None,
            password: None,
            host: None,
            port: None,
            database: file.to_string_lossy().into_owned(),
            ssl: None,
            ssl_root_cert: None,
        }
    }

    /// The port the adapters connect to when the string names none.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(self.scheme.facts().default_port)
    }

    /// Fills in the password a server's string leaves out from a pgpass-format file
    /// ([`crate::config::passfiles`]), so that it need not be written in the URL.
    pub fn with_password_from_files(mut self) -> Result<ConnectionString, UrlError> {
        let (Some(user), None) = (&self.user, &self.password) else { return Ok(self) };
        if self.scheme == Scheme::SQLITE {
            return Ok(self);
        }
        let files = crate::config::passfiles(self.scheme.facts().reads_pgpass);
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
        if self.scheme == Scheme::SQLITE {
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
    use std::path::Path;

    #[test]
    fn parses_the_official_form_with_percent_decoding() {
        let c =
            ConnectionString::parse("postgresql://us%40er:p%40ss%3Aw@db.example:6543/dap?ssl=verify-full&x=1").unwrap();
        assert_eq!(c.scheme.name(), "postgresql");
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
    fn every_sqlite_location_form_names_the_same_file() {
        let file =
            |text: &str| ConnectionString::parse(text).map(|c| c.database).unwrap_or_else(|e| panic!("{text}: {e}"));
        for absolute in [
            "sqlite:///home/me/canvas.db",
            "sqlite:////home/me/canvas.db",
            "sqlite://///home/me/canvas.db",
            "sqlite:/home/me/canvas.db",
            "SQLite:///home/me/canvas.db",
        ] {
            assert_eq!(file(absolute), "/home/me/canvas.db", "{absolute}");
        }
        assert_eq!(file("sqlite://data/canvas.db"), "data/canvas.db");
        assert_eq!(file("sqlite:data/canvas.db"), "data/canvas.db");
        assert_eq!(file("sqlite:canvas.db"), "canvas.db");
        assert_eq!(file("sqlite:///C:/data/canvas.db"), "C:/data/canvas.db");
        assert_eq!(file("sqlite:////C:/data/canvas.db"), "C:/data/canvas.db");
        assert_eq!(file(r"sqlite:C:\data\canvas.db"), r"C:\data\canvas.db");
        assert_eq!(file("sqlite:///my%20data/canvas%2Fx.db"), "/my data/canvas/x.db");
        assert_eq!(file("sqlite:///data/100%.db"), "/data/100%.db", "a lone % stays");
        assert_eq!(file("sqlite:///data/a?b#c.db"), "/data/a?b#c.db", "? and # are part of the name");
        assert_eq!(file("sqlite:///données/cañvas.db"), "/données/cañvas.db");
        for bad in ["sqlite:", "sqlite://", "sqlite:///", "sqlite:////", "sqlite:///data/"] {
            let e = ConnectionString::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad.trim_end_matches('/')) || e.contains("sqlite:"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_password_may_hold_any_character_and_is_never_shown() {
        for (text, password) in [
            ("postgresql://repl:Pg/Secr3t@db:5432/dap", "Pg/Secr3t"),
            ("postgresql://repl:a@b:c#d?e/f@db/dap?ssl=require", "a@b:c#d?e/f"),
            ("mysql://repl:My/Pass:9@127.0.0.1:3306/dap", "My/Pass:9"),
            ("postgresql+psycopg2://repl:x/y%40z@db/dap", "x/y@z"),
        ] {
            let c = ConnectionString::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.password.as_ref().map(Secret::expose), Some(password), "{text}");
            assert_eq!(c.user.as_deref(), Some("repl"));
            assert_eq!(c.database, "dap");
            assert!(!c.redacted().contains(password) && !redact(text).contains(password), "{}", redact(text));
        }
        let c = ConnectionString::parse("postgresql://u:p@h/db?sslrootcert=/certs/a@b.pem").unwrap();
        assert_eq!((c.host.as_deref(), c.ssl_root_cert.as_deref()), (Some("h"), Some(Path::new("/certs/a@b.pem"))));
        // Strings that do not parse are redacted all the same.
        for bad in ["postgresql://u:Pg/Secr3t@h:99999/db", "postgresql://u:Pg/Secr3t@h", "mysql://u:Pg/Secr3t@"] {
            let e = ConnectionString::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("Secr3t"), "{e}");
        }
        assert_eq!(redact("https://u:Pg/Secr3t@api.example/x?y=1"), "https://u:***@api.example/x");
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
