//! The change commands: `register` and the nine that move an agent
//! (`transition`, `deploy`, `start`, `stop`, `assign`, `complete`, `error`,
//! `maintenance`, `resume`), with their flags.
//!
//! Every change request carries the same fields (agent id, reason, who,
//! metadata, expected version, idempotency key) and every answer the same
//! two (the transitions made, the agent left). [`Mutation`] is that shape,
//! implemented once per request type by the table at `mutations!`; the
//! nine commands differ only in the fields of their own, which [`mutate`]
//! lets each set. A new change command is a line of that table, its flags
//! and an arm of [`change`].

use anyhow::{Context, bail};
use clap::Args;
use prost_types::Struct;
use serde_json::json;
use tonic::{Request, Status};

use agent_lifecycle::{api::grpc::pb, domain::AgentState};

use super::{Client, Command, Format, Session, parse_pair, parse_state, status_error, wire_state};

/// What every change may carry.
#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// Why (recorded in the history).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who (recorded in the history); the server defaults to `system`.
    #[arg(long = "by", default_value = "")]
    pub triggered_by: String,
    /// Metadata entry KEY=VALUE (string value); repeatable.
    #[arg(long = "meta", value_parser = parse_pair)]
    pub meta: Vec<(String, String)>,
    /// Metadata as a JSON object (merged under --meta).
    #[arg(long = "metadata")]
    pub metadata_json: Option<String>,
    /// Apply only if the agent is at this version.
    #[arg(long)]
    pub expected_version: Option<u64>,
    /// Idempotency key: running the same command again with the same id
    /// returns the first answer without a second change.
    #[arg(long, default_value = "")]
    pub request_id: String,
}

/// `register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Agent id (UUID); default: the server generates one.
    #[arg(long = "id")]
    pub agent_id: Option<String>,
    /// Display name.
    #[arg(long, default_value = "")]
    pub name: String,
    /// Label KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Print only the agent's id (for scripts).
    #[arg(short, long)]
    pub quiet: bool,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `transition`.
#[derive(Debug, Args)]
pub struct TransitionArgs {
    /// Agent id.
    pub agent_id: String,
    /// Target state (e.g. online).
    #[arg(value_parser = parse_state)]
    pub target: AgentState,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `deploy`, `start`, `stop`, `maintenance`, `resume`.
#[derive(Debug, Args)]
pub struct OpArgs {
    /// Agent id.
    pub agent_id: String,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub op: OpArgs,
    /// Stay in STARTING until the agent's first heartbeat (`true`), or go
    /// on to ONLINE at once (`false`); unset: as the server's health
    /// settings say.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub wait_for_heartbeat: Option<bool>,
}

/// `assign`, `complete`.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// Agent id.
    pub agent_id: String,
    /// Task id, recorded in the metadata.
    #[arg(long = "task", default_value = "")]
    pub task_id: String,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `error`.
#[derive(Debug, Args)]
pub struct ErrorArgs {
    /// Agent id.
    pub agent_id: String,
    /// What went wrong.
    pub message: String,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// The fields every change request carries, read from the command line.
pub(super) struct Change {
    agent_id: String,
    reason: String,
    triggered_by: String,
    metadata: Option<Struct>,
    expected_version: Option<u64>,
    request_id: String,
}

impl Change {
    /// # Errors
    /// `--metadata` is not a JSON object.
    fn parse(agent_id: String, args: ChangeArgs) -> anyhow::Result<Self> {
        Ok(Change {
            agent_id,
            metadata: metadata(&args)?,
            reason: args.reason,
            triggered_by: args.triggered_by,
            expected_version: args.expected_version,
            request_id: args.request_id,
        })
    }
}

/// `--metadata`'s object with every `--meta` entry put in it.
fn metadata(change: &ChangeArgs) -> anyhow::Result<Option<Struct>> {
    let mut map = match &change.metadata_json {
        Some(text) => match serde_json::from_str::<serde_json::Value>(text)
            .context("--metadata is not JSON")?
        {
            serde_json::Value::Object(map) => map,
            _ => bail!("--metadata must be a JSON object"),
        },
        None => serde_json::Map::new(),
    };
    for (k, v) in &change.meta {
        map.insert(k.clone(), json!(v));
    }
    Ok(agent_lifecycle::api::grpc::convert::metadata_to_pb(&map))
}

/// What a change did: the transitions it made and the agent it left.
pub(super) struct Changed {
    agent: Option<pb::Agent>,
    transitions: Vec<pb::StateTransition>,
}

/// A change request: built from the fields every change carries, sent
/// with one RPC, answered with what it did.
pub(super) trait Mutation: Sized {
    /// The request with `change`'s fields set; the request's own fields
    /// (target state, task id, ...) keep their defaults.
    fn from_change(change: Change) -> Self;

