"""The synchronous client: one method per RPC of
agentlifecycle.v1.AgentLifecycleService.

Every call raises a typed `LifecycleError`. Unary calls are retried on
UNAVAILABLE and RESOURCE_EXHAUSTED (waiting RetryInfo's delay when the
server gives one); every state-changing call carries a `request_id` (a new
UUID unless the caller gives one), the same on every attempt, so a retry
of a call whose reply was lost returns the original answer instead of
changing the agent twice. With several endpoints, a call that finds one
unavailable moves on to the next.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from . import _requests as rq
from . import lifecycle_pb2 as pb
from ._cursor import Cursor
from ._requests import AsOf, Change, StateLike
from ._transport import (
    SERVICE,
    Backoff,
    RetryPolicy,
    Tls,
    channel_options,
    env_settings,
    parse_endpoints,
    retryable,
)
from .errors import LifecycleError, UnavailableError, from_rpc_error
from .states import Category, EventType, State
from .watch import Watch

R = TypeVar("R", bound=Message)

#: Default deadline of one unary call attempt, in seconds (the CLI's --timeout).
DEFAULT_TIMEOUT = 10.0


class Client:
    """A client of one server, or of several servers sharing a PostgreSQL
    database (`endpoints` in order of preference).

    `endpoints`: `http://HOST:PORT` (plaintext), `https://HOST:PORT` (TLS),
    or `HOST:PORT` (TLS when `tls` is given), as a list or comma-separated.
    `token`: sent as `authorization: Bearer TOKEN`. `timeout`: deadline of
    each unary call attempt. `retry`: see RetryPolicy. `options`: extra gRPC
    channel options. Use as a context manager, or call close().
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = "http://127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: Tls | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),
        options: Sequence[tuple[str, str | int]] = (),
    ) -> None:
        self._endpoints = parse_endpoints(endpoints, tls)
        credentials = (tls or Tls()).credentials() if any(e.tls for e in self._endpoints) else None
        opts = channel_options(tls, options)
        self._channels: list[grpc.Channel] = [
            grpc.secure_channel(e.target, credentials, options=opts)
            if e.tls and credentials is not None
            else grpc.insecure_channel(e.target, options=opts)
            for e in self._endpoints
        ]
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._timeout = timeout
        self.retry = retry
        self._current = 0
        self._lock = threading.Lock()
        #: Set by close(); open watches end instead of reconnecting.
        self.closed = False

    @classmethod
    def from_env(cls, **kwargs: Any) -> Client:
        """A client configured as the CLI is by its variables:
        AGENT_LIFECYCLE_SERVER, AGENT_LIFECYCLE_TOKEN, AGENT_LIFECYCLE_TLS_CA,
        AGENT_LIFECYCLE_TLS_CLIENT_CERT, AGENT_LIFECYCLE_TLS_CLIENT_KEY."""
        server, token, tls = env_settings()
        return cls(server, token=token, tls=tls, **kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connections (open watches end)."""
        self.closed = True
        for channel in self._channels:
            channel.close()

    # --- transport -------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        return self._endpoints[self._current].target

    def _advance(self, index: int) -> None:
        """Moves to the next endpoint, unless another call already moved
        away from `index`."""
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % len(self._channels)

    def _unary(self, name: str, request: Message, response: type[R], timeout: float | None) -> R:
        backoff = Backoff(self.retry)
        attempt = 0
        while True:
            index = self._current
            method: grpc.UnaryUnaryMultiCallable[Message, R] = self._channels[index].unary_unary(
                f"/{SERVICE}/{name}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response.FromString,
            )
            try:
                reply: R = method(request, timeout=timeout or self._timeout, metadata=self._metadata)
                return reply
            except grpc.RpcError as e:
                error = from_rpc_error(e)
            attempt += 1
            if not retryable(error) or attempt >= self.retry.max_attempts:
                raise error
            if error.code == grpc.StatusCode.UNAVAILABLE:
                self._advance(index)
            time.sleep(backoff.delay(error))

    def _watch_stream(self, index: int, request: pb.WatchEventsRequest) -> Any:
        method: grpc.UnaryStreamMultiCallable[pb.WatchEventsRequest, pb.WatchEventsResponse] = self._channels[
            index
        ].unary_stream(
            f"/{SERVICE}/WatchEvents",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.WatchEventsResponse.FromString,
        )
        return method(request, metadata=self._metadata)

    def _mutate(self, name: str, request: Message, response: type[R], timeout: float | None) -> Change:
        return rq.change_of(self._unary(name, request, response, timeout))

    # --- state changes -----------------------------------------------------

    def register_agent(
        self,
        agent_id: str = "",
        *,
        name: str = "",
        labels: Mapping[str, str] | None = None,
        reason: str = "",
        triggered_by: str = "",
        metadata: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Change:
        """Creates an agent in REGISTERED (the server picks the id when
        `agent_id` is empty). An id that is still REGISTERED is an OK with
        no transition; one in another state raises AlreadyExistsError."""
        fields = rq.common(reason, triggered_by, metadata, None, request_id)
        request = pb.RegisterAgentRequest(agent_id=agent_id, name=name, labels=dict(labels or {}), **fields)
        return self._mutate("RegisterAgent", request, pb.RegisterAgentResponse, timeout)

    def transition_agent(
        self,
        agent_id: str,
        target: StateLike,
        *,
        reason: str = "",
        triggered_by: str = "",
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Change:
        """Moves the agent to `target` ("online", State.ONLINE). Raises
        TransitionNotAllowedError (with `allowed_targets`) when the policy
        refuses, VersionMismatchError on an `expected_version` mismatch."""
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        request = pb.TransitionAgentRequest(agent_id=agent_id, target_state=rq.state_name(target), **fields)
        return self._mutate("TransitionAgent", request, pb.TransitionAgentResponse, timeout)

    def deploy_agent(self, agent_id: str, *, reason: str = "", triggered_by: str = "",
                     metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                     request_id: str | None = None, timeout: float | None = None) -> Change:
        """DEPLOYING then DEPLOYED (two transitions, committed together)."""
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        return self._mutate("DeployAgent", pb.DeployAgentRequest(agent_id=agent_id, **fields),
                            pb.DeployAgentResponse, timeout)

    def start_agent(self, agent_id: str, *, wait_for_heartbeat: bool | None = None, reason: str = "",
                    triggered_by: str = "", metadata: Mapping[str, Any] | None = None,
                    expected_version: int | None = None, request_id: str | None = None,
                    timeout: float | None = None) -> Change:
        """STARTING then ONLINE; with `wait_for_heartbeat`, only STARTING."""
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        request = pb.StartAgentRequest(agent_id=agent_id, **fields)
        if wait_for_heartbeat is not None:
            request.wait_for_heartbeat = wait_for_heartbeat
        return self._mutate("StartAgent", request, pb.StartAgentResponse, timeout)

    def stop_agent(self, agent_id: str, *, reason: str = "", triggered_by: str = "",
                   metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                   request_id: str | None = None, timeout: float | None = None) -> Change:
        """STOPPING then OFFLINE."""
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        return self._mutate("StopAgent", pb.StopAgentRequest(agent_id=agent_id, **fields),
                            pb.StopAgentResponse, timeout)

    def assign_task(self, agent_id: str, task_id: str = "", *, reason: str = "", triggered_by: str = "",
                    metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                    request_id: str | None = None, timeout: float | None = None) -> Change:
        """ONLINE or IDLE -> BUSY."""
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        return self._mutate("AssignTask", pb.AssignTaskRequest(agent_id=agent_id, task_id=task_id, **fields),
                            pb.AssignTaskResponse, timeout)

    def complete_task(self, agent_id: str, task_id: str = "", *, reason: str = "", triggered_by: str = "",
                      metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                      request_id: str | None = None, timeout: float | None = None) -> Change:
        """BUSY -> IDLE."""
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        return self._mutate("CompleteTask", pb.CompleteTaskRequest(agent_id=agent_id, task_id=task_id, **fields),
                            pb.CompleteTaskResponse, timeout)

    def handle_error(self, agent_id: str, error_message: str, *, triggered_by: str = "",
                     metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                     request_id: str | None = None, timeout: float | None = None) -> Change:
        """-> ERROR with reason "Error: <error_message>"."""
        fields = rq.common(None, triggered_by, metadata, expected_version, request_id)
        request = pb.HandleErrorRequest(agent_id=agent_id, error_message=error_message, **fields)
        return self._mutate("HandleError", request, pb.HandleErrorResponse, timeout)

    def put_in_maintenance(self, agent_id: str, *, reason: str = "", triggered_by: str = "",
                           metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                           request_id: str | None = None, timeout: float | None = None) -> Change:
        """-> MAINTENANCE."""
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        return self._mutate("PutInMaintenance", pb.PutInMaintenanceRequest(agent_id=agent_id, **fields),
                            pb.PutInMaintenanceResponse, timeout)

    def resume_from_maintenance(self, agent_id: str, *, reason: str = "", triggered_by: str = "",
                                metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                                request_id: str | None = None, timeout: float | None = None) -> Change:
        """MAINTENANCE -> ONLINE."""
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        request = pb.ResumeFromMaintenanceRequest(agent_id=agent_id, **fields)
        return self._mutate("ResumeFromMaintenance", request, pb.ResumeFromMaintenanceResponse, timeout)

    def sync_external_status(self, agent_id: str, source: str, status: str, *,
                             metadata: Mapping[str, Any] | None = None,
                             timeout: float | None = None) -> pb.SyncExternalStatusResponse:
        """Applies a platform status (`source`: hf_space, kubernetes, docker);
        the response's `outcome` says what happened."""
        request = pb.SyncExternalStatusRequest(agent_id=agent_id, source=source, status=status,
                                               metadata=rq.struct(metadata))
        return self._unary("SyncExternalStatus", request, pb.SyncExternalStatusResponse, timeout)

    def heartbeat(self, agent_id: str, *, load: float | None = None, current_task: str = "",
                  timeout: float | None = None) -> pb.Agent:
        """Reports the agent alive; returns it after the heartbeat."""
        request = pb.HeartbeatRequest(agent_id=agent_id, load=load, current_task=current_task)
        return self._unary("Heartbeat", request, pb.HeartbeatResponse, timeout).agent

    def heartbeat_stream(self, beats: Iterable[pb.HeartbeatRequest], *, timeout: float | None = None) -> int:
        """Sends every heartbeat of `beats` on one stream; returns how many
        the server counted. Not retried (a stream cannot be replayed)."""
        method: grpc.StreamUnaryMultiCallable[pb.HeartbeatRequest, pb.HeartbeatStreamResponse] = self._channels[
            self._current
        ].stream_unary(
            f"/{SERVICE}/HeartbeatStream",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.HeartbeatStreamResponse.FromString,
        )
        try:
            reply: pb.HeartbeatStreamResponse = method(iter(beats), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return reply.heartbeats

    # --- reads ---------------------------------------------------------------

    def get_agent(self, agent_id: str, *, as_of: AsOf = None, timeout: float | None = None) -> pb.Agent:
        """The agent now, or as it was at `as_of` (a sequence or a time)."""
        request = pb.GetAgentRequest(agent_id=agent_id, as_of=rq.as_of(as_of))
        return self._unary("GetAgent", request, pb.GetAgentResponse, timeout).agent

    def list_agents_page(self, *, states: Iterable[StateLike] = (), category: Category | str | None = None,
                         labels: Mapping[str, str] | None = None, page_size: int = 0, page_token: str = "",
                         as_of: AsOf = None, timeout: float | None = None) -> pb.ListAgentsResponse:
        """One page of ListAgents, as the server answers it."""
        request = pb.ListAgentsRequest(states=rq.state_names(states), category=rq.category_name(category),
                                       labels=dict(labels or {}), page_size=page_size, page_token=page_token,
                                       as_of=rq.as_of(as_of))
        return self._unary("ListAgents", request, pb.ListAgentsResponse, timeout)

    def list_agents(self, *, states: Iterable[StateLike] = (), category: Category | str | None = None,
                    labels: Mapping[str, str] | None = None, as_of: AsOf = None,
                    timeout: float | None = None) -> list[pb.Agent]:
        """Every matching agent, ordered by id, following the pages (a time
        `as_of` is pinned to the first page's sequence, so every page shows
        the same moment)."""
        wanted = list(states)
        agents: list[pb.Agent] = []
        token = ""
        point = as_of
        while True:
            page = self.list_agents_page(states=wanted, category=category, labels=labels, page_size=1000,
                                         page_token=token, as_of=point, timeout=timeout)
            agents.extend(page.agents)
            if point is not None:
                point = page.as_of_sequence
            token = page.next_page_token
            if not token:
                return agents

    def get_agent_history(self, agent_id: str, *, limit: int = 0,
                          timeout: float | None = None) -> list[pb.StateTransition]:
        """The agent's retained transitions, oldest first (`limit`: only the
        newest N), following the pages."""
        transitions: list[pb.StateTransition] = []
        token = ""
        while True:
            request = pb.GetAgentHistoryRequest(agent_id=agent_id, limit=limit, page_token=token)
            page = self._unary("GetAgentHistory", request, pb.GetAgentHistoryResponse, timeout)
            transitions.extend(page.transitions)
            token = page.next_page_token
            if not token:
                return transitions

    def list_transitions(self, *, agent_id: str = "", principal: str | None = None, page_size: int = 0,
                         page_token: str = "", timeout: float | None = None) -> pb.ListTransitionsResponse:
        """One page of the audit trail, newest first."""
        request = pb.ListTransitionsRequest(agent_id=agent_id, principal=principal, page_size=page_size,
                                            page_token=page_token)
        return self._unary("ListTransitions", request, pb.ListTransitionsResponse, timeout)

    def get_agent_analytics(self, agent_id: str, *, window: timedelta | float | None = None,
                            timeout: float | None = None) -> pb.GetAgentAnalyticsResponse:
        """One agent's state analytics over `window` (default 24 h)."""
        request = pb.GetAgentAnalyticsRequest(agent_id=agent_id, window=rq.duration(window))
        return self._unary("GetAgentAnalytics", request, pb.GetAgentAnalyticsResponse, timeout)

    def get_fleet_analytics(self, *, window: timedelta | float | None = None,
                            labels: Mapping[str, str] | None = None, buckets: int = 0, top: int = 0,
                            timeout: float | None = None) -> pb.GetFleetAnalyticsResponse:
        """The fleet's state analytics over `window` (default 24 h)."""
        request = pb.GetFleetAnalyticsRequest(window=rq.duration(window), labels=dict(labels or {}),
                                              buckets=buckets, top=top)
        return self._unary("GetFleetAnalytics", request, pb.GetFleetAnalyticsResponse, timeout)

    def get_lifecycle_metrics(self, *, as_of: AsOf = None,
                              timeout: float | None = None) -> pb.GetLifecycleMetricsResponse:
        """Fleet-wide counts now, or at `as_of`."""
        request = pb.GetLifecycleMetricsRequest(as_of=rq.as_of(as_of))
        return self._unary("GetLifecycleMetrics", request, pb.GetLifecycleMetricsResponse, timeout)

    def get_transition_rules(self, *, timeout: float | None = None) -> dict[State, list[State]]:
        """The active policy: each state's allowed targets."""
        response = self._unary("GetTransitionRules", pb.GetTransitionRulesRequest(),
                               pb.GetTransitionRulesResponse, timeout)
        return rq.rules_of(response)

    # --- the event stream ------------------------------------------------------

    def watch(
        self,
        *,
        start_sequence: int | None = None,
        snapshot: bool = False,
        agent_ids: Iterable[str] = (),
        states: Iterable[StateLike] = (),
        event_types: Iterable[EventType | int] = (),
        labels: Mapping[str, str] | None = None,
        idle_timeout: float | None = 60.0,
        reconnect_timeout: float | None = None,
    ) -> Watch:
        """The event stream, as an iterator of LifecycleEvent that reconnects
        by itself: every matching event exactly once, in sequence order,
        across server restarts, dropped connections and moves between
        endpoints.

        `start_sequence`: replay from there (1: the whole retained log);
        `snapshot`: first the current fleet (`Watch.snapshot()`), then the
        events after it; neither: live, from the head at the time of this
        call (read with GetLifecycleMetrics; a principal that may not read
        it watches from when the stream opens). Raises SequenceCompactedError (with
        `oldest_available_sequence`) when retention deleted events the watch
        still needed. `idle_timeout`: reconnect when nothing (not even a
        progress message) arrived for that long; keep it above twice the
        server's --progress-interval. `reconnect_timeout`: give up (raise
        the last error) after failing to reconnect for that long; None:
        never.
        """
        if snapshot and start_sequence is not None:
            raise ValueError("snapshot and start_sequence cannot be combined")
        if start_sequence is not None and start_sequence < 1:
            raise ValueError(f"start_sequence must be at least 1, got {start_sequence}")
        template = rq.watch_request(agent_ids=agent_ids, states=states, event_types=event_types, labels=labels)
        cursor = Cursor(template, start_sequence, snapshot)
        if cursor.needs_head:
            try:
                head = self._head_for_watch()
            except UnavailableError:
                head = None  # read again, with back-off, when the stream opens
            if head is not None:
                cursor.next_start = head + 1
        return Watch(self, cursor, idle_timeout=idle_timeout, reconnect_timeout=reconnect_timeout)

    def _head_for_watch(self) -> int | None:
        """The head sequence a live watch starts after; None when the
        principal may not read the metrics (the watch then starts live)."""
        try:
            return self.get_lifecycle_metrics().head_sequence
        except LifecycleError as error:
            if error.code == grpc.StatusCode.PERMISSION_DENIED:
                return None
            raise
