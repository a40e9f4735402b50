//! PostgreSQL in the official client's layout: every table equals the truth after initdb, rounds of
//! syncs and a round of schema changes, with the same catalog (tables, types, constraints,
//! comments, enum types) and the same `table_sync` rows as the official client builds from the
//! same steps; `dap ddl` creates that same catalog; takeover works both ways; the user's own
//! columns, constraints, indexes and views survive; TLS modes; bad input changes nothing.

use crate::common;

use std::path::{Path, PathBuf};

use common::truth::{Limit, assert_same_rows_where, assert_same_rows_within, postgres_rows};
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, Endpoint, FaultKind, FaultSpec, SchemaChange};

/// The official client cannot store the first and last dates Python has on PostgreSQL.
const OFFICIAL: &[Limit] = &[Limit::InfinityAtTheEnds];

/// The catalog of the replicated schemas, one line per column, constraint, index, enum type and
/// table comment: what two databases must share to be the same layout.
async fn catalog(client: &tokio_postgres::Client) -> Vec<String> {
    let sql = "
        SELECT 'column ' || n.nspname || '.' || c.relname || '.' || a.attname || ' #' || a.attnum || ' ' ||
               format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END ||
               ' -- ' || coalesce(col_description(c.oid, a.attnum), '')
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped AND n.nspname IN ('canvas', 'canvas_logs', 'instructure_dap')
        UNION ALL
        SELECT 'constraint ' || n.nspname || '.' || c.relname || ' ' || con.conname || ' ' || pg_get_constraintdef(con.oid)
        FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('canvas', 'canvas_logs', 'instructure_dap')
        UNION ALL
        SELECT 'index ' || schemaname || '.' || indexname || ' ' || indexdef FROM pg_indexes
        WHERE schemaname IN ('canvas', 'canvas_logs', 'instructure_dap')
        UNION ALL
        SELECT 'enum ' || n.nspname || '.' || t.typname || ' ' || string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname IN ('canvas', 'canvas_logs', 'instructure_dap') GROUP BY n.nspname, t.typname
        UNION ALL
        SELECT 'table ' || n.nspname || '.' || c.relname || ' -- ' || coalesce(obj_description(c.oid, 'pg_class'), '')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND n.nspname IN ('canvas', 'canvas_logs', 'instructure_dap')
        ORDER BY 1";
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// The `table_sync` rows without their ids, and `database_version`.
async fn bookkeeping(client: &tokio_postgres::Client) -> Vec<String> {
    let mut rows: Vec<String> = client
        .query(
            "SELECT concat_ws(' | ', source_namespace, source_table, \"timestamp\"::text, schema_version::text, target_schema,
                    target_table, schema_description_format, schema_description) FROM instructure_dap.table_sync ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let versions = client.query("SELECT version::text FROM instructure_dap.database_version", &[]).await.unwrap();
    rows.extend(versions.iter().map(|r| format!("database_version {}", r.get::<_, String>(0))));
    rows
}

/// Whether none of the schemas dap would create exists.
async fn nothing_created(db: &tokio_postgres::Client) -> bool {
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('instructure_dap', 'canvas', 'dap_replica')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    n == 0
}

async fn assert_same_layout(ours: &tokio_postgres::Client, theirs: &tokio_postgres::Client, step: &str) {
    let (a, b) = (catalog(ours).await, catalog(theirs).await);
    assert!(a.len() > 100, "{step}: the catalog query sees the tables");
    assert!(a == b, "{step}: the catalogs differ\n{}", differences(&a, &b, OURS_AND_THEIRS));
    let (a, b) = (bookkeeping(ours).await, bookkeeping(theirs).await);
    assert!(a == b, "{step}: table_sync differs\n{}", differences(&a, &b, OURS_AND_THEIRS));
}

async fn assert_truth(
    emu: &Emulator,
    client: &tokio_postgres::Client,
    ns: &str,
    tables: &[String],
    step: &str,
    limits: &[Limit],
) {
    for t in tables {
        let def = emu.table_def(ns, t).unwrap();
        assert_same_rows_within(&def, &postgres_rows(client, &def).await, &emu.truth(ns, t).unwrap(), step, limits);
    }
}

async fn both(emu: &Emulator, dir: &Path, args: &[&str], ours_url: &str, theirs_url: &str) {
    let with = |url: &str| -> Vec<String> {
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend(["--connection-string".to_string(), url.to_string()]);
        a
    };
    let (ours, theirs) = (with(ours_url), with(theirs_url));
    let ours: Vec<&str> = ours.iter().map(String::as_str).collect();
    let theirs: Vec<&str> = theirs.iter().map(String::as_str).collect();
    ours_ok(emu, dir, &ours).await;
    let mut quiet = vec!["--loglevel", "warning"];
    quiet.extend(theirs);
    official_ok(emu, dir, &quiet).await;
}

/// The issue-16 changes, on their own tables, in the official comparison's schema round.
const CHANGES: &[(&str, SchemaChange)] = &[
    ("accounts", SchemaChange::MakeOptional),
    ("users", SchemaChange::AddColumn),
    ("assignments", SchemaChange::AddNestedMember),
    ("enrollments", SchemaChange::AddEnumValue),
    ("courses", SchemaChange::WidenMaxLength),
    ("learning_outcomes", SchemaChange::WidenInteger),
    ("late_policies", SchemaChange::WidenDecimal),
];

// The whole-namespace comparison, in three parts that run at once (see `Shard`).
crate::in_three_parts!(every_table_follows_the_truth_in_the_official_layout => every_table_follows_the_truth);

async fn every_table_follows_the_truth(shard: Shard) {
    let emu = emulator(EmulatorConfig { rows: 30, part_rows: 20, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (ours_url, ours) = fresh_postgres(&format!("pg_all_ours_{}", shard.suffix())).await;
    let (theirs_url, theirs) = fresh_postgres(&format!("pg_all_official_{}", shard.suffix())).await;
    let (ddl_url, ddl_db) = fresh_postgres(&format!("pg_all_ddl_{}", shard.suffix())).await;
    let namespaces = shard.namespaces(&emu);
    let canvas = namespaces[0].1.clone();

    for (ns, tables) in &namespaces {
        both(&emu, dir, &["initdb", "--namespace", ns, "--table", &tables.join(",")], &ours_url, &theirs_url).await;
    }
    for (ns, tables) in &namespaces {
        assert_truth(&emu, &ours, ns, tables, "ours after initdb", &[]).await;
    }
    assert_truth(&emu, &theirs, "canvas", &canvas, "official after initdb", OFFICIAL).await;
    assert_same_layout(&ours, &theirs, "after initdb").await;

    // `dap ddl` on an empty database creates exactly what the official initdb created.
    let mut ddl = String::new();
    for (ns, tables) in &namespaces {
        let out =
            ours_ok(&emu, dir, &["ddl", "--dialect", "postgresql", "--namespace", ns, "--table", &tables.join(",")])
                .await;
        ddl.push_str(&out);
    }
    ddl_db
        .batch_execute(
            &ddl.replace("CREATE TABLE \"instructure_dap\"", "CREATE TABLE IF NOT EXISTS \"instructure_dap\""),
        )
        .await
        .unwrap();
    let (a, b) = (catalog(&ddl_db).await, catalog(&theirs).await);
    assert!(a == b, "dap ddl creates the official catalog\n{}", differences(&a, &b, OURS_AND_THEIRS));
    drop(ddl_url);

    if shard.is_first() {
        // listdb prints what the official client prints for the same database.
        let listdb = ["listdb", "--namespace", "canvas", "--omit-record-count", "--connection-string", &ours_url];
        let (a, b) = (ours_ok(&emu, dir, &listdb).await, official_ok(&emu, dir, &listdb).await);
        let no_staleness = |s: &str| s.lines().filter(|l| !l.contains("\"staleness\"")).collect::<Vec<_>>().join("\n");
        assert_eq!(no_staleness(&a), no_staleness(&b), "listdb is the official client's output");
        // On a terminal, both draw a table: the same rows, cell by cell (but the ageing staleness).
        let listdb = ["listdb", "--namespace", "canvas", "--connection-string", &ours_url];
        let cells = |program: PathBuf| {
            let (ok, screen) = tokio::task::block_in_place(|| on_a_terminal(&program, &emu, dir, &listdb, &[]));
            assert!(ok, "{program:?}: {screen}");
            let rows: Vec<Vec<String>> = screen
                .lines()
                .filter(|l| l.starts_with('│'))
                .map(|l| {
                    l.split('│')
                        .map(|c| c.trim().to_string())
                        .enumerate()
                        .filter(|(i, _)| *i != 4)
                        .map(|(_, c)| c)
                        .collect()
                })
                .collect();
            assert!(rows.len() >= canvas.len(), "{program:?} drew no table: {screen}");
            rows
        };
        let drawn = cells(PathBuf::from(env!("CARGO_BIN_EXE_dap")));
        assert_eq!(drawn, cells(official_client()), "listdb on a terminal draws the official client's table");
    }

    // One round of plain changes, then one with schema changes too.
    for round in 1..=2 {
        for t in &canvas {
            emu.commit("canvas", t, ChangeCounts { inserts: 3, updates: 3, soft_deletes: 1, hard_deletes: 2 }).unwrap();
        }
        if shard.is_first() {
            emu.commit("canvas_logs", "web_logs", ChangeCounts { inserts: 15, ..Default::default() }).unwrap();
        }
        if round == 2 {
            for (t, change) in CHANGES.iter().filter(|(t, _)| canvas.iter().any(|c| c == t)) {
                emu.evolve("canvas", t, *change).unwrap();
                emu.commit("canvas", t, ChangeCounts { inserts: 4, updates: 4, ..Default::default() }).unwrap();
            }
        }
        for (ns, tables) in &namespaces {
            both(&emu, dir, &["syncdb", "--namespace", ns, "--table", &tables.join(",")], &ours_url, &theirs_url).await;
        }
        let step = if round == 2 { "after the schema changes".to_string() } else { format!("after sync {round}") };
        for (ns, tables) in &namespaces {
            assert_truth(&emu, &ours, ns, tables, &format!("ours {step}"), &[]).await;
        }
        assert_truth(&emu, &theirs, "canvas", &canvas, &format!("official {step}"), OFFICIAL).await;
        assert_same_layout(&ours, &theirs, &step).await;
    }
}

const TAKEOVER: &str = "accounts,users,courses,enrollments,assignments,submissions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_both_ways_issues_no_ddl_and_ends_equal_to_the_truth() {
    let emu = emulator(EmulatorConfig { rows: 30, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let tables: Vec<&str> = TAKEOVER.split(',').collect();
    let sync = |url: &str| {
        vec![
            "syncdb".to_string(),
            "--namespace".into(),
            "canvas".into(),
            "--table".into(),
            TAKEOVER.into(),
            "--connection-string".into(),
            url.to_string(),
        ]
    };

    // The official client built it; dap syncs it.
    let (url, db) = fresh_postgres("pg_takeover_from_official").await;
    official_ok(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "canvas", "--table", TAKEOVER, "--connection-string", &url],
    )
    .await;
    let before = catalog(&db).await;
    // The keys each commit wrote: the official client's limits apply only to the rows it wrote.
    let commit = |t: &str| {
        let c =
            emu.commit("canvas", t, ChangeCounts { inserts: 5, updates: 5, soft_deletes: 1, hard_deletes: 2 }).unwrap();
        [c.inserted, c.updated, c.soft_deleted].concat()
    };
    let written: Vec<Vec<serde_json::Value>> = tables.iter().map(|t| commit(t)).collect();
    let args = sync(&url);
    ours_ok(&emu, dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(catalog(&db).await == before, "dap changed the official client's layout");
    for (t, ours) in tables.iter().zip(&written) {
        let def = emu.table_def("canvas", t).unwrap();
        assert_same_rows_where(
            &def,
            &postgres_rows(&db, &def).await,
            &emu.truth("canvas", t).unwrap(),
            "dap after the official initdb",
            OFFICIAL,
            |key| !ours.contains(key),
        );
    }

    // dap built it; the official client syncs it without issuing DDL.
    let (url, db) = fresh_postgres("pg_takeover_from_dap").await;
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", TAKEOVER, "--connection-string", &url])
        .await;
    let written: Vec<Vec<serde_json::Value>> = tables.iter().map(|t| commit(t)).collect();
    let log = dir.path().join("official.log");
    let mut args = vec!["--loglevel".to_string(), "debug".into(), "--logfile".into(), log.display().to_string()];
    args.extend(sync(&url));
    official_ok(&emu, dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("execute SQL:"), "the debug log shows the statements");
    assert_eq!(ddl_in_official_log(&log), Vec::<String>::new(), "the official client issued DDL on a dap database");
    for (t, theirs) in tables.iter().zip(&written) {
        let def = emu.table_def("canvas", t).unwrap();
        assert_same_rows_where(
            &def,
            &postgres_rows(&db, &def).await,
            &emu.truth("canvas", t).unwrap(),
            "official after dap's initdb",
            OFFICIAL,
            |key| theirs.contains(key),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_columns_constraints_indexes_and_views_survive_syncs_and_schema_changes() {
    let emu = emulator(EmulatorConfig { rows: 30, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let (url, db) = fresh_postgres("pg_user_objects").await;
    let run = |cmd: &'static str| {
        let (emu, dir, url) = (&emu, dir.path().to_path_buf(), url.clone());
        async move {
            ours_ok(emu, &dir, &[cmd, "--namespace", "canvas", "--table", "accounts", "--connection-string", &url])
                .await
        }
    };
    run("initdb").await;
    db.batch_execute(
        "ALTER TABLE canvas.accounts ADD COLUMN user_note text DEFAULT 'ours';
         UPDATE canvas.accounts SET user_note = 'kept ' || id;
         ALTER TABLE canvas.accounts ADD CONSTRAINT user_unique UNIQUE (id, workflow_state);
         CREATE INDEX user_accounts_idx ON canvas.accounts (name);
         CREATE VIEW public.user_accounts_view AS SELECT id, name, user_note FROM canvas.accounts;
         CREATE VIEW public.user_accounts_view2 AS SELECT count(*) AS n FROM public.user_accounts_view;
         GRANT SELECT ON public.user_accounts_view TO PUBLIC;",
    )
    .await
    .unwrap();
    let kept: i64 = db.query_one("SELECT count(*) FROM canvas.accounts", &[]).await.unwrap().get(0);

    for round in 0..2 {
        if round == 1 {
            emu.evolve("canvas", "accounts", SchemaChange::AddColumn).unwrap();
            emu.evolve("canvas", "accounts", SchemaChange::WidenMaxLength).unwrap(); // `name`, which the views use
        }
        emu.commit("canvas", "accounts", ChangeCounts { inserts: 3, updates: 5, soft_deletes: 1, hard_deletes: 0 })
            .unwrap();
        run("syncdb").await;
        let def = emu.table_def("canvas", "accounts").unwrap();
        assert_same_rows_within(
            &def,
            &postgres_rows(&db, &def).await,
            &emu.truth("canvas", "accounts").unwrap(),
            "after sync",
            &[],
        );
        let count = |sql: &'static str| {
            let db = &db;
            async move { db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        assert_eq!(
            count("SELECT count(*) FROM canvas.accounts WHERE user_note LIKE 'kept %'").await,
            kept,
            "round {round}: the user's column keeps its values"
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_constraint WHERE conname = 'user_unique'").await,
            1,
            "round {round}: unique constraint"
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_indexes WHERE indexname = 'user_accounts_idx'").await,
            1,
            "round {round}: index"
        );
        let rows = emu.truth("canvas", "accounts").unwrap().len() as i64;
        assert_eq!(count("SELECT count(*) FROM public.user_accounts_view").await, rows, "round {round}: view");
        assert_eq!(count("SELECT n FROM public.user_accounts_view2").await, rows, "round {round}: a view on the view");
        assert_eq!(
            count("SELECT count(*) FROM information_schema.role_table_grants WHERE table_name = 'user_accounts_view' AND grantee = 'PUBLIC'").await,
            1,
            "round {round}: the view's grant"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let emu = emulator(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let (url, db) = fresh_postgres("pg_bad_input").await;
    let base = url.rsplit_once('/').unwrap().0.to_string();
    let init = |url: String| {
        let (emu, dir) = (&emu, dir.path().to_path_buf());
        async move {
            run_ours(
                emu,
                &dir,
                &["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &url],
            )
            .await
        }
    };
    let secret = "s3cr3t-Pass";
    let expect = |out: std::process::Output, needles: &[&str]| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(5), "{err}");
        for n in needles {
            assert!(err.contains(n), "expected {n:?} in: {err}");
        }
        assert!(!err.contains(secret) && !err.contains("repl_pass"), "a password leaked: {err}");
    };

    let user = base.split("//").nth(1).unwrap().split(':').next().unwrap();
    let host = base.rsplit('@').next().unwrap();
    expect(
        init(format!("postgresql://{user}:{secret}@{host}/dapt_pg_bad_input")).await,
        &["refused the login", "check the user and password"],
    );
    // Replicating there: each line about the refused login names the target once.
    let mirror = dir.path().join("mirror");
    let out = run_ours(
        &emu,
        dir.path(),
        &[
            "initdb",
            "--dir",
            mirror.to_str().unwrap(),
            "--namespace",
            "canvas",
            "--table",
            "accounts",
            "--replicate-to",
            &format!("postgresql://{user}:{secret}@{host}/dapt_pg_bad_input"),
        ],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("refused the login")).collect();
    assert!(lines.len() >= 2, "the failure is logged and summed up: {err}");
    for line in lines {
        assert_eq!(line.matches("/dapt_pg_bad_input").count(), 1, "the target named once: {line}");
    }
    assert!(!err.contains(secret), "a password leaked: {err}");
    expect(init(format!("postgresql://{user}:{secret}@127.0.0.1:1/db")).await, &["cannot reach the server"]);
    expect(init(format!("{base}/no_such_database")).await, &["database no_such_database does not exist"]);
    expect(
        init(format!("postgresql://{user}:{secret}@{host}:notaport/db")).await,
        &["invalid connection string", "port"],
    );
    assert!(nothing_created(&db).await, "no bad input created anything");

    // A user without the right to create schemas.
    db.batch_execute(&format!(
        "DROP ROLE IF EXISTS dap_limited; CREATE ROLE dap_limited LOGIN PASSWORD '{secret}';
         REVOKE CREATE ON DATABASE dapt_pg_bad_input FROM PUBLIC, dap_limited; GRANT CONNECT ON DATABASE dapt_pg_bad_input TO dap_limited"
    ))
    .await
    .unwrap();
    expect(
        init(format!("postgresql://dap_limited:{secret}@{host}/dapt_pg_bad_input")).await,
        &["may not create", "dap ddl"],
    );
    assert!(nothing_created(&db).await, "no privilege, nothing created");

    // A table the official client left half-loaded: it exists without a bookkeeping row.
    assert!(init(url.clone()).await.status.success());
    db.batch_execute("CREATE TABLE canvas.users (id bigint PRIMARY KEY)").await.unwrap();
    let out = run_ours(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url],
    )
    .await;
    expect(out, &["canvas.users exists but instructure_dap.table_sync has no row", "DROP TABLE \"canvas\".\"users\""]);
    let n: i64 = db.query_one("SELECT count(*) FROM canvas.users", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the half-loaded table is left alone");

    // A database of another version of the official client.
    db.batch_execute("INSERT INTO instructure_dap.database_version VALUES (2)").await.unwrap();
    let before = bookkeeping(&db).await;
    let out = run_ours(
        &emu,
        dir.path(),
        &["syncdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &url],
    )
    .await;
    expect(out, &["database_version holds [1, 2]"]);
    assert_eq!(bookkeeping(&db).await, before);
    db.batch_execute("DELETE FROM instructure_dap.database_version WHERE version = 2").await.unwrap();

    // A connection killed mid-load: the table keeps its previous state, and a rerun converges.
    emu.commit("canvas", "accounts", ChangeCounts { inserts: 500, updates: 10, ..Default::default() }).unwrap();
    let def = emu.table_def("canvas", "accounts").unwrap();
    let old = postgres_rows(&db, &def).await;
    let watermark = bookkeeping(&db).await;
    emu.inject(FaultSpec { delay_ms: Some(3000), ..FaultSpec::new(FaultKind::Slow, 1).on(Endpoint::Object) });
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dap"))
        .env("DAP_API_URL", emu.base_url())
        .env("DAP_CLIENT_ID", &emu.config().client_id)
        .env("DAP_CLIENT_SECRET", &emu.config().client_secret)
        .env("DAP_JOB_RATE", "1000/1")
        .args([
            "--non-interactive",
            "--max-attempts",
            "1",
            "syncdb",
            "--namespace",
            "canvas",
            "--table",
            "accounts",
            "--connection-string",
            &url,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the session as soon as it holds its transaction (the held-back object keeps it open),
    // however long the process takes to get there.
    let mut killed = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        killed = db
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'dap-replica' AND datname = 'dapt_pg_bad_input' AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if killed > 0 {
            break;
        }
    }
    assert!(killed > 0, "the load's session was found and killed");
    let out = child.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert_same_rows_within(&def, &postgres_rows(&db, &def).await, &old, "after the killed load", &[]);
    assert_eq!(bookkeeping(&db).await, watermark, "the watermark did not move");
    ours_ok(&emu, dir.path(), &["syncdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &url])
        .await;
    assert_same_rows_within(
        &def,
        &postgres_rows(&db, &def).await,
        &emu.truth("canvas", "accounts").unwrap(),
        "after the rerun",
        &[],
    );
}

/// A throwaway PostgreSQL cluster on its own port, with TLS on or off, stopped when dropped.
struct Cluster {
    bin: std::path::PathBuf,
    data: std::path::PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

fn sh(program: &Path, args: &[&str]) {
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .output()
        .expect("runuser runs (the test suite runs as root, as CI does)");
    assert!(out.status.success(), "{} {args:?}: {}", program.display(), String::from_utf8_lossy(&out.stderr));
}

impl Cluster {
    /// A cluster with a certificate for 127.0.0.1 signed by a CA made here; returns the CA file.
    fn start(dir: tempfile::TempDir) -> (Cluster, std::path::PathBuf) {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (scripts/db-up.sh)")
            .flatten()
            .map(|e| e.path().join("bin"))
            .max()
            .unwrap();
        let root = dir.path().to_path_buf();
        let root = root.as_path();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl").current_dir(root).args(args).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=dap test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(root.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        let data = root.join("data");
        std::fs::create_dir(&data).unwrap();
        let chown = std::process::Command::new("chown").args(["-R", "postgres:postgres"]).arg(root).status().unwrap();
        assert!(chown.success());
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::set_permissions(root.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        sh(&bin.join("initdb"), &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres"]);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ca = root.join("ca.pem");
        let cluster = Cluster { bin, data, port, _dir: dir };
        cluster.run(true);
        (cluster, ca)
    }

    /// (Re)starts the server with TLS on or off.
    fn run(&self, tls: bool) {
        let root = self.data.parent().unwrap();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c ssl={} -c ssl_cert_file={} -c ssl_key_file={}",
            self.port,
            root.display(),
            if tls { "on" } else { "off" },
            root.join("server.pem").display(),
            root.join("server.key").display()
        );
        let data = self.data.to_str().unwrap();
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", data, "-m", "fast", "-w", "stop"])
            .output();
        sh(
            &self.bin.join("pg_ctl"),
            &["-D", data, "-o", &options, "-l", root.join("log").to_str().unwrap(), "-w", "start"],
        );
    }

    fn url(&self, params: &str) -> String {
        format!("postgresql://postgres:unused@127.0.0.1:{}/postgres{params}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_connect_or_refuse_clearly() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let work = tempfile::tempdir().unwrap();
    let (cluster, ca) = Cluster::start(tempfile::tempdir_in("/tmp").unwrap());
    let status = |params: String, table: &'static str| {
        let (emu, dir, url) = (&emu, work.path().to_path_buf(), cluster.url(&params));
        async move {
            run_ours(emu, &dir, &["initdb", "--namespace", "canvas", "--table", table, "--connection-string", &url])
                .await
        }
    };
    let ca = ca.display().to_string();
    let ok = |out: std::process::Output| assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ok(status("?ssl=require".into(), "accounts").await);
    ok(status(format!("?ssl=verify-full&sslrootcert={ca}"), "users").await);
    ok(status(format!("?ssl=verify-ca&sslrootcert={ca}"), "courses").await);
    let out = status("?ssl=verify-full".into(), "enrollments").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("certificate was not accepted") && err.contains("sslrootcert"), "{err}");

    cluster.run(false);
    let out = status("?ssl=require".into(), "enrollments").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("does not offer TLS"), "{err}");
    ok(status("?ssl=prefer".into(), "enrollments").await);
}
