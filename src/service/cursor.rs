//! Durable named cursors on the event log, passed through to the store: the
//! sequence up to which a consumer of the log (a platform driver, a
//! notifier) has handled it, kept where the consumer finds it again after a
//! restart or, on a shared store, in the process that takes over its lease.
//! The store keeps and checks them ([`crate::store::Store::cursor`]); this
//! file only runs the calls off the async workers. Nothing here names the
//! consumers.

use tracing::warn;

use super::{AgentLifecycleService, WatchRequest, Watcher};
use crate::error::{Error, Result};
pub use crate::store::MAX_CURSOR_NAME_BYTES;

impl AgentLifecycleService {
    /// The sequence up to which the consumer `name` has handled the event
    /// log; 0 when it never advanced. It may be below the oldest retained
    /// sequence: compaction does not move cursors.
    ///
    /// # Errors
    /// The name is empty or longer than [`MAX_CURSOR_NAME_BYTES`], or the
    /// store cannot be read.
    pub async fn cursor(&self, name: &str) -> Result<u64> {
        let name = name.to_owned();
        self.shared()
            .read_store(move |store| store.cursor(&name))
            .await
    }

    /// Records, durably before it returns, that the consumer `name` has
    /// handled the event log up to `sequence`. A cursor never moves
    /// backwards: a lower `sequence` than the stored one changes nothing.
    /// A consumer on a shared store advances its cursor while it holds its
    /// lease; the rule above keeps a late write from a process that lost
    /// the lease from undoing the new holder's progress.
    ///
    /// # Errors
    /// The name is empty or longer than [`MAX_CURSOR_NAME_BYTES`], or the
    /// store failed (the stored cursor is then unchanged).
    pub async fn advance_cursor(&self, name: &str, sequence: u64) -> Result<()> {
        let name = name.to_owned();
        self.shared()
            .read_store(move |store| store.advance_cursor(&name, sequence))
            .await
    }

    /// A watch of every event from the cursor `name` on, and the sequence
    /// it starts at: the consumer's place after a restart or a failover.
    /// A consumer that never ran starts after `first_head` (the head when
    /// it was started): the fleet's history is not replayed to it. Events
    /// the cursor had not reached that retention deleted are skipped with
    /// a warning, the cursor moved to the oldest kept.
    ///
    /// # Errors
    /// The cursor cannot be read or moved, or the watch cannot open.
    pub async fn watch_from_cursor(&self, name: &str, first_head: u64) -> Result<(Watcher, u64)> {
        self.catch_up_with_store().await?;
        let mut next = self.cursor(name).await?;
        if next == 0 {
            next = first_head + 1;
            self.advance_cursor(name, next).await?;
        }
        let request = |start_sequence| WatchRequest {
            start_sequence,
            ..WatchRequest::default()
        };
        match self.watch(request(next)).await {
            Err(Error::SequenceCompacted { oldest, .. }) => {
                warn!(
                    cursor = name,
                    next,
                    oldest,
                    "events the consumer had not handled were compacted; it goes on from the oldest kept"
                );
                self.advance_cursor(name, oldest).await?;
                Ok((self.watch(request(oldest)).await?, oldest))
            }
            opened => Ok((opened?, next)),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{error::Error, service::AgentLifecycleService, store::StoreError};

    #[tokio::test]
    async fn cursors_start_at_zero_advance_and_never_move_backwards() {
        let service = AgentLifecycleService::in_memory().expect("service");
        assert_eq!(service.cursor("driver").await.expect("read"), 0);
        service.advance_cursor("driver", 7).await.expect("advance");
        service
            .advance_cursor("driver", 3)
            .await
            .expect("a lower sequence is not an error");
        assert_eq!(service.cursor("driver").await.expect("read"), 7);
        assert_eq!(
            service.cursor("notify").await.expect("read"),
            0,
            "names are independent"
        );
        let refused = service.advance_cursor("", 1).await;
        assert!(
            matches!(&refused, Err(Error::Store(err)) if matches!(**err, StoreError::InvalidCursorName { .. })),
            "{refused:?}"
        );
        service.close().await.expect("close");
    }
}
