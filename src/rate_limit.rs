//! Rate limits (governor, GCRA), in three places on the request path:
//!
//! - [`OverloadLayer`]: a global cap on in-flight requests; over it, 503 +
//!   `Retry-After` at once instead of an unbounded queue.
//! - [`CallerLimitLayer`] (step 4, after caller auth): every request a client
//!   makes, cache hits included, against the client's quota. Every response
//!   carries `RateLimit-Policy` / `RateLimit` (IETF httpapi draft structured
//!   fields), computed per request, never cached.
//! - [`UpstreamBudgetLayer`] (after the cache): only requests that really go
//!   upstream, against the scope's budget and concurrency cap; an upstream
//!   429 pauses the scope until its `Retry-After`.
//!
//! Requests that fail authentication are limited per source IP instead
//! ([`Limits::check_unauthenticated`]), so guessing tokens is slow and a
//! client's quota is never spent on 401/403.
//! This step never parses credentials: it reads the `Caller` that auth left.

use crate::clock::SharedClock;
use crate::config::Client;
use crate::context::RequestContext;
use crate::error::{Body, GatewayError, error_response};
use crate::step::{Step, StepFuture};
use crate::sync::{lock, read, write};
use futures_util::future::{BoxFuture, FutureExt};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Maps keyed by configured names (clients, scopes), read on every request:
/// foldhash instead of SipHash (the names come from the config, not callers).
pub type ByName<V> = HashMap<String, V, foldhash::fast::RandomState>;

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// The proxy chain a trusted proxy reports (see [`client_ip`]).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;
type Keyed<K> = RateLimiter<
    K,
    governor::state::keyed::DefaultKeyedStateStore<K>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// What a limiter said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed { remaining: u32 },
    Limited { wait: Duration },
}

/// One cell from a direct limiter.
pub fn check<C: Clock>(limiter: &Direct<C>) -> Decision {
    match limiter.check() {
        Ok(snapshot) => Decision::Allowed {
            remaining: snapshot.remaining_burst_capacity(),
        },
        Err(not_until) => Decision::Limited {
            wait: not_until.wait_time_from(limiter.clock().now()),
        },
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `RateLimit-Policy: "<name>";q=<burst>;w=<seconds to refill the burst>`.
/// The same for every request of a client: the last one made on this thread
/// is kept (a clone is a reference count, not a formatting and an allocation).
pub fn policy_header(name: &str, quota: &Quota) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Quota, Box<str>, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    let make = || {
        let q = u64::from(quota.burst_size().get());
        let w = ceil_secs(quota.burst_size_replenished_in()).max(1);
        header_value(name, b"q", q, b"w", w)
    };
    LAST.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return make();
        };
        match &*last {
            Some((q, n, v)) if q == quota && **n == *name => v.clone(),
            _ => {
                let v = make();
                *last = Some((*quota, name.into(), v.clone()));
                v
            }
        }
    })
}

/// `"<name>";<k1>=<v1>;<k2>=<v2>`, written byte by byte on the stack (these
/// are built on every request the limiter decides: no formatting machinery,
/// no `String` in between).
fn header_value(name: &str, k1: &[u8], v1: u64, k2: &[u8], v2: u64) -> HeaderValue {
    let (mut a, mut b) = (itoa::Buffer::new(), itoa::Buffer::new());
    let parts: [&[u8]; 10] = [
        b"\"",
        name.as_bytes(),
        b"\";",
        k1,
        b"=",
        a.format(v1).as_bytes(),
        b";",
        k2,
        b"=",
        b.format(v2).as_bytes(),
    ];
    let mut buf = [0u8; 128];
    let mut len = 0;
    for part in parts {
        let Some(room) = buf.get_mut(len..len + part.len()) else {
            return HeaderValue::from_static("\"caller\"");
        };
        room.copy_from_slice(part);
        len += part.len();
    }
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("\"caller\""))
}

/// `RateLimit: "<name>";r=<remaining>;t=<seconds until the burst is full again>`
/// (on a 429, `t` equals `Retry-After`).
pub fn ratelimit_header(name: &str, quota: &Quota, decision: Decision) -> HeaderValue {
    let (r, t) = match decision {
        Decision::Allowed { remaining } => {
            let missing = quota.burst_size().get().saturating_sub(remaining);
            (remaining, ceil_secs(quota.replenish_interval() * missing))
        }
        Decision::Limited { wait } => (0, ceil_secs(wait).max(1)),
    };
    crate::telemetry::never_indexed(header_value(name, b"r", u64::from(r), b"t", t))
}

/// The source IP of a request: the peer, or, only when the peer is a trusted
/// proxy, the first untrusted hop of `X-Forwarded-For` counted from the right
/// (so a caller cannot choose its own bucket). Every `X-Forwarded-For` line
/// counts, in order (a proxy may add its own line rather than append to the
/// caller's), and IPv4-mapped IPv6 addresses (a dual-stack listener's IPv4
/// peers) are their IPv4 selves. A hop may carry a port (`192.0.2.7:5123`,
/// `[2001:db8::7]:443`, as some load balancers append). A hop that is not an
/// address matters only where the trusted proxies wrote it (right of the
/// first untrusted hop): then the chain is unreadable and the peer counts;
/// whatever the caller sent further left is never read.
pub fn client_ip(
    peer: IpAddr,
    forwarded_for: http::header::GetAll<'_, HeaderValue>,
    trusted: &[IpNet],
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<Option<IpAddr>> = forwarded_for
        .iter()
        .flat_map(|line| match line.to_str() {
            Ok(line) => line.split(',').map(parse_hop).collect::<Vec<_>>(),
            Err(_) => vec![None],
        })
        .collect();
    for hop in hops.iter().rev() {
        match hop {
            Some(ip) if is_trusted(ip) => {}
            Some(ip) => return *ip,
            None => return peer,
        }
    }
    // Trusted all the way: the hop furthest from us.
    hops.first().copied().flatten().unwrap_or(peer)
}

