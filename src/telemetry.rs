//! Tracing setup and the access log: one structured line per request, and the
//! request id (`x-request-id`, kept from the caller if well-formed, otherwise
//! generated) on the request going upstream and on every response.

use crate::caller_auth::CallerLog;
use crate::config::LogFormat;
use crate::error::{Body, ErrorKind};
use crate::routing::Route;
use crate::step::{Step, StepFuture};
use crate::upstream::UpstreamInfo;
use http::{HeaderName, HeaderValue, Method, Request, Response};
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Instant;
use tracing_subscriber::EnvFilter;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// `00-<32 hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>`.
pub fn valid_traceparent(v: &[u8]) -> bool {
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    v.len() == 55
        && &v[..3] == b"00-"
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(&v[3..35])
        && hex(&v[36..52])
        && hex(&v[53..55])
        && v[3..35].iter().any(|c| *c != b'0')
        && v[36..52].iter().any(|c| *c != b'0')
}

/// 32 lower-case hex digits, not all zero: a W3C trace id.
fn is_trace_id(id: &[u8]) -> bool {
    id.len() == 32
        && id
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        && id.iter().any(|c| *c != b'0')
}

fn new_traceparent(request_id: &HeaderValue) -> HeaderValue {
    let id = request_id.as_bytes();
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    if is_trace_id(id) {
        out[3..35].copy_from_slice(id);
    } else {
        hex_into(
            &mut out[3..35],
            rand::Rng::random::<u128>(&mut rand::rng()) | 1,
        );
    }
    hex_into(
        &mut out[36..52],
        u128::from(rand::Rng::random::<u64>(&mut rand::rng()) | 1),
    );
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ))
}

/// For a request about to go upstream: keeps the traceparent [`AccessLog`]
/// left (a caller's valid one, or one it had to choose), otherwise adds a new
/// one whose trace id is the request id.
pub fn ensure_traceparent(headers: &mut http::HeaderMap) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    let tp = match headers.get(X_REQUEST_ID) {
        Some(id) => new_traceparent(id),
        None => new_traceparent(&new_request_id()),
    };
    headers.insert(TRACEPARENT, tp);
}

/// Writes the low `out.len()` hex digits of `v` (lower case) into `out`.
fn hex_into(out: &mut [u8], mut v: u128) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// The configured level, with rustls held to errors unless the level names
/// it: rustls warns (through `log`) about each ClientHello it tolerates, such
/// as an IP address sent as SNI (wrk does, and some load balancers), one
/// line per handshake; failed handshakes are counted and logged at debug here.
fn directives(level: &str) -> String {
    if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls=error")
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the configured level.
/// Returns false if one was already installed (tests, the demo).
pub fn init(level: &str, format: LogFormat) -> bool {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(directives(level)))
        .unwrap_or_else(|_| EnvFilter::new(directives("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
            .is_ok(),
        LogFormat::Pretty => builder.try_init().is_ok(),
    }
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        let seconds = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        metrics::gauge!("rungen_gateway_build_info", "version" => env!("CARGO_PKG_VERSION"))
            .set(1.0);
        spawn_upkeep(handle.clone());
        handle
    })
}

/// How often histogram samples are folded into their buckets.
pub const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// A recorder built with `build_recorder` (we serve `/metrics` ourselves)
/// keeps every histogram sample in a queue until something drains it: a
/// scrape, or `run_upkeep`. Without this a gateway nobody scrapes (admin
/// listener off, Prometheus not configured yet) grows by ~20 bytes per
/// request, about 1.5 MB/s at 80k req/s. One thread for the process (the
/// recorder is process-wide and outlives any one runtime), asleep between runs.
fn spawn_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                handle.run_upkeep();
                // The drained sample blocks are freed through crossbeam-epoch,
                // deferred in this thread's bag until it holds 64 batches:
                // hand them over and let the epoch advance so they go now.
                for _ in 0..3 {
                    crossbeam_epoch::pin().flush();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histogram samples are drained only by scrapes");
    }
}

/// `1xx`..`5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The methods the `method` metric label names; any other is `"other"`.
static METHOD_LABELS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];

/// The `method` label of a request: a standard method by name, anything
/// else `"other"`. Callers choose the method, and each new label value is a
/// new series the recorder keeps for good: an invented method per request
/// must not grow the gateway's memory (or Prometheus's).
pub fn method_label(method: &Method) -> &'static str {
    METHOD_LABELS
        .iter()
        .find(|m| *m == method)
        .map_or("other", Method::as_str)
}

