//! Who is asking: the identity a request arrives with.
//!
//! The gRPC edge fills it from the request (a layer around everything served
//! puts it into the request's extensions); the service receives it with
//! every change. Without authentication every caller is anonymous.

use std::{fmt, sync::Arc};

/// The identity of the caller of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Caller {
    /// The authenticated principal's name; `None` for an anonymous caller
    /// (no authentication configured, or an in-process library call).
    pub principal: Option<Arc<str>>,
}

impl Caller {
    /// A caller with no authenticated identity.
    pub fn anonymous() -> Self {
        Caller::default()
    }

    /// A caller authenticated as `principal`.
    pub fn principal(name: impl Into<Arc<str>>) -> Self {
        Caller {
            principal: Some(name.into()),
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
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.principal {
            Some(name) => f.write_str(name),
            None => f.write_str("anonymous"),
        }
    }
}
