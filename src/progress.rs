//! Progress: on a terminal, one line per table in flight (its phase, objects, bytes, rows, rates
//! and ETA) above an overall line (tables done, the wait for the next job slot under the job
//! limit in force); a finished table's outcome is printed above them for good, and counted at
//! once. The block is never taller than the terminal: the tables that do not fit are summed up
//! as "… and N more in flight", and each line is cut to the terminal's width, so nothing is
//! clipped mid-line. Off a terminal, a log line per phase. Log records written while the lines
//! are drawn go above them ([`console_writer`]), so the two never tear each other.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use crate::fetch::FetchProgress;

/// The lines being drawn, if any: log records are written around them.
static DRAWN: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// How often the lines are redrawn while nothing else happens (rates and waits keep moving).
const TICK: Duration = Duration::from_millis(200);

/// Width of the table name column.
const NAME_WIDTH: usize = 24;

/// Where the progress of a command goes.
pub struct Progress {
    board: Option<Arc<Board>>,
}

/// The drawn block: one bar whose message is every line, composed at each redraw.
struct Board {
    lines: MultiProgress,
    bar: ProgressBar,
    /// The tables in flight, in the order they started.
    tables: Mutex<Vec<Arc<TableState>>>,
    overall: Mutex<Option<Arc<OverallCounts>>>,
}

impl Board {
    fn redraw(&self) {
        let tables = self.tables.lock().expect("progress lock");
        self.draw(&tables);
    }

    /// Composes the block from `tables` (whose lock the caller holds, so that a table leaving,
    /// its count and its outcome line are one step for every drawing).
    fn draw(&self, tables: &[Arc<TableState>]) {
        let (rows, cols) = console::Term::stderr().size();
        let (rows, cols) = (rows.max(3) as usize, cols.max(20) as usize);
        let overall = self.overall.lock().expect("progress lock").as_ref().map(|o| o.line());
        self.bar.set_message(compose(tables, overall, rows, cols).join("\n"));
    }

    /// Takes a table out of the block; with `outcome`, counts it done and prints its outcome
    /// above the block, in one step.
    fn leave(&self, state: &Arc<TableState>, outcome: Option<&str>) {
        let mut tables = self.tables.lock().expect("progress lock");
        let before = tables.len();
        tables.retain(|t| !Arc::ptr_eq(t, state));
        let left = before != tables.len();
        if let (true, Some(outcome)) = (left, outcome) {
            if let Some(overall) = self.overall.lock().expect("progress lock").as_ref() {
                overall.done.fetch_add(1, Ordering::Relaxed);
            }
            self.draw(&tables);
            let _ = self.lines.println(format!("{:<NAME_WIDTH$} {outcome}", state.name));
        } else if left {
            self.draw(&tables);
        }
    }
}

/// The lines of the block for a terminal of `rows` × `cols`: the tables that fit, a summary of
/// the others, the overall line last; none taller or wider than the terminal.
fn compose(tables: &[Arc<TableState>], overall: Option<String>, rows: usize, cols: usize) -> Vec<String> {
    // One row stays free for the cursor, one for the overall line.
    let room = rows.saturating_sub(1 + usize::from(overall.is_some())).max(1);
    let shown = if tables.len() <= room { tables.len() } else { room.saturating_sub(1) };
    let mut out: Vec<String> =
        tables[..shown].iter().map(|t| fit(&format!("{:<NAME_WIDTH$} {}", t.name, t.line()), cols)).collect();
    if shown < tables.len() {
        out.push(fit(&format!("… and {} more in flight", tables.len() - shown), cols));
    }
    out.extend(overall.map(|o| fit(&o, cols)));
    out
}

/// `line` cut to fit `cols` display columns (a terminal wraps a longer one, and the redraw then
/// leaves the extra row behind).
fn fit(line: &str, cols: usize) -> String {
    let limit = cols.saturating_sub(1);
    if line.width() <= limit {
        return line.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in line.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > limit {
            break;
        }
        out.push(c);
        used += w;
    }
    out.push('…');
    out
}

