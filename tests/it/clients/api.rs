//! Each client library's whole surface against the real server (every
//! method, the typed errors, watches from a sequence, a snapshot and live,
//! reads as of a point, retries of a rate-limited server), its type check,
//! and the example monitors of examples/.

use std::process::Command;

use agent_lifecycle::api::{auth, grpc::pb};

use super::script::{Lang, Script, python, root, typescript_dist};
use crate::common::{self, pki::Ca, process::ServerProcess};

/// A server whose [limits] allow 5 transitions per agent per second.
fn rate_limited_server(dir: &tempfile::TempDir) -> ServerProcess {
    let config = dir.path().join("limits.toml");
    std::fs::write(
        &config,
        "[limits]\nagent_transitions_per_second = 5\nagent_transition_burst = 5\n",
    )
    .expect("write the config");
    let config = config.to_str().expect("utf-8 path").to_owned();
    ServerProcess::start(&["--log", "warn", "--store", "memory", "--config", &config])
}

fn python_api(args: &[&str]) -> Script {
    let mut command = Command::new(python());
    command
        .arg(root().join("clients/python/tests/api_test.py"))
        .args(args);
    Script::spawn(format!("api_test.py {}", args.join(" ")), command)
}

fn typescript_api(server: &ServerProcess, rate_limited: bool) -> Script {
    let mut command = Command::new("node");
    command
        .arg("--test")
        .arg(typescript_dist("test/api.test.js"))
        .env("AGENT_LIFECYCLE_TEST_SERVER", &server.addr)
        .env(
            "AGENT_LIFECYCLE_TEST_RATE_LIMITED",
            if rate_limited { "1" } else { "0" },
        );
    Script::spawn("node --test api.test.js".into(), command)
}

/// The closing `N passed, 0 failed` line of api_test.py, or node's `# fail 0`.
fn assert_passed(lines: &[String], at_least: usize) {
    let passed = lines
        .iter()
        .find_map(|l| {
            l.strip_suffix(" passed, 0 failed")
                .or_else(|| l.strip_prefix("# pass "))
        })
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no pass count in {lines:#?}"));
    assert!(
        passed >= at_least,
        "{passed} checks passed, expected {at_least}: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l == "# fail 0") || lines.iter().any(|l| l.ends_with(" 0 failed"))
    );
}

/// Scenario: the Python client drives an agent through every mutating
/// method, reads it every way (as of a sequence and a time too), catches
/// the typed errors (allowed targets of a refused transition, both versions
/// of a mismatch, the field of a malformed id, a reused request_id), and
/// watches from a sequence, from a snapshot and live, sync and asyncio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_covers_the_api() {
    let server = ServerProcess::start(&["--log", "warn", "--store", "memory"]);
    assert_passed(&python_api(&[&server.addr]).finish(), 9);
}

/// Scenario: the TypeScript client does the same under node's test runner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_client_covers_the_api() {
    let server = ServerProcess::start(&["--log", "warn", "--store", "memory"]);
    assert_passed(&typescript_api(&server, false).finish(), 6);
}

/// Scenario: against 5 transitions per agent per second, a client without
/// retries gets the typed rate-limit error with RetryInfo's delay, and one
/// with the default retries gets 12 quick transitions through, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_honour_retry_info_when_rate_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = rate_limited_server(&dir);
    assert_passed(&python_api(&["--rate-limited", &server.addr]).finish(), 2);
    assert_passed(&typescript_api(&server, true).finish(), 1);
}

/// Scenario: `mypy --strict` finds nothing in the installed Python package
/// (py.typed, the generated messages' stubs and the package's own code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_is_clean_under_mypy_strict() {
    let mut command = Command::new(python());
    let config = root().join("clients/python/pyproject.toml");
    command
        .args(["-m", "mypy", "--strict", "--config-file"])
        .arg(config)
        .args(["-p", "agent_lifecycle"]);
    let lines = Script::spawn("mypy --strict -p agent_lifecycle".into(), command).finish();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("Success: no issues found")),
        "{lines:#?}"
    );
}

