//! PostgreSQL queries: each runs on one reader connection and decodes its
//! rows with [`super::rows`]. Depends on nothing above the store.

use std::{sync::Arc, time::SystemTime};

use postgres::types::ToSql;

use super::{
    pg,
    readers::Reader,
    rows::{
        EVENT_COLUMNS, SELECT_AGENTS, agent_from_row, decode_id, decode_labels, record_from_row,
    },
};
use crate::{
    domain::{AgentId, TransitionRecord},
    store::{AgentIdentity, AuditQuery, HistoryRange, Recovered, Result, codec::to_micros},
};

/// An unsigned bound as a PostgreSQL `bigint` (saturating).
fn int(value: u64) -> i64 {
    value.min(i64::MAX as u64) as i64
}

/// A count as a PostgreSQL `bigint` (saturating).
fn count(value: usize) -> i64 {
    value.min(i64::MAX as usize) as i64
}

/// Every agent and the head, read in one snapshot.
pub(super) fn load(client: &mut Reader) -> Result<Recovered> {
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(pg("loading agents"))?;
    let rows = tx.query(SELECT_AGENTS, &[]).map_err(pg("loading agents"))?;
    let agents = rows
        .iter()
        .map(agent_from_row)
        .collect::<Result<Vec<_>>>()?;
    let head: i64 = tx
        .query_one("SELECT value FROM meta WHERE key = 'head'", &[])
        .map_err(pg("reading the head sequence"))?
        .get(0);
    tx.commit().map_err(pg("loading agents"))?;
    Ok(Recovered {
        agents,
        head: head as u64,
    })
}

/// The last batch `writer_id` committed.
pub(super) fn last_batch(client: &mut Reader, writer_id: &[u8]) -> Result<Option<i64>> {
    Ok(client
        .query_opt(
            "SELECT last_batch FROM writers WHERE writer_id = $1",
            &[&writer_id],
        )
        .map_err(pg("reading the last batch"))?
        .map(|row| row.get(0)))
}

/// `meta.head`.
pub(super) fn head(client: &mut Reader) -> Result<u64> {
    let head: i64 = client
        .query_one("SELECT value FROM meta WHERE key = 'head'", &[])
        .map_err(pg("reading the head sequence"))?
        .get(0);
    Ok(head as u64)
}

/// The name and labels of each agent of `ids` (the keys of the `agents`
/// table) that the database holds.
pub(super) fn identities(
    client: &mut Reader,
    ids: &[&[u8]],
) -> Result<Vec<(AgentId, AgentIdentity)>> {
    client
        .query(
            "SELECT agent_id, name, labels FROM agents WHERE agent_id = ANY($1::bytea[])",
            &[&ids],
        )
        .map_err(pg("reading agents"))?
        .iter()
        .map(|row| {
            Ok((
                decode_id(row.get(0))?,
                AgentIdentity {
                    name: Arc::from(row.get::<_, &str>(1)),
                    labels: Arc::new(decode_labels(row.get(2))?),
                },
            ))
        })
        .collect()
}

/// The events of `sql` (selecting [`EVENT_COLUMNS`]) with `params`.
fn events(
    client: &mut Reader,
    context: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Arc<TransitionRecord>>> {
    client
        .query(sql, params)
        .map_err(pg(context))?
        .iter()
        .map(record_from_row)
        .collect()
}

/// Up to `max` events after `after`, in sequence order.
pub(super) fn events_after(
    client: &mut Reader,
    after: u64,
    max: usize,
) -> Result<Vec<Arc<TransitionRecord>>> {
    events(
        client,
        "reading events",
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE sequence > $1 ORDER BY sequence LIMIT $2"
        ),
        &[&int(after), &count(max)],
    )
}

/// The oldest retained sequence, `head + 1` when the log is empty.
pub(super) fn oldest_sequence(client: &mut Reader) -> Result<u64> {
    let row = client
        .query_one(
            "SELECT (SELECT min(sequence) FROM events),
                    (SELECT value FROM meta WHERE key = 'head')",
            &[],
        )
        .map_err(pg("reading the oldest event"))?;
    let oldest: Option<i64> = row.get(0);
    let head: i64 = row.get(1);
    Ok(oldest.map_or(head as u64 + 1, |s| s as u64))
}

/// One agent's events in `range`, oldest first.
pub(super) fn history(
    client: &mut Reader,
    agent_id: AgentId,
    range: HistoryRange,
) -> Result<Vec<Arc<TransitionRecord>>> {
    events(
        client,
        "reading history",
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE agent_id = $1 AND sequence > $2
             AND sequence <= $3 ORDER BY sequence LIMIT $4"
        ),
        &[
            &agent_id.as_bytes().as_slice(),
            &int(range.after),
            &int(range.upto),
            &count(range.max),
        ],
    )
}

/// The sequence of the agent's `n`-th newest event at or below `upto`
/// (`n >= 1`).
pub(super) fn nth_newest(
    client: &mut Reader,
    agent_id: AgentId,
    upto: u64,
    n: u64,
) -> Result<Option<u64>> {
    Ok(client
        .query_opt(
            "SELECT sequence FROM events WHERE agent_id = $1 AND sequence <= $2
             ORDER BY sequence DESC LIMIT 1 OFFSET $3",
            &[&agent_id.as_bytes().as_slice(), &int(upto), &int(n - 1)],
        )
        .map_err(pg("reading history"))?
        .map(|row| row.get::<_, i64>(0) as u64))
}

/// The events with a request tag committed at or after `since`, in
/// sequence order.
pub(super) fn requests_since(
    client: &mut Reader,
    since: SystemTime,
) -> Result<Vec<Arc<TransitionRecord>>> {
    events(
        client,
        "reading recent requests",
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE request <> '' AND at >= $1
             ORDER BY sequence"
        ),
        &[&to_micros(since)],
    )
}

/// The database's size in bytes.
pub(super) fn size_bytes(client: &mut Reader) -> Result<u64> {
    let size: i64 = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .map_err(pg("reading the database size"))?
        .get(0);
    Ok(u64::try_from(size).unwrap_or(0))
}

/// The events `query` selects, newest first.
pub(super) fn audit(client: &mut Reader, query: &AuditQuery) -> Result<Vec<Arc<TransitionRecord>>> {
    let before = int(query.before);
    let max = count(query.max);
    let id = query.agent_id.map(|id| *id.as_bytes());
    let id = id.as_ref().map(|bytes| bytes.as_slice());
    let mut conditions = vec!["sequence < $1"];
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&before];
    if let Some(id) = &id {
        params.push(id);
        conditions.push("agent_id = $2");
    }
    if let Some(principal) = &query.principal {
        params.push(principal);
        conditions.push(if id.is_some() {
            "principal = $3"
        } else {
            "principal = $2"
        });
    }
    params.push(&max);
    let text = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE {} ORDER BY sequence DESC LIMIT ${}",
        conditions.join(" AND "),
        params.len()
    );
    events(client, "reading the audit trail", &text, &params)
}

/// How many events of the agent are retained.
pub(super) fn history_count(client: &mut Reader, agent_id: AgentId) -> Result<u64> {
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE agent_id = $1",
            &[&agent_id.as_bytes().as_slice()],
        )
        .map_err(pg("counting history"))?
        .get(0);
    Ok(count as u64)
}
