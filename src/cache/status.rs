//! What the cache did with a request (pingora's `CachePhase` idea): one value
//! per response, rendered as an RFC 9211 `Cache-Status` header and as a short
//! name for logs and metrics.

use super::policy::NoStoreReason;
use http::HeaderValue;

/// The cache's name in `Cache-Status`.
pub const CACHE_NAME: &str = "rungen-gateway";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Fresh entry served.
    Hit,
    /// Stale entry served at once; a background refresh was started.
    StaleWhileRevalidate,
    /// Stale entry served without asking upstream: the scope is backing off after an upstream 429.
    StaleBackoff,
    /// Stale entry served because the scope's upstream budget is spent.
    StaleBudget,
    /// No usable entry: forwarded. `collapsed`: waited for another request's fetch.
    Miss {
        fwd_status: u16,
        stored: bool,
        collapsed: bool,
        reason: Option<NoStoreReason>,
    },
    /// No usable entry here; another replica's shared fetch (cluster mode,
    /// `shared_cache`) answered it without an upstream request. Stored.
    Shared { collapsed: bool },
    /// A stale entry was revalidated or replaced upstream.
    Revalidated {
        fwd_status: u16,
        stored: bool,
        collapsed: bool,
    },
    /// The client asked for revalidation and the route allows it.
    ClientRevalidate { fwd_status: u16, stored: bool },
    /// Upstream failed; a stale entry within its stale-if-error window was served.
    StaleIfError { fwd_status: Option<u16> },
    /// Not a cacheable request (a write, a body, a too-large response...).
    Bypass(NoStoreReason),
}

impl CacheStatus {
    /// A bounded name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::StaleWhileRevalidate => "stale",
            CacheStatus::StaleBackoff => "stale-backoff",
            CacheStatus::StaleBudget => "stale-budget",
            CacheStatus::Miss {
                collapsed: true, ..
            } => "collapsed",
            CacheStatus::Miss { .. } => "miss",
            CacheStatus::Shared { .. } => "shared",
            CacheStatus::Revalidated { .. } => "revalidated",
            CacheStatus::ClientRevalidate { .. } => "client-revalidate",
            CacheStatus::StaleIfError { .. } => "stale-if-error",
            CacheStatus::Bypass(_) => "bypass",
        }
    }

    /// Whether the response came from the store (so it carries `Age`).
    pub fn from_store(&self) -> bool {
        matches!(
            self,
            CacheStatus::Hit
                | CacheStatus::StaleWhileRevalidate
                | CacheStatus::StaleBackoff
                | CacheStatus::StaleBudget
                | CacheStatus::StaleIfError { .. }
        )
    }

    /// The RFC 9211 `Cache-Status` field value.
    pub fn header_value(&self) -> HeaderValue {
        let v = match self {
            CacheStatus::Hit => return HeaderValue::from_static("rungen-gateway; hit"),
            CacheStatus::StaleWhileRevalidate => {
                return HeaderValue::from_static(
                    "rungen-gateway; hit; detail=stale-while-revalidate",
                );
            }
            CacheStatus::StaleBackoff => {
                return HeaderValue::from_static("rungen-gateway; hit; detail=upstream-backoff");
            }
            CacheStatus::StaleBudget => {
                return HeaderValue::from_static("rungen-gateway; hit; detail=upstream-budget");
            }
            CacheStatus::Miss {
                fwd_status,
                stored,
                collapsed,
                reason,
            } => {
                let mut s = format!("{CACHE_NAME}; fwd=uri-miss; fwd-status={fwd_status}");
                if *stored {
                    s.push_str("; stored");
                }
                if *collapsed {
                    s.push_str("; collapsed");
                }
                if let Some(r) = reason {
                    s.push_str("; detail=");
                    s.push_str(r.as_str());
                }
                s
            }
            CacheStatus::Shared { collapsed } => {
                let mut s = format!("{CACHE_NAME}; fwd=uri-miss; stored");
                if *collapsed {
                    s.push_str("; collapsed");
                }
                s.push_str("; detail=shared");
                s
            }
            CacheStatus::Revalidated {
                fwd_status,
                stored,
                collapsed,
            } => {
                let mut s = format!("{CACHE_NAME}; fwd=stale; fwd-status={fwd_status}");
                if *stored {
                    s.push_str("; stored");
                }
                if *collapsed {
                    s.push_str("; collapsed");
                }
                s
            }
            CacheStatus::ClientRevalidate { fwd_status, stored } => {
                let mut s = format!("{CACHE_NAME}; fwd=request; fwd-status={fwd_status}");
                if *stored {
                    s.push_str("; stored");
                }
                s
            }
            CacheStatus::StaleIfError { fwd_status } => match fwd_status {
                Some(st) => {
                    format!("{CACHE_NAME}; fwd=stale; fwd-status={st}; detail=stale-if-error")
                }
                None => format!("{CACHE_NAME}; fwd=stale; detail=stale-if-error"),
            },
            CacheStatus::Bypass(reason) => {
                format!("{CACHE_NAME}; fwd=bypass; detail={}", reason.as_str())
            }
        };
        HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("rungen-gateway"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_follow_rfc_9211() {
        assert_eq!(CacheStatus::Hit.header_value(), "rungen-gateway; hit");
        assert_eq!(
            CacheStatus::Miss {
                fwd_status: 200,
                stored: true,
                collapsed: false,
                reason: None
            }
            .header_value(),
            "rungen-gateway; fwd=uri-miss; fwd-status=200; stored"
        );
        assert_eq!(
            CacheStatus::StaleIfError {
                fwd_status: Some(503)
            }
            .header_value(),
            "rungen-gateway; fwd=stale; fwd-status=503; detail=stale-if-error"
        );
        assert_eq!(
            CacheStatus::Bypass(NoStoreReason::Method).header_value(),
            "rungen-gateway; fwd=bypass; detail=method"
        );
        assert_eq!(
            CacheStatus::Shared { collapsed: true }.header_value(),
            "rungen-gateway; fwd=uri-miss; stored; collapsed; detail=shared"
        );
        assert_eq!(CacheStatus::Shared { collapsed: false }.as_str(), "shared");
        assert_eq!(
            CacheStatus::Miss {
                fwd_status: 200,
                stored: true,
                collapsed: true,
                reason: None
            }
            .as_str(),
            "collapsed"
        );
    }
}
