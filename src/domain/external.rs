//! External status sources and what their statuses mean as lifecycle
//! states: Hugging Face Spaces runtime stages, Kubernetes pod phases and
//! container states, Docker container states. Pure tables; the path an
//! agent takes to the mapped state comes from
//! [`TransitionPolicy::path_to`](super::TransitionPolicy::path_to).

use std::{fmt, str::FromStr};

use super::state::AgentState;

/// Where an external status comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExternalSource {
    /// A Hugging Face Space's runtime stage.
    HfSpace,
    /// A Kubernetes pod phase or container state.
    Kubernetes,
    /// A Docker container state.
    Docker,
}

impl ExternalSource {
    /// Every source.
    pub const ALL: [ExternalSource; 3] = [
        ExternalSource::HfSpace,
        ExternalSource::Kubernetes,
        ExternalSource::Docker,
    ];

    /// The name clients use (`hf_space`, `kubernetes`, `docker`).
    pub fn as_str(self) -> &'static str {
        match self {
            ExternalSource::HfSpace => "hf_space",
            ExternalSource::Kubernetes => "kubernetes",
            ExternalSource::Docker => "docker",
        }
    }

    /// The `triggered_by` recorded on the transitions it causes.
    pub fn trigger(self) -> &'static str {
        match self {
            ExternalSource::HfSpace => "hf_sync",
            ExternalSource::Kubernetes => "k8s_sync",
            ExternalSource::Docker => "docker_sync",
        }
    }

    /// The lifecycle state `status` means, matched case-insensitively;
    /// `None` for a status this source's table does not know (or, for
    /// Kubernetes `Unknown`, one that says nothing).
    pub fn target(self, status: &str) -> Option<AgentState> {
        let status = status.trim().to_ascii_lowercase();
        match self {
            ExternalSource::HfSpace => hf_space_target(&status),
            ExternalSource::Kubernetes => kubernetes_target(&status),
            ExternalSource::Docker => docker_target(&status),
        }
    }
}

impl fmt::Display for ExternalSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExternalSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hf_space" | "hf" | "huggingface" => Ok(ExternalSource::HfSpace),
            "kubernetes" | "k8s" => Ok(ExternalSource::Kubernetes),
            "docker" => Ok(ExternalSource::Docker),
            other => Err(format!(
                "unknown source {}: expected hf_space, kubernetes or docker",
                super::limits::quoted(other)
            )),
        }
    }
}

/// Hugging Face Spaces runtime stages (and the seed's lowercase keys:
/// `building`, `running`, `sleeping`, `paused`, `stopped`, and `error`
/// meaning RUNTIME_ERROR). `DELETED` stands for the API's 404.
fn hf_space_target(stage: &str) -> Option<AgentState> {
    use AgentState::*;
    Some(match stage {
        "building" => Deploying,
        "app_starting" => Starting,
        "running" => Online,
        "running_building" | "running_app_starting" => Updating,
        "runtime_error" | "error" => Error,
        "build_error" | "config_error" | "no_app_file" => Failed,
        "paused" => Suspended,
        "stopped" => Offline,
        "sleeping" => Idle,
        "deleting" => Terminated,
        "deleted" | "404" | "not_found" => Deleted,
        _ => return None,
    })
}

/// Kubernetes pod phases and container states, and `NoPods`, the
/// driver's word for a workload whose last pod is gone.
///
/// Beyond the first rows: a pod whose containers run but have not passed
/// their readiness probe yet (`ContainersNotReady`) or run their init
/// containers (`PodInitializing`) is still starting; a container that
/// ended in error (`Error`, `OOMKilled`), or an image pull that failed
/// once (`ErrImagePull`, which the kubelet tries again) is an ERROR the
/// agent may recover from; an image the kubelet has given up pulling for
/// now (`ImagePullBackOff`), an invalid image name or a container whose
/// configuration names a missing secret or config map
/// (`CreateContainerConfigError`) needs the spec fixed: FAILED (ERROR ->
/// FAILED is an edge, so `ErrImagePull` then `ImagePullBackOff` walks
/// there); a container that exited 0 (`Completed`) and a workload with no
/// pods left (`NoPods`, scaled to 0 or deleted) are OFFLINE.
fn kubernetes_target(status: &str) -> Option<AgentState> {
    use AgentState::*;
    Some(match status {
        "pending" => Deploying,
        "containercreating" => Starting,
        "running" | "ready" => Online,
        "notready" => Error,
        "crashloopbackoff" => Error,
        "succeeded" => Offline,
        "failed" => Failed,
        "terminating" => Stopping,
        "podinitializing" | "containersnotready" => Starting,
        "error" | "oomkilled" | "errimagepull" | "createcontainererror" => Error,
        "imagepullbackoff" | "invalidimagename" | "createcontainerconfigerror" => Failed,
        "completed" | "nopods" => Offline,
        _ => return None,
    })
}

/// Docker container states, and the events of a container that failed
/// while it should run (`die` with an exit code not 0, `oom`, `destroy`,
/// `unhealthy`), as the Docker driver reports them.
fn docker_target(status: &str) -> Option<AgentState> {
    use AgentState::*;
    Some(match status {
        "die" | "oom" | "destroy" | "unhealthy" => Error,
        "created" => Deployed,
        "restarting" => Starting,
        "running" => Online,
        "paused" => Suspended,
        "exited" => Offline,
        "dead" => Failed,
        "removing" => Terminated,
        _ => return None,
    })
}

