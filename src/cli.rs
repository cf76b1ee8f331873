//! The command line: `serve`, `check-config`, `new-token`, `mock-upstream`, `demo`.

use crate::config::{Config, LogFormat};
use crate::{mock_upstream, secret, server, telemetry};
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The demo config, embedded so that `rungen-gateway demo` works from anywhere.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

#[derive(Parser, Debug)]
#[command(
    name = "rungen-gateway",
    version,
    about = "Caching reverse-proxy gateway in front of the RunGen.AI API",
    long_about = "Callers authenticate with their own token; the gateway picks the caller's team \
                  scope, injects the server-held RunGen API key, and forwards /app requests to the \
                  RunGen API."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway with a config file.
    Serve {
        /// Path to the TOML config (see config/gateway.example.toml).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Log format; overrides the config's logging.format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Validate a config file (and the secrets it references) and exit:
    /// 0 if valid, 1 with the file, the field and the reason otherwise.
    CheckConfig {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a fresh random caller token (256 bits) and the SHA-256 to put in
    /// the config's clients entry as token_sha256. Give the token to the caller only.
    NewToken,
    /// Run the built-in mock RunGen upstream (for local testing and benchmarks).
    /// Its counters are at GET /_mock/stats.
    MockUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Optional mock config (TOML: a users list of api_key, user_id, teams).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Start the mock upstream and the gateway in front of it (config/demo.toml,
    /// embedded) and print curl lines to try.
    Demo {
        /// Address for the gateway; overrides the demo config's listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormatArg {
    Pretty,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> Self {
        match f {
            LogFormatArg::Pretty => LogFormat::Pretty,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::NewToken => {
            let (token, digest) = secret::new_token();
            println!("token:        {token}");
            println!("token_sha256: {digest}");
            println!();
            println!("Give the token to the caller; put only token_sha256 in the config.");
            ExitCode::SUCCESS
        }
        Command::Serve { config, log_format } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let threads = Threads::resolve(config.server.worker_threads);
            threads.run(|| serve(config, threads, log_format.map(Into::into)))
        }
        Command::MockUpstream { listen, config } => {
            let mock_config = match config {
                None => mock_upstream::MockConfig::default(),
                Some(path) => match mock_upstream::MockConfig::from_toml_file(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                },
            };
            Threads::resolve(0).run(|| mock(mock_config, listen))
        }
        Command::Demo { listen, log_format } => {
            Threads::resolve(0).run(|| demo(listen, log_format.map(Into::into)))
        }
    }
}

/// The async runtime's threads: `[server] worker_threads`, or (0) one per CPU
/// this process may use (its affinity mask and cgroup CPU quota, as
/// `std::thread::available_parallelism` reads them).
#[derive(Debug, Clone, Copy)]
struct Threads(usize);

impl Threads {
    fn resolve(configured: usize) -> Self {
        match configured {
            0 => Self(std::thread::available_parallelism().map_or(1, usize::from)),
            n => Self(n),
        }
    }

    /// One thread runs everything on tokio's current-thread scheduler: the
    /// multi-thread one would add a worker beside the main thread and pay for
    /// cross-thread wake-ups and work stealing with no other core to use.
    fn flavor(self) -> &'static str {
        if self.0 == 1 {
            "current_thread"
        } else {
            "multi_thread"
        }
    }

    fn run<F, Fut>(self, f: F) -> ExitCode
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ExitCode>,
    {
        let mut builder = if self.0 == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(self.0);
            b
        };
        match builder.enable_all().build() {
            Ok(rt) => rt.block_on(f()),
            Err(e) => {
                eprintln!("cannot start the async runtime: {e}");
                ExitCode::FAILURE
            }
        }
    }

    fn log(self) {
        tracing::info!(
            worker_threads = self.0,
            scheduler = self.flavor(),
            "async runtime"
        );
    }
}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: ok ({} team scope(s), {} client(s), upstream {}://{})",
                path.display(),
                c.teams.len(),
                c.clients.len(),
                c.upstream.scheme,
                c.upstream.authority
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs until SIGTERM or SIGINT; each SIGHUP reloads the config.
async fn serve_until_signal(state: &server::State, signals: &mut Signals) {
    #[cfg(unix)]
    loop {
        tokio::select! {
            () = Signals::recv(signals.terminate.as_mut()) => return,
            () = Signals::recv(signals.interrupt.as_mut()) => return,
            () = Signals::recv(signals.hangup.as_mut()) => {
                tracing::info!("SIGHUP: reloading the config");
                let _ = state.reload().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = state;
        signals.shutdown().await;
    }
}

/// The process's signals, listened for from the moment this is made: one
/// that arrives before anything waits for it is kept, where the default
/// action would have ended the process at once (a SIGTERM right after the
/// listener is up, before the drain logic waits for it, must drain).
struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                terminate: signal(SignalKind::terminate()).ok(),
                interrupt: signal(SignalKind::interrupt()).ok(),
                hangup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves on SIGTERM or SIGINT (Ctrl-C).
    async fn shutdown(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            () = Self::recv(self.terminate.as_mut()) => {}
            () = Self::recv(self.interrupt.as_mut()) => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }

    /// The next delivery of one signal (never, if it could not be listened for).
    #[cfg(unix)]
    async fn recv(signal: Option<&mut tokio::signal::unix::Signal>) {
        match signal {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}

async fn serve(config: Config, threads: Threads, log_format: Option<LogFormat>) -> ExitCode {
    telemetry::init(
        &config.logging.level,
        log_format.unwrap_or(config.logging.format),
    );
    threads.log();
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let mut signals = Signals::listen();
    let running = match server::start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    serve_until_signal(running.state(), &mut signals).await;
    tracing::info!(
        drain_delay = ?running.state().config().server.drain_delay,
        "shutdown signal received: readiness is off; draining after the delay (a second signal stops at once)"
    );
    tokio::select! {
        () = running.stop() => {}
        // An operator (or a supervisor) that will not wait for the drain.
        () = signals.shutdown() => {
            tracing::warn!("second shutdown signal: stopping without waiting for the drain");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn mock(config: mock_upstream::MockConfig, listen: SocketAddr) -> ExitCode {
    telemetry::init("info", LogFormat::Pretty);
    let mut signals = Signals::listen();
    match mock_upstream::start(config, listen).await {
        Ok(handle) => {
            tracing::info!(addr = %handle.local_addr(), "mock RunGen upstream listening; counters at /_mock/stats");
            signals.shutdown().await;
            handle.shutdown();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The demo config with its upstream pointed at a mock on `mock_addr`.
pub fn demo_config(mock_addr: SocketAddr) -> Result<Config, String> {
    let mut config = Config::from_toml(Path::new("config/demo.toml (embedded)"), DEMO_CONFIG)
        .map_err(|e| e.to_string())?;
    config.upstream.scheme = http::uri::Scheme::HTTP;
    config.upstream.authority = mock_addr
        .to_string()
        .parse()
        .map_err(|e| format!("mock address: {e}"))?;
    Ok(config)
}

async fn demo(listen: Option<SocketAddr>, log_format: Option<LogFormat>) -> ExitCode {
    let mut signals = Signals::listen();
    let mock = match mock_upstream::start(
        mock_upstream::MockConfig::default(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot start the mock upstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = match demo_config(mock.local_addr()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    telemetry::init(
        &config.logging.level,
        log_format.unwrap_or(config.logging.format),
    );
    let running = match server::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let base = format!("http://{}", running.local_addr());
    println!();
    println!(
        "rungen-gateway demo: gateway on {base}, mock RunGen upstream on {}",
        mock.base_url()
    );
    println!("Try (Ctrl-C to stop):");
    println!();
    println!("  # list the personal scope's apps with the dashboard client's token");
    println!("  curl -s -H 'Authorization: Bearer demo-token-dashboard' {base}/app");
    println!();
    println!("  # the same for the team scope 'acme', chosen with x-team-id");
    println!(
        "  curl -s -H 'Authorization: Bearer demo-token-dashboard' -H 'x-team-id: 123e4567-e89b-12d3-a456-426614174000' {base}/app"
    );
    println!();
    println!("  # refused: the read-only client may not create apps (403)");
    println!(
        "  curl -s -i -X POST -H 'x-api-key: demo-token-readonly' -H 'content-type: application/json' -d '{{\"name\":\"x\"}}' {base}/app"
    );
    println!();
    signals.shutdown().await;
    running.stop().await;
    mock.shutdown();
    ExitCode::SUCCESS
}
