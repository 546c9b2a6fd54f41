-- transition-counter.sql: as transition.sql, but the event id comes from a counter row updated
-- in the same transaction (variant B: gap-free, commit-ordered sequence).
--   pgbench -n -f transition-counter.sql -c 8 -j 2 -T 20
-- The row lock on event_seq is taken by the second UPDATE and held until COMMIT returns, i.e.
-- across the INSERT round trip and the WAL flush: commits are serialised, one fsync each.
\set id random(1, 10000)
BEGIN;
UPDATE agents
   SET version = version + 1, state = bench_state(version + 1), updated_at = now()
 WHERE id = :id
RETURNING version AS v \gset
UPDATE event_seq SET head = head + 1 WHERE id = 1 RETURNING head \gset
INSERT INTO agent_events_ordered (seq, agent_id, version, from_state, to_state, reason)
VALUES (:head, :id, :v, bench_state(:v - 1), bench_state(:v), 'pgbench transition');
END;
