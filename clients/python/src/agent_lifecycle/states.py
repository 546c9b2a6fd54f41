"""The lifecycle's enums as Python enums: states, categories, event types.

Their values are the proto numbers, so `State(agent.state)` converts a
message field and `int(State.ONLINE)` goes back. `State.ONLINE.label` is the
lowercase name used wherever the server writes a state as a string.
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    """One of the 18 lifecycle states (proto `AgentState`)."""

    REGISTERED = 1
    DEPLOYING = 2
    DEPLOYED = 3
    STARTING = 4
    ONLINE = 5
    BUSY = 6
    IDLE = 7
    STOPPING = 8
    UPDATING = 9
    SCALING = 10
    ERROR = 11
    FAILED = 12
    TIMEOUT = 13
    MAINTENANCE = 14
    SUSPENDED = 15
    OFFLINE = 16
    TERMINATED = 17
    DELETED = 18

    @property
    def label(self) -> str:
        """The lowercase name ("online")."""
        return self.name.lower()

    @property
    def is_operational(self) -> bool:
        """ONLINE, BUSY or IDLE."""
        return self in (State.ONLINE, State.BUSY, State.IDLE)

    @property
    def is_available_for_tasks(self) -> bool:
        """ONLINE or IDLE."""
        return self in (State.ONLINE, State.IDLE)

    @property
    def is_error(self) -> bool:
        """ERROR, FAILED or TIMEOUT."""
        return self in (State.ERROR, State.FAILED, State.TIMEOUT)

    @property
    def is_maintenance(self) -> bool:
        """MAINTENANCE, SUSPENDED or UPDATING."""
        return self in (State.MAINTENANCE, State.SUSPENDED, State.UPDATING)

    @classmethod
    def parse(cls, value: State | str | int) -> State:
        """A state from itself, its proto number, or a name in any case,
        with or without the `AGENT_STATE_` prefix ("online", "ONLINE").

        Raises ValueError naming the value when it is none of these."""
        if isinstance(value, State):
            return value
        if isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                raise ValueError(f"{value} is not an agent state number (1..18)") from None
        name = value.strip().upper().removeprefix("AGENT_STATE_")
        try:
            return cls[name]
        except KeyError:
            known = ", ".join(s.label for s in cls)
            raise ValueError(f"unknown agent state {value!r} (known: {known})") from None


class Category(enum.IntEnum):
    """A ListAgents category filter (proto `AgentCategory`)."""

    OPERATIONAL = 1
    AVAILABLE = 2
    ERROR = 3
    MAINTENANCE = 4


class EventType(enum.IntEnum):
    """What a LifecycleEvent records (proto `EventType`)."""

    REGISTERED = 1
    TRANSITIONED = 2


def states_from_names(text: str) -> list[State]:
    """The states of a comma-separated list of lowercase names, as the
    server writes them in error metadata ("deploying,deleted"); unknown
    names are left out."""
    out = []
    for name in text.split(","):
        try:
            out.append(State.parse(name))
        except ValueError:
            continue
    return out
