//! The real binary on SQLite: SIGKILL across failures, slow and late
//! answers and a receiver that is down; parking.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use agent_lifecycle::{
    api::grpc::pb::{self, AgentState as S},
    store::Store,
};

use super::{
    SECRET, SECRET_ENV, WAIT, config, ok,
    receiver::{Receiver, Reply, Seen},
    sample, scrape, start, until_sample,
};
use crate::common::{self, process::ServerProcess};

/// The events of the fleet, as the clients saw them acknowledged.
#[derive(Default)]
struct Fleet {
    /// sequence -> (state entered, agent's team).
    events: BTreeMap<u64, (S, &'static str)>,
}

impl Fleet {
    /// The sequences the webhook of the SIGKILL test is to deliver: team
    /// `ml`, into an operational or error state, registered or offline.
    fn matching(&self) -> BTreeSet<u64> {
        self.events
            .iter()
            .filter(|(_, (state, team))| {
                *team == "ml"
                    && matches!(
                        state,
                        S::Registered
                            | S::Online
                            | S::Busy
                            | S::Idle
                            | S::Error
                            | S::Failed
                            | S::Timeout
                            | S::Offline
                    )
            })
            .map(|(sequence, _)| *sequence)
            .collect()
    }

    fn record(&mut self, team: &'static str, transitions: &[pb::StateTransition]) {
        for t in transitions {
            let state = S::try_from(t.to_state).expect("a state");
            self.events.insert(t.sequence, (state, team));
        }
    }

