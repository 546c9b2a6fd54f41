//! What processes that share one PostgreSQL database use to work together:
//! the commit feed (LISTEN), leases (advisory locks), the heartbeats every
//! process sees and the consumers' cursors (the `cursors` table, which a
//! consumer that moves to another process resumes from). Depends on
//! nothing above the store.
//!
//! Every commit sends `NOTIFY` on [`super::CHANNEL`] (delivered at commit);
//! a [`Listener`] wakes followers without polling, and they also read the
//! log periodically in case a notification is lost. A lease is a
//! session-level advisory lock held on a connection of its own: when the
//! holding process dies, PostgreSQL ends its session and releases the
//! lock, and another process takes it on its next attempt.

use std::{collections::HashMap, sync::LazyLock, time::Duration};

use postgres::{Client, fallible_iterator::FallibleIterator};

use super::{
    CHANNEL,
    arrays::{Arrays, Param, Placeholders, assignments, list, row_arrays},
    pg,
    readers::Reader,
    rows::decode_id,
};
use crate::{
    domain::{AgentId, Heartbeat},
    store::{
        CommitFeed, Lease, Result, SavedHeartbeats, StoreError, Wake,
        codec::{from_micros, to_micros},
    },
};

row_arrays! {
    /// An agent's newest heartbeat: its `heartbeats` row.
    struct HeartbeatRow<'a>, arrays Heartbeats {
        agent_id: &'a [u8] = "bytea",
        at: i64 = "int8",
        load: Option<f64> = "float8",
        current_task: Option<&'a str> = "text",
    }
}

/// Keeps the newer of the stored and the given heartbeat of each agent;
/// the rows it writes get one new save number.
static SAVE_HEARTBEATS: LazyLock<String> = LazyLock::new(|| {
    let rows = Heartbeats::default();
    format!(
        "
INSERT INTO heartbeats ({columns}, saved)
SELECT beats.*, save.number
FROM {unnest} AS beats, (SELECT nextval('heartbeat_saves') AS number) AS save
ON CONFLICT (agent_id) DO UPDATE
    SET {set}, saved = excluded.saved
    WHERE heartbeats.at < excluded.at",
        columns = list("", Heartbeats::COLUMNS),
        unnest = rows.unnest(&mut Placeholders::after(0)),
        set = assignments("excluded", Heartbeats::COLUMNS, "agent_id"),
    )
});

/// The transaction lock every heartbeat save holds to its commit: a save
/// takes its number and commits before the next one takes its own, so a
/// reader that sees a save's rows sees every earlier save's too.
const HEARTBEAT_SAVE_LOCK: i64 = 0x6167_6c63_6862_7376;

/// A connection that LISTENs on [`CHANNEL`], for the process whose
/// batches carry `writer_id`.
pub(super) fn listen(mut client: Client, writer_id: &[u8; 16]) -> Result<Box<dyn CommitFeed>> {
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .map_err(pg("listening for commits"))?;
    let own = writer_id.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Box::new(Listener { client, own }))
}

/// What one announcement says: `None` for this process's own commit,
/// else the last sequence committed (`u64::MAX` when it does not say).
/// Each batch announces `"LAST_SEQUENCE WRITER_HEX"`.
fn announced(payload: &str, own: &str) -> Option<u64> {
    let mut parts = payload.split(' ');
    let sequence = parts.next().and_then(|s| s.parse().ok());
    match parts.next() {
        Some(writer) if writer == own => None,
        _ => Some(sequence.unwrap_or(u64::MAX)),
    }
}

/// Takes the lease `name` on `client`, a connection of its own; the
/// connection back when another session holds it, for the next attempt.
pub(super) fn try_lease(
    mut client: Client,
    name: &str,
) -> Result<std::result::Result<Box<dyn Lease>, Client>> {
    let granted: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lease_key(name)])
        .map_err(pg("taking a lease"))?
        .get(0);
    Ok(match granted {
        true => Ok(Box::new(AdvisoryLease { client })),
        false => Err(client),
    })
}

/// Upserts the newest of `beats` of each agent.
pub(super) fn save_heartbeats(client: &mut Reader, beats: &[(AgentId, Heartbeat)]) -> Result<()> {
    // One row per agent: the newest of the given ones (an upsert may not
    // touch a row twice).
    let mut newest: HashMap<AgentId, &Heartbeat> = HashMap::new();
    for (id, beat) in beats {
        let slot = newest.entry(*id).or_insert(beat);
        if beat.at > slot.at {
            *slot = beat;
        }
    }
    let mut rows = Heartbeats::default();
    for (id, beat) in &newest {
        rows.push(HeartbeatRow {
            agent_id: id.as_bytes().as_slice(),
            at: to_micros(beat.at),
            load: beat.load,
            current_task: beat.current_task.as_deref(),
        });
    }
    let mut params: Vec<Param<'_>> = Vec::new();
    rows.params(&mut params);
    let mut tx = client
        .transaction()
        .map_err(pg("beginning a heartbeat save"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&HEARTBEAT_SAVE_LOCK])
        .map_err(pg("locking the heartbeat saves"))?;
    tx.execute(SAVE_HEARTBEATS.as_str(), &params)
        .map_err(pg("saving heartbeats"))?;
    tx.commit().map_err(pg("committing heartbeats"))
}

