//! Shared fetch (`[cluster] shared_cache = true`): a cold key costs the
//! cluster one upstream request, not one per replica.
//!
//! On a local miss (inside the replica's single-flight fill) one script round
//! trip looks the key up in Redis and, when it is absent, takes a short per-key
//! lock (`SET NX PX shared_lock`). The lock holder fetches upstream and stores
//! the cacheable response in Redis with its remaining freshness as `PX`; the
//! other replicas poll (10 ms, growing to 100 ms) for at most `shared_wait`,
//! then use the shared entry, or fetch themselves after the bound. Any Redis
//! error or timeout: the replica fetches as without `shared_cache`.
//!
//! **Keys** are namespaced by scope exactly like the local cache key:
//! `<prefix>:shared:<scope>:e:<sha256(path, query)>` (a lock beside it with
//! `:l:`); path and query are hashed, so nothing a caller sends appears in a
//! key. **Values** hold the response status, its sanitised response headers
//! (what the local entry serves: no hop-by-hop header, no credential, never a
//! request header) and the body. Responses that vary on request headers are
//! not shared.
//!
//! **Invalidation is by version.** Every entry records the generations it was
//! fetched under: a global one, its scope's, and its group's (`/app`, or
//! `/app/<id>` with everything under it). A write's invalidation or a purge
//! increments the matching generations and publishes the fan-out message in
//! the same script, so an entry fetched before a write is never served after
//! it, whichever replica asks. Until its own changes are published, a replica
//! does not read shared entries at all; if publishing failed (Redis down), it
//! bumps the global generation when Redis is back before reading them again.

use super::{Cluster, FanOut};
use crate::cache::key::CacheKey;
use crate::cache::policy::Freshness;
use crate::cache::store::CachedResponse;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Looks the entry up (valid only under the current generations); when it is
/// absent and ARGV[3] is "1", takes the fill lock.
/// KEYS: entry, global generation, scope generation, group generation, lock. ARGV: token, lock ms, take.
pub(super) const LOOKUP: &str = r#"
local generation = (redis.call('GET', KEYS[2]) or '0') .. '.' .. (redis.call('GET', KEYS[3]) or '0') .. '.' .. (redis.call('GET', KEYS[4]) or '0')
local v = redis.call('HMGET', KEYS[1], 'gen', 'meta', 'body')
if v[2] and v[1] == generation then
  return {1, generation, v[2], v[3], redis.call('PTTL', KEYS[1])}
end
if ARGV[3] == '1' and redis.call('SET', KEYS[5], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, generation}
end
return {3, generation}
"#;

/// Stores an entry if the generations it was fetched under are still current,
/// and releases the lock if this replica holds it.
/// KEYS: entry, lock, global generation, scope generation, group gen. ARGV: generation, meta, body, px, token.
pub(super) const STORE: &str = r#"
local generation = (redis.call('GET', KEYS[3]) or '0') .. '.' .. (redis.call('GET', KEYS[4]) or '0') .. '.' .. (redis.call('GET', KEYS[5]) or '0')
local stored = 0
if generation == ARGV[1] and ARGV[4] ~= '0' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'meta', ARGV[2], 'body', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  stored = 1
end
if redis.call('GET', KEYS[2]) == ARGV[5] then redis.call('DEL', KEYS[2]) end
return stored
"#;

/// Increments the given generations, then publishes the fan-out messages (in
/// order; none when only the generations change).
/// KEYS: generations. ARGV: channel, generation lifetime ms, payloads...
pub(super) const BUMP_AND_PUBLISH: &str = r#"
for i = 1, #KEYS do
  redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
for i = 3, #ARGV do redis.call('PUBLISH', ARGV[1], ARGV[i]) end
return #ARGV - 2
"#;

/// Longest life of a shared entry; generations live [`GENERATION_LIFE`], so an
/// entry never outlives the generation it was checked against.
const MAX_SHARED_TTL: Duration = Duration::from_secs(24 * 3600);
pub(super) const GENERATION_LIFE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Entries with less freshness left than this are not worth sharing.
const MIN_SHARED_TTL: Duration = Duration::from_millis(50);

