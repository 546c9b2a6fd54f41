//! What the typed-request attacks share: the checks that collect what is
//! wrong with the answers, and the set-up of a server with bystanders.

use super::*;

// ---------------------------------------------------------------------------
// Hostile typed requests

/// Collects what is wrong with the answers, so that one run shows all.
#[derive(Default)]
pub(super) struct Checks(pub(super) Vec<String>);

impl Checks {
    /// INVALID_ARGUMENT, with ErrorInfo (reason INVALID_ARGUMENT, domain
    /// agentlifecycle.v1, metadata `field`) and a BadRequest naming `field`.
    pub(super) fn invalid<T>(&mut self, what: &str, result: Result<T, Status>, field: &str) {
        let status = match result {
            Ok(_) => {
                return self
                    .0
                    .push(format!("{what}: OK, expected INVALID_ARGUMENT ({field})"));
            }
            Err(status) => status,
        };
        if status.code() != Code::InvalidArgument {
            return self.0.push(format!(
                "{what}: {:?} {:?}, expected INVALID_ARGUMENT ({field})",
                status.code(),
                truncated(status.message())
            ));
        }
        let info = status.get_details_error_info();
        let info_field = info.as_ref().and_then(|i| i.metadata.get("field"));
        let reason = info
            .as_ref()
            .map(|i| (i.reason.as_str(), i.domain.as_str()));
        let violations: Vec<String> = status
            .get_details_bad_request()
            .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default();
        if reason != Some(("INVALID_ARGUMENT", "agentlifecycle.v1"))
            || info_field.map(String::as_str) != Some(field)
            || violations != [field]
        {
            self.0.push(format!(
                "{what}: INVALID_ARGUMENT without the details naming {field}: ErrorInfo {info:?}, BadRequest fields {violations:?}"
            ));
        }
    }

    /// Exactly `code` (OK included).
    pub(super) fn code<T>(
        &mut self,
        what: &str,
        result: Result<T, Status>,
        code: Code,
    ) -> Option<T> {
        match result {
            Ok(value) if code == Code::Ok => return Some(value),
            Ok(_) => self.0.push(format!("{what}: OK, expected {code:?}")),
            Err(status) if status.code() == code => {}
            Err(status) => self.0.push(format!(
                "{what}: {:?} {:?}, expected {code:?}",
                status.code(),
                truncated(status.message())
            )),
        }
        None
    }

    pub(super) fn check(&mut self, what: &str, ok: bool, detail: impl std::fmt::Display) {
        if !ok {
            self.0.push(format!("{what}: {detail}"));
        }
    }

    pub(super) fn assert_none(&self, server: &ServerProcess) {
        assert!(
            self.0.is_empty(),
            "{} wrong answers:\n{}{}",
            self.0.len(),
            self.0.join("\n"),
            server.log()
        );
    }
}

/// `text`, or its start and end when it is long.
pub(super) fn truncated(text: &str) -> String {
    const KEEP: usize = 60;
    if text.len() <= 2 * KEEP + 20 {
        return text.to_string();
    }
    let mut head = KEEP;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - KEEP;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}...({} bytes)...{}",
        &text[..head],
        text.len(),
        &text[tail..]
    )
}

/// An RPC call without its response.
pub(super) type Call = futures_util::future::BoxFuture<'static, Result<(), Status>>;

/// `rpc!(client.method(request))`: the call on a clone of the client, as a
/// [`Call`].
macro_rules! rpc {
    ($client:ident . $rpc:ident ( $request:expr )) => {{
        let mut client = $client.clone();
        let request = $request;
        Box::pin(async move { client.$rpc(request).await.map(drop) }) as Call
    }};
}

/// Runs each call; each must be INVALID_ARGUMENT naming its field.
pub(super) async fn expect_invalid(checks: &mut Checks, calls: Vec<(String, Call, &str)>) {
    for (what, call, field) in calls {
        let answer = timed(&what, call).await;
        checks.invalid(&what, answer, field);
    }
}

