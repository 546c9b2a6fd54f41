//! Webhook notifications: the events a webhook's filter passes are POSTed
//! to its URL, each once acknowledged, in sequence order.
//!
//! [`run`] delivers for one webhook (`[[notify.webhook]]` in the
//! configuration file; the server runs one per webhook). Like the platform
//! drivers' runner it
//!
//! - delivers only while this process holds the webhook's lease
//!   (`webhook/NAME`), so one process of a fleet on a shared store
//!   delivers, and another takes over after a failover;
//! - keeps its place in the log in a durable cursor of the same name (the
//!   first sequence not yet handled), advanced after each event is
//!   acknowledged or parked, so a restart or a failover resends what was
//!   not acknowledged and skips nothing; events the filter passes over
//!   advance it in bulk (when the log is idle, or every
//!   [`SKIPPED_BEFORE_ADVANCE`] events). A webhook that never ran starts at
//!   the head as of its start: history is not replayed.
//!
//! Delivery is at least once: an acknowledgement lost (the receiver
//! answered after the timeout, or the process died before the cursor moved)
//! means the event is sent again, with the same sequence and delivery id
//! so that the receiver can drop the duplicate. A failed attempt is tried
//! again after a doubling back-off; after `max_attempts` tries (0: never)
//! the event is parked: counted, logged with its sequence, and passed over,
//! and the webhook goes on with the next one.
//!
//! - [`filter`]: which events a webhook is sent.
//! - [`payload`]: the bodies (`json`, `chat`, `discord`).
//! - [`sign`]: the HMAC-SHA256 signature header.
//! - `deliver`: one HTTP attempt.

pub mod filter;
pub mod payload;
pub mod sign;

mod deliver;

use std::{fmt, future::Future, time::Duration};

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tracing::{debug, error, info, warn};

use self::deliver::{Attempt, WebhookClient};
pub use self::{
    deliver::{delivery_id, redacted},
    filter::EventFilter,
    payload::Template,
};
use crate::{
    AgentLifecycleService,
    error::{Error, Result},
    service::{LeaseHolder, PublishedEvent, WatchItem, lease_holder},
};

/// The longest webhook name, in bytes (it names a cursor, a lease, a
/// metric label and a header).
pub const MAX_NAME_BYTES: usize = 64;

/// Events the filter passes over before the cursor is advanced past them
/// while the log is busy (when it is idle, the cursor is advanced at once).
pub const SKIPPED_BEFORE_ADVANCE: u64 = 1024;

/// The webhook's secret, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret of `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    /// Its bytes: the HMAC key.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One webhook (`[[notify.webhook]]`).
#[derive(Clone, PartialEq)]
pub struct WebhookSettings {
    /// Its name: unique, 1 to [`MAX_NAME_BYTES`] of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// Where events are POSTed: `https://` or `http://`.
    pub url: String,
    /// The key of the signature header; none: deliveries are not signed.
    pub secret: Option<Secret>,
    /// The shape of the body.
    pub template: Template,
    /// Which events are sent.
    pub filter: EventFilter,
    /// Tries of one event before it is parked; 0: never park (the webhook
    /// waits for its receiver however long it takes).
    pub max_attempts: u32,
    /// The wait after the first failed attempt, doubled after each.
    pub initial_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// How long one attempt may take, connection and answer included.
    pub timeout: Duration,
    /// CA certificates trusted for HTTPS besides the compiled-in roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// How long to wait before asking for the lease again.
    pub lease_retry: Duration,
}

impl WebhookSettings {
    /// A webhook named `name` posting to `url`, with the defaults: every
    /// event, as JSON, unsigned, 10 tries from 1 s up to 5 min apart, 10 s
    /// per attempt.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        WebhookSettings {
            name: name.into(),
            url: url.into(),
            secret: None,
            template: Template::Json,
            filter: EventFilter::default(),
            max_attempts: 10,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            extra_roots: Vec::new(),
            lease_retry: Duration::from_secs(1),
        }
    }

    /// The name of its cursor and of its lease: `webhook/NAME`.
    pub fn key(&self) -> String {
        format!("webhook/{}", self.name)
    }
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("name", &self.name)
            .field("url", &redacted(&self.url))
            .field("secret", &self.secret)
            .field("template", &self.template)
            .field("filter", &self.filter)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Checks a webhook name: 1 to [`MAX_NAME_BYTES`] bytes of ASCII letters,
