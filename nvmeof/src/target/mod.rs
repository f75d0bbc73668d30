//! An NVMe-oF target over any fabric provider, split as Linux nvmet is:
//!
//! * [`subsys`](self) – subsystems and namespaces ([`SubsystemConfig`],
//!   [`NamespaceConfig`]); [`backend`](self) – memory and file back ends ([`Backing`]);
//! * `ctrl` – controllers (dynamic IDs, properties, features, keep-alive, error log,
//!   SMART counters); `queue` – one thread per queue, from capsule to response;
//! * `fabrics_cmd`, `admin_cmd`, `io_cmd` – the command sets; `discovery` – the
//!   discovery log page;
//! * ports ([`PortConfig`], [`Port`]) listen with one fabric passive endpoint each.
//!
//! A port exports the subsystems its [`PortConfig::subsystems`] names (every
//! subsystem when the list is empty), and the discovery subsystem
//! (`nqn.2014-08.org.nvmexpress.discovery`) lists each port and subsystem a host may
//! connect to.

mod admin_cmd;
mod backend;
mod ctrl;
mod discovery;
mod fabrics_cmd;
mod io_cmd;
mod queue;
mod subsys;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use fabric::{
    Caps, ConnRequest, CqAttr, EndpointConfig, EpType, EqAttr, Event, EventQueue, Fabric, Hints,
    PassiveEndpoint, Progress,
};

pub use backend::Backing;
pub use ctrl::{MAX_IO_QUEUES, MAX_QUEUE_DEPTH, MAX_TRANSFER};
pub use subsys::{NamespaceConfig, SubsystemConfig, MAX_NSID};

use crate::error::{Error, Result};
use crate::transport::{self, Link, DEFAULT_INLINE_DATA, SQE_LEN};
use crate::wire::rdma_cm::{CmRejectStatus, CmRequest};
use ctrl::Controller;
use discovery::PortRecord;
use queue::TargetQueue;
use subsys::Subsystem;

/// Admin queue entries a host may ask for (as Linux's NVME_AQ_DEPTH).
const ADMIN_QUEUE_DEPTH: u16 = 32;

/// State shared by a target's ports and queues.
#[derive(Debug)]
pub(crate) struct Shared {
    subsystems: RwLock<Vec<Arc<Subsystem>>>,
    discovery: Arc<Subsystem>,
    controllers: Mutex<Vec<Arc<Controller>>>,
    next_cntlid: Mutex<u16>,
    ports: Mutex<Vec<PortRecord>>,
    genctr: AtomicU64,
    stop: AtomicBool,
    /// Queue threads still running.
    live_queues: AtomicUsize,
}

impl Shared {
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn ports(&self) -> Vec<PortRecord> {
        self.ports.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems
            .read()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn genctr(&self) -> u64 {
        self.genctr.load(Ordering::Acquire)
    }

    /// The subsystem named `nqn` (the discovery subsystem included), if port
    /// `portid` exports it (port 0: any subsystem, for the target's own use).
    pub(crate) fn subsystem(&self, nqn: &str, portid: u16) -> Option<Arc<Subsystem>> {
        if nqn == self.discovery.nqn {
            return Some(self.discovery.clone());
        }
        if portid != 0 && !self.port_exports(portid, nqn) {
            return None;
        }
        self.subsystems().into_iter().find(|s| s.nqn == nqn)
    }

    /// Whether port `portid` exports subsystem `nqn`.
    pub(crate) fn port_exports(&self, portid: u16, nqn: &str) -> bool {
        self.ports()
            .iter()
            .find(|p| p.portid == portid)
            .is_some_and(|p| p.exports(nqn))
    }

    /// A new controller with the next free ID (1 ..= 0xFFEF, as nvmet).
    pub(crate) fn new_controller(
        &self,
        subsys: Arc<Subsystem>,
        hostnqn: &str,
        hostid: [u8; 16],
        kato_ms: u32,
        inline_data: usize,
    ) -> Option<Arc<Controller>> {
        let mut ctrls = self.controllers.lock().ok()?;
        let mut next = self.next_cntlid.lock().ok()?;
        for _ in 0..0xFFEF {
            let id = *next;
            *next = if id >= 0xFFEF { 1 } else { id + 1 };
            let taken = ctrls
                .iter()
                .any(|c| c.cntlid == id && c.subsys.nqn == subsys.nqn);
            if !taken {
                let c = Arc::new(Controller::new(
                    id,
                    subsys,
                    hostnqn.into(),
                    hostid,
                    kato_ms,
                    inline_data,
                ));
                ctrls.push(c.clone());
                return Some(c);
            }
        }
        None
    }

    pub(crate) fn controller(&self, subnqn: &str, cntlid: u16) -> Option<Arc<Controller>> {
        let ctrls = self.controllers.lock().ok()?;
        ctrls
            .iter()
            .find(|c| c.cntlid == cntlid && c.subsys.nqn == subnqn && !c.is_dead())
            .cloned()
    }

    pub(crate) fn remove_controller(&self, ctrl: &Controller) {
        if let Ok(mut ctrls) = self.controllers.lock() {
            ctrls.retain(|c| !std::ptr::eq(c.as_ref(), ctrl));
        }
    }
}

/// Where a port listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Fabric provider (its memory keys must fit 32 bits).
    pub provider: String,
    /// Address to listen on.
    pub addr: String,
    /// Service (port number); "0" picks a free one, see [`Port::local_addr`].
    pub service: String,
    /// In-capsule data accepted per command, bytes.
    pub inline_data: usize,
    /// NQNs of the subsystems this port exports (as nvmetcli's port `subsystems`
    /// links); empty: every subsystem.
    pub subsystems: Vec<String>,
}

