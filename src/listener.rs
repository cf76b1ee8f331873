//! Accept loop: binds, accepts, serves HTTP/1.1 and HTTP/2 (h2c prior
//! knowledge) with hyper-util's auto builder, bounds connections and header
//! reads, and drains in-flight requests on shutdown up to a deadline.
//! It never looks at requests: it hands each one to the current gateway
//! service (swappable, so a config reload applies to the next request).

use crate::config::ServerConfig;
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
use hyper_util::server::graceful::GracefulShutdown;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// hyper's default (and inline) limit on request header fields.
const HYPER_MAX_HEADERS: usize = 100;

/// The per-connection protocol settings, from `[server]`.
fn connection_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
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

/// Serves connections from `listener` until `shutdown` resolves, then drains
/// open connections for at most `cfg.shutdown_timeout`.
pub async fn serve(
    listener: TcpListener,
    service: Arc<ArcSwap<GatewayService>>,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let builder = Arc::new(connection_builder(&cfg));
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    let per_ip_counts: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    tokio::pin!(shutdown);

    loop {
        // At the connection cap, stop accepting: new connections wait in the
        // kernel backlog instead of taking memory here.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
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
        // One source IP may not take every connection slot.
        let Some(per_ip) =
            PerIpGuard::acquire(&per_ip_counts, peer.ip(), cfg.max_connections_per_ip)
        else {
            metrics::counter!("rungen_gateway_connections_refused_total", "reason" => "per_ip")
                .increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        metrics::gauge!("rungen_gateway_connections_open").increment(1.0);
        let requests = Arc::new(RequestCounter {
            served: AtomicU64::new(0),
            limit: cfg.max_requests_per_connection,
        });
        let service = service.clone();
        let builder = builder.clone();
        let graceful_watcher = graceful.watcher();
        let tls = tls.clone();
        let handshake_timeout = cfg.header_read_timeout;
        tokio::spawn(async move {
            match tls {
                None => {
                    let adapter = HyperAdapter {
                        service,
                        local: Arc::default(),
                        peer,
                        identity: None,
                        requests,
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), adapter);
                    if let Err(e) = graceful_watcher.watch(conn.into_owned()).await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                }
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            metrics::counter!("rungen_gateway_tls_handshake_failures_total")
                                .increment(1);
                            metrics::gauge!("rungen_gateway_connections_open").decrement(1.0);
                            drop(per_ip);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            metrics::counter!("rungen_gateway_tls_handshake_failures_total")
                                .increment(1);
                            metrics::gauge!("rungen_gateway_connections_open").decrement(1.0);
                            drop(per_ip);
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
                        requests,
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), adapter);
                    if let Err(e) = graceful_watcher.watch(conn.into_owned()).await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                }
            }
            metrics::gauge!("rungen_gateway_connections_open").decrement(1.0);
            drop(per_ip);
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!("stopped accepting; draining open connections");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(cfg.shutdown_timeout) => {
            tracing::warn!(timeout = ?cfg.shutdown_timeout, "drain deadline reached; closing remaining connections");
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
        let mut local = self.0.lock().unwrap_or_else(|e| e.into_inner());
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

/// Requests served on one connection, and the most it may serve.
struct RequestCounter {
    served: AtomicU64,
    limit: u64,
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
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
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
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for HyperAdapter {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(|b| b.map_err(BodyError::new).boxed_unsync());
        req.extensions_mut().insert(PeerAddr(self.peer));
        if let Some(id) = &self.identity {
            req.extensions_mut().insert(id.clone());
        }
        let served = self.requests.served.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.requests.limit > 0
            && served >= self.requests.limit
            && req.version() <= http::Version::HTTP_11;
        let fut = self.local.call(&self.service, req);
        if !last {
            return fut;
        }
        // The connection's last request: hyper closes it after this response.
        Box::pin(async move {
            let mut res = fut.await?;
            res.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            Ok(res)
        })
    }
}

/// The TCP peer of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);
