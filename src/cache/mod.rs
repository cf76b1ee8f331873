//! The response cache: team-isolated, coalescing, stale-serving,
//! write-invalidating, on moka.
//!
//! Per request: reads (GET/HEAD) of a cached route are answered from a fresh
//! entry, or from a stale one within its stale-while-revalidate window (and
//! refreshed once in the background); otherwise one upstream fetch per key is
//! made however many callers wait for it (a single flight, spawned so it
//! completes even if its first caller goes away), and its result is stored if
//! the policy allows. If the upstream fails (5xx, 429, timeout, connection),
//! a stale entry within its stale-if-error window is served instead. Writes go
//! straight through and, when they succeed, drop the reads they change in the
//! same team scope.
//!
//! Modules: `policy` (pure rules), `key`, `store` (moka), `status` (RFC 9211).

pub mod key;
pub mod policy;
pub mod status;
pub mod store;

use crate::clock::SharedClock;
use crate::context::RequestContext;
use crate::error::{Body, GatewayError, full_body};
use crate::routing::Route;
use crate::step::StepFuture;
use crate::upstream::UpstreamInfo;
use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use key::CacheKey;
use policy::{CachePolicies, NoStoreReason, RoutePolicy};
use status::CacheStatus;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use store::{CachedResponse, Entries, VaryIndex};
use tower::ServiceExt;

/// Cache settings from `[cache]`.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub enabled: bool,
    /// Bound of the whole store, in bytes.
    pub max_bytes: u64,
    /// Responses larger than this stream through uncached.
    pub max_entry_bytes: usize,
    /// How long a caller waits for another caller's fetch of the same key.
    pub coalesce_timeout: Duration,
    pub policies: CachePolicies,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
            coalesce_timeout: Duration::from_secs(20),
            policies: CachePolicies::default(),
        }
    }
}

/// What a cache fill produced; shared by every caller waiting on it.
#[derive(Clone)]
enum FetchResult {
    /// Stored (or refreshed by a 304); served to every waiter.
    Stored {
        entry: Arc<CachedResponse>,
        fwd_status: u16,
        upstream: Option<UpstreamInfo>,
        /// Taken from another replica's shared fetch, not from the upstream.
        shared: bool,
    },
    /// A complete (small) response that is not stored; served to every waiter.
    NotStored {
        response: Arc<Buffered>,
        reason: NoStoreReason,
    },
    /// Too large to buffer: only the first taker gets it, the others fetch alone.
    Streaming(Arc<Mutex<Option<Response<Body>>>>),
    /// No response.
    Failed(GatewayError),
}

/// A complete response held in memory.
struct Buffered {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    extensions: http::Extensions,
    /// The headers of the request that fetched it (the flight's leader).
    fetched_with: HeaderMap,
}

impl Buffered {
    /// Whether this answer is also the answer to a request with `headers`:
    /// the same values of every header its `Vary` names (`Vary: *`: never).
    fn answers(&self, headers: &HeaderMap) -> bool {
        let names = key::vary_names(&self.headers);
        !names.iter().any(|n| n.as_str() == "*")
            && key::variant(&names, &self.fetched_with) == key::variant(&names, headers)
    }
}

type Flight = Shared<BoxFuture<'static, FetchResult>>;

/// Which keys a change (an invalidation, a purge) covers.
type KeyMatch = Arc<dyn Fn(&CacheKey) -> bool + Send + Sync>;

/// The latest changes, oldest first: change number `first + i` is
/// `changes[i]`, and it moved the epoch from `first + i` to `first + i + 1`.
#[derive(Default)]
struct ChangeLog {
    first: u64,
    changes: std::collections::VecDeque<KeyMatch>,
}

impl ChangeLog {
    /// Changes kept; a fill that outlives more changes than this is treated
    /// as raced by a write (not stored, not joined), as every fill was
    /// before changes were told apart.
    const MAX: usize = 1024;
}

/// The cache's shared state (one per process, kept across config reloads).
pub struct Cache {
    settings: CacheSettings,
    /// Route policies and the on/off switch: replaced on config reload.
    policies: arc_swap::ArcSwap<(bool, CachePolicies)>,
    entries: Entries,
    vary: VaryIndex,
    /// Set once any response has varied: until then a lookup skips the index.
    any_vary: std::sync::atomic::AtomicBool,
    /// Fetches in the air, with the epoch they started in.
    flights: Mutex<HashMap<CacheKey, (u64, Flight)>>,
    /// Bumped by every invalidation and purge (under `changes`' lock).
    epoch: AtomicU64,
    /// What the recent invalidations and purges covered: a fill that raced a
    /// write to its key is not stored, and a read after it does not join it
    /// (see [`Cache::changed_since`]); writes to other keys leave both alone.
    changes: Mutex<ChangeLog>,
    /// Scopes whose upstream said 429, until when.
    backoff: Mutex<HashMap<Arc<str>, Instant>>,
    /// Cluster mode: where this replica's invalidations and purges go.
    fanout: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<crate::cluster::FanOut>>,
    /// Cluster mode with `shared_cache`: fills ask Redis first (`cluster::shared`).
    shared: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    clock: SharedClock,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.entries.entry_count())
            .field("bytes", &self.entries.weighted_size())
            .finish()
    }
}

/// What an admin purge drops.
#[derive(Debug, Clone, Default)]
pub struct PurgeScope {
    pub scope: Option<String>,
    /// A path prefix within the scope (segment-wise: `/app/x` drops `/app/x` and `/app/x/...`).
    pub path_prefix: Option<String>,
}

impl Cache {
    pub fn new(settings: CacheSettings, clock: SharedClock) -> Arc<Self> {
        Arc::new(Self {
            policies: arc_swap::ArcSwap::from_pointee((
                settings.enabled,
                settings.policies.clone(),
            )),
            entries: store::build_entries(settings.max_bytes),
            vary: store::build_vary_index(settings.max_bytes),
            any_vary: std::sync::atomic::AtomicBool::new(false),
            settings,
            flights: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            changes: Mutex::new(ChangeLog::default()),
            backoff: Mutex::new(HashMap::new()),
            fanout: std::sync::OnceLock::new(),
            shared: std::sync::OnceLock::new(),
            clock,
        })
    }

