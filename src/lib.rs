//! agent-lifecycle: a control plane that owns the lifecycle of AI agents.
//!
//! # Layout
//! Dependencies point one way, down:
//! `domain <- store <- service <- automation <- api <- app`, and the binary's
//! `cli` on top; [`client`] stands beside them on the wire types alone.
//!
//! - [`domain`]: states, categories, the transition policy, agents,
//!   transition records, events. Pure and synchronous.
//! - [`store`]: the durable record (the [`store::Store`] trait; in-memory,
//!   SQLite and PostgreSQL back ends). Knows nothing of callers or gRPC.
//! - [`service`]: the library API ([`AgentLifecycleService`],
//!   [`AgentLifecycleManager`]): the write path, the commit thread (group
//!   commit), the event log and its followers, event streams, transition
//!   hooks, the metrics registry. Usable without any network.
//! - [`automation`]: what drives the service through its public API on its
//!   own timers: the health monitor, external status sync, the Hugging Face
//!   poller, the platform drivers, analytics.
//! - [`api`]: the edges: the gRPC service ([`pb`] is its generated code),
//!   the HTTP listener, authentication, TLS material.
//! - [`app`]: wiring: configuration, `server::run`, telemetry.
//! - [`client`]: a client of the server for Rust programs (the CLI uses
//!   it): a watch that resumes by itself, changes retried safely, typed
//!   errors. Depends on the wire types ([`pb`]) and the domain's states.
//!
//! The terminal client, `serve` and the benchmark tool live in the binary
//! (`src/main.rs`, `src/cli/`), outside the library.

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod automation;
pub mod client;
pub mod domain;
mod error;
pub mod service;
pub mod store;

pub use api::grpc::pb;
pub use error::{Error, Result, chain};
pub use service::{AgentLifecycleManager, AgentLifecycleService};

/// Port of the default listen address.
pub const DEFAULT_PORT: u16 = 50051;
