//! Cacheability and freshness: pure functions of (route policy, request or
//! response, now). Nothing here touches the store or the network.

use crate::routing::Route;
use http::{HeaderMap, Method, StatusCode, header};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The cache policy of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Freshness of a 200 (for the job route: of a job not yet in a terminal
    /// state). Zero: not cached (unless the upstream gives validators).
    pub ttl: Duration,
    /// Serve a stale entry at once and refresh it in the background, for this long after it went stale.
    pub stale_while_revalidate: Duration,
    /// On upstream 5xx, 429, timeout or connection failure, serve a stale entry for this long after it went stale.
    pub stale_if_error: Duration,
    /// Freshness of a 404 (negative caching); zero: 404s are not stored.
    pub negative_ttl: Duration,
    /// Take the freshness from upstream `max-age`/`s-maxage`/`Expires` when
    /// present (otherwise upstream freshness can only shorten `ttl`).
    pub follow_upstream_freshness: bool,
    /// Let a client's `Cache-Control: no-cache` force a revalidation upstream.
    pub allow_client_revalidate: bool,
    /// Job route: freshness of a job in a terminal state (COMPLETED, FAILED,
    /// CANCELED), always ending before its signed result URLs expire.
    pub terminal_ttl: Duration,
    /// Job route: how long before the earliest signed-URL expiry the entry must be gone.
    pub url_expiry_margin: Duration,
}

impl RoutePolicy {
    /// Not cached at all.
    pub fn disabled() -> Self {
        Self {
            ttl: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            negative_ttl: Duration::ZERO,
            follow_upstream_freshness: false,
            allow_client_revalidate: false,
            terminal_ttl: Duration::ZERO,
            url_expiry_margin: Duration::ZERO,
        }
    }

    /// The default for `/app` and `/app/{id}`: a few seconds, with stale windows.
    pub fn app_default() -> Self {
        Self {
            ttl: Duration::from_secs(5),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(60),
            ..Self::disabled()
        }
    }

    /// The default for `/app/{id}/job/{job_id}`: 1 s while the job runs (absorbs
    /// polling storms), 1 h once terminal, bounded by the result URLs' expiry.
    pub fn job_default() -> Self {
        Self {
            ttl: Duration::from_secs(1),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::from_secs(30),
            terminal_ttl: Duration::from_secs(3600),
            url_expiry_margin: Duration::from_secs(600),
            ..Self::disabled()
        }
    }

    /// Whether this route stores anything at all.
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero() || !self.negative_ttl.is_zero() || !self.terminal_ttl.is_zero()
    }
}

/// The policies of every route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePolicies {
    pub app_list: RoutePolicy,
    pub app: RoutePolicy,
    pub job: RoutePolicy,
    /// Other paths under a configured prefix.
    pub other: RoutePolicy,
}

impl Default for CachePolicies {
    fn default() -> Self {
        Self {
            app_list: RoutePolicy::app_default(),
            app: RoutePolicy::app_default(),
            job: RoutePolicy::job_default(),
            other: RoutePolicy::disabled(),
        }
    }
}

impl CachePolicies {
    pub fn for_route(&self, route: &Route) -> Option<&RoutePolicy> {
        let p = match route {
            Route::AppList => &self.app_list,
            Route::App { .. } => &self.app,
            Route::Job { .. } => &self.job,
            Route::RunAsync { .. } => return None,
            Route::Other { .. } => &self.other,
        };
        p.enabled().then_some(p)
    }
}

/// Why a request or response bypasses the store (pingora's `NoCacheReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStoreReason {
    /// The route is not cached.
    Route,
    /// Not a GET or HEAD.
    Method,
    /// A read with a request body.
    RequestBody,
    /// A status other than 200 (or 404 with negative caching).
    Status,
    /// Upstream `Cache-Control: no-store`.
    NoStore,
    /// Upstream `Cache-Control: private`.
    Private,
    /// The response sets a cookie.
    SetCookie,
    /// Upstream `Vary: *`.
    VaryStar,
    /// The body is over the per-entry limit.
    TooLarge,
    /// Zero freshness, no stale window, no validators: nothing worth keeping.
    ZeroTtl,
    /// The request said `Cache-Control: no-store`.
    RequestNoStore,
    /// A `Content-Encoding` body (fills ask for `identity`).
    Encoded,
    /// A signed result URL in the body expires too soon to cache it.
    UrlExpiring,
    /// A write or purge covering this key happened while it was fetched.
    Invalidated,
    /// The upstream failed (no response to store).
    UpstreamError,
    /// A collapsed caller whose varying headers pick another variant than
    /// the one the shared fetch got: it fetched its own.
    OtherVariant,
}

