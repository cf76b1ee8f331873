//! Browser front-ends over HTTP: CORS preflight and headers, origin-bound
//! public clients, and signed short-lived tokens (HMAC and JWKS).
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod common;

use base64::Engine;
use common::*;
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::time::{SystemTime, UNIX_EPOCH};

const PAGE: &str = "http://127.0.0.1:4321";
const OTHER_PAGE: &str = "http://127.0.0.1:4322";
const JWT_SECRET: &str = "canary-jwt-secret-0123456789abcdef0123";

fn sections(extra_jwt: &str) -> String {
    format!(
        r#"
[[clients]]
name = "dashboard"
public = true
allowed_origins = ["{PAGE}"]
teams = ["acme"]
ip_rate_limit = {{ per_minute = 600, burst = 100 }}

[[clients]]
name = "web-users"
allowed_origins = ["{PAGE}"]
teams = ["personal", "acme"]
methods = ["GET", "HEAD", "POST"]
jwt = {{ issuer = "https://auth.test", audience = "rungen-gateway", hmac_secret = {{ value = "{JWT_SECRET}" }}, scopes_claim = "teams", leeway = "5s" }}
{extra_jwt}
"#
    )
}

/// The gateway with the browser clients (`sections(extra_jwt)`), real time.
async fn start(extra_jwt: &str) -> Harness {
    Harness::start_full(
        "",
        "",
        &sections(extra_jwt),
        std::sync::Arc::new(rungen_gateway::clock::SystemClock),
    )
    .await
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn claims(exp_in: i64) -> serde_json::Value {
    serde_json::json!({
        "iss": "https://auth.test",
        "aud": "rungen-gateway",
        "sub": "user-42",
        "exp": (now() as i64 + exp_in),
        "teams": ["acme"],
    })
}

fn header(r: &Reply, name: &str) -> String {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn preflight_is_answered_before_auth_for_allowed_origins_only() {
    let h = start("").await;
    let c = TestClient::http1();
    let r = c
        .send(
            Method::OPTIONS,
            &h.url("/app"),
            &[
                ("origin", PAGE),
                ("access-control-request-method", "GET"),
                (
                    "access-control-request-headers",
                    "authorization, x-team-id, x-evil",
                ),
            ],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "access-control-allow-origin"), PAGE);
    let methods = header(&r, "access-control-allow-methods");
    assert!(
        methods.contains("GET") && methods.contains("POST"),
        "{methods}"
    );
    assert_eq!(
        header(&r, "access-control-allow-headers"),
        "authorization, x-team-id"
    );
    assert!(header(&r, "vary").contains("origin"));
    let r = c
        .send(
            Method::OPTIONS,
            &h.url("/app"),
            &[
                ("origin", OTHER_PAGE),
                ("access-control-request-method", "GET"),
            ],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(header(&r, "access-control-allow-origin").is_empty());
    assert_eq!(h.mock.stats().total, 0);
    h.stop().await;
}

#[tokio::test]
async fn public_client_is_matched_by_origin_read_only_and_gets_cors_headers() {
    let h = start("").await;
    let c = TestClient::http1();
    let r = c.get(&h.url("/app"), &[("origin", PAGE)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(header(&r, "access-control-allow-origin"), PAGE);
    let exposed = header(&r, "access-control-expose-headers");
    for name in [
        "RateLimit",
        "RateLimit-Policy",
        "Retry-After",
        "Cache-Status",
        "Age",
        "ETag",
        "x-request-id",
    ] {
        assert!(exposed.contains(name), "{exposed}");
    }
    assert!(header(&r, "ratelimit").starts_with("\"caller"));
    assert_eq!(h.mock.requests()[0].header("x-team-id"), Some(TEAM_ID));
    // Read-only by default.
    let r = c
        .send(
            Method::POST,
            &h.url("/app"),
            &[("origin", PAGE)],
            Some("{}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        header(&r, "access-control-allow-origin"),
        PAGE,
        "errors carry CORS headers too"
    );
    // Another origin: 403 and no CORS headers.
    let r = c.get(&h.url("/app"), &[("origin", OTHER_PAGE)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(header(&r, "access-control-allow-origin").is_empty());
    // A token client without that origin in its list: served, but no CORS headers.
    let r = c
        .get(
            &h.url("/app"),
            &[("origin", PAGE), ("authorization", &bearer(TOKEN_RW))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(header(&r, "access-control-allow-origin").is_empty());
    // Never an echo of our upstream credentials.
    assert!(!format!("{:?}", r.headers).contains(UPSTREAM_KEY));
    h.stop().await;
}

#[tokio::test]
async fn signed_tokens_are_verified_and_narrow_the_scopes() {
    let h = start("").await;
    let c = TestClient::http1();
    let fresh = hs256(claims(60), JWT_SECRET);
    let r = c
        .get(
            &h.url("/app"),
            &[
                ("origin", PAGE),
                ("authorization", &format!("Bearer {fresh}")),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(header(&r, "access-control-allow-origin"), PAGE);
    // The token's teams claim grants acme only: that is its default scope...
    assert_eq!(
        h.mock.requests().last().unwrap().header("x-team-id"),
        Some(TEAM_ID)
    );
    // ...and the client's personal scope is refused.
    let r = c
        .get(
            &h.url("/app"),
            &[
                ("authorization", &format!("Bearer {fresh}")),
                ("x-team-id", "personal"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let refused = |token: String| {
        let c = c.clone();
        let url = h.url("/app");
        async move {
            let r = c
                .get(
                    &url,
                    &[
                        ("origin", PAGE),
                        ("authorization", &format!("Bearer {token}")),
                    ],
                )
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{token}");
            assert!(
                !r.error_message().contains("expired"),
                "the reason helps no attacker"
            );
            assert_eq!(
                header(&r, "access-control-allow-origin"),
                PAGE,
                "a 401 is readable by the page"
            );
        }
    };
    refused(hs256(claims(-120), JWT_SECRET)).await; // expired
    refused(hs256(claims(60), "another-secret-another-secret-xx")).await; // bad signature
    let mut aud = claims(60);
    aud["aud"] = "someone-else".into();
    refused(hs256(aud, JWT_SECRET)).await;
    let mut iss = claims(60);
    iss["iss"] = "https://evil.test".into();
    refused(hs256(iss, JWT_SECRET)).await;
    let mut nbf = claims(60);
    nbf["nbf"] = (now() + 600).into();
    refused(hs256(nbf, JWT_SECRET)).await;
    // A small clock skew is allowed.
    let r = c
        .get(
            &h.url("/app"),
            &[(
                "authorization",
                &format!("Bearer {}", hs256(claims(-2), JWT_SECRET)),
            )],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    h.stop().await;
}

/// Past its failed-auth limit, a source IP's signed tokens are refused before
/// their signature is checked: even a valid one gets 429 (a public-key check
/// costs tens of microseconds; a flood of forged tokens must not buy them).
/// Opaque tokens, a cheap lookup, are still served.
#[tokio::test]
async fn an_ip_past_its_failed_auth_limit_buys_no_signature_checks() {
    let h = start("\n[rate_limit]\nunauthenticated = { per_minute = 3, burst = 3 }\n").await;
    let c = TestClient::http1();
    let get = async |token: &str| {
        c.get(
            &h.url("/app"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await
    };
    let valid = hs256(claims(60), JWT_SECRET);
    assert_eq!(get(&valid).await.status, StatusCode::OK);
    let forged = hs256(claims(60), "another-secret-another-secret-xx");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(&forged).await.status.as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
    let r = get(&valid).await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "refused without a signature check, so even a valid token is"
    );
    let wait: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    assert!(r.error_message().contains("rate"), "{}", r.error_message());
    assert_eq!(get(TOKEN_RW).await.status, StatusCode::OK);
    h.stop().await;
}

/// An ES256 key pair from rcgen, as a signing key and a JWK.
fn ec_key(kid: &str) -> (EncodingKey, serde_json::Value) {
    let kp = rcgen::KeyPair::generate().unwrap();
    let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let raw = kp.public_key_raw(); // 0x04 || X || Y
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
    });
    (enc, jwk)
}

fn es256(kid: &str, key: &EncodingKey, claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

#[tokio::test]
async fn jwks_keys_by_kid_and_rotation_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let (k1, jwk1) = ec_key("k1");
    let (k2, jwk2) = ec_key("k2");
    std::fs::write(&jwks, serde_json::json!({"keys": [jwk1]}).to_string()).unwrap();
    let extra = format!(
        "\n[[clients]]\nname = \"partner-web\"\nteams = [\"acme\"]\njwt = {{ issuer = \"https://partner.test\", audience = \"rungen-gateway\", jwks_file = \"{}\" }}\n",
        jwks.display()
    );
    let mock = rungen_gateway::mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        config_toml_with(&mock.base_url(), "", "", &sections(&extra)),
    )
    .unwrap();
    let g = rungen_gateway::server::start(rungen_gateway::config::Config::load(&cfg).unwrap())
        .await
        .unwrap();
    let url = format!("http://{}/app", g.local_addr());
    let c = TestClient::http1();
    let mut partner = claims(60);
    partner["iss"] = "https://partner.test".into();
    let get = |t: String| {
        let c = c.clone();
        let url = url.clone();
        async move {
            c.get(&url, &[("authorization", &format!("Bearer {t}"))])
                .await
                .status
        }
    };
    // One token string throughout (an ES256 signature differs each time it is
    // made): the gateway remembers it as verified, and the reload must not.
    let t1 = es256("k1", &k1, partner.clone());
    assert_eq!(get(t1.clone()).await, StatusCode::OK);
    assert_eq!(get(t1.clone()).await, StatusCode::OK, "remembered");
    assert_eq!(
        get(es256("k2", &k2, partner.clone())).await,
        StatusCode::UNAUTHORIZED,
        "unknown kid"
    );
    assert_eq!(
        get(es256("k1", &k2, partner.clone())).await,
        StatusCode::UNAUTHORIZED,
        "wrong key for kid"
    );
    // An HS256 token "signed" with the public key material is refused (no algorithm confusion).
    assert_eq!(
        get(hs256(partner.clone(), "k1")).await,
        StatusCode::UNAUTHORIZED
    );
    // Rotation: the new key set replaces the old on reload.
    std::fs::write(&jwks, serde_json::json!({"keys": [jwk2]}).to_string()).unwrap();
    g.state().reload().await.unwrap();
    assert_eq!(get(es256("k2", &k2, partner.clone())).await, StatusCode::OK);
    assert_eq!(
        get(t1).await,
        StatusCode::UNAUTHORIZED,
        "verified before the rotation, by a key no longer trusted"
    );
    g.stop().await;
    mock.shutdown();
}

#[test]
fn config_errors_for_browser_clients() {
    let base = config_toml("https://api.rungen.ai", "", "");
    let bad = [
        (
            "[[clients]]\nname = \"p\"\npublic = true\nteams = [\"acme\"]\n",
            "allowed_origins",
        ),
        (
            "[[clients]]\nname = \"p\"\npublic = true\nallowed_origins = [\"https://*.example.com\"]\nteams = [\"acme\"]\n",
            "allowed_origins[0]",
        ),
        (
            "[[clients]]\nname = \"p\"\npublic = true\nallowed_origins = [\"https://a.example/app\"]\nteams = [\"acme\"]\n",
            "allowed_origins[0]",
        ),
        (
            "[[clients]]\nname = \"j\"\nteams = [\"acme\"]\njwt = { issuer = \"i\", audience = \"a\", hmac_secret = { value = \"short\" } }\n",
            "jwt.hmac_secret",
        ),
        (
            "[[clients]]\nname = \"j\"\nteams = [\"acme\"]\njwt = { issuer = \"i\", audience = \"a\" }\n",
            "clients[3].jwt",
        ),
        (
            "[[clients]]\nname = \"j\"\nteams = [\"acme\"]\njwt = { issuer = \"i\", audience = \"a\", jwks_file = \"/nonexistent/jwks.json\" }\n",
            "jwt.jwks_file",
        ),
    ];
    for (extra, field) in bad {
        let text = format!("{base}\n{extra}");
        let err = rungen_gateway::config::Config::from_toml(std::path::Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{extra}: {err}");
    }
}

/// Serves whatever `body` currently holds at every path; returns the URL.
async fn serve_jwks(body: std::sync::Arc<std::sync::Mutex<String>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let text = body.lock().unwrap().clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(text)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}/jwks.json")
}

/// A gateway with the `sso-web` client, whose keys come from `jwks_url`
/// every `refresh`; and the config sections that made it.
async fn sso_gateway(jwks_url: &str, refresh: &str) -> (Harness, String) {
    let extra = format!(
        "\n[[clients]]\nname = \"sso-web\"\nteams = [\"acme\"]\njwt = {{ issuer = \"https://sso.test\", audience = \"rungen-gateway\", jwks_url = \"{jwks_url}\", jwks_refresh = \"{refresh}\" }}\n"
    );
    let h = start(&extra).await;
    (h, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_and_refreshed() {
    let (k1, jwk1) = ec_key("u1");
    let (k2, jwk2) = ec_key("u2");
    let doc = std::sync::Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [jwk1]}).to_string(),
    ));
    let url = serve_jwks(doc.clone()).await;
    let (h, _) = sso_gateway(&url, "200ms").await;
    let c = TestClient::http1();
    let mut sso = claims(60);
    sso["iss"] = "https://sso.test".into();
    let status = |t: String| {
        let c = c.clone();
        let url = h.url("/app");
        async move {
            c.get(&url, &[("authorization", &format!("Bearer {t}"))])
                .await
                .status
        }
    };
    let wait_for = |want: StatusCode, t: String| async move {
        for _ in 0..100 {
            if status(t.clone()).await == want {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("never got {want}");
    };
    // The same token strings throughout: an accepted token is remembered as
    // verified, and a rotation must end that.
    let t1 = es256("u1", &k1, sso.clone());
    let t2 = es256("u2", &k2, sso);
    wait_for(StatusCode::OK, t1.clone()).await;
    assert_eq!(status(t2.clone()).await, StatusCode::UNAUTHORIZED);
    // The identity provider rotates its keys: picked up at the next refresh.
    *doc.lock().unwrap() = serde_json::json!({"keys": [jwk2]}).to_string();
    wait_for(StatusCode::OK, t2).await;
    assert_eq!(
        status(t1).await,
        StatusCode::UNAUTHORIZED,
        "verified before the rotation, by a key no longer published"
    );
    h.stop().await;
}

/// A config reload (any reload: SIGHUP, a rotated team key file) does not
/// drop the JWKS keys a `jwks_url` client verified with a moment ago, even
/// when the identity provider cannot be reached just then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_keys_fetched_from_a_jwks_url() {
    let (k1, jwk1) = ec_key("u1");
    let doc = std::sync::Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [jwk1]}).to_string(),
    ));
    let url = serve_jwks(doc.clone()).await;
    let (h, extra) = sso_gateway(&url, "1h").await;
    let c = TestClient::http1();
    let mut sso = claims(600);
    sso["iss"] = "https://sso.test".into();
    let token = es256("u1", &k1, sso);
    let status = || {
        let c = c.clone();
        let url = h.url("/app");
        let t = token.clone();
        async move {
            c.get(&url, &[("authorization", &format!("Bearer {t}"))])
                .await
                .status
        }
    };
    let mut ok = false;
    for _ in 0..100 {
        if status().await == StatusCode::OK {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ok, "the JWKS was never fetched");
    // The identity provider has a blip (the keys did not change).
    *doc.lock().unwrap() = "503 upstream unavailable".to_string();
    // An unrelated reload (same config).
    let text = config_toml_with(&h.mock.base_url(), "", "", &sections(&extra));
    let config =
        rungen_gateway::config::Config::from_toml(std::path::Path::new("test.toml"), &text)
            .unwrap();
    h.gateway().state().apply(config).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = status().await;
    h.stop().await;
    assert_eq!(
        after,
        StatusCode::OK,
        "after a reload, a JWKS client whose keys were fine is refused until the next refresh (1h)"
    );
}

/// CORS is the gateway's to answer: the upstream's own `Access-Control-*`
/// headers (here a wildcard with credentials) never reach a caller, cached or
/// not, so an origin no client allows gets no `Access-Control-Allow-Origin`.
#[tokio::test]
async fn the_upstreams_cors_headers_never_reach_callers() {
    let h = start("").await;
    h.mock.set_faults(rungen_gateway::mock_upstream::Faults {
        extra_response_headers: vec![
            ("access-control-allow-origin".into(), "*".into()),
            ("access-control-allow-credentials".into(), "true".into()),
            ("access-control-expose-headers".into(), "x-secret".into()),
        ],
        ..Default::default()
    });
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RO);
    for _ in 0..2 {
        // A miss, then a hit.
        let r = c
            .get(
                &h.url("/app"),
                &[("authorization", &auth), ("origin", "https://evil.example")],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        for name in [
            "access-control-allow-origin",
            "access-control-allow-credentials",
            "access-control-expose-headers",
        ] {
            assert_eq!(header(&r, name), "", "{name} for a disallowed origin");
        }
    }
    // The public dashboard client's page: the gateway's own answer.
    let r = c.get(&h.url("/app"), &[("origin", PAGE)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(header(&r, "access-control-allow-origin"), PAGE);
    assert_eq!(header(&r, "access-control-allow-credentials"), "");
    assert!(!header(&r, "access-control-expose-headers").contains("x-secret"));
    h.stop().await;
}

/// One identity provider, two clients told apart by audience: each token
/// reaches its own client (with that client's teams), a token for neither
/// audience none.
#[tokio::test]
async fn two_clients_of_one_issuer_are_told_apart_by_audience() {
    let ops = format!(
        r#"
[[clients]]
name = "ops-app"
teams = ["personal"]
jwt = {{ issuer = "https://auth.test", audience = "ops", hmac_secret = {{ value = "{JWT_SECRET}" }} }}
"#
    );
    let h = start(&ops).await;
    let c = TestClient::http1();
    let with_aud = |aud: &str| {
        let mut cl = claims(300);
        cl["aud"] = serde_json::json!(aud);
        hs256(cl, JWT_SECRET)
    };
    for (aud, team) in [("rungen-gateway", Some(TEAM_ID)), ("ops", None)] {
        let r = c
            .get(
                &h.url("/app"),
                &[("authorization", &bearer(&with_aud(aud)))],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "aud {aud}: {}", r.text());
        // web-users' token asks for acme (team id sent); ops-app's default
        // scope is personal (no team id).
        assert_eq!(
            h.mock.requests().last().unwrap().header("x-team-id"),
            team,
            "aud {aud}"
        );
    }
    let r = c
        .get(
            &h.url("/app"),
            &[("authorization", &bearer(&with_aud("nobody")))],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    h.stop().await;
}

/// What [`flaky_idp`] answers.
#[derive(Clone)]
enum Idp {
    /// 200 with this JWKS document.
    Serve(String),
    /// 503, as an identity provider (or its load balancer) does in a blip.
    Unavailable,
    /// The head and part of the body, then nothing on an open connection.
    Stall,
}

/// A JWKS endpoint whose answer `mode` picks per request, counting the
/// requests it got (raw HTTP/1.1, one request per connection). Returns its URL.
async fn flaky_idp(
    mode: std::sync::Arc<std::sync::Mutex<Idp>>,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (mode, hits) = (mode.clone(), hits.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = mode.lock().unwrap().clone();
                let reply = match answer {
                    Idp::Serve(doc) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{doc}",
                        doc.len()
                    ),
                    Idp::Unavailable => {
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                    }
                    Idp::Stall => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n{\"keys\": [")
                            .await;
                        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                        return;
                    }
                };
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/.well-known/jwks.json")
}

/// Waits until `hits` reaches `n`; false after `within`.
async fn hits_reach(
    hits: &std::sync::atomic::AtomicUsize,
    n: usize,
    within: std::time::Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while hits.load(std::sync::atomic::Ordering::SeqCst) < n {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}

/// Polls `GET /app` with a token (a few times: the keys are set just after
/// the fetch is answered) and returns the last status.
async fn status_settles(h: &Harness, token: &str) -> StatusCode {
    let c = TestClient::http1();
    let mut last = StatusCode::IM_A_TEAPOT;
    for _ in 0..10 {
        last = c
            .get(&h.url("/app"), &[("authorization", &bearer(token))])
            .await
            .status;
        if last == StatusCode::OK {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    last
}

fn sso_claims() -> serde_json::Value {
    let mut c = claims(600);
    c["iss"] = "https://sso.test".into();
    c
}

/// A gateway whose first JWKS fetch meets `first`; then the identity
/// provider serves its key set, and a second fetch must follow within
/// `within` and make its tokens good.
async fn jwks_recovers_from(first: Idp, refresh: &str, within: std::time::Duration) {
    let (key, jwk) = ec_key("k1");
    let mode = std::sync::Arc::new(std::sync::Mutex::new(first));
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = flaky_idp(mode.clone(), hits.clone()).await;
    let (h, _) = sso_gateway(&url, refresh).await;
    assert!(hits_reach(&hits, 1, std::time::Duration::from_secs(5)).await);
    *mode.lock().unwrap() = Idp::Serve(serde_json::json!({"keys": [jwk]}).to_string());
    assert!(
        hits_reach(&hits, 2, within).await,
        "no second JWKS fetch within {within:?} of the first"
    );
    assert_eq!(
        status_settles(&h, &es256("k1", &key, sso_claims())).await,
        StatusCode::OK
    );
    h.stop().await;
}

/// The identity provider is down when the gateway starts (a rollout, a
/// sidecar not ready): the failed fetch is tried again within seconds, not
/// after a whole `jwks_refresh` (5 minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_jwks_fetch_is_tried_again_within_seconds() {
    jwks_recovers_from(Idp::Unavailable, "5m", std::time::Duration::from_secs(5)).await;
}

/// A JWKS answer that stalls mid-body is given up (10 s for the whole
/// fetch) and fetched again: it does not stop the refresh for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_body_that_stalls_is_given_up_and_fetched_again() {
    jwks_recovers_from(Idp::Stall, "1s", std::time::Duration::from_secs(20)).await;
}

/// The identity provider publishes a new key and signs with it at once: the
/// first token naming the unknown `kid` fetches the key set again (at most
/// every 10 s), instead of every new login failing until the next refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_an_unknown_kid_fetches_the_keys_again() {
    let (k1, jwk1) = ec_key("r1");
    let (k2, jwk2) = ec_key("r2");
    let mode = std::sync::Arc::new(std::sync::Mutex::new(Idp::Serve(
        serde_json::json!({"keys": [jwk1.clone()]}).to_string(),
    )));
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = flaky_idp(mode.clone(), hits.clone()).await;
    let (h, _) = sso_gateway(&url, "5m").await;
    assert_eq!(
        status_settles(&h, &es256("r1", &k1, sso_claims())).await,
        StatusCode::OK
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    *mode.lock().unwrap() = Idp::Serve(serde_json::json!({"keys": [jwk1, jwk2]}).to_string());
    let c = TestClient::http1();
    let r2 = es256("r2", &k2, sso_claims());
    let first = c
        .get(&h.url("/app"), &[("authorization", &bearer(&r2))])
        .await;
    assert_eq!(first.status, StatusCode::UNAUTHORIZED, "not known yet");
    assert!(
        hits_reach(&hits, 2, std::time::Duration::from_secs(5)).await,
        "the unknown kid fetched nothing"
    );
    assert_eq!(status_settles(&h, &r2).await, StatusCode::OK);
    // Made-up kids do not fetch again within 10 s.
    for i in 0..5 {
        let fake = es256(&format!("made-up-{i}"), &k2, sso_claims());
        let r = c
            .get(&h.url("/app"), &[("authorization", &bearer(&fake))])
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    h.stop().await;
}
