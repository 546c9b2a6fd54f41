//! The deliverer run in-process over the library: the chat template, HTTPS
//! verified against the compiled-in roots and a `ca_file`, and a failover
//! between two services on one PostgreSQL database.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use agent_lifecycle::{
    AgentLifecycleService,
    automation::notify::{self, Template, WebhookSettings},
    domain::AgentState,
    service::{ChangeRequest, Registration, ServiceConfig},
    store::PostgresStore,
};

use super::{
    WAIT, ok,
    receiver::{self, Receiver, Seen},
};
use crate::common;

/// The chat template posts `{"text": ...}`: one line naming the agent, the
/// move, the reason and who made it; events of other sources are not sent;
/// without a secret nothing is signed.
#[tokio::test]
async fn the_chat_template_posts_one_line_per_event() {
    let receiver = Receiver::start(None, Duration::from_secs(10), Box::new(|_, _| ok())).await;
    let service = AgentLifecycleService::in_memory().expect("service");
    let mut settings = WebhookSettings::new("chat", receiver.url());
    settings.template = Template::Chat;
    settings.filter.sources = vec!["oncall".into()];
    settings.lease_retry = Duration::from_millis(10);
    let runner = tokio::spawn(notify::run(service.clone(), settings));
    let agent = service
        .register_agent(Registration {
            name: "summarizer".into(),
            ..Default::default()
        })
        .await
        .expect("register")
        .agent;
    let moved = service
        .transition(
            agent.id,
            AgentState::Deploying,
            ChangeRequest {
                reason: "release 1.4".into(),
                triggered_by: "oncall".into(),
                ..ChangeRequest::default()
            },
        )
        .await
        .expect("deploy");
    let sequence = moved.transitions[0].sequence;
    receiver
        .until("the chat message", WAIT, |seen| !seen.is_empty())
        .await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "only the oncall move: {seen:?}");
    let id = agent.id.to_string();
    assert_eq!(
        seen[0].body,
        serde_json::json!({
            "text": format!(
                "summarizer ({}): registered → deploying: release 1.4 (by oncall, #{sequence})",
                &id[..8]
            )
        })
    );
    assert_eq!(seen[0].signature, None);
    runner.abort();
}

/// Opens a service on the PostgreSQL database `url`.
async fn open(url: &str) -> AgentLifecycleService {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let store = Arc::new(PostgresStore::open(&url).expect("open"));
        AgentLifecycleService::open(store, ServiceConfig::default()).expect("service")
    })
    .await
    .expect("join")
}

/// Waits (bounded) until `done` holds, checking every few milliseconds.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    tokio::time::timeout(WAIT, async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"));
}

/// The webhook's cursor in `service`'s store.
async fn cursor(service: &AgentLifecycleService) -> u64 {
    service.cursor("webhook/fleet").await.expect("cursor")
}

/// Registers an agent; its registration's sequence.
async fn register(service: &AgentLifecycleService) -> u64 {
    service
        .register_agent(Registration::default())
        .await
        .expect("register")
        .transitions[0]
        .sequence
}

/// Events of the failover test `service` delivered.
fn delivered(service: &AgentLifecycleService) -> u64 {
    service
        .metrics()
        .webhooks()
        .deliveries("fleet", "delivered")
}

/// Whether every sequence of `wanted` reached the receiver.
fn arrived(wanted: &BTreeSet<u64>) -> impl Fn(&[Seen]) -> bool {
    let wanted = wanted.clone();
    move |seen| wanted.iter().all(|q| seen.iter().any(|s| s.sequence == *q))
}

