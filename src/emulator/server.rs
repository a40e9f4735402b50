//! The Query API routes, behind a gateway layer that applies injected transport faults, rate
//! limits and the bearer-token check, and counts responses.

use std::collections::HashMap;
use std::io::{self, SeekFrom};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::api_error::ApiError;
use super::auth;
use super::dataset::{DatasetError, Selection, TableState};
use super::faults::{Endpoint, FaultKind};
use super::jobs::{Job, ObjectSpec, Outcome, Window, plan_objects};
use super::objects::{UrlError, signed_url, verify_url};
use super::output::{self, Format, Mode, PartSpec};
use super::{State, control};
use crate::time::{self, Micros};

type Shared = Arc<State>;

pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route("/ids/auth/login", post(login))
        .route("/dap/query/{ns}/table", get(table_list))
        .route("/dap/query/{ns}/table/{table}/schema", get(schema))
        .route("/dap/query/{ns}/table/{table}/data", post(query))
        .route("/dap/job/{id}", get(job))
        .route("/dap/object/url", post(object_urls))
        .route("/objects/{*id}", get(object))
        .fallback(|| async { ApiError::not_found("route", "", "no such API route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), gateway))
        .merge(control::routes())
        .with_state(state)
}

/// Which endpoint a request is for, and which table it concerns when that is known.
fn classify(state: &State, method: &Method, path: &str) -> Option<(Endpoint, Option<String>)> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let get = method == Method::GET;
    Some(match segs.as_slice() {
        ["ids", "auth", "login"] => (Endpoint::Login, None),
        ["dap", "query", _, "table"] if get => (Endpoint::TableList, None),
        ["dap", "query", _, "table", t, "schema"] if get => (Endpoint::Schema, Some(t.to_string())),
        ["dap", "query", _, "table", t, "data"] => (Endpoint::Query, Some(t.to_string())),
        ["dap", "job", id] => {
            (Endpoint::Job, state.jobs.lock().expect("jobs lock").get(id, time::now()).map(|j| j.table.clone()))
        }
        ["dap", "object", "url"] => (Endpoint::ObjectUrl, None),
        ["objects", job, ..] => {
            (Endpoint::Object, state.jobs.lock().expect("jobs lock").get(job, time::now()).map(|j| j.table.clone()))
        }
        ["dap", ..] => (Endpoint::Query, None),
        _ => return None,
    })
}

async fn gateway(AxState(state): AxState<Shared>, req: Request, next: Next) -> Response {
    let Some((endpoint, table)) = classify(&state, req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let response = gate(&state, endpoint, table.as_deref(), req, next).await;
    state.record(endpoint, response.status().as_u16());
    response
}

async fn gate(state: &State, endpoint: Endpoint, table: Option<&str>, req: Request, next: Next) -> Response {
    let fault = state.faults.lock().expect("faults lock").take(endpoint, table, FaultKind::is_transport);
    let mut reset = false;
    if let Some(f) = fault {
        match f.kind {
            FaultKind::TooManyRequests => {
                return too_many_requests(f.retry_after.as_deref().unwrap_or("1"));
            }
            FaultKind::ServerError => {
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    "internal server error (injected)",
                )
                .into_response();
            }
            FaultKind::BadGateway => {
                let html = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n";
                return (StatusCode::BAD_GATEWAY, [(header::CONTENT_TYPE, "text/html")], html).into_response();
            }
            FaultKind::GatewayTimeout => {
                return ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "GatewayTimeoutError",
                    "the gateway timed out (injected)",
                )
                .into_response();
            }
            FaultKind::AccountError => {
                let kind = f.error_type.as_deref().unwrap_or("AccountDisabled");
                return ApiError::new(StatusCode::FORBIDDEN, kind, format!("{kind} (injected)")).into_response();
            }
            FaultKind::EchoRequest => return echo_request(f.status.unwrap_or(500), &req),
            FaultKind::Slow => tokio::time::sleep(Duration::from_millis(f.delay_ms.unwrap_or(2000))).await,
            FaultKind::Reset => reset = true,
            _ => unreachable!("only transport faults are taken here"),
        }
    }
    if state.config.rate_limits {
        let admitted = state.limiter.lock().expect("limiter lock").admit(endpoint, Instant::now());
        if let Err(wait) = admitted {
            return too_many_requests(&wait.as_secs_f64().ceil().max(1.0).to_string());
        }
    }
    if !matches!(endpoint, Endpoint::Login | Endpoint::Object)
        && let Err(e) = check_bearer(state, req.headers())
    {
        return e.into_response();
    }
    let response = next.run(req).await;
    if reset { cut_body(response) } else { response }
}

