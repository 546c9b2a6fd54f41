//! The library's Rust client (`agent_lifecycle::client`) against real
//! servers: its watch resumes by itself across a SIGKILL and restart of the
//! server, a connection cut by a proxy, and the loss of one process of a
//! PostgreSQL fleet, yielding every event once and in order; compaction
//! that overtakes a slow watcher is its own error; a change whose reply
//! was lost is retried and applied once.

use std::time::Duration;

use agent_lifecycle::{
    client::{Client, ClientError, ClientOptions, WatchItem, WatchOptions},
    pb,
};
use futures_util::StreamExt;

use crate::{
    clients::proxy::Proxy,
    common::{self, process::ServerProcess},
};

/// How long one item of a watch may take.
const STEP: Duration = Duration::from_secs(30);

/// Registers an agent and moves it `flips` times (ONLINE <-> IDLE), one
/// event each after its five-event start, through `client`.
async fn busy_agent(client: &Client, flips: usize) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    client
        .register(pb::RegisterAgentRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("register");
    for step in [
        pb::AgentState::Deploying,
        pb::AgentState::Deployed,
        pb::AgentState::Starting,
        pb::AgentState::Online,
    ] {
        transition(client, &id, step).await;
    }
    flip(client, &id, flips).await;
    id
}

async fn flip(client: &Client, id: &str, flips: usize) {
    let agent = client.get_agent(id).await.expect("get");
    let mut online = agent.state == pb::AgentState::Online as i32;
    for _ in 0..flips {
        let target = if online {
            pb::AgentState::Idle
        } else {
            pb::AgentState::Online
        };
        transition(client, id, target).await;
        online = !online;
    }
}

async fn transition(client: &Client, id: &str, target: pb::AgentState) {
    client
        .transition(pb::TransitionAgentRequest {
            agent_id: id.to_string(),
            target_state: target as i32,
            ..Default::default()
        })
        .await
        .expect("transition");
}

/// The next `n` event sequences of `watch`, within [`STEP`] in all.
async fn sequences(watch: &mut agent_lifecycle::client::Watch, n: usize) -> Vec<u64> {
    let read = async {
        let mut seen = Vec::new();
        while seen.len() < n {
            let item = watch
                .next()
                .await
                .expect("the watch goes on")
                .expect("no error");
            if let WatchItem::Event(event) = item {
                seen.push(event.sequence);
            }
        }
        seen
    };
    tokio::time::timeout(STEP, read)
        .await
        .unwrap_or_else(|_| panic!("{n} events within {STEP:?}"))
}

/// SQLite; the watch goes through a proxy, which is pointed at the server
/// again after it is killed with SIGKILL and restarted on the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_resumes_across_a_killed_and_restarted_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("sqlite://{}", dir.path().join("client.db").display());
    let mut server = ServerProcess::start(&["--log", "warn", "--store", &store]);
    let proxy = Proxy::start(&server.addr).await;
    let client = Client::connect(
        &format!("http://{}", proxy.endpoint()),
        ClientOptions::default(),
    )
    .await
    .expect("connect");
    let mut watch = client.watch(WatchOptions::from_sequence(1));
    busy_agent(&client, 5).await;
    assert_eq!(
        sequences(&mut watch, 10).await,
        (1..=10).collect::<Vec<_>>()
    );

    server.kill();
    let server = ServerProcess::start(&["--log", "warn", "--store", &store]);
    proxy.set_upstream(&server.addr);
    busy_agent(&client, 5).await;
    assert_eq!(
        sequences(&mut watch, 10).await,
        (11..=20).collect::<Vec<_>>(),
        "after the restart, from where it was: nothing twice, nothing missing"
    );
}

/// A proxy cuts the connection in the middle of a stream, several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_resumes_after_its_connection_is_cut() {
    let server = ServerProcess::start(&["--log", "warn", "--store", "memory"]);
    let proxy = Proxy::start(&server.addr).await;
    let writer = Client::connect(&server.url(), ClientOptions::default())
        .await
        .expect("connect");
    let watcher = Client::connect(
        &format!("http://{}", proxy.endpoint()),
        ClientOptions::default(),
    )
    .await
    .expect("connect");
    let mut watch = watcher.watch(WatchOptions::from_sequence(1));
    let id = busy_agent(&writer, 0).await;
    let mut seen = sequences(&mut watch, 5).await;
    for _ in 0..3 {
        proxy.cut();
        flip(&writer, &id, 4).await;
        seen.extend(sequences(&mut watch, 4).await);
    }
    assert_eq!(seen, (1..=17).collect::<Vec<_>>());
}

