//! A run as a library call: the CLI (or the demo, or a scheduler) turns its arguments into a
//! validated [`Plan`] and gets back a typed [`RunReport`] to print. Here is decided what `all`
//! means, which tables `--init-missing` initialises, where the spool goes, what each target
//! records of the run, and the order of the fan-out to other targets (`--replicate-to`, and
//! `dap replicate` itself, [`replicate`]).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::api::{ApiError, Client};
use crate::error::Classify;
use crate::history_choice::Selection as HistorySelection;
use crate::mirror::reader::MirrorSource;
use crate::per_table::{self, Outcome, TableOutcome};
use crate::progress::{Progress, TableProgress};
use crate::sink::{RunRecord, Sink, SinkError, SinkOptions};
use crate::source::dap::DapSource;
use crate::source::{Source, SourceError};
use crate::spool::{Spool, SpoolError};
use crate::sync::{Init, Reinit, Replicator, SyncError, TableReport};
use crate::target::{self, TargetSpec};

/// The tables a command works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tables {
    /// `all`: what "all" means depends on the command (the server's tables for initdb, the
    /// target's for syncdb, the mirror's for replicate).
    All,
    /// A list, trimmed, without blanks or repeats, in the order given.
    Named(Vec<String>),
}

impl Tables {
    /// `--table`: `all`, or a comma-separated list (which must name a table).
    pub fn parse(spec: &str) -> Result<Tables, RunError> {
        if spec.trim() == "all" {
            return Ok(Tables::All);
        }
        let mut tables: Vec<String> = Vec::new();
        for t in spec.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !tables.iter().any(|x| x == t) {
                tables.push(t.to_string());
            }
        }
        if tables.is_empty() {
            return Err(RunError::Input("--table names no table".into()));
        }
        Ok(Tables::Named(tables))
    }
}

/// What a run does to each table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Init(Init),
    Sync { reinit: Reinit, missing: Missing },
}

/// What a sync does with tables the server has and the target lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Leave them (`all` means the target's tables).
    Skip,
    /// Initialise them (`--init-missing`: "sync, else init").
    Initialise,
}

impl Mode {
    pub fn command(self) -> &'static str {
        match self {
            Mode::Init(_) => "initdb",
            Mode::Sync { .. } => "syncdb",
        }
    }

    /// The command with the flags that change what it does, as the record of runs shows it.
    pub fn command_line(self) -> String {
        let flags: &[&str] = match self {
            Mode::Init(Init::Fresh) => &[],
            Mode::Init(Init::Replace) => &["--replace"],
            Mode::Sync { reinit, missing } => match (reinit, missing) {
                (Reinit::Stop, Missing::Skip) => &[],
                (Reinit::Automatically, Missing::Skip) => &["--auto-reinit"],
                (Reinit::Stop, Missing::Initialise) => &["--init-missing"],
                (Reinit::Automatically, Missing::Initialise) => &["--auto-reinit", "--init-missing"],
            },
        };
        std::iter::once(self.command()).chain(flags.iter().copied()).collect::<Vec<_>>().join(" ")
    }
}

/// A validated initdb or syncdb.
#[derive(Debug, Clone)]
pub struct Plan {
    pub namespace: String,
    pub tables: Tables,
    pub mode: Mode,
    pub target: TargetSpec,
    /// Targets replicated to from the mirror after the run (`--replicate-to`); the target must
    /// then be a mirror file.
    pub fan_out: Vec<TargetSpec>,
    /// Whether the fan-out carries the mirror's history tables too (`--replicate-with-history`).
    pub fan_out_history: HistoryCopy,
    /// Where downloads wait (`--temp-dir`); beside the mirror, or the system's temporary folder.
    pub temp_dir: Option<PathBuf>,
    pub sink: SinkOptions,
    /// Attempts per table for failures a retry may clear.
    pub attempts: u32,
    /// `--keep-days N`: after the run, the mirror keeps N days of its log tables, removing older
    /// days an archive holds whole ([`crate::mirror::retention`]).
    pub keep_days: Option<u32>,
    /// `--metrics-file`: OpenMetrics text of the namespace's tables written after the run.
    pub metrics_file: Option<PathBuf>,
}

/// Why a run could not start (its tables' failures are in its report instead).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The inputs cannot work; the message says what to give instead.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Url(#[from] crate::sink::UrlError),
}

