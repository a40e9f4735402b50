//! MariaDB in the official client's layout: every table equals the truth (to the second) after
//! initdb, rounds of syncs and a round of schema changes, with the same catalog and `table_sync`
//! rows as the official client builds from the same steps; a sync without a schema change issues
//! no DDL (the server's general log); takeover both ways; NaN refused before anything is
//! published; bad input changes nothing; a load without local files works the same.

use crate::common;

use std::path::Path;

use common::targets::MYSQL_LIMITS;
use common::truth::{Limit, assert_same_rows_within, mysql_rows};
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, SchemaChange};
use mysql_async::prelude::Queryable;

/// The tests run dap with NaN stored as NULL; the official client cannot take NaN at all, so the
/// comparisons with it use data without NaN and infinity.
fn config(rows: u64) -> EmulatorConfig {
    EmulatorConfig { rows, part_rows: 20, special_floats: false, ..EmulatorConfig::default() }
}

/// The catalog of a database: columns (type, nullability, default, character set, comment),
/// tables (comment) and indexes, except our own tables.
async fn catalog(pool: &mysql_async::Pool) -> Vec<String> {
    let mut c = pool.get_conn().await.unwrap();
    c.query(
        "SELECT CONCAT_WS(' | ', 'column', TABLE_NAME, COLUMN_NAME, ORDINAL_POSITION, COLUMN_TYPE, IS_NULLABLE, IFNULL(COLUMN_DEFAULT, '-'),
                IFNULL(CHARACTER_SET_NAME, '-'), IFNULL(COLLATION_NAME, '-'), COLUMN_COMMENT, EXTRA)
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME NOT LIKE 'dap\\_replica%'
         UNION ALL SELECT CONCAT_WS(' | ', 'table', TABLE_NAME, TABLE_COMMENT, ENGINE)
         FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME NOT LIKE 'dap\\_replica%'
         UNION ALL SELECT CONCAT_WS(' | ', 'index', TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX, COLUMN_NAME, NON_UNIQUE)
         FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME NOT LIKE 'dap\\_replica%'
         ORDER BY 1",
    )
    .await
    .unwrap()
}

async fn bookkeeping(pool: &mysql_async::Pool) -> Vec<String> {
    let mut c = pool.get_conn().await.unwrap();
    let mut rows: Vec<String> = c
        .query(
            "SELECT CONCAT_WS(' | ', source_namespace, source_table, \"timestamp\", schema_version, target_schema, target_table,
                    schema_description_format, schema_description) FROM instructure_dap__table_sync ORDER BY 1",
        )
        .await
        .unwrap();
    let versions: Vec<String> =
        c.query("SELECT CAST(version AS CHAR) FROM instructure_dap__database_version").await.unwrap();
    rows.extend(versions.into_iter().map(|v| format!("database_version {v}")));
    rows
}

async fn assert_same_layout(ours: &mysql_async::Pool, theirs: &mysql_async::Pool, step: &str) {
    let (a, b) = (catalog(ours).await, catalog(theirs).await);
    assert!(a.len() > 100, "{step}: the catalog query sees the tables");
    assert!(a == b, "{step}: the catalogs differ\n{}", differences(&a, &b, OURS_AND_THEIRS));
    let (a, b) = (bookkeeping(ours).await, bookkeeping(theirs).await);
    assert!(a == b, "{step}: table_sync differs\n{}", differences(&a, &b, OURS_AND_THEIRS));
}

async fn assert_truth(emu: &Emulator, pool: &mysql_async::Pool, ns: &str, tables: &[String], step: &str) {
    for t in tables {
        let def = emu.table_def(ns, t).unwrap();
        assert_same_rows_within(&def, &mysql_rows(pool, &def).await, &emu.truth(ns, t).unwrap(), step, MYSQL_LIMITS);
    }
}

async fn both(emu: &Emulator, dir: &Path, args: &[&str], ours: &str, theirs: &str) {
    let mut a: Vec<&str> = args.to_vec();
    a.extend(["--connection-string", ours]);
    ours_ok(emu, dir, &a).await;
    let mut b = vec!["--loglevel", "warning"];
    b.extend(args);
    b.extend(["--connection-string", theirs]);
    official_ok(emu, dir, &b).await;
}

