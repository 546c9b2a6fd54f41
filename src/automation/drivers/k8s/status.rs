//! What a pod says, as a status of the Kubernetes table
//! ([`ExternalSource::Kubernetes`](crate::domain::ExternalSource)): pure
//! functions from a [`Pod`] (its phase, conditions and container states)
//! to a [`PodStatus`], and from the pods of one workload to the one status
//! its agent follows.
//!
//! One pod, in this order:
//!
//! 1. being deleted (`metadata.deletionTimestamp`): `Terminating`;
//! 2. phase `Succeeded` or `Failed`: that phase (with the pod's `reason`,
//!    e.g. `Evicted`);
//! 3. phase `Running` with the `Ready` condition true: `Ready`;
//! 4. the most telling container state (init containers included): a
//!    waiting reason (`CrashLoopBackOff`, `ImagePullBackOff`,
//!    `ErrImagePull`, `InvalidImageName`, `CreateContainerConfigError`,
//!    `CreateContainerError`, `ContainerCreating`, `PodInitializing`), a
//!    termination (`OOMKilled`; `Error` for another non-zero exit;
//!    `Completed` for an app container that exited 0); a crash loop whose
//!    last termination was `OOMKilled` is `OOMKilled`;
//! 5. otherwise, phase `Running`: `NotReady` when the pod was ready before,
//!    `ContainersNotReady` when it never was; phase `Pending`: `Pending`
//!    (with the `PodScheduled` condition's reason, e.g. `Unschedulable`);
//!    phase `Unknown`: nothing (the table maps `Unknown` to nothing).
//!
//! The pods of one workload: any `Ready` pod makes the workload `Ready`
//! (the agent serves while one pod does); otherwise the most telling status
//! of the pods that are not terminating, in the order of [`PodState`]
//! (spec errors first, then crashes, then the stages of a start); pods that
//! are all terminating make it `Terminating`; no pods at all, `NoPods`.

use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Pod};

/// A pod's status, in the order in which one pod's status wins over
/// another's for the workload (last wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PodState {
    /// Phase Succeeded: every container exited 0 and will not restart.
    Succeeded,
    /// An app container exited 0.
    Completed,
    /// Accepted, not yet running (not scheduled, or pulling images).
    Pending,
    /// The kubelet creates the containers.
    ContainerCreating,
    /// Init containers run.
    PodInitializing,
    /// Running, readiness not yet passed (it never has).
    ContainersNotReady,
    /// Running, and no longer ready (a readiness probe fails).
    NotReady,
    /// Phase Failed (evicted, or containers failed and will not restart).
    Failed,
    /// A container exited non-zero.
    Error,
    /// A container keeps crashing; the kubelet backs off restarting it.
    CrashLoopBackOff,
    /// A container was killed for exceeding its memory limit.
    OomKilled,
    /// The runtime could not create a container.
    CreateContainerError,
    /// Pulling an image failed (the kubelet tries again).
    ErrImagePull,
    /// A container's configuration names a missing secret or config map.
    CreateContainerConfigError,
    /// The image name is not valid.
    InvalidImageName,
    /// The kubelet gave up pulling the image for now.
    ImagePullBackOff,
    /// Running and ready: serving.
    Ready,
}

