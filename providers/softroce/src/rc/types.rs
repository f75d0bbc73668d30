//! Work requests, completions and configuration of the RC core.

use std::fmt;
use std::net::SocketAddrV4;
use std::ops::{Add, Sub};
use std::time::Duration;

use super::memory::LocalSegment;

/// A point in time in nanoseconds since an arbitrary epoch chosen by the driver.
/// The core has no clock: every call that may depend on time takes `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

impl Sub for Time {
    type Output = Duration;
    fn sub(self, rhs: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(rhs.0))
    }
}

/// Path MTU (the payload bytes per packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mtu {
    /// 256 bytes.
    Mtu256,
    /// 512 bytes.
    Mtu512,
    /// 1024 bytes (rxe's default on a 1500-byte Ethernet MTU).
    Mtu1024,
    /// 2048 bytes.
    Mtu2048,
    /// 4096 bytes.
    Mtu4096,
}

impl Mtu {
    /// Payload bytes per packet.
    pub const fn bytes(self) -> u32 {
        match self {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    /// The MTU for a byte count, if it is one of the five IB MTUs.
    pub const fn from_bytes(n: u32) -> Option<Self> {
        match n {
            256 => Some(Mtu::Mtu256),
            512 => Some(Mtu::Mtu512),
            1024 => Some(Mtu::Mtu1024),
            2048 => Some(Mtu::Mtu2048),
            4096 => Some(Mtu::Mtu4096),
            _ => None,
        }
    }

    /// Packets needed for a message of `len` bytes (at least one).
    pub const fn packets(self, len: u32) -> u32 {
        if len == 0 {
            1
        } else {
            len.div_ceil(self.bytes())
        }
    }
}

/// Queue pair states (IB verbs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QpState {
    /// Just created or reset.
    Reset,
    /// Initialized: receives may be posted.
    Init,
    /// Ready to receive: the responder runs.
    Rtr,
    /// Ready to send: requester and responder run.
    Rts,
    /// Error: everything outstanding was flushed.
    Error,
}

/// Attributes for the INIT -> RTR transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtrAttr {
    /// Path MTU (both sides must agree).
    pub mtu: Mtu,
    /// The peer's QPN.
    pub dest_qpn: u32,
    /// PSN expected on the first incoming request (the peer's `sq_psn`).
    pub rq_psn: u32,
    /// Read/atomic responder resources (the ring of replayable responses).
    pub max_dest_rd_atomic: u8,
    /// RNR timer code (IB table, 5 bits) this responder sends in RNR NAKs.
    pub min_rnr_timer: u8,
    /// Local and remote UDP endpoints. The remote port is 4791; the local one is the
    /// source port of every packet this QP sends.
    pub local: SocketAddrV4,
    /// The peer's address.
    pub remote: SocketAddrV4,
}

/// Attributes for the RTR -> RTS transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtsAttr {
    /// PSN of the first request this QP sends.
    pub sq_psn: u32,
    /// Retransmission timeout (IB: 4.096 µs * 2^timeout; here the duration itself).
    pub timeout: Duration,
    /// Retries without progress (after a timeout or sequence error) before failing.
    /// IB allows 0-7 because its connection manager carries 3 bits; the count is a
    /// local setting that never appears in a packet, so this core accepts any `u8`
    /// (a softroce extension for very lossy links; 7 is the usual value, and unlike
    /// `rnr_retry` no value means "forever").
    pub retry_cnt: u8,
    /// Retries after an RNR NAK before failing (0-7, 7 = forever).
    pub rnr_retry: u8,
    /// Read/atomic/flush requests outstanding at once as requester.
    pub max_rd_atomic: u8,
}

/// IB transport timeout code to a duration: 4.096 µs * 2^code (code 0 = none, here
/// mapped to the largest value).
pub fn ib_timeout(code: u8) -> Duration {
    let code = if code == 0 { 31 } else { code.min(31) };
    Duration::from_nanos(4096u64 << code)
}

/// IB FLUSH placement type requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPlacement {
    /// Make prior writes globally visible.
    Global,
    /// Make prior writes durable (the responder calls [`super::RemoteRegion::persist`]).
    Persistent,
}

/// What a send-queue work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// SEND.
    Send,
    /// SEND with immediate data.
    SendWithImm {
        /// Immediate data (delivered in the receiver's completion).
        imm: u32,
    },
    /// RDMA WRITE of the local segment to `remote_va`.
    Write {
        /// Target virtual address.
        remote_va: u64,
        /// Target R_Key.
        rkey: u32,
    },
    /// RDMA WRITE with immediate data (consumes a receive at the target).
    WriteWithImm {
        /// Target virtual address.
        remote_va: u64,
        /// Target R_Key.
        rkey: u32,
        /// Immediate data.
        imm: u32,
    },
    /// RDMA READ into the local segment.
    Read {
        /// Source virtual address.
        remote_va: u64,
        /// Source R_Key.
        rkey: u32,
    },
    /// Atomic compare and swap; the previous value lands in the 8-byte local segment.
    CompareSwap {
        /// Target virtual address (8-byte aligned).
        remote_va: u64,
        /// Target R_Key.
        rkey: u32,
        /// Expected value.
        compare: u64,
        /// New value.
        swap: u64,
    },
    /// Atomic fetch and add; the previous value lands in the 8-byte local segment.
    FetchAdd {
        /// Target virtual address (8-byte aligned).
        remote_va: u64,
        /// Target R_Key.
        rkey: u32,
        /// Addend.
        add: u64,
    },
    /// IB FLUSH of `len` bytes at `remote_va` (no local segment).
    Flush {
        /// Start of the range.
        remote_va: u64,
        /// R_Key of the region.
        rkey: u32,
        /// Length of the range.
        len: u32,
        /// Placement type.
        placement: FlushPlacement,
    },
}

