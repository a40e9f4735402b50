//! The per-user configuration file that `dap configure` writes: DAP base URL, client ID and
//! secret, and the default replication targets, so that no secret has to be typed on a command
//! line (where `ps` shows it to every user) or kept in the environment (where shell history and
//! dotfiles keep it). The file is owner-only and refused otherwise.
//!
//! Also the pgpass-format password file for connection strings that leave the password out.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::privacy::{self, SecretFileError};

/// The configuration file's contents. Every field is optional: flags and environment variables
/// given for a run take precedence.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// Connection strings `dap replicate` copies to when no `--to` is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// Where `dap watch` posts its alerts when no `--notify` is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
    /// Other Canvas instances (`dap configure --profile NAME`, `--profile NAME` on every
    /// command): each its own credentials and targets, and its own mirror folder.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub profiles: std::collections::BTreeMap<String, UserConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("there is no home folder for the configuration file; set DAP_CONFIG_FILE to where it should be")]
    NoHome,
    #[error(transparent)]
    File(#[from] SecretFileError),
    #[error("{} is not a valid dap configuration file ({source}); fix it or write it again with `dap configure`", path.display())]
    Invalid { path: PathBuf, source: serde_json::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{} has no profile {name} (it has: {known}); `dap configure --profile {name}` creates it", path.display())]
    NoProfile { path: PathBuf, name: String, known: String },
}

/// Whether `name` can name a profile (and its mirror folder): letters, digits, `-` and `_`.
pub fn valid_profile_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The platform's configuration folder for dap (`~/.config/dap-replica` on Linux,
/// `~/Library/Application Support/dap-replica` on macOS, `%APPDATA%\dap-replica\config` on Windows).
fn config_dir() -> Result<PathBuf, ConfigError> {
    directories::ProjectDirs::from("", "", "dap-replica")
        .map(|p| p.config_dir().to_path_buf())
        .ok_or(ConfigError::NoHome)
}

/// Where the configuration file is: `DAP_CONFIG_FILE`, else `config.json` in the platform's
/// configuration folder.
pub fn config_path() -> Result<PathBuf, ConfigError> {
    match std::env::var_os("DAP_CONFIG_FILE").filter(|v| !v.is_empty()) {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(config_dir()?.join("config.json")),
    }
}

impl UserConfig {
    /// Reads the configuration file; `None` when there is none. A file other users can read is
    /// refused, as is one that does not parse.
    pub fn load(path: &Path) -> Result<Option<UserConfig>, ConfigError> {
        if !path.exists() {
            return Ok(None);
        }
        let text = privacy::read_private_file(path)?;
        let config: UserConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Invalid { path: path.to_path_buf(), source })?;
        for secret in std::iter::once(&config).chain(config.profiles.values()).filter_map(|c| c.client_secret.as_ref())
        {
            crate::secrets::register(secret);
        }
        Ok(Some(config))
    }

    /// The settings of `profile` (`None`: the default ones at the top of the file).
    pub fn profile(mut self, profile: Option<&str>, path: &Path) -> Result<UserConfig, ConfigError> {
        let Some(name) = profile else {
            self.profiles.clear();
            return Ok(self);
        };
        self.profiles.remove(name).ok_or_else(|| ConfigError::NoProfile {
            path: path.to_path_buf(),
            name: name.to_string(),
            known: if self.profiles.is_empty() {
                "none".into()
            } else {
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        })
    }

    /// Writes the configuration file owner-only, replacing it atomically.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let mut text = serde_json::to_string_pretty(self).expect("a configuration serialises");
        text.push('\n');
        privacy::write_private_file(path, text.as_bytes())
            .map_err(|source| ConfigError::Write { path: path.to_path_buf(), source })
    }
}

/// One line of a pgpass-format file: `host:port:database:user:password`, `*` matching anything.
struct PassEntry {
    fields: [String; 4],
    password: String,
}

/// Splits a pgpass line at unescaped colons (`\:` and `\\` are literal).
fn parse_pass_line(line: &str) -> Option<PassEntry> {
    let mut fields = Vec::new();
    let mut current = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.push(chars.next().unwrap_or('\\')),
            ':' if fields.len() < 4 => fields.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    fields.push(current);
    let [host, port, db, user, password]: [String; 5] = fields.try_into().ok()?;
    Some(PassEntry { fields: [host, port, db, user], password })
}

/// The files that may hold a password for a connection string of `scheme`, in the order they are
/// searched: `DAP_PASSFILE` (or `passfile` in dap's configuration folder) for every database, then
/// `PGPASSFILE` (or `~/.pgpass`) for PostgreSQL, as libpq reads it.
pub fn passfiles(postgres: bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    match std::env::var_os("DAP_PASSFILE").filter(|v| !v.is_empty()) {
        Some(f) => files.push(PathBuf::from(f)),
        None => files.extend(config_dir().ok().map(|d| d.join("passfile"))),
    }
    if postgres {
        match std::env::var_os("PGPASSFILE").filter(|v| !v.is_empty()) {
            Some(f) => files.push(PathBuf::from(f)),
            None => files.extend(directories::BaseDirs::new().map(|d| d.home_dir().join(".pgpass"))),
        }
    }
    files
}

/// The password for `host:port/database` as `user` from the first of `files` that has a matching
/// line. A file that exists but that other users can read is refused, not skipped: the user
/// expects it to be used.
pub fn lookup_password(
    files: &[PathBuf],
    host: &str,
    port: u16,
    database: &str,
    user: &str,
) -> Result<Option<String>, SecretFileError> {
    let port = port.to_string();
    let wanted = [host, port.as_str(), database, user];
    for file in files.iter().filter(|f| f.is_file()) {
        let text = privacy::read_private_file(file)?;
        let found = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(parse_pass_line)
            .find(|e| e.fields.iter().zip(wanted).all(|(have, want)| have == "*" || have == want));
        if let Some(entry) = found {
            return Ok(Some(entry.password));
        }
    }
    Ok(None)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn pgpass_lines_match_with_wildcards_and_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passfile");
        std::fs::write(&file, "# comment\nother:5432:*:repl:nope\n127.0.0.1:*:repl_test:repl:pa\\:ss\\\\w\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let files = [file.clone()];
        assert_eq!(
            lookup_password(&files, "127.0.0.1", 5432, "repl_test", "repl").unwrap().as_deref(),
            Some("pa:ss\\w")
        );
        assert_eq!(lookup_password(&files, "127.0.0.1", 5432, "repl_test", "someone").unwrap(), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(lookup_password(&files, "127.0.0.1", 5432, "repl_test", "repl").is_err());
    }

    #[test]
    fn configuration_round_trips_owner_only_and_a_shared_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg/config.json");
        let config = UserConfig {
            base_url: Some("http://127.0.0.1:1".into()),
            client_id: Some("id".into()),
            client_secret: Some("secret-value".into()),
            targets: vec!["postgresql://u@h/db".into()],
            notify: vec!["https://hooks.example.edu/T0/B0/x".into()],
            profiles: [("east".to_string(), UserConfig { client_id: Some("east-id".into()), ..UserConfig::default() })]
                .into(),
        };
        config.save(&path).unwrap();
        assert_eq!(UserConfig::load(&path).unwrap(), Some(config));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(UserConfig::load(&path), Err(ConfigError::File(SecretFileError::Shared { .. }))));
    }
}
