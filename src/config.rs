//! Configuration: a raw serde model of the TOML file, validated into one typed
//! model. Every error names the file, the field and the reason.

use crate::secret::Secret;
use http::{HeaderValue, Method, Uri};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------
// Errors

/// A configuration problem: which file, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: field `{}`: {}",
            self.file.display(),
            self.field,
            self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// Collects field errors during validation so that one run reports them all.
struct Problems<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl Problems<'_> {
    fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            field: field.into(),
            reason: reason.into(),
        });
    }
}

/// All problems found in one file (at least one).
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------
// Raw model: exactly the file's shape, unknown keys rejected.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    upstream: RawUpstream,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    rate_limit: RawRateLimit,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    cluster: Option<RawCluster>,
    #[serde(default)]
    reload: RawReload,
    #[serde(default)]
    teams: Vec<RawTeam>,
    #[serde(default)]
    clients: Vec<RawClient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "defaults::listen")]
    listen: String,
    #[serde(default = "defaults::header_read_timeout")]
    header_read_timeout: String,
    #[serde(default = "defaults::shutdown_timeout")]
    shutdown_timeout: String,
    #[serde(default = "defaults::drain_delay")]
    drain_delay: String,
    #[serde(default = "defaults::max_header_bytes")]
    max_header_bytes: usize,
    #[serde(default = "defaults::max_headers")]
    max_headers: usize,
    #[serde(default = "defaults::max_uri_bytes")]
    max_uri_bytes: usize,
    #[serde(default = "defaults::max_body_bytes")]
    max_body_bytes: u64,
    #[serde(default = "defaults::max_connections")]
    max_connections: usize,
    #[serde(default = "defaults::h2_max_concurrent_streams")]
    h2_max_concurrent_streams: u32,
    #[serde(default)]
    plaintext_listen: Option<String>,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default = "defaults::body_read_timeout")]
    body_read_timeout: String,
    #[serde(default = "defaults::max_connections_per_ip")]
    max_connections_per_ip: usize,
    #[serde(default = "defaults::max_requests_per_connection")]
    max_requests_per_connection: u64,
    #[serde(default)]
    allow_chunked_requests: bool,
    #[serde(default)]
    worker_threads: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    client_ca: Option<PathBuf>,
    #[serde(default = "defaults::client_auth")]
    client_auth: String,
    #[serde(default = "defaults::tls_reload_interval")]
    reload_interval: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: defaults::listen(),
            header_read_timeout: defaults::header_read_timeout(),
            shutdown_timeout: defaults::shutdown_timeout(),
            drain_delay: defaults::drain_delay(),
            max_header_bytes: defaults::max_header_bytes(),
            max_headers: defaults::max_headers(),
            max_uri_bytes: defaults::max_uri_bytes(),
            max_body_bytes: defaults::max_body_bytes(),
            max_connections: defaults::max_connections(),
            h2_max_concurrent_streams: defaults::h2_max_concurrent_streams(),
            plaintext_listen: None,
            tls: None,
            body_read_timeout: defaults::body_read_timeout(),
            max_connections_per_ip: defaults::max_connections_per_ip(),
            max_requests_per_connection: defaults::max_requests_per_connection(),
            allow_chunked_requests: false,
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    base_url: String,
    #[serde(default = "defaults::connect_timeout")]
    connect_timeout: String,
    #[serde(default = "defaults::request_timeout")]
    request_timeout: String,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default = "defaults::route_prefixes")]
    route_prefixes: Vec<String>,
    #[serde(default = "defaults::pool_idle_timeout")]
    pool_idle_timeout: String,
    #[serde(default = "defaults::pool_max_idle_per_host")]
    pool_max_idle_per_host: usize,
    #[serde(default = "defaults::upstream_body_timeout")]
    body_timeout: String,
    #[serde(default = "defaults::retries")]
    retries: u32,
    #[serde(default = "defaults::retry_backoff")]
    retry_backoff: String,
    #[serde(default = "defaults::breaker_failures")]
    breaker_failures: u32,
    #[serde(default = "defaults::breaker_cooldown")]
    breaker_cooldown: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    #[serde(default = "defaults::log_level")]
    level: String,
    #[serde(default = "defaults::log_format")]
    format: String,
}

impl Default for RawLogging {
    fn default() -> Self {
        Self {
            level: defaults::log_level(),
            format: defaults::log_format(),
        }
    }
}

/// `{ per_second = 50, burst = 100 }` or `{ per_minute = 600, burst = 100 }`.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    per_second: Option<u32>,
    per_minute: Option<u32>,
    burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    #[serde(default = "defaults::yes")]
    enabled: bool,
    #[serde(default)]
    default: Option<RawQuota>,
    #[serde(default)]
    unauthenticated: Option<RawQuota>,
    #[serde(default)]
    public_per_ip: Option<RawQuota>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default = "defaults::max_in_flight")]
    max_in_flight: usize,
    #[serde(default)]
    upstream_budget: Option<RawQuota>,
    #[serde(default)]
    upstream_max_concurrent: Option<usize>,
    #[serde(default)]
    upstream_queue_timeout: Option<String>,
    #[serde(default = "defaults::prune_interval")]
    prune_interval: String,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            enabled: true,
            default: None,
            unauthenticated: None,
            public_per_ip: None,
            trusted_proxies: Vec::new(),
            max_in_flight: defaults::max_in_flight(),
            upstream_budget: None,
            upstream_max_concurrent: None,
            upstream_queue_timeout: None,
            prune_interval: defaults::prune_interval(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis_url: SecretSource,
    #[serde(default = "defaults::redis_timeout")]
    timeout: String,
    #[serde(default = "defaults::heartbeat")]
    heartbeat: String,
    #[serde(default = "defaults::key_prefix")]
    key_prefix: String,
    #[serde(default)]
    shared_cache: bool,
    #[serde(default = "defaults::shared_lock")]
    shared_lock: String,
    #[serde(default = "defaults::shared_wait")]
    shared_wait: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "defaults::admin_listen")]
    listen: String,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    protect_reads: bool,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: defaults::admin_listen(),
            token_sha256: None,
            protect_reads: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    #[serde(default = "defaults::yes")]
    watch: bool,
    #[serde(default = "defaults::poll_interval")]
    poll_interval: String,
}

impl Default for RawReload {
    fn default() -> Self {
        Self {
            watch: true,
            poll_interval: defaults::poll_interval(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default = "defaults::yes")]
    enabled: bool,
    #[serde(default = "defaults::cache_max_bytes")]
    max_bytes: u64,
    #[serde(default = "defaults::cache_max_entry_bytes")]
    max_entry_bytes: usize,
    #[serde(default = "defaults::coalesce_timeout")]
    coalesce_timeout: String,
    #[serde(default)]
    routes: std::collections::BTreeMap<String, RawRoutePolicy>,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: defaults::cache_max_bytes(),
            max_entry_bytes: defaults::cache_max_entry_bytes(),
            coalesce_timeout: defaults::coalesce_timeout(),
            routes: Default::default(),
        }
    }
}

/// One route's cache policy; absent fields keep that route's default.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRoutePolicy {
    ttl: Option<String>,
    stale_while_revalidate: Option<String>,
    stale_if_error: Option<String>,
    negative_ttl: Option<String>,
    follow_upstream_freshness: Option<bool>,
    allow_client_revalidate: Option<bool>,
    terminal_ttl: Option<String>,
    url_expiry_margin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeam {
    name: String,
    #[serde(default)]
    team_id: Option<String>,
    api_key: SecretSource,
    #[serde(default)]
    upstream_budget: Option<RawQuota>,
    #[serde(default)]
    upstream_max_concurrent: Option<usize>,
    #[serde(default)]
    upstream_queue_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    /// The hex digest, inline or, like a secret, `{ env }` / `{ file }`.
    #[serde(default)]
    token_sha256: Option<SecretSource>,
    #[serde(default)]
    cert_names: Vec<String>,
    teams: Vec<String>,
    #[serde(default = "defaults::methods")]
    methods: Vec<String>,
    #[serde(default)]
    rate_limit: Option<RawQuota>,
    #[serde(default)]
    public: bool,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    ip_rate_limit: Option<RawQuota>,
    #[serde(default)]
    jwt: Option<RawJwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    issuer: String,
    audience: String,
    #[serde(default)]
    hmac_secret: Option<SecretSource>,
    #[serde(default)]
    jwks_file: Option<PathBuf>,
    #[serde(default)]
    jwks_url: Option<String>,
    #[serde(default = "defaults::jwt_leeway")]
    leeway: String,
    #[serde(default)]
    scopes_claim: Option<String>,
    #[serde(default = "defaults::jwks_refresh")]
    jwks_refresh: String,
}

/// Where a secret comes from: `{ env = "NAME" }`, `{ file = "/path" }`, or
/// inline (`"value"` or `{ value = "..." }`, accepted with a loud warning).
#[derive(Debug, Deserialize)]
#[serde(from = "SecretSourceRepr")]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
    Inline(String),
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "a secret: { env = \"NAME\" }, { file = \"/path\" } or { value = \"...\" }"
)]
enum SecretSourceRepr {
    Inline(String),
    Table {
        #[serde(default)]
        env: Option<String>,
        #[serde(default)]
        file: Option<PathBuf>,
        #[serde(default)]
        value: Option<String>,
    },
}

