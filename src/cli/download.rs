//! `list`, `schema`, `snapshot` and `incremental`: the commands that talk to DAP and write files.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;

use super::Context;
use crate::api::Client;
use crate::api::types::Format;
use crate::download::{DownloadRequest, download_table};
use crate::per_table::{self};
use crate::progress::Progress;
use crate::run::Tables;
use crate::time::{self, Micros};

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Namespace, e.g. canvas, canvas_logs, catalog.
    #[arg(long)]
    namespace: String,
    /// DAP's documented `scope` parameter: which account to read (e.g. one root account) when the
    /// credentials can read several; by default, what the credentials were issued for.
    #[arg(long)]
    scope: Option<String>,
}

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Namespace, e.g. canvas, canvas_logs, catalog.
    #[arg(long)]
    namespace: String,
    /// `all`, or a comma-separated list of tables.
    #[arg(long)]
    table: String,
    /// Folder the files are written under.
    #[arg(long, default_value = "downloads")]
    output_directory: PathBuf,
    /// DAP's documented `scope` parameter: which account to read (e.g. one root account) when the
    /// credentials can read several; by default, what the credentials were issued for.
    #[arg(long)]
    scope: Option<String>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Namespace, e.g. canvas, canvas_logs, catalog.
    #[arg(long)]
    namespace: String,
    /// `all`, or a comma-separated list of tables.
    #[arg(long)]
    table: String,
    /// File format of the objects: csv, jsonl, parquet or tsv.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    format: Format,
    /// Folder the files are written under.
    #[arg(long, default_value = "downloads")]
    output_directory: PathBuf,
    /// Print a machine-readable result per table on stdout.
    #[arg(long)]
    json: bool,
    /// DAP's documented `scope` parameter: which account to read (e.g. one root account) when the
    /// credentials can read several; by default, what the credentials were issued for.
    #[arg(long)]
    scope: Option<String>,
    /// Tables that download at once. Jobs for up to 32 tables are requested and waited on
    /// together, as fast as the job rate allows.
    #[arg(long, default_value_t = 4)]
    parallel_tables: usize,
    /// Objects downloaded at once per table.
    #[arg(long, default_value_t = 4)]
    parallel_downloads: usize,
}

#[derive(Debug, Args)]
pub struct IncrementalArgs {
    #[command(flatten)]
    common: SnapshotArgs,
    /// Start of the change window (RFC 3339 with an offset; without one it is read as UTC).
    #[arg(long, value_parser = parse_time)]
    since: CliTime,
    /// End of the change window (exclusive); the latest commit when omitted.
    #[arg(long, value_parser = parse_time)]
    until: Option<CliTime>,
}

/// A `--since`/`--until` value.
#[derive(Debug, Clone, Copy)]
pub struct CliTime {
    micros: Micros,
    /// Given without an offset and read as UTC.
    naive: bool,
}

fn parse_time(s: &str) -> Result<CliTime, String> {
    if let Ok(micros) = time::parse_rfc3339(s) {
        return Ok(CliTime { micros, naive: false });
    }
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(s, f).ok())
        .or_else(|| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0)));
    match naive {
        Some(dt) => Ok(CliTime { micros: dt.and_utc().timestamp_micros(), naive: true }),
        None => Err(format!("{s:?} is not a timestamp; expected RFC 3339 such as 2024-05-01T12:00:00Z")),
    }
}

fn warn_if_naive(name: &str, t: Option<CliTime>) {
    if let Some(t) = t.filter(|t| t.naive) {
        tracing::warn!("--{name} has no UTC offset; reading it as UTC ({})", time::format_wire(t.micros));
    }
}

fn client(ctx: &Context, scope: &Option<String>) -> anyhow::Result<Client> {
    let mut config = ctx.client.clone();
    config.scope = scope.clone();
    Ok(Client::new(config)?)
}

async fn resolve_tables(client: &Client, namespace: &str, spec: &str) -> anyhow::Result<Vec<String>> {
    match Tables::parse(spec)? {
        Tables::Named(list) => Ok(list),
        Tables::All => {
            client.tables(namespace).await.with_context(|| format!("listing the tables of namespace {namespace}"))
        }
    }
}

pub async fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<()> {
    let client = client(ctx, &args.scope)?;
    let tables = client
        .tables(&args.namespace)
        .await
        .with_context(|| format!("listing the tables of namespace {}", args.namespace))?;
    for t in tables {
        println!("{t}");
    }
    Ok(())
}

