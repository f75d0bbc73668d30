//! semantics: the rules every provider keeps so an application written against one
//! behaves the same on another, as RC queue pairs behave: a refused remote access
//! ends the connection at both ends; posts to an ended connection fail at the call;
//! every end raises exactly one Shutdown event with its reason; a write with remote CQ
//! data completes at the initiator only once it consumed a receive at the target; and
//! a target that does not read its queues for a while does not break the connection.

use std::time::{Duration, Instant};

use fabric::{Access, Caps, Completion, CqErrorKind, ErrorKind, Event, RemoteIov, ShutdownReason};

use super::{case, expect_cq_error, is_flushed, wrong_key};
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::pair::{Pair, Side, Who};
use crate::payload::{all_bytes, pattern, same};
use crate::{ensure, ensure_eq};

const G: &str = "semantics";
const RMA: Caps = Caps::MSG.union(Caps::RMA);
const TARGET: usize = 8192;
const TARGET_FILL: u8 = 0xA5;

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "access_error_ends_connection", RMA, "a refused remote access ends the connection at both ends: RemoteAccess for it, Canceled for what was posted after (a write, a read, a send: none completes successfully, the send is never received), Shutdown AccessError on both, later posts fail at the call with NotConnected, target memory untouched", access_error_ends_connection),
        case(G, "post_after_peer_close", RMA, "after the peer shut down (Shutdown Peer read), every post form fails at the call with NotConnected; on the side that called shutdown with Shutdown", post_after_peer_close),
        case(G, "shutdown_reasons", Caps::MSG, "each end raises exactly one Shutdown: Local where shutdown was called, Peer at the other end (also when the peer closes its endpoint)", shutdown_reasons),
        case(G, "writedata_waits_for_receive", RMA | Caps::REMOTE_CQ_DATA, "a write with CQ data completes at the initiator only after it consumed a receive at the target (posted 200 ms later)", writedata_waits_for_receive),
        case(G, "quiet_server_keeps_connection", RMA, "a server that does not read its queues for 2 s does not break its client's connection: the operations complete then, no Shutdown", quiet_server_keeps_connection),
    ]
}

/// The next event of `who` must be its Shutdown with `reason`.
pub(crate) fn expect_shutdown(p: &Pair, who: Who, reason: ShutdownReason) -> CaseResult {
    let fid = p.side(who).ep.fid();
    match p.wait_event(who)? {
        Event::Shutdown { fid: f, reason: r } if f == fid => {
            ensure_eq!(r, reason, "{who:?}: reason of the Shutdown event");
            Ok(())
        }
        other => Err(CaseError::fail(format!(
            "{who:?}: expected Shutdown {{ reason: {reason:?} }}, got {other:?}"
        ))),
    }
}

/// Neither side gets another event within `dur` (a second Shutdown, an Error...).
fn expect_no_more_events(p: &Pair, dur: Duration) -> CaseResult {
    p.drive_for(dur)?;
    for who in [Who::Client, Who::Server] {
        if let Some(ev) = p.side(who).take_event() {
            return Err(CaseError::fail(format!(
                "{who:?}: unexpected event after its Shutdown: {ev:?}"
            )));
        }
    }
    Ok(())
}

/// Every post form on `side` fails at the call with `kind` (RMA forms against
/// `remote` when given) and no completion follows.
pub(crate) fn posts_fail(
    side: &Side,
    remote: Option<RemoteIov>,
    kind: ErrorKind,
    who: &str,
) -> CaseResult {
    let buf = side.alloc(64, Access::LOCAL)?;
    let mut tries: Vec<(&str, fabric::Result<()>)> = vec![
        ("send", side.ep.send(buf.iov(0, 8), 0x51)),
        ("recv", side.ep.recv(buf.iov(0, 8), 0x52)),
        ("inject", side.ep.inject(&[1, 2, 3])),
    ];
    if let Some(r) = remote {
        let r8 = RemoteIov { len: 8, ..r };
        tries.push(("write", side.ep.write(buf.iov(0, 8), r8, 0x53)));
        tries.push(("read", side.ep.read(buf.iov(0, 8), r8, 0x54)));
        tries.push(("inject_write", side.ep.inject_write(&[0; 8], r8)));
        if side.ep.info().caps.contains(Caps::REMOTE_CQ_DATA) {
            tries.push(("writedata", side.ep.writedata(buf.iov(0, 8), r8, 9, 0x55)));
        }
    }
    for (what, r) in tries {
        match r {
            Err(e) if e.kind() == kind => {}
            Err(e) => {
                return Err(CaseError::fail(format!(
                    "{who}: {what} refused with {:?} ({e}); expected {kind:?}",
                    e.kind()
                )))
            }
            Ok(()) => {
                return Err(CaseError::fail(format!(
                "{who}: {what} was accepted on an ended connection; expected {kind:?} at the call"
            )))
            }
        }
    }
    side.drive()?;
    if let Some(c) = side.take_completion() {
        return Err(CaseError::fail(format!(
            "{who}: a completion after refused posts: {c:?}"
        )));
    }
    Ok(())
}

