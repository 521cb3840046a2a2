//! `taskexec serve`: the API, the store and local workers in one process.
//!
//! Configuration comes from flags, then `TASKEXEC_*` environment variables,
//! then an optional TOML file (`--config`), then defaults, in that order of
//! precedence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;
use taskexec_engine::limiter::ConcurrencyConfig;
use taskexec_engine::service::{Service, ServiceConfig};
use taskexec_sandbox::{StartLimit, WarmConfig};
use taskexec_store::{Capacity, PgStore, SqliteStore, TaskStore};
use tracing::info;

/// Arguments of `taskexec serve` (every one also settable in the TOML file
/// under the same name with dashes turned to underscores).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on: HOST:PORT, the host an IP address or a name
    /// (e.g. 127.0.0.1:8080, localhost:8080, [::1]:8080).
    #[arg(long, env = "TASKEXEC_LISTEN")]
    pub listen: Option<String>,
    /// Database URL: sqlite://PATH (embedded, the default: sqlite://taskexec.db).
    #[arg(long, env = "TASKEXEC_DATABASE")]
    pub database: Option<String>,
    /// Tasks run at once: a number, or "auto" (two per core).
    #[arg(long, env = "TASKEXEC_WORKERS")]
    pub workers: Option<String>,
    /// Require this bearer token on every endpoint but /healthz and /readyz.
    #[arg(long, env = "TASKEXEC_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Read the bearer token from this file.
    #[arg(long, env = "TASKEXEC_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Most tasks waiting in the queue; past it, submissions get 429.
    #[arg(long, env = "TASKEXEC_MAX_QUEUED")]
    pub max_queued: Option<u64>,
    /// CPU this node admits tasks against, e.g. 2 or 1500m (default: all cores).
    #[arg(long, env = "TASKEXEC_CPU_CAPACITY")]
    pub cpu_capacity: Option<String>,
    /// Memory this node admits tasks against, e.g. 8Gi (default: 90% of RAM).
    #[arg(long, env = "TASKEXEC_MEMORY_CAPACITY")]
    pub memory_capacity: Option<String>,
    /// This node's name in the store; keep it stable across restarts so a
    /// restart recovers the tasks it was running.
    #[arg(long, env = "TASKEXEC_NODE_ID")]
    pub node_id: Option<String>,
    /// How long running tasks may finish after SIGTERM before they are cancelled.
    #[arg(long, env = "TASKEXEC_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// Group store writes into transactions (true/false).
    #[arg(long, env = "TASKEXEC_BATCH_WRITES")]
    pub batch_writes: Option<bool>,
    /// Largest request body accepted, e.g. 8Mi.
    #[arg(long, env = "TASKEXEC_MAX_BODY")]
    pub max_body: Option<String>,
    /// Largest task output stored as a result, in bytes of compact JSON,
    /// e.g. 16Mi (the default); a larger one fails the task's attempt.
    #[arg(long, env = "TASKEXEC_MAX_RESULT_BYTES", value_name = "BYTES")]
    pub max_result_bytes: Option<String>,
    /// Adapt the number of tasks started at once to the host's sandbox
    /// start latency and memory pressure, within --workers (true/false).
    #[arg(long, env = "TASKEXEC_ADAPTIVE_CONCURRENCY")]
    pub adaptive_concurrency: Option<bool>,
    /// Lowest adaptive concurrency limit (default 1).
    #[arg(long, env = "TASKEXEC_CONCURRENCY_MIN")]
    pub concurrency_min: Option<usize>,
    /// Highest adaptive concurrency limit (default: --workers).
    #[arg(long, env = "TASKEXEC_CONCURRENCY_MAX")]
    pub concurrency_max: Option<usize>,
    /// Lease of a claimed task, renewed every third of it while the task
    /// runs; a node silent this long loses its tasks to another node (at
    /// least 1s; default 30s). Hidden: for tests and tuning.
    #[arg(long, env = "TASKEXEC_LEASE", hide = true)]
    pub lease: Option<String>,
    /// Quarantine a task (end it FAILED) once this many of its attempts
    /// were lost with their node, instead of retrying it onto the next one
    /// (at least 1; default 3).
    #[arg(long, env = "TASKEXEC_QUARANTINE_AFTER", value_name = "N")]
    pub quarantine_after: Option<u32>,
    /// Keep sandboxes built ahead of time and fork servers, so tasks start
    /// faster (true/false, default true); off, every task runs in a sandbox
    /// built for it.
    #[arg(long, env = "TASKEXEC_WARM")]
    pub warm: Option<bool>,
    /// Pre-built sandboxes kept per runtime and limit class even when idle
    /// (default 0).
    #[arg(long, env = "TASKEXEC_WARM_POOL_MIN")]
    pub warm_pool_min: Option<usize>,
    /// Pre-built sandboxes at most per runtime and limit class (default 4;
    /// 0 turns the pools off).
    #[arg(long, env = "TASKEXEC_WARM_POOL_MAX")]
    pub warm_pool_max: Option<usize>,
    /// Pre-built sandboxes at most in all (default 16).
    #[arg(long, env = "TASKEXEC_WARM_POOL_TOTAL")]
    pub warm_pool_total: Option<usize>,
    /// A runtime and limit class without tasks this long shrinks to
    /// --warm-pool-min, e.g. 30s (the default) or 5m.
    #[arg(long, env = "TASKEXEC_WARM_POOL_IDLE")]
    pub warm_pool_idle: Option<String>,
    /// Run handler-mode tasks of runtimes with a fork server in children of
    /// a pre-started interpreter (true/false, default true).
    #[arg(long, env = "TASKEXEC_FORK_SERVERS")]
    pub fork_servers: Option<bool>,
    /// Fork-server starts per second this node may make, sustained, after
    /// a burst of 16 (default 2, e.g. 0.5; at most 1000). A task whose
    /// server may not start yet runs in a sandbox instead.
    #[arg(long, env = "TASKEXEC_FORK_SERVER_START_RATE")]
    pub fork_server_start_rate: Option<f64>,
    /// Time a request's head may take from its first byte, e.g. 10s (the
    /// default).
    #[arg(long, env = "TASKEXEC_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// Time a request's body may take after its head, e.g. 60s (the default).
    #[arg(long, env = "TASKEXEC_BODY_TIMEOUT")]
    pub body_timeout: Option<String>,
    /// Time a keep-alive connection without a request in flight stays open,
    /// e.g. 60s (the default).
    #[arg(long, env = "TASKEXEC_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Connections open at most (default 1024); the last 1/64 of them (at
    /// most 16) only answer /healthz and /readyz.
    #[arg(long, env = "TASKEXEC_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// A TOML file with any of the settings above.
    #[arg(long, env = "TASKEXEC_CONFIG")]
    pub config: Option<PathBuf>,
}