impl From<SecretSourceRepr> for SecretSource {
    fn from(repr: SecretSourceRepr) -> Self {
        match repr {
            SecretSourceRepr::Inline(v) => SecretSource::Inline(v),
            SecretSourceRepr::Table { env, file, value } => match (env, file, value) {
                (Some(e), None, None) => SecretSource::Env(e),
                (None, Some(f), None) => SecretSource::File(f),
                (None, None, Some(v)) => SecretSource::Inline(v),
                _ => SecretSource::Invalid(
                    "give exactly one of `env`, `file` or `value`".to_string(),
                ),
            },
        }
    }
}

/// More runtime threads than this is a typo, not a tuning.
pub const MAX_WORKER_THREADS: usize = 1024;
/// Largest secret file read (a key or a URL is a few hundred bytes; a path
/// pointing at something else by mistake should not be read whole).
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;
/// Largest JWKS file read.
pub const MAX_JWKS_FILE_BYTES: u64 = 1024 * 1024;

/// A UTF-8 file of at most `max` bytes; bigger is an error naming the limit.
pub fn read_limited(path: &Path, max: u64) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(text)
}

impl SecretSource {
    /// Resolves the secret. `Ok((secret, inline))`.
    fn load(&self) -> Result<(Secret, bool), String> {
        let (raw, inline) = match self {
            SecretSource::Env(name) => (
                std::env::var(name)
                    .map_err(|_| format!("environment variable `{name}` is not set"))?,
                false,
            ),
            SecretSource::File(path) => (
                read_limited(path, MAX_SECRET_FILE_BYTES)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?,
                false,
            ),
            SecretSource::Inline(v) => (v.clone(), true),
            SecretSource::Invalid(reason) => return Err(reason.clone()),
        };
        // Files written by `kubectl create secret` or editors often end in a newline.
        let value = raw.trim_end_matches(['\n', '\r']).to_string();
        if value.is_empty() {
            return Err("the secret is empty".to_string());
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            // A byte-order mark or any non-ASCII byte would pass as a header
            // value and fail every upstream request of the scope instead.
            return Err(
                "the secret may hold visible ASCII characters only (no spaces, no byte-order mark)"
                    .to_string(),
            );
        }
        Ok((Secret::new(value), inline))
    }
}

mod defaults {
    pub fn redis_timeout() -> String {
        "250ms".into()
    }
    pub fn heartbeat() -> String {
        "1s".into()
    }
    pub fn key_prefix() -> String {
        "rungen-gateway".into()
    }
    pub fn shared_lock() -> String {
        "5s".into()
    }
    pub fn shared_wait() -> String {
        "2s".into()
    }
    pub fn jwt_leeway() -> String {
        "30s".into()
    }
    pub fn jwks_refresh() -> String {
        "5m".into()
    }
    pub fn body_read_timeout() -> String {
        "30s".into()
    }
    pub fn max_connections_per_ip() -> usize {
        512
    }
    pub fn max_requests_per_connection() -> u64 {
        10_000
    }
    pub fn upstream_body_timeout() -> String {
        "30s".into()
    }
    pub fn retries() -> u32 {
        2
    }
    pub fn retry_backoff() -> String {
        "50ms".into()
    }
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_cooldown() -> String {
        "10s".into()
    }
    pub fn client_auth() -> String {
        "required".into()
    }
    pub fn tls_reload_interval() -> String {
        "10s".into()
    }
    pub fn prune_interval() -> String {
        "60s".into()
    }
    pub fn max_in_flight() -> usize {
        4096
    }
    pub fn admin_listen() -> String {
        "127.0.0.1:9090".into()
    }
    pub fn poll_interval() -> String {
        "5s".into()
    }
    pub fn drain_delay() -> String {
        "5s".into()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn cache_max_bytes() -> u64 {
        64 * 1024 * 1024
    }
    pub fn cache_max_entry_bytes() -> usize {
        1024 * 1024
    }
    pub fn coalesce_timeout() -> String {
        "20s".into()
    }
    pub fn listen() -> String {
        "0.0.0.0:8080".into()
    }
    pub fn header_read_timeout() -> String {
        "10s".into()
    }
    pub fn shutdown_timeout() -> String {
        "30s".into()
    }
    pub fn max_header_bytes() -> usize {
        16 * 1024
    }
    pub fn max_headers() -> usize {
        // hyper's own default: any other value makes hyper build (and fill) a
        // header index of that size for every request it parses.
        100
    }
    pub fn max_uri_bytes() -> usize {
        4096
    }
    pub fn max_body_bytes() -> u64 {
        1024 * 1024
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn h2_max_concurrent_streams() -> u32 {
        128
    }
    pub fn connect_timeout() -> String {
        "2s".into()
    }
    pub fn request_timeout() -> String {
        "15s".into()
    }
    pub fn route_prefixes() -> Vec<String> {
        vec!["/app".into()]
    }
    pub fn pool_idle_timeout() -> String {
        "90s".into()
    }
    pub fn pool_max_idle_per_host() -> usize {
        64
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn log_format() -> String {
        "pretty".into()
    }
    pub fn methods() -> Vec<String> {
        vec!["GET".into(), "HEAD".into()]
    }
}

// ---------------------------------------------------------------------------
// Validated model

/// The whole validated configuration.
#[derive(Debug)]
pub struct Config {
    pub source: PathBuf,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub logging: LoggingConfig,
    pub cache: crate::cache::CacheSettings,
    pub rate_limit: crate::rate_limit::RateLimitSettings,
    /// `None`: single-replica semantics.
    pub cluster: Option<crate::cluster::ClusterSettings>,
    pub admin: AdminConfig,
    pub reload: ReloadConfig,
    pub teams: Vec<Arc<Team>>,
    pub clients: Vec<Arc<Client>>,
    /// JWT verification settings of the clients that use signed tokens.
    pub jwt_clients: Vec<(Arc<Client>, crate::jwt::JwtSettings)>,
    /// Files read besides the config itself, watched for changes: secrets
    /// and the upstream's CA file (a reload builds a new upstream client).
    pub secret_files: Vec<PathBuf>,
    /// Non-fatal findings (inline secrets, ...) to log at start.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub header_read_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// On SIGTERM: time between readiness turning 503 and the listener closing.
    pub drain_delay: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: u64,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    /// A separate plaintext listener beside the TLS one (in-cluster checks).
    pub plaintext_listen: Option<SocketAddr>,
    /// TLS on `listen`; `None`: plaintext HTTP.
    pub tls: Option<crate::tls::TlsSettings>,
    /// Longest wait for the next piece of a request body; then 408.
    pub body_read_timeout: Duration,
    pub max_connections_per_ip: usize,
    /// HTTP/1.1 connections are closed after this many requests (0: no limit).
    pub max_requests_per_connection: u64,
    /// Accept HTTP/1.1 `Transfer-Encoding: chunked` request bodies (411 otherwise).
    pub allow_chunked_requests: bool,
    /// Runtime worker threads; 0: one per CPU the process may use.
    pub worker_threads: usize,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme and authority of the upstream, e.g. `https://api.rungen.ai`.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Path prefix prepended to every forwarded path ("" for none).
    pub base_path: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub route_prefixes: Vec<String>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Longest wait for the next piece of an upstream response body.
    pub body_timeout: Duration,
    /// Retries of idempotent reads (GET/HEAD) on connection failures and 502/503/504.
    pub retries: u32,
    /// First retry delay; doubled per retry, with jitter.
    pub retry_backoff: Duration,
    /// Consecutive upstream failures of a scope that open its circuit (0: no breaker).
    pub breaker_failures: u32,
    /// How long an open circuit fails fast before one probe is let through.
    pub breaker_cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// The admin listener (health, readiness, metrics, config, reload, purge); `None`: off.
    pub listen: Option<SocketAddr>,
    /// SHA-256 of the admin token that mutating calls need; `None`: they are refused.
    pub token_sha256: Option<[u8; 32]>,
    /// `GET /metrics` and `GET /config` need the admin token too (probes stay open).
    pub protect_reads: bool,
}

#[derive(Debug, Clone)]
pub struct ReloadConfig {
    /// Poll the config file and secret files for changes.
    pub watch: bool,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub level: String,
    pub format: LogFormat,
}

/// One RunGen credential scope: a key and, for a team, the team id.
#[derive(Debug)]
pub struct Team {
    /// Used in logs, metrics and cache keys.
    pub name: String,
    /// Sent as `x-team-id`; `None` is the key owner's personal scope.
    pub team_id: Option<HeaderValue>,
    pub api_key: Secret,
}

/// A caller of the gateway.
///
/// `repr(C, align(64))`: the fields every request reads (name, scopes,
/// methods, place) come first, in one cache line (the `Arc`'s counts take the
/// line before), and a client with one scope holds it inline: with thousands
/// of clients, a request misses two of the client's lines in the CPU's
/// caches, where it missed two or three more at any alignment.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct Client {
    pub name: String,
    /// Allowed scopes; the first is the default.
    pub teams: smallvec::SmallVec<[Arc<Team>; 1]>,
    pub methods: Methods,
    /// No credential: matched by the request's `Origin` (browser dashboards).
    pub public: bool,
    /// Its place among its config's clients: per-thread records of the
    /// client are found by it (`client_local`).
    pub index: usize,
    /// `None`: the client authenticates by certificate only.
    pub token_sha256: Option<[u8; 32]>,
    /// Client-certificate names (subject CN or SAN) that identify this client.
    pub cert_names: Vec<String>,
    /// Exact origins (`https://app.example.com`) allowed by CORS, lower-case.
    pub allowed_origins: Vec<String>,
}

#[cfg(test)]
impl Client {
    /// A client with a name and nothing else (unit tests).
    pub(crate) fn named(name: &str) -> Arc<Client> {
        // A place of its own, as in a config.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        Self::named_at(
            name,
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// A client with a name at `index` (unit tests).
    pub(crate) fn named_at(name: &str, index: usize) -> Arc<Client> {
        Arc::new(Client {
            name: name.into(),
            teams: Default::default(),
            methods: Methods::default(),
            public: false,
            index,
            token_sha256: None,
            cert_names: Vec::new(),
            allowed_origins: Vec::new(),
        })
    }
}

/// The methods a client may use, out of those the config accepts: a bit
/// each, held in the client itself (checked on every request; a list would be
/// one more allocation to read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Methods(u8);

impl Methods {
    /// Every method a client can be given, in the order [`Methods::iter`] lists them.
    pub const ALLOWED: [Method; 6] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ];

    fn bit(m: &Method) -> Option<u8> {
        Self::ALLOWED.iter().position(|a| a == m).map(|i| 1 << i)
    }

    pub fn contains(&self, m: &Method) -> bool {
        Self::bit(m).is_some_and(|b| self.0 & b != 0)
    }

    /// Adds `m`; false (and nothing added) if it is not one of [`Methods::ALLOWED`].
    pub fn insert(&mut self, m: &Method) -> bool {
        Self::bit(m).inspect(|b| self.0 |= b).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = &'static Method> + '_ {
        Self::ALLOWED
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, m)| m)
    }
}

impl<'a> FromIterator<&'a Method> for Methods {
    fn from_iter<I: IntoIterator<Item = &'a Method>>(iter: I) -> Self {
        let mut set = Self::default();
        for m in iter {
            set.insert(m);
        }
        set
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                field: "-".into(),
                reason: format!("cannot read the file: {e}"),
            }])
        })?;
        Self::from_toml(path, &text)
    }

    /// Parses and validates TOML text; `path` is used in error messages.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let mut reason = inner.message().to_string();
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                reason = format!("{reason} (line {line})");
            }
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                field: if field == "." { "-".into() } else { field },
                reason,
            }])
        })?;
        validate(path, raw)
    }
}

