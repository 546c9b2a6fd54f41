//! The workloads follow their agents: the scale subresource and delete,
//! as the fake API server receives them; refusals and retries; and the
//! server binary with a `[kubernetes]` config.

use std::time::Duration;

use agent_lifecycle::{
    AgentLifecycleService, automation::drivers::k8s::K8S_DRIVER, domain::AgentState, pb,
    service::ChangeRequest,
};
use serde_json::json;

use super::{
    BOT_POD, act,
    fake::{Fake, STEP, Seen},
    pods, reaches, register, write_kubeconfig,
};
use crate::common;

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/prod/deployments";

/// Waits until `count` requests of `method` to `path` have arrived; returns
/// them.
async fn requests(fake: &Fake, method: &str, path: &str, count: usize) -> Vec<Seen> {
    fake.until(&format!("{count} {method} {path}"), |c| {
        let seen = c.requests(method, path);
        (seen.len() >= count).then_some(seen)
    })
    .await
}

fn counted(service: &AgentLifecycleService, family: &str, labels: &[(&str, &str)]) -> f64 {
    service
        .metrics()
        .registry()
        .gather()
        .iter()
        .filter(|f| f.name() == family)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// DeployAgent reads the workload; StartAgent scales it to the agent's
/// replicas and StopAgent to 0, through the scale subresource with a JSON
/// merge patch; a StatefulSet without `k8s.replicas` starts with 1.
#[tokio::test]
async fn start_and_stop_scale_the_bound_workload() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut cluster = fake.cluster();
        cluster.add_workload("prod", "deployments", "bot", 0);
        cluster.add_workload("prod", "statefulsets", "db", 0);
    }
    let service = AgentLifecycleService::in_memory().expect("service");
    let runner = act(&service, &fake, dir.path()).await;
    let bot = register(
        &service,
        &[
            ("k8s.workload", "prod/Deployment/bot"),
            ("k8s.replicas", "3"),
        ],
    )
    .await;
    let db = register(&service, &[("k8s.workload", "prod/sts/db")]).await;
    for id in [bot, db] {
        service
            .deploy_agent(id, ChangeRequest::default())
            .await
            .expect("deploy");
        service
            .start_agent(id, ChangeRequest::default())
            .await
            .expect("start");
    }
    service
        .stop_agent(bot, ChangeRequest::default())
        .await
        .expect("stop");

    let read = requests(&fake, "GET", &format!("{DEPLOYMENTS}/bot"), 1).await;
    assert_eq!(read.len(), 1);
    let scaled = requests(&fake, "PATCH", &format!("{DEPLOYMENTS}/bot/scale"), 2).await;
    let bodies: Vec<_> = scaled.iter().map(|s| s.body.clone()).collect();
    assert_eq!(
        bodies,
        [
            Some(json!({"spec": {"replicas": 3}})),
            Some(json!({"spec": {"replicas": 0}}))
        ]
    );
    for request in &scaled {
        assert_eq!(
            request.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
    }
    let sts = requests(
        &fake,
        "PATCH",
        "/apis/apps/v1/namespaces/prod/statefulsets/db/scale",
        1,
    )
    .await;
    assert_eq!(sts[0].body, Some(json!({"spec": {"replicas": 1}})));
    let workloads = fake.cluster().workloads.clone();
    assert_eq!(
        workloads[&format!("{DEPLOYMENTS}/bot")]["spec"]["replicas"],
        0
    );
    runner.abort();
}

/// Deleting an agent whose workload the server owns deletes the workload
/// (background propagation); one it does not own is only scaled to 0.
#[tokio::test]
async fn deleting_an_agent_deletes_the_workload_it_owns() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut cluster = fake.cluster();
        cluster.add_workload("prod", "deployments", "bot", 1);
        cluster.add_workload("prod", "deployments", "shared", 1);
    }
    let service = AgentLifecycleService::in_memory().expect("service");
    let runner = act(&service, &fake, dir.path()).await;
    let owned = register(
        &service,
        &[
            ("k8s.workload", "prod/Deployment/bot"),
            ("k8s.owned", "true"),
        ],
    )
    .await;
    let shared = register(&service, &[("k8s.workload", "prod/Deployment/shared")]).await;
    for id in [owned, shared] {
        service
            .transition(id, AgentState::Deleted, ChangeRequest::default())
            .await
            .expect("delete");
    }
    let deleted = requests(&fake, "DELETE", &format!("{DEPLOYMENTS}/bot"), 1).await;
    assert_eq!(
        deleted[0]
            .body
            .as_ref()
            .map(|b| b["propagationPolicy"].clone()),
        Some(json!("Background"))
    );
    let scaled = requests(&fake, "PATCH", &format!("{DEPLOYMENTS}/shared/scale"), 1).await;
    assert_eq!(scaled[0].body, Some(json!({"spec": {"replicas": 0}})));
    let cluster = fake.cluster();
    assert!(
        !cluster
            .workloads
            .contains_key(&format!("{DEPLOYMENTS}/bot"))
    );
    assert!(
        cluster
            .workloads
            .contains_key(&format!("{DEPLOYMENTS}/shared"))
    );
    assert!(
        cluster
            .requests("DELETE", &format!("{DEPLOYMENTS}/shared"))
            .is_empty()
    );
    drop(cluster);
    runner.abort();
}