/// A TOML value given as a string or a number (`workers = 8` or `"auto"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Loose {
    /// "auto", "1500m", "8Gi".
    Text(String),
    /// 8, 2.
    Number(f64),
}

impl Loose {
    fn into_text(self) -> String {
        match self {
            Self::Text(s) => s,
            Self::Number(n) => n.to_string(),
        }
    }
}

/// The TOML file: the same settings, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Address to listen on (HOST:PORT).
    listen: Option<String>,
    /// Database URL.
    database: Option<String>,
    /// Workers: a number or "auto".
    workers: Option<Loose>,
    /// Bearer token.
    auth_token: Option<String>,
    /// Bearer token file.
    auth_token_file: Option<PathBuf>,
    /// Queue bound.
    max_queued: Option<u64>,
    /// CPU capacity.
    cpu_capacity: Option<Loose>,
    /// Memory capacity.
    memory_capacity: Option<Loose>,
    /// Node name.
    node_id: Option<String>,
    /// Shutdown grace.
    shutdown_grace: Option<Loose>,
    /// Batched writes.
    batch_writes: Option<bool>,
    /// Body limit.
    max_body: Option<Loose>,
    /// Stored result limit.
    max_result_bytes: Option<Loose>,
    /// Adaptive concurrency on or off.
    adaptive_concurrency: Option<bool>,
    /// Lowest adaptive concurrency limit.
    concurrency_min: Option<usize>,
    /// Highest adaptive concurrency limit.
    concurrency_max: Option<usize>,
    /// Lease of a claimed task.
    lease: Option<Loose>,
    /// Lost attempts after which a task is quarantined.
    quarantine_after: Option<u32>,
    /// Warm runner on or off.
    warm: Option<bool>,
    /// Pre-built sandboxes kept per key.
    warm_pool_min: Option<usize>,
    /// Pre-built sandboxes at most per key.
    warm_pool_max: Option<usize>,
    /// Pre-built sandboxes at most in all.
    warm_pool_total: Option<usize>,
    /// Idle time after which a key shrinks.
    warm_pool_idle: Option<Loose>,
    /// Fork servers on or off.
    fork_servers: Option<bool>,
    /// Fork-server starts per second, sustained.
    fork_server_start_rate: Option<f64>,
    /// Header timeout.
    header_timeout: Option<Loose>,
    /// Body timeout.
    body_timeout: Option<Loose>,
    /// Idle keep-alive timeout.
    idle_timeout: Option<Loose>,
    /// Connection limit.
    max_connections: Option<usize>,
}

/// Total memory from /proc/meminfo.
fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30)
}