/// The issue-16 changes, on their own tables, in the schema round.
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
    let emu = emulator(config(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (ours_url, theirs_url) = (
        fresh_mysql(&format!("my_all_ours_{}", shard.suffix())).await,
        fresh_mysql(&format!("my_all_official_{}", shard.suffix())).await,
    );
    let (ours, theirs) = (mysql_pool(&ours_url), mysql_pool(&theirs_url));
    let namespaces = shard.namespaces(&emu);
    let canvas = namespaces[0].1.clone();

    for (ns, tables) in &namespaces {
        both(&emu, dir, &["initdb", "--namespace", ns, "--table", &tables.join(",")], &ours_url, &theirs_url).await;
    }
    for (ns, tables) in &namespaces {
        assert_truth(&emu, &ours, ns, tables, "ours after initdb").await;
    }
    assert_truth(&emu, &theirs, "canvas", &canvas, "official after initdb").await;
    assert_same_layout(&ours, &theirs, "after initdb").await;

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
            assert_truth(&emu, &ours, ns, tables, &format!("ours {step}")).await;
        }
        assert_truth(&emu, &theirs, "canvas", &canvas, &format!("official {step}")).await;
        assert_same_layout(&ours, &theirs, &step).await;
    }
}

/// Statements of the general log since `since` by `user` that change a table's definition (a
/// session's temporary tables are not the database's definition).
async fn ddl_since(admin: &mysql_async::Pool, user: &str, since: &str) -> Vec<String> {
    let mut c = admin.get_conn().await.unwrap();
    c.exec(
        "SELECT CONVERT(argument USING utf8mb4) FROM mysql.general_log
         WHERE event_time >= ? AND user_host LIKE CONCAT(?, '[%') AND command_type = 'Query'
           AND (argument LIKE 'ALTER%' OR argument LIKE 'CREATE%' OR argument LIKE 'DROP%' OR argument LIKE 'RENAME%')
           AND argument NOT LIKE 'CREATE TEMPORARY TABLE%' AND argument NOT LIKE 'DROP TEMPORARY TABLE%'",
        (since, user),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_without_schema_change_issues_no_ddl_and_takeover_works_both_ways() {
    let emu = emulator(config(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let tables = "accounts,users,courses,enrollments,assignments,submissions,quizzes";
    let names: Vec<&str> = tables.split(',').collect();
    let admin = mysql_pool(&mysql_url());
    {
        let mut c = admin.get_conn().await.unwrap();
        c.query_drop(
            "DROP USER IF EXISTS 'dap_ddl_probe'@'%'; CREATE USER 'dap_ddl_probe'@'%' IDENTIFIED BY 'probe_pass';
             GRANT ALL PRIVILEGES ON *.* TO 'dap_ddl_probe'@'%';
             SET GLOBAL log_output = 'TABLE'; SET GLOBAL general_log = 1",
        )
        .await
        .unwrap();
    }
    let check = |db_url: &str| db_url.replace("repl:repl_pass@", "dap_ddl_probe:probe_pass@");

    // dap builds it; a dap sync without a schema change issues no DDL; the official client then
    // syncs it and issues none either (only the spurious MODIFY it always issues on MariaDB for
    // real and json columns, which changes nothing: the catalog stays as it was).
    let url = check(&fresh_mysql("my_takeover_from_dap").await);
    let pool = mysql_pool(&url);
    let before_initdb: String = admin.get_conn().await.unwrap().query_first("SELECT NOW(6)").await.unwrap().unwrap();
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", tables, "--connection-string", &url])
        .await;
    // Positive control: the log does capture this user's DDL (initdb creates every table), so
    // an empty list after the sync means no DDL, not a log that saw nothing.
    let created = ddl_since(&admin, "dap_ddl_probe", &before_initdb).await;
    for t in &names {
        assert!(
            created.iter().any(|s| s.starts_with("CREATE TABLE") && s.contains(&format!("canvas__{t}"))),
            "the general log did not capture initdb's CREATE TABLE of {t}: {created:#?}"
        );
    }
    for t in &names {
        emu.commit("canvas", t, ChangeCounts { inserts: 5, updates: 5, soft_deletes: 1, hard_deletes: 2 }).unwrap();
    }
    let since: String = admin.get_conn().await.unwrap().query_first("SELECT NOW(6)").await.unwrap().unwrap();
    ours_ok(&emu, dir.path(), &["syncdb", "--namespace", "canvas", "--table", tables, "--connection-string", &url])
        .await;
    assert_eq!(
        ddl_since(&admin, "dap_ddl_probe", &since).await,
        Vec::<String>::new(),
        "a sync with no schema change issued DDL"
    );
    let layout = catalog(&pool).await;
    for t in &names {
        emu.commit("canvas", t, ChangeCounts { inserts: 5, updates: 5, soft_deletes: 1, hard_deletes: 2 }).unwrap();
    }
    official_ok(&emu, dir.path(), &["syncdb", "--namespace", "canvas", "--table", tables, "--connection-string", &url])
        .await;
    assert!(catalog(&pool).await == layout, "the official client changed dap's layout");
    for t in &names {
        let def = emu.table_def("canvas", t).unwrap();
        assert_same_rows_within(
            &def,
            &mysql_rows(&pool, &def).await,
            &emu.truth("canvas", t).unwrap(),
            "official after dap",
            MYSQL_LIMITS,
        );
    }

    // The official client builds it; dap syncs it without changing its layout.
    let url = check(&fresh_mysql("my_takeover_from_official").await);
    let pool = mysql_pool(&url);
    official_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", tables, "--connection-string", &url])
        .await;
    let layout = catalog(&pool).await;
    for t in &names {
        emu.commit("canvas", t, ChangeCounts { inserts: 5, updates: 5, soft_deletes: 1, hard_deletes: 2 }).unwrap();
    }
    let since: String = admin.get_conn().await.unwrap().query_first("SELECT NOW(6)").await.unwrap().unwrap();
    ours_ok(&emu, dir.path(), &["syncdb", "--namespace", "canvas", "--table", tables, "--connection-string", &url])
        .await;
    let ours: Vec<String> =
        ddl_since(&admin, "dap_ddl_probe", &since).await.into_iter().filter(|s| !s.contains("dap_replica")).collect();
    assert_eq!(ours, Vec::<String>::new(), "dap issued DDL on the official client's tables");
    assert!(catalog(&pool).await == layout, "dap changed the official client's layout");
    for t in &names {
        let def = emu.table_def("canvas", t).unwrap();
        assert_same_rows_within(
            &def,
            &mysql_rows(&pool, &def).await,
            &emu.truth("canvas", t).unwrap(),
            "dap after the official client",
            MYSQL_LIMITS,
        );
    }
    admin.get_conn().await.unwrap().query_drop("SET GLOBAL general_log = 0").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_is_refused_before_anything_is_published_or_stored_as_null_on_request() {
    let emu = emulator(EmulatorConfig { rows: 30, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_mysql("my_nan").await;
    let pool = mysql_pool(&url);
    let init = |extra: &'static [&'static str]| {
        let (emu, dir, url) = (&emu, dir.path().to_path_buf(), url.clone());
        async move {
            let mut args =
                vec!["initdb", "--namespace", "canvas", "--table", "assignments", "--connection-string", &url];
            args.extend(extra);
            run_ours(emu, &dir, &args).await
        }
    };
    let out = init(&[]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("canvas.assignments: key ") && err.contains("column points_possible holds"), "{err}");
    assert!(err.contains("--non-finite null"), "the message names the remedy: {err}");
    let mut c = pool.get_conn().await.unwrap();
    let visible: Option<i64> = c
        .query_first("SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'canvas__assignments'")
        .await
        .unwrap();
    assert_eq!(visible, Some(0), "nothing was published");
    let out = init(&["--non-finite", "null"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A required float column (outcome_proficiency_ratings.points): NULL cannot stand in for
    // its NaN either. The refusal says so, and leaves no staging table behind.
    let args = [
        "initdb",
        "--namespace",
        "canvas",
        "--table",
        "outcome_proficiency_ratings",
        "--connection-string",
        &url,
        "--non-finite",
        "null",
    ];
    let out = run_ours(&emu, dir.path(), &args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("column points holds") && err.contains("points is required (NOT NULL)") && !err.contains("1263"),
        "{err}"
    );
    let left: Option<i64> = c
        .query_first("SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME LIKE '%outcome_proficiency_ratings%'")
        .await
        .unwrap();
    assert_eq!(left, Some(0), "neither the table nor its staging is left");
    let def = emu.table_def("canvas", "assignments").unwrap();
    let mut limits = MYSQL_LIMITS.to_vec();
    limits.push(Limit::NonFiniteAsNull);
    assert_same_rows_within(
        &def,
        &mysql_rows(&pool, &def).await,
        &emu.truth("canvas", "assignments").unwrap(),
        "NaN as NULL",
        &limits,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let emu = emulator(config(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_mysql("my_bad_input").await;
    let pool = mysql_pool(&url);
    let secret = "s3cr3t-Pass";
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
    let expect = |out: std::process::Output, needles: &[&str]| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(5), "{err}");
        for n in needles {
            assert!(err.contains(n), "expected {n:?} in: {err}");
        }
        assert!(!err.contains(secret) && !err.contains("repl_pass"), "a password leaked: {err}");
    };
    let tables = |pool: &mysql_async::Pool| {
        let pool = pool.clone();
        async move {
            let n: Option<i64> = pool
                .get_conn()
                .await
                .unwrap()
                .query_first("SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()")
                .await
                .unwrap();
            n.unwrap()
        }
    };
    let host = url.split('@').nth(1).unwrap().split('/').next().unwrap().to_string();
    expect(
        init(format!("mysql://repl:{secret}@{host}/dapt_my_bad_input")).await,
        &["refused the login", "check the user and password"],
    );
    expect(init(format!("mysql://repl:{secret}@127.0.0.1:1/db")).await, &["cannot reach the server"]);
    expect(
        init(format!("mysql://repl:repl_pass@{host}/no_such_database")).await,
        &["database no_such_database does not exist"],
    );
    expect(init(format!("mysql://repl:{secret}@{host}:99999/db")).await, &["invalid connection string", "port"]);
    {
        let mut c = pool.get_conn().await.unwrap();
        c.query_drop(format!(
            "DROP USER IF EXISTS 'dap_readonly'@'%'; CREATE USER 'dap_readonly'@'%' IDENTIFIED BY '{secret}';
             GRANT SELECT ON dapt_my_bad_input.* TO 'dap_readonly'@'%'"
        ))
        .await
        .unwrap();
    }
    expect(
        init(format!("mysql://dap_readonly:{secret}@{host}/dapt_my_bad_input")).await,
        &["may not create tables", "dap ddl"],
    );
    assert_eq!(tables(&pool).await, 0, "no bad input created anything");

    // A connection killed while the load streams: the table keeps its state; a rerun converges.
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &url])
        .await;
    emu.commit("canvas", "accounts", ChangeCounts { inserts: 500, updates: 10, ..Default::default() }).unwrap();
    let def = emu.table_def("canvas", "accounts").unwrap();
    let before = mysql_rows(&pool, &def).await;
    let marks = bookkeeping(&pool).await;
    emu.inject(dap_replica::emulator::FaultSpec {
        delay_ms: Some(3000),
        ..dap_replica::emulator::FaultSpec::new(dap_replica::emulator::FaultKind::Slow, 1)
            .on(dap_replica::emulator::Endpoint::Object)
    });
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
    let admin = mysql_pool(&mysql_url());
    // However long the process takes to get to its load.
    let mut killed = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut c = admin.get_conn().await.unwrap();
        let ids: Vec<u64> = c
            .query("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = 'dapt_my_bad_input' AND INFO LIKE 'LOAD DATA%'")
            .await
            .unwrap();
        for id in &ids {
            let _ = c.query_drop(format!("KILL {id}")).await;
        }
        killed += ids.len();
        if killed > 0 {
            break;
        }
    }
    assert!(killed > 0, "the load's connection was found and killed");
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_rows_within(&def, &mysql_rows(&pool, &def).await, &before, "after the killed load", &[]);
    assert_eq!(bookkeeping(&pool).await, marks, "the watermark did not move");
    ours_ok(&emu, dir.path(), &["syncdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &url])
        .await;
    assert_same_rows_within(
        &def,
        &mysql_rows(&pool, &def).await,
        &emu.truth("canvas", "accounts").unwrap(),
        "after the rerun",
        MYSQL_LIMITS,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_connect_or_refuse_clearly() {
    // scripts/db-up.sh gives MariaDB a test certificate and sets TEST_MYSQL_CA.
    let Some(ca) = common::targets::require_var("TEST_MYSQL_CA") else {
        return;
    };
    let emu = emulator(config(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_mysql("my_tls").await;
    let init = |params: String, table: &'static str| {
        let (emu, dir, url) = (&emu, dir.path().to_path_buf(), format!("{url}{params}"));
        async move {
            run_ours(emu, &dir, &["initdb", "--namespace", "canvas", "--table", table, "--connection-string", &url])
                .await
        }
    };
    let ok = |out: std::process::Output| assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ok(init("?ssl=require".into(), "accounts").await);
    ok(init(format!("?ssl=verify-full&sslrootcert={ca}"), "users").await);
    ok(init(format!("?ssl=verify-ca&sslrootcert={ca}"), "courses").await);
    let out = init("?ssl=verify-full".into(), "enrollments").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("certificate was not accepted") && err.contains("sslrootcert"), "{err}");
    // A user the server admits only over TLS: dap's sessions really are encrypted with ?ssl=, and
    // refused clearly without it.
    mysql_pool(&url)
        .get_conn()
        .await
        .unwrap()
        .query_drop(
            "DROP USER IF EXISTS 'dap_tls_only'@'%'; CREATE USER 'dap_tls_only'@'%' IDENTIFIED BY 'tls_pass' REQUIRE SSL;
             GRANT ALL PRIVILEGES ON dapt_my_tls.* TO 'dap_tls_only'@'%'",
        )
        .await
        .unwrap();
    let tls_only = url.replace("repl:repl_pass@", "dap_tls_only:tls_pass@");
    let init_as = |params: &'static str, table: &'static str| {
        let (emu, dir, url) = (&emu, dir.path().to_path_buf(), format!("{tls_only}{params}"));
        async move {
            run_ours(emu, &dir, &["initdb", "--namespace", "canvas", "--table", table, "--connection-string", &url])
                .await
        }
    };
    ok(init_as("?ssl=require", "enrollments").await);
    let out = init_as("?ssl=disable", "pseudonyms").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("refused the login") && !err.contains("tls_pass"), "{err}");
}
