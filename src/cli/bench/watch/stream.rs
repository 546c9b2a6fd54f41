//! The subscribers of `bench watch`: each opens one WatchEvents stream
//! (or a bare fan-out subscription), reads it until the coordinator's last
//! sequence, checks that sequences come once and in order, and records
//! each event's latency from its write's scheduled time. Decodes only the
//! sequence and the reason, so the client's CPU goes to the stream.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use bytes::{Buf, Bytes};
use futures_util::{FutureExt, StreamExt};
use prost::Message as _;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tonic::{Streaming, codegen::http::uri::PathAndQuery, transport::Channel};

use agent_lifecycle::api::grpc::pb;

use crate::cli::bench::{
    ceiling::{RawCodec, SUBSCRIBE_PATH},
    client::CALL_TIMEOUT,
};

/// What the coordinator tells subscribers.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Phase {
    /// Sequence of the marker event: report when received.
    pub(super) marker: Option<u64>,
    /// Last committed sequence: stop once received.
    pub(super) last: Option<u64>,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
pub(super) struct SubscriberOutcome {
    /// Events after the marker (duplicates excluded).
    pub(super) received: u64,
    /// Scheduled-to-receive of those, ns.
    pub(super) latencies: Vec<u64>,
    /// Sequences skipped (gap sizes summed).
    pub(super) gap_events: u64,
    /// Events at or below the previous sequence.
    pub(super) duplicates: u64,
    /// Size of the largest message, bytes.
    pub(super) message_bytes: usize,
    pub(super) error: Option<String>,
}

/// The part of `WatchEventsResponse` the subscribers read: the event's
/// sequence and its transition's reason (the write's scheduled time).
/// Wire-compatible with the real message (the `event` member of its oneof
/// is field 1); everything else is skipped undecoded, so the benchmark
/// client spends its CPU on the stream, not on building agents it would
/// throw away.
#[derive(Clone, PartialEq, prost::Message)]
struct LiteResponse {
    #[prost(message, optional, tag = "1")]
    event: Option<LiteEvent>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LiteEvent {
    #[prost(uint64, tag = "1")]
    sequence: u64,
    #[prost(message, optional, tag = "4")]
    transition: Option<LiteTransition>,
}

/// `reason` as bytes: decoded from the message's own buffer without a
/// copy or an allocation.
#[derive(Clone, PartialEq, prost::Message)]
struct LiteTransition {
    #[prost(bytes = "bytes", tag = "4")]
    reason: Bytes,
}

/// What a benchmark run loads: the lifecycle server, or the bare fan-out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Lifecycle,
    /// Messages of this many bytes.
    Bare(usize),
}

/// One received message: its sequence and its write's scheduled time
/// (unix ns); `None` for a message that is no event.
fn decode(target: Target, message: &Bytes) -> Option<(u64, Option<i128>)> {
    match target {
        Target::Lifecycle => {
            let event = LiteResponse::decode(message.clone()).ok()?.event?;
            let scheduled = event.transition.and_then(|t| {
                std::str::from_utf8(&t.reason)
                    .ok()
                    .and_then(|text| text.parse().ok())
            });
            Some((event.sequence, scheduled))
        }
        Target::Bare(_) => {
            let mut bytes = message.as_ref();
            if bytes.len() < 24 {
                return None;
            }
            let sequence = bytes.get_u64_le();
            let scheduled = bytes.get_i128_le();
            Some((sequence, Some(scheduled)))
        }
    }
}

pub(super) fn unix_nanos(at: SystemTime) -> i128 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

pub(super) async fn open_stream(
    target: Target,
    channel: Channel,
) -> anyhow::Result<Streaming<Bytes>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("stream: channel not ready")?;
    let (path, body) = match target {
        Target::Lifecycle => (
            PathAndQuery::from_static("/agentlifecycle.v1.AgentLifecycleService/WatchEvents"),
            Bytes::from(pb::WatchEventsRequest::default().encode_to_vec()),
        ),
        Target::Bare(_) => (PathAndQuery::from_static(SUBSCRIBE_PATH), Bytes::new()),
    };
    let mut request = tonic::Request::new(body);
    if target == Target::Lifecycle {
        crate::cli::connect::authorize(&mut request);
    }
    let response =
        tokio::time::timeout(CALL_TIMEOUT, grpc.server_streaming(request, path, RawCodec))
            .await
            .context("opening a stream: timed out")?
            .map_err(|status| {
                anyhow!(
                    "opening a stream: {:?}: {}",
                    status.code(),
                    status.message()
                )
            })?;
    Ok(response.into_inner())
}

