//! The RDM endpoint: reliable unconnected messaging over connected (MSG) endpoints of
//! any provider, through the public fabric API only (libfabric rxm's model).
//!
//! # Protocol (per connection)
//! Every message starts with a 56-byte header (`wire`). The receiver keeps
//! `rx_buffers + 4` receive buffers of `eager_limit + 56` bytes posted; a sender may
//! have `rx_buffers` data messages (eager, rendezvous request/finish, atomic
//! request/response) outstanding (its credits), and every data message returns the
//! credits its sender has freed since. A receiver that has freed half its buffers
//! without sending says so in a credit-only message, which takes no credit (the four
//! extra buffers absorb them: at most two can be in flight). A message that finds no
//! matching receive keeps its buffer until one is posted, so the unexpected queue is
//! bounded by `rx_buffers` per peer and a sender that outruns its receiver stalls on
//! credits instead of growing memory.
//!
//! Messages up to `eager_limit` bytes are copied into the header's buffer. Larger
//! ones go by rendezvous: the sender sends a request naming its buffer (which must be
//! registered with `REMOTE_READ`), the receiver reads the data straight into the
//! matched receive buffer with an RMA read (which needs `READ` access on it) and sends
//! a finish; the sender's completion waits for the finish. So a large message is
//! copied once, by the fabric.
//!
//! Eager messages up to `eager_limit` are copied from the application's ranges
//! straight into a send buffer when the connection has a credit and nothing queued
//! (no allocation on that path); a rendezvous request lists up to [`IOV_LIMIT`]
//! ranges, which the receiver reads with one RMA read into its own ranges.
//! `writedata_to` writes, then, once the write has completed (been placed), sends a
//! `WriteData` message with the 64-bit data: the target's `RemoteWrite` completion
//! therefore always follows the data, whatever the provider's ordering.
//!
//! Atomics go natively on the MSG endpoint where its provider executes them (posted
//! like an RMA, completed by the provider's completion), else as an atomic
//! request/response pair executed by the target's layer ([`crate::atomic`]).
//!
//! # Progress
//! A progress thread per endpoint reads the underlying event and completion queues.
//! An application thread in [`RdmEndpoint::wait`], [`RdmEndpoint::read`] or
//! [`RdmEndpoint::tpeek`] runs the same progress round itself when no one else is (one
//! at a time, in order), which saves the hand-off through the thread; `read` collects
//! what its own round completed under the same lock. The thread stays away while the
//! application calls: it sleeps on a timer (a timerfd, `watchdog`) that the
//! application's calls keep pushing ahead (a clock read every 16 calls, a rearm every
//! half window), so a busy poller is never preempted by it; the timer fires, and the
//! thread takes over, once no call has come for the window: a quarter of the idle
//! timeout, between 2 and 8 ms (8 ms by default). The thread also wakes for
//! housekeeping (idle and late connections, every 100 ms or half the idle timeout).
//! A busy poller's round is a non-blocking completion-queue read (no lock when it
//! finds nothing); the event queue (the provider's full progress: connection manager,
//! socket polls) is read every 500 µs, or every round while a connection forms or
//! closes. While the application was active in the last 50 ms the thread's own rounds
//! do not sleep on the queues (they would hold the progress lock).
//!
//! Why a window of milliseconds and not less: on a virtual machine, a timer due before
//! the next scheduler tick (4 ms at 250 Hz) is programmed into the CPU's timer, an exit
//! to the hypervisor on the poller's core each time; a 2 ms window (rearmed every
//! millisecond) gave an 8-byte ping-pong over tcp a p99 of 19-26 µs one-way against
//! 12 µs with 8 ms, and the earlier design (the thread waking every 2 ms to look) 28-38
//! µs (`fabric-pingpong --self -e rdm --tagged -p tcp -S 8`, its `p99_us` column;
//! BENCHMARKS.md).
//!
//! Measured over tcp (busy-polled 8-byte ping-pong, RDM tagged against the MSG
//! endpoint on a 2-core virtual machine; BENCHMARKS.md, "The RDM row after the
//! progress-thread and per-message work"): `fabric-compare`'s RDM/MSG ratio of mean
//! latencies went from 1.32-1.68 to 1.02-1.08 (five runs), by removing the thread's
//! wake-ups and cutting the locks, locked instructions and allocations per message (the
//! state lock once per received message, a lock-free "nothing to collect" answer, one
//! clock read per 16 polls, an expected message matched with the sender's name
//! borrowed, region-to-region copies, inline receive ranges, a plain hash for
//! connection ids, no allocation per poll or per underlying operation). What is left,
//! 0.2-0.4 µs per one-way message: the header, the tag match, the copy out of the eager
//! buffer and the completion record. Over softroce the ratio was 1.5 to 1.8 at an
//! earlier stop: its ping-pong is dominated by the provider's own progress.
//!
//! # Connections
//! The first operation to a peer opens a connection to the peer's listener, carrying
//! this endpoint's name; operations wait in a bounded per-peer backlog meanwhile.
//! When two endpoints connect to each other at once, the connection initiated by the
//! endpoint with the smaller name wins: each side rejects the other's request or
//! accepts it and moves its backlog there, by the same rule, so both agree.
//!
//! # Idle close (a handshake)
//! A connection unused for `idle_timeout` (60 s by default) is closed by agreement,
//! so a message racing the close is neither lost nor failed:
//! 1. A side with nothing in flight on it (nothing queued, no operation waiting for
//!    the peer, no message of the peer held, every send completed) sends `CloseReq`
//!    and from then on sends nothing on it; operations the application posts to the
//!    peer wait in the backlog.
//! 2. The peer answers `CloseAck` only if it has nothing in flight toward the asker
//!    either, and then sends nothing more on it; otherwise `CloseNack`, and both go
//!    on. When both ask at once, the smaller name's request stands and the other
//!    answers it.
//! 3. The connection keeps order, so when the `CloseAck` arrives everything the peer
//!    sent before it has arrived too: if some of that still needs the connection (a
//!    held message, a rendezvous to read), the asker answers `CloseNack`; otherwise it
//!    shuts the connection down, and the peer closes on the shutdown event.
//! 4. Operations posted during the handshake move to a new connection (either side
//!    may open it; simultaneous connects resolve as above).
//!
//! Handshake messages take no credit (the receiver keeps spare buffers for them). A
//! side that gets no answer (or no shutdown) within `connect_timeout` closes as
//! agreed. Tested by the conformance case `rdm/idle_close_races`: 200 messages each
//! way at 0 to 11 ms gaps around a 5 ms idle timeout, every one delivered exactly once
//! while dozens of closes happen.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fabric_core::{
    Access, Completion, CompletionQueue, CqAttr, CqError, CqErrorKind, Domain, EndpointConfig,
    EqAttr, Error, ErrorKind, Event, EventQueue, Fid, Info, LocalIov, MemoryRegion, OpFlags,
    PassiveEndpoint, RemoteIov, Result, RmaMsg,
};
use parking_lot::{Condvar, Mutex};

use crate::atomic::{atomic_valid, execute, AtomicForm, AtomicOp, Datatype};
use crate::av::{decode_name, encode_name, AddressVector, FiAddr};
use crate::cntr::{CntrEvents, Counter};
use crate::watchdog::Watchdog;
use crate::wire::{
    Header, Op, F_DATA, F_TAGGED, HDR, ST_ACCESS, ST_FAILED, ST_INVALID, ST_OK, ST_TRUNCATED,
};
use crate::RdmInfo;

/// Receive buffers beyond the credited ones, for messages that take no credit:
/// credit-only messages (at most two in flight) and the close handshake's (a request
/// and an answer each way at most).
const EXTRA_RX: usize = 8;

/// Attributes of an RDM endpoint.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RdmAttr {
    /// Largest message sent eagerly (copied); larger ones go by rendezvous.
    pub eager_limit: usize,
    /// Receive buffers per connection (the peer's credits).
    pub rx_buffers: usize,
    /// Send buffers per connection.
    pub tx_buffers: usize,
    /// Most operations waiting per peer (connecting, or out of credits); beyond it a
    /// post fails with [`ErrorKind::WouldBlock`].
    pub backlog: usize,
    /// Most receives posted and not yet matched.
    pub max_posted: usize,
    /// How long a connection may take to form before its operations fail.
    pub connect_timeout: Duration,
    /// A connection idle this long with nothing outstanding is closed by the
    /// handshake in the module docs (default 60 s; `None`: never). A quarter of it,
    /// within 2 to 8 ms, is also how long after the application's last read, wait or
    /// peek the progress thread takes over (module docs, "Progress").
    pub idle_timeout: Option<Duration>,
}

impl Default for RdmAttr {
    fn default() -> Self {
        RdmAttr {
            eager_limit: 8192,
            rx_buffers: 32,
            tx_buffers: 32,
            backlog: 4096,
            max_posted: 4096,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(60)),
        }
    }
}

impl RdmAttr {
    /// Sets the eager limit.
    pub fn eager_limit(mut self, n: usize) -> Self {
        self.eager_limit = n;
        self
    }
    /// Sets the idle timeout.
    pub fn idle_timeout(mut self, t: Duration) -> Self {
        self.idle_timeout = Some(t);
        self
    }
}

/// What a completion is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpKind {
    /// A send.
    Send,
    /// A receive.
    Recv,
    /// A tagged send.
    TaggedSend,
    /// A tagged receive.
    TaggedRecv,
    /// An atomic (any form).
    Atomic,
    /// An RMA write.
    Write,
    /// An RMA read.
    Read,
    /// A peer's RMA write with remote CQ data landed here
    /// ([`RdmEndpoint::writedata_to`]; libfabric's `FI_REMOTE_WRITE | FI_REMOTE_CQ_DATA`).
    RemoteWrite,
}

/// A completion of an RDM endpoint.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RdmCompletion {
    /// The application's context.
    pub context: u64,
    /// What completed.
    pub kind: OpKind,
    /// Bytes placed (receives), sent (sends) or fetched (atomics).
    pub len: usize,
    /// The message's tag (tagged receives; the tag sent, for tagged sends).
    pub tag: u64,
    /// Remote CQ data, when the sender attached some.
    pub data: Option<u64>,
    /// The sender (receives), as its handle in the endpoint's address vector
    /// (`FI_SOURCE`); `None` when the sender's name is not in it.
    pub src: Option<FiAddr>,
    /// `Err` for an error completion.
    pub status: std::result::Result<(), CqError>,
}

/// What [`RdmEndpoint::tpeek`] does with a matching message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeekMode {
    /// Reports it and leaves it queued (`FI_PEEK`).
    Peek,
    /// Reports it and reserves it for [`RdmEndpoint::trecv_claimed`] (`FI_PEEK |
    /// FI_CLAIM`): no other receive matches it.
    Claim,
    /// Reports it and drops it (`FI_PEEK | FI_DISCARD`).
    Discard,
}

/// A message reserved by [`PeekMode::Claim`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Claim(u64);

/// What [`RdmEndpoint::tpeek`] found.
#[derive(Debug)]
#[non_exhaustive]
pub struct Peeked {
    /// The message's length.
    pub len: usize,
    /// Its tag.
    pub tag: u64,
    /// Its remote CQ data.
    pub data: Option<u64>,
    /// Its sender.
    pub src: Option<FiAddr>,
    /// The reservation, with [`PeekMode::Claim`].
    pub claim: Option<Claim>,
}

// ---------------------------------------------------------------------------------
// State

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CState {
    /// Our connect is under way.
    Connecting,
    /// Our connect was rejected by a peer with a smaller name: its own request is
    /// on the way; the backlog waits for it.
    Waiting,
    /// We accepted the peer's request; waiting for `Connected`.
    Accepting,
    Connected,
    /// Idle: we asked the peer to close (`CloseReq`) and send nothing until it answers.
    CloseAsked,
    /// The peer asked to close and we agreed (`CloseAck`): we send nothing and wait for
    /// its shutdown (or a `CloseNack`).
    CloseAgreed,
    /// Ended; kept only while unexpected messages still sit in its buffers.
    Closed,
}

enum RmaKind {
    Write {
        mr: MemoryRegion,
        offset: usize,
    },
    Read {
        mr: MemoryRegion,
        offset: usize,
    },
    /// An atomic the MSG endpoint executes natively (see [`crate::atomic`]).
    Atomic {
        op: AtomicOp,
        dt: Datatype,
        form: AtomicForm,
        /// Host order (the native path runs on little-endian hosts only).
        operand: Vec<u8>,
        compare: Vec<u8>,
        result: Option<(MemoryRegion, usize)>,
    },
}

/// A completion to generate when an operation finishes.
#[derive(Debug, Clone, Copy)]
struct Done {
    context: u64,
    kind: OpKind,
    len: usize,
    tag: u64,
    cntr: CntrEvents,
}

struct Out {
    hdr: Header,
    payload: Vec<u8>,
    done: Option<Done>,
    /// An RMA operation of the application instead of a message.
    rma: Option<Rma>,
}

/// An application RMA write or read, or a native atomic, on a peer, posted on the
/// connection's MSG endpoint as is.
struct Rma {
    kind: RmaKind,
    remote: RemoteIov,
    /// Remote CQ data (`writedata_to`): announced by a `WriteData` message once the
    /// write has completed.
    data: Option<u64>,
}

struct Conn {
    ep: fabric_core::Endpoint,
    peer: Peer,
    /// The peer's handle in the address vector, as of AV generation `src_gen`.
    src: Option<FiAddr>,
    src_gen: u64,
    state: CState,
    since: Instant,
    /// When the connection was last seen in use: set by housekeeping when
    /// `activity` moved since its previous look (so the data path reads no clock; an
    /// idle connection is noticed at most one housekeeping interval late).
    last_used: Instant,
    /// Messages sent or received (wrapping).
    activity: u64,
    /// `activity` at housekeeping's previous look.
    seen_activity: u64,
    rx: MemoryRegion,
    tx: MemoryRegion,
    slot: usize,
    tx_free: Vec<u32>,
    tx_done: Vec<Option<Done>>,
    credits: usize,
    unannounced: usize,
    backlog: VecDeque<Out>,
    /// Receive buffers held by unexpected messages.
    held: usize,
    /// Operations of ours waiting on the peer (rendezvous finish, atomic response).
    waiting: usize,
    /// A send or credit update could not be posted (provider queue full): retry.
    retry: bool,
}

