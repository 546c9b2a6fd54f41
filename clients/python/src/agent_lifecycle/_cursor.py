"""Where a watch stands, shared by the sync and asyncio watches: the request
of the next connection and what each message received means.

The rule that makes a watch exact across reconnects: the next connection
starts at `start_sequence = next_start`, which is the last yielded
sequence + 1, or a progress message's or the snapshot's `head_sequence + 1`
when that is further (every matching event up to a head has been
delivered). A sequence at or below the last one yielded is never yielded
again.
"""

from __future__ import annotations

from . import lifecycle_pb2 as pb


class Cursor:
    """The position of one watch."""

    def __init__(self, template: pb.WatchEventsRequest, start: int | None, snapshot: bool) -> None:
        self._template = template
        #: start_sequence of the next connection; None while unknown (a live
        #: watch before it learned the head, a snapshot not yet complete).
        self.next_start = start
        self.want_snapshot = snapshot
        #: The snapshot, once complete.
        self.snapshot: list[pb.Agent] | None = None
        self.snapshot_head = 0
        self._pending: list[pb.Agent] = []
        #: The sequence of the last event yielded.
        self.last_sequence: int | None = None
        #: Connections opened so far.
        self.connections = 0

    @property
    def needs_head(self) -> bool:
        """A live watch (no start, no snapshot) must learn the head before
        its first connection so that it can resume exactly."""
        return self.next_start is None and not self.want_snapshot

    def request(self) -> pb.WatchEventsRequest:
        """The request of the next connection: the snapshot again while it is
        incomplete, else a replay from `next_start` (0, live, only when the
        head could not be read)."""
        request = pb.WatchEventsRequest()
        request.CopyFrom(self._template)
        if self.want_snapshot and self.snapshot is None:
            self._pending = []
            request.include_snapshot = True
        else:
            request.start_sequence = self.next_start or 0
        self.connections += 1
        return request

    def accept(self, message: pb.WatchEventsResponse) -> pb.LifecycleEvent | None:
        """The event to yield for a message, if any; updates the position."""
        kind = message.WhichOneof("kind")
        if kind == "event":
            event = message.event
            if self.last_sequence is not None and event.sequence <= self.last_sequence:
                return None
            self.last_sequence = event.sequence
            self.next_start = event.sequence + 1
            return event
        if kind == "progress":
            head = message.progress.head_sequence
            if self.next_start is None:
                if not self.want_snapshot:
                    self.next_start = head + 1
            elif head + 1 > self.next_start:
                self.next_start = head + 1
        elif kind == "snapshot_agent":
            self._pending.append(message.snapshot_agent)
        elif kind == "snapshot_complete" and self.snapshot is None:
            self.snapshot = self._pending
            self._pending = []
            self.snapshot_head = message.snapshot_complete.head_sequence
            self.next_start = self.snapshot_head + 1
        return None
