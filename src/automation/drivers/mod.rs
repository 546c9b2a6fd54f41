//! Platform drivers: the platform follows the lifecycle of the agents bound
//! to it ([`Binding`], read from an agent's labels).
//!
//! A [`Driver`] makes one platform act. [`run`] follows the event log for it:
//! when a bound agent enters DEPLOYING, STARTING, STOPPING, TERMINATED or
//! DELETED ([`PlatformAction::on_entering`]), the driver makes the platform
//! create, start, stop or remove the object. The runner
//!
//! - acts only while this process holds the driver's lease, so one process
//!   of a fleet on a shared store acts, and another takes over after a
//!   failover;
//! - keeps its place in the log in a durable cursor of the same name (the
//!   first sequence not yet handled; 0 when the driver never ran), advanced
//!   after each event is handled, so a restart or a failover resumes after
//!   the last event handled; a driver that never ran starts at the head:
//!   history is not replayed;
//! - retries a transient platform failure with a doubling back-off
//!   (`agent_lifecycle_driver_retries_total`), counts every action by
//!   outcome (`agent_lifecycle_driver_actions_total`), and
//!   moves the agent to ERROR when the platform refuses, with the
//!   platform's message in the reason and its code in the metadata, unless
//!   the agent has moved on meanwhile (the transition expects the version
//!   the event left).
//!
//! Before acting, the runner reads the platform ([`Driver::settled`]): an
//! action whose outcome is unknown (the process died between the action
//! and the cursor's advance, or the platform's answer was lost) is settled
//! by what the platform shows, not by acting twice blindly. Every action is
//! also harmless to repeat at the platform (starting a running container
//! is a no-op), for the case where reading the platform fails.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    AgentLifecycleService,
    domain::{Agent, AgentState, Binding, Caller, Metadata, PlatformAction},
    error::{Error, Result},
    service::{ChangeRequest, LeaseHolder, PublishedEvent, WatchItem, lease_holder},
};

/// What [`Driver::act`] returns.
pub type ActFuture<'a> = Pin<Box<dyn Future<Output = Result<(), PlatformError>> + Send + 'a>>;

/// What [`Driver::settled`] returns.
pub type SettleFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, PlatformError>> + Send + 'a>>;

/// The agent a driver acts for, and the platform object it is bound to.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The agent right after the event (its labels carry the object's
    /// spec, such as `docker.image`).
    pub agent: &'a Agent,
    /// When the event was recorded: a restart is settled when the object
    /// started after it.
    pub at: std::time::SystemTime,
    /// The object, read from the agent's labels.
    pub binding: &'a Binding,
}

/// One platform's side of the lifecycle.
pub trait Driver: Send + Sync + 'static {
    /// The name of its lease and of its cursor, also its `triggered_by`
    /// (`docker-driver`).
    fn name(&self) -> &'static str;

    /// Whether the binding is on this driver's platform.
    fn binds(&self, binding: &Binding) -> bool;

    /// Whether the platform already shows what `action` would leave (the
    /// container runs, the workload is scaled to 0), read from the
    /// platform: the runner then records the action as settled instead of
    /// doing it again.
    fn settled<'a>(&'a self, target: Target<'a>, action: PlatformAction) -> SettleFuture<'a>;

    /// Makes the platform do `action` to the object `target` names.
    /// Acting twice must be harmless (a restart may repeat the last action).
    fn act<'a>(&'a self, target: Target<'a>, action: PlatformAction) -> ActFuture<'a>;
}

/// Why a platform did not do what it was asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    /// It may work on a later try (the platform is unreachable, busy, or
    /// answered with a server error).
    #[error("{0}")]
    Transient(String),
    /// The platform refused (no such image, invalid spec, ...); trying again
    /// will not help.
    #[error("{message} ({code})")]
    Refused {
        /// The platform's own message.
        message: String,
        /// The platform's own code (an HTTP status, an error reason).
        code: String,
    },
}

/// How the runner retries.
#[derive(Clone, Debug, PartialEq)]
pub struct DriverSettings {
    /// The first back-off after a transient failure.
    pub initial_backoff: Duration,
    /// The longest back-off.
    pub max_backoff: Duration,
    /// Tries of one action before a transient failure counts as a refusal.
    pub max_attempts: u32,
    /// How long to wait before asking for the lease again.
    pub lease_retry: Duration,
}

impl Default for DriverSettings {
    fn default() -> Self {
        DriverSettings {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_attempts: 8,
            lease_retry: Duration::from_secs(1),
        }
    }
}

/// Follows the event log for `driver` until the service shuts down.
///
/// A driver that never ran starts after the head as of this call (not of
/// the returned future's first poll), so nothing committed after the call
/// escapes it.
pub fn run(
    service: AgentLifecycleService,
    driver: Arc<dyn Driver>,
    settings: DriverSettings,
) -> impl Future<Output = ()> + Send {
    let first_head = service.head_sequence();
    async move {
        let name = driver.name();
        let mut lease = lease_holder(&service, name);
        info!(driver = name, "platform driver started");
        while !service.is_shutting_down() {
            if !lease.held().await {
                tokio::time::sleep(settings.lease_retry).await;
                continue;
            }
            match follow(&service, driver.as_ref(), &settings, &mut lease, first_head).await {
                Ok(Followed::End) | Err(Error::ShuttingDown) => return,
                Ok(Followed::LeaseLost) => {
                    warn!(
                        driver = name,
                        "the driver's lease was lost; it stops acting until it holds it again"
                    );
                }
                Err(err) => {
                    warn!(driver = name, error = %crate::error::chain(&err), "the driver's log stream ended; resuming from its cursor");
                    tokio::time::sleep(settings.lease_retry).await;
                }
            }
        }
    }
}

