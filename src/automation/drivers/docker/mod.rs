//! The Docker driver: an agent bound to a container
//! (`docker.container=NAME`) has it created, started, restarted, stopped
//! and removed as the agent moves, and follows what the container does
//! (`observe`).
//!
//! It talks to the Docker Engine API with bollard, over `[docker] host`,
//! else `DOCKER_HOST`, else the local socket. The container's image,
//! command and memory limit come from the agent's labels (`spec`).
//!
//! | state entered | action | Docker |
//! |---|---|---|
//! | DEPLOYING | create | create the container (no-op when it exists) |
//! | STARTING | start | start it (created first when missing) |
//! | STARTING, by a restart of the health monitor | restart | restart it |
//! | STOPPING, TERMINATED | stop | stop it (`stop_timeout`, then SIGKILL) |
//! | DELETED | remove | remove it, forcibly |
//!
//! Before acting, the driver inspects the container: an action whose
//! effect shows (it exists, it runs, it started after the event, it is
//! stopped or gone) is settled without acting again.

use std::{sync::Arc, time::Duration};

use bollard::models::ContainerStateStatusEnum;
use bollard::{
    Docker,
    errors::Error as DockerError,
    query_parameters::{
        CreateContainerOptions, RemoveContainerOptions, RestartContainerOptions,
        StopContainerOptions,
    },
};
use tracing::info;

use super::{ActFuture, Driver, PlatformError, SettleFuture, Target};
use crate::domain::{Binding, PlatformAction};

pub mod observe;
pub mod spec;
pub mod status;

pub use observe::observe;

/// The driver's lease, cursor and `triggered_by`.
pub const DOCKER_DRIVER: &str = "docker-driver";

/// How the driver reaches Docker and makes containers.
#[derive(Clone, Debug, PartialEq)]
pub struct DockerSettings {
    /// `unix:///PATH` or `tcp://HOST:PORT`; `None`: `DOCKER_HOST`, else the
    /// local socket.
    pub host: Option<String>,
    /// The image of agents without a `docker.image` label.
    pub image: Option<String>,
    /// How long a stop waits before SIGKILL.
    pub stop_timeout: Duration,
    /// Whether the driver acts on containers (else it only follows them).
    pub act: bool,
    /// How long to wait before following the events again after the
    /// daemon went away (doubling up to 10 s).
    pub reconnect: Duration,
}

impl Default for DockerSettings {
    fn default() -> Self {
        DockerSettings {
            host: None,
            image: None,
            stop_timeout: Duration::from_secs(10),
            act: true,
            reconnect: Duration::from_millis(500),
        }
    }
}

/// One request's longest wait for Docker's answer (a stop waits
/// `stop_timeout` on top).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates, starts, restarts, stops and removes containers.
pub struct DockerDriver {
    docker: Docker,
    settings: DockerSettings,
}

