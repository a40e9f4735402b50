//! `dap archive`: a log table of the mirror as day-partitioned Parquet (see `crate::archive`).

use std::path::PathBuf;

use clap::Args;

use crate::archive::{self, ArchiveRequest};

#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// The namespace of the log table.
    #[arg(long, default_value = "canvas_logs")]
    namespace: String,
    /// The log table (append-only: web_logs).
    #[arg(long, default_value = "web_logs")]
    table: String,
    /// The archive's folder: `date=YYYY-MM-DD/part-0.parquet` per day (made when missing).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// The mirror folder [default: the default mirror's (DAP_MIRROR_DIR)].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print what was written as JSON.
    #[arg(long)]
    json: bool,
    /// How long to wait for a sync writing the mirror file before recording the archived days
    /// in it, e.g. 90s, 10m or 2h (the archive itself is written either way).
    #[arg(long, value_parser = super::parse_duration, default_value = "10m")]
    lock_timeout: std::time::Duration,
}

pub fn run(args: ArchiveArgs) -> anyhow::Result<()> {
    let mirror = super::query::mirror_dir(args.dir)?;
    let request = ArchiveRequest {
        mirror,
        namespace: args.namespace,
        table: args.table,
        to: args.to,
        lock_timeout: args.lock_timeout,
    };
    let report = archive::archive(&request)?;
    if args.json {
        return super::print_json(&report);
    }
    let complete = report.written.iter().filter(|d| d.complete).count();
    eprintln!(
        "archive: {} days written ({complete} complete, {} still filling), {} rows; {} days unchanged; in {}",
        report.written.len(),
        report.written.len() - complete,
        report.rows,
        report.unchanged,
        request.to.display()
    );
    Ok(())
}
