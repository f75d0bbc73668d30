//! rdm: reliable unconnected endpoints over the provider's MSG endpoints (the
//! `fabric-rdm` layer, libfabric rxm's model): sends with the source reported,
//! directed receives, messages to oneself, truncation, simultaneous connects among
//! many peers, credit-bounded unexpected messages, idle connections closed and
//! reopened. Also the helpers the av, tagged, atomic and cntr groups share.

use std::time::{Duration, Instant};

use fabric::rdm::{
    AddressVector, AvAttr, FiAddr, OpKind, RdmAttr, RdmCompletion, RdmEndpoint, RdmInfo,
};
use fabric::{Access, Caps, CqErrorKind, Domain, EpType, Fabric, Hints, MemoryRegion};

use super::case;
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::{ensure, ensure_eq};

const G: &str = "rdm";

/// What the layer needs of the provider's MSG endpoints.
pub(crate) const NEEDS: Caps = Caps::MSG.union(Caps::RMA);

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "send_recv_source", NEEDS, "send_to/senddata_to/inject_to reach recv; the completion names the sender (FI_SOURCE), or none when it is not in the AV", send_recv_source),
        case(G, "directed_recv", NEEDS, "recv_from(src) takes only src's messages; an open receive posted later takes the others", directed_recv),
        case(G, "self_send", NEEDS, "an endpoint sends to its own address", self_send),
        case(G, "truncated", NEEDS, "a message larger than the receive buffer: error completion Truncated with the bytes that fit", truncated),
        case(G, "simultaneous_connects", NEEDS, "5 endpoints send to each other at once: every message arrives, one connection per pair remains", simultaneous_connects),
        case(G, "unexpected_flood", NEEDS, "300 messages to a peer that posts nothing: at most rx_buffers complete, then all arrive in order", unexpected_flood),
        case(G, "rma_to", NEEDS, "write_to and read_to a peer's region (64 KiB, data verified), the first opening the connection", rma_to),
        case(G, "idle_close_reopen", NEEDS, "an idle connection is closed at both ends and reopened by the next send", idle_close_reopen),
        case(G, "idle_close_races", NEEDS, "idle closes by handshake (5 ms idle timeout) while both sides send 200 messages each at irregular gaps: every message delivered exactly once, every send succeeds, closes happened", idle_close_races),
        case(G, "writedata_to", NEEDS, "writedata_to (4 KiB and 1 MiB): the target reports RemoteWrite with the 64-bit data, length and writer, after the data is placed", writedata_to),
        case(G, "sendv_recvv", NEEDS, "sendv_to/recvv gather and scatter across differently split ranges, eager and rendezvous (3 x ~70 KiB), and across a single range; bad range counts refused", sendv_recvv),
    ]
}

/// An RDM endpoint with its objects and the handles of every endpoint of its world.
pub(crate) struct RNode {
    _fabric: Fabric,
    pub domain: Domain,
    pub av: AddressVector,
    pub ep: RdmEndpoint,
    /// Handles of every node of the world (this one included), by index.
    pub to: Vec<FiAddr>,
}

/// The RDM answer for the provider under test on the context's address.
pub(crate) fn rdm_info(ctx: &Ctx) -> Result<RdmInfo, CaseError> {
    let hints = Hints::new()
        .ep_type(EpType::Rdm)
        .caps(Caps::TAGGED | Caps::ATOMIC)
        .provider(ctx.provider())
        .node(&ctx.addr().to_string())
        .service(0)
        .source(true);
    let mut v = fabric::rdm::getinfo(ctx.registry(), &hints).ctx("rdm getinfo")?;
    Ok(v.remove(0))
}

/// `n` endpoints, each with every name in its address vector.
pub(crate) fn world(ctx: &Ctx, n: usize, attr: RdmAttr) -> Result<Vec<RNode>, CaseError> {
    let info = rdm_info(ctx)?;
    let mut nodes = Vec::new();
    for _ in 0..n {
        let fabric = Fabric::open(info.msg()).ctx("open fabric")?;
        let domain = fabric.domain(info.msg()).ctx("open domain")?;
        let av = AddressVector::open(&domain, AvAttr::default()).ctx("open av")?;
        let ep = RdmEndpoint::open(&domain, &info, &av, attr).ctx("open rdm endpoint")?;
        nodes.push(RNode {
            _fabric: fabric,
            domain,
            av,
            ep,
            to: Vec::new(),
        });
    }
    let names: Vec<Vec<u8>> = nodes.iter().map(|x| x.ep.name()).collect();
    for x in &mut nodes {
        for nm in &names {
            let a = x.av.insert(nm).ctx("av insert")?;
            x.to.push(a);
        }
    }
    Ok(nodes)
}