/// `method` (an RPC whose request has `agent_id`) with `agent_id` and
/// otherwise valid fields.
pub(super) fn call_with_agent_id(client: &Client, method: &str, agent_id: &str) -> Call {
    let agent_id = agent_id.to_string();
    match method {
        "RegisterAgent" => rpc!(client.register_agent(pb::RegisterAgentRequest {
            agent_id,
            ..Default::default()
        })),
        "TransitionAgent" => rpc!(client.transition_agent(pb::TransitionAgentRequest {
            agent_id,
            target_state: S::Maintenance as i32,
            ..Default::default()
        })),
        "DeployAgent" => rpc!(client.deploy_agent(pb::DeployAgentRequest {
            agent_id,
            ..Default::default()
        })),
        "StartAgent" => rpc!(client.start_agent(pb::StartAgentRequest {
            agent_id,
            ..Default::default()
        })),
        "StopAgent" => rpc!(client.stop_agent(pb::StopAgentRequest {
            agent_id,
            ..Default::default()
        })),
        "AssignTask" => rpc!(client.assign_task(pb::AssignTaskRequest {
            agent_id,
            ..Default::default()
        })),
        "CompleteTask" => rpc!(client.complete_task(pb::CompleteTaskRequest {
            agent_id,
            ..Default::default()
        })),
        "HandleError" => rpc!(client.handle_error(pb::HandleErrorRequest {
            agent_id,
            error_message: "boom".into(),
            ..Default::default()
        })),
        "PutInMaintenance" => rpc!(client.put_in_maintenance(pb::PutInMaintenanceRequest {
            agent_id,
            ..Default::default()
        })),
        "ResumeFromMaintenance" => rpc!(client.resume_from_maintenance(
            pb::ResumeFromMaintenanceRequest {
                agent_id,
                ..Default::default()
            }
        )),
        "GetAgent" => rpc!(client.get_agent(pb::GetAgentRequest {
            agent_id,
            ..Default::default()
        })),
        "GetAgentHistory" => rpc!(client.get_agent_history(pb::GetAgentHistoryRequest {
            agent_id,
            ..Default::default()
        })),
        "ListTransitions" => rpc!(client.list_transitions(pb::ListTransitionsRequest {
            agent_id,
            ..Default::default()
        })),
        "GetAgentAnalytics" => rpc!(client.get_agent_analytics(pb::GetAgentAnalyticsRequest {
            agent_id,
            window: None,
        })),
        "SyncExternalStatus" => rpc!(client.sync_external_status(pb::SyncExternalStatusRequest {
            agent_id,
            source: "docker".into(),
            status: "running".into(),
            metadata: None,
        })),
        "Heartbeat" => rpc!(client.heartbeat(pb::HeartbeatRequest {
            agent_id,
            ..Default::default()
        })),
        "HeartbeatStream" => {
            rpc!(
                client.heartbeat_stream(tokio_stream::iter(vec![pb::HeartbeatRequest {
                    agent_id,
                    ..Default::default()
                }]))
            )
        }
        other => panic!("{other} takes an agent_id: add it here"),
    }
}

/// `n` labels `k0=v0`, `k1=v1`, ...
pub(super) fn labels(n: usize) -> HashMap<String, String> {
    (0..n).map(|i| (format!("k{i}"), format!("v{i}"))).collect()
}

/// `n` fresh agent ids.
pub(super) fn many_ids(n: usize) -> Vec<String> {
    (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect()
}

/// Metadata whose JSON is over the 16 KiB limit.
pub(super) fn oversized_metadata() -> Struct {
    Struct {
        fields: (0..2000)
            .map(|i| {
                let value = Value {
                    kind: Some(Kind::StringValue(format!("value-{i}"))),
                };
                (format!("key-{i}"), value)
            })
            .collect(),
    }
}

/// A server with well-behaved agents, and an ONLINE agent to aim at.
pub(super) async fn hostile_setup() -> (ServerProcess, Client, Bystanders, pb::Agent) {
    let server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let target = online(&mut client, &[("team", "target")]).await;
    (server, client, bystanders, target)
}

/// The end of a hostile test: every answer was right, the target agent is
/// unchanged by the refused requests, and the server survived.
pub(super) async fn hostile_teardown(
    mut server: ServerProcess,
    client: &mut Client,
    bystanders: &Bystanders,
    target: &pb::Agent,
    mut checks: Checks,
) {
    server.assert_running();
    let now = get_agent(client, &target.agent_id).await;
    checks.check(
        "the target agent",
        &now == target,
        "changed by refused requests",
    );
    checks.assert_none(&server);
    assert_survived(&mut server, bystanders).await;
}
