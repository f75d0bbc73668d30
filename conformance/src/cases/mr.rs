//! mr: registration, keys, descriptors, bounds and local access rights (fabtests
//! unit/mr_test, functional/multi_mr).

use std::collections::HashSet;
use std::time::Duration;

use fabric::{Access, Caps, ErrorKind, HeapMemory, MrFlags, OpFlags, RemoteMr, RmaMsg};

use super::case;
use crate::case::{expect_err, Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::pair::Who;
use crate::payload::{pattern, same};
use crate::{ensure, ensure_eq};

const G: &str = "mr";

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "keys_unique", Caps::MSG, "256 registrations get unique, non-zero keys that fit mr_key_size", keys_unique),
        case(G, "sizes", Caps::MSG, "regions of 1 B to 4 MiB register with the right length, zeroed", sizes),
        case(G, "remote_descriptor", Caps::MSG | Caps::RMA, "remote() has the region's length and key; wire form round-trips; iov offsets add", remote_descriptor),
        case(G, "local_bounds", Caps::MSG, "read_at/write_at/fill accept the last byte and refuse past it (also offset overflow)", local_bounds),
        case(G, "send_needs_send_access", Caps::MSG, "send from a region without SEND fails with AccessDenied and nothing reaches the peer", send_needs_send_access),
        case(G, "recv_needs_recv_access", Caps::MSG, "recv into a region without RECV fails with AccessDenied", recv_needs_recv_access),
        case(G, "rma_local_access", Caps::MSG | Caps::RMA, "write from a region without WRITE, read into one without READ: AccessDenied, nothing moves", rma_local_access),
        case(G, "pmem_heap_refused", Caps::MSG, "PMEM registration of heap memory is refused with InvalidArgument", pmem_heap_refused),
        case(G, "other_domain_refused", Caps::MSG, "a region of another domain is refused at post", other_domain_refused),
        case(G, "iov_outside_region", Caps::MSG, "an iov past its region's end (or overflowing) is refused at post", iov_outside_region),
    ]
}

fn keys_unique(ctx: &Ctx) -> CaseResult {
    let node = ctx.node(Caps::MSG)?;
    let key_bits = node.info.limits.mr_key_size * 8;
    let mut regions = Vec::new();
    let mut keys = HashSet::new();
    for i in 0..256 {
        let mr = node
            .domain
            .alloc(64, Access::LOCAL | Access::REMOTE)
            .ctx(format!("registration {i}"))?;
        let k = mr.key();
        ensure!(k != 0, "registration {i} got key 0");
        ensure!(
            key_bits >= 64 || k >> key_bits == 0,
            "key {k:#x} does not fit mr_key_size {} bytes",
            node.info.limits.mr_key_size
        );
        ensure!(keys.insert(k), "key {k:#x} given twice (registration {i})");
        regions.push(mr);
    }
    Ok(())
}

fn sizes(ctx: &Ctx) -> CaseResult {
    let node = ctx.node(Caps::MSG)?;
    for len in [1usize, 63, 4095, 4096, 4097, 1 << 20, 4 << 20] {
        let mr = node
            .domain
            .alloc(len, Access::LOCAL)
            .ctx(format!("alloc {len}"))?;
        ensure_eq!(mr.len(), len, "region length");
        let v = mr.to_vec(0, len).ctx("read")?;
        ensure!(
            v.iter().all(|&b| b == 0),
            "a fresh {len}-byte region is not zeroed"
        );
        let mr2 = node
            .domain
            .register(
                HeapMemory::from_slice(&pattern(len as u64, len))?,
                Access::LOCAL,
                MrFlags::empty(),
            )
            .ctx("register filled memory")?;
        same(
            "registered memory",
            &pattern(len as u64, len),
            &mr2.to_vec(0, len)?,
        )?;
    }
    Ok(())
}

