#!/usr/bin/env python3
"""A small fleet monitor: prints every agent, then follows the event stream,
printing each change and an ALERT line whenever an agent enters an error
state (ERROR, FAILED, TIMEOUT). The watch resumes by itself across server
restarts and dropped connections; if retention ever overtakes it, the
monitor starts over from a fresh snapshot.

    pip install ./clients/python
    python3 examples/monitor.py [SERVER]

SERVER defaults to $AGENT_LIFECYCLE_SERVER, else http://127.0.0.1:50051;
a bearer token is read from $AGENT_LIFECYCLE_TOKEN.
"""

import os
import sys

from agent_lifecycle import Client, SequenceCompactedError, State, lifecycle_pb2


def name(agent: lifecycle_pb2.Agent) -> str:
    return f"{agent.name or '-'} ({agent.agent_id})"


def alert(agent: lifecycle_pb2.Agent, reason: str) -> None:
    print(f"ALERT {name(agent)} is {State(agent.state).label}: {reason}", flush=True)


def main() -> None:
    server = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("AGENT_LIFECYCLE_SERVER", "http://127.0.0.1:50051")
    with Client(server, token=os.environ.get("AGENT_LIFECYCLE_TOKEN")) as client:
        while True:
            watch = client.watch(snapshot=True)
            fleet = watch.snapshot()
            print(f"fleet at sequence {watch.snapshot_head}: {len(fleet)} agents", flush=True)
            for agent in fleet:
                print(f"  {name(agent)} {State(agent.state).label}", flush=True)
                if State(agent.state).is_error:
                    alert(agent, agent.last_transition.reason)
            try:
                for event in watch:
                    t = event.transition
                    before = State(t.from_state).label if t.from_state else "new"
                    print(f"#{event.sequence} {name(event.agent)} {before} -> {State(t.to_state).label}", flush=True)
                    if State(t.to_state).is_error:
                        alert(event.agent, t.reason)
            except SequenceCompactedError as error:
                print(f"fell behind retention (oldest kept: {error.oldest_available_sequence}); new snapshot", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
