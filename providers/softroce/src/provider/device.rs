//! The device: one unconnected UDP socket on `<IPv4>:4791` per address and process,
//! shared by every domain that uses the address (like one NIC with many QPs), with
//! the queue pairs it demultiplexes to by destination QPN, their timers, the fault
//! injector and the capture writer.
//!
//! Whoever makes progress (a completion-queue read, a sleeping `sread` that woke, the
//! auto-progress thread) locks the device, receives a batch with `recvmmsg`, verifies
//! every ICRC assuming rxe's IP header (ID 0, DF), hands packets to their QPs, runs due
//! timers, sends what the QPs produce with `sendmmsg` and routes completions to the
//! endpoints' completion queues.

use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::BufWriter;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use fabric_core::{CompFlags, Completion, CqError, CqErrorKind, Error, ErrorKind, Fid};
use parking_lot::Mutex;
use tracing::{debug, warn};

use super::queue::WaitQueue;
use super::sys::{self, EventFd, RecvBatch, BATCH};
use crate::fault::{FaultConfig, FaultInjector};
use crate::pcap::{PcapWriter, LINKTYPE_RAW};
use crate::rc::{self, QueuePair, RecvWr, RtrAttr, RtsAttr, SendWr, Time, WcOpcode, WcStatus};
use crate::wire::frame::{build_frame, FrameInfo, ROCE_UDP_PORT};
use crate::wire::IcrcContext;

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
}

impl DeviceConfig {
    /// The configuration the environment asks for. `SOFTROCE_FAULTS` is a comma list
    /// of `drop=P`, `dup=P`, `reorder=P`, `corrupt=P` (probabilities 0..1), `seed=N`,
    /// `delay_us=N`, `jitter_us=N`, `reorder_us=N` (extra delay of a reordered frame,
    /// default 200); `SOFTROCE_PCAP` a file path.
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
        Ok(c)
    }
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

/// Where an endpoint's completions go.
pub(crate) struct Reporting {
    pub(crate) fid: Fid,
    pub(crate) tx_cq: Arc<CompQueue>,
    pub(crate) rx_cq: Arc<CompQueue>,
}

/// A QP on the device and its bookkeeping.
pub(crate) struct QpSlot {
    qp: QueuePair,
    rep: Arc<Reporting>,
    ops: HashMap<u64, OpTrack>,
    recvs: HashMap<u64, RecvTrack>,
    next_op: u64,
    next_recv: u64,
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

    fn drain_completions(&mut self) {
        while let Some(c) = self.qp.poll_completion() {
            self.route(c);
        }
    }
}

/// A frame held back by the fault injector: due time, sequence (stable order), where
/// to, bytes.
type DelayedFrame = std::cmp::Reverse<(Time, u64, SocketAddrV4, Vec<u8>)>;

/// The process-wide devices and the configurations set for addresses.
type DeviceRegistry = Mutex<HashMap<Ipv4Addr, (Weak<Device>, Option<DeviceConfig>)>>;

struct DevState {
    qps: HashMap<u32, QpSlot>,
    next_qpn: u32,
    rx: RecvBatch,
    out: Vec<(SocketAddrV4, Vec<u8>)>,
    faults: Option<FaultInjector>,
    delayed: BinaryHeap<DelayedFrame>,
    seq: u64,
    pcap: Option<Capture>,
    stats: DeviceStats,
}

