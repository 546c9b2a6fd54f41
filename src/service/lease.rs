//! Background work that runs in one process at a time.
//!
//! Compaction (and later the health monitor and the external status
//! pollers) must run once for a fleet of server processes on one shared
//! store. Each such task holds a [`Lease`] from the store: a PostgreSQL
//! advisory lock on a connection of its own, released by PostgreSQL when the
//! holding process dies; a store only this process writes always grants it.
//! [`LeaseHolder::held`] is asked before every round: it takes the lease
//! when free and checks that a held one is still alive.

use std::sync::Arc;

use tracing::{debug, info, warn};

use super::metrics::Metrics;
use crate::store::{Lease, Store};

/// One named lease, taken and checked on demand.
pub(crate) struct LeaseHolder {
    store: Arc<dyn Store>,
    name: Arc<str>,
    lease: Option<Box<dyn Lease>>,
    metrics: Metrics,
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        drop(InTransit(self.lease.take()));
    }
}

/// A lease on its way between threads. A lease may own a blocking database
/// connection, which must not be closed on an async worker (a task holding
/// one may be dropped there, and so may the output of a blocking task that
/// nobody awaits any more): dropped anywhere, this releases the lease on a
/// thread of its own.
struct InTransit(Option<Box<dyn Lease>>);

impl Drop for InTransit {
    fn drop(&mut self) {
        if let Some(lease) = self.0.take() {
            let released = std::thread::Builder::new()
                .name("lease-release".into())
                .spawn(move || drop(lease));
            if let Err(err) = released {
                warn!(error = %err, "cannot release a lease on its own thread");
            }
        }
    }
}

impl LeaseHolder {
    pub(crate) fn new(store: Arc<dyn Store>, name: &str, metrics: Metrics) -> Self {
        LeaseHolder {
            store,
            name: Arc::from(name),
            lease: None,
            metrics,
        }
    }

    /// Whether this process holds the lease now: takes it if it is free,
    /// and lets go of one whose connection died.
    pub(crate) async fn held(&mut self) -> bool {
        let store = Arc::clone(&self.store);
        let name = Arc::clone(&self.name);
        let mut current = InTransit(self.lease.take());
        let checked = tokio::task::spawn_blocking(move || match current.0.take() {
            Some(mut lease) => {
                if lease.is_held() {
                    Ok(InTransit(Some(lease)))
                } else {
                    warn!(lease = %name, "lost a lease (its connection ended)");
                    Ok(InTransit(None))
                }
            }
            None => store.try_lease(&name).map(InTransit),
        })
        .await;
        let name = &*self.name;
        let was_held = self.metrics.lease_held(name);
        self.lease = match checked {
            Ok(Ok(mut lease)) => lease.0.take(),
            Ok(Err(err)) => {
                warn!(lease = name, error = %crate::error::chain(&err), "cannot take a lease; retrying later");
                None
            }
            Err(err) => {
                warn!(lease = name, error = %err, "lease check failed; retrying later");
                None
            }
        };
        let held = self.lease.is_some();
        if !held {
            debug!(lease = name, "lease held by another process");
        }
        if held != was_held {
            info!(lease = name, held, "background work lease changed hands");
        }
        self.metrics.set_lease_held(name, held);
        held
    }
}
