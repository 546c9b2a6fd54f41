//! Webhook notifications (`[[notify.webhook]]`) against a local receiver
//! that fails first attempts, answers slowly or too late, holds an answer,
//! and goes down: with the real binary on SQLite killed with SIGKILL and
//! restarted, every matching event arrives, in order, none missing, no
//! other event ever, duplicates only where an acknowledgement was lost;
//! signatures verify; a delivery that keeps failing is parked and counted
//! in /metrics; the chat template posts one line; HTTPS is verified; on
//! PostgreSQL only the lease holder delivers, and the next one goes on from
//! the cursor.

mod library;
mod receiver;
mod server;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use receiver::Reply;

use crate::common::process::ServerProcess;

/// The signing secret, handed to the server in [`SECRET_ENV`].
const SECRET: &str = "webhook-test-secret";
const SECRET_ENV: &str = "AGENT_LIFECYCLE_TEST_WEBHOOK_SECRET";

/// How long the tests wait for deliveries.
const WAIT: Duration = Duration::from_secs(60);

/// An answer at once.
fn ok() -> Reply {
    Reply::Status(200, Duration::ZERO)
}

/// One HTTP/1.1 GET of `/metrics`.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// The value of the sample `series` (labels as printed) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Scrapes until `done` holds for the sample `series`.
async fn until_sample(addr: SocketAddr, series: &str, done: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = tokio::task::spawn_blocking(move || scrape(addr))
            .await
            .expect("scrape");
        if sample(&text, series).is_some_and(&done) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} not as expected within {WAIT:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes the server's configuration: SQLite at `db`, one webhook.
fn config(dir: &Path, db: &Path, webhook: &str) -> String {
    let path = dir.join("serve.toml");
    let text = format!("store = \"sqlite://{}\"\n\n{webhook}", db.display());
    std::fs::write(&path, text).expect("write the configuration");
    path.to_str().expect("utf-8 path").to_string()
}

fn start(config: &str) -> ServerProcess {
    ServerProcess::start_with_env(
        &[
            "--log",
            "warn",
            "--config",
            config,
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[(SECRET_ENV, SECRET)],
    )
}