impl Progress {
    /// Lines only when asked for and stderr is a terminal; log lines otherwise.
    pub fn new(interactive: bool) -> Progress {
        let terminal = interactive && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let board = terminal.then(|| {
            let lines = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let bar = lines.add(ProgressBar::new_spinner());
            bar.set_style(ProgressStyle::with_template("{msg}").expect("valid template"));
            *DRAWN.lock().expect("progress lock") = Some(lines.clone());
            let board = Arc::new(Board { lines, bar, tables: Mutex::new(Vec::new()), overall: Mutex::new(None) });
            // Rates, ETAs and countdowns move while nothing else happens.
            let ticking = Arc::downgrade(&board);
            std::thread::spawn(move || {
                while let Some(board) = ticking.upgrade() {
                    if board.bar.is_finished() {
                        break;
                    }
                    board.redraw();
                    drop(board);
                    std::thread::sleep(TICK);
                }
            });
            board
        });
        Progress { board }
    }

    /// A table's line, above the overall line.
    pub fn table(&self, name: &str) -> TableProgress {
        let state = Arc::new(TableState::new(name));
        if let Some(board) = &self.board {
            board.tables.lock().expect("progress lock").push(state.clone());
        }
        TableProgress { state, board: self.board.clone() }
    }

    /// The overall line of a run over `tables` tables; `next_slot` says how long a job created
    /// now would wait for the job limit, which `limit` describes ("5 jobs a minute"). Nothing
    /// off a terminal (each table logs its wait).
    pub fn overall(
        &self,
        tables: usize,
        limit: String,
        next_slot: impl Fn() -> Duration + Send + Sync + 'static,
    ) -> Overall {
        let counts =
            Arc::new(OverallCounts { tables, limit, next_slot: Box::new(next_slot), done: AtomicUsize::new(0) });
        if let Some(board) = &self.board {
            *board.overall.lock().expect("progress lock") = Some(counts.clone());
            board.redraw();
        }
        Overall { board: self.board.clone() }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(board) = &self.board {
            board.bar.finish_and_clear();
            *DRAWN.lock().expect("progress lock") = None;
        }
    }
}

struct OverallCounts {
    tables: usize,
    /// The job limit in force, as people say it.
    limit: String,
    next_slot: Box<dyn Fn() -> Duration + Send + Sync>,
    done: AtomicUsize,
}

impl OverallCounts {
    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed).min(self.tables);
        let mut line = format!("{done}/{} tables done", self.tables);
        let next_slot = (self.next_slot)();
        if !next_slot.is_zero() && done < self.tables {
            line.push_str(&format!(", next job slot in {} s (DAP allows {})", next_slot.as_secs() + 1, self.limit));
        }
        line
    }
}

/// The overall line, shown while the run lasts.
pub struct Overall {
    board: Option<Arc<Board>>,
}

impl Drop for Overall {
    fn drop(&mut self) {
        if let Some(board) = &self.board {
            *board.overall.lock().expect("progress lock") = None;
            board.redraw();
        }
    }
}

/// What a table's line shows.
struct TableState {
    name: String,
    /// The phase shown, so that polling does not repeat it.
    stage: Mutex<String>,
    /// When the job slot the table waits for frees up (a countdown while it waits).
    slot_at: Mutex<Option<Instant>>,
    bytes: AtomicU64,
    done: AtomicUsize,
    total: AtomicUsize,
    rows: AtomicU64,
    /// Rows the transfer will carry, when the source knows (a mirror's snapshot).
    expected_rows: AtomicU64,
    /// When the transfer began, for its rates.
    started: Mutex<Instant>,
}

impl TableState {
    fn new(name: &str) -> TableState {
        TableState {
            name: name.to_string(),
            stage: Mutex::new(String::new()),
            slot_at: Mutex::new(None),
            bytes: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            rows: AtomicU64::new(0),
            expected_rows: AtomicU64::new(0),
            started: Mutex::new(Instant::now()),
        }
    }

