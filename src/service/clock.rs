//! A wall clock that follows tokio's time, for tests that pause it.
//!
//! With `tokio::time::pause()`, timers (`sleep`, `interval`) wait on virtual
//! time while `SystemTime::now()` keeps running. [`TokioClock`] derives the
//! wall time from tokio's clock instead: its start time plus the tokio time
//! elapsed since, so an `advance` of an hour moves both the timers and every
//! recorded time by exactly an hour. Production uses
//! [`crate::domain::SystemClock`].

use std::time::SystemTime;

use tokio::{runtime::Handle, time::Instant};

use crate::domain::{Clock, clock::to_stored_precision};

/// Wall time = `start` + tokio time elapsed since the clock was made.
#[derive(Debug)]
pub struct TokioClock {
    start: SystemTime,
    origin: Instant,
    /// The runtime whose clock is followed; entered to read it from threads
    /// outside the runtime (the commit thread).
    runtime: Handle,
}

impl TokioClock {
    /// A clock reading `start` now, following the current runtime's time.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn starting_at(start: SystemTime) -> Self {
        let runtime = Handle::current();
        let origin = {
            let _entered = runtime.enter();
            Instant::now()
        };
        TokioClock {
            start: to_stored_precision(start),
            origin,
            runtime,
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        let _entered = self.runtime.enter();
        self.start + Instant::now().saturating_duration_since(self.origin)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_time_on_any_thread() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = std::sync::Arc::new(TokioClock::starting_at(start));
        assert_eq!(clock.now(), start);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), start + Duration::from_secs(3600));
        let from_thread = {
            let clock = std::sync::Arc::clone(&clock);
            std::thread::spawn(move || clock.now())
                .join()
                .expect("thread")
        };
        assert_eq!(from_thread, start + Duration::from_secs(3600));
    }
}
