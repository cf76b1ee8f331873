//! The response cache end to end: the real gateway and the mock upstream on
//! 127.0.0.1, counting what reached the upstream. Time moves by hand
//! (`ManualClock`); the only waits are bounded polls for background work.
#![allow(clippy::unwrap_used, clippy::type_complexity)]

mod common;

use common::*;
use http::{Method, StatusCode};
use rungen_gateway::clock::ManualClock;
use rungen_gateway::mock_upstream::Faults;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

async fn start(sections: &str) -> (Harness, ManualClock) {
    let clock = ManualClock::new();
    let h = Harness::start_full("", "", sections, Arc::new(clock.clone())).await;
    (h, clock)
}

fn rw() -> String {
    bearer(TOKEN_RW)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn cache_status(r: &Reply) -> String {
    r.headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn concurrent_cold_requests_make_one_upstream_request() {
    let (h, _clock) = start("").await;
    h.mock.set_faults(Faults {
        latency_ms: 300,
        ..Faults::default()
    });
    let c = TestClient::http1();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let c = c.clone();
        let url = h.url("/app");
        let auth = rw();
        tasks.push(tokio::spawn(async move {
            c.get(&url, &[("authorization", &auth)]).await
        }));
    }
    let mut bodies = std::collections::HashSet::new();
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        bodies.insert(r.body.clone());
        statuses.push(cache_status(&r));
    }
    assert_eq!(
        h.upstream_count("GET /app"),
        1,
        "one upstream request for 100 callers"
    );
    assert_eq!(bodies.len(), 1, "every caller got the same answer");
    let stored = statuses
        .iter()
        .filter(|s| s.contains("stored") && !s.contains("collapsed"))
        .count();
    assert_eq!(stored, 1, "{statuses:?}");
    assert!(
        statuses.iter().any(|s| s.contains("collapsed")),
        "{statuses:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn reads_within_ttl_are_hits_and_expiry_refetches() {
    let (h, clock) = start("[cache.routes.\"/app\"]\nttl = \"5s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\n").await;
    let c = TestClient::http1();
    let auth = rw();
    let first = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert!(cache_status(&first).contains("fwd=uri-miss"));
    for _ in 0..20 {
        let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, first.body);
        assert_eq!(cache_status(&r), "rungen-gateway; hit");
    }
    assert_eq!(h.upstream_count("GET /app"), 1);
    clock.advance(Duration::from_secs(3));
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(r.headers["age"], "3");
    assert_eq!(h.upstream_count("GET /app"), 1);
    clock.advance(Duration::from_secs(3));
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert!(cache_status(&r).contains("fwd="), "{}", cache_status(&r));
    assert_eq!(
        h.upstream_count("GET /app"),
        2,
        "expired entry refetched once"
    );
    h.stop().await;
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    let get = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    let head = c
        .send(
            Method::HEAD,
            &h.url("/app"),
            &[("authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(
        head.headers["content-length"],
        get.body.len().to_string().as_str()
    );
    assert_eq!(head.headers["etag"], get.headers["etag"]);
    assert_eq!(h.upstream_count("GET /app"), 1);
    assert_eq!(h.upstream_count("HEAD /app"), 0);
    h.stop().await;
}

#[tokio::test]
async fn scopes_never_share_entries_and_clients_of_one_scope_do() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    // writer, default (personal) scope
    let personal = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    // writer, team scope by x-team-id
    let team = c
        .get(
            &h.url("/app"),
            &[("authorization", &auth), ("x-team-id", TEAM_ID)],
        )
        .await;
    assert_eq!(h.upstream_count("GET /app"), 2, "two scopes, two entries");
    assert_ne!(personal.body, team.body, "the scopes' data differ");
    // reader, whose default scope is acme: shares the writer's acme entry
    let reader = c.get(&h.url("/app"), &[("x-api-key", TOKEN_RO)]).await;
    assert_eq!(reader.body, team.body);
    assert_eq!(cache_status(&reader), "rungen-gateway; hit");
    // the writer's personal entry is never served to the reader's scope, nor the reverse
    let again = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(again.body, personal.body);
    assert_eq!(h.upstream_count("GET /app"), 2);
    h.stop().await;
}

/// A caller that goes away while its write is at the upstream does not take
/// the invalidation with it: the write may still commit, so what it would
/// change is dropped as for any write of unknown fate.
#[tokio::test]
async fn a_write_whose_caller_hangs_up_still_invalidates() {
    use tokio::io::AsyncWriteExt;
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert!(cache_status(&r).contains("hit"));
    h.mock.set_faults(Faults {
        latency_ms: 500,
        ..Faults::default()
    });
    let addr = h.url("").trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(addr.trim_end_matches('/'))
        .await
        .unwrap();
    let post = format!(
        "POST /app HTTP/1.1\r\nhost: gw\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    s.write_all(post.as_bytes()).await.unwrap();
    wait_for("the write at the upstream", || {
        h.upstream_count("POST /app") == 1
    })
    .await;
    drop(s); // before the upstream answers
    tokio::time::sleep(Duration::from_millis(700)).await;
    h.mock.set_faults(Faults::default());
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert!(
        cache_status(&r).contains("fwd=uri-miss"),
        "the list from before the write was served: {}",
        cache_status(&r)
    );
    assert_eq!(h.upstream_count("GET /app"), 2);
    h.stop().await;
}

/// A path spelled with percent-escapes of plain characters is the same
/// resource: the upstream is sent one spelling, the cache keeps one entry,
/// and a write to the resource drops it whichever spelling filled it.
#[tokio::test]
async fn one_resource_is_one_entry_whatever_its_spelling() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    let list = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    let id = list.json()["data"][0]["id"].as_str().unwrap().to_string();
    // Every character of the id escaped, the hex in lower case.
    let escaped: String = id.bytes().map(|b| format!("%{b:02x}")).collect();
    let r = c
        .get(
            &h.url(&format!("/app/{escaped}?v=1")),
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let sent = h.mock.requests().last().unwrap().clone();
    assert_eq!(sent.path_and_query, format!("/app/{id}?v=1"));
    let plain = h.url(&format!("/app/{id}?v=1"));
    let r = c.get(&plain, &[("authorization", &auth)]).await;
    assert!(cache_status(&r).contains("hit"), "{}", cache_status(&r));
    assert_eq!(h.upstream_count("GET /app/{id}"), 1);
    // A write through the plain spelling drops what the escaped one filled.
    let w = c
        .send(
            Method::PUT,
            &h.url(&format!("/app/{id}")),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(r#"{"name":"renamed"}"#),
        )
        .await;
    assert!(w.status.is_success(), "{}", w.status);
    let r = c
        .get(
            &h.url(&format!("/app/{escaped}?v=1")),
            &[("authorization", &auth)],
        )
        .await;
    assert!(
        cache_status(&r).contains("fwd=uri-miss"),
        "{}",
        cache_status(&r)
    );
    assert_eq!(h.upstream_count("GET /app/{id}"), 2);
    // A broken escape is the caller's error.
    let r = c.get(&h.url("/app/%zz"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.error_message().contains("percent"),
        "{}",
        r.error_message()
    );
    h.stop().await;
}

#[tokio::test]
async fn writes_invalidate_the_reads_they_change() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    let team = [("authorization", auth.as_str()), ("x-team-id", TEAM_ID)];
    let json = [
        ("authorization", auth.as_str()),
        ("x-team-id", TEAM_ID),
        ("content-type", "application/json"),
    ];
    let list = c.get(&h.url("/app"), &team).await;
    let app_id = list.json()["data"][0]["id"].as_str().unwrap().to_string();
    let app_path = format!("/app/{app_id}");
    let warm = |c: &TestClient| {
        let c = c.clone();
        let list_url = h.url("/app");
        let app_url = h.url(&app_path);
        let auth = auth.clone();
        async move {
            c.get(
                &list_url,
                &[("authorization", &auth), ("x-team-id", TEAM_ID)],
            )
            .await;
            c.get(
                &app_url,
                &[("authorization", &auth), ("x-team-id", TEAM_ID)],
            )
            .await;
        }
    };
    warm(&c).await;
    let counts = || {
        (
            h.upstream_count("GET /app"),
            h.upstream_count("GET /app/{id}"),
        )
    };
    assert_eq!(counts(), (1, 1));

    // POST /app -> the list only
    let r = c
        .send(
            Method::POST,
            &h.url("/app"),
            &json,
            Some(r#"{"name":"n","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://h/m"}}"#),
        )
        .await;
    assert!(r.status.is_success());
    assert!(
        cache_status(&r).contains("fwd=bypass"),
        "writes say they bypassed"
    );
    warm(&c).await;
    assert_eq!(counts(), (2, 1));
    let new_list = c.get(&h.url("/app"), &team).await;
    assert!(
        new_list.text().contains("\"name\":\"n\""),
        "the list shows the new app"
    );

    // PUT /app/{id} -> that app and the list
    let r = c
        .send(
            Method::PUT,
            &h.url(&app_path),
            &json,
            Some(r#"{"description":"changed"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    warm(&c).await;
    assert_eq!(counts(), (3, 2));
    assert!(
        c.get(&h.url(&app_path), &team)
            .await
            .text()
            .contains("changed")
    );

    // run_async -> that app and the list
    let r = c
        .send(
            Method::POST,
            &h.url(&format!("{app_path}/run_async")),
            &json,
            Some(r#"{"input":{"prompt":"p"}}"#),
        )
        .await;
    assert!(r.status.is_success());
    let job_id = r.json()["data"]["id"].as_str().unwrap().to_string();
    warm(&c).await;
    assert_eq!(counts(), (4, 3));

    // cancel -> that job, that app and the list
    let job_path = format!("{app_path}/job/{job_id}");
    c.get(&h.url(&job_path), &team).await;
    let jobs = || h.upstream_count("GET /app/{id}/job/{job_id}");
    assert_eq!(jobs(), 1);
    c.get(&h.url(&job_path), &team).await;
    assert_eq!(jobs(), 1, "the job status is cached for a second");
    let r = c.send(Method::PUT, &h.url(&job_path), &team, None).await;
    assert_eq!(r.status, StatusCode::OK);
    warm(&c).await;
    assert_eq!(counts(), (5, 4));
    let job = c.get(&h.url(&job_path), &team).await;
    assert_eq!(jobs(), 2);
    assert_eq!(job.json()["data"]["status"], "CANCELED");

    // DELETE /app/{id} -> that app, the list and its jobs
    let r = c.send(Method::DELETE, &h.url(&app_path), &team, None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let gone = c.get(&h.url(&app_path), &team).await;
    assert_eq!(
        gone.status,
        StatusCode::NOT_FOUND,
        "a deleted app is not served from cache"
    );
    let gone_job = c.get(&h.url(&job_path), &team).await;
    assert_eq!(gone_job.status, StatusCode::NOT_FOUND);
    assert_eq!(jobs(), 3);
    c.get(&h.url("/app"), &team).await;
    assert_eq!(counts().0, 6);

    // A failed write invalidates nothing.
    c.get(&h.url("/app"), &team).await;
    let before = counts();
    let r = c
        .send(Method::POST, &h.url("/app"), &json, Some("not json"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    c.get(&h.url("/app"), &team).await;
    assert_eq!(counts(), before);
    h.stop().await;
}

#[tokio::test]
async fn upstream_directives_no_store_private_set_cookie_and_vary() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    for headers in [
        vec![("cache-control", "no-store")],
        vec![("cache-control", "private, max-age=60")],
        vec![("set-cookie", "session=abc")],
        vec![("vary", "*")],
    ] {
        h.mock.reset_stats();
        h.mock.set_faults(Faults {
            extra_response_headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Faults::default()
        });
        for _ in 0..3 {
            let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(
                cache_status(&r).contains("fwd=uri-miss"),
                "{headers:?}: {}",
                cache_status(&r)
            );
            assert!(!cache_status(&r).contains("stored"));
            // A cookie the upstream issued to the holder of the scope's key
            // is nobody's to keep.
            assert!(r.headers.get("set-cookie").is_none(), "{headers:?}");
        }
        assert_eq!(
            h.upstream_count("GET /app"),
            3,
            "{headers:?} must not be stored"
        );
    }

    // Vary: accept -> one entry per Accept value.
    h.mock.reset_stats();
    h.mock.set_faults(Faults {
        extra_response_headers: vec![("vary".into(), "Accept".into())],
        ..Faults::default()
    });
    let get = |accept: &'static str| {
        let c = c.clone();
        let url = h.url("/app");
        let auth = auth.clone();
        async move {
            c.get(
                &url,
                &[
                    ("authorization", &auth),
                    ("accept", accept),
                    ("x-team-id", TEAM_ID),
                ],
            )
            .await
        }
    };
    get("application/json").await;
    get("application/json").await;
    assert_eq!(h.upstream_count("GET /app"), 1);
    get("text/plain").await;
    assert_eq!(
        h.upstream_count("GET /app"),
        2,
        "another variant is another entry"
    );
    get("text/plain").await;
    get("application/json").await;
    assert_eq!(h.upstream_count("GET /app"), 2, "both variants are stored");
    h.stop().await;
}

#[tokio::test]
async fn upstream_max_age_shortens_the_ttl() {
    let (h, clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    h.mock.set_faults(Faults {
        extra_response_headers: vec![(
            "cache-control".into(),
            "max-age=1, stale-while-revalidate=0, stale-if-error=0".into(),
        )],
        ..Faults::default()
    });
    c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(h.upstream_count("GET /app"), 1);
    clock.advance(Duration::from_secs(2));
    c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(
        h.upstream_count("GET /app"),
        2,
        "max-age=1 beat the route's 5 s"
    );
    h.stop().await;
}

#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let (h, clock) = start("").await; // /app: ttl 5s, swr 5s
    let c = TestClient::http1();
    let auth = rw();
    let first = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    clock.advance(Duration::from_secs(6));
    h.mock.set_faults(Faults {
        latency_ms: 200,
        ..Faults::default()
    });
    for _ in 0..5 {
        let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
        assert_eq!(r.body, first.body);
        assert_eq!(
            cache_status(&r),
            "rungen-gateway; hit; detail=stale-while-revalidate"
        );
        assert_eq!(r.headers["age"], "6");
    }
    wait_for("the background refresh", || {
        h.upstream_count("GET /app") == 2
    })
    .await;
    // Refreshed: fresh again, and only one refresh went upstream.
    let mut fresh = false;
    for _ in 0..100 {
        let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
        if cache_status(&r) == "rungen-gateway; hit" {
            fresh = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fresh);
    assert_eq!(h.upstream_count("GET /app"), 2);
    h.stop().await;
}

/// A background refresh whose answer cannot be stored still replaces the
/// stale entry: an app deleted at the upstream behind the gateway's back is
/// a 404 from the first caller after the refresh, not a stale 200 for the
/// rest of the window (with a refresh per caller).
#[tokio::test]
async fn a_refresh_that_is_not_stored_ends_the_stale_entry() {
    let (h, clock) = start("").await; // /app/{id}: ttl 5 s, swr 5 s, no negative caching
    let c = TestClient::http1();
    let auth = rw();
    let list = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    let id = list.json()["data"][0]["id"].as_str().unwrap().to_string();
    let app = h.url(&format!("/app/{id}"));
    let get = async || c.get(&app, &[("authorization", &auth)]).await;
    assert_eq!(get().await.status, StatusCode::OK);
    // Deleted at the upstream directly (another tool, the RunGen dashboard).
    let d = TestClient::http1()
        .send(
            Method::DELETE,
            &format!("{}/app/{id}", h.mock.base_url()),
            &[("x-api-key", UPSTREAM_KEY)],
            None,
        )
        .await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    clock.advance(Duration::from_secs(6));
    let stale = get().await;
    assert_eq!(stale.status, StatusCode::OK);
    assert!(cache_status(&stale).contains("stale-while-revalidate"));
    wait_for("the background refresh", || {
        h.upstream_count("GET /app/{id}") == 2
    })
    .await;
    // The refresh's 404 is not stored (no negative caching): the stale 200
    // is gone, so this read goes upstream and gets the 404.
    let mut gone = get().await;
    for _ in 0..50 {
        if gone.status == StatusCode::NOT_FOUND {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        gone = get().await;
    }
    assert_eq!(
        gone.status,
        StatusCode::NOT_FOUND,
        "{}",
        cache_status(&gone)
    );
    assert_eq!(h.upstream_count("GET /app/{id}"), 3);
    h.stop().await;
}

#[tokio::test]
async fn stale_if_error_covers_a_failing_upstream_within_its_window() {
    let (h, clock) = start("[cache.routes.\"/app\"]\nttl = \"5s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"60s\"\n").await;
    let c = TestClient::http1();
    let auth = rw();
    let first = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    clock.advance(Duration::from_secs(10));
    for (faults, fwd) in [
        (
            Faults {
                fail_status: Some(503),
                ..Faults::default()
            },
            "fwd-status=503",
        ),
        (
            Faults {
                fail_status: Some(500),
                ..Faults::default()
            },
            "fwd-status=500",
        ),
        (
            Faults {
                drop_connections: true,
                ..Faults::default()
            },
            "detail=stale-if-error",
        ),
        (
            Faults {
                latency_ms: 2500,
                ..Faults::default()
            },
            "detail=stale-if-error",
        ),
    ] {
        h.mock.set_faults(faults);
        let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, first.body);
        let cs = cache_status(&r);
        assert!(cs.contains("fwd=stale") && cs.contains(fwd), "{cs}");
    }
    // Past the window, the failure is the answer; and errors were never stored.
    clock.advance(Duration::from_secs(60));
    h.mock.set_faults(Faults {
        fail_status: Some(503),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // Five failures in a row opened the scope's circuit: it fails fast now...
    h.mock.set_faults(Faults::default());
    let before = h.upstream_count("GET /app");
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.error_message().contains("failing"),
        "{}",
        r.error_message()
    );
    assert_eq!(
        h.upstream_count("GET /app"),
        before,
        "an open circuit sends nothing"
    );
    // ...until the cooldown, when one probe goes through and closes it.
    clock.advance(Duration::from_secs(11));
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(cache_status(&r).contains("stored"));
    h.stop().await;
}

#[tokio::test]
async fn errors_are_not_cached_and_do_not_poison_followers() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    h.mock.set_faults(Faults {
        fail_status: Some(500),
        fail_count: Some(1),
        latency_ms: 200,
        ..Faults::default()
    });
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = c.clone();
        let url = h.url("/app");
        let auth = auth.clone();
        tasks.push(tokio::spawn(async move {
            c.get(&url, &[("authorization", &auth)]).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(
        h.upstream_count("GET /app"),
        1,
        "the failure was shared, not multiplied"
    );
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::OK, "the error was not stored");
    assert_eq!(h.upstream_count("GET /app"), 2);
    h.stop().await;
}

#[tokio::test]
async fn upstream_429_backs_off_the_scope_refreshes() {
    let (h, clock) = start("[cache.routes.\"/app\"]\nttl = \"5s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"120s\"\n").await;
    let c = TestClient::http1();
    let auth = rw();
    c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    clock.advance(Duration::from_secs(10));
    h.mock.set_faults(Faults {
        fail_status: Some(429),
        retry_after_secs: Some(30),
        ..Faults::default()
    });
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        cache_status(&r).contains("fwd-status=429"),
        "{}",
        cache_status(&r)
    );
    assert_eq!(h.upstream_count("GET /app"), 2);
    // Within Retry-After: served stale without asking upstream.
    for _ in 0..5 {
        let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            cache_status(&r),
            "rungen-gateway; hit; detail=upstream-backoff"
        );
    }
    assert_eq!(h.upstream_count("GET /app"), 2);
    // After it: upstream again.
    clock.advance(Duration::from_secs(31));
    h.mock.set_faults(Faults::default());
    let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert!(cache_status(&r).contains("stored"), "{}", cache_status(&r));
    assert_eq!(h.upstream_count("GET /app"), 3);
    h.stop().await;
}

#[tokio::test]
async fn if_none_match_gets_304_from_the_cache() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    let first = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    let etag = first.headers["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"'), "a strong ETag: {etag}");
    let r = c
        .get(
            &h.url("/app"),
            &[("authorization", &auth), ("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.body.is_empty());
    assert_eq!(r.headers["etag"], etag.as_str());
    let r = c
        .get(
            &h.url("/app"),
            &[("authorization", &auth), ("if-none-match", "\"other\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(h.upstream_count("GET /app"), 1);
    // A cold key with a matching If-None-Match: one fill, then 304.
    let r = c
        .get(
            &h.url("/app"),
            &[
                ("authorization", &auth),
                ("x-team-id", TEAM_ID),
                ("if-none-match", "*"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(
        h.mock
            .requests()
            .iter()
            .all(|r| r.header("if-none-match").is_none()),
        "the caller's validators are not forwarded"
    );
    h.stop().await;
}

#[tokio::test]
async fn upstream_validators_are_used_to_revalidate() {
    let (h, clock) =
        start("[cache.routes.\"/app\"]\nttl = \"5s\"\nstale_while_revalidate = \"0s\"\n").await;
    let c = TestClient::http1();
    let auth = rw();
    h.mock.set_faults(Faults {
        extra_response_headers: vec![("etag".into(), "\"upstream-v1\"".into())],
        ..Faults::default()
    });
    let first = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    assert_eq!(first.headers["etag"], "\"upstream-v1\"");
    clock.advance(Duration::from_secs(6));
    c.get(&h.url("/app"), &[("authorization", &auth)]).await;
    let seen = h.mock.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("if-none-match"), Some("\"upstream-v1\""));
    h.stop().await;
}

/// A caller's own `Cache-Control`: `only-if-cached` is answered from the
/// cache or with 504, never upstream; `no-store` keeps its answer out of the
/// cache (it is still served, and may be served from what is stored).
#[tokio::test]
async fn request_only_if_cached_and_no_store_are_honoured() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    let ask = async |cc: Option<&str>| {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(cc.map(|v| ("cache-control", v)));
        c.get(&h.url("/app"), &headers).await
    };
    let r = ask(Some("only-if-cached")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        r.error_message().contains("only-if-cached"),
        "{}",
        r.error_message()
    );
    assert_eq!(h.upstream_count("GET /app"), 0, "nothing went upstream");
    let r = ask(Some("no-store")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        cache_status(&r).contains("detail=request-no-store"),
        "{}",
        cache_status(&r)
    );
    let r = ask(Some("only-if-cached")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "nothing was stored");
    let r = ask(None).await;
    assert!(cache_status(&r).contains("stored"), "{}", cache_status(&r));
    for cc in ["only-if-cached", "no-store"] {
        let r = ask(Some(cc)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            cache_status(&r).contains("hit"),
            "{cc}: {}",
            cache_status(&r)
        );
    }
    assert_eq!(h.upstream_count("GET /app"), 2);
    h.stop().await;
}

#[tokio::test]
async fn client_no_cache_is_ignored_unless_the_route_allows_it() {
    let (h, _clock) = start("[cache.routes.\"/app/{id}\"]\nallow_client_revalidate = true\n").await;
    let c = TestClient::http1();
    let auth = rw();
    let no_cache = [
        ("authorization", auth.as_str()),
        ("cache-control", "no-cache"),
    ];
    c.get(&h.url("/app"), &no_cache).await;
    let r = c.get(&h.url("/app"), &no_cache).await;
    assert_eq!(
        cache_status(&r),
        "rungen-gateway; hit",
        "a client cannot force /app upstream"
    );
    assert_eq!(h.upstream_count("GET /app"), 1);
    let id = r.json()["data"][0]["id"].as_str().unwrap().to_string();
    c.get(&h.url(&format!("/app/{id}")), &no_cache).await;
    let r = c.get(&h.url(&format!("/app/{id}")), &no_cache).await;
    assert!(
        cache_status(&r).contains("fwd=request"),
        "{}",
        cache_status(&r)
    );
    assert_eq!(h.upstream_count("GET /app/{id}"), 2);
    h.stop().await;
}

#[tokio::test]
async fn terminal_job_ttl_ends_before_the_result_urls_expire() {
    // A long terminal TTL: only the signed URLs' expiry (7 days) bounds it.
    let (h, clock) = start("[cache.routes.\"/app/{id}/job/{job_id}\"]\nterminal_ttl = \"30d\"\nurl_expiry_margin = \"10m\"\nstale_if_error = \"0s\"\n").await;
    let c = TestClient::http1();
    let auth = rw();
    let team = [("authorization", auth.as_str()), ("x-team-id", TEAM_ID)];
    let list = c.get(&h.url("/app"), &team).await;
    let app_id = list.json()["data"][0]["id"].as_str().unwrap().to_string();
    let r = c
        .send(
            Method::POST,
            &h.url(&format!("/app/{app_id}/run_async")),
            &[
                ("authorization", &auth),
                ("x-team-id", TEAM_ID),
                ("content-type", "application/json"),
            ],
            Some(r#"{"input":{"prompt":"p"}}"#),
        )
        .await;
    let job_id = r.json()["data"]["id"].as_str().unwrap().to_string();
    let job = h.url(&format!("/app/{app_id}/job/{job_id}"));
    let jobs = || h.upstream_count("GET /app/{id}/job/{job_id}");
    // Poll until COMPLETED (pending answers live 1 s).
    let mut done = None;
    for _ in 0..10 {
        let r = c.get(&job, &team).await;
        if r.json()["data"]["status"] == "COMPLETED" {
            done = Some(r);
            break;
        }
        clock.advance(Duration::from_secs(2));
    }
    let done = done.expect("the mock job completes");
    assert!(done.text().contains("X-Amz-Expires=604800"));
    let polls = jobs();
    // 7 days minus the 10 minute margin, minus a minute of slack: still cached.
    clock.advance(Duration::from_secs(7 * 86_400 - 600 - 60));
    let r = c.get(&job, &team).await;
    assert_eq!(cache_status(&r), "rungen-gateway; hit");
    assert_eq!(jobs(), polls);
    // Two minutes later the URLs are within the margin: never served from cache.
    clock.advance(Duration::from_secs(120));
    let r = c.get(&job, &team).await;
    assert_ne!(cache_status(&r), "rungen-gateway; hit");
    assert_eq!(jobs(), polls + 1);
    h.stop().await;
}

#[tokio::test]
async fn a_response_over_the_entry_limit_streams_through_intact() {
    let (h, _clock) = start("[cache]\nmax_bytes = 1048576\nmax_entry_bytes = 8192\n").await;
    let c = TestClient::http1();
    let auth = rw();
    h.mock.set_faults(Faults {
        large_body_bytes: Some(200_000),
        ..Faults::default()
    });
    for _ in 0..2 {
        let r = c.get(&h.url("/app"), &[("authorization", &auth)]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.len() >= 200_000);
        let v = r.json();
        assert!(v["data"].is_array(), "the JSON arrived whole");
        assert!(
            cache_status(&r).contains("detail=too-large"),
            "{}",
            cache_status(&r)
        );
    }
    assert_eq!(h.upstream_count("GET /app"), 2);
    h.stop().await;
}

#[tokio::test]
async fn negative_caching_of_404_is_configurable() {
    let (h, clock) = start("[cache.routes.\"/app/{id}\"]\nnegative_ttl = \"2s\"\n").await;
    let c = TestClient::http1();
    let auth = rw();
    for _ in 0..3 {
        let r = c
            .get(&h.url("/app/no-such-app"), &[("authorization", &auth)])
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(h.upstream_count("GET /app/{id}"), 1);
    // Preconditions apply only to a 2xx (RFC 9110 13.2.1): a cached 404 has
    // no ETag to match, and `If-None-Match: *` (or a tag the caller held from
    // before the app was deleted) gets the 404, never "not modified".
    for inm in ["*", "\"85159d3f1a57a8cf774aa2dfd18e9405\""] {
        let r = c
            .get(
                &h.url("/app/no-such-app"),
                &[("authorization", &auth), ("if-none-match", inm)],
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "If-None-Match: {inm}");
        assert!(cache_status(&r).contains("hit"), "{}", cache_status(&r));
        assert_eq!(r.headers.get("etag"), None);
    }
    assert_eq!(h.upstream_count("GET /app/{id}"), 1);
    clock.advance(Duration::from_secs(3));
    c.get(&h.url("/app/no-such-app"), &[("authorization", &auth)])
        .await;
    assert_eq!(h.upstream_count("GET /app/{id}"), 2);
    h.stop().await;
}

#[tokio::test]
async fn purge_drops_everything_a_scope_or_a_prefix() {
    use rungen_gateway::cache::PurgeScope;
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    let personal = [("authorization", auth.as_str())];
    let team = [("authorization", auth.as_str()), ("x-team-id", TEAM_ID)];
    let warm = || async {
        c.get(&h.url("/app"), &personal).await;
        c.get(&h.url("/app"), &team).await;
    };
    warm().await;
    assert_eq!(h.upstream_count("GET /app"), 2);
    h.gateway().cache().purge(&PurgeScope {
        scope: Some("acme".into()),
        path_prefix: None,
    });
    warm().await;
    assert_eq!(
        h.upstream_count("GET /app"),
        3,
        "only acme's entry was dropped"
    );
    h.gateway().cache().purge(&PurgeScope {
        scope: Some("personal".into()),
        path_prefix: Some("/app".into()),
    });
    warm().await;
    assert_eq!(h.upstream_count("GET /app"), 4);
    h.gateway().cache().purge(&PurgeScope::default());
    warm().await;
    assert_eq!(h.upstream_count("GET /app"), 6);
    h.stop().await;
}

/// A read with a body (HTTP/1.1 Content-Length, HTTP/2 DATA frames) is
/// neither answered from the store nor stored: the body could change what the
/// upstream answers. A bodiless read after it is still a miss, then a hit.
#[tokio::test]
async fn reads_with_a_body_bypass_the_cache() {
    let (h, _clock) = start("").await;
    let auth = rw();
    for (c, proto) in [(TestClient::http1(), "h1"), (TestClient::h2c(), "h2c")] {
        let with_body = c
            .send(
                Method::GET,
                &h.url("/app?via=body"),
                &[("authorization", &auth)],
                Some("{\"filter\":1}"),
            )
            .await;
        assert_eq!(with_body.status, StatusCode::OK, "{proto}");
        assert!(
            cache_status(&with_body).contains("detail=request-body"),
            "{proto}: {}",
            cache_status(&with_body)
        );
    }
    assert_eq!(h.upstream_count("GET /app"), 2, "both went upstream");
    let c = TestClient::http1();
    let first = c
        .get(&h.url("/app?via=body"), &[("authorization", &auth)])
        .await;
    assert!(
        cache_status(&first).contains("fwd=uri-miss"),
        "nothing was stored from the reads with a body: {}",
        cache_status(&first)
    );
    let second = c
        .get(&h.url("/app?via=body"), &[("authorization", &auth)])
        .await;
    assert_eq!(cache_status(&second), "rungen-gateway; hit");
    assert_eq!(h.upstream_count("GET /app"), 3);
    h.stop().await;
}

/// A hand-written upstream on 127.0.0.1 answering every request with
/// `answer`; returns its base URL.
async fn upstream_fn<F, Fut>(answer: F) -> String
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<http_body_util::Full<bytes::Bytes>>>
        + Send
        + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            let svc = hyper::service::service_fn(move |req| {
                let answered = answer(req);
                async move { Ok::<_, std::convert::Infallible>(answered.await) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// A gateway in front of `base` (the common test config, `upstream_extra`
/// in `[upstream]`, `sections` after it), on `clock`.
async fn gateway_before(
    base: &str,
    upstream_extra: &str,
    sections: &str,
    clock: rungen_gateway::clock::SharedClock,
) -> rungen_gateway::server::Running {
    let config = rungen_gateway::config::Config::from_toml(
        std::path::Path::new("t.toml"),
        &config_toml_with(base, "", upstream_extra, sections),
    )
    .unwrap();
    rungen_gateway::server::start_with(config, clock)
        .await
        .unwrap()
}

/// After one 304, an upstream that sends only `Last-Modified` is still
/// revalidated with `If-Modified-Since` alone: the tag the gateway computed
/// from the body is never sent as `If-None-Match` (such an upstream would let
/// it decide, match nothing, and answer in full every time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_modified_upstream_is_never_asked_about_a_computed_etag() {
    const LM: &str = "Wed, 01 Jan 2025 00:00:00 GMT";
    let seen: Arc<std::sync::Mutex<Vec<http::HeaderMap>>> = Arc::default();
    let s2 = seen.clone();
    let base = upstream_fn(move |req| {
        let seen = s2.clone();
        async move {
            seen.lock().unwrap().push(req.headers().clone());
            let res = http::Response::builder().header("last-modified", LM);
            if !req.headers().contains_key("if-none-match")
                && req
                    .headers()
                    .get("if-modified-since")
                    .is_some_and(|v| v == LM)
            {
                return res
                    .status(304)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
            }
            res.header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"data":{"id":"lm"}}"#,
                )))
                .unwrap()
        }
    })
    .await;
    let clock = ManualClock::new();
    let g = gateway_before(
        &base,
        "",
        "[cache.routes.\"/app/{id}\"]\nttl = \"5s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\n",
        Arc::new(clock.clone()),
    )
    .await;
    let url = format!("http://{}/app/lm", g.local_addr());
    let c = TestClient::http1();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = c.get(&url, &[("authorization", &rw())]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.headers.contains_key("etag"), "the computed tag is served");
        statuses.push(cache_status(&r));
        clock.advance(Duration::from_secs(6));
    }
    g.stop().await;
    let seen = seen.lock().unwrap().clone();
    let asked: Vec<_> = seen
        .iter()
        .map(|h| {
            (
                h.contains_key("if-none-match"),
                h.contains_key("if-modified-since"),
            )
        })
        .collect();
    assert_eq!(
        asked,
        [(false, false), (false, true), (false, true)],
        "{statuses:?}"
    );
    assert!(statuses[2].contains("fwd-status=304"), "{statuses:?}");
}

/// An upstream whose `GET /app/a1` reads a version when the request arrives
/// and answers 800 ms later, and whose `PUT /app/a1` bumps the version at
/// once; `GET /app/b1` answers `max-age=1` with an ETag, and a `private`
/// 304 to a conditional request.
async fn versioned_upstream(version: Arc<AtomicU64>) -> String {
    upstream_fn(move |req| {
        let version = version.clone();
        async move {
            let res = http::Response::builder();
            let (res, body) = match (req.method(), req.uri().path()) {
                (&Method::GET, "/app/a1") => {
                    let v = version.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    (res, format!("{{\"data\":{{\"id\":\"a1\",\"v\":{v}}}}}"))
                }
                (&Method::PUT, "/app/a1") => {
                    let v = version.fetch_add(1, Ordering::SeqCst) + 1;
                    (res, format!("{{\"data\":{{\"id\":\"a1\",\"v\":{v}}}}}"))
                }
                (&Method::GET, "/app/b1") if req.headers().contains_key("if-none-match") => (
                    res.status(304)
                        .header("etag", "\"b1\"")
                        .header("cache-control", "private"),
                    String::new(),
                ),
                (&Method::GET, "/app/b1") => (
                    res.header("etag", "\"b1\"")
                        .header("cache-control", "max-age=1"),
                    r#"{"data":{"id":"b1"}}"#.to_string(),
                ),
                _ => (res.status(404), r#"{"error":"not found"}"#.to_string()),
            };
            let res = if body.is_empty() {
                res
            } else {
                res.header("content-type", "application/json")
            };
            res.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap()
        }
    })
    .await
}

/// A write drops only what it changes, also from fetches in the air: a read
/// of another key (another scope, another app) in flight during the write is
/// still joined by later readers and still stored; a read of a key the write
/// changed is not joined (read-your-writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_leaves_fetches_of_other_keys_joinable_and_storable() {
    // GETs of the personal scope (no x-team-id upstream), by path.
    let gets: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let seen = gets.clone();
    let base = upstream_fn(move |req| {
        let seen = seen.clone();
        async move {
            if req.method() == Method::GET {
                if !req.headers().contains_key("x-team-id") {
                    seen.lock().unwrap().push(req.uri().path().to_string());
                }
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
            http::Response::builder()
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"data":{"id":"x1"}}"#,
                )))
                .unwrap()
        }
    })
    .await;
    let g = gateway_before(&base, "", "", Arc::new(rungen_gateway::clock::SystemClock)).await;
    let url = |p: &str| format!("http://{}{}", g.local_addr(), p);
    let c = TestClient::http1();
    let read = |path: &str| {
        let (c, u, a) = (c.clone(), url(path), rw());
        tokio::spawn(async move { c.get(&u, &[("authorization", &a)]).await })
    };
    let write = async |path: &str, team: Option<&str>| {
        let mut headers = vec![
            ("authorization", rw()),
            ("content-type", "application/json".to_string()),
        ];
        headers.extend(team.map(|t| ("x-team-id", t.to_string())));
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let r = c.send(Method::PUT, &url(path), &headers, Some("{}")).await;
        assert_eq!(r.status, StatusCode::OK);
    };
    let (list, app) = (read("/app"), read("/app/x1"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    write("/app/a1", Some(TEAM_ID)).await; // another scope
    write("/app/y1", None).await; // this scope, another app: changes the list
    let (list2, app2) = (read("/app"), read("/app/x1"));
    let (list, app) = (list.await.unwrap(), app.await.unwrap());
    let (list2, app2) = (list2.await.unwrap(), app2.await.unwrap());
    let app3 = read("/app/x1").await.unwrap();
    g.stop().await;
    assert!(
        cache_status(&app).contains("stored"),
        "{}",
        cache_status(&app)
    );
    assert!(
        cache_status(&app2).contains("collapsed"),
        "{}",
        cache_status(&app2)
    );
    assert!(
        cache_status(&app3).contains("hit"),
        "{}",
        cache_status(&app3)
    );
    assert!(
        !cache_status(&list2).contains("collapsed"),
        "the list changed after its fetch began: {}",
        cache_status(&list2)
    );
    assert!(
        cache_status(&list).contains("invalidated"),
        "{}",
        cache_status(&list)
    );
    let mut gets = gets.lock().unwrap().clone();
    gets.sort();
    assert_eq!(gets, ["/app", "/app", "/app/x1"]);
}

/// Read-your-writes: a read that starts after a write's 200 does not join a
/// fetch of the same key that started before the write (and would answer
/// with the pre-write body); it fetches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_write_does_not_join_a_fetch_from_before_it() {
    let version = Arc::new(AtomicU64::new(1));
    let base = versioned_upstream(version.clone()).await;
    let g = gateway_before(&base, "", "", Arc::new(rungen_gateway::clock::SystemClock)).await;
    let url = format!("http://{}/app/a1", g.local_addr());
    let auth = bearer(TOKEN_RW);
    let c = TestClient::http1();
    // A poller's read is in the air (its fetch saw version 1).
    let poller = {
        let (c, url, auth) = (c.clone(), url.clone(), auth.clone());
        tokio::spawn(async move { c.get(&url, &[("authorization", &auth)]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let w = c
        .send(
            Method::PUT,
            &url,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some("{}"),
        )
        .await;
    assert_eq!(w.status, StatusCode::OK);
    assert_eq!(version.load(Ordering::SeqCst), 2);
    // The writer reads its write.
    let r = c.get(&url, &[("authorization", &auth)]).await;
    let polled = poller.await.unwrap();
    g.stop().await;
    assert_eq!(
        polled.json()["data"]["v"],
        1,
        "the poller's fetch began before the write"
    );
    assert_eq!(
        r.json()["data"]["v"],
        2,
        "read after a write got the pre-write body (cache-status: {:?})",
        r.headers.get("cache-status")
    );
}

/// A caller that sent no validators never gets a 304: when the upstream's
/// 304 to the gateway's own revalidation may not be stored (here `private`),
/// the stale body is still the answer, served but not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconditional_get_never_gets_a_304() {
    let base = versioned_upstream(Arc::new(AtomicU64::new(1))).await;
    let clock = ManualClock::new();
    let g = gateway_before(&base, "", "", Arc::new(clock.clone())).await;
    let url = format!("http://{}/app/b1", g.local_addr());
    let auth = bearer(TOKEN_RW);
    let c = TestClient::http1();
    let first = c.get(&url, &[("authorization", &auth)]).await;
    assert_eq!(first.status, StatusCode::OK);
    // Long past ttl, stale-while-revalidate and stale-if-error.
    clock.advance(Duration::from_secs(3600));
    let again = c.get(&url, &[("authorization", &auth)]).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "an unconditional GET was answered {} (cache-status: {:?})",
        again.status,
        again.headers.get("cache-status")
    );
    assert_eq!(again.body, first.body);
    // The 304's headers, merged over the stale entry's.
    assert_eq!(again.headers["cache-control"], "private");
    // Not kept: the next read has no validators to send and gets the whole
    // answer (not a 304, not the entry the private answer replaced).
    let third = c.get(&url, &[("authorization", &auth)]).await;
    assert_eq!(third.status, StatusCode::OK);
    assert_eq!(third.body, first.body);
    assert!(
        cache_status(&third).contains("fwd=uri-miss"),
        "{}",
        cache_status(&third)
    );
    g.stop().await;
}

/// An upstream whose `GET /app` answers 400 ms late with a body naming the
/// request's `Accept-Language`, `Vary: Accept-Language` and (unless `store`)
/// `Cache-Control: no-store`; counts the requests it gets.
async fn language_upstream(hits: Arc<AtomicU64>, store: bool) -> String {
    upstream_fn(move |req| {
        hits.fetch_add(1, Ordering::SeqCst);
        let lang = req
            .headers()
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            http::Response::builder()
                .header("content-type", "application/json")
                .header("vary", "Accept-Language")
                .header(
                    "cache-control",
                    if store { "max-age=60" } else { "no-store" },
                )
                .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                    "{{\"data\":[],\"lang\":\"{lang}\"}}"
                ))))
                .unwrap()
        }
    })
    .await
}

/// Concurrent reads are coalesced before the gateway can know the answer
/// varies; when that answer is not stored (so the Vary index never learns
/// it varies), a collapsed caller whose varying header differs from the
/// leader's fetches its own instead of getting the leader's variant. Callers
/// that agree with the leader still share its fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collapsed_callers_never_get_an_unstored_answer_of_another_variant() {
    collapsed_callers_get_their_own_variant(false).await;
}

/// The same when the answer is stored: on a cold key the Vary index does not
/// know yet that the upstream varies, so every caller joins the first fetch;
/// those whose headers agree with the leader's share it (a cold storm on a
/// varying resource is still one upstream request), the others fetch alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_storm_on_a_varying_resource_is_coalesced_per_variant() {
    collapsed_callers_get_their_own_variant(true).await;
}

async fn collapsed_callers_get_their_own_variant(store: bool) {
    let hits = Arc::new(AtomicU64::new(0));
    let base = language_upstream(hits.clone(), store).await;
    let g = gateway_before(
        &base,
        "retries = 0",
        "",
        Arc::new(rungen_gateway::clock::SystemClock),
    )
    .await;
    let url = format!("http://{}/app", g.local_addr());
    let c = TestClient::http1();
    let ask = |lang: &'static str| {
        let (c, url, auth) = (c.clone(), url.clone(), rw());
        tokio::spawn(async move {
            c.get(&url, &[("authorization", &auth), ("accept-language", lang)])
                .await
        })
    };
    let de = ask("de");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fr = ask("fr");
    let others: Vec<_> = (0..10).map(|_| ask("de")).collect();
    let (de, fr) = (de.await.unwrap(), fr.await.unwrap());
    let mut others_answers = Vec::new();
    for o in others {
        others_answers.push(o.await.unwrap());
    }
    g.stop().await;
    assert_eq!(de.json()["lang"], "de");
    assert_eq!(
        fr.json()["lang"],
        "fr",
        "the French caller got another variant ({})",
        cache_status(&fr)
    );
    for de2 in &others_answers {
        assert_eq!(de2.json()["lang"], "de");
        assert!(
            cache_status(de2).contains("collapsed"),
            "{}",
            cache_status(de2)
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2, "de shared, fr alone");
}

/// A cache fill asks for the whole, unencoded representation: its answer is
/// shared with collapsed callers and stored (and a job's body read), so a
/// caller's `Range` is not sent and its `Accept-Encoding` becomes `identity`.
#[tokio::test]
async fn a_fill_asks_for_the_whole_unencoded_representation() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let r = c
        .get(
            &h.url("/app"),
            &[
                ("authorization", &rw()),
                ("range", "bytes=0-9"),
                ("accept-encoding", "gzip, br"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let sent = h.mock.requests().last().unwrap().clone();
    assert_eq!(sent.path_and_query, "/app");
    assert_eq!(sent.header("range"), None);
    assert_eq!(sent.header("accept-encoding"), Some("identity"));
    // One stored body serves callers of any Accept-Encoding, even when the
    // upstream says it varies on it.
    h.mock.set_faults(Faults {
        extra_response_headers: vec![("vary".into(), "Accept-Encoding".into())],
        ..Faults::default()
    });
    c.get(
        &h.url("/app?page=2"),
        &[("authorization", &rw()), ("accept-encoding", "gzip")],
    )
    .await;
    let r = c
        .get(&h.url("/app?page=2"), &[("authorization", &rw())])
        .await;
    assert!(cache_status(&r).contains("hit"), "{}", cache_status(&r));
    h.stop().await;
}

/// A write whose fate is unknown (no answer in time, a 5xx) drops what it
/// would change, as a successful one does: the upstream may have committed
/// it. A write the upstream refused (4xx) leaves the cache as it is.
#[tokio::test]
async fn a_write_of_unknown_fate_drops_what_it_would_change() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    let hdr = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let create = r#"{"name":"maybe","configuration":{"gpu_tier":"BASIC"},"workflow":{"model_url":"https://h/m"}}"#;
    let cached = async || {
        let r = c.get(&h.url("/app"), &hdr[..1]).await;
        cache_status(&r) == "rungen-gateway; hit"
    };
    let faults = [
        // request_timeout is 2 s in the test config: 504.
        Faults {
            latency_ms: 2500,
            ..Faults::default()
        },
        Faults {
            fail_status: Some(503),
            ..Faults::default()
        },
    ];
    for fault in faults {
        c.get(&h.url("/app"), &hdr[..1]).await;
        assert!(cached().await);
        h.mock.set_faults(fault.clone());
        let w = c
            .send(Method::POST, &h.url("/app"), &hdr, Some(create))
            .await;
        assert!(w.status.is_server_error(), "{fault:?}: {}", w.status);
        h.mock.set_faults(Faults::default());
        assert!(
            !cached().await,
            "{fault:?}: the list survived a write that may have happened"
        );
    }
    // Refused by the upstream: nothing changed there.
    c.get(&h.url("/app"), &hdr[..1]).await;
    assert!(cached().await);
    let w = c.send(Method::POST, &h.url("/app"), &hdr, Some("{}")).await;
    assert!(w.status.is_client_error(), "{}", w.status);
    assert!(cached().await, "a refused write dropped the list");
    h.stop().await;
}

/// A write the upstream answers 404 (the app was deleted behind the
/// gateway's back: another team member, the RunGen console) proves the
/// cached copy wrong: it is dropped, and the next read gets the 404.
#[tokio::test]
async fn a_write_answered_404_drops_the_cached_copy() {
    let (h, _clock) = start("").await;
    let c = TestClient::http1();
    let auth = rw();
    let team = [("authorization", auth.as_str()), ("x-team-id", TEAM_ID)];
    let list = c.get(&h.url("/app"), &team).await;
    let app_id = list.json()["data"][0]["id"].as_str().unwrap().to_string();
    let app = h.url(&format!("/app/{app_id}"));
    assert_eq!(c.get(&app, &team).await.status, StatusCode::OK);
    let r = c.get(&app, &team).await;
    assert!(cache_status(&r).contains("hit"));
    let direct = c
        .send(
            Method::DELETE,
            &format!("{}/app/{app_id}", h.mock.base_url()),
            &[("x-api-key", UPSTREAM_KEY), ("x-team-id", TEAM_ID)],
            None,
        )
        .await;
    assert_eq!(direct.status, StatusCode::NO_CONTENT);
    let del = c.send(Method::DELETE, &app, &team, None).await;
    assert_eq!(del.status, StatusCode::NOT_FOUND);
    let again = c.get(&app, &team).await;
    assert_eq!(
        again.status,
        StatusCode::NOT_FOUND,
        "{}",
        cache_status(&again)
    );
    let list = c.get(&h.url("/app"), &team).await;
    assert!(
        !list.text().contains(&app_id),
        "the list still shows the deleted app ({})",
        cache_status(&list)
    );
    h.stop().await;
}
