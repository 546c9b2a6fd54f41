//! The event log's writing side: this process's commits, the events other
//! processes commit to a shared store, and retention.
//!
//! One thread, the commit thread, is the only writer of the store and of the
//! agent table. Every committed record reaches the table and the broadcast
//! channel through one step, [`Publication`]: [`Publication::apply`] enters
//! a record into the table (under the table's write lock) and builds its
//! event; [`Publication::publish`] sends the events, in sequence order, once
//! that lock is released. This process's batches (`commit`) and the events
//! followed from other processes (`follow`) both go through it, on the
//! commit thread, so:
//! - an event is published only after its record is committed and in the
//!   table;
//! - events are published in one global order, by sequence;
//! - no event is published twice (a record at or below the table's head is
//!   not entered again) and none is skipped (a gap in the log is an error);
//! - a watcher resuming after sequence N reads from the store exactly the
//!   events the bus carried after N.
//!
//! # Layout
//! - `commit`: the commit thread, its messages and the [`Writer`]; the
//!   numbered steps of a batch.
//! - `batch`: one batch through those steps.
//! - `follow`: reading other processes' commits from a shared store, and the
//!   follower thread that asks for it.
//! - `compaction`: retention, in bounded chunks, on its timer.
//!
//! This module knows the store, the table and the bus; it must not depend on
//! the write path's callers (`write`), on watchers, or on anything above the
//! service.

mod batch;
mod commit;
mod compaction;
mod follow;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use tokio::sync::{broadcast, oneshot};

pub(crate) use self::commit::{Committed, Proposal, Rejected, Step};
use self::{
    batch::Answering,
    commit::{Message, Settings, Writer},
};
use super::{ServiceConfig, Shared, metrics::Metrics, table::Table};
use crate::service::PublishedEvent;
use crate::{
    domain::{Agent, LifecycleEvent, TransitionRecord},
    error::{Error, Result},
    store::AgentIdentity,
};

/// The events of records entered into the agent table, waiting to be
/// published: the one place events are built and sent.
///
/// Built while the caller holds the table's write lock, published after it
/// released it (nobody waits on the bus while the table is locked).
#[derive(Debug, Default)]
pub(crate) struct Publication {
    events: Vec<Arc<PublishedEvent>>,
}

impl Publication {
    /// Room for `n` events.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Publication {
            events: Vec::with_capacity(n),
        }
    }

    /// Applies one committed `record` to `table` and keeps its event; returns
    /// the agent after it, or `None` when the record does not apply (see
    /// [`Table::apply`]), which callers treat as a broken invariant.
    pub(crate) fn apply(
        &mut self,
        table: &mut Table,
        record: Arc<TransitionRecord>,
        identity: Option<&AgentIdentity>,
        metrics: &Metrics,
    ) -> Option<&Arc<Agent>> {
        let agent = table.apply(Arc::clone(&record), identity, metrics)?;
        self.events
            .push(Arc::new(PublishedEvent::new(LifecycleEvent::new(
                record, agent,
            ))));
        self.events.last().map(|event| &event.agent)
    }

    /// Sends every event on `bus`, in the order they were applied (sequence
    /// order). No receivers is fine: nobody is watching.
    pub(crate) fn publish(self, bus: &broadcast::Sender<Arc<PublishedEvent>>) {
        for event in self.events {
            let _ = bus.send(event);
        }
    }
}

/// The running log: the way to the commit thread, and the threads and tasks
/// that work beside it.
pub(crate) struct Log {
    /// To the commit thread. Unbounded, but every message has a caller
    /// waiting for its reply, so the queue is bounded by in-flight requests
    /// (which the server caps per connection).
    commits: mpsc::Sender<Message>,
    /// The writer, when the store commits in memory: proposers commit
    /// their own changes under its lock (see [`Writer`]). The commit thread
    /// still closes the store and runs compaction, taking the same lock.
    inline_writer: Option<Arc<Mutex<Writer>>>,
    commit_thread: Mutex<Option<JoinHandle<()>>>,
    /// The compaction timer, when retention is configured.
    compactor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Tells the follower thread (shared stores) to stop.
    stop_following: Arc<AtomicBool>,
}

