//! Work-request planning, independent of libibverbs: which work requests an operation
//! becomes, with which scatter/gather entries. The provider turns a plan into
//! `ibv_send_wr` chains (see `objects`); keeping the planning pure lets it be tested
//! without a device.

use fabric_core::{OpFlags, RemoteIov};

/// One scatter/gather entry: what `struct ibv_sge` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// Virtual address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Local key of the registration that holds the range (0 for inline data).
    pub lkey: u32,
}

/// The RDMA opcode of a planned work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RdmaOp {
    /// RDMA WRITE.
    Write,
    /// RDMA WRITE with immediate (the last write of a `writedata`).
    WriteImm(u32),
    /// RDMA READ of the operation's data.
    Read,
    /// The read of a read-after-write: `len` bytes (0 for delivery, up to 8 for
    /// commit) at the start of the last remote range, into the domain's scratch buffer.
    FlushRead {
        /// Bytes to read.
        len: u32,
    },
}

/// One planned RDMA work request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaWr {
    /// Opcode.
    pub op: RdmaOp,
    /// Local entries (empty for a flush read, whose buffer the provider adds).
    pub sges: Vec<Sge>,
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
}

/// How many bytes a read-after-write reads: librpma reads 8 bytes so that the NIC
/// issues a PCIe read, which cannot pass the writes before it (a zero-length read
/// needs no memory access and orders nothing below the NIC).
pub const RAW_READ: u32 = 8;

/// Splits the local entries over the remote ranges: the `i`-th work request carries
/// the local bytes that land in `remote[i]`. The caller has checked that both sides
/// hold the same number of bytes and that each range fits in 32 bits.
pub fn split(local: &[Sge], remote: &[RemoteIov]) -> Vec<(Vec<Sge>, RemoteIov)> {
    let mut out = Vec::with_capacity(remote.len());
    let mut it = local.iter().copied().filter(|s| s.len > 0);
    let mut cur: Option<Sge> = it.next();
    for r in remote {
        let mut need = r.len as u64;
        let mut sges = Vec::new();
        while need > 0 {
            let Some(s) = cur else { break };
            let take = (s.len as u64).min(need) as u32;
            sges.push(Sge { len: take, ..s });
            need -= take as u64;
            if take == s.len {
                cur = it.next();
            } else {
                cur = Some(Sge {
                    addr: s.addr + take as u64,
                    len: s.len - take,
                    lkey: s.lkey,
                });
            }
        }
        out.push((sges, *r));
    }
    out
}

/// Plans an RMA write: one WRITE per remote range (the last one with immediate data
/// when `data` is set), then, for `DELIVERY_COMPLETE`, a zero-length read, and for
/// `COMMIT_COMPLETE` (read-after-write) an 8-byte read of the last range (fewer when
/// it is shorter).
pub fn plan_write(
    local: &[Sge],
    remote: &[RemoteIov],
    data: Option<u32>,
    flags: OpFlags,
) -> Vec<RdmaWr> {
    let parts = split(local, remote);
    let n = parts.len();
    let mut wrs: Vec<RdmaWr> = parts
        .into_iter()
        .enumerate()
        .map(|(i, (sges, r))| RdmaWr {
            op: match data {
                Some(d) if i + 1 == n => RdmaOp::WriteImm(d),
                _ => RdmaOp::Write,
            },
            sges,
            remote_addr: r.addr,
            rkey: r.key as u32,
        })
        .collect();
    let flush_len = if flags.contains(OpFlags::COMMIT_COMPLETE) {
        Some(
            remote
                .last()
                .map_or(0, |r| (r.len as u64).min(RAW_READ as u64) as u32),
        )
    } else if flags.contains(OpFlags::DELIVERY_COMPLETE) {
        Some(0)
    } else {
        None
    };
    if let (Some(len), Some(last)) = (flush_len, remote.last()) {
        wrs.push(RdmaWr {
            op: RdmaOp::FlushRead { len },
            sges: Vec::new(),
            remote_addr: last.addr,
            rkey: last.key as u32,
        });
    }
    wrs
}

/// Plans an RMA read: one READ per remote range.
pub fn plan_read(local: &[Sge], remote: &[RemoteIov]) -> Vec<RdmaWr> {
    split(local, remote)
        .into_iter()
        .map(|(sges, r)| RdmaWr {
            op: RdmaOp::Read,
            sges,
            remote_addr: r.addr,
            rkey: r.key as u32,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sge(addr: u64, len: u32, lkey: u32) -> Sge {
        Sge { addr, len, lkey }
    }
    fn riov(addr: u64, len: usize, key: u64) -> RemoteIov {
        RemoteIov { addr, len, key }
    }

    #[test]
    fn one_to_one() {
        let p = split(&[sge(100, 10, 1)], &[riov(5000, 10, 9)]);
        assert_eq!(p, vec![(vec![sge(100, 10, 1)], riov(5000, 10, 9))]);
    }

    #[test]
    fn local_entries_split_at_remote_boundaries() {
        // 3 + 7 local bytes over remote ranges of 4 and 6.
        let p = split(
            &[sge(100, 3, 1), sge(200, 7, 2)],
            &[riov(0x1000, 4, 9), riov(0x2000, 6, 8)],
        );
        assert_eq!(p[0].0, vec![sge(100, 3, 1), sge(200, 1, 2)]);
        assert_eq!(p[1].0, vec![sge(201, 6, 2)]);
        assert_eq!((p[0].1.addr, p[1].1.addr), (0x1000, 0x2000));
    }

    #[test]
    fn zero_length_entries_vanish() {
        let p = split(
            &[sge(1, 0, 1), sge(2, 4, 1)],
            &[riov(0, 0, 3), riov(8, 4, 3)],
        );
        assert_eq!(p[0].0, vec![]);
        assert_eq!(p[1].0, vec![sge(2, 4, 1)]);
    }

    #[test]
    fn writes_with_data_and_completion_levels() {
        let l = [sge(100, 16, 1)];
        let r = [riov(0x1000, 8, 7), riov(0x3000, 8, 7)];
        let w = plan_write(&l, &r, Some(0xabcd), OpFlags::COMPLETION);
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[0].op, w[1].op),
            (RdmaOp::Write, RdmaOp::WriteImm(0xabcd))
        );
        assert_eq!(w[1].sges, vec![sge(108, 8, 1)]);

        let d = plan_write(&l, &r, None, OpFlags::DELIVERY_COMPLETE);
        assert_eq!(d.len(), 3);
        assert_eq!(d[2].op, RdmaOp::FlushRead { len: 0 });

        let c = plan_write(&l, &r, None, OpFlags::COMMIT_COMPLETE);
        assert_eq!(c[2].op, RdmaOp::FlushRead { len: 8 });
        assert_eq!((c[2].remote_addr, c[2].rkey), (0x3000, 7));

        // A short last range is read only as far as it goes.
        let s = plan_write(
            &[sge(1, 3, 1)],
            &[riov(0x10, 3, 2)],
            None,
            OpFlags::COMMIT_COMPLETE,
        );
        assert_eq!(s[1].op, RdmaOp::FlushRead { len: 3 });
    }

    #[test]
    fn reads() {
        let p = plan_read(&[sge(100, 8, 1)], &[riov(0x10, 4, 2), riov(0x20, 4, 3)]);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|w| w.op == RdmaOp::Read));
        assert_eq!((p[1].sges[0].addr, p[1].rkey), (104, 3));
    }
}
