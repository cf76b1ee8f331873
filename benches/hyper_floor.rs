//! The floor under the gateway's cache hit: hyper answering a constant body, with the gateway's
//! runtime, allocator, connection builder and TLS stack, and nothing else (no routing, caller
//! auth, limits, cache, metrics or access log). `benches/compare.sh` starts it as the
//! `hyper-floor` target (`FLOOR=1`) so that every run measures what the stack alone costs per
//! request next to the gateway and nginx; a target below this floor cannot be met by trimming the
//! gateway's own steps.
//!
//! ```sh
//! hyper_floor --listen 127.0.0.1:PORT --tls-listen 127.0.0.1:PORT \
//!     --body FILE --cert cert.pem --key key.pem
//! ```
//!
//! Run with no arguments (as `cargo bench` does) it prints how to use it and exits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    listen: SocketAddr,
    tls_listen: SocketAddr,
    body: Bytes,
    cert: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut tls_listen, mut body, mut cert, mut key) = (None, None, None, None, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?),
            "--tls-listen" => tls_listen = Some(value()?),
            "--body" => body = Some(value()?),
            "--cert" => cert = Some(value()?),
            "--key" => key = Some(value()?),
            // `cargo bench` passes --bench (and filters): nothing to measure in-process.
            _ if listen.is_none() => return Ok(None),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let need = |v: Option<String>, name: &str| v.ok_or(format!("{name} is required"));
    let read = |path: &str| std::fs::read(path).map_err(|e| format!("{path}: {e}"));
    let addr = |s: String| s.parse::<SocketAddr>().map_err(|e| format!("{s}: {e}"));
    let cert_pem = read(&need(cert, "--cert")?)?;
    let key_pem = read(&need(key, "--key")?)?;
    Ok(Some(Args {
        listen: addr(need(listen, "--listen")?)?,
        tls_listen: addr(need(tls_listen, "--tls-listen")?)?,
        body: Bytes::from(read(&need(body, "--body")?)?),
        cert: rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--cert: {e}"))?,
        key: rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| format!("--key: {e}"))?
            .ok_or("--key: no private key")?,
    }))
}

fn main() {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!(
                "hyper_floor: a server for benches/compare.sh (FLOOR=1); nothing to run alone"
            );
            return;
        }
        Err(e) => {
            eprintln!("hyper_floor: {e}");
            std::process::exit(2);
        }
    };
    // The gateway's runtime on one core (compare.sh pins every server to one): current-thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    runtime.block_on(serve(args));
}

async fn serve(args: Args) {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| {
        b.with_no_client_auth()
            .with_single_cert(args.cert, args.key)
    })
    .unwrap_or_else(|e| panic!("tls config: {e}"));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
    };
    let (plain, secure) = (bind(args.listen).await, bind(args.tls_listen).await);
    let body = args.body;
    loop {
        let (stream, tls) = tokio::select! {
            Ok((s, _)) = plain.accept() => (s, false),
            Ok((s, _)) = secure.accept() => (s, true),
        };
        let _ = stream.set_nodelay(true);
        let (body, acceptor) = (body.clone(), acceptor.clone());
        tokio::spawn(async move {
            let service = service_fn(move |_: Request<Incoming>| {
                let mut res = Response::new(Full::new(body.clone()));
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                std::future::ready(Ok::<_, Infallible>(res))
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            if tls {
                if let Ok(stream) = acceptor.accept(stream).await {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            } else {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
    }
}
