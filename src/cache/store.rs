//! The moka store (the synchronous flavour: a lookup never waits, so the
//! hit path needs no future of its own): entries ready to send, bounded by bytes (weigher +
//! `max_capacity`), each expiring after its own lifetime (`Expiry`), plus the
//! index of which paths vary on which request headers.

use super::key::CacheKey;
use super::policy::Freshness;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use moka::Expiry;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A stored response: status, headers ready to send, body as `Bytes`.
#[derive(Debug)]
pub struct CachedResponse {
    pub status: StatusCode,
    /// Sent as they are: no hop-by-hop headers, no `Age`, with `ETag`.
    pub headers: StoredHeaders,
    pub body: Bytes,
    /// The strong `ETag` served (upstream's if strong, else computed from the body).
    pub etag: HeaderValue,
    /// Upstream's validators, for revalidation.
    pub upstream_etag: Option<HeaderValue>,
    pub last_modified: Option<HeaderValue>,
    pub stored_at: Instant,
    /// `Age` the upstream reported when it was stored.
    pub initial_age: Duration,
    pub freshness: Freshness,
    /// The variant of the request that filled it (0: the upstream does not vary).
    pub variant: u64,
    pub vary: Arc<[HeaderName]>,
}

impl CachedResponse {
    pub fn new(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        stored_at: Instant,
        freshness: Freshness,
        variant: u64,
        vary: Arc<[HeaderName]>,
    ) -> Self {
        let initial_age = headers
            .get(header::AGE)
            .and_then(|a| a.to_str().ok())
            .and_then(|a| a.parse::<u64>().ok())
            .map_or(Duration::ZERO, |a| {
                Duration::from_secs(a.min(super::policy::MAX_DIRECTIVE_SECS))
            });
        headers.remove(header::AGE);
        let upstream_etag = headers.get(header::ETAG).cloned();
        let strong = upstream_etag
            .as_ref()
            .is_some_and(|e| !e.as_bytes().starts_with(b"W/"));
        // Only a 2xx gets a computed tag: preconditions apply to nothing else
        // (RFC 9110 13.2.1), and a tag on a cached 404 invites a 304 for it.
        if !strong && status.is_success() {
            headers.insert(header::ETAG, computed_etag(&body));
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        // Own every header value: values parsed by hyper are slices of its
        // read buffer, and keeping one alive would keep the whole buffer (KiBs
        // per entry that the weigher never sees).
        let headers = StoredHeaders::from_map(&headers);
        let etag = headers
            .get(&header::ETAG)
            .cloned()
            .unwrap_or_else(|| computed_etag(&body));
        let last_modified = headers.get(&header::LAST_MODIFIED).cloned();
        // A weak upstream tag is kept apart (only for revalidation), owned too.
        let upstream_etag = match upstream_etag {
            Some(_) if strong => Some(etag.clone()),
            Some(weak) => HeaderValue::from_bytes(weak.as_bytes()).ok(),
            None => None,
        };
        Self {
            status,
            headers,
            body,
            etag,
            upstream_etag,
            last_modified,
            stored_at,
            initial_age,
            freshness,
            variant,
            vary,
        }
    }

    fn since_stored(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        self.since_stored(now) < self.freshness.ttl
    }

    /// Stale, but within the stale-while-revalidate window.
    pub fn within_stale_while_revalidate(&self, now: Instant) -> bool {
        self.since_stored(now) < self.freshness.ttl + self.freshness.stale_while_revalidate
    }

    /// Stale, but within the stale-if-error window.
    pub fn within_stale_if_error(&self, now: Instant) -> bool {
        self.since_stored(now) < self.freshness.ttl + self.freshness.stale_if_error
    }

    /// Within any window at all.
    pub fn usable(&self, now: Instant) -> bool {
        self.since_stored(now) < self.freshness.lifetime()
    }

    /// Whole seconds of `Age`.
    pub fn age_secs(&self, now: Instant) -> u64 {
        self.initial_age
            .saturating_add(self.since_stored(now))
            .as_secs()
    }

    /// Approximate memory held, for the weigher.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + 256
    }

