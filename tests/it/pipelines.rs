//! The pipeline commands against a real server: `wait` follows the event
//! stream to a state, an error state or its timeout; `diff` and `apply`
//! bring a fleet file's agents where it wants them, idempotently, and
//! `apply --wait` fails naming an agent that does not start.

use crate::common;

use std::{collections::HashMap, path::Path, process::Output, sync::Arc, time::Duration};

use agent_lifecycle::{
    api::grpc::pb,
    service::ServiceConfig,
    store::{SqliteStore, Store},
};
use common::{Client, TestServer, process::ServerProcess};
use serde_json::Value;
use tokio::net::TcpListener;

/// Runs the CLI against `url` to its end (bounded).
async fn cli(url: &str, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"));
    command.arg("--server").arg(url).args(args);
    let run = tokio::task::spawn_blocking(move || command.output().expect("run the cli"));
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the cli finishes")
        .expect("join")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The exit code, stdout and stderr of a run.
fn outcome(output: &Output) -> (Option<i32>, String, String) {
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within 10 s"));
}

async fn head(client: &mut Client) -> u64 {
    client
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default())
        .await
        .expect("metrics")
        .into_inner()
        .head_sequence
}

/// Writes a fleet file; returns its path as text.
fn fleet_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the fleet file");
    path.to_str().expect("utf-8 path").to_string()
}

/// `diff -o json`: agent ids by name, and the whole document.
async fn plan(url: &str, file: &str) -> (HashMap<String, String>, Value) {
    let output = cli(url, &["-o", "json", "diff", "-f", file]).await;
    let doc: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&output.stderr)));
    let ids = doc["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().expect("name").to_string(),
                a["agent_id"].as_str().expect("id").to_string(),
            )
        })
        .collect();
    (ids, doc)
}

/// A wait that began before the agent was started ends when it is online
/// (several ids: when every one is there, one already online); an agent
/// that goes to ERROR instead fails the wait with exit 3 and its reason
/// and triggered_by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_agents_to_online_or_to_their_error() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut client = server.client().await;
    let already = common::online(&mut client, &[]).await;
    let id = common::deployed(&mut client, &[]).await;

    let waiting = {
        let (url, id, already) = (url.clone(), id.clone(), already.agent_id.clone());
        tokio::spawn(async move {
            cli(
                &url,
                &[
                    "wait",
                    &id,
                    &already,
                    "--for",
                    "state=online",
                    "--timeout",
                    "30s",
                ],
            )
            .await
        })
    };
    let metrics = server.service.metrics().clone();
    until("the wait's stream is open", || metrics.watch_streams() == 1).await;
    assert!(!waiting.is_finished(), "deployed is not online");
    client
        .start_agent(pb::StartAgentRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("start");
    let (code, stdout, stderr) = outcome(&waiting.await.expect("join"));
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with(&already.agent_id) && lines[0].contains("online"));
    assert!(
        lines[1].starts_with(&id) && lines[1].contains("online"),
        "{stdout}"
    );

    // Waiting for OFFLINE, the agent fails instead.
    let failing = {
        let (url, id) = (url.clone(), id.clone());
        tokio::spawn(
            async move { cli(&url, &["wait", &id, "--for", "state=offline,terminated"]).await },
        )
    };
    until("the first wait's stream is closed", || {
        metrics.watch_streams() == 0
    })
    .await;
    until("the second wait's stream is open", || {
        metrics.watch_streams() == 1
    })
    .await;
    client
        .handle_error(pb::HandleErrorRequest {
            agent_id: id.clone(),
            error_message: "GPU out of memory".into(),
            triggered_by: "oncall".into(),
            ..Default::default()
        })
        .await
        .expect("error");
    let (code, _, stderr) = outcome(&failing.await.expect("join"));
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("agent test-agent ({id}) is in state error"))
            && stderr.contains("waiting for offline,terminated")
            && stderr.contains("\"Error: GPU out of memory\" (triggered_by oncall)"),
        "{stderr}"
    );
    // Waiting for the error itself is no failure.
    let (code, stdout, stderr) = outcome(
        &cli(
            &url,
            &["-o", "json", "wait", &id, "--for", "category=error"],
        )
        .await,
    );
    assert_eq!(code, Some(0), "{stderr}");
    let doc: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(doc["agents"][0]["state"], "error");
}

