//! `initdb`, `syncdb`, `dropdb`, `listdb` and `status` on any target: the default SQLite mirror,
//! a `sqlite://` file, or a server named by its connection string.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Context;
use crate::api::Client;
use crate::per_table::{self, Outcome};
use crate::progress::Progress;
use crate::run::{HistoryCopy, Missing, Mode, Plan, Tables};
use crate::sink::{Access, NonFinite, SinkOptions};
use crate::status::{Location, Position, StatusRequest, TableStatus, TargetStatus, staleness};
use crate::sync::{Init, Reinit};
use crate::target::{self, TargetSpec};
use crate::time;

/// Which tables of which target: every command that changes a target (`dropdb` takes only these).
#[derive(Debug, Args)]
pub struct DbArgs {
    /// Namespace, e.g. canvas, canvas_logs, catalog.
    #[arg(long)]
    pub(super) namespace: String,
    /// `all`, or a comma-separated list of tables.
    #[arg(long)]
    pub(super) table: String,
    /// The target: postgresql://user:password@host:port/database[?ssl=MODE],
    /// mysql://user:password@host:port/database, mssql://user:password@host:port/database or
    /// sqlite:///ABS/PATH.db (also sqlite:////ABS, sqlite://REL and sqlite:REL); the default
    /// mirror when omitted.
    #[arg(long, env = "DAP_CONNECTION_STRING", hide_env_values = true)]
    pub(super) connection_string: Option<String>,
    /// The mirror folder (NAMESPACE.db files), as status, query, export and pack take it
    /// [default: DAP_MIRROR_DIR, else the platform data folder].
    #[arg(long, conflicts_with = "connection_string")]
    pub(super) dir: Option<PathBuf>,
    /// Print a machine-readable result per table on stdout.
    #[arg(long)]
    pub(super) json: bool,
    /// How long to wait for another process writing the same table (or mirror file) to finish,
    /// e.g. 90s, 10m or 2h; then that table is left alone with a message saying who holds it.
    #[arg(long, value_parser = super::parse_duration, default_value = "10m")]
    pub(super) lock_timeout: std::time::Duration,
}

/// How initdb and syncdb download and load (not dropdb's business).
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Tables that download and load at once (a database connection each on a server; a mirror
    /// file has one writer). Jobs for up to 32 tables are requested and waited on together.
    #[arg(long, default_value_t = 4)]
    pub(super) parallel_tables: usize,
    /// Folder for objects between download and load (the official client's flag); by default
    /// beside the mirror, or the system's temporary folder for a server.
    #[arg(long)]
    pub(super) temp_dir: Option<PathBuf>,
    /// What NaN and infinity become on targets without them (MySQL, SQL Server): refuse the
    /// table before writing, or store NULL.
    #[arg(long, value_enum, default_value_t = NonFinite::Refuse)]
    pub(super) non_finite: NonFinite,
}

/// The target and the loading options of a run that loads (initdb, syncdb, watch).
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub(super) target: DbArgs,
    #[command(flatten)]
    pub(super) load: LoadArgs,
}

/// The fan-out of initdb and syncdb on the mirror.
#[derive(Debug, Default, Args)]
pub struct FanOutArgs {
    /// After the run, replicate its tables from the mirror to this database (repeatable):
    /// postgresql://…, mysql://…, mssql://… or sqlite:///PATH.db.
    #[arg(long = "replicate-to")]
    replicate_to: Vec<String>,
    /// The fan-out carries each table's history too (kept by the mirror with --keep-history),
    /// as `dap replicate --with-history` does.
    #[arg(long, requires = "replicate_to")]
    replicate_with_history: bool,
}

/// What initdb and syncdb leave for monitoring.
#[derive(Debug, Default, Args)]
pub struct MonitorArgs {
    /// After the run, write the state of the namespace's tables (rows, lag, last success, last
    /// run failed, run duration) as OpenMetrics text to this file, atomically: for the
    /// node_exporter textfile collector.
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
}

