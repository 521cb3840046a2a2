//! The router against a real [`Service`] (a private temporary SQLite store, engine
//! with a scripted runner), through `tower::ServiceExt::oneshot`.
//!
//! Why one file of about 1,300 lines: these are the router's tests, one per
//! behaviour of the HTTP contract, sharing one fixture; no code of the
//! product lives here.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use taskexec_engine::{AttemptRunner, Engine, EngineConfig, SystemClock};
use taskexec_runtimes::Catalogue;
use taskexec_sandbox::cgroup::CgroupStats;
use taskexec_sandbox::{
    CancelToken, ExitStatus, ReadBackResult, RunOutcome, RunRequest, SandboxError, Termination,
};
use taskexec_service::{Service, ServiceConfig};
use taskexec_store::{Capacity, SqliteStore};
use tower::ServiceExt as _;

use super::*;

const TOKEN: &str = "s3cret-token";

/// What one scripted attempt does.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Exit 0 with this stdout and output `null`.
    Ok(&'static str),
    /// Run until cancelled.
    Block,
}

#[derive(Debug, Default)]
struct Scripted {
    steps: Mutex<VecDeque<Step>>,
}

fn outcome(termination: Termination, stdout: &str) -> RunOutcome {
    RunOutcome {
        termination,
        stdout: stdout.as_bytes().to_vec(),
        stdout_truncated: false,
        stderr: b"some stderr".to_vec(),
        stderr_truncated: false,
        read_back: vec![
            ReadBackResult::Read {
                data: b"null".to_vec(),
                truncated: false,
            },
            ReadBackResult::Missing,
        ],
        collected: Vec::new(),
        collect_error: None,
        disk_full: false,
        stats: CgroupStats::default(),
        wall_time: Duration::from_millis(1),
        run_time: Duration::from_millis(1),
        setup_time: Duration::from_millis(1),
        phases: Vec::new(),
    }
}

impl AttemptRunner for Scripted {
    fn run(&self, _req: &RunRequest, cancel: &CancelToken) -> Result<RunOutcome, SandboxError> {
        let step = self
            .steps
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(Step::Ok("hello\n"));
        match step {
            Step::Ok(stdout) => Ok(outcome(Termination::Exited(ExitStatus::Code(0)), stdout)),
            Step::Block => {
                while !cancel.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(outcome(Termination::Cancelled, ""))
            }
        }
    }

    fn describe(&self) -> String {
        "scripted".into()
    }
}

struct Setup {
    steps: Vec<Step>,
    max_queued: u64,
    config: ApiConfig,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            steps: Vec::new(),
            max_queued: 1_000,
            config: ApiConfig {
                auth_token: Some(TOKEN.to_owned()),
                ..ApiConfig::default()
            },
        }
    }
}

async fn start(setup: Setup) -> (Router, Arc<Service>) {
    let runner = Arc::new(Scripted {
        steps: Mutex::new(setup.steps.into_iter().collect()),
    });
    let engine = Engine::new(
        EngineConfig::default(),
        Catalogue::builtin(),
        runner,
        Arc::new(SystemClock::default()),
    );
    let store = SqliteStore::open("sqlite::memory:").await.expect("store");
    let mut config = ServiceConfig::new(
        "test-node",
        Capacity {
            cpu_millis: 4_000,
            memory_bytes: 8 << 30,
        },
    );
    config.max_queued = setup.max_queued;
    config.max_batch = 3;
    config.poll_interval = Duration::from_millis(50);
    let service = Service::start(Arc::new(engine), Arc::new(store), config)
        .await
        .expect("service");
    (router(Arc::clone(&service), setup.config), service)
}

async fn app() -> Router {
    start(Setup::default()).await.0
}

/// A response, its body parsed as JSON when it is JSON.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    json: Value,
}

impl Answer {
    /// Asserts the error shape; returns `error`.
    fn error(&self, status: StatusCode, kind: &str) -> &Value {
        assert_eq!(self.status, status, "{}", self.text);
        let err = &self.json["error"];
        assert_eq!(err["type"], kind, "{}", self.text);
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
        assert!(
            err.get("field").is_some(),
            "field always present: {}",
            self.text
        );
        assert_eq!(
            self.headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
        );
        err
    }
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = tokio::time::timeout(Duration::from_secs(30), app.clone().oneshot(req))
        .await
        .expect("answered in time")
        .expect("infallible");
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = tokio::time::timeout(
        Duration::from_secs(30),
        axum::body::to_bytes(res.into_body(), 64 << 20),
    )
    .await
    .expect("body in time")
    .expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        text,
        json,
    }
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .expect("request")
}

fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .expect("request")
}

fn post_json(uri: &str, v: &Value) -> Request<Body> {
    post(uri, v.to_string())
}

