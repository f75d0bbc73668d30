//! msg: send/recv at many sizes, ordering, many operations in flight, inject, remote CQ
//! data, iovecs, unexpected messages, truncation, progress models (fabtests functional
//! msg, inject, cq_data, unexpected_msg, flood).

use std::time::{Duration, Instant};

use fabric::{Access, Caps, CompFlags, CqErrorKind, ErrorKind, Event, Progress};

use super::{case, expect_cq_error, expect_flags, limits, require_iovs};
use crate::case::{expect_err, Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::pair::{Pair, PairConfig, Who};
use crate::payload::{all_bytes, pattern, same};
use crate::{ensure, ensure_eq};

const G: &str = "msg";

/// Largest message the suite sends, whatever the provider allows.
pub const MAX_TESTED_MSG: usize = 64 << 20;

macro_rules! size_cases {
    ($($f:ident = $size:expr),* $(,)?) => {
        $(fn $f(ctx: &Ctx) -> CaseResult { sendrecv_size(ctx, $size) })*
    };
}

size_cases!(
    size_0 = 0,
    size_1 = 1,
    size_63 = 63,
    size_64 = 64,
    size_4095 = 4095,
    size_4096 = 4096,
    size_65536 = 65536,
    size_1m = 1 << 20,
    size_max = usize::MAX
);

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    let m = Caps::MSG;
    vec![
        case(G, "size_0", m, "a 0-byte message", size_0),
        case(G, "size_1", m, "a 1-byte message", size_1),
        case(G, "size_63", m, "a 63-byte message", size_63),
        case(G, "size_64", m, "a 64-byte message", size_64),
        case(G, "size_4095", m, "a 4095-byte message", size_4095),
        case(G, "size_4096", m, "a 4096-byte message", size_4096),
        case(G, "size_65536", m, "a 64 KiB message", size_65536),
        case(G, "size_1m", m, "a 1 MiB message", size_1m),
        case(
            G,
            "size_max",
            m,
            "a message of max_msg_size (at most 64 MiB)",
            size_max,
        ),
        case(
            G,
            "ordering_1000",
            m,
            "1,000 messages arrive in order, receives complete in post order",
            ordering_1000,
        ),
        case(
            G,
            "many_in_flight",
            m,
            "512 sends (or tx_size) in flight at once all complete",
            many_in_flight,
        ),
        case(
            G,
            "bidirectional",
            m,
            "both sides send 16 x 64 KiB at the same time",
            bidirectional,
        ),
        case(
            G,
            "inject",
            m,
            "inject delivers the message and gives no sender completion",
            inject,
        ),
        case(
            G,
            "inject_too_large",
            m,
            "inject of inject_size + 1 bytes is refused and sends nothing",
            inject_too_large,
        ),
        case(
            G,
            "senddata",
            m | Caps::REMOTE_CQ_DATA,
            "send with data gives MSG|RECV|REMOTE_CQ_DATA and the data",
            senddata,
        ),
        case(
            G,
            "injectdata",
            m | Caps::REMOTE_CQ_DATA,
            "inject with data delivers message and data",
            injectdata,
        ),
        case(
            G,
            "sendv_gather",
            m,
            "a send gathers three iovecs from two regions",
            sendv_gather,
        ),
        case(
            G,
            "recvv_scatter",
            m,
            "a receive scatters over three iovecs; bytes past the message untouched",
            recvv_scatter,
        ),
        case(
            G,
            "unexpected",
            m,
            "messages sent before any receive is posted are kept, in order",
            unexpected,
        ),
        case(
            G,
            "truncation",
            m,
            "a message larger than the receive gives error completion Truncated",
            truncation,
        ),
        case(
            G,
            "after_truncation",
            m,
            "after a truncated receive the next message arrives intact (where the provider states truncation_ends_connection: Shutdown at both ends, later posts fail at the call)",
            after_truncation,
        ),
        case(
            G,
            "zero_length_no_iov",
            m,
            "a send with no iovec at all arrives as a 0-byte message",
            zero_length_no_iov,
        ),
        case(G, "completion_levels", m, "sendmsg with INJECT_COMPLETE, TRANSMIT_COMPLETE, DELIVERY_COMPLETE completes; INJECT gives none; COMMIT refused", completion_levels),
        case(
            G,
            "manual_progress_threads",
            m,
            "manual progress, a thread per side, 200 ping-pongs with blocking waits",
            manual_progress_threads,
        ),
        case(
            G,
            "auto_progress",
            m,
            "auto progress moves 4 MiB while the sender never reads its queues",
            auto_progress,
        ),
    ]
}