/// The server restarts (same store, same address) while `wait` waits:
/// the wait resumes from the last sequence it saw and ends when the agent,
/// started only after the restart, is online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_resumes_across_a_server_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("lifecycle.db");
    let store = || -> Arc<dyn Store> { Arc::new(SqliteStore::open(&db).expect("sqlite")) };
    let first = TestServer::start_on(store(), ServiceConfig::default()).await;
    let (addr, url) = (first.addr, first.url());
    let mut client = first.client().await;
    let id = common::deployed(&mut client, &[]).await;
    let waiting = {
        let (url, id) = (url.clone(), id.clone());
        tokio::spawn(async move {
            cli(
                &url,
                &["wait", &id, "--for", "state=online", "--timeout", "60s"],
            )
            .await
        })
    };
    let metrics = first.service.metrics().clone();
    until("the wait's stream is open", || metrics.watch_streams() == 1).await;
    first.shutdown().await.expect("the first server stops");

    let listener = TcpListener::bind(addr)
        .await
        .expect("the same address again");
    let second = TestServer::start_listening(listener, store(), ServiceConfig::default());
    let metrics = second.service.metrics().clone();
    until("the wait is back", || metrics.watch_streams() == 1).await;
    assert!(!waiting.is_finished(), "deployed is not online");
    let mut client = second.client().await;
    client
        .start_agent(pb::StartAgentRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("start");
    let (code, stdout, stderr) = outcome(&waiting.await.expect("join"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with(&id) && stdout.contains("online"),
        "{stdout}"
    );
}

/// A wait that is not satisfied in time exits 4 naming where the agent is;
/// `--timeout 0` looks once; an unknown agent, a malformed id and a bad
/// `--for` exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_times_out_and_refuses_what_it_cannot_wait_for() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut client = server.client().await;
    let registered = common::register(&mut client, &[]).await;
    let id = registered.agent_id.as_str();
    let online = common::online(&mut client, &[]).await;

    let (code, _, stderr) = outcome(
        &cli(
            &url,
            &["wait", id, "--for", "state=online", "--timeout", "1s"],
        )
        .await,
    );
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains("timed out after 1s")
            && stderr.contains(&format!("({id}) is registered, waiting for online")),
        "{stderr}"
    );
    let (code, _, stderr) = outcome(
        &cli(
            &url,
            &["wait", id, "--for", "state=online", "--timeout", "0"],
        )
        .await,
    );
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("not there (--timeout 0)"), "{stderr}");
    let (code, _, stderr) = outcome(
        &cli(
            &url,
            &[
                "wait",
                &online.agent_id,
                "--for",
                "category=operational",
                "--timeout",
                "0",
            ],
        )
        .await,
    );
    assert_eq!(code, Some(0), "{stderr}");

    let unknown = uuid::Uuid::new_v4().to_string();
    let (code, _, stderr) = outcome(&cli(&url, &["wait", &unknown, "--for", "state=online"]).await);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("no such agent: {unknown}")),
        "{stderr}"
    );
    let (code, _, stderr) = outcome(&cli(&url, &["wait", "nope", "--for", "state=online"]).await);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    let (code, _, stderr) = outcome(&cli(&url, &["wait", id, "--for", "ready"]).await);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not state=NAME"), "{stderr}");
    let (code, _, stderr) =
        outcome(&cli("http://127.0.0.1:1", &["wait", id, "--for", "state=online"]).await);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

