//! The cache-hit path, in process (no sockets on the measured path).
//!
//! `cargo bench --bench hit_path` first prints two tables, then criterion's
//! own output:
//! - the whole `GatewayService` answering cache hits of `GET /app`, one after
//!   another on a current-thread runtime: allocations per hit (stats_alloc,
//!   over 10 000 hits), requests/s and µs per hit over 200 000 hits (wall
//!   clock and this thread's CPU time), for three configurations: the
//!   default (rate limiter on, with a quota never reached), the same with an
//!   access-log subscriber writing to a sink, and `[rate_limit] enabled = false`;
//! - allocations per call of the pieces on the hit path (`CacheKey::new`,
//!   `Credentials::lookup`, and the request the bench builds for each hit).
//!
//! Criterion then times `CacheKey::new`, `Credentials::lookup` and the whole
//! service answering a hit. Every answer is checked to be a cache hit (after
//! the clock stops). See benches/README.md.
//!
//! Under `cargo test --benches` (no `--bench` argument) or with `-- --test`
//! everything runs once, with tiny counts, as a smoke test.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use rungen_gateway::cache::Cache;
use rungen_gateway::cache::key::CacheKey;
use rungen_gateway::caller_auth::Credentials;
use rungen_gateway::circuit::Breakers;
use rungen_gateway::clock::{SharedClock, SystemClock};
use rungen_gateway::config::Config;
use rungen_gateway::context::RequestContext;
use rungen_gateway::error::{Body, empty_body};
use rungen_gateway::gateway::{self, GatewayService};
use rungen_gateway::jwt::{JwtSettings, KeySource, Verifier, Verifiers};
use rungen_gateway::mock_upstream::{self, MockConfig, MockHandle};
use rungen_gateway::rate_limit::Limits;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::error::Error;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The caller's `Authorization` value; the token is what follows "Bearer ".
const AUTHORIZATION: &str = "Bearer bench-caller-token-5c1d9e07";
/// The mock upstream's default key and team (`MockConfig::default()`).
const UPSTREAM_KEY: &str = "demo-upstream-key";
const TEAM_ID: &str = "123e4567-e89b-12d3-a456-426614174000";
/// The scope (team name) the bench client uses by default.
const SCOPE: &str = "acme";
const HIT: &str = "rungen-gateway; hit";
const PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 40_000));

fn token() -> &'static str {
    &AUTHORIZATION["Bearer ".len()..]
}

/// Iteration counts: full under `cargo bench`, tiny under `cargo test --benches`.
struct Counts {
    alloc_hits: u64,
    rate_hits: u64,
    piece_calls: u64,
}

impl Counts {
    fn new(full: bool) -> Self {
        if full {
            Self {
                alloc_hits: 10_000,
                rate_hits: 200_000,
                piece_calls: 10_000,
            }
        } else {
            Self {
                alloc_hits: 10,
                rate_hits: 10,
                piece_calls: 10,
            }
        }
    }
}

/// `[rate_limit]` as benchmarked by default: on, with a quota no benchmark
/// reaches, so every hit pays for the limiter and its `RateLimit` headers.
const RATE_LIMIT_ON: &str = r#"
[rate_limit]
default = { per_second = 1000000000, burst = 1000000000 }
"#;
const RATE_LIMIT_OFF: &str = r#"
[rate_limit]
enabled = false
"#;

fn config_toml(upstream: &str, sections: &str) -> String {
    let digest = hex::encode(rungen_gateway::secret::token_digest(token().as_bytes()));
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[upstream]
base_url = "{upstream}"

[cache.routes."/app"]
ttl = "1h"

[[teams]]
name = "{SCOPE}"
team_id = "{TEAM_ID}"
api_key = {{ value = "{UPSTREAM_KEY}" }}

[[teams]]
name = "personal"
api_key = {{ value = "{UPSTREAM_KEY}" }}

[[clients]]
name = "bench"
token_sha256 = "{digest}"
teams = ["{SCOPE}", "personal"]

{sections}
"#
    )
}

