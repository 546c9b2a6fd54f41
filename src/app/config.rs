//! Settings of `agent-lifecycle serve` that the library defines: the store
//! URL and its default, the request size limit, durations as flags spell
//! them, and the TOML configuration file (`--config FILE`). The binary reads
//! flags and `AGENT_LIFECYCLE_*` environment variables with these parsers; a
//! flag or variable wins over the file, the file over the default.

use std::{fmt, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use crate::{
    domain::{AgentState, TransitionPolicy},
    store::{MemoryStore, PostgresStore, Retention, SqliteStore, Store, StoreError},
};

/// The default store: a SQLite file under `./data`.
pub const DEFAULT_STORE: &str = "sqlite://./data/agent-lifecycle.db";

/// Which back end holds the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory`: nothing survives a restart.
    Memory,
    /// `sqlite://PATH` (`sqlite:PATH` too).
    Sqlite(PathBuf),
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (`postgresql://` too):
    /// shared by several server processes.
    Postgres(String),
}

impl FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "memory" || s == "memory://" {
            return Ok(StoreUrl::Memory);
        }
        if let Some(path) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(
                    "sqlite:// needs a file path, e.g. sqlite://./data/agent-lifecycle.db".into(),
                );
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(s.to_string()));
        }
        Err(format!(
            "unknown store {:?}: expected memory, sqlite://PATH or postgres://USER@HOST/DB",
            redact(s)
        ))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreUrl::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl StoreUrl {
    /// Opens the store.
    ///
    /// # Errors
    /// The SQLite file cannot be created, opened or written; the PostgreSQL
    /// server cannot be reached or refuses the login.
    pub fn open(&self, retention: &Retention) -> Result<Arc<dyn Store>, StoreError> {
        Ok(match self {
            StoreUrl::Memory => Arc::new(MemoryStore::new(retention)),
            StoreUrl::Sqlite(path) => Arc::new(SqliteStore::open(path)?),
            StoreUrl::Postgres(url) => Arc::new(PostgresStore::open(url)?),
        })
    }
}

