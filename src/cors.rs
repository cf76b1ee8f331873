//! CORS for browser front-ends, from each client's exact-origin allowlist
//! (`allowed_origins`). Preflights are answered here, before caller auth (they
//! never carry credentials); every other response to an allowed origin gets
//! the CORS headers, errors (401, 403, 429, 502...) included, so the page can
//! read them. No wildcard is ever sent; `Vary: Origin` always is.

use crate::config::Client;
use crate::error::{Body, GatewayError, error_response};
use crate::step::{Step, StepFuture};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Headers a page may send (beyond the CORS-safelisted ones).
const ALLOWED_REQUEST_HEADERS: [&str; 8] = [
    "authorization",
    "x-api-key",
    "x-team-id",
    "content-type",
    "if-none-match",
    "x-request-id",
    "traceparent",
    "cache-control",
];

/// Response headers a page may read.
const EXPOSED: &str =
    "RateLimit, RateLimit-Policy, Retry-After, Cache-Status, Age, ETag, x-request-id";

/// Origins and the methods some client allows them.
#[derive(Debug, Default)]
pub struct CorsPolicy {
    origins: HashMap<String, BTreeSet<String>>,
}

impl CorsPolicy {
    pub fn new(clients: &[Arc<Client>]) -> Self {
        let mut origins: HashMap<String, BTreeSet<String>> = HashMap::new();
        for c in clients {
            for o in &c.allowed_origins {
                let methods = origins.entry(o.clone()).or_default();
                methods.extend(c.methods.iter().map(|m| m.as_str().to_string()));
            }
        }
        Self { origins }
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    pub fn allows(&self, origin: &str) -> bool {
        self.origins.contains_key(origin)
    }
}

fn origin_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::ORIGIN)?
        .to_str()
        .ok()
        .map(|o| o.to_ascii_lowercase())
}

fn add_vary(headers: &mut HeaderMap, value: &'static str) {
    headers.append(header::VARY, HeaderValue::from_static(value));
}

#[derive(Clone)]
pub struct CorsLayer {
    policy: Arc<CorsPolicy>,
}

impl CorsLayer {
    pub fn new(policy: Arc<CorsPolicy>) -> Self {
        Self { policy }
    }
}

impl<S> tower::Layer<S> for CorsLayer {
    type Service = Cors<S>;
    fn layer(&self, inner: S) -> Cors<S> {
        Cors {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Cors<S> {
    inner: S,
    policy: Arc<CorsPolicy>,
}

impl<S> Cors<S> {
    fn preflight(&self, origin: Option<&str>, req: &Request<Body>) -> Response<Body> {
        let Some(methods) = origin.and_then(|o| self.policy.origins.get(o)) else {
            let mut res = error_response(&GatewayError::OriginForbidden);
            add_vary(res.headers_mut(), "origin");
            return res;
        };
        let mut res = Response::new(crate::error::empty_body());
        *res.status_mut() = StatusCode::NO_CONTENT;
        let h = res.headers_mut();
        if let Some(Ok(o)) = origin.map(HeaderValue::from_str) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        }
        let methods = methods.iter().cloned().collect::<Vec<_>>().join(", ");
        if let Ok(v) = HeaderValue::from_str(&methods) {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        // Echo the requested headers we accept (and only those).
        let requested: Vec<String> = req
            .headers()
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| ALLOWED_REQUEST_HEADERS.contains(&n.as_str()))
            .collect();
        if !requested.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&requested.join(", ")) {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
            }
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        add_vary(h, "origin");
        add_vary(h, "access-control-request-method");
        add_vary(h, "access-control-request-headers");
        res
    }
}

// Above `Rescue`: every error is already an answer.
impl<S> tower::Service<Request<Body>> for Cors<S>
where
    S: Step<Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = StepFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if self.policy.is_empty() {
            return self.inner.call(req);
        }
        let origin = origin_of(req.headers());
        if req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return StepFuture::ok(self.preflight(origin.as_deref(), &req));
        }
        let policy = self.policy.clone();
        self.inner.call(req).map_ok(move |mut res| {
            let allowed = origin.as_deref().is_some_and(|o| {
                match crate::telemetry::LogFields::get(&res).and_then(|f| f.caller.as_ref()) {
                    // The identified client's own list decides.
                    Some(c) => c.client.allowed_origins.iter().any(|a| a == o),
                    // Nobody identified (401, 429...): any client's list.
                    None => policy.allows(o),
                }
            });
            let h = res.headers_mut();
            if allowed {
                if let Some(Ok(o)) = origin.as_deref().map(HeaderValue::from_str) {
                    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
                    h.insert(
                        header::ACCESS_CONTROL_EXPOSE_HEADERS,
                        HeaderValue::from_static(EXPOSED),
                    );
                }
            }
            add_vary(h, "origin");
            res
        })
    }
}
