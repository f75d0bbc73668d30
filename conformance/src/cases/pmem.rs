//! pmem: persistent-memory regions and COMMIT_COMPLETE writes. Every case needs
//! `RMA_PMEM` and is skipped, with the provider's reason, where getinfo does not offer
//! it. Target regions are `pmem::Mapping`s of files in a temporary directory; after a
//! COMMIT completes, the file is read back with a plain `pread` (not through the
//! target's mapping) to check the bytes are in it.
//!
//! (PMEM registration of heap memory being refused is `mr/pmem_heap_refused`; COMMIT
//! without `RMA_PMEM` or into one non-PMEM region is `errors/commit_without_pmem`.)

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use fabric::{Access, Caps, CompFlags, CqErrorKind, MemoryRegion, MrFlags, OpFlags, RmaMsg};

use super::{case, expect_cq_error, expect_flags, limits, require_iovs, Gather};
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::pair::{Pair, Side, Who};
use crate::payload::{all_bytes, pattern, same};
use crate::{ensure, ensure_eq};

const G: &str = "pmem";
const PM: Caps = Caps::MSG.union(Caps::RMA).union(Caps::RMA_PMEM);
const COMMIT: OpFlags = OpFlags::COMPLETION.union(OpFlags::COMMIT_COMPLETE);
const LEN: usize = (1 << 20) + 3 * 4096;

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "commit_lands_in_file", PM, "COMMIT writes of 1 B to 1 MiB into a PMEM file mapping complete with COMMIT and are in the file when read back", commit_lands_in_file),
        case(G, "commit_iovs", PM, "COMMIT writemsg with 3 local and 2 remote iovecs: every range in the file, in order", commit_iovs),
        case(G, "commit_cq_data", PM.union(Caps::REMOTE_CQ_DATA), "COMMIT with remote CQ data: target gets the data, initiator COMMIT, bytes in the file", commit_cq_data),
        case(G, "commit_mixed_regions_refused", PM, "COMMIT naming a PMEM and a non-PMEM region: RemoteInvalid naming PMEM, neither region touched, connection ended at both ends", commit_mixed_regions_refused),
        case(G, "delivery_vs_commit", PM, "DELIVERY_COMPLETE and COMMIT_COMPLETE into a PMEM region both succeed; only COMMIT carries CompFlags::COMMIT", delivery_vs_commit),
        case(G, "pmem_uncached", PM, "COMMIT writes into a region registered PMEM | UNCACHED land in the file", pmem_uncached),
        case(G, "inject_commit", PM, "INJECT | COMMIT_COMPLETE: no completion; durable once a later COMMIT on the endpoint completes; into non-PMEM an error completion", inject_commit),
    ]
}

/// A temporary directory, removed on drop.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Result<Dir, CaseError> {
        tempfile::Builder::new()
            .prefix("fabric-conformance-pmem")
            .tempdir()
            .map(Dir)
            .ctx("temporary directory")
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// Maps `len` bytes of a new file and registers it with `flags` (PMEM and more).
fn pmem_region(
    side: &Side,
    dir: &Dir,
    name: &str,
    len: usize,
    flags: MrFlags,
) -> Result<MemoryRegion, CaseError> {
    let path = dir.file(name);
    let map = pmem::Mapping::create(&path, len).ctx(format!("map {}", path.display()))?;
    let mr = side
        .domain
        .register(map, Access::REMOTE_WRITE, flags)
        .ctx(format!("register a file mapping {flags:?}"))?;
    ensure_eq!(mr.flags(), flags, "region flags");
    Ok(mr)
}

/// `len` bytes at `off` of the file, read with pread (not through the target mapping).
fn file_bytes(dir: &Dir, name: &str, off: usize, len: usize) -> Result<Vec<u8>, CaseError> {
    let f = std::fs::File::open(dir.file(name)).ctx("reopen the file")?;
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off as u64)
        .ctx(format!("read {len} B at {off} of the file"))?;
    Ok(v)
}

