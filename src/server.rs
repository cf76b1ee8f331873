//! Process wiring: build the upstream client, the cache and the gateway
//! service from a config, bind the public and admin listeners, hot-reload the
//! config, and shut down in order (readiness off, drain delay, stop accepting,
//! drain).

use crate::cache::{Cache, PurgeScope};
use crate::circuit::Breakers;
use crate::clock::{SharedClock, SystemClock};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::gateway::{self, GatewayService};
use crate::rate_limit::{self, Limits};
use crate::{admin, listener, telemetry, tls, upstream};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the listeners, the admin API and reload share.
pub struct State {
    config: ArcSwap<Config>,
    service: Arc<ArcSwap<GatewayService>>,
    cache: Arc<Cache>,
    limits: Arc<Limits>,
    breakers: Arc<Breakers>,
    cluster: Option<Arc<Cluster>>,
    tls: Option<Arc<tls::CertStore>>,
    draining: AtomicBool,
    generation: AtomicU64,
    reload_lock: tokio::sync::Mutex<()>,
}

impl State {
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The rate limiters (per-IP state size: [`Limits::tracked_ips`]).
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Why the gateway is not ready, if it is not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.is_draining() {
            return Some("draining: shutting down");
        }
        if self.tls.as_ref().is_some_and(|t| !t.valid_now()) {
            return Some("the TLS certificate in use has expired");
        }
        None
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    pub fn tls(&self) -> Option<&Arc<tls::CertStore>> {
        self.tls.as_ref()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Bumped by every successful reload (1 at start).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Re-reads the config file (and the secrets it names) and applies it.
    /// One reload at a time, reading included: of two overlapping reloads
    /// (the file watcher, SIGHUP, `POST /reload`), the one that read the
    /// newer files is applied last.
    pub async fn reload(&self) -> Result<u64, String> {
        let _guard = self.reload_lock.lock().await;
        let path = self.config().source.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| format!("reload task failed: {e}"))?;
        match loaded {
            Ok(config) => self.apply_locked(config).await,
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "config reload refused; the previous config keeps serving");
                metrics::counter!("rungen_gateway_config_reloads_total", "outcome" => "error")
                    .increment(1);
                Err(msg)
            }
        }
    }

    /// Swaps in a validated config: the next request uses it; in-flight
    /// requests finish with the one they started with. Entries of scopes whose
    /// key or team changed, or that were removed, are dropped.
    pub async fn apply(&self, new: Config) -> Result<u64, String> {
        let _guard = self.reload_lock.lock().await;
        self.apply_locked(new).await
    }

    /// [`apply`](Self::apply), with `reload_lock` held by the caller.
    async fn apply_locked(&self, new: Config) -> Result<u64, String> {
        let old = self.config();
        let client = match upstream::build_client(&new.upstream) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "config reload refused; the previous config keeps serving");
                metrics::counter!("rungen_gateway_config_reloads_total", "outcome" => "error")
                    .increment(1);
                return Err(e);
            }
        };
        for team in &old.teams {
            let same = new.teams.iter().any(|t| {
                t.name == team.name && t.team_id == team.team_id && t.api_key == team.api_key
            });
            if !same {
                tracing::info!(scope = %team.name, "scope removed or its key changed; dropping its cache entries");
                self.cache.purge(&PurgeScope {
                    scope: Some(team.name.clone()),
                    path_prefix: None,
                });
            }
        }
        for (section, changed) in restart_only_changes(&old, &new) {
            if changed {
                tracing::warn!(
                    section,
                    "this setting changed but only takes effect at the next restart"
                );
            }
        }
        if !self.cache.reconfigure(&new.cache) {
            tracing::warn!(
                "cache size bounds changed; they take effect at the next restart (route policies were applied)"
            );
        }
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        self.limits.configure(new.rate_limit.clone());
        self.breakers
            .configure(new.upstream.breaker_failures, new.upstream.breaker_cooldown);
        let service = gateway::build(
            &new,
            client,
            self.cache.clone(),
            self.limits.clone(),
            self.breakers.clone(),
        );
        self.service.store(Arc::new(service));
        self.config.store(Arc::new(new));
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::counter!("rungen_gateway_config_reloads_total", "outcome" => "success")
            .increment(1);
        metrics::gauge!("rungen_gateway_config_generation").set(generation as f64);
        tracing::info!(generation, "config reloaded");
        Ok(generation)
    }
}

