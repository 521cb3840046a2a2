//! The HTTP/1.1 server of the API: its own accept loop over hyper, so that
//! every connection is bounded in time and in number.
//!
//! - **Header timeout**: a request's head (request line and headers) must
//!   arrive within [`ServerConfig::header_timeout`] of its first byte.
//! - **Body timeout**: a request's body must arrive within
//!   [`ServerConfig::body_timeout`] of its head; past it, reading the body
//!   fails (the request is answered 400 and the connection closed).
//! - **Idle timeout**: a keep-alive connection with no request in flight
//!   is closed after [`ServerConfig::idle_timeout`] without a byte.
//!   A request being handled (a long poll, an event stream) is not idle.
//! - **Connection limit**: at most [`ServerConfig::max_connections`] are
//!   open. The last [`ServerConfig::reserved_connections`] of them serve
//!   only `/healthz` and `/readyz` (other requests get 503 with
//!   `Retry-After`) and allow [`RESERVED_HEADER_TIMEOUT`] for a head, so
//!   that a liveness probe gets through while ordinary slots are taken,
//!   e.g. by a slowloris attack. Past the limit a connection is answered
//!   503 at once, without reading the request, and closed.
//! - **Lingering close**: when the server closes a connection (after an
//!   answer marked `Connection: close`, e.g. a 413 to a body over the
//!   limit), it first shuts down its sending side and reads and discards
//!   what the client still sends, up to [`LINGER_BYTES`] for
//!   [`LINGER_TIME`], before closing. A client that writes its whole body
//!   before reading then reads the answer instead of a connection reset.
//!
//! Each refusal and timeout is counted (docs/metrics.md).

use std::convert::Infallible;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderValue, Request, Response, header};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use taskexec_service::metric;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::error::ApiError;

/// Default [`ServerConfig::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServerConfig::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`ServerConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The header timeout of a connection in a reserved slot.
pub const RESERVED_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bytes read and discarded from a client after the server closed
/// its side of the connection.
pub const LINGER_BYTES: u64 = 64 << 20;
/// Longest time spent reading and discarding from a client after the server
/// closed its side of the connection.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// Refusals (503 written to a connection past the limit) in progress at
/// most; past them, a connection past the limit is closed at once.
const MAX_REFUSING: usize = 64;

/// The limits of the HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Time from a request's first byte to the end of its head.
    pub header_timeout: Duration,
    /// Time from a request's head to the end of its body.
    pub body_timeout: Duration,
    /// Time a connection without a request in flight stays open.
    pub idle_timeout: Duration,
    /// Connections open at most (reserved ones included).
    pub max_connections: usize,
    /// The last slots, kept for `/healthz` and `/readyz`.
    pub reserved_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::with_max_connections(DEFAULT_MAX_CONNECTIONS)
    }
}

impl ServerConfig {
    /// The default timeouts with `max` connections, of which the default
    /// share is reserved ([`Self::default_reserved`]).
    pub fn with_max_connections(max: usize) -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: max,
            reserved_connections: Self::default_reserved(max),
        }
    }

    /// Slots reserved for health probes out of `max`: 1/64 of them, at
    /// least 1 (when `max` is at least 2) and at most 16.
    pub fn default_reserved(max: usize) -> usize {
        (max / 64).clamp(1, 16).min(max.saturating_sub(1))
    }
}

/// The tier of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// Serves every route.
    Ordinary,
    /// Serves only the health routes.
    Reserved,
}

/// Counts of open connections, shared by the accept loop and each
/// connection's guard.
#[derive(Debug, Default)]
struct Slots {
    ordinary: AtomicUsize,
    reserved: AtomicUsize,
    refusing: AtomicUsize,
    /// Woken when a connection ends (for shutdown).
    ended: Notify,
}

impl Slots {
    fn open(&self) -> usize {
        self.ordinary.load(Ordering::Acquire) + self.reserved.load(Ordering::Acquire)
    }

    fn gauge(&self) {
        metrics::gauge!(metric::HTTP_CONNECTIONS_OPEN.name).set(self.open() as f64);
    }
}