/// Posts a one-iovec write with `flags` and waits for its successful completion.
fn write_one(
    p: &Pair,
    src: &MemoryRegion,
    dst: &MemoryRegion,
    off: usize,
    len: usize,
    flags: OpFlags,
    context: u64,
) -> Result<fabric::Completion, CaseError> {
    let msg = RmaMsg {
        iov: &[src.iov(0, len)],
        rma_iov: &[dst.remote().iov(off as u64, len)],
        context,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, flags)
        .ctx(format!("writemsg {len} B at {off} with {flags:?}"))?;
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!(
        (c.context, c.len),
        (context, len),
        "completion context and length"
    );
    Ok(c)
}

fn commit_lands_in_file(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(PM)?;
    let dir = Dir::new()?;
    let t = pmem_region(&p.server, &dir, "region", LEN, MrFlags::PMEM)?;
    let src = p.client.alloc(1 << 20, Access::WRITE)?;
    for (n, &(off, len)) in [(0usize, 1usize), (4095, 2), (77, 4097), (8191, 1 << 20)]
        .iter()
        .enumerate()
    {
        let data = pattern(300 + n as u64, len);
        src.write_at(0, &data).ctx("fill")?;
        let c = write_one(&p, &src, &t, off, len, COMMIT, n as u64)?;
        expect_flags(
            &c,
            CompFlags::RMA | CompFlags::WRITE | CompFlags::COMMIT,
            "COMMIT write",
        )?;
        let what = format!("{len} B at {off} in the file after COMMIT");
        same(&what, &data, &file_bytes(&dir, "region", off, len)?)?;
    }
    // A fresh mapping of the same file sees the last write too.
    let again = pmem::Mapping::open(dir.file("region")).ctx("reopen the mapping")?;
    let mut got = vec![0u8; 1 << 20];
    again.read_at(8191, &mut got).ctx("read the new mapping")?;
    same("fresh mapping", &pattern(303, 1 << 20), &got)?;
    Ok(())
}

fn commit_iovs(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(PM)?;
    require_iovs(&p, 3, 2)?;
    let dir = Dir::new()?;
    let t = pmem_region(&p.server, &dir, "region", 65536, MrFlags::PMEM)?;
    let gather = Gather::new(&p.client, 311)?;
    let local = gather.iovs();
    let src = &gather.expected;
    let r = t.remote();
    let remote = [r.iov(10, 2000), r.iov(40_000, 2130)];
    let msg = RmaMsg {
        iov: &local,
        rma_iov: &remote,
        context: 9,
        data: 0,
    };
    p.client.ep.writemsg(&msg, COMMIT).ctx("writemsg")?;
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!((c.context, c.len), (9, 4130), "completion");
    expect_flags(&c, CompFlags::COMMIT, "COMMIT writemsg")?;
    same(
        "remote iov 0 in the file",
        &src[..2000],
        &file_bytes(&dir, "region", 10, 2000)?,
    )?;
    same(
        "remote iov 1 in the file",
        &src[2000..],
        &file_bytes(&dir, "region", 40_000, 2130)?,
    )?;
    all_bytes(
        "file between the iovs",
        &file_bytes(&dir, "region", 2010, 40_000 - 2010)?,
        0,
    )?;
    Ok(())
}

fn commit_cq_data(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(PM | Caps::REMOTE_CQ_DATA)?;
    let bits = limits(&p).cq_data_size * 8;
    let data = if bits >= 64 {
        0xfeed_f00d_dead_beefu64
    } else {
        0xfeed_f00d_dead_beef & ((1 << bits) - 1)
    };
    let dir = Dir::new()?;
    let t = pmem_region(&p.server, &dir, "region", 16384, MrFlags::PMEM)?;
    let rx = p.server.alloc(64, Access::RECV)?;
    p.server.ep.recv(rx.full(), 0xA).ctx("post recv")?;
    let src = p.client.alloc(3000, Access::WRITE)?;
    src.write_at(0, &pattern(321, 3000)).ctx("fill")?;
    let msg = RmaMsg {
        iov: &[src.full()],
        rma_iov: &[t.remote().iov(1000, 3000)],
        context: 4,
        data,
    };
    p.client
        .ep
        .writemsg(&msg, COMMIT | OpFlags::REMOTE_CQ_DATA)
        .ctx("writemsg COMMIT | REMOTE_CQ_DATA")?;
    let c = p.wait_ok(Who::Client)?;
    expect_flags(
        &c,
        CompFlags::RMA | CompFlags::WRITE | CompFlags::COMMIT,
        "initiator",
    )?;
    let r = p.wait_ok(Who::Server)?;
    expect_flags(
        &r,
        CompFlags::RMA | CompFlags::REMOTE_WRITE | CompFlags::REMOTE_CQ_DATA,
        "target",
    )?;
    ensure_eq!((r.context, r.data), (0xA, data), "target completion");
    same(
        "file after COMMIT with CQ data",
        &pattern(321, 3000),
        &file_bytes(&dir, "region", 1000, 3000)?,
    )?;
    Ok(())
}

