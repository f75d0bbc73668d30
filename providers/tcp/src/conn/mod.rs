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

use fabric_core::{Completion, CqErrorKind, Event, Fid, RecvRequest, ShutdownReason};
use tracing::warn;

use crate::sys::{Epoll, Interest};
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

/// Why a connection ends.
#[derive(Debug)]
pub(crate) struct Fatal {
    pub(crate) detail: String,
    pub(crate) protocol: bool,
    /// What the Shutdown event says.
    pub(crate) reason: ShutdownReason,
    /// How the operations still outstanding complete.
    pub(crate) kind: CqErrorKind,
}

impl Fatal {
    fn io(what: &str, e: io::Error) -> Fatal {
        Fatal {
            detail: format!("{what}: {e}"),
            protocol: false,
            reason: ShutdownReason::Lost,
            kind: CqErrorKind::ConnectionLost,
        }
    }
    fn eof() -> Fatal {
        Fatal {
            detail: "peer closed the connection".into(),
            protocol: false,
            reason: ShutdownReason::Peer,
            kind: CqErrorKind::ConnectionLost,
        }
    }
    fn protocol(msg: impl std::fmt::Display) -> Fatal {
        Fatal {
            detail: format!("{msg}"),
            protocol: true,
            reason: ShutdownReason::Protocol,
            kind: CqErrorKind::ConnectionLost,
        }
    }
    /// The peer refused one of our remote accesses: the connection ends and what was
    /// posted after it completes `Canceled`.
    fn access_refused(detail: String) -> Fatal {
        Fatal {
            detail,
            protocol: false,
            reason: ShutdownReason::AccessError,
            kind: CqErrorKind::Canceled,
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
    pub(crate) want_write: bool,
    inflight: VecDeque<Pending>,
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
            want_write: false,
            inflight: VecDeque::new(),
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
            && matches!(
                self.state,
                ConnState::Connected | ConnState::WaitConnResp | ConnState::Closing
            )
            && !matches!(self.rx.phase, Phase::Stalled(_))
    }

    /// Updates the epoll registration to what the connection needs now. A connection
    /// that needs nothing is removed from the set, so a hung-up socket that is not
    /// being read (stalled receive) cannot make sleepers spin.
    pub(crate) fn update_interest(&mut self, ep: &Epoll) {
        let Some(sock) = &self.sock else { return };
        let mut want = Interest::empty();
        if self.readable() {
            want |= Interest::IN;
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
