//! The webhook deliverers' metrics, part of the one registry
//! ([`super::Metrics::webhooks`]):
//!
//! - `agent_lifecycle_webhook_deliveries_total{webhook, outcome}`: events
//!   handed to a receiver, by how it ended: `delivered` (acknowledged with
//!   a 2xx) or `parked` (its tries ran out; the webhook went on);
//! - `agent_lifecycle_webhook_failures_total{webhook}`: attempts that
//!   failed (an answer other than 2xx, a timeout, a connection failure);
//! - `agent_lifecycle_webhook_lag_events{webhook}`: events committed after
//!   the last one the webhook has handled (delivered, parked or passed over
//!   by its filter);
//! - `agent_lifecycle_webhook_lag_seconds{webhook}`: how long the oldest
//!   event the webhook has not yet delivered has waited since its commit
//!   (0 when it is caught up).
//!
//! Both lags are computed when the registry is gathered (a scrape), from
//! what the deliverer last reported and the head sequence, so they grow
//! while a deliverer is stuck retrying. Only the process that delivers for
//! a webhook (holds its lease) reports its lags.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use prometheus::{
    GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// Where one webhook's deliverer stands.
#[derive(Clone, Copy, Debug)]
struct Progress {
    /// The sequence up to which it has handled the log.
    handled: u64,
    /// The commit time of the event it is delivering, if any.
    pending_since: Option<SystemTime>,
}

/// The deliverers' reports, by webhook name. A `std` mutex: held for a map
/// update or a gather, never across an await.
type Reports = Arc<Mutex<BTreeMap<String, Progress>>>;

/// The webhook metrics (see the module doc).
#[derive(Clone, Debug)]
pub struct WebhookMetrics {
    deliveries: IntCounterVec,
    failures: IntCounterVec,
    reports: Reports,
}

/// The two lag gauges, set from the reports each time they are gathered.
struct Lag {
    reports: Reports,
    /// `agent_lifecycle_head_sequence`, shared with the service's metrics.
    head: IntGauge,
    events: IntGaugeVec,
    seconds: GaugeVec,
}

impl Collector for Lag {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.events.desc();
        descs.extend(self.seconds.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let head = u64::try_from(self.head.get()).unwrap_or(0);
        let now = SystemTime::now();
        self.events.reset();
        self.seconds.reset();
        if let Ok(reports) = self.reports.lock() {
            for (webhook, progress) in reports.iter() {
                let behind = head.saturating_sub(progress.handled);
                self.events
                    .with_label_values(&[webhook.as_str()])
                    .set(i64::try_from(behind).unwrap_or(i64::MAX));
                let waited = progress
                    .pending_since
                    .and_then(|since| now.duration_since(since).ok())
                    .map_or(0.0, |waited| waited.as_secs_f64());
                self.seconds
                    .with_label_values(&[webhook.as_str()])
                    .set(waited);
            }
        }
        let mut families = self.events.collect();
        families.extend(self.seconds.collect());
        families
    }
}

impl WebhookMetrics {
    /// The webhook metrics, registered in `registry`; `head` is the
    /// service's head sequence gauge.
    pub(super) fn register(registry: &Registry, head: IntGauge) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("valid counter definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric names are constant and registered once");
            metric
        };
        let deliveries = counter(
            "agent_lifecycle_webhook_deliveries_total",
            "Events handed to a webhook's receiver, by outcome: delivered (acknowledged with a 2xx), parked (its tries ran out).",
            &["webhook", "outcome"],
        );
        let failures = counter(
            "agent_lifecycle_webhook_failures_total",
            "Webhook delivery attempts that failed (an answer other than 2xx, a timeout, a connection failure).",
            &["webhook"],
        );
        let reports = Reports::default();
        let lag = Lag {
            reports: Arc::clone(&reports),
            head,
            events: IntGaugeVec::new(
                Opts::new(
                    "agent_lifecycle_webhook_lag_events",
                    "Events committed after the last one a webhook has handled (delivered, parked or filtered out).",
                ),
                &["webhook"],
            )
            .expect("valid gauge definition"),
            seconds: GaugeVec::new(
                Opts::new(
                    "agent_lifecycle_webhook_lag_seconds",
                    "Seconds since the commit of the oldest event a webhook has not yet delivered (0 when caught up).",
                ),
                &["webhook"],
            )
            .expect("valid gauge definition"),
        };
        registry
            .register(Box::new(lag))
            .expect("metric names are constant and registered once");
        WebhookMetrics {
            deliveries,
            failures,
            reports,
        }
    }

    /// Counts an event delivered to `webhook` (`outcome` `delivered`) or
    /// parked (`parked`).
    pub fn delivery(&self, webhook: &str, outcome: &str) {
        self.deliveries.with_label_values(&[webhook, outcome]).inc();
    }

    /// Counts a failed attempt of `webhook`.
    pub fn failure(&self, webhook: &str) {
        self.failures.with_label_values(&[webhook]).inc();
    }

    /// Events of `webhook` that ended with `outcome`.
    pub fn deliveries(&self, webhook: &str, outcome: &str) -> u64 {
        self.deliveries.with_label_values(&[webhook, outcome]).get()
    }

    /// Failed attempts of `webhook`.
    pub fn failures(&self, webhook: &str) -> u64 {
        self.failures.with_label_values(&[webhook]).get()
    }

    /// Reports that `webhook` has handled the log up to `handled` and is
    /// delivering an event committed at `pending_since` (none: it waits for
    /// the next event).
    pub fn progress(&self, webhook: &str, handled: u64, pending_since: Option<SystemTime>) {
        if let Ok(mut reports) = self.reports.lock() {
            reports.insert(
                webhook.to_string(),
                Progress {
                    handled,
                    pending_since,
                },
            );
        }
    }

    /// Reports that this process no longer delivers for `webhook` (it lost
    /// the lease, or stopped): its lags are no longer exported here.
    pub fn stopped(&self, webhook: &str) {
        if let Ok(mut reports) = self.reports.lock() {
            reports.remove(webhook);
        }
    }
}
