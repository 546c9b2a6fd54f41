//! One run of `bench watch` on one target (the lifecycle server or the
//! bare fan-out), in its order:
//!
//! 1. [`open_streams`]: every subscriber's stream is opened (the server
//!    subscribes before it answers), then [`spawn_subscribers`];
//! 2. one marker write, and [`await_marker`] until every subscriber has
//!    received it, so that no stream is still catching up;
//! 3. [`write`]: the writers' open schedule, the server's CPU read from its
//!    first due write;
//! 4. the head sequence is told to the subscribers, and
//!    [`join_subscribers`] waits for each to receive it (within the drain
//!    timeout); the server's CPU is read again;
//! 5. [`Deliveries::of`] sums what the subscribers saw, and the run's lines
//!    are printed.

use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tonic::{Streaming, transport::Channel};

use super::{
    Setup, TARGET_SHARE, WatchBenchArgs, WatchRun,
    stream::{Phase, SubscriberOutcome, Target, open_stream, subscriber, unix_nanos},
    writer::{Schedule, writer},
};
use crate::cli::bench::{
    cpu,
    stats::{Latencies, rate, secs},
};

/// Runs the load of `args` once on `setup`'s target and prints its lines.
///
/// # Errors
/// A stream cannot be opened, the marker is not received by every
/// subscriber in time, a task panicked, or subscribers do not finish.
pub(super) async fn watch_run(
    args: &WatchBenchArgs,
    setup: &mut Setup,
) -> anyhow::Result<WatchRun> {
    let subscribers = args.subscribers;
    let target = setup.target;
    let (control_tx, control_rx) = watch::channel(Phase::default());
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<usize>();

    // Open every stream; the server subscribes before it answers.
    let opening = Instant::now();
    let streams = open_streams(target, &setup.stream_channels, subscribers).await?;
    let open_time = opening.elapsed();
    let handles = spawn_subscribers(target, streams, &control_rx, &ready_tx, args.drain_timeout);
    drop(ready_tx);
    drop(control_rx);

    // The marker: every subscriber receives it before the writers start.
    let marker_seq = setup.marker.write(0).await.context("marker write")?;
    control_tx.send_modify(|p| p.marker = Some(marker_seq));
    await_marker(&mut ready_rx, subscribers, marker_seq, args.drain_timeout).await?;
    let ready_time = opening.elapsed();

    let writes = write(args, setup).await?;
    let last_seq = setup.head().await?;
    control_tx.send_modify(|p| p.last = Some(last_seq));

    // Subscribers end on their own (each bounded by the drain timeout).
    let outcomes = join_subscribers(handles, args.drain_timeout).await?;
    let total_time = writes.start.elapsed();
    let cpu_after = setup.cpu.sample();
    let drain_time = total_time.saturating_sub(writes.time);

    let expected_each = last_seq.saturating_sub(marker_seq);
    let seen = Deliveries::of(outcomes, expected_each);
    let commits_per_sec = rate(writes.commits, writes.time);
    let deliveries_per_sec = rate(seen.received, total_time);
    let achieved = commits_per_sec / args.rate as f64;
    println!(
        "  streams open in {}, all saw marker {marker_seq} after {}",
        secs(open_time),
        secs(ready_time)
    );
    let cpu_before = writes.cpu_before;
    writes.print(args.rate, commits_per_sec, achieved);
    println!(
        "  subscribers: {} events received of {} expected ({} after the marker x {subscribers}) in {} (drain {}); missing {}, skipped sequences {}, duplicates {}, failed streams {}",
        seen.received,
        expected_each * subscribers as u64,
        expected_each,
        secs(total_time),
        secs(drain_time),
        seen.missing,
        seen.gap_events,
        seen.duplicates,
        seen.failed
    );
    if let Some(first) = &seen.first_failure {
        println!("  first stream failure: {first}");
    }
    Ok(WatchRun {
        commits_per_sec,
        met_rate: achieved >= TARGET_SHARE,
        deliveries_per_sec,
        latency: seen.latency,
        missing: seen.missing,
        cpu_us_per_delivery: cpu::per_op(cpu_before, cpu_after, seen.received),
        message_bytes: seen.message_bytes,
    })
}

/// Opens `subscribers` streams, round-robin over `channels`, 256 at a
/// time.
async fn open_streams(
    target: Target,
    channels: &[Channel],
    subscribers: usize,
) -> anyhow::Result<Vec<Streaming<Bytes>>> {
    stream::iter(0..subscribers)
        .map(|i| open_stream(target, channels[i % channels.len()].clone()))
        .buffered(256)
        .try_collect()
        .await
}

/// A task per stream, reading it as the coordinator's phase says.
fn spawn_subscribers(
    target: Target,
    streams: Vec<Streaming<Bytes>>,
    control: &watch::Receiver<Phase>,
    ready: &mpsc::UnboundedSender<usize>,
    drain_timeout: Duration,
) -> Vec<JoinHandle<SubscriberOutcome>> {
    streams
        .into_iter()
        .enumerate()
        .map(|(i, messages)| {
            tokio::spawn(subscriber(
                target,
                i,
                messages,
                control.clone(),
                ready.clone(),
                drain_timeout,
            ))
        })
        .collect()
}

