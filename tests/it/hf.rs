//! The Hugging Face Spaces poller against a local fake of the Space runtime
//! API that a test scripts through stages and errors: agents labelled
//! `hf.space=owner/name` follow their Space, the bearer token is sent,
//! errors back off, 404 means deleted, and a Space that never answers holds
//! up nobody else.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_lifecycle::{
    AgentLifecycleService,
    automation::hf::{self, HfSettings},
    domain::{AgentId, AgentState, Labels},
    service::{Registration, WatchItem, WatchRequest},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;

use crate::common;

/// What the fake answers for one request.
#[derive(Clone, Debug)]
enum Reply {
    Stage(&'static str, Option<&'static str>),
    Status(u16),
    /// Keep the connection open and never answer.
    Hang,
}

#[derive(Default)]
struct Fake {
    /// Per path, the replies still to give; the last one repeats.
    script: HashMap<String, VecDeque<Reply>>,
    /// Every request: path and Authorization header.
    seen: Vec<(String, Option<String>)>,
    /// TLS handshakes the client broke off (it did not trust the
    /// certificate).
    refused: usize,
}

async fn serve_fake(fake: Arc<Mutex<Fake>>) -> String {
    serve_fake_on(fake, None).await
}

/// The fake, over HTTPS with `tls` (its address as an https:// URL), or
/// plain HTTP.
async fn serve_fake_on(fake: Arc<Mutex<Fake>>, tls: Option<TlsAcceptor>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let fake = Arc::clone(&fake);
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(tls) => {
                        // A client that does not trust the certificate
                        // ends here, before any request.
                        match tls.accept(socket).await {
                            Ok(stream) => answer(stream, fake).await,
                            Err(_) => fake.lock().expect("fake").refused += 1,
                        }
                    }
                    None => answer(socket, fake).await,
                }
            });
        }
    });
    format!("{scheme}://{addr}")
}

/// Reads one request from `socket` and answers it as scripted.
async fn answer(mut socket: impl AsyncRead + AsyncWrite + Unpin, fake: Arc<Mutex<Fake>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
    let auth = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("authorization: ")
                .or_else(|| l.strip_prefix("Authorization: "))
        })
        .map(|v| v.trim().to_string());
    let reply = {
        let mut fake = fake.lock().expect("fake");
        fake.seen.push((path.clone(), auth));
        let queue = fake.script.entry(path).or_default();
        let reply = if queue.len() > 1 {
            queue.pop_front()
        } else {
            queue.front().cloned()
        };
        reply.unwrap_or(Reply::Status(404))
    };
    let (status, body) = match reply {
        Reply::Stage(stage, error) => {
            let mut json =
                serde_json::json!({"stage": stage, "hardware": {"current": "cpu-basic"}});
            if let Some(error) = error {
                json["errorMessage"] = error.into();
            }
            (200, json.to_string())
        }
        Reply::Status(code) => (code, String::from("{}")),
        Reply::Hang => {
            // Hold the connection until the test ends.
            let _ = socket.read(&mut buf).await;
            std::future::pending::<()>().await;
            return;
        }
    };
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

async fn register(service: &AgentLifecycleService, space: &str) -> AgentId {
    let mut labels = Labels::new();
    labels.insert(hf::SPACE_LABEL.into(), space.into());
    service
        .register_agent(Registration {
            labels,
            ..Default::default()
        })
        .await
        .expect("register")
        .agent
        .id
}

