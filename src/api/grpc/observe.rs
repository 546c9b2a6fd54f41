//! Per-call metrics of the gRPC edge, in the service's registry: every
//! call's duration by method and status code, and refused calls by reason
//! (the audit counters).

use std::sync::{Arc, OnceLock};

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tonic::Code;

use super::layer::{CallObserver, CallRecord};

/// Upper bounds of the call duration histogram, in seconds.
const CALL_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// The methods served (anything else is counted as `unknown`, so a client
/// cannot grow the label set).
const METHODS: &[&str] = &[
    "RegisterAgent",
    "TransitionAgent",
    "DeployAgent",
    "StartAgent",
    "StopAgent",
    "AssignTask",
    "CompleteTask",
    "HandleError",
    "PutInMaintenance",
    "ResumeFromMaintenance",
    "GetAgent",
    "ListAgents",
    "GetAgentHistory",
    "ListTransitions",
    "GetAgentAnalytics",
    "GetFleetAnalytics",
    "GetLifecycleMetrics",
    "GetTransitionRules",
    "SyncExternalStatus",
    "Heartbeat",
    "HeartbeatStream",
    "WatchEvents",
    "Check",
    "Watch",
    "ServerReflectionInfo",
];

/// Why a call was refused, by its status code; `None` for codes that are
/// not a refusal of the caller (success, server failures).
pub fn refusal_reason(code: Code) -> Option<&'static str> {
    Some(match code {
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "rate_limited",
        Code::FailedPrecondition => "invalid_transition",
        Code::Aborted => "version_conflict",
        Code::InvalidArgument => "invalid_argument",
        Code::AlreadyExists => "already_exists",
        Code::OutOfRange => "out_of_range",
        _ => return None,
    })
}

/// Records every call in the registry.
#[derive(Clone, Debug)]
pub struct RpcMetrics {
    calls: HistogramVec,
    /// The `calls` series of each method (by its index in `METHODS`, then
    /// `unknown`) with code OK, the one nearly every call observes: made on
    /// its first call, so that no series is shown before it has one.
    ok: Arc<[OnceLock<Histogram>]>,
    refused: IntCounterVec,
}

impl RpcMetrics {
    /// Registers the edge's metrics in `registry`.
    ///
    /// # Errors
    /// They are registered already.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let calls = HistogramVec::new(
            HistogramOpts::new(
                "agent_lifecycle_rpc_duration_seconds",
                "Time from a call's arrival to its response headers, by method and status code \
                 (OK: the status followed in the trailers).",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["method", "code"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "agent_lifecycle_refused_total",
                "Calls refused, by reason: unauthenticated, permission_denied, rate_limited, \
                 invalid_transition, version_conflict, invalid_argument, already_exists, \
                 out_of_range.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        let ok = (0..=METHODS.len()).map(|_| OnceLock::new()).collect();
        Ok(RpcMetrics { calls, ok, refused })
    }

    /// Calls refused for `reason` so far.
    pub fn refused(&self, reason: &str) -> u64 {
        self.refused.with_label_values(&[reason]).get()
    }
}

impl CallObserver for RpcMetrics {
    fn observe(&self, call: &CallRecord<'_>) {
        let name = call.method.rsplit('/').next().unwrap_or("");
        let index = METHODS
            .iter()
            .position(|m| *m == name)
            .unwrap_or(METHODS.len());
        let method = METHODS.get(index).copied().unwrap_or("unknown");
        let code = call.code.unwrap_or(Code::Ok);
        let seconds = call.duration.as_secs_f64();
        match self.ok.get(index) {
            Some(ok) if code == Code::Ok => ok
                .get_or_init(|| self.calls.with_label_values(&[method, code_name(code)]))
                .observe(seconds),
            _ => self
                .calls
                .with_label_values(&[method, code_name(code)])
                .observe(seconds),
        }
        if let Some(reason) = refusal_reason(code) {
            self.refused.with_label_values(&[reason]).inc();
        }
    }
}

/// `agent_lifecycle_refused_total` by reason, as `registry` holds it now
/// (reasons never counted are absent).
pub fn refused_counts(registry: &Registry) -> std::collections::HashMap<String, u64> {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == "agent_lifecycle_refused_total")
        .flat_map(|family| family.get_metric())
        .filter_map(|metric| {
            let reason = metric
                .get_label()
                .iter()
                .find(|l| l.name() == "reason")?
                .value()
                .to_string();
            Some((reason, metric.get_counter().get_value() as u64))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The canonical name of a status code, as Prometheus labels carry it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
