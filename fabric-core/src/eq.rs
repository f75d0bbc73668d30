//! Event queues: connection requests, established connections, shutdowns, errors.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::domain::Fabric;
use crate::error::{Error, ErrorKind, Result};
use crate::info::Info;
use crate::provider::EqOps;
use crate::Fid;

/// Event queue attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EqAttr {
    /// Entries the queue should hold (a hint).
    pub size: usize,
}

impl Default for EqAttr {
    fn default() -> Self {
        EqAttr { size: 256 }
    }
}

/// A peer asks to connect. Open an endpoint from `info` and accept, or reject through
/// the passive endpoint.
#[derive(Debug, Clone)]
pub struct ConnRequest {
    /// Describes the request: open the accepting endpoint with it.
    pub info: Info,
    /// Connection data the peer sent with connect.
    pub data: Vec<u8>,
    /// The passive endpoint the request arrived on.
    pub listener: Fid,
}

/// Why a connection ended ([`Event::Shutdown`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShutdownReason {
    /// This side shut the connection down ([`Endpoint::shutdown`](crate::Endpoint::shutdown)).
    Local,
    /// The peer shut the connection down or closed its endpoint, in order.
    Peer,
    /// The connection was lost: reset, the peer vanished, or the transport's retries
    /// ran out.
    Lost,
    /// A remote access on this connection was refused (bad key, bounds, rights, or a
    /// COMMIT into memory that is not persistent), in either direction. As on RC
    /// hardware, where the NAK moves both queue pairs to the error state, the
    /// connection ends: see the crate docs, "One set of semantics".
    AccessError,
    /// The peer broke the protocol.
    Protocol,
}

impl ShutdownReason {
    /// A short lowercase description.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownReason::Local => "shut down locally",
            ShutdownReason::Peer => "shut down by the peer",
            ShutdownReason::Lost => "connection lost",
            ShutdownReason::AccessError => "remote access refused",
            ShutdownReason::Protocol => "protocol violation by the peer",
        }
    }
}

impl std::fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection-management event.
///
/// Non-exhaustive: match with a `_` arm (event kinds are added as the API grows).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A peer wants to connect.
    ConnRequest(Box<ConnRequest>),
    /// The endpoint `fid` is connected; `data` is the peer's connection data.
    Connected {
        /// The endpoint.
        fid: Fid,
        /// Connection data from the peer (accept data at the client, connect data was
        /// already given with the request at the server).
        data: Vec<u8>,
    },
    /// The connection of `fid` is closed (by either side, or lost); `reason` says why.
    Shutdown {
        /// The endpoint.
        fid: Fid,
        /// Why the connection ended.
        reason: ShutdownReason,
    },
    /// An asynchronous error on `fid` (e.g. the connection was refused or rejected).
    Error {
        /// The endpoint.
        fid: Fid,
        /// What went wrong.
        error: Error,
        /// Data the peer sent with a reject, if any.
        data: Vec<u8>,
    },
}

impl Event {
    /// The object the event is about.
    pub fn fid(&self) -> Fid {
        match self {
            Event::ConnRequest(r) => r.listener,
            Event::Connected { fid, .. }
            | Event::Shutdown { fid, .. }
            | Event::Error { fid, .. } => *fid,
        }
    }
}

/// An event queue. Clones share the queue.
#[derive(Clone)]
pub struct EventQueue {
    ops: Arc<dyn EqOps>,
    fabric: Fabric,
}

impl EventQueue {
    pub(crate) fn new(ops: Arc<dyn EqOps>, fabric: Fabric) -> Self {
        EventQueue { ops, fabric }
    }
    /// The provider's object.
    pub fn ops(&self) -> &Arc<dyn EqOps> {
        &self.ops
    }
    /// The fabric.
    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }
    /// The next event, without blocking.
    pub fn read(&self) -> Result<Option<Event>> {
        self.ops.read()
    }
    /// The next event, sleeping up to `timeout` (`None`: forever); `None` on timeout.
    pub fn sread(&self, timeout: Option<Duration>) -> Result<Option<Event>> {
        self.ops.sread(timeout)
    }
    /// The next event; `ErrorKind::TimedOut` after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(ev) = self.ops.sread(Some(left))? {
                return Ok(ev);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("no event within {timeout:?}"),
                ));
            }
        }
    }
}

/// Awaiting events from async code.
#[async_trait]
pub trait AsyncEvents {
    /// The next event.
    async fn next_event(&self) -> Result<Event>;
}

struct EventFuture<'a>(&'a EventQueue);

impl Future for EventFuture<'_> {
    type Output = Result<Event>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(ev) = self.0.ops.read()? {
            return Poll::Ready(Ok(ev));
        }
        self.0.ops.register_waker(cx.waker());
        match self.0.ops.read()? {
            Some(ev) => Poll::Ready(Ok(ev)),
            None => Poll::Pending,
        }
    }
}

#[async_trait]
impl AsyncEvents for EventQueue {
    async fn next_event(&self) -> Result<Event> {
        EventFuture(self).await
    }
}