/// History in the mirror (initdb and syncdb on a mirror file).
#[derive(Debug, Default, Args)]
pub struct HistoryArgs {
    /// Keep every version of these tables (`all`, or a comma-separated list) in
    /// `<table>__history` in the mirror, from this run on; remembered, so later syncs keep it
    /// without the flag. Exact at every sync: a row changed twice between two syncs shows its
    /// last change only. Query it with `dap query --as-of` and `dap history`.
    #[arg(long, value_name = "TABLES")]
    keep_history: Option<String>,
    /// Stop keeping history for these tables (`all`, or a list); what was recorded stays unless
    /// --drop-history.
    #[arg(long, value_name = "TABLES")]
    no_history: Option<String>,
    /// With --no-history: delete the recorded history too.
    #[arg(long, requires = "no_history")]
    drop_history: bool,
    /// Prune versions that ended more than this many days before the table's watermark
    /// (remembered per table; by default every version is kept).
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    history_days: Option<u32>,
}

impl HistoryArgs {
    fn choice(&self) -> crate::history_choice::Choice {
        use crate::history_choice::{Choice, Recorded, Selection};
        let parse = |spec: &Option<String>| spec.as_deref().map_or(Selection::Nothing, Selection::parse);
        Choice {
            keep: parse(&self.keep_history),
            stop: parse(&self.no_history),
            recorded: if self.drop_history { Recorded::Drop } else { Recorded::Keep },
            days: self.history_days,
        }
    }
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    db: RunArgs,
    #[command(flatten)]
    monitor: MonitorArgs,
    #[command(flatten)]
    fan_out: FanOutArgs,
    #[command(flatten)]
    history: HistoryArgs,
    /// Load an initialised table again; the old data stays queryable until the swap.
    #[arg(long)]
    replace: bool,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    db: RunArgs,
    #[command(flatten)]
    monitor: MonitorArgs,
    #[command(flatten)]
    fan_out: FanOutArgs,
    #[command(flatten)]
    history: HistoryArgs,
    /// When the server needs a new snapshot of a table, take it (atomically) instead of stopping.
    #[arg(long)]
    auto_reinit: bool,
    /// Also initialise tables the server has and the target lacks ("sync, else init").
    #[arg(long)]
    init_missing: bool,
    /// After the sync, keep N days of each log table (canvas_logs) in the mirror: older days
    /// go once `dap archive` holds them whole; a row no archive holds is never removed.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep_days: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ListDbArgs {
    /// Namespace, e.g. canvas, canvas_logs, catalog.
    #[arg(long)]
    namespace: String,
    /// The database to list: a connection string as initdb takes it; the default mirror when
    /// omitted.
    #[arg(long, env = "DAP_CONNECTION_STRING", hide_env_values = true)]
    connection_string: Option<String>,
    /// The mirror folder (NAMESPACE.db files) [default: DAP_MIRROR_DIR, else the platform data
    /// folder].
    #[arg(long, conflicts_with = "connection_string")]
    dir: Option<PathBuf>,
    /// Only tables present in the database.
    #[arg(long)]
    omit_not_replicated: bool,
    /// Skip counting rows.
    #[arg(long)]
    omit_record_count: bool,
}

