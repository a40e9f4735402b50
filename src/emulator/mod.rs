//! A faithful local DAP server: the Query API on loopback with deterministic synthetic data, a
//! change history, schema evolution, rate limits, fault injection and a ground-truth endpoint.
//!
//! Start it in-process with [`Emulator::start`] (port 0 picks a free port) or from the command
//! line with `dap emulator`. Routes outside `/dap` and `/ids` (under `/emulator`) control it.

mod api_error;
mod auth;
mod control;
pub mod dataset;
pub mod faults;
pub mod generate;
pub mod history;
mod jobs;
mod objects;
pub mod output;
mod rate_limit;
mod rng;
mod server;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tokio::sync::oneshot;

pub use dataset::SchemaChange;
pub use faults::{Endpoint, FaultKind, FaultSpec};
pub use output::{CsvNull, Format, Mode};

use dataset::{Dataset, DatasetError};
use generate::Generator;
use jobs::Jobs;
use objects::ObjectStore;
use rate_limit::RateLimiter;

use crate::time::{self, Micros};

/// Everything about the emulated service that a test or a user may want to change.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Loopback port; 0 picks a free one.
    pub port: u16,
    pub seed: u64,
    /// Base rows per table.
    pub rows: u64,
    /// Base rows for particular tables, by `namespace.table` or bare table name.
    pub table_rows: HashMap<String, u64>,
    pub client_id: String,
    pub client_secret: String,
    pub token_lifetime: Duration,
    /// How long a new job stays `waiting`, then `running`.
    pub job_waiting: Duration,
    pub job_running: Duration,
    pub job_lifetime: Duration,
    pub url_lifetime: Duration,
    /// Rows per part file.
    pub part_rows: u64,
    /// Enforce the documented per-endpoint rate limits.
    pub rate_limits: bool,
    /// The window the limits count over (a minute in the real service).
    pub rate_window: Duration,
    /// Export time of the base data; generated timestamps lie before it.
    pub anchor: Micros,
    /// Layout of nested objects when a query gives no `mode`.
    pub default_mode: Mode,
    pub csv_null: CsvNull,
    pub special_floats: bool,
    /// The first base rows of each table carry the edges of every column's domain (extremes,
    /// longest texts, years 1 and 9999). Off for data meant to be looked at (`dap demo`).
    pub edge_rows: bool,
    /// Share of rows a `web_logs` snapshot repeats.
    pub web_logs_duplicate_rate: f64,
    /// Incrementals with `since` older than this are out of range.
    pub retention: Option<Duration>,
    /// How long DAP keeps append-only tables (web_logs: 30 days): a snapshot holds the logs of
    /// this window only, an incremental from before it is out of range. `None` keeps them all.
    pub log_retention: Option<Duration>,
}

pub const DEFAULT_CLIENT_ID: &str = "us-east-1#dap-replica-emulator";
pub const DEFAULT_CLIENT_SECRET: &str = "emulator-secret";
/// 2026-01-01T00:00:00Z: the tests' fixed export time, so that their data is the same every day.
pub const DEFAULT_ANCHOR: Micros = 1_767_225_600_000_000;

/// The export time of data meant for people (`dap emulator`, `dap demo`): now, to the whole
/// minute, so that its dates read as recent (web_logs of the last two weeks, a watermark of today).
pub fn anchor_now() -> Micros {
    let now = crate::time::now();
    now - now.rem_euclid(60 * crate::time::MICROS_PER_SECOND)
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            port: 0,
            seed: 1,
            rows: 100,
            table_rows: HashMap::new(),
            client_id: DEFAULT_CLIENT_ID.into(),
            client_secret: DEFAULT_CLIENT_SECRET.into(),
            token_lifetime: Duration::from_secs(3600),
            job_waiting: Duration::ZERO,
            job_running: Duration::ZERO,
            job_lifetime: Duration::from_secs(24 * 3600),
            url_lifetime: Duration::from_secs(15 * 60),
            part_rows: 10_000,
            rate_limits: false,
            rate_window: Duration::from_secs(60),
            anchor: DEFAULT_ANCHOR,
            default_mode: Mode::Expanded,
            csv_null: CsvNull::Literal,
            special_floats: true,
            edge_rows: true,
            web_logs_duplicate_rate: 0.01,
            retention: None,
            log_retention: Some(Duration::from_secs(30 * 86_400)),
        }
    }
}

impl EmulatorConfig {
    fn rows_for(&self, ns: &str, table: &str) -> u64 {
        self.table_rows
            .get(&format!("{ns}.{table}"))
            .or_else(|| self.table_rows.get(table))
            .copied()
            .unwrap_or(self.rows)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("cannot listen on 127.0.0.1:{port}: {source} (is the port in use? choose another with --port)")]
    Bind { port: u16, source: std::io::Error },
    #[error("cannot create the object spool directory: {0}")]
    Spool(std::io::Error),
}