/// The next completion, which must be a success.
pub(crate) fn ok(ctx: &Ctx, ep: &RdmEndpoint) -> Result<RdmCompletion, CaseError> {
    let c = ep.wait(ctx.timeout()).ctx("wait for an rdm completion")?;
    if let Err(e) = &c.status {
        return Err(CaseError::fail(format!(
            "error completion {:?} ({e}) for context {}",
            e.kind, c.context
        )));
    }
    Ok(c)
}

/// The next completion, which must be an error of `kind`.
pub(crate) fn err(
    ctx: &Ctx,
    ep: &RdmEndpoint,
    kind: CqErrorKind,
    what: &str,
) -> Result<RdmCompletion, CaseError> {
    let c = ep.wait(ctx.timeout()).ctx(what)?;
    match &c.status {
        Err(e) if e.kind == kind => Ok(c),
        other => Err(CaseError::fail(format!(
            "{what}: expected error {kind:?}, got {other:?}"
        ))),
    }
}

/// Allocates a region.
pub(crate) fn alloc(d: &Domain, len: usize, access: Access) -> Result<MemoryRegion, CaseError> {
    d.alloc(len, access).ctx("alloc")
}

fn send_recv_source(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let rb = alloc(&b.domain, 256, Access::LOCAL)?;
    let ma = alloc(&a.domain, 64, Access::LOCAL)?;
    ma.write_at(0, b"from a").ctx("fill")?;
    b.ep.recv(rb.iov(0, 64), 1).ctx("recv")?;
    a.ep.senddata_to(ma.iov(0, 6), 0xabcd, a.to[1], 2)
        .ctx("senddata_to")?;
    let s = ok(ctx, &a.ep)?;
    ensure_eq!(
        (s.context, s.kind, s.len),
        (2, OpKind::Send, 6),
        "send completion"
    );
    let r = ok(ctx, &b.ep)?;
    ensure_eq!(
        (r.context, r.kind, r.len),
        (1, OpKind::Recv, 6),
        "recv completion"
    );
    ensure_eq!(r.src, Some(b.to[0]), "FI_SOURCE");
    ensure_eq!(r.data, Some(0xabcd), "remote CQ data");
    ensure_eq!(rb.to_vec(0, 6).ctx("read")?, b"from a".to_vec(), "data");
    // inject: no completion at the sender.
    b.ep.recv(rb.iov(64, 64), 3).ctx("recv")?;
    a.ep.inject_to(ma.iov(0, 4), a.to[1]).ctx("inject_to")?;
    let r = ok(ctx, &b.ep)?;
    ensure_eq!((r.context, r.len, r.data), (3, 4, None), "inject received");
    ensure!(
        a.ep.wait(Duration::from_millis(100)).is_err(),
        "an inject completed"
    );
    // A sender missing from the receiver's AV is reported as unknown.
    b.av.remove(b.to[0]).ctx("av remove")?;
    b.ep.recv(rb.iov(128, 64), 4).ctx("recv")?;
    a.ep.send_to(ma.iov(0, 6), a.to[1], 5).ctx("send_to")?;
    ok(ctx, &a.ep)?;
    let r = ok(ctx, &b.ep)?;
    ensure_eq!((r.context, r.src), (4, None), "source not in the AV");
    Ok(())
}