impl NoStoreReason {
    pub fn as_str(self) -> &'static str {
        match self {
            NoStoreReason::Route => "route",
            NoStoreReason::Method => "method",
            NoStoreReason::RequestBody => "request-body",
            NoStoreReason::Status => "status",
            NoStoreReason::NoStore => "no-store",
            NoStoreReason::Private => "private",
            NoStoreReason::SetCookie => "set-cookie",
            NoStoreReason::VaryStar => "vary-star",
            NoStoreReason::TooLarge => "too-large",
            NoStoreReason::ZeroTtl => "zero-ttl",
            NoStoreReason::UrlExpiring => "url-expiring",
            NoStoreReason::RequestNoStore => "request-no-store",
            NoStoreReason::Encoded => "content-encoding",
            NoStoreReason::Invalidated => "invalidated",
            NoStoreReason::UpstreamError => "upstream-error",
            NoStoreReason::OtherVariant => "other-variant",
        }
    }
}

/// The largest directive value taken from an upstream (ten years).
pub const MAX_DIRECTIVE_SECS: u64 = 10 * 365 * 86_400;

/// The directives of a `Cache-Control` header that a shared cache acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub must_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// A request directive: answer from the cache or not at all (504).
    pub only_if_cached: bool,
}

/// Parses every `Cache-Control` field line (directive names are case-insensitive).
pub fn parse_cache_control(headers: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl::default();
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            // Capped: absurd upstream values must not overflow time arithmetic.
            let secs = || {
                arg.and_then(|a| a.parse::<u64>().ok())
                    .map(|v| v.min(MAX_DIRECTIVE_SECS))
            };
            match name.to_ascii_lowercase().as_str() {
                "no-store" => cc.no_store = true,
                // `no-cache="field"` only restricts that field; treat it as plain no-cache (stricter).
                "no-cache" => cc.no_cache = true,
                "private" => cc.private = true,
                "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                "max-age" => cc.max_age = secs().or(Some(0)),
                "s-maxage" => cc.s_maxage = secs().or(Some(0)),
                "stale-while-revalidate" => cc.stale_while_revalidate = secs(),
                "stale-if-error" => cc.stale_if_error = secs(),
                "only-if-cached" => cc.only_if_cached = true,
                _ => {}
            }
        }
    }
    cc
}

/// Whether a client asked to bypass freshness (`no-cache`, `max-age=0`, `Pragma: no-cache`).
pub fn client_wants_revalidation(headers: &HeaderMap) -> bool {
    let cc = parse_cache_control(headers);
    cc.no_cache
        || cc.max_age == Some(0)
        || headers
            .get(header::PRAGMA)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"))
}

/// Whether a request may be answered from, or fill, the cache. `has_body`:
/// the request's body is not known to be empty (HTTP/1.1 Content-Length
/// above 0 or chunked, HTTP/2 DATA frames to come; see
/// `http_body::Body::is_end_stream`).
pub fn request_cacheable(method: &Method, has_body: bool) -> Result<(), NoStoreReason> {
    if method != Method::GET && method != Method::HEAD {
        return Err(NoStoreReason::Method);
    }
    if has_body {
        return Err(NoStoreReason::RequestBody);
    }
    Ok(())
}

/// How long a stored response may be used, relative to when it was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Fresh for this long.
    pub ttl: Duration,
    /// After going stale: served at once while refreshing, for this long.
    pub stale_while_revalidate: Duration,
    /// After going stale: served when the upstream fails, for this long.
    pub stale_if_error: Duration,
}

