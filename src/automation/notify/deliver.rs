//! One attempt to deliver one event: a POST to the webhook's URL with the
//! body and the headers a receiver needs to check and deduplicate it.
//!
//! ```text
//! POST /hooks/lifecycle HTTP/1.1
//! content-type: application/json
//! user-agent: agent-lifecycle/0.1.0
//! x-agent-lifecycle-webhook: ops
//! x-agent-lifecycle-sequence: 42
//! x-agent-lifecycle-delivery: 3b0c...-...   (the same on every attempt)
//! x-agent-lifecycle-attempt: 1
//! x-agent-lifecycle-signature: t=1767225600,v1=...   (with a secret)
//! ```
//!
//! A 2xx answer acknowledges the delivery; anything else (another status,
//! no answer within the timeout, a connection or TLS failure) is a failed
//! attempt, its reason kept for the log. Redirects are not followed.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use ring::digest;
use uuid::Uuid;

use super::{WebhookSettings, sign};
use crate::{
    automation::http_client::{self, HttpsClient},
    domain::LifecycleEvent,
};

/// The client a webhook posts with.
pub(super) type WebhookClient = HttpsClient<Full<Bytes>>;

/// The most of an error answer's body kept for the log, in bytes.
const ERROR_BODY_BYTES: usize = 200;

/// The most of any answer's body read (so the connection can be reused).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The client of `settings` (its extra roots).
///
/// # Errors
/// An extra root is not a valid CA certificate.
pub(super) fn client(settings: &WebhookSettings) -> Result<WebhookClient, rustls::Error> {
    http_client::client(&settings.extra_roots)
}

/// The id of the delivery of `event` to the webhook `name`: the same on
/// every attempt and after a restart, different for every event and
/// webhook (a UUID from SHA-256 of the webhook's name, the sequence, and
/// the agent and version the event is about, so a store started afresh
/// does not reuse the ids of an older one's events).
pub fn delivery_id(name: &str, event: &LifecycleEvent) -> Uuid {
    let record = &event.record;
    let text = format!(
        "agent-lifecycle webhook\0{name}\0{}\0{}\0{}",
        record.sequence, record.agent_id, record.version
    );
    let hash = digest::digest(&digest::SHA256, text.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash.as_ref()[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// One attempt.
pub(super) struct Attempt<'a> {
    /// The event's sequence.
    pub sequence: u64,
    /// [`delivery_id`].
    pub id: Uuid,
    /// The rendered body.
    pub body: &'a Bytes,
    /// 1 for the first try.
    pub number: u32,
    /// Unix time of the attempt, for the signature.
    pub now: u64,
}

/// POSTs `attempt` to the webhook: `Ok` with the status when the receiver
/// acknowledged it (2xx), `Err` with the reason otherwise.
pub(super) async fn post(
    client: &WebhookClient,
    settings: &WebhookSettings,
    attempt: &Attempt<'_>,
) -> Result<u16, String> {
    let mut request = hyper::Request::post(&settings.url)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("agent-lifecycle/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-agent-lifecycle-webhook", &settings.name)
        .header("x-agent-lifecycle-sequence", attempt.sequence)
        .header("x-agent-lifecycle-delivery", attempt.id.to_string())
        .header("x-agent-lifecycle-attempt", attempt.number);
    if let Some(secret) = &settings.secret {
        request = request.header(
            sign::SIGNATURE_HEADER,
            sign::signature(secret.as_bytes(), attempt.now, attempt.body),
        );
    }
    let request = request
        .body(Full::new(attempt.body.clone()))
        .map_err(|err| format!("cannot build the request: {err}"))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|err| crate::error::chain(&err))?;
        let status = response.status();
        // Read the answer (so the connection can be reused), keeping the
        // start of an error's for the log.
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|body| body.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            return Ok(status.as_u16());
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_BYTES)])
            .trim()
            .to_string();
        Err(if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {text}")
        })
    };
    match tokio::time::timeout(settings.timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {:?}", settings.timeout)),
    }
}

/// `url` without its path, query and user information: what logs show of
/// a webhook's target (Slack's and Discord's URLs carry their secret in
/// the path).
pub fn redacted(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(uri) => {
            let scheme = uri.scheme_str().unwrap_or("http");
            let host = uri.authority().map_or("", |a| a.as_str());
            let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
            format!("{scheme}://{host}")
        }
        Err(_) => "(invalid URL)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{automation::notify::filter::sample_event, domain::AgentState};

    #[test]
    fn delivery_ids_are_stable_per_event_and_webhook() {
        let event = sample_event(1, AgentState::Error, "x");
        let id = delivery_id("ops", &event);
        assert_eq!(id, delivery_id("ops", &event), "stable");
        assert_ne!(id, delivery_id("chat", &event), "per webhook");
        let other = sample_event(2, AgentState::Error, "x");
        assert_ne!(id, delivery_id("ops", &other), "per event");
        assert_eq!(id.get_version_num(), 8);
    }

    #[test]
    fn logs_show_no_path_query_or_credentials_of_a_url() {
        assert_eq!(
            redacted("https://hooks.slack.com/services/T0/B0/secret?x=1"),
            "https://hooks.slack.com"
        );
        assert_eq!(
            redacted("http://user:pw@127.0.0.1:8080/hook"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(redacted("not a url at all"), "(invalid URL)");
    }
}