fn sendrecv_size(ctx: &Ctx, want: usize) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let max = limits(&p).max_msg_size;
    let size = if want == usize::MAX {
        max.min(MAX_TESTED_MSG)
    } else {
        want
    };
    if size > max {
        return Err(CaseError::skip(format!(
            "{size} bytes exceed max_msg_size {max}"
        )));
    }
    let slack = 64;
    let rx = p.server.alloc(size + slack, Access::RECV)?;
    rx.fill(0, size + slack, 0xEE).ctx("fill")?;
    let tx = p.client.alloc(size.max(1), Access::SEND)?;
    let data = pattern(size as u64, size);
    tx.write_at(0, &data).ctx("fill")?;
    // The receive may not exceed max_msg_size itself (at max_msg_size, the slack past
    // the message is outside the posted buffer and must stay untouched all the same).
    let posted = (size + slack).min(max);
    p.server
        .ep
        .recv(rx.iov(0, posted), 0x5E5E)
        .ctx("post recv")?;
    p.client.ep.send(tx.iov(0, size), 0xC1C1).ctx("send")?;
    let r = p.wait_ok(Who::Server)?;
    expect_flags(&r, CompFlags::MSG | CompFlags::RECV, "receive")?;
    ensure_eq!(
        (r.context, r.len),
        (0x5E5E, size),
        "receive context and length"
    );
    same("received payload", &data, &rx.to_vec(0, size)?)?;
    all_bytes(
        "receive buffer past the message",
        &rx.to_vec(size, slack)?,
        0xEE,
    )?;
    let s = p.wait_ok(Who::Client)?;
    expect_flags(&s, CompFlags::MSG | CompFlags::SEND, "send")?;
    ensure_eq!(s.context, 0xC1C1, "send context");
    Ok(())
}

fn ordering_1000(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let l = limits(&p);
    let n = 1000usize;
    let rwin = l.rx_size.clamp(1, n);
    let twin = l.tx_size.clamp(1, n);
    let rx = p.server.alloc(rwin * 8, Access::RECV)?;
    let tx = p.client.alloc(n * 8, Access::SEND)?;
    for i in 0..n {
        tx.write_at(i * 8, &(i as u64).to_le_bytes()).ctx("fill")?;
    }
    for i in 0..rwin {
        p.server
            .ep
            .recv(rx.iov(i * 8, 8), i as u64)
            .ctx("post recv")?;
    }
    let (mut sent, mut sent_done, mut recvd) = (0usize, 0usize, 0usize);
    let deadline = Instant::now() + p.timeout * 3;
    while recvd < n || sent_done < n {
        ensure!(
            Instant::now() < deadline,
            "stalled: sent {sent}, send completions {sent_done}, received {recvd}"
        );
        while sent < n && sent - sent_done < twin {
            match p.client.ep.send(tx.iov(sent * 8, 8), sent as u64) {
                Ok(()) => sent += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(CaseError::fail(format!("send {sent}: {e}"))),
            }
        }
        p.drive_for(Duration::from_micros(200))?;
        while let Some(c) = p.client.take_completion() {
            ensure!(c.is_ok(), "send completion {c:?}");
            sent_done += 1;
        }
        while let Some(c) = p.server.take_completion() {
            ensure!(c.is_ok(), "receive {recvd}: {c:?}");
            ensure_eq!(c.context, recvd as u64, "receives complete in post order");
            let slot = recvd % rwin;
            let got = u64::from_le_bytes(rx.to_vec(slot * 8, 8)?.try_into().expect("8 bytes"));
            ensure_eq!(
                got,
                recvd as u64,
                "message {recvd} (messages arrive in send order)"
            );
            let next = recvd + rwin;
            if next < n {
                p.server
                    .ep
                    .recv(rx.iov(slot * 8, 8), next as u64)
                    .ctx("repost recv")?;
            }
            recvd += 1;
        }
    }
    Ok(())
}