/// Settings read once at start: a reload that changes them only warns.
fn restart_only_changes(old: &Config, new: &Config) -> [(&'static str, bool); 11] {
    let (o, n) = (&old.server, &new.server);
    [
        ("cluster", old.cluster != new.cluster),
        (
            // Request bodies take the new value at once.
            "server.body_read_timeout (for responses a client does not take)",
            o.body_read_timeout != n.body_read_timeout,
        ),
        ("server.listen", o.listen != n.listen),
        (
            "server.plaintext_listen",
            o.plaintext_listen != n.plaintext_listen,
        ),
        ("server.tls", o.tls != n.tls),
        (
            "server limits (headers, connections, h2 streams)",
            o.max_header_bytes != n.max_header_bytes
                || o.max_headers != n.max_headers
                || o.max_connections != n.max_connections
                || o.max_connections_per_ip != n.max_connections_per_ip
                || o.max_requests_per_connection != n.max_requests_per_connection
                || o.h2_max_concurrent_streams != n.h2_max_concurrent_streams
                || o.header_read_timeout != n.header_read_timeout,
        ),
        (
            "server.shutdown_timeout",
            o.shutdown_timeout != n.shutdown_timeout,
        ),
        (
            "server.worker_threads",
            o.worker_threads != n.worker_threads,
        ),
        ("admin.listen", old.admin.listen != new.admin.listen),
        (
            "logging",
            old.logging.level != new.logging.level || old.logging.format != new.logging.format,
        ),
        (
            "reload",
            old.reload.watch != new.reload.watch
                || old.reload.poll_interval != new.reload.poll_interval,
        ),
    ]
}

/// A running gateway.
pub struct Running {
    addr: SocketAddr,
    plaintext_addr: Option<SocketAddr>,
    plaintext_task: Option<JoinHandle<()>>,
    admin_addr: Option<SocketAddr>,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    admin_stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    admin_task: Option<JoinHandle<()>>,
}

impl Running {
    /// The bound public address (the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound plaintext address beside TLS, if configured.
    pub fn plaintext_addr(&self) -> Option<SocketAddr> {
        self.plaintext_addr
    }

    /// The bound admin address, if the admin listener is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// The response cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.state.cache
    }

    /// Begins the shutdown: readiness turns 503 at once; after
    /// `server.drain_delay` the listener stops accepting and drains.
    pub fn shutdown(&self) {
        self.state.draining.store(true, Ordering::SeqCst);
        let delay = self.state.config().server.drain_delay;
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = stop.send(true);
        });
    }

    /// Waits until the public listener has drained, then stops the admin listener.
    pub async fn wait(self) {
        let _ = self.task.await;
        if let Some(t) = self.plaintext_task {
            let _ = t.await;
        }
        let _ = self.admin_stop.send(true);
        if let Some(admin) = self.admin_task {
            let _ = admin.await;
        }
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
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cluster: {0}")]
    Cluster(String),
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Starts serving `config` and returns at once.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, Arc::new(SystemClock)).await
}