/// A RoCEv2 device: the UDP socket of one IPv4 address.
pub struct Device {
    ip: Ipv4Addr,
    sock: UdpSocket,
    efd: EventFd,
    epoch: Instant,
    state: Mutex<DevState>,
    /// Next timer in nanoseconds since `epoch` (`u64::MAX`: none).
    deadline: AtomicU64,
    sleepers: AtomicUsize,
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

/// Counters of the device on `ip`, if one exists in this process.
pub fn device_stats(ip: Ipv4Addr) -> Option<DeviceStats> {
    let dev = registry().lock().get(&ip).and_then(|e| e.0.upgrade())?;
    let mut st = dev.state.lock();
    if let Some(f) = &st.faults {
        st.stats.faults = f.stats();
    }
    Some(st.stats)
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
            state: Mutex::new(DevState {
                qps: HashMap::new(),
                next_qpn: 0x11 + (rand::random::<u32>() & 0xFFFF),
                rx: RecvBatch::new(),
                out: Vec::with_capacity(256),
                faults: None,
                delayed: BinaryHeap::new(),
                seq: 0,
                pcap: None,
                stats: DeviceStats::default(),
            }),
            deadline: AtomicU64::new(u64::MAX),
            sleepers: AtomicUsize::new(0),
        });
        dev.apply(&config)?;
        debug!(%ip, ?config, "softroce device created");
        r.insert(ip, (Arc::downgrade(&dev), Some(config)));
        Ok(dev)
    }

    fn apply(&self, config: &DeviceConfig) -> Result<(), Error> {
        let pcap = config.pcap.as_ref().map(open_pcap).transpose()?;
        let mut st = self.state.lock();
        st.faults = config.faults.map(|(f, seed)| FaultInjector::new(f, seed));
        st.pcap = pcap;
        Ok(())
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
        let d = self.deadline.load(Ordering::Acquire);
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
        let mut st = self.state.lock();
        let mut qpn = st.next_qpn;
        for _ in 0..0x100_0000 {
            qpn = (qpn + 1) & 0xFF_FFFF;
            if qpn > 1 && !st.qps.contains_key(&qpn) {
                break;
            }
        }
        st.next_qpn = qpn;
        let mut qp = QueuePair::new(qpn, table);
        qp.modify_to_init()
            .map_err(|e| Error::new(ErrorKind::Other, e.to_string()))?;
        qp.set_truncate_receives(true);
        st.qps.insert(
            qpn,
            QpSlot {
                qp,
                rep,
                ops: HashMap::new(),
                recvs: HashMap::new(),
                next_op: 0,
                next_recv: 0,
            },
        );
        Ok(qpn)
    }

    /// Moves a QP to RTR and RTS.
    pub(crate) fn connect_qp(&self, qpn: u32, rtr: RtrAttr, rts: RtsAttr) -> Result<(), Error> {
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
        let mut st = self.state.lock();
        if let Some(slot) = st.qps.get_mut(&qpn) {
            slot.qp.modify_to_error();
            slot.drain_completions();
        }
        // Send the NAKs that explain the error, if any.
        let now = self.now();
        self.transmit(&mut st, now);
        if remove {
            st.qps.remove(&qpn);
        }
        self.update_deadline(&st);
    }

    /// Runs `f` on a QP, then sends what it produced and routes its completions.
    pub(crate) fn with_qp<R>(
        &self,
        qpn: u32,
        f: impl FnOnce(&mut QpSlot) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut st = self.state.lock();
        let slot = st
            .qps
            .get_mut(&qpn)
            .ok_or_else(|| Error::new(ErrorKind::NotConnected, "the queue pair is gone"))?;
        let r = f(slot);
        slot.drain_completions();
        let now = self.now();
        self.transmit(&mut st, now);
        self.update_deadline(&st);
        drop(st);
        if self.sleepers.load(Ordering::Acquire) > 0 {
            self.efd.signal();
        }
        r
    }

    /// Manual progress: receive, run timers, send, complete. `wait_lock` false skips
    /// the work when another thread is already at it.
    pub(crate) fn progress(&self, wait_lock: bool) {
        let mut st = if wait_lock {
            self.state.lock()
        } else {
            match self.state.try_lock() {
                Some(s) => s,
                None => return,
            }
        };
        let fd = self.sock.as_raw_fd();
        for _ in 0..MAX_ROUNDS {
            let now = self.now();
            let n = match st.rx.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    // e.g. ECONNREFUSED reported for an earlier datagram: harmless.
                    debug!("recvmmsg: {e}");
                    0
                }
            };
            self.dispatch(&mut st, now, n);
            self.timers(&mut st, now);
            self.transmit(&mut st, now);
            if n < BATCH {
                break;
            }
        }
        self.update_deadline(&st);
    }

    fn dispatch(&self, st: &mut DevState, now: Time, n: usize) {
        let DevState { rx, qps, stats, .. } = st;
        for i in 0..n {
            let (src, bytes) = rx.get(i);
            stats.rx_packets += 1;
            let icrc = IcrcContext::rxe(*src.ip(), self.ip, src.port(), ROCE_UDP_PORT);
            if bytes.len() < 16 || icrc.verify(bytes).is_err() {
                stats.bad_packets += 1;
                continue;
            }
            let qpn = u32::from_be_bytes([0, bytes[5], bytes[6], bytes[7]]);
            let Some(slot) = qps.get_mut(&qpn) else {
                stats.unknown_qp += 1;
                continue;
            };
            if slot.qp.handle_packet(now, bytes).is_err() {
                stats.bad_packets += 1;
            }
        }
    }

    fn timers(&self, st: &mut DevState, now: Time) {
        for slot in st.qps.values_mut() {
            if slot.qp.poll_timeout().is_some_and(|t| t <= now) {
                slot.qp.handle_timeout(now);
            }
        }
    }

    /// Sends what every QP has to send (through the fault injector), releases delayed
    /// frames that are due, and routes completions.
    fn transmit(&self, st: &mut DevState, now: Time) {
        let DevState {
            qps,
            out,
            faults,
            delayed,
            seq,
            pcap,
            stats,
            ..
        } = st;
        for slot in qps.values_mut() {
            while let Some(t) = slot.qp.poll_transmit(now) {
                match faults.as_mut() {
                    None => out.push((t.dst, t.payload)),
                    Some(f) => {
                        for (at, frame) in f.inject(now, t.payload) {
                            if at <= now {
                                out.push((t.dst, frame));
                            } else {
                                *seq += 1;
                                delayed.push(std::cmp::Reverse((at, *seq, t.dst, frame)));
                            }
                        }
                    }
                }
                if out.len() >= 4 * BATCH {
                    self.send(out, pcap, stats, now);
                }
            }
            slot.drain_completions();
        }
        while delayed.peek().is_some_and(|d| d.0 .0 <= now) {
            if let Some(std::cmp::Reverse((_, _, dst, frame))) = delayed.pop() {
                out.push((dst, frame));
            }
        }
        self.send(out, pcap, stats, now);
    }

    fn send(
        &self,
        out: &mut Vec<(SocketAddrV4, Vec<u8>)>,
        pcap: &mut Option<Capture>,
        stats: &mut DeviceStats,
        now: Time,
    ) {
        if out.is_empty() {
            return;
        }
        let n = sys::send_batch(self.sock.as_raw_fd(), out);
        stats.tx_packets += n as u64;
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
        out.clear();
    }

    fn update_deadline(&self, st: &DevState) {
        let mut d = u64::MAX;
        for slot in st.qps.values() {
            if let Some(t) = slot.qp.poll_timeout() {
                d = d.min(t.0);
            }
        }
        if let Some(x) = st.delayed.peek() {
            d = d.min(x.0 .0 .0);
        }
        self.deadline.store(d, Ordering::Release);
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

/// Read/atomic/FLUSH requests outstanding per QP, both directions.
pub(crate) const QP_RD_ATOMIC: u8 = 16;
/// RNR NAK timer code sent by our responders: 12 = 0.64 ms.
pub(crate) const RNR_TIMER: u8 = 12;

/// The RTS attributes every softroce QP uses: retry_cnt 7, rnr_retry 7 (infinite) and
/// a 2 ms retransmission timeout that doubles on each consecutive expiry (about 0.5 s
/// of silence before `RetryExceeded`).
pub(crate) fn rts(sq_psn: u32, timeout: Duration) -> RtsAttr {
    RtsAttr {
        sq_psn,
        timeout,
        retry_cnt: 7,
        rnr_retry: 7,
        max_rd_atomic: QP_RD_ATOMIC,
    }
}
