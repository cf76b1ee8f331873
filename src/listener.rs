//! Accept loop: binds, accepts, serves HTTP/1.1 and HTTP/2 (h2c prior
//! knowledge) with hyper-util's auto builder, bounds connections and header
//! reads, closes idle connections, and drains in-flight requests on shutdown
//! up to a deadline.
//! It never looks at requests: it hands each one to the current gateway
//! service (swappable, so a config reload applies to the next request).

use crate::config::ServerConfig;
use crate::context::RequestContext;
use crate::error::{Body, BodyError};
use crate::gateway::GatewayService;
use crate::tls::ClientCertIdentity;
use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use http::Request;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

/// hyper's default (and inline) limit on request header fields.
const HYPER_MAX_HEADERS: usize = 100;

/// The per-connection protocol settings, from `[server]`.
fn connection_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(crate::timer::PooledTimer::default())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .keep_alive(true);
    // hyper parses into a fixed inline index of 100 headers; any explicit
    // limit (even 100) makes it allocate and fill one of that size per parse.
    if cfg.max_headers != HYPER_MAX_HEADERS {
        builder.http1().max_headers(cfg.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        // Rapid-reset and error-reset floods: past these, the connection gets GOAWAY.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(256);
    builder
}

/// The open-connection caps (`max_connections`, and per source IP
/// `max_connections_per_ip`), shared by the listeners that serve callers: the
/// TLS and the plaintext listener together hold at most that many.
#[derive(Clone)]
pub struct ConnectionCaps {
    permits: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl ConnectionCaps {
    pub fn new(max_connections: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_connections)),
            per_ip: Arc::default(),
        }
    }
}

/// Serves connections from `listener` until `shutdown` resolves, then drains
/// open connections for at most `cfg.shutdown_timeout`. `caps` counts
/// connections (`cfg.max_connections_per_ip` of them per source IP) together
/// with every other listener given the same caps.
pub async fn serve(
    listener: TcpListener,
    service: Arc<ArcSwap<GatewayService>>,
    cfg: ServerConfig,
    caps: ConnectionCaps,
    shutdown: impl Future<Output = ()>,
    tls: Option<Arc<crate::tls::Acceptor>>,
) {
    let builder = Arc::new(connection_builder(&cfg));
    // Shutdown: a change on this channel tells every connection to finish
    // gracefully; the drain is over when every connection dropped its receiver.
    let (drain, _) = watch::channel(());
    let ConnectionCaps {
        permits,
        per_ip: per_ip_counts,
    } = caps;
    // The connections' tasks: aborted if the drain runs out of time.
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        // At the connection cap, stop accepting: new connections wait in the
        // kernel backlog instead of taking memory here. The slot is only
        // looked at, not held, while waiting for a connection: the other
        // listener sharing the caps may need it meanwhile.
        tokio::select! {
            _ = &mut shutdown => break,
            room = permits.acquire() => if room.is_err() { break },
        }
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Reap what has ended, so the set holds the open connections only.
        while connections.try_join_next().is_some() {}
        // Taken by the other listener since: this one connection waits here.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        // One source IP may not take every connection slot.
        let Some(per_ip) = PerIpGuard::acquire(
            &per_ip_counts,
            crate::rate_limit::per_ip_bucket(peer.ip()),
            cfg.max_connections_per_ip,
        ) else {
            metrics::counter!("rungen_gateway_connections_refused_total", "reason" => "per_ip")
                .increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::count();
        let requests = Arc::new(RequestCounter::new(cfg.max_requests_per_connection));
        let service = service.clone();
        let builder = builder.clone();
        let mut drain_rx = drain.subscribe();
        let tls = tls.as_ref().map(|a| a.current());
        let handshake_timeout = cfg.header_read_timeout;
        let timeouts = ConnTimeouts {
            idle: cfg.header_read_timeout,
            stall: cfg.body_read_timeout,
        };
        connections.spawn(async move {
            match tls {
                None => {
                    let adapter = HyperAdapter {
                        service,
                        local: Arc::default(),
                        peer,
                        identity: None,
                        requests: requests.clone(),
                    };
                    serve_connection(&builder, stream, adapter, drain_rx, &requests, timeouts)
                        .await;
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                    // A handshake has no request in flight: the drain does not wait for it.
                    let outcome = tokio::select! {
                        done = handshake => Some(done),
                        _ = drain_rx.changed() => None,
                    };
                    let stream = match outcome {
                        Some(Ok(Ok(s))) => s,
                        failed => {
                            match &failed {
                                Some(Ok(Err(e))) => {
                                    tracing::debug!(error = %e, %peer, "TLS handshake failed");
                                }
                                Some(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                                None => tracing::debug!(%peer, "TLS handshake given up: draining"),
                            }
                            if failed.is_some() {
                                metrics::counter!("rungen_gateway_tls_handshake_failures_total")
                                    .increment(1);
                            }
                            drop((open, per_ip));
                            return;
                        }
                    };
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|leaf| ClientCertIdentity {
                            names: crate::tls::cert_names(leaf),
                        });
                    let adapter = HyperAdapter {
                        service,
                        local: Arc::default(),
                        peer,
                        identity,
                        requests: requests.clone(),
                    };
                    serve_connection(&builder, stream, adapter, drain_rx, &requests, timeouts)
                        .await;
                }
            }
            drop((open, per_ip, permit));
        });
    }

    drop(listener);
    tracing::info!("stopped accepting; draining open connections");
    let _ = drain.send(());
    let deadline = tokio::time::sleep(cfg.shutdown_timeout);
    tokio::pin!(deadline);
    tokio::select! {
        _ = drain.closed() => {
            tracing::info!("all connections drained");
            // What is left of each task is its bookkeeping: moments.
            let reaped = async { while connections.join_next().await.is_some() {} };
            let _ = tokio::time::timeout_at(deadline.deadline(), reaped).await;
        }
        _ = &mut deadline => {
            tracing::warn!(timeout = ?cfg.shutdown_timeout, "drain deadline reached; closing remaining connections");
        }
    }
    // Whatever still runs is closed now (its requests cut off), also when
    // the gateway runs inside a process that goes on after `stop`.
    connections.abort_all();
}

