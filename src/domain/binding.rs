//! Platform bindings: which workload on which platform an agent is, read
//! from its labels, and what the platform must do when the agent enters a
//! state. Pure: the drivers that talk to the platforms build on this.
//!
//! An agent is bound by one label, given at registration:
//!
//! | label | value | platform object |
//! |---|---|---|
//! | `docker.container` | `NAME` | a Docker container |
//! | `k8s.workload` | `NAMESPACE/KIND/NAME`, KIND `Deployment` or `StatefulSet` | a Kubernetes workload |
//! | `hf.space` | `OWNER/NAME` | a Hugging Face Space |
//!
//! An agent carries at most one of them. Values follow each platform's own
//! naming rules, so a binding that parses names an object the platform can
//! hold. A Kubernetes binding reads two more labels: `k8s.replicas` (the
//! replicas the workload is scaled to when the agent starts, 1 to
//! 2147483647, default 1) and `k8s.owned` (`true` when the server owns the
//! workload and deletes it when the agent is deleted; default `false`).

use std::fmt;

use super::{
    agent::Labels, external::ExternalSource, limits::FieldViolation, limits::quoted,
    state::AgentState,
};

/// The label that binds an agent to a Docker container.
pub const DOCKER_LABEL: &str = "docker.container";
/// The label that binds an agent to a Kubernetes Deployment or StatefulSet.
pub const KUBERNETES_LABEL: &str = "k8s.workload";
/// The label that binds an agent to a Hugging Face Space.
pub const HF_SPACE_LABEL: &str = "hf.space";
/// The replicas a bound Kubernetes workload runs with (default 1).
pub const KUBERNETES_REPLICAS_LABEL: &str = "k8s.replicas";
/// `true` when the server owns the bound Kubernetes workload (and deletes
/// it with the agent).
pub const KUBERNETES_OWNED_LABEL: &str = "k8s.owned";

/// Every binding label.
pub const BINDING_LABELS: [&str; 3] = [DOCKER_LABEL, KUBERNETES_LABEL, HF_SPACE_LABEL];

/// The platform object an agent is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Binding {
    /// A Docker container, by name.
    Docker {
        /// The container's name.
        container: String,
    },
    /// A Kubernetes workload.
    Kubernetes(Workload),
    /// A Hugging Face Space.
    HfSpace {
        /// The Space's owner (user or organisation).
        owner: String,
        /// The Space's name.
        name: String,
    },
}

/// A Kubernetes workload that a driver scales.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    /// Its namespace.
    pub namespace: String,
    /// Deployment or StatefulSet.
    pub kind: WorkloadKind,
    /// Its name.
    pub name: String,
    /// The replicas it is scaled to when the agent starts (`k8s.replicas`).
    pub replicas: u32,
    /// Whether the server owns it: deleting the agent deletes it
    /// (`k8s.owned=true`); otherwise it is only scaled to 0.
    pub owned: bool,
}

impl Workload {
    /// Whether `self` and `other` name the same object (whatever their
    /// replicas and ownership).
    pub fn same_object(&self, other: &Workload) -> bool {
        self.namespace == other.namespace && self.kind == other.kind && self.name == other.name
    }
}

/// The kinds of Kubernetes workload a binding may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// `apps/v1` Deployment.
    Deployment,
    /// `apps/v1` StatefulSet.
    StatefulSet,
}

impl WorkloadKind {
    /// The kind as the Kubernetes API names it.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
        }
    }

    /// The kind from its name, its plural or kubectl's short name, in any
    /// case (`Deployment`, `deployments`, `deploy`; `StatefulSet`, `sts`).
    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" => Some(WorkloadKind::Deployment),
            "statefulset" | "statefulsets" | "sts" => Some(WorkloadKind::StatefulSet),
            _ => None,
        }
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Binding::Docker { container } => write!(f, "{DOCKER_LABEL}={container}"),
            Binding::Kubernetes(w) => write!(
                f,
                "{KUBERNETES_LABEL}={}/{}/{}",
                w.namespace,
                w.kind.as_str(),
                w.name
            ),
            Binding::HfSpace { owner, name } => write!(f, "{HF_SPACE_LABEL}={owner}/{name}"),
        }
    }
}

