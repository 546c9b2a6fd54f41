//! The `cursors` table: how far each named consumer has handled the log.
//! Reads run on a reader connection; writes on the writer connection, one
//! autocommit upsert each (fsync'd before it returns, as a commit is).
//! Compaction never touches the table. Depends on nothing above the store.

use rusqlite::{Connection, OptionalExtension};

use super::sql;
use crate::store::Result;

/// The stored cursor `name` (0 when absent).
pub(super) fn cursor(conn: &Connection, name: &str) -> Result<u64> {
    let sequence: Option<i64> = conn
        .prepare_cached("SELECT sequence FROM cursors WHERE name = ?1")
        .and_then(|mut stmt| stmt.query_row([name], |r| r.get(0)).optional())
        .map_err(sql("reading a cursor"))?;
    Ok(sequence.map_or(0, |s| s.max(0) as u64))
}

/// Stores `sequence` for `name` unless the stored one is higher.
pub(super) fn advance(conn: &Connection, name: &str, sequence: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO cursors (name, sequence) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET sequence = max(sequence, excluded.sequence)",
    )
    .and_then(|mut stmt| stmt.execute(rusqlite::params![name, sequence]))
    .map_err(sql("advancing a cursor"))?;
    Ok(())
}
