//! A MariaDB server that forbids `LOAD DATA LOCAL INFILE` (`local_infile = 0`, as many managed
//! servers are set): dap loads with multi-row statements instead, with the same result. The
//! setting is the whole server's, so scripts/test runs this module alone, after every other test:
//! no other test loads while it is off (a plain `cargo nextest run` would let them collide).

use crate::common;

use common::targets::MYSQL_LIMITS;
use common::truth::{assert_same_rows_within, mysql_rows};
use common::*;
use dap_replica::emulator::{ChangeCounts, EmulatorConfig};
use mysql_async::prelude::Queryable;

/// Turns local files off for the test and back on, even when the test fails.
struct LocalFilesOff(mysql_async::Pool);

impl Drop for LocalFilesOff {
    fn drop(&mut self) {
        let pool = self.0.clone();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                pool.get_conn().await.unwrap().query_drop("SET GLOBAL local_infile = 1").await.unwrap();
            })
        })
        .join()
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_local_files_the_rows_arrive_all_the_same() {
    if common::targets::require_var("TEST_MYSQL_URL").is_none() {
        return;
    }
    let admin = mysql_pool(&mysql_url());
    admin.get_conn().await.unwrap().query_drop("SET GLOBAL local_infile = 0").await.unwrap();
    let _restore = LocalFilesOff(admin);
    let emu = emulator(EmulatorConfig { rows: 300, part_rows: 70, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_mysql("my_without_local_files").await;
    let pool = mysql_pool(&url);
    let tables = ["accounts", "submissions", "assignments", "web_logs"];
    for (ns, table) in
        [("canvas", "accounts"), ("canvas", "submissions"), ("canvas", "assignments"), ("canvas_logs", "web_logs")]
    {
        let args = ["initdb", "--namespace", ns, "--table", table, "--non-finite", "null", "--connection-string", &url];
        let out = run_ours(&emu, dir.path(), &args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("loading with multi-row statements"), "the fallback was taken: {err}");
    }
    for ns_table in tables {
        let ns = if ns_table == "web_logs" { "canvas_logs" } else { "canvas" };
        emu.commit(ns, ns_table, ChangeCounts { inserts: 40, updates: 40, soft_deletes: 5, hard_deletes: 5 }).unwrap();
        let args =
            ["syncdb", "--namespace", ns, "--table", ns_table, "--non-finite", "null", "--connection-string", &url];
        ours_ok(&emu, dir.path(), &args).await;
        let def = emu.table_def(ns, ns_table).unwrap();
        assert_same_rows_within(
            &def,
            &mysql_rows(&pool, &def).await,
            &emu.truth(ns, ns_table).unwrap(),
            "without local files",
            MYSQL_LIMITS,
        );
    }
}