/// `url` with any password replaced by `***`, for logs and messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// The `--config` file: the same settings as the flags, by the same names
/// (with `_` for `-`). Every key is optional; an unknown key is an error.
///
/// ```toml
/// listen = "0.0.0.0:50051"
/// store = "postgres://lifecycle@db.internal/lifecycle"
/// log = "info"
/// log_format = "json"
/// event_buffer = 4096
/// progress_interval = "10s"
/// retain_events = 1000000
/// retain_for = "30d"
/// compaction_interval = "1s"
/// max_batch = 1024
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `--listen`.
    pub listen: Option<std::net::SocketAddr>,
    /// `--http-listen`.
    pub http_listen: Option<std::net::SocketAddr>,
    /// `--otlp-endpoint`.
    pub otlp_endpoint: Option<String>,
    /// `--store`.
    pub store: Option<String>,
    /// `--log`.
    pub log: Option<String>,
    /// `--log-format` (`human` or `json`).
    pub log_format: Option<String>,
    /// `--event-buffer`.
    pub event_buffer: Option<usize>,
    /// `--progress-interval`.
    pub progress_interval: Option<String>,
    /// `--retain-events`.
    pub retain_events: Option<u64>,
    /// `--retain-for`.
    pub retain_for: Option<String>,
    /// `--compaction-interval`.
    pub compaction_interval: Option<String>,
    /// `--max-batch`.
    pub max_batch: Option<usize>,
    /// `--request-id-window`.
    pub request_id_window: Option<String>,
    /// `--tls-cert`.
    pub tls_cert: Option<String>,
    /// `--tls-key`.
    pub tls_key: Option<String>,
    /// `--tls-client-ca`.
    pub tls_client_ca: Option<String>,
    /// `--insecure`.
    pub insecure: Option<bool>,
    /// `[auth]`: the principals allowed in (no authentication without it).
    pub auth: Option<AuthSection>,
    /// `[limits]`: rate limits and stream caps (generous defaults).
    pub limits: Option<LimitsSection>,
    /// `[policy]`: edges added to or removed from the default transition
    /// table.
    pub policy: Option<PolicySection>,
    /// `[hf]`: the Hugging Face Spaces poller (off without it).
    pub hf: Option<HfSection>,
    /// `[health]`: heartbeat and restart settings of the health monitor.
    pub health: Option<HealthSection>,
    /// The transition policy the file describes (the default when it has no
    /// `[policy]`), built and checked by [`ConfigFile::parse`].
    #[serde(skip)]
    pub transition_policy: TransitionPolicy,
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
    pub interval: Option<String>,
    /// Time between polls of a Space in an intermediate stage.
    pub fast_interval: Option<String>,
    /// Longest back-off.
    pub max_backoff: Option<String>,
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
        crate::automation::hf::client_config(&extra_roots).map_err(|e| format!("hf.ca_file: {e}"))?;
        Ok(crate::automation::hf::HfSettings {
            base_url: self.base_url.clone(),
            token,
            extra_roots,
            interval: ConfigFile::duration(&self.interval).unwrap_or(defaults.interval),
            fast_interval: ConfigFile::duration(&self.fast_interval)
                .unwrap_or(defaults.fast_interval),
            max_backoff: ConfigFile::duration(&self.max_backoff).unwrap_or(defaults.max_backoff),
            tick: defaults.tick,
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
    pub startup_timeout: Option<String>,
    /// See [`crate::automation::health::HealthSettings::heartbeat_interval`].
    pub heartbeat_interval: Option<String>,
    /// See [`crate::automation::health::HealthSettings::heartbeat_timeout`].
    pub heartbeat_timeout: Option<String>,
    /// See [`crate::automation::health::HealthSettings::grace`].
    pub grace: Option<String>,
    /// See [`crate::automation::health::HealthSettings::max_restarts`].
    pub max_restarts: Option<u32>,
    /// See [`crate::automation::health::HealthSettings::initial_delay`].
    pub restart_delay: Option<String>,
    /// See [`crate::automation::health::HealthSettings::multiplier`].
    pub restart_multiplier: Option<f64>,
    /// See [`crate::automation::health::HealthSettings::max_delay`].
    pub restart_max_delay: Option<String>,
    /// See [`crate::automation::health::HealthSettings::jitter`].
    pub restart_jitter: Option<f64>,
    /// See [`crate::automation::health::HealthSettings::reset_after`].
    pub restart_reset_after: Option<String>,
    /// `[health.max_dwell]`: state name -> longest stay (see
    /// [`crate::automation::health::HealthSettings::max_dwell`]).
    #[serde(default)]
    pub max_dwell: std::collections::BTreeMap<String, String>,
    /// In a `[[health.rule]]`: the labels an agent must carry for the
    /// rule's values to apply to it.
    pub selector: Option<crate::domain::Labels>,
    /// `[[health.rule]]`: settings for the agents a selector matches, on
    /// top of this section's (the first matching rule applies).
    #[serde(default)]
    pub rule: Vec<HealthSection>,
}

impl HealthSection {
    fn durations(&self) -> [(&'static str, &Option<String>); 6] {
        [
            ("health.startup_timeout", &self.startup_timeout),
            ("health.heartbeat_interval", &self.heartbeat_interval),
            ("health.heartbeat_timeout", &self.heartbeat_timeout),
            ("health.grace", &self.grace),
            ("health.restart_delay", &self.restart_delay),
            ("health.restart_max_delay", &self.restart_max_delay),
        ]
    }

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
    fn overlay(&self, base: &crate::automation::health::HealthSettings) -> crate::automation::health::HealthSettings {
        let d = base.clone();
        let or = |value: &Option<String>, default| ConfigFile::duration(value).unwrap_or(default);
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
                    .filter_map(|(state, limit)| {
                        Some((state.parse().ok()?, parse_duration(limit).ok()?))
                    })
                    .collect()
            },
            rules: Vec::new(),
        }
    }
}

/// The policy a file's `[policy]` describes, before it is checked (the
/// default when it has none or when it does not build).
fn file_policy(file: &ConfigFile) -> TransitionPolicy {
    let Some(policy) = &file.policy else {
        return TransitionPolicy::default();
    };
    let edges = |list: &[toml::Spanned<String>]| -> Vec<(AgentState, AgentState)> {
        list.iter()
            .filter_map(|edge| {
                let (from, to) = edge.get_ref().split_once("->")?;
                Some((from.trim().parse().ok()?, to.trim().parse().ok()?))
            })
            .collect()
    };
    TransitionPolicy::default()
        .with_changes(&edges(&policy.add), &edges(&policy.remove))
        .unwrap_or_default()
}

/// The line of byte `offset` in `text` (1-based).
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

/// Parses the edges of one `[policy]` list, naming the line of a bad one.
fn parse_edges(
    text: &str,
    key: &str,
    edges: &[toml::Spanned<String>],
) -> Result<Vec<(AgentState, AgentState)>, String> {
    edges
        .iter()
        .map(|edge| {
            let line = line_of(text, edge.span().start);
            let value = edge.get_ref();
            let (from, to) = value.split_once("->").ok_or_else(|| {
                format!("line {line}: policy.{key}: {value:?} is not \"from -> to\"")
            })?;
            let state = |name: &str| {
                name.trim().parse::<AgentState>().map_err(|_| {
                    format!(
                        "line {line}: policy.{key}: unknown state {:?} in {value:?}",
                        name.trim()
                    )
                })
            };
            Ok((state(from)?, state(to)?))
        })
        .collect()
}