/// Like `parse_duration`, but zero is allowed ("off").
fn parse_duration_or_zero(p: &mut Problems<'_>, field: &str, value: &str) -> Duration {
    match humantime::parse_duration(value) {
        Ok(d) if d > MAX_CONFIG_DURATION => {
            p.push(field, "must be at most ten years");
            Duration::ZERO
        }
        Ok(d) => d,
        Err(e) => {
            p.push(
                field,
                format!("`{value}` is not a duration like \"5s\", \"1h\" or \"0s\": {e}"),
            );
            Duration::ZERO
        }
    }
}

fn validate_quota(p: &mut Problems<'_>, field: &str, q: &RawQuota) -> governor::Quota {
    let (count, per) = match (q.per_second, q.per_minute) {
        (Some(n), None) => (n, Duration::from_secs(1)),
        (None, Some(n)) => (n, Duration::from_secs(60)),
        _ => {
            p.push(field, "give exactly one of per_second or per_minute");
            (1, Duration::from_secs(1))
        }
    };
    if count == 0 {
        p.push(field, "the rate must be at least 1");
    }
    let burst = q.burst.unwrap_or(count);
    if burst == 0 {
        p.push(format!("{field}.burst"), "must be at least 1");
    }
    crate::rate_limit::quota(count, per, burst)
}

fn validate_cache(p: &mut Problems<'_>, raw: &RawCache) -> crate::cache::CacheSettings {
    use crate::cache::policy::{CachePolicies, RoutePolicy};
    let mut policies = CachePolicies::default();
    for (route, r) in &raw.routes {
        let field = |f: &str| format!("cache.routes.\"{route}\".{f}");
        let target: &mut RoutePolicy = match route.as_str() {
            "/app" => &mut policies.app_list,
            "/app/{id}" => &mut policies.app,
            "/app/{id}/job/{job_id}" => &mut policies.job,
            "other" => &mut policies.other,
            _ => {
                p.push(
                    format!("cache.routes.\"{route}\""),
                    "unknown route: use \"/app\", \"/app/{id}\", \"/app/{id}/job/{job_id}\" or \"other\"",
                );
                continue;
            }
        };
        let mut set = |slot: &mut Duration, name: &str, v: &Option<String>| {
            if let Some(v) = v {
                *slot = parse_duration_or_zero(p, &field(name), v);
            }
        };
        set(&mut target.ttl, "ttl", &r.ttl);
        set(
            &mut target.stale_while_revalidate,
            "stale_while_revalidate",
            &r.stale_while_revalidate,
        );
        set(
            &mut target.stale_if_error,
            "stale_if_error",
            &r.stale_if_error,
        );
        set(&mut target.negative_ttl, "negative_ttl", &r.negative_ttl);
        set(&mut target.terminal_ttl, "terminal_ttl", &r.terminal_ttl);
        set(
            &mut target.url_expiry_margin,
            "url_expiry_margin",
            &r.url_expiry_margin,
        );
        if let Some(b) = r.follow_upstream_freshness {
            target.follow_upstream_freshness = b;
        }
        if let Some(b) = r.allow_client_revalidate {
            target.allow_client_revalidate = b;
        }
        if route != "/app/{id}/job/{job_id}"
            && (r.terminal_ttl.is_some() || r.url_expiry_margin.is_some())
        {
            p.push(field("terminal_ttl"), "only the job route \"/app/{id}/job/{job_id}\" has terminal_ttl and url_expiry_margin");
        }
    }
    if raw.max_bytes < 1024 * 1024 {
        p.push("cache.max_bytes", "must be at least 1048576 (1 MiB)");
    }
    if raw.max_entry_bytes == 0 || raw.max_entry_bytes as u64 > raw.max_bytes / 4 {
        p.push(
            "cache.max_entry_bytes",
            "must be between 1 and a quarter of cache.max_bytes",
        );
    }
    crate::cache::CacheSettings {
        enabled: raw.enabled,
        max_bytes: raw.max_bytes,
        max_entry_bytes: raw.max_entry_bytes,
        coalesce_timeout: parse_duration(p, "cache.coalesce_timeout", &raw.coalesce_timeout),
        policies,
    }
}

/// The longest duration a config may give (ten years): longer ones are typos
/// and would overflow time arithmetic.
const MAX_CONFIG_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Shortest period of a background poll (file watchers, heartbeats, JWKS
/// fetches): anything shorter is a busy loop, not a setting.
const MIN_PERIOD: Duration = Duration::from_millis(100);

/// A duration that sets how often something polls: at least [`MIN_PERIOD`].
fn parse_period(p: &mut Problems<'_>, field: &str, value: &str) -> Duration {
    let d = parse_duration(p, field, value);
    if d < MIN_PERIOD {
        p.push(
            field,
            "must be at least 100ms (it sets how often a background task runs)",
        );
        return MIN_PERIOD;
    }
    d
}

fn parse_duration(p: &mut Problems<'_>, field: &str, value: &str) -> Duration {
    match humantime::parse_duration(value) {
        Ok(d) if d > MAX_CONFIG_DURATION => {
            p.push(field, "must be at most ten years");
            Duration::from_secs(1)
        }
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            p.push(field, "must be greater than zero");
            Duration::from_secs(1)
        }
        Err(e) => {
            p.push(
                field,
                format!("`{value}` is not a duration like \"2s\" or \"500ms\": {e}"),
            );
            Duration::from_secs(1)
        }
    }
}

