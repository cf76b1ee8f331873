//! Several replicas behaving as one service, through Redis:
//!
//! - **Upstream budgets are exact cluster-wide**: each upstream-bound request
//!   takes a cell from a GCRA bucket in Redis (one round trip; the hit path
//!   never pays it).
//! - **Caller limits hold cluster-wide under any balance of the load**: each
//!   replica leases small batches of tokens from a bucket in Redis (one round
//!   trip per batch, not per request) and admits locally from its lease; the
//!   cluster admits within `(replicas + 1) x batch` of the quota's allowance
//!   (see [`lease`]). Without Redis: each replica's share
//!   (quota / live replicas, counted by Redis heartbeats).
//! - **Invalidations and purges fan out** over Redis pub/sub and are applied
//!   by every replica; a replica that loses its subscription (closed, or
//!   silent: its own heartbeat message did not come back) drops the caches it
//!   cannot vouch for when it subscribes again.
//! - **Shared fetch** (optional, `shared_cache`): a cold key is fetched
//!   upstream by one replica (a short per-key lock) and shared through Redis
//!   with the same freshness; writes and purges version the shared entries
//!   they change (see [`shared`]).
//! - **Redis failures never take the gateway down**: every call has a short
//!   timeout; without Redis the gateway runs degraded (budgets and quotas at
//!   the per-replica share, local invalidation), counts it, stays ready, and
//!   recovers by itself.
//!
//! Redis keys hold scope names, client names, replica ids and hashes only,
//! never a key or a token; shared entries hold sanitised response headers and
//! bodies only.

pub mod lease;
pub mod shared;

use crate::cache::Cache;
use crate::secret::Secret;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// `[cluster]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub redis_url: Secret,
    /// Every Redis call's deadline.
    pub timeout: Duration,
    /// Heartbeat period; a replica silent for three periods is no longer counted.
    pub heartbeat: Duration,
    pub key_prefix: String,
    /// Shared fetch through Redis (see [`shared`]).
    pub shared_cache: bool,
    /// Lifetime of a shared-fetch lock (the holder's fetch should end before).
    pub shared_lock: Duration,
    /// How long a replica waits for another's shared fetch before fetching itself.
    pub shared_wait: Duration,
}

/// A cache change to apply on every replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FanOut {
    Invalidate {
        scopes: Vec<String>,
        exact: Vec<String>,
        prefixes: Vec<String>,
    },
    Purge {
        scope: Option<String>,
        path_prefix: Option<String>,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    change: FanOut,
}

/// One cell of a scope's upstream budget (GCRA), unless an upstream 429 paused
/// the scope ([`PAUSE`]). In microseconds, by Redis' clock: a budget above
/// 1,000 a second has a sub-millisecond interval (the theoretical arrival
/// time is stored as an integer string: Lua's default formatting would round
/// it to 14 digits). KEYS: the bucket, the pause. ARGV: interval us, burst.
/// Returns {1, 0} allowed, {0, wait us} empty, {2, wait us} paused.
const GCRA: &str = r#"
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then
  return {2, paused * 1000}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local limit = interval * (burst - 1)
if tat - now > limit then
  return {0, tat - now - limit}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
"#;

/// An upstream 429's pause of a scope, for every replica: set or lengthened,
/// never shortened. KEYS: the pause. ARGV: ms.
const PAUSE: &str = r#"
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], 1, 'PX', ms)
end
return 1
"#;

/// One heartbeat, one round trip: this replica's entry in the replica set
/// (scored by Redis' clock, so replicas' clocks do not matter), entries
/// silent for a heartbeat TTL dropped, the old per-replica key kept for
/// replicas of earlier versions (they count by SCAN), and a beat published on
/// the invalidation channel (each subscriber hears its own beat: that is how
/// a silent subscription is noticed). Returns the live replicas.
/// KEYS: the replica set, this replica's key. ARGV: id, TTL ms, channel, beat.
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], 1, 'PX', ttl)
redis.call('PUBLISH', ARGV[3], ARGV[4])
return redis.call('ZCARD', KEYS[1])
"#;

/// The cluster link of one replica.
pub struct Cluster {
    settings: ClusterSettings,
    id: String,
    conn: Mutex<Option<ConnectionManager>>,
    connected: AtomicBool,
    /// The invalidation subscription is up and has heard a beat recently.
    subscribed: AtomicBool,
    /// Heartbeats Redis acknowledged (each published a beat).
    beats: AtomicU64,
    replicas: AtomicU32,
    outbox: mpsc::UnboundedSender<FanOut>,
    gcra: redis::Script,
    pause: redis::Script,
    heartbeat: redis::Script,
    degraded_since: Mutex<Option<Instant>>,
    shared_lookup: redis::Script,
    shared_store: redis::Script,
    bump: redis::Script,
    /// Local invalidations and purges not yet published (shared fetch waits for 0).
    pending_changes: AtomicU64,
    /// A change could not be published: bump the global generation first.
    needs_global_bump: AtomicBool,
    leases: lease::Leases,
    lease: redis::Script,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("connected", &self.is_connected())
            .field("replicas", &self.replicas())
            .finish()
    }
}

