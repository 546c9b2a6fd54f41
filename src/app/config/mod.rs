//! The settings of `agent-lifecycle serve`, resolved once: flags,
//! `AGENT_LIFECYCLE_*` environment variables and the `--config` TOML file
//! are three layers of one type, [`Config`], each value parsed by its type
//! where it is read; [`Config::resolve`] lays flags over the file over the
//! defaults and builds [`Settings`], the typed value the server runs with.
//!
//! - `values`: the value types and their parsers (store URL, log format,
//!   durations).
//! - `file`: reading the file, with errors that name the key and line.
//! - `sections`: the file-only sections (`[auth]`, `[limits]`, `[policy]`,
//!   `[hf]`, `[docker]`, `[kubernetes]`, `[health]`).
//! - `notify`: the `[notify]` section (webhooks).
//! - `resolve`: the layers merged, the defaults applied, TLS and
//!   authentication built.

mod file;
mod notify;
mod resolve;
mod sections;
mod values;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::domain::TransitionPolicy;

use self::values::de;
pub use self::{
    notify::{NotifySection, WebhookSection},
    resolve::{Settings, defaults},
    sections::{
        AuthSection, DockerSection, DwellLimit, HealthSection, HfSection, KubernetesSection,
        LimitsSection, PolicySection, PrincipalSection,
    },
    values::{DEFAULT_STORE, LogFormat, StoreUrl, parse_duration, redact},
};

/// One layer of the settings: the flags of `serve` (each also an
/// `AGENT_LIFECYCLE_<NAME>` variable), or the `--config` file, which has the
/// same keys by the same names (with `_` for `-`) and the sections that
/// have no flags. Every key is optional; an unknown key is an error.
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
#[derive(Clone, Debug, Default, PartialEq, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TOML file with any of the settings below (keys with `_` for `-`) and
    /// a `[policy]` section (see examples/agent-lifecycle.toml).
    #[arg(long, env = "AGENT_LIFECYCLE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "AGENT_LIFECYCLE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// OTLP/gRPC endpoint (`http://HOST:4317`) to export traces to: a span
    /// per RPC and per commit batch, children of the caller's W3C
    /// `traceparent`; off when unset.
    #[arg(long, env = "AGENT_LIFECYCLE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// HTTP address for `/metrics` (Prometheus); off when unset. It has no
    /// authentication: bind it where only the monitoring system reaches.
    #[arg(long, env = "AGENT_LIFECYCLE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Store: `memory`, `sqlite://PATH`, or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// (several servers may share one PostgreSQL database)
    /// [default: sqlite://./data/agent-lifecycle.db].
    #[arg(long, env = "AGENT_LIFECYCLE_STORE")]
    #[serde(default, deserialize_with = "de::parsed")]
    pub store: Option<StoreUrl>,
    /// Log format [default: human].
    #[arg(long, env = "AGENT_LIFECYCLE_LOG_FORMAT", value_enum)]
    #[serde(default, deserialize_with = "de::parsed")]
    pub log_format: Option<LogFormat>,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG also works [default: info].
    #[arg(long, env = "AGENT_LIFECYCLE_LOG")]
    pub log: Option<String>,
    /// Events the broadcast channel buffers before a slow watcher is
    /// backfilled from the event log [default: 4096].
    #[arg(long, env = "AGENT_LIFECYCLE_EVENT_BUFFER")]
    pub event_buffer: Option<usize>,
    /// A watch stream's clock: an interval in which it was sent nothing
    /// ends with a progress message [default: 10s].
    #[arg(long, env = "AGENT_LIFECYCLE_PROGRESS_INTERVAL", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de::duration")]
    pub progress_interval: Option<Duration>,
    /// Keep at most this many newest events (memory store default: 100000;
    /// SQLite and PostgreSQL default: all).
    #[arg(long, env = "AGENT_LIFECYCLE_RETAIN_EVENTS")]
    pub retain_events: Option<u64>,
    /// Delete events older than this (e.g. 30d); default: keep.
    #[arg(long, env = "AGENT_LIFECYCLE_RETAIN_FOR", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de::duration")]
    pub retain_for: Option<Duration>,
    /// How often compaction runs when retention is set [default: 1s].
    #[arg(long, env = "AGENT_LIFECYCLE_COMPACTION_INTERVAL", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de::duration")]
    pub compaction_interval: Option<Duration>,
    /// Largest group commit [default: 1024].
    #[arg(long, env = "AGENT_LIFECYCLE_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// How long a client request_id is remembered, so that a retry returns
    /// the original answer (across restarts) [default: 1h].
    #[arg(long, env = "AGENT_LIFECYCLE_REQUEST_ID_WINDOW", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de::duration")]
    pub request_id_window: Option<Duration>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "AGENT_LIFECYCLE_TLS_CERT")]
    #[serde(default, deserialize_with = "de::path")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "AGENT_LIFECYCLE_TLS_KEY")]
    #[serde(default, deserialize_with = "de::path")]
    pub tls_key: Option<PathBuf>,
    /// Verify client certificates against this CA (PEM): mutual TLS. With
    /// [auth] principals a certificate is optional (a token also
    /// authenticates) and its common name names the principal; without,
    /// every client must present one.
    #[arg(long, env = "AGENT_LIFECYCLE_TLS_CLIENT_CA")]
    #[serde(default, deserialize_with = "de::path")]
    pub tls_client_ca: Option<PathBuf>,
    /// Listen on a non-loopback address without authentication (every
    /// caller is admin). Without it, such a server refuses to start.
    #[arg(
        long,
        env = "AGENT_LIFECYCLE_INSECURE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub insecure: Option<bool>,
    /// `[auth]`: the principals allowed in (no authentication without it).
    #[arg(skip)]
    pub auth: Option<AuthSection>,
    /// `[limits]`: rate limits and stream caps (generous defaults).
    #[arg(skip)]
    pub limits: Option<LimitsSection>,
    /// `[policy]`: edges added to or removed from the default transition
    /// table.
    #[arg(skip)]
    pub policy: Option<PolicySection>,
    /// `[hf]`: the Hugging Face Spaces poller (off without it).
    #[arg(skip)]
    pub hf: Option<HfSection>,
    /// `[docker]`: the Docker driver (off without it).
    #[arg(skip)]
    pub docker: Option<DockerSection>,
    /// `[kubernetes]`: the Kubernetes driver (off without it).
    #[arg(skip)]
    pub kubernetes: Option<KubernetesSection>,
    /// `[health]`: heartbeat and restart settings of the health monitor.
    #[arg(skip)]
    pub health: Option<HealthSection>,
    /// `[notify]`: webhooks (none without it).
    #[arg(skip)]
    pub notify: Option<NotifySection>,
    /// The transition policy the file describes (the default when it has no
    /// `[policy]`), built and checked by [`Config::parse`].
    #[arg(skip)]
    #[serde(skip)]
    pub transition_policy: TransitionPolicy,
}
