//! An in-memory RunGen.AI upstream: the 8 endpoints of `shared/rungen-api.md`, served over
//! HTTP/1.1 and h2c, for the demo, the end-to-end tests and the benchmarks.
//!
//! Start it with [`start`] (port 0 is fine) and drive it through the returned
//! [`MockHandle`]: request counters ([`MockStats`]), a log of the last 10 000 requests
//! ([`RecordedRequest`]), injectable [`Faults`], and forced job states.
//!
//! # Contract decisions (the open questions of `rungen-api.md` §4)
//!
//! - Every body is JSON with `content-type: application/json`, except the empty 204 of
//!   `DELETE /app/{id}`. Errors are `{"error": "<message>"}`. No rate-limit or caching
//!   headers are sent unless [`Faults::extra_response_headers`] asks for them.
//! - A missing or unknown `x-api-key` is 403 `Unauthorized access. Invalid API key.` (401 with `invalid_key_status = 401`).
//! - `x-team-id` present and non-empty (after trimming) selects the team scope; the user
//!   must be a member, else 403 `Unauthorized access. Not a member of team '<id>'.`.
//!   Absent or empty means the personal scope. Scopes are strict: an app of another scope
//!   is 404 `App with ID '<id>' not found.` (no cross-scope access).
//! - `X-Authenticated-User-Id` is accepted and ignored.
//! - Unknown paths are 404 `{"error": "Not found"}`; a known path with a wrong method is
//!   405 with an `Allow` header. `HEAD` is answered like `GET` (hyper drops the body).
//!   Paths match exactly (no trailing slash); the query string is ignored.
//! - E2 `POST /app`: 400 for a body that is not a JSON object, a missing/empty `name`, a
//!   missing `configuration.gpu_tier` or one not in `BASIC|STANDARD|PERFORMANCE`, a missing
//!   `workflow.model_url`, or a wrongly typed optional field. Success is
//!   [`MockConfig::create_status`] with `{"data": App}`; the created app **includes** the
//!   `jobs` and `workers` objects (all zero). A new app is `STOPPED` unless created with
//!   `active_workers >= 1`.
//! - E3 `GET /app/{id}` answers `{"data": App}`, or the bare App when
//!   [`MockConfig::bare_app_envelope`] is set.
//! - E4 `PUT /app/{id}`: partial update of `name`, `description`,
//!   `configuration.active_workers`, `workflow.model_url`, `workflow.tools`. `tools` is
//!   merged key by key (a sent `loras` array replaces the old one). `gpu_tier` and
//!   `location` are ignored. A JSON `null` counts as "not sent". `active_workers` 0 gives
//!   `STOPPED`, >= 1 gives `RUNNING` (and that many `workers.idle`). `updated_at` is set to
//!   now. 200 `{"data": App}`.
//! - E5 `DELETE /app/{id}`: 204, no body; the app's jobs go with it. Not refused when the
//!   app has workers or jobs.
//! - E6 `POST /app/{id}/run_async`: body `{"input": {...}}` (400 otherwise), accepted
//!   even when the app is STOPPED; [`MockConfig::run_async_status`] with
//!   `{"data": {"id": "<uuid>"}}`. The job's `request` is the submitted `input` object.
//! - E7 `GET /app/{id}/job/{job_id}`: the job advances with each poll: poll `n` (1-based)
//!   is `COMPLETED` when `n >= job_polls_to_complete`, else `IN_QUEUE` for `n == 1`, else
//!   `IN_PROGRESS`. So 0 or 1 completes on the first poll, 2 (the default) gives
//!   IN_QUEUE then COMPLETED. `result` is null until COMPLETED, then an `images` list with
//!   one presigned-looking S3 URL whose `X-Amz-Date` is the completion time (UTC) and
//!   `X-Amz-Expires=604800`. `execution_time` (a string of seconds, one decimal) appears
//!   once the job is COMPLETED, FAILED or CANCELED. The app's `jobs` counters follow the
//!   job states (a canceled job leaves every counter).
//! - E8 `PUT /app/{id}/job/{job_id}`: no body needed. IN_QUEUE/IN_PROGRESS become
//!   CANCELED, 200 `{"data": {"job_id", "status": "CANCELED"}}`; COMPLETED, FAILED and
//!   CANCELED are 409 `Job cannot be canceled because it has already completed.`.
//! - [`MockHandle::set_job_status`] pins a job's status (it no longer advances on polls).
//! - Request bodies over 8 MiB are 413.
//!
//! # Faults
//!
//! Every request outside `/_mock/` is counted and logged first, then [`Faults`] apply:
//! `latency_ms` sleeps; then, if a failure fault is active, `drop_connections` closes the
//! connection without a response (on HTTP/2 the stream is reset), else `fail_status`
//! answers `{"error": "mock failure"}` (with `Retry-After` if `retry_after_secs`), and
//! `truncate_body` sends the headers with a `Content-Length` larger than the half body
//! that follows, then closes. Faults below the HTTP layer act on the plain-TCP
//! HTTP/1.1 connection itself (the response's bytes are rewritten on their way out):
//! `reset_mid_headers` sends half a head, then resets the connection (RST);
//! `reset_mid_body` sends the head and half the body, then resets; `invalid_response`
//! sends bytes that are not HTTP, then closes; `trickle_ms` sends the head at once, then
//! the body one byte every that many milliseconds. (Over TLS or h2c, where bytes cannot
//! be rewritten, these four drop the connection instead.) `fail_count` limits every
//! failure fault to the next N requests; when it reaches 0 they are all switched off (so
//! [`MockHandle::faults`] shows the truth). `extra_response_headers` are added to every 2xx answer;
//! `large_body_bytes` pads `GET /app` with a top-level `"padding"` string.
//!
//! # Control surface (HTTP, not counted, no key, no faults)
//!
//! | request | answer |
//! |---|---|
//! | `GET /_mock/stats` | [`MockStats`] JSON |
//! | `POST /_mock/reset` | resets the stats and the request log; `{"ok": true}` |
//! | `GET /_mock/faults` | the current [`Faults`] JSON |
//! | `PUT /_mock/faults` | replaces the faults with the JSON body (missing fields take their defaults); answers the new faults |
//! | `GET /_mock/requests` | the recorded requests, oldest first |
//! | `POST /_mock/job_status` | body `{"app_id", "job_id", "status"}`: [`MockHandle::set_job_status`]; 200 or 404 |

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::sync::lock;

/// The API key of the default mock user.
pub const DEFAULT_API_KEY: &str = "demo-upstream-key";
/// The user id of the default mock user.
pub const DEFAULT_USER_ID: &str = "5f0c8a2e-7d3b-4c1e-9a6f-2b8d4e0c1a37";
/// The team the default mock user belongs to (the team id of the RunGen docs examples).
pub const DEFAULT_TEAM_ID: &str = "123e4567-e89b-12d3-a456-426614174000";

/// How many requests [`MockHandle::requests`] keeps.
pub const REQUEST_LOG_CAPACITY: usize = 10_000;
/// How much of each request body the log keeps.
pub const RECORDED_BODY_LIMIT: usize = 64 * 1024;
/// Larger request bodies are answered 413.
pub const MAX_REQUEST_BODY: usize = 8 * 1024 * 1024;

const GPU_TIERS: [&str; 3] = ["BASIC", "STANDARD", "PERFORMANCE"];
const MSG_INVALID_KEY: &str = "Unauthorized access. Invalid API key.";
const MSG_CANNOT_CANCEL: &str = "Job cannot be canceled because it has already completed.";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The response body type of the mock server.
pub type MockBody = UnsyncBoxBody<Bytes, BoxError>;

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// What the mock knows at start: its users and a few contract switches.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// The accepted API keys and who they belong to.
    pub users: Vec<MockUser>,
    /// E3 answers the bare App instead of `{"data": App}`.
    pub bare_app_envelope: bool,
    /// Status of a successful `POST /app` (default 201).
    pub create_status: u16,
    /// Status of a successful `POST /app/{id}/run_async` (default 200).
    pub run_async_status: u16,
    /// A job is IN_QUEUE on the first poll, IN_PROGRESS while the poll count is below
    /// this, then COMPLETED (default 2).
    pub job_polls_to_complete: u32,
    /// Create 2 personal apps per user and 2 apps per team at start (default true).
    pub seed_apps: bool,
    /// Status for a missing or unknown `x-api-key`: 403 as the docs show
    /// (default), or 401, the other reading of them (rungen-api.md, open
    /// question 3).
    pub invalid_key_status: u16,
}

/// One API key and its user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockUser {
    /// The `x-api-key` value.
    pub api_key: String,
    /// The user's id (a UUID string).
    pub user_id: String,
    /// Ids of the teams the user is a member of.
    #[serde(default)]
    pub teams: Vec<String>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            users: vec![MockUser {
                api_key: DEFAULT_API_KEY.to_owned(),
                user_id: DEFAULT_USER_ID.to_owned(),
                teams: vec![DEFAULT_TEAM_ID.to_owned()],
            }],
            bare_app_envelope: false,
            create_status: 201,
            run_async_status: 200,
            job_polls_to_complete: 2,
            seed_apps: true,
            invalid_key_status: 403,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMockConfig {
    users: Option<Vec<MockUser>>,
    bare_app_envelope: Option<bool>,
    create_status: Option<u16>,
    run_async_status: Option<u16>,
    job_polls_to_complete: Option<u32>,
    seed_apps: Option<bool>,
    invalid_key_status: Option<u16>,
}

