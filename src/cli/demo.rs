//! `dap demo`: the whole product offline in one command. It starts the emulator in-process,
//! initialises a realistic set of tables into a demo mirror, adds changes, syncs, and shows the
//! status and an example query. No credentials, server or network needed.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;

use super::Context;
use super::db;
use crate::api::Client;
use crate::emulator::{ChangeCounts, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator, EmulatorConfig};
use crate::progress::Progress;
use crate::run::{Missing, Mode, Plan, Tables};
use crate::sink::{ConnectionString, SinkOptions};
use crate::status::{Location, StatusRequest};
use crate::sync::{Init, Reinit};
use crate::target::TargetSpec;

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

/// Marks a folder as the demo's own, so that a later demo may start it afresh.
const MARKER: &str = ".dap-demo";

/// Questions an analyst asks first, over both namespaces.
const QUERIES: &[(&str, &str)] = &[
    (
        "Grades per course",
        "SELECT c.name AS course, count(*) AS graded, round(avg(s.score), 1) AS average_score
         FROM canvas.submissions s JOIN canvas.courses c ON c.id = s.course_id
         WHERE s.score IS NOT NULL GROUP BY c.id ORDER BY graded DESC, course LIMIT 5",
    ),
    (
        "Active users per day (web_logs)",
        "SELECT date(w.timestamp) AS day, count(DISTINCT w.user_id) AS active_users, count(*) AS requests
         FROM canvas_logs.web_logs w JOIN canvas.users u ON u.id = w.user_id
         GROUP BY day ORDER BY day DESC LIMIT 7",
    ),
    (
        "Enrollments by state, for students and courses that exist",
        "SELECT e.workflow_state, count(*) AS enrollments FROM canvas.enrollments e
         JOIN canvas.users u ON u.id = e.user_id JOIN canvas.courses c ON c.id = e.course_id
         GROUP BY 1 ORDER BY 2 DESC",
    ),
];

/// Empties a folder an earlier demo made (the emulator's data starts over on each run, so its old
/// mirror could not sync on); refuses a folder that is not the demo's.
fn start_afresh(dir: &std::path::Path) -> anyhow::Result<()> {
    let has_files = std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if !has_files {
        crate::privacy::create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    } else if dir.join(MARKER).exists() {
        println!("Starting afresh: removing the previous demo mirror in {}", dir.display());
        std::fs::remove_dir_all(dir).with_context(|| format!("removing the old demo in {}", dir.display()))?;
        crate::privacy::create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    } else {
        anyhow::bail!(
            "{} holds files that are not an earlier demo's; pass --dir with a new or empty folder",
            dir.display()
        );
    }
    std::fs::write(dir.join(MARKER), "made by `dap demo`; the next demo empties this folder\n")
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(())
}

/// Syncs every demo table into the mirror files in `dir`, initialising those it lacks.
/// Runs `mode` (the first initdb, then syncs) over every demo table.
async fn run_all(ctx: &Context, dir: &Path, mode: Mode) -> anyhow::Result<()> {
    for &(ns, tables) in TABLES {
        let plan = Plan {
            namespace: ns.into(),
            tables: Tables::parse(tables)?,
            mode,
            target: TargetSpec::Url(ConnectionString::sqlite(&dir.join(format!("{ns}.db")))),
            fan_out: Vec::new(),
            fan_out_history: crate::run::HistoryCopy::Leave,
            temp_dir: None,
            sink: SinkOptions { shared: ctx.shared, ..SinkOptions::default() },
            attempts: ctx.client.retry.attempts,
            keep_days: None,
            metrics_file: None,
        };
        let progress = Progress::new(ctx.interactive);
        let report = crate::run::run(Client::new(ctx.client.clone())?, &plan, &progress).await?;
        std::mem::drop(progress);
        super::finish(ctx.console, report.command, &report.tables)?;
    }
    Ok(())
}

pub async fn run(ctx: &Context, args: DemoArgs) -> anyhow::Result<()> {
    start_afresh(&args.dir)?;
    // Plausible values only: the demo is for reading, not for testing the edges of every type.
    let config = EmulatorConfig {
        rows: args.rows,
        special_floats: false,
        edge_rows: false,
        anchor: crate::emulator::anchor_now(),
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start(config).await.context("starting the emulator")?;
    println!("1. A local DAP emulator is serving Canvas Data 2 on {}", emulator.base_url());
    let mut ctx = Context {
        client: ctx.client.clone(),
        interactive: ctx.interactive,
        console: ctx.console,
        shared: ctx.shared,
        default_targets: Vec::new(),
        default_notify: Vec::new(),
    };
    ctx.client.base_url = emulator.base_url().to_string();
    ctx.client.client_id = Some(DEFAULT_CLIENT_ID.into());
    ctx.client.client_secret = Some(DEFAULT_CLIENT_SECRET.into());
    ctx.client.job_limit = 1000; // the emulator enforces no rate limit here
    let dir = std::fs::canonicalize(&args.dir).with_context(|| format!("resolving {}", args.dir.display()))?;

    println!(
        "2. Initialising {} tables into {} ...",
        TABLES.iter().map(|(_, t)| t.split(',').count()).sum::<usize>(),
        dir.display()
    );
    run_all(&ctx, &dir, Mode::Init(Init::Fresh)).await?;
    println!("3. Changing the source: inserts, updates, soft and hard deletes ...");
    for (ns, tables) in TABLES {
        for t in tables.split(',') {
            emulator.commit(ns, t, ChangeCounts { inserts: 25, updates: 40, soft_deletes: 5, hard_deletes: 5 })?;
        }
    }
    println!("4. Syncing the changes ...");
    run_all(&ctx, &dir, Mode::Sync { reinit: Reinit::Automatically, missing: Missing::Initialise }).await?;
    println!("\n5. The mirror now:\n");
    let request = StatusRequest {
        namespace: None,
        location: Location::Folder(dir.clone()),
        targets: Vec::new(),
        shared: ctx.shared,
    };
    db::print_status(&crate::status::status(&request).await?, &[], db::Output::Text)?;

    let conn = crate::query::open_mirror(&dir)?;
    for (n, (title, sql)) in QUERIES.iter().enumerate() {
        let shown: Vec<&str> = sql.lines().map(str::trim).collect();
        println!("\n{}. {title}:\n\n   dap query --dir {} \"{}\"\n", n + 6, dir.display(), shown.join(" "));
        let mut out = Vec::new();
        let rows = crate::query::run(
            &conn,
            sql,
            crate::query::OutputFormat::Table,
            crate::query::DEFAULT_MAX_WIDTH,
            &mut out,
        )?;
        for line in String::from_utf8_lossy(&out).lines() {
            println!("   {line}");
        }
        if rows == 0 {
            println!("   (no rows)");
        }
    }
    println!(
        "\nExplore it yourself: dap query --dir {0}   (an interactive shell when sqlite3 is installed)\n\
         The data dictionary of each file: SELECT * FROM canvas.dap_columns WHERE table_name = 'submissions'",
        dir.display()
    );
    emulator.shutdown();
    Ok(())
}