/// The validated settings.
#[derive(Debug)]
struct Settings {
    listen: SocketAddr,
    database: String,
    service: ServiceConfig,
    auth_token: Option<String>,
    shutdown_grace: Duration,
    max_body: usize,
    /// The largest output stored as a result.
    max_result_bytes: u64,
    /// The HTTP server's timeouts and connection limit.
    http: taskexec_api::server::ServerConfig,
    /// The warm runner's settings (`None`: off, every task runs cold).
    warm: Option<WarmConfig>,
}

fn settings(args: ServeArgs) -> anyhow::Result<Settings> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--config: cannot read {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("--config {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let listen = match args.listen.or(file.listen) {
        Some(l) => listen_addr(&l)?,
        None => SocketAddr::from(([127, 0, 0, 1], 8080)),
    };
    let database = args
        .database
        .or(file.database)
        .unwrap_or_else(|| "sqlite://taskexec.db".to_string());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    let cpu = match args
        .cpu_capacity
        .or(file.cpu_capacity.map(Loose::into_text))
    {
        Some(v) => u64::from(
            taskexec_model::parse_cpu_millis(&v)
                .map_err(|e| anyhow::anyhow!("--cpu-capacity {v:?}: {e}"))?,
        ),
        None => cores * 1000,
    };
    let memory = match args
        .memory_capacity
        .or(file.memory_capacity.map(Loose::into_text))
    {
        Some(v) => taskexec_model::parse_bytes(&v)
            .map_err(|e| anyhow::anyhow!("--memory-capacity {v:?}: {e}"))?,
        None => mem_total() / 10 * 9,
    };
    // With the embedded store one node owns the database: a fixed name lets
    // a restart find the tasks it was running. Nodes sharing PostgreSQL each
    // need their own name (lease expiry recovers a node that never returns).
    let node = args.node_id.or(file.node_id).unwrap_or_else(|| {
        if database.starts_with("sqlite:") {
            "local".to_string()
        } else {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        }
    });
    let mut service = ServiceConfig::new(
        node,
        Capacity {
            cpu_millis: cpu,
            memory_bytes: memory,
        },
    );
    match args
        .workers
        .or(file.workers.map(Loose::into_text))
        .as_deref()
    {
        None | Some("auto") => {}
        Some(n) => {
            service.workers = n
                .parse()
                .ok()
                .filter(|n| *n <= 4096)
                .with_context(|| {
                    format!("--workers {n:?}: expected \"auto\" or a number from 0 (serve the API only) to 4096")
                })?;
        }
    }
    if let Some(q) = args.max_queued.or(file.max_queued) {
        if q == 0 {
            bail!("--max-queued 0: expected at least 1");
        }
        service.max_queued = q;
    }
    if let Some(b) = args.batch_writes.or(file.batch_writes) {
        service.batch_writes = b;
    }
    if let Some(v) = args.lease.or(file.lease.map(Loose::into_text)) {
        let lease = taskexec_model::parse_duration(&v)
            .map_err(|e| anyhow::anyhow!("--lease {v:?}: {e}"))?;
        if lease < Duration::from_secs(1) {
            bail!("--lease {v:?}: expected at least 1s");
        }
        service.lease = lease;
    }
    if let Some(n) = args.quarantine_after.or(file.quarantine_after) {
        if n == 0 {
            bail!(
                "--quarantine-after 0: expected at least 1 (lost attempts before a task is quarantined)"
            );
        }
        service.quarantine_after = n;
    }
    service.concurrency = concurrency(
        args.adaptive_concurrency.or(file.adaptive_concurrency),
        args.concurrency_min.or(file.concurrency_min),
        args.concurrency_max.or(file.concurrency_max),
        service.workers,
    )?;
    let shutdown_grace = match args
        .shutdown_grace
        .or(file.shutdown_grace.map(Loose::into_text))
    {
        Some(v) => taskexec_model::parse_duration(&v)
            .map_err(|e| anyhow::anyhow!("--shutdown-grace {v:?}: {e}"))?,
        None => Duration::from_secs(30),
    };
    let max_body = match args.max_body.or(file.max_body.map(Loose::into_text)) {
        Some(v) => taskexec_model::parse_bytes(&v)
            .map_err(|e| anyhow::anyhow!("--max-body {v:?}: {e}"))? as usize,
        None => 8 << 20,
    };
    let max_result_bytes = crate::setup::max_result_bytes(
        args.max_result_bytes
            .or(file.max_result_bytes.map(Loose::into_text))
            .as_deref(),
    )?;
    let mut http = match args.max_connections.or(file.max_connections) {
        Some(n) if !(2..=1_000_000).contains(&n) => {
            bail!("--max-connections {n}: expected a number from 2 to 1000000")
        }
        Some(n) => taskexec_api::server::ServerConfig::with_max_connections(n),
        None => taskexec_api::server::ServerConfig::default(),
    };
    for (name, given, slot) in [
        (
            "--header-timeout",
            args.header_timeout
                .or(file.header_timeout.map(Loose::into_text)),
            &mut http.header_timeout,
        ),
        (
            "--body-timeout",
            args.body_timeout
                .or(file.body_timeout.map(Loose::into_text)),
            &mut http.body_timeout,
        ),
        (
            "--idle-timeout",
            args.idle_timeout
                .or(file.idle_timeout.map(Loose::into_text)),
            &mut http.idle_timeout,
        ),
    ] {
        if let Some(v) = given {
            let d = taskexec_model::parse_duration(&v)
                .map_err(|e| anyhow::anyhow!("{name} {v:?}: {e}"))?;
            if d < Duration::from_millis(100) {
                bail!("{name} {v:?}: expected at least 100ms");
            }
            *slot = d;
        }
    }
    // Flags and environment first (a token, then a token file), then the
    // file's settings in the same order.
    let auth_token = match (
        args.auth_token,
        args.auth_token_file,
        file.auth_token,
        file.auth_token_file,
    ) {
        (Some(t), _, _, _) => Some(t),
        (None, Some(path), _, _) => Some(read_token(&path)?),
        (None, None, Some(t), _) => Some(t),
        (None, None, None, Some(path)) => Some(read_token(&path)?),
        (None, None, None, None) => None,
    };
    if auth_token.as_deref() == Some("") {
        bail!("--auth-token: the token is empty");
    }
    let warm = warm(WarmInput {
        enabled: args.warm.or(file.warm),
        fork_servers: args.fork_servers.or(file.fork_servers),
        start_rate: args.fork_server_start_rate.or(file.fork_server_start_rate),
        pool_min: args.warm_pool_min.or(file.warm_pool_min),
        pool_max: args.warm_pool_max.or(file.warm_pool_max),
        pool_total: args.warm_pool_total.or(file.warm_pool_total),
        pool_idle: args
            .warm_pool_idle
            .or(file.warm_pool_idle.map(Loose::into_text)),
    })?;
    Ok(Settings {
        listen,
        database,
        service,
        auth_token,
        shutdown_grace,
        max_body,
        max_result_bytes,
        http,
        warm,
    })
}

