#!/usr/bin/env python3
"""The Python client under the failure scenarios of tests/it/clients.rs.

Usage:
  scenario.py watch --endpoints E1[,E2] [--from N | --snapshot] [--pause-after K] [--async] [--small-window]
  scenario.py transition --endpoints E --agent ID --target STATE [--request-id ID]
  scenario.py tls --endpoints https://HOST:PORT --ca FILE --token TOKEN --cert FILE --key FILE

`watch` prints `event SEQ AGENT STATE` for every event the client's watch
yields (`snapshot COUNT HEAD` first with --snapshot) and obeys commands on
stdin: `until SEQ` ends it once an event at or past SEQ was yielded, `go`
resumes it after --pause-after K events (it reads nothing while paused, so
the server's stream backs up). It ends with `done CONNECTIONS`, or with
`compacted OLDEST` when the client raised SequenceCompactedError.
`transition` prints `ok SEQUENCE VERSION` after a TransitionAgent call that
the client may retry. `tls` connects over TLS: with the token it registers
an agent and watches its registration (`registered ID`, `watched SEQ`);
without credentials it prints `unauthenticated` when refused; with the
client certificate (a viewer) `listed N`, then `denied` when registering.
Any other error prints `error ...` and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import sys
import threading

from agent_lifecycle import (
    AsyncClient,
    Client,
    LifecycleError,
    PermissionDeniedError,
    SequenceCompactedError,
    State,
    Tls,
    UnauthenticatedError,
    lifecycle_pb2,
)

#: With BDP probing off, gRPC keeps the stream window at 64 KiB, so that a
#: paused watcher stops the server's stream after a few large events.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]


def say(line: str) -> None:
    print(line, flush=True)


class Control:
    """The commands read from stdin."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.until: int | None = None
        self.last = 0
        self.go = threading.Event()
        self.reached = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["until"]:
                with self.lock:
                    self.until = int(words[1])
                    if self.last >= self.until:
                        self.reached.set()
            elif words[:1] == ["go"]:
                self.go.set()

    def saw(self, sequence: int) -> bool:
        """Records a yielded sequence; True when the watch may end."""
        with self.lock:
            self.last = sequence
            done = self.until is not None and sequence >= self.until
        if done:
            self.reached.set()
        return done


def report(event: lifecycle_pb2.LifecycleEvent) -> None:
    say(f"event {event.sequence} {event.agent_id} {State(event.transition.to_state).label}")


def watch_sync(args: argparse.Namespace, control: Control) -> None:
    options = SMALL_WINDOW if args.small_window else []
    with Client(args.endpoints, options=options) as client:
        watch = client.watch(start_sequence=args.start, snapshot=args.snapshot, idle_timeout=args.idle_timeout)
        # `until` may arrive while the watch waits for an event that never
        # comes (the target was reached already): end the watch then.
        threading.Thread(target=lambda: (control.reached.wait(), watch.close()), daemon=True).start()
        if args.snapshot:
            agents = watch.snapshot()
            say(f"snapshot {len(agents)} {watch.snapshot_head}")
        count = 0
        connections = 0
        try:
            for event in watch:
                if watch.connections != connections:
                    connections = watch.connections
                    say(f"connection {connections}")
                report(event)
                count += 1
                if control.saw(event.sequence):
                    break
                if args.pause_after is not None and count == args.pause_after:
                    say(f"paused {event.sequence}")
                    control.go.wait()
        except SequenceCompactedError as error:
            say(f"compacted {error.oldest_available_sequence}")
            return
        finally:
            watch.close()
        say(f"done {watch.connections}")


async def watch_async(args: argparse.Namespace, control: Control) -> None:
    options = SMALL_WINDOW if args.small_window else []
    async with AsyncClient(args.endpoints, options=options) as client:
        watch = client.watch(start_sequence=args.start, snapshot=args.snapshot, idle_timeout=args.idle_timeout)
        loop = asyncio.get_running_loop()

        def close_when_reached() -> None:
            control.reached.wait()
            try:
                loop.call_soon_threadsafe(watch.close)
            except RuntimeError:  # the loop has ended already
                pass

        threading.Thread(target=close_when_reached, daemon=True).start()
        if args.snapshot:
            agents = await watch.snapshot()
            say(f"snapshot {len(agents)} {watch.snapshot_head}")
        count = 0
        connections = 0
        try:
            async for event in watch:
                if watch.connections != connections:
                    connections = watch.connections
                    say(f"connection {connections}")
                report(event)
                count += 1
                if control.saw(event.sequence):
                    break
                if args.pause_after is not None and count == args.pause_after:
                    say(f"paused {event.sequence}")
                    await loop.run_in_executor(None, control.go.wait)
        except SequenceCompactedError as error:
            say(f"compacted {error.oldest_available_sequence}")
            return
        say(f"done {watch.connections}")


def transition(args: argparse.Namespace) -> None:
    with Client(args.endpoints) as client:
        change = client.transition_agent(args.agent, args.target, request_id=args.request_id, reason="scenario")
        last = change.transitions[-1]
        say(f"ok {last.sequence} {last.version}")


def tls(args: argparse.Namespace) -> None:
    with Client(args.endpoints, token=args.token, tls=Tls(ca_file=args.ca)) as client:
        change = client.register_agent(name="over-tls")
        say(f"registered {change.agent.agent_id}")
        with client.watch(start_sequence=change.sequence, agent_ids=[change.agent.agent_id]) as watch:
            say(f"watched {next(watch).sequence}")
    with Client(args.endpoints, tls=Tls(ca_file=args.ca)) as anonymous:
        try:
            anonymous.get_lifecycle_metrics()
        except UnauthenticatedError:
            say("unauthenticated")
    viewer_tls = Tls(ca_file=args.ca, client_cert_file=args.cert, client_key_file=args.key)
    with Client(args.endpoints, tls=viewer_tls) as viewer:
        say(f"listed {len(viewer.list_agents())}")
        try:
            viewer.register_agent()
        except PermissionDeniedError:
            say("denied")


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--endpoints", required=True)
    w.add_argument("--from", dest="start", type=int)
    w.add_argument("--snapshot", action="store_true")
    w.add_argument("--pause-after", type=int)
    w.add_argument("--idle-timeout", type=float, default=60.0)
    w.add_argument("--async", dest="use_async", action="store_true")
    w.add_argument("--small-window", action="store_true")
    t = sub.add_parser("transition")
    t.add_argument("--endpoints", required=True)
    t.add_argument("--agent", required=True)
    t.add_argument("--target", required=True)
    t.add_argument("--request-id")
    s = sub.add_parser("tls")
    for flag in ("--endpoints", "--ca", "--token", "--cert", "--key"):
        s.add_argument(flag, required=True)
    args = parser.parse_args()
    try:
        if args.command == "transition":
            transition(args)
        elif args.command == "tls":
            tls(args)
        elif args.use_async:
            asyncio.run(watch_async(args, Control()))
        else:
            watch_sync(args, Control())
    except LifecycleError as error:
        say(f"error {error}")
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Should leaving the interpreter ever hang, show where (and fail).
    faulthandler.dump_traceback_later(10, exit=True)
    sys.exit(code)
