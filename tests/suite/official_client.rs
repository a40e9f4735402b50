//! The emulator is faithful when Instructure's official client (2.3.x) works against it unchanged
//! and what it replicates equals the emulator's ground truth. These tests run that client.

use crate::common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use common::truth::{Limit, assert_same_rows_within, postgres_rows};
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, Endpoint, FaultKind, FaultSpec, SchemaChange};
use serde_json::Value as Json;

/// Tables that together cover every column type of the canvas schemas: nested objects
/// (assignments, assignment_groups, courses, context_external_tools, quiz_questions), arrays of
/// enums, strings and int32 (assignments, developer_keys, assignment_groups), decimals
/// (submissions, late_policies), int16 (learning_outcomes), UUIDs (submissions,
/// lti_resource_links), dates (assignment_overrides, calendar_events), floats, booleans, enums,
/// bounded and truncatable text, timestamps and large int64 keys.
const POSTGRES_TABLES: &[&str] = &[
    "accounts",
    "users",
    "courses",
    "enrollments",
    "assignments",
    "assignment_groups",
    "assignment_overrides",
    "calendar_events",
    "context_external_tools",
    "developer_keys",
    "discussion_topics",
    "late_policies",
    "learning_outcomes",
    "lti_resource_links",
    "quiz_questions",
    "submissions",
    "wiki_pages",
];

/// No float columns: the official client refuses NaN and infinity on MySQL (spec §5.10), which
/// the emulator generates in float columns.
const MARIADB_TABLES: &[&str] =
    &["accounts", "enrollments", "course_sections", "pseudonyms", "communication_channels", "group_memberships"];

/// What the official client cannot store on PostgreSQL: asyncpg turns the first and last
/// dates and timestamps (0001-01-01, 9999-12-31T23:59:59.999999) into -infinity and infinity.
const OFFICIAL_POSTGRES_LIMITS: &[Limit] = &[Limit::InfinityAtTheEnds];

fn config(rows: u64) -> EmulatorConfig {
    EmulatorConfig { rows, part_rows: 25, ..EmulatorConfig::default() }
}

fn workdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn commit_everywhere(emu: &Emulator, ns: &str, tables: &[&str], counts: ChangeCounts) {
    for t in tables {
        emu.commit(ns, t, counts).unwrap_or_else(|e| panic!("commit on {t}: {e}"));
    }
}

async fn assert_postgres_matches(
    emu: &Emulator,
    client: &tokio_postgres::Client,
    ns: &str,
    tables: &[&str],
    round: &str,
) {
    for t in tables {
        let def = emu.table_def(ns, t).unwrap();
        let truth = emu.truth(ns, t).unwrap();
        assert!(!truth.is_empty(), "{t} has rows");
        assert_same_rows_within(&def, &postgres_rows(client, &def).await, &truth, round, OFFICIAL_POSTGRES_LIMITS);
    }
}

