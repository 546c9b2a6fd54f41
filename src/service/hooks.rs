//! Pre- and post-transition hooks, sync and async, per agent and
//! service-wide.
//!
//! The seed's rule holds: a hook that fails or panics is logged and
//! counted and never blocks or undoes a transition. Only an explicit
//! [`HookError::Veto`] from a pre-transition hook refuses one.

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{Arc, RwLock},
};

use futures_util::{FutureExt, future::BoxFuture};
use tracing::{error, warn};

use super::metrics::Metrics;
use crate::domain::{AgentId, HookError, HookPhase, TransitionContext};

type SyncFn = dyn Fn(&TransitionContext) -> Result<(), HookError> + Send + Sync;
type AsyncFn = dyn Fn(TransitionContext) -> BoxFuture<'static, Result<(), HookError>> + Send + Sync;

/// A transition hook.
#[derive(Clone)]
pub enum Hook {
    /// Runs inline.
    Sync(Arc<SyncFn>),
    /// Awaited inline, in registration order.
    Async(Arc<AsyncFn>),
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hook::Sync(_) => "Hook::Sync",
            Hook::Async(_) => "Hook::Async",
        })
    }
}

impl Hook {
    /// Wraps a synchronous function.
    pub fn sync<F>(f: F) -> Self
    where
        F: Fn(&TransitionContext) -> Result<(), HookError> + Send + Sync + 'static,
    {
        Hook::Sync(Arc::new(f))
    }

    /// Wraps an async function.
    pub fn from_async<F, Fut>(f: F) -> Self
    where
        F: Fn(TransitionContext) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), HookError>> + Send + 'static,
    {
        Hook::Async(Arc::new(move |ctx| f(ctx).boxed()))
    }
}

/// Registered hooks.
#[derive(Debug)]
pub(crate) struct Hooks {
    /// Read on every transition, written only by `on_event`.
    registry: RwLock<Registry>,
    /// Where hook errors and panics are counted.
    metrics: Metrics,
}

#[derive(Debug, Default)]
struct Registry {
    service_wide: Vec<(HookPhase, Hook)>,
    per_agent: HashMap<AgentId, Vec<(HookPhase, Hook)>>,
}

impl Hooks {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Hooks {
            registry: RwLock::default(),
            metrics,
        }
    }

    pub(crate) fn add(&self, agent: Option<AgentId>, phase: HookPhase, hook: Hook) {
        let mut registry = self.registry.write().unwrap_or_else(|p| p.into_inner());
        match agent {
            None => registry.service_wide.push((phase, hook)),
            Some(id) => registry
                .per_agent
                .entry(id)
                .or_default()
                .push((phase, hook)),
        }
    }

    /// The hooks for one agent and phase: the agent's own first, then the
    /// service-wide ones, each in registration order. Empty in the common
    /// case, so callers skip building contexts.
    pub(crate) fn select(&self, agent: AgentId, phase: HookPhase) -> Vec<Hook> {
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

    /// Runs `hooks` in order. Returns the first veto's reason in the
    /// pre-transition phase; failures and panics are logged and counted.
    pub(crate) async fn run(&self, hooks: &[Hook], ctx: &TransitionContext) -> Option<String> {
        for hook in hooks {
            let outcome = match hook {
                Hook::Sync(f) => std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx))),
                Hook::Async(f) => AssertUnwindSafe(f(ctx.clone())).catch_unwind().await,
            };
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(HookError::Veto(reason))) => {
                    if ctx.phase == HookPhase::PreTransition {
                        return Some(reason);
                    }
                    warn!(agent_id = %ctx.agent_id, %reason, "post-transition hook vetoed after the commit; ignored");
                }
                Ok(Err(HookError::Failed(cause))) => {
                    self.metrics.hook_failed(ctx.phase);
                    warn!(agent_id = %ctx.agent_id, phase = ctx.phase.as_str(), error = %cause, "transition hook failed");
                }
                Err(_) => {
                    self.metrics.hook_failed(ctx.phase);
                    error!(agent_id = %ctx.agent_id, phase = ctx.phase.as_str(), "transition hook panicked");
                }
            }
        }
        None
    }
}