fn directed_recv(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 3, RdmAttr::default())?;
    let (a, b, c) = (&w[0], &w[1], &w[2]);
    let rb = alloc(&b.domain, 128, Access::LOCAL)?;
    b.ep.recv_from(rb.iov(0, 64), b.to[2], 10)
        .ctx("recv_from")?;
    b.ep.recv(rb.iov(64, 64), 11).ctx("recv")?;
    let ma = alloc(&a.domain, 8, Access::LOCAL)?;
    ma.fill(0, 8, 0xaa).ctx("fill")?;
    a.ep.send_to(ma.iov(0, 8), a.to[1], 1).ctx("send")?;
    ok(ctx, &a.ep)?;
    let r = ok(ctx, &b.ep)?;
    ensure_eq!(
        (r.context, r.src),
        (11, Some(b.to[0])),
        "A's message skips the receive directed at C"
    );
    let mc = alloc(&c.domain, 8, Access::LOCAL)?;
    mc.fill(0, 8, 0xcc).ctx("fill")?;
    c.ep.send_to(mc.iov(0, 8), c.to[1], 1).ctx("send")?;
    ok(ctx, &c.ep)?;
    let r = ok(ctx, &b.ep)?;
    ensure_eq!((r.context, r.src), (10, Some(b.to[2])), "C's message");
    ensure_eq!(rb.to_vec(0, 8).ctx("read")?, vec![0xcc; 8], "C's data");
    ensure_eq!(rb.to_vec(64, 8).ctx("read")?, vec![0xaa; 8], "A's data");
    Ok(())
}

fn self_send(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 1, RdmAttr::default())?;
    let a = &w[0];
    let m = alloc(&a.domain, 64, Access::LOCAL)?;
    m.write_at(0, b"self").ctx("fill")?;
    a.ep.recv(m.iov(32, 32), 1).ctx("recv")?;
    a.ep.send_to(m.iov(0, 4), a.to[0], 2).ctx("send")?;
    let mut seen = [ok(ctx, &a.ep)?, ok(ctx, &a.ep)?];
    seen.sort_by_key(|c| c.context);
    ensure_eq!(
        (seen[0].context, seen[0].src, seen[0].len),
        (1, Some(a.to[0]), 4),
        "receive"
    );
    ensure_eq!(seen[1].context, 2, "send");
    ensure_eq!(m.to_vec(32, 4).ctx("read")?, b"self".to_vec(), "data");
    Ok(())
}

fn truncated(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let rb = alloc(&b.domain, 64, Access::LOCAL)?;
    let ma = alloc(&a.domain, 64, Access::LOCAL)?;
    ma.write_at(0, b"0123456789").ctx("fill")?;
    b.ep.recv(rb.iov(0, 4), 1).ctx("recv")?;
    a.ep.send_to(ma.iov(0, 10), a.to[1], 2).ctx("send")?;
    let r = err(ctx, &b.ep, CqErrorKind::Truncated, "truncated receive")?;
    ensure_eq!(r.len, 4, "bytes placed");
    ensure_eq!(
        rb.to_vec(0, 5).ctx("read")?,
        b"0123\0".to_vec(),
        "placed bytes"
    );
    Ok(())
}