fn validate(path: &Path, raw: RawConfig) -> Result<Config, ConfigErrors> {
    let mut p = Problems {
        file: path,
        errors: Vec::new(),
    };
    let mut warnings = Vec::new();

    // [server]
    let s = &raw.server;
    let listen = s.listen.parse::<SocketAddr>().unwrap_or_else(|e| {
        p.push(
            "server.listen",
            format!("`{}` is not an address like 0.0.0.0:8080: {e}", s.listen),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    let header_read_timeout =
        parse_duration(&mut p, "server.header_read_timeout", &s.header_read_timeout);
    let shutdown_timeout = parse_duration(&mut p, "server.shutdown_timeout", &s.shutdown_timeout);
    let drain_delay = parse_duration_or_zero(&mut p, "server.drain_delay", &s.drain_delay);
    if s.max_header_bytes < 8192 {
        p.push("server.max_header_bytes", "must be at least 8192");
    }
    if s.max_headers == 0 {
        p.push("server.max_headers", "must be at least 1");
    }
    if s.max_uri_bytes < 64 {
        p.push("server.max_uri_bytes", "must be at least 64");
    }
    if s.max_connections == 0 {
        p.push("server.max_connections", "must be at least 1");
    }
    if s.max_connections_per_ip == 0 {
        p.push(
            "server.max_connections_per_ip",
            "must be at least 1 (no per-IP limit: set it to max_connections)",
        );
    }
    if s.h2_max_concurrent_streams == 0 {
        p.push("server.h2_max_concurrent_streams", "must be at least 1");
    }
    let plaintext_listen = match &s.plaintext_listen {
        None => None,
        Some(a) => match a.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                p.push(
                    "server.plaintext_listen",
                    format!("`{a}` is not an address: {e}"),
                );
                None
            }
        },
    };
    let tls = s.tls.as_ref().and_then(|t| {
        let required = match t.client_auth.as_str() {
            "required" => true,
            "optional" => false,
            other => {
                p.push(
                    "server.tls.client_auth",
                    format!("`{other}` is not one of \"required\", \"optional\""),
                );
                true
            }
        };
        let reload_interval =
            parse_period(&mut p, "server.tls.reload_interval", &t.reload_interval);
        if let Err(e) = crate::tls::load_pair(&t.cert, &t.key) {
            p.push("server.tls.cert", e);
            return None;
        }
        let settings = crate::tls::TlsSettings {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: t.client_ca.clone(),
            client_cert_required: required,
            reload_interval,
        };
        if let Some(ca) = &t.client_ca {
            if let Err(e) = crate::upstream::load_ca_file(ca) {
                p.push("server.tls.client_ca", e);
                return None;
            }
        }
        Some(settings)
    });
    if plaintext_listen.is_some() && tls.is_none() && s.tls.is_none() {
        p.push(
            "server.plaintext_listen",
            "only with [server.tls]: without TLS, `listen` is already plaintext",
        );
    }
    if s.worker_threads > MAX_WORKER_THREADS {
        p.push(
            "server.worker_threads",
            format!("must be at most {MAX_WORKER_THREADS} (0: one per CPU)"),
        );
    }
    if plaintext_listen.is_some_and(|a| same_port(a, listen)) {
        p.push(
            "server.plaintext_listen",
            "must not overlap server.listen (same port on the same or a wildcard address)",
        );
    }
    let server = ServerConfig {
        listen,
        header_read_timeout,
        shutdown_timeout,
        drain_delay,
        max_header_bytes: s.max_header_bytes,
        max_headers: s.max_headers,
        max_uri_bytes: s.max_uri_bytes,
        max_body_bytes: s.max_body_bytes,
        max_connections: s.max_connections,
        h2_max_concurrent_streams: s.h2_max_concurrent_streams,
        plaintext_listen,
        tls,
        body_read_timeout: parse_duration(&mut p, "server.body_read_timeout", &s.body_read_timeout),
        max_connections_per_ip: s.max_connections_per_ip,
        max_requests_per_connection: s.max_requests_per_connection,
        allow_chunked_requests: s.allow_chunked_requests,
        worker_threads: s.worker_threads,
    };

    // [upstream]
    let u = &raw.upstream;
    let (scheme, authority, base_path) = match u.base_url.parse::<Uri>() {
        Ok(uri) => {
            let scheme = uri.scheme().cloned();
            let ok_scheme = matches!(scheme.as_ref().map(|s| s.as_str()), Some("http" | "https"));
            if !ok_scheme {
                p.push("upstream.base_url", "must start with https:// or http://");
            }
            if uri.query().is_some() {
                p.push("upstream.base_url", "must not have a query string");
            }
            if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                // Never used (the scope's key authenticates), and it would be
                // shown wherever the upstream is (logs, GET /config).
                p.push(
                    "upstream.base_url",
                    "must not hold a user or password (user@host): the upstream is authenticated by each scope's api_key",
                );
            }
            match (scheme, uri.authority().cloned()) {
                (Some(s), Some(a)) if ok_scheme => {
                    (s, a, uri.path().trim_end_matches('/').to_string())
                }
                _ => {
                    p.push("upstream.base_url", "must be an absolute URL with a host");
                    (
                        http::uri::Scheme::HTTP,
                        http::uri::Authority::from_static("invalid"),
                        String::new(),
                    )
                }
            }
        }
        Err(e) => {
            // Not echoed: a malformed URL may still hold a password.
            p.push("upstream.base_url", format!("is not a URL: {e}"));
            (
                http::uri::Scheme::HTTP,
                http::uri::Authority::from_static("invalid"),
                String::new(),
            )
        }
    };
    let connect_timeout = parse_duration(&mut p, "upstream.connect_timeout", &u.connect_timeout);
    let request_timeout = parse_duration(&mut p, "upstream.request_timeout", &u.request_timeout);
    let pool_idle_timeout =
        parse_duration(&mut p, "upstream.pool_idle_timeout", &u.pool_idle_timeout);
    if let Some(ca) = &u.ca_file {
        if let Err(reason) = crate::upstream::load_ca_file(ca) {
            p.push("upstream.ca_file", reason);
        }
    }
    if u.route_prefixes.is_empty() {
        p.push("upstream.route_prefixes", "must list at least one prefix");
    }
    for (i, prefix) in u.route_prefixes.iter().enumerate() {
        let valid = prefix.starts_with('/')
            && prefix.len() > 1
            && !prefix.ends_with('/')
            && !prefix.contains("..")
            && !prefix.contains("//")
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b));
        if !valid {
            p.push(
                format!("upstream.route_prefixes[{i}]"),
                format!("`{prefix}` must look like \"/app\": a leading '/', no trailing '/', plain path characters"),
            );
        }
    }
    let upstream = UpstreamConfig {
        scheme,
        authority,
        base_path,
        connect_timeout,
        request_timeout,
        ca_file: u.ca_file.clone(),
        route_prefixes: u.route_prefixes.clone(),
        pool_idle_timeout,
        pool_max_idle_per_host: u.pool_max_idle_per_host,
        body_timeout: parse_duration(&mut p, "upstream.body_timeout", &u.body_timeout),
        retries: if u.retries > MAX_RETRIES {
            p.push(
                "upstream.retries",
                format!("at most {MAX_RETRIES} (all retries share request_timeout)"),
            );
            MAX_RETRIES
        } else {
            u.retries
        },
        retry_backoff: parse_duration_or_zero(&mut p, "upstream.retry_backoff", &u.retry_backoff),
        breaker_failures: u.breaker_failures,
        breaker_cooldown: parse_duration(&mut p, "upstream.breaker_cooldown", &u.breaker_cooldown),
    };

    // [logging]
    let format = match raw.logging.format.as_str() {
        "pretty" => LogFormat::Pretty,
        "json" => LogFormat::Json,
        other => {
            p.push(
                "logging.format",
                format!("`{other}` is not one of \"pretty\", \"json\""),
            );
            LogFormat::Pretty
        }
    };
    if tracing_subscriber::EnvFilter::try_new(&raw.logging.level).is_err() {
        p.push(
            "logging.level",
            format!(
                "`{}` is not a level or filter like \"info\" or \"rungen_gateway=debug\"",
                raw.logging.level
            ),
        );
    }
    let logging = LoggingConfig {
        level: raw.logging.level.clone(),
        format,
    };

    // [cache]
    let cache = validate_cache(&mut p, &raw.cache);

    // [rate_limit]
    let rl = &raw.rate_limit;
    let mut rate_limit = crate::rate_limit::RateLimitSettings {
        enabled: rl.enabled,
        max_in_flight: rl.max_in_flight,
        prune_interval: parse_period(&mut p, "rate_limit.prune_interval", &rl.prune_interval),
        ..Default::default()
    };
    if let Some(q) = &rl.default {
        rate_limit.default_quota = validate_quota(&mut p, "rate_limit.default", q);
    }
    if let Some(q) = &rl.unauthenticated {
        rate_limit.unauthenticated_quota = validate_quota(&mut p, "rate_limit.unauthenticated", q);
    }
    if let Some(q) = &rl.public_per_ip {
        rate_limit.public_ip_quota = validate_quota(&mut p, "rate_limit.public_per_ip", q);
    }
    if rl.max_in_flight == 0 {
        p.push("rate_limit.max_in_flight", "must be at least 1");
    }
    for (i, net) in rl.trusted_proxies.iter().enumerate() {
        let parsed = net
            .parse::<ipnet::IpNet>()
            .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(n) => rate_limit.trusted_proxies.push(n),
            Err(_) => p.push(
                format!("rate_limit.trusted_proxies[{i}]"),
                format!("`{net}` is not an IP address or CIDR like 10.0.0.0/8"),
            ),
        }
    }
    let mut default_budget = crate::rate_limit::default_scope_budget();
    if let Some(q) = &rl.upstream_budget {
        default_budget.quota = validate_quota(&mut p, "rate_limit.upstream_budget", q);
    }
    if let Some(n) = rl.upstream_max_concurrent {
        if n == 0 {
            p.push("rate_limit.upstream_max_concurrent", "must be at least 1");
        }
        default_budget.max_concurrent = n.max(1);
    }
    if let Some(t) = &rl.upstream_queue_timeout {
        default_budget.queue_timeout =
            parse_duration_or_zero(&mut p, "rate_limit.upstream_queue_timeout", t);
    }
    for (i, t) in raw.teams.iter().enumerate() {
        let mut budget = default_budget.clone();
        if let Some(q) = &t.upstream_budget {
            budget.quota = validate_quota(&mut p, &format!("teams[{i}].upstream_budget"), q);
        }
        if let Some(n) = t.upstream_max_concurrent {
            if n == 0 {
                p.push(
                    format!("teams[{i}].upstream_max_concurrent"),
                    "must be at least 1",
                );
            }
            budget.max_concurrent = n.max(1);
        }
        if let Some(d) = &t.upstream_queue_timeout {
            budget.queue_timeout =
                parse_duration_or_zero(&mut p, &format!("teams[{i}].upstream_queue_timeout"), d);
        }
        rate_limit.scope_budgets.insert(t.name.clone(), budget);
    }
    for (i, c) in raw.clients.iter().enumerate() {
        if let Some(q) = &c.rate_limit {
            let quota = validate_quota(&mut p, &format!("clients[{i}].rate_limit"), q);
            rate_limit.client_quotas.insert(c.name.clone(), quota);
        }
        if let Some(q) = &c.ip_rate_limit {
            let quota = validate_quota(&mut p, &format!("clients[{i}].ip_rate_limit"), q);
            rate_limit.client_ip_quotas.insert(c.name.clone(), quota);
        }
    }

    let mut secret_files = Vec::new();
    // A private upstream CA rotates like a secret (a mounted ConfigMap).
    secret_files.extend(upstream.ca_file.clone());
    // [cluster]
    let cluster = raw.cluster.as_ref().and_then(|c| {
        if let SecretSource::File(f) = &c.redis_url {
            secret_files.push(f.clone());
        }
        let url = match c.redis_url.load() {
            Ok((url, _inline)) => url,
            Err(reason) => {
                p.push("cluster.redis_url", reason);
                return None;
            }
        };
        let ok_scheme = url.expose().starts_with("redis://") || url.expose().starts_with("rediss://");
        if !ok_scheme || redis::Client::open(url.expose()).is_err() {
            p.push(
                "cluster.redis_url",
                "must be a redis://host:port or rediss://host:port URL",
            );
            return None;
        }
        if url.expose().contains('@') && matches!(c.redis_url, SecretSource::Inline(_)) {
            warnings.push(format!(
                "{}: cluster.redis_url holds a password inline; use {{ env = \"NAME\" }} or {{ file = \"/path\" }}",
                path.display()
            ));
        }
        if c.key_prefix.is_empty() || !valid_name(&c.key_prefix) {
            p.push("cluster.key_prefix", "1-64 letters, digits, '-', '_' or '.'");
        }
        let shared_lock = parse_duration(&mut p, "cluster.shared_lock", &c.shared_lock);
        let shared_wait = parse_duration_or_zero(&mut p, "cluster.shared_wait", &c.shared_wait);
        if shared_lock > Duration::from_secs(60) {
            p.push("cluster.shared_lock", "must be at most 60s (a lock outliving its holder stalls a key)");
        }
        if shared_wait > shared_lock {
            p.push(
                "cluster.shared_wait",
                "must be at most cluster.shared_lock (waiting past the lock's expiry is never useful)",
            );
        }
        Some(crate::cluster::ClusterSettings {
            redis_url: url,
            timeout: parse_duration(&mut p, "cluster.timeout", &c.timeout),
            heartbeat: parse_period(&mut p, "cluster.heartbeat", &c.heartbeat),
            key_prefix: c.key_prefix.clone(),
            shared_cache: c.shared_cache,
            shared_lock,
            shared_wait,
        })
    });

    // [admin]
    let admin_listen = if raw.admin.listen.is_empty() || raw.admin.listen == "off" {
        None
    } else {
        match raw.admin.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(e) => {
                p.push(
                    "admin.listen",
                    format!(
                        "`{}` is not an address like 127.0.0.1:9090 (or \"off\"): {e}",
                        raw.admin.listen
                    ),
                );
                None
            }
        }
    };
    let public = [Some(listen), server.plaintext_listen];
    if let Some(admin) = admin_listen {
        if public.into_iter().flatten().any(|a| same_port(admin, a)) {
            p.push(
                "admin.listen",
                "must not overlap server.listen or server.plaintext_listen (same port on the same or a wildcard address): the admin API never shares a public port",
            );
        }
    }
    let admin_token = match &raw.admin.token_sha256 {
        None => None,
        Some(h) => match hex::decode(h.trim()) {
            Ok(b) if b.len() == 32 => {
                let mut d = [0u8; 32];
                d.copy_from_slice(&b);
                Some(d)
            }
            _ => {
                p.push(
                    "admin.token_sha256",
                    "must be 64 hex digits (`rungen-gateway new-token` prints one)",
                );
                None
            }
        },
    };
    if raw.admin.protect_reads && admin_token.is_none() {
        p.push("admin.protect_reads", "needs admin.token_sha256");
    }
    let admin = AdminConfig {
        listen: admin_listen,
        token_sha256: admin_token,
        protect_reads: raw.admin.protect_reads,
    };
    let reload = ReloadConfig {
        watch: raw.reload.watch,
        poll_interval: parse_period(&mut p, "reload.poll_interval", &raw.reload.poll_interval),
    };

    // [[teams]]
    if raw.teams.is_empty() {
        p.push("teams", "at least one [[teams]] entry is needed");
    }
    let mut teams: Vec<Arc<Team>> = Vec::new();
    let mut team_by_name: HashMap<String, Arc<Team>> = HashMap::new();
    for (i, t) in raw.teams.iter().enumerate() {
        let field = |f: &str| format!("teams[{i}].{f}");
        if !valid_name(&t.name) {
            p.push(
                field("name"),
                format!(
                    "`{}` must be 1-64 characters of letters, digits, '-', '_' or '.'",
                    t.name
                ),
            );
        }
        if team_by_name.contains_key(&t.name) {
            p.push(field("name"), format!("duplicate team name `{}`", t.name));
        }
        let team_id = match &t.team_id {
            None => None,
            Some(id) if id.is_empty() => {
                p.push(
                    field("team_id"),
                    "is empty; omit it for the key owner's personal scope",
                );
                None
            }
            Some(id) => match HeaderValue::from_str(id) {
                Ok(v) if id.bytes().all(|b| b.is_ascii_graphic()) => Some(v),
                _ => {
                    p.push(
                        field("team_id"),
                        "contains characters not allowed in a header",
                    );
                    None
                }
            },
        };
        if let SecretSource::File(f) = &t.api_key {
            secret_files.push(f.clone());
        }
        let api_key = match t.api_key.load() {
            Ok((secret, inline)) => {
                if inline {
                    warnings.push(format!(
                        "{}: {}: the RunGen API key is written inline in the config file; \
                         use {{ env = \"NAME\" }} or {{ file = \"/path\" }} outside demos",
                        path.display(),
                        field("api_key")
                    ));
                }
                secret
            }
            Err(reason) => {
                p.push(field("api_key"), reason);
                Secret::new("")
            }
        };
        let team = Arc::new(Team {
            name: t.name.clone(),
            team_id,
            api_key,
        });
        team_by_name.insert(t.name.clone(), team.clone());
        teams.push(team);
    }

    // [[clients]]
    if raw.clients.is_empty() {
        warnings.push(format!(
            "{}: no [[clients]] are configured: every request will be refused",
            path.display()
        ));
    }
    let mut clients = Vec::new();
    let mut jwt_clients: Vec<(Arc<Client>, crate::jwt::JwtSettings)> = Vec::new();
    let mut names = HashSet::new();
    let mut digests: HashMap<[u8; 32], String> = HashMap::new();
    // Certificate names and public origins pick a client: each names one.
    let mut cert_owner: HashMap<String, String> = HashMap::new();
    let mut origin_owner: HashMap<String, String> = HashMap::new();
    for (i, c) in raw.clients.iter().enumerate() {
        let field = |f: &str| format!("clients[{i}].{f}");
        if !valid_name(&c.name) {
            p.push(
                field("name"),
                format!(
                    "`{}` must be 1-64 characters of letters, digits, '-', '_' or '.'",
                    c.name
                ),
            );
        }
        if !names.insert(c.name.clone()) {
            p.push(field("name"), format!("duplicate client name `{}`", c.name));
        }
        let mut token_sha256: Option<[u8; 32]> = None;
        let kinds = [
            c.token_sha256.is_some() || !c.cert_names.is_empty(),
            c.public,
            c.jwt.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            p.push(
                field("public"),
                "a client is one of: token/certificate (token_sha256, cert_names), public = true, or jwt = { ... }",
            );
        }
        if let Some(SecretSource::File(f)) = &c.token_sha256 {
            secret_files.push(f.clone());
        }
        // A digest is not a secret: inline is the normal form (no warning).
        let hash_text = match c.token_sha256.as_ref().map(SecretSource::load) {
            None => None,
            Some(Ok((text, _inline))) => Some(text),
            Some(Err(reason)) => {
                p.push(field("token_sha256"), reason);
                continue;
            }
        };
        match hash_text.map(|t| hex::decode(t.expose().trim())) {
            None if !c.cert_names.is_empty() || c.public || c.jwt.is_some() => {}
            None => p.push(
                field("token_sha256"),
                "is missing: a client needs token_sha256, cert_names, public = true or jwt",
            ),
            Some(Ok(bytes)) if bytes.len() == 32 => {
                let mut d = [0u8; 32];
                d.copy_from_slice(&bytes);
                token_sha256 = Some(d);
            }
            Some(_) => p.push(
                field("token_sha256"),
                "must be 64 hex digits (the SHA-256 of the token; `rungen-gateway new-token` prints one)",
            ),
        }
        for (j, n) in c.cert_names.iter().enumerate() {
            if n.trim().is_empty() {
                p.push(format!("clients[{i}].cert_names[{j}]"), "is empty");
            } else if let Some(other) = cert_owner.insert(n.clone(), c.name.clone()) {
                p.push(
                    format!("clients[{i}].cert_names[{j}]"),
                    format!("`{n}` already identifies client `{other}` (a certificate name picks one client)"),
                );
            }
        }
        if !c.cert_names.is_empty() && s.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            p.push(
                field("cert_names"),
                "client certificates need [server.tls] client_ca",
            );
        }
        if let Some(digest) = token_sha256 {
            if Some(digest) == admin.token_sha256 {
                p.push(
                    field("token_sha256"),
                    "is the admin token's hash: a client's token must not also open the admin API",
                );
            }
            if let Some(other) = digests.insert(digest, c.name.clone()) {
                p.push(
                    field("token_sha256"),
                    format!("duplicate token: the same hash is already used by client `{other}`"),
                );
            }
        }
        if c.teams.is_empty() {
            p.push(
                field("teams"),
                "must name at least one team (the first is the default scope)",
            );
        }
        let mut client_teams = smallvec::SmallVec::<[Arc<Team>; 1]>::new();
        for (j, name) in c.teams.iter().enumerate() {
            match team_by_name.get(name) {
                Some(t) => {
                    if client_teams.iter().any(|x: &Arc<Team>| x.name == *name) {
                        p.push(
                            format!("clients[{i}].teams[{j}]"),
                            format!("team `{name}` is listed twice"),
                        );
                    }
                    client_teams.push(t.clone())
                }
                None => p.push(
                    format!("clients[{i}].teams[{j}]"),
                    format!("unknown team `{name}` (no [[teams]] entry has this name)"),
                ),
            }
        }
        let mut methods = Methods::default();
        for (j, m) in c.methods.iter().enumerate() {
            let upper = m.to_ascii_uppercase();
            let known = Method::from_bytes(upper.as_bytes()).is_ok_and(|m| methods.insert(&m));
            if !known {
                p.push(
                    format!("clients[{i}].methods[{j}]"),
                    format!(
                        "`{upper}` is not one of {}",
                        Methods::ALLOWED.map(|m| m.to_string()).join(", ")
                    ),
                );
            }
        }
        let mut origins = Vec::new();
        for (j, o) in c.allowed_origins.iter().enumerate() {
            match valid_origin(o) {
                Some(o) => origins.push(o),
                None => p.push(
                    format!("clients[{i}].allowed_origins[{j}]"),
                    format!("`{o}` is not an exact origin like \"https://app.example.com\" (no path, no wildcard)"),
                ),
            }
        }
        if c.public {
            for (j, o) in origins.iter().enumerate() {
                if let Some(other) = origin_owner.insert(o.clone(), c.name.clone()) {
                    p.push(
                        format!("clients[{i}].allowed_origins[{j}]"),
                        format!("`{o}` already picks public client `{other}` (an origin picks one public client)"),
                    );
                }
            }
        }
        if c.public && origins.is_empty() {
            p.push(
                field("allowed_origins"),
                "a public client is matched by Origin: list at least one",
            );
        }
        if c.ip_rate_limit.is_some() && !c.public {
            p.push(
                field("ip_rate_limit"),
                "only public clients have a per-IP limit",
            );
        }
        let client = Arc::new(Client {
            name: c.name.clone(),
            token_sha256,
            cert_names: c.cert_names.clone(),
            public: c.public,
            index: i,
            allowed_origins: origins,
            teams: client_teams,
            methods,
        });
        if let Some(j) = &c.jwt {
            if let Some(settings) =
                validate_jwt(&mut p, i, j, path, &mut warnings, &mut secret_files)
            {
                let same = jwt_clients
                    .iter()
                    .find(|(_, s)| s.issuer == settings.issuer && s.audience == settings.audience);
                if let Some((other, _)) = same {
                    p.push(
                        field("jwt.audience"),
                        format!(
                            "client `{}` already takes tokens of issuer `{}` for audience `{}` (issuer and audience pick one client)",
                            other.name, settings.issuer, settings.audience
                        ),
                    );
                }
                jwt_clients.push((client.clone(), settings));
            }
        }
        clients.push(client);
    }

    if upstream.request_timeout > cache.coalesce_timeout {
        warnings.push(format!(
            "{}: upstream.request_timeout ({:?}) is longer than cache.coalesce_timeout ({:?}): callers waiting on a slow cache fill get 504 before the fill itself times out",
            path.display(),
            upstream.request_timeout,
            cache.coalesce_timeout
        ));
    }
    if !p.errors.is_empty() {
        return Err(ConfigErrors(p.errors));
    }
    Ok(Config {
        source: path.to_path_buf(),
        server,
        upstream,
        logging,
        cache,
        rate_limit,
        cluster,
        admin,
        reload,
        teams,
        clients,
        jwt_clients,
        secret_files,
        warnings,
    })
}

