//! The Prometheus recorder queues every histogram sample until something
//! drains it. A gateway that nobody scrapes must still not grow with the
//! number of requests: the recorder's upkeep runs on its own every
//! `METRICS_UPKEEP_INTERVAL`. Proven by counting the live heap bytes of this
//! test process (gateway and client both live here) around a flood of
//! requests, with `/metrics` never rendered.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::Method;
use rungen_gateway::telemetry::METRICS_UPKEEP_INTERVAL;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes currently allocated by this process.
fn live() -> isize {
    let s = GLOBAL.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize + s.bytes_reallocated
}

/// `n` cache hits for `GET /app` on keep-alive connections.
async fn hits(h: &Harness, client: &TestClient, n: usize) {
    let (url, auth) = (h.url("/app"), bearer(TOKEN_RW));
    let client = client.clone();
    flood(n, move |_| {
        let (client, url, auth) = (client.clone(), url.clone(), auth.clone());
        async move {
            let r = client
                .send(Method::GET, &url, &[("authorization", &auth)], None)
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    })
    .await;
}

/// Live heap bytes once the recorder's upkeep has certainly run since now.
async fn live_after_upkeep() -> isize {
    tokio::time::sleep(METRICS_UPKEEP_INTERVAL + Duration::from_millis(1500)).await;
    live()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_samples_do_not_pile_up_without_scrapes() {
    // No quotas: every request of the flood is a cache hit.
    let h = Harness::start_full(
        "",
        "",
        "[rate_limit]\nenabled = false\n[cache.routes.\"/app\"]\nttl = \"1h\"\n",
        Arc::new(rungen_gateway::clock::SystemClock),
    )
    .await;
    let client = TestClient::http1();
    // Warm up: the cache entry, the client's connections, every lazily built
    // structure on the hit path, and the metric series.
    hits(&h, &client, 2_000).await;
    let before = live_after_upkeep().await;

    const N: usize = 30_000;
    hits(&h, &client, N).await;
    let queued = live() - before;
    // Drained samples are freed through crossbeam-epoch a run or two later:
    // wait for at most three runs until what remains is far below one byte
    // per request.
    let limit = (N / 2) as isize;
    let mut grown = queued;
    for _ in 0..3 {
        grown = live_after_upkeep().await - before;
        if grown < limit {
            break;
        }
    }
    eprintln!("live heap: {before} bytes; right after {N} hits {queued:+}; after upkeep {grown:+}");
    assert!(
        grown < limit,
        "{grown:+} bytes still held 3 upkeep runs after {N} requests (queued samples are not freed)"
    );
    // And the samples were recorded, not dropped: the latency histogram of
    // `GET /app` counts every request (the warm-up's first one was a miss).
    let text = rungen_gateway::telemetry::render();
    let count: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("rungen_gateway_request_duration_seconds_count{")
                && l.contains("route=\"/app\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(count as usize, N + 2_000, "{text}");
    h.stop().await;
}
