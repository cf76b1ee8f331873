//! The request sanitisers on hostile input, with their security invariants:
//!
//! * `strip_caller_headers`: afterwards no caller credential (`x-api-key`,
//!   `x-team-id`, `authorization`, `cookie`), no routing hint (`host`,
//!   `forwarded`, `x-forwarded-*`, `x-real-ip`), no method or URL override
//!   (`x-http-method-override`, `x-original-url`, ...), no hop-by-hop header
//!   and no header named in `Connection` remains; every other header is kept
//!   as is.
//! * `normalize_escapes`: idempotent; no unreserved character stays escaped,
//!   no escape keeps lower-case hex.
//! * `check_path` (of the normalised path): an accepted path starts with `/` and has no dot segment,
//!   no empty segment (`//`), no backslash, no `;` and no encoded `.`, `/`,
//!   `\` or NUL;
//!   `classify` of an accepted path stays under the prefix it matched.
//! * `extract_token`: a token is never empty nor padded with whitespace.
//! * `valid_traceparent`: only the exact W3C version-00 shape is accepted.
//! * `client_ip`: an untrusted peer is always its own source IP; otherwise
//!   the answer is the peer or one of the `X-Forwarded-For` hops.
//!
//! Input layout: line 1 the path, line 2 the peer IP (anything unparsable
//! means 10.0.0.1, a trusted proxy), then `name: value` header lines.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, header};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use rungen_gateway::caller_auth::extract_token;
use rungen_gateway::rate_limit::client_ip;
use rungen_gateway::routing::{Prefix, Route, check_path, classify, normalize_escapes};
use rungen_gateway::telemetry::valid_traceparent;
use rungen_gateway::upstream_credentials::strip_caller_headers;
use std::net::IpAddr;

const ALWAYS_STRIPPED: [&str; 28] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
    "x-api-key",
    "x-team-id",
    "authorization",
    "cookie",
    "host",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

fn check_strip(original: &HeaderMap) {
    let mut h = original.clone();
    strip_caller_headers(&mut h);
    let named: Vec<HeaderName> = original
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        // The gateway's own correlation headers: Connection cannot name them away.
        .filter(|n| !matches!(n.as_str(), "x-request-id" | "traceparent"))
        .collect();
    let removed = |name: &HeaderName| {
        ALWAYS_STRIPPED.contains(&name.as_str())
            || name.as_str().starts_with("x-forwarded-")
            || named.contains(name)
    };
    for name in h.keys() {
        assert!(!removed(name), "`{name}` survived strip_caller_headers");
    }
    for name in original.keys() {
        if !removed(name) {
            let before: Vec<_> = original.get_all(name).iter().collect();
            let after: Vec<_> = h.get_all(name).iter().collect();
            assert_eq!(
                before, after,
                "`{name}` changed although it is not stripped"
            );
        }
    }
}

fn check_routing(raw: &str) {
    let prefixes = [Prefix::new("/app"), Prefix::new("/v2/other")];
    // As Routing does: one spelling first, then the checks on it.
    let Ok(normal) = normalize_escapes(raw) else {
        return;
    };
    let path: &str = &normal;
    assert_eq!(
        normalize_escapes(path).ok().as_deref(),
        Some(path),
        "not idempotent: {raw:?}"
    );
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let (hi, lo) = (bytes.get(i + 1), bytes.get(i + 2));
        let hex =
            |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c));
        assert!(
            hex(hi) && hex(lo),
            "an escape left lower case or broken: {raw:?} -> {path:?}"
        );
        let byte = u8::from_str_radix(&path[i + 1..i + 3], 16).unwrap_or(0);
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-_~".contains(&byte)),
            "an unreserved character left escaped: {raw:?} -> {path:?}"
        );
    }
    if check_path(path).is_err() {
        return;
    }
    let lower = path.to_ascii_lowercase();
    assert!(
        path.starts_with('/'),
        "accepted without leading /: {path:?}"
    );
    assert!(!path.contains("//"), "accepted an empty segment: {path:?}");
    assert!(!path.contains('\\'), "accepted a backslash: {path:?}");
    assert!(!path.contains(';'), "accepted a path parameter: {path:?}");
    for bad in ["%2e", "%2f", "%5c", "%00"] {
        assert!(!lower.contains(bad), "accepted {bad}: {path:?}");
    }
    for seg in path.split('/').skip(1) {
        assert!(
            seg != "." && seg != "..",
            "accepted a dot segment: {path:?}"
        );
    }
    let Some(route) = classify(path, &prefixes) else {
        return;
    };
    let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
    match &route {
        Route::AppList => assert_eq!(path, "/app"),
        Route::App { app_id } | Route::RunAsync { app_id } => {
            assert!(under("/app"));
            assert!(!app_id.is_empty() && !app_id.contains('/'), "{route:?}");
        }
        Route::Job { app_id, job_id } => {
            assert!(under("/app"));
            for id in [app_id, job_id] {
                assert!(!id.is_empty() && !id.contains('/'), "{route:?}");
            }
        }
        Route::Other { template } => {
            assert!(
                (under("/app") && &**template == "/app/*")
                    || (under("/v2/other") && &**template == "/v2/other/*"),
                "{path:?} -> {route:?}"
            );
        }
    }
    let _ = route.as_str();
}

fn check_traceparent(v: &[u8]) {
    if !valid_traceparent(v) {
        return;
    }
    assert_eq!(v.len(), 55);
    let s = std::str::from_utf8(v).expect("a valid traceparent is ASCII");
    let parts: Vec<&str> = s.split('-').collect();
    assert_eq!(parts.len(), 4, "{s}");
    assert_eq!(parts[0], "00");
    assert!(
        parts[1..].iter().all(|p| p
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))),
        "{s}"
    );
}

fn check_client_ip(peer: IpAddr, headers: &HeaderMap) {
    let trusted: [IpNet; 2] = [
        "10.0.0.0/8".parse().expect("net"),
        "::1/128".parse().expect("net"),
    ];
    let ip = client_ip(peer, headers.get_all("x-forwarded-for"), &trusted);
    let peer = peer.to_canonical();
    if !trusted.iter().any(|n| n.contains(&peer)) {
        assert_eq!(ip, peer, "an untrusted peer chose its own bucket");
        return;
    }
    if ip == peer {
        return;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| {
            // A hop may carry a port (`192.0.2.7:5123`, `[2001:db8::7]:443`) or
            // brackets, as the gateway accepts it.
            let h = h.trim();
            h.parse::<IpAddr>()
                .ok()
                .or_else(|| h.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
                .or_else(|| {
                    h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .ok()
                })
        })
        .map(|h| h.to_canonical())
        .collect();
    assert!(
        hops.contains(&ip),
        "{ip} is neither the peer nor a hop of {hops:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut it = lines(data);
    let path = String::from_utf8_lossy(it.next().unwrap_or_default()).into_owned();
    let peer: IpAddr = std::str::from_utf8(it.next().unwrap_or_default())
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(IpAddr::from([10, 0, 0, 1]));
    let mut headers = HeaderMap::new();
    for line in it {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            headers.append(name, value);
        }
    }

    check_strip(&headers);
    check_routing(&path);
    // Also the raw bytes of line 1, in case lossy decoding hid something.
    check_traceparent(path.as_bytes());
    for v in headers.get_all("traceparent") {
        check_traceparent(v.as_bytes());
    }
    if let Some(token) = extract_token(&headers) {
        assert!(!token.is_empty());
        assert_eq!(token.trim_ascii(), token, "token padded with whitespace");
    }
    check_client_ip(peer, &headers);
});
