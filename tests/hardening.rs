//! Hardening against hostile clients: malformed and ambiguous HTTP/1 framing
//! over raw sockets, request targets and upgrades a reverse proxy must not
//! act on, a slow-header client, h2 streams cancelled in bursts, and a
//! (hostile or buggy) upstream's out-of-range cache directives.
//!
//! Every refusal case checks the same four things: a 4xx answer (never 2xx,
//! never 5xx), the connection closed afterwards where the framing was
//! ambiguous (so nothing smuggled behind it can be read as a next request),
//! nothing reached the mock upstream, and nothing was cached (the next normal
//! `GET /app` is a `fwd=uri-miss`).
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rungen_gateway::clock::ManualClock;
use rungen_gateway::mock_upstream::Faults;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Each test's hang guard.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Bound on every single read or exchange, so a hung gateway fails the test
/// instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay open after an ambiguous request's answer.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// One HTTP/1 response read off a raw socket.
#[derive(Debug)]
struct RawReply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads more bytes into `buf`, failing at `deadline` or at the end of the stream.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, s.read(&mut chunk)).await {
        Err(_) => Err("timed out waiting for a response".to_string()),
        Ok(Err(e)) => Err(format!("connection error before a whole response: {e}")),
        Ok(Ok(0)) => Err("connection closed before a whole response".to_string()),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
    }
}

/// Reads one response (head, then a `Content-Length` or chunked body).
/// `Err` if the connection ends, or nothing comes, before a whole response.
async fn read_reply(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<RawReply, String> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf, deadline)
            .await
            .map_err(|e| format!("{e}; got {:?}", String::from_utf8_lossy(buf)))?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP/1 status line: {head:?}"))?;
    let lower = head.to_ascii_lowercase();
    let content_length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = lower
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    let body_len = if let Some(n) = content_length {
        while buf.len() < head_end + n {
            fill(s, buf, deadline).await?;
        }
        n
    } else if chunked {
        loop {
            if let Some(i) = buf[head_end..].windows(5).position(|w| w == b"0\r\n\r\n") {
                break i + 5;
            }
            fill(s, buf, deadline).await?;
        }
    } else {
        0
    };
    let body = buf[head_end..head_end + body_len].to_vec();
    buf.drain(..head_end + body_len);
    Ok(RawReply { status, head, body })
}

/// Whether the peer closes the connection within `within` without sending
/// anything more (a reset counts as closed).
async fn closed_within(s: &mut TcpStream, leftover: &[u8], within: Duration) -> Result<(), String> {
    if !leftover.is_empty() {
        return Err(format!(
            "more bytes after the answer: {:?}",
            String::from_utf8_lossy(leftover)
        ));
    }
    let mut chunk = [0u8; 1024];
    match tokio::time::timeout(within, s.read(&mut chunk)).await {
        Err(_) => Err(format!("connection still open {within:?} after the answer")),
        Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
        Ok(Ok(n)) => Err(format!(
            "more bytes after the answer (a second response?): {:?}",
            String::from_utf8_lossy(&chunk[..n])
        )),
    }
}

/// Writes `request` on a fresh connection and reads the first answer.
async fn send_raw(
    addr: SocketAddr,
    request: &[u8],
) -> (TcpStream, Result<RawReply, String>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The gateway may answer and close before everything is written.
    let _ = tokio::time::timeout(IO_TIMEOUT, s.write_all(request)).await;
    let mut buf = Vec::new();
    let reply = read_reply(&mut s, &mut buf).await;
    (s, reply, buf)
}

/// The request line and headers of an authenticated request (a caller allowed
/// every method), so that whatever the gateway lets through does reach the
/// upstream and shows in its counters.
fn authed(request_line: &str) -> String {
    format!("{request_line}\r\nhost: gateway\r\nauthorization: Bearer {TOKEN_RW}\r\n")
}

/// Whether the connection must be closed after the answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Close {
    Required,
    Either,
}

