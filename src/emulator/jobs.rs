//! Query jobs: created by `POST …/data`, de-duplicated by identical query, walked through
//! waiting → running → complete | failed on a schedule, and expired after their lifetime.

use std::collections::HashMap;
use std::ops::Range;

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::dataset::Selection;
use super::output::{Format, Mode};
use crate::time::{self, Micros};

/// One part file of a complete job: the row indexes it covers (empty range = header only).
#[derive(Debug, Clone)]
pub struct ObjectSpec {
    pub id: String,
    pub rows: Range<u64>,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Complete { objects: Vec<ObjectSpec> },
    Failed { error: Value },
}

/// The times a complete job reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Window {
    At(Micros),
    Range { since: Micros, until: Micros },
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub namespace: String,
    pub table: String,
    pub format: Format,
    pub mode: Mode,
    pub selection: Selection,
    pub schema_version: u32,
    /// What the complete job reports: `at`, or `since`/`until`.
    pub window: Window,
    pub running_at: Micros,
    pub done_at: Micros,
    pub expires_at: Micros,
    pub outcome: Outcome,
}

impl Job {
    pub fn status(&self, now: Micros) -> &'static str {
        if now < self.running_at {
            "waiting"
        } else if now < self.done_at {
            "running"
        } else if matches!(self.outcome, Outcome::Failed { .. }) {
            "failed"
        } else {
            "complete"
        }
    }

    /// The job as the API shows it, with exactly the keys of its variant; 202 until terminal.
    pub fn to_json(&self, now: Micros) -> (StatusCode, Value) {
        let status = self.status(now);
        let mut body = json!({"id": self.id, "status": status, "expires_at": time::format_wire(self.expires_at)});
        match (status, &self.outcome) {
            ("complete", Outcome::Complete { objects }) => {
                body["objects"] = objects.iter().map(|o| json!({"id": o.id})).collect();
                body["schema_version"] = json!(self.schema_version);
                match self.window {
                    Window::At(at) => body["at"] = json!(time::format_wire(at)),
                    Window::Range { since, until } => {
                        body["since"] = json!(time::format_wire(since));
                        body["until"] = json!(time::format_wire(until));
                    }
                }
                (StatusCode::OK, body)
            }
            ("failed", Outcome::Failed { error }) => {
                body["error"] = error.clone();
                (StatusCode::OK, body)
            }
            _ => (StatusCode::ACCEPTED, body),
        }
    }

    pub fn object(&self, id: &str) -> Option<&ObjectSpec> {
        match &self.outcome {
            Outcome::Complete { objects } => objects.iter().find(|o| o.id == id),
            Outcome::Failed { .. } => None,
        }
    }
}

/// Splits `rows` row indexes into parts of at most `part_rows`, plus one header-only part.
/// `tag` names the write (like Spark's per-write id): equal content gets equal names.
pub fn plan_objects(job_id: &str, tag: &str, format: Format, key_space: u64, part_rows: u64) -> Vec<ObjectSpec> {
    let part_rows = part_rows.max(1);
    let data_parts = key_space.div_ceil(part_rows).max(1);
    (0..=data_parts)
        .map(|i| {
            let rows = if i == data_parts { 0..0 } else { i * part_rows + 1..((i + 1) * part_rows).min(key_space) + 1 };
            ObjectSpec { id: format!("{job_id}/part-{i:05}-{tag}-c000.{}", format.extension()), rows }
        })
        .collect()
}

#[derive(Default)]
pub struct Jobs {
    jobs: HashMap<String, Job>,
    by_query: HashMap<String, String>,
}

impl Jobs {
    /// The live job of an identical query, as DAP hands it back instead of running the query
    /// again; never a failed one, which would make a passing failure last a day.
    pub fn find_query(&self, query_key: &str, now: Micros) -> Option<&Job> {
        self.by_query
            .get(query_key)
            .and_then(|id| self.get(id, now))
            .filter(|job| !matches!(job.outcome, Outcome::Failed { .. }))
    }

