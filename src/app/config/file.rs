//! Reading the `--config` file: TOML into [`Config`], every value parsed
//! by its type as it is read, then the checks that span several keys. An
//! error names the key (dotted, as `health.grace`) and the line.

use crate::domain::{AgentState, TransitionPolicy};

use super::Config;

/// The message of a TOML error, naming the dotted key and the line it
/// points at: `retain_for: "soon" is not a duration (line 3)`. Errors that
/// point at no `key = value` line keep the TOML parser's own text.
fn keyed(text: &str, err: &toml::de::Error) -> String {
    let Some(span) = err.span() else {
        return err.to_string();
    };
    let line = line_of(text, span.start);
    let Some(source) = text.lines().nth(line - 1) else {
        return err.to_string();
    };
    let Some((key, _)) = source.split_once('=') else {
        return err.to_string();
    };
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return err.to_string();
    }
    // The table the line is in: the nearest header above it.
    let header = text
        .lines()
        .take(line - 1)
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .last();
    let message = err.message().trim_end();
    match header {
        Some(h) if h.starts_with("[[") => {
            let table = h.trim_matches(|c| c == '[' || c == ']').trim();
            let parent = table.rsplit_once('.').map_or("", |(p, _)| p);
            let item = table.rsplit('.').next().unwrap_or(table);
            let dotted = if parent.is_empty() {
                key.to_string()
            } else {
                format!("{parent}.{key}")
            };
            format!("{dotted} (in a {item}): {message} (line {line})")
        }
        Some(h) => {
            let table = h.trim_matches(|c| c == '[' || c == ']').trim();
            format!("{table}.{key}: {message} (line {line})")
        }
        None => format!("{key}: {message} (line {line})"),
    }
}

/// The policy a file's `[policy]` describes, before it is checked (the
/// default when it has none or when it does not build).
fn file_policy(file: &Config) -> TransitionPolicy {
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

impl Config {
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
    /// As [`Config::load`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: Config = toml::from_str(text).map_err(|e| keyed(text, &e))?;
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
            }
            for state in health.max_dwell.keys() {
                let parsed: AgentState = state
                    .parse()
                    .map_err(|_| format!("health.max_dwell: unknown state {state:?}"))?;
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
        if let Some(hf) = &file.hf
            && !hf.base_url.starts_with("https://")
            && !hf.base_url.starts_with("http://")
        {
            return Err(format!(
                "hf.base_url: {:?} must be an https:// (or http://) URL",
                hf.base_url
            ));
        }
        if let Some(k8s) = &file.kubernetes
            && k8s.in_cluster == k8s.kubeconfig.is_some()
        {
            return Err("kubernetes: set either in_cluster = true or kubeconfig = \"PATH\"".into());
        }
        if let Some(auth) = &file.auth {
            auth.principals()?;
        }
        if let Some(limits) = &file.limits {
            limits.settings()?;
        }
        if let Some(notify) = &file.notify {
            notify.check(text)?;
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::app::config::{DEFAULT_STORE, StoreUrl, parse_duration};

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
        let file = Config::parse(
            "store = \"postgres://app@db/fleet\"\nretain_for = \"30d\"\nmax_batch = 64\n",
        )
        .expect("valid");
        assert_eq!(
            file.store,
            Some(StoreUrl::Postgres("postgres://app@db/fleet".into()))
        );
        assert_eq!(file.retain_for, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(file.max_batch, Some(64));
        let unknown = Config::parse("listen = \"127.0.0.1:1\"\nstroe = \"memory\"\n")
            .expect_err("unknown key");
        assert!(
            unknown.contains("stroe") && unknown.contains("line 2"),
            "{unknown}"
        );
        let bad = Config::parse("retain_for = \"soon\"").expect_err("bad duration");
        assert!(bad.starts_with("retain_for:"), "{bad}");
        let bad = Config::parse("store = \"redis://x\"").expect_err("bad store");
        assert!(bad.starts_with("store:"), "{bad}");
    }

    #[test]
    fn the_policy_section_changes_edges_and_names_bad_lines() {
        let example = include_str!("../../../examples/agent-lifecycle.toml");
        let file = Config::parse(example).expect("the shipped example is valid");
        for from in [AgentState::Online, AgentState::Idle, AgentState::Busy] {
            assert!(file.transition_policy.allows(from, AgentState::Scaling));
        }
        assert_eq!(
            Config::default().transition_policy,
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
            ("[kubernetes]\nact = true\n", "either in_cluster"),
            (
                "[kubernetes]\nin_cluster = true\nkubeconfig = \"/k\"\n",
                "either in_cluster",
            ),
            (
                "[kubernetes]\nin_cluster = true\nwatch = \"all\"\n",
                "watch",
            ),
        ] {
            let err = Config::parse(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