fn remote_descriptor(ctx: &Ctx) -> CaseResult {
    let node = ctx.node(Caps::MSG | Caps::RMA)?;
    let mr = node.domain.alloc(12345, Access::REMOTE).ctx("alloc")?;
    let r = mr.remote();
    ensure_eq!(r.len, 12345u64, "remote().len");
    ensure_eq!(r.key, mr.key(), "remote().key");
    ensure_eq!(
        RemoteMr::from_bytes(&r.to_bytes()).ctx("from_bytes")?,
        r,
        "wire round trip"
    );
    ensure!(
        RemoteMr::from_bytes(&r.to_bytes()[..23]).is_err(),
        "23-byte descriptor accepted"
    );
    let iov = r.iov(100, 50);
    ensure_eq!(iov.addr, r.addr.wrapping_add(100), "iov(100).addr");
    ensure_eq!((iov.len, iov.key), (50, r.key), "iov len/key");
    ensure_eq!(r.full().len, 12345usize, "full().len");
    ensure_eq!(r.full().addr, r.addr, "full().addr");
    Ok(())
}

fn local_bounds(ctx: &Ctx) -> CaseResult {
    let node = ctx.node(Caps::MSG)?;
    let mr = node.domain.alloc(100, Access::LOCAL).ctx("alloc")?;
    mr.write_at(99, &[7]).ctx("write last byte")?;
    mr.write_at(100, &[]).ctx("empty write at the end")?;
    ensure_eq!(
        mr.to_vec(99, 1).ctx("read last byte")?,
        vec![7u8],
        "last byte"
    );
    expect_err(
        mr.write_at(99, &[1, 2]),
        ErrorKind::InvalidArgument,
        "write_at past the end",
    )?;
    expect_err(
        mr.write_at(101, &[]),
        ErrorKind::InvalidArgument,
        "empty write_at past the end",
    )?;
    let mut buf = [0u8; 2];
    expect_err(
        mr.read_at(99, &mut buf),
        ErrorKind::InvalidArgument,
        "read_at past the end",
    )?;
    expect_err(
        mr.read_at(usize::MAX, &mut buf),
        ErrorKind::InvalidArgument,
        "read_at offset overflow",
    )?;
    expect_err(
        mr.fill(50, 51, 0),
        ErrorKind::InvalidArgument,
        "fill past the end",
    )?;
    expect_err(
        mr.to_vec(1, 100),
        ErrorKind::InvalidArgument,
        "to_vec past the end",
    )?;
    ensure_eq!(
        mr.to_vec(99, 1).ctx("read last byte again")?,
        vec![7u8],
        "failed writes changed memory"
    );
    Ok(())
}

fn send_needs_send_access(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let rx = p.server.alloc(64, Access::RECV)?;
    let bad = p
        .client
        .alloc(64, Access::RECV | Access::WRITE | Access::READ)?;
    bad.write_at(0, b"must not arrive").ctx("fill")?;
    p.server.ep.recv(rx.full(), 1).ctx("post recv")?;
    expect_err(
        p.client.ep.send(bad.iov(0, 15), 2),
        ErrorKind::AccessDenied,
        "send without SEND access",
    )?;
    p.expect_no_completion(
        Who::Server,
        Duration::from_millis(200),
        "server after refused send",
    )?;
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(1),
        "client after refused send",
    )?;
    let good = p.client.alloc(64, Access::SEND)?;
    good.write_at(0, b"good").ctx("fill")?;
    p.client.ep.send(good.iov(0, 4), 3).ctx("send")?;
    let c = p.wait_ok(Who::Server)?;
    ensure_eq!(
        (c.context, c.len),
        (1, 4),
        "the posted receive got the second send"
    );
    ensure_eq!(rx.to_vec(0, 4)?, b"good".to_vec(), "received bytes");
    Ok(())
}

fn recv_needs_recv_access(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let bad = p
        .server
        .alloc(64, Access::SEND | Access::READ | Access::WRITE)?;
    expect_err(
        p.server.ep.recv(bad.full(), 1),
        ErrorKind::AccessDenied,
        "recv without RECV access",
    )?;
    p.expect_no_completion(Who::Server, Duration::from_millis(50), "after refused recv")?;
    Ok(())
}

