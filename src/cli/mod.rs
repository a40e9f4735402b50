//! The command line: global options as the official client has them, and one small function per
//! command over the library.

mod emulator;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Canvas Data 2 (DAP) client: export tables, and keep a local SQLite mirror current.
#[derive(Debug, Parser)]
#[command(name = "dap", version, about, long_about = None)]
pub struct Cli {
    /// Base URL of the DAP API.
    #[arg(
        long,
        env = "DAP_API_URL",
        default_value = "https://api-gateway.instructure.com",
        global = true
    )]
    pub base_url: String,
    /// Client ID (e.g. `us-east-1#…`).
    #[arg(long, env = "DAP_CLIENT_ID", global = true, hide_env_values = true)]
    pub client_id: Option<String>,
    /// Client secret.
    #[arg(long, env = "DAP_CLIENT_SECRET", global = true, hide_env_values = true)]
    pub client_secret: Option<String>,
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
    /// Accepted for compatibility; dap-replica never sends usage data.
    #[arg(long, global = true)]
    pub no_tracking: bool,
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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local DAP emulator (loopback only) for offline work and tests.
    Emulator(emulator::EmulatorArgs),
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Emulator(args) => emulator::run(args).await,
    }
}

/// Sets up `tracing` from the global options.
pub fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    use tracing_subscriber::fmt;
    let level = match cli.loglevel {
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Warning => tracing::Level::WARN,
        LogLevel::Error => tracing::Level::ERROR,
    };
    let builder = fmt().with_max_level(level).with_target(false);
    let to_console = !(cli.non_interactive && cli.no_log_to_console);
    match (&cli.logfile, cli.logformat) {
        (Some(path), format) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            let b = builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file));
            match format {
                LogFormat::Json => b.json().init(),
                LogFormat::Plain => b.init(),
            }
        }
        (None, LogFormat::Json) if to_console => builder.json().with_writer(std::io::stderr).init(),
        (None, LogFormat::Plain) if to_console => builder.with_writer(std::io::stderr).init(),
        (None, _) => builder.with_writer(std::io::sink).init(),
    }
    Ok(())
}
