//! Credential injection: on the way upstream only, remove everything the
//! caller sent that could carry or forge a credential or a routing hint, then
//! set the scope's RunGen key (`x-api-key`) and, for team scopes, `x-team-id`.
//!
//! Fails closed: without a `Caller` (a wiring bug) nothing goes upstream. An
//! upstream 403 means our key for the scope is wrong, not the caller's: it is
//! answered as 502 and logged at error level with the scope name.

use crate::caller_auth::Caller;
use crate::context::RequestContext;
use crate::error::{Body, GatewayError};
use crate::hop::strip_hop_by_hop_except;
use crate::telemetry::{TRACEPARENT, X_REQUEST_ID};
use futures_util::future::{BoxFuture, FutureExt};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use std::task::{Context, Poll};

/// The RunGen credential headers (also a caller's `x-api-key` token and team
/// choice on the way in).
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const X_TEAM_ID: HeaderName = HeaderName::from_static("x-team-id");
/// The client address as this or that proxy or CDN spells it: the caller
/// may claim any of them, and the upstream must not read the caller's claim
/// as ours (the gateway's own view of the caller is not forwarded at all).
const CLIENT_ADDRESS_HINTS: [HeaderName; 7] = [
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("x-original-forwarded-for"),
];

/// Headers some server stacks take as the "real" method or URL: a caller
/// must not get past the method and path checks with them.
pub const OVERRIDES: [HeaderName; 6] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-original-method"),
];

/// Removes caller-supplied credentials, proxy hints, method and URL
/// overrides and hop-by-hop headers.
pub fn strip_caller_headers(headers: &mut HeaderMap) {
    // The request id and trace context are the gateway's own by now (the
    // access-log step checked or replaced the caller's): a caller's
    // `Connection: x-request-id` must not take them off the upstream request.
    strip_hop_by_hop_except(headers, &[X_REQUEST_ID, TRACEPARENT]);
    for name in [
        X_API_KEY,
        X_TEAM_ID,
        header::AUTHORIZATION,
        header::COOKIE,
        header::HOST,
        header::FORWARDED,
    ]
    .into_iter()
    .chain(CLIENT_ADDRESS_HINTS)
    .chain(OVERRIDES)
    {
        headers.remove(name);
    }
    crate::hop::strip_prefixed(headers, "x-forwarded-");
}

/// Sets the scope's upstream credential headers.
pub fn inject(headers: &mut HeaderMap, caller: &Caller) -> Result<(), GatewayError> {
    let mut key =
        HeaderValue::from_str(caller.scope.api_key.expose()).map_err(|_| GatewayError::Internal)?;
    // Never index the key in HPACK tables.
    key.set_sensitive(true);
    headers.insert(X_API_KEY, key);
    if let Some(team_id) = &caller.scope.team_id {
        headers.insert(X_TEAM_ID, team_id.clone());
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, Default)]
pub struct UpstreamCredentialsLayer;

impl<S> tower::Layer<S> for UpstreamCredentialsLayer {
    type Service = UpstreamCredentials<S>;
    fn layer(&self, inner: S) -> UpstreamCredentials<S> {
        UpstreamCredentials { inner }
    }
}

#[derive(Clone, Debug)]
pub struct UpstreamCredentials<S> {
    inner: S,
}

impl<S> tower::Service<Request<Body>> for UpstreamCredentials<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<Response<Body>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(caller) = RequestContext::of(req.extensions()).caller.clone() else {
            tracing::error!("request reached credential injection without a caller");
            return std::future::ready(Err(GatewayError::Internal)).boxed();
        };
        strip_caller_headers(req.headers_mut());
        crate::telemetry::ensure_traceparent(req.headers_mut());
        if let Err(e) = inject(req.headers_mut(), &caller) {
            tracing::error!(scope = %caller.scope.name, "the scope's API key is not a valid header value");
            return std::future::ready(Err(e)).boxed();
        }
        let fut = self.inner.call(req);
        fut.map(move |res| {
            let scope = caller.scope.name.clone();
            let res = match res {
                Ok(res) => res,
                Err(e) => {
                    metrics::counter!(
                        "rungen_gateway_upstream_requests_total",
                        "scope" => scope,
                        "outcome" => e.as_str(),
                    )
                    .increment(1);
                    return Err(e);
                }
            };
            metrics::counter!(
                "rungen_gateway_upstream_requests_total",
                "scope" => scope.clone(),
                "outcome" => crate::telemetry::status_class(res.status().as_u16()),
            )
            .increment(1);
            if let Some(info) = res.extensions().get::<crate::upstream::UpstreamInfo>() {
                metrics::histogram!(
                    "rungen_gateway_upstream_request_duration_seconds",
                    "scope" => scope.clone(),
                )
                .record(info.latency.as_secs_f64());
            }
            // Our key, not the caller's: RunGen documents 403 for a bad key,
            // and a 401 can only be about the key we sent, too.
            if matches!(res.status(), StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED) {
                metrics::counter!(
                    "rungen_gateway_upstream_credential_rejected_total",
                    "scope" => scope,
                )
                .increment(1);
                tracing::error!(
                    scope = %caller.scope.name,
                    key = %caller.scope.api_key.fingerprint(),
                    "upstream rejected the gateway credential for this scope (401/403): check the scope's api_key"
                );
                return Err(GatewayError::UpstreamCredentialRejected {
                    scope: caller.scope.name.clone(),
                });
            }
            Ok(res)
        })
        .boxed()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn caller_credentials_and_proxy_hints_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-api-key", "caller-token"),
            ("x-team-id", "other-team"),
            ("authorization", "Bearer caller-token"),
            ("cookie", "session=1"),
            ("host", "evil.example"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("true-client-ip", "1.2.3.4"),
            ("cf-connecting-ip", "1.2.3.4"),
            ("x-original-forwarded-for", "1.2.3.4"),
            ("content-type", "application/json"),
            ("x-authenticated-user-id", "u-1"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_caller_headers(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("content-type"));
        assert!(h.contains_key("x-authenticated-user-id"));
    }
}