impl MockConfig {
    /// Reads a small TOML file. Every key is optional; absent keys take the defaults
    /// (absent `users` means the default user):
    ///
    /// ```toml
    /// bare_app_envelope = false
    /// create_status = 201
    /// run_async_status = 200
    /// job_polls_to_complete = 2
    /// seed_apps = true
    /// invalid_key_status = 403
    ///
    /// [[users]]
    /// api_key = "demo-upstream-key"
    /// user_id = "5f0c8a2e-7d3b-4c1e-9a6f-2b8d4e0c1a37"
    /// teams = ["123e4567-e89b-12d3-a456-426614174000"]
    /// ```
    pub fn from_toml_file(path: impl AsRef<std::path::Path>) -> Result<Self, String> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read mock config: {e}", path.display()))?;
        Self::from_toml_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the TOML text of [`MockConfig::from_toml_file`].
    pub fn from_toml_str(text: &str) -> Result<Self, String> {
        let raw: RawMockConfig =
            toml::from_str(text).map_err(|e| format!("invalid mock config: {e}"))?;
        let defaults = MockConfig::default();
        let config = MockConfig {
            users: raw.users.unwrap_or(defaults.users),
            bare_app_envelope: raw.bare_app_envelope.unwrap_or(defaults.bare_app_envelope),
            create_status: raw.create_status.unwrap_or(defaults.create_status),
            run_async_status: raw.run_async_status.unwrap_or(defaults.run_async_status),
            job_polls_to_complete: raw
                .job_polls_to_complete
                .unwrap_or(defaults.job_polls_to_complete),
            seed_apps: raw.seed_apps.unwrap_or(defaults.seed_apps),
            invalid_key_status: raw
                .invalid_key_status
                .unwrap_or(defaults.invalid_key_status),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks what [`start`] relies on: non-empty, unique keys, non-empty user ids,
    /// valid status codes.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            if user.api_key.is_empty() {
                return Err(format!("users[{i}].api_key is empty"));
            }
            if user.user_id.trim().is_empty() {
                return Err(format!("users[{i}].user_id is empty"));
            }
            if user.teams.iter().any(|t| t.trim().is_empty()) {
                return Err(format!("users[{i}].teams contains an empty team id"));
            }
            if !seen.insert(user.api_key.as_str()) {
                return Err(format!("users[{i}].api_key is used by an earlier user"));
            }
        }
        for (name, code) in [
            ("create_status", self.create_status),
            ("run_async_status", self.run_async_status),
        ] {
            if StatusCode::from_u16(code).is_err() {
                return Err(format!("{name} = {code} is not an HTTP status code"));
            }
        }
        if !matches!(self.invalid_key_status, 401 | 403) {
            return Err(format!(
                "invalid_key_status = {} must be 401 or 403",
                self.invalid_key_status
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Public observation and fault types
// ---------------------------------------------------------------------------------------

/// Counters of the requests that reached the mock (outside `/_mock/`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MockStats {
    /// All counted requests.
    pub total: u64,
    /// Keyed by method and route template, e.g. `"GET /app/{id}/job/{job_id}"`.
    /// Unknown paths count as `"<METHOD> <unmatched>"`.
    pub by_route: BTreeMap<String, u64>,
    /// Keyed by method and actual path (without query), e.g. `"GET /app/<uuid>"`.
    pub by_path: BTreeMap<String, u64>,
    /// Keyed by the first 8 hex chars of sha256(x-api-key), or `"<none>"`.
    pub by_key: BTreeMap<String, u64>,
}

/// One request as the mock received it.
#[derive(Clone, Debug, Serialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path_and_query: String,
    /// Every request header (names lower-case), values as lossy UTF-8.
    pub headers: Vec<(String, String)>,
    /// The first 64 KiB of the body, lossy UTF-8.
    pub body: String,
}

impl RecordedRequest {
    /// The first value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Injected misbehaviour; see the module docs for the order they apply in.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Sleep before answering every request.
    pub latency_ms: u64,
    /// Answer every request with this status and `{"error": "mock failure"}`.
    pub fail_status: Option<u16>,
    /// If set, only the next N requests get the failure faults (`fail_status`,
    /// `drop_connections`, `truncate_body`); then those are switched off.
    pub fail_count: Option<u64>,
    /// Add `Retry-After` to `fail_status` answers.
    pub retry_after_secs: Option<u64>,
    /// Close the connection without any response.
    pub drop_connections: bool,
    /// Send a `Content-Length` larger than the body, then close.
    pub truncate_body: bool,
    /// Send the headers and half the body, then nothing more (a response that never ends).
    pub stall_body: bool,
    /// Send half a status line and headers, then reset the connection (TCP RST).
    pub reset_mid_headers: bool,
    /// Send the headers and half the body, then reset the connection (TCP RST).
    pub reset_mid_body: bool,
    /// Answer bytes that are not an HTTP response, then close the connection.
    pub invalid_response: bool,
    /// Send the headers at once, then the body one byte every this many milliseconds
    /// (a very slow trickle: no single gap is long, the whole is).
    pub trickle_ms: Option<u64>,
    /// Added (appended) to every 2xx answer.
    pub extra_response_headers: Vec<(String, String)>,
    /// `GET /app` pads its body with a `"padding"` string to at least this many bytes.
    pub large_body_bytes: Option<usize>,
}

/// Marker type for the mock upstream; [`MockUpstream::start`] is the same as [`start`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MockUpstream;

impl MockUpstream {
    /// See [`start`].
    pub async fn start(config: MockConfig, listen: SocketAddr) -> std::io::Result<MockHandle> {
        start(config, listen).await
    }
}

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Scope {
    Personal(String),
    Team(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JobStatus {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Canceled,
}

impl JobStatus {
    fn as_str(self) -> &'static str {
        match self {
            JobStatus::InQueue => "IN_QUEUE",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Failed => "FAILED",
            JobStatus::Canceled => "CANCELED",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "IN_QUEUE" => JobStatus::InQueue,
            "IN_PROGRESS" => JobStatus::InProgress,
            "COMPLETED" => JobStatus::Completed,
            "FAILED" => JobStatus::Failed,
            "CANCELED" => JobStatus::Canceled,
            _ => return None,
        })
    }

    fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Canceled
        )
    }
}

#[derive(Clone, Debug, Default)]
struct JobCounters {
    completed: u64,
    failed: u64,
    in_progress: u64,
    in_queue: u64,
    retried: u64,
}

impl JobCounters {
    fn slot(&mut self, status: JobStatus) -> Option<&mut u64> {
        match status {
            JobStatus::InQueue => Some(&mut self.in_queue),
            JobStatus::InProgress => Some(&mut self.in_progress),
            JobStatus::Completed => Some(&mut self.completed),
            JobStatus::Failed => Some(&mut self.failed),
            JobStatus::Canceled => None,
        }
    }

    fn transition(&mut self, from: JobStatus, to: JobStatus) {
        if from == to {
            return;
        }
        if let Some(c) = self.slot(from) {
            *c = c.saturating_sub(1);
        }
        if let Some(c) = self.slot(to) {
            *c += 1;
        }
    }
}

#[derive(Clone, Debug)]
struct Job {
    id: String,
    created_at: SystemTime,
    request: Value,
    status: JobStatus,
    polls: u32,
    pinned: bool,
    result: Option<Value>,
    finished_at: Option<SystemTime>,
}

impl Job {
    fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("id".into(), Value::String(self.id.clone()));
        obj.insert(
            "created_at".into(),
            Value::String(format_job_time(self.created_at)),
        );
        obj.insert("request".into(), self.request.clone());
        obj.insert("result".into(), self.result.clone().unwrap_or(Value::Null));
        obj.insert("status".into(), Value::String(self.status.as_str().into()));
        if let Some(done) = self.finished_at {
            let secs = done
                .duration_since(self.created_at)
                .unwrap_or_default()
                .as_secs_f64();
            obj.insert("execution_time".into(), Value::String(format!("{secs:.1}")));
        }
        Value::Object(obj)
    }

    /// Moves to `to`, filling in the result and finish time as a real backend would.
    fn set_status(&mut self, to: JobStatus, counters: &mut JobCounters, now: SystemTime) {
        counters.transition(self.status, to);
        self.status = to;
        if to.is_terminal() {
            if self.finished_at.is_none() {
                self.finished_at = Some(now);
            }
            if to == JobStatus::Completed && self.result.is_none() {
                self.result = Some(job_result(&self.id, now));
            }
        }
    }
}

#[derive(Clone, Debug)]
struct App {
    id: String,
    name: String,
    description: String,
    gpu_tier: String,
    active_workers: u64,
    model_url: String,
    tools: Map<String, Value>,
    created_at: String,
    updated_at: String,
    created_by: String,
    scope: Scope,
    jobs: JobCounters,
    job_table: HashMap<String, Job>,
}

impl App {
    fn status(&self) -> &'static str {
        if self.active_workers == 0 {
            "STOPPED"
        } else {
            "RUNNING"
        }
    }

    fn to_json(&self) -> Value {
        let (owner_user, owner_team) = match &self.scope {
            Scope::Personal(u) => (Value::String(u.clone()), Value::Null),
            Scope::Team(t) => (Value::Null, Value::String(t.clone())),
        };
        json!({
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "configuration": {
                "gpu_tier": self.gpu_tier,
                "active_workers": self.active_workers,
            },
            "workflow": {
                "model_url": self.model_url,
                "tools": Value::Object(self.tools.clone()),
            },
            "status": self.status(),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "created_by": self.created_by,
            "owner_user_id": owner_user,
            "owner_team_id": owner_team,
            "jobs": {
                "completed": self.jobs.completed,
                "failed": self.jobs.failed,
                "in_progress": self.jobs.in_progress,
                "in_queue": self.jobs.in_queue,
                "retried": self.jobs.retried,
            },
            "workers": {
                "idle": self.active_workers,
                "initializing": 0,
                "ready": 0,
                "running": 0,
                "throttled": 0,
                "unhealthy": 0,
            },
        })
    }
}

#[derive(Default)]
struct Store {
    apps: HashMap<String, App>,
    /// App ids per scope, in creation order.
    by_scope: HashMap<Scope, Vec<String>>,
}

impl Store {
    fn insert(&mut self, app: App) {
        self.by_scope
            .entry(app.scope.clone())
            .or_default()
            .push(app.id.clone());
        self.apps.insert(app.id.clone(), app);
    }

    fn remove(&mut self, id: &str) -> Option<App> {
        let app = self.apps.remove(id)?;
        if let Some(ids) = self.by_scope.get_mut(&app.scope) {
            ids.retain(|x| x != id);
        }
        Some(app)
    }

    fn get_in_scope(&mut self, id: &str, scope: &Scope) -> Option<&mut App> {
        self.apps.get_mut(id).filter(|a| &a.scope == scope)
    }
}

#[derive(Default)]
struct Recorder {
    stats: MockStats,
    log: VecDeque<RecordedRequest>,
}

