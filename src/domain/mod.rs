//! The lifecycle domain: states, categories, the transition policy, agents,
//! transition records and events.
//!
//! Pure and synchronous: no tokio, tonic, prost or SQL. Everything above
//! depends on this module; it depends on nothing of the crate.

pub mod agent;
pub mod binding;
pub mod caller;
pub mod clock;
pub mod digest;
pub mod error;
pub mod external;
pub mod heartbeat;
pub mod hooks;
pub mod limits;
pub mod state;
pub mod time;
pub mod transition;

pub use agent::{
    Agent, AgentId, EventKind, Labels, LifecycleEvent, Metadata, RequestTag, TransitionRecord,
};
pub use binding::{Binding, PlatformAction, Workload, WorkloadKind};
pub use caller::{Caller, Role};
pub use clock::{Clock, SystemClock};
pub use error::{PermissionDenied, TransitionError};
pub use external::ExternalSource;
pub use heartbeat::Heartbeat;
pub use hooks::{HookError, HookPhase, TransitionContext};
pub use limits::FieldViolation;
pub use state::{AgentCategory, AgentState, StateSet};
pub use time::{parse_rfc3339, rfc3339};
pub use transition::TransitionPolicy;
