//! Every RPC of the contract over a real server: results, codes and the
//! google.rpc error details.

use crate::common;

use std::collections::HashSet;

use agent_lifecycle::api::grpc::pb::{self, AgentState as S};
use common::{Client, TestServer, online, register, transition};
use tonic::Code;
use tonic_types::StatusExt;

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

fn bad_field(status: &tonic::Status) -> String {
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default()
}

async fn head(client: &mut Client) -> u64 {
    client
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default())
        .await
        .expect("metrics")
        .into_inner()
        .head_sequence
}

/// Registration returns the agent in REGISTERED at version 1 with its
/// registration transition; a repeat is idempotent; after a move it is
/// ALREADY_EXISTS. GetAgent shows flags, valid transitions and history count.
#[tokio::test]
async fn register_and_get_agent() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let id = uuid::Uuid::new_v4().to_string();
    let request = pb::RegisterAgentRequest {
        agent_id: id.clone(),
        name: "alpha".into(),
        labels: [("team".to_string(), "ml".to_string())].into(),
        reason: "new".into(),
        triggered_by: "ci".into(),
        metadata: None,
        request_id: String::new(),
    };
    let first = client
        .register_agent(request.clone())
        .await
        .expect("register")
        .into_inner();
    let agent = first.agent.expect("agent");
    assert_eq!(agent.agent_id, id);
    assert_eq!(agent.state, S::Registered as i32);
    assert_eq!(agent.version, 1);
    assert_eq!(first.transitions.len(), 1);
    let t = &first.transitions[0];
    assert_eq!(
        (t.from_state, t.to_state),
        (S::Unspecified as i32, S::Registered as i32)
    );
    assert_eq!(
        (t.reason.as_str(), t.triggered_by.as_str(), t.version),
        ("new", "ci", 1)
    );
    assert!(t.sequence > 0 && t.timestamp.is_some());

    let again = client
        .register_agent(request.clone())
        .await
        .expect("idempotent")
        .into_inner();
    assert!(again.transitions.is_empty());
    assert_eq!(again.agent.expect("agent").version, 1);

    // No id: the server generates one.
    let generated = client
        .register_agent(pb::RegisterAgentRequest::default())
        .await
        .expect("register")
        .into_inner()
        .agent
        .expect("agent");
    assert!(uuid::Uuid::parse_str(&generated.agent_id).is_ok());

    client
        .deploy_agent(pb::DeployAgentRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("deploy");
    let err = client.register_agent(request).await.expect_err("exists");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(reason(&err), "AGENT_ALREADY_EXISTS");

    let got = common::get_agent(&mut client, &id).await;
    assert_eq!(got.state, S::Deployed as i32);
    assert_eq!(got.version, 3);
    assert_eq!(got.history_count, 3);
    assert_eq!(got.name, "alpha");
    assert_eq!(got.labels.get("team").map(String::as_str), Some("ml"));
    assert_eq!(
        got.valid_transitions,
        vec![S::Starting as i32, S::Updating as i32, S::Deleted as i32]
    );
    assert!(
        !got.is_operational
            && !got.is_available_for_tasks
            && !got.is_in_error_state
            && !got.is_in_maintenance
    );
    assert_eq!(
        got.last_transition.expect("last").to_state,
        S::Deployed as i32
    );
    assert!(got.created_at.is_some() && got.updated_at.is_some());
}