const FLEET: &str = r#"
fleet = "test"

[[agent]]
name = "web"
state = "online"
labels = { team = "ml", tier = "front" }

[[agent]]
name = "batch"
state = "deployed"
labels = { team = "ml" }

[[agent]]
name = "cold"
state = "offline"

[[agent]]
name = "listed"
state = "registered"
"#;

/// On a fresh server `diff` lists the registrations (exit 1); `apply
/// --wait` converges (states read back over gRPC), leaving an agent the
/// file does not name alone; a rerun changes nothing (no new event,
/// `diff` in sync); a changed state is applied, a changed label is a
/// conflict that applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_converges_a_fleet_and_a_rerun_changes_nothing() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut client = server.client().await;
    let bystander = common::online(&mut client, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = fleet_file(dir.path(), "fleet.toml", FLEET);

    let (code, stdout, stderr) = outcome(&cli(&url, &["diff", "-f", &file]).await);
    assert_eq!(code, Some(1), "changes: {stderr}");
    for (name, steps) in [
        ("web", "register, deploy, start"),
        ("batch", "register, deploy"),
        ("cold", "register"),
        ("listed", "register"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(name) && l.ends_with(steps) && l.contains(" - ")),
            "{name}: {stdout}"
        );
    }
    assert!(stdout.ends_with("4 of 4 agents to change\n"), "{stdout}");
    let (ids, doc) = plan(&url, &file).await;
    assert_eq!(doc["in_sync"], false);
    assert_eq!(doc["agents"][0]["steps"][2]["action"], "start");
    assert_eq!(doc["agents"][0]["steps"][2]["from_version"], 3);

    let (code, stdout, stderr) =
        outcome(&cli(&url, &["apply", "-f", &file, "--wait", "--timeout", "30s"]).await);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("applied 7 steps") && stdout.contains("converged: 3 agents"),
        "{stdout}"
    );
    let mut versions = HashMap::new();
    for (name, state) in [
        ("web", pb::AgentState::Online),
        ("batch", pb::AgentState::Deployed),
        ("cold", pb::AgentState::Registered),
        ("listed", pb::AgentState::Registered),
    ] {
        let agent = common::get_agent(&mut client, &ids[name]).await;
        assert_eq!((agent.name.as_str(), agent.state), (name, state as i32));
        assert_eq!(
            agent
                .last_transition
                .as_ref()
                .map(|t| t.triggered_by.as_str()),
            Some("fleet-apply")
        );
        versions.insert(name, agent.history_count);
    }
    assert_eq!(
        common::get_agent(&mut client, &ids["web"])
            .await
            .labels
            .get("tier")
            .map(String::as_str),
        Some("front")
    );

    // The rerun: nothing to do, nothing recorded.
    let before = head(&mut client).await;
    let (code, stdout, stderr) = outcome(&cli(&url, &["apply", "-f", &file, "--wait"]).await);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("in sync: nothing to apply (4 agents)"),
        "{stdout}"
    );
    assert_eq!(head(&mut client).await, before, "no event");
    for (name, count) in &versions {
        assert_eq!(
            common::get_agent(&mut client, &ids[*name])
                .await
                .history_count,
            *count,
            "{name}"
        );
    }
    let (code, stdout, _) = outcome(&cli(&url, &["diff", "-f", &file]).await);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.ends_with("in sync: 4 agents\n"), "{stdout}");
    let left = common::get_agent(&mut client, &bystander.agent_id).await;
    assert_eq!(left.version, bystander.version, "the file does not name it");

    // A changed state is applied; a changed label is refused, whole.
    let stopped = fleet_file(
        dir.path(),
        "stopped.toml",
        &FLEET.replacen("\"online\"", "\"offline\"", 1),
    );
    let (code, stdout, _) = outcome(&cli(&url, &["diff", "-f", &stopped]).await);
    assert_eq!(code, Some(1));
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("web") && l.ends_with("stop")),
        "{stdout}"
    );
    let relabelled = fleet_file(
        dir.path(),
        "relabelled.toml",
        &FLEET
            .replacen("\"online\"", "\"offline\"", 1)
            .replace("team = \"ml\" }", "team = \"ops\" }"),
    );
    let before = head(&mut client).await;
    let (code, stdout, stderr) = outcome(&cli(&url, &["apply", "-f", &relabelled]).await);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stderr.contains("nothing applied: batch: labels differ (team=ml -> ops)"),
        "{stderr}"
    );
    assert_eq!(head(&mut client).await, before, "nothing applied");
    let (code, _, stderr) = outcome(&cli(&url, &["apply", "-f", &stopped]).await);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        common::get_agent(&mut client, &ids["web"]).await.state,
        pb::AgentState::Offline as i32
    );
}