/// After the initiator's error completion for a refused access: both ends get Shutdown
/// AccessError (and nothing more), and later posts fail at the call on both ends.
pub(crate) fn expect_access_error_shutdown(p: &Pair, remote: RemoteIov) -> CaseResult {
    expect_shutdown(p, Who::Client, ShutdownReason::AccessError)?;
    expect_shutdown(p, Who::Server, ShutdownReason::AccessError)?;
    posts_fail(
        &p.client,
        Some(remote),
        ErrorKind::NotConnected,
        "initiator",
    )?;
    posts_fail(&p.server, None, ErrorKind::NotConnected, "target")?;
    expect_no_more_events(p, Duration::from_millis(100))
}

fn is_canceled(c: &Completion) -> bool {
    matches!(&c.status, Err(e) if e.kind == CqErrorKind::Canceled)
}

fn access_error_ends_connection(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = p.server.alloc(TARGET, Access::REMOTE)?;
    t.fill(0, TARGET, TARGET_FILL).ctx("fill target")?;
    let srx = p.server.alloc(64, Access::RECV)?;
    p.server.ep.recv(srx.full(), 50).ctx("server recv")?;
    let l = p.client.alloc(TARGET, Access::LOCAL)?;
    l.write_at(0, &pattern(3, TARGET)).ctx("fill local")?;
    p.client.ep.recv(l.iov(4096, 64), 40).ctx("client recv")?;
    let r = t.remote();
    p.client
        .ep
        .write(l.iov(0, 64), wrong_key(&r), 1)
        .ctx("write with a wrong key")?;
    // Posted after the refused write, into a valid range: must never land.
    p.client
        .ep
        .write(l.iov(0, 1024), r.iov(0, 1024), 2)
        .ctx("write after it")?;
    p.client
        .ep
        .read(l.iov(2048, 512), r.iov(0, 512), 3)
        .ctx("read after it")?;
    // A send after it: the target must not receive it, and (even where sends
    // complete once handed to the transport) it must not complete successfully.
    p.client.ep.send(l.iov(1024, 32), 4).ctx("send after it")?;
    let mut done: Vec<Completion> = Vec::new();
    while done.len() < 5 {
        done.push(
            p.wait(Who::Client)
                .map_err(|e| e.context(format!("{} of 5 initiator completions", done.len())))?,
        );
    }
    let mut ctxs: Vec<u64> = done.iter().map(|c| c.context).collect();
    ctxs.sort_unstable();
    ensure_eq!(
        ctxs,
        vec![1, 2, 3, 4, 40],
        "initiator completions, once each"
    );
    for c in &done {
        match c.context {
            1 => expect_cq_error(c, CqErrorKind::RemoteAccess, "the refused write")?,
            2..=4 => ensure!(
                is_canceled(c),
                "operation {} posted after the refused write: expected Canceled, got {c:?}",
                c.context
            ),
            _ => ensure!(
                is_flushed(c),
                "the initiator's posted receive: expected Canceled, got {c:?}"
            ),
        }
    }
    let c = p.wait(Who::Server).ctx("the target's posted receive")?;
    ensure!(
        c.context == 50 && is_flushed(&c),
        "the target's posted receive: expected Canceled, got {c:?}"
    );
    expect_access_error_shutdown(&p, r.iov(0, 8))?;
    all_bytes("target memory", &t.to_vec(0, TARGET)?, TARGET_FILL)?;
    Ok(())
}

fn post_after_peer_close(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = p.server.alloc(4096, Access::REMOTE)?;
    let ct = p.client.alloc(4096, Access::REMOTE)?;
    p.server.ep.shutdown().ctx("server shutdown")?;
    expect_shutdown(&p, Who::Server, ShutdownReason::Local)?;
    expect_shutdown(&p, Who::Client, ShutdownReason::Peer)?;
    posts_fail(
        &p.client,
        Some(t.remote().iov(0, 8)),
        ErrorKind::NotConnected,
        "client after the peer's shutdown",
    )?;
    posts_fail(
        &p.server,
        Some(ct.remote().iov(0, 8)),
        ErrorKind::Shutdown,
        "server after its own shutdown",
    )?;
    Ok(())
}

