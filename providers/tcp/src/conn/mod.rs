//! One connection: its transmit queue, the operations waiting for an answer, posted
//! and unexpected receives, and the receive state machine that parses headers and
//! streams payloads straight between sockets and registered memory.
//!
//! By concern:
//! - [`framing`]: the transmit queue, `sendmsg` iovecs over registered memory, what
//!   follows once an operation is on the wire;
//! - [`parser`]: reading the socket, parsing headers, dispatching operations and
//!   answers;
//! - [`sink`]: where payload bytes land (scatter lists, buffers);
//! - [`matching`]: posted receives, unexpected messages and CQ data;
//! - [`rma_target`]: access checks and placement of remote writes and reads;
//! - [`lifecycle`]: the handshake's first step and every way a connection ends.
//!
//! All of it runs under the engine lock; nothing here blocks. Errors that end the
//! connection come back as [`Fatal`], and the caller calls [`Conn::fail`]. The tests
//! (`tests.rs`) drive a connection without a socket: they feed byte streams to the
//! parser and check the completions, events and bytes it would send.

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_core::{Completion, CqError, CqErrorKind, Event, Fid, RecvRequest, ShutdownReason};
use tracing::warn;

use crate::sys::{Epoll, Interest};
use crate::wire::{Op, ProtocolError};
use fabric_core::prov::KeyMap;
use fabric_core::wait::WaitQueue;

mod framing;
mod lifecycle;
mod matching;
mod parser;
mod rma_target;
mod sink;
#[cfg(test)]
mod tests;

pub(crate) use framing::{wire_iovs, AfterTx, Body, PendKind, Pending, TxOp};
use matching::Unexpected;
use parser::{AfterRx, Incoming, Phase, RxState};
use sink::Sink;

/// Completions as the engine delivers them.
pub(crate) type CompQueue = WaitQueue<Completion>;
/// Events as the engine delivers them.
pub(crate) type EventQueueShared = WaitQueue<Event>;

/// Unexpected (unmatched) message bytes buffered per connection before the socket is
/// no longer read, so TCP flow control pushes back on the sender.
pub(crate) const UNEXPECTED_LIMIT: usize = 64 << 20;
/// Unexpected entries buffered per connection (bounds zero-length floods).
const UNEXPECTED_MAX_ENTRIES: usize = 65_536;
/// Answers (ACKs, read responses) queued for the peer per connection past which the
/// socket is no longer read until the peer has taken some: a peer that sends requests
/// and never reads the answers is slowed by TCP flow control instead of growing the
/// transmit queue. A peer within its `tx_size` (1024 operations) never reaches it.
pub(crate) const TX_ANSWER_LIMIT: usize = 4096;
/// Per-connection receive buffer: headers and small payloads land here.
const RX_BUF_SIZE: usize = 64 << 10;
/// At most this many iovecs per sendmsg.
const TX_IOV_MAX: usize = 64;
/// At most this many bytes per sendmsg (keeps one call bounded).
const TX_BATCH_BYTES: usize = 16 << 20;
/// At most this many receive system calls per connection per progress call.
const RX_ROUNDS: usize = 32;
/// How long a connection that refused a remote access waits for the peer to close
/// after its refusal was sent, before it closes the socket itself.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

/// Why a connection ends: a typed error whose [`source`](std::error::Error::source)
/// is the I/O or wire error that caused it, if one did.
#[derive(Debug)]
pub(crate) enum Fatal {
    /// A socket call failed.
    Io {
        /// The call ("send", "receive").
        what: &'static str,
        source: io::Error,
    },
    /// The peer closed its end of the stream.
    PeerClosed,
    /// The peer broke the protocol.
    Protocol(Violation),
    /// The peer refused one of our remote accesses: the connection ends and what was
    /// posted after it completes `Canceled`. Holds the error the refused operation
    /// completed with.
    AccessRefused(CqError),
}

