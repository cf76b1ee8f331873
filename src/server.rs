//! Process wiring: build the upstream client and the gateway service from a
//! config, bind the listener, and run until told to stop.

use crate::cache::Cache;
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::gateway::{self, GatewayService};
use crate::listener;
use crate::upstream;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running gateway.
pub struct Running {
    addr: SocketAddr,
    cache: Arc<Cache>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// The bound address (the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The response cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Stops accepting and starts draining; `wait` finishes when drained.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Shuts down and waits.
    pub async fn stop(self) {
        self.shutdown();
        self.wait().await;
    }
}

/// Errors while starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream client: {0}")]
    Upstream(String),
}

/// Starts serving `config` and returns at once.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, Arc::new(SystemClock)).await
}

/// Like [`start`], with a given clock (tests move time by hand).
pub async fn start_with(config: Config, clock: SharedClock) -> Result<Running, StartError> {
    let client = upstream::build_client(&config.upstream).map_err(StartError::Upstream)?;
    let cache = Cache::new(config.cache.clone(), clock);
    let service: GatewayService = gateway::build(&config, client, cache.clone());
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.server.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.server.listen,
        source,
    })?;
    let (stop, mut stopped) = watch::channel(false);
    let swap = Arc::new(ArcSwap::from_pointee(service));
    let server_cfg = config.server.clone();
    let task = tokio::spawn(async move {
        listener::serve(listener, swap, server_cfg, async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await;
    });
    tracing::info!(%addr, upstream = %format!("{}://{}", config.upstream.scheme, config.upstream.authority), "gateway listening");
    Ok(Running {
        addr,
        cache,
        stop,
        task,
    })
}
