//! Automation: the parts that drive the service through its public API, each
//! with its own timers (and, on a shared store, its own lease). Nothing here
//! bypasses the write path: every change they make is an ordinary
//! transition with `triggered_by` naming the automation.
//!
//! - [`health`]: heartbeats and the health monitor (timeouts, restarts).
//! - [`sync`]: external status sync, the one mapping from a platform's
//!   status to a path of transitions (SyncExternalStatus).
//! - [`hf`]: the Hugging Face Hub poller, which feeds [`sync`] the runtime
//!   stage of each labelled Space.
//! - [`drivers`]: the platforms (Docker, Kubernetes, Spaces) follow the
//!   lifecycle of the agents bound to them.
//! - [`notify`]: webhooks: matching events POSTed to HTTP receivers, at
//!   least once and in order, from a durable cursor under a lease.
//! - [`analytics`]: per-agent and fleet analytics computed from the history.
//! - [`http_client`]: the one set-up of outgoing HTTP(S) (compiled-in
//!   roots, extra CA files) that the Hub poller and the webhooks share.
//!
//! Depends on `domain`, `store` and `service`; knows nothing of gRPC.

pub mod analytics;
pub mod drivers;
pub mod health;
pub mod hf;
pub mod http_client;
pub mod notify;
pub mod sync;
