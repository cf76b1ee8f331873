//! Memory under attack: floods of distinct paths and query strings, of
//! distinct bad tokens, and of distinct source IPs (through a trusted
//! proxy's `X-Forwarded-For`, and as real 127.x.y.z peers) never grow the
//! gateway's state beyond its configured bounds: the cache stays within
//! `cache.max_bytes` (moka's weigher), and per-IP limiter state is keyed by
//! IP only (never by token or a spoofed header) and is pruned every
//! `rate_limit.prune_interval`. Floods are a few thousand requests: seconds.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::StatusCode;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Each test's hang guard.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Polls `f` until it is true or `within` has passed.
async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of an unlabelled gauge in Prometheus text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The smallest cache the config allows (1 MiB).
const MAX_BYTES: u64 = 1024 * 1024;

/// 1500 distinct cacheable keys (query strings on `/app`, padded to 8 KiB,
/// and unknown app ids whose 404s are stored; about 6.5 MB in all) through
/// a 1 MiB cache: every answer is stored, most are evicted again, and the
/// store never holds more than its bound.
#[tokio::test]
async fn distinct_paths_and_queries_keep_the_cache_within_its_bound() {
    with_timeout(TEST_LIMIT, async {
        let sections = format!(
            r#"
[cache]
max_bytes = {MAX_BYTES}
max_entry_bytes = 65536

[cache.routes."/app/{{id}}"]
negative_ttl = "60s"

[rate_limit]
enabled = false
"#
        );
        let h = Harness::start_full(
            "",
            "",
            &sections,
            Arc::new(rungen_gateway::clock::SystemClock),
        )
        .await;
        h.mock.set_faults(rungen_gateway::mock_upstream::Faults {
            large_body_bytes: Some(8192),
            ..Default::default()
        });
        let client = TestClient::http1();
        let base = h.url("");
        let stored = Arc::new(AtomicUsize::new(0));
        let n = 1500;
        {
            let stored = stored.clone();
            flood(n, move |i| {
                let client = client.clone();
                let base = base.clone();
                let stored = stored.clone();
                async move {
                    let path = if i % 2 == 0 {
                        format!("/app?page={i}&sort=name")
                    } else {
                        format!("/app/flood-{i}")
                    };
                    let auth = bearer(TOKEN_RW);
                    let r = client
                        .get(&format!("{base}{path}"), &[("authorization", &auth)])
                        .await;
                    assert!(
                        r.status == StatusCode::OK || r.status == StatusCode::NOT_FOUND,
                        "{path}: {r:?}"
                    );
                    let cs = r.headers.get("cache-status").unwrap().to_str().unwrap();
                    if cs.contains("stored") {
                        stored.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        }
        let stored = stored.load(Ordering::Relaxed);
        assert!(
            stored > n * 9 / 10,
            "only {stored} of {n} answers were stored: the flood did not exercise the store"
        );
        assert_eq!(h.mock.stats().total, n as u64, "every key was a miss");

        let cache = h.gateway().cache();
        cache.sync();
        let (bytes, entries) = (cache.weighted_size(), cache.entry_count());
        assert!(bytes <= MAX_BYTES, "{bytes} bytes held, bound {MAX_BYTES}");
        assert!(
            entries > 0 && entries < stored as u64 / 2,
            "{entries} entries held after {stored} were stored"
        );

        // The admin gauge says the same.
        let admin = h.gateway().admin_addr().unwrap();
        let text = TestClient::http1()
            .get(&format!("http://{admin}/metrics"), &[])
            .await
            .text();
        let shown = gauge(&text, "rungen_gateway_cache_bytes").unwrap();
        assert!(shown <= MAX_BYTES as f64, "gauge {shown}");
        h.stop().await;
    })
    .await;
}

/// 1500 distinct 4 KB query strings on `/app` while the upstream answers
/// with `Vary: Accept`: each stored answer puts its key in the Vary index,
/// which keeps keys after their answers are evicted. The index stays within
/// its own bound (an eighth of `max_bytes`, at least 64 KiB), and a varying
/// key still caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_varying_keys_keep_the_vary_index_within_its_bound() {
    with_timeout(TEST_LIMIT, async {
        let sections = format!(
            "[cache]\nmax_bytes = {MAX_BYTES}\nmax_entry_bytes = 65536\n\n[rate_limit]\nenabled = false\n"
        );
        let h = Harness::start_full(
            "",
            "",
            &sections,
            Arc::new(rungen_gateway::clock::SystemClock),
        )
        .await;
        h.mock.set_faults(rungen_gateway::mock_upstream::Faults {
            extra_response_headers: vec![("vary".into(), "Accept".into())],
            ..Default::default()
        });
        let client = TestClient::http1();
        let pad = "p".repeat(3900);
        let n = 1500;
        {
            let (client, base) = (client.clone(), h.url("/app"));
            flood(n, move |i| {
                let url = format!("{base}?q{i}={pad}");
                let client = client.clone();
                async move {
                    let r = client.get(&url, &[("authorization", &bearer(TOKEN_RW))]).await;
                    assert_eq!(r.status, StatusCode::OK, "{r:?}");
                }
            })
            .await;
        }
        assert_eq!(h.mock.stats().total, n as u64, "every key was a miss");
        let cache = h.gateway().cache();
        cache.sync();
        let bound = rungen_gateway::cache::store::vary_index_max_bytes(MAX_BYTES);
        let held = cache.vary_index_bytes();
        assert!(held > 0 && held <= bound, "Vary index: {held} bytes, bound {bound}");
        // Whatever the weigher says: each key holds its 3.9 KB query.
        let keys = cache.vary_index_keys();
        assert!(keys > 0 && keys * 3900 <= bound, "Vary index: {keys} keys");
        assert!(cache.weighted_size() <= MAX_BYTES);
        // Varying answers are still stored and served.
        let url = h.url("/app?after=flood");
        let auth = bearer(TOKEN_RW);
        let first = client.get(&url, &[("authorization", &auth)]).await;
        let second = client.get(&url, &[("authorization", &auth)]).await;
        assert!(first.headers["cache-status"].to_str().unwrap().contains("stored"));
        assert!(second.headers["cache-status"].to_str().unwrap().contains("hit"), "{second:?}");
        assert_eq!(h.mock.stats().total, n as u64 + 1);
        h.stop().await;
    })
    .await;
}

/// The requests-total count of `method="other"` requests in Prometheus text.
fn other_method_requests(text: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with("rungen_gateway_requests_total{") && l.contains("method=\"other\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// 300 requests with 300 invented methods, with and without a token: each is
/// refused, and counted under `method="other"`; no invented method becomes a
/// metric series (each would be kept for good, with its histogram).
#[tokio::test]
async fn invented_methods_do_not_add_metric_series() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start().await;
        let metrics_url = format!("http://{}/metrics", h.gateway().admin_addr().unwrap());
        let before = TestClient::http1().get(&metrics_url, &[]).await.text();
        let client = TestClient::http1();
        let url = h.url("/app");
        let n = 300;
        flood(n, move |i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let method =
                    http::Method::from_bytes(format!("INVENTED{i:04}").as_bytes()).unwrap();
                let auth = bearer(TOKEN_RW);
                let headers: &[(&str, &str)] = if i % 2 == 0 {
                    &[("authorization", &auth)]
                } else {
                    &[]
                };
                let r = client.send(method, &url, headers, None).await;
                assert!(r.status.is_client_error(), "{r:?}");
                assert!(r.json()["error"].is_string(), "{r:?}");
            }
        })
        .await;
        let after = TestClient::http1().get(&metrics_url, &[]).await.text();
        assert!(
            !after.contains("INVENTED"),
            "an invented method became a label"
        );
        let counted = other_method_requests(&after) - other_method_requests(&before);
        assert_eq!(counted, n as f64, "every refused request is counted once");
        assert_eq!(h.mock.stats().total, 0);
        h.stop().await;
    })
    .await;
}

