//! The provider objects over libibverbs and librdmacm: fabric (one RDMA CM event
//! channel), domain (a device context's protection domain and the table of posted
//! operations), completion queues (an `ibv_cq` with a completion channel), event
//! queues, passive and active endpoints (an `rdma_cm_id` and its RC queue pair).

use std::any::Any;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use fabric_core::prov::{self, ProviderCq, ProviderEq};
use fabric_core::provider::{
    CmOps, CqOps, DomainOps, EndpointBinding, EndpointOps, EqOps, FabricOps, MrOps, MsgOps,
    PassiveEndpointOps, RmaOps,
};
use fabric_core::wait::{poll_readable, WaitQueue};
use fabric_core::{
    Access, Address, CompFlags, Completion, ConnHandle, ConnRequest, CqAttr, CqError, EqAttr,
    Error, ErrorKind, Event, Fid, HeapMemory, Info, MemoryBacking, MrFlags, OpFlags, Payload,
    Progress, RecvRequest, Result, RmaRequest, Segment, Segments, SendRequest, ShutdownReason,
};
use parking_lot::Mutex;
use rdma_sys::*;
use tracing::debug;

use crate::mapping::{self, wc};
use crate::sys::{self, CmId, Cq, Ctx, EventChannel, Mr, Pd};
use crate::wr::{self, RdmaOp, Sge};

/// Address and route resolution timeout.
const RESOLVE_MS: i32 = 2000;
/// Longest sleep of a blocking read between progress passes.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Manual-progress CQ reads between two looks at the CM event channel.
const CM_EVERY: u64 = 64;
/// IB min RNR NAK timer code 12: 0.64 ms (the CM default, code 0, is 655 ms).
const MIN_RNR_TIMER: u8 = 12;

fn os_err(what: &str) -> Error {
    Error::from(std::io::Error::last_os_error()).context(what)
}

fn not_connected(why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::NotConnected, why)
}

/// Where a CM event goes.
enum Target {
    Ep(Weak<EpInner>),
    Pep(Weak<PepInner>),
}

/// What a fabric shares with its objects: the CM event channel and the routing of
/// its events, and the progress of every completion queue. It is the fabric's
/// progress engine ([`prov::Progress`]): the completion and event queues are the shared
/// layer's [`ProviderCq`]/[`ProviderEq`] over it, its auto-progress thread
/// [`prov::start_progress_thread`].
pub(crate) struct Shared {
    channel: EventChannel,
    cm_lock: Mutex<()>,
    targets: Mutex<HashMap<u64, Target>>,
    next_key: AtomicU64,
    /// The device side of each completion queue (its `ibv_cq`), found by the
    /// [`WaitQueue`] the [`ProviderCq`] reads; an entry goes when nothing but this table
    /// holds it and its queue (the `VCq` and every endpoint bound to it are gone).
    cqs: Mutex<Vec<Arc<CqInner>>>,
    auto: AtomicBool,
    tick: AtomicU64,
}

impl Shared {
    fn key(&self, t: Target) -> u64 {
        let k = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.targets.lock().insert(k, t);
        k
    }

    /// Manual progress: CM events always when `full`, else every CM_EVERY-th call;
    /// every completion queue.
    fn progress(&self, full: bool) {
        if full
            || self
                .tick
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(CM_EVERY)
        {
            self.cm_progress();
        }
    }

    fn progress_all(&self) {
        self.cm_progress();
        self.poll_cqs();
    }

    /// Polls every completion queue; drops the table's entries nobody else holds.
    fn poll_cqs(&self) {
        for cq in self.live_cqs() {
            cq.poll();
        }
    }

    /// The completion queues still in use (pruning the others).
    fn live_cqs(&self) -> Vec<Arc<CqInner>> {
        let mut t = self.cqs.lock();
        // Only the table holds the entry and only the entry holds the queue: the
        // ProviderCq and every endpoint bound to it are gone, and since both counts
        // only grow through those holders, nobody can take it back.
        t.retain(|c| Arc::strong_count(c) > 1 || Arc::strong_count(&c.queue) > 1);
        t.clone()
    }

    /// The device side of the completion queue `cq` (a [`ProviderCq`] of this fabric).
    fn cq_of(self: &Arc<Self>, cq: &Arc<dyn CqOps>) -> Result<Arc<CqInner>> {
        let q = ProviderCq::queue_of(cq, self, "verbs")?;
        self.cqs
            .lock()
            .iter()
            .find(|c| Arc::ptr_eq(&c.queue, &q))
            .cloned()
            .ok_or_else(|| Error::invalid("the completion queue was not opened by a verbs domain"))
    }

    /// Sleeps until a CM event, a completion notification (CQs are armed first), the
    /// queue's eventfd, or the deadline.
    fn sleep(&self, queue_fd: Option<RawFd>, deadline: Option<Instant>) {
        let mut fds = vec![self.channel.fd()];
        let cqs = self.live_cqs();
        for cq in &cqs {
            cq.cq.arm();
            fds.push(cq.cq.fd());
        }
        // Completions that arrived before arming raise no event: poll once more.
        if cqs.iter().any(|c| c.poll() > 0) {
            return;
        }
        fds.extend(queue_fd);
        let mut t = MAX_SLEEP;
        if let Some(d) = deadline {
            t = t.min(d.saturating_duration_since(Instant::now()));
        }
        poll_readable(&fds, Some(t));
        for cq in &cqs {
            cq.cq.drain_events();
        }
    }

    /// Reads and dispatches every pending RDMA CM event.
    fn cm_progress(&self) {
        let Some(_g) = self.cm_lock.try_lock() else {
            return;
        };
        loop {
            let mut ev: *mut rdma_cm_event = ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; ev is a valid out-pointer.
            if unsafe { rdma_get_cm_event(self.channel.0, &mut ev) } != 0 {
                return;
            }
            // SAFETY: ev is a live event until acked; everything needed is copied out
            // before rdma_ack_cm_event. The private data pointer is valid for its
            // length while the event lives.
            let (kind, status, id, key, listen_key, data) = unsafe {
                let e = &*ev;
                let conn = e.param.conn;
                let data = if conn.private_data.is_null() || conn.private_data_len == 0 {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(
                        conn.private_data.cast::<u8>(),
                        conn.private_data_len as usize,
                    )
                    .to_vec()
                };
                let key = if e.id.is_null() {
                    0
                } else {
                    (*e.id).context as usize as u64
                };
                let lkey = if e.listen_id.is_null() {
                    0
                } else {
                    (*e.listen_id).context as usize as u64
                };
                (e.event, e.status, e.id, key, lkey, data)
            };
            // SAFETY: acknowledges the event read above, exactly once.
            unsafe { rdma_ack_cm_event(ev) };
            debug!(
                "verbs: CM {} status {status} key {key}",
                sys::event_str(kind)
            );
            if kind == rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST {
                let pep = match self.targets.lock().get(&listen_key) {
                    Some(Target::Pep(p)) => p.upgrade(),
                    _ => None,
                };
                // The new id is ours: it is destroyed (rejecting the request) unless
                // an endpoint accepts it.
                let id = CmId(id);
                id.set_key(0);
                match pep {
                    Some(p) => p.on_request(id, &data),
                    None => {
                        // SAFETY: id is a live, unaccepted request id.
                        unsafe { rdma_reject(id.0, ptr::null(), 0) };
                    }
                }
                continue;
            }
            let ep = match self.targets.lock().get(&key) {
                Some(Target::Ep(e)) => e.upgrade(),
                _ => None,
            };
            if let Some(ep) = ep {
                ep.on_cm_event(kind, status, &data);
            }
        }
    }
}

