"""The synchronous watch: an iterator of events that reconnects by itself.

A connection that fails for any transport reason (the server killed or
stopping, a proxy or load balancer cutting the stream, nothing heard for
`idle_timeout`) is replaced after a back-off by one that starts right after
the last event yielded (see `_cursor`), on the next endpoint when the
server was unavailable. Refusals of the request itself (compaction,
permissions, a bad filter) end the iteration with their typed exception.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import grpc

from . import lifecycle_pb2 as pb
from ._cursor import Cursor
from ._transport import Backoff, watch_retryable
from .errors import LifecycleError, UnavailableError, from_rpc_error

if TYPE_CHECKING:
    from .client import Client


class Watch:
    """Iterates LifecycleEvents; see Client.watch. Not thread-safe, except
    close(), which may be called from any thread."""

    def __init__(
        self, client: Client, cursor: Cursor, *, idle_timeout: float | None, reconnect_timeout: float | None
    ) -> None:
        self._client = client
        self._cursor = cursor
        self._idle_timeout = idle_timeout
        self._reconnect_timeout = reconnect_timeout
        self._backoff = Backoff(client.retry)
        self._call: Any = None
        self._index = 0
        self._last_message = time.monotonic()
        self._failing_since: float | None = None
        self._idle_cancelled = False
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None
        if idle_timeout is not None:
            if idle_timeout <= 0:
                raise ValueError(f"idle_timeout must be positive, got {idle_timeout}")
            self._watchdog = threading.Thread(target=self._watch_idle, name="agent-lifecycle-watchdog", daemon=True)
            self._watchdog.start()

    # --- public --------------------------------------------------------------

    @property
    def last_sequence(self) -> int | None:
        """The sequence of the last event yielded."""
        return self._cursor.last_sequence

    @property
    def next_sequence(self) -> int | None:
        """Where a reconnection would start (None while not known yet)."""
        return self._cursor.next_start

    @property
    def connections(self) -> int:
        """Connections opened so far (1 + reconnections)."""
        return self._cursor.connections

    def snapshot(self) -> list[pb.Agent]:
        """The fleet as the watch started (`snapshot=True` only): reads the
        stream until the snapshot is complete; the events after it follow
        through iteration. Its head is `snapshot_head`."""
        if not self._cursor.want_snapshot:
            raise ValueError("this watch was not opened with snapshot=True")
        while self._cursor.snapshot is None:
            self._cursor.accept(self._receive())
        return self._cursor.snapshot

    @property
    def snapshot_head(self) -> int:
        """The sequence the snapshot shows the fleet at (0 before it)."""
        return self._cursor.snapshot_head

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> pb.LifecycleEvent:
        while True:
            event = self._cursor.accept(self._receive())
            if event is not None:
                return event

    def close(self) -> None:
        """Ends the watch; iteration stops. Closing again does nothing."""
        if self._closed.is_set():
            return
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connections ------------------------------------------------------------

    def _open(self) -> None:
        if self._cursor.needs_head:
            head = self._client._head_for_watch()
            if head is not None:
                self._cursor.next_start = head + 1
        self._index = self._client._current
        self._idle_cancelled = False
        self._last_message = time.monotonic()
        self._call = self._client._watch_stream(self._index, self._cursor.request())
        if self._closed.is_set():  # close() ran while this call was being made
            self._call.cancel()

    def _drop(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def _receive(self) -> pb.WatchEventsResponse:
        """The next message, reconnecting as often as needed."""
        while True:
            if self._closed.is_set() or self._client.closed:
                raise StopIteration
            error: LifecycleError
            try:
                if self._call is None:
                    self._open()
                message: pb.WatchEventsResponse = next(self._call)
                self._last_message = time.monotonic()
                self._failing_since = None
                self._backoff.reset()
                return message
            except StopIteration:
                error = UnavailableError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if self._idle_cancelled:
                    error = UnavailableError(grpc.StatusCode.UNAVAILABLE, "no message within idle_timeout")
            except LifecycleError as e:  # reading the head for a live watch
                error = e
            self._recover(error)

    def _recover(self, error: LifecycleError) -> None:
        """Drops the connection and waits before the next, or raises."""
        self._drop()
        if self._closed.is_set() or self._client.closed:
            self._closed.set()
            raise StopIteration
        if not watch_retryable(error):
            self._closed.set()
            raise error
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif self._reconnect_timeout is not None and now - self._failing_since > self._reconnect_timeout:
            self._closed.set()
            raise error
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self._client._advance(self._index)
        self._closed.wait(self._backoff.delay(error))

    def _watch_idle(self) -> None:
        """Cancels a connection that heard nothing for idle_timeout."""
        limit = self._idle_timeout or 0.0
        while not self._closed.wait(min(1.0, limit / 4)):
            call = self._call
            if call is not None and time.monotonic() - self._last_message > limit:
                self._idle_cancelled = True
                call.cancel()
