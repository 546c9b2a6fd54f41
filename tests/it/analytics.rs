//! State analytics from the event log, on tokio's paused clock against
//! hand-computed figures: time in each state, transitions, error entries,
//! time to recovery, availability, the state distribution over time, the
//! state an agent was in before the window began; the same figures after a
//! restart (SQLite, the durable log); and the RPCs over gRPC.

use crate::common;

use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use agent_lifecycle::{
    AgentLifecycleService,
    api::grpc::pb,
    automation::analytics::{self, AgentAnalytics},
    domain::{AgentId, AgentState, Labels},
    service::{ChangeRequest, Registration, ServiceConfig, TokioClock},
    store::SqliteStore,
};

const T0: u64 = 1_800_000_000;

/// Keeps the runtime busy so that paused time moves only by `advance` (an
/// idle paused runtime jumps to its next timer while the commit thread, a
/// real thread, works).
fn hold_the_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    })
}

fn open(path: &std::path::Path, now: u64) -> AgentLifecycleService {
    let config = ServiceConfig {
        clock: Arc::new(TokioClock::starting_at(
            UNIX_EPOCH + Duration::from_secs(now),
        )),
        ..ServiceConfig::default()
    };
    let store = SqliteStore::open(path).expect("sqlite");
    AgentLifecycleService::open(Arc::new(store), config).expect("service")
}

