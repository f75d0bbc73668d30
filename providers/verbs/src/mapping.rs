//! Pure translations between the fabric API and verbs: access flags, work-completion
//! statuses, path MTUs, connection-data framing and limits. No device is needed, so all
//! of it is unit-tested on any machine. The numeric values are the ABI constants of
//! `<infiniband/verbs.h>` (stable since libibverbs 1.0); with the `verbs` feature a
//! test checks each against rdma-sys.

use std::net::{IpAddr, SocketAddr};

use fabric_core::{Access, CqErrorKind, Limits, MrFlags, ShutdownReason};

/// `IBV_ACCESS_LOCAL_WRITE`.
pub const ACCESS_LOCAL_WRITE: u32 = 1;
/// `IBV_ACCESS_REMOTE_WRITE`.
pub const ACCESS_REMOTE_WRITE: u32 = 2;
/// `IBV_ACCESS_REMOTE_READ`.
pub const ACCESS_REMOTE_READ: u32 = 4;
/// `IBV_ACCESS_REMOTE_ATOMIC`.
pub const ACCESS_REMOTE_ATOMIC: u32 = 8;

/// The `ibv_reg_mr` access flags for a registration.
///
/// - `LOCAL_WRITE` whenever the NIC writes the region for this side: a receive or read
///   destination (`RECV`, `READ`) and, as verbs requires, any `REMOTE_WRITE` region.
/// - `REMOTE_READ`/`REMOTE_WRITE` as asked, and `REMOTE_ATOMIC` when both are (an RC
///   atomic reads and writes the target, as softroce checks it).
/// - A `PMEM` region that peers may write also gets `REMOTE_READ` when `raw_commit`
///   (COMMIT by read-after-write is in use): the 8-byte read that follows the writes
///   reads the written range, as librpma's flush does (so such a region is readable by
///   the peer; documented in the crate docs).
pub fn ibv_access(access: Access, flags: MrFlags, raw_commit: bool) -> u32 {
    let mut a = 0;
    if access.intersects(Access::RECV | Access::READ | Access::REMOTE_WRITE) {
        a |= ACCESS_LOCAL_WRITE;
    }
    if access.contains(Access::REMOTE_WRITE) {
        a |= ACCESS_REMOTE_WRITE;
        if raw_commit && flags.contains(MrFlags::PMEM) {
            a |= ACCESS_REMOTE_READ;
        }
    }
    if access.contains(Access::REMOTE_READ) {
        a |= ACCESS_REMOTE_READ;
    }
    if access.contains(Access::REMOTE) {
        a |= ACCESS_REMOTE_ATOMIC;
    }
    a
}

/// `enum ibv_wc_status` values.
#[allow(missing_docs)]
pub mod wc {
    pub const SUCCESS: u32 = 0;
    pub const LOC_LEN_ERR: u32 = 1;
    pub const LOC_QP_OP_ERR: u32 = 2;
    pub const LOC_EEC_OP_ERR: u32 = 3;
    pub const LOC_PROT_ERR: u32 = 4;
    pub const WR_FLUSH_ERR: u32 = 5;
    pub const MW_BIND_ERR: u32 = 6;
    pub const BAD_RESP_ERR: u32 = 7;
    pub const LOC_ACCESS_ERR: u32 = 8;
    pub const REM_INV_REQ_ERR: u32 = 9;
    pub const REM_ACCESS_ERR: u32 = 10;
    pub const REM_OP_ERR: u32 = 11;
    pub const RETRY_EXC_ERR: u32 = 12;
    pub const RNR_RETRY_EXC_ERR: u32 = 13;
    pub const LOC_RDD_VIOL_ERR: u32 = 14;
    pub const REM_INV_RD_REQ_ERR: u32 = 15;
    pub const REM_ABORT_ERR: u32 = 16;
    pub const INV_EECN_ERR: u32 = 17;
    pub const INV_EEC_STATE_ERR: u32 = 18;
    pub const FATAL_ERR: u32 = 19;
    pub const RESP_TIMEOUT_ERR: u32 = 20;
    pub const GENERAL_ERR: u32 = 21;
}

