//! The command line: global options as the official client has them, and one small function per
//! command over the library.

mod archive;
mod configure;
mod db;
mod ddl;
mod demo;
mod download;
mod emulator;
mod export;
mod pack;
mod query;
mod replicate;
pub mod watch;

use std::path::PathBuf;

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::api::{ClientConfig, RetryPolicy};
use crate::config::UserConfig;
use crate::per_table::{self, Outcome, TableOutcome};
use crate::privacy::SharedFiles;
use crate::secrets::ScrubbingMakeWriter;

/// Canvas Data 2 (DAP) client: export tables, and keep a local SQLite mirror current.
#[derive(Debug, Parser)]
#[command(name = "dap", version, about, long_about = None, next_help_heading = "Global options")]
pub struct Cli {
    /// Base URL of the DAP API [default: the configuration file's, else
    /// https://api-gateway.instructure.com].
    #[arg(long, env = "DAP_API_URL", global = true, hide_env_values = true)]
    pub base_url: Option<String>,
    /// Client ID (e.g. `us-east-1#…`) [default: the configuration file's].
    #[arg(long, env = "DAP_CLIENT_ID", global = true, hide_env_values = true)]
    pub client_id: Option<String>,
    /// Client secret. On the command line every local user can see it (`ps`): prefer
    /// --client-secret-file or `dap configure`.
    #[arg(long, env = "DAP_CLIENT_SECRET", global = true, hide_env_values = true)]
    pub client_secret: Option<String>,
    /// A file holding the client secret alone; only its owner may be able to read it.
    #[arg(long, env = "DAP_CLIENT_SECRET_FILE", global = true, value_name = "FILE", hide_env_values = true)]
    pub client_secret_file: Option<PathBuf>,
    /// Accept mirror files and folders that other users can read (a shared analysis host), instead
    /// of warning about them.
    #[arg(long, env = "DAP_ALLOW_SHARED", global = true, hide_env_values = true)]
    pub allow_shared: bool,
    /// A Canvas instance saved with `dap configure --profile NAME`: its credentials, targets
    /// and its own default mirror folder (`dap watch` takes several: one watch each).
    #[arg(long, env = "DAP_PROFILE", global = true, value_name = "NAME", action = clap::ArgAction::Append)]
    pub profile: Vec<String>,
    /// Set when the secret was typed on the command line (visible to other users).
    #[arg(skip)]
    pub secret_on_command_line: bool,
    /// Options whose connection strings typed on the command line hold a password.
    #[arg(skip)]
    pub passwords_on_command_line: Vec<String>,
    /// Log level.
    #[arg(long, value_enum, default_value_t = LogLevel::Info, global = true)]
    pub loglevel: LogLevel,
    /// Append log records to this file.
    #[arg(long, global = true)]
    pub logfile: Option<PathBuf>,
    /// Log record format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub logformat: LogFormat,
    /// Script-oriented output: no progress bars, results on stdout.
    #[arg(long, global = true)]
    pub non_interactive: bool,
    /// With --non-interactive, do not log to stderr.
    #[arg(long, global = true)]
    pub no_log_to_console: bool,
    /// Accepted for compatibility with the official client, and ignored: dap colours only
    /// terminals, and never with NO_COLOR set.
    #[arg(long, value_enum, env = "DAP_CONSOLE_THEME", global = true, hide_env_values = true)]
    pub console_theme: Option<ConsoleTheme>,
    /// Accepted for compatibility; dap-replica never sends usage data (nor reads DAP_TRACKING).
    #[arg(long, global = true)]
    pub no_tracking: bool,
    /// Attempts per request before giving up (429, 5xx, timeouts and resets are retried).
    #[arg(long, default_value_t = 8, global = true)]
    pub max_attempts: u32,
    /// Job creations allowed per window, as N/SECONDS (DAP allows 5 per minute).
    #[arg(long, env = "DAP_JOB_RATE", default_value = "5/60", value_parser = parse_rate, global = true, hide_env_values = true)]
    pub job_rate: (usize, f64),
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// A duration as people write it: `600` (seconds), `90s`, `10m`, `2h`, `1d`, or `0`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 90s, 10m or 2h"))?;
    let seconds = match unit.trim() {
        "" | "s" | "sec" | "secs" | "seconds" => n,
        "ms" => n / 1000.0,
        "m" | "min" | "mins" | "minutes" => n * 60.0,
        "h" | "hour" | "hours" => n * 3600.0,
        "d" | "day" | "days" => n * 86_400.0,
        other => return Err(format!("{text:?}: the unit {other:?} is not one of s, m, h or d")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_rate(s: &str) -> Result<(usize, f64), String> {
    let (n, secs) = s.split_once('/').ok_or("expected N/SECONDS, e.g. 5/60")?;
    let n: usize = n.trim().parse().map_err(|_| format!("{n:?} is not a count"))?;
    let secs: f64 = secs.trim().parse().map_err(|_| format!("{secs:?} is not a number of seconds"))?;
    if n == 0 || secs <= 0.0 {
        return Err("the rate must allow at least one job per positive window".into());
    }
    Ok((n, secs))
}

/// The emulator's control routes, for `dap emulator --help` (no credentials; loopback only).
const EMULATOR_CONTROL_ROUTES: &str = "Control routes (plain HTTP on the same port, no credentials):
  POST /emulator/commit         change rows: {\"namespace\", \"table\", \"inserts\", \"updates\", \"soft_deletes\",
                                \"hard_deletes\", \"at\"?: RFC 3339, \"prepare\"?: \"tsv\" (make the next sync's job now)}
  POST /emulator/schema         bump a table's schema: {\"namespace\", \"table\", \"change\": \"add_column\" | ...}
  POST /emulator/tables         add a table: {\"namespace\", \"table\", \"rows\"?}
  POST /emulator/faults         inject a fault: {\"kind\", \"endpoint\"?, \"table\"?, \"count\"?}; DELETE clears them
  GET  /emulator/truth/NS/TABLE the table's current rows as JSON lines (?at=RFC 3339 for an earlier commit)
  GET  /emulator/stats          responses answered per endpoint and status
  POST /emulator/jobs/expire    expire every job now";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the tables of a namespace.
    List(download::ListArgs),
    /// Download table schemas as <table>_schema_version_<N>.json.
    Schema(download::SchemaArgs),
    /// Download a snapshot of tables into <output-directory>/job_<id>/.
    Snapshot(download::SnapshotArgs),
    /// Download the changes to tables since a time into <output-directory>/job_<id>/.
    Incremental(download::IncrementalArgs),
    /// Initialise tables in the mirror from a snapshot.
    Initdb(db::InitArgs),
    /// Bring initialised tables up to date with the changes since their watermark.
    Syncdb(db::SyncArgs),
    /// Keep tables current unattended: syncdb --init-missing on a schedule (--every 4h), one run
    /// at a time, with alerts (--notify), metrics and a record of every run.
    Watch(watch::WatchArgs),
    /// Drop tables (and their bookkeeping) from the mirror.
    Dropdb(db::DbArgs),
    /// List the server's tables with their replication state.
    Listdb(db::ListDbArgs),
    /// Copy tables from the local mirror to other databases (no DAP access needed).
    Replicate(replicate::ReplicateArgs),
    /// Print the DDL initdb runs on an empty database (to review or provision it beforehand).
    Ddl(ddl::DdlArgs),
    /// Show the mirror: rows, schema version, watermark, staleness and last result per table.
    Status(db::StatusArgs),
    /// Run read-only SQL over the mirror (every namespace attached by name); no SQL opens sqlite3.
    Query(query::QueryArgs),
    /// Print every version of one row of a table that keeps history (oldest first).
    History(query::HistoryArgs),
    /// Write a mirror table, or a query, to a CSV, TSV, JSON Lines or Parquet file.
    Export(export::ExportArgs),
    /// Keep a log table (web_logs, which DAP keeps 30 days) as day-partitioned Parquet files
    /// that DuckDB, pandas and Spark read; reruns write only what changed.
    Archive(archive::ArchiveArgs),
    /// Write a consistent copy of the mirror into one compressed file (safe during a sync).
    Pack(pack::PackArgs),
    /// Restore a mirror from a pack; it syncs on from where the pack left off.
    Unpack(pack::UnpackArgs),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Save the DAP credentials and default targets in a file only you can read, so that no
    /// secret is typed on a command line or kept in the environment.
    Configure(configure::ConfigureArgs),
    /// Try everything offline: a local emulator, a demo mirror, a sync, a query.
    Demo(demo::DemoArgs),
    /// Run a local DAP emulator (loopback only) for offline work and tests.
    #[command(after_help = EMULATOR_CONTROL_ROUTES)]
    Emulator(emulator::EmulatorArgs),
}

/// A command line that parses but makes no sense (`--until` before `--since`): exit code 2, as
/// clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// `status --max-lag` found tables older than the limit: exit code 3, as monitoring checks
/// (Nagios, Icinga) read "critical".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Stale(pub String);

/// The official client's colour themes; accepted so that its command lines work, and ignored.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ConsoleTheme {
    Dark,
    Light,
    HighContrastBw,
}

/// The DAP API of Instructure's hosted service.
const DEFAULT_BASE_URL: &str = "https://api-gateway.instructure.com";

/// What goes to the console besides results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// Log records go to the console: a table's failure is shown there as it happens.
    Logged,
    /// Log records go to `--logfile` only: failures are listed at the end.
    Unlogged,
    /// `--non-interactive --no-log-to-console`: errors only.
    ErrorsOnly,
}

impl Console {
    /// Prints a summary line on stderr, unless only errors may be printed.
    pub fn summary(self, line: &str) {
        if self != Console::ErrorsOnly {
            eprintln!("{line}");
        }
    }

    /// Prints a table's failure on stderr, unless the log already showed it there.
    pub fn failure(self, line: &str) {
        if self != Console::Logged {
            eprintln!("{}", crate::secrets::scrub(line));
        }
    }
}

/// What every command gets from the global options.
pub struct Context {
    pub client: ClientConfig,
    pub interactive: bool,
    pub console: Console,
    pub shared: SharedFiles,
    /// `dap replicate`'s targets when no `--to` is given (from the configuration file).
    pub default_targets: Vec<String>,
    /// `dap watch`'s alert URLs when no `--notify` is given (from the configuration file).
    pub default_notify: Vec<String>,
}

/// Global options about reaching DAP, which commands that never call it do not list.
const DAP_ACCESS_OPTIONS: [&str; 6] =
    ["base_url", "client_id", "client_secret", "client_secret_file", "max_attempts", "job_rate"];

/// Commands that never call DAP (the demo and the emulator bring their own).
const OFFLINE_COMMANDS: [&str; 10] =
    ["dropdb", "replicate", "status", "query", "export", "pack", "unpack", "completions", "demo", "emulator"];

/// The command line's definition, with each command's help listing only the options that mean
/// something to it (the others are still accepted, so a shared set of flags never breaks).
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    // A command that has an argument of a global's id keeps its own: a hidden copy.
    let hidden: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| DAP_ACCESS_OPTIONS.contains(&a.get_id().as_str()))
        .map(|a| a.clone().hide(true))
        .collect();
    for name in OFFLINE_COMMANDS {
        cmd = cmd.mut_subcommand(name, |sub| sub.args(hidden.iter().cloned()));
    }
    cmd
}

impl Cli {
    /// The profiles of a `dap watch --profile A --profile B`, which runs one watch per profile
    /// (see [`watch::several_profiles`]), with the option that would give them one mirror;
    /// `None` for every other command line.
    pub fn several_profiles_to_watch(&self) -> Option<(Vec<String>, Option<&'static str>)> {
        match &self.command {
            Command::Watch(args) if self.profile.len() > 1 && !args.prints_unit() => {
                Some((self.profile.clone(), args.one_location()))
            }
            _ => None,
        }
    }
}

/// Parses the command line, noting where the secret came from.
pub fn parse() -> Cli {
    let matches = command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.secret_on_command_line = matches.value_source("client_secret") == Some(ValueSource::CommandLine);
    cli.passwords_on_command_line = passwords_typed(&matches);
    cli
}

/// The options of the command whose connection strings were typed on the command line (where
/// `ps` shows them to every user) with a password in them.
fn passwords_typed(matches: &clap::ArgMatches) -> Vec<String> {
    let Some((_, sub)) = matches.subcommand() else { return Vec::new() };
    let mut found = Vec::new();
    for (id, flag) in [
        ("connection_string", "--connection-string"),
        ("to", "--to"),
        ("replicate_to", "--replicate-to"),
        ("from", "--from"),
    ] {
        let typed =
            sub.try_get_raw(id).ok().flatten().is_some() && sub.value_source(id) == Some(ValueSource::CommandLine);
        let values = if typed { sub.get_raw(id).into_iter().flatten().collect::<Vec<_>>() } else { Vec::new() };
        let with_password = values.iter().filter_map(|v| v.to_str()).any(crate::sink::has_password);
        if with_password {
            found.push(flag.to_string());
        }
    }
    found
}

impl Cli {
    /// The options every command needs, with what the flags and variables leave out taken from the
    /// secret file and the configuration file (read only when something is missing).
    fn context(&self) -> anyhow::Result<Context> {
        if self.secret_on_command_line {
            tracing::warn!(
                "--client-secret on the command line can be seen by every user of this machine (`ps`); use --client-secret-file FILE, DAP_CLIENT_SECRET_FILE or `dap configure` instead"
            );
        }
        for flag in &self.passwords_on_command_line {
            tracing::warn!(
                "the password in {flag} on the command line can be seen by every user of this machine (`ps`); leave it out of the URL and keep it in a password file (~/.pgpass or PGPASSFILE for PostgreSQL, the same format in DAP_PASSFILE for the others), or save the target with `dap configure --target`"
            );
        }
        let mut secret = self.client_secret.clone().filter(|s| !s.is_empty());
        if secret.is_none()
            && let Some(file) = &self.client_secret_file
        {
            let text = crate::privacy::read_private_file(file).context("--client-secret-file")?;
            let text = text.trim_end_matches(['\r', '\n']).to_string();
            if text.is_empty() {
                bail!("--client-secret-file {}: the file is empty; write the client secret into it", file.display());
            }
            crate::secrets::register(&text);
            secret = Some(text);
        }
        let profile = match self.profile.as_slice() {
            [] => None,
            [one] => Some(one.trim()).filter(|p| !p.is_empty()),
            // Only `watch --print-unit` gets here with several (see `several_profiles_to_watch`):
            // the unit it prints runs them all.
            [_, ..] if matches!(&self.command, Command::Watch(_)) => None,
            several => {
                return Err(UsageError(format!(
                    "--profile is given {} times; one command works on one Canvas instance (only `dap watch` runs several)",
                    several.len()
                ))
                .into());
            }
        };
        if let Some(name) = profile {
            if !crate::config::valid_profile_name(name) {
                return Err(UsageError(format!(
                    "--profile {name:?}: a profile name is letters, digits, - and _ (it names a folder)"
                ))
                .into());
            }
            crate::mirror::folder::use_profile(name);
        }
        let replicate_needs_targets = matches!(&self.command, Command::Replicate(a) if a.needs_default_targets());
        let config = match &self.command {
            Command::Configure(_)
            | Command::Emulator(_)
            | Command::Query(_)
            | Command::History(_)
            | Command::Export(_)
            | Command::Archive(_)
            | Command::Pack(_)
            | Command::Unpack(_)
            | Command::Completions { .. } => None,
            _ if profile.is_some()
                || self.base_url.is_none()
                || self.client_id.is_none()
                || secret.is_none()
                || replicate_needs_targets
                || matches!(&self.command, Command::Watch(_)) =>
            {
                let path = crate::config::config_path()?;
                match UserConfig::load(&path)? {
                    Some(config) => Some(config.profile(profile, &path)?),
                    None if profile.is_some() => {
                        return Err(crate::config::ConfigError::NoProfile {
                            path,
                            name: profile.unwrap_or_default().to_string(),
                            known: "none".into(),
                        }
                        .into());
                    }
                    None => None,
                }
            }
            _ => None,
        }
        .unwrap_or_default();
        let base_url = self.base_url.clone().or(config.base_url).unwrap_or_else(|| DEFAULT_BASE_URL.into());
        if self.command.calls_dap() {
            check_base_url(&base_url)?;
        }
        let mut client = ClientConfig::new(&base_url);
        client.client_id = self.client_id.clone().or(config.client_id);
        client.client_secret = secret.or(config.client_secret);
        client.retry = RetryPolicy { attempts: self.max_attempts.max(1), ..RetryPolicy::default() };
        client.job_limit = self.job_rate.0;
        client.job_window = Duration::from_secs_f64(self.job_rate.1);
        let shared = if self.allow_shared { SharedFiles::Accept } else { SharedFiles::Warn };
        let console = match (&self.logfile, self.non_interactive && self.no_log_to_console) {
            (_, true) => Console::ErrorsOnly,
            (Some(_), false) => Console::Unlogged,
            (None, false) => Console::Logged,
        };
        Ok(Context {
            client,
            interactive: !self.non_interactive,
            console,
            shared,
            default_targets: config.targets,
            default_notify: config.notify,
        })
    }
}

/// Prints the summary (and failures) on stderr; fails when any table did not succeed.
pub(crate) fn finish<T>(console: Console, command: &str, outcomes: &[TableOutcome<T>]) -> anyhow::Result<()> {
    let (line, all_ok) = per_table::summarize(outcomes);
    for o in outcomes {
        match &o.outcome {
            Outcome::Failed { error } => console.failure(&format!("  failed  {}: {error}", o.table)),
            Outcome::Skipped { reason } => eprintln!("  skipped {}: {reason}", o.table),
            Outcome::Succeeded { .. } => {}
        }
    }
    if all_ok {
        console.summary(&format!("{command}: {line}"));
        Ok(())
    } else {
        bail!("{command}: {line}")
    }
}

/// Prints a result document on stdout, scrubbed of secrets.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", crate::secrets::scrub(&serde_json::to_string_pretty(value)?));
    Ok(())
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let ctx = cli.context()?;
    match cli.command {
        Command::Configure(args) => {
            configure::run(&ctx, cli.base_url.as_deref(), cli.profile.first().map(String::as_str), args)
        }
        Command::Query(args) => quiet_on_closed_pipe(on_a_thread(move || query::run(args)).await),
        Command::History(args) => quiet_on_closed_pipe(on_a_thread(move || query::history(args)).await),
        Command::Export(args) => on_a_thread(move || export::run(args)).await,
        Command::Archive(args) => on_a_thread(move || archive::run(args)).await,
        Command::Pack(args) => on_a_thread(move || pack::pack(args)).await,
        Command::Unpack(args) => on_a_thread(move || pack::unpack(args)).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "dap", &mut std::io::stdout());
            Ok(())
        }
        Command::List(args) => download::list(&ctx, args).await,
        Command::Schema(args) => download::schema(&ctx, args).await,
        Command::Snapshot(args) => download::snapshot(&ctx, args).await,
        Command::Incremental(args) => download::incremental(&ctx, args).await,
        Command::Initdb(args) => db::initdb(&ctx, args).await,
        Command::Syncdb(args) => db::syncdb(&ctx, args).await,
        Command::Watch(args) => watch::run(&ctx, args).await,
        Command::Dropdb(args) => db::drop(&ctx, args).await,
        Command::Listdb(args) => db::listdb(&ctx, args).await,
        Command::Replicate(args) => replicate::replicate(&ctx, args).await,
        Command::Status(args) => db::status(&ctx, args).await,
        Command::Ddl(args) => ddl::run(&ctx, args).await,
        Command::Demo(args) => demo::run(&ctx, args).await,
        Command::Emulator(args) => emulator::run(args).await,
    }
}