/// What a run did.
#[derive(Debug, Serialize)]
pub struct RunReport {
    #[serde(skip)]
    pub command: &'static str,
    pub tables: Vec<TableOutcome<TableReport>>,
    /// The fan-out's results, one per target, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicate: Option<Vec<TargetReport>>,
    /// The target itself failed (damaged, unwritable, full): a mirror file refused is left as
    /// it was, with no record of the run written into it.
    #[serde(skip)]
    pub target_failed: bool,
}

impl RunReport {
    /// What failed: each table (`users`), each fan-out target that could not be opened
    /// (`→ postgresql://…`) and each table the fan-out did not copy (`users → postgresql://…`),
    /// with its error.
    pub fn failures(&self) -> Vec<(String, String)> {
        let failed = |outcomes: &[TableOutcome<TableReport>], suffix: &str| -> Vec<(String, String)> {
            outcomes
                .iter()
                .filter_map(|o| match &o.outcome {
                    Outcome::Failed { error } => Some((format!("{}{suffix}", o.table), error.clone())),
                    _ => None,
                })
                .collect()
        };
        let mut all = failed(&self.tables, "");
        for target in self.replicate.iter().flatten() {
            if let Some(e) = &target.error {
                all.push((format!("→ {}", target.target), e.clone()));
            }
            all.extend(failed(&target.tables, &format!(" → {}", target.target)));
        }
        all
    }
}

/// What replication did for one target.
#[derive(Debug, Serialize)]
pub struct TargetReport {
    pub target: String,
    /// Set when the target could not be opened at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub tables: Vec<TableOutcome<TableReport>>,
}

impl Plan {
    /// Checks what can be checked before anything is created: the fan-out's targets (which
    /// need a mirror to copy from), and, for a sync of a mirror file, that the mirror exists.
    fn check(&self) -> Result<Option<PathBuf>, RunError> {
        let ns = &self.namespace;
        let mirror = if self.fan_out.is_empty() {
            None
        } else {
            let Some(mirror) = self.target.local_file(ns)? else {
                return Err(RunError::Input(format!(
                    "--replicate-to copies from the mirror: {} must run on a mirror file (the default one, or sqlite:///PATH.db), not on {}",
                    self.mode.command(),
                    self.target.describe()
                )));
            };
            check_targets(&self.fan_out, &mirror)?;
            check_history_targets(&self.fan_out, ns, self.fan_out_history, "--replicate-with-history")?;
            Some(mirror)
        };
        self.check_history()?;
        if self.keep_days.is_some() {
            if !crate::schema::is_append_only_namespace(ns) {
                return Err(RunError::Input(format!(
                    "--keep-days bounds log tables (canvas_logs, such as web_logs) in the mirror; {ns} is not a log namespace"
                )));
            }
            if self.target.local_file(ns)?.is_none() {
                return Err(RunError::Input(format!(
                    "--keep-days bounds the local mirror (the default one, or sqlite:///PATH.db); {} keeps every row",
                    self.target.describe()
                )));
            }
        }
        if let (Mode::Sync { missing: Missing::Skip, .. }, Some(file)) = (self.mode, self.target.local_file(ns)?)
            && !crate::mirror::folder::mirror_file_present(&file).map_err(|e| RunError::Input(e.to_string()))?
        {
            return Err(RunError::Input(format!(
                "{}: there is no mirror here yet, so nothing to sync; start with `{}` (or pass --init-missing)",
                file.display(),
                crate::term::command(&["initdb", "--namespace", ns, "--table", "…"])
            )));
        }
        Ok(mirror)
    }
}

impl Plan {
    /// History is kept in a mirror file, for tables of the run, each either kept or not.
    fn check_history(&self) -> Result<(), RunError> {
        let choice = &self.sink.history;
        if choice.is_empty() {
            return Ok(());
        }
        if self.target.local_file(&self.namespace)?.is_none() {
            return Err(RunError::Input(format!(
                "history is kept in the mirror (a SQLite file), not in {}: run {} with --keep-history on the mirror, \
                 then `dap replicate` carries the tables to the server",
                self.target.describe(),
                self.mode.command()
            )));
        }
        for (flag, selection) in [("--keep-history", &choice.keep), ("--no-history", &choice.stop)] {
            if let (HistorySelection::Named(named), Tables::Named(run)) = (selection, &self.tables)
                && let Some(other) = named.iter().find(|t| !run.contains(t))
            {
                return Err(RunError::Input(format!(
                    "{flag} names {other}, which this run does not write (--table {}); name it in --table too",
                    run.join(",")
                )));
            }
        }
        let both = |t: &str| choice.keep.selects(t) && choice.stop.selects(t);
        let overlap = match (&choice.keep, &choice.stop) {
            (HistorySelection::Named(k), _) => k.iter().find(|t| both(t)).cloned(),
            (_, HistorySelection::Named(s)) => s.iter().find(|t| both(t)).cloned(),
            (HistorySelection::All, HistorySelection::All) => Some("all".to_string()),
            _ => None,
        };
        if let Some(t) = overlap {
            return Err(RunError::Input(format!(
                "--keep-history and --no-history both name {t}; name it in one of them"
            )));
        }
        Ok(())
    }
}

