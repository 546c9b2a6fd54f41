//! A small fleet monitor on the Rust client: prints the fleet (a snapshot),
//! then every change, and an ALERT line when an agent enters an error state
//! (ERROR, FAILED, TIMEOUT). The watch resumes by itself across server
//! restarts and cut connections.
//!
//!   cargo run --example monitor -- http://127.0.0.1:50051
//!
//! `AGENT_LIFECYCLE_TOKEN` is sent as the bearer token when set. With
//! `--count N` it stops after N events (for tests).

use agent_lifecycle::{
    client::{Client, ClientOptions, WatchItem, WatchOptions},
    pb,
};
use futures_util::StreamExt;

fn state_name(state: i32) -> String {
    pb::AgentState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("AGENT_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("state({state})"))
}

fn is_error(state: i32) -> bool {
    [
        pb::AgentState::Error,
        pb::AgentState::Failed,
        pb::AgentState::Timeout,
    ]
    .iter()
    .any(|s| *s as i32 == state)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let count: Option<usize> = match (args.next().as_deref(), args.next()) {
        (Some("--count"), Some(n)) => Some(n.parse()?),
        _ => None,
    };
    let options = ClientOptions {
        token: std::env::var("AGENT_LIFECYCLE_TOKEN").ok(),
        ..ClientOptions::default()
    };
    let client = Client::connect(&url, options).await?;
    let mut watch = client.watch(WatchOptions::snapshot());
    let mut events = 0;
    while let Some(item) = watch.next().await {
        match item? {
            WatchItem::SnapshotAgent(agent) => {
                println!(
                    "{} {:<12} {}",
                    agent.agent_id,
                    state_name(agent.state),
                    agent.name
                );
                if is_error(agent.state) {
                    println!("ALERT {} is {}", agent.agent_id, state_name(agent.state));
                }
            }
            WatchItem::SnapshotComplete { head_sequence } => {
                println!("-- fleet as of sequence {head_sequence}; following");
            }
            WatchItem::Event(event) => {
                let transition = event.transition.unwrap_or_default();
                println!(
                    "#{} {} {} -> {} ({})",
                    event.sequence,
                    event.agent_id,
                    state_name(transition.from_state),
                    state_name(transition.to_state),
                    transition.reason
                );
                if is_error(transition.to_state) {
                    println!(
                        "ALERT {} entered {}: {}",
                        event.agent_id,
                        state_name(transition.to_state),
                        transition.reason
                    );
                }
                events += 1;
                if count.is_some_and(|n| events >= n) {
                    return Ok(());
                }
            }
            WatchItem::Progress { .. } => {}
        }
    }
    Ok(())
}
