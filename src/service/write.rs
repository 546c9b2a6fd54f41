//! The write path's caller side: every mutating operation of the service.
//!
//! A change is validated once, here, while the caller holds the agent's
//! writer lock (so the agent cannot move underneath): [`Plan`] is the
//! validated change. Registration and transitions then share one path,
//! [`AgentLifecycleService::execute`]: pre-transition hooks (which may veto)
//! -> propose to the commit thread (see `commit`) -> post-transition hooks
//! -> the outcome. The store's compare-and-set on the agent's version is the
//! safety net behind the validation: a change it refuses comes back as a
//! conflict.

use std::sync::Arc;

use tokio::sync::{OwnedMutexGuard, oneshot};
use tracing::{info, warn};

use super::{
    AgentLifecycleService, ChangeRequest, Outcome, Registration,
    commit::{self, Committed, Message, Proposal, Rejected, Step},
};
use crate::{
    domain::{
        Agent, AgentId, AgentState, HookPhase, RequestTag, TransitionContext, TransitionError,
        limits,
    },
    error::{Error, Result},
    store::AgentIdentity,
};

/// How many times a change that lost to another process's change of the
/// same agent is validated again before it is answered as a conflict.
const CONFLICT_RETRIES: u32 = 8;

/// The operations with a fixed path, their required states and default
/// reasons.
#[derive(Clone, Copy, Debug)]
struct Operation {
    name: &'static str,
    /// States the agent must be in (empty: whatever the policy allows).
    requires: &'static [AgentState],
    /// Targets, in order, each with its default reason.
    path: &'static [(AgentState, &'static str)],
}

const DEPLOY: Operation = Operation {
    name: "deploy_agent",
    requires: &[],
    path: &[
        (AgentState::Deploying, "deployment started"),
        (AgentState::Deployed, "deployment completed"),
    ],
};
const START: Operation = Operation {
    name: "start_agent",
    requires: &[],
    path: &[
        (AgentState::Starting, "agent starting"),
        (AgentState::Online, "agent started"),
    ],
};
const STOP: Operation = Operation {
    name: "stop_agent",
    requires: &[],
    path: &[
        (AgentState::Stopping, "agent stopping"),
        (AgentState::Offline, "agent stopped"),
    ],
};
const ASSIGN: Operation = Operation {
    name: "assign_task",
    requires: &[AgentState::Online, AgentState::Idle],
    path: &[(AgentState::Busy, "task assigned")],
};
const COMPLETE: Operation = Operation {
    name: "complete_task",
    requires: &[AgentState::Busy],
    path: &[(AgentState::Idle, "task completed")],
};
const HANDLE_ERROR: Operation = Operation {
    name: "handle_error",
    requires: &[],
    path: &[(AgentState::Error, "error")],
};
const MAINTENANCE: Operation = Operation {
    name: "put_in_maintenance",
    requires: &[],
    path: &[(AgentState::Maintenance, "maintenance")],
};
const RESUME: Operation = Operation {
    name: "resume_from_maintenance",
    requires: &[AgentState::Maintenance],
    path: &[(AgentState::Online, "resumed from maintenance")],
};

/// A validated change, ready for hooks and the commit thread.
struct Plan {
    agent_id: AgentId,
    /// The agent as validated; `None` for a registration.
    prior: Option<Arc<Agent>>,
    /// Name and labels, for a registration.
    identity: Option<AgentIdentity>,
    steps: Vec<Step>,
    /// The agent's writer lock, for a transition.
    guard: Option<OwnedMutexGuard<()>>,
}

impl Plan {
    /// The hook context of each step, before the commit.
    fn pre_contexts(&self) -> impl Iterator<Item = TransitionContext> + '_ {
        let mut from = self.prior.as_ref().map(|a| a.state);
        self.steps.iter().map(move |step| {
            let ctx = TransitionContext {
                phase: HookPhase::PreTransition,
                agent_id: self.agent_id,
                from_state: from,
                to_state: step.to,
                reason: step.reason.clone(),
                triggered_by: step.triggered_by.clone(),
                metadata: step.metadata.clone(),
                sequence: None,
                version: None,
                timestamp: None,
            };
            from = Some(step.to);
            ctx
        })
    }
}