/// Whether a status of `source` keeps an agent where it is although the
/// table maps it elsewhere: a Space that is RUNNING keeps a BUSY or IDLE
/// agent in that state (they are running too).
///
/// Kubernetes statuses also move an agent forward only along its bring-up
/// and wind-down: a pod that is scheduled (Pending: DEPLOYING) leaves an
/// agent that is DEPLOYED, STARTING, ONLINE, BUSY or IDLE where it is (a
/// pod made by a scale-up or rescheduled, not a new deploy); a pod that is
/// starting (STARTING) leaves an ONLINE, BUSY or IDLE agent; a ready pod
/// (ONLINE) leaves a BUSY or IDLE agent; pods that are terminating
/// (STOPPING) leave an agent that is already OFFLINE or TERMINATED. Without
/// these, the shortest path would walk such an agent through FAILED or
/// OFFLINE to get back to the earlier state.
pub fn satisfied_by(source: ExternalSource, target: AgentState, current: AgentState) -> bool {
    use AgentState as S;
    let running = matches!(current, S::Busy | S::Idle);
    match source {
        ExternalSource::HfSpace => target == S::Online && running,
        ExternalSource::Kubernetes => match target {
            S::Deploying => matches!(current, S::Deployed | S::Starting | S::Online) || running,
            S::Starting => current == S::Online || running,
            S::Online => running,
            S::Stopping => matches!(current, S::Offline | S::Terminated),
            _ => false,
        },
        ExternalSource::Docker => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AgentState::*;

    /// Every row of the mapping tables of the design, case-insensitively.
    #[test]
    fn every_documented_status_maps() {
        let hf = [
            ("BUILDING", Deploying),
            ("APP_STARTING", Starting),
            ("RUNNING", Online),
            ("RUNNING_BUILDING", Updating),
            ("RUNNING_APP_STARTING", Updating),
            ("RUNTIME_ERROR", Error),
            ("BUILD_ERROR", Failed),
            ("CONFIG_ERROR", Failed),
            ("NO_APP_FILE", Failed),
            ("PAUSED", Suspended),
            ("STOPPED", Offline),
            ("SLEEPING", Idle),
            ("DELETING", Terminated),
            ("building", Deploying),
            ("running", Online),
            ("sleeping", Idle),
            ("paused", Suspended),
            ("stopped", Offline),
            ("error", Error),
        ];
        for (status, state) in hf {
            assert_eq!(
                ExternalSource::HfSpace.target(status),
                Some(state),
                "{status}"
            );
        }
        let k8s = [
            ("Pending", Deploying),
            ("ContainerCreating", Starting),
            ("Running", Online),
            ("NotReady", Error),
            ("CrashLoopBackOff", Error),
            ("Succeeded", Offline),
            ("Failed", Failed),
            ("Terminating", Stopping),
            ("PodInitializing", Starting),
            ("ContainersNotReady", Starting),
            ("Error", Error),
            ("OOMKilled", Error),
            ("ErrImagePull", Error),
            ("CreateContainerError", Error),
            ("ImagePullBackOff", Failed),
            ("InvalidImageName", Failed),
            ("CreateContainerConfigError", Failed),
            ("Completed", Offline),
            ("NoPods", Offline),
        ];
        for (status, state) in k8s {
            assert_eq!(
                ExternalSource::Kubernetes.target(status),
                Some(state),
                "{status}"
            );
        }
        assert_eq!(ExternalSource::Kubernetes.target("Unknown"), None);
        let docker = [
            ("created", Deployed),
            ("restarting", Starting),
            ("running", Online),
            ("paused", Suspended),
            ("exited", Offline),
            ("dead", Failed),
            ("removing", Terminated),
        ];
        let failures = [
            ("die", Error),
            ("oom", Error),
            ("destroy", Error),
            ("unhealthy", Error),
        ];
        for (status, state) in docker.into_iter().chain(failures) {
            assert_eq!(
                ExternalSource::Docker.target(status),
                Some(state),
                "{status}"
            );
        }
        for source in ExternalSource::ALL {
            assert_eq!(source.target("SOMETHING_NEW"), None);
            assert_eq!(source.as_str().parse::<ExternalSource>(), Ok(source));
        }
    }

    /// Kubernetes statuses move an agent forward only: a pending or
    /// starting pod does not send a starting or online agent back.
    #[test]
    fn kubernetes_statuses_do_not_move_an_agent_back() {
        let k8s = ExternalSource::Kubernetes;
        for current in [Deployed, Starting, Online, Busy, Idle] {
            assert!(satisfied_by(k8s, Deploying, current), "{current}");
        }
        for current in [Online, Busy, Idle] {
            assert!(satisfied_by(k8s, Starting, current), "{current}");
        }
        assert!(!satisfied_by(k8s, Starting, Deployed));
        assert!(!satisfied_by(k8s, Deploying, Registered));
        assert!(satisfied_by(k8s, Online, Busy));
        assert!(!satisfied_by(k8s, Online, Starting));
        assert!(satisfied_by(k8s, Stopping, Offline));
        assert!(!satisfied_by(k8s, Stopping, Online));
        assert!(!satisfied_by(k8s, Error, Online));
        assert!(!satisfied_by(ExternalSource::Docker, Online, Busy));
        assert!(satisfied_by(ExternalSource::HfSpace, Online, Idle));
    }
}
