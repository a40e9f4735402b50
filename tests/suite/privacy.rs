//! Student data stays private: everything `dap` creates is owner-only under a permissive umask,
//! shared mirrors are named in a warning and left alone, secrets come from private files (a
//! secret file, `dap configure`'s file, a pgpass-format file), and no secret reaches any output,
//! log or file, even when the server echoes the request back.
#![cfg(unix)]

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::emulator;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, Endpoint, FaultKind, FaultSpec};

/// A client secret no output may show.
const SECRET: &str = "Sup3r-Secret-Value-4711";

fn config() -> EmulatorConfig {
    EmulatorConfig { rows: 40, part_rows: 15, client_secret: SECRET.into(), ..EmulatorConfig::default() }
}

/// How a run gets its credentials.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Credentials {
    /// `DAP_API_URL`, `DAP_CLIENT_ID` and `DAP_CLIENT_SECRET` in the environment.
    Environment,
    /// None given: only what files provide.
    None,
}

/// Runs our `dap` in `dir` under umask 022 (so that only dap's own care makes files private),
/// with a private configuration path under `dir`, `env` on top, and `stdin` fed in.
async fn dap(
    emu: &Emulator,
    dir: &Path,
    credentials: Credentials,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dap"));
    cmd.current_dir(dir)
        .env_remove("DAP_API_URL")
        .env_remove("DAP_CLIENT_ID")
        .env_remove("DAP_CLIENT_SECRET")
        .env_remove("DAP_CLIENT_SECRET_FILE")
        .env_remove("DAP_CONNECTION_STRING")
        .env_remove("DAP_REPLICATE_TO")
        .env_remove("DAP_ALLOW_SHARED")
        .env_remove("PGPASSFILE")
        .env("DAP_PASSFILE", dir.join("no-passfile"))
        .env("DAP_CONFIG_FILE", dir.join("config/dap.json"))
        .env("DAP_MIRROR_DIR", dir.join("mirror"))
        .env("DAP_JOB_RATE", "100000/1")
        .arg("--non-interactive")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if credentials == Credentials::Environment {
        cmd.env("DAP_API_URL", emu.base_url())
            .env("DAP_CLIENT_ID", &emu.config().client_id)
            .env("DAP_CLIENT_SECRET", &emu.config().client_secret);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: umask is async-signal-safe and touches nothing but the child's mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("dap starts");
    let mut input = child.stdin.take().expect("stdin is piped");
    input.write_all(stdin.as_bytes()).await.expect("stdin is written");
    drop(input);
    child.wait_with_output().await.expect("dap runs")
}

async fn dap_ok(emu: &Emulator, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = dap(emu, dir, Credentials::Environment, args, env, "").await;
    assert!(out.status.success(), "dap {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every file and folder under `root` (not `root` itself).
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Every file's bytes and mode under `root`, to show that a refused run changed nothing.
fn snapshot(root: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
    tree(root)
        .into_iter()
        .map(|p| {
            let bytes = if p.is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
            (p.clone(), mode(&p), bytes)
        })
        .collect()
}

#[tokio::test]
async fn everything_dap_creates_is_owner_only_under_umask_022() {
    let emu = emulator(config()).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let log = dir.join("dap.log");
    let log = log.to_str().unwrap();
    let logged = |args: &[&'static str]| {
        let mut a = vec!["--logfile", log];
        a.extend_from_slice(args);
        a
    };
    dap_ok(&emu, dir, &logged(&["initdb", "--namespace", "canvas", "--table", "accounts,users"]), &[]).await;
    emu.commit("canvas", "users", ChangeCounts { inserts: 3, updates: 2, hard_deletes: 1, ..Default::default() })
        .unwrap();
    dap_ok(&emu, dir, &logged(&["syncdb", "--namespace", "canvas", "--table", "all"]), &[]).await;
    let custom = format!("sqlite://{}", dir.join("custom/nested/canvas.db").display());
    let replica = format!("sqlite://{}", dir.join("replica/canvas.db").display());
    dap_ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &custom], &[])
        .await;
    dap_ok(&emu, dir, &["replicate", "--namespace", "canvas", "--table", "all", "--to", &replica], &[]).await;
    let exports = dir.join("exports");
    let exports = exports.to_str().unwrap();
    dap_ok(
        &emu,
        dir,
        &["snapshot", "--namespace", "canvas", "--table", "accounts", "--output-directory", exports],
        &[],
    )
    .await;
    dap_ok(
        &emu,
        dir,
        &[
            "incremental",
            "--namespace",
            "canvas",
            "--table",
            "users",
            "--since",
            "2020-01-01T00:00:00Z",
            "--output-directory",
            exports,
        ],
        &[],
    )
    .await;
    dap_ok(&emu, dir, &["schema", "--namespace", "canvas", "--table", "accounts", "--output-directory", exports], &[])
        .await;
    let pack = dir.join("packs/canvas.dap.zst");
    std::fs::create_dir(dir.join("packs")).unwrap();
    set_mode(&dir.join("packs"), 0o700);
    dap_ok(&emu, dir, &["pack", "--output", pack.to_str().unwrap()], &[]).await;
    dap_ok(&emu, dir, &["unpack", pack.to_str().unwrap(), "--dir", dir.join("unpacked").to_str().unwrap()], &[]).await;
    let exported = dir.join("exports/users.parquet");
    dap_ok(&emu, dir, &["export", "--table", "users", "--output", exported.to_str().unwrap()], &[]).await;
    let out = dap(&emu, dir, Credentials::Environment, &["configure"], &[], "").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dap_ok(&emu, dir, &["demo", "--dir", dir.join("demo").to_str().unwrap(), "--rows", "30"], &[]).await;

    let created = tree(dir);
    for expected in [
        "mirror/canvas.db",
        "mirror/state.json",
        "replica/canvas.db",
        "custom/nested/canvas.db",
        "packs/canvas.dap.zst",
        "unpacked/canvas.db",
        "exports/users.parquet",
    ] {
        assert!(created.contains(&dir.join(expected)), "{expected} was not created: {created:?}");
    }
    assert!(created.iter().any(|p| p.starts_with(dir.join("exports")) && p.extension().is_some_and(|e| e == "gz")));
    assert!(created.contains(&dir.join("config/dap.json")) && created.contains(&dir.join("dap.log")));
    let shared: Vec<String> = created
        .iter()
        .filter(|p| mode(p) != if p.is_dir() { 0o700 } else { 0o600 })
        .map(|p| format!("{} {:04o}", p.strip_prefix(dir).unwrap().display(), mode(p)))
        .collect();
    assert!(shared.is_empty(), "created with access for others: {shared:#?}");
}

#[tokio::test]
async fn a_shared_mirror_is_named_in_a_warning_and_left_as_it_is() {
    let emu = emulator(config()).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    dap_ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "accounts"], &[]).await;
    let (folder, file) = (dir.join("mirror"), dir.join("mirror/canvas.db"));
    set_mode(&folder, 0o755);
    set_mode(&file, 0o644);
    let out = dap_ok(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", "accounts"], &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (path, fix) in [(&file, "chmod 600"), (&folder, "chmod 700")] {
        let fix = format!("`{fix} '{}'`", path.display());
        assert!(stderr.contains(&fix), "no warning with {fix}:\n{stderr}");
    }
    assert!(stderr.contains("--allow-shared"));
    assert_eq!((mode(&folder), mode(&file)), (0o755, 0o644), "dap changed the owner's choice");
    // A folder of several namespace files is named once per command, not once per file.
    dap_ok(&emu, dir, &["initdb", "--namespace", "canvas_logs", "--table", "web_logs"], &[]).await;
    let out = dap_ok(&emu, dir, &["status"], &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches(&format!("`chmod 700 '{}'`", folder.display())).count(), 1, "{stderr}");
    for accepted in [&["--allow-shared"][..], &[]] {
        let env: &[(&str, &str)] = if accepted.is_empty() { &[("DAP_ALLOW_SHARED", "true")] } else { &[] };
        let mut args = accepted.to_vec();
        args.extend(["status"]);
        let out = dap_ok(&emu, dir, &args, env).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("other users"), "warned although accepted: {stderr}");
    }
}

