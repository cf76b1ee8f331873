//! The binary as an operator runs it: check-config, new-token, serve with
//! signals, and the canary test that searches everything captured for secrets.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod common;

use common::*;
use http::Method;
use rungen_gateway::mock_upstream::{self, Faults};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rungen-gateway"))
}

/// `serve --log-format json` on `cfg` with `env` set, its stderr read line by
/// line on a thread, its stdout kept for [`Served::stop`]. Killed on drop if a
/// test fails before `stop`.
struct Served {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// One stderr line as written, and as JSON (`Null` if it is not JSON).
struct LogLine {
    text: String,
    json: serde_json::Value,
}

/// A string field (`addr`, `admin`) of the "gateway listening" line: the last
/// of what [`Served::until_listening`] returns.
fn listening_field(lines: &[LogLine], field: &str) -> String {
    let last = &lines.last().expect("no log lines").json;
    last[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {last}"))
        .to_string()
}

impl Served {
    fn start(cfg: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = bin()
            .args(["serve", "--log-format", "json", "--config"])
            .arg(cfg)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The log lines up to and including "gateway listening".
    fn until_listening(&self) -> Vec<LogLine> {
        let mut seen = Vec::new();
        loop {
            let text = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .expect("the gateway did not log its address");
            let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let done = json["message"] == "gateway listening";
            seen.push(LogLine { text, json });
            if done {
                return seen;
            }
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// SIGTERM, then a clean exit. Returns the stderr lines not read before,
    /// then everything written to stdout.
    fn stop(mut self) -> String {
        self.signal("-TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "exit status {status}");
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let mut rest = String::new();
        while let Ok(line) = self.lines.try_recv() {
            rest.push_str(&line);
            rest.push('\n');
        }
        let mut stdout = self.child.stdout.take().unwrap();
        stdout.read_to_string(&mut rest).unwrap();
        rest
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The environment variables config/gateway.example.toml reads its keys from.
pub const EXAMPLE_ENV: [(&str, &str); 3] = [
    ("RUNGEN_KEY_ACME", "example-acme-key"),
    ("RUNGEN_KEY_PERSONAL", "example-personal-key"),
    (
        "RUNGEN_JWT_SECRET",
        "example-jwt-secret-0123456789abcdef0123",
    ),
];

fn check_config(path: &Path) -> (bool, String, String) {
    let out = bin()
        .args(["check-config", "--config"])
        .arg(path)
        .envs(EXAMPLE_ENV)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_shipped_config_passes_check_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, out, err) = check_config(&path);
            assert!(ok, "{}: {err}", path.display());
            assert!(out.contains(": ok"), "{out}");
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "config/ should hold demo.toml and gateway.example.toml"
    );
}

#[test]
fn check_config_names_the_file_the_field_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = config_toml("https://api.rungen.ai", "", "");
    let cases = [
        (
            good.replace("request_timeout = \"2s\"", "request_timeout = \"soon\""),
            "upstream.request_timeout",
            "soon",
        ),
        (
            good.replace("[logging]", "[logging]\ncolour = \"red\""),
            "logging",
            "unknown field `colour`",
        ),
        (
            good.replace("teams = [\"acme\"]", "teams = [\"nobody\"]"),
            "clients[1].teams[0]",
            "unknown team `nobody`",
        ),
        (
            good.replace(&sha256_hex(TOKEN_RO), &sha256_hex(TOKEN_RW)),
            "clients[1].token_sha256",
            "duplicate token",
        ),
        (
            good.replacen(
                &format!("api_key = {{ value = \"{UPSTREAM_KEY}\" }}"),
                "api_key = { env = \"RUNGEN_GATEWAY_TEST_UNSET_VAR\" }",
                1,
            ),
            "teams[0].api_key",
            "RUNGEN_GATEWAY_TEST_UNSET_VAR",
        ),
        (
            good.replacen(
                &format!("api_key = {{ value = \"{UPSTREAM_KEY}\" }}"),
                "api_key = { file = \"/nonexistent/rungen-key\" }",
                1,
            ),
            "teams[0].api_key",
            "/nonexistent/rungen-key",
        ),
        (
            good.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost-ish\""),
            "server.listen",
            "localhost-ish",
        ),
    ];
    for (i, (text, field, reason)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (ok, _, err) = check_config(&path);
        assert!(!ok, "case {i} should fail");
        assert!(err.contains(&path.display().to_string()), "case {i}: {err}");
        assert!(
            err.contains(field),
            "case {i}: expected field {field}: {err}"
        );
        assert!(err.contains(reason), "case {i}: expected {reason}: {err}");
        // Secrets of the file are never echoed.
        assert!(!err.contains(UPSTREAM_KEY), "case {i}: {err}");
    }
    // A missing file is an error too.
    let (ok, _, err) = check_config(&dir.path().join("absent.toml"));
    assert!(!ok);
    assert!(
        err.contains("absent.toml") && err.contains("cannot read"),
        "{err}"
    );
    // serve refuses the same bad config at start.
    let path = dir.path().join("bad0.toml");
    let out = bin()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.request_timeout"));
}

#[test]
fn new_token_prints_a_256_bit_token_and_its_sha256() {
    let run = || {
        let out = bin().arg("new-token").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_string()
        };
        (field("token:"), field("token_sha256:"))
    };
    let (t1, h1) = run();
    let (t2, _) = run();
    assert_ne!(t1, t2);
    assert!(t1.len() >= 64, "at least 256 bits in hex");
    assert_eq!(h1, sha256_hex(&t1));
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "serve",
        "check-config",
        "new-token",
        "mock-upstream",
        "demo",
    ] {
        let out = bin().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{sub}: {text}");
    }
}

/// Seeds unique upstream keys and caller tokens, drives every path (errors
/// included) through the real binary, then searches the logs (at debug level),
/// every response header and body for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_secrets_never_leak_into_logs_or_responses() {
    let mock = mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Keys from a file and from the environment, as in production.
    let key_file = dir.path().join("acme.key");
    std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).unwrap();
    let text = config_toml(&mock.base_url(), "", "")
        .replacen(
            &format!("api_key = {{ value = \"{UPSTREAM_KEY}\" }}"),
            &format!("api_key = {{ file = \"{}\" }}", key_file.display()),
            2,
        )
        .replace(
            &format!("api_key = {{ value = \"{WRONG_UPSTREAM_KEY}\" }}"),
            "api_key = { env = \"CANARY_WRONG_KEY\" }",
        );
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(&cfg, text).unwrap();

