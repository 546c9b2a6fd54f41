//! Idempotent retries (AIP-155): a mutating request may carry a
//! `request_id`. The records it commits carry the id and a fingerprint of
//! the request's content (durably, in the same transaction). The index here
//! maps each recent (principal, request_id) to those records, so that a
//! retry with the same id and content gets the original outcome without a
//! second transition, and the same id with other content is refused.
//!
//! The index is fed by every applied record (this process's commits and
//! those followed from other processes) and rebuilt from the store at
//! start-up, for the `window` the configuration keeps ids. Requests with
//! the same id are serialised within a process, so a retry that overtakes
//! its original waits for it.
//!
//! Knows the agent table and the store's log; must not depend on how a
//! change is planned or committed (the caller passes that in as `run`).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use crate::{
    domain::{AgentId, AgentState, RequestTag, TransitionRecord},
    error::{Error, Result},
    service::{AgentLifecycleService, ChangeRequest, Outcome, Registration},
};

/// Request ids remembered at most (the oldest go first beyond).
const MAX_REMEMBERED: usize = 1_000_000;

/// The request id a client gave: an empty one counts as none.
pub(crate) fn given(request_id: Option<&str>) -> Option<&str> {
    request_id.filter(|id| !id.is_empty())
}

/// Bytes in a `request_id`.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Default time a `request_id` is remembered.
pub const DEFAULT_REQUEST_WINDOW: Duration = Duration::from_secs(3600);

/// A principal's request id.
type Key = (String, String);

/// What a remembered request committed.
#[derive(Clone, Debug)]
pub(crate) struct Remembered {
    fingerprint: [u8; 32],
    agent_id: AgentId,
    first: u64,
    last: u64,
}

/// Recent request ids and their records.
#[derive(Debug)]
pub(crate) struct RequestIndex {
    window: Duration,
    entries: HashMap<Key, Remembered>,
    /// Insertion order, for expiry.
    order: VecDeque<(SystemTime, Key)>,
}

impl Default for RequestIndex {
    fn default() -> Self {
        RequestIndex::new(DEFAULT_REQUEST_WINDOW)
    }
}

