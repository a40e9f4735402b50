//! Clean output for scripts: a closed pipe ends `dap` quietly, no colour codes off a terminal,
//! the official client's `--console-theme` is accepted, and a nonsensical command line exits 2.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

use common::*;
use dap_replica::emulator::EmulatorConfig;

#[test]
fn a_reader_that_stops_reading_ends_dap_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dap"))
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one byte and close the pipe, as `| head -c1` does.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    assert_ne!(status.code(), Some(101), "no panic exit");
}

#[tokio::test]
async fn logs_off_a_terminal_have_no_colour_codes_and_the_console_theme_is_accepted() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    for theme in ["dark", "light", "high-contrast-bw"] {
        let out = run_ours(&emu, dir.path(), &["--console-theme", theme, "list", "--namespace", "canvas"]).await;
        assert!(out.status.success(), "{theme}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = run_ours(&emu, dir.path(), &["--loglevel", "debug", "list", "--namespace", "canvas"]).await;
    assert!(!out.stderr.is_empty(), "debug logs were written");
    assert!(!out.stderr.contains(&0x1b), "escape codes in a redirected log: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn until_before_since_is_a_usage_error() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let out = run_ours(
        &emu,
        dir.path(),
        &[
            "incremental",
            "--namespace",
            "canvas",
            "--table",
            "users",
            "--since",
            "2025-01-02T00:00:00Z",
            "--until",
            "2025-01-01T00:00:00Z",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be later than --since"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing was written");
}
