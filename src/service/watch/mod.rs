//! Event streams: replay or snapshot, then live, with progress messages.
//!
//! A [`Watcher`] subscribes to the broadcast channel *before* it reads the
//! log or the table, then tracks `last_seen`, the sequence up to which every
//! event has been considered: catch-up pages come from the store, live
//! events from the channel, and anything at or below `last_seen` is skipped,
//! so the seam has no gap and no duplicate. When the channel reports that
//! the watcher lagged, it catches up from the store again (etcd's
//! unsynced -> synced). Events that retention deleted end the stream with
//! [`Error::SequenceCompacted`]. A watcher holds no task of its own:
//! dropping it cancels it.
//!
//! A watcher reads the table, the bus and the store's log; it must not
//! depend on the write path or the commit thread (it only sees what they
//! publish).

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{broadcast, watch},
    time::Instant,
};
use tracing::{debug, warn};

use super::Shared;
use crate::service::PublishedEvent;
use crate::{
    domain::{
        Agent, AgentId, AgentState, EventKind, FieldViolation, Labels, LifecycleEvent, StateSet,
        limits,
    },
    error::{Error, Result},
};

/// Events read from the store per catch-up step.
const CATCH_UP_PAGE: usize = 512;

/// What to watch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WatchRequest {
    /// Only these agents (empty: all).
    pub agent_ids: Vec<AgentId>,
    /// Only events into these states; for the snapshot, agents in them.
    pub states: Vec<AgentState>,
    /// Only these kinds of event.
    pub kinds: Vec<EventKind>,
    /// Only agents carrying all these labels.
    pub labels: Labels,
    /// 0: live only. N > 0: every event from N on, then live.
    pub start_sequence: u64,
    /// Snapshot of the matching agents first, then live.
    pub include_snapshot: bool,
}

/// One item of the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchItem {
    /// A committed event.
    Event(Arc<PublishedEvent>),
    /// The stream is idle; every matching event up to `head_sequence` has
    /// been delivered.
    Progress {
        /// Resume point minus one.
        head_sequence: u64,
    },
    /// One agent of the snapshot.
    SnapshotAgent(Arc<Agent>),
    /// The snapshot showed every matching agent as of `head_sequence`.
    SnapshotComplete {
        /// Events after it follow.
        head_sequence: u64,
        /// Agents in the snapshot.
        agent_count: u64,
    },
}

#[derive(Debug)]
struct Filter {
    agent_ids: HashSet<AgentId>,
    states: StateSet,
    /// Deduplicated: at most one entry per kind.
    kinds: Vec<EventKind>,
    labels: Labels,
}

impl Filter {
    fn matches_agent(&self, agent: &Agent) -> bool {
        (self.agent_ids.is_empty() || self.agent_ids.contains(&agent.id))
            && self.states.matches(agent.state)
            && agent.has_labels(&self.labels)
    }

    fn matches_event(&self, event: &LifecycleEvent) -> bool {
        (self.agent_ids.is_empty() || self.agent_ids.contains(&event.record.agent_id))
            && self.states.matches(event.record.to)
            && (self.kinds.is_empty() || self.kinds.contains(&event.kind()))
            && event.agent.has_labels(&self.labels)
    }
}

impl Filter {
    fn new(request: WatchRequest) -> Self {
        let mut kinds = request.kinds;
        kinds.sort_by_key(|k| *k == EventKind::Transitioned);
        kinds.dedup();
        Filter {
            agent_ids: request.agent_ids.into_iter().collect(),
            states: request.states.into_iter().collect(),
            kinds,
            labels: request.labels,
        }
    }
}

/// The request's own limits and combinations.
fn check(request: &WatchRequest) -> Result<()> {
    if request.agent_ids.len() > limits::MAX_FILTER_IDS {
        return Err(FieldViolation::new(
            "agent_ids",
            format!(
                "{} ids, at most {} allowed",
                request.agent_ids.len(),
                limits::MAX_FILTER_IDS
            ),
        )
        .into());
    }
    limits::check_labels("labels", &request.labels)?;
    if request.include_snapshot && request.start_sequence > 0 {
        return Err(FieldViolation::new(
            "include_snapshot",
            "cannot be combined with start_sequence; a snapshot is followed by live events",
        )
        .into());
    }
    Ok(())
}

/// Queues the matching agents and the snapshot's end into `pending`, under
/// one read of the table; returns the head the snapshot shows.
fn snapshot(shared: &Shared, filter: &Filter, pending: &mut VecDeque<WatchItem>) -> u64 {
    let table = shared.read_table();
    for slot in table.agents.values() {
        if filter.matches_agent(&slot.agent) {
            pending.push_back(WatchItem::SnapshotAgent(Arc::clone(&slot.agent)));
        }
    }
    pending.push_back(WatchItem::SnapshotComplete {
        head_sequence: table.head,
        agent_count: pending.len() as u64,
    });
    table.head
}

