//! `dap pack` and `dap unpack`: the mirror as one zstd-compressed file, and back.

use std::path::PathBuf;

use clap::Args;

use crate::pack::{self, Overwrite};

#[derive(Debug, Args)]
pub struct PackArgs {
    /// Only this namespace (repeatable) [default: every namespace of the mirror].
    #[arg(long)]
    namespace: Vec<String>,
    /// The pack to write, e.g. canvas-2026-12-01.dap.zst.
    #[arg(long, short)]
    output: PathBuf,
    /// The mirror folder [default: the default mirror's (DAP_MIRROR_DIR)].
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// The pack to restore.
    file: PathBuf,
    /// The mirror folder to restore into [default: the default mirror's (DAP_MIRROR_DIR)].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Replace mirror files that already exist.
    #[arg(long)]
    force: bool,
}

pub fn pack(args: PackArgs) -> anyhow::Result<()> {
    let dir = super::query::mirror_dir(args.dir)?;
    let manifest = pack::pack(&dir, &args.namespace, &args.output)?;
    let size = std::fs::metadata(&args.output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "pack: {} ({}) written to {}, {:.1} MB",
        manifest.namespaces.join(", "),
        manifest.created,
        args.output.display(),
        size as f64 / 1e6
    );
    Ok(())
}

pub fn unpack(args: UnpackArgs) -> anyhow::Result<()> {
    let dir = super::query::mirror_dir(args.dir)?;
    let overwrite = if args.force { Overwrite::Replace } else { Overwrite::Refuse };
    let manifest = pack::unpack(&args.file, &dir, overwrite)?;
    eprintln!(
        "unpack: {} (packed {}) restored into {}; `dap syncdb --namespace NS --table all` continues from there",
        manifest.namespaces.join(", "),
        manifest.created,
        dir.display()
    );
    Ok(())
}
