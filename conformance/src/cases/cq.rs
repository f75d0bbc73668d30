//! cq: reads, timeouts, contexts, flags, error entries, async completions (fabtests
//! unit/cq_test).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fabric::{Access, AsyncCompletions, Caps, CompFlags, CqErrorKind, ErrorKind, Progress};

use super::{case, expect_cq_error, expect_flags};
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::pair::{PairConfig, Who};
use crate::{ensure, ensure_eq};

const G: &str = "cq";

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "empty_read", Caps::MSG, "reading an empty queue returns 0 / None", empty_read),
        case(G, "sread_timeout", Caps::MSG, "sread and wait on an empty queue return after about the timeout", sread_timeout),
        case(G, "contexts_preserved", Caps::MSG, "each completion carries its operation's context (0, u64::MAX, ...), with MSG|SEND / MSG|RECV", contexts_preserved),
        case(G, "read_batch", Caps::MSG, "read(max) returns at most max and loses nothing (auto progress)", read_batch),
        case(G, "error_detail", Caps::MSG, "an error completion has its kind, the context and a detail or provider errno", error_detail),
        case(G, "async_completion", Caps::MSG, "completions awaited under tokio on both sides", async_completion),
        case(G, "split_queues", Caps::MSG, "with separate transmit and receive queues each completion goes to its own queue", split_queues),
        case(G, "selective_completion", Caps::MSG | Caps::RMA, "selective completion: only COMPLETION-flagged operations and errors complete", selective_completion),
        case(G, "blocking_wait_wakes", Caps::MSG, "a thread asleep in cq.wait wakes when a message arrives from another thread", blocking_wait_wakes),
    ]
}

fn empty_read(ctx: &Ctx) -> CaseResult {
    let node = ctx.node(Caps::MSG)?;
    let mut v = Vec::new();
    ensure_eq!(
        node.cq.read(&mut v, 16).ctx("read")?,
        0,
        "read on an empty cq"
    );
    ensure!(v.is_empty(), "read appended {v:?}");
    ensure!(
        node.cq.try_next().ctx("try_next")?.is_none(),
        "try_next on an empty cq"
    );
    let p = ctx.pair(Caps::MSG)?;
    ensure_eq!(
        p.client.cq.read(&mut v, 16).ctx("read")?,
        0,
        "read on a connected, idle cq"
    );
    Ok(())
}

fn sread_timeout(ctx: &Ctx) -> CaseResult {
    let node = ctx.node(Caps::MSG)?;
    let mut v = Vec::new();
    let t = Instant::now();
    let n = node
        .cq
        .sread(&mut v, 4, Some(Duration::from_millis(100)))
        .ctx("sread")?;
    let took = t.elapsed();
    ensure_eq!(n, 0, "sread on an empty cq");
    ensure!(
        took >= Duration::from_millis(90) && took < Duration::from_secs(3),
        "sread(100 ms) returned after {took:?}"
    );
    let t = Instant::now();
    match node.cq.wait(Duration::from_millis(100)) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => {
            return Err(CaseError::fail(format!(
                "wait(100 ms) on an empty cq: {other:?}"
            )))
        }
    }
    let took = t.elapsed();
    ensure!(
        took >= Duration::from_millis(90) && took < Duration::from_secs(3),
        "wait(100 ms) returned after {took:?}"
    );
    let t = Instant::now();
    ensure_eq!(
        node.cq
            .sread(&mut v, 4, Some(Duration::ZERO))
            .ctx("sread(0)")?,
        0,
        "sread(0)"
    );
    ensure!(
        t.elapsed() < Duration::from_secs(1),
        "sread(0) took {:?}",
        t.elapsed()
    );
    Ok(())
}

fn contexts_preserved(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let contexts: Vec<u64> = vec![
        0,
        1,
        u64::MAX,
        0xdead_beef,
        1 << 63,
        42,
        0x0123_4567_89ab_cdef,
        7,
    ];
    let rx = p.server.alloc(64 * contexts.len(), Access::RECV)?;
    let tx = p.client.alloc(64 * contexts.len(), Access::SEND)?;
    for (i, &c) in contexts.iter().enumerate() {
        p.server.ep.recv(rx.iov(i * 64, 64), c).ctx("post recv")?;
    }
    for (i, &c) in contexts.iter().enumerate() {
        p.client
            .ep
            .send(tx.iov(i * 64, i + 1), c.rotate_left(7))
            .ctx("send")?;
    }
    let recvs = p.wait_ok_n(Who::Server, contexts.len())?;
    let sends = p.wait_ok_n(Who::Client, contexts.len())?;
    for (i, c) in recvs.iter().enumerate() {
        expect_flags(c, CompFlags::MSG | CompFlags::RECV, "recv completion")?;
        ensure_eq!(
            c.context,
            contexts[i],
            "context of receive {i} (receives complete in post order)"
        );
        ensure_eq!(c.len, i + 1, "length of receive {i}");
    }
    let want: BTreeSet<u64> = contexts.iter().map(|c| c.rotate_left(7)).collect();
    let got: BTreeSet<u64> = sends.iter().map(|c| c.context).collect();
    ensure_eq!(got, want, "send contexts");
    for c in &sends {
        expect_flags(c, CompFlags::MSG | CompFlags::SEND, "send completion")?;
        ensure!(
            !c.flags.contains(CompFlags::RECV),
            "send completion has RECV: {:?}",
            c.flags
        );
    }
    Ok(())
}