fn many_in_flight(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let l = limits(&p);
    let n = 512usize.min(l.tx_size).min(l.rx_size);
    let rx = p.server.alloc(n * 64, Access::RECV)?;
    let tx = p.client.alloc(n * 64, Access::SEND)?;
    for i in 0..n {
        tx.write_at(i * 64, &pattern(i as u64, 64)).ctx("fill")?;
        p.server
            .ep
            .recv(rx.iov(i * 64, 64), i as u64)
            .ctx(format!("post recv {i}"))?;
    }
    for i in 0..n {
        p.client
            .ep
            .send(tx.iov(i * 64, 64), i as u64)
            .ctx(format!("send {i} of {n} without reaping"))?;
    }
    let sends = p.wait_ok_n(Who::Client, n)?;
    let recvs = p.wait_ok_n(Who::Server, n)?;
    let mut sc: Vec<u64> = sends.iter().map(|c| c.context).collect();
    sc.sort_unstable();
    ensure_eq!(sc, (0..n as u64).collect::<Vec<_>>(), "send contexts");
    for (i, c) in recvs.iter().enumerate() {
        ensure_eq!(c.context, i as u64, "receive order");
    }
    same(
        "all payloads",
        &(0..n)
            .flat_map(|i| pattern(i as u64, 64))
            .collect::<Vec<_>>(),
        &rx.to_vec(0, n * 64)?,
    )?;
    Ok(())
}

fn bidirectional(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let (n, len) = (16usize, 65536usize);
    if len > limits(&p).max_msg_size {
        return Err(CaseError::skip("max_msg_size below 64 KiB"));
    }
    let mut bufs = Vec::new();
    for (who, seed) in [(Who::Server, 1u64), (Who::Client, 2)] {
        let s = p.side(who);
        let rx = s.alloc(n * len, Access::RECV)?;
        let tx = s.alloc(n * len, Access::SEND)?;
        tx.write_at(0, &pattern(seed, n * len)).ctx("fill")?;
        for i in 0..n {
            s.ep.recv(rx.iov(i * len, len), i as u64).ctx("post recv")?;
        }
        bufs.push((rx, tx));
    }
    for i in 0..n {
        p.server
            .ep
            .send(bufs[0].1.iov(i * len, len), 100 + i as u64)
            .ctx("server send")?;
        p.client
            .ep
            .send(bufs[1].1.iov(i * len, len), 100 + i as u64)
            .ctx("client send")?;
    }
    p.wait_ok_n(Who::Server, 2 * n)?;
    p.wait_ok_n(Who::Client, 2 * n)?;
    same(
        "client received",
        &pattern(1, n * len),
        &bufs[1].0.to_vec(0, n * len)?,
    )?;
    same(
        "server received",
        &pattern(2, n * len),
        &bufs[0].0.to_vec(0, n * len)?,
    )?;
    Ok(())
}

fn inject(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let size = limits(&p).inject_size;
    if size == 0 {
        return Err(CaseError::skip("inject_size is 0"));
    }
    let rx = p.server.alloc(size, Access::RECV)?;
    p.server.ep.recv(rx.full(), 9).ctx("post recv")?;
    let mut data = pattern(3, size);
    p.client.ep.inject(&data).ctx("inject")?;
    data_overwritten(&mut data);
    let r = p.wait_ok(Who::Server)?;
    ensure_eq!((r.context, r.len), (9, size), "receive");
    same(
        "injected payload (buffer was reused right after inject)",
        &pattern(3, size),
        &rx.to_vec(0, size)?,
    )?;
    p.expect_no_completion(Who::Client, Duration::from_millis(100), "inject")?;
    Ok(())
}

/// Reuses a buffer right after it was injected, as applications may.
fn data_overwritten(buf: &mut [u8]) {
    buf.iter_mut().for_each(|b| *b = !*b);
}