/// 600 distinct bad tokens from one peer, each with a different spoofed
/// `X-Forwarded-For` (no proxy is trusted): one limiter entry (the peer),
/// guessing is throttled to 429, nothing reaches the upstream.
#[tokio::test]
async fn distinct_bad_tokens_and_spoofed_forwarded_for_hold_one_entry() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start().await;
        let limits = h.gateway().state().limits().clone();
        assert_eq!(limits.tracked_ips(), 0);
        let client = TestClient::http1();
        let url = h.url("/app");
        let throttled = Arc::new(AtomicUsize::new(0));
        {
            let throttled = throttled.clone();
            flood(600, move |i| {
                let client = client.clone();
                let url = url.clone();
                let throttled = throttled.clone();
                async move {
                    let token = bearer(&format!("guess-{i:08}-{}", i * 7919));
                    let xff = format!("203.0.{}.{}", i / 256, i % 256);
                    let r = client
                        .get(
                            &url,
                            &[("authorization", &token), ("x-forwarded-for", &xff)],
                        )
                        .await;
                    match r.status {
                        StatusCode::UNAUTHORIZED => {}
                        StatusCode::TOO_MANY_REQUESTS => {
                            throttled.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("a bad token got {other}"),
                    }
                }
            })
            .await;
        }
        assert_eq!(
            limits.tracked_ips(),
            1,
            "per-IP state must be keyed by the peer alone"
        );
        assert!(
            throttled.load(Ordering::Relaxed) > 500,
            "guessing was not throttled"
        );
        assert_eq!(h.mock.stats().total, 0);
        h.stop().await;
    })
    .await;
}