impl prov::Progress for Shared {
    /// A completion-queue read: CM events every CM_EVERY-th call, every CQ.
    fn poll(&self) {
        self.progress(false);
        self.poll_cqs();
    }
    fn poll_full(&self) {
        self.progress_all();
    }
    fn sleep(&self, queue_fd: Option<RawFd>, deadline: Option<Instant>) {
        Shared::sleep(self, queue_fd, deadline);
    }
    fn start_auto(self: &Arc<Self>) {
        prov::start_progress_thread(self, &self.auto, "verbs-progress");
    }
}

/// The fabric.
pub(crate) struct VFabric {
    shared: Arc<Shared>,
}

impl VFabric {
    pub(crate) fn open(info: &Info) -> Result<VFabric> {
        let shared = Arc::new(Shared {
            channel: EventChannel::create()
                .map_err(|e| Error::from(e).context("rdma_create_event_channel"))?,
            cm_lock: Mutex::new(()),
            targets: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            cqs: Mutex::new(Vec::new()),
            auto: AtomicBool::new(false),
            tick: AtomicU64::new(0),
        });
        if info.progress == Progress::Auto {
            prov::Progress::start_auto(&shared);
        }
        Ok(VFabric { shared })
    }
}

/// The address to bind or resolve for `addr`: loopback becomes the answer's GID
/// address (see [`mapping::loopback_to_gid`]).
fn loopback_bind(addr: SocketAddr, gid: Option<IpAddr>) -> Result<SocketAddr> {
    mapping::loopback_to_gid(addr, gid).ok_or_else(|| {
        Error::new(
            ErrorKind::AddressNotAvailable,
            format!(
                "{addr}: rdma_cm cannot use loopback; the provider uses the device's own \
                 address of that family instead, and this answer's GID ({}) is not one",
                gid.map_or("InfiniBand".to_string(), |g| g.to_string())
            ),
        )
    })
}

