//! `dap demo`: the whole product offline in one command. It starts the emulator in-process,
//! initialises a realistic set of tables into a demo mirror, adds changes, syncs, and shows the
//! status and an example query. No credentials, server or network needed.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::Context;
use super::db::{self, DbArgs, Mode};
use crate::emulator::{ChangeCounts, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator, EmulatorConfig};

const TABLES: &[(&str, &str)] =
    &[("canvas", "accounts,users,courses,enrollments,assignments,submissions"), ("canvas_logs", "web_logs")];

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder of the demo mirror (one SQLite file per namespace).
    #[arg(long, default_value = "dap-demo")]
    dir: PathBuf,
    /// Rows per table in the emulated service.
    #[arg(long, default_value_t = 2_000)]
    rows: u64,
}

pub async fn run(ctx: &Context, args: DemoArgs) -> anyhow::Result<()> {
    let emulator = Emulator::start(EmulatorConfig { rows: args.rows, ..EmulatorConfig::default() })
        .await
        .context("starting the emulator")?;
    println!("1. A local DAP emulator is serving Canvas Data 2 on {}", emulator.base_url());
    let mut ctx = Context {
        client: ctx.client.clone(),
        interactive: ctx.interactive,
        shared: ctx.shared,
        default_targets: Vec::new(),
    };
    ctx.client.base_url = emulator.base_url().to_string();
    ctx.client.client_id = Some(DEFAULT_CLIENT_ID.into());
    ctx.client.client_secret = Some(DEFAULT_CLIENT_SECRET.into());
    ctx.client.job_limit = 1000; // the emulator enforces no rate limit here
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir).with_context(|| format!("resolving {}", args.dir.display()))?;
    let target = |ns: &str| Some(format!("sqlite://{}", dir.join(format!("{ns}.db")).display()));
    let db_args = |ns: &str, tables: &str| DbArgs {
        namespace: ns.into(),
        table: tables.into(),
        connection_string: target(ns),
        json: false,
        parallel_tables: 4,
        temp_dir: None,
        non_finite: crate::sink::NonFinite::Refuse,
    };

    println!(
        "2. Initialising {} tables into {} ...",
        TABLES.iter().map(|(_, t)| t.split(',').count()).sum::<usize>(),
        dir.display()
    );
    for (ns, tables) in TABLES {
        // A table the demo mirror already has is synced instead.
        db::run(
            &ctx,
            db_args(ns, tables),
            db::FanOutArgs::default(),
            Mode::Sync { auto_reinit: true, init_missing: true },
        )
        .await?;
    }
    println!("3. Changing the source: inserts, updates, soft and hard deletes ...");
    for (ns, tables) in TABLES {
        for t in tables.split(',') {
            emulator.commit(ns, t, ChangeCounts { inserts: 25, updates: 40, soft_deletes: 5, hard_deletes: 5 })?;
        }
    }
    println!("4. Syncing the changes ...");
    for (ns, tables) in TABLES {
        db::run(
            &ctx,
            db_args(ns, tables),
            db::FanOutArgs::default(),
            Mode::Sync { auto_reinit: true, init_missing: true },
        )
        .await?;
    }
    println!("\n5. The mirror now:\n");
    db::status(&ctx, db::StatusArgs::for_dir(&dir)).await?;

    let canvas = dir.join("canvas.db");
    let query = "SELECT workflow_state, count(*) AS enrollments FROM enrollments GROUP BY 1 ORDER BY 2 DESC";
    println!("\n6. An example query on {}:\n\n   {query}\n", canvas.display());
    let conn = rusqlite::Connection::open(&canvas).with_context(|| format!("opening {}", canvas.display()))?;
    let mut stmt = conn.prepare(query)?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (state, n) = row?;
        println!("   {state:<24} {n:>6}");
    }
    println!(
        "\nExplore it yourself: sqlite3 {}  (ATTACH '{}' AS canvas_logs; for web_logs)",
        canvas.display(),
        dir.join("canvas_logs.db").display()
    );
    emulator.shutdown();
    Ok(())
}
