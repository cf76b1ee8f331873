//! The upstream step: a pooled hyper-util client (rustls via hyper-rustls,
//! webpki roots plus an optional extra CA file) that sends the prepared
//! request to the configured RunGen base URL and tags every failure with its
//! source. It knows neither callers nor the cache.

use crate::body::{BodyTimeout, IdleTimeout, caused_by};
use crate::config::UpstreamConfig;
use crate::error::{Body, BodyError, GatewayError, parse_retry_after, retry_after_value};
use crate::hop::strip_hop_by_hop;
use crate::rate_limit::RetryAllowance;
use crate::upstream_credentials::{X_API_KEY, X_TEAM_ID};
use futures_util::future::{BoxFuture, FutureExt};
use http::Method;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::retry::budget::{Budget, TpsBudget};

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// What the upstream answered, put on the response for logs and metrics.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamInfo {
    pub status: u16,
    pub latency: Duration,
    /// The upstream set a cookie (removed: a cookie issued to the holder of
    /// the scope's key is not the caller's). Such an answer is not stored.
    pub set_cookie: bool,
}

/// `Set-Cookie2` (obsolete, RFC 2965): removed with `Set-Cookie`.
const SET_COOKIE2: http::HeaderName = http::HeaderName::from_static("set-cookie2");

/// Reads a PEM file of CA certificates (at least one).
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The crypto provider used everywhere in the gateway (one in the tree: ring).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the pooled upstream client.
pub fn build_client(cfg: &UpstreamConfig) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &cfg.ca_file {
        for cert in load_ca_file(ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: invalid CA certificate: {e}", ca.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));

    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);

    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}

/// The innermost service: forwards to the upstream.
#[derive(Clone)]
pub struct Upstream {
    client: HttpClient,
    scheme: Scheme,
    authority: Authority,
    base_path: Arc<str>,
    request_timeout: Duration,
    body_timeout: Duration,
    retries: u32,
    retry_backoff: Duration,
    /// Retries may add at most ~20% to the upstream load (tower's TPS budget).
    retry_budget: Arc<TpsBudget>,
}

impl Upstream {
    pub fn new(client: HttpClient, cfg: &UpstreamConfig) -> Self {
        Self {
            client,
            scheme: cfg.scheme.clone(),
            authority: cfg.authority.clone(),
            base_path: Arc::from(cfg.base_path.as_str()),
            request_timeout: cfg.request_timeout,
            body_timeout: cfg.body_timeout,
            retries: cfg.retries,
            retry_backoff: cfg.retry_backoff,
            retry_budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 5, 0.2)),
        }
    }

    fn upstream_uri(&self, uri: &Uri) -> Result<Uri, GatewayError> {
        let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let pq = if self.base_path.is_empty() {
            PathAndQuery::try_from(pq)
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.base_path))
        }
        .map_err(|_| GatewayError::BadRequest("invalid path"))?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| GatewayError::BadRequest("invalid path"))
    }
}

/// Maps a client error to its gateway error, looking through the source chain.
fn classify_error(err: &hyper_util::client::legacy::Error) -> GatewayError {
    if caused_by::<http_body_util::LengthLimitError>(err) {
        return GatewayError::PayloadTooLarge;
    }
    if caused_by::<BodyTimeout>(err) {
        return GatewayError::RequestTimeout;
    }
    if err.is_connect() {
        GatewayError::UpstreamConnect
    } else {
        GatewayError::UpstreamProtocol
    }
}

