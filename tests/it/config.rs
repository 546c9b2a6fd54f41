//! The `--config` file of `serve`: its settings apply, flags win over it,
//! and a bad file stops the server at start-up with a message naming the
//! problem and its line.

use crate::common;

use std::process::Command;

use agent_lifecycle::api::grpc::pb;
use common::process::ServerProcess;

/// A file that selects the memory store and a retention of 3 events: the
/// server runs on it (the flag's listen address wins over the file's), and
/// the log keeps only the newest three events.
#[tokio::test]
async fn settings_come_from_the_file_and_flags_win() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lifecycle.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:1\"\nstore = \"memory\"\nretain_events = 3\nlog = \"warn\"\n",
    )
    .expect("write the config");
    let server = ServerProcess::start(&["--config", path.to_str().expect("utf-8 path")]);
    let mut client = server.client().await;
    let agent = common::online(&mut client, &[]).await;
    common::transition(&mut client, &agent.agent_id, pb::AgentState::Idle)
        .await
        .expect("idle");
    // Six events (registered, deploying, deployed, starting, online, idle):
    // the memory ring keeps the newest three.
    common::assert_compacted_before(&mut client, 1, 4).await;
}

/// An unknown key, a bad duration and a bad store each stop `serve` with
/// exit code 1 and a message that names them.
#[test]
fn a_bad_config_file_is_refused_at_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, expected) in [
        ("store = \"memory\"\nretain_evnets = 3\n", "line 2"),
        ("retain_for = \"a while\"\n", "retain_for"),
        ("store = \"redis://x\"\n", "store"),
        ("retain_events = 0\n", "--retain-events must be at least 1"),
        ("[health]\nrestart_jitter = 2.0\n", "health.restart_jitter"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).expect("write");
        let output = Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .output()
            .expect("run the server");
        assert_eq!(output.status.code(), Some(1), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{text}: {stderr}");
        assert!(output.stdout.is_empty(), "it never started listening");
    }
}

/// The shipped example file (with `--store memory` on the command line)
/// enables SCALING from the operational states, and GetTransitionRules
/// shows the active policy.
#[tokio::test]
async fn the_example_policy_is_the_active_policy() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/agent-lifecycle.toml");
    let server = ServerProcess::start(&["--config", example, "--store", "memory", "--log", "warn"]);
    let mut client = server.client().await;
    let rules = client
        .get_transition_rules(pb::GetTransitionRulesRequest {})
        .await
        .expect("rules")
        .into_inner()
        .rules;
    for from in [
        pb::AgentState::Online,
        pb::AgentState::Idle,
        pb::AgentState::Busy,
    ] {
        let rule = rules
            .iter()
            .find(|r| r.from_state == from as i32)
            .expect("a rule per state");
        assert!(
            rule.allowed_targets
                .contains(&(pb::AgentState::Scaling as i32)),
            "{from:?} -> scaling"
        );
    }
    let agent = common::online(&mut client, &[]).await;
    common::transition(&mut client, &agent.agent_id, pb::AgentState::Scaling)
        .await
        .expect("online -> scaling is allowed by the file");
}
