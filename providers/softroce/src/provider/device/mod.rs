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
//! By concern: [`config`] (how a device behaves), [`qp`] (QP slots and completion
//! routing, the glue to the endpoints), [`io`] (the I/O loop), [`backstop`]; the
//! device's types and its QP management are here.
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

use super::sys::{self, RecvBatch};
use crate::fault::{FaultConfig, FaultInjector};
use crate::pcap::{PcapWriter, LINKTYPE_RAW};
use crate::rc::{self, QueuePair, RecvWr, RtrAttr, RtsAttr, SendWr, Time, WcOpcode, WcStatus};
use crate::wire::ext::NakCode;
use crate::wire::frame::{build_frame, FrameInfo, ROCE_UDP_PORT};
use crate::wire::{IcrcContext, IpIdDelta, IpIdWindow};
use fabric_core::wait::{EventFd, WaitQueue};

mod backstop;
mod config;
mod io;
mod qp;
pub(crate) mod share;

use backstop::backstop;
pub use backstop::DEFAULT_BACKSTOP;
pub use config::{parse_faults, parse_pace, CmProtocol, DeviceConfig, Pace};
use qp::shutdown_reason;

/// Batches received per progress call at most (bounds the time under the lock).
const MAX_ROUNDS: usize = 16;

/// How often a busy poller that received nothing reads the process-to-process socket
/// (frames another process sharing the device passed on): that second system call on
/// every poll was about a fifth of a busy-polled ping-pong's samples, and a passed
/// frame is the rare path (the kernel sends a peer's frames to one socket). Blocking
/// waits, the backstop and a poll that received anything read it every time.
const SHARE_POLL_NS: u64 = 20_000;

/// A completion queue's shared part.
pub(crate) type CompQueue = WaitQueue<Completion>;

/// Counters of a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Datagrams received.
    pub rx_packets: u64,
    /// Datagrams handed to the kernel.
    pub tx_packets: u64,
    /// Datagrams dropped because their ICRC (or framing) was wrong.
    pub bad_packets: u64,
    /// Datagrams for a QPN the device does not have (in any process sharing it).
    pub unknown_qp: u64,
    /// Datagrams for another process's QP on this shared device, passed to it
    /// (see "One device, many processes" in the crate docs).
    pub forwarded: u64,
    /// Datagrams another process passed to this one.
    pub forwarded_in: u64,
    /// Datagrams on the device's process-to-process socket from another user, or
    /// malformed, dropped.
    pub forward_refused: u64,
    /// Datagrams with a valid ICRC for a connected QP that did not come from that
    /// QP's peer (another address, or another source port than the peer's).
    pub wrong_source: u64,
    /// UDP segmentation offload sends (of several packets each) handed to the kernel.
    pub gso_sends: u64,
    /// Packets that arrived inside GRO super-datagrams (several packets of one
    /// sender that the kernel kept together).
    pub gro_packets: u64,
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
    /// Pacing: the QP sends nothing before this time (ns since the device's epoch;
    /// see [`Pace`]).
    paced_until: AtomicU64,
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
    /// Frames other processes passed to this one (a receive buffer, reused).
    fwd: Vec<(SocketAddrV4, Vec<u8>)>,
    /// When a busy poller last read the process-to-process socket (see
    /// [`SHARE_POLL_NS`]).
    share_at: u64,
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
    forwarded: AtomicU64,
    forwarded_in: AtomicU64,
    forward_refused: AtomicU64,
    wrong_source: AtomicU64,
    gso_sends: AtomicU64,
    gro_packets: AtomicU64,
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
    /// This process's slot on the shared device; its QPNs are `slot << 16 | n`.
    share: share::Share,
    next_qpn: AtomicU32,
    rx: Mutex<RxState>,
    extras: Mutex<TxExtras>,
    /// Whether `extras` must be consulted on every send.
    has_extras: AtomicBool,
    /// The kernel has UDP segmentation offload (`UDP_SEGMENT`).
    gso_kernel: bool,
    /// Runs of packets leave as GSO sends ([`DeviceConfig::gso`], `gso_kernel`, and
    /// no refusal by the kernel so far).
    gso: AtomicBool,
    /// Due time of the earliest delayed frame (`u64::MAX`: none).
    delayed_deadline: AtomicU64,
    /// No QP timer is due before this (ns since `epoch`; `u64::MAX`: none). Lowered
    /// with every QP deadline set ([`Device::publish_deadline`]), recomputed by the
    /// timer pass when it falls due: a progress call or a sleep with only idle QPs
    /// reads this one word instead of every QP's deadline (issue 11, item 8).
    next_deadline: AtomicU64,
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

