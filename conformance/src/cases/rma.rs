//! rma: write and read correctness at many sizes and offsets, iovecs, remote CQ data,
//! completion levels, inject_write (fabtests functional rma, benchmarks rma_bw checks).

use std::time::Duration;

use fabric::{Access, Caps, CompFlags, ErrorKind, MemoryRegion, OpFlags, Progress, RmaMsg};

use super::{case, expect_flags, limits, require_iovs, Gather};
use crate::case::{expect_err, Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::pair::{Pair, PairConfig, Who};
use crate::payload::{all_bytes, pattern, same};
use crate::{ensure, ensure_eq};

const G: &str = "rma";
const RMA: Caps = Caps::MSG.union(Caps::RMA);

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "write_sizes_offsets", RMA, "writes of 1 B to 1 MiB at unaligned offsets and across pages land exactly", write_sizes_offsets),
        case(G, "read_sizes_offsets", RMA, "reads of 1 B to 1 MiB at unaligned offsets and across pages return exactly", read_sizes_offsets),
        case(G, "write_then_read_back", RMA, "300,000 bytes written then read back into another region", write_then_read_back),
        case(G, "large_write_read", RMA, "a write and a read of max_msg_size (at most 64 MiB)", large_write_read),
        case(G, "completion_flags", RMA, "write completes with RMA|WRITE, read with RMA|READ, context and length kept", completion_flags),
        case(G, "writemsg_iovs", RMA, "writemsg with 3 local and 2 remote iovecs places the bytes in order", writemsg_iovs),
        case(G, "readmsg_iovs", RMA, "readmsg with 2 remote and 3 local iovecs gathers in order", readmsg_iovs),
        case(G, "writedata_consumes_recv", RMA | Caps::REMOTE_CQ_DATA, "write with CQ data: RMA|REMOTE_WRITE|REMOTE_CQ_DATA at the target, data visible, one receive consumed", writedata_consumes_recv),
        case(G, "writedata_before_recv", RMA | Caps::REMOTE_CQ_DATA, "write with CQ data before the target posts a receive: no target completion until a receive is posted, then the notification, the write completion and the data", writedata_before_recv),
        case(G, "uncached_target", RMA, "writes into a region registered UNCACHED land exactly", uncached_target),
        case(G, "delivery_complete", RMA, "a DELIVERY_COMPLETE write's data is visible at the target when it completes", delivery_complete),
        case(G, "inject_write", RMA | Caps::WRITE, "inject_write lands at the target with no initiator completion", inject_write),
        case(G, "inject_write_too_large", RMA | Caps::WRITE, "inject_write of inject_size + 1 bytes is refused", inject_write_too_large),
        case(G, "zero_length", RMA, "0-byte write and read complete without touching memory", zero_length),
        case(G, "many_writes_in_flight", RMA, "256 writes (or tx_size) to distinct offsets in flight at once", many_writes_in_flight),
    ]
}

/// (offset, length) pairs: aligned and not, crossing 4 KiB pages, small and large.
const PLACES: &[(usize, usize)] = &[
    (0, 1),
    (1, 7),
    (4095, 2),
    (4093, 64),
    (8191, 4097),
    (3, 65541),
    (12289, 1 << 20),
    (100_003, 4096),
];

const TARGET_LEN: usize = (1 << 20) + 4 * 4096 + 200_000;

fn target(p: &Pair, access: Access) -> Result<MemoryRegion, CaseError> {
    p.server.alloc(TARGET_LEN, access)
}

fn write_sizes_offsets(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = target(&p, Access::REMOTE)?;
    let tx = p.client.alloc(TARGET_LEN, Access::WRITE)?;
    let r = t.remote();
    for (n, &(off, len)) in PLACES.iter().enumerate() {
        let what = format!("write {len} B at offset {off}");
        t.fill(0, TARGET_LEN, 0x5A).ctx("fill")?;
        let data = pattern(n as u64 + 1, len);
        // Unaligned local offset too.
        let loff = 5 + n;
        tx.write_at(loff, &data).ctx("fill")?;
        p.client
            .ep
            .write(tx.iov(loff, len), r.iov(off as u64, len), n as u64)
            .ctx(&what)?;
        let c = p.wait_ok(Who::Client).map_err(|e| e.context(&what))?;
        ensure_eq!(c.context, n as u64, "{what}: context");
        same(&what, &data, &t.to_vec(off, len)?)?;
        all_bytes(&format!("{what}: bytes before"), &t.to_vec(0, off)?, 0x5A)?;
        all_bytes(
            &format!("{what}: bytes after"),
            &t.to_vec(off + len, TARGET_LEN - off - len)?,
            0x5A,
        )?;
    }
    Ok(())
}

