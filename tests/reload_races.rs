//! Config reloads that race: a file changed while a reload reads, and two
//! reloads at once (the file watcher, SIGHUP, `POST /reload`). A named pipe
//! as a secret file holds a reload at a known point, so the order is
//! deterministic rather than timed.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::{Method, StatusCode};
use rungen_gateway::config::Config;
use rungen_gateway::mock_upstream::{self, MockHandle};
use rungen_gateway::server::{self, Running};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

// ---------------------------------------------------------------------------
// Helpers

/// Like Kubernetes: write a new file, then rename it over the old one.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// O_NONBLOCK on Linux (x86_64 and aarch64).
const O_NONBLOCK: i32 = 0o4000;

/// A named pipe used as a secret file: reading it blocks until a writer comes,
/// which lets a test hold a reload at a known point *after* the secret files
/// named before it (and the config file) were read. This is only a way to make
/// the timing deterministic: in production the same window is the time a
/// reload takes (reading files, validating, building the upstream client).
struct Fifo {
    path: PathBuf,
    serve: mpsc::Sender<usize>,
}

/// Waits (at most 10 s) until no reader holds the pipe open. A reader that
/// got the content may still be reading towards end-of-file: a writer that
/// opened the pipe again meanwhile would join that read and hand the reader
/// the content twice (`slow-scope-key\nslow-scope-key`, which a reload
/// refuses), so the next writer waits for the reader to close first.
fn wait_until_unread(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let started = std::time::Instant::now();
    // With O_NONBLOCK, opening for writing fails (ENXIO) once no reader is
    // there; while one is, the probe writes nothing and closes at once, so the
    // reader sees end-of-file.
    while std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .is_ok()
        && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Fifo {
    /// Creates the pipe and a thread that answers one reader per `serve_one`.
    fn new(dir: &Path, content: &'static str) -> Self {
        let path = dir.join("slow.key");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&path)
                .status()
                .unwrap()
                .success()
        );
        let (serve, rx) = mpsc::channel::<usize>();
        let p = path.clone();
        std::thread::spawn(move || {
            while let Ok(n) = rx.recv() {
                for _ in 0..n {
                    // Blocks until a reader opens the pipe.
                    let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&p) else {
                        return;
                    };
                    let _ = f.write_all(content.as_bytes());
                    drop(f);
                    wait_until_unread(&p);
                }
            }
        });
        Fifo { path, serve }
    }

    /// The next reader of the pipe gets the content at once (from the thread).
    fn serve_one(&self) {
        self.serve.send(1).unwrap();
    }

    /// Every later reader gets the content at once.
    fn serve_forever(&self) {
        self.serve.send(usize::MAX).unwrap();
    }

    /// Waits until a reader has the pipe open and is blocked on it; returns
    /// the write end, which releases the reader once written and dropped.
    async fn wait_for_blocked_reader(&self) -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        let started = std::time::Instant::now();
        loop {
            // With O_NONBLOCK, opening for writing succeeds only if a reader is there.
            if let Ok(f) = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(O_NONBLOCK)
                .open(&self.path)
            {
                return f;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no reload started reading the secret file"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Releases a writer thread still waiting for a reader (end of test).
    fn release_writer(&self) {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NONBLOCK)
            .open(&self.path);
    }
}

struct Gw {
    _dir: tempfile::TempDir,
    path: PathBuf,
    key_file: PathBuf,
    mock: MockHandle,
    gateway: Running,
    fifo: Fifo,
}

/// The common test config, written to a file: scope "personal" reads its key
/// from `personal.key`, and one extra scope ("slow", last, so it is read after
/// every other secret) reads its key from a named pipe.
async fn start_file_gateway(edit: impl Fn(String) -> String) -> Gw {
    let mock = mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("personal.key");
    std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).unwrap();
    let fifo = Fifo::new(dir.path(), "slow-scope-key\n");
    let text = config_toml(&mock.base_url(), "", "").replacen(
        &format!("api_key = {{ value = \"{UPSTREAM_KEY}\" }}"),
        &format!("api_key = {{ file = \"{}\" }}", key_file.display()),
        1,
    ) + &format!(
        "\n[[teams]]\nname = \"slow\"\napi_key = {{ file = \"{}\" }}\n",
        fifo.path.display()
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, edit(text)).unwrap();
    fifo.serve_one(); // the read at start
    let gateway = server::start(Config::load(&path).unwrap()).await.unwrap();
    Gw {
        _dir: dir,
        path,
        key_file,
        mock,
        gateway,
        fifo,
    }
}

fn without_reader(text: &str) -> String {
    let start = text.find("[[clients]]\nname = \"reader\"").unwrap();
    let end = start
        + text[start..]
            .find("[[clients]]\nname = \"misconfigured\"")
            .unwrap();
    format!("{}{}", &text[..start], &text[end..])
}

fn without_slow_team(text: &str) -> String {
    let start = text.find("\n[[teams]]\nname = \"slow\"").unwrap();
    text[..start].to_string()
}

// ---------------------------------------------------------------------------
// 1. The file watcher loses a change that lands while a reload runs.

