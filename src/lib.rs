//! rungen-gateway: a caching reverse-proxy gateway in front of the RunGen.AI API.
//!
//! The request path, in order (see `gateway::build`): accept (`listener`),
//! routing and request limits (`routing`), caller auth (`caller_auth`),
//! credential injection (`upstream_credentials`), upstream (`upstream`).
//! Beside it: `config`, `error`, `telemetry`, `mock_upstream`.

pub mod admin;
pub mod body;
pub mod cache;
pub mod caller_auth;
pub mod circuit;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
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
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod upstream_credentials;
