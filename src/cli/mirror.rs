//! `initdb`, `syncdb`, `dropdb` and `listdb` on the SQLite mirror.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::json;

use super::Context;
use crate::api::Client;
use crate::sink::Sink;
use crate::sink::sqlite::SqliteSink;
use crate::state::{StateFile, WriterLock};
use crate::sync::{Replicator, dropdb};
use crate::tables::{self, Outcome};
use crate::time;

#[derive(Debug, Args)]
pub struct DbArgs {
    #[arg(long)]
    pub(super) namespace: String,
    /// `all`, or a comma-separated list of tables.
    #[arg(long)]
    pub(super) table: String,
    /// `sqlite:///ABS/PATH.db` or `sqlite://REL/PATH.db`; the default mirror when omitted.
    #[arg(long, env = "DAP_CONNECTION_STRING", hide_env_values = true)]
    pub(super) connection_string: Option<String>,
    /// Print a machine-readable result per table on stdout.
    #[arg(long)]
    pub(super) json: bool,
    /// Tables that download at once (loading into one file is serialised). Jobs for up to 32
    /// tables are requested and waited on together, as fast as the job rate allows.
    #[arg(long, default_value_t = 4)]
    pub(super) parallel_tables: usize,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Load an initialised table again; the old data stays queryable until the swap.
    #[arg(long)]
    replace: bool,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    db: DbArgs,
    /// When the server needs a new snapshot of a table, take it (atomically) instead of stopping.
    #[arg(long)]
    auto_reinit: bool,
    /// Also initialise tables the server has and the mirror lacks ("sync, else init").
    #[arg(long)]
    init_missing: bool,
}

#[derive(Debug, Args)]
pub struct ListDbArgs {
    #[arg(long)]
    namespace: String,
    #[arg(long, env = "DAP_CONNECTION_STRING", hide_env_values = true)]
    connection_string: Option<String>,
    /// Only tables present in the database.
    #[arg(long)]
    omit_not_replicated: bool,
    /// Skip counting rows.
    #[arg(long)]
    omit_record_count: bool,
}

/// The mirror file for a namespace: the default mirror holds one file per namespace.
pub(super) fn mirror_file(connection_string: Option<&str>, namespace: &str) -> anyhow::Result<PathBuf> {
    match connection_string.filter(|s| !s.is_empty()) {
        None => {
            let dir = match std::env::var_os("DAP_MIRROR_DIR") {
                Some(d) => PathBuf::from(d),
                None => directories::ProjectDirs::from("", "", "dap-replica")
                    .context(
                        "no home directory to keep the default mirror in; pass --connection-string sqlite:///PATH.db",
                    )?
                    .data_dir()
                    .to_path_buf(),
            };
            Ok(dir.join(format!("{}.db", crate::fetch::safe_component(namespace))))
        }
        Some(s) => match s.split_once("://") {
            Some(("sqlite", rest)) if !rest.is_empty() => Ok(PathBuf::from(rest)),
            Some((scheme, _)) => bail!(
                "{scheme}:// targets are not supported yet; use sqlite:///ABS/PATH.db, sqlite://REL/PATH.db or the default mirror"
            ),
            None => bail!("invalid connection string (expected e.g. sqlite:///data/canvas.db)"),
        },
    }
}

fn open(connection_string: Option<&str>, namespace: &str) -> anyhow::Result<(PathBuf, SqliteSink)> {
    let path = mirror_file(connection_string, namespace)?;
    let sink = SqliteSink::open(&path).with_context(|| format!("opening the mirror {}", path.display()))?;
    Ok((path, sink))
}

/// Rewrites `state.json` for `namespace` from the database (plus one table's run, if given).
fn save_state(
    state: &mut StateFile,
    db: &Path,
    namespace: &str,
    bookkeeping: &[crate::sink::Bookkeeping],
    rows: &BTreeMap<String, u64>,
) {
    state.reconcile(namespace, db, bookkeeping, rows);
    if let Err(e) = state.save(&StateFile::path_for(db)) {
        tracing::warn!("could not write the state file: {e}");
    }
}

