//! Which role may call which method: the coarse check the [`super::CallLayer`]
//! makes before a call reaches its service. Checks that need the request's
//! content (an agent principal's own agents, deletion) are the handlers'.

use crate::domain::Role;

/// The lifecycle service's path prefix.
const LIFECYCLE: &str = "/agentlifecycle.v1.AgentLifecycleService/";

/// What a method needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Health checks and reflection: open to everyone, authenticated or not.
    Open,
    /// Fleet-wide reads: ListAgents, ListTransitions, GetLifecycleMetrics.
    ReadFleet,
    /// Reads of one agent: GetAgent, GetAgentHistory (an agent principal:
    /// its own), and WatchEvents (an agent principal: its own agents).
    ReadAgent,
    /// The policy: GetTransitionRules, for every principal.
    ReadPolicy,
    /// Transitions and registrations.
    Change,
    /// What agents report of themselves: Heartbeat, HeartbeatStream,
    /// SyncExternalStatus, HandleError.
    Report,
    /// A method this server does not know: any principal, who then gets
    /// UNIMPLEMENTED.
    Unknown,
}

/// What the method at gRPC `path` needs.
pub fn access(path: &str) -> Access {
    if path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
        return Access::Open;
    }
    let Some(method) = path.strip_prefix(LIFECYCLE) else {
        return Access::Unknown;
    };
    match method {
        "ListAgents" | "ListTransitions" | "GetLifecycleMetrics" | "GetFleetAnalytics" => {
            Access::ReadFleet
        }
        "GetAgent" | "GetAgentHistory" | "GetAgentAnalytics" | "WatchEvents" => Access::ReadAgent,
        "GetTransitionRules" => Access::ReadPolicy,
        "RegisterAgent"
        | "TransitionAgent"
        | "DeployAgent"
        | "StartAgent"
        | "StopAgent"
        | "AssignTask"
        | "CompleteTask"
        | "PutInMaintenance"
        | "ResumeFromMaintenance" => Access::Change,
        "Heartbeat" | "HeartbeatStream" | "SyncExternalStatus" | "HandleError" => Access::Report,
        _ => Access::Unknown,
    }
}

/// Whether `role` may call a method that needs `access`.
pub fn allows(role: Role, access: Access) -> bool {
    matches!(
        (role, access),
        (_, Access::Open | Access::ReadPolicy | Access::Unknown)
            | (Role::Admin | Role::Operator, _)
            | (Role::Agent, Access::ReadAgent | Access::Report)
            | (Role::Viewer, Access::ReadFleet | Access::ReadAgent)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_reach_what_they_should() {
        let path = |m: &str| format!("{LIFECYCLE}{m}");
        let can = |role, m: &str| allows(role, access(&path(m)));
        assert!(can(Role::Viewer, "WatchEvents"));
        assert!(can(Role::Viewer, "ListAgents"));
        assert!(!can(Role::Viewer, "TransitionAgent"));
        assert!(!can(Role::Viewer, "Heartbeat"));
        assert!(can(Role::Agent, "Heartbeat"));
        assert!(can(Role::Agent, "HandleError"));
        assert!(can(Role::Agent, "GetAgent"));
        assert!(!can(Role::Agent, "ListAgents"));
        assert!(!can(Role::Agent, "StartAgent"));
        assert!(can(Role::Operator, "RegisterAgent"));
        assert!(can(Role::Admin, "TransitionAgent"));
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(access("/nope.Service/Method"), Access::Unknown);
    }
}