/// The common checks of every refusal case; returns the answer for more.
/// Runs on a fresh gateway and mock, so every case starts with an empty
/// cache and zeroed upstream counters.
async fn assert_refused(request: &[u8], close: Close) -> RawReply {
    let h = Harness::start().await;
    let reply = check_refused(&h, request, close).await;
    h.stop().await;
    reply
}

async fn check_refused(h: &Harness, request: &[u8], close: Close) -> RawReply {
    let (mut s, reply, leftover) = send_raw(h.addr, request).await;
    let shown = String::from_utf8_lossy(request);
    let reply = reply.unwrap_or_else(|e| panic!("no answer to {shown:?}: {e}"));
    assert!(
        (400..500).contains(&reply.status),
        "{shown:?} must get a 4xx, got {}:\n{}{}",
        reply.status,
        reply.head,
        String::from_utf8_lossy(&reply.body)
    );
    if close == Close::Required {
        if let Err(e) = closed_within(&mut s, &leftover, CLOSE_WITHIN).await {
            panic!("{shown:?}: {e}");
        }
    }
    drop(s);
    // Let anything the gateway did in the background (a fill, a refresh) land.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = h.mock.stats();
    assert_eq!(stats.total, 0, "{shown:?} reached the upstream: {stats:?}");
    assert_nothing_cached(h).await;
    reply
}

/// The next normal `GET /app` is a miss: nothing was stored for it.
async fn assert_nothing_cached(h: &Harness) {
    let auth = bearer(TOKEN_RW);
    let r = TestClient::http1()
        .get(&h.url("/app"), &[("authorization", auth.as_str())])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let cs = r
        .headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(
        cs.contains("fwd=uri-miss"),
        "something was cached: cache-status {cs:?}"
    );
}

// ---------------------------------------------------------------------------
// Ambiguous framing: refuse, close, forward nothing.
// ---------------------------------------------------------------------------

/// The smuggled request hidden in the bodies below: it must never be answered
/// nor reach the upstream.
fn smuggled() -> String {
    format!(
        "GET /app/smuggled HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {TOKEN_RW}\r\n\r\n"
    )
}

/// `Content-Length` together with `Transfer-Encoding`, both orders, in both
/// desync shapes: a front end reading `Content-Length` sees one request
/// where a back end reading the chunks sees two (the second one smuggled),
/// and the other way round.
fn cl_te_requests() -> Vec<String> {
    let s = smuggled();
    // TE view: an empty chunked body, then the smuggled request.
    // CL view: one request whose body ends after the smuggled request.
    let te_ends_early = format!("0\r\n\r\n{s}");
    // CL view: a 5-byte body ("0\r\n\r\n"), then the smuggled request.
    // TE view: one chunk holding the smuggled request.
    let cl_ends_early = format!("{:x}\r\n{s}\r\n0\r\n\r\n", s.len());
    let mut out = Vec::new();
    for (method, body, cl) in [
        ("GET /app", &te_ends_early, te_ends_early.len()),
        ("POST /app", &te_ends_early, te_ends_early.len()),
        ("GET /app", &cl_ends_early, 5),
        ("POST /app", &cl_ends_early, 5),
    ] {
        let head = authed(&format!("{method} HTTP/1.1"));
        out.push(format!(
            "{head}content-length: {cl}\r\ntransfer-encoding: chunked\r\n\r\n{body}"
        ));
        out.push(format!(
            "{head}transfer-encoding: chunked\r\ncontent-length: {cl}\r\n\r\n{body}"
        ));
    }
    out
}

