//! Black-box tests of `taskexec serve`: a real server process on a free
//! loopback port with its own SQLite database, driven over HTTP (and by the
//! CLI client). Every server is killed when its test ends.

mod util;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use util::server::{
    Auth, Server, Setup, at, bash, cli, history_tos, marked_sleeper, python, sleeper,
    wait_no_process, wait_process,
};
use util::unique;

/// The history of a task that ran once and completed.
const LIFECYCLE_OK: [&str; 4] = ["RECEIVED", "PREPARING", "RUNNING", "COMPLETED"];

fn cancel(s: &Server, id: &str) -> util::server::Resp {
    s.post(&format!("/v1/tasks/{id}/cancel"), &Value::Null)
}

/// (method, path, operation) of every operation of an OpenAPI document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            ops.push((method.to_uppercase(), path.clone(), op.clone()));
        }
    }
    ops
}

/// A body fit for the operation, if it takes one.
fn body_for(method: &str, path: &str) -> Option<Vec<u8>> {
    let v = match (method, path) {
        ("POST", "/v1/tasks") => bash("echo from-openapi"),
        ("POST", "/v1/tasks/batch") => json!({"tasks": [bash("echo from-batch")]}),
        ("POST", _) => Value::Null,
        _ => return None,
    };
    Some(serde_json::to_vec(&v).expect("serialize"))
}

#[test]
fn submit_wait_get_logs_cancel_and_list() {
    let s = Setup::new().start();

    // Plain submission: 202, an id, a Location.
    let r = s.post("/v1/tasks", &bash("echo hi"));
    r.expect(202);
    let first = r.id();
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/tasks/{first}").as_str())
    );
    assert!(
        LIFECYCLE_OK.contains(&r.json["status"].as_str().unwrap_or("")),
        "{}",
        r.text
    );

    // Long poll: the whole final record.
    let code = "import json, os\nprint('hello from python')\n\
                with open(os.environ['TASK_OUTPUT'], 'w') as f:\n    json.dump({'sum': 1 + 2}, f)\n";
    let r = s.post("/v1/tasks?wait=30s", &python(code));
    r.expect(200);
    let rec = &r.json;
    let waited = rec["task"]["id"].as_str().expect("task.id").to_owned();
    assert_eq!(rec["status"], "COMPLETED", "{}", r.text);
    assert_eq!(rec["result"]["status"], "COMPLETED");
    assert_eq!(rec["result"]["output"], json!({"sum": 3}));
    assert_eq!(rec["result"]["stdout"], "hello from python\n");
    assert_eq!(history_tos(rec), LIFECYCLE_OK);
    assert_eq!(rec["attempts"].as_array().map(Vec::len), Some(1));

    // GET returns the same record.
    let got = s.task(&waited);
    assert_eq!(got["status"], "COMPLETED");
    assert_eq!(got["result"]["output"], json!({"sum": 3}));
    assert_eq!(got["history"], rec["history"]);

    // Logs: the task's stdout.
    let logs = s.get(&format!("/v1/tasks/{waited}/logs"));
    logs.expect(200);
    assert_eq!(logs.json["id"], waited.as_str());
    assert_eq!(logs.json["status"], "COMPLETED");
    assert_eq!(logs.json["stdout"], "hello from python\n");
    assert_eq!(logs.json["stderr"], "");
    assert_eq!(logs.json["stdoutTruncated"], false);

    s.get("/v1/tasks/no-such-task")
        .expect_error(404, "NOT_FOUND", None);
    s.get("/v1/tasks/no-such-task/logs")
        .expect_error(404, "NOT_FOUND", None);

    // Cancel a running sleeper.
    let sleeping = s.submit(&sleeper(30));
    s.wait_status(&sleeping, "RUNNING");
    let r = cancel(&s, &sleeping);
    r.expect(202);
    assert_eq!(r.json["id"], sleeping.as_str());
    let rec = s.wait_final(&sleeping);
    assert_eq!(rec["status"], "CANCELLED", "{rec:#}");
    assert_eq!(rec["result"]["error"]["type"], "CANCELLED");
    let tos = history_tos(&rec);
    assert_eq!(tos[tos.len() - 2..], ["RUNNING", "CANCELLED"], "{tos:?}");

    // Cancelling a final task: 409 with its status.
    let r = cancel(&s, &sleeping);
    r.expect_error(409, "CONFLICT", None);
    assert_eq!(r.json["error"]["status"], "CANCELLED");
    let r = cancel(&s, &waited);
    r.expect_error(409, "CONFLICT", None);
    assert_eq!(r.json["error"]["status"], "COMPLETED");
    cancel(&s, "no-such-task").expect_error(404, "NOT_FOUND", None);

    // Five more; list the COMPLETED ones two at a time.
    let mut completed = vec![first, waited];
    for i in 0..5 {
        completed.push(s.submit(&bash(&format!("echo task {i}"))));
    }
    for id in &completed {
        assert_eq!(s.wait_final(id)["status"], "COMPLETED", "{id}");
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/tasks?status=COMPLETED&limit=2".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = s.get(&path);
        r.expect(200);
        pages += 1;
        let items = r.json["items"].as_array().expect("items");
        assert!(items.len() <= 2, "{}", r.text);
        for item in items {
            assert_eq!(item["status"], "COMPLETED", "{item}");
            seen.push(item["id"].as_str().expect("id").to_owned());
        }
        match r.json["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 20, "the pagination does not end");
    }
    // Every completed task once, newest first; the cancelled one not.
    completed.reverse();
    assert_eq!(seen, completed);
    assert_eq!(pages, 4);
    let cancelled = s.get("/v1/tasks?status=CANCELLED");
    cancelled.expect(200);
    let ids: Vec<&str> = cancelled.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, [sleeping.as_str()]);
    assert_eq!(s.list_all("").len(), 8);

    s.get("/v1/tasks?cursor=bogus")
        .expect_error(400, "BAD_REQUEST", Some("cursor"));
    s.get("/v1/tasks?status=DONE")
        .expect_error(400, "BAD_REQUEST", Some("status"));
}

