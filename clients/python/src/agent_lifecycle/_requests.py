"""Request messages built from plain values, shared by the sync and asyncio
clients, and the values they return."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Union

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from . import lifecycle_pb2 as pb
from .states import Category, EventType, State

#: A point of the event log for reads of the past: a sequence (right after
#: that event; 0 is before the first), or a time (right after the newest
#: event committed at or before it; a naive datetime is taken as UTC).
AsOf = Union[int, datetime, None]

#: A state as the client methods accept it: the enum, a name ("online"), or
#: the proto number.
StateLike = Union[State, str, int]


@dataclass(frozen=True)
class Change:
    """What a mutating call did: the agent after it and the transitions
    recorded, in the order applied (empty when nothing changed, e.g. a
    repeated registration)."""

    agent: pb.Agent
    transitions: list[pb.StateTransition]

    @property
    def state(self) -> State:
        """The agent's state after the call."""
        return State(self.agent.state)

    @property
    def sequence(self) -> int:
        """The sequence of the last transition recorded (0 when none)."""
        return self.transitions[-1].sequence if self.transitions else 0


def change_of(response: Any) -> Change:
    """A Change from any mutating RPC's response (they share `agent` and
    `transitions`)."""
    return Change(agent=response.agent, transitions=list(response.transitions))


def struct(metadata: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    """A google.protobuf.Struct of a JSON-like mapping."""
    if metadata is None:
        return None
    value = struct_pb2.Struct()
    value.update(dict(metadata))
    return value


def as_of(point: AsOf) -> pb.AsOf | None:
    """The AsOf message of a point (None: now)."""
    if point is None:
        return None
    if isinstance(point, bool):
        raise TypeError("as_of must be a sequence (int) or a datetime, not a bool")
    if isinstance(point, int):
        if point < 0:
            raise ValueError(f"as_of sequence must be >= 0, got {point}")
        return pb.AsOf(sequence=point)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(point)
    return pb.AsOf(time=stamp)


def duration(window: timedelta | float | None) -> duration_pb2.Duration | None:
    """A google.protobuf.Duration of a timedelta or a number of seconds."""
    if window is None:
        return None
    value = duration_pb2.Duration()
    value.FromTimedelta(window if isinstance(window, timedelta) else timedelta(seconds=window))
    return value


def request_id(given: str | None) -> str:
    """The idempotency key of a mutating call: the caller's, else a new
    UUID (kept for every retry of that call)."""
    return given if given else str(uuid.uuid4())


def common(
    reason: str | None,
    triggered_by: str,
    metadata: Mapping[str, Any] | None,
    expected_version: int | None,
    request: str | None,
) -> dict[str, Any]:
    """The fields every state-changing request shares."""
    fields: dict[str, Any] = {"triggered_by": triggered_by, "request_id": request_id(request)}
    if reason is not None:
        fields["reason"] = reason
    value = struct(metadata)
    if value is not None:
        fields["metadata"] = value
    if expected_version is not None:
        fields["expected_version"] = expected_version
    return fields


def state_name(state: StateLike) -> str:
    """The proto enum name of a state ("AGENT_STATE_ONLINE"), as the
    generated constructors accept it."""
    return "AGENT_STATE_" + State.parse(state).name


def state_names(states: Iterable[StateLike]) -> list[str]:
    return [state_name(s) for s in states]


def category_name(category: Category | str | None) -> str:
    """The proto enum name of a category filter (UNSPECIFIED for none)."""
    if category is None:
        return "AGENT_CATEGORY_UNSPECIFIED"
    if isinstance(category, Category):
        return "AGENT_CATEGORY_" + category.name
    try:
        return "AGENT_CATEGORY_" + Category[category.strip().upper().removeprefix("AGENT_CATEGORY_")].name
    except KeyError:
        known = ", ".join(c.name.lower() for c in Category)
        raise ValueError(f"unknown category {category!r} (known: {known})") from None


def watch_request(
    *,
    agent_ids: Iterable[str],
    states: Iterable[StateLike],
    event_types: Iterable[EventType | int],
    labels: Mapping[str, str] | None,
) -> pb.WatchEventsRequest:
    """The filter part of a WatchEvents request (start and snapshot are set
    per connection)."""
    return pb.WatchEventsRequest(
        agent_ids=list(agent_ids),
        states=state_names(states),
        event_types=["EVENT_TYPE_" + EventType(t).name for t in event_types],
        labels=dict(labels or {}),
    )


def rules_of(response: pb.GetTransitionRulesResponse) -> dict[State, list[State]]:
    """The policy as a mapping from each state to its allowed targets."""
    return {
        State(rule.from_state): [State(t) for t in rule.allowed_targets]
        for rule in response.rules
        if rule.from_state
    }
