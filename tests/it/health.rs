//! The health monitor on tokio's paused clock: heartbeats complete a start,
//! silence is an ERROR (and heartbeats resuming undo it), a start that never
//! heartbeats times out and is restarted with back-off until the restarts
//! run out, idle agents with steady heartbeats are left alone, and nothing
//! fires during the grace period after start.

use std::{
    sync::Arc,
    time::{Duration, Instant, UNIX_EPOCH},
};

use agent_lifecycle::{
    AgentLifecycleService,
    automation::health::{AWAIT_KEY, HealthSettings, HeartbeatMonitor, TRIGGER, awaits_heartbeat},
    domain::{AgentId, AgentState},
    service::{ChangeRequest, HistoryQuery, Registration, ServiceConfig, TokioClock},
    store::{MemoryStore, Retention},
};

/// Keeps the runtime busy so that paused time moves only by `advance` (an
/// idle paused runtime would jump to its next timer while the commit thread
/// works).
fn hold_the_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    })
}

fn service() -> AgentLifecycleService {
    let config = ServiceConfig {
        clock: Arc::new(TokioClock::starting_at(
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )),
        ..ServiceConfig::default()
    };
    AgentLifecycleService::open(Arc::new(MemoryStore::new(&Retention::default())), config)
        .expect("service")
}

fn settings() -> HealthSettings {
    HealthSettings {
        grace: Duration::ZERO,
        jitter: 0.0,
        max_restarts: 2,
        ..HealthSettings::default()
    }
}

/// Waits (real time, bounded) until the agent is in `state`.
async fn until_state(service: &AgentLifecycleService, id: AgentId, state: AgentState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = service.get_agent(id).expect("agent").state;
        if now == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent in {now}, expected {state}"
        );
        tokio::task::yield_now().await;
    }
}

/// Advances paused time by `d`, letting the monitor's ticks run.
async fn advance(d: Duration) {
    tokio::time::advance(d).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

/// An agent in STARTING whose start waits for a heartbeat.
async fn starting(service: &AgentLifecycleService, health: &HeartbeatMonitor) -> AgentId {
    let id = service
        .register_agent(Registration::default())
        .await
        .expect("register")
        .agent
        .id;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    health
        .start(id, Some(true), ChangeRequest::default())
        .await
        .expect("starting");
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Starting
    );
    id
}

async fn last_reason(service: &AgentLifecycleService, id: AgentId) -> (String, String) {
    let history = service
        .history(id, HistoryQuery::default())
        .await
        .expect("history");
    let last = history.transitions.last().expect("a transition");
    (last.triggered_by.clone(), last.reason.clone())
}

/// First heartbeat: STARTING -> ONLINE. Steady heartbeats keep an idle
/// agent idle for ten minutes. Silence past heartbeat_timeout: ERROR naming
/// the numbers; heartbeats again: ONLINE.
#[tokio::test(start_paused = true)]
async fn heartbeats_complete_starts_and_silence_is_an_error() {
    let held = hold_the_clock();
    let service = service();
    let health = HeartbeatMonitor::new(service.clone(), settings());
    let monitor = tokio::spawn(health.clone().run());
    let id = starting(&service, &health).await;

    health
        .heartbeat(id, Some(0.25), Some("warm-up".into()))
        .await
        .expect("heartbeat");
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Online
    );
    let (by, reason) = last_reason(&service, id).await;
    assert_eq!(by, TRIGGER);
    assert!(reason.contains("first heartbeat"), "{reason}");
    assert!(
        service.metrics().encode_text().contains(
            "agent_lifecycle_transitions_total{from=\"starting\",source=\"health-monitor\",to=\"online\"} 1"
        ),
        "automatic transitions are counted by source"
    );
    let beat = health.local_heartbeat(id).expect("recorded");
    assert_eq!(beat.load, Some(0.25));
    assert_eq!(beat.current_task.as_deref(), Some("warm-up"));

    service
        .transition(id, AgentState::Idle, ChangeRequest::default())
        .await
        .expect("idle");
    for _ in 0..60 {
        advance(Duration::from_secs(10)).await;
        health.heartbeat(id, None, None).await.expect("heartbeat");
    }
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Idle,
        "ten minutes idle with steady heartbeats: untouched"
    );

    advance(Duration::from_secs(31)).await;
    until_state(&service, id, AgentState::Error).await;
    let (by, reason) = last_reason(&service, id).await;
    assert_eq!(by, TRIGGER);
    assert!(
        reason.starts_with("heartbeat missed: last seen") && reason.contains("timeout 30s"),
        "{reason}"
    );

    health.heartbeat(id, None, None).await.expect("heartbeat");
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Online
    );
    assert_eq!(last_reason(&service, id).await.1, "heartbeats resumed");
    let [beats, missed, ..] = service.metrics().automation();
    assert_eq!((beats, missed), (62, 1));
    monitor.abort();
    held.abort();
}

