//! The pod watcher: agents bound to a Deployment or StatefulSet follow the
//! status of its pods.
//!
//! One watch of the pods (of one namespace, or of all): kube-runtime's
//! watcher lists them, then watches from the list's `resourceVersion`;
//! bookmarks move that version on; a watch the server closes resumes from
//! the last version seen; an expired version (410 Gone) lists again, and
//! the new list replaces what was known, so a change made while the watch
//! was down is seen in the list. Other errors back off, doubling from half
//! a second to 30 seconds.
//!
//! A pod belongs to the workload that owns it: a StatefulSet directly, a
//! Deployment through its ReplicaSet, named `DEPLOYMENT-HASH` by the
//! Deployment controller, `HASH` being the pod's `pod-template-hash` label.
//! (No ReplicaSet is read.) Each workload's pods are summed up into one
//! status ([`super::status`]); when it changes, each agent bound to the
//! workload is told, through
//! [`sync_external_status`](crate::automation::sync::sync_external_status)
//! (one mapping, one shortest path) with `triggered_by` `k8s-driver`, the
//! workload, the pod and what it says in the reason, and the pod,
//! container, reason, message and exit code in the metadata.
//! An agent newly bound (within a tick) is told the status its workload
//! has. A workload with no pods is `NoPods` only once it has had pods.
//!
//! It watches only while this process holds the `k8s-observer` lease.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::watcher::{self, Event},
};
use tracing::{debug, info, warn};

use super::{
    K8S_DRIVER, K8S_OBSERVER, KubernetesSettings,
    status::{PodStatus, WorkloadStatus, pod_status, workload_status},
};
use crate::{
    AgentLifecycleService,
    automation::sync::{StatusReport, SyncOutcome, sync_external_status},
    domain::{AgentId, AgentState, Binding, Caller, ExternalSource, Metadata, WorkloadKind},
    service::lease_holder,
};

/// A workload: namespace, kind, name.
type Key = (String, WorkloadKind, String);

/// The first back-off after a watch error.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest back-off after watch errors.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Watches pods and moves the bound agents until the service shuts down.
pub async fn run(service: AgentLifecycleService, client: Client, settings: KubernetesSettings) {
    let mut lease = lease_holder(&service, K8S_OBSERVER);
    let tick = settings.tick.max(Duration::from_millis(10));
    info!(
        namespace = settings.namespace.as_deref().unwrap_or("(all)"),
        "Kubernetes pod watcher started"
    );
    while !service.is_shutting_down() {
        if !lease.held().await {
            tokio::time::sleep(tick).await;
            continue;
        }
        let api: Api<Pod> = match &settings.namespace {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        };
        let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
        let mut pods = Pods::default();
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = FIRST_BACKOFF;
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => {
                        backoff = FIRST_BACKOFF;
                        let changed = pods.apply(event);
                        pods.report(&service, &changed).await;
                    }
                    Some(Err(err)) => {
                        if gone(&err) {
                            info!(error = %err, "the pod watch expired; listing the pods again");
                            continue;
                        }
                        warn!(error = %err, retry_in = ?backoff, "the pod watch failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    None => break,
                },
                _ = ticks.tick() => {
                    if service.is_shutting_down() {
                        return;
                    }
                    if !lease.held().await {
                        warn!("the pod watcher's lease was lost; it stops until it holds it again");
                        break;
                    }
                    pods.rebind(&service);
                    let all: Vec<Key> = pods.bound.keys().cloned().collect();
                    pods.report(&service, &all).await;
                }
            }
        }
    }
}

