//! Durable record of agents and the global event log.
//!
//! One trait, several back ends: [`MemoryStore`] (tests and throwaway use),
//! [`SqliteStore`] (the embedded default, in `sqlite/`) and
//! [`PostgresStore`] (shared by several processes, in `postgres/`), all
//! held to one conformance suite. What compaction may delete is decided
//! here, once for all of them ([`Retention`]). The store depends on the
//! domain only: it knows nothing of gRPC, of the service's locking, or of
//! callers beyond plain strings.
//!
//! The store orders the log: [`Store::commit`] assigns the global sequence
//! numbers and the commit time inside its transaction, so sequence order is
//! commit order whichever writer commits. Each change of a batch has its own
//! outcome: a change whose prior version no longer matches (another writer
//! got there first) is refused alone, and the rest of the batch commits.
//!
//! Beside the log, the store keeps named cursors: how far each consumer of
//! the log (a platform driver, a notifier) has handled it, so that it
//! resumes from there after a restart or in another process
//! ([`Store::cursor`], [`Store::advance_cursor`]).
//!
//! The trait is synchronous and may block (fsync, SQL). The service calls
//! [`Store::commit`] from its one commit thread and the reads from
//! `spawn_blocking`, never on an async worker.

mod codec;
mod memory;
mod pool;
mod postgres;
mod sqlite;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::domain::{Agent, AgentId, Clock, Heartbeat, Labels, TransitionRecord};

pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use sqlite::{PRAGMAS as SQLITE_PRAGMAS, SqliteStore};

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
    /// The commit of a batch failed at its last step (COMMIT itself, the
    /// fsync, the connection): it may or may not have been stored. Callers
    /// ask [`Store::batch_committed`] or read the log.
    #[error("the commit's outcome is unknown: {source}")]
    CommitOutcomeUnknown {
        /// The back end's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A commit failed in a way that may still have reached the disk, and
    /// the store cannot be read to find out: the server's view may differ
    /// from the store's.
    #[error(
        "a failed commit left the store in an unknown state; writes are refused until the server restarts"
    )]
    Uncertain,
    /// The store was given something it cannot represent.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A cursor name is empty or longer than [`MAX_CURSOR_NAME_BYTES`];
    /// nothing was read or written.
    #[error(
        "cursor name {name:?} is {len} bytes long; a cursor name is 1 to {max} bytes",
        len = .name.len(),
        max = MAX_CURSOR_NAME_BYTES
    )]
    InvalidCursorName {
        /// The name given.
        name: String,
    },
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

/// The longest cursor name, in bytes (see [`Store::cursor`]). Names are
/// chosen by the server's own code, so a short bound costs nothing and keeps
/// the key of the `cursors` table small.
pub const MAX_CURSOR_NAME_BYTES: usize = 128;

/// Checks a cursor name: 1 to [`MAX_CURSOR_NAME_BYTES`] bytes. Every back
/// end checks before it touches its table, so all refuse the same names.
fn check_cursor_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_CURSOR_NAME_BYTES {
        return Err(StoreError::InvalidCursorName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks what [`Store::advance_cursor`] is given and returns the sequence
/// as the durable stores keep it: the name as [`check_cursor_name`] does,
/// and a sequence no sequence column can exceed (`i64::MAX`; the log never
/// gets there).
fn stored_cursor(name: &str, sequence: u64) -> Result<i64> {
    check_cursor_name(name)?;
    i64::try_from(sequence).map_err(|_| {
        StoreError::Corrupt(format!(
            "cursor {name:?}: sequence {sequence} is beyond the log's range"
        ))
    })
}

/// A name and labels: what an agent is created with and keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentIdentity {
    /// Display name.
    pub name: Arc<str>,
    /// Labels.
    pub labels: Arc<Labels>,
}

/// One agent's change in a commit batch: the records that lead from its
/// prior version to the new one, in order.
///
/// The records' `sequence` and `at` are placeholders until [`Store::commit`]
/// assigns them; every other field is final.
#[derive(Clone, Debug)]
pub struct AgentChange {
    /// The agent.
    pub agent_id: AgentId,
    /// The version the change is based on; 0 creates the agent.
    pub prior_version: u64,
    /// Name and labels, for a creation (`prior_version == 0`).
    pub identity: Option<AgentIdentity>,
    /// The transitions, in order; versions `prior_version + 1 ..`. Shared:
    /// a store that keeps records in memory keeps these, and the agent table
    /// and the event bus get the same ones once committed. A store sets
    /// their sequence and time through `Arc::make_mut`, which copies nothing
    /// while the change is the only holder, as it is until committed.
    pub records: Vec<Arc<TransitionRecord>>,
}

/// What became of one change of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// Stored; its records carry their sequences and commit time.
    Committed,
    /// Refused: the agent's stored version is `actual` (0: no such agent),
    /// not the change's prior version. Nothing of the change was stored.
    Conflict {
        /// The version found.
        actual: u64,
    },
}

