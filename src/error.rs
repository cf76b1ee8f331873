//! The one table from every refusal or failure to a status and a JSON body.
//!
//! Layers refuse a request by answering `error_response(&GatewayError::..)`
//! themselves (a refusal is a response), and report failures as
//! `Err(GatewayError)`, which [`RescueLayer`] turns into a response with the
//! same function. No message here ever contains a secret: variants carry only
//! names from the config (scope names), never keys or tokens.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use std::borrow::Cow;
use std::task::{Context, Poll};
use std::time::Duration;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error of a body inside the gateway. A concrete type rather than a
/// `Box<dyn Error>`: with a trait object in the body type, rustc cannot prove
/// `Send` for futures of generic services whose request type contains it.
#[derive(Debug)]
pub struct BodyError(BoxError);

impl BodyError {
    pub fn new(e: impl Into<BoxError>) -> Self {
        Self(e.into())
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The body type on every request and response inside the gateway.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// A body from bytes.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty_body() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Who is to blame for a failure, for logs and metrics (pingora's `ErrorSource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The caller sent something we refuse.
    Caller,
    /// The upstream failed or refused us.
    Upstream,
    /// Our own fault.
    Gateway,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Caller => "caller",
            ErrorSource::Upstream => "upstream",
            ErrorSource::Gateway => "gateway",
        }
    }
}

/// Every way a request can end without a normal upstream answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("URI too long")]
    UriTooLong,
    #[error("ambiguous message framing")]
    AmbiguousFraming,
    #[error("chunked request bodies are not accepted")]
    LengthRequired,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("missing or unknown credential")]
    Unauthenticated,
    #[error("team scope not allowed for this client")]
    ScopeForbidden,
    #[error("method not allowed for this client")]
    MethodForbidden,
    #[error("origin not allowed")]
    OriginForbidden,
    #[error("rate limited by policy {policy}")]
    RateLimited {
        policy: &'static str,
        retry_after: Duration,
    },
    #[error("overloaded")]
    Overloaded { retry_after: Duration },
    #[error("upstream connection failed")]
    UpstreamConnect,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("upstream rejected the gateway credential for scope {scope}")]
    UpstreamCredentialRejected { scope: String },
    #[error("upstream answered with an invalid response")]
    UpstreamProtocol,
    #[error("the request body could not be read")]
    RequestBody,
    #[error("the request body stalled")]
    RequestTimeout,
    #[error("not in the cache (only-if-cached)")]
    NotCached,
    #[error("the upstream is failing; circuit open for scope {scope}")]
    CircuitOpen {
        scope: String,
        retry_after: Duration,
    },
    #[error("internal error")]
    Internal,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::RouteNotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BadRequest(_) | GatewayError::AmbiguousFraming => StatusCode::BAD_REQUEST,
            GatewayError::LengthRequired => StatusCode::LENGTH_REQUIRED,
            GatewayError::UriTooLong => StatusCode::URI_TOO_LONG,
            GatewayError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Unauthenticated => StatusCode::UNAUTHORIZED,
            GatewayError::ScopeForbidden
            | GatewayError::MethodForbidden
            | GatewayError::OriginForbidden => StatusCode::FORBIDDEN,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamConnect
            | GatewayError::UpstreamCredentialRejected { .. }
            | GatewayError::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout | GatewayError::NotCached => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::RequestBody => StatusCode::BAD_REQUEST,
            GatewayError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn source(&self) -> ErrorSource {
        match self {
            GatewayError::UpstreamConnect
            | GatewayError::UpstreamTimeout
            | GatewayError::UpstreamCredentialRejected { .. }
            | GatewayError::UpstreamProtocol
            | GatewayError::CircuitOpen { .. } => ErrorSource::Upstream,
            GatewayError::Internal | GatewayError::Overloaded { .. } => ErrorSource::Gateway,
            _ => ErrorSource::Caller,
        }
    }

    /// A stable name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            GatewayError::RouteNotFound => "route_not_found",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::UriTooLong => "uri_too_long",
            GatewayError::AmbiguousFraming => "ambiguous_framing",
            GatewayError::LengthRequired => "length_required",
            GatewayError::PayloadTooLarge => "payload_too_large",
            GatewayError::Unauthenticated => "unauthenticated",
            GatewayError::ScopeForbidden => "scope_forbidden",
            GatewayError::MethodForbidden => "method_forbidden",
            GatewayError::OriginForbidden => "origin_forbidden",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::Overloaded { .. } => "overloaded",
            GatewayError::UpstreamConnect => "upstream_connect",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamCredentialRejected { .. } => "upstream_credential_rejected",
            GatewayError::UpstreamProtocol => "upstream_protocol",
            GatewayError::RequestBody => "request_body",
            GatewayError::RequestTimeout => "request_timeout",
            GatewayError::CircuitOpen { .. } => "circuit_open",
            GatewayError::NotCached => "not_cached",
            GatewayError::Internal => "internal",
        }
    }

    /// The message sent to the caller: says what went wrong, helps no attacker.
    pub fn message(&self) -> Cow<'static, str> {
        match self {
            GatewayError::RouteNotFound => "no such route on this gateway".into(),
            GatewayError::MethodNotAllowed => "method not allowed".into(),
            GatewayError::BadRequest(why) => format!("malformed request: {why}").into(),
            GatewayError::UriTooLong => "request URI is too long".into(),
            GatewayError::AmbiguousFraming => {
                "malformed request: ambiguous or unsupported body framing".into()
            }
            GatewayError::LengthRequired => {
                "send request bodies with Content-Length (chunked uploads are not accepted)".into()
            }
            GatewayError::PayloadTooLarge => "request body is too large".into(),
            GatewayError::Unauthenticated => {
                "missing or invalid credential: send Authorization: Bearer <token> or x-api-key: <token>".into()
            }
            GatewayError::ScopeForbidden => {
                "this client may not use the team scope named by x-team-id".into()
            }
            GatewayError::MethodForbidden => "this client may not use this method".into(),
            GatewayError::OriginForbidden => "this origin is not allowed".into(),
            GatewayError::RateLimited { policy, .. } => {
                format!("rate limit exceeded (policy \"{policy}\")").into()
            }
            GatewayError::Overloaded { .. } => "gateway is overloaded, retry later".into(),
            GatewayError::UpstreamConnect => "could not connect to the upstream API".into(),
            GatewayError::UpstreamTimeout => "the upstream API did not answer in time".into(),
            GatewayError::UpstreamCredentialRejected { scope } => {
                format!("upstream rejected the gateway credential for scope {scope}").into()
            }
            GatewayError::UpstreamProtocol => {
                "the upstream API sent an invalid response or closed the connection".into()
            }
            GatewayError::RequestBody => "the request body could not be read".into(),
            GatewayError::RequestTimeout => "the request body was not received in time".into(),
            GatewayError::CircuitOpen { scope, .. } => format!(
                "the upstream API is failing for scope {scope}; retry later"
            )
            .into(),
            GatewayError::NotCached => {
                "no stored response to answer with (the request asked only-if-cached)".into()
            }
            GatewayError::Internal => "internal gateway error".into(),
        }
    }
}