fn simultaneous_connects(ctx: &Ctx) -> CaseResult {
    let n = 5;
    let w = world(ctx, n, RdmAttr::default())?;
    let bufs: Vec<MemoryRegion> = w
        .iter()
        .map(|x| alloc(&x.domain, 64 * n, Access::LOCAL))
        .collect::<Result<_, _>>()?;
    for (i, x) in w.iter().enumerate() {
        for j in (0..n).filter(|&j| j != i) {
            x.ep.recv_from(bufs[i].iov(j * 64, 64), x.to[j], j as u64)
                .ctx("recv_from")?;
        }
        bufs[i].fill(i * 64, 64, i as u8).ctx("fill")?;
    }
    std::thread::scope(|s| -> CaseResult {
        let hs: Vec<_> = w
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let b = &bufs[i];
                s.spawn(move || -> fabric::Result<()> {
                    for j in (0..n).filter(|&j| j != i) {
                        x.ep.send_to(b.iov(i * 64, 64), x.to[j], 100 + j as u64)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| CaseError::fail("a sender thread panicked"))?
                .ctx("send_to")?;
        }
        Ok(())
    })?;
    for (i, x) in w.iter().enumerate() {
        let mut recvs = 0;
        for _ in 0..2 * (n - 1) {
            let c = ok(ctx, &x.ep)?;
            if c.kind == OpKind::Recv {
                ensure_eq!(
                    c.src,
                    Some(x.to[c.context as usize]),
                    "source of node {i}'s message"
                );
                recvs += 1;
            }
        }
        ensure_eq!(recvs, n - 1, "messages at node {i}");
        for j in (0..n).filter(|&j| j != i) {
            ensure_eq!(
                bufs[i].to_vec(j * 64, 64).ctx("read")?,
                vec![j as u8; 64],
                "node {i} from {j}"
            );
        }
    }
    let deadline = Instant::now() + ctx.timeout();
    while w.iter().any(|x| x.ep.connections() != n - 1) {
        ensure!(
            Instant::now() < deadline,
            "connections per node: {:?} (want {} each)",
            w.iter().map(|x| x.ep.connections()).collect::<Vec<_>>(),
            n - 1
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn unexpected_flood(ctx: &Ctx) -> CaseResult {
    let attr = RdmAttr::default();
    let w = world(ctx, 2, attr)?;
    let (a, b) = (&w[0], &w[1]);
    let count = 300usize;
    let ma = alloc(&a.domain, 8 * count, Access::LOCAL)?;
    for i in 0..count {
        ma.write_at(i * 8, &(i as u64).to_le_bytes()).ctx("fill")?;
        a.ep.send_to(ma.iov(i * 8, 8), a.to[1], i as u64)
            .ctx("send_to")?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut done = Vec::new();
    a.ep.read(&mut done, usize::MAX);
    ensure!(
        done.len() <= attr.rx_buffers,
        "{} sends completed with no receive posted (rx_buffers {})",
        done.len(),
        attr.rx_buffers
    );
    let mb = alloc(&b.domain, 8 * count, Access::LOCAL)?;
    for i in 0..count {
        b.ep.recv(mb.iov(i * 8, 8), i as u64).ctx("recv")?;
    }
    for _ in 0..count {
        ok(ctx, &b.ep)?;
    }
    for i in 0..count {
        let v = mb.to_vec(i * 8, 8).ctx("read")?;
        ensure_eq!(v, (i as u64).to_le_bytes().to_vec(), "message {i} in order");
    }
    for _ in done.len()..count {
        ok(ctx, &a.ep)?;
    }
    Ok(())
}

fn idle_close_reopen(ctx: &Ctx) -> CaseResult {
    let attr = RdmAttr::default().idle_timeout(Duration::from_millis(300));
    let w = world(ctx, 2, attr)?;
    let (a, b) = (&w[0], &w[1]);
    let m = alloc(&a.domain, 8, Access::LOCAL)?;
    let mb = alloc(&b.domain, 8, Access::LOCAL)?;
    for round in 0..2u8 {
        b.ep.recv(mb.iov(0, 8), round as u64).ctx("recv")?;
        m.fill(0, 8, round).ctx("fill")?;
        a.ep.send_to(m.iov(0, 8), a.to[1], round as u64)
            .ctx("send_to")?;
        ok(ctx, &a.ep)?;
        ensure_eq!(ok(ctx, &b.ep)?.context, round as u64, "round {round}");
        ensure_eq!(
            mb.to_vec(0, 8).ctx("read")?,
            vec![round; 8],
            "round {round} data"
        );
        ensure_eq!(a.ep.connections(), 1, "connections while in use");
        let deadline = Instant::now() + ctx.timeout();
        while a.ep.connections() + b.ep.connections() != 0 {
            ensure!(Instant::now() < deadline, "the idle connection stays open");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn rma_to(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let len = 65_536;
    let target = alloc(&b.domain, len, Access::LOCAL | Access::REMOTE)?;
    let remote = target.remote();
    let src = alloc(&a.domain, len, Access::LOCAL)?;
    let back = alloc(&a.domain, len, Access::LOCAL)?;
    let data = crate::payload::pattern(5, len);
    src.write_at(0, &data).ctx("fill")?;
    // The first operation to B opens the connection.
    a.ep.write_to(src.iov(0, len), a.to[1], remote.iov(0, len), 1)
        .ctx("write_to")?;
    let c = ok(ctx, &a.ep)?;
    ensure_eq!(
        (c.context, c.kind, c.len),
        (1, OpKind::Write, len),
        "write completion"
    );
    ensure!(
        target.to_vec(0, len).ctx("read")? == data,
        "written data differs"
    );
    target.fill(100, 10, 0xee).ctx("fill")?;
    a.ep.read_to(back.iov(0, len), a.to[1], remote.iov(0, len), 2)
        .ctx("read_to")?;
    let c = ok(ctx, &a.ep)?;
    ensure_eq!(
        (c.context, c.kind, c.len),
        (2, OpKind::Read, len),
        "read completion"
    );
    let mut want = data;
    want[100..110].fill(0xee);
    ensure!(
        back.to_vec(0, len).ctx("read")? == want,
        "read data differs"
    );
    ensure!(
        a.ep.write_to(src.iov(0, 8), a.to[1], remote.iov(0, 16), 3)
            .is_err(),
        "lengths that differ were accepted"
    );
    Ok(())
}

fn writedata_to(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let len = 1 << 20;
    let target = alloc(&b.domain, len, Access::LOCAL | Access::REMOTE)?;
    let remote = target.remote();
    let src = alloc(&a.domain, len, Access::LOCAL)?;
    for (i, (n, data)) in [(4096usize, 0x0123_4567_89ab_cdefu64), (len, u64::MAX - 7)]
        .into_iter()
        .enumerate()
    {
        let bytes = crate::payload::pattern(40 + i as u64, n);
        src.write_at(0, &bytes).ctx("fill")?;
        a.ep.writedata_to(src.iov(0, n), data, a.to[1], remote.iov(0, n), 7 + i as u64)
            .ctx("writedata_to")?;
        // The target's completion comes once the data is placed: look at once.
        let r = ok(ctx, &b.ep)?;
        ensure!(
            target.to_vec(0, n).ctx("read")? == bytes,
            "write {i}: the data was not in place when the target saw the CQ data"
        );
        ensure_eq!(
            (r.kind, r.len, r.data, r.src),
            (OpKind::RemoteWrite, n, Some(data), Some(b.to[0])),
            "write {i}: target completion"
        );
        let c = ok(ctx, &a.ep)?;
        ensure_eq!(
            (c.context, c.kind, c.len),
            (7 + i as u64, OpKind::Write, n),
            "write {i}: initiator completion"
        );
    }
    Ok(())
}

fn sendv_recvv(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    // Eager (60 B) and rendezvous (3 ranges, 210,000 B, above the 8 KiB eager limit).
    for (round, sizes) in [[10usize, 20, 30], [70_000, 70_001, 69_999]]
        .into_iter()
        .enumerate()
    {
        let total: usize = sizes.iter().sum();
        let data = crate::payload::pattern(60 + round as u64, total);
        // Three sender regions, the ranges at odd offsets.
        let mut regions = Vec::new();
        let mut at = 0;
        for (k, n) in sizes.iter().enumerate() {
            let r = alloc(&a.domain, n + 16, Access::LOCAL | Access::REMOTE_READ)?;
            r.write_at(3 + k, &data[at..at + n]).ctx("fill")?;
            at += n;
            regions.push(r);
        }
        let iov: Vec<_> = regions
            .iter()
            .zip(sizes)
            .enumerate()
            .map(|(k, (r, n))| r.iov(3 + k, n))
            .collect();
        // The receiver scatters into two regions, split elsewhere.
        let split = total / 3 + 1;
        let r1 = alloc(&b.domain, split + 8, Access::LOCAL)?;
        let r2 = alloc(&b.domain, total - split + 8, Access::LOCAL)?;
        b.ep.recvv(&[r1.iov(8, split), r2.iov(0, total - split)], None, 1)
            .ctx("recvv")?;
        a.ep.sendv_to(&iov, a.to[1], 2).ctx("sendv_to")?;
        let r = ok(ctx, &b.ep)?;
        ensure_eq!(
            (r.context, r.kind, r.len, r.src),
            (1, OpKind::Recv, total, Some(b.to[0])),
            "round {round}: receive"
        );
        let mut got = r1.to_vec(8, split).ctx("read")?;
        got.extend(r2.to_vec(0, total - split).ctx("read")?);
        ensure!(got == data, "round {round}: scattered data differs");
        let s = ok(ctx, &a.ep)?;
        ensure_eq!((s.context, s.len), (2, total), "round {round}: send");
        // The same gathered message into one range.
        let one = alloc(&b.domain, total, Access::LOCAL)?;
        b.ep.recv(one.full(), 3).ctx("recv")?;
        a.ep.sendv_to(&iov, a.to[1], 4).ctx("sendv_to")?;
        ensure_eq!(
            ok(ctx, &b.ep)?.len,
            total,
            "round {round}: single-range receive"
        );
        ensure!(
            one.to_vec(0, total).ctx("read")? == data,
            "round {round}: gathered data differs"
        );
        ok(ctx, &a.ep)?;
    }
    let m = alloc(&a.domain, 64, Access::LOCAL)?;
    ensure!(
        a.ep.sendv_to(&[], a.to[1], 5).is_err(),
        "a send of no ranges was accepted"
    );
    let nine: Vec<_> = (0..9).map(|k| m.iov(k, 1)).collect();
    ensure!(
        a.ep.sendv_to(&nine, a.to[1], 6).is_err(),
        "a send of 9 ranges was accepted (IOV_LIMIT is 8)"
    );
    ensure!(
        b.ep.recvv(&[], None, 7).is_err(),
        "a receive of no ranges was accepted"
    );
    Ok(())
}

fn idle_close_races(ctx: &Ctx) -> CaseResult {
    let attr = RdmAttr::default().idle_timeout(Duration::from_millis(5));
    let w = world(ctx, 2, attr)?;
    let n = 200usize;
    // Gaps of 0 to 11 ms (fixed pseudo-random): many land just before, at or just after
    // an idle close.
    let gaps: Vec<u64> = (0..n as u64).map(|i| (i * 7919 + 13) % 12).collect();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|me| {
                let node = &w[me];
                let gaps = &gaps;
                s.spawn(move || -> Result<(Vec<u64>, usize), CaseError> {
                    let peer = node.to[1 - me];
                    let rx = alloc(&node.domain, 8 * n, Access::LOCAL)?;
                    let tx = alloc(&node.domain, 8 * n, Access::LOCAL)?;
                    for i in 0..n {
                        node.ep
                            .recv(rx.iov(8 * i, 8), (1 << 32) | i as u64)
                            .ctx("recv")?;
                    }
                    // (sends completed, receives completed, values received)
                    let mut t = (0usize, 0usize, Vec::new());
                    let take = |t: &mut (usize, usize, Vec<u64>),
                                c: RdmCompletion|
                     -> Result<(), CaseError> {
                        if let Err(e) = &c.status {
                            return Err(CaseError::fail(format!(
                                "endpoint {me}: error completion {:?} ({e}) for {:#x}",
                                e.kind, c.context
                            )));
                        }
                        if c.context >> 32 == 1 {
                            t.1 += 1;
                            let i = (c.context & 0xffff_ffff) as usize;
                            let v = rx.to_vec(8 * i, 8).ctx("read")?;
                            t.2.push(u64::from_le_bytes(v.try_into().expect("8 bytes")));
                        } else {
                            t.0 += 1;
                        }
                        Ok(())
                    };
                    let mut buf = Vec::new();
                    for i in 0..n {
                        std::thread::sleep(Duration::from_millis(gaps[(i + me * 5) % n]));
                        tx.write_at(8 * i, &((me as u64) << 32 | i as u64).to_le_bytes())
                            .ctx("fill")?;
                        node.ep
                            .send_to(tx.iov(8 * i, 8), peer, i as u64)
                            .ctx("send_to")?;
                        node.ep.read(&mut buf, usize::MAX);
                        for c in buf.drain(..) {
                            take(&mut t, c)?;
                        }
                    }
                    let deadline = Instant::now() + ctx.timeout();
                    while t.0 < n || t.1 < n {
                        ensure!(
                            Instant::now() < deadline,
                            "endpoint {me}: {} of {n} sends and {} of {n} receives completed",
                            t.0,
                            t.1
                        );
                        if let Ok(c) = node.ep.wait(Duration::from_millis(50)) {
                            take(&mut t, c)?;
                        }
                    }
                    Ok((t.2, node.ep.idle_closes() as usize))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("endpoint thread"))
            .collect::<Vec<_>>()
    });
    let mut closes = 0;
    for (me, r) in results.into_iter().enumerate() {
        let (mut got, c) = r?;
        closes += c;
        got.sort_unstable();
        let want: Vec<u64> = (0..n as u64).map(|i| ((1 - me as u64) << 32) | i).collect();
        ensure!(
            got == want,
            "endpoint {me}: the messages received are not each of the peer's exactly once"
        );
    }
    ensure!(
        closes >= 10,
        "only {closes} idle closes happened during the traffic: the race was not exercised"
    );
    Ok(())
}
