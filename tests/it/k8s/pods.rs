//! Pods as the API server returns them, in the shapes of the Kubernetes
//! API reference (`Pod`, `PodStatus`, `PodCondition`, `ContainerStatus`,
//! `ContainerState`): owned by a Deployment's ReplicaSet or by a
//! StatefulSet, in each stage the tests move them through.

use serde_json::{Value, json};

/// A pod of Deployment `deployment` (through its ReplicaSet) in `prod`,
/// with `status`.
pub fn deployment_pod(deployment: &str, name: &str, status: Value) -> Value {
    let hash = "7d9f8c6b5";
    pod(
        name,
        json!({"app": deployment, "pod-template-hash": hash}),
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{deployment}-{hash}"),
            "uid": "0b7c1d2e-aaaa-4bbb-8ccc-111122223333", "controller": true, "blockOwnerDeletion": true}),
        status,
    )
}

/// Pod `NAME-0` of StatefulSet `name` in `prod`, with `status`.
pub fn statefulset_pod(statefulset: &str, status: Value) -> Value {
    pod(
        &format!("{statefulset}-0"),
        json!({"app": statefulset, "statefulset.kubernetes.io/pod-name": format!("{statefulset}-0")}),
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": statefulset,
            "uid": "9e8d7c6b-bbbb-4ccc-8ddd-444455556666", "controller": true, "blockOwnerDeletion": true}),
        status,
    )
}

fn pod(name: &str, labels: Value, owner: Value, status: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "prod",
            "uid": format!("00000000-0000-4000-8000-{:012}", name.len()),
            "creationTimestamp": "2025-01-10T09:00:00Z",
            "labels": labels,
            "ownerReferences": [owner]
        },
        "spec": {
            "containers": [{"name": "agent", "image": "registry.local/agent:1.4",
                "resources": {"limits": {"memory": "512Mi"}}}],
            "restartPolicy": "Always",
            "nodeName": "node-1"
        },
        "status": status
    })
}

fn condition(kind: &str, value: &str) -> Value {
    json!({"type": kind, "status": value, "lastProbeTime": null,
        "lastTransitionTime": "2025-01-10T09:00:05Z"})
}

fn container(ready: bool, state: Value, last_state: Value) -> Value {
    json!({"name": "agent", "image": "registry.local/agent:1.4", "imageID": "",
        "containerID": "containerd://3f2a", "ready": ready, "started": ready,
        "restartCount": 2, "state": state, "lastState": last_state})
}

/// Scheduled nowhere yet.
pub fn pending() -> Value {
    json!({"phase": "Pending", "qosClass": "Burstable", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient cpu.",
        "lastProbeTime": null, "lastTransitionTime": "2025-01-10T09:00:01Z"}]})
}

/// Scheduled; the kubelet creates the container.
pub fn creating() -> Value {
    json!({"phase": "Pending", "hostIP": "10.0.0.7", "conditions": [condition("PodScheduled", "True"),
        condition("Initialized", "True"), condition("ContainersReady", "False"), condition("Ready", "False")],
        "containerStatuses": [container(false, json!({"waiting": {"reason": "ContainerCreating"}}), json!({}))]})
}

/// Running, not ready yet.
pub fn running() -> Value {
    json!({"phase": "Running", "podIP": "10.1.2.3", "conditions": [condition("PodScheduled", "True"),
        {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
         "message": "containers with unready status: [agent]", "lastProbeTime": null,
         "lastTransitionTime": "2025-01-10T09:00:07Z"}],
        "containerStatuses": [container(false, json!({"running": {"startedAt": "2025-01-10T09:00:07Z"}}), json!({}))]})
}

/// Running and ready.
pub fn ready() -> Value {
    json!({"phase": "Running", "podIP": "10.1.2.3", "conditions": [condition("PodScheduled", "True"),
        condition("Initialized", "True"), condition("ContainersReady", "True"), condition("Ready", "True")],
        "containerStatuses": [container(true, json!({"running": {"startedAt": "2025-01-10T09:00:07Z"}}), json!({}))]})
}

/// Crashing, the kubelet backing off.
pub fn crash_loop() -> Value {
    json!({"phase": "Running", "conditions": [condition("Ready", "False")],
        "containerStatuses": [container(false,
            json!({"waiting": {"reason": "CrashLoopBackOff",
                "message": "back-off 40s restarting failed container=agent pod=bot-7d9f8c6b5-x2x9z_prod(1f0c)"}}),
            json!({"terminated": {"exitCode": 3, "reason": "Error",
                "startedAt": "2025-01-10T09:01:00Z", "finishedAt": "2025-01-10T09:01:02Z",
                "containerID": "containerd://3f2a"}}))]})
}

/// Killed for its memory.
pub fn oom_killed() -> Value {
    json!({"phase": "Running", "conditions": [condition("Ready", "False")],
        "containerStatuses": [container(false,
            json!({"terminated": {"exitCode": 137, "reason": "OOMKilled",
                "startedAt": "2025-01-10T09:01:00Z", "finishedAt": "2025-01-10T09:01:30Z",
                "containerID": "containerd://3f2a"}}),
            json!({}))]})
}

/// The image cannot be pulled.
pub fn image_pull_backoff() -> Value {
    json!({"phase": "Pending", "conditions": [condition("PodScheduled", "True"), condition("Ready", "False")],
        "containerStatuses": [container(false,
            json!({"waiting": {"reason": "ImagePullBackOff",
                "message": "Back-off pulling image \"registry.local/agent:1.5\""}}),
            json!({}))]})
}