fn shutdown_reasons(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    p.client.ep.shutdown().ctx("client shutdown")?;
    expect_shutdown(&p, Who::Client, ShutdownReason::Local)?;
    expect_shutdown(&p, Who::Server, ShutdownReason::Peer)?;
    expect_no_more_events(&p, Duration::from_millis(200))?;

    // The peer closes its endpoint without calling shutdown.
    let p = ctx.pair(Caps::MSG)?;
    let Pair { server, client, .. } = p;
    let Side {
        node: server_node,
        ep: server_ep,
        ..
    } = server;
    let fid = client.ep.fid();
    drop(server_ep);
    match client
        .wait_event(&[&server_node], ctx.timeout())
        .map_err(|e| e.context("client after the peer closed its endpoint"))?
    {
        Event::Shutdown { fid: f, reason } if f == fid => {
            ensure_eq!(reason, ShutdownReason::Peer, "reason after the peer closed");
        }
        other => {
            return Err(CaseError::fail(format!(
                "client: expected Shutdown Peer, got {other:?}"
            )))
        }
    }
    client.drive_for(&[&server_node], Duration::from_millis(200))?;
    if let Some(ev) = client.take_event() {
        return Err(CaseError::fail(format!(
            "client: a second event after its Shutdown: {ev:?}"
        )));
    }
    Ok(())
}

fn writedata_waits_for_receive(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA | Caps::REMOTE_CQ_DATA)?;
    let t = p.server.alloc(4096, Access::REMOTE)?;
    let rx = p.server.alloc(64, Access::RECV)?;
    let tx = p.client.alloc(1000, Access::WRITE)?;
    let data = pattern(77, 1000);
    tx.write_at(0, &data).ctx("fill")?;
    p.client
        .ep
        .writedata(tx.full(), t.remote().iov(100, 1000), 0xD00D, 1)
        .ctx("writedata")?;
    let posted_at = Instant::now();
    // 200 ms of progress on both sides with no receive at the target.
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(200),
        "initiator of a write with CQ data before the target posted a receive",
    )?;
    if let Some(c) = p.server.take_completion() {
        return Err(CaseError::fail(format!(
            "target: a completion with no receive posted: {c:?}"
        )));
    }
    p.server.ep.recv(rx.full(), 2).ctx("target recv")?;
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!(c.context, 1, "initiator completion context");
    ensure!(
        posted_at.elapsed() >= Duration::from_millis(200),
        "the initiator completed before the target's receive"
    );
    let c = p.wait_ok(Who::Server)?;
    ensure_eq!(c.context, 2, "target completion context");
    ensure_eq!(c.data, 0xD00D, "CQ data");
    same("written data", &data, &t.to_vec(100, 1000)?)?;
    Ok(())
}

fn quiet_server_keeps_connection(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(RMA)?;
    let t = p.server.alloc(64 << 10, Access::REMOTE)?;
    let rx = p.server.alloc(4096, Access::RECV | Access::SEND)?;
    let tx = p.client.alloc(64 << 10, Access::LOCAL)?;
    let data = pattern(5, 64 << 10);
    tx.write_at(0, &data).ctx("fill")?;
    let back = p.client.alloc(64, Access::RECV)?;
    p.server.ep.recv(rx.full(), 10).ctx("server recv")?;
    p.client.ep.recv(back.full(), 20).ctx("client recv")?;
    p.client.ep.send(tx.iov(0, 4096), 1).ctx("send")?;
    p.client
        .ep
        .write(tx.full(), t.remote().full(), 2)
        .ctx("write")?;
    // The server's application reads nothing for 2 s; the client keeps polling.
    let quiet = Instant::now();
    let mut early = Vec::new();
    while quiet.elapsed() < Duration::from_secs(2) {
        p.client.drive()?;
        if let Some(ev) = p.client.take_event() {
            return Err(CaseError::fail(format!(
                "client: event while the server was quiet: {ev:?}"
            )));
        }
        while let Some(c) = p.client.take_completion() {
            ensure!(
                c.is_ok(),
                "client: error completion while the server was quiet: {c:?}"
            );
            early.push(c);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut got: Vec<u64> = early.iter().map(|c| c.context).collect();
    while got.len() < 2 {
        got.push(p.wait_ok(Who::Client)?.context);
    }
    got.sort_unstable();
    ensure_eq!(got, vec![1, 2], "client completions");
    let c = p.wait_ok(Who::Server)?;
    ensure_eq!(c.context, 10, "server receive");
    same("received message", &data[..4096], &rx.to_vec(0, 4096)?)?;
    same("written data", &data, &t.to_vec(0, 64 << 10)?)?;
    // The connection still carries traffic both ways.
    p.server.ep.send(rx.iov(0, 64), 11).ctx("server send")?;
    let c = p.wait_ok(Who::Client)?;
    ensure_eq!(c.context, 20, "client receive of the answer");
    p.wait_ok(Who::Server)?;
    for who in [Who::Client, Who::Server] {
        if let Some(ev) = p.side(who).take_event() {
            return Err(CaseError::fail(format!("{who:?}: unexpected event {ev:?}")));
        }
    }
    Ok(())
}