    pub fn insert(&mut self, query_key: String, job: Job) {
        self.by_query.insert(query_key, job.id.clone());
        self.jobs.insert(job.id.clone(), job);
    }

    /// A job that has not expired.
    pub fn get(&self, id: &str, now: Micros) -> Option<&Job> {
        self.jobs.get(id).filter(|j| j.expires_at > now)
    }

    /// Expires every job now (a control action for tests).
    pub fn expire_all(&mut self, now: Micros) {
        for j in self.jobs.values_mut() {
            j.expires_at = j.expires_at.min(now);
        }
    }

    /// Forgets jobs that expired, returning their ids (their spooled objects can go too).
    pub fn sweep(&mut self, now: Micros) -> Vec<String> {
        let gone: Vec<String> = self.jobs.values().filter(|j| j.expires_at <= now).map(|j| j.id.clone()).collect();
        for id in &gone {
            self.jobs.remove(id);
        }
        self.by_query.retain(|_, id| !gone.contains(id));
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(outcome: Outcome, selection: Selection) -> Job {
        Job {
            id: "j1".into(),
            namespace: "canvas".into(),
            table: "users".into(),
            format: Format::Tsv,
            mode: Mode::Condensed,
            selection,
            schema_version: 2,
            window: match selection {
                Selection::Snapshot { at, .. } => Window::At(at),
                Selection::Incremental { since, .. } => Window::Range { since, until: since },
            },
            running_at: 10,
            done_at: 20,
            expires_at: 100,
            outcome,
        }
    }

    #[test]
    fn lifecycle_and_exact_keys() {
        let objects = plan_objects("j1", "t", Format::Tsv, 5, 2);
        let j = job(Outcome::Complete { objects }, Selection::Snapshot { at: 1_714_564_800_000_000, oldest: None });
        let (code, body) = j.to_json(5);
        assert_eq!((code, body["status"].as_str()), (StatusCode::ACCEPTED, Some("waiting")));
        assert_eq!(body.as_object().unwrap().len(), 3);
        assert_eq!(j.to_json(15).1["status"], "running");
        let (code, body) = j.to_json(20);
        assert_eq!(code, StatusCode::OK);
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "status", "expires_at", "objects", "schema_version", "at"]);
        assert_eq!(body["at"], "2024-05-01T12:00:00Z");
        assert_eq!(body["objects"].as_array().unwrap().len(), 4, "3 data parts + 1 header-only");
    }

    #[test]
    fn failed_jobs_carry_the_error() {
        let j = job(
            Outcome::Failed { error: json!({"type": "ProcessingError", "uuid": "u", "message": "boom"}) },
            Selection::Snapshot { at: 0, oldest: None },
        );
        let body = j.to_json(50).1;
        assert_eq!(body["status"], "failed");
        assert_eq!(body["error"]["message"], "boom");
        assert!(body.get("objects").is_none());
    }

    #[test]
    fn parts_cover_every_row_once() {
        let parts = plan_objects("abc", "t", Format::Parquet, 10, 3);
        let covered: Vec<u64> = parts.iter().flat_map(|p| p.rows.clone()).collect();
        assert_eq!(covered, (1..=10).collect::<Vec<_>>());
        assert!(parts.last().unwrap().rows.is_empty());
        assert!(parts[0].id.starts_with("abc/part-00000-") && parts[0].id.ends_with(".parquet"));
    }

    #[test]
    fn jobs_expire() {
        let mut jobs = Jobs::default();
        jobs.insert(
            "q".into(),
            job(Outcome::Complete { objects: vec![] }, Selection::Snapshot { at: 0, oldest: None }),
        );
        assert!(jobs.find_query("q", 50).is_some());
        assert!(jobs.get("j1", 100).is_none());
        jobs.expire_all(30);
        assert!(jobs.find_query("q", 31).is_none());
        assert_eq!(jobs.sweep(31), vec!["j1".to_string()]);
    }
}
