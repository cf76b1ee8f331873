//! End to end: the real gateway in front of the mock upstream, over real
//! HTTP/1.1 and h2c on 127.0.0.1, counting what reached the upstream.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod common;

use common::*;
use http::{Method, StatusCode};
use rungen_gateway::mock_upstream::Faults;
use std::time::Duration;

/// Every RunGen endpoint through the gateway; the mock sees the scope's key
/// and team id, never the caller's token.
async fn all_endpoints(client: TestClient) {
    let h = Harness::start().await;
    let auth = bearer(TOKEN_RW);
    let team = [("authorization", auth.as_str()), ("x-team-id", TEAM_ID)];

    // E2 create (team scope)
    let body = r#"{"name":"e2e","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://huggingface.co/x"}}"#;
    let r = client
        .send(
            Method::POST,
            &h.url("/app"),
            &[
                ("authorization", auth.as_str()),
                ("x-team-id", TEAM_ID),
                ("content-type", "application/json"),
            ],
            Some(body),
        )
        .await;
    assert!(r.status.is_success(), "{r:?}");
    let app = r.json()["data"].clone();
    let app_id = app["id"].as_str().unwrap().to_string();
    assert_eq!(app["owner_team_id"], TEAM_ID);

    // E1 list: the new app is in the team list, not in the personal list
    let r = client.get(&h.url("/app"), &team).await;
    assert_eq!(r.status, StatusCode::OK);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&app_id));
    let r = client
        .get(&h.url("/app"), &[("authorization", auth.as_str())])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        !r.text().contains(&app_id),
        "personal scope must not list team apps"
    );

    // E3 get
    let r = client.get(&h.url(&format!("/app/{app_id}")), &team).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["data"]["id"], app_id.as_str());

    // E4 update
    let r = client
        .send(
            Method::PUT,
            &h.url(&format!("/app/{app_id}")),
            &[
                ("authorization", auth.as_str()),
                ("x-team-id", TEAM_ID),
                ("content-type", "application/json"),
            ],
            Some(r#"{"configuration":{"active_workers":1}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.json()["data"]["status"], "RUNNING");

    // E6 run_async
    let r = client
        .send(
            Method::POST,
            &h.url(&format!("/app/{app_id}/run_async")),
            &[
                ("authorization", auth.as_str()),
                ("x-team-id", TEAM_ID),
                ("content-type", "application/json"),
            ],
            Some(r#"{"input":{"prompt":"a cat"}}"#),
        )
        .await;
    assert!(r.status.is_success(), "{r:?}");
    let job_id = r.json()["data"]["id"].as_str().unwrap().to_string();

    // E7 job status
    let job_path = format!("/app/{app_id}/job/{job_id}");
    let r = client.get(&h.url(&job_path), &team).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["data"]["id"], job_id.as_str());

    // E8 cancel (the job is still queued or in progress)
    let r = client
        .send(Method::PUT, &h.url(&job_path), &team, None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.json()["data"]["status"], "CANCELED");
    // A second cancel: the upstream's 409 passes through unchanged.
    let r = client
        .send(Method::PUT, &h.url(&job_path), &team, None)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.error_message().contains("cannot be canceled"));

    // E5 delete, then the upstream's 404 passes through
    let r = client
        .send(
            Method::DELETE,
            &h.url(&format!("/app/{app_id}")),
            &team,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
    let r = client.get(&h.url(&format!("/app/{app_id}")), &team).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // What reached the upstream: the scope's key, the team id for team
    // requests, and never the caller's token.
    let recorded = h.mock.requests();
    assert_eq!(recorded.len(), 11, "{recorded:#?}");
    for req in &recorded {
        assert_eq!(req.header("x-api-key"), Some(UPSTREAM_KEY), "{req:?}");
        assert!(req.header("authorization").is_none());
        assert!(req.header("x-request-id").is_some());
        let all = format!("{req:?}");
        assert!(
            !all.contains(TOKEN_RW),
            "caller token reached the upstream: {all}"
        );
    }
    let personal = recorded
        .iter()
        .filter(|r| r.header("x-team-id").is_none())
        .count();
    assert_eq!(personal, 1, "only the personal list went without x-team-id");
    let stats = h.mock.stats();
    assert_eq!(stats.by_route.get("GET /app"), Some(&2));
    assert_eq!(stats.by_route.get("PUT /app/{id}/job/{job_id}"), Some(&2));
    h.stop().await;
}

#[tokio::test]
async fn every_endpoint_over_http1() {
    all_endpoints(TestClient::http1()).await;
}

#[tokio::test]
async fn every_endpoint_over_h2c() {
    all_endpoints(TestClient::h2c()).await;
}

#[tokio::test]
async fn x_api_key_works_as_the_caller_credential() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    let r = c.get(&h.url("/app"), &[("x-api-key", TOKEN_RO)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = h.mock.requests();
    assert_eq!(seen.len(), 1);
    // The reader's only scope is acme: its default.
    assert_eq!(seen[0].header("x-team-id"), Some(TEAM_ID));
    assert_eq!(seen[0].header("x-api-key"), Some(UPSTREAM_KEY));
    h.stop().await;
}

#[tokio::test]
async fn refusals_have_their_status_and_json_and_reach_nothing_upstream() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    let ro = bearer(TOKEN_RO);
    let cases: Vec<(Method, &str, Vec<(&str, &str)>, StatusCode)> = vec![
        (Method::GET, "/app", vec![], StatusCode::UNAUTHORIZED),
        (
            Method::GET,
            "/app",
            vec![("authorization", "Bearer not-a-known-token")],
            StatusCode::UNAUTHORIZED,
        ),
        (
            Method::GET,
            "/app",
            vec![("x-api-key", "not-a-known-token")],
            StatusCode::UNAUTHORIZED,
        ),
        (
            Method::GET,
            "/app",
            vec![("authorization", "Basic Zm9vOmJhcg==")],
            StatusCode::UNAUTHORIZED,
        ),
        // A team this client may not use.
        (
            Method::GET,
            "/app",
            vec![("authorization", rw.as_str()), ("x-team-id", OTHER_TEAM_ID)],
            StatusCode::FORBIDDEN,
        ),
        // A method this client may not use.
        (
            Method::POST,
            "/app",
            vec![("authorization", ro.as_str())],
            StatusCode::FORBIDDEN,
        ),
        (
            Method::DELETE,
            "/app/x",
            vec![("authorization", ro.as_str())],
            StatusCode::FORBIDDEN,
        ),
        // Not under a forwarded prefix: not an open proxy.
        (
            Method::GET,
            "/admin",
            vec![("authorization", rw.as_str())],
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/apple",
            vec![("authorization", rw.as_str())],
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/app/%2e%2e/admin",
            vec![("authorization", rw.as_str())],
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/app//x",
            vec![("authorization", rw.as_str())],
            StatusCode::BAD_REQUEST,
        ),
        // `..;` is `..` to some upstream stacks (Tomcat, Spring).
        (
            Method::GET,
            "/app/..;/admin",
            vec![("authorization", rw.as_str())],
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::TRACE,
            "/app",
            vec![("authorization", rw.as_str())],
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ];
    for (method, path, headers, want) in cases {
        let r = c.send(method.clone(), &h.url(path), &headers, None).await;
        assert_eq!(r.status, want, "{method} {path} {headers:?}: {r:?}");
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(!r.error_message().is_empty());
        assert!(r.headers.contains_key("x-request-id"));
        if want == StatusCode::UNAUTHORIZED {
            assert!(
                r.headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer")
            );
        }
    }
    assert_eq!(h.mock.stats().total, 0, "no refusal may reach the upstream");
    h.stop().await;
}

#[tokio::test]
async fn upstream_403_is_a_502_naming_the_scope_not_the_key() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    let r = c.get(&h.url("/app"), &[("x-api-key", TOKEN_BROKEN)]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let msg = r.error_message();
    assert_eq!(
        msg,
        "upstream rejected the gateway credential for scope broken"
    );
    assert!(!r.text().contains(WRONG_UPSTREAM_KEY));
    // The mock did see the (wrong) key: the request went upstream once.
    assert_eq!(h.mock.stats().total, 1);
    // An upstream failure is an answer like any other to the steps above
    // the cache: the caller's RateLimit fields, and its client, scope and
    // route in the request metrics (and the access log).
    assert!(r.headers.contains_key("ratelimit"), "{:?}", r.headers);
    assert!(r.headers.contains_key("ratelimit-policy"));
    let metrics = c
        .get(
            &format!("http://{}/metrics", h.gateway().admin_addr().unwrap()),
            &[],
        )
        .await
        .text();
    // (The recorder is the process's: other tests' series are there too.)
    let labels = [
        "status_class=\"5xx\"",
        "client=\"misconfigured\"",
        "scope=\"broken\"",
        "route=\"/app\"",
    ];
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rungen_gateway_requests_total{")
                && labels.iter().all(|label| l.contains(label))),
        "no requests_total series with {labels:?}:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("rungen_gateway_requests_total{"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    h.stop().await;
}

/// An upstream that answers a bad key with 401 instead: the same 502, and no
/// upstream `WWW-Authenticate` that would make the caller doubt its own token.
#[tokio::test]
async fn upstream_401_is_a_502_too() {
    let mock = rungen_gateway::mock_upstream::start(
        rungen_gateway::mock_upstream::MockConfig {
            invalid_key_status: 401,
            ..mock_config()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let text = config_toml(&mock.base_url(), "", "");
    let config =
        rungen_gateway::config::Config::from_toml(std::path::Path::new("t.toml"), &text).unwrap();
    let g = rungen_gateway::server::start(config).await.unwrap();
    let c = TestClient::http1();
    let url = format!("http://{}/app", g.local_addr());
    let r = c.get(&url, &[("x-api-key", TOKEN_BROKEN)]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.error_message(),
        "upstream rejected the gateway credential for scope broken"
    );
    assert_eq!(r.headers.get("www-authenticate"), None);
    assert_eq!(mock.stats().total, 1);
    // A good key is still served.
    let r = c.get(&url, &[("x-api-key", TOKEN_RW)]).await;
    assert_eq!(r.status, StatusCode::OK);
    g.stop().await;
    mock.shutdown();
}

#[tokio::test]
async fn unreachable_upstream_is_a_502() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mock = rungen_gateway::mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let text = config_toml(&format!("http://127.0.0.1:{port}"), "", "");
    let config =
        rungen_gateway::config::Config::from_toml(std::path::Path::new("t.toml"), &text).unwrap();
    let g = rungen_gateway::server::start(config).await.unwrap();
    let c = TestClient::http1();
    let r = c
        .get(
            &format!("http://{}/app", g.local_addr()),
            &[("x-api-key", TOKEN_RW)],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_message(), "could not connect to the upstream API");
    g.stop().await;
    mock.shutdown();
}

#[tokio::test]
async fn slow_upstream_is_a_504_and_a_dropped_connection_a_502() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    h.mock.set_faults(Faults {
        latency_ms: 3_000, // request_timeout is 2s in the test config
        ..Faults::default()
    });
    let started = std::time::Instant::now();
    let r = c.get(&h.url("/app"), &[("x-api-key", TOKEN_RW)]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_message(), "the upstream API did not answer in time");
    assert!(started.elapsed() < Duration::from_secs(3));

    h.mock.set_faults(Faults {
        drop_connections: true,
        ..Faults::default()
    });
    let r = c.get(&h.url("/app"), &[("x-api-key", TOKEN_RW)]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");

    // Upstream errors that are answers (500) pass through as they are.
    h.mock.set_faults(Faults {
        fail_status: Some(500),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app"), &[("x-api-key", TOKEN_RW)]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    h.stop().await;
}

#[tokio::test]
async fn oversized_requests_are_refused_before_the_upstream() {
    let h = Harness::start_with(
        "max_body_bytes = 1024\nmax_uri_bytes = 256\nmax_headers = 20\nmax_header_bytes = 8192",
        "",
    )
    .await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    let auth = [("authorization", rw.as_str())];

    let big = "x".repeat(2048);
    let r = c
        .send(Method::POST, &h.url("/app"), &auth, Some(&big))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!r.error_message().is_empty());

    let long = format!("/app/{}", "a".repeat(300));
    let r = c.get(&h.url(&long), &auth).await;
    assert_eq!(r.status, StatusCode::URI_TOO_LONG);
    assert!(!r.error_message().is_empty());

    // Too many header fields, and one huge header: hyper answers 431.
    let many: Vec<(String, String)> = (0..40).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let mut headers: Vec<(&str, &str)> =
        many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    headers.push(("authorization", rw.as_str()));
    let r = raw_status(h.addr, &headers).await;
    assert_eq!(r, 431);
    let huge = "y".repeat(10_000);
    let r = raw_status(
        h.addr,
        &[("authorization", rw.as_str()), ("x-huge", huge.as_str())],
    )
    .await;
    assert_eq!(r, 431);

    assert_eq!(h.mock.stats().total, 0);
    h.stop().await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start_with("max_body_bytes = 1024\nallow_chunked_requests = true", "").await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut req = format!(
        "POST /app HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN_RW}\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n"
    );
    for _ in 0..4 {
        req.push_str("400\r\n");
        req.push_str(&"z".repeat(0x400));
        req.push_str("\r\n");
    }
    req.push_str("0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // The upstream may have seen the start of the request, but never a complete
    // oversized body.
    for r in h.mock.requests() {
        assert!(r.body.len() <= 1024);
    }
    h.stop().await;
}

/// Sends a raw HTTP/1.1 GET /app with the given headers; returns the status code.
async fn raw_status(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = String::from("GET /app HTTP/1.1\r\nhost: gateway\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn request_id_is_kept_when_valid_and_generated_otherwise() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    let r = c
        .get(
            &h.url("/app"),
            &[("x-api-key", TOKEN_RW), ("x-request-id", "trace-abc.123")],
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "trace-abc.123");
    assert_eq!(
        h.mock.requests()[0].header("x-request-id"),
        Some("trace-abc.123")
    );
    let r = c
        .get(
            &h.url("/app/second"),
            &[
                ("x-api-key", TOKEN_RW),
                ("x-request-id", "bad id\"with<junk>"),
            ],
        )
        .await;
    let id = r.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    // W3C traceparent: a fresh one upstream, whose trace id is the request id...
    let seen = h.mock.requests();
    let tp = seen[1].header("traceparent").unwrap();
    assert!(tp.starts_with(&format!("00-{id}-")), "{tp}");
    // ...and a caller's valid one is continued as it is.
    let caller_tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    c.get(
        &h.url("/app/traced"),
        &[("x-api-key", TOKEN_RW), ("traceparent", caller_tp)],
    )
    .await;
    assert_eq!(h.mock.requests()[2].header("traceparent"), Some(caller_tp));
    // A caller's own request id that is no trace id: a valid traceparent
    // with a random trace id upstream, and the caller's tracestate dropped.
    let tp = h.mock.requests()[0]
        .header("traceparent")
        .unwrap()
        .to_string();
    assert!(
        rungen_gateway::telemetry::valid_traceparent(tp.as_bytes()),
        "{tp}"
    );
    // An invalid caller traceparent is replaced by one from the request id.
    let r = c
        .get(
            &h.url("/app/retraced"),
            &[
                ("x-api-key", TOKEN_RW),
                ("traceparent", "00-zz-bad-01"),
                ("tracestate", "vendor=1"),
            ],
        )
        .await;
    let id = r.headers["x-request-id"].to_str().unwrap();
    let seen = h.mock.requests();
    let tp = seen[3].header("traceparent").unwrap();
    assert!(tp.starts_with(&format!("00-{id}-")), "{tp}");
    assert!(rungen_gateway::telemetry::valid_traceparent(tp.as_bytes()));
    assert_eq!(seen[3].header("tracestate"), None);
    // A caller's Connection header cannot take the gateway's correlation
    // headers off the upstream request (it is hop-by-hop for the caller's
    // hop only).
    let r = c
        .get(
            &h.url("/app/connection-named"),
            &[
                ("x-api-key", TOKEN_RW),
                ("x-request-id", "trace-def.456"),
                ("connection", "x-request-id, traceparent"),
            ],
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "trace-def.456");
    let sent = h.mock.requests().last().cloned().unwrap();
    assert_eq!(sent.header("x-request-id"), Some("trace-def.456"));
    assert!(sent.header("traceparent").is_some());
    h.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_in_flight_request() {
    let h = Harness::start().await;
    h.mock.set_faults(Faults {
        latency_ms: 700,
        ..Faults::default()
    });
    let c = TestClient::http1();
    let url = h.url("/app");
    let in_flight = tokio::spawn(async move { c.get(&url, &[("x-api-key", TOKEN_RW)]).await });
    // Let the request reach the upstream, then begin the shutdown.
    for _ in 0..100 {
        if h.mock.stats().total > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.mock.stats().total, 1);
    let addr = h.addr;
    let mut h = h;
    let gateway = h.gateway.take().unwrap();
    gateway.shutdown();
    let r = in_flight.await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the in-flight request must complete"
    );
    gateway.wait().await;
    // After the drain, the listener is closed.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    h.stop().await;
}

/// Headers some upstream stacks take as the real method or URL never reach
/// the upstream: a read-only caller cannot turn its GET into a DELETE, nor
/// point it outside the forwarded prefix, with the gateway's key attached.
#[tokio::test]
async fn method_and_url_overrides_never_reach_the_upstream() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    let overrides = [
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-original-method", "DELETE"),
        ("x-original-url", "/admin/keys"),
        ("x-rewrite-url", "/admin/keys"),
    ];
    let ro = bearer(TOKEN_RO);
    let mut headers = vec![("authorization", ro.as_str())];
    headers.extend(overrides);
    let r = c.get(&h.url("/app"), &headers).await;
    assert_eq!(r.status, StatusCode::OK);
    let sent = h.mock.requests().last().unwrap().clone();
    for (name, _) in overrides {
        assert_eq!(sent.header(name), None, "{name} reached the upstream");
    }
    h.stop().await;
}

/// Team ids are UUIDs: the caller's `x-team-id` picks its team in any letter
/// case, and the upstream gets the id as configured.
#[tokio::test]
async fn a_team_id_in_capitals_picks_the_same_team() {
    let h = Harness::start().await;
    let c = TestClient::http1();
    let upper = TEAM_ID.to_ascii_uppercase();
    assert_ne!(upper, TEAM_ID);
    let r = c
        .get(
            &h.url("/app"),
            &[("authorization", &bearer(TOKEN_RO)), ("x-team-id", &upper)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        h.mock.requests().last().unwrap().header("x-team-id"),
        Some(TEAM_ID)
    );
    h.stop().await;
}
