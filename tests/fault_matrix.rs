//! The upstream fault matrix, end to end: every upstream fault x (GET miss,
//! GET hit, GET stale, write) with the caller's status, the number of
//! requests that reached the upstream, the time the answer took, and what a
//! request after the fault is cleared gets (nothing partial was stored: a
//! read reaches the upstream again and gets the whole, correct body), and
//! no connection to the upstream is left open beyond the idle pool.
//!
//! Each cell runs on its own gateway and mock (fresh cache, counters, retry
//! budget and circuit state); each fault is its own `#[test]`, so rows run in
//! parallel. The table in [`expected`] is the specification.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rungen_gateway::clock::ManualClock;
use rungen_gateway::mock_upstream::{self, Faults};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `[upstream]`: the harness sets `request_timeout = "2s"` (time to response
/// headers, retries included) and `connect_timeout = "1s"`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// `[cache] coalesce_timeout`: a cache fill (headers and body) ends by then.
const FILL_TIMEOUT: Duration = Duration::from_secs(3);
/// Scheduling slack on a 2-core machine running other builds.
const SLACK: Duration = Duration::from_millis(1500);
/// The trickle fault's pace: one body byte per this many milliseconds.
const TRICKLE_MS: u64 = 20;

const UPSTREAM: &str = "body_timeout = \"1s\"\nretry_backoff = \"20ms\"";
/// `/app` is fresh for 5 s, never served stale while revalidating, and
/// served stale for 60 s more if the upstream fails.
const SECTIONS: &str = r#"
[cache]
coalesce_timeout = "3s"

[cache.routes."/app"]
ttl = "5s"
stale_while_revalidate = "0s"
stale_if_error = "60s"
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    ConnectionRefused,
    ResetMidHeaders,
    ResetMidBody,
    TruncatedBody,
    InvalidResponse,
    NeverEnds,
    SlowTrickle,
    Storm5xx,
    Storm429,
}

impl Fault {
    /// The mock's faults (connection refused is the mock not listening at all).
    fn faults(self) -> Faults {
        let mut f = Faults::default();
        match self {
            Fault::ConnectionRefused => {}
            Fault::ResetMidHeaders => f.reset_mid_headers = true,
            Fault::ResetMidBody => f.reset_mid_body = true,
            Fault::TruncatedBody => f.truncate_body = true,
            Fault::InvalidResponse => f.invalid_response = true,
            Fault::NeverEnds => f.stall_body = true,
            Fault::SlowTrickle => f.trickle_ms = Some(TRICKLE_MS),
            Fault::Storm5xx => f.fail_status = Some(503),
            Fault::Storm429 => {
                f.fail_status = Some(429);
                f.retry_after_secs = Some(1);
            }
        }
        f
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// `GET /app`, nothing cached.
    GetMiss,
    /// `GET /app`, a fresh entry cached.
    GetHit,
    /// `GET /app`, an entry past its TTL but within stale-if-error.
    GetStale,
    /// `POST /app/{id}/run_async` (not idempotent: never retried).
    Write,
}

const CASES: [Case; 4] = [Case::GetMiss, Case::GetHit, Case::GetStale, Case::Write];

/// What the caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// This status and a complete body.
    Status(u16),
    /// The stored (stale) answer: 200 with the body cached before the fault.
    Stale,
    /// The cached answer: 200 from the store, the upstream not asked.
    Hit,
    /// This status, then the body breaks off (the upstream failed after
    /// its headers were passed on; nothing else can be said by then).
    BrokenBody(u16),
}

/// One cell of the matrix.
#[derive(Debug, Clone, Copy)]
struct Expect {
    seen: Seen,
    /// Requests that reached the upstream during the fault.
    upstream: u64,
    /// The answer (head and body) is complete within this.
    within: Duration,
}

