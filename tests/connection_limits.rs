//! Connection limits end to end, over raw sockets: the per-source-IP cap,
//! the total cap, the requests-per-connection cap and the idle keep-alive
//! close. Each case uses small configured values and bounds every wait, and
//! checks that the limit hits only the abusive connection: another client
//! (another source address, a new connection) is still served.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every single read or exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Each test's hang guard.
const TEST_LIMIT: Duration = Duration::from_secs(30);

/// One HTTP/1 response read off a raw socket.
#[derive(Debug)]
struct RawReply {
    status: u16,
    /// The head, header names lower-cased.
    head: String,
    body: Vec<u8>,
}

impl RawReply {
    fn connection_close(&self) -> bool {
        self.head
            .lines()
            .any(|l| l.starts_with("connection:") && l.contains("close"))
    }
}

/// Reads one `Content-Length` response (the gateway's answers all have one).
/// `Err` if the connection ends, or nothing comes within `within`.
async fn read_reply(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    within: Duration,
) -> Result<RawReply, String> {
    let deadline = Instant::now() + within;
    let mut chunk = [0u8; 8192];
    let mut fill = async |s: &mut TcpStream, buf: &mut Vec<u8>| -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => Err("no response in time".into()),
            Ok(Err(e)) => Err(format!("connection error: {e}")),
            Ok(Ok(0)) => Err("connection closed".into()),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .strip_prefix("http/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP/1.1 status line: {head:?}"))?;
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        fill(s, buf).await?;
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Ok(RawReply { status, head, body })
}

/// Whether the peer closes the connection within `within` (EOF or reset)
/// without sending anything.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Result<(), String> {
    let mut chunk = [0u8; 1024];
    match tokio::time::timeout(within, s.read(&mut chunk)).await {
        Err(_) => Err(format!("still open after {within:?}")),
        Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
        Ok(Ok(n)) => Err(format!(
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&chunk[..n])
        )),
    }
}

/// An authenticated `GET /app` (served from the cache after the first).
fn get_app() -> String {
    format!("GET /app HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {TOKEN_RW}\r\n\r\n")
}

/// Sends one `GET /app` on `s` and reads the answer.
async fn exchange(s: &mut TcpStream) -> Result<RawReply, String> {
    s.write_all(get_app().as_bytes())
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    let mut buf = Vec::new();
    read_reply(s, &mut buf, IO_TIMEOUT).await
}

/// Whether a fresh connection from `from` is served; retried for a short
/// while, because the gateway releases a closed connection's slot only once
/// it has noticed the close.
async fn served_from(from: IpAddr, addr: SocketAddr) -> bool {
    let until = Instant::now() + IO_TIMEOUT;
    while Instant::now() < until {
        let mut s = connect_from(from, addr).await;
        if let Ok(r) = exchange(&mut s).await {
            if r.status == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const OTHER_LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// With `max_connections_per_ip = 2`: two connections from 127.0.0.1 are
/// served and stay usable; a third from the same address is closed at once
/// without an answer and never reaches the upstream; a client from
/// 127.0.0.2 is served meanwhile; once one of the two closes, 127.0.0.1 gets
/// a slot again.
#[tokio::test]
async fn per_ip_cap_refuses_the_extra_connection_but_not_other_sources() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start_with("max_connections_per_ip = 2", "").await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = connect_from(LOCAL, h.addr).await;
            let r = exchange(&mut s).await.unwrap();
            assert_eq!(r.status, 200);
            held.push(s);
        }
        let upstream_before = h.mock.stats().total;

        let mut third = connect_from(LOCAL, h.addr).await;
        // The request may or may not be written before the close; no answer either way.
        let _ = third.write_all(get_app().as_bytes()).await;
        closed_within(&mut third, Duration::from_secs(2))
            .await
            .expect("the connection over the per-IP cap was not closed without an answer");

        // Another source address is not affected...
        let mut other = connect_from(OTHER_LOCAL, h.addr).await;
        let r = exchange(&mut other).await.unwrap();
        assert_eq!(r.status, 200, "a client from 127.0.0.2 must be served");
        // ...and the held connections still work.
        for s in &mut held {
            assert_eq!(exchange(s).await.unwrap().status, 200);
        }
        assert_eq!(
            h.mock.stats().total,
            upstream_before,
            "the refused connection's request reached the upstream"
        );

        // A slot freed by a close is given to the next connection from that IP.
        drop(held.pop());
        assert!(
            served_from(LOCAL, h.addr).await,
            "127.0.0.1 was not served again after one of its connections closed"
        );
        h.stop().await;
    })
    .await;
}

