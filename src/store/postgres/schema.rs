//! The PostgreSQL schema: one ordered list of migrations, applied at open
//! under a transaction-level advisory lock, so that several processes
//! starting at once migrate once. `meta.schema_version` is the database's
//! version; a database from a newer program is refused. Depends only on
//! the `postgres` crate.

use postgres::Client;

use super::pg;
use crate::store::{Result, StoreError};

/// Advisory lock key held while migrating (transaction level).
const MIGRATION_LOCK: i64 = 0x6167_6c63_6d69_6772;

/// One migration: idempotent SQL that makes a database of version
/// `version - 1` one of `version`.
struct Step {
    /// The version the step makes.
    version: i64,
    /// The error context of a failure.
    context: &'static str,
    sql: &'static str,
}

/// The migrations, oldest first. The first runs at every open (it creates
/// `meta`, where the version is read, and the tables a version-1 database
/// may lack); the others when the database is older than their version.
const STEPS: [Step; 4] = [
    // 1: `meta` (the head counter), `agents`, `events` indexed by agent,
    // `writers` (each process's last batch) and `heartbeats`.
    Step {
        version: 1,
        context: "creating the schema",
        sql: "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id          BYTEA PRIMARY KEY,
    name              TEXT NOT NULL,
    labels            TEXT NOT NULL,
    state             TEXT NOT NULL,
    version           BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    last_sequence     BIGINT NOT NULL,
    last_from         TEXT,
    last_reason       TEXT NOT NULL,
    last_triggered_by TEXT NOT NULL,
    last_metadata     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    sequence     BIGINT PRIMARY KEY,
    agent_id     BYTEA NOT NULL,
    version      BIGINT NOT NULL,
    from_state   TEXT,
    to_state     TEXT NOT NULL,
    at           BIGINT NOT NULL,
    reason       TEXT NOT NULL,
    triggered_by TEXT NOT NULL,
    metadata     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_agent ON events (agent_id, sequence);
-- The last batch each writer (one per server process) committed: after a
-- failed commit, the writer reads it to learn whether the batch landed.
CREATE TABLE IF NOT EXISTS writers (
    writer_id  BYTEA PRIMARY KEY,
    last_batch BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL
);
-- The newest heartbeat of each agent, whichever process received it, so
-- that the process running the health monitor sees them all. Part of
-- version 1: older programs ignore it.
CREATE TABLE IF NOT EXISTS heartbeats (
    agent_id     BYTEA PRIMARY KEY,
    at           BIGINT NOT NULL,
    load         DOUBLE PRECISION,
    current_task TEXT
);
INSERT INTO meta (key, value) VALUES ('head', 0) ON CONFLICT (key) DO NOTHING;
",
    },
    // 2: every record's principal ('' without authentication) and request
    // tag, indexed by principal and by time for the tagged ones.
    Step {
        version: 2,
        context: "migrating the schema to version 2",
        sql: "
ALTER TABLE agents ADD COLUMN IF NOT EXISTS last_principal TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN IF NOT EXISTS last_request TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN IF NOT EXISTS principal TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN IF NOT EXISTS request TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS events_by_principal ON events (principal, sequence);
CREATE INDEX IF NOT EXISTS events_with_request ON events (at) WHERE request <> '';
",
    },
    // 3: `cursors`, how far each named consumer of the log has handled it;
    // compaction never touches it.
    Step {
        version: 3,
        context: "migrating the schema to version 3",
        sql: "
CREATE TABLE IF NOT EXISTS cursors (
    name     TEXT PRIMARY KEY,
    sequence BIGINT NOT NULL
);
",
    },
    // 4: each heartbeat row's `saved`, the number of the save that last
    // wrote it (from `heartbeat_saves`, taken under a lock held to the
    // commit, so numbers follow commit order): the monitor reads only the
    // rows saved after those it has.
    Step {
        version: 4,
        context: "migrating the schema to version 4",
        sql: "
CREATE SEQUENCE IF NOT EXISTS heartbeat_saves;
ALTER TABLE heartbeats ADD COLUMN IF NOT EXISTS saved BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS heartbeats_by_save ON heartbeats (saved);
",
    },
];

/// The schema version this program writes.
const SCHEMA_VERSION: i64 = STEPS[STEPS.len() - 1].version;

/// Creates or migrates the schema, in one transaction.
///
/// # Errors
/// The database holds a newer schema, or a step failed (nothing changed).
pub(super) fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client
        .transaction()
        .map_err(pg("beginning the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg("locking the schema"))?;
    let [first, later @ ..] = &STEPS;
    tx.batch_execute(first.sql).map_err(pg(first.context))?;
    let found: Option<i64> = tx
        .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
        .map_err(pg("reading the schema version"))?
        .map(|row| row.get(0));
    if let Some(found) = found
        && found > SCHEMA_VERSION
    {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for step in later {
        if found.is_none_or(|found| found < step.version) {
            tx.batch_execute(step.sql).map_err(pg(step.context))?;
        }
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&SCHEMA_VERSION],
    )
    .map_err(pg("writing the schema version"))?;
    tx.commit().map_err(pg("committing the migration"))
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