/// A caller-supplied request id is kept only if it is short and plain, so it
/// cannot inject anything into logs or upstream headers.
fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// A response header value that is new on every response (a request id, a
/// remaining count): HTTP/2 sends it as a literal "never indexed" instead of
/// entering it into the connection's HPACK table, where each new value
/// evicted a useful entry after a search through all the earlier ones (~7,000
/// instructions per h2 cache hit). No effect on HTTP/1.1.
pub fn never_indexed(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// 32 lower-case hex digits from the thread-local CSPRNG (no syscall per
/// request, unlike `getrandom`-backed UUIDs; no formatting machinery).
fn new_request_id() -> HeaderValue {
    use rand::Rng;
    let mut out = [0u8; 32];
    hex_into(&mut out, rand::rng().random::<u128>() | 1);
    // One allocation shared by the request's and the response's copies (a
    // `Bytes` copied from a slice allocates again on its first clone).
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .unwrap_or(HeaderValue::from_static("-"))
}

/// What the steps report about a response, for the access log and the request
/// metrics: one response extension, each step filling its field as the
/// response passes back through it (one allocation instead of one per step).
#[derive(Debug, Clone, Default)]
pub struct LogFields {
    /// The route (Routing).
    pub route: Option<Route>,
    /// Who the caller was, even when refused after being identified (CallerAuth).
    pub caller: Option<CallerLog>,
    /// What the cache did (Cache).
    pub cache: Option<&'static str>,
    /// The caller-limit outcome (CallerLimit).
    pub rate_limit: Option<&'static str>,
    /// Set by [`crate::error::error_response`].
    pub error: Option<ErrorKind>,
}

impl LogFields {
    /// The response's fields, added if absent.
    pub fn of<B>(res: &mut Response<B>) -> &mut LogFields {
        res.extensions_mut().get_or_insert_default()
    }

    pub fn get<B>(res: &Response<B>) -> Option<&LogFields> {
        res.extensions().get()
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct AccessLogLayer;

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner }
    }
}

#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
}

// Above `Rescue`: every error is already an answer.
impl<S> tower::Service<Request<Body>> for AccessLog<S>
where
    S: Step<Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = StepFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let started = Instant::now();
        // `ours`: generated here, so already a trace id.
        let (request_id, ours) = match req.headers().get(X_REQUEST_ID) {
            Some(v) if valid_request_id(v) => (v.clone(), false),
            _ => (new_request_id(), true),
        };
        req.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        // W3C trace context: a valid caller traceparent continues the trace;
        // anything else is dropped, and the request that goes upstream gets a
        // new one whose trace id is the request id ([`ensure_traceparent`]; a
        // cache hit never builds one). Only a caller's own request id that is
        // not a trace id needs a random trace id, chosen here so the log and
        // the upstream request agree.
        let mut trace_id = [0u8; 32];
        match req.headers().get(TRACEPARENT) {
            Some(v) if valid_traceparent(v.as_bytes()) => {
                trace_id.copy_from_slice(&v.as_bytes()[3..35]);
            }
            caller_tp => {
                let had_tp = caller_tp.is_some();
                let headers = req.headers_mut();
                // A new trace: the caller's trace state belongs to no trace of ours.
                headers.remove(TRACESTATE);
                if ours || is_trace_id(request_id.as_bytes()) {
                    trace_id.copy_from_slice(request_id.as_bytes());
                    if had_tp {
                        headers.remove(TRACEPARENT);
                    }
                } else {
                    let tp = new_traceparent(&request_id);
                    trace_id.copy_from_slice(&tp.as_bytes()[3..35]);
                    headers.insert(TRACEPARENT, tp);
                }
            }
        }
        let method = req.method().clone();
        // The path only (query strings are not logged), and only when the
        // access log is on: a hit should not pay for a line nobody writes.
        let path = tracing::enabled!(target: "rungen_gateway::access", tracing::Level::INFO)
            .then(|| req.uri().path().to_owned());
        let in_flight = in_flight_gauge();
        in_flight.increment(1.0);
        self.inner.call(req).map(move |res| {
            in_flight.decrement(1.0);
            let mut res = res?;
            res.headers_mut()
                .insert(X_REQUEST_ID, never_indexed(request_id.clone()));
            let fields = LogFields::get(&res);
            let caller = fields.and_then(|f| f.caller.as_ref());
            let client = caller.map_or("-", |c| c.client.name.as_str());
            let scope = caller
                .and_then(|c| c.scope.as_ref())
                .map_or("-", |s| s.name.as_str());
            let route = fields
                .and_then(|f| f.route.as_ref())
                .map_or("-", Route::as_str);
            let error = fields.and_then(|f| f.error.as_ref());
            let cache = fields.and_then(|f| f.cache).unwrap_or("-");
            let status = res.status().as_u16();
            if let Some(path) = &path {
                let upstream = res.extensions().get::<UpstreamInfo>();
                let rate_limit = fields.and_then(|f| f.rate_limit).unwrap_or("-");
                tracing::info!(
                    target: "rungen_gateway::access",
                    request_id = %request_id.to_str().unwrap_or("-"),
                    trace_id = %std::str::from_utf8(&trace_id).unwrap_or("-"),
                    method = %method,
                    path = %path,
                    route,
                    status,
                    client,
                    scope,
                    cache,
                    rate_limit,
                    error = error.map_or("-", |e| e.kind),
                    error_source = error.map_or("-", |e| e.source.as_str()),
                    upstream_status = upstream.map_or(0, |u| u.status),
                    upstream_ms = upstream.map_or(0.0, |u| u.latency.as_secs_f64() * 1000.0),
                    latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "request"
                );
            }
            let method = method_label(&method);
            record_request(
                caller.map(|c| &c.client),
                &[
                    ("route", route),
                    ("method", method),
                    ("status_class", status_class(status)),
                    ("client", client),
                    ("scope", scope),
                    ("cache", cache),
                ],
                started.elapsed().as_secs_f64(),
            );
            if let Some(e) = error {
                metrics::counter!(
                    "rungen_gateway_errors_total",
                    "kind" => e.kind,
                    "source" => e.source.as_str(),
                    "scope" => scope.to_string(),
                )
                .increment(1);
            }
            Ok(res)
        })
    }
}