    let served = Served::start(
        &cfg,
        &[
            ("RUST_LOG", "debug"),
            ("CANARY_WRONG_KEY", WRONG_UPSTREAM_KEY),
        ],
    );
    let listening = served.until_listening();
    let mut logs: String = listening.iter().map(|l| format!("{}\n", l.text)).collect();
    let addr = listening_field(&listening, "addr");
    let admin = listening_field(&listening, "admin");
    let base = format!("http://{addr}");
    let mut captured = String::new();
    let clients = [TestClient::http1(), TestClient::h2c()];
    let create = r#"{"name":"c","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://h/x"}}"#;
    for c in &clients {
        let rw = bearer(TOKEN_RW);
        let requests: Vec<(Method, String, Vec<(&str, &str)>, Option<&str>)> = vec![
            (
                Method::GET,
                "/app".into(),
                vec![("authorization", &rw)],
                None,
            ),
            (
                Method::GET,
                "/app".into(),
                vec![("x-api-key", TOKEN_RW), ("x-team-id", TEAM_ID)],
                None,
            ),
            (
                Method::POST,
                "/app".into(),
                vec![("authorization", &rw), ("content-type", "application/json")],
                Some(create),
            ),
            (
                Method::POST,
                "/app".into(),
                vec![("authorization", &rw)],
                Some("not json"),
            ),
            (
                Method::GET,
                "/app/missing-id".into(),
                vec![("authorization", &rw)],
                None,
            ),
            (
                Method::GET,
                "/app".into(),
                vec![("x-api-key", TOKEN_BROKEN)],
                None,
            ),
            (
                Method::GET,
                "/app".into(),
                vec![("x-api-key", TOKEN_RO)],
                None,
            ),
            (
                Method::POST,
                "/app".into(),
                vec![("x-api-key", TOKEN_RO)],
                Some("{}"),
            ),
            (
                Method::GET,
                "/app".into(),
                vec![("authorization", &rw), ("x-team-id", OTHER_TEAM_ID)],
                None,
            ),
            (
                Method::GET,
                "/app".into(),
                vec![("authorization", "Bearer canary-caller-token-unknown-77")],
                None,
            ),
            (
                Method::GET,
                "/nowhere".into(),
                vec![("authorization", &rw)],
                None,
            ),
            (
                Method::GET,
                "/app".into(),
                vec![
                    ("authorization", &rw),
                    ("cookie", "s=canary-caller-token-rw-8a1f2e"),
                ],
                None,
            ),
        ];
        for (method, path, headers, body) in requests {
            let r = c
                .send(method.clone(), &format!("{base}{path}"), &headers, body)
                .await;
            captured.push_str(&format!(
                "{method} {path} -> {} {:?} {}\n",
                r.status,
                r.headers,
                r.text()
            ));
        }
        // Upstream failures: 5xx, dropped connection, timeout.
        let faults = [
            Faults {
                fail_status: Some(503),
                ..Faults::default()
            },
            Faults {
                drop_connections: true,
                ..Faults::default()
            },
            Faults {
                latency_ms: 2_500,
                ..Faults::default()
            },
        ];
        for (i, fault) in faults.into_iter().enumerate() {
            mock.set_faults(fault);
            // A path never read before: a cache miss that must go upstream.
            let path = format!("/app/fault-{i}-{}", captured.len());
            let r = c
                .get(&format!("{base}{path}"), &[("authorization", &rw)])
                .await;
            assert!(r.status.is_server_error(), "{r:?}");
            captured.push_str(&format!(
                "fault -> {} {:?} {}\n",
                r.status,
                r.headers,
                r.text()
            ));
        }
        mock.set_faults(Faults::default());
    }
    // The admin API: metrics, the effective config, an unauthorized reload.
    let c = TestClient::http1();
    for path in ["/metrics", "/config", "/readyz"] {
        let r = c.get(&format!("http://{admin}{path}"), &[]).await;
        assert_eq!(r.status, http::StatusCode::OK);
        captured.push_str(&format!("admin {path} -> {:?} {}\n", r.headers, r.text()));
    }
    let r = c
        .send(
            Method::POST,
            &format!("http://{admin}/reload"),
            &[("authorization", TOKEN_RW)],
            None,
        )
        .await;
    captured.push_str(&format!("admin reload -> {} {}\n", r.status, r.text()));
    assert!(captured.contains("rungen_gateway_requests_total"));
    assert!(captured.contains("-> 200"));
    assert!(captured.contains("-> 401"));
    assert!(captured.contains("-> 403"));
    assert!(captured.contains("-> 502"));
    assert!(captured.contains("-> 504"));

