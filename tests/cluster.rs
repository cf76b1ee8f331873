//! Several replicas through a real Redis (Debian's redis-server, started per
//! test on a free loopback port, no persistence). Skipped when redis-server is
//! not installed, unless RUNGEN_REQUIRE_REDIS is set (CI sets it).
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod common;

use common::*;
use http::{Method, StatusCode};
use rungen_gateway::config::Config;
use rungen_gateway::mock_upstream::{self, MockHandle};
use rungen_gateway::server::{self, Running};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Redis {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    fn start_on(port: u16) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("RUNGEN_REQUIRE_REDIS").is_none(),
                "RUNGEN_REQUIRE_REDIS is set but redis-server is not installed"
            );
            eprintln!("skipped: no redis-server (apt-get install redis-server); CI runs this test");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "local",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Redis {
            child: Some(child),
            port,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every key and every value in the database (SCAN; strings with GET,
    /// hashes with HGETALL, anything else with DUMP), lossily as text.
    /// Script calls Redis has run (EVALSHA + EVAL), from INFO commandstats.
    async fn script_calls(&self) -> u64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    async fn dump(&self) -> String {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut out = String::new();
        for k in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
            let value: Vec<Vec<u8>> = match kind.as_str() {
                "string" => redis::cmd("GET")
                    .arg(&k)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect(),
                "hash" => redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .unwrap(),
                _ => redis::cmd("DUMP")
                    .arg(&k)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect(),
            };
            out.push_str(&String::from_utf8_lossy(&k));
            out.push_str(&format!(" ({kind}) ="));
            for v in value {
                out.push(' ');
                out.push_str(&String::from_utf8_lossy(&v));
            }
            out.push('\n');
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Replicas {
    mock: MockHandle,
    gateways: Vec<Running>,
}

impl Replicas {
    async fn start(redis: &Redis, n: usize, sections: &str) -> Replicas {
        let r = Self::start_unchecked(&vec![redis.url(); n], sections).await;
        r.wait_until(|g| {
            let c = g.state().cluster().unwrap();
            c.is_connected() && c.replicas() == n as u32
        })
        .await;
        r
    }

    /// One replica per Redis URL, without waiting for Redis. `sections` goes
    /// into `[cluster]` (and may open tables after it).
    async fn start_unchecked(redis_urls: &[String], sections: &str) -> Replicas {
        let mock = mock_upstream::start(mock_config(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        // Short Redis calls by default (the degraded-mode tests rely on it);
        // a test may set its own `timeout`.
        let timeout = if sections.contains("timeout =") {
            ""
        } else {
            "timeout = \"200ms\"\n"
        };
        let mut gateways = Vec::new();
        for url in redis_urls {
            let cluster = format!(
                "[cluster]\nredis_url = \"{url}\"\n{timeout}heartbeat = \"200ms\"\n{sections}"
            );
            let text = config_toml_with(&mock.base_url(), "", "", &cluster);
            let config = Config::from_toml(Path::new("cluster.toml"), &text).unwrap();
            gateways.push(server::start(config).await.unwrap());
        }
        Replicas { mock, gateways }
    }

    async fn wait_until(&self, cond: impl Fn(&Running) -> bool) {
        let started = Instant::now();
        while !self.gateways.iter().all(&cond) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "replicas never agreed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{}", self.gateways[i].local_addr(), path)
    }

    /// Waits until every replica is connected and subscribed.
    async fn wait_subscribed(&self) {
        self.wait_until(|g| {
            let c = g.state().cluster().unwrap();
            c.is_connected() && c.is_subscribed()
        })
        .await;
    }

    /// `GET /app` on replica `i` as the writer client.
    async fn list_apps(&self, c: &TestClient, i: usize) -> Reply {
        c.get(
            &self.url(i, "/app"),
            &[("authorization", &bearer(TOKEN_RW))],
        )
        .await
    }

    /// `GET /app` on replica `i` until it is a hit there.
    async fn cache_app(&self, c: &TestClient, i: usize) {
        self.list_apps(c, i).await;
        assert_eq!(status(&self.list_apps(c, i).await), "rungen-gateway; hit");
    }

    /// `GET /app` on replica `i` as `TOKEN_RW`, in its own task (for callers
    /// that must be in the air at once).
    fn spawn_get_app(&self, c: &TestClient, i: usize) -> tokio::task::JoinHandle<Reply> {
        let (c, auth, url) = (c.clone(), bearer(TOKEN_RW), self.url(i, "/app"));
        tokio::spawn(async move { c.get(&url, &[("authorization", &auth)]).await })
    }

    async fn stop(self) {
        for g in self.gateways {
            g.stop().await;
        }
        self.mock.shutdown();
    }
}

fn status(r: &Reply) -> String {
    r.headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_budget_is_exact_across_replicas() {
    let Some(redis) = Redis::start() else { return };
    let r = Replicas::start(
        &redis,
        3,
        "[rate_limit]\nupstream_budget = { per_minute = 6, burst = 6 }\nupstream_queue_timeout = \"0s\"\n",
    )
    .await;
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RW);
    let mut ok = 0;
    for i in 0..30 {
        let res = c
            .get(
                &r.url(i % 3, &format!("/app/budget-{i}")),
                &[("authorization", &auth)],
            )
            .await;
        match res.status {
            StatusCode::NOT_FOUND => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        r.mock.stats().total,
        6,
        "exactly the cluster-wide budget reached the upstream"
    );
    assert_eq!(ok, 6);
    r.stop().await;
}

/// An upstream 429 is the RunGen account's: every replica holds back that
/// scope's upstream calls for its Retry-After, not only the one that saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_pauses_the_scope_on_every_replica() {
    let Some(redis) = Redis::start() else { return };
    let r = Replicas::start(&redis, 2, "").await;
    let c = TestClient::http1();
    let rw = bearer(TOKEN_RW);
    r.mock.set_faults(mock_upstream::Faults {
        fail_status: Some(429),
        retry_after_secs: Some(60),
        fail_count: Some(1),
        ..Default::default()
    });
    let res = c.get(&r.url(0, "/app"), &[("authorization", &rw)]).await;
    assert_eq!(res.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.mock.stats().total, 1);
    let res = c.get(&r.url(1, "/app/p1"), &[("authorization", &rw)]).await;
    assert_eq!(
        res.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        status(&res)
    );
    assert!(
        res.error_message().contains("upstream-paused"),
        "{}",
        status(&res)
    );
    let wait: u64 = res.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((50..=60).contains(&wait), "Retry-After {wait}");
    // Another scope of the same replicas is not paused.
    let res = c
        .get(
            &r.url(1, "/app"),
            &[("authorization", &rw), ("x-team-id", TEAM_ID)],
        )
        .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(r.mock.stats().total, 2);
    r.stop().await;
}

/// A budget above 1,000 a second has a sub-millisecond interval: the shared
/// bucket keeps it (it counted whole milliseconds, so 4,000/s ran at 1,000/s
/// and 501/s at up to 1,000/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_budget_keeps_sub_millisecond_intervals() {
    let Some(redis) = Redis::start() else { return };
    let r = Replicas::start(&redis, 1, "").await;
    let cluster = r.gateways[0].state().cluster().unwrap().clone();
    let quota = rungen_gateway::rate_limit::quota(4000, Duration::from_secs(1), 1);
    use rungen_gateway::cluster::Budget;
    assert_eq!(
        cluster.take_budget("fast", &quota).await,
        Ok(Budget::Allowed)
    );
    // Eight at once (one connection: Redis runs them back to back, well
    // within an interval): the refused ones wait at most one interval, 250 us
    // (whole milliseconds would make every wait 1 ms).
    let answers =
        futures_util::future::join_all((0..8).map(|_| cluster.take_budget("fast", &quota))).await;
    let waits: Vec<Duration> = answers
        .iter()
        .filter_map(|a| match a {
            Ok(Budget::Wait(w)) => Some(*w),
            Ok(Budget::Allowed) => None,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(!waits.is_empty(), "eight at once all allowed: {answers:?}");
    assert!(
        waits.iter().all(|w| *w <= Duration::from_micros(250)),
        "{waits:?}"
    );
    r.stop().await;
}

/// Closed-loop load for `window`: `workers[i]` concurrent callers on replica
/// `i`. Returns (admitted per replica, requests per replica, seconds from the
/// first request to the last answer).
async fn load(r: &Replicas, workers: [usize; 3], window: Duration) -> ([u64; 3], [u64; 3], f64) {
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RW);
    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = Vec::new();
    for (replica, n) in workers.iter().enumerate() {
        for _ in 0..*n {
            let (c, auth, url) = (c.clone(), auth.clone(), r.url(replica, "/app"));
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut refused) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let res = c.get(&url, &[("authorization", &auth)]).await;
                    match res.status {
                        StatusCode::TOO_MANY_REQUESTS => refused += 1,
                        StatusCode::OK => ok += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
                (replica, ok, refused)
            }));
        }
    }
    let (mut admitted, mut sent) = ([0u64; 3], [0u64; 3]);
    for t in tasks {
        let (replica, ok, no) = t.await.unwrap();
        admitted[replica] += ok;
        sent[replica] += ok + no;
    }
    (admitted, sent, started.elapsed().as_secs_f64())
}

/// Caller quotas hold cluster-wide (leased batches from a bucket in Redis)
/// within 10% of the allowance (burst + rate x window), whatever the balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_quotas_hold_cluster_wide_under_any_balance() {
    for (name, rate, burst, workers) in [
        ("balanced", 20, 60, [3, 3, 3]),
        ("all on one replica", 20, 60, [9, 0, 0]),
        ("80/10/10", 20, 60, [8, 1, 1]),
        // Batches of 20 tokens.
        ("balanced", 200, 600, [3, 3, 3]),
        ("all on one replica", 200, 600, [9, 0, 0]),
        ("80/10/10", 200, 600, [8, 1, 1]),
    ] {
        let Some(redis) = Redis::start() else { return };
        let r = Replicas::start(
            &redis,
            3,
            &format!("[rate_limit]\ndefault = {{ per_second = {rate}, burst = {burst} }}\n"),
        )
        .await;
        // Warm the list so that admitted requests are cache hits.
        let c = TestClient::http1();
        let auth = bearer(TOKEN_RW);
        assert_eq!(
            c.get(&r.url(0, "/app"), &[("authorization", &auth)])
                .await
                .status,
            StatusCode::OK
        );
        let scripts_before = redis.script_calls().await;
        let (admitted, sent, secs) = load(&r, workers, Duration::from_secs(3)).await;
        let lease_calls = redis.script_calls().await - scripts_before;
        let total = admitted.iter().sum::<u64>() + 1;
        let refused = sent.iter().sum::<u64>() + 1 - total;
        let allowance = f64::from(burst) + f64::from(rate) * secs;
        let error = (total as f64 - allowance) / allowance;
        println!(
            "caller quota {rate}/s burst {burst}, 3 replicas, {name}: admitted {total} \
             (per replica {admitted:?} of {sent:?} requests) in {secs:.2}s; \
             allowance {allowance:.1}; error {:+.1}%; {lease_calls} lease round trips",
            error * 100.0
        );
        assert!(refused > 0, "{name}: the load never exceeded the quota");
        assert!(
            error.abs() <= 0.10,
            "{name}: admitted {total}, allowance {allowance:.1}"
        );
        r.stop().await;
    }
}

