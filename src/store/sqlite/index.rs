//! The log's indexes by agent and by principal: the tables `agent_events`
//! and `principal_events`, one row (key, sequence) per event. Depends only
//! on rusqlite and the domain's records.
//!
//! `meta.indexed` is the sequence up to which both tables hold every
//! retained event; some events after it are in them too. Readers take the
//! indexed events from the tables and the log's tail after `meta.indexed`
//! from `events` itself, without the events the tables already hold
//! ([`NOT_IN_AGENT_EVENTS`], [`NOT_IN_PRINCIPAL_EVENTS`]), in one
//! statement, so they read one snapshot of both.
//!
//! The writer keeps each agent's and each principal's unindexed events in
//! memory ([`Unindexed`]). A commit indexes a key's events once they make a
//! group of [`INDEX_GROUP`], which lands in one place of the table (one page
//! of the WAL for all of them, instead of one per event), and every event
//! that falls [`INDEX_LAG`] behind the head; it records how far that is as
//! `meta.indexed` once the value moved by [`INDEXED_STEP`], so a reader's
//! tail is at most `INDEX_LAG + INDEXED_STEP` events long. Once commits
//! stop for a moment the store settles
//! ([`crate::store::Store::settle`]): the whole tail is indexed and
//! `meta.indexed` reaches the head, so reads on a quiet file scan no tail.

use std::collections::{HashMap, VecDeque};

use rusqlite::{Transaction, params};

use super::{Tuning, sql};
use crate::{
    domain::{AgentId, TransitionRecord},
    store::Result,
};

/// How far `meta.indexed` stays behind the head: a commit indexes every
/// event older than this many events that is not indexed yet.
pub(in crate::store) const INDEX_LAG: u64 = 4096;

/// How far a commit lets the index run ahead of `meta.indexed` before it
/// records the new value: readers then scan a tail up to
/// `INDEX_LAG + INDEXED_STEP` events long, and a commit writes `meta`
/// about once in every `INDEXED_STEP` events instead of every time.
pub(super) const INDEXED_STEP: u64 = 512;

/// Unindexed events of one agent (or one principal) that a commit indexes
/// together, in one place of the index. A principal (a fleet has few,
/// often one) fills a group every this many of its events, and each group
/// writes its page of the index once; an agent's events mostly fall due
/// by [`INDEX_LAG`] before its group fills.
pub(in crate::store) const INDEX_GROUP: usize = 512;

/// The sequence up to which `agent_events` and `principal_events` are
/// complete.
pub(super) const INDEXED: &str = "(SELECT value FROM meta WHERE key = 'indexed')";

/// Of the log's tail after [`INDEXED`] (`events`), the events that
/// `agent_events` does not hold yet.
pub(super) const NOT_IN_AGENT_EVENTS: &str = "NOT EXISTS (SELECT 1 FROM agent_events x
    WHERE x.agent_id = events.agent_id AND x.sequence = events.sequence)";

/// The same for `principal_events`.
pub(super) const NOT_IN_PRINCIPAL_EVENTS: &str = "NOT EXISTS (SELECT 1 FROM principal_events x
    WHERE x.principal = events.principal AND x.sequence = events.sequence)";

/// The events after `meta.indexed` that are not in the index tables yet,
/// grouped as a commit indexes them.
#[derive(Debug, Default)]
pub(super) struct Unindexed {
    /// Whether these are all of them. False until the first commit of the
    /// writer, after a failed commit, and after a compaction that deleted
    /// events after `meta.indexed`: that commit indexes the whole tail.
    complete: bool,
    agents: Groups<AgentId>,
    principals: Groups<String>,
}

impl Unindexed {
    /// Indexes, inside `tx`, what the newly committed `records` make due:
    /// each group that reaches `tuning.index_group`, and every group holding
    /// an event that falls `tuning.index_lag` behind `head`. When these are
    /// not all the unindexed events, the whole tail after `indexed` instead.
    /// Returns the new `meta.indexed`.
    ///
    /// # Errors
    /// The back end failed; the caller drops `self` with the transaction.
    pub(super) fn index<'r>(
        &mut self,
        tx: &Transaction<'_>,
        records: impl Iterator<Item = &'r TransitionRecord>,
        indexed: u64,
        head: u64,
        tuning: &Tuning,
    ) -> Result<u64> {
        if !self.complete {
            self.index_all(tx, indexed)?;
            return Ok(head);
        }
        let group = tuning.index_group;
        for record in records {
            if let Some(full) = self.agents.add(&record.agent_id, record.sequence, group) {
                index_agent(tx, &full)?;
            }
            if let Some(full) = self
                .principals
                .add(&record.principal, record.sequence, group)
            {
                index_principal(tx, &full)?;
            }
        }
        let upto = head.saturating_sub(tuning.index_lag).max(indexed);
        for due in self.agents.due(upto) {
            index_agent(tx, &due)?;
        }
        for due in self.principals.due(upto) {
            index_principal(tx, &due)?;
        }
        Ok(upto)
    }

    /// Indexes, inside `tx`, every event after `indexed`, the ones put in
    /// groups and the others; afterwards none is unindexed and the caller
    /// records the head as `meta.indexed`.
    ///
    /// # Errors
    /// The back end failed; the caller drops `self` with the transaction.
    pub(super) fn index_all(&mut self, tx: &Transaction<'_>, indexed: u64) -> Result<()> {
        index_tail(tx, indexed)?;
        *self = Unindexed {
            complete: true,
            ..Unindexed::default()
        };
        Ok(())
    }
}

