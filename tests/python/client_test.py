#!/usr/bin/env python3
"""A foreign gRPC client for agent-lifecycle, written against the proto only.

Usage: python3 tests/python/client_test.py HOST:PORT

Generates Python stubs from proto/agentlifecycle/v1/lifecycle.proto at run time
(grpc_tools.protoc, into a temporary directory), then against the live server:
registers an agent, drives it through its lifecycle while a WatchEvents stream
(replaying from the registration's sequence) records what the server publishes,
checks every response, the queries, the error codes of the contract, and
finally that the stream delivered exactly the agent's transitions, in order.

Needs the packages of tests/python/requirements.txt. Exits 0 when every check
passed, 1 on the first failed check (with a message saying what differed),
2 on bad usage. The last line printed is always `N passed, M failed`.
"""

import importlib
import importlib.resources
import queue
import sys
import tempfile
import threading
import traceback
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = PROTO_DIR / "agentlifecycle" / "v1" / "lifecycle.proto"
SERVICE = "agentlifecycle.v1.AgentLifecycleService"

# Deadline of every unary call and of every read from the watch stream.
CALL_TIMEOUT = 10.0
READ_TIMEOUT = 10.0
# Deadline of the whole watch stream (it is cancelled as soon as it was read).
WATCH_DEADLINE = 120.0

STATE_NAMES = [
    "registered", "deploying", "deployed", "starting", "online", "busy", "idle",
    "stopping", "updating", "scaling", "error", "failed", "timeout",
    "maintenance", "suspended", "offline", "terminated", "deleted",
]


from checks import CheckFailed, Checks  # noqa: E402  (tests/python/ is on sys.path)


def well_known_include():
    """The directory of the google/protobuf/*.proto files bundled with grpc_tools."""
    try:
        path = importlib.resources.files("grpc_tools") / "_proto"
        if Path(str(path)).is_dir():
            return str(path)
    except (AttributeError, ModuleNotFoundError, TypeError):
        pass
    import pkg_resources  # older setuptools-only environments

    return pkg_resources.resource_filename("grpc_tools", "_proto")


def load_stubs(out_dir):
    """Compiles the proto with grpc_tools.protoc into out_dir and imports it."""
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--proto_path={well_known_include()}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise CheckFailed(f"grpc_tools.protoc failed with exit code {rc}: {' '.join(args)}")
    sys.path.insert(0, out_dir)
    pb = importlib.import_module("agentlifecycle.v1.lifecycle_pb2")
    pb_grpc = importlib.import_module("agentlifecycle.v1.lifecycle_pb2_grpc")
    return pb, pb_grpc


def short(msg):
    """A one-line text form of a protobuf message for failure messages."""
    from google.protobuf import text_format

    return text_format.MessageToString(msg, as_one_line=True)


