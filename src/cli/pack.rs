//! `dap pack` and `dap unpack`: the mirror as one zstd-compressed file, and back.

use std::path::PathBuf;

use clap::Args;

use crate::mirror::format::UserViews;
use crate::pack::{self, Overwrite, UnpackOptions};

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
    /// Accept views in the pack's databases (a pack of your own mirror, with views you made).
    /// Other objects dap does not make (triggers, virtual tables) are always refused.
    #[arg(long)]
    allow_views: bool,
    /// The most the pack may unpack to, e.g. 20G [default: 100 times the pack's size, at least
    /// 64M, which stops a decompression bomb early].
    #[arg(long, value_parser = parse_size)]
    max_size: Option<u64>,
}

/// `123`, `64K`, `20M`, `3G` or `1T` bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = t.find(|c: char| !c.is_ascii_digit()).map_or((t, ""), |i| t.split_at(i));
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size such as 500M or 20G"))?;
    let factor: u64 = match unit.to_ascii_uppercase().trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("{text:?}: the unit must be K, M, G or T")),
    };
    n.checked_mul(factor).ok_or_else(|| format!("{text:?} is too large"))
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
    // The next command must find this folder: named in the hint unless it is the default.
    let named = args.dir.as_ref().map(|d| format!(" --dir '{}'", d.display())).unwrap_or_default();
    let dir = super::query::mirror_dir(args.dir)?;
    let overwrite = if args.force { Overwrite::Replace } else { Overwrite::Refuse };
    let views = if args.allow_views { UserViews::Accept } else { UserViews::Refuse };
    let options = UnpackOptions { overwrite, views, max_size: args.max_size };
    let manifest = pack::unpack(&args.file, &dir, options)?;
    eprintln!(
        "unpack: {} (packed {}) restored into {}; `dap syncdb --namespace NS --table all{named}` continues from there",
        manifest.namespaces.join(", "),
        manifest.created,
        dir.display()
    );
    Ok(())
}