/// Two services on one PostgreSQL database, both running the same webhook
/// (two server processes of a fleet): only the lease holder delivers; when
/// it goes away, the other takes over from the shared cursor and delivers
/// what happened since, each event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_new_lease_holder_delivers_from_the_cursor() {
    let Some(url) = common::postgres_database("webhook_failover").await else {
        return;
    };
    let receiver = Receiver::start(None, Duration::from_secs(10), Box::new(|_, _| ok())).await;
    let first = open(&url).await;
    let second = open(&url).await;
    let mut settings = WebhookSettings::new("fleet", receiver.url());
    settings.lease_retry = Duration::from_millis(20);
    let runner_one = tokio::spawn(notify::run(first.clone(), settings.clone()));
    until("the first process takes the lease and starts", || async {
        cursor(&first).await != 0
    })
    .await;
    let runner_two = tokio::spawn(notify::run(second.clone(), settings));
    let mut wanted = BTreeSet::new();
    for _ in 0..3 {
        wanted.insert(register(&first).await);
    }
    receiver
        .until("the first process's deliveries", WAIT, arrived(&wanted))
        .await;
    let head = first.head_sequence();
    until("the first process records its place", || async {
        cursor(&first).await > head
    })
    .await;
    assert_eq!(delivered(&first), 3);
    assert_eq!(
        delivered(&second),
        0,
        "the second process waits for the lease"
    );

    runner_one.abort();
    let _ = runner_one.await;
    first.close().await.expect("close the first service");
    drop(first);
    for _ in 0..3 {
        wanted.insert(register(&second).await);
    }
    receiver
        .until("the second process's deliveries", WAIT, arrived(&wanted))
        .await;
    let order: Vec<u64> = receiver.seen().iter().map(|s| s.sequence).collect();
    assert_eq!(
        order,
        wanted.iter().copied().collect::<Vec<_>>(),
        "each event once, in order, by whichever process held the lease"
    );
    // The receiver records a request before the sender reads its answer.
    until("the second process counts its deliveries", || async {
        delivered(&second) == 3
    })
    .await;
    runner_two.abort();
}

/// A receiver over HTTPS with a certificate from a CA of the test's own: a
/// webhook that trusts only the compiled-in public roots refuses the
/// certificate (no request is sent; the attempts count as failures); one
/// whose `ca_file` names the CA delivers.
#[tokio::test]
async fn https_receivers_are_verified_against_the_roots_and_the_ca_file() {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let ca = common::pki::Ca::new("test receiver CA");
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
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let receiver = Receiver::start_on(Some(tls), None, WAIT, Box::new(|_, _| ok())).await;
    assert!(receiver.url().starts_with("https://"));
    let service = AgentLifecycleService::in_memory().expect("service");

    let mut untrusting = WebhookSettings::new("untrusting", receiver.url());
    untrusting.initial_backoff = Duration::from_millis(10);
    untrusting.max_backoff = Duration::from_millis(10);
    untrusting.lease_retry = Duration::from_millis(10);
    let runner = tokio::spawn(notify::run(service.clone(), untrusting));
    until("the untrusting webhook starts", || async {
        service.cursor("webhook/untrusting").await.expect("cursor") != 0
    })
    .await;
    register(&service).await;
    until("two refused attempts", || async {
        service.metrics().webhooks().failures("untrusting") >= 2
    })
    .await;
    runner.abort();
    assert!(receiver.seen().is_empty(), "no request got through");

    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path(), "receiver-ca");
    let file = agent_lifecycle::app::config::Config::parse(&format!(
        "[[notify.webhook]]\nname = \"trusting\"\nurl = {:?}\nca_file = {:?}\n",
        receiver.url(),
        ca_file.to_str().expect("utf-8 path")
    ))
    .expect("config");
    let mut settings = file.notify.expect("[notify]").settings().expect("settings");
    let mut trusting = settings.remove(0);
    assert_eq!(trusting.extra_roots, vec![ca.der()]);
    trusting.lease_retry = Duration::from_millis(10);
    let runner = tokio::spawn(notify::run(service.clone(), trusting));
    until("the trusting webhook starts", || async {
        service.cursor("webhook/trusting").await.expect("cursor") != 0
    })
    .await;
    let sequence = register(&service).await;
    receiver
        .until("the delivery over HTTPS", WAIT, |seen| {
            seen.iter().any(|s| s.sequence == sequence)
        })
        .await;
    runner.abort();
}

