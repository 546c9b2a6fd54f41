//! Watch floods: memory stays bounded and watchers stay served.

use super::*;

// ---------------------------------------------------------------------------
// Watch floods

/// Connections per flood round, and watch streams opened on each.
pub(super) const FLOOD_CONNECTIONS: usize = 5;
pub(super) const FLOOD_STREAMS: usize = 100;
/// Rounds after the first (which warms the allocator up).
pub(super) const FLOOD_ROUNDS: usize = 10;
/// Agents that snapshots carry.
pub(super) const FLEET: usize = 300;

/// Live, snapshot, full replay and filtered snapshot streams, in turn.
pub(super) fn flood_request(i: usize) -> pb::WatchEventsRequest {
    match i % 4 {
        0 => pb::WatchEventsRequest::default(),
        1 => pb::WatchEventsRequest {
            include_snapshot: true,
            ..Default::default()
        },
        2 => pb::WatchEventsRequest {
            start_sequence: 1,
            ..Default::default()
        },
        _ => pb::WatchEventsRequest {
            labels: HashMap::from([("team".to_string(), "fleet".to_string())]),
            include_snapshot: true,
            ..Default::default()
        },
    }
}

/// One round: opens FLOOD_STREAMS watch streams on each of
/// FLOOD_CONNECTIONS connections and reads none of them; a well-behaved
/// client (on its own connection) is served meanwhile; then the streams of
/// all connections but one are dropped (reset) and the last connection is
/// cut with its streams open. Returns the server's resident memory while
/// the streams were open.
pub(super) async fn flood_round(
    server: &ServerProcess,
    client: &mut Client,
    bystander: &str,
) -> u64 {
    let mut channels = Vec::new();
    for _ in 1..FLOOD_CONNECTIONS {
        channels.push(common::channel(&server.url()).await);
    }
    let (cuttable, cut) = raw::cuttable_channel(&server.url()).await;
    channels.push(cuttable);
    let opens = channels.iter().enumerate().flat_map(|(c, channel)| {
        (0..FLOOD_STREAMS).map(move |i| {
            let mut client = Client::new(channel.clone());
            async move {
                client
                    .watch_events(flood_request(c * FLOOD_STREAMS + i))
                    .await
            }
        })
    });
    let opened = timed("opening the flood", futures_util::future::join_all(opens)).await;
    let mut streams = Vec::with_capacity(opened.len());
    for result in opened {
        streams.push(
            result
                .expect("a watch stream of the flood opens")
                .into_inner(),
        );
    }
    get_agent(client, bystander).await;
    let open = server.resident_memory();

    let on_cut = streams.split_off((FLOOD_CONNECTIONS - 1) * FLOOD_STREAMS);
    drop(streams);
    cut.cut();
    drop(on_cut);
    channels.pop();
    // A call on each connection after its resets.
    for channel in &channels {
        let mut client = Client::new(channel.clone());
        timed(
            "after the resets",
            client.get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default()),
        )
        .await
        .expect("GetLifecycleMetrics after the resets");
    }
    open
}

/// Rounds of 500 WatchEvents streams, opened and dropped unread or cut
/// with their connection: every stream opens, well-behaved calls are
/// served meanwhile, the server's resident memory after the last round is
/// within MEMORY_GROWTH_BOUND of after the first, and a new watcher still
/// receives a new event.
#[tokio::test]
pub(super) async fn watch_floods_leave_memory_bounded_and_watchers_served() {
    let mut server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let bystander = bystanders.agents[2].0.agent_id.clone();
    for i in 0..FLEET {
        let n = i.to_string();
        register(&mut client, &[("team", "fleet"), ("n", &n)]).await;
    }
    let started = Instant::now();
    let warm = flood_round(&server, &mut client, &bystander).await;
    let before = server.resident_memory();
    let mut peak = warm;
    for _ in 0..FLOOD_ROUNDS {
        peak = peak.max(flood_round(&server, &mut client, &bystander).await);
        server.assert_running();
    }

    // A new watcher receives a new event.
    let mut watcher = common::watch(&mut client, pb::WatchEventsRequest::default()).await;
    let fresh = register(&mut client, &[("role", "after-flood")]).await;
    let event = next_event(&mut watcher).await;
    assert_eq!(
        (event.agent_id.as_str(), event.r#type),
        (fresh.agent_id.as_str(), pb::EventType::Registered as i32)
    );
    drop(watcher);
    let after = server.resident_memory();
    println!(
        "{} streams in {:?}; resident memory: {:.1} MiB after the first round, {:.1} MiB at most with streams open, {:.1} MiB after the last round",
        (FLOOD_ROUNDS + 1) * FLOOD_CONNECTIONS * FLOOD_STREAMS,
        started.elapsed(),
        mib(before),
        mib(peak),
        mib(after)
    );
    assert!(
        after <= before + MEMORY_GROWTH_BOUND,
        "resident memory grew from {:.1} MiB to {:.1} MiB over {FLOOD_ROUNDS} rounds{}",
        mib(before),
        mib(after),
        server.log()
    );
    assert_survived(&mut server, &bystanders).await;
}
