//! Shared harness for end-to-end tests: the mock upstream and the real gateway
//! on 127.0.0.1 port 0, and a small HTTP client (HTTP/1.1 or h2c).
#![allow(dead_code, clippy::unwrap_used)]

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rungen_gateway::clock::{SharedClock, SystemClock};
use rungen_gateway::config::Config;
use rungen_gateway::mock_upstream::{self, MockConfig, MockHandle, MockUser};
use rungen_gateway::server::{self, Running};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

pub const TEAM_ID: &str = "123e4567-e89b-12d3-a456-426614174000";
pub const OTHER_TEAM_ID: &str = "99999999-e89b-12d3-a456-426614174000";
/// Upstream keys and caller tokens, unique enough to search for in captures.
pub const UPSTREAM_KEY: &str = "canary-upstream-key-7f3a9c21";
pub const OTHER_UPSTREAM_KEY: &str = "canary-upstream-key-other-51be";
pub const WRONG_UPSTREAM_KEY: &str = "canary-upstream-key-wrong-0d4e";
pub const TOKEN_RW: &str = "canary-caller-token-rw-8a1f2e";
pub const TOKEN_RO: &str = "canary-caller-token-ro-3c9d7b";
pub const TOKEN_BROKEN: &str = "canary-caller-token-broken-6e0a";
pub const ADMIN_TOKEN: &str = "canary-admin-token-2b7c44";

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// The mock's users: one with a personal scope and team membership, and one
/// other user whose team the gateway's clients may not reach.
pub fn mock_config() -> MockConfig {
    MockConfig {
        users: vec![
            MockUser {
                api_key: UPSTREAM_KEY.into(),
                user_id: "11111111-1111-4111-8111-111111111111".into(),
                teams: vec![TEAM_ID.into()],
            },
            MockUser {
                api_key: OTHER_UPSTREAM_KEY.into(),
                user_id: "22222222-2222-4222-8222-222222222222".into(),
                teams: vec![OTHER_TEAM_ID.into()],
            },
        ],
        ..MockConfig::default()
    }
}

/// A gateway config pointing at `upstream`; `server_extra` goes into [server],
/// `upstream_extra` into [upstream].
pub fn config_toml(upstream: &str, server_extra: &str, upstream_extra: &str) -> String {
    config_toml_with(upstream, server_extra, upstream_extra, "")
}

/// As [`config_toml`], with `sections` (whole tables such as `[cache]`) appended.
pub fn config_toml_with(
    upstream: &str,
    server_extra: &str,
    upstream_extra: &str,
    sections: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"
drain_delay = "0s"
{server_extra}

[upstream]
base_url = "{upstream}"
connect_timeout = "1s"
request_timeout = "2s"
{upstream_extra}

[logging]
level = "info"

[admin]
listen = "127.0.0.1:0"
token_sha256 = "{admin}"

[reload]
poll_interval = "200ms"

[[teams]]
name = "personal"
api_key = {{ value = "{UPSTREAM_KEY}" }}

[[teams]]
name = "acme"
team_id = "{TEAM_ID}"
api_key = {{ value = "{UPSTREAM_KEY}" }}

[[teams]]
name = "broken"
team_id = "{TEAM_ID}"
api_key = {{ value = "{WRONG_UPSTREAM_KEY}" }}

[[teams]]
name = "other"
team_id = "{OTHER_TEAM_ID}"
api_key = {{ value = "{OTHER_UPSTREAM_KEY}" }}

[[clients]]
name = "writer"
token_sha256 = "{rw}"
teams = ["personal", "acme"]
methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]

[[clients]]
name = "reader"
token_sha256 = "{ro}"
teams = ["acme"]

[[clients]]
name = "misconfigured"
token_sha256 = "{broken}"
teams = ["broken"]

{sections}
"#,
        rw = sha256_hex(TOKEN_RW),
        ro = sha256_hex(TOKEN_RO),
        broken = sha256_hex(TOKEN_BROKEN),
        admin = sha256_hex(ADMIN_TOKEN),
    )
}

pub struct Harness {
    pub mock: MockHandle,
    pub gateway: Option<Running>,
    pub addr: SocketAddr,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with("", "").await
    }

    pub async fn start_with(server_extra: &str, upstream_extra: &str) -> Harness {
        Self::start_full(server_extra, upstream_extra, "", Arc::new(SystemClock)).await
    }

    /// The gateway with extra config tables and a given clock.
    pub async fn start_full(
        server_extra: &str,
        upstream_extra: &str,
        sections: &str,
        clock: SharedClock,
    ) -> Harness {
        let mock = mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let text = config_toml_with(&mock.base_url(), server_extra, upstream_extra, sections);
        let config = Config::from_toml(Path::new("test.toml"), &text).unwrap();
        let gateway = server::start_with(config, clock).await.unwrap();
        let addr = gateway.local_addr();
        Harness {
            mock,
            gateway: Some(gateway),
            addr,
        }
    }

    pub fn gateway(&self) -> &Running {
        self.gateway.as_ref().unwrap()
    }

    /// Upstream requests counted by route template, e.g. "GET /app".
    pub fn upstream_count(&self, route: &str) -> u64 {
        self.mock.stats().by_route.get(route).copied().unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stop(mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
        self.mock.shutdown();
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn error_message(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" field: {:?}", self.body))
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Clone)]
pub struct TestClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl TestClient {
    pub fn http1() -> Self {
        Self {
            inner: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn h2c() -> Self {
        Self {
            inner: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = body
            .map(|b| Bytes::copy_from_slice(b.as_bytes()))
            .unwrap_or_default();
        let res = self
            .inner
            .request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, url, headers, None).await
    }
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Fails the test if `f` has not finished within `limit` (a hang guard).
pub async fn with_timeout<F: std::future::Future<Output = ()>>(limit: std::time::Duration, f: F) {
    tokio::time::timeout(limit, f)
        .await
        .expect("test timed out");
}

/// Concurrent tasks of [`flood`].
pub const FLOOD_WORKERS: usize = 8;

/// Runs `make(i)` for `i` in `0..n` on [`FLOOD_WORKERS`] concurrent tasks.
pub async fn flood<F, Fut>(n: usize, make: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let make = Arc::new(make);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..FLOOD_WORKERS {
        let make = make.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                make(i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A connection to `addr` from the local address `from` (any loopback
/// address works as a source on Linux); connecting may take at most 5 s.
pub async fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), socket.connect(addr))
        .await
        .expect("connect timed out")
        .unwrap()
}