/// A DAP API URL that cannot work is a usage error at once (exit 2), not eight retries.
fn check_base_url(base_url: &str) -> anyhow::Result<()> {
    let shown = crate::sink::redact(base_url);
    let problem = match reqwest::Url::parse(base_url) {
        Err(e) => Some(e.to_string()),
        Ok(u) if !matches!(u.scheme(), "http" | "https") => {
            Some(format!("the scheme {:?} is not http or https", u.scheme()))
        }
        Ok(u) if u.host_str().is_none_or(str::is_empty) => Some("it names no host".into()),
        Ok(_) => None,
    };
    match problem {
        Some(why) => Err(UsageError(format!(
            "the DAP API URL {shown} cannot be used: {why}; give --base-url (or DAP_API_URL) as https://HOST, e.g. {DEFAULT_BASE_URL}"
        ))
        .into()),
        None => Ok(()),
    }
}

impl Command {
    /// Commands that ask DAP (the others never use its URL or credentials).
    fn calls_dap(&self) -> bool {
        matches!(
            self,
            Command::List(_)
                | Command::Schema(_)
                | Command::Snapshot(_)
                | Command::Incremental(_)
                | Command::Initdb(_)
                | Command::Syncdb(_)
                | Command::Listdb(_)
                | Command::Ddl(_)
        ) && !self.works_offline()
    }