/// A Space builds, starts, answers 503 once (the poller backs off and asks
/// again), runs, fails with an error message, and is deleted (404): the
/// agent walks the policy through every step, each recorded with
/// triggered_by hf_sync, while another Space never answers at all.
#[tokio::test]
async fn agents_follow_their_space_through_stages_and_errors() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut fake = fake.lock().expect("fake");
        fake.script.insert(
            "/api/spaces/acme/bot/runtime".into(),
            VecDeque::from([
                Reply::Stage("BUILDING", None),
                Reply::Stage("APP_STARTING", None),
                Reply::Status(503),
                Reply::Stage("RUNNING", None),
                Reply::Stage("RUNTIME_ERROR", Some("CUDA out of memory")),
                Reply::Status(404),
            ]),
        );
        fake.script.insert(
            "/api/spaces/slow/space/runtime".into(),
            VecDeque::from([Reply::Hang]),
        );
    }
    let base = serve_fake(Arc::clone(&fake)).await;
    let service = AgentLifecycleService::in_memory().expect("service");
    let bot = register(&service, "acme/bot").await;
    let slow = register(&service, "slow/space").await;
    let mut watcher = service
        .watch(WatchRequest {
            agent_ids: vec![bot],
            ..Default::default()
        })
        .await
        .expect("watch");
    let poller = tokio::spawn(hf::run(
        service.clone(),
        HfSettings {
            base_url: base,
            extra_roots: Vec::new(),
            token: Some("secret".into()),
            interval: Duration::from_millis(40),
            fast_interval: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
            tick: Duration::from_millis(10),
        },
    ));

    use AgentState::*;
    let expected = [
        Deploying, Deployed, Starting, Online, Error, Offline, Deleted,
    ];
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let item = tokio::time::timeout(Duration::from_secs(10), watcher.next())
            .await
            .expect("the agent moves on within 10 s")
            .expect("stream open")
            .expect("no error");
        if let WatchItem::Event(event) = item {
            assert_eq!(event.record.triggered_by, "hf_sync");
            assert_eq!(event.record.metadata["space"], "acme/bot");
            if event.record.to == Error {
                assert_eq!(event.record.metadata["error_message"], "CUDA out of memory");
                assert_eq!(event.record.metadata["status"], "RUNTIME_ERROR");
            }
            seen.push(event.record.to);
        }
    }
    assert_eq!(seen, expected);
    poller.abort();

    let fake = fake.lock().expect("fake");
    assert!(
        fake.seen
            .iter()
            .all(|(_, auth)| auth.as_deref() == Some("Bearer secret")),
        "every request carries the token: {:?}",
        fake.seen
    );
    let slow_requests = fake
        .seen
        .iter()
        .filter(|(p, _)| p.contains("slow/space"))
        .count();
    assert_eq!(
        slow_requests, 1,
        "the hanging Space was asked once and held up nobody"
    );
    assert_eq!(
        service.get_agent(slow).expect("slow agent").state,
        Registered,
        "the silent Space's agent did not move"
    );
}

/// The fake Hub over HTTPS with a certificate from a CA of the test's own.
/// A poller that trusts only the public roots refuses the certificate
/// (no request is sent, the agent stays where it was, and the poller keeps
/// trying); one whose `[hf] ca_file` names the CA follows the Space.
#[tokio::test]
async fn https_to_the_hub_verifies_the_certificate() {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let ca = common::pki::Ca::new("test hub CA");
    let issued = ca.server();
    let certs = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate");
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let fake = Arc::new(Mutex::new(Fake::default()));
    fake.lock().expect("fake").script.insert(
        "/api/spaces/acme/tls/runtime".into(),
        VecDeque::from([Reply::Stage("RUNNING", None)]),
    );
    let base = serve_fake_on(Arc::clone(&fake), Some(TlsAcceptor::from(Arc::new(config)))).await;
    assert!(base.starts_with("https://"));

    let service = AgentLifecycleService::in_memory().expect("service");
    let id = register(&service, "acme/tls").await;
    let fast = |settings: HfSettings| HfSettings {
        interval: Duration::from_millis(40),
        fast_interval: Duration::from_millis(20),
        max_backoff: Duration::from_millis(40),
        tick: Duration::from_millis(10),
        ..settings
    };

    let untrusting = tokio::spawn(hf::run(
        service.clone(),
        fast(HfSettings {
            base_url: base.clone(),
            ..HfSettings::default()
        }),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fake.lock().expect("fake").refused < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the poller tries again after a refused certificate"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    untrusting.abort();
    let _ = untrusting.await;
    assert!(
        fake.lock().expect("fake").seen.is_empty(),
        "no request sent"
    );
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Registered
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path(), "hub-ca");
    let file = agent_lifecycle::app::config::Config::parse(&format!(
        "[hf]\nbase_url = {base:?}\nca_file = {:?}\n",
        ca_file.to_str().expect("utf-8 path")
    ))
    .expect("config");
    let settings = file.hf.expect("[hf]").settings().expect("settings");
    assert_eq!(settings.extra_roots, vec![ca.der()]);
    let mut watcher = service
        .watch(WatchRequest {
            agent_ids: vec![id],
            ..Default::default()
        })
        .await
        .expect("watch");
    let trusting = tokio::spawn(hf::run(service.clone(), fast(settings)));
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), watcher.next())
            .await
            .expect("the agent follows its Space within 10 s")
            .expect("stream open")
            .expect("no error");
        if let WatchItem::Event(event) = item
            && event.record.to == AgentState::Online
        {
            assert_eq!(event.record.triggered_by, "hf_sync");
            break;
        }
    }
    trusting.abort();
    assert!(!fake.lock().expect("fake").seen.is_empty());
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within 10 s"));
}