async fn register(service: &AgentLifecycleService, team: &str) -> AgentId {
    let mut labels = Labels::new();
    labels.insert("team".into(), team.into());
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

fn secs(a: &AgentAnalytics, state: AgentState) -> u64 {
    a.time_in_state.get(&state).map_or(0, Duration::as_secs)
}

/// Agent A: registered, deployed and started at 0; ERROR at 100; ONLINE
/// at 150; stopped at 400; seen at 1000. Agent B: registered at 0, nothing
/// else.
#[tokio::test(start_paused = true)]
async fn figures_match_the_hand_computed_ones_across_a_restart() {
    let held = hold_the_clock();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("analytics.db");
    let service = open(&path, T0);
    let a = register(&service, "ml").await;
    let b = register(&service, "web").await;
    let none = ChangeRequest::default;
    service.deploy_agent(a, none()).await.expect("deploy");
    service.start_agent(a, none()).await.expect("start");
    tokio::time::advance(Duration::from_secs(100)).await;
    service
        .handle_error(a, "out of memory", none())
        .await
        .expect("error");
    tokio::time::advance(Duration::from_secs(50)).await;
    service
        .transition(a, AgentState::Online, none())
        .await
        .expect("recover");
    tokio::time::advance(Duration::from_secs(250)).await;
    service.stop_agent(a, none()).await.expect("stop");
    tokio::time::advance(Duration::from_secs(600)).await;

    let check = |a_figures: &AgentAnalytics| {
        assert_eq!(a_figures.observed, Duration::from_secs(1000));
        assert_eq!(secs(a_figures, AgentState::Online), 350);
        assert_eq!(secs(a_figures, AgentState::Error), 50);
        assert_eq!(secs(a_figures, AgentState::Offline), 600);
        assert_eq!(secs(a_figures, AgentState::Registered), 0);
        assert_eq!(
            a_figures.transitions, 8,
            "deploy 2, start 2, error, recovery, stop 2"
        );
        assert_eq!((a_figures.error_entries, a_figures.recoveries), (1, 1));
        assert_eq!(
            a_figures.mean_time_to_recovery(),
            Some(Duration::from_secs(50))
        );
        assert!((a_figures.availability() - 0.35).abs() < 1e-9);
        let last_error = a_figures.last_error.as_ref().expect("last error");
        assert_eq!(last_error.to, AgentState::Error);
        assert_eq!(last_error.reason, "Error: out of memory");
    };
    let window = Duration::from_secs(1000);
    let (figures, start, end) = analytics::for_agent(&service, a, window)
        .await
        .expect("agent analytics");
    assert_eq!(start, UNIX_EPOCH + Duration::from_secs(T0));
    assert_eq!(end, UNIX_EPOCH + Duration::from_secs(T0 + 1000));
    check(&figures);

    let fleet = analytics::for_fleet(&service, window, &Labels::new(), 4, 10)
        .await
        .expect("fleet analytics");
    assert_eq!(fleet.agents, 2);
    assert_eq!(fleet.total.observed, Duration::from_secs(2000));
    assert_eq!(secs(&fleet.total, AgentState::Registered), 1000);
    assert_eq!(fleet.total.transitions, 8);
    assert!((fleet.total.availability() - 0.175).abs() < 1e-9);
    let errors: Vec<_> = fleet.top_by_errors.iter().map(|t| t.agent_id).collect();
    assert_eq!(errors, [Some(a)], "B never erred");
    let states: Vec<(u64, Vec<(AgentState, u64)>)> = fleet
        .distribution
        .iter()
        .map(|(at, counts)| {
            (
                at.duration_since(UNIX_EPOCH)
                    .expect("after epoch")
                    .as_secs()
                    - T0,
                counts.iter().map(|(s, n)| (*s, *n)).collect(),
            )
        })
        .collect();
    use AgentState::*;
    assert_eq!(
        states,
        [
            (250, vec![(Registered, 1), (Online, 1)]),
            (500, vec![(Registered, 1), (Offline, 1)]),
            (750, vec![(Registered, 1), (Offline, 1)]),
            (1000, vec![(Registered, 1), (Offline, 1)]),
        ]
    );
    let ml = Labels::from([("team".to_string(), "ml".to_string())]);
    let only_ml = analytics::for_fleet(&service, window, &ml, 1, 10)
        .await
        .expect("by label");
    assert_eq!(only_ml.agents, 1);

    // A window that starts after the last change: the state the agent was
    // in all along.
    let (late, _, _) = analytics::for_agent(&service, a, Duration::from_secs(500))
        .await
        .expect("late window");
    assert_eq!(secs(&late, AgentState::Offline), 500);
    assert_eq!((late.transitions, late.availability()), (0, 0.0));
    let (quiet, _, _) = analytics::for_agent(&service, b, window).await.expect("B");
    assert_eq!(secs(&quiet, AgentState::Registered), 1000);

    // After a restart, from the durable log: the same figures.
    service.close().await.expect("close");
    drop(service);
    let reopened = open(&path, T0 + 1000);
    let (again, _, _) = analytics::for_agent(&reopened, a, window)
        .await
        .expect("after the restart");
    check(&again);
    reopened.close().await.expect("close");
    held.abort();
}

/// The RPCs answer with the same figures, and refuse bad windows.
#[tokio::test]
async fn the_rpcs_answer_over_grpc() {
    let server = common::TestServer::start().await;
    let mut c = server.client().await;
    let agent = common::online(&mut c, &[("team", "ml")]).await;
    c.handle_error(pb::HandleErrorRequest {
        agent_id: agent.agent_id.clone(),
        error_message: "boom".into(),
        ..Default::default()
    })
    .await
    .expect("error");
    let figures = c
        .get_agent_analytics(pb::GetAgentAnalyticsRequest {
            agent_id: agent.agent_id.clone(),
            window: None,
        })
        .await
        .expect("agent analytics")
        .into_inner()
        .analytics
        .expect("analytics");
    assert_eq!((figures.transitions, figures.error_entries), (5, 1));
    assert_eq!(figures.agent_id, agent.agent_id);
    assert_eq!(
        figures.last_error.expect("last error").reason,
        "Error: boom"
    );
    let fleet = c
        .get_fleet_analytics(pb::GetFleetAnalyticsRequest {
            labels: [("team".to_string(), "ml".to_string())].into(),
            buckets: 3,
            ..Default::default()
        })
        .await
        .expect("fleet analytics")
        .into_inner();
    assert_eq!(fleet.agents, 1);
    assert_eq!(fleet.distribution.len(), 3);
    assert_eq!(fleet.top_by_errors.len(), 1);
    let bad = c
        .get_agent_analytics(pb::GetAgentAnalyticsRequest {
            agent_id: agent.agent_id.clone(),
            window: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
        })
        .await
        .expect_err("negative window");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}
