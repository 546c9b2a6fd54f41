//! The value types of the settings, each parsed once where it is read
//! (flag, variable or file): the store URL, the log format, durations.
//! The file's values go through the same parsers as the flags'.

use std::{fmt, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use serde::{Deserialize, Deserializer, de::Error as _};

use crate::store::{MemoryStore, PostgresStore, Retention, SqliteStore, Store, StoreError};

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

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not human or json")),
        }
    }
}

/// Deserializers for the file's typed values: each reads text and parses
/// it with the parser the flags use.
pub(super) mod de {
    use super::*;

    /// Text parsed with the type's `FromStr` (its error as the message).
    pub fn parsed<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr<Err = String>,
    {
        let text = String::deserialize(deserializer)?;
        text.parse().map(Some).map_err(D::Error::custom)
    }

    /// A duration as [`parse_duration`] reads it.
    pub fn duration<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map(Some).map_err(D::Error::custom)
    }

    /// A path.
    pub fn path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PathBuf>, D::Error> {
        String::deserialize(deserializer).map(|text| Some(PathBuf::from(text)))
    }
}