/// A run that stopped part-way (two agents registered, one deployed, the
/// deploy's answer lost and the request sent again): the retry with the
/// same request id is answered without a second change, and `apply` with
/// the same file does the rest, each step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_apply_after_a_partial_run_makes_each_change_once() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = fleet_file(
        dir.path(),
        "fleet.toml",
        "[[agent]]\nname = \"a\"\nstate = \"online\"\n\n[[agent]]\nname = \"b\"\nstate = \"online\"\nlabels = { k = \"v\" }\n",
    );
    let (ids, doc) = plan(&url, &file).await;
    let step = |agent: usize, n: usize| {
        doc["agents"][agent]["steps"][n]["request_id"]
            .as_str()
            .expect("request id")
            .to_string()
    };
    // The partial run, with the requests apply sends.
    for (agent, name, labels) in [(0, "a", vec![]), (1, "b", vec![("k", "v")])] {
        client
            .register_agent(pb::RegisterAgentRequest {
                agent_id: ids[name].clone(),
                name: name.to_string(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                reason: "fleet apply: want online".into(),
                triggered_by: "fleet-apply".into(),
                request_id: step(agent, 0),
                ..Default::default()
            })
            .await
            .expect("register");
    }
    let deploy = pb::DeployAgentRequest {
        agent_id: ids["a"].clone(),
        reason: "fleet apply: want online".into(),
        triggered_by: "fleet-apply".into(),
        expected_version: Some(1),
        request_id: step(0, 1),
        ..Default::default()
    };
    let first = client
        .deploy_agent(deploy.clone())
        .await
        .expect("deploy")
        .into_inner();
    let again = client
        .deploy_agent(deploy)
        .await
        .expect("the same request")
        .into_inner();
    assert_eq!(first.transitions, again.transitions, "the first outcome");
    assert_eq!(
        common::get_agent(&mut client, &ids["a"]).await.version,
        3,
        "deployed once"
    );

    let (code, stdout, stderr) = outcome(&cli(&url, &["apply", "-f", &file, "--wait"]).await);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("applied 3 steps"),
        "a: start; b: deploy, start: {stdout}"
    );
    for name in ["a", "b"] {
        let agent = common::get_agent(&mut client, &ids[name]).await;
        assert_eq!(agent.state, pb::AgentState::Online as i32);
        assert_eq!(
            agent.history_count, 5,
            "{name}: registered, deploying, deployed, starting, online"
        );
    }
    // The requests apply sent are the ones `diff` planned: b's deploy,
    // sent again, is answered with apply's outcome and changes nothing.
    let before = head(&mut client).await;
    let resent = client
        .deploy_agent(pb::DeployAgentRequest {
            agent_id: ids["b"].clone(),
            reason: "fleet apply: want online".into(),
            triggered_by: "fleet-apply".into(),
            expected_version: Some(1),
            request_id: step(1, 1),
            ..Default::default()
        })
        .await
        .expect("apply's request, again")
        .into_inner();
    let versions: Vec<u64> = resent.transitions.iter().map(|t| t.version).collect();
    assert_eq!(versions, vec![2, 3], "apply's deploy of b");
    assert!(
        resent.transitions.iter().all(|t| t.sequence < before),
        "no new event"
    );
    assert_eq!(head(&mut client).await, before);
}

