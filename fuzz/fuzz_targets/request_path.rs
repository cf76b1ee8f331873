//! Arbitrary bytes as a raw HTTP/1.1 (or h2c) request through the real
//! gateway and the mock upstream, both started once in a global runtime.
//!
//! Each input is written to a fresh TCP connection and the answer read with
//! short timeouts. A panic anywhere in the gateway (any task, any thread)
//! aborts the process through libfuzzer-sys' panic hook, so libFuzzer reports
//! it with the input. Every `HEALTH_EVERY` inputs, and after any input that
//! got no answer at all, a normal authenticated `GET /app` must still get 200.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rungen_gateway::config::Config;
use rungen_gateway::mock_upstream::{self, MockConfig, MockHandle, MockUser};
use rungen_gateway::server::{self, Running};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The caller token of the fuzz config (only its SHA-256 is in the config).
/// The seed corpus uses it, so mutations reach the authenticated path.
const TOKEN: &str = "fuzz-caller-token-0d1e";
const TOKEN_SHA256: &str = "da8cadcb70322833952b425e5f222a38ed61acd863059f000eb5bf7d3808b7c2";
const UPSTREAM_KEY: &str = "fuzz-upstream-key-5a2b";
const TEAM_ID: &str = "123e4567-e89b-12d3-a456-426614174000";
const HEALTH_EVERY: u64 = 100;

struct Env {
    _runtime: tokio::runtime::Runtime,
    _mock: MockHandle,
    _gateway: Running,
    addr: SocketAddr,
}

fn config_text(upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
header_read_timeout = "2s"
shutdown_timeout = "1s"
drain_delay = "0s"

[upstream]
base_url = "{upstream}"
connect_timeout = "1s"
request_timeout = "2s"

[admin]
listen = "off"

[reload]
watch = false

[rate_limit]
default = {{ per_second = 1000000, burst = 1000000 }}
unauthenticated = {{ per_second = 1000000, burst = 1000000 }}
upstream_budget = {{ per_second = 1000000, burst = 1000000 }}

[[teams]]
name = "personal"
api_key = {{ value = "{UPSTREAM_KEY}" }}

[[teams]]
name = "acme"
team_id = "{TEAM_ID}"
api_key = {{ value = "{UPSTREAM_KEY}" }}

[[clients]]
name = "fuzzer"
token_sha256 = "{TOKEN_SHA256}"
teams = ["personal", "acme"]
methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]
"#
    )
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (mock, gateway) = runtime.block_on(async {
            let mock_config = MockConfig {
                users: vec![MockUser {
                    api_key: UPSTREAM_KEY.into(),
                    user_id: "11111111-1111-4111-8111-111111111111".into(),
                    teams: vec![TEAM_ID.into()],
                }],
                ..MockConfig::default()
            };
            let mock = mock_upstream::start(mock_config, "127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("mock upstream");
            let config = Config::from_toml(Path::new("fuzz.toml"), &config_text(&mock.base_url()))
                .unwrap_or_else(|e| panic!("fuzz config: {e}"));
            let gateway = server::start(config).await.expect("gateway");
            (mock, gateway)
        });
        let addr = gateway.local_addr();
        let env = Env {
            _runtime: runtime,
            _mock: mock,
            _gateway: gateway,
            addr,
        };
        health_check(env.addr);
        env
    })
}

/// Closes with RST instead of FIN: no TIME_WAIT, so thousands of
/// connections a second do not exhaust the ephemeral ports.
fn reset(stream: TcpStream) {
    let socket = socket2::Socket::from(stream);
    let _ = socket.set_linger(Some(Duration::ZERO));
}

/// Sends `data`, returns what came back (possibly nothing).
fn exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        panic!("the gateway no longer accepts connections");
    };
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = stream.write_all(data);
    // Without an end of head the gateway can only wait for more: tell it
    // there is no more at once. Otherwise give it a moment to answer first
    // (a half-close aborts a request still in flight).
    let has_head_end =
        data.windows(2).any(|w| w == b"\n\n") || data.windows(4).any(|w| w == b"\r\n\r\n");
    let mut half_closed = !has_head_end;
    if half_closed {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let wait = if half_closed {
            Duration::from_millis(300)
        } else {
            Duration::from_millis(60)
        };
        if start.elapsed() > Duration::from_secs(1) {
            break;
        }
        let _ = stream.set_read_timeout(Some(wait));
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if !half_closed {
                    let _ = stream.shutdown(Shutdown::Write);
                    half_closed = true;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if half_closed {
                    break;
                }
                let _ = stream.shutdown(Shutdown::Write);
                half_closed = true;
            }
            Err(_) => break,
        }
    }
    reset(stream);
    out
}

fn health_check(addr: SocketAddr) {
    let request = format!(
        "GET /app HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
    );
    let mut last = Vec::new();
    for _ in 0..3 {
        let answer = exchange(addr, request.as_bytes());
        if answer.starts_with(b"HTTP/1.1 200 ") {
            return;
        }
        last = answer;
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the gateway stopped answering GET /app normally: {:?}",
        String::from_utf8_lossy(&last[..last.len().min(300)])
    );
}

static RUNS: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let env = env();
    let answer = exchange(env.addr, data);
    let n = RUNS.fetch_add(1, Ordering::Relaxed) + 1;
    // A complete HTTP/1 answer must be a status line the gateway wrote.
    if !answer.is_empty() && answer.starts_with(b"HTTP/1.") {
        let status = answer.get(9..12).unwrap_or_default();
        assert!(
            status.iter().all(u8::is_ascii_digit),
            "malformed status line: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
    if answer.is_empty() || n % HEALTH_EVERY == 0 {
        health_check(env.addr);
    }
});
