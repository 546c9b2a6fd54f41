//! The Kubernetes driver: a Deployment or StatefulSet bound to an agent
//! (`k8s.workload=NAMESPACE/KIND/NAME`) follows the agent, and the agent
//! follows the workload's pods.
//!
//! - **Acting** ([`KubernetesDriver`], run by [`super::run`] under the
//!   `k8s-driver` lease and cursor): DEPLOYING reads the workload (it is
//!   made outside the server; a missing one is refused, naming it);
//!   STARTING scales it to the agent's replicas (`k8s.replicas`, default 1)
//!   and STOPPING or TERMINATED to 0, through the scale subresource (a
//!   JSON merge patch of `spec.replicas`); STARTING entered by a restart of
//!   the health monitor restarts its pods as `kubectl rollout restart`
//!   does (the pod template's `kubectl.kubernetes.io/restartedAt` set to
//!   the event's time, with the replicas); DELETED deletes it when the
//!   agent says the server owns it (`k8s.owned=true`, background
//!   propagation), and scales it to 0 otherwise. The replicas come from
//!   the agent's label, not from the workload, so starting after a stop
//!   needs no record of what ran before. Before acting, the runner asks
//!   [`Driver::settled`]: the scale subresource's `spec.replicas` already
//!   as wanted (start, stop), the workload there (create) or gone (remove),
//!   its `restartedAt` not older than the event (restart).
//! - **Observing** ([`watch::run`], under the `k8s-observer` lease): one
//!   watch of the pods of every namespace (or of the configured one),
//!   each pod matched to its workload by its owner, each workload's pods
//!   summed up into one status ([`status`]) and handed to
//!   [`sync_external_status`](crate::automation::sync::sync_external_status)
//!   for its bound agents.
//!
//! The API answers 429 or 5xx, or no answer within 10 seconds, are
//! transient (the runner retries them with back-off); any other refusal
//! carries the API's `Status`: its message and reason in the message, its
//! HTTP code as the code.
//!
//! The client is kube-rs with rustls on ring; kube's own retry layer is
//! off, so that every retry is the runner's, and counted.

pub mod status;
pub mod watch;

use std::{fmt::Debug, path::PathBuf, time::Duration};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::{Deployment, StatefulSet},
        autoscaling::v1::Scale,
    },
};
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::{Serialize, de::DeserializeOwned};

use super::{ActFuture, Driver, PlatformError, SettleFuture, Target};
use crate::domain::{Binding, PlatformAction, Workload, WorkloadKind, parse_rfc3339, rfc3339};

/// The driver's lease, cursor and `triggered_by`.
pub const K8S_DRIVER: &str = "k8s-driver";

/// The lease of the pod watcher (one process of a fleet watches).
pub const K8S_OBSERVER: &str = "k8s-observer";

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest platform message kept in a reason.
const MAX_MESSAGE_BYTES: usize = 512;

/// How the server reaches the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST` and the token
    /// and CA under `/var/run/secrets/kubernetes.io/serviceaccount`).
    InCluster,
    /// A kubeconfig file, with its current context or the one named.
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The context; its `current-context` when `None`.
        context: Option<String>,
    },
}

/// The driver's settings (`[kubernetes]` in the configuration file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// How to reach the API server.
    pub credentials: Credentials,
    /// The namespace whose pods are watched; every namespace when `None`.
    pub namespace: Option<String>,
    /// Whether the server also scales and deletes the bound workloads.
    pub act: bool,
    /// How often the watcher looks for agents newly bound (or unbound).
    pub tick: Duration,
}

impl KubernetesSettings {
    /// Settings with `credentials`, every namespace, observing only.
    pub fn new(credentials: Credentials) -> Self {
        KubernetesSettings {
            credentials,
            namespace: None,
            act: false,
            tick: Duration::from_secs(1),
        }
    }
}

