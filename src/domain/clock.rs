//! Wall-clock time, from one injectable source.
//!
//! Everything that records or compares a wall time (commit times, and the
//! timers built on them) reads it from a [`Clock`], never from
//! `SystemTime::now()` directly, so that a test can drive time. The service
//! provides a clock that follows tokio's (pausable) time; production uses
//! [`SystemClock`].

use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// `at` truncated to the precision events are stored with (microseconds), so
/// that a record reads back exactly as it was committed.
pub fn to_stored_precision(at: SystemTime) -> SystemTime {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_micros(d.as_micros() as u64),
        Err(_) => at,
    }
}
