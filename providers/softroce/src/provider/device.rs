//! The device: one unconnected UDP socket on `<IPv4>:4791` per address and process,
//! shared by every domain that uses the address (like one NIC with many QPs), with
//! the queue pairs it demultiplexes to by destination QPN, their timers, the fault
//! injector and the capture writer.
//!
//! Whoever makes progress (a completion-queue read, a sleeping `sread` that woke, the
//! auto-progress thread) and finds the receive side free receives a batch with
//! `recvmmsg`, verifies every ICRC (solving for the sender's IP ID, which the socket
//! does not show, and judging it plausible for that peer: see the crate docs,
//! "Receiving rxe's packets"), checks that each packet comes from its QP's connected
//! peer, hands packets to their QPs, runs due timers, and sends what those QPs produce with `sendmmsg`.
//! A post works on its own QP only (a lock per QP): it never waits for a poller of
//! the device, and sends its packets itself. Completions go to the endpoints'
//! completion queues.
//!
//! When no application thread has done so for the backstop interval, the device's
//! backstop thread does the same work ([`backstop`]). A QP that enters ERROR on its
//! own (a refused access, a NAK, retries exhausted) is reported to its owner (the
//! endpoint, [`QpOwner`]) after the work, outside every device lock.

use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::BufWriter;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use fabric_core::{
    CompFlags, Completion, CqError, CqErrorKind, Error, ErrorKind, Fid, ShutdownReason,
};
use parking_lot::{Mutex, RwLock};
use tracing::{debug, warn};

use super::sys::{self, RecvBatch, BATCH};
use crate::fault::{FaultConfig, FaultInjector};
use crate::pcap::{PcapWriter, LINKTYPE_RAW};
use crate::rc::{self, QueuePair, RecvWr, RtrAttr, RtsAttr, SendWr, Time, WcOpcode, WcStatus};
use crate::wire::ext::NakCode;
use crate::wire::frame::{build_frame, FrameInfo, ROCE_UDP_PORT};
use crate::wire::{IcrcContext, IpIdWindow};
use fabric_core::wait::{EventFd, WaitQueue};

/// Batches received per progress call at most (bounds the time under the lock).
const MAX_ROUNDS: usize = 16;

/// A completion queue's shared part.
pub(crate) type CompQueue = WaitQueue<Completion>;

/// How a device behaves: fault injection and capture. Read from the environment
/// (`SOFTROCE_FAULTS`, `SOFTROCE_PCAP`) when a device is created, unless a program
/// set one with [`configure_device`](crate::configure_device) first.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {
    /// Faults injected on every frame this device sends, with the seed.
    pub faults: Option<(FaultConfig, u64)>,
    /// Where to write a pcap of every frame this device sends (as full IPv4 frames).
    pub pcap: Option<PathBuf>,
    /// Transport retry count of QPs connected on this device (`None`: 7, as rxe and
    /// most applications use). Counts above 7 are a local extension for very lossy
    /// links (see `RtsAttr::retry_cnt`); they change no packet.
    pub retry_cnt: Option<u8>,
    /// The progress backstop's interval (`None`: [`DEFAULT_BACKSTOP`], 1 ms;
    /// `Some(Duration::ZERO)`: no backstop). When no application thread has run the
    /// device's transport for this long, the device's backstop thread runs it (see
    /// the crate docs, "Progress").
    pub backstop: Option<Duration>,
    /// Output pacing (`None`: [`Pace::default`], turns of 64 packets, no gap).
    pub pace: Option<Pace>,
}

/// How a device paces each QP's output: a QP sends at most `burst` packets in a row,
/// then waits at least `gap` (and for every other QP's and the receive side's turn)
/// before it sends more. So a 1 MiB READ is not answered (nor a 1 MiB WRITE sent) as
/// one 256-packet burst that a slow receiver (kernel rxe in a small VM, a busy host)
/// loses in bulk, and one QP's big transfer does not hold the device while other
/// connections wait. `gap` zero: turns only, no rate limit (the default; the wire and
/// the peer's window limit the rate). With a gap the QP's rate is at most
/// `burst × MTU / gap` (e.g. 16 × 4 KiB / 100 µs ≈ 650 MB/s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Packets a QP sends per turn (at least 1).
    pub burst: usize,
    /// Least time between two turns of a QP.
    pub gap: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            burst: 64,
            gap: Duration::ZERO,
        }
    }
}

impl DeviceConfig {
    /// The configuration the environment asks for. `SOFTROCE_FAULTS` is a comma list
    /// of `drop=P`, `dup=P`, `reorder=P`, `corrupt=P` (probabilities 0..1), `seed=N`,
    /// `delay_us=N`, `jitter_us=N`, `reorder_us=N` (extra delay of a reordered frame,
    /// default 200); `SOFTROCE_PCAP` a file path; `SOFTROCE_RETRY_CNT` the transport
    /// retry count; `SOFTROCE_BACKSTOP_US` the backstop interval in µs (0: off).
    pub fn from_env() -> Result<Self, String> {
        let mut c = DeviceConfig::default();
        if let Ok(s) = std::env::var("SOFTROCE_FAULTS") {
            if !s.trim().is_empty() {
                c.faults = Some(parse_faults(&s)?);
            }
        }
        if let Ok(p) = std::env::var("SOFTROCE_PCAP") {
            if !p.trim().is_empty() {
                c.pcap = Some(PathBuf::from(p));
            }
        }
        if let Ok(b) = std::env::var("SOFTROCE_BACKSTOP_US") {
            if !b.trim().is_empty() {
                c.backstop = Some(Duration::from_micros(b.trim().parse().map_err(|_| {
                    format!("SOFTROCE_BACKSTOP_US={b} is not a whole number of µs (0: off)")
                })?));
            }
        }
        if let Ok(p) = std::env::var("SOFTROCE_PACE") {
            if !p.trim().is_empty() {
                c.pace = Some(parse_pace(&p)?);
            }
        }
        if let Ok(r) = std::env::var("SOFTROCE_RETRY_CNT") {
            if !r.trim().is_empty() {
                c.retry_cnt = Some(r.trim().parse().map_err(|_| {
                    format!("SOFTROCE_RETRY_CNT={r} is not a number from 0 to 255")
                })?);
            }
        }
        Ok(c)
    }
}

/// Parses a `SOFTROCE_PACE` value: `burst=N` (packets per turn, default 64) and
/// `gap_us=N` (µs between a QP's turns, default 0), comma-separated.
pub fn parse_pace(s: &str) -> Result<Pace, String> {
    let mut p = Pace::default();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("SOFTROCE_PACE: '{item}' is not key=value"))?;
        let n: u64 = v
            .trim()
            .parse()
            .map_err(|_| format!("SOFTROCE_PACE: {k}={v} is not a whole number"))?;
        match k.trim() {
            "burst" if (1..=1 << 20).contains(&n) => p.burst = n as usize,
            "burst" => return Err(format!("SOFTROCE_PACE: burst={n} is not in 1..2^20")),
            "gap_us" if n <= 1_000_000 => p.gap = Duration::from_micros(n),
            "gap_us" => return Err(format!("SOFTROCE_PACE: gap_us={n} is over 1 s")),
            other => return Err(format!("SOFTROCE_PACE: unknown key '{other}'")),
        }
    }
    Ok(p)
}

