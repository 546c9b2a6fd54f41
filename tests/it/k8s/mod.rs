//! The Kubernetes driver against a fake API server in the test
//! ([`fake`]): agents bound to a Deployment or StatefulSet follow its pods
//! (through the list, the watch, a 410 Gone, a watch the server closes and
//! a bookmark), and the workload follows the agents (the scale
//! subresource, delete), with refusals recorded and transient failures
//! retried; in process, and through the server binary with a
//! `[kubernetes]` config and a kubeconfig written by the test.

mod act;
mod fake;
mod pods;

use std::{path::Path, sync::Arc, time::Duration};

use self::fake::{Fake, STEP};
use agent_lifecycle::{
    AgentLifecycleService,
    app::config::Config,
    automation::drivers::{
        self, DriverSettings,
        k8s::{self, K8S_DRIVER, KubernetesDriver, KubernetesSettings},
    },
    domain::{Agent, AgentId, AgentState, Labels, TransitionRecord},
    service::{HistoryQuery, Registration, WatchRequest},
};

/// The `triggered_by` of the transitions the pods cause.
const OBSERVED_BY: &str = K8S_DRIVER;

/// The pod of Deployment `bot` the tests move around.
const BOT_POD: &str = "bot-7d9f8c6b5-x2x9z";

/// A kubeconfig for the fake, with a bearer token.
fn write_kubeconfig(fake: &Fake, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: driver\n    namespace: prod\n\
         current-context: fake\nusers:\n- name: driver\n  user:\n    token: test-token\n",
        fake.url
    );
    std::fs::write(&path, text).expect("write the kubeconfig");
    path
}

/// The settings a `[kubernetes]` section naming the kubeconfig gives, with
/// a fast tick, and a client.
async fn connect(fake: &Fake, dir: &Path) -> (kube::Client, KubernetesSettings) {
    let kubeconfig = write_kubeconfig(fake, dir);
    let file = Config::parse(&format!(
        "[kubernetes]\nkubeconfig = {:?}\ncontext = \"fake\"\n",
        kubeconfig.to_str().expect("utf-8 path")
    ))
    .expect("config");
    let settings = KubernetesSettings {
        tick: Duration::from_millis(20),
        ..file
            .kubernetes
            .expect("[kubernetes]")
            .settings()
            .expect("settings")
    };
    let client = k8s::client(&settings).await.expect("client");
    (client, settings)
}

/// The pod watcher, running.
async fn observe(
    service: &AgentLifecycleService,
    fake: &Fake,
    dir: &Path,
) -> tokio::task::JoinHandle<()> {
    let (client, settings) = connect(fake, dir).await;
    tokio::spawn(k8s::watch::run(service.clone(), client, settings))
}