/// The status of a one-request exchange on a fresh connection from `from`.
async fn status_from(from: IpAddr, addr: SocketAddr, request: &str) -> u16 {
    let exchange = async {
        let mut s = connect_from(from, addr).await;
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while buf.len() < 12 {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed without an answer");
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf[9..12]).parse().unwrap()
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("no answer")
}

/// Distinct source IPs, through a trusted proxy's `X-Forwarded-For` (4000
/// failing authentication, 1000 of a public browser client) and as real
/// 127.x.y.z peers (300): each gets per-IP limiter state, and the pruner
/// drops all of it once the buckets refill, so the state held is what
/// arrived within about one prune interval, not the whole flood.
#[tokio::test]
async fn distinct_source_ips_are_pruned() {
    with_timeout(TEST_LIMIT, async {
        let sections = r#"
[rate_limit]
trusted_proxies = ["127.0.0.1/32"]
unauthenticated = { per_second = 1000, burst = 1 }
prune_interval = "300ms"

[[clients]]
name = "dashboard"
public = true
allowed_origins = ["https://page.example"]
teams = ["acme"]
rate_limit = { per_second = 100000, burst = 100000 }
ip_rate_limit = { per_second = 1000, burst = 1 }
"#;
        let h = Harness::start_full(
            "",
            "",
            sections,
            Arc::new(rungen_gateway::clock::SystemClock),
        )
        .await;
        let limits = h.gateway().state().limits().clone();
        let client = TestClient::http1();
        let url = h.url("/app");
        let n = 4000;
        let peak = Arc::new(AtomicUsize::new(0));
        {
            let limits = limits.clone();
            let peak = peak.clone();
            flood(n, move |i| {
                let client = client.clone();
                let url = url.clone();
                let limits = limits.clone();
                let peak = peak.clone();
                async move {
                    // The proxy appends the peer it saw; the gateway takes
                    // the first untrusted hop from the right.
                    let xff = format!("10.{}.{}.{}, 127.0.0.1", i >> 16, (i >> 8) & 255, i & 255);
                    let r = client
                        .get(
                            &url,
                            &[("authorization", "Bearer bad"), ("x-forwarded-for", &xff)],
                        )
                        .await;
                    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{xff}");
                    peak.fetch_max(limits.tracked_ips(), Ordering::Relaxed);
                }
            })
            .await;
        }
        let peak = peak.load(Ordering::Relaxed);
        assert!(peak > 50, "the flood created almost no state ({peak})");
        assert!(
            eventually(Duration::from_secs(3), || limits.tracked_ips() == 0).await,
            "{} entries still held after the flood",
            limits.tracked_ips()
        );

        // A public (tokenless, origin-matched) client: per (client, IP) state.
        let client = TestClient::http1();
        let url = h.url("/app");
        let peak = Arc::new(AtomicUsize::new(0));
        {
            let limits = limits.clone();
            let peak = peak.clone();
            flood(1000, move |i| {
                let client = client.clone();
                let url = url.clone();
                let limits = limits.clone();
                let peak = peak.clone();
                async move {
                    let xff = format!("172.16.{}.{}", i >> 8, i & 255);
                    let r = client
                        .get(
                            &url,
                            &[("origin", "https://page.example"), ("x-forwarded-for", &xff)],
                        )
                        .await;
                    assert_eq!(r.status, StatusCode::OK, "{xff}: {r:?}");
                    peak.fetch_max(limits.tracked_ips(), Ordering::Relaxed);
                }
            })
            .await;
        }
        let peak = peak.load(Ordering::Relaxed);
        assert!(peak > 50, "the public flood created almost no state ({peak})");
        assert!(
            eventually(Duration::from_secs(3), || limits.tracked_ips() == 0).await,
            "{} public-client entries still held after the flood",
            limits.tracked_ips()
        );

        // Real peers: one connection from each of 300 loopback addresses.
        let addr = h.addr;
        let request = "GET /app HTTP/1.1\r\nhost: g\r\nauthorization: Bearer bad\r\nconnection: close\r\n\r\n";
        flood(300, move |i| async move {
            let from = IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8));
            assert_eq!(status_from(from, addr, request).await, 401);
        })
        .await;
        assert!(
            eventually(Duration::from_secs(3), || limits.tracked_ips() == 0).await,
            "{} entries still held after the peers left",
            limits.tracked_ips()
        );

        // The gauge on /metrics reports the same state.
        let admin = h.gateway().admin_addr().unwrap();
        let text = TestClient::http1()
            .get(&format!("http://{admin}/metrics"), &[])
            .await
            .text();
        assert_eq!(
            gauge(&text, "rungen_gateway_rate_limit_tracked_ips"),
            Some(0.0)
        );
        // Failed authentications never go upstream; the public client's
        // reads are cached (a refresh or two if the flood outlasts the TTL).
        let upstream = h.mock.stats().total;
        assert!((1..=5).contains(&upstream), "{upstream} upstream requests");
        h.stop().await;
    })
    .await;
}
