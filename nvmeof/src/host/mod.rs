//! An NVMe-oF host over any fabric provider: discovery, controller bring-up
//! (Connect, Property Get CAP, Property Set CC.EN, wait for CSTS.RDY, Identify), I/O
//! queues, keep-alive, and a block API ([`block`](self)).

mod block;
mod queue;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use block::{IoFuture, IoRequest, NamespaceInfo};
pub use queue::{check, Data, HostQueue, MAX_HOST_TRANSFER};

use crate::error::{Error, Result};
use crate::wire::fabrics::{
    ConnectCommand, ConnectData, ConnectResponse, FabricsCommand, PropertyGetCommand,
    PropertySetCommand, PropertySize,
};
use crate::wire::identify::{
    Cns, IdentifyCommand, IdentifyController, IdentifyNamespace, NamespaceIdDescriptor,
    NamespaceList, IDENTIFY_DATA_LEN,
};
use crate::wire::log::{
    DiscoveryLog, DiscoveryLogEntry, DiscoveryLogHeader, GetLogPage, LogPageId, SmartLog,
};
use crate::wire::opcodes::{AdminOpcode, FeatureId, NumberOfQueues};
use crate::wire::properties::{Cap, Cc, Csts, CAP, CC, CSTS};
use crate::wire::text::Nqn;
use crate::wire::{CqeRepr, KeyedSgl, SglRepr, Sqe, SqeRepr, StatusContext};

/// Where a target listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportAddr {
    /// Fabric provider.
    pub provider: String,
    /// Target address.
    pub addr: String,
    /// Service (port).
    pub service: String,
}

impl TransportAddr {
    /// An address of `provider`.
    pub fn new(provider: &str, addr: &str, service: impl ToString) -> TransportAddr {
        TransportAddr {
            provider: provider.into(),
            addr: addr.into(),
            service: service.to_string(),
        }
    }

    /// The address a discovery log entry gives, reached with `provider`.
    pub fn from_entry(provider: &str, e: &DiscoveryLogEntry) -> TransportAddr {
        TransportAddr::new(provider, e.traddr.as_str(), e.trsvcid.as_str())
    }
}

/// How a host connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Keep-alive timeout asked for, ms (0: none).
    pub kato_ms: u32,
    /// Send Keep Alive commands (every KATO / 2) from a thread.
    pub keep_alive: bool,
    /// I/O queues to ask for.
    pub io_queues: u16,
    /// Entries per I/O queue.
    pub queue_depth: u16,
    /// How long to wait for connections and responses.
    pub timeout: Duration,
    /// Local address to connect from (softroce picks its device by it).
    pub src_ip: Option<IpAddr>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001".into(),
            hostid: [0x42; 16],
            kato_ms: 5000,
            keep_alive: true,
            io_queues: 1,
            queue_depth: 32,
            timeout: Duration::from_secs(10),
            src_ip: None,
        }
    }
}

const ADMIN_DEPTH: u16 = 32;

/// A controller the host is connected to.
pub struct Controller {
    admin: Arc<Mutex<HostQueue>>,
    io: Vec<Mutex<HostQueue>>,
    cntlid: u16,
    cap: Cap,
    identify: IdentifyController,
    subnqn: String,
    addr: TransportAddr,
    cfg: HostConfig,
    next_io: AtomicUsize,
    ka_stop: Arc<AtomicBool>,
    ka_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("subnqn", &self.subnqn)
            .field("cntlid", &self.cntlid)
            .field("io_queues", &self.io.len())
            .finish()
    }
}