    /// Whether `If-None-Match` matches this entry (weak comparison, RFC 9110 §13.1.2).
    /// Only a 2xx answer can be "not modified" (RFC 9110 13.2.1: a cached
    /// 404 answers as a 404 whatever the caller's `If-None-Match`).
    pub fn matches_if_none_match(&self, inm: &HeaderValue) -> bool {
        if !self.status.is_success() {
            return false;
        }
        let Ok(list) = inm.to_str() else { return false };
        let ours = strip_weak(self.etag.as_bytes());
        list.split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || strip_weak(tag.as_bytes()) == ours)
    }
}

/// A stored response's headers: a boxed slice (a `HeaderMap` holds hash
/// links and spare capacity: ~200 bytes more per entry for the five headers
/// of a typical answer). A hit builds its map from it, sized for the headers
/// the gateway adds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredHeaders(Box<[(HeaderName, HeaderValue)]>);

impl StoredHeaders {
    /// A copy of `headers` whose values share no buffer with anything else
    /// (values parsed by hyper are slices of its read buffer), all in one
    /// allocation (100k entries of the `/app` list: ~120 bytes less each than
    /// one allocation per value).
    pub fn from_map(headers: &HeaderMap) -> Self {
        let mut all = BytesMut::with_capacity(headers.iter().map(|(_, v)| v.len()).sum());
        for (_, value) in headers.iter() {
            all.extend_from_slice(value.as_bytes());
        }
        let all = all.freeze();
        let mut out = Vec::with_capacity(headers.len());
        let mut at = 0;
        for (name, value) in headers.iter() {
            let bytes = all.slice(at..at + value.len());
            at += value.len();
            let mut copy = HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            out.push((name.clone(), copy));
        }
        StoredHeaders(out.into_boxed_slice())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn contains_key(&self, name: &HeaderName) -> bool {
        self.get(name).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.into_iter()
    }

    /// A `HeaderMap` of these headers with room for `extra` more.
    pub fn to_map(&self, extra: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.0.len() + extra);
        for (n, v) in self.0.iter() {
            map.append(n.clone(), v.clone());
        }
        map
    }
}

impl<'a> IntoIterator for &'a StoredHeaders {
    type Item = (&'a HeaderName, &'a HeaderValue);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (HeaderName, HeaderValue)>,
        fn(&'a (HeaderName, HeaderValue)) -> (&'a HeaderName, &'a HeaderValue),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(n, v)| (n, v))
    }
}

fn strip_weak(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

/// A strong `ETag` from the body's SHA-256.
pub fn computed_etag(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    let tag = format!("\"{}\"", hex::encode(&digest[..16]));
    HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// Each entry lives for its own lifetime (fresh + the longer stale window).
struct EntryExpiry;

impl Expiry<CacheKey, Arc<CachedResponse>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(keep_for(value))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(keep_for(value))
    }
}

/// An entry with validators but no freshness (`no-cache`) is kept a minute to
/// revalidate with; everything else exactly as long as it may be used.
fn keep_for(value: &CachedResponse) -> Duration {
    let lifetime = value.freshness.lifetime();
    if lifetime.is_zero() {
        Duration::from_secs(60)
    } else {
        lifetime
    }
}

/// Keys come from callers (paths, query strings), so their hash is seeded per
/// process; foldhash rather than SipHash (std's default), about a fifth of
/// the cost per lookup.
pub type KeyHasher = foldhash::quality::RandomState;

pub type Entries = moka::sync::Cache<CacheKey, Arc<CachedResponse>, KeyHasher>;

/// Builds the bounded entry store.
pub fn build_entries(max_bytes: u64) -> Entries {
    moka::sync::Cache::builder()
        .name("rungen-gateway-responses")
        .max_capacity(max_bytes)
        .weigher(|k: &CacheKey, v: &Arc<CachedResponse>| {
            u32::try_from(k.weight() + v.weight()).unwrap_or(u32::MAX)
        })
        .expire_after(EntryExpiry)
        .support_invalidation_closures()
        .eviction_listener(|_k, _v, cause| {
            if cause.was_evicted() && cause == moka::notification::RemovalCause::Size {
                metrics::counter!("rungen_gateway_cache_evictions_total").increment(1);
            }
        })
        .build_with_hasher(KeyHasher::default())
}