struct Shared {
    config: MockConfig,
    users_by_key: HashMap<String, MockUser>,
    store: Mutex<Store>,
    recorder: Mutex<Recorder>,
    faults: Mutex<Faults>,
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// A running mock upstream. Cheap to clone; every clone controls the same server.
#[derive(Clone)]
pub struct MockHandle {
    scheme: &'static str,
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    shutdown_tx: Arc<watch::Sender<bool>>,
    done_rx: watch::Receiver<bool>,
}

impl std::fmt::Debug for MockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockHandle")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// Binds `listen` (port 0 allowed), spawns the accept loop on the current tokio runtime
/// and returns at once. Serves HTTP/1.1 (keep-alive) and h2c (prior knowledge).
pub async fn start(config: MockConfig, listen: SocketAddr) -> std::io::Result<MockHandle> {
    start_inner(config, listen, None).await
}

/// Like [`start`], serving HTTPS with the given rustls config (tests of the
/// gateway's upstream TLS: private CA, name checks, ALPN h2).
pub async fn start_tls(
    config: MockConfig,
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<MockHandle> {
    start_inner(config, listen, Some(tokio_rustls::TlsAcceptor::from(tls))).await
}

async fn start_inner(
    config: MockConfig,
    listen: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<MockHandle> {
    config
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = bind(listen)?;
    let local_addr = listener.local_addr()?;

    let users_by_key = config
        .users
        .iter()
        .map(|u| (u.api_key.clone(), u.clone()))
        .collect();
    let mut store = Store::default();
    if config.seed_apps {
        seed(&config, &mut store);
    }
    let shared = Arc::new(Shared {
        config,
        users_by_key,
        store: Mutex::new(store),
        recorder: Mutex::new(Recorder::default()),
        faults: Mutex::new(Faults::default()),
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(false);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(accept_loop(
        listener,
        shared.clone(),
        shutdown_rx,
        done_tx,
        tls,
    ));
    Ok(MockHandle {
        shared,
        scheme,
        local_addr,
        shutdown_tx: Arc::new(shutdown_tx),
        done_rx,
    })
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // A deep backlog: benchmarks open thousands of connections at once.
    socket.listen(8192)
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown_rx: watch::Receiver<bool>,
    done_tx: watch::Sender<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    builder.http2().max_concurrent_streams(1024);
    let graceful = GracefulShutdown::new();

    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = shutdown_rx.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning or giving up.
                tracing::warn!(error = %e, "mock upstream: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        if let Some(acceptor) = &tls {
            let service = hyper::service::service_fn(move |req| serve(shared.clone(), None, req));
            let acceptor = acceptor.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream)).await
                else {
                    return;
                };
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            continue;
        }
        let slot = RawSlot::default();
        let io = FaultIo::new(stream, slot.clone());
        let service =
            hyper::service::service_fn(move |req| serve(shared.clone(), Some(slot.clone()), req));
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "mock upstream: connection ended with an error");
            }
        });
    }
    drop(listener);
    // In-flight requests finish; idle keep-alive connections are closed.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    let _ = done_tx.send(true);
}

impl MockHandle {
    /// The bound address (with the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://IP:PORT` of the server (an unspecified bind address becomes loopback).
    pub fn base_url(&self) -> String {
        let mut addr = self.local_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("{}://{addr}", self.scheme)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MockStats {
        lock(&self.shared.recorder).stats.clone()
    }

    /// Zeroes the counters and empties the request log.
    pub fn reset_stats(&self) {
        let mut rec = lock(&self.shared.recorder);
        rec.stats = MockStats::default();
        rec.log.clear();
    }

    /// The last [`REQUEST_LOG_CAPACITY`] requests received, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.recorder).log.iter().cloned().collect()
    }

    /// Replaces the faults.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// The current faults (a `fail_count` that ran out shows as switched off).
    pub fn faults(&self) -> Faults {
        lock(&self.shared.faults).clone()
    }

    /// Forces (and pins) a job's status. `status` is one of `IN_QUEUE`, `IN_PROGRESS`,
    /// `COMPLETED`, `FAILED`, `CANCELED`. False if the job or the status is unknown.
    pub fn set_job_status(&self, app_id: &str, job_id: &str, status: &str) -> bool {
        self.shared.set_job_status(app_id, job_id, status)
    }

    /// Stops accepting connections; in-flight requests finish and idle connections close.
    pub fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
    }

    /// Resolves once the server has stopped after [`MockHandle::shutdown`] (connections
    /// drained, or 5 s passed).
    pub async fn wait(&self) {
        let mut rx = self.done_rx.clone();
        let _ = rx.wait_for(|done| *done).await;
    }
}

// ---------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------

/// Returned by the service to make hyper close the connection without a response.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock upstream: connection dropped by fault injection")
    }
}

impl std::error::Error for DropConnection {}

enum FaultAction {
    None,
    Drop,
    Fail {
        status: u16,
        retry_after: Option<u64>,
    },
}

struct FaultPlan {
    latency: Duration,
    action: FaultAction,
    truncate: bool,
    stall: bool,
    raw: Option<RawFaultKind>,
    extra_headers: Vec<(String, String)>,
    large_body_bytes: Option<usize>,
}

impl Shared {
    fn record(&self, parts: &http::request::Parts, route: &str, key: Option<&str>, body: &[u8]) {
        let key_id = match key {
            Some(k) => key_fingerprint(k),
            None => "<none>".to_owned(),
        };
        let path_key = format!("{} {}", parts.method, parts.uri.path());
        let route_key = format!("{} {}", parts.method, route);
        let recorded = RecordedRequest {
            method: parts.method.to_string(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| parts.uri.path().to_owned()),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: String::from_utf8_lossy(&body[..body.len().min(RECORDED_BODY_LIMIT)])
                .into_owned(),
        };
        let mut rec = lock(&self.recorder);
        rec.stats.total += 1;
        *rec.stats.by_route.entry(route_key).or_default() += 1;
        *rec.stats.by_path.entry(path_key).or_default() += 1;
        *rec.stats.by_key.entry(key_id).or_default() += 1;
        if rec.log.len() >= REQUEST_LOG_CAPACITY {
            rec.log.pop_front();
        }
        rec.log.push_back(recorded);
    }

    fn take_fault_plan(&self) -> FaultPlan {
        let mut f = lock(&self.faults);
        let failure_armed = f.fail_status.is_some()
            || f.drop_connections
            || f.truncate_body
            || f.stall_body
            || f.reset_mid_headers
            || f.reset_mid_body
            || f.invalid_response
            || f.trickle_ms.is_some();
        let apply = failure_armed
            && match f.fail_count {
                None => true,
                Some(0) => false,
                Some(n) => {
                    f.fail_count = Some(n - 1);
                    true
                }
            };
        let action = if !apply {
            FaultAction::None
        } else if f.drop_connections {
            FaultAction::Drop
        } else if let Some(status) = f.fail_status {
            FaultAction::Fail {
                status,
                retry_after: f.retry_after_secs,
            }
        } else {
            FaultAction::None
        };
        let raw = if !apply {
            None
        } else if f.reset_mid_headers {
            Some(RawFaultKind::ResetMidHeaders)
        } else if f.reset_mid_body {
            Some(RawFaultKind::ResetMidBody)
        } else if f.invalid_response {
            Some(RawFaultKind::Invalid)
        } else {
            f.trickle_ms
                .map(|ms| RawFaultKind::Trickle(Duration::from_millis(ms.max(1))))
        };
        let plan = FaultPlan {
            latency: Duration::from_millis(f.latency_ms),
            action,
            truncate: apply && f.truncate_body,
            stall: apply && f.stall_body,
            raw,
            extra_headers: f.extra_response_headers.clone(),
            large_body_bytes: f.large_body_bytes,
        };
        if f.fail_count == Some(0) {
            f.fail_count = None;
            f.fail_status = None;
            f.drop_connections = false;
            f.truncate_body = false;
            f.stall_body = false;
            f.reset_mid_headers = false;
            f.reset_mid_body = false;
            f.invalid_response = false;
            f.trickle_ms = None;
        }
        plan
    }

    fn set_job_status(&self, app_id: &str, job_id: &str, status: &str) -> bool {
        let Some(to) = JobStatus::parse(status) else {
            return false;
        };
        let now = SystemTime::now();
        let mut store = lock(&self.store);
        let Some(app) = store.apps.get_mut(app_id) else {
            return false;
        };
        let Some(job) = app.job_table.get_mut(job_id) else {
            return false;
        };
        job.set_status(to, &mut app.jobs, now);
        job.pinned = true;
        true
    }
}

async fn serve(
    shared: Arc<Shared>,
    raw: Option<RawSlot>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, DropConnection> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(e),
    };

    let path = parts.uri.path();
    if path == "/_mock" || path.starts_with("/_mock/") {
        let resp = match body {
            Ok(body) => control(&shared, &parts.method, path, &body),
            Err(e) => body_error(e),
        };
        return Ok(resp.map(boxed_full));
    }

    let route = match_route(&parts.method, path);
    let api_key = parts
        .headers
        .get("x-api-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let body_for_log: &[u8] = match &body {
        Ok(b) => b,
        Err(_) => &[],
    };
    shared.record(&parts, route.template(), api_key.as_deref(), body_for_log);

    let plan = shared.take_fault_plan();
    if !plan.latency.is_zero() {
        tokio::time::sleep(plan.latency).await;
    }
    let mut resp = match plan.action {
        FaultAction::Drop => return Err(DropConnection),
        FaultAction::Fail {
            status,
            retry_after,
        } => {
            let mut r = error_response(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "mock failure",
            );
            if let Some(secs) = retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            r
        }
        FaultAction::None => match body {
            Ok(body) => shared.handle(route, &parts.headers, &body, plan.large_body_bytes),
            Err(e) => body_error(e),
        },
    };

    if resp.status().is_success() {
        for (name, value) in &plan.extra_headers {
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                (Ok(n), Ok(v)) => {
                    resp.headers_mut().append(n, v);
                }
                _ => tracing::warn!(header = %name, "mock upstream: skipping invalid extra header"),
            }
        }
    }

    if let Some(kind) = plan.raw {
        // The connection rewrites this response's bytes; without access to
        // them (TLS, h2) the nearest thing is a dropped connection.
        let Some(slot) = raw else {
            return Err(DropConnection);
        };
        let body_len = resp.body().len();
        *lock(&slot) = Some(RawFault {
            kind,
            body_len: if resp.status() == StatusCode::NO_CONTENT {
                0
            } else {
                body_len
            },
        });
        return Ok(resp.map(boxed_full));
    }
    if plan.stall {
        return Ok(truncate(resp, Duration::from_secs(3600)));
    }
    if plan.truncate {
        return Ok(truncate(resp, Duration::from_millis(30)));
    }
    Ok(resp.map(boxed_full))
}

fn body_error(e: BoxError) -> Response<Bytes> {
    if e.is::<http_body_util::LengthLimitError>() {
        error_response(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large.")
    } else {
        error_response(StatusCode::BAD_REQUEST, "Could not read the request body.")
    }
}

fn boxed_full(b: Bytes) -> MockBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// Declares the full length but sends only the first half of the body, then fails the
/// body so hyper closes the connection.
fn truncate(resp: Response<Bytes>, then_fail_after: Duration) -> Response<MockBody> {
    let (mut parts, full) = resp.into_parts();
    let declared = full.len().max(16) + 16;
    let sent = full.slice(..full.len() / 2);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(declared));
    let body = TruncatedBody {
        data: Some(sent).filter(|b| !b.is_empty()),
        // Long enough for hyper to flush the head and the partial body first.
        flush_delay: Box::pin(tokio::time::sleep(then_fail_after)),
    };
    Response::from_parts(parts, body.boxed_unsync())
}

struct TruncatedBody {
    data: Option<Bytes>,
    flush_delay: Pin<Box<tokio::time::Sleep>>,
}

impl Body for TruncatedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match this.flush_delay.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err("mock upstream: truncated body".into()))),
        }
    }
}

/// A fault that rewrites a response's bytes on the connection.
#[derive(Debug, Clone, Copy)]
enum RawFaultKind {
    ResetMidHeaders,
    ResetMidBody,
    Invalid,
    Trickle(Duration),
}

