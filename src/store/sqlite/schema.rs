//! The SQLite schema: one ordered list of migrations, applied at open.
//! `PRAGMA user_version` is the version of the file. Depends on nothing
//! but rusqlite.

use rusqlite::Connection;

use super::sql;
use crate::store::{Result, StoreError};

/// One migration: the SQL that makes a file of version `version - 1` (0:
/// an empty file) one of `version`.
pub(in crate::store) struct Step {
    /// The version the step makes.
    pub version: i64,
    /// The error context of a failure.
    context: &'static str,
    /// The statements, run in one transaction that ends by setting
    /// `user_version`.
    pub sql: &'static str,
}

/// The migrations, oldest first. The last one's version is the version this
/// program writes.
pub(in crate::store) const STEPS: [Step; 8] = [
    // 1: `agents` (identity and state as of the last transition), `events`
    // (the log, keyed by sequence, indexed by agent) and `meta`.
    Step {
        version: 1,
        context: "creating the schema",
        sql: "
CREATE TABLE IF NOT EXISTS agents (
    agent_id          BLOB PRIMARY KEY,
    name              TEXT NOT NULL,
    labels            TEXT NOT NULL,
    state             TEXT NOT NULL,
    version           INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    last_sequence     INTEGER NOT NULL,
    last_from         TEXT,
    last_reason       TEXT NOT NULL,
    last_triggered_by TEXT NOT NULL,
    last_metadata     TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    sequence     INTEGER PRIMARY KEY,
    agent_id     BLOB NOT NULL,
    version      INTEGER NOT NULL,
    from_state   TEXT,
    to_state     TEXT NOT NULL,
    at           INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    triggered_by TEXT NOT NULL,
    metadata     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_agent ON events (agent_id, sequence);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
",
    },
    // 2: `meta.head`, the sequence counter, and `meta.last_batch`, the id of
    // the last committed batch, both advanced by every commit.
    Step {
        version: 2,
        context: "migrating the schema to version 2",
        sql: "
INSERT INTO meta (key, value)
    SELECT 'head', coalesce(max(last_sequence), 0) FROM agents WHERE true
    ON CONFLICT (key) DO NOTHING;
INSERT INTO meta (key, value) VALUES ('last_batch', 0) ON CONFLICT (key) DO NOTHING;
",
    },
    // 3: every record's principal ('' without authentication) and request
    // tag, indexed by principal and by time for the tagged ones.
    Step {
        version: 3,
        context: "migrating the schema to version 3",
        sql: "
ALTER TABLE agents ADD COLUMN last_principal TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN last_request TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN principal TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN request TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS events_by_principal ON events (principal, sequence);
CREATE INDEX IF NOT EXISTS events_with_request ON events (at) WHERE request <> '';
",
    },
    // 4: the log indexed by agent in the table `agent_events`, complete up
    // to `meta.indexed`, instead of the index `events_by_agent`.
    Step {
        version: 4,
        context: "migrating the schema to version 4",
        sql: "
CREATE TABLE IF NOT EXISTS agent_events (
    agent_id BLOB NOT NULL,
    sequence INTEGER NOT NULL,
    PRIMARY KEY (agent_id, sequence)
) WITHOUT ROWID;
INSERT INTO agent_events (agent_id, sequence) SELECT agent_id, sequence FROM events WHERE true
    ON CONFLICT DO NOTHING;
DROP INDEX IF EXISTS events_by_agent;
INSERT INTO meta (key, value) SELECT 'indexed', value FROM meta WHERE key = 'head'
    ON CONFLICT (key) DO NOTHING;
",
    },
    // 5: agents' rows up to date as of `meta.synced` only; the log indexed
    // by principal in `principal_events` instead of `events_by_principal`.
    Step {
        version: 5,
        context: "migrating the schema to version 5",
        sql: "
INSERT INTO meta (key, value) SELECT 'synced', value FROM meta WHERE key = 'head'
    ON CONFLICT (key) DO NOTHING;
CREATE TABLE IF NOT EXISTS principal_events (
    principal TEXT NOT NULL,
    sequence  INTEGER NOT NULL,
    PRIMARY KEY (principal, sequence)
) WITHOUT ROWID;
INSERT INTO principal_events (principal, sequence)
    SELECT principal, sequence FROM events
    WHERE sequence <= (SELECT value FROM meta WHERE key = 'indexed')
    ON CONFLICT DO NOTHING;
DROP INDEX IF EXISTS events_by_principal;
",
    },
    // 6: no table changes. The index tables may also hold events after
    // `meta.indexed`, so readers must skip those in the log's tail.
    Step {
        version: 6,
        context: "migrating the schema to version 6",
        sql: "",
    },
    // 7: `cursors`, how far each named consumer of the log has handled it;
    // compaction never touches it.
    Step {
        version: 7,
        context: "migrating the schema to version 7",
        sql: "
CREATE TABLE IF NOT EXISTS cursors (
    name     TEXT PRIMARY KEY,
    sequence INTEGER NOT NULL
) WITHOUT ROWID;
",
    },
    // 8: no table changes. Commits no longer write `meta.head` and
    // `meta.last_batch` (see the store's `commit`): the head is the newest
    // event's sequence when that is larger than `meta.head`, which
    // compaction records. A program of version 7 would read a stale head.
    Step {
        version: 8,
        context: "migrating the schema to version 8",
        sql: "",
    },
];

/// The schema version this program writes.
const SCHEMA_VERSION: i64 = STEPS[STEPS.len() - 1].version;

/// Creates or migrates the schema of the file `conn` is open on.
///
/// # Errors
/// The file holds a newer schema, or a step failed (its transaction rolled
/// back; the steps before it stay).
pub(super) fn migrate(conn: &Connection) -> Result<()> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("reading the schema version"))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for step in STEPS.iter().filter(|step| step.version > found) {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {} PRAGMA user_version = {}; COMMIT;",
            step.sql, step.version
        ))
        .map_err(sql(step.context))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::STEPS;

    #[test]
    fn steps_are_numbered_one_after_another() {
        for (index, step) in STEPS.iter().enumerate() {
            assert_eq!(step.version, index as i64 + 1);
        }
    }
}