/// A service whose watch streams report progress after `interval` idle,
/// with a webhook (`none`) that no event matches; the webhook has started.
async fn passing_over(
    receiver: &Receiver,
    interval: Duration,
) -> (AgentLifecycleService, tokio::task::JoinHandle<()>) {
    let service = AgentLifecycleService::open(
        Arc::new(agent_lifecycle::store::MemoryStore::new(&Default::default())),
        ServiceConfig {
            progress_interval: interval,
            ..ServiceConfig::default()
        },
    )
    .expect("service");
    let mut settings = WebhookSettings::new("none", receiver.url());
    settings.filter.sources = vec!["nobody".into()];
    settings.lease_retry = Duration::from_millis(10);
    let runner = tokio::spawn(notify::run(service.clone(), settings));
    until("the webhook starts", || async {
        service.cursor("webhook/none").await.expect("cursor") == 1
    })
    .await;
    (service, runner)
}

/// Events the filter passes over advance the cursor in bulk: when the log
/// goes idle (a progress message), and while it is busy every
/// `SKIPPED_BEFORE_ADVANCE` events (here with no progress message for an
/// hour); none of them is sent.
#[tokio::test]
async fn passed_over_events_advance_the_cursor_when_idle_and_in_bulk() {
    use agent_lifecycle::automation::notify::SKIPPED_BEFORE_ADVANCE;
    let receiver = Receiver::start(None, WAIT, Box::new(|_, _| ok())).await;
    let (idle, runner) = passing_over(&receiver, Duration::from_millis(50)).await;
    for _ in 0..3 {
        register(&idle).await;
    }
    until("the idle log advances the cursor", || async {
        idle.cursor("webhook/none").await.expect("cursor") == 4
    })
    .await;
    runner.abort();

    let (busy, runner) = passing_over(&receiver, Duration::from_secs(3600)).await;
    for _ in 0..SKIPPED_BEFORE_ADVANCE + 10 {
        register(&busy).await;
    }
    until("the busy log advances the cursor", || async {
        busy.cursor("webhook/none").await.expect("cursor") > SKIPPED_BEFORE_ADVANCE
    })
    .await;
    assert!(receiver.seen().is_empty(), "nothing matched");
    runner.abort();
}

/// While an event waits for its acknowledgement, the lags in the metrics
/// say how far behind the webhook is; once it is delivered they fall to 0.
#[tokio::test]
async fn the_lags_grow_while_an_event_waits_and_fall_to_zero() {
    let mut held = false;
    let receiver = Receiver::start(
        None,
        WAIT,
        Box::new(move |_, _| {
            if held {
                return ok();
            }
            held = true;
            receiver::Reply::Hold
        }),
    )
    .await;
    let service = AgentLifecycleService::in_memory().expect("service");
    let mut settings = WebhookSettings::new("lag", receiver.url());
    settings.lease_retry = Duration::from_millis(10);
    let runner = tokio::spawn(notify::run(service.clone(), settings));
    until("the webhook starts", || async {
        service.cursor("webhook/lag").await.expect("cursor") != 0
    })
    .await;
    for _ in 0..3 {
        register(&service).await;
    }
    receiver
        .until("the held request", WAIT, |seen| !seen.is_empty())
        .await;
    let lag = |service: &AgentLifecycleService| {
        let text = service.metrics().encode_text();
        (
            super::sample(&text, "agent_lifecycle_webhook_lag_events{webhook=\"lag\"}"),
            super::sample(
                &text,
                "agent_lifecycle_webhook_lag_seconds{webhook=\"lag\"}",
            ),
        )
    };
    let (events, seconds) = lag(&service);
    assert_eq!(events, Some(3.0), "three events behind");
    assert!(seconds.is_some_and(|s| s > 0.0), "{seconds:?}");
    receiver.release();
    until("the lags fall to 0", || async {
        lag(&service) == (Some(0.0), Some(0.0))
    })
    .await;
    runner.abort();
}
