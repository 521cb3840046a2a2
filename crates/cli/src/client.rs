//! The CLI client of a taskexec server: `submit`, `status`, `logs`,
//! `cancel`, `list`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;
use taskexec_model::{TaskResult, TaskStatus};

/// Where the server is.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "TASKEXEC_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Bearer token.
    #[arg(long, env = "TASKEXEC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `taskexec submit`: the task as for `taskexec run`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub task: crate::run::TaskArgs,
    /// Wait for the result, showing the live status.
    #[arg(long)]
    pub wait: bool,
    /// Idempotency key: the same key returns the same task, never a second run.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// Arguments of commands on one task.
#[derive(Debug, Args)]
pub struct IdArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The task id.
    pub id: String,
}

/// Arguments of `taskexec logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The task id.
    pub id: String,
    /// Wait until the task is final, then print its logs.
    #[arg(long)]
    pub follow: bool,
}

/// Arguments of `taskexec list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Only this status.
    #[arg(long)]
    pub status: Option<String>,
    /// Only this runtime.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Page size.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Cursor from a previous page.
    #[arg(long)]
    pub cursor: Option<String>,
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(s: &ServerArgs) -> anyhow::Result<Self> {
        if !(s.server.starts_with("http://") || s.server.starts_with("https://")) {
            bail!(
                "--server {:?}: expected a URL starting with http:// or https://, e.g. http://{}",
                s.server,
                s.server
            );
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(330)))
            .build()
            .new_agent();
        Ok(Self {
            agent,
            base: s.server.trim_end_matches('/').to_string(),
            token: s.token.clone(),
        })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let response = match (method, body) {
            ("GET", _) => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (_, b) => {
                let mut r = self.agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                for (k, v) in headers {
                    r = r.header(*k, v);
                }
                r.send_json(b.cloned().unwrap_or(Value::Null))
            }
        }
        .map_err(|e| match e {
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => anyhow::anyhow!(
                "no taskexec server at {}: start one with `taskexec serve`, or pass --server URL",
                self.base
            ),
            ureq::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                anyhow::anyhow!(
                    "no taskexec server at {}: start one with `taskexec serve`, or pass --server URL",
                    self.base
                )
            }
            e => anyhow::Error::new(e).context(format!("{method} {url}")),
        })?;
        let status = response.status().as_u16();
        let mut response = response;
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    fn expect_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let (status, v) = self.call(method, path, body, headers)?;
        if status >= 400 {
            let e = &v["error"];
            let field = e["field"]
                .as_str()
                .map(|f| format!(" (field {f})"))
                .unwrap_or_default();
            bail!(
                "server answered {status}: {} {}{field}",
                e["type"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or(&v.to_string())
            );
        }
        Ok(v)
    }
}

fn exit_for(status: &str) -> ExitCode {
    match status {
        "COMPLETED" => ExitCode::SUCCESS,
        "REJECTED" => ExitCode::from(2),
        _ => ExitCode::from(1),
    }
}

fn print_record(rec: &Value, json: bool) -> anyhow::Result<ExitCode> {
    let status = rec["status"].as_str().unwrap_or("").to_string();
    if json {
        outln!("{}", serde_json::to_string_pretty(rec)?);
    } else if let Ok(result) = serde_json::from_value::<TaskResult>(rec["result"].clone()) {
        crate::run::print_summary(&result);
    } else {
        outln!(
            "{} {status} (attempt {})",
            rec["task"]["id"].as_str().unwrap_or(""),
            rec["attempt"]
        );
    }
    Ok(exit_for(&status))
}