/// The connection manager endpoints connecting from `ip` use: its device's
/// configuration (set, or the environment's when the device was created), else the
/// environment's (`SOFTROCE_CM`); TCP unless one says otherwise.
pub(crate) fn cm_protocol(ip: Ipv4Addr) -> CmProtocol {
    let set = registry()
        .lock()
        .get(&ip)
        .and_then(|e| e.1.as_ref().map(|c| c.cm));
    match set {
        Some(cm) => cm.unwrap_or_default(),
        None => DeviceConfig::from_env()
            .ok()
            .and_then(|c| c.cm)
            .unwrap_or_default(),
    }
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
        let share = share::Share::open(ip)
            .map_err(|e| Error::from(e).context(format!("softroce: sharing the device on {ip}")))?;
        let gso_kernel = sys::gso_supported(sock.as_raw_fd());
        let dev = Arc::new(Device {
            ip,
            gso_kernel,
            gso: AtomicBool::new(false),
            sock,
            share,
            efd: EventFd::new()?,
            epoch: Instant::now(),
            qps: RwLock::new(HashMap::new()),
            next_qpn: AtomicU32::new(0x11 + (rand::random::<u32>() & 0xFFFF)),
            rx: Mutex::new(RxState {
                rx: RecvBatch::new(),
                touched: Vec::with_capacity(8),
                ip_ids: HashMap::new(),
                fwd: Vec::new(),
                share_at: 0,
            }),
            extras: Mutex::new(TxExtras {
                faults: None,
                delayed: BinaryHeap::new(),
                seq: 0,
                pcap: None,
            }),
            has_extras: AtomicBool::new(false),
            delayed_deadline: AtomicU64::new(u64::MAX),
            next_deadline: AtomicU64::new(u64::MAX),
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
        self.pace_burst.store(pace.burst.max(1), Ordering::Relaxed);
        self.pace_gap_ns
            .store(pace.gap.as_nanos() as u64, Ordering::Relaxed);
        self.backstop_ns.store(
            config.backstop.unwrap_or(DEFAULT_BACKSTOP).as_nanos() as u64,
            Ordering::Relaxed,
        );
        self.gso.store(
            self.gso_kernel && config.gso.unwrap_or(true),
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
            forwarded: c.forwarded.load(Ordering::Relaxed),
            forwarded_in: c.forwarded_in.load(Ordering::Relaxed),
            forward_refused: c.forward_refused.load(Ordering::Relaxed),
            wrong_source: c.wrong_source.load(Ordering::Relaxed),
            gso_sends: c.gso_sends.load(Ordering::Relaxed),
            gro_packets: c.gro_packets.load(Ordering::Relaxed),
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

    /// Descriptors a sleeper polls: the socket, the wake-up eventfd and the socket
    /// other processes sharing the device pass frames through.
    pub(crate) fn fds(&self) -> [RawFd; 3] {
        [self.sock.as_raw_fd(), self.efd.raw(), self.share.raw()]
    }

    /// Time until the next timer, if any.
    pub(crate) fn next_timer(&self) -> Option<Duration> {
        let d = self
            .delayed_deadline
            .load(Ordering::Acquire)
            .min(self.next_deadline.load(Ordering::Acquire));
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
        // This process's numbers: its slot in bits 16..24 (`share`), so that any
        // process sharing the device knows whose QP a packet is for.
        let base = u32::from(self.share.slot()) << 16;
        let mut low = self.next_qpn.load(Ordering::Relaxed);
        let mut qpn = 0;
        for _ in 0..0x1_0000 {
            low = (low + 1) & 0xFFFF;
            if !qps.contains_key(&(base | low)) {
                qpn = base | low;
                break;
            }
        }
        if qpn == 0 {
            return Err(Error::new(
                ErrorKind::Other,
                "softroce: this process has 65,536 queue pairs on the device already",
            ));
        }
        self.next_qpn.store(low, Ordering::Relaxed);
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
                paced_until: AtomicU64::new(0),
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

impl Device {
    /// A packet for QP1 (IB CM MADs) with a valid ICRC: judged by its IP ID as any
    /// other, then handed to the device's IB CM (`unknown_qp` if it has none).
    pub(super) fn gsi_receive(
        &self,
        ip_ids: &mut HashMap<Ipv4Addr, IpIdWindow>,
        src: SocketAddrV4,
        ip_id: u16,
        bytes: &[u8],
        now: Time,
    ) {
        if ip_ids.len() >= MAX_ID_PEERS && !ip_ids.contains_key(src.ip()) {
            ip_ids.clear();
        }
        if !ip_ids.entry(*src.ip()).or_default().accept(ip_id, now.0) {
            self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
        } else if !crate::ibcm::deliver(self.ip, src, bytes) {
            self.counters.unknown_qp.fetch_add(1, Ordering::Relaxed);
        } else if self.sleepers.load(Ordering::Acquire) > 0 {
            self.efd.signal();
        }
    }

    /// Sends a QP1 packet (built by the IB CM) to `to`'s port 4791.
    pub(crate) fn send_gsi(&self, to: Ipv4Addr, packet: Vec<u8>) {
        let mut out = vec![(SocketAddrV4::new(to, ROCE_UDP_PORT), packet)];
        self.send(&mut out, self.now());
    }
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
