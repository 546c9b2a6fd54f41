//! The `[notify]` section: webhooks, each turned into the settings of its
//! deliverer ([`crate::automation::notify::WebhookSettings`]). Values are
//! parsed by their type as the file is read (a bad state, category,
//! template, agent id or duration names its key and line); the checks
//! across keys name the webhook's key and line too; the variables that
//! hold URLs and secrets are read when the settings are resolved.

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Deserializer, de::Error as _};

use super::values::de;
use crate::{
    automation::notify::{self, EventFilter, Secret, Template, WebhookSettings},
    domain::{AgentCategory, AgentId, AgentState, Labels},
};

/// The `[notify]` section.
///
/// ```toml
/// [[notify.webhook]]
/// name = "ops-slack"                # unique; names its cursor, lease and metrics
/// url_env = "OPS_SLACK_WEBHOOK_URL" # or url = "https://..." (Slack's URL is a secret)
/// template = "chat"                 # json (default), chat (Slack, Mattermost), discord
/// categories = ["error"]            # with states: the states an event moves into
/// states = ["offline"]
/// labels = { team = "ml" }          # the agent carries every one
/// sources = ["health-monitor"]      # triggered_by values
/// agents = ["6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2d11"]
///
/// [[notify.webhook]]
/// name = "audit"
/// url = "https://audit.internal/hooks/lifecycle"
/// secret_env = "AUDIT_WEBHOOK_SECRET"  # signs every delivery (HMAC-SHA256)
/// ca_file = "/etc/ssl/internal-ca.pem" # trusted besides the public roots
/// max_attempts = 10                 # then the event is parked; 0: never
/// initial_backoff = "1s"
/// max_backoff = "5m"
/// timeout = "10s"                   # per attempt
/// ```
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    /// `[[notify.webhook]]`: the webhooks.
    #[serde(default)]
    pub webhook: Vec<WebhookSection>,
}

/// One `[[notify.webhook]]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    /// See [`WebhookSettings::name`].
    pub name: toml::Spanned<String>,
    /// See [`WebhookSettings::url`]; or `url_env`.
    pub url: Option<toml::Spanned<String>>,
    /// The variable holding the URL (never a secret URL in the file).
    pub url_env: Option<String>,
    /// The variable holding the signing secret (never the secret itself in
    /// the file); none: deliveries are not signed.
    pub secret_env: Option<String>,
    /// `json` (the default), `chat` or `discord`.
    #[serde(default, deserialize_with = "de::parsed")]
    pub template: Option<Template>,
    /// States an event must move into (with `categories`).
    #[serde(default, deserialize_with = "states")]
    pub states: Vec<AgentState>,
    /// Categories of the states an event must move into (`operational`,
    /// `available`, `error`, `maintenance`).
    #[serde(default, deserialize_with = "categories")]
    pub categories: Vec<AgentCategory>,
    /// Labels the agent must carry.
    #[serde(default)]
    pub labels: Labels,
    /// `triggered_by` values the event must carry.
    #[serde(default)]
    pub sources: Vec<String>,
    /// The agents the event must be about.
    #[serde(default, deserialize_with = "agents")]
    pub agents: Vec<AgentId>,
    /// See [`WebhookSettings::max_attempts`].
    pub max_attempts: Option<u32>,
    /// See [`WebhookSettings::initial_backoff`].
    #[serde(default, deserialize_with = "de::duration")]
    pub initial_backoff: Option<Duration>,
    /// See [`WebhookSettings::max_backoff`].
    #[serde(default, deserialize_with = "de::duration")]
    pub max_backoff: Option<Duration>,
    /// See [`WebhookSettings::timeout`].
    #[serde(default, deserialize_with = "de::duration")]
    pub timeout: Option<Duration>,
    /// A PEM file of CA certificates trusted besides the compiled-in roots.
    pub ca_file: Option<String>,
}

fn states<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<AgentState>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|name| {
            name.parse()
                .map_err(|_| D::Error::custom(format!("unknown state {name:?}")))
        })
        .collect()
}

fn categories<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<AgentCategory>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|name| name.parse().map_err(D::Error::custom))
        .collect()
}

fn agents<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<AgentId>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|id| {
            AgentId::parse("agents", id)
                .map_err(|_| D::Error::custom(format!("{id:?} is not an agent id (a UUID)")))
        })
        .collect()
}

/// The line of byte `offset` in `text` (1-based).
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

/// Checks a webhook URL: `https://` or `http://`, with a host.
fn check_url(url: &str) -> Result<(), String> {
    let valid = url.parse::<hyper::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("https" | "http"))
            && uri.host().is_some_and(|host| !host.is_empty())
    });
    if !valid {
        return Err(format!(
            "{} is not an https:// (or http://) URL",
            notify::redacted(url)
        ));
    }
    Ok(())
}