    /// Applies a reloaded config's policies; the store's size bounds are
    /// fixed at start (returns false if the new settings change them).
    pub fn reconfigure(&self, settings: &CacheSettings) -> bool {
        self.policies
            .store(Arc::new((settings.enabled, settings.policies.clone())));
        settings.max_bytes == self.settings.max_bytes
            && settings.max_entry_bytes == self.settings.max_entry_bytes
            && settings.coalesce_timeout == self.settings.coalesce_timeout
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }

    /// Bytes held by the Vary index (see [`store::vary_index_max_bytes`]).
    pub fn vary_index_bytes(&self) -> u64 {
        self.vary.weighted_size()
    }

    /// Keys in the Vary index.
    pub fn vary_index_keys(&self) -> u64 {
        self.vary.entry_count()
    }

    /// Runs moka's pending maintenance (counts become exact).
    pub fn sync(&self) {
        self.entries.run_pending_tasks();
        self.vary.run_pending_tasks();
    }

    /// Logs the change (see `Cache::changed_since`), then drops the entries of `scopes` whose path matches.
    /// Drops what a write changed, here and (in cluster mode) on every replica.
    fn invalidate(&self, scopes: &[Arc<str>], exact: &[String], prefixes: &[String]) {
        self.invalidate_local(scopes, exact, prefixes);
        if let Some(out) = self.fanout.get() {
            if let Some(c) = self.shared.get() {
                c.note_local_change();
            }
            let _ = out.send(crate::cluster::FanOut::Invalidate {
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                exact: exact.to_vec(),
                prefixes: prefixes.to_vec(),
            });
        }
    }

    /// Sends this replica's invalidations and purges to the cluster.
    pub fn set_fanout(&self, out: tokio::sync::mpsc::UnboundedSender<crate::cluster::FanOut>) {
        let _ = self.fanout.set(out);
    }

    /// Fills look for the response in Redis first (`[cluster] shared_cache`).
    pub fn set_shared(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.shared.set(cluster);
    }

    /// Applies a change another replica made.
    pub fn apply(&self, change: &crate::cluster::FanOut) {
        match change {
            crate::cluster::FanOut::Invalidate {
                scopes,
                exact,
                prefixes,
            } => {
                let scopes: Vec<Arc<str>> = scopes.iter().map(|s| Arc::from(s.as_str())).collect();
                self.invalidate_local(&scopes, exact, prefixes);
            }
            crate::cluster::FanOut::Purge { scope, path_prefix } => {
                self.purge_local(&PurgeScope {
                    scope: scope.clone(),
                    path_prefix: path_prefix.clone(),
                });
            }
        }
    }

    fn invalidate_local(&self, scopes: &[Arc<str>], exact: &[String], prefixes: &[String]) {
        let scopes: Vec<Arc<str>> = scopes.to_vec();
        let exact = exact.to_vec();
        let prefixes = prefixes.to_vec();
        let matches: KeyMatch = Arc::new(move |k: &CacheKey| {
            scopes.contains(&k.scope)
                && (exact.iter().any(|p| **p == *k.path)
                    || prefixes.iter().any(|p| k.path.starts_with(p.as_str())))
        });
        self.record_change(matches.clone());
        let (m1, m2) = (matches.clone(), matches);
        if let Err(e) = self.entries.invalidate_entries_if(move |k, _| m1(k)) {
            tracing::error!(error = %e, "cache invalidation failed; dropping everything");
            self.entries.invalidate_all();
        }
        let _ = self.vary.invalidate_entries_if(move |k, _| m2(k));
    }

    /// Admin purge: everything, one scope, or a path prefix in a scope.
    /// Returns the number of entries before the purge (an upper bound of what it dropped).
    pub fn purge(&self, what: &PurgeScope) -> u64 {
        if let Some(out) = self.fanout.get() {
            if let Some(c) = self.shared.get() {
                c.note_local_change();
            }
            let _ = out.send(crate::cluster::FanOut::Purge {
                scope: what.scope.clone(),
                path_prefix: what.path_prefix.clone(),
            });
        }
        self.purge_local(what)
    }

    /// Purges this replica only.
    pub fn purge_local(&self, what: &PurgeScope) -> u64 {
        let before = self.entries.entry_count();
        match (&what.scope, &what.path_prefix) {
            (None, None) => {
                self.record_change(Arc::new(|_: &CacheKey| true));
                self.entries.invalidate_all();
                self.vary.invalidate_all();
            }
            (scope, prefix) => {
                let scope = scope.clone();
                let prefix = prefix.clone();
                let pred: KeyMatch = Arc::new(move |k: &CacheKey| {
                    scope.as_deref().is_none_or(|s| *k.scope == *s)
                        && prefix.as_deref().is_none_or(|p| {
                            k.path.starts_with(p)
                                && (k.path.len() == p.len()
                                    || p.ends_with('/')
                                    || k.path.as_bytes().get(p.len()) == Some(&b'/'))
                        })
                });
                self.record_change(pred.clone());
                let (p1, p2) = (pred.clone(), pred);
                if self
                    .entries
                    .invalidate_entries_if(move |k, _| p1(k))
                    .is_err()
                {
                    self.entries.invalidate_all();
                }
                let _ = self.vary.invalidate_entries_if(move |k, _| p2(k));
            }
        }
        metrics::counter!("rungen_gateway_cache_purges_total").increment(1);
        before
    }

