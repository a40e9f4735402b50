//! Control routes under `/emulator` (no auth, loopback only): commits, schema changes, faults,
//! ground truth, statistics and job expiry. The same actions as the in-process API.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State as AxState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::dataset::{DatasetError, SchemaChange};
use super::faults::FaultSpec;
use super::output::Format;
use super::{ChangeCounts, State, server};
use crate::time;

type Shared = Arc<State>;

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/emulator/commit", post(commit))
        .route("/emulator/schema", post(evolve))
        .route("/emulator/tables", post(add_table))
        .route("/emulator/faults", post(add_fault).delete(clear_faults))
        .route("/emulator/truth/{ns}/{table}", get(truth))
        .route("/emulator/stats", get(stats))
        .route("/emulator/jobs/expire", post(expire_jobs))
}

fn failure(e: DatasetError) -> Response {
    let status = match e {
        DatasetError::UnknownNamespace(_) | DatasetError::UnknownTable { .. } => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    };
    (status, Json(json!({"error": e.to_string()}))).into_response()
}

#[derive(Deserialize)]
struct CommitRequest {
    namespace: String,
    table: String,
    #[serde(flatten)]
    counts: ChangeCounts,
    /// When the commit happens (RFC 3339, after the table's latest commit); now by default.
    #[serde(default)]
    at: Option<String>,
    /// Prepare the increment a database command at the previous commit will ask for, in this
    /// format, before answering (see `server::prepare_increment`).
    #[serde(default)]
    prepare: Option<Format>,
}

async fn commit(AxState(state): AxState<Shared>, Json(req): Json<CommitRequest>) -> Response {
    let at = match req.at.as_deref().map(time::parse_rfc3339).transpose() {
        Ok(at) => at,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e.to_string()}))).into_response(),
    };
    let previous =
        state.dataset.read().expect("dataset lock").table(&req.namespace, &req.table).map(|t| t.history.head());
    let (summary, since) =
        match previous.and_then(|p| Ok((state.commit(&req.namespace, &req.table, req.counts, at)?, p))) {
            Ok(done) => done,
            Err(e) => return failure(e),
        };
    let mut answer = json!(summary);
    if let Some(format) = req.prepare {
        let started = std::time::Instant::now();
        match server::prepare_increment(&state, &req.namespace, &req.table, since, format).await {
            Ok((job, objects)) => {
                answer["prepared"] =
                    json!({"job": job, "objects": objects, "seconds": started.elapsed().as_secs_f64()});
            }
            Err(e) => {
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e.to_string()}))).into_response();
            }
        }
    }
    Json(answer).into_response()
}

#[derive(Deserialize)]
struct SchemaRequest {
    namespace: String,
    table: String,
    change: SchemaChange,
}

async fn evolve(AxState(state): AxState<Shared>, Json(req): Json<SchemaRequest>) -> Response {
    match state.evolve(&req.namespace, &req.table, req.change) {
        Ok((version, column)) => Json(json!({"version": version, "column": column})).into_response(),
        Err(e) => failure(e),
    }
}

#[derive(Deserialize)]
struct AddTableRequest {
    namespace: String,
    table: String,
    #[serde(default = "default_new_table_rows")]
    rows: u64,
}

fn default_new_table_rows() -> u64 {
    20
}

async fn add_table(AxState(state): AxState<Shared>, Json(req): Json<AddTableRequest>) -> Response {
    match state.add_table(&req.namespace, &req.table, req.rows) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => failure(e),
    }
}

async fn add_fault(AxState(state): AxState<Shared>, Json(fault): Json<FaultSpec>) -> Response {
    state.faults.lock().expect("faults lock").add(fault);
    StatusCode::NO_CONTENT.into_response()
}

async fn clear_faults(AxState(state): AxState<Shared>) -> Response {
    state.faults.lock().expect("faults lock").clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn stats(AxState(state): AxState<Shared>) -> Response {
    Json(state.stats.lock().expect("stats lock").clone()).into_response()
}

async fn expire_jobs(AxState(state): AxState<Shared>) -> Response {
    state.jobs.lock().expect("jobs lock").expire_all(time::now());
    StatusCode::NO_CONTENT.into_response()
}

/// Streams the table's rows (current, or as of `?at=`) as typed JSON lines, generated on a blocking thread so that
/// memory stays flat for large tables.
/// `?at=TS` (RFC 3339): the rows as they were then.
#[derive(Debug, Deserialize)]
struct TruthQuery {
    at: Option<String>,
}

async fn truth(
    AxState(state): AxState<Shared>,
    Path((ns, table)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<TruthQuery>,
) -> Response {
    let at = match query.at.as_deref().map(time::parse_rfc3339).transpose() {
        Ok(at) => at,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e.to_string()}))).into_response(),
    };
    if let Err(e) = state.dataset.read().expect("dataset lock").table(&ns, &table) {
        return failure(e);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::task::spawn_blocking(move || {
        let d = state.dataset.read().expect("dataset lock");
        let Ok(rows) = d.truth_at(&ns, &table, at) else {
            return;
        };
        let mut buf = Vec::with_capacity(1 << 16);
        for row in rows {
            serde_json::to_writer(&mut buf, &row).expect("JSON to memory");
            buf.push(b'\n');
            if buf.len() >= 1 << 16 && tx.blocking_send(Bytes::from(std::mem::take(&mut buf))).is_err() {
                return;
            }
        }
        let _ = tx.blocking_send(Bytes::from(buf));
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) },
        );
    ([(header::CONTENT_TYPE, "application/jsonl")], Body::from_stream(stream)).into_response()
}