/// digits, `.`, `_` and `-`.
///
/// # Errors
/// The name is empty, too long, or has another character.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{name:?} must be 1 to {MAX_NAME_BYTES} characters long"
        ));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "{name:?} has {c:?}; a name has letters, digits, '.', '_' and '-' only"
        )),
        None => Ok(()),
    }
}

/// A webhook at work: its settings, client and names.
struct Webhook {
    settings: WebhookSettings,
    client: WebhookClient,
    /// Its cursor's and lease's name.
    key: String,
}

/// Delivers for the webhook `settings` until the service shuts down.
///
/// A webhook that never ran starts after the head as of this call (not of
/// the returned future's first poll), so nothing committed after the call
/// escapes it.
pub fn run(
    service: AgentLifecycleService,
    settings: WebhookSettings,
) -> impl Future<Output = ()> + Send {
    let first_head = service.head_sequence();
    async move {
        let client = match deliver::client(&settings) {
            Ok(client) => client,
            Err(err) => {
                error!(webhook = %settings.name, error = %err, "the webhook cannot start");
                return;
            }
        };
        let webhook = Webhook {
            key: settings.key(),
            settings,
            client,
        };
        let name = webhook.settings.name.as_str();
        let metrics = service.metrics().webhooks();
        let mut lease = lease_holder(&service, &webhook.key);
        info!(webhook = name, target = %redacted(&webhook.settings.url), template = %webhook.settings.template, "webhook started");
        while !service.is_shutting_down() {
            if !lease.held().await {
                metrics.stopped(name);
                pause(&service, webhook.settings.lease_retry).await;
                continue;
            }
            match follow(&service, &webhook, &mut lease, first_head).await {
                Ok(Followed::End) | Err(Error::ShuttingDown) => break,
                Ok(Followed::LeaseLost) => {
                    warn!(
                        webhook = name,
                        "the webhook's lease was lost; it stops delivering until it holds it again"
                    );
                }
                Err(err) => {
                    warn!(webhook = name, error = %crate::error::chain(&err), "the webhook's log stream ended; resuming from its cursor");
                    pause(&service, webhook.settings.lease_retry).await;
                }
            }
            metrics.stopped(name);
        }
        metrics.stopped(name);
    }
}

/// Sleeps for `wait`, or until the service shuts down.
async fn pause(service: &AgentLifecycleService, wait: Duration) {
    tokio::select! {
        () = service.shutting_down() => {}
        () = tokio::time::sleep(wait) => {}
    }
}

/// How following the log ended.
enum Followed {
    /// The stream ended (the service is shutting down).
    End,
    /// Another process may hold the lease now: this one must not deliver.
    LeaseLost,
}

/// How one event's delivery ended.
enum Handled {
    /// The receiver acknowledged it, or it was parked.
    Done,
    /// The lease was lost before it was acknowledged.
    LeaseLost,
}

/// The webhook's place in the log.
struct Position {
    /// The sequence up to which every event has been handled.
    handled: u64,
    /// The cursor as stored: the first sequence not yet handled, as far as
    /// a restart knows.
    stored: u64,
}

impl Position {
    /// Stores that every event up to `handled` is handled.
    async fn advance(&mut self, service: &AgentLifecycleService, key: &str) -> Result<()> {
        if self.handled + 1 > self.stored {
            service.advance_cursor(key, self.handled + 1).await?;
            self.stored = self.handled + 1;
        }
        Ok(())
    }
}

