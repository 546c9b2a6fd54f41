//! The client libraries (clients/python, clients/typescript) against the
//! real server binary, under the failures a monitor meets: the server killed
//! with SIGKILL and restarted on its SQLite file, a proxy cutting streams in
//! the middle, a PostgreSQL fleet losing the process a watch was on, a
//! compaction overtaking a paused watcher, and a transition whose reply was
//! lost after it committed. Each scenario runs every library's scenario
//! program (see `script`) and compares what its watch yielded with the
//! server's own log: the same sequences, none twice, none missing.
//!
//! Needs `$AGENT_LIFECYCLE_PYTHON` with clients/python installed and a
//! built clients/typescript (scripts/test.sh does both); missing ones fail
//! these tests, they never skip.

mod api;
pub(crate) mod proxy;
mod script;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agent_lifecycle::api::grpc::pb;
use tokio::task::JoinHandle;

use crate::common::{self, Client, process::ServerProcess};
use proxy::Proxy;
use script::{ALL, Lang, Script};

fn sqlite_server(db: &std::path::Path) -> ServerProcess {
    let store = format!("sqlite://{}", db.display());
    ServerProcess::start(&[
        "--log",
        "warn",
        "--store",
        &store,
        "--progress-interval",
        "1s",
    ])
}

/// One full lifecycle of a new agent: 9 events.
async fn lifecycle(client: &mut Client) -> Result<(), tonic::Status> {
    let id = uuid::Uuid::new_v4().to_string();
    macro_rules! call {
        ($method:ident, $request:ident) => {
            client
                .$method(pb::$request {
                    agent_id: id.clone(),
                    ..Default::default()
                })
                .await?;
        };
    }
    call!(register_agent, RegisterAgentRequest);
    call!(deploy_agent, DeployAgentRequest);
    call!(start_agent, StartAgentRequest);
    call!(assign_task, AssignTaskRequest);
    call!(complete_task, CompleteTaskRequest);
    call!(stop_agent, StopAgentRequest);
    Ok(())
}

/// Lifecycles on `url`, `count` of them or until the server goes away.
fn produce(url: String, count: usize) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut client = common::connect(&url).await;
        for done in 0..count {
            if lifecycle(&mut client).await.is_err() {
                return done;
            }
        }
        count
    })
}

async fn head(client: &mut Client) -> u64 {
    client
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default())
        .await
        .expect("metrics")
        .into_inner()
        .head_sequence
}

/// The sequences of the server's log from `from` to its head, read with a
/// plain watch: what every client watch must have yielded.
async fn log_sequences(url: &str, from: u64) -> Vec<u64> {
    let mut client = common::connect(url).await;
    let head = head(&mut client).await;
    let mut out = Vec::new();
    if head < from {
        return out;
    }
    let mut stream = common::watch(
        &mut client,
        pb::WatchEventsRequest {
            start_sequence: from,
            ..Default::default()
        },
    )
    .await;
    while out.last().is_none_or(|&s| s < head) {
        out.push(common::next_event(&mut stream).await.sequence);
    }
    out
}

/// Ends `script`'s watch at the server's head and checks that it yielded
/// exactly the log from `from` on; returns the connections it used and
/// what it printed.
async fn finish_watch(mut script: Script, url: &str, from: u64) -> (usize, Vec<String>) {
    let expected = log_sequences(url, from).await;
    let head = *expected.last().expect("events to compare");
    script.send(&format!("until {head}"));
    script.wait_for_event(head);
    let lines = script.finish();
    let done = lines
        .iter()
        .find_map(|l| l.strip_prefix("done "))
        .unwrap_or_else(|| panic!("no done line in {lines:?}"));
    let yielded: Vec<u64> = lines
        .iter()
        .filter_map(|l| script::event_sequence(l))
        .collect();
    assert_eq!(
        yielded, expected,
        "the watch yielded the log exactly once, in order"
    );
    (done.trim().parse().expect("connections"), lines)
}

