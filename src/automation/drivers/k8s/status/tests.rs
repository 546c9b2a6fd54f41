//! Pods as the API server returns them (the shapes of the Kubernetes API
//! reference: `PodStatus`, `PodCondition`, `ContainerStatus`,
//! `ContainerState`), each mapped to its status, and workloads of several
//! pods summed up.

use serde_json::{Value, json};

use super::*;
use crate::domain::{AgentState, ExternalSource};

/// A pod of Deployment `bot` in `prod` with `status`.
fn pod(name: &str, status: Value) -> Pod {
    let value = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "prod",
            "uid": "5f1ac9b3-3f5e-4d0e-9d0b-0a7c1b2c3d4e",
            "resourceVersion": "4711",
            "creationTimestamp": "2025-01-10T09:00:00Z",
            "labels": {"app": "bot", "pod-template-hash": "7d9f8c6b5"},
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "bot-7d9f8c6b5",
                "uid": "0b7c1d2e-aaaa-4bbb-8ccc-111122223333",
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {"containers": [{"name": "agent", "image": "registry.local/agent:1.4"}]},
        "status": status,
    });
    serde_json::from_value(value).expect("a valid Pod")
}

fn condition(kind: &str, status: &str) -> Value {
    json!({"type": kind, "status": status, "lastTransitionTime": "2025-01-10T09:00:05Z"})
}

fn container(ready: bool, state: Value, last_state: Value) -> Value {
    json!({
        "name": "agent",
        "image": "registry.local/agent:1.4",
        "imageID": "",
        "ready": ready,
        "restartCount": 3,
        "started": ready,
        "state": state,
        "lastState": last_state,
    })
}

fn waiting(reason: &str, message: &str) -> Value {
    json!({"waiting": {"reason": reason, "message": message}})
}

fn status_of(pod: &Pod) -> (&'static str, Option<String>, Option<i32>) {
    let status = pod_status(pod, false).expect("a status");
    let name = match status.state {
        Status::Live(state) => state.as_str(),
        Status::Terminating => "Terminating",
    };
    (name, status.reason, status.exit_code)
}

/// Every status a pod maps to is one the Kubernetes table knows.
fn known(status: &str) {
    assert!(
        ExternalSource::Kubernetes.target(status).is_some(),
        "{status} is in the table"
    );
}

#[test]
fn a_pod_through_its_start() {
    let pending = pod(
        "bot-1",
        json!({
            "phase": "Pending",
            "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient cpu.",
                "lastTransitionTime": "2025-01-10T09:00:01Z"
            }],
            "qosClass": "Burstable"
        }),
    );
    assert_eq!(
        status_of(&pending),
        ("Pending", Some("Unschedulable".into()), None)
    );
    let creating = pod(
        "bot-1",
        json!({
            "phase": "Pending",
            "conditions": [condition("PodScheduled", "True"), condition("Ready", "False")],
            "containerStatuses": [container(false, waiting("ContainerCreating", ""), json!({}))],
        }),
    );
    assert_eq!(status_of(&creating).0, "ContainerCreating");
    let running = json!({
        "phase": "Running",
        "conditions": [
            condition("PodScheduled", "True"),
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
             "message": "containers with unready status: [agent]"},
        ],
        "containerStatuses": [container(false,
            json!({"running": {"startedAt": "2025-01-10T09:00:07Z"}}), json!({}))],
    });
    let not_ready = pod("bot-1", running.clone());
    assert_eq!(
        status_of(&not_ready),
        (
            "ContainersNotReady",
            Some("ContainersNotReady".into()),
            None
        )
    );
    let was_ready = pod_status(&not_ready, true).expect("a status");
    assert_eq!(was_ready.state, Status::Live(PodState::NotReady));
    let ready = pod(
        "bot-1",
        json!({
            "phase": "Running",
            "podIP": "10.1.2.3",
            "conditions": [condition("PodScheduled", "True"), condition("Initialized", "True"),
                condition("ContainersReady", "True"), condition("Ready", "True")],
            "containerStatuses": [container(true,
                json!({"running": {"startedAt": "2025-01-10T09:00:07Z"}}), json!({}))],
        }),
    );
    assert_eq!(status_of(&ready).0, "Ready");
    assert!(pod_status(&ready, false).expect("status").ready());
    for status in [
        "Pending",
        "ContainerCreating",
        "ContainersNotReady",
        "NotReady",
        "Ready",
    ] {
        known(status);
    }
    assert_eq!(
        ExternalSource::Kubernetes.target("Ready"),
        Some(AgentState::Online)
    );
}