fn lock(q: &Mutex<HostQueue>) -> MutexGuard<'_, HostQueue> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Connect command of queue `qid` (`sqsize` 0's based, `kato` ms), its 1024
/// bytes of Connect data described by a keyed SGL (address and key are filled in
/// when the queue submits it).
///
/// Keyed, never in-capsule: Linux nvmet-rdma posts receive buffers of exactly one
/// 64-byte SQE on the admin queue (in-capsule data only on I/O queues, up to IOCCSZ),
/// and a 1088-byte capsule there overruns the receive (kernel rxe completes it with
/// "local QP operation error" and the queue dies). The Linux host sends the admin
/// queue's Connect data by keyed SGL, which every target must accept.
pub(crate) fn connect_command(qid: u16, sqsize: u16, kato: u32) -> Result<SqeRepr> {
    let cmd = FabricsCommand::Connect(ConnectCommand {
        cid: 0,
        sgl: SglRepr::Keyed(KeyedSgl::new(0, ConnectData::LEN as u32, 0, false)?),
        qid,
        sqsize,
        cattr: 0,
        kato,
    });
    let mut sqe = [0u8; 64];
    cmd.emit(&mut Sqe::new_checked(&mut sqe[..])?);
    Ok(SqeRepr::parse(&Sqe::new_checked(&sqe[..])?)?)
}

/// Sends a Fabrics Connect on `q` and returns the controller ID.
fn fabrics_connect(q: &mut HostQueue, cfg: &HostConfig, subnqn: &str, cntlid: u16) -> Result<u16> {
    let kato = if q.qid() == 0 { cfg.kato_ms } else { 0 };
    let sqe = connect_command(q.qid(), q.depth() - 1, kato)?;
    let mut data = [0u8; ConnectData::LEN];
    let bad = |what: &str| Error::Config(format!("{what} is not a valid NQN"));
    ConnectData {
        hostid: cfg.hostid,
        cntlid,
        subnqn: Nqn::new(subnqn).map_err(|_| bad(subnqn))?,
        hostnqn: Nqn::new(&cfg.hostnqn).map_err(|_| bad(&cfg.hostnqn))?,
    }
    .emit(&mut data)?;
    let (cqe, _) = q.execute_keyed(sqe, &data, StatusContext::Fabrics)?;
    Ok(ConnectResponse::from_dw0(cqe.dw0).cntlid)
}

fn property_get(q: &mut HostQueue, offset: u32, size: PropertySize) -> Result<u64> {
    let bytes = FabricsCommand::PropertyGet(PropertyGetCommand {
        cid: 0,
        size,
        offset,
    })
    .to_bytes();
    let cqe = q.execute_raw(&with_null_sgl(bytes))?;
    check(&cqe, StatusContext::Fabrics)?;
    Ok(cqe.result())
}

fn property_set(q: &mut HostQueue, offset: u32, value: u64) -> Result<()> {
    let bytes = FabricsCommand::PropertySet(PropertySetCommand {
        cid: 0,
        size: PropertySize::Four,
        offset,
        value,
    })
    .to_bytes();
    let cqe = q.execute_raw(&with_null_sgl(bytes))?;
    check(&cqe, StatusContext::Fabrics)
}

/// A command without data carries a keyed SGL of length 0, as Linux hosts send.
fn with_null_sgl(mut sqe: [u8; 64]) -> [u8; 64] {
    sqe[24..40].fill(0);
    sqe[39] = 0x40;
    sqe
}

