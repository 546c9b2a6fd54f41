//! Reads of a shared store's head, one at a time, shared by every call
//! that waits for one.
//!
//! A read that must see every commit made before it (see
//! `AgentLifecycleService::catch_up_with_store`) needs a head read that
//! started after the call arrived. One read runs at a time; the calls that
//! arrive while it runs wait for the next one, which the first of them
//! starts once the running one ends. So under thousands of such calls a
//! second (heartbeats, reads on PostgreSQL) one query serves all the calls
//! that arrived during the previous query, and none sees a head older than
//! its own arrival.
//!
//! A call that can wait a little ([`Pace::Paced`]: a heartbeat on a stream,
//! whose sender awaits no answer) does not start a round sooner than
//! [`PACE`] after the previous one started; it waits for that round
//! instead. Under a steady stream of such calls a process then reads the
//! head at most once per [`PACE`], not once per round trip, and every call
//! is still answered by a round that started after it arrived. A call that
//! cannot wait ([`Pace::Now`]) starts a round at once whenever none runs.
//!
//! A round runs in a task of its own, so that a call dropped while waiting
//! (its client went away) never leaves a round unfinished.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::{
    error::{Error, Result},
    store::{Store, StoreError},
};

/// The latest finished round: its number and what it read.
type Finished = (u64, std::result::Result<u64, Arc<StoreError>>);

/// See the module doc.
pub(crate) struct HeadReads {
    rounds: Mutex<Rounds>,
    finished: watch::Sender<Finished>,
}

/// The least time between the starts of two rounds that only
/// [`Pace::Paced`] calls wait for.
pub(crate) const PACE: Duration = Duration::from_millis(2);

/// How soon a call needs its round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pace {
    /// At once: a round starts as soon as none runs.
    Now,
    /// No sooner than [`PACE`] after the previous round started.
    Paced,
}

#[derive(Default)]
struct Rounds {
    /// Rounds started so far; the running one is the last.
    started: u64,
    running: bool,
    /// When the last round started.
    last_start: Option<Instant>,
    /// A timer will start a round for the paced calls waiting.
    timer: bool,
}

impl Default for HeadReads {
    fn default() -> Self {
        HeadReads {
            rounds: Mutex::default(),
            finished: watch::channel((0, Ok(0))).0,
        }
    }
}

impl HeadReads {
    fn rounds(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store's head, read by a round that started after this call.
    ///
    /// # Errors
    /// That round's read failed, or the runtime is gone.
    pub(crate) async fn head(self: &Arc<Self>, store: &Arc<dyn Store>, pace: Pace) -> Result<u64> {
        let mut finished = self.finished.subscribe();
        // Any round numbered `needed` or later starts after this point.
        let needed = self.rounds().started + 1;
        loop {
            // Answered before asking for a round: a paced call answered by
            // the round that just ended must not set a timer for another.
            {
                let (round, result) = &*finished.borrow_and_update();
                if *round >= needed {
                    return result.clone().map_err(Error::Store);
                }
            }
            self.start_if_idle(store, pace);
            finished.changed().await.map_err(|_| Error::ShuttingDown)?;
        }
    }

    /// Starts a round unless one is running; for a paced call, when the
    /// last one started less than [`PACE`] ago, sets a timer that starts
    /// it then instead.
    fn start_if_idle(self: &Arc<Self>, store: &Arc<dyn Store>, pace: Pace) {
        let round = {
            let mut rounds = self.rounds();
            if rounds.running {
                return;
            }
            let now = Instant::now();
            let due = match (pace, rounds.last_start) {
                (Pace::Paced, Some(last)) => last + PACE,
                _ => now,
            };
            if due > now {
                if !rounds.timer {
                    rounds.timer = true;
                    let (reads, store) = (Arc::clone(self), Arc::clone(store));
                    tokio::spawn(async move {
                        tokio::time::sleep_until(due).await;
                        reads.rounds().timer = false;
                        reads.start_if_idle(&store, Pace::Paced);
                    });
                }
                return;
            }
            rounds.running = true;
            rounds.last_start = Some(now);
            rounds.started += 1;
            rounds.started
        };
        let reads = Arc::clone(self);
        let store = Arc::clone(store);
        tokio::spawn(async move {
            let read = tokio::task::spawn_blocking(move || store.head()).await;
            let result = match read {
                Ok(head) => head.map_err(Arc::new),
                Err(err) => Err(Arc::new(StoreError::backend("reading the head", err))),
            };
            reads.rounds().running = false;
            let _previous = reads.finished.send_replace((round, result));
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::store::{MemoryStore, Retention};

    fn store() -> Arc<dyn Store> {
        Arc::new(MemoryStore::new(&Retention::default()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_reads_and_each_sees_a_fresh_one() {
        let reads = Arc::new(HeadReads::default());
        let store = store();
        let calls = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (reads, store, calls) =
                    (Arc::clone(&reads), Arc::clone(&store), Arc::clone(&calls));
                tokio::spawn(async move {
                    let needed = reads.rounds().started + 1;
                    reads.head(&store, Pace::Now).await.expect("head");
                    // The round that answered started after the call.
                    assert!(reads.finished.borrow().0 >= needed);
                    calls.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(10), task)
                .await
                .expect("in time")
                .expect("task");
        }
        assert_eq!(calls.load(Ordering::Relaxed), 200);
        let rounds = reads.rounds().started;
        assert!((1..=200).contains(&rounds), "{rounds} rounds");
    }

    /// Heads read by `tasks` tasks, each `calls` times in a row at `pace`;
    /// every call answered by a round that started after it. Returns the
    /// rounds started and the time taken.
    async fn read_heads(
        reads: &Arc<HeadReads>,
        tasks: usize,
        calls: usize,
        pace: Pace,
    ) -> (u64, Duration) {
        let store = store();
        let (before, start) = (reads.rounds().started, Instant::now());
        let tasks: Vec<_> = (0..tasks)
            .map(|_| {
                let (reads, store) = (Arc::clone(reads), Arc::clone(&store));
                tokio::spawn(async move {
                    for _ in 0..calls {
                        let needed = reads.rounds().started + 1;
                        reads.head(&store, pace).await.expect("head");
                        assert!(reads.finished.borrow().0 >= needed);
                    }
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("in time")
                .expect("task");
        }
        (reads.rounds().started - before, start.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_calls_start_a_round_at_most_once_per_pace() {
        let reads = Arc::new(HeadReads::default());
        // 40 callers, 20 reads each: 800 calls.
        let (rounds, took) = read_heads(&reads, 40, 20, Pace::Paced).await;
        let bound = (took.as_secs_f64() / PACE.as_secs_f64()).floor() as u64 + 1;
        assert!(
            rounds <= bound,
            "{rounds} rounds in {took:?}, at most {bound}"
        );
        // Each caller's reads follow one another: at least 20 rounds.
        assert!(rounds >= 20, "{rounds} rounds");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_that_cannot_wait_are_not_paced() {
        let reads = Arc::new(HeadReads::default());
        // A paced round just started: a call that cannot wait still gets
        // one of its own at once, each time.
        read_heads(&reads, 1, 1, Pace::Paced).await;
        let (rounds, _) = read_heads(&reads, 1, 50, Pace::Now).await;
        assert_eq!(rounds, 50);
        let (rounds, took) = read_heads(&reads, 1, 50, Pace::Paced).await;
        assert_eq!(rounds, 50);
        assert!(took >= PACE * 49, "50 paced rounds in a row took {took:?}");
    }
}
