//! Cache keys: team scope + path + normalised query (+ the variant of the
//! request headers the upstream varies on). Only reads are stored, so GET and
//! HEAD share one entry (one method class). The key holds no secret: the
//! scope is its configured name, never its key.

use http::{HeaderMap, HeaderName};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub scope: Arc<str>,
    pub path: Arc<str>,
    /// The query with empty pairs dropped and pairs sorted ("" for none).
    pub query: Arc<str>,
    /// Hash of the request's values of the upstream's `Vary` headers (0: none).
    pub variant: u64,
}

impl CacheKey {
    pub fn new(scope: &Arc<str>, path: &str, query: Option<&str>) -> Self {
        Self {
            scope: scope.clone(),
            path: Arc::from(path),
            query: Arc::from(normalize_query(query.unwrap_or("")).as_str()),
            variant: 0,
        }
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

/// Sorts the query's pairs and drops empty ones, so `b=2&a=1&` and
/// `a=1&b=2` share an entry. Encoding is kept as sent (no decoding).
pub fn normalize_query(query: &str) -> String {
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_unstable();
    pairs.join("&")
}

/// Request headers that never select a variant: the upstream sees the scope's
/// credentials, never the caller's, so varying on them means varying by scope,
/// which the key already does.
fn ignored_for_vary(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization" | "x-api-key" | "x-team-id" | "cookie"
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
        assert_eq!(normalize_query(""), "");
        let s: Arc<str> = Arc::from("acme");
        assert_eq!(
            CacheKey::new(&s, "/app", Some("b=2&a=1")),
            CacheKey::new(&s, "/app", Some("a=1&b=2"))
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