#[tokio::test]
async fn secret_files_that_others_can_read_are_refused_and_change_nothing() {
    let emu = emulator(config()).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    set_mode(&secret_file, 0o644);
    let base = emu.base_url().to_string();
    let id = emu.config().client_id.clone();
    let env = [("DAP_API_URL", base.as_str()), ("DAP_CLIENT_ID", id.as_str())];
    let by_file = ["--client-secret-file", secret_file.to_str().unwrap(), "initdb", "--namespace", "canvas"];
    let args = [&by_file[..], &["--table", "accounts"]].concat();
    let before = snapshot(dir);
    let out = dap(&emu, dir, Credentials::None, &args, &env, "").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("chmod 600 '{}'", secret_file.display())), "{stderr}");
    assert!(!stderr.contains(SECRET));
    assert_eq!(snapshot(dir), before, "a refused run created or changed files");

    set_mode(&secret_file, 0o600);
    let out = dap(&emu, dir, Credentials::None, &args, &env, "").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(&secret_file), 0o600);

    // A configuration file others can read is refused the same way.
    let cfg = dir.join("config/dap.json");
    let out = dap(&emu, dir, Credentials::None, &["configure"], &[], &format!("{base}\n{id}\n{SECRET}\n")).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    set_mode(&cfg, 0o644);
    let before = snapshot(dir);
    let out = dap(&emu, dir, Credentials::None, &["list", "--namespace", "canvas"], &[], "").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(&format!("chmod 600 '{}'", cfg.display())), "{stderr}");
    assert_eq!(snapshot(dir), before);

    // On the command line the secret works, with a warning that others can see it.
    let out =
        dap(&emu, dir, Credentials::None, &["--client-secret", SECRET, "list", "--namespace", "canvas"], &env, "")
            .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("--client-secret-file"), "{stderr}");
}

