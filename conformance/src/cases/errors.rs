//! errors: remote access violations (each on a fresh pair, with the target verified
//! untouched and the connection ended at both ends), connection refusal and rejection,
//! peer death, use after shutdown, requests refused at post.

use std::time::{Duration, Instant};

use fabric::{Access, Caps, CqErrorKind, ErrorKind, Event, OpFlags, RemoteIov, RemoteMr, RmaMsg};

use super::semantics::{expect_access_error_shutdown, posts_fail};
use super::{case, expect_cq_error, is_flushed, limits, wrong_key};
use crate::case::{expect_err, Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::pair::{Pair, Side, Who};
use crate::payload::{all_bytes, pattern};
use crate::{ensure, ensure_eq};

const G: &str = "errors";
const RMA: Caps = Caps::MSG.union(Caps::RMA);

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "bad_key_write", RMA, "write with a wrong key: RemoteAccess, connection ended at both ends (Shutdown AccessError, posts fail), target untouched", bad_key_write),
        case(G, "bad_key_read", RMA, "read with a wrong key: RemoteAccess, connection ended at both ends, local buffer and target untouched", bad_key_read),
        case(G, "out_of_bounds_write", RMA, "write running 10 bytes past the region (and one just past its end): RemoteAccess, connection ended at both ends, target untouched", out_of_bounds_write),
        case(G, "out_of_bounds_read", RMA, "read running past the region: RemoteAccess, connection ended at both ends, local buffer untouched", out_of_bounds_read),
        case(G, "offset_overflow_write", RMA, "write at an offset near u64::MAX (address wraps): RemoteAccess, connection ended at both ends, target untouched", offset_overflow_write),
        case(G, "offset_overflow_read", RMA, "read at an offset near u64::MAX: RemoteAccess, connection ended at both ends, local buffer untouched", offset_overflow_read),
        case(G, "no_remote_write", RMA, "write into a region without REMOTE_WRITE: RemoteAccess, connection ended at both ends, target untouched", no_remote_write),
        case(G, "no_remote_read", RMA, "read from a region without REMOTE_READ: RemoteAccess, connection ended at both ends, local buffer untouched", no_remote_read),
        case(G, "stale_key", RMA, "write with the key of a dropped region: RemoteAccess, connection ended at both ends, a newer region untouched", stale_key),
        case(G, "writedata_bad_key", RMA | Caps::REMOTE_CQ_DATA, "write with CQ data and a wrong key: RemoteAccess, the target's posted receive flushed (never a CQ-data completion), connection ended at both ends", writedata_bad_key),
        case(G, "connection_refused", Caps::MSG, "connect to a port with no listener: Event::Error ConnectionRefused", connection_refused),
        case(G, "reject_with_data", Caps::MSG, "reject: client gets Event::Error ConnectionRefused with the reject data; listener keeps listening", reject_with_data),
        case(G, "peer_death", RMA, "peer endpoint dropped mid-transfer: every operation completes, receives in error, Shutdown, later posts fail at the call, no hang", peer_death),
        case(G, "ops_after_shutdown", Caps::MSG, "after shutdown, posted receives complete in error; new posts fail at the call (Shutdown on the side that shut down, NotConnected at its peer)", ops_after_shutdown),
        case(G, "length_mismatch", RMA, "local and remote iovec lengths that differ are refused at post", length_mismatch),
        case(G, "iov_limits", RMA, "more iovecs than iov_limit / rma_iov_limit, or no remote iovec, refused at post", iov_limits),
        case(G, "max_msg_exceeded", Caps::MSG, "a send or receive over max_msg_size bytes is refused at post", max_msg_exceeded),
        case(G, "commit_without_pmem", RMA, "COMMIT_COMPLETE: refused without RMA_PMEM; into a non-PMEM region RemoteInvalid and the connection ended at both ends", commit_without_pmem),
    ]
}

const TARGET: usize = 8192;
const TARGET_FILL: u8 = 0xA5;
const LOCAL_FILL: u8 = 0x3C;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Write,
    Read,
}

