//! `dap query`: read-only SQL over every namespace of the mirror, printed as a table on a terminal
//! or in a format for scripts; without SQL, an interactive `sqlite3` shell on the same files.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::query::{self, OutputFormat};

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// One read-only SQL statement; tables are `<namespace>.<table>` (e.g. `canvas.users`), or
    /// plain names when unique. Omit it for an interactive sqlite3 shell.
    sql: Option<String>,
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

/// The mirror folder: `--dir`, else the default mirror's.
pub(super) fn mirror_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match dir {
        Some(d) => d,
        None => crate::mirror::folder::default_dir()?,
    })
}

pub fn run(args: QueryArgs) -> anyhow::Result<()> {
    let dir = mirror_dir(args.dir)?;
    let Some(sql) = args.sql else {
        let shell_args = query::shell_args(&dir)?;
        // The shell reads as dap does: it leaves no -wal/-shm behind either.
        let files = crate::mirror::folder::namespace_files(&dir);
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
    let format =
        args.format.unwrap_or(if std::io::stdout().is_terminal() { OutputFormat::Table } else { OutputFormat::Csv });
    let conn = query::open_mirror(&dir)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let rows = query::run(&conn, &sql, format, args.max_width, &mut out)?;
    std::io::Write::flush(&mut out)?;
    tracing::debug!("{rows} rows");
    Ok(())
}
