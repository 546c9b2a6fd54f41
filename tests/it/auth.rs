//! Authentication, roles and TLS through the real binary: principals from
//! the configuration file with hashed tokens, each role reaching what it
//! should and nothing more (an agent principal only its own agents, in
//! WatchEvents too), the principal recorded on every transition, health
//! open to all, TLS with a certificate from the test's own CA, mutual TLS
//! naming a principal by its certificate's common name and refusing a
//! certificate from another CA, the CLI's --tls-ca and --token, and a
//! non-loopback listener without authentication refused at start-up.

use crate::common;

use std::{path::Path, process::Command, time::Duration};

use agent_lifecycle::{api::auth, api::grpc::pb};
use common::{next_event, pki::Ca, process::ServerProcess};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

type Client = pb::agent_lifecycle_service_client::AgentLifecycleServiceClient<Channel>;

/// A principal of the test configuration and its token.
struct Principal {
    name: &'static str,
    token: String,
}

fn principal(name: &'static str) -> Principal {
    Principal {
        name,
        token: auth::new_token().expect("token"),
    }
}

/// `[[auth.principal]]` for `p` with `role` and extra lines.
fn entry(p: &Principal, role: &str, extra: &str) -> String {
    format!(
        "[[auth.principal]]\nname = {:?}\nrole = {role:?}\ntoken_sha256 = {:?}\n{extra}\n",
        p.name,
        auth::hex(&auth::sha256(&p.token))
    )
}

use common::with_token as with;

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("auth.toml");
    std::fs::write(&path, text).expect("write config");
    path.to_str().expect("utf-8 path").to_string()
}

async fn plain(url: &str) -> Client {
    Client::new(
        Endpoint::from_shared(url.to_string())
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    )
}

fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Every role against the methods it may and may not call.
#[tokio::test]
async fn roles_reach_what_they_should_and_the_principal_is_recorded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (admin, ops, viewer, agent) = (
        principal("root"),
        principal("ops"),
        principal("grafana"),
        principal("agent-7"),
    );
    // The agent principal's agent, registered before the server reads the
    // binding: its id is chosen here.
    let own = uuid::Uuid::new_v4().to_string();
    let config = [
        entry(&admin, "admin", ""),
        entry(&ops, "operator", ""),
        entry(&viewer, "viewer", ""),
        entry(&agent, "agent", &format!("agents = [{own:?}]")),
    ]
    .concat();
    let server = ServerProcess::start(&[
        "--store",
        "memory",
        "--config",
        &write_config(dir.path(), &config),
    ]);
    let mut c = plain(&server.url()).await;

    // No token, a wrong token, a malformed header: UNAUTHENTICATED, the
    // WatchEvents path included. Health stays open.
    let anonymous = c.list_agents(pb::ListAgentsRequest::default()).await;
    assert_eq!(code(anonymous), Code::Unauthenticated);
    let wrong = c
        .get_agent(with(
            "alt_wrong",
            pb::GetAgentRequest {
                agent_id: own.clone(),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(code(wrong), Code::Unauthenticated);
    let mut malformed = Request::new(pb::ListAgentsRequest::default());
    malformed
        .metadata_mut()
        .insert("authorization", ops.token.parse().expect("value"));
    assert_eq!(code(c.list_agents(malformed).await), Code::Unauthenticated);
    let watch = c.watch_events(pb::WatchEventsRequest::default()).await;
    assert_eq!(code(watch), Code::Unauthenticated);
    let channel = Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is open");
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .expect("reflection is open")
            .into_inner();
        let answer = tokio::time::timeout(common::STEP, answers.message())
            .await
            .expect("an answer in time")
            .expect("reflection answers")
            .expect("one message");
        assert!(format!("{answer:?}").contains("agentlifecycle.v1.AgentLifecycleService"));
    }

    // The operator registers and starts agents, triggered_by its own word;
    // the principal is the server's.
    let mut ids = Vec::new();
    for id in [own.clone(), uuid::Uuid::new_v4().to_string()] {
        c.register_agent(with(
            &ops.token,
            pb::RegisterAgentRequest {
                agent_id: id.clone(),
                triggered_by: "deploy-bot".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("operator registers");
        c.deploy_agent(with(
            &ops.token,
            pb::DeployAgentRequest {
                agent_id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("operator deploys");
        ids.push(id);
    }
    let other = ids[1].clone();
    let history = c
        .get_agent_history(with(
            &viewer.token,
            pb::GetAgentHistoryRequest {
                agent_id: own.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("viewer reads history")
        .into_inner();
    let first = &history.transitions[0];
    assert_eq!(
        (first.triggered_by.as_str(), first.principal.as_str()),
        ("deploy-bot", "ops")
    );

    // The operator may not delete; the admin may.
    let delete = |token: &str, id: &str| {
        with(
            token,
            pb::TransitionAgentRequest {
                agent_id: id.to_string(),
                target_state: pb::AgentState::Deleted as i32,
                ..Default::default()
            },
        )
    };
    let refused = c
        .transition_agent(delete(&ops.token, &other))
        .await
        .expect_err("operators do not delete");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("delete"),
        "{}",
        refused.message()
    );

    // The viewer reads and watches, and changes nothing.
    c.list_agents(with(&viewer.token, pb::ListAgentsRequest::default()))
        .await
        .expect("viewer lists");
    let start = with(
        &viewer.token,
        pb::StartAgentRequest {
            agent_id: own.clone(),
            ..Default::default()
        },
    );
    assert_eq!(code(c.start_agent(start).await), Code::PermissionDenied);
    let beat = |token: &str, id: &str| {
        with(
            token,
            pb::HeartbeatRequest {
                agent_id: id.to_string(),
                ..Default::default()
            },
        )
    };
    assert_eq!(
        code(c.heartbeat(beat(&viewer.token, &own)).await),
        Code::PermissionDenied
    );

    c.start_agent(with(
        &ops.token,
        pb::StartAgentRequest {
            agent_id: own.clone(),
            ..Default::default()
        },
    ))
    .await
    .expect("operator starts");

    // The agent principal: its own agent only, in every call.
    c.heartbeat(beat(&agent.token, &own))
        .await
        .expect("an agent reports for itself");
    assert_eq!(
        code(c.heartbeat(beat(&agent.token, &other)).await),
        Code::PermissionDenied
    );
    let get_other = with(
        &agent.token,
        pb::GetAgentRequest {
            agent_id: other.clone(),
            ..Default::default()
        },
    );
    assert_eq!(code(c.get_agent(get_other).await), Code::PermissionDenied);
    let list = with(&agent.token, pb::ListAgentsRequest::default());
    assert_eq!(code(c.list_agents(list).await), Code::PermissionDenied);
    let watch_other = with(
        &agent.token,
        pb::WatchEventsRequest {
            agent_ids: vec![other.clone()],
            ..Default::default()
        },
    );
    assert_eq!(
        code(c.watch_events(watch_other).await),
        Code::PermissionDenied
    );
    let mut own_events = c
        .watch_events(with(
            &agent.token,
            pb::WatchEventsRequest {
                start_sequence: 1,
                ..Default::default()
            },
        ))
        .await
        .expect("an agent watches its own agents")
        .into_inner();
    let error = with(
        &agent.token,
        pb::HandleErrorRequest {
            agent_id: own.clone(),
            error_message: "out of memory".into(),
            ..Default::default()
        },
    );
    c.handle_error(error)
        .await
        .expect("an agent reports its own error");
    // From sequence 1 on, the stream holds the own agent's events only:
    // registration, deployment (two), start (two), error.
    for expected in [
        "registered",
        "deploying",
        "deployed",
        "starting",
        "online",
        "error",
    ] {
        let event = next_event(&mut own_events).await;
        assert_eq!(event.agent_id, own, "only its own agent");
        let transition = event.transition.expect("transition");
        let to = pb::AgentState::try_from(transition.to_state).expect("state");
        assert!(
            format!("{to:?}").eq_ignore_ascii_case(expected),
            "{to:?} != {expected}"
        );
        if expected == "error" {
            assert_eq!(transition.principal, "agent-7");
        }
    }

    c.transition_agent(delete(&admin.token, &other))
        .await
        .expect("the admin deletes");

    // The audit trail: what the operator did, newest first; who moved the
    // own agent.
    let by_ops = c
        .list_transitions(with(
            &viewer.token,
            pb::ListTransitionsRequest {
                principal: Some("ops".into()),
                ..Default::default()
            },
        ))
        .await
        .expect("viewer reads the audit trail")
        .into_inner()
        .transitions;
    assert_eq!(
        by_ops.len(),
        8,
        "2 registrations, 2 deployments and 1 start (two steps each)"
    );
    assert!(by_ops.iter().all(|t| t.principal == "ops"));
    assert!(
        by_ops.windows(2).all(|w| w[0].sequence > w[1].sequence),
        "newest first"
    );
    let page = c
        .list_transitions(with(
            &viewer.token,
            pb::ListTransitionsRequest {
                agent_id: own.clone(),
                page_size: 2,
                ..Default::default()
            },
        ))
        .await
        .expect("by agent")
        .into_inner();
    let who: Vec<&str> = page
        .transitions
        .iter()
        .map(|t| t.principal.as_str())
        .collect();
    assert_eq!(who, ["agent-7", "ops"], "the error, then the start");
    assert!(!page.next_page_token.is_empty());
    let audit = c.list_transitions(with(&agent.token, pb::ListTransitionsRequest::default()));
    assert_eq!(code(audit.await), Code::PermissionDenied, "fleet-wide");
    let output = Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"))
        .args([
            "--server",
            &server.url(),
            "--token",
            &viewer.token,
            "audit",
            "--agent",
            &own,
            "--principal",
            "agent-7",
        ])
        .output()
        .expect("run the CLI");
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("agent-7") && text.contains("online -> error"),
        "{text}"
    );

    // Every refusal is counted by reason.
    let metrics = c
        .get_lifecycle_metrics(with(
            &viewer.token,
            pb::GetLifecycleMetricsRequest::default(),
        ))
        .await
        .expect("metrics")
        .into_inner();
    assert_eq!(
        metrics.refused.get("unauthenticated"),
        Some(&4),
        "{metrics:?}"
    );
    assert!(metrics.refused["permission_denied"] >= 8, "{metrics:?}");

    // And logged at WARN, naming who and what.
    let log = server.log();
    assert!(
        log.lines().any(|l| l.contains("refused: permission denied")
            && l.contains("principal=ops")
            && l.contains("delete agents")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("refused: unauthenticated") && l.contains("ListAgents")),
        "{log}"
    );
}

/// A non-loopback address without authentication is refused, naming the
/// flag that overrides it; nothing is bound.
#[test]
fn an_open_port_without_authentication_is_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"))
        .args(["serve", "--store", "memory", "--listen", "0.0.0.0:0"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("without authentication") && stderr.contains("--insecure"),
        "{stderr}"
    );
}

async fn tls_client(url: &str, tls: ClientTlsConfig) -> Result<Client, tonic::transport::Error> {
    let channel = Endpoint::from_shared(url.to_string())
        .expect("url")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(Client::new(channel))
}

/// TLS with the test CA's certificate; mutual TLS where a client
/// certificate's common name names a principal (a token still works
/// without one), a certificate from another CA is refused, and the CLI
/// connects with --tls-ca and --token.
#[tokio::test]
async fn tls_and_client_certificates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("lifecycle test CA");
    let ca_file = ca.write(dir.path(), "ca");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let ops = principal("ops");
    let config = [
        entry(&ops, "operator", ""),
        "[[auth.principal]]\nname = \"dashboard\"\nrole = \"viewer\"\ncert_subject = \"dashboard\"\n"
            .to_string(),
    ]
    .concat();
    let server = ServerProcess::start(&[
        "--store",
        "memory",
        "--config",
        &write_config(dir.path(), &config),
        "--tls-cert",
        cert.to_str().expect("path"),
        "--tls-key",
        key.to_str().expect("path"),
        "--tls-client-ca",
        ca_file.to_str().expect("path"),
    ]);
    let url = format!("https://{}", server.addr);
    let trusting = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem()));

    // A token over TLS, without a client certificate.
    let mut c = tls_client(&url, trusting()).await.expect("TLS connect");
    c.register_agent(with(&ops.token, pb::RegisterAgentRequest::default()))
        .await
        .expect("token over TLS");

    // The dashboard's certificate: a viewer, without a token.
    let dashboard = ca.client("dashboard");
    let mut d = tls_client(
        &url,
        trusting().identity(Identity::from_pem(&dashboard.cert_pem, &dashboard.key_pem)),
    )
    .await
    .expect("mutual TLS connect");
    let listed = d
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .expect("the certificate names a viewer")
        .into_inner();
    assert_eq!(listed.agents.len(), 1);
    let register = d.register_agent(pb::RegisterAgentRequest::default()).await;
    assert_eq!(code(register), Code::PermissionDenied);

    // A certificate the CA did not sign: refused in the handshake.
    let stranger_ca = Ca::new("another CA");
    let stranger = stranger_ca.client("dashboard");
    let refused = match tls_client(
        &url,
        trusting().identity(Identity::from_pem(&stranger.cert_pem, &stranger.key_pem)),
    )
    .await
    {
        Err(_) => true,
        Ok(mut client) => client
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from another CA gets nowhere");

    // Plain HTTP/2 to a TLS port gets nowhere either.
    let plain_url = server.url();
    let plain_result = match Endpoint::from_shared(plain_url)
        .expect("url")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => Client::new(channel)
            .list_agents(with(&ops.token, pb::ListAgentsRequest::default()))
            .await
            .is_err(),
    };
    assert!(plain_result);

    // The CLI with --tls-ca and --token; without the token it is refused.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"))
            .args([
                "--server",
                &url,
                "--tls-ca",
                ca_file.to_str().expect("path"),
            ])
            .args(args)
            .output()
            .expect("run the CLI")
    };
    let listed = cli(&["--token", &ops.token, "list"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let refused = cli(&["list"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