fn inject_too_large(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let size = limits(&p).inject_size;
    let rx = p.server.alloc(size + 64, Access::RECV)?;
    p.server.ep.recv(rx.full(), 1).ctx("post recv")?;
    expect_err(
        p.client.ep.inject(&vec![1u8; size + 1]),
        ErrorKind::InvalidArgument,
        "inject of inject_size + 1",
    )?;
    p.expect_no_completion(
        Who::Server,
        Duration::from_millis(200),
        "server after refused inject",
    )?;
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(1),
        "client after refused inject",
    )?;
    Ok(())
}

fn cq_data_value(p: &Pair) -> u64 {
    let bits = limits(p).cq_data_size * 8;
    let v = 0x8765_4321_0fed_cba9u64;
    if bits >= 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    }
}

fn senddata(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG | Caps::REMOTE_CQ_DATA)?;
    let data = cq_data_value(&p);
    let rx = p.server.alloc(64, Access::RECV)?;
    let tx = p.client.alloc(64, Access::SEND)?;
    tx.write_at(0, b"with data").ctx("fill")?;
    p.server.ep.recv(rx.full(), 3).ctx("post recv")?;
    p.client
        .ep
        .senddata(tx.iov(0, 9), data, 4)
        .ctx("senddata")?;
    let r = p.wait_ok(Who::Server)?;
    expect_flags(
        &r,
        CompFlags::MSG | CompFlags::RECV | CompFlags::REMOTE_CQ_DATA,
        "receive",
    )?;
    ensure_eq!(r.data, data, "remote CQ data");
    ensure_eq!((r.context, r.len), (3, 9), "receive");
    ensure_eq!(rx.to_vec(0, 9)?, b"with data".to_vec(), "payload");
    let s = p.wait_ok(Who::Client)?;
    ensure_eq!(s.context, 4, "send context");
    // A plain send afterwards must not claim CQ data.
    p.server.ep.recv(rx.full(), 5).ctx("post recv")?;
    p.client.ep.send(tx.iov(0, 1), 6).ctx("send")?;
    let r = p.wait_ok(Who::Server)?;
    ensure!(
        !r.flags.contains(CompFlags::REMOTE_CQ_DATA),
        "plain send delivered with REMOTE_CQ_DATA: {r:?}"
    );
    Ok(())
}

fn injectdata(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG | Caps::REMOTE_CQ_DATA)?;
    let size = limits(&p).inject_size.min(16);
    let data = cq_data_value(&p);
    let rx = p.server.alloc(64, Access::RECV)?;
    p.server.ep.recv(rx.full(), 8).ctx("post recv")?;
    p.client
        .ep
        .injectdata(&pattern(4, size), data)
        .ctx("injectdata")?;
    let r = p.wait_ok(Who::Server)?;
    expect_flags(
        &r,
        CompFlags::MSG | CompFlags::RECV | CompFlags::REMOTE_CQ_DATA,
        "receive",
    )?;
    ensure_eq!((r.data, r.len), (data, size), "data and length");
    same("payload", &pattern(4, size), &rx.to_vec(0, size)?)?;
    p.expect_no_completion(Who::Client, Duration::from_millis(50), "injectdata")?;
    Ok(())
}

fn sendv_gather(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    require_iovs(&p, 3, 0)?;
    let a = p.client.alloc(100, Access::SEND)?;
    let b = p.client.alloc(50, Access::SEND)?;
    a.write_at(0, &pattern(10, 100)).ctx("fill")?;
    b.write_at(0, &pattern(11, 50)).ctx("fill")?;
    let rx = p.server.alloc(256, Access::RECV)?;
    p.server.ep.recv(rx.full(), 1).ctx("post recv")?;
    p.client
        .ep
        .sendv(&[a.iov(10, 30), b.iov(0, 50), a.iov(90, 10)], 2)
        .ctx("sendv")?;
    let r = p.wait_ok(Who::Server)?;
    ensure_eq!(r.len, 90, "received length");
    let mut want = pattern(10, 100)[10..40].to_vec();
    want.extend_from_slice(&pattern(11, 50));
    want.extend_from_slice(&pattern(10, 100)[90..100]);
    same("gathered message", &want, &rx.to_vec(0, 90)?)?;
    p.wait_ok(Who::Client)?;
    Ok(())
}

