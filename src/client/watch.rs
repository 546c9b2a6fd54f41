//! A watch that resumes by itself.
//!
//! A connection that fails, or stays silent past `idle_timeout` (the
//! server sends progress messages on idle streams), is replaced.
//! The stream remembers the sequence after the last event it yielded (and
//! after the head that a progress message or the snapshot's end vouches
//! for). When the connection fails, or the server ends the stream (it shuts
//! down), it opens a new one from there, on the next server when there are
//! several, after a doubling back-off; events are never yielded twice nor
//! left out. A watch "from now" first reads the head, so that even a
//! failure before its first event loses nothing. A snapshot cut before its
//! end is sent again whole. Compacted events end the stream with
//! [`ClientError::Compacted`]; a refusal that trying again cannot cure
//! (a bad filter, no permission) ends it with that error.

use std::{pin::Pin, time::Duration};

use futures_util::Stream;
use tonic::{Code, Status, codec::Streaming};
use tonic_types::StatusExt;

use super::{Client, ClientError};
use crate::api::grpc::pb;

/// What to watch and from where.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// The filters (`agent_ids`, `states`, `event_types`, `labels`), and
    /// where to start: `start_sequence` (0: from now) or
    /// `include_snapshot`.
    pub request: pb::WatchEventsRequest,
    /// The first wait before reconnecting.
    pub initial_backoff: Duration,
    /// The longest wait before reconnecting.
    pub max_backoff: Duration,
    /// A stream silent for this long (not even a progress message, which
    /// the server sends on idle streams) counts as broken.
    pub idle_timeout: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            request: pb::WatchEventsRequest::default(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl WatchOptions {
    /// Every event from `sequence` on.
    pub fn from_sequence(sequence: u64) -> Self {
        let mut options = WatchOptions::default();
        options.request.start_sequence = sequence;
        options
    }

    /// The current agents first, then every event after them.
    pub fn snapshot() -> Self {
        let mut options = WatchOptions::default();
        options.request.include_snapshot = true;
        options
    }
}

/// One item of a watch.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchItem {
    /// A committed event.
    Event(Box<pb::LifecycleEvent>),
    /// An agent of the snapshot.
    SnapshotAgent(Box<pb::Agent>),
    /// The snapshot is complete as of this head; events after it follow.
    SnapshotComplete {
        /// The snapshot's head sequence.
        head_sequence: u64,
    },
    /// Every matching event up to this head has been yielded.
    Progress {
        /// The server's head sequence.
        head_sequence: u64,
    },
}

/// The stream [`Client::watch`] returns.
pub type Watch = Pin<Box<dyn Stream<Item = Result<WatchItem, ClientError>> + Send>>;

impl Client {
    /// Events matching `options`, resuming by itself after failures.
    pub fn watch(&self, options: WatchOptions) -> Watch {
        let snapshot = options.request.include_snapshot;
        let state = Resume {
            client: self.clone(),
            next: options.request.start_sequence,
            snapshot_pending: snapshot,
            last: 0,
            stream: None,
            backoff: options.initial_backoff,
            options,
            done: false,
        };
        Box::pin(futures_util::stream::unfold(state, Resume::step))
    }
}

/// A watch's place, across connections.
struct Resume {
    client: Client,
    options: WatchOptions,
    /// The sequence to start from on the next connection (0: not known
    /// yet, the watch is "from now").
    next: u64,
    /// A snapshot was asked for and has not been completed.
    snapshot_pending: bool,
    /// The last event yielded.
    last: u64,
    stream: Option<Streaming<pb::WatchEventsResponse>>,
    backoff: Duration,
    done: bool,
}

/// What to do about a failed call or stream.
enum Failure {
    /// Connect again (after the back-off).
    Retry,
    /// End the watch with this error.
    End(ClientError),
}

fn failure(status: Status) -> Failure {
    match status.code() {
        // A cut connection, a server going away or restarting.
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::DeadlineExceeded => Failure::Retry,
        // Too many watches for now: after RetryInfo's delay.
        Code::ResourceExhausted if status.get_details_retry_info().is_some() => Failure::Retry,
        _ => Failure::End(ClientError::from(status)),
    }
}

impl Resume {
    async fn step(mut self) -> Option<(Result<WatchItem, ClientError>, Self)> {
        loop {
            if self.done {
                return None;
            }
            if self.stream.is_none()
                && let Err(err) = self.open().await
            {
                match err {
                    Failure::Retry => {
                        self.pause().await;
                        continue;
                    }
                    Failure::End(err) => {
                        self.done = true;
                        return Some((Err(err), self));
                    }
                }
            }
            let stream = self.stream.as_mut()?;
            let idle = self.options.idle_timeout;
            let Ok(received) = tokio::time::timeout(idle, stream.message()).await else {
                // Silent for too long: the connection is gone.
                self.stream = None;
                self.pause().await;
                continue;
            };
            let message = match received {
                Ok(Some(message)) => message,
                // The server ended the stream (it is shutting down): resume.
                Ok(None) => {
                    self.stream = None;
                    self.pause().await;
                    continue;
                }
                Err(status) => {
                    self.stream = None;
                    match failure(status) {
                        Failure::Retry => {
                            self.pause().await;
                            continue;
                        }
                        Failure::End(err) => {
                            self.done = true;
                            return Some((Err(err), self));
                        }
                    }
                }
            };
            self.backoff = self.options.initial_backoff;
            if let Some(item) = self.take(message) {
                return Some((Ok(item), self));
            }
        }
    }

    /// Opens a stream from where the watch is.
    async fn open(&mut self) -> Result<(), Failure> {
        let mut request = self.options.request.clone();
        if self.snapshot_pending {
            request.include_snapshot = true;
            request.start_sequence = 0;
        } else {
            if self.next == 0 {
                // "From now": fix now as a sequence, so that a reconnect
                // resumes from it.
                let head = self.client.head_sequence().await.map_err(|err| match err {
                    ClientError::Unavailable(_) => Failure::Retry,
                    err => Failure::End(err),
                })?;
                self.next = head + 1;
            }
            request.include_snapshot = false;
            request.start_sequence = self.next;
        }
        let mut raw = self.client.raw();
        match raw.watch_events(request).await {
            Ok(response) => {
                self.stream = Some(response.into_inner());
                Ok(())
            }
            Err(status) => Err(failure(status)),
        }
    }

    /// Waits before connecting again, on the next server.
    async fn pause(&mut self) {
        self.client.next_server();
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(self.options.max_backoff);
    }

    /// The item of `message`, updating where to resume; `None` for what is
    /// not passed on (an event already yielded, an empty message).
    fn take(&mut self, message: pb::WatchEventsResponse) -> Option<WatchItem> {
        use pb::watch_events_response::Kind;
        match message.kind? {
            Kind::Event(event) => {
                if event.sequence <= self.last {
                    return None;
                }
                self.last = event.sequence;
                self.next = self.next.max(event.sequence + 1);
                Some(WatchItem::Event(Box::new(event)))
            }
            Kind::Progress(progress) => {
                self.next = self.next.max(progress.head_sequence + 1);
                Some(WatchItem::Progress {
                    head_sequence: progress.head_sequence,
                })
            }
            Kind::SnapshotAgent(agent) => Some(WatchItem::SnapshotAgent(Box::new(agent))),
            Kind::SnapshotComplete(done) => {
                self.snapshot_pending = false;
                self.next = self.next.max(done.head_sequence + 1);
                self.last = self.last.max(done.head_sequence);
                Some(WatchItem::SnapshotComplete {
                    head_sequence: done.head_sequence,
                })
            }
        }
    }
}