    /// A command that asks DAP only for what no local copy has: `ddl` from a mirror's stored
    /// schemas or schema files.
    fn works_offline(&self) -> bool {
        matches!(self, Command::Ddl(args) if args.is_offline())
    }

    /// Commands that work on a thread of their own and, on Ctrl-C, stop at their next row or
    /// chunk and remove their unfinished output themselves (see `interrupt.rs`).
    pub fn stops_by_itself_on_interrupt(&self) -> bool {
        matches!(
            self,
            Command::Query(_)
                | Command::History(_)
                | Command::Export(_)
                | Command::Archive(_)
                | Command::Pack(_)
                | Command::Unpack(_)
        )
    }
}

/// Runs a command that blocks (SQLite, files) on a thread of its own, so that `main` stays free
/// to see Ctrl-C.
async fn on_a_thread(work: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// A reader that stops reading (`dap list | head`) ends dap as it ends any Unix tool, by SIGPIPE,
/// at the print that fails (Rust panics there). SIGPIPE itself stays ignored: on a socket, a
/// peer that closes mid-write (a TLS handshake refused, a server gone) is an error to report, not
/// a reason to die without a word.
pub fn end_quietly_when_stdout_closes() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = crate::secrets::panic_message(info).unwrap_or_default();
        if payload.contains("Broken pipe") || payload.contains("BrokenPipe") {
            #[cfg(unix)]
            // SAFETY: restores the default action of SIGPIPE and raises it; the process ends.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            std::process::exit(141);
        }
        previous(info)
    }));
}

