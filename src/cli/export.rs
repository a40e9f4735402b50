//! `dap export`: a mirror table, or a query over the mirror, into a CSV, TSV, JSON Lines or
//! Parquet file.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::export::{self, ExportFormat, Selection};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The namespace of --table.
    #[arg(long, default_value = "canvas")]
    namespace: String,
    /// The mirrored table to export.
    #[arg(long, conflicts_with = "query", required_unless_present = "query")]
    table: Option<String>,
    /// Only the rows matching this SQL condition (e.g. `workflow_state = 'active'`).
    #[arg(long = "where", value_name = "CONDITION", requires = "table")]
    condition: Option<String>,
    /// Export the result of this read-only query instead of a table.
    #[arg(long)]
    query: Option<String>,
    /// File format [default: from the output's extension (.csv, .tsv, .jsonl, .ndjson, .parquet;
    /// csv without one); any other extension needs --format].
    #[arg(long, value_enum)]
    format: Option<ExportFormat>,
    /// How CSV and TSV write NULL (e.g. `\N` or `NULL`); by default an empty field, which an
    /// empty string is too.
    #[arg(long, value_name = "TEXT")]
    null: Option<String>,
    /// The file to write (replaced whole when the export succeeds).
    #[arg(long, short)]
    output: PathBuf,
    /// The mirror folder [default: the default mirror's (DAP_MIRROR_DIR)].
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    as_of: super::query::AsOfArgs,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let dir = super::query::mirror_dir(args.dir)?;
    // A mirror file named as the output is the first thing to say, whatever its extension.
    crate::mirror::folder::refuse_mirror_output(&dir, &args.output).map_err(anyhow::Error::msg)?;
    let extension = args.output.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let format = match (args.format, extension.as_str()) {
        (Some(f), _) => f,
        (None, "tsv") => ExportFormat::Tsv,
        (None, "jsonl" | "ndjson") => ExportFormat::Jsonl,
        (None, "parquet") => ExportFormat::Parquet,
        (None, "csv" | "") => ExportFormat::Csv,
        // An .xlsx or .json file that silently held CSV would mislead whoever opens it.
        (None, other) => {
            return Err(super::UsageError(format!(
                "{}: dap cannot tell the format from the extension .{other}; give --format csv, tsv, jsonl or parquet \
                 (or name the file .csv, .tsv, .jsonl or .parquet)",
                args.output.display()
            ))
            .into());
        }
    };
    let selection = match (args.table, args.query) {
        (Some(table), None) => Selection::Table { namespace: args.namespace, table, condition: args.condition },
        (None, Some(query)) => Selection::Query(query),
        _ => bail!("give either --table or --query"),
    };
    let rows =
        export::export(&dir, &selection, args.as_of.as_of(), format, args.null.as_deref().unwrap_or(""), &args.output)?;
    eprintln!("export: {rows} rows written to {}", args.output.display());
    Ok(())
}
