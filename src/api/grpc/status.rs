//! The one place that turns a [`crate::Error`] into a `tonic::Status`
//! (etcd's `toGRPCErrorMap`). Every status carries google.rpc details: an
//! `ErrorInfo` with a stable reason in the `agentlifecycle.v1` domain, plus
//! `BadRequest` or `PreconditionFailure` where they apply.
//!
//! Depends on the crate's error types and tonic only: handlers reach it
//! through `?` and the `From` impls here, never by building a `Status`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::{error, warn};

use crate::{
    Error,
    domain::{AgentState, FieldViolation, TransitionError},
};

/// `ErrorInfo.domain` of every error.
pub const ERROR_DOMAIN: &str = "agentlifecycle.v1";

fn info(reason: &str, pairs: &[(&str, String)]) -> ErrorDetails {
    let metadata: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata)
}

fn names(states: &[AgentState]) -> String {
    states
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Bytes of a status message (and of a BadRequest description). Status
/// travels in HTTP/2 trailers, which clients cap (16 KiB by default in
/// tonic); an error must never outgrow them, whatever the input was.
const MAX_MESSAGE_BYTES: usize = 1024;

/// `text`, cut at [`MAX_MESSAGE_BYTES`] (on a character boundary).
fn bounded(mut text: String) -> String {
    if text.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// Malformed input: INVALID_ARGUMENT naming the field, as
/// [`Error::InvalidArgument`].
impl From<FieldViolation> for Status {
    fn from(violation: FieldViolation) -> Self {
        Status::from(Error::InvalidArgument(violation))
    }
}

/// A refused caller: PERMISSION_DENIED, as [`Error::PermissionDenied`].
impl From<crate::domain::PermissionDenied> for Status {
    fn from(denied: crate::domain::PermissionDenied) -> Self {
        Status::from(Error::PermissionDenied(denied))
    }
}

/// UNIMPLEMENTED for `method` (a full gRPC path): the generated server was
/// asked for a method the served service answers before the generated
/// server sees it.
pub(crate) fn not_routed(method: &str) -> Status {
    Status::with_error_details(
        Code::Unimplemented,
        format!("{method} is not served by this service"),
        info("METHOD_NOT_ROUTED", &[("method", method.to_string())]),
    )
}

/// Every error's code and details, in one exhaustive match: a new variant
/// fails to compile here until it has its code. Server faults (the store,
/// internal failures) answer with a fixed message and log the cause.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = bounded(err.to_string());
        let (code, details) = match &err {
            Error::InvalidArgument(violation) => invalid_argument(violation),
            Error::AgentNotFound(id) => (
                Code::NotFound,
                info("AGENT_NOT_FOUND", &[("agent_id", id.to_string())]),
            ),
            Error::AgentExists { agent_id, state } => (
                Code::AlreadyExists,
                info(
                    "AGENT_ALREADY_EXISTS",
                    &[
                        ("agent_id", agent_id.to_string()),
                        ("state", state.to_string()),
                    ],
                ),
            ),
            Error::Transition(err) => transition(err),
            Error::SequenceCompacted { requested, oldest } => (
                Code::OutOfRange,
                info(
                    "SEQUENCE_COMPACTED",
                    &[
                        ("requested_sequence", requested.to_string()),
                        ("oldest_available_sequence", oldest.to_string()),
                    ],
                ),
            ),
            Error::TimeCompacted {
                requested,
                oldest,
                oldest_at,
            } => (
                Code::OutOfRange,
                info(
                    "TIME_COMPACTED",
                    &[
                        ("requested_time", crate::domain::rfc3339(*requested)),
                        ("oldest_available_sequence", oldest.to_string()),
                        ("oldest_available_time", crate::domain::rfc3339(*oldest_at)),
                    ],
                ),
            ),
            Error::SequenceNotYetWritten { requested, head } => (
                Code::OutOfRange,
                info(
                    "SEQUENCE_NOT_YET_WRITTEN",
                    &[
                        ("requested_sequence", requested.to_string()),
                        ("head_sequence", head.to_string()),
                    ],
                ),
            ),
            Error::ShuttingDown => (Code::Unavailable, info("SHUTTING_DOWN", &[])),
            Error::Unauthenticated(_) => (Code::Unauthenticated, info("UNAUTHENTICATED", &[])),
            Error::ResourceExhausted {
                reason,
                retry_after,
                ..
            } => {
                let mut details = info(reason, &[]);
                if let Some(delay) = retry_after {
                    details.set_retry_info(Some(*delay));
                }
                (Code::ResourceExhausted, details)
            }
            Error::RequestIdReused { request_id } => (
                Code::AlreadyExists,
                info(
                    "REQUEST_ID_REUSED",
                    &[("request_id", crate::domain::limits::quoted(request_id))],
                ),
            ),
            Error::RequestCompacted { .. } => {
                (Code::FailedPrecondition, info("REQUEST_COMPACTED", &[]))
            }
            Error::PermissionDenied(denied) => permission_denied(denied),
            Error::Store(source) => return store_failure(source),
            Error::Spawn(_) | Error::TaskFailed(_) | Error::NoRuntime(_) => {
                error!(error = %crate::error::chain(&err), "internal failure answered with INTERNAL");
                return Status::with_error_details(
                    Code::Internal,
                    "internal error; nothing was applied",
                    info("INTERNAL", &[]),
                );
            }
        };
        Status::with_error_details(code, message, details)
    }
}

