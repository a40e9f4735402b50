//! `dap replicate`: tables from the local mirror to other databases, without asking DAP; and
//! the fan-out of `initdb`/`syncdb --replicate-to` right after their own commit.
//!
//! Every target is opened and every table replicated in parallel; one target failing does not
//! stop the others. A target without the table gets a snapshot of the mirror's copy; one that
//! has it gets what changed since its own watermark (a full reload when the mirror re-snapshotted
//! the table since, nothing when the target is ahead of the mirror).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::per_table::{self, Outcome};
use crate::progress::Progress;
use crate::run::{HistoryCopy, ReplicatePlan, Tables, TargetReport};
use crate::sink::{Access, NonFinite, SinkOptions};
use crate::sync::Action;
use crate::target::TargetSpec;

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
    /// The mirror file to copy from (sqlite:///PATH.db); the default mirror when omitted.
    #[arg(long)]
    from: Option<String>,
    /// The mirror folder to copy from (NAMESPACE.db files), as status, query and syncdb take it
    /// [default: DAP_MIRROR_DIR, else the platform data folder].
    #[arg(long, conflicts_with = "from")]
    dir: Option<PathBuf>,
    /// Print a machine-readable result per target and table on stdout.
    #[arg(long)]
    json: bool,
    /// Tables replicated at once per target (a database connection each on a server).
    #[arg(long, default_value_t = 4)]
    parallel_tables: usize,
    /// What NaN and infinity become on targets without them (MySQL, SQL Server).
    #[arg(long, value_enum, default_value_t = NonFinite::Refuse)]
    non_finite: NonFinite,
    /// How long to wait for another process writing the same table of a target to finish, e.g.
    /// 90s, 10m or 2h; then that table is left alone with a message saying who holds it.
    #[arg(long, value_parser = super::parse_duration, default_value = "10m")]
    lock_timeout: std::time::Duration,
    /// Also carry each table's history (kept by the mirror with --keep-history) as a plain table
    /// beside it: `"canvas"."users__history"` on PostgreSQL and SQL Server,
    /// `canvas__users__history` on MySQL, with the table's columns (enum labels as text) and
    /// dap_valid_from, dap_valid_to, dap_deleted. Incremental: the versions of keys changed since
    /// the target's copy replace theirs. The official client ignores these tables.
    #[arg(long)]
    with_history: bool,
}

impl ReplicateArgs {
    /// Whether the targets come from the configuration file.
    pub(super) fn needs_default_targets(&self) -> bool {
        self.to.iter().all(|t| t.trim().is_empty())
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

/// The connection strings of `--replicate-to` (or `replicate --to`), checked before anything is
/// opened.
pub(super) fn parse_targets(to: &[String], flag: &str) -> anyhow::Result<Vec<TargetSpec>> {
    to.iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|text| TargetSpec::parse(Some(text)).map_err(|e| anyhow::anyhow!("{flag}: {e}")))
        .collect()
}

/// Prints the failures and the summary per target; fails when any target or table failed.
pub(super) fn finish(console: super::Console, results: &[TargetReport]) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for r in results {
        if let Some(e) = &r.error {
            let line = crate::term::in_context(&r.target, &crate::secrets::scrub(e));
            let cause = line.strip_prefix(&format!("{}: ", r.target)).unwrap_or(&line);
            eprintln!("replicate to {}: failed: {cause}", r.target);
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
        let (line, ok) = per_table::summarize(&r.tables);
        // Left alone because it is ahead is a result of its own, not a copy that was made.
        let ahead = r
            .tables
            .iter()
            .filter(|o| matches!(&o.outcome, Outcome::Succeeded { result } if result.action == Action::Ahead))
            .count();
        let line = match ahead {
            0 => line,
            n => format!("{line}; {n} of them ahead of the mirror, left alone"),
        };
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
    if let Some(dir) = &args.dir {
        crate::mirror::folder::use_dir(dir);
    }
    let mirror = mirror_file(args.from.as_deref(), &args.namespace)?;
    let to = if args.needs_default_targets() { &ctx.default_targets } else { &args.to };
    let targets = parse_targets(to, "--to")?;
    if targets.is_empty() {
        bail!(
            "no target: give one or more connection strings with --to (or set DAP_REPLICATE_TO, or save defaults with `dap configure --target URL`)"
        );
    }
    let plan = ReplicatePlan {
        namespace: args.namespace.clone(),
        tables: Tables::parse(&args.table)?,
        mirror,
        targets,
        sink: SinkOptions {
            access: Access::Write,
            parallelism: args.parallel_tables.max(1),
            non_finite: args.non_finite,
            shared: ctx.shared,
            lock_timeout: args.lock_timeout,
            history: Default::default(),
        },
        history: if args.with_history { HistoryCopy::Carry } else { HistoryCopy::Leave },
        attempts: ctx.client.retry.attempts,
    };
    let progress = Progress::new(ctx.interactive && !args.json);
    let results = crate::run::replicate(&plan, &progress).await?;
    std::mem::drop(progress);
    if args.json {
        super::print_json(&results)?;
    }
    finish(ctx.console, &results)
}