/// Which base keys vary on which request headers (absent: they do not vary).
pub type VaryIndex = moka::sync::Cache<CacheKey, Arc<[HeaderName]>, KeyHasher>;

/// The Vary index's bound: an eighth of the store's, at least 64 KiB. Its
/// keys come from callers (a path and query of up to `max_uri_bytes` each)
/// and outlive the responses they were made for, so it is bounded by bytes
/// like the store; an entry evicted early costs one miss, never a wrong
/// variant (stored variants are keyed by their request headers).
pub fn vary_index_max_bytes(store_max_bytes: u64) -> u64 {
    (store_max_bytes / 8).max(64 * 1024)
}

pub fn build_vary_index(store_max_bytes: u64) -> VaryIndex {
    moka::sync::Cache::builder()
        .max_capacity(vary_index_max_bytes(store_max_bytes))
        .weigher(|k: &CacheKey, names: &Arc<[HeaderName]>| {
            let names: usize = names.iter().map(|n| n.as_str().len() + 16).sum();
            u32::try_from(k.weight() + names + 64).unwrap_or(u32::MAX)
        })
        .time_to_idle(Duration::from_secs(3600))
        .support_invalidation_closures()
        .build_with_hasher(KeyHasher::default())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(etag: Option<&'static str>, ttl: u64, swr: u64, sie: u64) -> CachedResponse {
        let mut h = HeaderMap::new();
        if let Some(e) = etag {
            h.insert(header::ETAG, HeaderValue::from_static(e));
        }
        h.insert(header::AGE, HeaderValue::from_static("2"));
        CachedResponse::new(
            StatusCode::OK,
            h,
            Bytes::from_static(b"{\"data\":[]}"),
            Instant::now(),
            Freshness {
                ttl: Duration::from_secs(ttl),
                stale_while_revalidate: Duration::from_secs(swr),
                stale_if_error: Duration::from_secs(sie),
            },
            0,
            Arc::from(Vec::new()),
        )
    }

    #[test]
    fn windows_follow_the_freshness() {
        let e = entry(None, 5, 5, 60);
        let t = e.stored_at;
        assert!(e.is_fresh(t + Duration::from_secs(4)));
        assert!(!e.is_fresh(t + Duration::from_secs(5)));
        assert!(e.within_stale_while_revalidate(t + Duration::from_secs(9)));
        assert!(!e.within_stale_while_revalidate(t + Duration::from_secs(10)));
        assert!(e.within_stale_if_error(t + Duration::from_secs(64)));
        assert!(!e.usable(t + Duration::from_secs(65)));
        // Age includes what the upstream reported.
        assert_eq!(e.age_secs(t + Duration::from_secs(3)), 5);
        assert!(!e.headers.contains_key(&header::AGE));
    }

    #[test]
    fn etag_is_upstreams_when_strong_else_computed() {
        let e = entry(Some("\"v1\""), 5, 0, 0);
        assert_eq!(e.etag, "\"v1\"");
        let w = entry(Some("W/\"v1\""), 5, 0, 0);
        assert_ne!(w.etag, "W/\"v1\"");
        assert!(!w.etag.as_bytes().starts_with(b"W/"));
        assert_eq!(w.upstream_etag.as_ref().unwrap(), "W/\"v1\"");
        let n = entry(None, 5, 0, 0);
        assert_eq!(n.etag, computed_etag(b"{\"data\":[]}"));
        assert!(n.matches_if_none_match(&n.etag));
        assert!(n.matches_if_none_match(&HeaderValue::from_static("\"x\", *")));
        assert!(!n.matches_if_none_match(&HeaderValue::from_static("\"x\"")));
        let weak = HeaderValue::from_str(&format!("W/{}", n.etag.to_str().unwrap())).unwrap();
        assert!(n.matches_if_none_match(&weak));
    }
}