/// Two runs of the same file at once (two CI jobs): both succeed, and each
/// change is made once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_applies_at_once_make_each_change_once() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = fleet_file(
        dir.path(),
        "fleet.toml",
        "[[agent]]\nname = \"a\"\nstate = \"online\"\n\n[[agent]]\nname = \"b\"\nstate = \"online\"\n\n\
         [[agent]]\nname = \"c\"\nstate = \"deployed\"\n",
    );
    let (ids, _) = plan(&url, &file).await;
    let run = |url: String, file: String| {
        tokio::spawn(async move { cli(&url, &["apply", "-f", &file, "--wait"]).await })
    };
    let (one, two) = (
        run(url.clone(), file.clone()),
        run(url.clone(), file.clone()),
    );
    for run in [one, two] {
        let (code, stdout, stderr) = outcome(&run.await.expect("join"));
        assert_eq!(code, Some(0), "{stdout}{stderr}");
    }
    for (name, count) in [("a", 5), ("b", 5), ("c", 3)] {
        assert_eq!(
            common::get_agent(&mut client, &ids[name])
                .await
                .history_count,
            count,
            "{name}"
        );
    }
    assert_eq!(head(&mut client).await, 13, "each change once");
}

/// A server whose agents labelled `flaky` wait for a first heartbeat that
/// never comes: `apply --wait` starts both agents, the steady one gets
/// online, the flaky one times out, and apply exits 3 naming it and the
/// health monitor's reason; `diff` then plans its start again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_names_an_agent_that_fails_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("lifecycle.toml");
    std::fs::write(
        &config,
        "store = \"memory\"\nlog = \"warn\"\n\n[health]\ngrace = \"0s\"\nstartup_timeout = \"1s\"\n\
         max_restarts = 1\nrestart_delay = \"10m\"\nrestart_max_delay = \"10m\"\n\n[[health.rule]]\nselector = { flaky = \"yes\" }\n\
         start_waits_for_heartbeat = true\n",
    )
    .expect("write the config");
    let server = ServerProcess::start(&["--config", config.to_str().expect("utf-8 path")]);
    let url = server.url();
    let mut client = server.client().await;
    let file = fleet_file(
        dir.path(),
        "fleet.toml",
        "[[agent]]\nname = \"steady\"\nstate = \"online\"\n\n\
         [[agent]]\nname = \"flaky\"\nstate = \"online\"\nlabels = { flaky = \"yes\" }\n",
    );
    let (ids, _) = plan(&url, &file).await;

    let (code, stdout, stderr) =
        outcome(&cli(&url, &["apply", "-f", &file, "--wait", "--timeout", "30s"]).await);
    assert_eq!(code, Some(3), "{stdout}{stderr}{}", server.log());
    assert!(
        stderr.contains(&format!(
            "agent flaky ({}) is in state timeout",
            ids["flaky"]
        )) && stderr.contains("no heartbeat within startup_timeout 1s")
            && stderr.contains("(triggered_by health-monitor)"),
        "{stderr}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("flaky") && l.contains("deployed -> starting")),
        "the start was made: {stdout}"
    );
    assert_eq!(
        common::get_agent(&mut client, &ids["steady"]).await.state,
        pb::AgentState::Online as i32
    );
    assert_eq!(
        common::get_agent(&mut client, &ids["flaky"]).await.state,
        pb::AgentState::Timeout as i32
    );

    let (code, stdout, _) = outcome(&cli(&url, &["diff", "-f", &file]).await);
    assert_eq!(code, Some(1));
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("flaky") && l.contains("timeout") && l.ends_with("start")),
        "{stdout}"
    );
}