/// An error whose message repeats the request: method, URL with its query, every header.
fn echo_request(status: u16, req: &Request) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers: Vec<String> =
        req.headers().iter().map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes()))).collect();
    let message = format!("rejected {} {} with headers {}", req.method(), req.uri(), headers.join("; "));
    let kind = match status.as_u16() {
        401 => "AuthenticationError",
        403 => "AccessDenied",
        _ => "InternalServerError",
    };
    ApiError::new(status, kind, message).into_response()
}

fn too_many_requests(retry_after: &str) -> Response {
    let mut r = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", "rate limit exceeded").into_response();
    if let Ok(v) = HeaderValue::from_str(retry_after) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn check_bearer(state: &State, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::authentication("missing bearer token; log in at /ids/auth/login first"))?;
    auth::verify_token(&state.signing_key, token, time::now() / 1_000_000).map_err(|e| match e {
        auth::TokenError::Expired => ApiError::authentication("the access token has expired"),
        _ => ApiError::authentication("invalid access token"),
    })
}

/// Sends the first half of the body, then drops the connection.
fn cut_body(response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let total = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let limit = total.map_or(32, |t| t / 2).max(1);
    let stream = futures_util::stream::unfold(
        (body.into_data_stream(), 0usize, 0u8),
        move |(mut inner, sent, phase)| async move {
            let reset = || io::Error::new(io::ErrorKind::ConnectionReset, "connection reset (injected)");
            match phase {
                0 => match inner.next().await {
                    Some(Ok(chunk)) if sent + chunk.len() >= limit => {
                        Some((Ok(chunk.slice(..limit - sent)), (inner, limit, 1)))
                    }
                    Some(Ok(chunk)) => {
                        let n = chunk.len();
                        Some((Ok(chunk), (inner, sent + n, 0)))
                    }
                    Some(Err(e)) => Some((Err(io::Error::other(e)), (inner, sent, 2))),
                    None => Some((Err(reset()), (inner, sent, 2))),
                },
                1 => {
                    // Let the headers and the partial body reach the client before the drop.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((Err(reset()), (inner, sent, 2)))
                }
                _ => None,
            }
        },
    );
    Response::from_parts(parts, Body::from_stream(stream))
}

async fn login(AxState(state): AxState<Shared>, headers: HeaderMap, body: String) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !auth::basic_matches(authorization, &state.config.client_id, &state.config.client_secret) {
        return ApiError::authentication("invalid client credentials").into_response();
    }
    if !body.split('&').any(|kv| kv == "grant_type=client_credentials") {
        return ApiError::validation("grant_type must be client_credentials".into(), (1, 1, 0)).into_response();
    }
    let now = time::now();
    let lifetime = state.config.token_lifetime.as_secs() as i64;
    // `exp` is in whole seconds: rounded up, so that a token never lives less than its lifetime
    // (rounded down, a one-second token issued at x.99 s would expire 10 ms later).
    let (issued, expires) = (now / 1_000_000, (now + 999_999) / 1_000_000 + lifetime);
    let token = auth::issue_token(&state.signing_key, &state.config.client_id, issued, expires);
    axum::Json(
        json!({"access_token": token, "expires_in": lifetime, "scope": "urn:canvas:dap:query", "token_type": "Bearer"}),
    )
    .into_response()
}

