//! The Hugging Face Spaces driver: a Space bound to an agent
//! (`hf.space=OWNER/NAME`) is restarted when the agent enters STARTING and
//! paused when it enters STOPPING or TERMINATED, through the Hub API with
//! the configured token. Spaces are made and deleted outside the server:
//! DEPLOYING and DELETED ask nothing of the Hub. The Space's stage comes
//! back through the poller (`automation::hf`), which moves the agent on.
//!
//! Before acting, the driver reads the Space's runtime: a restart is
//! settled while the Space builds or starts, a pause once it is PAUSED.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

use super::{ActFuture, Driver, PlatformError, SettleFuture, Target};
use crate::{
    automation::hf::{HfSettings, HubClient, Polled, REQUEST_TIMEOUT, hub_client, poll},
    domain::{Binding, PlatformAction},
};

/// The driver's lease, cursor and `triggered_by`.
pub const HF_DRIVER: &str = "hf-driver";

/// Restarts and pauses Spaces through the Hub API.
pub struct HfDriver {
    client: HubClient,
    settings: HfSettings,
}

impl HfDriver {
    /// A driver for the Hub (or mirror) of `settings`.
    ///
    /// # Errors
    /// An extra root certificate of `settings` is not a valid CA.
    pub fn new(settings: HfSettings) -> Result<Self, rustls::Error> {
        Ok(HfDriver {
            client: hub_client(&settings)?,
            settings,
        })
    }

    /// `POST {base}/api/spaces/{owner}/{name}/{verb}`.
    async fn post(&self, owner: &str, name: &str, verb: &str) -> Result<(), PlatformError> {
        let base = self.settings.base_url.trim_end_matches('/');
        let uri = format!("{base}/api/spaces/{owner}/{name}/{verb}");
        let mut request = hyper::Request::post(&uri).header("accept", "application/json");
        if let Some(token) = &self.settings.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request =
            request
                .body(Empty::<Bytes>::new())
                .map_err(|err| PlatformError::Refused {
                    message: format!("bad request {uri}: {err}"),
                    code: "INVALID_REQUEST".into(),
                })?;
        let response =
            match tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request)).await {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => return Err(PlatformError::Transient(format!("{uri}: {err}"))),
                Err(_) => {
                    return Err(PlatformError::Transient(format!(
                        "{uri}: no answer in {REQUEST_TIMEOUT:?}"
                    )));
                }
            };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if status == hyper::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(PlatformError::Transient(format!("{uri}: HTTP {status}")));
        }
        // The Hub explains a refusal in its body's `error`.
        let body = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|body| body.to_bytes());
        let message = body
            .as_deref()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(PlatformError::Refused {
            message: format!("{verb} {owner}/{name}: {message}"),
            code: status.as_u16().to_string(),
        })
    }
}

impl Driver for HfDriver {
    fn name(&self) -> &'static str {
        HF_DRIVER
    }

    fn binds(&self, binding: &Binding) -> bool {
        matches!(binding, Binding::HfSpace { .. })
    }

    fn settled<'a>(&'a self, target: Target<'a>, action: PlatformAction) -> SettleFuture<'a> {
        Box::pin(async move {
            let Binding::HfSpace { owner, name } = target.binding else {
                return Ok(true);
            };
            let stage = match poll(&self.client, &self.settings, &format!("{owner}/{name}")).await {
                Polled::Stage(stage, _) => stage.to_ascii_uppercase(),
                Polled::Gone => "DELETED".to_string(),
                Polled::Retry(why) => return Err(PlatformError::Transient(why)),
            };
            let done: &[&str] = match action {
                PlatformAction::Start | PlatformAction::Restart => &[
                    "BUILDING",
                    "APP_STARTING",
                    "RUNNING_BUILDING",
                    "RUNNING_APP_STARTING",
                ],
                PlatformAction::Stop => &["PAUSED"],
                PlatformAction::Create | PlatformAction::Remove => return Ok(true),
            };
            Ok(done.contains(&stage.as_str()))
        })
    }

    fn act<'a>(&'a self, target: Target<'a>, action: PlatformAction) -> ActFuture<'a> {
        Box::pin(async move {
            let Binding::HfSpace { owner, name } = target.binding else {
                return Ok(());
            };
            match action {
                PlatformAction::Start | PlatformAction::Restart => {
                    self.post(owner, name, "restart").await
                }
                PlatformAction::Stop => self.post(owner, name, "pause").await,
                PlatformAction::Create | PlatformAction::Remove => Ok(()),
            }
        })
    }
}
