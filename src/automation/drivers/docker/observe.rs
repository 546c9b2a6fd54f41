//! Following containers: the agent follows what its container does.
//!
//! One process of a fleet follows (the holder of the `docker-observer`
//! lease). It inspects every bound agent's container, then follows the
//! daemon's container events from just before that inspection, so nothing
//! that happens in between escapes it. On `start`, `die`, `oom`,
//! `health_status`, `pause`, `unpause` and `destroy` it inspects the
//! container again and reports what it shows ([`status::observe`]) through
//! the same path as SyncExternalStatus, with `triggered_by =
//! docker-driver`. When the stream breaks (the daemon restarted), it
//! starts over with a new inspection after a back-off: what changed while
//! the daemon was away is read from the containers themselves.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bollard::query_parameters::EventsOptions;
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use super::{DOCKER_DRIVER, DockerDriver, status};
use crate::{
    AgentLifecycleService,
    automation::sync::{StatusReport, SyncOutcome, sync_external_status},
    domain::{AgentId, Binding, Caller, ExternalSource},
    service::{LeaseHolder, lease_holder},
};

/// The lease of the process that follows the containers.
pub const DOCKER_OBSERVER: &str = "docker-observer";

/// The container events that may change what an agent should be.
const FOLLOWED: [&str; 7] = [
    "start",
    "die",
    "oom",
    "health_status",
    "pause",
    "unpause",
    "destroy",
];

/// The longest wait before following the events again.
const MAX_RECONNECT: Duration = Duration::from_secs(10);

/// Follows the containers of bound agents until the service shuts down.
pub async fn observe(service: AgentLifecycleService, driver: Arc<DockerDriver>) {
    let mut lease = lease_holder(&service, DOCKER_OBSERVER);
    let mut backoff = driver.settings().reconnect;
    while !service.is_shutting_down() {
        if !lease.held().await {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = service.shutting_down() => return,
            }
            continue;
        }
        let followed = tokio::select! {
            followed = follow(&service, &driver, &mut lease) => followed,
            () = service.shutting_down() => return,
        };
        match followed {
            Ok(Followed::Events) => backoff = driver.settings().reconnect,
            Ok(Followed::LeaseLost) => continue,
            Err(why) => {
                warn!(error = %why, retry_in = ?backoff, "cannot follow Docker; trying again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = service.shutting_down() => return,
        }
        backoff = (backoff * 2).min(MAX_RECONNECT);
    }
}

/// How following the events ended.
enum Followed {
    /// The stream ended after delivering events (the daemon went away).
    Events,
    /// Another process may follow now.
    LeaseLost,
}

/// Inspects every bound container, then follows the events.
async fn follow(
    service: &AgentLifecycleService,
    driver: &DockerDriver,
    lease: &mut LeaseHolder,
) -> Result<Followed, String> {
    // Events from a second before the inspection: the daemon replays them,
    // so a change between the inspection and the stream's start is seen.
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().saturating_sub(1));
    driver
        .client()
        .ping()
        .await
        .map_err(|e| format!("Docker does not answer: {e}"))?;
    let containers = bound(service);
    info!(containers = containers.len(), "following Docker");
    for (name, ids) in &containers {
        for id in ids {
            apply(service, driver, *id, name).await?;
        }
    }
    let options = EventsOptions {
        since: Some(since.to_string()),
        until: None,
        filters: Some(HashMap::from([(
            "type".to_string(),
            vec!["container".to_string()],
        )])),
    };
    let mut events = driver.client().events(Some(options));
    let mut delivered = false;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| format!("Docker's event stream broke: {e}"))?;
        delivered = true;
        let action = event.action.as_deref().unwrap_or_default();
        // `health_status: healthy`, `exec_start: sh`: the verb before ':'.
        let verb = action.split(':').next().unwrap_or_default().trim();
        if !FOLLOWED.contains(&verb) {
            continue;
        }
        let Some(name) = event
            .actor
            .as_ref()
            .and_then(|a| a.attributes.as_ref())
            .and_then(|a| a.get("name"))
        else {
            continue;
        };
        debug!(container = %name, action, "Docker event");
        if !lease.held().await {
            return Ok(Followed::LeaseLost);
        }
        for id in bound(service).remove(name.as_str()).unwrap_or_default() {
            apply(service, driver, id, name).await?;
        }
    }
    if delivered {
        Ok(Followed::Events)
    } else {
        Err("Docker's event stream ended".to_string())
    }
}

/// Inspects container `name` and reports what it shows for agent `id`.
/// Only a failure to reach Docker is an error (the caller starts over).
async fn apply(
    service: &AgentLifecycleService,
    driver: &DockerDriver,
    id: AgentId,
    name: &str,
) -> Result<(), String> {
    let container = driver.inspect(name).await.map_err(|e| e.to_string())?;
    let Ok(agent) = service.get_agent(id) else {
        return Ok(());
    };
    let Some(observed) = status::observe(name, &container, agent.state) else {
        return Ok(());
    };
    let report = StatusReport {
        status: observed.status.to_string(),
        metadata: observed.metadata,
        caller: Caller::principal(DOCKER_DRIVER),
        triggered_by: Some(DOCKER_DRIVER.to_string()),
        reason: Some(observed.reason),
    };
    match sync_external_status(service, id, ExternalSource::Docker, report).await {
        Ok(result) if result.outcome == SyncOutcome::Applied => {
            info!(container = name, agent_id = %id, status = observed.status, to = ?result.target, "agent follows its container");
        }
        Ok(result) => {
            debug!(container = name, agent_id = %id, status = observed.status, outcome = ?result.outcome, "container observed");
        }
        Err(err) => {
            warn!(container = name, agent_id = %id, error = %err, "applying a container's status failed");
        }
    }
    Ok(())
}

/// The agents bound to containers, by container name.
fn bound(service: &AgentLifecycleService) -> HashMap<String, Vec<AgentId>> {
    let mut bound: HashMap<String, Vec<AgentId>> = HashMap::new();
    for info in service.get_all_agent_statuses().into_values() {
        if let Ok(Some(Binding::Docker { container })) = Binding::of(&info.agent.labels) {
            bound.entry(container).or_default().push(info.agent.id);
        }
    }
    bound
}