/// How the peer broke the protocol.
#[derive(Debug)]
pub(crate) enum Violation {
    /// A header that does not parse.
    Header(ProtocolError),
    /// An answer (ACK or READ_RESP) for an operation that is not waiting for one.
    UnknownAnswer { op: Op, op_id: u64 },
    /// A read response whose size is not the size of the read.
    ReadRespSize { size: u64, expected: usize },
    /// An operation that is not allowed in the connection's state.
    UnexpectedOp { op: Op, state: ConnState },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Header(e) => write!(f, "{e}"),
            Violation::UnknownAnswer { op, op_id } => {
                write!(f, "protocol error: {op:?} for unknown operation {op_id}")
            }
            Violation::ReadRespSize { size, expected } => write!(
                f,
                "protocol error: read response of {size} bytes for a read of {expected}"
            ),
            Violation::UnexpectedOp { op, state } => {
                write!(f, "protocol error: unexpected {op:?} in state {state:?}")
            }
        }
    }
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fatal::Io { what, source } => write!(f, "{what}: {source}"),
            Fatal::PeerClosed => f.write_str("peer closed the connection"),
            Fatal::Protocol(v) => write!(f, "{v}"),
            Fatal::AccessRefused(e) => f.write_str(&e.detail),
        }
    }
}

impl std::error::Error for Fatal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Fatal::Io { source, .. } => Some(source),
            Fatal::Protocol(Violation::Header(e)) => Some(e),
            _ => None,
        }
    }
}

impl Fatal {
    fn io(what: &'static str, source: io::Error) -> Fatal {
        Fatal::Io { what, source }
    }
    fn protocol(v: Violation) -> Fatal {
        Fatal::Protocol(v)
    }
    fn header(e: ProtocolError) -> Fatal {
        Fatal::Protocol(Violation::Header(e))
    }
    /// Whether the peer broke the protocol (reported as an `Error` event too).
    pub(crate) fn is_protocol(&self) -> bool {
        matches!(self, Fatal::Protocol(_))
    }
    /// What the Shutdown event says.
    pub(crate) fn reason(&self) -> ShutdownReason {
        match self {
            Fatal::Io { .. } => ShutdownReason::Lost,
            Fatal::PeerClosed => ShutdownReason::Peer,
            Fatal::Protocol(_) => ShutdownReason::Protocol,
            Fatal::AccessRefused(_) => ShutdownReason::AccessError,
        }
    }
    /// How the operations still outstanding complete.
    pub(crate) fn kind(&self) -> CqErrorKind {
        match self {
            Fatal::AccessRefused(_) => CqErrorKind::Canceled,
            _ => CqErrorKind::ConnectionLost,
        }
    }
}

/// Connection life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Opened from a getinfo answer; not connected yet.
    Idle,
    /// TCP connect in progress.
    Connecting,
    /// CONN_REQ sent; waiting for CONN_RESP.
    WaitConnResp,
    /// Opened from a connection request; `accept` not called yet.
    Accepting,
    /// Data may flow.
    Connected,
    /// This side refused a remote access: the refusal (NAK) and the answers queued
    /// ahead of it are still being sent, everything arriving is discarded, and the
    /// socket closes once the peer closes or [`LINGER`] passes. Posts fail.
    Closing,
    /// Shut down, refused or lost.
    Closed,
}

/// Everything the engine needs to report to.
pub(crate) struct Reporting {
    pub(crate) tx_cq: Arc<CompQueue>,
    pub(crate) rx_cq: Arc<CompQueue>,
    pub(crate) eq: Arc<EventQueueShared>,
    pub(crate) keys: Arc<KeyMap>,
}

/// One endpoint's connection.
pub(crate) struct Conn {
    pub(crate) fid: Fid,
    pub(crate) state: ConnState,
    pub(crate) sock: Option<TcpStream>,
    interest: Interest,
    pub(crate) rep: Reporting,
    next_op_id: u64,
    txq: VecDeque<TxOp>,
    tx_done: usize,
    /// Answers in `txq` (see [`TX_ANSWER_LIMIT`]).
    answers_queued: usize,
    pub(crate) want_write: bool,
    inflight: VecDeque<Pending>,
    /// Sends handed to the socket whose success completion waits for the answers to
    /// the writes and reads posted before them (op id, completion).
    deferred: VecDeque<(u64, Completion)>,
    posted: VecDeque<RecvRequest>,
    unexpected: VecDeque<Unexpected>,
    unexpected_bytes: usize,
    rx: RxState,
    pub(crate) tx_size: usize,
    pub(crate) rx_size: usize,
    pub(crate) connect_data: Vec<u8>,
    iov_scratch: Vec<libc::iovec>,
    /// The application called shutdown(): later posts fail with `Shutdown`.
    local_shutdown: bool,
    /// While [`ConnState::Closing`]: when the socket closes at the latest.
    closing_deadline: Option<Instant>,
    /// The sending direction has been shut down (Closing, everything sent).
    wr_shut: bool,
    /// The endpoint was closed while the connection was still Closing: the engine
    /// drops the connection once its socket has closed.
    pub(crate) detached: bool,
}