/// The watcher (server.rs `watch_files`) records the files' versions *after*
/// the reload it started (`last = watched_versions(&state)`), not the versions
/// the reload read. A secret rotated while that reload runs (kubelet updates
/// the ConfigMap and the Secret volumes separately) is then taken as already
/// applied: the old key keeps being injected until some other file changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rotated_while_a_watcher_reload_runs_is_not_lost() {
    let g = start_file_gateway(|t| t).await;
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RW); // default scope: personal
    let r = c
        .get(&g.gateway_url("/app"), &[("authorization", &auth)])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        g.mock.requests().last().unwrap().header("x-api-key"),
        Some(UPSTREAM_KEY)
    );

    // A config change (say, a new client): the watcher starts a reload, which
    // reads the config and personal.key, then reads the last secret file.
    let text = std::fs::read_to_string(&g.path).unwrap();
    write_atomically(&g.path, &format!("{text}\n# a harmless change\n"));
    let held = g.fifo.wait_for_blocked_reader().await;

    // Meanwhile the Secret volume is updated: personal's key is rotated.
    write_atomically(&g.key_file, &format!("{OTHER_UPSTREAM_KEY}\n"));

    // The reload finishes (with the key it had read before the rotation).
    {
        let mut held = held;
        held.write_all(b"slow-scope-key\n").unwrap();
    }
    let started = std::time::Instant::now();
    while g.gateway.state().generation() < 2 {
        assert!(started.elapsed() < Duration::from_secs(10), "no reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Any further reload may read the pipe at once. (Each write to the pipe
    // changes its mtime, so once the watcher reloads again it keeps
    // reloading every poll: harmless here.)
    g.fifo.serve_forever();

    // Many poll intervals (200 ms) later, the rotated key must be in use.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let in_use = g
        .gateway
        .state()
        .config()
        .teams
        .iter()
        .find(|t| t.name == "personal")
        .unwrap()
        .api_key
        .expose()
        .to_string();
    g.fifo.release_writer();
    assert_eq!(
        in_use,
        OTHER_UPSTREAM_KEY,
        "the key rotated on disk during a reload was never picked up (generation {})",
        g.gateway.state().generation()
    );
    g.gateway.stop().await;
    g.mock.shutdown();
}

// ---------------------------------------------------------------------------
// 2. Two overlapping reloads can apply the older config last.

/// `State::reload` (server.rs) reads and validates the file *outside*
/// `reload_lock`; only `apply` is serialised. A reload that started first but
/// read slower (file watcher, SIGHUP or POST /reload) is applied after a newer
/// one and silently rolls the gateway back: here a token revoked by the newer
/// config (and acknowledged by POST /reload with 200) is accepted again, and
/// nothing ever re-applies the file on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_config_is_never_applied_after_a_newer_one() {
    let g = start_file_gateway(|t| t.replace("poll_interval = \"200ms\"", "watch = false")).await;
    let c = TestClient::http1();
    assert_eq!(
        c.get(&g.gateway_url("/app"), &[("x-api-key", TOKEN_RO)])
            .await
            .status,
        StatusCode::OK
    );

    // Reload A (e.g. SIGHUP, or the watcher) reads the current file and is
    // still reading its last secret...
    let admin = g.admin_url("/reload");
    let (c2, admin2) = (c.clone(), admin.clone());
    let reload_a = tokio::spawn(async move {
        c2.send(
            Method::POST,
            &admin2,
            &[("authorization", &bearer(ADMIN_TOKEN))],
            None,
        )
        .await
    });
    let held = g.fifo.wait_for_blocked_reader().await;

    // ...when the operator revokes the reader's token (and drops the slow
    // scope) and reloads (reload B).
    let text = std::fs::read_to_string(&g.path).unwrap();
    write_atomically(&g.path, &without_slow_team(&without_reader(&text)));
    let (c3, admin3) = (c.clone(), admin.clone());
    let mut reload_b = tokio::spawn(async move {
        c3.send(
            Method::POST,
            &admin3,
            &[("authorization", &bearer(ADMIN_TOKEN))],
            None,
        )
        .await
    });
    // B waits for A (one reload at a time, reading included).
    let b_first = tokio::time::timeout(Duration::from_secs(3), &mut reload_b).await;
    // Reload A finishes.
    {
        let mut held = held;
        held.write_all(b"slow-scope-key\n").unwrap();
    }
    let a = tokio::time::timeout(Duration::from_secs(10), reload_a)
        .await
        .expect("reload A finished")
        .unwrap();
    let b = match b_first {
        Ok(b) => b.unwrap(),
        Err(_) => tokio::time::timeout(Duration::from_secs(10), reload_b)
            .await
            .expect("reload B finished")
            .unwrap(),
    };
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(b.status, StatusCode::OK, "{b:?}");

    // The file on disk revokes the token; the gateway must not accept it.
    let status = c
        .get(&g.gateway_url("/app"), &[("x-api-key", TOKEN_RO)])
        .await
        .status;
    let slow_present = g
        .gateway
        .state()
        .config()
        .teams
        .iter()
        .any(|t| t.name == "slow");
    g.fifo.release_writer();
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an older config was applied over a newer one (scope `slow` present again: {slow_present}): a revoked token is accepted"
    );
    g.gateway.stop().await;
    g.mock.shutdown();
}

impl Gw {
    fn gateway_url(&self, p: &str) -> String {
        format!("http://{}{}", self.gateway.local_addr(), p)
    }
    fn admin_url(&self, p: &str) -> String {
        format!("http://{}{}", self.gateway.admin_addr().unwrap(), p)
    }
}
