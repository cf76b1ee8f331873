//! Time as a parameter: the cache reads "now" from a [`Clock`], so tests can
//! move time by hand instead of sleeping.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// A source of monotonic and wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> Instant;
    fn wall(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Clone)]
pub struct ManualClock {
    offset: Arc<Mutex<Duration>>,
    base: Instant,
    wall_base: SystemTime,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    pub fn new() -> Self {
        Self {
            offset: Arc::new(Mutex::new(Duration::ZERO)),
            base: Instant::now(),
            wall_base: SystemTime::now(),
        }
    }

    pub fn advance(&self, by: Duration) {
        let mut offset = crate::sync::lock(&self.offset);
        *offset += by;
    }

    fn offset(&self) -> Duration {
        *crate::sync::lock(&self.offset)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.offset()
    }
    fn wall(&self) -> SystemTime {
        self.wall_base + self.offset()
    }
}

pub type SharedClock = Arc<dyn Clock>;