/// A client of the API server that `settings` name.
///
/// # Errors
/// The kubeconfig cannot be read or has no such context, the in-cluster
/// files are missing, or the TLS material is invalid.
pub async fn client(settings: &KubernetesSettings) -> Result<Client, String> {
    let mut config = match &settings.credentials {
        Credentials::InCluster => {
            kube::Config::incluster().map_err(|e| format!("in-cluster credentials: {e}"))?
        }
        Credentials::Kubeconfig { path, context } => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            let options = KubeConfigOptions {
                context: context.clone(),
                ..KubeConfigOptions::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
    };
    config.default_retry = false;
    config.connect_timeout = Some(REQUEST_TIMEOUT);
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// Scales, restarts and deletes the bound workloads through the API
/// server.
pub struct KubernetesDriver {
    client: Client,
}

/// The pod template annotation whose change restarts a workload's pods
/// (what `kubectl rollout restart` sets).
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

impl KubernetesDriver {
    /// A driver that acts through `client`.
    pub fn new(client: Client) -> Self {
        KubernetesDriver { client }
    }

    /// Does `op` to the workload, whichever its kind; what it read.
    async fn call(&self, workload: &Workload, op: &Op) -> Result<Read, PlatformError> {
        let client = self.client.clone();
        let ns = workload.namespace.as_str();
        let name = workload.name.as_str();
        let done = match workload.kind {
            WorkloadKind::Deployment => {
                let api = Api::<Deployment>::namespaced(client, ns);
                tokio::time::timeout(REQUEST_TIMEOUT, op.on(api, name)).await
            }
            WorkloadKind::StatefulSet => {
                let api = Api::<StatefulSet>::namespaced(client, ns);
                tokio::time::timeout(REQUEST_TIMEOUT, op.on(api, name)).await
            }
        };
        let what = format!(
            "{} {}/{}/{}",
            op.verb(),
            workload.namespace,
            workload.kind.as_str(),
            workload.name
        );
        match done {
            Err(_) => Err(PlatformError::Transient(format!(
                "{what}: no answer in {REQUEST_TIMEOUT:?}"
            ))),
            Ok(Ok(read)) => Ok(read),
            // Gone: what a read reports, and what deleting (or stopping
            // for a removal) would leave.
            Ok(Err(kube::Error::Api(status)))
                if status.code == 404
                    && matches!(op, Op::Delete | Op::ScaleDown | Op::Read | Op::ReadScale) =>
            {
                Ok(Read::default())
            }
            Ok(Err(err)) => Err(platform_error(&what, err)),
        }
    }
}

/// What a request read of a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Read {
    /// It exists.
    exists: bool,
    /// Its desired replicas (`spec.replicas`).
    replicas: Option<i64>,
    /// Its pod template's [`RESTARTED_AT`].
    restarted_at: Option<String>,
}

/// One request about a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    /// Read it: it must exist.
    Get,
    /// Read it; a missing one is read as such.
    Read,
    /// Read its scale subresource; a missing one is read as such.
    ReadScale,
    /// Scale it to this many replicas.
    Scale(u32),
    /// Scale it to 0 because its agent is deleted (a missing workload is
    /// fine).
    ScaleDown,
    /// Restart its pods (a new [`RESTARTED_AT`]) with this many replicas.
    Restart(u32, String),
    /// Delete it.
    Delete,
}

impl Op {
    fn verb(&self) -> String {
        match self {
            Op::Get | Op::Read => "read".into(),
            Op::ReadScale => "read the scale of".into(),
            Op::Scale(n) => format!("scale to {n}"),
            Op::ScaleDown => "scale to 0".into(),
            Op::Restart(n, _) => format!("restart with {n} replicas"),
            Op::Delete => "delete".into(),
        }
    }

    async fn on<K>(&self, api: Api<K>, name: &str) -> Result<Read, kube::Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Serialize
            + Debug,
    {
        let scale =
            |replicas: u32| Patch::Merge(serde_json::json!({ "spec": { "replicas": replicas } }));
        let params = PatchParams::default();
        let scaled = |scale: Scale| Read {
            exists: true,
            replicas: scale.spec.and_then(|s| s.replicas).map(i64::from),
            restarted_at: None,
        };
        match self {
            Op::Get | Op::Read => api.get(name).await.map(|object| read(&object)),
            Op::ReadScale => api.get_scale(name).await.map(scaled),
            Op::Scale(n) => api.patch_scale(name, &params, &scale(*n)).await.map(scaled),
            Op::ScaleDown => api.patch_scale(name, &params, &scale(0)).await.map(scaled),
            Op::Restart(n, at) => {
                let patch = Patch::Merge(serde_json::json!({ "spec": {
                    "replicas": n,
                    "template": { "metadata": { "annotations": { RESTARTED_AT: at } } },
                } }));
                api.patch(name, &params, &patch)
                    .await
                    .map(|object| read(&object))
            }
            Op::Delete => api
                .delete(name, &DeleteParams::background())
                .await
                .map(|_| Read::default()),
        }
    }
}

/// The replicas and restart annotation of a Deployment or StatefulSet.
fn read(object: &impl Serialize) -> Read {
    let value = serde_json::to_value(object).unwrap_or_default();
    Read {
        exists: true,
        replicas: value.pointer("/spec/replicas").and_then(|r| r.as_i64()),
        restarted_at: value
            .pointer("/spec/template/metadata/annotations")
            .and_then(|a| a.get(RESTARTED_AT))
            .and_then(|a| a.as_str())
            .map(str::to_string),
    }
}