    /// The phase with its counts, rates and ETA.
    fn line(&self) -> String {
        let stage = self.stage.lock().expect("stage lock").clone();
        if let Some(at) = *self.slot_at.lock().expect("progress lock") {
            let left = at.saturating_duration_since(Instant::now());
            return format!("{stage} (about {} s)", left.as_secs() + 1);
        }
        let (bytes, done, total, rows, expected) = (
            self.bytes.load(Ordering::Relaxed),
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
            self.rows.load(Ordering::Relaxed),
            self.expected_rows.load(Ordering::Relaxed),
        );
        if total == 0 && rows == 0 {
            return stage;
        }
        let secs = self.started.lock().expect("progress lock").elapsed().as_secs_f64().max(0.001);
        let mut parts = Vec::new();
        if total > 0 {
            let mb = bytes as f64 / 1e6;
            parts.push(format!("{done}/{total} objects, {mb:.1} MB, {:.1} MB/s", mb / secs));
        }
        if rows > 0 || expected > 0 {
            let of = if expected > 0 { format!(" of {expected}") } else { String::new() };
            parts.push(format!("{rows}{of} rows, {:.0} rows/s", rows as f64 / secs));
        }
        let eta = if expected > rows && rows > 0 {
            Some(secs / rows as f64 * (expected - rows) as f64)
        } else if done > 0 && total > done {
            Some(secs / done as f64 * (total - done) as f64)
        } else {
            None
        };
        if let Some(eta) = eta {
            parts.push(format!("ETA {eta:.0} s"));
        }
        format!("{stage}: {}", parts.join(", "))
    }
}

/// One table's progress.
pub struct TableProgress {
    state: Arc<TableState>,
    /// The drawn block, on a terminal.
    board: Option<Arc<Board>>,
}

impl TableProgress {
    /// A new phase of the table's work (job queued, downloading, …).
    pub fn stage(&self, what: &str) {
        *self.state.slot_at.lock().expect("progress lock") = None;
        {
            let mut last = self.state.stage.lock().expect("stage lock");
            if *last == what {
                return;
            }
            *last = what.to_string();
        }
        match &self.board {
            Some(board) => board.redraw(),
            None => tracing::info!("{}: {what}", self.state.name),
        }
    }

    /// Waiting for a job slot that frees up in `wait` under the job limit `limit`: a countdown
    /// on a terminal, one log line elsewhere.
    pub fn waiting_for_slot(&self, wait: Duration, limit: &str) {
        let what = "waiting for a job slot";
        match &self.board {
            Some(board) => {
                *self.state.stage.lock().expect("stage lock") = what.to_string();
                *self.state.slot_at.lock().expect("progress lock") = Some(Instant::now() + wait);
                board.redraw();
            }
            None => {
                let mut last = self.state.stage.lock().expect("stage lock");
                if *last != what {
                    *last = what.to_string();
                    tracing::info!("{}: {what} (about {} s; DAP allows {limit})", self.state.name, wait.as_secs() + 1);
                }
            }
        }
    }

    /// The transfer of `objects` objects begins.
    pub fn downloading(&self, objects: usize) {
        self.begin_transfer(objects, 0);
        self.stage(&format!("downloading {objects} objects"));
    }

    /// A transfer of about `rows` rows begins, read from a source that knows them (the mirror).
    pub fn reading(&self, what: &str, rows: u64) {
        self.begin_transfer(0, rows);
        self.stage(what);
    }

