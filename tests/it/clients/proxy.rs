//! A TCP proxy between a client library and the server, for the failure
//! scenarios: it can cut every open connection at once (a load balancer
//! dropping streams), move to another upstream (a restarted server on a new
//! port), and lose one reply: forward a request, let the server answer it,
//! and drop the connection at the answer's first HTTP/2 HEADERS frame, so
//! the change is committed but the client never hears of it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf, tcp::OwnedWriteHalf},
    task::JoinHandle,
};

/// HTTP/2 frame type of HEADERS.
const HEADERS: u8 = 0x1;

#[derive(Default)]
struct State {
    upstream: Mutex<Option<SocketAddr>>,
    connections: Mutex<Vec<JoinHandle<()>>>,
    lose_next_reply: AtomicBool,
    lost_replies: AtomicUsize,
}

/// The proxy, listening on 127.0.0.1:0 until dropped.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `upstream`.
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State::default());
        *state.upstream.lock().expect("upstream") =
            Some(upstream.parse().expect("upstream address"));
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Proxy {
            addr,
            state,
            accept,
        }
    }

    /// `HOST:PORT` of the proxy.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// New connections go to `upstream` from now on.
    pub fn set_upstream(&self, upstream: &str) {
        *self.state.upstream.lock().expect("upstream") =
            Some(upstream.parse().expect("upstream address"));
    }

    /// Drops every open connection, both ways.
    pub fn cut(&self) {
        let connections = std::mem::take(&mut *self.state.connections.lock().expect("connections"));
        for connection in connections {
            connection.abort();
        }
    }

    /// The next reply the server starts (its first HEADERS frame on a
    /// stream) is not forwarded: its connection is dropped there.
    pub fn lose_next_reply(&self) {
        self.state.lose_next_reply.store(true, Ordering::SeqCst);
    }

    /// Replies lost so far.
    pub fn lost_replies(&self) -> usize {
        self.state.lost_replies.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self
            .state
            .connections
            .lock()
            .expect("connections")
            .drain(..)
        {
            connection.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    while let Ok((client, _)) = listener.accept().await {
        let upstream = *state.upstream.lock().expect("upstream");
        let task = tokio::spawn(relay(client, upstream, Arc::clone(&state)));
        let mut connections = state.connections.lock().expect("connections");
        connections.retain(|c| !c.is_finished());
        connections.push(task);
    }
}

/// One connection: bytes from the client as they come, frames from the
/// server one by one (so that a reply can be lost at its HEADERS frame).
async fn relay(client: TcpStream, upstream: Option<SocketAddr>, state: Arc<State>) {
    let Some(upstream) = upstream else { return };
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // the server is down: the client sees its connection closed
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = copy(client_read, server_write) => {}
        _ = frames(server_read, client_write, &state) => {}
    }
}

async fn copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buffer[..n]).await?;
    }
}

/// Forwards the server's HTTP/2 frames, ending the connection at the first
/// HEADERS frame of a stream while a lost reply is armed.
async fn frames(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    state: &State,
) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    let mut payload = Vec::new();
    loop {
        from.read_exact(&mut header).await?;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let kind = header[3];
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        payload.resize(length, 0);
        from.read_exact(&mut payload).await?;
        if kind == HEADERS
            && stream != 0
            && state
                .lose_next_reply
                .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            state.lost_replies.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        to.write_all(&header).await?;
        to.write_all(&payload).await?;
    }
}