/// The fault for the response the service is about to return, with its body length.
#[derive(Debug, Clone, Copy)]
struct RawFault {
    kind: RawFaultKind,
    body_len: usize,
}

/// Shared by a connection's service (which arms it) and its [`FaultIo`] (which takes it
/// at the response's first write). HTTP/1.1 has one response in flight at a time.
type RawSlot = Arc<Mutex<Option<RawFault>>>;

/// What the connection is doing to the bytes of the current response.
enum Rewrite {
    /// Passing everything through.
    None,
    /// Writing `bytes[written..]` instead of the response, then resetting (or closing).
    Replace {
        bytes: &'static [u8],
        written: usize,
        reset: bool,
    },
    /// Passing the head and `body_left` body bytes through, then resetting.
    Cut { head: HeadScan, body_left: usize },
    /// Passing the head through, then the body one byte per `every`.
    Trickle {
        head: HeadScan,
        body_left: usize,
        every: Duration,
        next: Pin<Box<tokio::time::Sleep>>,
    },
    /// Waiting a moment (so what was written leaves the socket), then ending the connection.
    Ending {
        after: Pin<Box<tokio::time::Sleep>>,
        reset: bool,
    },
    /// Ended: every write fails, so hyper drops the connection.
    Dead,
}

/// Finds the end of a response head (`\r\n\r\n`) across writes.
#[derive(Default)]
struct HeadScan {
    matched: usize,
    done: bool,
}

impl HeadScan {
    /// How many of `buf`'s bytes still belong to the head (all of them if it does not end there).
    fn head_bytes(&self, buf: &[u8]) -> usize {
        if self.done {
            return 0;
        }
        let mut matched = self.matched;
        for (i, b) in buf.iter().enumerate() {
            matched = match (*b, matched) {
                (b'\r', 0 | 2) => matched + 1,
                (b'\n', 1 | 3) => matched + 1,
                (b'\r', _) => 1,
                _ => 0,
            };
            if matched == 4 {
                return i + 1;
            }
        }
        buf.len()
    }

    /// Records that `written` head bytes of `buf` went out.
    fn advance(&mut self, buf: &[u8], written: usize) {
        let head = self.head_bytes(&buf[..written]);
        for b in &buf[..head] {
            self.matched = match (*b, self.matched) {
                (b'\r', 0 | 2) => self.matched + 1,
                (b'\n', 1 | 3) => self.matched + 1,
                (b'\r', _) => 1,
                _ => 0,
            };
            if self.matched == 4 {
                self.done = true;
                break;
            }
        }
    }
}

/// Half a status line and headers.
const HALF_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: applic";
/// Not an HTTP response at all.
const NOT_HTTP: &[u8] = b"SSH-2.0-OpenSSH_9.6\r\nthis is not an HTTP response\r\n\r\n";
/// Time for written bytes to leave before a reset (a reset discards unsent data).
const FLUSH_BEFORE_END: Duration = Duration::from_millis(30);

/// A plain TCP connection that applies [`RawFault`]s to the responses written on it.
struct FaultIo {
    inner: tokio::net::TcpStream,
    slot: RawSlot,
    rewrite: Rewrite,
}

impl FaultIo {
    fn new(inner: tokio::net::TcpStream, slot: RawSlot) -> Self {
        Self {
            inner,
            slot,
            rewrite: Rewrite::None,
        }
    }

    fn ending(reset: bool) -> Rewrite {
        Rewrite::Ending {
            after: Box::pin(tokio::time::sleep(FLUSH_BEFORE_END)),
            reset,
        }
    }

    fn ended() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "mock upstream: connection ended by fault injection",
        )
    }
}