fn dataset_error(e: DatasetError) -> ApiError {
    match e {
        DatasetError::UnknownNamespace(ns) => {
            ApiError::not_found("namespace", &ns, format!("namespace {ns} not found"))
        }
        DatasetError::UnknownTable { namespace, table } => {
            ApiError::not_found("table", &table, format!("table {table} not found in namespace {namespace}"))
        }
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "ProcessingError", other.to_string()),
    }
}

async fn table_list(AxState(state): AxState<Shared>, Path(ns): Path<String>) -> Result<Response, ApiError> {
    let d = state.dataset.read().expect("dataset lock");
    let tables: Vec<&String> = d.namespace(&ns).map_err(dataset_error)?.keys().collect();
    Ok(axum::Json(json!({"tables": tables})).into_response())
}

async fn schema(
    AxState(state): AxState<Shared>,
    Path((ns, table)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let d = state.dataset.read().expect("dataset lock");
    Ok(axum::Json(d.table(&ns, &table).map_err(dataset_error)?.current().envelope.clone()).into_response())
}

/// 1-based line and column and 0-based character offset of `needle` in `text` (or the start).
fn location(text: &str, needle: &str) -> (usize, usize, usize) {
    let byte = text.find(needle).unwrap_or(0);
    let before = &text[..byte];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column, before.chars().count())
}

/// A validated query body.
struct QueryRequest {
    format: Format,
    mode: Option<Mode>,
    since: Option<Micros>,
    until: Option<Micros>,
}

/// Parses a query body; `now` is the emulator's clock (`since`/`until` may not be later).
fn parse_query(body: &str, now: Micros) -> Result<QueryRequest, ApiError> {
    let invalid = |msg: String, at: &str| ApiError::validation(msg, location(body, at));
    let v: Json = serde_json::from_str(body)
        .map_err(|e| ApiError::validation(format!("malformed JSON: {e}"), (e.line(), e.column(), 0)))?;
    let obj = v.as_object().ok_or_else(|| invalid("the query must be a JSON object".into(), ""))?;
    if let Some(k) = obj.keys().find(|k| !["format", "mode", "since", "until"].contains(&k.as_str())) {
        return Err(invalid(format!("unknown field `{k}` in query"), &format!("\"{k}\"")));
    }
    let format = match obj.get("format") {
        None => return Err(invalid("field `format` is required".into(), "")),
        Some(f) => f.as_str().and_then(Format::parse).ok_or_else(|| {
            invalid(format!("invalid format {f}; expected one of tsv, csv, jsonl, parquet"), "\"format\"")
        })?,
    };
    let mode = match obj.get("mode") {
        None | Some(Json::Null) => None,
        Some(Json::String(m)) if m == "expanded" => Some(Mode::Expanded),
        Some(Json::String(m)) if m == "condensed" => Some(Mode::Condensed),
        Some(m) => {
            return Err(invalid(format!("invalid mode {m}; expected expanded or condensed"), "\"mode\""));
        }
    };
    let stamp = |field: &str| -> Result<Option<Micros>, ApiError> {
        match obj.get(field) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => time::parse_rfc3339(s)
                .map(Some)
                .map_err(|e| invalid(format!("`{field}`: {e}"), &format!("\"{field}\""))),
            Some(other) => Err(invalid(format!("`{field}` must be a string, not {other}"), &format!("\"{field}\""))),
        }
    };
    let (since, until) = (stamp("since")?, stamp("until")?);
    match (since, until) {
        (None, Some(_)) => return Err(invalid("`until` requires `since`".into(), "\"until\"")),
        (Some(s), Some(u)) if s >= u => {
            return Err(invalid("`since` must be earlier than `until`".into(), "\"until\""));
        }
        (Some(s), _) if s > now => {
            return Err(invalid("`since` must not be in the future".into(), "\"since\""));
        }
        (_, Some(u)) if u > now => {
            return Err(invalid("`until` must not be in the future".into(), "\"until\""));
        }
        _ => {}
    }
    Ok(QueryRequest { format, mode, since, until })
}