/// Scenario: the example monitors of examples/ print the fleet from a
/// snapshot (an agent already in ERROR raises an ALERT at once), then
/// follow the stream: an agent that fails is printed with an ALERT line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_monitors_print_the_fleet_and_alert_on_errors() {
    let server = ServerProcess::start(&["--log", "warn", "--store", "memory"]);
    let mut client = server.client().await;
    let broken = common::online(&mut client, &[]).await;
    client
        .handle_error(pb::HandleErrorRequest {
            agent_id: broken.agent_id.clone(),
            error_message: "disk full".into(),
            ..Default::default()
        })
        .await
        .expect("error");
    let monitors = [
        ("monitor.py", {
            let mut c = Command::new(python());
            c.arg(root().join("examples/monitor.py")).arg(&server.addr);
            c
        }),
        ("monitor.ts", {
            let mut c = Command::new("node");
            c.arg(typescript_dist("examples/monitor.js"))
                .arg(&server.addr);
            c
        }),
    ];
    for (name, command) in monitors {
        let mut monitor = Script::spawn(name.into(), command);
        monitor.wait_for("the fleet", |l| l.starts_with("fleet at sequence "));
        monitor.wait_for("the alert for the broken agent", |l| {
            l.starts_with("ALERT ") && l.contains(&broken.agent_id) && l.contains("disk full")
        });
        let agent = common::online(&mut client, &[]).await;
        monitor.wait_for("the new agent online", |l| {
            l.contains(&agent.agent_id) && l.ends_with("starting -> online")
        });
        client
            .transition_agent(pb::TransitionAgentRequest {
                agent_id: agent.agent_id.clone(),
                target_state: pb::AgentState::Error as i32,
                reason: "gpu lost".into(),
                ..Default::default()
            })
            .await
            .expect("to error");
        monitor.wait_for("the alert", |l| {
            l.starts_with("ALERT ")
                && l.contains(&agent.agent_id)
                && l.contains("is error: gpu lost")
        });
    }
}

/// Scenario: a server with TLS (a certificate from the test's own CA),
/// bearer tokens and client certificates. Each library, given the CA file
/// and an operator's token, registers an agent and watches it over TLS;
/// without credentials it gets the typed UNAUTHENTICATED error; with a
/// viewer's client certificate it lists agents and gets the typed
/// PERMISSION_DENIED error when it tries to register one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_speak_tls_with_tokens_and_client_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("clients test CA");
    let ca_file = ca.write(dir.path(), "ca");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let (viewer_cert, viewer_key) = ca.client("watcher").write(dir.path(), "watcher");
    let token = auth::new_token().expect("token");
    let config = format!(
        "[[auth.principal]]\nname = \"ops\"\nrole = \"operator\"\ntoken_sha256 = {:?}\n\n\
         [[auth.principal]]\nname = \"watcher\"\nrole = \"viewer\"\ncert_subject = \"watcher\"\n",
        auth::hex(&auth::sha256(&token))
    );
    let config_file = dir.path().join("auth.toml");
    std::fs::write(&config_file, config).expect("write config");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_owned();
    let server = ServerProcess::start(&[
        "--log",
        "warn",
        "--store",
        "memory",
        "--config",
        &path(&config_file),
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
        "--tls-client-ca",
        &path(&ca_file),
    ]);
    let endpoint = format!("https://{}", server.addr);
    for lang in [Lang::Python, Lang::TypeScript] {
        let args = [
            "tls",
            "--endpoints",
            &endpoint,
            "--ca",
            &path(&ca_file),
            "--token",
            &token,
            "--cert",
            &path(&viewer_cert),
            "--key",
            &path(&viewer_key),
        ];
        let lines = Script::start(lang, &args).finish();
        let words: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(
            words,
            [
                "registered",
                "watched",
                "unauthenticated",
                "listed",
                "denied"
            ],
            "{lang:?}: {lines:#?}"
        );
    }
}