impl tokio::io::AsyncRead for FaultIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for FaultIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.rewrite, Rewrite::None) {
            if let Some(fault) = lock(&this.slot).take() {
                this.rewrite = match fault.kind {
                    RawFaultKind::ResetMidHeaders => Rewrite::Replace {
                        bytes: HALF_HEAD,
                        written: 0,
                        reset: true,
                    },
                    RawFaultKind::Invalid => Rewrite::Replace {
                        bytes: NOT_HTTP,
                        written: 0,
                        reset: false,
                    },
                    RawFaultKind::ResetMidBody => Rewrite::Cut {
                        head: HeadScan::default(),
                        body_left: fault.body_len / 2,
                    },
                    RawFaultKind::Trickle(every) => Rewrite::Trickle {
                        head: HeadScan::default(),
                        body_left: fault.body_len,
                        every,
                        next: Box::pin(tokio::time::sleep(every)),
                    },
                };
            }
        }
        loop {
            match &mut this.rewrite {
                Rewrite::None => return Pin::new(&mut this.inner).poll_write(cx, buf),
                Rewrite::Dead => return Poll::Ready(Err(Self::ended())),
                Rewrite::Ending { after, reset } => {
                    if after.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if *reset {
                        let _ = this.inner.set_zero_linger();
                    }
                    this.rewrite = Rewrite::Dead;
                }
                Rewrite::Replace {
                    bytes,
                    written,
                    reset,
                } => {
                    if *written < bytes.len() {
                        match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                            Poll::Ready(Ok(n)) => *written += n,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => return Poll::Pending,
                        }
                        continue;
                    }
                    this.rewrite = Self::ending(*reset);
                }
                Rewrite::Cut { head, body_left } => {
                    let in_head = head.head_bytes(buf);
                    let allowed = in_head + (buf.len() - in_head).min(*body_left);
                    if allowed == 0 {
                        this.rewrite = Self::ending(true);
                        continue;
                    }
                    let n = match Pin::new(&mut this.inner).poll_write(cx, &buf[..allowed]) {
                        Poll::Ready(Ok(n)) => n,
                        other => return other,
                    };
                    head.advance(buf, n);
                    *body_left -= n.saturating_sub(in_head);
                    return Poll::Ready(Ok(n));
                }
                Rewrite::Trickle {
                    head,
                    body_left,
                    every,
                    next,
                } => {
                    let in_head = head.head_bytes(buf);
                    if in_head > 0 {
                        let n = match Pin::new(&mut this.inner).poll_write(cx, &buf[..in_head]) {
                            Poll::Ready(Ok(n)) => n,
                            other => return other,
                        };
                        head.advance(buf, n);
                        if head.done && *body_left == 0 {
                            this.rewrite = Rewrite::None;
                        }
                        return Poll::Ready(Ok(n));
                    }
                    if *body_left == 0 || buf.is_empty() {
                        this.rewrite = Rewrite::None;
                        continue;
                    }
                    if next.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let n = match Pin::new(&mut this.inner).poll_write(cx, &buf[..1]) {
                        Poll::Ready(Ok(n)) => n,
                        other => return other,
                    };
                    *body_left -= n;
                    let every = *every;
                    next.as_mut().reset(tokio::time::Instant::now() + every);
                    if *body_left == 0 {
                        this.rewrite = Rewrite::None;
                    }
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.rewrite, Rewrite::Dead) {
            return Poll::Ready(Err(Self::ended()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    ListApps,
    CreateApp,
    GetApp(String),
    UpdateApp(String),
    DeleteApp(String),
    RunAsync(String),
    GetJob(String, String),
    CancelJob(String, String),
    MethodNotAllowed {
        template: &'static str,
        allow: &'static str,
    },
    NotFound,
}

impl Route {
    fn template(&self) -> &'static str {
        match self {
            Route::ListApps | Route::CreateApp => "/app",
            Route::GetApp(_) | Route::UpdateApp(_) | Route::DeleteApp(_) => "/app/{id}",
            Route::RunAsync(_) => "/app/{id}/run_async",
            Route::GetJob(..) | Route::CancelJob(..) => "/app/{id}/job/{job_id}",
            Route::MethodNotAllowed { template, .. } => template,
            Route::NotFound => "<unmatched>",
        }
    }
}

fn match_route(method: &Method, path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/app") else {
        return Route::NotFound;
    };
    let segments: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else if let Some(r) = rest.strip_prefix('/') {
        r.split('/').collect()
    } else {
        return Route::NotFound;
    };
    if segments.iter().any(|s| s.is_empty()) {
        return Route::NotFound;
    }
    let get = method == Method::GET || method == Method::HEAD;
    let not_allowed = |template, allow| Route::MethodNotAllowed { template, allow };
    match segments.as_slice() {
        [] if get => Route::ListApps,
        [] if method == Method::POST => Route::CreateApp,
        [] => not_allowed("/app", "GET, HEAD, POST"),
        [id] if get => Route::GetApp((*id).to_owned()),
        [id] if method == Method::PUT => Route::UpdateApp((*id).to_owned()),
        [id] if method == Method::DELETE => Route::DeleteApp((*id).to_owned()),
        [_] => not_allowed("/app/{id}", "GET, HEAD, PUT, DELETE"),
        [id, "run_async"] if method == Method::POST => Route::RunAsync((*id).to_owned()),
        [_, "run_async"] => not_allowed("/app/{id}/run_async", "POST"),
        [id, "job", job] if get => Route::GetJob((*id).to_owned(), (*job).to_owned()),
        [id, "job", job] if method == Method::PUT => {
            Route::CancelJob((*id).to_owned(), (*job).to_owned())
        }
        [_, "job", _] => not_allowed("/app/{id}/job/{job_id}", "GET, HEAD, PUT"),
        _ => Route::NotFound,
    }
}

impl Shared {
    fn handle(
        &self,
        route: Route,
        headers: &HeaderMap,
        body: &[u8],
        large_body_bytes: Option<usize>,
    ) -> Response<Bytes> {
        match route {
            Route::NotFound => return error_response(StatusCode::NOT_FOUND, "Not found"),
            Route::MethodNotAllowed { allow, .. } => {
                let mut r = error_response(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.");
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                return r;
            }
            _ => {}
        }

        let user = match headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .and_then(|k| self.users_by_key.get(k))
        {
            Some(u) => u,
            None => {
                let status = StatusCode::from_u16(self.config.invalid_key_status)
                    .unwrap_or(StatusCode::FORBIDDEN);
                return error_response(status, MSG_INVALID_KEY);
            }
        };
        let team = headers
            .get("x-team-id")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
            .filter(|t| !t.is_empty());
        let scope = match team {
            Some(team) if user.teams.contains(&team) => Scope::Team(team),
            Some(team) => {
                return error_response(
                    StatusCode::FORBIDDEN,
                    &format!("Unauthorized access. Not a member of team '{team}'."),
                );
            }
            None => Scope::Personal(user.user_id.clone()),
        };

        match route {
            Route::ListApps => self.list_apps(&scope, large_body_bytes),
            Route::CreateApp => self.create_app(&scope, user, body),
            Route::GetApp(id) => self.get_app(&scope, &id),
            Route::UpdateApp(id) => self.update_app(&scope, &id, body),
            Route::DeleteApp(id) => self.delete_app(&scope, &id),
            Route::RunAsync(id) => self.run_async(&scope, &id, body),
            Route::GetJob(id, job) => self.get_job(&scope, &id, &job),
            Route::CancelJob(id, job) => self.cancel_job(&scope, &id, &job),
            Route::NotFound | Route::MethodNotAllowed { .. } => {
                error_response(StatusCode::NOT_FOUND, "Not found")
            }
        }
    }

    fn list_apps(&self, scope: &Scope, large_body_bytes: Option<usize>) -> Response<Bytes> {
        let apps: Vec<Value> = {
            let store = lock(&self.store);
            store
                .by_scope
                .get(scope)
                .map(|ids| {
                    ids.iter()
                        .filter_map(|id| store.apps.get(id))
                        .map(App::to_json)
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut body = Map::new();
        body.insert("data".into(), Value::Array(apps));
        if let Some(min) = large_body_bytes {
            let base = serde_json::to_vec(&body).map(|v| v.len()).unwrap_or(0);
            // `,"padding":""` adds 13 bytes around the padding itself.
            let needed = base + 13;
            if needed < min || base < min {
                body.insert(
                    "padding".into(),
                    Value::String("x".repeat(min.saturating_sub(needed))),
                );
            }
        }
        json_response(StatusCode::OK, &Value::Object(body))
    }

    fn create_app(&self, scope: &Scope, user: &MockUser, body: &[u8]) -> Response<Bytes> {
        let obj = match parse_object(body) {
            Ok(o) => o,
            Err(msg) => return error_response(StatusCode::BAD_REQUEST, msg),
        };
        let new = match validate_create(&obj) {
            Ok(n) => n,
            Err(msg) => return error_response(StatusCode::BAD_REQUEST, &msg),
        };
        let now = format_app_time(SystemTime::now());
        let app = App {
            id: uuid::Uuid::new_v4().to_string(),
            name: new.name,
            description: new.description,
            gpu_tier: new.gpu_tier,
            active_workers: new.active_workers,
            model_url: new.model_url,
            tools: new.tools,
            created_at: now.clone(),
            updated_at: now,
            created_by: user.user_id.clone(),
            scope: scope.clone(),
            jobs: JobCounters::default(),
            job_table: HashMap::new(),
        };
        let out = json!({ "data": app.to_json() });
        lock(&self.store).insert(app);
        json_response(status_or_500(self.config.create_status), &out)
    }

    fn get_app(&self, scope: &Scope, id: &str) -> Response<Bytes> {
        let app = {
            let mut store = lock(&self.store);
            store.get_in_scope(id, scope).map(|a| a.to_json())
        };
        match app {
            Some(app) if self.config.bare_app_envelope => json_response(StatusCode::OK, &app),
            Some(app) => json_response(StatusCode::OK, &json!({ "data": app })),
            None => app_not_found(id),
        }
    }

    fn update_app(&self, scope: &Scope, id: &str, body: &[u8]) -> Response<Bytes> {
        let obj = match parse_object(body) {
            Ok(o) => o,
            Err(msg) => return error_response(StatusCode::BAD_REQUEST, msg),
        };
        let update = match validate_update(&obj) {
            Ok(u) => u,
            Err(msg) => return error_response(StatusCode::BAD_REQUEST, &msg),
        };
        let out = {
            let mut store = lock(&self.store);
            let Some(app) = store.get_in_scope(id, scope) else {
                return app_not_found(id);
            };
            if let Some(name) = update.name {
                app.name = name;
            }
            if let Some(d) = update.description {
                app.description = d;
            }
            if let Some(w) = update.active_workers {
                app.active_workers = w;
            }
            if let Some(m) = update.model_url {
                app.model_url = m;
            }
            if let Some(tools) = update.tools {
                for (k, v) in tools {
                    app.tools.insert(k, v);
                }
            }
            app.updated_at = format_app_time(SystemTime::now());
            app.to_json()
        };
        json_response(StatusCode::OK, &json!({ "data": out }))
    }

    fn delete_app(&self, scope: &Scope, id: &str) -> Response<Bytes> {
        let mut store = lock(&self.store);
        if store.get_in_scope(id, scope).is_none() {
            return app_not_found(id);
        }
        store.remove(id);
        drop(store);
        let mut r = Response::new(Bytes::new());
        *r.status_mut() = StatusCode::NO_CONTENT;
        r
    }

    fn run_async(&self, scope: &Scope, id: &str, body: &[u8]) -> Response<Bytes> {
        let obj = match parse_object(body) {
            Ok(o) => o,
            Err(msg) => return error_response(StatusCode::BAD_REQUEST, msg),
        };
        let input = match obj.get("input") {
            Some(Value::Object(i)) => Value::Object(i.clone()),
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "Missing or invalid 'input' object.",
                );
            }
        };
        let job_id = uuid::Uuid::new_v4().to_string();
        {
            let mut store = lock(&self.store);
            let Some(app) = store.get_in_scope(id, scope) else {
                return app_not_found(id);
            };
            app.job_table.insert(
                job_id.clone(),
                Job {
                    id: job_id.clone(),
                    created_at: SystemTime::now(),
                    request: input,
                    status: JobStatus::InQueue,
                    polls: 0,
                    pinned: false,
                    result: None,
                    finished_at: None,
                },
            );
            app.jobs.in_queue += 1;
        }
        json_response(
            status_or_500(self.config.run_async_status),
            &json!({ "data": { "id": job_id } }),
        )
    }

    fn get_job(&self, scope: &Scope, id: &str, job_id: &str) -> Response<Bytes> {
        let threshold = self.config.job_polls_to_complete;
        let now = SystemTime::now();
        let out = {
            let mut store = lock(&self.store);
            let Some(app) = store.get_in_scope(id, scope) else {
                return app_not_found(id);
            };
            let Some(job) = app.job_table.get_mut(job_id) else {
                return job_not_found(id, job_id);
            };
            if !job.pinned && !job.status.is_terminal() {
                job.polls = job.polls.saturating_add(1);
                let next = if job.polls >= threshold {
                    JobStatus::Completed
                } else if job.polls == 1 {
                    JobStatus::InQueue
                } else {
                    JobStatus::InProgress
                };
                job.set_status(next, &mut app.jobs, now);
            }
            job.to_json()
        };
        json_response(StatusCode::OK, &json!({ "data": out }))
    }

    fn cancel_job(&self, scope: &Scope, id: &str, job_id: &str) -> Response<Bytes> {
        let now = SystemTime::now();
        let mut store = lock(&self.store);
        let Some(app) = store.get_in_scope(id, scope) else {
            return app_not_found(id);
        };
        let Some(job) = app.job_table.get_mut(job_id) else {
            return job_not_found(id, job_id);
        };
        if job.status.is_terminal() {
            return error_response(StatusCode::CONFLICT, MSG_CANNOT_CANCEL);
        }
        job.set_status(JobStatus::Canceled, &mut app.jobs, now);
        drop(store);
        json_response(
            StatusCode::OK,
            &json!({ "data": { "job_id": job_id, "status": "CANCELED" } }),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

struct NewApp {
    name: String,
    description: String,
    gpu_tier: String,
    active_workers: u64,
    model_url: String,
    tools: Map<String, Value>,
}

struct AppUpdate {
    name: Option<String>,
    description: Option<String>,
    active_workers: Option<u64>,
    model_url: Option<String>,
    tools: Option<Map<String, Value>>,
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, &'static str> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err("Request body must be a JSON object."),
        Err(_) => Err("Request body is not valid JSON."),
    }
}

/// A field that is absent or null is `None`.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn opt_string(obj: &Map<String, Value>, name: &str, path: &str) -> Result<Option<String>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("'{path}' must be a string.")),
    }
}

fn opt_object<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(format!("'{path}' must be an object.")),
    }
}

fn opt_workers(obj: &Map<String, Value>) -> Result<Option<u64>, String> {
    match field(obj, "active_workers") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| "'configuration.active_workers' must be a non-negative integer.".into()),
    }
}

fn validate_create(obj: &Map<String, Value>) -> Result<NewApp, String> {
    let name = opt_string(obj, "name", "name")?
        .filter(|n| !n.trim().is_empty())
        .ok_or("'name' is required.")?;
    let description = opt_string(obj, "description", "description")?.unwrap_or_default();
    let config =
        opt_object(obj, "configuration", "configuration")?.ok_or("'configuration' is required.")?;
    let gpu_tier = opt_string(config, "gpu_tier", "configuration.gpu_tier")?
        .ok_or("'configuration.gpu_tier' is required.")?;
    if !GPU_TIERS.contains(&gpu_tier.as_str()) {
        return Err(format!(
            "'configuration.gpu_tier' must be one of BASIC, STANDARD, PERFORMANCE (got '{gpu_tier}')."
        ));
    }
    let active_workers = opt_workers(config)?.unwrap_or(0);
    opt_string(config, "location", "configuration.location")?;
    let workflow = opt_object(obj, "workflow", "workflow")?.ok_or("'workflow' is required.")?;
    let model_url = opt_string(workflow, "model_url", "workflow.model_url")?
        .filter(|m| !m.trim().is_empty())
        .ok_or("'workflow.model_url' is required.")?;
    let tools = opt_object(workflow, "tools", "workflow.tools")?
        .cloned()
        .unwrap_or_default();
    Ok(NewApp {
        name,
        description,
        gpu_tier,
        active_workers,
        model_url,
        tools,
    })
}

fn validate_update(obj: &Map<String, Value>) -> Result<AppUpdate, String> {
    let name = opt_string(obj, "name", "name")?;
    if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err("'name' must not be empty.".into());
    }
    let description = opt_string(obj, "description", "description")?;
    let active_workers = match opt_object(obj, "configuration", "configuration")? {
        Some(c) => opt_workers(c)?,
        None => None,
    };
    let (model_url, tools) = match opt_object(obj, "workflow", "workflow")? {
        Some(w) => (
            opt_string(w, "model_url", "workflow.model_url")?,
            opt_object(w, "tools", "workflow.tools")?.cloned(),
        ),
        None => (None, None),
    };
    if model_url.as_deref().is_some_and(|m| m.trim().is_empty()) {
        return Err("'workflow.model_url' must not be empty.".into());
    }
    Ok(AppUpdate {
        name,
        description,
        active_workers,
        model_url,
        tools,
    })
}

// ---------------------------------------------------------------------------------------
// Control surface
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct JobStatusRequest {
    app_id: String,
    job_id: String,
    status: String,
}

