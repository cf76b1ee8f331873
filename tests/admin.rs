//! The admin API, metrics and hot reload, end to end.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod common;

use common::*;
use http::{Method, StatusCode};
use rungen_gateway::config::Config;
use rungen_gateway::mock_upstream::{self, Faults};
use rungen_gateway::server;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn admin_url(h: &Harness, path: &str) -> String {
    format!("http://{}{}", h.gateway().admin_addr().unwrap(), path)
}

fn admin_auth() -> String {
    bearer(ADMIN_TOKEN)
}

/// Parses Prometheus text: every sample line is `name{labels} value`.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels: {line}");
        }
        samples.push((series.to_string(), value));
    }
    samples
}

fn sum(samples: &[(String, f64)], prefix: &str, contains: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.starts_with(prefix) && contains.iter().all(|c| s.contains(c)))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn health_readiness_and_metrics_that_move_with_traffic() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    let r = c.get(&admin_url(&h, "/healthz"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = c.get(&admin_url(&h, "/readyz"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "ready");

    let before = parse_metrics(&c.get(&admin_url(&h, "/metrics"), &[]).await.text());
    let auth = bearer(TOKEN_RW);
    for _ in 0..3 {
        c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    }
    c.get(&h.url("/app"), &[]).await; // a 401
    let r = c.get(&admin_url(&h, "/metrics"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text();
    let after = parse_metrics(&text);
    let moved =
        |prefix: &str, labels: &[&str]| sum(&after, prefix, labels) - sum(&before, prefix, labels);
    assert!(
        moved(
            "rungen_gateway_requests_total",
            &[
                "client=\"writer\"",
                "status_class=\"2xx\"",
                "route=\"/app\""
            ]
        ) >= 3.0,
        "{text}"
    );
    assert!(
        moved(
            "rungen_gateway_cache_requests_total",
            &["outcome=\"hit\"", "scope=\"personal\""]
        ) >= 2.0
    );
    assert!(
        moved(
            "rungen_gateway_upstream_requests_total",
            &["scope=\"personal\""]
        ) >= 1.0
    );
    assert!(moved("rungen_gateway_errors_total", &["kind=\"unauthenticated\""]) >= 1.0);
    assert!(
        moved(
            "rungen_gateway_request_duration_seconds_count",
            &["route=\"/app\""]
        ) >= 4.0
    );
    assert!(
        text.contains("rungen_gateway_request_duration_seconds_bucket"),
        "histograms, not summaries"
    );
    // The latency histogram is labelled by route and method only (few series).
    for line in text
        .lines()
        .filter(|l| l.starts_with("rungen_gateway_request_duration_seconds_count{"))
    {
        let labels = &line[line.find('{').unwrap() + 1..line.find('}').unwrap()];
        let mut names: Vec<&str> = labels
            .split(',')
            .map(|kv| kv.split('=').next().unwrap())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["method", "route"], "{line}");
    }
    assert!(text.contains("rungen_gateway_build_info"));
    assert!(text.contains("rungen_gateway_cache_entries"));
    assert!(text.contains("rungen_gateway_config_generation"));
    // No raw ids in labels: only route templates.
    for line in text.lines().filter(|l| l.contains("route=\"/app/")) {
        assert!(
            line.contains("route=\"/app/{id}") || line.contains("route=\"/app/*"),
            "raw path in a label: {line}"
        );
    }
    for canary in [
        UPSTREAM_KEY,
        WRONG_UPSTREAM_KEY,
        TOKEN_RW,
        TOKEN_RO,
        ADMIN_TOKEN,
    ] {
        assert!(!text.contains(canary));
    }
    h.stop().await;
}

#[tokio::test]
async fn reads_can_require_the_admin_token() {
    let h = Harness::start_full(
        "",
        "",
        "",
        std::sync::Arc::new(rungen_gateway::clock::SystemClock),
    )
    .await;
    let c = TestClient::http1();
    assert_eq!(
        c.get(&admin_url(&h, "/metrics"), &[]).await.status,
        StatusCode::OK
    );
    h.stop().await;
    let text = config_toml("https://api.rungen.ai", "", "")
        .replace("[reload]", "protect_reads = true\n\n[reload]");
    let config = Config::from_toml(Path::new("t.toml"), &text).unwrap();
    let g = server::start(config).await.unwrap();
    let admin = g.admin_addr().unwrap();
    for path in ["/metrics", "/config"] {
        let r = c.get(&format!("http://{admin}{path}"), &[]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        // HEAD is a read like GET: answered, and protected alike.
        let r = c
            .send(Method::HEAD, &format!("http://{admin}{path}"), &[], None)
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "HEAD {path}");
        let r = c
            .send(
                Method::HEAD,
                &format!("http://{admin}{path}"),
                &[("authorization", &admin_auth())],
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "HEAD {path}");
        let r = c
            .get(
                &format!("http://{admin}{path}"),
                &[("authorization", &admin_auth())],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
    }
    assert_eq!(
        c.get(&format!("http://{admin}/readyz"), &[]).await.status,
        StatusCode::OK
    );
    g.stop().await;
}

#[tokio::test]
async fn effective_config_shows_fingerprints_only() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    let r = c.get(&admin_url(&h, "/config"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    let teams = v["teams"].as_array().unwrap();
    assert_eq!(teams.len(), 4);
    assert!(teams[0]["api_key"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(v["clients"][0]["name"], "writer");
    // Token hashes: 32 bits of a token's SHA-256 would let a reader test
    // guesses of a weak token offline; only the admin token shows them.
    let fingerprint = |d: &str| format!("sha256:{}", &d[..8]);
    let rw = fingerprint(&sha256_hex(TOKEN_RW));
    let admin = fingerprint(&sha256_hex(ADMIN_TOKEN));
    assert_eq!(v["clients"][0]["token_sha256"], "set");
    assert_eq!(v["admin"]["token_sha256"], "set");
    let authed = c
        .get(
            &admin_url(&h, "/config"),
            &[("authorization", &admin_auth())],
        )
        .await;
    let w = authed.json();
    assert_eq!(w["clients"][0]["token_sha256"], rw.as_str());
    assert_eq!(w["admin"]["token_sha256"], admin.as_str());
    assert_eq!(w["teams"], v["teams"], "key fingerprints for every reader");
    let text = r.text();
    assert!(!text.contains(&rw[7..]) && !text.contains(&admin[7..]));
    for text in [text, authed.text()] {
        for canary in [
            UPSTREAM_KEY,
            WRONG_UPSTREAM_KEY,
            OTHER_UPSTREAM_KEY,
            TOKEN_RW,
            ADMIN_TOKEN,
            &sha256_hex(TOKEN_RW),
        ] {
            assert!(!text.contains(canary), "{canary} in /config");
        }
    }
    h.stop().await;
}

#[tokio::test]
async fn purge_over_http_needs_the_admin_token() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RW);
    let team = [("authorization", auth.as_str()), ("x-team-id", TEAM_ID)];
    c.get(&h.url("/app"), &team).await;
    c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(h.upstream_count("GET /app"), 2);

    let purge = |headers: Vec<(&'static str, String)>, body: &'static str| {
        let c = c.clone();
        let url = admin_url(&h, "/cache/purge");
        async move {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            c.send(Method::POST, &url, &hs, Some(body)).await
        }
    };
    let r = purge(vec![], "{}").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!r.error_message().is_empty());
    let r = purge(vec![("authorization", bearer("wrong"))], "{}").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = purge(
        vec![("authorization", admin_auth())],
        "{\"scope\": \"nope\"}",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = purge(vec![("authorization", admin_auth())], "not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let huge: &'static str =
        Box::leak(format!("{{\"scope\": \"{}\"}}", "a".repeat(20_000)).into_boxed_str());
    let r = purge(vec![("authorization", admin_auth())], huge).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // The admin token may also come as x-api-key (as a client's may).
    let r = purge(
        vec![("x-api-key", ADMIN_TOKEN.to_string())],
        "{\"scope\": \"nope\"}",
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "authenticated, then: no such scope"
    );
    let r = purge(
        vec![("authorization", admin_auth())],
        "{\"path_prefix\": \"/app\"}",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "a prefix needs a scope");
    // A scope that is there but null (a template that lost its value) is not
    // "everything": nothing is purged.
    for body in [
        "{\"scope\": null}",
        "{\"scope\": \"acme\", \"path_prefix\": null}",
    ] {
        let r = purge(vec![("authorization", admin_auth())], body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.error_message().contains("expected a string"), "{r:?}");
    }

    let r = purge(
        vec![("authorization", admin_auth())],
        "{\"scope\": \"acme\", \"path_prefix\": \"/app\"}",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    c.get(&h.url("/app"), &team).await;
    c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(
        h.upstream_count("GET /app"),
        3,
        "only acme's /app was purged"
    );

    let r = purge(vec![("authorization", admin_auth())], "").await;
    assert_eq!(r.status, StatusCode::OK);
    c.get(&h.url("/app"), &team).await;
    c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(h.upstream_count("GET /app"), 5, "everything was purged");

    let r = c.get(&admin_url(&h, "/cache/purge"), &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "POST");
    let r = c
        .send(Method::DELETE, &admin_url(&h, "/metrics"), &[], None)
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "GET, HEAD");
    h.stop().await;
}

/// A gateway from a real config file in a temp dir (so it can be reloaded).
struct FileGateway {
    dir: tempfile::TempDir,
    path: PathBuf,
    mock: mock_upstream::MockHandle,
    gateway: server::Running,
}

impl FileGateway {
    async fn start(edit: impl Fn(String) -> String) -> FileGateway {
        let mock = mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("personal.key");
        std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).unwrap();
        let text = config_toml(&mock.base_url(), "", "").replacen(
            &format!("api_key = {{ value = \"{UPSTREAM_KEY}\" }}"),
            &format!("api_key = {{ file = \"{}\" }}", key_file.display()),
            1,
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, edit(text)).unwrap();
        let gateway = server::start(Config::load(&path).unwrap()).await.unwrap();
        FileGateway {
            dir,
            path,
            mock,
            gateway,
        }
    }

    fn url(&self, p: &str) -> String {
        format!("http://{}{}", self.gateway.local_addr(), p)
    }

    fn admin(&self, p: &str) -> String {
        format!("http://{}{}", self.gateway.admin_addr().unwrap(), p)
    }

    /// `POST /reload` with the admin token.
    async fn reload(&self, c: &TestClient) -> Reply {
        c.send(
            Method::POST,
            &self.admin("/reload"),
            &[("authorization", &admin_auth())],
            None,
        )
        .await
    }

    /// A `GET /app` that the upstream answers `latency_ms` late, started
    /// and, once this returns, in the air at the upstream.
    async fn request_in_flight(
        &self,
        c: &TestClient,
        latency_ms: u64,
    ) -> tokio::task::JoinHandle<Reply> {
        self.mock.set_faults(Faults {
            latency_ms,
            ..Faults::default()
        });
        let (c, url) = (c.clone(), self.url("/app"));
        let in_flight = tokio::spawn(async move { c.get(&url, &[("x-api-key", TOKEN_RO)]).await });
        let started = std::time::Instant::now();
        while self.mock.stats().total == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the request never reached the upstream"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        in_flight
    }

    fn rewrite(&self, f: impl Fn(String) -> String) {
        let text = std::fs::read_to_string(&self.path).unwrap();
        write_atomically(&self.path, &f(text));
    }

    async fn stop(self) {
        self.gateway.stop().await;
        self.mock.shutdown();
    }
}

/// Like Kubernetes: write a new file, then rename it over the old one.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn without_reader(text: String) -> String {
    let start = text.find("[[clients]]\nname = \"reader\"").unwrap();
    let end = start
        + text[start..]
            .find("[[clients]]\nname = \"misconfigured\"")
            .unwrap();
    format!("{}{}", &text[..start], &text[end..])
}

/// Status of one `Content-Length` answer read from a raw keep-alive connection.
async fn raw_status(s: &mut tokio::net::TcpStream, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return head[9..12].parse::<u16>().unwrap();
                }
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the gateway closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer within 5 s")
}

#[tokio::test]
async fn a_reload_applies_to_the_next_request_on_an_open_connection() {
    // Each connection keeps its own copy of the request path (listener.rs):
    // a reload must still reach a keep-alive connection opened before it.
    let g = FileGateway::start(|t| t.replace("poll_interval = \"200ms\"", "watch = false")).await;
    let mut conn = tokio::net::TcpStream::connect(g.gateway.local_addr())
        .await
        .unwrap();
    let get = format!("GET /app HTTP/1.1\r\nhost: gw\r\nx-api-key: {TOKEN_RO}\r\n\r\n");
    assert_eq!(raw_status(&mut conn, &get).await, 200);
    assert_eq!(
        raw_status(&mut conn, &get).await,
        200,
        "served from the cache"
    );

    g.rewrite(without_reader);
    let c = TestClient::http1();
    let r = g.reload(&c).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        raw_status(&mut conn, &get).await,
        401,
        "the same connection sees the reloaded config (the token is revoked)"
    );
}

#[tokio::test]
async fn reload_by_admin_call_revokes_a_token_and_refuses_a_bad_config() {
    let g = FileGateway::start(|t| t.replace("poll_interval = \"200ms\"", "watch = false")).await;
    let c = TestClient::http1();
    let r = c.get(&g.url("/app"), &[("x-api-key", TOKEN_RO)]).await;
    assert_eq!(r.status, StatusCode::OK);

    g.rewrite(without_reader);
    let r = g.reload(&c).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.json()["generation"], 2);
    let r = c.get(&g.url("/app"), &[("x-api-key", TOKEN_RO)]).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the revoked token is refused at once"
    );

    // A bad config is refused; the old one keeps serving and readiness stays up.
    let metrics_before = c.get(&g.admin("/metrics"), &[]).await.text();
    g.rewrite(|t| t.replace("request_timeout = \"2s\"", "request_timeout = \"whenever\""));
    let r = g.reload(&c).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let msg = r.error_message();
    assert!(
        msg.contains("upstream.request_timeout") && msg.contains("whenever"),
        "{msg}"
    );
    assert!(msg.contains("gateway.toml"), "{msg}");
    let r = c
        .get(&g.url("/app"), &[("authorization", &bearer(TOKEN_RW))])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(c.get(&g.admin("/readyz"), &[]).await.status, StatusCode::OK);
    assert_eq!(g.gateway.state().generation(), 2);
    let errors = |text: &str| {
        sum(
            &parse_metrics(text),
            "rungen_gateway_config_reloads_total",
            &["outcome=\"error\""],
        )
    };
    let metrics_after = c.get(&g.admin("/metrics"), &[]).await.text();
    assert!(errors(&metrics_after) >= errors(&metrics_before) + 1.0);

    // Cache policies follow a reload too: with the cache switched off, every read goes upstream.
    g.rewrite(|t| {
        t.replace("request_timeout = \"whenever\"", "request_timeout = \"2s\"")
            + "\n[cache]\nenabled = false\n"
    });
    let r = g.reload(&c).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let before = g.mock.stats().total;
    for _ in 0..3 {
        let r = c
            .get(&g.url("/app"), &[("authorization", &bearer(TOKEN_RW))])
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(g.mock.stats().total, before + 3);

    // Reload needs the admin token.
    let r = c.send(Method::POST, &g.admin("/reload"), &[], None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    g.stop().await;
}

#[tokio::test]
async fn a_rotated_secret_file_is_picked_up_and_its_scope_cache_dropped() {
    let g = FileGateway::start(|t| t).await;
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RW);
    let r = c.get(&g.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let old_body = r.body.clone();
    assert_eq!(
        g.mock.requests().last().unwrap().header("x-api-key"),
        Some(UPSTREAM_KEY)
    );

    // Rotate the personal scope's key (the mock's second user: a different personal scope).
    write_atomically(
        &g.dir.path().join("personal.key"),
        &format!("{OTHER_UPSTREAM_KEY}\n"),
    );
    let mut rotated = false;
    for _ in 0..100 {
        if g.gateway.state().generation() >= 2 {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the watcher reloaded after the secret changed");
    let r = c.get(&g.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_ne!(r.body, old_body, "the old key's cached answer was dropped");
    assert_eq!(
        g.mock.requests().last().unwrap().header("x-api-key"),
        Some(OTHER_UPSTREAM_KEY)
    );
    g.stop().await;
}

#[tokio::test]
async fn an_in_flight_request_survives_a_reload() {
    let g = FileGateway::start(|t| t.replace("poll_interval = \"200ms\"", "watch = false")).await;
    let c = TestClient::http1();
    let slow = g.request_in_flight(&c, 600).await;
    g.rewrite(without_reader);
    let r = g.reload(&c).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = slow.await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the request finished with the config it started with"
    );
    g.mock.set_faults(Faults::default());
    let r = c.get(&g.url("/app"), &[("x-api-key", TOKEN_RO)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    g.stop().await;
}

#[tokio::test]
async fn shutdown_turns_readiness_off_before_the_listener_closes() {
    let g =
        FileGateway::start(|t| t.replace("drain_delay = \"0s\"", "drain_delay = \"700ms\"")).await;
    let c = TestClient::http1();
    let in_flight = g.request_in_flight(&c, 900).await;
    let addr = g.gateway.local_addr();
    let admin = g.admin("/readyz");
    g.gateway.shutdown();
    let r = c.get(&admin, &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.error_message().contains("draining"));
    // During the delay, new requests are still served.
    g.mock.set_faults(Faults::default());
    let r = c
        .get(&g.url("/app"), &[("authorization", &bearer(TOKEN_RW))])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "the in-flight request completed");
    let FileGateway { gateway, mock, .. } = g;
    gateway.wait().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after the drain"
    );
    mock.shutdown();
}

/// A config that names a secret file which appears a moment later (a
/// ConfigMap and a Secret updated separately) is refused at first, then
/// applied by the watcher's retries once the file is there.
#[tokio::test]
async fn a_refused_reload_is_retried_until_its_secret_appears() {
    let g = FileGateway::start(|t| t).await;
    let beta_key = g.dir.path().join("beta.key");
    g.rewrite(|text| {
        format!(
            "{text}\n[[teams]]\nname = \"beta\"\nteam_id = \"{OTHER_TEAM_ID}\"\napi_key = {{ file = \"{}\" }}\n",
            beta_key.display()
        )
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        g.gateway.state().generation(),
        1,
        "refused while the key file is missing"
    );
    write_atomically(&beta_key, &format!("{OTHER_UPSTREAM_KEY}\n"));
    let started = std::time::Instant::now();
    while g.gateway.state().generation() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the refused config was never applied once its secret file appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        g.gateway
            .state()
            .config()
            .teams
            .iter()
            .any(|t| t.name == "beta")
    );
    g.stop().await;
}

/// Health, readiness and metrics stay readable on the admin listener while
/// the public listener drains; the admin listener stops after the drain.
#[tokio::test]
async fn the_admin_listener_outlives_the_drain() {
    let g = FileGateway::start(|t| t).await;
    let c = TestClient::http1();
    let in_flight = g.request_in_flight(&c, 1500).await;
    let (admin_addr, public_addr) = (g.gateway.admin_addr().unwrap(), g.gateway.local_addr());
    let FileGateway { gateway, mock, .. } = g;
    // drain_delay is 0: the public listener stops accepting at once.
    let waited = tokio::spawn(gateway.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(public_addr).await.is_err(),
        "the public listener is draining"
    );
    assert!(!in_flight.is_finished(), "still draining");
    let admin = |p: &str| format!("http://{admin_addr}{p}");
    assert_eq!(c.get(&admin("/healthz"), &[]).await.status, StatusCode::OK);
    assert_eq!(
        c.get(&admin("/readyz"), &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let metrics = c.get(&admin("/metrics"), &[]).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.text().contains("rungen_gateway_connections_open"));
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    waited.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(admin_addr).await.is_err(),
        "the admin listener stops after the drain"
    );
    mock.shutdown();
}