/// Refuses targets that are the mirror itself.
pub fn check_targets(targets: &[TargetSpec], mirror: &std::path::Path) -> Result<(), RunError> {
    for spec in targets {
        if let Ok(Some(file)) = spec.local_file("")
            && same_file(&file, mirror)
        {
            return Err(RunError::Input(format!(
                "--to {}: that is the mirror itself; name another database",
                spec.describe()
            )));
        }
    }
    Ok(())
}

/// Refuses carrying history (`flag`) to a mirror file, before anything is written: a mirror
/// keeps a history of its own.
fn check_history_targets(
    targets: &[TargetSpec],
    namespace: &str,
    history: HistoryCopy,
    flag: &str,
) -> Result<(), RunError> {
    match targets.iter().find(|t| matches!(t.local_file(namespace), Ok(Some(_)))) {
        Some(file) if history == HistoryCopy::Carry => Err(RunError::Input(format!(
            "{flag}: {} is a mirror file, which keeps a history of its own (initdb/syncdb --keep-history on it); \
             history tables are carried to PostgreSQL, MySQL and SQL Server targets",
            file.describe()
        ))),
        _ => Ok(()),
    }
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// The spool of a run: inside `--temp-dir`, beside a mirror file (its `.dap-spool`), or in the
/// system's temporary folder for a server.
fn spool_for(temp_dir: Option<&PathBuf>, mirror_file: Option<&PathBuf>) -> Result<Spool, SpoolError> {
    match (temp_dir, mirror_file) {
        (Some(dir), _) => Spool::create(dir, false),
        (None, Some(file)) => {
            let folder = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            Spool::create(&folder.join(".dap-spool"), true)
        }
        (None, None) => Spool::create(&std::env::temp_dir(), false),
    }
}

/// Every named table is one DAP serves in the namespace, checked before anything is created: a
/// typo is named with the closest served name and the command that lists them.
fn check_served(namespace: &str, named: &[String], served: &[String]) -> Result<(), RunError> {
    let unknown: Vec<String> = named
        .iter()
        .filter(|t| !served.contains(t))
        .map(|t| match closest(t, served) {
            Some(near) => format!("{t} (did you mean {near}?)"),
            None => t.clone(),
        })
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(RunError::Input(format!(
        "DAP has no table {} in namespace {namespace}; nothing was created. `dap list --namespace {namespace}` lists its tables",
        unknown.join(", ")
    )))
}

/// The candidate nearest to `name` by edit distance, when it is near enough to be a typo.
fn closest<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let above = row[j + 1];
                row[j + 1] = (diagonal + usize::from(ca != *cb)).min(row[j] + 1).min(above + 1);
                diagonal = above;
            }
        }
        row[b.len()]
    };
    let limit = (name.chars().count() / 3).max(1);
    candidates.iter().map(|c| (distance(name, c), c.as_str())).filter(|(d, _)| *d <= limit).min().map(|(_, c)| c)
}

/// Records how a table's run ended, with the target that keeps such records.
async fn record(sink: &dyn Sink, namespace: &str, table: &str, command: &str, report: &Result<TableReport, SyncError>) {
    let run = RunRecord {
        command: command.to_string(),
        job: report.as_ref().ok().map(|r| r.job_id.clone()).filter(|j| !j.is_empty()),
        rows: report.as_ref().ok().map(|r| r.rows),
        result: report.as_ref().map(|_| ()).map_err(|e| e.to_string()),
    };
    sink.record_run(namespace, table, &run).await;
}

