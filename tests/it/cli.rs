//! The terminal client against a real server: results on stdout, errors on
//! stderr with a non-zero exit.

use crate::common;

use std::{process::Output, time::Duration};

use common::TestServer;

async fn cli(server: &TestServer, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"));
    command.arg("--server").arg(server.url()).args(args);
    let run = tokio::task::spawn_blocking(move || command.output().expect("run the cli"));
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("cli finishes")
        .expect("join")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A person drives an agent through its lifecycle from the terminal, reads
/// it back as text and JSON, sees a refused move fail with the server's
/// message, and replays the events with `watch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_drives_an_agent_and_reports_errors() {
    let server = TestServer::start().await;
    let registered: serde_json::Value = serde_json::from_str(&stdout(
        &cli(
            &server,
            &[
                "-o", "json", "register", "--name", "cli", "--label", "team=ml",
            ],
        )
        .await,
    ))
    .expect("json");
    let id = registered["agent"]["agent_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(registered["agent"]["state"], "registered");
    assert_eq!(registered["transitions"][0]["sequence"], 1);

    // Text: the new id on the first line; -q: nothing but the id.
    let text = stdout(&cli(&server, &["register", "--name", "text"]).await);
    let first = text.lines().next().expect("a first line");
    assert!(uuid::Uuid::parse_str(first).is_ok(), "{text}");
    let quiet = stdout(&cli(&server, &["register", "-q", "--name", "quiet"]).await);
    assert_eq!(quiet.lines().count(), 1, "{quiet}");
    assert!(uuid::Uuid::parse_str(quiet.trim()).is_ok(), "{quiet}");
    let listed = stdout(&cli(&server, &["list"]).await);
    let header = listed.lines().next().expect("a header");
    assert!(
        header.starts_with("AGENT ID") && header.contains("STATE") && header.contains("NAME"),
        "{listed}"
    );
    assert_eq!(
        listed.lines().count(),
        4,
        "the header and three agents: {listed}"
    );

    let deploy = stdout(&cli(&server, &["deploy", &id]).await);
    assert!(
        deploy.contains("registered -> deploying") && deploy.contains("deploying -> deployed"),
        "{deploy}"
    );
    stdout(&cli(&server, &["start", &id]).await);
    stdout(&cli(&server, &["assign", &id, "--task", "t-1"]).await);
    let text = stdout(&cli(&server, &["get", &id]).await);
    assert!(text.contains("busy") && text.contains("team=ml"), "{text}");

    let refused = cli(&server, &["transition", &id, "deleted"]).await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("FailedPrecondition")
            && stderr.contains("cannot transition from busy to deleted"),
        "{stderr}"
    );
    let bad = cli(&server, &["get", "not-a-uuid"]).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("InvalidArgument"));

    let history: serde_json::Value = serde_json::from_str(&stdout(
        &cli(&server, &["-o", "json", "history", &id]).await,
    ))
    .expect("json");
    assert_eq!(history["transitions"].as_array().expect("array").len(), 6);
    let metrics: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&server, &["-o", "json", "metrics"]).await))
            .expect("json");
    assert_eq!(metrics["operational_agents"], 1);
    let list = stdout(&cli(&server, &["list", "--category", "operational"]).await);
    assert!(list.contains(&id));
    let rules = stdout(&cli(&server, &["rules"]).await);
    assert_eq!(rules.lines().count(), 18);

    let events = stdout(
        &cli(
            &server,
            &["-o", "json", "watch", "--from", "1", "--count", "6"],
        )
        .await,
    );
    let sequences: Vec<u64> = events
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["sequence"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(sequences, vec![1, 2, 3, 4, 5, 6]);

    // -o yaml and -o table everywhere; top and analytics.
    let yaml = stdout(&cli(&server, &["-o", "yaml", "get", &id]).await);
    assert!(yaml.starts_with("---\n"), "{yaml}");
    assert!(yaml.contains("\nstate: \"busy\"\n"), "{yaml}");
    assert!(yaml.contains("\nlabels:\n  team: \"ml\"\n"), "{yaml}");
    let table = stdout(&cli(&server, &["-o", "table", "list"]).await);
    assert!(table.starts_with("AGENT ID"), "{table}");
    let top = stdout(&cli(&server, &["top", "--iterations", "1"]).await);
    assert!(top.starts_with("agents: 3"), "{top}");
    assert!(top.contains("  busy         1"), "{top}");
    let figures = stdout(&cli(&server, &["analytics", "--agent", &id]).await);
    assert!(figures.contains("transitions:   5"), "{figures}");
    let fleet: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&server, &["-o", "json", "analytics"]).await))
            .expect("json");
    assert_eq!(fleet["agents"], 3);
}
