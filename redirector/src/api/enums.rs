//! The API's enums: from the node's own types, and the one word each is
//! shown as by the CLI (its tables and its JSON).

use super::pb;
use crate::{node::spec, supervise};

impl From<spec::Mode> for pb::Mode {
    fn from(mode: spec::Mode) -> Self {
        match mode {
            spec::Mode::Ambient => Self::Ambient,
            spec::Mode::None => Self::None,
            spec::Mode::Sidecar => Self::Sidecar,
        }
    }
}

impl From<spec::OriginalSrc> for pb::OriginalSrc {
    fn from(policy: spec::OriginalSrc) -> Self {
        match policy {
            spec::OriginalSrc::Undo => Self::Undo,
            spec::OriginalSrc::Preserve => Self::Preserve,
        }
    }
}

impl From<&supervise::State> for pb::ComponentState {
    fn from(state: &supervise::State) -> Self {
        match state {
            supervise::State::Starting => Self::Starting,
            supervise::State::Running => Self::Running,
            supervise::State::Failed(_) => Self::Failed,
        }
    }
}

impl pb::Mode {
    /// As `istio.io/dataplane-mode` spells it.
    pub fn word(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Ambient => "ambient",
            Self::None => "none",
            Self::Sidecar => "sidecar",
        }
    }
}

impl pb::OriginalSrc {
    /// As `--original-src` spells it.
    pub fn word(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Undo => "undo",
            Self::Preserve => "preserve",
        }
    }
}

impl pb::InboundCapture {
    pub fn word(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::None => "none",
            Self::Captured => "captured",
            Self::Bypassed => "bypassed",
            Self::Waiting => "waiting",
        }
    }
}

impl pb::ComponentState {
    pub fn word(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Failed => "failed",
        }
    }
}
