-- transition.sql: one lifecycle transition per transaction (variant A: bigserial event ids).
--   pgbench -n -f transition.sql -c 8 -j 2 -T 20   (after psql -f pgbench-init.sql)
-- The product does a compare-and-set:  UPDATE agents SET state=$to, version=version+1
--   WHERE id=$id AND version=$expected  (expected version known from its in-memory state).
-- pgbench does not know the current version, so the UPDATE matches on id only and returns the
-- new version; the extra `AND version = ...` predicate costs nothing measurable on a primary-key
-- lookup, the row lock, the WAL and the round trips are the same.  Round trips per transaction:
-- BEGIN, UPDATE, INSERT, COMMIT - as a Rust `client.transaction()` with two statements.
\set id random(1, 10000)
BEGIN;
UPDATE agents
   SET version = version + 1, state = bench_state(version + 1), updated_at = now()
 WHERE id = :id
RETURNING version AS v \gset
INSERT INTO agent_events (agent_id, version, from_state, to_state, reason)
VALUES (:id, :v, bench_state(:v - 1), bench_state(:v), 'pgbench transition');
END;
