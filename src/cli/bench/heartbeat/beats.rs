//! The heartbeat load: one open-loop schedule of `rate` beats a second over
//! `agents` agents (beat k is due at k / rate seconds and belongs to agent
//! k mod agents, so each agent beats every agents / rate seconds), sent on
//! one HeartbeatStream per agent, as unary Heartbeat calls, or, for the
//! baseline, as unary calls of the bare echo. From `silence_at` on, the
//! silent agents' beats are left out (their streams stay open).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use tokio::{sync::mpsc, task::JoinSet};
use tonic::transport::Channel;

use agent_lifecycle::api::grpc::pb;

use super::super::{
    ceiling::echo_once,
    client::{CALL_TIMEOUT, Client},
};

/// How often the schedule sends what fell due.
const TICK: Duration = Duration::from_millis(1);
/// Messages a stream may have queued in the client before a beat counts
/// as dropped (the client fell behind).
const STREAM_QUEUE: usize = 8;
/// Bytes of an echo call, about a HeartbeatRequest on the wire.
const ECHO_PAYLOAD: usize = 60;

/// Where the schedule's beats go.
pub(super) enum Sink {
    /// One HeartbeatStream per agent, opened by [`Sink::streams`].
    Streams {
        senders: Vec<mpsc::Sender<pb::HeartbeatRequest>>,
        ids: Vec<String>,
        tasks: JoinSet<Result<u64, tonic::Status>>,
    },
    /// A unary Heartbeat per beat, agent i's on client i mod C.
    Unary {
        clients: Vec<Client>,
        ids: Vec<String>,
        calls: JoinSet<bool>,
    },
    /// A unary echo per beat, beat k's on channel k mod C.
    Echo {
        channels: Vec<Channel>,
        calls: JoinSet<bool>,
    },
}

impl Sink {
    /// A HeartbeatStream for each of `ids`, agent i's on client i mod C.
    pub(super) fn streams(clients: &[Client], ids: Vec<String>) -> Sink {
        let mut senders = Vec::with_capacity(ids.len());
        let mut tasks = JoinSet::new();
        for i in 0..ids.len() {
            let (sender, receiver) = mpsc::channel(STREAM_QUEUE);
            let messages = futures_util::stream::unfold(receiver, |mut receiver| async move {
                receiver.recv().await.map(|m| (m, receiver))
            });
            let mut client = clients[i % clients.len()].clone();
            tasks.spawn(async move {
                client
                    .heartbeat_stream(messages)
                    .await
                    .map(|r| r.into_inner().heartbeats)
            });
            senders.push(sender);
        }
        Sink::Streams {
            senders,
            ids,
            tasks,
        }
    }

    pub(super) fn unary(clients: Vec<Client>, ids: Vec<String>) -> Sink {
        Sink::Unary {
            clients,
            ids,
            calls: JoinSet::new(),
        }
    }

    pub(super) fn echo(channels: Vec<Channel>) -> Sink {
        Sink::Echo {
            channels,
            calls: JoinSet::new(),
        }
    }

    /// Sends agent `agent`'s beat (beat number `k`); false when it could
    /// not be handed on (a stream's queue full or closed).
    fn send(&mut self, agent: usize, k: u64, counts: &Arc<Counts>) -> bool {
        match self {
            Sink::Streams { senders, ids, .. } => {
                senders[agent].try_send(beat(&ids[agent])).is_ok()
            }
            Sink::Unary {
                clients,
                ids,
                calls,
            } => {
                let mut client = clients[agent % clients.len()].clone();
                let request = beat(&ids[agent]);
                let counts = Arc::clone(counts);
                calls.spawn(async move {
                    let answered = tokio::time::timeout(CALL_TIMEOUT, client.heartbeat(request))
                        .await
                        .is_ok_and(|r| r.is_ok());
                    counts.record(answered);
                    answered
                });
                true
            }
            Sink::Echo { channels, calls } => {
                let channel = channels[(k % channels.len() as u64) as usize].clone();
                let counts = Arc::clone(counts);
                calls.spawn(async move {
                    let payload = Bytes::from_static(&[7u8; ECHO_PAYLOAD]);
                    let answered = echo_once(channel, payload).await;
                    counts.record(answered);
                    answered
                });
                true
            }
        }
    }

    /// Reaps the unary calls that finished.
    fn reap(&mut self) {
        if let Sink::Unary { calls, .. } | Sink::Echo { calls, .. } = self {
            while calls.try_join_next().is_some() {}
        }
    }

