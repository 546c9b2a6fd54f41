//! The sections of the `--config` file that have no flags: `[limits]`,
//! `[auth]`, `[policy]`, `[hf]`, `[docker]`, `[kubernetes]` and `[health]`, each
//! turned into the settings of the part it configures.

use std::time::Duration;

use serde::Deserialize;

use super::values::{de, parse_duration};

/// One `[health.max_dwell]` value: the longest stay in a state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DwellLimit(pub Duration);

impl<'de> Deserialize<'de> for DwellLimit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(DwellLimit)
            .map_err(serde::de::Error::custom)
    }
}

/// The `[limits]` section (defaults shown; a rate of 0 turns its limit off).
///
/// ```toml
/// [limits]
/// agent_transitions_per_second = 1000   # per agent, sustained
/// agent_transition_burst = 1000
/// principal_requests_per_second = 10000 # per authenticated principal
/// principal_request_burst = 20000
/// max_watches_per_principal = 1000      # open WatchEvents streams
/// max_watches = 10000
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// See [`crate::api::grpc::rate_limit::LimitSettings`].
    pub agent_transitions_per_second: Option<f64>,
    /// See [`crate::api::grpc::rate_limit::LimitSettings`].
    pub agent_transition_burst: Option<f64>,
    /// See [`crate::api::grpc::rate_limit::LimitSettings`].
    pub principal_requests_per_second: Option<f64>,
    /// See [`crate::api::grpc::rate_limit::LimitSettings`].
    pub principal_request_burst: Option<f64>,
    /// See [`crate::api::grpc::rate_limit::LimitSettings`].
    pub max_watches_per_principal: Option<usize>,
    /// See [`crate::api::grpc::rate_limit::LimitSettings`].
    pub max_watches: Option<usize>,
}

impl LimitsSection {
    /// The defaults with this section's values.
    ///
    /// # Errors
    /// A negative or non-finite rate or burst.
    pub fn settings(&self) -> Result<crate::api::grpc::rate_limit::LimitSettings, String> {
        let d = crate::api::grpc::rate_limit::LimitSettings::default();
        for (key, value) in [
            (
                "agent_transitions_per_second",
                self.agent_transitions_per_second,
            ),
            ("agent_transition_burst", self.agent_transition_burst),
            (
                "principal_requests_per_second",
                self.principal_requests_per_second,
            ),
            ("principal_request_burst", self.principal_request_burst),
        ] {
            if let Some(v) = value
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!("limits.{key}: {v} must be a number >= 0"));
            }
        }
        Ok(crate::api::grpc::rate_limit::LimitSettings {
            agent_transitions_per_second: self
                .agent_transitions_per_second
                .unwrap_or(d.agent_transitions_per_second),
            agent_transition_burst: self
                .agent_transition_burst
                .unwrap_or(d.agent_transition_burst),
            principal_requests_per_second: self
                .principal_requests_per_second
                .unwrap_or(d.principal_requests_per_second),
            principal_request_burst: self
                .principal_request_burst
                .unwrap_or(d.principal_request_burst),
            max_watches_per_principal: self
                .max_watches_per_principal
                .unwrap_or(d.max_watches_per_principal),
            max_watches: self.max_watches.unwrap_or(d.max_watches),
        })
    }
}

/// The `[auth]` section: who may call the server, and as what.
///
/// ```toml
/// [[auth.principal]]
/// name = "ops"
/// role = "operator"            # admin, operator, agent or viewer
/// token_sha256 = "9f86d0..."   # from `agent-lifecycle token create`
///
/// [[auth.principal]]
/// name = "agent-7"
/// role = "agent"
/// agents = ["0190c1f2-..."]    # the agents it reports for
/// token_sha256 = "..."
///
/// [[auth.principal]]
/// name = "dashboard"
/// role = "viewer"
/// cert_subject = "dashboard"   # a client certificate's common name (mutual TLS)
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// The principals.
    #[serde(default)]
    pub principal: Vec<PrincipalSection>,
}

