//! What a container shows, as a status of the Docker table
//! ([`ExternalSource::Docker`](crate::domain::ExternalSource)), given what
//! the server expects of it. Pure.
//!
//! The agent's state says whether its container should run. A container
//! that stops while it should run has failed: `die` (exit code not 0),
//! `oom` (killed for memory), `destroy` (removed), each mapping to ERROR,
//! or `exited` (code 0: the agent finished) mapping to OFFLINE. A container
//! that stops because the server stopped it says nothing new. A running
//! container moves an agent that waits for it (STARTING), or one that
//! failed or was paused, to ONLINE; a container started outside while the
//! agent is stopped is left to the operator (the server does not undo it).

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};

use crate::domain::{AgentState, Metadata};

/// A container as inspected; `None` when it does not exist.
pub type Inspected = Option<ContainerInspectResponse>;

/// A status to report for an agent, with what explains it.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// A status of the Docker table.
    pub status: &'static str,
    /// The reason to record.
    pub reason: String,
    /// Recorded with the transition: `container`, and `exit_code`,
    /// `oom_killed`, `error` where Docker gives them.
    pub metadata: Metadata,
}

/// Whether an agent in `state` should have its container running.
pub fn should_run(state: AgentState) -> bool {
    use AgentState as S;
    matches!(
        state,
        S::Starting | S::Online | S::Busy | S::Idle | S::Updating | S::Scaling
    )
}

/// What to report for the agent in `state` whose container `name` shows
/// `container`; `None` when the container says nothing new.
pub fn observe(name: &str, container: &Inspected, state: AgentState) -> Option<Observation> {
    let mut metadata = Metadata::new();
    metadata.insert("container".into(), name.into());
    let Some(container) = container else {
        return should_run(state).then(|| Observation {
            status: "destroy",
            reason: format!("docker: container {name} does not exist"),
            metadata,
        });
    };
    let Some(docker) = &container.state else {
        return None;
    };
    let unhealthy = docker
        .health
        .as_ref()
        .and_then(|h| h.status)
        .is_some_and(|s| s == HealthStatusEnum::UNHEALTHY);
    let status = docker.status.unwrap_or(ContainerStateStatusEnum::EMPTY);
    use ContainerStateStatusEnum as C;
    match status {
        C::RUNNING if unhealthy => should_run(state).then(|| Observation {
            status: "unhealthy",
            reason: format!("docker: container {name} is unhealthy"),
            metadata,
        }),
        C::RUNNING => {
            let waits = should_run(state)
                || matches!(
                    state,
                    AgentState::Error | AgentState::Timeout | AgentState::Suspended
                );
            waits.then(|| Observation {
                status: "running",
                reason: format!("docker: container {name} is running"),
                metadata,
            })
        }
        C::PAUSED => should_run(state).then(|| Observation {
            status: "paused",
            reason: format!("docker: container {name} is paused"),
            metadata,
        }),
        C::EXITED | C::DEAD if should_run(state) => {
            let code = docker.exit_code.unwrap_or_default();
            let oom = docker.oom_killed == Some(true);
            metadata.insert("exit_code".into(), code.into());
            metadata.insert("oom_killed".into(), oom.into());
            let error = docker.error.as_deref().filter(|e| !e.is_empty());
            if let Some(error) = error {
                metadata.insert("error".into(), error.into());
            }
            let (status, what) = if status == C::DEAD {
                ("dead", format!("is dead (exit code {code})"))
            } else if oom {
                (
                    "oom",
                    format!("was killed for memory (OOM, exit code {code})"),
                )
            } else if code != 0 {
                ("die", format!("exited with code {code}"))
            } else {
                ("exited", "exited with code 0".to_string())
            };
            let reason = match error {
                Some(error) => format!("docker: container {name} {what}: {error}"),
                None => format!("docker: container {name} {what}"),
            };
            Some(Observation {
                status,
                reason,
                metadata,
            })
        }
        C::RESTARTING if should_run(state) && state != AgentState::Starting => Some(Observation {
            status: "restarting",
            reason: format!("docker: container {name} is restarting"),
            metadata,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::{ContainerState, Health};

    use super::*;

    fn container(status: ContainerStateStatusEnum, exit_code: i64, oom: bool) -> Inspected {
        Some(ContainerInspectResponse {
            state: Some(ContainerState {
                status: Some(status),
                exit_code: Some(exit_code),
                oom_killed: Some(oom),
                ..ContainerState::default()
            }),
            ..ContainerInspectResponse::default()
        })
    }

    fn status(container: &Inspected, state: AgentState) -> Option<&'static str> {
        observe("c1", container, state).map(|o| o.status)
    }

    #[test]
    fn a_container_that_stops_while_it_should_run_has_failed() {
        use ContainerStateStatusEnum as C;
        let killed = container(C::EXITED, 137, false);
        let observed = observe("c1", &killed, AgentState::Online).expect("reported");
        assert_eq!(observed.status, "die");
        assert_eq!(observed.reason, "docker: container c1 exited with code 137");
        assert_eq!(observed.metadata["exit_code"], 137);
        assert_eq!(
            status(&container(C::EXITED, 137, true), AgentState::Busy),
            Some("oom")
        );
        assert_eq!(
            status(&container(C::EXITED, 0, false), AgentState::Online),
            Some("exited")
        );
        assert_eq!(status(&None, AgentState::Online), Some("destroy"));
        assert_eq!(
            status(&container(C::DEAD, 1, false), AgentState::Idle),
            Some("dead")
        );
    }

    #[test]
    fn a_container_the_server_stopped_says_nothing_new() {
        use ContainerStateStatusEnum as C;
        for state in [
            AgentState::Stopping,
            AgentState::Offline,
            AgentState::Terminated,
            AgentState::Deleted,
            AgentState::Deployed,
        ] {
            assert_eq!(status(&container(C::EXITED, 137, false), state), None);
            assert_eq!(status(&None, state), None);
            assert_eq!(status(&container(C::RUNNING, 0, false), state), None);
        }
    }

    #[test]
    fn running_completes_a_start_and_recovers_a_failure() {
        use ContainerStateStatusEnum as C;
        let running = container(C::RUNNING, 0, false);
        for state in [
            AgentState::Starting,
            AgentState::Online,
            AgentState::Error,
            AgentState::Timeout,
            AgentState::Suspended,
        ] {
            assert_eq!(status(&running, state), Some("running"), "{state}");
        }
        let mut unhealthy = running.clone();
        if let Some(c) = unhealthy.as_mut().and_then(|c| c.state.as_mut()) {
            c.health = Some(Health {
                status: Some(HealthStatusEnum::UNHEALTHY),
                ..Health::default()
            });
        }
        assert_eq!(status(&unhealthy, AgentState::Online), Some("unhealthy"));
        assert_eq!(
            status(&container(C::PAUSED, 0, false), AgentState::Online),
            Some("paused")
        );
    }
}