impl Drop for Log {
    fn drop(&mut self) {
        self.stop_following.store(true, Ordering::Release);
    }
}

impl Log {
    /// Starts the commit thread, the compaction timer when retention is
    /// configured (on `shared.runtime`), and the follower thread on a shared
    /// store.
    ///
    /// # Errors
    /// A thread cannot be started.
    pub(crate) fn start(shared: &Arc<Shared>, config: &ServiceConfig) -> Result<Self> {
        let (commits, rx) = mpsc::channel();
        let writer = Arc::new(Mutex::new(Writer::new(Settings {
            max_batch: config.max_batch.max(1),
            retention: config.retention,
        })));
        let inline_writer = shared
            .store
            .commits_in_memory()
            .then(|| Arc::clone(&writer));
        let thread_shared = Arc::clone(shared);
        let thread = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || commit::run(thread_shared, rx, writer))
            .map_err(Error::Spawn)?;
        let compactor = compaction::start_timer(shared, config, &commits);
        let stop_following = Arc::new(AtomicBool::new(false));
        if shared.store.is_shared() {
            follow::start_follower(shared, &commits, &stop_following)?;
        }
        Ok(Log {
            commits,
            inline_writer,
            commit_thread: Mutex::new(Some(thread)),
            compactor: Mutex::new(compactor),
            stop_following,
        })
    }

    /// Commits one validated change and returns what it produced: on the
    /// caller's thread when the store commits in memory, otherwise through
    /// the commit thread, batched with whatever else is queued.
    pub(crate) async fn commit(
        &self,
        shared: &Shared,
        proposal: Proposal,
    ) -> Result<Committed, Rejected> {
        let (tx, mut rx) = oneshot::channel();
        if let Some(writer) = self.inline_writer.as_deref() {
            // Answered before `commit` returns.
            commit::lock(writer).commit(shared, std::iter::once((proposal, tx)), Answering::Here);
            return rx.try_recv().unwrap_or(Err(Rejected::Closed));
        }
        if self.commits.send(Message::Propose(proposal, tx)).is_err() {
            return Err(Rejected::Closed);
        }
        rx.await.unwrap_or(Err(Rejected::Closed))
    }

    /// Has the commit thread apply whatever other processes committed (see
    /// `follow`), and waits until it did.
    ///
    /// # Errors
    /// The store's log cannot be read, or the service is closed.
    pub(crate) async fn follow_now(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commits
            .send(Message::Follow(tx))
            .map_err(|_| Error::ShuttingDown)?;
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(Error::Store(err)),
            Err(_) => Err(Error::ShuttingDown),
        }
    }

    /// Runs a compaction round to completion and returns the events deleted.
    ///
    /// # Errors
    /// The store failed, or the service is closed.
    pub(crate) async fn compact_now(&self) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.commits
            .send(Message::Compact(tx))
            .map_err(|_| Error::ShuttingDown)?;
        match rx.await {
            Ok(result) => result.map_err(Error::Store),
            Err(_) => Err(Error::ShuttingDown),
        }
    }

    /// Stops the follower and the compaction timer, has the commit thread
    /// commit what is queued and close the store, and waits for it to end.
    ///
    /// # Errors
    /// The store failed to close.
    pub(crate) async fn close(&self) -> Result<()> {
        self.stop_following.store(true, Ordering::Release);
        let compactor = self
            .compactor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(compactor) = compactor {
            // Wait until the task is gone: it owns a lease (a database
            // connection on a shared store), released with it.
            compactor.abort();
            let _ = compactor.await;
        }
        let (tx, rx) = oneshot::channel();
        if self.commits.send(Message::Close(tx)).is_ok()
            && let Ok(result) = rx.await
        {
            result.map_err(Error::Store)?;
        }
        let thread = self
            .commit_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }
}
