//! The admin API, on its own listener (never the public port):
//!
//! | method | path | auth | what |
//! |---|---|---|---|
//! | GET | `/healthz` | - | the process is alive |
//! | GET | `/readyz` | - | 200 when serving; 503 with a JSON reason while draining |
//! | GET | `/metrics` | - | Prometheus text format |
//! | GET | `/config` | - | the effective config, every secret as a fingerprint (token hashes: with the admin token only) |
//! | POST | `/reload` | admin token | re-read the config file and secrets |
//! | POST | `/cache/purge` | admin token | drop cache entries: all, `{"scope": "acme"}`, or `{"scope": "acme", "path_prefix": "/app/x"}` |
//!
//! Mutating calls need `Authorization: Bearer <admin token>`, whose SHA-256 is
//! `[admin] token_sha256`; without one configured they are refused.

use crate::cache::PurgeScope;
use crate::error::{Body, full_body};
use crate::gateway::GatewayService;
use crate::secret::token_digest;
use crate::server::State;
use crate::telemetry;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use std::convert::Infallible;
use std::sync::Arc;
use tower::util::BoxCloneSyncService;

pub fn service(state: Arc<State>) -> GatewayService {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, req).await) }
    }))
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut res = Response::new(full_body(value.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    json(status, serde_json::json!({ "error": msg }))
}

/// `None` if the request carries the admin token, else the refusal to send.
fn refusal(state: &State, req: &Request<Body>) -> Option<Response<Body>> {
    let Some(expected) = state.config().admin.token_sha256 else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "no admin token is configured ([admin] token_sha256)",
        ));
    };
    let token = crate::caller_auth::extract_token(req.headers());
    match token {
        Some(t) if token_digest(t) == expected => None,
        _ => {
            let mut res = error(StatusCode::UNAUTHORIZED, "missing or invalid admin token");
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"rungen-gateway-admin\""),
            );
            Some(res)
        }
    }
}

async fn handle(state: Arc<State>, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if matches!(method, Method::GET | Method::HEAD)
        && matches!(path.as_str(), "/metrics" | "/config")
        && state.config().admin.protect_reads
    {
        if let Some(res) = refusal(&state, &req) {
            return res;
        }
    }
    match (method, path.as_str()) {
        (Method::GET | Method::HEAD, "/healthz") => {
            json(StatusCode::OK, serde_json::json!({ "status": "ok" }))
        }
        (Method::GET | Method::HEAD, "/readyz") => {
            if let Some(reason) = state.not_ready() {
                error(StatusCode::SERVICE_UNAVAILABLE, reason)
            } else {
                json(
                    StatusCode::OK,
                    serde_json::json!({ "status": "ready", "generation": state.generation() }),
                )
            }
        }
        (Method::GET | Method::HEAD, "/metrics") => {
            let cache = state.cache();
            metrics::gauge!("rungen_gateway_cache_entries").set(cache.entry_count() as f64);
            metrics::gauge!("rungen_gateway_cache_bytes").set(cache.weighted_size() as f64);
            metrics::gauge!("rungen_gateway_cache_vary_index_bytes")
                .set(cache.vary_index_bytes() as f64);
            metrics::gauge!("rungen_gateway_rate_limit_tracked_ips")
                .set(state.limits().tracked_ips() as f64);
            let mut res = Response::new(full_body(telemetry::render()));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            res
        }
        (Method::GET | Method::HEAD, "/config") => {
            let authenticated = refusal(&state, &req).is_none();
            json(StatusCode::OK, effective_config(&state, authenticated))
        }
        (Method::POST, "/reload") => {
            if let Some(res) = refusal(&state, &req) {
                return res;
            }
            match state.reload().await {
                Ok(generation) => json(
                    StatusCode::OK,
                    serde_json::json!({ "status": "reloaded", "generation": generation }),
                ),
                Err(reason) => error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!("reload refused, the previous config keeps serving: {reason}"),
                ),
            }
        }
        (Method::POST, "/cache/purge") => {
            if let Some(res) = refusal(&state, &req) {
                return res;
            }
            purge(&state, req).await
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/config" | "/reload" | "/cache/purge") => {
            let allow = if matches!(path.as_str(), "/reload" | "/cache/purge") {
                "POST"
            } else {
                "GET, HEAD"
            };
            let mut res = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            res
        }
        _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    #[serde(default, deserialize_with = "a_string")]
    scope: Option<String>,
    #[serde(default, deserialize_with = "a_string")]
    path_prefix: Option<String>,
}

/// A field that, when present, is a string: `{"scope": null}` (a template
/// that lost its value) is an error, not "every scope".
fn a_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    <String as serde::Deserialize>::deserialize(d).map(Some)
}