/// Removes spool folders that an interrupted run left behind.
fn clear_spool(spool: &Path) {
    if let Ok(entries) = std::fs::read_dir(spool) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// What a run does to each table.
#[derive(Clone, Copy)]
pub(super) enum Mode {
    Init { replace: bool },
    Sync { auto_reinit: bool, init_missing: bool },
}

pub(super) async fn replicate(ctx: &Context, args: DbArgs, mode: Mode) -> anyhow::Result<()> {
    let command = if matches!(mode, Mode::Init { .. }) { "initdb" } else { "syncdb" };
    let path = mirror_file(args.connection_string.as_deref(), &args.namespace)?;
    let _lock = WriterLock::acquire(&path)?;
    let (_, mut sink) = open(args.connection_string.as_deref(), &args.namespace)?;
    let ns = args.namespace.clone();
    let state = Mutex::new(StateFile::load(&StateFile::path_for(&path)));
    save_state(&mut state.lock().expect("state lock"), &path, &ns, &sink.all_bookkeeping(&ns)?, &BTreeMap::new());
    let client = Client::new(ctx.client.clone())?;
    let local: Vec<String> = sink.all_bookkeeping(&ns)?.into_iter().map(|b| b.table).collect();
    let tables = match (tables::parse_selection(&args.table), mode) {
        (Some(list), _) if list.is_empty() => bail!("--table names no table"),
        (Some(list), _) => list,
        (None, Mode::Init { .. } | Mode::Sync { init_missing: true, .. }) => {
            let mut all = local.clone();
            all.extend(client.tables(&ns).await?.into_iter().filter(|t| !local.contains(t)));
            all
        }
        (None, Mode::Sync { .. }) => local.clone(),
    };
    let spool = path.parent().map(|p| p.join(".dap-spool")).unwrap_or_else(|| PathBuf::from(".dap-spool"));
    clear_spool(&spool);
    let auto_reinit = matches!(mode, Mode::Sync { auto_reinit: true, .. });
    let replicator = Replicator {
        client,
        sink: Arc::new(Mutex::new(sink)),
        spool,
        download_concurrency: 4,
        transfers: tokio::sync::Semaphore::new(args.parallel_tables.max(1)),
        auto_reinit,
    };
    let outcomes = tables::run_each(&tables, tables::JOBS_IN_FLIGHT, |t| {
        let (r, ns, path, state, local) = (&replicator, &ns, &path, &state, &local);
        async move {
            let report = match mode {
                Mode::Init { replace } => r.initdb(ns, &t, replace).await,
                Mode::Sync { init_missing: true, .. } if !local.contains(&t) => r.initdb(ns, &t, false).await,
                Mode::Sync { .. } => r.syncdb(ns, &t).await,
            };
            match &report {
                Ok(rep) => tracing::info!("{t}: {command} done, {} rows, watermark {}", rep.rows, rep.watermark),
                Err(e) => tracing::warn!("{t}: {e}"),
            }
            let (n, table) = (ns.clone(), t.clone());
            let now = r.blocking(move |s| Ok((s.all_bookkeeping(&n)?, s.row_count(&n, &table).ok()))).await;
            if let Ok((bookkeeping, rows)) = now {
                let mut st = state.lock().expect("state lock");
                let result = report.as_ref().map(|_| ()).map_err(|e| e.to_string());
                st.record_run(ns, &t, path, command, report.as_ref().ok().map(|r| r.job_id.as_str()), result);
                save_state(
                    &mut st,
                    path,
                    ns,
                    &bookkeeping,
                    &rows.map(|n| BTreeMap::from([(t.clone(), n)])).unwrap_or_default(),
                );
            }
            report
        }
    })
    .await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    }
    super::export::finish(command, &outcomes)
}

pub async fn initdb(ctx: &Context, args: InitArgs) -> anyhow::Result<()> {
    replicate(ctx, args.db, Mode::Init { replace: args.replace }).await
}

pub async fn syncdb(ctx: &Context, args: SyncArgs) -> anyhow::Result<()> {
    replicate(ctx, args.db, Mode::Sync { auto_reinit: args.auto_reinit, init_missing: args.init_missing }).await
}