    /// Ends the load: waits up to `limit` for the unary calls in flight;
    /// for streams, closes them and returns how many heartbeats the server
    /// counted on them (their responses) and how many streams failed.
    pub(super) async fn finish(self, limit: Duration) -> Finished {
        let deadline = tokio::time::Instant::now() + limit;
        let mut finished = Finished::default();
        match self {
            Sink::Streams {
                senders, mut tasks, ..
            } => {
                drop(senders);
                while let Ok(Some(joined)) =
                    tokio::time::timeout_at(deadline, tasks.join_next()).await
                {
                    match joined {
                        Ok(Ok(counted)) => finished.server_counted += counted,
                        Ok(Err(status)) => {
                            finished.failed += 1;
                            finished
                                .first_error
                                .get_or_insert_with(|| status.to_string());
                        }
                        Err(err) => {
                            finished.failed += 1;
                            finished.first_error.get_or_insert_with(|| err.to_string());
                        }
                    }
                }
                finished.unfinished = tasks.len() as u64;
            }
            Sink::Unary { mut calls, .. } | Sink::Echo { mut calls, .. } => {
                while let Ok(Some(_)) = tokio::time::timeout_at(deadline, calls.join_next()).await {
                }
                finished.unfinished = calls.len() as u64;
            }
        }
        finished
    }
}

/// Agent `id`'s heartbeat message.
fn beat(id: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        agent_id: id.to_string(),
        load: Some(0.5),
        current_task: String::new(),
    }
}

/// What [`Sink::finish`] found.
#[derive(Debug, Default)]
pub(super) struct Finished {
    /// Heartbeats the server counted on the streams it closed.
    pub(super) server_counted: u64,
    /// Streams that ended with an error.
    pub(super) failed: u64,
    pub(super) first_error: Option<String>,
    /// Calls or streams still open at the limit.
    pub(super) unfinished: u64,
}

/// Answers of the unary calls (heartbeats or echoes).
#[derive(Debug, Default)]
pub(super) struct Counts {
    answered: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    fn record(&self, answered: bool) {
        let counter = if answered {
            &self.answered
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    pub(super) fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// When beats are due and whose are left out.
pub(super) struct Schedule {
    pub(super) start: Instant,
    pub(super) rate: f64,
    pub(super) agents: usize,
    /// From here on the silent agents' beats are left out, and the beats
    /// sent count as the measured window's.
    pub(super) silence_at: Instant,
    pub(super) end: Instant,
    /// Per agent: whether it goes silent.
    pub(super) silent: Arc<Vec<bool>>,
}

/// What [`Schedule::drive`] did.
#[derive(Debug, Default)]
pub(super) struct Driven {
    /// Beats handed on from `silence_at` to the end.
    pub(super) in_window: u64,
    /// Beats that could not be handed on (a stream's queue full).
    pub(super) dropped: u64,
    /// The latest a tick ran after its time.
    pub(super) max_late: Duration,
    /// When each silent agent's last beat was sent.
    pub(super) last_beats: HashMap<usize, SystemTime>,
}

impl Schedule {
    /// Sends every beat when it falls due until `end`.
    pub(super) async fn drive(&self, sink: &mut Sink, counts: &Arc<Counts>) -> Driven {
        let mut ticks = tokio::time::interval_at(self.start.into(), TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut driven = Driven::default();
        let mut next: u64 = 0;
        loop {
            let tick = ticks.tick().await.into_std();
            let now = Instant::now();
            driven.max_late = driven.max_late.max(now.saturating_duration_since(tick));
            if now >= self.end {
                return driven;
            }
            let due = (now.duration_since(self.start).as_secs_f64() * self.rate) as u64;
            while next < due {
                let k = next;
                next += 1;
                let agent = (k % self.agents as u64) as usize;
                let scheduled = self.start + Duration::from_secs_f64(k as f64 / self.rate);
                let quiet = scheduled >= self.silence_at;
                if quiet && self.silent[agent] {
                    continue;
                }
                if !sink.send(agent, k, counts) {
                    driven.dropped += 1;
                    continue;
                }
                if quiet {
                    driven.in_window += 1;
                } else if self.silent[agent] {
                    driven.last_beats.insert(agent, SystemTime::now());
                }
            }
            sink.reap();
        }
    }
}
