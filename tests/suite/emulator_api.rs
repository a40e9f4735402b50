//! The emulator's HTTP contract, checked directly: auth, job lifecycle, errors, object URLs,
//! downloads, faults, rate limits and the control routes.

use crate::common;

use std::io::Read;
use std::time::Duration;

use dap_replica::emulator::{Emulator, EmulatorConfig, Endpoint, FaultKind, FaultSpec};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Api {
    emu: Emulator,
    http: reqwest::Client,
    token: String,
}

impl Api {
    async fn start(config: EmulatorConfig) -> Api {
        let emu = common::emulator(config).await;
        let http = reqwest::Client::new();
        let token = login(&http, &emu, &emu.config().client_secret.clone()).await.1["access_token"]
            .as_str()
            .unwrap()
            .to_string();
        Api { emu, http, token }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.emu.base_url())
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(self.url(path)).bearer_auth(&self.token).send().await.unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    /// Submits a query and returns the complete job (the default schedule completes at once).
    async fn complete_job(&self, table: &str, body: &str) -> Value {
        let (status, job) = self.post(&format!("/dap/query/canvas/table/{table}/data"), body).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        assert_eq!(job["status"], "complete");
        job
    }

    async fn object_url(&self, object_id: &str) -> String {
        let (status, urls) = self.post("/dap/object/url", &json!([{"id": object_id}]).to_string()).await;
        assert_eq!(status, StatusCode::OK, "{urls}");
        urls["urls"][object_id]["url"].as_str().unwrap().to_string()
    }
}

