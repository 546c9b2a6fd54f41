//! Following the log: applying to the agent table, and publishing, the
//! events that other processes committed to a shared store.
//!
//! On a store only this process writes there is nothing to follow, except
//! after a failed commit, when reading the log tells what of the batch
//! reached the store. On a shared store (PostgreSQL) the follower thread
//! wakes on other processes' commits (LISTEN/NOTIFY, or every
//! [`FOLLOW_INTERVAL`]) and asks the commit thread to follow; a batch of
//! this process follows what precedes it before it is applied; and reads
//! that must see every commit ask first (`catch_up_with_store`).
//!
//! Following runs only on the commit thread (or under the writer's lock),
//! and enters records through [`Publication`], so followed events share
//! the table's one order with this process's own.
//!
//! Must not depend on the write path or on watchers.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tracing::warn;

use super::{Publication, commit::Message};
use crate::{
    domain::{AgentId, TransitionRecord},
    error::{Error, Result},
    service::Shared,
    store::{AgentIdentity, StoreError, Wake},
};

/// Events read from the log per step when following other processes.
const FOLLOW_PAGE: usize = 1_000;

/// How long the follower waits for a notification before reading the log
/// anyway (in case a notification was lost).
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// Where a caller of `Message::Follow` waits for the table's new head.
pub(super) type Done = oneshot::Sender<Result<u64, Arc<StoreError>>>;

/// Follows the log to its end for queued `Follow` and `Announced`
/// messages and answers each caller that waits.
pub(super) fn answer(shared: &Shared, waiting: Vec<Done>) {
    let result = apply_until(shared, u64::MAX).map_err(Arc::new);
    if let Err(err) = &result {
        warn!(error = %crate::error::chain(&**err), "reading commits of other processes failed");
    }
    for done in waiting {
        let _ = done.send(result.clone());
    }
}

/// Applies events of the log after the table's head and before
/// `stop_before` (`u64::MAX`: to the log's end), in sequence order, and
/// publishes them. Returns the table's new head.
///
/// # Errors
/// The log could not be read, or it has a gap (events compacted before this
/// process applied them).
pub(super) fn apply_until(shared: &Shared, stop_before: u64) -> Result<u64, StoreError> {
    // The head read after an empty page: the events up to it are
    // committed, so the next read of the log must return them.
    let mut seen_head: Option<u64> = None;
    loop {
        let after = shared.head();
        if after.saturating_add(1) >= stop_before {
            return Ok(after);
        }
        let page = shared.store.events_after(after, FOLLOW_PAGE)?;
        // A short page is the end of the log as of the read: no need to ask
        // again.
        let last_page = page.len() < FOLLOW_PAGE;
        let records: Vec<_> = page
            .into_iter()
            .take_while(|r| r.sequence < stop_before)
            .collect();
        let Some(first) = records.first() else {
            // Nothing to apply: either the log ends here, or the events
            // after `after` are gone (compacted before this process applied
            // them), which must not pass for "nothing happened".
            // The page and the head are two reads: a commit landing between
            // them is read on the next turn, not taken for a gap.
            let missing = if stop_before == u64::MAX {
                let head = shared.store.head()?;
                if head > after && seen_head.is_none_or(|seen| seen <= after) {
                    seen_head = Some(head);
                    continue;
                }
                head > after
            } else {
                true
            };
            if missing {
                return Err(StoreError::Corrupt(format!(
                    "the event log has no events after {after} although more were committed: \
                     they were compacted before this process applied them; restart it"
                )));
            }
            return Ok(after);
        };
        if first.sequence != after + 1 {
            return Err(StoreError::Corrupt(format!(
                "the event log continues at {} after {after}: events were compacted before this process applied them; restart it",
                first.sequence
            )));
        }
        apply_page(shared, records)?;
        if last_page {
            return Ok(shared.head());
        }
    }
}

