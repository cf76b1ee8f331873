//! A failing upstream: every fault gets a clear 502/504 (or a stale answer)
//! within the configured time; reads are retried, writes never; nothing
//! partial is stored; a scope that keeps failing trips its circuit.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod common;

use common::*;
use http::{Method, StatusCode};
use rungen_gateway::clock::ManualClock;
use rungen_gateway::mock_upstream::Faults;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn start(upstream_extra: &str, sections: &str) -> (Harness, ManualClock) {
    let clock = ManualClock::new();
    let h = Harness::start_full("", upstream_extra, sections, Arc::new(clock.clone())).await;
    (h, clock)
}

fn cache_status(r: &Reply) -> String {
    r.headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn reads_are_retried_and_writes_never() {
    let (h, _clock) = start("", "").await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    // A dropped connection, then a good answer: the caller never sees the drop.
    h.mock.set_faults(Faults {
        drop_connections: true,
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(h.upstream_count("GET /app"), 2, "one retry");

    // A 503, then a good answer.
    h.mock.set_faults(Faults {
        fail_status: Some(503),
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c
        .get(&h.url("/app/retry-me"), &[("authorization", &rw)])
        .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "the upstream's real answer after the retry"
    );

    // A write is never retried: a dropped POST /app is a 502, sent once.
    h.mock.reset_stats();
    h.mock.set_faults(Faults {
        drop_connections: true,
        fail_count: Some(1),
        ..Faults::default()
    });
    let body = r#"{"name":"x","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://h/m"}}"#;
    let r = c
        .send(
            Method::POST,
            &h.url("/app"),
            &[("authorization", &rw), ("content-type", "application/json")],
            Some(body),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        h.mock.stats().total,
        1,
        "POST /app is not idempotent: sent once"
    );
    // Nor run_async.
    h.mock.reset_stats();
    h.mock.set_faults(Faults {
        fail_status: Some(503),
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c
        .send(
            Method::POST,
            &h.url("/app/a/run_async"),
            &[("authorization", &rw)],
            Some("{\"input\":{}}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.mock.stats().total, 1);
    h.stop().await;
}

#[tokio::test]
async fn a_5xx_storm_ends_in_a_bounded_number_of_attempts() {
    let (h, _clock) = start("", "").await;
    let c = TestClient::http1();
    h.mock.set_faults(Faults {
        fail_status: Some(503),
        ..Faults::default()
    });
    let r = c
        .get(&h.url("/app"), &[("authorization", &bearer(TOKEN_RW))])
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        h.upstream_count("GET /app"),
        3,
        "the first try and two retries"
    );
    assert!(!cache_status(&r).contains("stored"));
    h.stop().await;
}

#[tokio::test]
async fn a_truncated_body_is_a_502_and_is_never_stored() {
    let (h, _clock) = start("retries = 0", "").await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    h.mock.set_faults(Faults {
        truncate_body: true,
        fail_count: Some(1),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        cache_status(&r).contains("fwd=uri-miss"),
        "nothing partial was stored: {}",
        cache_status(&r)
    );
    assert!(r.json()["data"].is_array());
    h.stop().await;
}

#[tokio::test]
async fn a_response_that_never_ends_times_out() {
    let (h, _clock) = start(
        "retries = 0\nbody_timeout = \"1s\"",
        "[cache]\ncoalesce_timeout = \"3s\"\n",
    )
    .await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    // A cache fill: the fill fails as a whole, the caller gets a 504.
    h.mock.set_faults(Faults {
        stall_body: true,
        fail_count: Some(1),
        ..Faults::default()
    });
    let started = Instant::now();
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(10));
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(cache_status(&r).contains("fwd=uri-miss"));
    h.stop().await;
}

#[tokio::test]
async fn a_scope_that_keeps_failing_trips_its_circuit_and_recovers() {
    let (h, clock) = start(
        "retries = 0\nbreaker_failures = 3\nbreaker_cooldown = \"30s\"",
        "",
    )
    .await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    // Warm an entry that may be served stale for a minute.
    let warm = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    h.mock.set_faults(Faults {
        fail_status: Some(500),
        ..Faults::default()
    });
    for i in 0..3 {
        let r = c
            .get(&h.url(&format!("/app/x{i}")), &[("authorization", &rw)])
            .await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let sent = h.mock.stats().total;
    // Open: fails fast without reaching the upstream...
    let r = c.get(&h.url("/app/x9"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(h.mock.stats().total, sent);
    // ...and a cached read is served stale instead.
    clock.advance(Duration::from_secs(6));
    let r = c.get(&h.url("/app"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, warm.body);
    assert_eq!(h.mock.stats().total, sent);
    // Another scope is unaffected.
    h.mock.set_faults(Faults::default());
    let r = c
        .get(
            &h.url("/app/y"),
            &[("authorization", &rw), ("x-team-id", TEAM_ID)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "the upstream's own answer");
    // After the cooldown one probe goes through; success closes the circuit.
    clock.advance(Duration::from_secs(30));
    let r = c.get(&h.url("/app/x9"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = c.get(&h.url("/app/x10"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    h.stop().await;
}

/// The probe let through after the cooldown is a write whose caller hangs up
/// before the slow upstream answers: the next request probes instead of the
/// scope failing fast for good.
#[tokio::test]
async fn a_probe_whose_caller_hangs_up_does_not_leave_the_circuit_stuck() {
    use tokio::io::AsyncWriteExt;
    let (h, clock) = start(
        "retries = 0\nbreaker_failures = 1\nbreaker_cooldown = \"30s\"",
        "",
    )
    .await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    h.mock.set_faults(Faults {
        fail_status: Some(500),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app/x1"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let r = c.get(&h.url("/app/x2"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "open");
    h.mock.set_faults(Faults {
        latency_ms: 2000,
        ..Faults::default()
    });
    clock.advance(Duration::from_secs(31));
    let sent = h.mock.stats().total;
    {
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let body =
            r#"{"name":"a","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"x"}}"#;
        let req = format!(
            "POST /app HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN_RW}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while h.mock.stats().total == sent && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            h.mock.stats().total,
            sent + 1,
            "the probe reached the upstream"
        );
    } // The caller hangs up while the upstream is still thinking.
    h.mock.set_faults(Faults::default());
    // No more time passes: only the abandoned probe can let this one through.
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    let until = Instant::now() + Duration::from_secs(5);
    while status == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = c
            .get(&h.url("/app/y"), &[("authorization", &rw)])
            .await
            .status;
    }
    assert_eq!(status, StatusCode::NOT_FOUND, "the upstream's own answer");
    let r = c.get(&h.url("/app/y2"), &[("authorization", &rw)]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "closed again");
    h.stop().await;
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start_with("body_read_timeout = \"1s\"", "").await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST /app HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN_RW}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"name\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    h.stop().await;
}

/// Sends `POST /app` with its body uploaded slowly (8 bytes every `gap`,
/// each gap far below `body_read_timeout`); returns the status line.
async fn slow_post(addr: std::net::SocketAddr, gap: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"name":"slow","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://h/m"}}"#;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /app HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN_RW}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for chunk in body.as_bytes().chunks(8) {
        if s.write_all(chunk).await.is_err() {
            break;
        }
        // An early answer ends the upload.
        if let Ok(Ok(n)) = tokio::time::timeout(gap, s.read(&mut buf)).await {
            return String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
        }
    }
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// A caller uploading slowly (longer in total than `request_timeout`, 2 s
/// here) gets 408, its own timeout, not "the upstream did not answer" (504);
/// and it is not counted against the scope's circuit, which a slow client
/// could otherwise open for every caller of the scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_the_callers_timeout_not_the_upstreams() {
    let h = Harness::start_with(
        "",
        "retries = 0\nbreaker_failures = 2\nbreaker_cooldown = \"60s\"",
    )
    .await;
    let mut lines = Vec::new();
    for _ in 0..2 {
        lines.push(slow_post(h.addr, Duration::from_millis(250)).await);
    }
    let r = TestClient::http1()
        .get(
            &h.url("/app/not-there"),
            &[("authorization", &bearer(TOKEN_RW))],
        )
        .await;
    h.stop().await;
    assert!(
        lines.iter().all(|l| l.contains(" 408 ")),
        "slow uploads answered {lines:?}"
    );
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "the upstream's own answer, not an open circuit: {}",
        r.text()
    );
}
