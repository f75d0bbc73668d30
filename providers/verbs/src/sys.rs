//! The thin layer over rdma-sys: owners of verbs and RDMA CM objects that free them on
//! drop, socket-address conversion, and the device scan behind getinfo.
//!
//! Thread safety: libibverbs and librdmacm document every verb as thread-safe
//! (concurrent calls on one object are allowed), which is what the `Send`/`Sync`
//! implementations below rely on.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::ptr;

use rdma_sys::*;

use crate::mapping::DeviceLimits;

/// A raw `ibv_context` that librdmacm opened ([`rdma_get_devices`]): librdmacm owns
/// it for the life of the process, so it is never closed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ctx(pub(crate) *mut ibv_context);
// SAFETY: verbs on a context are thread-safe; the pointer stays valid for the process.
unsafe impl Send for Ctx {}
// SAFETY: as above.
unsafe impl Sync for Ctx {}

impl Ctx {
    /// The device's kernel name ("rxe0", "mlx5_0").
    pub(crate) fn name(self) -> String {
        // SAFETY: self.0 is a live context whose `device` is set by libibverbs;
        // ibv_get_device_name returns a NUL-terminated string owned by the device.
        unsafe {
            let p = ibv_get_device_name((*self.0).device);
            if p.is_null() {
                return String::new();
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// The contexts librdmacm uses for connections, one per device. Empty when the host
/// has no RDMA device (libibverbs then finds no /sys/class/infiniband entries).
pub(crate) fn cm_devices() -> Vec<Ctx> {
    let mut n: i32 = 0;
    // SAFETY: rdma_get_devices writes the count and returns a NULL-terminated array
    // (or NULL) that we free with rdma_free_devices after copying the pointers; the
    // contexts themselves stay open (librdmacm keeps them).
    unsafe {
        let list = rdma_get_devices(&mut n);
        if list.is_null() {
            return Vec::new();
        }
        let v = (0..n.max(0) as usize)
            .map(|i| *list.add(i))
            .filter(|c| !c.is_null())
            .map(Ctx)
            .collect();
        rdma_free_devices(list);
        v
    }
}

/// A GID's type, from sysfs (`gid_attrs/types/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GidKind {
    /// InfiniBand (or RoCE v1, which shares sysfs's "IB/RoCE v1").
    IbOrRoceV1,
    /// RoCE v2 (UDP/IP encapsulation).
    RoceV2,
}

/// One usable GID of a port.
#[derive(Debug, Clone)]
pub(crate) struct Gid {
    pub(crate) index: u32,
    pub(crate) raw: [u8; 16],
    pub(crate) kind: GidKind,
}

impl Gid {
    /// The IP address a RoCE GID stands for (IPv4-mapped GIDs as IPv4).
    pub(crate) fn ip(&self) -> Option<IpAddr> {
        if self.kind != GidKind::RoceV2 {
            return None;
        }
        let v6 = Ipv6Addr::from(self.raw);
        Some(match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        })
    }
}

/// One port of a device.
#[derive(Debug, Clone)]
pub(crate) struct Port {
    pub(crate) num: u8,
    pub(crate) active: bool,
    pub(crate) limits: DeviceLimits,
    pub(crate) gids: Vec<Gid>,
}

/// What getinfo needs of a device.
#[derive(Debug, Clone)]
pub(crate) struct Device {
    pub(crate) name: String,
    pub(crate) ports: Vec<Port>,
    /// `IB_UVERBS_DEVICE_FLUSH_PERSISTENT` in `device_cap_flags_ex`: the device can
    /// execute IB FLUSH (persistent placement) as a responder and requester.
    pub(crate) flush_persistent: bool,
    pub(crate) max_rd_atom: u8,
    /// The device executes RC atomics (`atomic_cap` is not `IBV_ATOMIC_NONE`).
    pub(crate) atomics: bool,
    /// ... coherently with the host's CPU atomics (`IBV_ATOMIC_GLOB`).
    pub(crate) atomics_glob: bool,
}

/// `IB_UVERBS_DEVICE_FLUSH_PERSISTENT` (kernel uapi `ib_user_verbs.h`, Linux 6.2+).
pub(crate) const DEVICE_FLUSH_PERSISTENT: u64 = 1 << 39;

fn sysfs_gid_kind(dev: &str, port: u8, index: u32) -> Option<GidKind> {
    let p = format!("/sys/class/infiniband/{dev}/ports/{port}/gid_attrs/types/{index}");
    let s = std::fs::read_to_string(p).ok()?;
    Some(if s.trim().eq_ignore_ascii_case("RoCE v2") {
        GidKind::RoceV2
    } else {
        GidKind::IbOrRoceV1
    })
}

/// Queries a device: attributes, ports, GIDs, and the inline size a QP accepts.
pub(crate) fn query(ctx: Ctx) -> io::Result<Device> {
    let name = ctx.name();
    // SAFETY: zeroed C structs are valid out-parameters; ctx is live.
    let mut attr: ibv_device_attr_ex = unsafe { std::mem::zeroed() };
    // SAFETY: ibv_query_device_ex fills `attr` (input may be NULL); rdma-sys provides
    // the static-inline dispatch.
    let rc = unsafe { ibv_query_device_ex(ctx.0, ptr::null(), &mut attr) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc.abs()));
    }
    let orig = attr.orig_attr;
    let max_inline = probe_inline(ctx, orig.max_sge as u32);
    let mut ports = Vec::new();
    for num in 1..=orig.phys_port_cnt {
        // SAFETY: zeroed ibv_port_attr is a valid out-parameter.
        let mut pa: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: ___ibv_query_port is the exported symbol behind the static-inline
        // ibv_query_port; it fills pa for a valid port number of a live context.
        let rc = unsafe { ___ibv_query_port(ctx.0, num, &mut pa) };
        if rc != 0 {
            continue;
        }
        let mut gids = Vec::new();
        for index in 0..pa.gid_tbl_len.max(0) as u32 {
            // SAFETY: zeroed ibv_gid is a valid out-parameter; index < gid_tbl_len.
            let mut g: ibv_gid = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { ibv_query_gid(ctx.0, num, index as i32, &mut g) } != 0 {
                continue;
            }
            // SAFETY: every bit pattern of the union is a valid [u8; 16].
            let raw = unsafe { g.raw };
            if raw == [0; 16] {
                continue;
            }
            let kind = sysfs_gid_kind(&name, num, index).unwrap_or(GidKind::IbOrRoceV1);
            gids.push(Gid { index, raw, kind });
        }
        ports.push(Port {
            num,
            active: pa.state == ibv_port_state::IBV_PORT_ACTIVE,
            limits: DeviceLimits {
                max_msg_sz: pa.max_msg_sz as u64,
                max_qp_wr: orig.max_qp_wr.max(0) as u32,
                max_sge: orig.max_sge.max(0) as u32,
                max_cqe: orig.max_cqe.max(0) as u32,
                max_inline,
                active_mtu: pa.active_mtu,
            },
            gids,
        });
    }
    Ok(Device {
        name,
        ports,
        flush_persistent: attr.device_cap_flags_ex & DEVICE_FLUSH_PERSISTENT != 0,
        max_rd_atom: orig
            .max_qp_rd_atom
            .min(orig.max_qp_init_rd_atom)
            .clamp(0, 255) as u8,
        atomics: orig.atomic_cap != ibv_atomic_cap::IBV_ATOMIC_NONE,
        atomics_glob: orig.atomic_cap == ibv_atomic_cap::IBV_ATOMIC_GLOB,
    })
}