#[test]
fn events_stream_live_transitions_until_the_final_one() {
    let s = Setup::new().flag("--workers", "1").start();
    // The only worker is busy: the target stays queued until the blocker is
    // cancelled, so its stream must follow it live.
    let blocker = s.submit(&sleeper(30));
    s.wait_status(&blocker, "RUNNING");
    let target = s.submit(&bash("echo streamed"));
    assert_eq!(s.task(&target)["status"], "RECEIVED");

    let mut released = false;
    let events = s.events(&target, |_, _| {
        if !released {
            released = true;
            cancel(&s, &blocker).expect(202);
        }
    });
    assert!(released, "no event at all");
    let tos: Vec<&str> = events
        .iter()
        .map(|(name, data)| {
            assert_eq!(name, "transition", "{data}");
            assert_eq!(data["taskId"], target.as_str(), "{data}");
            data["to"].as_str().expect("to")
        })
        .collect();
    assert_eq!(tos, LIFECYCLE_OK, "{events:?}");
    // Each event follows the previous one.
    for pair in events.windows(2) {
        assert_eq!(pair[1].1["from"], pair[0].1["to"], "{events:?}");
    }
    assert_eq!(s.task(&target)["status"], "COMPLETED");
    assert_eq!(s.wait_final(&blocker)["status"], "CANCELLED");

    // A final task's stream replays its history and ends.
    let again = s.events(&target, |_, _| {});
    let tos: Vec<&str> = again.iter().filter_map(|(_, d)| d["to"].as_str()).collect();
    assert_eq!(tos, LIFECYCLE_OK);

    s.get("/v1/tasks/no-such-task/events")
        .expect_error(404, "NOT_FOUND", None);
}

#[test]
fn idempotent_submissions_run_once() {
    let s = Setup::new().start();
    let running_count = |rec: &Value| history_tos(rec).iter().filter(|t| *t == "RUNNING").count();

    // The Idempotency-Key header.
    let task = bash("echo once");
    let r1 = s.post_with("/v1/tasks", &task, &[("Idempotency-Key", "key-1")]);
    r1.expect(202);
    let r2 = s.post_with("/v1/tasks", &task, &[("Idempotency-Key", "key-1")]);
    r2.expect(200);
    let id1 = r1.id();
    assert_eq!(r2.id(), id1);
    let rec = s.wait_final(&id1);
    assert_eq!(rec["status"], "COMPLETED");
    assert_eq!(rec["task"]["idempotencyKey"], "key-1");
    assert_eq!(running_count(&rec), 1, "{rec:#}");
    assert_eq!(rec["attempts"].as_array().map(Vec::len), Some(1));
    // A repeat after the end, with wait: the earlier, final record.
    let r3 = s.post_with("/v1/tasks?wait=5s", &task, &[("Idempotency-Key", "key-1")]);
    r3.expect(200);
    assert_eq!(r3.json["task"]["id"], id1.as_str());
    assert_eq!(r3.json["status"], "COMPLETED");

    // The idempotencyKey field (and the header agreeing with it).
    let mut task = bash("echo field");
    task["idempotencyKey"] = json!("key-2");
    let id2 = s.submit(&task);
    assert_ne!(id2, id1);
    let r = s.post("/v1/tasks", &task);
    r.expect(200);
    assert_eq!(r.id(), id2);
    let r = s.post_with("/v1/tasks", &task, &[("Idempotency-Key", "key-2")]);
    r.expect(200);
    assert_eq!(r.id(), id2);
    s.post_with("/v1/tasks", &task, &[("Idempotency-Key", "other")])
        .expect_error(400, "BAD_REQUEST", Some("idempotencyKey"));

    // Eight clients at once with one key: one task.
    let task = bash("echo raced");
    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let r = s.post_with("/v1/tasks", &task, &[("Idempotency-Key", "key-3")]);
                    (r.status, r.id())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let ids: HashSet<&str> = answers.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(st, _)| *st == 202).count(),
        1,
        "{answers:?}"
    );
    assert!(answers.iter().all(|(st, _)| matches!(st, 200 | 202)));
    let id3 = answers[0].1.clone();

    let all = s.list_all("");
    assert_eq!(all.len(), 3, "{all:?}");
    for id in [&id1, &id2, &id3] {
        let rec = s.wait_final(id);
        assert_eq!(rec["status"], "COMPLETED");
        assert_eq!(running_count(&rec), 1, "{rec:#}");
    }
}