/// Delivers the events after the webhook's cursor, then live ones, until
/// the stream ends or the lease is lost. The lease is checked before every
/// attempt, so after a failover only the new holder delivers.
async fn follow(
    service: &AgentLifecycleService,
    webhook: &Webhook,
    lease: &mut LeaseHolder,
    first_head: u64,
) -> Result<Followed> {
    let key = webhook.key.as_str();
    let name = webhook.settings.name.as_str();
    let metrics = service.metrics().webhooks();
    // A webhook that never ran starts at the head: its receiver is not
    // sent the fleet's history. Events compacted before it delivered them
    // are skipped with a warning (replay them from an archive).
    let (mut watcher, next) = service.watch_from_cursor(key, first_head).await?;
    let mut position = Position {
        handled: next - 1,
        stored: next,
    };
    metrics.progress(name, position.handled, None);
    while let Some(item) = watcher.next().await {
        match item? {
            WatchItem::Event(event) => {
                let sequence = event.sequence();
                if webhook.settings.filter.matches(&event) {
                    if let Handled::LeaseLost = handle(service, webhook, lease, &event).await? {
                        return Ok(Followed::LeaseLost);
                    }
                    position.handled = sequence;
                    position.advance(service, key).await?;
                } else {
                    position.handled = sequence;
                    if position.handled + 1 - position.stored >= SKIPPED_BEFORE_ADVANCE {
                        position.advance(service, key).await?;
                    }
                }
                metrics.progress(name, position.handled, None);
            }
            // The log is idle up to `head_sequence`: nothing more to
            // deliver before it.
            WatchItem::Progress { head_sequence } => {
                position.handled = position.handled.max(head_sequence);
                position.advance(service, key).await?;
                metrics.progress(name, position.handled, None);
            }
            WatchItem::SnapshotAgent(_) | WatchItem::SnapshotComplete { .. } => {}
        }
    }
    Ok(Followed::End)
}

/// Delivers one event: tries until the receiver acknowledges it, its tries
/// run out (it is parked), the lease is lost or the service shuts down
/// (`Err(ShuttingDown)`: it was not acknowledged, a restart sends it
/// again).
async fn handle(
    service: &AgentLifecycleService,
    webhook: &Webhook,
    lease: &mut LeaseHolder,
    event: &PublishedEvent,
) -> Result<Handled> {
    let settings = &webhook.settings;
    let name = settings.name.as_str();
    let metrics = service.metrics().webhooks();
    let sequence = event.sequence();
    metrics.progress(name, sequence - 1, Some(event.record.at));
    let body = Bytes::from(settings.template.render(event));
    let id = delivery_id(name, event);
    let mut backoff = settings.initial_backoff;
    let mut number = 0;
    loop {
        if !lease.held().await {
            return Ok(Handled::LeaseLost);
        }
        number += 1;
        let attempt = Attempt {
            sequence,
            id,
            body: &body,
            number,
            now: unix_now(service),
        };
        let answer = tokio::select! {
            () = service.shutting_down() => return Err(Error::ShuttingDown),
            answer = deliver::post(&webhook.client, settings, &attempt) => answer,
        };
        let why = match answer {
            Ok(status) => {
                debug!(
                    webhook = name,
                    sequence,
                    status,
                    attempt = number,
                    "webhook delivered"
                );
                metrics.delivery(name, "delivered");
                return Ok(Handled::Done);
            }
            Err(why) => why,
        };
        metrics.failure(name);
        if settings.max_attempts != 0 && number >= settings.max_attempts {
            warn!(
                webhook = name,
                sequence,
                agent_id = %event.agent.id,
                attempts = number,
                error = %why,
                "webhook delivery parked: its tries ran out; the webhook goes on (resend it from `agent-lifecycle watch --from {sequence}`)"
            );
            metrics.delivery(name, "parked");
            return Ok(Handled::Done);
        }
        warn!(webhook = name, sequence, attempt = number, retry_in = ?backoff, error = %why, "webhook delivery failed; retrying");
        pause(service, backoff).await;
        if service.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        backoff = (backoff * 2).min(settings.max_backoff);
    }
}

/// The service clock's Unix time, in seconds.
fn unix_now(service: &AgentLifecycleService) -> u64 {
    service
        .config()
        .clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        for good in ["ops", "ops-slack", "team_ml.prod", "A1"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in ["", "has space", "slash/name", "ümlaut", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(
            WebhookSettings::new("x".repeat(MAX_NAME_BYTES), "http://h")
                .key()
                .len()
                <= crate::store::MAX_CURSOR_NAME_BYTES
        );
    }

    #[test]
    fn debug_output_shows_neither_the_secret_nor_the_url_path() {
        let mut settings = WebhookSettings::new("ops", "https://hooks.slack.com/services/T/B/tok");
        settings.secret = Some(Secret::new("s3cret"));
        let text = format!("{settings:?}");
        assert!(!text.contains("s3cret") && !text.contains("tok"), "{text}");
        assert!(text.contains("hooks.slack.com"), "{text}");
    }
}