/// What a fill does after asking Redis.
pub enum Before {
    /// A valid shared entry: serve it, no upstream request.
    Hit(Arc<CachedResponse>),
    /// Fetch upstream, then hand the result to [`Cluster::shared_after`].
    Fetch(Ticket),
    /// No shared cache for this fill (Redis unavailable, own changes pending,
    /// or a varying key): fetch as without it.
    Bypass,
}

/// A fill's right to store what it fetched (with the generations it saw).
pub struct Ticket {
    keys: Keys,
    generation: String,
    token: String,
}

struct Keys {
    entry: String,
    lock: String,
    global: String,
    scope: String,
    group: String,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    status: u16,
    headers: Vec<(String, String)>,
    etag: String,
    upstream_etag: Option<String>,
    last_modified: Option<String>,
    initial_age_ms: u64,
    /// Time since the upstream answered when it was stored, and the `PX` it got.
    age_at_store_ms: u64,
    px_ms: u64,
    ttl_ms: u64,
    swr_ms: u64,
    sie_ms: u64,
}

fn hash_hex(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The invalidation group of a path: `/app`, or `/app/<id>` for the app and
/// everything under it (other paths: their first two segments).
pub fn group_of(path: &str) -> String {
    let mut segments = path.trim_start_matches('/').split('/');
    match (segments.next(), segments.next()) {
        (Some(a), Some(b)) if !b.is_empty() => format!("/{a}/{b}"),
        (Some(a), _) => format!("/{a}"),
        _ => "/".to_string(),
    }
}

/// Which generations a change bumps: `None` in the list means the scope's own
/// generation, `Some(group)` a group's; `global` means every scope.
#[derive(Debug, PartialEq, Eq)]
pub struct Bumps {
    pub global: bool,
    pub scoped: Vec<(String, Option<String>)>,
}

/// The generations a fanned-out change makes stale.
pub fn bumps(change: &FanOut) -> Bumps {
    let mut scoped = Vec::new();
    match change {
        FanOut::Invalidate {
            scopes,
            exact,
            prefixes,
        } => {
            for s in scopes {
                for p in exact {
                    scoped.push((s.clone(), Some(group_of(p))));
                }
                for p in prefixes {
                    // "/app/<id>/" is inside one group; anything wider is the scope.
                    let g = group_of(p);
                    if p.len() > g.len() && p.starts_with(&g) && p.as_bytes()[g.len()] == b'/' {
                        scoped.push((s.clone(), Some(g)));
                    } else {
                        scoped.push((s.clone(), None));
                    }
                }
            }
        }
        FanOut::Purge { scope, path_prefix } => {
            let group = path_prefix.as_deref().and_then(|p| {
                let g = group_of(p);
                // A segment-wise prefix at least two segments deep is within one group.
                (p.trim_end_matches('/').len() >= g.len() && g.matches('/').count() >= 2)
                    .then_some(g)
            });
            match (scope, group) {
                (None, _) => {
                    return Bumps {
                        global: true,
                        scoped,
                    };
                }
                (Some(s), g) => scoped.push((s.clone(), g)),
            }
        }
    }
    scoped.sort();
    scoped.dedup();
    Bumps {
        global: false,
        scoped,
    }
}

impl Cluster {
    fn shared_key(&self, scope: &str, kind: &str, rest: &str) -> String {
        self.key(&["shared", scope, kind, rest])
    }

    fn keys_for(&self, key: &CacheKey) -> Keys {
        let h = hash_hex(&[&key.path, &key.query]);
        Keys {
            entry: self.shared_key(&key.scope, "e", &h),
            lock: self.shared_key(&key.scope, "l", &h),
            global: self.key(&["shared", "gen"]),
            scope: self.key(&["shared", &key.scope, "gen"]),
            group: self.shared_key(&key.scope, "g", &hash_hex(&[&group_of(&key.path)])),
        }
    }

    /// The generation keys a change bumps.
    pub(super) fn bump_keys(&self, change: &FanOut) -> Vec<String> {
        let b = bumps(change);
        let mut keys = Vec::new();
        if b.global {
            keys.push(self.key(&["shared", "gen"]));
        }
        for (scope, group) in b.scoped {
            keys.push(match group {
                Some(g) => self.shared_key(&scope, "g", &hash_hex(&[&g])),
                None => self.key(&["shared", &scope, "gen"]),
            });
        }
        keys
    }

    /// A local invalidation or purge is on its way to Redis: until it is,
    /// this replica reads no shared entry (it might be one the change drops).
    pub fn note_local_change(&self) {
        self.pending_changes.fetch_add(1, Ordering::SeqCst);
    }

    fn shared_usable(&self) -> bool {
        self.settings.shared_cache
            && self.is_connected()
            && self.pending_changes.load(Ordering::SeqCst) == 0
            && !self.needs_global_bump.load(Ordering::SeqCst)
    }

    async fn lookup(&self, keys: &Keys, token: &str, take: bool) -> Result<redis::Value, ()> {
        let Some(mut conn) = self.connection() else {
            return Err(());
        };
        let mut inv = self.shared_lookup.prepare_invoke();
        inv.key(&keys.entry)
            .key(&keys.global)
            .key(&keys.scope)
            .key(&keys.group)
            .key(&keys.lock)
            .arg(token)
            .arg(self.settings.shared_lock.as_millis() as u64)
            .arg(if take { "1" } else { "0" });
        let started = Instant::now();
        let r = tokio::time::timeout(
            self.settings.timeout,
            inv.invoke_async::<redis::Value>(&mut conn),
        )
        .await;
        metrics::histogram!("rungen_gateway_redis_duration_seconds", "op" => "shared_lookup")
            .record(started.elapsed().as_secs_f64());
        match r {
            Ok(Ok(v)) => Ok(v),
            _ => {
                metrics::counter!("rungen_gateway_redis_errors_total", "op" => "shared_lookup")
                    .increment(1);
                Err(())
            }
        }
    }

    /// Before a fill goes upstream: a shared hit, a ticket to fetch (lock
    /// taken, or the wait ran out), or no shared cache for this fill.
    pub async fn shared_before(&self, key: &CacheKey, now: Instant) -> Before {
        if key.variant != 0 || !self.shared_usable() {
            return Before::Bypass;
        }
        let keys = self.keys_for(key);
        let token = format!("{:016x}", rand::random::<u64>());
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        let mut polls = 0u32;
        loop {
            let Ok(v) = self.lookup(&keys, &token, true).await else {
                count("error");
                return Before::Bypass;
            };
            match parse_lookup(&v) {
                Some(Lookup::Hit { meta, body, pttl }) => {
                    match entry_from(&meta, body, pttl, now + started.elapsed()) {
                        Some(e) => {
                            count(if polls > 0 { "waited-hit" } else { "hit" });
                            return Before::Hit(Arc::new(e));
                        }
                        None => {
                            count("error");
                            return Before::Bypass;
                        }
                    }
                }
                Some(Lookup::Locked { generation }) => {
                    count("lock");
                    return Before::Fetch(Ticket {
                        keys,
                        generation,
                        token,
                    });
                }
                Some(Lookup::Wait { generation }) => {
                    if started.elapsed() + pause > self.settings.shared_wait {
                        count("wait-timeout");
                        return Before::Fetch(Ticket {
                            keys,
                            generation,
                            token,
                        });
                    }
                    tokio::time::sleep(pause).await;
                    polls += 1;
                    pause = (pause * 3 / 2).min(Duration::from_millis(100));
                }
                None => {
                    count("error");
                    return Before::Bypass;
                }
            }
        }
    }

    /// After the fill: stores a shareable entry (and releases the lock), in
    /// the background so the caller does not wait for it.
    pub fn shared_after(
        self: &Arc<Self>,
        ticket: Ticket,
        entry: Option<Arc<CachedResponse>>,
        now: Instant,
    ) {
        let payload = entry.and_then(|e| encode(&e, now));
        let this = self.clone();
        tokio::spawn(async move {
            let Some(mut conn) = this.connection() else {
                return;
            };
            let (meta, body, px) = payload.unwrap_or_default();
            let mut inv = this.shared_store.prepare_invoke();
            inv.key(&ticket.keys.entry)
                .key(&ticket.keys.lock)
                .key(&ticket.keys.global)
                .key(&ticket.keys.scope)
                .key(&ticket.keys.group)
                .arg(&ticket.generation)
                .arg(meta)
                .arg(&body[..])
                .arg(px)
                .arg(&ticket.token);
            let started = Instant::now();
            let r = tokio::time::timeout(this.settings.timeout, inv.invoke_async::<i64>(&mut conn))
                .await;
            metrics::histogram!("rungen_gateway_redis_duration_seconds", "op" => "shared_store")
                .record(started.elapsed().as_secs_f64());
            match r {
                Ok(Ok(1)) => count("stored"),
                Ok(Ok(_)) => {}
                _ => metrics::counter!("rungen_gateway_redis_errors_total", "op" => "shared_store")
                    .increment(1),
            }
        });
    }
}

fn count(outcome: &'static str) {
    metrics::counter!("rungen_gateway_cluster_shared_total", "outcome" => outcome).increment(1);
}

enum Lookup {
    Hit {
        meta: Vec<u8>,
        body: bytes::Bytes,
        pttl: i64,
    },
    Locked {
        generation: String,
    },
    Wait {
        generation: String,
    },
}

fn as_bytes(v: &redis::Value) -> Option<Vec<u8>> {
    match v {
        redis::Value::BulkString(b) => Some(b.clone()),
        redis::Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

fn parse_lookup(v: &redis::Value) -> Option<Lookup> {
    let redis::Value::Array(items) = v else {
        return None;
    };
    let kind = match items.first()? {
        redis::Value::Int(k) => *k,
        _ => return None,
    };
    let generation = String::from_utf8(as_bytes(items.get(1)?)?).ok()?;
    match kind {
        1 => Some(Lookup::Hit {
            meta: as_bytes(items.get(2)?)?,
            body: bytes::Bytes::from(as_bytes(items.get(3)?)?),
            pttl: match items.get(4)? {
                redis::Value::Int(p) => *p,
                _ => return None,
            },
        }),
        2 => Some(Lookup::Locked { generation }),
        3 => Some(Lookup::Wait { generation }),
        _ => None,
    }
}

/// `(meta, body, px)` of an entry worth sharing, or `None`.
fn encode(e: &CachedResponse, now: Instant) -> Option<(String, bytes::Bytes, u64)> {
    if e.variant != 0 || !e.vary.is_empty() {
        return None;
    }
    let age = now.saturating_duration_since(e.stored_at);
    let left = e.freshness.ttl.checked_sub(age)?.min(MAX_SHARED_TTL);
    if left < MIN_SHARED_TTL {
        return None;
    }
    let text = |v: &HeaderValue| v.to_str().ok().map(str::to_string);
    let mut headers = Vec::with_capacity(e.headers.len());
    for (name, value) in &e.headers {
        headers.push((name.as_str().to_string(), text(value)?));
    }
    let meta = Meta {
        status: e.status.as_u16(),
        headers,
        etag: text(&e.etag)?,
        upstream_etag: e.upstream_etag.as_ref().and_then(text),
        last_modified: e.last_modified.as_ref().and_then(text),
        initial_age_ms: e.initial_age.as_millis() as u64,
        age_at_store_ms: age.as_millis() as u64,
        px_ms: left.as_millis() as u64,
        ttl_ms: e.freshness.ttl.as_millis() as u64,
        swr_ms: e.freshness.stale_while_revalidate.as_millis() as u64,
        sie_ms: e.freshness.stale_if_error.as_millis() as u64,
    };
    Some((
        serde_json::to_string(&meta).ok()?,
        e.body.clone(),
        left.as_millis() as u64,
    ))
}

/// The local entry for a shared one; its age counts the time it spent in Redis.
fn entry_from(meta: &[u8], body: bytes::Bytes, pttl: i64, now: Instant) -> Option<CachedResponse> {
    let m: Meta = serde_json::from_slice(meta).ok()?;
    let mut headers = HeaderMap::with_capacity(m.headers.len());
    for (n, v) in &m.headers {
        headers.append(
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        );
    }
    let in_redis = m.px_ms.saturating_sub(u64::try_from(pttl).unwrap_or(0));
    let since_fetch = Duration::from_millis(m.age_at_store_ms + in_redis);
    Some(CachedResponse {
        status: StatusCode::from_u16(m.status).ok()?,
        headers: crate::cache::store::StoredHeaders::from_map(&headers),
        body,
        etag: HeaderValue::from_str(&m.etag).ok()?,
        upstream_etag: m.upstream_etag.and_then(|v| HeaderValue::from_str(&v).ok()),
        last_modified: m.last_modified.and_then(|v| HeaderValue::from_str(&v).ok()),
        stored_at: now.checked_sub(since_fetch).unwrap_or(now),
        initial_age: Duration::from_millis(m.initial_age_ms),
        freshness: Freshness {
            ttl: Duration::from_millis(m.ttl_ms),
            stale_while_revalidate: Duration::from_millis(m.swr_ms),
            stale_if_error: Duration::from_millis(m.sie_ms),
        },
        variant: 0,
        vary: Arc::from(Vec::new()),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_the_list_or_one_app_with_everything_under_it() {
        assert_eq!(group_of("/app"), "/app");
        assert_eq!(group_of("/app/"), "/app");
        assert_eq!(group_of("/app/a1"), "/app/a1");
        assert_eq!(group_of("/app/a1/job/j1"), "/app/a1");
    }

    #[test]
    fn changes_bump_the_groups_they_touch() {
        let inv = FanOut::Invalidate {
            scopes: vec!["acme".into()],
            exact: vec!["/app/a1".into(), "/app".into()],
            prefixes: vec!["/app/a1/".into()],
        };
        assert_eq!(
            bumps(&inv),
            Bumps {
                global: false,
                scoped: vec![
                    ("acme".into(), Some("/app".into())),
                    ("acme".into(), Some("/app/a1".into())),
                ],
            }
        );
        let wide = FanOut::Invalidate {
            scopes: vec!["acme".into()],
            exact: vec![],
            prefixes: vec!["/ap".into()],
        };
        assert_eq!(bumps(&wide).scoped, vec![("acme".into(), None)]);
        let all = FanOut::Purge {
            scope: None,
            path_prefix: Some("/app/a1".into()),
        };
        assert!(bumps(&all).global);
        let scope = FanOut::Purge {
            scope: Some("acme".into()),
            path_prefix: Some("/app".into()),
        };
        assert_eq!(bumps(&scope).scoped, vec![("acme".into(), None)]);
        let one = FanOut::Purge {
            scope: Some("acme".into()),
            path_prefix: Some("/app/a1".into()),
        };
        assert_eq!(
            bumps(&one).scoped,
            vec![("acme".into(), Some("/app/a1".into()))]
        );
    }

    #[test]
    fn entries_round_trip_with_their_age() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let t0 = Instant::now();
        let e = CachedResponse::new(
            StatusCode::OK,
            h,
            bytes::Bytes::from_static(b"{\"data\":[]}"),
            t0,
            Freshness {
                ttl: Duration::from_secs(10),
                stale_while_revalidate: Duration::from_secs(5),
                stale_if_error: Duration::from_secs(60),
            },
            0,
            Arc::from(Vec::new()),
        );
        let (meta, body, px) = encode(&e, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(px, 9000);
        // Two seconds later in Redis, read on another replica.
        let later = t0 + Duration::from_secs(10);
        let back = entry_from(meta.as_bytes(), body, 7000, later).unwrap();
        assert_eq!(back.body, e.body);
        assert_eq!(back.etag, e.etag);
        assert_eq!(back.headers, e.headers);
        assert_eq!(back.age_secs(later), 3);
        assert!(back.is_fresh(later));
        assert!(!back.is_fresh(later + Duration::from_secs(7)));
        // Expired or varying entries are not shared.
        assert!(encode(&e, t0 + Duration::from_secs(10)).is_none());
    }
}
