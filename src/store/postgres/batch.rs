//! What one commit writes to PostgreSQL: a row type per table part
//! ([`NewAgent`], [`AgentUpdate`], [`EventRow`]), gathered by
//! [`BatchRows`] into the array parameters of the one statement
//! [`WRITE_BATCH`]. The statement's columns and placeholders are generated
//! from the row types' column lists (see [`super::arrays`]). Depends on the
//! domain's records and the store's codec.

use std::{sync::LazyLock, time::SystemTime};

use super::arrays::{Arrays, Param, Placeholders, assignments, list, row_arrays};
use crate::{
    domain::AgentState,
    store::{
        AgentChange, BatchId,
        codec::{encode_map, encode_request, to_micros},
    },
};

row_arrays! {
    /// An agent the batch creates: its `agents` row, but for the times
    /// (the commit's) and `last_sequence` (computed from `last_offset`).
    struct NewAgent<'a>, arrays NewAgents {
        agent_id: &'a [u8] = "bytea",
        name: &'a str = "text",
        labels: String = "text",
        state: &'static str = "text",
        version: i64 = "bigint",
        last_from: Option<&'static str> = "text",
        last_reason: &'a str = "text",
        last_triggered_by: &'a str = "text",
        last_metadata: String = "text",
        last_principal: &'a str = "text",
        last_request: String = "text",
    }
    computed {
        /// The 1-based offset of its last event in the batch:
        /// `last_sequence` is the batch's base plus this.
        last_offset: i64 = "bigint",
    }
}

row_arrays! {
    /// An agent the batch advances: the columns of its `agents` row that
    /// change, but for `updated_at` (the commit's time) and
    /// `last_sequence` (computed from `last_offset`).
    struct AgentUpdate<'a>, arrays AgentUpdates {
        agent_id: &'a [u8] = "bytea",
        state: &'static str = "text",
        version: i64 = "bigint",
        last_from: Option<&'static str> = "text",
        last_reason: &'a str = "text",
        last_triggered_by: &'a str = "text",
        last_metadata: String = "text",
        last_principal: &'a str = "text",
        last_request: String = "text",
    }
    computed {
        /// As [`NewAgent::last_offset`].
        last_offset: i64 = "bigint",
    }
}

row_arrays! {
    /// An event of the batch: its `events` row, but for `sequence` (the
    /// batch's base plus its 1-based position) and `at` (the commit's).
    struct EventRow<'a>, arrays Events {
        agent_id: &'a [u8] = "bytea",
        version: i64 = "bigint",
        from_state: Option<&'static str> = "text",
        to_state: &'static str = "text",
        reason: &'a str = "text",
        triggered_by: &'a str = "text",
        metadata: String = "text",
        principal: &'a str = "text",
        request: String = "text",
    }
}

/// The parameters [`WRITE_BATCH`] writes by hand, before the tables'
/// arrays: `$1` the number of events, `$2` the commit time (microseconds),
/// `$3` the writer id, `$4` the batch id, `$5` and `$6` the expected
/// versions (agent ids and versions, see [`BatchRows::expect`]).
const SCALARS: usize = 6;

/// The rows of the three parts of a batch.
#[derive(Default)]
struct Tables<'a> {
    new_agents: NewAgents<'a>,
    updates: AgentUpdates<'a>,
    events: Events<'a>,
}

impl Tables<'_> {
    /// The parts in the order of their parameters, after [`SCALARS`]: the
    /// one list both the statement's text and its parameters follow.
    fn in_order(&self) -> [&dyn Arrays; 3] {
        [&self.new_agents, &self.updates, &self.events]
    }
}

/// The one statement of a commit: check the expected versions, advance the
/// counter by the batch's event count, then write the agents and events
/// with sequences `base + offset`, record the batch id, and notify.
/// Returns the base and how many agents it created (fewer than asked when
/// one of the ids exists after all). When a stored version differs from
/// the expected one (an absent agent counts as version 0), it writes
/// nothing and returns no row.
pub(super) static WRITE_BATCH: LazyLock<String> = LazyLock::new(|| {
    let tables = Tables::default();
    let mut p = Placeholders::after(SCALARS);
    let [new_agents, updates, events] = tables.in_order().map(|t| t.unnest(&mut p));
    let new_fields = tables.new_agents.fields().join(", ");
    let update_fields = tables.updates.fields().join(", ");
    let event_fields = tables.events.fields().join(", ");
    format!(
        "
WITH expected AS (
    SELECT coalesce(bool_and(coalesce(a.version, 0) = x.version), true) AS ok
    FROM unnest($5::bytea[], $6::bigint[]) AS x(agent_id, version)
    LEFT JOIN agents AS a ON a.agent_id = x.agent_id
),
h AS (
    UPDATE meta SET value = value + $1
    WHERE key = 'head' AND (SELECT ok FROM expected)
    RETURNING value - $1 AS base
),
ins AS (
    INSERT INTO agents ({new_columns}, created_at, updated_at, last_sequence)
    SELECT {new_values}, $2, $2, h.base + n.last_offset
    FROM h, {new_agents} AS n({new_fields})
    ON CONFLICT (agent_id) DO NOTHING
    RETURNING 1
),
upd AS (
    UPDATE agents AS a SET {update_set}, updated_at = $2, last_sequence = h.base + u.last_offset
    FROM h, {updates} AS u({update_fields})
    WHERE a.agent_id = u.agent_id
    RETURNING 1
),
ev AS (
    INSERT INTO events ({event_columns}, sequence, at)
    SELECT {event_values}, h.base + e.pos, $2
    FROM h, {events} WITH ORDINALITY AS e({event_fields}, pos)
),
w AS (
    INSERT INTO writers (writer_id, last_batch, seen_at) SELECT $3, $4, $2 FROM h
    ON CONFLICT (writer_id) DO UPDATE
        SET last_batch = excluded.last_batch, seen_at = excluded.seen_at
)
SELECT h.base, (SELECT count(*) FROM ins), pg_notify('{channel}', (h.base + $1)::text || ' ' || encode($3, 'hex'))
FROM h",
        new_columns = list("", NewAgents::COLUMNS),
        new_values = list("n", NewAgents::COLUMNS),
        update_set = assignments("u", AgentUpdates::COLUMNS, "agent_id"),
        event_columns = list("", Events::COLUMNS),
        event_values = list("e", Events::COLUMNS),
        channel = super::CHANNEL,
    )
});