impl Binding {
    /// The binding that `labels` carry, if any.
    ///
    /// # Errors
    /// A [`FieldViolation`] on `labels` when more than one binding label is
    /// set, or when a binding label's value is not a valid name for its
    /// platform.
    pub fn of(labels: &Labels) -> Result<Option<Binding>, FieldViolation> {
        let mut found = BINDING_LABELS
            .iter()
            .filter_map(|key| labels.get(*key).map(|value| (*key, value.as_str())));
        let Some((key, value)) = found.next() else {
            return Ok(None);
        };
        if let Some((other, _)) = found.next() {
            return Err(FieldViolation::new(
                "labels",
                format!("an agent is bound to one platform: {key} and {other} are both set"),
            ));
        }
        let invalid =
            |why: &str| FieldViolation::new("labels", format!("{key}={}: {why}", quoted(value)));
        let binding = match key {
            DOCKER_LABEL => {
                if !docker_name(value) {
                    return Err(invalid(
                        "a Docker container name is [a-zA-Z0-9][a-zA-Z0-9_.-]+, at most 128 characters",
                    ));
                }
                Binding::Docker {
                    container: value.to_string(),
                }
            }
            KUBERNETES_LABEL => {
                let mut parts = value.split('/');
                let (Some(namespace), Some(kind), Some(name), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(invalid("expected NAMESPACE/KIND/NAME"));
                };
                let kind = WorkloadKind::parse(kind)
                    .ok_or_else(|| invalid("KIND is Deployment or StatefulSet"))?;
                if !dns_label(namespace) {
                    return Err(invalid(
                        "the namespace is a DNS label: lowercase letters, digits and '-', at most 63",
                    ));
                }
                if !dns_subdomain(name) {
                    return Err(invalid(
                        "the name is a DNS subdomain: lowercase letters, digits, '-' and '.', at most 253",
                    ));
                }
                let (replicas, owned) = workload_options(labels)?;
                Binding::Kubernetes(Workload {
                    namespace: namespace.to_string(),
                    kind,
                    name: name.to_string(),
                    replicas,
                    owned,
                })
            }
            _ => {
                let Some((owner, name)) = value.split_once('/') else {
                    return Err(invalid("expected OWNER/NAME"));
                };
                if !hub_name(owner) || !hub_name(name) {
                    return Err(invalid(
                        "OWNER and NAME are letters, digits, '-', '_' and '.', at most 96 each",
                    ));
                }
                Binding::HfSpace {
                    owner: owner.to_string(),
                    name: name.to_string(),
                }
            }
        };
        Ok(Some(binding))
    }

    /// The source whose statuses this binding's platform reports.
    pub fn source(&self) -> ExternalSource {
        match self {
            Binding::Docker { .. } => ExternalSource::Docker,
            Binding::Kubernetes(_) => ExternalSource::Kubernetes,
            Binding::HfSpace { .. } => ExternalSource::HfSpace,
        }
    }
}

/// The replicas (`k8s.replicas`, default 1) and ownership (`k8s.owned`,
/// default false) of a Kubernetes binding.
fn workload_options(labels: &Labels) -> Result<(u32, bool), FieldViolation> {
    let replicas = match labels.get(KUBERNETES_REPLICAS_LABEL) {
        None => 1,
        Some(value) => value
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=i32::MAX as u32).contains(n))
            .ok_or_else(|| {
                FieldViolation::new(
                    "labels",
                    format!(
                        "{KUBERNETES_REPLICAS_LABEL}={}: a whole number from 1 to 2147483647",
                        quoted(value)
                    ),
                )
            })?,
    };
    let owned = match labels.get(KUBERNETES_OWNED_LABEL).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(FieldViolation::new(
                "labels",
                format!("{KUBERNETES_OWNED_LABEL}={}: true or false", quoted(other)),
            ));
        }
    };
    Ok((replicas, owned))
}

/// What the platform must do when a bound agent enters a state, so that the
/// platform follows the lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlatformAction {
    /// Make the object exist (create a container; a workload or a Space is
    /// made outside the server and only checked).
    Create,
    /// Run it (start a container; scale a workload to its replicas;
    /// restart a Space).
    Start,
    /// Run it anew after a failure (restart a container; restart a
    /// workload's pods at its replicas, as `kubectl rollout restart` does;
    /// restart a Space): STARTING entered by a restart of the health
    /// monitor, see [`PlatformAction::for_move`].
    Restart,
    /// Stop it, keeping it (stop a container; scale a workload to 0; pause
    /// a Space).
    Stop,
    /// Remove it (remove a container; delete a workload the server owns).
    Remove,
}

impl PlatformAction {
    /// The action for an agent that has just entered `state`; `None` for
    /// the states the platform has nothing to do on (the platform's own
    /// status moves the agent on from STARTING to ONLINE).
    pub fn on_entering(state: AgentState) -> Option<PlatformAction> {
        use AgentState as S;
        match state {
            S::Deploying => Some(PlatformAction::Create),
            S::Starting => Some(PlatformAction::Start),
            S::Stopping | S::Terminated => Some(PlatformAction::Stop),
            S::Deleted => Some(PlatformAction::Remove),
            S::Registered
            | S::Deployed
            | S::Online
            | S::Busy
            | S::Idle
            | S::Updating
            | S::Scaling
            | S::Error
            | S::Failed
            | S::Timeout
            | S::Maintenance
            | S::Suspended
            | S::Offline => None,
        }
    }

    /// The action for a move into `state`: the same as
    /// [`PlatformAction::on_entering`], except that STARTING entered by a
    /// restart asks for [`PlatformAction::Restart`] (a container that hangs
    /// while running must be restarted, not only started).
    pub fn for_move(state: AgentState, restart: bool) -> Option<PlatformAction> {
        match PlatformAction::on_entering(state)? {
            PlatformAction::Start if restart => Some(PlatformAction::Restart),
            action => Some(action),
        }
    }