impl NotifySection {
    /// Checks what the file says that spans several keys, naming the key
    /// and the line (`text` is the file's).
    ///
    /// # Errors
    /// A bad or repeated name, neither or both of `url` and `url_env`, a
    /// URL that is not `https://` or `http://`, an empty source, a zero
    /// timeout or back-off, or an `initial_backoff` above `max_backoff`.
    pub fn check(&self, text: &str) -> Result<(), String> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for webhook in &self.webhook {
            let name = webhook.name.get_ref().as_str();
            let line = line_of(text, webhook.name.span().start);
            let at = |key: &str, message: String| {
                format!("notify.webhook.{key} (webhook {name:?}): {message} (line {line})")
            };
            notify::check_name(name).map_err(|e| at("name", e))?;
            if let Some(first) = seen.insert(name, line) {
                return Err(at("name", format!("the name is also used on line {first}")));
            }
            match (&webhook.url, &webhook.url_env) {
                (None, None) => return Err(at("url", "needs url or url_env".into())),
                (Some(_), Some(_)) => {
                    return Err(at("url", "set url or url_env, not both".into()));
                }
                (Some(url), None) => check_url(url.get_ref()).map_err(|e| {
                    format!(
                        "notify.webhook.url (webhook {name:?}): {e} (line {})",
                        line_of(text, url.span().start)
                    )
                })?,
                (None, Some(_)) => {}
            }
            if webhook.sources.iter().any(|s| s.trim().is_empty()) {
                return Err(at("sources", "a source is empty".into()));
            }
            for (key, value) in [
                ("initial_backoff", webhook.initial_backoff),
                ("max_backoff", webhook.max_backoff),
                ("timeout", webhook.timeout),
            ] {
                if value == Some(Duration::ZERO) {
                    return Err(at(key, "must be more than 0".into()));
                }
            }
            let defaults = WebhookSettings::new("", "");
            let initial = webhook.initial_backoff.unwrap_or(defaults.initial_backoff);
            let max = webhook.max_backoff.unwrap_or(defaults.max_backoff);
            if initial > max {
                return Err(at(
                    "initial_backoff",
                    format!("{initial:?} is above max_backoff ({max:?})"),
                ));
            }
        }
        Ok(())
    }

    /// The webhooks' settings; the URL and secret variables are read now,
    /// and the CA files.
    ///
    /// # Errors
    /// A variable is not set or empty, a URL from a variable is not
    /// `https://` or `http://`, or a `ca_file` cannot be read.
    pub fn settings(&self) -> Result<Vec<WebhookSettings>, String> {
        self.webhook.iter().map(WebhookSection::settings).collect()
    }
}