/// Scenario: for each client library, a watch from sequence 1 through a
/// proxy to a SQLite server; while agents are being driven, the server is
/// killed with SIGKILL, restarted on the same file (on a new port, which
/// the proxy moves to) and driven again. The watch yields every event of
/// the log once, in order, before and after the crash, on more than one
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_sigkill_and_restart_on_sqlite() {
    for lang in ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("lifecycle.db");
        let mut server = sqlite_server(&db);
        let proxy = Proxy::start(&server.addr).await;
        assert_eq!(produce(server.url(), 1).await.expect("join"), 1);
        let mut script = Script::start(
            lang,
            &["watch", "--endpoints", &proxy.endpoint(), "--from", "1"],
        );
        script.wait_for_event(9);
        let load = produce(server.url(), 1000);
        script.wait_for_event(27);
        server.kill();
        let before = load.await.expect("join");
        assert!(before < 1000, "{lang:?}: the load stopped with the server");
        let server = sqlite_server(&db);
        proxy.set_upstream(&server.addr);
        assert_eq!(produce(server.url(), 2).await.expect("join"), 2);
        let (connections, lines) = finish_watch(script, &server.url(), 1).await;
        assert!(
            connections >= 2,
            "{lang:?}: reconnected after the crash: {lines:#?}"
        );
    }
}

/// Scenario: for each client library, a watch through a proxy while
/// lifecycles run without pause; the proxy drops the watch's connection in
/// the middle of the stream, and again once the watch has reconnected and
/// received more. The watch reconnects each time and yields the whole log
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_a_proxy_cuts_the_stream() {
    let server = ServerProcess::start(&[
        "--log",
        "warn",
        "--store",
        "memory",
        "--progress-interval",
        "1s",
    ]);
    for lang in ALL {
        let proxy = Proxy::start(&server.addr).await;
        let from = head(&mut server.client().await).await + 1;
        let from_text = from.to_string();
        let mut script = Script::start(
            lang,
            &[
                "watch",
                "--endpoints",
                &proxy.endpoint(),
                "--from",
                &from_text,
            ],
        );
        let stop = Arc::new(AtomicBool::new(false));
        let load = produce_until(server.url(), Arc::clone(&stop));
        script.wait_for_event(from + 60);
        for connection in [2, 3] {
            proxy.cut();
            let line = format!("connection {connection}");
            script.wait_for(&line, |l| l == line);
            script.wait_for("an event on the new connection", |l| {
                script::event_sequence(l).is_some()
            });
        }
        stop.store(true, Ordering::SeqCst);
        assert!(load.await.expect("join") > 0);
        let (connections, lines) = finish_watch(script, &server.url(), from).await;
        assert!(
            connections >= 3,
            "{lang:?}: one connection per cut: {lines:#?}"
        );
    }
}

/// Lifecycles on `url` until `stop` is set (or the server goes away);
/// returns how many were done.
fn produce_until(url: String, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut client = common::connect(&url).await;
        let mut done = 0;
        while !stop.load(Ordering::SeqCst) && lifecycle(&mut client).await.is_ok() {
            done += 1;
        }
        done
    })
}

/// Scenario: two server processes share one PostgreSQL database; for each
/// client library, a watch that starts from a snapshot is given both
/// endpoints and connects to the first. That process is killed with
/// SIGKILL while agents are driven through the second: the watch moves to
/// the second process and yields every event after the snapshot's head
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_moves_between_processes_of_a_postgres_fleet() {
    let Some(url) = common::postgres_database("clients").await else {
        return;
    };
    for lang in ALL {
        let args = [
            "--log",
            "warn",
            "--store",
            url.as_str(),
            "--progress-interval",
            "1s",
        ];
        let mut first = ServerProcess::start(&args);
        let second = ServerProcess::start(&args);
        assert_eq!(produce(second.url(), 1).await.expect("join"), 1);
        let endpoints = format!("{},{}", first.addr, second.addr);
        let mut script = Script::start(lang, &["watch", "--endpoints", &endpoints, "--snapshot"]);
        let line = script.wait_for("the snapshot", |l| l.starts_with("snapshot "));
        let snapshot_head: u64 = line
            .split_whitespace()
            .nth(2)
            .and_then(|h| h.parse().ok())
            .expect("head");
        let load = produce(second.url(), 20);
        script.wait_for_event(snapshot_head + 50);
        first.kill();
        assert_eq!(load.await.expect("join"), 20);
        let (connections, lines) = finish_watch(script, &second.url(), snapshot_head + 1).await;
        assert!(
            connections >= 2,
            "{lang:?}: moved to the second process: {lines:#?}"
        );
    }
}