/// The warm runner's settings as given (flag, variable or file).
#[derive(Debug, Default)]
struct WarmInput {
    enabled: Option<bool>,
    fork_servers: Option<bool>,
    start_rate: Option<f64>,
    pool_min: Option<usize>,
    pool_max: Option<usize>,
    pool_total: Option<usize>,
    pool_idle: Option<String>,
}

/// Most pre-built sandboxes a node may keep (each is a launcher process, a
/// cgroup and a scratch tmpfs).
const MAX_WARM_SANDBOXES: usize = 4096;

/// The warm runner's settings: on by default with fork servers and the
/// pool's default sizing; `min <= max <= total`, where a per-key cap left
/// to its default follows a lower total.
fn warm(w: WarmInput) -> anyhow::Result<Option<WarmConfig>> {
    if w.enabled == Some(false) {
        let given = [
            (w.pool_min.is_some(), "--warm-pool-min"),
            (w.pool_max.is_some(), "--warm-pool-max"),
            (w.pool_total.is_some(), "--warm-pool-total"),
            (w.pool_idle.is_some(), "--warm-pool-idle"),
            (w.fork_servers == Some(true), "--fork-servers true"),
            (w.start_rate.is_some(), "--fork-server-start-rate"),
        ];
        if let Some((_, name)) = given.iter().find(|(g, _)| *g) {
            bail!("{name} needs --warm true (the warm runner is off)");
        }
        return Ok(None);
    }
    let mut config = crate::setup::default_warm_config();
    if let Some(f) = w.fork_servers {
        config.fork_servers = f;
    }
    if let Some(rate) = w.start_rate {
        config.start_limit = StartLimit::with_node_rate(rate).ok_or_else(|| {
            anyhow::anyhow!(
                "--fork-server-start-rate {rate}: expected starts per second above 0 and at most 1000, e.g. 2 (the default) or 0.5"
            )
        })?;
    }
    let pool = &mut config.pool;
    let default = |given: bool| if given { "" } else { " (the default)" };
    if let Some(total) = w.pool_total {
        if total > MAX_WARM_SANDBOXES {
            bail!("--warm-pool-total {total}: expected a number from 0 to {MAX_WARM_SANDBOXES}");
        }
        pool.max_total = total;
    }
    match w.pool_max {
        Some(max) if max > pool.max_total => bail!(
            "--warm-pool-max {max}: more than --warm-pool-total {}{}; raise --warm-pool-total",
            pool.max_total,
            default(w.pool_total.is_some())
        ),
        Some(max) => pool.max_per_key = max,
        None => pool.max_per_key = pool.max_per_key.min(pool.max_total),
    }
    if let Some(min) = w.pool_min {
        if min > pool.max_per_key {
            let capped = w.pool_max.is_none()
                && pool.max_per_key < taskexec_sandbox::pool::PoolConfig::default().max_per_key;
            bail!(
                "--warm-pool-min {min}: more than --warm-pool-max {}{}; raise --warm-pool-max",
                pool.max_per_key,
                if capped {
                    " (the default, capped by --warm-pool-total)"
                } else {
                    default(w.pool_max.is_some())
                }
            );
        }
        pool.min_per_key = min;
    }
    if let Some(v) = w.pool_idle {
        let idle = taskexec_model::parse_duration(&v)
            .map_err(|e| anyhow::anyhow!("--warm-pool-idle {v:?}: {e}"))?;
        if idle < Duration::from_secs(1) {
            bail!("--warm-pool-idle {v:?}: expected at least 1s");
        }
        pool.idle_after = idle;
    }
    Ok(Some(config))
}