#[tokio::test]
async fn configure_then_list_needs_no_credentials_anywhere_else() {
    let emu = emulator(config()).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let (base, id) = (emu.base_url().to_string(), emu.config().client_id.clone());
    // Without credentials nothing works, and the error says how to give them.
    let out = dap(&emu, dir, Credentials::None, &["list", "--namespace", "canvas"], &[], "").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("DAP_CLIENT_ID"), "{stderr}");
    // Nor does a mirror command, and it leaves no folder, file, lock or state.json behind.
    for command in ["initdb", "syncdb"] {
        let args = [command, "--namespace", "canvas", "--table", "accounts"];
        let out = dap(&emu, dir, Credentials::None, &args, &[], "").await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("dap configure"), "{command}: {stderr}");
        assert!(!dir.join("mirror").exists(), "{command} without credentials created the mirror folder");
    }

    let replica = format!("sqlite://{}", dir.join("replica.db").display());
    let answers = format!("{base}\n{id}\n{SECRET}\n");
    let out = dap(&emu, dir, Credentials::None, &["configure", "--target", &replica], &[], &answers).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg = dir.join("config/dap.json");
    assert_eq!((mode(&cfg), mode(cfg.parent().unwrap())), (0o600, 0o700));

    let out = dap(&emu, dir, Credentials::None, &["list", "--namespace", "canvas"], &[], "").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(listed, emu.tables("canvas").unwrap());

    // The saved targets are replicate's default.
    let out =
        dap(&emu, dir, Credentials::None, &["initdb", "--namespace", "canvas", "--table", "accounts"], &[], "").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out =
        dap(&emu, dir, Credentials::None, &["replicate", "--namespace", "canvas", "--table", "all"], &[], "").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conn = rusqlite::Connection::open(dir.join("replica.db")).unwrap();
    let n: i64 = conn.query_row("SELECT count(*) FROM accounts", [], |r| r.get(0)).unwrap();
    assert_eq!(n as usize, emu.truth("canvas", "accounts").unwrap().len());

    // Running it again keeps what is not given (Enter keeps the saved values) and shows no secret.
    let out = dap(&emu, dir, Credentials::None, &["configure"], &[], "\n\n\n").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = dap(&emu, dir, Credentials::None, &["configure", "--show"], &[], "").await;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains(&id) && shown.contains("(set)") && !shown.contains(SECRET), "{shown}");
    let out = dap(&emu, dir, Credentials::None, &["list", "--namespace", "canvas"], &[], "").await;
    assert!(out.status.success());

    // Bad answers save nothing.
    let before = snapshot(dir);
    let out = dap(&emu, dir, Credentials::None, &["configure"], &[], "ftp://nowhere\n").await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nothing was saved"));
    assert_eq!(snapshot(dir), before);
}