/// One range of a posted receive.
#[derive(Clone)]
struct Seg {
    mr: MemoryRegion,
    offset: usize,
    len: usize,
}

/// A receive's ranges.
type Segs = smallvec::SmallVec<[Seg; 2]>;

struct Posted {
    /// Inline for up to two ranges (no allocation per posted receive).
    segs: Segs,
    /// Bytes of all segments.
    len: usize,
    context: u64,
    src: Option<Peer>,
    tag: u64,
    ignore: u64,
    tagged: bool,
}

/// A peer's endpoint name, shared by the records that name it.
type Peer = Arc<[u8]>;

struct Unexpected {
    conn: u32,
    slot: u32,
    hdr: Header,
    peer: Peer,
}

struct RndvTx {
    conn: u32,
    _mrs: Vec<MemoryRegion>,
    done: Done,
}

struct RndvRx {
    conn: u32,
    recv: Posted,
    hdr: Header,
    peer: Peer,
    len: usize,
    truncated: bool,
}

struct AtomicTx {
    conn: u32,
    result: Option<(MemoryRegion, usize)>,
    done: Done,
}

/// Hashes the connection ids this endpoint assigns itself (dense small integers, not
/// chosen by peers, so no flooding defence is needed): one multiplication instead of
/// SipHash on every message's connection lookup.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Default)]
struct State {
    conns: HashMap<u32, Conn, BuildHasherDefault<IdHasher>>,
    /// Receive buffers of delivered eager messages, given back to the provider at the
    /// start of the next progress round ([`defer_repost`]).
    reposts: Vec<(u32, u32)>,
    by_peer: HashMap<Vec<u8>, u32>,
    /// Bumped whenever `by_peer` changes (validates `route`).
    peer_gen: u64,
    /// The sends' shortcut from an address-vector index to its connection, as of
    /// (AV generation, `peer_gen`): a send to a known peer skips the name lookup, its
    /// copy and hashing.
    route: Vec<(u64, u64, u32)>,
    by_fid: HashMap<Fid, u32>,
    next_conn: u32,
    posted_msg: VecDeque<Posted>,
    posted_tag: VecDeque<Posted>,
    unexp_msg: VecDeque<Unexpected>,
    unexp_tag: VecDeque<Unexpected>,
    claimed: HashMap<u64, Unexpected>,
    /// Connections closed by the idle handshake.
    closed_idle: u64,
    next_claim: u64,
    rndv_tx: HashMap<u64, RndvTx>,
    rndv_rx: HashMap<u64, RndvRx>,
    rma_ops: HashMap<u64, (u32, Done, Option<u64>)>,
    atomics: HashMap<u64, AtomicTx>,
    next_rid: u64,
    completions: VecDeque<RdmCompletion>,
    /// `completions.len()`, readable without the lock (`Inner::ready` is the same).
    ready: Arc<AtomicUsize>,
    atomic_mrs: HashMap<u64, MemoryRegion>,
    cntrs: Vec<(Counter, CntrEvents)>,
}

struct Inner {
    domain: Domain,
    info: Info,
    eq: EventQueue,
    cq: CompletionQueue,
    pep: PassiveEndpoint,
    name: Vec<u8>,
    av: AddressVector,
    attr: RdmAttr,
    st: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
    /// Serializes progress rounds (reading and handling underlying completions); holds
    /// the round's completion buffer.
    progress: Mutex<Vec<Completion>>,
    /// Calls of application threads into read, wait or peek ([`touch`]): a counter, not
    /// a time, so a busy poller reads no clock; the progress thread notes when it
    /// changes.
    app_calls: AtomicU64,
    /// How long the progress thread stays away after an application call
    /// ([`app_active`]).
    app_active: Duration,
    /// The timer the progress thread sleeps on while the application polls, which the
    /// application keeps postponing ([`touch`]).
    watchdog: Watchdog,
    epoch: Instant,
    /// When progress last read the event queue ([`stamp`]).
    last_eq: AtomicU64,
    /// Some connection forms or closes ([`refresh_cm_busy`]).
    cm_busy: AtomicBool,
    /// How many completions wait in `State::completions` (kept by the holder of the
    /// state lock), so a poller with nothing to collect takes no lock.
    ready: Arc<AtomicUsize>,
    /// `State::reposts` is not empty.
    reposts_pending: AtomicBool,
    /// Peers' atomics executed by this layer ([`RdmEndpoint::atomics_executed`]).
    atomics_executed: AtomicU64,
}

// Context of an operation on an underlying endpoint: kind (8 bits), connection (24),
// slot or request (32).
const K_RX: u64 = 1;
const K_TX: u64 = 2;
const K_READ: u64 = 3;
const K_RMA: u64 = 4;

fn ctx(kind: u64, conn: u32, slot: u32) -> u64 {
    (kind << 56) | ((conn as u64 & 0xff_ffff) << 32) | slot as u64
}

fn unctx(c: u64) -> (u64, u32, u32) {
    ((c >> 56) & 0x7f, ((c >> 32) & 0xff_ffff) as u32, c as u32)
}

fn cq_err(kind: CqErrorKind, detail: impl Into<String>) -> CqError {
    CqError::new(kind, 0, detail)
}

fn status_err(st: u16, what: &str) -> std::result::Result<(), CqError> {
    match st {
        ST_OK => Ok(()),
        ST_ACCESS => Err(cq_err(
            CqErrorKind::RemoteAccess,
            format!("{what}: the target refused the access (key, bounds or rights)"),
        )),
        ST_INVALID => Err(cq_err(
            CqErrorKind::RemoteInvalid,
            format!("{what}: the target found the request invalid"),
        )),
        ST_TRUNCATED => Err(cq_err(
            CqErrorKind::Truncated,
            format!("{what}: the receive buffer was smaller than the message"),
        )),
        _ => Err(cq_err(
            CqErrorKind::RemoteOperation,
            format!("{what}: the target failed the operation"),
        )),
    }
}

fn check_iov(iov: &LocalIov<'_>, need: Access, domain: &Domain, what: &str) -> Result<()> {
    if iov
        .offset
        .checked_add(iov.len)
        .is_none_or(|e| e > iov.mr.len())
    {
        return Err(Error::invalid(format!(
            "{what}: {}+{} is outside its region of {} bytes",
            iov.offset,
            iov.len,
            iov.mr.len()
        )));
    }
    if !iov.mr.access().contains(need) {
        return Err(Error::new(
            ErrorKind::AccessDenied,
            format!("{what}: the region lacks {need:?} access"),
        ));
    }
    if !iov.mr.domain().same_as(domain) {
        return Err(Error::invalid(format!(
            "{what}: the region belongs to another domain"
        )));
    }
    Ok(())
}

impl State {
    fn complete(&mut self, c: RdmCompletion, cntr: CntrEvents) {
        for (counter, ev) in &self.cntrs {
            if ev.intersects(cntr) {
                if c.status.is_ok() {
                    counter.add(1);
                } else {
                    counter.add_err(1);
                }
            }
        }
        self.completions.push_back(c);
        self.ready.store(self.completions.len(), Ordering::Release);
    }

    fn finish(&mut self, d: Done, status: std::result::Result<(), CqError>) {
        self.complete(
            RdmCompletion {
                context: d.context,
                kind: d.kind,
                len: if status.is_ok() { d.len } else { 0 },
                tag: d.tag,
                data: None,
                src: None,
                status,
            },
            d.cntr,
        );
    }
}

/// A reliable unconnected endpoint over a MSG provider. Dropping it closes its
/// connections and stops its progress thread.
pub struct RdmEndpoint {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RdmEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmEndpoint")
            .field("name", &decode_name(&self.inner.name).ok())
            .finish()
    }
}

impl Drop for RdmEndpoint {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.watchdog.fire(stamp(&self.inner));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut st = self.inner.st.lock();
        for (_, c) in st.conns.drain() {
            let _ = c.ep.shutdown();
        }
    }
}

impl RdmEndpoint {
    /// Opens an RDM endpoint on `domain` (opened from `info.msg()`), bound to `av`:
    /// it listens on the answer's source address (give `node` with `source(true)` and
    /// a concrete IP, port 0 for any) and starts its progress thread.
    pub fn open(
        domain: &Domain,
        info: &RdmInfo,
        av: &AddressVector,
        attr: RdmAttr,
    ) -> Result<RdmEndpoint> {
        if !av.domain().same_as(domain) {
            return Err(Error::invalid(
                "rdm: the address vector belongs to another domain",
            ));
        }
        if attr.rx_buffers < 2 || attr.tx_buffers < 1 || attr.eager_limit == 0 {
            return Err(Error::invalid(
                "rdm: need at least 2 receive buffers, 1 send buffer and an eager limit",
            ));
        }
        let msg = info.msg().clone();
        let fabric = domain.fabric();
        let eq = fabric.eq(EqAttr::default())?;
        let cq = domain.cq(CqAttr::default())?;
        let pep = fabric.passive_endpoint(&msg, &eq)?;
        pep.listen()?;
        let name = encode_name(&pep.local_addr()?)?;
        let st = State::default();
        let ready = st.ready.clone();
        let inner = Arc::new(Inner {
            domain: domain.clone(),
            info: msg,
            eq,
            cq,
            pep,
            name,
            av: av.clone(),
            attr,
            st: Mutex::new(st),
            ready,
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            progress: Mutex::new(Vec::with_capacity(64)),
            app_calls: AtomicU64::new(0),
            app_active: app_active(attr.idle_timeout),
            watchdog: Watchdog::new(),
            epoch: Instant::now(),
            last_eq: AtomicU64::new(0),
            cm_busy: AtomicBool::new(false),
            reposts_pending: AtomicBool::new(false),
            atomics_executed: AtomicU64::new(0),
        });
        let i2 = inner.clone();
        let thread = std::thread::Builder::new()
            .name("fabric-rdm".into())
            .spawn(move || progress_loop(&i2))
            .map_err(|e| {
                Error::new(ErrorKind::Io, "rdm: cannot start the progress thread").with_source(e)
            })?;
        Ok(RdmEndpoint {
            inner,
            thread: Some(thread),
        })
    }

    /// This endpoint's name, for peers' address vectors (`fi_getname`).
    pub fn name(&self) -> Vec<u8> {
        self.inner.name.clone()
    }

    /// The address vector.
    pub fn av(&self) -> &AddressVector {
        &self.inner.av
    }

    /// Connections open now (formed or forming).
    pub fn connections(&self) -> usize {
        let st = self.inner.st.lock();
        st.conns
            .values()
            .filter(|c| c.state != CState::Closed)
            .count()
    }

    /// Connections closed so far by the idle handshake (both sides agreed: see the
    /// module docs).
    pub fn idle_closes(&self) -> u64 {
        self.inner.st.lock().closed_idle
    }

    /// Peers' atomics this endpoint's layer has executed (the emulated path, see
    /// [`crate::atomic`]); atomics a provider executed natively are not counted. A
    /// diagnostic: tells which path a workload took.
    pub fn atomics_executed(&self) -> u64 {
        self.inner.atomics_executed.load(Ordering::Relaxed)
    }

    /// Counts completions of the classes in `events` on `cntr` (`fi_ep_bind` of a
    /// counter).
    pub fn bind_cntr(&self, cntr: &Counter, events: CntrEvents) {
        self.inner.st.lock().cntrs.push((cntr.clone(), events));
    }

    /// Makes a region a target of peers' atomics through this endpoint (libfabric's
    /// `fi_mr_bind` to an endpoint, `FI_MR_ENDPOINT`): the layer executes atomics
    /// itself and sees only regions it is given. Requests are checked against the
    /// region's key, bounds and `REMOTE_READ`/`REMOTE_WRITE` rights.
    pub fn bind_mr(&self, mr: &MemoryRegion) -> Result<()> {
        if !mr.domain().same_as(&self.inner.domain) {
            return Err(Error::invalid(
                "bind_mr: the region belongs to another domain",
            ));
        }
        self.inner.st.lock().atomic_mrs.insert(mr.key(), mr.clone());
        Ok(())
    }

    // ---- sends ----