/// Identifies one commit attempt, so that after a failed commit the writer
/// can ask whether it reached the store after all (see
/// [`Store::batch_committed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchId(pub u64);

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

    /// What this retention lets compaction delete when the head is `head`
    /// and the time is `clock`'s (read only when there is a `max_age`);
    /// `None` when it keeps everything. Every back end's compaction starts
    /// here.
    fn bounds(&self, head: u64, clock: &dyn Clock) -> Option<RetentionBounds> {
        if self.keeps_everything() {
            return None;
        }
        Some(RetentionBounds {
            through: self.max_events.map_or(0, |n| head.saturating_sub(n)),
            before: self.max_age.map(|age| {
                clock
                    .now()
                    .checked_sub(age)
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            }),
        })
    }
}

/// The events [`Retention`] lets go at one moment: those at or below
/// `through`, and those committed before `before`. Compaction deletes only
/// the oldest of them that form a prefix of the log, so that what remains
/// is one contiguous range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RetentionBounds {
    /// The newest sequence that `max_events` lets go (0: none).
    through: u64,
    /// Events committed before this time go (`None`: no `max_age`).
    before: Option<SystemTime>,
}

impl RetentionBounds {
    /// Whether an event with `sequence` committed `at` may go.
    fn lets_go(&self, sequence: u64, at: SystemTime) -> bool {
        sequence <= self.through || self.before.is_some_and(|before| at < before)
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

/// Wakes a follower when other processes commit.
pub trait CommitFeed: Send {
    /// Blocks until a commit is announced or `timeout` passes. Spurious
    /// wake-ups are allowed.
    ///
    /// # Errors
    /// The feed's connection failed; open a new feed.
    fn wait(&mut self, timeout: Duration) -> Result<Wake>;
}

/// What woke a [`CommitFeed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Nothing was announced within the timeout.
    TimedOut,
    /// Only this process's own commits were announced: nothing to read.
    OwnOnly,
    /// Other processes committed, up to this sequence (`u64::MAX` when an
    /// announcement did not say).
    Others(u64),
}

/// What [`Store::heartbeats_saved_after`] read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SavedHeartbeats {
    /// Each agent's heartbeat as the store keeps it.
    pub beats: Vec<(AgentId, Heartbeat)>,
    /// The number of the last save included.
    pub through: u64,
}

/// A held lease; dropping it releases it.
pub trait Lease: Send {
    /// Whether the lease is still held (its connection is alive).
    fn is_held(&mut self) -> bool;
}

/// The lease of a store that only this process writes.
#[derive(Debug)]
struct LocalLease;

impl Lease for LocalLease {
    fn is_held(&mut self) -> bool {
        true
    }
}