async fn write_schema(client: &Client, namespace: &str, table: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let schema = client.schema(namespace, table).await?;
    let version =
        schema.get("version").and_then(serde_json::Value::as_u64).context("the schema response has no version")?;
    let path = dir.join(format!("{}_schema_version_{version}.json", crate::fetch::safe_component(table)));
    // Byte-identical to the official client's file (Python's json.dump with indent=4).
    let text = crate::pyjson::to_vec_indent4(&schema)?;
    let temp = path.with_extension("json.partial");
    tokio::fs::write(&temp, &text).await.with_context(|| format!("writing {}", temp.display()))?;
    tokio::fs::rename(&temp, &path).await.with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

struct SchemaError(anyhow::Error);

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl crate::error::Classify for SchemaError {
    fn retry(&self) -> crate::error::Retry {
        crate::error::Retry::Useless
    }

    fn is_fatal(&self) -> bool {
        self.0.downcast_ref::<crate::api::ApiError>().is_some_and(|e| e.is_fatal())
    }
}

pub async fn schema(ctx: &Context, args: SchemaArgs) -> anyhow::Result<()> {
    let client = client(ctx, &args.scope)?;
    let tables = resolve_tables(&client, &args.namespace, &args.table).await?;
    tokio::fs::create_dir_all(&args.output_directory)
        .await
        .with_context(|| format!("creating {}", args.output_directory.display()))?;
    let outcomes = per_table::run_each(&tables, 8, |t| {
        let (client, ns, dir) = (&client, &args.namespace, &args.output_directory);
        async move {
            let path = write_schema(client, ns, &t, dir).await.map_err(SchemaError).inspect_err(|e| {
                tracing::warn!("{t}: {e}");
            })?;
            tracing::info!("schema of {t} written to {}", path.display());
            Ok::<_, SchemaError>(path)
        }
    })
    .await;
    super::finish(ctx.console, "schema", &outcomes)
}

async fn export(
    ctx: &Context,
    args: SnapshotArgs,
    since: Option<CliTime>,
    until: Option<CliTime>,
) -> anyhow::Result<()> {
    warn_if_naive("since", since);
    warn_if_naive("until", until);
    let command = if since.is_some() { "incremental" } else { "snapshot" };
    let client = client(ctx, &args.scope)?;
    let tables = resolve_tables(&client, &args.namespace, &args.table).await?;
    let request = DownloadRequest {
        namespace: args.namespace.clone(),
        format: args.format,
        since: since.map(|t| t.micros),
        until: until.map(|t| t.micros),
        output_dir: args.output_directory.clone(),
        download_concurrency: args.parallel_downloads,
        transfers: std::sync::Arc::new(tokio::sync::Semaphore::new(args.parallel_tables.max(1))),
    };
    tokio::fs::create_dir_all(&request.output_dir)
        .await
        .with_context(|| format!("creating {}", request.output_dir.display()))?;
    let progress = Progress::new(ctx.interactive && !args.json);
    let outcomes = per_table::run_each(&tables, per_table::JOBS_IN_FLIGHT, |t| {
        let (client, request, progress) = (&client, &request, &progress);
        async move {
            let p = std::sync::Arc::new(progress.table(&t));
            let result = download_table(client, request, &t, &p).await;
            if let Err(e) = &result {
                p.fail(e);
            }
            result
        }
    })
    .await;
    if args.json {
        super::print_json(&outcomes)?;
    }
    super::finish(ctx.console, command, &outcomes)
}

pub async fn snapshot(ctx: &Context, args: SnapshotArgs) -> anyhow::Result<()> {
    export(ctx, args, None, None).await
}

pub async fn incremental(ctx: &Context, args: IncrementalArgs) -> anyhow::Result<()> {
    if let Some(until) = args.until
        && until.micros <= args.since.micros
    {
        return Err(super::UsageError(format!(
            "--until ({}) must be later than --since ({})",
            time::format_wire(until.micros),
            time::format_wire(args.since.micros)
        ))
        .into());
    }
    export(ctx, args.common, Some(args.since), args.until).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_and_without_offsets() {
        let t = parse_time("2024-05-01T14:00:00.5+02:00").unwrap();
        assert_eq!((time::format_wire(t.micros), t.naive), ("2024-05-01T12:00:00.500000Z".to_string(), false));
        let t = parse_time("2024-05-01T12:00:00").unwrap();
        assert_eq!((time::format_wire(t.micros), t.naive), ("2024-05-01T12:00:00Z".to_string(), true));
        assert!(parse_time("2024-05-01").unwrap().naive);
        assert!(parse_time("yesterday").is_err());
    }
}
