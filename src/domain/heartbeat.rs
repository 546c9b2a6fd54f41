//! Heartbeats: an agent's sign of life, with what it says of itself.

use std::time::SystemTime;

/// One heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    /// When it arrived (the receiving server's clock).
    pub at: SystemTime,
    /// The agent's load, as it reports it.
    pub load: Option<f64>,
    /// The task it works on, as it reports it.
    pub current_task: Option<String>,
}

impl Heartbeat {
    /// The newer of two heartbeats of one agent (`self` on a tie).
    #[must_use]
    pub fn newer(self, other: Heartbeat) -> Heartbeat {
        if other.at > self.at { other } else { self }
    }
}