/// Posts one RMA that the target must refuse and checks: error completion RemoteAccess
/// with the context, nothing at the target's queue, target memory and (for reads) the
/// local buffer untouched, even a while later.
fn violation(
    ctx: &Ctx,
    target_access: Access,
    op: Op,
    remote: impl Fn(&RemoteMr) -> RemoteIov,
) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = p.server.alloc(TARGET, target_access)?;
    t.fill(0, TARGET, TARGET_FILL).ctx("fill target")?;
    let l = p.client.alloc(TARGET, Access::READ | Access::WRITE)?;
    let ri = remote(&t.remote());
    let what = format!("{op:?} {} B at {:#x} key {:#x}", ri.len, ri.addr, ri.key);
    match op {
        Op::Write => {
            l.write_at(0, &pattern(1, TARGET)).ctx("fill local")?;
            p.client.ep.write(l.iov(0, ri.len), ri, 0xBAD).ctx(&what)?;
        }
        Op::Read => {
            l.fill(0, TARGET, LOCAL_FILL).ctx("fill local")?;
            p.client.ep.read(l.iov(0, ri.len), ri, 0xBAD).ctx(&what)?;
        }
    }
    let c = p.wait(Who::Client)?;
    expect_cq_error(&c, CqErrorKind::RemoteAccess, &what)?;
    ensure_eq!(c.context, 0xBAD, "{what}: context of the error completion");
    expect_access_error_shutdown(&p, t.remote().iov(0, 8)).map_err(|e| e.context(&what))?;
    p.expect_no_completion(
        Who::Server,
        Duration::from_millis(100),
        &format!("target of {what}"),
    )?;
    all_bytes(
        &format!("target after {what}"),
        &t.to_vec(0, TARGET)?,
        TARGET_FILL,
    )?;
    if op == Op::Read {
        all_bytes(
            &format!("local buffer after {what}"),
            &l.to_vec(0, TARGET)?,
            LOCAL_FILL,
        )?;
    }
    Ok(())
}

fn bad_key_write(ctx: &Ctx) -> CaseResult {
    violation(ctx, Access::REMOTE, Op::Write, wrong_key)
}

fn bad_key_read(ctx: &Ctx) -> CaseResult {
    violation(ctx, Access::REMOTE, Op::Read, wrong_key)
}

fn out_of_bounds_write(ctx: &Ctx) -> CaseResult {
    violation(ctx, Access::REMOTE, Op::Write, |r| {
        r.iov(TARGET as u64 - 10, 20)
    })?;
    violation(ctx, Access::REMOTE, Op::Write, |r| r.iov(TARGET as u64, 1))
}

fn out_of_bounds_read(ctx: &Ctx) -> CaseResult {
    violation(ctx, Access::REMOTE, Op::Read, |r| {
        r.iov(TARGET as u64 - 2, 64)
    })?;
    violation(ctx, Access::REMOTE, Op::Read, |r| {
        r.iov(TARGET as u64 + 4096, 8)
    })
}

fn offset_overflow_write(ctx: &Ctx) -> CaseResult {
    violation(ctx, Access::REMOTE, Op::Write, |r| r.iov(u64::MAX - 7, 16))?;
    violation(ctx, Access::REMOTE, Op::Write, |r| RemoteIov {
        addr: u64::MAX - 7,
        len: 16,
        key: r.key,
    })
}

fn offset_overflow_read(ctx: &Ctx) -> CaseResult {
    violation(ctx, Access::REMOTE, Op::Read, |r| r.iov(u64::MAX - 7, 16))?;
    violation(ctx, Access::REMOTE, Op::Read, |r| RemoteIov {
        addr: u64::MAX,
        len: 2,
        key: r.key,
    })
}

fn no_remote_write(ctx: &Ctx) -> CaseResult {
    violation(ctx, Access::REMOTE_READ | Access::LOCAL, Op::Write, |r| {
        r.iov(0, 64)
    })
}

fn no_remote_read(ctx: &Ctx) -> CaseResult {
    violation(ctx, Access::REMOTE_WRITE | Access::LOCAL, Op::Read, |r| {
        r.iov(0, 64)
    })
}

