//! Hostile typed requests: oversized messages and fields, unknown enums,
//! malformed ids.

use super::*;

/// Messages over 1 MiB (on the generated server's path, the WatchEvents
/// path and in a client stream) get OUT_OF_RANGE; fields over their
/// limits, thousands of labels and non-finite numbers get INVALID_ARGUMENT
/// naming the field; 64 labels are accepted.
#[tokio::test]
pub(super) async fn oversized_messages_and_fields_are_refused() {
    let (server, mut client, bystanders, target) = hostile_setup().await;
    let id = target.agent_id.clone();
    let mut checks = Checks::default();

    let huge = "r".repeat(MAX_REQUEST_BYTES);
    let over_limit = vec![
        (
            "RegisterAgent with a 1 MiB name",
            rpc!(client.register_agent(pb::RegisterAgentRequest {
                name: huge.clone(),
                ..Default::default()
            })),
        ),
        (
            "TransitionAgent with a 1 MiB reason",
            rpc!(client.transition_agent(pb::TransitionAgentRequest {
                agent_id: id.clone(),
                target_state: S::Maintenance as i32,
                reason: huge.clone(),
                ..Default::default()
            })),
        ),
        (
            "WatchEvents of 30000 agents (1.1 MB)",
            rpc!(client.watch_events(pb::WatchEventsRequest {
                agent_ids: many_ids(30_000),
                ..Default::default()
            })),
        ),
        (
            "HeartbeatStream with a 1 MiB message",
            rpc!(
                client.heartbeat_stream(tokio_stream::iter(vec![pb::HeartbeatRequest {
                    agent_id: id.clone(),
                    current_task: huge.clone(),
                    ..Default::default()
                }]))
            ),
        ),
    ];
    for (what, call) in over_limit {
        let answer = timed(what, call).await;
        checks.code(what, answer, Code::OutOfRange);
    }

    let almost = "r".repeat(MAX_REQUEST_BYTES - 1024);
    let mut calls: Vec<(String, Call, &str)> = vec![
        (
            "TransitionAgent with a 1023 KiB reason".into(),
            rpc!(client.transition_agent(pb::TransitionAgentRequest {
                agent_id: id.clone(),
                target_state: S::Maintenance as i32,
                reason: almost.clone(),
                ..Default::default()
            })),
            "reason",
        ),
        (
            "HandleError with a 1023 KiB message".into(),
            rpc!(client.handle_error(pb::HandleErrorRequest {
                agent_id: id.clone(),
                error_message: almost.clone(),
                ..Default::default()
            })),
            "error_message",
        ),
        (
            "HandleError with a 1018-byte message".into(),
            rpc!(client.handle_error(pb::HandleErrorRequest {
                agent_id: id.clone(),
                error_message: "e".repeat(1018),
                ..Default::default()
            })),
            "error_message",
        ),
        (
            "StopAgent with a 257-byte triggered_by".into(),
            rpc!(client.stop_agent(pb::StopAgentRequest {
                agent_id: id.clone(),
                triggered_by: "t".repeat(257),
                ..Default::default()
            })),
            "triggered_by",
        ),
        (
            "AssignTask with a 257-byte task_id".into(),
            rpc!(client.assign_task(pb::AssignTaskRequest {
                agent_id: id.clone(),
                task_id: "t".repeat(257),
                ..Default::default()
            })),
            "task_id",
        ),
        (
            "RegisterAgent with a 257-byte name".into(),
            rpc!(client.register_agent(pb::RegisterAgentRequest {
                name: "n".repeat(257),
                ..Default::default()
            })),
            "name",
        ),
        (
            "PutInMaintenance with 2000 metadata keys".into(),
            rpc!(client.put_in_maintenance(pb::PutInMaintenanceRequest {
                agent_id: id.clone(),
                metadata: Some(oversized_metadata()),
                ..Default::default()
            })),
            "metadata",
        ),
        (
            "PutInMaintenance with NaN in metadata".into(),
            rpc!(
                client.put_in_maintenance(pb::PutInMaintenanceRequest {
                    agent_id: id.clone(),
                    metadata: Some(Struct {
                        fields: [(
                            "x".to_string(),
                            Value {
                                kind: Some(Kind::NumberValue(f64::NAN)),
                            }
                        )]
                        .into(),
                    }),
                    ..Default::default()
                })
            ),
            "metadata",
        ),
        (
            "SyncExternalStatus with 2000 metadata keys".into(),
            rpc!(client.sync_external_status(pb::SyncExternalStatusRequest {
                agent_id: id.clone(),
                source: "docker".into(),
                status: "running".into(),
                metadata: Some(oversized_metadata()),
            })),
            "metadata",
        ),
        (
            "Heartbeat with a 100 KB current_task".into(),
            rpc!(client.heartbeat(pb::HeartbeatRequest {
                agent_id: id.clone(),
                current_task: "t".repeat(100_000),
                ..Default::default()
            })),
            "current_task",
        ),
    ];
    for load in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let call = rpc!(client.heartbeat(pb::HeartbeatRequest {
            agent_id: id.clone(),
            load: Some(load),
            ..Default::default()
        }));
        calls.push((format!("Heartbeat with load {load}"), call, "load"));
    }
    let long_source = "s".repeat(100_000);
    let long_status = "s".repeat(100_000);
    for (source, status, field) in [
        ("", "running", "source"),
        ("aws", "running", "source"),
        (long_source.as_str(), "running", "source"),
        ("docker", "", "status"),
        ("docker", "   ", "status"),
        ("docker", long_status.as_str(), "status"),
    ] {
        let call = rpc!(client.sync_external_status(pb::SyncExternalStatusRequest {
            agent_id: id.clone(),
            source: source.into(),
            status: status.into(),
            metadata: None,
        }));
        let what = format!(
            "SyncExternalStatus {:?} {:?}",
            truncated(source),
            truncated(status)
        );
        calls.push((what, call, field));
    }
    let bad_labels = [
        ("5000 labels", labels(5000)),
        ("65 labels", labels(65)),
        ("an empty key", HashMap::from([(String::new(), "v".into())])),
        (
            "a 129-byte key",
            HashMap::from([("k".repeat(129), "v".into())]),
        ),
        (
            "a 100 KB key",
            HashMap::from([("k".repeat(100_000), "v".into())]),
        ),
        (
            "a 257-byte value",
            HashMap::from([("k".into(), "v".repeat(257))]),
        ),
    ];
    for (what, labels) in bad_labels {
        let register = rpc!(client.register_agent(pb::RegisterAgentRequest {
            labels: labels.clone(),
            ..Default::default()
        }));
        calls.push((format!("RegisterAgent with {what}"), register, "labels"));
        let list = rpc!(client.list_agents(pb::ListAgentsRequest {
            labels: labels.clone(),
            ..Default::default()
        }));
        calls.push((format!("ListAgents filtering on {what}"), list, "labels"));
        let watch = rpc!(client.watch_events(pb::WatchEventsRequest {
            labels,
            ..Default::default()
        }));
        calls.push((format!("WatchEvents filtering on {what}"), watch, "labels"));
    }
    expect_invalid(&mut checks, calls).await;

    let answer = timed(
        "RegisterAgent with 64 labels",
        client.register_agent(pb::RegisterAgentRequest {
            labels: labels(64),
            ..Default::default()
        }),
    )
    .await;
    if let Some(response) = checks.code("RegisterAgent with 64 labels", answer, Code::Ok) {
        let agent = response.into_inner().agent.expect("agent");
        checks.check(
            "RegisterAgent with 64 labels",
            agent.labels == labels(64),
            "other labels",
        );
    }
    hostile_teardown(server, &mut client, &bystanders, &target, checks).await;
}