fn read_batch(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair_with(&PairConfig::new(Caps::MSG).progress(Progress::Auto))?;
    let n = 8;
    let rx = p.server.alloc(64 * n, Access::RECV)?;
    let tx = p.client.alloc(64 * n, Access::SEND)?;
    for i in 0..n {
        p.server
            .ep
            .recv(rx.iov(i * 64, 64), i as u64)
            .ctx("post recv")?;
    }
    for i in 0..n {
        p.client
            .ep
            .send(tx.iov(i * 64, 8), 100 + i as u64)
            .ctx("send")?;
    }
    // Read the client's completions without touching the server's queue.
    for _ in 0..n {
        p.client.wait_completion(&[], p.timeout)?;
    }
    let deadline = Instant::now() + p.timeout;
    let mut got = Vec::new();
    while got.len() < n {
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} receives completed",
            got.len()
        );
        let mut v = Vec::new();
        let k = p.server.cq.read(&mut v, 3).ctx("read(3)")?;
        ensure!(
            k <= 3 && v.len() == k,
            "read(3) returned {k} with {} entries",
            v.len()
        );
        got.extend(v);
        if k == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let ctxs: Vec<u64> = got.iter().map(|c| c.context).collect();
    ensure_eq!(ctxs, (0..n as u64).collect::<Vec<_>>(), "receive contexts");
    Ok(())
}

fn error_detail(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let rx = p.server.alloc(16, Access::RECV)?;
    let tx = p.client.alloc(100, Access::SEND)?;
    p.server.ep.recv(rx.full(), 0xfeed).ctx("post recv")?;
    p.client.ep.send(tx.full(), 1).ctx("send")?;
    let c = p.wait(Who::Server)?;
    expect_cq_error(
        &c,
        CqErrorKind::Truncated,
        "100 bytes into a 16-byte receive",
    )?;
    ensure_eq!(c.context, 0xfeed, "context of the error completion");
    let e = c.status.as_ref().err().ok_or("not an error")?;
    ensure!(
        !e.detail.is_empty() || e.prov_errno != 0,
        "error entry carries neither detail nor provider errno: {e:?}"
    );
    ensure!(!e.to_string().is_empty(), "error entry displays as nothing");
    Ok(())
}

fn async_completion(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let rx = p.server.alloc(4096, Access::RECV)?;
    let tx = p.client.alloc(4096, Access::SEND)?;
    tx.write_at(0, b"async").ctx("fill")?;
    p.server.ep.recv(rx.full(), 11).ctx("post recv")?;
    p.client.ep.send(tx.iov(0, 5), 22).ctx("send")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .ctx("tokio runtime")?;
    let t = p.timeout;
    let (server, client) = rt.block_on(async {
        let s = tokio::time::timeout(t, p.server.cq.next_completion());
        let c = tokio::time::timeout(t, p.client.cq.read_async(4));
        tokio::join!(s, c)
    });
    let server = server
        .map_err(|_| "server: no completion awaited in time")?
        .ctx("server")?;
    let client = client
        .map_err(|_| "client: no completion awaited in time")?
        .ctx("client")?;
    ensure!(server.is_ok(), "server completion failed: {server:?}");
    ensure_eq!((server.context, server.len), (11, 5), "server completion");
    ensure_eq!(rx.to_vec(0, 5)?, b"async".to_vec(), "payload");
    ensure_eq!(client.len(), 1, "client completions");
    ensure_eq!(client[0].context, 22, "client context");
    Ok(())
}

