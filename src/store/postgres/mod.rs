//! The shared store: PostgreSQL, written by several server processes.
//! Knows nothing of the service or anything above the store.
//!
//! # Commit order is sequence order
//! The global sequence is a counter row (`meta.head`). A commit first locks
//! it (the turn to commit, taken by the commit thread before it gathers the
//! batch, so that what queues while other processes commit joins the
//! batch); then one statement checks the stored versions of the batch's
//! agents, advances the counter by the number of records it writes, and
//! writes the agents and the events at `base + offset`. The lock serialises
//! all processes' commits: the next writer's sequences are higher, and
//! PostgreSQL releases the lock only after the commit is visible, so a
//! reader never sees a sequence while a lower one is still uncommitted: a
//! watcher that reads the log by sequence never skips an event that commits
//! late. Group commit keeps the serialisation cheap: one process commits
//! many changes per turn, in three round trips per batch (arrays through
//! `unnest`), not per change.
//!
//! Each change is checked against the agent's stored version inside the
//! transaction (compare-and-set); a change that lost to another process is
//! answered as a conflict on its own, and the rest of the batch commits.
//!
//! # Files
//! This file connects and delegates the [`Store`] methods: [`schema`]
//! creates and migrates the schema, [`commit`] writes batches as the rows
//! of [`batch`] (array parameters declared with [`arrays`]), [`compact`]
//! deletes old events, [`read`] answers the queries and [`rows`] decodes
//! their rows, [`shared`] holds the commit feed, leases, heartbeats and
//! cursors.

mod arrays;
mod batch;
mod commit;
mod compact;
mod read;
mod readers;

#[cfg(test)]
pub(crate) use readers::MAX_READERS;
mod rows;
mod schema;
mod shared;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use postgres::{Client, NoTls};

use self::commit::Writer;
use super::{
    AgentChange, AgentIdentity, AuditQuery, BatchId, ChangeOutcome, CommitFeed, HistoryRange,
    Lease, Recovered, Result, Retention, SavedHeartbeats, Store, StoreError, check_cursor_name,
    stored_cursor,
};
use crate::domain::{AgentId, Clock, Heartbeat, TransitionRecord};

/// The channel commits notify.
const CHANNEL: &str = "agent_lifecycle_commits";

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Wraps a PostgreSQL error with what the store was doing.
fn pg(context: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
    move |err| StoreError::backend(context, err)
}

/// A stored value this program cannot read.
fn corrupt(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {err}"))
}

/// A new connection to `url`, with a connect timeout (unless the URL sets
/// one) and TCP keepalives.
fn connect(url: &str) -> Result<Client> {
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| StoreError::backend("parsing the PostgreSQL URL", e))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    config
        .connect(NoTls)
        .map_err(pg("connecting to PostgreSQL"))
}

/// The keys of the `agents` table for `ids`.
fn keys(ids: &[AgentId]) -> Vec<&[u8]> {
    ids.iter().map(|id| id.as_bytes().as_slice()).collect()
}

/// The PostgreSQL back end.
pub struct PostgresStore {
    url: String,
    /// This process's writer id (see the `writers` table).
    writer_id: [u8; 16],
    /// The one connection that commits (the commit thread's), with its
    /// prepared statements; reconnected after a failure.
    writer: Mutex<Option<Writer>>,
    /// The reader connections, bounded.
    readers: readers::Readers,
    /// Connections whose attempt at a lease found it taken, kept for the
    /// next attempt (processes that do not hold a lease try again every
    /// round): at most [`MAX_LEASE_SPARES`].
    lease_spares: Mutex<Vec<Client>>,
}