/// With `max_connections = 2`: the gateway stops accepting at the cap (the
/// next connection waits in the kernel backlog, unanswered) and serves the
/// waiting connection as soon as a slot frees up.
#[tokio::test]
async fn total_cap_holds_new_connections_until_a_slot_frees() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start_with("max_connections = 2", "").await;
        // Two different source addresses, so the per-IP cap plays no part.
        let mut a = connect_from(LOCAL, h.addr).await;
        assert_eq!(exchange(&mut a).await.unwrap().status, 200);
        let mut b = connect_from(OTHER_LOCAL, h.addr).await;
        assert_eq!(exchange(&mut b).await.unwrap().status, 200);

        // A third source: the TCP handshake completes in the kernel, but the
        // gateway does not take the connection while at the cap.
        let third_ip = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));
        let mut c = connect_from(third_ip, h.addr).await;
        c.write_all(get_app().as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let early = read_reply(&mut c, &mut buf, Duration::from_millis(700)).await;
        assert!(
            early.is_err(),
            "a connection over the total cap was served: {early:?}"
        );

        // The open connections are still served at the cap.
        assert_eq!(exchange(&mut a).await.unwrap().status, 200);

        // Closing one lets the waiting connection in; its request is answered.
        let closed_at = Instant::now();
        drop(b);
        let r = read_reply(&mut c, &mut buf, IO_TIMEOUT)
            .await
            .expect("the waiting connection was not served after a slot freed");
        assert_eq!(r.status, 200);
        assert!(closed_at.elapsed() < Duration::from_secs(2));
        h.stop().await;
    })
    .await;
}

/// With `max_requests_per_connection = 3`: the first two answers on a
/// keep-alive connection leave it open, the third says `Connection: close`
/// and the gateway closes it; a new connection is served.
#[tokio::test]
async fn requests_per_connection_cap_closes_after_the_last_answer() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start_with("max_requests_per_connection = 3", "").await;
        let mut s = connect_from(LOCAL, h.addr).await;
        for i in 1..=3 {
            let r = exchange(&mut s).await.unwrap();
            assert_eq!(r.status, 200, "request {i}");
            assert!(!r.body.is_empty());
            assert_eq!(
                r.connection_close(),
                i == 3,
                "request {i}: connection: close only on the last one:\n{}",
                r.head
            );
        }
        closed_within(&mut s, Duration::from_secs(2))
            .await
            .expect("the connection was not closed after its last request");
        // A fourth request on it gets nothing (written into a closed connection).
        let _ = s.write_all(get_app().as_bytes()).await;
        let mut buf = Vec::new();
        assert!(
            read_reply(&mut s, &mut buf, Duration::from_millis(300))
                .await
                .is_err()
        );

        let mut fresh = connect_from(LOCAL, h.addr).await;
        let r = exchange(&mut fresh).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(
            !r.connection_close(),
            "a fresh connection starts a new count"
        );
        h.stop().await;
    })
    .await;
}

