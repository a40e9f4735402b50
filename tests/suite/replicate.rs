//! Outward replication: the mirror, synced once from DAP, fans out to every kind of target;
//! targets follow the truth through rounds of syncs and a schema round, at different paces; a
//! round sends what changed, not the table; a target synced straight from DAP is never rolled
//! back; a re-snapshot reaches targets whole; SIGKILL anywhere keeps every target whole.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::targets::{Backend, TestTarget, backends};
use common::truth::{Limit, assert_same_rows_within};
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, SchemaChange};
use serde_json::Value as Json;

fn mirror_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("canvas.db").display())
}

/// Runs our `dap` with `args`, then `--non-finite null` for the commands that write (targets
/// without NaN store NULL).
async fn dap(emu: &Emulator, dir: &Path, args: &[&str]) -> std::process::Output {
    let mut a = args.to_vec();
    if ["initdb", "syncdb", "replicate"].contains(&args[0]) {
        a.extend(["--non-finite", "null"]);
    }
    run_ours(emu, dir, &a).await
}

async fn ok(emu: &Emulator, dir: &Path, args: &[&str]) -> String {
    let out = dap(emu, dir, args).await;
    assert!(out.status.success(), "dap {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A target replicated from the mirror holds what the mirror holds: its own limits, and the
/// mirror's (SQLite has no negative zero).
async fn assert_truth(emu: &Emulator, t: &TestTarget, tables: &[(&str, String)], step: &str) {
    let mut limits = t.limits().to_vec();
    limits.push(Limit::NoNegativeZero);
    for (ns, table) in tables {
        let def = emu.table_def(ns, table).unwrap();
        let what = format!("{:?} {step}: {ns}.{table}", t.backend);
        assert_same_rows_within(&def, &t.rows(&def).await, &emu.truth(ns, table).unwrap(), &what, &limits);
    }
}

/// Every target a test can have here: SQLite always (a second file), the servers that are up.
async fn targets(name: &str) -> Vec<TestTarget> {
    let mut out = Vec::new();
    for b in backends() {
        out.push(TestTarget::fresh(b, &format!("{name}_{b:?}").to_lowercase()).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_fans_out_to_every_target_at_its_own_pace_through_syncs_and_a_schema_round() {
    // No NaN: required float columns cannot hold the NULL that MySQL and SQL Server store for it
    // (refusing NaN is tested on its own).
    let emu =
        emulator(EmulatorConfig { rows: 25, part_rows: 20, special_floats: false, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (mirror, logs_mirror) = (mirror_url(dir), format!("sqlite://{}", dir.join("canvas_logs.db").display()));
    let all: Vec<String> = emu.tables("canvas").unwrap();
    assert!(all.len() >= 90);
    let mut tables: Vec<(&str, String)> = all.iter().map(|t| ("canvas", t.clone())).collect();
    tables.push(("canvas_logs", "web_logs".into()));
    ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "all", "--connection-string", &mirror]).await;
    ok(
        &emu,
        dir,
        &["initdb", "--namespace", "canvas_logs", "--table", "web_logs", "--connection-string", &logs_mirror],
    )
    .await;

    // Two copies of every backend: one replicated after every round, one only at the end.
    let eager = targets("rep_eager").await;
    let lazy = targets("rep_lazy").await;
    let eager_urls: Vec<String> = eager.iter().map(|t| t.url.clone()).collect();
    let mut args: Vec<&str> = vec!["replicate", "--namespace", "canvas", "--table", "all", "--from", &mirror];
    for u in &eager_urls {
        args.extend(["--to", u]);
    }
    ok(&emu, dir, &args).await;
    let mut args: Vec<&str> =
        vec!["replicate", "--namespace", "canvas_logs", "--table", "web_logs", "--from", &logs_mirror];
    for u in &eager_urls {
        args.extend(["--to", u]);
    }
    ok(&emu, dir, &args).await;
    for t in &eager {
        assert_truth(&emu, t, &tables, "after the first replicate").await;
        // The user's own objects on a target survive what follows.
        let name = t.table("canvas", "accounts");
        t.exec(&format!(
            "CREATE INDEX user_rep_idx ON {name} (id); CREATE VIEW user_rep_view AS SELECT id FROM {name}"
        ))
        .await;
    }

    // Two rounds keep CI short: plain changes with one unreachable target, then schema changes.
    for round in 1..=2 {
        if round == 2 {
            for (table, change) in [
                ("accounts", SchemaChange::AddColumn),
                ("courses", SchemaChange::WidenMaxLength),
                ("users", SchemaChange::MakeOptional),
            ] {
                emu.evolve("canvas", table, change).unwrap();
            }
        }
        for t in &all {
            emu.commit("canvas", t, ChangeCounts { inserts: 2, updates: 2, soft_deletes: 1, hard_deletes: 1 }).unwrap();
        }
        emu.commit("canvas_logs", "web_logs", ChangeCounts { inserts: 10, ..Default::default() }).unwrap();
        // The mirror syncs once and feeds the eager targets; one target that cannot be reached
        // fails alone.
        let mut args: Vec<&str> =
            vec!["syncdb", "--namespace", "canvas", "--table", "all", "--connection-string", &mirror];
        for u in &eager_urls {
            args.extend(["--replicate-to", u]);
        }
        let unreachable = "postgresql://nobody:secret@127.0.0.1:1/nothing";
        if round == 1 {
            args.extend(["--replicate-to", unreachable]);
        }
        let out = dap(&emu, dir, &args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        if round == 1 {
            assert!(!out.status.success(), "an unreachable target makes the run fail");
            assert!(err.contains("127.0.0.1:1/nothing") && err.contains("1 of") && !err.contains("secret"), "{err}");
        } else {
            assert!(out.status.success(), "round {round}: {err}");
        }
        let mut args: Vec<&str> =
            vec!["syncdb", "--namespace", "canvas_logs", "--table", "web_logs", "--connection-string", &logs_mirror];
        for u in &eager_urls {
            args.extend(["--replicate-to", u]);
        }
        ok(&emu, dir, &args).await;
        for t in &eager {
            assert_truth(&emu, t, &tables, &format!("after round {round}")).await;
        }
    }
    for t in &eager {
        assert!(t.has_index("user_rep_idx").await, "{:?}: the user's index survives", t.backend);
        let n = t.column("SELECT count(*) FROM user_rep_view").await;
        assert_eq!(n[0].as_deref(), Some(emu.truth("canvas", "accounts").unwrap().len().to_string().as_str()));
    }
    // The lazy targets get everything in one go, from their empty state.
    for t in &lazy {
        ok(&emu, dir, &["replicate", "--namespace", "canvas", "--table", "all", "--from", &mirror, "--to", &t.url])
            .await;
        ok(
            &emu,
            dir,
            &["replicate", "--namespace", "canvas_logs", "--table", "all", "--from", &logs_mirror, "--to", &t.url],
        )
        .await;
        assert_truth(&emu, t, &tables, "after its only replicate").await;
    }
}

/// Rows sent per target and table, from `replicate --json`: the changes of a sync, the rows of a
/// (re)load.
fn rows_sent(json: &str) -> Vec<(String, String, u64)> {
    let v: Json = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let results = v.get("replicate").cloned().unwrap_or(v);
    let mut out = Vec::new();
    for target in results.as_array().unwrap() {
        for t in target["tables"].as_array().unwrap() {
            assert_eq!(t["status"], "succeeded", "{t}");
            out.push((
                target["target"].as_str().unwrap().to_string(),
                t["table"].as_str().unwrap().to_string(),
                t["changes"].as_u64().or(t["rows"].as_u64()).unwrap(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_sends_what_changed_not_the_table() {
    let emu = emulator(EmulatorConfig { rows: 2000, part_rows: 500, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mirror = mirror_url(dir);
    let targets = targets("rep_counts").await;
    ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "accounts,users", "--connection-string", &mirror])
        .await;
    let mut args: Vec<&str> = vec!["replicate", "--json", "--namespace", "canvas", "--table", "all", "--from", &mirror];
    for t in &targets {
        args.extend(["--to", &t.url]);
    }
    let first = rows_sent(&ok(&emu, dir, &args).await);
    assert_eq!(first.len(), 2 * targets.len(), "the first replicate reports both tables on every target: {first:?}");
    assert!(first.iter().all(|(_, _, n)| *n == 2000), "the first replicate sends whole tables: {first:?}");
    for round in 0..2 {
        let counts = ChangeCounts { inserts: 7, updates: 9, soft_deletes: 3, hard_deletes: 4 };
        for table in ["accounts", "users"] {
            emu.commit("canvas", table, counts).unwrap();
        }
        let mut args: Vec<&str> =
            vec!["syncdb", "--json", "--namespace", "canvas", "--table", "all", "--connection-string", &mirror];
        for t in &targets {
            args.extend(["--replicate-to", &t.url]);
        }
        let sent = rows_sent(&ok(&emu, dir, &args).await);
        assert_eq!(sent.len(), 2 * targets.len());
        for (target, table, n) in &sent {
            // Each changed key once: the inserted, updated, soft-deleted (an update) and
            // hard-deleted rows of the round.
            assert_eq!(*n, 7 + 9 + 3 + 4, "round {round}, {target} {table}: rows sent");
        }
        for t in &targets {
            assert_truth(
                &emu,
                t,
                &[("canvas", "accounts".into()), ("canvas", "users".into())],
                &format!("round {round}"),
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_synced_straight_from_dap_is_never_rolled_back() {
    let emu =
        emulator(EmulatorConfig { rows: 40, part_rows: 20, special_floats: false, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mirror = mirror_url(dir);
    let tables = [("canvas", "accounts".to_string()), ("canvas", "courses".to_string())];
    let commit = |counts: ChangeCounts| {
        for (_, t) in &tables {
            emu.commit("canvas", t, counts).unwrap();
        }
    };
    ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "accounts,courses", "--connection-string", &mirror])
        .await;
    let targets = targets("rep_ahead").await;
    for t in &targets {
        ok(&emu, dir, &["replicate", "--namespace", "canvas", "--table", "all", "--from", &mirror, "--to", &t.url])
            .await;
        assert_truth(&emu, t, &tables, "replicated").await;
    }
    // Straight from DAP: every target moves ahead of the mirror.
    commit(ChangeCounts { inserts: 3, updates: 3, soft_deletes: 1, hard_deletes: 1 });
    for t in &targets {
        ok(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", "all", "--connection-string", &t.url]).await;
        assert_truth(&emu, t, &tables, "synced from DAP").await;
        let out = dap(
            &emu,
            dir,
            &["replicate", "--json", "--namespace", "canvas", "--table", "all", "--from", &mirror, "--to", &t.url],
        )
        .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("ahead of the mirror"), "the run says so: {err}");
        let left_alone = format!("{n} of them ahead of the mirror, left alone", n = tables.len());
        assert!(err.contains(&left_alone), "the summary counts them apart: {err}");
        let v: Json = serde_json::from_slice(&out.stdout).unwrap();
        let reported = v[0]["tables"].as_array().unwrap();
        assert_eq!(reported.len(), tables.len(), "every table reported: {v}");
        assert!(reported.iter().all(|t| t["action"] == "ahead" && t["changes"] == 0), "{v}");
        assert_truth(&emu, t, &tables, "after a replicate from the older mirror").await;
        let status = ok(&emu, dir, &["status", "--json", "--connection-string", &mirror, "--to", &t.url]).await;
        let v: Json = serde_json::from_str(&status).unwrap();
        for row in v.as_array().unwrap() {
            assert_eq!(row["targets"][0]["state"], "ahead", "dap status shows the target ahead: {row}");
        }
    }
    // The mirror catches up and moves on; replication converges.
    ok(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", "all", "--connection-string", &mirror]).await;
    commit(ChangeCounts { inserts: 2, updates: 2, hard_deletes: 1, ..Default::default() });
    ok(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", "all", "--connection-string", &mirror]).await;
    for t in &targets {
        let status = ok(&emu, dir, &["status", "--json", "--connection-string", &mirror, "--to", &t.url]).await;
        let v: Json = serde_json::from_str(&status).unwrap();
        assert_eq!(v.as_array().unwrap().len(), tables.len(), "a status row per table: {v}");
        assert!(
            v.as_array().unwrap().iter().all(|r| r["targets"][0]["state"] == "behind"),
            "dap status shows the lag: {v}"
        );
        ok(&emu, dir, &["replicate", "--namespace", "canvas", "--table", "all", "--from", &mirror, "--to", &t.url])
            .await;
        assert_truth(&emu, t, &tables, "after the mirror caught up").await;
        let status = ok(&emu, dir, &["status", "--json", "--connection-string", &mirror, "--to", &t.url]).await;
        let v: Json = serde_json::from_str(&status).unwrap();
        assert_eq!(v.as_array().unwrap().len(), tables.len(), "a status row per table: {v}");
        assert!(
            v.as_array()
                .unwrap()
                .iter()
                .all(|r| r["targets"][0]["state"] == "current" && r["targets"][0]["lag"] == "0s"),
            "{v}"
        );
    }
    // And `dap syncdb` straight from DAP takes a replicated target over.
    commit(ChangeCounts { inserts: 2, updates: 2, soft_deletes: 1, ..Default::default() });
    for t in &targets {
        ok(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", "all", "--connection-string", &t.url]).await;
        assert_truth(&emu, t, &tables, "taken over by a direct sync").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_takes_over_a_replicated_postgresql_database_without_ddl() {
    if common::targets::require_var("TEST_POSTGRES_URL").is_none() {
        return;
    }
    let emu =
        emulator(EmulatorConfig { rows: 30, part_rows: 20, special_floats: false, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mirror = mirror_url(dir);
    let list = "accounts,courses,users,enrollments,submissions";
    let tables: Vec<(&str, String)> = list.split(',').map(|t| ("canvas", t.to_string())).collect();
    ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", list, "--connection-string", &mirror]).await;
    let t = TestTarget::fresh(Backend::Postgres, "rep_official").await;
    ok(&emu, dir, &["replicate", "--namespace", "canvas", "--table", "all", "--from", &mirror, "--to", &t.url]).await;
    let catalog = "SELECT string_agg(table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable, ', ' ORDER BY table_name, column_name) FROM information_schema.columns WHERE table_schema IN ('canvas', 'instructure_dap')";
    let before = t.column(catalog).await;
    for t in list.split(',') {
        emu.commit("canvas", t, ChangeCounts { inserts: 3, updates: 3, soft_deletes: 1, hard_deletes: 1 }).unwrap();
    }
    let log = dir.join("official.log");
    let out = run_official(
        &emu,
        dir,
        &[
            "--loglevel",
            "debug",
            "--logfile",
            log.to_str().unwrap(),
            "syncdb",
            "--namespace",
            "canvas",
            "--table",
            list,
            "--connection-string",
            &t.url,
        ],
    )
    .await;
    assert!(out.status.success(), "the official client: {}", String::from_utf8_lossy(&out.stderr));
    let ddl = ddl_in_official_log(&std::fs::read_to_string(&log).unwrap());
    assert!(ddl.is_empty(), "the official client issued DDL on a replicated database: {ddl:#?}");
    assert_eq!(t.column(catalog).await, before, "the catalog is unchanged");
    assert_truth(&emu, &t, &tables, "synced by the official client").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_snapshot_of_the_mirror_reaches_targets_whole() {
    let emu = emulator(EmulatorConfig { rows: 60, part_rows: 20, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mirror = mirror_url(dir);
    let tables = [("canvas", "accounts".to_string())];
    ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &mirror]).await;
    let targets = targets("rep_resnap").await;
    for t in &targets {
        ok(
            &emu,
            dir,
            &["replicate", "--namespace", "canvas", "--table", "accounts", "--from", &mirror, "--to", &t.url],
        )
        .await;
    }
    emu.commit("canvas", "accounts", ChangeCounts { inserts: 5, updates: 5, soft_deletes: 2, hard_deletes: 3 })
        .unwrap();
    emu.expire_jobs();
    ok(
        &emu,
        dir,
        &["initdb", "--replace", "--namespace", "canvas", "--table", "accounts", "--connection-string", &mirror],
    )
    .await;
    for t in &targets {
        assert!(t.has_table("canvas", "accounts").await, "{:?}: the table is there before the reload", t.backend);
        let out = ok(
            &emu,
            dir,
            &["replicate", "--json", "--namespace", "canvas", "--table", "accounts", "--from", &mirror, "--to", &t.url],
        )
        .await;
        let sent = rows_sent(&out);
        assert_eq!(
            sent[0].2 as usize,
            emu.truth("canvas", "accounts").unwrap().len(),
            "{:?}: a full reload",
            t.backend
        );
        assert!(t.has_table("canvas", "accounts").await, "{:?}: and after it", t.backend);
        assert_truth(&emu, t, &tables, "after the re-snapshot").await;
    }
}

/// `id:workflow_state:updated_at` (to the second) of every row, in key order, or None when the
/// table is absent.
/// Every row of a table, every column (`row_lines`), or None if it is absent.
async fn state_of(t: &TestTarget, emu: &Emulator, table: &str) -> Option<Vec<String>> {
    if !t.has_table("canvas", table).await {
        return None;
    }
    let def = emu.table_def("canvas", table).unwrap();
    Some(common::truth::row_lines(&def, &t.rows(&def).await, t.limits()))
}

/// The truth of a table in the form `state_of` gives for this target.
fn truth_state(t: &TestTarget, emu: &Emulator, table: &str) -> Vec<String> {
    let def = emu.table_def("canvas", table).unwrap();
    common::truth::row_lines(&def, &emu.truth("canvas", table).unwrap(), t.limits())
}

fn replicate_command(mirror: &str, urls: &[String]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dap"));
    // No DAP access at all: replication reads only the mirror.
    cmd.env_remove("DAP_API_URL").env_remove("DAP_CLIENT_ID").env_remove("DAP_CLIENT_SECRET").args([
        "--non-interactive",
        "replicate",
        "--namespace",
        "canvas",
        "--table",
        "all",
        "--from",
        mirror,
        "--non-finite",
        "null",
    ]);
    for u in urls {
        cmd.args(["--to", u]);
    }
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    cmd
}

/// Which replicate the kills interrupt.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// The first, into empty targets.
    Initial,
    /// After an uninterrupted first replicate and a sync of changes into the mirror.
    Incremental,
}

/// The kill test in two parts that run at once.
mod sigkill_anywhere_in_replicate_keeps_each_target_old_or_new_and_the_mirror_untouched {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn initial() {
        sigkill_anywhere_in_replicate(Phase::Initial).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn incremental() {
        sigkill_anywhere_in_replicate(Phase::Incremental).await;
    }
}

async fn sigkill_anywhere_in_replicate(phase: Phase) {
    const TABLES: &[&str] = &["users", "accounts", "courses"];
    let emu = emulator(EmulatorConfig { rows: 1000, part_rows: 100, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mirror = mirror_url(dir);
    ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", &TABLES.join(","), "--connection-string", &mirror])
        .await;
    // How long an uninterrupted replicate takes here, to spread the kill points over it.
    let name = format!("{phase:?}").to_lowercase();
    let probes = targets(&format!("rep_kill_probe_{name}")).await;
    let probe: Vec<String> = probes.iter().map(|t| t.url.clone()).collect();
    let targets = targets(&format!("rep_kill_{name}")).await;
    let urls: Vec<String> = targets.iter().map(|t| t.url.clone()).collect();
    let started = Instant::now();
    let out = replicate_command(&mirror, &probe).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let span = started.elapsed().max(Duration::from_millis(200));
    let mirror_rows = |table: &str| {
        let def = emu.table_def("canvas", table).unwrap();
        common::truth::sqlite_rows(&dir.join("canvas.db"), &def)
    };
    let mut rng = fastrand::Rng::with_seed(20261202);
    if phase == Phase::Incremental {
        let out = replicate_command(&mirror, &urls).output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        commit_round(&emu, "canvas", TABLES, BIG_ROUND);
        ok(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", "all", "--connection-string", &mirror]).await;
    }
    {
        let mut old = Vec::new();
        for t in &targets {
            let mut per = Vec::new();
            for table in TABLES {
                per.push(state_of(t, &emu, table).await);
            }
            old.push(per);
        }
        let mirror_now: Vec<_> = TABLES.iter().map(|t| mirror_rows(t)).collect();
        // Each target's form of the truth, computed once: it does not change while runs are
        // killed (the emulator makes every row again for each call).
        let mut truths = Vec::new();
        for t in &targets {
            truths.push(TABLES.iter().map(|table| truth_state(t, &emu, table)).collect::<Vec<_>>());
        }
        for kill in 0..12 {
            let after = span.mul_f64(rng.f64() * 1.2);
            let mut child = replicate_command(&mirror, &urls).spawn().unwrap();
            tokio::select! {
                _ = child.wait() => {}
                _ = tokio::time::sleep(after) => { child.start_kill().unwrap(); child.wait().await.unwrap(); }
            }
            for (i, t) in targets.iter().enumerate() {
                for (j, table) in TABLES.iter().enumerate() {
                    let now = state_of(t, &emu, table).await;
                    assert!(
                        now == old[i][j] || now.as_ref() == Some(&truths[i][j]),
                        "{phase:?} kill {kill} at {after:?}: {:?} {table} is neither its old state nor the mirror's",
                        t.backend
                    );
                }
            }
            let untouched: Vec<_> = TABLES.iter().map(|t| mirror_rows(t)).collect();
            assert!(untouched == mirror_now, "{phase:?} kill {kill}: the mirror is untouched");
        }
        let out = replicate_command(&mirror, &urls).output().await.unwrap();
        assert!(out.status.success(), "the rerun converges: {}", String::from_utf8_lossy(&out.stderr));
        for (t, truths) in targets.iter().zip(&truths) {
            for (table, truth) in TABLES.iter().zip(truths) {
                assert_eq!(
                    state_of(t, &emu, table).await.as_ref(),
                    Some(truth),
                    "{phase:?}: {:?} {table} converged",
                    t.backend
                );
            }
        }
    }
}