/// The acting driver, running, with fast retries; returns once it has
/// taken its place in the log.
async fn act(
    service: &AgentLifecycleService,
    fake: &Fake,
    dir: &Path,
) -> tokio::task::JoinHandle<()> {
    let (client, _) = connect(fake, dir).await;
    let settings = DriverSettings {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        max_attempts: 3,
        lease_retry: Duration::from_millis(10),
    };
    let runner = tokio::spawn(drivers::run(
        service.clone(),
        Arc::new(KubernetesDriver::new(client)),
        settings,
    ));
    tokio::time::timeout(STEP, async {
        while service.cursor(K8S_DRIVER).await.expect("cursor") == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the driver starts");
    runner
}

async fn register(service: &AgentLifecycleService, labels: &[(&str, &str)]) -> AgentId {
    let labels: Labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    service
        .register_agent(Registration {
            name: "agent".into(),
            labels,
            ..Registration::default()
        })
        .await
        .expect("register")
        .agent
        .id
}

/// Waits until agent `id` is in `state`.
async fn reaches(service: &AgentLifecycleService, id: AgentId, state: AgentState) -> Arc<Agent> {
    let mut events = service
        .watch(WatchRequest {
            agent_ids: vec![id],
            ..WatchRequest::default()
        })
        .await
        .expect("watch");
    tokio::time::timeout(STEP, async {
        loop {
            let agent = service.get_agent(id).expect("agent");
            if agent.state == state {
                return agent;
            }
            events
                .next()
                .await
                .expect("the stream is open")
                .expect("no error");
        }
    })
    .await
    .unwrap_or_else(|_| {
        let now = service.get_agent(id).expect("agent").state;
        panic!("the agent reaches {state} within {STEP:?}; it is {now}")
    })
}

async fn history(service: &AgentLifecycleService, id: AgentId) -> Vec<Arc<TransitionRecord>> {
    service
        .history(id, HistoryQuery::default())
        .await
        .expect("history")
        .transitions
}

/// A pod of `bot` goes Pending, ContainerCreating, Running (not ready) and
/// Ready: its agent walks from REGISTERED to ONLINE, each step recorded
/// as the driver's, with the pod and the workload in the metadata.
#[tokio::test]
async fn a_starting_pod_moves_its_agent_to_online() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let service = AgentLifecycleService::in_memory().expect("service");
    let id = register(&service, &[("k8s.workload", "prod/Deployment/bot")]).await;
    let other = register(&service, &[("k8s.workload", "prod/Deployment/other")]).await;
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::pending()));
    let observer = observe(&service, &fake, dir.path()).await;
    reaches(&service, id, AgentState::Deploying).await;
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::creating()));
    reaches(&service, id, AgentState::Starting).await;
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::running()));
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::ready()));
    reaches(&service, id, AgentState::Online).await;

    let records = history(&service, id).await;
    let path: Vec<AgentState> = records.iter().skip(1).map(|r| r.to).collect();
    use AgentState::*;
    assert_eq!(path, [Deploying, Deployed, Starting, Online]);
    for record in records.iter().skip(1) {
        assert_eq!(record.triggered_by, OBSERVED_BY);
        assert_eq!(record.metadata["pod"], BOT_POD);
        assert_eq!(record.metadata["workload"], "prod/Deployment/bot");
    }
    let last = records.last().expect("a record");
    assert_eq!(last.metadata["status"], "Ready");
    assert_eq!(last.metadata["ready_pods"], 1);
    assert_eq!(records[1].metadata["reason"], "Unschedulable");
    assert_eq!(
        service.get_agent(other).expect("agent").state,
        Registered,
        "an agent bound to a workload without pods stays"
    );
    let seen = fake.seen();
    assert!(
        seen.iter()
            .all(|s| s.authorization.as_deref() == Some("Bearer test-token")),
        "every request carries the kubeconfig's token"
    );
    assert_eq!(seen.iter().filter(|s| s.is_list()).count(), 1);
    observer.abort();
}