/// The parameters of one execution of [`WRITE_BATCH`].
pub(super) struct BatchRows<'a> {
    /// How many events.
    events: i64,
    /// The commit time, in microseconds.
    at: i64,
    writer_id: &'a [u8],
    batch_id: i64,
    /// The agents whose stored versions the statement checks, and those
    /// versions.
    expected_ids: Vec<&'a [u8]>,
    expected_versions: Vec<i64>,
    tables: Tables<'a>,
}

impl<'a> BatchRows<'a> {
    /// No rows yet, for batch `id` of writer `writer_id` committed `at`.
    pub(super) fn new(writer_id: &'a [u8; 16], id: BatchId, at: SystemTime) -> Self {
        BatchRows {
            events: 0,
            at: to_micros(at),
            writer_id: writer_id.as_slice(),
            batch_id: id.0 as i64,
            expected_ids: Vec::new(),
            expected_versions: Vec::new(),
            tables: Tables::default(),
        }
    }

    /// Has the statement write nothing unless `change`'s agent is stored
    /// at the change's prior version (absent for 0).
    pub(super) fn expect(&mut self, change: &'a AgentChange) {
        self.expected_ids
            .push(change.agent_id.as_bytes().as_slice());
        self.expected_versions.push(change.prior_version as i64);
    }

    /// How many agents the rows create.
    pub(super) fn new_agents(&self) -> usize {
        self.tables.new_agents.rows()
    }

    /// Adds the rows of a change whose prior version was found to match.
    pub(super) fn add(&mut self, change: &'a AgentChange) {
        let Some(last) = change.records.last() else {
            return;
        };
        let agent_id = change.agent_id.as_bytes().as_slice();
        for record in &change.records {
            self.events += 1;
            self.tables.events.push(EventRow {
                agent_id,
                version: record.version as i64,
                from_state: record.from.map(AgentState::as_str),
                to_state: record.to.as_str(),
                reason: &record.reason,
                triggered_by: &record.triggered_by,
                metadata: encode_map(&record.metadata, record.metadata.is_empty()),
                principal: &record.principal,
                request: encode_request(record.request.as_deref()),
            });
        }
        let last_metadata = encode_map(&last.metadata, last.metadata.is_empty());
        let last_request = encode_request(last.request.as_deref());
        match &change.identity {
            Some(identity) if change.prior_version == 0 => self.tables.new_agents.push(NewAgent {
                agent_id,
                name: &identity.name,
                labels: encode_map(&*identity.labels, identity.labels.is_empty()),
                state: last.to.as_str(),
                version: last.version as i64,
                last_from: last.from.map(AgentState::as_str),
                last_reason: &last.reason,
                last_triggered_by: &last.triggered_by,
                last_metadata,
                last_principal: &last.principal,
                last_request,
                last_offset: self.events,
            }),
            _ => self.tables.updates.push(AgentUpdate {
                agent_id,
                state: last.to.as_str(),
                version: last.version as i64,
                last_from: last.from.map(AgentState::as_str),
                last_reason: &last.reason,
                last_triggered_by: &last.triggered_by,
                last_metadata,
                last_principal: &last.principal,
                last_request,
                last_offset: self.events,
            }),
        }
    }

    /// The parameters, in [`WRITE_BATCH`]'s order.
    pub(super) fn params(&self) -> Vec<Param<'_>> {
        let mut params: Vec<Param<'_>> = vec![
            &self.events,
            &self.at,
            &self.writer_id,
            &self.batch_id,
            &self.expected_ids,
            &self.expected_versions,
        ];
        for table in self.tables.in_order() {
            table.params(&mut params);
        }
        params
    }
}

#[cfg(test)]
mod tests {
    use super::{BatchRows, WRITE_BATCH};
    use crate::store::BatchId;

    /// The statement's highest placeholder is its last parameter.
    #[test]
    fn write_batch_numbers_every_parameter_once() {
        let rows = BatchRows::new(&[0; 16], BatchId(1), std::time::UNIX_EPOCH);
        let count = rows.params().len();
        assert!(WRITE_BATCH.contains(&format!("${count}::")));
        assert!(!WRITE_BATCH.contains(&format!("${}", count + 1)));
    }
}