/// Like [`start`], with a given clock (tests move time by hand).
pub async fn start_with(config: Config, clock: SharedClock) -> Result<Running, StartError> {
    telemetry::metrics();
    // One crypto provider in the process (ring), also for libraries that ask
    // rustls for the default (the Redis client's rediss://).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = upstream::build_client(&config.upstream).map_err(StartError::Upstream)?;
    let cache = Cache::new(config.cache.clone(), clock.clone());
    let limits = Limits::with_clock(config.rate_limit.clone(), clock.clone());
    let cluster = match &config.cluster {
        Some(settings) => {
            let c = Cluster::start(settings.clone(), cache.clone()).map_err(StartError::Cluster)?;
            cache.set_fanout(c.outbox());
            if c.shared_cache() {
                cache.set_shared(c.clone());
            }
            limits.set_cluster(c.clone());
            tracing::info!(replica = %c.id(), "cluster mode: upstream budgets in Redis, quotas shared among live replicas, invalidations fanned out");
            Some(c)
        }
        None => {
            metrics::gauge!("rungen_gateway_cluster_mode").set(0.0);
            tracing::info!(
                "cluster mode off: single-replica semantics (cache and limits are this replica's own)"
            );
            None
        }
    };
    let breakers = Breakers::new(
        config.upstream.breaker_failures,
        config.upstream.breaker_cooldown,
        clock,
    );
    rate_limit::spawn_pruner(&limits);
    let service: GatewayService = gateway::build(
        &config,
        client,
        cache.clone(),
        limits.clone(),
        breakers.clone(),
    );
    let (listener, addr) = bind(config.server.listen).await?;
    let admin_listener = match config.admin.listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let plaintext_listener = match (config.server.tls.is_some(), config.server.plaintext_listen) {
        (true, Some(a)) => Some(bind(a).await?),
        _ => None,
    };
    let tls_store = match &config.server.tls {
        Some(settings) => Some(tls::CertStore::load(settings).map_err(StartError::Tls)?),
        None => None,
    };

    let server_cfg = config.server.clone();
    let watch_cfg = config.reload.clone();
    let state = Arc::new(State {
        config: ArcSwap::from_pointee(config),
        service: Arc::new(ArcSwap::from_pointee(service)),
        cache,
        limits,
        breakers,
        cluster,
        tls: tls_store.clone(),
        draining: AtomicBool::new(false),
        generation: AtomicU64::new(1),
        reload_lock: tokio::sync::Mutex::new(()),
    });
    metrics::gauge!("rungen_gateway_config_generation").set(1.0);

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tls = match &tls_store {
        Some(store) => {
            let acceptor = tls::Acceptor::new(store.clone()).map_err(StartError::Tls)?;
            tls::spawn_reloader(acceptor.clone(), stopped.clone());
            Some(acceptor)
        }
        None => None,
    };
    // One set of connection caps for the listeners that serve callers.
    let caps = listener::ConnectionCaps::new(server_cfg.max_connections);
    let task = tokio::spawn(listener::serve(
        listener,
        state.service.clone(),
        server_cfg.clone(),
        caps.clone(),
        until_stopped(stopped.clone()),
        tls,
    ));
    let mut plaintext_addr = None;
    let plaintext_task = plaintext_listener.map(|(l, a)| {
        plaintext_addr = Some(a);
        tokio::spawn(listener::serve(
            l,
            state.service.clone(),
            server_cfg.clone(),
            caps.clone(),
            until_stopped(stopped.clone()),
            None,
        ))
    });
    // The admin listener outlives the drain (health and metrics stay
    // readable while connections finish): `Running::wait` stops it.
    let (admin_stop, admin_stopped) = watch::channel(false);
    let mut admin_addr = None;
    let admin_task = admin_listener.map(|(l, a)| {
        admin_addr = Some(a);
        let svc = Arc::new(ArcSwap::from_pointee(admin::service(state.clone())));
        let mut admin_cfg = server_cfg.clone();
        admin_cfg.max_connections = 256;
        // Probes, scrapes and operators need a few connections each: no one
        // peer may hold the admin listener's room (the public listener's
        // max_connections_per_ip would let it take all 256).
        admin_cfg.max_connections_per_ip = admin_cfg.max_connections_per_ip.min(16);
        admin_cfg.shutdown_timeout = Duration::from_secs(1);
        let admin_caps = listener::ConnectionCaps::new(admin_cfg.max_connections);
        tokio::spawn(listener::serve(
            l,
            svc,
            admin_cfg,
            admin_caps,
            until_stopped(admin_stopped),
            None,
        ))
    });
    if watch_cfg.watch && state.config().source.is_file() {
        // The versions now, not when the task first runs: a change in between counts.
        tokio::spawn(watch_files(
            state.clone(),
            watched_versions(&state),
            watch_cfg.poll_interval,
            stopped.clone(),
        ));
    }
    let cfg = state.config();
    tracing::info!(
        %addr,
        tls = cfg.server.tls.is_some(),
        plaintext = %plaintext_addr.map_or("off".to_string(), |a| a.to_string()),
        admin = %admin_addr.map_or("off".to_string(), |a| a.to_string()),
        upstream = %format!("{}://{}", cfg.upstream.scheme, cfg.upstream.authority),
        "gateway listening"
    );
    Ok(Running {
        addr,
        plaintext_addr,
        plaintext_task,
        admin_addr,
        state,
        stop,
        admin_stop,
        task,
        admin_task,
    })
}

