//! `dap watch`: keeping a mirror current unattended. Runs `syncdb --init-missing` (with its
//! fan-out, metrics and record of runs) on a schedule, one run at a time: a run still going
//! when the next is due delays it and says so; a failed run is a failure of that run only (the
//! next one comes on time). On the first failed run after good ones, and on the first good run
//! after failures, it posts a JSON message to each `--notify` URL (Slack and Teams incoming
//! webhooks accept its `text`); a notification is tried a few times, never fails or holds up a
//! sync, and carries no secret. Stopping (Ctrl-C, SIGTERM) is `main`'s: between runs at once,
//! during a run with every table rolled back to its previous state, as for any command.

use std::time::Duration;

use serde_json::json;

use crate::api::Client;
use crate::progress::Progress;
use crate::run::{Plan, RunError, RunReport};

/// When runs happen.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub cadence: Cadence,
    /// Each wait is lengthened by a random part of this, so that many installations started
    /// at the same minute do not all ask DAP at once.
    pub jitter: Duration,
    /// Stop after this many runs (`--max-runs`, `--once`); `None`: until stopped.
    pub max_runs: Option<u32>,
}

/// How runs follow each other.
#[derive(Debug, Clone)]
pub enum Cadence {
    /// From the start of one run to the start of the next; the first at once.
    Every(Duration),
    /// At the minutes a cron expression names (local time); the first at the first of them.
    Cron(crate::cron::Cron),
}

impl Cadence {
    /// When the run after one that started at `started` is due (`now` for the first).
    fn due_after(&self, started: tokio::time::Instant) -> Option<tokio::time::Instant> {
        match self {
            Cadence::Every(every) => Some(started + *every),
            Cadence::Cron(cron) => {
                let elapsed = started.elapsed();
                let started_at = chrono::Local::now() - chrono::Duration::from_std(elapsed).ok()?;
                let due = cron.next_after(started_at)?;
                let wait = (due - chrono::Local::now()).to_std().unwrap_or(Duration::ZERO);
                Some(tokio::time::Instant::now() + wait)
            }
        }
    }
}

/// How one run ended, as the loop and the notifications see it.
#[derive(Debug, Clone)]
pub struct RunEnd {
    pub number: u32,
    /// Tables that failed with their error, or the reason the run could not start.
    pub failures: Vec<(String, String)>,
    pub tables: usize,
}

impl RunEnd {
    fn of(number: u32, result: &Result<RunReport, RunError>) -> RunEnd {
        match result {
            Ok(report) => RunEnd { number, failures: report.failures(), tables: report.tables.len() },
            Err(e) => RunEnd { number, failures: vec![("run".into(), e.to_string())], tables: 0 },
        }
    }

    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }
}

/// Where notifications go.
#[derive(Debug, Clone, Default)]
pub struct Notify {
    pub urls: Vec<reqwest::Url>,
}

/// Runs `plan` on `schedule` until the runs are done (or the process is stopped); returns the
/// last run's end.
pub async fn watch(client: Client, plan: &Plan, schedule: &Schedule, notify: &Notify, progress: &Progress) -> RunEnd {
    let mut pending = tokio::task::JoinSet::new();
    let mut failing = false;
    let mut number = 0u32;
    let now = tokio::time::Instant::now();
    let mut next = match &schedule.cadence {
        Cadence::Every(_) => now,
        // A cron schedule's first run is at its first minute; one schedule that never comes
        // is refused when it is parsed (see `cron`), so this always finds one.
        Cadence::Cron(_) => schedule.cadence.due_after(now).unwrap_or(now),
    };
    if next > now {
        tracing::info!(
            event = "waiting",
            seconds = (next - now).as_secs_f64(),
            "watch: first run in {:.0} s",
            (next - now).as_secs_f64()
        );
    }
    loop {
        tokio::time::sleep_until(next).await;
        number += 1;
        let started = tokio::time::Instant::now();
        tracing::info!(event = "run_started", run = number, "watch: run {number} started");
        let result = crate::run::run(client.clone(), plan, progress).await;
        let end = RunEnd::of(number, &result);
        let took = started.elapsed();
        if end.failed() {
            let names: Vec<&str> = end.failures.iter().map(|(t, _)| t.as_str()).collect();
            tracing::warn!(
                event = "run_failed",
                run = number,
                seconds = took.as_secs_f64(),
                "watch: run {number} failed after {:.1} s ({} of {} tables: {})",
                took.as_secs_f64(),
                end.failures.len(),
                end.tables.max(end.failures.len()),
                names.join(", ")
            );
        } else {
            tracing::info!(
                event = "run_succeeded",
                run = number,
                seconds = took.as_secs_f64(),
                "watch: run {number} succeeded in {:.1} s ({} tables)",
                took.as_secs_f64(),
                end.tables
            );
        }
        if end.failed() != failing && !notify.urls.is_empty() {
            let message = message(plan, &end);
            for url in notify.urls.clone() {
                let body = message.clone();
                pending.spawn(async move { post(url, body).await });
            }
        }
        failing = end.failed();
        if schedule.max_runs.is_some_and(|max| number >= max) {
            // The notifications of the last run are sent before the process ends (each bounded).
            while pending.join_next().await.is_some() {}
            return end;
        }
        let Some(due) = schedule.cadence.due_after(started) else {
            tracing::warn!("watch: the schedule names no further time; stopping");
            return end;
        };
        next = due + jitter(schedule.jitter);
        let now = tokio::time::Instant::now();
        if due <= now {
            tracing::warn!(
                event = "run_overran",
                run = number,
                "watch: run {number} took {:.1} s, past the time of the next; the next starts now",
                took.as_secs_f64()
            );
            next = now;
        } else {
            tracing::info!(
                event = "waiting",
                seconds = (next - now).as_secs_f64(),
                "watch: next run in {:.0} s",
                (next - now).as_secs_f64()
            );
        }
        // Finished notifications are collected as the loop goes.
        while pending.try_join_next().is_some() {}
    }
}