fn defaulted(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_string()
    } else {
        value
    }
}

fn check_change(change: &ChangeRequest) -> Result<()> {
    limits::check_text("reason", &change.reason, limits::MAX_REASON_BYTES)?;
    limits::check_text(
        "triggered_by",
        &change.triggered_by,
        limits::MAX_SHORT_TEXT_BYTES,
    )?;
    limits::check_metadata("metadata", &change.metadata)?;
    if let Some(id) = &change.request_id {
        limits::check_text("request_id", id, super::MAX_REQUEST_ID_BYTES)?;
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

/// The answer to a registration of an id that exists: the agent itself
/// while it is still REGISTERED (nothing recorded), a refusal otherwise.
fn existing_registration(agent: Arc<Agent>) -> Result<Outcome> {
    if agent.state == AgentState::Registered {
        return Ok(Outcome {
            agent,
            transitions: Vec::new(),
        });
    }
    Err(Error::AgentExists {
        agent_id: agent.id,
        state: agent.state,
    })
}

impl AgentLifecycleService {
    /// Creates an agent in REGISTERED. Idempotent while the agent is still
    /// REGISTERED (returns it, records nothing).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for oversized fields,
    /// [`Error::AgentExists`] when the id has left REGISTERED, a veto, or a
    /// store failure.
    pub async fn register_agent(&self, registration: Registration) -> Result<Outcome> {
        limits::check_text("name", &registration.name, limits::MAX_SHORT_TEXT_BYTES)?;
        limits::check_labels("labels", &registration.labels)?;
        check_change(&registration.change)?;
        self.refuse_when_closed()?;
        if !has_request_id(&registration.change) {
            // No retry to recognise: no fingerprint to take.
            return self.register_once(registration, None).await;
        }
        let change = &registration.change;
        let labels = serde_json::to_vec(&registration.labels).unwrap_or_default();
        let metadata = serde_json::to_vec(&change.metadata).unwrap_or_default();
        let id = registration
            .agent_id
            .map(|id| *id.as_bytes())
            .unwrap_or_default();
        let fingerprint = super::requests::fingerprint(&[
            b"register_agent",
            &id,
            registration.name.as_bytes(),
            &labels,
            change.reason.as_bytes(),
            change.triggered_by.as_bytes(),
            &metadata,
        ]);
        let principal = change.caller.principal_name().to_string();
        let request_id = change.request_id.clone();
        self.idempotent(&principal, request_id.as_deref(), fingerprint, |tag| {
            self.register_once(registration, tag)
        })
        .await
    }

    async fn register_once(
        &self,
        registration: Registration,
        request: Option<Arc<RequestTag>>,
    ) -> Result<Outcome> {
        let agent_id = registration.agent_id.unwrap_or_else(AgentId::generate);
        if let Some(existing) = self.shared().agent(agent_id) {
            return existing_registration(existing);
        }
        let change = registration.change;
        let plan = Plan {
            agent_id,
            prior: None,
            identity: Some(AgentIdentity {
                name: Arc::from(registration.name),
                labels: Arc::new(registration.labels),
            }),
            steps: vec![Step {
                to: AgentState::Registered,
                reason: defaulted(change.reason, "agent registered"),
                triggered_by: defaulted(change.triggered_by, "system"),
                principal: change.caller.principal_name().to_string(),
                request,
                metadata: change.metadata,
            }],
            guard: None,
        };
        let outcome = self.execute(plan).await?;
        if let Some(record) = outcome.transitions.first() {
            info!(%agent_id, sequence = record.sequence, "agent registered");
        }
        Ok(outcome)
    }

    /// Moves an agent to `target` if the policy allows it.
    ///
    /// # Errors
    /// [`Error::AgentNotFound`], [`TransitionError::NotAllowed`],
    /// [`TransitionError::VersionMismatch`], a veto, oversized fields, or a
    /// store failure. Nothing is recorded on any error.
    pub async fn transition(
        &self,
        id: AgentId,
        target: AgentState,
        change: ChangeRequest,
    ) -> Result<Outcome> {
        let op = Operation {
            name: "transition",
            requires: &[],
            path: &[],
        };
        self.apply(id, op, &[(target, "")], change).await
    }

    /// DEPLOYING then DEPLOYED, committed together.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn deploy_agent(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.apply(id, DEPLOY, DEPLOY.path, change).await
    }

    /// STARTING then ONLINE, committed together.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn start_agent(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.apply(id, START, START.path, change).await
    }

    /// STOPPING then OFFLINE, committed together.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn stop_agent(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.apply(id, STOP, STOP.path, change).await
    }

    /// ONLINE or IDLE -> BUSY; `task_id` (optional) goes into the metadata.
    ///
    /// # Errors
    /// [`TransitionError::RequiresState`] when the agent is not available.
    pub async fn assign_task(
        &self,
        id: AgentId,
        task_id: Option<String>,
        mut change: ChangeRequest,
    ) -> Result<Outcome> {
        add_task_id(&mut change, task_id)?;
        self.apply(id, ASSIGN, ASSIGN.path, change).await
    }

    /// BUSY -> IDLE; `task_id` (optional) goes into the metadata.
    ///
    /// # Errors
    /// [`TransitionError::RequiresState`] when the agent is not BUSY.
    pub async fn complete_task(
        &self,
        id: AgentId,
        task_id: Option<String>,
        mut change: ChangeRequest,
    ) -> Result<Outcome> {
        add_task_id(&mut change, task_id)?;
        self.apply(id, COMPLETE, COMPLETE.path, change).await
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
        self.apply(id, HANDLE_ERROR, HANDLE_ERROR.path, change)
            .await
    }

    /// -> MAINTENANCE with the given reason.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn put_in_maintenance(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.apply(id, MAINTENANCE, MAINTENANCE.path, change).await
    }

    /// MAINTENANCE -> ONLINE.
    ///
    /// # Errors
    /// [`TransitionError::RequiresState`] when the agent is not in
    /// MAINTENANCE.
    pub async fn resume_from_maintenance(
        &self,
        id: AgentId,
        change: ChangeRequest,
    ) -> Result<Outcome> {
        self.apply(id, RESUME, RESUME.path, change).await
    }

    /// Validates `path` from the agent's current state under its writer
    /// lock, then executes it. When another process changed the agent in
    /// between (a shared store), the change is validated again against the
    /// new state, up to [`CONFLICT_RETRIES`] times, unless the caller asked
    /// for a specific version, which is then a version mismatch.
    async fn apply(
        &self,
        id: AgentId,
        op: Operation,
        path: &[(AgentState, &'static str)],
        change: ChangeRequest,
    ) -> Result<Outcome> {
        check_change(&change)?;
        if !has_request_id(&change) {
            // No retry to recognise: no fingerprint to take.
            return self.apply_retrying(id, op, path, change, None).await;
        }
        let targets: Vec<u8> = path.iter().map(|(to, _)| *to as u8).collect();
        let metadata = serde_json::to_vec(&change.metadata).unwrap_or_default();
        let expected = change
            .expected_version
            .map(u64::to_be_bytes)
            .unwrap_or_default();
        let fingerprint = super::requests::fingerprint(&[
            op.name.as_bytes(),
            id.as_bytes(),
            &targets,
            change.reason.as_bytes(),
            change.triggered_by.as_bytes(),
            &metadata,
            &[u8::from(change.expected_version.is_some())],
            &expected,
        ]);
        let principal = change.caller.principal_name().to_string();
        let request_id = change.request_id.clone();
        // Boxed: the remembered-request path's future is several times the
        // size of the common path's, and every change's future would carry
        // (and copy) it otherwise.
        Box::pin(
            self.idempotent(&principal, request_id.as_deref(), fingerprint, |tag| {
                self.apply_retrying(id, op, path, change, tag)
            }),
        )
        .await
    }

    /// [`Self::apply`] for one request: validates again when another process
    /// changed the agent in between.
    async fn apply_retrying(
        &self,
        id: AgentId,
        op: Operation,
        path: &[(AgentState, &'static str)],
        change: ChangeRequest,
        request: Option<Arc<RequestTag>>,
    ) -> Result<Outcome> {
        let mut retries = 0;
        let mut synced = false;
        let shared_store = self.shared().store.is_shared();
        loop {
            match self.apply_once(id, op, path, &change, &request).await {
                // Lost to another process's change of the agent, without a
                // version of the caller's to hold on to: validate again.
                Err(Error::Transition(TransitionError::VersionMismatch { .. }))
                    if change.expected_version.is_none() && retries < CONFLICT_RETRIES =>
                {
                    retries += 1;
                    self.catch_up().await?;
                }
                // Refused against this process's table, which may not show
                // another process's latest commits yet: check once more
                // against the store's head before answering.
                Err(
                    Error::AgentNotFound(_)
                    | Error::Transition(
                        TransitionError::NotAllowed { .. }
                        | TransitionError::RequiresState { .. }
                        | TransitionError::VersionMismatch { .. },
                    ),
                ) if shared_store && !synced => {
                    synced = true;
                    self.sync().await?;
                }
                outcome => return outcome,
            }
        }
    }

    async fn apply_once(
        &self,
        id: AgentId,
        op: Operation,
        path: &[(AgentState, &'static str)],
        change: &ChangeRequest,
        request: &Option<Arc<RequestTag>>,
    ) -> Result<Outcome> {
        self.refuse_when_closed()?;
        let writer = {
            let table = self.shared().read_table();
            let slot = table.agents.get(&id).ok_or(Error::AgentNotFound(id))?;
            Arc::clone(&slot.writer)
        };
        // Owned, so that it can travel with the proposal: the commit thread
        // releases it after applying the change, even if this request is
        // cancelled while the proposal waits in the queue.
        let guard = writer.lock_owned().await;
        let agent = self.shared().agent(id).ok_or(Error::AgentNotFound(id))?;
        if let Err(err) = self.validate(&agent, op, path, change.expected_version) {
            // The audit trail of refusals: who tried what on which agent.
            let to = path.last().map(|(to, _)| *to);
            warn!(
                principal = %change.caller,
                triggered_by = %change.triggered_by,
                agent_id = %id,
                from = %agent.state,
                to = to.map(AgentState::as_str).unwrap_or(""),
                reason = %change.reason,
                refusal = %err,
                "refused: transition not allowed"
            );
            return Err(err);
        }
        let triggered_by = if change.triggered_by.is_empty() {
            "system"
        } else {
            change.triggered_by.as_str()
        };
        let steps = path
            .iter()
            .map(|(to, default_reason)| Step {
                to: *to,
                reason: if change.reason.is_empty() {
                    (*default_reason).to_string()
                } else {
                    change.reason.clone()
                },
                triggered_by: triggered_by.to_string(),
                principal: change.caller.principal_name().to_string(),
                request: request.clone(),
                metadata: change.metadata.clone(),
            })
            .collect();
        self.execute(Plan {
            agent_id: id,
            prior: Some(agent),
            identity: None,
            steps,
            guard: Some(guard),
        })
        .await
    }

    /// The one validation of a transition: the caller's expected version,
    /// the operation's required states, and every step against the policy.
    fn validate(
        &self,
        agent: &Agent,
        op: Operation,
        path: &[(AgentState, &'static str)],
        expected_version: Option<u64>,
    ) -> Result<()> {
        if let Some(expected) = expected_version
            && expected != agent.version
        {
            return Err(TransitionError::VersionMismatch {
                agent_id: agent.id,
                expected,
                actual: agent.version,
            }
            .into());
        }
        if !op.requires.is_empty() && !op.requires.contains(&agent.state) {
            return Err(TransitionError::RequiresState {
                agent_id: agent.id,
                operation: op.name,
                state: agent.state,
                required: op.requires.to_vec(),
            }
            .into());
        }
        let mut from = agent.state;
        for (to, _) in path {
            if !self.policy().allows(from, *to) {
                return Err(TransitionError::NotAllowed {
                    agent_id: agent.id,
                    from,
                    to: *to,
                    allowed: self.policy().allowed_targets(from).to_vec(),
                }
                .into());
            }
            from = *to;
        }
        Ok(())
    }

    /// The shared path of every change: pre-transition hooks, commit,
    /// post-transition hooks.
    async fn execute(&self, plan: Plan) -> Result<Outcome> {
        self.run_pre_hooks(&plan).await?;
        let agent_id = plan.agent_id;
        let registering = plan.prior.is_none();
        let expected = plan.prior.as_ref().map_or(0, |a| a.version);
        let proposal = Proposal {
            agent_id,
            prior: plan.prior,
            identity: plan.identity,
            steps: plan.steps,
            guard: plan.guard,
        };
        let committed = match self.propose(proposal).await {
            Ok(committed) => committed,
            Err(Rejected::Conflict { .. }) if registering => {
                // Registered meanwhile (by a request of the same batch, or by
                // another process): answer as for an existing id.
                if self.shared().agent(agent_id).is_none() {
                    self.catch_up().await?;
                }
                let existing = self
                    .shared()
                    .agent(agent_id)
                    .ok_or(Error::AgentNotFound(agent_id))?;
                return existing_registration(existing);
            }
            Err(Rejected::Conflict { actual }) => {
                return Err(TransitionError::VersionMismatch {
                    agent_id,
                    expected,
                    actual,
                }
                .into());
            }
            Err(Rejected::Store(err)) => return Err(Error::Store(err)),
            Err(Rejected::Closed) => return Err(Error::ShuttingDown),
        };
        self.run_post_hooks(&committed).await;
        Ok(Outcome {
            agent: committed.agent,
            transitions: committed.records,
        })
    }

    async fn run_pre_hooks(&self, plan: &Plan) -> Result<()> {
        let pre = self.hooks().select(plan.agent_id, HookPhase::PreTransition);
        if pre.is_empty() {
            return Ok(());
        }
        for ctx in plan.pre_contexts() {
            // Boxed, as below: only changes with hooks pay for their futures.
            if let Some(reason) = Box::pin(self.hooks().run(&pre, &ctx)).await {
                return Err(TransitionError::Vetoed {
                    agent_id: plan.agent_id,
                    from: ctx.from_state,
                    to: ctx.to_state,
                    reason,
                }
                .into());
            }
        }
        Ok(())
    }

    async fn run_post_hooks(&self, committed: &Committed) {
        let Some(first) = committed.records.first() else {
            return;
        };
        let post = self
            .hooks()
            .select(first.agent_id, HookPhase::PostTransition);
        if post.is_empty() {
            return;
        }
        for record in &committed.records {
            let ctx = TransitionContext {
                phase: HookPhase::PostTransition,
                agent_id: record.agent_id,
                from_state: record.from,
                to_state: record.to,
                reason: record.reason.clone(),
                triggered_by: record.triggered_by.clone(),
                metadata: record.metadata.clone(),
                sequence: Some(record.sequence),
                version: Some(record.version),
                timestamp: Some(record.at),
            };
            Box::pin(self.hooks().run(&post, &ctx)).await;
        }
    }

    async fn propose(&self, proposal: Proposal) -> Result<Committed, Rejected> {
        let (tx, mut rx) = oneshot::channel();
        if let Some(writer) = self.inline_writer() {
            // Answered before `commit` returns.
            commit::lock(writer).commit(self.shared(), std::iter::once((proposal, tx)));
            return rx.try_recv().unwrap_or(Err(Rejected::Closed));
        }
        if self.commits().send(Message::Propose(proposal, tx)).is_err() {
            return Err(Rejected::Closed);
        }
        rx.await.unwrap_or(Err(Rejected::Closed))
    }
}

/// Whether `change` carries a request id (`requests::given`).
fn has_request_id(change: &ChangeRequest) -> bool {
    super::requests::given(change.request_id.as_deref()).is_some()
}