/// How long a connection may be idle (no request in flight, none starting
/// or ending), and how long a response may make no progress (a client that
/// stops reading) before the connection goes.
#[derive(Clone, Copy)]
struct ConnTimeouts {
    idle: Duration,
    stall: Duration,
}

/// Serves one connection until it ends. It is asked to finish gracefully
/// (HTTP/1.1: close once the current response is sent; HTTP/2: GOAWAY, then
/// close once open streams are done) when the server drains, or when it has
/// had no request in flight for `idle_timeout`. hyper's own timers do not
/// cover every idle state: an HTTP/2 connection between requests, and a
/// connection that has not yet sent enough bytes to tell its protocol (a
/// silent client, a partial HTTP/2 preface), would otherwise hold their
/// connection slots forever. A response body that hyper has not taken a
/// frame of for `stall` (HTTP/1.1: the client reads nothing and the socket
/// is full; HTTP/2: it grants no flow-control window) ends the connection
/// at once: it could not finish gracefully either.
///
/// Those timers and the drain signal are one watchdog future, polled only
/// when one of them wakes it, not each time a request wakes the connection's
/// task (two sleeps and a watch polled per request were ~600 instructions
/// of a cache hit, and their state one more cold cache line per connection).
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    adapter: HyperAdapter,
    drain: watch::Receiver<()>,
    requests: &RequestCounter,
    timeouts: ConnTimeouts,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = adapter.peer;
    let conn = builder.serve_connection(TokioIo::new(io), adapter);
    tokio::pin!(conn);
    // Set by the watchdog: finish gracefully (drain, or idle).
    let finish = AtomicBool::new(false);
    let watchdog = watchdog(drain, requests, timeouts, peer, &finish);
    tokio::pin!(watchdog);
    let own = Arc::new(OwnWake {
        // Polled once at the start, to arm its timers.
        woken: AtomicBool::new(true),
        task: futures_util::task::AtomicWaker::new(),
    });
    let own_waker = Waker::from(own.clone());
    let mut finishing = false;
    let result = std::future::poll_fn(|cx| {
        // Registered before the flag is read: a wake in between is not lost.
        own.task.register(cx.waker());
        if own.woken.swap(false, Ordering::AcqRel)
            && watchdog
                .as_mut()
                .poll(&mut Context::from_waker(&own_waker))
                .is_ready()
        {
            return Poll::Ready(None);
        }
        if !finishing && finish.load(Ordering::Relaxed) {
            conn.as_mut().graceful_shutdown();
            finishing = true;
        }
        conn.as_mut().poll(cx).map(Some)
    })
    .await;
    if let Some(Err(e)) = result {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// Wakes the watchdog's own flag, then the connection's task.
struct OwnWake {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for OwnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// The connection's timers and drain signal: sets `finish` when the server
/// drains or the connection has been idle for `timeouts.idle`; resolves when
/// the connection must go at once (a response stalled for `timeouts.stall`,
/// or still idle `timeouts.idle` after it was asked to finish: an HTTP/2
/// peer that never acknowledges the GOAWAY's PING).
async fn watchdog(
    mut drain: watch::Receiver<()>,
    requests: &RequestCounter,
    timeouts: ConnTimeouts,
    peer: SocketAddr,
    finish: &AtomicBool,
) {
    let idle_timeout = timeouts.idle;
    loop {
        let finishing = finish.load(Ordering::Relaxed);
        tokio::select! {
            _ = drain.changed(), if !finishing => {
                finish.store(true, Ordering::Relaxed);
                requests.touch();
            }
            _ = requests.idle_for(idle_timeout), if !finishing => {
                tracing::debug!(%peer, ?idle_timeout, "closing an idle connection");
                metrics::counter!("rungen_gateway_connections_idle_closed_total").increment(1);
                finish.store(true, Ordering::Relaxed);
                requests.touch();
            }
            _ = requests.stalled_for(timeouts.stall) => {
                tracing::debug!(%peer, stall = ?timeouts.stall, "closing a connection whose response made no progress");
                metrics::counter!("rungen_gateway_connections_stalled_closed_total").increment(1);
                return;
            }
            _ = requests.idle_for(idle_timeout), if finishing => {
                tracing::debug!(%peer, "dropping a connection that did not finish");
                return;
            }
        }
    }
}

/// Hands each request of a connection to the gateway service current at
/// that moment.
#[derive(Clone)]
struct HyperAdapter {
    service: Arc<ArcSwap<GatewayService>>,
    /// This connection's own copy of the current service.
    local: Arc<LocalService>,
    peer: SocketAddr,
    identity: Option<ClientCertIdentity>,
    requests: Arc<RequestCounter>,
}

/// A connection's copy of the gateway service, kept across its requests
/// (cloning the whole boxed stack per request was ~1,500 instructions of a
/// cache hit), and replaced when a reload swaps in a new service.
#[derive(Default)]
struct LocalService(Mutex<Option<(Arc<GatewayService>, GatewayService)>>);

impl LocalService {
    fn call(
        &self,
        current: &ArcSwap<GatewayService>,
        req: Request<Body>,
    ) -> <GatewayService as tower::Service<Request<Body>>>::Future {
        use tower::Service;
        let current = current.load();
        let mut local = crate::sync::lock(&self.0);
        let fresh = local
            .as_ref()
            .is_some_and(|(source, _)| Arc::ptr_eq(source, &current));
        if !fresh {
            *local = Some((Arc::clone(&current), GatewayService::clone(&current)));
        }
        if let Some((_, svc)) = local.as_mut() {
            // Every layer is always ready; should one ever not be, fall back
            // to a clone that waits for readiness on its own.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(Ok(())) = svc.poll_ready(&mut cx) {
                return svc.call(req);
            }
        }
        drop(local);
        Box::pin(GatewayService::clone(&current).oneshot(req))
    }
}

/// Requests served on one connection, the most it may serve, and whether
/// (and since when) it has been idle.
struct RequestCounter {
    served: AtomicU64,
    limit: u64,
    /// Requests whose response (body included) is not finished.
    in_flight: AtomicUsize,
    /// Of those, the ones whose response body waits for hyper to take its
    /// next frame (not for the upstream to produce it).
    sending: AtomicUsize,
    /// Bumped when a request starts or a response finishes (no clock read
    /// and no lock per request: the idle check compares two readings).
    activity: AtomicU64,
}

impl RequestCounter {
    fn new(limit: u64) -> Self {
        Self {
            served: AtomicU64::new(0),
            limit,
            in_flight: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            activity: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// Resolves once a response body is being sent and no frame of any
    /// body, and no request start or end, has happened for a whole `timeout`.
    async fn stalled_for(&self, timeout: Duration) {
        self.quiet_for(timeout, |c| c.sending.load(Ordering::SeqCst) > 0)
            .await
    }

    /// Resolves once the connection has had no request in flight, and no
    /// request start or response end, for a whole `timeout` (so an idle
    /// connection is noticed between one and two timeouts after it went quiet).
    async fn idle_for(&self, timeout: Duration) {
        self.quiet_for(timeout, |c| c.in_flight.load(Ordering::SeqCst) == 0)
            .await
    }

    /// Resolves once `holds` is true at the end of a whole `timeout` without
    /// activity (checked every `timeout`).
    async fn quiet_for(&self, timeout: Duration, holds: impl Fn(&Self) -> bool) {
        loop {
            let seen = self.activity.load(Ordering::SeqCst);
            tokio::time::sleep(timeout).await;
            if holds(self) && self.activity.load(Ordering::SeqCst) == seen {
                return;
            }
        }
    }
}

/// One request in flight on a connection, until its response body is done
/// (or dropped). `sending`: its response body waits for hyper to take the
/// next frame (from when the response is handed over, and after each frame,
/// until the body is polled and has nothing yet: then it waits for the
/// upstream, whose own timeouts apply).
struct InFlight {
    counter: Arc<RequestCounter>,
    sending: bool,
}

impl InFlight {
    fn start(counter: &Arc<RequestCounter>) -> Self {
        counter.in_flight.fetch_add(1, Ordering::SeqCst);
        counter.touch();
        Self {
            counter: counter.clone(),
            sending: false,
        }
    }

    fn set_sending(&mut self, sending: bool) {
        if self.sending != sending {
            self.sending = sending;
            if sending {
                self.counter.sending.fetch_add(1, Ordering::SeqCst);
            } else {
                self.counter.sending.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set_sending(false);
        self.counter.touch();
        self.counter.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it
    /// ends, and counts each frame hyper takes as progress.
    struct TrackedBody {
        #[pin]
        inner: Body,
        guard: Option<InFlight>,
    }
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BodyError>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        match (&frame, this.guard.as_mut()) {
            (std::task::Poll::Ready(Some(_)), Some(in_flight)) => {
                in_flight.counter.touch();
                in_flight.set_sending(true);
            }
            (std::task::Poll::Pending, Some(in_flight)) => in_flight.set_sending(false),
            (std::task::Poll::Pending, None) => {}
            _ => {
                this.guard.take();
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts an open connection in `rungen_gateway_connections_open` for as
/// long as it lives (also when its task is aborted).
struct OpenConnection;

impl OpenConnection {
    fn count() -> Self {
        metrics::gauge!("rungen_gateway_connections_open").increment(1.0);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("rungen_gateway_connections_open").decrement(1.0);
    }
}

/// Holds one of a source IP's connection slots.
struct PerIpGuard {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PerIpGuard {
    fn acquire(
        counts: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
        max: usize,
    ) -> Option<PerIpGuard> {
        let mut map = crate::sync::lock(counts);
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerIpGuard {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut map = crate::sync::lock(&self.counts);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for HyperAdapter {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedResponse;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(|b| b.map_err(BodyError::new).boxed_unsync());
        req.extensions_mut().insert(RequestContext {
            peer: Some(self.peer),
            cert: self.identity.clone(),
            ..RequestContext::default()
        });
        let served = self.requests.served.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.requests.limit > 0
            && served >= self.requests.limit
            && req.version() <= http::Version::HTTP_11;
        let guard = InFlight::start(&self.requests);
        let fut = self.local.call(&self.service, req);
        TrackedResponse {
            inner: fut,
            guard: Some(guard),
            last,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of a request counted as in flight until its
    /// body's last frame (or until hyper drops it).
    struct TrackedResponse {
        #[pin]
        inner: BoxFuture<'static, Result<Response<Body>, Infallible>>,
        guard: Option<InFlight>,
        last: bool,
    }
}

impl Future for TrackedResponse {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Poll::Ready(Ok(mut res)) = this.inner.poll(cx) else {
            return Poll::Pending;
        };
        if *this.last {
            // The connection's last request: hyper closes it after this response.
            res.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        let mut guard = this.guard.take();
        if let Some(g) = guard.as_mut() {
            g.set_sending(true);
        }
        Poll::Ready(Ok(res.map(|inner| TrackedBody { inner, guard })))
    }
}