/// `rungen_gateway_in_flight_requests`, resolved once (after the recorder is installed).
fn in_flight_gauge() -> &'static metrics::Gauge {
    static GAUGE: std::sync::OnceLock<metrics::Gauge> = std::sync::OnceLock::new();
    GAUGE.get_or_init(|| {
        metrics();
        metrics::gauge!("rungen_gateway_in_flight_requests")
    })
}

// ---------------------------------------------------------------------------
// Metric handles for label sets seen before.
//
// `metrics::counter!(name, labels...)` allocates the label strings, sorts
// them, hashes the key and looks it up in the registry on every call: about
// 5,000 instructions per request on the cache-hit path (callgrind). The hot
// path instead keeps, per thread, the handle of every (metric, label values)
// it has used, found by a hash of the borrowed values and confirmed by
// comparing them, so a repeat costs a hash and an atomic add. Label values
// here come from the config and from fixed sets (route templates, methods,
// outcomes), so the memo holds at most the series the registry holds: a few
// per configured client. It is cleared if it ever grows past `MEMO_MAX`
// (sized for 10,000+ clients; the registry keeps every series either way).

const MEMO_MAX: usize = 1 << 16;

/// One memoised series: its key (see [`series_key`]) in one allocation beside
/// its handle, so a lookup reads the map's slot and one short byte string.
/// With 10,000 clients the memo outgrows the CPU caches, and every separate
/// allocation a lookup reads is one more cache miss (label names, label values
/// and the handle in three places cost about ten per request). `next` chains
/// the rare series whose hashes collide.
struct Memo<H> {
    key: Box<[u8]>,
    handle: H,
    next: Option<Box<Memo<H>>>,
}

type MemoMap<H> = std::collections::HashMap<u64, Memo<H>, foldhash::fast::FixedState>;

thread_local! {
    static COUNTERS: std::cell::RefCell<MemoMap<metrics::Counter>> = Default::default();
    static REQUESTS_MEMO: std::cell::RefCell<MemoMap<(metrics::Counter, metrics::Histogram)>> =
        Default::default();
}

/// A cheap hash of the series: the metric name's address, and of each label
/// value its length and its first and last (up to) eight bytes. Equal series hash
/// equally; the rare different series with the same hash (values differing
/// only in the middle) are told apart by the full comparison in [`with_memo`].
/// Label names are fixed per call site and only compared.
fn memo_hash(name: &'static str, labels: &[(&'static str, &str)]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // Up to eight bytes from each end as two words, with plain loads (a
    // variable-length copy into a buffer would call memcpy per label).
    fn ends(b: &[u8]) -> (u64, u64) {
        let n = b.len();
        if n >= 8 {
            let first = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
            let last = u64::from_le_bytes(b[n - 8..].try_into().unwrap_or_default());
            (first, last)
        } else if n >= 4 {
            let first = u32::from_le_bytes(b[..4].try_into().unwrap_or_default());
            let last = u32::from_le_bytes(b[n - 4..].try_into().unwrap_or_default());
            (u64::from(first), u64::from(last))
        } else if n > 0 {
            let w = u64::from(b[0]) | u64::from(b[n / 2]) << 8 | u64::from(b[n - 1]) << 16;
            (w, 0)
        } else {
            (0, 0)
        }
    }
    let mut h = foldhash::fast::FixedState::default().build_hasher();
    h.write_usize(name.as_ptr() as usize);
    for (_, v) in labels {
        let (first, last) = ends(v.as_bytes());
        h.write_u64(first ^ (v.len() as u64).rotate_left(56));
        h.write_u64(last);
    }
    h.finish()
}

/// A series as bytes (made once per series, when it is registered): the
/// metric name's and each label name's address and length (they are `'static`
/// at each call site; one name at two addresses only makes two memo entries for
/// the same registry series), each label's value after its length. Lengths are
/// one byte below 255, else 255 and eight bytes, so different series never
/// encode alike.
fn series_key(name: &'static str, labels: &[(&'static str, &str)]) -> Box<[u8]> {
    fn put_len(out: &mut Vec<u8>, n: usize) {
        match u8::try_from(n) {
            Ok(n) if n < u8::MAX => out.push(n),
            _ => {
                out.push(u8::MAX);
                out.extend_from_slice(&(n as u64).to_le_bytes());
            }
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(&(name.as_ptr() as usize).to_ne_bytes());
    put_len(&mut out, name.len());
    for (k, v) in labels {
        out.extend_from_slice(&(k.as_ptr() as usize).to_ne_bytes());
        put_len(&mut out, k.len());
        put_len(&mut out, v.len());
        out.extend_from_slice(v.as_bytes());
    }
    out.into_boxed_slice()
}

/// Whether `key` is [`series_key`] of this series, read in place (the lookup
/// builds no key of its own).
fn series_is(key: &[u8], name: &'static str, labels: &[(&'static str, &str)]) -> bool {
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        *rest = tail;
        Some(head)
    }
    fn take_len(rest: &mut &[u8]) -> Option<usize> {
        match take(rest, 1)? {
            [n] if *n < u8::MAX => Some(usize::from(*n)),
            _ => usize::try_from(u64::from_le_bytes(take(rest, 8)?.try_into().ok()?)).ok(),
        }
    }
    fn is_static(rest: &mut &[u8], s: &'static str) -> Option<bool> {
        let address = take(rest, std::mem::size_of::<usize>())?;
        Some(address == (s.as_ptr() as usize).to_ne_bytes() && take_len(rest)? == s.len())
    }
    let walk = || -> Option<bool> {
        let mut rest = key;
        if !is_static(&mut rest, name)? {
            return Some(false);
        }
        for (k, v) in labels {
            if !is_static(&mut rest, k)? {
                return Some(false);
            }
            let n = take_len(&mut rest)?;
            if take(&mut rest, n)? != v.as_bytes() {
                return Some(false);
            }
        }
        Some(rest.is_empty())
    };
    walk() == Some(true)
}