/// One `X-Forwarded-For` hop: an address, with or without a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(ip.to_canonical())
}

/// The bucket the per-IP limits count a source IP in: an IPv4 address is its
/// own; an IPv6 address counts as its /64. One subscriber or LAN usually gets
/// a whole /64 and may use any of its 2^64 addresses, so counting addresses
/// would let one client take any number of buckets (connection slots,
/// failed-auth guesses).
pub fn per_ip_bucket(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !(u128::from(u64::MAX)),
        )),
        v4 => v4,
    }
}

/// Limit settings, from `[rate_limit]`, `[[clients]] rate_limit` and `[[teams]]`.
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    pub enabled: bool,
    /// Per client, unless the client sets its own.
    pub default_quota: Quota,
    /// Per source IP, for requests that fail authentication.
    pub unauthenticated_quota: Quota,
    pub trusted_proxies: Vec<IpNet>,
    /// Global cap on requests in flight; over it, 503.
    pub max_in_flight: usize,
    /// Client name -> its own quota.
    pub client_quotas: ByName<Quota>,
    /// Per source IP, for public clients (besides their total quota).
    pub public_ip_quota: Quota,
    /// Public client name -> its own per-IP quota.
    pub client_ip_quotas: ByName<Quota>,
    /// Scope name -> its upstream budget.
    pub scope_budgets: ByName<ScopeBudget>,
    /// How often per-IP state that has fully refilled is dropped.
    pub prune_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeBudget {
    pub quota: Quota,
    pub max_concurrent: usize,
    /// How long a request waits for budget or a concurrency slot before it is refused.
    pub queue_timeout: Duration,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            default_quota: quota(50, Duration::from_secs(1), 100),
            unauthenticated_quota: quota(60, Duration::from_secs(60), 30),
            trusted_proxies: Vec::new(),
            max_in_flight: 4096,
            client_quotas: ByName::default(),
            public_ip_quota: quota(120, Duration::from_secs(60), 30),
            client_ip_quotas: ByName::default(),
            scope_budgets: ByName::default(),
            prune_interval: Duration::from_secs(60),
        }
    }
}

/// One replica's share of a quota among `replicas`: the rate and the burst divided.
pub fn share(q: Quota, replicas: u32) -> Quota {
    if replicas <= 1 {
        return q;
    }
    let burst = (q.burst_size().get() / replicas).max(1);
    Quota::with_period(q.replenish_interval() * replicas)
        .unwrap_or(q)
        .allow_burst(std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN))
}

/// `count` requests per `per`, with a burst of `burst` (all at least 1).
pub fn quota(count: u32, per: Duration, burst: u32) -> Quota {
    let count = count.max(1);
    let period = per / count;
    let burst = std::num::NonZeroU32::new(burst.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or(Quota::per_second(std::num::NonZeroU32::MIN))
        .allow_burst(burst)
}

pub fn default_scope_budget() -> ScopeBudget {
    ScopeBudget {
        quota: quota(50, Duration::from_secs(1), 100),
        max_concurrent: 64,
        queue_timeout: Duration::from_secs(1),
    }
}

/// The clock of the caller and scope limiters: quanta's, as governor's
/// default clock, but one for the process where governor's keeps a copy (its
/// calibration, ~40 bytes) in every limiter. With thousands of clients a hit
/// finds its client's limiter out of the CPU's caches; without the copy, the
/// limiter and its quota fit one cache line ([`CallerLimiter`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct LimiterClock;

impl Clock for LimiterClock {
    type Instant = governor::nanos::Nanos;

    fn now(&self) -> Self::Instant {
        static CLOCK: std::sync::OnceLock<quanta::Clock> = std::sync::OnceLock::new();
        let clock = CLOCK.get_or_init(quanta::Clock::new);
        clock.delta_as_nanos(0, clock.raw()).into()
    }
}

impl governor::clock::ReasonablyRealtime for LimiterClock {}

/// A client's (or a scope's) quota and its limiter: read together on every
/// request, in one cache line.
#[repr(C, align(64))]
pub struct CallerLimiter {
    quota: Quota,
    limiter: Direct<LimiterClock>,
}

impl CallerLimiter {
    fn new(quota: Quota) -> Self {
        CallerLimiter {
            quota,
            limiter: RateLimiter::direct_with_clock(quota, LimiterClock).with_middleware(),
        }
    }
}

/// A thread's copy of one client's limiter (in its `client_local` record),
/// good while [`Limits`]'s limiter generation is the one it was taken at.
#[derive(Default)]
pub struct LocalLimiter(Option<(u64, Arc<CallerLimiter>)>);

/// Limiter generations of every [`Limits`] in the process come from this one
/// counter, so a copy taken from one never matches another's generation.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}
/// A public client's per-IP quota and its keyed limiter.
type IpLimiter = (Quota, Keyed<IpAddr>);

struct ScopeState {
    budget: ScopeBudget,
    /// The local limiter, at this replica's share of the budget.
    limiter: RwLock<Arc<CallerLimiter>>,
    slots: Arc<Semaphore>,
    paused_until: Mutex<Option<Instant>>,
}

/// Limiter state; one per process, kept across config reloads (a limiter
/// whose quota did not change keeps its state).
pub struct Limits {
    /// Read on every request: swapped whole on reload, read without a lock.
    settings: arc_swap::ArcSwap<RateLimitSettings>,
    callers: RwLock<ByName<Arc<CallerLimiter>>>,
    /// Moves whenever `callers` changes: a thread's copy of a limiter
    /// ([`LocalLimiter`]) taken at this generation is the one `callers` holds.
    callers_generation: AtomicU64,
    unauthenticated: RwLock<Arc<Keyed<IpAddr>>>,
    /// Source IPs the unauthenticated limit refused, and until when: a signed
    /// token from one is refused without its signature being checked (see
    /// [`Limits::refused_ip_wait`]). Pruned with the limiters, at most
    /// [`REFUSED_IPS_MAX`] entries.
    refused_ips: RwLock<HashMap<IpAddr, Instant, foldhash::fast::RandomState>>,
    /// Public clients: per (client, source IP).
    public_ips: RwLock<ByName<Arc<IpLimiter>>>,
    scopes: RwLock<ByName<Arc<ScopeState>>>,
    in_flight: AtomicUsize,
    /// Time for upstream pauses (tests move it by hand).
    clock: SharedClock,
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").finish_non_exhaustive()
    }
}