async fn query(
    AxState(state): AxState<Shared>,
    Path((ns, table)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    body: String,
) -> Result<Response, ApiError> {
    let now = time::now();
    let d = state.dataset.read().expect("dataset lock");
    let clock = state.clock(&d);
    // Times up to the wall clock are not in the future, even while the emulator's runs behind.
    let q = parse_query(&body, clock.max(now))?;
    let t = d.table(&ns, &table).map_err(dataset_error)?;
    let retained_from = d.retained_from(&t.current().def, clock);
    let incremental = q.since.is_some();
    let fault = state.faults.lock().expect("faults lock").take(super::Endpoint::Query, Some(&table), |k| {
        k == FaultKind::FailedJob || (incremental && matches!(k, FaultKind::OutOfRange | FaultKind::SnapshotRequired))
    });
    if let Some(since) = q.since {
        let (s, u) = (time::format_wire(since), q.until.map(time::format_wire));
        match fault.as_ref().map(|f| f.kind) {
            Some(FaultKind::OutOfRange) => return Err(ApiError::out_of_range(&s, u.as_deref())),
            Some(FaultKind::SnapshotRequired) => {
                return Err(ApiError::snapshot_required(&s, u.as_deref()));
            }
            _ => {}
        }
        let cutoff = state.config.retention.map(|r| clock - r.as_micros() as i64);
        if cutoff.into_iter().chain(retained_from).any(|oldest| since < oldest) {
            return Err(ApiError::out_of_range(&s, u.as_deref()));
        }
    }
    let mode = q.mode.unwrap_or(state.config.default_mode);
    let scope = params.get("scope").cloned().unwrap_or_default();
    let query_key = query_key(&ns, &table, &scope, &q, mode);
    let mut jobs = state.jobs.lock().expect("jobs lock");
    let expired = jobs.sweep(now);
    state.objects.forget_jobs(&expired);
    if fault.is_none()
        && let Some(existing) = jobs.find_query(&query_key, now)
    {
        let (code, body) = existing.to_json(now);
        return Ok((code, axum::Json(body)).into_response());
    }
    let outcome = if fault.is_some() { JobOutcome::Failed } else { JobOutcome::Complete };
    let request = JobRequest { namespace: ns, table, t, q: &q, mode, retained_from };
    let job = new_job(&state, request, now, outcome);
    let (code, body) = job.to_json(now);
    jobs.insert(query_key, job);
    Ok((code, axum::Json(body)).into_response())
}

/// What makes two queries identical: DAP hands an identical query the live job back.
fn query_key(ns: &str, table: &str, scope: &str, q: &QueryRequest, mode: Mode) -> String {
    format!("{ns}/{table}?scope={scope}|{:?}|{mode:?}|{:?}|{:?}", q.format, q.since, q.until)
}

/// How a new job ends: with its objects, or failed (an injected fault).
#[derive(Clone, Copy, PartialEq)]
enum JobOutcome {
    Complete,
    Failed,
}

/// What a job is asked: a query of one table, in a mode, over the rows the table still has.
struct JobRequest<'a> {
    namespace: String,
    table: String,
    t: &'a TableState,
    q: &'a QueryRequest,
    mode: Mode,
    /// The oldest time the table still holds rows from (an append-only table's window).
    retained_from: Option<Micros>,
}