/// The service under test, with the mock upstream that filled its cache.
struct Fixture {
    runtime: Runtime,
    config: Config,
    service: GatewayService,
    mock: MockHandle,
}

impl Fixture {
    /// `sections`: extra config tables (`[rate_limit]`).
    fn start(sections: &str) -> Result<Self, Box<dyn Error>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // As `server::start_with` does: the Prometheus recorder is installed,
        // so the hit path's counters and histogram do their real work.
        rungen_gateway::telemetry::metrics();
        let mock = runtime.block_on(mock_upstream::start(
            MockConfig::default(),
            "127.0.0.1:0".parse()?,
        ))?;
        let text = config_toml(&mock.base_url(), sections);
        let config = Config::from_toml(Path::new("bench.toml"), &text)?;
        let client = rungen_gateway::upstream::build_client(&config.upstream)?;
        // Wired as `server::start_with` wires them.
        let clock: SharedClock = Arc::new(SystemClock);
        let cache = Cache::new(config.cache.clone(), clock.clone());
        let limits = Limits::with_clock(config.rate_limit.clone(), clock.clone());
        let breakers = Breakers::new(
            config.upstream.breaker_failures,
            config.upstream.breaker_cooldown,
            clock,
        );
        let service = gateway::build(&config, client, cache, limits, breakers);
        let fixture = Self {
            runtime,
            config,
            service,
            mock,
        };
        fixture.warm_up()?;
        Ok(fixture)
    }

    /// One miss fills the cache; the next request must be a hit.
    fn warm_up(&self) -> Result<(), Box<dyn Error>> {
        let (miss, _) = self.runtime.block_on(send(&self.service))?;
        if miss.status() != StatusCode::OK {
            return Err(format!("warm-up: upstream answered {}", miss.status()).into());
        }
        let (hit, body) = self.runtime.block_on(send(&self.service))?;
        let status = hit.headers().get("cache-status");
        if hit.status() != StatusCode::OK || status != Some(&HeaderValue::from_static(HIT)) {
            return Err(format!(
                "the second request is not a cache hit: {} cache-status {status:?}",
                hit.status()
            )
            .into());
        }
        if body.is_empty() {
            return Err("the cache hit has an empty body".into());
        }
        eprintln!(
            "warm-up: GET /app, scope {SCOPE}: {} then {} {HIT}, {} body bytes",
            miss.status(),
            hit.status(),
            body.len()
        );
        Ok(())
    }

    /// `n` hits one after another in one `block_on`; the time they took.
    /// Panics (after the clock stopped) if any answer was not a cache hit.
    fn hits(&self, n: u64) -> Duration {
        let (elapsed, not_hits) = self.runtime.block_on(async {
            let mut not_hits = 0u64;
            // One copy of the service for the whole run, as a connection keeps one.
            let mut service = self.service.clone();
            let start = Instant::now();
            for _ in 0..n {
                not_hits += u64::from(!hit(&mut service).await);
            }
            (start.elapsed(), not_hits)
        });
        assert_eq!(not_hits, 0, "{not_hits} of {n} answers were not cache hits");
        elapsed
    }
}

/// A request as the listener hands it to the service (`listener.rs`,
/// `HyperAdapter::call`): origin-form URI, the caller's token, the peer address.
fn request() -> Request<Body> {
    let mut req = Request::new(empty_body());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = http::Uri::from_static("/app");
    req.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_static(AUTHORIZATION),
    );
    RequestContext::of_mut(req.extensions_mut()).peer = Some(PEER);
    req
}

/// One request through the service, response body read whole.
async fn send(service: &GatewayService) -> Result<(Response<()>, Bytes), Box<dyn Error>> {
    let res = match service.clone().oneshot(request()).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((Response::from_parts(parts, ()), body))
}

