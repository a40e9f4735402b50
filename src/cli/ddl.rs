//! `dap ddl`: the DDL `initdb` would run on an empty database, for a DBA to review and provision
//! before granting rights. It comes from the adapters' own code, from the live schemas, from
//! files written by `dap schema`, or offline from the schemas a mirror stored.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;

use super::Context;
use crate::api::Client;
use crate::run::Tables;
use crate::schema::TableDef;
use crate::sink::{self, Access, Scheme, SinkOptions};
use crate::target;

#[derive(Debug, Args)]
pub struct DdlArgs {
    /// The database to write the DDL for: postgresql, mysql, mssql or sqlite.
    #[arg(long, value_parser = parse_dialect)]
    dialect: Scheme,
    /// Namespace, e.g. canvas, canvas_logs, catalog.
    #[arg(long)]
    namespace: String,
    /// `all`, or a comma-separated list of tables.
    #[arg(long)]
    table: String,
    /// Schema files written by `dap schema` (or folders of them) instead of asking DAP.
    #[arg(long = "schema-file", value_name = "PATH")]
    schema_files: Vec<PathBuf>,
    /// Take the schemas this mirror folder stored instead of asking DAP (used as well, with the
    /// default mirror, when no DAP credentials are set).
    #[arg(long, conflicts_with = "schema_files")]
    dir: Option<PathBuf>,
}

impl DdlArgs {
    /// Whether the schemas come from files or a named mirror, never from DAP.
    pub fn is_offline(&self) -> bool {
        !self.schema_files.is_empty() || self.dir.is_some()
    }
}

/// A database of the registry, by the name (or another spelling) of its scheme.
fn parse_dialect(name: &str) -> Result<Scheme, String> {
    Scheme::of(name).ok_or_else(|| format!("{name:?} is not one of {}", sink::scheme_names()))
}

/// Every `<table>_schema_version_<N>.json` named by `paths` (files, or folders of them), by table;
/// the highest version of a table wins.
fn schema_files(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, u64, PathBuf)>> {
    let mut found: Vec<(String, u64, PathBuf)> = Vec::new();
    let mut consider = |p: &Path| -> anyhow::Result<()> {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let Some((table, version)) = name.strip_suffix(".json").and_then(|stem| stem.rsplit_once("_schema_version_"))
        else {
            bail!("{} is not a schema file written by `dap schema` (<table>_schema_version_<N>.json)", p.display());
        };
        let version: u64 = version.parse().with_context(|| format!("{}: the version is not a number", p.display()))?;
        match found.iter_mut().find(|(t, _, _)| t == table) {
            Some(entry) if entry.1 >= version => {}
            Some(entry) => *entry = (table.to_string(), version, p.to_path_buf()),
            None => found.push((table.to_string(), version, p.to_path_buf())),
        }
        Ok(())
    };
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("_schema_version_"))
                .collect();
            entries.sort();
            for e in entries {
                consider(&e)?;
            }
        } else {
            consider(path)?;
        }
    }
    Ok(found)
}

/// The schemas the mirror stored for the tables asked for (every mirrored one with `all`).
async fn mirrored_schemas(
    ctx: &Context,
    args: &DdlArgs,
    selection: Option<Vec<String>>,
) -> anyhow::Result<Vec<TableDef>> {
    let spec = super::db::target_spec(None, args.dir.as_deref())?;
    let options = SinkOptions { access: Access::Read, shared: ctx.shared, ..SinkOptions::default() };
    let mirror = target::open(&spec, &args.namespace, &options).await?;
    let stored = mirror.all_bookkeeping(&args.namespace).await?;
    let names = selection.unwrap_or_else(|| stored.iter().map(|b| b.table.clone()).collect());
    if args.dir.is_none() {
        tracing::warn!(
            "no DAP credentials: the DDL of the schemas {} stored (set them with `dap configure` to ask DAP for the current ones)",
            mirror.describe()
        );
    }
    names
        .iter()
        .map(|t| {
            let b = stored.iter().find(|b| &b.table == t).with_context(|| {
                format!(
                    "{}.{t} is not in the mirror {}: ask DAP for its schema (set the credentials with `dap configure`), or give --schema-file",
                    args.namespace,
                    mirror.describe()
                )
            })?;
            Ok(b.table_def()?)
        })
        .collect()
}

pub async fn run(ctx: &Context, args: DdlArgs) -> anyhow::Result<()> {
    let selection = match Tables::parse(&args.table)? {
        Tables::All => None,
        Tables::Named(list) => Some(list),
    };
    let mut defs: Vec<TableDef> = Vec::new();
    if args.schema_files.is_empty() && (args.dir.is_some() || !ctx.client.has_credentials()) {
        defs = mirrored_schemas(ctx, &args, selection).await?;
    } else if args.schema_files.is_empty() {
        let client = Client::new(ctx.client.clone())?;
        let names = match selection {
            Some(list) => list,
            None => client.tables(&args.namespace).await?,
        };
        for t in names {
            let envelope = client.schema(&args.namespace, &t).await?;
            defs.push(TableDef::from_versioned(&args.namespace, &t, &envelope)?);
        }
    } else {
        let files = schema_files(&args.schema_files)?;
        let names = selection.unwrap_or_else(|| files.iter().map(|(t, _, _)| t.clone()).collect());
        for t in names {
            let (_, _, path) = files
                .iter()
                .find(|(name, _, _)| *name == t)
                .with_context(|| format!("no schema file for table {t} among the --schema-file paths"))?;
            let envelope: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
                    .with_context(|| format!("{} is not JSON", path.display()))?;
            defs.push(TableDef::from_versioned(&args.namespace, &t, &envelope)?);
        }
    }
    for statement in target::ddl(args.dialect, &defs) {
        println!("{statement};");
    }
    Ok(())
}
