//! Errors returned by API calls ([`Error`]) and carried by error completions
//! ([`CqError`]).

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::sync::Arc;

/// The class of an [`Error`], in the spirit of libfabric's `-FI_E*` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// getinfo found nothing that matches the hints (`FI_ENODATA`).
    NoData,
    /// An argument is invalid: out of bounds, wrong size, missing access right.
    InvalidArgument,
    /// The provider or object does not support the operation (`FI_ENOSYS`).
    NotSupported,
    /// A resource is exhausted (queue full); retry after reaping completions (`FI_EAGAIN`).
    WouldBlock,
    /// A blocking call ran out of time.
    TimedOut,
    /// The peer refused the connection.
    ConnectionRefused,
    /// The endpoint is not connected (or no longer is).
    NotConnected,
    /// The address is already in use.
    AddressInUse,
    /// The address is not usable by this provider.
    AddressNotAvailable,
    /// The operation was refused for lack of rights.
    AccessDenied,
    /// The object was closed or shut down.
    Shutdown,
    /// The peer sent something that violates the protocol.
    Protocol,
    /// An operating-system I/O error.
    Io,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// A short lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NoData => "no matching provider",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotSupported => "not supported",
            ErrorKind::WouldBlock => "resource temporarily unavailable",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::ConnectionRefused => "connection refused",
            ErrorKind::NotConnected => "not connected",
            ErrorKind::AddressInUse => "address in use",
            ErrorKind::AddressNotAvailable => "address not available",
            ErrorKind::AccessDenied => "access denied",
            ErrorKind::Shutdown => "shut down",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Io => "I/O error",
            ErrorKind::Other => "error",
        }
    }
}

/// An error from an API call: a kind plus a message that says what and why, and the
/// underlying error ([`source`](std::error::Error::source)) where one caused it (an
/// `io::Error`, a [`CqError`]).
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    /// Borrowed for static messages, so that frequent errors on hot paths (a full
    /// queue: `WouldBlock`) allocate nothing.
    message: Cow<'static, str>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

/// Errors compare by kind and message (the source is not compared).
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}
impl Eq for Error {}

impl Error {
    /// Creates an error of `kind` with a message giving context.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }
    /// The same error, recording `source` as its cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }
    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }
    /// Shorthand for [`ErrorKind::NotSupported`].
    pub fn unsupported(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorKind::NotSupported, message)
    }
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The message (without the kind).
    pub fn message(&self) -> &str {
        &self.message
    }
    /// Prefixes the message with more context.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message).into();
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            f.write_str(self.kind.as_str())
        } else {
            write!(f, "{}: {}", self.kind.as_str(), self.message)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        let kind = match e.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::ConnectionRefused,
            io::ErrorKind::AddrInUse => ErrorKind::AddressInUse,
            io::ErrorKind::AddrNotAvailable => ErrorKind::AddressNotAvailable,
            io::ErrorKind::TimedOut => ErrorKind::TimedOut,
            io::ErrorKind::WouldBlock => ErrorKind::WouldBlock,
            io::ErrorKind::NotConnected => ErrorKind::NotConnected,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
            io::ErrorKind::PermissionDenied => ErrorKind::AccessDenied,
            io::ErrorKind::Unsupported => ErrorKind::NotSupported,
            _ => ErrorKind::Io,
        };
        Error::new(kind, e.to_string()).with_source(e)
    }
}

/// An error completion as an API error (used by operation futures): the kind that
/// fits the failure, the completion's description as the message, and the
/// [`CqError`] as the source.
impl From<CqError> for Error {
    fn from(e: CqError) -> Self {
        let kind = match e.kind {
            CqErrorKind::RemoteAccess | CqErrorKind::LocalProtection => ErrorKind::AccessDenied,
            CqErrorKind::RemoteInvalid | CqErrorKind::Truncated => ErrorKind::InvalidArgument,
            CqErrorKind::Canceled => ErrorKind::Shutdown,
            CqErrorKind::ConnectionLost
            | CqErrorKind::RetryExceeded
            | CqErrorKind::RnrRetryExceeded => ErrorKind::NotConnected,
            CqErrorKind::RemoteOperation => ErrorKind::Io,
            CqErrorKind::Other => ErrorKind::Other,
        };
        Error::new(kind, e.to_string()).with_source(e)
    }
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Why an operation completed in error (the detail of a libfabric `fi_cq_err_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CqErrorKind {
    /// The target refused a remote access: unknown key, out of bounds, or missing right.
    /// The target's memory was not touched.
    RemoteAccess,
    /// The target found the request malformed (e.g. a COMMIT into a region that is not
    /// registered PMEM).
    RemoteInvalid,
    /// The target failed to carry out the request (e.g. persisting failed).
    RemoteOperation,
    /// The received message was larger than the posted buffer; the completion's `len`
    /// holds the bytes that fit (placed in the buffer), the rest was discarded.
    Truncated,
    /// The operation was cancelled or flushed because the endpoint closed.
    Canceled,
    /// The connection was lost before the operation completed.
    ConnectionLost,
    /// The transport gave up retransmitting (retry count exceeded).
    RetryExceeded,
    /// The receiver had no buffer posted and the RNR retry count was exceeded.
    RnrRetryExceeded,
    /// A local protection or length problem.
    LocalProtection,
    /// Anything else.
    Other,
}

impl CqErrorKind {
    /// A short lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            CqErrorKind::RemoteAccess => "remote access error",
            CqErrorKind::RemoteInvalid => "remote invalid request",
            CqErrorKind::RemoteOperation => "remote operational error",
            CqErrorKind::Truncated => "message truncated",
            CqErrorKind::Canceled => "operation canceled",
            CqErrorKind::ConnectionLost => "connection lost",
            CqErrorKind::RetryExceeded => "retry count exceeded",
            CqErrorKind::RnrRetryExceeded => "RNR retry count exceeded",
            CqErrorKind::LocalProtection => "local protection error",
            CqErrorKind::Other => "error",
        }
    }
}

/// The error part of an error completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CqError {
    /// Class of the failure.
    pub kind: CqErrorKind,
    /// Provider-specific error number (e.g. an AETH syndrome or errno), 0 if none.
    pub prov_errno: i32,
    /// Human-readable detail from the provider.
    pub detail: String,
}

impl CqError {
    /// Creates an error entry.
    pub fn new(kind: CqErrorKind, prov_errno: i32, detail: impl Into<String>) -> Self {
        CqError {
            kind,
            prov_errno,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for CqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.as_str())?;
        if self.prov_errno != 0 {
            write!(f, " (provider errno {})", self.prov_errno)?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

impl std::error::Error for CqError {}