impl Freshness {
    /// The whole time the entry may be used in any way.
    pub fn lifetime(&self) -> Duration {
        self.ttl + self.stale_while_revalidate.max(self.stale_if_error)
    }
}

const JOB_TERMINAL: [&str; 6] = [
    "COMPLETED",
    "FAILED",
    "CANCELED",
    "CANCELLED",
    "TIMED_OUT",
    "TIMEOUT",
];

/// Decides whether a response is stored, and for how long. `set_cookie`: the
/// upstream set a cookie (the header itself is removed on the way, see
/// `upstream.rs`: it never reaches a caller).
pub fn response_freshness(
    policy: &RoutePolicy,
    route: &Route,
    status: StatusCode,
    headers: &HeaderMap,
    set_cookie: bool,
    body: &[u8],
    now: SystemTime,
) -> Result<Freshness, NoStoreReason> {
    let cc = parse_cache_control(headers);
    if cc.no_store {
        return Err(NoStoreReason::NoStore);
    }
    if cc.private {
        return Err(NoStoreReason::Private);
    }
    if set_cookie {
        return Err(NoStoreReason::SetCookie);
    }
    if headers.get_all(header::VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|f| f.trim() == "*"))
    }) {
        return Err(NoStoreReason::VaryStar);
    }
    // Fills ask for `identity`: an encoded body (an upstream that ignored
    // that) could not be read here, nor served to every caller.
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
    {
        return Err(NoStoreReason::Encoded);
    }

    // The route's own answer, and the hard end any use of the entry must respect.
    let mut hard_end: Option<Duration> = None;
    let negative = status == StatusCode::NOT_FOUND;
    let base = if status == StatusCode::OK {
        if matches!(route, Route::Job { .. }) {
            match job_state(body, now) {
                JobState::Terminal { url_expiry } => {
                    if let Some(expiry) = url_expiry {
                        let end = expiry
                            .checked_sub(policy.url_expiry_margin)
                            .and_then(|t| t.duration_since(now).ok())
                            .filter(|d| !d.is_zero())
                            .ok_or(NoStoreReason::UrlExpiring)?;
                        hard_end = Some(end);
                    }
                    policy.terminal_ttl
                }
                JobState::Pending => policy.ttl,
                // A signed URL we cannot read: keep it no longer than a pending job.
                JobState::UnreadableUrl => {
                    hard_end = Some(policy.ttl);
                    policy.ttl
                }
            }
        } else {
            policy.ttl
        }
    } else if negative && !policy.negative_ttl.is_zero() {
        policy.negative_ttl
    } else {
        return Err(NoStoreReason::Status);
    };

    // Upstream freshness: s-maxage, max-age, or Expires - Date.
    let upstream_lifetime = cc
        .s_maxage
        .or(cc.max_age)
        .map(Duration::from_secs)
        .or_else(|| {
            let expires = httpdate::parse_http_date(headers.get(header::EXPIRES)?.to_str().ok()?);
            let Ok(expires) = expires else {
                // An invalid Expires means "already expired".
                return Some(Duration::ZERO);
            };
            let date = headers
                .get(header::DATE)
                .and_then(|d| d.to_str().ok())
                .and_then(|d| httpdate::parse_http_date(d).ok())
                .unwrap_or(now);
            Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
        });
    let upstream_lifetime =
        upstream_lifetime.map(|d| d.min(Duration::from_secs(MAX_DIRECTIVE_SECS)));
    let mut ttl = match upstream_lifetime {
        Some(up) if policy.follow_upstream_freshness && !negative => up,
        Some(up) => base.min(up),
        None => base,
    };
    // Time the response already spent in caches upstream of us.
    if let Some(age) = headers
        .get(header::AGE)
        .and_then(|a| a.to_str().ok())
        .and_then(|a| a.parse::<u64>().ok())
    {
        ttl = ttl.saturating_sub(Duration::from_secs(age));
    }
    if cc.no_cache {
        ttl = Duration::ZERO;
    }

    // `s-maxage` carries `proxy-revalidate` for a shared cache (RFC 9111
    // 5.2.2.10): no stale use beyond what the upstream grants explicitly.
    let (default_swr, default_sie) = if cc.s_maxage.is_some() {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (policy.stale_while_revalidate, policy.stale_if_error)
    };
    let (mut swr, mut sie) = if negative {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (
            cc.stale_while_revalidate
                .map_or(default_swr, Duration::from_secs),
            cc.stale_if_error.map_or(default_sie, Duration::from_secs),
        )
    };
    if cc.must_revalidate || cc.no_cache {
        swr = Duration::ZERO;
        sie = Duration::ZERO;
    }
    if let Some(end) = hard_end {
        ttl = ttl.min(end);
        swr = swr.min(end - ttl);
        sie = sie.min(end - ttl);
    }
    let has_validators =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    if ttl.is_zero() && swr.is_zero() && sie.is_zero() && !has_validators {
        return Err(NoStoreReason::ZeroTtl);
    }
    Ok(Freshness {
        ttl,
        stale_while_revalidate: swr,
        stale_if_error: sie,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum JobState {
    Pending,
    Terminal { url_expiry: Option<SystemTime> },
    UnreadableUrl,
}

/// Reads a job body (`{"data": Job}` or a bare Job): its status and the
/// earliest expiry of the signed URLs in it, outside `request` (the input the
/// caller submitted: an input image's link that has run out says nothing
/// about how long the job's result may be served).
fn job_state(body: &[u8], _now: SystemTime) -> JobState {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return JobState::Pending;
    };
    let job = json.get("data").unwrap_or(&json);
    let terminal = job
        .get("status")
        .and_then(|s| s.as_str())
        .is_some_and(|s| JOB_TERMINAL.contains(&s.to_ascii_uppercase().as_str()));
    if !terminal {
        return JobState::Pending;
    }
    let mut earliest: Option<SystemTime> = None;
    let mut unreadable = false;
    let mut look = |s: &str| match signed_url(s) {
        SignedUrl::No => {}
        SignedUrl::Expires(t) => earliest = Some(earliest.map_or(t, |e| e.min(t))),
        SignedUrl::Unreadable => unreadable = true,
    };
    match job.as_object() {
        Some(fields) => fields
            .iter()
            .filter(|(k, _)| k.as_str() != "request")
            .for_each(|(_, v)| visit_strings(v, &mut look)),
        None => visit_strings(job, &mut look),
    }
    if unreadable {
        return JobState::UnreadableUrl;
    }
    JobState::Terminal {
        url_expiry: earliest,
    }
}

fn visit_strings(v: &serde_json::Value, f: &mut impl FnMut(&str)) {
    match v {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| visit_strings(x, f)),
        serde_json::Value::Object(o) => o.values().for_each(|x| visit_strings(x, f)),
        _ => {}
    }
}