impl PortConfig {
    /// A port of `provider` on `addr`, service 0, with the default in-capsule size.
    pub fn new(provider: &str, addr: &str) -> PortConfig {
        PortConfig {
            provider: provider.into(),
            addr: addr.into(),
            service: "0".into(),
            inline_data: DEFAULT_INLINE_DATA,
            subsystems: Vec::new(),
        }
    }
}

/// A listening port; dropping it stops listening (established queues go on).
#[derive(Debug)]
pub struct Port {
    portid: u16,
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Port {
    /// The address the port listens on (with the chosen service).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The port ID discovery reports.
    pub fn id(&self) -> u16 {
        self.portid
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Ok(mut ports) = self.shared.ports.lock() {
            for p in ports.iter_mut().filter(|p| p.portid == self.portid) {
                p.alive = false;
            }
        }
        self.shared.genctr.fetch_add(1, Ordering::AcqRel);
    }
}

/// A controller as the target sees it (for tools and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    /// Subsystem NQN.
    pub subnqn: String,
    /// Controller ID.
    pub cntlid: u16,
    /// The host's NQN.
    pub hostnqn: String,
}

/// An NVMe-oF target: subsystems, namespaces and listening ports.
///
/// Dropping it stops every queue.
#[derive(Debug)]
pub struct Target {
    shared: Arc<Shared>,
}

impl Default for Target {
    fn default() -> Self {
        Self::new()
    }
}

impl Target {
    /// A target with only the discovery subsystem.
    pub fn new() -> Target {
        Target {
            shared: Arc::new(Shared {
                subsystems: RwLock::new(Vec::new()),
                discovery: Arc::new(Subsystem::discovery()),
                controllers: Mutex::new(Vec::new()),
                next_cntlid: Mutex::new(1),
                ports: Mutex::new(Vec::new()),
                genctr: AtomicU64::new(1),
                stop: AtomicBool::new(false),
                live_queues: AtomicUsize::new(0),
            }),
        }
    }

    /// Adds a subsystem with its namespaces (opening their back ends).
    pub fn add_subsystem(&self, cfg: &SubsystemConfig) -> Result<()> {
        let s = Subsystem::new(cfg)?;
        let mut all = self
            .shared
            .subsystems
            .write()
            .map_err(|_| Error::Config("poisoned".into()))?;
        if all.iter().any(|x| x.nqn == s.nqn) || s.nqn == self.shared.discovery.nqn {
            return Err(Error::Config(format!("subsystem {} exists", s.nqn)));
        }
        all.push(Arc::new(s));
        self.shared.genctr.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Starts listening on a port.
    pub fn add_port(&self, cfg: &PortConfig) -> Result<Port> {
        let hints = Hints::new()
            .caps(Caps::MSG | Caps::RMA)
            .ep_type(EpType::Msg)
            .provider(&cfg.provider)
            .node(&cfg.addr)
            .service(&cfg.service)
            .source(true)
            .progress(Progress::Manual)
            // Keyed SGL descriptors carry 32-bit keys: providers that can narrow theirs
            // (tcp) do; the others must have 4-byte keys already.
            .mr_key_size(4);
        let info = fabric::getinfo(&hints)
            .map_err(|e| Error::Fabric(e.into()))?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Config("getinfo gave no answer".into()))?;
        transport::check_keys(&info)?;
        let fab = Fabric::open(&info)?;
        let eq = fab.eq(EqAttr::default())?;
        let pep = fab.passive_endpoint(&info, &eq)?;
        pep.listen()?;
        let local = pep
            .local_addr()?
            .as_inet()
            .ok_or_else(|| Error::Config("listener has no IP address".into()))?;
        let portid = {
            let mut ports = self
                .shared
                .ports
                .lock()
                .map_err(|_| Error::Config("poisoned".into()))?;
            let portid = ports.len() as u16 + 1;
            ports.push(PortRecord {
                portid,
                provider: cfg.provider.clone(),
                traddr: local.ip().to_string(),
                trsvcid: local.port().to_string(),
                alive: true,
                subsystems: cfg.subsystems.clone(),
            });
            portid
        };
        self.shared.genctr.fetch_add(1, Ordering::AcqRel);
        let stop = Arc::new(AtomicBool::new(false));
        let listener = Listener {
            _fabric: fab,
            eq,
            pep,
            shared: self.shared.clone(),
            portid,
            inline_data: cfg.inline_data,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("nvmet-port{portid}"))
            .spawn(move || listener.run())
            .map_err(Error::Io)?;
        tracing::info!(%local, provider = %cfg.provider, "nvmeof target port {portid} listening");
        Ok(Port {
            portid,
            local,
            stop,
            thread: Some(thread),
            shared: self.shared.clone(),
        })
    }

