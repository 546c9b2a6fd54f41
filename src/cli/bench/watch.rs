//! `bench watch`: S event streams on a running server while writers commit
//! at a fixed aggregate rate; commit-to-receive latency, deliveries/s, and
//! a check that every stream sees every event once, in order.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::{
    sync::{mpsc, watch},
    time::MissedTickBehavior,
};
use tonic::{Streaming, transport::Channel};

use agent_lifecycle::grpc::pb::{self, AgentState};

use super::{
    WatchBenchArgs,
    client::{
        CALL_TIMEOUT, Client, MAX_CONSECUTIVE_ERRORS, Worker, connect, connect_clients,
        create_agents, head_sequence,
    },
    ensure_positive,
    stats::{Latencies, median, nanos, rate, secs},
};

/// What the coordinator tells subscribers.
#[derive(Clone, Copy, Debug, Default)]
struct Phase {
    /// Sequence of the marker event: report when received.
    marker: Option<u64>,
    /// Last committed sequence: stop once received.
    last: Option<u64>,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct SubscriberOutcome {
    /// Events after the marker (duplicates excluded).
    received: u64,
    /// Commit-to-receive of those, ns.
    latencies: Vec<u64>,
    /// Sequences skipped (gap sizes summed).
    gap_events: u64,
    /// Events at or below the previous sequence.
    duplicates: u64,
    /// Last sequence received.
    last: u64,
    error: Option<String>,
}

/// The part of `WatchEventsResponse` the subscribers read: the event's
/// sequence and commit time. Wire-compatible with the real message (the
/// `event` member of its oneof is field 1); everything else is skipped
/// undecoded, so the benchmark client spends its CPU on the stream, not on
/// building agents it would throw away.
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

#[derive(Clone, PartialEq, prost::Message)]
struct LiteTransition {
    #[prost(message, optional, tag = "3")]
    timestamp: Option<prost_types::Timestamp>,
}

async fn open_watch(channel: Channel) -> anyhow::Result<Streaming<LiteResponse>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .context("WatchEvents: channel not ready")?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/agentlifecycle.v1.AgentLifecycleService/WatchEvents",
    );
    let codec = tonic_prost::ProstCodec::<pb::WatchEventsRequest, LiteResponse>::default();
    let mut request = tonic::Request::new(pb::WatchEventsRequest {
        start_sequence: 0,
        ..Default::default()
    });
    crate::cli::connect::authorize(&mut request);
    let response = tokio::time::timeout(CALL_TIMEOUT, grpc.server_streaming(request, path, codec))
        .await
        .context("WatchEvents: timed out")?
        .map_err(|status| {
            anyhow::anyhow!("WatchEvents: {:?}: {}", status.code(), status.message())
        })?;
    Ok(response.into_inner())
}

/// Reads one stream until it has the last committed sequence, checking
/// that sequences are contiguous. Every read has a deadline.
async fn subscriber(
    index: usize,
    mut events: Streaming<LiteResponse>,
    mut control: watch::Receiver<Phase>,
    ready: mpsc::UnboundedSender<usize>,
    drain_timeout: Duration,
) -> SubscriberOutcome {
    // Idle streams get a progress message every 10 s (server default).
    const READ_TIMEOUT: Duration = Duration::from_secs(60);
    let mut out = SubscriberOutcome::default();
    let mut last: Option<u64> = None;
    let mut ready_sent = false;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
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
            drain_deadline.get_or_insert_with(|| tokio::time::Instant::now() + drain_timeout);
        }
        let deadline = drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + READ_TIMEOUT);
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() {
                    out.error = Some("the benchmark stopped".to_string());
                    break;
                }
            }
            item = tokio::time::timeout_at(deadline, events.next()) => match item {
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
                    let Some(event) = message.event else { continue };
                    let now = SystemTime::now();
                    let sequence = event.sequence;
                    match last {
                        Some(previous) if sequence <= previous => {
                            out.duplicates += 1;
                            continue;
                        }
                        Some(previous) if sequence > previous + 1 => {
                            out.gap_events += sequence - previous - 1;
                        }
                        _ => {}
                    }
                    last = Some(sequence);
                    out.last = sequence;
                    let marker = control.borrow().marker;
                    if marker.is_some_and(|m| sequence > m) {
                        out.received += 1;
                        let committed = event.transition.as_ref().and_then(|t| t.timestamp.as_ref());
                        if let Some(ts) = committed {
                            let at = UNIX_EPOCH
                                + Duration::new(u64::try_from(ts.seconds).unwrap_or(0), u32::try_from(ts.nanos).unwrap_or(0));
                            out.latencies.push(nanos(now.duration_since(at).unwrap_or_default()));
                        }
                    }
                }
            }
        }
    }
    out
}