/// How many changes of each kind a commit makes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ChangeCounts {
    #[serde(default)]
    pub inserts: usize,
    #[serde(default)]
    pub updates: usize,
    #[serde(default)]
    pub soft_deletes: usize,
    #[serde(default)]
    pub hard_deletes: usize,
}

/// What a commit did, with the keys it touched as typed JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitSummary {
    pub ts: String,
    pub inserted: Vec<Json>,
    pub updated: Vec<Json>,
    pub soft_deleted: Vec<Json>,
    pub hard_deleted: Vec<Json>,
}

/// Requests answered per endpoint and status, for tests that must prove e.g. "no 429 was sent".
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub responses: BTreeMap<String, BTreeMap<u16, u64>>,
}

impl Stats {
    pub fn count(&self, endpoint: Endpoint, status: u16) -> u64 {
        self.responses.get(&endpoint_name(endpoint)).and_then(|m| m.get(&status)).copied().unwrap_or(0)
    }

    /// Responses with this status, over every endpoint.
    pub fn total(&self, status: u16) -> u64 {
        self.responses.values().filter_map(|m| m.get(&status)).sum()
    }
}

fn endpoint_name(e: Endpoint) -> String {
    serde_json::to_value(e).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// The shared state behind every route and the in-process handle.
pub(crate) struct State {
    config: EmulatorConfig,
    /// Wall-clock start: the emulator's clock runs from the anchor at the wall clock's pace.
    started: Micros,
    signing_key: [u8; 32],
    base_url: String,
    dataset: RwLock<Dataset>,
    jobs: Mutex<Jobs>,
    objects: ObjectStore,
    faults: Mutex<faults::Faults>,
    limiter: Mutex<RateLimiter>,
    stats: Mutex<Stats>,
}

impl State {
    /// The emulator's time: the anchor (the base data's export time) plus the time it has been
    /// running, or the latest commit when a test placed one later. Windows and "now" follow it,
    /// so a test moves time by committing at a later `at`.
    fn clock(&self, d: &Dataset) -> Micros {
        (self.config.anchor + (time::now() - self.started)).max(d.latest_commit())
    }

    /// A commit now (just after the table's latest), or at `at` (later than the latest).
    fn commit(
        &self,
        ns: &str,
        table: &str,
        counts: ChangeCounts,
        at: Option<Micros>,
    ) -> Result<CommitSummary, DatasetError> {
        let mut d = self.dataset.write().expect("dataset lock");
        let head = d.table(ns, table)?.history.head();
        if at.is_some_and(|at| at - self.clock(&d) >= self.config.job_lifetime.as_micros() as Micros) {
            // Time moves past a job's lifetime: every job of before has expired, as in DAP.
            self.jobs.lock().expect("jobs lock").expire_all(time::now());
        }
        let ts = match at {
            Some(at) if at <= head => {
                return Err(DatasetError::NotAfterHead { at: time::format_wire(at), head: time::format_wire(head) });
            }
            Some(at) => at,
            // At least a second after the table's latest commit: two snapshots within one second
            // cannot be told apart by a target that keeps whole seconds (MySQL), nor happen in DAP.
            None => self.clock(&d).max(head + time::MICROS_PER_SECOND),
        };
        let plan =
            d.commit(ns, table, ts, [counts.inserts, counts.updates, counts.soft_deletes, counts.hard_deletes])?;
        let def = &d.table(ns, table)?.current().def;
        let keys = |idx: &[u64]| idx.iter().map(|i| d.generator.key(def, *i).to_typed_json()).collect();
        Ok(CommitSummary {
            ts: time::format_wire(ts),
            inserted: keys(&plan.inserts),
            updated: keys(&plan.updates),
            soft_deleted: keys(&plan.soft_deletes),
            hard_deleted: keys(&plan.hard_deletes),
        })
    }

    fn evolve(&self, ns: &str, table: &str, change: SchemaChange) -> Result<(u32, String), DatasetError> {
        self.dataset.write().expect("dataset lock").evolve(ns, table, change)
    }

    fn add_table(&self, ns: &str, table: &str, rows: u64) -> Result<(), DatasetError> {
        let mut d = self.dataset.write().expect("dataset lock");
        // After every existing commit, so the new table's rows are news to every watermark.
        let head = d.namespace(ns)?.values().map(|t| t.history.head()).max().unwrap_or(0);
        let now = self.clock(&d).max(head + 1);
        d.add_table(ns, table, rows, now)
    }

    fn truth(&self, ns: &str, table: &str, at: Option<Micros>) -> Result<Vec<Map<String, Json>>, DatasetError> {
        Ok(self.dataset.read().expect("dataset lock").truth_at(ns, table, at)?.collect())
    }

    fn record(&self, endpoint: Endpoint, status: u16) {
        let mut stats = self.stats.lock().expect("stats lock");
        *stats.responses.entry(endpoint_name(endpoint)).or_default().entry(status).or_default() += 1;
    }
}

/// A running emulator. Dropping it stops the server.
pub struct Emulator {
    state: Arc<State>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Emulator {
    /// Generates the data set and starts serving on `127.0.0.1:config.port`.
    pub async fn start(config: EmulatorConfig) -> Result<Emulator, EmulatorError> {
        let generator = Generator {
            seed: config.seed,
            anchor: config.anchor,
            special_floats: config.special_floats,
            edge_rows: config.edge_rows,
            id_space: config.rows,
        };
        let mut dataset = Dataset::bundled(generator, |ns, t| config.rows_for(ns, t))?;
        dataset.web_logs_duplicate_rate = config.web_logs_duplicate_rate;
        dataset.log_retention = config.log_retention.map(|d| d.as_micros() as Micros);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", config.port))
            .await
            .map_err(|source| EmulatorError::Bind { port: config.port, source })?;
        let addr = listener.local_addr().map_err(|source| EmulatorError::Bind { port: config.port, source })?;
        let mut signing_key = [0u8; 32];
        signing_key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        signing_key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        let state = Arc::new(State {
            started: time::now(),
            limiter: Mutex::new(RateLimiter::new(config.rate_window)),
            config,
            signing_key,
            base_url: format!("http://{addr}"),
            dataset: RwLock::new(dataset),
            jobs: Mutex::new(Jobs::default()),
            objects: ObjectStore::new().map_err(EmulatorError::Spool)?,
            faults: Mutex::new(faults::Faults::default()),
            stats: Mutex::new(Stats::default()),
        });
        let (tx, rx) = oneshot::channel();
        let app = server::router(state.clone());
        tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(e) = served.await {
                tracing::error!("emulator stopped: {e}");
            }
        });
        // `dap emulator` prints its own banner; the demo and the tests need no line of it.
        tracing::debug!("DAP emulator listening on http://{addr}");
        Ok(Emulator { state, addr, shutdown: Some(tx) })
    }

    /// `http://127.0.0.1:PORT`, the value for `--base-url` / `DAP_API_URL`.
    pub fn base_url(&self) -> &str {
        &self.state.base_url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &EmulatorConfig {
        &self.state.config
    }

    /// Appends a commit with random rows of each kind to a table's history.
    pub fn commit(&self, ns: &str, table: &str, counts: ChangeCounts) -> Result<CommitSummary, DatasetError> {
        self.state.commit(ns, table, counts, None)
    }

    /// A commit at a chosen time, after the table's latest (tests that span days or months).
    pub fn commit_at(
        &self,
        ns: &str,
        table: &str,
        counts: ChangeCounts,
        at: Micros,
    ) -> Result<CommitSummary, DatasetError> {
        self.state.commit(ns, table, counts, Some(at))
    }

    /// Bumps a table's schema version; returns the new version and the column changed.
    pub fn evolve(&self, ns: &str, table: &str, change: SchemaChange) -> Result<(u32, String), DatasetError> {
        self.state.evolve(ns, table, change)
    }

    /// Adds a table with `rows` rows to a namespace's list.
    pub fn add_table(&self, ns: &str, table: &str, rows: u64) -> Result<(), DatasetError> {
        self.state.add_table(ns, table, rows)
    }

    /// The table's current rows as typed JSON objects, in key order.
    pub fn truth(&self, ns: &str, table: &str) -> Result<Vec<Map<String, Json>>, DatasetError> {
        self.state.truth(ns, table, None)
    }

    /// The rows of a table as they were at `at` (after every commit up to and including it).
    pub fn truth_at(&self, ns: &str, table: &str, at: Micros) -> Result<Vec<Map<String, Json>>, DatasetError> {
        self.state.truth(ns, table, Some(at))
    }

    /// The current schema of a table (its `TableDef`).
    pub fn table_def(&self, ns: &str, table: &str) -> Result<crate::schema::TableDef, DatasetError> {
        Ok(self.state.dataset.read().expect("dataset lock").table(ns, table)?.current().def.clone())
    }

    /// The tables of a namespace, sorted.
    pub fn tables(&self, ns: &str) -> Result<Vec<String>, DatasetError> {
        Ok(self.state.dataset.read().expect("dataset lock").namespace(ns)?.keys().cloned().collect())
    }

    pub fn inject(&self, fault: FaultSpec) {
        self.state.faults.lock().expect("faults lock").add(fault);
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().expect("faults lock").clear();
    }

    pub fn stats(&self) -> Stats {
        self.state.stats.lock().expect("stats lock").clone()
    }

    /// Expires every job now, as if a day had passed.
    pub fn expire_jobs(&self) {
        self.state.jobs.lock().expect("jobs lock").expire_all(time::now());
    }

    /// Stops serving.
    pub fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