fn recvv_scatter(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    require_iovs(&p, 3, 0)?;
    let r1 = p.server.alloc(16, Access::RECV)?;
    let r2 = p.server.alloc(64, Access::RECV)?;
    let r3 = p.server.alloc(100, Access::RECV)?;
    for r in [&r1, &r2, &r3] {
        r.fill(0, r.len(), 0xEE).ctx("fill")?;
    }
    let tx = p.client.alloc(100, Access::SEND)?;
    let msg = pattern(12, 100);
    tx.write_at(0, &msg).ctx("fill")?;
    p.server
        .ep
        .recvv(&[r1.iov(0, 16), r2.iov(5, 40), r3.iov(0, 100)], 7)
        .ctx("recvv")?;
    p.client.ep.send(tx.full(), 8).ctx("send")?;
    let r = p.wait_ok(Who::Server)?;
    ensure_eq!((r.context, r.len), (7, 100), "receive");
    same("iov 0", &msg[..16], &r1.to_vec(0, 16)?)?;
    all_bytes("region 2 before iov 1", &r2.to_vec(0, 5)?, 0xEE)?;
    same("iov 1", &msg[16..56], &r2.to_vec(5, 40)?)?;
    all_bytes("region 2 after iov 1", &r2.to_vec(45, 19)?, 0xEE)?;
    same("iov 2", &msg[56..], &r3.to_vec(0, 44)?)?;
    all_bytes("iov 2 past the message", &r3.to_vec(44, 56)?, 0xEE)?;
    Ok(())
}

fn unexpected(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let max = limits(&p).max_msg_size;
    let sizes: Vec<usize> = [1usize, 64, 1000, 4096, 100_000, 0, 17, 65536]
        .into_iter()
        .filter(|&s| s <= max)
        .collect();
    let total: usize = sizes.iter().sum();
    let tx = p.client.alloc(total.max(1), Access::SEND)?;
    let mut off = 0;
    for (i, &s) in sizes.iter().enumerate() {
        tx.write_at(off, &pattern(i as u64, s)).ctx("fill")?;
        p.client
            .ep
            .send(tx.iov(off, s), i as u64)
            .ctx(format!("send {i}"))?;
        off += s;
    }
    // Let the messages arrive before any receive exists.
    p.drive_for(Duration::from_millis(200))?;
    ensure!(
        p.server.take_completion().is_none(),
        "a completion at the server before any receive"
    );
    let rx = p.server.alloc(sizes.len() * 100_000, Access::RECV)?;
    for i in 0..sizes.len() {
        p.server
            .ep
            .recv(rx.iov(i * 100_000, 100_000), i as u64)
            .ctx("post recv")?;
    }
    for (i, &s) in sizes.iter().enumerate() {
        let r = p.wait_ok(Who::Server)?;
        ensure_eq!((r.context, r.len), (i as u64, s), "receive {i}");
        same(
            &format!("message {i}"),
            &pattern(i as u64, s),
            &rx.to_vec(i * 100_000, s)?,
        )?;
    }
    p.wait_ok_n(Who::Client, sizes.len())?;
    Ok(())
}

fn truncate_once(p: &Pair) -> CaseResult {
    let rx = p.server.alloc(64, Access::RECV)?;
    let tx = p.client.alloc(100, Access::SEND)?;
    tx.write_at(0, &pattern(5, 100)).ctx("fill")?;
    p.server.ep.recv(rx.full(), 0x77).ctx("post recv")?;
    p.client.ep.send(tx.full(), 0x78).ctx("send")?;
    let r = p.wait(Who::Server)?;
    expect_cq_error(
        &r,
        CqErrorKind::Truncated,
        "100 bytes into a 64-byte receive",
    )?;
    ensure_eq!(r.context, 0x77, "context of the truncated receive");
    let s = p.wait(Who::Client)?;
    ensure_eq!(s.context, 0x78, "sender's completion context");
    Ok(())
}

fn truncation(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    truncate_once(&p)
}