/// What a string says about a link's lifetime.
#[derive(Debug, PartialEq, Eq)]
pub enum SignedUrl {
    /// Not a signed URL.
    No,
    /// A signed URL that stops working then.
    Expires(SystemTime),
    /// It carries signature or expiry parameters this cannot read.
    Unreadable,
}

/// The query parameters (lower case) that mark a URL as signed.
const SIGNATURE_PARAMS: [&str; 11] = [
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-date",
    "x-amz-expires",
    "x-goog-signature",
    "x-goog-date",
    "x-goog-expires",
    "signature",
    "expires",
    "sig",
    "se",
];

/// Reads a signed URL's expiry: S3 SigV4 (`X-Amz-Date` + `X-Amz-Expires`, the
/// form RunGen's result links take), GCS V4 (`X-Goog-Date` + `X-Goog-Expires`),
/// S3 SigV2 and CloudFront (`Expires=<unix time>`), Azure SAS (`se=<UTC
/// time>`). A URL with signature parameters but no expiry it can read is
/// [`SignedUrl::Unreadable`].
pub fn signed_url(s: &str) -> SignedUrl {
    let Some((_, query)) = s.split_once('?') else {
        return SignedUrl::No;
    };
    if !s.starts_with("http://") && !s.starts_with("https://") {
        return SignedUrl::No;
    }
    let (mut date, mut lifetime, mut until) = (None, None, None);
    let mut signed = false;
    for pair in query.split(['&', '#']) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = k.to_ascii_lowercase();
        signed |= SIGNATURE_PARAMS.contains(&k.as_str());
        match k.as_str() {
            "x-amz-date" | "x-goog-date" => date = parse_amz_date(v),
            "x-amz-expires" | "x-goog-expires" => lifetime = v.parse::<u64>().ok(),
            "expires" => {
                until = v
                    .parse::<u64>()
                    .ok()
                    .map(|t| UNIX_EPOCH + Duration::from_secs(t.min(u64::from(u32::MAX))));
            }
            "se" => until = parse_iso_utc(&v.replace("%3A", ":").replace("%3a", ":")),
            _ => {}
        }
    }
    if !signed {
        return SignedUrl::No;
    }
    // Capped and checked: an absurd X-Amz-Expires must not overflow (SigV4
    // allows at most 7 days anyway).
    let from_lifetime = date
        .zip(lifetime)
        .and_then(|(d, l)| d.checked_add(Duration::from_secs(l.min(MAX_DIRECTIVE_SECS))));
    match (from_lifetime, until) {
        (Some(a), Some(b)) => SignedUrl::Expires(a.min(b)),
        (Some(t), None) | (None, Some(t)) => SignedUrl::Expires(t),
        (None, None) => SignedUrl::Unreadable,
    }
}