/// Whether a stream may start at `start` (> 0): written, and not compacted.
///
/// # Errors
/// [`Error::SequenceNotYetWritten`], [`Error::SequenceCompacted`], or a
/// store failure.
async fn check_start(shared: &Shared, start: u64) -> Result<()> {
    let head = shared.head();
    if start > head + 1 {
        return Err(Error::SequenceNotYetWritten {
            requested: start,
            head,
        });
    }
    let oldest = shared.read_store(|store| store.oldest_sequence()).await?;
    if start < oldest {
        return Err(Error::SequenceCompacted {
            requested: start,
            oldest,
        });
    }
    Ok(())
}

/// An open event stream. Pull items with [`Watcher::next`].
pub struct Watcher {
    shared: Arc<Shared>,
    filter: Filter,
    /// Subscribed before anything was read; bounded by the bus capacity.
    rx: broadcast::Receiver<Arc<PublishedEvent>>,
    /// Every event with a sequence up to this one has been considered.
    last_seen: u64,
    /// Items ready to hand out (snapshot agents, one catch-up page).
    pending: VecDeque<WatchItem>,
    /// Read the store before the channel.
    catching_up: bool,
    progress_interval: Duration,
    /// The end of the current progress interval: the stream's clock ticks
    /// once per interval, and an interval with nothing delivered ends with
    /// a progress message.
    idle_deadline: Instant,
    /// Something was delivered in the current interval.
    delivered: bool,
    /// `true` once shutdown began. Subscribed at open, when it was still
    /// `false`, so any change since means shutdown (see `shutting_down`).
    shutdown: watch::Receiver<bool>,
    finished: bool,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shared.metrics.watch_closed();
    }
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("filter", &self.filter)
            .field("last_seen", &self.last_seen)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Opens a stream for `request`: subscribes to the bus first, then
    /// takes the snapshot or checks the start sequence against the log.
    ///
    /// # Errors
    /// A bad combination of options, [`Error::ShuttingDown`],
    /// [`Error::SequenceNotYetWritten`], [`Error::SequenceCompacted`], or a
    /// store failure.
    pub(crate) async fn open(
        shared: Arc<Shared>,
        request: WatchRequest,
        progress_interval: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self> {
        check(&request)?;
        if *shutdown.borrow() {
            return Err(Error::ShuttingDown);
        }
        let progress_interval = progress_interval.max(Duration::from_millis(10));
        let (start_sequence, include_snapshot) = (request.start_sequence, request.include_snapshot);
        let filter = Filter::new(request);
        let rx = shared.bus.subscribe();
        let mut pending = VecDeque::new();
        let mut catching_up = false;
        let last_seen = if include_snapshot {
            snapshot(&shared, &filter, &mut pending)
        } else if start_sequence == 0 {
            shared.head()
        } else {
            check_start(&shared, start_sequence).await?;
            catching_up = true;
            start_sequence - 1
        };
        shared.metrics.watch_opened();
        Ok(Watcher {
            shared,
            filter,
            rx,
            last_seen,
            pending,
            catching_up,
            progress_interval,
            idle_deadline: Instant::now() + progress_interval,
            delivered: false,
            shutdown,
            finished: false,
        })
    }

    /// Every event up to this sequence has been considered.
    pub fn last_seen(&self) -> u64 {
        self.last_seen
    }

    fn fail(&mut self, err: Error) -> Option<Result<WatchItem>> {
        self.finished = true;
        let reason = match &err {
            Error::ShuttingDown => "shutdown",
            Error::SequenceCompacted { .. } => "compacted",
            _ => "failed",
        };
        self.shared.metrics.watch_ended(reason);
        Some(Err(err))
    }

    /// A live event: the item to deliver, or `None` for one already sent
    /// or filtered out.
    fn accept(&mut self, event: Arc<PublishedEvent>) -> Option<WatchItem> {
        if event.sequence() <= self.last_seen {
            return None;
        }
        self.last_seen = event.sequence();
        self.filter
            .matches_event(&event)
            .then_some(WatchItem::Event(event))
    }

    /// The broadcast buffer overtook this watcher: backfill from the log.
    fn lagged(&mut self, missed: u64) {
        warn!(
            missed,
            last_seen = self.last_seen,
            "watcher fell behind; backfilling from the event log"
        );
        self.shared.metrics.watch_backfilled();
        self.catching_up = true;
    }

    /// Hands out `item`. Only marks the interval as busy: reading the
    /// clock for every event would cost more than the event's delivery
    /// otherwise does here.
    fn deliver(&mut self, item: WatchItem) -> Option<Result<WatchItem>> {
        self.delivered = true;
        Some(Ok(item))
    }

    /// Whether shutdown began since this watcher opened (the channel only
    /// ever changes to `true`). Reads the channel's version, one atomic
    /// load; `borrow` would take the channel's lock, which every watcher
    /// shares, once per event.
    fn shutting_down(&self) -> bool {
        self.shutdown
            .has_changed()
            .map_or(true, |changed| changed && *self.shutdown.borrow())
    }

    /// The next item if one is ready without waiting: `Some(item)` (the
    /// stream's next item, `None` once it ended), or `None` when the stream
    /// has to wait, for the channel, the clock or a catch-up read from the
    /// store. A stream polls this first, so an event already waiting costs
    /// no future; [`Watcher::next`] starts with the same step.
    pub fn try_next(&mut self) -> Option<Option<Result<WatchItem>>> {
        if self.finished {
            return Some(None);
        }
        loop {
            if self.shutting_down() {
                return Some(self.fail(Error::ShuttingDown));
            }
            if let Some(item) = self.pending.pop_front() {
                return Some(self.deliver(item));
            }
            if self.catching_up {
                return None;
            }
            // An event already waiting is taken without the select of
            // `wait`, which would register a timer and a shutdown waiter
            // (on a channel every watcher shares) only to drop them again.
            match self.rx.try_recv() {
                Ok(event) => {
                    if let Some(item) = self.accept(event) {
                        return Some(self.deliver(item));
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(missed)) => self.lagged(missed),
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Some(self.fail(Error::ShuttingDown));
                }
                Err(broadcast::error::TryRecvError::Empty) => return None,
            }
        }
    }

    /// The next item; `None` after the stream ended. Ends with
    /// [`Error::ShuttingDown`] on shutdown and [`Error::SequenceCompacted`]
    /// when needed events are gone.
    pub async fn next(&mut self) -> Option<Result<WatchItem>> {
        loop {
            if let Some(item) = self.try_next() {
                return item;
            }
            if let Some(item) = self.wait().await {
                return item;
            }
        }
    }

    /// The waiting half of [`Watcher::next`], for a caller whose
    /// [`Watcher::try_next`] just came back empty: one catch-up read, or
    /// the channel, the progress clock or shutdown. `Some(item)` as
    /// `try_next`; `None` when `try_next` has more to take.
    pub async fn wait(&mut self) -> Option<Option<Result<WatchItem>>> {
        if self.catching_up {
            // Boxed: the read's future is large, and the future of a wait
            // would carry it every time.
            return match Box::pin(self.catch_up_page()).await {
                Ok(()) => None,
                Err(err) => Some(self.fail(err)),
            };
        }
        tokio::select! {
            biased;
            changed = self.shutdown.changed() => {
                (changed.is_err() || *self.shutdown.borrow())
                    .then(|| self.fail(Error::ShuttingDown))
            }
            received = self.rx.recv() => match received {
                Ok(event) => self.accept(event).map(|item| self.deliver(item)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    self.lagged(missed);
                    None
                }
                Err(broadcast::error::RecvError::Closed) => Some(self.fail(Error::ShuttingDown)),
            },
            () = tokio::time::sleep_until(self.idle_deadline) => {
                self.idle_deadline = Instant::now() + self.progress_interval;
                (!std::mem::take(&mut self.delivered)).then(|| {
                    Some(Ok(WatchItem::Progress { head_sequence: self.last_seen }))
                })
            }
        }
    }

    /// Reads one page after `last_seen` from the store into `pending`;
    /// leaves catch-up when the store has nothing more.
    async fn catch_up_page(&mut self) -> Result<()> {
        let after = self.last_seen;
        // Read the head first: the table's head never runs ahead of the
        // store, so every event up to it must come back from the read.
        let head = self.shared.head();
        let records = self
            .shared
            .read_store(move |store| store.events_after(after, CATCH_UP_PAGE))
            .await?;
        let contiguous = records
            .first()
            .map_or(after >= head, |r| r.sequence == after + 1);
        if !contiguous {
            return Err(Error::SequenceCompacted {
                requested: after + 1,
                oldest: self
                    .shared
                    .read_store(|store| store.oldest_sequence())
                    .await?,
            });
        }
        // Records past `head` may be committed but not yet in the table (an
        // agent registered by them has no slot yet); they reach this watcher
        // on the bus, so catch-up stops at `head`.
        let records: Vec<_> = records
            .into_iter()
            .take_while(|r| r.sequence <= head)
            .collect();
        if records.is_empty() {
            debug!(last_seen = after, "watcher caught up");
            self.catching_up = false;
            return Ok(());
        }
        let table = self.shared.read_table();
        for record in records {
            self.last_seen = record.sequence;
            let Some(slot) = table.agents.get(&record.agent_id) else {
                continue;
            };
            // The agent as it was right after this record: its identity,
            // name and labels never change, the rest comes from the record.
            let agent = Arc::new(slot.agent.after(Arc::clone(&record)));
            let event = LifecycleEvent::new(record, agent);
            if self.filter.matches_event(&event) {
                self.pending
                    .push_back(WatchItem::Event(Arc::new(PublishedEvent::new(event))));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