/// Degraded mode keeps today's local share: quota / live replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_caller_quotas_fall_back_to_the_local_share() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let r = Replicas::start(
        &redis,
        3,
        "[rate_limit]\ndefault = { per_minute = 30, burst = 30 }\n",
    )
    .await;
    redis.stop();
    r.wait_until(|g| !g.state().cluster().unwrap().is_connected())
        .await;
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RW);
    let mut allowed = 0;
    for _ in 0..30 {
        let res = c.get(&r.url(0, "/app"), &[("authorization", &auth)]).await;
        if res.status != StatusCode::TOO_MANY_REQUESTS {
            allowed += 1;
        }
    }
    assert_eq!(
        allowed, 10,
        "one replica alone admits its third of the burst"
    );
    r.stop().await;
}

/// Shared fetch: one upstream request for a cold key asked on 3 replicas at
/// once; a write's invalidation is never answered from the shared entry; no
/// secret in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_fetch_costs_one_upstream_request_per_key() {
    let Some(redis) = Redis::start() else { return };
    let r = Replicas::start(
        &redis,
        3,
        // A lookup that timed out on a loaded machine would fetch on its own
        // and make this count 2: a generous Redis timeout here.
        "shared_cache = true\nshared_lock = \"2s\"\nshared_wait = \"1s\"\ntimeout = \"1s\"\n",
    )
    .await;
    r.mock.set_faults(mock_upstream::Faults {
        latency_ms: 150,
        ..Default::default()
    });
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RW);
    let cold: Vec<_> = (0..9).map(|i| r.spawn_get_app(&c, i % 3)).collect();
    let mut bodies = Vec::new();
    let mut shared = 0;
    for t in cold {
        let res = t.await.unwrap();
        assert_eq!(res.status, StatusCode::OK);
        let status = res
            .headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if status.contains("detail=shared") {
            assert!(!status.contains("fwd-status"), "{status}");
            shared += 1;
        }
        bodies.push(res.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    // The two replicas that did not fetch say where their answer came from.
    assert!(shared >= 2, "{shared} answers marked detail=shared");
    assert_eq!(
        r.mock
            .stats()
            .by_route
            .get("GET /app")
            .copied()
            .unwrap_or(0),
        1,
        "3 replicas, 9 callers, one upstream request"
    );
    // Every replica now has it locally.
    for i in 0..3 {
        assert_eq!(
            status(&r.spawn_get_app(&c, i).await.unwrap()),
            "rungen-gateway; hit",
            "replica {i}"
        );
    }

    // A create through replica 0: its next read is fresh at once (never the
    // shared entry from before the write), the others within a second.
    r.mock.set_faults(Default::default());
    let body = r#"{"name":"shared-fan-out","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://h/m"}}"#;
    let res = c
        .send(
            Method::POST,
            &r.url(0, "/app"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(body),
        )
        .await;
    assert!(res.status.is_success());
    assert!(
        r.spawn_get_app(&c, 0)
            .await
            .unwrap()
            .text()
            .contains("shared-fan-out")
    );
    let started = Instant::now();
    for i in 1..3 {
        loop {
            if r.spawn_get_app(&c, i)
                .await
                .unwrap()
                .text()
                .contains("shared-fan-out")
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "replica {i} still serves the old list"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A purge on replica 2 drops the shared entries too.
    let before = r.mock.stats().by_route["GET /app"];
    r.gateways[2]
        .cache()
        .purge(&rungen_gateway::cache::PurgeScope::default());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = r.spawn_get_app(&c, 0).await.unwrap();
    assert!(status(&res).contains("fwd=uri-miss"), "{}", status(&res));
    assert_eq!(
        r.mock.stats().by_route["GET /app"],
        before + 1,
        "refetched upstream after the purge, not from the shared entry"
    );

    // Keys and values in Redis: shared entries exist, no secret does.
    let dump = redis.dump().await;
    assert!(dump.contains(":shared:personal:e:"), "{dump}");
    assert!(dump.contains("shared-fan-out"), "{dump}");
    for canary in [
        UPSTREAM_KEY,
        WRONG_UPSTREAM_KEY,
        OTHER_UPSTREAM_KEY,
        TOKEN_RW,
        TOKEN_RO,
        ADMIN_TOKEN,
        &sha256_hex(TOKEN_RW),
        &sha256_hex(UPSTREAM_KEY),
    ] {
        assert!(!dump.contains(canary), "{canary} in Redis: {dump}");
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_purges_reach_every_replica_within_a_second() {
    let Some(redis) = Redis::start() else { return };
    let r = Replicas::start(&redis, 3, "").await;
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RW);
    let hdr = [("authorization", auth.as_str())];
    for i in 0..3 {
        c.get(&r.url(i, "/app"), &hdr).await;
        assert_eq!(
            status(&c.get(&r.url(i, "/app"), &hdr).await),
            "rungen-gateway; hit"
        );
    }
    // A create through replica 0 drops the list on 1 and 2.
    let body = r#"{"name":"fan-out","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://h/m"}}"#;
    let res = c
        .send(
            Method::POST,
            &r.url(0, "/app"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(body),
        )
        .await;
    assert!(res.status.is_success());
    let started = Instant::now();
    for i in 1..3 {
        loop {
            let res = c.get(&r.url(i, "/app"), &hdr).await;
            if res.text().contains("fan-out") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "replica {i} still serves the old list"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A purge on replica 2 reaches 0 and 1.
    for i in 0..3 {
        c.get(&r.url(i, "/app"), &hdr).await;
    }
    r.gateways[2]
        .cache()
        .purge(&rungen_gateway::cache::PurgeScope::default());
    let started = Instant::now();
    for i in 0..2 {
        loop {
            let res = c.get(&r.url(i, "/app"), &hdr).await;
            if status(&res).contains("fwd=uri-miss") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "replica {i} kept its entry"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Nothing secret is ever written to Redis.
    let dump = redis.dump().await;
    assert!(dump.contains("rungen-gateway:replica:"), "{dump}");
    for canary in [
        UPSTREAM_KEY,
        WRONG_UPSTREAM_KEY,
        OTHER_UPSTREAM_KEY,
        TOKEN_RW,
        TOKEN_RO,
        ADMIN_TOKEN,
    ] {
        assert!(!dump.contains(canary), "{canary} in Redis: {dump}");
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_degrades_without_hanging_and_recovers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let port = redis.port;
    // Shared fetch on: a dead Redis must not hold fills either.
    let r = Replicas::start(&redis, 2, "shared_cache = true\n").await;
    let c = TestClient::http1();
    let auth = bearer(TOKEN_RW);
    redis.stop();
    r.wait_until(|g| !g.state().cluster().unwrap().is_connected())
        .await;
    for i in 0..10 {
        let started = Instant::now();
        let res = c
            .get(
                &r.url(i % 2, &format!("/app/degraded-{i}")),
                &[("authorization", &auth)],
            )
            .await;
        assert_eq!(
            res.status,
            StatusCode::NOT_FOUND,
            "served (the upstream's answer) while Redis is down"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a request waited on a dead Redis"
        );
    }
    let ready = c
        .get(
            &format!("http://{}/readyz", r.gateways[0].admin_addr().unwrap()),
            &[],
        )
        .await;
    assert_eq!(ready.status, StatusCode::OK, "degraded is still ready");
    // Redis back on the same port: cluster mode resumes by itself.
    let _redis = Redis::start_on(port).unwrap();
    r.wait_until(|g| g.state().cluster().unwrap().is_connected())
        .await;
    let res = c.get(&r.url(0, "/app"), &[("authorization", &auth)]).await;
    assert_eq!(res.status, StatusCode::OK);
    r.stop().await;
}

/// The wait for another replica's fetch is bounded: past `shared_wait` each
/// replica fetches for itself instead of queueing behind a slow upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_fetch_waits_no_longer_than_shared_wait() {
    let Some(redis) = Redis::start() else { return };
    let r = Replicas::start(
        &redis,
        3,
        "shared_cache = true\nshared_lock = \"5s\"\nshared_wait = \"100ms\"\n",
    )
    .await;
    r.mock.set_faults(mock_upstream::Faults {
        latency_ms: 700,
        ..Default::default()
    });
    let c = TestClient::http1();
    let started = Instant::now();
    let tasks: Vec<_> = (0..3).map(|i| r.spawn_get_app(&c, i)).collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    let elapsed = started.elapsed();
    assert_eq!(
        r.mock
            .stats()
            .by_route
            .get("GET /app")
            .copied()
            .unwrap_or(0),
        3,
        "the two waiters gave up after 100ms and fetched themselves"
    );
    assert!(
        elapsed < Duration::from_millis(1300),
        "nobody queued behind the slow fetch: {elapsed:?}"
    );
    r.stop().await;
}

/// Creates an app named `name` through replica `i` (a write: its invalidation
/// fans out to the other replicas).
async fn create_app(r: &Replicas, c: &TestClient, i: usize, name: &str) {
    let body = format!(
        r#"{{"name":"{name}","configuration":{{"gpu_tier":"BASIC"}},"workflow":{{"model_url":"https://h/m"}}}}"#
    );
    let res = c
        .send(
            Method::POST,
            &r.url(i, "/app"),
            &[
                ("authorization", &bearer(TOKEN_RW)),
                ("content-type", "application/json"),
            ],
            Some(&body),
        )
        .await;
    assert!(res.status.is_success(), "{}", res.status);
}

/// A long freshness for `/app`, so a test sees invalidations, not expiry.
const LONG_TTL: &str = "[cache.routes.\"/app\"]\nttl = \"60s\"\n";

/// Replicas are counted without walking the keyspace: a Redis shared with
/// millions of other keys (another application's, or shared cache entries)
/// must not make every heartbeat miss its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_counted_in_a_crowded_redis() {
    let Some(redis) = Redis::start() else { return };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(2_000_000)
        .arg("otherapp")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut r = Replicas::start(&redis, 3, "").await;
    // Still counted, heartbeat after heartbeat.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for g in &r.gateways {
        let c = g.state().cluster().unwrap();
        assert!(c.is_connected() && c.is_subscribed());
        assert_eq!(c.replicas(), 3);
    }
    // A replica that stops is no longer counted once its heartbeat TTL passes.
    r.gateways.pop().unwrap().stop().await;
    r.wait_until(|g| g.state().cluster().unwrap().replicas() == 2)
        .await;
    let members: u64 = redis::cmd("ZCARD")
        .arg("rungen-gateway:replicas")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, 2, "the stopped replica's entry was dropped");
    r.stop().await;
}

/// A TCP proxy to Redis. While `freeze` is set it silently stops forwarding
/// on connections that subscribed (no FIN, no RST: a half-open connection, as
/// after a NAT or load balancer dropped it); other connections pass. Each
/// chunk a client sends waits `delay_ms` first (a slow or distant Redis).
struct RedisProxy {
    port: u16,
    freeze: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

impl RedisProxy {
    async fn start(redis_port: u16) -> RedisProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let freeze = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, delay) = (freeze.clone(), delay_ms.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let subscribed = Arc::new(AtomicBool::new(false));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (freeze, sub, delay) = (frozen.clone(), subscribed.clone(), delay.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        if String::from_utf8_lossy(&buf[..n])
                            .to_ascii_uppercase()
                            .contains("SUBSCRIBE")
                        {
                            sub.store(true, Ordering::SeqCst);
                        }
                        while freeze.load(Ordering::SeqCst) && sub.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let ms = delay.load(Ordering::SeqCst);
                        if ms > 0 {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let freeze = frozen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n @ 1..) = sr.read(&mut buf).await {
                        // Frozen: what Redis sends is lost.
                        if freeze.load(Ordering::SeqCst) && subscribed.load(Ordering::SeqCst) {
                            continue;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RedisProxy {
            port,
            freeze,
            delay_ms,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A subscription that silently stops delivering is noticed (the replica's
/// own heartbeat does not come back), and once it is back the replica drops
/// what it cached meanwhile: a write it never heard of is not hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_noticed_and_its_cache_dropped() {
    let Some(redis) = Redis::start() else { return };
    let proxy = RedisProxy::start(redis.port).await;
    let r = Replicas::start_unchecked(&[redis.url(), proxy.url()], LONG_TTL).await;
    r.wait_subscribed().await;
    r.wait_until(|g| g.state().cluster().unwrap().replicas() == 2)
        .await;
    let c = TestClient::http1();
    r.cache_app(&c, 1).await;
    proxy.freeze.store(true, Ordering::SeqCst);
    let replica = r.gateways[1].state().cluster().unwrap();
    let started = Instant::now();
    while replica.is_subscribed() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a subscription silent for 5 s (25 heartbeats) still counts as up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Replica 1 cannot hear this write's invalidation.
    create_app(&r, &c, 0, "unheard").await;
    proxy.freeze.store(false, Ordering::SeqCst);
    r.wait_until(|g| g.state().cluster().unwrap().is_subscribed())
        .await;
    let res = r.list_apps(&c, 1).await;
    assert!(
        res.text().contains("unheard"),
        "replica 1 serves the list from before the write it missed: {}",
        status(&res)
    );
    r.stop().await;
}

/// What a replica cached while Redis was unreachable at start is dropped
/// when it first subscribes: writes on other replicas meanwhile were never
/// fanned out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_cached_before_the_first_subscription_is_dropped() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let r = Replicas::start_unchecked(&[url.clone(), url], LONG_TTL).await;
    let c = TestClient::http1();
    r.cache_app(&c, 1).await;
    create_app(&r, &c, 0, "before-redis").await;
    let Some(_redis) = Redis::start_on(port) else {
        return;
    };
    r.wait_subscribed().await;
    let res = r.list_apps(&c, 1).await;
    assert!(
        res.text().contains("before-redis"),
        "replica 1 serves the list from before a write made while Redis was down: {}",
        status(&res)
    );
    r.stop().await;
}

/// With Redis slow to answer, a burst of changes is fanned out in a round trip
/// or two, not one round trip per change: the last one reaches the other
/// replicas about as soon as the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_through_a_slow_redis_fans_out_at_once() {
    let Some(redis) = Redis::start() else { return };
    let proxy = RedisProxy::start(redis.port).await;
    let r = Replicas::start_unchecked(
        &[proxy.url(), redis.url()],
        &format!("timeout = \"2s\"\n{LONG_TTL}"),
    )
    .await;
    r.wait_subscribed().await;
    r.wait_until(|g| g.state().cluster().unwrap().replicas() == 2)
        .await;
    let c = TestClient::http1();
    r.cache_app(&c, 1).await;
    // Every command from replica 0 now waits 100 ms on its way to Redis.
    proxy.delay_ms.store(100, Ordering::SeqCst);
    let cache = r.gateways[0].cache();
    for i in 0..40 {
        cache.purge(&rungen_gateway::cache::PurgeScope {
            scope: Some("other".into()),
            path_prefix: Some(format!("/app/unrelated-{i}")),
        });
    }
    cache.purge(&rungen_gateway::cache::PurgeScope::default());
    let started = Instant::now();
    loop {
        let res = r.list_apps(&c, 1).await;
        if status(&res).contains("fwd=uri-miss") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the last of 41 changes took over 2 s to reach replica 1 (one round trip each?)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.stop().await;
}