/// Parses a `SOFTROCE_FAULTS` value.
pub fn parse_faults(s: &str) -> Result<(FaultConfig, u64), String> {
    let mut f = FaultConfig::perfect(Duration::ZERO);
    f.reorder_delay = Duration::from_micros(200);
    let mut seed = 1u64;
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("SOFTROCE_FAULTS: '{item}' is not key=value"))?;
        let prob = || -> Result<f64, String> {
            let p: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("SOFTROCE_FAULTS: {k}={v} is not a number"))?;
            if (0.0..=1.0).contains(&p) {
                Ok(p)
            } else {
                Err(format!("SOFTROCE_FAULTS: {k}={v} is not in 0..1"))
            }
        };
        let micros = || -> Result<Duration, String> {
            v.trim()
                .parse()
                .map(Duration::from_micros)
                .map_err(|_| format!("SOFTROCE_FAULTS: {k}={v} is not a whole number"))
        };
        match k.trim() {
            "drop" => f.drop = prob()?,
            "dup" | "duplicate" => f.duplicate = prob()?,
            "reorder" => f.reorder = prob()?,
            "corrupt" => f.corrupt = prob()?,
            "delay_us" => f.delay = micros()?,
            "jitter_us" => f.jitter = micros()?,
            "reorder_us" => f.reorder_delay = micros()?,
            "seed" => {
                seed = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("SOFTROCE_FAULTS: seed={v} is not a number"))?
            }
            other => return Err(format!("SOFTROCE_FAULTS: unknown key '{other}'")),
        }
    }
    Ok((f, seed))
}

/// Counters of a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Datagrams received.
    pub rx_packets: u64,
    /// Datagrams handed to the kernel.
    pub tx_packets: u64,
    /// Datagrams dropped because their ICRC (or framing) was wrong.
    pub bad_packets: u64,
    /// Datagrams for a QPN the device does not have.
    pub unknown_qp: u64,
    /// Datagrams with a valid ICRC for a connected QP that did not come from that
    /// QP's peer (another address, or another source port than the peer's).
    pub wrong_source: u64,
    /// Frames the fault injector dropped, duplicated, reordered, corrupted.
    pub faults: crate::fault::FaultStats,
}

/// What one posted operation is waiting for.
struct OpTrack {
    context: u64,
    flags: CompFlags,
    len: usize,
    completion: bool,
    remaining: u32,
    error: Option<WcStatus>,
}

/// A posted receive.
struct RecvTrack {
    context: u64,
}

/// Where an endpoint's completions go, and who hears that its QP failed.
pub(crate) struct Reporting {
    pub(crate) fid: Fid,
    pub(crate) tx_cq: Arc<CompQueue>,
    pub(crate) rx_cq: Arc<CompQueue>,
    /// Told (outside every device lock) when the QP enters ERROR on its own.
    pub(crate) owner: OnceLock<Weak<dyn QpOwner>>,
}

/// The owner of a QP (an endpoint): hears why its QP entered ERROR on its own (not
/// through [`Device::error_qp`]), so it can end the connection.
pub(crate) trait QpOwner: Send + Sync {
    /// The QP entered ERROR; the connection ends for `reason`.
    fn qp_failed(&self, reason: ShutdownReason);
}

/// What a QP's entry into ERROR means for its connection (`None`: the driver moved
/// it, and knows why).
fn shutdown_reason(cause: rc::ErrorCause) -> Option<ShutdownReason> {
    use rc::ErrorCause as C;
    use WcStatus as S;
    Some(match cause {
        C::Modified => return None,
        C::AccessRefused(_) => ShutdownReason::AccessError,
        C::Requester(S::RemoteAccessError | S::RemoteInvalidRequest) => ShutdownReason::AccessError,
        C::Requester(_) => ShutdownReason::Lost,
        C::RequestFailed(NakCode::InvalidRequest) => ShutdownReason::Protocol,
        C::RequestFailed(_) => ShutdownReason::Lost,
    })
}

/// A QP on the device and its bookkeeping.
pub(crate) struct QpSlot {
    qp: QueuePair,
    rep: Arc<Reporting>,
    ops: HashMap<u64, OpTrack>,
    recvs: HashMap<u64, RecvTrack>,
    next_op: u64,
    next_recv: u64,
    /// The QP's entry into ERROR was noticed (and reported, if it was a failure).
    ended: bool,
}

/// Bit of a work-request id that marks a receive.
const RECV_BIT: u64 = 1 << 63;
/// Work requests per operation (the id's low bits).
const WR_BITS: u32 = 20;

fn status_error(s: WcStatus, what: &str) -> CqError {
    let (kind, errno) = match s {
        WcStatus::LocalLengthError => (CqErrorKind::Truncated, 0),
        WcStatus::RemoteAccessError => (CqErrorKind::RemoteAccess, 0x62),
        WcStatus::RemoteInvalidRequest => (CqErrorKind::RemoteInvalid, 0x61),
        WcStatus::RemoteOperationalError => (CqErrorKind::RemoteOperation, 0x63),
        WcStatus::RetryExceeded => (CqErrorKind::RetryExceeded, 0),
        WcStatus::RnrRetryExceeded => (CqErrorKind::RnrRetryExceeded, 0),
        WcStatus::Flushed => (CqErrorKind::Canceled, 0),
        WcStatus::LocalAccessError => (CqErrorKind::LocalProtection, 0),
        WcStatus::Success => (CqErrorKind::Other, 0),
    };
    let why = match s {
        WcStatus::LocalLengthError => "the message was larger than the receive buffer",
        WcStatus::RemoteAccessError => {
            "the target refused the access (NAK remote access error: key, bounds or rights)"
        }
        WcStatus::RemoteInvalidRequest => "the target refused the request (NAK invalid request)",
        WcStatus::RemoteOperationalError => {
            "the target failed to carry out the request (NAK remote operational error)"
        }
        WcStatus::RetryExceeded => "no answer from the peer after 7 retransmissions",
        WcStatus::RnrRetryExceeded => "the peer had no receive posted after the RNR retries",
        WcStatus::Flushed => "the queue pair entered the error state (connection closed or failed)",
        WcStatus::LocalAccessError => "a local buffer could not be accessed",
        WcStatus::Success => "success",
    };
    CqError::new(kind, errno, format!("{what}: {why}"))
}