    // SIGTERM: the gateway drains and exits 0.
    logs.push_str(&served.stop());
    assert!(logs.contains("shutdown signal received"), "{logs}");
    assert!(
        logs.contains("\"status\":200"),
        "the access log has lines: {logs}"
    );
    assert!(
        logs.contains("upstream rejected the gateway credential"),
        "{logs}"
    );
    // The access log's trace id is the one the upstream request carried.
    let mut traced = 0;
    for r in mock.requests() {
        let (Some(id), Some(tp)) = (r.header("x-request-id"), r.header("traceparent")) else {
            continue;
        };
        let line = logs
            .lines()
            .find(|l| l.contains(&format!("\"request_id\":\"{id}\"")))
            .unwrap_or_else(|| panic!("no access log line for request {id}: {logs}"));
        assert!(
            line.contains(&format!("\"trace_id\":\"{}\"", &tp[3..35])),
            "upstream traceparent {tp}, log line {line}"
        );
        traced += 1;
    }
    assert!(traced > 0, "no upstream request carried a traceparent");

    for canary in [
        UPSTREAM_KEY,
        WRONG_UPSTREAM_KEY,
        OTHER_UPSTREAM_KEY,
        TOKEN_RW,
        TOKEN_RO,
        TOKEN_BROKEN,
        ADMIN_TOKEN,
        "canary-caller-token-unknown-77",
    ] {
        assert!(!logs.contains(canary), "{canary} leaked into the logs");
        assert!(
            !captured.contains(canary),
            "{canary} leaked into a response"
        );
    }
    // The upstream saw the keys (so the canaries were really in play) and
    // never a caller token.
    let seen = format!("{:?}", mock.requests());
    assert!(seen.contains(UPSTREAM_KEY) && seen.contains(WRONG_UPSTREAM_KEY));
    for token in [TOKEN_RW, TOKEN_RO, TOKEN_BROKEN] {
        assert!(!seen.contains(token), "{token} reached the upstream");
    }
    mock.shutdown();
}

