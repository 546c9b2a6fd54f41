"""Typed exceptions for the server's errors.

Every failed call raises a `LifecycleError` subclass chosen by the gRPC code
and, where the server names one, the ErrorInfo reason: catch
`TransitionNotAllowedError` to learn the allowed targets of a refused
transition, `SequenceCompactedError` for the oldest sequence still kept,
`ResourceExhaustedError.retry_delay` for the server's RetryInfo. Each
carries `code`, `reason`, `message`, the ErrorInfo `metadata` and the
google.rpc violations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from ._details import Details, Violation, parse
from .states import State, states_from_names

_DETAILS_KEY = "grpc-status-details-bin"


class LifecycleError(Exception):
    """A call the server (or the transport) refused."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Details | None = None) -> None:
        self.code = code
        self.message = message
        details = details or Details()
        #: The ErrorInfo reason ("TRANSITION_NOT_ALLOWED"); empty without one.
        self.reason = details.reason
        #: The ErrorInfo metadata (string to string).
        self.metadata: dict[str, str] = dict(details.metadata)
        #: RetryInfo's delay in seconds, when the server sent one.
        self.retry_delay = details.retry_delay
        #: PreconditionFailure violations (type, subject, description).
        self.precondition_violations: list[Violation] = list(details.precondition_violations)
        #: BadRequest field violations (the field in `subject`).
        self.field_violations: list[Violation] = list(details.field_violations)
        reason = f" [{self.reason}]" if self.reason else ""
        super().__init__(f"{code.name}{reason}: {message}")


class InvalidArgumentError(LifecycleError):
    """INVALID_ARGUMENT: malformed input; `field` names the field."""

    @property
    def field(self) -> str:
        return self.metadata.get("field", "")


class NotFoundError(LifecycleError):
    """NOT_FOUND: no such agent (AGENT_NOT_FOUND)."""

    @property
    def agent_id(self) -> str:
        return self.metadata.get("agent_id", "")


class AlreadyExistsError(LifecycleError):
    """ALREADY_EXISTS: RegisterAgent of an id that left REGISTERED."""


class RequestIdReusedError(AlreadyExistsError):
    """ALREADY_EXISTS (REQUEST_ID_REUSED): a request_id sent again with
    different content."""


class FailedPreconditionError(LifecycleError):
    """FAILED_PRECONDITION."""


class TransitionNotAllowedError(FailedPreconditionError):
    """The policy refuses the move (TRANSITION_NOT_ALLOWED). `allowed_targets`
    are the states the agent may move to from `current_state`; for an
    operation that needs given states (AssignTask, CompleteTask, ...)
    `required_states` names them."""

    @property
    def agent_id(self) -> str:
        return self.metadata.get("agent_id", "")

    @property
    def current_state(self) -> State | None:
        found = states_from_names(self.metadata.get("current_state", ""))
        return found[0] if found else None

    @property
    def target_state(self) -> State | None:
        found = states_from_names(self.metadata.get("target_state", ""))
        return found[0] if found else None

    @property
    def allowed_targets(self) -> list[State]:
        return states_from_names(self.metadata.get("allowed_targets", ""))

    @property
    def required_states(self) -> list[State]:
        return states_from_names(self.metadata.get("required_states", ""))


class TransitionVetoedError(FailedPreconditionError):
    """A pre-transition hook vetoed the move (TRANSITION_VETOED)."""

    @property
    def veto_reason(self) -> str:
        return self.metadata.get("veto_reason", "")


class RequestCompactedError(FailedPreconditionError):
    """A retry whose original events retention already deleted."""


class VersionMismatchError(LifecycleError):
    """ABORTED (VERSION_MISMATCH): `expected_version` was not the agent's;
    re-read and retry."""

    @property
    def expected_version(self) -> int | None:
        return _int(self.metadata.get("expected_version"))

    @property
    def actual_version(self) -> int | None:
        return _int(self.metadata.get("actual_version"))


class OutOfRangeError(LifecycleError):
    """OUT_OF_RANGE."""