pub async fn drop(args: DbArgs) -> anyhow::Result<()> {
    let path = mirror_file(args.connection_string.as_deref(), &args.namespace)?;
    let _lock = WriterLock::acquire(&path)?;
    let (_, mut sink) = open(args.connection_string.as_deref(), &args.namespace)?;
    let tables = match tables::parse_selection(&args.table) {
        Some(list) => list,
        None => sink.all_bookkeeping(&args.namespace)?.into_iter().map(|b| b.table).collect(),
    };
    let outcomes: Vec<_> = tables
        .into_iter()
        .map(|t| {
            let outcome = match dropdb(&mut sink, &args.namespace, &t) {
                Ok(()) => Outcome::Succeeded { result: json!({}) },
                Err(e) => Outcome::Failed { error: e.to_string() },
            };
            tables::TableOutcome { table: t, outcome }
        })
        .collect();
    let mut state = StateFile::load(&StateFile::path_for(&path));
    save_state(&mut state, &path, &args.namespace, &sink.all_bookkeeping(&args.namespace)?, &BTreeMap::new());
    super::export::finish("dropdb", &outcomes)
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

pub async fn listdb(ctx: &Context, args: ListDbArgs) -> anyhow::Result<()> {
    let (_, mut sink) = open(args.connection_string.as_deref(), &args.namespace)?;
    let local = sink.all_bookkeeping(&args.namespace)?;
    let mut names: Vec<String> = local.iter().map(|b| b.table.clone()).collect();
    if !args.omit_not_replicated {
        names.extend(Client::new(ctx.client.clone())?.tables(&args.namespace).await?);
    }
    names.sort();
    names.dedup();
    let now = time::now();
    let mut rows = Vec::new();
    for name in names {
        let b = local.iter().find(|b| b.table == name);
        let mut row = json!({
            "name": name,
            "timestamp": b.map(|b| time::format_wire(b.watermark)),
            "staleness": b.map(|b| staleness((now - b.watermark) / 1_000_000)),
            "schema": b.map(|b| b.schema_version),
            "command": if b.is_some() { "syncdb" } else { "initdb" },
        });
        if !args.omit_record_count {
            row["records"] = match b {
                Some(_) => json!(sink.row_count(&args.namespace, &name)?),
                None => json!(null),
            };
        }
        rows.push(row);
    }
    println!("{}", serde_json::to_string(&rows)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_and_the_default_mirror() {
        assert_eq!(mirror_file(Some("sqlite:///data/canvas.db"), "canvas").unwrap(), PathBuf::from("/data/canvas.db"));
        assert_eq!(mirror_file(Some("sqlite://rel/x.db"), "canvas").unwrap(), PathBuf::from("rel/x.db"));
        let e = mirror_file(Some("postgresql://u:secret@h/db"), "canvas").unwrap_err().to_string();
        assert!(e.contains("postgresql://") && !e.contains("secret"), "{e}");
        assert!(mirror_file(None, "canvas_logs").unwrap().ends_with("canvas_logs.db"));
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
    #[arg(long, env = "DAP_CONNECTION_STRING", hide_env_values = true)]
    connection_string: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// A mirror folder other than the default one.
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl StatusArgs {
    /// Every namespace file in `dir`.
    pub(super) fn for_dir(dir: &Path) -> StatusArgs {
        StatusArgs { namespace: None, connection_string: None, json: false, dir: Some(dir.to_path_buf()) }
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
        None => mirror_file(None, "x")?.parent().map(Path::to_path_buf).unwrap_or_default(),
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
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let now = time::now();
    let mut rows = Vec::new();
    for ns in status_namespaces(&args)? {
        let path = match &args.dir {
            Some(d) => d.join(format!("{ns}.db")),
            None => mirror_file(args.connection_string.as_deref(), &ns)?,
        };
        if !path.exists() {
            continue;
        }
        let mut sink = SqliteSink::open(&path).with_context(|| format!("opening the mirror {}", path.display()))?;
        let state = StateFile::load(&StateFile::path_for(&path));
        for b in sink.all_bookkeeping(&ns)? {
            let entry = state.tables.get(&format!("{ns}.{}", b.table));
            rows.push(json!({
                "namespace": ns,
                "table": b.table,
                "rows": sink.row_count(&ns, &b.table)?,
                "schema_version": b.schema_version,
                "watermark": time::format_wire(b.watermark),
                "staleness": staleness((now - b.watermark) / 1_000_000),
                "last_command": entry.and_then(|e| e.last_command.clone()),
                "last_run": entry.and_then(|e| e.last_run.clone()),
                "last_result": entry.and_then(|e| e.last_result.clone()),
                "file": path,
            }));
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
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
    for r in &rows {
        println!(
            "{:<36} {:>10} {:>6}  {:<28} {:>10}  {}",
            format!("{}.{}", r["namespace"].as_str().unwrap_or_default(), r["table"].as_str().unwrap_or_default()),
            r["rows"].to_string(),
            r["schema_version"].to_string(),
            r["watermark"].as_str().unwrap_or_default(),
            r["staleness"].as_str().unwrap_or_default(),
            r["last_result"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}