impl RequestIndex {
    pub(crate) fn new(window: Duration) -> Self {
        RequestIndex {
            window,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Notes a committed record (those without a request tag are ignored).
    pub(crate) fn note(&mut self, record: &TransitionRecord) {
        let Some(tag) = &record.request else {
            return;
        };
        let key = (record.principal.clone(), tag.id.clone());
        match self.entries.get_mut(&key) {
            Some(entry) if entry.fingerprint == tag.fingerprint => {
                entry.first = entry.first.min(record.sequence);
                entry.last = entry.last.max(record.sequence);
            }
            _ => {
                self.entries.insert(
                    key.clone(),
                    Remembered {
                        fingerprint: tag.fingerprint,
                        agent_id: record.agent_id,
                        first: record.sequence,
                        last: record.sequence,
                    },
                );
                self.order.push_back((record.at, key));
            }
        }
        self.expire(SystemTime::now().min(record.at));
    }

    /// Forgets ids older than the window (as of `now`) and beyond the cap.
    fn expire(&mut self, now: SystemTime) {
        while let Some((at, _)) = self.order.front() {
            let old = now.duration_since(*at).unwrap_or_default() > self.window;
            if !old && self.order.len() <= MAX_REMEMBERED {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.entries.remove(&key);
            }
        }
    }

    fn find(&self, key: &Key) -> Option<Remembered> {
        self.entries.get(key).cloned()
    }
}

/// SHA-256 over `parts`, each length-prefixed (so that no two different
/// sequences of parts hash alike).
pub(crate) fn fingerprint(parts: &[&[u8]]) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// The fingerprint of a registration: everything the caller sent but the
/// request id and the caller.
pub(super) fn registration_fingerprint(registration: &Registration) -> [u8; 32] {
    let change = &registration.change;
    let labels = serde_json::to_vec(&registration.labels).unwrap_or_default();
    let metadata = serde_json::to_vec(&change.metadata).unwrap_or_default();
    let id = registration
        .agent_id
        .map(|id| *id.as_bytes())
        .unwrap_or_default();
    fingerprint(&[
        b"register_agent",
        &id,
        registration.name.as_bytes(),
        &labels,
        change.reason.as_bytes(),
        change.triggered_by.as_bytes(),
        &metadata,
    ])
}

/// The fingerprint of the operation `operation` on agent `id` along `path`:
/// everything the caller sent but the request id and the caller.
pub(super) fn transition_fingerprint(
    operation: &str,
    id: AgentId,
    path: &[(AgentState, &'static str)],
    change: &ChangeRequest,
) -> [u8; 32] {
    let targets: Vec<u8> = path.iter().map(|(to, _)| *to as u8).collect();
    let metadata = serde_json::to_vec(&change.metadata).unwrap_or_default();
    let expected = change
        .expected_version
        .map(u64::to_be_bytes)
        .unwrap_or_default();
    fingerprint(&[
        operation.as_bytes(),
        id.as_bytes(),
        &targets,
        change.reason.as_bytes(),
        change.triggered_by.as_bytes(),
        &metadata,
        &[u8::from(change.expected_version.is_some())],
        &expected,
    ])
}

/// Requests with a request id, in flight in this process.
#[derive(Debug, Default)]
pub(crate) struct InFlight(Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>);

impl AgentLifecycleService {
    /// Runs `run` once per (principal, `request_id`): the first time with
    /// the tag its records must carry; a retry with the same `fingerprint`
    /// gets the original outcome back, rebuilt from the log; other content
    /// under the same id is refused. Without a request id, just runs it.
    pub(crate) async fn idempotent<F, Fut>(
        &self,
        principal: &str,
        request_id: Option<&str>,
        fingerprint: [u8; 32],
        run: F,
    ) -> Result<Outcome>
    where
        F: FnOnce(Option<Arc<RequestTag>>) -> Fut,
        Fut: std::future::Future<Output = Result<Outcome>>,
    {
        let Some(request_id) = given(request_id) else {
            return run(None).await;
        };
        let key: Key = (principal.to_string(), request_id.to_string());
        let slot = {
            let mut in_flight = self
                .shared()
                .in_flight
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            Arc::clone(in_flight.entry(key.clone()).or_default())
        };
        let result = {
            let _turn = slot.lock().await;
            // Another process may have committed it: the index learns of
            // its records by following the log.
            self.catch_up_with_store().await?;
            let found = self.shared().read_table().requests.find(&key);
            match found {
                Some(entry) if entry.fingerprint == fingerprint => self.replay(&entry).await,
                Some(_) => Err(Error::RequestIdReused {
                    request_id: request_id.to_string(),
                }),
                None => {
                    run(Some(Arc::new(RequestTag {
                        id: request_id.to_string(),
                        fingerprint,
                    })))
                    .await
                }
            }
        };
        let mut in_flight = self
            .shared()
            .in_flight
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The map's and ours: nobody else waits for this id.
        if Arc::strong_count(&slot) == 2 {
            in_flight.remove(&key);
        }
        result
    }

    /// The outcome a remembered request had: its records from the log, and
    /// the agent as they left it.
    async fn replay(&self, entry: &Remembered) -> Result<Outcome> {
        let (first, count) = (entry.first, entry.last - entry.first + 1);
        let records = self
            .shared()
            .read_store(move |store| {
                store.events_after(
                    first.saturating_sub(1),
                    usize::try_from(count).unwrap_or(usize::MAX),
                )
            })
            .await?;
        let agent = self.get_agent(entry.agent_id)?;
        let transitions: Vec<Arc<TransitionRecord>> = records
            .into_iter()
            .filter(|r| r.agent_id == entry.agent_id && r.request.is_some())
            .collect();
        let Some(last) = transitions.last() else {
            return Err(Error::RequestCompacted { oldest: first });
        };
        Ok(Outcome {
            agent: Arc::new(agent.after(Arc::clone(last))),
            transitions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AgentState;

    async fn service_with_agent() -> (AgentLifecycleService, AgentId) {
        let service = AgentLifecycleService::in_memory().expect("service");
        let outcome = service
            .register_agent(Registration {
                name: "a".into(),
                ..Registration::default()
            })
            .await
            .expect("registered");
        (service, outcome.agent.id)
    }

    fn with_request_id(reason: &str, request_id: &str) -> ChangeRequest {
        ChangeRequest {
            reason: reason.into(),
            request_id: Some(request_id.into()),
            ..ChangeRequest::default()
        }
    }

    /// A retry with the same request id and content gets the original
    /// outcome (the same records, the agent as they left it) and records
    /// nothing new, even after the agent moved on.
    #[tokio::test]
    async fn a_retry_gets_the_original_outcome_without_a_second_change() {
        let (service, id) = service_with_agent().await;
        let first = service
            .deploy_agent(id, with_request_id("rollout", "r-1"))
            .await
            .expect("deployed");
        assert_eq!(first.transitions.len(), 2);
        service
            .start_agent(id, ChangeRequest::because("start"))
            .await
            .expect("started");
        let head = service.head_sequence();

        let retry = service
            .deploy_agent(id, with_request_id("rollout", "r-1"))
            .await
            .expect("the retry is answered");

        assert_eq!(retry.transitions, first.transitions);
        assert_eq!(retry.agent.state, AgentState::Deployed);
        assert_eq!(retry.agent.version, first.agent.version);
        assert_eq!(service.head_sequence(), head, "nothing new recorded");
    }

    /// The same request id with other content (another reason, another
    /// operation) is refused and records nothing; another caller's id of
    /// the same text is its own.
    #[tokio::test]
    async fn the_same_request_id_with_other_content_is_refused() {
        let (service, id) = service_with_agent().await;
        service
            .deploy_agent(id, with_request_id("rollout", "r-1"))
            .await
            .expect("deployed");
        let head = service.head_sequence();

        let other_reason = service
            .deploy_agent(id, with_request_id("another", "r-1"))
            .await;
        assert!(
            matches!(other_reason, Err(Error::RequestIdReused { ref request_id }) if request_id == "r-1"),
            "{other_reason:?}"
        );
        let other_operation = service
            .start_agent(id, with_request_id("rollout", "r-1"))
            .await;
        assert!(
            matches!(other_operation, Err(Error::RequestIdReused { .. })),
            "{other_operation:?}"
        );
        assert_eq!(service.head_sequence(), head, "nothing recorded");
    }

    /// Fingerprints cover every field the caller sent: the same content
    /// hashes alike, any difference does not.
    #[test]
    fn fingerprints_follow_the_content() {
        let id = AgentId::generate();
        let path = &[(AgentState::Deploying, ""), (AgentState::Deployed, "")];
        let change = ChangeRequest::because("rollout");
        let base = transition_fingerprint("deploy_agent", id, path, &change);
        assert_eq!(
            base,
            transition_fingerprint("deploy_agent", id, path, &change)
        );
        let versioned = ChangeRequest {
            expected_version: Some(1),
            ..change.clone()
        };
        for other in [
            transition_fingerprint("start_agent", id, path, &change),
            transition_fingerprint("deploy_agent", AgentId::generate(), path, &change),
            transition_fingerprint("deploy_agent", id, &path[..1], &change),
            transition_fingerprint("deploy_agent", id, path, &ChangeRequest::because("x")),
            transition_fingerprint("deploy_agent", id, path, &versioned),
        ] {
            assert_ne!(other, base);
        }
        // Length prefixes keep the parts apart.
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
    }
}
