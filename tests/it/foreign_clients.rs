//! Clients that no one here wrote: a Python client generated from the proto
//! with `grpc_tools.protoc`, and the real `grpcurl` binary driven only by
//! server reflection. Each test starts the real server binary on an ephemeral
//! port and runs one script of `tests/python/` against it.
//!
//! The scripts need the packages of `tests/python/requirements.txt` (`.ci/run`
//! installs them into `.venv`). The interpreter is `$AGENT_LIFECYCLE_PYTHON`,
//! else `python3`; `grpcurl` must be on `PATH`. A missing interpreter, package
//! or grpcurl fails these tests: they never skip.

use crate::common;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::process::{ServerProcess, collect, wait_child};

/// How long one client script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// The Python interpreter: `$AGENT_LIFECYCLE_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("AGENT_LIFECYCLE_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_owned())
}

/// Runs `tests/python/<script> ADDR` with a deadline and panics, showing its
/// output and the server's log, unless it exits successfully.
fn run_script(server: &ServerProcess, script: &str) {
    run_script_with(server, script, &[&server.addr]);
}

/// Runs `tests/python/<script> ARGS...` (see [`run_script`]).
pub fn run_script_with(server: &ServerProcess, script: &str, args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("tests").join("python").join(script);
    let python = python();
    let mut child = Command::new(&python)
        .arg(&path)
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {python} (set AGENT_LIFECYCLE_PYTHON to a Python 3.11 with \
                 tests/python/requirements.txt installed): {e}"
            )
        });
    let stdout = collect(child.stdout.take().expect("stdout is piped"));
    let stderr = collect(child.stderr.take().expect("stderr is piped"));
    let status = wait_child(&mut child, SCRIPT_TIMEOUT);
    if status.is_some() {
        // The script exited: its pipes reach their end once the readers drained them.
        stdout.finish(Duration::from_secs(10));
        stderr.finish(Duration::from_secs(10));
    }
    let report = |what: &str| {
        format!(
            "{script} {what}\n--- stdout ---\n{}\n--- stderr ---\n{}{}",
            stdout.text(),
            stderr.text(),
            server.log()
        )
    };
    match status {
        None => panic!("{}", report(&format!("timed out after {SCRIPT_TIMEOUT:?}"))),
        Some(status) if !status.success() => panic!("{}", report(&format!("failed: {status}"))),
        Some(_) => print!("{script}:\n{}", stdout.text()),
    }
}

/// Scenario: a Python client generated from the proto alone registers an
/// agent (and repeats it idempotently), opens WatchEvents from the
/// registration's sequence, drives Deploy, Start, AssignTask, CompleteTask,
/// HandleError, TransitionAgent(ONLINE) and Stop, checks every response,
/// GetAgent, GetAgentHistory, GetLifecycleMetrics and the error codes
/// (NOT_FOUND, FAILED_PRECONDITION, ABORTED, INVALID_ARGUMENT,
/// ALREADY_EXISTS), and finally finds on the stream exactly the agent's
/// transitions, in order, with the sequences the RPCs returned.
#[test]
fn python_client_drives_and_watches_an_agent() {
    let server = ServerProcess::start(&["--store", "memory"]);
    run_script(&server, "client_test.py");
}

/// Scenario: grpcurl, knowing nothing but what reflection tells it, lists the
/// lifecycle, health and reflection services, describes the service,
/// registers an agent with a JSON body and gets JSON back in
/// AGENT_STATE_REGISTERED, sees the service SERVING on grpc.health.v1, gets
/// InvalidArgument / NotFound / FailedPrecondition / Aborted as non-zero
/// exits, and replays the agent's events through the WatchEvents stream.
#[test]
fn grpcurl_lists_services_and_registers_with_json() {
    let server = ServerProcess::start(&["--store", "memory"]);
    run_script(&server, "grpcurl_test.py");
}

/// Scenario: the live fleet dashboard in headless Chromium (Debian's
/// chromium and chromium-driver, through selenium). The page opens on
/// `--http-listen`, connects to the live event stream, lists the agents;
/// agents registered and moved through the CLI appear and change colour
/// without a reload, the live feed shows their events, the counts and the
/// label and category filters follow, the distribution chart has its bars,
/// and a screenshot is taken (target/dashboard.png).
#[test]
fn the_dashboard_follows_the_fleet_live_in_chromium() {
    let server = ServerProcess::start(&["--store", "memory", "--http-listen", "127.0.0.1:0"]);
    let http = server
        .http_addr(Duration::from_secs(10))
        .expect("the server prints its HTTP address")
        .to_string();
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    run_script_with(
        &server,
        "dashboard_test.py",
        &[
            env!("CARGO_BIN_EXE_agent-lifecycle"),
            &server.addr,
            &http,
            screenshot.to_str().expect("utf-8 path"),
        ],
    );
    assert!(screenshot.exists());
}