    /// Sends the request.
    ///
    /// # Errors
    /// The server's status.
    async fn send(client: &mut Client, request: Request<Self>) -> Result<Changed, Status>;
}

/// Implements [`Mutation`] for each `Request => rpc { fields }`: the
/// braces name the fields of [`Change`] the request has besides
/// `agent_id`, `triggered_by`, `metadata` and `request_id`, which all have.
macro_rules! mutations {
    ($($request:ident => $rpc:ident { $($field:ident),* }),* $(,)?) => {$(
        impl Mutation for pb::$request {
            // The update fills the request's own fields; a request with
            // none has nothing to fill.
            #[allow(clippy::needless_update)]
            fn from_change(change: Change) -> Self {
                pb::$request {
                    agent_id: change.agent_id,
                    triggered_by: change.triggered_by,
                    metadata: change.metadata,
                    request_id: change.request_id,
                    $($field: change.$field,)*
                    ..Default::default()
                }
            }

            async fn send(client: &mut Client, request: Request<Self>) -> Result<Changed, Status> {
                let response = client.$rpc(request).await?.into_inner();
                Ok(Changed {
                    agent: response.agent,
                    transitions: response.transitions,
                })
            }
        }
    )*};
}

mutations! {
    // A new agent has no version to expect.
    RegisterAgentRequest => register_agent { reason },
    TransitionAgentRequest => transition_agent { reason, expected_version },
    DeployAgentRequest => deploy_agent { reason, expected_version },
    StartAgentRequest => start_agent { reason, expected_version },
    StopAgentRequest => stop_agent { reason, expected_version },
    AssignTaskRequest => assign_task { reason, expected_version },
    CompleteTaskRequest => complete_task { reason, expected_version },
    // The error message is the reason.
    HandleErrorRequest => handle_error { expected_version },
    PutInMaintenanceRequest => put_in_maintenance { reason, expected_version },
    ResumeFromMaintenanceRequest => resume_from_maintenance { reason, expected_version },
}

/// A change command: the request `R` for `agent_id` with the flags every
/// change takes, `own` setting the command's own fields; sends it with
/// the per-call deadline and prints what it did.
///
/// # Errors
/// `--metadata` is not a JSON object, or the server's status.
pub(super) async fn mutate<R: Mutation>(
    s: &mut Session,
    agent_id: String,
    args: ChangeArgs,
    own: impl FnOnce(&mut R),
) -> anyhow::Result<()> {
    let mut request = R::from_change(Change::parse(agent_id, args)?);
    own(&mut request);
    let request = s.request(request);
    let changed = R::send(&mut s.client, request)
        .await
        .map_err(status_error)?;
    s.print_change(changed.agent, changed.transitions);
    Ok(())
}

/// One of the nine change commands: the request of each, with its own
/// fields.
///
/// # Errors
/// As [`mutate`]; a command that is no change is refused.
pub(super) async fn change(s: &mut Session, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Transition(a) => {
            mutate::<pb::TransitionAgentRequest>(s, a.agent_id, a.change, |r| {
                r.target_state = wire_state(a.target);
            })
            .await
        }
        Command::Deploy(a) => {
            mutate::<pb::DeployAgentRequest>(s, a.agent_id, a.change, |_| {}).await
        }
        Command::Start(a) => {
            mutate::<pb::StartAgentRequest>(s, a.op.agent_id, a.op.change, |r| {
                r.wait_for_heartbeat = a.wait_for_heartbeat;
            })
            .await
        }
        Command::Stop(a) => mutate::<pb::StopAgentRequest>(s, a.agent_id, a.change, |_| {}).await,
        Command::Assign(a) => {
            mutate::<pb::AssignTaskRequest>(s, a.agent_id, a.change, |r| r.task_id = a.task_id)
                .await
        }
        Command::Complete(a) => {
            mutate::<pb::CompleteTaskRequest>(s, a.agent_id, a.change, |r| r.task_id = a.task_id)
                .await
        }
        // The message is HandleError's reason; `--reason` is unused.
        Command::Error(a) => {
            mutate::<pb::HandleErrorRequest>(s, a.agent_id, a.change, |r| {
                r.error_message = a.message;
            })
            .await
        }
        Command::Maintenance(a) => {
            mutate::<pb::PutInMaintenanceRequest>(s, a.agent_id, a.change, |_| {}).await
        }
        Command::Resume(a) => {
            mutate::<pb::ResumeFromMaintenanceRequest>(s, a.agent_id, a.change, |_| {}).await
        }
        _ => bail!("not a change command"),
    }
}

/// `register`: RegisterAgent; the new agent's id first (or alone with
/// `--quiet`), then what the change did.
pub(super) async fn register(s: &mut Session, a: RegisterArgs) -> anyhow::Result<()> {
    let change = Change::parse(a.agent_id.unwrap_or_default(), a.change)?;
    let mut request = pb::RegisterAgentRequest::from_change(change);
    request.name = a.name;
    request.labels = a.labels.into_iter().collect();
    let request = s.request(request);
    let changed = pb::RegisterAgentRequest::send(&mut s.client, request)
        .await
        .map_err(status_error)?;
    let id = changed
        .agent
        .as_ref()
        .map(|agent| agent.agent_id.clone())
        .unwrap_or_default();
    if a.quiet {
        println!("{id}");
        return Ok(());
    }
    // The new agent's id first: the one thing the next command needs.
    if s.format == Format::Text {
        println!("{id}");
    }
    s.print_change(changed.agent, changed.transitions);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        Change::parse(
            "a1".to_string(),
            ChangeArgs {
                reason: "why".to_string(),
                triggered_by: "who".to_string(),
                meta: vec![("k".to_string(), "v".to_string())],
                metadata_json: Some(r#"{"n": 1}"#.to_string()),
                expected_version: Some(7),
                request_id: "r1".to_string(),
            },
        )
        .expect("valid metadata")
    }

    #[test]
    fn a_change_fills_the_fields_every_request_carries() {
        let deploy = pb::DeployAgentRequest::from_change(change());
        assert_eq!(deploy.agent_id, "a1");
        assert_eq!(deploy.reason, "why");
        assert_eq!(deploy.triggered_by, "who");
        assert_eq!(deploy.expected_version, Some(7));
        assert_eq!(deploy.request_id, "r1");
        let fields = &deploy.metadata.expect("metadata").fields;
        assert!(
            fields.contains_key("k") && fields.contains_key("n"),
            "{fields:?}"
        );

        let assign = pb::AssignTaskRequest::from_change(change());
        assert_eq!(
            (assign.reason.as_str(), assign.task_id.as_str()),
            ("why", "")
        );
        let error = pb::HandleErrorRequest::from_change(change());
        assert_eq!(
            (error.triggered_by.as_str(), error.expected_version),
            ("who", Some(7))
        );
        let register = pb::RegisterAgentRequest::from_change(change());
        assert_eq!(
            (register.agent_id.as_str(), register.reason.as_str()),
            ("a1", "why")
        );
    }

    #[test]
    fn metadata_that_is_no_json_object_is_refused() {
        for (text, message) in [
            ("[1]", "--metadata must be a JSON object"),
            ("nope", "--metadata is not JSON"),
        ] {
            let args = ChangeArgs {
                reason: String::new(),
                triggered_by: String::new(),
                meta: Vec::new(),
                metadata_json: Some(text.to_string()),
                expected_version: None,
                request_id: String::new(),
            };
            let err = Change::parse(String::new(), args).err().expect("refused");
            assert!(format!("{err:#}").starts_with(message), "{err:#}");
        }
    }
}
