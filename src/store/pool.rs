//! A bounded pool of connections, for the stores' readers: at most `max`
//! open at once, reused. A caller that finds them all busy waits for one
//! (up to `wait`) instead of opening another, so a burst of reads queues
//! for a connection rather than paying for opening one (on SQLite: the
//! file opened and its schema parsed again; on PostgreSQL: a new session)
//! and can never open more than `max`. Depends on nothing else in the
//! store.

use std::{
    sync::{Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::{Result, StoreError};

/// See the module doc.
pub(super) struct Pool<C> {
    max: usize,
    wait: Duration,
    slots: Mutex<Slots<C>>,
    freed: Condvar,
}

struct Slots<C> {
    idle: Vec<C>,
    /// Connections open, idle or lent out.
    open: usize,
}

impl<C> Pool<C> {
    /// An empty pool of at most `max` connections (at least one), whose
    /// callers wait up to `wait` for a busy one.
    pub(super) fn new(max: usize, wait: Duration) -> Self {
        Pool {
            max: max.max(1),
            wait,
            slots: Mutex::new(Slots {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn slots(&self) -> MutexGuard<'_, Slots<C>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection that `usable` accepts (the others are dropped), a
    /// new one from `open` while fewer than the maximum are open, or the
    /// first one freed; and whether it was pooled. Hand it back with
    /// [`Pool::release`].
    ///
    /// # Errors
    /// `open` failed, or every connection stayed busy for the wait.
    pub(super) fn acquire(
        &self,
        usable: impl Fn(&C) -> bool,
        open: impl FnOnce() -> Result<C>,
    ) -> Result<(C, bool)> {
        let deadline = Instant::now() + self.wait;
        let mut slots = self.slots();
        loop {
            if let Some(conn) = slots.idle.pop() {
                if !usable(&conn) {
                    slots.open -= 1;
                    continue;
                }
                return Ok((conn, true));
            }
            if slots.open < self.max {
                slots.open += 1;
                drop(slots);
                return match open() {
                    Ok(conn) => Ok((conn, false)),
                    Err(err) => {
                        self.slots().open -= 1;
                        self.freed.notify_one();
                        Err(err)
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::backend(
                    "waiting for a reader connection",
                    std::io::Error::other(format!(
                        "all {} reader connections stayed busy for {:?}",
                        self.max, self.wait
                    )),
                ));
            }
            slots = self
                .freed
                .wait_timeout(slots, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Hands back a connection from [`Pool::acquire`]: kept for reuse, or
    /// counted gone when `keep` is false (it was found closed).
    pub(super) fn release(&self, conn: C, keep: bool) {
        let mut slots = self.slots();
        if keep {
            slots.idle.push(conn);
        } else {
            slots.open -= 1;
        }
        drop(slots);
        self.freed.notify_one();
    }

    /// Closes the idle connections; those lent out come back as usual.
    pub(super) fn close(&self) {
        let mut slots = self.slots();
        let closed = slots.idle.len();
        slots.idle.clear();
        slots.open -= closed;
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, thread};

    use super::*;

    #[test]
    fn never_opens_more_than_the_maximum_and_reuses_what_it_opened() {
        let pool = Arc::new(Pool::<u32>::new(2, Duration::from_secs(10)));
        let opened = Arc::new(Mutex::new(0u32));
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (pool, opened) = (Arc::clone(&pool), Arc::clone(&opened));
                thread::spawn(move || {
                    for _ in 0..100 {
                        let (conn, _) = pool
                            .acquire(
                                |_| true,
                                || {
                                    let mut opened = opened.lock().unwrap();
                                    *opened += 1;
                                    Ok(*opened)
                                },
                            )
                            .unwrap();
                        assert!(pool.slots().open <= 2);
                        pool.release(conn, true);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let opened = *opened.lock().unwrap();
        assert!(
            (1..=2).contains(&opened),
            "{opened} connections served 800 reads"
        );
        assert_eq!(pool.slots().idle.len(), opened as usize);

        // Two held at once are two connections; handed back, both are
        // lent again rather than opened anew.
        let fresh = Pool::<u32>::new(2, Duration::from_secs(10));
        let (a, _) = fresh.acquire(|_| true, || Ok(1)).unwrap();
        let (b, pooled) = fresh.acquire(|_| true, || Ok(2)).unwrap();
        assert_eq!((b, pooled), (2, false));
        fresh.release(a, true);
        fresh.release(b, true);
        let mut again = [
            fresh.acquire(|_| true, || Ok(3)).unwrap(),
            fresh.acquire(|_| true, || Ok(4)).unwrap(),
        ];
        again.sort();
        assert_eq!(again, [(1, true), (2, true)]);
    }

    #[test]
    fn a_caller_waits_for_a_busy_connection_then_gives_up_with_a_clear_error() {
        let pool = Pool::<u32>::new(1, Duration::from_millis(50));
        let (held, pooled) = pool.acquire(|_| true, || Ok(7)).unwrap();
        assert!(!pooled);
        let err = pool.acquire(|_| true, || Ok(8)).unwrap_err();
        let message = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            message.contains("all 1 reader connections stayed busy"),
            "{message}"
        );
        pool.release(held, true);
        let (again, pooled) = pool.acquire(|_| true, || Ok(9)).unwrap();
        assert_eq!((again, pooled), (7, true));
    }

    #[test]
    fn unusable_and_failed_connections_free_their_place() {
        let pool = Pool::<u32>::new(1, Duration::from_millis(50));
        let (conn, _) = pool.acquire(|_| true, || Ok(1)).unwrap();
        pool.release(conn, true);
        // The idle one is refused as closed: a new one takes its place.
        let (conn, pooled) = pool.acquire(|&c| c != 1, || Ok(2)).unwrap();
        assert_eq!((conn, pooled), (2, false));
        pool.release(conn, false);
        let refused = || {
            Err(StoreError::backend(
                "opening",
                std::io::Error::other("refused"),
            ))
        };
        assert!(pool.acquire(|_| true, refused).is_err());
        let (conn, _) = pool.acquire(|_| true, || Ok(3)).unwrap();
        assert_eq!(conn, 3);
    }
}