    /// Sends a message to `dest` (`fi_send`).
    pub fn send_to(&self, iov: LocalIov<'_>, dest: FiAddr, context: u64) -> Result<()> {
        self.send_inner(&[iov], dest, None, None, context, false)
    }
    /// Sends a message gathered from several ranges (`fi_sendv`): at most
    /// [`IOV_LIMIT`] ranges; above the eager limit, at most the MSG provider's
    /// `rma_iov_limit` (the receiver reads them as remote ranges).
    pub fn sendv_to(&self, iov: &[LocalIov<'_>], dest: FiAddr, context: u64) -> Result<()> {
        self.send_inner(iov, dest, None, None, context, false)
    }
    /// Sends with remote CQ data (`fi_senddata`).
    pub fn senddata_to(
        &self,
        iov: LocalIov<'_>,
        data: u64,
        dest: FiAddr,
        context: u64,
    ) -> Result<()> {
        self.send_inner(&[iov], dest, None, Some(data), context, false)
    }
    /// Sends a small message copied at the call, with no completion (`fi_inject`).
    pub fn inject_to(&self, iov: LocalIov<'_>, dest: FiAddr) -> Result<()> {
        self.send_inner(&[iov], dest, None, None, 0, true)
    }
    /// Sends a tagged message (`fi_tsend`).
    pub fn tsend(&self, iov: LocalIov<'_>, dest: FiAddr, tag: u64, context: u64) -> Result<()> {
        self.send_inner(&[iov], dest, Some(tag), None, context, false)
    }
    /// Sends a tagged message gathered from several ranges (`fi_tsendv`; limits as
    /// [`sendv_to`](Self::sendv_to)).
    pub fn tsendv(&self, iov: &[LocalIov<'_>], dest: FiAddr, tag: u64, context: u64) -> Result<()> {
        self.send_inner(iov, dest, Some(tag), None, context, false)
    }
    /// Sends a tagged message with remote CQ data (`fi_tsenddata`).
    pub fn tsenddata(
        &self,
        iov: LocalIov<'_>,
        data: u64,
        dest: FiAddr,
        tag: u64,
        context: u64,
    ) -> Result<()> {
        self.send_inner(&[iov], dest, Some(tag), Some(data), context, false)
    }
    /// Sends a small tagged message copied at the call, with no completion
    /// (`fi_tinject`).
    pub fn tinject(&self, iov: LocalIov<'_>, dest: FiAddr, tag: u64) -> Result<()> {
        self.send_inner(&[iov], dest, Some(tag), None, 0, true)
    }

    fn peer_of(&self, a: FiAddr, what: &str) -> Result<Vec<u8>> {
        self.inner
            .av
            .lookup(a)
            .ok_or_else(|| Error::invalid(format!("{what}: {a} is not in the address vector")))
    }

    fn send_inner(
        &self,
        iov: &[LocalIov<'_>],
        dest: FiAddr,
        tag: Option<u64>,
        data: Option<u64>,
        context: u64,
        inject: bool,
    ) -> Result<()> {
        let what = if tag.is_some() { "tsend" } else { "send" };
        let inner = &*self.inner;
        if iov.is_empty() || iov.len() > IOV_LIMIT {
            return Err(Error::invalid(format!(
                "{what}: {} ranges (1 to {IOV_LIMIT} allowed)",
                iov.len()
            )));
        }
        let mut len = 0usize;
        for v in iov {
            check_iov(v, Access::SEND, &inner.domain, what)?;
            len += v.len;
        }
        if len > inner.info.limits.max_msg_size {
            return Err(Error::invalid(format!(
                "{what}: {len} bytes exceed max_msg_size {}",
                inner.info.limits.max_msg_size
            )));
        }
        let eager = len <= inner.attr.eager_limit;
        if inject && !eager {
            return Err(Error::invalid(format!(
                "{what}: an inject of {len} bytes exceeds the eager limit {}",
                inner.attr.eager_limit
            )));
        }
        if !eager {
            if iov
                .iter()
                .any(|v| !v.mr.access().contains(Access::REMOTE_READ))
            {
                return Err(Error::new(
                    ErrorKind::AccessDenied,
                    format!(
                        "{what}: a message above the eager limit ({} bytes) goes by \
                         rendezvous, which needs its regions registered with REMOTE_READ",
                        inner.attr.eager_limit
                    ),
                ));
            }
            if iov.len() > inner.info.limits.rma_iov_limit {
                return Err(Error::invalid(format!(
                    "{what}: a rendezvous message may have at most {} ranges (the \
                     provider's rma_iov_limit), not {}",
                    inner.info.limits.rma_iov_limit,
                    iov.len()
                )));
            }
        }
        let mut hdr = Header::new(if eager { Op::Eager } else { Op::Rts });
        hdr.len = len as u64;
        if let Some(t) = tag {
            hdr.flags |= F_TAGGED;
            hdr.tag = t;
        }
        if let Some(d) = data {
            hdr.flags |= F_DATA;
            hdr.data = d;
        }
        let done = Done {
            context,
            kind: if tag.is_some() {
                OpKind::TaggedSend
            } else {
                OpKind::Send
            },
            len,
            tag: tag.unwrap_or(0),
            cntr: CntrEvents::SEND,
        };
        let av_gen = inner.av.generation();
        let mut st = inner.st.lock();
        let i = dest.index() as usize;
        let c = match st.route.get(i) {
            Some(&(g, pg, c)) if g == av_gen && pg == st.peer_gen => c,
            _ => {
                drop(st);
                let peer = self.peer_of(dest, what)?;
                st = inner.st.lock();
                let c = conn_for(inner, &mut st, &peer)?;
                if i < ROUTE_MAX {
                    if st.route.len() <= i {
                        st.route.resize(i + 1, (u64::MAX, 0, 0));
                    }
                    let pg = st.peer_gen;
                    st.route[i] = (av_gen, pg, c);
                }
                c
            }
        };
        room(inner, &st, c, what)?;
        let done = (!inject).then_some(done);
        if eager {
            // The usual case: nothing queued, a credit and a send buffer free. The
            // payload goes straight from the application's ranges into the send
            // buffer, with no allocation.
            if send_now(&mut st, c, &mut hdr, iov, done) {
                return Ok(());
            }
            let payload = gather(iov)?;
            enqueue(
                inner,
                &mut st,
                c,
                Out {
                    hdr,
                    payload,
                    done,
                    rma: None,
                },
            );
        } else {
            let rid = st_next_rid(&mut st.next_rid);
            hdr.rid = rid;
            hdr.raddr = iov.len() as u64;
            // The ranges to read, as (address, length, key) triples.
            let mut payload = Vec::with_capacity(RNDV_ENTRY * iov.len());
            for v in iov {
                payload.extend_from_slice(
                    &v.mr
                        .remote()
                        .addr
                        .wrapping_add(v.offset as u64)
                        .to_le_bytes(),
                );
                payload.extend_from_slice(&(v.len as u64).to_le_bytes());
                payload.extend_from_slice(&v.mr.key().to_le_bytes());
            }
            st.rndv_tx.insert(
                rid,
                RndvTx {
                    conn: c,
                    _mrs: iov.iter().map(|v| v.mr.clone()).collect(),
                    done: done.expect("a rendezvous send is no inject"),
                },
            );
            enqueue_awaited(inner, &mut st, c, hdr, payload);
        }
        Ok(())
    }

    // ---- receives ----

    /// Posts a receive for a message from anyone (`fi_recv`).
    pub fn recv(&self, iov: LocalIov<'_>, context: u64) -> Result<()> {
        self.recv_inner(&[iov], None, None, context)
    }
    /// Posts a receive scattering into several ranges (`fi_recvv`), from `src` only
    /// when given: at most [`IOV_LIMIT`] ranges and the MSG provider's `iov_limit`.
    pub fn recvv(&self, iov: &[LocalIov<'_>], src: Option<FiAddr>, context: u64) -> Result<()> {
        self.recv_inner(iov, src, None, context)
    }
    /// Posts a receive for a message from `src` only (`FI_DIRECTED_RECV`).
    pub fn recv_from(&self, iov: LocalIov<'_>, src: FiAddr, context: u64) -> Result<()> {
        self.recv_inner(&[iov], Some(src), None, context)
    }
    /// Posts a tagged receive: it matches a message whose tag equals `tag` in every
    /// bit not set in `ignore`, from `src` (or anyone), in posting order
    /// (`fi_trecv`).
    pub fn trecv(
        &self,
        iov: LocalIov<'_>,
        src: Option<FiAddr>,
        tag: u64,
        ignore: u64,
        context: u64,
    ) -> Result<()> {
        self.recv_inner(&[iov], src, Some((tag, ignore)), context)
    }
    /// A tagged receive scattering into several ranges (`fi_trecvv`; limits as
    /// [`recvv`](Self::recvv)).
    pub fn trecvv(
        &self,
        iov: &[LocalIov<'_>],
        src: Option<FiAddr>,
        tag: u64,
        ignore: u64,
        context: u64,
    ) -> Result<()> {
        self.recv_inner(iov, src, Some((tag, ignore)), context)
    }

    fn recv_inner(
        &self,
        iov: &[LocalIov<'_>],
        src: Option<FiAddr>,
        tag: Option<(u64, u64)>,
        context: u64,
    ) -> Result<()> {
        let what = if tag.is_some() { "trecv" } else { "recv" };
        let segs = recv_segs(&self.inner, iov, what)?;
        let src = src
            .map(|a| self.peer_of(a, what).map(Peer::from))
            .transpose()?;
        let (t, ig) = tag.unwrap_or((0, 0));
        let p = Posted {
            len: segs.iter().map(|s| s.len).sum(),
            segs,
            context,
            src,
            tag: t,
            ignore: ig,
            tagged: tag.is_some(),
        };
        let inner = &*self.inner;
        let mut st = inner.st.lock();
        let q = if p.tagged {
            &mut st.unexp_tag
        } else {
            &mut st.unexp_msg
        };
        if let Some(i) = q.iter().position(|u| matches(&p, u)) {
            let u = q.remove(i).expect("index from position");
            deliver(inner, &mut st, p, u);
            drop(st);
            inner.cv.notify_all();
            return Ok(());
        }
        if st.posted_msg.len() + st.posted_tag.len() >= inner.attr.max_posted {
            return Err(Error::new(
                ErrorKind::WouldBlock,
                format!("{what}: {} receives already posted", inner.attr.max_posted),
            ));
        }
        if p.tagged {
            st.posted_tag.push_back(p);
        } else {
            st.posted_msg.push_back(p);
        }
        Ok(())
    }

    /// Looks for a queued (unexpected) tagged message matching `src`/`tag`/`ignore`
    /// without posting a buffer (`FI_PEEK`, with `FI_CLAIM` or `FI_DISCARD` per
    /// `mode`); `None` when there is none (libfabric's `FI_ENOMSG`). The answer is
    /// returned here rather than through the completion queue.
    pub fn tpeek(
        &self,
        src: Option<FiAddr>,
        tag: u64,
        ignore: u64,
        mode: PeekMode,
    ) -> Result<Option<Peeked>> {
        let src = src.map(|a| self.peer_of(a, "tpeek")).transpose()?;
        let inner = &*self.inner;
        // As fi_trecvmsg(FI_PEEK) does: make progress before looking, so that a caller
        // polling with peek sees messages arrive without another thread's help. A
        // message still on the wire is not found (None, libfabric's FI_ENOMSG): peek
        // again.
        let now = touch(inner);
        if let Some(mut batch) = inner.progress.try_lock() {
            progress_once(inner, &mut batch, Duration::ZERO, now);
        }
        let mut st = inner.st.lock();
        let Some(i) = st
            .unexp_tag
            .iter()
            .position(|u| matches_spec(src.as_deref(), true, tag, ignore, &u.peer, u.hdr.tag))
        else {
            return Ok(None);
        };
        let (conn, peer) = (st.unexp_tag[i].conn, st.unexp_tag[i].peer.clone());
        let src = src_of(inner, &mut st, conn, &peer);
        let u = &st.unexp_tag[i];
        let mut out = Peeked {
            len: u.hdr.len as usize,
            tag: u.hdr.tag,
            data: (u.hdr.flags & F_DATA != 0).then_some(u.hdr.data),
            src,
            claim: None,
        };
        match mode {
            PeekMode::Peek => {}
            PeekMode::Claim => {
                let u = st.unexp_tag.remove(i).expect("index from position");
                let id = st.next_claim;
                st.next_claim += 1;
                st.claimed.insert(id, u);
                out.claim = Some(Claim(id));
            }
            PeekMode::Discard => {
                let u = st.unexp_tag.remove(i).expect("index from position");
                drop_unexpected(inner, &mut st, u);
            }
        }
        Ok(Some(out))
    }

    /// Receives a message reserved by [`PeekMode::Claim`] (`fi_trecvmsg` with
    /// `FI_CLAIM`).
    pub fn trecv_claimed(&self, iov: LocalIov<'_>, claim: Claim, context: u64) -> Result<()> {
        let segs = recv_segs(&self.inner, &[iov], "trecv_claimed")?;
        let inner = &*self.inner;
        let mut st = inner.st.lock();
        let u = st
            .claimed
            .remove(&claim.0)
            .ok_or_else(|| Error::invalid("trecv_claimed: unknown claim"))?;
        let p = Posted {
            len: segs.iter().map(|s| s.len).sum(),
            segs,
            context,
            src: None,
            tag: u.hdr.tag,
            ignore: 0,
            tagged: true,
        };
        deliver(inner, &mut st, p, u);
        drop(st);
        inner.cv.notify_all();
        Ok(())
    }

    /// Drops a message reserved by [`PeekMode::Claim`] (`FI_CLAIM | FI_DISCARD`).
    pub fn discard_claimed(&self, claim: Claim) -> Result<()> {
        let inner = &*self.inner;
        let mut st = inner.st.lock();
        let u = st
            .claimed
            .remove(&claim.0)
            .ok_or_else(|| Error::invalid("discard_claimed: unknown claim"))?;
        drop_unexpected(inner, &mut st, u);
        Ok(())
    }

    // ---- atomics ----

    /// A non-fetching atomic: applies `op` with `operand` (`count` elements of `dt`,
    /// little-endian, copied at the call) to the peer's range (`fi_atomic`). Posted
    /// natively on the connection's MSG endpoint when its provider executes it, else
    /// executed by the target's layer (see [`crate::atomic`]).
    pub fn atomic(
        &self,
        op: AtomicOp,
        dt: Datatype,
        operand: &[u8],
        dest: FiAddr,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        self.atomic_inner(
            op,
            dt,
            AtomicForm::Plain,
            operand,
            &[],
            None,
            dest,
            remote,
            context,
        )
    }

    /// A fetching atomic: as [`atomic`](Self::atomic), and the target's old values
    /// land in `result` (`fi_fetch_atomic`; `Sum` is fetch-and-add, `Write` swap).
    #[allow(clippy::too_many_arguments)]
    pub fn fetch_atomic(
        &self,
        op: AtomicOp,
        dt: Datatype,
        operand: &[u8],
        result: LocalIov<'_>,
        dest: FiAddr,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        self.atomic_inner(
            op,
            dt,
            AtomicForm::Fetch,
            operand,
            &[],
            Some(result),
            dest,
            remote,
            context,
        )
    }

    /// Compare-and-swap: where the target equals `compare`, it becomes `operand`; the
    /// old values land in `result` (`fi_compare_atomic` with `FI_CSWAP`).
    #[allow(clippy::too_many_arguments)]
    pub fn compare_atomic(
        &self,
        dt: Datatype,
        operand: &[u8],
        compare: &[u8],
        result: LocalIov<'_>,
        dest: FiAddr,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        self.atomic_inner(
            AtomicOp::Cswap,
            dt,
            AtomicForm::Compare,
            operand,
            compare,
            Some(result),
            dest,
            remote,
            context,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn atomic_inner(
        &self,
        op: AtomicOp,
        dt: Datatype,
        form: AtomicForm,
        operand: &[u8],
        compare: &[u8],
        result: Option<LocalIov<'_>>,
        dest: FiAddr,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        let max = atomic_valid(op, dt, form).ok_or_else(|| {
            Error::unsupported(format!(
                "atomic: {op:?} on {dt:?} is not supported as {form:?}"
            ))
        })?;
        let size = dt.size();
        if operand.is_empty() || !operand.len().is_multiple_of(size) || operand.len() / size > max {
            return Err(Error::invalid(format!(
                "atomic: the operand must be 1 to {max} elements of {size} bytes, not {} bytes",
                operand.len()
            )));
        }
        let count = operand.len() / size;
        if form == AtomicForm::Compare && compare.len() != operand.len() {
            return Err(Error::invalid(
                "atomic: compare and operand differ in length",
            ));
        }
        if remote.len != operand.len() {
            return Err(Error::invalid(format!(
                "atomic: the remote range has {} bytes, the operand {}",
                remote.len,
                operand.len()
            )));
        }
        if let Some(r) = &result {
            check_iov(r, Access::READ, &self.inner.domain, "fetch_atomic result")?;
            if r.len != operand.len() {
                return Err(Error::invalid(
                    "atomic: the result buffer differs from the operand in length",
                ));
            }
        }
        let peer = self.peer_of(dest, "atomic")?;
        let mut hdr = Header::new(Op::AtomicReq);
        hdr.tag = op.code() as u64
            | (dt.code() as u64) << 8
            | (count as u64) << 16
            | (match form {
                AtomicForm::Plain => 0u64,
                AtomicForm::Fetch => 1,
                AtomicForm::Compare => 2,
            }) << 48;
        hdr.raddr = remote.addr;
        hdr.rkey = remote.key;
        let mut payload = operand.to_vec();
        payload.extend_from_slice(compare);
        hdr.len = payload.len() as u64;
        let done = Done {
            context,
            kind: OpKind::Atomic,
            len: if result.is_some() { operand.len() } else { 0 },
            tag: 0,
            cntr: if result.is_some() {
                CntrEvents::READ
            } else {
                CntrEvents::WRITE
            },
        };
        let inner = &*self.inner;
        let mut st = inner.st.lock();
        let c = conn_for(inner, &mut st, &peer)?;
        room(inner, &st, c, "atomic")?;
        if native_fits(&st.conns[&c].ep, op, dt, form, count, remote.addr) {
            enqueue_rma(
                inner,
                &mut st,
                c,
                done,
                Rma {
                    kind: RmaKind::Atomic {
                        op,
                        dt,
                        form,
                        operand: operand.to_vec(),
                        compare: compare.to_vec(),
                        result: result.map(|r| (r.mr.clone(), r.offset)),
                    },
                    remote,
                    data: None,
                },
            );
            return Ok(());
        }
        let rid = st_next_rid(&mut st.next_rid);
        hdr.rid = rid;
        st.atomics.insert(
            rid,
            AtomicTx {
                conn: c,
                result: result.map(|r| (r.mr.clone(), r.offset)),
                done,
            },
        );
        enqueue_awaited(inner, &mut st, c, hdr, payload);
        Ok(())
    }

    // ---- RMA ----

    /// Writes a local range into a peer's region (`fi_write` to an `fi_addr_t`),
    /// over the connection to `dest`. As for any RMA in this library, a refused remote
    /// access ends the connection: the write completes `RemoteAccess`, and other
    /// operations then in flight to that peer complete in error; operations posted
    /// after that completion was read go over a new connection.
    pub fn write_to(
        &self,
        iov: LocalIov<'_>,
        dest: FiAddr,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        self.rma_inner(true, iov, dest, remote, None, context)
    }

    /// Writes a local range into a peer's region and delivers `data` to the peer: its
    /// endpoint reports an [`OpKind::RemoteWrite`] completion with `data`, the length
    /// and the writer's address (`fi_writedata` to an `fi_addr_t`; libfabric's
    /// `FI_REMOTE_CQ_DATA`). The layer announces the data in a message sent once the
    /// write has completed (been placed at the target), so the target's completion
    /// always follows the data, on any provider; this write's completion follows the
    /// announcement's. The target consumes no posted receive for it.
    pub fn writedata_to(
        &self,
        iov: LocalIov<'_>,
        data: u64,
        dest: FiAddr,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        self.rma_inner(true, iov, dest, remote, Some(data), context)
    }

    /// Reads a peer's range into a local range (`fi_read` from an `fi_addr_t`).
    pub fn read_to(
        &self,
        iov: LocalIov<'_>,
        dest: FiAddr,
        remote: RemoteIov,
        context: u64,
    ) -> Result<()> {
        self.rma_inner(false, iov, dest, remote, None, context)
    }

    fn rma_inner(
        &self,
        write: bool,
        iov: LocalIov<'_>,
        dest: FiAddr,
        remote: RemoteIov,
        data: Option<u64>,
        context: u64,
    ) -> Result<()> {
        let what = match (write, data) {
            (true, None) => "write_to",
            (true, Some(_)) => "writedata_to",
            _ => "read_to",
        };
        let need = if write { Access::WRITE } else { Access::READ };
        check_iov(&iov, need, &self.inner.domain, what)?;
        if remote.len != iov.len {
            return Err(Error::invalid(format!(
                "{what}: {} local bytes but {} remote",
                iov.len, remote.len
            )));
        }
        let peer = self.peer_of(dest, what)?;
        let inner = &*self.inner;
        let mut st = inner.st.lock();
        let c = conn_for(inner, &mut st, &peer)?;
        room(inner, &st, c, what)?;
        enqueue_rma(
            inner,
            &mut st,
            c,
            Done {
                context,
                kind: if write { OpKind::Write } else { OpKind::Read },
                len: iov.len,
                tag: 0,
                cntr: if write {
                    CntrEvents::WRITE
                } else {
                    CntrEvents::READ
                },
            },
            Rma {
                kind: if write {
                    RmaKind::Write {
                        mr: iov.mr.clone(),
                        offset: iov.offset,
                    }
                } else {
                    RmaKind::Read {
                        mr: iov.mr.clone(),
                        offset: iov.offset,
                    }
                },
                remote,
                data,
            },
        );
        Ok(())
    }

    // ---- completions ----

    /// Moves up to `max` completions into `out` without blocking; returns how many.
    pub fn read(&self, out: &mut Vec<RdmCompletion>, max: usize) -> usize {
        self.collect(&mut |q: &mut VecDeque<RdmCompletion>| {
            let n = max.min(q.len());
            out.extend(q.drain(..n));
            n
        })
    }

    /// The next completion if there is one, without blocking (no allocation: the
    /// busy poller's call, as [`CompletionQueue::poll_wait`] polls for MSG endpoints).
    pub fn read_one(&self) -> Option<RdmCompletion> {
        let mut one = None;
        self.collect(&mut |q: &mut VecDeque<RdmCompletion>| {
            one = q.pop_front();
            usize::from(one.is_some())
        });
        one
    }

    /// Busy-polls [`read_one`](Self::read_one) for up to `timeout` (the clock read
    /// every 1,024 empty polls); [`ErrorKind::TimedOut`] if nothing comes.
    pub fn poll_wait(&self, timeout: Duration) -> Result<RdmCompletion> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if let Some(c) = self.read_one() {
                return Ok(c);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("rdm: no completion within {timeout:?}"),
                ));
            }
        }
    }

    /// A non-blocking progress round (if no one else runs one), then `take` applied to
    /// the completions under the state lock (the round's own lock when it completed
    /// something; no lock at all when there is nothing to take). Returns what `take`
    /// says it took.
    fn collect(&self, take: &mut Take<'_>) -> usize {
        let inner = &*self.inner;
        let now = touch(inner);
        if let Some(mut batch) = inner.progress.try_lock() {
            let n = progress_take(inner, &mut batch, Duration::ZERO, now, Some(&mut *take));
            if n > 0 {
                return n;
            }
        }
        // Nothing to hand out (the usual answer to a busy poller): no lock taken.
        if inner.ready.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut st = inner.st.lock();
        let n = take(&mut st.completions);
        inner.ready.store(st.completions.len(), Ordering::Release);
        n
    }

    /// The next completion, waiting up to `timeout`; [`ErrorKind::TimedOut`] if none
    /// comes.
    pub fn wait(&self, timeout: Duration) -> Result<RdmCompletion> {
        let inner = &*self.inner;
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            let stamp_now = touch(inner);
            {
                let mut st = inner.st.lock();
                if let Some(c) = st.completions.pop_front() {
                    inner.ready.store(st.completions.len(), Ordering::Release);
                    return Ok(c);
                }
                if now >= deadline {
                    return Err(Error::new(
                        ErrorKind::TimedOut,
                        format!("rdm: no completion within {timeout:?}"),
                    ));
                }
                if inner.progress.is_locked() {
                    // The thread (or another waiter) is in a progress round: wait for
                    // what it finds. Completions pushed by another application thread
                    // do not signal: look again at least every millisecond.
                    let slice = (deadline - now).min(Duration::from_millis(1));
                    inner.cv.wait_for(&mut st, slice);
                    continue;
                }
            }
            // Drive progress here: no hand-off through the progress thread.
            if let Some(mut batch) = inner.progress.try_lock() {
                let slice = (deadline - now).min(Duration::from_millis(1));
                progress_once(inner, &mut batch, slice, stamp_now);
            }
        }
    }
}

fn matches(p: &Posted, u: &Unexpected) -> bool {
    matches_spec(
        p.src.as_deref(),
        p.tagged,
        p.tag,
        p.ignore,
        &u.peer,
        u.hdr.tag,
    )
}

/// Whether a message from `peer` with tag `msg_tag` matches a receive for `src` (any
/// if None) and, if `tagged`, `tag` under `ignore`.
fn matches_spec(
    src: Option<&[u8]>,
    tagged: bool,
    tag: u64,
    ignore: u64,
    peer: &[u8],
    msg_tag: u64,
) -> bool {
    src.is_none_or(|s| s == peer) && (!tagged || (msg_tag & !ignore) == (tag & !ignore))
}

/// Most ranges of one send or receive (`sendv_to`, `tsendv`, `recvv`, `trecvv`).
pub const IOV_LIMIT: usize = 8;

/// Bytes per range in a rendezvous request: address, length, key.
const RNDV_ENTRY: usize = 24;

/// Checks a receive's ranges and takes hold of them.
fn recv_segs(inner: &Inner, iov: &[LocalIov<'_>], what: &str) -> Result<Segs> {
    let limit = IOV_LIMIT.min(inner.info.limits.iov_limit.max(1));
    if iov.is_empty() || iov.len() > limit {
        return Err(Error::invalid(format!(
            "{what}: {} ranges (1 to {limit} allowed)",
            iov.len()
        )));
    }
    iov.iter()
        .map(|v| {
            check_iov(v, Access::RECV, &inner.domain, what)?;
            Ok(Seg {
                mr: v.mr.clone(),
                offset: v.offset,
                len: v.len,
            })
        })
        .collect()
}

/// The bytes of a send's ranges, for a message that must wait in the backlog.
fn gather(iov: &[LocalIov<'_>]) -> Result<Vec<u8>> {
    let mut v = vec![0u8; iov.iter().map(|x| x.len).sum()];
    let mut at = 0;
    for x in iov {
        x.mr.read_at(x.offset, &mut v[at..at + x.len])?;
        at += x.len;
    }
    Ok(v)
}

/// Copies `n` bytes at `src_off` of `src` into a receive's ranges, in order.
fn scatter(src: &MemoryRegion, src_off: usize, segs: &[Seg], n: usize) -> Result<()> {
    let mut left = n;
    let mut at = src_off;
    for s in segs {
        if left == 0 {
            break;
        }
        let k = s.len.min(left);
        s.mr.copy_from(s.offset, src, at, k)?;
        at += k;
        left -= k;
    }
    Ok(())
}

/// The sender's handle in the address vector, cached per connection until the vector
/// changes.
fn src_of(inner: &Inner, st: &mut State, c: u32, peer: &[u8]) -> Option<FiAddr> {
    let Some(conn) = st.conns.get_mut(&c) else {
        return inner.av.reverse_lookup(peer);
    };
    let gen = inner.av.generation();
    if conn.src_gen != gen {
        conn.src = inner.av.reverse_lookup(&conn.peer);
        conn.src_gen = gen;
    }
    conn.src
}

/// Sends an eager message at once when the connection has nothing queued, a credit
/// and a send buffer: header and payload are written straight into the send buffer.
/// `false` when it cannot (the caller queues the message).
fn send_now(
    st: &mut State,
    c: u32,
    hdr: &mut Header,
    iov: &[LocalIov<'_>],
    done: Option<Done>,
) -> bool {
    let Some(conn) = st.conns.get_mut(&c) else {
        return false;
    };
    if conn.state != CState::Connected
        || !conn.backlog.is_empty()
        || conn.credits == 0
        || conn.tx_free.is_empty()
    {
        return false;
    }
    let slot = conn.tx_free.pop().expect("not empty");
    hdr.credits = conn.unannounced as u32;
    let off = slot_off(conn, slot);
    let mut at = off + HDR;
    let mut len = HDR;
    let mut r = conn.tx.write_at(off, &hdr.to_bytes());
    for v in iov {
        if r.is_err() {
            break;
        }
        r = conn.tx.copy_from(at, v.mr, v.offset, v.len);
        at += v.len;
        len += v.len;
    }
    let r = r.and_then(|_| conn.ep.send(conn.tx.iov(off, len), ctx(K_TX, c, slot)));
    match r {
        Ok(()) => {
            conn.unannounced = 0;
            conn.credits -= 1;
            conn.tx_done[slot as usize] = done;
            conn.activity = conn.activity.wrapping_add(1);
            true
        }
        Err(e) => {
            // Queued instead; flush retries it and ends the connection on errors
            // other than a full provider queue.
            tracing::debug!("rdm: direct send on connection {c}: {e}");
            conn.tx_free.push(slot);
            false
        }
    }
}

fn slot_off(conn: &Conn, slot: u32) -> usize {
    slot as usize * conn.slot
}

/// Checks that the peer's backlog has room.
fn room(inner: &Inner, st: &State, c: u32, what: &str) -> Result<()> {
    let n = st.conns.get(&c).map_or(0, |c| c.backlog.len());
    if n >= inner.attr.backlog {
        return Err(Error::new(
            ErrorKind::WouldBlock,
            format!("{what}: {n} operations already wait for this peer"),
        ));
    }
    Ok(())
}

fn new_conn(
    inner: &Inner,
    st: &mut State,
    ep: fabric_core::Endpoint,
    peer: &[u8],
    state: CState,
) -> Result<u32> {
    let a = &inner.attr;
    let slot = HDR + a.eager_limit;
    let rx_n = a.rx_buffers + EXTRA_RX;
    let rx = inner.domain.alloc(slot * rx_n, Access::LOCAL)?;
    let tx = inner.domain.alloc(slot * a.tx_buffers, Access::LOCAL)?;
    let id = loop {
        st.next_conn = (st.next_conn + 1) & 0xff_ffff;
        if !st.conns.contains_key(&st.next_conn) {
            break st.next_conn;
        }
    };
    for i in 0..rx_n {
        ep.recv(rx.iov(i * slot, slot), ctx(K_RX, id, i as u32))?;
    }
    let now = Instant::now();
    st.by_fid.insert(ep.fid(), id);
    st.conns.insert(
        id,
        Conn {
            ep,
            peer: Arc::from(peer),
            src: None,
            src_gen: u64::MAX,
            state,
            since: now,
            last_used: now,
            activity: 0,
            seen_activity: 0,
            rx,
            tx,
            slot,
            tx_free: (0..a.tx_buffers as u32).rev().collect(),
            tx_done: vec![None; a.tx_buffers],
            credits: 0,
            unannounced: 0,
            backlog: VecDeque::new(),
            held: 0,
            waiting: 0,
            retry: false,
        },
    );
    Ok(id)
}

/// The connection to `peer`, opening one if there is none.
fn conn_for(inner: &Inner, st: &mut State, peer: &[u8]) -> Result<u32> {
    if let Some(&id) = st.by_peer.get(peer) {
        return Ok(id);
    }
    let addr = decode_name(peer)?;
    let ep = inner
        .domain
        .endpoint(&inner.info, EndpointConfig::new(&inner.cq, &inner.eq))?;
    let id = new_conn(inner, st, ep, peer, CState::Connecting)?;
    let mut data = (inner.attr.rx_buffers as u32).to_le_bytes().to_vec();
    data.extend_from_slice(&inner.name);
    let conn = st.conns.get(&id).expect("just inserted");
    if let Err(e) = conn.ep.connect_to(&addr, &data) {
        let conn = st.conns.remove(&id).expect("just inserted");
        st.by_fid.remove(&conn.ep.fid());
        return Err(e.context("rdm: connect"));
    }
    st.by_peer.insert(peer.to_vec(), id);
    st.peer_gen += 1;
    inner.cm_busy.store(true, Ordering::Relaxed);
    Ok(id)
}

/// Queues an operation the MSG endpoint carries out itself (RMA, native atomic): no
/// message of this layer, so the header is only a placeholder.
fn enqueue_rma(inner: &Inner, st: &mut State, c: u32, done: Done, rma: Rma) {
    enqueue(
        inner,
        st,
        c,
        Out {
            hdr: Header::new(Op::Credit),
            payload: Vec::new(),
            done: Some(done),
            rma: Some(rma),
        },
    );
}

fn enqueue(inner: &Inner, st: &mut State, c: u32, out: Out) {
    if let Some(conn) = st.conns.get_mut(&c) {
        conn.backlog.push_back(out);
        conn.activity = conn.activity.wrapping_add(1);
    }
    flush(inner, st, c);
}

/// Sends what the connection's credits and send buffers allow.
/// Queues a control message whose answer the connection waits for (a rendezvous
/// request, an atomic): counted in `waiting` so the connection is not idle-closed.
fn enqueue_awaited(inner: &Inner, st: &mut State, c: u32, hdr: Header, payload: Vec<u8>) {
    if let Some(conn) = st.conns.get_mut(&c) {
        conn.waiting += 1;
    }
    enqueue(
        inner,
        st,
        c,
        Out {
            hdr,
            payload,
            done: None,
            rma: None,
        },
    );
}

fn st_next_rid(next: &mut u64) -> u64 {
    let r = *next;
    *next += 1;
    r
}

fn flush(inner: &Inner, st: &mut State, c: u32) {
    let mut broken = None;
    let mut refused: Vec<(Done, String)> = Vec::new();
    {
        let st = &mut *st;
        let Some(conn) = st.conns.get_mut(&c) else {
            return;
        };
        if conn.state != CState::Connected {
            return;
        }
        conn.retry = false;
        while conn.credits > 0 && !conn.tx_free.is_empty() && !conn.backlog.is_empty() {
            let mut out = conn.backlog.pop_front().expect("not empty");
            if let Some(rma) = out.rma.take() {
                let done = out.done.expect("RMA operations complete");
                let key = st_next_rid(&mut st.next_rid);
                let c_ctx = ctx(K_RMA, c, key as u32);
                let r = match &rma.kind {
                    RmaKind::Write { mr, offset } => {
                        conn.ep
                            .write(mr.iov(*offset, rma.remote.len), rma.remote, c_ctx)
                    }
                    RmaKind::Read { mr, offset } => {
                        conn.ep
                            .read(mr.iov(*offset, rma.remote.len), rma.remote, c_ctx)
                    }
                    RmaKind::Atomic {
                        op,
                        dt,
                        form,
                        operand,
                        compare,
                        result,
                    } => {
                        let msg = fabric_core::AtomicMsg {
                            op: *op,
                            datatype: *dt,
                            operand,
                            compare,
                            result: result.as_ref().map(|(mr, off)| mr.iov(*off, operand.len())),
                            remote: rma.remote,
                            context: c_ctx,
                        };
                        match form {
                            AtomicForm::Plain => conn.ep.atomicmsg(&msg, OpFlags::COMPLETION),
                            AtomicForm::Fetch => conn.ep.fetch_atomicmsg(&msg, OpFlags::COMPLETION),
                            AtomicForm::Compare => {
                                conn.ep.compare_atomicmsg(&msg, OpFlags::COMPLETION)
                            }
                        }
                    }
                };
                match r {
                    Ok(()) => {
                        conn.waiting += 1;
                        st.rma_ops.insert(key as u32 as u64, (c, done, rma.data));
                        continue;
                    }
                    Err(e)
                        if matches!(rma.kind, RmaKind::Atomic { .. })
                            && e.kind() != ErrorKind::WouldBlock
                            && e.kind() != ErrorKind::NotConnected =>
                    {
                        // The MSG endpoint refused this atomic at the call (its own
                        // checks): that operation fails, the connection stays.
                        refused.push((done, e.to_string()));
                        continue;
                    }
                    Err(e) => {
                        out.rma = Some(rma);
                        conn.backlog.push_front(out);
                        if e.kind() == ErrorKind::WouldBlock {
                            conn.retry = true;
                        } else {
                            broken = Some(e);
                        }
                        break;
                    }
                }
            }
            let slot = conn.tx_free.pop().expect("not empty");
            out.hdr.credits = conn.unannounced as u32;
            let off = slot_off(conn, slot);
            let len = HDR + out.payload.len();
            let r = conn
                .tx
                .write_at(off, &out.hdr.to_bytes())
                .and_then(|_| conn.tx.write_at(off + HDR, &out.payload))
                .and_then(|_| conn.ep.send(conn.tx.iov(off, len), ctx(K_TX, c, slot)));
            match r {
                Ok(()) => {
                    conn.unannounced = 0;
                    conn.credits -= 1;
                    conn.tx_done[slot as usize] = out.done;
                }
                Err(e) => {
                    // Put it back; a full provider queue is retried by the progress
                    // thread, anything else ends the connection (and fails its work).
                    conn.tx_free.push(slot);
                    conn.backlog.push_front(out);
                    if e.kind() == ErrorKind::WouldBlock {
                        conn.retry = true;
                    } else {
                        broken = Some(e);
                    }
                    break;
                }
            }
        }
    }
    for (done, why) in refused {
        st.finish(done, Err(cq_err(CqErrorKind::RemoteInvalid, why)));
    }
    if let Some(e) = broken {
        tracing::debug!("rdm: send on connection {c} failed: {e}");
        close_conn(inner, st, c, &format!("send failed: {e}"));
    }
}

/// Sends a credit-only message when half the receive buffers were freed unannounced.
fn maybe_credit(inner: &Inner, st: &mut State, c: u32) {
    let Some(conn) = st.conns.get_mut(&c) else {
        return;
    };
    if conn.state != CState::Connected || conn.unannounced < inner.attr.rx_buffers / 2 {
        return;
    }
    let mut h = Header::new(Op::Credit);
    h.credits = conn.unannounced as u32;
    let r = if inner.info.limits.inject_size >= HDR {
        conn.ep.inject(&h.to_bytes())
    } else if let Some(slot) = conn.tx_free.pop() {
        let off = slot_off(conn, slot);
        conn.tx
            .write_at(off, &h.to_bytes())
            .and_then(|_| conn.ep.send(conn.tx.iov(off, HDR), ctx(K_TX, c, slot)))
    } else {
        conn.retry = true;
        return;
    };
    match r {
        Ok(()) => conn.unannounced = 0,
        Err(e) => {
            // Retried by the progress thread.
            conn.retry = true;
            tracing::debug!("rdm: credit update on connection {c} failed: {e}");
        }
    }
}

/// Gives a receive buffer back to the provider (and counts it for the peer).
fn repost(inner: &Inner, st: &mut State, c: u32, slot: u32, counted: bool) {
    match st.conns.get(&c) {
        None => return,
        Some(conn) if conn.state == CState::Closed => {
            if conn.held == 0 {
                st.conns.remove(&c);
            }
            return;
        }
        Some(_) => {}
    }
    let conn = st.conns.get_mut(&c).expect("checked above");
    let off = slot_off(conn, slot);
    if let Err(e) = conn
        .ep
        .recv(conn.rx.iov(off, conn.slot), ctx(K_RX, c, slot))
    {
        tracing::debug!("rdm: repost on connection {c} failed: {e}");
        return;
    }
    if counted {
        conn.unannounced += 1;
        maybe_credit(inner, st, c);
    }
}

/// Gives an eager message's receive buffer back at the start of the next progress
/// round instead of now: the provider call is then off the path between a message's
/// arrival and the application seeing its completion (and answering). The peer's
/// credit for it is announced then too.
fn defer_repost(inner: &Inner, st: &mut State, c: u32, slot: u32) {
    st.reposts.push((c, slot));
    inner.reposts_pending.store(true, Ordering::Release);
}

/// Reposts what [`defer_repost`] put aside.
fn flush_reposts(inner: &Inner) {
    // A load first: the usual answer is no, and a swap is a locked instruction.
    if !inner.reposts_pending.load(Ordering::Relaxed)
        || !inner.reposts_pending.swap(false, Ordering::Acquire)
    {
        return;
    }
    let mut st = inner.st.lock();
    let mut pending = std::mem::take(&mut st.reposts);
    for &(c, slot) in &pending {
        repost(inner, &mut st, c, slot, true);
    }
    // Keep the allocation (repost never defers, so nothing was added meanwhile).
    pending.clear();
    st.reposts = pending;
}

/// Sends a data message that is not an application operation (finish, atomic
/// response).
fn reply(inner: &Inner, st: &mut State, c: u32, hdr: Header, payload: Vec<u8>) {
    enqueue(
        inner,
        st,
        c,
        Out {
            hdr,
            payload,
            done: None,
            rma: None,
        },
    );
}

/// Copies an eager message (connection `c`, receive buffer `slot`) into a matched
/// receive and completes it; `src` is the sender's handle in the address vector.
fn eager_into(
    inner: &Inner,
    st: &mut State,
    p: Posted,
    c: u32,
    slot: u32,
    hdr: &Header,
    src: Option<FiAddr>,
) {
    let Some(conn) = st.conns.get(&c) else {
        return;
    };
    let msg_len = hdr.len as usize;
    let n = msg_len.min(p.len);
    let off = slot_off(conn, slot) + HDR;
    let status = match scatter(&conn.rx, off, &p.segs, n) {
        Err(e) => Err(cq_err(CqErrorKind::LocalProtection, e.to_string())),
        Ok(()) if msg_len > p.len => Err(cq_err(
            CqErrorKind::Truncated,
            format!("a message of {msg_len} bytes into a buffer of {}", p.len),
        )),
        Ok(()) => Ok(()),
    };
    st.complete(
        RdmCompletion {
            context: p.context,
            kind: if p.tagged {
                OpKind::TaggedRecv
            } else {
                OpKind::Recv
            },
            len: n,
            tag: hdr.tag,
            data: (hdr.flags & F_DATA != 0).then_some(hdr.data),
            src,
            status,
        },
        CntrEvents::RECV,
    );
    defer_repost(inner, st, c, slot);
}

/// Hands an unexpected (or just arrived) message to a matched receive.
fn deliver(inner: &Inner, st: &mut State, p: Posted, u: Unexpected) {
    let key = st_next_rid(&mut st.next_rid);
    let src = src_of(inner, st, u.conn, &u.peer);
    let Some(conn) = st.conns.get_mut(&u.conn) else {
        return;
    };
    conn.held = conn.held.saturating_sub(1);
    let kind = if p.tagged {
        OpKind::TaggedRecv
    } else {
        OpKind::Recv
    };
    let data = (u.hdr.flags & F_DATA != 0).then_some(u.hdr.data);
    let msg_len = u.hdr.len as usize;
    let n = msg_len.min(p.len);
    let truncated = msg_len > p.len;
    match u.hdr.op {
        Op::Eager => eager_into(inner, st, p, u.conn, u.slot, &u.hdr, src),
        Op::Rts => {
            let rid = u.hdr.rid;
            let started = if n == 0 {
                Ok(false)
            } else {
                // The sender's ranges (checked on arrival) and ours, both cut to the
                // `n` bytes that fit.
                let entries = conn
                    .rx
                    .to_vec(slot_off(conn, u.slot) + HDR, u.hdr.payload_len())
                    .unwrap_or_default();
                let remote = clip_remote(&entries, n);
                let local = clip_local(&p.segs, n);
                let local: Vec<LocalIov<'_>> =
                    local.iter().map(|(s, k)| s.mr.iov(s.offset, *k)).collect();
                conn.ep
                    .readmsg(
                        &RmaMsg {
                            iov: &local,
                            rma_iov: &remote,
                            context: ctx(K_READ, u.conn, key as u32),
                            data: 0,
                        },
                        OpFlags::COMPLETION,
                    )
                    .map(|_| true)
            };
            match started {
                Ok(true) => {
                    conn.waiting += 1;
                    st.rndv_rx.insert(
                        key as u32 as u64,
                        RndvRx {
                            conn: u.conn,
                            recv: p,
                            hdr: u.hdr,
                            peer: u.peer,
                            len: n,
                            truncated,
                        },
                    );
                }
                other => {
                    let status = match other {
                        Err(e) => Err(cq_err(CqErrorKind::LocalProtection, e.to_string())),
                        _ if truncated => Err(cq_err(CqErrorKind::Truncated, "zero-byte buffer")),
                        _ => Ok(()),
                    };
                    let st_code = match &status {
                        Ok(()) => ST_OK,
                        Err(e) if e.kind == CqErrorKind::Truncated => ST_TRUNCATED,
                        Err(_) => ST_FAILED,
                    };
                    st.complete(
                        RdmCompletion {
                            context: p.context,
                            kind,
                            len: 0,
                            tag: u.hdr.tag,
                            data,
                            src,
                            status,
                        },
                        CntrEvents::RECV,
                    );
                    let mut h = Header::new(Op::Fin);
                    h.rid = rid;
                    h.status = st_code;
                    reply(inner, st, u.conn, h, Vec::new());
                }
            }
            repost(inner, st, u.conn, u.slot, true);
        }
        _ => repost(inner, st, u.conn, u.slot, true),
    }
}

/// A rendezvous request's ranges (checked on arrival: whole entries), cut to `n`
/// bytes, empty ranges left out.
fn clip_remote(entries: &[u8], n: usize) -> Vec<RemoteIov> {
    let mut out = Vec::new();
    let mut left = n;
    for e in entries.chunks_exact(RNDV_ENTRY) {
        if left == 0 {
            break;
        }
        let f = |i: usize| u64::from_le_bytes(e[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let k = (f(1) as usize).min(left);
        if k > 0 {
            out.push(RemoteIov {
                addr: f(0),
                len: k,
                key: f(2),
            });
        }
        left -= k;
    }
    out
}

/// A receive's ranges cut to `n` bytes, empty ones left out.
fn clip_local(segs: &[Seg], n: usize) -> Vec<(&Seg, usize)> {
    let mut out = Vec::new();
    let mut left = n;
    for s in segs {
        if left == 0 {
            break;
        }
        let k = s.len.min(left);
        if k > 0 {
            out.push((s, k));
        }
        left -= k;
    }
    out
}

fn drop_unexpected(inner: &Inner, st: &mut State, u: Unexpected) {
    if let Some(conn) = st.conns.get_mut(&u.conn) {
        conn.held = conn.held.saturating_sub(1);
    }
    if u.hdr.op == Op::Rts {
        // The sender's buffer is not read; its send completes with the finish.
        let mut h = Header::new(Op::Fin);
        h.rid = u.hdr.rid;
        reply(inner, st, u.conn, h, Vec::new());
    }
    repost(inner, st, u.conn, u.slot, true);
}

/// A message arrived on connection `c` in receive buffer `slot`.
fn on_recv(inner: &Inner, st: &mut State, c: u32, slot: u32, len: usize) {
    let Some(conn) = st.conns.get_mut(&c) else {
        return;
    };
    conn.activity = conn.activity.wrapping_add(1);
    let off = slot_off(conn, slot);
    let mut hb = [0u8; HDR];
    let parsed = conn
        .rx
        .read_at(off, &mut hb[..HDR.min(len)])
        .and_then(|_| Header::parse(&hb[..HDR.min(len)]))
        .and_then(|h| {
            let payload = len - HDR;
            let want = h.payload_len();
            if want != payload {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("rdm: header says {want} payload bytes, the message has {payload}"),
                ));
            }
            if h.op == Op::Rts {
                check_rts(&conn.rx, off + HDR, &h)?;
            }
            Ok(h)
        });
    let hdr = match parsed {
        Ok(h) => {
            conn.credits += h.credits as usize;
            h
        }
        Err(e) => {
            tracing::warn!("rdm: closing connection {c}: {e}");
            close_conn(inner, st, c, &e.to_string());
            return;
        }
    };
    match hdr.op {
        Op::Credit => repost(inner, st, c, slot, false),
        Op::CloseReq | Op::CloseAck | Op::CloseNack => {
            repost(inner, st, c, slot, false);
            on_close_msg(inner, st, c, hdr.op);
            return;
        }
        Op::WriteData => {
            let src = src_of(inner, st, c, &[]);
            st.complete(
                RdmCompletion {
                    context: 0,
                    kind: OpKind::RemoteWrite,
                    len: hdr.len as usize,
                    tag: 0,
                    data: Some(hdr.data),
                    src,
                    status: Ok(()),
                },
                CntrEvents::REMOTE_WRITE,
            );
            repost(inner, st, c, slot, true);
        }
        Op::Eager | Op::Rts => {
            // Matched with the connection's name borrowed: an expected eager message
            // (the usual case) takes no reference on it.
            let tagged = hdr.flags & F_TAGGED != 0;
            let Some(conn) = st.conns.get(&c) else {
                return;
            };
            let q = if tagged {
                &mut st.posted_tag
            } else {
                &mut st.posted_msg
            };
            let found = q
                .iter()
                .position(|p| {
                    matches_spec(
                        p.src.as_deref(),
                        p.tagged,
                        p.tag,
                        p.ignore,
                        &conn.peer,
                        hdr.tag,
                    )
                })
                .and_then(|i| q.remove(i));
            let found = match found {
                Some(p) if hdr.op == Op::Eager => {
                    // The connection is there: its cached handle, no name needed.
                    let src = src_of(inner, st, c, &[]);
                    eager_into(inner, st, p, c, slot, &hdr, src);
                    flush(inner, st, c);
                    return;
                }
                other => other,
            };
            let peer = conn.peer.clone();
            if let Some(p) = found {
                let u = Unexpected {
                    conn: c,
                    slot,
                    hdr,
                    peer,
                };
                if let Some(conn) = st.conns.get_mut(&c) {
                    conn.held += 1;
                }
                deliver(inner, st, p, u);
            } else {
                let u = Unexpected {
                    conn: c,
                    slot,
                    hdr,
                    peer,
                };
                if let Some(conn) = st.conns.get_mut(&c) {
                    conn.held += 1;
                }
                if hdr.flags & F_TAGGED != 0 {
                    st.unexp_tag.push_back(u);
                } else {
                    st.unexp_msg.push_back(u);
                }
            }
        }
        Op::Fin => {
            if let Some(t) = st.rndv_tx.remove(&hdr.rid) {
                if let Some(conn) = st.conns.get_mut(&t.conn) {
                    conn.waiting = conn.waiting.saturating_sub(1);
                }
                st.finish(t.done, status_err(hdr.status, "send"));
            }
            repost(inner, st, c, slot, true);
        }
        Op::AtomicReq => {
            let (st_code, fetched) = execute_atomic(st, &hdr, conn_payload(st, c, slot, &hdr));
            if st_code == ST_OK {
                inner.atomics_executed.fetch_add(1, Ordering::Relaxed);
            }
            let mut h = Header::new(Op::AtomicResp);
            h.rid = hdr.rid;
            h.status = st_code;
            h.len = fetched.len() as u64;
            repost(inner, st, c, slot, true);
            reply(inner, st, c, h, fetched);
        }
        Op::AtomicResp => {
            let payload = conn_payload(st, c, slot, &hdr);
            if let Some(a) = st.atomics.remove(&hdr.rid) {
                if let Some(conn) = st.conns.get_mut(&a.conn) {
                    conn.waiting = conn.waiting.saturating_sub(1);
                }
                let mut status = status_err(hdr.status, "atomic");
                if let (Ok(()), Some((mr, off))) = (&status, &a.result) {
                    if payload.len() != a.done.len {
                        status = Err(cq_err(CqErrorKind::Other, "atomic: short response"));
                    } else if let Err(e) = mr.write_at(*off, &payload) {
                        status = Err(cq_err(CqErrorKind::LocalProtection, e.to_string()));
                    }
                }
                st.finish(a.done, status);
            }
            repost(inner, st, c, slot, true);
        }
    }
    flush(inner, st, c);
}

/// Whether the connection's MSG endpoint executes this atomic natively (see
/// [`crate::atomic`]): on little-endian hosts, where the layer's little-endian
/// operands are the host order native providers take.
fn native_fits(
    ep: &fabric_core::Endpoint,
    op: AtomicOp,
    dt: Datatype,
    form: AtomicForm,
    count: usize,
    remote_addr: u64,
) -> bool {
    if !cfg!(target_endian = "little") {
        return false;
    }
    // The two paths must be atomic with respect to each other on one word: only a
    // provider whose atomics are coherent with CPU atomics (softroce; verbs devices
    // with IBV_ATOMIC_GLOB) may take some while the layer emulates others.
    if !ep.atomic_cpu_coherent() {
        return false;
    }
    // Native providers need natural alignment (RC atomics: 8 bytes); the emulated
    // path takes any address (and answers a bad one with RemoteAccess).
    if !remote_addr.is_multiple_of(dt.size() as u64) {
        return false;
    }
    let max = match form {
        AtomicForm::Plain => ep.atomicvalid(op, dt),
        AtomicForm::Fetch => ep.fetch_atomicvalid(op, dt),
        AtomicForm::Compare => ep.compare_atomicvalid(op, dt),
    };
    max.is_some_and(|m| count <= m)
}

/// Checks a rendezvous request's ranges: 1 to [`IOV_LIMIT`] of them, adding up to the
/// message's length.
fn check_rts(rx: &MemoryRegion, off: usize, h: &Header) -> Result<()> {
    let n = h.raddr as usize;
    let bad = |why: String| Error::new(ErrorKind::Protocol, format!("rdm: rendezvous: {why}"));
    if n == 0 || n > IOV_LIMIT {
        return Err(bad(format!("{n} ranges")));
    }
    let entries = rx.to_vec(off, n * RNDV_ENTRY)?;
    let total = entries.chunks_exact(RNDV_ENTRY).try_fold(0u64, |acc, e| {
        acc.checked_add(u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")))
    });
    if total != Some(h.len) {
        return Err(bad(format!(
            "the ranges add up to {total:?} bytes, the message has {}",
            h.len
        )));
    }
    Ok(())
}

fn conn_payload(st: &State, c: u32, slot: u32, hdr: &Header) -> Vec<u8> {
    st.conns
        .get(&c)
        .and_then(|conn| {
            conn.rx
                .to_vec(slot_off(conn, slot) + HDR, hdr.len as usize)
                .ok()
        })
        .unwrap_or_default()
}

/// Executes a peer's atomic request on a bound region; returns the status and the
/// fetched old values.
fn execute_atomic(st: &State, hdr: &Header, payload: Vec<u8>) -> (u16, Vec<u8>) {
    let op = AtomicOp::from_code(hdr.tag as u8);
    let dt = Datatype::from_code((hdr.tag >> 8) as u8);
    let count = ((hdr.tag >> 16) & 0xffff_ffff) as usize;
    let form = match (hdr.tag >> 48) & 0xff {
        0 => Some(AtomicForm::Plain),
        1 => Some(AtomicForm::Fetch),
        2 => Some(AtomicForm::Compare),
        _ => None,
    };
    let (Some(op), Some(dt), Some(form)) = (op, dt, form) else {
        return (ST_INVALID, Vec::new());
    };
    let Some(max) = atomic_valid(op, dt, form) else {
        return (ST_INVALID, Vec::new());
    };
    let n = count * dt.size();
    let operands = if form == AtomicForm::Compare { 2 } else { 1 };
    if count == 0 || count > max || payload.len() != n * operands {
        return (ST_INVALID, Vec::new());
    }
    let Some(mr) = st.atomic_mrs.get(&hdr.rkey) else {
        return (ST_ACCESS, Vec::new());
    };
    let modifies = op != AtomicOp::Read;
    let mut need = Access::empty();
    if modifies {
        need |= Access::REMOTE_WRITE;
    }
    if form != AtomicForm::Plain {
        need |= Access::REMOTE_READ;
    }
    let base = mr.remote().addr;
    let off = match hdr.raddr.checked_sub(base) {
        Some(o)
            if o.checked_add(n as u64)
                .is_some_and(|e| e <= mr.len() as u64) =>
        {
            o as usize
        }
        _ => return (ST_ACCESS, Vec::new()),
    };
    if !mr.access().contains(need) {
        return (ST_ACCESS, Vec::new());
    }
    let (operand, compare) = payload.split_at(n);
    // SAFETY: off..off+n is inside the region (checked above), which `st` keeps
    // registered and alive; peers reach it only through atomic instructions (this
    // path, a provider's native atomics) or RMA, as on any NIC.
    let old = unsafe { execute(op, dt, mr.as_ptr().add(off), operand, compare) };
    (
        ST_OK,
        if form == AtomicForm::Plain {
            Vec::new()
        } else {
            old
        },
    )
}

/// Ends a connection: its operations fail, its unexpected messages stay receivable.
fn close_conn(inner: &Inner, st: &mut State, c: u32, why: &str) {
    let Some(conn) = st.conns.get_mut(&c) else {
        return;
    };
    let _ = conn.ep.shutdown();
    conn.state = CState::Closed;
    let peer = conn.peer.clone();
    let fid = conn.ep.fid();
    let backlog: Vec<Out> = conn.backlog.drain(..).collect();
    let tx_done: Vec<Done> = conn.tx_done.iter_mut().filter_map(Option::take).collect();
    let held = conn.held;
    st.by_fid.remove(&fid);
    if st.by_peer.get(&*peer) == Some(&c) {
        st.by_peer.remove(&*peer);
        st.peer_gen += 1;
    }
    let lost = |d: &str| cq_err(CqErrorKind::ConnectionLost, format!("rdm: {d}"));
    for d in backlog.into_iter().filter_map(|o| o.done).chain(tx_done) {
        st.finish(d, Err(lost(why)));
    }
    let rids: Vec<u64> = st
        .rndv_tx
        .iter()
        .filter(|(_, t)| t.conn == c)
        .map(|(k, _)| *k)
        .collect();
    for r in rids {
        let t = st.rndv_tx.remove(&r).expect("key from iteration");
        st.finish(t.done, Err(lost(why)));
    }
    let rids: Vec<u64> = st
        .rma_ops
        .iter()
        .filter(|(_, t)| t.0 == c)
        .map(|(k, _)| *k)
        .collect();
    for r in rids {
        let (_, d, _) = st.rma_ops.remove(&r).expect("key from iteration");
        st.finish(d, Err(lost(why)));
    }
    let rids: Vec<u64> = st
        .atomics
        .iter()
        .filter(|(_, t)| t.conn == c)
        .map(|(k, _)| *k)
        .collect();
    for r in rids {
        let t = st.atomics.remove(&r).expect("key from iteration");
        st.finish(t.done, Err(lost(why)));
    }
    let rids: Vec<u64> = st
        .rndv_rx
        .iter()
        .filter(|(_, t)| t.conn == c)
        .map(|(k, _)| *k)
        .collect();
    for r in rids {
        let t = st.rndv_rx.remove(&r).expect("key from iteration");
        let src = inner.av.reverse_lookup(&t.peer);
        st.complete(
            RdmCompletion {
                context: t.recv.context,
                kind: if t.recv.tagged {
                    OpKind::TaggedRecv
                } else {
                    OpKind::Recv
                },
                len: 0,
                tag: t.hdr.tag,
                data: None,
                src,
                status: Err(lost(why)),
            },
            CntrEvents::RECV,
        );
    }
    if held == 0 {
        st.conns.remove(&c);
    }
}

fn on_event(inner: &Inner, st: &mut State, ev: Event) {
    match ev {
        Event::ConnRequest(req) => {
            let (rx_n, peer) = match req.data.split_first_chunk::<4>() {
                Some((n, p)) if decode_name(p).is_ok() => {
                    (u32::from_le_bytes(*n) as usize, p.to_vec())
                }
                _ => {
                    tracing::debug!("rdm: rejecting a connection request without an RDM name");
                    let _ = inner.pep.reject(&req, b"rxm: not an rdm peer");
                    return;
                }
            };
            let self_loop = peer == inner.name;
            let existing = if self_loop {
                None
            } else {
                st.by_peer.get(&peer).copied()
            };
            let replace = match existing.and_then(|id| st.conns.get(&id).map(|c| (id, c.state))) {
                None => None,
                Some((id, CState::Connecting | CState::Waiting)) if inner.name > peer => Some(id),
                // The peer connects again, so it has closed its side of a connection
                // whose close was under way here: the new one replaces it (below).
                Some((_, CState::CloseAsked | CState::CloseAgreed)) => None,
                Some(_) => {
                    // Ours wins (smaller name), or a connection exists already.
                    let _ = inner.pep.reject(&req, b"rxm: simultaneous connect");
                    return;
                }
            };
            let accepted = inner
                .domain
                .endpoint(&req.info, EndpointConfig::new(&inner.cq, &inner.eq))
                .and_then(|ep| new_conn(inner, st, ep, &peer, CState::Accepting));
            let id = match accepted {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!("rdm: cannot accept a connection: {e}");
                    let _ = inner.pep.reject(&req, b"rxm: cannot accept");
                    return;
                }
            };
            let conn = st.conns.get_mut(&id).expect("just inserted");
            conn.credits = rx_n;
            if let Err(e) = conn
                .ep
                .accept(&(inner.attr.rx_buffers as u32).to_le_bytes())
            {
                tracing::warn!("rdm: accept failed: {e}");
                close_conn(inner, st, id, "accept failed");
                return;
            }
            if let Some(old) = replace {
                // Move the loser's queued operations (and what waits on it) over.
                if let Some(mut o) = st.conns.remove(&old) {
                    st.by_fid.remove(&o.ep.fid());
                    let backlog: Vec<Out> = o.backlog.drain(..).collect();
                    let waiting = o.waiting;
                    let conn = st.conns.get_mut(&id).expect("just inserted");
                    conn.backlog.extend(backlog);
                    conn.waiting += waiting;
                    for t in st.rndv_tx.values_mut().filter(|t| t.conn == old) {
                        t.conn = id;
                    }
                    for t in st.atomics.values_mut().filter(|t| t.conn == old) {
                        t.conn = id;
                    }
                    drop(o);
                }
            }
            if !self_loop {
                let closing = existing.filter(|old| {
                    st.conns.get(old).is_some_and(|c| {
                        matches!(c.state, CState::CloseAsked | CState::CloseAgreed)
                    })
                });
                st.by_peer.insert(peer, id);
                st.peer_gen += 1;
                if let Some(old) = closing {
                    // Its queued operations move to the new connection.
                    agreed_close(inner, st, old);
                }
            }
        }
        Event::Connected { fid, data } => {
            let Some(&id) = st.by_fid.get(&fid) else {
                return;
            };
            if let Some(conn) = st.conns.get_mut(&id) {
                if conn.state == CState::Connecting {
                    conn.credits = data
                        .first_chunk::<4>()
                        .map_or(0, |n| u32::from_le_bytes(*n) as usize);
                }
                conn.state = CState::Connected;
            }
            flush(inner, st, id);
        }
        Event::Shutdown { fid, reason } => {
            if let Some(&id) = st.by_fid.get(&fid) {
                if st
                    .conns
                    .get(&id)
                    .is_some_and(|c| matches!(c.state, CState::CloseAgreed | CState::CloseAsked))
                {
                    // The peer closed as agreed (or, asking, closed first itself:
                    // nothing was in flight).
                    agreed_close(inner, st, id);
                    return;
                }
                close_conn(
                    inner,
                    st,
                    id,
                    &format!("connection ended ({})", reason.as_str()),
                );
            }
        }
        Event::Error { fid, error, .. } => {
            let Some(&id) = st.by_fid.get(&fid) else {
                return;
            };
            let waiting_for_peer = st.conns.get(&id).is_some_and(|c| {
                c.state == CState::Connecting && *c.peer < *inner.name && *c.peer != *inner.name
            });
            if waiting_for_peer {
                // Rejected by a peer with a smaller name: its own request is coming.
                let conn = st.conns.get_mut(&id).expect("checked");
                conn.state = CState::Waiting;
                st.by_fid.remove(&fid);
            } else {
                close_conn(inner, st, id, &format!("connect failed: {error}"));
            }
        }
        _ => {}
    }
}

fn on_completion(inner: &Inner, st: &mut State, c: Completion) {
    let (kind, conn, slot) = unctx(c.context);
    match kind {
        K_RX => match &c.status {
            Ok(()) => on_recv(inner, st, conn, slot, c.len),
            Err(e) if e.kind == CqErrorKind::Canceled => {}
            Err(e) => {
                let why = format!("a receive failed: {e}");
                close_conn(inner, st, conn, &why);
            }
        },
        K_TX => {
            if let Some(cn) = st.conns.get_mut(&conn) {
                if (slot as usize) < cn.tx_done.len() {
                    let done = cn.tx_done[slot as usize].take();
                    cn.tx_free.push(slot);
                    if let Some(d) = done {
                        let status = c.status.clone();
                        st.finish(d, status);
                    }
                }
            }
            flush(inner, st, conn);
        }
        K_RMA => {
            if let Some((cn, done, data)) = st.rma_ops.remove(&(slot as u64)) {
                if let Some(x) = st.conns.get_mut(&cn) {
                    x.waiting = x.waiting.saturating_sub(1);
                }
                match (data, c.status) {
                    (Some(d), Ok(())) => {
                        // The data is placed (a write completes on the target's
                        // acknowledgement): announce it. The write's completion waits
                        // for the announcement's.
                        let mut h = Header::new(Op::WriteData);
                        h.flags |= F_DATA;
                        h.data = d;
                        h.len = done.len as u64;
                        enqueue(
                            inner,
                            st,
                            cn,
                            Out {
                                hdr: h,
                                payload: Vec::new(),
                                done: Some(done),
                                rma: None,
                            },
                        );
                    }
                    (_, status) => {
                        if let Err(e) = &status {
                            if matches!(
                                e.kind,
                                CqErrorKind::RemoteAccess | CqErrorKind::RemoteInvalid
                            ) {
                                // A refused remote access (RMA, native atomic) ends the
                                // MSG connection ("one set of semantics"): retire it now,
                                // so what the application posts after seeing this
                                // completion goes over a fresh connection.
                                close_conn(
                                    inner,
                                    st,
                                    cn,
                                    "a refused remote access ended the connection",
                                );
                            }
                        }
                        st.finish(done, status)
                    }
                }
            }
        }
        K_READ => {
            let Some(r) = st.rndv_rx.remove(&(slot as u64)) else {
                return;
            };
            if let Some(cn) = st.conns.get_mut(&r.conn) {
                cn.waiting = cn.waiting.saturating_sub(1);
            }
            let status = match c.status {
                Err(e) => Err(e),
                Ok(()) if r.truncated => Err(cq_err(
                    CqErrorKind::Truncated,
                    format!(
                        "a message of {} bytes into a buffer of {}",
                        r.hdr.len, r.recv.len
                    ),
                )),
                Ok(()) => Ok(()),
            };
            let st_code = match &status {
                Ok(()) => ST_OK,
                Err(e) if e.kind == CqErrorKind::Truncated => ST_TRUNCATED,
                Err(e) if e.kind == CqErrorKind::RemoteAccess => ST_ACCESS,
                Err(_) => ST_FAILED,
            };
            st.complete(
                RdmCompletion {
                    context: r.recv.context,
                    kind: if r.recv.tagged {
                        OpKind::TaggedRecv
                    } else {
                        OpKind::Recv
                    },
                    len: if status.is_ok() || st_code == ST_TRUNCATED {
                        r.len
                    } else {
                        0
                    },
                    tag: r.hdr.tag,
                    data: (r.hdr.flags & F_DATA != 0).then_some(r.hdr.data),
                    src: inner.av.reverse_lookup(&r.peer),
                    status,
                },
                CntrEvents::RECV,
            );
            let mut h = Header::new(Op::Fin);
            h.rid = r.hdr.rid;
            h.status = st_code;
            reply(inner, st, r.conn, h, Vec::new());
        }
        _ => {}
    }
}

/// Fails connections that take too long to form and closes idle ones.
fn housekeeping(inner: &Inner, st: &mut State) {
    let now = Instant::now();
    for c in st.conns.values_mut() {
        if c.activity != c.seen_activity {
            c.seen_activity = c.activity;
            c.last_used = now;
        }
    }
    let mut late = Vec::new();
    let mut idle = Vec::new();
    let mut stale = Vec::new();
    for (&id, c) in &st.conns {
        match c.state {
            CState::Connecting | CState::Waiting | CState::Accepting
                if now.duration_since(c.since) > inner.attr.connect_timeout =>
            {
                late.push(id)
            }
            CState::Connected
                if inner
                    .attr
                    .idle_timeout
                    .is_some_and(|t| now.duration_since(c.last_used) > t)
                    && quiet(c) =>
            {
                idle.push(id)
            }
            CState::CloseAsked | CState::CloseAgreed
                if now.duration_since(c.since) > inner.attr.connect_timeout =>
            {
                // The peer never answered or never shut down: nothing is in flight
                // (both sides said so), so end it as agreed.
                stale.push(id)
            }
            _ => {}
        }
    }
    for id in late {
        close_conn(inner, st, id, "the connection did not form in time");
    }
    for id in idle {
        tracing::debug!("rdm: asking to close idle connection {id}");
        if let Some(conn) = st.conns.get_mut(&id) {
            if send_ctrl(inner, conn, id, Op::CloseReq) {
                conn.state = CState::CloseAsked;
                conn.since = now;
            }
        }
    }
    for id in stale {
        agreed_close(inner, st, id);
    }
    refresh_cm_busy(inner, st);
}

/// Nothing in flight on a connection from this side: nothing queued, no operation
/// waiting for the peer, no message of the peer held, every send completed.
fn quiet(c: &Conn) -> bool {
    c.backlog.is_empty() && c.waiting == 0 && c.held == 0 && c.tx_free.len() == c.tx_done.len()
}

/// Sends a header-only control message of the close handshake (it takes no credit:
/// the receiver's extra buffers hold it). `false` if it could not be posted.
fn send_ctrl(inner: &Inner, conn: &mut Conn, c: u32, op: Op) -> bool {
    let h = Header::new(op).to_bytes();
    let r = if inner.info.limits.inject_size >= HDR {
        conn.ep.inject(&h)
    } else if let Some(slot) = conn.tx_free.pop() {
        let off = slot_off(conn, slot);
        let r = conn
            .tx
            .write_at(off, &h)
            .and_then(|_| conn.ep.send(conn.tx.iov(off, HDR), ctx(K_TX, c, slot)));
        if r.is_err() {
            conn.tx_free.push(slot);
        }
        r
    } else {
        return false;
    };
    match r {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("rdm: {op:?} on connection {c} failed: {e}");
            false
        }
    }
}

/// Ends a connection both sides agreed to close (nothing in flight either way): its
/// queued operations, posted meanwhile, move to a new connection to the peer.
fn agreed_close(inner: &Inner, st: &mut State, c: u32) {
    let Some(conn) = st.conns.get_mut(&c) else {
        return;
    };
    let _ = conn.ep.shutdown();
    conn.state = CState::Closed;
    let peer = conn.peer.clone();
    let fid = conn.ep.fid();
    let backlog: Vec<Out> = conn.backlog.drain(..).collect();
    let (held, waiting) = (conn.held, conn.waiting);
    st.by_fid.remove(&fid);
    if st.by_peer.get(&*peer) == Some(&c) {
        st.by_peer.remove(&*peer);
        st.peer_gen += 1;
    }
    st.closed_idle += 1;
    tracing::debug!("rdm: connection {c} closed by agreement");
    if !backlog.is_empty() || waiting > 0 {
        match conn_for(inner, st, &peer) {
            Ok(n) => {
                if let Some(nc) = st.conns.get_mut(&n) {
                    nc.backlog.extend(backlog);
                    nc.waiting += waiting;
                }
                for t in st.rndv_tx.values_mut().filter(|t| t.conn == c) {
                    t.conn = n;
                }
                for t in st.atomics.values_mut().filter(|t| t.conn == c) {
                    t.conn = n;
                }
            }
            Err(e) => {
                let lost = cq_err(CqErrorKind::ConnectionLost, format!("rdm: reconnect: {e}"));
                for d in backlog.into_iter().filter_map(|o| o.done) {
                    st.finish(d, Err(lost.clone()));
                }
            }
        }
    }
    if held == 0 {
        st.conns.remove(&c);
    }
}

/// The close handshake's messages on connection `c`.
fn on_close_msg(inner: &Inner, st: &mut State, c: u32, op: Op) {
    let Some(conn) = st.conns.get_mut(&c) else {
        return;
    };
    match (op, conn.state) {
        (Op::CloseReq, CState::Connected) => {
            if quiet(conn) && send_ctrl(inner, conn, c, Op::CloseAck) {
                conn.state = CState::CloseAgreed;
                conn.since = Instant::now();
            } else {
                send_ctrl(inner, conn, c, Op::CloseNack);
            }
        }
        (Op::CloseReq, CState::CloseAsked) => {
            // Both asked at once: the request of the endpoint with the smaller name
            // stands; the other answers it as if it had not asked (and the smaller
            // one ignores the larger one's request, so no answer to it comes).
            if *inner.name > *conn.peer {
                if quiet(conn) && send_ctrl(inner, conn, c, Op::CloseAck) {
                    conn.state = CState::CloseAgreed;
                    conn.since = Instant::now();
                } else {
                    send_ctrl(inner, conn, c, Op::CloseNack);
                    conn.state = CState::Connected;
                }
            }
        }
        (Op::CloseAck, CState::CloseAsked) => {
            // What the peer sent before agreeing has arrived (the connection keeps
            // order): close only if none of it still needs the connection.
            if quiet_but_backlog(conn) {
                agreed_close(inner, st, c);
                return;
            }
            send_ctrl(inner, conn, c, Op::CloseNack);
            conn.state = CState::Connected;
            conn.last_used = Instant::now();
        }
        (Op::CloseNack, CState::CloseAsked | CState::CloseAgreed) => {
            conn.state = CState::Connected;
            conn.last_used = Instant::now();
        }
        _ => tracing::debug!("rdm: {op:?} in state {:?} ignored", conn.state),
    }
    flush(inner, st, c);
    maybe_credit(inner, st, c);
}

/// [`quiet`], except for operations queued while the close was being asked (they move
/// to the next connection).
fn quiet_but_backlog(c: &Conn) -> bool {
    c.waiting == 0 && c.held == 0 && c.tx_free.len() == c.tx_done.len()
}

/// Retries sends and credit updates that found the provider's queue full.
fn retry_blocked(inner: &Inner, st: &mut State) {
    let blocked: Vec<u32> = st
        .conns
        .iter()
        .filter(|(_, c)| c.retry)
        .map(|(&id, _)| id)
        .collect();
    for c in blocked {
        flush(inner, st, c);
        maybe_credit(inner, st, c);
    }
}

/// One round of progress: connection events, then the underlying completions
/// (waiting up to `timeout` for the first). Whoever holds `inner.progress` may run it:
/// the progress thread, or an application thread in [`RdmEndpoint::wait`] /
/// [`RdmEndpoint::read`], which then skips the hand-off through the thread.
fn progress_once(inner: &Inner, batch: &mut Vec<Completion>, timeout: Duration, now: Option<u64>) {
    progress_take(inner, batch, timeout, now, None);
}

/// What a reader does with the completions under the state lock: takes some, says how
/// many.
type Take<'a> = dyn FnMut(&mut VecDeque<RdmCompletion>) -> usize + 'a;

/// [`progress_once`], and when the round handled something and `take` is given,
/// `take` applied to the completions under the same lock (a busy poller's
/// [`RdmEndpoint::read`] then takes the state lock once per message, not twice).
/// Returns what `take` took.
fn progress_take(
    inner: &Inner,
    batch: &mut Vec<Completion>,
    timeout: Duration,
    now: Option<u64>,
    take: Option<&mut Take<'_>>,
) -> usize {
    flush_reposts(inner);
    let mut any = false;
    // An event-queue read is the provider's full progress (connection manager, socket
    // polls): every round while a connection forms or closes, or when this round may
    // sleep; otherwise once per EQ_EVERY, so a busy poller pays for the cheap
    // completion-queue read only (a full progress call also sends the acknowledgements
    // a provider holds back for the application's answer, and waits for its locks).
    // `now` is the clock if the caller read it: a busy poller reads it once per
    // Watchdog::CHECK_EVERY calls ([`touch`]; a clock read costs as much as the rest
    // of an idle round on some virtual machines).
    let eq_due = !timeout.is_zero()
        || inner.cm_busy.load(Ordering::Relaxed)
        || now.is_some_and(|t| {
            t.saturating_sub(inner.last_eq.load(Ordering::Relaxed)) >= EQ_EVERY.as_nanos() as u64
        });
    if eq_due {
        inner
            .last_eq
            .store(now.unwrap_or_else(|| stamp(inner)), Ordering::Relaxed);
    }
    for _ in 0..if eq_due { 64 } else { 0 } {
        match inner.eq.read() {
            Ok(Some(ev)) => {
                any = true;
                if matches!(ev, Event::Shutdown { .. }) {
                    // What the connection delivered before it ended is already in the
                    // completion queue: handle it first, or a message its sender saw
                    // complete (and then closed) would be dropped with the connection.
                    drain_completions(inner, batch);
                }
                let mut st = inner.st.lock();
                on_event(inner, &mut st, ev);
                refresh_cm_busy(inner, &st);
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("rdm: event queue: {e}");
                break;
            }
        }
    }
    batch.clear();
    let timeout = if any { Duration::ZERO } else { timeout };
    let r = if timeout.is_zero() {
        inner.cq.read(batch, 64)
    } else {
        inner.cq.sread(batch, 64, Some(timeout))
    };
    if let Err(e) = r {
        tracing::warn!("rdm: completion queue: {e}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut taken = 0;
    if !batch.is_empty() || any {
        let mut st = inner.st.lock();
        for c in batch.drain(..) {
            on_completion(inner, &mut st, c);
        }
        retry_blocked(inner, &mut st);
        if let Some(take) = take {
            taken = take(&mut st.completions);
            inner.ready.store(st.completions.len(), Ordering::Release);
        }
        let wake = !st.completions.is_empty();
        drop(st);
        if wake {
            inner.cv.notify_all();
        }
    }
    taken
}

/// Handles every completion the queue holds now (bounded: 64 reads of 64).
fn drain_completions(inner: &Inner, batch: &mut Vec<Completion>) {
    for _ in 0..64 {
        batch.clear();
        match inner.cq.read(batch, 64) {
            Ok(n) if n > 0 => {
                let mut st = inner.st.lock();
                for c in batch.drain(..) {
                    on_completion(inner, &mut st, c);
                }
            }
            _ => break,
        }
    }
    batch.clear();
}

/// Address-vector indices below this get a send shortcut (`State::route`).
const ROUTE_MAX: usize = 1 << 16;

/// A busy poller reads the event queue this often while no connection forms or
/// closes.
const EQ_EVERY: Duration = Duration::from_micros(500);

/// Whether some connection waits for a connection-manager event (forming or closing):
/// progress then reads the event queue every round.
fn refresh_cm_busy(inner: &Inner, st: &State) {
    let busy = st
        .conns
        .values()
        .any(|c| !matches!(c.state, CState::Connected | CState::Closed));
    inner.cm_busy.store(busy, Ordering::Relaxed);
}

/// Nanoseconds since `inner.epoch`.
fn stamp(inner: &Inner) -> u64 {
    inner.epoch.elapsed().as_nanos() as u64
}

/// How often the progress thread looks for connections that are late or idle (more
/// often with an idle timeout below twice this).
const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// How long after an application thread's last read, wait or peek the progress thread
/// leaves progress to the application ([`app_active`]): a quarter of the idle timeout,
/// within these bounds.
const APP_ACTIVE_MIN: Duration = Duration::from_millis(2);
const APP_ACTIVE_MAX: Duration = Duration::from_millis(8);

/// The window for an idle timeout: long enough that the application keeps the
/// thread's timer ahead rarely (every half window; a timer due before the next
/// scheduler tick, 4 ms on a 250 Hz kernel, makes the kernel reprogram the CPU's timer
/// each time, which on a virtual machine is an exit to the hypervisor on the poller's
/// core), short enough that the idle-close handshake still runs between an
/// intermittent poller's calls.
fn app_active(idle_timeout: Option<Duration>) -> Duration {
    idle_timeout.map_or(APP_ACTIVE_MAX, |t| {
        (t / 4).clamp(APP_ACTIVE_MIN, APP_ACTIVE_MAX)
    })
}

/// After this long without an application thread in read, wait or peek, the progress
/// thread's rounds may sleep on the queues (holding the progress lock while they do).
const APP_RECENT: Duration = Duration::from_millis(50);

/// Notes that an application thread is polling or waiting now (whether or not it gets
/// the progress lock: one that finds the thread's round under way must still keep the
/// thread away from the next one). Every [`Watchdog::CHECK_EVERY`] calls it reads the
/// clock and keeps the progress thread's timer ahead, so the thread sleeps for as long
/// as the application polls.
/// Returns the clock when this call read it (for [`progress_once`]'s event-queue
/// interval).
fn touch(inner: &Inner) -> Option<u64> {
    // Not an atomic increment (a locked instruction per poll): two application
    // threads racing may count one call, which still says "the application is here".
    let n = inner.app_calls.load(Ordering::Relaxed).wrapping_add(1);
    inner.app_calls.store(n, Ordering::Relaxed);
    if n.is_multiple_of(Watchdog::CHECK_EVERY) {
        let now = stamp(inner);
        inner.watchdog.postpone(now, inner.app_active);
        Some(now)
    } else {
        None
    }
}

fn progress_loop(inner: &Inner) {
    let mut last_house = Instant::now();
    let house_every = inner.attr.idle_timeout.map_or(HOUSEKEEPING, |t| {
        (t / 2).clamp(Duration::from_millis(1), HOUSEKEEPING)
    });
    // The application's call counter as last seen, and when the application was last
    // known to be here ([`stamp`]; None: not yet).
    let mut seen_calls = inner.app_calls.load(Ordering::Relaxed);
    let mut app_seen: Option<u64> = None;
    let active = inner.app_active.as_nanos() as u64;
    while !inner.stop.load(Ordering::Acquire) {
        // While the application drives progress itself (a thread read, waited or
        // peeked within the last app_active), stay out of its way: a round of this
        // thread holds the progress lock while it sleeps on the queue, and a busy
        // poller that cannot take the lock would only see what this thread hands it
        // (the cost of a wake-up per message). Otherwise drive progress.
        let now = stamp(inner);
        let calls = inner.app_calls.load(Ordering::Relaxed);
        let moved = calls.wrapping_sub(seen_calls);
        if moved > 0 {
            seen_calls = calls;
            // Calls that read the clock say when they were made (at most
            // CHECK_EVERY - 1 calls since); after fewer calls, assume now.
            app_seen = Some(if moved >= Watchdog::CHECK_EVERY {
                inner.watchdog.app_last()
            } else {
                now
            });
        }
        let since = app_seen.map_or(u64::MAX, |t| now.saturating_sub(t));
        if since < active {
            // Sleep until the application has been away for app_active: on the timer
            // the application keeps postponing while it polls, so a busy poller is
            // never preempted by this thread (on a small machine each wake-up can
            // take a poller's core). Housekeeping still runs every house_every.
            let until = app_seen.unwrap_or(now) + active;
            inner.watchdog.arm_at_least(now, until);
            let left =
                Duration::from_millis(1).max(house_every.saturating_sub(last_house.elapsed()));
            inner.watchdog.wait(now, left);
        } else if since < APP_RECENT.as_nanos() as u64 {
            // The application was here lately and may be back any moment (on a loaded
            // machine a busy poller is off its core for milliseconds): rounds that do
            // not sleep holding the progress lock, short sleeps between them.
            if let Some(mut batch) = inner.progress.try_lock() {
                progress_once(inner, &mut batch, Duration::ZERO, Some(now));
            }
            std::thread::sleep(Duration::from_micros(100));
        } else if let Some(mut batch) = inner.progress.try_lock() {
            progress_once(inner, &mut batch, Duration::from_millis(1), Some(now));
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
        if last_house.elapsed() > house_every {
            let mut st = inner.st.lock();
            housekeeping(inner, &mut st);
            retry_blocked(inner, &mut st);
            let wake = !st.completions.is_empty();
            drop(st);
            if wake {
                inner.cv.notify_all();
            }
            last_house = Instant::now();
        }
    }
}
