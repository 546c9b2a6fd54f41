//! What a failed call means, from the status and its rich details
//! (ErrorInfo, PreconditionFailure, RetryInfo).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::domain::AgentState;

/// A failed call.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientError {
    /// The transition is not in the policy from the agent's state
    /// (FAILED_PRECONDITION, TRANSITION_NOT_ALLOWED).
    #[error("{message}")]
    TransitionNotAllowed {
        /// The agent.
        agent_id: String,
        /// Its state.
        current: Option<AgentState>,
        /// Where it may go from there.
        allowed: Vec<AgentState>,
        /// The server's message.
        message: String,
    },
    /// The events asked for were compacted (OUT_OF_RANGE,
    /// SEQUENCE_COMPACTED): the oldest sequence still kept.
    #[error("{message}")]
    Compacted {
        /// The oldest sequence the server still has.
        oldest: u64,
        /// The server's message.
        message: String,
    },
    /// No such agent (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The server could not be reached, or kept answering UNAVAILABLE.
    #[error("{0}")]
    Unavailable(String),
    /// Any other refusal, with the status code, the ErrorInfo reason and
    /// RetryInfo's delay when the server gave them.
    #[error("{code:?}: {message}")]
    Refused {
        /// The gRPC status code.
        code: Code,
        /// ErrorInfo's reason (`VERSION_MISMATCH`, `RATE_LIMITED`, ...).
        reason: Option<String>,
        /// The server's message.
        message: String,
        /// How long the server asked to wait before trying again.
        retry_after: Option<Duration>,
    },
    /// Bad client settings (an address, TLS files, a token).
    #[error("{0}")]
    Config(String),
    /// The server answered something the contract does not allow.
    #[error("{0}")]
    Protocol(String),
}

impl ClientError {
    /// ErrorInfo's reason, when the server gave one.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ClientError::TransitionNotAllowed { .. } => Some("TRANSITION_NOT_ALLOWED"),
            ClientError::Compacted { .. } => Some("SEQUENCE_COMPACTED"),
            ClientError::Refused { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        let info = status.get_details_error_info();
        let reason = info.as_ref().map(|i| i.reason.clone());
        let meta = |key: &str| info.as_ref().and_then(|i| i.metadata.get(key).cloned());
        let message = status.message().to_string();
        match (status.code(), reason.as_deref()) {
            (Code::FailedPrecondition, Some("TRANSITION_NOT_ALLOWED")) => {
                let states = |text: Option<String>| -> Vec<AgentState> {
                    text.unwrap_or_default()
                        .split(',')
                        .filter_map(|s| s.trim().parse().ok())
                        .collect()
                };
                ClientError::TransitionNotAllowed {
                    agent_id: meta("agent_id").unwrap_or_default(),
                    current: meta("current_state").and_then(|s| s.parse().ok()),
                    allowed: states(meta("allowed_targets")),
                    message,
                }
            }
            (Code::OutOfRange, Some("SEQUENCE_COMPACTED")) => ClientError::Compacted {
                oldest: meta("oldest_available_sequence")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default(),
                message,
            },
            (Code::NotFound, _) => ClientError::NotFound(message),
            (Code::Unavailable, _) => ClientError::Unavailable(message),
            (code, _) => ClientError::Refused {
                code,
                reason,
                message,
                retry_after: status
                    .get_details_retry_info()
                    .and_then(|info| info.retry_delay),
            },
        }
    }
}
