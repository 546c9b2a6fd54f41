//! Tests of the commit thread: batches committed, answered and published
//! in order, conflicts, failed commits, closing with proposals queued.

use std::{
    sync::atomic::AtomicBool,
    time::{Duration, SystemTime},
};

use tokio::sync::broadcast::{self, error::TryRecvError};

use super::*;
use crate::{
    domain::Clock,
    service::PublishedEvent,
    store::{
        AgentChange, AuditQuery, BatchId, ChangeOutcome, HistoryRange, MemoryStore, Recovered,
        Store,
    },
};

/// A memory store whose commits fail (rolled back) while `failing` is set,
/// and which counts the reads of its log and the times it settled
/// (`settled` is notified on each).
struct FailingStore {
    inner: MemoryStore,
    failing: AtomicBool,
    log_reads: std::sync::atomic::AtomicUsize,
    settles: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

impl Store for FailingStore {
    fn load(&self) -> crate::store::Result<Recovered> {
        self.inner.load()
    }
    fn commit(
        &self,
        id: BatchId,
        batch: &mut [AgentChange],
        clock: &dyn Clock,
    ) -> crate::store::Result<Vec<ChangeOutcome>> {
        if self.failing.load(Ordering::Acquire) {
            return Err(StoreError::backend(
                "committing",
                std::io::Error::other("disk full"),
            ));
        }
        self.inner.commit(id, batch, clock)
    }
    fn batch_committed(&self, id: BatchId) -> crate::store::Result<bool> {
        self.inner.batch_committed(id)
    }
    fn head(&self) -> crate::store::Result<u64> {
        self.inner.head()
    }
    fn identities(&self, ids: &[AgentId]) -> crate::store::Result<Vec<(AgentId, AgentIdentity)>> {
        self.inner.identities(ids)
    }
    fn events_after(
        &self,
        after: u64,
        max: usize,
    ) -> crate::store::Result<Vec<Arc<TransitionRecord>>> {
        self.log_reads.fetch_add(1, Ordering::AcqRel);
        self.inner.events_after(after, max)
    }
    fn oldest_sequence(&self) -> crate::store::Result<u64> {
        self.inner.oldest_sequence()
    }
    fn history(
        &self,
        agent_id: AgentId,
        range: HistoryRange,
    ) -> crate::store::Result<Vec<Arc<TransitionRecord>>> {
        self.inner.history(agent_id, range)
    }
    fn nth_newest(
        &self,
        agent_id: AgentId,
        upto: u64,
        n: u64,
    ) -> crate::store::Result<Option<u64>> {
        self.inner.nth_newest(agent_id, upto, n)
    }
    fn requests_since(
        &self,
        since: SystemTime,
    ) -> crate::store::Result<Vec<Arc<TransitionRecord>>> {
        self.inner.requests_since(since)
    }
    fn audit(&self, query: &AuditQuery) -> crate::store::Result<Vec<Arc<TransitionRecord>>> {
        self.inner.audit(query)
    }
    fn history_count(&self, agent_id: AgentId) -> crate::store::Result<u64> {
        self.inner.history_count(agent_id)
    }
    fn cursor(&self, name: &str) -> crate::store::Result<u64> {
        self.inner.cursor(name)
    }
    fn advance_cursor(&self, name: &str, sequence: u64) -> crate::store::Result<()> {
        self.inner.advance_cursor(name, sequence)
    }
    fn compact(
        &self,
        retention: &Retention,
        head: u64,
        max_rows: usize,
        clock: &dyn Clock,
    ) -> crate::store::Result<usize> {
        self.inner.compact(retention, head, max_rows, clock)
    }
    fn settle(&self) -> crate::store::Result<()> {
        self.settles.fetch_add(1, Ordering::AcqRel);
        self.settled.notify_one();
        Ok(())
    }
    fn close(&self) -> crate::store::Result<()> {
        self.inner.close()
    }
}

/// A [`FailingStore`] failing its commits from the start or not.
fn failing_store(failing: bool) -> Arc<FailingStore> {
    Arc::new(FailingStore {
        inner: MemoryStore::new(&Retention::default()),
        failing: AtomicBool::new(failing),
        log_reads: Default::default(),
        settles: Default::default(),
        settled: Default::default(),
    })
}

/// The commit thread over `store`: the state it writes, its channel and
/// its handle.
fn start_thread(
    store: Arc<dyn Store>,
) -> (
    Arc<Shared>,
    mpsc::Sender<Message>,
    std::thread::JoinHandle<()>,
) {
    let shared = Shared::for_tests(store, 64);
    let (tx, rx) = mpsc::channel();
    let writer = Arc::new(Mutex::new(writer()));
    let thread = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || run(shared, rx, writer))
    };
    (shared, tx, thread)
}

