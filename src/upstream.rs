//! The upstream step: a pooled hyper-util client (rustls via hyper-rustls,
//! webpki roots plus an optional extra CA file) that sends the prepared
//! request to the configured RunGen base URL and tags every failure with its
//! source. It knows neither callers nor the cache.

use crate::config::UpstreamConfig;
use crate::error::{Body, BodyError, GatewayError};
use crate::hop::strip_hop_by_hop;
use futures_util::future::{BoxFuture, FutureExt};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
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

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// What the upstream answered, put on the response for logs and metrics.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamInfo {
    pub status: u16,
    pub latency: Duration,
}

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
}

impl Upstream {
    pub fn new(client: HttpClient, cfg: &UpstreamConfig) -> Self {
        Self {
            client,
            scheme: cfg.scheme.clone(),
            authority: cfg.authority.clone(),
            base_path: Arc::from(cfg.base_path.as_str()),
            request_timeout: cfg.request_timeout,
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
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            return GatewayError::PayloadTooLarge;
        }
        source = e.source();
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
        let client = self.client.clone();
        let timeout = self.request_timeout;
        async move {
            let started = Instant::now();
            let res = match tokio::time::timeout(timeout, client.request(req)).await {
                Err(_) => return Err(GatewayError::UpstreamTimeout),
                Ok(Err(e)) => {
                    let mapped = classify_error(&e);
                    tracing::warn!(error = %e, kind = mapped.as_str(), "upstream request failed");
                    return Err(mapped);
                }
                Ok(Ok(res)) => res,
            };
            let info = UpstreamInfo {
                status: res.status().as_u16(),
                latency: started.elapsed(),
            };
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.extensions.insert(info);
            let body = body.map_err(BodyError::new).boxed_unsync();
            Ok(Response::from_parts(parts, body))
        }
        .boxed()
    }
}
