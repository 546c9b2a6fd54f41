//! PostgreSQL compaction: one statement that deletes the oldest events
//! retention lets go. Depends on nothing above the store.

use postgres::Client;

use super::pg;
use crate::store::{Result, RetentionBounds, codec::to_micros};

/// Deletes the longest prefix of the log, at most `max_rows` long, that
/// `bounds` lets go, so that what remains is one contiguous range. Returns
/// how many events it deleted.
///
/// # Errors
/// The back end failed; nothing was deleted.
pub(super) fn compact(
    client: &mut Client,
    bounds: &RetentionBounds,
    max_rows: usize,
) -> Result<usize> {
    let through = bounds.through.min(i64::MAX as u64) as i64;
    let before = bounds.before.map_or(i64::MIN, to_micros);
    let max = max_rows.min(i64::MAX as usize) as i64;
    let deleted = client
        .execute(
            "WITH oldest AS (
                SELECT sequence, (sequence <= $1 OR at < $2) AS deletable
                FROM events ORDER BY sequence LIMIT $3),
             cut AS (
                SELECT coalesce(min(sequence) FILTER (WHERE NOT deletable), 0) AS stop
                FROM oldest),
             doomed AS (
                SELECT o.sequence FROM oldest o, cut
                WHERE o.deletable AND (cut.stop = 0 OR o.sequence < cut.stop))
             DELETE FROM events WHERE sequence IN (SELECT sequence FROM doomed)",
            &[&through, &before, &max],
        )
        .map_err(pg("compacting"))?;
    Ok(deleted as usize)
}
