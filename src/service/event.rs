//! The events the service publishes: a committed change as the event bus
//! carries it to every watcher.

use std::{ops::Deref, sync::OnceLock};

use crate::domain::LifecycleEvent;

/// A published [`LifecycleEvent`], shared by every watcher that receives
/// it, with a slot where the edge that sends it keeps its wire encoding:
/// fan-out to N watchers encodes once, not N times. The service never reads
/// the slot; its format is the edge's.
#[derive(Debug)]
pub struct PublishedEvent {
    event: LifecycleEvent,
    encoding: OnceLock<Vec<u8>>,
}

impl PublishedEvent {
    /// `event`, with an empty encoding slot.
    pub fn new(event: LifecycleEvent) -> Self {
        PublishedEvent {
            event,
            encoding: OnceLock::new(),
        }
    }

    /// The edge's encoding of this event, filled by the first stream that
    /// sends it.
    pub fn encoding(&self) -> &OnceLock<Vec<u8>> {
        &self.encoding
    }
}

impl Deref for PublishedEvent {
    type Target = LifecycleEvent;

    fn deref(&self) -> &LifecycleEvent {
        &self.event
    }
}

impl PartialEq for PublishedEvent {
    fn eq(&self, other: &Self) -> bool {
        self.event == other.event
    }
}