fn read_sizes_offsets(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = target(&p, Access::REMOTE)?;
    let src = pattern(77, TARGET_LEN);
    t.write_at(0, &src).ctx("fill")?;
    let rx = p.client.alloc(TARGET_LEN, Access::READ)?;
    let r = t.remote();
    for (n, &(off, len)) in PLACES.iter().enumerate() {
        let what = format!("read {len} B at offset {off}");
        rx.fill(0, TARGET_LEN, 0xC3).ctx("fill")?;
        let loff = 3 + n;
        p.client
            .ep
            .read(rx.iov(loff, len), r.iov(off as u64, len), n as u64)
            .ctx(&what)?;
        let c = p.wait_ok(Who::Client).map_err(|e| e.context(&what))?;
        ensure_eq!(c.context, n as u64, "{what}: context");
        same(&what, &src[off..off + len], &rx.to_vec(loff, len)?)?;
        all_bytes(
            &format!("{what}: local bytes before"),
            &rx.to_vec(0, loff)?,
            0xC3,
        )?;
        all_bytes(
            &format!("{what}: local bytes after"),
            &rx.to_vec(loff + len, 64)?,
            0xC3,
        )?;
    }
    same("target after reads", &src, &t.to_vec(0, TARGET_LEN)?)?;
    Ok(())
}

fn write_then_read_back(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = target(&p, Access::REMOTE)?;
    let len = 300_000;
    let tx = p.client.alloc(len, Access::WRITE)?;
    let rx = p.client.alloc(len, Access::READ)?;
    tx.write_at(0, &pattern(31, len)).ctx("fill")?;
    let ri = t.remote().iov(777, len);
    p.client.ep.write(tx.full(), ri, 1).ctx("write")?;
    p.wait_ok(Who::Client)?;
    p.client.ep.read(rx.full(), ri, 2).ctx("read")?;
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!(c.context, 2, "read context");
    same("read back", &pattern(31, len), &rx.to_vec(0, len)?)?;
    Ok(())
}

fn large_write_read(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let len = limits(&p).max_msg_size.min(super::msg::MAX_TESTED_MSG);
    let t = p.server.alloc(len, Access::REMOTE)?;
    let buf = p.client.alloc(len, Access::READ | Access::WRITE)?;
    let data = pattern(41, len);
    buf.write_at(0, &data).ctx("fill")?;
    p.client
        .ep
        .write(buf.full(), t.remote().full(), 1)
        .ctx("write")?;
    p.wait_ok(Who::Client)?;
    same("target after the write", &data, &t.to_vec(0, len)?)?;
    let data2 = pattern(42, len);
    t.write_at(0, &data2).ctx("refill target")?;
    p.client
        .ep
        .read(buf.full(), t.remote().full(), 2)
        .ctx("read")?;
    p.wait_ok(Who::Client)?;
    same("read", &data2, &buf.to_vec(0, len)?)?;
    Ok(())
}

fn completion_flags(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = p.server.alloc(4096, Access::REMOTE)?;
    let l = p.client.alloc(4096, Access::READ | Access::WRITE)?;
    p.client
        .ep
        .write(l.iov(0, 100), t.remote().iov(0, 100), u64::MAX)
        .ctx("write")?;
    let c = p.wait_ok(Who::Client)?;
    expect_flags(&c, CompFlags::RMA | CompFlags::WRITE, "write")?;
    ensure!(
        !c.flags.contains(CompFlags::READ),
        "write completion has READ: {:?}",
        c.flags
    );
    ensure_eq!((c.context, c.len), (u64::MAX, 100), "write completion");
    p.client
        .ep
        .read(l.iov(0, 200), t.remote().iov(0, 200), 0)
        .ctx("read")?;
    let c = p.wait_ok(Who::Client)?;
    expect_flags(&c, CompFlags::RMA | CompFlags::READ, "read")?;
    ensure_eq!((c.context, c.len), (0, 200), "read completion");
    // Plain writes (no CQ data) leave nothing in the target's queue.
    p.expect_no_completion(
        Who::Server,
        Duration::from_millis(50),
        "target of plain RMA",
    )?;
    Ok(())
}