async fn purge(state: &State, req: Request<Body>) -> Response<Body> {
    let body = match http_body_util::Limited::new(req.into_body(), 16 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is over 16 KiB",
            );
        }
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            );
        }
    };
    let what: PurgeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PurgeRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(w) => w,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("expected {{\"scope\": ..., \"path_prefix\": ...}}: {e}"),
                );
            }
        }
    };
    if let Some(scope) = &what.scope {
        if !state.config().teams.iter().any(|t| t.name == *scope) {
            return error(StatusCode::NOT_FOUND, &format!("no scope named `{scope}`"));
        }
    }
    if let Some(prefix) = &what.path_prefix {
        if what.scope.is_none() {
            return error(StatusCode::BAD_REQUEST, "path_prefix needs a scope");
        }
        if !prefix.starts_with('/') {
            return error(StatusCode::BAD_REQUEST, "path_prefix must start with '/'");
        }
    }
    let before = state.cache().purge(&PurgeScope {
        scope: what.scope.clone(),
        path_prefix: what.path_prefix.clone(),
    });
    tracing::info!(scope = ?what.scope, path_prefix = ?what.path_prefix, "cache purged");
    json(
        StatusCode::OK,
        serde_json::json!({
            "status": "purged",
            "scope": what.scope,
            "path_prefix": what.path_prefix,
            "entries_before": before,
        }),
    )
}

/// The config in use, with every secret shown as a fingerprint only. The
/// fingerprints of caller and admin token hashes (32 bits of the token's
/// SHA-256: enough to test guesses of a weak token offline) only to a reader
/// with the admin token; to others, `"set"`. Upstream API keys (random keys
/// issued by RunGen) always show theirs, to check which key a replica holds.
fn effective_config(state: &State, authenticated: bool) -> serde_json::Value {
    let c = state.config();
    let token = |d: &Option<[u8; 32]>| {
        d.map(|d| {
            if authenticated {
                format!("sha256:{}", &hex::encode(d)[..8])
            } else {
                "set".to_string()
            }
        })
    };
    let secs = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let policy = |p: &crate::cache::policy::RoutePolicy| {
        serde_json::json!({
            "ttl": secs(p.ttl),
            "stale_while_revalidate": secs(p.stale_while_revalidate),
            "stale_if_error": secs(p.stale_if_error),
            "negative_ttl": secs(p.negative_ttl),
            "follow_upstream_freshness": p.follow_upstream_freshness,
            "allow_client_revalidate": p.allow_client_revalidate,
            "terminal_ttl": secs(p.terminal_ttl),
            "url_expiry_margin": secs(p.url_expiry_margin),
        })
    };
    serde_json::json!({
        "generation": state.generation(),
        "source": c.source.display().to_string(),
        "server": {
            "listen": c.server.listen.to_string(),
            "header_read_timeout": secs(c.server.header_read_timeout),
            "shutdown_timeout": secs(c.server.shutdown_timeout),
            "drain_delay": secs(c.server.drain_delay),
            "max_header_bytes": c.server.max_header_bytes,
            "max_headers": c.server.max_headers,
            "max_uri_bytes": c.server.max_uri_bytes,
            "max_body_bytes": c.server.max_body_bytes,
            "max_connections": c.server.max_connections,
            "h2_max_concurrent_streams": c.server.h2_max_concurrent_streams,
        },
        "upstream": {
            "base_url": format!("{}://{}{}", c.upstream.scheme, c.upstream.authority, c.upstream.base_path),
            "connect_timeout": secs(c.upstream.connect_timeout),
            "request_timeout": secs(c.upstream.request_timeout),
            "ca_file": c.upstream.ca_file.as_ref().map(|p| p.display().to_string()),
            "route_prefixes": c.upstream.route_prefixes,
        },
        "cache": {
            "enabled": c.cache.enabled,
            "max_bytes": c.cache.max_bytes,
            "max_entry_bytes": c.cache.max_entry_bytes,
            "coalesce_timeout": secs(c.cache.coalesce_timeout),
            "routes": {
                "/app": policy(&c.cache.policies.app_list),
                "/app/{id}": policy(&c.cache.policies.app),
                "/app/{id}/job/{job_id}": policy(&c.cache.policies.job),
                "other": policy(&c.cache.policies.other),
            },
        },
        "admin": {
            "listen": c.admin.listen.map(|a| a.to_string()),
            "token_sha256": token(&c.admin.token_sha256),
        },
        "teams": c.teams.iter().map(|t| serde_json::json!({
            "name": t.name,
            "team_id": t.team_id.as_ref().and_then(|v| v.to_str().ok()),
            "api_key": t.api_key.fingerprint(),
        })).collect::<Vec<_>>(),
        "clients": c.clients.iter().map(|cl| serde_json::json!({
            "name": cl.name,
            "token_sha256": token(&cl.token_sha256),
            "cert_names": cl.cert_names,
            "teams": cl.teams.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
            "methods": cl.methods.iter().map(|m| m.as_str().to_string()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