fn stale_key(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let old = p.server.alloc(TARGET, Access::REMOTE)?;
    let stale = old.remote();
    drop(old);
    let newer = p.server.alloc(TARGET, Access::REMOTE)?;
    newer.fill(0, TARGET, TARGET_FILL).ctx("fill")?;
    let l = p.client.alloc(64, Access::WRITE)?;
    l.fill(0, 64, 1).ctx("fill")?;
    p.client
        .ep
        .write(l.full(), stale.iov(0, 64), 7)
        .ctx("write with a stale key")?;
    let c = p.wait(Who::Client)?;
    expect_cq_error(
        &c,
        CqErrorKind::RemoteAccess,
        "write with the key of a dropped region",
    )?;
    expect_access_error_shutdown(&p, newer.remote().iov(0, 8))?;
    all_bytes(
        "a region registered after the drop",
        &newer.to_vec(0, TARGET)?,
        TARGET_FILL,
    )?;
    Ok(())
}

fn writedata_bad_key(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA | Caps::REMOTE_CQ_DATA)?;
    let t = p.server.alloc(TARGET, Access::REMOTE)?;
    t.fill(0, TARGET, TARGET_FILL).ctx("fill")?;
    let rx = p.server.alloc(64, Access::RECV)?;
    p.server.ep.recv(rx.full(), 1).ctx("post recv")?;
    let l = p.client.alloc(64, Access::WRITE)?;
    p.client
        .ep
        .writedata(l.full(), wrong_key(&t.remote()), 1, 2)
        .ctx("writedata")?;
    let c = p.wait(Who::Client)?;
    expect_cq_error(&c, CqErrorKind::RemoteAccess, "writedata with a wrong key")?;
    // The refusal ends the connection: the target's receive is flushed, never consumed
    // by the refused write's CQ data.
    let c = p.wait(Who::Server).ctx("the target's posted receive")?;
    ensure!(
        c.context == 1 && is_flushed(&c),
        "target of a refused writedata: expected its receive flushed (Canceled), got {c:?}"
    );
    expect_access_error_shutdown(&p, t.remote().iov(0, 8))?;
    p.expect_no_completion(
        Who::Server,
        Duration::from_millis(100),
        "target of a refused writedata",
    )?;
    all_bytes("target", &t.to_vec(0, TARGET)?, TARGET_FILL)?;
    Ok(())
}

fn connection_refused(ctx: &Ctx) -> CaseResult {
    // A port that had a listener a moment ago and has none now.
    let addr = {
        let l = ctx.listen(Caps::MSG, None)?;
        l.addr.clone()
    };
    let info = ctx.info(&ctx.connect_hints(Caps::MSG, None, &addr)?)?;
    let node = ctx.open(info)?;
    let ep = node
        .domain
        .endpoint(&node.info, fabric::EndpointConfig::new(&node.cq, &node.eq))
        .ctx("endpoint")?;
    if let Err(e) = ep.connect(b"anyone?") {
        return Err(CaseError::fail(format!(
            "connect returned {e} at once; expected Ok and then Event::Error ConnectionRefused"
        )));
    }
    match node.wait_event(&[], ctx.timeout())? {
        Event::Error { fid, error, .. } => {
            ensure_eq!(fid, ep.fid(), "fid of the error event");
            ensure_eq!(
                error.kind(),
                ErrorKind::ConnectionRefused,
                "error kind ({error})"
            );
        }
        other => {
            return Err(CaseError::fail(format!(
                "expected Event::Error, got {other:?}"
            )))
        }
    }
    expect_err_or_error_completion(
        &node,
        ep.send(node.domain.alloc(8, Access::SEND)?.full(), 1),
        "send on a refused endpoint",
    )
}