/// Each high-level RPC applies its transitions and returns them in order.
#[tokio::test]
async fn high_level_operations() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let agent = online(&mut c, &[]).await;
    let id = agent.agent_id.clone();
    assert_eq!(agent.state, S::Online as i32);
    assert_eq!(agent.version, 5);

    let r = c
        .assign_task(pb::AssignTaskRequest {
            agent_id: id.clone(),
            task_id: "t1".into(),
            ..Default::default()
        })
        .await
        .expect("assign")
        .into_inner();
    assert_eq!(r.agent.expect("agent").state, S::Busy as i32);
    let meta = r.transitions[0].metadata.clone().expect("metadata");
    assert!(meta.fields.contains_key("task_id"));
    let r = c
        .complete_task(pb::CompleteTaskRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("complete")
        .into_inner();
    assert_eq!(r.agent.expect("agent").state, S::Idle as i32);
    let r = c
        .handle_error(pb::HandleErrorRequest {
            agent_id: id.clone(),
            error_message: "oom".into(),
            ..Default::default()
        })
        .await
        .expect("error")
        .into_inner();
    assert_eq!(r.transitions[0].reason, "Error: oom");
    assert!(r.agent.expect("agent").is_in_error_state);
    let r = c
        .put_in_maintenance(pb::PutInMaintenanceRequest {
            agent_id: id.clone(),
            reason: "patch".into(),
            ..Default::default()
        })
        .await
        .expect("maintenance")
        .into_inner();
    assert_eq!(r.transitions[0].reason, "patch");
    let r = c
        .resume_from_maintenance(pb::ResumeFromMaintenanceRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    assert_eq!(r.agent.expect("agent").state, S::Online as i32);
    let r = c
        .stop_agent(pb::StopAgentRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("stop")
        .into_inner();
    let states: Vec<_> = r.transitions.iter().map(|t| t.to_state).collect();
    assert_eq!(states, vec![S::Stopping as i32, S::Offline as i32]);
    assert_eq!(r.transitions[1].sequence, r.transitions[0].sequence + 1);
    assert_eq!(r.agent.expect("agent").version, 12);

    // Operations in the wrong state: FAILED_PRECONDITION naming the state.
    let err = c
        .assign_task(pb::AssignTaskRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("offline is not available");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "TRANSITION_NOT_ALLOWED");
    let violation = err
        .get_details_precondition_failure()
        .expect("precondition failure");
    assert!(
        violation.violations[0].description.contains("offline"),
        "{violation:?}"
    );
    for err in [
        c.complete_task(pb::CompleteTaskRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("not busy"),
        c.resume_from_maintenance(pb::ResumeFromMaintenanceRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("not in maintenance"),
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition);
    }
}

/// TransitionAgent: allowed moves commit, refused ones are
/// FAILED_PRECONDITION naming the current state and the allowed targets,
/// expected_version mismatches are ABORTED, unknown agents NOT_FOUND; none of
/// them records anything.
#[tokio::test]
async fn transition_agent_codes_and_details() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let agent = register(&mut c, &[]).await;
    let id = agent.agent_id.clone();
    let before = head(&mut c).await;

    let err = transition(&mut c, &id, S::Online)
        .await
        .expect_err("not allowed");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "TRANSITION_NOT_ALLOWED");
    assert!(
        err.message().contains("registered") && err.message().contains("deploying, deleted"),
        "{}",
        err.message()
    );
    let info = err.get_details_error_info().expect("error info");
    assert_eq!(info.domain, "agentlifecycle.v1");
    assert_eq!(
        info.metadata.get("current_state").map(String::as_str),
        Some("registered")
    );
    assert_eq!(
        info.metadata.get("allowed_targets").map(String::as_str),
        Some("deploying,deleted")
    );
    let pf = err
        .get_details_precondition_failure()
        .expect("precondition failure");
    assert_eq!(pf.violations[0].subject, format!("agents/{id}"));

    let err = c
        .transition_agent(pb::TransitionAgentRequest {
            agent_id: id.clone(),
            target_state: S::Deploying as i32,
            expected_version: Some(7),
            ..Default::default()
        })
        .await
        .expect_err("version mismatch");
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(reason(&err), "VERSION_MISMATCH");
    assert_eq!(head(&mut c).await, before, "refusals record nothing");

    let ok = c
        .transition_agent(pb::TransitionAgentRequest {
            agent_id: id.clone(),
            target_state: S::Deploying as i32,
            expected_version: Some(1),
            reason: "go".into(),
            triggered_by: "ci".into(),
            metadata: Some(prost_types::Struct {
                fields: [(
                    "n".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::NumberValue(2.5)),
                    },
                )]
                .into(),
            }),
            request_id: String::new(),
        })
        .await
        .expect("cas transition")
        .into_inner();
    let t = &ok.transitions[0];
    assert_eq!((t.version, t.sequence), (2, before + 1));
    assert_eq!(t.metadata.as_ref().expect("metadata").fields.len(), 1);

    let unknown = uuid::Uuid::new_v4().to_string();
    let err = transition(&mut c, &unknown, S::Deploying)
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "AGENT_NOT_FOUND");
    let err = c
        .get_agent(pb::GetAgentRequest {
            agent_id: unknown.clone(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: unknown,
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}

/// Malformed input anywhere is INVALID_ARGUMENT with a BadRequest naming the
/// field, and changes nothing.
#[tokio::test]
async fn malformed_input_is_invalid_argument_naming_the_field() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let agent = register(&mut c, &[]).await;
    let id = agent.agent_id.clone();
    let before = head(&mut c).await;
    let big = |n: usize| "x".repeat(n);
    let nan = prost_types::Struct {
        fields: [(
            "x".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
            },
        )]
        .into(),
    };
    let huge_meta = prost_types::Struct {
        fields: [(
            "x".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(big(20_000))),
            },
        )]
        .into(),
    };
    let tr = |f: &dyn Fn(&mut pb::TransitionAgentRequest)| {
        let mut r = pb::TransitionAgentRequest {
            agent_id: id.clone(),
            target_state: S::Deploying as i32,
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let cases: Vec<(pb::TransitionAgentRequest, &str)> = vec![
        (tr(&|r| r.agent_id = "not-a-uuid".into()), "agent_id"),
        (tr(&|r| r.agent_id = String::new()), "agent_id"),
        (tr(&|r| r.target_state = 0), "target_state"),
        (tr(&|r| r.target_state = 99), "target_state"),
        (tr(&|r| r.reason = big(1025)), "reason"),
        (tr(&|r| r.triggered_by = big(257)), "triggered_by"),
        (tr(&|r| r.metadata = Some(nan.clone())), "metadata"),
        (tr(&|r| r.metadata = Some(huge_meta.clone())), "metadata"),
    ];
    for (request, field) in cases {
        let err = c.transition_agent(request).await.expect_err("invalid");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert_eq!(bad_field(&err), field, "{}", err.message());
        assert_eq!(reason(&err), "INVALID_ARGUMENT");
        assert!(err.message().contains(field));
    }

    let labels: std::collections::HashMap<_, _> = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let err = c
        .register_agent(pb::RegisterAgentRequest {
            labels,
            ..Default::default()
        })
        .await
        .expect_err("too many labels");
    assert_eq!(
        (err.code(), bad_field(&err)),
        (Code::InvalidArgument, "labels".to_string())
    );
    let err = c
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "zzz".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad id");
    assert_eq!(bad_field(&err), "agent_id");
    let err = c
        .handle_error(pb::HandleErrorRequest {
            agent_id: id.clone(),
            error_message: big(2000),
            ..Default::default()
        })
        .await
        .expect_err("long message");
    assert_eq!(bad_field(&err), "error_message");
    // The message becomes the reason "Error: <message>": 1017 bytes fit,
    // 1018 are refused naming error_message (the request has no reason).
    let err = c
        .handle_error(pb::HandleErrorRequest {
            agent_id: id.clone(),
            error_message: big(1018),
            ..Default::default()
        })
        .await
        .expect_err("one byte too long");
    assert_eq!(bad_field(&err), "error_message");
    let err = c
        .handle_error(pb::HandleErrorRequest {
            agent_id: id.clone(),
            error_message: big(1017),
            ..Default::default()
        })
        .await
        .expect_err("valid, but REGISTERED cannot go to ERROR");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .list_agents(pb::ListAgentsRequest {
            labels: [(String::new(), "v".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect_err("empty label key");
    assert_eq!(bad_field(&err), "labels");
    let err = c
        .assign_task(pb::AssignTaskRequest {
            agent_id: id.clone(),
            task_id: big(300),
            ..Default::default()
        })
        .await
        .expect_err("long task id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .list_agents(pb::ListAgentsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(bad_field(&err), "page_token");
    let err = c
        .list_agents(pb::ListAgentsRequest {
            states: vec![0],
            ..Default::default()
        })
        .await
        .expect_err("unspecified state filter");
    assert_eq!(bad_field(&err), "states");
    let err = c
        .list_agents(pb::ListAgentsRequest {
            category: 42,
            ..Default::default()
        })
        .await
        .expect_err("unknown category");
    assert_eq!(bad_field(&err), "category");
    let err = c
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            page_token: "agents.v1.0".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(bad_field(&err), "page_token");
    for (request, field) in [
        (
            pb::WatchEventsRequest {
                agent_ids: vec!["nope".into()],
                ..Default::default()
            },
            "agent_ids",
        ),
        (
            pb::WatchEventsRequest {
                event_types: vec![0],
                ..Default::default()
            },
            "event_types",
        ),
        (
            pb::WatchEventsRequest {
                states: vec![77],
                ..Default::default()
            },
            "states",
        ),
        (
            pb::WatchEventsRequest {
                include_snapshot: true,
                start_sequence: 1,
                ..Default::default()
            },
            "include_snapshot",
        ),
    ] {
        let err = c.watch_events(request).await.expect_err("invalid watch");
        assert_eq!(
            (err.code(), bad_field(&err)),
            (Code::InvalidArgument, field.to_string())
        );
    }
    // A request over the 1 MiB message limit is refused before decoding.
    let err = c
        .register_agent(pb::RegisterAgentRequest {
            name: big(2 * 1024 * 1024),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_ne!(err.code(), Code::Ok);
    assert_eq!(head(&mut c).await, before, "nothing was applied");
    let got = common::get_agent(&mut c, &id).await;
    assert_eq!(got.version, 1);
}

/// ListAgents filters by state, category and labels, pages with an opaque
/// token, and never lists an agent twice while others register and change.
#[tokio::test]
async fn list_agents_filters_and_pages_without_duplicates() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut ids = HashSet::new();
    for i in 0..120 {
        let team = if i % 2 == 0 { "even" } else { "odd" };
        let agent = register(&mut c, &[("team", team)]).await;
        ids.insert(agent.agent_id);
    }
    let busy = online(&mut c, &[("team", "even")]).await;
    c.assign_task(pb::AssignTaskRequest {
        agent_id: busy.agent_id.clone(),
        ..Default::default()
    })
    .await
    .expect("assign");
    ids.insert(busy.agent_id.clone());

    // Page through everything while more agents register and others move.
    let mut seen = HashSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_agents(pb::ListAgentsRequest {
                page_size: 25,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        pages += 1;
        for agent in &page.agents {
            assert!(
                seen.insert(agent.agent_id.clone()),
                "listed twice: {}",
                agent.agent_id
            );
        }
        register(&mut c, &[("team", "late")]).await;
        if let Some(first) = page.agents.first() {
            let _ = transition(&mut c, &first.agent_id, S::Deploying).await;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 100, "paging terminates");
    }
    assert!(
        ids.is_subset(&seen),
        "every agent that existed before the listing is listed"
    );

    let list = |states: Vec<i32>, category: pb::AgentCategory, labels: &[(&str, &str)]| {
        pb::ListAgentsRequest {
            states,
            category: category as i32,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            page_size: 1000,
            page_token: String::new(),
            as_of: None,
        }
    };
    let busy_only = c
        .list_agents(list(
            vec![S::Busy as i32],
            pb::AgentCategory::Unspecified,
            &[],
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(busy_only.agents.len(), 1);
    assert_eq!(busy_only.agents[0].agent_id, busy.agent_id);
    let operational = c
        .list_agents(list(
            vec![],
            pb::AgentCategory::Operational,
            &[("team", "even")],
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(operational.agents.len(), 1);
    let available = c
        .list_agents(list(vec![], pb::AgentCategory::Available, &[]))
        .await
        .expect("list")
        .into_inner();
    assert!(available.agents.is_empty());
    let odd = c
        .list_agents(list(
            vec![],
            pb::AgentCategory::Unspecified,
            &[("team", "odd")],
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(odd.agents.len(), 60);
    assert!(odd.next_page_token.is_empty());
}

/// GetAgentHistory: oldest first, `limit` keeps the newest N, pages follow
/// the token, total_count counts everything retained.
#[tokio::test]
async fn history_limits_and_pages() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let agent = online(&mut c, &[]).await;
    let id = agent.agent_id.clone();
    for _ in 0..10 {
        transition(&mut c, &id, S::Idle).await.expect("idle");
        transition(&mut c, &id, S::Online).await.expect("online");
    }
    let all = c
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(all.total_count, 25);
    assert_eq!(all.transitions.len(), 25);
    assert!(all.next_page_token.is_empty());
    assert!(
        all.transitions
            .windows(2)
            .all(|w| w[0].sequence < w[1].sequence && w[0].version + 1 == w[1].version)
    );

    let newest = c
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            limit: 4,
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(
        newest
            .transitions
            .iter()
            .map(|t| t.version)
            .collect::<Vec<_>>(),
        vec![22, 23, 24, 25]
    );

    let mut versions = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .get_agent_history(pb::GetAgentHistoryRequest {
                agent_id: id.clone(),
                page_size: 7,
                page_token: token.clone(),
                limit: 20,
            })
            .await
            .expect("page")
            .into_inner();
        assert!(page.transitions.len() <= 7);
        versions.extend(page.transitions.iter().map(|t| t.version));
        // New transitions during paging do not extend the listing.
        transition(
            &mut c,
            &id,
            if versions.len() % 2 == 0 {
                S::Idle
            } else {
                S::Online
            },
        )
        .await
        .ok();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(versions, (6..=25).collect::<Vec<_>>());
}

/// Metrics count the fleet by category and state; the rules are the design
/// table.
#[tokio::test]
async fn metrics_and_rules() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    register(&mut c, &[]).await;
    let a = online(&mut c, &[]).await;
    c.handle_error(pb::HandleErrorRequest {
        agent_id: a.agent_id.clone(),
        error_message: "x".into(),
        ..Default::default()
    })
    .await
    .expect("error");
    online(&mut c, &[]).await;
    let m = c
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default())
        .await
        .expect("metrics")
        .into_inner();
    assert_eq!(
        (
            m.total_agents,
            m.operational_agents,
            m.available_agents,
            m.error_agents,
            m.maintenance_agents
        ),
        (3, 1, 1, 1, 0)
    );
    assert_eq!(m.state_distribution.get("online"), Some(&1));
    assert_eq!(m.state_distribution.get("registered"), Some(&1));
    assert_eq!(m.state_distribution.get("error"), Some(&1));
    assert_eq!(m.head_sequence, 1 + 5 + 1 + 5);

    let rules = c
        .get_transition_rules(pb::GetTransitionRulesRequest {})
        .await
        .expect("rules")
        .into_inner()
        .rules;
    assert_eq!(rules.len(), 18);
    assert_eq!(rules[0].from_state, S::Registered as i32);
    assert_eq!(
        rules[0].allowed_targets,
        vec![S::Deploying as i32, S::Deleted as i32]
    );
    assert!(rules[17].allowed_targets.is_empty());
    assert_eq!(
        rules.iter().map(|r| r.allowed_targets.len()).sum::<usize>(),
        66
    );
}

/// grpc.health.v1 reports SERVING for "" and the lifecycle service; server
/// reflection lists the services.
#[tokio::test]
async fn health_and_reflection() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "agentlifecycle.v1.AgentLifecycleService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = tokio::time::timeout(common::STEP, stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"agentlifecycle.v1.AgentLifecycleService"),
        "{names:?}"
    );
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

/// Concurrent requests on one agent never both succeed from the same prior
/// state: of 64 concurrent AssignTask calls exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transitions_on_one_agent_are_linearizable() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let agent = online(&mut c, &[]).await;
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let mut c = c.clone();
            let id = agent.agent_id.clone();
            tokio::spawn(async move {
                c.assign_task(pb::AssignTaskRequest {
                    agent_id: id,
                    ..Default::default()
                })
                .await
            })
        })
        .collect();
    let mut codes = Vec::new();
    for call in calls {
        codes.push(call.await.expect("join").map(|_| ()).map_err(|e| e.code()));
    }
    assert_eq!(codes.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        codes
            .iter()
            .filter_map(|r| r.err())
            .all(|c| c == Code::FailedPrecondition)
    );
    let history = c
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: agent.agent_id.clone(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(
        history
            .transitions
            .iter()
            .filter(|t| t.to_state == S::Busy as i32)
            .count(),
        1
    );
}
