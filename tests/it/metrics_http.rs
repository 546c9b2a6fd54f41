//! `/metrics` on `--http-listen`, from the real binary: the Prometheus text
//! format with the service's metrics (agents per state, transitions by
//! edge, refusals by reason, per-RPC latency by method and code, open watch
//! streams, the store's oldest retained sequence and size), and
//! `promtool check metrics` accepts the scrape.
//!
//! promtool comes from Debian's `prometheus` package, which `scripts/test.sh`
//! installs; locally without it the promtool check is skipped with a note,
//! under CI it fails.

use crate::common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use agent_lifecycle::api::grpc::pb::{self, AgentState as S};
use common::process::ServerProcess;

/// One HTTP/1.1 GET; the status line and the body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// The value of the sample `name{labels}` (labels as printed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_are_scraped_in_the_prometheus_format() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("sqlite://{}", dir.path().join("m.db").display());
    let server = ServerProcess::start(&["--store", &store, "--http-listen", "127.0.0.1:0"]);
    let http = server
        .http_addr(Duration::from_secs(10))
        .expect("the server prints its HTTP address");
    let mut c = server.client().await;
    let agent = common::online(&mut c, &[]).await;
    let refused = common::transition(&mut c, &agent.agent_id, S::Deployed).await;
    assert!(refused.is_err());
    let _watch = common::watch(&mut c, pb::WatchEventsRequest::default()).await;

    let (status, text) = get(http, "/metrics");
    assert!(status.contains("200"), "{status}");
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&text, series), Some(value), "{series}\n{text}");
    };
    expect("agent_lifecycle_agents{state=\"online\"}", 1.0);
    expect(
        "agent_lifecycle_transitions_total{from=\"deployed\",source=\"client\",to=\"starting\"}",
        1.0,
    );
    expect(
        "agent_lifecycle_refused_total{reason=\"invalid_transition\"}",
        1.0,
    );
    expect(
        "agent_lifecycle_rpc_duration_seconds_count{code=\"OK\",method=\"RegisterAgent\"}",
        1.0,
    );
    expect(
        "agent_lifecycle_rpc_duration_seconds_count{code=\"FAILED_PRECONDITION\",method=\"TransitionAgent\"}",
        1.0,
    );
    expect("agent_lifecycle_watch_streams", 1.0);
    expect("agent_lifecycle_oldest_sequence", 1.0);
    expect("agent_lifecycle_head_sequence", 5.0);
    assert!(sample(&text, "agent_lifecycle_store_size_bytes").is_some_and(|s| s > 0.0));
    assert!(text.contains("# TYPE agent_lifecycle_commit_duration_seconds histogram"));

    let (status, _) = get(http, "/nowhere");
    assert!(status.contains("404"), "{status}");

    promtool_accepts(&text);
}

/// `promtool check metrics` on `text`.
fn promtool_accepts(text: &str) {
    let promtool = match Command::new("promtool").arg("--version").output() {
        Ok(_) => "promtool",
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("promtool is not installed; CI must check the metrics with it")
        }
        Err(_) => {
            eprintln!("promtool is not installed: skipping `promtool check metrics`");
            return;
        }
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool ends");
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