fn reject_with_data(ctx: &Ctx) -> CaseResult {
    let l = ctx.listen(Caps::MSG, None)?;
    let c = ctx.connect(Caps::MSG, None, &l.addr, b"please")?;
    let req = crate::pair::wait_conn_request(&l.node, &[&c.node], ctx.timeout())?;
    ensure_eq!(req.data, b"please".to_vec(), "request data");
    l.pep.reject(&req, b"not today").ctx("reject")?;
    match c.node.wait_event(&[&l.node], ctx.timeout())? {
        Event::Error { fid, error, data } => {
            ensure_eq!(fid, c.ep.fid(), "fid of the error event");
            ensure_eq!(
                error.kind(),
                ErrorKind::ConnectionRefused,
                "error kind ({error})"
            );
            ensure_eq!(data, b"not today".to_vec(), "reject data");
        }
        other => {
            return Err(CaseError::fail(format!(
                "client: expected Event::Error, got {other:?}"
            )))
        }
    }
    // The listener still takes requests.
    let c2 = ctx.connect(Caps::MSG, None, &l.addr, b"again")?;
    let req2 = crate::pair::wait_conn_request(&l.node, &[&c2.node], ctx.timeout())
        .map_err(|e| e.context("listener after a reject"))?;
    ensure_eq!(req2.data, b"again".to_vec(), "second request data");
    Ok(())
}