    /// A full lifecycle (register, deploy, start, assign, complete, stop)
    /// of a new agent of `team`: 8 events, 5 of them matching for `ml`.
    async fn lifecycle(&mut self, client: &mut common::Client, team: &'static str) {
        let agent = common::register(client, &[("team", team)]).await;
        let id = agent.agent_id.clone();
        self.record(team, agent.last_transition.as_slice());
        macro_rules! call {
            ($method:ident, $request:ident) => {{
                let response = client
                    .$method(pb::$request {
                        agent_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect(stringify!($method))
                    .into_inner();
                self.record(team, &response.transitions);
            }};
        }
        call!(deploy_agent, DeployAgentRequest);
        call!(start_agent, StartAgentRequest);
        call!(assign_task, AssignTaskRequest);
        call!(complete_task, CompleteTaskRequest);
        call!(stop_agent, StopAgentRequest);
    }

    /// `n` lifecycles of each team, interleaved.
    async fn run(&mut self, server: &ServerProcess, n: usize) {
        let mut client = server.client().await;
        for _ in 0..n {
            self.lifecycle(&mut client, "ml").await;
            self.lifecycle(&mut client, "web").await;
        }
    }
}

/// The scripted receiver: the first two attempts at every third sequence
/// fail with 500; the first attempt at every seventh is answered after the
/// sender's timeout (the acknowledgement is lost); every fifth is slow.
fn flaky(seen: &Seen, before: usize) -> Reply {
    let sequence = seen.sequence;
    match before {
        0 | 1 if sequence.is_multiple_of(3) => Reply::Status(500, Duration::ZERO),
        0 if sequence.is_multiple_of(7) => Reply::Status(200, Duration::from_millis(1500)),
        _ if sequence.is_multiple_of(5) => Reply::Status(200, Duration::from_millis(200)),
        _ => ok(),
    }
}

/// Whether every sequence of `wanted` was acknowledged in time (an answer
/// the sender saw).
fn delivered(seen: &[Seen], wanted: &BTreeSet<u64>) -> bool {
    let acked: BTreeSet<u64> = seen
        .iter()
        .filter(|s| s.acknowledged() && !s.late && !s.held)
        .map(|s| s.sequence)
        .collect();
    wanted.is_subset(&acked)
}

/// The SIGKILL test's webhook: signed, team `ml`, into an operational or
/// error state, registered or offline; never parked; fast retries.
fn ops_webhook(receiver: &Receiver) -> String {
    format!(
        "[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\nsecret_env = \"{SECRET_ENV}\"\n\
         labels = {{ team = \"ml\" }}\ncategories = [\"operational\", \"error\"]\n\
         states = [\"registered\", \"offline\"]\nmax_attempts = 0\n\
         initial_backoff = \"20ms\"\nmax_backoff = \"200ms\"\ntimeout = \"1s\"\n",
        receiver.url()
    )
}

/// Holds the receiver's answer to the next request (a registration of a
/// new `ml` agent), kills the server with SIGKILL meanwhile, then lets the
/// answer go (to nobody) and takes the receiver down; returns the held
/// sequence.
async fn hold_across_a_kill(
    receiver: &Receiver,
    server: &mut ServerProcess,
    fleet: &mut Fleet,
) -> u64 {
    let mut held = false;
    receiver.script(Box::new(move |seen, before| {
        if held {
            return flaky(seen, before);
        }
        held = true;
        Reply::Hold
    }));
    let mut client = server.client().await;
    let agent = common::register(&mut client, &[("team", "ml")]).await;
    fleet.record("ml", agent.last_transition.as_slice());
    receiver
        .until("a held request", WAIT, |seen| seen.iter().any(|s| s.held))
        .await;
    server.kill();
    receiver.release();
    receiver.down().await;
    receiver
        .seen()
        .iter()
        .find(|s| s.held)
        .map(|s| s.sequence)
        .expect("held")
}

/// The webhook's cursor as the SQLite file at `db` keeps it (the server
/// is not running).
async fn stored_cursor(db: &Path) -> u64 {
    let db = db.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let store = agent_lifecycle::store::SqliteStore::open(&db).expect("open");
        store.cursor("webhook/ops").expect("cursor")
    })
    .await
    .expect("join")
}

/// A receiver that fails first attempts, is slow, answers too late, holds
/// an answer while the server is killed with SIGKILL, and is down while the
/// server is killed again: once it is back, every matching event has
/// arrived, in sequence order, none missing and no other event; the only
/// duplicates are the held one (the server died before it saw the
/// acknowledgement, and resent it after the restart) and the ones answered
/// too late; every request is signed and verifies, and carries one
/// delivery id per event; the lags in /metrics fall back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_matching_event_arrives_in_order_across_failures_and_sigkill() {
    let timeout = Duration::from_millis(1000);
    let receiver = Receiver::start(Some(SECRET), timeout, Box::new(flaky)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("notify.db");
    let config = config(dir.path(), &db, &ops_webhook(&receiver));
    let mut fleet = Fleet::default();

    // 1. Failures, slow and late answers: everything arrives.
    let mut server = start(&config);
    fleet.run(&server, 4).await;
    let wanted = fleet.matching();
    receiver
        .until("the first events delivered", WAIT, |seen| {
            delivered(seen, &wanted)
        })
        .await;

    // 2. The next answer is held; the server is killed meanwhile.
    let held_sequence = hold_across_a_kill(&receiver, &mut server, &mut fleet).await;
    let cursor = stored_cursor(&db).await;
    assert!(
        cursor <= held_sequence,
        "the cursor ({cursor}) is not past the unacknowledged event ({held_sequence})"
    );

    // 3. The receiver is down: the restarted server retries, and is killed
    //    again.
    let mut server = start(&config);
    fleet.run(&server, 2).await;
    let http = server.http_addr(WAIT).expect("http address");
    until_sample(
        http,
        "agent_lifecycle_webhook_failures_total{webhook=\"ops\"}",
        |failures| failures >= 2.0,
    )
    .await;
    server.kill();

    // 4. Restarted once more, with the receiver back: everything arrives.
    let server = start(&config);
    fleet.run(&server, 2).await;
    receiver.up().await;
    let wanted = fleet.matching();
    receiver
        .until("every matching event delivered", WAIT, |seen| {
            delivered(seen, &wanted)
        })
        .await;
    let http = server.http_addr(WAIT).expect("http address");
    until_sample(
        http,
        "agent_lifecycle_webhook_lag_events{webhook=\"ops\"}",
        |lag| lag == 0.0,
    )
    .await;
    until_sample(
        http,
        "agent_lifecycle_webhook_lag_seconds{webhook=\"ops\"}",
        |lag| lag == 0.0,
    )
    .await;

    check_deliveries(&receiver.seen(), &wanted, held_sequence);
}

/// What the SIGKILL test's receiver saw: exactly the wanted sequences, in
/// order, duplicates only of the held event and of late answers, signed,
/// one delivery id per event.
fn check_deliveries(seen: &[Seen], wanted: &BTreeSet<u64>, held_sequence: u64) {
    let arrived: BTreeSet<u64> = seen.iter().map(|s| s.sequence).collect();
    assert_eq!(&arrived, wanted, "every matching event and no other");
    let order: Vec<u64> = seen.iter().map(|s| s.sequence).collect();
    assert!(
        order.windows(2).all(|pair| pair[0] <= pair[1]),
        "in sequence order: {order:?}"
    );
    let mut acks: BTreeMap<u64, Vec<&Seen>> = BTreeMap::new();
    let mut ids: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    for s in seen {
        assert!(
            s.verified,
            "the signature of {} verifies: {s:?}",
            s.sequence
        );
        assert_eq!(s.webhook, "ops");
        assert_eq!(s.content_type.as_deref(), Some("application/json"));
        assert_eq!(s.body["sequence"], s.sequence);
        assert_eq!(s.body["agent"]["labels"]["team"], "ml");
        ids.entry(s.sequence).or_default().insert(&s.delivery);
        if s.acknowledged() {
            acks.entry(s.sequence).or_default().push(s);
        }
    }
    assert!(ids.values().all(|ids| ids.len() == 1), "one id per event");
    let distinct: BTreeSet<&&str> = ids.values().flatten().collect();
    assert_eq!(
        distinct.len(),
        wanted.len(),
        "a different id for every event"
    );
    for (sequence, acked) in &acks {
        let lost = acked[..acked.len() - 1].iter().all(|s| s.late || s.held);
        assert!(
            lost,
            "event {sequence} was acknowledged {} times, and the sender saw an earlier acknowledgement",
            acked.len()
        );
    }
    assert!(
        acks[&held_sequence].len() >= 2,
        "the event whose acknowledgement died with the server was sent again"
    );
    assert!(
        acks.values().any(|acked| acked.iter().any(|s| s.late)),
        "some answer came too late (the script makes sure)"
    );
    assert!(
        seen.iter().any(|s| s.status == 500),
        "some attempt failed (the script makes sure)"
    );
}

/// A receiver that refuses one event with 500 every time: after
/// `max_attempts` tries it is parked (logged with its sequence, counted in
/// /metrics) and the webhook goes on with the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_keeps_failing_is_parked_counted_and_passed_over() {
    let receiver = Receiver::start(
        None,
        Duration::from_secs(10),
        Box::new(|seen, _| {
            if seen.body["agent"]["name"] == "poison" {
                Reply::Status(500, Duration::ZERO)
            } else {
                ok()
            }
        }),
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config(
        dir.path(),
        &dir.path().join("parked.db"),
        &format!(
            "[[notify.webhook]]\nname = \"parking\"\nurl = \"{}\"\nmax_attempts = 3\n\
             initial_backoff = \"10ms\"\nmax_backoff = \"20ms\"\n",
            receiver.url()
        ),
    );
    let server = start(&config);
    let mut client = server.client().await;
    let mut sequences = Vec::new();
    for name in ["first", "poison", "last"] {
        let registered = client
            .register_agent(pb::RegisterAgentRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner();
        sequences.push(registered.transitions[0].sequence);
    }
    let last = sequences[2];
    receiver
        .until("the event after the parked one", WAIT, |seen| {
            seen.iter().any(|s| s.sequence == last)
        })
        .await;
    let poison = sequences[1];
    let attempts: Vec<u32> = receiver
        .seen()
        .iter()
        .filter(|s| s.sequence == poison)
        .map(|s| s.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    let seen: Vec<(u64, u16)> = receiver
        .seen()
        .iter()
        .map(|s| (s.sequence, s.status))
        .collect();
    assert_eq!(
        seen,
        vec![
            (sequences[0], 200),
            (poison, 500),
            (poison, 500),
            (poison, 500),
            (last, 200),
        ]
    );
    check_parking_metrics(&server).await;
    let log = server.log();
    assert!(
        log.lines()
            .any(|line| line.contains("webhook delivery parked")
                && line.contains(&format!("sequence={poison}"))),
        "the parked delivery is logged with its sequence{log}"
    );
}

/// The parking test's counters in /metrics: two delivered, one parked,
/// three failed attempts.
async fn check_parking_metrics(server: &ServerProcess) {
    let http = server.http_addr(WAIT).expect("http address");
    let series = |outcome: &str| {
        format!(
            "agent_lifecycle_webhook_deliveries_total{{outcome=\"{outcome}\",webhook=\"parking\"}}"
        )
    };
    until_sample(http, &series("delivered"), |n| n == 2.0).await;
    let text = tokio::task::spawn_blocking(move || scrape(http))
        .await
        .expect("scrape");
    assert_eq!(sample(&text, &series("parked")), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "agent_lifecycle_webhook_failures_total{webhook=\"parking\"}"
        ),
        Some(3.0),
        "{text}"
    );
}
