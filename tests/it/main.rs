//! The integration tests: one binary, a module per area. Each test runs a
//! real server (in this process on 127.0.0.1:0, or the real binary as a
//! child process) and talks to it as a client would.

#[path = "../common/mod.rs"]
mod common;

mod alerts;
mod analytics;
mod api;
mod as_of;
mod auth;
mod bench;
mod cli;
mod client;
mod clients;
mod config;
mod crash;
mod deploy;
mod disk;
mod docker;
mod foreign_clients;
mod health;
mod heartbeat;
mod hf;
mod hostile;
mod k8s;
mod library;
mod limits;
mod logging;
mod metrics_http;
mod notify;
mod otlp;
mod pipelines;
mod postgres;
mod proto;
mod retention;
mod retries;
mod shutdown;
mod sync;
mod timers;
mod watch;