/// Runs a database command of the official client on a comma list of tables.
async fn replicate(emu: &Emulator, dir: &Path, command: &str, ns: &str, tables: &[&str], url: &str) {
    let tables = tables.join(",");
    official_ok(emu, dir, &[command, "--namespace", ns, "--table", &tables, "--connection-string", url]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_initdb_then_two_syncdb_rounds_equal_the_truth() {
    let emu = emulator(config(60)).await;
    let (url, client) = fresh_postgres("official_pg").await;
    let dir = workdir();
    let dir = dir.path();

    replicate(&emu, dir, "initdb", "canvas", POSTGRES_TABLES, &url).await;
    replicate(&emu, dir, "initdb", "canvas_logs", &["web_logs"], &url).await;
    assert_postgres_matches(&emu, &client, "canvas", POSTGRES_TABLES, "after initdb").await;
    assert_postgres_matches(&emu, &client, "canvas_logs", &["web_logs"], "after initdb").await;

    for round in 1..=2 {
        let counts = ChangeCounts { inserts: 4, updates: 6, soft_deletes: 2, hard_deletes: 3 };
        commit_everywhere(&emu, "canvas", POSTGRES_TABLES, counts);
        commit_everywhere(&emu, "canvas_logs", &["web_logs"], ChangeCounts { inserts: 20, ..Default::default() });
        if round == 2 {
            // Additive schema changes between rounds; later rows carry them.
            emu.evolve("canvas", "accounts", SchemaChange::AddColumn).unwrap();
            emu.evolve("canvas", "courses", SchemaChange::WidenMaxLength).unwrap();
            emu.evolve("canvas", "enrollments", SchemaChange::AddEnumValue).unwrap();
            commit_everywhere(
                &emu,
                "canvas",
                &["accounts", "courses", "enrollments"],
                ChangeCounts { inserts: 3, updates: 3, ..Default::default() },
            );
        }
        replicate(&emu, dir, "syncdb", "canvas", POSTGRES_TABLES, &url).await;
        replicate(&emu, dir, "syncdb", "canvas_logs", &["web_logs"], &url).await;
        let label = format!("after syncdb round {round}");
        assert_postgres_matches(&emu, &client, "canvas", POSTGRES_TABLES, &label).await;
        assert_postgres_matches(&emu, &client, "canvas_logs", &["web_logs"], &label).await;
    }

    let versions = client
        .query(
            "SELECT source_table, schema_version FROM instructure_dap.table_sync WHERE source_table = 'accounts'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(versions[0].get::<_, i64>(1), 2, "the bookkeeping row records the bumped schema version");

    replicate(&emu, dir, "dropdb", "canvas", &["all"], &url).await;
    let left = client
        .query("SELECT count(*) FROM instructure_dap.table_sync WHERE source_namespace = 'canvas'", &[])
        .await
        .unwrap();
    assert_eq!(left[0].get::<_, i64>(0), 0);
    let tables_left = client
        .query("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'canvas'", &[])
        .await
        .unwrap();
    assert_eq!(tables_left[0].get::<_, i64>(0), 0, "dropdb removed every canvas table");
}

async fn mariadb_keys(db: &str, table: &str) -> BTreeSet<String> {
    mysql_query(Some(db), &format!("SELECT id FROM canvas__{table}")).await.into_iter().map(|r| r[0].clone()).collect()
}

fn truth_keys(emu: &Emulator, table: &str) -> BTreeSet<String> {
    emu.truth("canvas", table).unwrap().iter().map(|r| r["id"].to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_initdb_then_syncdb_keeps_the_same_rows() {
    let emu = emulator(config(40)).await;
    let url = fresh_mysql("official_my").await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let dir = workdir();
    replicate(&emu, dir.path(), "initdb", "canvas", MARIADB_TABLES, &url).await;
    for round in 0..3 {
        if round > 0 {
            commit_everywhere(
                &emu,
                "canvas",
                MARIADB_TABLES,
                ChangeCounts { inserts: 3, updates: 4, soft_deletes: 1, hard_deletes: 2 },
            );
            replicate(&emu, dir.path(), "syncdb", "canvas", MARIADB_TABLES, &url).await;
        }
        for t in MARIADB_TABLES {
            assert_eq!(
                mariadb_keys(&db, t).await,
                truth_keys(&emu, t),
                "round {round}: canvas__{t} has exactly the truth's keys"
            );
        }
    }
    let soft = mysql_query(Some(&db), "SELECT count(*) FROM canvas__accounts WHERE workflow_state = 'deleted'").await;
    let truth_soft =
        emu.truth("canvas", "accounts").unwrap().iter().filter(|r| r["workflow_state"] == "deleted").count();
    assert_eq!(soft[0][0], truth_soft.to_string(), "soft deletes arrive as updates");
}

/// Every downloaded object file under `dir`.
fn downloaded(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for job in std::fs::read_dir(dir.join("downloads")).unwrap() {
        let job = job.unwrap().path();
        if job.is_dir() {
            files.extend(std::fs::read_dir(&job).unwrap().map(|f| f.unwrap().path()));
        }
    }
    files.sort();
    files
}

fn gunzip(path: &Path) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut s)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s
}

/// Splits one CSV record stream (RFC 4180) into rows of fields.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut field, mut quoted, mut chars) =
        (Vec::new(), Vec::new(), String::new(), false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => row.push(std::mem::take(&mut field)),
            ('\n', false) => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (c, _) => field.push(c),
        }
    }
    assert!(!quoted && field.is_empty() && row.is_empty(), "CSV ends with a complete record");
    rows
}

/// Checks the TSV rules of spec §3.5 and returns the key column of each record.
fn tsv_keys(text: &str, incremental: bool, key: &str) -> Vec<String> {
    assert!(text.ends_with('\n'), "LF-terminated");
    let mut lines = text.split('\n');
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let expected_start: Vec<&str> = if incremental { vec!["meta.ts", "meta.action"] } else { vec!["meta.ts"] };
    assert_eq!(&header[..expected_start.len()], &expected_start[..], "header starts with the meta columns");
    assert_eq!(header[expected_start.len()], format!("key.{key}"));
    assert!(header.len() > expected_start.len() + 1, "value columns follow the key: {header:?}");
    assert!(header[expected_start.len() + 1..].iter().all(|h| h.starts_with("value.")));
    let key_col = expected_start.len();
    let mut keys = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), header.len(), "every record has every column: {line:?}");
        for f in &fields {
            let mut chars = f.chars();
            while let Some(c) = chars.next() {
                assert!(c != '\r' && c != '\n', "control characters are escaped");
                if c == '\\' {
                    let e = chars.next();
                    assert!(
                        matches!(e, Some('N' | '\\' | 't' | 'n' | 'r' | 'b' | 'f' | 'v' | '0')),
                        "valid escape in {f:?}"
                    );
                }
            }
        }
        keys.push(fields[key_col].to_string());
    }
    assert!(!text.contains("\n\n"), "no blank lines");
    keys
}