fn rma_local_access(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG | Caps::RMA)?;
    let target = p.server.alloc(64, Access::REMOTE)?;
    target.fill(0, 64, 0xA5).ctx("fill")?;
    let no_write = p
        .client
        .alloc(64, Access::SEND | Access::RECV | Access::READ)?;
    no_write.fill(0, 64, 0x11).ctx("fill")?;
    let no_read = p
        .client
        .alloc(64, Access::SEND | Access::RECV | Access::WRITE)?;
    no_read.fill(0, 64, 0x22).ctx("fill")?;
    let r = target.remote();
    expect_err(
        p.client.ep.write(no_write.full(), r.full(), 1),
        ErrorKind::AccessDenied,
        "write from a region without WRITE",
    )?;
    expect_err(
        p.client.ep.read(no_read.full(), r.full(), 2),
        ErrorKind::AccessDenied,
        "read into a region without READ",
    )?;
    let msg = RmaMsg {
        iov: &[no_write.full()],
        rma_iov: &[r.full()],
        context: 3,
        data: 0,
    };
    expect_err(
        p.client.ep.writemsg(&msg, OpFlags::DELIVERY_COMPLETE),
        ErrorKind::AccessDenied,
        "writemsg from a region without WRITE",
    )?;
    p.expect_no_completion(Who::Client, Duration::from_millis(100), "after refused RMA")?;
    crate::payload::all_bytes("target", &target.to_vec(0, 64)?, 0xA5)?;
    crate::payload::all_bytes("read destination", &no_read.to_vec(0, 64)?, 0x22)?;
    Ok(())
}

fn pmem_heap_refused(ctx: &Ctx) -> CaseResult {
    let node = ctx.node(Caps::MSG)?;
    let r = node
        .domain
        .register(HeapMemory::new(4096)?, Access::REMOTE_WRITE, MrFlags::PMEM);
    expect_err(
        r,
        ErrorKind::InvalidArgument,
        "PMEM registration of heap memory",
    )
}

fn other_domain_refused(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let other = ctx.node(Caps::MSG)?;
    let foreign = other
        .domain
        .alloc(64, Access::LOCAL)
        .ctx("alloc in another domain")?;
    expect_err(
        p.client.ep.send(foreign.full(), 1),
        ErrorKind::InvalidArgument,
        "send from another domain's region",
    )?;
    expect_err(
        p.client.ep.recv(foreign.full(), 2),
        ErrorKind::InvalidArgument,
        "recv into another domain's region",
    )?;
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(50),
        "after refused posts",
    )?;
    Ok(())
}

fn iov_outside_region(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let mr = p.client.alloc(100, Access::LOCAL)?;
    expect_err(
        p.client.ep.send(mr.iov(50, 51), 1),
        ErrorKind::InvalidArgument,
        "send iov past the end",
    )?;
    expect_err(
        p.client.ep.send(mr.iov(usize::MAX, 2), 2),
        ErrorKind::InvalidArgument,
        "send iov offset overflow",
    )?;
    expect_err(
        p.client.ep.recv(mr.iov(101, 0), 3),
        ErrorKind::InvalidArgument,
        "recv iov starting past the end",
    )?;
    // The shape of the old soundness hole: a 4,160-byte receive over a 64-byte region.
    // Neither the segment nor the post can be made; the region and its neighbour
    // (allocated right after it) are untouched.
    let small = p.client.alloc(64, Access::LOCAL)?;
    let neighbour = p.client.alloc(4096, Access::LOCAL)?;
    neighbour.fill(0, 4096, 0x5a).ctx("fill the neighbour")?;
    expect_err(
        fabric::Segment::new(&small, 0, 4160).map(|_| ()),
        ErrorKind::InvalidArgument,
        "Segment::new over 4,160 bytes of a 64-byte region",
    )?;
    ensure!(
        fabric::Segment::new(&small, 0, 64).is_ok_and(|s| s.len() == 64 && s.offset() == 0),
        "a segment over the whole 64-byte region was refused"
    );
    expect_err(
        p.client.ep.recv(small.iov(0, 4160), 5),
        ErrorKind::InvalidArgument,
        "recv of 4,160 bytes into a 64-byte region",
    )?;
    p.server
        .ep
        .send(p.server.alloc(4160, Access::LOCAL)?.full(), 6)
        .ctx("server send of 4,160 bytes")?;
    p.drive_for(Duration::from_millis(50))?;
    ensure!(
        neighbour
            .to_vec(0, 4096)
            .ctx("read the neighbour")?
            .iter()
            .all(|&b| b == 0x5a),
        "memory next to the 64-byte region changed"
    );
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(50),
        "after refused posts",
    )?;
    if p.client.ep.send(mr.iov(100, 0), 4).is_err() {
        return Err(CaseError::fail(
            "an empty iov at the region's end was refused",
        ));
    }
    Ok(())
}