fn writemsg_iovs(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    require_iovs(&p, 3, 2)?;
    let t = p.server.alloc(16384, Access::REMOTE)?;
    t.fill(0, 16384, 0x5A).ctx("fill")?;
    let gather = Gather::new(&p.client, 51)?;
    let local = gather.iovs();
    let src = &gather.expected;
    let r = t.remote();
    let remote = [r.iov(10, 2000), r.iov(9000, 2130)];
    let msg = RmaMsg {
        iov: &local,
        rma_iov: &remote,
        context: 9,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION)
        .ctx("writemsg")?;
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!((c.context, c.len), (9, 4130), "completion");
    same("remote iov 0", &src[..2000], &t.to_vec(10, 2000)?)?;
    same("remote iov 1", &src[2000..], &t.to_vec(9000, 2130)?)?;
    all_bytes(
        "between the remote iovs",
        &t.to_vec(2010, 9000 - 2010)?,
        0x5A,
    )?;
    all_bytes("after", &t.to_vec(11130, 16384 - 11130)?, 0x5A)?;
    all_bytes("before", &t.to_vec(0, 10)?, 0x5A)?;
    Ok(())
}

fn readmsg_iovs(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    require_iovs(&p, 3, 2)?;
    let t = p.server.alloc(16384, Access::REMOTE)?;
    let src = pattern(61, 16384);
    t.write_at(0, &src).ctx("fill")?;
    let a = p.client.alloc(5000, Access::READ)?;
    let b = p.client.alloc(300, Access::READ)?;
    a.fill(0, 5000, 0xC3).ctx("fill")?;
    b.fill(0, 300, 0xC3).ctx("fill")?;
    let r = t.remote();
    let remote = [r.iov(4000, 100), r.iov(7, 4100)];
    let local = [b.iov(50, 150), a.iov(3, 4000), b.iov(250, 50)];
    let msg = RmaMsg {
        iov: &local,
        rma_iov: &remote,
        context: 10,
        data: 0,
    };
    p.client
        .ep
        .readmsg(&msg, OpFlags::COMPLETION)
        .ctx("readmsg")?;
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!((c.context, c.len), (10, 4200), "completion");
    let mut want = src[4000..4100].to_vec();
    want.extend_from_slice(&src[7..4107]);
    let mut got = b.to_vec(50, 150)?;
    got.extend(a.to_vec(3, 4000)?);
    got.extend(b.to_vec(250, 50)?);
    same("gathered read", &want, &got)?;
    all_bytes("local bytes outside the iovs", &b.to_vec(0, 50)?, 0xC3)?;
    all_bytes("local bytes outside the iovs", &b.to_vec(200, 50)?, 0xC3)?;
    all_bytes("local bytes outside the iovs", &a.to_vec(4003, 997)?, 0xC3)?;
    Ok(())
}