/// Failing pods move their agents to ERROR or FAILED, with the pod's
/// reason, message, container and exit code in the metadata.
#[tokio::test]
async fn crashes_oom_kills_and_image_pulls_are_recorded_with_their_reason() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let service = AgentLifecycleService::in_memory().expect("service");
    let mut agents = Vec::new();
    for name in ["crash", "oom", "pull"] {
        let workload = format!("prod/Deployment/{name}");
        agents.push(register(&service, &[("k8s.workload", &workload)]).await);
        fake.cluster().set_pod(pods::deployment_pod(
            name,
            &format!("{name}-7d9f8c6b5-a1"),
            pods::ready(),
        ));
    }
    let observer = observe(&service, &fake, dir.path()).await;
    for &id in &agents {
        reaches(&service, id, AgentState::Online).await;
    }
    let failures = [
        pods::crash_loop(),
        pods::oom_killed(),
        pods::image_pull_backoff(),
    ];
    for (name, status) in ["crash", "oom", "pull"].into_iter().zip(failures) {
        fake.cluster().set_pod(pods::deployment_pod(
            name,
            &format!("{name}-7d9f8c6b5-a1"),
            status,
        ));
    }
    let crash = reaches(&service, agents[0], AgentState::Error).await;
    let record = &crash.last_transition;
    assert_eq!(record.triggered_by, OBSERVED_BY);
    assert_eq!(record.metadata["status"], "CrashLoopBackOff");
    assert_eq!(record.metadata["reason"], "CrashLoopBackOff");
    assert_eq!(record.metadata["container"], "agent");
    assert_eq!(record.metadata["exit_code"], 3);
    assert!(
        record.metadata["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("back-off 40s restarting failed container=agent")),
        "{:?}",
        record.metadata
    );
    let oom = reaches(&service, agents[1], AgentState::Error).await;
    assert_eq!(oom.last_transition.metadata["status"], "OOMKilled");
    assert_eq!(oom.last_transition.metadata["reason"], "OOMKilled");
    assert_eq!(oom.last_transition.metadata["exit_code"], 137);
    let pull = reaches(&service, agents[2], AgentState::Failed).await;
    let record = &pull.last_transition;
    // The policy's shortest path from ONLINE to FAILED (two steps).
    assert_eq!(record.to, AgentState::Failed);
    assert_eq!(record.metadata["status"], "ImagePullBackOff");
    assert_eq!(
        record.metadata["message"],
        "Back-off pulling image \"registry.local/agent:1.5\""
    );
    observer.abort();
}

/// The watch is told 410 Gone after a change that no watch event carried:
/// the watcher lists again and the agent still follows the change.
#[tokio::test]
async fn a_410_gone_lists_again_and_loses_no_change() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let service = AgentLifecycleService::in_memory().expect("service");
    let id = register(&service, &[("k8s.workload", "prod/deploy/bot")]).await;
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::ready()));
    let observer = observe(&service, &fake, dir.path()).await;
    reaches(&service, id, AgentState::Online).await;
    fake.until("a watch open", |c| (c.open_watches() == 1).then_some(()))
        .await;

    fake.cluster()
        .expire(pods::deployment_pod("bot", BOT_POD, pods::crash_loop()));
    let agent = reaches(&service, id, AgentState::Error).await;
    assert_eq!(agent.last_transition.metadata["status"], "CrashLoopBackOff");
    let lists = fake.seen().iter().filter(|s| s.is_list()).count();
    assert_eq!(lists, 2, "listed again after the 410");
    observer.abort();
}

/// The server closes the watch: the watcher watches again from the last
/// version it saw, without a new list, and goes on following the pods.
#[tokio::test]
async fn a_watch_closed_by_the_server_resumes_where_it_was() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let service = AgentLifecycleService::in_memory().expect("service");
    let id = register(&service, &[("k8s.workload", "prod/Deployment/bot")]).await;
    let observer = observe(&service, &fake, dir.path()).await;
    fake.until("a watch open", |c| (c.open_watches() == 1).then_some(()))
        .await;
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::ready()));
    reaches(&service, id, AgentState::Online).await;
    let version = fake.cluster().version();
    fake.cluster().close_watches();
    let resumed = fake
        .until("a second watch", |c| {
            c.seen.iter().filter(|s| s.is_watch()).nth(1).cloned()
        })
        .await;
    assert_eq!(
        resumed.query.get("resourceVersion"),
        Some(&version.to_string()),
        "the watch resumes from the last version seen"
    );
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::crash_loop()));
    reaches(&service, id, AgentState::Error).await;
    assert_eq!(
        fake.seen().iter().filter(|s| s.is_list()).count(),
        1,
        "no new list"
    );
    observer.abort();
}