/// 403 and 422 from the API, and a workload that does not exist, move the
/// agent to ERROR with the API's message and reason in the reason and its
/// code in the metadata; the driver goes on with the next event.
#[tokio::test]
async fn refusals_move_the_agent_to_error_with_the_api_message_and_code() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut cluster = fake.cluster();
        for (name, code) in [("locked", 403), ("quota", 422)] {
            cluster.add_workload("prod", "deployments", name, 0);
            cluster
                .errors
                .insert(format!("PATCH {DEPLOYMENTS}/{name}/scale"), [code].into());
        }
    }
    let service = AgentLifecycleService::in_memory().expect("service");
    let runner = act(&service, &fake, dir.path()).await;
    let mut agents = Vec::new();
    for name in ["locked", "quota"] {
        let workload = format!("prod/Deployment/{name}");
        let id = register(&service, &[("k8s.workload", &workload)]).await;
        service
            .deploy_agent(id, ChangeRequest::default())
            .await
            .expect("deploy");
        // STARTING alone: a refusal never overrides a newer state.
        service
            .transition(id, AgentState::Starting, ChangeRequest::default())
            .await
            .expect("starting");
        agents.push(id);
    }
    let ghost = register(&service, &[("k8s.workload", "prod/Deployment/ghost")]).await;
    service
        .transition(ghost, AgentState::Deploying, ChangeRequest::default())
        .await
        .expect("deploying");

    let expected = [
        (agents[0], "403", "is forbidden", "(Forbidden)"),
        (
            agents[1],
            "422",
            "spec.replicas: Invalid value",
            "(Invalid)",
        ),
        (
            ghost,
            "404",
            "deployments.apps \"ghost\" not found",
            "(NotFound)",
        ),
    ];
    for (id, code, message, reason) in expected {
        let agent = reaches(&service, id, AgentState::Error).await;
        let record = &agent.last_transition;
        assert_eq!(record.triggered_by, K8S_DRIVER);
        assert!(record.reason.contains(message), "{}", record.reason);
        assert!(record.reason.contains(reason), "{}", record.reason);
        assert_eq!(record.metadata["platform_code"], code);
        assert_eq!(record.metadata["driver"], K8S_DRIVER);
    }
    runner.abort();
}

/// Two 503s, then success: the scale is retried with back-off and each
/// retry counted; the agent is not moved.
#[tokio::test]
async fn a_503_is_retried_and_counted() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut cluster = fake.cluster();
        cluster.add_workload("prod", "deployments", "busy", 0);
        cluster
            .errors
            .insert(format!("PATCH {DEPLOYMENTS}/busy/scale"), [503, 503].into());
    }
    let service = AgentLifecycleService::in_memory().expect("service");
    let runner = act(&service, &fake, dir.path()).await;
    let id = register(&service, &[("k8s.workload", "prod/Deployment/busy")]).await;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    service
        .transition(id, AgentState::Starting, ChangeRequest::default())
        .await
        .expect("starting");
    requests(&fake, "PATCH", &format!("{DEPLOYMENTS}/busy/scale"), 3).await;
    tokio::time::timeout(STEP, async {
        while counted(
            &service,
            "agent_lifecycle_driver_actions_total",
            &[
                ("driver", K8S_DRIVER),
                ("action", "start"),
                ("outcome", "done"),
            ],
        ) < 1.0
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the start is done");
    assert_eq!(
        counted(
            &service,
            "agent_lifecycle_driver_retries_total",
            &[("driver", K8S_DRIVER)]
        ),
        2.0
    );
    assert_eq!(
        fake.cluster().workloads[&format!("{DEPLOYMENTS}/busy")]["spec"]["replicas"],
        1
    );
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Starting
    );
    runner.abort();
}

