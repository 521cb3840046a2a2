//! The settings given ([`RawConfig`]) validated into the typed settings the
//! program uses ([`Settings`]), with the defaults of [`super::SETTINGS`]
//! filled in. Every error names the flag and says what it expects.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use taskexec_sandbox::{StartLimit, WarmConfig};
use taskexec_service::ServiceConfig;
use taskexec_service::limiter::ConcurrencyConfig;
use taskexec_store::Capacity;

use super::{RawConfig, Text};

/// The validated settings.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database: String,
    pub service: ServiceConfig,
    pub auth_token: Option<String>,
    pub shutdown_grace: Duration,
    pub max_body: usize,
    /// The largest output stored as a result.
    pub max_result_bytes: u64,
    /// The HTTP server's timeouts and connection limit.
    pub http: taskexec_api::server::ServerConfig,
    /// The warm runner's settings (`None`: off, every task runs cold).
    pub warm: Option<WarmConfig>,
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

/// A setting's value: given, else its fixed default.
fn value<T>(given: Option<T>, default: Option<T>, key: &str) -> anyhow::Result<T> {
    given
        .or(default)
        .with_context(|| format!("{key}: no default declared"))
}

/// The settings given, validated, the defaults filled in. The settings
/// that depend on each other (the warm runner's, the concurrency limit's)
/// are checked as given, so that a message can tell a value given from a
/// default.
pub fn settings(given: RawConfig) -> anyhow::Result<Settings> {
    let d = RawConfig::defaults()?;
    let listen = listen_addr(&value(given.listen, d.listen, "listen")?)?;
    let database = value(given.database, d.database, "database")?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u64;
    let cpu = match given.cpu_capacity {
        Some(Text(v)) => u64::from(
            taskexec_model::parse_cpu_millis(&v)
                .map_err(|e| anyhow::anyhow!("--cpu-capacity {v:?}: {e}"))?,
        ),
        None => cores * 1000,
    };
    let memory = match given.memory_capacity {
        Some(Text(v)) => taskexec_model::parse_bytes(&v)
            .map_err(|e| anyhow::anyhow!("--memory-capacity {v:?}: {e}"))?,
        None => mem_total() / 10 * 9,
    };
    // With the embedded store one node owns the database: a fixed name lets
    // a restart find the tasks it was running. Nodes sharing PostgreSQL each
    // need their own name (lease expiry recovers a node that never returns).
    let node = given.node_id.unwrap_or_else(|| {
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
    match value(given.workers, d.workers, "workers")?.as_str() {
        "auto" => {}
        n => {
            service.workers = n
                .parse()
                .ok()
                .filter(|n| *n <= 4096)
                .with_context(|| {
                    format!("--workers {n:?}: expected \"auto\" or a number from 0 (serve the API only) to 4096")
                })?;
        }
    }
    let q = value(given.max_queued, d.max_queued, "max_queued")?;
    if q == 0 {
        bail!("--max-queued 0: expected at least 1");
    }
    service.max_queued = q;
    service.batch_writes = value(given.batch_writes, d.batch_writes, "batch_writes")?;
    let Text(v) = value(given.lease, d.lease, "lease")?;
    let lease =
        taskexec_model::parse_duration(&v).map_err(|e| anyhow::anyhow!("--lease {v:?}: {e}"))?;
    if lease < Duration::from_secs(1) {
        bail!("--lease {v:?}: expected at least 1s");
    }
    service.lease = lease;
    let Text(v) = value(given.follow_fallback, d.follow_fallback, "follow_fallback")?;
    let fallback = taskexec_model::parse_duration(&v)
        .map_err(|e| anyhow::anyhow!("--follow-fallback {v:?}: {e}"))?;
    if fallback < Duration::from_millis(100) {
        bail!("--follow-fallback {v:?}: expected at least 100ms");
    }
    service.follow_fallback = fallback;
    let n = value(
        given.quarantine_after,
        d.quarantine_after,
        "quarantine_after",
    )?;
    if n == 0 {
        bail!(
            "--quarantine-after 0: expected at least 1 (lost attempts before a task is quarantined)"
        );
    }
    service.quarantine_after = n;
    service.concurrency = concurrency(
        given.adaptive_concurrency,
        given.concurrency_min,
        given.concurrency_max,
        service.workers,
    )?;
    let Text(v) = value(given.shutdown_grace, d.shutdown_grace, "shutdown_grace")?;
    let shutdown_grace = taskexec_model::parse_duration(&v)
        .map_err(|e| anyhow::anyhow!("--shutdown-grace {v:?}: {e}"))?;
    let Text(v) = value(given.max_body, d.max_body, "max_body")?;
    let max_body =
        taskexec_model::parse_bytes(&v).map_err(|e| anyhow::anyhow!("--max-body {v:?}: {e}"))?;
    let max_body = usize::try_from(max_body)
        .map_err(|_| anyhow::anyhow!("--max-body {v:?}: more than this machine can address"))?;
    // Checked by the function `taskexec run` shares.
    let max_result_bytes = crate::setup::max_result_bytes(
        given
            .max_result_bytes
            .as_ref()
            .or(d.max_result_bytes.as_ref())
            .map(Text::as_str),
    )?;
    let n = value(given.max_connections, d.max_connections, "max_connections")?;
    if !(2..=1_000_000).contains(&n) {
        bail!("--max-connections {n}: expected a number from 2 to 1000000")
    }
    let mut http = taskexec_api::server::ServerConfig::with_max_connections(n);
    for (name, given, default, slot) in [
        (
            "--header-timeout",
            given.header_timeout,
            d.header_timeout,
            &mut http.header_timeout,
        ),
        (
            "--body-timeout",
            given.body_timeout,
            d.body_timeout,
            &mut http.body_timeout,
        ),
        (
            "--idle-timeout",
            given.idle_timeout,
            d.idle_timeout,
            &mut http.idle_timeout,
        ),
    ] {
        let Text(v) = value(given, default, name)?;
        let t =
            taskexec_model::parse_duration(&v).map_err(|e| anyhow::anyhow!("{name} {v:?}: {e}"))?;
        if t < Duration::from_millis(100) {
            bail!("{name} {v:?}: expected at least 100ms");
        }
        *slot = t;
    }
    // A token given directly wins over a token file, wherever each comes
    // from.
    let auth_token = match (given.auth_token, given.auth_token_file) {
        (Some(t), _) => Some(t),
        (None, Some(path)) => Some(read_token(&path)?),
        (None, None) => None,
    };
    if auth_token.as_deref() == Some("") {
        bail!("--auth-token: the token is empty");
    }
    let warm = warm(WarmInput {
        enabled: given.warm,
        fork_servers: given.fork_servers,
        start_rate: given.fork_server_start_rate,
        pool_min: given.warm_pool_min,
        pool_max: given.warm_pool_max,
        pool_total: given.warm_pool_total,
        pool_idle: given.warm_pool_idle.map(|Text(t)| t),
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
pub(super) struct WarmInput {
    pub enabled: Option<bool>,
    pub fork_servers: Option<bool>,
    pub start_rate: Option<f64>,
    pub pool_min: Option<usize>,
    pub pool_max: Option<usize>,
    pub pool_total: Option<usize>,
    pub pool_idle: Option<String>,
}
/// Most pre-built sandboxes a node may keep (each is a launcher process, a
/// cgroup and a scratch tmpfs).
const MAX_WARM_SANDBOXES: usize = 4096;

/// The warm runner's settings: on by default with fork servers and the
/// pool's default sizing; `min <= max <= total`, where a per-key cap left
/// to its default follows a lower total.
pub(super) fn warm(w: WarmInput) -> anyhow::Result<Option<WarmConfig>> {
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
pub(super) fn concurrency(
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
pub(super) fn listen_addr(raw: &str) -> anyhow::Result<SocketAddr> {
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