/// The timed request, on the caller's copy of the service as the listener
/// sends it (`LocalService::call`: ready, then call); whether it was a cache
/// hit with a body.
async fn hit(service: &mut GatewayService) -> bool {
    let res = match service.ready().await {
        Ok(ready) => ready.call(request()).await,
        Err(never) => match never {},
    };
    let res = match res {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let (parts, body) = res.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => panic!("response body failed: {e}"),
    };
    black_box(&body);
    parts.headers.get("cache-status").map(HeaderValue::as_bytes) == Some(HIT.as_bytes())
        && !body.is_empty()
}

/// Allocation counts of one run of `f`, per call of `n`.
struct PerCall {
    allocations: f64,
    reallocations: f64,
    bytes: f64,
}

impl PerCall {
    fn print_piece(&self, what: &str) {
        println!(
            "{what:<40} {:>6.2} {:>9.2} {:>8.0}",
            self.allocations, self.reallocations, self.bytes
        );
    }

    fn measure(n: u64, f: impl FnOnce()) -> Self {
        let region = Region::new(GLOBAL);
        f();
        let s = region.change();
        let n = n as f64;
        Self {
            allocations: s.allocations as f64 / n,
            reallocations: s.reallocations as f64 / n,
            bytes: s.bytes_allocated as f64 / n,
        }
    }
}

/// CPU time this thread has used (Linux: `/proc/thread-self/stat`, in
/// USER_HZ = 100 ticks/s); `None` elsewhere. Unlike wall time, it does not
/// grow while other processes hold the core, so it is the steadier figure on
/// a shared machine; over a 2 s run its 10 ms grain is under 1 %.
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th and stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

const TABLE_HEAD: &str = "allocs  reallocs    bytes      req/s  µs/hit wall  µs/hit CPU";

/// Allocations per hit and requests/s of the whole service, one table row.
fn service_figures(f: &Fixture, counts: &Counts, label: &str) {
    // Also the warm-up of the timed run below (moka, the recorder, malloc).
    let allocs = PerCall::measure(counts.alloc_hits, || {
        f.hits(counts.alloc_hits);
    });
    let cpu_before = thread_cpu_time();
    let wall = f.hits(counts.rate_hits);
    let cpu = thread_cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let per_hit = |d: Duration| d.as_secs_f64() * 1e6 / counts.rate_hits as f64;
    println!(
        "{label:<36} {:>6.2} {:>9.2} {:>8.0} {:>10.0} {:>12.2} {:>11}",
        allocs.allocations,
        allocs.reallocations,
        allocs.bytes,
        counts.rate_hits as f64 / wall.as_secs_f64(),
        per_hit(wall),
        cpu.map_or("-".to_string(), |c| format!("{:.2}", per_hit(c))),
    );
}

/// Allocations per call of the pieces on the hit path.
fn piece_figures(f: &Fixture, counts: &Counts) {
    let n = counts.piece_calls;
    let scope: Arc<str> = Arc::from(SCOPE);
    PerCall::measure(n, || {
        for _ in 0..n {
            black_box(CacheKey::new(
                black_box(&scope),
                black_box("/app"),
                black_box(None),
            ));
        }
    })
    .print_piece("CacheKey::new(\"/app\", no query)");
    PerCall::measure(n, || {
        for _ in 0..n {
            black_box(CacheKey::new(
                black_box(&scope),
                black_box("/app"),
                black_box(Some("limit=20&page=2")),
            ));
        }
    })
    .print_piece("CacheKey::new(\"/app\", 2-pair query)");
    let credentials = Credentials::new(&f.config.clients);
    PerCall::measure(n, || {
        for _ in 0..n {
            black_box(credentials.lookup(black_box(token().as_bytes())));
        }
    })
    .print_piece("Credentials::lookup (known token)");
    PerCall::measure(n, || {
        for _ in 0..n {
            black_box(request());
        }
    })
    .print_piece("building the request (in the hit rows)");
}