impl QpSlot {
    /// Starts tracking an operation of `wrs` work requests; returns the id of its
    /// first work request (the others follow).
    pub(crate) fn track(
        &mut self,
        context: u64,
        flags: CompFlags,
        len: usize,
        completion: bool,
        wrs: u32,
    ) -> u64 {
        self.next_op = self.next_op.wrapping_add(1) & ((RECV_BIT - 1) >> WR_BITS);
        let id = self.next_op;
        self.ops.insert(
            id,
            OpTrack {
                context,
                flags,
                len,
                completion,
                remaining: wrs,
                error: None,
            },
        );
        id << WR_BITS
    }

    /// Posts one work request of a tracked operation. A refusal by the QP fails the
    /// operation's remaining count so the caller can undo with [`untrack`].
    pub(crate) fn post_send(&mut self, wr: SendWr) -> Result<(), rc::QpError> {
        self.qp.post_send(wr)
    }

    /// Forgets an operation whose posting failed before any work request was queued.
    pub(crate) fn untrack(&mut self, first_wr: u64) {
        self.ops.remove(&(first_wr >> WR_BITS));
    }

    /// Posts a receive.
    pub(crate) fn post_recv(
        &mut self,
        context: u64,
        local: Option<rc::LocalSegment>,
    ) -> Result<(), rc::QpError> {
        self.next_recv = self.next_recv.wrapping_add(1) & (RECV_BIT - 1);
        let wr_id = RECV_BIT | self.next_recv;
        self.qp.post_recv(RecvWr { wr_id, local })?;
        self.recvs.insert(wr_id, RecvTrack { context });
        Ok(())
    }

    /// The QP state.
    pub(crate) fn state(&self) -> rc::QpState {
        self.qp.state()
    }

    /// Operations outstanding.
    pub(crate) fn outstanding(&self) -> usize {
        self.ops.len()
    }

    /// Receives posted.
    pub(crate) fn posted_recvs(&self) -> usize {
        self.recvs.len()
    }

    fn route(&mut self, c: rc::Completion) {
        if c.wr_id & RECV_BIT != 0 {
            let Some(r) = self.recvs.remove(&c.wr_id) else {
                return;
            };
            let mut flags = if c.opcode == WcOpcode::RecvRdmaWithImm {
                CompFlags::RMA | CompFlags::REMOTE_WRITE
            } else {
                CompFlags::MSG | CompFlags::RECV
            };
            if c.imm.is_some() {
                flags |= CompFlags::REMOTE_CQ_DATA;
            }
            let mut out = if c.status == WcStatus::Success {
                Completion::ok(r.context, flags, c.byte_len as usize)
            } else {
                let mut e = Completion::error(r.context, flags, status_error(c.status, "receive"));
                if c.status == WcStatus::LocalLengthError {
                    e.len = c.byte_len as usize;
                }
                e
            };
            out.data = c.imm.map_or(0, u64::from);
            self.rep.rx_cq.push(out);
            return;
        }
        let op_id = c.wr_id >> WR_BITS;
        let Some(op) = self.ops.get_mut(&op_id) else {
            return;
        };
        op.remaining = op.remaining.saturating_sub(1);
        if c.status != WcStatus::Success
            && (op.error.is_none() || op.error == Some(WcStatus::Flushed))
        {
            op.error = Some(c.status);
        }
        if op.remaining > 0 {
            return;
        }
        let Some(op) = self.ops.remove(&op_id) else {
            return;
        };
        match op.error {
            Some(s) => {
                // An error never claims the commit level.
                let flags = op.flags - CompFlags::COMMIT;
                let what = if op.flags.contains(CompFlags::COMMIT)
                    && s == WcStatus::RemoteInvalidRequest
                {
                    "write with COMMIT_COMPLETE: the persistent FLUSH was refused, a target \
                     region is not registered PMEM; nothing was written"
                } else if op.flags.contains(CompFlags::READ) {
                    "read"
                } else if op.flags.contains(CompFlags::WRITE) {
                    "write"
                } else {
                    "send"
                };
                self.rep
                    .tx_cq
                    .push(Completion::error(op.context, flags, status_error(s, what)));
            }
            None if op.completion => {
                self.rep
                    .tx_cq
                    .push(Completion::ok(op.context, op.flags, op.len));
            }
            None => {}
        }
    }

    /// Routes the QP's completions; returns whether one of them was a receive of a
    /// message of one packet (what a ping-pong answers at once).
    fn drain_completions(&mut self) -> bool {
        let mtu = self.qp.mtu().map_or(0, |m| m.bytes());
        let mut small_receive = false;
        while let Some(c) = self.qp.poll_completion() {
            small_receive |= c.wr_id & RECV_BIT != 0 && c.byte_len <= mtu;
            self.route(c);
        }
        small_receive
    }
}

/// A frame held back by the fault injector: due time, sequence (stable order), where
/// to, bytes.
type DelayedFrame = std::cmp::Reverse<(Time, u64, SocketAddrV4, Vec<u8>)>;

/// The process-wide devices and the configurations set for addresses.
type DeviceRegistry = Mutex<HashMap<Ipv4Addr, (Weak<Device>, Option<DeviceConfig>)>>;

/// A QP on the device: its own lock, so posting on one QP never waits for another
/// QP's work, and its next timer readable without the lock.
struct QpCell {
    slot: Mutex<QpSlot>,
    /// Next timer in nanoseconds since the device's epoch (`u64::MAX`: none); written
    /// under `slot`'s lock after every change of the QP.
    deadline: AtomicU64,
    /// Since when ACKs are held back for the application's answer (nanoseconds
    /// since the device's epoch; `u64::MAX`: none; see [`Device::dispatch`]).
    acks_held: AtomicU64,
    /// The connected peer, [`PEER_SET`] with the IPv4 address in bits 16..48 and the
    /// UDP source port in bits 0..16 ([`PEER_LEARN`]: the port is pinned by the
    /// first packet); 0 before the QP is connected.
    peer: AtomicU64,
}

/// [`QpCell::peer`] holds a peer.
const PEER_SET: u64 = 1 << 48;
/// [`QpCell::peer`]: the peer's source port is not known yet (kernel rxe sends from a
/// per-QP port that an out-of-band exchange does not carry); the first packet with a
/// valid ICRC from the peer's address pins it.
const PEER_LEARN: u64 = 1 << 49;

impl QpCell {
    /// Whether a packet from `src` may be handed to this QP: before the QP is
    /// connected anything (the QP itself drops it), after only its peer's address
    /// and source port.
    fn source_ok(&self, src: SocketAddrV4) -> bool {
        let p = self.peer.load(Ordering::Acquire);
        if p & PEER_SET == 0 {
            return true;
        }
        if (p >> 16) as u32 != u32::from(*src.ip()) {
            return false;
        }
        if p & PEER_LEARN == 0 {
            return p as u16 == src.port();
        }
        let pinned = (p & !PEER_LEARN & !0xFFFF) | u64::from(src.port());
        match self
            .peer
            .compare_exchange(p, pinned, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(now) => now & PEER_LEARN == 0 && now as u16 == src.port(),
        }
    }
}