/// An idle keep-alive connection is closed by the gateway once it has
/// waited `header_read_timeout` for the next request (hyper's header read
/// timer also runs while a connection is idle), and another client is served
/// in the meantime.
#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_the_timeout() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start_with("header_read_timeout = \"1s\"", "").await;
        let mut idle = connect_from(LOCAL, h.addr).await;
        let r = exchange(&mut idle).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(!r.connection_close(), "kept alive after the answer");
        let idle_since = Instant::now();

        let addr = h.addr;
        let idle_task = tokio::spawn(async move {
            let outcome = closed_within(&mut idle, Duration::from_secs(4)).await;
            (outcome, idle_since.elapsed())
        });

        // Meanwhile another client is served promptly, twice.
        for _ in 0..2 {
            let t = Instant::now();
            let mut other = connect_from(OTHER_LOCAL, addr).await;
            assert_eq!(exchange(&mut other).await.unwrap().status, 200);
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "served after {:?}",
                t.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let (outcome, after) = idle_task.await.unwrap();
        outcome.expect("the idle connection was not closed by the gateway");
        assert!(
            after >= Duration::from_millis(800),
            "closed after {after:?}: sooner than the 1s idle timeout"
        );
        assert!(
            after < Duration::from_millis(3000),
            "closed after {after:?}"
        );
        h.stop().await;
    })
    .await;
}

/// A connection that sends nothing, or only part of the HTTP/2 preface
/// (so its protocol cannot be told yet), is closed after
/// `header_read_timeout` instead of holding its slot forever.
#[tokio::test]
async fn silent_and_partial_preface_connections_are_closed() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start_with("header_read_timeout = \"1s\"", "").await;
        let silent = connect_from(LOCAL, h.addr).await;
        let mut partial = connect_from(LOCAL, h.addr).await;
        partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let started = Instant::now();
        for (name, mut s) in [("silent", silent), ("partial preface", partial)] {
            closed_within(&mut s, Duration::from_secs(4))
                .await
                .unwrap_or_else(|e| panic!("{name} connection: {e}"));
        }
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(800) && after < Duration::from_millis(3000),
            "closed after {after:?} (header_read_timeout = 1s)"
        );
        h.stop().await;
    })
    .await;
}

/// An idle HTTP/2 connection gets GOAWAY and is closed after the idle
/// timeout (a graceful end: the client's connection task finishes cleanly),
/// while a request in flight for longer than twice that (a slow upstream) is
/// neither cut nor ends its connection, on HTTP/2 or HTTP/1.1.
#[tokio::test]
async fn idle_h2_connection_is_closed_but_a_slow_request_is_not() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start_with("header_read_timeout = \"600ms\"", "").await;
        let get = |path: &str| {
            http::Request::get(h.url(path))
                .header("authorization", bearer(TOKEN_RW))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        let s = connect_from(LOCAL, h.addr).await;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(s),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);

        // Slower than two idle timeouts (but within the upstream's request
        // timeout), in flight: answered, on both protocols.
        h.mock.set_faults(rungen_gateway::mock_upstream::Faults {
            latency_ms: 1500,
            ..Default::default()
        });
        let addr = h.addr;
        let slow_h1 = tokio::spawn(async move {
            let mut s = connect_from(LOCAL, addr).await;
            slow_h1_request(&mut s).await;
            s
        });
        let r = send.send_request(get("/app")).await.unwrap();
        assert_eq!(r.status(), 200, "a slow h2 request was cut");
        drop(r);
        let mut h1 = slow_h1.await.unwrap();
        h.mock
            .set_faults(rungen_gateway::mock_upstream::Faults::default());

        // Both connections are still usable after their slow request.
        let r = send.send_request(get("/app/after-slow")).await;
        assert_eq!(
            r.expect("the h2 connection was shut while a request was in flight")
                .status(),
            404
        );
        let idle_since = Instant::now();
        assert_eq!(exchange(&mut h1).await.unwrap().status, 200);

        let ended = tokio::time::timeout(Duration::from_secs(4), conn)
            .await
            .expect("the idle h2 connection was not closed");
        assert!(
            ended.unwrap().is_ok(),
            "the h2 connection did not end gracefully"
        );
        let after = idle_since.elapsed();
        assert!(
            after >= Duration::from_millis(500),
            "closed after {after:?}"
        );
        h.stop().await;
    })
    .await;
}

