//! Wiring: the server process put together from the parts below.
//!
//! - [`config`]: the `--config` file, parsed and checked.
//! - [`server`]: `run(listener, service, shutdown)`: health, reflection,
//!   limits, tracing, the HTTP listener and the automations, started and
//!   stopped together.
//! - [`telemetry`]: logging and OpenTelemetry tracing.

pub mod config;
pub mod server;
pub mod telemetry;
