//! The whole request path, in one place, in request order.

use crate::cache::{Cache, CacheLayer};
use crate::caller_auth::{CallerAuthLayer, Credentials};
use crate::circuit::{Breakers, CircuitBreakerLayer};
use crate::config::Config;
use crate::cors::{CorsLayer, CorsPolicy};
use crate::error::{Body, GatewayError, RescueLayer};
use crate::jwt::{self, Verifier, Verifiers};
use crate::rate_limit::{CallerLimitLayer, Limits, OverloadLayer, UpstreamBudgetLayer};
use crate::routing::RoutingLayer;
use crate::telemetry::AccessLogLayer;
use crate::upstream::{HttpClient, Upstream};
use crate::upstream_credentials::UpstreamCredentialsLayer;
use http::{Request, Response};
use std::convert::Infallible;
use std::sync::Arc;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

/// The gateway as one service: a request in, a response out, never an error.
pub type GatewayService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Composes the request path. The layer added first sees the request first.
pub fn build(
    config: &Config,
    client: HttpClient,
    cache: Arc<Cache>,
    limits: Arc<Limits>,
    breakers: Arc<Breakers>,
) -> GatewayService {
    let mut verifiers = Vec::new();
    for (client, settings) in &config.jwt_clients {
        match Verifier::new(client.clone(), settings.clone()) {
            Ok(v) => {
                jwt::spawn_jwks_refresh(&v);
                verifiers.push(v);
            }
            Err(e) => {
                tracing::error!(client = %client.name, error = %e, "JWT keys unusable; this client's tokens are refused")
            }
        }
    }
    let credentials = Arc::new(Credentials::with_jwt(
        &config.clients,
        Verifiers::new(verifiers),
    ));
    let service = ServiceBuilder::new()
        // request id, one access-log line per request
        .layer(AccessLogLayer)
        // CORS: preflights answered before auth; CORS headers on every response to an allowed origin
        .layer(CorsLayer::new(Arc::new(CorsPolicy::new(&config.clients))))
        // every Err(GatewayError) below becomes its response (error.rs): here,
        // the in-flight cap's; the cache's and the upstream's, further down
        .layer(RescueLayer::<Infallible>::new())
        // global in-flight cap: shed with 503 instead of queueing without bound
        .layer(OverloadLayer::new(limits.clone()))
        // URI, method, path and body-size limits; only configured prefixes
        .layer(RoutingLayer::new(
            &config.upstream.route_prefixes,
            config.server.max_uri_bytes,
            config.server.max_body_bytes,
            config.server.body_read_timeout,
            config.server.allow_chunked_requests,
        ))
        // 3. caller auth: token -> client -> team scope, method check
        .layer(CallerAuthLayer::new(credentials, limits.clone()))
        // 4. rate limit: the client's quota (cache hits included), RateLimit headers
        .layer(CallerLimitLayer::new(limits.clone()))
        // upstream and cache failures become responses here, so the steps
        // above answer them like any other (RateLimit fields, caller and
        // route in the log line and metrics)
        .layer(RescueLayer::<GatewayError>::new())
        // 5. cache: lookup, coalescing, store, stale serving, invalidation on writes
        .layer(CacheLayer::new(cache, &config.teams))
        // a scope whose upstream keeps failing fails fast (the cache serves stale)
        .layer(CircuitBreakerLayer::new(breakers))
        // the scope's upstream budget and concurrency cap (only what goes upstream)
        .layer(UpstreamBudgetLayer::new(limits))
        // 6. credential injection: strip caller headers, set x-api-key / x-team-id
        .layer(UpstreamCredentialsLayer)
        // 7. upstream: pooled client, timeouts, errors tagged with their source
        .service(Upstream::new(client, &config.upstream));
    BoxCloneSyncService::new(service)
}
