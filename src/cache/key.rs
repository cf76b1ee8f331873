//! Cache keys: team scope + path + normalised query (+ the variant of the
//! request headers the upstream varies on). Only reads are stored, so GET and
//! HEAD share one entry (one method class). The key holds no secret: the
//! scope is its configured name, never its key.

use http::{HeaderMap, HeaderName};
use std::borrow::{Borrow, Cow};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

/// Hashed and compared through [`KeyParts`], so a [`KeyRef`] borrowed from a
/// request finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub scope: Arc<str>,
    pub path: Arc<str>,
    /// The query with empty pairs dropped and pairs sorted by name ("" for none).
    pub query: Arc<str>,
    /// Hash of the request's values of the upstream's `Vary` headers (0: none).
    pub variant: u64,
}

impl CacheKey {
    pub fn new(scope: &Arc<str>, path: &str, query: Option<&str>) -> Self {
        KeyRef::new(scope, path, query).to_key(scope)
    }

    pub fn with_variant(&self, variant: u64) -> Self {
        Self {
            variant,
            ..self.clone()
        }
    }

    /// Approximate heap size, for the weigher.
    pub fn weight(&self) -> usize {
        self.scope.len() + self.path.len() + self.query.len() + 48
    }
}

/// A key's parts, whether owned ([`CacheKey`]) or borrowed ([`KeyRef`]): the
/// store is looked up through `dyn KeyParts`, so a hit builds no key (two
/// allocations per request otherwise).
pub trait KeyParts {
    /// Scope, path, normalised query, variant.
    fn parts(&self) -> (&str, &str, &str, u64);
}

impl KeyParts for CacheKey {
    fn parts(&self) -> (&str, &str, &str, u64) {
        (&self.scope, &self.path, &self.query, self.variant)
    }
}

impl Hash for dyn KeyParts + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (scope, path, query, variant) = self.parts();
        scope.hash(state);
        path.hash(state);
        query.hash(state);
        variant.hash(state);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn KeyParts).hash(state);
    }
}

impl<'a> Borrow<dyn KeyParts + 'a> for CacheKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

/// A key borrowed from a request (the query is copied only when it has to be
/// reordered).
#[derive(Debug, Clone)]
pub struct KeyRef<'a> {
    pub scope: &'a str,
    pub path: &'a str,
    pub query: Cow<'a, str>,
    pub variant: u64,
}

impl<'a> KeyRef<'a> {
    pub fn new(scope: &'a str, path: &'a str, query: Option<&'a str>) -> Self {
        let query = match query {
            None | Some("") => Cow::Borrowed(""),
            Some(q) => Cow::Owned(normalize_query(q)),
        };
        Self {
            scope,
            path,
            query,
            variant: 0,
        }
    }

    /// The owned key (`scope` is the shared name this view borrowed from).
    pub fn to_key(&self, scope: &Arc<str>) -> CacheKey {
        debug_assert_eq!(&**scope, self.scope);
        CacheKey {
            scope: scope.clone(),
            path: Arc::from(self.path),
            query: Arc::from(&*self.query),
            variant: self.variant,
        }
    }
}

impl KeyParts for KeyRef<'_> {
    fn parts(&self) -> (&str, &str, &str, u64) {
        (self.scope, self.path, &self.query, self.variant)
    }
}

/// Sorts the query's pairs by name and drops empty ones, so `b=2&a=1&` and
/// `a=1&b=2` share an entry. Pairs of one name keep their order (`s=1&s=2`
/// may mean something else than `s=2&s=1`). Encoding is kept as sent (no
/// decoding).
pub fn normalize_query(query: &str) -> String {
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_by_key(|p| p.split('=').next().unwrap_or(p));
    pairs.join("&")
}

/// Request headers that never select a variant: the upstream sees the scope's
/// credentials, never the caller's, so varying on them means varying by scope,
/// which the key already does; and every fill asks for `Accept-Encoding:
/// identity` whatever the caller sent, so there is one encoding to store.
fn ignored_for_vary(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization" | "x-api-key" | "x-team-id" | "cookie" | "accept-encoding"
    )
}

