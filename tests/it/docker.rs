//! The Docker driver against a real Docker daemon (scripts/docker.sh starts
//! a private one and imports a busybox test image; `TEST_DOCKER_HOST` and
//! `TEST_DOCKER_IMAGE` name them). The server is the real binary with a
//! `[docker]` section; containers are read and killed from outside with
//! bollard, as an operator's `docker kill` would.

use std::{process::Output, time::Duration};

use agent_lifecycle::pb;
use bollard::{
    Docker,
    models::ContainerInspectResponse,
    query_parameters::{KillContainerOptions, WaitContainerOptions},
};
use futures_util::StreamExt;
use tonic::codec::Streaming;

use crate::common::{self, process::ServerProcess};

/// How long one step may take: a container start, stop or restart.
const STEP: Duration = Duration::from_secs(60);

/// The daemon and image the tests use; `None` (the test skips) only
/// outside CI. Under CI a missing daemon fails the test.
fn daemon() -> Option<(String, String)> {
    let image = std::env::var("TEST_DOCKER_IMAGE")
        .unwrap_or_else(|_| "agent-lifecycle-test/busybox:latest".to_string());
    match std::env::var("TEST_DOCKER_HOST") {
        Ok(host) if !host.is_empty() => Some((host, image)),
        _ if std::env::var_os("CI").is_some() => {
            panic!("TEST_DOCKER_HOST is not set; CI must run the Docker tests")
        }
        _ => {
            eprintln!("TEST_DOCKER_HOST is not set: skipping a Docker test");
            None
        }
    }
}

/// A server whose Docker driver uses `host`, with `extra` appended to its
/// config file.
struct Fleet {
    server: ServerProcess,
    docker: Docker,
    _dir: tempfile::TempDir,
}

fn serve(host: &str, image: &str, extra: &str) -> Fleet {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"memory\"\n\
             [docker]\nhost = {host:?}\nimage = {image:?}\nstop_timeout = \"1s\"\n\
             [health]\ngrace = \"0s\"\nrestart_jitter = 0.0\n{extra}"
        ),
    )
    .expect("write the config");
    let server = ServerProcess::start(&[
        "--log",
        "agent_lifecycle=info",
        "--config",
        config.to_str().expect("utf-8 path"),
    ]);
    Fleet {
        server,
        docker: Docker::connect_with_host(host).expect("a Docker client"),
        _dir: dir,
    }
}