/// Marks a response produced by [`error_response`], for the access log
/// ([`crate::telemetry::LogFields::error`]).
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind {
    pub kind: &'static str,
    pub source: ErrorSource,
}

/// The one function from a refusal or failure to a response.
pub fn error_response(err: &GatewayError) -> Response<Body> {
    let body = serde_json::json!({ "error": err.message() }).to_string();
    let mut res = Response::new(full_body(body));
    *res.status_mut() = err.status();
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match err {
        // The rest of the connection cannot be trusted: close it after this answer.
        GatewayError::AmbiguousFraming | GatewayError::LengthRequired => {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        GatewayError::Unauthenticated => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"rungen-gateway\""),
            );
        }
        GatewayError::RateLimited { retry_after, .. }
        | GatewayError::Overloaded { retry_after }
        | GatewayError::CircuitOpen { retry_after, .. } => {
            headers.insert(header::RETRY_AFTER, retry_after_value(*retry_after));
        }
        _ => {}
    }
    crate::telemetry::LogFields::of(&mut res).error = Some(ErrorKind {
        kind: err.as_str(),
        source: err.source(),
    });
    res
}

/// The longest `Retry-After` taken from an upstream (one day): a larger or
/// absurd value must not pause a scope for ever or overflow time arithmetic.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// An upstream's `Retry-After` (seconds or an HTTP date), capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(
    headers: &http::HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    let wait = match v.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs.min(MAX_RETRY_AFTER.as_secs())),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// An integer `Retry-After` of at least one second, rounded up.
pub fn retry_after_value(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

// ---------------------------------------------------------------------------
// RescueLayer: turns Err(GatewayError) from anything inside into a response.

/// Where failures become answers ([`error_response`]). `E` is only the error
/// type the steps above expect; a `Rescue` never returns one.
#[derive(Debug)]
pub struct RescueLayer<E = std::convert::Infallible>(std::marker::PhantomData<fn() -> E>);

impl<E> RescueLayer<E> {
    pub fn new() -> Self {
        RescueLayer(std::marker::PhantomData)
    }
}

impl<E> Default for RescueLayer<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E> Clone for RescueLayer<E> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<S, E> tower::Layer<S> for RescueLayer<E> {
    type Service = Rescue<S, E>;
    fn layer(&self, inner: S) -> Rescue<S, E> {
        Rescue {
            inner,
            _error: std::marker::PhantomData,
        }
    }
}

#[derive(Debug)]
pub struct Rescue<S, E = std::convert::Infallible> {
    inner: S,
    _error: std::marker::PhantomData<fn() -> E>,
}

impl<S: Clone, E> Clone for Rescue<S, E> {
    fn clone(&self) -> Self {
        Rescue {
            inner: self.inner.clone(),
            _error: std::marker::PhantomData,
        }
    }
}

impl<S: crate::step::Step, E: Send + 'static> tower::Service<http::Request<Body>> for Rescue<S, E> {
    type Response = Response<Body>;
    type Error = E;
    type Future = crate::step::StepFuture<Response<Body>, E>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Inner services are always ready (no backpressure inside the chain);
        // an error here is still answered per request below.
        let _ = self.inner.poll_ready(cx);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        self.inner.call(req).map(|res| {
            Ok(match res {
                Ok(res) => res,
                Err(err) => error_response(&err),
            })
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_an_integer_of_at_least_one() {
        assert_eq!(retry_after_value(Duration::ZERO), "1");
        assert_eq!(retry_after_value(Duration::from_millis(10)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(1001)), "2");
        assert_eq!(retry_after_value(Duration::from_secs(3)), "3");
    }

    #[tokio::test]
    async fn every_error_is_json_with_its_status() {
        let all = [
            GatewayError::RouteNotFound,
            GatewayError::Unauthenticated,
            GatewayError::ScopeForbidden,
            GatewayError::UpstreamTimeout,
            GatewayError::NotCached,
            GatewayError::UpstreamCredentialRejected {
                scope: "acme".into(),
            },
        ];
        for err in all {
            let res = error_response(&err);
            assert_eq!(res.status(), err.status());
            assert_eq!(res.headers()["content-type"], "application/json");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["error"].as_str().unwrap().len() > 5);
        }
        let res = error_response(&GatewayError::Unauthenticated);
        assert!(
            res.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
    }
}