/// Applies one contiguous page of the log to the table, under one write
/// lock, then publishes its events.
///
/// # Errors
/// The store cannot give the identities of agents the page registers, or a
/// record does not apply to the table.
fn apply_page(shared: &Shared, records: Vec<Arc<TransitionRecord>>) -> Result<(), StoreError> {
    let identities = registered_identities(shared, &records)?;
    let mut publication = Publication::with_capacity(records.len());
    {
        let mut table = shared.write_table();
        for record in records {
            if record.sequence <= table.head {
                continue;
            }
            let (sequence, agent_id) = (record.sequence, record.agent_id);
            let identity = identities.get(&agent_id);
            if publication
                .apply(&mut table, record, identity, &shared.metrics)
                .is_none()
            {
                return Err(StoreError::Corrupt(format!(
                    "event {sequence} of agent {agent_id} does not apply to the table"
                )));
            }
        }
        shared.metrics.set_head(table.head);
    }
    publication.publish(&shared.bus);
    Ok(())
}

/// The name and labels of the agents `records` register (a registration
/// committed elsewhere carries no identity in its record).
fn registered_identities(
    shared: &Shared,
    records: &[Arc<TransitionRecord>],
) -> Result<HashMap<AgentId, AgentIdentity>, StoreError> {
    let created: Vec<AgentId> = records
        .iter()
        .filter(|r| r.from.is_none())
        .map(|r| r.agent_id)
        .collect();
    if created.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(shared.store.identities(&created)?.into_iter().collect())
}

/// Starts the follower thread of a shared store.
///
/// # Errors
/// The thread cannot be started.
pub(super) fn start_follower(
    shared: &Arc<Shared>,
    commits: &mpsc::Sender<Message>,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    let shared = Arc::clone(shared);
    let commits = commits.clone();
    let stop = Arc::clone(stop);
    std::thread::Builder::new()
        .name("follower".into())
        .spawn(move || follow_commits(&shared, &commits, &stop))
        .map_err(Error::Spawn)?;
    Ok(())
}