/// `taskexec submit`.
pub fn submit(g: &crate::setup::GlobalArgs, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let task = crate::run::build_task(&args.task, &crate::setup::catalogue(g)?)?;
    let client = Client::new(&args.server)?;
    let body = serde_json::to_value(&task)?;
    let headers: Vec<(&str, String)> = args
        .idempotency_key
        .iter()
        .map(|k| ("Idempotency-Key", k.clone()))
        .collect();
    let v = client.expect_ok("POST", "/v1/tasks", Some(&body), &headers)?;
    let id = v["id"]
        .as_str()
        .context("the server returned no id")?
        .to_string();
    if !args.wait {
        // The id alone on stdout, so `ID=$(taskexec submit ...)` works; the
        // status goes to stderr.
        if args.server.json {
            outln!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            outln!("{id}");
            eprintln!("{id} {}", v["status"].as_str().unwrap_or(""));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let spinner = std::io::stderr().is_terminal();
    let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let started = Instant::now();
    let mut i = 0;
    loop {
        let rec = client.expect_ok("GET", &format!("/v1/tasks/{id}"), None, &[])?;
        let status: TaskStatus = rec["status"]
            .as_str()
            .unwrap_or("RECEIVED")
            .parse()
            .unwrap_or(TaskStatus::Received);
        if status.is_final() {
            if spinner {
                eprint!("\r\x1b[2K");
            }
            if !args.server.json {
                outln!("task {id}");
            }
            return print_record(&rec, args.server.json);
        }
        if spinner {
            eprint!(
                "\r\x1b[2K{} {id} {status} (attempt {}, {:.1} s)",
                frames[i % frames.len()],
                rec["attempt"],
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `taskexec status`.
pub fn status(args: IdArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.server)?;
    let rec = client.expect_ok("GET", &format!("/v1/tasks/{}", args.id), None, &[])?;
    print_record(&rec, args.server.json)
}

/// `taskexec logs`.
pub fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.server)?;
    let path = format!("/v1/tasks/{}/logs", args.id);
    let mut v = client.expect_ok("GET", &path, None, &[])?;
    while args.follow
        && !v["status"]
            .as_str()
            .and_then(|s| s.parse::<TaskStatus>().ok())
            .is_some_and(|s| s.is_final())
    {
        std::thread::sleep(Duration::from_millis(200));
        v = client.expect_ok("GET", &path, None, &[])?;
    }
    if args.server.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        out!("{}", v["stdout"].as_str().unwrap_or(""));
        eprint!("{}", v["stderr"].as_str().unwrap_or(""));
    }
    Ok(ExitCode::SUCCESS)
}

/// `taskexec cancel`.
pub fn cancel(args: IdArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.server)?;
    let v = client.expect_ok(
        "POST",
        &format!("/v1/tasks/{}/cancel", args.id),
        Some(&Value::Null),
        &[],
    )?;
    if args.server.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        // A task not final yet is cancelled asynchronously: say so rather
        // than print the status it still has.
        let status = v["status"].as_str().unwrap_or("");
        let is_final = status.parse::<TaskStatus>().is_ok_and(|s| s.is_final());
        if is_final {
            outln!("{} {status}", args.id);
        } else {
            outln!("{} cancel requested", args.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `taskexec list`.
pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.server)?;
    let mut q = format!("/v1/tasks?limit={}", args.limit);
    for (k, v) in [
        ("status", &args.status),
        ("runtime", &args.runtime),
        ("cursor", &args.cursor),
    ] {
        if let Some(v) = v {
            q.push_str(&format!("&{k}={v}"));
        }
    }
    let v = client.expect_ok("GET", &q, None, &[])?;
    if args.server.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = crate::table::Table::new(&["ID", "STATUS", "RUNTIME", "ATTEMPT", "SUBMITTED"]);
    for t in v["items"].as_array().cloned().unwrap_or_default() {
        let text = |k: &str| t[k].as_str().unwrap_or("").to_string();
        table.row(vec![
            text("id"),
            text("status"),
            text("runtime"),
            t["attempt"].to_string(),
            text("submittedAt"),
        ]);
    }
    out!("{}", table.render());
    if let Some(c) = v["nextCursor"].as_str() {
        outln!("next page: --cursor {c}");
    }
    Ok(ExitCode::SUCCESS)
}
