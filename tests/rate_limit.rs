//! Rate limits end to end: caller quotas with RateLimit headers, scope
//! budgets counted at the mock, upstream 429 pauses, per-IP limits on failed
//! authentication, and overload shedding.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod common;

use common::*;
use http::{Method, StatusCode};
use rungen_gateway::clock::ManualClock;
use rungen_gateway::mock_upstream::Faults;
use std::sync::Arc;
use std::time::Duration;

async fn start(sections: &str) -> (Harness, ManualClock) {
    let clock = ManualClock::new();
    let h = Harness::start_full("", "", sections, Arc::new(clock.clone())).await;
    (h, clock)
}

fn header(r: &Reply, name: &str) -> String {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// The `r=` and `t=` of a `RateLimit` field.
fn remaining_and_reset(r: &Reply) -> (u64, u64) {
    let v = header(r, "ratelimit");
    let param = |k: &str| {
        v.split(';')
            .find_map(|p| p.trim().strip_prefix(k))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    (param("r="), param("t="))
}

#[tokio::test]
async fn a_client_over_its_quota_gets_429_and_others_are_unaffected() {
    let (h, _clock) = start("[rate_limit]\ndefault = { per_minute = 6, burst = 5 }\n").await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(header(&r, "ratelimit-policy"), "\"caller\";q=5;w=50");
        remaining.push(remaining_and_reset(&r).0);
    }
    assert_eq!(remaining, vec![4, 3, 2, 1, 0]);
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.error_message().contains("caller"),
        "the response names the policy"
    );
    let retry_after: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    assert_eq!(
        remaining_and_reset(&r),
        (0, retry_after),
        "RateLimit agrees with Retry-After"
    );
    assert_eq!(header(&r, "ratelimit-policy"), "\"caller\";q=5;w=50");

    // Another client has its own bucket.
    let r = c.get(&h.url("/app"), &[("x-api-key", TOKEN_RO)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(remaining_and_reset(&r).0, 4);
    h.stop().await;
}

#[tokio::test]
async fn refusals_do_not_spend_a_clients_quota() {
    let (h, _clock) = start("[rate_limit]\ndefault = { per_minute = 3, burst = 3 }\n").await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    for _ in 0..10 {
        let r = c
            .get(
                &h.url("/app"),
                &[("authorization", &rw), ("x-team-id", OTHER_TEAM_ID)],
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }
    for _ in 0..3 {
        let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    h.stop().await;
}

#[tokio::test]
async fn rate_limit_headers_on_200_304_and_429() {
    let (h, _clock) = start("[rate_limit]\ndefault = { per_second = 1, burst = 2 }\n").await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    let ok = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(!header(&ok, "ratelimit").is_empty());
    let etag = header(&ok, "etag");
    let nm = c
        .get(
            &h.url("/app"),
            &[("authorization", &rw), ("if-none-match", &etag)],
        )
        .await;
    assert_eq!(nm.status, StatusCode::NOT_MODIFIED);
    assert_eq!(header(&nm, "ratelimit-policy"), "\"caller\";q=2;w=2");
    assert_eq!(remaining_and_reset(&nm).0, 0);
    let limited = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&limited, "retry-after"), "1");
    assert_eq!(header(&limited, "ratelimit"), "\"caller\";r=0;t=1");
    h.stop().await;
}

#[tokio::test]
async fn cache_hits_spend_the_caller_quota_but_not_the_scope_budget() {
    let (h, _clock) = start(
        "[rate_limit]\nupstream_budget = { per_minute = 2, burst = 2 }\nupstream_queue_timeout = \"0s\"\n",
    )
    .await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    for _ in 0..30 {
        let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(h.mock.stats().total, 1, "30 reads, one upstream request");
    // One more cell of budget: one miss goes through, the next is refused.
    let r = c
        .get(&h.url("/app/miss-1"), &[("authorization", &rw)])
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "the upstream's own answer");
    let r = c
        .get(&h.url("/app/miss-2"), &[("authorization", &rw)])
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.error_message().contains("upstream"),
        "{}",
        r.error_message()
    );
    assert!(header(&r, "retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(
        h.mock.stats().total,
        2,
        "the refused miss never reached the upstream"
    );
    // Hits still flow while the budget is spent.
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test]
async fn a_spent_scope_budget_keeps_serving_a_warm_cache() {
    let (h, clock) = start(
        "[rate_limit]\nupstream_budget = { per_minute = 1, burst = 1 }\nupstream_queue_timeout = \"0s\"\n\n[cache.routes.\"/app\"]\nttl = \"5s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\n",
    )
    .await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    let warm = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(warm.status, StatusCode::OK);
    assert_eq!(h.mock.stats().total, 1);
    // Past its freshness (and every stale window), with no budget left.
    clock.advance(Duration::from_secs(6));
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    // Nothing usable was left: refused, not served from a dead entry.
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    h.stop().await;

    // With a stale window, the budget refusal is answered from the cache.
    // (Budget: 2 per minute in real time; the cache's clock moves by hand.)
    let (h, clock) = start(
        "[rate_limit]\nupstream_budget = { per_minute = 2, burst = 2 }\nupstream_queue_timeout = \"0s\"\n\n[cache.routes.\"/app/{id}\"]\nttl = \"5s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"60s\"\n",
    )
    .await;
    let list = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    let id = list.json()["data"][0]["id"].as_str().unwrap().to_string();
    let path = format!("/app/{id}");
    let app = c.get(&h.url(&path), &[("authorization", &rw)]).await;
    assert_eq!(app.status, StatusCode::OK);
    assert_eq!(h.mock.stats().total, 2, "the budget is now spent");
    clock.advance(Duration::from_secs(10));
    let r = c.get(&h.url(&path), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, app.body);
    assert_eq!(
        header(&r, "cache-status"),
        "rungen-gateway; hit; detail=upstream-budget"
    );
    assert_eq!(h.mock.stats().total, 2);
    h.stop().await;
}

#[tokio::test]
async fn upstream_429_passes_through_and_pauses_the_scope() {
    let (h, clock) = start("").await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    h.mock.set_faults(Faults {
        fail_status: Some(429),
        retry_after_secs: Some(20),
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&r, "retry-after"),
        "20",
        "the upstream's Retry-After is passed on"
    );
    assert_eq!(h.mock.stats().total, 1);
    // Paused: nothing goes upstream for this scope, whatever the path or method.
    let r = c.get(&h.url("/app/other"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.error_message().contains("upstream-paused"),
        "{}",
        r.error_message()
    );
    let r = c
        .send(
            Method::POST,
            &h.url("/app"),
            &[("authorization", &rw)],
            Some("{}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h.mock.stats().total, 1);
    // Another scope is not paused.
    let r = c
        .get(
            &h.url("/app"),
            &[("authorization", &rw), ("x-team-id", TEAM_ID)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // After Retry-After, the scope is back.
    clock.advance(Duration::from_secs(21));
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test]
async fn an_upstream_429_always_says_when_to_come_back() {
    let (h, clock) = start("").await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    // RunGen documents no rate-limit headers: its 429 may come without one.
    h.mock.set_faults(Faults {
        fail_status: Some(429),
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&r, "retry-after"),
        "1",
        "the pause the gateway keeps, told to the caller"
    );
    clock.advance(Duration::from_secs(2));
    // A Retry-After of 0 is made "1": a 429 never invites an immediate retry.
    h.mock.set_faults(Faults {
        fail_status: Some(429),
        retry_after_secs: Some(0),
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app/x"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), "1");
    assert_eq!(h.mock.stats().total, 2);
    h.stop().await;
}

#[tokio::test]
async fn a_reload_that_changes_a_budget_keeps_the_upstream_429_pause() {
    let (h, clock) = start("").await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    h.mock.set_faults(Faults {
        fail_status: Some(429),
        retry_after_secs: Some(60),
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // The operator lowers the budget (the obvious answer to 429s) and reloads.
    let text = config_toml_with(
        &h.mock.base_url(),
        "",
        "",
        "[rate_limit]\nupstream_budget = { per_second = 5, burst = 10 }\n",
    );
    let new = rungen_gateway::config::Config::from_toml(std::path::Path::new("test.toml"), &text)
        .unwrap();
    h.gateway().state().apply(new).await.unwrap();
    let r = c.get(&h.url("/app/x2"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.error_message().contains("upstream-paused"),
        "{}",
        r.error_message()
    );
    assert_eq!(
        h.mock.stats().total,
        1,
        "the reload lifted the upstream's pause"
    );
    clock.advance(Duration::from_secs(61));
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test]
async fn a_request_refused_for_upstream_concurrency_spends_no_budget() {
    // Two upstream requests a minute, one at a time, 200 ms to wait for either.
    let (h, _clock) = start(
        "[rate_limit]\nupstream_budget = { per_minute = 2, burst = 2 }\nupstream_max_concurrent = 1\nupstream_queue_timeout = \"200ms\"\n",
    )
    .await;
    let rw = bearer(TOKEN_RW);
    h.mock.set_faults(Faults {
        latency_ms: 1000,
        ..Faults::default()
    });
    // A holds the one upstream slot for a second.
    let url = h.url("/app/slow-a");
    let auth = rw.clone();
    let a = tokio::spawn(async move {
        TestClient::http1()
            .get(&url, &[("authorization", &auth)])
            .await
    });
    // A is at the mock (counted on arrival, before its latency): it holds the slot.
    for _ in 0..100 {
        if h.mock.stats().total == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(h.mock.stats().total, 1, "A reached the upstream");
    // B finds no slot within 200 ms: shed with 503.
    let b = TestClient::http1()
        .get(&h.url("/app/slow-b"), &[("authorization", &rw)])
        .await;
    assert_eq!(
        b.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        b.error_message()
    );
    let a = a.await.unwrap();
    assert_eq!(a.status, StatusCode::NOT_FOUND, "the upstream's own answer");
    h.mock.set_faults(Faults::default());
    // B spent no cell: the budget's second cell is still there for C.
    let c = TestClient::http1()
        .get(&h.url("/app/c"), &[("authorization", &rw)])
        .await;
    assert_eq!(c.status, StatusCode::NOT_FOUND, "{}", c.error_message());
    assert_eq!(
        h.mock.stats().total,
        2,
        "A and C reached the upstream, B did not"
    );
    h.stop().await;
}

#[tokio::test]
async fn retries_spend_the_scope_upstream_budget() {
    // One upstream request a minute; a GET that meets a 503 may not retry on top.
    let (h, _clock) = start(
        "[rate_limit]\nupstream_budget = { per_minute = 1, burst = 1 }\nupstream_queue_timeout = \"0s\"\n",
    )
    .await;
    let c = TestClient::http1();
    h.mock.set_faults(Faults {
        fail_status: Some(503),
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c
        .get(&h.url("/app"), &[("authorization", &bearer(TOKEN_RW))])
        .await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the answer in hand"
    );
    assert_eq!(h.mock.stats().total, 1, "the retry went past the budget");
    h.stop().await;

    // With room in the budget the same failure is retried (and succeeds);
    // a 503 that says Retry-After is not retried at once.
    let (h, _clock) = start("").await;
    h.mock.set_faults(Faults {
        fail_status: Some(503),
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c
        .get(&h.url("/app"), &[("authorization", &bearer(TOKEN_RW))])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(h.mock.stats().total, 2);
    h.mock.set_faults(Faults {
        fail_status: Some(503),
        retry_after_secs: Some(5),
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c
        .get(&h.url("/app/x"), &[("authorization", &bearer(TOKEN_RW))])
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.mock.stats().total, 3);
    h.stop().await;
}

#[tokio::test]
async fn failed_auth_is_limited_per_ip_and_a_spoofed_forwarded_for_is_ignored() {
    let c = TestClient::http1();
    // Five bad tokens, each with `forwarded(i)` as X-Forwarded-For lines.
    let guesses = async |h: &Harness, forwarded: &dyn Fn(u8) -> Vec<String>| {
        let mut statuses = Vec::new();
        for i in 0..5 {
            let lines = forwarded(i);
            let mut headers = vec![("authorization", "Bearer guess")];
            headers.extend(lines.iter().map(|l| ("x-forwarded-for", l.as_str())));
            statuses.push(c.get(&h.url("/app"), &headers).await.status.as_u16());
        }
        statuses
    };
    let limited = vec![401, 401, 401, 429, 429];
    let (h, _clock) =
        start("[rate_limit]\nunauthenticated = { per_minute = 3, burst = 3 }\n").await;
    let spoofed = |i| vec![format!("198.51.100.{i}")];
    assert_eq!(
        guesses(&h, &spoofed).await,
        limited,
        "one bucket: the peer's"
    );
    // A valid client is not affected by the flood from its IP.
    let r = c
        .get(&h.url("/app"), &[("authorization", &bearer(TOKEN_RW))])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    h.stop().await;

    // Behind a trusted proxy, the forwarded address picks the bucket.
    let (h, _clock) = start(
        "[rate_limit]\nunauthenticated = { per_minute = 3, burst = 3 }\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    )
    .await;
    assert_eq!(guesses(&h, &spoofed).await, vec![401; 5]);
    // A proxy that adds its own X-Forwarded-For line (HAProxy's `option
    // forwardfor`) after the caller's: the caller's line cannot pick.
    let proxied = |i| vec![format!("192.0.2.{i}"), "203.0.113.9".to_string()];
    assert_eq!(guesses(&h, &proxied).await, limited, "203.0.113.9's bucket");
    // An IPv6 client picks any address of its /64: one bucket for all of them.
    let rotating = |i| vec![format!("2001:db8:5:6::{i}")];
    assert_eq!(guesses(&h, &rotating).await, limited, "2001:db8:5:6::/64");
    let neighbour = |i| vec![format!("2001:db8:5:7::{i}")];
    assert_eq!(
        guesses(&h, &neighbour).await,
        limited,
        "another /64 has its own bucket"
    );
    h.stop().await;
}

/// A public client's per-IP limit stops one source IP from starving the
/// others: refused by its own limit, an IP spends nothing of the total.
#[tokio::test]
async fn a_public_clients_refused_ip_does_not_spend_the_total() {
    const PAGE: &str = "http://127.0.0.1:4321";
    let (h, _clock) = start(&format!(
        r#"
[rate_limit]
trusted_proxies = ["127.0.0.1/32"]

[[clients]]
name = "dashboard"
public = true
allowed_origins = ["{PAGE}"]
teams = ["acme"]
rate_limit = {{ per_minute = 6, burst = 6 }}
ip_rate_limit = {{ per_minute = 2, burst = 2 }}
"#
    ))
    .await;
    let c = TestClient::http1();
    let from = async |ip: &str| {
        c.get(&h.url("/app"), &[("origin", PAGE), ("x-forwarded-for", ip)])
            .await
    };
    let mut abuser = Vec::new();
    for _ in 0..10 {
        abuser.push(from("198.51.100.66").await.status.as_u16());
    }
    assert_eq!(abuser, [200, 200, 429, 429, 429, 429, 429, 429, 429, 429]);
    // The total (6) had two taken: two more visitors get their two each.
    for ip in ["198.51.100.77", "198.51.100.78"] {
        for _ in 0..2 {
            let r = from(ip).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{ip}: {}",
                header(&r, "ratelimit")
            );
        }
    }
    h.stop().await;
}

#[tokio::test]
async fn over_the_in_flight_cap_requests_are_shed_with_503() {
    let (h, _clock) = start("[rate_limit]\nmax_in_flight = 2\n").await;
    h.mock.set_faults(Faults {
        latency_ms: 400,
        ..Faults::default()
    });
    let c = TestClient::http1();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = c.clone();
        let url = h.url(&format!("/app/slow-{i}"));
        tasks.push(tokio::spawn(async move {
            c.get(&url, &[("authorization", &bearer(TOKEN_RW))]).await
        }));
    }
    let mut shed = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            shed += 1;
            assert_eq!(header(&r, "retry-after"), "1");
            assert!(!r.error_message().is_empty());
        } else {
            assert_eq!(r.status, StatusCode::NOT_FOUND);
        }
    }
    assert!(shed >= 1, "at least one request was shed");
    assert!(h.mock.stats().total <= 5);
    h.stop().await;
}
