//! `bench watch`: S event streams on a running server while writers commit
//! on a fixed schedule; latency from each write's scheduled time to its
//! receipt, deliveries/s, and a check that every stream sees every event
//! once, in order.
//!
//! The load is open: write k is scheduled at k / rate after the start and
//! carries its scheduled time (unix nanoseconds, in `reason`). A writer
//! that falls behind sends late writes at once, and their latency counts
//! from when they should have been sent, so a server that cannot keep up
//! shows it in the latency instead of slowing the load down (no coordinated
//! omission). A run whose commit rate falls below 99 % of the target
//! fails the target, and says so.
//!
//! With `--baseline` every run is followed by the same load on a bare
//! tonic fan-out (`ceiling.rs`): a broadcast channel streamed to each
//! subscriber, with messages of the size of the events just received.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use bytes::{Buf, Bytes};
use futures_util::{FutureExt, StreamExt, TryStreamExt, stream};
use prost::Message as _;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tonic::{Status, Streaming, codegen::http::uri::PathAndQuery, transport::Channel};

use agent_lifecycle::api::grpc::pb;

use super::{
    WatchBenchArgs,
    ceiling::{EchoBaseline, HEAD_PATH, PUBLISH_PATH, RawCodec, SUBSCRIBE_PATH},
    client::{
        CALL_TIMEOUT, Client, MAX_CONSECUTIVE_ERRORS, Worker, connect, connect_channels,
        create_agents, head_sequence,
    },
    cpu::{self, ServerCpu},
    ensure_positive,
    stats::{Latencies, median, nanos, rate, secs},
};

