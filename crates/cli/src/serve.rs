//! `taskexec serve`: the API, the store and local workers in one process.
//!
//! Its settings are declared, read and validated in [`crate::config`].

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use taskexec_service::Service;
use taskexec_store::{PgStore, SqliteStore, TaskStore};
use tracing::info;

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
/// milliseconds (with `queue`: the node runs tasks); the scheduler's
/// polling remains the fallback for notifications lost while the listener
/// reconnects. With `followers` (the node serves the API), task
/// notifications wake the followers (`?wait`, event streams) of a task that
/// changed on another node.
fn spawn_wakeups(pg: PgStore, service: Arc<Service>, queue: bool, followers: bool) {
    use taskexec_store::postgres::{QUEUE_CHANNEL, TASK_CHANNEL};
    let channels: Vec<&str> = [(queue, QUEUE_CHANNEL), (followers, TASK_CHANNEL)]
        .into_iter()
        .filter_map(|(on, channel)| on.then_some(channel))
        .collect();
    tokio::spawn(async move {
        loop {
            match pg.listener_on(&channels).await {
                Ok(mut listener) => loop {
                    match listener.recv().await {
                        Ok(n) if n.channel() == TASK_CHANNEL => service.task_changed(n.payload()),
                        Ok(_) => service.wake(),
                        Err(e) => {
                            tracing::warn!(error = %e, "database notifications interrupted; reconnecting");
                            service.wake();
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for database notifications; polling only");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    });
}

/// `taskexec serve` (with `http`) or `taskexec worker` (without: a node
/// that only executes).
pub fn main(
    g: &crate::setup::GlobalArgs,
    flags: crate::config::Flags,
    http: bool,
) -> anyhow::Result<ExitCode> {
    let given = crate::config::load(flags, &crate::config::process_env, http)?;
    let s = crate::config::settings(given)?;
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
            metrics_exporter_prometheus::Matcher::Full(
                taskexec_service::metric::STORE_BATCH_WRITES.name.into(),
            ),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    taskexec_service::metric::describe();
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
            && (s.service.workers > 0 || http)
        {
            spawn_wakeups(pg, Arc::clone(&service), s.service.workers > 0, http);
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
