//! Errors of the target and the host.

use std::fmt;

use crate::wire::rdma_cm::CmRejectStatus;
use crate::wire::{Status, StatusCode, StatusContext, WireError};

/// What went wrong in the target or the host.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The fabric refused an operation or reported an error.
    Fabric(fabric::Error),
    /// A command completed with a status other than success.
    Command {
        /// The completion's status.
        status: Status,
        /// How to read command-specific codes.
        context: StatusContext,
        /// Command specific DW0 (e.g. the invalid parameter location of Connect).
        dw0: u32,
    },
    /// The target rejected the connection (RDMA CM reject private data).
    Rejected(Option<CmRejectStatus>),
    /// Bytes from the peer did not parse.
    Wire(WireError),
    /// The provider's memory keys do not fit the 32-bit key of a keyed SGL.
    KeysTooWide {
        /// Provider name.
        provider: String,
        /// Its key size in bytes.
        key_size: usize,
    },
    /// A data transfer (RMA) of a command failed; the queue is no longer usable.
    Transfer(String),
    /// The queue's connection ended.
    Disconnected(String),
    /// Nothing arrived in time.
    Timeout(String),
    /// A back-end I/O error (file namespaces).
    Io(std::io::Error),
    /// A configuration that cannot work (bad NQN, size, address...).
    Config(String),
    /// The peer broke the protocol.
    Protocol(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The NVMe status code, for [`Error::Command`].
    pub fn status_code(&self) -> Option<StatusCode> {
        match self {
            Error::Command {
                status, context, ..
            } => Some(status.code(*context)),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Fabric(e) => write!(f, "fabric: {e}"),
            Error::Command {
                status, context, ..
            } => write!(
                f,
                "command failed: {:?} (SCT {:#x}, SC {:#04x}{})",
                status.code(*context),
                status.sct,
                status.sc,
                if status.dnr { ", DNR" } else { "" }
            ),
            Error::Rejected(s) => write!(f, "connection rejected by the target: {s:?}"),
            Error::Wire(e) => write!(f, "malformed data from the peer: {e}"),
            Error::KeysTooWide { provider, key_size } => write!(
                f,
                "provider {provider} has {key_size}-byte memory keys; keyed SGL descriptors \
                 carry 32-bit keys (choose a provider with mr_key_size <= 4, e.g. softroce)"
            ),
            Error::Transfer(m) => write!(f, "data transfer failed: {m}"),
            Error::Disconnected(m) => write!(f, "queue disconnected: {m}"),
            Error::Timeout(m) => write!(f, "timed out: {m}"),
            Error::Io(e) => write!(f, "I/O: {e}"),
            Error::Config(m) => write!(f, "configuration: {m}"),
            Error::Protocol(m) => write!(f, "protocol: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<fabric::Error> for Error {
    fn from(e: fabric::Error) -> Self {
        Error::Fabric(e)
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        Error::Wire(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}