/// Whether two listen addresses would fight over one port: the same port on
/// the same address, or with a wildcard address covering the other (`[::]`
/// covers IPv4 too on a dual-stack host). Port 0 never clashes.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    let covers =
        |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Most retries of one upstream read (`upstream.retries`).
pub const MAX_RETRIES: u32 = 10;

/// An exact origin, lower-cased: `scheme://host[:port]`.
fn valid_origin(o: &str) -> Option<String> {
    let lower = o.trim().to_ascii_lowercase();
    let uri: Uri = lower.parse().ok()?;
    let scheme = uri.scheme_str()?;
    if !matches!(scheme, "http" | "https") || uri.authority().is_none() {
        return None;
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") || lower.ends_with('/') {
        return None;
    }
    if lower.contains('*') {
        return None;
    }
    Some(lower)
}

fn validate_jwt(
    p: &mut Problems<'_>,
    i: usize,
    j: &RawJwt,
    path: &Path,
    warnings: &mut Vec<String>,
    secret_files: &mut Vec<PathBuf>,
) -> Option<crate::jwt::JwtSettings> {
    use crate::jwt::KeySource;
    let field = |f: &str| format!("clients[{i}].jwt.{f}");
    let before = p.errors.len();
    if j.issuer.trim().is_empty() {
        p.push(field("issuer"), "must not be empty");
    }
    if j.audience.trim().is_empty() {
        p.push(field("audience"), "must not be empty");
    }
    let keys = match (&j.hmac_secret, &j.jwks_file, &j.jwks_url) {
        (Some(s), None, None) => {
            if let SecretSource::File(f) = s {
                secret_files.push(f.clone());
            }
            match s.load() {
                Ok((secret, inline)) => {
                    if inline {
                        warnings.push(format!(
                            "{}: {}: the JWT secret is written inline in the config file",
                            path.display(),
                            field("hmac_secret")
                        ));
                    }
                    if secret.expose().len() < 32 {
                        p.push(field("hmac_secret"), "must be at least 32 bytes");
                    }
                    Some(KeySource::Hmac(secret))
                }
                Err(reason) => {
                    p.push(field("hmac_secret"), reason);
                    None
                }
            }
        }
        (None, Some(f), None) => {
            match read_limited(f, MAX_JWKS_FILE_BYTES)
                .map_err(|e| format!("cannot read {}: {e}", f.display()))
                .and_then(|t| crate::jwt::parse_jwks(&t).map(|_| ()))
            {
                Ok(()) => {
                    secret_files.push(f.clone());
                    Some(KeySource::JwksFile(f.clone()))
                }
                Err(e) => {
                    p.push(field("jwks_file"), e);
                    None
                }
            }
        }
        (None, None, Some(u)) => match u.parse::<Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("https" | "http"))
                    && uri.authority().is_some() =>
            {
                // Whoever can change the key set in transit can sign tokens.
                let loopback = matches!(uri.host(), Some("localhost"))
                    || uri
                        .host()
                        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
                        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
                        .is_some_and(|ip| ip.is_loopback());
                if uri.scheme_str() == Some("http") && !loopback {
                    warnings.push(format!(
                        "{}: {}: the key set is fetched over plain http: anyone who can alter that connection can sign tokens this gateway accepts (use https)",
                        path.display(),
                        field("jwks_url")
                    ));
                }
                Some(KeySource::JwksUrl(uri))
            }
            _ => {
                p.push(field("jwks_url"), format!("`{u}` is not an http(s) URL"));
                None
            }
        },
        _ => {
            p.push(
                format!("clients[{i}].jwt"),
                "give exactly one of hmac_secret, jwks_file or jwks_url",
            );
            None
        }
    };
    let leeway = parse_duration_or_zero(p, &field("leeway"), &j.leeway);
    if leeway > Duration::from_secs(300) {
        p.push(
            field("leeway"),
            "at most 5m: the leeway is for clock skew only",
        );
    }
    let jwks_refresh = parse_period(p, &field("jwks_refresh"), &j.jwks_refresh);
    if p.errors.len() > before {
        return None;
    }
    Some(crate::jwt::JwtSettings {
        issuer: j.issuer.clone(),
        audience: j.audience.clone(),
        keys: keys?,
        leeway,
        scopes_claim: j.scopes_claim.clone(),
        jwks_refresh,
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    const TOKEN_HASH: &str = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";

    #[test]
    fn what_a_request_reads_of_a_client_is_one_cache_line() {
        // Name, scopes (the first inline: see the minimal config's test),
        // methods, public, place.
        let hot = std::mem::offset_of!(Client, index) + std::mem::size_of::<usize>();
        assert!(hot <= 64, "{hot} bytes");
        assert_eq!(std::mem::align_of::<Client>(), 64);
    }

    #[test]
    fn method_sets_hold_the_allowed_methods_only() {
        let mut set = Methods::default();
        assert!(Methods::ALLOWED.iter().all(|m| !set.contains(m)));
        assert!(set.insert(&Method::PATCH));
        assert!(set.insert(&Method::GET));
        assert!(set.insert(&Method::GET), "inserting twice is fine");
        for m in [Method::OPTIONS, Method::TRACE, Method::CONNECT] {
            assert!(!set.insert(&m), "{m}");
            assert!(!set.contains(&m), "{m}");
        }
        let ext = Method::from_bytes(b"PURGE").unwrap();
        assert!(!set.insert(&ext) && !set.contains(&ext));
        assert!(set.contains(&Method::GET) && set.contains(&Method::PATCH));
        assert!(!set.contains(&Method::HEAD) && !set.contains(&Method::POST));
        // Listed in the fixed order, each once.
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![&Method::GET, &Method::PATCH]
        );
        let all: Methods = Methods::ALLOWED.iter().collect();
        assert_eq!(all.iter().count(), 6);
        assert!(Methods::ALLOWED.iter().all(|m| all.contains(m)));
    }

    /// A minimal valid config with `extra` appended (tables after the clients).
    pub(crate) fn base(extra: &str) -> String {
        format!(
            r#"
[upstream]
base_url = "https://api.rungen.ai"

[[teams]]
name = "acme"
team_id = "123e4567-e89b-12d3-a456-426614174000"
api_key = {{ value = "k1" }}

[[clients]]
name = "billing"
token_sha256 = "{TOKEN_HASH}"
teams = ["acme"]
{extra}
"#
        )
    }

    /// The reason given for `field` ("" when the config has no error there).
    fn reason(text: &str, field: &str) -> String {
        errors(text)
            .into_iter()
            .find(|e| e.field == field)
            .map(|e| e.reason)
            .unwrap_or_default()
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        Config::from_toml(Path::new("test.toml"), text)
            .unwrap_err()
            .0
    }

    #[test]
    fn minimal_config_validates_with_defaults() {
        let c = Config::from_toml(Path::new("t.toml"), &base("")).unwrap();
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.upstream.authority.as_str(), "api.rungen.ai");
        assert_eq!(c.upstream.route_prefixes, vec!["/app".to_string()]);
        assert_eq!(
            c.clients[0].methods.iter().collect::<Vec<_>>(),
            vec![&Method::GET, &Method::HEAD]
        );
        assert_eq!(c.clients[0].teams[0].name, "acme");
        assert!(!c.clients[0].teams.spilled(), "one scope is held inline");
        // The inline key is accepted with a warning.
        assert!(c.warnings.iter().any(|w| w.contains("inline")));
    }

    #[test]
    fn retries_are_bounded() {
        let with =
            |n: u32| base("").replace("[upstream]\n", &format!("[upstream]\nretries = {n}\n"));
        assert!(Config::from_toml(Path::new("t.toml"), &with(MAX_RETRIES)).is_ok());
        assert!(reason(&with(40), "upstream.retries").contains("at most 10"));
    }

    #[test]
    fn a_request_timeout_past_the_coalesce_timeout_is_warned_about() {
        let warned = |c: &Config| c.warnings.iter().any(|w| w.contains("coalesce_timeout"));
        let c = Config::from_toml(Path::new("t.toml"), &base("")).unwrap();
        assert!(!warned(&c), "the defaults (15 s, 20 s) are consistent");
        let slow = base("").replace("[upstream]\n", "[upstream]\nrequest_timeout = \"30s\"\n");
        let c = Config::from_toml(Path::new("t.toml"), &slow).unwrap();
        assert!(warned(&c), "{:?}", c.warnings);
    }

    #[test]
    fn a_jwks_url_over_plain_http_is_warned_about_unless_loopback() {
        let jwt = |url: &str| {
            let text = format!(
                "{}\n[[clients]]\nname = \"sso\"\nteams = [\"acme\"]\njwt = {{ issuer = \"https://i\", audience = \"a\", jwks_url = \"{url}\" }}\n",
                base("")
            );
            let c = Config::from_toml(Path::new("t.toml"), &text).unwrap();
            c.warnings.iter().any(|w| w.contains("plain http"))
        };
        assert!(jwt("http://idp.example/jwks.json"));
        assert!(jwt("http://10.0.0.7:8080/jwks.json"));
        assert!(!jwt("https://idp.example/jwks.json"));
        assert!(!jwt("http://127.0.0.1:9000/jwks.json"));
        assert!(!jwt("http://[::1]:9000/jwks.json"));
        assert!(!jwt("http://localhost/jwks.json"));
    }

    #[test]
    fn worker_threads_defaults_to_auto_and_is_bounded() {
        let c = Config::from_toml(Path::new("t.toml"), &base("")).unwrap();
        assert_eq!(c.server.worker_threads, 0);
        let c = Config::from_toml(
            Path::new("t.toml"),
            &format!("[server]\nworker_threads = 3\n{}", base("")),
        )
        .unwrap();
        assert_eq!(c.server.worker_threads, 3);
        let e = errors(&format!("[server]\nworker_threads = 5000\n{}", base("")));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "server.worker_threads");
        assert!(e[0].reason.contains("at most 1024"), "{}", e[0].reason);
        let e = errors(&format!("[server]\nworker_threads = -1\n{}", base("")));
        assert!(e[0].to_string().contains("worker_threads"), "{}", e[0]);
    }

    #[test]
    fn unknown_key_names_the_field_and_file() {
        let e = errors(&base("colour = \"blue\""));
        assert_eq!(e.len(), 1);
        let msg = e[0].to_string();
        assert!(msg.starts_with("test.toml: field `clients[0]"), "{msg}");
        assert!(msg.contains("unknown field `colour`"), "{msg}");
    }

    #[test]
    fn bad_duration_names_the_field() {
        let text = base("").replace(
            "base_url = \"https://api.rungen.ai\"",
            "base_url = \"https://api.rungen.ai\"\nconnect_timeout = \"2 parsecs\"",
        );
        let e = errors(&text);
        assert_eq!(e[0].field, "upstream.connect_timeout");
        assert!(e[0].reason.contains("2 parsecs"));
    }

    #[test]
    fn odd_values_that_would_only_fail_later_fail_now() {
        // A password in the upstream URL: refused, and never echoed.
        let url = base("").replace(
            "https://api.rungen.ai",
            "https://ops:hunter2-canary@api.rungen.ai",
        );
        let why = reason(&url, "upstream.base_url");
        assert!(why.contains("user or password"), "{why}");
        let all: Vec<String> = errors(&url).iter().map(|e| e.to_string()).collect();
        assert!(!all.join(" ").contains("hunter2-canary"), "{all:?}");
        let broken = base("").replace("https://api.rungen.ai", "https://ops:hunter2-canary@[::1");
        let all: Vec<String> = errors(&broken).iter().map(|e| e.to_string()).collect();
        assert!(!all.join(" ").contains("hunter2-canary"), "{all:?}");
        // A key with a byte-order mark would pass as a header value and fail
        // every request of its scope.
        let bom = base("").replace("{ value = \"k1\" }", "{ value = \"\u{feff}k1\" }");
        assert!(reason(&bom, "teams[0].api_key").contains("visible ASCII"));
        // A poll every nanosecond is a busy loop.
        let busy = base("[reload]\npoll_interval = \"1ns\"\n");
        assert!(reason(&busy, "reload.poll_interval").contains("at least 100ms"));
        // The pruner walks every per-IP limiter under a write lock.
        let prune = base("[rate_limit]\nprune_interval = \"1ms\"\n");
        assert!(reason(&prune, "rate_limit.prune_interval").contains("at least 100ms"));
        // 0 connections per IP is not "no limit".
        let zero = format!("[server]\nmax_connections_per_ip = 0\n{}", base(""));
        assert!(reason(&zero, "server.max_connections_per_ip").contains("at least 1"));
    }

    #[test]
    fn listeners_that_would_fight_over_a_port_are_refused() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(same_port(a("0.0.0.0:8080"), a("127.0.0.1:8080")));
        assert!(same_port(a("127.0.0.1:8080"), a("[::]:8080")));
        assert!(same_port(a("[::1]:8080"), a("[::1]:8080")));
        assert!(!same_port(a("0.0.0.0:8080"), a("[::1]:8080")));
        assert!(!same_port(a("127.0.0.1:8080"), a("127.0.0.2:8080")));
        assert!(!same_port(a("0.0.0.0:8080"), a("0.0.0.0:9090")));
        assert!(!same_port(a("0.0.0.0:0"), a("127.0.0.1:0")));
        let fields = |server: &str, admin: &str| {
            let text = format!("[server]\n{server}\n[admin]\n{admin}\n{}", base(""));
            errors(&text)
                .into_iter()
                .map(|e| e.field)
                .collect::<Vec<_>>()
        };
        assert!(
            fields("listen = \"0.0.0.0:8080\"", "listen = \"127.0.0.1:8080\"")
                .contains(&"admin.listen".to_string())
        );
    }

    #[test]
    fn what_picks_a_client_picks_one() {
        let reason = |extra: &str, field: &str| reason(&base(extra), field);
        let certs = "[[clients]]\nname = \"a\"\ncert_names = [\"svc.internal\"]\nteams = [\"acme\"]\n\n[[clients]]\nname = \"b\"\ncert_names = [\"svc.internal\"]\nteams = [\"acme\"]\nmethods = [\"GET\", \"POST\"]\n";
        assert!(
            reason(certs, "clients[2].cert_names[0]").contains("already identifies client `a`")
        );
        let origins = "[[clients]]\nname = \"a\"\npublic = true\nallowed_origins = [\"https://app.example\"]\nteams = [\"acme\"]\n\n[[clients]]\nname = \"b\"\npublic = true\nallowed_origins = [\"https://APP.example\"]\nteams = [\"acme\"]\n";
        assert!(
            reason(origins, "clients[2].allowed_origins[0]")
                .contains("already picks public client `a`")
        );
        let admin = format!("[admin]\ntoken_sha256 = \"{TOKEN_HASH}\"\n");
        assert!(reason(&admin, "clients[0].token_sha256").contains("admin token"));
        let jwt = |name: &str, aud: &str| {
            format!(
                "[[clients]]\nname = \"{name}\"\nteams = [\"acme\"]\njwt = {{ issuer = \"https://idp\", audience = \"{aud}\", hmac_secret = {{ value = \"0123456789abcdef0123456789abcdef\" }} }}\n"
            )
        };
        let twice = format!("{}{}", jwt("a", "x"), jwt("b", "x"));
        assert!(
            reason(&twice, "clients[2].jwt.audience").contains("client `a` already takes tokens")
        );
        // One issuer, two audiences: two clients.
        let two = format!("{}{}", jwt("a", "x"), jwt("b", "y"));
        assert!(Config::from_toml(Path::new("t.toml"), &base(&two)).is_ok());
    }

    #[test]
    fn unknown_team_duplicate_token_and_missing_env_are_reported_together() {
        let text = format!(
            "{}\n[[clients]]\nname = \"other\"\ntoken_sha256 = \"{TOKEN_HASH}\"\nteams = [\"nope\"]\n\n[[teams]]\nname = \"t2\"\napi_key = {{ env = \"RUNGEN_GATEWAY_TEST_SURELY_UNSET\" }}\n",
            base("")
        );
        let e = errors(&text);
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"teams[1].api_key"), "{fields:?}");
        assert!(fields.contains(&"clients[1].token_sha256"), "{fields:?}");
        assert!(fields.contains(&"clients[1].teams[0]"), "{fields:?}");
        let dup = e
            .iter()
            .find(|e| e.field == "clients[1].token_sha256")
            .unwrap();
        assert!(dup.reason.contains("duplicate token"));
    }

    #[test]
    fn unreadable_secret_file_is_an_error() {
        let text = base("").replace(
            "api_key = { value = \"k1\" }",
            "api_key = { file = \"/nonexistent/secret\" }",
        );
        let e = errors(&text);
        assert_eq!(e[0].field, "teams[0].api_key");
        assert!(e[0].reason.contains("/nonexistent/secret"));
    }

    #[test]
    fn secret_file_is_trimmed_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "file-secret-canary\n").unwrap();
        let text = base("").replace(
            "api_key = { value = \"k1\" }",
            &format!("api_key = {{ file = \"{}\" }}", f.display()),
        );
        let c = Config::from_toml(Path::new("t.toml"), &text).unwrap();
        assert_eq!(c.teams[0].api_key.expose(), "file-secret-canary");
        assert!(!format!("{c:?}").contains("file-secret-canary"));
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn oversized_secret_file_is_refused_with_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big");
        std::fs::write(&f, "k".repeat(MAX_SECRET_FILE_BYTES as usize + 1)).unwrap();
        let text = base("").replace(
            "api_key = { value = \"k1\" }",
            &format!("api_key = {{ file = \"{}\" }}", f.display()),
        );
        let e = errors(&text);
        assert_eq!(e[0].field, "teams[0].api_key");
        assert!(
            e[0].reason
                .contains(&format!("larger than {MAX_SECRET_FILE_BYTES} bytes")),
            "{}",
            e[0].reason
        );
        // Exactly at the limit is read (and then judged as a secret).
        std::fs::write(&f, "k".repeat(MAX_SECRET_FILE_BYTES as usize)).unwrap();
        assert!(read_limited(&f, MAX_SECRET_FILE_BYTES).is_ok());
    }

    #[test]
    fn token_hash_may_come_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hash");
        std::fs::write(&f, format!("{TOKEN_HASH}\n")).unwrap();
        let text = base("").replace(
            &format!("token_sha256 = \"{TOKEN_HASH}\""),
            &format!("token_sha256 = {{ file = \"{}\" }}", f.display()),
        );
        let c = Config::from_toml(Path::new("t.toml"), &text).unwrap();
        assert_eq!(
            c.clients[0].token_sha256.map(hex::encode).as_deref(),
            Some(TOKEN_HASH)
        );
        assert!(c.secret_files.contains(&f), "watched for reloads");
        assert!(
            !c.warnings.iter().any(|w| w.contains("token_sha256")),
            "a digest is not a secret: {:?}",
            c.warnings
        );

        let text = base("").replace(
            &format!("token_sha256 = \"{TOKEN_HASH}\""),
            "token_sha256 = { env = \"RUNGEN_GATEWAY_TEST_SURELY_UNSET\" }",
        );
        let e = errors(&text);
        assert_eq!(e[0].field, "clients[0].token_sha256");
        assert!(e[0].reason.contains("RUNGEN_GATEWAY_TEST_SURELY_UNSET"));
    }

    #[test]
    fn bad_token_hash_method_and_base_url() {
        let text = base("methods = [\"GET\", \"TRACE\"]")
            .replace(TOKEN_HASH, "abc")
            .replace("https://api.rungen.ai", "ftp://x");
        let errors = errors(&text);
        let method = errors.iter().find(|e| e.field == "clients[0].methods[1]");
        assert_eq!(
            method.map(|e| e.reason.as_str()),
            Some("`TRACE` is not one of GET, HEAD, POST, PUT, DELETE, PATCH")
        );
        let fields: Vec<String> = errors.into_iter().map(|e| e.field).collect();
        assert!(fields.contains(&"clients[0].token_sha256".to_string()));
        assert!(fields.contains(&"upstream.base_url".to_string()));
    }

    #[test]
    fn cache_routes_override_defaults_and_unknown_routes_fail() {
        let text = format!(
            "{}\n[cache]\nmax_bytes = 8388608\n[cache.routes.\"/app\"]\nttl = \"2s\"\nnegative_ttl = \"1s\"\n[cache.routes.\"/app/{{id}}/job/{{job_id}}\"]\nterminal_ttl = \"30m\"\n",
            base("")
        );
        let c = Config::from_toml(Path::new("t.toml"), &text).unwrap();
        assert_eq!(c.cache.policies.app_list.ttl, Duration::from_secs(2));
        assert_eq!(
            c.cache.policies.app_list.negative_ttl,
            Duration::from_secs(1)
        );
        // Untouched fields keep the route's default.
        assert_eq!(
            c.cache.policies.app_list.stale_if_error,
            Duration::from_secs(60)
        );
        assert_eq!(c.cache.policies.job.terminal_ttl, Duration::from_secs(1800));
        assert_eq!(c.cache.max_bytes, 8_388_608);

        let bad = format!("{}\n[cache.routes.\"/apps\"]\nttl = \"2s\"\n", base(""));
        let e = errors(&bad);
        assert!(e[0].field.contains("/apps"), "{e:?}");
        let bad = format!("{}\n[cache.routes.\"/app\"]\nttl = \"often\"\n", base(""));
        assert_eq!(errors(&bad)[0].field, "cache.routes.\"/app\".ttl");
    }

    #[test]
    fn shared_cache_is_off_by_default_and_its_bounds_are_checked() {
        let cluster = |extra: &str| {
            format!(
                "{}\n[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\n{extra}",
                base("")
            )
        };
        let c = Config::from_toml(Path::new("t.toml"), &cluster("")).unwrap();
        let settings = c.cluster.unwrap();
        assert!(!settings.shared_cache);
        assert_eq!(settings.shared_lock, Duration::from_secs(5));
        assert_eq!(settings.shared_wait, Duration::from_secs(2));
        let on = cluster("shared_cache = true\nshared_lock = \"1s\"\nshared_wait = \"0s\"");
        let c = Config::from_toml(Path::new("t.toml"), &on).unwrap();
        assert!(c.cluster.unwrap().shared_cache);
        let e = errors(&cluster("shared_lock = \"2m\""));
        assert_eq!(e[0].field, "cluster.shared_lock");
        let e = errors(&cluster("shared_lock = \"1s\"\nshared_wait = \"2s\""));
        assert_eq!(e[0].field, "cluster.shared_wait");
    }

    #[test]
    fn secret_source_needs_exactly_one_origin() {
        let text = base("").replace(
            "api_key = { value = \"k1\" }",
            "api_key = { env = \"A\", file = \"/b\" }",
        );
        let e = errors(&text);
        assert_eq!(e[0].field, "teams[0].api_key");
        assert!(e[0].reason.contains("exactly one"));
    }
}