fn with_memo<H>(
    map: &'static std::thread::LocalKey<std::cell::RefCell<MemoMap<H>>>,
    name: &'static str,
    labels: &[(&'static str, &str)],
    register: impl FnOnce(Vec<metrics::Label>) -> H,
    f: impl FnOnce(&H),
) {
    let hash = memo_hash(name, labels);
    map.with(|m| {
        let mut m = m.borrow_mut();
        let mut entry = m.get(&hash);
        while let Some(e) = entry {
            if series_is(&e.key, name, labels) {
                return f(&e.handle);
            }
            entry = e.next.as_deref();
        }
        if m.len() >= MEMO_MAX {
            m.clear();
        }
        // A handle taken before the recorder exists would be a no-op forever.
        metrics();
        let handle = register(owned_labels(labels));
        f(&handle);
        let memo = Memo {
            key: series_key(name, labels),
            handle,
            next: None,
        };
        match m.entry(hash) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(memo);
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                // A collision: the new series goes first, the others after it.
                let older = o.insert(memo);
                o.get_mut().next = Some(Box::new(older));
            }
        }
    })
}

// ---------------------------------------------------------------------------
// Per-client series: two series per request carry the client's name, the
// request's and the caller-limit decision's. They are counted in the client's
// per-thread record (`client_local`); series beyond a record's few slots, or
// with long label values, take the memo above.
//
// With thousands of clients a record is out of the CPU's caches, and every
// line of it a request reads is a miss. So what a hit reads is small and
// first: per series a slot of 8 bytes, the thread's number for the series'
// label values other than the client ([`Values::id`]) and the count not yet
// added to the exporter's counter. The counters themselves (three
// allocations each in the exporter) sit out of line, read when a series is
// first seen and when the counts go in: at a scrape ([`render`], through
// `client_local::flush`) or when the record goes. The request's duration
// histogram is labelled by route and method only; one handle per route and
// method serves every client (see [`record_duration`]).

/// The label values of a series other than its client, each after its length
/// byte; zeros after the last. The number of values is fixed per kind of
/// series, so different values never encode alike.
#[derive(PartialEq, Eq, Hash)]
struct Values([u8; 64]);

/// Distinct label values numbered per thread; past it, series of new values
/// take the memo.
const MAX_VALUES: usize = 4096;

/// This thread's numbers for label values.
#[derive(Default)]
struct ValueIds {
    /// Never cleared: the records of this thread hold the numbers.
    ids: std::collections::HashMap<Values, std::num::NonZeroU32, foldhash::fast::FixedState>,
    /// The values numbered last, by how many there are (one kind of series
    /// each, here; eight or more values have none): a thread's requests
    /// mostly repeat them, and comparing them in place costs less than
    /// encoding and hashing them.
    last: [Option<(Values, std::num::NonZeroU32)>; 8],
}

thread_local! {
    static VALUE_IDS: std::cell::RefCell<ValueIds> = Default::default();
}

impl Values {
    /// `None` if they do not fit.
    fn of(values: &[&str]) -> Option<Values> {
        let mut out = [0u8; 64];
        let mut at = 0;
        for v in values {
            let end = at + 1 + v.len();
            out.get_mut(at + 1..end)?.copy_from_slice(v.as_bytes());
            out[at] = u8::try_from(v.len()).ok()?;
            at = end;
        }
        Some(Values(out))
    }

    /// Whether these are [`Values::of`] `values`, read in place, given that
    /// these encode as many values (the rest of the bytes is then zeros).
    fn encodes(&self, values: &[&str]) -> bool {
        let mut at = 0;
        for v in values {
            let end = at + 1 + v.len();
            match (self.0.get(at), self.0.get(at + 1..end)) {
                (Some(n), Some(bytes)) if usize::from(*n) == v.len() && bytes == v.as_bytes() => {}
                _ => return false,
            }
            at = end;
        }
        true
    }

    /// This thread's number for `values` (the same for the same values of a
    /// kind of series); `None` if they do not fit or the thread has numbered
    /// [`MAX_VALUES`] already.
    fn id(values: &[&str]) -> Option<std::num::NonZeroU32> {
        VALUE_IDS.with(|ids| {
            let mut ids = ids.borrow_mut();
            let count = values.len();
            if let Some(Some((v, id))) = ids.last.get(count) {
                if v.encodes(values) {
                    return Some(*id);
                }
            }
            let key = Values::of(values)?;
            let id = match ids.ids.get(&key) {
                Some(id) => *id,
                None if ids.ids.len() >= MAX_VALUES => return None,
                None => {
                    let id = std::num::NonZeroU32::new(u32::try_from(ids.ids.len() + 1).ok()?)?;
                    ids.ids.insert(Values(key.0), id);
                    id
                }
            };
            if let Some(last) = ids.last.get_mut(count) {
                *last = Some((key, id));
            }
            Some(id)
        })
    }
}

