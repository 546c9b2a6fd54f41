//! The writers of `bench watch`: each takes every W-th write of an open
//! schedule (write k due at k / rate after the start) with one request in
//! flight, to a lifecycle agent flipped ONLINE <-> IDLE or to the bare
//! fan-out's Publish, and records each write's latency from when it was
//! due.

use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::{Buf, Bytes};
use tokio::time::Instant;
use tonic::{Status, codegen::http::uri::PathAndQuery, transport::Channel};

use crate::cli::bench::{
    ceiling::{PUBLISH_PATH, RawCodec},
    client::{CALL_TIMEOUT, MAX_CONSECUTIVE_ERRORS, Worker},
    stats::nanos,
};

/// Writes to one target: a lifecycle agent flipped ONLINE <-> IDLE, or
/// the bare fan-out's Publish.
pub(super) enum Writer {
    Lifecycle(Box<Worker>),
    Bare { channel: Channel, bytes: usize },
}

impl Writer {
    /// One write carrying `scheduled` (unix ns); its sequence.
    pub(super) async fn write(&mut self, scheduled: i128) -> anyhow::Result<u64> {
        match self {
            Writer::Lifecycle(worker) => worker
                .transition_because(scheduled.to_string())
                .await
                .map(|(sequence, _)| sequence),
            Writer::Bare { channel, bytes } => {
                let mut message = vec![0u8; (*bytes).max(24)];
                message[8..24].copy_from_slice(&scheduled.to_le_bytes());
                let reply = bare_call(channel, PUBLISH_PATH, Bytes::from(message)).await?;
                sequence_of(&reply)
            }
        }
    }

    pub(super) async fn resync(&mut self) {
        if let Writer::Lifecycle(worker) = self {
            worker.resync().await;
        }
    }
}

/// A unary call to the bare fan-out with the tool's deadline.
pub(super) async fn bare_call(
    channel: &Channel,
    path: &'static str,
    body: Bytes,
) -> anyhow::Result<Bytes> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let answer = tokio::time::timeout(CALL_TIMEOUT, async {
        grpc.ready()
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        grpc.unary(
            tonic::Request::new(body),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
    })
    .await
    .map_err(|_| anyhow!("{path}: no answer within {CALL_TIMEOUT:?}"))?;
    answer
        .map(tonic::Response::into_inner)
        .map_err(|status| anyhow!("{path}: {:?}: {}", status.code(), status.message()))
}

pub(super) fn sequence_of(reply: &Bytes) -> anyhow::Result<u64> {
    let mut bytes = reply.as_ref();
    if bytes.len() < 8 {
        bail!(
            "the bare fan-out answered {} bytes, not a sequence",
            bytes.len()
        );
    }
    Ok(bytes.get_u64_le())
}

/// What one writer did in one run.
#[derive(Debug, Default)]
pub(super) struct WriterOutcome {
    pub(super) commits: u64,
    /// Scheduled-to-answer, ns.
    pub(super) latencies: Vec<u64>,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
}

/// The writes of one writer: write k (k = first, first + step, ...) is
/// due at `start + k * interval`; one request in flight.
pub(super) struct Schedule {
    pub(super) start: Instant,
    pub(super) unix_start: i128,
    pub(super) interval: Duration,
    pub(super) first: u64,
    pub(super) step: u64,
    pub(super) end: Instant,
}

pub(super) async fn writer(mut target: Writer, schedule: Schedule) -> (Writer, WriterOutcome) {
    let mut out = WriterOutcome::default();
    let mut consecutive_errors = 0;
    let mut k = schedule.first;
    loop {
        let offset = schedule
            .interval
            .saturating_mul(u32::try_from(k).unwrap_or(u32::MAX));
        let due = schedule.start + offset;
        if due >= schedule.end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let scheduled = schedule.unix_start + i128::try_from(offset.as_nanos()).unwrap_or(0);
        match target.write(scheduled).await {
            Ok(_) => {
                consecutive_errors = 0;
                out.commits += 1;
                out.latencies.push(nanos(due.elapsed()));
            }
            Err(err) => {
                out.errors += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{err:#}"));
                }
                consecutive_errors += 1;
                if consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
                    break;
                }
                target.resync().await;
            }
        }
        k += schedule.step;
    }
    (target, out)
}