async fn login(http: &reqwest::Client, emu: &Emulator, secret: &str) -> (StatusCode, Value) {
    let r = http
        .post(format!("{}/ids/auth/login", emu.base_url()))
        .basic_auth(&emu.config().client_id, Some(secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

fn quick(config: EmulatorConfig) -> EmulatorConfig {
    EmulatorConfig { rows: 30, part_rows: 10, ..config }
}

#[tokio::test]
async fn login_answers_exactly_the_token_keys_and_refuses_bad_secrets() {
    let api = Api::start(quick(EmulatorConfig::default())).await;
    let (status, body) = login(&api.http, &api.emu, "emulator-secret").await;
    assert_eq!(status, StatusCode::OK);
    let mut keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["access_token", "expires_in", "scope", "token_type"]);
    let (status, body) = login(&api.http, &api.emu, "wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["type"], "AuthenticationError");
    assert!(body["error"]["uuid"].is_string());
}

#[tokio::test]
async fn every_dap_route_needs_an_unexpired_bearer_token() {
    // Long enough that it cannot expire between the login and the next statement on a busy
    // machine; `exp` is in whole seconds, so it has surely expired a second after its lifetime.
    let lifetime = Duration::from_secs(3);
    let api = Api::start(quick(EmulatorConfig { token_lifetime: lifetime, ..Default::default() })).await;
    assert_eq!(api.get("/dap/query/canvas/table").await.0, StatusCode::OK);
    let anonymous = api.http.get(api.url("/dap/query/canvas/table")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let forged = api.http.get(api.url("/dap/job/x")).bearer_auth(format!("{}x", api.token)).send().await.unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    tokio::time::sleep(lifetime + Duration::from_millis(1100)).await;
    let (status, body) = api.get("/dap/query/canvas/table").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"));
}

#[tokio::test]
async fn jobs_walk_waiting_running_complete_and_identical_queries_share_a_job() {
    // Each stage lasts long enough that a busy machine cannot skip it between two polls.
    let (waiting, running) = (Duration::from_secs(3), Duration::from_secs(3));
    let config = EmulatorConfig { job_waiting: waiting, job_running: running, ..quick(Default::default()) };
    let api = Api::start(config).await;
    let submitted = std::time::Instant::now();
    let (status, job) = api.post("/dap/query/canvas/table/users/data", r#"{"format":"tsv","mode":"condensed"}"#).await;
    assert_eq!((status, job["status"].as_str()), (StatusCode::ACCEPTED, Some("waiting")));
    assert_eq!(job.as_object().unwrap().len(), 3, "waiting jobs carry only id, status, expires_at: {job}");
    let id = job["id"].as_str().unwrap();
    let (_, again) = api.post("/dap/query/canvas/table/users/data", r#"{"format":"tsv","mode":"condensed"}"#).await;
    assert_eq!(again["id"], id, "an identical query returns the same job");
    let (_, other) = api.post("/dap/query/canvas/table/users/data", r#"{"format":"csv"}"#).await;
    assert_ne!(other["id"], id);
    // Polled until complete: the stages seen, in order, each once.
    let mut seen = vec!["waiting".to_string()];
    let done = loop {
        let (status, now) = api.get(&format!("/dap/job/{id}")).await;
        let stage = now["status"].as_str().unwrap().to_string();
        let expected = if stage == "complete" { StatusCode::OK } else { StatusCode::ACCEPTED };
        assert_eq!(status, expected, "{now}");
        if seen.last() != Some(&stage) {
            seen.push(stage.clone());
        }
        if stage == "complete" {
            break now;
        }
        assert!(submitted.elapsed() < Duration::from_secs(60), "never completed: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(seen, ["waiting", "running", "complete"]);
    assert!(submitted.elapsed() >= waiting + running, "complete after {:?}", submitted.elapsed());
    let keys: Vec<&String> = done.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["id", "status", "expires_at", "objects", "schema_version", "at"]);
    assert_eq!(done["objects"].as_array().unwrap().len(), 4, "3 data parts and a header-only part");
    api.emu.expire_jobs();
    let (status, gone) = api.get(&format!("/dap/job/{id}")).await;
    assert_eq!((status, gone["error"]["kind"].as_str()), (StatusCode::NOT_FOUND, Some("job")));
}

#[tokio::test]
async fn bad_queries_get_validation_and_not_found_errors() {
    let api = Api::start(quick(Default::default())).await;
    let (status, e) = api.post("/dap/query/canvas/table/users/data", r#"{"format":"xml"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["type"], "ValidationError");
    assert_eq!(e["error"]["location"], json!({"line": 1, "column": 2, "character": 1}));
    let (status, e) =
        api.post("/dap/query/canvas/table/users/data", r#"{"format":"tsv","since":"2025-01-01T00:00:00"}"#).await;
    assert_eq!(
        (status, e["error"]["type"].as_str()),
        (StatusCode::BAD_REQUEST, Some("ValidationError")),
        "naive since"
    );
    let (status, e) = api.post("/dap/query/canvas/table/nope/data", r#"{"format":"tsv"}"#).await;
    assert_eq!(
        (status, &e["error"]["kind"], &e["error"]["id"]),
        (StatusCode::NOT_FOUND, &json!("table"), &json!("nope"))
    );
    let (status, e) = api.get("/dap/query/nowhere/table").await;
    assert_eq!((status, e["error"]["kind"].as_str()), (StatusCode::NOT_FOUND, Some("namespace")));
    let (status, e) = api.post("/dap/object/url", r#"[{"id":"no-such-job/part-00000.tsv.gz"}]"#).await;
    assert_eq!((status, e["error"]["kind"].as_str()), (StatusCode::NOT_FOUND, Some("object")));
}

#[tokio::test]
async fn incrementals_report_the_latest_commit_as_until() {
    let api = Api::start(quick(Default::default())).await;
    let snap = api.complete_job("accounts", r#"{"format":"jsonl"}"#).await;
    let at = snap["at"].as_str().unwrap().to_string();
    let (_, nothing) =
        api.post("/dap/query/canvas/table/accounts/data", &json!({"format": "jsonl", "since": at}).to_string()).await;
    assert_eq!(nothing["until"], at, "no changes: until = since");
    let c = api
        .emu
        .commit(
            "canvas",
            "accounts",
            dap_replica::emulator::ChangeCounts { updates: 2, hard_deletes: 1, ..Default::default() },
        )
        .unwrap();
    let job =
        api.complete_job("accounts", &json!({"format": "jsonl", "since": at, "mode": "condensed"}).to_string()).await;
    assert_eq!(job["until"], c.ts);
    let mut records = Vec::new();
    for o in job["objects"].as_array().unwrap() {
        let bytes =
            api.http.get(api.object_url(o["id"].as_str().unwrap()).await).send().await.unwrap().bytes().await.unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut text).unwrap();
        records.extend(text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
    }
    assert_eq!(records.len(), 3);
    let deletes: Vec<&Value> = records.iter().filter(|r| r["meta"]["action"] == "D").collect();
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0]["key"]["id"], c.hard_deleted[0]);
    assert!(deletes[0].get("value").is_none(), "a delete carries the key only");
}

/// A benchmark's commit can prepare the increment database commands will ask for, so that
/// clients pay only their download: the same query then gets that job, complete, with the
/// commit's records.
#[tokio::test]
async fn a_prepared_commit_hands_the_database_query_its_ready_job() {
    let api = Api::start(quick(Default::default())).await;
    let snap = api.complete_job("accounts", r#"{"format":"tsv","mode":"condensed"}"#).await;
    let at = snap["at"].as_str().unwrap().to_string();
    let commit = api
        .http
        .post(api.url("/emulator/commit"))
        .json(&json!({"namespace": "canvas", "table": "accounts", "updates": 3, "inserts": 2, "prepare": "tsv"}))
        .send()
        .await
        .unwrap();
    assert_eq!(commit.status(), StatusCode::OK);
    let commit: Value = commit.json().await.unwrap();
    let prepared = &commit["prepared"];
    assert!(prepared["objects"].as_u64().unwrap() >= 1, "{commit}");
    assert!(prepared["seconds"].as_f64().unwrap() >= 0.0);
    let query = json!({"format": "tsv", "mode": "condensed", "since": at}).to_string();
    let job = api.complete_job("accounts", &query).await;
    assert_eq!(job["id"], prepared["job"], "the database command's query gets the prepared job");
    assert_eq!(job["until"], commit["ts"]);
    let mut lines = 0;
    for o in job["objects"].as_array().unwrap() {
        let bytes =
            api.http.get(api.object_url(o["id"].as_str().unwrap()).await).send().await.unwrap().bytes().await.unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut text).unwrap();
        lines += text.lines().skip(1).filter(|l| !l.is_empty()).count();
    }
    assert_eq!(lines, 5, "the commit's five changed rows");
    // dap-replica asks from a little before its watermark (a fresh query each time): another
    // job, with the same content, so the same prepared objects.
    let since = dap_replica::time::parse_rfc3339(&at).unwrap() - 300_000;
    let jittered = api
        .complete_job(
            "accounts",
            &json!({"format": "tsv", "mode": "condensed", "since": dap_replica::time::format_wire(since)}).to_string(),
        )
        .await;
    assert_ne!(jittered["id"], prepared["job"]);
    let names = |job: &Value| -> Vec<String> {
        job["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_str().unwrap().split_once('/').unwrap().1.into())
            .collect()
    };
    assert_eq!(names(&jittered), names(&job), "equal content, equal objects");
    let other = api.complete_job("accounts", &json!({"format": "jsonl", "since": at}).to_string()).await;
    assert_ne!(other["id"], prepared["job"], "another format is another query");
    let refused = api
        .http
        .post(api.url("/emulator/commit"))
        .json(&json!({"namespace": "canvas", "table": "nope", "updates": 1, "prepare": "tsv"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn object_urls_expire_and_downloads_support_ranges() {
    // Long enough that the URL cannot expire between the statements that use it.
    let lifetime = Duration::from_secs(3);
    let api = Api::start(quick(EmulatorConfig { url_lifetime: lifetime, ..Default::default() })).await;
    let job = api.complete_job("users", r#"{"format":"tsv","mode":"condensed"}"#).await;
    let url = api.object_url(job["objects"][0]["id"].as_str().unwrap()).await;
    let full = api.http.get(&url).send().await.unwrap();
    assert_eq!(full.status(), StatusCode::OK);
    assert!(full.headers().get("content-encoding").is_none(), "objects are served without Content-Encoding");
    let full = full.bytes().await.unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&full[..]).read_to_string(&mut text).unwrap();
    assert!(text.starts_with("meta.ts\tkey.id\t"));
    let tail = api.http.get(&url).header("range", "bytes=10-").send().await.unwrap();
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.bytes().await.unwrap(), full.slice(10..));
    tokio::time::sleep(lifetime + Duration::from_millis(100)).await;
    let expired = api.http.get(&url).send().await.unwrap();
    assert_eq!(expired.status(), StatusCode::FORBIDDEN);
    assert!(expired.text().await.unwrap().contains("Request has expired"));
}

#[tokio::test]
async fn truncated_and_reset_downloads_are_broken_transfers() {
    let api = Api::start(quick(Default::default())).await;
    let job = api.complete_job("users", r#"{"format":"csv"}"#).await;
    let url = api.object_url(job["objects"][0]["id"].as_str().unwrap()).await;
    let good = api.http.get(&url).send().await.unwrap().bytes().await.unwrap();

    api.emu.inject(FaultSpec::new(FaultKind::TruncatedGzip, 1).on(Endpoint::Object));
    let cut = api.http.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert!(cut.len() < good.len());
    let mut sink = Vec::new();
    assert!(
        flate2::read::GzDecoder::new(&cut[..]).read_to_end(&mut sink).is_err(),
        "a truncated gzip stream does not decode"
    );

    api.emu.inject(FaultSpec::new(FaultKind::Reset, 1).on(Endpoint::Object));
    let reset = api.http.get(&url).send().await.unwrap();
    assert!(reset.bytes().await.is_err(), "the body breaks off");

    api.emu.inject(FaultSpec::new(FaultKind::ExpiredUrl, 1));
    assert_eq!(api.http.get(&url).send().await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(api.http.get(&url).send().await.unwrap().bytes().await.unwrap(), good, "faults are used up");
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let api = Api::start(quick(EmulatorConfig {
        rate_limits: true,
        // Long enough that the five admitted queries surely fall within one window.
        rate_window: Duration::from_secs(5),
        ..Default::default()
    }))
    .await;
    for t in ["users", "accounts", "courses", "roles", "scores"] {
        assert_eq!(
            api.post(&format!("/dap/query/canvas/table/{t}/data"), r#"{"format":"tsv"}"#).await.0,
            StatusCode::OK
        );
    }
    let sixth = api
        .http
        .post(api.url("/dap/query/canvas/table/wikis/data"))
        .bearer_auth(&api.token)
        .body(r#"{"format":"tsv"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(sixth.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = sixth.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&wait), "Retry-After: {wait}");
    assert_eq!(api.get("/dap/query/canvas/table/users/schema").await.0, StatusCode::OK, "limits are per endpoint");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(api.post("/dap/query/canvas/table/wikis/data", r#"{"format":"tsv"}"#).await.0, StatusCode::OK);
    assert_eq!(api.emu.stats().count(Endpoint::Query, 429), 1);
}

#[tokio::test]
async fn control_routes_commit_evolve_inject_and_report_truth() {
    let api = Api::start(quick(Default::default())).await;
    let http = &api.http;
    let commit = http
        .post(api.url("/emulator/commit"))
        .json(&json!({"namespace": "canvas", "table": "users", "inserts": 2, "hard_deletes": 1}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(commit["inserted"].as_array().unwrap().len(), 2);
    let truth = http.get(api.url("/emulator/truth/canvas/users")).send().await.unwrap().text().await.unwrap();
    assert_eq!(truth.lines().count(), 31);
    let first: Value = serde_json::from_str(truth.lines().next().unwrap()).unwrap();
    assert!(first.get("id").is_some() && first.get("workflow_state").is_some());

    let bump = http
        .post(api.url("/emulator/schema"))
        .json(&json!({"namespace": "canvas", "table": "users", "change": "add_column"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bump.json::<Value>().await.unwrap()["version"], 2);
    let (_, schema) = api.get("/dap/query/canvas/table/users/schema").await;
    assert_eq!(schema["version"], 2);
    assert!(schema["schema"]["properties"]["value"]["properties"]["added_in_v2"].is_object());

    let fault = http
        .post(api.url("/emulator/faults"))
        .json(&json!({"kind": "server_error", "endpoint": "table_list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fault.status(), StatusCode::NO_CONTENT);
    assert_eq!(api.get("/dap/query/canvas/table").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(api.get("/dap/query/canvas/table").await.0, StatusCode::OK);
    let stats: Value = http.get(api.url("/emulator/stats")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["responses"]["table_list"]["500"], 1);

    let missing = http.get(api.url("/emulator/truth/canvas/nope")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}
