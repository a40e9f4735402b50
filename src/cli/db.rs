//! `initdb`, `syncdb`, `dropdb`, `listdb` and `status` on any target: the default SQLite mirror,
//! a `sqlite://` file, or a server named by its connection string.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde_json::json;

use super::Context;
use crate::api::Client;
use crate::mirror::folder::StateFile;
use crate::per_table::{self, Outcome};
use crate::progress::Progress;
use crate::run::{Missing, Mode, Plan, Tables};
use crate::sink::{Access, ConnectionString, NonFinite, Sink, SinkOptions};
use crate::sync::{Init, Reinit};
use crate::target::{self, TargetSpec};
use crate::time;

#[derive(Debug, Args)]
pub struct DbArgs {
    /// Namespace, e.g. canvas, canvas_logs, catalog.
    #[arg(long)]
    pub(super) namespace: String,
    /// `all`, or a comma-separated list of tables.
    #[arg(long)]
    pub(super) table: String,
    /// The target: postgresql://user:password@host:port/database[?ssl=MODE], sqlite:///ABS/PATH.db
    /// or sqlite://REL/PATH.db; the default mirror when omitted.
    #[arg(long, env = "DAP_CONNECTION_STRING", hide_env_values = true)]
    pub(super) connection_string: Option<String>,
    /// Print a machine-readable result per table on stdout.
    #[arg(long)]
    pub(super) json: bool,
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
    /// How long to wait for another process writing the same table (or mirror file) to finish,
    /// e.g. 90s, 10m or 2h; then that table is left alone with a message saying who holds it.
    #[arg(long, value_parser = super::parse_duration, default_value = "10m")]
    pub(super) lock_timeout: std::time::Duration,
}

/// The fan-out of initdb and syncdb on the mirror.
#[derive(Debug, Default, Args)]
pub struct FanOutArgs {
    /// After the run, replicate its tables from the mirror to this database (repeatable):
    /// postgresql://…, mysql://…, mssql://… or sqlite:///PATH.db.
    #[arg(long = "replicate-to")]
    replicate_to: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    fan_out: FanOutArgs,
    /// Load an initialised table again; the old data stays queryable until the swap.
    #[arg(long)]
    replace: bool,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    fan_out: FanOutArgs,
    /// When the server needs a new snapshot of a table, take it (atomically) instead of stopping.
    #[arg(long)]
    auto_reinit: bool,
    /// Also initialise tables the server has and the target lacks ("sync, else init").
    #[arg(long)]
    init_missing: bool,
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
    /// Only tables present in the database.
    #[arg(long)]
    omit_not_replicated: bool,
    /// Skip counting rows.
    #[arg(long)]
    omit_record_count: bool,
}

fn target_spec(connection_string: Option<&str>) -> anyhow::Result<TargetSpec> {
    Ok(TargetSpec::parse(connection_string)?)
}

impl DbArgs {
    /// The target's options for a writing run.
    fn sink_options(&self, ctx: &Context) -> SinkOptions {
        SinkOptions {
            access: Access::Write,
            parallelism: self.parallel_tables.max(1),
            non_finite: self.non_finite,
            shared: ctx.shared,
            lock_timeout: self.lock_timeout,
        }
    }
}

pub(super) async fn run(ctx: &Context, args: DbArgs, fan_out: FanOutArgs, mode: Mode) -> anyhow::Result<()> {
    let plan = Plan {
        namespace: args.namespace.clone(),
        tables: Tables::parse(&args.table)?,
        mode,
        target: target_spec(args.connection_string.as_deref())?,
        fan_out: super::replicate::parse_targets(&fan_out.replicate_to, "--replicate-to")?,
        temp_dir: args.temp_dir.clone(),
        sink: args.sink_options(ctx),
        attempts: ctx.client.retry.attempts,
    };
    let client = Client::new(ctx.client.clone())?;
    let progress = Progress::new(ctx.interactive && !args.json);
    let report = crate::run::run(client, &plan, &progress).await?;
    std::mem::drop(progress);
    let Some(fanned) = &report.replicate else {
        if args.json {
            super::print_json(&report.tables)?;
        }
        return super::finish(ctx.console, report.command, &report.tables);
    };
    if args.json {
        super::print_json(&report)?;
    }
    let own = super::finish(ctx.console, report.command, &report.tables);
    let fanned = super::replicate::finish(ctx.console, fanned);
    own.and(fanned)
}

pub async fn initdb(ctx: &Context, args: InitArgs) -> anyhow::Result<()> {
    let init = if args.replace { Init::Replace } else { Init::Fresh };
    run(ctx, args.db, args.fan_out, Mode::Init(init)).await
}

pub async fn syncdb(ctx: &Context, args: SyncArgs) -> anyhow::Result<()> {
    let reinit = if args.auto_reinit { Reinit::Automatically } else { Reinit::Stop };
    let missing = if args.init_missing { Missing::Initialise } else { Missing::Skip };
    run(ctx, args.db, args.fan_out, Mode::Sync { reinit, missing }).await
}

