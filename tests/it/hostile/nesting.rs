//! Deeply nested metadata.

use super::*;

// ---------------------------------------------------------------------------
// Deeply nested metadata

/// Metadata nested `depth` levels: `{"a": {"a": ... {}}}`, or lists in
/// lists under one key.
pub(super) fn nested_metadata(depth: usize, lists: bool) -> Struct {
    if lists {
        let mut value = Value {
            kind: Some(Kind::ListValue(ListValue::default())),
        };
        for _ in 1..depth {
            value = Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![value],
                })),
            };
        }
        return Struct {
            fields: [("a".to_string(), value)].into(),
        };
    }
    let mut inner = Struct::default();
    for _ in 0..depth {
        let value = Value {
            kind: Some(Kind::StructValue(inner)),
        };
        inner = Struct {
            fields: [("a".to_string(), value)].into(),
        };
    }
    inner
}

/// Metadata nested from 1 to 1000 levels: up to the allowed depth accepted
/// and then readable by every client through GetAgent, GetAgentHistory,
/// ListAgents and WatchEvents; deeper, refused (INVALID_ARGUMENT naming
/// `metadata`, or the decoder's INTERNAL past its recursion limit), never
/// stored; a watcher open meanwhile keeps receiving events.
#[tokio::test]
pub(super) async fn deeply_nested_metadata_is_refused_or_stays_readable() {
    let mut server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let mut watcher = common::watch(&mut client, pb::WatchEventsRequest::default()).await;
    let mut raw = RawClient::new(common::channel(&server.url()).await);
    let mut checks = Checks::default();
    let probe = ("probe", "deep");
    let mut accepted = 0;
    for lists in [false, true] {
        for depth in [
            1, 8, 15, 16, 24, 30, 31, 32, 33, 34, 40, 48, 64, 100, 200, 1000,
        ] {
            // Levels as the limit counts them: the metadata object is 1.
            let levels = depth + 1;
            let what = format!(
                "RegisterAgent with metadata {depth} {} deep",
                if lists { "lists" } else { "objects" }
            );
            let agent_id = uuid::Uuid::new_v4().to_string();
            let request = pb::RegisterAgentRequest {
                agent_id: agent_id.clone(),
                labels: HashMap::from([(probe.0.to_string(), probe.1.to_string())]),
                metadata: Some(nested_metadata(depth, lists)),
                ..Default::default()
            };
            let answer = timed(
                &what,
                raw.unary("RegisterAgent", request.encode_to_vec().into()),
            )
            .await;
            let bytes = match answer {
                Ok(bytes) => bytes,
                // Past the protobuf decoder's recursion limit (about 33
                // levels of Struct, 64 of lists) the request itself cannot
                // be decoded: INTERNAL, as gRPC specifies for a request that
                // does not parse. Short of it, the server's own depth cap
                // answers INVALID_ARGUMENT naming the field.
                Err(status)
                    if levels > MAX_METADATA_DEPTH
                        && status.code() == Code::Internal
                        && status.message().contains("recursion limit reached") =>
                {
                    continue;
                }
                Err(status) => {
                    checks.invalid(&what, Err::<(), _>(status), "metadata");
                    continue;
                }
            };
            if levels > MAX_METADATA_DEPTH {
                checks.0.push(format!(
                    "{what}: accepted, deeper than the {MAX_METADATA_DEPTH} levels allowed"
                ));
            }
            accepted += 1;
            if let Err(e) = pb::RegisterAgentResponse::decode(bytes) {
                checks.0.push(format!(
                    "{what}: accepted, but its response cannot be decoded: {}",
                    truncated(&e.to_string())
                ));
            }
            let result = timed(
                "GetAgent",
                client.get_agent(pb::GetAgentRequest {
                    agent_id: agent_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
            checks.code(&format!("{what}: GetAgent"), result, Code::Ok);
            let result = timed(
                "GetAgentHistory",
                client.get_agent_history(pb::GetAgentHistoryRequest {
                    agent_id: agent_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
            checks.code(&format!("{what}: GetAgentHistory"), result, Code::Ok);
            let result = timed(
                "WatchEvents",
                client.watch_events(pb::WatchEventsRequest {
                    agent_ids: vec![agent_id.clone()],
                    start_sequence: 1,
                    ..Default::default()
                }),
            )
            .await;
            if let Some(stream) = checks.code(&format!("{what}: WatchEvents"), result, Code::Ok) {
                let mut stream = stream.into_inner();
                let first = timed("the replayed registration", stream.message()).await;
                checks.code(
                    &format!("{what}: its replayed registration event"),
                    first,
                    Code::Ok,
                );
            }
        }
    }
    assert_eq!(accepted, 6, "depths 1, 8 and 15, as objects and as lists");
    let result = timed(
        "ListAgents",
        client.list_agents(pb::ListAgentsRequest {
            labels: HashMap::from([(probe.0.to_string(), probe.1.to_string())]),
            ..Default::default()
        }),
    )
    .await;
    checks.code("ListAgents of the accepted agents", result, Code::Ok);

    // The watcher that was open all along receives the next event.
    let after = register(&mut client, &[("role", "after-deep")])
        .await
        .agent_id;
    loop {
        match timed("the open watcher", watcher.message()).await {
            Ok(Some(pb::WatchEventsResponse {
                kind: Some(pb::watch_events_response::Kind::Event(event)),
            })) if event.agent_id == after => break,
            Ok(Some(_)) => continue,
            Ok(None) => {
                checks
                    .0
                    .push("the watcher open during the attack: its stream ended".into());
                break;
            }
            Err(status) => {
                checks.0.push(format!(
                    "the watcher open during the attack: its stream failed: {:?} {}",
                    status.code(),
                    truncated(status.message())
                ));
                break;
            }
        }
    }
    checks.assert_none(&server);
    assert_survived(&mut server, &bystanders).await;
}
