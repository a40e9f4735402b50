//! `dap replicate`: tables from the local mirror to other databases, without asking DAP; and
//! the fan-out of `initdb`/`syncdb --replicate-to` right after their own commit.
//!
//! Every target is opened and every table replicated in parallel; one target failing does not
//! stop the others. A target without the table gets a snapshot of the mirror's copy; one that
//! has it gets what changed since its own watermark (a full reload when the mirror re-snapshotted
//! the table since, nothing when the target is ahead of the mirror).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use crate::progress::Progress;
use crate::sink::{self, Access, NonFinite, SinkOptions, TargetSpec};
use crate::source::mirror::MirrorSource;
use crate::source::{Source, SourceError};
use crate::sync::{Action, Replicator, SyncError, TableReport};
use crate::tables::{self, Outcome, TableOutcome};
use crate::time;

#[derive(Debug, Args)]
pub struct ReplicateArgs {
    /// Namespace, e.g. canvas, canvas_logs, catalog.
    #[arg(long)]
    namespace: String,
    /// `all` (every table of the mirror's namespace), or a comma-separated list.
    #[arg(long)]
    table: String,
    /// A target: postgresql://…, mysql://…, mssql://… or sqlite:///PATH.db; repeat for several.
    /// DAP_REPLICATE_TO may hold a comma-separated list; without either, the targets saved by
    /// `dap configure --target`.
    #[arg(long = "to", env = "DAP_REPLICATE_TO", value_delimiter = ',', hide_env_values = true)]
    to: Vec<String>,
    /// The mirror to copy from (sqlite:///PATH.db); the default mirror when omitted.
    #[arg(long)]
    from: Option<String>,
    /// Print a machine-readable result per target and table on stdout.
    #[arg(long)]
    json: bool,
    /// Tables replicated at once per target (a database connection each on a server).
    #[arg(long, default_value_t = 4)]
    parallel_tables: usize,
    /// What NaN and infinity become on targets without them (MySQL, SQL Server).
    #[arg(long, value_enum, default_value_t = NonFinite::Refuse)]
    non_finite: NonFinite,
}

impl ReplicateArgs {
    /// Whether the targets come from the configuration file.
    pub(super) fn needs_default_targets(&self) -> bool {
        self.to.iter().all(|t| t.trim().is_empty())
    }
}

/// Targets checked before anything is opened: each a connection string dap can use, none the
/// mirror itself.
pub(super) fn parse_targets(to: &[String], mirror: &Path) -> anyhow::Result<Vec<TargetSpec>> {
    let mut out = Vec::new();
    for text in to.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let spec = TargetSpec::parse(Some(text)).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
        if let Ok(Some(file)) = spec.local_file("")
            && same_file(&file, mirror)
        {
            bail!("--to {}: that is the mirror itself; name another database", spec.describe());
        }
        out.push(spec);
    }
    if out.is_empty() {
        bail!(
            "no target: give one or more connection strings with --to (or set DAP_REPLICATE_TO, or save defaults with `dap configure --target URL`)"
        );
    }
    Ok(out)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// The mirror file of a namespace: `--from`, or the default mirror's.