/// Before acting, the driver reads the platform: a workload already
/// scaled to the agent's replicas is not patched again (the action is
/// counted as settled).
#[tokio::test]
async fn a_start_the_workload_already_shows_is_settled_by_reading_its_scale() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    fake.cluster().add_workload("prod", "deployments", "bot", 2);
    let service = AgentLifecycleService::in_memory().expect("service");
    let runner = act(&service, &fake, dir.path()).await;
    let id = register(
        &service,
        &[
            ("k8s.workload", "prod/Deployment/bot"),
            ("k8s.replicas", "2"),
        ],
    )
    .await;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    service
        .transition(id, AgentState::Starting, ChangeRequest::default())
        .await
        .expect("starting");
    requests(&fake, "GET", &format!("{DEPLOYMENTS}/bot/scale"), 1).await;
    tokio::time::timeout(STEP, async {
        while counted(
            &service,
            "agent_lifecycle_driver_actions_total",
            &[
                ("driver", K8S_DRIVER),
                ("action", "start"),
                ("outcome", "settled"),
            ],
        ) < 1.0
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the start is settled");
    assert!(
        fake.cluster()
            .requests("PATCH", &format!("{DEPLOYMENTS}/bot/scale"))
            .is_empty()
    );
    runner.abort();
}

/// A restart by the health monitor (STARTING triggered by it) restarts the
/// workload's pods as `kubectl rollout restart` does: the pod template's
/// `restartedAt` set to the event's time, with the replicas.
#[tokio::test]
async fn a_restart_by_the_health_monitor_restarts_the_pods() {
    use agent_lifecycle::automation::{drivers::k8s::RESTARTED_AT, health};
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    fake.cluster().add_workload("prod", "deployments", "bot", 1);
    let service = AgentLifecycleService::in_memory().expect("service");
    let runner = act(&service, &fake, dir.path()).await;
    let id = register(&service, &[("k8s.workload", "prod/Deployment/bot")]).await;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    for state in [
        AgentState::Starting,
        AgentState::Online,
        AgentState::Error,
        AgentState::Offline,
    ] {
        service
            .transition(id, state, ChangeRequest::default())
            .await
            .expect("move");
    }
    let restart = ChangeRequest {
        triggered_by: health::TRIGGER.into(),
        ..ChangeRequest::default()
    };
    let restarted = service
        .transition(id, AgentState::Starting, restart)
        .await
        .expect("restart");
    let at = restarted.transitions[0].at;
    let patched = requests(&fake, "PATCH", &format!("{DEPLOYMENTS}/bot"), 1).await;
    assert_eq!(
        patched[0].body,
        Some(
            json!({"spec": {"replicas": 1, "template": {"metadata": {"annotations": {
                RESTARTED_AT: agent_lifecycle::domain::rfc3339(at)
            }}}}})
        )
    );
    assert_eq!(
        patched[0].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    runner.abort();
}

/// The server binary with `[kubernetes]` naming a kubeconfig written by
/// the test, `namespace` and `act = true`: StartAgent over gRPC scales the
/// bound Deployment, and its pods move the agent (a crash loop to ERROR).
#[tokio::test]
async fn the_server_follows_pods_and_scales_workloads_from_its_config() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    fake.cluster().add_workload("prod", "deployments", "bot", 0);
    let kubeconfig = write_kubeconfig(&fake, dir.path());
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"memory\"\n[kubernetes]\nkubeconfig = {:?}\nnamespace = \"prod\"\nact = true\n",
            kubeconfig.to_str().expect("utf-8 path")
        ),
    )
    .expect("write the config");
    let server = common::process::ServerProcess::start(&[
        "--log",
        "warn",
        "--config",
        config.to_str().expect("utf-8 path"),
    ]);
    let mut client = server.client().await;
    let agent = common::register(
        &mut client,
        &[
            ("k8s.workload", "prod/Deployment/bot"),
            ("k8s.replicas", "2"),
        ],
    )
    .await;
    let mut events = common::watch(
        &mut client,
        pb::WatchEventsRequest {
            agent_ids: vec![agent.agent_id.clone()],
            ..Default::default()
        },
    )
    .await;
    for call in ["deploy", "start"] {
        let id = agent.agent_id.clone();
        match call {
            "deploy" => client
                .deploy_agent(pb::DeployAgentRequest {
                    agent_id: id,
                    ..Default::default()
                })
                .await
                .map(drop),
            _ => client
                .start_agent(pb::StartAgentRequest {
                    agent_id: id,
                    ..Default::default()
                })
                .await
                .map(drop),
        }
        .unwrap_or_else(|e| panic!("{call}: {e}{}", server.log()));
    }
    let scaled = requests(&fake, "PATCH", &format!("{DEPLOYMENTS}/bot/scale"), 1).await;
    assert_eq!(scaled[0].body, Some(json!({"spec": {"replicas": 2}})));
    let watched = fake
        .until("the namespace's pods watched", |c| {
            c.seen
                .iter()
                .find(|s| s.is_watch() && s.path == "/api/v1/namespaces/prod/pods")
                .cloned()
        })
        .await;
    assert_eq!(watched.authorization.as_deref(), Some("Bearer test-token"));

    // StartAgent left the agent STARTING; its ready pod moves it ONLINE,
    // a crash loop to ERROR, each recorded as the driver's.
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::ready()));
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let event = tokio::time::timeout_at(deadline, common::next_event(&mut events))
            .await
            .unwrap_or_else(|_| panic!("the agent follows its pods{}", server.log()));
        let transition = event.transition.expect("a transition");
        seen.push(transition.to_state);
        if transition.to_state == pb::AgentState::Online as i32 {
            assert_eq!(transition.triggered_by, K8S_DRIVER);
            fake.cluster()
                .set_pod(pods::deployment_pod("bot", BOT_POD, pods::crash_loop()));
        }
        if transition.to_state == pb::AgentState::Error as i32 {
            assert_eq!(transition.triggered_by, K8S_DRIVER);
            assert!(
                transition.reason.contains("CrashLoopBackOff"),
                "{}",
                transition.reason
            );
            break;
        }
    }
    use pb::AgentState as S;
    assert_eq!(
        seen,
        [S::Deploying, S::Deployed, S::Starting, S::Online, S::Error].map(|s| s as i32)
    );
}