/// The stored heartbeats of the agents `ids` (the keys of the table).
pub(super) fn heartbeats(client: &mut Reader, ids: &[&[u8]]) -> Result<Vec<(AgentId, Heartbeat)>> {
    let rows = client
        .query(
            "SELECT agent_id, at, load, current_task FROM heartbeats
             WHERE agent_id = ANY($1::bytea[])",
            &[&ids],
        )
        .map_err(pg("reading heartbeats"))?;
    rows.iter().map(heartbeat).collect()
}

/// The text of a read of the `heartbeats` rows with their save numbers.
macro_rules! saved_heartbeats {
    () => {
        "SELECT agent_id, at, load, current_task, saved FROM heartbeats"
    };
}
const SAVED_HEARTBEATS: &str = saved_heartbeats!();

/// The heartbeat rows written by saves numbered above `after` (numbers
/// start at 1); all of them for 0, rows of version 3 (numbered 0) too.
pub(super) fn heartbeats_saved_after(client: &mut Reader, after: u64) -> Result<SavedHeartbeats> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let rows = match after {
        0 => client.query(SAVED_HEARTBEATS, &[]),
        _ => client.query(concat!(saved_heartbeats!(), " WHERE saved > $1"), &[&after]),
    }
    .map_err(pg("reading heartbeats"))?;
    let mut through = after;
    let mut beats = Vec::with_capacity(rows.len());
    for row in &rows {
        through = through.max(row.get(4));
        beats.push(heartbeat(row)?);
    }
    Ok(SavedHeartbeats {
        beats,
        through: u64::try_from(through).unwrap_or_default(),
    })
}

/// A `heartbeats` row's agent and heartbeat (its first four columns).
fn heartbeat(row: &postgres::Row) -> Result<(AgentId, Heartbeat)> {
    Ok((
        decode_id(row.get(0))?,
        Heartbeat {
            at: from_micros(row.get(1)),
            load: row.get(2),
            current_task: row.get(3),
        },
    ))
}

/// The stored cursor `name` (0 when absent).
pub(super) fn cursor(client: &mut Reader, name: &str) -> Result<u64> {
    let sequence: Option<i64> = client
        .query_opt("SELECT sequence FROM cursors WHERE name = $1", &[&name])
        .map_err(pg("reading a cursor"))?
        .map(|row| row.get(0));
    Ok(sequence.map_or(0, |s| s.max(0) as u64))
}

/// Stores `sequence` for `name` unless the stored one is higher (one
/// autocommit statement: durable once it returns).
pub(super) fn advance_cursor(client: &mut Reader, name: &str, sequence: i64) -> Result<()> {
    client
        .execute(
            "INSERT INTO cursors (name, sequence) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE
                 SET sequence = GREATEST(cursors.sequence, excluded.sequence)",
            &[&name, &sequence],
        )
        .map_err(pg("advancing a cursor"))?;
    Ok(())
}

/// The advisory lock key of a lease name (stable across processes).
fn lease_key(name: &str) -> i64 {
    // FNV-1a: stable, unlike std's randomly seeded hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"agent-lifecycle/".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// A LISTEN connection; `own` is this process's writer id in hex.
struct Listener {
    client: Client,
    own: String,
}

impl Listener {
    fn take(&self, wake: Wake, payload: &str) -> Wake {
        match (wake, announced(payload, &self.own)) {
            (wake, None) => match wake {
                Wake::TimedOut => Wake::OwnOnly,
                other => other,
            },
            (Wake::Others(before), Some(sequence)) => Wake::Others(before.max(sequence)),
            (_, Some(sequence)) => Wake::Others(sequence),
        }
    }
}

impl CommitFeed for Listener {
    fn wait(&mut self, timeout: Duration) -> Result<Wake> {
        let first = self
            .client
            .notifications()
            .timeout_iter(timeout)
            .next()
            .map_err(pg("waiting for commits"))?;
        let Some(first) = first else {
            if self.client.is_closed() {
                return Err(StoreError::backend(
                    "waiting for commits",
                    std::io::Error::other("the notification connection closed"),
                ));
            }
            return Ok(Wake::TimedOut);
        };
        let mut wake = self.take(Wake::TimedOut, first.payload());
        // Whatever else is already buffered is covered by the same read of
        // the log.
        let mut payloads = Vec::new();
        {
            let mut notifications = self.client.notifications();
            let mut buffered = notifications.iter();
            while let Some(next) = buffered.next().map_err(pg("waiting for commits"))? {
                payloads.push(next.payload().to_string());
            }
        }
        for payload in &payloads {
            wake = self.take(wake, payload);
        }
        Ok(wake)
    }
}

/// A session-level advisory lock on a connection of its own.
struct AdvisoryLease {
    client: Client,
}

impl Lease for AdvisoryLease {
    fn is_held(&mut self) -> bool {
        !self.client.is_closed() && self.client.simple_query("SELECT 1").is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_tell_own_commits_from_others() {
        let own = "00ff";
        assert_eq!(announced("42 00ff", own), None);
        assert_eq!(announced("42 0aaa", own), Some(42));
        // A process that does not name itself, or a sequence that does not
        // parse, is another process's commit of unknown extent.
        assert_eq!(announced("42", own), Some(42));
        assert_eq!(announced("", own), Some(u64::MAX));
    }
}