/// What must hold whatever the gateway answers to `Content-Length` +
/// `Transfer-Encoding` (RFC 9112 §6.1: refuse, or let `Transfer-Encoding`
/// win and close the connection after answering): one answer only, marked
/// `connection: close`, then the close; the smuggled request is never
/// answered nor forwarded; the upstream never sees the caller's
/// `Content-Length`.
#[tokio::test]
async fn content_length_with_transfer_encoding_never_smuggles() {
    with_timeout(TEST_LIMIT, async {
        // Default (HTTP/1 chunked uploads refused: 411), and with chunked
        // uploads allowed (hyper lets Transfer-Encoding win).
        for (config, req) in ["", "allow_chunked_requests = true"]
            .into_iter()
            .flat_map(|c| cl_te_requests().into_iter().map(move |r| (c, r)))
        {
            let req = &req;
            let h = Harness::start_with(config, "").await;
            let (mut s, reply, leftover) = send_raw(h.addr, req.as_bytes()).await;
            let reply = reply.unwrap_or_else(|e| panic!("no answer to [{config}] {req:?}: {e}"));
            assert!(
                reply.status < 500,
                "[{config}] {req:?}: {}\n{}",
                reply.head,
                String::from_utf8_lossy(&reply.body)
            );
            assert!(
                reply.head.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
                "[{config}] {req:?}: the answer does not announce the close: {}",
                reply.head
            );
            if let Err(e) = closed_within(&mut s, &leftover, CLOSE_WITHIN).await {
                panic!("[{config}] {req:?}: {e}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let stats = h.mock.stats();
            assert!(stats.total <= 1, "[{config}] {req:?}: {stats:?}");
            assert!(
                !stats.by_path.keys().any(|p| p.contains("smuggled")),
                "[{config}] {req:?}: the smuggled request reached the upstream: {stats:?}"
            );
            for r in h.mock.requests() {
                assert!(
                    r.header("content-length").is_none_or(|v| v == r.body.len().to_string()),
                    "[{config}] {req:?}: forwarded with a caller Content-Length that does not frame the body: {r:?}"
                );
            }
            h.stop().await;
        }
    })
    .await;
}

/// The stricter answer (the default, where HTTP/1 chunked uploads are
/// refused): a 4xx, the close, and nothing forwarded.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_closed() {
    with_timeout(TEST_LIMIT, async {
        for req in cl_te_requests() {
            assert_refused(req.as_bytes(), Close::Required).await;
        }
    })
    .await;
}

#[tokio::test]
async fn duplicate_differing_content_length_is_refused_and_closed() {
    with_timeout(TEST_LIMIT, async {
        let req = format!(
            "{}content-type: application/json\r\ncontent-length: 12\r\ncontent-length: 2\r\n\r\n{{\"name\":\"x\"}}",
            authed("POST /app HTTP/1.1")
        );
        assert_refused(req.as_bytes(), Close::Required).await;
        // One field line with two different values is the same ambiguity.
        let req = format!(
            "{}content-type: application/json\r\ncontent-length: 12, 2\r\n\r\n{{\"name\":\"x\"}}",
            authed("POST /app HTTP/1.1")
        );
        assert_refused(req.as_bytes(), Close::Required).await;
    })
    .await;
}

#[tokio::test]
async fn unknown_transfer_coding_is_refused_and_closed() {
    with_timeout(TEST_LIMIT, async {
        for te in ["gzip", "x-unknown", "chunked, gzip", "identity"] {
            let req = format!(
                "{}transfer-encoding: {te}\r\n\r\n0\r\n\r\n",
                authed("POST /app HTTP/1.1")
            );
            assert_refused(req.as_bytes(), Close::Required).await;
        }
    })
    .await;
}

/// CR, LF and NUL where a header name or value cannot have them, and
/// whitespace between a name and its colon (RFC 9112 §5.1: must be refused).
#[tokio::test]
async fn control_characters_in_header_names_and_values_are_refused_and_closed() {
    with_timeout(TEST_LIMIT, async {
        let cases: [&[u8]; 7] = [
            b"x-a: b\rc\r\n",           // bare CR in a value
            b"x-a: b\0c\r\n",           // NUL in a value
            b"x\0a: b\r\n",             // NUL in a name
            b"x-a\r: b\r\n",            // CR in a name
            b"x-a\n: b\r\n",            // LF in a name: a line without a colon
            b"x-a : b\r\n",             // whitespace before the colon
            b"x-team-id\r\n: acme\r\n", // a name split over two lines
        ];
        for case in cases {
            let mut req = authed("GET /app HTTP/1.1").into_bytes();
            req.extend_from_slice(case);
            req.extend_from_slice(b"\r\n");
            assert_refused(&req, Close::Required).await;
        }
    })
    .await;
}

/// Obsolete line folding (RFC 9112 §5.2): a server must refuse it (or replace
/// it with spaces); the gateway never forwards a folded header.
#[tokio::test]
async fn obsolete_line_folding_is_refused_and_closed() {
    with_timeout(TEST_LIMIT, async {
        for fold in [
            "x-a: b\r\n c\r\n",
            "x-a: b\r\n\tc\r\n",
            "x-team-id: acme\r\n other\r\n",
        ] {
            let req = format!("{}{fold}\r\n", authed("GET /app HTTP/1.1"));
            assert_refused(req.as_bytes(), Close::Required).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// Request targets and protocols a reverse proxy must not act on.
// ---------------------------------------------------------------------------

/// An absolute-form target naming another host: the gateway is not a forward
/// proxy; it must not answer for `evil.example` (nor cache under it).
#[tokio::test]
async fn absolute_form_for_another_host_is_refused() {
    with_timeout(TEST_LIMIT, async {
        let req = format!(
            "GET http://evil.example/app HTTP/1.1\r\nhost: evil.example\r\nauthorization: Bearer {TOKEN_RW}\r\n\r\n"
        );
        assert_refused(req.as_bytes(), Close::Either).await;
    })
    .await;
}

/// A WebSocket upgrade: the gateway forwards no upgrades (and strips
/// `Upgrade` on the way up), so it must refuse instead of answering the
/// request as a plain GET.
#[tokio::test]
async fn upgrade_websocket_is_refused() {
    with_timeout(TEST_LIMIT, async {
        let req = format!(
            "{}connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            authed("GET /app HTTP/1.1")
        );
        let reply = assert_refused(req.as_bytes(), Close::Either).await;
        assert_ne!(reply.status, 101);
    })
    .await;
}

/// `CONNECT`: never a tunnel.
#[tokio::test]
async fn connect_is_refused() {
    with_timeout(TEST_LIMIT, async {
        for target in ["evil.example:443", "127.0.0.1:22"] {
            let req = format!(
                "CONNECT {target} HTTP/1.1\r\nhost: {target}\r\nauthorization: Bearer {TOKEN_RW}\r\n\r\n"
            );
            let reply = assert_refused(req.as_bytes(), Close::Either).await;
            assert_ne!(reply.status, 200);
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// Slow clients and stream churn.
// ---------------------------------------------------------------------------

/// A client dribbling its request head one byte a second is cut off within
/// `header_read_timeout`, and other clients are served meanwhile.
#[tokio::test]
async fn slow_header_client_is_closed_and_others_are_served() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start_with("header_read_timeout = \"1s\"", "").await;
        let addr = h.addr;
        let slow = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET /app HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {TOKEN_RW}\r\n\r\n"
            );
            let started = Instant::now();
            let mut sent = 0usize;
            let mut chunk = [0u8; 1024];
            for b in head.as_bytes() {
                if s.write_all(std::slice::from_ref(b)).await.is_err() {
                    break;
                }
                sent += 1;
                // Wait a second, but notice a close at once.
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut chunk)).await {
                    Err(_) => continue,
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    // An answer (e.g. 408) is fine; the close must follow.
                    Ok(Ok(_)) => {
                        let _ = tokio::time::timeout(IO_TIMEOUT, s.read(&mut chunk)).await;
                        break;
                    }
                }
            }
            (started.elapsed(), sent, head.len())
        });

        // Meanwhile, a normal client is served, several times.
        let auth = bearer(TOKEN_RW);
        for _ in 0..3 {
            let t = Instant::now();
            let r = tokio::time::timeout(
                IO_TIMEOUT,
                TestClient::http1().get(&h.url("/app"), &[("authorization", auth.as_str())]),
            )
            .await
            .expect("a normal client was not served while a slow one dribbled");
            assert_eq!(r.status, StatusCode::OK);
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "served slowly: {:?}",
                t.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }

        let (elapsed, sent, total) = slow.await.unwrap();
        assert!(
            sent < total,
            "the slow client sent its whole head ({total} bytes)"
        );
        assert!(
            elapsed < Duration::from_millis(3500),
            "the slow client was closed only after {elapsed:?} (header_read_timeout = 1s)"
        );
        // The slow request never reached the upstream: only the normal GET did.
        assert_eq!(h.upstream_count("GET /app"), 1);
        h.stop().await;
    })
    .await;
}

/// Many h2 streams opened and cancelled at once, in bursts (the client sends
/// RST_STREAM for each dropped request): the gateway keeps serving others.
#[tokio::test]
async fn h2_streams_cancelled_in_bursts_do_not_disturb_other_clients() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start().await;
        // Slow the upstream a little so cancelled requests are really in flight.
        h.mock.set_faults(Faults {
            latency_ms: 20,
            ..Faults::default()
        });
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let auth = bearer(TOKEN_RW);
        let mut cancelled = 0usize;
        for burst in 0..20 {
            let mut tasks = Vec::new();
            for i in 0..100 {
                // Distinct paths: misses that go upstream, not only cache hits.
                let uri = h.url(&format!("/app/burst-{burst}-{i}"));
                let req = Request::get(uri)
                    .header("authorization", auth.as_str())
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let fut = client.request(req);
                tasks.push(tokio::spawn(async move {
                    let _ = fut.await;
                }));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                if t.await.is_err_and(|e| e.is_cancelled()) {
                    cancelled += 1;
                }
            }
        }
        assert!(
            cancelled > 1000,
            "only {cancelled} requests were cancelled in flight"
        );
        h.mock.set_faults(Faults::default());

        // Another client, over h2 and over HTTP/1.1, is served normally.
        for other in [TestClient::h2c(), TestClient::http1()] {
            let r = tokio::time::timeout(
                IO_TIMEOUT,
                other.get(&h.url("/app"), &[("authorization", auth.as_str())]),
            )
            .await
            .expect("another client was not served after the cancel bursts");
            assert_eq!(r.status, StatusCode::OK);
        }
        // The cancelling client itself either still works or, having reset
        // streams faster than the gateway allows, was sent GOAWAY
        // (ENHANCE_YOUR_CALM); it never hangs.
        let req = Request::get(h.url("/app"))
            .header("authorization", auth.as_str())
            .body(Empty::<Bytes>::new())
            .unwrap();
        match tokio::time::timeout(IO_TIMEOUT, client.request(req))
            .await
            .expect("the cancelling client hung")
        {
            Ok(res) => {
                assert_eq!(res.status(), StatusCode::OK);
                let _ = res.into_body().collect().await.unwrap();
            }
            Err(e) => {
                let e = format!("{e:?}");
                assert!(e.contains("GoAway"), "{e}");
            }
        }
        h.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// A hostile upstream's cache headers.
// ---------------------------------------------------------------------------

/// A normal authenticated `GET` on a fresh connection; `Err` if the
/// connection ends without an answer (as it does when the request panics).
async fn try_get(addr: SocketAddr, path: &str) -> Result<RawReply, String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {TOKEN_RW}\r\nconnection: close\r\n\r\n"
    );
    send_raw(addr, req.as_bytes()).await.1
}

