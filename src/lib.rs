//! rungen-gateway: a caching reverse-proxy gateway in front of the RunGen.AI API.
//!
//! The request path, in order (see `gateway::build`): accept (`listener`,
//! `tls`), access log (`telemetry`), CORS (`cors`), rescue (`error`),
//! overload and request limits (`rate_limit`, `routing`), caller auth
//! (`caller_auth`, `jwt`), caller limits (`rate_limit`), cache (`cache`),
//! circuit breaker (`circuit`), upstream budget (`rate_limit`), credential
//! injection (`upstream_credentials`), upstream (`upstream`).
//! The steps from the access log down to the cache return a `step::StepFuture`:
//! an answer made without waiting (a hit, a refusal) goes back up as a value.
//! Beside it: `config`, `server` (wiring, reload, shutdown), `admin`,
//! `cluster` (Redis), `clock`, `body`, `secret`, `client_local` (per-thread
//! records of each client's metric series and limiter), `mock_upstream`.

pub mod admin;
pub mod body;
pub mod cache;
pub mod caller_auth;
pub mod circuit;
pub mod cli;
pub mod client_local;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod context;
pub mod cors;
pub mod error;
pub mod gateway;
pub mod hop;
pub mod jwt;
pub mod listener;
pub mod mock_upstream;
pub mod rate_limit;
pub mod routing;
pub mod secret;
pub mod server;
pub mod step;
pub mod sync;
pub mod telemetry;
pub mod timer;
pub mod tls;
pub mod upstream;
pub mod upstream_credentials;
