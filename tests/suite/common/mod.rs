//! Shared test support: the emulator in-process, the official Python client, fresh databases,
//! and row-by-row comparison with the emulator's ground truth.
#![allow(dead_code)] // each test crate uses a different part of this module

// Comparison with the truth, the targets and the servers live in a crate of their own, built
// optimised (crates/test-support): unoptimised, reading rows back and comparing them was most of
// the CPU of the heaviest tests.
pub use dap_test_support::servers::*;
pub use dap_test_support::{mssql, targets, tds, truth};

use std::path::{Path, PathBuf};
use std::process::Output;

use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig};

/// The official client's `dap` executable: `$DAP_OFFICIAL_CLIENT`, else the virtual environment
/// that `scripts/test` creates.
pub fn official_client() -> PathBuf {
    let path = std::env::var_os("DAP_OFFICIAL_CLIENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-official/bin/dap"));
    assert!(
        path.exists(),
        "the official client is not installed at {}: run scripts/test (or scripts/official-client.sh) first, or set DAP_OFFICIAL_CLIENT",
        path.display()
    );
    path
}

/// The Python interpreter of the official client's virtual environment (it also has pyarrow).
pub fn official_python() -> PathBuf {
    official_client().with_file_name("python")
}

pub async fn emulator(config: EmulatorConfig) -> Emulator {
    Emulator::start(config).await.expect("emulator starts")
}

/// Runs the official client against the emulator in `dir`, non-interactively.
pub async fn run_official(emu: &Emulator, dir: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(official_client())
        .current_dir(dir)
        .env("DAP_API_URL", emu.base_url())
        .env("DAP_CLIENT_ID", &emu.config().client_id)
        .env("DAP_CLIENT_SECRET", &emu.config().client_secret)
        .env("DAP_TRACKING", "false")
        .arg("--non-interactive")
        .args(args)
        .output()
        .await
        .expect("the official client runs")
}