/// `printf 'url\nid\nsecret\n' | dap configure` with DAP_* set: the answers land on their own
/// questions (the environment's values are only defaults); a secret piped alone is refused as
/// a URL without being repeated, and nothing is saved.
#[tokio::test]
async fn piped_answers_to_configure_land_in_order_whatever_the_environment_holds() {
    let emu = emulator(config()).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let (url, id, secret) = ("http://127.0.0.1:9", "us-east-1#piped-id", "piped-secret-value-4711");
    let answers = format!("{url}\n{id}\n{secret}\n");
    let out = dap(&emu, dir, Credentials::Environment, &["configure"], &[], &answers).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config/dap.json")).unwrap()).unwrap();
    assert_eq!(
        (saved["base_url"].as_str(), saved["client_id"].as_str(), saved["client_secret"].as_str()),
        (Some(url), Some(id), Some(secret)),
        "{saved}"
    );

    let before = snapshot(dir);
    let out = dap(&emu, dir, Credentials::Environment, &["configure"], &[], &format!("{SECRET}\n")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("nothing was saved"), "{stderr}");
    assert!(!stderr.contains(SECRET), "the piped secret was repeated: {stderr}");
    assert_eq!(snapshot(dir), before);
}

/// A connection string without its password takes it from a pgpass-format file.
#[tokio::test]
async fn server_passwords_come_from_a_pgpass_format_file() {
    let Some(url) = common::targets::require_var("TEST_POSTGRES_URL") else {
        return;
    };
    let parsed = dap_replica::sink::ConnectionString::parse(&url).unwrap();
    let (user, password) = (parsed.user.clone().unwrap(), parsed.password.clone().unwrap());
    let (host, port) = (parsed.host.clone().unwrap(), parsed.port_or_default());
    let without = format!("postgresql://{user}@{host}:{port}/{}", parsed.database);
    let emu = emulator(config()).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let passfile = dir.join("pgpass");
    std::fs::write(&passfile, format!("{host}:{port}:*:{user}:{}\n", password.expose())).unwrap();
    set_mode(&passfile, 0o600);
    let listdb = ["listdb", "--namespace", "canvas", "--omit-record-count", "--connection-string", &without];
    for var in ["PGPASSFILE", "DAP_PASSFILE"] {
        let env = [(var, passfile.to_str().unwrap())];
        let out = dap(&emu, dir, Credentials::Environment, &listdb, &env, "").await;
        assert!(out.status.success(), "{var}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The control: the same file with another password fails, so the password did come from it.
    let wrong = dir.join("pgpass-wrong");
    std::fs::write(&wrong, format!("{host}:{port}:*:{user}:not-{}\n", password.expose())).unwrap();
    set_mode(&wrong, 0o600);
    let out = dap(&emu, dir, Credentials::Environment, &listdb, &[("PGPASSFILE", wrong.to_str().unwrap())], "").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("password"), "a wrong password in the file fails: {stderr}");
    assert!(!stderr.contains(&format!("not-{}", password.expose())), "{stderr}");
    set_mode(&passfile, 0o644);
    let env = [("PGPASSFILE", passfile.to_str().unwrap())];
    let out = dap(&emu, dir, Credentials::Environment, &listdb, &env, "").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("chmod 600"), "{stderr}");
    assert!(!stderr.contains(password.expose()));
}

/// A run at `--loglevel debug` into the log file `log`.
async fn debug_logged(emu: &Emulator, dir: &Path, log: &Path, args: Vec<&str>) -> Output {
    let mut all = vec!["--loglevel", "debug", "--logfile", log.to_str().unwrap()];
    all.extend(args);
    dap(emu, dir, Credentials::Environment, &all, &[], "").await
}