/// Connections kept for lease attempts at most: one per lease that more
/// than one background task tries at once.
const MAX_LEASE_SPARES: usize = 4;

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`) and
    /// creates or migrates the schema.
    ///
    /// # Errors
    /// The server cannot be reached, refuses the login, or holds a newer
    /// schema.
    pub fn open(url: &str) -> Result<Self> {
        let mut client = connect(url)?;
        schema::migrate(&mut client)?;
        let writer = Writer::new(client)?;
        Ok(PostgresStore {
            url: url.to_string(),
            writer_id: *AgentId::generate().as_uuid().as_bytes(),
            writer: Mutex::new(Some(writer)),
            readers: readers::Readers::new(url),
            lease_spares: Mutex::default(),
        })
    }

    /// Creates an empty database `name` on the server of `url` (whose user
    /// may create databases) and returns its URL: for tests and benchmarks
    /// that each want a database of their own.
    ///
    /// # Errors
    /// The server cannot be reached, `name` is not a plain identifier, or
    /// the database cannot be created.
    pub fn create_database(url: &str, name: &str) -> Result<String> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(StoreError::Corrupt(format!(
                "database name {name:?}: use lowercase letters, digits and _"
            )));
        }
        let mut client = connect(url)?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(pg("creating a database"))?;
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::backend("parsing the PostgreSQL URL", e))?;
        config.dbname(name);
        let (base, _) = url.split_once('?').unwrap_or((url, ""));
        let prefix = base.rsplit_once('/').map_or(base, |(prefix, _)| prefix);
        Ok(format!("{prefix}/{name}"))
    }

    fn with_writer<T>(&self, f: impl FnOnce(&mut Writer) -> Result<T>) -> Result<T> {
        let mut slot = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let writer = match slot.as_mut() {
            Some(writer) if !writer.client.is_closed() => writer,
            _ => slot.insert(Writer::connect(&self.url)?),
        };
        let result = f(writer);
        if result.is_err() && writer.client.is_closed() {
            *slot = None;
        }
        result
    }

    fn with_reader<T>(&self, f: impl Fn(&mut readers::Reader) -> Result<T>) -> Result<T> {
        self.readers.with(f)
    }

    fn lease_spares(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.lease_spares.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for PostgresStore {
    fn load(&self) -> Result<Recovered> {
        self.with_reader(read::load)
    }

    fn commit(
        &self,
        id: BatchId,
        batch: &mut [AgentChange],
        clock: &dyn Clock,
    ) -> Result<Vec<ChangeOutcome>> {
        commit::commit(self, id, batch, clock)
    }

    fn take_commit_turn(&self) -> Result<()> {
        self.with_writer(commit::take_turn)
    }

    fn end_commit_turn(&self) -> Result<()> {
        let mut slot = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            Some(writer) if !writer.client.is_closed() => commit::end_turn(writer),
            _ => Ok(()),
        }
    }

    fn batch_committed(&self, id: BatchId) -> Result<bool> {
        let last = self.with_reader(|client| read::last_batch(client, &self.writer_id))?;
        Ok(last == Some(id.0 as i64))
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn head(&self) -> Result<u64> {
        self.with_reader(read::head)
    }

    fn identities(&self, ids: &[AgentId]) -> Result<Vec<(AgentId, AgentIdentity)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = keys(ids);
        self.with_reader(|client| read::identities(client, &keys))
    }

    fn commit_feed(&self) -> Result<Option<Box<dyn CommitFeed>>> {
        shared::listen(connect(&self.url)?, &self.writer_id).map(Some)
    }

    fn try_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>> {
        let spare = self
            .lease_spares()
            .pop()
            .filter(|client| !client.is_closed());
        let client = match spare {
            Some(client) => client,
            None => connect(&self.url)?,
        };
        Ok(match shared::try_lease(client, name)? {
            Ok(lease) => Some(lease),
            Err(client) => {
                let mut spares = self.lease_spares();
                if spares.len() < MAX_LEASE_SPARES {
                    spares.push(client);
                }
                None
            }
        })
    }

    fn save_heartbeats(&self, beats: &[(AgentId, Heartbeat)]) -> Result<()> {
        if beats.is_empty() {
            return Ok(());
        }
        self.with_reader(|client| shared::save_heartbeats(client, beats))
    }

    fn heartbeats(&self, ids: &[AgentId]) -> Result<Vec<(AgentId, Heartbeat)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = keys(ids);
        self.with_reader(|client| shared::heartbeats(client, &keys))
    }

    fn heartbeats_saved_after(&self, after: u64) -> Result<SavedHeartbeats> {
        self.with_reader(|client| shared::heartbeats_saved_after(client, after))
    }

    fn cursor(&self, name: &str) -> Result<u64> {
        check_cursor_name(name)?;
        self.with_reader(|client| shared::cursor(client, name))
    }

    fn advance_cursor(&self, name: &str, sequence: u64) -> Result<()> {
        let sequence = stored_cursor(name, sequence)?;
        self.with_reader(|client| shared::advance_cursor(client, name, sequence))
    }

    fn events_after(&self, after: u64, max: usize) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|client| read::events_after(client, after, max))
    }

    fn oldest_sequence(&self) -> Result<u64> {
        self.with_reader(read::oldest_sequence)
    }

    fn history(
        &self,
        agent_id: AgentId,
        range: HistoryRange,
    ) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|client| read::history(client, agent_id, range))
    }

    fn nth_newest(&self, agent_id: AgentId, upto: u64, n: u64) -> Result<Option<u64>> {
        if n == 0 {
            return Ok(None);
        }
        self.with_reader(|client| read::nth_newest(client, agent_id, upto, n))
    }

    fn requests_since(&self, since: SystemTime) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|client| read::requests_since(client, since))
    }

    fn size_bytes(&self) -> Result<Option<u64>> {
        self.with_reader(read::size_bytes).map(Some)
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|client| read::audit(client, query))
    }

    fn history_count(&self, agent_id: AgentId) -> Result<u64> {
        self.with_reader(|client| read::history_count(client, agent_id))
    }

    fn compact(
        &self,
        retention: &Retention,
        head: u64,
        max_rows: usize,
        clock: &dyn Clock,
    ) -> Result<usize> {
        if max_rows == 0 {
            return Ok(0);
        }
        let Some(bounds) = retention.bounds(head, clock) else {
            return Ok(0);
        };
        self.with_writer(|w| compact::compact(&mut w.client, &bounds, max_rows))
    }

    fn close(&self) -> Result<()> {
        self.readers.close();
        *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }
}