/// The header names of a response's `Vary` (lower-case, credentials dropped).
pub fn vary_names(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = headers
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !ignored_for_vary(n))
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
}

/// The variant of a request for the given `Vary` names (0 when there are none).
pub fn variant(names: &[HeaderName], request: &HeaderMap) -> u64 {
    if names.is_empty() {
        return 0;
    }
    let mut h = DefaultHasher::new();
    for name in names {
        name.as_str().hash(&mut h);
        for v in request.get_all(name) {
            v.as_bytes().hash(&mut h);
        }
        0xffu8.hash(&mut h);
    }
    // 0 means "no variant".
    h.finish().max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn query_order_and_empty_pairs_do_not_matter() {
        assert_eq!(normalize_query("b=2&a=1&"), "a=1&b=2");
        // Repeated names keep their order.
        assert_eq!(normalize_query("s=2&a=1&s=1"), "a=1&s=2&s=1");
        assert_ne!(normalize_query("s=1&s=2"), normalize_query("s=2&s=1"));
        assert_eq!(normalize_query(""), "");
        let s: Arc<str> = Arc::from("acme");
        assert_eq!(
            CacheKey::new(&s, "/app", Some("b=2&a=1")),
            CacheKey::new(&s, "/app", Some("a=1&b=2"))
        );
    }

    #[test]
    fn a_borrowed_key_finds_the_owned_one_and_only_it() {
        use std::collections::HashMap;
        let acme: Arc<str> = Arc::from("acme");
        let mut map: HashMap<CacheKey, u32> = HashMap::new();
        map.insert(CacheKey::new(&acme, "/app", Some("b=2&a=1")), 1);
        map.insert(CacheKey::new(&acme, "/app", None), 2);
        map.insert(CacheKey::new(&acme, "/app", None).with_variant(7), 3);
        let find = |k: &KeyRef<'_>| map.get(k as &dyn KeyParts).copied();
        assert_eq!(find(&KeyRef::new("acme", "/app", Some("a=1&b=2"))), Some(1));
        assert_eq!(find(&KeyRef::new("acme", "/app", None)), Some(2));
        assert_eq!(find(&KeyRef::new("acme", "/app", Some(""))), Some(2));
        let mut variant = KeyRef::new("acme", "/app", None);
        variant.variant = 7;
        assert_eq!(find(&variant), Some(3));
        assert_eq!(find(&KeyRef::new("globex", "/app", None)), None);
        assert_eq!(find(&KeyRef::new("acme", "/app/", None)), None);
        // Field boundaries are part of the hash and the comparison.
        assert_eq!(find(&KeyRef::new("acm", "e/app", None)), None);
        assert_eq!(
            KeyRef::new("acme", "/app", Some("b=2&a=1")).to_key(&acme),
            CacheKey::new(&acme, "/app", Some("a=1&b=2"))
        );
    }

    #[test]
    fn scopes_never_share_a_key() {
        let a: Arc<str> = Arc::from("acme");
        let b: Arc<str> = Arc::from("globex");
        assert_ne!(
            CacheKey::new(&a, "/app", None),
            CacheKey::new(&b, "/app", None)
        );
    }

    #[test]
    fn vary_selects_variants_but_never_by_credentials() {
        let mut resp = HeaderMap::new();
        resp.insert(
            "vary",
            HeaderValue::from_static("Accept, Authorization, x-api-key"),
        );
        let names = vary_names(&resp);
        assert_eq!(names, vec![HeaderName::from_static("accept")]);
        let mut r1 = HeaderMap::new();
        r1.insert("accept", HeaderValue::from_static("application/json"));
        r1.insert("authorization", HeaderValue::from_static("Bearer one"));
        let mut r2 = r1.clone();
        r2.insert("authorization", HeaderValue::from_static("Bearer two"));
        assert_eq!(variant(&names, &r1), variant(&names, &r2));
        let mut r3 = r1.clone();
        r3.insert("accept", HeaderValue::from_static("text/html"));
        assert_ne!(variant(&names, &r1), variant(&names, &r3));
        assert_eq!(variant(&[], &r1), 0);
    }
}
