//! Caller quotas held cluster-wide by leased batches.
//!
//! Each client's quota is a token bucket in Redis (`<prefix>:quota:<client>`:
//! burst = the quota's burst, refilled at its rate). A replica admits a
//! request from its local lease of tokens; when the lease is empty it takes a
//! batch of `b` tokens in one script round trip (never one per request, let
//! alone per cache hit, unless `b` is 1), and admits locally from it. So the
//! busy replica gets the tokens, whatever the balance of the load.
//!
//! - Batch: `b = max(1, burst / (10 x (live replicas + 1)))`.
//! - A lease lives the time the bucket takes to earn a batch back
//!   (`b x refill interval`), at least a second (so a busy replica with a
//!   large quota leases about once a second, not every few milliseconds) and
//!   at most a minute. Tokens of an expired lease are given back to the
//!   bucket with the replica's next lease (capped at the burst).
//! - When the bucket is empty the script says how long until it holds a whole
//!   batch again; the replica answers 429 locally until then (one round trip
//!   per such wait, not per refused request), so a saturated client costs
//!   about `replicas` round trips per batch.
//!
//! **Error bound** (`R` live replicas, allowance over a window `W` =
//! `burst + rate x W`). Over: what the cluster admits in `W` is what it took
//! from the bucket in `W` (at most the allowance) plus what it still held in
//! leases when `W` began (at most `b` per replica, and at most what the
//! bucket earned during a lease's life): at most `R x b`. Under: it can fall
//! short only by tokens not admitted when `W` closes, at most `b` unused in
//! each replica's lease plus fewer than `b` left in the bucket while replicas
//! wait for a whole batch: `(R + 1) x b`. Both are at most
//! `max(R + 1, burst / 10)`: with a burst of at least `10 x (R + 1)` tokens,
//! admitted stays within 10% of the burst alone (so within 10% of the
//! allowance, for any window), whatever the balance of the load.
//!
//! Without Redis (or after a failed lease call, for a second) the replica
//! falls back to its local share of the quota (quota / live replicas).

use super::Cluster;
use crate::rate_limit::Decision;
use governor::Quota;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Takes up to ARGV[3] tokens, after refilling by elapsed time and adding
/// back ARGV[4] unused ones. KEYS: bucket. ARGV: interval ms (float), burst,
/// want, give back. Returns {granted, tokens left, ms until a whole batch}:
/// an empty-handed replica asks again once a batch has been earned, so a
/// saturated bucket costs about `replicas` round trips per batch, not one per
/// token.
pub(super) const LEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local back = tonumber(ARGV[4])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(v[1])
local ts = tonumber(v[2])
if not tokens or not ts then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) / interval + back)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
local wait = 0
if granted < 1 then wait = math.ceil((want - tokens) * interval) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * interval) + 60000)
return {granted, math.floor(tokens), wait}
"#;

/// The batch a replica leases: small enough that the tokens idle in leases
/// stay within a tenth of the burst.
pub fn batch_size(burst: u32, replicas: u32) -> u32 {
    (burst / (10 * (replicas.max(1) + 1))).max(1)
}

/// How long a leased batch may be used: the time the bucket takes to earn
/// it, between a second and a minute.
pub fn lease_life(quota: &Quota, batch: u32) -> Duration {
    (quota.replenish_interval() * batch).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// What the local lease says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseTake {
    Decided(Decision),
    /// The lease is empty: one round trip for a new batch.
    Refill,
    /// No Redis: use the local share.
    Local,
}

#[derive(Default)]
pub(super) struct Leases {
    map: RwLock<HashMap<String, Arc<Lease>>>,
}

#[derive(Default)]
struct Lease {
    state: Mutex<State>,
    /// One refill in the air per client on this replica.
    refill: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    quota: Option<Quota>,
    tokens: u32,
    expires: Option<Instant>,
    /// Tokens of an expired lease, given back with the next lease call.
    give_back: u32,
    /// The bucket's remaining tokens at the last lease (for `RateLimit`).
    bucket_left: u32,
    denied_until: Option<Instant>,
    local_until: Option<Instant>,
}

impl State {
    fn take(&mut self, quota: &Quota, now: Instant) -> LeaseTake {
        if self.quota != Some(*quota) {
            *self = State {
                quota: Some(*quota),
                ..State::default()
            };
        }
        if self.local_until.is_some_and(|t| t > now) {
            return LeaseTake::Local;
        }
        if self.tokens > 0 {
            if self.expires.is_some_and(|t| t > now) {
                self.tokens -= 1;
                return LeaseTake::Decided(Decision::Allowed {
                    remaining: self.tokens + self.bucket_left,
                });
            }
            self.give_back += self.tokens;
            self.tokens = 0;
        }
        if let Some(until) = self.denied_until.filter(|t| *t > now) {
            return LeaseTake::Decided(Decision::Limited { wait: until - now });
        }
        LeaseTake::Refill
    }
}

impl Leases {
    fn get(&self, client: &str) -> Arc<Lease> {
        if let Some(l) = crate::sync::read(&self.map).get(client) {
            return l.clone();
        }
        crate::sync::write(&self.map)
            .entry(client.to_string())
            .or_default()
            .clone()
    }
}