/// The inline data size an RC queue pair of this device accepts: devices report it
/// only through `ibv_create_qp`'s returned capabilities (libfabric's verbs provider
/// probes the same way). Tries 512, 256, ... 32 bytes; 0 if none is accepted.
fn probe_inline(ctx: Ctx, max_sge: u32) -> u32 {
    let Ok(pd) = Pd::alloc(ctx) else { return 0 };
    let Ok(cq) = Cq::create(ctx, 4) else { return 0 };
    let mut want = 512u32;
    while want >= 32 {
        let mut init = qp_init_attr(cq.cq, cq.cq, 1, 1, max_sge.clamp(1, 1), want);
        // SAFETY: pd and cq are live objects of this context; init is fully
        // initialized; the QP created is destroyed at once.
        let qp = unsafe { ibv_create_qp(pd.0, &mut init) };
        if !qp.is_null() {
            // SAFETY: qp was just created and is unused.
            unsafe { ibv_destroy_qp(qp) };
            return init.cap.max_inline_data.max(want);
        }
        want /= 2;
    }
    0
}

/// Attributes of an RC queue pair that signals every work request.
pub(crate) fn qp_init_attr(
    send_cq: *mut ibv_cq,
    recv_cq: *mut ibv_cq,
    max_send_wr: u32,
    max_recv_wr: u32,
    max_sge: u32,
    max_inline: u32,
) -> ibv_qp_init_attr {
    // SAFETY: ibv_qp_init_attr is a plain C struct; all-zero is a valid value.
    let mut a: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
    a.send_cq = send_cq;
    a.recv_cq = recv_cq;
    a.qp_type = ibv_qp_type::IBV_QPT_RC;
    a.sq_sig_all = 1;
    a.cap.max_send_wr = max_send_wr;
    a.cap.max_recv_wr = max_recv_wr;
    a.cap.max_send_sge = max_sge;
    a.cap.max_recv_sge = max_sge;
    a.cap.max_inline_data = max_inline;
    a
}

