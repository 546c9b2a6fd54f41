//! SQLite compaction: deletes the oldest events that retention lets go,
//! with their index entries, after the agents' rows took them in. Depends
//! on nothing above the store.

use rusqlite::{Connection, TransactionBehavior};

use super::{Writer, commit::refresh_agent_rows, index::Unindexed, read_head, read_meta, sql};
use crate::store::{Result, RetentionBounds, codec::to_micros};

/// Deletes the longest prefix of the log, at most `max_rows` long, that
/// `bounds` lets go, so that what remains is one contiguous range. Returns
/// how many events it deleted.
///
/// # Errors
/// The back end failed; nothing was deleted.
pub(super) fn compact(
    writer: &mut Writer,
    bounds: &RetentionBounds,
    max_rows: usize,
) -> Result<usize> {
    let (last, count) = deletable_prefix(&writer.conn, bounds, max_rows)?;
    if let Some(last) = last {
        delete_through(writer, last)?;
    }
    Ok(count)
}

/// The last sequence and the length of the prefix [`compact`] deletes.
fn deletable_prefix(
    conn: &Connection,
    bounds: &RetentionBounds,
    max_rows: usize,
) -> Result<(Option<u64>, usize)> {
    let before = bounds.before.map(to_micros);
    let mut last_deletable = None;
    let mut count = 0;
    let mut stmt = conn
        .prepare_cached("SELECT sequence, at FROM events ORDER BY sequence LIMIT ?1 + 0")
        .map_err(sql("compacting"))?;
    let mut rows = stmt.query([max_rows as i64]).map_err(sql("compacting"))?;
    while let Some(row) = rows.next().map_err(sql("compacting"))? {
        let sequence = row.get::<_, i64>(0).map_err(sql("compacting"))? as u64;
        let at: i64 = row.get(1).map_err(sql("compacting"))?;
        let by_count = sequence <= bounds.through;
        let by_age = before.is_some_and(|c| at < c);
        if !(by_count || by_age) {
            break;
        }
        last_deletable = Some(sequence);
        count += 1;
    }
    Ok((last_deletable, count))
}

/// Deletes the events up to `last` and their index entries, in one
/// transaction that first brings the agents' rows past them.
fn delete_through(writer: &mut Writer, last: u64) -> Result<()> {
    let Writer { conn, cache, .. } = writer;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("compacting"))?;
    let synced = read_meta(&tx, "synced")?;
    let head = read_head(&tx)?;
    if synced < last {
        refresh_agent_rows(&tx, synced, head)?;
        cache.synced = None;
    }
    // The head outlives the events: recorded before they go, in case
    // these are all of them.
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'head'",
        [head as i64],
    )
    .map_err(sql("compacting"))?;
    tx.execute(
        "DELETE FROM agent_events WHERE (agent_id, sequence) IN
         (SELECT agent_id, sequence FROM events WHERE sequence <= ?1)",
        [last as i64],
    )
    .and_then(|_| {
        tx.execute(
            "DELETE FROM principal_events WHERE (principal, sequence) IN
             (SELECT principal, sequence FROM events WHERE sequence <= ?1)",
            [last as i64],
        )
    })
    .and_then(|_| tx.execute("DELETE FROM events WHERE sequence <= ?1", [last as i64]))
    .map_err(sql("compacting"))?;
    // Unindexed events just deleted must not be indexed later: the next
    // commit indexes what remains of the tail instead.
    let forget_unindexed = last > read_meta(&tx, "indexed")?;
    tx.commit().map_err(sql("compacting"))?;
    if forget_unindexed {
        cache.unindexed = Unindexed::default();
    }
    Ok(())
}