/// The target of a command: its connection string, else the mirror in `dir` (`--dir`), else
/// the default mirror.
pub(super) fn target_spec(
    connection_string: Option<&str>,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<TargetSpec> {
    if let Some(dir) = dir {
        crate::mirror::folder::use_dir(dir);
    }
    Ok(TargetSpec::parse(connection_string)?)
}

impl RunArgs {
    /// The target's options for a writing run.
    fn sink_options(&self, ctx: &Context) -> SinkOptions {
        SinkOptions {
            access: Access::Write,
            parallelism: self.load.parallel_tables.max(1),
            non_finite: self.load.non_finite,
            shared: ctx.shared,
            lock_timeout: self.target.lock_timeout,
            history: Default::default(),
        }
    }
}

/// The validated run these arguments ask for (initdb, syncdb, and each run of `dap watch`).
pub(super) fn plan(
    ctx: &Context,
    args: &RunArgs,
    fan_out: &FanOutArgs,
    history: &HistoryArgs,
    mode: Mode,
    keep_days: Option<u32>,
    monitor: &MonitorArgs,
) -> anyhow::Result<Plan> {
    Ok(Plan {
        namespace: args.target.namespace.clone(),
        tables: Tables::parse(&args.target.table)?,
        mode,
        target: target_spec(args.target.connection_string.as_deref(), args.target.dir.as_deref())?,
        fan_out: super::replicate::parse_targets(&fan_out.replicate_to, "--replicate-to")?,
        fan_out_history: if fan_out.replicate_with_history { HistoryCopy::Carry } else { HistoryCopy::Leave },
        temp_dir: args.load.temp_dir.clone(),
        sink: SinkOptions { history: history.choice(), ..args.sink_options(ctx) },
        attempts: ctx.client.retry.attempts,
        keep_days,
        metrics_file: monitor.metrics_file.clone(),
    })
}

pub(super) async fn run(
    ctx: &Context,
    args: RunArgs,
    fan_out: FanOutArgs,
    history: HistoryArgs,
    mode: Mode,
    keep_days: Option<u32>,
    monitor: MonitorArgs,
) -> anyhow::Result<()> {
    let plan = plan(ctx, &args, &fan_out, &history, mode, keep_days, &monitor)?;
    let client = Client::new(ctx.client.clone())?;
    let json = args.target.json;
    let progress = Progress::new(ctx.interactive && !json);
    let report = crate::run::run(client, &plan, &progress).await?;
    std::mem::drop(progress);
    let Some(fanned) = &report.replicate else {
        if json {
            super::print_json(&report.tables)?;
        }
        return super::finish(ctx.console, report.command, &report.tables);
    };
    if json {
        super::print_json(&report)?;
    }
    let own = super::finish(ctx.console, report.command, &report.tables);
    let fanned = super::replicate::finish(ctx.console, fanned);
    own.and(fanned)
}

pub async fn initdb(ctx: &Context, args: InitArgs) -> anyhow::Result<()> {
    let init = if args.replace { Init::Replace } else { Init::Fresh };
    run(ctx, args.db, args.fan_out, args.history, Mode::Init(init), None, args.monitor).await
}

pub async fn syncdb(ctx: &Context, args: SyncArgs) -> anyhow::Result<()> {
    let reinit = if args.auto_reinit { Reinit::Automatically } else { Reinit::Stop };
    let missing = if args.init_missing { Missing::Initialise } else { Missing::Skip };
    run(ctx, args.db, args.fan_out, args.history, Mode::Sync { reinit, missing }, args.keep_days, args.monitor).await
}

pub async fn drop(ctx: &Context, args: DbArgs) -> anyhow::Result<()> {
    let spec = target_spec(args.connection_string.as_deref(), args.dir.as_deref())?;
    let tables = Tables::parse(&args.table)?;
    let options = SinkOptions { shared: ctx.shared, lock_timeout: args.lock_timeout, ..SinkOptions::default() };
    let file = spec.local_file(&args.namespace)?;
    let size = |file: Option<&PathBuf>| file.and_then(|f| std::fs::metadata(f).ok()).map(|m| m.len());
    let size_before = size(file.as_ref());
    let progress = Progress::new(ctx.interactive && !args.json);
    let outcomes = crate::run::drop_tables(&spec, &args.namespace, &tables, &options, &progress).await?;
    std::mem::drop(progress);
    if let (Some(before), Some(after)) = (size_before, size(file.as_ref()))
        && outcomes.iter().any(|o| matches!(o.outcome, Outcome::Succeeded { .. }))
    {
        tracing::info!(
            "{}: {:.1} MB given back ({:.1} MB now)",
            spec.describe(),
            before.saturating_sub(after) as f64 / 1e6,
            after as f64 / 1e6
        );
    }
    let outcomes: Vec<per_table::TableOutcome<serde_json::Value>> = outcomes
        .into_iter()
        .map(|o| per_table::TableOutcome {
            table: o.table,
            outcome: match o.outcome {
                Outcome::Succeeded { result } => Outcome::Succeeded { result: json!({ "rows": result }) },
                Outcome::Failed { error } => Outcome::Failed { error },
                Outcome::Skipped { reason } => Outcome::Skipped { reason },
            },
        })
        .collect();
    if args.json {
        super::print_json(&outcomes)?;
    }
    super::finish(ctx.console, "dropdb", &outcomes)
}

/// A watermark as the official client's `listdb` shows it: in the machine's time zone, Python's
/// `isoformat` (`2024-05-02T00:00:03+00:00`, six fraction digits when there is a fraction).
fn local_isoformat(watermark: time::Micros) -> String {
    let Some(t) = chrono::DateTime::from_timestamp_micros(watermark) else { return time::format_wire(watermark) };
    let local = t.with_timezone(&chrono::Local);
    if watermark.rem_euclid(1_000_000) == 0 {
        local.format("%Y-%m-%dT%H:%M:%S%:z").to_string()
    } else {
        local.format("%Y-%m-%dT%H:%M:%S%.6f%:z").to_string()
    }
}

/// The tables of a namespace with their replication state, as the official client lists them:
/// the replicated ones by name, then the others the server has.
pub async fn listdb(ctx: &Context, args: ListDbArgs) -> anyhow::Result<()> {
    let spec = target_spec(args.connection_string.as_deref(), args.dir.as_deref())?;
    let options = SinkOptions { access: Access::Read, shared: ctx.shared, ..SinkOptions::default() };
    let sink = target::open(&spec, &args.namespace, &options).await?;
    let local = sink.all_bookkeeping(&args.namespace).await?;
    let mut names: Vec<String> = local.iter().map(|b| b.table.clone()).collect();
    names.sort();
    if !args.omit_not_replicated && !ctx.client.has_credentials() {
        // Offline: what the target holds is listed from its own bookkeeping.
        tracing::warn!(
            "no DAP credentials: listing the tables this target holds only (DAP lists the others once `dap configure` has run; --omit-not-replicated lists these alone without this note)"
        );
    } else if !args.omit_not_replicated {
        let mut others: Vec<String> = Client::new(ctx.client.clone())?
            .tables(&args.namespace)
            .await?
            .into_iter()
            .filter(|t| !names.contains(t))
            .collect();
        others.sort();
        names.extend(others);
    }
    let now = time::now();
    let mut rows = Vec::new();
    for name in names {
        let b = local.iter().find(|b| b.table == name);
        let mut row = json!({
            "name": name,
            "timestamp": b.map(|b| local_isoformat(b.watermark)),
            "staleness": b.map(|b| staleness((now - b.watermark) / 1_000_000)),
            "schema": b.map(|b| b.schema_version),
            "command": if b.is_some() { "syncdb" } else { "initdb" },
        });
        if !args.omit_record_count {
            row["records"] = match b {
                Some(_) => json!(sink.row_count(&args.namespace, &name).await?),
                None => json!(null),
            };
        }
        rows.push(row);
    }
    if ctx.interactive && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        print!("{}", listdb_table(&args.namespace, &rows, !args.omit_record_count));
    } else {
        println!("{}", crate::pyjson::to_string_indent2(&rows)?);
    }
    Ok(())
}

