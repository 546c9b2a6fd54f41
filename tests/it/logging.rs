//! Logs of the real binary: JSON lines with the request span, and a clean
//! exit on SIGTERM.

use crate::common;

use agent_lifecycle::api::grpc::pb;
use common::process::ServerProcess;

/// With `--log-format json` every stderr line is a JSON object; the
/// registration is logged inside the request's span, which names the gRPC
/// method; SIGTERM stops the server with exit status 0 and logs the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_span() {
    let mut server = ServerProcess::start(&["--store", "memory", "--log-format", "json"]);
    let mut c = server.client().await;
    let agent = c
        .register_agent(pb::RegisterAgentRequest::default())
        .await
        .expect("register")
        .into_inner()
        .agent
        .expect("agent");
    drop(c);
    assert!(server.terminate().success());
    let stderr = server.stderr_after_exit();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let registered = lines
        .iter()
        .find(|l| l["message"] == "agent registered")
        .unwrap_or_else(|| panic!("no registration line in {stderr}"));
    assert_eq!(registered["agent_id"], agent.agent_id.as_str());
    assert_eq!(registered["level"], "INFO");
    assert_eq!(registered["span"]["name"], "grpc");
    assert_eq!(
        registered["span"]["method"],
        "/agentlifecycle.v1.AgentLifecycleService/RegisterAgent"
    );
    assert!(lines.iter().any(|l| l["message"] == "stopped"), "{stderr}");
}

/// The default human format names the listen address at start-up; Ctrl-C
/// (SIGINT) stops the server cleanly too.
#[test]
fn human_logs_name_the_address() {
    let mut server = ServerProcess::start(&["--store", "memory"]);
    assert!(server.interrupt().success());
    let stderr = server.stderr_after_exit();
    assert!(
        stderr.contains("serving gRPC") && stderr.contains(&server.addr),
        "{stderr}"
    );
    assert!(!stderr.trim_start().starts_with('{'));
    assert!(
        stderr.contains("SIGINT") && stderr.contains("stopped"),
        "{stderr}"
    );
}
