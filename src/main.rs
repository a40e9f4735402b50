//! `dap`: parse the command line, run, and map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use dap_replica::cli::{self, Cli};

/// `EIO`, the official client's exit code for any failed operation.
const EXIT_FAILURE: u8 = 5;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli::init_logging(&cli) {
        eprintln!("error: {e:#}");
        return ExitCode::from(EXIT_FAILURE);
    }
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