/// What one writer did in one run.
#[derive(Debug, Default)]
struct WriterOutcome {
    commits: u64,
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Transitions at one tick per `period` (missed ticks are made up in a
/// burst) until `end`, one request in flight.
async fn writer(
    mut worker: Worker,
    first_tick: tokio::time::Instant,
    period: Duration,
    end: tokio::time::Instant,
) -> (Worker, WriterOutcome) {
    let mut out = WriterOutcome::default();
    let mut interval = tokio::time::interval_at(first_tick, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut consecutive_errors = 0;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = tokio::time::sleep_until(end) => break,
        }
        let started = tokio::time::Instant::now();
        if started >= end {
            break;
        }
        match worker.transition().await {
            Ok(_) => {
                consecutive_errors = 0;
                out.commits += 1;
                out.latencies.push(nanos(started.elapsed()));
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
                worker.resync().await;
            }
        }
    }
    (worker, out)
}

/// One watch run's results.
#[derive(Debug)]
struct WatchRun {
    commits_per_sec: f64,
    deliveries_per_sec: f64,
    latency: Latencies,
    missing: u64,
}

/// Runs `bench watch`.
///
/// # Errors
/// Bad arguments, an unreachable server, a failed setup or a failed run.
pub(super) async fn run(server: &str, args: WatchBenchArgs) -> anyhow::Result<()> {
    ensure_positive("subscribers", args.subscribers)?;
    ensure_positive("connections", args.connections)?;
    ensure_positive("writers", args.writers)?;
    ensure_positive("runs", args.runs)?;
    if args.rate == 0 || args.duration.is_zero() {
        bail!("--rate and --duration must be positive");
    }
    let writers = args
        .writers
        .min(usize::try_from(args.rate).unwrap_or(usize::MAX));
    println!(
        "bench watch: server {server}, subscribers {}, connections {}, rate {}/s by {writers} writers, duration {}, runs {}",
        args.subscribers,
        args.connections,
        args.rate,
        secs(args.duration),
        args.runs
    );
    let per_connection = args.subscribers.div_ceil(args.connections);
    if per_connection > 1000 {
        println!(
            "  warning: {per_connection} streams per connection; the server allows 1024 concurrent streams per connection"
        );
    }
    let mut stream_clients = Vec::with_capacity(args.connections.max(1));
    for _ in 0..args.connections.max(1) {
        stream_clients.push(connect(server).await?);
    }
    let mut writer_client = connect_clients(server, 1).await?;
    let ids = create_agents(&writer_client, writers + 1, true, "bench-watch").await?;
    let mut workers: Vec<Worker> = ids
        .into_iter()
        .map(|agent_id| Worker {
            client: writer_client[0].clone(),
            agent_id,
            target: AgentState::Idle,
        })
        .collect();
    let mut marker = workers.pop().context("no marker agent")?;

    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let result = watch_run(
            &args,
            writers,
            &stream_clients,
            &mut writer_client[0],
            &mut workers,
            &mut marker,
        )
        .await?;
        print!("run {run}/{}: ", args.runs);
        println!(
            "{:.1} commits/s, {:.1} deliveries/s, commit-to-receive {}, missing {}",
            result.commits_per_sec,
            result.deliveries_per_sec,
            result.latency.line(),
            result.missing
        );
        runs.push(result);
    }
    let latencies: Vec<Latencies> = runs.iter().map(|r| r.latency).collect();
    println!(
        "median of {} runs: {:.1} commits/s (target {}), {:.1} deliveries/s, commit-to-receive {}, missing (sum) {}",
        args.runs,
        median(runs.iter().map(|r| r.commits_per_sec)),
        args.rate,
        median(runs.iter().map(|r| r.deliveries_per_sec)),
        Latencies::median_of(&latencies).line(),
        runs.iter().map(|r| r.missing).sum::<u64>()
    );
    Ok(())
}

