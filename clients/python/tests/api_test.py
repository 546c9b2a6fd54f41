#!/usr/bin/env python3
"""The Python client's surface against a live server (tests/it/clients/api.rs).

Usage: api_test.py HOST:PORT            every method, typed errors, watches
       api_test.py --rate-limited HOST:PORT   a server whose [limits] allow
                                        5 transitions per agent per second

Exits 0 when every check passed; the last line is `N passed, M failed`.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

from agent_lifecycle import (
    AsyncClient,
    Category,
    Client,
    InvalidArgumentError,
    NotFoundError,
    RateLimitedError,
    RequestIdReusedError,
    RetryPolicy,
    SequenceNotYetWrittenError,
    State,
    TransitionNotAllowedError,
    VersionMismatchError,
)

passed = 0
failed = 0


def check(name: str, test: Callable[[], None]) -> None:
    global passed, failed
    try:
        test()
        passed += 1
        print(f"ok {name}", flush=True)
    except Exception:
        failed += 1
        print(f"FAILED {name}", flush=True)
        traceback.print_exc()


def expect(error: type[BaseException], call: Callable[[], object]) -> BaseException:
    try:
        call()
    except error as e:
        return e
    raise AssertionError(f"expected {error.__name__}")


def main(addr: str) -> None:
    client = Client(addr)
    team = f"api-{uuid.uuid4().hex[:8]}"
    agent_id = str(uuid.uuid4())

    def lifecycle() -> None:
        first = client.register_agent(agent_id, name="api", labels={"team": team}, metadata={"k": [1, "a"]})
        assert first.state == State.REGISTERED and len(first.transitions) == 1
        again = client.register_agent(agent_id, name="api", labels={"team": team})
        assert again.transitions == [] and again.agent.version == 1
        deployed = client.deploy_agent(agent_id, reason="ship")
        assert [State(t.to_state) for t in deployed.transitions] == [State.DEPLOYING, State.DEPLOYED]
        started = client.start_agent(agent_id, triggered_by="api-test")
        assert started.state == State.ONLINE and started.agent.version == 5
        assert started.sequence == started.transitions[-1].sequence > first.sequence
        assert client.assign_task(agent_id, "t-1").state == State.BUSY
        assert client.complete_task(agent_id, "t-1").state == State.IDLE
        assert client.handle_error(agent_id, "boom").state == State.ERROR
        assert client.put_in_maintenance(agent_id, reason="patch").state == State.MAINTENANCE
        assert client.resume_from_maintenance(agent_id).state == State.ONLINE
        assert client.transition_agent(agent_id, "idle", expected_version=10).state == State.IDLE

    check("a lifecycle through every mutating method", lifecycle)

    def refused() -> None:
        rules = client.get_transition_rules()
        assert rules[State.REGISTERED] == [State.DEPLOYING, State.DELETED]
        e = expect(TransitionNotAllowedError, lambda: client.transition_agent(agent_id, State.REGISTERED))
        assert isinstance(e, TransitionNotAllowedError)
        assert e.reason == "TRANSITION_NOT_ALLOWED" and e.current_state == State.IDLE
        assert e.target_state == State.REGISTERED and e.allowed_targets == rules[State.IDLE], e.allowed_targets
        assert e.precondition_violations and e.precondition_violations[0].type == "STATE"
        e = expect(TransitionNotAllowedError, lambda: client.complete_task(agent_id))
        assert isinstance(e, TransitionNotAllowedError) and e.required_states == [State.BUSY]

    check("a refused transition names the allowed targets", refused)

    def version() -> None:
        e = expect(VersionMismatchError, lambda: client.transition_agent(agent_id, "online", expected_version=1))
        assert isinstance(e, VersionMismatchError) and e.expected_version == 1 and e.actual_version == 11

    check("a version mismatch carries both versions", version)

    def not_found_and_invalid() -> None:
        e = expect(NotFoundError, lambda: client.get_agent(str(uuid.uuid4())))
        assert e.reason == "AGENT_NOT_FOUND"  # type: ignore[attr-defined]
        e = expect(InvalidArgumentError, lambda: client.get_agent("not-a-uuid"))
        assert isinstance(e, InvalidArgumentError) and e.field == "agent_id" and e.field_violations
        expect(ValueError, lambda: client.transition_agent(agent_id, "flying"))

    check("unknown agents and malformed input", not_found_and_invalid)

    def request_ids() -> None:
        rid = str(uuid.uuid4())
        one = client.transition_agent(agent_id, "busy", request_id=rid)
        two = client.transition_agent(agent_id, "busy", request_id=rid)
        assert one.sequence == two.sequence and two.agent.version == one.agent.version
        e = expect(RequestIdReusedError, lambda: client.transition_agent(agent_id, "idle", request_id=rid))
        assert e.reason == "REQUEST_ID_REUSED"  # type: ignore[attr-defined]
        assert len(client.get_agent_history(agent_id)) == 12

    check("a request_id sent twice applies once; other content is refused", request_ids)

    def reads() -> None:
        agent = client.get_agent(agent_id)
        assert State(agent.state) == State.BUSY and agent.labels["team"] == team
        assert [a.agent_id for a in client.list_agents(labels={"team": team})] == [agent_id]
        assert client.list_agents(labels={"team": team}, category=Category.ERROR) == []
        assert client.list_agents(labels={"team": team}, states=["busy"])[0].agent_id == agent_id
        history = client.get_agent_history(agent_id, limit=2)
        assert [State(t.to_state) for t in history] == [State.IDLE, State.BUSY]
        audit = client.list_transitions(agent_id=agent_id, page_size=3)
        assert len(audit.transitions) == 3 and audit.next_page_token
        metrics = client.get_lifecycle_metrics()
        assert metrics.total_agents >= 1 and metrics.head_sequence >= history[-1].sequence
        assert client.get_agent_analytics(agent_id, window=3600).analytics.transitions >= 11
        assert client.get_fleet_analytics(labels={"team": team}).agents == 1
        assert client.heartbeat(agent_id, load=0.5, current_task="t").agent_id == agent_id
        synced = client.sync_external_status(agent_id, "docker", "no-such-status")
        assert synced.outcome == 3  # SYNC_OUTCOME_UNKNOWN_STATUS

    check("queries, analytics, heartbeats and sync", reads)

    def as_of() -> None:
        history = client.get_agent_history(agent_id)
        registered_at = history[0].sequence
        assert State(client.get_agent(agent_id, as_of=registered_at).state) == State.REGISTERED
        assert State(client.get_agent(agent_id, as_of=history[4].sequence).state) == State.ONLINE
        now = datetime.now(timezone.utc)
        assert [a.agent_id for a in client.list_agents(labels={"team": team}, as_of=now)] == [agent_id]
        assert client.get_lifecycle_metrics(as_of=registered_at).head_sequence == registered_at
        head = client.get_lifecycle_metrics().head_sequence
        e = expect(SequenceNotYetWrittenError, lambda: client.get_agent(agent_id, as_of=head + 100))
        assert isinstance(e, SequenceNotYetWrittenError) and e.head_sequence is not None

    check("reads as of a sequence or a time", as_of)

    def watches() -> None:
        with client.watch(start_sequence=client.get_agent_history(agent_id)[0].sequence, agent_ids=[agent_id]) as w:
            sequences = [next(w).sequence for _ in range(12)]
            assert sequences == [t.sequence for t in client.get_agent_history(agent_id)]
        snap = client.watch(snapshot=True, labels={"team": team})
        agents = snap.snapshot()
        assert [a.agent_id for a in agents] == [agent_id] and snap.snapshot_head >= sequences[-1]
        live = client.watch(agent_ids=[agent_id])
        done = client.transition_agent(agent_id, "idle")
        event = next(snap)
        assert event.sequence == done.sequence and State(event.transition.to_state) == State.IDLE
        assert next(live).sequence == done.sequence
        snap.close()
        live.close()
        assert list(snap) == []

    check("watches: replay, snapshot, live, close", watches)

    async def async_client() -> None:
        async with AsyncClient(addr) as ac:
            agent = (await ac.register_agent(name="async", labels={"team": team})).agent
            watch = ac.watch(start_sequence=agent.last_transition.sequence, agent_ids=[agent.agent_id])
            live = await ac.watch(agent_ids=[agent.agent_id]).start()
            await ac.deploy_agent(agent.agent_id)
            got = []
            async for event in watch:
                got.append(State(event.transition.to_state))
                if len(got) == 3:
                    break
            assert got == [State.REGISTERED, State.DEPLOYING, State.DEPLOYED], got
            assert State((await live.__anext__()).transition.to_state) == State.DEPLOYING
            live.close()
            try:
                await ac.transition_agent(agent.agent_id, "busy")
                raise AssertionError("expected TransitionNotAllowedError")
            except TransitionNotAllowedError as refused:
                assert refused.allowed_targets == [State.STARTING, State.UPDATING, State.DELETED]
            assert len(await ac.list_agents(labels={"team": team})) == 2

    check("the asyncio client", lambda: asyncio.run(async_client()))
    client.close()


def rate_limited(addr: str) -> None:
    client = Client(addr)
    agent = client.register_agent().agent.agent_id
    client.deploy_agent(agent)
    client.start_agent(agent)

    def flip(c: Client) -> None:
        state = State(c.get_agent(agent).state)
        c.transition_agent(agent, State.ONLINE if state == State.BUSY else State.BUSY)

    def refused_without_retries() -> None:
        once = Client(addr, retry=RetryPolicy(max_attempts=1))
        for _ in range(20):
            try:
                flip(once)
            except RateLimitedError as e:
                assert e.reason == "AGENT_RATE_LIMITED", e.reason
                assert e.retry_delay is not None and e.retry_delay > 0, e.retry_delay
                return
        raise AssertionError("no RateLimitedError in 20 transitions at 5 per second")

    check("over the rate limit: RateLimitedError with RetryInfo's delay", refused_without_retries)

    def retried() -> None:
        before = client.get_agent(agent).version
        for _ in range(12):
            flip(client)
        assert client.get_agent(agent).version == before + 12

    check("retries honour RetryInfo until every transition passes", retried)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--rate-limited"]:
        rate_limited(args[1])
    elif len(args) == 1:
        main(args[0])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
