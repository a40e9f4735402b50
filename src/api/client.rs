//! The DAP HTTP API client: login and token renewal, the query, job and object routes, retries
//! with backoff where a retry can help, and pacing to DAP's job-creation limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use super::error::{ApiError, Retryable, ServerErrorKind, transport_failure};
use super::pacer::Pacer;
use super::types::{ErrorEnvelope, Job, JobStatus, Query, ResourceUrls, TableList, TokenResponse};

/// How a request authenticates.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Auth {
    /// The client id and secret (the login itself).
    Basic,
    /// The access token; a 401 logs in again once.
    Bearer,
}

/// Whether a request waits for the job-creation limit.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pacing {
    /// Creates a job: counted against DAP's jobs-per-minute limit.
    JobCreation,
    Unpaced,
}

/// Whether the configured `scope` query parameter goes with a request (the query routes take
/// it; job and object routes do not).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scope {
    Sent,
    Omitted,
}

/// How often and how patiently failed requests are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in total, the first included.
    pub attempts: u32,
    /// First backoff; it doubles per attempt, with full jitter, up to `cap`.
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 8, base: Duration::from_millis(500), cap: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`: the server's `Retry-After` when given, else
    /// exponential backoff with full jitter.
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(Duration::from_secs(300));
        }
        let ceiling = self.base.saturating_mul(1 << attempt.min(16)).min(self.cap);
        ceiling.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub base_url: String,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    /// The documented `scope` parameter (e.g. a root account), sent on query, table-list and
    /// schema calls.
    pub scope: Option<String>,
    pub retry: RetryPolicy,
    /// At most this many job creations (`POST …/data`) per `job_window` (5 per minute in DAP).
    pub job_limit: usize,
    pub job_window: Duration,
    /// How long to wait for a job before giving up.
    pub job_deadline: Duration,
    /// Longest pause between two polls of a job. The default, 5 s, is the official client's
    /// interval: a complete job is noticed within 5 s, and the 32 jobs a run waits on at most
    /// poll 384 times a minute, under DAP's limit of 500.
    pub poll_cap: Duration,
}

/// A name as one segment of an API path: a table or namespace name (from a command line or a
/// server) can never reach another route (`../../x`, `a/b`, `?`, `#`).
fn segment(name: &str) -> percent_encoding::PercentEncode<'_> {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'_').remove(b'-');
    percent_encoding::utf8_percent_encode(name, SEGMENT)
}

impl ClientConfig {
    /// Whether DAP can be asked at all: both halves of the credentials are set.
    pub fn has_credentials(&self) -> bool {
        self.client_id.is_some() && self.client_secret.is_some()
    }

    pub fn new(base_url: &str) -> ClientConfig {
        // A password in the base URL (a proxy's) is hidden wherever the URL is printed.
        if let Some((_, rest)) = base_url.split_once("://")
            && let Some((userinfo, _)) = rest.rsplit_once('@')
            && let Some((_, password)) = userinfo.split_once(':')
        {
            crate::secrets::register(password);
            if let Ok(decoded) = percent_encoding::percent_decode_str(password).decode_utf8() {
                crate::secrets::register(&decoded);
            }
        }
        ClientConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            client_id: None,
            client_secret: None,
            scope: None,
            retry: RetryPolicy::default(),
            job_limit: 5,
            job_window: Duration::from_secs(60),
            job_deadline: Duration::from_secs(6 * 3600),
            poll_cap: Duration::from_secs(5),
        }
    }
}

/// A complete job: what to download and the times it covers.
#[derive(Debug, Clone)]
pub struct CompleteJob {
    pub id: String,
    pub schema_version: u32,
    pub objects: Vec<String>,
    /// Snapshot time, or the incremental's `since` and `until`.
    pub at: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
}

struct Token {
    bearer: String,
    /// Unix seconds.
    expires: i64,
}

/// Refresh the token when it has less than this left (as the official client does).
const REFRESH_AHEAD_SECS: i64 = 300;

/// A DAP API client. Cheap to clone: clones share the token, the pacing window and connections.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    config: Arc<ClientConfig>,
    token: Arc<Mutex<Option<Token>>>,
    pacer: Arc<Pacer>,
}

