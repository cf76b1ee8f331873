//! The whole request path, in one place, in request order.

use crate::cache::{Cache, CacheLayer};
use crate::caller_auth::{CallerAuthLayer, Credentials};
use crate::config::Config;
use crate::error::{Body, RescueLayer};
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
pub fn build(config: &Config, client: HttpClient, cache: Arc<Cache>) -> GatewayService {
    let credentials = Arc::new(Credentials::new(&config.clients));
    let service = ServiceBuilder::new()
        // request id, one access-log line per request
        .layer(AccessLogLayer)
        // every Err(GatewayError) below becomes its response (error.rs)
        .layer(RescueLayer)
        // URI, method, path and body-size limits; only configured prefixes
        .layer(RoutingLayer::new(
            &config.upstream.route_prefixes,
            config.server.max_uri_bytes,
            config.server.max_body_bytes,
        ))
        // 3. caller auth: token -> client -> team scope, method check
        .layer(CallerAuthLayer::new(credentials))
        // 5. cache: lookup, coalescing, store, stale serving, invalidation on writes
        .layer(CacheLayer::new(cache, &config.teams))
        // 6. credential injection: strip caller headers, set x-api-key / x-team-id
        .layer(UpstreamCredentialsLayer)
        // 7. upstream: pooled client, timeouts, errors tagged with their source
        .service(Upstream::new(client, &config.upstream));
    BoxCloneSyncService::new(service)
}