/// With the Spaces driver running, starting an agent bound to a Space
/// restarts the Space and stopping it pauses it, with the token; a Space the
/// Hub refuses to restart moves its agent to ERROR with the Hub's status in
/// the metadata, and the driver goes on with the next event.
#[tokio::test]
async fn the_driver_restarts_and_pauses_spaces_and_records_refusals() {
    use agent_lifecycle::{
        automation::drivers::{self, DriverSettings, hf::HfDriver},
        service::ChangeRequest,
    };
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().expect("fake");
        for (path, status) in [
            ("/api/spaces/acme/bot/restart", 200),
            ("/api/spaces/acme/bot/pause", 200),
            ("/api/spaces/acme/locked/restart", 403),
            ("/api/spaces/acme/after/restart", 200),
        ] {
            f.script
                .insert(path.into(), VecDeque::from([Reply::Status(status)]));
        }
    }
    let base = serve_fake(Arc::clone(&fake)).await;
    let service = AgentLifecycleService::in_memory().expect("service");
    let driver = HfDriver::new(HfSettings {
        base_url: base,
        token: Some("hf_secret".into()),
        ..HfSettings::default()
    })
    .expect("driver");
    let settings = DriverSettings {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        max_attempts: 3,
        lease_retry: Duration::from_millis(10),
    };
    let runner = tokio::spawn(drivers::run(service.clone(), Arc::new(driver), settings));
    let cursor = || {
        let service = service.clone();
        async move { service.cursor("hf-driver").await.expect("cursor") }
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while cursor().await == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the driver starts");

    let bot = register(&service, "acme/bot").await;
    service
        .deploy_agent(bot, ChangeRequest::default())
        .await
        .expect("deploy");
    service
        .start_agent(bot, ChangeRequest::default())
        .await
        .expect("start");
    service
        .stop_agent(bot, ChangeRequest::default())
        .await
        .expect("stop");
    let asked = |fake: &Arc<Mutex<Fake>>| -> Vec<(String, Option<String>)> {
        fake.lock()
            .expect("fake")
            .seen
            .iter()
            .filter(|(path, _)| !path.ends_with("/runtime"))
            .cloned()
            .collect()
    };
    until("restart and pause", || asked(&fake).len() == 2).await;
    let bearer = Some("Bearer hf_secret".to_string());
    assert_eq!(
        asked(&fake),
        vec![
            ("/api/spaces/acme/bot/restart".to_string(), bearer.clone()),
            ("/api/spaces/acme/bot/pause".to_string(), bearer.clone()),
        ]
    );

    let locked = register(&service, "acme/locked").await;
    let after = register(&service, "acme/after").await;
    for id in [locked, after] {
        service
            .deploy_agent(id, ChangeRequest::default())
            .await
            .expect("deploy");
        service
            .transition(id, AgentState::Starting, ChangeRequest::default())
            .await
            .expect("starting");
    }
    until("the refused Space's agent in ERROR", || {
        service.get_agent(locked).expect("agent").state == AgentState::Error
    })
    .await;
    let record = service
        .get_agent(locked)
        .expect("agent")
        .last_transition
        .clone();
    assert_eq!(record.triggered_by, "hf-driver");
    assert!(
        record.reason.contains("restart acme/locked"),
        "{}",
        record.reason
    );
    assert_eq!(record.metadata["platform_code"], "403");
    until("the next Space restarted", || asked(&fake).len() == 4).await;
    assert_eq!(
        service.get_agent(after).expect("agent").state,
        AgentState::Starting,
        "an accepted restart leaves the agent for the poller to move on"
    );
    runner.abort();
}