/// A container name no other test uses.
fn container_name() -> String {
    format!(
        "al-test-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The CLI against `server`.
async fn cli(server: &ServerProcess, args: &[&str]) -> String {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"));
    command.arg("--server").arg(server.url()).args(args);
    let run = tokio::task::spawn_blocking(move || command.output().expect("run the cli"));
    let output: Output = tokio::time::timeout(STEP, run)
        .await
        .expect("cli finishes")
        .expect("join");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Reads the agent's events until it is in `state`; fails after [`STEP`].
async fn reach(
    events: &mut Streaming<pb::WatchEventsResponse>,
    state: pb::AgentState,
    server: &ServerProcess,
) -> pb::StateTransition {
    let found = tokio::time::timeout(STEP, async {
        loop {
            let message = events.message().await.expect("stream ok").expect("open");
            if let Some(pb::watch_events_response::Kind::Event(event)) = message.kind {
                let transition = event.transition.expect("transition");
                if transition.to_state == state as i32 {
                    return transition;
                }
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "the agent did not reach {state:?} within {STEP:?}\n--- server log ---\n{}",
            server.log()
        )
    })
}

/// The agent's events from now on.
async fn events_of(fleet: &Fleet, agent_id: &str) -> Streaming<pb::WatchEventsResponse> {
    let mut client = fleet.server.client().await;
    common::watch(
        &mut client,
        pb::WatchEventsRequest {
            agent_ids: vec![agent_id.to_string()],
            ..Default::default()
        },
    )
    .await
}

async fn inspect(docker: &Docker, name: &str) -> Option<ContainerInspectResponse> {
    match docker.inspect_container(name, None).await {
        Ok(container) => Some(container),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => None,
        Err(err) => panic!("inspect {name}: {err}"),
    }
}

fn status(container: &Option<ContainerInspectResponse>) -> String {
    container
        .as_ref()
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.status)
        .map(|s| s.to_string())
        .unwrap_or_else(|| "missing".into())
}

/// Waits until container `name` is `condition` (`not-running`,
/// `removed`), as `docker wait --condition` does.
async fn wait_until(docker: &Docker, name: &str, condition: &str) {
    let options = WaitContainerOptions {
        condition: condition.to_string(),
    };
    let mut wait = docker.wait_container(name, Some(options));
    let waited = tokio::time::timeout(STEP, wait.next()).await;
    match waited {
        Ok(Some(Ok(_)) | None) => {}
        // A container that exits with a code other than 0 ends the wait
        // with an error that carries the code; a removed one with a 404.
        Ok(Some(Err(bollard::errors::Error::DockerContainerWaitError { .. }))) => {}
        Ok(Some(Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }))) if condition == "removed" => {}
        Ok(Some(Err(err))) => panic!("waiting for {name} to be {condition}: {err}"),
        Err(_) => panic!("{name} was not {condition} within {STEP:?}"),
    }
}

async fn register(fleet: &Fleet, labels: &[(&str, &str)]) -> String {
    let mut client = fleet.server.client().await;
    common::register(&mut client, labels).await.agent_id
}

/// `docker kill` from outside: SIGKILL, exit code 137.
async fn kill(docker: &Docker, name: &str) {
    docker
        .kill_container(name, None::<KillContainerOptions>)
        .await
        .expect("kill the container");
}

/// From the terminal: deploying creates the container; starting runs it
/// and the agent goes ONLINE when Docker reports it running (not before);
/// stopping stops it; deleting the agent removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_real_container() {
    let Some((host, image)) = daemon() else {
        return;
    };
    let fleet = serve(&host, &image, "");
    let name = container_name();
    let id = register(
        &fleet,
        &[("docker.container", &name), ("docker.command", "sleep 600")],
    )
    .await;
    let mut events = events_of(&fleet, &id).await;
    let server = &fleet.server;

    cli(server, &["deploy", &id]).await;
    reach(&mut events, pb::AgentState::Deployed, server).await;
    // The driver creates the container after DEPLOYING; its start needs it.
    let started = cli(server, &["-o", "json", "start", &id]).await;
    assert!(
        started.contains("STARTING") || started.contains("starting"),
        "StartAgent of a bound agent stops at STARTING: {started}"
    );
    let online = reach(&mut events, pb::AgentState::Online, server).await;
    assert_eq!(online.triggered_by, "docker-driver");
    assert_eq!(status(&inspect(&fleet.docker, &name).await), "running");

    cli(server, &["stop", &id]).await;
    reach(&mut events, pb::AgentState::Offline, server).await;
    wait_until(&fleet.docker, &name, "not-running").await;
    assert_eq!(status(&inspect(&fleet.docker, &name).await), "exited");

    cli(server, &["transition", &id, "terminated"]).await;
    cli(server, &["transition", &id, "deleted"]).await;
    wait_until(&fleet.docker, &name, "removed").await;
    assert!(inspect(&fleet.docker, &name).await.is_none());
}

/// A container killed from outside moves its agent to ERROR with the exit
/// code; the health monitor's restart restarts the container and the agent
/// comes back ONLINE; killed again after the one restart allowed, the agent
/// goes to FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_container_is_an_error_restarted_then_failed() {
    let Some((host, image)) = daemon() else {
        return;
    };
    let fleet = serve(&host, &image, "max_restarts = 1\nrestart_delay = \"1s\"\n");
    let name = container_name();
    let id = register(
        &fleet,
        &[("docker.container", &name), ("docker.command", "sleep 600")],
    )
    .await;
    let mut events = events_of(&fleet, &id).await;
    let server = &fleet.server;
    cli(server, &["deploy", &id]).await;
    cli(server, &["start", &id]).await;
    reach(&mut events, pb::AgentState::Online, server).await;
    let first_start = inspect(&fleet.docker, &name)
        .await
        .and_then(|c| c.state)
        .and_then(|s| s.started_at)
        .expect("started");

    kill(&fleet.docker, &name).await;
    let error = reach(&mut events, pb::AgentState::Error, server).await;
    assert_eq!(error.triggered_by, "docker-driver");
    assert!(
        error.reason.contains("exited with code 137"),
        "{}",
        error.reason
    );
    let metadata = common_metadata(&error);
    assert_eq!(metadata.get("exit_code").map(String::as_str), Some("137"));

    let restart = reach(&mut events, pb::AgentState::Starting, server).await;
    assert_eq!(restart.triggered_by, "health-monitor");
    let back = reach(&mut events, pb::AgentState::Online, server).await;
    assert_eq!(back.triggered_by, "docker-driver");
    let container = inspect(&fleet.docker, &name).await;
    assert_eq!(status(&container), "running");
    let second_start = container
        .and_then(|c| c.state)
        .and_then(|s| s.started_at)
        .expect("started");
    assert_ne!(first_start, second_start, "the container was restarted");

    kill(&fleet.docker, &name).await;
    reach(&mut events, pb::AgentState::Error, server).await;
    let failed = reach(&mut events, pb::AgentState::Failed, server).await;
    assert!(
        failed.reason.contains("restarts exhausted"),
        "{}",
        failed.reason
    );
}