pub(super) fn mirror_file(from: Option<&str>, namespace: &str) -> anyhow::Result<PathBuf> {
    let spec = TargetSpec::parse(from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
    match spec.local_file(namespace)? {
        Some(file) => Ok(file),
        None => bail!("--from {}: replication copies from a mirror file (sqlite:///PATH.db)", spec.describe()),
    }
}

/// What replication did for one target.
#[derive(Debug, Serialize)]
pub(super) struct TargetResult {
    pub target: String,
    /// Set when the target could not be opened at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub tables: Vec<TableOutcome<TableReport>>,
}

/// Replicates `tables` (all of the mirror's namespace when `None`) from the mirror to every
/// target, all at once.
pub(super) async fn fan_out(
    mirror: &Path,
    namespace: &str,
    tables: Option<Vec<String>>,
    targets: &[TargetSpec],
    options: &SinkOptions,
    attempts: u32,
    progress: &Progress,
) -> anyhow::Result<Vec<TargetResult>> {
    crate::privacy::check_mirror(mirror, options.shared);
    let source: Arc<dyn Source> = Arc::new(MirrorSource::open(mirror)?);
    let tables = match tables {
        Some(list) => list,
        None => source.tables(namespace).await?,
    };
    let runs = targets.iter().map(|spec| {
        let (source, tables) = (source.clone(), &tables);
        async move {
            let target = spec.describe();
            let sink = match sink::open(spec, namespace, options).await {
                Ok(sink) => sink,
                Err(e) => {
                    tracing::warn!("{target}: {e}");
                    return TargetResult { target, error: Some(e.to_string()), tables: Vec::new() };
                }
            };
            let replicator = Replicator { source, sink: sink.clone(), auto_reinit: true, attempts };
            let outcomes = tables::run_each(tables, options.parallelism, |t| {
                let (r, sink, target) = (&replicator, sink.as_ref(), &target);
                async move {
                    let watch = Arc::new(progress.table(&format!("{namespace}.{t} → {target}")));
                    let report = match sink.bookkeeping(namespace, &t).await? {
                        None => r.initdb(namespace, &t, false, &watch).await,
                        Some(stored) => match r.syncdb(namespace, &t, &watch).await {
                            Err(SyncError::Source(e @ SourceError::TargetAhead { .. })) => {
                                tracing::warn!("{target} {namespace}.{t}: {e}");
                                Ok(TableReport {
                                    action: Action::Ahead,
                                    job_id: String::new(),
                                    rows: sink.row_count(namespace, &t).await?,
                                    changes: Some(0),
                                    watermark: time::format_wire(stored.watermark),
                                    schema_version: stored.schema_version,
                                })
                            }
                            other => other,
                        },
                    };
                    match &report {
                        Ok(rep) => watch.finish(&rep.describe()),
                        Err(e) => watch.fail(e),
                    }
                    report
                }
            })
            .await;
            TargetResult { target, error: None, tables: outcomes }
        }
    });
    Ok(futures_util::future::join_all(runs).await)
}

/// Prints the failures and the summary per target; fails when any target or table failed.
pub(super) fn finish(console: super::Console, results: &[TargetResult]) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for r in results {
        if let Some(e) = &r.error {
            eprintln!("replicate to {}: failed: {}", r.target, crate::secrets::scrub(e));
            failed.push(r.target.clone());
            continue;
        }
        for o in &r.tables {
            match &o.outcome {
                Outcome::Failed { error } => console.failure(&format!("  failed  {} {}: {error}", r.target, o.table)),
                Outcome::Skipped { reason } => eprintln!("  skipped {} {}: {reason}", r.target, o.table),
                Outcome::Succeeded { .. } => {}
            }
        }
        let (line, ok) = tables::summarize(&r.tables);
        console.summary(&format!("replicate to {}: {line}", r.target));
        if !ok {
            failed.push(r.target.clone());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("replicate: {} of {} targets failed: {}", failed.len(), results.len(), failed.join(", "))
    }
}

pub async fn replicate(ctx: &super::Context, args: ReplicateArgs) -> anyhow::Result<()> {
    let mirror = mirror_file(args.from.as_deref(), &args.namespace)?;
    let to = if args.needs_default_targets() { &ctx.default_targets } else { &args.to };
    let targets = parse_targets(to, &mirror)?;
    let tables = match tables::parse_selection(&args.table) {
        Some(list) if list.is_empty() => bail!("--table names no table"),
        other => other,
    };
    let options = SinkOptions {
        access: Access::Write,
        parallelism: args.parallel_tables.max(1),
        non_finite: args.non_finite,
        shared: ctx.shared,
    };
    let progress = Progress::new(ctx.interactive && !args.json);
    let attempts = ctx.client.retry.attempts;
    let results = fan_out(&mirror, &args.namespace, tables, &targets, &options, attempts, &progress).await?;
    if args.json {
        super::print_json(&results)?;
    }
    finish(ctx.console, &results)
}
