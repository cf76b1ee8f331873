//! TLS end to end, with an rcgen-made CA generated per test (nothing on disk
//! that expires): HTTPS and h2 over ALPN, protocol floor, certificate
//! rotation, mTLS, and the upstream over HTTPS with a private CA.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rungen_gateway::config::Config;
use rungen_gateway::{mock_upstream, server};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `names` (DNS names or IPs); returns (cert PEM, key PEM).
    fn leaf(&self, cn: &str, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        for n in names {
            params
                .subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName((*n).try_into().unwrap()),
                });
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn key(pem: &str) -> PrivateKeyDer<'static> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .unwrap()
        .unwrap()
}

fn client_config(ca_pem: &str, client: Option<&(String, String)>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem) {
        roots.add(c).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    match client {
        Some((c, k)) => b.with_client_auth_cert(certs(c), key(k)).unwrap(),
        None => b.with_no_client_auth(),
    }
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn https_client(ca_pem: &str, client: Option<&(String, String)>, h2: bool) -> HttpsClient {
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(ca_pem, client))
        .https_only();
    let connector = if h2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(connector)
}

async fn get(
    client: &HttpsClient,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Version, Bytes), String> {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = res.status();
    let version = res.version();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, version, body))
}

struct TlsGateway {
    dir: tempfile::TempDir,
    ca: Ca,
    mock: mock_upstream::MockHandle,
    gateway: server::Running,
}

impl TlsGateway {
    /// A gateway with TLS on `listen`; `tls_extra` goes into [server.tls].
    async fn start(tls_extra: &str, edit: impl Fn(String) -> String) -> TlsGateway {
        let ca = Ca::new("rungen-gateway test CA");
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.leaf("gateway", &["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        let mock = mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let tls = format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"100ms\"\n{tls_extra}\n",
            dir.path().join("tls.crt").display(),
            dir.path().join("tls.key").display()
        );
        let text = edit(config_toml_with(
            &mock.base_url(),
            "plaintext_listen = \"127.0.0.1:0\"",
            "",
            &tls,
        ));
        let config = Config::from_toml(Path::new("tls-test.toml"), &text).unwrap();
        let gateway = server::start(config).await.unwrap();
        TlsGateway {
            dir,
            ca,
            mock,
            gateway,
        }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "https://127.0.0.1:{}{}",
            self.gateway.local_addr().port(),
            path
        )
    }

    async fn stop(self) {
        self.gateway.stop().await;
        self.mock.shutdown();
    }
}

#[tokio::test]
async fn https_with_http1_and_h2_over_alpn() {
    let g = TlsGateway::start("", |t| t).await;
    let auth = bearer(TOKEN_RW);
    let h1 = https_client(&g.ca.pem(), None, false);
    let (status, version, body) = get(&h1, &g.url("/app"), &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, Version::HTTP_11);
    assert!(String::from_utf8_lossy(&body).contains("\"data\""));
    let h2 = https_client(&g.ca.pem(), None, true);
    let (status, version, _) = get(&h2, &g.url("/app"), &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, Version::HTTP_2, "h2 negotiated by ALPN");
    // The plaintext side listener serves the same gateway; the TLS port does not speak plaintext.
    let plain = TestClient::http1();
    let r = plain
        .get(
            &format!("http://{}/app", g.gateway.plaintext_addr().unwrap()),
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let mut s = tokio::net::TcpStream::connect(g.gateway.local_addr())
        .await
        .unwrap();
    s.write_all(b"GET /app HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    g.stop().await;
}

/// A TLS 1.1 ClientHello offering only a CBC (non-AEAD) suite.
fn tls11_cbc_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // TLS_RSA_WITH_AES_128_CBC_SHA
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0x00, 0x00, hello.len() as u8];
    hs.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, hs.len() as u8];
    record.extend_from_slice(&hs);
    record
}