fn commit_mixed_regions_refused(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(PM)?;
    require_iovs(&p, 1, 2)?;
    let dir = Dir::new()?;
    let pm = pmem_region(&p.server, &dir, "region", 8192, MrFlags::PMEM)?;
    let heap = p.server.alloc(8192, Access::REMOTE_WRITE)?;
    heap.fill(0, 8192, 0xA5).ctx("fill")?;
    let src = p.client.alloc(200, Access::WRITE)?;
    src.fill(0, 200, 0x11).ctx("fill")?;
    // The PMEM range comes first: it must not be written either.
    let msg = RmaMsg {
        iov: &[src.full()],
        rma_iov: &[pm.remote().iov(0, 100), heap.remote().iov(0, 100)],
        context: 7,
        data: 0,
    };
    p.client.ep.writemsg(&msg, COMMIT).ctx("writemsg")?;
    let c = p.wait(Who::Client)?;
    expect_cq_error(
        &c,
        CqErrorKind::RemoteInvalid,
        "COMMIT naming a region not registered PMEM",
    )?;
    ensure_eq!(c.context, 7, "error completion context");
    ensure!(
        !c.flags.contains(CompFlags::COMMIT),
        "an error completion claims COMMIT: {:?}",
        c.flags
    );
    if let Err(e) = &c.status {
        ensure!(
            e.detail.contains("PMEM"),
            "the error detail should say the region is not registered PMEM: {e}"
        );
    }
    super::semantics::expect_access_error_shutdown(&p, heap.remote().iov(0, 8))?;
    all_bytes("PMEM region", &pm.to_vec(0, 8192)?, 0)?;
    all_bytes("PMEM file", &file_bytes(&dir, "region", 0, 8192)?, 0)?;
    all_bytes("heap region", &heap.to_vec(0, 8192)?, 0xA5)?;
    p.expect_no_completion(
        Who::Server,
        Duration::from_millis(50),
        "target of a refused COMMIT",
    )?;
    Ok(())
}

fn delivery_vs_commit(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(PM)?;
    let dir = Dir::new()?;
    let t = pmem_region(&p.server, &dir, "region", 65536, MrFlags::PMEM)?;
    let src = p.client.alloc(4096, Access::WRITE)?;
    src.write_at(0, &pattern(331, 4096)).ctx("fill")?;
    let d = write_one(
        &p,
        &src,
        &t,
        0,
        4096,
        OpFlags::COMPLETION | OpFlags::DELIVERY_COMPLETE,
        1,
    )?;
    expect_flags(&d, CompFlags::RMA | CompFlags::WRITE, "DELIVERY_COMPLETE")?;
    ensure!(
        !d.flags.contains(CompFlags::COMMIT),
        "a DELIVERY_COMPLETE write completed with COMMIT: {:?}",
        d.flags
    );
    same(
        "visible after DELIVERY",
        &pattern(331, 4096),
        &t.to_vec(0, 4096)?,
    )?;
    src.write_at(0, &pattern(332, 4096)).ctx("fill")?;
    let c = write_one(&p, &src, &t, 8192, 4096, COMMIT, 2)?;
    expect_flags(
        &c,
        CompFlags::RMA | CompFlags::WRITE | CompFlags::COMMIT,
        "COMMIT_COMPLETE",
    )?;
    same(
        "in the file after COMMIT",
        &pattern(332, 4096),
        &file_bytes(&dir, "region", 8192, 4096)?,
    )?;
    // Both levels at once: the stronger one applies.
    let c = write_one(
        &p,
        &src,
        &t,
        16384,
        4096,
        COMMIT | OpFlags::DELIVERY_COMPLETE,
        3,
    )?;
    expect_flags(&c, CompFlags::COMMIT, "DELIVERY | COMMIT")?;
    Ok(())
}