/// The adaptive concurrency settings: on by default, from `min` (default 1)
/// to `max` (default: the workers), never past the workers.
fn concurrency(
    enabled: Option<bool>,
    min: Option<usize>,
    max: Option<usize>,
    workers: usize,
) -> anyhow::Result<Option<ConcurrencyConfig>> {
    if enabled == Some(false) {
        if min.is_some() || max.is_some() {
            bail!("--concurrency-min and --concurrency-max need --adaptive-concurrency true");
        }
        return Ok(None);
    }
    let min_given = min;
    let min = min.unwrap_or(1);
    if min == 0 {
        bail!("--concurrency-min 0: expected at least 1");
    }
    if let Some(max) = max {
        if max < min {
            bail!("--concurrency-max {max}: less than --concurrency-min {min}");
        }
        if max > workers && workers > 0 {
            bail!(
                "--concurrency-max {max}: more than the {workers} workers; raise --workers to allow more tasks at once"
            );
        }
    }
    if let Some(min) = min_given
        && min > workers
        && workers > 0
    {
        bail!(
            "--concurrency-min {min}: more than the {workers} workers; raise --workers or lower the minimum"
        );
    }
    Ok(Some(ConcurrencyConfig {
        min,
        max,
        ..ConcurrencyConfig::default()
    }))
}

/// `--listen HOST:PORT`, the host an IP address or a name resolved here
/// (its first address).
fn listen_addr(raw: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let expected = "expected HOST:PORT, e.g. 127.0.0.1:8080, localhost:8080 or [::1]:8080";
    if let Ok(a) = raw.parse() {
        return Ok(a);
    }
    match raw.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => bail!("--listen {raw:?}: {expected}"),
    }
    let addrs = raw.to_socket_addrs().map_err(|e| {
        anyhow::anyhow!("--listen {raw:?}: cannot resolve the host ({e}); {expected}")
    })?;
    let mut addrs: Vec<SocketAddr> = addrs.collect();
    // Prefer IPv4, as the default 127.0.0.1 is.
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .into_iter()
        .next()
        .with_context(|| format!("--listen {raw:?}: the host has no address; {expected}"))
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("--auth-token-file: cannot read {}", path.display()))?;
    Ok(t.trim().to_string())
}