impl tower::Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<Response<Body>, GatewayError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let uri = match self.upstream_uri(req.uri()) {
            Ok(uri) => uri,
            Err(e) => return std::future::ready(Err(e)).boxed(),
        };
        *req.uri_mut() = uri;
        // The client speaks HTTP/1.1 or h2 upstream as negotiated, whatever the caller used.
        *req.version_mut() = http::Version::HTTP_11;
        // Only idempotent reads without a body are retried: never a write
        // (POST /app and run_async are not idempotent and cost money).
        let retryable =
            matches!(*req.method(), Method::GET | Method::HEAD) && req.body().is_end_stream();
        let upload = (!req.body().is_end_stream()).then(|| {
            let body = std::mem::replace(req.body_mut(), crate::error::empty_body());
            let (body, upload) = crate::body::ToUpstream::wrap(body);
            *req.body_mut() = body;
            upload
        });
        let this = self.clone();
        this.retry_budget.deposit();
        async move {
            let started = Instant::now();
            let deadline = started + this.request_timeout;
            let template = retryable.then(|| head_of(&req));
            let mut next = Some(req);
            let mut attempt = 0u32;
            loop {
                let Some(req) = next.take() else {
                    return Err(GatewayError::Internal);
                };
                let remaining = deadline.saturating_duration_since(Instant::now());
                let outcome = match tokio::time::timeout(remaining, this.client.request(req)).await
                {
                    // Still waiting on the caller's upload: the caller's
                    // timeout, not the upstream's (no circuit breaker count).
                    Err(_) if upload.as_ref().is_some_and(|u| u.waiting_on_caller()) => {
                        return Err(GatewayError::RequestTimeout);
                    }
                    Err(_) => return Err(GatewayError::UpstreamTimeout),
                    Ok(Err(e)) => {
                        let mapped = classify_error(&e);
                        tracing::warn!(error = %e, kind = mapped.as_str(), attempt, "upstream request failed");
                        Err(mapped)
                    }
                    Ok(Ok(res)) => Ok(res),
                };
                let worth_retrying = match &outcome {
                    Err(GatewayError::UpstreamConnect | GatewayError::UpstreamProtocol) => true,
                    // A 503 with Retry-After asked us to come back later, not now.
                    Ok(res) => {
                        matches!(res.status().as_u16(), 502..=504)
                            && !(res.status() == StatusCode::SERVICE_UNAVAILABLE
                                && res.headers().contains_key(http::header::RETRY_AFTER))
                    }
                    Err(_) => false,
                };
                if worth_retrying && attempt < this.retries {
                    if let Some(template) = &template {
                        let backoff = jittered(
                            this.retry_backoff
                                .saturating_mul(2u32.saturating_pow(attempt))
                                .min(MAX_BACKOFF),
                        );
                        // A retry is one more request to the upstream: the
                        // scope's budget (when it has one) pays for it too.
                        let in_time = Instant::now() + backoff < deadline;
                        let allowed = in_time
                            && match template.extensions.get::<RetryAllowance>() {
                                Some(allowance) => allowance.take().await,
                                None => true,
                            };
                        if allowed && this.retry_budget.withdraw() {
                            metrics::counter!("rungen_gateway_upstream_retries_total").increment(1);
                            tokio::time::sleep(backoff).await;
                            attempt += 1;
                            next = Some(rebuild(template));
                            continue;
                        }
                    }
                }
                let res = outcome?;
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                if parts.status == StatusCode::TOO_MANY_REQUESTS {
                    // Every 429 a caller sees says when to come back, in whole
                    // seconds, at least 1 (RunGen documents no rate-limit
                    // headers; an HTTP-date or 0 is made a number too).
                    let wait = parse_retry_after(&parts.headers, std::time::SystemTime::now())
                        .unwrap_or(Duration::from_secs(1));
                    parts
                        .headers
                        .insert(http::header::RETRY_AFTER, retry_after_value(wait));
                }
                // Nothing of our upstream credentials is ever echoed back to a
                // caller: no echoed key, and no session the upstream opened
                // for the holder of the scope's key.
                parts.headers.remove(X_API_KEY);
                parts.headers.remove(X_TEAM_ID);
                let set_cookie = parts.headers.remove(http::header::SET_COOKIE).is_some()
                    | parts.headers.remove(SET_COOKIE2).is_some();
                // CORS is this gateway's to answer (its allowed origins), never
                // the upstream's: its `Access-Control-*` would let any origin in.
                crate::hop::strip_prefixed(&mut parts.headers, "access-control-");
                let info = UpstreamInfo {
                    status: parts.status.as_u16(),
                    latency: started.elapsed(),
                    set_cookie,
                };
                parts.extensions.insert(info);
                // An upstream that stops sending mid-body must not hold the request forever.
                let body = IdleTimeout::wrap(
                    body.map_err(BodyError::new).boxed_unsync(),
                    this.body_timeout,
                );
                return Ok(Response::from_parts(parts, body));
            }
        }
        .boxed()
    }
}

/// The parts of a bodiless request needed to send it again.
struct Head {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
    extensions: http::Extensions,
}

fn head_of(req: &Request<Body>) -> Head {
    Head {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
        extensions: req.extensions().clone(),
    }
}

fn rebuild(head: &Head) -> Request<Body> {
    let mut req = Request::new(crate::error::empty_body());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.headers_mut() = head.headers.clone();
    *req.extensions_mut() = head.extensions.clone();
    req
}

/// `base` scaled by a random factor in [0.5, 1.5).
/// Longest wait before one retry (the deadline ends them sooner anyway).
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn jittered(base: Duration) -> Duration {
    use rand::Rng;
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}