/// A kube error as the runner's: 429, 5xx and failures to reach the API
/// server are transient; any other answer is a refusal with the API's
/// message, reason and code.
fn platform_error(what: &str, err: kube::Error) -> PlatformError {
    match err {
        kube::Error::Api(status) => {
            let code = status.code;
            let message = shorten(&status.message);
            let reason = if status.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", status.reason)
            };
            if code == 429 || code >= 500 {
                PlatformError::Transient(format!("{what}: HTTP {code}{reason}: {message}"))
            } else {
                PlatformError::Refused {
                    message: format!("{what}: {message}{reason}"),
                    code: code.to_string(),
                }
            }
        }
        other => PlatformError::Transient(format!("{what}: {}", shorten(&other.to_string()))),
    }
}

/// `text`, cut to [`MAX_MESSAGE_BYTES`] on a character boundary.
fn shorten(text: &str) -> String {
    cut(text, MAX_MESSAGE_BYTES)
}

/// `text`, cut to at most `max` bytes (an ellipsis included) on a
/// character boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

impl Driver for KubernetesDriver {
    fn name(&self) -> &'static str {
        K8S_DRIVER
    }

    fn binds(&self, binding: &Binding) -> bool {
        matches!(binding, Binding::Kubernetes(_))
    }

    fn settled<'a>(&'a self, target: Target<'a>, action: PlatformAction) -> SettleFuture<'a> {
        Box::pin(async move {
            let Binding::Kubernetes(workload) = target.binding else {
                return Ok(true);
            };
            let wanted = |n: u32| Some(i64::from(n));
            Ok(match action {
                PlatformAction::Create => self.call(workload, &Op::Read).await?.exists,
                PlatformAction::Start => {
                    let read = self.call(workload, &Op::ReadScale).await?;
                    read.exists && read.replicas == wanted(workload.replicas)
                }
                PlatformAction::Restart => {
                    let read = self.call(workload, &Op::Read).await?;
                    read.replicas == wanted(workload.replicas)
                        && read.restarted_at.as_deref().and_then(parse_rfc3339) >= Some(target.at)
                }
                PlatformAction::Stop => {
                    let read = self.call(workload, &Op::ReadScale).await?;
                    read.exists && read.replicas == Some(0)
                }
                PlatformAction::Remove if workload.owned => {
                    !self.call(workload, &Op::Read).await?.exists
                }
                PlatformAction::Remove => {
                    let read = self.call(workload, &Op::ReadScale).await?;
                    !read.exists || read.replicas == Some(0)
                }
            })
        })
    }

    fn act<'a>(&'a self, target: Target<'a>, action: PlatformAction) -> ActFuture<'a> {
        Box::pin(async move {
            let Binding::Kubernetes(workload) = target.binding else {
                return Ok(());
            };
            let op = match action {
                PlatformAction::Create => Op::Get,
                PlatformAction::Start => Op::Scale(workload.replicas),
                // The event's time: a repeated restart sets the same value
                // and restarts nothing twice.
                PlatformAction::Restart => Op::Restart(workload.replicas, rfc3339(target.at)),
                PlatformAction::Stop => Op::Scale(0),
                PlatformAction::Remove if workload.owned => Op::Delete,
                PlatformAction::Remove => Op::ScaleDown,
            };
            self.call(workload, &op).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            status: Some(kube::core::response::StatusSummary::Failure),
            code,
            message: message.into(),
            metadata: None,
            reason: reason.into(),
            details: None,
        }))
    }

    /// 429 and 5xx are worth another try; other answers are refusals that
    /// carry the API's message, reason and code.
    #[test]
    fn api_errors_are_transient_or_refusals() {
        let what = "scale to 1 prod/Deployment/bot";
        assert!(matches!(
            platform_error(what, status(503, "ServiceUnavailable", "etcd down")),
            PlatformError::Transient(m) if m.contains("HTTP 503")
        ));
        assert!(matches!(
            platform_error(what, status(429, "TooManyRequests", "slow down")),
            PlatformError::Transient(_)
        ));
        assert_eq!(
            platform_error(what, status(403, "Forbidden", "cannot patch")),
            PlatformError::Refused {
                message: format!("{what}: cannot patch (Forbidden)"),
                code: "403".into(),
            }
        );
        let long = "x".repeat(2000);
        let PlatformError::Refused { message, .. } =
            platform_error(what, status(422, "Invalid", &long))
        else {
            panic!("a refusal");
        };
        assert!(message.len() < 600, "{}", message.len());
    }
}