impl FabricOps for VFabric {
    fn open_domain(&self, info: &Info) -> Result<Arc<dyn DomainOps>> {
        let ctx = sys::cm_devices()
            .into_iter()
            .find(|c| c.name() == info.domain_name)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NoData,
                    format!("RDMA device '{}' is gone", info.domain_name),
                )
            })?;
        let dev = sys::query(ctx).map_err(|e| Error::from(e).context("ibv_query_device_ex"))?;
        let pd = Pd::alloc(ctx).map_err(|e| Error::from(e).context("ibv_alloc_pd"))?;
        let scratch = HeapMemory::new(wr::RAW_READ as usize)?;
        // SAFETY: scratch is kept in the same DomainShared as the Mr and dropped after
        // it (field order), and pd outlives it likewise.
        let scratch_mr = unsafe {
            Mr::register(
                &pd,
                scratch.as_ptr(),
                scratch.len(),
                mapping::ACCESS_LOCAL_WRITE,
            )
        }
        .map_err(|e| Error::from(e).context("ibv_reg_mr (read-after-write buffer)"))?;
        let max_cqe = dev.ports.first().map_or(4096, |p| p.limits.max_cqe);
        Ok(Arc::new(VDomain {
            d: Arc::new(DomainShared {
                scratch_mr,
                _scratch: scratch,
                ops: Mutex::new(HashMap::new()),
                next_op: AtomicU64::new(1),
                ctx,
                name: info.domain_name.clone(),
                max_rd_atom: dev.max_rd_atom,
                atomics: dev.atomics,
                atomics_glob: dev.atomics_glob,
                max_cqe,
                raw_commit: crate::raw_commit_declared(),
                fabric: self.shared.clone(),
                pd,
            }),
        }))
    }

    fn open_eq(&self, _attr: &EqAttr) -> Result<Arc<dyn EqOps>> {
        ProviderEq::open(&self.shared)
    }

    fn open_passive_ep(
        &self,
        info: &Info,
        eq: &Arc<dyn EqOps>,
    ) -> Result<Arc<dyn PassiveEndpointOps>> {
        let eq = ProviderEq::queue_of(eq, &self.shared, "verbs")?;
        let addr = info
            .src_addr
            .as_ref()
            .and_then(Address::as_inet)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let gid = mapping::gid_ip(&info.fabric_name);
        let bind = loopback_bind(addr, gid)?;
        let inner = Arc::new_cyclic(|w: &Weak<PepInner>| {
            let key = self.shared.key(Target::Pep(w.clone()));
            PepInner {
                fid: Fid::next(),
                key,
                id: Mutex::new(None),
                gid,
                lo: addr.ip().is_loopback().then_some(addr.ip()),
                info: info.clone(),
                eq,
                shared: self.shared.clone(),
            }
        });
        let id = CmId::create(&self.shared.channel, inner.key)
            .map_err(|e| Error::from(e).context("rdma_create_id"))?;
        let mut sa = sys::to_sockaddr(bind);
        // SAFETY: id is live; sa is a valid sockaddr of its family.
        if unsafe { rdma_bind_addr(id.0, (&mut sa as *mut libc::sockaddr_storage).cast()) } != 0 {
            return Err(os_err(&format!("rdma_bind_addr {bind} (for {addr})")));
        }
        *inner.id.lock() = Some(id);
        Ok(Arc::new(VPep { inner }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// One posted operation, until its last work request completes.
struct PendingOp {
    ep: Weak<EpInner>,
    context: u64,
    flags: CompFlags,
    len: usize,
    completion: bool,
    /// Work requests not yet completed.
    remaining: u32,
    /// Send-queue slots the operation holds (0 for a receive).
    tx_slots: u32,
    recv: bool,
    error: Option<(u32, u32)>,
    /// The memory the work requests use, held until they complete.
    _segments: Segments,
    _inline: Option<Vec<u8>>,
}

/// What a domain's objects share.
pub(crate) struct DomainShared {
    scratch_mr: Mr,
    _scratch: HeapMemory,
    ops: Mutex<HashMap<u64, PendingOp>>,
    next_op: AtomicU64,
    ctx: Ctx,
    name: String,
    max_rd_atom: u8,
    /// The device executes RC atomics.
    atomics: bool,
    /// ... coherently with CPU atomics (`IBV_ATOMIC_GLOB`; rxe says `HCA`).
    atomics_glob: bool,
    max_cqe: u32,
    raw_commit: bool,
    fabric: Arc<Shared>,
    pd: Pd,
}

impl DomainShared {
    /// Accounts one work completion; returns the application completion it finishes
    /// (if any) and, for a failure, the endpoint and the cause to end its connection.
    fn complete(&self, w: &ibv_wc) -> Option<Completion> {
        let mut ops = self.ops.lock();
        let op = ops.get_mut(&w.wr_id)?;
        op.remaining = op.remaining.saturating_sub(1);
        if w.status != wc::SUCCESS && op.error.is_none_or(|(s, _)| s == wc::WR_FLUSH_ERR) {
            op.error = Some((w.status, w.vendor_err));
        }
        if op.recv {
            op.len = w.byte_len as usize;
            if w.opcode == ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM {
                op.flags = CompFlags::RMA | CompFlags::REMOTE_WRITE;
            }
        }
        if op.remaining > 0 {
            return None;
        }
        let op = ops.remove(&w.wr_id)?;
        drop(ops);
        let ep = op.ep.upgrade();
        if let Some(ep) = &ep {
            ep.tx_outstanding
                .fetch_sub(op.tx_slots as usize, Ordering::AcqRel);
        }
        match op.error {
            Some((status, vendor)) => {
                if let (Some(ep), Some(cause)) = (&ep, mapping::shutdown_cause(status)) {
                    ep.fail(cause);
                }
                let (kind, what) = if op.recv {
                    let k = mapping::recv_error_kind(status);
                    match k {
                        fabric_core::CqErrorKind::Canceled if status != wc::WR_FLUSH_ERR => (
                            k,
                            "receive flushed: this side refused the peer's request and the \
                             connection ended",
                        ),
                        fabric_core::CqErrorKind::Truncated => {
                            (k, "receive: the message is longer than the receive")
                        }
                        _ => (k, "receive"),
                    }
                } else {
                    (mapping::cq_error_kind(status), "operation")
                };
                let e = CqError::new(
                    kind,
                    vendor as i32,
                    format!(
                        "{what} ({}, ibv_wc_status {status})",
                        sys::wc_status_str(status)
                    ),
                );
                let mut c = Completion::error(op.context, op.flags - CompFlags::COMMIT, e);
                if status == wc::LOC_LEN_ERR {
                    c.len = w.byte_len as usize;
                }
                Some(c)
            }
            None if op.completion => {
                let mut c = Completion::ok(op.context, op.flags, op.len);
                if op.recv && w.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0 {
                    // SAFETY: with IBV_WC_WITH_IMM the union holds the immediate.
                    let imm = unsafe { w.imm_data_invalidated_rkey_union.imm_data };
                    c = c.with_data(u32::from_be(imm) as u64);
                }
                Some(c)
            }
            None => None,
        }
    }

    /// Drops the operations of a closed endpoint (its QP is gone, no completion will
    /// come): those that want one complete `Canceled`.
    fn cancel_ep(&self, ep: &EpInner) -> (Vec<Completion>, Vec<Completion>) {
        let mut tx = Vec::new();
        let mut rx = Vec::new();
        let mut ops = self.ops.lock();
        let ids: Vec<u64> = ops
            .iter()
            .filter(|(_, o)| std::ptr::eq(o.ep.as_ptr(), ep))
            .map(|(k, _)| *k)
            .collect();
        for id in ids {
            if let Some(op) = ops.remove(&id) {
                let c = Completion::error(
                    op.context,
                    op.flags - CompFlags::COMMIT,
                    CqError::new(
                        fabric_core::CqErrorKind::Canceled,
                        0,
                        "the endpoint was closed",
                    ),
                );
                if op.recv {
                    rx.push(c);
                } else if op.completion {
                    tx.push(c);
                }
            }
        }
        (tx, rx)
    }
}

/// The domain.
pub(crate) struct VDomain {
    d: Arc<DomainShared>,
}

/// A memory registration.
pub(crate) struct VMr {
    mr: Mr,
    addr: u64,
    _memory: Arc<dyn MemoryBacking>,
    _domain: Arc<DomainShared>,
}

impl MrOps for VMr {
    fn key(&self) -> u64 {
        self.mr.rkey() as u64
    }
    fn base_addr(&self) -> u64 {
        self.addr
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn lkey_of(seg: &Segment) -> Result<u32> {
    seg.mr()
        .provider_mr()
        .as_any()
        .downcast_ref::<VMr>()
        .map(|m| m.mr.lkey())
        .ok_or_else(|| Error::invalid("a region of another provider"))
}

/// The scatter/gather entries of segments. Sound because a `Segment` is a range
/// inside its region (checked when it was made) and holds the region, which holds the
/// registration, until the operation's completion drops the segment.
fn sges(segs: &[Segment]) -> Result<Vec<Sge>> {
    segs.iter()
        .map(|s| {
            Ok(Sge {
                addr: s.ptr() as u64,
                len: u32::try_from(s.len()).map_err(|_| Error::invalid("an iovec over 4 GiB"))?,
                lkey: lkey_of(s)?,
            })
        })
        .collect()
}

impl DomainOps for VDomain {
    fn open_cq(&self, attr: &CqAttr) -> Result<Arc<dyn CqOps>> {
        let want = attr.size.max(4096).min(self.d.max_cqe.max(1) as usize) as i32;
        let cq =
            Cq::create(self.d.ctx, want).map_err(|e| Error::from(e).context("ibv_create_cq"))?;
        let queue = Arc::new(WaitQueue::new()?);
        let inner = Arc::new(CqInner {
            cq,
            queue: queue.clone(),
            domain: Arc::downgrade(&self.d),
            poll_lock: Mutex::new(()),
        });
        self.d.fabric.live_cqs();
        self.d.fabric.cqs.lock().push(inner);
        Ok(Arc::new(VCq::new(queue, self.d.fabric.clone())))
    }

    fn register(
        &self,
        memory: Arc<dyn MemoryBacking>,
        access: Access,
        flags: MrFlags,
    ) -> Result<Arc<dyn MrOps>> {
        let bits = mapping::ibv_access(access, flags, self.d.raw_commit);
        // A zero-length region is registered as one byte of its (page-sized) backing.
        let len = memory.len().max(1);
        // SAFETY: VMr holds `memory` (the mapping) and the domain (the PD) for as long
        // as the Mr exists, and MemoryBacking guarantees as_ptr..+len stays valid
        // while it lives (HeapMemory allocates at least one page).
        let mr = unsafe { Mr::register(&self.d.pd, memory.as_ptr(), len, bits) }
            .map_err(|e| Error::from(e).context("ibv_reg_mr"))?;
        Ok(Arc::new(VMr {
            addr: memory.as_ptr() as u64,
            mr,
            _memory: memory,
            _domain: self.d.clone(),
        }))
    }

    fn open_endpoint(&self, info: &Info, bind: EndpointBinding) -> Result<Arc<dyn EndpointOps>> {
        let shared = self.d.fabric.clone();
        let tx = shared.cq_of(&bind.tx_cq)?;
        let rx = shared.cq_of(&bind.rx_cq)?;
        let eq = ProviderEq::queue_of(&bind.eq, &shared, "verbs")?;
        let inner = Arc::new_cyclic(|w: &Weak<EpInner>| EpInner {
            fid: Fid::next(),
            key: shared.key(Target::Ep(w.clone())),
            me: w.clone(),
            domain: self.d.clone(),
            tx,
            rx,
            eq,
            limits: info.limits,
            src: info.src_addr.as_ref().and_then(Address::as_inet),
            gid: mapping::gid_ip(&info.fabric_name),
            tx_outstanding: AtomicUsize::new(0),
            st: Mutex::new(EpState {
                // An accepted connection's request says loopback where the listener was.
                lo: info
                    .src_addr
                    .as_ref()
                    .and_then(Address::as_inet)
                    .map(|a| a.ip())
                    .filter(IpAddr::is_loopback),
                ..EpState::default()
            }),
        });
        if let Some(h) = info.conn_handle() {
            let req = h.0.downcast_ref::<PendingConn>().ok_or_else(|| {
                Error::invalid("the connection request belongs to another provider")
            })?;
            let id = req.id.lock().take().ok_or_else(|| {
                Error::invalid("the connection request was already accepted or rejected")
            })?;
            if id.verbs() != self.d.ctx.0 {
                return Err(Error::invalid(format!(
                    "the connection request arrived on another RDMA device than this domain's ({})",
                    self.d.name
                )));
            }
            id.set_key(inner.key);
            let mut st = inner.st.lock();
            st.id = Some(id);
            inner.create_qp(&mut st)?;
            st.phase = Phase::Accepting;
        }
        Ok(Arc::new(VEp { inner }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The device side of a completion queue: its `ibv_cq` (with completion channel),
/// whose work completions it turns into the [`ProviderCq`]'s completions.
pub(crate) struct CqInner {
    cq: Cq,
    queue: Arc<WaitQueue<Completion>>,
    /// Weak: the fabric's table holds this entry, and the domain holds the fabric.
    domain: Weak<DomainShared>,
    poll_lock: Mutex<()>,
}

impl CqInner {
    /// Moves work completions into the queue; returns how many were read.
    fn poll(&self) -> usize {
        let Some(_g) = self.poll_lock.try_lock() else {
            return 0;
        };
        let domain = self.domain.upgrade();
        let mut total = 0;
        // SAFETY: ibv_wc is a plain C struct; zeroed entries are overwritten by poll.
        let mut wcs: [ibv_wc; 32] = unsafe { std::mem::zeroed() };
        loop {
            let n = self.cq.poll(&mut wcs);
            for w in &wcs[..n] {
                // (no domain: no operation can be pending, its table is gone)
                if let Some(c) = domain.as_ref().and_then(|d| d.complete(w)) {
                    self.queue.push(c);
                }
            }
            total += n;
            if n < wcs.len() {
                return total;
            }
        }
    }
}

/// A completion queue: the shared layer's, over the fabric's progress.
pub(crate) type VCq = ProviderCq<Shared>;

/// A connection request not yet accepted: dropping it rejects the peer.
pub(crate) struct PendingConn {
    id: Mutex<Option<CmId>>,
}

impl Drop for PendingConn {
    fn drop(&mut self) {
        if let Some(id) = self.id.get_mut().take() {
            // SAFETY: id is a live request id that nobody accepted.
            unsafe { rdma_reject(id.0, ptr::null(), 0) };
        }
    }
}

/// A passive endpoint's shared part.
pub(crate) struct PepInner {
    fid: Fid,
    key: u64,
    id: Mutex<Option<CmId>>,
    /// The answer's GID address.
    gid: Option<IpAddr>,
    /// The loopback address the application listens on (bound as `gid`).
    lo: Option<IpAddr>,
    info: Info,
    eq: Arc<WaitQueue<Event>>,
    shared: Arc<Shared>,
}

impl PepInner {
    fn on_request(&self, id: CmId, raw: &[u8]) {
        let peer = id.peer_addr();
        if self.lo.is_some() && peer.is_some_and(|p| Some(p.ip()) != self.gid) {
            // A listener on loopback is bound to the GID's address, which other
            // machines can reach: only this machine may connect, as on loopback.
            debug!("verbs: request from {peer:?} to a loopback listener refused");
            drop(PendingConn {
                id: Mutex::new(Some(id)),
            });
            return;
        }
        let mut info = self.info.clone();
        let show = |a: SocketAddr| Address::Inet(mapping::gid_to_loopback(a, self.gid, self.lo));
        info.src_addr = id.local_addr().map(show);
        info.dest_addr = peer.map(show);
        if let Some(name) = sys::cm_devices()
            .into_iter()
            .find(|c| c.0 == id.verbs())
            .map(Ctx::name)
        {
            info.domain_name = name;
        }
        let handle = ConnHandle(Arc::new(PendingConn {
            id: Mutex::new(Some(id)),
        }));
        self.eq.push(Event::ConnRequest(Box::new(ConnRequest {
            info: info.with_conn_handle(handle),
            data: mapping::unframe_cm_data(raw),
            listener: self.fid,
        })));
    }
}

/// A passive endpoint.
pub(crate) struct VPep {
    inner: Arc<PepInner>,
}

impl PassiveEndpointOps for VPep {
    fn fid(&self) -> Fid {
        self.inner.fid
    }
    fn listen(&self) -> Result<()> {
        let g = self.inner.id.lock();
        let id = g
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Shutdown, "passive endpoint is closed"))?;
        // SAFETY: id is live and bound.
        if unsafe { rdma_listen(id.0, 128) } != 0 {
            return Err(os_err("rdma_listen"));
        }
        Ok(())
    }
    fn local_addr(&self) -> Result<Address> {
        let g = self.inner.id.lock();
        let id = g
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Shutdown, "passive endpoint is closed"))?;
        id.local_addr()
            .map(|a| Address::Inet(mapping::gid_to_loopback(a, self.inner.gid, self.inner.lo)))
            .ok_or_else(|| Error::invalid("the listener has no address"))
    }
    fn reject(&self, request: &Info, data: &[u8]) -> Result<()> {
        let req = request
            .conn_handle()
            .and_then(|h| h.0.downcast_ref::<PendingConn>())
            .ok_or_else(|| Error::invalid("not a verbs connection request"))?;
        let id = req.id.lock().take().ok_or_else(|| {
            Error::invalid("the connection request was already accepted or rejected")
        })?;
        let framed = mapping::frame_cm_data(data).ok_or_else(|| {
            Error::invalid(format!("reject data over {} bytes", mapping::CM_DATA_SIZE))
        })?;
        // SAFETY: id is a live request id; framed outlives the call.
        if unsafe { rdma_reject(id.0, framed.as_ptr().cast(), framed.len() as u8) } != 0 {
            return Err(os_err("rdma_reject"));
        }
        Ok(())
    }
    fn close(&self) {
        self.inner.id.lock().take();
        self.inner.shared.targets.lock().remove(&self.inner.key);
    }
}

/// Connection phases of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    #[default]
    Idle,
    Resolving,
    Connecting,
    Accepting,
    Connected,
    /// The QP failed (`fail`): disconnecting, the Shutdown event follows.
    Failing,
    Closed(ShutdownReason),
}

#[derive(Default)]
struct EpState {
    id: Option<CmId>,
    /// The loopback address the application connected from or to (see
    /// [`mapping::loopback_to_gid`]): the GID's address reads as it.
    lo: Option<IpAddr>,
    phase: Phase,
    cause: Option<ShutdownReason>,
    connect_data: Vec<u8>,
    pending_recvs: Vec<RecvRequest>,
}

/// One send work request to post: opcode, local entries, remote (address, rkey),
/// immediate data.
type SendWr = (u32, Vec<Sge>, Option<(u64, u32)>, Option<u32>);

/// An endpoint's shared part.
pub(crate) struct EpInner {
    fid: Fid,
    key: u64,
    me: Weak<EpInner>,
    domain: Arc<DomainShared>,
    tx: Arc<CqInner>,
    rx: Arc<CqInner>,
    eq: Arc<WaitQueue<Event>>,
    limits: fabric_core::Limits,
    src: Option<SocketAddr>,
    /// The answer's GID address.
    gid: Option<IpAddr>,
    tx_outstanding: AtomicUsize,
    st: Mutex<EpState>,
}

impl EpInner {
    fn error_event(&self, kind: ErrorKind, msg: String, data: Vec<u8>) {
        self.eq.push(Event::Error {
            fid: self.fid,
            error: Error::new(kind, msg),
            data,
        });
    }

    fn create_qp(&self, st: &mut EpState) -> Result<()> {
        let id = st
            .id
            .as_ref()
            .ok_or_else(|| not_connected("no connection"))?;
        if id.verbs() != self.domain.ctx.0 {
            return Err(Error::invalid(format!(
                "the address resolves to another RDMA device than this domain's ({})",
                self.domain.name
            )));
        }
        let sq = (self.limits.tx_size * (mapping::MAX_RMA_IOV + 1)) as u32;
        let mut init = sys::qp_init_attr(
            self.tx.cq.cq,
            self.rx.cq.cq,
            sq,
            self.limits.rx_size as u32,
            self.limits.iov_limit as u32,
            self.limits.inject_size as u32,
        );
        // SAFETY: id is live and bound to the domain's device; the PD and CQs are of
        // that device and outlive the QP (the endpoint holds the domain and CQs).
        if unsafe { rdma_create_qp(id.0, self.domain.pd.0, &mut init) } != 0 {
            return Err(os_err("rdma_create_qp"));
        }
        for r in std::mem::take(&mut st.pending_recvs) {
            self.post_recv_now(st, r)?;
        }
        Ok(())
    }

    fn conn_param(&self, data: &[u8]) -> rdma_conn_param {
        rdma_conn_param {
            private_data: data.as_ptr().cast(),
            private_data_len: data.len() as u8,
            responder_resources: self.domain.max_rd_atom,
            initiator_depth: self.domain.max_rd_atom,
            flow_control: 1,
            retry_count: 7,
            // 7: retry forever on receiver-not-ready, so a send or a write with
            // immediate waits for the target's receive (the project's rule).
            rnr_retry_count: 7,
            srq: 0,
            qp_num: 0,
        }
    }

    /// Lowers the QP's RNR NAK timer from the CM's default (see MIN_RNR_TIMER).
    fn set_rnr_timer(&self, st: &EpState) {
        let Some(qp) = st.id.as_ref().map(CmId::qp).filter(|q| !q.is_null()) else {
            return;
        };
        // SAFETY: zeroed ibv_qp_attr is valid; only min_rnr_timer is read (mask).
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.min_rnr_timer = MIN_RNR_TIMER;
        // SAFETY: qp is live (owned by st.id); RTS->RTS may change min_rnr_timer.
        let rc =
            unsafe { ibv_modify_qp(qp, &mut a, ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER.0 as i32) };
        if rc != 0 {
            debug!("verbs: cannot lower min_rnr_timer (rc {rc}); keeping the CM's");
        }
    }

    fn qp_in_error(&self, st: &EpState) -> bool {
        let Some(qp) = st.id.as_ref().map(CmId::qp).filter(|q| !q.is_null()) else {
            return false;
        };
        // SAFETY: zeroed attrs are valid out-parameters; qp is live.
        let (mut a, mut i): (ibv_qp_attr, ibv_qp_init_attr) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: as above.
        let rc =
            unsafe { ibv_query_qp(qp, &mut a, ibv_qp_attr_mask::IBV_QP_STATE.0 as i32, &mut i) };
        rc == 0 && a.qp_state == ibv_qp_state::IBV_QPS_ERR
    }

    /// A work request failed: the QP is in error, so the connection ends. Posts fail
    /// from now on; the Shutdown event (with `cause`) follows the disconnect.
    fn fail(&self, cause: ShutdownReason) {
        let mut st = self.st.lock();
        if matches!(st.phase, Phase::Connected) {
            st.cause = Some(cause);
            st.phase = Phase::Failing;
            if let Some(id) = &st.id {
                // SAFETY: id is live and connected.
                unsafe { rdma_disconnect(id.0) };
            }
        }
    }

    fn on_cm_event(&self, kind: u32, status: i32, raw: &[u8]) {
        use rdma_cm_event_type::*;
        let mut st = self.st.lock();
        match kind {
            RDMA_CM_EVENT_ADDR_RESOLVED => {
                let Some(id) = &st.id else { return };
                // SAFETY: id is live.
                if unsafe { rdma_resolve_route(id.0, RESOLVE_MS) } != 0 {
                    st.phase = Phase::Closed(ShutdownReason::Lost);
                    self.error_event(
                        ErrorKind::ConnectionRefused,
                        format!("rdma_resolve_route: {}", std::io::Error::last_os_error()),
                        Vec::new(),
                    );
                }
            }
            RDMA_CM_EVENT_ROUTE_RESOLVED => {
                let r = self.create_qp(&mut st).and_then(|()| {
                    let data = std::mem::take(&mut st.connect_data);
                    let mut p = self.conn_param(&data);
                    let id = st.id.as_ref().ok_or_else(|| not_connected("closed"))?;
                    // SAFETY: id is live with a QP; p and data outlive the call.
                    if unsafe { rdma_connect(id.0, &mut p) } != 0 {
                        return Err(os_err("rdma_connect"));
                    }
                    Ok(())
                });
                match r {
                    Ok(()) => st.phase = Phase::Connecting,
                    Err(e) => {
                        st.phase = Phase::Closed(ShutdownReason::Lost);
                        self.error_event(e.kind(), e.to_string(), Vec::new());
                    }
                }
            }
            RDMA_CM_EVENT_ESTABLISHED => {
                let data = if st.phase == Phase::Connecting {
                    mapping::unframe_cm_data(raw)
                } else {
                    Vec::new()
                };
                st.phase = Phase::Connected;
                self.set_rnr_timer(&st);
                self.eq.push(Event::Connected {
                    fid: self.fid,
                    data,
                });
            }
            RDMA_CM_EVENT_REJECTED => {
                st.phase = Phase::Closed(ShutdownReason::Peer);
                // IB CM reason 28 is a consumer (application) reject; 8 (invalid
                // service ID) means nobody listens there.
                let why = if status == 28 {
                    "the peer rejected the connection".to_string()
                } else {
                    format!("connection refused (IB CM reject reason {status})")
                };
                let data = if status == 28 {
                    mapping::unframe_cm_data(raw)
                } else {
                    Vec::new()
                };
                self.error_event(ErrorKind::ConnectionRefused, why, data);
            }
            RDMA_CM_EVENT_ADDR_ERROR
            | RDMA_CM_EVENT_ROUTE_ERROR
            | RDMA_CM_EVENT_CONNECT_ERROR
            | RDMA_CM_EVENT_UNREACHABLE => {
                st.phase = Phase::Closed(ShutdownReason::Lost);
                let kind_of =
                    if kind == RDMA_CM_EVENT_UNREACHABLE || kind == RDMA_CM_EVENT_CONNECT_ERROR {
                        ErrorKind::ConnectionRefused
                    } else {
                        ErrorKind::AddressNotAvailable
                    };
                self.error_event(
                    kind_of,
                    format!("{} (status {status})", sys::event_str(kind)),
                    Vec::new(),
                );
            }
            RDMA_CM_EVENT_DISCONNECTED | RDMA_CM_EVENT_DEVICE_REMOVAL => {
                if matches!(st.phase, Phase::Closed(_)) {
                    return;
                }
                let reason = if kind == RDMA_CM_EVENT_DEVICE_REMOVAL {
                    ShutdownReason::Lost
                } else if let Some(c) = st.cause {
                    c
                } else if self.qp_in_error(&st) {
                    // Our QP went to error without a failed work request of ours:
                    // the responder refused a remote access (RC moves the
                    // responder's QP to error when it NAKs one).
                    ShutdownReason::AccessError
                } else {
                    ShutdownReason::Peer
                };
                if let Some(id) = &st.id {
                    // SAFETY: id is live; disconnecting twice is harmless.
                    unsafe { rdma_disconnect(id.0) };
                }
                st.phase = Phase::Closed(reason);
                self.eq.push(Event::Shutdown {
                    fid: self.fid,
                    reason,
                });
            }
            _ => {}
        }
    }

    fn check_post(&self, st: &EpState) -> Result<*mut ibv_qp> {
        match st.phase {
            Phase::Connected => {}
            Phase::Closed(ShutdownReason::Local) => {
                return Err(Error::new(
                    ErrorKind::Shutdown,
                    "the endpoint was shut down",
                ))
            }
            Phase::Closed(r) => return Err(not_connected(format!("the connection ended: {r}"))),
            Phase::Failing => {
                return Err(not_connected(
                    "the connection is ending (a work request failed)",
                ))
            }
            _ => return Err(not_connected("the endpoint is not connected")),
        }
        st.id
            .as_ref()
            .map(CmId::qp)
            .filter(|q| !q.is_null())
            .ok_or_else(|| not_connected("the endpoint has no queue pair"))
    }

    /// The record of a send-side operation (the work-request counts are set when it
    /// is posted).
    fn send_op(
        &self,
        context: u64,
        flags: CompFlags,
        len: usize,
        completion: bool,
        segments: Segments,
        inline: Option<Vec<u8>>,
    ) -> PendingOp {
        PendingOp {
            ep: self.me.clone(),
            context,
            flags,
            len,
            completion,
            remaining: 0,
            tx_slots: 0,
            recv: false,
            error: None,
            _segments: segments,
            _inline: inline,
        }
    }

    fn reserve_tx(&self, n: usize) -> Result<()> {
        let cap = self.limits.tx_size * (mapping::MAX_RMA_IOV + 1);
        let prev = self.tx_outstanding.fetch_add(n, Ordering::AcqRel);
        if prev + n > cap {
            self.tx_outstanding.fetch_sub(n, Ordering::AcqRel);
            return Err(Error::new(
                ErrorKind::WouldBlock,
                format!("{} operations outstanding (tx_size)", self.limits.tx_size),
            ));
        }
        Ok(())
    }

    fn track(&self, op: PendingOp) -> u64 {
        let id = self.domain.next_op.fetch_add(1, Ordering::Relaxed);
        self.domain.ops.lock().insert(id, op);
        id
    }

    fn untrack(&self, id: u64, slots: usize) {
        self.domain.ops.lock().remove(&id);
        self.tx_outstanding.fetch_sub(slots, Ordering::AcqRel);
    }

    /// Posts a chain of send work requests built from `plan`.
    fn post_chain(
        &self,
        qp: *mut ibv_qp,
        plan: Vec<SendWr>,
        inline: bool,
        op: PendingOp,
    ) -> Result<()> {
        let n = plan.len();
        self.reserve_tx(n)?;
        let wr_id = self.track(PendingOp {
            remaining: n as u32,
            tx_slots: n as u32,
            ..op
        });
        let mut sge_lists: Vec<Vec<ibv_sge>> = plan
            .iter()
            .map(|(_, s, _, _)| {
                s.iter()
                    .map(|x| ibv_sge {
                        addr: x.addr,
                        length: x.len,
                        lkey: x.lkey,
                    })
                    .collect()
            })
            .collect();
        // SAFETY: ibv_send_wr is a plain C struct; all-zero is valid (null next,
        // no SGEs) and every used field is set below.
        let mut wrs: Vec<ibv_send_wr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, (opcode, _, rdma, imm)) in plan.iter().enumerate() {
            let w = &mut wrs[i];
            w.wr_id = wr_id;
            w.opcode = *opcode;
            w.num_sge = sge_lists[i].len() as i32;
            w.sg_list = if sge_lists[i].is_empty() {
                ptr::null_mut()
            } else {
                sge_lists[i].as_mut_ptr()
            };
            w.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            // Inline applies to the data-carrying requests; a read (the flush read of
            // a delivery or commit write) never carries it.
            if inline && *opcode != ibv_wr_opcode::IBV_WR_RDMA_READ {
                w.send_flags |= ibv_send_flags::IBV_SEND_INLINE.0;
            }
            if let Some(d) = imm {
                w.imm_data_invalidated_rkey_union.imm_data = d.to_be();
            }
            if let Some((addr, rkey)) = rdma {
                w.wr.rdma = rdma_t {
                    remote_addr: *addr,
                    rkey: *rkey,
                };
            }
        }
        for i in 1..n {
            let next: *mut ibv_send_wr = &mut wrs[i];
            wrs[i - 1].next = next;
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: qp is live (the caller holds the endpoint's state lock, so it is
        // not destroyed meanwhile); the chain and its SGE arrays live until the call
        // returns (the NIC copies work requests at post; inline data is copied too).
        // Every SGE addresses a range inside a registered region that the pending
        // operation holds until its completion (see `sges`), or inline bytes.
        let rc = unsafe { ibv_post_send(qp, wrs.as_mut_ptr(), &mut bad) };
        if rc != 0 {
            // A partial post: the work requests before `bad` complete (the QP is
            // healthy); we report the whole operation as failed at the call only if
            // none went out.
            let posted = if bad.is_null() {
                0
            } else {
                (bad as usize - wrs.as_ptr() as usize) / std::mem::size_of::<ibv_send_wr>()
            };
            if posted == 0 {
                self.untrack(wr_id, n);
                return Err(
                    Error::from(std::io::Error::from_raw_os_error(rc)).context("ibv_post_send")
                );
            }
            if let Some(o) = self.domain.ops.lock().get_mut(&wr_id) {
                o.remaining = posted as u32;
                o.error = Some((wc::LOC_QP_OP_ERR, 0));
            }
        }
        Ok(())
    }

    fn post_recv_now(&self, st: &EpState, req: RecvRequest) -> Result<()> {
        let qp = st
            .id
            .as_ref()
            .map(CmId::qp)
            .filter(|q| !q.is_null())
            .ok_or_else(|| not_connected("no queue pair"))?;
        let list = sges(&req.segments)?;
        let wr_id = self.track(PendingOp {
            ep: self.me.clone(),
            context: req.context,
            flags: CompFlags::MSG | CompFlags::RECV,
            len: 0,
            completion: true,
            remaining: 1,
            tx_slots: 0,
            recv: true,
            error: None,
            _segments: req.segments,
            _inline: None,
        });
        let mut sg: Vec<ibv_sge> = list
            .iter()
            .map(|x| ibv_sge {
                addr: x.addr,
                length: x.len,
                lkey: x.lkey,
            })
            .collect();
        let mut w = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: if sg.is_empty() {
                ptr::null_mut()
            } else {
                sg.as_mut_ptr()
            },
            num_sge: sg.len() as i32,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: qp is live (state lock held); w and sg live through the call; the
        // SGEs address registered ranges held by the pending operation (see `sges`).
        let rc = unsafe { ibv_post_recv(qp, &mut w, &mut bad) };
        if rc != 0 {
            self.untrack(wr_id, 0);
            return Err(Error::from(std::io::Error::from_raw_os_error(rc)).context("ibv_post_recv"));
        }
        Ok(())
    }
}

/// An endpoint.
pub(crate) struct VEp {
    inner: Arc<EpInner>,
}

fn inline_sge(v: &[u8]) -> Vec<Sge> {
    if v.is_empty() {
        return Vec::new();
    }
    vec![Sge {
        addr: v.as_ptr() as u64,
        len: v.len() as u32,
        lkey: 0,
    }]
}

impl CmOps for VEp {
    fn connect(&self, addr: &Address, data: &[u8]) -> Result<()> {
        let ep = &self.inner;
        let dst = addr
            .as_inet()
            .ok_or_else(|| Error::invalid("verbs connects to IP addresses (Address::Inet)"))?;
        let framed = mapping::frame_cm_data(data).ok_or_else(|| {
            Error::invalid(format!(
                "connection data over {} bytes",
                mapping::CM_DATA_SIZE
            ))
        })?;
        let mut st = ep.st.lock();
        if st.phase != Phase::Idle {
            return Err(Error::invalid(
                "connect: the endpoint is already connecting or connected",
            ));
        }
        let lo = [Some(dst), ep.src]
            .into_iter()
            .flatten()
            .map(|a| a.ip())
            .find(IpAddr::is_loopback);
        let to = loopback_bind(dst, ep.gid)?;
        let from = ep
            .src
            .filter(|s| !s.ip().is_unspecified())
            .map(|s| loopback_bind(s, ep.gid))
            .transpose()?;
        let id = CmId::create(&ep.domain.fabric.channel, ep.key)
            .map_err(|e| Error::from(e).context("rdma_create_id"))?;
        let mut d = sys::to_sockaddr(to);
        let mut s = from.map(sys::to_sockaddr);
        let sp = s.as_mut().map_or(ptr::null_mut(), |s| {
            (s as *mut libc::sockaddr_storage).cast()
        });
        // SAFETY: id is live; the addresses are valid sockaddrs that outlive the call.
        if unsafe {
            rdma_resolve_addr(
                id.0,
                sp,
                (&mut d as *mut libc::sockaddr_storage).cast(),
                RESOLVE_MS,
            )
        } != 0
        {
            return Err(os_err(&format!("rdma_resolve_addr {to} (for {dst})")));
        }
        st.id = Some(id);
        st.lo = lo;
        st.connect_data = framed;
        st.phase = Phase::Resolving;
        Ok(())
    }

    fn accept(&self, data: &[u8]) -> Result<()> {
        let ep = &self.inner;
        let framed = mapping::frame_cm_data(data).ok_or_else(|| {
            Error::invalid(format!("accept data over {} bytes", mapping::CM_DATA_SIZE))
        })?;
        let st = ep.st.lock();
        if st.phase != Phase::Accepting {
            return Err(Error::invalid(
                "accept: the endpoint has no pending connection request",
            ));
        }
        let id = st.id.as_ref().ok_or_else(|| not_connected("closed"))?;
        let mut p = ep.conn_param(&framed);
        // SAFETY: id is a live request id with a QP; p and framed outlive the call.
        if unsafe { rdma_accept(id.0, &mut p) } != 0 {
            return Err(os_err("rdma_accept"));
        }
        Ok(())
    }

    fn shutdown(&self) -> Result<()> {
        let ep = &self.inner;
        let mut st = ep.st.lock();
        let was = st.phase;
        if matches!(was, Phase::Closed(_)) {
            return Ok(());
        }
        st.phase = Phase::Closed(ShutdownReason::Local);
        if let Some(id) = &st.id {
            // SAFETY: id is live; on an unconnected id this fails harmlessly.
            unsafe { rdma_disconnect(id.0) };
        }
        if matches!(was, Phase::Connected | Phase::Failing) {
            ep.eq.push(Event::Shutdown {
                fid: ep.fid,
                reason: ShutdownReason::Local,
            });
        }
        Ok(())
    }

    fn peer_addr(&self) -> Option<Address> {
        let st = self.inner.st.lock();
        let a = st.id.as_ref().and_then(CmId::peer_addr)?;
        Some(Address::Inet(mapping::gid_to_loopback(
            a,
            self.inner.gid,
            st.lo,
        )))
    }
}

impl MsgOps for VEp {
    fn post_send(&self, req: SendRequest) -> Result<()> {
        let ep = &self.inner;
        let st = ep.st.lock();
        let qp = ep.check_post(&st)?;
        let len = req.payload.len();
        let (list, segs, inl, inline) = match req.payload {
            Payload::Inline(v) => (inline_sge(&v), Segments::new(), Some(v), true),
            Payload::Segments(s) => (sges(&s)?, s, None, false),
        };
        let opcode = if req.data.is_some() {
            ibv_wr_opcode::IBV_WR_SEND_WITH_IMM
        } else {
            ibv_wr_opcode::IBV_WR_SEND
        };
        // cq_data_size is 4: the wrapper checked the value fits.
        let imm = req.data.map(|d| d as u32);
        ep.post_chain(
            qp,
            vec![(opcode, list, None, imm)],
            inline,
            ep.send_op(
                req.context,
                CompFlags::MSG | CompFlags::SEND,
                len,
                req.completion,
                segs,
                inl,
            ),
        )
    }

    fn post_recv(&self, req: RecvRequest) -> Result<()> {
        let ep = &self.inner;
        let mut st = ep.st.lock();
        let has_qp = st.id.as_ref().is_some_and(|i| !i.qp().is_null());
        match st.phase {
            Phase::Closed(ShutdownReason::Local) => {
                return Err(Error::new(
                    ErrorKind::Shutdown,
                    "the endpoint was shut down",
                ))
            }
            Phase::Closed(r) => return Err(not_connected(format!("the connection ended: {r}"))),
            Phase::Failing => return Err(not_connected("the connection is ending")),
            _ if !has_qp => {
                if st.pending_recvs.len() >= ep.limits.rx_size {
                    return Err(Error::new(ErrorKind::WouldBlock, "rx_size receives posted"));
                }
                st.pending_recvs.push(req);
                return Ok(());
            }
            _ => {}
        }
        ep.post_recv_now(&st, req)
    }
}

impl RmaOps for VEp {
    fn post_write(&self, req: RmaRequest) -> Result<()> {
        let ep = &self.inner;
        let st = ep.st.lock();
        let qp = ep.check_post(&st)?;
        if req.remote.iter().any(|r| r.len > u32::MAX as usize) {
            return Err(Error::invalid("a remote iovec over 4 GiB"));
        }
        let len = req.payload.len();
        let (list, segs, inl, inline) = match req.payload {
            Payload::Inline(v) => (inline_sge(&v), Segments::new(), Some(v), true),
            Payload::Segments(s) => (sges(&s)?, s, None, false),
        };
        let commit = req.flags.contains(OpFlags::COMMIT_COMPLETE);
        let plan = wr::plan_write(&list, &req.remote, req.data.map(|d| d as u32), req.flags);
        let scratch = Sge {
            addr: ep.domain._scratch.as_ptr() as u64,
            len: 0,
            lkey: ep.domain.scratch_mr.lkey(),
        };
        let chain = plan
            .into_iter()
            .map(|w| match w.op {
                RdmaOp::Write => (
                    ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                    w.sges,
                    Some((w.remote_addr, w.rkey)),
                    None,
                ),
                RdmaOp::WriteImm(d) => (
                    ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
                    w.sges,
                    Some((w.remote_addr, w.rkey)),
                    Some(d),
                ),
                RdmaOp::Read => (
                    ibv_wr_opcode::IBV_WR_RDMA_READ,
                    w.sges,
                    Some((w.remote_addr, w.rkey)),
                    None,
                ),
                RdmaOp::FlushRead { len } => (
                    ibv_wr_opcode::IBV_WR_RDMA_READ,
                    if len == 0 {
                        Vec::new()
                    } else {
                        vec![Sge { len, ..scratch }]
                    },
                    Some((w.remote_addr, w.rkey)),
                    None,
                ),
            })
            .collect::<Vec<_>>();
        let mut flags = CompFlags::RMA | CompFlags::WRITE;
        if commit {
            flags |= CompFlags::COMMIT;
        }
        ep.post_chain(
            qp,
            chain,
            inline,
            ep.send_op(req.context, flags, len, req.completion, segs, inl),
        )
    }

    fn post_read(&self, req: RmaRequest) -> Result<()> {
        let ep = &self.inner;
        let st = ep.st.lock();
        let qp = ep.check_post(&st)?;
        if req.remote.iter().any(|r| r.len > u32::MAX as usize) {
            return Err(Error::invalid("a remote iovec over 4 GiB"));
        }
        let len = req.payload.len();
        let Payload::Segments(segs) = req.payload else {
            return Err(Error::invalid("a read needs registered destination memory"));
        };
        let list = sges(&segs)?;
        let chain = wr::plan_read(&list, &req.remote)
            .into_iter()
            .map(|w| {
                (
                    ibv_wr_opcode::IBV_WR_RDMA_READ,
                    w.sges,
                    Some((w.remote_addr, w.rkey)),
                    None,
                )
            })
            .collect();
        ep.post_chain(
            qp,
            chain,
            false,
            ep.send_op(
                req.context,
                CompFlags::RMA | CompFlags::READ,
                len,
                req.completion,
                segs,
                None,
            ),
        )
    }
}

impl EndpointOps for VEp {
    fn fid(&self) -> Fid {
        self.inner.fid
    }

    fn local_addr(&self) -> Option<Address> {
        let st = self.inner.st.lock();
        let a = st.id.as_ref().and_then(CmId::local_addr)?;
        Some(Address::Inet(mapping::gid_to_loopback(
            a,
            self.inner.gid,
            st.lo,
        )))
    }

    fn close(&self) {
        let ep = &self.inner;
        let id = {
            let mut st = ep.st.lock();
            if !matches!(st.phase, Phase::Closed(_)) {
                st.phase = Phase::Closed(ShutdownReason::Local);
            }
            st.pending_recvs.clear();
            st.id.take()
        };
        ep.domain.fabric.targets.lock().remove(&ep.key);
        if let Some(id) = id {
            // SAFETY: id is live; disconnecting moves the QP to error first.
            unsafe { rdma_disconnect(id.0) };
            // Completions still queued for the QP are collected before it goes.
            ep.tx.poll();
            ep.rx.poll();
            drop(id);
        }
        let (tx, rx) = ep.domain.cancel_ep(ep);
        for c in tx {
            ep.tx.queue.push(c);
        }
        for c in rx {
            ep.rx.queue.push(c);
        }
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

/// The (operation, datatype, form) combinations verbs' RC atomics execute, one element
/// per work request: u64/i64 sum (fetching or not) as `IBV_WR_ATOMIC_FETCH_AND_ADD`,
/// compare-and-swap as `IBV_WR_ATOMIC_CMP_AND_SWP` (the set softroce offers).
fn native_atomic(
    op: fabric_core::AtomicOp,
    dt: fabric_core::Datatype,
    form: fabric_core::AtomicForm,
) -> Option<usize> {
    use fabric_core::{AtomicForm, AtomicOp, Datatype};
    let word = matches!(dt, Datatype::U64 | Datatype::I64);
    let ok = matches!(
        (form, op),
        (AtomicForm::Plain | AtomicForm::Fetch, AtomicOp::Sum)
            | (AtomicForm::Compare, AtomicOp::Cswap)
    );
    (word && ok).then_some(1)
}

fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_ne_bytes(w)
}

impl fabric_core::provider::AtomicOps for VEp {
    fn valid(
        &self,
        op: fabric_core::AtomicOp,
        dt: fabric_core::Datatype,
        form: fabric_core::AtomicForm,
    ) -> Option<usize> {
        if !self.inner.domain.atomics {
            return None;
        }
        native_atomic(op, dt, form)
    }

    fn cpu_coherent(&self) -> bool {
        self.inner.domain.atomics_glob
    }

    fn post_atomic(&self, req: fabric_core::AtomicRequest) -> Result<()> {
        req.check_rc(
            "verbs",
            self.valid(req.op, req.datatype, req.form).is_some(),
        )?;
        let rkey = u32::try_from(req.remote.key).unwrap_or(0);
        let ep = &self.inner;
        let st = ep.st.lock();
        let qp = ep.check_post(&st)?;
        let fetch = req.result.is_some();
        let (sge, segs) = match req.result {
            Some(seg) => {
                let s = sges(std::slice::from_ref(&seg))?.remove(0);
                (s, vec![seg])
            }
            // A non-fetching atomic still gets the old value back: into the domain's
            // scratch buffer (registered LOCAL_WRITE, at least 8 bytes).
            None => (
                Sge {
                    addr: ep.domain._scratch.as_ptr() as u64,
                    len: 8,
                    lkey: ep.domain.scratch_mr.lkey(),
                },
                Vec::new(),
            ),
        };
        let (opcode, compare_add, swap) = match req.op {
            fabric_core::AtomicOp::Cswap => (
                ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP,
                word(&req.compare),
                word(&req.operand),
            ),
            _ => (
                ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD,
                word(&req.operand),
                0,
            ),
        };
        let flags = CompFlags::ATOMIC
            | if fetch {
                CompFlags::READ
            } else {
                CompFlags::WRITE
            };
        ep.reserve_tx(1)?;
        let wr_id = ep.track(PendingOp {
            remaining: 1,
            tx_slots: 1,
            ..ep.send_op(
                req.context,
                flags,
                if fetch { 8 } else { 0 },
                req.completion,
                segs.into(),
                None,
            )
        });
        let mut sge = ibv_sge {
            addr: sge.addr,
            length: sge.len,
            lkey: sge.lkey,
        };
        // SAFETY: ibv_send_wr is a plain C struct; all-zero is valid and every used
        // field is set below.
        let mut w: ibv_send_wr = unsafe { std::mem::zeroed() };
        w.wr_id = wr_id;
        w.opcode = opcode;
        w.num_sge = 1;
        w.sg_list = &mut sge;
        w.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        w.wr.atomic = atomic_t {
            remote_addr: req.remote.addr,
            compare_add,
            swap,
            rkey,
        };
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: qp is live (the state lock is held); the work request and its SGE
        // live until the call returns (the NIC copies them at post); the SGE is an
        // 8-byte range of a registered region the pending operation holds (the result
        // segment) or of the domain's scratch buffer.
        let rc = unsafe { ibv_post_send(qp, &mut w, &mut bad) };
        if rc != 0 {
            ep.untrack(wr_id, 1);
            return Err(Error::from(std::io::Error::from_raw_os_error(rc)).context("ibv_post_send"));
        }
        Ok(())
    }
}