#[test]
fn batches_are_all_or_nothing() {
    let s = Setup::new().start();
    let cobol = json!({"definition": {"code": "x"}, "executionConfig": {"runtime": "cobol"}});
    s.post(
        "/v1/tasks/batch",
        &json!({"tasks": [bash("echo a"), cobol, bash("echo c")]}),
    )
    .expect_error(
        422,
        "INPUT_VALIDATION",
        Some("tasks[1].executionConfig.runtime"),
    );
    s.post(
        "/v1/tasks/batch",
        &json!({"tasks": [bash("echo a"), bash("echo b"), {"definition": {"code": "x", "bogus": 1}}]}),
    )
    .expect_error(400, "BAD_REQUEST", Some("tasks[2].definition.bogus"));
    let traversal = json!({"definition": {"files": [{"name": "../x", "content": "echo"}], "entrypoint": "../x"},
        "executionConfig": {"runtime": "bash"}});
    s.post(
        "/v1/tasks/batch",
        &json!({"tasks": [bash("echo a"), traversal]}),
    )
    .expect_error(
        422,
        "INPUT_VALIDATION",
        Some("tasks[1].definition.files[0].name"),
    );
    s.post("/v1/tasks/batch", &json!({"tasks": []}))
        .expect_error(400, "BAD_REQUEST", Some("tasks"));
    s.post_with(
        "/v1/tasks/batch",
        &json!({"tasks": [bash("echo a")]}),
        &[("Idempotency-Key", "k")],
    )
    .expect_error(400, "BAD_REQUEST", Some("idempotencyKey"));
    // Two tasks with one id: refused as a whole.
    let mut a = bash("echo a");
    a["id"] = json!("same-id");
    s.post("/v1/tasks/batch", &json!({"tasks": [a.clone(), a]}))
        .expect_error(409, "CONFLICT", None);
    assert!(s.list_all("").is_empty(), "a refused batch stored tasks");

    let r = s.post(
        "/v1/tasks/batch",
        &json!({"tasks": [bash("echo one"), python("print('two')"), bash("echo three")]}),
    );
    r.expect(202);
    let items = r.json["tasks"].as_array().expect("tasks");
    assert_eq!(items.len(), 3, "{}", r.text);
    let ids: Vec<String> = items
        .iter()
        .map(|i| {
            assert_eq!(i["existing"], false);
            i["id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3);
    for (id, out) in ids.iter().zip(["one\n", "two\n", "three\n"]) {
        let rec = s.wait_final(id);
        assert_eq!(rec["status"], "COMPLETED", "{rec:#}");
        assert_eq!(rec["result"]["stdout"], out);
    }
    assert_eq!(s.list_all("").len(), 3);

    // Idempotency keys in batches: within one batch, and across batches.
    let mut keyed = bash("echo keyed");
    keyed["idempotencyKey"] = json!("batch-key");
    let r = s.post(
        "/v1/tasks/batch",
        &json!({"tasks": [keyed.clone(), keyed.clone()]}),
    );
    r.expect(202);
    let items = r.json["tasks"].as_array().expect("tasks");
    assert_eq!(items.len(), 2, "{}", r.text);
    assert_eq!(items[0]["existing"], false);
    assert_eq!(items[1]["existing"], true);
    assert_eq!(items[1]["id"], items[0]["id"]);
    let keyed_id = items[0]["id"].as_str().expect("id").to_owned();
    let r = s.post("/v1/tasks/batch", &json!({"tasks": [keyed]}));
    r.expect(202);
    assert_eq!(r.json["tasks"][0]["existing"], true);
    assert_eq!(r.json["tasks"][0]["id"], keyed_id.as_str());
    assert_eq!(s.wait_final(&keyed_id)["status"], "COMPLETED");
    assert_eq!(s.list_all("").len(), 4);
}

#[test]
fn every_endpoint_but_health_needs_the_token() {
    let token = "s3cret-token";
    let s = Setup::new().token(token).start();
    let done = s.submit(&bash("echo auth"));
    s.wait_final(&done);
    let running = s.submit(&sleeper(30));
    s.wait_status(&running, "RUNNING");

    s.call("GET", "/openapi.json", None, Auth::Without)
        .expect("request")
        .expect_error(401, "UNAUTHORIZED", None);
    let doc = s.get("/openapi.json");
    doc.expect(200);
    let ops = operations(&doc.json);
    assert!(ops.len() >= 12, "{ops:?}");
    let mut open = BTreeSet::new();
    for (method, path, op) in &ops {
        let is_open = path == "/healthz" || path == "/readyz";
        // The document says which operations need no token.
        assert_eq!(
            op["security"] == json!([{}]),
            is_open,
            "{method} {path}: {}",
            op["security"]
        );
        let id = if path.ends_with("/cancel") {
            &running
        } else {
            &done
        };
        let concrete = path.replace("{id}", id);
        let body = body_for(method, path);
        for auth in [
            Auth::Without,
            Auth::With("wrong-token"),
            Auth::With(""),
            Auth::With("s3cret-token-and-more"),
        ] {
            let r = s
                .call(method, &concrete, body.as_deref(), auth)
                .expect("request");
            if is_open {
                r.expect(200);
                open.insert(path.clone());
            } else {
                r.expect_error(401, "UNAUTHORIZED", None);
                assert_eq!(
                    r.header("www-authenticate"),
                    Some("Bearer"),
                    "{method} {path}"
                );
            }
        }
        let r = s
            .call(method, &concrete, body.as_deref(), Auth::Default)
            .expect("request");
        assert!(
            (200..300).contains(&r.status),
            "{method} {concrete} with the token: {} {}",
            r.status,
            r.text
        );
    }
    assert_eq!(open, BTreeSet::from(["/healthz".into(), "/readyz".into()]));
    // The running task was cancelled through the authorized call.
    assert_eq!(s.wait_final(&running)["status"], "CANCELLED");
    // Other schemes are refused.
    let r = s
        .call_with(
            "GET",
            "/v1/tasks",
            None,
            Auth::Without,
            &[("Authorization", &format!("Basic {token}"))],
        )
        .expect("request");
    r.expect_error(401, "UNAUTHORIZED", None);
}

#[test]
fn a_full_queue_answers_429_and_the_server_keeps_serving() {
    let s = Setup::new()
        .flag("--workers", "1")
        .flag("--max-queued", "2")
        .start();
    let running = s.submit(&sleeper(30));
    s.wait_status(&running, "RUNNING");
    let queued: Vec<String> = (0..2).map(|_| s.submit(&sleeper(30))).collect();

    let r = s.post("/v1/tasks", &sleeper(30));
    r.expect_error(429, "QUEUE_FULL", None);
    let retry: u64 = r
        .header("retry-after")
        .expect("a Retry-After header")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry >= 1);
    let r = s.post("/v1/tasks/batch", &json!({"tasks": [bash("echo b")]}));
    r.expect_error(429, "QUEUE_FULL", None);
    assert!(r.header("retry-after").is_some());

    s.get("/healthz").expect(200);
    s.get("/readyz").expect(200);
    assert_eq!(s.list_all("").len(), 3, "a refused task was stored");
    for id in &queued {
        assert_eq!(s.task(id)["status"], "RECEIVED");
    }

    // Room again once a queued task is cancelled.
    let r = cancel(&s, &queued[1]);
    r.expect(202);
    assert_eq!(r.json["status"], "CANCELLED");
    let last = s.submit(&bash("echo finally"));
    cancel(&s, &running).expect(202);
    cancel(&s, &queued[0]).expect(202);
    let rec = s.wait_final(&last);
    assert_eq!(rec["status"], "COMPLETED", "{rec:#}");
    assert_eq!(rec["result"]["stdout"], "finally\n");
}

#[test]
fn bad_input_is_refused_with_the_field_and_stores_nothing() {
    let s = Setup::new().start();
    let rr = |extra: Value| {
        json!({"definition": {"code": "echo"},
            "executionConfig": {"runtime": "bash", "resourceRequirements": extra}})
    };
    let files = |names: &[&str]| {
        let files: Vec<Value> = names
            .iter()
            .map(|n| json!({"name": n, "content": "echo"}))
            .collect();
        json!({"definition": {"files": files, "entrypoint": "main.sh"},
            "executionConfig": {"runtime": "bash"}})
    };
    let cases: Vec<(Vec<u8>, u16, &str, Option<&str>)> = vec![
        (b"{\"definition\":".to_vec(), 400, "BAD_REQUEST", None),
        (b"not json".to_vec(), 400, "BAD_REQUEST", None),
        (b"".to_vec(), 400, "BAD_REQUEST", None),
        (
            br#"{"definition":{"code":"echo"}} trailing"#.to_vec(),
            400,
            "BAD_REQUEST",
            None,
        ),
        (
            br#"{"definition":{"code":"echo"},"bogus":1}"#.to_vec(),
            400,
            "BAD_REQUEST",
            Some("bogus"),
        ),
        (
            br#"{"definition":{"code":"echo","bogus":1}}"#.to_vec(),
            400,
            "BAD_REQUEST",
            Some("definition.bogus"),
        ),
        (
            serde_json::to_vec(&rr(json!({"timeoutSecs": 5}))).expect("json"),
            400,
            "BAD_REQUEST",
            Some("executionConfig.resourceRequirements.timeoutSecs"),
        ),
        (
            br#"{"executionConfig":{"runtime":"bash"}}"#.to_vec(),
            400,
            "BAD_REQUEST",
            Some("definition"),
        ),
        (
            br#"{"definition":{"code":42}}"#.to_vec(),
            400,
            "BAD_REQUEST",
            Some("definition.code"),
        ),
        (
            br#"{"definition":{"code":"echo"},"priority":1e10}"#.to_vec(),
            400,
            "BAD_REQUEST",
            Some("priority"),
        ),
        (
            br#"{"definition":{"code":"echo"},"executionConfig":{"runtime":"cobol"}}"#.to_vec(),
            422,
            "INPUT_VALIDATION",
            Some("executionConfig.runtime"),
        ),
        (
            serde_json::to_vec(&rr(json!({"timeoutSeconds": 1e9}))).expect("json"),
            422,
            "INPUT_VALIDATION",
            Some("executionConfig.resourceRequirements.timeoutSeconds"),
        ),
        (
            serde_json::to_vec(&rr(json!({"timeoutSeconds": -1}))).expect("json"),
            422,
            "INPUT_VALIDATION",
            Some("executionConfig.resourceRequirements.timeoutSeconds"),
        ),
        (
            serde_json::to_vec(&rr(json!({"memory": "1000Ti"}))).expect("json"),
            422,
            "INPUT_VALIDATION",
            Some("executionConfig.resourceRequirements.memory"),
        ),
        (
            serde_json::to_vec(&rr(json!({"cpu": "1000"}))).expect("json"),
            422,
            "INPUT_VALIDATION",
            Some("executionConfig.resourceRequirements.cpu"),
        ),
        (
            serde_json::to_vec(&rr(json!({"pids": -1}))).expect("json"),
            422,
            "INPUT_VALIDATION",
            Some("executionConfig.resourceRequirements.pids"),
        ),
        (
            br#"{"definition":{"code":"echo"},"priority":5000,"executionConfig":{"runtime":"bash"}}"#
                .to_vec(),
            422,
            "INPUT_VALIDATION",
            Some("priority"),
        ),
        (
            br#"{"definition":{"code":"echo","preload":["json"]},"executionConfig":{"runtime":"bash"}}"#
                .to_vec(),
            422,
            "INPUT_VALIDATION",
            Some("definition.preload"),
        ),
        (
            br#"{"definition":{"code":"def main(x): return x","mode":"handler","preload":["json","../x"]},"executionConfig":{"runtime":"python"}}"#
                .to_vec(),
            422,
            "INPUT_VALIDATION",
            Some("definition.preload[1]"),
        ),
        (
            br#"{"id":"../etc","definition":{"code":"echo"},"executionConfig":{"runtime":"bash"}}"#
                .to_vec(),
            422,
            "INPUT_VALIDATION",
            Some("id"),
        ),
        (
            serde_json::to_vec(&files(&["../x"])).expect("json"),
            422,
            "INPUT_VALIDATION",
            Some("definition.files[0].name"),
        ),
        (
            serde_json::to_vec(&files(&["/etc/x"])).expect("json"),
            422,
            "INPUT_VALIDATION",
            Some("definition.files[0].name"),
        ),
        (
            serde_json::to_vec(&files(&["main.sh", "a\0b"])).expect("json"),
            422,
            "INPUT_VALIDATION",
            Some("definition.files[1].name"),
        ),
        (
            serde_json::to_vec(&files(&["main.sh", "src/../../x"])).expect("json"),
            422,
            "INPUT_VALIDATION",
            Some("definition.files[1].name"),
        ),
    ];
    for (body, status, kind, field) in &cases {
        let r = s.post_raw("/v1/tasks", body);
        let shown = String::from_utf8_lossy(body);
        assert_eq!(r.status, *status, "{shown}: {}", r.text);
        r.expect_error(*status, kind, *field);
    }

    let good = serde_json::to_vec(&bash("echo ok")).expect("json");
    let r = s
        .call_with(
            "POST",
            "/v1/tasks",
            Some(&good),
            Auth::Default,
            &[("Content-Type", "text/plain")],
        )
        .expect("request");
    r.expect_error(415, "BAD_REQUEST", None);
    s.post("/v1/tasks?wait=forever", &bash("echo"))
        .expect_error(400, "BAD_REQUEST", Some("wait"));
    s.post("/v1/tasks?wait=10m", &bash("echo"))
        .expect_error(400, "BAD_REQUEST", Some("wait"));
    s.post("/v1/tasks?bogus=1", &bash("echo"))
        .expect_error(400, "BAD_REQUEST", Some("bogus"));
    s.get("/v1/tasks?limit=0")
        .expect_error(400, "BAD_REQUEST", Some("limit"));
    s.get("/v1/tasks/bad%20id")
        .expect_error(400, "BAD_REQUEST", Some("id"));

    // 50 MB: 413, whatever the client does with the rest of the body.
    let big = serde_json::to_vec(&bash(&format!("#{}", "x".repeat(50 << 20)))).expect("json");
    for path in ["/v1/tasks", "/v1/tasks/batch"] {
        let (status, body) = s.raw_post(path, &big);
        assert_eq!(status, 413, "{path}: {body}");
        assert_eq!(body["error"]["type"], "PAYLOAD_TOO_LARGE", "{body}");
    }

    // Still serving, and nothing was stored.
    s.get("/healthz").expect(200);
    s.get("/readyz").expect(200);
    assert!(s.list_all("").is_empty(), "a refused task was stored");
    let r = s.post("/v1/tasks?wait=30s", &bash("echo ok"));
    r.expect(200);
    assert_eq!(r.json["status"], "COMPLETED");
    assert_eq!(s.list_all("").len(), 1);
}

/// Asserts that the attempts of a final record ran one after the other:
/// numbered 1..=n, at most one RUNNING per attempt in increasing order, the
/// last attempt ran, and every RUNNING (and start) of attempt k+1 is at or
/// after the end of attempt k.
fn assert_sequential_attempts(rec: &Value) {
    let attempts = rec["attempts"].as_array().expect("attempts");
    assert!(!attempts.is_empty(), "{rec:#}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt"], i + 1, "{rec:#}");
    }
    let history = rec["history"].as_array().expect("history");
    for pair in history.windows(2) {
        assert!(at(&pair[1]["at"]) >= at(&pair[0]["at"]), "{rec:#}");
    }
    let running: Vec<(u64, OffsetDateTime)> = history
        .iter()
        .filter(|h| h["to"] == "RUNNING")
        .map(|h| (h["attempt"].as_u64().expect("attempt"), at(&h["at"])))
        .collect();
    for pair in running.windows(2) {
        assert!(pair[1].0 > pair[0].0, "two RUNNING of one attempt: {rec:#}");
    }
    assert_eq!(
        running.last().map(|r| r.0),
        Some(attempts.len() as u64),
        "{rec:#}"
    );
    for pair in attempts.windows(2) {
        let end = at(&pair[0]["endTime"]);
        let next = pair[1]["attempt"].as_u64().expect("attempt");
        assert!(at(&pair[1]["startTime"]) >= end, "{rec:#}");
        for (n, t) in &running {
            if *n == next {
                assert!(
                    *t >= end,
                    "attempt {next} ran before {} ended: {rec:#}",
                    next - 1
                );
            }
        }
    }
}

