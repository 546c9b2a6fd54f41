//! The seed's library API, used in-process with no network.

use std::sync::{Arc, Mutex};

use agent_lifecycle::{
    AgentLifecycleService, Error,
    domain::{
        AgentId, AgentState, HookError, HookPhase, Metadata, TransitionContext, TransitionError,
    },
    service::{ChangeRequest, Hook, Registration},
};

fn service() -> AgentLifecycleService {
    AgentLifecycleService::in_memory().expect("in-memory service")
}

async fn register(service: &AgentLifecycleService) -> AgentId {
    service
        .register_agent(Registration::default())
        .await
        .expect("register")
        .agent
        .id
}

async fn online(service: &AgentLifecycleService) -> AgentId {
    let id = register(service).await;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    service
        .start_agent(id, ChangeRequest::default())
        .await
        .expect("start");
    id
}

/// Registering twice is idempotent while the agent is REGISTERED, and an
/// error once it has moved on.
#[tokio::test]
async fn registration_is_idempotent_only_while_registered() {
    let service = service();
    let id = AgentId::generate();
    let first = service
        .register_agent(Registration {
            agent_id: Some(id),
            name: "a".into(),
            ..Default::default()
        })
        .await
        .expect("register");
    assert_eq!(first.agent.state, AgentState::Registered);
    assert_eq!(first.agent.version, 1);
    assert_eq!(first.transitions.len(), 1);
    assert_eq!(first.transitions[0].from, None);
    assert_eq!(first.transitions[0].sequence, 1);

    let again = service
        .register_agent(Registration {
            agent_id: Some(id),
            ..Default::default()
        })
        .await
        .expect("idempotent");
    assert!(again.transitions.is_empty());
    assert_eq!(again.agent.version, 1);
    assert_eq!(service.head_sequence(), 1, "no new event");

    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    let err = service
        .register_agent(Registration {
            agent_id: Some(id),
            ..Default::default()
        })
        .await
        .expect_err("exists");
    assert!(
        matches!(
            err,
            Error::AgentExists {
                state: AgentState::Deployed,
                ..
            }
        ),
        "{err}"
    );
}

/// Deploy, start and stop each record two transitions with consecutive
/// sequences and versions; the whole lifecycle ends OFFLINE.
#[tokio::test]
async fn full_lifecycle_records_every_step() {
    let service = service();
    let id = register(&service).await;
    let deploy = service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    let states: Vec<_> = deploy.transitions.iter().map(|t| (t.from, t.to)).collect();
    assert_eq!(
        states,
        vec![
            (Some(AgentState::Registered), AgentState::Deploying),
            (Some(AgentState::Deploying), AgentState::Deployed)
        ]
    );
    assert_eq!(
        deploy.transitions[0].sequence + 1,
        deploy.transitions[1].sequence
    );
    assert_eq!(deploy.agent.version, 3);

    let start = service
        .start_agent(id, ChangeRequest::default())
        .await
        .expect("start");
    assert_eq!(
        start.transitions.iter().map(|t| t.to).collect::<Vec<_>>(),
        vec![AgentState::Starting, AgentState::Online]
    );
    service
        .assign_task(id, Some("t-1".into()), ChangeRequest::default())
        .await
        .expect("assign");
    service
        .complete_task(id, Some("t-1".into()), ChangeRequest::default())
        .await
        .expect("complete");
    let stop = service
        .stop_agent(id, ChangeRequest::because("done"))
        .await
        .expect("stop");
    assert_eq!(
        stop.transitions.iter().map(|t| t.to).collect::<Vec<_>>(),
        vec![AgentState::Stopping, AgentState::Offline]
    );
    assert!(stop.transitions.iter().all(|t| t.reason == "done"));
    assert_eq!(stop.agent.state, AgentState::Offline);

    let history = service
        .get_manager(id)
        .expect("manager")
        .get_state_history(None)
        .await
        .expect("history");
    let path: Vec<_> = history.iter().map(|t| t.to).collect();
    use AgentState::*;
    assert_eq!(
        path,
        vec![
            Registered, Deploying, Deployed, Starting, Online, Busy, Idle, Stopping, Offline
        ]
    );
    for (i, t) in history.iter().enumerate() {
        assert_eq!(t.version, i as u64 + 1);
        assert_eq!(t.sequence, i as u64 + 1);
    }
    assert_eq!(
        history[5].metadata.get("task_id"),
        Some(&serde_json::json!("t-1"))
    );
}