/// The server binary with `[hf] act = true`: StartAgent over gRPC on an
/// agent bound to a Space restarts the Space at the Hub.
#[tokio::test]
async fn the_server_restarts_spaces_when_the_config_says_act() {
    use agent_lifecycle::pb;
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().expect("fake");
        // The Hub cannot tell the runtime here (503): the poller moves
        // nothing, and the driver, unable to read the Space, acts.
        f.script.insert(
            "/api/spaces/acme/live/runtime".into(),
            VecDeque::from([Reply::Status(503)]),
        );
        f.script.insert(
            "/api/spaces/acme/live/restart".into(),
            VecDeque::from([Reply::Status(200)]),
        );
    }
    let base = serve_fake(Arc::clone(&fake)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!("store = \"memory\"\n[hf]\nbase_url = {base:?}\nact = true\n"),
    )
    .expect("write the config");
    let server = common::process::ServerProcess::start(&[
        "--log",
        "warn",
        "--config",
        config.to_str().expect("utf-8 path"),
    ]);
    let mut client = server.client().await;
    let agent = common::register(&mut client, &[("hf.space", "acme/live")]).await;
    client
        .deploy_agent(pb::DeployAgentRequest {
            agent_id: agent.agent_id.clone(),
            ..Default::default()
        })
        .await
        .expect("deploy");
    client
        .start_agent(pb::StartAgentRequest {
            agent_id: agent.agent_id.clone(),
            ..Default::default()
        })
        .await
        .expect("start");
    until("the Space restarted", || {
        fake.lock()
            .expect("fake")
            .seen
            .iter()
            .any(|(path, _)| path == "/api/spaces/acme/live/restart")
    })
    .await;
}

/// Two services on one PostgreSQL database, both running the Spaces driver
/// (two server processes of a fleet): only the lease holder acts; when it
/// closes, the other takes over from the shared cursor and acts on what
/// happened since, without repeating what the first one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_only_the_new_lease_holder_acts_from_the_cursor() {
    use agent_lifecycle::{
        automation::drivers::{self, DriverSettings, hf::HfDriver},
        service::{ChangeRequest, ServiceConfig},
        store::PostgresStore,
    };
    let Some(url) = common::postgres_database("driver_failover").await else {
        return;
    };
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock().expect("fake");
        for space in ["one", "two"] {
            f.script.insert(
                format!("/api/spaces/acme/{space}/restart"),
                VecDeque::from([Reply::Status(200)]),
            );
        }
    }
    let base = serve_fake(Arc::clone(&fake)).await;
    let open = |url: String| {
        tokio::task::spawn_blocking(move || {
            let store = Arc::new(PostgresStore::open(&url).expect("open"));
            AgentLifecycleService::open(store, ServiceConfig::default()).expect("service")
        })
    };
    let first = open(url.clone()).await.expect("join");
    let second = open(url.clone()).await.expect("join");
    let settings = DriverSettings {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        max_attempts: 3,
        lease_retry: Duration::from_millis(20),
    };
    let driver = || {
        Arc::new(
            HfDriver::new(HfSettings {
                base_url: base.clone(),
                ..HfSettings::default()
            })
            .expect("driver"),
        )
    };
    let runner_one = tokio::spawn(drivers::run(first.clone(), driver(), settings.clone()));
    tokio::time::timeout(Duration::from_secs(10), async {
        while first.cursor("hf-driver").await.expect("cursor") == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the first driver takes the lease and starts");
    let runner_two = tokio::spawn(drivers::run(second.clone(), driver(), settings.clone()));

    let restarts = |fake: &Arc<Mutex<Fake>>| -> Vec<String> {
        fake.lock()
            .expect("fake")
            .seen
            .iter()
            .map(|(path, _)| path.clone())
            .filter(|path| path.ends_with("/restart"))
            .collect()
    };
    let start = |service: AgentLifecycleService, space: &'static str| async move {
        let id = register(&service, &format!("acme/{space}")).await;
        service
            .deploy_agent(id, ChangeRequest::default())
            .await
            .expect("deploy");
        service
            .start_agent(id, ChangeRequest::default())
            .await
            .expect("start");
    };
    start(first.clone(), "one").await;
    until("the first Space restarted", || restarts(&fake).len() == 1).await;
    // Once the first driver has recorded that it handled every event so
    // far (an action whose record a crash cut off would be repeated, which
    // the platform tolerates but this test counts).
    let head = first.head_sequence();
    tokio::time::timeout(Duration::from_secs(10), async {
        while first.cursor("hf-driver").await.expect("cursor") <= head {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the first driver records its place");
    // The first process goes away; its lease is released with its
    // connection, and the second takes over.
    runner_one.abort();
    let _ = runner_one.await;
    first.close().await.expect("close the first service");
    drop(first);
    start(second.clone(), "two").await;
    until("the second Space restarted", || restarts(&fake).len() == 2).await;
    assert_eq!(
        restarts(&fake),
        vec![
            "/api/spaces/acme/one/restart".to_string(),
            "/api/spaces/acme/two/restart".to_string(),
        ],
        "each Space restarted once, by whichever process held the lease"
    );
    runner_two.abort();
}