fn task(extra: Value) -> Value {
    let mut t = json!({"definition": {"name": "t", "runtime": "bash", "code": "echo hello"}});
    if let (Some(obj), Some(more)) = (t.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            obj.insert(k.clone(), v.clone());
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_required_except_for_health() {
    let app = app().await;
    let bare = |uri: &str| Request::get(uri).body(Body::empty()).expect("request");

    let a = send(&app, bare("/v1/runtimes")).await;
    a.error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert_eq!(a.headers[header::WWW_AUTHENTICATE], "Bearer");

    let wrong = Request::get("/v1/runtimes")
        .header(header::AUTHORIZATION, "Bearer not-the-token")
        .body(Body::empty())
        .expect("request");
    let a = send(&app, wrong).await;
    a.error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert_eq!(a.headers[header::WWW_AUTHENTICATE], "Bearer");

    let basic = Request::get("/v1/runtimes")
        .header(header::AUTHORIZATION, format!("Basic {TOKEN}"))
        .body(Body::empty())
        .expect("request");
    send(&app, basic)
        .await
        .error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");

    for uri in ["/openapi.json", "/metrics", "/v1/tasks", "/v1/tasks/x"] {
        send(&app, bare(uri))
            .await
            .error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    }
    // A POST without a token is refused before its body is looked at.
    let a = send(
        &app,
        Request::post("/v1/tasks")
            .body(Body::from("not json"))
            .expect("request"),
    )
    .await;
    a.error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");

    let a = send(&app, get("/v1/runtimes")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let runtimes = a.json.as_array().expect("a list");
    assert!(runtimes.iter().any(|r| r["name"] == "bash"), "{}", a.text);

    let a = send(&app, bare("/healthz")).await;
    assert_eq!(
        (a.status, a.json.clone()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let a = send(&app, bare("/readyz")).await;
    assert_eq!(
        (a.status, a.json.clone()),
        (StatusCode::OK, json!({"status": "ok"})),
        "{}",
        a.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_configured_means_open() {
    let (app, _service) = start(Setup {
        config: ApiConfig::default(),
        ..Setup::default()
    })
    .await;
    let a = send(
        &app,
        Request::get("/v1/runtimes")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit() {
    let (app, _service) = start(Setup {
        config: ApiConfig {
            auth_token: Some(TOKEN.to_owned()),
            max_body_bytes: 1024,
            metrics: None,
        },
        ..Setup::default()
    })
    .await;
    let big = task(json!({"input": "x".repeat(4096)}));
    let a = send(&app, post_json("/v1/tasks", &big)).await;
    a.error(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");
    // Streamed without a Content-Length too.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big.to_string())];
    let body = Body::from_stream(tokio_stream::iter(chunks));
    let a = send(&app, post("/v1/tasks/batch", body)).await;
    a.error(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");
    // Under the limit: accepted.
    let a = send(&app, post_json("/v1/tasks", &task(json!({})))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies() {
    let app = app().await;
    let a = send(&app, post("/v1/tasks", "{\"definition\": ")).await;
    let e = a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("malformed JSON")),
        "{}",
        a.text
    );
    assert_eq!(e["field"], Value::Null);

    let a = send(
        &app,
        post_json("/v1/tasks", &task(json!({"colour": "red"}))),
    )
    .await;
    let e = a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains("colour")),
        "{}",
        a.text
    );
    assert_eq!(e["field"], "colour");

    let body = json!({"definition": {"code": "x", "runtime": "bash", "shape": 1}});
    let a = send(&app, post_json("/v1/tasks", &body)).await;
    let e = a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert_eq!(e["field"], "definition.shape", "{}", a.text);

    let a = send(
        &app,
        post_json("/v1/tasks", &task(json!({"priority": "high"}))),
    )
    .await;
    let e = a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert_eq!(e["field"], "priority", "{}", a.text);

    let a = send(&app, post_json("/v1/tasks", &json!({}))).await;
    let e = a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert_eq!(e["field"], "definition", "{}", a.text);

    let batch = json!({"tasks": [task(json!({})), {"definition": {"code": 5}}]});
    let a = send(&app, post_json("/v1/tasks/batch", &batch)).await;
    let e = a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert_eq!(e["field"], "tasks[1].definition.code", "{}", a.text);

    let plain = Request::post("/v1/tasks")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(task(json!({})).to_string()))
        .expect("request");
    send(&app, plain)
        .await
        .error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "BAD_REQUEST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_and_ids() {
    let app = app().await;
    let a = send(&app, get("/v1/tasks?status=DONE")).await;
    let e = a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert_eq!(e["field"], "status");
    let msg = e["message"].as_str().unwrap_or_default();
    for s in ["RECEIVED", "RUNNING", "COMPLETED", "CANCELLED"] {
        assert!(msg.contains(s), "{msg}");
    }
    let a = send(&app, get("/v1/tasks?limit=0")).await;
    assert_eq!(
        a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST")["field"],
        "limit"
    );
    let a = send(&app, get("/v1/tasks?stauts=FAILED")).await;
    assert_eq!(
        a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST")["field"],
        "stauts"
    );
    let a = send(&app, get("/v1/tasks?cursor=garbage")).await;
    assert_eq!(
        a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST")["field"],
        "cursor",
        "{}",
        a.text
    );

    let a = send(&app, post_json("/v1/tasks?wait=1h", &task(json!({})))).await;
    assert_eq!(
        a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST")["field"],
        "wait"
    );
    let a = send(&app, post_json("/v1/tasks?wait=soon", &task(json!({})))).await;
    assert_eq!(
        a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST")["field"],
        "wait"
    );

    let long = "x".repeat(257);
    for id in ["a%20b", "caf%C3%A9", "a%2Fb", long.as_str()] {
        let a = send(&app, get(&format!("/v1/tasks/{id}"))).await;
        assert_eq!(
            a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST")["field"],
            "id",
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found() {
    let app = app().await;
    for uri in [
        "/v1/tasks/nope",
        "/v1/tasks/nope/logs",
        "/v1/tasks/nope/events",
    ] {
        let a = send(&app, get(uri)).await;
        let e = a.error(StatusCode::NOT_FOUND, "NOT_FOUND");
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains("nope")),
            "{uri}: {}",
            a.text
        );
    }
    let a = send(&app, post("/v1/tasks/nope/cancel", "")).await;
    a.error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let a = send(&app, get("/v2/anything")).await;
    a.error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let del = Request::delete("/v1/tasks")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .expect("request");
    let a = send(&app, del).await;
    a.error(StatusCode::METHOD_NOT_ALLOWED, "BAD_REQUEST");
    // Metrics are off in this configuration.
    send(&app, get("/metrics"))
        .await
        .error(StatusCode::NOT_FOUND, "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_get_logs_events_list() {
    let (app, _service) = start(Setup {
        steps: vec![Step::Ok("hello from the task\n")],
        ..Setup::default()
    })
    .await;
    let a = send(&app, post_json("/v1/tasks", &task(json!({"id": "job-1"})))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.json["id"], "job-1");
    assert!(a.json["status"].is_string());
    assert_eq!(a.headers[header::LOCATION], "/v1/tasks/job-1");

    // Long-poll an already submitted task through an idempotent repeat is
    // covered below; here, wait on a new one.
    let a = send(
        &app,
        post_json("/v1/tasks?wait=20s", &task(json!({"id": "job-2"}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["status"], "COMPLETED", "{}", a.text);
    assert_eq!(a.json["task"]["id"], "job-2");
    assert!(
        a.json["history"].as_array().is_some_and(|h| h.len() >= 4),
        "{}",
        a.text
    );

    // job-1 finishes too.
    let rec = loop {
        let a = send(&app, get("/v1/tasks/job-1")).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        if a.json["status"] == "COMPLETED" {
            break a.json;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(rec["runtime"], "bash");
    assert_eq!(rec["result"]["status"], "COMPLETED");

    let a = send(&app, get("/v1/tasks/job-1/logs")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(
        a.json,
        json!({"id": "job-1", "status": "COMPLETED", "stdout": "hello from the task\n",
               "stderr": "some stderr", "stdoutTruncated": false, "stderrTruncated": false})
    );

    // A final task's stream is its history, then the end.
    let a = send(&app, get("/v1/tasks/job-1/events")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(
        a.headers[header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/event-stream")),
    );
    let events = sse_events(&a.text);
    let history = rec["history"].as_array().expect("history");
    assert_eq!(events.len(), history.len(), "{}", a.text);
    for (ev, h) in events.iter().zip(history) {
        assert_eq!(ev["taskId"], "job-1");
        assert_eq!(ev["to"], h["to"]);
        assert_eq!(ev["attempt"], h["attempt"]);
    }
    assert_eq!(
        events.last().map(|e| e["to"].clone()),
        Some(json!("COMPLETED"))
    );

    let a = send(&app, get("/v1/tasks?status=completed&limit=1")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let items = a.json["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{}", a.text);
    assert_eq!(items[0]["status"], "COMPLETED");
    let cursor = a.json["nextCursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let a = send(
        &app,
        get(&format!(
            "/v1/tasks?status=COMPLETED&limit=1&cursor={cursor}"
        )),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let ids: BTreeSet<String> = [&items[0], &a.json["items"][0]]
        .iter()
        .filter_map(|i| i["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from(["job-1".to_owned(), "job-2".to_owned()])
    );
    let a = send(&app, get("/v1/tasks?runtime=python")).await;
    assert_eq!(a.json["items"], json!([]), "{}", a.text);

    // Cancelling a final task conflicts.
    let a = send(&app, post("/v1/tasks/job-1/cancel", "")).await;
    let e = a.error(StatusCode::CONFLICT, "CONFLICT");
    assert_eq!(e["status"], "COMPLETED");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("COMPLETED"))
    );

    // Reusing an id conflicts.
    let a = send(&app, post_json("/v1/tasks", &task(json!({"id": "job-1"})))).await;
    assert_eq!(
        a.error(StatusCode::CONFLICT, "CONFLICT")["field"],
        "id",
        "{}",
        a.text
    );
}

/// The data of each `transition` event of an SSE body.
fn sse_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter(|block| block.lines().any(|l| l == "event: transition"))
        .map(|block| {
            let data: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect();
            serde_json::from_str(&data).expect("event data is JSON")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_and_cancel() {
    let (app, service) = start(Setup {
        steps: vec![Step::Block],
        ..Setup::default()
    })
    .await;
    let a = send(
        &app,
        post_json("/v1/tasks", &task(json!({"id": "blocker"}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    // Wait until it runs.
    loop {
        let rec = service.get("blocker").await.expect("store").expect("task");
        if rec.status == taskexec_model::TaskStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Open the stream, then cancel: the stream shows the history, then the
    // cancellation, and ends.
    let res = app
        .clone()
        .oneshot(get("/v1/tasks/blocker/events"))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    let body = tokio::spawn(async move {
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body")
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let a = send(&app, post("/v1/tasks/blocker/cancel", "")).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.json["id"], "blocker");
    let bytes = tokio::time::timeout(Duration::from_secs(20), body)
        .await
        .expect("the stream ends after the final event")
        .expect("join");
    let events = sse_events(&String::from_utf8_lossy(&bytes));
    let tos: Vec<&str> = events.iter().filter_map(|e| e["to"].as_str()).collect();
    assert_eq!(tos.first(), Some(&"RECEIVED"), "{tos:?}");
    assert_eq!(tos.last(), Some(&"CANCELLED"), "{tos:?}");
    assert!(tos.contains(&"RUNNING"), "{tos:?}");
    let unique: BTreeSet<String> = events.iter().map(|e| e.to_string()).collect();
    assert_eq!(unique.len(), events.len(), "no duplicates: {tos:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued() {
    // No room to run anything: the task stays queued.
    let runner = Arc::new(Scripted::default());
    let engine = Engine::new(
        EngineConfig::default(),
        Catalogue::builtin(),
        runner,
        Arc::new(SystemClock::default()),
    );
    let store = SqliteStore::open("sqlite::memory:").await.expect("store");
    let mut config = ServiceConfig::new(
        "test-node",
        Capacity {
            cpu_millis: 4_000,
            memory_bytes: 8 << 30,
        },
    );
    config.workers = 0;
    let service = Service::start(Arc::new(engine), Arc::new(store), config)
        .await
        .expect("service");
    let app = router(service, ApiConfig::default());
    let a = send(
        &app,
        post_json("/v1/tasks", &task(json!({"id": "waiting"}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.json["status"], "RECEIVED");
    let a = send(&app, post("/v1/tasks/waiting/cancel", "")).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.json, json!({"id": "waiting", "status": "CANCELLED"}));
    let a = send(&app, get("/v1/tasks/waiting")).await;
    assert_eq!(a.json["status"], "CANCELLED", "{}", a.text);
    // The stream of a cancelled task ends at once.
    let a = send(&app, get("/v1/tasks/waiting/events")).await;
    let tos: Vec<Value> = sse_events(&a.text)
        .iter()
        .map(|e| e["to"].clone())
        .collect();
    assert_eq!(
        tos,
        vec![json!("RECEIVED"), json!("CANCELLED")],
        "{}",
        a.text
    );
    // A wait that runs out answers 202 with the current status.
    let a = send(
        &app,
        post_json("/v1/tasks?wait=200ms", &task(json!({"id": "slow"}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.json, json!({"id": "slow", "status": "RECEIVED"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency() {
    let app = app().await;
    let with_key = |key: &str, body: &Value| {
        Request::post("/v1/tasks")
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(Body::from(body.to_string()))
            .expect("request")
    };
    let a = send(&app, with_key("k-1", &task(json!({})))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    let first = a.json["id"].as_str().expect("id").to_owned();
    let a = send(&app, with_key("k-1", &task(json!({})))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["id"], first.as_str());
    // The body's key is the same key.
    let a = send(
        &app,
        post_json("/v1/tasks", &task(json!({"idempotencyKey": "k-1"}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json["id"], first.as_str());
    let a = send(&app, get(&format!("/v1/tasks/{first}"))).await;
    assert_eq!(a.json["task"]["idempotencyKey"], "k-1", "{}", a.text);
    // Header and body disagree.
    let a = send(
        &app,
        with_key("k-2", &task(json!({"idempotencyKey": "k-3"}))),
    )
    .await;
    assert_eq!(
        a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST")["field"],
        "idempotencyKey"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_with_a_different_body_is_refused() {
    let app = app().await;
    let with_key = |uri: &str, key: &str, body: &str| {
        Request::post(uri)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(Body::from(body.to_owned()))
            .expect("request")
    };
    let body = task(json!({"input": {"a": 1, "b": [2, 3]}})).to_string();
    let a = send(&app, with_key("/v1/tasks", "d-1", &body)).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    let first = a.json["id"].as_str().expect("id").to_owned();
    // The same task with other whitespace and key order, and through
    // `wait` (which assigns the id before storing): the same request.
    let reordered = r#"{ "input": {"b": [2, 3], "a": 1},
        "definition": {"code": "echo hello", "runtime": "bash", "name": "t"} }"#;
    for uri in ["/v1/tasks", "/v1/tasks?wait=10ms"] {
        let a = send(&app, with_key(uri, "d-1", reordered)).await;
        assert_eq!(a.status, StatusCode::OK, "{uri}: {}", a.text);
        // A reference, or the whole record if the task is final by now.
        let id = a.json.get("id").unwrap_or(&a.json["task"]["id"]);
        assert_eq!(id, first.as_str(), "{uri}: {}", a.text);
    }
    // Another input under the same key.
    let other = task(json!({"input": {"a": 2}})).to_string();
    let a = send(&app, with_key("/v1/tasks", "d-1", &other)).await;
    let e = a.error(StatusCode::UNPROCESSABLE_ENTITY, "INPUT_VALIDATION");
    assert_eq!(e["field"], "Idempotency-Key", "{}", a.text);
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains(&first)),
        "{}",
        a.text
    );
    // In a batch, naming the task.
    let batch = json!({"tasks": [task(json!({})), task(json!({"idempotencyKey": "d-1"}))]});
    let a = send(&app, post_json("/v1/tasks/batch", &batch)).await;
    let e = a.error(StatusCode::UNPROCESSABLE_ENTITY, "INPUT_VALIDATION");
    assert_eq!(e["field"], "tasks[1].idempotencyKey", "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches() {
    let app = app().await;
    let batch = json!({"tasks": [task(json!({"id": "b-1"})), task(json!({"id": "b-2", "idempotencyKey": "bk"}))]});
    let a = send(&app, post_json("/v1/tasks/batch", &batch)).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(
        a.json,
        json!({"tasks": [
            {"id": "b-1", "status": "RECEIVED", "existing": false},
            {"id": "b-2", "status": "RECEIVED", "existing": false},
        ]})
    );
    let again = json!({"tasks": [task(json!({"id": "b-2", "idempotencyKey": "bk"}))]});
    let a = send(&app, post_json("/v1/tasks/batch", &again)).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.json["tasks"][0]["id"], "b-2");
    assert_eq!(a.json["tasks"][0]["existing"], true);

    // A rejected task refuses the batch, naming it.
    let bad = json!({"tasks": [task(json!({"id": "b-4"})), task(json!({"id": "b-5", "priority": 5000}))]});
    let a = send(&app, post_json("/v1/tasks/batch", &bad)).await;
    let e = a.error(StatusCode::UNPROCESSABLE_ENTITY, "INPUT_VALIDATION");
    assert_eq!(e["field"], "tasks[1].priority", "{}", a.text);
    send(&app, get("/v1/tasks/b-4"))
        .await
        .error(StatusCode::NOT_FOUND, "NOT_FOUND");

    for n in [0, 4] {
        let tasks: Vec<Value> = (0..n).map(|_| task(json!({}))).collect();
        let a = send(
            &app,
            post_json("/v1/tasks/batch", &json!({ "tasks": tasks })),
        )
        .await;
        assert_eq!(
            a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST")["field"],
            "tasks",
            "{n}"
        );
    }
    let a = send(
        &app,
        post_json("/v1/tasks/batch", &json!({"tasks": [], "more": 1})),
    )
    .await;
    assert_eq!(
        a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST")["field"],
        "more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_task() {
    let app = app().await;
    let a = send(
        &app,
        post_json("/v1/tasks", &task(json!({"priority": 5000}))),
    )
    .await;
    let e = a.error(StatusCode::UNPROCESSABLE_ENTITY, "INPUT_VALIDATION");
    assert_eq!(e["field"], "priority", "{}", a.text);
    let body = json!({"definition": {"runtime": "cobol", "code": "x"}});
    let a = send(&app, post_json("/v1/tasks", &body)).await;
    a.error(StatusCode::UNPROCESSABLE_ENTITY, "INPUT_VALIDATION");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full() {
    let (app, _service) = start(Setup {
        max_queued: 0,
        ..Setup::default()
    })
    .await;
    let a = send(&app, post_json("/v1/tasks", &task(json!({})))).await;
    a.error(StatusCode::TOO_MANY_REQUESTS, "QUEUE_FULL");
    let secs: u64 = a.headers[header::RETRY_AFTER]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    assert!(secs >= 1);
}

fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("the only recorder of this test binary");
            taskexec_service::metric::describe();
            handle
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint() {
    let (app, _service) = start(Setup {
        config: ApiConfig {
            auth_token: Some(TOKEN.to_owned()),
            metrics: Some(prometheus()),
            ..ApiConfig::default()
        },
        ..Setup::default()
    })
    .await;
    send(&app, get("/v1/tasks/metrics-probe"))
        .await
        .error(StatusCode::NOT_FOUND, "NOT_FOUND");
    send(&app, get("/healthz")).await;
    let a = send(&app, get("/metrics")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.headers[header::CONTENT_TYPE], "text/plain; version=0.0.4");
    let line = a
        .text
        .lines()
        .find(|l| {
            l.starts_with("taskexec_http_requests_total{")
                && l.contains("route=\"/v1/tasks/{id}\"")
                && l.contains("status=\"404\"")
        })
        .unwrap_or_else(|| panic!("no request counter for the route template:\n{}", a.text));
    assert!(line.contains("method=\"GET\""), "{line}");
    assert!(
        !a.text.contains("metrics-probe"),
        "raw paths must not be labels"
    );
    assert!(a.text.contains("route=\"/healthz\""), "{}", a.text);
    let help = format!(
        "# HELP {} {}",
        taskexec_service::metric::HTTP_REQUESTS_TOTAL.name,
        taskexec_service::metric::HTTP_REQUESTS_TOTAL.help
    );
    assert!(a.text.contains(&help), "{}", a.text);
}

#[test]
fn openapi_document() {
    let doc = serde_json::to_value(openapi()).expect("serializes");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["title"], "taskexec");
    let paths = doc["paths"].as_object().expect("paths");
    let mut served = BTreeSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            if !["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            served.insert(format!("{} {path}", method.to_uppercase()));
            assert!(op["operationId"].is_string(), "{method} {path}");
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path}");
            for (code, r) in responses {
                if code.starts_with('4') || code.starts_with('5') {
                    let schema = &r["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorResponse",
                        "{method} {path} {code}"
                    );
                }
            }
            let open = path == "/healthz" || path == "/readyz";
            if open {
                assert_eq!(op["security"], json!([{}]), "{path} needs no token");
            } else {
                assert!(
                    responses.contains_key("401"),
                    "{method} {path} documents 401"
                );
            }
            // A JSON body declared otherwise is answered with 415.
            if op["requestBody"]["content"]["application/json"].is_object() {
                assert!(
                    responses.contains_key("415"),
                    "{method} {path} documents 415"
                );
            }
            if path.contains("{id}") {
                let params = op["parameters"].as_array().expect("parameters");
                assert!(
                    params
                        .iter()
                        .any(|p| p["name"] == "id" && p["in"] == "path"),
                    "{path}"
                );
            }
        }
    }
    let expected: BTreeSet<String> = [
        "POST /v1/tasks",
        "GET /v1/tasks",
        "POST /v1/tasks/batch",
        "GET /v1/tasks/{id}",
        "GET /v1/tasks/{id}/logs",
        "GET /v1/tasks/{id}/events",
        "POST /v1/tasks/{id}/cancel",
        "GET /v1/runtimes",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /openapi.json",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(served, expected);
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    let required = &doc["components"]["schemas"]["ErrorDetail"]["required"];
    assert_eq!(
        required,
        &json!(["type", "message", "field"]),
        "field is always present"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    // Every reference resolves.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{r}"));
        assert!(schemas.contains_key(name), "unresolved {r}");
    }
    for name in [
        "TaskInstance",
        "TaskRecord",
        "ListPage",
        "RuntimeInfo",
        "TaskRef",
        "TaskLogs",
    ] {
        assert!(schemas.contains_key(name), "{name}");
    }
    let submit = &paths["/v1/tasks"]["post"];
    assert_eq!(
        submit["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/TaskInstance"
    );
    let params: Vec<&str> = submit["parameters"]
        .as_array()
        .expect("params")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(params, ["wait", "Idempotency-Key"]);
    let list: BTreeSet<&str> = paths["/v1/tasks"]["get"]["parameters"]
        .as_array()
        .expect("params")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        list,
        BTreeSet::from(["status", "runtime", "workflowInstanceId", "limit", "cursor"])
    );
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref" {
                    out.extend(v.as_str().map(str::to_owned));
                } else {
                    collect_refs(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// The property names of a component schema.
fn properties(doc: &Value, name: &str) -> BTreeSet<String> {
    doc["components"]["schemas"][name]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name}"))
        .keys()
        .cloned()
        .collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().expect("object").keys().cloned().collect()
}

/// The documented mirrors of other crates' types have the real JSON's
/// property names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_match_the_real_json() {
    let doc = serde_json::to_value(openapi()).expect("serializes");
    let full_task = json!({
        "id": "m-1", "workflowInstanceId": "wf", "idempotencyKey": "ik", "priority": 1,
        "definition": {"name": "n", "runtime": "bash", "code": "echo", "mode": "script",
                       "inputSchema": {}, "outputSchema": {}, "preload": ["json"]},
        "input": {"a": 1},
        "executionConfig": {"runtime": "bash", "method": "AUTO", "resourceRequirements": {"memory": "64Mi"},
                            "securityContext": {}, "environmentVariables": {"A": "b"}},
        "retryPolicy": {"maxRetries": 1},
    });
    let mut instance: taskexec_model::TaskInstance =
        serde_json::from_value(full_task).expect("a valid task");
    let ser = serde_json::to_value(&instance).expect("ser");
    assert!(
        keys(&ser).is_subset(&properties(&doc, "TaskInstance")),
        "{ser}"
    );
    assert!(keys(&ser["definition"]).is_subset(&properties(&doc, "TaskDefinition")));
    assert!(keys(&ser["executionConfig"]).is_subset(&properties(&doc, "ExecutionConfig")));

    // Preloading is for python handlers: the bash script runs without it.
    instance.definition.preload.clear();
    let (app, service) = start(Setup::default()).await;
    let a = send(
        &app,
        post_json(
            "/v1/tasks?wait=20s",
            &serde_json::to_value(&instance).expect("ser"),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(keys(&a.json), properties(&doc, "TaskRecord"));
    assert_eq!(
        keys(&a.json["history"][0]),
        properties(&doc, "TransitionRecord")
    );
    let mut event_keys = properties(&doc, "TransitionRecord");
    event_keys.insert("taskId".to_owned());
    assert_eq!(properties(&doc, "TransitionEvent"), event_keys);
    let a = send(&app, get("/v1/tasks")).await;
    assert_eq!(keys(&a.json), properties(&doc, "ListPage"));
    assert_eq!(keys(&a.json["items"][0]), properties(&doc, "TaskSummary"));
    let runtimes = serde_json::to_value(service.runtimes()).expect("ser");
    assert_eq!(keys(&runtimes[0]), properties(&doc, "RuntimeInfo"));
    let a = send(&app, get("/v1/tasks/m-1/logs")).await;
    assert_eq!(keys(&a.json), properties(&doc, "TaskLogs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_is_served_and_every_documented_route_is_routed() {
    let app = app().await;
    let a = send(&app, get("/openapi.json")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json, serde_json::to_value(openapi()).expect("ser"));
    let paths = a.json["paths"].as_object().expect("paths").clone();
    for (path, item) in &paths {
        for method in item.as_object().expect("item").keys() {
            let Ok(m) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            let uri = path.replace("{id}", "no-such-task");
            let req = Request::builder()
                .method(m.clone())
                .uri(&uri)
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(if m == Method::POST { "{}" } else { "" }))
                .expect("request");
            let a = send(&app, req).await;
            assert_ne!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{m} {uri}");
            assert_ne!(
                a.json["error"]["message"], "no such route",
                "{m} {uri} is documented but not routed"
            );
        }
    }
}

/// An answer given before the request's body was read says
/// `Connection: close` (the server cannot reuse the connection); one whose
/// body was read, or that had none, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_body_closes_the_connection_and_a_read_one_does_not() {
    let app = app().await;
    let closes = |a: &Answer| {
        a.headers
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
    };
    // Refused on the query, before the body.
    let a = send(&app, post_json("/v1/tasks?bogus=1", &task(json!({})))).await;
    a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert!(closes(&a), "{:?}", a.headers);
    // Refused on the token, before the body.
    let no_token = Request::post("/v1/tasks")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(task(json!({})).to_string()))
        .expect("request");
    let a = send(&app, no_token).await;
    a.error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert!(closes(&a), "{:?}", a.headers);
    // Read whole, then refused: the connection stays usable.
    let a = send(&app, post("/v1/tasks", "not json")).await;
    a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert!(!closes(&a), "{:?}", a.headers);
    // Read whole and accepted.
    let a = send(&app, post_json("/v1/tasks", &task(json!({})))).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert!(!closes(&a), "{:?}", a.headers);
    // No body at all.
    let a = send(&app, get("/v1/tasks?limit=0")).await;
    a.error(StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert!(!closes(&a), "{:?}", a.headers);
}

/// Cancels racing the ends of running tasks (which complete at once): every
/// answer agrees with the stored outcome. A 202 is followed by CANCELLED
/// only; a 409 carries the final status the task keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_answers_agree_with_the_outcome() {
    const TASKS: usize = 30;
    let (app, service) = start(Setup::default()).await;
    let mut cancels = Vec::new();
    for i in 0..TASKS {
        let id = format!("race-{i}");
        let a = send(&app, post_json("/v1/tasks", &task(json!({"id": id})))).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
        let app = app.clone();
        cancels.push(tokio::spawn(async move {
            // Some cancels land while the task runs, some after.
            for _ in 0..(i % 4) {
                tokio::task::yield_now().await;
            }
            let a = send(&app, post(&format!("/v1/tasks/{id}/cancel"), "")).await;
            (id, a)
        }));
    }
    for cancel in cancels {
        let (id, a) = cancel.await.expect("cancel");
        let rec = service
            .wait_final(&id, Duration::from_secs(20))
            .await
            .expect("wait")
            .expect("the task");
        assert!(rec.status.is_final(), "{id}: {rec:?}");
        match a.status {
            StatusCode::ACCEPTED => {
                assert_eq!(
                    rec.status,
                    taskexec_model::TaskStatus::Cancelled,
                    "{id}: 202 {}",
                    a.text
                );
            }
            StatusCode::CONFLICT => {
                let e = a.error(StatusCode::CONFLICT, "CONFLICT");
                assert_eq!(e["status"], rec.status.as_str(), "{id}: {}", a.text);
                assert_ne!(rec.status, taskexec_model::TaskStatus::Cancelled, "{id}");
            }
            other => panic!("{id}: {other} {}", a.text),
        }
        let result = rec.result.expect("a result");
        assert_eq!(result.status, rec.status, "{id}");
    }
}

/// An input schema whose evaluation is exponential: refused at submission
/// when its `$ref`s expand past the limit, cut by the validation budget
/// when it is within the limits but slow on the value; `/healthz` answers
/// meanwhile (validation never runs on the runtime's threads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expensive_schemas_are_refused_and_healthz_stays_fast() {
    let app = app().await;
    let mut defs = serde_json::Map::new();
    for i in 0..30 {
        let next = format!("#/$defs/d{}", i + 1);
        defs.insert(
            format!("d{i}"),
            json!({"anyOf": [{"$ref": next}, {"$ref": next, "type": "array"}]}),
        );
    }
    defs.insert("d30".to_string(), json!({"type": "integer"}));
    let attack = json!({"$defs": defs, "$ref": "#/$defs/d0"});
    let body = task(json!({"input": 1}));
    let mut body = body;
    body["definition"]["inputSchema"] = attack;
    let a = send(&app, post_json("/v1/tasks", &body)).await;
    let e = a.error(StatusCode::UNPROCESSABLE_ENTITY, "INPUT_VALIDATION");
    assert_eq!(e["field"], "definition.inputSchema", "{}", a.text);
    assert!(a.text.contains("10000 subschemas"), "{}", a.text);

    // Within every static limit, exponential in the value's depth.
    let slow = json!({"anyOf": [
        {"items": {"$ref": "#"}},
        {"items": {"$ref": "#"}, "minItems": 0}
    ], "not": {"type": "string"}});
    let mut input = json!("x");
    for _ in 0..40 {
        input = json!([input]);
    }
    let mut body = task(json!({"input": input}));
    body["definition"]["inputSchema"] = slow;
    let submissions: Vec<_> = (0..4)
        .map(|_| {
            let (app, body) = (app.clone(), body.clone());
            tokio::spawn(async move { send(&app, post_json("/v1/tasks", &body)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    let h = send(&app, get("/healthz")).await;
    assert_eq!(h.status, StatusCode::OK);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "/healthz took {:?} under expensive validations",
        t.elapsed()
    );
    for s in submissions {
        let a = s.await.expect("joined");
        let e = a.error(StatusCode::UNPROCESSABLE_ENTITY, "INPUT_VALIDATION");
        assert!(a.text.contains("too expensive"), "{}", a.text);
        assert_eq!(e["field"], "definition.inputSchema", "{}", a.text);
    }
}