/// `listdb` for a person at a terminal, as the official client draws it: a titled table of
/// name, records, data as of, staleness, schema and the command to run next.
fn listdb_table(namespace: &str, rows: &[serde_json::Value], with_records: bool) -> String {
    enum Align {
        Left,
        Right,
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut columns: Vec<(&str, Align, Vec<String>)> =
        vec![("Name", Align::Left, rows.iter().map(|r| text(&r["name"])).collect())];
    if with_records {
        columns.push(("Records", Align::Right, rows.iter().map(|r| text(&r["records"])).collect()));
    }
    let as_of = rows.iter().map(|r| r["timestamp"].as_str().unwrap_or("Not replicated").to_string()).collect();
    columns.push(("Data as of", Align::Left, as_of));
    columns.push(("Staleness", Align::Left, rows.iter().map(|r| text(&r["staleness"])).collect()));
    columns.push(("Schema", Align::Right, rows.iter().map(|r| text(&r["schema"])).collect()));
    columns.push(("Use command", Align::Left, rows.iter().map(|r| text(&r["command"])).collect()));
    let widths: Vec<usize> = columns
        .iter()
        .map(|(head, _, cells)| cells.iter().map(|c| c.chars().count()).chain([head.len()]).max().unwrap_or(0))
        .collect();
    let rule = |left: &str, fill: &str, join: &str, right: &str| {
        let parts: Vec<String> = widths.iter().map(|w| fill.repeat(w + 2)).collect();
        format!("{left}{}{right}\n", parts.join(join))
    };
    let line = |edge: &str, cells: Vec<(&str, &Align)>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|((cell, align), w)| match align {
                Align::Left => format!(" {cell:<w$} "),
                Align::Right => format!(" {cell:>w$} "),
            })
            .collect();
        format!("{edge}{}{edge}\n", parts.join(edge))
    };
    let title = format!("Local database replication status of tables in namespace {namespace}");
    let width = widths.iter().map(|w| w + 3).sum::<usize>() + 1;
    let mut out = format!("{title:^width$}\n");
    out.push_str(&rule("┏", "━", "┳", "┓"));
    out.push_str(&line("┃", columns.iter().map(|(head, _, _)| (*head, &Align::Left)).collect()));
    out.push_str(&rule("┡", "━", "╇", "┩"));
    for i in 0..rows.len() {
        out.push_str(&line("│", columns.iter().map(|(_, align, cells)| (cells[i].as_str(), align)).collect()));
    }
    out.push_str(&rule("└", "─", "┴", "┘"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_shown_current_behind_ahead_or_absent_with_its_lag() {
        let shown = |position: Position| {
            let j = position_json(&TargetStatus { target: "t".into(), position, history: None });
            (j["state"].as_str().unwrap().to_string(), j["lag"].clone(), j["lag_seconds"].clone())
        };
        assert_eq!(shown(Position::Current { watermark: 100_000_000 }), ("current".into(), json!("0s"), json!(0)));
        assert_eq!(
            shown(Position::Behind { watermark: 40_000_000, seconds: 60 }),
            ("behind".into(), json!("1m 0s"), json!(60))
        );
        assert_eq!(
            shown(Position::Ahead { watermark: 103_000_000, seconds: 3 }),
            ("ahead".into(), json!("-3s"), json!(-3))
        );
        assert_eq!(shown(Position::Absent), ("absent".into(), json!(null), json!(null)));
        let unreadable = shown(Position::Unreadable { error: "refused".into() });
        assert_eq!(unreadable, ("unreadable".into(), json!(null), json!(null)));
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One namespace (every namespace of the mirror when omitted).
    #[arg(long)]
    namespace: Option<String>,
    /// A database to show instead of the mirror: a connection string as initdb takes it.
    #[arg(long, env = "DAP_CONNECTION_STRING", hide_env_values = true)]
    connection_string: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// A mirror folder other than the default one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also show, per table, what this replication target holds and how far it lags behind the
    /// mirror (repeatable; DAP_REPLICATE_TO may hold a comma-separated list).
    #[arg(long = "to", env = "DAP_REPLICATE_TO", value_delimiter = ',', hide_env_values = true)]
    to: Vec<String>,
    /// For monitoring (Nagios-style checks): exit 3 when any table's data is older than this
    /// (6h, 90m, 1d), naming which; DAP refreshes about every 4 hours.
    #[arg(long, value_name = "DURATION", value_parser = super::parse_duration)]
    max_lag: Option<std::time::Duration>,
    /// List the newest N runs that wrote the mirror (10 when N is left out), instead of the tables:
    /// when each started and ended, the command, tables, rows, changes and how it ended.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "10")]
    runs: Option<u32>,
}

impl StatusArgs {
    /// The request these arguments make.
    fn request(&self, shared: crate::privacy::SharedFiles) -> anyhow::Result<StatusRequest> {
        let location = match &self.dir {
            Some(dir) => Location::Folder(dir.clone()),
            None => Location::Target(target_spec(self.connection_string.as_deref(), None)?),
        };
        let targets = self
            .to
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(|text| TargetSpec::parse(Some(text)).map_err(|e| anyhow::anyhow!("--to: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(StatusRequest { namespace: self.namespace.clone(), location, targets, shared })
    }
}

/// A target's position as `status --json` shows it.
fn position_json(t: &TargetStatus) -> serde_json::Value {
    // `lag` for people ("1m 0s", "-3s" when ahead), `lag_seconds` for scripts; both null when
    // there is no position to compare.
    let (lag, seconds) = match &t.position {
        Position::Absent => (None, None),
        Position::Current { .. } => (Some("0s".to_string()), Some(0)),
        Position::Ahead { seconds, .. } => (Some(format!("-{}", staleness(*seconds))), Some(-seconds)),
        Position::Behind { seconds, .. } => (Some(staleness(*seconds)), Some(*seconds)),
        Position::Unreadable { error } => {
            return json!({"target": t.target, "state": "unreadable", "error": error, "lag": null, "lag_seconds": null});
        }
    };
    json!({
        "target": t.target,
        "watermark": t.position.watermark().map(time::format_wire),
        "state": t.position.name(),
        "lag": lag,
        "lag_seconds": seconds,
        "history": t.history.as_ref().map(|h| json!({"state": h.name(), "latest": h.latest().map(time::format_wire)})),
    })
}

/// Per table: rows, schema version, watermark, staleness, last run and its result.
pub async fn status(ctx: &Context, args: StatusArgs) -> anyhow::Result<()> {
    if let Some(n) = args.runs {
        return print_runs(&args, n);
    }
    let request = args.request(ctx.shared)?;
    let report = crate::status::status(&request).await?;
    let interrupted = crate::status::interrupted(&request).await?;
    print_status(&report, &interrupted, if args.json { Output::Json } else { Output::Text })?;
    let stale = args.max_lag.map(|max| stale_tables(&report, max)).transpose();
    // A target that could not be read is said once, and the exit says it.
    let mut unreadable: Vec<(&str, &str)> = Vec::new();
    for t in report.iter().flat_map(|r| &r.targets) {
        if let Position::Unreadable { error } = &t.position
            && !unreadable.iter().any(|(name, _)| *name == t.target)
        {
            unreadable.push((&t.target, error));
        }
    }
    if unreadable.is_empty() {
        return stale.map(|_| ());
    }
    // A target's own error usually names it already.
    let lines: Vec<String> =
        unreadable.iter().map(|(t, e)| if e.starts_with(t) { e.to_string() } else { format!("{t}: {e}") }).collect();
    anyhow::bail!(
        "status --to: {} of {} targets could not be read:\n  {}",
        unreadable.len(),
        args.to.iter().filter(|t| !t.trim().is_empty()).count(),
        crate::secrets::scrub(&lines.join("\n  "))
    )
}

/// `status --runs N`: the newest runs of each namespace file of the mirror, newest first.
fn print_runs(args: &StatusArgs, n: u32) -> anyhow::Result<()> {
    let folder = match (&args.dir, args.connection_string.as_deref()) {
        (Some(dir), _) => dir.clone(),
        (None, None) => crate::mirror::folder::default_dir()?,
        (None, Some(url)) => match TargetSpec::parse(Some(url))?.local_file(args.namespace.as_deref().unwrap_or(""))? {
            Some(file) => file.parent().map(PathBuf::from).unwrap_or_default(),
            None => {
                return Err(super::UsageError(
                    "--runs lists the runs a mirror file records; a server target keeps none (see its table_sync)"
                        .into(),
                )
                .into());
            }
        },
    };
    let files: Vec<(String, PathBuf)> = crate::mirror::folder::namespace_files(&folder)?
        .into_iter()
        .filter(|(ns, _)| args.namespace.as_ref().is_none_or(|want| want == ns))
        .collect();
    let mut runs = Vec::new();
    for (ns, file) in &files {
        let newest = crate::mirror::runs::newest(file, n)
            .map_err(|e| anyhow::anyhow!("{}: reading its record of runs: {e}", file.display()))?;
        runs.extend(newest.into_iter().map(|r| (ns.clone(), r)));
    }
    runs.sort_by(|a, b| b.1.started.cmp(&a.1.started));
    if args.json {
        let rows: Vec<serde_json::Value> = runs
            .iter()
            .map(|(ns, r)| {
                let mut v = serde_json::to_value(r).expect("a run serialises");
                v["namespace"] = json!(ns);
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if runs.is_empty() {
        println!("No runs are recorded in {} yet.", folder.display());
        return Ok(());
    }
    for (ns, r) in &runs {
        let took = match (time::parse_rfc3339(&r.started), r.ended.as_deref().map(time::parse_rfc3339)) {
            (Ok(a), Some(Ok(b))) => crate::status::staleness((b - a) / time::MICROS_PER_SECOND),
            (_, None) => "-".into(),
            _ => "?".into(),
        };
        let changes = r.changes.map_or(String::new(), |c| format!(", {c} changes"));
        let outcome = match (&r.result, &r.error) {
            (crate::mirror::runs::RunResult::Failed, Some(e)) => format!("failed: {e}"),
            (crate::mirror::runs::RunResult::Interrupted, _) => {
                "interrupted (its process is gone; each table is as its last commit left it)".into()
            }
            _ => format!("{:?}", r.result).to_lowercase(),
        };
        let command = match &r.profile {
            Some(profile) => format!("{} (profile {profile})", r.command),
            None => r.command.clone(),
        };
        // Text from a file is shown, never obeyed by the terminal.
        println!(
            "{}",
            crate::term::safe(&format!(
                "{}  {took:>7}  {ns}  {command}  [{}]  {} rows{changes}  {outcome}",
                r.started, r.tables, r.rows
            ))
        );
    }
    Ok(())
}

/// `status --max-lag`: an error ([`super::Stale`], exit 3) naming every table whose data is older
/// than `max`, with its age and how its last run ended.
fn stale_tables(report: &[TableStatus], max: std::time::Duration) -> anyhow::Result<()> {
    let limit = max.as_secs() as i64;
    let stale: Vec<String> = report
        .iter()
        .filter(|t| t.staleness_seconds > limit)
        .map(|t| {
            let last = match (&t.last_run, t.last_result.as_deref()) {
                (Some(at), Some("ok")) => format!("; last run {at} succeeded"),
                (Some(at), Some(error)) => format!("; last run {at} failed: {error}"),
                _ => String::new(),
            };
            format!("{}.{}: data {} old{last}", t.namespace, t.table, crate::status::staleness(t.staleness_seconds))
        })
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    Err(super::Stale(format!(
        "{} of {} tables are older than {}:\n  {}",
        stale.len(),
        report.len(),
        crate::status::staleness(limit),
        stale.join("\n  ")
    ))
    .into())
}

/// How `status` prints its report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Output {
    Text,
    Json,
}

/// Prints a status report as a table, or as JSON for scripts.
pub(super) fn print_status(
    report: &[TableStatus],
    interrupted: &[crate::status::Interrupted],
    output: Output,
) -> anyhow::Result<()> {
    let resume = |i: &crate::status::Interrupted| {
        crate::term::command(&["initdb", "--namespace", &i.namespace, "--table", &i.table])
    };
    let mut rows: Vec<serde_json::Value> = report
        .iter()
        .map(|t| {
            json!({
                "state": "mirrored",
                "targets": t.targets.iter().map(position_json).collect::<Vec<_>>(),
                "namespace": t.namespace,
                "table": t.table,
                "rows": t.rows,
                "schema_version": t.schema_version,
                "watermark": time::format_wire(t.watermark),
                "staleness": staleness(t.staleness_seconds),
                "staleness_seconds": t.staleness_seconds,
                "last_command": t.last_command,
                "last_run": t.last_run,
                "last_result": t.last_result,
                "last_success": t.last_success,
                "file": t.file,
                "history": t.history.as_ref().map(|h| json!({"since": h.since, "versions": h.versions, "bytes": h.bytes, "days": h.days})),
                "archive": t.archive.as_ref().map(|a| json!({
                    "oldest": a.oldest,
                    "newest": a.newest,
                    "gaps": a.gaps.iter().map(|(after, before)| json!({"after": after, "before": before})).collect::<Vec<_>>(),
                })),
            })
        })
        .collect();
    if output == Output::Json {
        rows.extend(interrupted.iter().map(|i| {
            json!({
                "state": "initdb interrupted",
                "namespace": i.namespace,
                "table": i.table,
                "objects_loaded": i.objects,
                "watermark": null,
                "resume": resume(i),
            })
        }));
        super::print_json(&rows)?;
        return Ok(());
    }
    for i in interrupted {
        println!(
            "{}: initdb interrupted with {} objects loaded; `{}` resumes it where it stopped",
            crate::term::safe(&format!("{}.{}", i.namespace, i.table)),
            i.objects,
            resume(i)
        );
    }
    if rows.is_empty() {
        if interrupted.is_empty() {
            println!("No tables are mirrored yet; start with `dap initdb --namespace canvas --table <tables>`.");
        }
        return Ok(());
    }
    println!(
        "{:<36} {:>10} {:>6}  {:<28} {:>10}  last result",
        "table", "rows", "schema", "watermark (UTC)", "staleness"
    );
    // Text from files (a state file someone else wrote) is shown, never obeyed by the terminal.
    let text = |v: &serde_json::Value, default: &str| crate::term::safe(v.as_str().unwrap_or(default)).into_owned();
    for r in &rows {
        println!(
            "{:<36} {:>10} {:>6}  {:<28} {:>10}  {}",
            crate::term::safe(&format!(
                "{}.{}",
                r["namespace"].as_str().unwrap_or_default(),
                r["table"].as_str().unwrap_or_default()
            )),
            r["rows"].to_string(),
            r["schema_version"].to_string(),
            text(&r["watermark"], ""),
            text(&r["staleness"], ""),
            text(&r["last_result"], "-"),
        );
        if let Some(h) = r["history"].as_object() {
            let kept = h["days"]
                .as_u64()
                .map_or("every version kept".to_string(), |d| format!("ended versions kept {d} days"));
            let megabytes = h["bytes"].as_u64().unwrap_or(0) as f64 / 1e6;
            println!(
                "  history since {}: {} versions, {megabytes:.1} MB beside the table, {kept}",
                text(&h["since"], ""),
                h["versions"]
            );
        }
        if let Some(a) = r["archive"].as_object() {
            println!(
                "  logs from {} to {} (DAP keeps {} days; the mirror keeps every log it fetched)",
                text(&a["oldest"], "-"),
                text(&a["newest"], "-"),
                crate::schema::APPEND_ONLY_WINDOW_DAYS
            );
            for g in a["gaps"].as_array().into_iter().flatten() {
                println!(
                    "  gap: no logs between {} and {}: the mirror was not synced within DAP's window",
                    text(&g["after"], ""),
                    text(&g["before"], "the snapshot that follows")
                );
            }
        }
        for t in r["targets"].as_array().into_iter().flatten() {
            println!(
                "  → {:<60} {:<8} {:<28} lag {}",
                text(&t["target"], ""),
                text(&t["state"], ""),
                text(&t["watermark"], "-"),
                crate::term::safe(t["lag"].as_str().unwrap_or("-"))
            );
            if let Some(h) = t["history"].as_object() {
                let latest = text(&h["latest"], "-");
                println!(
                    "    history copy: {}",
                    match h["state"].as_str().unwrap_or_default() {
                        "absent" => "none (`dap replicate --with-history` makes it)".to_string(),
                        "behind" => format!(
                            "behind, latest change {latest} (the next `replicate --with-history` carries the rest)"
                        ),
                        state => format!("{state}, latest change {latest}"),
                    }
                );
            }
        }
    }
    Ok(())
}
