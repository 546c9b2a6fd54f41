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
    name: &'static str,
    lease: Option<Box<dyn Lease>>,
    metrics: Metrics,
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        // A lease may own a blocking database connection, which must not be
        // closed on an async worker (the holder's task may be dropped on
        // one): let it go on a thread of its own.
        if let Some(lease) = self.lease.take() {
            let dropped = std::thread::Builder::new()
                .name("lease-release".into())
                .spawn(move || drop(lease));
            if let Err(err) = dropped {
                warn!(lease = self.name, error = %err, "cannot release a lease on its own thread; it ends with the process");
            }
        }
    }
}

impl LeaseHolder {
    pub(crate) fn new(store: Arc<dyn Store>, name: &'static str, metrics: Metrics) -> Self {
        LeaseHolder {
            store,
            name,
            lease: None,
            metrics,
        }
    }

    /// Whether this process holds the lease now: takes it if it is free,
    /// and lets go of one whose connection died.
    pub(crate) async fn held(&mut self) -> bool {
        let store = Arc::clone(&self.store);
        let name = self.name;
        let current = self.lease.take();
        let checked = tokio::task::spawn_blocking(move || match current {
            Some(mut lease) => {
                if lease.is_held() {
                    Ok(Some(lease))
                } else {
                    warn!(lease = name, "lost a lease (its connection ended)");
                    Ok(None)
                }
            }
            None => store.try_lease(name),
        })
        .await;
        let was_held = self.metrics.lease_held(self.name);
        self.lease = match checked {
            Ok(Ok(lease)) => lease,
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
        self.metrics.set_lease_held(self.name, held);
        held
    }
}
