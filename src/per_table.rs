//! Work on many tables at once: bounded parallelism, an outcome per table in the order asked, and
//! a summary. A run keeps going after a table fails; only errors that no other table could
//! survive (authentication, account: [`Classify::is_fatal`]) stop it, and the rest are then
//! skipped.

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use serde::Serialize;

use crate::error::Classify;

#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome<T> {
    Succeeded {
        #[serde(flatten)]
        result: T,
    },
    Failed {
        error: String,
    },
    Skipped {
        reason: String,
    },
}

#[derive(Debug, Serialize)]
pub struct TableOutcome<T> {
    pub table: String,
    #[serde(flatten)]
    pub outcome: Outcome<T>,
}

/// Tables whose jobs are waited on at once. A waiting job costs nothing here and the client's
/// pacer keeps job creation under DAP's rate limit, so this sits well above the number of tables
/// that move data at once (`--parallel-tables`): a `--table all` run then creates jobs as fast
/// as the limit allows instead of one batch per job latency.
pub const JOBS_IN_FLIGHT: usize = 32;

/// Runs `op` on every table, at most `parallel` at once, starting them in order of the list;
/// the outcomes come back in that order. A finished table frees its place at once, even while
/// one started earlier is still running (no head-of-line blocking).
pub async fn run_each<T, E, F, Fut>(tables: &[String], parallel: usize, op: F) -> Vec<TableOutcome<T>>
where
    E: Display + Classify,
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let stop = AtomicBool::new(false);
    let stop = &stop;
    let op = &op;
    let mut outcomes: Vec<(usize, TableOutcome<T>)> = futures_util::stream::iter(tables.iter().cloned().enumerate())
        .map(|(i, table)| async move {
            if stop.load(Ordering::SeqCst) {
                let reason = "skipped after an authentication or account error".to_string();
                return (i, TableOutcome { table, outcome: Outcome::Skipped { reason } });
            }
            let outcome = match op(table.clone()).await {
                Ok(result) => Outcome::Succeeded { result },
                Err(e) if let Some(reason) = e.skip_reason() => Outcome::Skipped { reason },
                Err(e) => {
                    if e.is_fatal() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    Outcome::Failed { error: e.to_string() }
                }
            };
            (i, TableOutcome { table, outcome })
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    outcomes.sort_by_key(|(i, _)| *i);
    outcomes.into_iter().map(|(_, outcome)| outcome).collect()
}

/// The summary line (`"4 tables: 3 succeeded, 1 failed, 0 skipped"`), and whether the run succeeded: no table failed (a table skipped because
/// its work was not needed is no failure; tables skipped after a fatal error come with it).
pub fn summarize<T>(outcomes: &[TableOutcome<T>]) -> (String, bool) {
    let count = |f: fn(&Outcome<T>) -> bool| outcomes.iter().filter(|o| f(&o.outcome)).count();
    let ok = count(|o| matches!(o, Outcome::Succeeded { .. }));
    let failed = count(|o| matches!(o, Outcome::Failed { .. }));
    let skipped = count(|o| matches!(o, Outcome::Skipped { .. }));
    let tables = if outcomes.len() == 1 { "table" } else { "tables" };
    (format!("{} {tables}: {ok} succeeded, {failed} failed, {skipped} skipped", outcomes.len()), failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E(bool);
    impl Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", if self.0 { "fatal" } else { "bad table" })
        }
    }
    impl Classify for E {
        fn retry(&self) -> crate::error::Retry {
            crate::error::Retry::Useless
        }
        fn is_fatal(&self) -> bool {
            self.0
        }
    }

    #[tokio::test]
    async fn keeps_going_after_a_failure_and_stops_after_a_fatal_one() {
        let tables: Vec<String> = ["a", "bad", "c", "auth", "d"].iter().map(|s| s.to_string()).collect();
        let out = run_each(&tables, 1, |t| async move {
            match t.as_str() {
                "bad" => Err(E(false)),
                "auth" => Err(E(true)),
                _ => Ok(t.len()),
            }
        })
        .await;
        let kinds: Vec<&str> = out
            .iter()
            .map(|o| match o.outcome {
                Outcome::Succeeded { .. } => "ok",
                Outcome::Failed { .. } => "failed",
                Outcome::Skipped { .. } => "skipped",
            })
            .collect();
        assert_eq!(kinds, ["ok", "failed", "ok", "failed", "skipped"]);
        assert_eq!(summarize(&out), ("5 tables: 2 succeeded, 2 failed, 1 skipped".to_string(), false));
    }
}
