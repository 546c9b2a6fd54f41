//! A real server on 127.0.0.1:0 for the integration tests, and helpers.
#![allow(dead_code)]

pub mod pki;
pub mod process;
pub mod raw;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use agent_lifecycle::{
    AgentLifecycleService,
    api::grpc::pb::{self, agent_lifecycle_service_client::AgentLifecycleServiceClient},
    app::server::{self, ServerError},
    service::ServiceConfig,
    store::{MemoryStore, SqliteStore, Store},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Streaming, transport::Channel};

/// The generated client.
pub type Client = AgentLifecycleServiceClient<Channel>;

/// Deadline for any single stream read or call in tests.
pub const STEP: Duration = Duration::from_secs(10);

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub service: AgentLifecycleService,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Memory store, default settings.
    pub async fn start() -> Self {
        Self::start_with(ServiceConfig::default(), false).await
    }

    /// With `config`, on SQLite in a temporary directory when `sqlite`.
    pub async fn start_with(config: ServiceConfig, sqlite: bool) -> Self {
        let (store, dir): (Arc<dyn Store>, _) = if sqlite {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = SqliteStore::open(dir.path().join("test.db")).expect("sqlite");
            (Arc::new(store), Some(dir))
        } else {
            (Arc::new(MemoryStore::new(&config.retention)), None)
        };
        let mut server = Self::start_on(store, config).await;
        server._dir = dir;
        server
    }

    /// On a given store.
    pub async fn start_on(store: Arc<dyn Store>, config: ServiceConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_listening(listener, store, config)
    }

    /// On a given store and listener (a restarted server on the address of
    /// the one before).
    pub fn start_listening(
        listener: TcpListener,
        store: Arc<dyn Store>,
        config: ServiceConfig,
    ) -> Self {
        let service = AgentLifecycleService::open(store, config).expect("service");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server::run(listener, service.clone(), async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            service,
            stop: Some(stop),
            task: Some(task),
            _dir: None,
        }
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        connect(&self.url()).await
    }

    /// A client whose HTTP/2 windows are tiny (8 KiB), so that a stream it
    /// does not read stops being polled on the server almost at once: the
    /// way to make a subscriber fall behind the broadcast buffer.
    pub async fn small_window_client(&self) -> Client {
        let channel = Channel::from_shared(self.url())
            .expect("url")
            .initial_stream_window_size(Some(8 * 1024))
            .initial_connection_window_size(Some(8 * 1024))
            .connect()
            .await
            .expect("connect");
        AgentLifecycleServiceClient::new(channel)
    }

    /// A raw channel (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        channel(&self.url()).await
    }

    /// Signals shutdown and waits for the server task.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("server task");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("server stops within 30 s")
            .expect("server task joins")
    }

    /// Signals shutdown without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Takes the server task (after `signal_shutdown`).
    pub fn take_task(&mut self) -> JoinHandle<Result<(), ServerError>> {
        self.task.take().expect("server task")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A channel connected to `url` (`http://HOST:PORT`).
pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

/// A client connected to `url`, for tasks that own their connection.
pub async fn connect(url: &str) -> Client {
    AgentLifecycleServiceClient::new(channel(url).await)
}

/// Registers an agent with a fresh id and optional labels.
pub async fn register(client: &mut Client, labels: &[(&str, &str)]) -> pb::Agent {
    client
        .register_agent(pb::RegisterAgentRequest {
            agent_id: uuid::Uuid::new_v4().to_string(),
            name: "test-agent".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner()
        .agent
        .expect("agent")
}

/// The agent `id` as GetAgent answers it.
pub async fn get_agent(client: &mut Client, id: &str) -> pb::Agent {
    client
        .get_agent(pb::GetAgentRequest {
            agent_id: id.to_string(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner()
        .agent
        .expect("agent")
}

/// A registered and deployed agent (DEPLOYED): its id.
pub async fn deployed(client: &mut Client, labels: &[(&str, &str)]) -> String {
    let id = register(client, labels).await.agent_id;
    client
        .deploy_agent(pb::DeployAgentRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("deploy");
    id
}

/// A registered, deployed and started agent (ONLINE).
pub async fn online(client: &mut Client, labels: &[(&str, &str)]) -> pb::Agent {
    let id = deployed(client, labels).await;
    client
        .start_agent(pb::StartAgentRequest {
            agent_id: id,
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .agent
        .expect("agent")
}

/// One TransitionAgent call.
pub async fn transition(
    client: &mut Client,
    agent_id: &str,
    target: pb::AgentState,
) -> Result<pb::TransitionAgentResponse, tonic::Status> {
    client
        .transition_agent(pb::TransitionAgentRequest {
            agent_id: agent_id.to_string(),
            target_state: target as i32,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// A watch from `start` is refused as compacted, naming `oldest` as the
/// oldest available sequence; a watch from `oldest` replays it.
pub async fn assert_compacted_before(client: &mut Client, start: u64, oldest: u64) {
    use tonic_types::StatusExt;
    let err = client
        .watch_events(pb::WatchEventsRequest {
            start_sequence: start,
            ..Default::default()
        })
        .await
        .expect_err("compacted");
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    let info = err.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "SEQUENCE_COMPACTED");
    let named = info.metadata.get("oldest_available_sequence").cloned();
    assert_eq!(named, Some(oldest.to_string()));
    let mut stream = watch(
        client,
        pb::WatchEventsRequest {
            start_sequence: oldest,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next_event(&mut stream).await.sequence, oldest);
}

/// Opens a watch stream.
pub async fn watch(
    client: &mut Client,
    request: pb::WatchEventsRequest,
) -> Streaming<pb::WatchEventsResponse> {
    client
        .watch_events(request)
        .await
        .expect("watch")
        .into_inner()
}

/// The next message, failing the test after [`STEP`].
pub async fn next(
    stream: &mut Streaming<pb::WatchEventsResponse>,
) -> pb::watch_events_response::Kind {
    tokio::time::timeout(STEP, stream.message())
        .await
        .expect("a message within the step deadline")
        .expect("stream ok")
        .expect("stream open")
        .kind
        .expect("kind set")
}

/// The next event, skipping progress messages.
pub async fn next_event(stream: &mut Streaming<pb::WatchEventsResponse>) -> pb::LifecycleEvent {
    loop {
        match next(stream).await {
            pb::watch_events_response::Kind::Event(event) => return event,
            pb::watch_events_response::Kind::Progress(_) => continue,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// `message` with `token` as its bearer token.
pub fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    request
}

/// A fresh database on the PostgreSQL test server, or `None` (with a note)
/// when no server is configured outside CI; under CI a missing server
/// fails the test.
pub async fn postgres_database(prefix: &str) -> Option<String> {
    let url = match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var_os("CI").is_some() => {
            panic!("TEST_DATABASE_URL is not set; CI must run the PostgreSQL tests")
        }
        _ => {
            eprintln!("TEST_DATABASE_URL is not set: skipping a PostgreSQL test");
            return None;
        }
    };
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let created = tokio::task::spawn_blocking(move || {
        agent_lifecycle::store::PostgresStore::create_database(&url, &name)
    })
    .await
    .expect("join");
    Some(created.expect("create a test database"))
}