async fn dap_owned(emu: &Emulator, dir: &Path, args: Vec<&str>) -> Output {
    dap(emu, dir, Credentials::Environment, &args, &[], "").await
}

/// Everything a run wrote: stdout, stderr, and every file under `dir`.
fn everything_written(dir: &Path, outputs: &[Output]) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<(String, Vec<u8>)> = outputs
        .iter()
        .enumerate()
        .flat_map(|(i, o)| {
            [(format!("stdout of run {i}"), o.stdout.clone()), (format!("stderr of run {i}"), o.stderr.clone())]
        })
        .collect();
    for p in tree(dir).into_iter().filter(|p| p.is_file()) {
        all.push((p.display().to_string(), std::fs::read(&p).unwrap()));
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether a pre-signed URL's signature is shown: `X-Amz-Signature=` followed by anything but
/// the `***` that hides it.
fn shows_signature(haystack: &[u8]) -> bool {
    const PARAM: &[u8] = b"X-Amz-Signature=";
    haystack
        .windows(PARAM.len() + 1)
        .any(|w| w.starts_with(PARAM) && (w[PARAM.len()].is_ascii_alphanumeric() || b"-_".contains(&w[PARAM.len()])))
}

#[tokio::test]
async fn no_secret_reaches_logs_output_or_files_even_when_the_server_echoes_the_request() {
    let emu = emulator(config()).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let log = dir.join("debug.log");
    let mut outputs = Vec::new();
    let echo = |status: u16, endpoint: Endpoint, count: u32| {
        let mut f = FaultSpec::new(FaultKind::EchoRequest, count).on(endpoint);
        f.status = Some(status);
        f
    };
    // A 401 at login that quotes the Basic header back.
    emu.inject(echo(401, Endpoint::Login, 1));
    let out = dap_owned(&emu, dir, vec!["list", "--namespace", "canvas"]).await;
    assert!(!out.status.success(), "a 401 must fail the run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("authentication failed"));
    outputs.push(out);
    // A 403 on a query that quotes the bearer token back, on the console and in the JSON.
    emu.inject(echo(403, Endpoint::Query, 1));
    let out = dap_owned(&emu, dir, vec!["snapshot", "--namespace", "canvas", "--table", "accounts", "--json"]).await;
    assert!(!out.status.success(), "a 403 must fail the table");
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected POST"), "the server's message is kept");
    outputs.push(out);
    emu.clear_faults();
    // 500s that quote tokens and object URL signatures, then expired URLs: retried to success.
    emu.inject(echo(500, Endpoint::Job, 2));
    emu.inject(echo(500, Endpoint::Object, 2));
    emu.inject(echo(500, Endpoint::ObjectUrl, 1));
    emu.inject(FaultSpec::new(FaultKind::ExpiredUrl, 2).on(Endpoint::Object));
    let out =
        debug_logged(&emu, dir, &log, vec!["initdb", "--namespace", "canvas", "--table", "accounts,users", "--json"])
            .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    outputs.push(out);
    let stats = emu.stats();
    let served =
        [(Endpoint::Object, 500), (Endpoint::ObjectUrl, 500), (Endpoint::Object, 403)].map(|(e, s)| stats.count(e, s));
    assert_eq!(served, [2, 1, 2], "the faults were served: {stats:?}");
    // The same on the console at debug level, with a 401 in the middle of a run.
    emu.inject(echo(500, Endpoint::Job, 1));
    emu.inject(echo(401, Endpoint::Schema, 1));
    outputs.push(
        dap_owned(
            &emu,
            dir,
            vec!["--loglevel", "debug", "syncdb", "--namespace", "canvas", "--table", "all", "--json"],
        )
        .await,
    );
    emu.clear_faults();
    // Failing databases, with passwords in their connection strings.
    let db_password = "Db-Pa55word-9981";
    let unreachable = format!("postgresql://repl:{db_password}@127.0.0.1:1/nowhere");
    let out = debug_logged(
        &emu,
        dir,
        &log,
        vec!["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &unreachable],
    )
    .await;
    assert!(!out.status.success());
    outputs.push(out);
    let mut passwords = vec![db_password.to_string()];
    for var in ["TEST_POSTGRES_URL", "TEST_MYSQL_URL"] {
        let Ok(url) = std::env::var(var) else { continue };
        let parsed = dap_replica::sink::ConnectionString::parse(&url).unwrap();
        let real = parsed.password.clone().unwrap().expose().to_string();
        // Wrong password: the server refuses it.
        let wrong = url.replacen(&format!(":{real}@"), &format!(":{db_password}@"), 1);
        outputs.push(
            debug_logged(
                &emu,
                dir,
                &log,
                vec!["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &wrong],
            )
            .await,
        );
        // Right password, and a replication from the mirror: works, and says nothing of it.
        let out = debug_logged(
            &emu,
            dir,
            &log,
            vec!["replicate", "--namespace", "canvas", "--table", "accounts", "--to", &url, "--json"],
        )
        .await;
        let out_ok = out.status.success();
        outputs.push(out);
        assert!(out_ok, "replicate to {var} failed");
        passwords.push(real);
    }

    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{SECRET}", emu.config().client_id))
    };
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("the client secret".into(), SECRET.as_bytes().to_vec()),
        ("the Basic credentials".into(), basic.into_bytes()),
        ("a bearer token (JWT header)".into(), b"eyJhbGciOi".to_vec()),
    ];
    needles.extend(passwords.into_iter().map(|p| ("a database password".to_string(), p.into_bytes())));
    let written = everything_written(dir, &outputs);
    assert!(
        written.iter().any(|(name, bytes)| name.ends_with("debug.log") && contains(bytes, b"DEBUG")),
        "the debug log was written"
    );
    for (name, bytes) in &written {
        assert!(!shows_signature(bytes), "an object URL signature is in {name}");
    }
    for (what, needle) in &needles {
        for (name, bytes) in &written {
            if contains(bytes, needle) {
                let text = String::from_utf8_lossy(bytes);
                let at = text.find(&*String::from_utf8_lossy(needle)).unwrap_or(0);
                let context = &text[at.saturating_sub(200)..(at + 200).min(text.len())];
                panic!("{what} is in {name}: …{context}…");
            }
        }
    }
}

/// `dap configure` typed at a real terminal (a pseudo-terminal from `script`): the client ID is
/// echoed as typed, the secret is not, and both are saved.
#[test]
fn configure_at_a_terminal_does_not_echo_the_secret() {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dap.json");
    let mut child = common::in_a_pty(std::path::Path::new(env!("CARGO_BIN_EXE_dap")), &["configure"])
        .env("DAP_CONFIG_FILE", &config)
        .env("TERM", "xterm")
        .env_remove("DAP_API_URL")
        .env_remove("DAP_CLIENT_ID")
        .env_remove("DAP_CLIENT_SECRET")
        .env_remove("DAP_CLIENT_SECRET_FILE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script(1) runs");
    let mut typing = child.stdin.take().unwrap();
    let screen = Arc::new(Mutex::new(String::new()));
    let mut output = child.stdout.take().unwrap();
    let shown = screen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = output.read(&mut buf) {
            if n == 0 {
                break;
            }
            shown.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let id = "us-east-1#typed-at-a-terminal";
    for (prompt, answer) in [("DAP API URL", "http://127.0.0.1:9"), ("Client ID", id), ("Client secret", SECRET)] {
        let asked = Instant::now();
        while !screen.lock().unwrap().contains(prompt) {
            assert!(asked.elapsed() < Duration::from_secs(20), "no {prompt:?} prompt: {}", screen.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        // Typed as soon as the prompt shows: echo is off before the secret's prompt is written.
        typing.write_all(format!("{answer}\n").as_bytes()).unwrap();
        typing.flush().unwrap();
    }
    let status = child.wait().unwrap();
    drop(typing);
    reader.join().unwrap();
    let screen = screen.lock().unwrap().clone();
    assert!(status.success(), "{screen}");
    assert!(screen.contains(id) && screen.contains("Saved to"), "{screen}");
    assert!(!screen.contains(SECRET), "the secret was echoed: {screen}");
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains(SECRET) && saved.contains(id), "{saved}");
}
