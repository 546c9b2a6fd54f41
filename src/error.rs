//! The crate's error: every way a library or RPC call can fail.
//!
//! `grpc::status` maps each variant to one gRPC code; nothing else builds a
//! `Status`.

use crate::{
    domain::{AgentId, AgentState, FieldViolation, PermissionDenied, TransitionError},
    store::StoreError,
};

/// A failed operation. Nothing was applied when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed input, naming the field.
    #[error(transparent)]
    InvalidArgument(#[from] FieldViolation),
    /// No agent has this id.
    #[error("agent {0} not found")]
    AgentNotFound(AgentId),
    /// Registration of an id that has left REGISTERED.
    #[error("agent {agent_id} already exists in state {state}")]
    AgentExists {
        /// The agent.
        agent_id: AgentId,
        /// Its current state.
        state: AgentState,
    },
    /// The domain refused the transition.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// A watch asked for events that retention deleted.
    #[error("sequence {requested} has been compacted; the oldest available sequence is {oldest}")]
    SequenceCompacted {
        /// What was asked for.
        requested: u64,
        /// The oldest retained sequence.
        oldest: u64,
    },
    /// A read of the fleet at a time older than the retained log.
    #[error(
        "the fleet at {} is no longer known: the oldest retained event is {oldest}, committed at {}",
        crate::domain::rfc3339(*requested),
        crate::domain::rfc3339(*oldest_at)
    )]
    TimeCompacted {
        /// The time asked for.
        requested: std::time::SystemTime,
        /// The oldest retained sequence.
        oldest: u64,
        /// When it was committed: the oldest time that can be read.
        oldest_at: std::time::SystemTime,
    },
    /// A watch asked to start beyond the next sequence.
    #[error("sequence {requested} is beyond the head sequence {head}")]
    SequenceNotYetWritten {
        /// What was asked for.
        requested: u64,
        /// The newest committed sequence.
        head: u64,
    },
    /// Authentication is configured and the call did not pass it.
    #[error("{0}")]
    Unauthenticated(String),
    /// Over a rate limit or a cap; `retry_after` when waiting helps.
    #[error("{message}")]
    ResourceExhausted {
        /// The stable reason (`RATE_LIMITED`, `AGENT_RATE_LIMITED`,
        /// `TOO_MANY_WATCHES`).
        reason: &'static str,
        /// What was exceeded.
        message: String,
        /// When to try again.
        retry_after: Option<std::time::Duration>,
    },
    /// The caller's role does not allow the call (or not for this agent).
    #[error(transparent)]
    PermissionDenied(#[from] PermissionDenied),
    /// A `request_id` already used for a request with other content.
    #[error("request_id {request_id:?} was already used for a different request")]
    RequestIdReused {
        /// The id.
        request_id: String,
    },
    /// A retried request whose original records retention already deleted.
    #[error(
        "the request was already applied, but its events were compacted (the oldest retained sequence is past {oldest}); its outcome cannot be returned again"
    )]
    RequestCompacted {
        /// The first sequence it committed.
        oldest: u64,
    },
    /// The service is shutting down and takes no more work.
    #[error("the service is shutting down")]
    ShuttingDown,
    /// A thread the service needs could not be started.
    #[error("starting a thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A background task failed (panicked or was cancelled) before it
    /// answered.
    #[error("a background task failed: {0}")]
    TaskFailed(#[source] tokio::task::JoinError),
    /// A part of the service that runs on tokio was started outside a tokio
    /// runtime.
    #[error("{0} needs a tokio runtime; open the service inside one")]
    NoRuntime(&'static str),
    /// The store failed; the change was not applied. Shared because one
    /// failed batch fails every request in it.
    #[error("store failure: {0}")]
    Store(std::sync::Arc<StoreError>),
}

/// Shorthand for crate results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<StoreError> for Error {
    fn from(err: StoreError) -> Self {
        Error::Store(std::sync::Arc::new(err))
    }
}

/// An error and its sources, `": "`-separated, for logs.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