/// A new job answering `request` as of `now` (not yet registered).
fn new_job(state: &State, request: JobRequest<'_>, now: Micros, outcome: JobOutcome) -> Job {
    let JobRequest { namespace, table, t, q, mode, retained_from } = request;
    let head = t.history.head();
    let (selection, window) = match q.since {
        None => (Selection::Snapshot { at: head, oldest: retained_from }, Window::At(head)),
        Some(since) => {
            // Without `until`, the window ends at (and includes) the latest commit, which is
            // reported as `until`; the next incremental starts there.
            let reported = q.until.unwrap_or_else(|| t.history.latest_change_since(since).unwrap_or(since));
            (
                Selection::Incremental { since, until: Some(q.until.unwrap_or(reported + 1)) },
                Window::Range { since, until: reported },
            )
        }
    };
    let id = uuid::Uuid::new_v4().to_string();
    let outcome = match outcome {
        JobOutcome::Failed => Outcome::Failed {
            error: ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ProcessingError",
                "the query job failed (injected)",
            )
            .error,
        },
        JobOutcome::Complete => {
            // What the objects hold, so that equal content is made once and shared by jobs: an
            // incremental's records depend on its earliest change, not on its exact `since`.
            let content_selection = match selection {
                Selection::Incremental { since, until } => Selection::Incremental {
                    since: t.history.earliest_change_since(since).unwrap_or(Micros::MAX),
                    until,
                },
                snapshot => snapshot,
            };
            let content = format!(
                "{namespace}/{table}/{:?}/{mode:?}/{content_selection:?}/{}",
                q.format,
                t.current().def.version
            );
            let tag = format!("{:016x}", super::rng::hash_str(&content));
            Outcome::Complete {
                objects: plan_objects(&id, &tag, q.format, t.history.key_space(), state.config.part_rows),
            }
        }
    };
    let running_at = now + state.config.job_waiting.as_micros() as i64;
    Job {
        id,
        namespace,
        table,
        format: q.format,
        mode,
        selection,
        schema_version: t.current().def.version,
        window,
        running_at,
        done_at: running_at + state.config.job_running.as_micros() as i64,
        expires_at: now + state.config.job_lifetime.as_micros() as i64,
        outcome,
    }
}

/// Why a commit's increment could not be prepared.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PrepareError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("generating the prepared objects: {0}")]
    Io(#[from] io::Error),
}

/// Makes, ahead of any client, the job and objects of the incremental query a database command
/// sends from the watermark `since` (the commit before the latest): `format`, condensed, no
/// `until`. A client then pays only its download, as with DAP, whose jobs run on its own
/// machines (benchmarks time the preparation apart). Returns the job's id and object count.
pub(crate) async fn prepare_increment(
    state: &Shared,
    ns: &str,
    table: &str,
    since: Micros,
    format: Format,
) -> Result<(String, usize), PrepareError> {
    let now = time::now();
    let q = QueryRequest { format, mode: Some(Mode::Condensed), since: Some(since), until: None };
    let job = {
        let d = state.dataset.read().expect("dataset lock");
        let t = d.table(ns, table)?;
        let retained_from = d.retained_from(&t.current().def, state.clock(&d));
        let key = query_key(ns, table, "", &q, Mode::Condensed);
        let mut jobs = state.jobs.lock().expect("jobs lock");
        match jobs.find_query(&key, now) {
            Some(existing) => existing.clone(),
            None => {
                let request = JobRequest {
                    namespace: ns.into(),
                    table: table.into(),
                    t,
                    q: &q,
                    mode: Mode::Condensed,
                    retained_from,
                };
                let job = new_job(state, request, now, JobOutcome::Complete);
                jobs.insert(key, job.clone());
                job
            }
        }
    };
    let parts = match &job.outcome {
        Outcome::Complete { objects } => objects.clone(),
        Outcome::Failed { .. } => Vec::new(),
    };
    for part in &parts {
        materialize(state, &job, part).await?;
    }
    Ok((job.id, parts.len()))
}

