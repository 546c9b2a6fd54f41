//! A TCP proxy between a client and a server, for tests of what a client
//! does when the network fails: it can cut every open connection, lose the
//! next reply (forward a request, then close instead of answering), and be
//! pointed at another server (one restarted on a new port).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    /// Set: the next response a server sends closes its connection
    /// instead.
    lose_reply: bool,
}

/// A running proxy; stops with the test's runtime.
#[derive(Clone)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    /// Bumped to cut every open connection.
    cuts: watch::Sender<u64>,
}

impl Proxy {
    /// A proxy on 127.0.0.1:0 to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cuts, _) = watch::channel(0);
        let proxy = Proxy {
            addr,
            shared: Arc::new(Mutex::new(Shared {
                target,
                lose_reply: false,
            })),
            cuts,
        };
        let accepting = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let proxy = accepting.clone();
                tokio::spawn(async move { proxy.relay(client).await });
            }
        });
        proxy
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// New connections go to `target`.
    pub fn retarget(&self, target: SocketAddr) {
        self.shared.lock().expect("proxy").target = target;
    }

    /// Closes every open connection.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// The next reply a server sends (its HTTP/2 HEADERS frame: a gRPC
    /// server answers a unary call once the handler is done) closes the
    /// connection instead of going through: the request was delivered and
    /// handled, its reply is lost.
    pub fn lose_next_reply(&self) {
        self.shared.lock().expect("proxy").lose_reply = true;
    }

    async fn relay(&self, mut client: TcpStream) {
        let target = self.shared.lock().expect("proxy").target;
        let Ok(mut server) = TcpStream::connect(target).await else {
            return;
        };
        let mut cut = self.cuts.subscribe();
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let mut up = [0u8; 16 * 1024];
        let mut down = [0u8; 16 * 1024];
        // Server-to-client bytes not yet forwarded: whole HTTP/2 frames go
        // through one by one, so a response can be told apart.
        let mut frames: Vec<u8> = Vec::new();
        loop {
            tokio::select! {
                _ = cut.changed() => return,
                read = client_read.read(&mut up) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => if server_write.write_all(&up[..n]).await.is_err() { return },
                },
                read = server_read.read(&mut down) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        frames.extend_from_slice(&down[..n]);
                        while let Some(frame) = next_frame(&mut frames) {
                            if is_response(&frame) && self.take_lose_reply() {
                                return;
                            }
                            if client_write.write_all(&frame).await.is_err() {
                                return;
                            }
                        }
                    }
                },
            }
        }
    }

    /// Whether a reply is still to be lost.
    pub fn losing(&self) -> bool {
        self.shared.lock().expect("proxy").lose_reply
    }

    fn take_lose_reply(&self) -> bool {
        std::mem::take(&mut self.shared.lock().expect("proxy").lose_reply)
    }
}

/// The first whole HTTP/2 frame of `bytes` (a 9-byte header: 24-bit
/// length, type, flags, stream id), taken out of it.
fn next_frame(bytes: &mut Vec<u8>) -> Option<Vec<u8>> {
    if bytes.len() < 9 {
        return None;
    }
    let length =
        (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
    if bytes.len() < 9 + length {
        return None;
    }
    Some(bytes.drain(..9 + length).collect())
}

/// A HEADERS frame (type 1) on a stream: the start of a response.
fn is_response(frame: &[u8]) -> bool {
    let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
    frame[3] == 1 && stream != 0
}