class Client:
    def __init__(self, c, pb, stub):
        self.c = c
        self.pb = pb
        self.stub = stub
        self.S = pb.AgentState

    def name(self, state):
        return self.S.Name(state)

    def call(self, method, request):
        """A unary call that must succeed (with the deadline)."""
        import grpc

        try:
            return getattr(self.stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            raise CheckFailed(
                f"{method} failed: {e.code().name}: {e.details()} (request: {short(request)})"
            ) from None

    def expect_error(self, method, request, code, what, details_contain=()):
        """A unary call that must fail with `code`; its message must name `details_contain`."""
        import grpc

        try:
            resp = getattr(self.stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            self.c.check(
                e.code() == code,
                what,
                f"expected {code.name}, got {e.code().name}: {e.details()}",
            )
            message = (e.details() or "").lower()
            for word in details_contain:
                self.c.check(
                    word.lower() in message,
                    f"{what}: message names {word!r}",
                    f"message was {e.details()!r}",
                )
            return e
        raise CheckFailed(f"{what}: expected {code.name}, but the call succeeded: {short(resp)}")


class Watch:
    """A WatchEvents stream read by a background thread into a queue."""

    def __init__(self, stub, request):
        self.queue = queue.Queue()
        self.call = stub.WatchEvents(request, timeout=WATCH_DEADLINE)
        self.thread = threading.Thread(target=self._pump, name="watch", daemon=True)
        self.thread.start()

    def _pump(self):
        import grpc

        try:
            for message in self.call:
                self.queue.put(("message", message))
            self.queue.put(("end", None))
        except grpc.RpcError as e:
            self.queue.put(("error", e))

    def next_event(self, have, want):
        """The next `event` message, skipping progress messages; fails on anything else."""
        while True:
            try:
                kind, item = self.queue.get(timeout=READ_TIMEOUT)
            except queue.Empty:
                raise CheckFailed(
                    f"WatchEvents: no message within {READ_TIMEOUT:.0f}s "
                    f"after {have} of {want} expected events"
                ) from None
            if kind == "end":
                raise CheckFailed(f"WatchEvents ended after {have} of {want} expected events")
            if kind == "error":
                raise CheckFailed(
                    f"WatchEvents failed after {have} of {want} expected events: "
                    f"{item.code().name}: {item.details()}"
                )
            which = item.WhichOneof("kind")
            if which == "progress":
                continue
            if which != "event":
                raise CheckFailed(f"WatchEvents sent an unexpected {which!r} message: {short(item)}")
            return item.event

    def close(self):
        self.call.cancel()
        self.thread.join(timeout=READ_TIMEOUT)
        return not self.thread.is_alive()


def run(target, c):
    try:
        import grpc
        import grpc_tools  # noqa: F401
    except ImportError as e:
        raise CheckFailed(
            f"missing Python dependency ({e}); install tests/python/requirements.txt "
            f"(interpreter: {sys.executable})"
        ) from None

    with tempfile.TemporaryDirectory(prefix="agent-lifecycle-stubs-") as out_dir:
        pb, pb_grpc = load_stubs(out_dir)
        c.check(True, f"generated stubs from {PROTO_FILE.relative_to(REPO_ROOT)}")
        channel = grpc.insecure_channel(target)
        watch = None
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
            except grpc.FutureTimeoutError:
                raise CheckFailed(f"could not connect to {target} within {CALL_TIMEOUT:.0f}s") from None
            stub = pb_grpc.AgentLifecycleServiceStub(channel)
            watch = scenario(c, pb, stub, channel)
        finally:
            if watch is not None:
                watch.call.cancel()
            channel.close()


def scenario(c, pb, stub, channel):
    import grpc

    client = Client(c, pb, stub)
    S = pb.AgentState
    agent_id = str(uuid.uuid4())
    name = f"py-{agent_id[:8]}"
    labels = {"team": "python", "suite": "foreign-clients"}
    who = "client_test.py"

    # What the server recorded, in order: every StateTransition it returned.
    recorded = []
    cur = {"state": S.Value("AGENT_STATE_UNSPECIFIED"), "version": 0, "seq": 0}

    def check_mutation(method, resp, expected_states):
        """Checks the transitions and agent of a mutating RPC's response."""
        c.eq(
            [client.name(t.to_state) for t in resp.transitions],
            [client.name(s) for s in expected_states],
            f"{method}: to_states of the recorded transitions",
        )
        for t in resp.transitions:
            step = f"{method}: transition to {client.name(t.to_state)}"
            c.eq(client.name(t.from_state), client.name(cur["state"]), f"{step}: from_state")
            c.eq(t.version, cur["version"] + 1, f"{step}: version is the previous + 1")
            c.check(
                t.sequence > cur["seq"],
                f"{step}: sequence increases",
                f"sequence {t.sequence} after {cur['seq']}",
            )
            c.eq(t.agent_id, agent_id, f"{step}: agent_id")
            c.check(t.HasField("timestamp"), f"{step}: has a timestamp")
            cur.update(state=t.to_state, version=t.version, seq=t.sequence)
            recorded.append(t)
        agent = resp.agent
        c.eq(agent.agent_id, agent_id, f"{method}: agent.agent_id")
        c.eq(client.name(agent.state), client.name(cur["state"]), f"{method}: agent.state")
        c.eq(agent.version, cur["version"], f"{method}: agent.version")
        c.eq(agent.history_count, cur["version"], f"{method}: agent.history_count equals version")
        c.eq(agent.last_transition.sequence, cur["seq"], f"{method}: agent.last_transition.sequence")
        return agent

    # --- registration -----------------------------------------------------
    reg_req = pb.RegisterAgentRequest(
        agent_id=agent_id, name=name, labels=labels, reason="python registration", triggered_by=who
    )
    reg = client.call("RegisterAgent", reg_req)
    c.eq(len(reg.transitions), 1, "RegisterAgent: one transition")
    t0 = reg.transitions[0]
    c.eq(client.name(t0.from_state), "AGENT_STATE_UNSPECIFIED", "RegisterAgent: from_state UNSPECIFIED")
    c.check(t0.sequence > 0, "RegisterAgent: sequence > 0", f"got {t0.sequence}")
    agent = check_mutation("RegisterAgent", reg, [S.Value("AGENT_STATE_REGISTERED")])
    c.eq(agent.version, 1, "RegisterAgent: version 1")
    c.eq(agent.name, name, "RegisterAgent: name")
    c.eq(dict(agent.labels), labels, "RegisterAgent: labels")
    c.eq(t0.reason, "python registration", "RegisterAgent: reason recorded")
    c.eq(t0.triggered_by, who, "RegisterAgent: triggered_by recorded")
    c.eq(
        sorted(client.name(s) for s in agent.valid_transitions),
        ["AGENT_STATE_DELETED", "AGENT_STATE_DEPLOYING"],
        "RegisterAgent: valid_transitions from REGISTERED",
    )
    reg_seq = t0.sequence

    again = client.call("RegisterAgent", reg_req)
    c.eq(len(again.transitions), 0, "RegisterAgent repeated: idempotent, no transition")
    c.eq(client.name(again.agent.state), "AGENT_STATE_REGISTERED", "RegisterAgent repeated: state")
    c.eq(again.agent.version, 1, "RegisterAgent repeated: version still 1")

    # --- the watch, replaying from the registration -----------------------
    watch = Watch(stub, pb.WatchEventsRequest(agent_ids=[agent_id], start_sequence=reg_seq))

    # --- the lifecycle ----------------------------------------------------
    task_id = f"task-{uuid.uuid4()}"
    ref = dict(agent_id=agent_id, triggered_by=who)

    resp = client.call("DeployAgent", pb.DeployAgentRequest(reason="deploy", **ref))
    check_mutation("DeployAgent", resp, [S.Value("AGENT_STATE_DEPLOYING"), S.Value("AGENT_STATE_DEPLOYED")])

    resp = client.call("StartAgent", pb.StartAgentRequest(reason="start", **ref))
    agent = check_mutation("StartAgent", resp, [S.Value("AGENT_STATE_STARTING"), S.Value("AGENT_STATE_ONLINE")])
    c.check(
        agent.is_operational and agent.is_available_for_tasks,
        "StartAgent: ONLINE is operational and available",
        short(agent),
    )

    resp = client.call("AssignTask", pb.AssignTaskRequest(task_id=task_id, **ref))
    agent = check_mutation("AssignTask", resp, [S.Value("AGENT_STATE_BUSY")])
    c.check(
        agent.is_operational and not agent.is_available_for_tasks,
        "AssignTask: BUSY is operational, not available",
        short(agent),
    )
    meta = resp.transitions[0].metadata.fields
    c.eq(meta["task_id"].string_value if "task_id" in meta else None, task_id, "AssignTask: metadata task_id")

    resp = client.call("CompleteTask", pb.CompleteTaskRequest(task_id=task_id, **ref))
    check_mutation("CompleteTask", resp, [S.Value("AGENT_STATE_IDLE")])

    resp = client.call("HandleError", pb.HandleErrorRequest(error_message="boom", **ref))
    agent = check_mutation("HandleError", resp, [S.Value("AGENT_STATE_ERROR")])
    c.check(agent.is_in_error_state, "HandleError: agent is in error state", short(agent))
    c.eq(resp.transitions[0].reason, "Error: boom", "HandleError: reason")
    meta = resp.transitions[0].metadata.fields
    c.eq(
        meta["error_message"].string_value if "error_message" in meta else None,
        "boom",
        "HandleError: metadata error_message",
    )

    resp = client.call(
        "TransitionAgent",
        pb.TransitionAgentRequest(
            target_state=S.Value("AGENT_STATE_ONLINE"),
            reason="recovered",
            expected_version=cur["version"],
            **ref,
        ),
    )
    check_mutation("TransitionAgent(ONLINE)", resp, [S.Value("AGENT_STATE_ONLINE")])
    c.eq(resp.transitions[0].reason, "recovered", "TransitionAgent: reason recorded")

    resp = client.call("StopAgent", pb.StopAgentRequest(reason="stop", **ref))
    check_mutation("StopAgent", resp, [S.Value("AGENT_STATE_STOPPING"), S.Value("AGENT_STATE_OFFLINE")])

    # --- queries ----------------------------------------------------------
    got = client.call("GetAgent", pb.GetAgentRequest(agent_id=agent_id)).agent
    c.eq(got.agent_id, agent_id, "GetAgent: agent_id")
    c.eq(client.name(got.state), "AGENT_STATE_OFFLINE", "GetAgent: state OFFLINE")
    c.eq(got.version, cur["version"], "GetAgent: version")
    c.eq(got.version, 11, "GetAgent: version 11 after registration and 10 transitions")
    c.eq(got.history_count, cur["version"], "GetAgent: history_count")
    c.eq(got.name, name, "GetAgent: name")
    c.eq(dict(got.labels), labels, "GetAgent: labels")
    c.eq(
        sorted(client.name(s) for s in got.valid_transitions),
        sorted(["AGENT_STATE_STARTING", "AGENT_STATE_MAINTENANCE", "AGENT_STATE_TERMINATED", "AGENT_STATE_DELETED"]),
        "GetAgent: valid_transitions from OFFLINE",
    )
    c.check(
        not (got.is_operational or got.is_available_for_tasks or got.is_in_error_state or got.is_in_maintenance),
        "GetAgent: OFFLINE has no category flag",
        short(got),
    )
    c.eq(got.last_transition, recorded[-1], "GetAgent: last_transition is StopAgent's last")
    c.check(
        got.HasField("created_at") and got.HasField("updated_at")
        and (got.created_at.seconds, got.created_at.nanos) <= (got.updated_at.seconds, got.updated_at.nanos),
        "GetAgent: created_at <= updated_at",
        f"created_at {got.created_at}, updated_at {got.updated_at}",
    )
    c.eq(got.created_at, recorded[0].timestamp, "GetAgent: created_at is the registration time")
    c.eq(got.updated_at, recorded[-1].timestamp, "GetAgent: updated_at is the last transition time")

    hist = client.call("GetAgentHistory", pb.GetAgentHistoryRequest(agent_id=agent_id))
    c.eq(hist.total_count, len(recorded), "GetAgentHistory: total_count")
    c.eq(
        [(client.name(t.from_state), client.name(t.to_state), t.sequence, t.version) for t in hist.transitions],
        [(client.name(t.from_state), client.name(t.to_state), t.sequence, t.version) for t in recorded],
        "GetAgentHistory: every transition, oldest first",
    )
    for i, (h, r) in enumerate(zip(hist.transitions, recorded)):
        if h != r:
            raise CheckFailed(
                f"GetAgentHistory: entry {i} differs from the transition the RPC returned: "
                f"history {short(h)} vs response {short(r)}"
            )
    c.check(True, "GetAgentHistory: entries equal the transitions the RPCs returned")
    c.eq(hist.next_page_token, "", "GetAgentHistory: a single page")

    newest = client.call("GetAgentHistory", pb.GetAgentHistoryRequest(agent_id=agent_id, limit=3))
    c.eq(
        [t.sequence for t in newest.transitions],
        [t.sequence for t in recorded[-3:]],
        "GetAgentHistory(limit=3): the newest 3, oldest first",
    )
    c.eq(newest.total_count, len(recorded), "GetAgentHistory(limit=3): total_count before limit")

    metrics = client.call("GetLifecycleMetrics", pb.GetLifecycleMetricsRequest())
    dist = dict(metrics.state_distribution)
    c.check(metrics.total_agents >= 1, "GetLifecycleMetrics: total_agents >= 1", str(metrics.total_agents))
    c.check(dist.get("offline", 0) >= 1, "GetLifecycleMetrics: state_distribution counts offline", str(dist))
    c.check(
        set(dist) <= set(STATE_NAMES),
        "GetLifecycleMetrics: state_distribution keys are lowercase state names",
        str(sorted(dist)),
    )
    c.eq(sum(dist.values()), metrics.total_agents, "GetLifecycleMetrics: distribution sums to total_agents")
    c.check(
        max(metrics.operational_agents, metrics.available_agents, metrics.error_agents, metrics.maintenance_agents)
        <= metrics.total_agents,
        "GetLifecycleMetrics: category counts <= total_agents",
        short(metrics),
    )
    c.check(
        metrics.head_sequence >= cur["seq"],
        "GetLifecycleMetrics: head_sequence covers our last transition",
        f"head {metrics.head_sequence}, ours {cur['seq']}",
    )

    rules = client.call("GetTransitionRules", pb.GetTransitionRulesRequest()).rules
    c.eq(
        [client.name(r.from_state) for r in rules],
        [f"AGENT_STATE_{n.upper()}" for n in STATE_NAMES],
        "GetTransitionRules: one rule per state, in AgentState order",
    )
    by_state = {client.name(r.from_state): sorted(client.name(s) for s in r.allowed_targets) for r in rules}
    c.eq(by_state.get("AGENT_STATE_DELETED"), [], "GetTransitionRules: DELETED is final")
    c.eq(
        by_state.get("AGENT_STATE_OFFLINE"),
        sorted(client.name(s) for s in got.valid_transitions),
        "GetTransitionRules: OFFLINE targets equal GetAgent's valid_transitions",
    )

    # --- error codes ------------------------------------------------------
    unknown = str(uuid.uuid4())
    client.expect_error("GetAgent", pb.GetAgentRequest(agent_id=unknown), grpc.StatusCode.NOT_FOUND,
                        "GetAgent(unknown uuid) -> NOT_FOUND")
    client.expect_error("GetAgentHistory", pb.GetAgentHistoryRequest(agent_id=unknown), grpc.StatusCode.NOT_FOUND,
                        "GetAgentHistory(unknown uuid) -> NOT_FOUND")
    client.expect_error(
        "TransitionAgent",
        pb.TransitionAgentRequest(agent_id=unknown, target_state=S.Value("AGENT_STATE_ONLINE")),
        grpc.StatusCode.NOT_FOUND,
        "TransitionAgent(unknown uuid) -> NOT_FOUND",
    )
    client.expect_error(
        "TransitionAgent",
        pb.TransitionAgentRequest(agent_id=agent_id, target_state=S.Value("AGENT_STATE_BUSY"), triggered_by=who),
        grpc.StatusCode.FAILED_PRECONDITION,
        "TransitionAgent(OFFLINE -> BUSY) -> FAILED_PRECONDITION",
        details_contain=("offline",),
    )
    client.expect_error(
        "AssignTask",
        pb.AssignTaskRequest(agent_id=agent_id, task_id="never", triggered_by=who),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AssignTask on OFFLINE -> FAILED_PRECONDITION",
    )
    client.expect_error(
        "TransitionAgent",
        pb.TransitionAgentRequest(
            agent_id=agent_id,
            target_state=S.Value("AGENT_STATE_MAINTENANCE"),
            expected_version=cur["version"] + 5,
            triggered_by=who,
        ),
        grpc.StatusCode.ABORTED,
        "TransitionAgent(allowed target, wrong expected_version) -> ABORTED",
    )
    client.expect_error(
        "GetAgent",
        pb.GetAgentRequest(agent_id="not-a-uuid"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "GetAgent(not-a-uuid) -> INVALID_ARGUMENT",
        details_contain=("agent_id",),
    )
    client.expect_error(
        "TransitionAgent",
        pb.TransitionAgentRequest(agent_id="not-a-uuid", target_state=S.Value("AGENT_STATE_ONLINE")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TransitionAgent(not-a-uuid) -> INVALID_ARGUMENT",
        details_contain=("agent_id",),
    )
    client.expect_error(
        "TransitionAgent",
        pb.TransitionAgentRequest(agent_id=agent_id, target_state=S.Value("AGENT_STATE_UNSPECIFIED")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TransitionAgent(target UNSPECIFIED) -> INVALID_ARGUMENT",
        details_contain=("target_state",),
    )
    client.expect_error(
        "RegisterAgent",
        reg_req,
        grpc.StatusCode.ALREADY_EXISTS,
        "RegisterAgent on an id that left REGISTERED -> ALREADY_EXISTS",
    )
    after = client.call("GetAgent", pb.GetAgentRequest(agent_id=agent_id)).agent
    c.check(
        after.version == cur["version"] and after.state == cur["state"],
        "rejected calls changed nothing",
        f"state {client.name(after.state)} version {after.version}, "
        f"expected {client.name(cur['state'])} version {cur['version']}",
    )

    # --- the final transition: OFFLINE -> DELETED, with compare-and-set ------
    resp = client.call(
        "TransitionAgent",
        pb.TransitionAgentRequest(
            target_state=S.Value("AGENT_STATE_DELETED"),
            reason="cleanup",
            expected_version=cur["version"],
            **ref,
        ),
    )
    check_mutation("TransitionAgent(DELETED)", resp, [S.Value("AGENT_STATE_DELETED")])

    # --- reflection v1 (grpcurl 1.8.6 only speaks v1alpha; newer ones v1) ---
    for version in ("v1", "v1alpha"):
        method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
        call = channel.stream_stream(method)(iter([b"\x3a\x01*"]), timeout=CALL_TIMEOUT)  # list_services: "*"
        try:
            first = next(iter(call))
        except grpc.RpcError as e:
            raise CheckFailed(f"reflection {version}: {e.code().name}: {e.details()}") from None
        finally:
            call.cancel()
        c.check(
            SERVICE.encode() in first,
            f"reflection {version}: ListServices names {SERVICE}",
            repr(first),
        )

    # --- the watch: exactly our transitions, in order -----------------------
    events = []
    for i, want in enumerate(recorded):
        ev = watch.next_event(len(events), len(recorded))
        events.append(ev)
        t = ev.transition
        expected_type = "EVENT_TYPE_REGISTERED" if i == 0 else "EVENT_TYPE_TRANSITIONED"
        problems = []
        if ev.agent_id != agent_id:
            problems.append(f"agent_id {ev.agent_id}")
        if ev.sequence != want.sequence or t.sequence != want.sequence:
            problems.append(f"sequence {ev.sequence}/{t.sequence}, expected {want.sequence}")
        if t.to_state != want.to_state or t.from_state != want.from_state:
            problems.append(
                f"{client.name(t.from_state)} -> {client.name(t.to_state)}, expected "
                f"{client.name(want.from_state)} -> {client.name(want.to_state)}"
            )
        if t.version != want.version:
            problems.append(f"version {t.version}, expected {want.version}")
        if pb.EventType.Name(ev.type) != expected_type:
            problems.append(f"type {pb.EventType.Name(ev.type)}, expected {expected_type}")
        if ev.agent.state != want.to_state or ev.agent.version != want.version:
            problems.append(f"agent after the event: {client.name(ev.agent.state)} v{ev.agent.version}")
        c.check(
            not problems,
            f"WatchEvents event {i + 1}/{len(recorded)}: {client.name(want.to_state)} seq {want.sequence}",
            "; ".join(problems) + f" (event: {short(ev)})",
        )
    c.eq(
        [e.sequence for e in events],
        [t.sequence for t in recorded],
        "WatchEvents: exactly the registration and every transition, in order, no gap or duplicate",
    )
    c.check(watch.close(), "WatchEvents: stream cancelled cleanly")
    return watch


def main(argv):
    if len(argv) != 2 or ":" not in argv[1]:
        print(f"usage: {argv[0]} HOST:PORT", file=sys.stderr)
        return 2
    c = Checks()
    try:
        run(argv[1], c)
    except CheckFailed as e:
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        print(f"{c.passed} passed, 1 failed", flush=True)
        return 1
    except Exception:  # an unexpected error is a failure too, with its traceback
        traceback.print_exc()
        print(f"FAIL: unexpected error: {sys.exc_info()[1]!r}", flush=True)
        print(f"{c.passed} passed, 1 failed", flush=True)
        return 1
    print(f"{c.passed} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