/// The spooled file of one of a job's objects, generated the first time it is asked for.
async fn materialize(state: &Shared, job: &Job, part: &ObjectSpec) -> io::Result<std::path::PathBuf> {
    let generator_state = Arc::clone(state);
    let (job, rows) = (job.clone(), part.rows.clone());
    state
        .objects
        .materialize(&part.id, move |path| {
            let d = generator_state.dataset.read().expect("dataset lock");
            let t = d.table(&job.namespace, &job.table).map_err(io::Error::other)?;
            let spec = PartSpec {
                def: &t.version(job.schema_version).def,
                format: job.format,
                mode: job.mode,
                incremental: matches!(job.selection, Selection::Incremental { .. }),
                csv_null: generator_state.config.csv_null,
            };
            let file = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
            output::write_part(&spec, d.records(t, job.selection, job.schema_version, rows), file)
        })
        .await
}

async fn job(AxState(state): AxState<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let now = time::now();
    let jobs = state.jobs.lock().expect("jobs lock");
    let job =
        jobs.get(&id, now).ok_or_else(|| ApiError::not_found("job", &id, format!("job {id} not found or expired")))?;
    let (code, body) = job.to_json(now);
    Ok((code, axum::Json(body)).into_response())
}

async fn object_urls(AxState(state): AxState<Shared>, body: String) -> Result<Response, ApiError> {
    let ids: Vec<Json> = serde_json::from_str(&body).map_err(|e| {
        ApiError::validation(format!("expected a JSON array of {{\"id\": …}}: {e}"), (e.line(), e.column(), 0))
    })?;
    let now = time::now();
    let expires = now + state.config.url_lifetime.as_micros() as i64;
    let jobs = state.jobs.lock().expect("jobs lock");
    let mut urls = serde_json::Map::new();
    for entry in ids {
        let id = entry
            .get("id")
            .and_then(Json::as_str)
            .ok_or_else(|| ApiError::validation("each entry needs a string `id`".into(), location(&body, "{")))?;
        let job_id = id.split('/').next().unwrap_or_default();
        if jobs.get(job_id, now).and_then(|j| j.object(id)).is_none() {
            return Err(ApiError::not_found("object", id, format!("object {id} not found or expired")));
        }
        urls.insert(id.to_string(), json!({"url": signed_url(&state.base_url, &state.signing_key, id, expires)}));
    }
    Ok(axum::Json(json!({"urls": urls})).into_response())
}

/// An S3-style XML error.
fn storage_error(status: StatusCode, code: &str, message: &str) -> Response {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], xml).into_response()
}

async fn object(
    AxState(state): AxState<Shared>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let now = time::now();
    let expires = params.get("X-Amz-Expires").and_then(|e| e.parse::<Micros>().ok()).unwrap_or(0);
    let signature = params.get("X-Amz-Signature").map(String::as_str).unwrap_or_default();
    match verify_url(&state.signing_key, &id, expires, signature, now) {
        Err(UrlError::Expired) => {
            return storage_error(StatusCode::FORBIDDEN, "AccessDenied", "Request has expired");
        }
        Err(UrlError::BadSignature) => {
            return storage_error(
                StatusCode::FORBIDDEN,
                "SignatureDoesNotMatch",
                "The request signature does not match",
            );
        }
        Ok(()) => {}
    }
    let job_id = id.split('/').next().unwrap_or_default().to_string();
    let job = state.jobs.lock().expect("jobs lock").get(&job_id, now).cloned();
    let Some((job, part)) = job.and_then(|j| j.object(&id).cloned().map(|p| (j, p))) else {
        return storage_error(StatusCode::NOT_FOUND, "NoSuchKey", "The specified key does not exist.");
    };
    let fault = state.faults.lock().expect("faults lock").take(Endpoint::Object, Some(&job.table), |k| {
        matches!(k, FaultKind::TruncatedGzip | FaultKind::ExpiredUrl)
            // Only a part that covers rows has a record to corrupt.
            || (k == FaultKind::CorruptRecord && !part.rows.is_empty())
    });
    if fault.as_ref().is_some_and(|f| f.kind == FaultKind::ExpiredUrl) {
        return storage_error(StatusCode::FORBIDDEN, "AccessDenied", "Request has expired");
    }
    let made = materialize(&state, &job, &part).await;
    let path = match made {
        Ok(p) => p,
        Err(e) => {
            return storage_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", &e.to_string());
        }
    };
    if fault.as_ref().is_some_and(|f| f.kind == FaultKind::CorruptRecord) && job.format.is_gzip() {
        return match corrupt_first_record(&path) {
            Ok(bytes) => ([(header::CONTENT_TYPE, "binary/octet-stream")], bytes).into_response(),
            Err(e) => storage_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", &e.to_string()),
        };
    }
    let truncate = fault.as_ref().is_some_and(|f| f.kind == FaultKind::TruncatedGzip);
    match serve_file(&path, &headers, truncate).await {
        Ok(r) => r,
        Err(e) => storage_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", &e.to_string()),
    }
}