/// A reader that stopped reading (`dap query … | head`) is not a failure.
fn quiet_on_closed_pipe(result: anyhow::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                    || c.downcast_ref::<crate::query::QueryError>().is_some_and(|q| {
                        matches!(q, crate::query::QueryError::Output(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
                    })
            }) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// An error as one line: its message, then each cause the message does not already say; never
/// a secret.
pub fn report(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !already_says(&text, &cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    crate::secrets::scrub(&text).into_owned()
}

/// Whether `text` says what `cause` says, in any case and without a driver's "Error code N: The"
/// (SQLite's result code repeats the message rusqlite already gave: "Error code 11: The database
/// disk image is malformed").
fn already_says(text: &str, cause: &str) -> bool {
    let cause = cause.to_lowercase();
    let words = match cause.strip_prefix("error code ").and_then(|rest| rest.split_once(": ")) {
        Some((code, words)) if code.bytes().all(|b| b.is_ascii_digit()) => words.trim_start_matches("the "),
        _ => cause.as_str(),
    };
    text.to_lowercase().contains(words)
}

/// Sets up `tracing` from the global options.
pub fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    use tracing_subscriber::fmt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = match cli.loglevel {
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Warning => tracing::Level::WARN,
        LogLevel::Error => tracing::Level::ERROR,
    };
    // The drivers' own warnings repeat per connection what the adapters say once (tiberius:
    // "TLS encryption is not enabled" on every connection of `?ssl=disable`).
    let filter =
        tracing_subscriber::filter::Targets::new().with_default(level).with_target("tiberius", tracing::Level::ERROR);
    // Colour only for a person at a terminal, and never with NO_COLOR (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = fmt().with_max_level(level).with_target(false).with_ansi(colour);
    let to_console = !(cli.non_interactive && cli.no_log_to_console);
    match (&cli.logfile, cli.logformat) {
        (Some(path), format) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            let b = builder.with_ansi(false).with_writer(ScrubbingMakeWriter(std::sync::Mutex::new(file)));
            match format {
                LogFormat::Json => b.json().finish().with(filter).init(),
                LogFormat::Plain => b.finish().with(filter).init(),
            }
        }
        (None, LogFormat::Json) if to_console => builder
            .json()
            .with_writer(ScrubbingMakeWriter(crate::progress::console_writer))
            .finish()
            .with(filter)
            .init(),
        (None, LogFormat::Plain) if to_console => {
            builder.with_writer(ScrubbingMakeWriter(crate::progress::console_writer)).finish().with(filter).init()
        }
        (None, _) => builder.with_writer(std::io::sink).finish().with(filter).init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_as_people_write_them() {
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("10x").is_err() && parse_duration("-1").is_err() && parse_duration("").is_err());
    }

    #[test]
    fn a_cause_the_message_already_gives_is_not_repeated() {
        let ffi = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT);
        let e = anyhow::Error::new(ffi).context("canvas.db: counting users: database disk image is malformed");
        assert_eq!(report(&e), "canvas.db: counting users: database disk image is malformed");
        let e = anyhow::anyhow!("connection refused").context("listing tables");
        assert_eq!(report(&e), "listing tables: connection refused");
        assert!(!already_says("error code 7: out of memory", "Error code x: out"));
    }

    /// Every command with its subcommands, each built (global options propagated).
    fn commands() -> Vec<clap::Command> {
        let mut root = command();
        root.build();
        root.get_subcommands().cloned().collect()
    }

    #[test]
    fn every_option_of_every_command_says_what_it_is_for() {
        let mut undescribed = Vec::new();
        for sub in commands() {
            for arg in sub.get_arguments().filter(|a| a.get_id() != "help") {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    undescribed.push(format!("{} --{}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(undescribed.is_empty(), "options without a description: {undescribed:?}");
    }

    /// Help shows what a command uses, in whole sentences: dropdb loads nothing, every target
    /// option names the four schemes, the emulator lists its control routes, `--scope` says it all.
    #[test]
    fn each_command_lists_what_it_uses_in_whole_sentences() {
        let mut root = command();
        root.build();
        let mut help = |name: &str| root.find_subcommand_mut(name).unwrap().render_long_help().to_string();
        let (dropdb, initdb, emulator) = (help("dropdb"), help("initdb"), help("emulator"));
        for unused in ["--parallel-tables", "--temp-dir", "--non-finite"] {
            assert!(!dropdb.contains(unused), "dropdb does not load: {unused} in {dropdb}");
            assert!(initdb.contains(unused), "{initdb}");
        }
        for used in ["--namespace", "--table", "--connection-string", "--lock-timeout", "--json"] {
            assert!(dropdb.contains(used), "{used} missing from {dropdb}");
        }
        for scheme in ["postgresql://", "mysql://", "mssql://", "sqlite:///", "sqlite:////"] {
            assert!(dropdb.contains(scheme) && initdb.contains(scheme), "{scheme} not named");
        }
        for route in ["/emulator/commit", "/emulator/faults", "/emulator/truth"] {
            assert!(emulator.contains(route), "{route} missing from {emulator}");
        }
        let snapshot = help("snapshot");
        assert!(snapshot.contains("when the credentials can read several; by default"), "--scope whole: {snapshot}");
    }

    fn parse_from(args: &[&str]) -> Result<Cli, clap::Error> {
        let matches = command().try_get_matches_from(args)?;
        Cli::from_arg_matches(&matches)
    }

    #[test]
    fn commands_that_never_call_dap_do_not_list_its_options_yet_accept_them() {
        let mut root = command();
        root.build();
        let help = root.find_subcommand_mut("status").unwrap().render_long_help().to_string();
        assert!(!help.contains("--base-url") && !help.contains("--client-secret"), "{help}");
        assert!(help.contains("Global options:") && help.contains("--loglevel"), "{help}");
        let help = root.find_subcommand_mut("initdb").unwrap().render_long_help().to_string();
        assert!(help.contains("--base-url") && help.contains("Global options:"), "{help}");
        assert!(!help.contains("DAP_API_URL="), "no stray `=` after a variable: {help}");
        let cli = parse_from(&[
            "dap",
            "replicate",
            "--namespace",
            "canvas",
            "--table",
            "all",
            "--max-attempts",
            "3",
            "--base-url",
            "http://x",
        ])
        .unwrap();
        assert_eq!((cli.max_attempts, cli.base_url.as_deref()), (3, Some("http://x")));
    }

    #[test]
    fn the_official_clients_global_options_are_accepted_before_the_command() {
        let official = [
            "dap",
            "--base-url",
            "https://api-gateway.instructure.com",
            "--client-id",
            "us-east-1#id",
            "--client-secret",
            "s",
            "--loglevel",
            "warning",
            "--logfile",
            "dap.log",
            "--logformat",
            "json",
            "--no-log-to-console",
            "--no-tracking",
            "--non-interactive",
            "--console-theme",
            "high-contrast-bw",
            "list",
            "--namespace",
            "canvas",
        ];
        let cli = parse_from(&official).unwrap();
        assert!(cli.non_interactive && cli.no_log_to_console && cli.no_tracking);
        assert_eq!(cli.client_id.as_deref(), Some("us-east-1#id"));
        for (flag, kind) in
            [("--version", clap::error::ErrorKind::DisplayVersion), ("-h", clap::error::ErrorKind::DisplayHelp)]
        {
            assert_eq!(parse_from(&["dap", flag]).err().map(|e| e.kind()), Some(kind), "{flag}");
        }
    }
}