impl ConfigFile {
    /// Reads and checks `path`.
    ///
    /// # Errors
    /// The file cannot be read, is not TOML, has an unknown key or a value
    /// of the wrong kind (the message names the line), or a duration or
    /// store URL that does not parse (the message names the key).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks the text of a configuration file.
    ///
    /// # Errors
    /// As [`ConfigFile::load`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for (key, value) in [
            ("progress_interval", &file.progress_interval),
            ("retain_for", &file.retain_for),
            ("compaction_interval", &file.compaction_interval),
            ("request_id_window", &file.request_id_window),
        ] {
            if let Some(value) = value {
                parse_duration(value).map_err(|e| format!("{key}: {e}"))?;
            }
        }
        if let Some(store) = &file.store {
            store
                .parse::<StoreUrl>()
                .map_err(|e| format!("store: {e}"))?;
        }
        if let Some(format) = &file.log_format
            && format != "human"
            && format != "json"
        {
            return Err(format!("log_format: {format:?} is not human or json"));
        }
        if let Some(health) = &file.health {
            if health.selector.is_some() {
                return Err("health.selector: only a [[health.rule]] has a selector".into());
            }
            for rule in &health.rule {
                if rule.selector.as_ref().is_none_or(|s| s.is_empty()) {
                    return Err("health.rule: every rule needs a non-empty selector".into());
                }
                if !rule.rule.is_empty() || !rule.max_dwell.is_empty() || rule.grace.is_some() {
                    return Err(
                        "health.rule: a rule sets timeouts and restarts only (no rule, max_dwell or grace)"
                            .into(),
                    );
                }
                for (key, value) in rule.durations() {
                    if let Some(value) = value {
                        parse_duration(value).map_err(|e| format!("{key} (in a rule): {e}"))?;
                    }
                }
            }
            for (key, value) in health.durations() {
                if let Some(value) = value {
                    parse_duration(value).map_err(|e| format!("{key}: {e}"))?;
                }
            }
            for (state, limit) in &health.max_dwell {
                let parsed: AgentState = state
                    .parse()
                    .map_err(|_| format!("health.max_dwell: unknown state {state:?}"))?;
                parse_duration(limit).map_err(|e| format!("health.max_dwell.{state}: {e}"))?;
                if crate::automation::health::timeout_edge(&file_policy(&file), parsed).is_none() {
                    return Err(format!(
                        "health.max_dwell.{state}: the policy has no timeout edge (timeout, error or failed) from {state}"
                    ));
                }
            }
            if health
                .restart_multiplier
                .is_some_and(|m| !(1.0..=100.0).contains(&m))
            {
                return Err("health.restart_multiplier: must be between 1 and 100".into());
            }
            if health
                .restart_jitter
                .is_some_and(|j| !(0.0..=1.0).contains(&j))
            {
                return Err("health.restart_jitter: must be between 0 and 1".into());
            }
        }
        if let Some(hf) = &file.hf {
            for (key, value) in [
                ("hf.interval", &hf.interval),
                ("hf.fast_interval", &hf.fast_interval),
                ("hf.max_backoff", &hf.max_backoff),
            ] {
                if let Some(value) = value {
                    parse_duration(value).map_err(|e| format!("{key}: {e}"))?;
                }
            }
            if !hf.base_url.starts_with("https://") && !hf.base_url.starts_with("http://") {
                return Err(format!(
                    "hf.base_url: {:?} must be an https:// (or http://) URL",
                    hf.base_url
                ));
            }
        }
        if let Some(auth) = &file.auth {
            auth.principals()?;
        }
        if let Some(limits) = &file.limits {
            limits.settings()?;
        }
        let mut file = file;
        if let Some(policy) = &file.policy {
            let add = parse_edges(text, "add", &policy.add)?;
            let remove = parse_edges(text, "remove", &policy.remove)?;
            file.transition_policy = TransitionPolicy::default()
                .with_changes(&add, &remove)
                .map_err(|e| {
                    // Name the line of the offending edge.
                    let line = policy
                        .add
                        .iter()
                        .chain(&policy.remove)
                        .find(|edge| {
                            let edge = edge.get_ref().replace(' ', "");
                            e.replace(' ', "").contains(&edge)
                        })
                        .map(|edge| line_of(text, edge.span().start));
                    match line {
                        Some(line) => format!("line {line}: policy: {e}"),
                        None => format!("policy: {e}"),
                    }
                })?;
        }
        Ok(file)
    }

    /// A duration key, already checked by [`ConfigFile::parse`].
    pub fn duration(value: &Option<String>) -> Option<Duration> {
        value.as_deref().and_then(|v| parse_duration(v).ok())
    }
}