    /// The action's name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformAction::Create => "create",
            PlatformAction::Start => "start",
            PlatformAction::Restart => "restart",
            PlatformAction::Stop => "stop",
            PlatformAction::Remove => "remove",
        }
    }
}

/// Docker's container name rule: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
fn docker_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() >= 2
        && name.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// RFC 1123 label, as Kubernetes namespaces are: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// RFC 1123 subdomain, as most Kubernetes object names are: labels joined
/// by dots, at most 253 characters.
fn dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(dns_label)
}

/// A Hub owner or repository name.
fn hub_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 96
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bindings_are_read_from_their_labels() {
        assert_eq!(Binding::of(&labels(&[("team", "ml")])), Ok(None));
        assert_eq!(
            Binding::of(&labels(&[("docker.container", "agent-7"), ("team", "ml")])),
            Ok(Some(Binding::Docker {
                container: "agent-7".into()
            }))
        );
        for (value, kind) in [
            ("prod/Deployment/summarizer", WorkloadKind::Deployment),
            ("prod/deploy/summarizer", WorkloadKind::Deployment),
            ("prod/statefulsets/summarizer", WorkloadKind::StatefulSet),
            ("prod/sts/summarizer", WorkloadKind::StatefulSet),
        ] {
            assert_eq!(
                Binding::of(&labels(&[("k8s.workload", value)])),
                Ok(Some(Binding::Kubernetes(Workload {
                    namespace: "prod".into(),
                    kind,
                    name: "summarizer".into(),
                    replicas: 1,
                    owned: false,
                }))),
                "{value}"
            );
        }
        let owned = Binding::of(&labels(&[
            ("k8s.workload", "prod/sts/db"),
            ("k8s.replicas", "3"),
            ("k8s.owned", "true"),
        ]))
        .expect("valid")
        .expect("bound");
        let Binding::Kubernetes(workload) = &owned else {
            panic!("{owned:?}");
        };
        assert_eq!((workload.replicas, workload.owned), (3, true));
        assert_eq!(owned.to_string(), "k8s.workload=prod/StatefulSet/db");
        let space = Binding::of(&labels(&[("hf.space", "acme/chat-bot")]))
            .expect("valid")
            .expect("bound");
        assert_eq!(space.source(), ExternalSource::HfSpace);
        assert_eq!(space.to_string(), "hf.space=acme/chat-bot");
    }

    #[test]
    fn malformed_or_several_bindings_are_refused_naming_the_label() {
        for (pairs, expected) in [
            (vec![("docker.container", "a")], "docker.container=\"a\""),
            (
                vec![("docker.container", "-agent")],
                "Docker container name",
            ),
            (
                vec![("docker.container", "has space")],
                "Docker container name",
            ),
            (
                vec![("k8s.workload", "prod/summarizer")],
                "NAMESPACE/KIND/NAME",
            ),
            (vec![("k8s.workload", "prod/Job/x")], "KIND is Deployment"),
            (vec![("k8s.workload", "Prod/Deployment/x")], "namespace"),
            (
                vec![("k8s.workload", "prod/Deployment/X_1")],
                "DNS subdomain",
            ),
            (
                vec![("k8s.workload", "a/Deployment/b/c")],
                "NAMESPACE/KIND/NAME",
            ),
            (
                vec![("k8s.workload", "a/deploy/b"), ("k8s.replicas", "0")],
                "k8s.replicas=\"0\": a whole number",
            ),
            (
                vec![
                    ("k8s.workload", "a/deploy/b"),
                    ("k8s.replicas", "3000000000"),
                ],
                "k8s.replicas",
            ),
            (
                vec![("k8s.workload", "a/deploy/b"), ("k8s.owned", "yes")],
                "k8s.owned=\"yes\": true or false",
            ),
            (vec![("hf.space", "acme")], "OWNER/NAME"),
            (vec![("hf.space", "acme/chat bot")], "OWNER and NAME"),
            (
                vec![("docker.container", "a1"), ("hf.space", "acme/bot")],
                "both set",
            ),
        ] {
            let err = Binding::of(&labels(&pairs)).expect_err(expected);
            assert_eq!(err.field, "labels");
            assert!(err.to_string().contains(expected), "{pairs:?}: {err}");
        }
    }

    /// Every state has its action decided: the lifecycle's moves that the
    /// platform must follow, and nothing else.
    #[test]
    fn the_platform_acts_on_deploying_starting_stopping_terminated_and_deleted() {
        for state in AgentState::ALL {
            let expected = match state {
                AgentState::Deploying => Some(PlatformAction::Create),
                AgentState::Starting => Some(PlatformAction::Start),
                AgentState::Stopping | AgentState::Terminated => Some(PlatformAction::Stop),
                AgentState::Deleted => Some(PlatformAction::Remove),
                _ => None,
            };
            assert_eq!(PlatformAction::on_entering(state), expected, "{state}");
        }
    }
}
