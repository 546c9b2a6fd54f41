//! The Hugging Face Spaces poller: agents labelled with their Space
//! (`hf.space=owner/name`) follow the Space's runtime stage.
//!
//! Every `interval` (every `fast_interval` while a Space is in an
//! intermediate stage: BUILDING, APP_STARTING, RUNNING_BUILDING,
//! RUNNING_APP_STARTING) the poller asks `GET {base}/api/spaces/{owner}/{name}/runtime`
//! (with `Authorization: Bearer TOKEN` when a token is configured) and hands
//! the stage to [`crate::automation::sync::sync_external_status`] as source `hf_space`:
//! the agent walks the policy's path to the mapped state, each step recorded
//! with `triggered_by = hf_sync`. The response's `errorMessage` is recorded
//! in the transitions' metadata (`error_message`). A 404 means the Space is
//! gone (DELETED). A 429 or 5xx, a timeout or a connection failure backs off
//! for that Space alone (doubling, up to `max_backoff`); other Spaces are
//! polled as usual, several at a time, so one slow Space never holds the
//! others up.
//!
//! The poller drives the service through its public API, like a client,
//! and polls only while this process holds the `hf-poller` lease, so a
//! fleet of servers on one PostgreSQL database polls each Space once.
//!
//! The base URL is `https://huggingface.co` for the Hub itself (verified
//! against the compiled-in public roots plus any `ca_file`), or a mirror
//! or proxy over HTTPS or plain HTTP.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::{sync::Semaphore, task::JoinSet};
use tracing::{debug, info, warn};

pub use crate::automation::http_client::client_config;
use crate::{
    AgentLifecycleService,
    automation::{
        http_client::{self, HttpsClient},
        sync::{StatusReport, SyncOutcome, sync_external_status},
    },
    domain::{AgentId, Caller, ExternalSource, Metadata},
    service::lease_holder,
};

/// The label that names an agent's Space (`owner/name`).
pub const SPACE_LABEL: &str = crate::domain::binding::HF_SPACE_LABEL;

/// Stages after which the Space is about to change again.
const INTERMEDIATE: &[&str] = &[
    "BUILDING",
    "APP_STARTING",
    "RUNNING_BUILDING",
    "RUNNING_APP_STARTING",
];

/// Requests in flight at once.
const CONCURRENT_REQUESTS: usize = 8;

/// How long one request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Poller settings (`[hf]` in the configuration file).
#[derive(Clone, Debug, PartialEq)]
pub struct HfSettings {
    /// `https://HOST[:PORT]` of the Hub API (or of a mirror, which may be
    /// plain `http://`).
    pub base_url: String,
    /// CA certificates trusted besides the compiled-in public roots.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Bearer token, when the Spaces are private.
    pub token: Option<String>,
    /// Time between polls of a Space in a settled stage.
    pub interval: Duration,
    /// Time between polls of a Space in an intermediate stage.
    pub fast_interval: Duration,
    /// Longest wait after 429, 5xx or a failed request.
    pub max_backoff: Duration,
    /// How often the poller looks for due Spaces (and new agents).
    pub tick: Duration,
}

impl Default for HfSettings {
    fn default() -> Self {
        HfSettings {
            base_url: String::new(),
            extra_roots: Vec::new(),
            token: None,
            interval: Duration::from_secs(30),
            fast_interval: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
            tick: Duration::from_secs(1),
        }
    }
}

/// Where one Space stands with the poller.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    /// Wall time of the next poll.
    due: SystemTime,
    /// The current back-off after failures (zero when healthy).
    backoff: Duration,
}

/// What one poll learned.
pub(crate) enum Polled {
    /// The Space's stage and error message.
    Stage(String, Option<String>),
    /// 404: the Space is gone.
    Gone,
    /// 429, 5xx, timeout or connection failure: try again later.
    Retry(String),
}

/// The HTTP client: HTTPS verified against the public roots and the
/// configured extra ones, or plain HTTP.
pub(crate) type HubClient = HttpsClient<Empty<Bytes>>;

pub(crate) fn hub_client(settings: &HfSettings) -> Result<HubClient, rustls::Error> {
    http_client::client(&settings.extra_roots)
}