/// Gives a slot back when its connection ends.
struct SlotGuard {
    slots: Arc<Slots>,
    tier: Tier,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let counter = match self.tier {
            Tier::Ordinary => &self.slots.ordinary,
            Tier::Reserved => &self.slots.reserved,
        };
        counter.fetch_sub(1, Ordering::AcqRel);
        self.slots.gauge();
        self.slots.ended.notify_waiters();
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open
/// connections finish their requests (the caller bounds that wait) and
/// returns once they have all ended.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let slots = Arc::new(Slots::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let ordinary_max = config
        .max_connections
        .saturating_sub(config.reserved_connections);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was
                // accepted: pause a little rather than spin.
                metrics::counter!(metric::HTTP_ACCEPT_ERRORS_TOTAL.name).increment(1);
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tier = if slots.ordinary.load(Ordering::Acquire) < ordinary_max {
            slots.ordinary.fetch_add(1, Ordering::AcqRel);
            Tier::Ordinary
        } else if slots.reserved.load(Ordering::Acquire) < config.reserved_connections {
            slots.reserved.fetch_add(1, Ordering::AcqRel);
            Tier::Reserved
        } else {
            refuse(stream, &slots);
            continue;
        };
        slots.gauge();
        let guard = SlotGuard {
            slots: Arc::clone(&slots),
            tier,
        };
        let router = router.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            connection(stream, router, config, tier, stop).await;
            drop(guard);
        });
    }
    drop(listener);
    stop_tx.send_replace(true);
    loop {
        let ended = slots.ended.notified();
        if slots.open() == 0 {
            break;
        }
        ended.await;
    }
}

/// Answers a connection past the limit with 503 and closes it (at once,
/// when too many refusals are already in progress).
fn refuse(mut stream: TcpStream, slots: &Arc<Slots>) {
    metrics::counter!(metric::HTTP_CONNECTIONS_REFUSED_TOTAL.name).increment(1);
    if slots.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
        slots.refusing.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let slots = Arc::clone(slots);
    tokio::spawn(async move {
        let body = br#"{"error":{"type":"UNAVAILABLE","message":"the server has too many open connections; retry later","field":null}}"#;
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let answer = async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body).await?;
            stream.shutdown().await
        };
        if tokio::time::timeout(RESERVED_HEADER_TIMEOUT, answer)
            .await
            .is_ok_and(|r| r.is_ok())
        {
            linger(stream, 64 << 10, RESERVED_HEADER_TIMEOUT).await;
        }
        slots.refusing.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Reads and discards what the client still sends, up to `bytes` for
/// `time`, so that closing does not reset the connection under an answer
/// the client has not read yet.
async fn linger(mut stream: TcpStream, bytes: u64, time: Duration) {
    let drain = async {
        let mut buf = vec![0_u8; 16 << 10];
        let mut left = bytes;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n as u64),
            }
        }
    };
    let _ = tokio::time::timeout(time, drain).await;
}

/// What a connection is doing, as its watchdog sees it.
#[derive(Debug)]
struct Activity {
    /// Start of the connection, the origin of the times below.
    origin: Instant,
    /// Requests being handled (from their head to the end of the answer).
    in_flight: AtomicUsize,
    /// Milliseconds since `origin` of the first byte of a head not yet
    /// complete, plus one (0: none).
    head_started: AtomicU64,
    /// Milliseconds since `origin` when the last request ended.
    idle_since: AtomicU64,
    /// Woken on every change above.
    changed: Notify,
}

/// Why a watchdog closed its connection.
#[derive(Debug, Clone, Copy)]
enum Expired {
    Header,
    Idle,
}

