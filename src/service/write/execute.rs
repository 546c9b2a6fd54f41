//! The execution path of a change, from submission to outcome (the steps
//! are numbered in `write`): [`AgentLifecycleService::submit`] ->
//! [`AgentLifecycleService::retry_on_conflict`] ->
//! [`AgentLifecycleService::plan_and_commit`] ->
//! [`AgentLifecycleService::commit_planned`].
//!
//! Knows hooks and the log's proposal interface; the validation itself is
//! `plan`'s, the commit the log's.

use std::sync::Arc;

use tracing::info;

use super::{
    idempotency,
    plan::{Operation, Plan},
};
use crate::{
    domain::{
        Agent, AgentId, AgentState, HookPhase, RequestTag, TransitionContext, TransitionError,
    },
    error::{Error, Result},
    service::{
        AgentLifecycleService, ChangeRequest, Outcome, Registration,
        log::{Committed, Rejected},
    },
    store::AgentIdentity,
};

/// How many times a change that lost to another process's change of the
/// same agent is planned again before it is answered as a conflict.
const CONFLICT_RETRIES: u32 = 8;

/// Whether `change` carries a request id (`idempotency::given`).
fn has_request_id(change: &ChangeRequest) -> bool {
    idempotency::given(change.request_id.as_deref()).is_some()
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
    /// Step 2 for a registration: once per request id, then planned and
    /// committed (a registration has no prior version to conflict with).
    pub(super) async fn submit_registration(&self, registration: Registration) -> Result<Outcome> {
        if !has_request_id(&registration.change) {
            // No retry to recognise: no fingerprint to take.
            return self.register(registration, None).await;
        }
        let fingerprint = idempotency::registration_fingerprint(&registration);
        let principal = registration.change.caller.principal_name().to_string();
        let request_id = registration.change.request_id.clone();
        self.idempotent(&principal, request_id.as_deref(), fingerprint, |tag| {
            self.register(registration, tag)
        })
        .await
    }

    /// Steps 4 and 5 for a registration: an id the table holds is answered
    /// as it stands; otherwise its plan is committed.
    async fn register(
        &self,
        registration: Registration,
        request: Option<Arc<RequestTag>>,
    ) -> Result<Outcome> {
        let agent_id = registration.agent_id.unwrap_or_else(AgentId::generate);
        if let Some(existing) = self.shared().agent(agent_id) {
            return existing_registration(existing);
        }
        let identity = AgentIdentity {
            name: Arc::from(registration.name),
            labels: Arc::new(registration.labels),
        };
        let plan = Plan::registration(agent_id, identity, registration.change, request);
        let outcome = self.commit_planned(plan).await?;
        if let Some(record) = outcome.transitions.first() {
            info!(%agent_id, sequence = record.sequence, "agent registered");
        }
        Ok(outcome)
    }

    /// Step 2: checks the caller's fields, then runs the change once per
    /// request id (see `idempotency`), through
    /// [`Self::retry_on_conflict`].
    pub(super) async fn submit(
        &self,
        id: AgentId,
        op: Operation,
        path: &[(AgentState, &'static str)],
        change: ChangeRequest,
    ) -> Result<Outcome> {
        super::check_change(&change)?;
        if !has_request_id(&change) {
            // No retry to recognise: no fingerprint to take.
            return self.retry_on_conflict(id, op, path, change, None).await;
        }
        let fingerprint = idempotency::transition_fingerprint(op.name, id, path, &change);
        let principal = change.caller.principal_name().to_string();
        let request_id = change.request_id.clone();
        // Boxed: the remembered-request path's future is several times the
        // size of the common path's, and every change's future would carry
        // (and copy) it otherwise.
        Box::pin(
            self.idempotent(&principal, request_id.as_deref(), fingerprint, |tag| {
                self.retry_on_conflict(id, op, path, change, tag)
            }),
        )
        .await
    }

    /// Step 3: [`Self::plan_and_commit`], again when another process changed
    /// the agent in between (a shared store): up to [`CONFLICT_RETRIES`]
    /// times, unless the caller asked for a specific version, which is then
    /// a version mismatch.
    async fn retry_on_conflict(
        &self,
        id: AgentId,
        op: Operation,
        path: &[(AgentState, &'static str)],
        change: ChangeRequest,
        request: Option<Arc<RequestTag>>,
    ) -> Result<Outcome> {
        let mut retries = 0;
        let mut caught_up = false;
        let shared_store = self.shared().store.is_shared();
        loop {
            match self.plan_and_commit(id, op, path, &change, &request).await {
                // Lost to another process's change of the agent, without a
                // version of the caller's to hold on to: plan again.
                Err(Error::Transition(TransitionError::VersionMismatch { .. }))
                    if change.expected_version.is_none() && retries < CONFLICT_RETRIES =>
                {
                    retries += 1;
                    self.log().follow_now().await?;
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
                ) if shared_store && !caught_up => {
                    caught_up = true;
                    self.catch_up_with_store().await?;
                }
                outcome => return outcome,
            }
        }
    }

    /// Step 4: takes the agent's writer lock, plans the change against the
    /// agent as the table holds it, and commits the plan.
    async fn plan_and_commit(
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
        let plan = Plan::transition(self.policy(), agent, op, path, change, request, guard)?;
        self.commit_planned(plan).await
    }

    /// Step 5, the shared path of every change: pre-transition hooks, the
    /// commit, post-transition hooks.
    async fn commit_planned(&self, plan: Plan) -> Result<Outcome> {
        self.run_pre_hooks(&plan).await?;
        let agent_id = plan.agent_id;
        let registering = plan.prior.is_none();
        let expected = plan.prior.as_ref().map_or(0, |a| a.version);
        let committed = match self.log().commit(self.shared(), plan.into_proposal()).await {
            Ok(committed) => committed,
            Err(Rejected::Conflict { .. }) if registering => {
                return self.registered_meanwhile(agent_id).await;
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

    /// A registration the store refused because the id exists: registered
    /// meanwhile (by a request of the same batch, or by another process), so
    /// answered as for an existing id.
    async fn registered_meanwhile(&self, agent_id: AgentId) -> Result<Outcome> {
        if self.shared().agent(agent_id).is_none() {
            self.log().follow_now().await?;
        }
        let existing = self
            .shared()
            .agent(agent_id)
            .ok_or(Error::AgentNotFound(agent_id))?;
        existing_registration(existing)
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
}
