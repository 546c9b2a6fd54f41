//! The layers merged: flags and variables over the file over the
//! defaults, written once here, into the [`Settings`] the server runs with,
//! authentication and TLS included.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::{Config, LogFormat, StoreUrl};
use crate::{
    api::{
        auth::Authenticator,
        grpc::{
            CallLayer,
            rate_limit::{LimitSettings, Limits},
        },
        tls,
    },
    app::server::ServeOptions,
    automation::{
        drivers::{docker::DockerSettings, k8s::KubernetesSettings},
        health::HealthSettings,
        hf::HfSettings,
        notify::WebhookSettings,
    },
    service::ServiceConfig,
    store::Retention,
};

/// The defaults of the settings that have flags: what is in force when
/// neither a flag, a variable nor the file sets a value. The flags' help
/// texts quote them (a unit test holds the two together).
pub mod defaults {
    use std::{net::SocketAddr, time::Duration};

    /// `--listen`: loopback only, on the default port.
    pub const LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        crate::DEFAULT_PORT,
    ));
    /// `--store`: a SQLite file under `./data`.
    pub const STORE: &str = super::super::values::DEFAULT_STORE;
    /// `--log`.
    pub const LOG: &str = "info";
    /// `--event-buffer`.
    pub const EVENT_BUFFER: usize = crate::service::DEFAULT_EVENT_BUFFER;
    /// `--progress-interval`.
    pub const PROGRESS_INTERVAL: Duration = crate::service::DEFAULT_PROGRESS_INTERVAL;
    /// `--compaction-interval`.
    pub const COMPACTION_INTERVAL: Duration = Duration::from_secs(1);
    /// `--max-batch`.
    pub const MAX_BATCH: usize = crate::service::DEFAULT_MAX_BATCH;
    /// `--request-id-window`.
    pub const REQUEST_ID_WINDOW: Duration = crate::service::DEFAULT_REQUEST_WINDOW;
}

/// The settings in force: what `serve` runs with.
pub struct Settings {
    /// OTLP/gRPC endpoint for traces; none: no export.
    pub otlp_endpoint: Option<String>,
    /// The gRPC listen address.
    pub listen: SocketAddr,
    /// The HTTP listen address (`/metrics`, the dashboard); none: off.
    pub http_listen: Option<SocketAddr>,
    /// The store.
    pub store: StoreUrl,
    /// The log format.
    pub log_format: LogFormat,
    /// The log filter (`RUST_LOG` wins over it).
    pub log: String,
    /// What the store keeps.
    pub retention: Retention,
    /// The service's settings.
    pub service: ServiceConfig,
    /// The Hugging Face poller, when `[hf]` is configured.
    pub hf: Option<HfSettings>,
    /// Whether the Spaces driver runs beside the poller (`[hf] act`).
    pub hf_act: bool,
    /// The Docker driver, when `[docker]` is configured.
    pub docker: Option<DockerSettings>,
    /// The Kubernetes driver, when `[kubernetes]` is configured.
    pub kubernetes: Option<KubernetesSettings>,
    /// The health monitor's settings.
    pub health: HealthSettings,
    /// The webhooks (`[[notify.webhook]]`), one deliverer each.
    pub notify: Vec<WebhookSettings>,
    /// Authentication, TLS and limits at the edge.
    pub serving: ServeOptions,
    /// Whether anyone reaching the port is authenticated (principals or a
    /// required client certificate).
    pub authenticated: bool,
    /// `--insecure`.
    pub insecure: bool,
}

/// Lays `over` on `under`, field by field: the first that is set wins.
macro_rules! layered {
    ($over:ident, $under:ident: $($field:ident),* $(,)?) => {
        $( let $field = $over.$field.or($under.$field.clone()); )*
    };
}

impl Config {
    /// The settings that the flags (`self`) and the file they name (its
    /// `--config`, read now) describe, over the defaults.
    ///
    /// # Errors
    /// The file cannot be read or is invalid, or the values do not go
    /// together (TLS files, retention); the message names the flag or key.
    pub fn resolve(self) -> Result<Settings, String> {
        let file = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let flags = self;
        layered!(flags, file:
            listen, otlp_endpoint, http_listen, store, log_format, log, event_buffer,
            progress_interval, retain_events, retain_for, compaction_interval, max_batch,
            request_id_window, tls_cert, tls_key, tls_client_ca, insecure,
        );
        if retain_events == Some(0) {
            return Err(
                "--retain-events must be at least 1 (the newest event is always kept)".into(),
            );
        }
        let tls_files = TlsFiles {
            cert: tls_cert,
            key: tls_key,
            client_ca: tls_client_ca,
        };
        let (serving, authenticated) = serving(&tls_files, &file)?;
        let retention = Retention {
            max_events: retain_events,
            max_age: retain_for,
        };
        let service = ServiceConfig {
            event_buffer: event_buffer.unwrap_or(defaults::EVENT_BUFFER),
            retention,
            compaction_interval: compaction_interval.unwrap_or(defaults::COMPACTION_INTERVAL),
            progress_interval: progress_interval.unwrap_or(defaults::PROGRESS_INTERVAL),
            max_batch: max_batch.unwrap_or(defaults::MAX_BATCH),
            policy: file.transition_policy.clone(),
            request_window: request_id_window.unwrap_or(defaults::REQUEST_ID_WINDOW),
            ..ServiceConfig::default()
        };
        let store = match store {
            Some(store) => store,
            None => defaults::STORE.parse()?,
        };
        Ok(Settings {
            otlp_endpoint,
            listen: listen.unwrap_or(defaults::LISTEN),
            http_listen,
            store,
            log_format: log_format.unwrap_or_default(),
            log: log.unwrap_or_else(|| defaults::LOG.into()),
            retention,
            service,
            hf: file.hf.as_ref().map(|hf| hf.settings()).transpose()?,
            hf_act: file.hf.as_ref().is_some_and(|hf| hf.act),
            docker: file.docker.as_ref().map(|d| d.settings()).transpose()?,
            kubernetes: file
                .kubernetes
                .as_ref()
                .map(|k8s| k8s.settings())
                .transpose()?,
            health: file
                .health
                .as_ref()
                .map(|h| h.settings())
                .unwrap_or_default(),
            notify: match &file.notify {
                Some(notify) => notify.settings()?,
                None => Vec::new(),
            },
            serving,
            authenticated,
            insecure: insecure.unwrap_or(false),
        })
    }
}

