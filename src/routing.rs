//! Request shape and routing: the first step after accept.
//!
//! Refuses what the gateway never forwards (an over-long URI, an unsafe or
//! foreign path, an unknown method, an over-size body) and classifies the
//! path into a [`Route`] that later steps (cache, metrics, logs) key on. Only
//! paths under the configured prefixes are forwarded: this is not an open proxy.

use crate::context::RequestContext;
use crate::error::{Body, BodyError, GatewayError, error_response};
use crate::step::{Step, StepFuture};
use http::{Method, Request, Response, Uri, header};
use http_body_util::{BodyExt, Limited};
use std::borrow::Cow;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The RunGen route a request is for, with the ids it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/app`
    AppList,
    /// `/app/{id}`
    App { app_id: String },
    /// `/app/{id}/run_async`
    RunAsync { app_id: String },
    /// `/app/{id}/job/{job_id}`
    Job { app_id: String, job_id: String },
    /// Anything else under a configured prefix; `template` is `"{prefix}/*"`.
    Other { template: Arc<str> },
}

/// A configured route prefix and the metrics template of its other paths.
#[derive(Debug, Clone)]
pub struct Prefix {
    path: Arc<str>,
    template: Arc<str>,
}

impl Prefix {
    pub fn new(path: &str) -> Self {
        Self {
            path: Arc::from(path),
            template: Arc::from(format!("{path}/*")),
        }
    }
}

impl Route {
    /// The route template: a bounded label for logs and metrics.
    pub fn as_str(&self) -> &str {
        match self {
            Route::AppList => "/app",
            Route::App { .. } => "/app/{id}",
            Route::RunAsync { .. } => "/app/{id}/run_async",
            Route::Job { .. } => "/app/{id}/job/{job_id}",
            Route::Other { template } => template,
        }
    }
}

/// Classifies a path that already passed [`check_path`].
pub fn classify(path: &str, prefixes: &[Prefix]) -> Option<Route> {
    let prefix = prefixes.iter().find(|p| {
        let p = &*p.path;
        path == p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
    })?;
    if &*prefix.path == "/app" {
        let rest: Vec<&str> = path.split('/').skip(2).collect();
        let route = match rest.as_slice() {
            [] => Route::AppList,
            [id] => Route::App {
                app_id: (*id).to_string(),
            },
            [id, "run_async"] => Route::RunAsync {
                app_id: (*id).to_string(),
            },
            [id, "job", job] => Route::Job {
                app_id: (*id).to_string(),
                job_id: (*job).to_string(),
            },
            _ => Route::Other {
                template: prefix.template.clone(),
            },
        };
        return Some(route);
    }
    Some(Route::Other {
        template: prefix.template.clone(),
    })
}

/// Rejects paths that could mean something else upstream than here:
/// dot segments, empty segments, encoded separators or dots, backslashes,
/// `;` (path parameters: `/app/..;/x` is `/x` to some servers, and
/// `/app/x;v=1` another cache key for `/app/x`).
pub fn check_path(path: &str) -> Result<(), GatewayError> {
    if !path.starts_with('/') {
        return Err(GatewayError::BadRequest("the path must start with '/'"));
    }
    if path.contains('\\') {
        return Err(GatewayError::BadRequest("backslash in path"));
    }
    if path.contains(';') {
        return Err(GatewayError::BadRequest("';' in path"));
    }
    // %2f, %5c, %2e, %00 in any case (no copy of the path: this runs per request).
    let encoded_separator = path.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'f') | (b'5', b'c') | (b'2', b'e') | (b'0', b'0')
            )
    });
    if encoded_separator {
        return Err(GatewayError::BadRequest("encoded separator in path"));
    }
    for segment in path.split('/').skip(1) {
        if segment == "." || segment == ".." {
            return Err(GatewayError::BadRequest("dot segment in path"));
        }
        if segment.is_empty() {
            return Err(GatewayError::BadRequest("empty path segment"));
        }
    }
    Ok(())
}

/// One spelling per path (RFC 3986 6.2.2): percent-escapes of unreserved
/// characters (letters, digits, `-`, `_`, `~`) decoded, the hex digits of the
/// others upper case. `/app/%61%31` is `/app/a1` to the upstream, so it must
/// be to the cache too: one entry, and the writes to `/app/a1` invalidate
/// it. (`%2E` stays encoded, and [`check_path`] refuses it.) A `%` not
/// followed by two hex digits is refused.
pub fn normalize_escapes(path: &str) -> Result<Cow<'_, str>, GatewayError> {
    if !path.as_bytes().contains(&b'%') {
        return Ok(Cow::Borrowed(path));
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let hex = |c: Option<&u8>| c.and_then(|c| char::from(*c).to_digit(16));
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let (mut i, mut copied) = (0, 0);
    while let Some(at) = bytes[i..].iter().position(|b| *b == b'%').map(|p| p + i) {
        let (Some(hi), Some(lo)) = (hex(bytes.get(at + 1)), hex(bytes.get(at + 2))) else {
            return Err(GatewayError::BadRequest(
                "malformed percent-encoding in path",
            ));
        };
        out.push_str(&path[copied..at]);
        let byte = u8::try_from(hi * 16 + lo).unwrap_or(0);
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        i = at + 3;
        copied = i;
    }
    if copied == 0 {
        return Ok(Cow::Borrowed(path));
    }
    out.push_str(&path[copied..]);
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// Rewrites the request's path to its [`normalize_escapes`] spelling.
fn normalize_path(req: &mut Request<Body>) -> Result<(), GatewayError> {
    let Cow::Owned(path) = normalize_escapes(req.uri().path())? else {
        return Ok(());
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .try_into()
            .map_err(|_| GatewayError::BadRequest("invalid path"))?,
    );
    *req.uri_mut() =
        Uri::from_parts(parts).map_err(|_| GatewayError::BadRequest("invalid path"))?;
    Ok(())
}

#[derive(Clone, Debug)]
pub struct RoutingLayer {
    prefixes: Arc<[Prefix]>,
    max_uri_bytes: usize,
    max_body_bytes: u64,
    body_read_timeout: std::time::Duration,
    allow_chunked_requests: bool,
}

impl RoutingLayer {
    pub fn new(
        prefixes: &[String],
        max_uri_bytes: usize,
        max_body_bytes: u64,
        body_read_timeout: std::time::Duration,
        allow_chunked_requests: bool,
    ) -> Self {
        Self {
            prefixes: prefixes.iter().map(|p| Prefix::new(p)).collect(),
            max_uri_bytes,
            max_body_bytes,
            body_read_timeout,
            allow_chunked_requests,
        }
    }
}

impl<S> tower::Layer<S> for RoutingLayer {
    type Service = Routing<S>;
    fn layer(&self, inner: S) -> Routing<S> {
        Routing {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Routing<S> {
    inner: S,
    layer: RoutingLayer,
}

impl<S> Routing<S> {
    fn check(&self, req: &Request<Body>) -> Result<Route, GatewayError> {
        let uri = req.uri();
        let path_len = uri.path_and_query().map_or(1, |pq| pq.as_str().len());
        if path_len > self.layer.max_uri_bytes {
            return Err(GatewayError::UriTooLong);
        }
        if !matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::POST
                | Method::PUT
                | Method::DELETE
                | Method::PATCH
                | Method::OPTIONS
        ) {
            return Err(GatewayError::MethodNotAllowed);
        }
        // Request smuggling defences: one framing, and only chunked.
        // Each header looked up once (this runs on every request).
        let headers = req.headers();
        let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
        let content_length = lengths.next();
        let several_lengths = lengths.next().is_some();
        let mut encodings = headers.get_all(header::TRANSFER_ENCODING).iter();
        if let Some(te) = encodings.next() {
            // hyper drops Content-Length when Transfer-Encoding is present, so
            // a CL+TE smuggling attempt is indistinguishable from a chunked
            // upload: HTTP/1 chunked uploads are refused unless allowed.
            if req.version() <= http::Version::HTTP_11 && !self.layer.allow_chunked_requests {
                return Err(GatewayError::LengthRequired);
            }
            let chunked_only = encodings.next().is_none()
                && te.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked");
            if content_length.is_some() || !chunked_only {
                return Err(GatewayError::AmbiguousFraming);
            }
        }
        if several_lengths {
            return Err(GatewayError::AmbiguousFraming);
        }
        // HTTP/1 absolute-form targets name a host: this gateway is not a forward proxy.
        if req.version() <= http::Version::HTTP_11 && uri.scheme().is_some() {
            return Err(GatewayError::BadRequest("absolute-form request target"));
        }
        // No tunnels and no protocol switches (WebSocket, h2c upgrade): never forwarded.
        if headers.contains_key(header::UPGRADE) {
            return Err(GatewayError::BadRequest(
                "protocol upgrades are not supported",
            ));
        }
        check_path(uri.path())?;
        let route =
            classify(uri.path(), &self.layer.prefixes).ok_or(GatewayError::RouteNotFound)?;
        if let Some(len) = content_length {
            let len = len
                .to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(GatewayError::BadRequest("invalid Content-Length"))?;
            if len > self.layer.max_body_bytes {
                return Err(GatewayError::PayloadTooLarge);
            }
        }
        Ok(route)
    }
}

impl<S> tower::Service<Request<Body>> for Routing<S>
where
    S: Step,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = StepFuture<Response<Body>, GatewayError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        match normalize_path(&mut req).and_then(|()| self.check(&req)) {
            Ok(route) => {
                let limit = usize::try_from(self.layer.max_body_bytes).unwrap_or(usize::MAX);
                let (mut parts, body) = req.into_parts();
                RequestContext::of_mut(&mut parts.extensions).route = Some(route.clone());
                // Bodies without Content-Length (chunked, h2) are cut at the
                // limit too, and a client that stops sending mid-body is cut
                // off (408). An empty body (most reads) needs neither.
                let body = if http_body::Body::is_end_stream(&body) {
                    body
                } else {
                    let limited = Limited::new(body, limit)
                        .map_err(BodyError::new)
                        .boxed_unsync();
                    crate::body::IdleTimeout::wrap(limited, self.layer.body_read_timeout)
                };
                self.inner
                    .call(Request::from_parts(parts, body))
                    .map_ok(move |mut res| {
                        crate::telemetry::LogFields::of(&mut res).route = Some(route);
                        res
                    })
            }
            Err(err) => StepFuture::ok(error_response(&err)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn prefixes() -> Vec<Prefix> {
        vec![Prefix::new("/app"), Prefix::new("/v2")]
    }

    #[test]
    fn escapes_are_spelled_one_way() {
        for (path, want) in [
            ("/app/a1", "/app/a1"),
            ("/app/%61%31", "/app/a1"),
            ("/app/%41-%7e_%5F", "/app/A-~__"),
            ("/app/caf%c3%a9", "/app/caf%C3%A9"),
            ("/app/%2e%2E", "/app/%2E%2E"),
            ("/app/a%20b%3a", "/app/a%20b%3A"),
            ("/app/%C3%A9", "/app/%C3%A9"),
        ] {
            let got = normalize_escapes(path).unwrap();
            assert_eq!(got, want, "{path}");
            assert_eq!(normalize_escapes(&got).unwrap(), want, "idempotent");
            assert_eq!(
                matches!(got, Cow::Borrowed(_)),
                path == want,
                "a copy only when the spelling changes: {path}"
            );
        }
        for bad in ["/app/%", "/app/%4", "/app/%zz", "/app/a%g1", "/app/%%41"] {
            assert!(normalize_escapes(bad).is_err(), "{bad}");
        }
        // An escaped dot is still refused after normalising.
        assert!(check_path(&normalize_escapes("/app/%2e%2e/x").unwrap()).is_err());
    }

    #[test]
    fn classifies_the_rungen_routes() {
        let p = prefixes();
        assert_eq!(classify("/app", &p), Some(Route::AppList));
        assert_eq!(
            classify("/app/a1", &p),
            Some(Route::App {
                app_id: "a1".into()
            })
        );
        assert_eq!(
            classify("/app/a1/run_async", &p),
            Some(Route::RunAsync {
                app_id: "a1".into()
            })
        );
        assert_eq!(
            classify("/app/a1/job/j1", &p),
            Some(Route::Job {
                app_id: "a1".into(),
                job_id: "j1".into()
            })
        );
        assert_eq!(classify("/app/a1/job/j1/x", &p).unwrap().as_str(), "/app/*");
        assert_eq!(classify("/v2/things", &p).unwrap().as_str(), "/v2/*");
        assert_eq!(classify("/apple", &p), None);
        assert_eq!(classify("/", &p), None);
        assert_eq!(classify("/admin", &p), None);
    }

    #[test]
    fn refuses_paths_that_could_escape_the_prefix() {
        for bad in [
            "/app/../admin",
            "/app/./x",
            "/app//x",
            "/app/%2e%2e/admin",
            "/app%2Fx",
            "/app/x\\y",
            "/app/",
            "/app/..;/admin",
            "/app/.;/x",
            "/app/x;v=1",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in ["/app", "/app/123e4567-e89b", "/app/a/job/b"] {
            assert!(check_path(good).is_ok(), "{good}");
        }
    }
}
