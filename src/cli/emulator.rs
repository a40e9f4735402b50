//! `dap emulator`: serve the built-in DAP emulator until interrupted.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::emulator::{
    CsvNull, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Emulator, EmulatorConfig, Mode, SchemaChange,
};
use crate::time;

#[derive(Debug, Args)]
pub struct EmulatorArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8642)]
    port: u16,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Base rows per table.
    #[arg(long, default_value_t = 100)]
    rows: u64,
    /// Base rows for one table, as `[namespace.]table=N` (repeatable).
    #[arg(long = "table-rows", value_name = "TABLE=N", value_parser = parse_table_rows)]
    table_rows: Vec<(String, u64)>,
    /// Client ID the emulator accepts.
    #[arg(long = "accept-client-id", default_value = DEFAULT_CLIENT_ID)]
    accept_client_id: String,
    /// Client secret the emulator accepts.
    #[arg(long = "accept-client-secret", default_value = DEFAULT_CLIENT_SECRET)]
    accept_client_secret: String,
    /// Lifetime of access tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    token_lifetime: u64,
    /// Seconds a new job stays `waiting`.
    #[arg(long, default_value_t = 1.0)]
    job_waiting: f64,
    /// Seconds a job then stays `running`.
    #[arg(long, default_value_t = 2.0)]
    job_running: f64,
    /// Seconds until a job and its objects expire.
    #[arg(long, default_value_t = 86_400)]
    job_lifetime: u64,
    /// Seconds until an object URL expires.
    #[arg(long, default_value_t = 900)]
    url_lifetime: u64,
    /// Rows per part file.
    #[arg(long, default_value_t = 10_000)]
    part_rows: u64,
    /// Enforce the documented per-endpoint rate limits (5 queries per window, …).
    #[arg(long)]
    rate_limits: bool,
    /// Seconds the rate limits count over (60 in the real service).
    #[arg(long, default_value_t = 60.0)]
    rate_window: f64,
    /// Export time of the base data (RFC 3339); by default now, to the minute, so that the
    /// data's dates are recent (the tests use 2026-01-01 for data that is the same every day).
    #[arg(long, value_parser = time::parse_rfc3339)]
    anchor: Option<i64>,
    /// Layout of nested objects when a query names no mode.
    #[arg(long, value_enum, default_value_t = Mode::Expanded)]
    default_mode: Mode,
    /// How CSV writes NULL.
    #[arg(long, value_enum, default_value_t = CsvNull::Literal)]
    csv_null: CsvNull,
    /// Never generate NaN or infinite floats.
    #[arg(long)]
    no_special_floats: bool,
    /// Plausible values only (no rows of domain edges, no NaN or infinity): data to look at, as
    /// `dap demo` serves it.
    #[arg(long)]
    plausible: bool,
    /// Refuse incrementals with `since` older than this many days (out of range).
    #[arg(long)]
    retention_days: Option<u64>,
    /// Days of web_logs DAP keeps (snapshots hold this window, older incrementals are out of
    /// range); 0 keeps every log.
    #[arg(long, default_value_t = 30)]
    weblogs_retention_days: u64,
    /// Serve a table at a newer schema version from the start, as `namespace.table=CHANGE`
    /// (repeatable; rows already there keep the old schema's values). CHANGE is one of
    /// add-column, widen-max-length, add-enum-value, make-optional, add-nested-member,
    /// widen-integer, widen-decimal (and, for tests, make-required, narrow-max-length).
    #[arg(long = "schema-change", value_name = "NS.TABLE=CHANGE", value_parser = parse_schema_change)]
    schema_changes: Vec<(String, String, SchemaChange)>,
    /// Add a table to a namespace's list, as `namespace.table` (repeatable).
    #[arg(long = "add-table", value_name = "NS.TABLE", value_parser = parse_qualified)]
    add_tables: Vec<(String, String)>,
}

fn parse_qualified(s: &str) -> Result<(String, String), String> {
    let (ns, table) = s.split_once('.').ok_or("expected namespace.table, e.g. canvas.accounts")?;
    Ok((ns.to_string(), table.to_string()))
}

fn parse_schema_change(s: &str) -> Result<(String, String, SchemaChange), String> {
    let (qualified, change) = s.split_once('=').ok_or("expected namespace.table=CHANGE")?;
    let (ns, table) = parse_qualified(qualified)?;
    let change = <SchemaChange as clap::ValueEnum>::from_str(change, true)?;
    Ok((ns, table, change))
}

fn parse_table_rows(s: &str) -> Result<(String, u64), String> {
    let (table, n) = s.split_once('=').ok_or("expected TABLE=N")?;
    Ok((table.to_string(), n.parse().map_err(|_| format!("{n:?} is not a row count"))?))
}

impl EmulatorArgs {
    fn config(&self) -> EmulatorConfig {
        EmulatorConfig {
            port: self.port,
            seed: self.seed,
            rows: self.rows,
            table_rows: self.table_rows.iter().cloned().collect::<HashMap<_, _>>(),
            client_id: self.accept_client_id.clone(),
            client_secret: self.accept_client_secret.clone(),
            token_lifetime: Duration::from_secs(self.token_lifetime),
            job_waiting: Duration::from_secs_f64(self.job_waiting),
            job_running: Duration::from_secs_f64(self.job_running),
            job_lifetime: Duration::from_secs(self.job_lifetime),
            url_lifetime: Duration::from_secs(self.url_lifetime),
            part_rows: self.part_rows,
            rate_limits: self.rate_limits,
            rate_window: Duration::from_secs_f64(self.rate_window),
            anchor: self.anchor.unwrap_or_else(crate::emulator::anchor_now),
            default_mode: self.default_mode,
            csv_null: self.csv_null,
            special_floats: !(self.no_special_floats || self.plausible),
            edge_rows: !self.plausible,
            web_logs_duplicate_rate: EmulatorConfig::default().web_logs_duplicate_rate,
            retention: self.retention_days.map(|d| Duration::from_secs(d * 86_400)),
            log_retention: (self.weblogs_retention_days > 0)
                .then(|| Duration::from_secs(self.weblogs_retention_days * 86_400)),
        }
    }
}

pub async fn run(args: EmulatorArgs) -> anyhow::Result<()> {
    let config = args.config();
    let emulator = Emulator::start(config).await.context("starting the DAP emulator")?;
    for (ns, table) in &args.add_tables {
        emulator.add_table(ns, table, args.rows).with_context(|| format!("--add-table {ns}.{table}"))?;
    }
    for (ns, table, change) in &args.schema_changes {
        let (version, column) =
            emulator.evolve(ns, table, *change).with_context(|| format!("--schema-change {ns}.{table}"))?;
        println!("{ns}.{table} is at schema version {version} ({change:?} on {column})");
    }
    let c = emulator.config();
    println!("DAP emulator serving on {}", emulator.base_url());
    println!("  export DAP_API_URL={}", emulator.base_url());
    println!("  export DAP_CLIENT_ID='{}'", c.client_id);
    println!("  export DAP_CLIENT_SECRET='{}'", c.client_secret);
    // The pace dap should keep: the emulator's own limit when it enforces one, else none.
    let rate = if c.rate_limits { format!("5/{}", c.rate_window.as_secs_f64()) } else { "1000/1".into() };
    println!("  export DAP_JOB_RATE={rate}");
    println!(
        "Control: POST {0}/emulator/commit, POST {0}/emulator/schema, POST {0}/emulator/faults, GET {0}/emulator/truth/NS/TABLE",
        emulator.base_url()
    );
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    emulator.shutdown();
    Ok(())
}