fn parquet_rows(path: &Path) -> i64 {
    let out = std::process::Command::new(official_python())
        .args(["-c", "import sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1]); print(t.num_rows); print(t.schema.names)"])
        .arg(path)
        .output()
        .expect("python with pyarrow runs");
    assert!(out.status.success(), "pyarrow cannot read {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("'meta', 'key', 'value'"), "{text}");
    text.lines().next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_schema_snapshot_and_incremental_in_every_format() {
    let emu = emulator(config(70)).await;

    let dir = workdir();
    let listed = official_ok(&emu, dir.path(), &["list", "--namespace", "canvas"]).await;
    assert_eq!(listed.lines().collect::<Vec<_>>(), emu.tables("canvas").unwrap());

    official_ok(&emu, dir.path(), &["schema", "--namespace", "canvas", "--table", "all"]).await;
    let schemas: Vec<_> = std::fs::read_dir(dir.path().join("downloads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(schemas.len(), 91);
    let accounts: Json = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("downloads/accounts_schema_version_1.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(accounts["version"], 1);
    assert_eq!(accounts["schema"]["properties"]["key"]["required"][0], "id");

    let table = "assignments";
    let truth: BTreeSet<String> = truth_keys(&emu, table);
    for format in ["tsv", "csv", "jsonl", "parquet"] {
        let dir = workdir();
        official_ok(&emu, dir.path(), &["snapshot", "--namespace", "canvas", "--table", table, "--format", format])
            .await;
        let files = downloaded(dir.path());
        assert!(files.len() >= 4, "{format}: several part files, got {files:?}");
        let mut keys = Vec::new();
        let mut header_only = 0;
        for f in &files {
            let part_keys: Vec<String> = match format {
                "tsv" => tsv_keys(&gunzip(f), false, "id"),
                "csv" => {
                    let rows = csv_rows(&gunzip(f));
                    assert_eq!(rows[0][..2], ["meta.ts".to_string(), "key.id".to_string()]);
                    assert!(rows.iter().all(|r| r.len() == rows[0].len()), "{format}: equal field counts");
                    rows[1..].iter().map(|r| r[1].clone()).collect()
                }
                "jsonl" => gunzip(f)
                    .lines()
                    .map(|l| {
                        let v: Json = serde_json::from_str(l).unwrap();
                        assert!(v["meta"]["ts"].is_string() && v["value"].is_object());
                        v["key"]["id"].to_string()
                    })
                    .collect(),
                _ => {
                    let n = parquet_rows(f);
                    (0..n).map(|i| format!("parquet-row-{i}")).collect()
                }
            };
            header_only += part_keys.is_empty() as usize;
            keys.extend(part_keys);
        }
        assert!(header_only >= 1, "{format}: a header-only part is included");
        assert_eq!(keys.len(), truth.len(), "{format}: one record per row");
        if format != "parquet" {
            assert_eq!(
                keys.into_iter().collect::<BTreeSet<_>>(),
                truth,
                "{format}: the snapshot's keys are the truth's"
            );
        }
    }

    // An incremental over [since, until) sees exactly the keys changed in between.
    let before = emu.commit("canvas", table, ChangeCounts { updates: 1, ..Default::default() }).unwrap();
    let change = emu
        .commit("canvas", table, ChangeCounts { inserts: 2, updates: 3, hard_deletes: 2, ..Default::default() })
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let after = emu.commit("canvas", table, ChangeCounts { updates: 1, ..Default::default() }).unwrap();
    let dir = workdir();
    official_ok(
        &emu,
        dir.path(),
        &[
            "incremental",
            "--namespace",
            "canvas",
            "--table",
            table,
            "--format",
            "tsv",
            "--since",
            &change.ts,
            "--until",
            &after.ts,
        ],
    )
    .await;
    let keys: BTreeSet<String> = downloaded(dir.path()).iter().flat_map(|f| tsv_keys(&gunzip(f), true, "id")).collect();
    let expected: BTreeSet<String> =
        change.inserted.iter().chain(&change.updated).chain(&change.hard_deleted).map(|k| k.to_string()).collect();
    assert_eq!(keys, expected, "changes before `since` ({}) and at `until` are excluded", before.ts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_look_like_the_real_api_to_the_official_client() {
    let emu = emulator(config(20)).await;
    let snapshot = ["snapshot", "--namespace", "canvas", "--table", "accounts", "--format", "jsonl"];

    // Retryable: one 429 (Retry-After honoured), one 500, one HTML 502 — each then success.
    for (kind, endpoint, status) in [
        (FaultKind::TooManyRequests, Endpoint::Query, 429),
        (FaultKind::ServerError, Endpoint::Job, 500),
        (FaultKind::BadGateway, Endpoint::ObjectUrl, 502),
    ] {
        let dir = workdir();
        emu.inject(FaultSpec::new(kind, 1).on(endpoint));
        let before = emu.stats().count(endpoint, status);
        official_ok(&emu, dir.path(), &snapshot).await;
        assert_eq!(emu.stats().count(endpoint, status), before + 1, "{kind:?} was sent once");
        assert!(!downloaded(dir.path()).is_empty());
        emu.expire_jobs();
    }

    // Not retryable: the client fails with the documented message and exit code 5.
    let dir = workdir();
    emu.inject(FaultSpec::new(FaultKind::FailedJob, 1));
    let out = run_official(&emu, dir.path(), &snapshot).await;
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Query job ended with status: failed"));

    emu.inject(FaultSpec::new(FaultKind::OutOfRange, 1));
    let out = run_official(
        &emu,
        dir.path(),
        &[
            "incremental",
            "--namespace",
            "canvas",
            "--table",
            "accounts",
            "--format",
            "tsv",
            "--since",
            "2025-06-01T00:00:00Z",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the retained history"));

    emu.inject(FaultSpec::new(FaultKind::AccountError, 1).on(Endpoint::TableList));
    let out = run_official(&emu, dir.path(), &["list", "--namespace", "canvas"]).await;
    assert_eq!(out.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("AccountDisabled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A connection reset mid-download fails that table (the official client does not resume).
    emu.inject(FaultSpec::new(FaultKind::Reset, 1).on(Endpoint::Object));
    let out = run_official(&emu, workdir().path(), &snapshot).await;
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));

    // A wrong secret is a 401 with the error envelope.
    let out = tokio::process::Command::new(official_client())
        .env("DAP_API_URL", emu.base_url())
        .env("DAP_CLIENT_ID", &emu.config().client_id)
        .env("DAP_CLIENT_SECRET", "wrong")
        .env("DAP_TRACKING", "false")
        .args(["--non-interactive", "list", "--namespace", "canvas"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid client credentials"));
}

/// No bundled schema trips a known bug of the official client: every table of `catalog`
/// initialises into PostgreSQL and equals the truth (`canvas` and `canvas_logs`: every table, with
/// the official client too, in `tests/postgres.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalog_table_initialises_with_the_official_client() {
    let emu = emulator(EmulatorConfig { rows: 6, ..EmulatorConfig::default() }).await;
    let (url, client) = fresh_postgres("official_all").await;
    let dir = workdir();
    for ns in ["catalog"] {
        official_ok(
            &emu,
            dir.path(),
            &["--loglevel", "warning", "initdb", "--namespace", ns, "--table", "all", "--connection-string", &url],
        )
        .await;
        let tables = emu.tables(ns).unwrap();
        assert!(tables.len() >= 28);
        for t in &tables {
            let def = emu.table_def(ns, t).unwrap();
            assert_same_rows_within(
                &def,
                &postgres_rows(&client, &def).await,
                &emu.truth(ns, t).unwrap(),
                "after initdb --table all",
                OFFICIAL_POSTGRES_LIMITS,
            );
        }
    }
}