/// Verifiers with one ES256 key (as a JWKS publishes it) for the bench
/// client, a token they accept, and a maker of new accepted tokens (each
/// ES256 signature differs).
fn signed_tokens(f: &Fixture) -> Result<(Verifiers, String, impl Fn() -> String), Box<dyn Error>> {
    use base64::Engine;
    let pair = rcgen::KeyPair::generate()?;
    let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())?;
    let raw = pair.public_key_raw(); // 0x04 || X || Y
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "bench", "alg": "ES256", "use": "sig",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
    }]});
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks.to_string())?;
    let verifier = Verifier::new(
        f.config.clients[0].clone(),
        JwtSettings {
            issuer: "https://auth.bench".into(),
            audience: "rungen-gateway".into(),
            keys: KeySource::JwksFile(path),
            leeway: Duration::from_secs(5),
            scopes_claim: None,
            jwks_refresh: Duration::from_secs(300),
        },
    )?;
    let sign = move || {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        let claims = serde_json::json!({"iss": "https://auth.bench", "aud": "rungen-gateway", "exp": exp, "sub": "user-1"});
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("bench".into());
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    };
    let verifiers = Verifiers::new(vec![verifier]);
    let token = sign();
    verifiers.verify(&token).map_err(|e| e.to_string())?;
    Ok((verifiers, token, sign))
}

fn criterion_benches(c: &mut Criterion, f: &Fixture) {
    let scope: Arc<str> = Arc::from(SCOPE);
    let mut group = c.benchmark_group("cache_key");
    for query in [None, Some("limit=20&page=2")] {
        let id = BenchmarkId::new("new", query.unwrap_or("no query"));
        group.bench_with_input(id, &query, |b, query| {
            b.iter(|| CacheKey::new(black_box(&scope), black_box("/app"), black_box(*query)))
        });
    }
    group.finish();

    let credentials = Credentials::new(&f.config.clients);
    let mut group = c.benchmark_group("credentials");
    let unknown = b"no-such-caller-token-at-all-123";
    group.bench_function("lookup/known", |b| {
        b.iter(|| credentials.lookup(black_box(token().as_bytes())).is_some())
    });
    group.bench_function("lookup/unknown", |b| {
        b.iter(|| credentials.lookup(black_box(unknown)).is_some())
    });
    group.finish();

    // A browser front-end's signed token (ES256, a key from a JWKS): the
    // first check of a token against one checked before.
    let (verifiers, signed, sign) = signed_tokens(f).expect("signed-token fixture");
    let mut group = c.benchmark_group("signed_token");
    group.bench_function("verify/remembered", |b| {
        b.iter(|| verifiers.verify(black_box(&signed)).is_ok())
    });
    group.bench_function("verify/first", |b| {
        b.iter_batched(
            &sign,
            |t| assert!(verifiers.verify(black_box(&t)).is_ok()),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();

    // Each sample runs its iterations back to back in one `block_on`, so the
    // figure is the service's cost, not the runtime's enter/park per request.
    let mut group = c.benchmark_group("gateway_service");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hit", |b| b.iter_custom(|iters| f.hits(iters)));
    group.finish();
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let counts = Counts::new(full);

    let fixture = Fixture::start(RATE_LIMIT_ON)?;
    let unlimited = Fixture::start(RATE_LIMIT_OFF)?;

    println!();
    println!(
        "GatewayService, cache hits of GET /app, one after another on a current-thread runtime\n\
         (allocations over {} hits, rates over {}):",
        counts.alloc_hits, counts.rate_hits
    );
    println!("{:<36} {TABLE_HEAD}", "config");
    service_figures(&fixture, &counts, "rate limiter on, no log subscriber");
    // The access log as `telemetry::init` sets it up (info, pretty format),
    // written to a sink: the formatting is measured, the write(2) is not.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        service_figures(&fixture, &counts, "rate limiter on, access log (sink)");
    });
    service_figures(&unlimited, &counts, "[rate_limit] enabled = false");
    unlimited.mock.shutdown();
    println!();
    println!(
        "Pieces of the hit path, per call (over {} calls):",
        counts.piece_calls
    );
    println!("{:<40} allocs  reallocs    bytes", "piece");
    piece_figures(&fixture, &counts);
    println!();

    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(50)
        .configure_from_args();
    criterion_benches(&mut criterion, &fixture);
    criterion.final_summary();

    fixture.mock.shutdown();
    Ok(())
}