/// assign_task needs ONLINE or IDLE, complete_task needs BUSY, resume needs
/// MAINTENANCE; a refusal changes and records nothing.
#[tokio::test]
async fn operations_require_their_states_and_refusals_record_nothing() {
    let service = service();
    let id = register(&service).await;
    let head = service.head_sequence();
    let err = service
        .assign_task(id, None, ChangeRequest::default())
        .await
        .expect_err("not available");
    assert!(
        matches!(
            err,
            Error::Transition(TransitionError::RequiresState {
                state: AgentState::Registered,
                ..
            })
        ),
        "{err}"
    );
    let err = service
        .complete_task(id, None, ChangeRequest::default())
        .await
        .expect_err("not busy");
    assert!(matches!(
        err,
        Error::Transition(TransitionError::RequiresState { .. })
    ));
    let err = service
        .resume_from_maintenance(id, ChangeRequest::default())
        .await
        .expect_err("not in maintenance");
    assert!(matches!(
        err,
        Error::Transition(TransitionError::RequiresState { .. })
    ));
    let err = service
        .transition(id, AgentState::Online, ChangeRequest::default())
        .await
        .expect_err("not allowed");
    match err {
        Error::Transition(TransitionError::NotAllowed {
            from, to, allowed, ..
        }) => {
            assert_eq!((from, to), (AgentState::Registered, AgentState::Online));
            assert_eq!(allowed, vec![AgentState::Deploying, AgentState::Deleted]);
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(service.head_sequence(), head);
    let agent = service.get_agent(id).expect("agent");
    assert_eq!((agent.state, agent.version), (AgentState::Registered, 1));

    // From SCALING the policy allows BUSY, but assign_task still refuses:
    // the seed requires availability, not just an edge.
    let online = online(&service).await;
    service
        .put_in_maintenance(online, ChangeRequest::because("patch"))
        .await
        .expect("maintenance");
    let resumed = service
        .resume_from_maintenance(online, ChangeRequest::default())
        .await
        .expect("resume");
    assert_eq!(resumed.agent.state, AgentState::Online);
    let busy = service
        .assign_task(online, None, ChangeRequest::default())
        .await
        .expect("assign");
    assert_eq!(busy.agent.state, AgentState::Busy);
    let err = service
        .assign_task(online, None, ChangeRequest::default())
        .await
        .expect_err("busy is not available");
    assert!(matches!(
        err,
        Error::Transition(TransitionError::RequiresState {
            state: AgentState::Busy,
            ..
        })
    ));
}

/// handle_error records "Error: <message>" as reason and the message in the
/// metadata; ERROR -> ONLINE recovers.
#[tokio::test]
async fn error_and_recovery() {
    let service = service();
    let id = online(&service).await;
    let out = service
        .handle_error(id, "Network timeout", ChangeRequest::default())
        .await
        .expect("error");
    let record = &out.transitions[0];
    assert_eq!(record.to, AgentState::Error);
    assert_eq!(record.reason, "Error: Network timeout");
    assert_eq!(
        record.metadata.get("error_message"),
        Some(&serde_json::json!("Network timeout"))
    );
    assert!(
        service
            .get_manager(id)
            .expect("manager")
            .is_in_error_state()
    );
    let manager = service.get_manager(id).expect("manager");
    let back = manager
        .transition_to(AgentState::Online, "recovered", "operator", Metadata::new())
        .await
        .expect("recover");
    assert_eq!(
        (back.from, back.to),
        (Some(AgentState::Error), AgentState::Online)
    );
    assert_eq!(back.triggered_by, "operator");
    assert!(manager.is_operational() && manager.is_available_for_tasks());
}

/// History with and without a limit: the limit keeps the newest N, still
/// oldest first.
#[tokio::test]
async fn history_with_and_without_limit() {
    let service = service();
    let id = online(&service).await;
    for _ in 0..3 {
        service
            .transition(id, AgentState::Idle, ChangeRequest::default())
            .await
            .expect("idle");
        service
            .transition(id, AgentState::Online, ChangeRequest::default())
            .await
            .expect("online");
    }
    let manager = service.get_manager(id).expect("manager");
    let all = manager.get_state_history(None).await.expect("all");
    assert_eq!(all.len(), 11);
    let last3 = manager.get_state_history(Some(3)).await.expect("limited");
    assert_eq!(
        last3.iter().map(|t| t.version).collect::<Vec<_>>(),
        vec![9, 10, 11]
    );
    assert_eq!(
        manager
            .get_state_history(Some(100))
            .await
            .expect("big limit")
            .len(),
        11
    );
}

/// The manager's queries follow the agent's state and the policy.
#[tokio::test]
async fn manager_reports_state_info_and_valid_transitions() {
    let service = service();
    let id = register(&service).await;
    let manager = service.get_manager(id).expect("manager");
    assert!(manager.can_transition_to(AgentState::Deploying));
    assert!(!manager.can_transition_to(AgentState::Online));
    assert_eq!(
        manager.get_valid_transitions(),
        vec![AgentState::Deploying, AgentState::Deleted]
    );
    let info = manager.get_current_state_info();
    assert_eq!(info.agent.state, AgentState::Registered);
    assert!(!info.is_operational() && !info.is_in_error_state() && !info.is_in_maintenance());
    manager
        .transition_to(AgentState::Deploying, "", "", Metadata::new())
        .await
        .expect("deploying");
    assert_eq!(manager.current_state(), AgentState::Deploying);
    assert!(matches!(
        service.get_manager(AgentId::generate()),
        Err(Error::AgentNotFound(_))
    ));
}

/// The category queries and metrics over a mixed fleet.
#[tokio::test]
async fn category_queries_and_metrics_over_a_mixed_fleet() {
    let service = service();
    let registered = register(&service).await;
    let online_agent = online(&service).await;
    let idle = online(&service).await;
    service
        .transition(idle, AgentState::Idle, ChangeRequest::default())
        .await
        .expect("idle");
    let busy = online(&service).await;
    service
        .assign_task(busy, None, ChangeRequest::default())
        .await
        .expect("busy");
    let error = online(&service).await;
    service
        .handle_error(error, "x", ChangeRequest::default())
        .await
        .expect("error");
    let failed = register(&service).await;
    service
        .transition(failed, AgentState::Deploying, ChangeRequest::default())
        .await
        .expect("deploying");
    service
        .transition(failed, AgentState::Failed, ChangeRequest::default())
        .await
        .expect("failed");
    let maintenance = online(&service).await;
    service
        .put_in_maintenance(maintenance, ChangeRequest::default())
        .await
        .expect("maintenance");
    let suspended = online(&service).await;
    service
        .transition(suspended, AgentState::Suspended, ChangeRequest::default())
        .await
        .expect("suspended");

    let sorted = |mut v: Vec<AgentId>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(service.get_operational_agents()),
        sorted(vec![online_agent, idle, busy])
    );
    assert_eq!(
        sorted(service.get_available_agents()),
        sorted(vec![online_agent, idle])
    );
    assert_eq!(
        sorted(service.get_agents_in_error()),
        sorted(vec![error, failed])
    );
    assert_eq!(
        sorted(service.get_agents_in_maintenance()),
        sorted(vec![maintenance, suspended])
    );
    let statuses = service.get_all_agent_statuses();
    assert_eq!(statuses.len(), 8);
    assert_eq!(statuses[&registered].agent.state, AgentState::Registered);

    let metrics = service.get_lifecycle_metrics();
    assert_eq!(metrics.total_agents, 8);
    assert_eq!(metrics.operational_agents, 3);
    assert_eq!(metrics.available_agents, 2);
    assert_eq!(metrics.error_agents, 2);
    assert_eq!(metrics.maintenance_agents, 2);
    assert_eq!(
        metrics.state_distribution.get(&AgentState::Online),
        Some(&1)
    );
    assert_eq!(
        metrics.state_distribution.get(&AgentState::Registered),
        Some(&1)
    );
    assert_eq!(metrics.state_distribution.values().sum::<u64>(), 8);
}

type Log = Arc<Mutex<Vec<String>>>;

fn recorder(log: &Log, name: &'static str) -> Hook {
    let log = Arc::clone(log);
    Hook::sync(move |ctx: &TransitionContext| {
        log.lock().expect("log").push(format!(
            "{name}:{}:{}->{}:{}:{}:{}",
            ctx.phase.as_str(),
            ctx.from_state.map_or("none", |s| s.as_str()),
            ctx.to_state,
            ctx.reason,
            ctx.triggered_by,
            ctx.metadata
                .get("k")
                .map_or(String::new(), |v| v.to_string()),
        ));
        Ok(())
    })
}

/// Sync and async hooks run in registration order with the seed's
/// payload; pre before the commit, post after it (with sequence and
/// version); failing and panicking hooks are logged and counted and do
/// not stop the transition; only an explicit veto refuses it.
#[tokio::test]
async fn hooks_run_in_order_and_only_a_veto_refuses() {
    let service = service();
    let id = online(&service).await;
    let manager = service.get_manager(id).expect("manager");
    let log: Log = Arc::default();
    manager.on_event(HookPhase::PreTransition, recorder(&log, "sync-pre"));
    let async_log = Arc::clone(&log);
    manager.on_event(
        HookPhase::PreTransition,
        Hook::from_async(move |ctx: TransitionContext| {
            let log = Arc::clone(&async_log);
            async move {
                tokio::task::yield_now().await;
                log.lock()
                    .expect("log")
                    .push(format!("async-pre:{}", ctx.to_state));
                Ok(())
            }
        }),
    );
    manager.on_event(
        HookPhase::PreTransition,
        Hook::sync(|_| Err(HookError::Failed("flaky".into()))),
    );
    manager.on_event(HookPhase::PreTransition, Hook::sync(|_| panic!("hook bug")));
    manager.on_event(
        HookPhase::PreTransition,
        Hook::from_async(|_ctx: TransitionContext| async { panic!("async hook bug") }),
    );
    let seen_post: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let post = Arc::clone(&seen_post);
    manager.on_event(
        HookPhase::PostTransition,
        Hook::sync(move |ctx| {
            post.lock()
                .expect("post")
                .push((ctx.sequence.unwrap_or(0), ctx.version.unwrap_or(0)));
            Ok(())
        }),
    );
    service.on_event(HookPhase::PreTransition, recorder(&log, "global-pre"));

    let mut metadata = Metadata::new();
    metadata.insert("k".into(), serde_json::json!("v"));
    let record = manager
        .transition_to(AgentState::Maintenance, "window", "admin", metadata)
        .await
        .expect("hook failures never stop a transition");
    assert_eq!(
        *log.lock().expect("log"),
        vec![
            "sync-pre:pre_transition:online->maintenance:window:admin:\"v\"".to_string(),
            "async-pre:maintenance".to_string(),
            "global-pre:pre_transition:online->maintenance:window:admin:\"v\"".to_string(),
        ]
    );
    assert_eq!(
        *seen_post.lock().expect("post"),
        vec![(record.sequence, record.version)]
    );
    assert_eq!(service.hook_failures(), 3);
    assert_eq!(
        service.get_lifecycle_metrics().hook_failures,
        3,
        "GetLifecycleMetrics reads the same registry"
    );
    let text = service.metrics().encode_text();
    for line in [
        "agent_lifecycle_hook_failures_total{phase=\"pre_transition\"} 3",
        "agent_lifecycle_hook_failures_total{phase=\"post_transition\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }

    // An explicit veto refuses, records nothing and names the reason.
    let head = service.head_sequence();
    service.on_event(
        HookPhase::PreTransition,
        Hook::sync(|ctx| {
            if ctx.to_state == AgentState::Offline {
                Err(HookError::Veto("change freeze".into()))
            } else {
                Ok(())
            }
        }),
    );
    let err = manager
        .transition_to(AgentState::Offline, "", "", Metadata::new())
        .await
        .expect_err("vetoed");
    assert!(
        matches!(&err, Error::Transition(TransitionError::Vetoed { reason, .. }) if reason == "change freeze"),
        "{err}"
    );
    assert_eq!(service.head_sequence(), head);
    assert_eq!(manager.current_state(), AgentState::Maintenance);
}

/// Concurrent changes to one agent are linearizable: of 32 concurrent
/// assign_task calls on one ONLINE agent exactly one succeeds, and of 32
/// concurrent compare-and-set transitions at the same version exactly one
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_to_one_agent_are_linearizable() {
    let service = service();
    let id = online(&service).await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                service
                    .assign_task(id, None, ChangeRequest::default())
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        if task.await.expect("join").is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 1);
    let version = service.get_agent(id).expect("agent").version;
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let service = service.clone();
            let target = if i % 2 == 0 {
                AgentState::Idle
            } else {
                AgentState::Online
            };
            let change = ChangeRequest {
                expected_version: Some(version),
                ..Default::default()
            };
            tokio::spawn(async move { service.transition(id, target, change).await })
        })
        .collect();
    let mut ok = 0;
    let mut aborted = 0;
    for task in tasks {
        match task.await.expect("join") {
            Ok(_) => ok += 1,
            Err(Error::Transition(TransitionError::VersionMismatch { .. })) => aborted += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, aborted), (1, 31));
    assert_eq!(service.get_agent(id).expect("agent").version, version + 1);
}