/// The specification. Reads are retried twice (3 attempts) on connection
/// failures, invalid responses and 502/503/504 before any header arrived;
/// a failure after the headers is not retried; writes never are.
fn expected(fault: Fault, case: Case) -> Expect {
    use Case::*;
    use Fault::*;
    use Seen::*;
    let head_phase = REQUEST_TIMEOUT + SLACK;
    let fill = FILL_TIMEOUT + SLACK;
    let (seen, upstream, within) = match (fault, case) {
        (_, GetHit) => (Hit, 0, SLACK),
        // Nothing listens: nothing reaches the upstream.
        (ConnectionRefused, GetMiss) => (Status(502), 0, head_phase),
        (ConnectionRefused, GetStale) => (Stale, 0, head_phase),
        (ConnectionRefused, Write) => (Status(502), 0, head_phase),
        // Before the headers: reads retried, writes not.
        (ResetMidHeaders | InvalidResponse, GetMiss) => (Status(502), 3, head_phase),
        (ResetMidHeaders | InvalidResponse, GetStale) => (Stale, 3, head_phase),
        (ResetMidHeaders | InvalidResponse, Write) => (Status(502), 1, head_phase),
        // After the headers: a cache fill fails as a whole.
        (ResetMidBody | TruncatedBody, GetMiss) => (Status(502), 1, head_phase),
        (ResetMidBody | TruncatedBody, GetStale) => (Stale, 1, head_phase),
        (ResetMidBody | TruncatedBody, Write) => (BrokenBody(200), 1, head_phase),
        // body_timeout (1 s) ends a body that stops.
        (NeverEnds, GetMiss) => (Status(504), 1, head_phase),
        (NeverEnds, GetStale) => (Stale, 1, head_phase),
        (NeverEnds, Write) => (BrokenBody(200), 1, head_phase),
        // No gap is long: the fill's deadline ends it; a write's small
        // body trickles through whole (under 100 bytes at 20 ms each).
        (SlowTrickle, GetMiss) => (Status(504), 1, fill),
        (SlowTrickle, GetStale) => (Stale, 1, fill),
        (SlowTrickle, Write) => (Status(200), 1, Duration::from_secs(2) + SLACK),
        // The upstream's own error is passed on (503 retried for reads).
        (Storm5xx, GetMiss) => (Status(503), 3, head_phase),
        (Storm5xx, GetStale) => (Stale, 3, head_phase),
        (Storm5xx, Write) => (Status(503), 1, head_phase),
        // 429 is not retried.
        (Storm429, GetMiss) => (Status(429), 1, head_phase),
        (Storm429, GetStale) => (Stale, 1, head_phase),
        (Storm429, Write) => (Status(429), 1, head_phase),
    };
    Expect {
        seen,
        upstream,
        within,
    }
}

/// What a request got: the status (`None`: no response at all) and the
/// body, or how reading it failed.
#[derive(Debug)]
struct Outcome {
    status: Option<u16>,
    body: Result<Bytes, String>,
    cache_status: String,
    elapsed: Duration,
}

/// One request on a fresh connection, bounded by 15 s.
async fn fetch(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Outcome {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap();
    let started = Instant::now();
    let exchange = async {
        let res = match client.request(req).await {
            Ok(res) => res,
            Err(e) => {
                return Outcome {
                    status: None,
                    body: Err(format!("no response: {e}")),
                    cache_status: String::new(),
                    elapsed: started.elapsed(),
                };
            }
        };
        let status = Some(res.status().as_u16());
        let cache_status = res
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = res
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| format!("body broke off: {e}"));
        Outcome {
            status,
            body,
            cache_status,
            elapsed: started.elapsed(),
        }
    };
    tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .expect("no complete answer within 15 s")
}

/// `GET /app` straight from the mock (what the gateway must pass on whole).
async fn direct_list(h: &Harness) -> serde_json::Value {
    let o = fetch(
        Method::GET,
        &format!("{}/app", h.mock.base_url()),
        &[("x-api-key", UPSTREAM_KEY)],
        "",
    )
    .await;
    assert_eq!(o.status, Some(200));
    serde_json::from_slice(&o.body.unwrap()).unwrap()
}

fn auth() -> String {
    bearer(TOKEN_RW)
}

async fn get_list(h: &Harness) -> Outcome {
    let a = auth();
    fetch(Method::GET, &h.url("/app"), &[("authorization", &a)], "").await
}

async fn run_async(h: &Harness, app_id: &str) -> Outcome {
    let a = auth();
    fetch(
        Method::POST,
        &h.url(&format!("/app/{app_id}/run_async")),
        &[("authorization", &a), ("content-type", "application/json")],
        r#"{"input":{"prompt":"a cat"}}"#,
    )
    .await
}

/// Requests the mock counted for the case's route.
fn counted(h: &Harness, case: Case) -> u64 {
    match case {
        Case::Write => h.upstream_count("POST /app/{id}/run_async"),
        _ => h.upstream_count("GET /app"),
    }
}

/// Open client-side TCP connections to `port` on this host (ESTABLISHED or
/// CLOSE_WAIT in /proc/net/tcp): the gateway's connections to the mock.
/// `None` where /proc is not available.
fn connections_to(port: u16) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = format!("{port:04X}");
    Some(
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 3
                    && fields[2].rsplit(':').next() == Some(port.as_str())
                    && (fields[3] == "01" || fields[3] == "08")
            })
            .count(),
    )
}

/// Idle pooled connections the gateway may keep to the mock after a cell.
const POOLED: usize = 2;