/// The error kind of a failed work completion: the same kinds tcp and softroce give
/// (a bad key, bounds or rights is `RemoteAccess`, a request the responder refuses is
/// `RemoteInvalid`, work flushed by a dead queue pair is `Canceled`).
pub fn cq_error_kind(status: u32) -> CqErrorKind {
    match status {
        wc::LOC_LEN_ERR => CqErrorKind::Truncated,
        wc::LOC_PROT_ERR | wc::LOC_ACCESS_ERR => CqErrorKind::LocalProtection,
        wc::WR_FLUSH_ERR => CqErrorKind::Canceled,
        wc::REM_INV_REQ_ERR | wc::REM_INV_RD_REQ_ERR => CqErrorKind::RemoteInvalid,
        wc::REM_ACCESS_ERR => CqErrorKind::RemoteAccess,
        wc::REM_OP_ERR => CqErrorKind::RemoteOperation,
        wc::RETRY_EXC_ERR | wc::RESP_TIMEOUT_ERR => CqErrorKind::RetryExceeded,
        wc::RNR_RETRY_EXC_ERR => CqErrorKind::RnrRetryExceeded,
        wc::REM_ABORT_ERR => CqErrorKind::ConnectionLost,
        _ => CqErrorKind::Other,
    }
}

/// The error kind of a failed *receive* work completion. Two statuses mean something
/// else on a receive than on a send:
/// - A message longer than the receive is `Truncated`: hardware reports
///   `LOC_LEN_ERR`; rxe (Linux 6.1) reports `LOC_QP_OP_ERR`, because its `copy_data`
///   fails the too-short receive with -EINVAL, which the responder treats as a
///   malformed WQE. The provider's receive WQEs carry only valid lkeys of live
///   registrations, so on this provider that status has no other cause.
/// - A remote-side status (`REM_ACCESS_ERR`, `REM_INV_REQ_ERR`, `REM_OP_ERR`) on a
///   receive is the responder's own record of a request *from the peer* it refused (a
///   write with immediate data with a bad key takes a receive, then fails it): nothing
///   was placed in the receive, and the refusal ends the connection, so the receive
///   is flushed by that end: `Canceled`, as every other provider reports it.
pub fn recv_error_kind(status: u32) -> CqErrorKind {
    match status {
        wc::LOC_LEN_ERR | wc::LOC_QP_OP_ERR => CqErrorKind::Truncated,
        wc::REM_ACCESS_ERR | wc::REM_INV_REQ_ERR | wc::REM_INV_RD_REQ_ERR | wc::REM_OP_ERR => {
            CqErrorKind::Canceled
        }
        s => cq_error_kind(s),
    }
}

/// Why a connection ends when one of its work requests fails with `status` (every
/// error but a flush moves an RC queue pair to the error state): `None` for success
/// and flushes (a consequence, not a cause).
pub fn shutdown_cause(status: u32) -> Option<ShutdownReason> {
    match status {
        wc::SUCCESS | wc::WR_FLUSH_ERR => None,
        wc::REM_ACCESS_ERR | wc::REM_INV_REQ_ERR | wc::REM_INV_RD_REQ_ERR => {
            Some(ShutdownReason::AccessError)
        }
        wc::RETRY_EXC_ERR | wc::RNR_RETRY_EXC_ERR | wc::RESP_TIMEOUT_ERR | wc::REM_ABORT_ERR => {
            Some(ShutdownReason::Lost)
        }
        _ => Some(ShutdownReason::Protocol),
    }
}

/// Bytes of an `enum ibv_mtu` value (1 = 256 ... 5 = 4096); 0 for an unknown value.
pub fn mtu_bytes(mtu: u32) -> usize {
    match mtu {
        1..=5 => 128 << mtu,
        _ => 0,
    }
}

/// Private data an RDMA CM REQ carries for the application in the TCP port space
/// (92 bytes of the IB CM REQ less rdma_cm's 36-byte header).
pub const REQ_PRIVATE_DATA: usize = 56;
/// Connection data the provider offers: the REQ's private data less the one-byte
/// length prefix (IB CM pads private data to its fixed size, so the length is sent).
pub const CM_DATA_SIZE: usize = REQ_PRIVATE_DATA - 1;

/// Frames connection data: a length byte, then the bytes. `None` if too long.
pub fn frame_cm_data(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() > CM_DATA_SIZE {
        return None;
    }
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(data.len() as u8);
    v.extend_from_slice(data);
    Some(v)
}