/// At most this many source IPs are remembered as refused (see
/// `Limits::refused_ips`); past it, a refused IP's signed tokens are checked
/// as before.
const REFUSED_IPS_MAX: usize = 100_000;

fn count_unauthenticated_limited() {
    metrics::counter!("rungen_gateway_rate_limit_decisions_total", "policy" => "unauthenticated", "decision" => "limited", "client" => "-", "scope" => "-").increment(1);
}

impl Limits {
    pub fn new(settings: RateLimitSettings) -> Arc<Self> {
        Self::with_clock(settings, Arc::new(crate::clock::SystemClock))
    }

    pub fn with_clock(settings: RateLimitSettings, clock: SharedClock) -> Arc<Self> {
        let unauth = RateLimiter::keyed(settings.unauthenticated_quota).with_middleware();
        let limits = Arc::new(Self {
            settings: arc_swap::ArcSwap::from_pointee(settings.clone()),
            callers: RwLock::new(ByName::default()),
            callers_generation: AtomicU64::new(next_generation()),
            unauthenticated: RwLock::new(Arc::new(unauth)),
            refused_ips: RwLock::new(HashMap::default()),
            public_ips: RwLock::new(ByName::default()),
            scopes: RwLock::new(ByName::default()),
            in_flight: AtomicUsize::new(0),
            clock,
            cluster: std::sync::OnceLock::new(),
        });
        limits.configure(settings);
        limits
    }

    /// Applies new settings; limiters whose quota is unchanged keep their state.
    pub fn configure(&self, settings: RateLimitSettings) {
        {
            let mut callers = write(&self.callers);
            // Limiters hold this replica's share (cluster mode without Redis).
            let replicas = self.replicas();
            callers.retain(|name, l| {
                let q = settings
                    .client_quotas
                    .get(name)
                    .unwrap_or(&settings.default_quota);
                l.quota == share(*q, replicas)
            });
            self.callers_generation
                .store(next_generation(), Ordering::Release);
        }
        {
            let mut scopes = write(&self.scopes);
            // A changed budget gets a new limiter and semaphore, but an upstream
            // 429's pause is the upstream's word and outlives the reload.
            let mut pauses = HashMap::new();
            scopes.retain(|name, s| {
                let keep = settings.scope_budgets.get(name) == Some(&s.budget);
                if let (false, Some(until)) = (keep, *lock(&s.paused_until)) {
                    pauses.insert(name.clone(), until);
                }
                keep
            });
            for (name, budget) in &settings.scope_budgets {
                scopes.entry(name.clone()).or_insert_with(|| {
                    Arc::new(ScopeState {
                        budget: budget.clone(),
                        limiter: RwLock::new(Arc::new(CallerLimiter::new(budget.quota))),
                        slots: Arc::new(Semaphore::new(budget.max_concurrent)),
                        paused_until: Mutex::new(pauses.remove(name)),
                    })
                });
            }
        }
        let old = self.settings.load().unauthenticated_quota;
        if old != settings.unauthenticated_quota {
            *write(&self.unauthenticated) =
                Arc::new(RateLimiter::keyed(settings.unauthenticated_quota).with_middleware());
            write(&self.refused_ips).clear();
        }
        self.settings.store(Arc::new(settings));
    }

    pub fn settings(&self) -> Arc<RateLimitSettings> {
        self.settings.load_full()
    }

    /// Live replicas sharing the quotas (1 without cluster mode).
    pub fn replicas(&self) -> u32 {
        self.cluster.get().map_or(1, |c| c.replicas())
    }

    /// Cluster mode: budgets in Redis, quotas shared among live replicas.
    pub fn set_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// The client's quota and this request's decision: from the cluster
    /// lease when there is one (see `cluster::lease`), else the local limiter.
    fn check_caller(&self, client: &Arc<Client>, leased: Option<&LeaseDecision>) -> CallerCheck {
        if let Some(LeaseDecision(Some((q, d)))) = leased {
            return CallerCheck::Now(*q, *d);
        }
        if let (Some(c), None) = (self.cluster.get(), leased) {
            let settings = self.settings();
            let q = *settings
                .client_quotas
                .get(&client.name)
                .unwrap_or(&settings.default_quota);
            match c.lease_take(&client.name, &q) {
                crate::cluster::lease::LeaseTake::Decided(d) => return CallerCheck::Now(q, d),
                crate::cluster::lease::LeaseTake::Refill => {
                    let (c, client) = (c.clone(), client.name.clone());
                    return CallerCheck::Lease(
                        q,
                        async move { c.lease_refill(&client, q).await }.boxed(),
                    );
                }
                crate::cluster::lease::LeaseTake::Local => {}
            }
        }
        let q = self.caller_quota(&client.name);
        // The generation before the map is read: a copy taken from a map
        // that changes meanwhile carries the older number.
        let generation = self.callers_generation.load(Ordering::Acquire);
        crate::client_local::with(client, |local| {
            let limiter = match &local.limiter.0 {
                Some((g, l)) if *g == generation && l.quota == q => l,
                _ => {
                    &local
                        .limiter
                        .0
                        .insert((generation, self.caller_limiter(&client.name, q)))
                        .1
                }
            };
            CallerCheck::Now(q, check(&limiter.limiter))
        })
    }

    /// The client's quota at this replica.
    fn caller_quota(&self, client: &str) -> Quota {
        let settings = self.settings.load();
        share(
            *settings
                .client_quotas
                .get(client)
                .unwrap_or(&settings.default_quota),
            self.replicas(),
        )
    }