/// Runs an initdb or syncdb from DAP into the plan's target, then its fan-out. A mirror file
/// records the run as it starts and again as it ends (see [`crate::mirror::runs`]).
pub async fn run(client: Client, plan: &Plan, progress: &Progress) -> Result<RunReport, RunError> {
    let started = crate::time::now();
    let ns = plan.namespace.as_str();
    let mirror = plan.check()?;
    // The namespace must be one the server has before anything is created (a typo would
    // otherwise leave an empty file behind).
    let server_tables = client.tables(ns).await?;
    if let Tables::Named(list) = &plan.tables {
        check_served(ns, list, &server_tables)?;
    }
    let selection = match &plan.tables {
        Tables::All => "all".to_string(),
        Tables::Named(list) => list.join(","),
    };
    let record = MirrorRecord {
        file: plan.target.local_file(ns)?,
        id: tokio::sync::OnceCell::new(),
        command: plan.mode.command_line(),
        selection,
        started,
        wait: plan.sink.lock_timeout,
    };
    let report = run_recorded(client, plan, progress, server_tables, mirror, &record).await;
    record.finish(&report).await;
    // A clean end seals the mirror file, so that the next sync need not check its tables.
    if let (Ok(done), Ok(Some(file))) = (&report, plan.target.local_file(ns))
        && !done.target_failed
        && file.is_file()
    {
        crate::mirror::seal::seal(&file);
    }
    report
}