/// Unindexed sequences per key (an agent, a principal), oldest first.
#[derive(Debug)]
struct Groups<K> {
    open: HashMap<K, Vec<u64>>,
    /// Every sequence in `open` (and some already indexed), in order, to
    /// find the keys whose oldest falls behind `meta.indexed`.
    order: VecDeque<(u64, K)>,
}

impl<K> Default for Groups<K> {
    fn default() -> Self {
        Groups {
            open: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Groups<K> {
    /// Adds `sequence` to `key`'s group; returns the group once it holds
    /// `size` sequences, to be indexed.
    fn add(&mut self, key: &K, sequence: u64, size: usize) -> Option<(K, Vec<u64>)> {
        self.order.push_back((sequence, key.clone()));
        let group = match self.open.get_mut(key) {
            Some(group) => group,
            None => self.open.entry(key.clone()).or_default(),
        };
        group.push(sequence);
        if group.len() >= size {
            self.open.remove_entry(key)
        } else {
            None
        }
    }

    /// Takes the groups holding a sequence up to `upto`, to be indexed.
    fn due(&mut self, upto: u64) -> Vec<(K, Vec<u64>)> {
        let mut due = Vec::new();
        while self
            .order
            .front()
            .is_some_and(|(sequence, _)| *sequence <= upto)
        {
            let Some((sequence, key)) = self.order.pop_front() else {
                break;
            };
            let oldest = self.open.get(&key).and_then(|group| group.first());
            if oldest.is_some_and(|&oldest| oldest <= sequence)
                && let Some(group) = self.open.remove_entry(&key)
            {
                due.push(group);
            }
        }
        due
    }
}

/// Indexes one agent's group of events, inside `tx`.
fn index_agent(tx: &Transaction<'_>, (id, sequences): &(AgentId, Vec<u64>)) -> Result<()> {
    index_group(
        tx,
        "agent_events (agent_id",
        &id.as_bytes().as_slice(),
        sequences,
    )
}

/// Indexes one principal's group of events, inside `tx`.
fn index_principal(
    tx: &Transaction<'_>,
    (principal, sequences): &(String, Vec<u64>),
) -> Result<()> {
    index_group(tx, "principal_events (principal", principal, sequences)
}

/// Inserts (`key`, sequence) into `table_and_key` (the table and its key
/// column) for every sequence of a group, in one statement: the sequences
/// travel as one JSON array, read back by `json_each`, instead of one
/// statement execution (bind, step, reset) per row.
fn index_group(
    tx: &Transaction<'_>,
    table_and_key: &str,
    key: &dyn rusqlite::ToSql,
    sequences: &[u64],
) -> Result<()> {
    // Integers always serialize; were it ever to fail, the empty text is
    // malformed JSON and the statement fails with it.
    let array = serde_json::to_string(sequences).unwrap_or_default();
    tx.prepare_cached(&format!(
        "INSERT INTO {table_and_key}, sequence) SELECT ?1, value FROM json_each(?2) WHERE true
         ON CONFLICT DO NOTHING"
    ))
    .and_then(|mut stmt| stmt.execute(params![key, array]))
    .map_err(sql("indexing events"))?;
    Ok(())
}

/// Indexes every event after `indexed` that the index does not hold yet,
/// inside `tx`: what a writer does first, since it does not know which of
/// them earlier writers grouped.
fn index_tail(tx: &Transaction<'_>, indexed: u64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO agent_events (agent_id, sequence)
         SELECT agent_id, sequence FROM events WHERE sequence > ?1
         ON CONFLICT DO NOTHING",
    )
    .and_then(|mut stmt| stmt.execute([indexed as i64]))
    .and_then(|_| {
        tx.prepare_cached(
            "INSERT INTO principal_events (principal, sequence)
             SELECT principal, sequence FROM events WHERE sequence > ?1
             ON CONFLICT DO NOTHING",
        )
        .and_then(|mut stmt| stmt.execute([indexed as i64]))
    })
    .map_err(sql("indexing the log's tail"))?;
    Ok(())
}