/// A start that never heartbeats: TIMEOUT after startup_timeout, restart
/// after 10 s, TIMEOUT again, restart after 20 s (doubling), TIMEOUT, and
/// with the two restarts spent, FAILED.
#[tokio::test(start_paused = true)]
async fn silent_starts_time_out_restart_with_backoff_and_fail() {
    let held = hold_the_clock();
    let service = service();
    let health = HeartbeatMonitor::new(service.clone(), settings());
    let monitor = tokio::spawn(health.clone().run());
    let id = starting(&service, &health).await;

    advance(Duration::from_secs(61)).await;
    until_state(&service, id, AgentState::Timeout).await;
    assert!(
        last_reason(&service, id)
            .await
            .1
            .contains("startup_timeout 60s")
    );
    // The restart waits 10 s: not after 5 s, then after 10 more.
    advance(Duration::from_secs(5)).await;
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Timeout
    );
    advance(Duration::from_secs(10)).await;
    until_state(&service, id, AgentState::Starting).await;
    assert!(
        last_reason(&service, id)
            .await
            .1
            .starts_with("restart 1 of 2 after 10s")
    );

    advance(Duration::from_secs(61)).await;
    until_state(&service, id, AgentState::Timeout).await;
    advance(Duration::from_secs(12)).await;
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Timeout,
        "the second restart waits 20 s"
    );
    advance(Duration::from_secs(12)).await;
    until_state(&service, id, AgentState::Starting).await;
    assert!(
        last_reason(&service, id)
            .await
            .1
            .starts_with("restart 2 of 2 after 20s")
    );

    // The third start times out; with both restarts spent, the next look
    // (no back-off) walks the agent to FAILED.
    advance(Duration::from_secs(61)).await;
    advance(Duration::from_secs(2)).await;
    until_state(&service, id, AgentState::Failed).await;
    let history = service
        .history(id, HistoryQuery::default())
        .await
        .expect("history");
    let tail: Vec<_> = history.transitions[history.transitions.len() - 3..]
        .iter()
        .map(|t| (t.to, t.triggered_by.clone(), t.reason.clone()))
        .collect();
    assert_eq!(tail[0].0, AgentState::Timeout);
    assert!(tail[0].2.contains("startup_timeout 60s"), "{tail:?}");
    for (to, by, reason) in &tail[1..] {
        assert_eq!(by, TRIGGER);
        assert_eq!(reason, "restarts exhausted: 2 of 2", "{to}");
    }
    assert_eq!(
        (tail[1].0, tail[2].0),
        (AgentState::Error, AgentState::Failed),
        "TIMEOUT -> ERROR -> FAILED, the policy's path"
    );
    let [_, _, restarts, stuck, _] = service.metrics().automation();
    assert_eq!((restarts, stuck), (2, 3));
    monitor.abort();
    held.abort();
}