/// Peers whose IP IDs a device tracks at most (one per peer address of its QPs; one
/// more starts over, which only makes the next packet of each the first again).
const MAX_ID_PEERS: usize = 4096;

/// What the receiving side of the device owns: whoever holds it receives.
struct RxState {
    rx: RecvBatch,
    /// QPs that received packets in the current batch (their output is sent after it).
    touched: Vec<Arc<QpCell>>,
    /// The IP IDs seen from each peer address ([`IpIdWindow`]).
    ip_ids: HashMap<Ipv4Addr, IpIdWindow>,
}

/// Fault injection and capture between the QPs and the socket; locked only while one
/// of them is configured (or delayed frames are pending).
struct TxExtras {
    faults: Option<FaultInjector>,
    delayed: BinaryHeap<DelayedFrame>,
    seq: u64,
    pcap: Option<Capture>,
}

/// The device's counters.
#[derive(Default)]
struct Counters {
    rx_packets: AtomicU64,
    tx_packets: AtomicU64,
    bad_packets: AtomicU64,
    unknown_qp: AtomicU64,
    wrong_source: AtomicU64,
}

/// A RoCEv2 device: the UDP socket of one IPv4 address.
///
/// Locking: the QP table is read-mostly (written when a QP is created or removed);
/// each QP has its own lock, taken by posts on it and by whoever hands it received
/// packets or runs its timers; the receive side (`rx`) is one lock that pollers only
/// try, so two threads polling the same device never wait for each other. A QP's
/// packets are sent while its lock is held, so they leave in PSN order whichever
/// thread produced them. Order of locks: `rx`, `qps`, a QP, `extras`.
pub struct Device {
    ip: Ipv4Addr,
    sock: UdpSocket,
    efd: EventFd,
    epoch: Instant,
    qps: RwLock<HashMap<u32, Arc<QpCell>>>,
    next_qpn: AtomicU32,
    rx: Mutex<RxState>,
    extras: Mutex<TxExtras>,
    /// Whether `extras` must be consulted on every send.
    has_extras: AtomicBool,
    /// Due time of the earliest delayed frame (`u64::MAX`: none).
    delayed_deadline: AtomicU64,
    /// Some QP may hold ACKs back (a hint).
    acks_held: AtomicBool,
    /// Transport retry count for QPs connected from now on.
    retry_cnt: std::sync::atomic::AtomicU8,
    counters: Counters,
    sleepers: AtomicUsize,
    /// When an application thread last ran the transport (ns since `epoch`).
    app_progress: AtomicU64,
    /// Backstop interval in ns (0: off).
    backstop_ns: AtomicU64,
    /// [`Pace::burst`].
    pace_burst: AtomicUsize,
    /// [`Pace::gap`] in ns.
    pace_gap_ns: AtomicU64,
    /// The backstop sleeps on the socket (posts wake it through `backstop_efd` to
    /// recompute its timeout).
    backstop_waiting: AtomicBool,
    backstop_efd: EventFd,
    /// QPs that entered ERROR on their own, for their owners to hear.
    failed: Mutex<Vec<(Arc<Reporting>, ShutdownReason)>>,
    has_failed: AtomicBool,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("ip", &self.ip).finish()
    }
}

fn registry() -> &'static DeviceRegistry {
    static R: OnceLock<DeviceRegistry> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Sets the configuration of the device on `ip`: applied at once if the device exists
/// (faults and capture are replaced), else used when it is created instead of the
/// environment. Lets tests running in parallel threads configure their own devices
/// (use one 127.0.0.x address per test).
pub fn configure_device(ip: Ipv4Addr, config: DeviceConfig) -> Result<(), Error> {
    let mut r = registry().lock();
    let entry = r.entry(ip).or_insert_with(|| (Weak::new(), None));
    if let Some(dev) = entry.0.upgrade() {
        dev.apply(&config)?;
    }
    entry.1 = Some(config);
    Ok(())
}

/// A random loopback address 127.x.y.z (never in 127.0.0.0/24) whose RoCEv2 port
/// (UDP 4791) nothing holds at the moment: a device of its own for a test or a tool, so
/// that it never depends on owning 127.0.0.1:4791 (another softroce process or kernel
/// rxe may hold that). Checked by binding the port there; the address stays free
/// unless someone else picks the same one of 16 million before the caller opens it.
pub fn free_loopback_ip() -> std::io::Result<Ipv4Addr> {
    for _ in 0..100 {
        let r: u32 = rand::random();
        let [_, b, c, d] = r.to_be_bytes();
        if b == 0 || d == 0 || d == 255 {
            continue;
        }
        let ip = Ipv4Addr::new(127, b, c, d);
        if registry().lock().contains_key(&ip) {
            continue;
        }
        if UdpSocket::bind(SocketAddrV4::new(ip, ROCE_UDP_PORT)).is_ok() {
            return Ok(ip);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "softroce: no free loopback address for UDP 4791 found in 100 tries",
    ))
}

/// The source address a client with none connects to loopback address `dest` from,
/// so that it never depends on owning 127.0.0.1:4791: the route's choice (`None`,
/// 127.0.0.1) when this process has that device or its port is free, else a free
/// loopback address. `None` for other destinations. (A client does not share the
/// server's device of its own process unless told to with `src_addr`: two devices
/// keep a busy-polled ping-pong in one process about 3 µs faster.)
pub(crate) fn loopback_source(dest: Ipv4Addr) -> Option<Ipv4Addr> {
    if !dest.is_loopback() {
        return None;
    }
    let route = Ipv4Addr::LOCALHOST;
    let ours = registry()
        .lock()
        .get(&route)
        .is_some_and(|e| e.0.strong_count() > 0);
    if ours || UdpSocket::bind(SocketAddrV4::new(route, ROCE_UDP_PORT)).is_ok() {
        return None;
    }
    free_loopback_ip().ok()
}

/// Counters of the device on `ip`, if one exists in this process.
pub fn device_stats(ip: Ipv4Addr) -> Option<DeviceStats> {
    let dev = registry().lock().get(&ip).and_then(|e| e.0.upgrade())?;
    Some(dev.stats())
}

/// A capture file shared by every device incarnation in this process that names it:
/// created (truncated) once, then appended to, flushed after every batch.
type Capture = Arc<Mutex<PcapWriter<BufWriter<File>>>>;