/// One series in a client record: its values' number, and the count not yet
/// added to its counter.
#[derive(Clone, Copy, Default)]
struct Slot {
    id: Option<std::num::NonZeroU32>,
    count: u32,
}

/// A client record's slots for `rate_limit_decisions_total{policy="caller"}`
/// (by decision, scope)...
const DECISIONS: std::ops::Range<usize> = 0..2;
/// ... and for `requests_total` (by route, method, status class, scope, cache).
const REQUESTS: std::ops::Range<usize> = 2..5;
const SLOTS: usize = 5;

/// A client's series on one thread (in its `client_local` record): the slots
/// a request reads inline, first (a hit reads the first of each kind), the
/// exporter's counters out of line.
#[derive(Default)]
#[repr(C)]
pub struct ClientSeries {
    slots: [Slot; SLOTS],
    counters: Option<Box<[Option<metrics::Counter>; SLOTS]>>,
}

impl ClientSeries {
    /// The bytes a request reads, from the start.
    pub const HOT_BYTES: usize = std::mem::size_of::<[Slot; SLOTS]>();

    /// Counts one in the series of `values`, in the first of `slots` that
    /// holds it or is free (registering its counter with `register` then);
    /// the values' number, or `None` when they do not fit or every slot holds
    /// another series (the caller takes the memo).
    fn add(
        &mut self,
        slots: std::ops::Range<usize>,
        values: &[&str],
        register: impl FnOnce() -> metrics::Counter,
    ) -> Option<std::num::NonZeroU32> {
        let id = Values::id(values)?;
        let at = slots.into_iter().find(|&i| {
            self.slots
                .get(i)
                .is_some_and(|s| s.id.is_none_or(|k| k == id))
        })?;
        if self.slots[at].id.is_none() {
            // A handle taken before the recorder exists would be a no-op forever.
            metrics();
            self.counters.get_or_insert_with(Default::default)[at] = Some(register());
            self.slots[at].id = Some(id);
        }
        if self.slots[at].count == u32::MAX {
            self.flush_slot(at);
        }
        self.slots[at].count += 1;
        Some(id)
    }

    fn flush_slot(&mut self, at: usize) {
        let count = std::mem::take(&mut self.slots[at].count);
        let counter = self.counters.as_ref().and_then(|c| c[at].as_ref());
        if let (true, Some(counter)) = (count > 0, counter) {
            counter.increment(count.into());
        }
    }

    /// Adds the counts held here to the exporter's counters.
    pub fn flush(&mut self) {
        (0..SLOTS).for_each(|at| self.flush_slot(at));
    }
}