fn after_truncation(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    if limits(&p).truncation_ends_connection {
        return truncation_ended_connection(&p);
    }
    truncate_once(&p)?;
    let rx = p.server.alloc(64, Access::RECV)?;
    let tx = p.client.alloc(64, Access::SEND)?;
    tx.write_at(0, &pattern(6, 64)).ctx("fill")?;
    p.server.ep.recv(rx.full(), 1).ctx("post recv")?;
    p.client.ep.send(tx.iov(0, 40), 2).ctx("send")?;
    let r = p.wait_ok(Who::Server)?;
    ensure_eq!((r.context, r.len), (1, 40), "next receive");
    same("next message", &pattern(6, 40), &rx.to_vec(0, 40)?)?;
    Ok(())
}

/// A provider that states `truncation_ends_connection` (RC verbs: the responder's queue
/// pair goes to the error state) must do exactly that: the receive fails `Truncated`,
/// both ends see `Shutdown` for their endpoint, and a later receive or send fails at
/// the call instead of being accepted and lost.
fn truncation_ended_connection(p: &Pair) -> CaseResult {
    truncate_once(p)?;
    for who in [Who::Server, Who::Client] {
        let fid = p.side(who).ep.fid();
        match p.wait_event(who)? {
            Event::Shutdown { fid: f, .. } if f == fid => {}
            other => {
                return Err(CaseError::fail(format!(
                    "{who:?}: the provider states that a truncation ends the connection; \
                     expected Shutdown of {fid}, got {other:?}"
                )))
            }
        }
    }
    let rx = p.server.alloc(64, Access::RECV)?;
    let tx = p.client.alloc(64, Access::SEND)?;
    for (what, r) in [
        ("receive after the Shutdown", p.server.ep.recv(rx.full(), 1)),
        (
            "send after the Shutdown",
            p.client.ep.send(tx.iov(0, 40), 2),
        ),
    ] {
        match r {
            Err(e) if matches!(e.kind(), ErrorKind::NotConnected | ErrorKind::Shutdown) => {}
            Err(e) => {
                return Err(CaseError::fail(format!(
                    "{what}: refused with {:?} ({e}); expected NotConnected or Shutdown",
                    e.kind()
                )))
            }
            Ok(()) => {
                return Err(CaseError::fail(format!(
                    "{what}: accepted on a connection that ended"
                )))
            }
        }
    }
    Ok(())
}

fn zero_length_no_iov(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    let rx = p.server.alloc(16, Access::RECV)?;
    p.server.ep.recv(rx.full(), 1).ctx("post recv")?;
    p.client.ep.sendv(&[], 2).ctx("sendv with no iovec")?;
    let r = p.wait_ok(Who::Server)?;
    ensure_eq!((r.context, r.len), (1, 0), "receive");
    p.server.ep.recvv(&[], 3).ctx("recvv with no iovec")?;
    p.client.ep.sendv(&[], 4).ctx("second sendv")?;
    let r = p.wait_ok(Who::Server)?;
    ensure_eq!((r.context, r.len), (3, 0), "receive with no iovec");
    p.wait_ok_n(Who::Client, 2)?;
    Ok(())
}

fn manual_progress_threads(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair_with(&PairConfig::new(Caps::MSG).progress(Progress::Manual))?;
    let t = p.timeout;
    let rounds = 200u64;
    let Pair {
        server,
        client,
        listener,
        ..
    } = p;
    let echo = std::thread::spawn(move || -> CaseResult {
        let buf = server.alloc(4096, Access::RECV | Access::SEND)?;
        for i in 0..rounds {
            server.ep.recv(buf.full(), i).ctx("post recv")?;
            let r = server.cq.wait(t).ctx(format!("server round {i}"))?;
            ensure!(r.is_ok() && r.context == i, "server round {i}: {r:?}");
            server.ep.send(buf.iov(0, r.len), i).ctx("echo")?;
            let s = server.cq.wait(t).ctx(format!("server echo {i}"))?;
            ensure!(s.is_ok(), "echo {i}: {s:?}");
        }
        Ok(())
    });
    let tx = client.alloc(4096, Access::SEND)?;
    let rx = client.alloc(4096, Access::RECV)?;
    let mut result = Ok(());
    for i in 0..rounds {
        let len = (i as usize * 37) % 4096;
        let step = || -> CaseResult {
            tx.write_at(0, &pattern(i, len)).ctx("fill")?;
            client.ep.recv(rx.full(), 1000 + i).ctx("post recv")?;
            client.ep.send(tx.iov(0, len), i).ctx("send")?;
            let mut got_recv = false;
            for _ in 0..2 {
                let c = client.cq.wait(t).ctx(format!("client round {i}"))?;
                ensure!(c.is_ok(), "client round {i}: {c:?}");
                got_recv |= c.context == 1000 + i;
            }
            ensure!(got_recv, "round {i}: no echo received");
            same(&format!("echo {i}"), &pattern(i, len), &rx.to_vec(0, len)?)
        };
        if let Err(e) = step() {
            result = Err(e);
            break;
        }
    }
    drop(client);
    let server_result = echo
        .join()
        .map_err(|_| CaseError::fail("echo thread panicked"))?;
    drop(listener);
    result?;
    server_result.map_err(|e| e.context("echo thread"))
}

