//! Pre- and post-transition handlers, sync and async, per agent and
//! service-wide.
//!
//! The seed's rule holds: a handler that fails or panics is logged and
//! counted and never blocks or undoes a transition. Only an explicit
//! [`HandlerError::Veto`] from a pre-transition handler refuses one.

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use futures_util::{FutureExt, future::BoxFuture};
use tracing::{error, warn};

use crate::domain::{AgentId, HandlerError, HandlerPhase, TransitionContext};

type SyncFn = dyn Fn(&TransitionContext) -> Result<(), HandlerError> + Send + Sync;
type AsyncFn =
    dyn Fn(TransitionContext) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync;

/// A transition handler.
#[derive(Clone)]
pub enum Handler {
    /// Runs inline.
    Sync(Arc<SyncFn>),
    /// Awaited inline, in registration order.
    Async(Arc<AsyncFn>),
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Handler::Sync(_) => "Handler::Sync",
            Handler::Async(_) => "Handler::Async",
        })
    }
}

impl Handler {
    /// Wraps a synchronous function.
    pub fn sync<F>(f: F) -> Self
    where
        F: Fn(&TransitionContext) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        Handler::Sync(Arc::new(f))
    }

    /// Wraps an async function.
    pub fn from_async<F, Fut>(f: F) -> Self
    where
        F: Fn(TransitionContext) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        Handler::Async(Arc::new(move |ctx| f(ctx).boxed()))
    }
}

/// Registered handlers.
#[derive(Debug, Default)]
pub(crate) struct Handlers {
    /// Read on every transition, written only by `on_event`.
    registry: RwLock<Registry>,
    /// Handler errors and panics since start.
    failures: AtomicU64,
}

#[derive(Debug, Default)]
struct Registry {
    service_wide: Vec<(HandlerPhase, Handler)>,
    per_agent: HashMap<AgentId, Vec<(HandlerPhase, Handler)>>,
}

impl Handlers {
    pub(crate) fn add(&self, agent: Option<AgentId>, phase: HandlerPhase, handler: Handler) {
        let mut registry = self.registry.write().unwrap_or_else(|p| p.into_inner());
        match agent {
            None => registry.service_wide.push((phase, handler)),
            Some(id) => registry
                .per_agent
                .entry(id)
                .or_default()
                .push((phase, handler)),
        }
    }

    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The handlers for one agent and phase: the agent's own first, then the
    /// service-wide ones, each in registration order. Empty in the common
    /// case, so callers skip building contexts.
    pub(crate) fn select(&self, agent: AgentId, phase: HandlerPhase) -> Vec<Handler> {
        let registry = self.registry.read().unwrap_or_else(|p| p.into_inner());
        if registry.service_wide.is_empty() && registry.per_agent.is_empty() {
            return Vec::new();
        }
        registry
            .per_agent
            .get(&agent)
            .into_iter()
            .flatten()
            .chain(registry.service_wide.iter())
            .filter(|(p, _)| *p == phase)
            .map(|(_, h)| h.clone())
            .collect()
    }

    /// Runs `handlers` in order. Returns the first veto's reason in the
    /// pre-transition phase; failures and panics are logged and counted.
    pub(crate) async fn run(
        &self,
        handlers: &[Handler],
        ctx: &TransitionContext,
    ) -> Option<String> {
        for handler in handlers {
            let outcome = match handler {
                Handler::Sync(f) => std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx))),
                Handler::Async(f) => AssertUnwindSafe(f(ctx.clone())).catch_unwind().await,
            };
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(HandlerError::Veto(reason))) => {
                    if ctx.phase == HandlerPhase::PreTransition {
                        return Some(reason);
                    }
                    warn!(agent_id = %ctx.agent_id, %reason, "post-transition handler vetoed after the commit; ignored");
                }
                Ok(Err(HandlerError::Failed(cause))) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    warn!(agent_id = %ctx.agent_id, phase = ctx.phase.as_str(), error = %cause, "transition handler failed");
                }
                Err(_) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    error!(agent_id = %ctx.agent_id, phase = ctx.phase.as_str(), "transition handler panicked");
                }
            }
        }
        None
    }
}