#[test]
fn container_failures_name_their_reason_and_exit_code() {
    let running = |containers: Value| {
        pod(
            "bot-1",
            json!({
                "phase": "Running",
                "conditions": [condition("Ready", "False")],
                "containerStatuses": containers,
            }),
        )
    };
    let crash = running(json!([container(
        false,
        waiting(
            "CrashLoopBackOff",
            "back-off 40s restarting failed container=agent"
        ),
        json!({"terminated": {"exitCode": 1, "reason": "Error",
            "startedAt": "2025-01-10T09:01:00Z", "finishedAt": "2025-01-10T09:01:02Z"}})
    )]));
    assert_eq!(
        status_of(&crash),
        ("CrashLoopBackOff", Some("CrashLoopBackOff".into()), Some(1))
    );
    let oom = running(json!([container(
        false,
        json!({"terminated": {"exitCode": 137, "reason": "OOMKilled",
            "startedAt": "2025-01-10T09:01:00Z", "finishedAt": "2025-01-10T09:01:30Z"}}),
        json!({})
    )]));
    assert_eq!(
        status_of(&oom),
        ("OOMKilled", Some("OOMKilled".into()), Some(137))
    );
    let oom_loop = running(json!([container(
        false,
        waiting("CrashLoopBackOff", "back-off 10s"),
        json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    )]));
    assert_eq!(
        status_of(&oom_loop),
        ("OOMKilled", Some("OOMKilled".into()), Some(137))
    );
    let error = running(json!([container(
        false,
        json!({"terminated": {"exitCode": 2, "reason": "Error"}}),
        json!({})
    )]));
    assert_eq!(status_of(&error), ("Error", Some("Error".into()), Some(2)));
    let completed = running(json!([container(
        false,
        json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
        json!({})
    )]));
    assert_eq!(status_of(&completed).0, "Completed");
    let pull = |reason: &str| {
        pod(
            "bot-1",
            json!({
                "phase": "Pending",
                "containerStatuses": [container(false,
                    waiting(reason, "Back-off pulling image \"registry.local/agent:1.5\""),
                    json!({}))],
            }),
        )
    };
    for reason in [
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    ] {
        let status = pod_status(&pull(reason), false).expect("status");
        let Status::Live(state) = status.state else {
            panic!("{reason}: live");
        };
        assert_eq!(state.as_str(), reason);
        assert_eq!(
            status.message.as_deref(),
            Some("Back-off pulling image \"registry.local/agent:1.5\"")
        );
        assert_eq!(status.container.as_deref(), Some("agent"));
        known(reason);
    }
    for status in ["CrashLoopBackOff", "OOMKilled", "Error", "Completed"] {
        known(status);
    }
}

#[test]
fn terminating_finished_and_unknown_pods() {
    let mut terminating = pod(
        "bot-1",
        json!({"phase": "Running", "conditions": [condition("Ready", "True")]}),
    );
    terminating.metadata.deletion_timestamp =
        Some(serde_json::from_value(json!("2025-01-10T10:00:00Z")).expect("a time"));
    assert_eq!(status_of(&terminating).0, "Terminating");
    let evicted = pod(
        "bot-1",
        json!({"phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."}),
    );
    assert_eq!(
        status_of(&evicted),
        ("Failed", Some("Evicted".into()), None)
    );
    let done = pod("bot-1", json!({"phase": "Succeeded"}));
    assert_eq!(status_of(&done).0, "Succeeded");
    assert_eq!(
        pod_status(&pod("bot-1", json!({"phase": "Unknown"})), false),
        None
    );
    known("Terminating");
    known("Failed");
    known("Succeeded");
}

fn live(name: &str, state: PodState) -> PodStatus {
    PodStatus {
        state: Status::Live(state),
        pod: name.into(),
        container: None,
        reason: None,
        message: None,
        exit_code: None,
    }
}

#[test]
fn a_workload_is_ready_while_one_pod_is_and_otherwise_says_its_worst() {
    let ready = live("bot-a", PodState::Ready);
    let crash = live("bot-b", PodState::CrashLoopBackOff);
    let pull = live("bot-c", PodState::ImagePullBackOff);
    let creating = live("bot-d", PodState::ContainerCreating);
    let mut terminating = live("bot-e", PodState::Ready);
    terminating.state = Status::Terminating;

    let both = workload_status([&ready, &crash]);
    assert_eq!((both.status, both.pods, both.ready), ("Ready", 2, 1));
    let failing = workload_status([&creating, &crash, &pull]);
    assert_eq!(failing.status, "ImagePullBackOff");
    assert_eq!(failing.from.expect("from").pod, "bot-c");
    assert_eq!(
        workload_status([&creating, &terminating]).status,
        "ContainerCreating",
        "a pod on its way out says less than one on its way in"
    );
    assert_eq!(workload_status([&terminating]).status, "Terminating");
    let none = workload_status([]);
    assert_eq!((none.status, none.from), ("NoPods", None));
    known("NoPods");
}
