//! The deliverer run in-process over the library: the chat template, and a
//! failover between two services on one PostgreSQL database.

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
    receiver::{Receiver, Seen},
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