impl PodState {
    /// The status as the Kubernetes table knows it.
    pub fn as_str(self) -> &'static str {
        match self {
            PodState::Succeeded => "Succeeded",
            PodState::Completed => "Completed",
            PodState::Pending => "Pending",
            PodState::ContainerCreating => "ContainerCreating",
            PodState::PodInitializing => "PodInitializing",
            PodState::ContainersNotReady => "ContainersNotReady",
            PodState::NotReady => "NotReady",
            PodState::Failed => "Failed",
            PodState::Error => "Error",
            PodState::CrashLoopBackOff => "CrashLoopBackOff",
            PodState::OomKilled => "OOMKilled",
            PodState::CreateContainerError => "CreateContainerError",
            PodState::ErrImagePull => "ErrImagePull",
            PodState::CreateContainerConfigError => "CreateContainerConfigError",
            PodState::InvalidImageName => "InvalidImageName",
            PodState::ImagePullBackOff => "ImagePullBackOff",
            PodState::Ready => "Ready",
        }
    }

    /// A container's waiting reason as a state, for the reasons that tell
    /// something.
    fn waiting(reason: &str) -> Option<PodState> {
        Some(match reason {
            "CrashLoopBackOff" => PodState::CrashLoopBackOff,
            "ImagePullBackOff" => PodState::ImagePullBackOff,
            "ErrImagePull" => PodState::ErrImagePull,
            "InvalidImageName" => PodState::InvalidImageName,
            "CreateContainerConfigError" => PodState::CreateContainerConfigError,
            "CreateContainerError" => PodState::CreateContainerError,
            "ContainerCreating" => PodState::ContainerCreating,
            "PodInitializing" => PodState::PodInitializing,
            _ => return None,
        })
    }
}

/// What one pod says, and what explains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodStatus {
    /// The status.
    pub state: Status,
    /// The pod's name.
    pub pod: String,
    /// The container the status comes from, when one does.
    pub container: Option<String>,
    /// The platform's reason (`OOMKilled`, `Evicted`, `Unschedulable`, ...).
    pub reason: Option<String>,
    /// The platform's message.
    pub message: Option<String>,
    /// The container's exit code, when it terminated.
    pub exit_code: Option<i32>,
}

/// A pod's status, or a terminating pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// A live pod's state.
    Live(PodState),
    /// The pod is being deleted.
    Terminating,
}

impl PodStatus {
    fn new(pod: &Pod, state: Status) -> PodStatus {
        PodStatus {
            state,
            pod: pod.metadata.name.clone().unwrap_or_default(),
            container: None,
            reason: None,
            message: None,
            exit_code: None,
        }
    }

    /// Whether the pod serves.
    pub fn ready(&self) -> bool {
        self.state == Status::Live(PodState::Ready)
    }
}

/// The status of `pod`; `None` when its phase says nothing (Unknown, or no
/// status yet). `was_ready`: the pod has been ready before (a pod that
/// stops being ready is `NotReady`, one that never was is still starting).
pub fn pod_status(pod: &Pod, was_ready: bool) -> Option<PodStatus> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Some(PodStatus::new(pod, Status::Terminating));
    }
    let status = pod.status.as_ref()?;
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let with_pod_reason = |state| PodStatus {
        reason: status.reason.clone(),
        message: status.message.clone(),
        ..PodStatus::new(pod, Status::Live(state))
    };
    match phase {
        "Succeeded" => return Some(with_pod_reason(PodState::Succeeded)),
        "Failed" => return Some(with_pod_reason(PodState::Failed)),
        "Running" | "Pending" => {}
        _ => return None,
    }
    let condition = |kind: &str| status.conditions.iter().flatten().find(|c| c.type_ == kind);
    if phase == "Running" && condition("Ready").is_some_and(|c| c.status == "True") {
        return Some(PodStatus::new(pod, Status::Live(PodState::Ready)));
    }
    let init = status.init_container_statuses.iter().flatten();
    let app = status.container_statuses.iter().flatten();
    let worst = init
        .map(|c| container_status(pod, c, true))
        .chain(app.map(|c| container_status(pod, c, false)))
        .flatten()
        .max_by_key(|s| match s.state {
            Status::Live(state) => state,
            Status::Terminating => PodState::Succeeded,
        });
    if let Some(worst) = worst {
        return Some(worst);
    }
    if phase == "Running" {
        let state = if was_ready {
            PodState::NotReady
        } else {
            PodState::ContainersNotReady
        };
        let ready = condition("Ready");
        return Some(PodStatus {
            reason: ready.and_then(|c| c.reason.clone()),
            message: ready.and_then(|c| c.message.clone()),
            ..PodStatus::new(pod, Status::Live(state))
        });
    }
    let scheduled = condition("PodScheduled").filter(|c| c.status != "True");
    Some(PodStatus {
        reason: scheduled.and_then(|c| c.reason.clone()),
        message: scheduled.and_then(|c| c.message.clone()),
        ..PodStatus::new(pod, Status::Live(PodState::Pending))
    })
}