    /// Live controllers.
    pub fn controllers(&self) -> Vec<ControllerInfo> {
        self.shared
            .controllers
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|c| !c.is_dead())
                    .map(|c| ControllerInfo {
                        subnqn: c.subsys.nqn.clone(),
                        cntlid: c.cntlid,
                        hostnqn: c.hostnqn.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn namespace(&self, subnqn: &str, nsid: u32) -> Result<Arc<subsys::Namespace>> {
        self.shared
            .subsystem(subnqn, 0)
            .and_then(|s| s.namespace(nsid))
            .ok_or_else(|| Error::Config(format!("no namespace {nsid} in {subnqn}")))
    }

    /// Reads a namespace's back end directly (bytes at `offset`).
    pub fn read_namespace(
        &self,
        subnqn: &str,
        nsid: u32,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.namespace(subnqn, nsid)?.store.read(offset, &mut buf)?;
        Ok(buf)
    }

    /// Writes a namespace's back end directly.
    pub fn write_namespace(&self, subnqn: &str, nsid: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.namespace(subnqn, nsid)?.store.write(offset, data)
    }

    /// Stops every queue and waits (at most two seconds) until their threads have
    /// closed their connections; also done on drop.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while self.shared.live_queues.load(Ordering::Acquire) > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A port's listening thread: connection requests become queues.
struct Listener {
    // The passive endpoint's fabric, alive as long as the listener.
    _fabric: Fabric,
    eq: EventQueue,
    pep: PassiveEndpoint,
    shared: Arc<Shared>,
    portid: u16,
    inline_data: usize,
    stop: Arc<AtomicBool>,
}

impl Listener {
    fn run(self) {
        while !self.stop.load(Ordering::Acquire) && !self.shared.stopping() {
            // Polled, not a sleeping read: a sleeping read waits on the provider's
            // descriptors, which softroce shares between every endpoint on the
            // address, so the listener would wake for every queue's packets.
            let ev = self.eq.read();
            if matches!(ev, Ok(None)) {
                std::thread::sleep(Duration::from_millis(5));
            }
            match ev {
                Ok(Some(Event::ConnRequest(req))) => {
                    if let Err(e) = self.accept(&req) {
                        tracing::warn!("port {}: connection request: {e}", self.portid);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("port {}: event queue: {e}", self.portid);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn accept(&self, req: &ConnRequest) -> Result<()> {
        let cm = match CmRequest::parse_private_data(&req.data) {
            Ok(cm) => cm,
            Err(status) => {
                self.pep.reject(req, &transport::cm_reject(status))?;
                return Ok(());
            }
        };
        let depth = cm.host_send_queue_entries();
        let limit = if cm.qid == 0 {
            ADMIN_QUEUE_DEPTH
        } else {
            MAX_QUEUE_DEPTH
        };
        if depth > u32::from(limit) || depth as usize > req.info.limits.rx_size {
            self.pep
                .reject(req, &transport::cm_reject(CmRejectStatus::InvalidHsqsize))?;
            return Ok(());
        }
        let depth = depth as u16;
        // Each queue gets a fabric (progress engine) of its own, so its thread sleeps
        // on its own connection only: sharing the port's engine woke every queue
        // thread (and the listener) on any queue's traffic.
        let fabric = Fabric::open(&req.info)?;
        let domain = fabric.domain(&req.info)?;
        let cq = domain.cq(CqAttr::default())?;
        let eq = fabric.eq(EqAttr::default())?;
        let ep = domain.endpoint(&req.info, EndpointConfig::new(&cq, &eq))?;
        let link = Link::new(
            &domain,
            ep,
            cq,
            eq,
            depth.into(),
            SQE_LEN + self.inline_data,
        )?;
        link.ep.accept(&transport::cm_accept(depth))?;
        let queue = TargetQueue::new(
            fabric,
            &domain,
            link,
            self.shared.clone(),
            self.portid,
            cm.qid,
            depth,
            self.inline_data,
        )?;
        let shared = self.shared.clone();
        shared.live_queues.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name(format!("nvmet-q{}", cm.qid))
            .spawn(move || {
                queue.run();
                shared.live_queues.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            self.shared.live_queues.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Io(e));
        }
        Ok(())
    }
}
