//! Every shell block of the README, run as written against the emulator and the test databases:
//! each block is a bash script (`set -e`, so any failing line fails it) with `dap` on the PATH
//! and a home folder of its own. What a reader would type differently here is replaced by the
//! rules below, each saying why; lines that cannot run unattended are left out, each saying
//! why. A new block, or a changed line, is run as it stands: nothing passes by default.

use crate::common;

use std::path::Path;

use common::targets::{Backend, TestTarget, require};
use common::*;
use dap_replica::emulator::EmulatorConfig;

/// Lines not run, by how they begin, and why.
const LEFT_OUT: &[(&str, &str)] = &[
    ("scripts/test", "the test suite itself"),
    ("bench/run", "the benchmark: minutes of work, run by hand"),
    ("cargo run --release -- emulator", "a server until stopped: the test runs its own emulator"),
    ("dap configure", "questions on a terminal: tested in client_cli"),
    ("dap watch", "runs until stopped: tested in unattended"),
    ("sqlite3 ", "an interactive shell"),
    ("dap query    ", "an interactive shell (the bare `dap query`)"),
    ("scripts/official-client.sh", "installs the official client, which scripts/test did first"),
];

/// The README's code blocks of shell commands, each with its first line number.
fn blocks(readme: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in readme.lines().enumerate() {
        match (&mut current, line.trim_start()) {
            (None, l) if l == "```sh" || l == "```bash" => current = Some((n + 2, String::new())),
            (Some(_), "```") => out.push(current.take().unwrap()),
            (Some((_, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
            _ => {}
        }
    }
    out
}

/// A block's commands: continuation lines joined, left-out lines replaced by a note.
fn runnable(block: &str) -> (String, Vec<String>) {
    let joined = block.replace("\\\n", " ");
    let mut script = Vec::new();
    let mut left_out = Vec::new();
    for line in joined.lines() {
        let command = line.trim_start();
        match LEFT_OUT.iter().find(|(start, _)| command.starts_with(start) || command == start.trim_end()) {
            Some((_, why)) => {
                left_out.push(format!("{command}  ({why})"));
                script.push(format!("# left out: {command}"));
            }
            None => script.push(line.to_string()),
        }
    }
    (script.join("\n"), left_out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shell_block_of_the_readme_runs() {
    let servers = [Backend::Postgres, Backend::Mysql].into_iter().all(require);
    let emu = emulator(EmulatorConfig { rows: 4, part_rows: 50, ..EmulatorConfig::default() }).await;
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let bin = home.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_dap"), bin.join("dap")).unwrap();
    // DuckDB's command line is not installed here; its Python module (beside the official
    // client) runs the same SQL: `duckdb -c SQL`.
    if servers {
        let shim = format!(
            "#!/bin/sh\n[ \"$1\" = -c ] || exit 2\nexec '{}' -c 'import sys, duckdb; duckdb.sql(sys.argv[1]).show()' \"$2\"\n",
            official_python().display()
        );
        std::fs::write(bin.join("duckdb"), shim).unwrap();
        std::fs::set_permissions(bin.join("duckdb"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }

    // The readers' placeholders, and what stands for them here.
    let mut rules: Vec<(String, String, &str)> = vec![
        ("cargo run --release --".into(), "dap".into(), "the built binary"),
        ("http://127.0.0.1:8642".into(), emu.base_url().to_string(), "the test's emulator"),
        ("/etc/bash_completion.d/dap".into(), "$HOME/dap.bash".into(), "a file of the test's own"),
        ("canvas-2026-12-01.dap.zst".into(), "canvas-$(date +%F).dap.zst".into(), "the pack made just before"),
        ("2026-09-15T00:00:00Z".into(), "$(date -u +%FT%TZ)".into(), "a time the history holds"),
        ("DAP_JOB_RATE=1000/1".into(), "DAP_JOB_RATE=100000/1".into(), "the test's pace"),
    ];
    let mut targets = Vec::new();
    if servers {
        let pg = TestTarget::fresh(Backend::Postgres, "readme_pg").await;
        let official_pg = TestTarget::fresh(Backend::Postgres, "readme_official").await;
        let my = TestTarget::fresh(Backend::Mysql, "readme_my").await;
        let ms = TestTarget::fresh(Backend::Mssql, "readme_ms").await;
        for (placeholder, target) in [
            ("postgresql://user:p%40ss@db:5432/dap?ssl=require", &pg),
            ("postgresql://…/dap", &pg),
            ("postgresql://…/canvas", &pg),
            ("postgresql://user:pass@127.0.0.1:5432/dap", &official_pg),
            ("mysql://user:p%40ss@db:3306/dap?ssl=require", &my),
            ("mysql://…/dap", &my),
            ("mssql://user:p%40ss@db:1433/dap", &ms),
            ("mssql://…/dap", &ms),
        ] {
            rules.push((placeholder.into(), target.url.clone(), "a test database"));
        }
        rules.push((".venv-official/bin/dap".into(), official_client().display().to_string(), "the installed client"));
        targets.extend([pg, official_pg, my, ms]);
    }

    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let blocks = blocks(&readme);
    assert!(blocks.len() >= 12, "the README's shell blocks: {}", blocks.len());
    let mut ran = 0;
    for (line, block) in &blocks {
        let (mut script, left_out) = runnable(block);
        for (from, to, _) in &rules {
            script = script.replace(from.as_str(), to);
        }
        // The servers, and the official client's environment (its DuckDB module).
        let needs_servers = ["postgresql://", "mysql://", "mssql://", "duckdb "].iter().any(|s| script.contains(s));
        if needs_servers && !servers {
            continue;
        }
        // A placeholder left in a command (not in a comment) has no rule yet.
        let commands =
            script.lines().filter(|l| !l.trim_start().starts_with('#')).map(|l| l.split(" #").next().unwrap());
        assert!(
            !commands.clone().any(|c| c.contains('…')),
            "README line {line}: a placeholder without a rule here:\n{script}"
        );
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let out = tokio::process::Command::new("bash")
            .args(["-c", &format!("set -eo pipefail\n{script}")])
            .current_dir(home)
            .env("HOME", home)
            .env_remove("XDG_DATA_HOME")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("DAP_MIRROR_DIR")
            .env_remove("DAP_CONNECTION_STRING")
            .env("PATH", path)
            .env("DAP_API_URL", emu.base_url())
            .env("DAP_CLIENT_ID", &emu.config().client_id)
            .env("DAP_CLIENT_SECRET", &emu.config().client_secret)
            .env("DAP_JOB_RATE", "100000/1")
            .env("DAP_TRACKING", "false")
            .env("DAP_ALLOW_SHARED", "true")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "README block at line {line} failed ({}):\n{script}\n--- left out: {left_out:?}\n--- stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert!(ran >= if servers { 12 } else { 7 }, "{ran} blocks ran");
    drop(targets);
}