/// The `exp` claim of a JWT (not verified: the server verifies it).
fn jwt_expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?).ok()?;
    claims.get("exp")?.as_i64()
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return Some(Duration::from_secs_f64(secs.max(0.0)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// A URL without its query string (pre-signed URLs carry signatures that must not be logged).
pub fn redact_url(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, ApiError> {
        if config.client_id.as_deref().is_none_or(str::is_empty)
            || config.client_secret.as_deref().is_none_or(str::is_empty)
        {
            return Err(ApiError::MissingCredentials);
        }
        if let (Some(id), Some(secret)) = (&config.client_id, &config.client_secret) {
            crate::secrets::register(secret);
            crate::secrets::register(&base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("dap-replica/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ApiError::Transport {
                url: config.base_url.clone(),
                attempts: 0,
                detail: transport_failure(&e).0,
            })?;
        let pacer = Arc::new(Pacer::new(config.job_limit, config.job_window));
        Ok(Client { http, config: Arc::new(config), token: Arc::default(), pacer })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The plain HTTP client (for object downloads, which carry no Authorization header).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A bearer token with at least five minutes left, logging in when needed.
    async fn bearer(&self) -> Result<String, ApiError> {
        let mut token = self.token.lock().await;
        let now = crate::time::now() / 1_000_000;
        if let Some(t) = token.as_ref().filter(|t| t.expires - REFRESH_AHEAD_SECS > now) {
            return Ok(t.bearer.clone());
        }
        let (id, secret) =
            (self.config.client_id.clone().unwrap_or_default(), self.config.client_secret.clone().unwrap_or_default());
        let url = format!("{}/ids/auth/login", self.config.base_url);
        // Boxed: `send` calls `bearer` for authenticated requests (never for this one).
        let login = self.send(&url, Auth::Basic, Pacing::Unpaced, || {
            self.http.post(&url).basic_auth(&id, Some(&secret)).form(&[("grant_type", "client_credentials")])
        });
        let response: TokenResponse = Box::pin(login).await?;
        crate::secrets::register(&response.access_token);
        let expires = jwt_expiry(&response.access_token).unwrap_or(now + 3600);
        tracing::debug!("logged in; token valid until {}", crate::time::format_wire(expires * 1_000_000));
        *token = Some(Token { bearer: response.access_token.clone(), expires });
        Ok(response.access_token)
    }

    /// Sends a request built by `build`, retrying 429, 5xx (JSON or not), connection errors,
    /// timeouts and resets; parses a success as `T` and an error body by its `error.type`.
    async fn send<T: DeserializeOwned>(
        &self,
        url: &str,
        auth: Auth,
        pacing: Pacing,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, ApiError> {
        let policy = self.config.retry;
        let mut relogged = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ticket = if pacing == Pacing::JobCreation { Some(self.pacer.acquire().await) } else { None };
            let mut request = build();
            if auth == Auth::Bearer {
                request = request.bearer_auth(self.bearer().await?);
            }
            // One exchange: a failure to connect and a body that breaks off are retried alike.
            let exchange = async {
                let response = request.send().await?;
                let status = response.status();
                let wait_hint = retry_after(response.headers());
                let json = response
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/json"));
                Ok::<_, reqwest::Error>((status, wait_hint, json, response.bytes().await?))
            };
            let exchanged = exchange.await;
            if let Some(ticket) = ticket {
                self.pacer.done(ticket).await;
            }
            let (status, wait_hint, json, body) = match exchanged {
                Ok(exchanged) => exchanged,
                Err(e) => {
                    let (cause, retryable) = transport_failure(&e);
                    let limit = match retryable {
                        Retryable::Yes => policy.attempts,
                        Retryable::Briefly => policy.attempts.min(2),
                        Retryable::No => attempt,
                    };
                    if attempt >= limit {
                        return Err(ApiError::Transport { url: url.into(), attempts: attempt, detail: cause });
                    }
                    let wait = match retryable {
                        Retryable::Briefly => Duration::from_millis(500),
                        _ => policy.backoff(attempt, None),
                    };
                    tracing::warn!("{url}: {cause}; retrying in {:.1} s ({attempt}/{limit})", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            if (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()) && attempt < policy.attempts {
                let wait = policy.backoff(attempt, wait_hint);
                tracing::warn!(
                    "{url}: HTTP {status}; retrying in {:.1} s ({attempt}/{})",
                    wait.as_secs_f64(),
                    policy.attempts
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && auth == Auth::Bearer && !relogged {
                // The token was refused (revoked or clock skew): log in again once.
                relogged = true;
                *self.token.lock().await = None;
                continue;
            }
            if status.is_success() {
                return serde_json::from_slice(&body)
                    .map_err(|e| ApiError::Malformed { url: url.into(), detail: e.to_string() });
            }
            if json && let Ok(envelope) = serde_json::from_slice::<ErrorEnvelope>(&body) {
                return Err(ApiError::from_body(status.as_u16(), envelope.error));
            }
            return Err(ApiError::Unexpected { status: status.as_u16(), url: url.into(), snippet: snippet(&body) });
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        scope: Scope,
        pacing: Pacing,
    ) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.config.base_url);
        let scope: Vec<(&str, &str)> = match (&self.config.scope, scope) {
            (Some(s), Scope::Sent) => vec![("scope", s.as_str())],
            _ => vec![],
        };
        self.send(&url, Auth::Bearer, pacing, || {
            let r = self.http.request(method.clone(), &url).query(&scope);
            match body {
                Some(b) => r.json(b),
                None => r,
            }
        })
        .await
    }

    /// `GET /dap/query/{ns}/table`
    pub async fn tables(&self, namespace: &str) -> Result<Vec<String>, ApiError> {
        let list: TableList = self
            .call(Method::GET, &format!("/dap/query/{}/table", segment(namespace)), None, Scope::Sent, Pacing::Unpaced)
            .await?;
        Ok(list.tables)
    }

    /// `GET /dap/query/{ns}/table/{t}/schema`: the `{"schema", "version"}` envelope.
    pub async fn schema(&self, namespace: &str, table: &str) -> Result<serde_json::Value, ApiError> {
        let path = format!("/dap/query/{}/table/{}/schema", segment(namespace), segment(table));
        self.call(Method::GET, &path, None, Scope::Sent, Pacing::Unpaced).await
    }

    /// `POST /dap/query/{ns}/table/{t}/data`, paced to the job-creation limit.
    pub async fn submit(&self, namespace: &str, table: &str, query: &Query) -> Result<Job, ApiError> {
        let body = serde_json::to_value(query).expect("a query serialises");
        let path = format!("/dap/query/{}/table/{}/data", segment(namespace), segment(table));
        self.call(Method::POST, &path, Some(&body), Scope::Sent, Pacing::JobCreation).await
    }

    pub async fn job(&self, id: &str) -> Result<Job, ApiError> {
        self.call(Method::GET, &format!("/dap/job/{}", segment(id)), None, Scope::Omitted, Pacing::Unpaced).await
    }

    /// Pre-signed URLs for `ids`, asked for in batches.
    pub async fn object_urls(&self, ids: &[String]) -> Result<HashMap<String, String>, ApiError> {
        let mut urls = HashMap::new();
        for batch in ids.chunks(100) {
            let body = serde_json::Value::Array(batch.iter().map(|id| serde_json::json!({"id": id})).collect());
            let got: ResourceUrls =
                self.call(Method::POST, "/dap/object/url", Some(&body), Scope::Omitted, Pacing::Unpaced).await?;
            urls.extend(got.urls.into_iter().map(|(k, v)| (k, v.url)));
        }
        if let Some(missing) = ids.iter().find(|id| !urls.contains_key(*id)) {
            return Err(ApiError::Malformed {
                url: "/dap/object/url".into(),
                detail: format!("no URL for object {missing}"),
            });
        }
        Ok(urls)
    }

    /// How requests are retried (attempts, backoff).
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.config.retry
    }

    /// How long a job created now would wait for the creation rate (zero when it would not).
    pub fn next_job_slot(&self) -> Duration {
        self.pacer.wait()
    }

    /// The job-creation limit in force, as people say it ("5 jobs a minute").
    pub fn job_limit(&self) -> String {
        self.pacer.describe()
    }

    /// Submits `query` and polls the job (with backoff, up to the deadline) until it is complete;
    /// a job that expires while polled is submitted again. `on_stage` sees every state.
    pub async fn run_job(
        &self,
        namespace: &str,
        table: &str,
        query: &Query,
        on_stage: impl Fn(JobStage),
    ) -> Result<CompleteJob, ApiError> {
        let started = Instant::now();
        if !self.pacer.wait().is_zero() {
            on_stage(JobStage::WaitingForSlot);
        }
        let mut job = self.submit(namespace, table, query).await?;
        let mut delay = Duration::from_millis(250);
        loop {
            on_stage(JobStage::Job(job.status));
            match job.status {
                JobStatus::Complete => return complete(job),
                JobStatus::Failed => {
                    let e = job.error.unwrap_or_default();
                    return Err(ApiError::JobFailed {
                        id: job.id,
                        kind: e.kind.unwrap_or_else(|| "an unnamed error".into()),
                        message: e.message.unwrap_or_else(|| "no reason given".into()),
                        uuid: e.uuid.unwrap_or_else(|| "none".into()),
                        attempts: 1,
                    });
                }
                _ => {}
            }
            if started.elapsed() >= self.config.job_deadline {
                return Err(ApiError::JobTimeout { id: job.id, waited: started.elapsed() });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 3 / 2).min(self.config.poll_cap);
            job = match self.job(&job.id).await {
                Ok(j) => j,
                Err(e) if e.server_kind() == Some(&ServerErrorKind::NotFound) => {
                    tracing::warn!("job {} expired while waiting; submitting the query again", job.id);
                    self.submit(namespace, table, query).await?
                }
                Err(e) => return Err(e),
            };
        }
    }
}

/// Where a query stands, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStage {
    /// Held back by the job-creation limit (DAP allows 5 a minute; `DAP_JOB_RATE` says otherwise).
    WaitingForSlot,
    /// Submitted; the job's state as last polled.
    Job(JobStatus),
}

impl JobStage {
    /// The stage as a progress line says it.
    pub fn describe(self) -> &'static str {
        match self {
            JobStage::WaitingForSlot => "waiting for a job slot",
            JobStage::Job(JobStatus::Waiting) => "job queued",
            JobStage::Job(JobStatus::Running) => "job running",
            JobStage::Job(JobStatus::Complete) => "job complete",
            JobStage::Job(JobStatus::Failed) => "job failed",
            JobStage::Job(JobStatus::Unknown) => "job in an unknown state",
        }
    }
}

fn complete(job: Job) -> Result<CompleteJob, ApiError> {
    let malformed = |what: &str| ApiError::Malformed {
        url: format!("/dap/job/{}", job.id),
        detail: format!("complete job without {what}"),
    };
    Ok(CompleteJob {
        schema_version: job.schema_version.ok_or_else(|| malformed("schema_version"))?,
        objects: job.objects.clone().ok_or_else(|| malformed("objects"))?.into_iter().map(|o| o.id).collect(),
        id: job.id,
        at: job.at,
        since: job.since,
        until: job.until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_jwt_expiry() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"exp":1700000000}"#);
        assert_eq!(jwt_expiry(&format!("h.{payload}.s")), Some(1_700_000_000));
        assert_eq!(jwt_expiry("garbage"), None);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
    }

    #[test]
    fn backoff_grows_with_jitter_and_honours_the_server() {
        let p = RetryPolicy { attempts: 5, base: Duration::from_millis(100), cap: Duration::from_secs(1) };
        for attempt in 1..10 {
            let b = p.backoff(attempt, None);
            assert!(b <= Duration::from_secs(1));
            assert!(b >= (Duration::from_millis(100) * (1 << attempt.min(4))).min(Duration::from_secs(1)) / 2);
        }
        assert_eq!(p.backoff(1, Some(Duration::from_secs(7))), Duration::from_secs(7));
    }

    #[test]
    fn missing_credentials_fail_before_any_traffic() {
        let e = Client::new(ClientConfig::new("http://127.0.0.1:1")).err().unwrap();
        assert!(e.to_string().contains("DAP_CLIENT_ID") && e.to_string().contains("DAP_CLIENT_SECRET"));
    }

    #[test]
    fn urls_are_logged_without_signatures() {
        assert_eq!(redact_url("http://h/o/p.tsv.gz?X-Amz-Signature=abc"), "http://h/o/p.tsv.gz");
    }
}