fn pmem_uncached(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(PM)?;
    let dir = Dir::new()?;
    let flags = MrFlags::PMEM | MrFlags::UNCACHED;
    let t = pmem_region(&p.server, &dir, "region", LEN, flags)?;
    let src = p.client.alloc(1 << 20, Access::WRITE)?;
    for (n, &(off, len)) in [(0usize, 1usize), (3, 64), (4093, 70_000), (1, 1 << 20)]
        .iter()
        .enumerate()
    {
        let data = pattern(340 + n as u64, len);
        src.write_at(0, &data).ctx("fill")?;
        let c = write_one(&p, &src, &t, off, len, COMMIT, n as u64)?;
        expect_flags(&c, CompFlags::COMMIT, "COMMIT into PMEM | UNCACHED")?;
        same(
            &format!("{len} B at {off} in the file (PMEM | UNCACHED)"),
            &data,
            &file_bytes(&dir, "region", off, len)?,
        )?;
    }
    Ok(())
}

fn inject_commit(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(PM)?;
    let size = limits(&p).inject_size.min(1000);
    if size == 0 {
        return Err(CaseError::skip("inject_size is 0"));
    }
    let dir = Dir::new()?;
    let t = pmem_region(&p.server, &dir, "region", 16384, MrFlags::PMEM)?;
    let src = p.client.alloc(4096, Access::WRITE)?;
    src.write_at(0, &pattern(351, size)).ctx("fill")?;
    let msg = RmaMsg {
        iov: &[src.iov(0, size)],
        rma_iov: &[t.remote().iov(100, size)],
        context: 0x1,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::INJECT | OpFlags::COMMIT_COMPLETE)
        .ctx("writemsg INJECT | COMMIT_COMPLETE")?;
    // The buffer is free at once (inject): overwrite it before the data can have left.
    src.fill(0, size, 0xEE).ctx("refill")?;
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(50),
        "an INJECT | COMMIT write (inject generates no completion)",
    )?;
    // A later COMMIT on the same endpoint completes after the earlier injected one has
    // been committed.
    src.write_at(0, &pattern(352, 64)).ctx("fill")?;
    let c = write_one(&p, &src, &t, 8192, 64, COMMIT, 2)?;
    expect_flags(&c, CompFlags::COMMIT, "the COMMIT after the inject")?;
    same(
        "injected data in the file",
        &pattern(351, size),
        &file_bytes(&dir, "region", 100, size)?,
    )?;
    // Into a region that is not PMEM: the refusal still reports (errors always do),
    // with the context given to writemsg.
    let heap = p.server.alloc(4096, Access::REMOTE_WRITE)?;
    heap.fill(0, 4096, 0xA5).ctx("fill")?;
    let msg = RmaMsg {
        iov: &[src.iov(0, 64)],
        rma_iov: &[heap.remote().iov(0, 64)],
        context: 0x2,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::INJECT | OpFlags::COMMIT_COMPLETE)
        .ctx("writemsg INJECT | COMMIT_COMPLETE into heap")?;
    let c = p.wait(Who::Client)?;
    expect_cq_error(
        &c,
        CqErrorKind::RemoteInvalid,
        "INJECT | COMMIT into a region not registered PMEM",
    )?;
    ensure_eq!(c.context, 0x2, "error completion of an inject");
    all_bytes("heap region", &heap.to_vec(0, 4096)?, 0xA5)?;
    super::semantics::expect_access_error_shutdown(&p, heap.remote().iov(0, 8))?;
    Ok(())
}