/// Waits until every subscriber has received the marker `marker_seq`.
///
/// # Errors
/// Not all of them did within `drain_timeout`.
async fn await_marker(
    ready_rx: &mut mpsc::UnboundedReceiver<usize>,
    subscribers: usize,
    marker_seq: u64,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let ready_deadline = Instant::now() + drain_timeout;
    let mut ready = 0;
    while ready < subscribers {
        match tokio::time::timeout_at(ready_deadline, ready_rx.recv()).await {
            Ok(Some(_)) => ready += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if ready < subscribers {
        bail!(
            "only {ready} of {subscribers} subscribers received the marker {marker_seq} within {drain_timeout:?}"
        );
    }
    Ok(())
}

/// What the writers of one run did, together.
struct Writes {
    /// When the first write was due.
    start: Instant,
    /// From `start` until the last writer finished.
    time: Duration,
    /// The server's CPU time just before the writers started.
    cpu_before: Option<Duration>,
    commits: u64,
    errors: u64,
    first_error: Option<String>,
    /// Scheduled-to-answer of every commit, ns.
    latencies: Vec<u64>,
}

impl Writes {
    /// The writers' line, and their first error.
    fn print(self, target_rate: u64, commits_per_sec: f64, achieved: f64) {
        let latency = Latencies::from_samples(self.latencies);
        println!(
            "  writers: {} writes in {} = {commits_per_sec:.1}/s of target {target_rate}/s ({:.1}%), errors {}; scheduled-to-answer {}",
            self.commits,
            secs(self.time),
            achieved * 100.0,
            self.errors,
            latency.line()
        );
        if let Some(err) = self.first_error {
            println!("  first writer error: {err}");
        }
    }
}

/// The writers' schedule: writer i takes writes i, i + W, i + 2W, ... of
/// `args.rate` a second for `args.duration`; the writers go back into
/// `setup` when they finish.
///
/// # Errors
/// A writer panicked.
async fn write(args: &WatchBenchArgs, setup: &mut Setup) -> anyhow::Result<Writes> {
    let writers = setup.writers.len();
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = Instant::now() + Duration::from_millis(10);
    let unix_start = unix_nanos(SystemTime::now() + Duration::from_millis(10));
    let end = start + args.duration;
    let cpu_before = setup.cpu.sample();
    let writer_handles: Vec<_> = setup
        .writers
        .drain(..)
        .enumerate()
        .map(|(i, w)| {
            tokio::spawn(writer(
                w,
                Schedule {
                    start,
                    unix_start,
                    interval,
                    first: i as u64,
                    step: writers as u64,
                    end,
                },
            ))
        })
        .collect();
    let mut writes = Writes {
        start,
        time: Duration::ZERO,
        cpu_before,
        commits: 0,
        errors: 0,
        first_error: None,
        latencies: Vec::new(),
    };
    for handle in writer_handles {
        let (w, outcome) = handle.await.context("a writer panicked")?;
        setup.writers.push(w);
        writes.commits += outcome.commits;
        writes.errors += outcome.errors;
        writes.latencies.extend(outcome.latencies);
        if writes.first_error.is_none() {
            writes.first_error = outcome.first_error;
        }
    }
    writes.time = start.elapsed();
    Ok(writes)
}

/// Every subscriber's outcome, in order.
///
/// # Errors
/// One has not finished within the drain timeout and 30 s more, or one
/// panicked.
async fn join_subscribers(
    handles: Vec<JoinHandle<SubscriberOutcome>>,
    drain_timeout: Duration,
) -> anyhow::Result<Vec<SubscriberOutcome>> {
    let join_deadline = Instant::now() + drain_timeout + Duration::from_secs(30);
    let mut outcomes = Vec::with_capacity(handles.len());
    for handle in handles {
        let outcome = tokio::time::timeout_at(join_deadline, handle)
            .await
            .map_err(|_| anyhow!("subscribers did not finish within the drain timeout"))?
            .context("a subscriber panicked")?;
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// What the subscribers of one run saw, together.
struct Deliveries {
    /// Events after the marker, summed over subscribers.
    received: u64,
    /// Events after the marker some subscriber did not receive.
    missing: u64,
    gap_events: u64,
    duplicates: u64,
    /// Streams that ended with an error.
    failed: usize,
    first_failure: Option<String>,
    message_bytes: usize,
    /// Scheduled-to-receive of every event received.
    latency: Latencies,
}

impl Deliveries {
    /// Sums `outcomes`, each of which should have received `expected_each`
    /// events after the marker.
    fn of(mut outcomes: Vec<SubscriberOutcome>, expected_each: u64) -> Deliveries {
        let received: u64 = outcomes.iter().map(|o| o.received).sum();
        let missing: u64 = outcomes
            .iter()
            .map(|o| expected_each.saturating_sub(o.received))
            .sum();
        let mut samples = Vec::with_capacity(usize::try_from(received).unwrap_or(0));
        for outcome in &mut outcomes {
            samples.append(&mut outcome.latencies);
        }
        Deliveries {
            received,
            missing,
            gap_events: outcomes.iter().map(|o| o.gap_events).sum(),
            duplicates: outcomes.iter().map(|o| o.duplicates).sum(),
            failed: outcomes.iter().filter(|o| o.error.is_some()).count(),
            first_failure: outcomes.iter().find_map(|o| o.error.clone()),
            message_bytes: outcomes.iter().map(|o| o.message_bytes).max().unwrap_or(0),
            latency: Latencies::from_samples(samples),
        }
    }
}