/// A cluster-wide budget decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Allowed,
    Wait(Duration),
    /// An upstream 429 seen by some replica paused the scope for this long.
    Paused(Duration),
}

impl Cluster {
    /// Starts the heartbeat, the subscriber and the publisher; returns at once
    /// (Redis may come up later: until then the replica runs degraded).
    pub fn start(settings: ClusterSettings, cache: Arc<Cache>) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(settings.redis_url.expose()).map_err(|_| {
            "cluster.redis_url is not a valid redis:// or rediss:// URL".to_string()
        })?;
        let (outbox, inbox) = mpsc::unbounded_channel();
        let cluster = Arc::new(Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            settings,
            conn: Mutex::new(None),
            connected: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            beats: AtomicU64::new(0),
            replicas: AtomicU32::new(1),
            outbox,
            gcra: redis::Script::new(GCRA),
            pause: redis::Script::new(PAUSE),
            heartbeat: redis::Script::new(HEARTBEAT),
            degraded_since: Mutex::new(Some(Instant::now())),
            shared_lookup: redis::Script::new(shared::LOOKUP),
            shared_store: redis::Script::new(shared::STORE),
            bump: redis::Script::new(shared::BUMP_AND_PUBLISH),
            pending_changes: AtomicU64::new(0),
            needs_global_bump: AtomicBool::new(false),
            leases: lease::Leases::default(),
            lease: redis::Script::new(lease::LEASE),
        });
        metrics::gauge!("rungen_gateway_cluster_mode").set(1.0);
        metrics::gauge!("rungen_gateway_cluster_subscribed").set(0.0);
        tokio::spawn(heartbeat(Arc::downgrade(&cluster), client.clone()));
        tokio::spawn(subscriber(Arc::downgrade(&cluster), client, cache));
        tokio::spawn(publisher(Arc::downgrade(&cluster), inbox));
        Ok(cluster)
    }

    /// Whether shared fetch is on (`[cluster] shared_cache`).
    pub fn shared_cache(&self) -> bool {
        self.settings.shared_cache
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Whether this replica hears the other replicas' invalidations (its
    /// subscription is up and its own heartbeat came back recently).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::SeqCst)
    }

    /// Live replicas (at least 1).
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::SeqCst).max(1)
    }

    /// Where the cache sends changes for every other replica.
    pub fn outbox(&self) -> mpsc::UnboundedSender<FanOut> {
        self.outbox.clone()
    }

    fn connection(&self) -> Option<ConnectionManager> {
        crate::sync::lock(&self.conn).clone()
    }

    fn set_health(&self, ok: bool) {
        let was = self.connected.swap(ok, Ordering::SeqCst);
        let mut since = crate::sync::lock(&self.degraded_since);
        if ok && !was {
            if let Some(t) = since.take() {
                metrics::counter!("rungen_gateway_cluster_degraded_seconds_total")
                    .increment(t.elapsed().as_secs());
            }
            tracing::info!("cluster: Redis reachable; cluster-wide limits and fan-out resumed");
        } else if !ok && was {
            *since = Some(Instant::now());
            tracing::error!(
                "cluster: Redis unreachable; running degraded on local limits (per-replica share) and local invalidation"
            );
        }
        metrics::gauge!("rungen_gateway_cluster_degraded").set(if ok { 0.0 } else { 1.0 });
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.settings.key_prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// One cell of the scope's cluster-wide upstream budget. `Err(())` when
    /// Redis did not answer in time (the caller falls back to local limits).
    pub async fn take_budget(&self, scope: &str, quota: &governor::Quota) -> Result<Budget, ()> {
        let Some(mut conn) = self.connection().filter(|_| self.is_connected()) else {
            return Err(());
        };
        let (interval_us, burst) = gcra_args(quota);
        // A new key for the microsecond buckets: replicas of earlier versions
        // (milliseconds, "budget") keep their own during a rolling update.
        let key = self.key(&["budget-us", scope]);
        let started = Instant::now();
        let mut invocation = self.gcra.key(key);
        invocation.key(self.key(&["pause", scope]));
        invocation.arg(interval_us).arg(burst);
        let call = invocation.invoke_async::<(i64, i64)>(&mut conn);
        let result = tokio::time::timeout(self.settings.timeout, call).await;
        metrics::histogram!("rungen_gateway_redis_duration_seconds", "op" => "budget")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok((1, _))) => Ok(Budget::Allowed),
            Ok(Ok((2, wait_us))) => {
                Ok(Budget::Paused(Duration::from_micros(wait_us.max(1) as u64)))
            }
            Ok(Ok((_, wait_us))) => Ok(Budget::Wait(Duration::from_micros(wait_us.max(1) as u64))),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cluster: budget script failed");
                metrics::counter!("rungen_gateway_redis_errors_total", "op" => "budget")
                    .increment(1);
                Err(())
            }
            Err(_) => {
                metrics::counter!("rungen_gateway_redis_errors_total", "op" => "budget_timeout")
                    .increment(1);
                Err(())
            }
        }
    }

    /// Pauses the scope's upstream calls on every replica for `wait` (an
    /// upstream 429's Retry-After): [`take_budget`](Self::take_budget) answers
    /// [`Budget::Paused`] until then. Best effort: without Redis, the replica
    /// that saw the 429 still pauses itself.
    pub async fn pause_scope(&self, scope: &str, wait: Duration) {
        let Some(mut conn) = self.connection().filter(|_| self.is_connected()) else {
            return;
        };
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut invocation = self.pause.key(self.key(&["pause", scope]));
        invocation.arg(ms);
        let call = invocation.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cluster: pause script failed");
                metrics::counter!("rungen_gateway_redis_errors_total", "op" => "pause")
                    .increment(1);
            }
            Err(_) => {
                metrics::counter!("rungen_gateway_redis_errors_total", "op" => "pause_timeout")
                    .increment(1);
            }
        }
    }
}