/// Which records an audit query wants: newest first, below `before`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only this agent's records.
    pub agent_id: Option<AgentId>,
    /// Only the records this principal made ("" for the unauthenticated).
    pub principal: Option<String>,
    /// Only records with `sequence < before`.
    pub before: u64,
    /// At most this many.
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

    /// Commits `batch` in one transaction (one fsync in the durable
    /// stores). Inside it, each change whose prior version matches the
    /// stored one is written; the records of the written changes get the
    /// next global sequences (contiguous, in batch order) and one commit
    /// time read from `clock`, both written into `batch`. Returns one outcome
    /// per change, in order.
    ///
    /// # Errors
    /// On any error nothing of the batch is stored, unless the error came
    /// from the commit itself, in which case [`Store::batch_committed`]
    /// tells.
    fn commit(
        &self,
        id: BatchId,
        batch: &mut [AgentChange],
        clock: &dyn Clock,
    ) -> Result<Vec<ChangeOutcome>>;

    /// Called by the commit thread when a proposal arrives, before it
    /// gathers the batch behind it. A store whose commits from several
    /// processes take turns waits here for this process's turn, so that
    /// what queues while the others commit joins the batch; the next
    /// [`Store::commit`] uses the turn. Default: no turns, nothing to wait
    /// for.
    ///
    /// # Errors
    /// The back end failed (the commit then tries on its own).
    fn take_commit_turn(&self) -> Result<()> {
        Ok(())
    }

    /// Does the work the store put off while commits kept coming. The
    /// service's commit thread calls it once no proposal has arrived for a
    /// moment after a commit; nothing committed changes, so a failure is
    /// only logged. The SQLite store indexes its log's tail here, so that
    /// reads by agent and by principal on a quiet file read no tail. The
    /// default does nothing.
    ///
    /// # Errors
    /// The back end failed.
    fn settle(&self) -> Result<()> {
        Ok(())
    }

    /// Ends a turn taken by [`Store::take_commit_turn`] that no commit used
    /// (the batch was refused before it reached the store). Does nothing
    /// when no turn is open.
    ///
    /// # Errors
    /// The back end failed.
    fn end_commit_turn(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the batch `id` was committed, read from the store itself:
    /// after a failed commit it tells whether the batch was rolled back.
    ///
    /// # Errors
    /// The back end failed.
    fn batch_committed(&self, id: BatchId) -> Result<bool>;

    /// Whether a commit is a short computation in memory (no I/O, no
    /// waiting): the service then commits each change on the proposer's
    /// own thread, under the writer's lock, instead of handing it to the
    /// commit thread and waiting to be woken. Stores that write to disk or
    /// to a network answer `false`, so that their commits are batched and
    /// never block the async workers.
    fn commits_in_memory(&self) -> bool {
        false
    }

    /// Whether other processes may commit to this store too (PostgreSQL).
    /// A shared store's log must be followed: the service applies events
    /// committed elsewhere, and its background work runs under a lease.
    fn is_shared(&self) -> bool {
        false
    }

    /// The newest committed sequence, read from the store itself (0 when
    /// empty).
    ///
    /// # Errors
    /// The back end failed.
    fn head(&self) -> Result<u64>;

    /// The name and labels of each agent of `ids` the store holds (what a
    /// follower needs to apply a registration committed elsewhere).
    ///
    /// # Errors
    /// The back end failed.
    fn identities(&self, ids: &[AgentId]) -> Result<Vec<(AgentId, AgentIdentity)>>;

    /// A feed that wakes when another process commits; `None` for a store
    /// that only this process writes.
    ///
    /// # Errors
    /// The back end failed.
    fn commit_feed(&self) -> Result<Option<Box<dyn CommitFeed>>> {
        Ok(None)
    }

    /// Tries to take the lease `name` for background work that must run in
    /// one process at a time. `None`: another process holds it. A store that
    /// only this process writes always grants it.
    ///
    /// # Errors
    /// The back end failed.
    fn try_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>> {
        let _ = name;
        Ok(Some(Box::new(LocalLease)))
    }

    /// Keeps each agent's newest heartbeat of `beats` where every process
    /// sees it (an older one than the stored one changes nothing). A store
    /// that only this process uses keeps none: the process's own heartbeats
    /// are the whole truth there.
    ///
    /// # Errors
    /// The back end failed.
    fn save_heartbeats(&self, beats: &[(AgentId, Heartbeat)]) -> Result<()> {
        let _ = beats;
        Ok(())
    }

    /// The heartbeats [`Store::save_heartbeats`] kept of the agents `ids`.
    ///
    /// # Errors
    /// The back end failed.
    fn heartbeats(&self, ids: &[AgentId]) -> Result<Vec<(AgentId, Heartbeat)>> {
        let _ = ids;
        Ok(Vec::new())
    }

    /// The heartbeats that saves after the save numbered `after` kept (all
    /// of them for 0), and the number of the last save they include: the
    /// `after` of the next call, which then returns only what was saved
    /// since. Saves are numbered in the order they commit, so nothing
    /// saved before that number is left out.
    ///
    /// # Errors
    /// The back end failed.
    fn heartbeats_saved_after(&self, after: u64) -> Result<SavedHeartbeats> {
        Ok(SavedHeartbeats {
            beats: Vec::new(),
            through: after,
        })
    }

    /// The sequence up to which the consumer `name` has handled the event
    /// log (a platform driver, a notifier), as [`Store::advance_cursor`]
    /// last recorded it; 0 when it never advanced. Cursors are independent
    /// of retention: compaction never changes them, so a cursor may point
    /// below [`Store::oldest_sequence`].
    ///
    /// # Errors
    /// [`StoreError::InvalidCursorName`] for a name that is empty or longer
    /// than [`MAX_CURSOR_NAME_BYTES`]; otherwise the back end failed.
    fn cursor(&self, name: &str) -> Result<u64>;

    /// Records that the consumer `name` has handled the log up to
    /// `sequence`, durably before it returns (as a commit is), where every
    /// process sharing the store sees it. A cursor never moves backwards:
    /// a `sequence` below the stored one leaves the stored one, without an
    /// error, so a consumer that resumes from an older position after a
    /// failover cannot undo another's progress.
    ///
    /// # Errors
    /// [`StoreError::InvalidCursorName`] for a name that is empty or longer
    /// than [`MAX_CURSOR_NAME_BYTES`]; otherwise the back end failed and
    /// the stored cursor is unchanged.
    fn advance_cursor(&self, name: &str, sequence: u64) -> Result<()>;

    /// Up to `max` events with `sequence > after`, in sequence order.
    ///
    /// # Errors
    /// The back end failed.
    fn events_after(&self, after: u64, max: usize) -> Result<Vec<Arc<TransitionRecord>>>;

    /// The oldest sequence still retained; `head + 1` when the log is empty.
    ///
    /// # Errors
    /// The back end failed.
    fn oldest_sequence(&self) -> Result<u64>;

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

    /// The retained records made for a client `request_id` (those with a
    /// request tag) committed at or after `since`, in sequence order: what
    /// the service needs to recognise retries after a restart.
    ///
    /// # Errors
    /// The back end failed.
    fn requests_since(&self, since: std::time::SystemTime) -> Result<Vec<Arc<TransitionRecord>>>;

    /// The store's size in bytes, when it has one (files or a database).
    ///
    /// # Errors
    /// The back end failed.
    fn size_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// The retained records `query` selects, newest first.
    ///
    /// # Errors
    /// The back end failed.
    fn audit(&self, query: &AuditQuery) -> Result<Vec<Arc<TransitionRecord>>>;

    /// How many records of the agent are retained.
    ///
    /// # Errors
    /// The back end failed.
    fn history_count(&self, agent_id: AgentId) -> Result<u64>;

    /// Deletes up to `max_rows` of the oldest events that `retention` lets
    /// go, given the current `head` and time (`clock`). Returns how many
    /// were deleted.
    ///
    /// # Errors
    /// The back end failed; nothing was deleted.
    fn compact(
        &self,
        retention: &Retention,
        head: u64,
        max_rows: usize,
        clock: &dyn Clock,
    ) -> Result<usize>;

    /// Makes everything committed durable and releases resources.
    ///
    /// # Errors
    /// The back end failed.
    fn close(&self) -> Result<()>;
}

#[cfg(test)]
mod conformance;
