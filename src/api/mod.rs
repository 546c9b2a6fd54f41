//! The edges: everything a client talks to.
//!
//! - [`grpc`]: the tonic service, the layer around every call, and the one
//!   mapping from [`crate::Error`] to `tonic::Status`.
//! - [`http`]: the plain HTTP listener (`/metrics`, `/healthz`, the
//!   dashboard and its JSON).
//! - [`auth`]: principals, bearer tokens and client certificates.
//! - [`tls`]: certificates and keys read from PEM files.
//!
//! Depends on `automation` and everything below it; nothing below names
//! tonic, prost or `pb`.

pub mod auth;
pub mod grpc;
pub mod http;
pub mod tls;