#[tokio::test]
async fn tls_1_1_and_non_aead_clients_are_refused() {
    let g = TlsGateway::start("", |t| t).await;
    let mut s = tokio::net::TcpStream::connect(g.gateway.local_addr())
        .await
        .unwrap();
    s.write_all(&tls11_cbc_client_hello()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    // Either an alert record (0x15) or a closed connection; never a ServerHello (0x16).
    assert!(n == 0 || buf[0] == 0x15, "got {:?}", &buf[..n]);
    assert_eq!(g.mock.stats().total, 0);
    g.stop().await;
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&(String, String)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut cfg = client_config(ca_pem, client);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
}

fn peer_leaf(s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

#[tokio::test]
async fn certificate_rotation_keeps_old_connections_and_rejects_a_broken_pair() {
    let g = TlsGateway::start("", |t| t).await;
    let addr = g.gateway.local_addr();
    let first = tls_connect(addr, &g.ca.pem(), None).await.unwrap();
    let old_leaf = peer_leaf(&first);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(first))
        .await
        .unwrap();
    tokio::spawn(conn);
    let auth = bearer(TOKEN_RW);
    let req = || {
        Request::get("/app")
            .header("host", "127.0.0.1")
            .header("authorization", auth.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(
        sender.send_request(req()).await.unwrap().status(),
        StatusCode::OK
    );

    // Rotate: write the new pair the way cert-manager does (new files renamed in).
    let (cert, key) = g.ca.leaf("gateway-rotated", &["localhost", "127.0.0.1"]);
    let d = g.dir.path();
    std::fs::write(d.join("new.crt"), cert).unwrap();
    std::fs::write(d.join("new.key"), key).unwrap();
    std::fs::rename(d.join("new.key"), d.join("tls.key")).unwrap();
    std::fs::rename(d.join("new.crt"), d.join("tls.crt")).unwrap();
    let mut rotated = None;
    for _ in 0..100 {
        let s = tls_connect(addr, &g.ca.pem(), None).await.unwrap();
        if peer_leaf(&s) != old_leaf {
            rotated = Some(peer_leaf(&s));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new_leaf = rotated.expect("new connections see the new certificate");
    // The connection opened before the rotation still works.
    assert_eq!(
        sender.send_request(req()).await.unwrap().status(),
        StatusCode::OK
    );

    // A broken replacement (a key that does not match) is rejected; the last good pair serves on.
    let other_key = KeyPair::generate().unwrap().serialize_pem();
    std::fs::write(d.join("tls.key"), other_key).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = tls_connect(addr, &g.ca.pem(), None).await.unwrap();
    assert_eq!(peer_leaf(&s), new_leaf);
    let metrics = rungen_gateway::telemetry::render();
    assert!(
        metrics.contains("rungen_gateway_tls_reloads_total{outcome=\"error\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("rungen_gateway_tls_cert_expiry_timestamp_seconds"));
    g.stop().await;
}

#[tokio::test]
async fn mutual_tls_maps_certificates_to_clients() {
    let ca_for_clients = Ca::new("client CA");
    let billing = ca_for_clients.leaf("svc-billing", &["billing.internal"]);
    let stranger = ca_for_clients.leaf("svc-unknown", &["unknown.internal"]);
    let outsider = Ca::new("other CA").leaf("svc-billing", &["billing.internal"]);
    let client_ca_dir = tempfile::tempdir().unwrap();
    let client_ca = client_ca_dir.path().join("clients-ca.crt");
    std::fs::write(&client_ca, ca_for_clients.pem()).unwrap();
    let add_cert_client = |t: String| {
        t.replace(
            "[[clients]]\nname = \"misconfigured\"",
            "[[clients]]\nname = \"billing\"\ncert_names = [\"billing.internal\"]\nteams = [\"acme\"]\n\n[[clients]]\nname = \"misconfigured\"",
        )
    };
    let g = TlsGateway::start(
        &format!("client_ca = \"{}\"", client_ca.display()),
        add_cert_client,
    )
    .await;
    let ca = g.ca.pem();
    // With a certificate the client list knows: served, with that client's scope.
    let c = https_client(&ca, Some(&billing), false);
    let (status, _, _) = get(&c, &g.url("/app"), &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        g.mock.requests().last().unwrap().header("x-team-id"),
        Some(TEAM_ID)
    );
    // A valid certificate no client entry names: 401.
    let c = https_client(&ca, Some(&stranger), false);
    let (status, _, _) = get(&c, &g.url("/app"), &[]).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // No certificate, or one from another CA: refused at the handshake.
    assert!(
        tls_connect(g.gateway.local_addr(), &ca, None)
            .await
            .is_err()
            || {
                let c = https_client(&ca, None, false);
                get(&c, &g.url("/app"), &[("authorization", &bearer(TOKEN_RW))])
                    .await
                    .is_err()
            }
    );
    let c = https_client(&ca, Some(&outsider), false);
    assert!(get(&c, &g.url("/app"), &[]).await.is_err());
    g.stop().await;

    // Optional client certificates: without one, token auth still works.
    let g = TlsGateway::start(
        &format!(
            "client_ca = \"{}\"\nclient_auth = \"optional\"",
            client_ca.display()
        ),
        add_cert_client,
    )
    .await;
    let c = https_client(&g.ca.pem(), None, false);
    let (status, _, _) = get(&c, &g.url("/app"), &[("authorization", &bearer(TOKEN_RW))])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let c = https_client(&g.ca.pem(), Some(&billing), true);
    let (status, version, _) = get(&c, &g.url("/app"), &[]).await.unwrap();
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
    g.stop().await;
}

/// The mock upstream over TLS, with a certificate for `localhost` from `ca`.
async fn mock_over_tls(ca: &Ca) -> mock_upstream::MockHandle {
    let (cert, key_pem) = ca.leaf("upstream", &["localhost"]);
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs(&cert), key(&key_pem))
    .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    mock_upstream::start_tls(
        mock_config(),
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(server),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn upstream_over_https_with_a_private_ca_and_a_checked_name() {
    let ca = Ca::new("upstream CA");
    let mock = mock_over_tls(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let port = mock.local_addr().port();
    let start = |host: &str| {
        let text = config_toml(
            &format!("https://{host}:{port}"),
            "",
            &format!("ca_file = \"{}\"", ca_file.display()),
        );
        Config::from_toml(Path::new("t.toml"), &text).unwrap()
    };
    let c = TestClient::http1();
    // The name matches: served over verified TLS.
    let g = server::start(start("localhost")).await.unwrap();
    let r = c
        .get(
            &format!("http://{}/app", g.local_addr()),
            &[("authorization", &bearer(TOKEN_RW))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(mock.stats().total, 1);
    g.stop().await;
    // The certificate is not for 127.0.0.1: refused, 502, nothing sent.
    let g = server::start(start("127.0.0.1")).await.unwrap();
    let r = c
        .get(
            &format!("http://{}/app", g.local_addr()),
            &[("authorization", &bearer(TOKEN_RW))],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(mock.stats().total, 1);
    g.stop().await;
    mock.shutdown();
}

#[tokio::test]
async fn a_rotated_upstream_ca_file_is_picked_up_without_a_restart() {
    // The upstream moved to a certificate of a new private CA; the mounted CA
    // file still holds the old one until it is updated (a ConfigMap).
    let (old_ca, new_ca) = (Ca::new("old upstream CA"), Ca::new("new upstream CA"));
    let mock = mock_over_tls(&new_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, old_ca.pem()).unwrap();
    let text = config_toml(
        &format!("https://localhost:{}", mock.local_addr().port()),
        "",
        // Refused handshakes would open the breaker (503) while the file is old.
        &format!("ca_file = \"{}\"\nbreaker_failures = 0", ca_file.display()),
    );
    assert!(text.contains("poll_interval = \"200ms\""), "watched");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let g = server::start(Config::load(&path).unwrap()).await.unwrap();
    let c = TestClient::http1();
    let url = format!("http://{}/app", g.local_addr());
    let auth = bearer(TOKEN_RW);
    let r = c.get(&url, &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert_eq!(
        mock.stats().total,
        0,
        "nothing sent to an unverified upstream"
    );
    // The CA file is updated; the watcher reloads, and the next request
    // verifies the upstream with the new CA. Nothing else changed.
    std::fs::write(&ca_file, format!("{}\n", new_ca.pem())).unwrap();
    let mut status = r.status;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = c.get(&url, &[("authorization", &auth)]).await.status;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(status, StatusCode::OK, "the new CA is used within 10 s");
    assert_eq!(mock.stats().total, 1);
    g.stop().await;
    mock.shutdown();
}

#[test]
fn check_config_validates_tls_files() {
    let ca = Ca::new("ca");
    let (cert, _) = ca.leaf("gw", &["localhost"]);
    let other_key = KeyPair::generate().unwrap().serialize_pem();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.pem"), cert).unwrap();
    std::fs::write(dir.path().join("k.pem"), other_key).unwrap();
    let tls = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.path().join("c.pem").display(),
        dir.path().join("k.pem").display()
    );
    let text = config_toml_with("https://api.rungen.ai", "", "", &tls);
    let err = Config::from_toml(Path::new("t.toml"), &text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server.tls.cert") && err.contains("do not belong together"),
        "{err}"
    );
    let text = config_toml_with(
        "https://api.rungen.ai",
        "",
        "",
        &tls.replace("k.pem", "missing.pem"),
    );
    let err = Config::from_toml(Path::new("t.toml"), &text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pem"), "{err}");
}

/// RSA (PKCS#1 and PKCS#8) and ECDSA (SEC1 and PKCS#8) keys all load, made
/// by openssl the way operators make them.
#[test]
fn rsa_and_ecdsa_keys_in_every_pem_form_load() {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "openssl is needed in CI");
        eprintln!("skipped: no openssl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["genrsa", "-traditional", "-out", "rsa1.pem", "2048"]);
    run(&[
        "pkcs8", "-topk8", "-nocrypt", "-in", "rsa1.pem", "-out", "rsa8.pem",
    ]);
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "ec1.pem",
    ]);
    run(&[
        "pkcs8", "-topk8", "-nocrypt", "-in", "ec1.pem", "-out", "ec8.pem",
    ]);
    for (key, cert) in [("rsa1.pem", "rsa.crt"), ("ec1.pem", "ec.crt")] {
        run(&[
            "req",
            "-x509",
            "-new",
            "-key",
            key,
            "-subj",
            "/CN=localhost",
            "-days",
            "2",
            "-out",
            cert,
        ]);
    }
    let first = |f: &str| {
        std::fs::read_to_string(d.join(f))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(first("rsa1.pem"), "-----BEGIN RSA PRIVATE KEY-----");
    assert_eq!(first("ec1.pem"), "-----BEGIN EC PRIVATE KEY-----");
    assert_eq!(first("ec8.pem"), "-----BEGIN PRIVATE KEY-----");
    for (key, cert) in [
        ("rsa1.pem", "rsa.crt"),
        ("rsa8.pem", "rsa.crt"),
        ("ec1.pem", "ec.crt"),
        ("ec8.pem", "ec.crt"),
    ] {
        let head = std::fs::read_to_string(d.join(key)).unwrap();
        let pair = rungen_gateway::tls::load_pair(&d.join(cert), &d.join(key));
        assert!(
            pair.is_ok(),
            "{key} ({}): {:?}",
            head.lines().next().unwrap_or(""),
            pair.err()
        );
    }
    // And a mismatched pair is refused.
    assert!(rungen_gateway::tls::load_pair(&d.join("rsa.crt"), &d.join("ec1.pem")).is_err());
}

/// A rotated client CA file applies to new connections without a restart; a
/// broken one is rejected (counted) and the CAs in use keep verifying; the
/// next good one applies.
#[tokio::test]
async fn a_rotated_client_ca_applies_to_new_connections() {
    let old_ca = Ca::new("client CA 2026");
    let new_ca = Ca::new("client CA 2027");
    let old_cert = old_ca.leaf("svc-billing", &["billing.internal"]);
    let new_cert = new_ca.leaf("svc-billing", &["billing.internal"]);
    let client_ca_dir = tempfile::tempdir().unwrap();
    let client_ca = client_ca_dir.path().join("clients-ca.crt");
    std::fs::write(&client_ca, old_ca.pem()).unwrap();
    let g = TlsGateway::start(
        &format!("client_ca = \"{}\"", client_ca.display()),
        |t| {
            t.replace(
                "[[clients]]\nname = \"misconfigured\"",
                "[[clients]]\nname = \"billing\"\ncert_names = [\"billing.internal\"]\nteams = [\"acme\"]\n\n[[clients]]\nname = \"misconfigured\"",
            )
        },
    )
    .await;
    let ca = g.ca.pem();
    let served = |cert: &(String, String)| {
        let c = https_client(&ca, Some(cert), false);
        let url = g.url("/app");
        async move { matches!(get(&c, &url, &[]).await, Ok((StatusCode::OK, _, _))) }
    };
    assert!(served(&old_cert).await);
    assert!(!served(&new_cert).await, "not trusted yet");

    // Rotate (a new file renamed in, as a Secret update does).
    let staged = client_ca_dir.path().join("new.crt");
    std::fs::write(&staged, new_ca.pem()).unwrap();
    std::fs::rename(&staged, &client_ca).unwrap();
    let started = std::time::Instant::now();
    while !served(&new_cert).await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new client CA was never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!served(&old_cert).await, "the old CA no longer verifies");

    // A broken file: rejected (counted), the new CA keeps verifying.
    let refused = || {
        rungen_gateway::telemetry::render()
            .lines()
            .find(|l| l.starts_with("rungen_gateway_tls_reloads_total{outcome=\"error\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = refused();
    std::fs::write(&client_ca, "not a certificate").unwrap();
    let started = std::time::Instant::now();
    while refused() <= before {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the broken CA file was never looked at"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served(&new_cert).await);
    assert!(!served(&old_cert).await);
    // And the next good file applies again.
    std::fs::write(&staged, old_ca.pem()).unwrap();
    std::fs::rename(&staged, &client_ca).unwrap();
    let started = std::time::Instant::now();
    while !served(&old_cert).await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a good CA file after a broken one was never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.stop().await;
}

/// Sends `GET /app` on an open connection and reads until the status line
/// of a 200 arrives (or `within` passes).
async fn served_on<S>(s: &mut S, within: Duration) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let req = format!(
        "GET /app HTTP/1.1\r\nhost: gw\r\nauthorization: {}\r\n\r\n",
        bearer(TOKEN_RW)
    );
    let exchange = async {
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.starts_with(b"HTTP/1.1 200") || buf.len() < 12 {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    matches!(tokio::time::timeout(within, exchange).await, Ok(Some(())))
}

/// `max_connections` and `max_connections_per_ip` count the TLS and the
/// plaintext listener's connections together: one cap for the process, not
/// one per listener.
#[tokio::test]
async fn the_connection_caps_hold_across_the_tls_and_plaintext_listeners() {
    let g = TlsGateway::start("", |t| {
        t.replace(
            "plaintext_listen = \"127.0.0.1:0\"",
            "plaintext_listen = \"127.0.0.1:0\"\nmax_connections = 1\nmax_connections_per_ip = 1",
        )
    })
    .await;
    let mut plain = tokio::net::TcpStream::connect(g.gateway.plaintext_addr().unwrap())
        .await
        .unwrap();
    assert!(served_on(&mut plain, Duration::from_secs(5)).await);
    // The one slot is taken: a TLS connection waits in the backlog.
    let (ca, addr) = (g.ca.pem(), g.gateway.local_addr());
    let second = tokio::spawn(async move {
        let mut tls = tls_connect(addr, &ca, None).await.ok()?;
        served_on(&mut tls, Duration::from_secs(10))
            .await
            .then_some(())
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !second.is_finished(),
        "served beside the plaintext connection"
    );
    // Its slot freed, the waiting connection is served.
    drop(plain);
    let served = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .unwrap()
        .unwrap();
    assert!(
        served.is_some(),
        "the waiting TLS connection was not served"
    );
    g.stop().await;

    // Per source IP: the second connection from one IP is refused, whichever
    // listener it comes to.
    let g = TlsGateway::start("", |t| {
        t.replace(
            "plaintext_listen = \"127.0.0.1:0\"",
            "plaintext_listen = \"127.0.0.1:0\"\nmax_connections = 10\nmax_connections_per_ip = 1",
        )
    })
    .await;
    let mut plain = tokio::net::TcpStream::connect(g.gateway.plaintext_addr().unwrap())
        .await
        .unwrap();
    assert!(served_on(&mut plain, Duration::from_secs(5)).await);
    let refused = match tls_connect(g.gateway.local_addr(), &g.ca.pem(), None).await {
        Err(_) => true,
        Ok(mut tls) => !served_on(&mut tls, Duration::from_secs(5)).await,
    };
    assert!(refused, "a second connection from one IP was served");
    drop(plain);
    g.stop().await;
}

/// A client in the middle of its TLS handshake has no request in flight:
/// the drain at shutdown does not wait for its handshake to time out.
#[tokio::test]
async fn a_pending_tls_handshake_does_not_hold_the_drain() {
    let g = TlsGateway::start("", |t| {
        t.replace(
            "plaintext_listen = \"127.0.0.1:0\"",
            "plaintext_listen = \"127.0.0.1:0\"\nheader_read_timeout = \"10s\"",
        )
    })
    .await;
    let _silent = tokio::net::TcpStream::connect(g.gateway.local_addr())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    g.gateway.stop().await;
    let took = started.elapsed();
    g.mock.shutdown();
    assert!(took < Duration::from_secs(2), "the drain waited {took:?}");
}