/// The TLS files in force.
struct TlsFiles {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

/// The layer (authentication), TLS and limits that the settings describe,
/// and whether every caller is authenticated.
fn serving(files: &TlsFiles, file: &Config) -> Result<(ServeOptions, bool), String> {
    let mut calls = CallLayer::default();
    let principals = match &file.auth {
        Some(auth) => auth.principals()?,
        None => Vec::new(),
    };
    if !principals.is_empty() {
        let auth = Authenticator::new(&principals)?;
        calls = calls.with_auth(Arc::new(auth));
    }
    let tls = server_tls(files, !principals.is_empty())?;
    let authenticated = !principals.is_empty() || files.client_ca.is_some();
    let limits = match &file.limits {
        Some(limits) => limits.settings()?,
        None => LimitSettings::default(),
    };
    let serving = ServeOptions {
        calls,
        tls,
        limits: Arc::new(Limits::new(limits)),
    };
    Ok((serving, authenticated))
}

/// The server's TLS, its files read and checked now so that a bad file
/// stops the start with its name. A client certificate is optional when
/// principals can authenticate with a token.
fn server_tls(files: &TlsFiles, has_principals: bool) -> Result<Option<ServerTlsConfig>, String> {
    let (cert, key) = match (&files.cert, &files.key) {
        (None, None) => {
            if files.client_ca.is_some() {
                return Err("--tls-client-ca needs --tls-cert and --tls-key".into());
            }
            return Ok(None);
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err("--tls-cert and --tls-key go together".into());
        }
        (Some(cert), Some(key)) => (cert, key),
    };
    tls::certificates(cert).map_err(|e| e.to_string())?;
    tls::private_key(key).map_err(|e| e.to_string())?;
    let read =
        |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &files.client_ca {
        tls::certificates(ca).map_err(|e| e.to_string())?;
        config = config
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(has_principals);
    }
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use clap::Args as _;

    use super::*;

    /// Every `[default: X]` that a flag's help quotes is the default that
    /// [`Config::resolve`] applies.
    #[test]
    fn the_help_quotes_the_defaults_in_force() {
        let command = Config::augment_args(clap::Command::new("serve"));
        let help = |name: &str| {
            command
                .get_arguments()
                .find(|a| a.get_id() == name)
                .and_then(|a| a.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default()
        };
        let settings = Config::default().resolve().expect("defaults resolve");
        let quoted = [
            ("listen", settings.listen.to_string()),
            ("store", settings.store.to_string()),
            ("log", settings.log.clone()),
            ("log_format", "human".to_string()),
            ("event_buffer", settings.service.event_buffer.to_string()),
            ("max_batch", settings.service.max_batch.to_string()),
            (
                "progress_interval",
                format!("{}s", settings.service.progress_interval.as_secs()),
            ),
            (
                "compaction_interval",
                format!("{}s", settings.service.compaction_interval.as_secs()),
            ),
            (
                "request_id_window",
                format!("{}h", settings.service.request_window.as_secs() / 3600),
            ),
        ];
        for (flag, value) in quoted {
            let text = help(flag);
            assert!(
                text.contains(&format!("[default: {value}]")),
                "--{flag}: help {text:?} does not quote the default {value}"
            );
        }
        assert_eq!(settings.log_format, LogFormat::Human);
        assert!(!settings.insecure);
    }

    /// A flag wins over the file, the file over the default.
    #[test]
    fn flags_win_over_the_file_and_the_file_over_the_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serve.toml");
        std::fs::write(
            &path,
            "max_batch = 7\nevent_buffer = 9\nstore = \"memory\"\n",
        )
        .expect("write");
        let flags = Config {
            config: Some(path),
            max_batch: Some(3),
            ..Config::default()
        };
        let settings = flags.resolve().expect("resolve");
        assert_eq!(settings.service.max_batch, 3, "the flag wins");
        assert_eq!(
            settings.service.event_buffer, 9,
            "the file over the default"
        );
        assert_eq!(settings.store, StoreUrl::Memory);
        assert_eq!(
            settings.service.compaction_interval,
            defaults::COMPACTION_INTERVAL
        );
    }
}