fn writedata_consumes_recv(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA | Caps::REMOTE_CQ_DATA)?;
    let bits = limits(&p).cq_data_size * 8;
    let data = if bits >= 64 {
        0x0123_4567_89ab_cdefu64
    } else {
        0x0123_4567_89ab_cdef & ((1 << bits) - 1)
    };
    let t = p.server.alloc(8192, Access::REMOTE)?;
    let rxa = p.server.alloc(64, Access::RECV)?;
    let rxb = p.server.alloc(64, Access::RECV)?;
    rxa.fill(0, 64, 0xEE).ctx("fill")?;
    p.server.ep.recv(rxa.full(), 0xA).ctx("post recv A")?;
    p.server.ep.recv(rxb.full(), 0xB).ctx("post recv B")?;
    let tx = p.client.alloc(4096, Access::WRITE | Access::SEND)?;
    tx.write_at(0, &pattern(71, 3000)).ctx("fill")?;
    p.client
        .ep
        .writedata(tx.iov(0, 3000), t.remote().iov(1000, 3000), data, 5)
        .ctx("writedata")?;
    let c = p.wait_ok(Who::Client)?;
    expect_flags(&c, CompFlags::RMA | CompFlags::WRITE, "initiator")?;
    ensure_eq!(c.context, 5, "initiator context");
    let r = p.wait_ok(Who::Server)?;
    expect_flags(
        &r,
        CompFlags::RMA | CompFlags::REMOTE_WRITE | CompFlags::REMOTE_CQ_DATA,
        "target",
    )?;
    ensure_eq!(r.data, data, "remote CQ data");
    same(
        "written data visible at the target's completion",
        &pattern(71, 3000),
        &t.to_vec(1000, 3000)?,
    )?;
    all_bytes("the consumed receive's buffer", &rxa.to_vec(0, 64)?, 0xEE)?;
    // The write consumed receive A: the next message lands in B.
    p.client.ep.send(tx.iov(0, 8), 6).ctx("send")?;
    let m = p.wait_ok(Who::Server)?;
    ensure_eq!(
        m.context,
        0xB,
        "receive used by the message after the write (A must be consumed)"
    );
    expect_flags(&m, CompFlags::MSG | CompFlags::RECV, "message")?;
    Ok(())
}

fn delivery_complete(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair_with(&PairConfig::new(RMA).progress(Progress::Auto))?;
    let t = p.server.alloc(1 << 20, Access::REMOTE)?;
    let tx = p.client.alloc(1 << 20, Access::WRITE)?;
    for (i, len) in [8usize, 4096, 1 << 20].into_iter().enumerate() {
        let data = pattern(80 + i as u64, len);
        tx.write_at(0, &data).ctx("fill")?;
        let msg = RmaMsg {
            iov: &[tx.iov(0, len)],
            rma_iov: &[t.remote().iov(0, len)],
            context: i as u64,
            data: 0,
        };
        p.client
            .ep
            .writemsg(&msg, OpFlags::COMPLETION | OpFlags::DELIVERY_COMPLETE)
            .ctx("writemsg")?;
        // Auto progress and no polling of the target: when the initiator's completion
        // arrives, the target must already have placed the data.
        let c = p.client.wait_completion(&[], p.timeout)?;
        ensure!(c.is_ok(), "{c:?}");
        same(
            &format!("{len} B visible at completion"),
            &data,
            &t.to_vec(0, len)?,
        )?;
    }
    Ok(())
}

fn inject_write(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA | Caps::WRITE)?;
    let size = limits(&p).inject_size;
    if size == 0 {
        return Err(CaseError::skip("inject_size is 0"));
    }
    let t = p.server.alloc(size + 200, Access::REMOTE)?;
    t.fill(0, size + 200, 0x5A).ctx("fill")?;
    let data = pattern(91, size);
    p.client
        .ep
        .inject_write(&data, t.remote().iov(100, size))
        .ctx("inject_write")?;
    p.drive_until("injected data at the target", || {
        Ok(t.to_vec(100, size)? == data)
    })?;
    all_bytes("before", &t.to_vec(0, 100)?, 0x5A)?;
    all_bytes("after", &t.to_vec(100 + size, 100)?, 0x5A)?;
    p.expect_no_completion(Who::Client, Duration::from_millis(50), "inject_write")?;
    Ok(())
}

fn inject_write_too_large(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA | Caps::WRITE)?;
    let size = limits(&p).inject_size + 1;
    let t = p.server.alloc(size, Access::REMOTE)?;
    expect_err(
        p.client
            .ep
            .inject_write(&vec![1u8; size], t.remote().iov(0, size)),
        ErrorKind::InvalidArgument,
        "inject_write of inject_size + 1",
    )?;
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(100),
        "after refused inject_write",
    )?;
    all_bytes("target", &t.to_vec(0, size)?, 0)?;
    Ok(())
}