#[test]
fn a_killed_server_recovers_its_tasks_on_restart() {
    let setup = Setup::new().node(&unique("crash-node"));
    let marker = unique("te-crash");
    let mut s = setup.start();
    let ids: Vec<String> = (0..3)
        .map(|_| s.submit(&marked_sleeper(&marker, 3)))
        .collect();
    // Kill as soon as a sleeper is in its sandbox.
    wait_process(&marker, Duration::from_secs(30));
    let first_running = s.wait_for(&ids[0], "running", |r| r["status"] == "RUNNING");
    assert_eq!(first_running["attempt"], 1);
    let before: Vec<String> = ids
        .iter()
        .map(|id| s.task(id)["status"].as_str().unwrap_or("").to_owned())
        .collect();
    s.kill_hard();
    // The sandboxes died with their executor: no attempt outlives it.
    wait_no_process(&marker, Duration::from_secs(10));
    drop(s);

    let s = setup.start();
    let mut interrupted = 0;
    for (id, status_before) in ids.iter().zip(&before) {
        let rec = s.wait_final(id);
        assert_eq!(rec["status"], "COMPLETED", "{rec:#}\n{}", s.log());
        let tos = history_tos(&rec);
        assert_eq!(
            tos.iter().filter(|t| *t == "COMPLETED").count(),
            1,
            "{tos:?}"
        );
        assert_eq!(tos.last().map(String::as_str), Some("COMPLETED"));
        let attempts = rec["attempts"].as_array().expect("attempts");
        let (last, earlier) = attempts.split_last().expect("an attempt");
        assert_eq!(last["status"], "COMPLETED", "{rec:#}");
        assert!(last["error"].is_null(), "{rec:#}");
        assert!(earlier.len() <= 1, "one crash, several retries: {rec:#}");
        for a in earlier {
            assert_eq!(a["status"], "FAILED", "{rec:#}");
            assert_eq!(a["error"]["type"], "INTERNAL", "{rec:#}");
            assert_eq!(a["error"]["message"], "executor restarted", "{rec:#}");
            interrupted += 1;
        }
        if status_before == "RUNNING" {
            assert_eq!(
                earlier.len(),
                1,
                "a running task was not interrupted: {rec:#}"
            );
        }
        // The stored output is the last attempt's.
        assert_eq!(
            rec["result"]["stdout"],
            format!("attempt={}\n", attempts.len()),
            "{rec:#}"
        );
        assert_sequential_attempts(&rec);
    }
    assert!(interrupted >= 1, "no attempt was interrupted");
    assert_eq!(s.list_all("").len(), 3, "a task was lost or duplicated");
}