/// The application's bytes of received private data (which IB CM pads with zeros);
/// data from a peer that did not frame it (too short a length byte) is returned whole.
pub fn unframe_cm_data(raw: &[u8]) -> Vec<u8> {
    match raw.split_first() {
        Some((&n, rest)) if (n as usize) <= rest.len() => rest[..n as usize].to_vec(),
        _ => raw.to_vec(),
    }
}

/// What a device and port report, as far as the offered limits depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// `ibv_port_attr.max_msg_sz`.
    pub max_msg_sz: u64,
    /// `ibv_device_attr.max_qp_wr`.
    pub max_qp_wr: u32,
    /// `ibv_device_attr.max_sge`.
    pub max_sge: u32,
    /// `ibv_device_attr.max_cqe`.
    pub max_cqe: u32,
    /// Inline data a queue pair accepted when probed (`ibv_qp_cap.max_inline_data`).
    pub max_inline: u32,
    /// `ibv_port_attr.active_mtu` (an `enum ibv_mtu`).
    pub active_mtu: u32,
}

/// Work requests per queue the provider asks for at most (a device's `max_qp_wr` is
/// often 16K or more; queues that deep cost memory for every endpoint).
pub const MAX_QUEUE: usize = 1024;
/// Local iovecs per operation at most.
pub const MAX_IOV: usize = 16;
/// Remote iovecs per RMA operation (each is one work request).
pub const MAX_RMA_IOV: usize = 8;

/// The limits offered for a device and port.
pub fn limits(d: &DeviceLimits) -> Limits {
    let mut l = Limits::DEFAULT;
    l.max_msg_size = usize::try_from(d.max_msg_sz).unwrap_or(usize::MAX);
    l.inject_size = d.max_inline as usize;
    l.mr_key_size = 4;
    l.cq_data_size = 4;
    // One operation takes up to MAX_RMA_IOV work requests plus the read of a
    // read-after-write; the send queue is sized in work requests, so an endpoint
    // offers tx_size operations of the largest kind.
    let q = (d.max_qp_wr as usize).min(MAX_QUEUE);
    l.tx_size = (q / (MAX_RMA_IOV + 1)).max(1);
    l.rx_size = q.max(1);
    l.iov_limit = (d.max_sge as usize).clamp(1, MAX_IOV);
    l.rma_iov_limit = MAX_RMA_IOV;
    l.cm_data_size = CM_DATA_SIZE;
    l.mtu = mtu_bytes(d.active_mtu);
    // RC cannot truncate: a SEND longer than the receive is a length error at the
    // responder, whose queue pair goes to the error state (and NAKs the requester).
    l.truncation_ends_connection = true;
    l
}

/// The IP address of the GID an answer was made for, from its fabric name
/// (`RoCEv2 port 1 gid 1 (192.168.100.2)`); `None` for an InfiniBand GID.
pub fn gid_ip(fabric_name: &str) -> Option<IpAddr> {
    let s = fabric_name.rsplit_once('(')?.1.strip_suffix(')')?;
    s.parse().ok()
}

/// Whether `gid` can stand in for the loopback address `lo`: an address of the same
/// family that is not IPv6 link-local (which needs a scope).
pub fn gid_serves_loopback(lo: IpAddr, gid: IpAddr) -> bool {
    match (lo, gid) {
        (IpAddr::V4(_), IpAddr::V4(_)) => true,
        (IpAddr::V6(_), IpAddr::V6(g)) => g.segments()[0] & 0xffc0 != 0xfe80,
        _ => false,
    }
}

/// Loopback on verbs. rdma_cm cannot bind or resolve 127.0.0.1 on RoCE (no device
/// has a GID for `lo`; `rdma_bind_addr` fails with ENODEV), so the provider gives a
/// loopback address the meaning it has everywhere else, "this machine", by using the
/// answer's own GID address `gid` instead: a connection between two ids on that
/// address never leaves the device (rxe loops it back). `addr` unchanged when it is
/// not loopback; `None` when it is but `gid` cannot stand in for it.
pub fn loopback_to_gid(addr: SocketAddr, gid: Option<IpAddr>) -> Option<SocketAddr> {
    if !addr.ip().is_loopback() {
        return Some(addr);
    }
    let g = gid.filter(|g| gid_serves_loopback(addr.ip(), *g))?;
    Some(SocketAddr::new(g, addr.port()))
}

