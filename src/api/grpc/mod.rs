//! The tonic edge: the generated code, conversions between wire and domain
//! types, the handler, the served lifecycle service, the layer around
//! every call, and the one mapping from [`crate::Error`] to `tonic::Status`.
//! Nothing below this module names tonic, prost or `pb`.
//!
//! - [`codec`]: prost with buffers sized for this API's messages.
//! - [`convert`]: wire <-> domain values, page tokens.
//! - `mutation`: what every mutating request and response shares.
//! - `handler`: the RPCs, a file per kind (mutate, query, watch,
//!   heartbeat), and [`LifecycleServer`], the lifecycle service as served,
//!   with WatchEvents encoded once per event.
//! - [`rate_limit`]: rate limits and WatchEvents stream caps.
//! - `layer`: [`CallLayer`], around everything served: caller, span,
//!   per-call record.
//! - `status`: `crate::Error` -> `Status`, with google.rpc details.

/// Largest request message the server decodes.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Largest response message the server sends (a ListAgents page of 1000
/// agents with large metadata stays well below it).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

mod access;
pub mod codec;
pub mod convert;
mod handler;
mod layer;
mod mutation;
pub mod observe;
pub mod rate_limit;
mod status;

/// Generated protobuf and gRPC code for `agentlifecycle.v1`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("agentlifecycle.v1");

    /// The encoded descriptor set of `proto/`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("agentlifecycle_descriptor");
}

pub use handler::LifecycleServer;
pub use layer::{CallLayer, CallObserver, CallRecord, IgnoreCalls};