impl Controller {
    /// Connects to subsystem `subnqn` at `addr`: admin queue bring-up, Identify, the
    /// number of queues, I/O queues and the keep-alive thread.
    pub fn connect(addr: &TransportAddr, subnqn: &str, cfg: &HostConfig) -> Result<Controller> {
        let mut admin = HostQueue::connect(addr, cfg, 0, ADMIN_DEPTH, 0xFFFF)?;
        let cntlid = fabrics_connect(&mut admin, cfg, subnqn, ConnectData::DYNAMIC_CNTLID)?;
        let cap = Cap(property_get(&mut admin, CAP, PropertySize::Eight)?);
        let cc = Cc(0).with_iosqes(6).with_iocqes(4).with_en(true);
        property_set(&mut admin, CC, cc.0.into())?;
        let deadline = Instant::now() + Duration::from_millis(500 * u64::from(cap.to().max(1)));
        loop {
            let csts = Csts(property_get(&mut admin, CSTS, PropertySize::Four)? as u32);
            if csts.cfs() {
                return Err(Error::Protocol(
                    "controller fatal status after enable".into(),
                ));
            }
            if csts.rdy() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout("CSTS.RDY after CC.EN".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut page = vec![0u8; IDENTIFY_DATA_LEN];
        let mut sqe = SqeRepr {
            opcode: AdminOpcode::Identify.into(),
            ..Default::default()
        };
        IdentifyCommand {
            cns: Cns::Controller,
            ..Default::default()
        }
        .apply(&mut sqe);
        let (_, data) = admin.execute(sqe, Data::In(IDENTIFY_DATA_LEN), StatusContext::Admin)?;
        page.copy_from_slice(&data);
        let identify = IdentifyController::parse(&page)?;
        let discovery = subnqn == Nqn::DISCOVERY;
        let mut io = Vec::new();
        if !discovery && cfg.io_queues > 0 {
            let mut sqe = SqeRepr {
                opcode: AdminOpcode::SetFeatures.into(),
                ..Default::default()
            };
            sqe.cdw10_15[0] = u8::from(FeatureId::NumberOfQueues).into();
            let want = cfg.io_queues - 1;
            sqe.cdw10_15[1] = NumberOfQueues {
                nsqr: want,
                ncqr: want,
            }
            .to_dword();
            let (cqe, _) = admin.execute(sqe, Data::None, StatusContext::Admin)?;
            let granted = NumberOfQueues::from_dword(cqe.dw0);
            let n = granted
                .nsqr
                .min(granted.ncqr)
                .saturating_add(1)
                .min(cfg.io_queues);
            let depth = cfg.queue_depth.min(cap.mqes().saturating_add(1));
            let inline = identify.inline_data_size() as usize;
            for qid in 1..=n {
                let mut q = HostQueue::connect(addr, cfg, qid, depth, cntlid)?;
                fabrics_connect(&mut q, cfg, subnqn, cntlid)?;
                q.set_inline_max(inline);
                io.push(Mutex::new(q));
            }
        }
        let admin = Arc::new(Mutex::new(admin));
        let ka_stop = Arc::new(AtomicBool::new(false));
        let ka_thread = if cfg.keep_alive && cfg.kato_ms > 0 {
            let (admin, stop) = (admin.clone(), ka_stop.clone());
            let period = Duration::from_millis(u64::from(cfg.kato_ms / 2).max(50));
            Some(
                std::thread::Builder::new()
                    .name("nvme-keepalive".into())
                    .spawn(move || keep_alive_loop(&admin, &stop, period))
                    .map_err(Error::Io)?,
            )
        } else {
            None
        };
        Ok(Controller {
            admin,
            io,
            cntlid,
            cap,
            identify,
            subnqn: subnqn.into(),
            addr: addr.clone(),
            cfg: cfg.clone(),
            next_io: AtomicUsize::new(0),
            ka_stop,
            ka_thread,
        })
    }

    /// Connects again after the connection was lost (a target restart, a network
    /// outage): closes what is left of the old queues, then repeats the whole
    /// bring-up against the same address and subsystem with the same configuration,
    /// retrying until [`HostConfig::timeout`] passes. The new association may have
    /// another controller ID ([`cntlid`](Self::cntlid)).
    ///
    /// Commands outstanding when the connection was lost are not retried: each one
    /// failed with [`Error::Disconnected`] (or [`Error::Timeout`] when no end of the
    /// connection was reported in time), and whether it took effect on the target is
    /// unknown, as with a lost NVMe-oF association; the caller resubmits what must be.
    pub fn reconnect(&mut self) -> Result<()> {
        self.stop_keep_alive();
        for q in &self.io {
            lock(q).disconnect();
        }
        self.admin_queue().disconnect();
        let deadline = Instant::now() + self.cfg.timeout;
        let mut wait = Duration::from_millis(20);
        loop {
            match Controller::connect(&self.addr, &self.subnqn, &self.cfg) {
                Ok(fresh) => {
                    *self = fresh;
                    return Ok(());
                }
                Err(e) if Instant::now() + wait >= deadline => return Err(e),
                Err(e) => {
                    tracing::debug!("reconnect to {}: {e}; retrying", self.subnqn);
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// Controller ID the target assigned.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// CAP as read at bring-up.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// Identify Controller data read at bring-up.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    /// Number of I/O queues connected.
    pub fn io_queue_count(&self) -> usize {
        self.io.len()
    }

    /// The admin queue (for commands this API does not wrap).
    pub fn admin_queue(&self) -> MutexGuard<'_, HostQueue> {
        lock(&self.admin)
    }

    /// I/O queue `index` (0-based; QID `index + 1`).
    pub fn io_queue(&self, index: usize) -> Result<MutexGuard<'_, HostQueue>> {
        self.io
            .get(index)
            .map(lock)
            .ok_or_else(|| Error::Config(format!("no I/O queue {index}")))
    }

    pub(crate) fn any_io_queue(&self) -> Result<MutexGuard<'_, HostQueue>> {
        if self.io.is_empty() {
            return Err(Error::Config("the controller has no I/O queues".into()));
        }
        let i = self.next_io.fetch_add(1, Ordering::Relaxed) % self.io.len();
        self.io_queue(i)
    }

    /// An admin command; returns its completion and data.
    pub fn admin(&self, sqe: SqeRepr, data: Data<'_>) -> Result<(CqeRepr, Vec<u8>)> {
        self.admin_queue().execute(sqe, data, StatusContext::Admin)
    }

    /// Property Get.
    pub fn property_get(&self, offset: u32, size: PropertySize) -> Result<u64> {
        property_get(&mut self.admin_queue(), offset, size)
    }

    /// Property Set (4 bytes).
    pub fn property_set(&self, offset: u32, value: u32) -> Result<()> {
        property_set(&mut self.admin_queue(), offset, value.into())
    }

    fn identify_page(&self, cns: Cns, nsid: u32) -> Result<Vec<u8>> {
        let mut sqe = SqeRepr {
            opcode: AdminOpcode::Identify.into(),
            nsid,
            ..Default::default()
        };
        IdentifyCommand {
            cns,
            ..Default::default()
        }
        .apply(&mut sqe);
        Ok(self.admin(sqe, Data::In(IDENTIFY_DATA_LEN))?.1)
    }

    /// Identify Namespace.
    pub fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace> {
        Ok(IdentifyNamespace::parse(
            &self.identify_page(Cns::Namespace, nsid)?,
        )?)
    }

    /// Active namespace IDs (Identify CNS 2 from NSID 0).
    pub fn active_namespaces(&self) -> Result<Vec<u32>> {
        let list = NamespaceList::parse(&self.identify_page(Cns::ActiveNamespaceList, 0)?)?;
        Ok(list.nsids().to_vec())
    }

    /// Namespace identification descriptors.
    pub fn namespace_descriptors(&self, nsid: u32) -> Result<Vec<NamespaceIdDescriptor>> {
        Ok(NamespaceIdDescriptor::parse_list(
            &self.identify_page(Cns::NamespaceIdDescriptors, nsid)?,
        )?)
    }

    /// Get Log Page: `len` bytes from `offset`.
    pub fn get_log_page(
        &self,
        lid: LogPageId,
        nsid: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>> {
        let mut sqe = SqeRepr {
            opcode: AdminOpcode::GetLogPage.into(),
            nsid,
            ..Default::default()
        };
        GetLogPage::for_bytes(lid, offset, len).apply(&mut sqe);
        Ok(self.admin(sqe, Data::In(len as usize))?.1)
    }

    /// The SMART / health log.
    pub fn smart_log(&self) -> Result<SmartLog> {
        Ok(SmartLog::parse(&self.get_log_page(
            LogPageId::SmartHealth,
            0xFFFF_FFFF,
            0,
            512,
        )?)?)
    }

    /// The discovery log (on a discovery controller): header, then every entry.
    pub fn discovery_log(&self) -> Result<DiscoveryLog> {
        let head = self.get_log_page(LogPageId::Discovery, 0, 0, DiscoveryLogHeader::LEN as u32)?;
        let header = DiscoveryLogHeader::parse(&head)?;
        let total = DiscoveryLogHeader::LEN as u64 + header.numrec * DiscoveryLogEntry::LEN as u64;
        let mut page = Vec::new();
        while (page.len() as u64) < total {
            let n = (total - page.len() as u64).min(MAX_HOST_TRANSFER as u64) as u32;
            page.extend(self.get_log_page(LogPageId::Discovery, 0, page.len() as u64, n)?);
        }
        Ok(DiscoveryLog::parse(&page)?)
    }

    /// Get Features: DW0 of the completion.
    pub fn get_features(&self, fid: FeatureId) -> Result<u32> {
        let mut sqe = SqeRepr {
            opcode: AdminOpcode::GetFeatures.into(),
            ..Default::default()
        };
        sqe.cdw10_15[0] = u8::from(fid).into();
        Ok(self.admin(sqe, Data::None)?.0.dw0)
    }

    /// Set Features with CDW11 `value`: DW0 of the completion.
    pub fn set_features(&self, fid: FeatureId, value: u32) -> Result<u32> {
        let mut sqe = SqeRepr {
            opcode: AdminOpcode::SetFeatures.into(),
            ..Default::default()
        };
        sqe.cdw10_15[0] = u8::from(fid).into();
        sqe.cdw10_15[1] = value;
        Ok(self.admin(sqe, Data::None)?.0.dw0)
    }

    /// One Keep Alive command.
    pub fn keep_alive(&self) -> Result<()> {
        keep_alive(&self.admin)
    }

    /// Stops the keep-alive thread, asks for a normal shutdown (CC.SHN) and
    /// disconnects every queue.
    pub fn disconnect(mut self) -> Result<()> {
        self.stop_keep_alive();
        let result = (|| {
            let cc = Cc(self.property_get(CC, PropertySize::Four)? as u32).with_shn(1);
            self.property_set(CC, cc.0)
        })();
        for q in &self.io {
            lock(q).disconnect();
        }
        self.admin_queue().disconnect();
        result
    }

    fn stop_keep_alive(&mut self) {
        self.ka_stop.store(true, Ordering::Release);
        if let Some(t) = self.ka_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop_keep_alive();
    }
}

fn keep_alive(admin: &Mutex<HostQueue>) -> Result<()> {
    let sqe = SqeRepr {
        opcode: AdminOpcode::KeepAlive.into(),
        ..Default::default()
    };
    lock(admin).execute(sqe, Data::None, StatusContext::Admin)?;
    Ok(())
}

fn keep_alive_loop(admin: &Mutex<HostQueue>, stop: &AtomicBool, period: Duration) {
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + period;
        if let Err(e) = keep_alive(admin) {
            tracing::warn!("keep alive: {e}");
            return;
        }
    }
}

/// Connects to the discovery controller at `addr` and returns its log entries.
pub fn discover(addr: &TransportAddr, cfg: &HostConfig) -> Result<Vec<DiscoveryLogEntry>> {
    let cfg = HostConfig {
        keep_alive: false,
        ..cfg.clone()
    };
    let ctrl = Controller::connect(addr, Nqn::DISCOVERY, &cfg)?;
    let log = ctrl.discovery_log();
    let _ = ctrl.disconnect();
    Ok(log?.entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Connect capsule is a bare 64-byte SQE whose keyed SGL describes the 1024
    /// bytes of Connect data (Linux nvmet-rdma's admin queue receives no more).
    #[test]
    fn connect_data_goes_by_keyed_sgl() {
        for (qid, sqsize, kato) in [(0u16, 31u16, 5000u32), (1, 127, 0)] {
            let b = connect_command(qid, sqsize, kato)
                .expect("connect")
                .to_bytes();
            assert_eq!(b.len(), 64);
            assert_eq!(b[0], 0x7F, "Fabrics opcode");
            assert_eq!(b[1] & 0xC0, 0x40, "PSDT: SGL");
            assert_eq!(b[4], 0x01, "FCTYPE Connect");
            assert_eq!(&b[32..35], &[0x00, 0x04, 0x00], "keyed length 1024");
            assert_eq!(b[39], 0x40, "keyed data block descriptor, address subtype");
            assert_eq!(u16::from_le_bytes([b[40], b[41]]), 0, "RECFMT");
            assert_eq!(u16::from_le_bytes([b[42], b[43]]), qid);
            assert_eq!(u16::from_le_bytes([b[44], b[45]]), sqsize);
            assert_eq!(u32::from_le_bytes([b[48], b[49], b[50], b[51]]), kato);
        }
    }
}