/// Whether `err` is an expired resource version (410 Gone), after which
/// the watcher lists again at once.
fn gone(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// One pod as known.
#[derive(Clone, Debug)]
struct Known {
    status: PodStatus,
    /// It has been ready since it was first seen.
    was_ready: bool,
}

/// Pods by workload, and what each bound agent was told.
#[derive(Default)]
struct Pods {
    /// Pods by workload, then by name.
    known: HashMap<Key, BTreeMap<String, Known>>,
    /// During a list: the pods listed so far.
    listing: Option<HashMap<Key, BTreeMap<String, Known>>>,
    /// Workloads that had pods, so that having none now means something.
    had_pods: HashSet<Key>,
    /// Agents (and their state as of the last tick) by the workload they
    /// are bound to.
    bound: HashMap<Key, Vec<(AgentId, AgentState)>>,
    /// The status each agent was last told.
    told: HashMap<AgentId, &'static str>,
}

impl Pods {
    /// Takes in one watcher event; returns the workloads whose pods
    /// changed.
    fn apply(&mut self, event: Event<Pod>) -> Vec<Key> {
        match event {
            Event::Init => {
                self.listing = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(pod) => {
                if let Some((key, name, known)) = self.observe(&pod) {
                    let listing = self.listing.get_or_insert_with(HashMap::new);
                    listing.entry(key).or_default().insert(name, known);
                }
                Vec::new()
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.known, listed);
                let mut changed: HashSet<Key> = old.into_keys().collect();
                changed.extend(self.known.keys().cloned());
                self.had_pods.extend(self.known.keys().cloned());
                changed.into_iter().collect()
            }
            Event::Apply(pod) => {
                let Some((key, name, known)) = self.observe(&pod) else {
                    return Vec::new();
                };
                self.had_pods.insert(key.clone());
                self.known
                    .entry(key.clone())
                    .or_default()
                    .insert(name, known);
                vec![key]
            }
            Event::Delete(pod) => {
                let Some(key) = owner(&pod) else {
                    return Vec::new();
                };
                let name = pod.metadata.name.unwrap_or_default();
                if let Some(pods) = self.known.get_mut(&key) {
                    pods.remove(&name);
                    if pods.is_empty() {
                        self.known.remove(&key);
                    }
                }
                vec![key]
            }
        }
    }

    /// The workload, name and status of `pod`, if it belongs to a workload
    /// and says something.
    fn observe(&self, pod: &Pod) -> Option<(Key, String, Known)> {
        let key = owner(pod)?;
        let name = pod.metadata.name.clone()?;
        let was_ready = self
            .known
            .get(&key)
            .and_then(|pods| pods.get(&name))
            .is_some_and(|p| p.was_ready);
        let status = pod_status(pod, was_ready)?;
        let was_ready = was_ready || status.ready();
        Some((key, name, Known { status, was_ready }))
    }

    /// Reads which agents are bound to which workload; forgets what was
    /// told to agents no longer bound.
    fn rebind(&mut self, service: &AgentLifecycleService) {
        let mut bound: HashMap<Key, Vec<(AgentId, AgentState)>> = HashMap::new();
        for info in service.get_all_agent_statuses().into_values() {
            if info.agent.state == AgentState::Deleted {
                continue;
            }
            if let Ok(Some(Binding::Kubernetes(w))) = Binding::of(&info.agent.labels) {
                bound
                    .entry((w.namespace, w.kind, w.name))
                    .or_default()
                    .push((info.agent.id, info.agent.state));
            }
        }
        let agents: HashSet<AgentId> = bound.values().flatten().map(|(id, _)| *id).collect();
        self.told.retain(|id, _| agents.contains(id));
        self.bound = bound;
    }

    /// Tells the agents bound to `workloads` their workload's status, when
    /// it is not what they were last told, or when they are STARTING (and
    /// wait for the platform to say how the start went: a restart of an
    /// agent whose pods never changed is settled by what they say now).
    async fn report(&mut self, service: &AgentLifecycleService, workloads: &[Key]) {
        for key in workloads {
            let Some(agents) = self.bound.get(key) else {
                continue;
            };
            let pods = self.known.get(key);
            if pods.is_none() && !self.had_pods.contains(key) {
                continue;
            }
            let summary =
                workload_status(pods.into_iter().flat_map(|p| p.values()).map(|k| &k.status));
            for &(id, state) in agents {
                if self.told.get(&id) == Some(&summary.status) && state != AgentState::Starting {
                    continue;
                }
                if tell(service, id, key, &summary).await {
                    self.told.insert(id, summary.status);
                }
            }
        }
    }
}

/// The workload that owns `pod`: its StatefulSet, or the Deployment of its
/// ReplicaSet.
fn owner(pod: &Pod) -> Option<Key> {
    let namespace = pod.metadata.namespace.clone()?;
    let owners = pod.metadata.owner_references.as_ref()?;
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())?;
    if !owner.api_version.starts_with("apps/") {
        return None;
    }
    match owner.kind.as_str() {
        "StatefulSet" => Some((namespace, WorkloadKind::StatefulSet, owner.name.clone())),
        "ReplicaSet" => {
            let hash = pod.metadata.labels.as_ref()?.get("pod-template-hash")?;
            let name = owner.name.strip_suffix(hash.as_str())?.strip_suffix('-')?;
            Some((namespace, WorkloadKind::Deployment, name.to_string()))
        }
        _ => None,
    }
}