/// A container killed for memory is recorded as OOM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_for_memory_is_recorded_as_oom() {
    let Some((host, image)) = daemon() else {
        return;
    };
    let fleet = serve(&host, &image, "max_restarts = 0\n");
    let name = container_name();
    // busybox `tail` keeps a line of /dev/zero, which never ends.
    let id = register(
        &fleet,
        &[
            ("docker.container", &name),
            ("docker.command", "tail /dev/zero"),
            ("docker.memory", "8m"),
        ],
    )
    .await;
    let mut events = events_of(&fleet, &id).await;
    let server = &fleet.server;
    cli(server, &["deploy", &id]).await;
    cli(server, &["start", &id]).await;
    let error = reach(&mut events, pb::AgentState::Error, server).await;
    assert!(error.reason.contains("OOM"), "{}", error.reason);
    let metadata = common_metadata(&error);
    assert_eq!(metadata.get("oom_killed").map(String::as_str), Some("true"));
    let container = inspect(&fleet.docker, &name).await;
    assert_eq!(
        container.and_then(|c| c.state).and_then(|s| s.oom_killed),
        Some(true)
    );
}

/// A daemon restarted while the server runs: the containers it stopped on
/// its way down are seen once it is back, and the agent moves to ERROR with
/// the exit code; the driver goes on acting on the new daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restart_loses_no_status_change() {
    let Some((_, image)) = daemon() else {
        return;
    };
    // A daemon of its own: stopping it must not disturb the other tests.
    let dir = OwnDaemon(tempfile::tempdir().expect("tempdir"));
    let dir = &dir.0;
    let host = docker_script("start", dir.path());
    let fleet = serve(&host, &image, "max_restarts = 0\n");
    let name = container_name();
    let id = register(
        &fleet,
        &[("docker.container", &name), ("docker.command", "sleep 600")],
    )
    .await;
    let mut events = events_of(&fleet, &id).await;
    let server = &fleet.server;
    cli(server, &["deploy", &id]).await;
    cli(server, &["start", &id]).await;
    reach(&mut events, pb::AgentState::Online, server).await;

    docker_script("stop", dir.path());
    docker_script("start", dir.path());
    let error = reach(&mut events, pb::AgentState::Error, server).await;
    assert_eq!(error.triggered_by, "docker-driver");
    assert!(
        error.reason.contains("exited with code"),
        "{}",
        error.reason
    );

    // The driver acts on the daemon that came back: started again, the
    // container runs and the agent is ONLINE.
    reach(&mut events, pb::AgentState::Failed, server).await;
    cli(server, &["start", &id]).await;
    let online = reach(&mut events, pb::AgentState::Online, server).await;
    assert_eq!(online.triggered_by, "docker-driver");
    assert_eq!(status(&inspect(&fleet.docker, &name).await), "running");
}

/// A daemon started for one test in a directory of its own: stopped when
/// the test ends, passed or failed.
struct OwnDaemon(tempfile::TempDir);

impl Drop for OwnDaemon {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/docker.sh");
        let _ = std::process::Command::new("bash")
            .arg(script)
            .arg("stop")
            .arg(self.0.path())
            .output();
    }
}

/// `scripts/docker.sh COMMAND DIR`; `DOCKER_HOST` of a started daemon.
fn docker_script(command: &str, dir: &std::path::Path) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/docker.sh");
    let output = std::process::Command::new("bash")
        .arg(script)
        .arg(command)
        .arg(dir)
        .output()
        .expect("run scripts/docker.sh");
    assert!(
        output.status.success(),
        "docker.sh {command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .trim_start_matches("DOCKER_HOST=")
        .to_string()
}

/// A transition's metadata as text (numbers and booleans as JSON prints
/// them).
fn common_metadata(transition: &pb::StateTransition) -> std::collections::HashMap<String, String> {
    use prost_types::value::Kind;
    transition
        .metadata
        .as_ref()
        .map(|s| {
            s.fields
                .iter()
                .map(|(k, v)| {
                    let text = match &v.kind {
                        Some(Kind::StringValue(s)) => s.clone(),
                        Some(Kind::NumberValue(n)) => format!("{n}"),
                        Some(Kind::BoolValue(b)) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    (k.clone(), text)
                })
                .collect()
        })
        .unwrap_or_default()
}