/// One `[[auth.principal]]`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSection {
    /// Its name, recorded with its transitions.
    pub name: String,
    /// `admin`, `operator`, `agent` or `viewer`.
    pub role: String,
    /// SHA-256 (hex) of its bearer token.
    pub token_sha256: Option<String>,
    /// The common name of its client certificate.
    pub cert_subject: Option<String>,
    /// For the `agent` role: the agent ids it acts for.
    #[serde(default)]
    pub agents: Vec<String>,
}

impl AuthSection {
    /// The principals, checked.
    ///
    /// # Errors
    /// A bad role, hash or agent id, a principal with no way to
    /// authenticate, agents on a role other than `agent`, or duplicates.
    pub fn principals(&self) -> Result<Vec<crate::api::auth::Principal>, String> {
        let principals = self
            .principal
            .iter()
            .map(|p| {
                let at = |e: String| format!("auth.principal {:?}: {e}", p.name);
                if p.name.trim().is_empty() {
                    return Err("auth.principal: every principal needs a name".to_string());
                }
                let role: crate::domain::Role = p.role.parse().map_err(at)?;
                let token_sha256 = p
                    .token_sha256
                    .as_deref()
                    .map(crate::api::auth::parse_sha256)
                    .transpose()
                    .map_err(|e| at(format!("token_sha256: {e}")))?;
                if token_sha256.is_none() && p.cert_subject.is_none() {
                    return Err(at("needs token_sha256 or cert_subject".into()));
                }
                let agents = p
                    .agents
                    .iter()
                    .map(|id| {
                        crate::domain::AgentId::parse("agents", id).map_err(|e| at(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if role == crate::domain::Role::Agent && agents.is_empty() {
                    return Err(at("the agent role needs the agents it acts for".into()));
                }
                if role != crate::domain::Role::Agent && !agents.is_empty() {
                    return Err(at("only the agent role has agents".into()));
                }
                Ok(crate::api::auth::Principal {
                    name: p.name.clone(),
                    role,
                    agents,
                    token_sha256,
                    cert_subject: p.cert_subject.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        crate::api::auth::Authenticator::new(&principals)?;
        Ok(principals)
    }
}

/// The `[policy]` section: edges as `"from -> to"` with the states'
/// lowercase names.
///
/// ```toml
/// [policy]
/// add = ["online -> scaling", "idle -> scaling", "busy -> scaling"]
/// remove = ["busy -> offline"]
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Edges to allow.
    #[serde(default)]
    pub add: Vec<toml::Spanned<String>>,
    /// Edges to refuse.
    #[serde(default)]
    pub remove: Vec<toml::Spanned<String>>,
}

/// The `[hf]` section: poll the runtime stage of every agent labelled
/// `hf.space=owner/name`.
///
/// ```toml
/// [hf]
/// base_url = "https://huggingface.co"
/// token_env = "HF_TOKEN"      # read the bearer token from this variable
/// ca_file = "/etc/ssl/internal-ca.pem"  # trusted besides the public roots (a mirror's CA)
/// interval = "30s"            # settled stages
/// fast_interval = "5s"        # BUILDING, APP_STARTING, RUNNING_BUILDING, RUNNING_APP_STARTING
/// max_backoff = "5m"          # after 429, 5xx or a failed request
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfSection {
    /// `https://HOST[:PORT]` (or `http://`) of the Hub API or a mirror.
    pub base_url: String,
    /// A PEM file of CA certificates trusted for HTTPS besides the
    /// compiled-in public roots.
    pub ca_file: Option<String>,
    /// The environment variable holding the bearer token (never the token
    /// itself in the file).
    pub token_env: Option<String>,
    /// Time between polls of a settled Space.
    #[serde(default, deserialize_with = "de::duration")]
    pub interval: Option<Duration>,
    /// Time between polls of a Space in an intermediate stage.
    #[serde(default, deserialize_with = "de::duration")]
    pub fast_interval: Option<Duration>,
    /// Longest back-off.
    #[serde(default, deserialize_with = "de::duration")]
    pub max_backoff: Option<Duration>,
    /// Whether the server also acts on the Spaces: restarts a Space when
    /// its agent enters STARTING and pauses it on STOPPING or TERMINATED
    /// (default: off, the poller only follows them).
    #[serde(default)]
    pub act: bool,
}

impl HfSection {
    /// The poller's settings; the token is read from `token_env` now.
    ///
    /// # Errors
    /// `token_env` names a variable that is not set, or `ca_file` cannot be
    /// read.
    pub fn settings(&self) -> Result<crate::automation::hf::HfSettings, String> {
        let defaults = crate::automation::hf::HfSettings::default();
        let token = match &self.token_env {
            Some(name) => Some(
                std::env::var(name)
                    .map_err(|_| format!("hf.token_env: the variable {name} is not set"))?,
            ),
            None => None,
        };
        let extra_roots = match &self.ca_file {
            Some(path) => crate::api::tls::certificates(std::path::Path::new(path))
                .map_err(|e| format!("hf.ca_file: {e}"))?,
            None => Vec::new(),
        };
        crate::automation::hf::client_config(&extra_roots)
            .map_err(|e| format!("hf.ca_file: {e}"))?;
        Ok(crate::automation::hf::HfSettings {
            base_url: self.base_url.clone(),
            token,
            extra_roots,
            interval: self.interval.unwrap_or(defaults.interval),
            fast_interval: self.fast_interval.unwrap_or(defaults.fast_interval),
            max_backoff: self.max_backoff.unwrap_or(defaults.max_backoff),
            tick: defaults.tick,
        })
    }
}

/// The `[docker]` section: the Docker driver creates, starts, stops and
/// removes the containers of agents labelled `docker.container=NAME`, and
/// moves them as their containers run, die or are killed for memory.
///
/// ```toml
/// [docker]
/// host = "unix:///var/run/docker.sock"  # default: DOCKER_HOST, then the local socket
/// image = "registry.example.com/agent:1.4"  # for agents without a docker.image label
/// stop_timeout = "10s"        # a stop waits this long before SIGKILL
/// act = true                  # false: follow the containers, never touch them
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerSection {
    /// `unix:///PATH` or `tcp://HOST:PORT` of the daemon.
    pub host: Option<String>,
    /// The image of agents without a `docker.image` label.
    pub image: Option<String>,
    /// How long a stop waits before SIGKILL.
    #[serde(default, deserialize_with = "de::duration")]
    pub stop_timeout: Option<Duration>,
    /// Whether the driver acts on containers (default: true).
    pub act: Option<bool>,
}

impl DockerSection {
    /// The driver's settings.
    ///
    /// # Errors
    /// `host` is neither `unix://` nor `tcp://` nor `http://`.
    pub fn settings(&self) -> Result<crate::automation::drivers::docker::DockerSettings, String> {
        let defaults = crate::automation::drivers::docker::DockerSettings::default();
        if let Some(host) = &self.host
            && !["unix://", "tcp://", "http://"]
                .iter()
                .any(|scheme| host.starts_with(scheme))
        {
            return Err(format!(
                "docker.host: {host:?} must be a unix:// socket or a tcp:// address"
            ));
        }
        Ok(crate::automation::drivers::docker::DockerSettings {
            host: self.host.clone(),
            image: self.image.clone(),
            stop_timeout: self.stop_timeout.unwrap_or(defaults.stop_timeout),
            act: self.act.unwrap_or(defaults.act),
            reconnect: defaults.reconnect,
        })
    }
}

/// The `[kubernetes]` section: follow the pods of the Deployments and
/// StatefulSets bound to agents (`k8s.workload=NAMESPACE/KIND/NAME`), and
/// with `act`, scale and delete them as the agents start, stop and go.
///
/// ```toml
/// [kubernetes]
/// kubeconfig = "/etc/agent-lifecycle/kubeconfig"  # or: in_cluster = true
/// context = "prod"        # a context of the kubeconfig (default: its current-context)
/// namespace = "agents"    # watch this namespace's pods (default: every namespace)
/// act = true              # scale and delete the bound workloads (default: false)
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    /// Use the pod's service account (the server runs in the cluster).
    #[serde(default)]
    pub in_cluster: bool,
    /// A kubeconfig file (instead of `in_cluster`).
    pub kubeconfig: Option<String>,
    /// A context of the kubeconfig; its `current-context` when unset.
    pub context: Option<String>,
    /// The namespace whose pods are watched; every namespace when unset.
    pub namespace: Option<String>,
    /// Whether the server also acts on the workloads: scales a workload to
    /// its agent's replicas on STARTING and to 0 on STOPPING or TERMINATED,
    /// deletes it on DELETED when the agent says the server owns it
    /// (default: off, the server only follows the pods).
    #[serde(default)]
    pub act: bool,
}

impl KubernetesSection {
    /// The driver's settings; the kubeconfig is read now, so that a missing
    /// file or context stops the start with its name.
    ///
    /// # Errors
    /// Both or neither of `in_cluster` and `kubeconfig`, `context` without
    /// `kubeconfig`, an unreadable kubeconfig, or no such context in it.
    pub fn settings(&self) -> Result<crate::automation::drivers::k8s::KubernetesSettings, String> {
        use crate::automation::drivers::k8s::{Credentials, KubernetesSettings};
        let credentials = match (self.in_cluster, &self.kubeconfig) {
            (true, Some(_)) => {
                return Err("kubernetes: in_cluster and kubeconfig exclude each other".into());
            }
            (false, None) => {
                return Err("kubernetes: set in_cluster = true or kubeconfig = \"PATH\"".into());
            }
            (true, None) => {
                if self.context.is_some() {
                    return Err("kubernetes.context: a context needs a kubeconfig".into());
                }
                Credentials::InCluster
            }
            (false, Some(path)) => {
                let path = std::path::PathBuf::from(path);
                let file = kube::config::Kubeconfig::read_from(&path)
                    .map_err(|e| format!("kubernetes.kubeconfig: {}: {e}", path.display()))?;
                if let Some(context) = &self.context
                    && !file.contexts.iter().any(|c| &c.name == context)
                {
                    return Err(format!(
                        "kubernetes.context: {context:?} is not a context of {}",
                        path.display()
                    ));
                }
                Credentials::Kubeconfig {
                    path,
                    context: self.context.clone(),
                }
            }
        };
        Ok(KubernetesSettings {
            namespace: self.namespace.clone(),
            act: self.act,
            ..KubernetesSettings::new(credentials)
        })
    }
}

/// The `[health]` section: the health monitor's timeouts and restart
/// policy (defaults in parentheses).
///
/// ```toml
/// [health]
/// start_waits_for_heartbeat = false  # StartAgent stays in STARTING until the first heartbeat
/// startup_timeout = "60s"      # STARTING waiting for a heartbeat -> TIMEOUT
/// heartbeat_interval = "10s"   # expected period, for counting misses
/// heartbeat_timeout = "30s"    # silence -> ERROR
/// grace = "30s"                # after start, before any timeout fires
/// max_restarts = 5             # then FAILED
/// restart_delay = "10s"        # first back-off
/// restart_multiplier = 2.0
/// restart_max_delay = "5m"
/// restart_jitter = 0.1         # +-10 %
/// restart_reset_after = "10m"  # healthy this long: the count starts over
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// See [`crate::automation::health::HealthSettings::start_waits_for_heartbeat`].
    pub start_waits_for_heartbeat: Option<bool>,
    /// See [`crate::automation::health::HealthSettings::startup_timeout`].
    #[serde(default, deserialize_with = "de::duration")]
    pub startup_timeout: Option<Duration>,
    /// See [`crate::automation::health::HealthSettings::heartbeat_interval`].
    #[serde(default, deserialize_with = "de::duration")]
    pub heartbeat_interval: Option<Duration>,
    /// See [`crate::automation::health::HealthSettings::heartbeat_timeout`].
    #[serde(default, deserialize_with = "de::duration")]
    pub heartbeat_timeout: Option<Duration>,
    /// See [`crate::automation::health::HealthSettings::grace`].
    #[serde(default, deserialize_with = "de::duration")]
    pub grace: Option<Duration>,
    /// See [`crate::automation::health::HealthSettings::max_restarts`].
    pub max_restarts: Option<u32>,
    /// See [`crate::automation::health::HealthSettings::initial_delay`].
    #[serde(default, deserialize_with = "de::duration")]
    pub restart_delay: Option<Duration>,
    /// See [`crate::automation::health::HealthSettings::multiplier`].
    pub restart_multiplier: Option<f64>,
    /// See [`crate::automation::health::HealthSettings::max_delay`].
    #[serde(default, deserialize_with = "de::duration")]
    pub restart_max_delay: Option<Duration>,
    /// See [`crate::automation::health::HealthSettings::jitter`].
    pub restart_jitter: Option<f64>,
    /// See [`crate::automation::health::HealthSettings::reset_after`].
    #[serde(default, deserialize_with = "de::duration")]
    pub restart_reset_after: Option<Duration>,
    /// `[health.max_dwell]`: state name -> longest stay (see
    /// [`crate::automation::health::HealthSettings::max_dwell`]).
    #[serde(default)]
    pub max_dwell: std::collections::BTreeMap<String, DwellLimit>,
    /// In a `[[health.rule]]`: the labels an agent must carry for the
    /// rule's values to apply to it.
    pub selector: Option<crate::domain::Labels>,
    /// `[[health.rule]]`: settings for the agents a selector matches, on
    /// top of this section's (the first matching rule applies).
    #[serde(default)]
    pub rule: Vec<HealthSection>,
}

impl HealthSection {
    /// The monitor's settings: the defaults with this section's values,
    /// and one rule per `[[health.rule]]`.
    pub fn settings(&self) -> crate::automation::health::HealthSettings {
        let mut base = self.overlay(&crate::automation::health::HealthSettings::default());
        base.rules = self
            .rule
            .iter()
            .map(|rule| crate::automation::health::HealthRule {
                selector: rule.selector.clone().unwrap_or_default(),
                settings: rule.overlay(&base),
            })
            .collect();
        base
    }

    /// `base` with the values this section sets.
    fn overlay(
        &self,
        base: &crate::automation::health::HealthSettings,
    ) -> crate::automation::health::HealthSettings {
        let d = base.clone();
        let or = |value: &Option<Duration>, default| value.unwrap_or(default);
        crate::automation::health::HealthSettings {
            start_waits_for_heartbeat: self
                .start_waits_for_heartbeat
                .unwrap_or(d.start_waits_for_heartbeat),
            startup_timeout: or(&self.startup_timeout, d.startup_timeout),
            heartbeat_interval: or(&self.heartbeat_interval, d.heartbeat_interval),
            heartbeat_timeout: or(&self.heartbeat_timeout, d.heartbeat_timeout),
            grace: or(&self.grace, d.grace),
            max_restarts: self.max_restarts.unwrap_or(d.max_restarts),
            initial_delay: or(&self.restart_delay, d.initial_delay),
            multiplier: self.restart_multiplier.unwrap_or(d.multiplier),
            max_delay: or(&self.restart_max_delay, d.max_delay),
            jitter: self.restart_jitter.unwrap_or(d.jitter),
            reset_after: or(&self.restart_reset_after, d.reset_after),
            check_interval: d.check_interval,
            max_dwell: if self.max_dwell.is_empty() {
                d.max_dwell
            } else {
                self.max_dwell
                    .iter()
                    .filter_map(|(state, limit)| Some((state.parse().ok()?, limit.0)))
                    .collect()
            },
            rules: Vec::new(),
        }
    }
}
