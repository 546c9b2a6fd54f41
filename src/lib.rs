//! agent-lifecycle: a control plane that owns the lifecycle of AI agents.
//!
//! # Layout
//! Dependencies point one way: `domain <- store <- service <- sync <- grpc <- server`.
//!
//! - [`domain`]: states, categories, the transition policy, agents,
//!   transition records, events. Pure and synchronous.
//! - [`store`]: the durable record (`Store` trait; in-memory, SQLite and
//!   PostgreSQL back ends). Knows nothing of gRPC.
//! - [`service`]: the library API ([`AgentLifecycleService`],
//!   [`AgentLifecycleManager`]), the commit thread (group commit), the event
//!   bus, transition hooks, event streams, the metrics registry. Usable
//!   without any network.
//! - [`grpc`]: the tonic edge: generated code, conversions, the handlers, the
//!   layer around every call, and the one place that maps errors to `Status`.
//! - [`sync`]: external status sync (Hugging Face Spaces, Kubernetes,
//!   Docker), driving the service through its public API; [`hf`]: the
//!   poller that feeds it the runtime stage of each labelled Space;
//!   [`health`]: heartbeats and the health monitor (timeouts, restarts).
//! - [`server`]: wiring: health, reflection, limits, tracing, shutdown.
//! - [`config`]: settings for `serve`.
//! - [`process`]: the server binary as a child process, for the benchmark
//!   tool and the test suite. Outside the dependency chain above.
//! - `cli` (binary only): the terminal client and the benchmark tool.

#![forbid(unsafe_code)]

pub mod analytics;
pub mod auth;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod health;
pub mod hf;
pub mod http;
pub mod process;
pub mod server;
pub mod service;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod tls;

pub use error::{Error, Result};
pub use service::{AgentLifecycleManager, AgentLifecycleService};

/// Port of the default listen address.
pub const DEFAULT_PORT: u16 = 50051;