/// The reverse of [`loopback_to_gid`] for addresses reported to the application: on
/// an endpoint opened on the loopback address `lo`, the device's own address `gid`
/// reads as `lo` (the port kept); every other address is unchanged.
pub fn gid_to_loopback(addr: SocketAddr, gid: Option<IpAddr>, lo: Option<IpAddr>) -> SocketAddr {
    match (gid, lo) {
        (Some(g), Some(l)) if addr.ip() == g => SocketAddr::new(l, addr.port()),
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_flags() {
        assert_eq!(
            ibv_access(Access::SEND | Access::WRITE, MrFlags::empty(), true),
            0
        );
        assert_eq!(
            ibv_access(Access::RECV, MrFlags::empty(), true),
            ACCESS_LOCAL_WRITE
        );
        assert_eq!(
            ibv_access(Access::READ, MrFlags::empty(), true),
            ACCESS_LOCAL_WRITE
        );
        assert_eq!(
            ibv_access(Access::REMOTE_WRITE, MrFlags::empty(), true),
            ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE
        );
        assert_eq!(
            ibv_access(Access::REMOTE_READ, MrFlags::empty(), true),
            ACCESS_REMOTE_READ
        );
        assert_eq!(
            ibv_access(Access::REMOTE, MrFlags::empty(), true),
            ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE | ACCESS_REMOTE_READ | ACCESS_REMOTE_ATOMIC
        );
        // A PMEM target of read-after-write commits is readable by the 8-byte read.
        assert_eq!(
            ibv_access(Access::REMOTE_WRITE, MrFlags::PMEM, true),
            ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE | ACCESS_REMOTE_READ
        );
        assert_eq!(
            ibv_access(
                Access::REMOTE_WRITE,
                MrFlags::PMEM | MrFlags::UNCACHED,
                false
            ),
            ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE
        );
    }

    #[test]
    fn statuses_map_to_the_kinds_of_the_other_providers() {
        assert_eq!(cq_error_kind(wc::REM_ACCESS_ERR), CqErrorKind::RemoteAccess);
        assert_eq!(
            cq_error_kind(wc::REM_INV_REQ_ERR),
            CqErrorKind::RemoteInvalid
        );
        assert_eq!(cq_error_kind(wc::WR_FLUSH_ERR), CqErrorKind::Canceled);
        assert_eq!(cq_error_kind(wc::LOC_LEN_ERR), CqErrorKind::Truncated);
        assert_eq!(cq_error_kind(wc::RETRY_EXC_ERR), CqErrorKind::RetryExceeded);
        assert_eq!(
            cq_error_kind(wc::RNR_RETRY_EXC_ERR),
            CqErrorKind::RnrRetryExceeded
        );
        assert_eq!(cq_error_kind(wc::REM_OP_ERR), CqErrorKind::RemoteOperation);
        assert_eq!(
            cq_error_kind(wc::LOC_PROT_ERR),
            CqErrorKind::LocalProtection
        );
        assert_eq!(cq_error_kind(999), CqErrorKind::Other);
        // Receives: too long a message (hardware, rxe), a refused request of the peer.
        for (status, kind) in [
            (wc::LOC_LEN_ERR, CqErrorKind::Truncated),
            (wc::LOC_QP_OP_ERR, CqErrorKind::Truncated),
            (wc::REM_ACCESS_ERR, CqErrorKind::Canceled),
            (wc::WR_FLUSH_ERR, CqErrorKind::Canceled),
            (wc::RETRY_EXC_ERR, CqErrorKind::RetryExceeded),
        ] {
            assert_eq!(recv_error_kind(status), kind, "receive, status {status}");
        }
        assert_eq!(shutdown_cause(wc::SUCCESS), None);
        assert_eq!(shutdown_cause(wc::WR_FLUSH_ERR), None);
        assert_eq!(
            shutdown_cause(wc::REM_ACCESS_ERR),
            Some(ShutdownReason::AccessError)
        );
        assert_eq!(
            shutdown_cause(wc::REM_INV_REQ_ERR),
            Some(ShutdownReason::AccessError)
        );
        assert_eq!(
            shutdown_cause(wc::RETRY_EXC_ERR),
            Some(ShutdownReason::Lost)
        );
        assert_eq!(
            shutdown_cause(wc::LOC_LEN_ERR),
            Some(ShutdownReason::Protocol)
        );
    }

    #[test]
    fn mtus() {
        assert_eq!(
            (1..=5).map(mtu_bytes).collect::<Vec<_>>(),
            [256, 512, 1024, 2048, 4096]
        );
        assert_eq!(mtu_bytes(0), 0);
        assert_eq!(mtu_bytes(6), 0);
    }

    #[test]
    fn cm_data_framing() {
        let f = frame_cm_data(b"hello").unwrap();
        assert_eq!(f, b"\x05hello");
        // IB CM pads the REQ's private data to 56 bytes.
        let mut padded = f.clone();
        padded.resize(REQ_PRIVATE_DATA, 0);
        assert_eq!(unframe_cm_data(&padded), b"hello");
        assert_eq!(unframe_cm_data(&[0; 56]), b"");
        assert_eq!(unframe_cm_data(&[]), b"");
        let max = vec![7u8; CM_DATA_SIZE];
        assert_eq!(frame_cm_data(&max).unwrap().len(), REQ_PRIVATE_DATA);
        assert!(frame_cm_data(&[0; CM_DATA_SIZE + 1]).is_none());
        // Unframed data (length byte larger than what follows) is kept whole.
        assert_eq!(unframe_cm_data(b"\xffab"), b"\xffab");
    }

    #[test]
    fn limits_of_an_rxe_like_device() {
        // rdma_rxe on Linux 6.1 reports these (max_qp_wr 1048576, max_sge 32,
        // max_inline 160 on a probed QP... any values work here).
        let d = DeviceLimits {
            max_msg_sz: 1 << 31,
            max_qp_wr: 1 << 20,
            max_sge: 32,
            max_cqe: 1 << 20,
            max_inline: 160,
            active_mtu: 3,
        };
        let l = limits(&d);
        assert_eq!(l.max_msg_size, 1 << 31);
        assert_eq!(l.inject_size, 160);
        assert_eq!((l.mr_key_size, l.cq_data_size), (4, 4));
        assert_eq!(l.tx_size, MAX_QUEUE / (MAX_RMA_IOV + 1));
        assert_eq!(l.rx_size, MAX_QUEUE);
        assert_eq!(l.iov_limit, MAX_IOV);
        assert_eq!(l.rma_iov_limit, MAX_RMA_IOV);
        assert_eq!(l.cm_data_size, 55);
        assert_eq!(l.mtu, 1024);
        // A small device: its own limits win.
        let small = limits(&DeviceLimits {
            max_qp_wr: 64,
            max_sge: 4,
            max_inline: 0,
            ..d
        });
        assert_eq!(
            (
                small.tx_size,
                small.rx_size,
                small.iov_limit,
                small.inject_size
            ),
            (7, 64, 4, 0)
        );
    }
    #[test]
    fn loopback_is_the_gid_s_address() {
        let v4: IpAddr = "192.168.100.2".parse().unwrap();
        let ll: IpAddr = "fe80::5054:ff:fe12:3456".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:7471".parse().unwrap();
        assert_eq!(gid_ip("RoCEv2 port 1 gid 1 (192.168.100.2)"), Some(v4));
        assert_eq!(gid_ip("IB port 1 gid 0"), None);
        assert_eq!(
            loopback_to_gid(lo, Some(v4)),
            Some("192.168.100.2:7471".parse().unwrap())
        );
        assert_eq!(loopback_to_gid(lo, Some(ll)), None);
        assert_eq!(loopback_to_gid(lo, None), None);
        assert!(!gid_serves_loopback("::1".parse().unwrap(), ll));
        assert!(gid_serves_loopback(
            "::1".parse().unwrap(),
            "fd00::2".parse().unwrap()
        ));
        let other: SocketAddr = "10.0.0.9:1".parse().unwrap();
        assert_eq!(loopback_to_gid(other, None), Some(other));
        let own: SocketAddr = "192.168.100.2:9".parse().unwrap();
        let l = Some(lo.ip());
        assert_eq!(
            gid_to_loopback(own, Some(v4), l),
            "127.0.0.1:9".parse().unwrap()
        );
        assert_eq!(gid_to_loopback(other, Some(v4), l), other);
        assert_eq!(gid_to_loopback(own, Some(v4), None), own);
    }
}
