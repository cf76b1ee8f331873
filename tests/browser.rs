//! A real browser (Debian's headless Chromium) calling the gateway with
//! `fetch` from a page on another loopback origin. Skipped when no Chromium
//! is installed, unless RUNGEN_REQUIRE_BROWSER is set (CI sets it and
//! installs Chromium).
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

const JWT_SECRET: &str = "canary-jwt-secret-browser-0123456789abcdef";

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// Serves `html` at every path on 127.0.0.1:0; returns the origin.
async fn serve_page(html: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let html = Bytes::from(html);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let html = html.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let html = html.clone();
                    async move {
                        let mut res = http::Response::new(Full::new(html));
                        res.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("text/html; charset=utf-8"),
                        );
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

fn page(gateway: &str, fresh: &str, expired: &str) -> String {
    format!(
        r#"<!doctype html><html><body><pre id="out">pending</pre><script>
const G = "{gateway}";
async function call(headers) {{
  try {{
    const r = await fetch(G + "/app", {{ headers }});
    const body = await r.text();
    return {{ status: r.status, ratelimit: r.headers.get("RateLimit"), policy: r.headers.get("RateLimit-Policy"),
             cache: r.headers.get("Cache-Status"), etag: r.headers.get("ETag"),
             headers: [...r.headers].map(h => h.join(": ")).join("\n"), body }};
  }} catch (e) {{ return {{ error: String(e) }}; }}
}}
(async () => {{
  const out = {{}};
  out.public1 = await call({{}});
  out.public2 = await call({{}});
  out.jwt_fresh = await call({{ "authorization": "Bearer {fresh}" }});
  out.jwt_expired = await call({{ "authorization": "Bearer {expired}" }});
  try {{ out.storage = JSON.stringify(localStorage) + "|" + document.cookie; }} catch (e) {{ out.storage = String(e); }}
  document.getElementById("out").textContent = JSON.stringify(out);
}})();
</script></body></html>"#
    )
}

fn run_chromium(bin: &str, url: &str) -> serde_json::Value {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=15000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = dom
        .find("<pre id=\"out\">")
        .unwrap_or_else(|| panic!("no output in {dom}"))
        + "<pre id=\"out\">".len();
    let end = start + dom[start..].find("</pre>").unwrap();
    let text = dom[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("page output is not JSON ({e}): {text}"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(exp_in: i64) -> String {
    let claims = serde_json::json!({
        "iss": "https://auth.test", "aud": "rungen-gateway", "sub": "u1",
        "exp": now() as i64 + exp_in, "teams": ["acme"],
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_calls_the_gateway_with_fetch() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var_os("RUNGEN_REQUIRE_BROWSER").is_none(),
            "RUNGEN_REQUIRE_BROWSER is set but Chromium is not installed"
        );
        eprintln!("skipped: no Chromium (apt-get install chromium); CI runs this test");
        return;
    };
    // The gateway first (its address goes into the pages), with the page's
    // origin allowed; the origin is known only once the page server is bound,
    // so bind both pages before writing the config.
    let mock = rungen_gateway::mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let gw_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gw_addr = gw_listener.local_addr().unwrap();
    drop(gw_listener);
    let gateway_url = format!("http://{gw_addr}");
    let html = page(&gateway_url, &token(120), &token(-600));
    let allowed = serve_page(html.clone()).await;
    let disallowed = serve_page(html).await;
    let sections = format!(
        r#"
[[clients]]
name = "dashboard"
public = true
allowed_origins = ["{allowed}"]
teams = ["acme"]

[[clients]]
name = "web-users"
allowed_origins = ["{allowed}"]
teams = ["acme"]
jwt = {{ issuer = "https://auth.test", audience = "rungen-gateway", hmac_secret = {{ value = "{JWT_SECRET}" }} }}
"#
    );
    let text = config_toml_with(&mock.base_url(), "", "", &sections).replace(
        "listen = \"127.0.0.1:0\"\nshutdown_timeout",
        &format!("listen = \"{gw_addr}\"\nshutdown_timeout"),
    );
    let config =
        rungen_gateway::config::Config::from_toml(Path::new("browser.toml"), &text).unwrap();
    let gateway = rungen_gateway::server::start(config).await.unwrap();
    assert_eq!(gateway.local_addr(), gw_addr);

    let bin2 = bin.to_string();
    let url = format!("{allowed}/");
    let out = tokio::task::spawn_blocking(move || run_chromium(&bin2, &url))
        .await
        .unwrap();
    let dump = out.to_string();

    // The public client succeeds and JavaScript reads the rate-limit and cache headers.
    assert_eq!(out["public1"]["status"], 200, "{dump}");
    assert!(
        out["public1"]["ratelimit"]
            .as_str()
            .unwrap()
            .starts_with("\"caller"),
        "{dump}"
    );
    assert!(
        out["public1"]["policy"].as_str().unwrap().contains(";q="),
        "{dump}"
    );
    assert!(
        out["public1"]["cache"]
            .as_str()
            .unwrap()
            .starts_with("rungen-gateway"),
        "{dump}"
    );
    assert_eq!(out["public2"]["cache"], "rungen-gateway; hit", "{dump}");
    assert!(
        out["public1"]["body"]
            .as_str()
            .unwrap()
            .contains("\"data\"")
    );
    // The JWT client: a fresh token works, an expired one is a readable 401.
    assert_eq!(out["jwt_fresh"]["status"], 200, "{dump}");
    assert_eq!(out["jwt_expired"]["status"], 401, "{dump}");
    // Nothing the page can read holds the upstream key.
    assert!(!dump.contains(UPSTREAM_KEY), "{dump}");
    for call in ["public1", "public2", "jwt_fresh", "jwt_expired"] {
        let headers = out[call]["headers"].as_str().unwrap().to_ascii_lowercase();
        assert!(
            !headers.contains("x-api-key:") && !headers.contains("x-team-id:"),
            "no upstream request header is echoed: {headers}"
        );
    }

    // From an origin no client allows, the browser blocks the response.
    let bin2 = bin.to_string();
    let url = format!("{disallowed}/");
    let out = tokio::task::spawn_blocking(move || run_chromium(&bin2, &url))
        .await
        .unwrap();
    assert!(
        out["public1"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("Failed to fetch"),
        "{out}"
    );
    assert!(
        out["jwt_fresh"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("Failed to fetch"),
        "{out}"
    );

    gateway.stop().await;
    mock.shutdown();
}