    /// The client's limiter at quota `q` (a new one if the quota changed).
    fn caller_limiter(&self, client: &str, q: Quota) -> Arc<CallerLimiter> {
        if let Some(l) = read(&self.callers).get(client).filter(|l| l.quota == q) {
            return l.clone();
        }
        let fresh = Arc::new(CallerLimiter::new(q));
        let mut callers = write(&self.callers);
        callers.insert(client.to_string(), fresh.clone());
        // Under the lock: generations follow the map's changes in order.
        self.callers_generation
            .store(next_generation(), Ordering::Release);
        fresh
    }

    /// Spends one cell of the source IP's unauthenticated budget. `Err(wait)` when over it.
    pub fn check_unauthenticated(&self, ip: IpAddr) -> Result<(), Duration> {
        let settings = self.settings();
        if !settings.enabled {
            return Ok(());
        }
        let limiter = read(&self.unauthenticated).clone();
        match limiter.check_key(&ip) {
            Ok(_) => Ok(()),
            Err(nu) => {
                let wait = nu.wait_time_from(limiter.clock().now());
                let mut refused = write(&self.refused_ips);
                if refused.len() < REFUSED_IPS_MAX || refused.contains_key(&ip) {
                    refused.insert(ip, Instant::now() + wait);
                }
                drop(refused);
                count_unauthenticated_limited();
                Err(wait)
            }
        }
    }

    /// How long the source IP stays refused by the unauthenticated limit, if
    /// it is refused now. Asked before a signed token's signature is checked
    /// (a public-key verification costs tens of microseconds): an IP past its
    /// failed-auth limit gets 429 for such a token without spending that CPU,
    /// valid or not. Spends nothing, and takes only a read lock (every
    /// signed token asks); refusals that are over go at the next prune.
    pub fn refused_ip_wait(&self, ip: IpAddr) -> Option<Duration> {
        if !self.settings.load().enabled {
            return None;
        }
        let until = *read(&self.refused_ips).get(&ip)?;
        let wait = until.checked_duration_since(Instant::now())?;
        count_unauthenticated_limited();
        Some(wait)
    }

    /// The per-IP bucket ([`per_ip_bucket`]) of a request's source IP (see
    /// [`client_ip`]), if it came over a socket.
    pub fn source_ip<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        let peer = RequestContext::of(req.extensions()).peer?.ip();
        Some(per_ip_bucket(client_ip(
            peer,
            req.headers().get_all(X_FORWARDED_FOR),
            &self.settings().trusted_proxies,
        )))
    }

    /// Drops per-IP state that has fully refilled (bounded memory under a flood of IPs).
    pub fn prune(&self) {
        let l = read(&self.unauthenticated).clone();
        l.retain_recent();
        l.shrink_to_fit();
        let now = Instant::now();
        let mut refused = write(&self.refused_ips);
        refused.retain(|_, until| *until > now);
        refused.shrink_to_fit();
        drop(refused);
        let public: Vec<_> = read(&self.public_ips).values().cloned().collect();
        for l in public {
            l.1.retain_recent();
            l.1.shrink_to_fit();
        }
    }

    /// One cell of a public client's per-IP budget.
    fn check_public_ip(&self, client: &str, ip: IpAddr) -> (Quota, Decision) {
        let settings = self.settings();
        let q = *settings
            .client_ip_quotas
            .get(client)
            .unwrap_or(&settings.public_ip_quota);
        let limiter = {
            let existing = read(&self.public_ips).get(client).cloned();
            match existing {
                Some(l) if l.0 == q => l,
                _ => write(&self.public_ips)
                    .entry(client.to_string())
                    .and_modify(|l| {
                        if l.0 != q {
                            *l = Arc::new((q, RateLimiter::keyed(q).with_middleware()));
                        }
                    })
                    .or_insert_with(|| Arc::new((q, RateLimiter::keyed(q).with_middleware())))
                    .clone(),
            }
        };
        let decision = match limiter.1.check_key(&ip) {
            Ok(s) => Decision::Allowed {
                remaining: s.remaining_burst_capacity(),
            },
            Err(nu) => Decision::Limited {
                wait: nu.wait_time_from(limiter.1.clock().now()),
            },
        };
        (q, decision)
    }

    /// Per-IP limiter entries held: source IPs with unauthenticated state,
    /// plus (public client, source IP) pairs. Bounded by what arrives
    /// between two prunes (see [`spawn_pruner`]).
    pub fn tracked_ips(&self) -> usize {
        let public: usize = read(&self.public_ips).values().map(|l| l.1.len()).sum();
        read(&self.unauthenticated).len() + public
    }

    fn scope(&self, name: &str) -> Option<Arc<ScopeState>> {
        read(&self.scopes).get(name).cloned()
    }
}

/// Prunes per-IP limiter state every `rate_limit.prune_interval` (as
/// currently configured) until the limits are dropped.
pub fn spawn_pruner(limits: &Arc<Limits>) {
    let weak = Arc::downgrade(limits);
    tokio::spawn(async move {
        loop {
            let Some(every) = weak.upgrade().map(|l| l.settings().prune_interval) else {
                return;
            };
            tokio::time::sleep(every).await;
            match weak.upgrade() {
                Some(l) => l.prune(),
                None => return,
            }
        }
    });
}

// ---------------------------------------------------------------------------
// OverloadLayer

#[derive(Clone)]
pub struct OverloadLayer {
    limits: Arc<Limits>,
}

impl OverloadLayer {
    pub fn new(limits: Arc<Limits>) -> Self {
        Self { limits }
    }
}

