//! Progress: on a terminal, an overall line (tables done, the wait for the next job slot) over one
//! line per table in flight (its phase, objects, bytes, rows, rates and ETA); a finished table's
//! outcome is printed above them for good. Off a terminal, a log line per phase. Log records
//! written while the lines are drawn go above them ([`console_writer`]), so the two never tear
//! each other. The overall line comes first because a terminal shows only as many lines as it is
//! high: with 32 jobs in flight, the table lines at the bottom are the ones cut off.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::fetch::FetchProgress;

/// The lines being drawn, if any: log records are written around them.
static DRAWN: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// How often the lines are redrawn while nothing else happens (rates and waits keep moving).
const TICK: Duration = Duration::from_millis(200);

/// Where the progress of a command goes.
pub struct Progress {
    lines: Option<MultiProgress>,
}

impl Progress {
    /// Lines only when asked for and stderr is a terminal; log lines otherwise.
    pub fn new(interactive: bool) -> Progress {
        let terminal = interactive && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let lines = terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        if let Some(lines) = &lines {
            *DRAWN.lock().expect("progress lock") = Some(lines.clone());
        }
        Progress { lines }
    }

    /// A table's line, below the overall line.
    pub fn table(&self, name: &str) -> TableProgress {
        let bar = self.lines.as_ref().map(|lines| {
            let bar = lines.add(ProgressBar::new_spinner());
            bar.set_style(ProgressStyle::with_template("{prefix:24.bold} {wide_msg}").expect("valid template"));
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(TICK);
            (lines.clone(), bar)
        });
        TableProgress {
            name: name.to_string(),
            bar,
            stage: Mutex::new(String::new()),
            bytes: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            rows: AtomicU64::new(0),
            started: Mutex::new(Instant::now()),
        }
    }

    /// The overall line of a run over `tables` tables; `next_slot` says how long a job created
    /// now would wait for the creation rate. Nothing off a terminal (each table logs its wait).
    pub fn overall(&self, tables: usize, next_slot: impl Fn() -> Duration + Send + Sync + 'static) -> Overall {
        let counts = Arc::new(OverallCounts { tables, done: AtomicUsize::new(0) });
        let Some(lines) = &self.lines else { return Overall { counts, bar: None } };
        let bar = lines.insert(0, ProgressBar::new_spinner());
        bar.set_style(ProgressStyle::with_template("{spinner} {wide_msg}").expect("valid template"));
        bar.enable_steady_tick(TICK);
        let (shown, watched) = (bar.clone(), counts.clone());
        std::thread::spawn(move || {
            while !shown.is_finished() {
                shown.set_message(watched.line(next_slot()));
                std::thread::sleep(TICK);
            }
        });
        Overall { counts, bar: Some(bar) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.lines.is_some() {
            *DRAWN.lock().expect("progress lock") = None;
        }
    }
}

struct OverallCounts {
    tables: usize,
    done: AtomicUsize,
}

impl OverallCounts {
    fn line(&self, next_slot: Duration) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let mut line = format!("{done}/{} tables done", self.tables);
        if !next_slot.is_zero() && done < self.tables {
            line.push_str(&format!(", next job slot in {} s (DAP allows 5 jobs a minute)", next_slot.as_secs() + 1));
        }
        line
    }
}

/// Tables done out of the run's.
pub struct Overall {
    counts: Arc<OverallCounts>,
    bar: Option<ProgressBar>,
}

impl Overall {
    pub fn table_done(&self) {
        self.counts.done.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Overall {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// One table's progress.
pub struct TableProgress {
    name: String,
    /// The drawn lines and this table's, on a terminal.
    bar: Option<(MultiProgress, ProgressBar)>,
    /// The phase shown, so that polling does not repeat it.
    stage: Mutex<String>,
    bytes: AtomicU64,
    done: AtomicUsize,
    total: AtomicUsize,
    rows: AtomicU64,
    /// When the transfer began, for its rates.
    started: Mutex<Instant>,
}

impl TableProgress {
    /// A new phase of the table's work (waiting for a job slot, job queued, downloading, …).
    pub fn stage(&self, what: &str) {
        {
            let mut last = self.stage.lock().expect("stage lock");
            if *last == what {
                return;
            }
            *last = what.to_string();
        }
        match &self.bar {
            Some(_) => self.redraw(),
            None => tracing::info!("{}: {what}", self.name),
        }
    }

    /// The transfer of `objects` objects begins.
    pub fn downloading(&self, objects: usize) {
        self.total.store(objects, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.rows.store(0, Ordering::Relaxed);
        *self.started.lock().expect("progress lock") = Instant::now();
        self.stage(&format!("downloading {objects} objects"));
    }

    /// `n` more rows went to the target.
    pub fn rows(&self, n: u64) {
        if self.rows.fetch_add(n, Ordering::Relaxed) == 0 {
            self.stage("loading");
        }
        self.redraw();
    }

    /// The phase with its counts and rates.
    fn line(&self) -> String {
        let stage = self.stage.lock().expect("stage lock").clone();
        let (bytes, done, total, rows) = (
            self.bytes.load(Ordering::Relaxed),
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
            self.rows.load(Ordering::Relaxed),
        );
        if total == 0 && rows == 0 {
            return stage;
        }
        let secs = self.started.lock().expect("progress lock").elapsed().as_secs_f64().max(0.001);
        let mb = bytes as f64 / 1e6;
        let mut line = format!("{stage}: {done}/{total} objects, {mb:.1} MB, {:.1} MB/s", mb / secs);
        if rows > 0 {
            line.push_str(&format!(", {rows} rows, {:.0} rows/s", rows as f64 / secs));
        }
        if done > 0 && total > done {
            line.push_str(&format!(", ETA {:.0} s", secs / done as f64 * (total - done) as f64));
        }
        line
    }

    fn redraw(&self) {
        if let Some((_, bar)) = &self.bar {
            bar.set_message(self.line());
        }
    }

    /// Replaces the table's line by its outcome, printed above the lines in flight.
    fn settle(&self, lines: &MultiProgress, bar: &ProgressBar, outcome: &str) {
        bar.finish_and_clear();
        lines.remove(bar);
        let _ = lines.println(format!("{:<24} {outcome}", self.name));
    }

    /// The table's outcome.
    pub fn finish(&self, outcome: &str) {
        match &self.bar {
            Some((lines, bar)) => self.settle(lines, bar, outcome),
            None => tracing::info!("{}: {outcome}", self.name),
        }
    }

    /// The table's outcome when it failed (a warning off a terminal).
    pub fn fail(&self, error: &dyn std::fmt::Display) {
        match &self.bar {
            Some((lines, bar)) => {
                let line = crate::term::in_context(&self.name, &error.to_string());
                let cause = line.strip_prefix(&format!("{}: ", self.name)).unwrap_or(&line);
                self.settle(lines, bar, &format!("failed: {cause}"))
            }
            None => tracing::warn!("{}", crate::term::in_context(&self.name, &error.to_string())),
        }
    }
}

impl FetchProgress for TableProgress {
    fn bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.redraw();
    }

    fn object_done(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
        self.redraw();
    }
}

/// Writes to stderr; while progress lines are drawn, above them.
pub struct ConsoleWriter;

/// The writer `tracing` logs to the console through.
pub fn console_writer() -> ConsoleWriter {
    ConsoleWriter
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let drawn = DRAWN.lock().expect("progress lock").clone();
        match drawn {
            Some(lines) => lines.suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
