//! The provider objects behind fabric-core's wrappers: fabric (progress and the
//! connection manager), domain (the R_Key table), completion and event queues,
//! passive and active endpoints.

use std::any::Any;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use fabric_core::provider::{
    CmOps, CqOps, DomainOps, EndpointBinding, EndpointOps, EqOps, FabricOps, MrOps, MsgOps,
    PassiveEndpointOps, RmaOps,
};
use fabric_core::{
    Access, Address, CompFlags, Completion, ConnRequest, CqAttr, EqAttr, Error, ErrorKind, Event,
    Fid, Info, MemoryBacking, MrFlags, OpFlags, Payload, Progress, RecvRequest, Result, RmaRequest,
    SendRequest, ShutdownReason,
};
use parking_lot::{Mutex, RwLock};
use tracing::{debug, warn};

use super::cm::{self, CmMsg, Kind};
use super::device::{self, CompQueue, Device, QpOwner, QpSlot, Reporting};
use super::memory::{self, OpMemory};
use super::sys;
use super::Config;
use crate::rc::{self, FlushPlacement, LocalMemory, LocalSegment, Mtu, SendOp, SendWr};
use fabric_core::prov::KeyMap;
use fabric_core::prov::{self, KeyedMr, Progress as _, ProviderCq, ProviderEq};
use fabric_core::wait::WaitQueue;

type EqQueue = WaitQueue<Event>;

/// Manual progress consults the connection manager every this many CQ reads.
const CM_EVERY: u32 = 256;
/// Longest a sleeper waits before looking again (connection housekeeping).
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// What a fabric shares with everything opened from it.
pub(crate) struct Shared {
    devices: RwLock<Vec<Arc<Device>>>,
    cm: Mutex<CmState>,
    auto: AtomicBool,
    tick: AtomicU32,
    config: Config,
}

#[derive(Default)]
struct CmState {
    listeners: HashMap<u64, CmListener>,
    /// Accepted connections whose request is still arriving: at most
    /// [`prov::HALF_OPEN_MAX`] (one more closes the oldest), each for at most
    /// [`prov::HALF_OPEN_AGE`].
    half_open: prov::HalfOpen<Incoming>,
    eps: Vec<Weak<EpInner>>,
}

struct CmListener {
    sock: TcpListener,
    info: Info,
    eq: Arc<EqQueue>,
    listening: bool,
}

/// An accepted connection whose request is still arriving.
struct Incoming {
    sock: TcpStream,
    buf: Vec<u8>,
    listener: u64,
}

/// A connection request between the listener and the accepting endpoint: its socket
/// and request, in the request's [`prov::ConnToken`].
fn take_request(info: &Info) -> Result<(TcpStream, CmMsg)> {
    prov::ConnToken::<(TcpStream, CmMsg)>::take(info, "softroce")
}