/// A protection domain.
#[derive(Debug)]
pub(crate) struct Pd(pub(crate) *mut ibv_pd);
// SAFETY: verbs are thread-safe; the PD lives until drop.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Pd {
    pub(crate) fn alloc(ctx: Ctx) -> io::Result<Pd> {
        // SAFETY: ctx is a live context.
        let p = unsafe { ibv_alloc_pd(ctx.0) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Pd(p))
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of the PD holds an Arc to its domain, which owns
        // the Pd, so none is left when this runs.
        unsafe { ibv_dealloc_pd(self.0) };
    }
}

/// A completion queue with its own completion channel (non-blocking fd).
#[derive(Debug)]
pub(crate) struct Cq {
    pub(crate) cq: *mut ibv_cq,
    pub(crate) channel: *mut ibv_comp_channel,
}
// SAFETY: verbs are thread-safe; the CQ lives until drop.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

impl Cq {
    pub(crate) fn create(ctx: Ctx, entries: i32) -> io::Result<Cq> {
        // SAFETY: ctx is live; the channel is destroyed on error or on drop.
        let channel = unsafe { ibv_create_comp_channel(ctx.0) };
        if channel.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: channel is live.
        let fd = unsafe { (*channel).fd };
        set_nonblocking(fd)?;
        // SAFETY: ctx and channel are live.
        let cq = unsafe { ibv_create_cq(ctx.0, entries, ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: no CQ uses the channel.
            unsafe { ibv_destroy_comp_channel(channel) };
            return Err(e);
        }
        Ok(Cq { cq, channel })
    }

    /// The completion channel's descriptor (readable after a requested notification).
    pub(crate) fn fd(&self) -> RawFd {
        // SAFETY: the channel lives as long as self.
        unsafe { (*self.channel).fd }
    }

    /// Asks for a notification at the next completion.
    pub(crate) fn arm(&self) {
        // SAFETY: the CQ is live; rdma-sys implements the static-inline dispatch.
        unsafe { ibv_req_notify_cq(self.cq, 0) };
    }

    /// Consumes and acknowledges pending notifications (the fd is non-blocking).
    pub(crate) fn drain_events(&self) {
        loop {
            let mut cq: *mut ibv_cq = ptr::null_mut();
            let mut ctx: *mut libc::c_void = ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; out-pointers are valid.
            if unsafe { ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } != 0 {
                return;
            }
            // SAFETY: the event was for our CQ (one CQ per channel); acking it is
            // required before the CQ can be destroyed.
            unsafe { ibv_ack_cq_events(cq, 1) };
        }
    }

    /// Polls up to `wc.len()` completions.
    pub(crate) fn poll(&self, wc: &mut [ibv_wc]) -> usize {
        // SAFETY: wc is a live array of the length given; the CQ is live.
        let n = unsafe { ibv_poll_cq(self.cq, wc.len() as i32, wc.as_mut_ptr()) };
        n.max(0) as usize
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: queue pairs using the CQ hold an Arc to it, so none is left; every
        // event was acknowledged in drain_events.
        unsafe {
            ibv_destroy_cq(self.cq);
            ibv_destroy_comp_channel(self.channel);
        }
    }
}

/// A memory registration.
#[derive(Debug)]
pub(crate) struct Mr(pub(crate) *mut ibv_mr);
// SAFETY: verbs are thread-safe; the MR lives until drop.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    /// `addr..addr+len` must stay mapped (and not be freed) until the returned `Mr`
    /// is dropped, and `pd` must outlive it. The NIC may write the range at any time
    /// the access flags allow.
    pub(crate) unsafe fn register(
        pd: &Pd,
        addr: *mut u8,
        len: usize,
        access: u32,
    ) -> io::Result<Mr> {
        let mr = ibv_reg_mr(pd.0, addr.cast(), len, access as i32);
        if mr.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Mr(mr))
    }
    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: the MR is live.
        unsafe { (*self.0).lkey }
    }
    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: the MR is live.
        unsafe { (*self.0).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: operations using the MR hold its region (and so this Mr) alive.
        unsafe { ibv_dereg_mr(self.0) };
    }
}

