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
//! A round runs in a task of its own, so that a call dropped while waiting
//! (its client went away) never leaves a round unfinished.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

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

#[derive(Default)]
struct Rounds {
    /// Rounds started so far; the running one is the last.
    started: u64,
    running: bool,
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
    pub(crate) async fn head(self: &Arc<Self>, store: &Arc<dyn Store>) -> Result<u64> {
        let mut finished = self.finished.subscribe();
        // Any round numbered `needed` or later starts after this point.
        let needed = self.rounds().started + 1;
        loop {
            self.start_if_idle(store);
            {
                let (round, result) = &*finished.borrow_and_update();
                if *round >= needed {
                    return result.clone().map_err(Error::Store);
                }
            }
            finished.changed().await.map_err(|_| Error::ShuttingDown)?;
        }
    }

    /// Starts a round unless one is running.
    fn start_if_idle(self: &Arc<Self>, store: &Arc<dyn Store>) {
        let round = {
            let mut rounds = self.rounds();
            if rounds.running {
                return;
            }
            rounds.running = true;
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
                    reads.head(&store).await.expect("head");
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
}