/// Runs the poller until the service shuts down.
pub async fn run(service: AgentLifecycleService, settings: HfSettings) {
    let client = match hub_client(&settings) {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(error = %err, "the Hugging Face poller cannot start");
            return;
        }
    };
    let mut lease = lease_holder(&service, "hf-poller");
    let mut schedules: HashMap<AgentId, Schedule> = HashMap::new();
    let mut in_flight: HashSet<AgentId> = HashSet::new();
    let mut polls = JoinSet::new();
    let limit = Arc::new(Semaphore::new(CONCURRENT_REQUESTS));
    let mut ticks = tokio::time::interval(settings.tick.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(base = %settings.base_url, "Hugging Face poller started");
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if service.is_shutting_down() {
                    return;
                }
                if !lease.held().await {
                    continue;
                }
                let now = service.config().clock.now();
                let spaces = labelled_spaces(&service);
                schedules.retain(|id, _| spaces.iter().any(|(s, _)| s == id));
                for (id, space) in spaces {
                    let schedule = schedules.entry(id).or_insert(Schedule {
                        due: now,
                        backoff: Duration::ZERO,
                    });
                    // One poll per Space at a time; a slow one holds up only
                    // itself.
                    if schedule.due > now || !in_flight.insert(id) {
                        continue;
                    }
                    let client = client.clone();
                    let settings = settings.clone();
                    let limit = Arc::clone(&limit);
                    polls.spawn(async move {
                        let _permit = limit.acquire_owned().await;
                        let polled = poll(&client, &settings, &space).await;
                        (id, space, polled)
                    });
                }
            }
            Some(joined) = polls.join_next(), if !polls.is_empty() => {
                let Ok((id, space, polled)) = joined else {
                    continue;
                };
                in_flight.remove(&id);
                let next = apply(&service, &settings, id, &space, polled).await;
                if let Some(schedule) = schedules.get_mut(&id) {
                    let now = service.config().clock.now();
                    *schedule = match next {
                        Next::After(wait) => Schedule {
                            due: now + wait,
                            backoff: Duration::ZERO,
                        },
                        Next::BackOff => {
                            let backoff = (schedule.backoff * 2)
                                .max(settings.fast_interval)
                                .min(settings.max_backoff);
                            Schedule {
                                due: now + backoff,
                                backoff,
                            }
                        }
                    };
                }
            }
        }
    }
}

/// Agents with a Space label, and the Space each names.
fn labelled_spaces(service: &AgentLifecycleService) -> Vec<(AgentId, String)> {
    service
        .get_all_agent_statuses()
        .into_values()
        .filter_map(|info| {
            let space = info.agent.labels.get(SPACE_LABEL)?;
            Some((info.agent.id, space.clone()))
        })
        .collect()
}

/// When to poll a Space next.
enum Next {
    After(Duration),
    BackOff,
}

async fn apply(
    service: &AgentLifecycleService,
    settings: &HfSettings,
    id: AgentId,
    space: &str,
    polled: Polled,
) -> Next {
    let (stage, error_message) = match polled {
        Polled::Stage(stage, error) => (stage, error),
        Polled::Gone => ("DELETED".to_string(), None),
        Polled::Retry(why) => {
            warn!(%space, agent_id = %id, why, "Space runtime unavailable; backing off");
            return Next::BackOff;
        }
    };
    let mut metadata = Metadata::new();
    metadata.insert("space".into(), space.into());
    if let Some(message) = error_message {
        metadata.insert("error_message".into(), message.into());
    }
    let report = StatusReport {
        status: stage.clone(),
        metadata,
        caller: Caller::principal("hf-poller"),
        ..StatusReport::default()
    };
    match sync_external_status(service, id, ExternalSource::HfSpace, report).await {
        Ok(result) => {
            if result.outcome == SyncOutcome::Applied {
                info!(%space, agent_id = %id, %stage, steps = result.transitions.len(), "agent follows its Space");
            } else {
                debug!(%space, agent_id = %id, %stage, outcome = ?result.outcome, "Space polled");
            }
        }
        Err(err) => {
            warn!(%space, agent_id = %id, %stage, error = %err, "applying a Space stage failed");
        }
    }
    if INTERMEDIATE.contains(&stage.to_ascii_uppercase().as_str()) {
        Next::After(settings.fast_interval)
    } else {
        Next::After(settings.interval)
    }
}

/// One `GET .../runtime`.
pub(crate) async fn poll(client: &HubClient, settings: &HfSettings, space: &str) -> Polled {
    let Some((owner, name)) = space.split_once('/') else {
        return Polled::Retry(format!("label {SPACE_LABEL}={space:?} is not owner/name"));
    };
    let base = settings.base_url.trim_end_matches('/');
    let uri = format!("{base}/api/spaces/{owner}/{name}/runtime");
    let mut request = hyper::Request::get(&uri).header("accept", "application/json");
    if let Some(token) = &settings.token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = match request.body(Empty::<Bytes>::new()) {
        Ok(request) => request,
        Err(err) => return Polled::Retry(format!("bad request {uri}: {err}")),
    };
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => return Polled::Retry(format!("{uri}: {err}")),
        Err(_) => return Polled::Retry(format!("{uri}: no answer in {REQUEST_TIMEOUT:?}")),
    };
    let status = response.status();
    if status == hyper::StatusCode::NOT_FOUND {
        return Polled::Gone;
    }
    if status == hyper::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Polled::Retry(format!("{uri}: HTTP {status}"));
    }
    if !status.is_success() {
        return Polled::Retry(format!("{uri}: HTTP {status}"));
    }
    let body = match tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect()).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(err)) => return Polled::Retry(format!("{uri}: {err}")),
        Err(_) => return Polled::Retry(format!("{uri}: body not read in {REQUEST_TIMEOUT:?}")),
    };
    let runtime: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(err) => return Polled::Retry(format!("{uri}: not JSON: {err}")),
    };
    match runtime.get("stage").and_then(|s| s.as_str()) {
        Some(stage) => Polled::Stage(
            stage.to_string(),
            runtime
                .get("errorMessage")
                .and_then(|m| m.as_str())
                .map(str::to_string),
        ),
        None => Polled::Retry(format!("{uri}: no stage in {runtime}")),
    }
}