/// [`GCRA`]'s arguments: the interval in whole microseconds (at least 1) and the burst.
fn gcra_args(quota: &governor::Quota) -> (u64, u32) {
    let interval = u64::try_from(quota.replenish_interval().as_micros()).unwrap_or(u64::MAX);
    (interval.max(1), quota.burst_size().get())
}

/// Keeps a command connection, beats, and counts live replicas.
async fn heartbeat(weak: std::sync::Weak<Cluster>, client: redis::Client) {
    loop {
        let Some(c) = weak.upgrade() else { return };
        let every = c.settings.heartbeat;
        let timeout = c.settings.timeout;
        if c.connection().is_none() {
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout)
                .set_number_of_retries(1);
            match tokio::time::timeout(
                timeout * 4,
                ConnectionManager::new_with_config(client.clone(), cfg),
            )
            .await
            {
                Ok(Ok(m)) => *crate::sync::lock(&c.conn) = Some(m),
                _ => c.set_health(false),
            }
        }
        if let Some(mut conn) = c.connection() {
            let ttl_ms = (every * 3).as_millis() as u64;
            let beat_message = serde_json::json!({ "from": &c.id, "kind": "beat" }).to_string();
            let mut inv = c.heartbeat.key(c.key(&["replicas"]));
            inv.key(c.key(&["replica", &c.id]))
                .arg(&c.id)
                .arg(ttl_ms)
                .arg(c.key(&["invalidate"]))
                .arg(beat_message);
            let beat = inv.invoke_async::<u32>(&mut conn);
            let beaten = tokio::time::timeout(timeout * 2, beat).await;
            match beaten {
                Ok(Ok(n)) => {
                    c.replicas.store(n.max(1), Ordering::SeqCst);
                    metrics::gauge!("rungen_gateway_cluster_replicas").set(n.max(1) as f64);
                    c.set_health(true);
                    c.beats.fetch_add(1, Ordering::SeqCst);
                    if c.needs_global_bump.load(Ordering::SeqCst) {
                        bump_global(&c, &mut conn).await;
                    }
                }
                _ => {
                    metrics::counter!("rungen_gateway_redis_errors_total", "op" => "heartbeat")
                        .increment(1);
                    c.set_health(false);
                }
            }
        }
        drop(c);
        tokio::time::sleep(every).await;
    }
}

/// Most changes published in one round trip.
const MAX_FANOUT_BATCH: usize = 256;

/// Publishes queued cache changes, everything queued in one script round
/// trip (so a slow Redis delays the fan-out by a round trip, not by a round
/// trip per queued change). With shared fetch, the same script first bumps
/// the shared-entry generations the changes make stale.
async fn publisher(weak: std::sync::Weak<Cluster>, mut inbox: mpsc::UnboundedReceiver<FanOut>) {
    let mut batch = Vec::with_capacity(MAX_FANOUT_BATCH);
    while inbox.recv_many(&mut batch, MAX_FANOUT_BATCH).await > 0 {
        let Some(c) = weak.upgrade() else { return };
        let n = batch.len() as u64;
        let ok = publish(&c, std::mem::take(&mut batch)).await;
        if c.settings.shared_cache {
            if !ok {
                c.needs_global_bump.store(true, Ordering::SeqCst);
            }
            c.pending_changes.fetch_sub(n, Ordering::SeqCst);
        }
    }
}