async fn run_recorded(
    client: Client,
    plan: &Plan,
    progress: &Progress,
    server_tables: Vec<String>,
    mirror: Option<PathBuf>,
    run_record: &MirrorRecord,
) -> Result<RunReport, RunError> {
    let started = run_record.started;
    let ns = plan.namespace.as_str();
    let command = plan.mode.command();
    let pacing = client.clone();
    let target = target::open(&plan.target, ns, &plan.sink).await?;
    let local: Vec<String> = target.all_bookkeeping(ns).await?.into_iter().map(|b| b.table).collect();
    let tables = match (&plan.tables, plan.mode) {
        (Tables::Named(list), _) => list.clone(),
        (Tables::All, Mode::Init(_) | Mode::Sync { missing: Missing::Initialise, .. }) => {
            let mut all = local.clone();
            all.extend(server_tables.into_iter().filter(|t| !local.contains(t)));
            all
        }
        (Tables::All, Mode::Sync { .. }) => local.clone(),
    };
    let spool = spool_for(plan.temp_dir.as_ref(), plan.target.local_file(ns)?.as_ref())?;
    let source = DapSource {
        client,
        spool: spool.path().to_path_buf(),
        download_concurrency: 4,
        transfers: Arc::new(tokio::sync::Semaphore::new(plan.sink.parallelism.max(1))),
    };
    let reinit = match plan.mode {
        Mode::Sync { reinit, .. } => reinit,
        Mode::Init(_) => Reinit::Stop,
    };
    let replicator = Replicator { source: Arc::new(source), sink: target.clone(), reinit, attempts: plan.attempts };
    let overall = progress.overall(tables.len(), pacing.job_limit(), move || pacing.next_job_slot());
    // A target that failed itself (damaged, unwritable, full) gets no record of the run written
    // into it: a refused file is left as it was.
    let target_failed = std::sync::atomic::AtomicBool::new(false);
    let outcomes = per_table::run_each(&tables, per_table::JOBS_IN_FLIGHT, |t| {
        let (r, local, target, run_record) = (&replicator, &local, target.as_ref(), run_record);
        let target_failed = &target_failed;
        async move {
            let watch = Arc::new(progress.table(&t));
            let report = match plan.mode {
                Mode::Init(init) => r.initdb(ns, &t, init, &watch).await,
                Mode::Sync { missing: Missing::Initialise, .. } if !local.contains(&t) => {
                    r.initdb_missing(ns, &t, &watch).await
                }
                Mode::Sync { .. } => r.syncdb(ns, &t, &watch).await,
            };
            match &report {
                Ok(rep) => watch.finish(&rep.describe()),
                Err(e) if let Some(reason) = e.skip_reason() => watch.finish(&format!("skipped, {reason}")),
                Err(e) => watch.fail(e),
            }
            if matches!(report, Err(SyncError::Sink(_))) {
                target_failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if report.as_ref().err().and_then(Classify::skip_reason).is_none() {
                record(target, ns, &t, command, &report).await;
            }
            if report.is_ok() {
                run_record.started_in(target).await;
            }
            report
        }
    })
    .await;
    std::mem::drop(overall);
    std::mem::drop(spool);
    // The mirror's writer is released before anything else writes or reads the file.
    std::mem::drop(replicator);
    std::mem::drop(target);
    let mut outcomes = outcomes;
    if let (Some(days), Some(file)) = (plan.keep_days, plan.target.local_file(ns)?) {
        for pruned in keep_days(&file, ns, &outcomes, days, plan.sink.lock_timeout).await {
            let synced = outcomes.iter_mut().find(|o| o.table == pruned.table);
            if let Some(TableOutcome { outcome: Outcome::Succeeded { result }, .. }) = synced {
                result.pruned = Some(pruned);
            }
        }
    }
    let target_failed = target_failed.into_inner();
    if let Some(path) = &plan.metrics_file {
        write_metrics(plan, path, &outcomes, started).await;
    }
    let Some(mirror) = mirror else {
        return Ok(RunReport { command, tables: outcomes, replicate: None, target_failed });
    };
    let done: Vec<String> =
        outcomes.iter().filter(|o| matches!(o.outcome, Outcome::Succeeded { .. })).map(|o| o.table.clone()).collect();
    let plan = ReplicatePlan {
        namespace: plan.namespace.clone(),
        tables: Tables::Named(done),
        mirror,
        targets: plan.fan_out.clone(),
        // History is the mirror's own: the fan-out's targets get the tables.
        sink: SinkOptions { history: Default::default(), ..plan.sink.clone() },
        history: plan.fan_out_history,
        attempts: plan.attempts,
    };
    let fanned = replicate(&plan, progress).await?;
    Ok(RunReport { command, tables: outcomes, replicate: Some(fanned), target_failed })
}

/// `--metrics-file`: the namespace's tables as `dap status` sees them after the run, with the
/// run's duration. A failure is a warning: the run itself is done.
async fn write_metrics(
    plan: &Plan,
    path: &std::path::Path,
    outcomes: &[TableOutcome<TableReport>],
    started: crate::time::Micros,
) {
    let request = crate::status::StatusRequest {
        namespace: Some(plan.namespace.clone()),
        location: crate::status::Location::Target(plan.target.clone()),
        targets: Vec::new(),
        shared: plan.sink.shared,
    };
    let written = match crate::status::status(&request).await {
        Ok(tables) => {
            let run = crate::metrics::RunSummary {
                namespace: &plan.namespace,
                command: plan.mode.command(),
                seconds: (crate::time::now() - started) as f64 / 1e6,
                failed_tables: outcomes.iter().filter(|o| matches!(o.outcome, Outcome::Failed { .. })).count(),
            };
            crate::metrics::write(path, &crate::metrics::render(&tables, &run)).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = written {
        tracing::warn!("{}: the metrics could not be written ({e}); the run itself is done", path.display());
    }
}

/// The record of a run in the mirror file it writes (`dap_runs`): begun once the run has
/// changed the file (its first table committed), so that a run killed afterwards reads as
/// interrupted and a file refused at the start is left as it was; finished as the run ends. The
/// tables are what matters: a failure to record is a warning.
struct MirrorRecord {
    file: Option<PathBuf>,
    /// The id of the record written as the run went; unset (or `None`) when it was not.
    id: tokio::sync::OnceCell<Option<i64>>,
    command: String,
    /// The tables asked for (`all` or a list), for a run that ends before it lists them.
    selection: String,
    started: crate::time::Micros,
    wait: std::time::Duration,
}

impl MirrorRecord {
    /// Records, once, through the run's own target, that the run is going.
    async fn started_in(&self, target: &dyn Sink) {
        if self.file.is_none() {
            return;
        }
        self.id
            .get_or_init(|| async {
                let start = crate::mirror::runs::Start {
                    started: crate::time::format_wire(self.started),
                    command: self.command.clone(),
                    profile: crate::mirror::folder::profile().map(String::from),
                    tables: self.selection.clone(),
                };
                target.record_start(&start).await
            })
            .await;
    }

    async fn finish(self, report: &Result<RunReport, RunError>) {
        let Some(file) = self.file.filter(|f| f.exists()) else { return };
        let id = self.id.get().copied().flatten();
        let run = match report {
            // A target that failed itself gets no record it did not have at the start.
            Ok(report) if report.target_failed && id.is_none() => return,
            Ok(report) => {
                let errors = report.failures().into_iter().map(|(t, e)| crate::term::in_context(&t, &e)).collect();
                ended_run(self.command, self.started, &report.tables, errors)
            }
            // A run that could not start is recorded only where its start was.
            Err(_) if id.is_none() => return,
            Err(e) => ended(self.command, self.started, self.selection, (0, None), vec![e.to_string()]),
        };
        if let Err(e) = save_run(file, id, run, self.wait).await {
            tracing::warn!("the run is done, but the mirror's record of runs could not be written: {e}");
        }
    }
}

/// A run as it ended: the tables it worked on, the rows they hold and the changes applied (of
/// those that succeeded), and what failed (`errors`, scrubbed of secrets).
fn ended_run(
    command: String,
    started: crate::time::Micros,
    outcomes: &[TableOutcome<TableReport>],
    errors: Vec<String>,
) -> crate::mirror::runs::Run {
    let (mut rows, mut changes) = (0, None::<u64>);
    for o in outcomes {
        if let Outcome::Succeeded { result } = &o.outcome {
            rows += result.rows;
            if let Some(c) = result.changes {
                changes = Some(changes.unwrap_or(0) + c);
            }
        }
    }
    ended(command, started, table_list(outcomes), (rows, changes), errors)
}

/// A run as it ended, from its parts; `counts` is (rows, changes).
fn ended(
    command: String,
    started: crate::time::Micros,
    tables: String,
    counts: (u64, Option<u64>),
    errors: Vec<String>,
) -> crate::mirror::runs::Run {
    use crate::mirror::runs::{Run, RunResult};
    Run {
        started: crate::time::format_wire(started),
        ended: Some(crate::time::format_wire(crate::time::now())),
        command,
        profile: crate::mirror::folder::profile().map(String::from),
        tables,
        rows: counts.0,
        changes: counts.1,
        result: if errors.is_empty() { RunResult::Succeeded } else { RunResult::Failed },
        error: (!errors.is_empty()).then(|| crate::secrets::scrub(&errors.join("; ")).into_owned()),
    }
}

fn table_list<T>(outcomes: &[TableOutcome<T>]) -> String {
    outcomes.iter().map(|o| o.table.as_str()).collect::<Vec<_>>().join(",")
}

/// `table: error` of each table that failed.
fn table_errors<T>(outcomes: &[TableOutcome<T>]) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|o| match &o.outcome {
            Outcome::Failed { error } => Some(format!("{}: {error}", o.table)),
            _ => None,
        })
        .collect()
}

/// Writes how a run ended into the mirror file's record (see [`crate::mirror::runs::finish`]).
async fn save_run(
    file: PathBuf,
    id: Option<i64>,
    run: crate::mirror::runs::Run,
    wait: std::time::Duration,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        crate::mirror::folder::with_writer(&file, wait, |conn| {
            crate::mirror::runs::finish(conn, id, &run, crate::mirror::runs::kept())
        })
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// `--keep-days`: bounds each log table the run synced (see [`crate::mirror::retention`]), and
/// says what it removed and which old days it kept. A failure leaves the rows where they were
/// and is a warning: the sync itself succeeded.
async fn keep_days(
    file: &std::path::Path,
    ns: &str,
    outcomes: &[TableOutcome<TableReport>],
    days: u32,
    wait: std::time::Duration,
) -> Vec<crate::mirror::retention::Pruned> {
    let synced: Vec<String> =
        outcomes.iter().filter(|o| matches!(o.outcome, Outcome::Succeeded { .. })).map(|o| o.table.clone()).collect();
    let (file, ns_owned) = (file.to_path_buf(), ns.to_string());
    let pruned = tokio::task::spawn_blocking(move || {
        crate::mirror::folder::with_writer(&file, wait, |conn| {
            synced
                .iter()
                .map(|t| crate::mirror::retention::prune(conn, &ns_owned, t, days))
                .collect::<Result<Vec<_>, _>>()
        })
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let pruned = match pruned {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("{ns}: --keep-days removed nothing ({e}); every row is still in the mirror");
            return Vec::new();
        }
    };
    for p in &pruned {
        if !p.days.is_empty() {
            tracing::info!(
                "{ns}.{}: {} rows of {} days before {} removed from the mirror; the archive holds them",
                p.table,
                p.rows,
                p.days.len(),
                p.before
            );
        }
        if !p.kept.is_empty() {
            let rows: u64 = p.kept.iter().map(|(_, n, _)| n).sum();
            let (first, _, why) = &p.kept[0];
            tracing::warn!(
                "{ns}.{}: {rows} rows of {} days before {} kept, as no archive holds them whole ({first}: {why}); `{}` archives them",
                p.table,
                p.kept.len(),
                p.before,
                crate::term::command(&["archive", "--namespace", ns, "--table", &p.table, "--to", "DIR"])
            );
        }
    }
    pruned
}

/// A validated `dap replicate` (and the fan-out of a run).
#[derive(Debug, Clone)]
pub struct ReplicatePlan {
    pub namespace: String,
    /// `All`: every table of the mirror's namespace.
    pub tables: Tables,
    pub mirror: PathBuf,
    pub targets: Vec<TargetSpec>,
    pub sink: SinkOptions,
    /// Whether the mirror's history tables go too (`--with-history`).
    pub history: HistoryCopy,
    pub attempts: u32,
}

/// Whether `dap replicate` carries the mirror's history of each table to the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryCopy {
    /// Only the tables (the official layout).
    Leave,
    /// Each table's `<table>__history` too, as a plain table beside it (`--with-history`).
    Carry,
}

/// Replicates tables from the mirror to every target, all at once; one target failing does not
/// stop the others. A target without a table gets a snapshot of the mirror's copy; one that has
/// it gets what changed since its own watermark (a full reload when the mirror re-snapshotted the
/// table since, nothing when the target is ahead of the mirror).
pub async fn replicate(plan: &ReplicatePlan, progress: &Progress) -> Result<Vec<TargetReport>, RunError> {
    let started = crate::time::now();
    let ns = plan.namespace.as_str();
    check_targets(&plan.targets, &plan.mirror)?;
    check_history_targets(&plan.targets, ns, plan.history, "--with-history")?;
    crate::privacy::check_mirror(&plan.mirror, plan.sink.shared);
    let mirror = Arc::new(MirrorSource::open(&plan.mirror)?);
    let source: Arc<dyn Source> = mirror.clone();
    let tables = match &plan.tables {
        Tables::Named(list) => list.clone(),
        Tables::All => source.tables(ns).await?,
    };
    let runs = plan.targets.iter().map(|spec| {
        let (source, tables, mirror) = (source.clone(), &tables, mirror.clone());
        async move {
            let target = spec.describe();
            let sink = match target::open(spec, ns, &plan.sink).await {
                Ok(sink) => sink,
                Err(e) => {
                    tracing::warn!("{}", crate::term::in_context(&target, &e.to_string()));
                    return TargetReport { target, error: Some(e.to_string()), tables: Vec::new() };
                }
            };
            let replicator =
                Replicator { source, sink: sink.clone(), reinit: Reinit::Automatically, attempts: plan.attempts };
            let outcomes = per_table::run_each(tables, plan.sink.parallelism, |t| {
                let (r, sink, target, mirror) = (&replicator, sink.as_ref(), &target, mirror.as_ref());
                async move {
                    let watch = Arc::new(progress.table(&format!("{ns}.{t} → {target}")));
                    let report = match r.replicate(ns, &t, &watch).await {
                        Ok(mut report) if plan.history == HistoryCopy::Carry => {
                            r.carry_history(mirror, ns, &t, &watch).await.map(|carried| {
                                report.history = carried;
                                report
                            })
                        }
                        other => other,
                    };
                    match &report {
                        Ok(rep) => watch.finish(&rep.describe()),
                        Err(e) => watch.fail(e),
                    }
                    record(sink, ns, &t, "replicate", &report).await;
                    report
                }
            })
            .await;
            // A mirror file written by the replicate records it, once its writer is let go.
            std::mem::drop(replicator);
            std::mem::drop(sink);
            if let Ok(Some(file)) = spec.local_file(ns)
                && crate::mirror::format::looks_like_sqlite(&file)
            {
                let run = ended_run("replicate".into(), started, &outcomes, table_errors(&outcomes));
                if let Err(e) = save_run(file, None, run, plan.sink.lock_timeout).await {
                    tracing::warn!("{target}: replicated, but its record of runs could not be written: {e}");
                }
            }
            TargetReport { target, error: None, tables: outcomes }
        }
    });
    Ok(futures_util::future::join_all(runs).await)
}

/// Drops tables (every initialised one of the namespace for `All`) from a target, each under its
/// lock, then gives their space back; the report says per table what was dropped.
pub async fn drop_tables(
    target: &TargetSpec,
    namespace: &str,
    tables: &Tables,
    options: &SinkOptions,
    progress: &Progress,
) -> Result<Vec<TableOutcome<Option<u64>>>, RunError> {
    let started = crate::time::now();
    if let Some(file) = target.local_file(namespace)?
        && !file.exists()
    {
        let folder = file.parent().unwrap_or(std::path::Path::new("."));
        let mirrored: Vec<String> = crate::mirror::folder::namespace_files(folder)
            .map_err(|e| RunError::Input(e.to_string()))?
            .into_iter()
            .map(|(ns, _)| ns)
            .collect();
        let here = if mirrored.is_empty() { "none".to_string() } else { mirrored.join(", ") };
        return Err(RunError::Input(format!(
            "{} does not exist: namespace {namespace} has no mirror there, so there is nothing to drop \
             (namespaces mirrored in {}: {here})",
            file.display(),
            folder.display()
        )));
    }
    let sink = target::open(target, namespace, options).await?;
    let names = match tables {
        Tables::Named(list) => list.clone(),
        Tables::All => sink.all_bookkeeping(namespace).await?.into_iter().map(|b| b.table).collect(),
    };
    let mut outcomes = Vec::new();
    for t in names {
        let rows = sink.row_count(namespace, &t).await.ok();
        let watch: TableProgress = progress.table(&format!("{namespace}.{t}"));
        let outcome = match Replicator::dropdb(sink.as_ref(), namespace, &t, &watch).await {
            Ok(()) => {
                watch.finish(&format!("dropped ({} rows)", rows.unwrap_or(0)));
                Outcome::Succeeded { result: rows }
            }
            Err(e) => {
                watch.fail(&e);
                if e.is_fatal() {
                    return Err(RunError::Input(e.to_string()));
                }
                Outcome::Failed { error: e.to_string() }
            }
        };
        outcomes.push(TableOutcome { table: t, outcome });
    }
    if outcomes.iter().any(|o| matches!(o.outcome, Outcome::Succeeded { .. })) {
        sink.reclaim_space().await?;
    }
    // The writer is let go before the run is recorded in the file.
    std::mem::drop(sink);
    if let Some(file) = target.local_file(namespace)?.filter(|f| crate::mirror::format::looks_like_sqlite(f)) {
        record_drop(&file, &outcomes, started, options.lock_timeout).await;
    }
    Ok(outcomes)
}

/// Adds a dropdb to the mirror file's record of runs: the tables it dropped and the rows they held.
async fn record_drop(
    file: &std::path::Path,
    outcomes: &[TableOutcome<Option<u64>>],
    started: crate::time::Micros,
    wait: std::time::Duration,
) {
    let rows = outcomes
        .iter()
        .map(|o| match &o.outcome {
            Outcome::Succeeded { result } => result.unwrap_or(0),
            _ => 0,
        })
        .sum();
    let run = ended("dropdb".into(), started, table_list(outcomes), (rows, None), table_errors(outcomes));
    if let Err(e) = save_run(file.to_path_buf(), None, run, wait).await {
        tracing::warn!("the tables are dropped, but the mirror's record of runs could not be written: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_is_named_with_the_nearest_served_table() {
        let served: Vec<String> = ["users", "courses", "user_notes", "accounts"].map(String::from).to_vec();
        assert_eq!(closest("userz", &served), Some("users"));
        assert_eq!(closest("cources", &served), Some("courses"));
        assert_eq!(closest("enrollments", &served), None);
        let err = check_served("canvas", &["users".into(), "userz".into()], &served).unwrap_err().to_string();
        assert!(err.contains("userz (did you mean users?)") && err.contains("dap list --namespace canvas"), "{err}");
        assert!(check_served("canvas", &["users".into()], &served).is_ok());
    }

    #[test]
    fn selections_are_trimmed_and_deduplicated() {
        assert_eq!(Tables::parse("all").unwrap(), Tables::All);
        assert_eq!(Tables::parse(" a, b ,a,,c").unwrap(), Tables::Named(vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(Tables::parse("All").unwrap(), Tables::Named(vec!["All".into()]), "only lowercase `all` is all");
        assert!(Tables::parse(" , ").is_err());
    }
}