impl DockerDriver {
    /// A driver for the daemon of `settings` (not contacted yet).
    ///
    /// # Errors
    /// The host is not a valid Docker address.
    pub fn new(settings: DockerSettings) -> Result<Arc<Self>, String> {
        let docker = match &settings.host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_defaults(),
        }
        .map_err(|e| format!("cannot reach Docker: {e}"))?
        .with_timeout(REQUEST_TIMEOUT + settings.stop_timeout);
        Ok(Arc::new(DockerDriver { docker, settings }))
    }

    /// The driver's settings.
    pub fn settings(&self) -> &DockerSettings {
        &self.settings
    }

    /// The container `name`, or `None` when it does not exist.
    pub(crate) async fn inspect(&self, name: &str) -> Result<status::Inspected, PlatformError> {
        match self.docker.inspect_container(name, None).await {
            Ok(container) => Ok(Some(container)),
            Err(err) if status_code(&err) == Some(404) => Ok(None),
            Err(err) => Err(platform_error("inspect", name, err)),
        }
    }

    /// Creates the container for `target` when it does not exist.
    async fn create(&self, target: Target<'_>, name: &str) -> Result<(), PlatformError> {
        let body = spec::container_body(target.agent, self.settings.image.as_deref()).map_err(
            |message| PlatformError::Refused {
                message,
                code: "INVALID_SPEC".into(),
            },
        )?;
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..CreateContainerOptions::default()
        };
        match self.docker.create_container(Some(options), body).await {
            Ok(created) => {
                info!(container = name, id = created.id, "container created");
                Ok(())
            }
            // Made meanwhile (or by an earlier try): it exists.
            Err(err) if status_code(&err) == Some(409) => Ok(()),
            Err(err) => Err(platform_error("create", name, err)),
        }
    }

    async fn start(&self, target: Target<'_>, name: &str) -> Result<(), PlatformError> {
        if self.inspect(name).await?.is_none() {
            self.create(target, name).await?;
        }
        self.docker
            .start_container(name, None)
            .await
            .map_err(|err| platform_error("start", name, err))
    }

    async fn restart(&self, target: Target<'_>, name: &str) -> Result<(), PlatformError> {
        if self.inspect(name).await?.is_none() {
            return self.start(target, name).await;
        }
        let options = RestartContainerOptions {
            t: Some(self.stop_seconds()),
            ..RestartContainerOptions::default()
        };
        self.docker
            .restart_container(name, Some(options))
            .await
            .map_err(|err| platform_error("restart", name, err))
    }

    async fn stop(&self, name: &str) -> Result<(), PlatformError> {
        let options = StopContainerOptions {
            t: Some(self.stop_seconds()),
            ..StopContainerOptions::default()
        };
        match self.docker.stop_container(name, Some(options)).await {
            // 304: already stopped.
            Ok(()) => Ok(()),
            Err(err) if status_code(&err) == Some(404) => Ok(()),
            Err(err) => Err(platform_error("stop", name, err)),
        }
    }

    async fn remove(&self, name: &str) -> Result<(), PlatformError> {
        let options = RemoveContainerOptions {
            force: true,
            ..RemoveContainerOptions::default()
        };
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if status_code(&err) == Some(404) => Ok(()),
            Err(err) => Err(platform_error("remove", name, err)),
        }
    }

    fn stop_seconds(&self) -> i32 {
        i32::try_from(self.settings.stop_timeout.as_secs()).unwrap_or(i32::MAX)
    }

    /// The daemon's event stream, and container inspection, for `observe`.
    pub(crate) fn client(&self) -> &Docker {
        &self.docker
    }
}

/// The HTTP status of a Docker answer, when the daemon answered.
fn status_code(err: &DockerError) -> Option<u16> {
    match err {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// A failed call as the runner sees it: Docker's 4xx are refusals (with
/// Docker's message and status), the rest (5xx, no answer, a broken
/// connection) may pass.
fn platform_error(verb: &str, name: &str, err: DockerError) -> PlatformError {
    match err {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } if (400..500).contains(&status_code) && status_code != 429 => PlatformError::Refused {
            message: format!("{verb} container {name}: {message}"),
            code: status_code.to_string(),
        },
        other => PlatformError::Transient(format!("{verb} container {name}: {other}")),
    }
}

impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        DOCKER_DRIVER
    }

    fn binds(&self, binding: &Binding) -> bool {
        matches!(binding, Binding::Docker { .. })
    }

    fn settled<'a>(&'a self, target: Target<'a>, action: PlatformAction) -> SettleFuture<'a> {
        Box::pin(async move {
            let Binding::Docker { container: name } = target.binding else {
                return Ok(true);
            };
            let container = self.inspect(name).await?;
            let state = container.as_ref().and_then(|c| c.state.as_ref());
            let running = state.and_then(|s| s.status) == Some(ContainerStateStatusEnum::RUNNING);
            Ok(match action {
                PlatformAction::Create => container.is_some(),
                PlatformAction::Start => running,
                PlatformAction::Restart => {
                    let started = state
                        .and_then(|s| s.started_at.as_deref())
                        .and_then(crate::domain::parse_rfc3339);
                    running && started.is_some_and(|started| started >= target.at)
                }
                PlatformAction::Stop => !running,
                PlatformAction::Remove => container.is_none(),
            })
        })
    }

    fn act<'a>(&'a self, target: Target<'a>, action: PlatformAction) -> ActFuture<'a> {
        Box::pin(async move {
            let Binding::Docker { container: name } = target.binding else {
                return Ok(());
            };
            match action {
                PlatformAction::Create => self.create(target, name).await,
                PlatformAction::Start => self.start(target, name).await,
                PlatformAction::Restart => self.restart(target, name).await,
                PlatformAction::Stop => self.stop(name).await,
                PlatformAction::Remove => self.remove(name).await,
            }
        })
    }
}