/// The follower thread of a shared store: wakes on other processes' commits
/// (LISTEN/NOTIFY) and passes what they announced to the commit thread,
/// unless the table already holds it (this process's own commits are never
/// read back); the commit thread reads the log only if the table still does
/// not hold it then (its own batch may have followed them meanwhile). Reads
/// the log at least every [`FOLLOW_INTERVAL`] in case an announcement was
/// lost. At most one request is queued at a time.
fn follow_commits(shared: &Shared, commits: &mpsc::Sender<Message>, stop: &AtomicBool) {
    let mut feed = None;
    let mut last_follow = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if feed.is_none() {
            match shared.store.commit_feed() {
                Ok(Some(opened)) => feed = Some(opened),
                Ok(None) => return,
                Err(err) => {
                    warn!(error = %crate::error::chain(&err), "cannot listen for other processes' commits; reading the log every second");
                }
            }
        }
        let waited = match feed.as_mut() {
            Some(open) => open.wait(FOLLOW_INTERVAL),
            None => {
                std::thread::sleep(FOLLOW_INTERVAL);
                Ok(Wake::TimedOut)
            }
        };
        // Up to which sequence to follow: `None` for nothing new,
        // `u64::MAX` for the log's end, whatever the table holds.
        let through = match waited {
            Ok(Wake::Others(sequence)) => (sequence > shared.head()).then_some(sequence),
            Ok(Wake::OwnOnly) => None,
            Ok(Wake::TimedOut) => Some(u64::MAX),
            Err(err) => {
                warn!(error = %crate::error::chain(&err), "the commit feed failed; reopening it");
                feed = None;
                Some(u64::MAX)
            }
        };
        let through = match through {
            None if last_follow.elapsed() < FOLLOW_INTERVAL => continue,
            None => u64::MAX,
            Some(through) => through,
        };
        last_follow = Instant::now();
        if !shared.follow_requested.swap(true, Ordering::AcqRel)
            && commits.send(Message::Announced(through)).is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::UNIX_EPOCH;

    use tokio::sync::broadcast::{self, error::TryRecvError};

    use super::*;
    use crate::{
        domain::{AgentState, SystemClock},
        service::PublishedEvent,
        service::log::{
            batch::Answering,
            commit::{Proposal, Settings, Step, Writer},
        },
        store::{AgentChange, BatchId, MemoryStore, Retention, Store},
    };

    /// Registers an agent the way another process would: straight into the
    /// store, behind the table's back.
    pub(in crate::service::log) fn commit_elsewhere(store: &dyn Store, batch: u64) -> AgentId {
        let agent_id = AgentId::generate();
        let record = TransitionRecord {
            agent_id,
            from: None,
            to: AgentState::Registered,
            at: UNIX_EPOCH,
            reason: "elsewhere".into(),
            triggered_by: "other".into(),
            principal: String::new(),
            request: None,
            metadata: Default::default(),
            sequence: 0,
            version: 1,
        };
        let mut changes = [AgentChange {
            agent_id,
            prior_version: 0,
            identity: Some(AgentIdentity {
                name: Arc::from("elsewhere"),
                labels: Arc::default(),
            }),
            records: vec![Arc::new(record)],
        }];
        store
            .commit(BatchId(batch), &mut changes, &SystemClock)
            .expect("committed elsewhere");
        agent_id
    }

    fn published(rx: &mut broadcast::Receiver<Arc<PublishedEvent>>) -> Vec<u64> {
        let mut sequences = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(event) => sequences.push(event.sequence()),
                Err(TryRecvError::Empty) => return sequences,
                Err(err) => panic!("the bus failed: {err}"),
            }
        }
    }

    /// Events other processes committed are applied to the table and
    /// published once each, in order; following again publishes nothing.
    #[test]
    fn followed_events_are_applied_and_published_once() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(&Retention::default()));
        let shared = Shared::for_tests(Arc::clone(&store), 64);
        let mut bus = shared.bus.subscribe();
        let ids = [
            commit_elsewhere(store.as_ref(), 1),
            commit_elsewhere(store.as_ref(), 2),
        ];

        assert_eq!(apply_until(&shared, u64::MAX).expect("followed"), 2);
        assert_eq!(published(&mut bus), vec![1, 2]);
        let name = shared.agent(ids[1]).map(|agent| Arc::clone(&agent.name));
        assert_eq!(name.as_deref(), Some("elsewhere"));

        assert_eq!(apply_until(&shared, u64::MAX).expect("followed"), 2);
        assert!(published(&mut bus).is_empty(), "nothing published twice");
    }

    /// A batch of this process that other processes' commits precede
    /// publishes theirs first: one order, by sequence, across both.
    #[test]
    fn own_commits_publish_after_the_followed_events_they_follow() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(&Retention::default()));
        let shared = Shared::for_tests(Arc::clone(&store), 64);
        let mut bus = shared.bus.subscribe();
        commit_elsewhere(store.as_ref(), 1);
        commit_elsewhere(store.as_ref(), 2);

        let (reply, mut answer) = tokio::sync::oneshot::channel();
        let proposal = Proposal {
            agent_id: AgentId::generate(),
            prior: None,
            identity: Some(AgentIdentity {
                name: Arc::from("here"),
                labels: Arc::default(),
            }),
            steps: vec![Step {
                to: AgentState::Registered,
                reason: "here".into(),
                triggered_by: "test".into(),
                principal: String::new(),
                request: None,
                metadata: Default::default(),
            }],
            guard: None,
        };
        let mut writer = Writer::new(Settings {
            max_batch: 4,
            retention: Retention::default(),
        });
        writer.commit(&shared, std::iter::once((proposal, reply)), Answering::Here);

        let committed = answer.try_recv().expect("answered").expect("committed");
        assert_eq!(committed.records[0].sequence, 3);
        assert_eq!(published(&mut bus), vec![1, 2, 3]);
        assert_eq!(shared.head(), 3);
    }

    /// A log that skips sequences (events compacted before this process
    /// applied them) is an error, not silence; nothing is published.
    #[test]
    fn a_gap_in_the_log_is_an_error() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(&Retention {
            max_events: Some(1),
            max_age: None,
        }));
        let shared = Shared::for_tests(Arc::clone(&store), 64);
        let mut bus = shared.bus.subscribe();
        commit_elsewhere(store.as_ref(), 1);
        commit_elsewhere(store.as_ref(), 2);

        assert!(matches!(
            apply_until(&shared, u64::MAX),
            Err(StoreError::Corrupt(_))
        ));
        assert!(published(&mut bus).is_empty());
        assert_eq!(shared.head(), 0);
    }
}