/// Upstream freshness directives and `Age` at the edge of their range (a
/// buggy or hostile upstream) must not break the request that stores them,
/// nor leave an entry behind that breaks every later request for the same key.
#[tokio::test]
async fn huge_upstream_cache_control_values_do_not_break_the_gateway() {
    with_timeout(TEST_LIMIT, async {
        let clock = ManualClock::new();
        let h = Harness::start_full("", "", "", Arc::new(clock.clone())).await;
        let huge = u64::MAX;
        let mut failures = Vec::new();
        let cc = |v: String| vec![("cache-control".to_string(), v)];
        let cases = [
            cc(format!("max-age={huge}")),
            cc(format!("s-maxage={huge}, stale-if-error={huge}")),
            cc(format!("stale-while-revalidate={huge}")),
            cc(format!("stale-if-error={huge}")),
            cc(format!(
                "max-age=1, stale-while-revalidate={huge}, stale-if-error={huge}"
            )),
            // No `Duration` overflow, but far past any `Instant`.
            cc(format!("stale-if-error={}", i64::MAX)),
            cc(format!("stale-while-revalidate={}", u64::MAX - 10)),
            // Stored for its stale windows; every answer from it adds the
            // time since to the upstream's `Age`.
            vec![("age".into(), huge.to_string())],
            vec![
                ("age".into(), huge.to_string()),
                ("cache-control".into(), format!("max-age={huge}")),
            ],
        ];
        for (i, headers) in cases.iter().enumerate() {
            let cc = format!("{headers:?}");
            let path = format!("/app?case={i}");
            let upstream = |faults: Faults| {
                h.mock.set_faults(Faults {
                    extra_response_headers: headers.clone(),
                    ..faults
                })
            };
            upstream(Faults::default());
            let mut step = |what: &str, r: Result<RawReply, String>, ok: &[u16]| match r {
                Ok(r) if ok.contains(&r.status) => {}
                Ok(r) => failures.push(format!("`{cc}`, {what}: {} {}", r.status, r.head)),
                Err(e) => failures.push(format!("`{cc}`, {what}: {e}")),
            };
            step("fill", try_get(h.addr, &path).await, &[200]);
            clock.advance(Duration::from_secs(2));
            step("fresh", try_get(h.addr, &path).await, &[200]);
            // Stale: past the 5 s ttl of /app.
            clock.advance(Duration::from_secs(30));
            step("stale", try_get(h.addr, &path).await, &[200]);
            clock.advance(Duration::from_secs(30));
            upstream(Faults {
                fail_status: Some(503),
                ..Faults::default()
            });
            step(
                "stale, upstream 503",
                try_get(h.addr, &path).await,
                &[200, 503],
            );
        }
        // Whatever happened above, a plain request is still served.
        h.mock.set_faults(Faults::default());
        let r = try_get(h.addr, "/app").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        h.stop().await;
    })
    .await;
}