/// The RDMA CM event channel of a fabric (non-blocking fd).
#[derive(Debug)]
pub(crate) struct EventChannel(pub(crate) *mut rdma_event_channel);
// SAFETY: librdmacm calls are thread-safe; reads of events are serialized by the
// fabric's CM lock.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub(crate) fn create() -> io::Result<EventChannel> {
        // SAFETY: plain constructor.
        let ch = unsafe { rdma_create_event_channel() };
        if ch.is_null() {
            return Err(io::Error::last_os_error());
        }
        let ch = EventChannel(ch);
        set_nonblocking(ch.fd())?;
        Ok(ch)
    }
    pub(crate) fn fd(&self) -> RawFd {
        // SAFETY: the channel is live.
        unsafe { (*self.0).fd }
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on the channel holds the fabric (which owns this) alive.
        unsafe { rdma_destroy_event_channel(self.0) };
    }
}

/// An owned RDMA CM identifier (and its queue pair, if one was created on it).
#[derive(Debug)]
pub(crate) struct CmId(pub(crate) *mut rdma_cm_id);
// SAFETY: librdmacm calls on an id are thread-safe; the endpoint serializes its own.
unsafe impl Send for CmId {}
// SAFETY: as above.
unsafe impl Sync for CmId {}

impl CmId {
    pub(crate) fn create(ch: &EventChannel, key: u64) -> io::Result<CmId> {
        let mut id: *mut rdma_cm_id = ptr::null_mut();
        // SAFETY: ch is live; the context is an integer key, never dereferenced.
        let rc = unsafe {
            rdma_create_id(
                ch.0,
                &mut id,
                key as usize as *mut libc::c_void,
                rdma_port_space::RDMA_PS_TCP,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(CmId(id))
    }
    /// Sets the key events for this id are routed by.
    pub(crate) fn set_key(&self, key: u64) {
        // SAFETY: the context field belongs to the application.
        unsafe { (*self.0).context = key as usize as *mut libc::c_void };
    }
    pub(crate) fn verbs(&self) -> *mut ibv_context {
        // SAFETY: the id is live.
        unsafe { (*self.0).verbs }
    }
    pub(crate) fn qp(&self) -> *mut ibv_qp {
        // SAFETY: the id is live.
        unsafe { (*self.0).qp }
    }
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id is live; librdmacm returns a pointer into it.
        let sa = unsafe { rdma_get_local_addr(&*self.0) };
        // SAFETY: sa points into the live id.
        unsafe { from_sockaddr(sa) }
    }
    pub(crate) fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as above.
        let sa = unsafe { rdma_get_peer_addr(&*self.0) };
        // SAFETY: as above.
        unsafe { from_sockaddr(sa) }
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: every event of the channel is acknowledged as soon as it is read,
        // so rdma_destroy_id does not wait; the QP (if any) is destroyed first, and
        // outstanding work requests hold only memory, not the QP.
        unsafe {
            if !(*self.0).qp.is_null() {
                rdma_destroy_qp(self.0);
            }
            rdma_destroy_id(self.0);
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A socket address as `sockaddr_storage`.
pub(crate) fn to_sockaddr(a: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { ptr::write((&mut s as *mut libc::sockaddr_storage).cast(), sin) };
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { ptr::write((&mut s as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    s
}

/// Reads a socket address.
///
/// # Safety
/// `sa` must point to a `sockaddr_in` or `sockaddr_in6` as its family says.
pub(crate) unsafe fn from_sockaddr(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    match (*sa).sa_family as i32 {
        libc::AF_INET => {
            let sin = &*(sa as *const libc::sockaddr_in);
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            let sin6 = &*(sa as *const libc::sockaddr_in6);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// librdmacm's description of an event type.
pub(crate) fn event_str(ev: u32) -> String {
    // SAFETY: rdma_event_str returns a static string for any value.
    unsafe {
        let p = rdma_event_str(ev);
        if p.is_null() {
            return format!("event {ev}");
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// libibverbs' description of a work-completion status.
pub(crate) fn wc_status_str(status: u32) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    unsafe {
        let p = ibv_wc_status_str(status);
        if p.is_null() {
            return format!("status {status}");
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        for a in ["10.0.2.15:7471", "[fe80::1]:20049", "127.0.0.1:0"] {
            let a: SocketAddr = a.parse().unwrap();
            let s = to_sockaddr(a);
            // SAFETY: s holds the family's struct.
            let back = unsafe { from_sockaddr((&s as *const libc::sockaddr_storage).cast()) };
            assert_eq!(back, Some(a));
        }
    }

    #[test]
    fn gid_ips() {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&[10, 0, 2, 15]);
        let g = Gid {
            index: 1,
            raw,
            kind: GidKind::RoceV2,
        };
        assert_eq!(g.ip(), Some("10.0.2.15".parse().unwrap()));
        let ib = Gid {
            kind: GidKind::IbOrRoceV1,
            ..g
        };
        assert_eq!(ib.ip(), None);
    }

    #[test]
    fn constants_match_the_headers() {
        use crate::mapping::*;
        assert_eq!(
            ACCESS_LOCAL_WRITE,
            ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
        );
        assert_eq!(
            ACCESS_REMOTE_WRITE,
            ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
        );
        assert_eq!(
            ACCESS_REMOTE_READ,
            ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
        );
        assert_eq!(
            ACCESS_REMOTE_ATOMIC,
            ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0
        );
        assert_eq!(wc::REM_ACCESS_ERR, ibv_wc_status::IBV_WC_REM_ACCESS_ERR);
        assert_eq!(wc::REM_INV_REQ_ERR, ibv_wc_status::IBV_WC_REM_INV_REQ_ERR);
        assert_eq!(wc::WR_FLUSH_ERR, ibv_wc_status::IBV_WC_WR_FLUSH_ERR);
        assert_eq!(
            wc::RNR_RETRY_EXC_ERR,
            ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR
        );
        assert_eq!(wc::GENERAL_ERR, ibv_wc_status::IBV_WC_GENERAL_ERR);
        assert_eq!(mtu_bytes(ibv_mtu::IBV_MTU_4096), 4096);
        assert_eq!(wc_status_str(wc::REM_ACCESS_ERR), "remote access error");
    }

    #[test]
    fn no_device_here_means_an_empty_list() {
        // This host has no /sys/class/infiniband: librdmacm finds no device. (Inside
        // the VM tier with rdma_rxe the list is non-empty and this checks nothing.)
        if std::path::Path::new("/sys/class/infiniband").exists() {
            return;
        }
        assert!(cm_devices().is_empty());
    }
}