#[test]
fn a_cancel_made_while_the_node_was_down_is_honoured_at_recovery() {
    let node = unique("node-a");
    let setup = Setup::new().node(&node);
    let marker = unique("te-cancel-down");
    let mut a = setup.start();
    let id = a.submit(&marked_sleeper(&marker, 3));
    a.wait_status(&id, "RUNNING");
    wait_process(&marker, Duration::from_secs(30));
    a.kill_hard();
    wait_no_process(&marker, Duration::from_secs(10));
    drop(a);

    // Another node on the same database takes the cancel request.
    let b = setup.clone().node(&unique("node-b")).start();
    let r = cancel(&b, &id);
    r.expect(202);
    drop(b);

    let a = setup.start();
    let rec = a.wait_final(&id);
    assert_eq!(rec["status"], "CANCELLED", "{rec:#}");
    assert_eq!(rec["result"]["error"]["type"], "CANCELLED", "{rec:#}");
    let tos = history_tos(&rec);
    assert_eq!(
        tos.iter().filter(|t| *t == "RUNNING").count(),
        1,
        "a cancelled task ran again: {tos:?}"
    );
    assert_eq!(rec["attempts"].as_array().map(Vec::len), Some(1), "{rec:#}");
}

#[test]
fn sigterm_cancels_running_tasks_after_the_grace_period() {
    let setup = Setup::new()
        .node(&unique("grace-node"))
        .flag("--shutdown-grace", "1s");
    let marker = unique("te-grace");
    let mut s = setup.start();
    let id = s.submit(&marked_sleeper(&marker, 30));
    s.wait_status(&id, "RUNNING");
    wait_process(&marker, Duration::from_secs(30));
    let status = s.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}; log:\n{}", s.log());
    assert!(!s.running());
    assert!(s.log().contains("shutting down"), "{}", s.log());
    wait_no_process(&marker, Duration::from_secs(10));
    let left = util::task_cgroups(s.pid);
    assert!(
        left.is_empty(),
        "task cgroups left by a clean exit: {left:?}"
    );
    let stopped = OffsetDateTime::now_utc();
    drop(s);

    let s = setup.start();
    let rec = s.task(&id);
    assert_eq!(rec["status"], "CANCELLED", "{rec:#}");
    assert_eq!(rec["result"]["error"]["type"], "CANCELLED", "{rec:#}");
    let history = rec["history"].as_array().expect("history");
    let last = history.last().expect("a transition");
    assert_eq!(last["to"], "CANCELLED");
    assert!(
        at(&last["at"]) <= stopped,
        "not recorded at shutdown: {rec:#}"
    );
    let attempts = rec["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{rec:#}");
    assert_eq!(attempts[0]["status"], "CANCELLED", "{rec:#}");
    assert!(
        !s.log().contains("recovering a task"),
        "the restart found the task unfinished: {}",
        s.log()
    );
}

