//! Calls with retries: reads are tried again on UNAVAILABLE and
//! RESOURCE_EXHAUSTED; changes too, with a `request_id` so that the server
//! applies each change once however often it is sent.

use std::{future::Future, time::Duration};

use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;

use super::{Client, ClientError, RawClient};
use crate::api::grpc::pb;

/// How calls are tried again.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Tries of one call, the first included.
    pub max_attempts: u32,
    /// The first back-off (without RetryInfo).
    pub initial_backoff: Duration,
    /// The longest back-off.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A change request: it carries the id that makes retries safe.
pub trait Change: Clone {
    /// The request's `request_id`.
    fn request_id(&mut self) -> &mut String;
}

macro_rules! changes {
    ($($request:ident),* $(,)?) => {$(
        impl Change for pb::$request {
            fn request_id(&mut self) -> &mut String {
                &mut self.request_id
            }
        }
    )*};
}

changes!(
    RegisterAgentRequest,
    TransitionAgentRequest,
    DeployAgentRequest,
    StartAgentRequest,
    StopAgentRequest,
    AssignTaskRequest,
    CompleteTaskRequest,
    HandleErrorRequest,
    PutInMaintenanceRequest,
    ResumeFromMaintenanceRequest,
);

/// Whether a failed call may be sent again, and after how long (RetryInfo's
/// delay, when the server gave one): UNAVAILABLE, RESOURCE_EXHAUSTED, and
/// the statuses of a connection that broke under the call (UNKNOWN,
/// INTERNAL or CANCELLED made by the transport, without the ErrorInfo this
/// server puts on each of its own).
fn retryable(status: &Status) -> Option<Option<Duration>> {
    match status.code() {
        Code::Unavailable => Some(None),
        Code::Unknown | Code::Internal | Code::Cancelled
            if status.get_details_error_info().is_none() =>
        {
            Some(None)
        }
        Code::ResourceExhausted => Some(
            status
                .get_details_retry_info()
                .and_then(|info| info.retry_delay),
        ),
        _ => None,
    }
}

impl Client {
    /// Sends `request` through `call` until it succeeds, fails for good, or
    /// the tries run out; moves to the next server after UNAVAILABLE.
    pub(super) async fn read<Req, Resp, F, Fut>(
        &self,
        call: F,
        request: Req,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(RawClient, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let policy = &self.options.retry;
        let mut backoff = policy.initial_backoff;
        let mut attempt = 1;
        loop {
            let status = match call(self.raw(), self.request(request.clone())).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            let Some(delay) = retryable(&status) else {
                return Err(ClientError::from(status));
            };
            if attempt >= policy.max_attempts {
                return Err(ClientError::from(status));
            }
            if status.code() != Code::ResourceExhausted {
                self.next_server();
            }
            tokio::time::sleep(delay.unwrap_or(backoff)).await;
            backoff = (backoff * 2).min(policy.max_backoff);
            attempt += 1;
        }
    }

    /// Sends the change `request` (with a fresh `request_id` when it has
    /// none) like [`Client::read`]: every try carries the same id.
    async fn change<Req, Resp, F, Fut>(
        &self,
        call: F,
        mut request: Req,
    ) -> Result<Resp, ClientError>
    where
        Req: Change,
        F: Fn(RawClient, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let id = request.request_id();
        if id.is_empty() {
            *id = uuid::Uuid::new_v4().to_string();
        }
        self.read(call, request).await
    }
}

macro_rules! change_calls {
    ($($(#[$doc:meta])* $name:ident($request:ident) -> $response:ident = $rpc:ident;)*) => {
        impl Client {$(
            $(#[$doc])*
            ///
            /// # Errors
            /// The server's refusal, or the tries ran out, as [`ClientError`].
            pub async fn $name(&self, request: pb::$request) -> Result<pb::$response, ClientError> {
                self.change(|mut raw, request| async move { raw.$rpc(request).await }, request).await
            }
        )*}
    };
}

change_calls! {
    /// RegisterAgent.
    register(RegisterAgentRequest) -> RegisterAgentResponse = register_agent;
    /// TransitionAgent.
    transition(TransitionAgentRequest) -> TransitionAgentResponse = transition_agent;
    /// DeployAgent: DEPLOYING then DEPLOYED.
    deploy(DeployAgentRequest) -> DeployAgentResponse = deploy_agent;
    /// StartAgent: STARTING then ONLINE (or STARTING until the first
    /// heartbeat, or until the agent's platform reports it running).
    start(StartAgentRequest) -> StartAgentResponse = start_agent;
    /// StopAgent: STOPPING then OFFLINE.
    stop(StopAgentRequest) -> StopAgentResponse = stop_agent;
    /// AssignTask: ONLINE or IDLE -> BUSY.
    assign_task(AssignTaskRequest) -> AssignTaskResponse = assign_task;
    /// CompleteTask: BUSY -> IDLE.
    complete_task(CompleteTaskRequest) -> CompleteTaskResponse = complete_task;
    /// HandleError: -> ERROR.
    handle_error(HandleErrorRequest) -> HandleErrorResponse = handle_error;
    /// PutInMaintenance: -> MAINTENANCE.
    put_in_maintenance(PutInMaintenanceRequest) -> PutInMaintenanceResponse = put_in_maintenance;
    /// ResumeFromMaintenance: MAINTENANCE -> ONLINE.
    resume_from_maintenance(ResumeFromMaintenanceRequest) -> ResumeFromMaintenanceResponse = resume_from_maintenance;
}