/// The store named by a database URL, and the store itself: for
/// PostgreSQL, its LISTEN/NOTIFY channel wakes idle workers; SQLite's is
/// checkpointed at a clean stop.
pub async fn open_store(
    url: &str,
) -> anyhow::Result<(Arc<dyn TaskStore>, Option<PgStore>, Option<SqliteStore>)> {
    if url.starts_with("sqlite:") {
        let store = SqliteStore::open(url)
            .await
            .with_context(|| format!("--database {url}"))?;
        Ok((Arc::new(store.clone()), None, Some(store)))
    } else if PgStore::handles_url(url) {
        let store = PgStore::open(url)
            .await
            .with_context(|| format!("--database {}", redact(url)))?;
        Ok((Arc::new(store.clone()), Some(store), None))
    } else {
        bail!(
            "--database {:?}: expected sqlite://PATH or postgres://USER@HOST/DB",
            redact(url)
        )
    }
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Wakes the scheduler on every queue notification from the database, so
/// an idle worker starts a task submitted on another node within
/// milliseconds; the scheduler's polling remains the fallback for
/// notifications lost while the listener reconnects.
fn spawn_wakeups(pg: PgStore, service: Arc<Service>) {
    tokio::spawn(async move {
        loop {
            match pg.listener().await {
                Ok(mut listener) => loop {
                    match listener.recv().await {
                        Ok(_) => service.wake(),
                        Err(e) => {
                            tracing::warn!(error = %e, "queue notifications interrupted; reconnecting");
                            service.wake();
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for queue notifications; polling only");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    });
}

/// A worker serves no HTTP: its HTTP settings are refused rather than
/// silently ignored. (The HTTP server's timeouts and connection cap, once
/// they exist, belong here too: --header-timeout, --body-timeout,
/// --idle-timeout, --max-connections.)
fn refuse_http_flags(args: &ServeArgs) -> anyhow::Result<()> {
    let given = [
        (args.listen.is_some(), "--listen"),
        (args.auth_token.is_some(), "--auth-token"),
        (args.auth_token_file.is_some(), "--auth-token-file"),
        (args.max_body.is_some(), "--max-body"),
        (args.max_queued.is_some(), "--max-queued"),
        (args.header_timeout.is_some(), "--header-timeout"),
        (args.body_timeout.is_some(), "--body-timeout"),
        (args.idle_timeout.is_some(), "--idle-timeout"),
        (args.max_connections.is_some(), "--max-connections"),
    ];
    if let Some((_, flag)) = given.iter().find(|(g, _)| *g) {
        bail!(
            "{flag}: `taskexec worker` serves no HTTP API, so it takes no HTTP settings; \
             pass {flag} to `taskexec serve` (or unset its TASKEXEC_ variable)"
        );
    }
    Ok(())
}

/// `taskexec serve` (with `http`) or `taskexec worker` (without: a node
/// that only executes).
pub fn main(g: &crate::setup::GlobalArgs, args: ServeArgs, http: bool) -> anyhow::Result<ExitCode> {
    if !http {
        refuse_http_flags(&args)?;
    }
    let s = settings(args)?;
    let warmth = match s.warm.clone() {
        Some(config) => crate::setup::Warmth::Configured(config),
        None => crate::setup::Warmth::Cold,
    };
    match &s.warm {
        Some(w) => info!(
            pool_min = w.pool.min_per_key,
            pool_max = w.pool.max_per_key,
            pool_total = w.pool.max_total,
            pool_idle = ?w.pool.idle_after,
            fork_servers = w.fork_servers,
            fork_server_start_rate = 1.0 / w.start_limit.node_interval.as_secs_f64(),
            "warm runner on"
        ),
        None => info!("warm runner off: every task runs in a sandbox built for it"),
    }
    let engine = Arc::new(crate::setup::engine(g, warmth, s.max_result_bytes)?);
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 300.0,
        ])
        .context("metric buckets")?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("taskexec_store_batch_writes".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    // Every running sandbox is watched from a blocking thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(s.service.workers + 64)
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        // Bind first: a taken port must fail before any task is claimed.
        let listener = if http {
            Some(
                tokio::net::TcpListener::bind(s.listen)
                    .await
                    .with_context(|| format!("--listen {}", s.listen))?,
            )
        } else {
            None
        };
        let (store, pg, sqlite) = open_store(&s.database).await?;
        let service = Service::start(Arc::clone(&engine), store, s.service.clone())
            .await
            .context("starting the service")?;
        if let Some(pg) = pg
            && s.service.workers > 0
        {
            spawn_wakeups(pg, Arc::clone(&service));
        }
        let upkeep = metrics.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        let stop_http = Arc::new(tokio::sync::Notify::new());
        let server = if let Some(listener) = listener {
            let router = taskexec_api::router(
                Arc::clone(&service),
                taskexec_api::ApiConfig {
                    auth_token: s.auth_token.clone(),
                    max_body_bytes: s.max_body,
                    metrics: Some(metrics),
                },
            );
            let local = listener.local_addr()?;
            info!(listen = %local, database = %s.database, workers = s.service.workers, "taskexec serve ready");
            eprintln!(
                "taskexec: serving on http://{local} (database {}, {} workers, node {})",
                s.database, s.service.workers, s.service.node
            );
            let stop = Arc::clone(&stop_http);
            let http = s.http;
            Some(tokio::spawn(async move {
                taskexec_api::server::serve(listener, router, http, async move {
                    stop.notified().await;
                })
                .await;
            }))
        } else {
            info!(database = %s.database, workers = s.service.workers, node = %s.service.node, "taskexec worker ready");
            eprintln!(
                "taskexec: worker {} running (database {}, {} workers)",
                s.service.node, s.database, s.service.workers
            );
            None
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("taskexec: shutting down (grace {:?})", s.shutdown_grace);
        service.shutdown(s.shutdown_grace).await;
        // Fork servers and pre-built sandboxes go with the service.
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        // The database file alone complete after a clean stop (a copy of
        // it needs no -wal file).
        if let Some(sqlite) = sqlite
            && let Err(e) = sqlite.checkpoint().await
        {
            tracing::warn!(error = %e, "checkpointing the database at shutdown");
        }
        stop_http.notify_waiters();
        // Open event streams and long polls get a moment to end.
        if let Some(server) = server {
            let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_concurrency_is_on_by_default_up_to_the_workers() {
        let c = concurrency(None, None, None, 8)
            .expect("valid")
            .expect("on");
        assert_eq!((c.min, c.max, c.memory_signal), (1, None, true));
        let c = concurrency(Some(true), Some(2), Some(6), 8)
            .expect("valid")
            .expect("on");
        assert_eq!((c.min, c.max), (2, Some(6)));
        assert_eq!(
            concurrency(Some(false), None, None, 8).expect("valid"),
            None
        );
    }

    #[test]
    fn the_warm_runner_is_on_by_default_with_fork_servers() {
        let w = warm(WarmInput::default()).expect("valid").expect("on");
        assert!(w.fork_servers);
        assert_eq!(w.pool, taskexec_sandbox::pool::PoolConfig::default());
        let w = warm(WarmInput {
            enabled: Some(true),
            fork_servers: Some(false),
            pool_min: Some(1),
            pool_max: Some(2),
            pool_total: Some(3),
            pool_idle: Some("5m".into()),
            start_rate: None,
        })
        .expect("valid")
        .expect("on");
        assert!(!w.fork_servers);
        assert_eq!(
            (
                w.pool.min_per_key,
                w.pool.max_per_key,
                w.pool.max_total,
                w.pool.idle_after
            ),
            (1, 2, 3, Duration::from_secs(300))
        );
        let off = WarmInput {
            enabled: Some(false),
            fork_servers: Some(false),
            ..WarmInput::default()
        };
        assert!(warm(off).expect("valid").is_none());
    }

    #[test]
    fn a_lower_total_caps_the_default_per_key_cap() {
        let w = warm(WarmInput {
            pool_total: Some(2),
            ..WarmInput::default()
        })
        .expect("valid")
        .expect("on");
        assert_eq!((w.pool.max_per_key, w.pool.max_total), (2, 2));
        let e = warm(WarmInput {
            pool_min: Some(3),
            pool_total: Some(2),
            ..WarmInput::default()
        })
        .expect_err("a floor above the capped cap")
        .to_string();
        assert!(
            e.contains("--warm-pool-max 2 (the default, capped by --warm-pool-total)"),
            "{e}"
        );
        // No pool at all, fork servers still on.
        let w = warm(WarmInput {
            pool_max: Some(0),
            ..WarmInput::default()
        })
        .expect("valid")
        .expect("on");
        assert_eq!(w.pool.max_per_key, 0);
        assert!(w.fork_servers);
    }

    #[test]
    fn inconsistent_warm_settings_are_refused_with_the_setting() {
        let err = |w: WarmInput| warm(w).expect_err("invalid").to_string();
        let e = err(WarmInput {
            pool_min: Some(3),
            pool_max: Some(2),
            ..WarmInput::default()
        });
        assert!(
            e.contains("--warm-pool-min 3: more than --warm-pool-max 2;"),
            "{e}"
        );
        let e = err(WarmInput {
            pool_min: Some(5),
            ..WarmInput::default()
        });
        assert!(
            e.contains("more than --warm-pool-max 4 (the default)"),
            "{e}"
        );
        let e = err(WarmInput {
            pool_max: Some(20),
            ..WarmInput::default()
        });
        assert!(
            e.contains("--warm-pool-max 20: more than --warm-pool-total 16 (the default)"),
            "{e}"
        );
        let e = err(WarmInput {
            pool_total: Some(100_000),
            ..WarmInput::default()
        });
        assert!(e.contains("--warm-pool-total 100000: expected"), "{e}");
        let e = err(WarmInput {
            pool_idle: Some("soon".into()),
            ..WarmInput::default()
        });
        assert!(e.starts_with("--warm-pool-idle \"soon\":"), "{e}");
        let e = err(WarmInput {
            pool_idle: Some("500ms".into()),
            ..WarmInput::default()
        });
        assert!(e.contains("expected at least 1s"), "{e}");
        let e = err(WarmInput {
            enabled: Some(false),
            pool_max: Some(2),
            ..WarmInput::default()
        });
        assert!(e.contains("--warm-pool-max needs --warm true"), "{e}");
        let e = err(WarmInput {
            enabled: Some(false),
            fork_servers: Some(true),
            ..WarmInput::default()
        });
        assert!(e.contains("--fork-servers true needs --warm true"), "{e}");
    }

    #[test]
    fn the_fork_server_start_rate_is_set_and_checked() {
        let w = warm(WarmInput::default()).expect("valid").expect("on");
        assert_eq!(w.start_limit, StartLimit::default());
        let w = warm(WarmInput {
            start_rate: Some(0.5),
            ..WarmInput::default()
        })
        .expect("valid")
        .expect("on");
        assert_eq!(w.start_limit.node_interval, Duration::from_secs(2));
        assert_eq!(w.start_limit.node_burst, StartLimit::default().node_burst);
        for bad in [0.0, -2.0, 5000.0] {
            let e = format!(
                "{:#}",
                warm(WarmInput {
                    start_rate: Some(bad),
                    ..WarmInput::default()
                })
                .expect_err("out of range")
            );
            assert!(
                e.contains("--fork-server-start-rate") && e.contains("above 0 and at most 1000"),
                "{e}"
            );
        }
        let e = format!(
            "{:#}",
            warm(WarmInput {
                enabled: Some(false),
                start_rate: Some(1.0),
                ..WarmInput::default()
            })
            .expect_err("warm off")
        );
        assert!(
            e.contains("--fork-server-start-rate needs --warm true"),
            "{e}"
        );
        let args = parse(&["--fork-server-start-rate", "4"]);
        let w = settings(args).expect("valid").warm.expect("on");
        assert_eq!(w.start_limit.node_interval, Duration::from_millis(250));
    }

    /// `taskexec serve`'s flags alone.
    #[derive(Debug, clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(argv: &[&str]) -> ServeArgs {
        use clap::Parser;
        Serve::try_parse_from(std::iter::once("serve").chain(argv.iter().copied()))
            .expect("flags parse")
            .args
    }

    #[test]
    fn warm_settings_come_from_the_file_under_the_flag() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("serve.toml");
        std::fs::write(
            &path,
            "warm_pool_min = 1\nwarm_pool_max = 3\nwarm_pool_idle = \"2m\"\nfork_servers = false\nfork_server_start_rate = 1\n",
        )
        .expect("write the config");
        let config = path.to_str().expect("a UTF-8 path");
        let args = parse(&["--config", config, "--warm-pool-max", "2"]);
        let w = settings(args).expect("valid").warm.expect("on");
        assert_eq!(
            (w.pool.min_per_key, w.pool.max_per_key, w.pool.idle_after),
            (1, 2, Duration::from_secs(120))
        );
        assert!(!w.fork_servers);
        assert_eq!(w.start_limit.node_interval, Duration::from_secs(1));

        std::fs::write(&path, "warm = false\n").expect("write the config");
        let args = parse(&["--config", config]);
        assert!(settings(args).expect("valid").warm.is_none());

        std::fs::write(&path, "warm_pool = 3\n").expect("write the config");
        let args = parse(&["--config", config]);
        let e = format!("{:#}", settings(args).expect_err("unknown key"));
        assert!(e.contains("warm_pool"), "{e}");
    }

    #[test]
    fn listen_takes_host_names_and_says_what_it_expects() {
        assert_eq!(
            listen_addr("localhost:8080").expect("a host name"),
            SocketAddr::from(([127, 0, 0, 1], 8080))
        );
        assert_eq!(
            listen_addr("[::1]:9").expect("IPv6"),
            "[::1]:9".parse::<SocketAddr>().expect("valid")
        );
        let e = listen_addr("localhost").expect_err("no port").to_string();
        assert!(
            e.starts_with("--listen \"localhost\": expected HOST:PORT"),
            "{e}"
        );
    }

    #[test]
    fn a_worker_refuses_http_settings() {
        let e = refuse_http_flags(&parse(&["--listen", "127.0.0.1:9000"]))
            .expect_err("--listen on a worker")
            .to_string();
        assert!(
            e.starts_with("--listen: `taskexec worker` serves no HTTP API"),
            "{e}"
        );
        let e = refuse_http_flags(&parse(&["--auth-token", "t"]))
            .expect_err("--auth-token on a worker")
            .to_string();
        assert!(e.starts_with("--auth-token:"), "{e}");
        refuse_http_flags(&parse(&["--workers", "2"])).expect("a worker's own setting");
    }

    #[test]
    fn concurrency_bounds_outside_the_workers_are_refused() {
        let err = |min, max| {
            concurrency(None, min, max, 4)
                .expect_err("invalid")
                .to_string()
        };
        assert!(err(Some(0), None).contains("--concurrency-min 0"));
        assert!(err(Some(3), Some(2)).contains("less than --concurrency-min 3"));
        assert!(err(None, Some(5)).contains("more than the 4 workers"));
        assert!(err(Some(5), None).contains("more than the 4 workers"));
        assert!(
            concurrency(Some(false), Some(2), None, 4)
                .expect_err("bounds without the limiter")
                .to_string()
                .contains("--adaptive-concurrency true")
        );
    }
}
