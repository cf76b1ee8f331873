//! A circuit breaker per scope, in front of the upstream: after
//! `breaker_failures` consecutive failures (connection errors, timeouts,
//! invalid responses, 5xx) the scope's circuit opens and requests fail fast
//! with 503 (the cache serves a usable stale answer instead, if it has one).
//! After `breaker_cooldown` one probe request is let through: success closes
//! the circuit, failure opens it again. A probe that ends without an answer
//! (its caller went away, a timeout above cut it short) says nothing of the
//! upstream: the next request probes instead. A probe that has not reported
//! within a cooldown is presumed lost the same way, so a scope is never left
//! failing fast with no probe in flight.

use crate::clock::SharedClock;
use crate::context::RequestContext;
use crate::error::{Body, GatewayError};
use futures_util::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is in flight, let through at `since`.
    HalfOpen {
        since: Instant,
    },
}

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Pass,
    /// The one request let through to test a recovering upstream.
    Probe,
}

/// Breaker state of every scope.
#[derive(Debug)]
pub struct Breakers {
    settings: Mutex<(u32, Duration)>,
    phases: Mutex<HashMap<String, Phase>>,
    clock: SharedClock,
}

impl Breakers {
    pub fn new(failures: u32, cooldown: Duration, clock: SharedClock) -> Arc<Self> {
        Arc::new(Self {
            settings: Mutex::new((failures, cooldown)),
            phases: Mutex::new(HashMap::new()),
            clock,
        })
    }

    pub fn configure(&self, failures: u32, cooldown: Duration) {
        *crate::sync::lock(&self.settings) = (failures, cooldown);
    }

    fn settings(&self) -> (u32, Duration) {
        *crate::sync::lock(&self.settings)
    }

    /// Whether a request for `scope` may go upstream; `Err(wait)` while open.
    pub fn admit(&self, scope: &str) -> Result<Admission, Duration> {
        let (failures, cooldown) = self.settings();
        if failures == 0 {
            return Ok(Admission::Pass);
        }
        let now = self.clock.now();
        let mut phases = crate::sync::lock(&self.phases);
        let phase = phases
            .entry(scope.to_string())
            .or_insert(Phase::Closed { failures: 0 });
        match *phase {
            Phase::Closed { .. } => Ok(Admission::Pass),
            Phase::Open { until } if now >= until => {
                *phase = Phase::HalfOpen { since: now };
                Ok(Admission::Probe)
            }
            Phase::HalfOpen { since } if now >= since + cooldown => {
                tracing::warn!(scope, "the circuit's probe did not report: probing again");
                *phase = Phase::HalfOpen { since: now };
                Ok(Admission::Probe)
            }
            Phase::Open { until } => Err(until - now),
            // A probe is in flight: everyone else still fails fast.
            Phase::HalfOpen { .. } => Err(Duration::from_secs(1)),
        }
    }

    /// A probe ended without an outcome: the next request probes.
    fn probe_abandoned(&self, scope: &str) {
        let now = self.clock.now();
        let mut phases = crate::sync::lock(&self.phases);
        if let Some(phase @ Phase::HalfOpen { .. }) = phases.get_mut(scope) {
            *phase = Phase::Open { until: now };
        }
    }

    /// Records the outcome of an admitted request.
    pub fn record(&self, scope: &str, success: bool) {
        let (threshold, cooldown) = self.settings();
        if threshold == 0 {
            return;
        }
        let now = self.clock.now();
        let mut phases = crate::sync::lock(&self.phases);
        let phase = phases
            .entry(scope.to_string())
            .or_insert(Phase::Closed { failures: 0 });
        let next = match (*phase, success) {
            (_, true) => Phase::Closed { failures: 0 },
            (Phase::Closed { failures }, false) if failures + 1 < threshold => Phase::Closed {
                failures: failures + 1,
            },
            (Phase::Open { until }, false) => Phase::Open { until },
            (_, false) => Phase::Open {
                until: now + cooldown,
            },
        };
        let was_open = matches!(*phase, Phase::Open { .. } | Phase::HalfOpen { .. });
        let is_open = matches!(next, Phase::Open { .. });
        if is_open && !was_open {
            tracing::error!(scope, ?cooldown, "upstream keeps failing: circuit opened");
        } else if was_open && !is_open {
            tracing::info!(scope, "upstream recovered: circuit closed");
        }
        metrics::gauge!("rungen_gateway_circuit_open", "scope" => scope.to_string())
            .set(if is_open { 1.0 } else { 0.0 });
        *phase = next;
    }
}

/// An admitted request's report to the breakers, made when its answer is in;
/// a probe dropped before that is reported abandoned.
struct Report {
    breakers: Arc<Breakers>,
    scope: String,
    probe: bool,
    done: bool,
}

impl Report {
    fn finish(mut self, success: bool) {
        self.done = true;
        self.breakers.record(&self.scope, success);
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if self.probe && !self.done {
            self.breakers.probe_abandoned(&self.scope);
        }
    }
}

/// What an outcome says of the upstream: healthy (`Some(true)`), failing
/// (`Some(false)`), or nothing, when the upstream was never asked or the
/// caller was at fault (our budget's refusal, a slow or broken request body):
/// such an outcome must not close a half-open circuit it never tested.
fn upstream_verdict(res: &Result<Response<Body>, GatewayError>) -> Option<bool> {
    match res {
        Ok(r) => Some(!r.status().is_server_error()),
        Err(
            GatewayError::UpstreamConnect
            | GatewayError::UpstreamTimeout
            | GatewayError::UpstreamProtocol,
        ) => Some(false),
        // The upstream answered (401/403 to the scope's key).
        Err(GatewayError::UpstreamCredentialRejected { .. }) => Some(true),
        Err(_) => None,
    }
}