/// How long a test waits for the thread.
const LIMIT: Duration = Duration::from_secs(10);

/// Sends `proposal` to the thread and waits until it is committed.
async fn commit_through(tx: &mpsc::Sender<Message>, proposal: Proposal) {
    let (reply, answer) = oneshot::channel();
    tx.send(Message::Propose(proposal, reply))
        .expect("the thread runs");
    tokio::time::timeout(LIMIT, answer)
        .await
        .expect("answered in time")
        .expect("answered")
        .expect("committed");
}

/// Closes the store through the thread and waits for the thread to end.
async fn close_thread(tx: &mpsc::Sender<Message>, thread: std::thread::JoinHandle<()>) {
    let (closed, closing) = oneshot::channel();
    tx.send(Message::Close(closed)).expect("the thread runs");
    tokio::time::timeout(LIMIT, closing)
        .await
        .expect("closed in time")
        .expect("answered")
        .expect("the store closed");
    thread.join().expect("the thread ends cleanly");
}

fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(&Retention::default()))
}

fn writer() -> Writer {
    Writer::new(Settings {
        max_batch: 16,
        retention: Retention::default(),
    })
}

fn step(to: AgentState) -> Step {
    Step {
        to,
        reason: format!("to {to}"),
        triggered_by: "test".into(),
        principal: String::new(),
        request: None,
        metadata: Metadata::default(),
    }
}

fn registration(name: &str) -> Proposal {
    Proposal {
        agent_id: AgentId::generate(),
        prior: None,
        identity: Some(AgentIdentity {
            name: Arc::from(name),
            labels: Arc::default(),
        }),
        steps: vec![step(AgentState::Registered)],
        guard: None,
    }
}

type Answer = oneshot::Receiver<Result<Committed, Rejected>>;

/// Each proposal with the reply its proposer waits on.
fn with_replies(proposals: Vec<Proposal>) -> (Vec<(Proposal, Reply)>, Vec<Answer>) {
    proposals
        .into_iter()
        .map(|proposal| {
            let (tx, rx) = oneshot::channel();
            ((proposal, tx), rx)
        })
        .unzip()
}

fn answer(mut rx: Answer) -> Result<Committed, Rejected> {
    rx.try_recv().expect("every proposer is answered")
}

fn published(rx: &mut broadcast::Receiver<Arc<PublishedEvent>>) -> Vec<Arc<PublishedEvent>> {
    let mut events = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(event) => events.push(event),
            Err(TryRecvError::Empty) => return events,
            Err(err) => panic!("the bus failed: {err}"),
        }
    }
}