impl Drop for ClientSeries {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The exposition text of every metric, the counts held in client records
/// included (what `/metrics` serves).
pub fn render() -> String {
    crate::client_local::flush();
    metrics().render()
}

/// `rungen_gateway_request_duration_seconds{route, method}`.
fn duration_histogram(labels: Vec<metrics::Label>) -> metrics::Histogram {
    metrics::histogram!("rungen_gateway_request_duration_seconds", labels)
}

/// The handles for one request in `rungen_gateway_requests_total{route,
/// method, status_class, client, scope, cache}` and
/// `rungen_gateway_request_duration_seconds{route, method}` (the histogram's
/// labels are the first two).
fn request_handles(labels: Vec<metrics::Label>) -> (metrics::Counter, metrics::Histogram) {
    let histogram = duration_histogram(labels[..2].to_vec());
    (
        metrics::counter!("rungen_gateway_requests_total", labels),
        histogram,
    )
}

fn owned_labels(labels: &[(&'static str, &str)]) -> Vec<metrics::Label> {
    labels
        .iter()
        .map(|(k, v)| metrics::Label::new(*k, v.to_string()))
        .collect()
}

/// This thread's duration histograms: by the number of a request series'
/// values (see [`record_duration`]), and by route and method.
#[derive(Default)]
struct Durations {
    by_id: Vec<Option<metrics::Histogram>>,
    by_route: std::collections::HashMap<Values, metrics::Histogram, foldhash::fast::FixedState>,
}

thread_local! {
    static DURATIONS: std::cell::RefCell<Durations> = Default::default();
}

/// Records one request of the client-record series numbered `id` in its
/// route and method's duration histogram. Every handle the exporter hands out
/// is an allocation of its own, which with thousands of clients a hit would
/// find out of the CPU's caches if each record held one: here one handle per
/// route and method serves every series with them.
fn record_duration(id: std::num::NonZeroU32, route: &str, method: &str, seconds: f64) {
    DURATIONS.with(|d| {
        let mut d = d.borrow_mut();
        let at = id.get() as usize;
        if let Some(Some(h)) = d.by_id.get(at) {
            return h.record(seconds);
        }
        // A handle taken before the recorder exists would be a no-op forever.
        metrics();
        let labels = || owned_labels(&[("route", route), ("method", method)]);
        let h = match Values::of(&[route, method]) {
            Some(key) => d
                .by_route
                .entry(key)
                .or_insert_with(|| duration_histogram(labels()))
                .clone(),
            None => duration_histogram(labels()),
        };
        h.record(seconds);
        // Numbers stop at MAX_VALUES: this stays small.
        if d.by_id.len() <= at {
            d.by_id.resize(at + 1, None);
        }
        d.by_id[at] = Some(h);
    })
}

/// One request (see [`request_handles`]); `client` is the one the `client`
/// label names, if any.
fn record_request(
    client: Option<&std::sync::Arc<crate::config::Client>>,
    labels: &[(&'static str, &str); 6],
    seconds: f64,
) {
    if let Some(client) = client {
        let [route, method, status, _, scope, cache] = labels.map(|(_, v)| v);
        let id = crate::client_local::with(client, |c| {
            c.series
                .add(REQUESTS, &[route, method, status, scope, cache], || {
                    metrics::counter!("rungen_gateway_requests_total", owned_labels(labels))
                })
        });
        if let Some(id) = id {
            return record_duration(id, route, method, seconds);
        }
    }
    with_memo(
        &REQUESTS_MEMO,
        "rungen_gateway_requests_total",
        labels,
        request_handles,
        |(counter, histogram)| {
            counter.increment(1);
            histogram.record(seconds);
        },
    )
}

/// One caller-limit decision in `rungen_gateway_rate_limit_decisions_total`
/// (`policy="caller"`).
pub fn count_caller_decision(
    client: &std::sync::Arc<crate::config::Client>,
    decision: &'static str,
    scope: &str,
) {
    const NAME: &str = "rungen_gateway_rate_limit_decisions_total";
    let labels = [
        ("policy", "caller"),
        ("decision", decision),
        ("client", client.name.as_str()),
        ("scope", scope),
    ];
    let done = crate::client_local::with(client, |c| {
        c.series.add(DECISIONS, &[decision, scope], || {
            metrics::counter!(NAME, owned_labels(&labels))
        })
    });
    if done.is_none() {
        with_counter(NAME, &labels, |c| c.increment(1));
    }
}

/// `metrics::counter!(name, labels)`, memoised per thread (see above).
pub fn with_counter(
    name: &'static str,
    labels: &[(&'static str, &str)],
    f: impl FnOnce(&metrics::Counter),
) {
    with_memo(&COUNTERS, name, labels, |l| metrics::counter!(name, l), f)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// What the filter built from `level` lets through, of one rustls warning
    /// (as the `log` bridge names it) and one of the gateway's own.
    fn kept_lines(level: &str) -> String {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::try_new(directives(level)).unwrap())
            .with_writer(move || out.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension");
            tracing::error!(target: "rustls::server", "rustls error line");
            tracing::warn!(target: "rungen_gateway::listener", "gateway warning");
        });
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn rustls_warnings_are_dropped_unless_the_level_names_rustls() {
        let default = kept_lines("info");
        assert!(default.contains("gateway warning"), "{default}");
        assert!(default.contains("rustls error line"), "{default}");
        assert!(!default.contains("Illegal SNI"), "{default}");
        let asked = kept_lines("info,rustls=warn");
        assert!(asked.contains("Illegal SNI"), "{asked}");
        assert!(asked.contains("gateway warning"), "{asked}");
    }

    #[test]
    fn method_label_names_standard_methods_only() {
        for m in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
        ] {
            assert_eq!(method_label(&Method::from_bytes(m.as_bytes()).unwrap()), m);
        }
        for m in [
            "get",
            "FOO",
            "PROPFIND",
            "GETX",
            "A-VERY-LONG-INVENTED-METHOD",
        ] {
            assert_eq!(
                method_label(&Method::from_bytes(m.as_bytes()).unwrap()),
                "other"
            );
        }
    }

    /// `rungen_gateway_requests_total` of `client`, as rendered by `text`.
    fn requests_of(text: &str, client: &str) -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("rungen_gateway_requests_total{")
                    && l.contains(&format!("client=\"{client}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    #[test]
    fn client_counts_reach_metrics_at_the_scrape_and_when_a_thread_ends() {
        let client = crate::config::Client::named("pending-counts");
        let labels = |cache| {
            [
                ("route", "app"),
                ("method", "GET"),
                ("status_class", "2xx"),
                ("client", "pending-counts"),
                ("scope", "personal"),
                ("cache", cache),
            ]
        };
        for _ in 0..3 {
            record_request(Some(&client), &labels("hit"), 0.001);
        }
        record_request(Some(&client), &labels("miss"), 0.001);
        // Held in the record until a scrape...
        assert_eq!(requests_of(&metrics().render(), "pending-counts"), 0);
        assert_eq!(requests_of(&render(), "pending-counts"), 4);
        // ... and counted once.
        assert_eq!(requests_of(&render(), "pending-counts"), 4);
        // A thread that ends hands its counts over as its records go.
        let c = client.clone();
        std::thread::spawn(move || {
            for _ in 0..2 {
                record_request(Some(&c), &labels("hit"), 0.001);
            }
        })
        .join()
        .unwrap();
        assert_eq!(requests_of(&metrics().render(), "pending-counts"), 6);
        record_request(Some(&client), &labels("hit"), 0.001);
        assert_eq!(requests_of(&render(), "pending-counts"), 7);
    }

    #[test]
    fn label_values_get_one_number_each_per_thread() {
        let request = ["r", "GET", "2xx", "personal", "hit"];
        let a = Values::id(&["a", "bc"]).unwrap();
        let b = Values::id(&["ab", "c"]).unwrap();
        let five = Values::id(&request).unwrap();
        assert_ne!(a, b, "same bytes, split differently");
        // Again in another order (past the last-values shortcut) and
        // repeated (through it).
        for _ in 0..2 {
            assert_eq!(Values::id(&request), Some(five));
            assert_eq!(Values::id(&["ab", "c"]), Some(b));
            assert_eq!(Values::id(&["ab", "c"]), Some(b));
            assert_eq!(Values::id(&["a", "bc"]), Some(a));
        }
        let miss = Values::id(&["r", "GET", "2xx", "personal", "miss"]).unwrap();
        let longer = Values::id(&["r", "GET", "2xx", "personal", "hits"]).unwrap();
        assert!(![a, b, five, miss].contains(&longer) && ![a, b, five].contains(&miss));
        assert_eq!(Values::id(&request), Some(five));
        assert_eq!(Values::id(&["x".repeat(64).as_str(), ""]), None);
    }

    #[test]
    fn client_slots_register_each_series_once_then_fall_back() {
        let mut series = ClientSeries::default();
        let mut registered = 0;
        let mut add = |series: &mut ClientSeries, values: &[&str]| {
            series.add(DECISIONS, values, || {
                registered += 1;
                metrics::Counter::noop()
            })
        };
        let a = add(&mut series, &["a", "bc"]).unwrap();
        // Same bytes, split differently: another series.
        let b = add(&mut series, &["ab", "c"]).unwrap();
        assert_ne!(a, b);
        assert_eq!(add(&mut series, &["a", "bc"]), Some(a));
        assert_eq!(add(&mut series, &["ab", "c"]), Some(b));
        // Full: the caller takes the general memo.
        assert_eq!(add(&mut series, &["x", "y"]), None);
        let long = "x".repeat(64);
        let mut empty = ClientSeries::default();
        assert_eq!(add(&mut empty, &[&long, ""]), None, "too long to hold");
        assert_eq!(registered, 2);
        // The request slots are apart from the decision slots.
        let r = series.add(REQUESTS, &["a", "bc"], metrics::Counter::noop);
        assert_eq!(r, Some(a));
        let held = |s: &ClientSeries| s.slots.map(|s| s.count);
        assert_eq!(held(&series), [2, 2, 1, 0, 0]);
        series.flush();
        assert_eq!(held(&series), [0; SLOTS]);
    }

    #[test]
    fn a_full_count_goes_to_its_counter_and_counting_goes_on() {
        let mut series = ClientSeries::default();
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = counter.clone();
        series.add(REQUESTS, &["r", "GET", "2xx", "s", "hit"], || {
            metrics::Counter::from_arc(c)
        });
        let at = REQUESTS.start;
        series.slots[at].count = u32::MAX;
        series.add(
            REQUESTS,
            &["r", "GET", "2xx", "s", "hit"],
            || unreachable!(),
        );
        assert_eq!(
            counter.load(std::sync::atomic::Ordering::Relaxed),
            u64::from(u32::MAX)
        );
        assert_eq!(series.slots[at].count, 1);
        drop(series);
        assert_eq!(
            counter.load(std::sync::atomic::Ordering::Relaxed),
            u64::from(u32::MAX) + 1,
            "a record that goes hands its counts over"
        );
    }

    #[test]
    fn one_duration_handle_per_route_and_method_whatever_the_series() {
        const ROUTE: &str = "durations-test";
        std::thread::spawn(|| {
            let a = Values::id(&[ROUTE, "GET", "2xx", "personal", "hit"]).unwrap();
            let b = Values::id(&[ROUTE, "GET", "4xx", "acme", "miss"]).unwrap();
            let c = Values::id(&[ROUTE, "POST", "2xx", "personal", "-"]).unwrap();
            metrics();
            for (id, method) in [(a, "GET"), (b, "GET"), (c, "POST"), (a, "GET")] {
                record_duration(id, ROUTE, method, 0.001);
            }
            DURATIONS.with(|d| {
                let d = d.borrow();
                // Handles are made in `by_route` only: two, app GET and app POST.
                assert_eq!(d.by_route.len(), 2);
                let held = |id: std::num::NonZeroU32| d.by_id[id.get() as usize].is_some();
                assert!(held(a) && held(b) && held(c));
            });
        })
        .join()
        .unwrap();
        let text = render();
        let count = |method: &str| {
            let series = format!("{{route=\"{ROUTE}\",method=\"{method}\"}} ");
            text.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "rungen_gateway_request_duration_seconds_count{series}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        assert_eq!((count("GET"), count("POST")), (Some(3), Some(1)), "{text}");
    }

    #[test]
    fn memo_keeps_series_whose_hashes_collide_apart() {
        thread_local! {
            static SEEN: std::cell::RefCell<MemoMap<String>> = Default::default();
        }
        // One pointer for the metric name (the hash includes its address).
        let m: &'static str = "m";
        // Same length, same first and last eight bytes: the same memo hash.
        let a = "aaaaaaaa-one-bbbbbbbb";
        let b = "aaaaaaaa-two-bbbbbbbb";
        assert_eq!(memo_hash(m, &[("l", a)]), memo_hash(m, &[("l", b)]));
        let mut registered = 0;
        for _ in 0..3 {
            for v in [a, b, "other"] {
                with_memo(
                    &SEEN,
                    m,
                    &[("k", "fixed"), ("l", v)],
                    |labels| {
                        registered += 1;
                        labels[1].value().to_string()
                    },
                    |handle| assert_eq!(handle, v),
                );
            }
        }
        assert_eq!(registered, 3, "each series registered once, then found");
        // A different label name is a different series too (the hash leaves
        // label names out: this one is chained beside `a` and `b`).
        with_memo(
            &SEEN,
            m,
            &[("k", "fixed"), ("x", a)],
            |_| "x".into(),
            |h| assert_eq!(h, "x"),
        );
        let slots = SEEN.with(|s| s.borrow().len());
        assert_eq!(
            slots, 2,
            "a, b and the x series share one slot; other has its own"
        );
    }

    #[test]
    fn series_keys_differ_for_different_series() {
        // One address per name, as at a call site.
        let (m, n, l, k, x): (
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
        ) = ("m", "n", "l", "k", "x");
        let key = series_key;
        let long = "x".repeat(254);
        let longer = "x".repeat(255);
        let longest = "x".repeat(300);
        let series: Vec<Vec<(&'static str, &str)>> = vec![
            vec![],
            vec![(l, "")],
            vec![(l, "a")],
            vec![(l, "ab")],
            vec![(l, "ab"), (k, "c")],
            vec![(l, "a"), (k, "bc")],
            vec![(k, "c"), (l, "ab")],
            vec![(l, "personal-team")],
            vec![(x, "personal-team")],
            vec![(l, long.as_str())],
            vec![(l, longer.as_str())],
            vec![(l, longest.as_str())],
            vec![(l, longer.as_str()), (l, "")],
        ];
        let mut seen = std::collections::HashSet::new();
        for labels in &series {
            let encoded = key(m, labels);
            assert!(series_is(&encoded, m, labels), "{labels:?}");
            assert!(!series_is(&encoded, n, labels), "{labels:?}");
            assert!(
                seen.insert(encoded),
                "{labels:?} encodes like another series"
            );
            for other in &series {
                assert_eq!(series_is(&key(m, other), m, labels), other == labels);
            }
        }
        // A key cut short or with bytes after it is not the series.
        let encoded = key(m, &[(l, "ab")]);
        assert!(!series_is(&encoded[..encoded.len() - 1], m, &[(l, "ab")]));
        assert!(!series_is(&[&encoded[..], b"x"].concat(), m, &[(l, "ab")]));
        // Equal series encode equally, wherever their values live.
        let owned = String::from("personal-team");
        assert_eq!(
            key(m, &[(l, "personal-team")]),
            key(m, &[(l, owned.as_str())])
        );
    }

    #[test]
    fn memo_hash_tells_apart_label_values_of_every_length() {
        // Values that differ only in one byte, at both ends and in the middle
        // of short ones, and by length: each is its own series.
        let values = [
            "",
            "a",
            "b",
            "ab",
            "ba",
            "GET",
            "PUT",
            "2xx",
            "4xx",
            "5xx",
            "hit",
            "miss",
            "HEAD",
            "stale",
            "bypass",
            "acme-1",
            "acme-2",
            "personal",
            "personal-team",
            "personal-team-",
            "x-personal-team",
        ];
        let m: &'static str = "m";
        let mut seen = std::collections::HashSet::new();
        for v in values {
            assert!(
                seen.insert(memo_hash(m, &[("l", v)])),
                "{v:?} hashes like another value"
            );
        }
        // Equal series hash equally, wherever their strings live.
        let owned = String::from("personal-team");
        assert_eq!(
            memo_hash(m, &[("l", "personal-team")]),
            memo_hash(m, &[("l", owned.as_str())])
        );
    }

    #[tokio::test]
    async fn the_response_request_id_is_never_indexed_by_hpack() {
        use tower::{Layer, Service, ServiceExt};
        let inner = tower::service_fn(|req: Request<Body>| {
            // What went on towards the upstream: the same id, indexable.
            assert!(!req.headers()[X_REQUEST_ID].is_sensitive());
            StepFuture::<_, std::convert::Infallible>::ok(Response::new(crate::error::empty_body()))
        });
        let mut svc = AccessLogLayer.layer(inner);
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(crate::error::empty_body()))
            .await
            .unwrap();
        let id = &res.headers()[X_REQUEST_ID];
        assert!(is_trace_id(id.as_bytes()), "{id:?}");
        assert!(id.is_sensitive());
    }

    #[test]
    fn request_ids_are_validated() {
        assert!(valid_request_id(&HeaderValue::from_static("abc-123_x.y:z")));
        assert!(!valid_request_id(&HeaderValue::from_static("")));
        assert!(!valid_request_id(&HeaderValue::from_static("a b")));
        assert!(!valid_request_id(&HeaderValue::from_static("a\"b")));
        let long = "a".repeat(129);
        assert!(!valid_request_id(
            &HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static(""))
        ));
        assert!(valid_request_id(&new_request_id()));
    }

    #[test]
    fn traceparent_is_validated_and_generated_from_the_request_id() {
        assert!(valid_traceparent(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(b"garbage"));
        let rid = new_request_id();
        let tp = new_traceparent(&rid);
        assert!(valid_traceparent(tp.as_bytes()));
        assert_eq!(&tp.as_bytes()[3..35], rid.as_bytes());
    }
}