impl WebhookSection {
    fn settings(&self) -> Result<WebhookSettings, String> {
        let name = self.name.get_ref();
        let at = |key: &str, message: String| {
            format!("notify.webhook.{key} (webhook {name:?}): {message}")
        };
        let variable = |key: &str, variable: &str| {
            std::env::var(variable)
                .ok()
                .filter(|value| !value.is_empty())
                .ok_or_else(|| at(key, format!("the variable {variable} is not set")))
        };
        let url = match (&self.url, &self.url_env) {
            (Some(url), _) => url.get_ref().clone(),
            (None, Some(env)) => {
                let url = variable("url_env", env)?;
                check_url(&url).map_err(|e| at("url_env", format!("{env}: {e}")))?;
                url
            }
            (None, None) => return Err(at("url", "needs url or url_env".into())),
        };
        let secret = self
            .secret_env
            .as_deref()
            .map(|env| variable("secret_env", env).map(Secret::new))
            .transpose()?;
        let extra_roots = match &self.ca_file {
            Some(path) => crate::api::tls::certificates(std::path::Path::new(path))
                .map_err(|e| at("ca_file", e.to_string()))?,
            None => Vec::new(),
        };
        crate::automation::http_client::client_config(&extra_roots)
            .map_err(|e| at("ca_file", e.to_string()))?;
        let defaults = WebhookSettings::new(name.as_str(), url);
        Ok(WebhookSettings {
            secret,
            template: self.template.unwrap_or_default(),
            filter: EventFilter {
                states: EventFilter::target_states(&self.states, &self.categories),
                labels: self.labels.clone(),
                sources: self.sources.clone(),
                agents: self.agents.clone(),
            },
            max_attempts: self.max_attempts.unwrap_or(defaults.max_attempts),
            initial_backoff: self.initial_backoff.unwrap_or(defaults.initial_backoff),
            max_backoff: self.max_backoff.unwrap_or(defaults.max_backoff),
            timeout: self.timeout.unwrap_or(defaults.timeout),
            extra_roots,
            ..defaults
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::config::Config;

    const WEBHOOK: &str =
        "[[notify.webhook]]\nname = \"ops\"\nurl = \"https://hooks.example.com/x\"\n";

    #[test]
    fn webhooks_parse_with_their_filters_and_defaults() {
        let file = Config::parse(&format!(
            "{WEBHOOK}template = \"chat\"\nstates = [\"offline\"]\ncategories = [\"error\"]\n\
             labels = {{ team = \"ml\" }}\nsources = [\"health-monitor\"]\n\
             agents = [\"6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2d11\"]\nmax_attempts = 0\n\
             initial_backoff = \"250ms\"\n\n\
             [[notify.webhook]]\nname = \"audit\"\nurl = \"http://127.0.0.1:9/\"\n"
        ))
        .expect("valid");
        let settings = file.notify.expect("[notify]").settings().expect("settings");
        assert_eq!(settings.len(), 2);
        let ops = &settings[0];
        assert_eq!(ops.name, "ops");
        assert_eq!(ops.key(), "webhook/ops");
        assert_eq!(ops.template, Template::Chat);
        assert_eq!(ops.max_attempts, 0);
        assert_eq!(ops.initial_backoff, Duration::from_millis(250));
        assert_eq!(ops.max_backoff, Duration::from_secs(300));
        assert_eq!(
            ops.filter.states,
            EventFilter::target_states(&[AgentState::Offline], &[AgentCategory::Error])
        );
        assert_eq!(ops.filter.labels["team"], "ml");
        assert_eq!(ops.filter.sources, ["health-monitor"]);
        assert_eq!(ops.filter.agents.len(), 1);
        let audit = &settings[1];
        assert_eq!(audit.template, Template::Json);
        assert_eq!(audit.filter, EventFilter::default());
        assert_eq!(audit.secret, None);
        assert_eq!(audit.max_attempts, 10);
    }

    #[test]
    fn bad_webhooks_are_refused_naming_the_key_and_line() {
        for (extra, expected) in [
            (
                "states = [\"onlin\"]\n",
                "notify.states (in a webhook): unknown state \"onlin\" (line 4)",
            ),
            ("categories = [\"broken\"]\n", "unknown category"),
            ("template = \"teams\"\n", "unknown template \"teams\""),
            ("agents = [\"nope\"]\n", "\"nope\" is not an agent id"),
            ("timeout = \"soon\"\n", "notify.timeout (in a webhook)"),
            ("secret = \"inline\"\n", "unknown field `secret`"),
            (
                "timeout = \"0s\"\n",
                "notify.webhook.timeout (webhook \"ops\"): must be more than 0 (line 2)",
            ),
            (
                "initial_backoff = \"10m\"\n",
                "notify.webhook.initial_backoff (webhook \"ops\"): 600s is above max_backoff (300s) (line 2)",
            ),
            ("url_env = \"X\"\n", "set url or url_env, not both"),
            ("sources = [\"\"]\n", "a source is empty"),
            (
                "[[notify.webhook]]\nname = \"ops\"\nurl = \"http://h/\"\n",
                "notify.webhook.name (webhook \"ops\"): the name is also used on line 2 (line 5)",
            ),
        ] {
            let text = format!("{WEBHOOK}{extra}");
            let err = Config::parse(&text).expect_err(&text);
            assert!(err.contains(expected), "{text}\n{err}");
        }
        for (text, expected) in [
            (
                "[[notify.webhook]]\nname = \"ops\"\nurl = \"ftp://h/x\"\n",
                "notify.webhook.url (webhook \"ops\"): ftp://h is not an https:// (or http://) URL (line 3)",
            ),
            (
                "[[notify.webhook]]\nname = \"ops\"\n",
                "needs url or url_env",
            ),
            (
                "[[notify.webhook]]\nname = \"a b\"\nurl = \"http://h/\"\n",
                "'.', '_' and '-' only",
            ),
            (
                "[[notify.webhook]]\nurl = \"http://h/\"\n",
                "missing field `name`",
            ),
        ] {
            let err = Config::parse(text).expect_err(text);
            assert!(err.contains(expected), "{text}\n{err}");
        }
    }

    #[test]
    fn variables_that_are_not_set_are_named() {
        let file = Config::parse(
            "[[notify.webhook]]\nname = \"ops\"\nurl_env = \"AGENT_LIFECYCLE_TEST_UNSET_URL\"\n",
        )
        .expect("valid");
        let err = file
            .notify
            .expect("[notify]")
            .settings()
            .expect_err("unset");
        assert_eq!(
            err,
            "notify.webhook.url_env (webhook \"ops\"): the variable AGENT_LIFECYCLE_TEST_UNSET_URL is not set"
        );
        let file = Config::parse(&format!(
            "{WEBHOOK}secret_env = \"AGENT_LIFECYCLE_TEST_UNSET_SECRET\"\n"
        ))
        .expect("valid");
        let err = file
            .notify
            .expect("[notify]")
            .settings()
            .expect_err("unset");
        assert!(err.contains("secret_env"), "{err}");
    }
}