/// Runs one cell; returns a description of every mismatch.
async fn run_cell(fault: Fault, case: Case) -> Vec<String> {
    let clock = ManualClock::new();
    let mut h = Harness::start_full("", UPSTREAM, SECTIONS, Arc::new(clock.clone())).await;
    let expect = expected(fault, case);
    let mut errors = Vec::new();
    let cell = format!("{fault:?} x {case:?}");

    // Before the fault: an app to run, and the entry for hit and stale.
    let listing = direct_list(&h).await;
    let app_id = listing["data"][0]["id"].as_str().unwrap().to_string();
    let mut cached_body = None;
    if matches!(case, Case::GetHit | Case::GetStale) {
        let warm = get_list(&h).await;
        assert_eq!(warm.status, Some(200), "{cell}: warming failed");
        assert!(warm.cache_status.contains("stored"), "{cell}: not stored");
        cached_body = Some(warm.body.unwrap());
        if case == Case::GetStale {
            clock.advance(Duration::from_secs(6));
        }
    }

    // The fault.
    let upstream_addr = h.mock.local_addr();
    if fault == Fault::ConnectionRefused {
        h.mock.shutdown();
        h.mock.wait().await;
    } else {
        h.mock.set_faults(fault.faults());
    }
    h.mock.reset_stats();
    let got = match case {
        Case::Write => run_async(&h, &app_id).await,
        _ => get_list(&h).await,
    };
    let sent = counted(&h, case);

    let fail = |errors: &mut Vec<String>, what: String| errors.push(format!("{cell}: {what}"));
    match expect.seen {
        Seen::Status(s) => {
            if got.status != Some(s) || got.body.is_err() {
                fail(
                    &mut errors,
                    format!("expected {s} with a whole body, got {got:?}"),
                );
            }
        }
        Seen::BrokenBody(s) => {
            if got.status != Some(s) || got.body.is_ok() {
                fail(
                    &mut errors,
                    format!("expected {s}, then a broken body, got {got:?}"),
                );
            }
        }
        Seen::Hit | Seen::Stale => {
            let want = if expect.seen == Seen::Hit {
                "hit"
            } else {
                "stale-if-error"
            };
            if got.status != Some(200)
                || got.body.as_ref().ok() != cached_body.as_ref()
                || !got.cache_status.contains(want)
            {
                fail(
                    &mut errors,
                    format!("expected the cached body ({want}), got {got:?}"),
                );
            }
        }
    }
    if sent != expect.upstream {
        fail(
            &mut errors,
            format!(
                "{sent} upstream requests, expected {} ({:?})",
                expect.upstream,
                h.mock.stats().by_route
            ),
        );
    }
    if got.elapsed > expect.within {
        fail(
            &mut errors,
            format!(
                "answered after {:?}, bound {:?}",
                got.elapsed, expect.within
            ),
        );
    }

    // The fault cleared (and any upstream Retry-After pause over): a read
    // reaches the upstream again, or is still the cached hit, and is whole.
    if fault == Fault::ConnectionRefused {
        h.mock = mock_upstream::start(mock_config(), upstream_addr)
            .await
            .unwrap();
    } else {
        h.mock.set_faults(Faults::default());
    }
    // A stall or trickle may still be draining in the background: let it end.
    tokio::time::sleep(Duration::from_millis(100)).await;
    clock.advance(Duration::from_secs(2));
    h.mock.reset_stats();
    let after = get_list(&h).await;
    let reached = h.upstream_count("GET /app");
    match case {
        Case::GetHit => {
            if after.status != Some(200)
                || after.body.as_ref().ok() != cached_body.as_ref()
                || reached != 0
            {
                fail(
                    &mut errors,
                    format!("after: expected the same hit, got {after:?} ({reached} upstream)"),
                );
            }
        }
        _ => {
            let whole = after
                .body
                .as_ref()
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok());
            let direct = direct_list(&h).await;
            if after.status != Some(200) || reached != 1 || whole.as_ref() != Some(&direct) {
                fail(
                    &mut errors,
                    format!(
                        "after: expected a whole fresh answer from the upstream, got {after:?} ({reached} upstream)"
                    ),
                );
            }
        }
    }
    // Whatever the fault did, no connection to the upstream is held beyond
    // the idle pool (a stalled body or a trickle must not pin one).
    let port = h.mock.local_addr().port();
    let until = Instant::now() + Duration::from_secs(3);
    let mut open = connections_to(port);
    while open.is_some_and(|n| n > POOLED) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = connections_to(port);
    }
    if let Some(n) = open.filter(|n| *n > POOLED) {
        fail(
            &mut errors,
            format!("{n} connections to the upstream still open"),
        );
    }
    h.stop().await;
    errors
}

async fn row(fault: Fault) {
    let mut errors = Vec::new();
    for case in CASES {
        errors.extend(run_cell(fault, case).await);
    }
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

#[tokio::test]
async fn connection_refused() {
    row(Fault::ConnectionRefused).await;
}

#[tokio::test]
async fn reset_mid_headers() {
    row(Fault::ResetMidHeaders).await;
}

#[tokio::test]
async fn reset_mid_body() {
    row(Fault::ResetMidBody).await;
}

#[tokio::test]
async fn truncated_body() {
    row(Fault::TruncatedBody).await;
}

#[tokio::test]
async fn invalid_response() {
    row(Fault::InvalidResponse).await;
}

#[tokio::test]
async fn response_that_never_ends() {
    row(Fault::NeverEnds).await;
}

#[tokio::test]
async fn very_slow_trickle() {
    row(Fault::SlowTrickle).await;
}

#[tokio::test]
async fn storm_of_5xx() {
    row(Fault::Storm5xx).await;
}

#[tokio::test]
async fn storm_of_429() {
    row(Fault::Storm429).await;
}