/// What identifies a version of a file: modification time and length
/// (following symlinks, so Kubernetes' swapped `..data` link counts).
fn file_version(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn watched_versions(state: &State) -> Vec<Option<(SystemTime, u64)>> {
    let cfg = state.config();
    std::iter::once(&cfg.source)
        .chain(cfg.secret_files.iter())
        .map(file_version)
        .collect()
}

/// Polls the config file and the secret files; reloads when one changes
/// (after a short debounce, so a half-written file is not read). A refused
/// reload is retried (backing off from the poll interval to
/// [`MAX_RELOAD_RETRY`]) until one succeeds: a config may name a secret file
/// that appears a moment later (a ConfigMap and a Secret are updated
/// separately), and that file is not among the running config's.
async fn watch_files(
    state: Arc<State>,
    mut last: Vec<Option<(SystemTime, u64)>>,
    every: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = watched_versions(&state);
        let retry_due = retry.is_some_and(|(at, _)| tokio::time::Instant::now() >= at);
        if now != last {
            tokio::time::sleep(Duration::from_millis(250)).await;
            tracing::info!("config or secret file changed; reloading");
        } else if retry_due {
            tracing::info!("retrying the refused config reload");
        } else {
            continue;
        }
        // The versions the reload is about to read: a file that changes while
        // it runs differs from these at the next poll and is reloaded then.
        let before = watched_versions(&state);
        retry = match state.reload().await {
            Ok(_) => None,
            Err(_) => {
                let backoff =
                    retry.map_or(every, |(_, b)| (b * 2).min(MAX_RELOAD_RETRY.max(every)));
                Some((tokio::time::Instant::now() + backoff, backoff))
            }
        };
        last = before;
    }
}

/// Longest wait between retries of a refused reload (the file watcher's).
const MAX_RELOAD_RETRY: Duration = Duration::from_secs(10);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(server: &str, rest: &str) -> Config {
        let text = crate::config::tests::base(&format!("[server]\n{server}\n{rest}"));
        Config::from_toml(std::path::Path::new("t.toml"), &text).unwrap()
    }

    fn changed(old: &Config, new: &Config) -> Vec<&'static str> {
        restart_only_changes(old, new)
            .into_iter()
            .filter_map(|(section, changed)| changed.then_some(section))
            .collect()
    }

    #[test]
    fn restart_only_changes_name_the_cluster_and_the_response_stall_timeout() {
        let plain = config("", "");
        assert!(changed(&plain, &config("", "")).is_empty());
        let slow = config("body_read_timeout = \"5s\"", "");
        assert_eq!(
            changed(&plain, &slow),
            ["server.body_read_timeout (for responses a client does not take)"]
        );
        let redis = |prefix: &str| {
            config(
                "",
                &format!(
                    "[cluster]\nredis_url = {{ value = \"redis://127.0.0.1:1\" }}\nkey_prefix = \"{prefix}\""
                ),
            )
        };
        assert_eq!(changed(&plain, &redis("a")), ["cluster"]);
        assert_eq!(changed(&redis("a"), &redis("b")), ["cluster"]);
        assert!(changed(&redis("a"), &redis("a")).is_empty());
    }
}