/// Three registrations in one batch: each proposer gets its own agent
/// with sequences in batch order, the table holds them, and their events
/// are published in the same order.
#[test]
fn a_batch_is_committed_answered_and_published_in_sequence_order() {
    let shared = Shared::for_tests(memory_store(), 64);
    let mut bus = shared.bus.subscribe();
    let proposals = vec![registration("a"), registration("b"), registration("c")];
    let ids: Vec<AgentId> = proposals.iter().map(|p| p.agent_id).collect();
    let (batch, replies) = with_replies(proposals);

    writer().commit(&shared, batch.into_iter(), Answering::FromRuntime);

    for (n, (rx, id)) in replies.into_iter().zip(&ids).enumerate() {
        let committed = answer(rx).expect("committed");
        assert_eq!(committed.agent.id, *id);
        assert_eq!(committed.agent.state, AgentState::Registered);
        let sequences: Vec<u64> = committed.records.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, vec![n as u64 + 1]);
    }
    let events = published(&mut bus);
    let seen: Vec<(u64, AgentId)> = events
        .iter()
        .map(|e| (e.sequence(), e.record.agent_id))
        .collect();
    assert_eq!(seen, vec![(1, ids[0]), (2, ids[1]), (3, ids[2])]);
    assert_eq!(shared.head(), 3);
    assert!(ids.iter().all(|id| shared.agent(*id).is_some()));
}

/// A two-step transition and a proposal based on a replaced version
/// share a batch: the first commits both steps (published in order, its
/// writer lock released), the second is answered with a conflict and
/// publishes nothing.
#[test]
fn a_stale_proposal_conflicts_while_its_batch_commits() {
    let shared = Shared::for_tests(memory_store(), 64);
    let mut writer = writer();
    let first = registration("a");
    let id = first.agent_id;
    let (batch, replies) = with_replies(vec![first]);
    writer.commit(&shared, batch.into_iter(), Answering::FromRuntime);
    let registered = answer(replies.into_iter().next().expect("one reply"))
        .expect("registered")
        .agent;
    let mut bus = shared.bus.subscribe();

    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let deploy = Proposal {
        agent_id: id,
        prior: Some(Arc::clone(&registered)),
        identity: None,
        steps: vec![step(AgentState::Deploying), step(AgentState::Deployed)],
        guard: Some(Arc::clone(&lock).try_lock_owned().expect("unlocked")),
    };
    let stale = Proposal {
        agent_id: id,
        prior: Some(registered),
        identity: None,
        steps: vec![step(AgentState::Maintenance)],
        guard: None,
    };
    let (batch, replies) = with_replies(vec![deploy, stale]);
    writer.commit(&shared, batch.into_iter(), Answering::FromRuntime);

    let mut replies = replies.into_iter();
    let deployed = answer(replies.next().expect("first")).expect("committed");
    assert_eq!(deployed.agent.state, AgentState::Deployed);
    assert_eq!(deployed.agent.version, 3);
    assert!(matches!(
        answer(replies.next().expect("second")),
        Err(Rejected::Conflict { actual: 3 })
    ));
    let sequences: Vec<u64> = published(&mut bus).iter().map(|e| e.sequence()).collect();
    assert_eq!(sequences, vec![2, 3]);
    assert!(lock.try_lock().is_ok(), "the writer lock is released");
}

/// A commit the store rolls back fails every proposal of the batch with
/// the store's error, publishes nothing and leaves the table as it was;
/// the next batch commits.
#[test]
fn a_failed_commit_fails_the_whole_batch_and_publishes_nothing() {
    let store = failing_store(true);
    let shared = Shared::for_tests(Arc::clone(&store) as Arc<dyn Store>, 64);
    let mut bus = shared.bus.subscribe();
    let mut writer = writer();
    let proposals = vec![registration("a"), registration("b")];
    let ids: Vec<AgentId> = proposals.iter().map(|p| p.agent_id).collect();
    let (batch, replies) = with_replies(proposals);

    writer.commit(&shared, batch.into_iter(), Answering::FromRuntime);

    for rx in replies {
        assert!(matches!(answer(rx), Err(Rejected::Store(_))));
    }
    assert!(published(&mut bus).is_empty());
    assert_eq!(shared.head(), 0);
    assert!(ids.iter().all(|id| shared.agent(*id).is_none()));

    store.failing.store(false, Ordering::Release);
    let (batch, replies) = with_replies(vec![registration("c")]);
    writer.commit(&shared, batch.into_iter(), Answering::FromRuntime);
    assert!(replies.into_iter().all(|rx| answer(rx).is_ok()));
    let sequences: Vec<u64> = published(&mut bus).iter().map(|e| e.sequence()).collect();
    assert_eq!(sequences, vec![1]);
}

