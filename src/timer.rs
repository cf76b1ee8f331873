//! The timer hyper's HTTP/1.1 connections use for `header_read_timeout`.
//!
//! hyper arms that timeout before every request head (the wait for the next
//! request on a kept-alive connection included) and drops it once the head is
//! read, so with hyper-util's `TokioTimer` every request allocated a tokio
//! timer, registered it in the timer wheel under the time driver's lock on its
//! first poll and took the lock again to deregister it. [`PooledTimer`] keeps
//! the dropped tokio timers of its listener and hands them out again:
//! re-arming one for a later deadline only moves its expiry (callgrind: 340
//! fewer instructions of a ~28,000-instruction cache hit). The pool is split
//! into one part per runtime thread (by the thread that takes or returns a
//! timer), so worker threads do not contend for one lock per request.
//!
//! A timer waiting in the pool stays registered until its old deadline, so
//! when a listener goes quiet each pooled timer fires at most once more,
//! waking the task that last polled it (a spurious wake-up hyper ignores), and
//! until then its waker keeps that task's (finished) allocation alive. A
//! connection holds a timer only while it waits for a head, so the pool needs
//! little room: at most [`SHARD_MAX`] timers per part are kept.

use hyper::rt::{Sleep, Timer};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Most idle tokio timers kept per part of a listener's pool.
pub const SHARD_MAX: usize = 64;

type Shard = Mutex<Vec<Pin<Box<tokio::time::Sleep>>>>;

/// A `hyper::rt::Timer` on tokio's timer that reuses the timers hyper drops.
#[derive(Clone)]
pub struct PooledTimer {
    shards: Arc<[Shard]>,
}

impl Default for PooledTimer {
    /// One part per CPU this process may use (its runtime threads, by default).
    fn default() -> Self {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        Self::with_shards(n.min(64))
    }
}

impl PooledTimer {
    fn with_shards(n: usize) -> Self {
        Self {
            shards: (0..n.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    /// The calling thread's part of the pool.
    fn shard(&self) -> &Shard {
        thread_local! {
            static INDEX: usize = {
                static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            };
        }
        &self.shards[INDEX.with(|i| *i) % self.shards.len()]
    }

    fn take(&self, deadline: tokio::time::Instant) -> Pin<Box<tokio::time::Sleep>> {
        let pooled = crate::sync::lock(self.shard()).pop();
        match pooled {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    fn give_back(&self, sleep: Pin<Box<tokio::time::Sleep>>) {
        let mut shard = crate::sync::lock(self.shard());
        if shard.len() < SHARD_MAX {
            shard.push(sleep);
        }
    }

    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.shards.iter().map(|s| crate::sync::lock(s).len()).sum()
    }
}

impl Timer for PooledTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(PooledSleep {
            inner: Some(self.take(deadline.into())),
            timer: self.clone(),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<PooledSleep>() {
            Some(mut pooled) => pooled.as_mut().reset(new_deadline.into()),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into()
    }
}

/// One armed timer; back to the pool when dropped.
struct PooledSleep {
    /// `Some` until dropped.
    inner: Option<Pin<Box<tokio::time::Sleep>>>,
    timer: PooledTimer,
}

impl PooledSleep {
    fn reset(self: Pin<&mut Self>, deadline: tokio::time::Instant) {
        // `inner` is boxed: moving the box does not move the timer.
        if let Some(sleep) = self.get_mut().inner.as_mut() {
            sleep.as_mut().reset(deadline);
        }
    }
}

impl Future for PooledSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut().inner.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Sleep for PooledSleep {}

impl Drop for PooledSleep {
    fn drop(&mut self) {
        if let Some(sleep) = self.inner.take() {
            self.timer.give_back(sleep);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_fires_at_its_new_deadline_not_its_old_one() {
        let timer = PooledTimer::default();
        let first = timer.sleep(Duration::from_secs(1));
        drop(first);
        assert_eq!(timer.pooled(), 1);
        let started = tokio::time::Instant::now();
        let second = timer.sleep(Duration::from_secs(30));
        assert_eq!(timer.pooled(), 0, "the pooled timer was reused");
        second.await;
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(timer.pooled(), 1, "and returned");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_can_be_armed_earlier_than_before() {
        let timer = PooledTimer::default();
        drop(timer.sleep(Duration::from_secs(60)));
        let started = tokio::time::Instant::now();
        timer.sleep(Duration::from_secs(2)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_that_fired_in_the_pool_is_rearmed() {
        let timer = PooledTimer::default();
        drop(timer.sleep(Duration::from_secs(1)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let started = tokio::time::Instant::now();
        timer.sleep(Duration::from_secs(3)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn reset_moves_the_deadline() {
        let timer = PooledTimer::default();
        let mut sleep = timer.sleep(Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        timer.reset(&mut sleep, timer.now() + Duration::from_secs(10));
        sleep.await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn the_pool_is_bounded() {
        let timer = PooledTimer::with_shards(4);
        let many: Vec<_> = (0..SHARD_MAX + 10)
            .map(|_| timer.sleep(Duration::from_secs(60)))
            .collect();
        drop(many);
        // All dropped on this thread: its part is full, the others empty.
        assert_eq!(timer.pooled(), SHARD_MAX);
    }
}