async fn publish(c: &Cluster, changes: Vec<FanOut>) -> bool {
    let n = changes.len() as u64;
    let Some(mut conn) = c.connection().filter(|_| c.is_connected()) else {
        metrics::counter!("rungen_gateway_cluster_fanout_dropped_total").increment(n);
        return false;
    };
    let mut inv = c.bump.prepare_invoke();
    if c.settings.shared_cache {
        let mut bumps: Vec<String> = changes.iter().flat_map(|ch| c.bump_keys(ch)).collect();
        bumps.sort_unstable();
        bumps.dedup();
        for k in &bumps {
            inv.key(k);
        }
    }
    inv.arg(c.key(&["invalidate"]))
        .arg(shared::GENERATION_LIFE.as_millis() as u64);
    for change in changes {
        let envelope = Envelope {
            from: c.id.clone(),
            change,
        };
        if let Ok(payload) = serde_json::to_string(&envelope) {
            inv.arg(payload);
        }
    }
    let sent = tokio::time::timeout(c.settings.timeout, inv.invoke_async::<i64>(&mut conn)).await;
    match sent {
        Ok(Ok(_)) => {
            metrics::counter!("rungen_gateway_cluster_fanout_sent_total").increment(n);
            true
        }
        _ => {
            metrics::counter!("rungen_gateway_redis_errors_total", "op" => "publish").increment(1);
            false
        }
    }
}

/// After a change could not be published: every shared entry becomes stale
/// (the global generation), before this replica reads shared entries again.
async fn bump_global(c: &Cluster, conn: &mut ConnectionManager) {
    let mut inv = c.bump.prepare_invoke();
    inv.key(c.key(&["shared", "gen"]))
        .arg(c.key(&["invalidate"]))
        .arg(shared::GENERATION_LIFE.as_millis() as u64);
    if let Ok(Ok(_)) = tokio::time::timeout(c.settings.timeout, inv.invoke_async::<i64>(conn)).await
    {
        c.needs_global_bump.store(false, Ordering::SeqCst);
        tracing::info!("cluster: shared cache entries from before the outage invalidated");
    }
}

/// Applies other replicas' cache changes. Whenever it (re)subscribes it
/// drops the local cache first: anything cached while not subscribed (Redis
/// down at start, or a lost subscription) may have missed an invalidation.
/// A subscription that stays silent while Redis acknowledged two of this
/// replica's beats (they did not come back: a half-open connection, or a
/// Redis that lost the subscription) counts as lost. Silence while Redis is
/// unreachable for the heartbeat too is not held against it.
async fn subscriber(weak: std::sync::Weak<Cluster>, client: redis::Client, cache: Arc<Cache>) {
    let mut first = true;
    loop {
        let Some(c) = weak.upgrade() else { return };
        let channel = c.key(&["invalidate"]);
        let id = c.id.clone();
        let timeout = c.settings.timeout;
        let retry = c.settings.heartbeat;
        let check_every = c.settings.heartbeat * 2;
        drop(c);
        let pubsub = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        let Ok(Ok(ps)) = tokio::time::timeout(timeout * 4, pubsub).await else {
            tokio::time::sleep(retry).await;
            continue;
        };
        let dropped = cache.purge_local(&crate::cache::PurgeScope::default());
        if !first || dropped > 0 {
            tracing::warn!(
                dropped,
                "cluster: subscribed after a time without; dropping the local cache it cannot vouch for"
            );
        }
        first = false;
        set_subscribed(&weak, true);
        let mut messages = ps.into_on_message();
        let beats = || weak.upgrade().map_or(0, |c| c.beats.load(Ordering::SeqCst));
        let mut beats_when_heard = beats();
        loop {
            let msg = match tokio::time::timeout(check_every, messages.next()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(_) if beats().saturating_sub(beats_when_heard) < 2 => continue,
                Err(_) => {
                    tracing::warn!(
                        "cluster: the invalidation subscription went silent (this replica's own heartbeat did not come back); subscribing again"
                    );
                    metrics::counter!("rungen_gateway_redis_errors_total", "op" => "subscription_silent")
                        .increment(1);
                    break;
                }
            };
            // Any message (a beat included) shows the subscription is alive.
            beats_when_heard = beats();
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(env) = serde_json::from_str::<Envelope>(&payload) else {
                continue;
            };
            if env.from == id {
                continue;
            }
            cache.apply(&env.change);
            metrics::counter!("rungen_gateway_cluster_fanout_applied_total").increment(1);
        }
        set_subscribed(&weak, false);
        if weak.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(retry).await;
    }
}

fn set_subscribed(weak: &std::sync::Weak<Cluster>, up: bool) {
    if let Some(c) = weak.upgrade() {
        c.subscribed.store(up, Ordering::SeqCst);
    }
    metrics::gauge!("rungen_gateway_cluster_subscribed").set(if up { 1.0 } else { 0.0 });
}
