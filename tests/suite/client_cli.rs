//! Our export commands (`list`, `schema`, `snapshot`, `incremental`) against the emulator: the
//! same files as the official client, robustness to every fault, pacing, and bad input.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, Endpoint, FaultKind, FaultSpec};
use serde_json::Value;

const TABLES: &[&str] = &[
    "accounts",
    "assignments",
    "courses",
    "enrollments",
    "submissions",
    "users",
    "quiz_questions",
    "developer_keys",
    "late_policies",
    "learning_outcomes",
];

fn config() -> EmulatorConfig {
    EmulatorConfig { rows: 60, part_rows: 25, ..EmulatorConfig::default() }
}

fn workdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// The objects under `dir/downloads`, keyed by file name (job folders differ between runs), with
/// their decompressed content.
fn objects(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let root = dir.join("downloads");
    files_under(&root)
        .into_iter()
        .filter(|p| p.components().count() == 2)
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), object_content(&root.join(&p))))
        .collect()
}

fn no_partial_files(dir: &Path) {
    let partial: Vec<PathBuf> =
        files_under(dir).into_iter().filter(|p| p.to_string_lossy().contains(".partial")).collect();
    assert!(partial.is_empty(), "partial files left behind: {partial:?}");
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_incremental_files_equal_the_official_clients() {
    let emu = emulator(config()).await;
    let tables = TABLES.join(",");
    for format in ["tsv", "csv", "jsonl", "parquet"] {
        let (theirs, ours) = (workdir(), workdir());
        let args = ["snapshot", "--namespace", "canvas", "--table", tables.as_str(), "--format", format];
        official_ok(&emu, theirs.path(), &args).await;
        emu.expire_jobs(); // our run gets jobs of its own
        ours_ok(&emu, ours.path(), &args).await;
        let (a, b) = (objects(theirs.path()), objects(ours.path()));
        assert_eq!(a.len(), TABLES.len() * 4, "{format}: 3 data parts and a header-only part per table");
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{format}: the same files");
        for (name, content) in &a {
            assert!(b[name] == *content, "{format}: {name} differs");
        }
        emu.expire_jobs();
    }

    let first = emu.commit("canvas", "accounts", ChangeCounts { updates: 3, ..Default::default() }).unwrap();
    for t in TABLES {
        emu.commit("canvas", t, ChangeCounts { inserts: 2, updates: 2, hard_deletes: 1, ..Default::default() })
            .unwrap();
    }
    let (theirs, ours) = (workdir(), workdir());
    let args = [
        "incremental",
        "--namespace",
        "canvas",
        "--table",
        tables.as_str(),
        "--format",
        "tsv",
        "--since",
        first.ts.as_str(),
    ];
    official_ok(&emu, theirs.path(), &args).await;
    emu.expire_jobs();
    ours_ok(&emu, ours.path(), &args).await;
    let (a, b) = (objects(theirs.path()), objects(ours.path()));
    assert!(!a.is_empty());
    assert_eq!(a, b, "incremental files are byte-identical after decompression");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_schema_equal_the_official_clients() {
    let emu = emulator(config()).await;
    let (theirs, ours) = (workdir(), workdir());
    let list = ["list", "--namespace", "canvas"];
    assert_eq!(official_ok(&emu, theirs.path(), &list).await, ours_ok(&emu, ours.path(), &list).await);
    let schema = ["schema", "--namespace", "canvas", "--table", "all"];
    official_ok(&emu, theirs.path(), &schema).await;
    ours_ok(&emu, ours.path(), &schema).await;
    let (a, b) = (files_under(theirs.path()), files_under(ours.path()));
    assert_eq!(a.len(), 91);
    assert_eq!(a, b, "the same schema file names");
    let mut non_ascii = 0;
    for f in &a {
        let (theirs, ours) =
            (std::fs::read(theirs.path().join(f)).unwrap(), std::fs::read(ours.path().join(f)).unwrap());
        non_ascii += theirs.windows(2).filter(|w| w == b"\\u").count();
        assert!(theirs == ours, "{} differs from the official client's bytes", f.display());
    }
    assert!(non_ascii > 0, "some schema text is non-ASCII, so the escaping is exercised");
}

/// Downloads `accounts` in TSV with `fault` injected and returns its objects.
async fn snapshot_with(emu: &Emulator, fault: Option<FaultSpec>) -> (std::process::Output, tempfile::TempDir) {
    emu.expire_jobs();
    if let Some(f) = fault {
        emu.inject(f);
    }
    let dir = workdir();
    let out = run_ours_with(
        emu,
        dir.path(),
        &["snapshot", "--namespace", "canvas", "--table", "accounts", "--format", "tsv"],
        &[],
    )
    .await;
    emu.clear_faults();
    no_partial_files(dir.path());
    (out, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_is_survived_or_reported_with_the_servers_message() {
    let emu = emulator(config()).await;
    let (clean, clean_dir) = snapshot_with(&emu, None).await;
    assert!(clean.status.success());
    let expected = objects(clean_dir.path());

    let survivable = [
        FaultSpec::new(FaultKind::TooManyRequests, 2).on(Endpoint::Query),
        FaultSpec::new(FaultKind::ServerError, 3).on(Endpoint::Job),
        FaultSpec::new(FaultKind::BadGateway, 2).on(Endpoint::ObjectUrl),
        FaultSpec::new(FaultKind::GatewayTimeout, 1).on(Endpoint::Login),
        FaultSpec::new(FaultKind::Reset, 3).on(Endpoint::Object),
        FaultSpec::new(FaultKind::Reset, 1).on(Endpoint::Query),
        FaultSpec::new(FaultKind::TruncatedGzip, 2).on(Endpoint::Object),
        FaultSpec::new(FaultKind::ExpiredUrl, 2).on(Endpoint::Object),
    ];
    for fault in survivable {
        let label = format!("{:?} on {:?}", fault.kind, fault.endpoint);
        let resumed_before = emu.stats().count(Endpoint::Object, 206);
        let reset_objects = fault.kind == FaultKind::Reset && fault.endpoint == Some(Endpoint::Object);
        let (out, dir) = snapshot_with(&emu, Some(fault)).await;
        assert!(out.status.success(), "{label}: {}", stderr(&out));
        assert_eq!(objects(dir.path()), expected, "{label}: the same result as without the fault");
        if reset_objects {
            assert!(
                emu.stats().count(Endpoint::Object, 206) > resumed_before,
                "broken transfers resume with Range requests"
            );
        }
    }

    // A token that expires during the run is renewed (it lives less than the 5 minutes we keep in
    // hand, so every call logs in again, as with the official client). Four seconds, not one: a
    // busy machine may take a second between a login and the call it was for.
    let short = common::emulator(EmulatorConfig {
        token_lifetime: Duration::from_secs(4),
        job_waiting: Duration::from_millis(1500),
        ..config()
    })
    .await;
    let dir = workdir();
    let out =
        run_ours(&short, dir.path(), &["snapshot", "--namespace", "canvas", "--table", "accounts", "--format", "tsv"])
            .await;
    assert!(out.status.success(), "short-lived tokens: {}", stderr(&out));
    assert!(short.stats().count(Endpoint::Login, 200) >= 3, "logged in again before calls");
    assert_eq!(short.stats().total(401), 0);

    // A job that expires while we wait for it is submitted again.
    let slow = common::emulator(EmulatorConfig { job_waiting: Duration::from_millis(1500), ..config() }).await;
    let dir = workdir();
    let run =
        run_ours(&slow, dir.path(), &["snapshot", "--namespace", "canvas", "--table", "accounts", "--format", "tsv"]);
    // Expired as soon as it is submitted (an event, not a delay): the job waits 1.5 s.
    let expire = async {
        while slow.stats().count(Endpoint::Query, 202) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        slow.expire_jobs();
    };
    let (out, ()) = tokio::join!(run, expire);
    assert!(out.status.success(), "expired job: {}", stderr(&out));
    assert!(stderr(&out).contains("expired while waiting"), "{}", stderr(&out));
    assert_eq!(objects(dir.path()), expected);

    // Not retryable: reported with the server's message and uuid, nothing left behind.
    for (kind, words) in
        [(FaultKind::FailedJob, "the query job failed (injected)"), (FaultKind::AccountError, "AccountDisabled")]
    {
        let (out, dir) = snapshot_with(&emu, Some(FaultSpec::new(kind, 1))).await;
        assert_eq!(out.status.code(), Some(5), "{kind:?}");
        let err = stderr(&out);
        assert!(err.contains(words) && err.contains("uuid"), "{kind:?}: {err}");
        assert!(files_under(&dir.path().join("downloads")).is_empty(), "{kind:?}: no files");
    }
    let dir = workdir();
    for (kind, shown) in [(FaultKind::OutOfRange, "OutOfRange"), (FaultKind::SnapshotRequired, "SnapshotRequired")] {
        emu.inject(FaultSpec::new(kind, 1));
        let out = run_ours(
            &emu,
            dir.path(),
            &["incremental", "--namespace", "canvas", "--table", "accounts", "--since", "2025-06-01T00:00:00Z"],
        )
        .await;
        assert_eq!(out.status.code(), Some(5));
        assert!(
            stderr(&out).contains(shown) && stderr(&out).contains("uuid"),
            "{kind:?} is told apart: {}",
            stderr(&out)
        );
    }
    // A persistent 5xx is given up on after the configured attempts.
    emu.inject(FaultSpec::new(FaultKind::ServerError, 100).on(Endpoint::Query));
    let out = run_ours(
        &emu,
        dir.path(),
        &["--max-attempts", "3", "snapshot", "--namespace", "canvas", "--table", "accounts"],
    )
    .await;
    emu.clear_faults();
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("HTTP 500"), "{}", stderr(&out));
    no_partial_files(dir.path());
}

/// An account error stops the run: tables whose jobs were already requested finish, and no
/// further table starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_error_stops_the_run_and_the_rest_is_skipped() {
    let emu = emulator(config()).await;
    emu.inject(FaultSpec::new(FaultKind::AccountError, 1).on(Endpoint::Query).for_table("access_tokens"));
    let dir = workdir();
    let out = run_ours(&emu, dir.path(), &["snapshot", "--namespace", "canvas", "--table", "all", "--json"]).await;
    assert_eq!(out.status.code(), Some(5));
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    let statuses: Vec<&str> = results.as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    let in_flight = dap_replica::per_table::JOBS_IN_FLIGHT;
    assert!(statuses.len() > in_flight, "the test needs more tables than are in flight");
    assert_eq!(statuses[0], "failed");
    // Tables already started may finish (how many depends on timing); none starts afterwards.
    let skipped = statuses.iter().filter(|s| **s == "skipped").count();
    assert!(skipped >= statuses.len() - in_flight, "{statuses:?}");
    assert!(statuses[1..].iter().all(|s| *s == "succeeded" || *s == "skipped"), "{statuses:?}");
    let summary = format!("{} succeeded, 1 failed, {skipped} skipped", statuses.len() - 1 - skipped);
    assert!(stderr(&out).contains(&summary), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_results_describe_each_table() {
    let emu = emulator(config()).await;
    let dir = workdir();
    let out = run_ours(
        &emu,
        dir.path(),
        &[
            "snapshot",
            "--namespace",
            "canvas",
            "--table",
            "accounts, users ,accounts,nope",
            "--format",
            "csv",
            "--json",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(5), "one table failed");
    let results: Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let results = results.as_array().unwrap();
    let tables: Vec<&str> = results.iter().map(|r| r["table"].as_str().unwrap()).collect();
    assert_eq!(tables, ["accounts", "users", "nope"], "trimmed and de-duplicated, in order");
    for r in &results[..2] {
        assert_eq!(r["status"], "succeeded");
        assert!(r["job_id"].is_string() && r["at"].is_string() && r["schema_version"] == 1, "{r}");
        let files = r["files"].as_array().unwrap();
        assert_eq!(files.len(), 4);
        for f in files {
            let path = dir.path().join(f["path"].as_str().unwrap());
            assert_eq!(std::fs::metadata(&path).unwrap().len(), f["bytes"].as_u64().unwrap(), "{}", path.display());
        }
    }
    assert_eq!(results[2]["status"], "failed");
    assert!(results[2]["error"].as_str().unwrap().contains("not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_all_is_paced_below_the_job_creation_limit() {
    let window = 2.0;
    let emu = emulator(EmulatorConfig {
        rows: 10,
        rate_limits: true,
        rate_window: Duration::from_secs_f64(window),
        ..EmulatorConfig::default()
    })
    .await;
    let dir = workdir();
    let out = run_ours(
        &emu,
        dir.path(),
        &["snapshot", "--namespace", "catalog", "--table", "all", "--format", "csv", "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results.as_array().unwrap().len(), 28);
    let stats = emu.stats();
    assert_eq!(stats.total(429), 0, "no request was refused: {stats:?}");
    assert_eq!(stats.count(Endpoint::Query, 200), 28);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error() {
    let emu = emulator(config()).await;
    let dir = workdir();

    // Missing credentials: named, and no request is made.
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dap"));
    let out = cmd
        .current_dir(dir.path())
        .env_remove("DAP_CLIENT_ID")
        .env_remove("DAP_CLIENT_SECRET")
        .args(["--base-url", emu.base_url(), "list", "--namespace", "canvas"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("DAP_CLIENT_ID") && stderr(&out).contains("DAP_CLIENT_SECRET"), "{}", stderr(&out));
    assert!(emu.stats().responses.is_empty(), "no network traffic");

    // Wrong secret: the 401 message and uuid.
    let out =
        run_ours_with(&emu, dir.path(), &["list", "--namespace", "canvas"], &[("DAP_CLIENT_SECRET", "wrong")]).await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("invalid client credentials") && stderr(&out).contains("uuid"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("wrong"), "the secret is never shown");

    // Unknown namespace and table.
    let out = run_ours(&emu, dir.path(), &["list", "--namespace", "nowhere"]).await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("namespace nowhere not found"), "{}", stderr(&out));
    let out = run_ours(&emu, dir.path(), &["snapshot", "--namespace", "canvas", "--table", "nope"]).await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("table nope not found"), "{}", stderr(&out));

    // Usage errors: exit 2.
    let out =
        run_ours(&emu, dir.path(), &["snapshot", "--namespace", "canvas", "--table", "users", "--format", "xml"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--format"));
    let out = run_ours(
        &emu,
        dir.path(),
        &["incremental", "--namespace", "canvas", "--table", "users", "--since", "last tuesday"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--since") && stderr(&out).contains("RFC 3339"), "{}", stderr(&out));
    assert!(files_under(dir.path()).is_empty(), "nothing was written");
}