/// SIGHUP reloads the config: a client removed from the file is refused next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let mock = mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gateway.toml");
    let text =
        config_toml(&mock.base_url(), "", "").replace("poll_interval = \"200ms\"", "watch = false");
    std::fs::write(&cfg, &text).unwrap();
    let served = Served::start(&cfg, &[]);
    let listening = served.until_listening();
    let addr = listening_field(&listening, "addr");
    let c = TestClient::http1();
    let url = format!("http://{addr}/app");
    assert_eq!(
        c.get(&url, &[("x-api-key", TOKEN_RO)]).await.status,
        http::StatusCode::OK
    );

    let start = text.find("[[clients]]\nname = \"reader\"").unwrap();
    let end = start
        + text[start..]
            .find("[[clients]]\nname = \"misconfigured\"")
            .unwrap();
    std::fs::write(&cfg, format!("{}{}", &text[..start], &text[end..])).unwrap();
    served.signal("-HUP");
    let mut reloaded = false;
    while let Ok(line) = served.lines.recv_timeout(Duration::from_secs(10)) {
        if line.contains("config reloaded") {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "SIGHUP led to a reload");
    assert_eq!(
        c.get(&url, &[("x-api-key", TOKEN_RO)]).await.status,
        http::StatusCode::UNAUTHORIZED
    );
    served.stop();
    mock.shutdown();
}

/// A second SIGTERM during the drain stops at once (exit 1): an operator or a
/// supervisor that will not wait for a long drain_delay is not made to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_the_drain_stops_at_once() {
    let mock = mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gateway.toml");
    let text = config_toml(&mock.base_url(), "", "")
        .replace("drain_delay = \"0s\"", "drain_delay = \"60s\"");
    assert!(text.contains("drain_delay = \"60s\""));
    std::fs::write(&cfg, &text).unwrap();
    let mut served = Served::start(&cfg, &[]);
    served.until_listening();
    served.signal("-TERM");
    let mut draining = false;
    while let Ok(line) = served.lines.recv_timeout(Duration::from_secs(10)) {
        if line.contains("shutdown signal received") {
            draining = true;
            break;
        }
    }
    assert!(draining, "the first SIGTERM started the drain");
    // Still draining (60 s delay): alive.
    std::thread::sleep(Duration::from_millis(300));
    assert!(served.child.try_wait().unwrap().is_none());
    served.signal("-TERM");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the second SIGTERM did not stop the gateway"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "{status}");
    mock.shutdown();
}

/// `[server] worker_threads` sizes the runtime: 1 runs the single-thread
/// scheduler, more a multi-thread one with that many workers; both serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sets_the_runtime() {
    let mock = mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for (threads, scheduler) in [(1, "current_thread"), (3, "multi_thread")] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("gateway.toml");
        let text = config_toml(&mock.base_url(), &format!("worker_threads = {threads}"), "");
        std::fs::write(&cfg, &text).unwrap();
        let served = Served::start(&cfg, &[]);
        let logged = served.until_listening();
        let addr = listening_field(&logged, "addr");
        let runtime = logged.iter().find(|l| l.json["message"] == "async runtime");
        let runtime = &runtime
            .expect("the runtime is logged before the listener")
            .json;
        assert_eq!(runtime["worker_threads"], threads, "{runtime}");
        assert_eq!(runtime["scheduler"], scheduler, "{runtime}");
        if threads > 1 {
            // tokio starts every worker up front ("tokio-rt-worker"), each
            // naming itself once it runs: on a busy machine the last may not
            // have yet when the listener is up.
            let pid = served.child.id();
            let workers = || {
                std::fs::read_dir(format!("/proc/{pid}/task"))
                    .unwrap()
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|comm| comm.starts_with("tokio-rt-worker"))
                    .count()
            };
            let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while workers() < threads && std::time::Instant::now() < until {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let workers = workers();
            assert!(workers >= threads, "{workers} runtime threads");
        }
        let c = TestClient::http1();
        let url = format!("http://{addr}/app");
        for _ in 0..3 {
            assert_eq!(
                c.get(&url, &[("x-api-key", TOKEN_RO)]).await.status,
                http::StatusCode::OK
            );
        }
        served.stop();
    }
    mock.shutdown();
}
