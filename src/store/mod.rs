//! Durable record of agents and the global event log.
//!
//! One trait, several back ends: [`MemoryStore`] (tests and throwaway use)
//! and [`SqliteStore`] (the embedded default). A PostgreSQL back end for
//! several server processes implements the same trait. The store knows
//! nothing of gRPC or of the service's locking: it persists what it is given
//! and answers range reads.
//!
//! The trait is synchronous and may block (fsync, SQL). The service calls
//! [`Store::commit`] from its one commit thread and the reads from
//! `spawn_blocking`, never on an async worker.

mod memory;
mod sqlite;

use std::{sync::Arc, time::Duration};

use crate::domain::{Agent, AgentId, TransitionRecord};

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

/// A store failure. The batch that saw it was not applied.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The back end failed (I/O, disk full, read-only file, corruption).
    /// Display shows the context; the back end's error is the source (see
    /// [`crate::error::chain`]).
    #[error("{context}")]
    Backend {
        /// What the store was doing.
        context: &'static str,
        /// The back end's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stored data does not match what the caller expected: another
    /// writer got there first. The batch was rolled back.
    #[error("agent {agent_id}: stored version {actual} is not the expected {expected}")]
    Conflict {
        /// The agent.
        agent_id: AgentId,
        /// The version the change was based on.
        expected: u64,
        /// The version found.
        actual: u64,
    },
    /// Another process (another server) has the database open.
    #[error("{} is in use by another process (another server on the same file?)", .0.display())]
    Locked(std::path::PathBuf),
    /// The database was written by a newer program.
    #[error("database schema version {found} is newer than the supported {supported}")]
    SchemaTooNew {
        /// In the file.
        found: i64,
        /// This program's.
        supported: i64,
    },
    /// A commit failed in a way that may still have reached the disk, so the
    /// server's view may differ from the store's.
    #[error(
        "a failed commit left the store in an unknown state; writes are refused until the server restarts"
    )]
    Uncertain,
    /// The store was given something it cannot represent.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub(crate) fn backend(
        context: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Backend {
            context,
            source: Box::new(source),
        }
    }
}

/// Shorthand for store results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One agent's change in a commit batch: its new version and the records
/// that lead there, in order.
#[derive(Clone, Debug)]
pub struct AgentChange {
    /// The agent after every record of this change.
    pub agent: Arc<Agent>,
    /// The version the change is based on; 0 creates the agent.
    pub prior_version: u64,
    /// The transitions, sequences already assigned, in order.
    pub records: Vec<Arc<TransitionRecord>>,
}

/// What a store holds when it is opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every agent at its latest version.
    pub agents: Vec<Agent>,
    /// The highest sequence ever committed (0 when empty).
    pub head: u64,
}

/// Which events compaction may delete. The default keeps everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many of the newest events.
    pub max_events: Option<u64>,
    /// Delete events older than this.
    pub max_age: Option<Duration>,
}

impl Retention {
    /// Whether compaction has nothing to do.
    pub fn keeps_everything(&self) -> bool {
        self.max_events.is_none() && self.max_age.is_none()
    }
}

/// A range of one agent's history: `after < sequence <= upto`, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryRange {
    /// Exclusive lower bound.
    pub after: u64,
    /// Inclusive upper bound.
    pub upto: u64,
    /// At most this many records.
    pub max: usize,
}

/// The durable record.
pub trait Store: Send + Sync + 'static {
    /// Reads the agents and the head sequence, creating or migrating the
    /// schema on first use.
    ///
    /// # Errors
    /// The back end failed or the data is newer than this program.
    fn load(&self) -> Result<Recovered>;

    /// Persists every change of `batch` atomically (one transaction, one
    /// fsync in the durable stores), or none of them.
    ///
    /// # Errors
    /// On any error nothing of the batch is stored.
    fn commit(&self, batch: &[AgentChange]) -> Result<()>;

    /// The highest sequence the store holds as committed (0 when empty),
    /// read from the store itself: after a failed commit it tells whether
    /// the batch was rolled back.
    ///
    /// # Errors
    /// The back end failed.
    fn committed_head(&self) -> Result<u64>;

    /// Up to `max` events with `sequence > after`, in sequence order.
    ///
    /// # Errors
    /// The back end failed.
    fn events_after(&self, after: u64, max: usize) -> Result<Vec<Arc<TransitionRecord>>>;

    /// The oldest sequence still retained; `head + 1` when the log is empty.
    fn oldest_sequence(&self) -> u64;

    /// One agent's records in `range`, oldest first.
    ///
    /// # Errors
    /// The back end failed.
    fn history(&self, agent_id: AgentId, range: HistoryRange)
    -> Result<Vec<Arc<TransitionRecord>>>;

    /// The sequence of the agent's `n`-th newest retained record at or below
    /// `upto` (`n >= 1`), or `None` when it has fewer.
    ///
    /// # Errors
    /// The back end failed.
    fn nth_newest(&self, agent_id: AgentId, upto: u64, n: u64) -> Result<Option<u64>>;

    /// How many records of the agent are retained.
    ///
    /// # Errors
    /// The back end failed.
    fn history_count(&self, agent_id: AgentId) -> Result<u64>;

    /// Deletes up to `max_rows` of the oldest events that `retention` lets
    /// go, given the current `head`. Returns how many were deleted.
    ///
    /// # Errors
    /// The back end failed; nothing was deleted.
    fn compact(&self, retention: &Retention, head: u64, max_rows: usize) -> Result<usize>;

    /// Makes everything committed durable and releases resources.
    ///
    /// # Errors
    /// The back end failed.
    fn close(&self) -> Result<()>;
}

#[cfg(test)]
mod conformance;
