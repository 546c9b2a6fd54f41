-- pgbench-init.sql: schema + data for the agent-lifecycle transition benchmark.
-- Run with:  psql -X -v ON_ERROR_STOP=1 [-v agents=10000] -f pgbench-init.sql "$TEST_DATABASE_URL"
-- Re-running drops and re-creates everything (each benchmark configuration starts equal).
\set QUIET on
SET client_min_messages = warning;
\if :{?agents}
\else
  \set agents 10000
\endif

DROP TABLE IF EXISTS agent_events, agent_events_ordered, agents, event_seq CASCADE;
DROP FUNCTION IF EXISTS bench_state(bigint);

-- Lifecycle state after `v` transitions: a fixed 5-state cycle, so a transition's from/to
-- states follow from the new version alone (pgbench cannot carry the old row around cheaply).
CREATE FUNCTION bench_state(v bigint) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (ARRAY['pending','starting','running','stopping','stopped'])[(v % 5) + 1];

CREATE TABLE agents (
    id          bigint      PRIMARY KEY,
    state       text        NOT NULL,
    version     bigint      NOT NULL,
    spec        text        NOT NULL,          -- some payload so rows are not unrealistically small
    updated_at  timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);                      -- room for HOT updates (no indexed column changes)

-- Variant A (transition.sql): event ids from a bigserial (a sequence: not commit-ordered, gaps
-- possible, no lock held until commit).
CREATE TABLE agent_events (
    seq         bigserial   PRIMARY KEY,
    agent_id    bigint      NOT NULL REFERENCES agents (id),
    version     bigint      NOT NULL,          -- agent version this event produced
    from_state  text        NOT NULL,
    to_state    text        NOT NULL,
    reason      text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_events_agent ON agent_events (agent_id, version);

-- Variant B (transition-counter.sql): event ids from a single counter row, updated in the
-- same transaction: gap-free and in commit order, but the row lock serialises all commits.
CREATE TABLE event_seq (
    id   int    PRIMARY KEY,
    head bigint NOT NULL
);
INSERT INTO event_seq VALUES (1, 0);

CREATE TABLE agent_events_ordered (
    seq         bigint      PRIMARY KEY,       -- = event_seq.head at insert time
    agent_id    bigint      NOT NULL REFERENCES agents (id),
    version     bigint      NOT NULL,
    from_state  text        NOT NULL,
    to_state    text        NOT NULL,
    reason      text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_events_ordered_agent ON agent_events_ordered (agent_id, version);

INSERT INTO agents (id, state, version, spec)
SELECT g, bench_state(0), 0, repeat('x', 200)
FROM generate_series(1, :agents) AS g;

VACUUM ANALYZE agents, agent_events, agent_events_ordered, event_seq;
CHECKPOINT;
