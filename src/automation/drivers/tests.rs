//! The runner against a scripted driver: what the platform is asked to do,
//! in order; retries; refusals recorded as ERROR; resuming from the cursor.

use std::{collections::VecDeque, sync::Mutex};

use tokio::{sync::mpsc, time::timeout};

use super::*;
use crate::{
    domain::{AgentId, Labels},
    service::Registration,
};

/// A step's deadline: a bug fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

/// Records every call and answers from a script (then `Ok`); the
/// platform shows as done the actions listed in `done`.
struct Scripted {
    calls: mpsc::UnboundedSender<(Binding, PlatformAction)>,
    answers: Mutex<VecDeque<Result<(), PlatformError>>>,
    done: Mutex<Vec<PlatformAction>>,
}

impl Driver for Scripted {
    fn name(&self) -> &'static str {
        "test-driver"
    }

    fn binds(&self, binding: &Binding) -> bool {
        matches!(binding, Binding::Docker { .. })
    }

    fn settled<'a>(&'a self, _: Target<'a>, action: PlatformAction) -> SettleFuture<'a> {
        let done = self
            .done
            .lock()
            .map(|done| done.contains(&action))
            .unwrap_or(false);
        Box::pin(async move { Ok(done) })
    }

    fn act<'a>(&'a self, target: Target<'a>, action: PlatformAction) -> ActFuture<'a> {
        let _ = self.calls.send((target.binding.clone(), action));
        let answer = self
            .answers
            .lock()
            .map(|mut answers| answers.pop_front())
            .ok()
            .flatten()
            .unwrap_or(Ok(()));
        Box::pin(async move { answer })
    }
}

fn settings() -> DriverSettings {
    DriverSettings {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        max_attempts: 3,
        lease_retry: Duration::from_millis(10),
    }
}

type Calls = mpsc::UnboundedReceiver<(Binding, PlatformAction)>;

fn start(
    service: &AgentLifecycleService,
    answers: Vec<Result<(), PlatformError>>,
) -> (tokio::task::JoinHandle<()>, Calls) {
    start_showing(service, answers, Vec::new())
}