    fn begin_transfer(&self, objects: usize, rows: u64) {
        let s = &self.state;
        s.total.store(objects, Ordering::Relaxed);
        s.expected_rows.store(rows, Ordering::Relaxed);
        s.bytes.store(0, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.rows.store(0, Ordering::Relaxed);
        *s.started.lock().expect("progress lock") = Instant::now();
    }

    /// `n` more rows went to the target.
    pub fn rows(&self, n: u64) {
        if self.state.rows.fetch_add(n, Ordering::Relaxed) == 0 && self.state.total.load(Ordering::Relaxed) > 0 {
            self.stage("loading");
        }
        self.redraw();
    }

    fn redraw(&self) {
        if let Some(board) = &self.board {
            board.redraw();
        }
    }

    /// Replaces the table's line by its outcome, printed above the lines in flight, and counts
    /// the table done in the same step.
    fn settle(&self, board: &Board, outcome: &str) {
        board.leave(&self.state, Some(outcome));
    }

    /// The table's outcome.
    pub fn finish(&self, outcome: &str) {
        match &self.board {
            Some(board) => self.settle(board, outcome),
            None => tracing::info!("{}: {outcome}", self.state.name),
        }
    }

    /// The table's outcome when it failed (a warning off a terminal).
    pub fn fail(&self, error: &dyn std::fmt::Display) {
        let line = crate::term::in_context(&self.state.name, &error.to_string());
        match &self.board {
            Some(board) => {
                let cause = line.strip_prefix(&format!("{}: ", self.state.name)).unwrap_or(&line);
                self.settle(board, &format!("failed: {cause}"))
            }
            None => tracing::warn!("{line}"),
        }
    }
}

impl Drop for TableProgress {
    /// A table that ends without an outcome (its task stopped) leaves the block.
    fn drop(&mut self) {
        if let Some(board) = &self.board {
            board.leave(&self.state, None);
        }
    }
}

impl FetchProgress for TableProgress {
    fn bytes(&self, n: u64) {
        self.state.bytes.fetch_add(n, Ordering::Relaxed);
        self.redraw();
    }

    fn object_done(&self) {
        self.state.done.fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str) -> Arc<TableState> {
        let t = TableState::new(name);
        *t.stage.lock().unwrap() = "job running".into();
        Arc::new(t)
    }

    #[test]
    fn the_block_is_never_taller_or_wider_than_the_terminal() {
        let tables: Vec<Arc<TableState>> = (0..28).map(|i| table(&format!("table_{i:02}"))).collect();
        let lines = compose(&tables, Some("3/31 tables done".into()), 24, 40);
        assert_eq!(lines.len(), 23, "24 rows: 23 lines and the cursor's: {lines:#?}");
        assert_eq!(lines[21], "… and 7 more in flight");
        assert_eq!(lines[22], "3/31 tables done", "the overall line comes last");
        assert!(lines.iter().all(|l| l.width() <= 39), "{lines:#?}");
        // All fit: every table, no summary.
        let lines = compose(&tables[..5], Some("0/5 tables done".into()), 24, 200);
        assert_eq!(lines.len(), 6);
        assert!(!lines.iter().any(|l| l.contains("more in flight")));
        // Double-width characters count twice.
        assert_eq!(fit("表表表表表表", 8).width(), 7);
    }

    #[test]
    fn a_wait_for_a_slot_counts_down_and_a_known_total_gives_an_eta() {
        let t = table("users");
        *t.stage.lock().unwrap() = "waiting for a job slot".into();
        *t.slot_at.lock().unwrap() = Some(Instant::now() + Duration::from_millis(19_500));
        assert_eq!(t.line(), "waiting for a job slot (about 20 s)");
        *t.slot_at.lock().unwrap() = Some(Instant::now() + Duration::from_millis(4_500));
        assert_eq!(t.line(), "waiting for a job slot (about 5 s)");
        *t.slot_at.lock().unwrap() = None;
        *t.stage.lock().unwrap() = "reading the mirror".into();
        *t.started.lock().unwrap() = Instant::now() - Duration::from_secs(10);
        t.expected_rows.store(4000, Ordering::Relaxed);
        t.rows.store(1000, Ordering::Relaxed);
        let line = t.line();
        assert!(line.starts_with("reading the mirror: 1000 of 4000 rows, 100 rows/s, ETA 30 s"), "{line}");
        assert!(!line.contains("objects"), "no objects where there are none: {line}");
    }

    #[test]
    fn the_overall_line_names_the_limit_in_force() {
        let counts = OverallCounts {
            tables: 4,
            limit: "2 jobs every 3 s".into(),
            next_slot: Box::new(|| Duration::from_millis(2500)),
            done: AtomicUsize::new(1),
        };
        assert_eq!(counts.line(), "1/4 tables done, next job slot in 3 s (DAP allows 2 jobs every 3 s)");
    }
}