async fn watch_run(
    args: &WatchBenchArgs,
    writers: usize,
    stream_clients: &[Channel],
    writer_client: &mut Client,
    workers: &mut Vec<Worker>,
    marker: &mut Worker,
) -> anyhow::Result<WatchRun> {
    let subscribers = args.subscribers;
    let (control_tx, control_rx) = watch::channel(Phase::default());
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<usize>();

    // Open every stream; the server subscribes before it answers.
    let opening = Instant::now();
    let streams: Vec<Streaming<LiteResponse>> = stream::iter(0..subscribers)
        .map(|i| open_watch(stream_clients[i % stream_clients.len()].clone()))
        .buffered(256)
        .try_collect()
        .await?;
    let open_time = opening.elapsed();
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, events)| {
            tokio::spawn(subscriber(
                i,
                events,
                control_rx.clone(),
                ready_tx.clone(),
                args.drain_timeout,
            ))
        })
        .collect();
    drop(ready_tx);
    drop(control_rx);

    // The marker: every subscriber receives it before the writers start.
    let (marker_seq, _) = marker.transition().await.context("marker transition")?;
    control_tx.send_modify(|p| p.marker = Some(marker_seq));
    let ready_deadline = tokio::time::Instant::now() + args.drain_timeout;
    let mut ready = 0;
    while ready < subscribers {
        match tokio::time::timeout_at(ready_deadline, ready_rx.recv()).await {
            Ok(Some(_)) => ready += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if ready < subscribers {
        bail!(
            "only {ready} of {subscribers} subscribers received the marker event {marker_seq} within {:?}",
            args.drain_timeout
        );
    }
    let ready_time = opening.elapsed();

    // Writers at rate/writers each, ticks staggered.
    let period = Duration::from_secs_f64(writers as f64 / args.rate as f64);
    let start = tokio::time::Instant::now();
    let end = start + args.duration;
    let writer_handles: Vec<_> = workers
        .drain(..)
        .enumerate()
        .map(|(i, w)| {
            let offset = period.mul_f64(i as f64 / writers as f64);
            tokio::spawn(writer(w, start + offset, period, end))
        })
        .collect();
    let mut commits = 0;
    let mut writer_errors = 0;
    let mut writer_error = None;
    let mut writer_latencies = Vec::new();
    for handle in writer_handles {
        let (worker, outcome) = handle.await.context("a writer panicked")?;
        workers.push(worker);
        commits += outcome.commits;
        writer_errors += outcome.errors;
        writer_latencies.extend(outcome.latencies);
        if writer_error.is_none() {
            writer_error = outcome.first_error;
        }
    }
    let write_time = start.elapsed();
    let last_seq = head_sequence(writer_client).await?;
    control_tx.send_modify(|p| p.last = Some(last_seq));

    // Subscribers end on their own (each bounded by the drain timeout).
    let join_deadline = tokio::time::Instant::now() + args.drain_timeout + Duration::from_secs(30);
    let mut outcomes = Vec::with_capacity(subscribers);
    for handle in handles {
        let outcome = tokio::time::timeout_at(join_deadline, handle)
            .await
            .map_err(|_| anyhow!("subscribers did not finish within the drain timeout"))?
            .context("a subscriber panicked")?;
        outcomes.push(outcome);
    }
    let total_time = start.elapsed();
    let drain_time = total_time.saturating_sub(write_time);

    let expected_each = last_seq.saturating_sub(marker_seq);
    let received: u64 = outcomes.iter().map(|o| o.received).sum();
    let missing: u64 = outcomes
        .iter()
        .map(|o| expected_each.saturating_sub(o.received))
        .sum();
    let gap_events: u64 = outcomes.iter().map(|o| o.gap_events).sum();
    let duplicates: u64 = outcomes.iter().map(|o| o.duplicates).sum();
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    let first_failure = outcomes.iter().find_map(|o| o.error.clone());
    let mut samples = Vec::with_capacity(usize::try_from(received).unwrap_or(0));
    for outcome in &mut outcomes {
        samples.append(&mut outcome.latencies);
    }
    let latency = Latencies::from_samples(samples);
    let writer_latency = Latencies::from_samples(writer_latencies);

    let commits_per_sec = rate(commits, write_time);
    let deliveries_per_sec = rate(received, total_time);
    let achieved = commits_per_sec / args.rate as f64;
    println!(
        "  streams open in {}, all saw marker {marker_seq} after {}",
        secs(open_time),
        secs(ready_time)
    );
    println!(
        "  writers: {commits} commits in {} = {commits_per_sec:.1}/s of target {}/s ({:.1}%, {}), errors {writer_errors}; TransitionAgent {}",
        secs(write_time),
        args.rate,
        achieved * 100.0,
        if achieved >= 0.99 {
            "achieved"
        } else {
            "NOT achieved"
        },
        writer_latency.line()
    );
    if let Some(err) = writer_error {
        println!("  first writer error: {err}");
    }
    println!(
        "  subscribers: {received} events received of {} expected ({} after the marker x {subscribers}) in {} (drain {}) = {deliveries_per_sec:.1} deliveries/s",
        expected_each * subscribers as u64,
        expected_each,
        secs(total_time),
        secs(drain_time)
    );
    println!(
        "  commit-to-receive {}; missing {missing}, skipped sequences {gap_events}, duplicates {duplicates}, failed streams {}",
        latency.line(),
        failed
    );
    if let Some(first) = first_failure {
        println!("  first stream failure: {first}");
    }
    Ok(WatchRun {
        commits_per_sec,
        deliveries_per_sec,
        latency,
        missing,
    })
}
