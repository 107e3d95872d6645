//! What a fleet operation fails with.

use crate::error::{PublishError, exit};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The store answered 403: the node may not write (or read) the fleet
    /// prefix. Nodes carry on by the signed policy alone.
    #[error(
        "no access to {url} ({detail}); the node needs s3:GetObject, s3:PutObject, \
         s3:DeleteObject and s3:ListBucket on the fleet prefix"
    )]
    Forbidden { url: String, detail: String },
    /// Any other failure of the store (the message names the URL).
    #[error(transparent)]
    Store(PublishError),
    /// A name that cannot be in a fleet key (a package, version, suite or
    /// node id).
    #[error("{reason}")]
    Invalid { reason: String },
    /// Neither the config, IMDS nor /etc/machine-id gave a node id.
    #[error("cannot determine this node's id ({}); set [fleet] node_id", tried.join("; "))]
    NoNodeId { tried: Vec<String> },
}

impl From<PublishError> for FleetError {
    fn from(error: PublishError) -> FleetError {
        match error {
            PublishError::StoreDenied { url, message } => FleetError::Forbidden {
                url,
                detail: message,
            },
            other => FleetError::Store(other),
        }
    }
}

impl FleetError {
    /// 64 for what the operator can fix in the command or config, 69 when
    /// the store cannot be used.
    pub fn exit_code(&self) -> u8 {
        match self {
            FleetError::Invalid { .. } | FleetError::NoNodeId { .. } => exit::USAGE,
            FleetError::Forbidden { .. } => exit::UNAVAILABLE,
            FleetError::Store(e) => e.exit_code(),
        }
    }
}