/// A send-queue work request.
#[derive(Debug, Clone)]
pub struct SendWr {
    /// Caller's identifier, returned in the completion.
    pub wr_id: u64,
    /// The operation.
    pub op: SendOp,
    /// Local buffer: data to send/write, destination of a read, 8 bytes for an atomic
    /// result. `None` means zero length.
    pub local: Option<LocalSegment>,
}

/// A receive-queue work request.
#[derive(Debug, Clone)]
pub struct RecvWr {
    /// Caller's identifier.
    pub wr_id: u64,
    /// Buffer for the incoming SEND (`None`: only zero-length messages fit).
    pub local: Option<LocalSegment>,
}

/// Kind of operation a completion reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcOpcode {
    /// A SEND (with or without immediate) finished.
    Send,
    /// An RDMA WRITE (with or without immediate) finished.
    RdmaWrite,
    /// An RDMA READ finished.
    RdmaRead,
    /// A compare and swap finished.
    CompareSwap,
    /// A fetch and add finished.
    FetchAdd,
    /// A FLUSH finished.
    Flush,
    /// A receive consumed by a SEND.
    Recv,
    /// A receive consumed by an RDMA WRITE with immediate.
    RecvRdmaWithImm,
}

/// Completion status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcStatus {
    /// Success.
    Success,
    /// The incoming message did not fit the receive buffer (receiver side).
    LocalLengthError,
    /// The target rejected key, bounds or rights (NAK 0x62).
    RemoteAccessError,
    /// The target found the request invalid (NAK 0x61).
    RemoteInvalidRequest,
    /// The target failed to carry out the request (NAK 0x63).
    RemoteOperationalError,
    /// No response after `retry_cnt` retransmissions.
    RetryExceeded,
    /// The target kept answering RNR after `rnr_retry` retries.
    RnrRetryExceeded,
    /// The QP entered the error state before this request ran.
    Flushed,
    /// The local buffer could not be read or written.
    LocalAccessError,
}

/// A work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The work request's `wr_id`.
    pub wr_id: u64,
    /// What completed.
    pub opcode: WcOpcode,
    /// How it ended.
    pub status: WcStatus,
    /// Bytes transferred (receives: message length; reads: bytes read).
    pub byte_len: u32,
    /// Immediate data of a received SEND/WRITE with immediate.
    pub imm: Option<u32>,
}

/// Why a work request or QP modification was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpError {
    /// The QP is not in a state that allows the call.
    InvalidState {
        /// The current state.
        state: QpState,
        /// What was attempted.
        action: &'static str,
    },
    /// An attribute is out of range (named).
    InvalidAttribute(&'static str),
    /// The local segment does not lie within its memory.
    LocalOutOfBounds,
    /// The work request is malformed for its operation (named).
    InvalidWorkRequest(&'static str),
}

impl fmt::Display for QpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QpError::InvalidState { state, action } => {
                write!(f, "cannot {action} while the QP is in state {state:?}")
            }
            QpError::InvalidAttribute(a) => write!(f, "invalid QP attribute: {a}"),
            QpError::LocalOutOfBounds => write!(f, "local segment outside its memory"),
            QpError::InvalidWorkRequest(w) => write!(f, "invalid work request: {w}"),
        }
    }
}

impl std::error::Error for QpError {}

/// A packet the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Source UDP endpoint (IP and port the ICRC was computed with).
    pub src: SocketAddrV4,
    /// Destination UDP endpoint.
    pub dst: SocketAddrV4,
    /// The UDP payload: BTH through ICRC.
    pub payload: Vec<u8>,
}

/// Counters of protocol events, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpStats {
    /// Packets produced by `poll_transmit`.
    pub packets_sent: u64,
    /// Packets accepted by `handle_packet`.
    pub packets_received: u64,
    /// Packets dropped as malformed, misaddressed or out of place.
    pub packets_dropped: u64,
    /// Go-back-N restarts (timeouts, NAKs, implicit NAKs).
    pub retransmissions: u64,
    /// Retransmission timer expiries.
    pub timeouts: u64,
    /// PSN sequence error NAKs sent.
    pub seq_naks_sent: u64,
    /// RNR NAKs sent.
    pub rnr_naks_sent: u64,
    /// RNR NAKs received.
    pub rnr_naks_received: u64,
    /// Duplicate requests answered by the responder.
    pub duplicates: u64,
    /// READ requests dropped unprocessed because every responder resource
    /// (`max_dest_rd_atomic`) was still sending a response (the requester sends them
    /// again; a requester within its `max_rd_atomic` never causes one).
    pub reads_deferred: u64,
}