/// Reads one stream until it has the last committed sequence, checking
/// that sequences are contiguous. Every read has a deadline.
pub(super) async fn subscriber(
    target: Target,
    index: usize,
    mut messages: Streaming<Bytes>,
    mut control: watch::Receiver<Phase>,
    ready: mpsc::UnboundedSender<usize>,
    drain_timeout: Duration,
) -> SubscriberOutcome {
    // Idle lifecycle streams get a progress message every 10 s (server
    // default); the bare fan-out sends nothing between runs' phases.
    const READ_TIMEOUT: Duration = Duration::from_secs(60);
    let mut out = SubscriberOutcome::default();
    let mut last: Option<u64> = None;
    let mut ready_sent = false;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let phase = *control.borrow_and_update();
        let seen = last.unwrap_or(0);
        if !ready_sent
            && let Some(marker) = phase.marker
            && seen >= marker
        {
            ready_sent = true;
            let _ = ready.send(index);
        }
        if let Some(final_seq) = phase.last {
            if seen >= final_seq {
                break;
            }
            drain_deadline.get_or_insert_with(|| Instant::now() + drain_timeout);
        }
        let deadline = drain_deadline.unwrap_or_else(|| Instant::now() + READ_TIMEOUT);
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() {
                    out.error = Some("the benchmark stopped".to_string());
                    break;
                }
            }
            item = tokio::time::timeout_at(deadline, messages.next()) => match item {
                Err(_) => {
                    out.error = Some(match drain_deadline {
                        Some(_) => format!("last event not received within {drain_timeout:?}; stuck at sequence {seen}"),
                        None => format!("no message for {READ_TIMEOUT:?} at sequence {seen}"),
                    });
                    break;
                }
                Ok(None) => {
                    out.error = Some(format!("stream ended at sequence {seen}"));
                    break;
                }
                Ok(Some(Err(status))) => {
                    out.error = Some(format!("stream failed at sequence {seen}: {:?}: {}", status.code(), status.message()));
                    break;
                }
                Ok(Some(Ok(message))) => {
                    record(target, &message, phase.marker, &mut last, &mut out);
                    take_buffered(target, &mut messages, phase.marker, &mut last, &mut out);
                    if out.error.is_some() {
                        break;
                    }
                }
            }
        }
    }
    out
}

/// Messages a subscriber takes from its stream's buffer before it looks
/// at the coordinator again.
const DRAIN_AT_ONCE: usize = 256;

/// Records up to [`DRAIN_AT_ONCE`] messages the connection already
/// buffered, without a timer and a select per message (the client shares
/// the cores with the server); the subscriber reads the phase again after.
/// A failed or ended stream is put in `out.error`.
fn take_buffered(
    target: Target,
    messages: &mut Streaming<Bytes>,
    marker: Option<u64>,
    last: &mut Option<u64>,
    out: &mut SubscriberOutcome,
) {
    for _ in 0..DRAIN_AT_ONCE {
        match messages.next().now_or_never() {
            Some(Some(Ok(message))) => record(target, &message, marker, last, out),
            Some(Some(Err(status))) => {
                out.error = Some(format!(
                    "stream failed at sequence {}: {:?}: {}",
                    last.unwrap_or(0),
                    status.code(),
                    status.message()
                ));
                break;
            }
            Some(None) => {
                out.error = Some(format!("stream ended at sequence {}", last.unwrap_or(0)));
                break;
            }
            None => break,
        }
    }
}

/// One received message: order checks, and the latency of an event after
/// the marker.
fn record(
    target: Target,
    message: &Bytes,
    marker: Option<u64>,
    last: &mut Option<u64>,
    out: &mut SubscriberOutcome,
) {
    let now = unix_nanos(SystemTime::now());
    let Some((sequence, scheduled)) = decode(target, message) else {
        return;
    };
    match *last {
        Some(previous) if sequence <= previous => {
            out.duplicates += 1;
            return;
        }
        Some(previous) if sequence > previous + 1 => {
            out.gap_events += sequence - previous - 1;
        }
        _ => {}
    }
    *last = Some(sequence);
    out.message_bytes = out.message_bytes.max(message.len());
    if marker.is_some_and(|m| sequence > m) {
        out.received += 1;
        if let Some(at) = scheduled {
            out.latencies.push(u64::try_from(now - at).unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_messages_carry_sequence_and_schedule() {
        let mut message = vec![0u8; 40];
        message[..8].copy_from_slice(&7u64.to_le_bytes());
        message[8..24].copy_from_slice(&123_456_789i128.to_le_bytes());
        assert_eq!(
            decode(Target::Bare(40), &Bytes::from(message)),
            Some((7, Some(123_456_789)))
        );
        assert_eq!(
            decode(Target::Bare(40), &Bytes::from_static(b"short")),
            None
        );
    }

    #[test]
    fn lifecycle_events_carry_the_schedule_in_their_reason() {
        let response = pb::WatchEventsResponse {
            kind: Some(pb::watch_events_response::Kind::Event(pb::LifecycleEvent {
                sequence: 42,
                transition: Some(pb::StateTransition {
                    reason: "1700000000000000000".to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        let bytes = Bytes::from(response.encode_to_vec());
        assert_eq!(
            decode(Target::Lifecycle, &bytes),
            Some((42, Some(1_700_000_000_000_000_000)))
        );
    }
}