#[derive(Clone)]
pub struct CircuitBreakerLayer {
    breakers: Arc<Breakers>,
}

impl CircuitBreakerLayer {
    pub fn new(breakers: Arc<Breakers>) -> Self {
        Self { breakers }
    }
}

impl<S> tower::Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            breakers: self.breakers.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breakers: Arc<Breakers>,
}

impl<S> tower::Service<Request<Body>> for CircuitBreaker<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<Response<Body>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(scope) = RequestContext::of(req.extensions())
            .caller
            .as_ref()
            .map(|c| c.scope.name.clone())
        else {
            return self.inner.call(req).boxed();
        };
        let admission = match self.breakers.admit(&scope) {
            Ok(admission) => admission,
            Err(wait) => {
                metrics::counter!("rungen_gateway_circuit_rejections_total", "scope" => scope.clone())
                    .increment(1);
                return std::future::ready(Err(GatewayError::CircuitOpen {
                    scope,
                    retry_after: wait,
                }))
                .boxed();
            }
        };
        let report = Report {
            breakers: self.breakers.clone(),
            scope,
            probe: admission == Admission::Probe,
            done: false,
        };
        self.inner
            .call(req)
            .map(move |res| {
                match upstream_verdict(&res) {
                    Some(success) => report.finish(success),
                    // Dropped unreported: a probe lets the next request probe.
                    None => drop(report),
                }
                res
            })
            .boxed()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn opens_after_consecutive_failures_probes_and_recovers() {
        let clock = ManualClock::new();
        let b = Breakers::new(3, Duration::from_secs(10), Arc::new(clock.clone()));
        for _ in 0..2 {
            assert_eq!(b.admit("acme"), Ok(Admission::Pass));
            b.record("acme", false);
        }
        // A success in between resets the count.
        b.record("acme", true);
        for _ in 0..3 {
            assert_eq!(b.admit("acme"), Ok(Admission::Pass));
            b.record("acme", false);
        }
        assert_eq!(b.admit("acme"), Err(Duration::from_secs(10)));
        assert_eq!(
            b.admit("other"),
            Ok(Admission::Pass),
            "scopes are independent"
        );
        clock.advance(Duration::from_secs(10));
        assert_eq!(b.admit("acme"), Ok(Admission::Probe));
        assert!(b.admit("acme").is_err(), "one probe at a time");
        b.record("acme", false);
        assert_eq!(
            b.admit("acme"),
            Err(Duration::from_secs(10)),
            "a failed probe reopens"
        );
        clock.advance(Duration::from_secs(10));
        assert_eq!(b.admit("acme"), Ok(Admission::Probe));
        b.record("acme", true);
        assert_eq!(b.admit("acme"), Ok(Admission::Pass));
    }

    #[test]
    fn a_probe_that_never_reports_does_not_leave_the_circuit_half_open() {
        let clock = ManualClock::new();
        let b = Breakers::new(1, Duration::from_secs(10), Arc::new(clock.clone()));
        b.record("acme", false);
        clock.advance(Duration::from_secs(10));
        assert_eq!(b.admit("acme"), Ok(Admission::Probe));
        // Abandoned (dropped before its answer): the next request probes.
        b.probe_abandoned("acme");
        assert_eq!(b.admit("acme"), Ok(Admission::Probe));
        // Lost without a word: within a cooldown others still fail fast,
        // after it another probe goes.
        clock.advance(Duration::from_secs(9));
        assert!(b.admit("acme").is_err());
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.admit("acme"), Ok(Admission::Probe));
        b.record("acme", true);
        assert_eq!(b.admit("acme"), Ok(Admission::Pass));
        // Abandoning outside a probe changes nothing.
        b.probe_abandoned("acme");
        assert_eq!(b.admit("acme"), Ok(Admission::Pass));
    }

    #[test]
    fn only_what_the_upstream_did_counts() {
        let answer = |status: u16| {
            Ok(Response::builder()
                .status(status)
                .body(crate::error::empty_body())
                .unwrap())
        };
        assert_eq!(upstream_verdict(&answer(200)), Some(true));
        assert_eq!(upstream_verdict(&answer(404)), Some(true));
        assert_eq!(upstream_verdict(&answer(503)), Some(false));
        assert_eq!(
            upstream_verdict(&Err(GatewayError::UpstreamTimeout)),
            Some(false)
        );
        assert_eq!(
            upstream_verdict(&Err(GatewayError::UpstreamCredentialRejected {
                scope: "acme".into()
            })),
            Some(true)
        );
        for ours in [
            GatewayError::RateLimited {
                policy: "upstream",
                retry_after: Duration::from_secs(1),
            },
            GatewayError::RequestTimeout,
            GatewayError::RequestBody,
        ] {
            assert_eq!(upstream_verdict(&Err(ours)), None);
        }
    }

    #[test]
    fn zero_failures_disables_the_breaker() {
        let b = Breakers::new(0, Duration::from_secs(10), Arc::new(ManualClock::new()));
        for _ in 0..100 {
            b.record("acme", false);
        }
        assert_eq!(b.admit("acme"), Ok(Admission::Pass));
    }
}