fn blocking_wait_wakes(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair_with(&PairConfig::new(Caps::MSG).progress(Progress::Auto))?;
    let rx = p.server.alloc(64, Access::RECV)?;
    let tx = p.client.alloc(64, Access::SEND)?;
    p.server.ep.recv(rx.full(), 5).ctx("post recv")?;
    let t = p.timeout;
    let cq = &p.server.node.cq;
    std::thread::scope(|s| {
        let waiter = s.spawn(move || cq.wait(t));
        std::thread::sleep(Duration::from_millis(100));
        p.client.ep.send(tx.iov(0, 9), 6).ctx("send")?;
        let c = waiter
            .join()
            .map_err(|_| CaseError::fail("waiting thread panicked"))?
            .ctx("server wait")?;
        ensure!(c.is_ok(), "{c:?}");
        ensure_eq!((c.context, c.len), (5, 9), "woken with the receive");
        Ok(())
    })
}

fn split_queues(ctx: &Ctx) -> CaseResult {
    let mut cfg = PairConfig::new(Caps::MSG).progress(Progress::Auto);
    cfg.split_cq = true;
    let p = ctx.pair_with(&cfg)?;
    let t = p.timeout;
    let (srx, crx) = match (&p.server.rx_cq, &p.client.rx_cq) {
        (Some(s), Some(c)) => (s, c),
        _ => return Err(CaseError::fail("pair has no receive queues")),
    };
    let sb = p.server.alloc(64, Access::SEND | Access::RECV)?;
    let cb = p.client.alloc(64, Access::SEND | Access::RECV)?;
    p.server.ep.recv(sb.full(), 1).ctx("server recv")?;
    p.client.ep.recv(cb.full(), 2).ctx("client recv")?;
    p.client.ep.send(cb.iov(0, 8), 3).ctx("client send")?;
    let c = srx.wait(t).ctx("server receive queue")?;
    ensure!(
        c.is_ok() && c.context == 1,
        "server receive queue got {c:?}"
    );
    let c = p.client.cq.wait(t).ctx("client transmit queue")?;
    ensure!(
        c.is_ok() && c.context == 3,
        "client transmit queue got {c:?}"
    );
    p.server.ep.send(sb.iov(0, 8), 4).ctx("server send")?;
    let c = crx.wait(t).ctx("client receive queue")?;
    ensure!(
        c.is_ok() && c.context == 2,
        "client receive queue got {c:?}"
    );
    let c = p.server.cq.wait(t).ctx("server transmit queue")?;
    ensure!(
        c.is_ok() && c.context == 4,
        "server transmit queue got {c:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    for (name, q) in [
        ("server tx", &p.server.cq),
        ("server rx", srx),
        ("client tx", &p.client.cq),
        ("client rx", crx),
    ] {
        ensure!(
            q.try_next().ctx(name)?.is_none(),
            "{name} queue has an extra completion"
        );
    }
    Ok(())
}

fn selective_completion(ctx: &Ctx) -> CaseResult {
    use fabric::{Msg, OpFlags, RmaMsg};
    let mut cfg = PairConfig::new(Caps::MSG | Caps::RMA).progress(Progress::Auto);
    cfg.selective = true;
    let p = ctx.pair_with(&cfg)?;
    let t = p.timeout;
    let rx = p.server.alloc(256, Access::RECV)?;
    let tx = p.client.alloc(256, Access::SEND | Access::WRITE)?;
    for i in 0..3 {
        p.server
            .ep
            .recv(rx.iov(i * 64, 64), 10 + i as u64)
            .ctx("post recv")?;
    }
    let iov = [tx.iov(0, 8)];
    let msg = |context| Msg {
        iov: &iov,
        context,
        data: 0,
    };
    p.client
        .ep
        .sendmsg(&msg(1), OpFlags::empty())
        .ctx("sendmsg without COMPLETION")?;
    p.client
        .ep
        .sendmsg(&msg(2), OpFlags::COMPLETION)
        .ctx("sendmsg with COMPLETION")?;
    for i in 0..2u64 {
        let r = p.server.cq.wait(t).ctx("server")?;
        ensure!(r.is_ok() && r.context == 10 + i, "receive {i}: {r:?}");
    }
    let c = p.client.cq.wait(t).ctx("client")?;
    ensure_eq!(
        c.context,
        2,
        "the only send completion is the COMPLETION-flagged one"
    );
    // Errors complete whatever the flags.
    let t_mr = p.server.alloc(64, Access::REMOTE)?;
    let mut bad = t_mr.remote().iov(0, 8);
    bad.key ^= 0x5A5A;
    let rm = RmaMsg {
        iov: &iov,
        rma_iov: &[bad],
        context: 3,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&rm, OpFlags::empty())
        .ctx("writemsg without COMPLETION")?;
    let c = p.client.cq.wait(t).ctx("client error completion")?;
    ensure!(
        c.context == 3 && c.status.is_err(),
        "expected an error completion for context 3, got {c:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    ensure!(
        p.client.cq.try_next().ctx("client")?.is_none(),
        "extra client completion"
    );
    Ok(())
}