fn auto_progress(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair_with(&PairConfig::new(Caps::MSG).progress(Progress::Auto))?;
    let len = (4usize << 20).min(limits(&p).max_msg_size);
    let rx = p.server.alloc(len, Access::RECV)?;
    let tx = p.client.alloc(len, Access::SEND)?;
    tx.write_at(0, &pattern(9, len)).ctx("fill")?;
    p.server.ep.recv(rx.full(), 1).ctx("post recv")?;
    p.client.ep.send(tx.full(), 2).ctx("send")?;
    // Only the receiver reads its queue; the sender's progress thread must move the data.
    let r = p.server.cq.wait(p.timeout).ctx("server wait")?;
    ensure!(r.is_ok(), "{r:?}");
    ensure_eq!(r.len, len, "received length");
    same("payload", &pattern(9, len), &rx.to_vec(0, len)?)?;
    let s = p.client.cq.wait(p.timeout).ctx("client wait")?;
    ensure!(s.is_ok() && s.context == 2, "{s:?}");
    Ok(())
}

fn completion_levels(ctx: &Ctx) -> CaseResult {
    use fabric::{Msg, OpFlags};
    let p = ctx.pair(Caps::MSG)?;
    let rx = p.server.alloc(4 * 64, Access::RECV)?;
    let tx = p.client.alloc(64, Access::SEND)?;
    tx.write_at(0, &pattern(13, 64)).ctx("fill")?;
    let iov = [tx.iov(0, 16.min(limits(&p).inject_size.max(1)))];
    let len = iov[0].len;
    for i in 0..4 {
        p.server
            .ep
            .recv(rx.iov(i * 64, 64), i as u64)
            .ctx("post recv")?;
    }
    let levels = [
        OpFlags::INJECT_COMPLETE,
        OpFlags::TRANSMIT_COMPLETE,
        OpFlags::DELIVERY_COMPLETE,
    ];
    for (i, f) in levels.into_iter().enumerate() {
        let msg = Msg {
            iov: &iov,
            context: 100 + i as u64,
            data: 0,
        };
        p.client
            .ep
            .sendmsg(&msg, OpFlags::COMPLETION | f)
            .ctx(format!("sendmsg {f:?}"))?;
        let c = p.wait_ok(Who::Client)?;
        ensure_eq!(c.context, 100 + i as u64, "completion of {f:?}");
        let r = p.wait_ok(Who::Server)?;
        ensure_eq!((r.context, r.len), (i as u64, len), "receive of {f:?}");
    }
    if limits(&p).inject_size >= len {
        let msg = Msg {
            iov: &iov,
            context: 200,
            data: 0,
        };
        p.client
            .ep
            .sendmsg(&msg, OpFlags::INJECT)
            .ctx("sendmsg INJECT")?;
        let r = p.wait_ok(Who::Server)?;
        ensure_eq!(
            (r.context, r.len),
            (3, len),
            "receive of the injected message"
        );
        p.expect_no_completion(Who::Client, Duration::from_millis(50), "sendmsg INJECT")?;
    }
    let msg = Msg {
        iov: &iov,
        context: 300,
        data: 0,
    };
    expect_err(
        p.client.ep.sendmsg(&msg, OpFlags::COMMIT_COMPLETE),
        ErrorKind::InvalidArgument,
        "send with COMMIT_COMPLETE",
    )?;
    Ok(())
}