/// The expiry [`signed_url`] reads, if it reads one.
pub fn signed_url_expiry(url: &str) -> Option<SystemTime> {
    match signed_url(url) {
        SignedUrl::Expires(t) => Some(t),
        _ => None,
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC; fractional seconds allowed) to a time.
fn parse_iso_utc(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let s = s.split_once('.').map_or(s, |(whole, _)| whole);
    let b = s.as_bytes();
    if b.len() != 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let compact = format!(
        "{}{}{}T{}{}{}Z",
        &s[0..4],
        &s[5..7],
        &s[8..10],
        &s[11..13],
        &s[14..16],
        &s[17..19]
    );
    parse_amz_date(&compact)
}

/// `YYYYMMDDTHHMMSSZ` (UTC) to a time.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A 200 of `route` with no headers, no cookie, now.
    fn plain(p: &RoutePolicy, route: &Route, body: &[u8]) -> Result<Freshness, NoStoreReason> {
        response_freshness(
            p,
            route,
            StatusCode::OK,
            &HeaderMap::new(),
            false,
            body,
            now(),
        )
    }
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn now() -> SystemTime {
        // 2025-01-22T15:22:28Z
        UNIX_EPOCH + Duration::from_secs(1_737_559_348)
    }

    fn job() -> Route {
        Route::Job {
            app_id: "a".into(),
            job_id: "j".into(),
        }
    }

    #[test]
    fn amz_dates_parse_as_utc() {
        assert_eq!(parse_amz_date("20250122T152228Z"), Some(now()));
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(UNIX_EPOCH));
        assert_eq!(parse_amz_date("20250122 152228Z"), None);
        assert_eq!(parse_amz_date("20251322T152228Z"), None);
        let url = "https://b.s3.amazonaws.com/x.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20250122T152228Z&X-Amz-Expires=604800&X-Amz-Signature=ab";
        assert_eq!(
            signed_url_expiry(url),
            Some(now() + Duration::from_secs(604_800))
        );
        assert_eq!(
            signed_url_expiry("https://x/y?X-Amz-Date=20250122T152228Z"),
            None
        );
    }

    #[test]
    fn cache_control_directives() {
        let cc = parse_cache_control(&headers(&[
            ("cache-control", "Max-Age=30, stale-while-revalidate=5"),
            ("cache-control", "stale-if-error=\"60\", must-revalidate"),
        ]));
        assert_eq!(cc.max_age, Some(30));
        assert_eq!(cc.stale_while_revalidate, Some(5));
        assert_eq!(cc.stale_if_error, Some(60));
        assert!(cc.must_revalidate);
        assert!(!cc.no_store);
        assert!(client_wants_revalidation(&headers(&[(
            "cache-control",
            "no-cache"
        )])));
        assert!(client_wants_revalidation(&headers(&[(
            "pragma", "no-cache"
        )])));
        assert!(!client_wants_revalidation(&headers(&[(
            "cache-control",
            "max-age=10"
        )])));
    }

    #[test]
    fn plain_200_gets_the_route_ttl_and_windows() {
        let p = RoutePolicy::app_default();
        let f = plain(&p, &Route::AppList, b"{}").unwrap();
        assert_eq!(f.ttl, Duration::from_secs(5));
        assert_eq!(f.stale_while_revalidate, Duration::from_secs(5));
        assert_eq!(f.stale_if_error, Duration::from_secs(60));
    }

    #[test]
    fn upstream_directives_refuse_or_shorten() {
        let p = RoutePolicy::app_default();
        let r = Route::AppList;
        let f = |h: &[(&str, &str)]| {
            response_freshness(&p, &r, StatusCode::OK, &headers(h), false, b"{}", now())
        };
        assert_eq!(
            f(&[("cache-control", "no-store")]),
            Err(NoStoreReason::NoStore)
        );
        assert_eq!(
            f(&[("cache-control", "private, max-age=60")]),
            Err(NoStoreReason::Private)
        );
        assert_eq!(
            response_freshness(
                &p,
                &r,
                StatusCode::OK,
                &HeaderMap::new(),
                true,
                b"{}",
                now()
            ),
            Err(NoStoreReason::SetCookie)
        );
        assert_eq!(f(&[("vary", "accept, *")]), Err(NoStoreReason::VaryStar));
        assert_eq!(
            f(&[("content-encoding", "gzip")]),
            Err(NoStoreReason::Encoded)
        );
        assert!(f(&[("content-encoding", "identity")]).is_ok());
        assert_eq!(
            f(&[("cache-control", "max-age=2")]).unwrap().ttl,
            Duration::from_secs(2)
        );
        assert_eq!(
            f(&[("cache-control", "max-age=60")]).unwrap().ttl,
            Duration::from_secs(5),
            "max-age only shortens"
        );
        assert_eq!(
            f(&[("cache-control", "max-age=60, s-maxage=1")])
                .unwrap()
                .ttl,
            Duration::from_secs(1)
        );
        assert_eq!(
            f(&[("cache-control", "max-age=4"), ("age", "3")])
                .unwrap()
                .ttl,
            Duration::from_secs(1)
        );
        let date = httpdate::fmt_http_date(now());
        let expires = httpdate::fmt_http_date(now() + Duration::from_secs(3));
        assert_eq!(
            f(&[("date", &date), ("expires", &expires)]).unwrap().ttl,
            Duration::from_secs(3)
        );
        assert_eq!(f(&[("expires", "0")]).unwrap().ttl, Duration::ZERO);
        // no-cache: stored only to revalidate, never served without asking upstream.
        let nc = f(&[("cache-control", "no-cache"), ("etag", "\"v1\"")]).unwrap();
        assert_eq!(nc.ttl, Duration::ZERO);
        assert_eq!(nc.lifetime(), Duration::ZERO);
        assert_eq!(
            f(&[("cache-control", "no-cache")]),
            Err(NoStoreReason::ZeroTtl)
        );
        // Upstream stale windows are honoured.
        let w = f(&[(
            "cache-control",
            "max-age=3, stale-while-revalidate=7, stale-if-error=9",
        )])
        .unwrap();
        assert_eq!(
            (w.stale_while_revalidate, w.stale_if_error),
            (Duration::from_secs(7), Duration::from_secs(9))
        );
        let mr = f(&[("cache-control", "max-age=3, must-revalidate")]).unwrap();
        assert_eq!(mr.lifetime(), Duration::from_secs(3));
        // s-maxage: proxy-revalidate for a shared cache, so the route's
        // default stale windows do not apply; the upstream's own still do.
        let sm = f(&[("cache-control", "s-maxage=3")]).unwrap();
        assert_eq!(sm.lifetime(), Duration::from_secs(3));
        let smw = f(&[("cache-control", "s-maxage=3, stale-if-error=9")]).unwrap();
        assert_eq!(
            (smw.stale_while_revalidate, smw.stale_if_error),
            (Duration::ZERO, Duration::from_secs(9))
        );
    }

    #[test]
    fn follow_upstream_freshness_sets_the_ttl() {
        let p = RoutePolicy {
            follow_upstream_freshness: true,
            ..RoutePolicy::app_default()
        };
        let f = response_freshness(
            &p,
            &Route::AppList,
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=60")]),
            false,
            b"{}",
            now(),
        )
        .unwrap();
        assert_eq!(f.ttl, Duration::from_secs(60));
    }

    #[test]
    fn only_200_and_configured_404_are_stored() {
        let mut p = RoutePolicy::app_default();
        let f = |p: &RoutePolicy, s| {
            response_freshness(p, &Route::AppList, s, &HeaderMap::new(), false, b"", now())
        };
        assert_eq!(f(&p, StatusCode::NOT_FOUND), Err(NoStoreReason::Status));
        assert_eq!(
            f(&p, StatusCode::INTERNAL_SERVER_ERROR),
            Err(NoStoreReason::Status)
        );
        assert_eq!(f(&p, StatusCode::NO_CONTENT), Err(NoStoreReason::Status));
        p.negative_ttl = Duration::from_secs(2);
        let n = f(&p, StatusCode::NOT_FOUND).unwrap();
        assert_eq!(n.ttl, Duration::from_secs(2));
        assert_eq!(
            n.lifetime(),
            Duration::from_secs(2),
            "no stale windows for 404s"
        );
    }

    fn job_body(status: &str, urls: &[&str]) -> Vec<u8> {
        let images: Vec<serde_json::Value> = urls
            .iter()
            .map(|u| serde_json::json!({"image": u}))
            .collect();
        serde_json::json!({"data": {"id": "j", "status": status, "result": if urls.is_empty() { serde_json::Value::Null } else { serde_json::json!({"images": images}) }}})
            .to_string()
            .into_bytes()
    }

    fn url(date: &str, expires: u64) -> String {
        format!(
            "https://rungenai-output-v1.s3.us-east-2.amazonaws.com/j/0.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-Signature=00"
        )
    }

    #[test]
    fn pending_job_gets_the_short_ttl_terminal_the_long_one() {
        let p = RoutePolicy::job_default();
        let pending = plain(&p, &job(), &job_body("IN_PROGRESS", &[])).unwrap();
        assert_eq!(pending.ttl, Duration::from_secs(1));
        let failed = plain(&p, &job(), &job_body("FAILED", &[])).unwrap();
        assert_eq!(failed.ttl, Duration::from_secs(3600));
        let done = plain(
            &p,
            &job(),
            &job_body("COMPLETED", &[&url("20250122T152228Z", 604_800)]),
        )
        .unwrap();
        assert_eq!(done.ttl, Duration::from_secs(3600));
    }

    #[test]
    fn terminal_job_ttl_ends_before_the_earliest_url_expiry() {
        let p = RoutePolicy::job_default(); // margin 600 s
        // The earliest of two URLs expires in 1000 s: 400 s of use in total.
        let body = job_body(
            "COMPLETED",
            &[
                &url("20250122T152228Z", 5000),
                &url("20250122T150000Z", 2348),
            ],
        );
        let f = plain(&p, &job(), &body).unwrap();
        assert_eq!(f.ttl, Duration::from_secs(400));
        assert_eq!(
            f.lifetime(),
            Duration::from_secs(400),
            "stale windows never outlive the URLs"
        );
        // Within the margin already: not stored.
        let body = job_body("COMPLETED", &[&url("20250122T152228Z", 300)]);
        assert_eq!(plain(&p, &job(), &body), Err(NoStoreReason::UrlExpiring));
        // A signed URL we cannot read: no longer than a pending job.
        let body = job_body(
            "COMPLETED",
            &["https://x/y.png?X-Amz-Date=garbage&X-Amz-Expires=1"],
        );
        let f = plain(&p, &job(), &body).unwrap();
        assert_eq!(f.lifetime(), Duration::from_secs(1));
    }

    #[test]
    fn signed_urls_of_other_stores_are_read_too() {
        let t = |secs: u64| SignedUrl::Expires(UNIX_EPOCH + Duration::from_secs(secs));
        let at = |s: &str| match signed_url(s) {
            SignedUrl::Expires(t) => SignedUrl::Expires(t),
            other => other,
        };
        let amz = now() + Duration::from_secs(604_800);
        assert_eq!(
            at(&url("20250122T152228Z", 604_800)),
            SignedUrl::Expires(amz)
        );
        assert_eq!(
            at(
                "https://storage.googleapis.com/b/o.png?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Date=20250122T152228Z&X-Goog-Expires=60&X-Goog-Signature=ab"
            ),
            SignedUrl::Expires(now() + Duration::from_secs(60))
        );
        assert_eq!(
            at("https://b.s3.amazonaws.com/o.png?AWSAccessKeyId=A&Expires=1737559348&Signature=ab"),
            t(1_737_559_348)
        );
        assert_eq!(
            at("https://d1.cloudfront.net/o.png?Expires=1737559348&Signature=ab&Key-Pair-Id=K"),
            t(1_737_559_348)
        );
        assert_eq!(
            at(
                "https://a.blob.core.windows.net/c/o.png?sv=2022-11-02&se=2025-01-22T15%3A22%3A28Z&sr=b&sp=r&sig=ab"
            ),
            SignedUrl::Expires(now())
        );
        // Signed, but with no expiry this can read: capped like any unreadable link.
        for unreadable in [
            "https://x/o.png?X-Amz-Date=20250122T152228Z&X-Amz-Signature=ab",
            "https://x/o.png?Signature=ab",
            "https://x/o.png?sig=ab&se=tomorrow",
            "https://x/o.png?Expires=soon&Signature=ab",
        ] {
            assert_eq!(
                signed_url(unreadable),
                SignedUrl::Unreadable,
                "{unreadable}"
            );
        }
        for plain in [
            "https://x/o.png",
            "https://x/o.png?size=large",
            "a prompt with ?sig= in it",
        ] {
            assert_eq!(signed_url(plain), SignedUrl::No, "{plain}");
        }
    }

    #[test]
    fn the_input_of_a_job_does_not_bound_its_result() {
        let p = RoutePolicy::job_default();
        // An img2img job whose input link ran out long ago; its result links
        // are good for 7 days.
        let body = serde_json::json!({"data": {
            "id": "j",
            "status": "COMPLETED",
            "request": {"input": {"image": url("20240101T000000Z", 60)}},
            "result": {"images": [{"image": url("20250122T152228Z", 604_800)}]},
        }})
        .to_string();
        let f = plain(&p, &job(), body.as_bytes()).unwrap();
        assert_eq!(f.ttl, Duration::from_secs(3600), "the route's terminal TTL");
        // The result's links still bound it.
        let body = serde_json::json!({"data": {
            "status": "COMPLETED",
            "request": {"input": {"image": url("20250122T152228Z", 604_800)}},
            "result": {"images": [{"image": url("20250122T152228Z", 1000)}]},
        }})
        .to_string();
        let f = plain(&p, &job(), body.as_bytes()).unwrap();
        assert_eq!(f.lifetime(), Duration::from_secs(400));
    }

    #[test]
    fn requests_that_may_use_the_cache() {
        assert!(request_cacheable(&Method::GET, false).is_ok());
        assert!(request_cacheable(&Method::HEAD, false).is_ok());
        assert_eq!(
            request_cacheable(&Method::POST, false),
            Err(NoStoreReason::Method)
        );
        assert_eq!(
            request_cacheable(&Method::GET, true),
            Err(NoStoreReason::RequestBody)
        );
        let p = CachePolicies::default();
        assert!(p.for_route(&Route::AppList).is_some());
        assert!(
            p.for_route(&Route::RunAsync { app_id: "a".into() })
                .is_none()
        );
        assert!(
            p.for_route(&Route::Other {
                template: "/x/*".into()
            })
            .is_none()
        );
    }
}