class SequenceCompactedError(OutOfRangeError):
    """The events needed (a watch's next sequence, an `as_of` point) were
    deleted by retention. `oldest_available_sequence` is the oldest one
    kept: start again from a snapshot, or from there knowingly."""

    @property
    def oldest_available_sequence(self) -> int:
        return _int(self.metadata.get("oldest_available_sequence")) or 0

    @property
    def requested_sequence(self) -> int | None:
        return _int(self.metadata.get("requested_sequence"))


class SequenceNotYetWrittenError(OutOfRangeError):
    """A sequence beyond the server's head (SEQUENCE_NOT_YET_WRITTEN)."""

    @property
    def head_sequence(self) -> int | None:
        return _int(self.metadata.get("head_sequence"))


class UnavailableError(LifecycleError):
    """UNAVAILABLE: the server is stopping, unreachable, or its store failed.
    Mutating calls are retried (with their request_id) before this is
    raised."""


class CommitOutcomeUnknownError(UnavailableError):
    """The store failed while committing: the change may or may not have
    been applied (COMMIT_OUTCOME_UNKNOWN)."""


class UnauthenticatedError(LifecycleError):
    """UNAUTHENTICATED: no valid bearer token or client certificate."""


class PermissionDeniedError(LifecycleError):
    """PERMISSION_DENIED: the principal's role does not allow the call."""


class ResourceExhaustedError(LifecycleError):
    """RESOURCE_EXHAUSTED: over a rate limit (`retry_delay` from RetryInfo)
    or the cap of watch streams."""


class RateLimitedError(ResourceExhaustedError):
    """Over the per-agent transition rate (AGENT_RATE_LIMITED) or the
    per-principal request rate (RATE_LIMITED)."""


class TooManyWatchesError(ResourceExhaustedError):
    """Over the cap of open WatchEvents streams (TOO_MANY_WATCHES)."""


class DeadlineExceededError(LifecycleError):
    """DEADLINE_EXCEEDED: the call's timeout passed."""


class InternalError(LifecycleError):
    """INTERNAL, UNKNOWN and any other code."""


_BY_REASON: dict[str, type[LifecycleError]] = {
    "REQUEST_ID_REUSED": RequestIdReusedError,
    "TRANSITION_NOT_ALLOWED": TransitionNotAllowedError,
    "TRANSITION_VETOED": TransitionVetoedError,
    "REQUEST_COMPACTED": RequestCompactedError,
    "VERSION_MISMATCH": VersionMismatchError,
    "SEQUENCE_COMPACTED": SequenceCompactedError,
    "TIME_COMPACTED": SequenceCompactedError,
    "SEQUENCE_NOT_YET_WRITTEN": SequenceNotYetWrittenError,
    "COMMIT_OUTCOME_UNKNOWN": CommitOutcomeUnknownError,
    "AGENT_RATE_LIMITED": RateLimitedError,
    "RATE_LIMITED": RateLimitedError,
    "TOO_MANY_WATCHES": TooManyWatchesError,
}

_BY_CODE: dict[grpc.StatusCode, type[LifecycleError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: VersionMismatchError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def error_for(code: grpc.StatusCode, message: str, details: Details) -> LifecycleError:
    """The exception for a status: by reason when the code agrees, else by
    code."""
    cls = _BY_REASON.get(details.reason)
    by_code = _BY_CODE.get(code, InternalError)
    if cls is None or not issubclass(cls, by_code):
        cls = by_code
    return cls(code, message, details)


def _trailer(metadata: Sequence[Any] | None) -> bytes | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return value
    return None


def from_rpc_error(error: grpc.RpcError) -> LifecycleError:
    """The typed exception for a grpc error (sync or asyncio)."""
    call: Any = error
    try:
        code = call.code()
        message = call.details() or ""
        trailing = call.trailing_metadata()
    except Exception:  # not a call: the transport failed before one existed
        return UnavailableError(grpc.StatusCode.UNAVAILABLE, str(error))
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    items = list(trailing) if trailing is not None else []
    return error_for(code, message, parse(_trailer(items)))