fn jitter(max: Duration) -> Duration {
    if max.is_zero() { Duration::ZERO } else { max.mul_f64(fastrand::f64()) }
}

/// The message of a failed run, or of the first good run after failures: a `text` for chat
/// webhooks and the details for scripts. Errors are scrubbed of secrets; targets are named
/// without passwords.
pub fn message(plan: &Plan, end: &RunEnd) -> serde_json::Value {
    let ns = &plan.namespace;
    let host = hostname();
    let fix = crate::term::command(&["syncdb", "--namespace", ns, "--table", &tables_arg(plan), "--init-missing"]);
    let (event, text) = if end.failed() {
        // A failed fan-out target is named as such (`→ postgresql://…`); tables with their namespace.
        let lines: Vec<String> = end
            .failures
            .iter()
            .map(|(t, e)| {
                let context = if t.starts_with('→') { format!("{ns} {t}") } else { format!("{ns}.{t}") };
                format!("• {}", crate::term::in_context(&context, &crate::secrets::scrub(e)))
            })
            .collect();
        (
            "failed",
            format!(
                "dap on {host}: the sync of {ns} into {} failed (run {}):\n{}\nTo retry by hand: `{fix}`",
                plan.target.describe(),
                end.number,
                lines.join("\n")
            ),
        )
    } else {
        (
            "recovered",
            format!("dap on {host}: the sync of {ns} into {} works again (run {})", plan.target.describe(), end.number),
        )
    };
    json!({
        "text": text,
        "event": event,
        "host": host,
        "namespace": ns,
        "target": plan.target.describe(),
        "run": end.number,
        "failures": end.failures.iter().map(|(t, e)| json!({"table": t, "error": crate::secrets::scrub(e)})).collect::<Vec<_>>(),
        "command": fix,
    })
}

fn tables_arg(plan: &Plan) -> String {
    match &plan.tables {
        crate::run::Tables::All => "all".into(),
        crate::run::Tables::Named(list) => list.join(","),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this machine".into())
}

/// Posts `body` to `url`: three tries, ten seconds each; a failure is a warning.
async fn post(url: reqwest::Url, body: serde_json::Value) {
    let shown = redact(&url);
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(c) => c,
        Err(e) => return tracing::warn!("--notify {shown}: {e}"),
    };
    let mut last = String::new();
    for attempt in 1..=3u32 {
        match client.post(url.clone()).json(&body).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => last = format!("answered {}", r.status()),
            Err(e) => last = crate::secrets::scrub(&e.to_string()).into_owned(),
        }
        if attempt < 3 {
            tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
        }
    }
    tracing::warn!("--notify {shown}: the message was not delivered ({last}); the sync is not affected");
}

/// A webhook URL as logs show it: its path is its secret (Slack, Teams), so only the host.
pub fn redact(url: &reqwest::Url) -> String {
    format!("{}://{}/…", url.scheme(), url.host_str().unwrap_or("?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_is_named_by_its_host_only() {
        let url = reqwest::Url::parse("https://hooks.slack.com/services/T000/B000/XXXXSECRET").unwrap();
        assert_eq!(redact(&url), "https://hooks.slack.com/…");
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(3)) <= Duration::from_secs(3));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
