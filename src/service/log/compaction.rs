//! Retention: deleting the oldest events the configured retention lets go.
//!
//! Compaction runs on the commit thread between batches, in chunks of
//! [`COMPACTION_CHUNK`] rows, so that it never holds the writer for long; a
//! round runs when the compaction timer asks (every `compaction_interval`,
//! while this process holds the `compaction` lease) or `compact_now` does.
//! Watchers that need deleted events end with `SequenceCompacted`.
//!
//! Must not depend on the write path or on watchers.

use std::{
    sync::{Arc, mpsc},
    time::Duration,
};

use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::commit::Message;
use crate::{
    service::{ServiceConfig, Shared, lease},
    store::{Retention, StoreError},
};

/// Rows deleted per compaction step; bounds how long one step holds the
/// writer (a few milliseconds).
const COMPACTION_CHUNK: usize = 2_000;

/// Starts the compaction timer on the service's runtime when retention is
/// configured; `None` when everything is kept.
pub(super) fn start_timer(
    shared: &Shared,
    config: &ServiceConfig,
    commits: &mpsc::Sender<Message>,
) -> Option<tokio::task::JoinHandle<()>> {
    let runtime = shared.runtime.as_ref()?;
    if config.retention.keeps_everything() {
        return None;
    }
    let lease = lease::LeaseHolder::new(
        Arc::clone(&shared.store),
        "compaction",
        shared.metrics.clone(),
    );
    // The schedule starts now, not when the task first runs.
    let period = config.compaction_interval.max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(runtime.spawn(compact_every(commits.clone(), lease, ticks)))
}

/// Asks the commit thread for a compaction round at every tick of `ticks`
/// (tokio time, so tests can drive it with a paused clock; the schedule
/// is made when the service opens, so a task first polled late still
/// keeps it) while this process holds the compaction lease, waiting for
/// each round to end before the next interval starts.
async fn compact_every(
    commits: mpsc::Sender<Message>,
    mut lease: lease::LeaseHolder,
    mut ticks: tokio::time::Interval,
) {
    loop {
        ticks.tick().await;
        if !lease.held().await {
            continue;
        }
        let (tx, rx) = oneshot::channel();
        if commits.send(Message::Compact(tx)).is_err() {
            return;
        }
        match rx.await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                warn!(error = %crate::error::chain(&*err), "compaction failed; retrying at the next interval");
            }
            Err(_) => return,
        }
    }
}

/// A compaction round in progress and who waits for its end.
#[derive(Default)]
pub(super) struct Compaction {
    /// Who waits for the round under way; empty: no round.
    pub(super) waiters: Vec<oneshot::Sender<Result<u64, Arc<StoreError>>>>,
    /// Rows deleted so far in the round.
    deleted: u64,
}

impl Compaction {
    /// Whether a round is under way.
    pub(super) fn active(&self) -> bool {
        !self.waiters.is_empty()
    }

    /// One bounded chunk; queued proposals are committed before the next
    /// one, so compaction never holds writers for long.
    pub(super) fn step(&mut self, shared: &Shared, retention: &Retention) {
        let result = shared.store.compact(
            retention,
            shared.head(),
            COMPACTION_CHUNK,
            shared.clock.as_ref(),
        );
        match result {
            Ok(deleted) => {
                self.deleted += deleted as u64;
                if deleted > 0 {
                    debug!(deleted, "compacted the event log");
                }
                if deleted < COMPACTION_CHUNK {
                    for done in self.waiters.drain(..) {
                        let _ = done.send(Ok(self.deleted));
                    }
                    self.deleted = 0;
                }
            }
            Err(err) => {
                warn!(error = %crate::error::chain(&err), "compaction failed");
                let err = Arc::new(err);
                for done in self.waiters.drain(..) {
                    let _ = done.send(Err(Arc::clone(&err)));
                }
                self.deleted = 0;
            }
        }
    }
}