/// Two processes on one PostgreSQL database; the client knows both. The
/// one the watch reads from is killed: the watch moves to the other and
/// goes on from the next sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_moves_to_another_process_of_the_fleet() {
    let Some(url) = common::postgres_database("client_fleet").await else {
        return;
    };
    let mut first = ServerProcess::start(&["--log", "warn", "--store", &url]);
    let second = ServerProcess::start(&["--log", "warn", "--store", &url]);
    let client = Client::connect_any(&[&first.url(), &second.url()], ClientOptions::default())
        .expect("client");
    let writer = Client::connect(&second.url(), ClientOptions::default())
        .await
        .expect("connect");
    let mut watch = client.watch(WatchOptions::from_sequence(1));
    let id = busy_agent(&writer, 3).await;
    let mut seen = sequences(&mut watch, 8).await;
    first.kill();
    flip(&writer, &id, 6).await;
    seen.extend(sequences(&mut watch, 6).await);
    assert_eq!(seen, (1..=14).collect::<Vec<_>>());
}

/// A slow watcher loses its connection while the log runs past
/// retention: when it is read again it reconnects from where it was,
/// finds those events compacted, and reports [`ClientError::Compacted`]
/// naming the oldest sequence kept, then ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_that_overtakes_a_slow_watcher_is_its_own_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("sqlite://{}", dir.path().join("compact.db").display());
    let server = ServerProcess::start(&[
        "--log",
        "warn",
        "--store",
        &store,
        "--retain-events",
        "50",
        "--compaction-interval",
        "50ms",
    ]);
    let proxy = Proxy::start(&server.addr).await;
    let client = Client::connect(&server.url(), ClientOptions::default())
        .await
        .expect("connect");
    let slow = Client::connect(
        &format!("http://{}", proxy.endpoint()),
        ClientOptions::default(),
    )
    .await
    .expect("connect");
    let id = busy_agent(&client, 0).await;
    let mut watch = slow.watch(WatchOptions::from_sequence(1));
    assert_eq!(sequences(&mut watch, 5).await, vec![1, 2, 3, 4, 5]);
    // The watcher reads nothing, and loses its connection, while 200
    // events pass and compaction keeps the newest 50.
    proxy.cut();
    flip(&client, &id, 200).await;
    compacted_past(&client, 6).await;
    let mut last = 5;
    let read = async {
        loop {
            let item = watch
                .next()
                .await
                .expect("the watch ends with the error, not silently");
            match item {
                Ok(WatchItem::Event(event)) => {
                    assert_eq!(event.sequence, last + 1, "in order, none missing");
                    last = event.sequence;
                }
                Ok(_) => {}
                Err(ClientError::Compacted { oldest, .. }) => return oldest,
                Err(err) => panic!("unexpected {err}"),
            }
        }
    };
    let oldest = tokio::time::timeout(STEP, read)
        .await
        .expect("the compaction is reported in time");
    assert!(
        oldest > last + 1,
        "the events it missed were compacted: oldest {oldest}, last {last}"
    );
    let ended = tokio::time::timeout(STEP, watch.next())
        .await
        .expect("the end in time");
    assert!(ended.is_none(), "the watch ends after the error");
}

/// A transition whose reply the network loses after the server applied it:
/// the client tries again with the same request id and gets the first
/// outcome; the agent moved once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_reply_was_lost_is_applied_once() {
    let server = ServerProcess::start(&["--log", "warn", "--store", "memory"]);
    let proxy = Proxy::start(&server.addr).await;
    let client = Client::connect(
        &format!("http://{}", proxy.endpoint()),
        ClientOptions::default(),
    )
    .await
    .expect("connect");
    let id = busy_agent(&client, 0).await;
    let before = client.get_agent(&id).await.expect("get").version;
    proxy.lose_next_reply();
    let reply = client
        .transition(pb::TransitionAgentRequest {
            agent_id: id.clone(),
            target_state: pb::AgentState::Busy as i32,
            ..Default::default()
        })
        .await
        .expect("the retry gets the first outcome");
    assert_eq!(proxy.lost_replies(), 1, "a reply was lost");
    assert_eq!(reply.agent.map(|a| a.version), Some(before + 1));
    let agent = client.get_agent(&id).await.expect("get");
    assert_eq!(agent.version, before + 1, "one transition, not two");
    assert_eq!(agent.state, pb::AgentState::Busy as i32);

    // A refused transition is typed, with the allowed targets.
    let err = client
        .transition(pb::TransitionAgentRequest {
            agent_id: id.clone(),
            target_state: pb::AgentState::Registered as i32,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    match err {
        ClientError::TransitionNotAllowed {
            current, allowed, ..
        } => {
            assert_eq!(current, Some(agent_lifecycle::domain::AgentState::Busy));
            assert!(allowed.contains(&agent_lifecycle::domain::AgentState::Idle));
        }
        other => panic!("expected TransitionNotAllowed, got {other:?}"),
    }
}

/// Waits until compaction has deleted the event `sequence` (a watch from
/// it is refused as compacted).
async fn compacted_past(client: &Client, sequence: u64) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut raw = client.raw();
        let opened = raw
            .watch_events(pb::WatchEventsRequest {
                start_sequence: sequence,
                ..Default::default()
            })
            .await;
        match opened.map_err(ClientError::from) {
            Err(ClientError::Compacted { .. }) => return,
            _ if tokio::time::Instant::now() > deadline => {
                panic!("event {sequence} was not compacted within {STEP:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