/// A runner whose platform already shows `done` as done.
fn start_showing(
    service: &AgentLifecycleService,
    answers: Vec<Result<(), PlatformError>>,
    done: Vec<PlatformAction>,
) -> (tokio::task::JoinHandle<()>, Calls) {
    let (tx, rx) = mpsc::unbounded_channel();
    let driver = Arc::new(Scripted {
        calls: tx,
        answers: Mutex::new(answers.into()),
        done: Mutex::new(done),
    });
    let runner = tokio::spawn(run(service.clone(), driver, settings()));
    (runner, rx)
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

async fn next_call(calls: &mut Calls) -> (Binding, PlatformAction) {
    timeout(STEP, calls.recv())
        .await
        .expect("a call in time")
        .expect("the runner is alive")
}

/// Waits until the driver has handled every event up to `sequence`.
async fn handled_through(service: &AgentLifecycleService, sequence: u64) {
    timeout(STEP, async {
        while service.cursor("test-driver").await.expect("cursor") <= sequence {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the cursor advances in time");
}

fn docker(name: &str) -> Binding {
    Binding::Docker {
        container: name.into(),
    }
}

/// Waits for the runner to have started: it has set its cursor.
async fn started(service: &AgentLifecycleService) {
    timeout(STEP, async {
        while service.cursor("test-driver").await.expect("cursor") == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the runner starts in time");
}

/// Deploying, starting and stopping a bound agent makes the platform
/// create, start and stop it, in order; an agent bound elsewhere or not
/// bound at all asks nothing of this driver.
#[tokio::test]
async fn the_platform_follows_a_bound_agent_and_nothing_else() {
    let service = AgentLifecycleService::in_memory().expect("service");
    // Something before the runner starts: it begins at the head, so this is
    // not replayed.
    let old = register(&service, &[("docker.container", "old")]).await;
    service
        .deploy_agent(old, ChangeRequest::default())
        .await
        .expect("deploy");
    let (runner, mut calls) = start(&service, Vec::new());
    started(&service).await;

    let other = register(&service, &[("hf.space", "acme/bot")]).await;
    let plain = register(&service, &[("team", "ml")]).await;
    for id in [other, plain] {
        service
            .deploy_agent(id, ChangeRequest::default())
            .await
            .expect("deploy");
    }
    let bound = register(&service, &[("docker.container", "agent-7")]).await;
    service
        .deploy_agent(bound, ChangeRequest::default())
        .await
        .expect("deploy");
    service
        .start_agent(bound, ChangeRequest::default())
        .await
        .expect("start");
    service
        .stop_agent(bound, ChangeRequest::default())
        .await
        .expect("stop");

    // The runner handles events in order: the first call is the bound
    // agent's, so the others asked for nothing.
    // StopAgent goes on from STOPPING to OFFLINE, where the platform has
    // nothing more to do.
    for expected in [
        PlatformAction::Create,
        PlatformAction::Start,
        PlatformAction::Stop,
    ] {
        assert_eq!(next_call(&mut calls).await, (docker("agent-7"), expected));
    }
    handled_through(&service, service.head_sequence()).await;
    assert!(calls.try_recv().is_err(), "nothing more was asked");
    runner.abort();
}

/// The sum of the counters of `family` with `labels`.
fn counted(service: &AgentLifecycleService, family: &str, labels: &[(&str, &str)]) -> f64 {
    service
        .metrics()
        .registry()
        .gather()
        .iter()
        .filter(|f| f.name() == family)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// Transient failures are retried until the platform acts; a refusal moves
/// the agent to ERROR with the platform's message and code.
#[tokio::test]
async fn retries_then_refusals_are_recorded_as_error() {
    let service = AgentLifecycleService::in_memory().expect("service");
    let transient = || Err(PlatformError::Transient("daemon busy".into()));
    let refused = Err(PlatformError::Refused {
        message: "No such image: agent:latest".into(),
        code: "404".into(),
    });
    let (runner, mut calls) = start(&service, vec![transient(), transient(), Ok(()), refused]);
    started(&service).await;

    let id = register(&service, &[("docker.container", "agent-7")]).await;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    for _ in 0..3 {
        assert_eq!(
            next_call(&mut calls).await,
            (docker("agent-7"), PlatformAction::Create)
        );
    }
    // STARTING alone (StartAgent would go on to ONLINE at once, and a
    // refusal never overrides a newer state).
    service
        .transition(id, AgentState::Starting, ChangeRequest::default())
        .await
        .expect("starting");
    assert_eq!(
        next_call(&mut calls).await,
        (docker("agent-7"), PlatformAction::Start)
    );
    let agent = timeout(STEP, async {
        loop {
            let agent = service.get_agent(id).expect("agent");
            if agent.state == AgentState::Error {
                return agent;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the agent moves to ERROR in time");
    let record = &agent.last_transition;
    assert_eq!(record.from, Some(AgentState::Starting));
    assert_eq!(record.triggered_by, "test-driver");
    assert!(
        record
            .reason
            .contains("start failed: No such image: agent:latest"),
        "{}",
        record.reason
    );
    assert_eq!(record.metadata["platform_code"], "404");
    let counted = |family: &str, labels: &[(&str, &str)]| counted(&service, family, labels);
    assert_eq!(
        counted(
            "agent_lifecycle_driver_retries_total",
            &[("driver", "test-driver")]
        ),
        2.0
    );
    assert_eq!(
        counted(
            "agent_lifecycle_driver_actions_total",
            &[("action", "create"), ("outcome", "done")]
        ),
        1.0
    );
    assert_eq!(
        counted(
            "agent_lifecycle_driver_actions_total",
            &[("action", "start"), ("outcome", "refused")]
        ),
        1.0
    );
    runner.abort();
}

/// A runner that stops and a new one that starts (a restart, or another
/// process after a failover) resume from the cursor: what was handled is
/// not asked again, what happened in between is.
#[tokio::test]
async fn a_new_runner_resumes_from_the_cursor() {
    let service = AgentLifecycleService::in_memory().expect("service");
    let (runner, mut calls) = start(&service, Vec::new());
    started(&service).await;
    let id = register(&service, &[("docker.container", "agent-7")]).await;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    assert_eq!(next_call(&mut calls).await.1, PlatformAction::Create);
    handled_through(&service, service.head_sequence()).await;
    runner.abort();
    let _ = runner.await;

    service
        .start_agent(id, ChangeRequest::default())
        .await
        .expect("start while no runner runs");
    let (runner, mut calls) = start(&service, Vec::new());
    assert_eq!(
        next_call(&mut calls).await,
        (docker("agent-7"), PlatformAction::Start),
        "the start made while no runner ran is acted on, and the create is not repeated"
    );
    handled_through(&service, service.head_sequence()).await;
    assert!(calls.try_recv().is_err());
    runner.abort();
}

/// An action the platform already shows done (its outcome was unknown: the
/// process died after acting, before its cursor moved) is settled by
/// reading the platform, not done again; a restart by the health monitor
/// asks for a restart, not a start.
#[tokio::test]
async fn an_action_the_platform_shows_done_is_not_repeated() {
    let service = AgentLifecycleService::in_memory().expect("service");
    let (runner, mut calls) = start_showing(&service, Vec::new(), vec![PlatformAction::Create]);
    started(&service).await;
    let id = register(&service, &[("docker.container", "agent-7")]).await;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    let restart = ChangeRequest {
        triggered_by: crate::automation::health::TRIGGER.into(),
        ..ChangeRequest::default()
    };
    service
        .transition(id, AgentState::Starting, restart)
        .await
        .expect("starting");
    assert_eq!(
        next_call(&mut calls).await,
        (docker("agent-7"), PlatformAction::Restart),
        "the create was settled by the platform's status; the restart is asked"
    );
    handled_through(&service, service.head_sequence()).await;
    assert!(calls.try_recv().is_err());
    assert_eq!(
        counted(
            &service,
            "agent_lifecycle_driver_actions_total",
            &[("action", "create"), ("outcome", "settled")]
        ),
        1.0
    );
    runner.abort();
}
