"""The asyncio client: the same methods as `Client`, as coroutines, and a
watch that is an async iterator with the same guarantees (see `watch`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import grpc.aio
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
    watch_retryable,
)
from .client import DEFAULT_TIMEOUT
from .errors import LifecycleError, UnavailableError, from_rpc_error
from .states import Category, EventType, State

R = TypeVar("R", bound=Message)


class AsyncClient:
    """The asyncio twin of `Client` (same arguments, same retries)."""

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
        self._channels: list[grpc.aio.Channel] = [
            grpc.aio.secure_channel(e.target, credentials, options=opts)
            if e.tls and credentials is not None
            else grpc.aio.insecure_channel(e.target, options=opts)
            for e in self._endpoints
        ]
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._timeout = timeout
        self.retry = retry
        self._current = 0
        #: Set by close(); open watches end instead of reconnecting.
        self.closed = False

    @classmethod
    def from_env(cls, **kwargs: Any) -> AsyncClient:
        """Configured by the CLI's variables (see Client.from_env)."""
        server, token, tls = env_settings()
        return cls(server, token=token, tls=tls, **kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connections (open watches end)."""
        self.closed = True
        for channel in self._channels:
            await channel.close()

    def _advance(self, index: int) -> None:
        if self._current == index:
            self._current = (index + 1) % len(self._channels)

    async def _unary(self, name: str, request: Message, response: type[R], timeout: float | None) -> R:
        backoff = Backoff(self.retry)
        attempt = 0
        while True:
            index = self._current
            method: grpc.aio.UnaryUnaryMultiCallable[Message, R] = self._channels[index].unary_unary(
                f"/{SERVICE}/{name}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response.FromString,
            )
            try:
                reply: R = await method(request, timeout=timeout or self._timeout, metadata=self._metadata)
                return reply
            except grpc.RpcError as e:
                error = from_rpc_error(e)
            attempt += 1
            if not retryable(error) or attempt >= self.retry.max_attempts:
                raise error
            if error.code == grpc.StatusCode.UNAVAILABLE:
                self._advance(index)
            await asyncio.sleep(backoff.delay(error))

    async def _mutate(self, name: str, request: Message, response: type[R], timeout: float | None) -> Change:
        return rq.change_of(await self._unary(name, request, response, timeout))

    async def register_agent(self, agent_id: str = "", *, name: str = "", labels: Mapping[str, str] | None = None,
                             reason: str = "", triggered_by: str = "", metadata: Mapping[str, Any] | None = None,
                             request_id: str | None = None, timeout: float | None = None) -> Change:
        fields = rq.common(reason, triggered_by, metadata, None, request_id)
        request = pb.RegisterAgentRequest(agent_id=agent_id, name=name, labels=dict(labels or {}), **fields)
        return await self._mutate("RegisterAgent", request, pb.RegisterAgentResponse, timeout)

    async def transition_agent(self, agent_id: str, target: StateLike, *, reason: str = "", triggered_by: str = "",
                               metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                               request_id: str | None = None, timeout: float | None = None) -> Change:
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        request = pb.TransitionAgentRequest(agent_id=agent_id, target_state=rq.state_name(target), **fields)
        return await self._mutate("TransitionAgent", request, pb.TransitionAgentResponse, timeout)

    async def deploy_agent(self, agent_id: str, *, reason: str = "", triggered_by: str = "",
                           metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                           request_id: str | None = None, timeout: float | None = None) -> Change:
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        return await self._mutate("DeployAgent", pb.DeployAgentRequest(agent_id=agent_id, **fields),
                                  pb.DeployAgentResponse, timeout)

    async def start_agent(self, agent_id: str, *, wait_for_heartbeat: bool | None = None, reason: str = "",
                          triggered_by: str = "", metadata: Mapping[str, Any] | None = None,
                          expected_version: int | None = None, request_id: str | None = None,
                          timeout: float | None = None) -> Change:
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        request = pb.StartAgentRequest(agent_id=agent_id, **fields)
        if wait_for_heartbeat is not None:
            request.wait_for_heartbeat = wait_for_heartbeat
        return await self._mutate("StartAgent", request, pb.StartAgentResponse, timeout)

    async def stop_agent(self, agent_id: str, *, reason: str = "", triggered_by: str = "",
                         metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                         request_id: str | None = None, timeout: float | None = None) -> Change:
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        return await self._mutate("StopAgent", pb.StopAgentRequest(agent_id=agent_id, **fields),
                                  pb.StopAgentResponse, timeout)

    async def assign_task(self, agent_id: str, task_id: str = "", *, reason: str = "", triggered_by: str = "",
                          metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                          request_id: str | None = None, timeout: float | None = None) -> Change:
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        return await self._mutate("AssignTask", pb.AssignTaskRequest(agent_id=agent_id, task_id=task_id, **fields),
                                  pb.AssignTaskResponse, timeout)

    async def complete_task(self, agent_id: str, task_id: str = "", *, reason: str = "", triggered_by: str = "",
                            metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                            request_id: str | None = None, timeout: float | None = None) -> Change:
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        request = pb.CompleteTaskRequest(agent_id=agent_id, task_id=task_id, **fields)
        return await self._mutate("CompleteTask", request, pb.CompleteTaskResponse, timeout)

    async def handle_error(self, agent_id: str, error_message: str, *, triggered_by: str = "",
                           metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                           request_id: str | None = None, timeout: float | None = None) -> Change:
        fields = rq.common(None, triggered_by, metadata, expected_version, request_id)
        request = pb.HandleErrorRequest(agent_id=agent_id, error_message=error_message, **fields)
        return await self._mutate("HandleError", request, pb.HandleErrorResponse, timeout)

    async def put_in_maintenance(self, agent_id: str, *, reason: str = "", triggered_by: str = "",
                                 metadata: Mapping[str, Any] | None = None, expected_version: int | None = None,
                                 request_id: str | None = None, timeout: float | None = None) -> Change:
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        return await self._mutate("PutInMaintenance", pb.PutInMaintenanceRequest(agent_id=agent_id, **fields),
                                  pb.PutInMaintenanceResponse, timeout)

    async def resume_from_maintenance(self, agent_id: str, *, reason: str = "", triggered_by: str = "",
                                      metadata: Mapping[str, Any] | None = None,
                                      expected_version: int | None = None, request_id: str | None = None,
                                      timeout: float | None = None) -> Change:
        fields = rq.common(reason, triggered_by, metadata, expected_version, request_id)
        request = pb.ResumeFromMaintenanceRequest(agent_id=agent_id, **fields)
        return await self._mutate("ResumeFromMaintenance", request, pb.ResumeFromMaintenanceResponse, timeout)

    async def sync_external_status(self, agent_id: str, source: str, status: str, *,
                                   metadata: Mapping[str, Any] | None = None,
                                   timeout: float | None = None) -> pb.SyncExternalStatusResponse:
        request = pb.SyncExternalStatusRequest(agent_id=agent_id, source=source, status=status,
                                               metadata=rq.struct(metadata))
        return await self._unary("SyncExternalStatus", request, pb.SyncExternalStatusResponse, timeout)

    async def heartbeat(self, agent_id: str, *, load: float | None = None, current_task: str = "",
                        timeout: float | None = None) -> pb.Agent:
        request = pb.HeartbeatRequest(agent_id=agent_id, load=load, current_task=current_task)
        return (await self._unary("Heartbeat", request, pb.HeartbeatResponse, timeout)).agent

    async def heartbeat_stream(self, beats: Iterable[pb.HeartbeatRequest], *, timeout: float | None = None) -> int:
        method: grpc.aio.StreamUnaryMultiCallable[pb.HeartbeatRequest, pb.HeartbeatStreamResponse] = self._channels[
            self._current
        ].stream_unary(
            f"/{SERVICE}/HeartbeatStream",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.HeartbeatStreamResponse.FromString,
        )
        try:
            reply: pb.HeartbeatStreamResponse = await method(iter(beats), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return reply.heartbeats

    async def get_agent(self, agent_id: str, *, as_of: AsOf = None, timeout: float | None = None) -> pb.Agent:
        request = pb.GetAgentRequest(agent_id=agent_id, as_of=rq.as_of(as_of))
        return (await self._unary("GetAgent", request, pb.GetAgentResponse, timeout)).agent

    async def list_agents_page(self, *, states: Iterable[StateLike] = (), category: Category | str | None = None,
                               labels: Mapping[str, str] | None = None, page_size: int = 0, page_token: str = "",
                               as_of: AsOf = None, timeout: float | None = None) -> pb.ListAgentsResponse:
        request = pb.ListAgentsRequest(states=rq.state_names(states), category=rq.category_name(category),
                                       labels=dict(labels or {}), page_size=page_size, page_token=page_token,
                                       as_of=rq.as_of(as_of))
        return await self._unary("ListAgents", request, pb.ListAgentsResponse, timeout)

    async def list_agents(self, *, states: Iterable[StateLike] = (), category: Category | str | None = None,
                          labels: Mapping[str, str] | None = None, as_of: AsOf = None,
                          timeout: float | None = None) -> list[pb.Agent]:
        wanted = list(states)
        agents: list[pb.Agent] = []
        token = ""
        point = as_of
        while True:
            page = await self.list_agents_page(states=wanted, category=category, labels=labels, page_size=1000,
                                               page_token=token, as_of=point, timeout=timeout)
            agents.extend(page.agents)
            if point is not None:
                point = page.as_of_sequence
            token = page.next_page_token
            if not token:
                return agents

    async def get_agent_history(self, agent_id: str, *, limit: int = 0,
                                timeout: float | None = None) -> list[pb.StateTransition]:
        transitions: list[pb.StateTransition] = []
        token = ""
        while True:
            request = pb.GetAgentHistoryRequest(agent_id=agent_id, limit=limit, page_token=token)
            page = await self._unary("GetAgentHistory", request, pb.GetAgentHistoryResponse, timeout)
            transitions.extend(page.transitions)
            token = page.next_page_token
            if not token:
                return transitions

    async def list_transitions(self, *, agent_id: str = "", principal: str | None = None, page_size: int = 0,
                               page_token: str = "", timeout: float | None = None) -> pb.ListTransitionsResponse:
        request = pb.ListTransitionsRequest(agent_id=agent_id, principal=principal, page_size=page_size,
                                            page_token=page_token)
        return await self._unary("ListTransitions", request, pb.ListTransitionsResponse, timeout)

    async def get_agent_analytics(self, agent_id: str, *, window: timedelta | float | None = None,
                                  timeout: float | None = None) -> pb.GetAgentAnalyticsResponse:
        request = pb.GetAgentAnalyticsRequest(agent_id=agent_id, window=rq.duration(window))
        return await self._unary("GetAgentAnalytics", request, pb.GetAgentAnalyticsResponse, timeout)

    async def get_fleet_analytics(self, *, window: timedelta | float | None = None,
                                  labels: Mapping[str, str] | None = None, buckets: int = 0, top: int = 0,
                                  timeout: float | None = None) -> pb.GetFleetAnalyticsResponse:
        request = pb.GetFleetAnalyticsRequest(window=rq.duration(window), labels=dict(labels or {}),
                                              buckets=buckets, top=top)
        return await self._unary("GetFleetAnalytics", request, pb.GetFleetAnalyticsResponse, timeout)

    async def get_lifecycle_metrics(self, *, as_of: AsOf = None,
                                    timeout: float | None = None) -> pb.GetLifecycleMetricsResponse:
        request = pb.GetLifecycleMetricsRequest(as_of=rq.as_of(as_of))
        return await self._unary("GetLifecycleMetrics", request, pb.GetLifecycleMetricsResponse, timeout)

    async def get_transition_rules(self, *, timeout: float | None = None) -> dict[State, list[State]]:
        response = await self._unary("GetTransitionRules", pb.GetTransitionRulesRequest(),
                                     pb.GetTransitionRulesResponse, timeout)
        return rq.rules_of(response)

    def watch(self, *, start_sequence: int | None = None, snapshot: bool = False, agent_ids: Iterable[str] = (),
              states: Iterable[StateLike] = (), event_types: Iterable[EventType | int] = (),
              labels: Mapping[str, str] | None = None, idle_timeout: float | None = 60.0,
              reconnect_timeout: float | None = None) -> AsyncWatch:
        """The event stream as an async iterator; see Client.watch. A live
        watch (neither start_sequence nor snapshot) starts from the head when
        it is first read, or when `await watch.start()` returns."""
        if snapshot and start_sequence is not None:
            raise ValueError("snapshot and start_sequence cannot be combined")
        if start_sequence is not None and start_sequence < 1:
            raise ValueError(f"start_sequence must be at least 1, got {start_sequence}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, got {idle_timeout}")
        template = rq.watch_request(agent_ids=agent_ids, states=states, event_types=event_types, labels=labels)
        return AsyncWatch(self, Cursor(template, start_sequence, snapshot), idle_timeout, reconnect_timeout)

    async def _head_for_watch(self) -> int | None:
        try:
            return (await self.get_lifecycle_metrics()).head_sequence
        except LifecycleError as error:
            if error.code == grpc.StatusCode.PERMISSION_DENIED:
                return None
            raise

    def _watch_stream(self, index: int, request: pb.WatchEventsRequest) -> Any:
        method: grpc.aio.UnaryStreamMultiCallable[pb.WatchEventsRequest, pb.WatchEventsResponse] = self._channels[
            index
        ].unary_stream(
            f"/{SERVICE}/WatchEvents",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.WatchEventsResponse.FromString,
        )
        return method(request, metadata=self._metadata)


class AsyncWatch:
    """Async-iterates LifecycleEvents with the guarantees of the sync
    `Watch`."""

    def __init__(self, client: AsyncClient, cursor: Cursor, idle_timeout: float | None,
                 reconnect_timeout: float | None) -> None:
        self._client = client
        self._cursor = cursor
        self._idle_timeout = idle_timeout
        self._reconnect_timeout = reconnect_timeout
        self._backoff = Backoff(client.retry)
        self._call: Any = None
        self._index = 0
        self._failing_since: float | None = None
        self._closed = False

    @property
    def last_sequence(self) -> int | None:
        return self._cursor.last_sequence

    @property
    def next_sequence(self) -> int | None:
        return self._cursor.next_start

    @property
    def connections(self) -> int:
        return self._cursor.connections

    @property
    def snapshot_head(self) -> int:
        return self._cursor.snapshot_head

    async def start(self) -> AsyncWatch:
        """Fixes where a live watch starts (the server's head now), so that
        changes made after this returns are delivered; otherwise a live
        watch starts from the head when it is first read."""
        if self._cursor.needs_head:
            head = await self._client._head_for_watch()
            if head is not None:
                self._cursor.next_start = head + 1
        return self

    async def snapshot(self) -> list[pb.Agent]:
        """The fleet as the watch started (`snapshot=True` only)."""
        if not self._cursor.want_snapshot:
            raise ValueError("this watch was not opened with snapshot=True")
        while self._cursor.snapshot is None:
            self._cursor.accept(await self._receive())
        return self._cursor.snapshot

    def __aiter__(self) -> AsyncIterator[pb.LifecycleEvent]:
        return self

    async def __anext__(self) -> pb.LifecycleEvent:
        while True:
            event = self._cursor.accept(await self._receive())
            if event is not None:
                return event

    def close(self) -> None:
        """Ends the watch; iteration stops."""
        self._closed = True
        self._drop()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _drop(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    async def _receive(self) -> pb.WatchEventsResponse:
        while True:
            if self._closed or self._client.closed:
                raise StopAsyncIteration
            error: LifecycleError
            try:
                if self._call is None:
                    await self.start()
                    self._index = self._client._current
                    self._call = self._client._watch_stream(self._index, self._cursor.request())
                    if self._closed:  # close() ran while the head was being read
                        raise StopAsyncIteration
                message = await asyncio.wait_for(self._call.read(), self._idle_timeout)
                if message is grpc.aio.EOF:
                    error = UnavailableError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
                else:
                    self._failing_since = None
                    self._backoff.reset()
                    result: pb.WatchEventsResponse = message
                    return result
            except asyncio.TimeoutError:
                error = UnavailableError(grpc.StatusCode.UNAVAILABLE, "no message within idle_timeout")
            except asyncio.CancelledError:
                if self._closed:  # close() cancelled the call under a pending read
                    raise StopAsyncIteration from None
                raise
            except grpc.RpcError as e:
                error = from_rpc_error(e)
            except LifecycleError as e:
                error = e
            await self._recover(error)

    async def _recover(self, error: LifecycleError) -> None:
        self._drop()
        if self._closed or self._client.closed:
            self._closed = True
            raise StopAsyncIteration
        if not watch_retryable(error):
            self._closed = True
            raise error
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif self._reconnect_timeout is not None and now - self._failing_since > self._reconnect_timeout:
            self._closed = True
            raise error
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self._client._advance(self._index)
        await asyncio.sleep(self._backoff.delay(error))