/// The reason recorded: the workload, the pod and what it says
/// (`kubernetes: prod/Deployment/bot: pod bot-7d9f-x2x9z CrashLoopBackOff:
/// back-off 40s restarting failed container=agent ...`).
fn reason(workload: &str, summary: &WorkloadStatus) -> String {
    let Some(pod) = &summary.from else {
        return format!("kubernetes: {workload} has no pods");
    };
    let mut reason = format!("kubernetes: {workload}: pod {} {}", pod.pod, summary.status);
    if let Some(why) = pod.reason.as_deref().filter(|r| *r != summary.status) {
        reason.push_str(&format!(" ({why})"));
    }
    if let Some(message) = &pod.message {
        reason.push_str(&format!(": {}", super::shorten(message)));
    }
    super::cut(&reason, crate::domain::limits::MAX_REASON_BYTES)
}

/// Hands `summary` to the sync for agent `id`; whether it was applied
/// (moved, already there, or unreachable: nothing to tell again).
async fn tell(
    service: &AgentLifecycleService,
    id: AgentId,
    key: &Key,
    summary: &WorkloadStatus,
) -> bool {
    let workload = format!("{}/{}/{}", key.0, key.1.as_str(), key.2);
    let mut metadata = Metadata::new();
    metadata.insert("workload".into(), workload.clone().into());
    metadata.insert("pods".into(), summary.pods.into());
    metadata.insert("ready_pods".into(), summary.ready.into());
    if let Some(pod) = &summary.from {
        metadata.insert("pod".into(), pod.pod.clone().into());
        let texts = [
            ("container", &pod.container),
            ("reason", &pod.reason),
            ("message", &pod.message),
        ];
        for (key, value) in texts {
            if let Some(value) = value {
                metadata.insert(key.into(), super::shorten(value).into());
            }
        }
        if let Some(code) = pod.exit_code {
            metadata.insert("exit_code".into(), code.into());
        }
    }
    let report = StatusReport {
        status: summary.status.to_string(),
        metadata,
        caller: Caller::principal(K8S_DRIVER),
        triggered_by: Some(K8S_DRIVER.to_string()),
        reason: Some(reason(&workload, summary)),
    };
    match sync_external_status(service, id, ExternalSource::Kubernetes, report).await {
        Ok(result) => {
            if result.outcome == SyncOutcome::Applied {
                info!(agent_id = %id, %workload, status = summary.status, steps = result.transitions.len(), "agent follows its workload");
            } else {
                debug!(agent_id = %id, %workload, status = summary.status, outcome = ?result.outcome, "workload status seen");
            }
            true
        }
        Err(err) => {
            warn!(agent_id = %id, %workload, status = summary.status, error = %err, "applying a workload status failed");
            false
        }
    }
}
