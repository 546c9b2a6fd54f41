//! What the health monitor did while the silent agents were quiet: one
//! WatchEvents stream from the head before the silence, read to the end of
//! the run. Every event must be a silent agent going to ERROR, once, no
//! later than `heartbeat_timeout` + one check interval after its last beat
//! was received (the agent's `last_heartbeat` as the server recorded it)
//! and no earlier than `heartbeat_timeout`; a healthy agent must not be
//! touched. The same figures from when the agents sent their last beat
//! are reported beside it (they add the transport's delay).

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use futures_util::{StreamExt as _, TryStreamExt as _};

use agent_lifecycle::api::grpc::pb::{self, watch_events_response::Kind};

use super::super::{
    client::{Client, SETUP_CONCURRENCY, call, head_sequence},
    stats::{ms, nanos, percentile},
};

/// One transition the stream delivered.
pub(super) struct Seen {
    agent_id: String,
    to: i32,
    at: SystemTime,
}

/// Opens a stream from the current head + 1 and reads it, in a task of
/// its own, until `until`.
///
/// # Errors
/// The head cannot be read or the stream cannot be opened.
pub(super) async fn watch(
    mut client: Client,
    until: Instant,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Vec<Seen>>>> {
    let head = head_sequence(&mut client).await?;
    let mut stream = call(
        "WatchEvents",
        client.watch_events(pb::WatchEventsRequest {
            start_sequence: head + 1,
            ..Default::default()
        }),
    )
    .await?;
    Ok(tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let message = match tokio::time::timeout_at(until.into(), stream.message()).await {
                Err(_) => return Ok(seen),
                Ok(message) => message.context("the event stream failed")?,
            };
            let Some(message) = message else {
                anyhow::bail!("the server ended the event stream");
            };
            if let Some(Kind::Event(event)) = message.kind
                && let Some(transition) = event.transition
            {
                let at = transition.timestamp.map_or(UNIX_EPOCH, system_time);
                seen.push(Seen {
                    agent_id: event.agent_id,
                    to: transition.to_state,
                    at,
                });
            }
        }
    }))
}

/// When the servers received each of the silent agents' last heartbeat
/// (GetAgent's `last_heartbeat`), by agent index.
///
/// # Errors
/// A GetAgent call failed.
pub(super) async fn received(
    client: &Client,
    ids: &[String],
    silent: &[bool],
) -> anyhow::Result<HashMap<usize, SystemTime>> {
    let wanted: Vec<usize> = (0..ids.len()).filter(|&i| silent[i]).collect();
    let found: Vec<(usize, Option<SystemTime>)> = futures_util::stream::iter(wanted)
        .map(|i| {
            let mut client = client.clone();
            let agent_id = ids[i].clone();
            async move {
                let reply = call(
                    "GetAgent",
                    client.get_agent(pb::GetAgentRequest {
                        agent_id,
                        ..Default::default()
                    }),
                )
                .await?;
                let at = reply
                    .agent
                    .and_then(|a| a.last_heartbeat)
                    .and_then(|b| b.received_at)
                    .map(system_time);
                Ok::<_, anyhow::Error>((i, at))
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(found
        .into_iter()
        .filter_map(|(i, at)| Some((i, at?)))
        .collect())
}

/// A wire timestamp as a time (before the epoch: the epoch).
fn system_time(t: prost_types::Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
}

/// How the monitor did.
#[derive(Debug, Default)]
pub(super) struct Verdict {
    /// Silent agents moved to ERROR in time.
    pub(super) detected: usize,
    /// Silent agents never moved to ERROR.
    pub(super) missed: usize,
    /// Moved after the bound, or before `heartbeat_timeout`.
    pub(super) late: usize,
    pub(super) early: usize,
    /// Events of healthy agents, and other events of silent ones.
    pub(super) healthy_touched: usize,
    pub(super) other: usize,
    pub(super) first_problem: Option<String>,
    /// Last beat sent to ERROR committed, over the silent agents, in ns.
    pub(super) detection: Vec<u64>,
}

impl Verdict {
    /// Whether every silent agent went to ERROR in time and nothing else
    /// happened.
    pub(super) fn holds(&self) -> bool {
        self.missed == 0
            && self.late == 0
            && self.early == 0
            && self.healthy_touched == 0
            && self.other == 0
    }

    /// The verdict on one line.
    pub(super) fn line(&self) -> String {
        let mut sorted = self.detection.clone();
        sorted.sort_unstable();
        format!(
            "{} silent agents to ERROR (last beat -> ERROR p50 {} max {}), missed {}, late {}, early {}, healthy agents touched {}, other events {}{}",
            self.detected,
            ms(percentile(&sorted, 0.5)),
            ms(sorted.last().copied().unwrap_or(0)),
            self.missed,
            self.late,
            self.early,
            self.healthy_touched,
            self.other,
            self.first_problem
                .as_deref()
                .map(|p| format!(" (first: {p})"))
                .unwrap_or_default()
        )
    }
}

/// Judges what the stream delivered up to `ended` (when the schedule
/// stopped: after it every agent is silent, so later events say nothing):
/// `ids` and `silent` per agent index, the silent agents' last beats, and
/// the detection window.
pub(super) fn judge(
    seen: &[Seen],
    ended: SystemTime,
    ids: &[String],
    silent: &[bool],
    last_beats: &HashMap<usize, SystemTime>,
    timeout: Duration,
    bound: Duration,
) -> Verdict {
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut verdict = Verdict::default();
    let mut errored = vec![false; ids.len()];
    for event in seen.iter().filter(|e| e.at <= ended) {
        let Some(&i) = index.get(event.agent_id.as_str()) else {
            verdict.other += 1;
            continue;
        };
        let problem = if !silent[i] {
            verdict.healthy_touched += 1;
            Some(format!(
                "healthy agent {} went to {}",
                event.agent_id, event.to
            ))
        } else if event.to != pb::AgentState::Error as i32 || errored[i] {
            verdict.other += 1;
            Some(format!(
                "silent agent {} went to {}",
                event.agent_id, event.to
            ))
        } else {
            errored[i] = true;
            let last = last_beats.get(&i).copied().unwrap_or(UNIX_EPOCH);
            let took = event.at.duration_since(last).unwrap_or_default();
            verdict.detection.push(nanos(took));
            if took > bound {
                verdict.late += 1;
                Some(format!(
                    "{} went to ERROR {} after its last beat",
                    event.agent_id,
                    ms(nanos(took))
                ))
            } else if took < timeout {
                verdict.early += 1;
                Some(format!(
                    "{} went to ERROR {} after its last beat",
                    event.agent_id,
                    ms(nanos(took))
                ))
            } else {
                verdict.detected += 1;
                None
            }
        };
        if verdict.first_problem.is_none() {
            verdict.first_problem = problem;
        }
    }
    verdict.missed = (0..ids.len()).filter(|&i| silent[i] && !errored[i]).count();
    if verdict.missed > 0 && verdict.first_problem.is_none() {
        verdict.first_problem = Some(format!(
            "{} silent agents never went to ERROR",
            verdict.missed
        ));
    }
    verdict
}
