"""Client for the agent-lifecycle control plane (agentlifecycle.v1).

    from agent_lifecycle import Client, State

    with Client("http://127.0.0.1:50051") as client:
        watch = client.watch(snapshot=True)
        for agent in watch.snapshot():
            print(agent.agent_id, State(agent.state).label)
        for event in watch:          # resumes by itself, never skips or repeats
            print(event.sequence, State(event.transition.to_state).label)

`Client` (sync) and `aio.AsyncClient` (asyncio) have one method per RPC;
the messages are `agent_lifecycle.lifecycle_pb2`, generated from the proto
when the package was built. Errors are the typed exceptions of
`agent_lifecycle.errors`.
"""

from . import errors, lifecycle_pb2
from ._requests import AsOf, Change, StateLike
from ._transport import RetryPolicy, Tls
from .aio import AsyncClient, AsyncWatch
from .client import Client
from .errors import (
    AlreadyExistsError,
    CommitOutcomeUnknownError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LifecycleError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    RateLimitedError,
    RequestCompactedError,
    RequestIdReusedError,
    ResourceExhaustedError,
    SequenceCompactedError,
    SequenceNotYetWrittenError,
    TooManyWatchesError,
    TransitionNotAllowedError,
    TransitionVetoedError,
    UnauthenticatedError,
    UnavailableError,
    VersionMismatchError,
)
from .states import Category, EventType, State
from .watch import Watch

__all__ = [
    "AlreadyExistsError",
    "AsOf",
    "AsyncClient",
    "AsyncWatch",
    "Category",
    "Change",
    "Client",
    "CommitOutcomeUnknownError",
    "DeadlineExceededError",
    "EventType",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LifecycleError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RequestCompactedError",
    "RequestIdReusedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SequenceCompactedError",
    "SequenceNotYetWrittenError",
    "State",
    "StateLike",
    "Tls",
    "TooManyWatchesError",
    "TransitionNotAllowedError",
    "TransitionVetoedError",
    "UnauthenticatedError",
    "UnavailableError",
    "VersionMismatchError",
    "Watch",
    "errors",
    "lifecycle_pb2",
]