/// Like [`run_official`], but fails the test unless the command succeeds.
pub async fn official_ok(emu: &Emulator, dir: &Path, args: &[&str]) -> String {
    let out = run_official(emu, dir, args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "official client {args:?} failed ({}):\n{stderr}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our `dap` binary set up against the emulator in `dir`, non-interactively: the one place a
/// test builds the command, for tests that run it, spawn it or kill it.
pub fn ours_command(emu: &Emulator, dir: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dap"));
    cmd.current_dir(dir)
        .env("DAP_API_URL", emu.base_url())
        .env("DAP_CLIENT_ID", &emu.config().client_id)
        .env("DAP_CLIENT_SECRET", &emu.config().client_secret)
        .env_remove("DAP_CONNECTION_STRING")
        .env("DAP_JOB_RATE", job_rate(emu.config()))
        .arg("--non-interactive")
        .kill_on_drop(true);
    cmd
}

/// Runs our `dap` binary against the emulator in `dir`, non-interactively, with `env` on top.
pub async fn run_ours_with(emu: &Emulator, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = ours_command(emu, dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).output().await.expect("our dap runs")
}

/// A running `dap` whose stderr is read as it comes, so that a test acts at an observable point
/// (a log line) rather than after a fixed delay.
pub struct Watched {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr: String,
    stdout: tokio::task::JoinHandle<Vec<u8>>,
}

impl Watched {
    pub fn spawn(mut cmd: tokio::process::Command) -> Watched {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("our dap starts");
        let (send, lines) = tokio::sync::mpsc::unbounded_channel();
        let mut err = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err.next_line().await {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut out = child.stdout.take().unwrap();
        let stdout = tokio::spawn(async move {
            let mut all = Vec::new();
            out.read_to_end(&mut all).await.ok();
            all
        });
        Watched { child, lines, stderr: String::new(), stdout }
    }

    /// Waits for a stderr line containing `needle`; panics when the process ends first or
    /// nothing comes within `PROCESS_DEADLINE`.
    pub async fn wait_for(&mut self, needle: &str) {
        let waiting = async {
            while let Some(line) = self.lines.recv().await {
                self.stderr.push_str(&line);
                self.stderr.push('\n');
                if line.contains(needle) {
                    return true;
                }
            }
            false
        };
        let seen = tokio::time::timeout(PROCESS_DEADLINE, waiting).await;
        assert!(seen == Ok(true), "dap never logged {needle:?}:\n{}", self.stderr);
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// Waits for the process to end; its whole output.
    pub async fn finish(mut self) -> Output {
        let status = tokio::time::timeout(PROCESS_DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("dap still running after {PROCESS_DEADLINE:?}: it hung"))
            .unwrap();
        while let Some(line) = self.lines.recv().await {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        Output { status, stdout: self.stdout.await.unwrap(), stderr: self.stderr.into_bytes() }
    }
}

/// How long a test waits for one `dap` process before it calls it hung.
pub const PROCESS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// Commits the same changes to every one of `tables` (a round of a sync test).
pub fn commit_round(emu: &Emulator, namespace: &str, tables: &[&str], counts: ChangeCounts) {
    for table in tables {
        emu.commit(namespace, table, counts).unwrap_or_else(|e| panic!("commit on {namespace}.{table}: {e}"));
    }
}

/// Changes enough to span several parts of a kill test's tables: inserts, updates and both
/// kinds of delete.
pub const BIG_ROUND: ChangeCounts = ChangeCounts { inserts: 300, updates: 300, soft_deletes: 50, hard_deletes: 50 };

/// Our client paces job creation to the emulator's limit, or not at all when it enforces none.
fn job_rate(config: &EmulatorConfig) -> String {
    if config.rate_limits { format!("5/{}", config.rate_window.as_secs_f64()) } else { "100000/1".into() }
}

pub async fn run_ours(emu: &Emulator, dir: &Path, args: &[&str]) -> Output {
    run_ours_with(emu, dir, args, &[]).await
}

/// Like [`run_ours`], but fails the test unless the command succeeds; returns stdout.
pub async fn ours_ok(emu: &Emulator, dir: &Path, args: &[&str]) -> String {
    let out = run_ours(emu, dir, args).await;
    assert!(out.status.success(), "dap {args:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir`, relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A downloaded object's content: gunzipped for text formats, raw for Parquet.
pub fn object_content(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&bytes[..]), &mut out)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out
    } else {
        bytes
    }
}

/// Lines of the official client's debug log that executed DDL.
pub fn ddl_in_official_log(log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0].ends_with("execute SQL:"))
        .map(|w| w[1].trim().to_string())
        .filter(|sql| ["CREATE", "ALTER", "DROP", "COMMENT", "TRUNCATE"].iter().any(|k| sql.starts_with(k)))
        .collect()
}

/// What `dap args` writes to a 50×200 pseudo-terminal (`script` gives it one), one drawn line
/// per line: cursor movements become line breaks, other escape sequences are taken out.
pub fn on_a_terminal(
    program: &Path,
    emu: &Emulator,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String) {
    on_a_terminal_of(program, emu, dir, args, env, (50, 200))
}

/// [`on_a_terminal`] on a pseudo-terminal of `(rows, cols)`.
pub fn on_a_terminal_of(
    program: &Path,
    emu: &Emulator,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    size: (u16, u16),
) -> (bool, String) {
    let mut cmd = in_a_pty_of(program, args, size);
    cmd.current_dir(dir)
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .env("DAP_API_URL", emu.base_url())
        .env("DAP_CLIENT_ID", &emu.config().client_id)
        .env("DAP_CLIENT_SECRET", &emu.config().client_secret)
        .env("DAP_TRACKING", "false")
        .env("DAP_JOB_RATE", job_rate(emu.config()))
        .env("DAP_ALLOW_SHARED", "true");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("script(1) runs");
    (out.status.success(), strip_escapes(&String::from_utf8_lossy(&out.stdout)))
}

/// `program args` run by `script` in a 50×200 pseudo-terminal, its screen on `script`'s stdout.
pub fn in_a_pty(program: &Path, args: &[&str]) -> std::process::Command {
    in_a_pty_of(program, args, (50, 200))
}

/// [`in_a_pty`] of `(rows, cols)`.
pub fn in_a_pty_of(program: &Path, args: &[&str], (rows, cols): (u16, u16)) -> std::process::Command {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let command = format!("stty rows {rows} cols {cols}; '{}' {}", program.display(), quoted.join(" "));
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qefc", &command, "/dev/null"]);
    cmd
}

/// Turns carriage returns and cursor movements into line breaks and drops other escape sequences.
pub fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                Some('[') => {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() || c == '~' {
                            if matches!(c, 'A' | 'B' | 'K') {
                                out.push('\n');
                            }
                            break;
                        }
                    }
                }
                Some(']') => {
                    for c in chars.by_ref() {
                        if c == '\u{7}' {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => out.push('\n'),
            c => out.push(c),
        }
    }
    out
}

/// Three tests, `$name::part_{1,2,3}_of_3`, each running `$body(shard)` on its third of the
/// tables, so that a whole-namespace comparison runs in three processes at once.
#[macro_export]
macro_rules! in_three_parts {
    ($name:ident => $body:ident) => {
        mod $name {
            use $crate::common::Shard;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn part_1_of_3() {
                super::$body(Shard { index: 0, of: 3 }).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn part_2_of_3() {
                super::$body(Shard { index: 1, of: 3 }).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn part_3_of_3() {
                super::$body(Shard { index: 2, of: 3 }).await;
            }
        }
    };
}

/// One part of a comparison over every table, so the parts run at once (the official client syncs
/// tables one at a time, which makes a whole-namespace comparison take minutes).
#[derive(Clone, Copy, Debug)]
pub struct Shard {
    /// 0-based.
    pub index: usize,
    pub of: usize,
}

impl Shard {
    /// Every `of`-th table of `tables`, starting at `index`: spread over the alphabet, so each part
    /// holds large and small tables alike.
    pub fn tables(self, tables: &[String]) -> Vec<String> {
        tables.iter().skip(self.index).step_by(self.of).cloned().collect()
    }

    /// The first part also covers what is done once (the other namespaces, whole-database checks).
    pub fn is_first(self) -> bool {
        self.index == 0
    }

    /// Each namespace of the comparison with this part's tables in it: `canvas` shared out,
    /// `canvas_logs` whole in the first part.
    pub fn namespaces(self, emu: &Emulator) -> Vec<(&'static str, Vec<String>)> {
        let mut parts = vec![("canvas", self.tables(&emu.tables("canvas").unwrap()))];
        if self.is_first() {
            parts.push(("canvas_logs", emu.tables("canvas_logs").unwrap()));
        }
        parts
    }

    /// A suffix for database names, so the parts never share one.
    pub fn suffix(self) -> String {
        format!("{}of{}", self.index + 1, self.of)
    }
}

/// How [`differences`] names the two lists when they are ours and the official client's.
pub const OURS_AND_THEIRS: [&str; 2] = ["ours", "the official client's"];

/// Up to 8 lines in each list and not the other, for a readable failure: a line whose key (first
/// tab-separated field) is in both lists is shown as the fields that differ, others cut to 300
/// characters.
pub fn differences(first: &[String], second: &[String], names: [&str; 2]) -> String {
    let cut = |s: &str, n: usize| -> String { s.chars().take(n).collect() };
    let only = |these: &[String], those: &[String]| -> Vec<String> {
        these
            .iter()
            .filter(|l| !those.contains(l))
            .take(8)
            .map(|line| {
                let key = line.split('\t').next().unwrap_or_default();
                match those.iter().find(|o| o.split('\t').next() == Some(key)) {
                    Some(other) => {
                        let fields: Vec<String> = line
                            .split('\t')
                            .zip(other.split('\t'))
                            .enumerate()
                            .filter(|(_, (a, b))| a != b)
                            .map(|(i, (a, b))| format!("field {i}: {} | other: {}", cut(a, 120), cut(b, 120)))
                            .collect();
                        format!("key {key}: {}", fields.join("; "))
                    }
                    None => cut(line, 300),
                }
            })
            .collect()
    };
    let (only_first, only_second) = (only(first, second), only(second, first));
    format!("only {}: {only_first:#?}\nonly {}: {only_second:#?}", names[0], names[1])
}

/// A TCP forwarder in front of a database server that a test can shut: while shut, each
/// connection is accepted and closed at once, as a server that is down behind its address
/// (a stopped pooler, a failed-over host) looks to a client.
pub struct Gate {
    pub addr: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    /// Forwards to the host and port of the connection string `url`.
    pub async fn to(url: &str) -> Gate {
        let upstream = authority(url).1.to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let is_open = open.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !is_open.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Gate { addr, open }
    }

    /// `url` with its host and port replaced by the gate's.
    pub fn url(&self, url: &str) -> String {
        let (start, host_port) = authority(url);
        format!("{}{}{}", &url[..start], self.addr, &url[start + host_port.len()..])
    }

    pub fn shut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn reopen(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where the `host:port` of a connection string starts, and the text itself.
fn authority(url: &str) -> (usize, &str) {
    let after_scheme = url.find("://").expect("a URL") + 3;
    let rest = &url[after_scheme..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let start = rest[..end].rfind('@').map_or(0, |at| at + 1);
    (after_scheme + start, &rest[start..end])
}

/// One test per (case, backend) from one body, named for both (`case::postgres`): a failing
/// backend neither hides the others nor its own name. Each case is an
/// `async fn case(backend: Backend)`; a backend this machine lacks is handled by [`require`].
#[macro_export]
macro_rules! each_backend {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use $crate::common::targets::{Backend, require};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if require(Backend::Sqlite) {
                    super::$case(Backend::Sqlite).await
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if require(Backend::Postgres) {
                    super::$case(Backend::Postgres).await
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mariadb() {
                if require(Backend::Mysql) {
                    super::$case(Backend::Mysql).await
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mssql() {
                if require(Backend::Mssql) {
                    super::$case(Backend::Mssql).await
                }
            }
        }
    )*};
}