/// Oversized and malformed input is refused naming the field, and nothing is
/// recorded.
#[tokio::test]
async fn limits_refuse_oversized_fields() {
    let service = service();
    let err = service
        .register_agent(Registration {
            name: "n".repeat(300),
            ..Default::default()
        })
        .await
        .expect_err("name too long");
    assert!(
        matches!(&err, Error::InvalidArgument(v) if v.field == "name"),
        "{err}"
    );
    let id = register(&service).await;
    let err = service
        .transition(
            id,
            AgentState::Deploying,
            ChangeRequest::because("r".repeat(5000)),
        )
        .await
        .expect_err("reason too long");
    assert!(
        matches!(&err, Error::InvalidArgument(v) if v.field == "reason"),
        "{err}"
    );
    assert_eq!(service.head_sequence(), 1);
}

/// A post-transition hook may change the same agent (here: recover from
/// ERROR at once); it runs after the agent's lock is released, so it does not
/// deadlock, and its own transition is recorded after the one that
/// triggered it.
#[tokio::test]
async fn post_hooks_may_transition_the_same_agent() {
    let service = service();
    let id = online(&service).await;
    let inner = service.clone();
    service.on_event(
        HookPhase::PostTransition,
        Hook::from_async(move |ctx: TransitionContext| {
            let service = inner.clone();
            async move {
                if ctx.to_state == AgentState::Error {
                    service
                        .transition(
                            ctx.agent_id,
                            AgentState::Online,
                            ChangeRequest::because("auto-recover"),
                        )
                        .await
                        .map_err(|e| HookError::Failed(e.to_string()))?;
                }
                Ok(())
            }
        }),
    );
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        service.handle_error(id, "crash", ChangeRequest::default()),
    )
    .await
    .expect("no deadlock")
    .expect("error recorded");
    assert_eq!(out.agent.state, AgentState::Error);
    let agent = service.get_agent(id).expect("agent");
    assert_eq!((agent.state, agent.version), (AgentState::Online, 7));
    assert_eq!(agent.last_transition.reason, "auto-recover");
    assert_eq!(service.hook_failures(), 0);
}

/// A veto of a registration names no current state and records nothing.
#[tokio::test]
async fn a_vetoed_registration_records_nothing() {
    let service = service();
    service.on_event(
        HookPhase::PreTransition,
        Hook::sync(|ctx| {
            if ctx.from_state.is_none() {
                Err(HookError::Veto("registrations closed".into()))
            } else {
                Ok(())
            }
        }),
    );
    let err = service
        .register_agent(Registration::default())
        .await
        .expect_err("vetoed");
    assert!(
        matches!(
            &err,
            Error::Transition(TransitionError::Vetoed {
                from: None,
                to: AgentState::Registered,
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(service.head_sequence(), 0);
    assert_eq!(service.get_lifecycle_metrics().total_agents, 0);
}