/// After the monitor starts (a server restart), nothing fires during the
/// grace period, even for an agent silent past its timeout.
#[tokio::test(start_paused = true)]
async fn no_timeout_fires_during_the_grace_period() {
    let held = hold_the_clock();
    let service = service();
    let health = HeartbeatMonitor::new(
        service.clone(),
        HealthSettings {
            grace: Duration::from_secs(120),
            ..settings()
        },
    );
    let monitor = tokio::spawn(health.clone().run());
    let id = starting(&service, &health).await;
    health.heartbeat(id, None, None).await.expect("heartbeat");
    advance(Duration::from_secs(100)).await;
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Online,
        "silent for 100 s, but within the 120 s grace"
    );
    advance(Duration::from_secs(25)).await;
    until_state(&service, id, AgentState::Error).await;
    monitor.abort();
    held.abort();
}

/// An agent stuck in DEPLOYING longer than its max_dwell moves along the
/// state's timeout edge (ERROR: DEPLOYING has no edge to TIMEOUT), whether
/// or not it ever sent a heartbeat, and is counted as stuck.
#[tokio::test(start_paused = true)]
async fn agents_stuck_past_max_dwell_move_along_the_timeout_edge() {
    let held = hold_the_clock();
    let service = service();
    let health = HeartbeatMonitor::new(
        service.clone(),
        HealthSettings {
            max_dwell: vec![(AgentState::Deploying, Duration::from_secs(120))],
            ..settings()
        },
    );
    let monitor = tokio::spawn(health.clone().run());
    let id = service
        .register_agent(Registration::default())
        .await
        .expect("register")
        .agent
        .id;
    service
        .transition(id, AgentState::Deploying, ChangeRequest::default())
        .await
        .expect("deploying");
    advance(Duration::from_secs(100)).await;
    assert_eq!(
        service.get_agent(id).expect("agent").state,
        AgentState::Deploying
    );
    advance(Duration::from_secs(25)).await;
    until_state(&service, id, AgentState::Error).await;
    let (by, reason) = last_reason(&service, id).await;
    assert_eq!(by, TRIGGER);
    assert!(
        reason.starts_with("stuck in deploying for") && reason.contains("max_dwell 120s"),
        "{reason}"
    );
    assert_eq!(service.metrics().automation()[3], 1, "counted as stuck");
    monitor.abort();
    held.abort();
}

/// A `[[health.rule]]` for `team=ml` allows a minute of silence where the
/// default allows 30 s: after 31 s only the other agent is in ERROR, after
/// 61 s both are.
#[tokio::test(start_paused = true)]
async fn rules_give_labelled_agents_their_own_timeouts() {
    use agent_lifecycle::app::config::Config;
    let held = hold_the_clock();
    let service = service();
    let file = Config::parse(
        "[health]\ngrace = \"0s\"\nheartbeat_timeout = \"30s\"\n\
         [[health.rule]]\nselector = { team = \"ml\" }\nheartbeat_timeout = \"60s\"\n",
    )
    .expect("config");
    let settings = file.health.expect("[health]").settings();
    assert_eq!(settings.rules.len(), 1);
    let health = HeartbeatMonitor::new(service.clone(), settings);
    let monitor = tokio::spawn(health.clone().run());
    let mut ids = Vec::new();
    for team in ["ml", "web"] {
        let mut labels = agent_lifecycle::domain::Labels::new();
        labels.insert("team".into(), team.into());
        let id = service
            .register_agent(Registration {
                labels,
                ..Default::default()
            })
            .await
            .expect("register")
            .agent
            .id;
        service
            .deploy_agent(id, ChangeRequest::default())
            .await
            .expect("deploy");
        service
            .start_agent(id, ChangeRequest::default())
            .await
            .expect("start");
        health.heartbeat(id, None, None).await.expect("heartbeat");
        ids.push(id);
    }
    let (ml, web) = (ids[0], ids[1]);
    advance(Duration::from_secs(31)).await;
    until_state(&service, web, AgentState::Error).await;
    assert_eq!(
        service.get_agent(ml).expect("agent").state,
        AgentState::Online
    );
    advance(Duration::from_secs(30)).await;
    until_state(&service, ml, AgentState::Error).await;
    assert!(last_reason(&service, ml).await.1.contains("timeout 60s"));
    monitor.abort();
    held.abort();
}