/// `GET /app` on HTTP/1.1 whose upstream is slower than the idle timeout.
async fn slow_h1_request(s: &mut TcpStream) {
    // A fresh cache key, so the request really waits for the slow upstream.
    let req = format!(
        "GET /app?slow=1 HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {TOKEN_RW}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_reply(s, &mut buf, IO_TIMEOUT)
        .await
        .expect("a slow HTTP/1.1 request was cut");
    assert_eq!(r.status, 200);
    assert!(!r.connection_close());
}

/// An HTTP/2 peer that sends its preface and SETTINGS, then nothing (it
/// never acknowledges the GOAWAY's PING either), is dropped too.
#[tokio::test]
async fn h2_peer_that_goes_silent_is_dropped() {
    with_timeout(TEST_LIMIT, async {
        let h = Harness::start_with("header_read_timeout = \"1s\"", "").await;
        let mut s = connect_from(LOCAL, h.addr).await;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        let started = Instant::now();
        // Frames (SETTINGS, GOAWAY, PING) may come; then the close.
        let mut chunk = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
                Err(_) => panic!("the silent h2 peer was still connected after 5s"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
            }
        }
        assert!(
            started.elapsed() < Duration::from_millis(3500),
            "{:?}",
            started.elapsed()
        );
        h.stop().await;
    })
    .await;
}

/// A client that sends a request and then stops reading the answer (a
/// response larger than the socket buffers) does not keep its connection,
/// and its per-IP and total connection slots, for as long as it likes: the
/// idle close never fires while a response body is unfinished, so a response
/// that makes no progress for `body_read_timeout` ends the connection.
#[tokio::test]
async fn a_client_that_stops_reading_does_not_hold_its_slot_forever() {
    with_timeout(Duration::from_secs(40), async {
        let h = Harness::start_with(
            "max_connections_per_ip = 1\nheader_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"",
            "",
        )
        .await;
        h.mock.set_faults(rungen_gateway::mock_upstream::Faults {
            large_body_bytes: Some(32 * 1024 * 1024),
            ..Default::default()
        });
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind(SocketAddr::new(LOCAL, 0)).unwrap();
        let mut stalled = socket.connect(h.addr).await.unwrap();
        stalled.write_all(get_app().as_bytes()).await.unwrap();
        // Read a little (the head), then never again.
        let mut some = [0u8; 1024];
        let _ = tokio::time::timeout(IO_TIMEOUT, stalled.read(&mut some)).await;
        h.mock
            .set_faults(rungen_gateway::mock_upstream::Faults::default());
        assert!(
            served_while_held(h, move || drop(stalled)).await,
            "a connection whose client stopped reading still holds 127.0.0.1's only slot after 5 s"
        );
    })
    .await;
}

/// After five stall (and idle) timeouts of 1 s: whether a new connection from
/// 127.0.0.1 (allowed one) is served while a stalled one is still open. Then
/// `release` closes the stalled one and a new connection must be served.
async fn served_while_held(h: Harness, release: impl FnOnce()) -> bool {
    tokio::time::sleep(Duration::from_secs(5)).await;
    let served = served_from(LOCAL, h.addr).await;
    release();
    assert!(
        served_from(LOCAL, h.addr).await,
        "served once the stalled client closed"
    );
    h.stop().await;
    served
}

/// HTTP/2: an h2 client that grants no flow-control window
/// (SETTINGS_INITIAL_WINDOW_SIZE = 0, never a WINDOW_UPDATE) and keeps
/// answering PINGs does not hold its connection slot, whatever the size of
/// the answer (here an ordinary `GET /app`).
#[tokio::test]
async fn an_h2_client_with_a_zero_window_does_not_hold_its_slot_forever() {
    with_timeout(Duration::from_secs(40), async {
        let h = Harness::start_with(
            "max_connections_per_ip = 1\nheader_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"",
            "",
        )
        .await;
        let stream = connect_from(LOCAL, h.addr).await;
        let (mut send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(0)
                .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                    stream,
                ))
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        let req = http::Request::builder()
            .uri(format!("http://{}/app", h.addr))
            .header("authorization", format!("Bearer {TOKEN_RW}"))
            .body(http_body_util::Empty::new())
            .unwrap();
        let res = tokio::time::timeout(IO_TIMEOUT, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), 200);
        // Hold the response, never read its body.
        let release = move || {
            drop(res);
            driver.abort();
        };
        assert!(
            served_while_held(h, release).await,
            "an h2 connection that granted no window still holds 127.0.0.1's only slot after 5 s"
        );
    })
    .await;
}