// SAFETY: libc::iovec in iov_scratch is only a reusable buffer (emptied after each use,
// pointers never dereferenced outside the call that filled it); every other field is
// Send.
unsafe impl Send for Conn {}

impl Conn {
    pub(crate) fn new(fid: Fid, rep: Reporting, tx_size: usize, rx_size: usize) -> Conn {
        Conn {
            fid,
            state: ConnState::Idle,
            sock: None,
            interest: Interest::empty(),
            rep,
            next_op_id: 1,
            txq: VecDeque::new(),
            tx_done: 0,
            answers_queued: 0,
            want_write: false,
            inflight: VecDeque::new(),
            deferred: VecDeque::new(),
            posted: VecDeque::new(),
            unexpected: VecDeque::new(),
            unexpected_bytes: 0,
            rx: RxState {
                buf: vec![0u8; RX_BUF_SIZE].into_boxed_slice(),
                start: 0,
                end: 0,
                phase: Phase::Header,
            },
            tx_size,
            rx_size,
            connect_data: Vec::new(),
            iov_scratch: Vec::with_capacity(TX_IOV_MAX + 1),
            local_shutdown: false,
            closing_deadline: None,
            wr_shut: false,
            detached: false,
        }
    }

    pub(crate) fn token(&self) -> u64 {
        self.fid.0
    }

    pub(crate) fn next_id(&mut self) -> u64 {
        let id = self.next_op_id;
        self.next_op_id = self.next_op_id.wrapping_add(1);
        id
    }

    /// Whether the receive side should be read now.
    pub(crate) fn readable(&self) -> bool {
        self.sock.is_some()
            && match self.state {
                ConnState::Connected => !self.rx_held(),
                ConnState::WaitConnResp | ConnState::Closing => true,
                _ => false,
            }
    }

    /// Whether reading is paused because of what the peer has not taken or matched
    /// yet: a message with no receive and no room to buffer it, [`TX_ANSWER_LIMIT`]
    /// answers it has not read, or [`UNEXPECTED_MAX_ENTRIES`] write-data
    /// notifications waiting for receives.
    pub(crate) fn rx_held(&self) -> bool {
        matches!(self.rx.phase, Phase::Stalled(_))
            || self.answers_queued >= TX_ANSWER_LIMIT
            || self.unexpected.len() >= UNEXPECTED_MAX_ENTRIES
    }

    /// Whether the peer's closing must be watched for without reading: a connected
    /// socket whose reading is paused ([`Conn::rx_held`]) still learns of the peer's
    /// end (EPOLLRDHUP), so a peer that fills a buffer and leaves is noticed.
    fn watch_hangup(&self) -> bool {
        self.sock.is_some() && self.state == ConnState::Connected && self.rx_held()
    }

    /// Updates the epoll registration to what the connection needs now. A connection
    /// that needs nothing is removed from the set, so a hung-up socket that is not
    /// being read (stalled receive) cannot make sleepers spin.
    pub(crate) fn update_interest(&mut self, ep: &Epoll) {
        let Some(sock) = &self.sock else { return };
        let mut want = Interest::empty();
        if self.readable() {
            want |= Interest::IN;
        } else if self.watch_hangup() {
            want |= Interest::RDHUP;
        }
        if self.state == ConnState::Connecting || (self.want_write && self.tx_allowed()) {
            want |= Interest::OUT;
        }
        if want == self.interest {
            return;
        }
        let fd = sock.as_fd();
        let r = if self.interest.is_empty() {
            ep.add(fd, self.token(), want)
        } else if want.is_empty() {
            ep.delete(fd)
        } else {
            ep.modify(fd, self.token(), want)
        };
        if let Err(e) = r {
            warn!(fid = %self.fid, "epoll update failed: {e}");
        }
        self.interest = want;
    }
}