fn write_all_nb(sock: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    // CM messages are a few hundred bytes: a socket buffer takes them at once. Retry
    // briefly on a full buffer rather than block forever.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut off = 0;
    while off < bytes.len() {
        match sock.write(&bytes[off..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn ipv4_of(a: SocketAddr) -> Result<Ipv4Addr> {
    match a.ip() {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped().ok_or_else(|| {
            Error::new(
                ErrorKind::AddressNotAvailable,
                format!("softroce needs IPv4 addresses, not {a}"),
            )
        }),
    }
}

impl Shared {
    fn add_device(&self, d: &Arc<Device>) {
        let mut v = self.devices.write();
        if !v.iter().any(|x| Arc::ptr_eq(x, d)) {
            v.push(d.clone());
        }
    }

    /// Manual progress. `full` also runs the connection manager and waits for device
    /// locks held by other threads.
    fn progress(&self, full: bool) {
        for d in self.devices.read().iter() {
            d.progress(full);
            d.report_failures();
        }
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        if full || t.is_multiple_of(CM_EVERY) {
            self.cm_progress();
        }
    }

    /// Sleeps until a device socket or CM socket is readable, `queue_fd` is
    /// signalled, a device timer is due or `deadline` passes.
    fn sleep(&self, queue_fd: Option<RawFd>, deadline: Option<Instant>) {
        let devices = self.devices.read().clone();
        let mut fds: Vec<RawFd> = Vec::with_capacity(8);
        let mut timeout = MAX_SLEEP;
        if let Some(d) = deadline {
            timeout = timeout.min(d.saturating_duration_since(Instant::now()));
        }
        for d in &devices {
            d.release_acks(false);
            fds.extend_from_slice(&d.fds());
            if let Some(t) = d.next_timer() {
                timeout = timeout.min(t);
            }
            d.begin_sleep();
        }
        {
            let cm = self.cm.lock();
            fds.extend(
                cm.listeners
                    .values()
                    .filter(|l| l.listening)
                    .map(|l| l.sock.as_raw_fd()),
            );
            fds.extend(cm.half_open.iter().map(|h| h.sock.as_raw_fd()));
            for ep in cm.eps.iter().filter_map(Weak::upgrade) {
                if let Some(fd) = ep.cm.lock().sock.as_ref().map(|s| s.as_raw_fd()) {
                    fds.push(fd);
                }
            }
        }
        if let Some(q) = queue_fd {
            fds.push(q);
        }
        fabric_core::wait::poll_readable(&fds, Some(timeout));
        for d in &devices {
            d.end_sleep();
        }
    }

    fn cm_progress(&self) {
        let mut cm = self.cm.lock();
        let CmState {
            listeners,
            half_open,
            eps,
        } = &mut *cm;
        // One poll(2) tells whether any CM socket has something to say: accept(2) on
        // an idle listener costs several µs (the kernel sets up a socket and a file
        // before it finds the queue empty), and this runs every CM_EVERY CQ reads.
        let mut fds: Vec<RawFd> = Vec::with_capacity(8);
        fds.extend(
            listeners
                .values()
                .filter(|l| l.listening)
                .map(|l| l.sock.as_raw_fd()),
        );
        fds.extend(half_open.iter().map(|h| h.sock.as_raw_fd()));
        let mut live = 0;
        for ep in eps.iter().filter_map(Weak::upgrade) {
            live += 1;
            if let Some(fd) = ep.cm.lock().sock.as_ref().map(|s| s.as_raw_fd()) {
                fds.push(fd);
            }
        }
        let now = Instant::now();
        let overdue = half_open.next_deadline().is_some_and(|d| now >= d);
        if !overdue && live == eps.len() && !sys::any_readable(&fds) {
            return;
        }
        for (id, l) in listeners.iter() {
            if !l.listening {
                continue;
            }
            for _ in 0..64 {
                match l.sock.accept() {
                    Ok((sock, peer)) => {
                        if sock.set_nonblocking(true).is_err() {
                            continue;
                        }
                        let _ = sock.set_nodelay(true);
                        debug!(%peer, "softroce: incoming connection");
                        let incoming = Incoming {
                            sock,
                            buf: Vec::new(),
                            listener: *id,
                        };
                        let evicted = half_open.insert(Fid::next().0, incoming, Instant::now());
                        if !evicted.is_empty() {
                            debug!("softroce: too many connections without a request: closed the oldest");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        for _ in half_open.expire(now) {
            debug!("softroce: dropping an incoming connection: no request in time");
        }
        for hid in half_open.ids() {
            let Some(h) = half_open.get_mut(hid) else {
                continue;
            };
            let mut tmp = [0u8; 512];
            let outcome = loop {
                match CmMsg::decode(&h.buf) {
                    Err(e) => break Err(e),
                    Ok(Some((msg, _))) if msg.kind == Kind::Request => break Ok(Some(msg)),
                    Ok(Some((msg, _))) => {
                        break Err(format!("expected a request, got {:?}", msg.kind))
                    }
                    Ok(None) => {}
                }
                match h.sock.read(&mut tmp) {
                    Ok(0) => break Err("closed before its request".into()),
                    Ok(n) => h.buf.extend_from_slice(&tmp[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e.to_string()),
                }
            };
            match outcome {
                Ok(None) => {}
                Err(why) => {
                    debug!("softroce: dropping an incoming connection: {why}");
                    half_open.remove(hid);
                }
                Ok(Some(msg)) => {
                    let Some(h) = half_open.remove(hid) else {
                        continue;
                    };
                    let Some(l) = listeners.get(&h.listener) else {
                        continue;
                    };
                    let mut info = l.info.clone();
                    info.dest_addr = h.sock.peer_addr().ok().map(Address::Inet);
                    info.src_addr = h.sock.local_addr().ok().map(Address::Inet);
                    let data = msg.data.clone();
                    let info = prov::ConnToken::attach(info, (h.sock, msg));
                    l.eq.push(Event::ConnRequest(Box::new(ConnRequest {
                        info,
                        data,
                        listener: Fid(h.listener),
                    })));
                }
            }
        }
        eps.retain(|w| match w.upgrade() {
            Some(ep) => {
                ep.cm_poll();
                true
            }
            None => false,
        });
    }
}

impl prov::Progress for Shared {
    fn poll(&self) {
        self.progress(false);
    }
    fn poll_full(&self) {
        self.progress(true);
    }
    fn sleep(&self, queue_fd: Option<RawFd>, deadline: Option<Instant>) {
        Shared::sleep(self, queue_fd, deadline);
    }
    fn start_auto(self: &Arc<Self>) {
        prov::start_progress_thread(self, &self.auto, "softroce-progress");
    }
}

/// The fabric.
pub(crate) struct SrFabric {
    shared: Arc<Shared>,
}

impl SrFabric {
    pub(crate) fn open(info: &Info, config: Config) -> Result<SrFabric> {
        let shared = Arc::new(Shared {
            devices: RwLock::new(Vec::new()),
            cm: Mutex::new(CmState::default()),
            auto: AtomicBool::new(false),
            tick: AtomicU32::new(0),
            config,
        });
        if info.progress == Progress::Auto {
            shared.start_auto();
        }
        Ok(SrFabric { shared })
    }
}

fn downcast_eq(eq: &Arc<dyn EqOps>, shared: &Arc<Shared>) -> Result<Arc<EqQueue>> {
    SrEq::queue_of(eq, shared, "softroce")
}

fn downcast_cq(cq: &Arc<dyn CqOps>, shared: &Arc<Shared>) -> Result<Arc<CompQueue>> {
    SrCq::queue_of(cq, shared, "softroce")
}

impl FabricOps for SrFabric {
    fn open_domain(&self, info: &Info) -> Result<Arc<dyn DomainOps>> {
        if info.progress == Progress::Auto {
            self.shared.start_auto();
        }
        Ok(Arc::new(SrDomain {
            shared: self.shared.clone(),
            keys: Arc::new(memory::key_map()),
        }))
    }

    fn open_eq(&self, _attr: &EqAttr) -> Result<Arc<dyn EqOps>> {
        SrEq::open(&self.shared)
    }

    fn open_passive_ep(
        &self,
        info: &Info,
        eq: &Arc<dyn EqOps>,
    ) -> Result<Arc<dyn PassiveEndpointOps>> {
        let eq = downcast_eq(eq, &self.shared)?;
        let addr = prov::listen_addr(info, "softroce")?;
        let ip = ipv4_of(addr)?;
        // Open the device now so a taken port 4791 is reported here, clearly.
        if !ip.is_unspecified() {
            let dev = Device::get(ip)?;
            self.shared.add_device(&dev);
        }
        let sock = prov::bind_listener(addr)?;
        let fid = Fid::next();
        debug!(%fid, addr = %sock.local_addr()?, "softroce passive endpoint bound");
        self.shared.cm.lock().listeners.insert(
            fid.0,
            CmListener {
                sock,
                info: info.clone(),
                eq,
                listening: false,
            },
        );
        Ok(Arc::new(SrPep {
            fid,
            shared: self.shared.clone(),
        }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A domain: its registrations.
pub(crate) struct SrDomain {
    shared: Arc<Shared>,
    keys: Arc<KeyMap>,
}

impl DomainOps for SrDomain {
    fn open_cq(&self, _attr: &CqAttr) -> Result<Arc<dyn CqOps>> {
        SrCq::open(&self.shared)
    }

    fn register(
        &self,
        memory: Arc<dyn MemoryBacking>,
        access: Access,
        flags: MrFlags,
    ) -> Result<Arc<dyn MrOps>> {
        // 4-byte keys (mr_key_size): the map hands out 32-bit values.
        Ok(Arc::new(KeyedMr::register(
            &self.keys, memory, access, flags,
        )))
    }

    fn open_endpoint(&self, info: &Info, bind: EndpointBinding) -> Result<Arc<dyn EndpointOps>> {
        let rep = Arc::new(Reporting {
            fid: Fid::next(),
            tx_cq: downcast_cq(&bind.tx_cq, &self.shared)?,
            rx_cq: downcast_cq(&bind.rx_cq, &self.shared)?,
            owner: OnceLock::new(),
        });
        let inner = Arc::new(EpInner {
            fid: rep.fid,
            shared: self.shared.clone(),
            table: self.keys.clone(),
            eq: downcast_eq(&bind.eq, &self.shared)?,
            rep,
            qp: OnceLock::new(),
            cm: Mutex::new(EpCm {
                phase: Phase::Idle,
                sock: None,
                rbuf: Vec::new(),
                pending: Vec::new(),
                psn: rand::random::<u32>() & 0xFF_FFFF,
                local: None,
                peer: None,
                request: None,
            }),
            tx_size: info.limits.tx_size,
            rx_size: info.limits.rx_size,
            src: info.src_addr.as_ref().and_then(Address::as_inet),
            ended: OnceLock::new(),
        });
        let owner: Weak<dyn QpOwner> = Arc::downgrade(&inner) as Weak<dyn QpOwner>;
        let _ = inner.rep.owner.set(owner);
        if info.conn_handle().is_some() {
            let (sock, req) = take_request(info)?;
            let local = sock.local_addr()?;
            let dev = Device::get(ipv4_of(local)?)?;
            self.shared.add_device(&dev);
            let qpn = dev.create_qp(self.keys.clone(), inner.rep.clone())?;
            let _ = inner.qp.set((dev, qpn));
            let mut cm = inner.cm.lock();
            cm.local = Some(local);
            cm.peer = sock.peer_addr().ok();
            cm.sock = Some(sock);
            cm.phase = Phase::Accepting;
            cm.request = Some(req);
            drop(cm);
            self.shared.cm.lock().eps.push(Arc::downgrade(&inner));
        }
        Ok(Arc::new(SrEndpoint { inner }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A completion queue: the shared queue object over the fabric's progress.
pub(crate) type SrCq = ProviderCq<Shared>;
/// An event queue.
pub(crate) type SrEq = ProviderEq<Shared>;

/// A passive endpoint.
pub(crate) struct SrPep {
    fid: Fid,
    shared: Arc<Shared>,
}

impl PassiveEndpointOps for SrPep {
    fn fid(&self) -> Fid {
        self.fid
    }

    fn listen(&self) -> Result<()> {
        let mut cm = self.shared.cm.lock();
        let l = cm
            .listeners
            .get_mut(&self.fid.0)
            .ok_or_else(|| Error::new(ErrorKind::Shutdown, "passive endpoint is closed"))?;
        l.listening = true;
        Ok(())
    }

    fn local_addr(&self) -> Result<Address> {
        let cm = self.shared.cm.lock();
        let l = cm
            .listeners
            .get(&self.fid.0)
            .ok_or_else(|| Error::new(ErrorKind::Shutdown, "passive endpoint is closed"))?;
        Ok(Address::Inet(l.sock.local_addr()?))
    }

    fn reject(&self, request: &Info, data: &[u8]) -> Result<()> {
        let (mut sock, req) = take_request(request)?;
        let ip = sock
            .local_addr()
            .ok()
            .and_then(|a| ipv4_of(a).ok())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let msg = CmMsg {
            kind: Kind::Reject,
            qpn: 0,
            psn: 0,
            ip,
            mtu: req.mtu,
            data: data.to_vec(),
        };
        let r = write_all_nb(&mut sock, &msg.encode());
        debug!(fid = %self.fid, "rejected a connection request: {r:?}");
        let _ = sock.shutdown(Shutdown::Both);
        Ok(())
    }

    fn close(&self) {
        let mut cm = self.shared.cm.lock();
        cm.listeners.remove(&self.fid.0);
        let fid = self.fid.0;
        cm.half_open.retain(|h| h.listener != fid);
    }
}

impl Drop for SrPep {
    fn drop(&mut self) {
        self.close();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// Client: request sent, waiting for accept or reject.
    AwaitReply,
    /// Server: opened from a request, not yet accepted.
    Accepting,
    /// Server: accepted, waiting for the client's ready-to-use.
    AwaitRtu,
    Connected,
    Closed,
}

struct EpCm {
    phase: Phase,
    sock: Option<TcpStream>,
    rbuf: Vec<u8>,
    /// Receives posted before the QP exists.
    pending: Vec<RecvRequest>,
    psn: u32,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    request: Option<CmMsg>,
}

/// An endpoint's state, shared with the connection manager.
pub(crate) struct EpInner {
    fid: Fid,
    shared: Arc<Shared>,
    table: Arc<KeyMap>,
    rep: Arc<Reporting>,
    eq: Arc<EqQueue>,
    qp: OnceLock<(Arc<Device>, u32)>,
    cm: Mutex<EpCm>,
    tx_size: usize,
    rx_size: usize,
    /// Local address a client connects from (its IP selects the device).
    src: Option<SocketAddr>,
    /// Why the connection ended, once it has (set once: one `Shutdown` event).
    ended: OnceLock<ShutdownReason>,
}

fn not_connected(why: &str) -> Error {
    Error::new(ErrorKind::NotConnected, why.to_string())
}

fn qp_error(e: rc::QpError) -> Error {
    match e {
        rc::QpError::InvalidState { .. } => Error::new(ErrorKind::NotConnected, e.to_string()),
        _ => Error::invalid(e.to_string()),
    }
}

fn recv_segment(req: RecvRequest) -> Option<LocalSegment> {
    let len = req.len();
    if len == 0 {
        return None;
    }
    let mem: Arc<dyn LocalMemory> = Arc::new(OpMemory::segments(req.segments));
    Some(LocalSegment::new(mem, 0, len as u32))
}

impl QpOwner for EpInner {
    fn qp_failed(&self, reason: ShutdownReason) {
        let mut cm = self.cm.lock();
        self.end(&mut cm, reason, true);
    }
}

impl EpInner {
    fn mtu(&self) -> Mtu {
        self.shared.config.mtu
    }

    /// Pushes a connection event.
    fn event(&self, ev: Event) {
        self.eq.push(ev);
    }

    /// Tears the connection down: closes the CM socket, moves the QP to ERROR
    /// (outstanding work completes `Canceled`) and, with `remove`, frees the QP.
    fn teardown(&self, cm: &mut EpCm, remove: bool) {
        cm.phase = Phase::Closed;
        // First what the QP still has to send (ACKs held for an answer that will not
        // come): on the peer's side they then arrive before the CM socket's closure,
        // so a message this side received completes there as sent, not canceled.
        if let Some((dev, qpn)) = self.qp.get() {
            let _ = dev.with_qp(*qpn, |_| Ok(()));
        }
        if let Some(s) = cm.sock.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for r in std::mem::take(&mut cm.pending) {
            self.rep.rx_cq.push(Completion::error(
                r.context,
                CompFlags::MSG | CompFlags::RECV,
                fabric_core::CqError::new(
                    fabric_core::CqErrorKind::Canceled,
                    0,
                    "the endpoint closed before it connected",
                ),
            ));
        }
        if let Some((dev, qpn)) = self.qp.get() {
            dev.error_qp(*qpn, remove);
        }
    }

    /// Reads the CM socket: replies, ready-to-use, closure.
    fn cm_poll(&self) {
        let mut cm = self.cm.lock();
        let Some(sock) = cm.sock.as_mut() else {
            return;
        };
        // Why the TCP connection closed, if it did: an orderly closure is the peer's
        // shutdown (or exit), a reset or error a lost connection.
        let mut closed = None;
        let mut tmp = [0u8; 1024];
        let mut got = Vec::new();
        loop {
            match sock.read(&mut tmp) {
                Ok(0) => {
                    closed = Some(ShutdownReason::Peer);
                    break;
                }
                Ok(n) => got.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = Some(ShutdownReason::Lost);
                    break;
                }
            }
        }
        cm.rbuf.extend_from_slice(&got);
        loop {
            match CmMsg::decode(&cm.rbuf) {
                Ok(None) => break,
                Ok(Some((msg, n))) => {
                    cm.rbuf.drain(..n);
                    if msg.kind == Kind::Disconnect {
                        closed = Some(cm::peer_reason(msg.data.first().copied()));
                        break;
                    }
                    self.on_message(&mut cm, msg);
                }
                Err(why) => {
                    debug!(fid = %self.fid, "softroce CM protocol error: {why}");
                    closed = Some(ShutdownReason::Protocol);
                    break;
                }
            }
        }
        if let Some(reason) = closed.filter(|_| cm.sock.is_some()) {
            match cm.phase {
                Phase::AwaitReply => {
                    self.event(Event::Error {
                        fid: self.fid,
                        error: Error::new(
                            ErrorKind::ConnectionRefused,
                            "the peer closed the connection without accepting",
                        ),
                        data: Vec::new(),
                    });
                }
                Phase::AwaitRtu | Phase::Connected => {
                    debug!(fid = %self.fid, %reason, "softroce: the peer ended the connection");
                    // A NAK the peer sent before it said goodbye may wait in the
                    // device's socket: let it complete the operation it refused
                    // (with its error kind) before the rest is canceled.
                    if let Some((dev, _)) = self.qp.get() {
                        dev.progress(true);
                    }
                    self.end(&mut cm, reason, false);
                    return;
                }
                _ => {}
            }
            self.teardown(&mut cm, false);
        }
    }

    fn on_message(&self, cm: &mut EpCm, msg: CmMsg) {
        match (cm.phase, msg.kind) {
            (Phase::AwaitReply, Kind::Accept) => {
                let r = self.establish(cm.psn, &msg).and_then(|_| {
                    let (dev, qpn) = self.qp.get().ok_or_else(|| not_connected("no QP"))?;
                    let rtu = CmMsg {
                        kind: Kind::ReadyToUse,
                        qpn: *qpn,
                        psn: cm.psn,
                        ip: dev.ip(),
                        mtu: msg.mtu,
                        data: Vec::new(),
                    };
                    match cm.sock.as_mut() {
                        Some(s) => write_all_nb(s, &rtu.encode()).map_err(Error::from),
                        None => Err(not_connected("CM socket closed")),
                    }
                });
                match r {
                    Ok(()) => {
                        cm.phase = Phase::Connected;
                        debug!(fid = %self.fid, "softroce: connected");
                        self.event(Event::Connected {
                            fid: self.fid,
                            data: msg.data,
                        });
                    }
                    Err(e) => {
                        self.event(Event::Error {
                            fid: self.fid,
                            error: e.context("establishing the connection"),
                            data: Vec::new(),
                        });
                        self.teardown(cm, false);
                    }
                }
            }
            (Phase::AwaitReply, Kind::Reject) => {
                self.event(Event::Error {
                    fid: self.fid,
                    error: Error::new(
                        ErrorKind::ConnectionRefused,
                        "the peer rejected the connection",
                    ),
                    data: msg.data,
                });
                self.teardown(cm, false);
            }
            (Phase::AwaitRtu, Kind::ReadyToUse) => {
                cm.phase = Phase::Connected;
                debug!(fid = %self.fid, "softroce: connected (accepted)");
                self.event(Event::Connected {
                    fid: self.fid,
                    data: Vec::new(),
                });
            }
            (phase, kind) => {
                debug!(fid = %self.fid, ?phase, ?kind, "softroce: unexpected CM message ignored");
            }
        }
    }

    /// Moves the QP to RTS towards the peer described by `msg`.
    fn establish(&self, sq_psn: u32, msg: &CmMsg) -> Result<()> {
        let (dev, qpn) = self.qp.get().ok_or_else(|| not_connected("no QP"))?;
        let theirs = Mtu::from_bytes(u32::from(msg.mtu)).unwrap_or(Mtu::Mtu1024);
        let mtu = self.mtu().min(theirs);
        let rtr = dev.rtr(mtu, msg.qpn, msg.psn, msg.ip);
        // A fabric peer is a softroce device: it sends from port 4791.
        dev.connect_qp(
            *qpn,
            rtr,
            device::rts(sq_psn, self.shared.config.timeout),
            Some(crate::wire::frame::ROCE_UDP_PORT),
        )
    }

    /// Creates the QP on `dev` and posts the receives that waited for it.
    fn create_qp(&self, cm: &mut EpCm, dev: Arc<Device>) -> Result<()> {
        self.shared.add_device(&dev);
        let qpn = dev.create_qp(self.table.clone(), self.rep.clone())?;
        let pending = std::mem::take(&mut cm.pending);
        dev.with_qp(qpn, |slot| {
            for r in pending {
                let ctx = r.context;
                slot.post_recv(ctx, recv_segment(r)).map_err(qp_error)?;
            }
            Ok(())
        })?;
        let _ = self.qp.set((dev, qpn));
        Ok(())
    }

    /// Runs `f` on the connected QP.
    fn with_slot(&self, f: impl FnOnce(&mut QpSlot) -> Result<()>) -> Result<()> {
        let (dev, qpn) = self
            .qp
            .get()
            .ok_or_else(|| not_connected("the endpoint is not connected"))?;
        self.check_open()?;
        dev.with_qp(*qpn, |slot| match slot.state() {
            rc::QpState::Rts => f(slot),
            rc::QpState::Error => Err(self.ended_error()),
            _ => Err(not_connected("the endpoint is not connected yet")),
        })
    }

    /// Fails when the connection is known to have ended (rule: posts to an ended
    /// connection fail at the call).
    fn check_open(&self) -> Result<()> {
        match self.ended.get() {
            Some(_) => Err(self.ended_error()),
            None => Ok(()),
        }
    }

    /// The error of a post to an endpoint whose connection ended: `Shutdown` after
    /// this side's `shutdown()`, else `NotConnected`, with the reason.
    fn ended_error(&self) -> Error {
        match self.ended.get() {
            Some(ShutdownReason::Local) => Error::new(
                ErrorKind::Shutdown,
                "the endpoint was shut down (shutdown() on this side)",
            ),
            Some(r) => Error::new(
                ErrorKind::NotConnected,
                format!("the connection has ended: {r}"),
            ),
            None => not_connected("the connection has ended (its queue pair is in error)"),
        }
    }

    /// Ends an established or establishing connection once: tells the peer why
    /// (`tell_peer`), tears it down, and raises `Shutdown { reason }` if it was
    /// connected (or accepted). Later ends (the peer's closure after an access error,
    /// a local `shutdown()` after a loss) change nothing.
    fn end(&self, cm: &mut EpCm, reason: ShutdownReason, tell_peer: bool) {
        if cm.phase == Phase::Closed || self.ended.set(reason).is_err() {
            return;
        }
        let was = cm.phase;
        if tell_peer && matches!(was, Phase::AwaitRtu | Phase::Connected) {
            if let (Some(s), Some((dev, qpn))) = (cm.sock.as_mut(), self.qp.get()) {
                let bye = CmMsg {
                    kind: Kind::Disconnect,
                    qpn: *qpn,
                    psn: 0,
                    ip: dev.ip(),
                    mtu: 0,
                    data: vec![cm::reason_code(reason)],
                };
                let _ = write_all_nb(s, &bye.encode());
            }
        }
        debug!(fid = %self.fid, %reason, "softroce: connection ends");
        self.teardown(cm, false);
        if matches!(was, Phase::AwaitRtu | Phase::Connected) {
            self.event(Event::Shutdown {
                fid: self.fid,
                reason,
            });
        }
    }

    fn check_tx(&self, slot: &QpSlot) -> Result<()> {
        if slot.outstanding() >= self.tx_size {
            return Err(Error::new(
                ErrorKind::WouldBlock,
                format!("{} operations outstanding (tx_size)", self.tx_size),
            ));
        }
        Ok(())
    }
}

/// Posts the work requests of one operation, tracked as one completion.
fn post_op(
    slot: &mut QpSlot,
    context: u64,
    flags: CompFlags,
    len: usize,
    completion: bool,
    wrs: Vec<(SendOp, Option<LocalSegment>)>,
) -> Result<()> {
    let first = slot.track(context, flags, len, completion, wrs.len() as u32);
    for (i, (op, local)) in wrs.into_iter().enumerate() {
        if let Err(e) = slot.post_send(SendWr {
            wr_id: first + i as u64,
            op,
            local,
        }) {
            if i == 0 {
                slot.untrack(first);
                return Err(qp_error(e));
            }
            // Validated above: cannot fail after the first one was accepted.
            warn!("softroce: work request {i} of an operation refused: {e}");
        }
    }
    Ok(())
}

fn rkey(key: u64) -> u32 {
    // Keys are 32-bit; a wider one cannot be ours: send the never-issued key 0 so the
    // target refuses it (RemoteAccess).
    u32::try_from(key).unwrap_or(0)
}

fn op_memory(p: Payload) -> Arc<dyn LocalMemory> {
    Arc::new(match p {
        Payload::Inline(v) => OpMemory::Inline(v),
        Payload::Segments(s) => OpMemory::segments(s),
    })
}

/// An active endpoint.
pub(crate) struct SrEndpoint {
    inner: Arc<EpInner>,
}

impl CmOps for SrEndpoint {
    fn connect(&self, addr: &Address, data: &[u8]) -> Result<()> {
        let ep = &self.inner;
        let sa = addr.as_inet().ok_or_else(|| {
            Error::new(
                ErrorKind::AddressNotAvailable,
                format!("softroce connects to IPv4 addresses only, not {addr}"),
            )
        })?;
        ipv4_of(sa)?;
        let mut cm = ep.cm.lock();
        if cm.phase != Phase::Idle {
            return Err(Error::invalid(format!(
                "connect: the endpoint is {:?}, not idle",
                cm.phase
            )));
        }
        let src = ep.src.filter(|s| !s.ip().is_unspecified()).or_else(|| {
            let dest = ipv4_of(sa).ok()?;
            device::loopback_source(dest).map(|ip| SocketAddr::new(ip.into(), 0))
        });
        let connected = match src {
            Some(src) => {
                sys::connect_from(SocketAddr::new(src.ip(), 0), sa, Duration::from_secs(5))
            }
            None => TcpStream::connect_timeout(&sa, Duration::from_secs(5)),
        };
        let mut sock = match connected {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                ep.event(Event::Error {
                    fid: ep.fid,
                    error: Error::new(ErrorKind::ConnectionRefused, format!("connect {sa}: {e}")),
                    data: Vec::new(),
                });
                ep.teardown(&mut cm, false);
                return Ok(());
            }
            Err(e) => return Err(Error::from(e).context(format!("connect to {sa}"))),
        };
        let _ = sock.set_nodelay(true);
        let local = sock.local_addr()?;
        let dev = Device::get(ipv4_of(local)?)?;
        ep.create_qp(&mut cm, dev.clone())?;
        let (_, qpn) = ep.qp.get().ok_or_else(|| not_connected("no QP"))?;
        let req = CmMsg {
            kind: Kind::Request,
            qpn: *qpn,
            psn: cm.psn,
            ip: dev.ip(),
            mtu: ep.mtu().bytes() as u16,
            data: data.to_vec(),
        };
        write_all_nb(&mut sock, &req.encode())
            .map_err(|e| Error::from(e).context("sending the connection request"))?;
        sock.set_nonblocking(true)?;
        cm.local = Some(local);
        cm.peer = Some(sa);
        cm.sock = Some(sock);
        cm.phase = Phase::AwaitReply;
        drop(cm);
        ep.shared.cm.lock().eps.push(Arc::downgrade(&self.inner));
        Ok(())
    }

    fn accept(&self, data: &[u8]) -> Result<()> {
        let ep = &self.inner;
        let mut cm = ep.cm.lock();
        if cm.phase != Phase::Accepting {
            return Err(Error::invalid(format!(
                "accept: the endpoint is {:?}, not a pending request",
                cm.phase
            )));
        }
        let req = cm
            .request
            .take()
            .ok_or_else(|| Error::invalid("accept: no request"))?;
        ep.establish(cm.psn, &req)?;
        let (dev, qpn) = ep.qp.get().ok_or_else(|| not_connected("no QP"))?;
        let theirs = Mtu::from_bytes(u32::from(req.mtu)).unwrap_or(Mtu::Mtu1024);
        let rep = CmMsg {
            kind: Kind::Accept,
            qpn: *qpn,
            psn: cm.psn,
            ip: dev.ip(),
            mtu: ep.mtu().min(theirs).bytes() as u16,
            data: data.to_vec(),
        };
        let sent = match cm.sock.as_mut() {
            Some(s) => write_all_nb(s, &rep.encode()),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        };
        if let Err(e) = sent {
            ep.teardown(&mut cm, false);
            return Err(Error::new(
                ErrorKind::NotConnected,
                format!("the peer went away: {e}"),
            ));
        }
        cm.phase = Phase::AwaitRtu;
        Ok(())
    }

    fn shutdown(&self) -> Result<()> {
        let ep = &self.inner;
        let mut cm = ep.cm.lock();
        if cm.phase == Phase::Closed {
            return Ok(());
        }
        ep.end(&mut cm, ShutdownReason::Local, true);
        Ok(())
    }

    fn peer_addr(&self) -> Option<Address> {
        self.inner.cm.lock().peer.map(Address::Inet)
    }
}

impl MsgOps for SrEndpoint {
    fn post_send(&self, req: SendRequest) -> Result<()> {
        let ep = &self.inner;
        ep.with_slot(|slot| {
            ep.check_tx(slot)?;
            let len = req.payload.len();
            let local = (len > 0).then(|| LocalSegment::new(op_memory(req.payload), 0, len as u32));
            let op = match req.data {
                // cq_data_size is 4: the wrapper checked the value fits.
                Some(d) => SendOp::SendWithImm { imm: d as u32 },
                None => SendOp::Send,
            };
            post_op(
                slot,
                req.context,
                CompFlags::MSG | CompFlags::SEND,
                len,
                req.completion,
                vec![(op, local)],
            )
        })
    }

    fn post_recv(&self, req: RecvRequest) -> Result<()> {
        let ep = &self.inner;
        if ep.qp.get().is_none() {
            let mut cm = ep.cm.lock();
            if ep.qp.get().is_none() {
                if cm.phase == Phase::Closed {
                    return Err(not_connected("the endpoint is closed"));
                }
                if cm.pending.len() >= ep.rx_size {
                    return Err(Error::new(ErrorKind::WouldBlock, "rx_size receives posted"));
                }
                cm.pending.push(req);
                return Ok(());
            }
        }
        let (dev, qpn) = ep
            .qp
            .get()
            .ok_or_else(|| not_connected("the endpoint is not connected"))?;
        ep.check_open()?;
        dev.with_qp_quiet(*qpn, |slot| {
            if slot.state() == rc::QpState::Error {
                return Err(ep.ended_error());
            }
            if slot.posted_recvs() >= ep.rx_size {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!("{} receives posted (rx_size)", ep.rx_size),
                ));
            }
            let ctx = req.context;
            slot.post_recv(ctx, recv_segment(req)).map_err(qp_error)
        })
    }
}

impl RmaOps for SrEndpoint {
    fn post_write(&self, req: RmaRequest) -> Result<()> {
        let ep = &self.inner;
        ep.with_slot(|slot| {
            ep.check_tx(slot)?;
            let len = req.payload.len();
            let mem = op_memory(req.payload);
            let commit = req.flags.contains(OpFlags::COMMIT_COMPLETE);
            let mut wrs = Vec::with_capacity(req.remote.len() * if commit { 3 } else { 1 });
            if commit {
                // A zero-length persistent FLUSH first: the target refuses it for a
                // region not registered PMEM (NAK invalid request) before any byte is
                // written, and the writes behind it are then never executed.
                for r in &req.remote {
                    wrs.push((
                        SendOp::Flush {
                            remote_va: r.addr,
                            rkey: rkey(r.key),
                            len: 0,
                            placement: FlushPlacement::Persistent,
                        },
                        None,
                    ));
                }
            }
            let last = req.remote.len().saturating_sub(1);
            let mut off = 0u64;
            for (i, r) in req.remote.iter().enumerate() {
                let op = match req.data {
                    Some(d) if i == last => SendOp::WriteWithImm {
                        remote_va: r.addr,
                        rkey: rkey(r.key),
                        imm: d as u32,
                    },
                    _ => SendOp::Write {
                        remote_va: r.addr,
                        rkey: rkey(r.key),
                    },
                };
                wrs.push((op, Some(LocalSegment::new(mem.clone(), off, r.len as u32))));
                off += r.len as u64;
            }
            if commit {
                for r in &req.remote {
                    wrs.push((
                        SendOp::Flush {
                            remote_va: r.addr,
                            rkey: rkey(r.key),
                            len: r.len as u32,
                            placement: FlushPlacement::Persistent,
                        },
                        None,
                    ));
                }
            }
            let mut flags = CompFlags::RMA | CompFlags::WRITE;
            if commit {
                flags |= CompFlags::COMMIT;
            }
            post_op(slot, req.context, flags, len, req.completion, wrs)
        })
    }

    fn post_read(&self, req: RmaRequest) -> Result<()> {
        let ep = &self.inner;
        ep.with_slot(|slot| {
            ep.check_tx(slot)?;
            let len = req.payload.len();
            let mem = op_memory(req.payload);
            let mut off = 0u64;
            let mut wrs = Vec::with_capacity(req.remote.len());
            for r in &req.remote {
                wrs.push((
                    SendOp::Read {
                        remote_va: r.addr,
                        rkey: rkey(r.key),
                    },
                    Some(LocalSegment::new(mem.clone(), off, r.len as u32)),
                ));
                off += r.len as u64;
            }
            post_op(
                slot,
                req.context,
                CompFlags::RMA | CompFlags::READ,
                len,
                req.completion,
                wrs,
            )
        })
    }
}

impl EndpointOps for SrEndpoint {
    fn fid(&self) -> Fid {
        self.inner.fid
    }

    fn local_addr(&self) -> Option<Address> {
        self.inner.cm.lock().local.map(Address::Inet)
    }

    fn close(&self) {
        let ep = &self.inner;
        let mut cm = ep.cm.lock();
        if cm.phase == Phase::Closed && cm.sock.is_none() {
            if let Some((dev, qpn)) = ep.qp.get() {
                dev.error_qp(*qpn, true);
            }
            return;
        }
        ep.teardown(&mut cm, true);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn cm(&self) -> Option<&dyn CmOps> {
        Some(self)
    }

    fn msg(&self) -> Option<&dyn MsgOps> {
        Some(self)
    }

    fn rma(&self) -> Option<&dyn RmaOps> {
        Some(self)
    }
}

impl Drop for SrEndpoint {
    fn drop(&mut self) {
        self.close();
    }
}
