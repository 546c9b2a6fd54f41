//! A webhook receiver for the tests, on 127.0.0.1: records every request
//! it is sent (sequence, delivery id, body, whether the signature
//! verifies, what it answered) and answers as the test's script says: an
//! error status, a slow answer, an answer held until the test releases it.
//! It can go down (its port refuses connections, open ones are cut) and
//! come back up on the same port.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_lifecycle::automation::notify::sign;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

/// One request, as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `x-agent-lifecycle-sequence`.
    pub sequence: u64,
    /// `x-agent-lifecycle-delivery`.
    pub delivery: String,
    /// `x-agent-lifecycle-webhook`.
    pub webhook: String,
    /// `x-agent-lifecycle-attempt`.
    pub attempt: u32,
    /// The body, parsed.
    pub body: serde_json::Value,
    /// The signature header, if any.
    pub signature: Option<String>,
    /// Whether the signature verifies with the receiver's secret (false
    /// without a secret or a header).
    pub verified: bool,
    /// The status the receiver answered (or will answer, once released).
    pub status: u16,
    /// The answer was delayed past the sender's timeout: the sender never
    /// saw it.
    pub late: bool,
    /// The answer was held until the test released it.
    pub held: bool,
    /// The `content-type` header.
    pub content_type: Option<String>,
}

impl Seen {
    /// Whether the receiver acknowledged it.
    pub fn acknowledged(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// How to answer one request.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    /// This status, after this delay.
    Status(u16, Duration),
    /// 200, once the test calls [`Receiver::release`].
    Hold,
}

/// Decides the reply to a request, given how many requests for its
/// sequence came before it.
pub type Script = Box<dyn FnMut(&Seen, usize) -> Reply + Send>;

struct State {
    seen: Vec<Seen>,
    script: Script,
}

struct Shared {
    state: Mutex<State>,
    /// HTTPS with this certificate; none: plain HTTP.
    tls: Option<tokio_rustls::TlsAcceptor>,
    secret: Option<String>,
    /// The sender's timeout: a delay at least this long is late.
    timeout: Duration,
    /// Bumped on every request, for waiters.
    changed: tokio::sync::watch::Sender<u64>,
    release: Notify,
}

/// The receiver.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Receiver {
    /// A receiver on a fresh port, verifying signatures with `secret`,
    /// judging delays against the sender's `timeout`.
    pub async fn start(secret: Option<&str>, timeout: Duration, script: Script) -> Receiver {
        Self::start_on(None, secret, timeout, script).await
    }

    /// [`Receiver::start`] over HTTPS with `tls` (none: plain HTTP).
    pub async fn start_on(
        tls: Option<tokio_rustls::TlsAcceptor>,
        secret: Option<&str>,
        timeout: Duration,
        script: Script,
    ) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                seen: Vec::new(),
                script,
            }),
            tls,
            secret: secret.map(str::to_string),
            timeout,
            changed: tokio::sync::watch::channel(0).0,
            release: Notify::new(),
        });
        let accept = tokio::spawn(accept(listener, Arc::clone(&shared)));
        Receiver {
            addr,
            shared,
            accept: Mutex::new(Some(accept)),
        }
    }

    /// `http://127.0.0.1:PORT/hooks/lifecycle` (`https://` over TLS).
    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/hooks/lifecycle", self.addr)
    }

    /// Everything seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.state.lock().expect("state").seen.clone()
    }

    /// Replaces the script.
    pub fn script(&self, script: Script) {
        self.shared.state.lock().expect("state").script = script;
    }

    /// Lets a held request be answered.
    pub fn release(&self) {
        self.shared.release.notify_one();
    }

    /// Stops listening and cuts every open connection: connections are
    /// refused until [`Receiver::up`].
    pub async fn down(&self) {
        let task = self.accept.lock().expect("accept").take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again, on the same port.
    pub async fn up(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(err) if tokio::time::Instant::now() < deadline => {
                    eprintln!("rebinding {}: {err}; retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("cannot listen on {} again: {err}", self.addr),
            }
        };
        let task = tokio::spawn(accept(listener, Arc::clone(&self.shared)));
        *self.accept.lock().expect("accept") = Some(task);
    }

    /// Waits (up to `limit`) until `done` holds for what was seen.
    pub async fn until(&self, what: &str, limit: Duration, done: impl Fn(&[Seen]) -> bool) {
        let mut changed = self.shared.changed.subscribe();
        let waited = tokio::time::timeout(limit, async {
            loop {
                if done(&self.shared.state.lock().expect("state").seen) {
                    return;
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() {
            let seen: Vec<(u64, u16)> =
                self.seen().iter().map(|s| (s.sequence, s.status)).collect();
            panic!("{what}: not within {limit:?}; seen (sequence, status): {seen:?}");
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Ok(mut accept) = self.accept.lock()
            && let Some(task) = accept.take()
        {
            task.abort();
        }
    }
}

/// Accepts connections until aborted; aborting it cuts every connection
/// it serves.
async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let tls = shared.tls.clone();
            let service = service_fn(move |request| answer(Arc::clone(&shared), request));
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                // A client that does not trust the certificate ends here.
                Some(tls) => {
                    if let Ok(stream) = tls.accept(socket).await {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
                None => {
                    let _ = http.serve_connection(TokioIo::new(socket), service).await;
                }
            }
        });
        // Reap finished connections.
        while connections.try_join_next().is_some() {}
    }
}

/// Records one request and answers it as scripted.
async fn answer(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let sequence = header("x-agent-lifecycle-sequence").and_then(|v| v.parse().ok());
    let delivery = header("x-agent-lifecycle-delivery").unwrap_or_default();
    let webhook = header("x-agent-lifecycle-webhook").unwrap_or_default();
    let attempt = header("x-agent-lifecycle-attempt")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let signature = header(sign::SIGNATURE_HEADER);
    let content_type = header("content-type");
    let raw = request.into_body().collect().await?.to_bytes();
    let verified = verifies(shared.secret.as_deref(), signature.as_deref(), &raw);
    let mut seen = Seen {
        sequence: sequence.unwrap_or(0),
        delivery,
        webhook,
        attempt,
        body: serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null),
        signature,
        verified,
        status: 0,
        late: false,
        held: false,
        content_type,
    };
    let reply = {
        let mut state = shared.state.lock().expect("state");
        let before = state
            .seen
            .iter()
            .filter(|s| s.sequence == seen.sequence)
            .count();
        let reply = (state.script)(&seen, before);
        match reply {
            Reply::Status(status, delay) => {
                seen.status = status;
                seen.late = delay >= shared.timeout;
            }
            Reply::Hold => {
                seen.status = 200;
                seen.held = true;
            }
        }
        state.seen.push(seen.clone());
        reply
    };
    shared.changed.send_modify(|n| *n += 1);
    match reply {
        Reply::Status(_, delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
        Reply::Status(..) => {}
        Reply::Hold => shared.release.notified().await,
    }
    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
    *response.status_mut() =
        hyper::StatusCode::from_u16(seen.status).unwrap_or(hyper::StatusCode::OK);
    Ok(response)
}

/// Whether `signature` verifies `body` with `secret` now.
fn verifies(secret: Option<&str>, signature: Option<&str>, body: &[u8]) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match (secret, signature) {
        (Some(secret), Some(header)) => sign::verify(
            secret.as_bytes(),
            header,
            body,
            now,
            sign::DEFAULT_TOLERANCE,
        )
        .is_ok(),
        _ => false,
    }
}