/// Scenario: a server that keeps only the newest 20 events; for each client
/// library, a watch from the first event pauses after 3 events (reading
/// nothing, with a small HTTP/2 window) while 300 large transitions are
/// committed and compaction deletes the events it still needed. When it
/// reads again it yields what was already on its way, then fails with the
/// typed compaction error naming the oldest sequence kept, which lies past
/// the last event it yielded: nothing was skipped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_that_overtakes_a_slow_watcher_is_reported() {
    let server = ServerProcess::start(&[
        "--log",
        "warn",
        "--store",
        "memory",
        "--retain-events",
        "20",
        "--event-buffer",
        "16",
        "--compaction-interval",
        "100ms",
        "--progress-interval",
        "1s",
    ]);
    let mut client = server.client().await;
    for lang in ALL {
        let agent = common::online(&mut client, &[]).await;
        // The agent's five events (registration to ONLINE) are the newest.
        let from = head(&mut client).await - 4;
        let from_text = from.to_string();
        let mut script = Script::start(
            lang,
            &[
                "watch",
                "--endpoints",
                &server.addr,
                "--from",
                &from_text,
                "--pause-after",
                "3",
                "--small-window",
            ],
        );
        let paused: u64 = script
            .wait_for("the pause", |l| l.starts_with("paused "))
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("paused sequence");
        busy_idle(&mut client, &agent.agent_id, 300).await;
        wait_compacted(&mut client, paused + 1).await;
        script.send("go");
        let line = script.wait_for("the compaction error", |l| l.starts_with("compacted "));
        let oldest: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("oldest");
        let yielded = script.events();
        let last = *yielded.last().expect("events");
        assert_eq!(
            yielded,
            (from..=last).collect::<Vec<_>>(),
            "{lang:?}: no gap before the error"
        );
        assert!(
            oldest > last + 1,
            "{lang:?}: oldest kept {oldest} lies past the last yielded {last}"
        );
        script.finish();
    }
}

/// `count` transitions of an ONLINE agent, BUSY and IDLE in turn, each
/// with 8000 bytes of metadata.
async fn busy_idle(client: &mut Client, agent_id: &str, count: usize) {
    let metadata = padding(8000);
    for i in 0..count {
        let target = if i % 2 == 0 {
            pb::AgentState::Busy
        } else {
            pb::AgentState::Idle
        };
        client
            .transition_agent(pb::TransitionAgentRequest {
                agent_id: agent_id.to_string(),
                target_state: target as i32,
                metadata: Some(metadata.clone()),
                ..Default::default()
            })
            .await
            .expect("transition");
    }
}

/// Transition metadata `{"padding": "xxx..."}` of `bytes` characters,
/// which makes each event about twice that size on the wire.
fn padding(bytes: usize) -> prost_types::Struct {
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("x".repeat(bytes))),
    };
    prost_types::Struct {
        fields: [("padding".to_string(), value)].into_iter().collect(),
    }
}

/// Waits (bounded) until a watch from `sequence` is refused as compacted.
async fn wait_compacted(client: &mut Client, sequence: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = client
            .watch_events(pb::WatchEventsRequest {
                start_sequence: sequence,
                ..Default::default()
            })
            .await
            .err()
            .is_some_and(|status| status.code() == tonic::Code::OutOfRange);
        if refused {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "compaction passes sequence {sequence} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Scenario: for each client library, TransitionAgent(IDLE) on an ONLINE
/// agent through a proxy that drops the connection when the server's reply
/// starts: the transition has committed, the client never hears of it. The
/// client retries with the same request_id and gets the original answer:
/// the call succeeds and the agent's history holds exactly one transition
/// to IDLE, with the sequence the client printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_transition_whose_reply_was_lost_applies_once() {
    let server = ServerProcess::start(&["--log", "warn", "--store", "memory"]);
    let mut client = server.client().await;
    for lang in [Lang::Python, Lang::TypeScript] {
        let agent = common::online(&mut client, &[]).await;
        let proxy = Proxy::start(&server.addr).await;
        proxy.lose_next_reply();
        let endpoint = proxy.endpoint();
        let script = Script::start(
            lang,
            &[
                "transition",
                "--endpoints",
                &endpoint,
                "--agent",
                &agent.agent_id,
                "--target",
                "idle",
            ],
        );
        let lines = script.finish();
        assert_eq!(proxy.lost_replies(), 1, "{lang:?}: one reply was lost");
        let ok = lines
            .iter()
            .find_map(|l| l.strip_prefix("ok "))
            .expect("ok line");
        let sequence: u64 = ok
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("sequence");
        let history = client
            .get_agent_history(pb::GetAgentHistoryRequest {
                agent_id: agent.agent_id.clone(),
                ..Default::default()
            })
            .await
            .expect("history")
            .into_inner()
            .transitions;
        let idle: Vec<u64> = history
            .iter()
            .filter(|t| t.to_state == pb::AgentState::Idle as i32)
            .map(|t| t.sequence)
            .collect();
        assert_eq!(
            idle,
            vec![sequence],
            "{lang:?}: exactly one transition, the one answered"
        );
    }
}
