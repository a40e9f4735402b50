//! Progress: on a terminal, one line per table (job state, objects done/total, bytes, MB/s,
//! ETA); otherwise plain log lines at each change of state.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::fetch::FetchProgress;

pub struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    /// Bars only when asked for and stderr is a terminal.
    pub fn new(interactive: bool) -> Progress {
        let terminal = interactive && std::io::IsTerminal::is_terminal(&std::io::stderr());
        Progress { multi: terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())) }
    }

    pub fn table(&self, name: &str) -> TableProgress {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(ProgressStyle::with_template("{prefix:24.bold} {wide_msg}").expect("valid template"));
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        TableProgress {
            name: name.to_string(),
            bar,
            stage: Mutex::new(String::new()),
            bytes: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            started: Instant::now(),
        }
    }
}

pub struct TableProgress {
    name: String,
    bar: Option<ProgressBar>,
    /// The last stage shown, so that polling does not repeat it.
    stage: Mutex<String>,
    bytes: AtomicU64,
    done: AtomicUsize,
    total: AtomicUsize,
    started: Instant,
}

impl TableProgress {
    /// A new state of the table's work (job waiting, running, downloading, …).
    pub fn stage(&self, what: &str) {
        let mut last = self.stage.lock().expect("stage lock");
        if *last == what {
            return;
        }
        *last = what.to_string();
        match &self.bar {
            Some(bar) => bar.set_message(what.to_string()),
            None => tracing::info!("{}: {what}", self.name),
        }
    }

    pub fn downloading(&self, objects: usize) {
        self.total.store(objects, Ordering::Relaxed);
        self.started_download();
        self.stage(&format!("downloading {objects} objects"));
    }

    fn started_download(&self) {
        self.bytes.store(0, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    fn redraw(&self) {
        let Some(bar) = &self.bar else { return };
        let (bytes, done, total) =
            (self.bytes.load(Ordering::Relaxed), self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed));
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let mb = bytes as f64 / 1e6;
        let eta = if done > 0 && total > done {
            format!(", ETA {:.0} s", secs / done as f64 * (total - done) as f64)
        } else {
            String::new()
        };
        bar.set_message(format!("{done}/{total} objects, {mb:.1} MB, {:.1} MB/s{eta}", mb / secs));
    }

    /// The table's final line.
    pub fn finish(&self, outcome: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(outcome.to_string()),
            None => tracing::info!("{}: {outcome}", self.name),
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