fn control(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Response<Bytes> {
    let not_allowed = |allow: &'static str| {
        let mut r = error_response(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        r
    };
    match path {
        "/_mock/stats" => match *method {
            Method::GET => to_json_response(&lock(&shared.recorder).stats),
            _ => not_allowed("GET"),
        },
        "/_mock/reset" => match *method {
            Method::POST => {
                let mut rec = lock(&shared.recorder);
                rec.stats = MockStats::default();
                rec.log.clear();
                json_response(StatusCode::OK, &json!({ "ok": true }))
            }
            _ => not_allowed("POST"),
        },
        "/_mock/faults" => match *method {
            Method::GET => to_json_response(&*lock(&shared.faults)),
            Method::PUT => match serde_json::from_slice::<Faults>(body) {
                Ok(faults) => {
                    *lock(&shared.faults) = faults.clone();
                    to_json_response(&faults)
                }
                Err(e) => error_response(StatusCode::BAD_REQUEST, &format!("Invalid faults: {e}")),
            },
            _ => not_allowed("GET, PUT"),
        },
        "/_mock/requests" => match *method {
            Method::GET => {
                let log: Vec<RecordedRequest> =
                    lock(&shared.recorder).log.iter().cloned().collect();
                to_json_response(&log)
            }
            _ => not_allowed("GET"),
        },
        "/_mock/job_status" => match *method {
            Method::POST => match serde_json::from_slice::<JobStatusRequest>(body) {
                Ok(r) if shared.set_job_status(&r.app_id, &r.job_id, &r.status) => {
                    json_response(StatusCode::OK, &json!({ "ok": true }))
                }
                Ok(_) => error_response(StatusCode::NOT_FOUND, "Unknown job or status."),
                Err(e) => error_response(StatusCode::BAD_REQUEST, &format!("Invalid body: {e}")),
            },
            _ => not_allowed("POST"),
        },
        _ => error_response(StatusCode::NOT_FOUND, "Not found"),
    }
}

// ---------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------

fn json_response(status: StatusCode, value: &Value) -> Response<Bytes> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut r = Response::new(Bytes::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn to_json_response<T: Serialize>(value: &T) -> Response<Bytes> {
    match serde_json::to_value(value) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error_response(status: StatusCode, message: &str) -> Response<Bytes> {
    json_response(status, &json!({ "error": message }))
}

fn app_not_found(id: &str) -> Response<Bytes> {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("App with ID '{id}' not found."),
    )
}

fn job_not_found(app_id: &str, job_id: &str) -> Response<Bytes> {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("Job with ID '{job_id}' not found for App ID '{app_id}'."),
    )
}

fn status_or_500(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// First 8 hex chars of sha256(key): identifies a key in stats without revealing it.
pub fn key_fingerprint(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..4])
}

// ---------------------------------------------------------------------------------------
// Seed data and results
// ---------------------------------------------------------------------------------------

fn seed(config: &MockConfig, store: &mut Store) {
    let now = format_app_time(SystemTime::now());
    let mut seeded_teams = std::collections::HashSet::new();
    for user in &config.users {
        for n in 1..=2 {
            store.insert(seed_app(
                Scope::Personal(user.user_id.clone()),
                &user.user_id,
                &format!("personal-app-{n}"),
                n,
                &now,
            ));
        }
        for team in &user.teams {
            if seeded_teams.insert(team.clone()) {
                for n in 1..=2 {
                    store.insert(seed_app(
                        Scope::Team(team.clone()),
                        &user.user_id,
                        &format!("team-app-{n}"),
                        n,
                        &now,
                    ));
                }
            }
        }
    }
}

fn seed_app(scope: Scope, created_by: &str, name: &str, n: u64, now: &str) -> App {
    let loras = json!([
        {
            "id": "lora-realism",
            "versionId": "1.0",
            "downloadUrl": "https://huggingface.co/XLabs-AI/flux-RealismLora/resolve/main/lora.safetensors",
            "name": "Realism",
            "weight": 0.8
        }
    ]);
    let mut tools = Map::new();
    tools.insert("loras".into(), loras);
    let gpu_tier = if n % 2 == 1 { "STANDARD" } else { "BASIC" };
    App {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_owned(),
        description: format!(
            "Seeded demo app {n}: FLUX.1 text-to-image with a realism LoRA, for the gateway demo."
        ),
        gpu_tier: gpu_tier.to_owned(),
        active_workers: 0,
        model_url: "https://huggingface.co/black-forest-labs/FLUX.1-dev".to_owned(),
        tools,
        created_at: now.to_owned(),
        updated_at: now.to_owned(),
        created_by: created_by.to_owned(),
        scope,
        jobs: JobCounters::default(),
        job_table: HashMap::new(),
    }
}

/// The `result` of a completed job: one presigned-looking S3 URL, signed at `done`.
fn job_result(job_id: &str, done: SystemTime) -> Value {
    let secs = unix_secs(done);
    let amz_date = format_amz_date(secs);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let signature = hex::encode(Sha256::digest(format!("{job_id}|{amz_date}").as_bytes()));
    let url = format!(
        "https://rungenai-output-v1.s3.us-east-2.amazonaws.com/{job_id}/0.png\
         ?X-Amz-Algorithm=AWS4-HMAC-SHA256\
         &X-Amz-Credential=AKIAMOCKRUNGENOUTPUT%2F{y:04}{m:02}{d:02}%2Fus-east-2%2Fs3%2Faws4_request\
         &X-Amz-Date={amz_date}\
         &X-Amz-Expires=604800\
         &X-Amz-SignedHeaders=host\
         &X-Amz-Signature={signature}"
    );
    json!({ "images": [ { "image": url } ] })
}

// ---------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// (year, month 1-12, day 1-31) of a count of days since 1970-01-01 (proleptic Gregorian;
/// Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let y = if m <= 2 { y + 1 } else { y };
    (y, m as u32, d as u32)
}

/// (year, month, day, hour, minute, second) in UTC.
fn utc_fields(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    (
        y,
        mo,
        d,
        (sod / 3_600) as u32,
        (sod % 3_600 / 60) as u32,
        (sod % 60) as u32,
    )
}

/// App timestamps: `2025-01-09T16:45:34`.
fn format_app_time(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_fields(unix_secs(t));
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}")
}