impl<S> tower::Layer<S> for OverloadLayer {
    type Service = Overload<S>;
    fn layer(&self, inner: S) -> Overload<S> {
        Overload {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Overload<S> {
    inner: S,
    limits: Arc<Limits>,
}

struct InFlight(Arc<Limits>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<S> tower::Service<Request<Body>> for Overload<S>
where
    S: Step,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = StepFuture<Response<Body>, GatewayError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let max = self.limits.settings.load().max_in_flight;
        let now = self.limits.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let guard = InFlight(self.limits.clone());
        if now > max {
            drop(guard);
            metrics::counter!("rungen_gateway_rate_limit_decisions_total", "policy" => "overload", "decision" => "limited", "client" => "-", "scope" => "-").increment(1);
            return StepFuture::err(GatewayError::Overloaded {
                retry_after: Duration::from_secs(1),
            });
        }
        self.inner.call(req).map(move |res| {
            drop(guard);
            res
        })
    }
}

// ---------------------------------------------------------------------------
// CallerLimitLayer

#[derive(Clone)]
pub struct CallerLimitLayer {
    limits: Arc<Limits>,
}

impl CallerLimitLayer {
    pub fn new(limits: Arc<Limits>) -> Self {
        Self { limits }
    }
}

impl<S> tower::Layer<S> for CallerLimitLayer {
    type Service = CallerLimit<S>;
    fn layer(&self, inner: S) -> CallerLimit<S> {
        CallerLimit {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallerLimit<S> {
    inner: S,
    limits: Arc<Limits>,
}

/// A caller decision waiting for a cluster lease (one Redis round trip).
enum CallerCheck {
    Now(Quota, Decision),
    Lease(Quota, BoxFuture<'static, Option<Decision>>),
}

/// The lease's decision, carried to the second pass of [`CallerLimit`]
/// (`None`: Redis failed, use the local share).
#[derive(Clone)]
struct LeaseDecision(Option<(Quota, Decision)>);

/// A public client's per-IP decision, taken before its request waited for a
/// lease (not taken twice).
#[derive(Clone, Copy)]
struct IpChecked((Quota, Decision));

impl<S> CallerLimit<S>
where
    S: Step + Clone + Send + 'static,
{
    /// Waits for the lease, then decides the request with it.
    fn after_lease(
        &mut self,
        mut req: Request<Body>,
        quota: Quota,
        lease: BoxFuture<'static, Option<Decision>>,
    ) -> StepFuture<Response<Body>, GatewayError> {
        let clone = self.inner.clone();
        let mut this = CallerLimit {
            inner: std::mem::replace(&mut self.inner, clone),
            limits: self.limits.clone(),
        };
        StepFuture::wait(async move {
            let decided = lease.await.map(|d| (quota, d));
            req.extensions_mut().insert(LeaseDecision(decided));
            tower::Service::call(&mut this, req).await
        })
    }
}

impl<S> tower::Service<Request<Body>> for CallerLimit<S>
where
    S: Step + Clone + Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = StepFuture<Response<Body>, GatewayError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let (Some(caller), true) = (
            RequestContext::of(req.extensions()).caller.as_ref(),
            self.limits.settings.load().enabled,
        ) else {
            return self.inner.call(req);
        };
        let (client, scope) = (caller.client.name.as_str(), caller.scope.name.as_str());
        // A public client is limited per source IP as well as in total. The
        // IP's limit goes first: a refused IP does not spend the total that
        // every other IP shares. The tighter of the two is what the headers
        // describe.
        // (No extensions lookup for other clients: this runs on every hit.)
        let ip_check = if caller.client.public {
            match req.extensions().get::<IpChecked>() {
                Some(checked) => Some(checked.0),
                None => self
                    .limits
                    .source_ip(&req)
                    .map(|ip| self.limits.check_public_ip(client, ip)),
            }
        } else {
            None
        };
        let (quota, decision, name) = match ip_check {
            Some((q, d @ Decision::Limited { .. })) => (q, d, "caller-ip"),
            _ => {
                let (q, d) = match self
                    .limits
                    .check_caller(&caller.client, req.extensions().get())
                {
                    CallerCheck::Now(q, d) => (q, d),
                    CallerCheck::Lease(q, lease) => {
                        if let Some(checked) = ip_check {
                            req.extensions_mut().insert(IpChecked(checked));
                        }
                        return self.after_lease(req, q, lease);
                    }
                };
                match (d, ip_check) {
                    (
                        Decision::Allowed { remaining: a },
                        Some((ip_q, ip_d @ Decision::Allowed { remaining: b })),
                    ) if b < a => (ip_q, ip_d, "caller-ip"),
                    _ => (q, d, "caller"),
                }
            }
        };
        let policy = policy_header(name, &quota);
        let state = ratelimit_header(name, &quota, decision);
        let outcome = if matches!(decision, Decision::Allowed { .. }) {
            "allowed"
        } else {
            "limited"
        };
        crate::telemetry::count_caller_decision(&caller.client, outcome, scope);
        let add_headers = move |mut res: Response<Body>| {
            res.headers_mut().insert(RATELIMIT_POLICY, policy);
            res.headers_mut().insert(RATELIMIT, state);
            crate::telemetry::LogFields::of(&mut res).rate_limit = Some(outcome);
            res
        };
        match decision {
            Decision::Limited { wait } => {
                let res = error_response(&GatewayError::RateLimited {
                    policy: name,
                    retry_after: wait,
                });
                StepFuture::ok(add_headers(res))
            }
            Decision::Allowed { .. } => self.inner.call(req).map_ok(add_headers),
        }
    }
}

// ---------------------------------------------------------------------------
// UpstreamBudgetLayer

#[derive(Clone)]
pub struct UpstreamBudgetLayer {
    limits: Arc<Limits>,
}

impl UpstreamBudgetLayer {
    pub fn new(limits: Arc<Limits>) -> Self {
        Self { limits }
    }
}

impl<S> tower::Layer<S> for UpstreamBudgetLayer {
    type Service = UpstreamBudget<S>;
    fn layer(&self, inner: S) -> UpstreamBudget<S> {
        UpstreamBudget {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct UpstreamBudget<S> {
    inner: S,
    limits: Arc<Limits>,
}

/// Why the scope's budget refused a request, and for how long.
struct Refused {
    policy: &'static str,
    wait: Duration,
}

impl ScopeState {
    /// The pause an upstream 429 set (here, or on another replica), if it lasts.
    fn paused(&self, limits: &Limits) -> Option<Refused> {
        let now = limits.clock.now();
        let until = (*lock(&self.paused_until)).filter(|u| *u > now)?;
        Some(Refused {
            policy: "upstream-paused",
            wait: until - now,
        })
    }

    fn pause(&self, limits: &Limits, wait: Duration) {
        let until = limits.clock.now() + wait;
        let mut paused = lock(&self.paused_until);
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    /// This replica's share of the budget, locally (no cluster, or Redis
    /// did not answer).
    fn local_limiter(&self, limits: &Limits) -> Arc<CallerLimiter> {
        let q = share(self.budget.quota, limits.replicas());
        let current = read(&self.limiter).clone();
        if current.quota == q {
            return current;
        }
        let fresh = Arc::new(CallerLimiter::new(q));
        *write(&self.limiter) = fresh.clone();
        fresh
    }
}

/// Waits for a cell of the scope's budget, at most `deadline`.
async fn wait_for_budget(
    state: &ScopeState,
    limits: &Limits,
    scope: &str,
    deadline: Instant,
) -> Result<(), Refused> {
    let refused = |policy, wait| Refused { policy, wait };
    // Cluster mode: the budget lives in Redis and is exact across replicas.
    if let Some(cluster) = limits.cluster.get() {
        loop {
            match cluster.take_budget(scope, &state.budget.quota).await {
                Ok(crate::cluster::Budget::Allowed) => return Ok(()),
                Ok(crate::cluster::Budget::Wait(wait)) => {
                    if Instant::now() + wait > deadline {
                        return Err(refused("upstream", wait));
                    }
                    tokio::time::sleep(wait).await;
                }
                // Another replica's upstream 429: hold back here too (and
                // without asking Redis again until it ends).
                Ok(crate::cluster::Budget::Paused(wait)) => {
                    state.pause(limits, wait);
                    return Err(refused("upstream-paused", wait));
                }
                // Redis did not answer: this replica's share, locally.
                Err(()) => break,
            }
        }
    }
    let limiter = state.local_limiter(limits);
    loop {
        match check(&limiter.limiter) {
            Decision::Allowed { .. } => return Ok(()),
            Decision::Limited { wait } => {
                if Instant::now() + wait > deadline {
                    return Err(refused("upstream", wait));
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The scope's upstream budget, as seen by the retries of a request it let
/// through (in the request's extensions): a retry is one more request to the
/// upstream, so it takes a cell too, without waiting; when none is free, or
/// the scope is paused, the answer in hand goes back instead.
#[derive(Clone)]
pub struct RetryAllowance {
    state: Arc<ScopeState>,
    limits: Arc<Limits>,
    scope: Arc<str>,
}

impl RetryAllowance {
    pub async fn take(&self) -> bool {
        let granted = self.state.paused(&self.limits).is_none()
            && wait_for_budget(&self.state, &self.limits, &self.scope, Instant::now())
                .await
                .is_ok();
        if !granted {
            metrics::counter!("rungen_gateway_rate_limit_decisions_total", "policy" => "upstream-retry", "decision" => "limited", "client" => "-", "scope" => self.scope.to_string()).increment(1);
        }
        granted
    }
}

fn retry_after_secs(res: &Response<Body>) -> Option<Duration> {
    crate::error::parse_retry_after(res.headers(), std::time::SystemTime::now())
}

impl<S> tower::Service<Request<Body>> for UpstreamBudget<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<Response<Body>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let scope_name = RequestContext::of(req.extensions())
            .caller
            .as_ref()
            .map(|c| c.scope.name.clone());
        let state = match (&scope_name, self.limits.settings.load().enabled) {
            (Some(name), true) => self.limits.scope(name),
            _ => None,
        };
        let Some(state) = state else {
            return self.inner.call(req).boxed();
        };
        let scope = scope_name.unwrap_or_default();
        // Take the ready service; leave a fresh clone for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits.clone();
        async move {
            let limited = |Refused { policy, wait }| {
                metrics::counter!("rungen_gateway_rate_limit_decisions_total", "policy" => policy, "decision" => "limited", "client" => "-", "scope" => scope.clone()).increment(1);
                GatewayError::RateLimited {
                    policy,
                    retry_after: wait,
                }
            };
            if let Some(refused) = state.paused(&limits) {
                return Err(limited(refused));
            }
            let deadline = Instant::now() + state.budget.queue_timeout;
            // The concurrency slot first, then the budget: a request refused
            // for concurrency (503) has then spent no cell of the budget (a
            // cell cannot be given back, here or in Redis). Holding a slot
            // while waiting for a cell takes nothing from the scope's other
            // requests: each of them needs a cell too.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let permit = match tokio::time::timeout(remaining, state.slots.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => {
                    metrics::counter!("rungen_gateway_rate_limit_decisions_total", "policy" => "upstream-concurrency", "decision" => "limited", "client" => "-", "scope" => scope.clone()).increment(1);
                    return Err(GatewayError::Overloaded {
                        retry_after: Duration::from_secs(1),
                    });
                }
            };
            if let Err(refused) = wait_for_budget(&state, &limits, &scope, deadline).await {
                return Err(limited(refused));
            }
            let in_use = state.budget.max_concurrent - state.slots.available_permits();
            metrics::gauge!("rungen_gateway_upstream_in_flight", "scope" => scope.clone()).set(in_use as f64);
            let mut req = req;
            req.extensions_mut().insert(RetryAllowance {
                state: state.clone(),
                limits: limits.clone(),
                scope: Arc::from(scope.as_str()),
            });
            let res = tower::ServiceExt::ready(&mut inner).await?.call(req).await;
            drop(permit);
            let in_use = state.budget.max_concurrent - state.slots.available_permits();
            metrics::gauge!("rungen_gateway_upstream_in_flight", "scope" => scope.clone()).set(in_use as f64);
            let res = res?;
            if res.status() == StatusCode::TOO_MANY_REQUESTS {
                // `Upstream` gave every 429 a whole-second Retry-After.
                let wait = retry_after_secs(&res).unwrap_or(Duration::from_secs(1));
                state.pause(&limits, wait);
                if let Some(cluster) = limits.cluster.get() {
                    cluster.pause_scope(&scope, wait).await;
                }
                tracing::warn!(scope = %scope, pause = ?wait, "upstream answered 429; pausing this scope's upstream calls");
            }
            Ok(res)
        }
        .boxed()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limiter(q: Quota, clock: &FakeRelativeClock) -> Direct<FakeRelativeClock> {
        RateLimiter::direct_with_clock(q, clock.clone()).with_middleware()
    }

    #[test]
    fn exact_burst_then_refill_with_real_wait_times() {
        let clock = FakeRelativeClock::default();
        let q = quota(2, Duration::from_secs(1), 4); // 2/s, burst 4
        let l = limiter(q, &clock);
        for expected in [3, 2, 1, 0] {
            assert_eq!(
                check(&l),
                Decision::Allowed {
                    remaining: expected
                }
            );
        }
        assert_eq!(
            check(&l),
            Decision::Limited {
                wait: Duration::from_millis(500)
            }
        );
        clock.advance(Duration::from_millis(500));
        assert_eq!(check(&l), Decision::Allowed { remaining: 0 });
        clock.advance(Duration::from_secs(2));
        assert_eq!(check(&l), Decision::Allowed { remaining: 3 });
    }

    #[test]
    fn headers_follow_the_draft_and_agree_with_retry_after() {
        let q = quota(50, Duration::from_secs(1), 100);
        assert_eq!(policy_header("caller", &q), "\"caller\";q=100;w=2");
        assert_eq!(
            ratelimit_header("caller", &q, Decision::Allowed { remaining: 100 }),
            "\"caller\";r=100;t=0"
        );
        assert_eq!(
            ratelimit_header("caller", &q, Decision::Allowed { remaining: 40 }),
            "\"caller\";r=40;t=2"
        );
        let wait = Duration::from_millis(1500);
        assert_eq!(
            ratelimit_header("caller", &q, Decision::Limited { wait }),
            "\"caller\";r=0;t=2"
        );
        assert_eq!(crate::error::retry_after_value(wait), "2");
        // A new value on every response: never entered into HPACK tables.
        assert!(ratelimit_header("caller", &q, Decision::Allowed { remaining: 7 }).is_sensitive());
        assert!(!policy_header("caller", &q).is_sensitive());
        let per_minute = quota(60, Duration::from_secs(60), 20);
        assert_eq!(policy_header("caller", &per_minute), "\"caller\";q=20;w=20");
        // The last value made is reused only for the same name and quota.
        for _ in 0..2 {
            assert_eq!(policy_header("caller", &q), "\"caller\";q=100;w=2");
            assert_eq!(policy_header("caller", &q), "\"caller\";q=100;w=2");
            assert_eq!(policy_header("caller-ip", &q), "\"caller-ip\";q=100;w=2");
            assert_eq!(
                policy_header("caller-ip", &per_minute),
                "\"caller-ip\";q=20;w=20"
            );
            assert_eq!(policy_header("caller", &per_minute), "\"caller\";q=20;w=20");
        }
        // A name too long for the stack buffer still gives a valid value.
        let long = "x".repeat(200);
        assert_eq!(policy_header(&long, &q), "\"caller\"");
        assert_eq!(
            ratelimit_header(
                "caller-ip",
                &q,
                Decision::Allowed {
                    remaining: u32::MAX
                }
            ),
            format!("\"caller-ip\";r={};t=0", u32::MAX)
        );
        // A tiny wait still says "retry in 1 s", never 0.
        assert_eq!(
            ratelimit_header(
                "caller",
                &q,
                Decision::Limited {
                    wait: Duration::from_millis(3)
                }
            ),
            "\"caller\";r=0;t=1"
        );
    }

    #[test]
    fn ipv6_sources_are_counted_by_their_slash_64() {
        let b = |s: &str| per_ip_bucket(s.parse().unwrap()).to_string();
        assert_eq!(b("192.0.2.7"), "192.0.2.7");
        assert_eq!(b("::ffff:192.0.2.7"), "192.0.2.7", "a dual-stack IPv4 peer");
        assert_eq!(b("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(b("2001:db8:1:2::1"), b("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(b("2001:db8:1:2::1"), b("2001:db8:1:3::1"));
        assert_eq!(b("::1"), "::");
    }

    #[test]
    fn forwarded_for_is_trusted_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = |lines: &[&'static str]| {
            let mut h = http::HeaderMap::new();
            for l in lines {
                h.append(X_FORWARDED_FOR, HeaderValue::from_static(l));
            }
            h
        };
        let of = |peer: &str, lines: &[&'static str]| {
            client_ip(ip(peer), xff(lines).get_all(X_FORWARDED_FOR), &trusted)
        };
        let chain = ["1.2.3.4, 198.51.100.7, 10.0.0.5"];
        assert_eq!(of("10.0.0.9", &chain), ip("198.51.100.7"));
        // An untrusted peer's header is ignored: it cannot pick its bucket.
        assert_eq!(of("203.0.113.1", &chain), ip("203.0.113.1"));
        assert_eq!(of("10.0.0.9", &[]), ip("10.0.0.9"));
        assert_eq!(of("10.0.0.9", &["not-an-ip"]), ip("10.0.0.9"));
        // Garbage the caller sent left of its own address is never read.
        assert_eq!(
            of("10.0.0.9", &["unknown, not-an-ip, 198.51.100.7"]),
            ip("198.51.100.7")
        );
        // Garbage a trusted proxy wrote: the chain is unreadable there.
        assert_eq!(
            of("10.0.0.9", &["198.51.100.7, _hidden, 10.0.0.5"]),
            ip("10.0.0.9")
        );
        // Hops with ports, as some load balancers append them.
        assert_eq!(of("10.0.0.9", &["198.51.100.7:50123"]), ip("198.51.100.7"));
        assert_eq!(of("10.0.0.9", &["[2001:db8::7]:443"]), ip("2001:db8::7"));
        assert_eq!(
            of("10.0.0.9", &["[2001:db8::7], 10.0.0.5:80"]),
            ip("2001:db8::7")
        );
        assert_eq!(of("10.0.0.9", &["10.1.1.1, 10.2.2.2"]), ip("10.1.1.1"));
        // A proxy that adds its own line: the caller's line cannot pick.
        assert_eq!(
            of("10.0.0.9", &["6.6.6.6", "198.51.100.7"]),
            ip("198.51.100.7")
        );
        // A dual-stack listener's IPv4 peer is trusted as IPv4.
        assert_eq!(of("::ffff:10.0.0.9", &chain), ip("198.51.100.7"));
        assert_eq!(
            of("::ffff:203.0.113.1", &chain),
            ip("203.0.113.1"),
            "and counted as its IPv4 self"
        );
    }

    #[test]
    fn per_ip_state_is_pruned() {
        let limits = Limits::new(RateLimitSettings {
            unauthenticated_quota: quota(1000, Duration::from_secs(1), 1),
            ..Default::default()
        });
        for i in 0..1000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let _ = limits.check_unauthenticated(ip);
        }
        assert_eq!(limits.tracked_ips(), 1000);
        std::thread::sleep(Duration::from_millis(5));
        limits.prune();
        assert_eq!(limits.tracked_ips(), 0, "refilled buckets are dropped");
    }

    #[test]
    fn a_threads_copy_of_a_limiter_follows_the_map() {
        let client = Client::named("a");
        let burst = |n| {
            let mut s = RateLimitSettings::default();
            s.client_quotas
                .insert("a".into(), quota(1, Duration::from_secs(3600), n));
            s
        };
        let allowed = |limits: &Limits| match limits.check_caller(&client, None) {
            CallerCheck::Now(_, d) => matches!(d, Decision::Allowed { .. }),
            CallerCheck::Lease(..) => panic!("no cluster here"),
        };
        let limits = Limits::new(burst(1));
        assert!(allowed(&limits));
        assert!(!allowed(&limits), "the copy is the limiter the map holds");
        limits.configure(burst(1));
        assert!(!allowed(&limits), "same quota after a reload: same state");
        limits.configure(burst(2));
        assert!(allowed(&limits), "a new quota: a new limiter");
        // Another `Limits` (another gateway in this process) with the same
        // client, whatever its generation count: its own limiter.
        let other = Limits::new(burst(1));
        assert!(allowed(&other));
        assert!(!allowed(&other));
        assert!(allowed(&limits), "the first keeps its own state");
        assert!(!allowed(&limits));
    }

    #[test]
    fn a_caller_limiter_is_one_cache_line_and_its_clock_keeps_real_time() {
        assert_eq!(std::mem::size_of::<CallerLimiter>(), 64);
        assert_eq!(std::mem::align_of::<CallerLimiter>(), 64);
        let l = CallerLimiter::new(quota(1, Duration::from_secs(3600), 2));
        assert_eq!(check(&l.limiter), Decision::Allowed { remaining: 1 });
        assert_eq!(check(&l.limiter), Decision::Allowed { remaining: 0 });
        match check(&l.limiter) {
            Decision::Limited { wait } => assert!(
                wait > Duration::from_secs(3590) && wait <= Duration::from_secs(3600),
                "one cell an hour, just spent: {wait:?}"
            ),
            d => panic!("over the burst: {d:?}"),
        }
        let (a, b) = (LimiterClock.now(), {
            std::thread::sleep(Duration::from_millis(20));
            LimiterClock.now()
        });
        assert!(
            governor::clock::Reference::duration_since(&b, a) >= Duration::from_millis(20).into()
        );
    }

    #[test]
    fn an_ip_is_remembered_as_refused_until_its_wait_is_over() {
        let one = |per: Duration| RateLimitSettings {
            unauthenticated_quota: quota(1, per, 1),
            ..RateLimitSettings::default()
        };
        let limits = Limits::new(one(Duration::from_secs(3600)));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(limits.refused_ip_wait(ip), None);
        assert!(limits.check_unauthenticated(ip).is_ok());
        assert_eq!(limits.refused_ip_wait(ip), None, "spent, not refused");
        let wait = limits.check_unauthenticated(ip).unwrap_err();
        let left = limits.refused_ip_wait(ip).unwrap();
        assert!(left <= wait && left > wait - Duration::from_secs(60));
        assert_eq!(limits.refused_ip_wait(other), None);
        limits.prune();
        assert!(limits.refused_ip_wait(ip).is_some(), "not over yet");
        // A new unauthenticated quota is a new limiter: nobody is refused by it yet.
        limits.configure(one(Duration::from_secs(1800)));
        assert_eq!(limits.refused_ip_wait(ip), None);
        // A refusal whose wait is over is forgotten.
        let limits = Limits::new(one(Duration::from_millis(20)));
        assert!(limits.check_unauthenticated(ip).is_ok());
        assert!(limits.check_unauthenticated(ip).is_err());
        std::thread::sleep(Duration::from_millis(40));
        limits.prune();
        assert_eq!(read(&limits.refused_ips).len(), 0);
        assert_eq!(limits.refused_ip_wait(ip), None);
    }

    #[test]
    fn reconfigure_keeps_state_of_unchanged_limiters() {
        let limits = Limits::new(RateLimitSettings::default());
        let limiter = |limits: &Limits| limits.caller_limiter("a", limits.caller_quota("a"));
        let a = limiter(&limits);
        limits.configure(RateLimitSettings::default());
        assert!(Arc::ptr_eq(&a, &limiter(&limits)));
        let mut changed = RateLimitSettings::default();
        changed
            .client_quotas
            .insert("a".into(), quota(1, Duration::from_secs(1), 1));
        limits.configure(changed);
        assert!(!Arc::ptr_eq(&a, &limiter(&limits)));
    }
}