fn zero_length(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = p.server.alloc(64, Access::REMOTE)?;
    t.fill(0, 64, 0x5A).ctx("fill")?;
    let l = p.client.alloc(64, Access::READ | Access::WRITE)?;
    l.fill(0, 64, 0xC3).ctx("fill")?;
    p.client
        .ep
        .write(l.iov(0, 0), t.remote().iov(10, 0), 1)
        .ctx("0-byte write")?;
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!((c.context, c.len), (1, 0), "write completion");
    p.client
        .ep
        .read(l.iov(0, 0), t.remote().iov(10, 0), 2)
        .ctx("0-byte read")?;
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!((c.context, c.len), (2, 0), "read completion");
    all_bytes("target", &t.to_vec(0, 64)?, 0x5A)?;
    all_bytes("local", &l.to_vec(0, 64)?, 0xC3)?;
    Ok(())
}

fn many_writes_in_flight(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let n = 256usize.min(limits(&p).tx_size);
    let t = p.server.alloc(n * 100, Access::REMOTE)?;
    let tx = p.client.alloc(n * 100, Access::WRITE)?;
    let data = pattern(99, n * 100);
    tx.write_at(0, &data).ctx("fill")?;
    let r = t.remote();
    for i in 0..n {
        p.client
            .ep
            .write(tx.iov(i * 100, 100), r.iov(i as u64 * 100, 100), i as u64)
            .ctx(format!("write {i} of {n} without reaping"))?;
    }
    let cs = p.wait_ok_n(Who::Client, n)?;
    let mut ctxs: Vec<u64> = cs.iter().map(|c| c.context).collect();
    ctxs.sort_unstable();
    ensure_eq!(ctxs, (0..n as u64).collect::<Vec<_>>(), "write contexts");
    same("target", &data, &t.to_vec(0, n * 100)?)?;
    Ok(())
}

/// A write with CQ data that reaches the target before it posts a receive. A stream
/// provider may place the data and complete the write at once and hold the
/// notification; an RC transport holds the whole write (RNR NAK, retried) until a
/// receive is posted. Either way the target reports nothing until a receive is
/// posted, then the notification arrives with its data, the write completes and the
/// data is in place.
fn writedata_before_recv(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA | Caps::REMOTE_CQ_DATA)?;
    let t = p.server.alloc(4096, Access::REMOTE)?;
    let tx = p.client.alloc(4096, Access::WRITE)?;
    tx.write_at(0, &pattern(72, 500)).ctx("fill")?;
    p.client
        .ep
        .writedata(tx.iov(0, 500), t.remote().iov(7, 500), 0x77, 1)
        .ctx("writedata")?;
    p.expect_no_completion(
        Who::Server,
        Duration::from_millis(100),
        "target without a posted receive",
    )?;
    let rx = p.server.alloc(64, Access::RECV)?;
    p.server.ep.recv(rx.full(), 0xA).ctx("post recv")?;
    let r = p
        .wait_ok(Who::Server)
        .map_err(|e| e.context("the notification of a write that came before the receive"))?;
    expect_flags(
        &r,
        CompFlags::RMA | CompFlags::REMOTE_WRITE | CompFlags::REMOTE_CQ_DATA,
        "target",
    )?;
    ensure_eq!(r.data, 0x77, "remote CQ data");
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!(c.context, 1, "context of the write");
    same(
        "data of a write that came before the receive",
        &pattern(72, 500),
        &t.to_vec(7, 500)?,
    )?;
    Ok(())
}

fn uncached_target(ctx: &Ctx) -> CaseResult {
    use fabric::{HeapMemory, MrFlags};
    let p = ctx.pair(RMA)?;
    let len = 200_000;
    let t = p
        .server
        .domain
        .register(HeapMemory::new(len)?, Access::REMOTE, MrFlags::UNCACHED)
        .ctx("register UNCACHED")?;
    ensure_eq!(t.flags(), MrFlags::UNCACHED, "region flags");
    let tx = p.client.alloc(len, Access::WRITE)?;
    for (n, &(off, l)) in [(0usize, 1usize), (3, 64), (4093, 70_000), (1, len - 1)]
        .iter()
        .enumerate()
    {
        let data = pattern(200 + n as u64, l);
        tx.write_at(0, &data).ctx("fill")?;
        p.client
            .ep
            .write(tx.iov(0, l), t.remote().iov(off as u64, l), n as u64)
            .ctx("write")?;
        p.wait_ok(Who::Client)?;
        same(
            &format!("{l} B at {off} into an UNCACHED region"),
            &data,
            &t.to_vec(off, l)?,
        )?;
    }
    Ok(())
}