#[test]
fn openapi_documents_every_live_route() {
    let s = Setup::new().start();
    let id = s.submit(&bash("echo doc"));
    s.wait_final(&id);
    let doc = s.get("/openapi.json");
    doc.expect(200);
    assert!(
        doc.header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
    );
    let version = doc.json["openapi"].as_str().expect("openapi");
    assert!(version.starts_with("3."), "{version}");
    assert_eq!(doc.json["info"]["title"], "taskexec");
    let ops = operations(&doc.json);
    assert!(ops.len() >= 12, "{ops:?}");
    let paths: BTreeSet<&str> = ops.iter().map(|(_, p, _)| p.as_str()).collect();
    for p in [
        "/v1/tasks",
        "/v1/tasks/batch",
        "/v1/tasks/{id}",
        "/v1/tasks/{id}/logs",
        "/v1/tasks/{id}/events",
        "/v1/tasks/{id}/cancel",
        "/v1/runtimes",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains(p), "{p} is not documented");
    }
    let unrouted = |r: &util::server::Resp| {
        r.status == 405
            || (r.status == 404
                && r.json["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("no such route")))
    };
    for (method, path, op) in &ops {
        let concrete = path.replace("{id}", &id);
        let r = s
            .call(
                method,
                &concrete,
                body_for(method, path).as_deref(),
                Auth::Default,
            )
            .expect("request");
        assert!(
            !unrouted(&r),
            "{method} {concrete}: {} {}",
            r.status,
            r.text
        );
        assert!(
            r.status < 500,
            "{method} {concrete}: {} {}",
            r.status,
            r.text
        );
        let documented = op["responses"]
            .as_object()
            .expect("responses")
            .contains_key(&r.status.to_string());
        assert!(
            documented,
            "{method} {path} answered {} which is not documented",
            r.status
        );
    }
    // The same check catches an unknown route and a wrong method.
    let r = s.get("/v1/no-such-route");
    r.expect_error(404, "NOT_FOUND", None);
    assert!(unrouted(&r));
    let r = s
        .call("DELETE", "/v1/tasks", None, Auth::Default)
        .expect("request");
    assert!(unrouted(&r), "{} {}", r.status, r.text);
    let runtimes = s.get("/v1/runtimes");
    let names: Vec<&str> = runtimes
        .json
        .as_array()
        .expect("runtimes")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    for n in ["bash", "python"] {
        assert!(names.contains(&n), "{names:?}");
    }
    let metrics = s.get("/metrics");
    metrics.expect(200);
    assert!(
        metrics.text.contains("taskexec_http_requests_total"),
        "{}",
        metrics.text
    );
}

#[test]
fn the_cli_client_submits_waits_lists_and_cancels() {
    let token = "cli-token";
    let setup = Setup::new().token_file(token);
    let s = setup.start();
    let url = s.url.clone();
    let server = ["--server", url.as_str(), "--token", token];
    let hello = util::example("python/hello.py");
    let with = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&server);
        cli(&all)
    };

    let (code, out, err) = with(&["submit", &hello, "--input", r#"{"name":"ada"}"#, "--wait"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let mut lines = out.lines();
    let first = lines.next().unwrap_or_default();
    assert!(
        first.starts_with("task "),
        "--wait names the task first: {out}"
    );
    assert!(
        lines.next().unwrap_or_default().starts_with("COMPLETED"),
        "{out}"
    );
    assert!(
        out.contains(r#"output: {"greeting":"hello, ada"}"#),
        "{out}"
    );

    // Without the token: refused.
    let (code, _, err) = cli(&["list", "--server", &url]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("401"), "{err}");

    let submit_json = ["submit", &hello, "--input", r#"{"name":"bob"}"#, "--json"];
    let mut args = submit_json.to_vec();
    args.extend_from_slice(&["--idempotency-key", "cli-key"]);
    let (code, out, err) = with(&args);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("submit --json prints JSON");
    let id = v["id"].as_str().expect("id").to_owned();
    let (code, out, err) = with(&args);
    assert_eq!(code, 0, "{err}");
    let again: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        again["id"],
        id.as_str(),
        "the idempotency key made a second task"
    );
    s.wait_final(&id);

    let (code, out, err) = with(&["status", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let rec: Value = serde_json::from_str(&out).expect("status --json prints JSON");
    assert_eq!(rec["task"]["id"], id.as_str());
    assert_eq!(rec["status"], "COMPLETED");
    assert_eq!(rec["result"]["output"], json!({"greeting": "hello, bob"}));

    let (code, out, err) = with(&["logs", &id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "greeting bob\n");

    let (code, out, err) = with(&["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.contains(&id), "{out}");
    assert_eq!(out.lines().count(), 3, "a header and two tasks: {out}");

    // Cancel a running sleeper submitted as a whole task file.
    let file = setup.dir().join("sleeper.json");
    std::fs::write(&file, serde_json::to_vec(&sleeper(30)).expect("json")).expect("write");
    let file = file.to_string_lossy().into_owned();
    let (code, out, err) = with(&["submit", "--task", &file]);
    assert_eq!(code, 0, "{err}");
    // The id alone on stdout, for `ID=$(taskexec submit ...)`.
    let sid = out.trim_end().to_owned();
    assert!(!sid.is_empty() && !sid.contains(' '), "{out}");
    s.wait_status(&sid, "RUNNING");
    let (code, out, err) = with(&["cancel", &sid]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&sid), "{out}");
    assert_eq!(s.wait_final(&sid)["status"], "CANCELLED");
    let (code, out, _) = with(&["status", &sid]);
    assert_eq!(code, 1, "a cancelled task's status exits 1: {out}");
    let (code, out, err) = with(&["cancel", &sid]);
    assert_eq!(code, 2, "cancelling a final task fails: {out}");
    assert!(err.contains("409"), "{err}");

    let (code, out, err) = with(&["list", "--status", "CANCELLED", "--json"]);
    assert_eq!(code, 0, "{err}");
    let page: Value = serde_json::from_str(&out).expect("list --json prints JSON");
    let ids: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, [sid.as_str()]);
}

/// The value of an unlabelled metric in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of a metric's series over all its labels, if it has any.
fn metric_sum(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            rest.split_once("} ")?.1.trim().parse::<f64>().ok()
        })
        .reduce(|a, b| a + b)
}

/// Polls /metrics until `done` holds for the page; returns it.
#[track_caller]
fn wait_metrics(s: &Server, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = s.get("/metrics").text;
        if done(&page) {
            return page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not in time; metrics:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_warm_runner_reports_its_state_and_is_gone_after_sigterm() {
    let mut s = Setup::new()
        .flag("--warm-pool-min", "1")
        .flag("--warm-pool-idle", "1m")
        .start();
    // Published at start, before any task.
    let page = wait_metrics(&s, "warm metrics at start", |p| {
        metric(p, "taskexec_warm_pool_ready").is_some()
    });
    for name in [
        "taskexec_warm_pool_target",
        "taskexec_fork_servers",
        "taskexec_fork_server_spares",
    ] {
        assert!(metric(&page, name).is_some(), "{name} missing:\n{page}");
    }

    // A script task: the pool learns its key and keeps one sandbox of it.
    let r = s.post("/v1/tasks?wait=60s", &bash("echo warm"));
    assert_eq!(r.json["status"], "COMPLETED", "{}", r.text);
    // A handler task: a fork server starts and runs it.
    let mut handler = python("def main(input):\n    return {'n': input['n'] + 1}\n");
    handler["definition"]["mode"] = json!("handler");
    handler["input"] = json!({"n": 1});
    let r = s.post("/v1/tasks?wait=60s", &handler);
    assert_eq!(r.json["status"], "COMPLETED", "{}", r.text);
    assert_eq!(r.json["result"]["output"], json!({"n": 2}), "{}", r.text);
    let page = wait_metrics(&s, "a warm sandbox and a fork server", |p| {
        metric(p, "taskexec_warm_pool_ready").is_some_and(|v| v >= 1.0)
            && metric(p, "taskexec_fork_servers") == Some(1.0)
            && metric(p, "taskexec_fork_server_runs_total") == Some(1.0)
    });
    assert!(
        metric(&page, "taskexec_warm_pool_misses_total").is_some_and(|v| v >= 1.0),
        "{page}"
    );
    assert_eq!(
        metric_sum(&page, "taskexec_fork_server_fallbacks_total"),
        Some(0.0),
        "{page}"
    );

    // SIGTERM: the fork server and the pre-built sandboxes go with the server.
    let status = s.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}; log:\n{}", s.log());
    let left = util::task_cgroups(s.pid);
    assert!(left.is_empty(), "cgroups left by a clean exit: {left:?}");
    let launchers = util::processes_with(&format!("__taskexec-launcher\0{}\0", s.pid));
    assert!(launchers.is_empty(), "launchers left: {launchers:?}");
}

/// `definition.preload` over HTTP: a python handler gets its module loaded
/// before its file, by a fork server of its own; a module that does not
/// import fails the task (and is counted as a server start failure); a
/// script task with a preload list is refused naming the field.
#[test]
fn preloaded_modules_reach_the_handler_through_the_api() {
    let s = Setup::new().start();
    let mut handler = python(
        "import sys\nSEEN = 'colorsys' in sys.modules\n\n\ndef main(input):\n    return {'colorsys': SEEN}\n",
    );
    handler["definition"]["mode"] = json!("handler");
    let r = s.post("/v1/tasks?wait=60s", &handler);
    assert_eq!(
        r.json["result"]["output"],
        json!({"colorsys": false}),
        "{}",
        r.text
    );
    handler["definition"]["preload"] = json!(["colorsys"]);
    let r = s.post("/v1/tasks?wait=60s", &handler);
    assert_eq!(r.json["status"], "COMPLETED", "{}", r.text);
    assert_eq!(
        r.json["result"]["output"],
        json!({"colorsys": true}),
        "{}",
        r.text
    );
    let page = wait_metrics(&s, "two fork servers", |p| {
        metric(p, "taskexec_fork_servers") == Some(2.0)
            && metric(p, "taskexec_fork_server_runs_total") == Some(2.0)
    });
    assert_eq!(
        metric(&page, "taskexec_fork_server_start_failures_total").unwrap_or(0.0),
        0.0,
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "taskexec_fork_server_starts_total{outcome=\"started\"}"
        ),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "taskexec_fork_server_starts_total{outcome=\"refused\"}"
        ),
        Some(0.0),
        "{page}"
    );
    assert!(
        metric(&page, "taskexec_fork_server_start_cpu_seconds_total").is_some_and(|v| v > 0.0),
        "the starts' CPU: {page}"
    );

    handler["definition"]["preload"] = json!(["taskexec_no_such_module"]);
    handler["retryPolicy"] = json!({"maxRetries": 0});
    let r = s.post("/v1/tasks?wait=60s", &handler);
    assert_eq!(r.json["status"], "FAILED", "{}", r.text);
    let message = r.json["result"]["error"]["message"].as_str().unwrap_or("");
    assert!(
        message
            .starts_with("PreloadError: definition.preload: cannot import taskexec_no_such_module"),
        "{}",
        r.text
    );
    wait_metrics(&s, "a failed server start", |p| {
        metric(p, "taskexec_fork_server_start_failures_total") == Some(1.0)
    });

    let mut script = python("print('hi')\n");
    script["definition"]["preload"] = json!(["colorsys"]);
    let r = s.post("/v1/tasks", &script);
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.json["error"]["field"], "definition.preload", "{}", r.text);
    let mut bad = handler.clone();
    bad["definition"]["preload"] = json!(["os;rm"]);
    let r = s.post("/v1/tasks", &bad);
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(
        r.json["error"]["field"], "definition.preload[0]",
        "{}",
        r.text
    );
}

/// A client cycling `definition.preload` lists faster than the node may
/// start fork servers: past the burst its tasks run cold and complete, the
/// started count stops and the refused count grows.
#[test]
fn preload_lists_cycled_past_the_start_rate_run_cold_and_are_counted() {
    let s = Setup::new()
        .flag("--fork-server-start-rate", "0.001")
        .start();
    let mut handler = python(
        "import sys\nSEEN = 'colorsys' in sys.modules\n\n\ndef main(input):\n    return {'colorsys': SEEN}\n",
    );
    handler["definition"]["mode"] = json!("handler");
    let modules = [
        "wave",
        "base64",
        "string",
        "textwrap",
        "fractions",
        "shlex",
        "glob",
        "bisect",
        "json",
        "csv",
        "heapq",
        "decimal",
        "statistics",
        "difflib",
        "fnmatch",
        "calendar",
        "uuid",
        "zlib",
    ];
    for m in modules {
        handler["definition"]["preload"] = json!(["colorsys", m]);
        let r = s.post("/v1/tasks?wait=60s", &handler);
        assert_eq!(r.json["status"], "COMPLETED", "{m}: {}", r.text);
        assert_eq!(
            r.json["result"]["output"],
            json!({"colorsys": true}),
            "{m}: {}",
            r.text
        );
    }
    // The default burst is 16 starts; at 0.001/s none comes back meanwhile.
    let page = wait_metrics(&s, "two refused starts", |p| {
        metric(p, "taskexec_fork_server_starts_total{outcome=\"refused\"}") == Some(2.0)
    });
    assert_eq!(
        metric(
            &page,
            "taskexec_fork_server_starts_total{outcome=\"started\"}"
        ),
        Some(16.0),
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "taskexec_fork_server_fallbacks_total{reason=\"start_refused\"}"
        ),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        metric(&page, "taskexec_fork_server_runs_total"),
        Some(16.0),
        "{page}"
    );
}