fn open_pcap(path: &PathBuf) -> Result<Capture, Error> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Capture>>> = OnceLock::new();
    let mut open = OPEN.get_or_init(|| Mutex::new(HashMap::new())).lock();
    if let Some(c) = open.get(path) {
        return Ok(c.clone());
    }
    let f = File::create(path).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("SOFTROCE_PCAP: cannot create {}: {e}", path.display()),
        )
    })?;
    let w = Arc::new(Mutex::new(
        PcapWriter::new(BufWriter::new(f), LINKTYPE_RAW).map_err(Error::from)?,
    ));
    open.insert(path.clone(), w.clone());
    Ok(w)
}

impl Device {
    /// The device for `ip`, created (socket bound to `ip:4791`) if this process has
    /// none yet.
    pub(crate) fn get(ip: Ipv4Addr) -> Result<Arc<Device>, Error> {
        let mut r = registry().lock();
        if let Some(d) = r.get(&ip).and_then(|e| e.0.upgrade()) {
            return Ok(d);
        }
        let config = match r.get(&ip).and_then(|e| e.1.clone()) {
            Some(c) => c,
            None => DeviceConfig::from_env().map_err(Error::invalid)?,
        };
        let sock = sys::bind_udp(ip, ROCE_UDP_PORT).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                Error::new(
                    ErrorKind::AddressInUse,
                    format!(
                        "softroce: UDP {ip}:{ROCE_UDP_PORT} is taken by another process (a \
                         softroce device or kernel rxe); use another 127.0.0.x address"
                    ),
                )
            } else {
                Error::from(e).context(format!("softroce: bind UDP {ip}:{ROCE_UDP_PORT}"))
            }
        })?;
        let dev = Arc::new(Device {
            ip,
            sock,
            efd: EventFd::new()?,
            epoch: Instant::now(),
            qps: RwLock::new(HashMap::new()),
            next_qpn: AtomicU32::new(0x11 + (rand::random::<u32>() & 0xFFFF)),
            rx: Mutex::new(RxState {
                rx: RecvBatch::new(),
                touched: Vec::with_capacity(8),
                ip_ids: HashMap::new(),
            }),
            extras: Mutex::new(TxExtras {
                faults: None,
                delayed: BinaryHeap::new(),
                seq: 0,
                pcap: None,
            }),
            has_extras: AtomicBool::new(false),
            delayed_deadline: AtomicU64::new(u64::MAX),
            acks_held: AtomicBool::new(false),
            retry_cnt: std::sync::atomic::AtomicU8::new(DEFAULT_RETRY_CNT),
            counters: Counters::default(),
            sleepers: AtomicUsize::new(0),
            app_progress: AtomicU64::new(0),
            backstop_ns: AtomicU64::new(0),
            pace_burst: AtomicUsize::new(Pace::default().burst),
            pace_gap_ns: AtomicU64::new(0),
            backstop_waiting: AtomicBool::new(false),
            backstop_efd: EventFd::new()?,
            failed: Mutex::new(Vec::new()),
            has_failed: AtomicBool::new(false),
        });
        dev.apply(&config)?;
        let weak = Arc::downgrade(&dev);
        if let Err(e) = std::thread::Builder::new()
            .name(format!("softroce-backstop-{ip}"))
            .spawn(move || backstop(weak))
        {
            warn!("softroce: cannot start the backstop thread of {ip}: {e}");
        }
        debug!(%ip, ?config, "softroce device created");
        r.insert(ip, (Arc::downgrade(&dev), Some(config)));
        Ok(dev)
    }

    fn apply(&self, config: &DeviceConfig) -> Result<(), Error> {
        let pcap = config.pcap.as_ref().map(open_pcap).transpose()?;
        self.retry_cnt.store(
            config.retry_cnt.unwrap_or(DEFAULT_RETRY_CNT),
            Ordering::Relaxed,
        );
        let pace = config.pace.unwrap_or_default();
        self.pace_burst
            .store(pace.burst.max(1), Ordering::Relaxed);
        self.pace_gap_ns
            .store(pace.gap.as_nanos() as u64, Ordering::Relaxed);
        self.backstop_ns.store(
            config.backstop.unwrap_or(DEFAULT_BACKSTOP).as_nanos() as u64,
            Ordering::Relaxed,
        );
        let mut x = self.extras.lock();
        x.faults = config.faults.map(|(f, seed)| FaultInjector::new(f, seed));
        x.pcap = pcap;
        self.has_extras.store(
            x.faults.is_some() || x.pcap.is_some() || !x.delayed.is_empty(),
            Ordering::Release,
        );
        Ok(())
    }

    fn stats(&self) -> DeviceStats {
        let c = &self.counters;
        DeviceStats {
            rx_packets: c.rx_packets.load(Ordering::Relaxed),
            tx_packets: c.tx_packets.load(Ordering::Relaxed),
            bad_packets: c.bad_packets.load(Ordering::Relaxed),
            unknown_qp: c.unknown_qp.load(Ordering::Relaxed),
            wrong_source: c.wrong_source.load(Ordering::Relaxed),
            faults: self
                .extras
                .lock()
                .faults
                .as_ref()
                .map(|f| f.stats())
                .unwrap_or_default(),
        }
    }

    /// The device's address.
    pub(crate) fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    fn now(&self) -> Time {
        Time(self.epoch.elapsed().as_nanos() as u64)
    }

    /// Descriptors a sleeper polls: the socket and the wake-up eventfd.
    pub(crate) fn fds(&self) -> [RawFd; 2] {
        [self.sock.as_raw_fd(), self.efd.raw()]
    }

    /// Time until the next timer, if any.
    pub(crate) fn next_timer(&self) -> Option<Duration> {
        let mut d = self.delayed_deadline.load(Ordering::Acquire);
        for cell in self.qps.read().values() {
            d = d.min(cell.deadline.load(Ordering::Acquire));
        }
        if d == u64::MAX {
            return None;
        }
        Some(Duration::from_nanos(d.saturating_sub(self.now().0)))
    }

    /// Marks a sleeper (so posts wake it to recompute its timeout).
    pub(crate) fn begin_sleep(&self) {
        self.sleepers.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn end_sleep(&self) {
        self.sleepers.fetch_sub(1, Ordering::AcqRel);
        self.efd.drain();
    }

    /// Creates a QP in INIT reporting to `rep`; returns its number.
    pub(crate) fn create_qp(
        &self,
        table: Arc<dyn rc::RemoteMemoryTable>,
        rep: Arc<Reporting>,
    ) -> Result<u32, Error> {
        let mut qps = self.qps.write();
        let mut qpn = self.next_qpn.load(Ordering::Relaxed);
        for _ in 0..0x100_0000 {
            qpn = (qpn + 1) & 0xFF_FFFF;
            if qpn > 1 && !qps.contains_key(&qpn) {
                break;
            }
        }
        self.next_qpn.store(qpn, Ordering::Relaxed);
        let mut qp = QueuePair::new(qpn, table);
        qp.modify_to_init()
            .map_err(|e| Error::new(ErrorKind::Other, e.to_string()))?;
        qp.set_truncate_receives(true);
        qps.insert(
            qpn,
            Arc::new(QpCell {
                slot: Mutex::new(QpSlot {
                    qp,
                    rep,
                    ops: HashMap::new(),
                    recvs: HashMap::new(),
                    next_op: 0,
                    next_recv: 0,
                    ended: false,
                }),
                deadline: AtomicU64::new(u64::MAX),
                acks_held: AtomicU64::new(u64::MAX),
                peer: AtomicU64::new(0),
            }),
        );
        Ok(qpn)
    }

    fn cell(&self, qpn: u32) -> Option<Arc<QpCell>> {
        self.qps.read().get(&qpn).cloned()
    }

    /// Moves a QP to RTR and RTS. From then on it accepts packets only from the
    /// address of `rtr.remote` and from source port `peer_port` (`None`: the port of
    /// the first packet from that address, for peers such as kernel rxe that send
    /// from a per-QP port nobody told us).
    pub(crate) fn connect_qp(
        &self,
        qpn: u32,
        rtr: RtrAttr,
        rts: RtsAttr,
        peer_port: Option<u16>,
    ) -> Result<(), Error> {
        let rts = RtsAttr {
            retry_cnt: self.retry_cnt.load(Ordering::Relaxed),
            ..rts
        };
        if let Some(cell) = self.cell(qpn) {
            let ip = u64::from(u32::from(*rtr.remote.ip())) << 16;
            let port = match peer_port {
                Some(p) => u64::from(p),
                None => PEER_LEARN,
            };
            cell.peer.store(PEER_SET | ip | port, Ordering::Release);
        }
        self.with_qp(qpn, |slot| {
            slot.qp
                .modify_to_rtr(rtr)
                .and_then(|_| slot.qp.modify_to_rts(rts))
                .map_err(|e| Error::new(ErrorKind::Other, format!("QP {qpn:#x}: {e}")))
        })
    }

    /// Moves a QP to ERROR (flushing its work requests as error completions) and,
    /// with `remove`, forgets it.
    pub(crate) fn error_qp(&self, qpn: u32, remove: bool) {
        if let Some(cell) = self.cell(qpn) {
            let mut slot = cell.slot.lock();
            slot.qp.modify_to_error();
            // Send the NAKs that explain the error, if any.
            self.flush_qp(&cell, &mut slot, self.now());
        }
        if remove {
            self.qps.write().remove(&qpn);
        }
    }

    /// Runs `f` on a QP, then sends what it produced and routes its completions.
    pub(crate) fn with_qp<R>(
        &self,
        qpn: u32,
        f: impl FnOnce(&mut QpSlot) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let cell = self
            .cell(qpn)
            .ok_or_else(|| Error::new(ErrorKind::NotConnected, "the queue pair is gone"))?;
        let mut slot = cell.slot.lock();
        let r = f(&mut slot);
        self.flush_qp(&cell, &mut slot, self.now());
        drop(slot);
        if self.sleepers.load(Ordering::Acquire) > 0 {
            self.efd.signal();
        }
        if self.backstop_waiting.load(Ordering::SeqCst) {
            self.backstop_efd.signal();
        }
        r
    }

    /// Runs `f`, which gives the QP nothing to send (posting a receive), on a QP:
    /// routes completions and sends nothing new, so ACKs held for the application's
    /// answer stay held until the answer is posted.
    pub(crate) fn with_qp_quiet<R>(
        &self,
        qpn: u32,
        f: impl FnOnce(&mut QpSlot) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let cell = self
            .cell(qpn)
            .ok_or_else(|| Error::new(ErrorKind::NotConnected, "the queue pair is gone"))?;
        let mut slot = cell.slot.lock();
        let r = f(&mut slot);
        if cell.acks_held.load(Ordering::Acquire) != u64::MAX && slot.qp.only_acks_pending() {
            slot.drain_completions();
        } else {
            self.flush_qp(&cell, &mut slot, self.now());
        }
        r
    }

    /// Sends the ACKs QPs hold back: all of them (`due` false: before anyone
    /// sleeps), or those held for [`ACK_HOLD`] already (every progress call).
    pub(crate) fn release_acks(&self, due: bool) {
        if !self.acks_held.load(Ordering::Acquire) {
            return;
        }
        let now = self.now();
        let limit = if due {
            now.0.saturating_sub(ACK_HOLD.as_nanos() as u64)
        } else {
            u64::MAX - 1
        };
        let mut still_held = false;
        let release: Vec<Arc<QpCell>> = {
            let qps = self.qps.read();
            let mut v = Vec::new();
            for c in qps.values() {
                let since = c.acks_held.load(Ordering::Acquire);
                if since <= limit {
                    v.push(c.clone());
                } else if since != u64::MAX {
                    still_held = true;
                }
            }
            v
        };
        if !still_held {
            self.acks_held.store(false, Ordering::Release);
        }
        for cell in release {
            let mut slot = cell.slot.lock();
            if cell.acks_held.load(Ordering::Acquire) != u64::MAX {
                self.flush_qp(&cell, &mut slot, now);
            }
        }
    }

    /// Manual progress: receive, run timers, send, complete. `wait_lock` false skips
    /// the work when another thread is already receiving on this device, and lets a
    /// QP that just received a one-packet message hold its ACK back for the
    /// application's answer (the caller is a busy poller; see [`Self::dispatch`]).
    pub(crate) fn progress(&self, wait_lock: bool) {
        self.app_progress.store(self.now().0, Ordering::Relaxed);
        self.run(wait_lock, !wait_lock);
    }

    /// Receives, runs timers, sends. `wait_lock` false: skip when another thread is
    /// receiving; `hold_acks`: see [`Self::dispatch`].
    fn run(&self, wait_lock: bool, hold_acks: bool) {
        self.release_acks(hold_acks || wait_lock);
        let mut rx = if wait_lock {
            self.rx.lock()
        } else {
            match self.rx.try_lock() {
                Some(s) => s,
                None => return,
            }
        };
        let fd = self.sock.as_raw_fd();
        let mut now = self.now();
        for _ in 0..MAX_ROUNDS {
            let n = match rx.rx.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    // e.g. ECONNREFUSED reported for an earlier datagram: harmless.
                    debug!("recvmmsg: {e}");
                    0
                }
            };
            if n > 0 {
                now = self.now();
                self.dispatch(&mut rx, now, n, hold_acks);
            }
            if n < BATCH {
                break;
            }
        }
        self.timers(now);
        drop(rx);
    }

    /// Tells the owners of QPs that entered ERROR on their own (a refused access, a
    /// NAK, retries exhausted). Call with no lock held: owners take their own.
    pub(crate) fn report_failures(&self) {
        if !self.has_failed.swap(false, Ordering::AcqRel) {
            return;
        }
        let failed = std::mem::take(&mut *self.failed.lock());
        for (rep, reason) in failed {
            if let Some(owner) = rep.owner.get().and_then(Weak::upgrade) {
                owner.qp_failed(reason);
            }
        }
    }

    /// Hands a received batch to the QPs, then sends what they produced.
    ///
    /// With `hold_acks`, a QP that completed the receive of a one-packet message and
    /// has nothing but ACKs to send keeps them for the moment: a busy-polling
    /// application typically answers at once, and the ACK then leaves in the same
    /// `sendmmsg` as the answer (one system call per message on the critical path of
    /// a ping-pong instead of two). Held ACKs leave with the next post of a send on
    /// that QP, after [`ACK_HOLD`] at the next progress call on the device, or before
    /// anyone sleeps. Only when the peer's work completes changes: the ACK covers the
    /// same PSNs, and the peer's retransmission timer (milliseconds) bounds the wait.
    fn dispatch(&self, st: &mut RxState, now: Time, n: usize, hold_acks: bool) {
        let RxState {
            rx,
            touched,
            ip_ids,
        } = st;
        {
            let qps = self.qps.read();
            let mut last: Option<(u32, &Arc<QpCell>)> = None;
            let mut slot_guard = None;
            for i in 0..n {
                let (src, bytes) = rx.get(i);
                let icrc = IcrcContext::rxe(*src.ip(), self.ip, src.port(), ROCE_UDP_PORT);
                let ip_id = match icrc.solve_ip_id(bytes) {
                    Ok(id) if bytes.len() >= 16 => id,
                    _ => {
                        self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let qpn = u32::from_be_bytes([0, bytes[5], bytes[6], bytes[7]]);
                if last.is_none_or(|(q, _)| q != qpn) {
                    slot_guard = None;
                    let Some(cell) = qps.get(&qpn) else {
                        self.counters.unknown_qp.fetch_add(1, Ordering::Relaxed);
                        last = None;
                        continue;
                    };
                    if !touched.iter().any(|c| Arc::ptr_eq(c, cell)) {
                        touched.push(cell.clone());
                    }
                    last = Some((qpn, cell));
                    slot_guard = Some(cell.slot.lock());
                }
                if let Some((_, cell)) = last {
                    if !cell.source_ok(src) {
                        self.counters.wrong_source.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                // Judged per peer address: the sender numbers its IDs per
                // destination, across all its QPs.
                if ip_ids.len() >= MAX_ID_PEERS && !ip_ids.contains_key(src.ip()) {
                    ip_ids.clear();
                }
                if !ip_ids.entry(*src.ip()).or_default().accept(ip_id, now.0) {
                    self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // The guard belongs to `last`, set just above.
                if let Some(slot) = slot_guard.as_mut() {
                    if slot.qp.handle_packet(now, bytes).is_err() {
                        self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.counters
            .rx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
        for cell in touched.drain(..) {
            let mut slot = cell.slot.lock();
            // Completions first, so the application sees the receive now.
            if hold_acks
                && slot.qp.only_acks_pending()
                && slot.drain_completions()
                && slot.qp.only_acks_pending()
            {
                if cell.acks_held.load(Ordering::Acquire) == u64::MAX {
                    cell.acks_held.store(now.0, Ordering::Release);
                }
                self.acks_held.store(true, Ordering::Release);
                cell.deadline.store(
                    slot.qp.poll_timeout().map_or(u64::MAX, |t| t.0),
                    Ordering::Release,
                );
                continue;
            }
            self.flush_qp(&cell, &mut slot, now);
        }
    }

    /// Runs the QP timers that are due and releases delayed frames.
    fn timers(&self, now: Time) {
        let due: Vec<Arc<QpCell>> = {
            let qps = self.qps.read();
            if !qps
                .values()
                .any(|c| c.deadline.load(Ordering::Acquire) <= now.0)
            {
                Vec::new()
            } else {
                qps.values()
                    .filter(|c| c.deadline.load(Ordering::Acquire) <= now.0)
                    .cloned()
                    .collect()
            }
        };
        for cell in due {
            let mut slot = cell.slot.lock();
            if slot.qp.poll_timeout().is_some_and(|t| t <= now) {
                slot.qp.handle_timeout(now);
            }
            self.flush_qp(&cell, &mut slot, now);
        }
        if self.delayed_deadline.load(Ordering::Acquire) <= now.0 {
            let mut x = self.extras.lock();
            let mut out = Vec::new();
            while x.delayed.peek().is_some_and(|d| d.0 .0 <= now) {
                if let Some(std::cmp::Reverse((_, _, dst, frame))) = x.delayed.pop() {
                    out.push((dst, frame));
                }
            }
            self.delayed_deadline.store(
                x.delayed.peek().map_or(u64::MAX, |d| d.0 .0 .0),
                Ordering::Release,
            );
            self.send_raw(&mut out, &mut x.pcap, now);
            self.has_extras.store(
                x.faults.is_some() || x.pcap.is_some() || !x.delayed.is_empty(),
                Ordering::Release,
            );
        }
    }

    /// Sends what a QP has to send (through the fault injector, if any), routes its
    /// completions and publishes its next timer. Called with the QP's lock held, so
    /// its packets leave in order.
    fn flush_qp(&self, cell: &QpCell, slot: &mut QpSlot, now: Time) {
        let mut out: Vec<(SocketAddrV4, Vec<u8>)> = Vec::new();
        // Pacing (see [`Pace`]): at most a burst per turn; the rest on a later turn.
        let burst = self.pace_burst.load(Ordering::Relaxed);
        let mut sent = 0usize;
        let mut paused = false;
        loop {
            if sent >= burst {
                paused = true;
                break;
            }
            let Some(t) = slot.qp.poll_transmit(now) else {
                break;
            };
            sent += 1;
            if out.capacity() == 0 {
                out.reserve(BATCH);
            }
            out.push((t.dst, t.payload));
            if out.len() >= BATCH {
                self.send(&mut out, now);
                for (_, frame) in out.drain(..) {
                    slot.qp.recycle(frame);
                }
            }
        }
        self.send(&mut out, now);
        for (_, frame) in out.drain(..) {
            slot.qp.recycle(frame);
        }
        cell.acks_held.store(u64::MAX, Ordering::Release);
        slot.drain_completions();
        if !slot.ended && slot.qp.state() == rc::QpState::Error {
            slot.ended = true;
            if let Some(reason) = slot.qp.error_cause().and_then(shutdown_reason) {
                self.failed.lock().push((slot.rep.clone(), reason));
                self.has_failed.store(true, Ordering::Release);
            }
        }
        let mut deadline = slot.qp.poll_timeout().map_or(u64::MAX, |t| t.0);
        if paused {
            // Come back for the rest after the gap (the timer pass flushes it).
            let resume = now.0 + self.pace_gap_ns.load(Ordering::Relaxed);
            deadline = deadline.min(resume);
        }
        cell.deadline.store(deadline, Ordering::Release);
    }

    /// Sends frames, through the fault injector and capture when configured. `out`
    /// keeps the frames that passed (whose buffers the caller may reuse).
    fn send(&self, out: &mut Vec<(SocketAddrV4, Vec<u8>)>, now: Time) {
        if out.is_empty() {
            return;
        }
        if !self.has_extras.load(Ordering::Acquire) {
            let n = sys::send_batch(self.sock.as_raw_fd(), out);
            self.counters
                .tx_packets
                .fetch_add(n as u64, Ordering::Relaxed);
            return;
        }
        let mut x = self.extras.lock();
        let TxExtras {
            faults,
            delayed,
            seq,
            pcap,
        } = &mut *x;
        if let Some(f) = faults.as_mut() {
            let mut passed = Vec::with_capacity(out.len());
            for (dst, payload) in out.drain(..) {
                for (at, frame) in f.inject(now, payload) {
                    if at <= now {
                        passed.push((dst, frame));
                    } else {
                        *seq += 1;
                        delayed.push(std::cmp::Reverse((at, *seq, dst, frame)));
                    }
                }
            }
            *out = passed;
            self.delayed_deadline.store(
                delayed.peek().map_or(u64::MAX, |d| d.0 .0 .0),
                Ordering::Release,
            );
        }
        self.send_raw(out, pcap, now);
    }

    /// Sends frames as they are and captures them.
    fn send_raw(&self, out: &mut [(SocketAddrV4, Vec<u8>)], pcap: &mut Option<Capture>, now: Time) {
        if out.is_empty() {
            return;
        }
        let n = sys::send_batch(self.sock.as_raw_fd(), out);
        self.counters
            .tx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
        if let Some(c) = pcap.as_ref() {
            let wall = Time(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(now.0, |d| d.as_nanos() as u64),
            );
            let mut w = c.lock();
            let mut ok = true;
            for (dst, payload) in out.iter().take(n) {
                let info = FrameInfo::rxe(self.ip, *dst.ip(), ROCE_UDP_PORT);
                let written = build_frame(&info, payload).map(|f| w.write_frame(wall, &f));
                if !matches!(written, Ok(Ok(()))) {
                    ok = false;
                    break;
                }
            }
            ok &= std::io::Write::flush(w.get_mut()).is_ok();
            drop(w);
            if !ok {
                warn!("softroce: capture write failed; capture stopped");
                *pcap = None;
            }
        }
    }

    /// The RTR attributes of a connection to `peer`.
    pub(crate) fn rtr(&self, mtu: rc::Mtu, dest_qpn: u32, rq_psn: u32, peer: Ipv4Addr) -> RtrAttr {
        RtrAttr {
            mtu,
            dest_qpn,
            rq_psn,
            max_dest_rd_atomic: QP_RD_ATOMIC,
            min_rnr_timer: RNR_TIMER,
            local: SocketAddrV4::new(self.ip, ROCE_UDP_PORT),
            remote: SocketAddrV4::new(peer, ROCE_UDP_PORT),
        }
    }
}

/// Default interval of the progress backstop: short enough that the peer's first
/// retransmission timer (2.1 ms) rarely fires when the application stops polling, long
/// enough that its checks cost a busy-polling application nothing measurable.
pub const DEFAULT_BACKSTOP: Duration = Duration::from_millis(1);

/// Longest the backstop sleeps on an idle device (bounds how long it keeps a dropped
/// device's socket open).
const BACKSTOP_IDLE: Duration = Duration::from_millis(50);

/// The backstop thread of a device, as a NIC's transport never stops: whenever no
/// application thread has run the device's transport (a completion or event queue
/// read, a sleeping wait that woke, the auto-progress thread) for the backstop
/// interval and none sleeps on the device, it runs it: receives, answers (ACK, NAK,
/// RNR NAK, READ responses), retransmits, and tells QP owners of failures. While the
/// application stays away it sleeps on the socket and the next timer, so it answers
/// at once; when the application polls again it steps back and only looks every
/// interval. Ends when the device is dropped.
fn backstop(weak: Weak<Device>) {
    debug!("softroce backstop started");
    loop {
        let Some(dev) = weak.upgrade() else { break };
        let every = dev.backstop_ns.load(Ordering::Relaxed);
        if every == 0 {
            drop(dev);
            std::thread::sleep(BACKSTOP_IDLE);
            continue;
        }
        let now = dev.now().0;
        let since = now.saturating_sub(dev.app_progress.load(Ordering::Relaxed));
        if dev.sleepers.load(Ordering::Acquire) > 0 || since < every {
            // An application thread runs the transport, or sleeps on the socket
            // and will: look again when it may have stopped.
            let wait = if since < every { every - since } else { every };
            drop(dev);
            std::thread::sleep(Duration::from_nanos(wait));
            continue;
        }
        dev.run(false, false);
        dev.report_failures();
        dev.backstop_waiting.store(true, Ordering::SeqCst);
        let timeout = dev
            .next_timer()
            .map_or(BACKSTOP_IDLE, |t| t.min(BACKSTOP_IDLE));
        fabric_core::wait::poll_readable(
            &[dev.sock.as_raw_fd(), dev.backstop_efd.raw()],
            Some(timeout),
        );
        dev.backstop_waiting.store(false, Ordering::Release);
        dev.backstop_efd.drain();
    }
    debug!("softroce backstop stopped");
}

/// Longest a busy-polled QP holds an ACK back for the application's answer (a
/// ping-pong answers within a few µs; the peer's retransmission timer is 2 ms).
const ACK_HOLD: Duration = Duration::from_micros(50);

/// Read/atomic/FLUSH requests outstanding per QP, both directions.
pub(crate) const QP_RD_ATOMIC: u8 = 16;
/// RNR NAK timer code sent by our responders: 12 = 0.64 ms.
pub(crate) const RNR_TIMER: u8 = 12;

/// Transport retry count unless a device is configured otherwise.
pub(crate) const DEFAULT_RETRY_CNT: u8 = 7;

/// The RTS attributes every softroce QP uses: retry_cnt 7 (or the device's
/// [`DeviceConfig::retry_cnt`]), rnr_retry 7 (infinite) and
/// a 2 ms retransmission timeout that doubles on each consecutive expiry (about 0.5 s
/// of silence before `RetryExceeded`).
pub(crate) fn rts(sq_psn: u32, timeout: Duration) -> RtsAttr {
    RtsAttr {
        sq_psn,
        timeout,
        retry_cnt: DEFAULT_RETRY_CNT,
        rnr_retry: 7,
        max_rd_atomic: QP_RD_ATOMIC,
    }
}