/// How following the log ended.
enum Followed {
    /// The stream ended (the service is shutting down).
    End,
    /// Another process may hold the lease now: this one must not act.
    LeaseLost,
}

/// Handles the events after the driver's cursor, then live ones, until
/// the stream ends or the lease is lost. The lease is checked before every
/// action, so after a failover only the new holder acts.
async fn follow(
    service: &AgentLifecycleService,
    driver: &dyn Driver,
    settings: &DriverSettings,
    lease: &mut LeaseHolder,
    first_head: u64,
) -> Result<Followed> {
    let name = driver.name();
    // A driver that never ran starts at the head: the platform is not
    // replayed the fleet's history.
    let (mut watcher, _) = service.watch_from_cursor(name, first_head).await?;
    while let Some(item) = watcher.next().await {
        let WatchItem::Event(event) = item? else {
            continue;
        };
        if let Some((binding, action)) = acts_on(driver, &event) {
            if !lease.held().await {
                return Ok(Followed::LeaseLost);
            }
            handle(service, driver, settings, &event, &binding, action).await?;
        }
        service.advance_cursor(name, event.sequence() + 1).await?;
    }
    Ok(Followed::End)
}

/// The binding and action that `event` asks of `driver`, if any.
fn acts_on(driver: &dyn Driver, event: &PublishedEvent) -> Option<(Binding, PlatformAction)> {
    let binding = Binding::of(&event.agent.labels).ok()??;
    let restart = event.record.triggered_by == crate::automation::health::TRIGGER;
    let action = PlatformAction::for_move(event.record.to, restart)?;
    driver.binds(&binding).then_some((binding, action))
}

/// Makes the platform do `action` to `binding` for one event, and records
/// a refusal.
async fn handle(
    service: &AgentLifecycleService,
    driver: &dyn Driver,
    settings: &DriverSettings,
    event: &PublishedEvent,
    binding: &Binding,
    action: PlatformAction,
) -> Result<()> {
    let target = Target {
        agent: &event.agent,
        binding,
        at: event.record.at,
    };
    match driver.settled(target, action).await {
        Ok(true) => {
            info!(driver = driver.name(), agent_id = %event.agent.id, %binding, action = action.as_str(), "the platform already shows the action done");
            service
                .metrics()
                .driver_action(driver.name(), action.as_str(), "settled");
            return Ok(());
        }
        Ok(false) => {}
        // Acting is harmless to repeat: act.
        Err(err) => {
            warn!(driver = driver.name(), %binding, action = action.as_str(), error = %err, "cannot read the platform before acting");
        }
    }
    let outcome = attempt(service, driver, settings, target, action).await;
    let metrics = service.metrics();
    metrics.driver_action(
        driver.name(),
        action.as_str(),
        if outcome.is_ok() { "done" } else { "refused" },
    );
    let refused = match outcome {
        Ok(()) => {
            info!(driver = driver.name(), agent_id = %event.agent.id, %binding, action = action.as_str(), "platform acted");
            return Ok(());
        }
        Err(refused) => refused,
    };
    warn!(driver = driver.name(), agent_id = %event.agent.id, %binding, action = action.as_str(), error = %refused, "platform refused");
    record_refusal(service, driver.name(), event, action, &refused).await
}

/// Tries `action` until it succeeds, is refused, or its tries run out.
async fn attempt(
    service: &AgentLifecycleService,
    driver: &dyn Driver,
    settings: &DriverSettings,
    target: Target<'_>,
    action: PlatformAction,
) -> Result<(), PlatformError> {
    let binding = target.binding;
    let mut backoff = settings.initial_backoff;
    let mut tries = 0;
    loop {
        tries += 1;
        match driver.act(target, action).await {
            Ok(()) => return Ok(()),
            Err(PlatformError::Transient(message)) if tries < settings.max_attempts => {
                warn!(driver = driver.name(), %binding, action = action.as_str(), error = %message, tries, "platform failed; retrying");
                service.metrics().driver_retry(driver.name());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(settings.max_backoff);
            }
            Err(PlatformError::Transient(message)) => {
                return Err(PlatformError::Refused {
                    message: format!("{message} (after {tries} tries)"),
                    code: "UNAVAILABLE".into(),
                });
            }
            Err(refused) => return Err(refused),
        }
    }
}

/// Moves the agent to ERROR with the platform's answer, when the agent is
/// still as the event left it and the policy allows it.
async fn record_refusal(
    service: &AgentLifecycleService,
    name: &'static str,
    event: &PublishedEvent,
    action: PlatformAction,
    refused: &PlatformError,
) -> Result<()> {
    let (message, code) = match refused {
        PlatformError::Refused { message, code } => (message.clone(), code.clone()),
        PlatformError::Transient(message) => (message.clone(), "UNAVAILABLE".into()),
    };
    if !service.policy().allows(event.record.to, AgentState::Error) {
        return Ok(());
    }
    let mut metadata = Metadata::new();
    metadata.insert("driver".into(), name.into());
    metadata.insert("action".into(), action.as_str().into());
    metadata.insert("platform_code".into(), code.into());
    let change = ChangeRequest {
        reason: format!("{name}: {} failed: {message}", action.as_str()),
        triggered_by: name.to_string(),
        metadata,
        expected_version: Some(event.record.version),
        caller: Caller::principal(name),
        request_id: None,
    };
    match service
        .transition(event.agent.id, AgentState::Error, change)
        .await
    {
        Ok(_) => Ok(()),
        // The agent moved on meanwhile: the newer state wins.
        Err(Error::Transition(_)) => Ok(()),
        Err(err) => Err(err),
    }
}

pub mod docker;
pub mod hf;
pub mod k8s;

#[cfg(test)]
mod tests;