fn peer_death(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let big = (8usize << 20).min(limits(&p).max_msg_size);
    let src = p.server.alloc(big, Access::REMOTE)?;
    let rx = p.client.alloc(4 * 1024, Access::RECV)?;
    let tx = p.client.alloc(4 * 256 * 1024, Access::SEND)?;
    let rd = p.client.alloc(big, Access::READ)?;
    for i in 0..4u64 {
        p.client
            .ep
            .recv(rx.iov(i as usize * 1024, 1024), 10 + i)
            .ctx("post recv")?;
    }
    let msg = (256 * 1024).min(limits(&p).max_msg_size);
    for i in 0..4u64 {
        p.client
            .ep
            .send(tx.iov(i as usize * msg, msg), 20 + i)
            .ctx("send")?;
    }
    p.client
        .ep
        .read(rd.full(), src.remote().full(), 30)
        .ctx("read")?;
    let posted = 9;
    let start = Instant::now();
    let Pair {
        server,
        client,
        listener,
        ..
    } = p;
    let Side {
        node: server_node,
        ep: server_ep,
        ..
    } = server;
    drop(server_ep);
    drop(listener);
    let limit = Duration::from_secs(10);
    let mut done = Vec::new();
    let mut shutdown = false;
    while done.len() < posted || !shutdown {
        ensure!(
            start.elapsed() < limit,
            "after the peer's endpoint was dropped: {} of {posted} operations completed, Shutdown {}, within {limit:?}",
            done.len(),
            if shutdown { "seen" } else { "not seen" }
        );
        client.drive()?;
        server_node.drive()?;
        while let Some(c) = client.take_completion() {
            done.push(c);
        }
        while let Some(ev) = client.take_event() {
            match ev {
                Event::Shutdown { fid, .. } if fid == client.ep.fid() => shutdown = true,
                Event::Error { fid, .. } if fid == client.ep.fid() => {}
                other => return Err(CaseError::fail(format!("unexpected event {other:?}"))),
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut ctxs: Vec<u64> = done.iter().map(|c| c.context).collect();
    ctxs.sort_unstable();
    ensure_eq!(
        ctxs,
        vec![10, 11, 12, 13, 20, 21, 22, 23, 30],
        "every posted operation completed once"
    );
    for c in &done {
        if (10..14).contains(&c.context) {
            ensure!(
                is_flushed(c),
                "posted receive {}: expected Canceled or ConnectionLost, got {c:?}",
                c.context
            );
        } else {
            ensure!(
                c.is_ok() || is_flushed(c),
                "operation {}: expected success or ConnectionLost/Canceled, got {c:?}",
                c.context
            );
        }
    }
    posts_fail(
        &client,
        None,
        ErrorKind::NotConnected,
        "after the peer died",
    )
}

/// An operation on a dead connection fails cleanly: an error at post, or an error
/// completion soon (never a success, never a hang).
fn expect_err_or_error_completion(
    node: &crate::Node,
    posted: fabric::Result<()>,
    what: &str,
) -> CaseResult {
    match posted {
        Err(e) => {
            ensure!(
                matches!(e.kind(), ErrorKind::NotConnected | ErrorKind::Shutdown),
                "{what}: refused with {:?} ({e}); expected NotConnected or Shutdown",
                e.kind()
            );
            Ok(())
        }
        Ok(()) => {
            let c = node
                .wait_completion(&[], Duration::from_secs(5))
                .map_err(|e| e.context(format!("{what} was accepted")))?;
            ensure!(c.status.is_err(), "{what}: completed successfully: {c:?}");
            Ok(())
        }
    }
}

fn ops_after_shutdown(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let rx = p.client.alloc(64, Access::RECV | Access::SEND)?;
    p.client.ep.recv(rx.full(), 1).ctx("post recv")?;
    p.client.ep.shutdown().ctx("shutdown")?;
    for who in [Who::Client, Who::Server] {
        let fid = p.side(who).ep.fid();
        match p.wait_event(who)? {
            Event::Shutdown { fid: f, .. } if f == fid => {}
            other => {
                return Err(CaseError::fail(format!(
                    "{who:?}: expected Shutdown, got {other:?}"
                )))
            }
        }
    }
    let c = p
        .wait(Who::Client)
        .map_err(|e| e.context("the receive posted before shutdown"))?;
    ensure_eq!(c.context, 1, "flushed receive context");
    ensure!(
        is_flushed(&c),
        "receive posted before shutdown: expected Canceled or ConnectionLost, got {c:?}"
    );
    posts_fail(
        &p.client,
        None,
        ErrorKind::Shutdown,
        "client after shutdown",
    )?;
    posts_fail(
        &p.server,
        None,
        ErrorKind::NotConnected,
        "server after the peer's shutdown",
    )?;
    Ok(())
}

fn length_mismatch(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = p.server.alloc(4096, Access::REMOTE)?;
    t.fill(0, 4096, TARGET_FILL).ctx("fill")?;
    let l = p.client.alloc(4096, Access::READ | Access::WRITE)?;
    l.fill(0, 4096, LOCAL_FILL).ctx("fill")?;
    let r = t.remote();
    expect_err(
        p.client.ep.write(l.iov(0, 100), r.iov(0, 64), 1),
        ErrorKind::InvalidArgument,
        "write 100 local bytes into 64 remote",
    )?;
    expect_err(
        p.client.ep.read(l.iov(0, 64), r.iov(0, 100), 2),
        ErrorKind::InvalidArgument,
        "read 100 remote bytes into 64 local",
    )?;
    let msg = RmaMsg {
        iov: &[l.iov(0, 10), l.iov(10, 10)],
        rma_iov: &[r.iov(0, 10), r.iov(100, 11)],
        context: 3,
        data: 0,
    };
    expect_err(
        p.client.ep.writemsg(&msg, OpFlags::COMPLETION),
        ErrorKind::InvalidArgument,
        "writemsg 20 local, 21 remote bytes",
    )?;
    expect_err(
        p.client.ep.inject_write(&[1, 2, 3], r.iov(0, 4)),
        ErrorKind::InvalidArgument,
        "inject_write 3 bytes into 4",
    )?;
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(100),
        "after refused posts",
    )?;
    all_bytes("target", &t.to_vec(0, 4096)?, TARGET_FILL)?;
    all_bytes("local", &l.to_vec(0, 4096)?, LOCAL_FILL)?;
    Ok(())
}

fn iov_limits(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let lim = limits(&p);
    if lim.iov_limit > 4096 || lim.rma_iov_limit > 4096 {
        return Err(CaseError::skip("iovec limits above 4096"));
    }
    let n = lim.iov_limit + 1;
    let m = lim.rma_iov_limit + 1;
    let l = p.client.alloc(n.max(m), Access::LOCAL)?;
    let t = p.server.alloc(n.max(m), Access::REMOTE)?;
    let r = t.remote();
    let local: Vec<_> = (0..n).map(|i| l.iov(i, 1)).collect();
    expect_err(
        p.client.ep.sendv(&local, 1),
        ErrorKind::InvalidArgument,
        &format!("sendv with {n} iovecs (limit {})", lim.iov_limit),
    )?;
    expect_err(
        p.client.ep.recvv(&local, 2),
        ErrorKind::InvalidArgument,
        &format!("recvv with {n} iovecs"),
    )?;
    let remote: Vec<_> = (0..m).map(|i| r.iov(i as u64, 1)).collect();
    let one = [l.iov(0, m)];
    let msg = RmaMsg {
        iov: &one,
        rma_iov: &remote,
        context: 3,
        data: 0,
    };
    expect_err(
        p.client.ep.writemsg(&msg, OpFlags::COMPLETION),
        ErrorKind::InvalidArgument,
        &format!(
            "writemsg with {m} remote iovecs (limit {})",
            lim.rma_iov_limit
        ),
    )?;
    let none = RmaMsg {
        iov: &[l.iov(0, 0)],
        rma_iov: &[],
        context: 4,
        data: 0,
    };
    expect_err(
        p.client.ep.writemsg(&none, OpFlags::COMPLETION),
        ErrorKind::InvalidArgument,
        "writemsg with no remote iovec",
    )?;
    expect_err(
        p.client.ep.readmsg(&none, OpFlags::COMPLETION),
        ErrorKind::InvalidArgument,
        "readmsg with no remote iovec",
    )?;
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(50),
        "after refused posts",
    )?;
    Ok(())
}

fn max_msg_exceeded(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let lim = limits(&p);
    let max = lim.max_msg_size;
    // Reach max + 1 bytes with up to 16 iovecs over one region, so a 1 GiB limit needs
    // only a 64 MiB region.
    let k = lim.iov_limit.clamp(1, 16);
    let chunk = max / k + 1;
    if chunk > 256 << 20 {
        return Err(CaseError::skip(format!(
            "max_msg_size {max} with iov_limit {} needs a region over 256 MiB",
            lim.iov_limit
        )));
    }
    let tx = p.client.alloc(chunk, Access::SEND | Access::RECV)?;
    let iovs: Vec<_> = (0..k).map(|_| tx.full()).collect();
    let total = chunk * k;
    ensure!(total > max, "internal: {total} bytes do not exceed {max}");
    expect_err(
        p.client.ep.sendv(&iovs, 1),
        ErrorKind::InvalidArgument,
        &format!("send of {total} bytes (max_msg_size {max})"),
    )?;
    expect_err(
        p.client.ep.recvv(&iovs, 2),
        ErrorKind::InvalidArgument,
        &format!("recv of {total} bytes (max_msg_size {max})"),
    )?;
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(50),
        "after refused posts",
    )?;
    Ok(())
}

fn commit_without_pmem(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = p.server.alloc(4096, Access::REMOTE)?;
    t.fill(0, 4096, TARGET_FILL).ctx("fill")?;
    let l = p.client.alloc(64, Access::WRITE)?;
    let msg = RmaMsg {
        iov: &[l.full()],
        rma_iov: &[t.remote().iov(0, 64)],
        context: 5,
        data: 0,
    };
    let r = p
        .client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE);
    if !p.client.ep.info().caps.contains(Caps::RMA_PMEM) {
        expect_err(
            r,
            ErrorKind::NotSupported,
            "COMMIT_COMPLETE without RMA_PMEM",
        )?;
        p.expect_no_completion(
            Who::Client,
            Duration::from_millis(50),
            "after refused commit",
        )?;
    } else {
        r.ctx("writemsg COMMIT_COMPLETE")?;
        let c = p.wait(Who::Client)?;
        expect_cq_error(
            &c,
            CqErrorKind::RemoteInvalid,
            "COMMIT_COMPLETE into a region not registered PMEM",
        )?;
        expect_access_error_shutdown(&p, t.remote().iov(0, 8))?;
    }
    all_bytes("target", &t.to_vec(0, 4096)?, TARGET_FILL)?;
    Ok(())
}
