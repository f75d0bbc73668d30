//! cntr: completion counters of the RDM layer (libfabric `fi_cntr`): per-class
//! success counts with wait, error counts apart, add/set, and a wait that ends on an
//! error or a timeout.

use std::time::Duration;

use fabric::rdm::{AtomicOp, CntrEvents, Counter, Datatype, RdmAttr};
use fabric::{Access, ErrorKind};

use super::case;
use super::rdm::{alloc, world, NEEDS};
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::{ensure, ensure_eq};

const G: &str = "cntr";

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "classes", NEEDS, "send, recv, read (fetching atomics) and write (atomics) counters each count their class only", classes),
        case(G, "errors", NEEDS, "an error completion bumps the error count, not the success count", errors),
        case(G, "add_set_wait", NEEDS, "add, set, wait on a threshold and a wait that times out", add_set_wait),
    ]
}

fn classes(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let (send, recv, read, write) = (
        Counter::new(),
        Counter::new(),
        Counter::new(),
        Counter::new(),
    );
    a.ep.bind_cntr(&send, CntrEvents::SEND);
    b.ep.bind_cntr(&recv, CntrEvents::RECV);
    a.ep.bind_cntr(&read, CntrEvents::READ);
    a.ep.bind_cntr(&write, CntrEvents::WRITE);
    let m = alloc(&a.domain, 64, Access::LOCAL)?;
    let mb = alloc(&b.domain, 64, Access::LOCAL)?;
    for i in 0..10 {
        b.ep.recv(mb.iov(0, 64), i).ctx("recv")?;
        a.ep.send_to(m.iov(0, 8), a.to[1], i).ctx("send")?;
    }
    ensure_eq!(
        send.wait(10, ctx.timeout()).ctx("send counter")?,
        10,
        "sends"
    );
    ensure_eq!(
        recv.wait(10, ctx.timeout()).ctx("recv counter")?,
        10,
        "receives"
    );
    let target = alloc(&b.domain, 8, Access::LOCAL | Access::REMOTE)?;
    b.ep.bind_mr(&target).ctx("bind_mr")?;
    let r = target.remote().iov(0, 8);
    for i in 0..3 {
        a.ep.fetch_atomic(
            AtomicOp::Sum,
            Datatype::U64,
            &1u64.to_le_bytes(),
            m.iov(8, 8),
            a.to[1],
            r,
            i,
        )
        .ctx("fetch_atomic")?;
    }
    for i in 0..5 {
        a.ep.atomic(
            AtomicOp::Sum,
            Datatype::U64,
            &1u64.to_le_bytes(),
            a.to[1],
            r,
            i,
        )
        .ctx("atomic")?;
    }
    ensure_eq!(
        read.wait(3, ctx.timeout()).ctx("read counter")?,
        3,
        "fetching atomics"
    );
    ensure_eq!(
        write.wait(5, ctx.timeout()).ctx("write counter")?,
        5,
        "atomics"
    );
    std::thread::sleep(Duration::from_millis(50));
    ensure_eq!(
        (send.read(), recv.read(), read.read(), write.read()),
        (10, 10, 3, 5),
        "no class counted twice"
    );
    Ok(())
}

fn errors(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let recv = Counter::new();
    b.ep.bind_cntr(&recv, CntrEvents::RECV);
    let m = alloc(&a.domain, 64, Access::LOCAL)?;
    let mb = alloc(&b.domain, 64, Access::LOCAL)?;
    b.ep.recv(mb.iov(0, 64), 1).ctx("recv")?;
    a.ep.send_to(m.iov(0, 8), a.to[1], 1).ctx("send")?;
    recv.wait(1, ctx.timeout()).ctx("first receive")?;
    b.ep.recv(mb.iov(0, 4), 2).ctx("recv")?;
    a.ep.send_to(m.iov(0, 8), a.to[1], 2).ctx("send")?;
    let deadline = std::time::Instant::now() + ctx.timeout();
    while recv.read_err() == 0 {
        ensure!(
            std::time::Instant::now() < deadline,
            "the truncated receive was not counted"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    match recv.wait(2, Duration::from_millis(50)) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => {
            return Err(CaseError::fail(format!(
                "the error counted as a success: {other:?}"
            )))
        }
    }
    ensure_eq!(
        (recv.read(), recv.read_err()),
        (1, 1),
        "success and error counts"
    );
    Ok(())
}

fn add_set_wait(_ctx: &Ctx) -> CaseResult {
    let c = Counter::new();
    c.add(3);
    c.add(4);
    ensure_eq!(c.read(), 7, "add");
    c.set(100);
    ensure_eq!(
        c.wait(100, Duration::from_millis(1)).ctx("wait")?,
        100,
        "set"
    );
    match c.wait(101, Duration::from_millis(30)) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => return Err(CaseError::fail(format!("wait past the value: {other:?}"))),
    }
    c.set_err(2);
    ensure_eq!(c.read_err(), 2, "set_err");
    let c2 = c.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        c2.add(1);
    });
    let v = c
        .wait(101, Duration::from_secs(5))
        .ctx("wait woken by another thread")?;
    t.join().map_err(|_| CaseError::fail("adder panicked"))?;
    ensure!(v >= 101, "woke at {v}");
    Ok(())
}