/// Malformed input: INVALID_ARGUMENT with a `BadRequest` naming the field.
fn invalid_argument(violation: &FieldViolation) -> (Code, ErrorDetails) {
    let mut details = info("INVALID_ARGUMENT", &[("field", violation.field.clone())]);
    details.add_bad_request_violation(
        bounded(violation.field.clone()),
        bounded(violation.description.clone()),
    );
    (Code::InvalidArgument, details)
}

/// A refused transition's code and details: FAILED_PRECONDITION (not
/// allowed, vetoed) or ABORTED (version mismatch).
fn transition(err: &TransitionError) -> (Code, ErrorDetails) {
    match err {
        TransitionError::NotAllowed {
            agent_id,
            from,
            to,
            allowed,
        } => not_allowed(agent_id.to_string(), *from, *to, allowed),
        TransitionError::RequiresState {
            agent_id,
            operation,
            state,
            required,
        } => {
            let mut details = info(
                "TRANSITION_NOT_ALLOWED",
                &[
                    ("agent_id", agent_id.to_string()),
                    ("current_state", state.to_string()),
                    ("operation", operation.to_string()),
                    ("required_states", names(required)),
                ],
            );
            details.add_precondition_failure_violation(
                "STATE",
                format!("agents/{agent_id}"),
                format!(
                    "current state is {state}; {operation} needs {}",
                    names(required)
                ),
            );
            (Code::FailedPrecondition, details)
        }
        TransitionError::VersionMismatch {
            agent_id,
            expected,
            actual,
        } => (
            Code::Aborted,
            info(
                "VERSION_MISMATCH",
                &[
                    ("agent_id", agent_id.to_string()),
                    ("expected_version", expected.to_string()),
                    ("actual_version", actual.to_string()),
                ],
            ),
        ),
        TransitionError::Vetoed {
            agent_id,
            from,
            to,
            reason,
        } => vetoed(agent_id.to_string(), *from, *to, reason),
    }
}

/// A transition the policy does not allow from the agent's state:
/// FAILED_PRECONDITION listing the allowed targets.
fn not_allowed(
    agent_id: String,
    from: AgentState,
    to: AgentState,
    allowed: &[AgentState],
) -> (Code, ErrorDetails) {
    let mut details = info(
        "TRANSITION_NOT_ALLOWED",
        &[
            ("agent_id", agent_id.clone()),
            ("current_state", from.to_string()),
            ("target_state", to.to_string()),
            ("allowed_targets", names(allowed)),
        ],
    );
    details.add_precondition_failure_violation(
        "STATE",
        format!("agents/{agent_id}"),
        format!(
            "current state is {from}; allowed targets: {}",
            if allowed.is_empty() {
                "none".into()
            } else {
                names(allowed)
            }
        ),
    );
    (Code::FailedPrecondition, details)
}

/// A transition a pre-hook vetoed: FAILED_PRECONDITION with the veto's
/// reason.
fn vetoed(
    agent_id: String,
    from: Option<AgentState>,
    to: AgentState,
    reason: &str,
) -> (Code, ErrorDetails) {
    let mut details = info(
        "TRANSITION_VETOED",
        &[
            ("agent_id", agent_id.clone()),
            (
                "current_state",
                from.map_or("unspecified", |s| s.as_str()).to_string(),
            ),
            ("target_state", to.to_string()),
            ("veto_reason", reason.to_string()),
        ],
    );
    details.add_precondition_failure_violation(
        "HANDLER_VETO",
        format!("agents/{agent_id}"),
        reason.to_string(),
    );
    (Code::FailedPrecondition, details)
}

/// A refused caller: PERMISSION_DENIED, logged once here.
fn permission_denied(denied: &crate::domain::PermissionDenied) -> (Code, ErrorDetails) {
    let crate::domain::PermissionDenied {
        principal,
        role,
        action,
    } = denied;
    warn!(%principal, %role, %action, "refused: permission denied");
    (
        Code::PermissionDenied,
        info(
            "PERMISSION_DENIED",
            &[("principal", principal.clone()), ("role", role.to_string())],
        ),
    )
}

/// The store failed: UNAVAILABLE, with a message that says whether the
/// change may have been applied; the cause is logged, not sent.
fn store_failure(source: &crate::store::StoreError) -> Status {
    if matches!(
        source,
        crate::store::StoreError::CommitOutcomeUnknown { .. }
    ) {
        warn!(error = %crate::error::chain(source), "commit with an unknown outcome answered with UNAVAILABLE");
        return Status::with_error_details(
            Code::Unavailable,
            "the store failed while committing: the change may or may not have been applied; read the agent to learn which",
            info("COMMIT_OUTCOME_UNKNOWN", &[]),
        );
    }
    warn!(error = %crate::error::chain(source), "store failure answered with UNAVAILABLE");
    let details = info("STORE_UNAVAILABLE", &[]);
    Status::with_error_details(
        Code::Unavailable,
        "the store could not complete the operation; nothing was applied",
        details,
    )
}