/// A minimal upstream that answers every request with `status` and the JSON
/// `body` (and `connection: close`); returns its base URL.
async fn canned_upstream(status: u16, body: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let res = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(res.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// A finished job whose signed result URL claims an absurd lifetime
/// (`X-Amz-Expires` near `u64::MAX`): the job route reads every signed URL
/// of a terminal job to bound its cache entry, and must not break on it.
#[tokio::test]
async fn absurd_signed_url_expiry_in_a_job_body_does_not_break_the_gateway() {
    with_timeout(TEST_LIMIT, async {
        const JOB: &str = r#"{"data":{"id":"j","status":"COMPLETED","output":{"url":"https://b.s3.amazonaws.com/o.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20250615T120000Z&X-Amz-Expires=18446744073709551615&X-Amz-Signature=ab"}}}"#;
        let upstream = canned_upstream(200, JOB).await;
        let text = config_toml(&upstream, "", "");
        let config = rungen_gateway::config::Config::from_toml(std::path::Path::new("test.toml"), &text)
            .unwrap();
        let gateway = rungen_gateway::server::start(config).await.unwrap();
        let addr = gateway.local_addr();
        let mut failures = Vec::new();
        for attempt in ["first", "second"] {
            match try_get(addr, "/app/a/job/j").await {
                Ok(r) if r.status == 200 => {}
                Ok(r) => failures.push(format!("{attempt}: {} {}", r.status, r.head)),
                Err(e) => failures.push(format!("{attempt}: {e}")),
            }
        }
        gateway.stop().await;
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    })
    .await;
}