/// Parses durations like `500ms`, `30s`, `15m`, `12h`, `7d` (a bare number
/// is seconds).
///
/// # Errors
/// Anything else.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 15m, 12h, 7d)"))?;
    let seconds = |factor: u64| Duration::from_secs(n.saturating_mul(factor));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(seconds(1)),
        "m" => Ok(seconds(60)),
        "h" => Ok(seconds(3600)),
        "d" => Ok(seconds(86_400)),
        _ => Err(format!("{text:?} has an unknown unit (ms, s, m, h, d)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_and_durations_parse() {
        assert_eq!("memory".parse::<StoreUrl>(), Ok(StoreUrl::Memory));
        assert_eq!(
            DEFAULT_STORE.parse::<StoreUrl>(),
            Ok(StoreUrl::Sqlite("./data/agent-lifecycle.db".into()))
        );
        let pg = "postgres://app:secret@db.local:5433/fleet";
        assert_eq!(pg.parse::<StoreUrl>(), Ok(StoreUrl::Postgres(pg.into())));
        assert_eq!(
            StoreUrl::Postgres(pg.into()).to_string(),
            "postgres://app:***@db.local:5433/fleet",
            "the password never reaches logs"
        );
        assert!("redis://x".parse::<StoreUrl>().is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("7 parsecs").is_err());
    }

    #[test]
    fn config_files_parse_and_name_their_errors() {
        let file = ConfigFile::parse(
            "store = \"postgres://app@db/fleet\"\nretain_for = \"30d\"\nmax_batch = 64\n",
        )
        .expect("valid");
        assert_eq!(file.store.as_deref(), Some("postgres://app@db/fleet"));
        assert_eq!(
            ConfigFile::duration(&file.retain_for),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(file.max_batch, Some(64));
        let unknown = ConfigFile::parse("listen = \"127.0.0.1:1\"\nstroe = \"memory\"\n")
            .expect_err("unknown key");
        assert!(
            unknown.contains("stroe") && unknown.contains("line 2"),
            "{unknown}"
        );
        let bad = ConfigFile::parse("retain_for = \"soon\"").expect_err("bad duration");
        assert!(bad.starts_with("retain_for:"), "{bad}");
        let bad = ConfigFile::parse("store = \"redis://x\"").expect_err("bad store");
        assert!(bad.starts_with("store:"), "{bad}");
    }

    #[test]
    fn the_policy_section_changes_edges_and_names_bad_lines() {
        let example = include_str!("../../examples/agent-lifecycle.toml");
        let file = ConfigFile::parse(example).expect("the shipped example is valid");
        for from in [AgentState::Online, AgentState::Idle, AgentState::Busy] {
            assert!(file.transition_policy.allows(from, AgentState::Scaling));
        }
        assert_eq!(
            ConfigFile::default().transition_policy,
            TransitionPolicy::default()
        );
        for (text, expected) in [
            (
                "[policy]\nadd = [\n  \"online -> scaling\",\n  \"onlin -> busy\",\n]\n",
                "line 4: policy.add: unknown state \"onlin\"",
            ),
            (
                "[policy]\nadd = [\"deleted -> registered\"]\n",
                "line 2: policy: deleted -> registered: deleted is final",
            ),
            (
                "[policy]\nremove = [\"online -> registered\"]\n",
                "line 2: policy: online -> registered is not allowed",
            ),
            (
                "[policy]\nadd = [\"online scaling\"]\n",
                "line 2: policy.add: \"online scaling\" is not \"from -> to\"",
            ),
            ("[policy]\nallow = []\n", "allow"),
            (
                "[health.max_dwell]\ndeploying = \"soon\"\n",
                "health.max_dwell.deploying",
            ),
            (
                "[health.max_dwell]\nterminated = \"1m\"\n",
                "no timeout edge",
            ),
            ("[health.max_dwell]\ndeployin = \"1m\"\n", "unknown state"),
            (
                "[[health.rule]]\nheartbeat_timeout = \"1m\"\n",
                "non-empty selector",
            ),
            (
                "[[health.rule]]\nselector = { a = \"b\" }\ngrace = \"1m\"\n",
                "timeouts and restarts only",
            ),
            (
                "[[health.rule]]\nselector = { a = \"b\" }\nheartbeat_timeout = \"x\"\n",
                "in a rule",
            ),
        ] {
            let err = ConfigFile::parse(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