/// Unknown and UNSPECIFIED enum numbers, ids that are not UUIDs (for every
/// RPC that takes one, and in watch filters), too many watched ids and
/// contradictory watch options get INVALID_ARGUMENT naming the field;
/// well-formed unknown ids get NOT_FOUND; a start sequence past the head
/// gets OUT_OF_RANGE.
#[tokio::test]
pub(super) async fn unknown_enums_and_malformed_ids_are_invalid_arguments() {
    let (server, mut client, bystanders, target) = hostile_setup().await;
    let id = target.agent_id.clone();
    let mut checks = Checks::default();
    let mut calls: Vec<(String, Call, &str)> = Vec::new();

    for number in [0, 19, 99, -1, i32::MAX, i32::MIN] {
        let call = rpc!(client.transition_agent(pb::TransitionAgentRequest {
            agent_id: id.clone(),
            target_state: number,
            ..Default::default()
        }));
        calls.push((
            format!("TransitionAgent to state {number}"),
            call,
            "target_state",
        ));
        let call = rpc!(client.list_agents(pb::ListAgentsRequest {
            states: vec![S::Online as i32, number],
            ..Default::default()
        }));
        calls.push((
            format!("ListAgents in states [5, {number}]"),
            call,
            "states",
        ));
        let call = rpc!(client.watch_events(pb::WatchEventsRequest {
            states: vec![number],
            ..Default::default()
        }));
        calls.push((format!("WatchEvents of states [{number}]"), call, "states"));
    }
    for number in [5, 99, -1, i32::MAX, i32::MIN] {
        let call = rpc!(client.list_agents(pb::ListAgentsRequest {
            category: number,
            ..Default::default()
        }));
        calls.push((format!("ListAgents in category {number}"), call, "category"));
    }
    for number in [0, 3, -1, i32::MAX] {
        let call = rpc!(client.watch_events(pb::WatchEventsRequest {
            event_types: vec![number],
            ..Default::default()
        }));
        calls.push((
            format!("WatchEvents of event types [{number}]"),
            call,
            "event_types",
        ));
    }

    let not_ids = [
        "not-a-uuid".to_string(),
        "../../../etc/passwd".into(),
        "' OR '1'='1".into(),
        "6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2d1".into(),
        "6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2d11x".into(),
        "6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2dzz".into(),
        "\u{0}".into(),
        "\u{1f980}\u{1f980}".into(),
        "a".repeat(300),
        "a".repeat(5_000),
        "a".repeat(100_000),
    ];
    let takes_id: Vec<Method> = methods()
        .into_iter()
        .filter(|m| m.input.field.iter().any(|f| f.name() == "agent_id"))
        .collect();
    for method in &takes_id {
        for not_id in not_ids.iter().map(String::as_str).chain(["", "   "]) {
            // An empty id means "any" (a new id, every agent's trail).
            if matches!(method.name.as_str(), "RegisterAgent" | "ListTransitions")
                && not_id.is_empty()
            {
                continue;
            }
            let what = format!("{} with agent_id {:?}", method.name, truncated(not_id));
            calls.push((
                what,
                call_with_agent_id(&client, &method.name, not_id),
                "agent_id",
            ));
        }
    }
    for not_id in &not_ids {
        let call = rpc!(client.watch_events(pb::WatchEventsRequest {
            agent_ids: vec![id.clone(), not_id.clone()],
            ..Default::default()
        }));
        calls.push((
            format!("WatchEvents of agent {:?}", truncated(not_id)),
            call,
            "agent_ids",
        ));
    }
    let call = rpc!(client.watch_events(pb::WatchEventsRequest {
        agent_ids: many_ids(1001),
        ..Default::default()
    }));
    calls.push(("WatchEvents of 1001 agents".into(), call, "agent_ids"));
    let call = rpc!(client.watch_events(pb::WatchEventsRequest {
        include_snapshot: true,
        start_sequence: 1,
        ..Default::default()
    }));
    calls.push((
        "WatchEvents with a snapshot and a start sequence".into(),
        call,
        "include_snapshot",
    ));
    expect_invalid(&mut checks, calls).await;

    for method in &takes_id {
        let unknown = uuid::Uuid::new_v4().to_string();
        let answer = timed(
            &method.name,
            call_with_agent_id(&client, &method.name, &unknown),
        )
        .await;
        let expected = match method.name.as_str() {
            "RegisterAgent" | "ListTransitions" => Code::Ok,
            _ => Code::NotFound,
        };
        checks.code(
            &format!("{} with an unknown id", method.name),
            answer,
            expected,
        );
    }
    let answer = timed(
        "WatchEvents from 2^64-1",
        rpc!(client.watch_events(pb::WatchEventsRequest {
            start_sequence: u64::MAX,
            ..Default::default()
        })),
    )
    .await;
    checks.code("WatchEvents from sequence 2^64-1", answer, Code::OutOfRange);
    hostile_teardown(server, &mut client, &bystanders, &target, checks).await;
}