/// Share of the target commit rate a run must reach.
const TARGET_SHARE: f64 = 0.99;

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
    /// Scheduled-to-receive of those, ns.
    latencies: Vec<u64>,
    /// Sequences skipped (gap sizes summed).
    gap_events: u64,
    /// Events at or below the previous sequence.
    duplicates: u64,
    /// Size of the largest message, bytes.
    message_bytes: usize,
    error: Option<String>,
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
enum Target {
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

fn unix_nanos(at: SystemTime) -> i128 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

async fn open_stream(target: Target, channel: Channel) -> anyhow::Result<Streaming<Bytes>> {
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
async fn subscriber(
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
                    // What the connection already buffered is taken without
                    // a timer and a select per message (the client shares the
                    // cores with the server); the phase is read again after.
                    for _ in 0..DRAIN_AT_ONCE {
                        match messages.next().now_or_never() {
                            Some(Some(Ok(message))) => {
                                record(target, &message, phase.marker, &mut last, &mut out);
                            }
                            Some(Some(Err(status))) => {
                                out.error = Some(format!("stream failed at sequence {}: {:?}: {}", last.unwrap_or(0), status.code(), status.message()));
                                break;
                            }
                            Some(None) => {
                                out.error = Some(format!("stream ended at sequence {}", last.unwrap_or(0)));
                                break;
                            }
                            None => break,
                        }
                    }
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

/// Writes to one target: a lifecycle agent flipped ONLINE <-> IDLE, or
/// the bare fan-out's Publish.
enum Writer {
    Lifecycle(Box<Worker>),
    Bare { channel: Channel, bytes: usize },
}

impl Writer {
    /// One write carrying `scheduled` (unix ns); its sequence.
    async fn write(&mut self, scheduled: i128) -> anyhow::Result<u64> {
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

    async fn resync(&mut self) {
        if let Writer::Lifecycle(worker) = self {
            worker.resync().await;
        }
    }
}

/// A unary call to the bare fan-out with the tool's deadline.
async fn bare_call(channel: &Channel, path: &'static str, body: Bytes) -> anyhow::Result<Bytes> {
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

fn sequence_of(reply: &Bytes) -> anyhow::Result<u64> {
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
struct WriterOutcome {
    commits: u64,
    /// Scheduled-to-answer, ns.
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// The writes of one writer: write k (k = first, first + step, ...) is
/// due at `start + k * interval`; one request in flight.
struct Schedule {
    start: Instant,
    unix_start: i128,
    interval: Duration,
    first: u64,
    step: u64,
    end: Instant,
}

async fn writer(mut target: Writer, schedule: Schedule) -> (Writer, WriterOutcome) {
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

/// One run's results.
#[derive(Debug)]
struct WatchRun {
    commits_per_sec: f64,
    /// Commit rate at least [`TARGET_SHARE`] of the target.
    met_rate: bool,
    deliveries_per_sec: f64,
    latency: Latencies,
    missing: u64,
    cpu_us_per_delivery: Option<f64>,
    message_bytes: usize,
}

impl WatchRun {
    fn line(&self, rate: u64) -> String {
        format!(
            "{:.1} commits/s ({:.1}% of {rate}/s: {}), {:.1} deliveries/s, scheduled-to-receive {}, missing {}, {}",
            self.commits_per_sec,
            self.commits_per_sec * 100.0 / rate as f64,
            if self.met_rate {
                "rate held"
            } else {
                "FAILS the target rate; its latency is not a result"
            },
            self.deliveries_per_sec,
            self.latency.line(),
            self.missing,
            cpu::show(self.cpu_us_per_delivery, "delivery")
        )
    }
}

/// Streams, writers and the server's CPU for one target.
struct Setup {
    target: Target,
    stream_channels: Vec<Channel>,
    writers: Vec<Writer>,
    /// Lifecycle: the marker agent; bare: a publisher.
    marker: Writer,
    /// Lifecycle: for the head sequence.
    client: Option<Client>,
    /// Bare: for the head sequence.
    head_channel: Option<Channel>,
    cpu: ServerCpu,
}

impl Setup {
    async fn head(&mut self) -> anyhow::Result<u64> {
        match (&mut self.client, &self.head_channel) {
            (Some(client), _) => head_sequence(client).await,
            (None, Some(channel)) => {
                sequence_of(&bare_call(channel, HEAD_PATH, Bytes::new()).await?)
            }
            (None, None) => bail!("no connection for the head sequence"),
        }
    }
}

/// Runs `bench watch`.
///
/// # Errors
/// Bad arguments, an unreachable server, a failed setup or a failed run.
pub(super) async fn run(server: &str, args: WatchBenchArgs) -> anyhow::Result<()> {
    ensure_positive("subscribers", args.subscribers)?;
    ensure_positive("writers", args.writers)?;
    ensure_positive("runs", args.runs)?;
    let connections = args.connections.unwrap_or(args.subscribers);
    ensure_positive("connections", connections)?;
    if args.rate == 0 || args.duration.is_zero() {
        bail!("--rate and --duration must be positive");
    }
    let writers = args
        .writers
        .min(usize::try_from(args.rate).unwrap_or(usize::MAX));
    println!(
        "bench watch: server {server}, subscribers {}, connections {connections}, rate {}/s by {writers} writers (open loop), duration {}, runs {}",
        args.subscribers,
        args.rate,
        secs(args.duration),
        args.runs
    );
    let per_connection = args.subscribers.div_ceil(connections);
    if per_connection > 1000 {
        println!(
            "  warning: {per_connection} streams per connection; the server allows 1024 concurrent streams per connection"
        );
    }
    let cpu = ServerCpu::find(server, &args.cpu.server_pid);
    println!("  {}", cpu.describe());
    let stream_channels = connect_channels(server, connections).await?;
    let writer_channel = connect_channels(server, 1)
        .await?
        .pop()
        .context("no writer connection")?;
    let writer_client = vec![crate::cli::connect::client(writer_channel.clone())];
    let ids = create_agents(&writer_client, writers + 1, true, "bench-watch").await?;
    let mut workers: Vec<Writer> = ids
        .into_iter()
        .map(|agent_id| Writer::Lifecycle(Box::new(Worker::new(writer_channel.clone(), agent_id))))
        .collect();
    let marker = workers.pop().context("no marker agent")?;
    let mut lifecycle = Setup {
        target: Target::Lifecycle,
        stream_channels,
        writers: workers,
        marker,
        client: writer_client.into_iter().next(),
        head_channel: None,
        cpu,
    };
    let mut bare: Option<(EchoBaseline, Setup)> = None;
    if args.baseline {
        println!(
            "  baseline: a bare tonic fan-out (its own process) under the same load after each run"
        );
    }

    let mut runs = Vec::new();
    let mut baselines = Vec::new();
    for run in 1..=args.runs {
        let result = watch_run(&args, &mut lifecycle).await?;
        println!("run {run}/{}: {}", args.runs, result.line(args.rate));
        if args.baseline {
            if bare.is_none() {
                bare = Some(bare_setup(writers, connections, result.message_bytes).await?);
            }
            if let Some((_, setup)) = &mut bare {
                let base = watch_run(&args, setup).await?;
                println!(
                    "  bare fan-out ({}-byte messages): {}",
                    result.message_bytes,
                    base.line(args.rate)
                );
                println!("  {}", ratios(&result, &base));
                baselines.push(base);
            }
        }
        runs.push(result);
    }
    println!(
        "median of {} runs: {}{}",
        args.runs,
        median_run(&runs, args.rate).line(args.rate),
        if runs.iter().all(|r| r.met_rate) {
            ""
        } else {
            "; at least one run FAILED the target rate"
        }
    );
    if !baselines.is_empty() {
        let base = median_run(&baselines, args.rate);
        println!("median of the bare fan-out: {}", base.line(args.rate));
        let deliveries: Vec<f64> = runs
            .iter()
            .zip(&baselines)
            .map(|(r, b)| r.deliveries_per_sec / b.deliveries_per_sec.max(f64::MIN_POSITIVE))
            .collect();
        let p99s: Vec<f64> = runs
            .iter()
            .zip(&baselines)
            .map(|(r, b)| r.latency.p99() as f64 / (b.latency.p99().max(1)) as f64)
            .collect();
        println!(
            "median ratios to the bare fan-out: deliveries/s {:.2}, p99 {:.2}x",
            median(deliveries.into_iter()),
            median(p99s.into_iter())
        );
    }
    Ok(())
}

async fn bare_setup(
    writers: usize,
    connections: usize,
    message_bytes: usize,
) -> anyhow::Result<(EchoBaseline, Setup)> {
    let echo = EchoBaseline::start(1, None).await?;
    let url = echo.url();
    let stream_channels = connect_channels(&url, connections).await?;
    let writer_channel = connect(&url).await?;
    let bytes = message_bytes.max(24);
    let bare = |channel: &Channel| Writer::Bare {
        channel: channel.clone(),
        bytes,
    };
    let setup = Setup {
        target: Target::Bare(bytes),
        stream_channels,
        writers: (0..writers).map(|_| bare(&writer_channel)).collect(),
        marker: bare(&writer_channel),
        client: None,
        head_channel: Some(writer_channel),
        cpu: ServerCpu::of(echo.pid()),
    };
    Ok((echo, setup))
}

fn ratios(run: &WatchRun, base: &WatchRun) -> String {
    format!(
        "ratios to the bare fan-out: deliveries/s {:.2}, p99 {:.2}x{}",
        run.deliveries_per_sec / base.deliveries_per_sec.max(f64::MIN_POSITIVE),
        run.latency.p99() as f64 / base.latency.p99().max(1) as f64,
        match (run.cpu_us_per_delivery, base.cpu_us_per_delivery) {
            (Some(a), Some(b)) => format!(
                ", server CPU per delivery {:.2}x",
                a / b.max(f64::MIN_POSITIVE)
            ),
            _ => String::new(),
        }
    )
}

fn median_run(runs: &[WatchRun], rate: u64) -> WatchRun {
    let latencies: Vec<Latencies> = runs.iter().map(|r| r.latency).collect();
    let cpu: Vec<f64> = runs.iter().filter_map(|r| r.cpu_us_per_delivery).collect();
    let commits_per_sec = median(runs.iter().map(|r| r.commits_per_sec));
    WatchRun {
        commits_per_sec,
        met_rate: commits_per_sec >= TARGET_SHARE * rate as f64,
        deliveries_per_sec: median(runs.iter().map(|r| r.deliveries_per_sec)),
        latency: Latencies::median_of(&latencies),
        missing: runs.iter().map(|r| r.missing).sum(),
        cpu_us_per_delivery: (!cpu.is_empty()).then(|| median(cpu.into_iter())),
        message_bytes: runs.iter().map(|r| r.message_bytes).max().unwrap_or(0),
    }
}

async fn watch_run(args: &WatchBenchArgs, setup: &mut Setup) -> anyhow::Result<WatchRun> {
    let subscribers = args.subscribers;
    let target = setup.target;
    let (control_tx, control_rx) = watch::channel(Phase::default());
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<usize>();

    // Open every stream; the server subscribes before it answers.
    let opening = Instant::now();
    let channels = &setup.stream_channels;
    let streams: Vec<Streaming<Bytes>> = stream::iter(0..subscribers)
        .map(|i| open_stream(target, channels[i % channels.len()].clone()))
        .buffered(256)
        .try_collect()
        .await?;
    let open_time = opening.elapsed();
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, messages)| {
            tokio::spawn(subscriber(
                target,
                i,
                messages,
                control_rx.clone(),
                ready_tx.clone(),
                args.drain_timeout,
            ))
        })
        .collect();
    drop(ready_tx);
    drop(control_rx);

    // The marker: every subscriber receives it before the writers start.
    let marker_seq = setup.marker.write(0).await.context("marker write")?;
    control_tx.send_modify(|p| p.marker = Some(marker_seq));
    let ready_deadline = Instant::now() + args.drain_timeout;
    let mut ready = 0;
    while ready < subscribers {
        match tokio::time::timeout_at(ready_deadline, ready_rx.recv()).await {
            Ok(Some(_)) => ready += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if ready < subscribers {
        bail!(
            "only {ready} of {subscribers} subscribers received the marker {marker_seq} within {:?}",
            args.drain_timeout
        );
    }
    let ready_time = opening.elapsed();

    // Writer i takes writes i, i + W, i + 2W, ... of the schedule.
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
    let mut commits = 0;
    let mut writer_errors = 0;
    let mut writer_error = None;
    let mut writer_latencies = Vec::new();
    for handle in writer_handles {
        let (w, outcome) = handle.await.context("a writer panicked")?;
        setup.writers.push(w);
        commits += outcome.commits;
        writer_errors += outcome.errors;
        writer_latencies.extend(outcome.latencies);
        if writer_error.is_none() {
            writer_error = outcome.first_error;
        }
    }
    let write_time = start.elapsed();
    let last_seq = setup.head().await?;
    control_tx.send_modify(|p| p.last = Some(last_seq));

    // Subscribers end on their own (each bounded by the drain timeout).
    let join_deadline = Instant::now() + args.drain_timeout + Duration::from_secs(30);
    let mut outcomes = Vec::with_capacity(subscribers);
    for handle in handles {
        let outcome = tokio::time::timeout_at(join_deadline, handle)
            .await
            .map_err(|_| anyhow!("subscribers did not finish within the drain timeout"))?
            .context("a subscriber panicked")?;
        outcomes.push(outcome);
    }
    let total_time = start.elapsed();
    let cpu_after = setup.cpu.sample();
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
    let message_bytes = outcomes.iter().map(|o| o.message_bytes).max().unwrap_or(0);
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
        "  writers: {commits} writes in {} = {commits_per_sec:.1}/s of target {}/s ({:.1}%), errors {writer_errors}; scheduled-to-answer {}",
        secs(write_time),
        args.rate,
        achieved * 100.0,
        writer_latency.line()
    );
    if let Some(err) = writer_error {
        println!("  first writer error: {err}");
    }
    println!(
        "  subscribers: {received} events received of {} expected ({} after the marker x {subscribers}) in {} (drain {}); missing {missing}, skipped sequences {gap_events}, duplicates {duplicates}, failed streams {failed}",
        expected_each * subscribers as u64,
        expected_each,
        secs(total_time),
        secs(drain_time)
    );
    if let Some(first) = first_failure {
        println!("  first stream failure: {first}");
    }
    Ok(WatchRun {
        commits_per_sec,
        met_rate: achieved >= TARGET_SHARE,
        deliveries_per_sec,
        latency,
        missing,
        cpu_us_per_delivery: cpu::per_op(cpu_before, cpu_after, received),
        message_bytes,
    })
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
