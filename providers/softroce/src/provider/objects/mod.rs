//! The provider objects behind fabric-core's wrappers: fabric, domain (the R_Key
//! table), completion and event queues, passive and active endpoints (their types and
//! the object glue are here), by concern:
//!
//! * [`progress`]: how the fabric's devices and connection manager are driven;
//! * [`connmgr`]: the connection manager (listeners, half-open connections, each
//!   endpoint's exchange, connect/accept/shutdown);
//! * [`datapath`]: posting on an endpoint's QP.

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
use crate::ibcm::Agent;
use crate::rc::{self, FlushPlacement, LocalMemory, LocalSegment, Mtu, SendOp, SendWr};
use fabric_core::prov::KeyMap;
use fabric_core::prov::{self, KeyedMr, Progress as _, ProviderCq, ProviderEq};
use fabric_core::wait::{ReadySet, WaitQueue};

mod connmgr;
mod datapath;

pub(crate) use connmgr::LEN_TRAILER;
mod progress;

type EqQueue = WaitQueue<Event>;

/// What a fabric shares with everything opened from it.
pub(crate) struct Shared {
    devices: RwLock<Vec<Arc<Device>>>,
    /// The IB CM agents of devices this fabric listens or connects on.
    agents: Mutex<Vec<Arc<Agent>>>,
    cm: Mutex<CmState>,
    auto: AtomicBool,
    tick: AtomicU32,
    config: Config,
}

struct CmState {
    listeners: HashMap<u64, CmListener>,
    /// Accepted connections whose request is still arriving: at most
    /// [`prov::HALF_OPEN_MAX`] (one more closes the oldest), each for at most
    /// [`prov::HALF_OPEN_AGE`].
    half_open: prov::HalfOpen<Incoming>,
    /// Endpoints with a CM socket, by fid. Their sockets are in `ready`, so the
    /// connection manager reads only those with something to say: an idle connection
    /// costs nothing per progress round or sleep (issue 11, item 8).
    eps: HashMap<u64, Weak<EpInner>>,
    ready: ReadySet,
    /// `eps.len()` after the last sweep of ended endpoints (amortized: a sweep runs
    /// when the map has doubled since).
    swept: usize,
}

impl CmState {
    fn new() -> Result<CmState> {
        Ok(CmState {
            listeners: HashMap::new(),
            half_open: prov::HalfOpen::default(),
            eps: HashMap::new(),
            ready: ReadySet::new()?,
            swept: 0,
        })
    }

    /// Watches an endpoint's CM socket.
    fn watch(&mut self, ep: &Arc<EpInner>, fd: RawFd) -> Result<()> {
        self.ready.add(fd, ep.fid.0)?;
        self.eps.insert(ep.fid.0, Arc::downgrade(ep));
        if self.eps.len() > 2 * self.swept + 64 {
            // Ended endpoints' sockets left the ready set when they closed; their
            // entries go here, in a sweep whose cost the doubling amortizes.
            self.eps.retain(|_, w| {
                w.upgrade()
                    .is_some_and(|ep| ep.cm.try_lock().is_none_or(|cm| cm.sock.is_some()))
            });
            self.swept = self.eps.len();
        }
        Ok(())
    }
}

struct CmListener {
    sock: TcpListener,
    info: Info,
    eq: Arc<EqQueue>,
    listening: bool,
    /// The same listener as an rdma_cm service over QP1 (a listener on a specific
    /// address; one on 0.0.0.0 has no device).
    ib: Option<Arc<connmgr::IbListen>>,
}

/// An accepted connection whose request is still arriving.
struct Incoming {
    sock: TcpStream,
    buf: Vec<u8>,
    listener: u64,
}

/// A connection request between the listener and the accepting endpoint, in the
/// request's [`prov::ConnToken`]: the TCP exchange's socket and request, or the IB CM
/// connection and the request's facts.
enum PendingRequest {
    Tcp(TcpStream, CmMsg),
    Ib(connmgr::IbLink, CmMsg),
}

fn take_request(info: &Info) -> Result<PendingRequest> {
    prov::ConnToken::<PendingRequest>::take(info, "softroce")
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

    fn add_agent(&self, a: &Arc<Agent>) {
        let mut v = self.agents.lock();
        if !v.iter().any(|x| Arc::ptr_eq(x, a)) {
            v.push(a.clone());
        }
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
            agents: Mutex::new(Vec::new()),
            cm: Mutex::new(CmState::new()?),
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
        let dev = if !ip.is_unspecified() {
            let dev = Device::get(ip)?;
            self.shared.add_device(&dev);
            Some(dev)
        } else {
            None
        };
        let sock = prov::bind_listener(addr)?;
        let fid = Fid::next();
        let port = sock.local_addr()?.port();
        debug!(%fid, addr = %sock.local_addr()?, "softroce passive endpoint bound");
        let ib = dev.map(|dev| {
            let agent = Agent::of(&dev);
            self.shared.add_agent(&agent);
            Arc::new(connmgr::IbListen {
                fid,
                port,
                info: info.clone(),
                eq: eq.clone(),
                agent,
            })
        });
        self.shared.cm.lock().listeners.insert(
            fid.0,
            CmListener {
                sock,
                info: info.clone(),
                eq,
                listening: false,
                ib,
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
                ib: None,
            }),
            tx_size: info.limits.tx_size,
            rx_size: info.limits.rx_size,
            src: info.src_addr.as_ref().and_then(Address::as_inet),
            ended: OnceLock::new(),
        });
        let owner: Weak<dyn QpOwner> = Arc::downgrade(&inner) as Weak<dyn QpOwner>;
        let _ = inner.rep.owner.set(owner);
        if info.conn_handle().is_some() {
            let (sock, req) = match take_request(info)? {
                PendingRequest::Tcp(sock, req) => (sock, req),
                PendingRequest::Ib(link, req) => {
                    inner.open_accepting_ib(info, link, req)?;
                    return Ok(Arc::new(SrEndpoint { inner }));
                }
            };
            let local = sock.local_addr()?;
            let dev = Device::get(ipv4_of(local)?)?;
            self.shared.add_device(&dev);
            let qpn = dev.create_qp(self.keys.clone(), inner.rep.clone())?;
            let _ = inner.qp.set((dev, qpn));
            let mut cm = inner.cm.lock();
            cm.local = Some(local);
            cm.peer = sock.peer_addr().ok();
            let fd = sock.as_raw_fd();
            cm.sock = Some(sock);
            cm.phase = Phase::Accepting;
            cm.request = Some(req);
            drop(cm);
            self.shared.cm.lock().watch(&inner, fd)?;
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
        if let Some(ib) = &l.ib {
            ib.listen()?;
        }
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
        let (mut sock, req) = match take_request(request)? {
            PendingRequest::Tcp(sock, req) => (sock, req),
            PendingRequest::Ib(link, _) => return link.reject(data),
        };
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
        if let Some(ib) = cm.listeners.remove(&self.fid.0).and_then(|l| l.ib) {
            ib.close();
        }
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
    /// The connection is managed over IB CM (QP1) rather than TCP.
    ib: Option<connmgr::IbLink>,
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

impl EpInner {}

/// An active endpoint.
pub(crate) struct SrEndpoint {
    inner: Arc<EpInner>,
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

    fn atomic(&self) -> Option<&dyn fabric_core::provider::AtomicOps> {
        Some(self)
    }
}

impl Drop for SrEndpoint {
    fn drop(&mut self) {
        self.close();
    }
}