impl Cluster {
    /// One request of `client` against its local lease (no I/O).
    pub fn lease_take(&self, client: &str, quota: &Quota) -> LeaseTake {
        if !self.is_connected() {
            return LeaseTake::Local;
        }
        let lease = self.leases.get(client);
        let mut state = crate::sync::lock(&lease.state);
        state.take(quota, Instant::now())
    }

    /// Leases a new batch (one round trip) and decides this request from it.
    /// `None`: Redis did not answer; the replica uses its local share for a second.
    pub async fn lease_refill(&self, client: &str, quota: Quota) -> Option<Decision> {
        let lease = self.leases.get(client);
        let _one = lease.refill.lock().await;
        // Another request may have refilled while this one queued.
        let give_back = {
            let mut state = crate::sync::lock(&lease.state);
            match state.take(&quota, Instant::now()) {
                LeaseTake::Decided(d) => return Some(d),
                LeaseTake::Local => return None,
                LeaseTake::Refill => std::mem::take(&mut state.give_back),
            }
        };
        let batch = batch_size(quota.burst_size().get(), self.replicas());
        let result = self.lease_call(client, &quota, batch, give_back).await;
        let now = Instant::now();
        let mut state = crate::sync::lock(&lease.state);
        match result {
            Some((granted, left, wait_ms)) => {
                state.tokens += granted;
                state.expires = Some(now + lease_life(&quota, batch));
                state.bucket_left = left;
                state.denied_until =
                    (granted == 0).then(|| now + Duration::from_millis(wait_ms.max(1)));
                metrics::counter!("rungen_gateway_cluster_lease_tokens_total")
                    .increment(granted.into());
                match state.take(&quota, now) {
                    LeaseTake::Decided(d) => Some(d),
                    // Only if the clock went backwards: say "try again soon".
                    _ => Some(Decision::Limited {
                        wait: quota.replenish_interval(),
                    }),
                }
            }
            None => {
                state.give_back += give_back;
                state.local_until = Some(now + Duration::from_secs(1));
                None
            }
        }
    }

    async fn lease_call(
        &self,
        client: &str,
        quota: &Quota,
        batch: u32,
        give_back: u32,
    ) -> Option<(u32, u32, u64)> {
        let mut conn = self.connection()?;
        let interval_ms = quota.replenish_interval().as_secs_f64() * 1000.0;
        let mut inv = self.lease.prepare_invoke();
        inv.key(self.key(&["quota", client]))
            .arg(format!("{interval_ms:.6}"))
            .arg(quota.burst_size().get())
            .arg(batch)
            .arg(give_back);
        let started = Instant::now();
        let r = tokio::time::timeout(
            self.settings.timeout,
            inv.invoke_async::<(i64, i64, i64)>(&mut conn),
        )
        .await;
        metrics::histogram!("rungen_gateway_redis_duration_seconds", "op" => "lease")
            .record(started.elapsed().as_secs_f64());
        match r {
            Ok(Ok((granted, left, wait))) => Some((
                u32::try_from(granted).unwrap_or(0),
                u32::try_from(left).unwrap_or(0),
                u64::try_from(wait).unwrap_or(0),
            )),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cluster: lease script failed");
                metrics::counter!("rungen_gateway_redis_errors_total", "op" => "lease")
                    .increment(1);
                None
            }
            Err(_) => {
                metrics::counter!("rungen_gateway_redis_errors_total", "op" => "lease_timeout")
                    .increment(1);
                None
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rate_limit::quota;

    #[test]
    fn batches_keep_idle_tokens_within_a_tenth_of_the_burst() {
        assert_eq!(batch_size(600, 3), 15);
        assert_eq!(batch_size(1000, 3), 25);
        assert_eq!(batch_size(60, 3), 1);
        for (burst, r) in [(100u32, 3u32), (1000, 3), (1000, 7), (30, 1), (600, 2)] {
            assert!(batch_size(burst, r) * (r + 1) <= burst / 10);
        }
        let q = quota(20, Duration::from_secs(1), 60);
        assert_eq!(lease_life(&q, 2), Duration::from_secs(1));
        let slow = quota(1, Duration::from_secs(60), 60);
        assert_eq!(lease_life(&slow, 2), Duration::from_secs(60));
    }

    #[test]
    fn a_lease_admits_until_empty_expires_and_gives_back() {
        let q = quota(20, Duration::from_secs(1), 60);
        let t = Instant::now();
        let mut s = State::default();
        assert_eq!(s.take(&q, t), LeaseTake::Refill);
        s.tokens = 2;
        s.expires = Some(t + Duration::from_millis(100));
        assert!(matches!(
            s.take(&q, t),
            LeaseTake::Decided(Decision::Allowed { .. })
        ));
        // Past its life the rest goes back with the next lease call.
        assert_eq!(
            s.take(&q, t + Duration::from_millis(200)),
            LeaseTake::Refill
        );
        assert_eq!(s.give_back, 1);
        s.denied_until = Some(t + Duration::from_millis(300));
        assert_eq!(
            s.take(&q, t + Duration::from_millis(250)),
            LeaseTake::Decided(Decision::Limited {
                wait: Duration::from_millis(50)
            })
        );
        s.local_until = Some(t + Duration::from_secs(1));
        assert_eq!(s.take(&q, t + Duration::from_millis(250)), LeaseTake::Local);
    }
}
