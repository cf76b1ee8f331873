//! Cache header parsing and freshness decisions on hostile input.
//!
//! Input layout (all parts optional):
//!   line 1            a URL (its query goes to `normalize_query`, the whole
//!                     line to `signed_url_expiry`)
//!   `name: value`     header lines (invalid names/values are skipped) until
//!                     the first empty line
//!   the rest          the response body (job routes parse it as JSON)
//!
//! Besides "never panic", checks cheap invariants: `normalize_query` is
//! idempotent, `vary_names` is sorted, deduplicated and never names a
//! credential header, `variant` is 0 exactly when there are no names,
//! `no-store` is never stored, and a stored response's whole lifetime (what
//! the store computes for every entry) can be computed.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use rungen_gateway::cache::key::{normalize_query, variant, vary_names};
use rungen_gateway::cache::policy::{
    NoStoreReason, RoutePolicy, client_wants_revalidation, parse_cache_control, response_freshness,
    signed_url_expiry,
};
use rungen_gateway::routing::Route;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// The next line of `rest` (without its LF or CRLF), advancing `rest`.
fn next_line<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    if rest.is_empty() {
        return None;
    }
    let (line, tail) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (*rest, &rest[rest.len()..]),
    };
    *rest = tail;
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

fn split_lines(data: &[u8]) -> (&[u8], HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    let mut rest = data;
    let url = next_line(&mut rest).unwrap_or_default();
    while let Some(line) = next_line(&mut rest) {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    (url, headers, rest)
}

fn policies() -> [RoutePolicy; 4] {
    let follow = RoutePolicy {
        follow_upstream_freshness: true,
        negative_ttl: Duration::from_secs(3),
        ..RoutePolicy::app_default()
    };
    [
        RoutePolicy::app_default(),
        RoutePolicy::job_default(),
        RoutePolicy::disabled(),
        follow,
    ]
}

fuzz_target!(|data: &[u8]| {
    let (url, headers, body) = split_lines(data);
    let url = String::from_utf8_lossy(url);

    // Request side.
    let cc = parse_cache_control(&headers);
    let _ = client_wants_revalidation(&headers);

    // Keys.
    let query = url.split_once('?').map_or(&*url, |(_, q)| q);
    let normalized = normalize_query(query);
    assert_eq!(normalize_query(&normalized), normalized, "not idempotent");
    let names = vary_names(&headers);
    for pair in names.windows(2) {
        assert!(
            pair[0].as_str() < pair[1].as_str(),
            "unsorted or duplicate: {names:?}"
        );
    }
    for n in &names {
        assert!(
            !matches!(
                n.as_str(),
                "authorization" | "x-api-key" | "x-team-id" | "cookie"
            ),
            "credential header in vary names: {n}"
        );
    }
    let v = variant(&names, &headers);
    assert_eq!(v == 0, names.is_empty(), "variant 0 iff no names");

    // Signed URLs.
    let _ = signed_url_expiry(&url);

    // Response side: every route, several policies and statuses.
    let now = UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    let routes = [
        Route::AppList,
        Route::App { app_id: "a".into() },
        Route::RunAsync { app_id: "a".into() },
        Route::Job {
            app_id: "a".into(),
            job_id: "j".into(),
        },
        Route::Other {
            template: Arc::from("/app/*"),
        },
    ];
    for policy in &policies() {
        for route in &routes {
            for status in [
                StatusCode::OK,
                StatusCode::NOT_FOUND,
                StatusCode::INTERNAL_SERVER_ERROR,
            ] {
                for (at, set_cookie) in [(now, false), (UNIX_EPOCH, false), (now, true)] {
                    let r =
                        response_freshness(policy, route, status, &headers, set_cookie, body, at);
                    match r {
                        Ok(f) => {
                            assert!(!cc.no_store, "no-store response stored");
                            assert!(!set_cookie, "a response that set a cookie stored");
                            // What the store does with every entry it keeps.
                            let _ = f.lifetime();
                            let _ = f.ttl + f.stale_while_revalidate;
                            let _ = f.ttl + f.stale_if_error;
                        }
                        Err(reason) => {
                            let _ = reason.as_str();
                            if cc.no_store {
                                assert_eq!(reason, NoStoreReason::NoStore);
                            }
                        }
                    }
                }
            }
        }
    }
});