/// A deployed agent with `labels`.
async fn deployed(service: &AgentLifecycleService, labels: &[(&str, &str)]) -> AgentId {
    let id = service
        .register_agent(Registration {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
        .expect("register")
        .agent
        .id;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    id
}

/// `start_waits_for_heartbeat` in the settings (here: only for agents a
/// rule selects) makes a start that does not say otherwise stop in
/// STARTING, marked in the transition's metadata; the request's own choice
/// wins either way.
#[tokio::test(start_paused = true)]
async fn the_policy_decides_whether_starts_wait_for_a_heartbeat() {
    use agent_lifecycle::app::config::Config;
    let service = service();
    let file = Config::parse(
        "[health]\n[[health.rule]]\nselector = { runtime = \"space\" }\n\
         start_waits_for_heartbeat = true\n",
    )
    .expect("config");
    let health = HeartbeatMonitor::new(service.clone(), file.health.expect("[health]").settings());
    let state = |id| service.get_agent(id).expect("agent").state;

    let plain = deployed(&service, &[]).await;
    health
        .start(plain, None, ChangeRequest::default())
        .await
        .expect("start");
    assert_eq!(state(plain), AgentState::Online, "the default: at once");

    let space = deployed(&service, &[("runtime", "space")]).await;
    let outcome = health
        .start(space, None, ChangeRequest::default())
        .await
        .expect("start");
    assert_eq!(state(space), AgentState::Starting, "the rule: wait");
    let marker = &outcome.transitions[0].metadata;
    assert_eq!(marker.get(AWAIT_KEY), Some(&serde_json::Value::Bool(true)));
    assert!(awaits_heartbeat(&service.get_agent(space).expect("agent")));
    health.heartbeat(space, None, None).await.expect("beat");
    assert_eq!(state(space), AgentState::Online);

    let explicit = deployed(&service, &[("runtime", "space")]).await;
    health
        .start(explicit, Some(false), ChangeRequest::default())
        .await
        .expect("start");
    assert_eq!(state(explicit), AgentState::Online, "the request wins");
    let waiting = deployed(&service, &[]).await;
    health
        .start(waiting, Some(true), ChangeRequest::default())
        .await
        .expect("start");
    assert_eq!(state(waiting), AgentState::Starting, "the request wins");
}

/// The restart count lives in the monitor's transitions: a monitor that
/// takes over (another process, a server restart) carries on counting
/// instead of granting a fresh set of restarts.
#[tokio::test(start_paused = true)]
async fn a_monitor_taking_over_carries_on_counting_restarts() {
    let held = hold_the_clock();
    let service = service();
    let first = HeartbeatMonitor::new(service.clone(), settings());
    let monitor = tokio::spawn(first.clone().run());
    let id = starting(&service, &first).await;
    advance(Duration::from_secs(61)).await;
    until_state(&service, id, AgentState::Timeout).await;
    advance(Duration::from_secs(11)).await;
    until_state(&service, id, AgentState::Starting).await;
    assert!(
        last_reason(&service, id)
            .await
            .1
            .starts_with("restart 1 of 2")
    );
    monitor.abort();
    let _ = monitor.await;

    let second = HeartbeatMonitor::new(service.clone(), settings());
    let monitor = tokio::spawn(second.clone().run());
    advance(Duration::from_secs(61)).await;
    until_state(&service, id, AgentState::Timeout).await;
    assert!(
        last_reason(&service, id).await.1.contains("restart 1 of 2"),
        "the timeout names the attempt it ended"
    );
    advance(Duration::from_secs(21)).await;
    until_state(&service, id, AgentState::Starting).await;
    assert!(
        last_reason(&service, id)
            .await
            .1
            .starts_with("restart 2 of 2 after 20s"),
        "{:?}",
        last_reason(&service, id).await
    );
    advance(Duration::from_secs(61)).await;
    advance(Duration::from_secs(2)).await;
    until_state(&service, id, AgentState::Failed).await;
    monitor.abort();
    held.abort();
}
