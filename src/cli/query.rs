//! `dap query`: read-only SQL over every namespace of the mirror, printed as a table on a terminal
//! or in a format for scripts; without SQL, an interactive `sqlite3` shell on the same files.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::as_of::{AsOf, WithoutHistory};
use crate::query::{self, OutputFormat};

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// One read-only SQL statement; tables are `<namespace>.<table>` (e.g. `canvas.users`), or
    /// plain names when unique. Omit it for an interactive sqlite3 shell.
    sql: Option<String>,
    #[command(flatten)]
    output: Output,
    #[command(flatten)]
    as_of: AsOfArgs,
}

/// Reading the mirror as of a time (`dap query`, `dap export`).
#[derive(Debug, Args)]
pub struct AsOfArgs {
    /// Read every table as it was at this time (RFC 3339, e.g. 2026-09-15T00:00:00Z), from the
    /// tables' history (`--keep-history`). Exact at every sync: a row changed twice between two
    /// syncs shows its last change only.
    #[arg(long, value_name = "TIMESTAMP", value_parser = parse_timestamp)]
    as_of: Option<crate::time::Micros>,
    /// With --as-of: read tables that keep no history as they are now (with a warning) instead
    /// of refusing.
    #[arg(long, requires = "as_of")]
    as_of_partial: bool,
}

impl AsOfArgs {
    pub(super) fn as_of(&self) -> Option<AsOf> {
        let without = if self.as_of_partial { WithoutHistory::Current } else { WithoutHistory::Refuse };
        self.as_of.map(|at| AsOf { at, without })
    }
}

/// `dap history`: every version of one row of a table that keeps history.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Namespace, e.g. canvas.
    #[arg(long)]
    namespace: String,
    /// The table (one that keeps history, see `dap syncdb --keep-history`).
    #[arg(long)]
    table: String,
    /// The row's key (its `id`).
    #[arg(long)]
    key: String,
    #[command(flatten)]
    output: Output,
}

/// Where a read of the mirror comes from and how its rows are printed.
#[derive(Debug, Args)]
struct Output {
    /// Output format [default: table on a terminal, csv otherwise].
    #[arg(long, value_enum)]
    format: Option<OutputFormat>,
    /// The mirror folder [default: the default mirror's (DAP_MIRROR_DIR)].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The widest a column of the table and Markdown formats may be, in terminal columns; longer
    /// cells are cut and end in `…`.
    #[arg(long, default_value_t = query::DEFAULT_MAX_WIDTH)]
    max_width: usize,
}

/// An RFC 3339 timestamp (`--as-of`).
pub(super) fn parse_timestamp(s: &str) -> Result<crate::time::Micros, String> {
    crate::time::parse_rfc3339(s.trim()).map_err(|_| {
        format!("{s:?} is not an RFC 3339 timestamp; write it as 2026-09-15T00:00:00Z (or with an offset, +02:00)")
    })
}

impl Output {
    /// Runs `sql` on `conn` and prints its rows on stdout.
    fn print(&self, conn: &rusqlite::Connection, sql: &str) -> anyhow::Result<()> {
        let format = self.format.unwrap_or(if std::io::stdout().is_terminal() {
            OutputFormat::Table
        } else {
            OutputFormat::Csv
        });
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let rows = query::run(conn, sql, format, self.max_width, &mut out)?;
        std::io::Write::flush(&mut out)?;
        tracing::debug!("{rows} rows");
        Ok(())
    }
}

pub fn history(args: HistoryArgs) -> anyhow::Result<()> {
    let dir = mirror_dir(args.output.dir.clone())?;
    let conn = query::open_mirror(&dir)?;
    let attached: bool =
        conn.query_row("SELECT count(*) > 0 FROM pragma_database_list WHERE name = ?1", [&args.namespace], |r| {
            r.get(0)
        })?;
    if !attached {
        bail!("there is no mirror of namespace {} in {}", args.namespace, dir.display());
    }
    let sql = crate::as_of::versions_sql(&conn, &args.namespace, &args.table, &args.key)?;
    args.output.print(&conn, &sql)
}

/// The mirror folder: `--dir`, else the default mirror's.
pub(super) fn mirror_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match dir {
        Some(d) => d,
        None => crate::mirror::folder::default_dir()?,
    })
}

pub fn run(args: QueryArgs) -> anyhow::Result<()> {
    let dir = mirror_dir(args.output.dir.clone())?;
    let Some(sql) = args.sql else {
        let shell_args = query::shell_args(&dir)?;
        // The shell reads as dap does: it leaves no -wal/-shm behind either.
        let files = crate::mirror::folder::namespace_files(&dir)?;
        let _tidy = crate::mirror::format::LeaveNoTrace::note(files.iter().map(|(_, f)| f.as_path()));
        let status = match std::process::Command::new("sqlite3").args(&shell_args).status() {
            Ok(status) => status,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no SQL given and sqlite3 is not on the PATH: pass a statement (`dap query \"SELECT count(*) FROM canvas.users\"`), or install sqlite3 for an interactive shell"
            ),
            Err(e) => return Err(e).context("starting sqlite3"),
        };
        if !status.success() {
            bail!("sqlite3 exited with {status}");
        }
        return Ok(());
    };
    let conn = query::open_mirror(&dir)?;
    let sql = match args.as_of.as_of() {
        Some(as_of) => as_of.prepare(&conn, &sql)?,
        None => sql,
    };
    args.output.print(&conn, &sql)
}
