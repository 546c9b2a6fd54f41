//! The deployment files under deploy/: the container image is built from
//! deploy/docker/Dockerfile.runtime on a real Docker daemon and serves; the
//! Kubernetes manifests are well formed and their config files are ones the
//! server accepts; the systemd unit passes `systemd-analyze verify`.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use agent_lifecycle::pb;

use crate::common::{self, process::ServerProcess};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// How long a build, a start or a stop may take.
const STEP: Duration = Duration::from_secs(120);

/// Under CI a missing tool fails the test; elsewhere the test skips.
fn required(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is missing; CI must run this test");
    }
    eprintln!("{what} is missing: skipping");
    false
}

/// `docker -H HOST ARGS...` (Debian's client), its stdout; fails the test
/// on a non-zero exit.
fn docker(host: &str, args: &[&str]) -> String {
    let output = Command::new("/usr/bin/docker")
        .arg("-H")
        .arg(host)
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The image of Dockerfile.runtime over this build's binary runs the
/// server as its unprivileged user with the store on its volume, answers
/// gRPC, and stops cleanly on `docker stop` (SIGTERM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_image_serves() {
    let host = std::env::var("TEST_DOCKER_HOST").unwrap_or_default();
    let base = std::env::var("TEST_DOCKER_BASE").unwrap_or_default();
    if !required(
        "TEST_DOCKER_HOST and TEST_DOCKER_BASE (scripts/test.sh)",
        !host.is_empty() && !base.is_empty(),
    ) {
        return;
    }
    let context = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        env!("CARGO_BIN_EXE_agent-lifecycle"),
        context.path().join("agent-lifecycle"),
    )
    .expect("copy the binary");
    let tag = format!(
        "agent-lifecycle-test/server:{}",
        uuid::Uuid::new_v4().simple()
    );
    let dockerfile = Path::new(REPO).join("deploy/docker/Dockerfile.runtime");
    let context_path = context.path().to_str().expect("utf-8").to_string();
    let dockerfile = dockerfile.to_str().expect("utf-8").to_string();
    let build_host = host.clone();
    let build_tag = tag.clone();
    let build_base = format!("RUNTIME_IMAGE={base}");
    tokio::time::timeout(
        STEP,
        tokio::task::spawn_blocking(move || {
            docker(
                &build_host,
                &[
                    "build",
                    "-q",
                    "-f",
                    &dockerfile,
                    "--build-arg",
                    "BINARY=agent-lifecycle",
                    "--build-arg",
                    &build_base,
                    "-t",
                    &build_tag,
                    &context_path,
                ],
            )
        }),
    )
    .await
    .expect("the build finishes")
    .expect("join");

    // Host networking (the test daemon has no bridge) and an ephemeral
    // port, as every test server here.
    let container = docker(
        &host,
        &[
            "run",
            "-d",
            "--network",
            "host",
            &tag,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let addr = listening_address(&host, &container).await;
    let mut client = common::connect(&format!("http://{addr}")).await;
    let agent = common::register(&mut client, &[("team", "ops")]).await;
    let got = common::get_agent(&mut client, &agent.agent_id).await;
    assert_eq!(got.state, pb::AgentState::Registered as i32);
    assert_eq!(docker(&host, &["exec", &container, "id", "-u"]), "65532");
    let store = docker(
        &host,
        &["exec", &container, "ls", "/var/lib/agent-lifecycle"],
    );
    assert!(store.contains("agent-lifecycle.db"), "{store}");

    let stop_host = host.clone();
    let stop_container = container.clone();
    tokio::time::timeout(
        STEP,
        tokio::task::spawn_blocking(move || {
            docker(&stop_host, &["stop", "-t", "30", &stop_container])
        }),
    )
    .await
    .expect("the stop finishes")
    .expect("join");
    let exit = docker(&host, &["inspect", "-f", "{{.State.ExitCode}}", &container]);
    assert_eq!(exit, "0", "SIGTERM stops the server cleanly");
    docker(&host, &["rm", "-v", &container]);
    docker(&host, &["rmi", &tag]);
}

/// Follows the container's log until the server prints its address.
async fn listening_address(host: &str, container: &str) -> String {
    let mut logs = Command::new("/usr/bin/docker")
        .args(["-H", host, "logs", "-f", container])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker logs");
    let stdout = logs.stdout.take().expect("stdout");
    let read = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("listening on ").map(str::to_string))
    });
    let found = tokio::time::timeout(STEP, read).await;
    let _ = logs.kill();
    let _ = logs.wait();
    found
        .expect("the server prints its address in time")
        .expect("join")
        .expect("a listening line")
}

/// The manifests parse, name their objects, and agree with themselves
/// (probes and services point at ports the containers have); the config
/// file each carries starts a real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_manifests_hold_together() {
    let python = std::env::var("AGENT_LIFECYCLE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(REPO).join("tests/python/manifests_test.py");
    let out_dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(&python)
        .arg(&script)
        .arg(Path::new(REPO).join("deploy/kubernetes"))
        .arg(out_dir.path())
        .output()
        .expect("run the manifest checks");
    let text = String::from_utf8_lossy(&output.stdout);
    if output.status.code() == Some(3) && !required("PyYAML in $AGENT_LIFECYCLE_PYTHON", false) {
        return;
    }
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let configs: Vec<PathBuf> = std::fs::read_dir(out_dir.path())
        .expect("configs")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(configs.len(), 2, "one config file per manifest: {text}");
    for config in configs {
        let server = ServerProcess::start(&[
            "--config",
            config.to_str().expect("utf-8"),
            "--http-listen",
            "127.0.0.1:0",
            "--store",
            "memory",
        ]);
        let mut client = server.client().await;
        // The file's principal guards the API: an anonymous call is refused.
        let err = client
            .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default())
            .await
            .expect_err("no token");
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "{}",
            config.display()
        );
    }
}

/// The systemd unit passes `systemd-analyze verify` (with ExecStart on this
/// build's binary): no unknown key, no bad value.
#[test]
fn the_systemd_unit_verifies() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !required("systemd-analyze", analyze.exists()) {
        return;
    }
    let unit =
        std::fs::read_to_string(Path::new(REPO).join("deploy/systemd/agent-lifecycle.service"))
            .expect("the unit");
    let unit = unit.replace(
        "/usr/local/bin/agent-lifecycle",
        env!("CARGO_BIN_EXE_agent-lifecycle"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent-lifecycle.service");
    std::fs::write(&path, unit).expect("write the unit");
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let complaints = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "{complaints}"
    );
}
