//! Tracing setup and the access log: one structured line per request, and the
//! request id (`x-request-id`, kept from the caller if well-formed, otherwise
//! generated) on the request going upstream and on every response.

use crate::cache::CacheLog;
use crate::caller_auth::CallerLog;
use crate::config::LogFormat;
use crate::error::{Body, ErrorKind};
use crate::routing::Route;
use crate::upstream::UpstreamInfo;
use futures_util::future::{BoxFuture, FutureExt};
use http::{HeaderName, HeaderValue, Request, Response};
use std::task::{Context, Poll};
use std::time::Instant;
use tracing_subscriber::EnvFilter;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// `00-<32 hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>`.
pub fn valid_traceparent(v: &[u8]) -> bool {
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    v.len() == 55
        && &v[..3] == b"00-"
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(&v[3..35])
        && hex(&v[36..52])
        && hex(&v[53..55])
        && v[3..35].iter().any(|c| *c != b'0')
        && v[36..52].iter().any(|c| *c != b'0')
}

fn new_traceparent(request_id: &HeaderValue) -> HeaderValue {
    let id = request_id.as_bytes();
    let trace_id =
        if id.len() == 32 && valid_traceparent(&[b"00-", id, b"-0000000000000001-01"].concat()) {
            String::from_utf8_lossy(id).into_owned()
        } else {
            format!("{:032x}", rand::Rng::random::<u128>(&mut rand::rng()) | 1)
        };
    let parent = format!("{:016x}", rand::Rng::random::<u64>(&mut rand::rng()) | 1);
    HeaderValue::from_str(&format!("00-{trace_id}-{parent}-01")).unwrap_or(
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    )
}

/// Installs the global subscriber. `RUST_LOG` overrides the configured level.
/// Returns false if one was already installed (tests, the demo).
pub fn init(level: &str, format: LogFormat) -> bool {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
            .is_ok(),
        LogFormat::Pretty => builder.try_init().is_ok(),
    }
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        let seconds = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        metrics::gauge!("rungen_gateway_build_info", "version" => env!("CARGO_PKG_VERSION"))
            .set(1.0);
        handle
    })
}

/// `1xx`..`5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A caller-supplied request id is kept only if it is short and plain, so it
/// cannot inject anything into logs or upstream headers.
fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// 32 lower-case hex digits from the thread-local CSPRNG (no syscall per
/// request, unlike `getrandom`-backed UUIDs).
fn new_request_id() -> HeaderValue {
    use rand::Rng;
    let id: u128 = rand::rng().random::<u128>() | 1;
    HeaderValue::from_str(&format!("{id:032x}")).unwrap_or(HeaderValue::from_static("-"))
}

#[derive(Clone, Copy, Debug, Default)]
pub struct AccessLogLayer;

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner }
    }
}

#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
}

impl<S, E> tower::Service<Request<Body>> for AccessLog<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = E>,
    S::Future: Send + 'static,
    E: Send + 'static,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = BoxFuture<'static, Result<Response<Body>, E>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let request_id = match req.headers().get(X_REQUEST_ID) {
            Some(v) if valid_request_id(v) => v.clone(),
            _ => new_request_id(),
        };
        req.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        // W3C trace context: a valid caller traceparent continues the trace;
        // anything else is replaced by a new one whose trace id is the request id.
        let traceparent = match req.headers().get(TRACEPARENT) {
            Some(v) if valid_traceparent(v.as_bytes()) => v.clone(),
            _ => {
                // A new trace: the caller's trace state belongs to no trace of ours.
                req.headers_mut().remove(TRACESTATE);
                new_traceparent(&request_id)
            }
        };
        let trace_id = String::from_utf8_lossy(&traceparent.as_bytes()[3..35]).into_owned();
        req.headers_mut().insert(TRACEPARENT, traceparent);
        let method = req.method().clone();
        metrics::gauge!("rungen_gateway_in_flight_requests").increment(1.0);
        // The path only: query strings are not logged.
        let path = req.uri().path().to_owned();
        let fut = self.inner.call(req);
        fut.map(move |res| {
            metrics::gauge!("rungen_gateway_in_flight_requests").decrement(1.0);
            let mut res = res?;
            res.headers_mut().insert(X_REQUEST_ID, request_id.clone());
            let ext = res.extensions();
            let caller = ext.get::<CallerLog>();
            let client = caller.map_or("-", |c| c.client.name.as_str());
            let scope = caller
                .and_then(|c| c.scope.as_ref())
                .map_or("-", |s| s.name.as_str());
            let route = ext.get::<Route>().map_or("-", |r| r.as_str());
            let error = ext.get::<ErrorKind>();
            let upstream = ext.get::<UpstreamInfo>();
            let cache = ext.get::<CacheLog>().map_or("-", |c| c.0);
            let rate_limit = ext
                .get::<crate::rate_limit::RateLimitLog>()
                .map_or("-", |r| r.0);
            tracing::info!(
                target: "rungen_gateway::access",
                request_id = %request_id.to_str().unwrap_or("-"),
                trace_id = %trace_id,
                method = %method,
                path = %path,
                route,
                status = res.status().as_u16(),
                client,
                scope,
                cache,
                rate_limit,
                error = error.map_or("-", |e| e.kind),
                error_source = error.map_or("-", |e| e.source.as_str()),
                upstream_status = upstream.map_or(0, |u| u.status),
                upstream_ms = upstream.map_or(0.0, |u| u.latency.as_secs_f64() * 1000.0),
                latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
            let status = res.status().as_u16();
            metrics::counter!(
                "rungen_gateway_requests_total",
                "route" => route.to_string(),
                "method" => method.as_str().to_string(),
                "status_class" => status_class(status),
                "client" => client.to_string(),
                "scope" => scope.to_string(),
                "cache" => cache,
            )
            .increment(1);
            metrics::histogram!(
                "rungen_gateway_request_duration_seconds",
                "route" => route.to_string(),
                "method" => method.as_str().to_string(),
            )
            .record(started.elapsed().as_secs_f64());
            if let Some(e) = error {
                metrics::counter!(
                    "rungen_gateway_errors_total",
                    "kind" => e.kind,
                    "source" => e.source.as_str(),
                    "scope" => scope.to_string(),
                )
                .increment(1);
            }
            Ok(res)
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_validated() {
        assert!(valid_request_id(&HeaderValue::from_static("abc-123_x.y:z")));
        assert!(!valid_request_id(&HeaderValue::from_static("")));
        assert!(!valid_request_id(&HeaderValue::from_static("a b")));
        assert!(!valid_request_id(&HeaderValue::from_static("a\"b")));
        let long = "a".repeat(129);
        assert!(!valid_request_id(
            &HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static(""))
        ));
        assert!(valid_request_id(&new_request_id()));
    }

    #[test]
    fn traceparent_is_validated_and_generated_from_the_request_id() {
        assert!(valid_traceparent(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(b"garbage"));
        let rid = new_request_id();
        let tp = new_traceparent(&rid);
        assert!(valid_traceparent(tp.as_bytes()));
        assert_eq!(&tp.as_bytes()[3..35], rid.as_bytes());
    }
}