pub async fn drop(ctx: &Context, args: DbArgs) -> anyhow::Result<()> {
    let spec = target_spec(args.connection_string.as_deref())?;
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

/// `Xd Yh`, `Xh Ym`, `Xm Ys` or `Xs`, as the official client prints staleness.
fn staleness(secs: i64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
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
    let spec = target_spec(args.connection_string.as_deref())?;
    let options = SinkOptions { access: Access::Read, shared: ctx.shared, ..SinkOptions::default() };
    let sink = target::open(&spec, &args.namespace, &options).await?;
    let local = sink.all_bookkeeping(&args.namespace).await?;
    let mut names: Vec<String> = local.iter().map(|b| b.table.clone()).collect();
    names.sort();
    if !args.omit_not_replicated {
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
    fn a_target_is_current_behind_ahead_or_absent() {
        assert_eq!(target_position(100_000_000, Some(100_000_000)), ("current", "0s".into()));
        assert_eq!(target_position(100_000_000, Some(40_000_000)), ("behind", "1m 0s".into()));
        assert_eq!(target_position(100_000_000, Some(103_000_000)), ("ahead", "-3s".into()));
        assert_eq!(target_position(100_000_000, None), ("absent", "-".into()));
    }

    #[test]
    fn staleness_like_the_official_client() {
        assert_eq!(staleness(42), "42s");
        assert_eq!(staleness(125), "2m 5s");
        assert_eq!(staleness(3 * 3600 + 60), "3h 1m");
        assert_eq!(staleness(934 * 86_400 + 11 * 3600), "934d 11h");
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
}

impl StatusArgs {
    /// Every namespace file in `dir`.
    pub(super) fn for_dir(dir: &Path) -> StatusArgs {
        StatusArgs {
            namespace: None,
            connection_string: None,
            json: false,
            dir: Some(dir.to_path_buf()),
            to: Vec::new(),
        }
    }
}

/// Where a replication target stands for a table, against the mirror's watermark.
fn target_position(mirror: time::Micros, target: Option<time::Micros>) -> (&'static str, String) {
    match target {
        None => ("absent", "-".into()),
        Some(t) if t == mirror => ("current", "0s".into()),
        Some(t) if t > mirror => ("ahead", format!("-{}", staleness((t - mirror) / 1_000_000))),
        Some(t) => ("behind", staleness((mirror - t) / 1_000_000)),
    }
}

/// The namespaces `status` looks at: the one asked for, or every mirror file's.
fn status_namespaces(args: &StatusArgs) -> anyhow::Result<Vec<String>> {
    if let Some(ns) = &args.namespace {
        return Ok(vec![ns.clone()]);
    }
    if args.connection_string.as_deref().is_some_and(|s| !s.is_empty()) {
        return Ok(["canvas", "canvas_logs", "catalog", "new_quizzes"].map(String::from).to_vec());
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => crate::mirror::folder::default_dir()?,
    };
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".db")).map(String::from))
        .collect();
    names.sort();
    Ok(names)
}

/// Per table: rows, schema version, watermark, staleness, last run and its result.
pub async fn status(ctx: &Context, args: StatusArgs) -> anyhow::Result<()> {
    let now = time::now();
    let mut rows = Vec::new();
    let spec = match &args.dir {
        Some(_) => TargetSpec::DefaultMirror,
        None => target_spec(args.connection_string.as_deref())?,
    };
    let options = SinkOptions { access: Access::Read, shared: ctx.shared, ..SinkOptions::default() };
    for ns in status_namespaces(&args)? {
        let local = match &args.dir {
            Some(d) => Some(d.join(format!("{ns}.db"))),
            None => spec.local_file(&ns)?,
        };
        if local.as_ref().is_some_and(|p| !p.exists()) {
            continue;
        }
        let sink: Arc<dyn Sink> = match &local {
            Some(path) => target::open(&TargetSpec::Url(ConnectionString::sqlite(path)), &ns, &options).await?,
            None => target::open(&spec, &ns, &options).await?,
        };
        let state = local.as_ref().map(|p| StateFile::load(&StateFile::path_for(p))).unwrap_or_default();
        let file = sink.describe();
        // The replication targets' positions: a target that cannot be read is shown as such.
        let mut targets = Vec::new();
        for text in args.to.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            let spec = TargetSpec::parse(Some(text)).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            let read = match target::open(&spec, &ns, &options).await {
                Ok(target) => target.all_bookkeeping(&ns).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            targets.push((spec.describe(), read));
        }
        for b in sink.all_bookkeeping(&ns).await? {
            let entry = local.as_ref().and_then(|db| state.entry(db, &ns, &b.table));
            let positions: Vec<serde_json::Value> = targets
                .iter()
                .map(|(target, read)| match read {
                    Ok(rows) => {
                        let at = rows.iter().find(|t| t.table == b.table).map(|t| t.watermark);
                        let (state, lag) = target_position(b.watermark, at);
                        json!({"target": target, "watermark": at.map(time::format_wire), "state": state, "lag": lag})
                    }
                    Err(e) => json!({"target": target, "state": "unreadable", "error": e}),
                })
                .collect();
            rows.push(json!({
                "targets": positions,
                "namespace": ns,
                "table": b.table,
                "rows": sink.row_count(&ns, &b.table).await?,
                "schema_version": b.schema_version,
                "watermark": time::format_wire(b.watermark),
                "staleness": staleness((now - b.watermark) / 1_000_000),
                "last_command": entry.and_then(|e| e.last_command.clone()),
                "last_run": entry.and_then(|e| e.last_run.clone()),
                "last_result": entry.and_then(|e| e.last_result.clone()),
                "file": file,
            }));
        }
    }
    if args.json {
        super::print_json(&rows)?;
        return Ok(());
    }
    if rows.is_empty() {
        println!("No tables are mirrored yet; start with `dap initdb --namespace canvas --table <tables>`.");
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
        for t in r["targets"].as_array().into_iter().flatten() {
            println!(
                "  → {:<60} {:<8} {:<28} lag {}",
                text(&t["target"], ""),
                text(&t["state"], ""),
                text(&t["watermark"], "-"),
                crate::term::safe(t["lag"].as_str().or(t["error"].as_str()).unwrap_or("-"))
            );
        }
    }
    Ok(())
}