/// What one container's state tells, if anything.
fn container_status(pod: &Pod, container: &ContainerStatus, init: bool) -> Option<PodStatus> {
    let state = container.state.as_ref()?;
    let from = |state, reason: Option<&String>, message: Option<&String>, exit_code| PodStatus {
        container: Some(container.name.clone()),
        reason: reason.cloned(),
        message: message.cloned(),
        exit_code,
        ..PodStatus::new(pod, Status::Live(state))
    };
    if let Some(waiting) = &state.waiting {
        let reason = waiting.reason.as_deref().unwrap_or_default();
        let mut found = PodState::waiting(reason)?;
        let last = last_termination(container.last_state.as_ref());
        if found == PodState::CrashLoopBackOff
            && let Some((Some("OOMKilled"), code)) = last
        {
            found = PodState::OomKilled;
            let reason = Some("OOMKilled".to_string());
            return Some(from(found, reason.as_ref(), waiting.message.as_ref(), code));
        }
        let code = last.and_then(|(_, code)| code);
        return Some(from(
            found,
            waiting.reason.as_ref(),
            waiting.message.as_ref(),
            code,
        ));
    }
    let terminated = state.terminated.as_ref()?;
    let found = match (terminated.reason.as_deref(), terminated.exit_code) {
        (Some("OOMKilled"), _) => PodState::OomKilled,
        (_, 0) if init => return None,
        (_, 0) => PodState::Completed,
        _ => PodState::Error,
    };
    Some(from(
        found,
        terminated.reason.as_ref(),
        terminated.message.as_ref(),
        Some(terminated.exit_code),
    ))
}

/// The reason and exit code of a container's last termination.
fn last_termination(state: Option<&ContainerState>) -> Option<(Option<&str>, Option<i32>)> {
    let terminated = state?.terminated.as_ref()?;
    Some((terminated.reason.as_deref(), Some(terminated.exit_code)))
}

/// What a workload's pods say together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadStatus {
    /// The status of the Kubernetes table (`Ready`, `CrashLoopBackOff`,
    /// `Terminating`, `NoPods`, ...).
    pub status: &'static str,
    /// The pod it comes from (none for `NoPods`).
    pub from: Option<PodStatus>,
    /// Pods of the workload.
    pub pods: usize,
    /// Of them, ready.
    pub ready: usize,
}

/// The one status of a workload whose pods are `pods` (see the module's
/// documentation for the rule).
pub fn workload_status<'a>(pods: impl IntoIterator<Item = &'a PodStatus>) -> WorkloadStatus {
    let pods: Vec<&PodStatus> = pods.into_iter().collect();
    let ready = pods.iter().filter(|p| p.ready()).count();
    let live = pods
        .iter()
        .filter_map(|p| match p.state {
            Status::Live(state) => Some((state, *p)),
            Status::Terminating => None,
        })
        // The first of equals, by name, so that the choice is stable.
        .max_by(|(a, p), (b, q)| a.cmp(b).then_with(|| q.pod.cmp(&p.pod)));
    let (status, from) = match live {
        Some((state, pod)) => (state.as_str(), Some(pod.clone())),
        None => match pods.iter().min_by(|p, q| p.pod.cmp(&q.pod)) {
            Some(pod) => ("Terminating", Some((*pod).clone())),
            None => ("NoPods", None),
        },
    };
    WorkloadStatus {
        status,
        from,
        pods: pods.len(),
        ready,
    }
}

#[cfg(test)]
mod tests;