/// Through the thread: proposals queued before a `Close` are committed
/// in queue order and answered before the store closes; then the thread
/// ends and takes no more.
#[tokio::test]
async fn the_thread_commits_what_is_queued_before_it_closes() {
    let shared = Shared::for_tests(memory_store(), 64);
    let (tx, rx) = mpsc::channel();
    let writer = Arc::new(Mutex::new(writer()));
    let thread = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || run(shared, rx, writer))
    };
    let (proposals, replies) = with_replies(vec![
        registration("a"),
        registration("b"),
        registration("c"),
    ]);
    for (proposal, reply) in proposals {
        tx.send(Message::Propose(proposal, reply))
            .expect("the thread runs");
    }
    let (closed, closing) = oneshot::channel();
    tx.send(Message::Close(closed)).expect("the thread runs");

    let limit = Duration::from_secs(10);
    let mut sequences = Vec::new();
    for rx in replies {
        let committed = tokio::time::timeout(limit, rx)
            .await
            .expect("answered in time")
            .expect("answered")
            .expect("committed");
        sequences.extend(committed.records.iter().map(|r| r.sequence));
    }
    assert_eq!(sequences, vec![1, 2, 3]);
    tokio::time::timeout(limit, closing)
        .await
        .expect("closed in time")
        .expect("answered")
        .expect("the store closed");
    thread.join().expect("the thread ends cleanly");
    let (late, _) = oneshot::channel();
    assert!(
        tx.send(Message::Propose(registration("d"), late)).is_err(),
        "the thread has stopped"
    );
}

/// An announcement of commits the table already holds (this process's
/// own batch followed them, or committed past them) reads nothing; one
/// beyond the table's head has the thread read and apply the log.
#[tokio::test]
async fn announcements_the_table_holds_are_not_read() {
    let store = failing_store(false);
    let (shared, tx, thread) = start_thread(Arc::clone(&store) as Arc<dyn Store>);
    for name in ["a", "b"] {
        if name == "b" {
            // Handled before or with b's batch: the table holds 1 either way.
            tx.send(Message::Announced(1)).expect("the thread runs");
        }
        commit_through(&tx, registration(name)).await;
    }
    assert_eq!(shared.head(), 2);
    assert_eq!(
        store.log_reads.load(Ordering::Acquire),
        0,
        "nothing was read"
    );

    let elsewhere = crate::service::log::follow::tests::commit_elsewhere(&store.inner, 99);
    tx.send(Message::Announced(3)).expect("the thread runs");
    close_thread(&tx, thread).await;
    assert!(
        store.log_reads.load(Ordering::Acquire) > 0,
        "the log was read"
    );
    assert_eq!(shared.head(), 3);
    assert!(
        shared.agent(elsewhere).is_some(),
        "the other process's agent is in the table"
    );
}

/// After a commit, once nothing more arrives for a moment, the thread lets
/// the store settle, once; then it waits without a timeout again.
#[tokio::test]
async fn the_store_settles_once_the_proposals_stop() {
    let store = failing_store(false);
    let (_, tx, thread) = start_thread(Arc::clone(&store) as Arc<dyn Store>);
    commit_through(&tx, registration("a")).await;
    tokio::time::timeout(LIMIT, store.settled.notified())
        .await
        .expect("settled in time");
    close_thread(&tx, thread).await;
    assert_eq!(store.settles.load(Ordering::Acquire), 1, "settled once");
}