    /// Logs a change and moves the epoch past it. Called before the entries
    /// it covers are dropped: a fill that stores after this sees it.
    fn record_change(&self, covers: KeyMatch) {
        let mut log = crate::sync::lock(&self.changes);
        log.changes.push_back(covers);
        if log.changes.len() > ChangeLog::MAX {
            log.changes.pop_front();
            log.first += 1;
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The epoch to hand to [`Cache::changed_since`] later.
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether an invalidation or purge since `epoch` covered `key`: then
    /// what was fetched for it before may predate a write. Changes older
    /// than the log keeps count as covering every key.
    fn changed_since(&self, epoch: u64, key: &CacheKey) -> bool {
        if self.epoch() == epoch {
            return false;
        }
        let log = crate::sync::lock(&self.changes);
        // Change number `first + i` moved the epoch from `first + i` to `first + i + 1`.
        let Some(skip) = epoch.checked_sub(log.first) else {
            return true;
        };
        log.changes
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .any(|covers| covers(key))
    }

    fn in_backoff(&self, scope: &Arc<str>, now: Instant) -> bool {
        let map = crate::sync::lock(&self.backoff);
        map.get(scope).is_some_and(|until| now < *until)
    }

    fn set_backoff(&self, scope: &Arc<str>, until: Instant) {
        let mut map = crate::sync::lock(&self.backoff);
        map.retain(|_, t| *t > self.clock.now());
        map.insert(scope.clone(), until);
    }
}

/// The reads a successful write changes (section 3.3 of rungen-api.md):
/// `(exact paths, path prefixes)`.
pub fn invalidations(method: &Method, route: &Route, path: &str) -> (Vec<String>, Vec<String>) {
    let app = |id: &str| format!("/app/{id}");
    match (method, route) {
        (&Method::POST, Route::AppList) => (vec!["/app".into()], vec![]),
        (&Method::PUT | &Method::PATCH, Route::App { app_id }) => {
            (vec![app(app_id), "/app".into()], vec![])
        }
        (&Method::DELETE, Route::App { app_id }) => (
            vec![app(app_id), "/app".into()],
            vec![format!("/app/{app_id}/")],
        ),
        (&Method::POST, Route::RunAsync { app_id }) => (vec![app(app_id), "/app".into()], vec![]),
        (_, Route::Job { app_id, .. }) => {
            (vec![path.to_string(), app(app_id), "/app".into()], vec![])
        }
        _ => (vec![path.to_string()], vec![]),
    }
}

// ---------------------------------------------------------------------------
// The layer

/// Scope name -> the scope names sharing its upstream team.
type ScopeGroups = HashMap<Arc<str>, Arc<[Arc<str>]>>;

#[derive(Clone)]
pub struct CacheLayer {
    cache: Arc<Cache>,
    /// Each scope's name as the `Arc<str>` cache keys hold (no allocation per request).
    scope_names: Arc<HashMap<String, Arc<str>, foldhash::fast::RandomState>>,
    /// Scope name -> every scope name that sees the same upstream area (for
    /// invalidation: a team app changed through one key is stale under all
    /// the team's keys; a personal app under every scope of that same key).
    scope_groups: Arc<ScopeGroups>,
}

impl CacheLayer {
    pub fn new(cache: Arc<Cache>, teams: &[Arc<crate::config::Team>]) -> Self {
        let mut groups = HashMap::new();
        // The same upstream area: one team (ids compare as RunGen does, case
        // aside), or one key's personal area.
        let same_area =
            |a: &crate::config::Team, b: &crate::config::Team| match (&a.team_id, &b.team_id) {
                (Some(x), Some(y)) => x.as_bytes().eq_ignore_ascii_case(y.as_bytes()),
                (None, None) => a.api_key.expose() == b.api_key.expose(),
                _ => false,
            };
        for t in teams {
            let members: Vec<Arc<str>> = teams
                .iter()
                .filter(|o| o.name == t.name || same_area(t, o))
                .map(|o| Arc::from(o.name.as_str()))
                .collect();
            groups.insert(Arc::from(t.name.as_str()), Arc::from(members));
        }
        let scope_names = teams
            .iter()
            .map(|t| (t.name.clone(), Arc::from(t.name.as_str())))
            .collect();
        Self {
            cache,
            scope_names: Arc::new(scope_names),
            scope_groups: Arc::new(groups),
        }
    }

    fn scope_name(&self, name: &str) -> Arc<str> {
        self.scope_names
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::from(name))
    }
}

/// The steps after the cache, boxed: fills run in their own tasks and need a
/// concrete, `Send` future type.
pub type Inner = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, GatewayError>;

impl<S> tower::Layer<S> for CacheLayer
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Service = CacheService;
    fn layer(&self, inner: S) -> CacheService {
        CacheService {
            inner: Inner::new(inner),
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CacheService {
    inner: Inner,
    layer: CacheLayer,
}

/// RFC 9211 `Cache-Status` (a constant: `from_static` outside a const context
/// re-checks the name on every call).
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

fn finish(mut res: Response<Body>, status: CacheStatus) -> Response<Body> {
    res.headers_mut()
        .insert(CACHE_STATUS, status.header_value());
    crate::telemetry::LogFields::of(&mut res).cache = Some(status.as_str());
    res
}

/// A response from a stored entry (GET body or HEAD without one; 304 when the
/// caller's `If-None-Match` matches).
fn from_entry(
    entry: &CachedResponse,
    method: &Method,
    if_none_match: Option<&HeaderValue>,
    now: Instant,
    status: CacheStatus,
) -> Response<Body> {
    let age = entry.age_secs(now);
    let not_modified = if_none_match.is_some_and(|inm| entry.matches_if_none_match(inm));
    let mut res = if not_modified {
        let mut res = Response::new(crate::error::empty_body());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        for name in [
            header::ETAG,
            header::CACHE_CONTROL,
            header::DATE,
            header::EXPIRES,
            header::VARY,
            header::LAST_MODIFIED,
        ] {
            if let Some(v) = entry.headers.get(&name) {
                res.headers_mut().insert(name, v.clone());
            }
        }
        res
    } else {
        let body = if method == Method::HEAD {
            crate::error::empty_body()
        } else {
            full_body(entry.body.clone())
        };
        let mut res = Response::new(body);
        *res.status_mut() = entry.status;
        // Room for Age, Cache-Status, x-request-id and the RateLimit pair.
        *res.headers_mut() = entry.headers.to_map(5);
        res
    };
    if status.from_store() || age > 0 {
        res.headers_mut().insert(header::AGE, age_value(age));
    }
    finish(res, status)
}

/// `Age` values below this are made once and shared (a hit's age is mostly a
/// few seconds: no allocation and no number formatting per hit).
const SHARED_AGES: usize = 120;

fn age_value(secs: u64) -> HeaderValue {
    static AGES: std::sync::LazyLock<[HeaderValue; SHARED_AGES]> =
        std::sync::LazyLock::new(|| std::array::from_fn(HeaderValue::from));
    match usize::try_from(secs) {
        Ok(i) if i < SHARED_AGES => AGES[i].clone(),
        _ => HeaderValue::from(secs),
    }
}

fn from_buffered(b: &Buffered, method: &Method, status: CacheStatus) -> Response<Body> {
    let body = if method == Method::HEAD {
        crate::error::empty_body()
    } else {
        full_body(b.body.clone())
    };
    let mut res = Response::new(body);
    *res.status_mut() = b.status;
    *res.headers_mut() = b.headers.clone();
    *res.extensions_mut() = b.extensions.clone();
    finish(res, status)
}

/// Upstream answers after which a stale entry may be served instead.
fn is_upstream_error(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// Calls the inner service. A plain function returning a boxed future: inside
/// async blocks, rustc cannot prove `Send` for the `Oneshot` of a service whose
/// request type contains a `dyn Error` (the witness loses its lifetime).
fn call_inner(
    inner: Inner,
    req: Request<Body>,
) -> BoxFuture<'static, Result<Response<Body>, GatewayError>> {
    Box::pin(inner.oneshot(req))
}

/// Everything a fill needs, owned, so that it can run in its own task.
struct Fill {
    inner: Inner,
    cache: Arc<Cache>,
    template: http::request::Parts,
    key: CacheKey,
    stale: Option<Arc<CachedResponse>>,
    policy: RoutePolicy,
    route: Route,
}

const CONDITIONAL: [HeaderName; 5] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

impl Fill {
    /// Cluster mode with `shared_cache`: a shared entry instead of an upstream
    /// request, or the fetch with the right to share it (`cluster::shared`).
    async fn run_shared(self) -> FetchResult {
        // A caller that asked for revalidation gets the upstream's answer.
        let revalidate = self.policy.allow_client_revalidate
            && policy::client_wants_revalidation(&self.template.headers);
        let Some(cluster) = self.cache.shared.get().filter(|_| !revalidate).cloned() else {
            return self.run().await;
        };
        let (cache, key) = (self.cache.clone(), self.key.clone());
        let epoch = cache.epoch();
        match cluster.shared_before(&key, cache.clock.now()).await {
            crate::cluster::shared::Before::Hit(entry) => {
                if !cache.changed_since(epoch, &key) {
                    cache.entries.insert(key, entry.clone());
                }
                FetchResult::Stored {
                    fwd_status: entry.status.as_u16(),
                    entry,
                    upstream: None,
                    shared: true,
                }
            }
            crate::cluster::shared::Before::Fetch(ticket) => {
                let result = self.run().await;
                let stored = match &result {
                    FetchResult::Stored { entry, .. } => Some(entry.clone()),
                    _ => None,
                };
                cluster.shared_after(ticket, stored, cache.clock.now());
                result
            }
            crate::cluster::shared::Before::Bypass => self.run().await,
        }
    }

    /// One upstream GET for `key`; stores what the policy allows.
    async fn run(self) -> FetchResult {
        let Fill {
            inner,
            cache,
            template,
            key,
            stale,
            policy,
            route,
        } = self;
        // A leader that said `no-store` (RFC 9111 5.2.1.5): its answer is
        // shared with the callers that joined, never stored.
        let may_store = !policy::parse_cache_control(&template.headers).no_store;
        let mut req = Request::from_parts(template, crate::error::empty_body());
        *req.method_mut() = Method::GET;
        for name in &CONDITIONAL {
            req.headers_mut().remove(name);
        }
        // The whole representation: the answer is shared and maybe stored.
        req.headers_mut().remove(header::RANGE);
        // Unencoded: the policy reads job bodies, and one stored body must
        // suit every caller (absent, the header would mean "any encoding").
        req.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        req.headers_mut().remove(header::CONTENT_LENGTH);
        if let Some(stale) = &stale {
            if let Some(etag) = &stale.upstream_etag {
                req.headers_mut()
                    .insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(lm) = &stale.last_modified {
                req.headers_mut()
                    .insert(header::IF_MODIFIED_SINCE, lm.clone());
            }
        }
        let request_headers = req.headers().clone();
        let epoch = cache.epoch();
        metrics::counter!("rungen_gateway_cache_fills_total", "route" => route.as_str().to_string(), "scope" => key.scope.to_string()).increment(1);

        let res = match call_inner(inner, req).await {
            Ok(res) => res,
            Err(e) => return FetchResult::Failed(e),
        };
        let status = res.status();
        let upstream = res.extensions().get::<UpstreamInfo>().copied();
        let set_cookie = upstream.is_some_and(|u| u.set_cookie);
        let now = cache.clock.now();
        let wall = cache.clock.wall();

        if status == StatusCode::TOO_MANY_REQUESTS {
            if let Some(wait) = crate::error::parse_retry_after(res.headers(), wall) {
                cache.set_backoff(&key.scope, now + wait);
            }
        }

        // 304 to our revalidation: the stale entry is good again.
        if status == StatusCode::NOT_MODIFIED {
            if let Some(stale) = &stale {
                let mut headers = stale.headers.to_map(0);
                for (name, value) in res.headers() {
                    if name != header::CONTENT_LENGTH && name != header::ETAG {
                        headers.insert(name.clone(), value.clone());
                    }
                }
                // The upstream's own tag, or none: a tag computed from the
                // body must not become one the upstream is asked about (an
                // upstream that knows only Last-Modified would then ignore
                // If-Modified-Since and answer in full, RFC 9110 13.1.3).
                match &stale.upstream_etag {
                    Some(etag) => headers.insert(header::ETAG, etag.clone()),
                    None => headers.remove(header::ETAG),
                };
                let refreshed = policy::response_freshness(
                    &policy,
                    &route,
                    stale.status,
                    &headers,
                    set_cookie,
                    &stale.body,
                    wall,
                );
                let freshness = match refreshed {
                    Ok(freshness) => freshness,
                    // Not storable now (`private`, `no-store`, ...), yet the
                    // stale body is still the answer: served once, not kept
                    // (the 304 itself only answers our validators).
                    Err(reason) => {
                        cache.entries.invalidate(&key);
                        return FetchResult::NotStored {
                            response: Arc::new(Buffered {
                                status: stale.status,
                                headers,
                                body: stale.body.clone(),
                                extensions: res.into_parts().0.extensions,
                                fetched_with: request_headers,
                            }),
                            reason,
                        };
                    }
                };
                let entry = Arc::new(CachedResponse::new(
                    stale.status,
                    headers,
                    stale.body.clone(),
                    now,
                    freshness,
                    stale.variant,
                    stale.vary.clone(),
                ));
                if !cache.changed_since(epoch, &key) {
                    cache.entries.insert(key.clone(), entry.clone());
                }
                return FetchResult::Stored {
                    entry,
                    fwd_status: 304,
                    upstream,
                    shared: false,
                };
            }
        }

        let (parts, body) = res.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let limit = cache.settings.max_entry_bytes;
        // A complete answer that cannot be stored still replaces what is
        // stored for the key: a stale entry must not outlive the upstream's
        // newer answer (a 404 after a delete elsewhere, a `no-store`, a body
        // grown past the entry limit), or every caller in its
        // stale-while-revalidate window would get it and refresh again. Only
        // an upstream failure leaves it, for stale-if-error.
        let superseded = || {
            if !is_upstream_error(status) {
                cache.entries.invalidate(&key);
            }
        };
        if declared.is_some_and(|len| len > limit) {
            superseded();
            return FetchResult::Streaming(Arc::new(Mutex::new(Some(Response::from_parts(
                parts, body,
            )))));
        }
        // Buffer up to the entry limit; past it, hand on what was read plus the rest.
        let mut body = body;
        let mut buf = BytesMut::new();
        loop {
            match body.frame().await {
                None => break,
                Some(Err(e)) => {
                    // Nothing partial is ever stored: the fill fails as a whole.
                    tracing::warn!(error = %e, "upstream body failed while filling the cache");
                    return FetchResult::Failed(
                        if crate::body::caused_by::<crate::body::BodyTimeout>(&e) {
                            GatewayError::UpstreamTimeout
                        } else {
                            GatewayError::UpstreamProtocol
                        },
                    );
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                        if buf.len() > limit {
                            superseded();
                            let head = http_body_util::Full::new(buf.freeze())
                                .map_err(|never| match never {});
                            let rest = StreamBody::chain(head, body);
                            return FetchResult::Streaming(Arc::new(Mutex::new(Some(
                                Response::from_parts(parts, rest),
                            ))));
                        }
                    }
                }
            }
        }
        let body = buf.freeze();
        let verdict = policy::response_freshness(
            &policy,
            &route,
            status,
            &parts.headers,
            set_cookie,
            &body,
            wall,
        )
        .and_then(|f| {
            if may_store {
                Ok(f)
            } else {
                Err(NoStoreReason::RequestNoStore)
            }
        });
        match verdict {
            Ok(freshness) => {
                let names = key::vary_names(&parts.headers);
                let variant = key::variant(&names, &request_headers);
                let entry = Arc::new(CachedResponse::new(
                    status,
                    parts.headers,
                    body,
                    now,
                    freshness,
                    variant,
                    Arc::from(names.clone()),
                ));
                if cache.changed_since(epoch, &key) {
                    return FetchResult::NotStored {
                        response: Arc::new(Buffered {
                            status,
                            headers: entry.headers.to_map(0),
                            body: entry.body.clone(),
                            extensions: parts.extensions,
                            fetched_with: request_headers,
                        }),
                        reason: NoStoreReason::Invalidated,
                    };
                }
                let base = key.with_variant(0);
                if names.is_empty() {
                    cache.vary.invalidate(&base);
                } else {
                    cache.any_vary.store(true, Ordering::SeqCst);
                    cache.vary.insert(base.clone(), Arc::from(names));
                }
                cache
                    .entries
                    .insert(base.with_variant(variant), entry.clone());
                metrics::counter!("rungen_gateway_cache_stores_total", "route" => route.as_str().to_string(), "scope" => key.scope.to_string()).increment(1);
                FetchResult::Stored {
                    entry,
                    fwd_status: status.as_u16(),
                    upstream,
                    shared: false,
                }
            }
            Err(reason) => {
                superseded();
                FetchResult::NotStored {
                    response: Arc::new(Buffered {
                        status,
                        headers: parts.headers,
                        body,
                        extensions: parts.extensions,
                        fetched_with: request_headers,
                    }),
                    reason,
                }
            }
        }
    }
}

/// Chains a buffered head onto the rest of a streaming body.
struct StreamBody;

impl StreamBody {
    fn chain<H>(head: H, rest: Body) -> Body
    where
        H: http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + Unpin + 'static,
    {
        use futures_util::StreamExt;
        let head = http_body_util::BodyStream::new(head.map_err(|never| match never {}));
        let rest = http_body_util::BodyStream::new(rest);
        http_body_util::StreamBody::new(head.chain(rest)).boxed_unsync()
    }
}

/// What a write would change, dropped once its answer says it may have
/// written, or if the write is given up before it has an answer (the caller
/// hung up: the request may still reach or commit at the upstream).
struct PendingInvalidation {
    cache: Arc<Cache>,
    scopes: Arc<[Arc<str>]>,
    exact: Vec<String>,
    prefixes: Vec<String>,
    route: Route,
    /// Still to do when dropped.
    armed: bool,
}

impl PendingInvalidation {
    /// The write's answer is in: invalidate (now) only if it may have written.
    fn settle(mut self, may_have_written: bool) {
        self.armed = may_have_written;
    }
}

impl Drop for PendingInvalidation {
    fn drop(&mut self) {
        if self.armed {
            self.cache
                .invalidate(&self.scopes, &self.exact, &self.prefixes);
            metrics::counter!("rungen_gateway_cache_invalidations_total", "route" => self.route.as_str().to_string()).increment(1);
        }
    }
}

/// Whether a write's answer means what is cached for it may be wrong now: it
/// succeeded, or its fate is unknown (a 5xx, no answer in time, a connection
/// lost mid-answer: the upstream may have committed it), or the upstream
/// says the resource is not as the cache has it (404/410: gone, deleted
/// elsewhere; 409: in another state, such as a job already finished). Other
/// refusals (400, 403, 422, ...), and a request that never reached the
/// upstream, leave the cache as it is.
fn may_have_written(res: &Result<Response<Body>, GatewayError>) -> bool {
    match res {
        Ok(r) => {
            r.status().is_success()
                || r.status().is_server_error()
                || matches!(r.status().as_u16(), 404 | 409 | 410)
        }
        Err(e) => matches!(
            e,
            GatewayError::UpstreamTimeout | GatewayError::UpstreamProtocol
        ),
    }
}

/// A flight's place in the flight table, given up when its fill task ends,
/// however it ends: a fill that panicked must not leave later readers of the
/// key joining its failure.
struct FlightSlot {
    cache: Arc<Cache>,
    key: CacheKey,
    epoch: u64,
}

impl Drop for FlightSlot {
    fn drop(&mut self) {
        let mut flights = crate::sync::lock(&self.cache.flights);
        // Unless a newer fetch of the key has taken the slot.
        if flights
            .get(&self.key)
            .is_some_and(|(e, _)| *e == self.epoch)
        {
            flights.remove(&self.key);
        }
    }
}

impl CacheService {
    /// Joins the flight for `key`, starting it if none is in the air.
    /// Returns the flight and whether this call started it.
    fn flight(&self, fill: Fill) -> (Flight, bool) {
        let cache = &self.layer.cache;
        let mut flights = crate::sync::lock(&cache.flights);
        // Not a fetch that a later write or purge of this key may have raced:
        // it may answer with what that write changed (read-your-writes).
        // Writes to other keys, other scopes, leave it joinable.
        let epoch = cache.epoch();
        if let Some((started, f)) = flights.get(&fill.key) {
            if !cache.changed_since(*started, &fill.key) {
                return (f.clone(), false);
            }
        }
        let key = fill.key.clone();
        let cache2 = cache.clone();
        let key2 = key.clone();
        let deadline = cache.settings.coalesce_timeout;
        let task = tokio::spawn(async move {
            let _slot = FlightSlot {
                cache: cache2,
                key: key2,
                epoch,
            };
            // A trickling upstream cannot hold a fill (and its waiters) forever.
            tokio::time::timeout(deadline, fill.run_shared())
                .await
                .unwrap_or(FetchResult::Failed(GatewayError::UpstreamTimeout))
        });
        let flight: Flight = async move {
            task.await
                .unwrap_or(FetchResult::Failed(GatewayError::Internal))
        }
        .boxed()
        .shared();
        flights.insert(key, (epoch, flight.clone()));
        (flight, true)
    }

    /// The key of a request, borrowed from it (see [`key::KeyParts`]): scope,
    /// path, normalised query and, when the upstream varies on request
    /// headers, the request's variant.
    fn key_for<'r>(&self, scope: &'r str, req: &'r Request<Body>) -> key::KeyRef<'r> {
        let mut key = key::KeyRef::new(scope, req.uri().path(), req.uri().query());
        let cache = &self.layer.cache;
        if cache.any_vary.load(Ordering::SeqCst) {
            if let Some(names) = cache.vary.get(&key as &dyn key::KeyParts) {
                key.variant = key::variant(&names, req.headers());
            }
        }
        key
    }

    /// A cacheable read: `entry` is what the store holds for `key` (looked up
    /// by `call`, which answered fresh hits without coming here).
    #[allow(clippy::too_many_arguments)]
    async fn handle(
        self,
        req: Request<Body>,
        route: Route,
        policy: RoutePolicy,
        scope: Arc<str>,
        key: CacheKey,
        entry: Option<Arc<CachedResponse>>,
        client_revalidate: bool,
    ) -> Result<Response<Body>, GatewayError> {
        let cache = self.layer.cache.clone();
        let now = cache.clock.now();
        let method = req.method().clone();
        let if_none_match = req.headers().get(header::IF_NONE_MATCH).cloned();
        let route_label = route.as_str();

        if let Some(entry) = &entry {
            if !client_revalidate && entry.usable(now) && cache.in_backoff(&scope, now) {
                count(route_label, &scope, "stale-backoff");
                return Ok(from_entry(
                    entry,
                    &method,
                    if_none_match.as_ref(),
                    now,
                    CacheStatus::StaleBackoff,
                ));
            }
            if !client_revalidate && entry.within_stale_while_revalidate(now) {
                // Refresh once in the background (joins a refresh already in the air).
                let parts = clone_parts(&req);
                let _ = self.flight(Fill {
                    inner: self.inner.clone(),
                    cache: cache.clone(),
                    template: parts,
                    key: key.clone(),
                    stale: Some(entry.clone()),
                    policy: policy.clone(),
                    route: route.clone(),
                });
                count(route_label, &scope, "stale");
                return Ok(from_entry(
                    entry,
                    &method,
                    if_none_match.as_ref(),
                    now,
                    CacheStatus::StaleWhileRevalidate,
                ));
            }
        }

        // `only-if-cached` (RFC 9111 5.2.1.7): what the cache could not answer
        // above is 504, and nothing goes upstream.
        if policy::parse_cache_control(req.headers()).only_if_cached {
            count(route_label, &scope, "not-cached");
            return Err(GatewayError::NotCached);
        }
        let stale = entry.filter(|e| {
            // Validators of an entry past its lifetime are still worth sending,
            // except for job results, whose signed URLs may have expired.
            e.usable(now) || !matches!(route, Route::Job { .. })
        });
        let parts = clone_parts(&req);
        let (flight, led) = self.flight(Fill {
            inner: self.inner.clone(),
            cache: cache.clone(),
            template: parts,
            key: key.clone(),
            stale: stale.clone(),
            policy: policy.clone(),
            route: route.clone(),
        });
        let collapsed = !led;
        let result = match tokio::time::timeout(cache.settings.coalesce_timeout, flight).await {
            Ok(r) => r,
            Err(_) => FetchResult::Failed(GatewayError::UpstreamTimeout),
        };
        let now = cache.clock.now();
        let had_stale = stale.is_some();
        let outcome = |fwd_status: u16, stored: bool, reason: Option<NoStoreReason>| {
            if client_revalidate {
                CacheStatus::ClientRevalidate { fwd_status, stored }
            } else if had_stale {
                CacheStatus::Revalidated {
                    fwd_status,
                    stored,
                    collapsed,
                }
            } else {
                CacheStatus::Miss {
                    fwd_status,
                    stored,
                    collapsed,
                    reason,
                }
            }
        };
        let serve_stale = |fwd_status: Option<u16>| {
            stale
                .as_ref()
                .filter(|s| s.within_stale_if_error(now))
                .map(|s| {
                    count(route_label, &scope, "stale-if-error");
                    from_entry(
                        s,
                        &method,
                        if_none_match.as_ref(),
                        now,
                        CacheStatus::StaleIfError { fwd_status },
                    )
                })
        };
        match result {
            FetchResult::Stored {
                entry,
                fwd_status,
                upstream,
                shared,
            } => {
                // A caller that joined before the Vary index knew the
                // upstream varies (a cold key) shares the answer only if its
                // own headers pick the same variant; otherwise it fetches its
                // own, uncoalesced.
                if collapsed && key::variant(&entry.vary, req.headers()) != entry.variant {
                    count(route_label, &scope, "bypass");
                    let res = call_inner(self.inner.clone(), req).await?;
                    return Ok(finish(
                        res,
                        CacheStatus::Bypass(NoStoreReason::OtherVariant),
                    ));
                }
                let status = if shared {
                    CacheStatus::Shared { collapsed }
                } else {
                    outcome(fwd_status, true, None)
                };
                let counted = match status {
                    CacheStatus::Shared { .. } => "shared",
                    _ if collapsed => "collapsed",
                    _ => "miss",
                };
                count(route_label, &scope, counted);
                let mut res = from_entry(&entry, &method, if_none_match.as_ref(), now, status);
                // The upstream's status and latency, for the log line of the caller that led.
                if let (Some(info), false) = (upstream, collapsed) {
                    res.extensions_mut().insert(info);
                }
                Ok(res)
            }
            FetchResult::NotStored { response, reason } => {
                if is_upstream_error(response.status) {
                    if let Some(res) = serve_stale(Some(response.status.as_u16())) {
                        return Ok(res);
                    }
                }
                if collapsed && !response.answers(req.headers()) {
                    // The leader's answer varies on a header this request
                    // sends differently (and was not stored, so the Vary
                    // index could not tell): fetch our own, uncoalesced.
                    count(route_label, &scope, "bypass");
                    let res = call_inner(self.inner.clone(), req).await?;
                    return Ok(finish(res, CacheStatus::Bypass(reason)));
                }
                count(
                    route_label,
                    &scope,
                    if collapsed { "collapsed" } else { "miss" },
                );
                let status = outcome(response.status.as_u16(), false, Some(reason));
                Ok(from_buffered(&response, &method, status))
            }
            FetchResult::Streaming(slot) => {
                let taken = crate::sync::lock(&slot).take();
                count(route_label, &scope, "bypass");
                match taken {
                    Some(mut res) => {
                        if method == Method::HEAD {
                            *res.body_mut() = crate::error::empty_body();
                        }
                        Ok(finish(res, CacheStatus::Bypass(NoStoreReason::TooLarge)))
                    }
                    None => {
                        let res = call_inner(self.inner.clone(), req).await?;
                        Ok(finish(res, CacheStatus::Bypass(NoStoreReason::TooLarge)))
                    }
                }
            }
            FetchResult::Failed(err) => {
                // Over the scope's upstream budget: anything still usable will do.
                let budget = matches!(
                    err,
                    GatewayError::RateLimited { .. }
                        | GatewayError::Overloaded { .. }
                        | GatewayError::CircuitOpen { .. }
                );
                if budget {
                    if let Some(s) = stale.as_ref().filter(|s| s.usable(now)) {
                        count(route_label, &scope, "stale-budget");
                        return Ok(from_entry(
                            s,
                            &method,
                            if_none_match.as_ref(),
                            now,
                            CacheStatus::StaleBudget,
                        ));
                    }
                }
                if let Some(res) = serve_stale(None) {
                    return Ok(res);
                }
                Err(err)
            }
        }
    }
}

fn count(route: &str, scope: &str, outcome: &'static str) {
    crate::telemetry::with_counter(
        "rungen_gateway_cache_requests_total",
        &[("route", route), ("scope", scope), ("outcome", outcome)],
        |c| c.increment(1),
    );
}

/// A copy of a request's head (method, URI, headers, extensions).
fn clone_parts(req: &Request<Body>) -> http::request::Parts {
    let mut builder = Request::builder()
        .method(req.method().clone())
        .uri(req.uri().clone())
        .version(req.version());
    if let Some(h) = builder.headers_mut() {
        *h = req.headers().clone();
    }
    if let Some(ext) = builder.extensions_mut() {
        *ext = req.extensions().clone();
    }
    builder
        .body(())
        .unwrap_or_else(|_| Request::new(()))
        .into_parts()
        .0
}

impl tower::Service<Request<Body>> for CacheService {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = StepFuture<Response<Body>, GatewayError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let context = RequestContext::of(req.extensions());
        let (Some(route), Some(caller)) = (context.route.clone(), context.caller.as_ref()) else {
            return StepFuture::wait(self.inner.call(req));
        };
        let scope = self.layer.scope_name(&caller.scope.name);
        let current = self.layer.cache.policies.load();
        let policy = if current.0 {
            current.1.for_route(&route).cloned()
        } else {
            None
        };

        let cacheable = policy.as_ref().map(|_| {
            let has_body = !http_body::Body::is_end_stream(req.body());
            policy::request_cacheable(req.method(), has_body)
        });
        match (policy, cacheable) {
            (Some(policy), Some(Ok(()))) => {
                let cache = &self.layer.cache;
                let key = self.key_for(&scope, &req);
                let client_revalidate = policy.allow_client_revalidate
                    && policy::client_wants_revalidation(req.headers());
                let entry = cache.entries.get(&key as &dyn key::KeyParts);
                // The hot path: a fresh hit is answered here, without a task,
                // a clone of the services behind, or an async state machine.
                if let Some(e) = entry.as_ref().filter(|_| !client_revalidate) {
                    let now = cache.clock.now();
                    if e.is_fresh(now) {
                        count(route.as_str(), &scope, "hit");
                        let res = from_entry(
                            e,
                            req.method(),
                            req.headers().get(header::IF_NONE_MATCH),
                            now,
                            CacheStatus::Hit,
                        );
                        return StepFuture::ok(res);
                    }
                }
                let key = key.to_key(&scope);
                let this = self.clone();
                // The clone in `self` was ready; swap so the ready one is used.
                let this = CacheService {
                    inner: std::mem::replace(&mut self.inner, this.inner),
                    layer: this.layer,
                };
                StepFuture::wait(this.handle(
                    req,
                    route,
                    policy,
                    scope,
                    key,
                    entry,
                    client_revalidate,
                ))
            }
            (policy, reason) => {
                let unsafe_method =
                    !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
                let mark = policy.is_some()
                    || unsafe_method
                        && matches!(
                            route,
                            Route::AppList
                                | Route::App { .. }
                                | Route::RunAsync { .. }
                                | Route::Job { .. }
                        );
                let reason = match reason {
                    Some(Err(r)) => r,
                    _ => NoStoreReason::Route,
                };
                let invalidate = unsafe_method.then(|| {
                    let (exact, prefixes) = invalidations(req.method(), &route, req.uri().path());
                    let scopes = self
                        .layer
                        .scope_groups
                        .get(&scope)
                        .cloned()
                        .unwrap_or_else(|| Arc::from(vec![scope.clone()]));
                    (scopes, exact, prefixes)
                });
                let pending = invalidate.map(|(scopes, exact, prefixes)| PendingInvalidation {
                    cache: self.layer.cache.clone(),
                    scopes,
                    exact,
                    prefixes,
                    route: route.clone(),
                    armed: true,
                });
                let fut = self.inner.call(req);
                StepFuture::wait(async move {
                    let res = fut.await;
                    if let Some(pending) = pending {
                        pending.settle(may_have_written(&res));
                    }
                    let res = res?;
                    Ok(if mark {
                        finish(res, CacheStatus::Bypass(reason))
                    } else {
                        res
                    })
                })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_flight_slot_is_given_up_even_when_its_fill_panics() {
        let cache = Cache::new(
            CacheSettings::default(),
            Arc::new(crate::clock::SystemClock),
        );
        let scope: Arc<str> = Arc::from("acme");
        let key = key::KeyRef::new("acme", "/app", None).to_key(&scope);
        let failed: Flight = async { FetchResult::Failed(GatewayError::Internal) }
            .boxed()
            .shared();
        let slots = |c: &Cache| c.flights.lock().unwrap().len();
        // A newer fetch's slot (epoch 1) is not the old fill's to give up.
        cache
            .flights
            .lock()
            .unwrap()
            .insert(key.clone(), (1, failed.clone()));
        drop(FlightSlot {
            cache: cache.clone(),
            key: key.clone(),
            epoch: 0,
        });
        assert_eq!(slots(&cache), 1);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _slot = FlightSlot {
                cache: cache.clone(),
                key: key.clone(),
                epoch: 1,
            };
            panic!("a fill panicked");
        }));
        assert!(unwound.is_err());
        assert_eq!(slots(&cache), 0, "the panicked fill's slot is free");
    }

    #[test]
    fn a_change_covers_only_its_keys_and_a_forgotten_one_covers_all() {
        let cache = Cache::new(
            CacheSettings::default(),
            Arc::new(crate::clock::SystemClock),
        );
        let (acme, personal): (Arc<str>, Arc<str>) = (Arc::from("acme"), Arc::from("personal"));
        let list = CacheKey::new(&acme, "/app", None);
        let app = CacheKey::new(&acme, "/app/a1", Some("x=1"));
        let theirs = CacheKey::new(&personal, "/app", None);
        let start = cache.epoch();
        assert!(!cache.changed_since(start, &list), "nothing happened");
        cache.invalidate_local(std::slice::from_ref(&acme), &["/app".to_string()], &[]);
        assert!(cache.changed_since(start, &list));
        assert!(!cache.changed_since(start, &app), "another path");
        assert!(!cache.changed_since(start, &theirs), "another scope");
        let after = cache.epoch();
        assert!(!cache.changed_since(after, &list), "only changes since");
        cache.purge_local(&PurgeScope {
            scope: Some("acme".into()),
            path_prefix: Some("/app/a1".into()),
        });
        assert!(cache.changed_since(after, &app));
        assert!(!cache.changed_since(after, &theirs));
        // A fill that outlived more changes than the log keeps: raced.
        let old = cache.epoch();
        for _ in 0..=ChangeLog::MAX {
            cache.invalidate_local(
                std::slice::from_ref(&acme),
                &["/elsewhere".to_string()],
                &[],
            );
        }
        assert!(cache.changed_since(old, &theirs));
        let recent = cache.epoch() - 1;
        assert!(!cache.changed_since(recent, &theirs));
        assert_eq!(cache.changes.lock().unwrap().changes.len(), ChangeLog::MAX);
    }

    #[test]
    fn scopes_of_one_upstream_area_invalidate_together() {
        let team = |name: &str, id: Option<&str>, key: &str| {
            Arc::new(crate::config::Team {
                name: name.into(),
                team_id: id.map(|i| HeaderValue::from_str(i).unwrap()),
                api_key: crate::secret::Secret::new(key),
            })
        };
        let teams = [
            team("mine", None, "k1"),
            team("mine-again", None, "k1"),
            team("theirs", None, "k2"),
            team("acme", Some("T-1"), "k1"),
            team("acme-ops", Some("t-1"), "k2"),
            team("other", Some("t-2"), "k1"),
        ];
        let layer = CacheLayer::new(
            Cache::new(
                CacheSettings::default(),
                Arc::new(crate::clock::SystemClock),
            ),
            &teams,
        );
        let group = |name: &str| {
            let mut g: Vec<String> = layer.scope_groups[name]
                .iter()
                .map(|s| s.to_string())
                .collect();
            g.sort();
            g
        };
        assert_eq!(
            group("mine"),
            ["mine", "mine-again"],
            "one key's personal area"
        );
        assert_eq!(group("theirs"), ["theirs"]);
        assert_eq!(group("acme"), ["acme", "acme-ops"], "one team, any key");
        assert_eq!(group("other"), ["other"]);
    }

    #[test]
    fn age_values_are_the_decimal_seconds_shared_or_not() {
        for secs in [0u64, 1, 9, 10, 119, 120, 121, 86_400, u64::MAX] {
            assert_eq!(age_value(secs).to_str().unwrap(), secs.to_string());
        }
    }

    #[test]
    fn writes_invalidate_what_they_change() {
        let app = Route::App {
            app_id: "a1".into(),
        };
        assert_eq!(
            invalidations(&Method::POST, &Route::AppList, "/app").0,
            vec!["/app"]
        );
        assert_eq!(
            invalidations(&Method::PUT, &app, "/app/a1").0,
            vec!["/app/a1", "/app"]
        );
        let (exact, prefixes) = invalidations(&Method::DELETE, &app, "/app/a1");
        assert_eq!(exact, vec!["/app/a1", "/app"]);
        assert_eq!(prefixes, vec!["/app/a1/"]);
        let run = Route::RunAsync {
            app_id: "a1".into(),
        };
        assert_eq!(
            invalidations(&Method::POST, &run, "/app/a1/run_async").0,
            vec!["/app/a1", "/app"]
        );
        let job = Route::Job {
            app_id: "a1".into(),
            job_id: "j1".into(),
        };
        assert_eq!(
            invalidations(&Method::PUT, &job, "/app/a1/job/j1").0,
            vec!["/app/a1/job/j1", "/app/a1", "/app"]
        );
        let other = Route::Other {
            template: "/app/*".into(),
        };
        assert_eq!(
            invalidations(&Method::DELETE, &other, "/app/a1/x/y").0,
            vec!["/app/a1/x/y"]
        );
    }
}