/// The object with the key of its first record replaced by text that is no key.
fn corrupt_first_record(path: &std::path::Path) -> io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path)?).read_to_string(&mut text)?;
    let mut lines: Vec<String> = text.split('\n').map(String::from).collect();
    let sep = if lines[0].contains('\t') { '\t' } else { ',' };
    let key_at = lines[0].split(sep).position(|h| h.starts_with("key.")).unwrap_or(0);
    if let Some(first) = lines.get_mut(1).filter(|l| !l.is_empty()) {
        let mut fields: Vec<&str> = first.split(sep).collect();
        if key_at < fields.len() {
            fields[key_at] = "not-a-key";
        }
        *first = fields.join(&sep.to_string());
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(lines.join("\n").as_bytes())?;
    gz.finish()
}

/// Serves a spooled object with `Content-Length` and `Range` support; `truncate` drops the
/// gzip trailer and a little data before it.
async fn serve_file(path: &std::path::Path, headers: &HeaderMap, truncate: bool) -> io::Result<Response> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut size = file.metadata().await?.len();
    if truncate {
        size -= (size / 2).min(24);
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|r| parse_range(r, size));
    if headers.contains_key(header::RANGE) && range.is_none() {
        return Ok(
            (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{size}"))]).into_response()
        );
    }
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end - start + 1 };
    file.seek(SeekFrom::Start(start)).await?;
    let body = Body::from_stream(ReaderStream::with_capacity(file.take(len), 64 * 1024));
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("binary/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if range.is_some() {
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")).expect("ascii"));
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(r)
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` within `size`.
fn parse_range(spec: &str, size: u64) -> Option<(u64, u64)> {
    let (a, b) = spec.strip_prefix("bytes=")?.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.checked_sub(n.min(size))?, size.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, size.checked_sub(1)?),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(size.checked_sub(1)?)),
    };
    (start <= end && end < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("items=1-2", 100), None);
    }

    #[test]
    fn query_validation_points_at_the_field() {
        let e = parse_query("{\"format\":\"xml\"}", time::now()).err().unwrap();
        assert_eq!(e.error["type"], "ValidationError");
        assert_eq!(e.error["location"]["character"], 1);
        let e = parse_query("{\"format\":\"tsv\",\n \"since\":\"2024-01-01T00:00:00\"}", time::now()).err().unwrap();
        assert_eq!(e.error["location"]["line"], 2);
        assert!(
            parse_query(
                "{\"format\":\"tsv\",\"since\":\"2024-01-02T00:00:00Z\",\"until\":\"2024-01-01T00:00:00Z\"}",
                time::now()
            )
            .is_err()
        );
        assert!(parse_query("{\"format\":\"tsv\",\"filter\":{}}", time::now()).is_err());
        let ok = parse_query(
            "{\"format\":\"csv\",\"mode\":\"condensed\",\"since\":\"2024-05-01T12:00:00.5Z\"}",
            time::now(),
        )
        .ok()
        .unwrap();
        assert_eq!((ok.format, ok.mode), (Format::Csv, Some(Mode::Condensed)));
    }
}