impl Expired {
    fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Idle => "idle",
        }
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            head_started: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes arrived: the start of a head if no request is in flight.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == 0
        {
            self.head_started
                .store(self.millis().saturating_add(1), Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        self.changed.notify_one();
    }

    fn request_ended(&self) {
        self.idle_since.store(self.millis(), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// The deadline that applies now, if any.
    fn deadline(&self, header: Duration, idle: Duration) -> Option<(Instant, Expired)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |ms: u64, d: Duration| self.origin + Duration::from_millis(ms) + d;
        match self.head_started.load(Ordering::Acquire) {
            0 => Some((
                at(self.idle_since.load(Ordering::Acquire), idle),
                Expired::Idle,
            )),
            started => Some((at(started - 1, header), Expired::Header)),
        }
    }

    /// Resolves when the connection has timed out.
    async fn watch(&self, header: Duration, idle: Duration) -> Expired {
        loop {
            let changed = self.changed.notified();
            match self.deadline(header, idle) {
                None => changed.await,
                Some((at, why)) => {
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep_until(at) => {
                            if self.deadline(header, idle).is_some_and(|(a, _)| a <= Instant::now()) {
                                return why;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Serves one connection until it ends, times out or the server stops.
async fn connection(
    stream: TcpStream,
    router: Router,
    config: ServerConfig,
    tier: Tier,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let (back_tx, back_rx) = oneshot::channel();
    let io = Watched {
        stream: Some(stream),
        activity: Arc::clone(&activity),
        back: Some(back_tx),
    };
    let header_timeout = match tier {
        Tier::Ordinary => config.header_timeout,
        Tier::Reserved => config.header_timeout.min(RESERVED_HEADER_TIMEOUT),
    };
    let body_timeout = config.body_timeout;
    let for_service = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let router = router.clone();
        let ticket = Ticket::new(Arc::clone(&for_service));
        async move {
            let req = req.map(|body| {
                Body::new(Deadline {
                    inner: body,
                    sleep: Box::pin(tokio::time::sleep(body_timeout)),
                    limit: body_timeout,
                })
            });
            let res = if tier == Tier::Reserved && !is_health(req.uri().path()) {
                reserved_only()
            } else {
                match router.oneshot(req).await {
                    Ok(res) => res,
                    Err(never) => match never {},
                }
            };
            Ok::<_, Infallible>(res.map(|body| {
                Body::new(Ticketed {
                    inner: body,
                    _ticket: ticket,
                })
            }))
        }
    });
    // Boxed, so that dropping it below hands the socket back.
    let mut conn = Box::pin(
        hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), service),
    );
    let watchdog = activity.watch(header_timeout, config.idle_timeout);
    tokio::pin!(watchdog);
    let mut stopping = false;
    let closed_by_server = loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                break true;
            }
            why = &mut watchdog => {
                metrics::counter!(metric::HTTP_CONNECTIONS_TIMED_OUT_TOTAL.name, "phase" => why.as_str()).increment(1);
                tracing::debug!(phase = why.as_str(), "HTTP connection timed out");
                break false;
            }
            r = stop.changed(), if !stopping => {
                stopping = true;
                if r.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    };
    // Dropping the connection hands its socket back (see `Watched`).
    drop(conn);
    if closed_by_server && let Ok(mut stream) = back_rx.await {
        let _ = stream.shutdown().await;
        linger(stream, LINGER_BYTES, LINGER_TIME).await;
    }
}

fn is_health(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

/// The answer of a reserved slot to a route other than the health ones.
fn reserved_only() -> Response<Body> {
    metrics::counter!(metric::HTTP_REQUESTS_REFUSED_TOTAL.name).increment(1);
    let mut res = axum::response::IntoResponse::into_response(
        ApiError::unavailable(
            "the server has too many open connections; retry later (only /healthz and /readyz are answered now)",
        )
        .with_retry_after(Duration::from_secs(1)),
    );
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// Marks a request in flight from its head to the end (or drop) of its
/// answer's body.
struct Ticket(Arc<Activity>);

impl Ticket {
    fn new(activity: Arc<Activity>) -> Self {
        activity.request_started();
        Self(activity)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// An answer's body holding its request's [`Ticket`].
struct Ticketed {
    inner: Body,
    _ticket: Ticket,
}

impl HttpBody for Ticketed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails once [`ServerConfig::body_timeout`] has passed
/// since its head.
struct Deadline {
    inner: Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

/// The error of a request body that did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyTimedOut(Duration);

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(axum::Error::new)));
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            metrics::counter!(metric::HTTP_CONNECTIONS_TIMED_OUT_TOTAL.name, "phase" => "body")
                .increment(1);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut(self.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket of a connection: records reads for the watchdog, and hands
/// the socket back to the connection's task when hyper drops it, for a
/// lingering close.
struct Watched {
    stream: Option<TcpStream>,
    activity: Arc<Activity>,
    back: Option<oneshot::Sender<TcpStream>>,
}

impl Watched {
    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let (Some(stream), Some(back)) = (self.stream.take(), self.back.take()) {
            let _ = back.send(stream);
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(self.stream()?).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()?).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()?).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_slots_by_default() {
        assert_eq!(ServerConfig::default_reserved(1024), 16);
        assert_eq!(ServerConfig::default_reserved(100), 1);
        assert_eq!(ServerConfig::default_reserved(1), 0);
        assert_eq!(ServerConfig::default_reserved(100_000), 16);
    }
}
