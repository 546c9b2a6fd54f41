/**
 * Typed errors for the server's refusals. Every failed call rejects with a
 * `LifecycleError` subclass chosen by the gRPC code and, where the server
 * names one, the ErrorInfo reason: `TransitionNotAllowedError` carries the
 * allowed targets, `SequenceCompactedError` the oldest sequence kept,
 * `ResourceExhaustedError.retryDelayMs` the server's RetryInfo.
 */
import { Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";

import { type Details, type Violation, emptyDetails, parseDetails } from "./details";
import { type AgentState, statesFromNames } from "./states";

const DETAILS_KEY = "grpc-status-details-bin";

/** A call the server (or the transport) refused. */
export class LifecycleError extends Error {
  /** The gRPC status code (`status.NOT_FOUND`, ...). */
  readonly code: Status;
  /** The ErrorInfo reason ("TRANSITION_NOT_ALLOWED"); empty without one. */
  readonly reason: string;
  /** The ErrorInfo metadata. */
  readonly metadata: Record<string, string>;
  /** RetryInfo's delay in milliseconds, when the server sent one. */
  readonly retryDelayMs: number | undefined;
  readonly preconditionViolations: Violation[];
  readonly fieldViolations: Violation[];
  /** The status message. */
  readonly details: string;

  constructor(code: Status, message: string, details: Details = emptyDetails()) {
    super(`${Status[code] ?? code}${details.reason ? ` [${details.reason}]` : ""}: ${message}`);
    this.name = new.target.name;
    this.code = code;
    this.details = message;
    this.reason = details.reason;
    this.metadata = { ...details.metadata };
    this.retryDelayMs = details.retryDelayMs;
    this.preconditionViolations = details.preconditionViolations;
    this.fieldViolations = details.fieldViolations;
  }
}

function int(text: string | undefined): number | undefined {
  if (text === undefined || !/^\d+$/.test(text)) {
    return undefined;
  }
  return Number(text);
}

/** INVALID_ARGUMENT: malformed input; `field` names the field. */
export class InvalidArgumentError extends LifecycleError {
  get field(): string {
    return this.metadata["field"] ?? "";
  }
}
/** NOT_FOUND: no such agent. */
export class NotFoundError extends LifecycleError {
  get agentId(): string {
    return this.metadata["agent_id"] ?? "";
  }
}
/** ALREADY_EXISTS: RegisterAgent of an id that left REGISTERED. */
export class AlreadyExistsError extends LifecycleError {}
/** ALREADY_EXISTS (REQUEST_ID_REUSED): a request id sent again with different content. */
export class RequestIdReusedError extends AlreadyExistsError {}
/** FAILED_PRECONDITION. */
export class FailedPreconditionError extends LifecycleError {}
/**
 * The policy refuses the move (TRANSITION_NOT_ALLOWED): `allowedTargets` from
 * `currentState`; `requiredStates` for operations that need given states.
 */
export class TransitionNotAllowedError extends FailedPreconditionError {
  get agentId(): string {
    return this.metadata["agent_id"] ?? "";
  }
  get currentState(): AgentState | undefined {
    return statesFromNames(this.metadata["current_state"] ?? "")[0];
  }
  get targetState(): AgentState | undefined {
    return statesFromNames(this.metadata["target_state"] ?? "")[0];
  }
  get allowedTargets(): AgentState[] {
    return statesFromNames(this.metadata["allowed_targets"] ?? "");
  }
  get requiredStates(): AgentState[] {
    return statesFromNames(this.metadata["required_states"] ?? "");
  }
}
/** A pre-transition hook vetoed the move (TRANSITION_VETOED). */
export class TransitionVetoedError extends FailedPreconditionError {
  get vetoReason(): string {
    return this.metadata["veto_reason"] ?? "";
  }
}
/** A retry whose original events retention already deleted (REQUEST_COMPACTED). */
export class RequestCompactedError extends FailedPreconditionError {}
/** ABORTED (VERSION_MISMATCH): expectedVersion was not the agent's; re-read and retry. */
export class VersionMismatchError extends LifecycleError {
  get expectedVersion(): number | undefined {
    return int(this.metadata["expected_version"]);
  }
  get actualVersion(): number | undefined {
    return int(this.metadata["actual_version"]);
  }
}
/** OUT_OF_RANGE. */
export class OutOfRangeError extends LifecycleError {}
/**
 * The events needed (a watch's next sequence, an asOf point) were deleted by
 * retention; `oldestAvailableSequence` is the oldest kept.
 */
export class SequenceCompactedError extends OutOfRangeError {
  get oldestAvailableSequence(): number {
    return int(this.metadata["oldest_available_sequence"]) ?? 0;
  }
  get requestedSequence(): number | undefined {
    return int(this.metadata["requested_sequence"]);
  }
}
/** A sequence beyond the head (SEQUENCE_NOT_YET_WRITTEN). */
export class SequenceNotYetWrittenError extends OutOfRangeError {
  get headSequence(): number | undefined {
    return int(this.metadata["head_sequence"]);
  }
}
/** UNAVAILABLE: stopping, unreachable, or the store failed (unary calls are retried first). */
export class UnavailableError extends LifecycleError {}
/** The store failed while committing; the change may or may not be applied (COMMIT_OUTCOME_UNKNOWN). */
export class CommitOutcomeUnknownError extends UnavailableError {}
/** UNAUTHENTICATED. */
export class UnauthenticatedError extends LifecycleError {}
/** PERMISSION_DENIED. */
export class PermissionDeniedError extends LifecycleError {}
/** RESOURCE_EXHAUSTED: a rate limit (`retryDelayMs`) or the cap of watch streams. */
export class ResourceExhaustedError extends LifecycleError {}
/** AGENT_RATE_LIMITED or RATE_LIMITED. */
export class RateLimitedError extends ResourceExhaustedError {}
/** TOO_MANY_WATCHES. */
export class TooManyWatchesError extends ResourceExhaustedError {}
/** DEADLINE_EXCEEDED. */
export class DeadlineExceededError extends LifecycleError {}
/** INTERNAL, UNKNOWN and any other code. */
export class InternalError extends LifecycleError {}

type ErrorClass = new (code: Status, message: string, details: Details) => LifecycleError;

const BY_REASON: Record<string, ErrorClass> = {
  REQUEST_ID_REUSED: RequestIdReusedError,
  TRANSITION_NOT_ALLOWED: TransitionNotAllowedError,
  TRANSITION_VETOED: TransitionVetoedError,
  REQUEST_COMPACTED: RequestCompactedError,
  VERSION_MISMATCH: VersionMismatchError,
  SEQUENCE_COMPACTED: SequenceCompactedError,
  TIME_COMPACTED: SequenceCompactedError,
  SEQUENCE_NOT_YET_WRITTEN: SequenceNotYetWrittenError,
  COMMIT_OUTCOME_UNKNOWN: CommitOutcomeUnknownError,
  AGENT_RATE_LIMITED: RateLimitedError,
  RATE_LIMITED: RateLimitedError,
  TOO_MANY_WATCHES: TooManyWatchesError,
};

const BY_CODE = new Map<Status, ErrorClass>([
  [Status.INVALID_ARGUMENT, InvalidArgumentError],
  [Status.NOT_FOUND, NotFoundError],
  [Status.ALREADY_EXISTS, AlreadyExistsError],
  [Status.FAILED_PRECONDITION, FailedPreconditionError],
  [Status.ABORTED, VersionMismatchError],
  [Status.OUT_OF_RANGE, OutOfRangeError],
  [Status.UNAVAILABLE, UnavailableError],
  [Status.UNAUTHENTICATED, UnauthenticatedError],
  [Status.PERMISSION_DENIED, PermissionDeniedError],
  [Status.RESOURCE_EXHAUSTED, ResourceExhaustedError],
  [Status.DEADLINE_EXCEEDED, DeadlineExceededError],
]);

/** The error for a status: by reason when the code agrees, else by code. */
export function errorFor(code: Status, message: string, details: Details): LifecycleError {
  const byCode = BY_CODE.get(code) ?? InternalError;
  const byReason = BY_REASON[details.reason];
  const cls = byReason !== undefined && byReason.prototype instanceof byCode ? byReason : byCode;
  return new cls(code, message, details);
}

function isServiceError(error: unknown): error is ServiceError {
  return typeof error === "object" && error !== null && "code" in error && "metadata" in error;
}

/** The typed error for whatever a grpc-js call rejected with. */
export function fromGrpcError(error: unknown): LifecycleError {
  if (error instanceof LifecycleError) {
    return error;
  }
  if (!isServiceError(error)) {
    return new UnavailableError(Status.UNAVAILABLE, error instanceof Error ? error.message : String(error));
  }
  let trailer: Uint8Array | undefined;
  if (error.metadata instanceof Metadata) {
    const value = error.metadata.get(DETAILS_KEY)[0];
    if (value instanceof Uint8Array) {
      trailer = value;
    }
  }
  return errorFor(error.code, error.details ?? "", parseDetails(trailer));
}