#[test]
fn warm_false_runs_every_task_cold_and_exports_no_warm_metrics() {
    let s = Setup::new().flag("--warm", "false").start();
    let r = s.post("/v1/tasks?wait=60s", &bash("echo cold"));
    assert_eq!(r.json["status"], "COMPLETED", "{}", r.text);
    let page = s.get("/metrics").text;
    assert!(
        page.contains("taskexec_tasks_finished_total"),
        "metrics:\n{page}"
    );
    assert!(!page.contains("taskexec_warm_pool"), "metrics:\n{page}");
    assert!(!page.contains("taskexec_fork_server"), "metrics:\n{page}");
}

#[test]
fn an_invalid_warm_setting_stops_the_start_and_names_the_setting() {
    let (code, _, err) = cli(&[
        "serve",
        "--database",
        "sqlite::memory:",
        "--warm-pool-min",
        "9",
        "--warm-pool-max",
        "2",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--warm-pool-min 9: more than --warm-pool-max 2"),
        "{err}"
    );
    let (code, _, err) = cli(&[
        "worker",
        "--database",
        "sqlite::memory:",
        "--warm-pool-idle",
        "soon",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--warm-pool-idle \"soon\""), "{err}");
    for command in ["serve", "worker"] {
        let (code, _, err) = cli(&[
            command,
            "--database",
            "sqlite::memory:",
            "--quarantine-after",
            "0",
        ]);
        assert_eq!(code, 2, "{command}: {err}");
        assert!(
            err.contains("--quarantine-after 0: expected at least 1"),
            "{command}: {err}"
        );
    }
}

#[test]
fn a_clean_stop_leaves_the_database_file_complete() {
    let setup = Setup::new();
    let mut s = setup.start();
    let id = s.submit(&bash("echo hi"));
    s.wait_final(&id);
    let status = s.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", s.log());
    // The database file alone, copied elsewhere without its -wal file,
    // holds the task.
    let copy = tempfile::tempdir().expect("temp dir");
    std::fs::copy(setup.dir().join("tasks.db"), copy.path().join("tasks.db"))
        .expect("copy the database file");
    let again = Setup::new().database_url(&format!(
        "sqlite://{}",
        copy.path().join("tasks.db").display()
    ));
    let s = again.start();
    assert_eq!(s.task(&id)["status"], "COMPLETED");
}
