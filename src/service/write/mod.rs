//! The write path: every mutating operation of the service.
//!
//! A change goes through named steps:
//!
//! 1. The public operation (here) checks the caller's fields and picks the
//!    [`plan::Operation`]: its required states and its path of targets.
//! 2. [`AgentLifecycleService::submit`] (`execute`): a request with a
//!    `request_id` runs once per id (`idempotency`): a retry gets the
//!    original outcome back, other content under the same id is refused.
//! 3. [`AgentLifecycleService::retry_on_conflict`]: when another process
//!    changed the agent in between (a shared store), the change is planned
//!    again against the new state.
//! 4. [`AgentLifecycleService::plan_and_commit`]: takes the agent's writer
//!    lock and builds the [`plan::Plan`], the one validation (`plan`).
//! 5. [`AgentLifecycleService::commit_planned`]: pre-transition hooks (which
//!    may veto) -> the commit (`log`) -> post-transition hooks -> the
//!    outcome.
//!
//! Registrations take steps 2, 4 and 5 ([`AgentLifecycleService::submit_registration`]).
//! The store's compare-and-set on the agent's version is the safety net
//! behind the validation: a change it refuses comes back as a conflict.
//!
//! Must not depend on the commit thread's internals: a change reaches the
//! log only as a [`crate::service::log::Proposal`].

mod execute;
pub(crate) mod idempotency;
mod plan;

pub use self::idempotency::{DEFAULT_REQUEST_WINDOW, MAX_REQUEST_ID_BYTES};
use self::plan::{
    ASSIGN, COMPLETE, DEPLOY, HANDLE_ERROR, MAINTENANCE, RESUME, START, STOP, TRANSITION,
};
use crate::{
    domain::{AgentId, AgentState, limits},
    error::Result,
    service::{AgentLifecycleService, ChangeRequest, Outcome, Registration},
};

/// Checks the sizes of what the caller said about a change.
fn check_change(change: &ChangeRequest) -> Result<()> {
    limits::check_text("reason", &change.reason, limits::MAX_REASON_BYTES)?;
    limits::check_text(
        "triggered_by",
        &change.triggered_by,
        limits::MAX_SHORT_TEXT_BYTES,
    )?;
    limits::check_metadata("metadata", &change.metadata)?;
    if let Some(id) = &change.request_id {
        limits::check_text("request_id", id, MAX_REQUEST_ID_BYTES)?;
    }
    Ok(())
}

fn add_task_id(change: &mut ChangeRequest, task_id: Option<String>) -> Result<()> {
    if let Some(task_id) = task_id.filter(|t| !t.is_empty()) {
        limits::check_text("task_id", &task_id, limits::MAX_SHORT_TEXT_BYTES)?;
        change.metadata.insert("task_id".into(), task_id.into());
    }
    Ok(())
}

impl AgentLifecycleService {
    /// Creates an agent in REGISTERED. Idempotent while the agent is still
    /// REGISTERED (returns it, records nothing).
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] for oversized fields,
    /// [`crate::Error::AgentExists`] when the id has left REGISTERED, a
    /// veto, or a store failure.
    pub async fn register_agent(&self, registration: Registration) -> Result<Outcome> {
        limits::check_text("name", &registration.name, limits::MAX_SHORT_TEXT_BYTES)?;
        limits::check_labels("labels", &registration.labels)?;
        check_change(&registration.change)?;
        self.refuse_when_closed()?;
        self.submit_registration(registration).await
    }

    /// Moves an agent to `target` if the policy allows it.
    ///
    /// # Errors
    /// [`crate::Error::AgentNotFound`],
    /// [`crate::domain::TransitionError::NotAllowed`],
    /// [`crate::domain::TransitionError::VersionMismatch`], a veto,
    /// oversized fields, or a store failure. Nothing is recorded on any
    /// error.
    pub async fn transition(
        &self,
        id: AgentId,
        target: AgentState,
        change: ChangeRequest,
    ) -> Result<Outcome> {
        self.submit(id, TRANSITION, &[(target, "")], change).await
    }

    /// DEPLOYING then DEPLOYED, committed together.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn deploy_agent(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.submit(id, DEPLOY, DEPLOY.path, change).await
    }

    /// STARTING then ONLINE, committed together.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn start_agent(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.submit(id, START, START.path, change).await
    }

    /// STOPPING then OFFLINE, committed together.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn stop_agent(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.submit(id, STOP, STOP.path, change).await
    }

    /// ONLINE or IDLE -> BUSY; `task_id` (optional) goes into the metadata.
    ///
    /// # Errors
    /// [`crate::domain::TransitionError::RequiresState`] when the agent is
    /// not available.
    pub async fn assign_task(
        &self,
        id: AgentId,
        task_id: Option<String>,
        mut change: ChangeRequest,
    ) -> Result<Outcome> {
        add_task_id(&mut change, task_id)?;
        self.submit(id, ASSIGN, ASSIGN.path, change).await
    }

    /// BUSY -> IDLE; `task_id` (optional) goes into the metadata.
    ///
    /// # Errors
    /// [`crate::domain::TransitionError::RequiresState`] when the agent is
    /// not BUSY.
    pub async fn complete_task(
        &self,
        id: AgentId,
        task_id: Option<String>,
        mut change: ChangeRequest,
    ) -> Result<Outcome> {
        add_task_id(&mut change, task_id)?;
        self.submit(id, COMPLETE, COMPLETE.path, change).await
    }

    /// -> ERROR with reason `Error: <message>` and metadata `error_message`.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn handle_error(
        &self,
        id: AgentId,
        error_message: &str,
        mut change: ChangeRequest,
    ) -> Result<Outcome> {
        // The message becomes the reason "Error: <message>", so its limit is
        // the reason's less the prefix, and a violation names the field the
        // caller sent.
        limits::check_text(
            "error_message",
            error_message,
            limits::MAX_ERROR_MESSAGE_BYTES,
        )?;
        change.reason = format!("Error: {error_message}");
        change
            .metadata
            .insert("error_message".into(), error_message.to_string().into());
        self.submit(id, HANDLE_ERROR, HANDLE_ERROR.path, change)
            .await
    }

    /// -> MAINTENANCE with the given reason.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn put_in_maintenance(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.submit(id, MAINTENANCE, MAINTENANCE.path, change).await
    }

    /// MAINTENANCE -> ONLINE.
    ///
    /// # Errors
    /// [`crate::domain::TransitionError::RequiresState`] when the agent is
    /// not in MAINTENANCE.
    pub async fn resume_from_maintenance(
        &self,
        id: AgentId,
        change: ChangeRequest,
    ) -> Result<Outcome> {
        self.submit(id, RESUME, RESUME.path, change).await
    }
}