/// Job timestamps: `2025-01-22 15:22:28`.
fn format_job_time(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_fields(unix_secs(t));
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// SigV4 dates: `20250122T152228Z`.
fn format_amz_date(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = utc_fields(secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use std::time::Instant;

    const TEAM: &str = DEFAULT_TEAM_ID;
    const OTHER_TEAM: &str = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
    const KEY_B: &str = "key-b";
    const USER_B: &str = "00000000-0000-4000-8000-00000000000b";
    const KEY_C: &str = "key-c";
    const USER_C: &str = "00000000-0000-4000-8000-00000000000c";

    type TestClient = Client<HttpConnector, Full<Bytes>>;

    fn config() -> MockConfig {
        let mut c = MockConfig::default();
        c.users.push(MockUser {
            api_key: KEY_B.into(),
            user_id: USER_B.into(),
            teams: vec![OTHER_TEAM.into()],
        });
        c.users.push(MockUser {
            api_key: KEY_C.into(),
            user_id: USER_C.into(),
            teams: vec![TEAM.into()],
        });
        c
    }

    async fn mock(config: MockConfig) -> (MockHandle, TestClient) {
        let handle = start(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        (handle, client)
    }

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        raw: Bytes,
        json: Value,
    }

    async fn try_call(
        client: &TestClient,
        h: &MockHandle,
        method: &str,
        path: &str,
        key: Option<&str>,
        team: Option<&str>,
        body: Option<&str>,
    ) -> Result<Reply, BoxError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", h.base_url()));
        if let Some(k) = key {
            req = req.header("X-Api-Key", k);
        }
        if let Some(t) = team {
            req = req.header("x-team-id", t);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .unwrap();
        let resp = client.request(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let raw = resp.into_body().collect().await?.to_bytes();
        let json = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            headers,
            raw,
            json,
        })
    }

    async fn call(
        client: &TestClient,
        h: &MockHandle,
        method: &str,
        path: &str,
        key: Option<&str>,
        team: Option<&str>,
        body: Option<&str>,
    ) -> Reply {
        try_call(client, h, method, path, key, team, body)
            .await
            .unwrap()
    }

    const CREATE: &str = r#"{"name":"my-app","description":"d","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://huggingface.co/black-forest-labs/FLUX.1-dev","tools":{"loras":[{"id":"a","versionId":"1","downloadUrl":"u","name":"n","weight":0.5}]}}}"#;
    const K: Option<&str> = Some(DEFAULT_API_KEY);

    async fn create(client: &TestClient, h: &MockHandle, team: Option<&str>) -> String {
        let r = call(client, h, "POST", "/app", K, team, Some(CREATE)).await;
        assert_eq!(r.status, StatusCode::CREATED);
        r.json["data"]["id"].as_str().unwrap().to_owned()
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        // 2025-01-22 15:22:28 UTC = 1737559348
        assert_eq!(format_amz_date(1_737_559_348), "20250122T152228Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_737_559_348);
        assert_eq!(format_job_time(t), "2025-01-22 15:22:28");
        assert_eq!(format_app_time(t), "2025-01-22T15:22:28");
    }

    #[test]
    fn toml_config() {
        let c = MockConfig::from_toml_str(
            "seed_apps = false\n[[users]]\napi_key = \"k\"\nuser_id = \"u\"\nteams = [\"t\"]\n",
        )
        .unwrap();
        assert!(!c.seed_apps);
        assert_eq!(c.create_status, 201);
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.users[0].teams, vec!["t".to_owned()]);
        assert_eq!(
            MockConfig::from_toml_str("").unwrap().users[0].api_key,
            DEFAULT_API_KEY
        );
        assert!(MockConfig::from_toml_str("bogus = 1").is_err());
        assert!(MockConfig::from_toml_str("create_status = 1000").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mock.toml");
        std::fs::write(&path, "job_polls_to_complete = 5\n").unwrap();
        assert_eq!(
            MockConfig::from_toml_file(&path)
                .unwrap()
                .job_polls_to_complete,
            5
        );
        let err = MockConfig::from_toml_file(dir.path().join("missing.toml")).unwrap_err();
        assert!(err.contains("missing.toml"), "{err}");
    }

    #[test]
    fn routes() {
        assert_eq!(match_route(&Method::GET, "/app"), Route::ListApps);
        assert_eq!(
            match_route(&Method::HEAD, "/app/x"),
            Route::GetApp("x".into())
        );
        assert_eq!(match_route(&Method::GET, "/app/"), Route::NotFound);
        assert_eq!(match_route(&Method::GET, "/apps"), Route::NotFound);
        assert_eq!(match_route(&Method::GET, "/app/x/job/"), Route::NotFound);
        assert_eq!(
            match_route(&Method::PUT, "/app/a/job/b"),
            Route::CancelJob("a".into(), "b".into())
        );
        assert!(matches!(
            match_route(&Method::GET, "/app/a/run_async"),
            Route::MethodNotAllowed { .. }
        ));
    }

    #[tokio::test]
    async fn auth_and_team_scope() {
        let (h, c) = mock(config()).await;
        for key in [None, Some("wrong")] {
            let r = call(&c, &h, "GET", "/app", key, None, None).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN);
            assert_eq!(r.json, json!({"error": MSG_INVALID_KEY}));
            assert_eq!(r.headers["content-type"], "application/json");
        }
        // Seeded: 2 personal apps, 2 team apps, ~1.7 KB each list.
        let personal = call(&c, &h, "GET", "/app", K, None, None).await;
        assert_eq!(personal.status, StatusCode::OK);
        assert_eq!(personal.json["data"].as_array().unwrap().len(), 2);
        assert!(
            (1_600..1_800).contains(&personal.raw.len()),
            "{}",
            personal.raw.len()
        );
        assert!(personal.headers.get("cache-control").is_none());
        let team = call(&c, &h, "GET", "/app", K, Some(TEAM), None).await;
        assert_eq!(team.json["data"].as_array().unwrap().len(), 2);
        assert_eq!(team.json["data"][0]["owner_team_id"], TEAM);
        assert_eq!(team.json["data"][0]["owner_user_id"], Value::Null);
        // Empty team header = personal scope.
        let empty = call(&c, &h, "GET", "/app", K, Some(""), None).await;
        assert_eq!(empty.json, personal.json);

        // B is not in TEAM.
        let r = call(&c, &h, "GET", "/app", Some(KEY_B), Some(TEAM), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(
            r.json["error"],
            format!("Unauthorized access. Not a member of team '{TEAM}'.")
        );

        // A team app: visible to member C with the team header, not personally, not to B.
        let id = create(&c, &h, Some(TEAM)).await;
        let path = format!("/app/{id}");
        let r = call(&c, &h, "GET", &path, Some(KEY_C), Some(TEAM), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json["data"]["created_by"], DEFAULT_USER_ID);
        let r = call(&c, &h, "GET", &path, K, None, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json["error"], format!("App with ID '{id}' not found."));
        let r = call(&c, &h, "GET", &path, Some(KEY_B), Some(OTHER_TEAM), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = call(&c, &h, "DELETE", &path, Some(KEY_B), None, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let list = call(&c, &h, "GET", "/app", Some(KEY_C), Some(TEAM), None).await;
        assert_eq!(list.json["data"].as_array().unwrap().len(), 3);
        h.shutdown();
    }

    #[tokio::test]
    async fn app_and_job_lifecycle() {
        let (h, c) = mock(config()).await;
        let r = call(&c, &h, "POST", "/app", K, None, Some(CREATE)).await;
        assert_eq!(r.status, StatusCode::CREATED);
        let app = &r.json["data"];
        assert_eq!(app["status"], "STOPPED");
        assert_eq!(app["owner_user_id"], DEFAULT_USER_ID);
        assert_eq!(app["owner_team_id"], Value::Null);
        assert_eq!(app["jobs"]["in_queue"], 0);
        assert_eq!(app["workers"]["idle"], 0);
        let created_at = app["created_at"].as_str().unwrap().to_owned();
        assert_eq!(created_at.len(), 19);
        assert_eq!(&created_at[10..11], "T");
        let id = app["id"].as_str().unwrap().to_owned();
        let app_path = format!("/app/{id}");

        let list = call(&c, &h, "GET", "/app", K, None, None).await;
        assert_eq!(list.json["data"].as_array().unwrap().len(), 3);
        let got = call(&c, &h, "GET", &app_path, K, None, None).await;
        assert_eq!(got.json["data"]["name"], "my-app");

        let upd = call(
            &c,
            &h,
            "PUT",
            &app_path,
            K,
            None,
            Some(r#"{"name":"renamed","configuration":{"active_workers":2,"gpu_tier":"PERFORMANCE"},"workflow":{"tools":{"extra":true}}}"#),
        )
        .await;
        assert_eq!(upd.status, StatusCode::OK);
        let d = &upd.json["data"];
        assert_eq!(d["name"], "renamed");
        assert_eq!(d["description"], "d");
        assert_eq!(d["status"], "RUNNING");
        assert_eq!(d["configuration"]["active_workers"], 2);
        assert_eq!(d["configuration"]["gpu_tier"], "BASIC");
        assert_eq!(d["workflow"]["tools"]["extra"], true);
        assert_eq!(d["workflow"]["tools"]["loras"][0]["weight"], 0.5);
        let r = call(
            &c,
            &h,
            "PUT",
            &app_path,
            K,
            None,
            Some(r#"{"configuration":{"active_workers":0}}"#),
        )
        .await;
        assert_eq!(r.json["data"]["status"], "STOPPED");
        let r = call(
            &c,
            &h,
            "PUT",
            &app_path,
            K,
            None,
            Some(r#"{"configuration":{"active_workers":-1}}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);

        // run_async -> poll IN_QUEUE -> COMPLETED -> cancel 409.
        let run_path = format!("{app_path}/run_async");
        let r = call(
            &c,
            &h,
            "POST",
            &run_path,
            K,
            None,
            Some(r#"{"input":{"prompt":"a cat","width":512}}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let job = r.json["data"]["id"].as_str().unwrap().to_owned();
        let got = call(&c, &h, "GET", &app_path, K, None, None).await;
        assert_eq!(got.json["data"]["jobs"]["in_queue"], 1);
        let job_path = format!("{app_path}/job/{job}");
        let p1 = call(&c, &h, "GET", &job_path, K, None, None).await;
        assert_eq!(p1.status, StatusCode::OK);
        assert_eq!(p1.json["data"]["status"], "IN_QUEUE");
        assert_eq!(p1.json["data"]["result"], Value::Null);
        assert_eq!(p1.json["data"]["request"]["prompt"], "a cat");
        assert!(p1.json["data"].get("execution_time").is_none());
        assert_eq!(
            &p1.json["data"]["created_at"].as_str().unwrap()[10..11],
            " "
        );
        let p2 = call(&c, &h, "GET", &job_path, K, None, None).await;
        assert_eq!(p2.json["data"]["status"], "COMPLETED");
        assert!(p2.json["data"]["execution_time"].is_string());
        let url = p2.json["data"]["result"]["images"][0]["image"]
            .as_str()
            .unwrap();
        assert!(url.starts_with(&format!(
            "https://rungenai-output-v1.s3.us-east-2.amazonaws.com/{job}/0.png?"
        )));
        assert!(url.contains("X-Amz-Expires=604800"));
        let date = url
            .split("X-Amz-Date=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        assert_eq!(date.len(), 16);
        assert!(date.ends_with('Z'));
        let sig = url.split("X-Amz-Signature=").nth(1).unwrap();
        assert_eq!(sig.len(), 64);
        // Terminal results stay put.
        let p3 = call(&c, &h, "GET", &job_path, K, None, None).await;
        assert_eq!(p3.json, p2.json);
        let got = call(&c, &h, "GET", &app_path, K, None, None).await;
        assert_eq!(got.json["data"]["jobs"]["completed"], 1);
        assert_eq!(got.json["data"]["jobs"]["in_queue"], 0);
        let r = call(&c, &h, "PUT", &job_path, K, None, None).await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert_eq!(r.json["error"], MSG_CANNOT_CANCEL);

        // A queued job cancels.
        let r = call(&c, &h, "POST", &run_path, K, None, Some(r#"{"input":{}}"#)).await;
        let job2 = r.json["data"]["id"].as_str().unwrap().to_owned();
        let job2_path = format!("{app_path}/job/{job2}");
        let r = call(&c, &h, "PUT", &job2_path, K, None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.json,
            json!({"data": {"job_id": job2, "status": "CANCELED"}})
        );
        let r = call(&c, &h, "GET", &job2_path, K, None, None).await;
        assert_eq!(r.json["data"]["status"], "CANCELED");
        let r = call(&c, &h, "PUT", &job2_path, K, None, None).await;
        assert_eq!(r.status, StatusCode::CONFLICT);

        // Forced status, unknown job.
        let r = call(&c, &h, "POST", &run_path, K, None, Some(r#"{"input":{}}"#)).await;
        let job3 = r.json["data"]["id"].as_str().unwrap().to_owned();
        assert!(h.set_job_status(&id, &job3, "IN_PROGRESS"));
        assert!(!h.set_job_status(&id, &job3, "BOGUS"));
        assert!(!h.set_job_status(&id, "nope", "FAILED"));
        for _ in 0..3 {
            let r = call(
                &c,
                &h,
                "GET",
                &format!("{app_path}/job/{job3}"),
                K,
                None,
                None,
            )
            .await;
            assert_eq!(r.json["data"]["status"], "IN_PROGRESS");
        }
        let r = call(
            &c,
            &h,
            "GET",
            &format!("{app_path}/job/nope"),
            K,
            None,
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(
            r.json["error"],
            format!("Job with ID 'nope' not found for App ID '{id}'.")
        );

        // Delete: 204 empty, then 404 for the app and its jobs.
        let r = call(&c, &h, "DELETE", &app_path, K, None, None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert!(r.raw.is_empty());
        let r = call(&c, &h, "GET", &app_path, K, None, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = call(&c, &h, "GET", &job_path, K, None, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = call(&c, &h, "DELETE", &app_path, K, None, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        h.shutdown();
    }

    #[tokio::test]
    async fn validation_and_routing_errors() {
        let (h, c) = mock(config()).await;
        for body in [
            "not json",
            "[]",
            r#"{"configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"m"}}"#,
            r#"{"name":"x","workflow":{"model_url":"m"}}"#,
            r#"{"name":"x","configuration":{"gpu_tier":"HUGE"},"workflow":{"model_url":"m"}}"#,
            r#"{"name":"x","configuration":{"gpu_tier":"BASIC"},"workflow":{}}"#,
            r#"{"name":"x","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"m","tools":[]}}"#,
        ] {
            let r = call(&c, &h, "POST", "/app", K, None, Some(body)).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(r.json["error"].is_string());
        }
        let id = create(&c, &h, None).await;
        for body in ["", "{}", r#"{"input":"x"}"#] {
            let r = call(
                &c,
                &h,
                "POST",
                &format!("/app/{id}/run_async"),
                K,
                None,
                Some(body),
            )
            .await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        }
        let r = call(
            &c,
            &h,
            "POST",
            "/app/nope/run_async",
            K,
            None,
            Some(r#"{"input":{}}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = call(&c, &h, "GET", "/nothing", K, None, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json, json!({"error": "Not found"}));
        let r = call(&c, &h, "PATCH", &format!("/app/{id}"), K, None, None).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(r.json["error"].is_string());
        assert!(r.headers.contains_key("allow"));
        let r = call(&c, &h, "DELETE", "/app", None, None, None).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        h.shutdown();
    }

    #[tokio::test]
    async fn stats_and_request_log() {
        let (h, c) = mock(config()).await;
        let id = create(&c, &h, None).await;
        call(&c, &h, "GET", &format!("/app/{id}"), K, None, None).await;
        call(&c, &h, "GET", "/app/other?x=1", K, None, None).await;
        call(&c, &h, "GET", "/app", Some(KEY_B), None, None).await;
        call(&c, &h, "GET", "/app", None, None, None).await;
        call(&c, &h, "GET", "/_mock/stats", None, None, None).await;
        let s = h.stats();
        assert_eq!(s.total, 5);
        assert_eq!(s.by_route["POST /app"], 1);
        assert_eq!(s.by_route["GET /app/{id}"], 2);
        assert_eq!(s.by_route["GET /app"], 2);
        assert_eq!(s.by_path[&format!("GET /app/{id}")], 1);
        assert_eq!(s.by_path["GET /app/other"], 1);
        assert_eq!(s.by_key[&key_fingerprint(DEFAULT_API_KEY)], 3);
        assert_eq!(s.by_key[&key_fingerprint(KEY_B)], 1);
        assert_eq!(s.by_key["<none>"], 1);
        assert_eq!(key_fingerprint(DEFAULT_API_KEY).len(), 8);

        let log = h.requests();
        assert_eq!(log.len(), 5);
        assert_eq!(log[0].method, "POST");
        assert!(log[0].body.contains("my-app"));
        assert_eq!(log[0].header("x-api-key"), Some(DEFAULT_API_KEY));
        assert_eq!(log[2].path_and_query, "/app/other?x=1");

        // Over HTTP.
        let r = call(&c, &h, "GET", "/_mock/stats", None, None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json["total"], 5);
        assert_eq!(r.json["by_route"]["GET /app/{id}"], 2);
        let r = call(&c, &h, "GET", "/_mock/requests", None, None, None).await;
        assert_eq!(r.json.as_array().unwrap().len(), 5);
        let r = call(&c, &h, "POST", "/_mock/reset", None, None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(h.stats().total, 0);
        assert!(h.requests().is_empty());
        h.reset_stats();
        h.shutdown();
    }

    /// One `GET` on a raw connection: every byte that came, and how the connection ended
    /// (`None`: a clean close).
    async fn raw_get(h: &MockHandle, path: &str) -> (Vec<u8>, Option<std::io::ErrorKind>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(h.local_addr())
            .await
            .unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: mock\r\nx-api-key: {DEFAULT_API_KEY}\r\nconnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf));
            match read.await.expect("the mock neither answered nor closed") {
                Ok(0) => return (got, None),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Some(e.kind())),
            }
        }
    }

    /// The head's end and the declared body length of a raw response.
    fn head_and_length(raw: &[u8]) -> (usize, usize) {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        (end, len)
    }

    #[tokio::test]
    async fn faults_below_http() {
        use std::io::ErrorKind::ConnectionReset;
        let (h, _c) = mock(config()).await;
        let once = |f: Faults| Faults {
            fail_count: Some(1),
            ..f
        };

        // Half a head, then a reset.
        h.set_faults(once(Faults {
            reset_mid_headers: true,
            ..Faults::default()
        }));
        let (got, end) = raw_get(&h, "/app").await;
        assert_eq!(got, HALF_HEAD);
        assert_eq!(end, Some(ConnectionReset));

        // The whole head and half the body, then a reset.
        h.set_faults(once(Faults {
            reset_mid_body: true,
            ..Faults::default()
        }));
        let (got, end) = raw_get(&h, "/app").await;
        let (head_end, len) = head_and_length(&got);
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(got.len() - head_end, len / 2);
        assert_eq!(end, Some(ConnectionReset));

        // Not HTTP, then a clean close.
        h.set_faults(once(Faults {
            invalid_response: true,
            ..Faults::default()
        }));
        let (got, end) = raw_get(&h, "/app").await;
        assert_eq!(got, NOT_HTTP);
        assert_eq!(end, None);

        // The head at once, then the body a byte every 10 ms: whole, but slow.
        h.set_faults(once(Faults {
            trickle_ms: Some(10),
            ..Faults::default()
        }));
        let t0 = Instant::now();
        let (got, end) = raw_get(&h, "/app/no-such-app").await;
        let (head_end, len) = head_and_length(&got);
        assert!(got.starts_with(b"HTTP/1.1 404"));
        assert_eq!(got.len() - head_end, len);
        assert_eq!(end, None);
        let least = Duration::from_millis(10) * u32::try_from(len - 1).unwrap();
        assert!(t0.elapsed() >= least, "{:?} < {least:?}", t0.elapsed());

        // Every fault was used up: a normal answer, and all four were counted.
        let (got, end) = raw_get(&h, "/app").await;
        let (head_end, len) = head_and_length(&got);
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(got.len() - head_end, len);
        assert_eq!(end, None);
        assert_eq!(h.stats().total, 5);
        let f = h.faults();
        assert!(!f.reset_mid_headers && !f.reset_mid_body && !f.invalid_response);
        assert!(f.trickle_ms.is_none());
    }

    #[tokio::test]
    async fn fault_injection() {
        let (h, c) = mock(config()).await;
        // fail_status with fail_count: counted, then back to normal.
        h.set_faults(Faults {
            fail_status: Some(429),
            fail_count: Some(2),
            retry_after_secs: Some(3),
            ..Faults::default()
        });
        for _ in 0..2 {
            let r = call(&c, &h, "GET", "/app", K, None, None).await;
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(r.json, json!({"error": "mock failure"}));
            assert_eq!(r.headers["retry-after"], "3");
        }
        let r = call(&c, &h, "GET", "/app", K, None, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(h.faults().fail_status.is_none());
        assert_eq!(h.stats().total, 3);

        // Latency.
        h.set_faults(Faults {
            latency_ms: 150,
            ..Faults::default()
        });
        let t0 = Instant::now();
        call(&c, &h, "GET", "/app", K, None, None).await;
        assert!(t0.elapsed() >= Duration::from_millis(150));

        // Dropped connection: a client error, but the request was counted.
        h.set_faults(Faults {
            drop_connections: true,
            fail_count: Some(1),
            ..Faults::default()
        });
        let before = h.stats().total;
        assert!(
            try_call(&c, &h, "GET", "/app", K, None, None)
                .await
                .is_err()
        );
        assert_eq!(h.stats().total, before + 1);
        let r = call(&c, &h, "GET", "/app", K, None, None).await;
        assert_eq!(r.status, StatusCode::OK);

        // Truncated body: the client sees an error reading the body.
        h.set_faults(Faults {
            truncate_body: true,
            ..Faults::default()
        });
        assert!(
            try_call(&c, &h, "GET", "/app", K, None, None)
                .await
                .is_err()
        );

        // Extra headers on success only; large bodies; faults over HTTP.
        let body = r#"{"extra_response_headers":[["cache-control","no-store"],["set-cookie","a=1"],["set-cookie","b=2"]],"large_body_bytes":100000}"#;
        let r = call(&c, &h, "PUT", "/_mock/faults", None, None, Some(body)).await;
        assert_eq!(r.status, StatusCode::OK);
        let r = call(&c, &h, "GET", "/app", K, None, None).await;
        assert_eq!(r.headers["cache-control"], "no-store");
        assert_eq!(r.headers.get_all("set-cookie").iter().count(), 2);
        assert!(
            r.raw.len() >= 100_000 && r.raw.len() < 100_100,
            "{}",
            r.raw.len()
        );
        assert!(r.json["padding"].is_string());
        let r = call(&c, &h, "GET", "/app/nope", K, None, None).await;
        assert!(r.headers.get("cache-control").is_none());
        let r = call(&c, &h, "GET", "/_mock/faults", None, None, None).await;
        assert_eq!(r.json["large_body_bytes"], 100_000);
        let r = call(&c, &h, "PUT", "/_mock/faults", None, None, Some("nope")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        h.shutdown();
    }

    #[tokio::test]
    async fn bare_envelope_statuses_and_h2c() {
        let cfg = MockConfig {
            bare_app_envelope: true,
            create_status: 200,
            run_async_status: 202,
            job_polls_to_complete: 3,
            seed_apps: false,
            ..MockConfig::default()
        };
        let (h, _) = mock(cfg).await;
        let c: TestClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let r = call(&c, &h, "GET", "/app", K, None, None).await;
        assert_eq!(r.json, json!({"data": []}));
        let r = call(&c, &h, "POST", "/app", K, None, Some(CREATE)).await;
        assert_eq!(r.status, StatusCode::OK);
        let id = r.json["data"]["id"].as_str().unwrap().to_owned();
        let r = call(&c, &h, "GET", &format!("/app/{id}"), K, None, None).await;
        assert_eq!(r.json["id"], id.as_str());
        let r = call(
            &c,
            &h,
            "POST",
            &format!("/app/{id}/run_async"),
            K,
            None,
            Some(r#"{"input":{}}"#),
        )
        .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        let job = r.json["data"]["id"].as_str().unwrap().to_owned();
        let path = format!("/app/{id}/job/{job}");
        let mut seen = Vec::new();
        for _ in 0..4 {
            let r = call(&c, &h, "GET", &path, K, None, None).await;
            seen.push(r.json["data"]["status"].as_str().unwrap().to_owned());
        }
        assert_eq!(seen, ["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "COMPLETED"]);

        // Shutdown stops accepting.
        h.shutdown();
        tokio::time::timeout(Duration::from_secs(2), h.wait())
            .await
            .unwrap();
        let fresh: TestClient = Client::builder(TokioExecutor::new()).build_http();
        assert!(
            try_call(&fresh, &h, "GET", "/app", K, None, None)
                .await
                .is_err()
        );
    }

    /// On the wire (HTTP/1.1): a dropped connection sends nothing; a truncated one sends
    /// the head with a larger Content-Length than the bytes that follow, then closes.
    #[tokio::test]
    async fn raw_wire_faults() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (h, _) = mock(MockConfig::default()).await;
        let request =
            format!("GET /app HTTP/1.1\r\nhost: x\r\nx-api-key: {DEFAULT_API_KEY}\r\n\r\n");
        let read_all = |addr: SocketAddr, request: String| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&out).into_owned()
        };

        h.set_faults(Faults {
            drop_connections: true,
            ..Faults::default()
        });
        assert_eq!(read_all(h.local_addr(), request.clone()).await, "");

        h.set_faults(Faults {
            truncate_body: true,
            ..Faults::default()
        });
        let raw = read_all(h.local_addr(), request).await;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(!body.is_empty());
        assert!(body.len() < declared, "{} < {declared}", body.len());
        h.shutdown();
    }

    #[tokio::test]
    async fn many_concurrent_requests() {
        let (h, c) = mock(MockConfig::default()).await;
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (c, h) = (c.clone(), h.clone());
            tasks.push(tokio::spawn(async move {
                call(&c, &h, "GET", "/app", K, None, None).await.status
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), StatusCode::OK);
        }
        assert_eq!(h.stats().by_route["GET /app"], 200);
        h.shutdown();
    }
}
