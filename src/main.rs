//! `dap`: parse the command line, run, and map errors to exit codes.

use std::process::ExitCode;

use std::time::Duration;

use dap_replica::{cli, interrupt, privacy, secrets};

/// `EIO`, the official client's exit code for any failed operation.
const EXIT_FAILURE: u8 = 5;
/// A command line that makes no sense, as clap's own usage errors.
const EXIT_USAGE: u8 = 2;
/// `status --max-lag`: data older than the limit ("critical" to monitoring checks).
const EXIT_STALE: u8 = 3;
/// 128 + SIGINT, the shell convention for Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;
/// 128 + SIGTERM.
const EXIT_TERMINATED: u8 = 143;

#[tokio::main]
async fn main() -> ExitCode {
    // Before anything is created: every file and folder of this process is owner-only.
    privacy::restrict_new_files();
    secrets::scrub_panics();
    cli::end_quietly_when_stdout_closes();
    let cli = cli::parse();
    if let Err(e) = cli::init_logging(&cli) {
        eprintln!("error: {e:#}");
        return ExitCode::from(EXIT_FAILURE);
    }
    if let Some((profiles, one_location)) = cli.several_profiles_to_watch() {
        // One watch per profile, each a process of its own that handles its own signals.
        return match cli::watch::several_profiles(&profiles, one_location).await {
            Ok(code) => ExitCode::from(code),
            Err(e) => failed(&e),
        };
    }
    let stops_by_itself = cli.command.stops_by_itself_on_interrupt();
    let run = cli::run(cli);
    tokio::pin!(run);
    let result = tokio::select! {
        result = &mut run => result,
        _ = interrupt::terminated() => {
            // A service manager stopping us (systemd, launchd): as Ctrl-C, with SIGTERM's code.
            interrupt::raise();
            eprintln!("terminated: work in progress was rolled back; every table keeps its previous state");
            std::process::exit(EXIT_TERMINATED.into());
        }
        _ = tokio::signal::ctrl_c() => {
            interrupt::raise();
            if stops_by_itself {
                // It stops at its next row or chunk and removes its unfinished output.
                if let Ok(Err(e)) = tokio::time::timeout(Duration::from_millis(900), &mut run).await {
                    eprintln!("error: {}", cli::report(&e));
                }
            } else {
                // A database transaction that has not committed is rolled back by the database
                // itself, so every table keeps its previous consistent state.
                eprintln!("interrupted: work in progress was rolled back; every table keeps its previous state");
            }
            std::process::exit(EXIT_INTERRUPTED.into());
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(&e),
    }
}

/// Reports a failed command and gives its exit code.
fn failed(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", cli::report(e));
    if e.downcast_ref::<cli::UsageError>().is_some() {
        ExitCode::from(EXIT_USAGE)
    } else if e.downcast_ref::<cli::Stale>().is_some() {
        ExitCode::from(EXIT_STALE)
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}