/// The response stall close is about clients that stop reading, not about a
/// slow upstream: an answer whose upstream sends a byte every 400 ms is passed
/// on byte by byte while `body_read_timeout` is 300 ms, and the connection is
/// not cut between bytes.
#[tokio::test]
async fn a_slow_upstream_body_is_not_taken_for_a_stalled_client() {
    with_timeout(Duration::from_secs(40), async {
        let h = Harness::start_with(
            "body_read_timeout = \"300ms\"",
            "body_timeout = \"5s\"",
        )
        .await;
        h.mock.set_faults(rungen_gateway::mock_upstream::Faults {
            trickle_ms: Some(400),
            ..Default::default()
        });
        let stream = connect_from(LOCAL, h.addr).await;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        let body = r#"{"name":"trickled","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://h/m"}}"#;
        let req = http::Request::post("/app")
            .header("host", h.addr.to_string())
            .header("authorization", format!("Bearer {TOKEN_RW}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let res = tokio::time::timeout(IO_TIMEOUT, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert!(res.status().is_success(), "{}", res.status());
        let mut body = res.into_body();
        let started = Instant::now();
        let mut received = 0;
        while received < 4 {
            use http_body_util::BodyExt;
            let frame = tokio::time::timeout(IO_TIMEOUT, body.frame())
                .await
                .expect("the next byte comes within 5 s")
                .expect("the body ended early")
                .unwrap_or_else(|e| {
                    panic!("cut after {received} bytes, {:?}: {e}", started.elapsed())
                });
            if let Some(data) = frame.data_ref() {
                received += data.len();
            }
        }
        assert!(
            started.elapsed() >= Duration::from_millis(1000),
            "the upstream did trickle ({:?} for {received} bytes)",
            started.elapsed()
        );
        drop(body);
        driver.abort();
        h.stop().await;
    })
    .await;
}

/// A connection still busy when the drain runs out of time is closed then,
/// even when the process goes on (a gateway embedded in another program, or
/// these tests): its request does not outlive `stop`.
#[tokio::test]
async fn connections_left_at_the_drain_deadline_are_closed() {
    let mut h = Harness::start().await;
    // A write whose answer trickles in (headers at once, then a byte every 100 ms).
    h.mock.set_faults(rungen_gateway::mock_upstream::Faults {
        trickle_ms: Some(100),
        ..Default::default()
    });
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let app = r#"{"name":"n","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://h/m"}}"#;
    let post = format!(
        "POST /app HTTP/1.1\r\nhost: gw\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{app}",
        bearer(TOKEN_RW),
        app.len()
    );
    s.write_all(post.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 201") || buf[..n].starts_with(b"HTTP/1.1 200"),
        "the answer has begun: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let stopped = Instant::now();
    h.gateway.take().unwrap().stop().await; // shutdown_timeout 5 s
    let took = stopped.elapsed();
    // Whatever had arrived, then the end of the connection.
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    h.mock.shutdown();
    assert!(took < Duration::from_secs(7), "stop took {took:?}");
    assert!(closed.is_ok(), "the connection outlived stop");
}

/// The admin listener has 256 connections; one peer (any pod that can reach
/// the admin port) holding all of them with idle connections would leave the
/// kubelet's probes waiting in the backlog, and the pods restarted. At most
/// 16 are one peer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_starve_the_admin_listener() {
    let h = Harness::start().await;
    let admin = h.gateway().admin_addr().unwrap();
    let attacker: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..256 {
        held.push(connect_from(attacker, admin).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The kubelet's probe (another source address), with its 2 s timeout.
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        TestClient::http1().get(&format!("http://{admin}/healthz"), &[]),
    )
    .await;
    drop(held);
    assert!(
        probe.is_ok_and(|r| r.status == http::StatusCode::OK),
        "GET /healthz got no answer within the probe's 2 s while one peer holds idle admin connections"
    );
    h.stop().await;
}