/// A bookmark moves the version on: the next watch starts from it.
#[tokio::test]
async fn a_bookmark_moves_the_version_a_watch_resumes_from() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let service = AgentLifecycleService::in_memory().expect("service");
    let _id = register(&service, &[("k8s.workload", "prod/Deployment/bot")]).await;
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::ready()));
    let observer = observe(&service, &fake, dir.path()).await;
    let first = fake
        .until("a watch open", |c| {
            (c.open_watches() == 1).then(|| c.seen.iter().find(|s| s.is_watch()).cloned())?
        })
        .await;
    assert_eq!(
        first.query.get("allowWatchBookmarks").map(String::as_str),
        Some("true")
    );
    let bookmark = {
        let mut cluster = fake.cluster();
        let bookmark = cluster.bookmark();
        cluster.close_watches();
        bookmark
    };
    assert_ne!(
        first.query.get("resourceVersion"),
        Some(&bookmark.to_string())
    );
    let resumed = fake
        .until("a second watch", |c| {
            c.seen.iter().filter(|s| s.is_watch()).nth(1).cloned()
        })
        .await;
    assert_eq!(
        resumed.query.get("resourceVersion"),
        Some(&bookmark.to_string())
    );
    assert_eq!(
        fake.seen().iter().filter(|s| s.is_list()).count(),
        1,
        "no new list"
    );
    observer.abort();
}

/// The pod of a StatefulSet is its own (no ReplicaSet between): it moves
/// its agent; when the last pod is deleted, the agent goes OFFLINE
/// (`NoPods`).
#[tokio::test]
async fn a_statefulset_whose_pods_are_gone_is_offline() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let service = AgentLifecycleService::in_memory().expect("service");
    let id = register(&service, &[("k8s.workload", "prod/StatefulSet/db")]).await;
    fake.cluster()
        .set_pod(pods::statefulset_pod("db", pods::ready()));
    let observer = observe(&service, &fake, dir.path()).await;
    reaches(&service, id, AgentState::Online).await;
    fake.cluster().delete_pod("prod", "db-0");
    let agent = reaches(&service, id, AgentState::Offline).await;
    assert_eq!(agent.last_transition.metadata["status"], "NoPods");
    assert_eq!(agent.last_transition.metadata["pods"], 0);
    assert_eq!(
        agent.last_transition.metadata["workload"],
        "prod/StatefulSet/db"
    );
    observer.abort();
}

/// The API server over HTTPS, requiring a client certificate: the
/// kubeconfig names the cluster's CA and the client's certificate and key
/// (files written by the test), and the watcher follows the pods through
/// rustls.
#[tokio::test]
async fn the_kubeconfig_tls_material_reaches_an_api_server_over_mutual_tls() {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let ca = crate::common::pki::Ca::new("test cluster CA");
    let issued = ca.server();
    let certs = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate");
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).expect("the CA");
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("client verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(clients)
        .with_single_cert(certs, key)
        .expect("server config");
    let fake = Fake::start_on(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;
    assert!(fake.url.starts_with("https://127.0.0.1:"));
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = ca.write(dir.path(), "cluster-ca");
    let (client_cert, client_key) = ca.client("agent-lifecycle").write(dir.path(), "client");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: tls\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\ncontexts:\n- name: tls\n  context:\n    cluster: tls\n    user: cert\n\
             current-context: tls\nusers:\n- name: cert\n  user:\n    client-certificate: {}\n    client-key: {}\n",
            fake.url,
            ca_file.display(),
            client_cert.display(),
            client_key.display()
        ),
    )
    .expect("write the kubeconfig");
    let settings = KubernetesSettings {
        tick: Duration::from_millis(20),
        ..KubernetesSettings::new(k8s::Credentials::Kubeconfig {
            path: kubeconfig,
            context: None,
        })
    };
    let client = k8s::client(&settings).await.expect("client");
    let service = AgentLifecycleService::in_memory().expect("service");
    let id = register(&service, &[("k8s.workload", "prod/Deployment/bot")]).await;
    fake.cluster()
        .set_pod(pods::deployment_pod("bot", BOT_POD, pods::ready()));
    let observer = tokio::spawn(k8s::watch::run(service.clone(), client, settings));
    reaches(&service, id, AgentState::Online).await;
    observer.abort();
}
