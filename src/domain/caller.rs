//! Who is asking: the identity a request arrives with, and what its role
//! lets it do.
//!
//! The gRPC edge fills it from the request (a layer around everything served
//! authenticates the call and puts the caller into the request's
//! extensions); the service receives it with every change and records the
//! principal with every transition. Without authentication every caller is
//! anonymous and may do everything.

use std::{fmt, str::FromStr, sync::Arc};

use super::{AgentId, PermissionDenied};

/// What a principal may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything. Also the role of an anonymous caller when the server
    /// runs without authentication, and of the server's own automation.
    #[default]
    Admin,
    /// Every transition and every read; not deletion (a transition to
    /// DELETED).
    Operator,
    /// Heartbeats and status reports (Heartbeat, HeartbeatStream,
    /// SyncExternalStatus, HandleError) for the agents bound to it, and
    /// reads of those agents (GetAgent, GetAgentHistory, WatchEvents limited
    /// to them, GetTransitionRules).
    Agent,
    /// Reads and WatchEvents only.
    Viewer,
}

impl Role {
    /// Every role, in order of decreasing power.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Agent, Role::Viewer];

    /// The role's name in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Agent => "agent",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (admin, operator, agent or viewer)"))
    }
}

/// The identity of the caller of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Caller {
    /// The authenticated principal's name; `None` for an anonymous caller
    /// (no authentication configured, or an in-process library call).
    pub principal: Option<Arc<str>>,
    /// What it may do.
    pub role: Role,
    /// For [`Role::Agent`]: the agents it acts for.
    pub agents: Arc<[AgentId]>,
}

impl Caller {
    /// A caller with no authenticated identity.
    pub fn anonymous() -> Self {
        Caller::default()
    }

    /// A caller known as `principal`, with every right (the server's own
    /// automation, in-process callers).
    pub fn principal(name: impl Into<Arc<str>>) -> Self {
        Caller {
            principal: Some(name.into()),
            ..Caller::default()
        }
    }

    /// An authenticated principal with `role`, acting for `agents` (for
    /// [`Role::Agent`]).
    pub fn authenticated(name: impl Into<Arc<str>>, role: Role, agents: Arc<[AgentId]>) -> Self {
        Caller {
            principal: Some(name.into()),
            role,
            agents,
        }
    }

    /// The principal's name; empty for an anonymous caller.
    pub fn principal_name(&self) -> &str {
        self.principal.as_deref().unwrap_or("")
    }

    /// Whether no identity was established.
    pub fn is_anonymous(&self) -> bool {
        self.principal.is_none()
    }

    /// Whether it may read or report for agent `id`: every role but
    /// [`Role::Agent`] may; an agent principal only for its own agents.
    pub fn may_act_for(&self, id: AgentId) -> bool {
        self.role != Role::Agent || self.agents.contains(&id)
    }

    /// Whether it may delete agents (move them to DELETED).
    pub fn may_delete(&self) -> bool {
        self.role == Role::Admin
    }

    /// Refuses an agent principal a call about another agent.
    ///
    /// # Errors
    /// [`PermissionDenied`] naming the agent.
    pub fn check_agent(&self, id: AgentId) -> Result<(), PermissionDenied> {
        if self.may_act_for(id) {
            return Ok(());
        }
        Err(self.denied(format!("act for agent {id}")))
    }

    /// The error refusing this caller `action`.
    pub fn denied(&self, action: impl Into<String>) -> PermissionDenied {
        PermissionDenied {
            principal: self.to_string(),
            role: self.role,
            action: action.into(),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.principal {
            Some(name) => f.write_str(name),
            None => f.write_str("anonymous"),
        }
    }
}
