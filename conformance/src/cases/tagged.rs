//! tagged: tagged messages of the RDM layer (libfabric `fi_tagged`): 64-bit tags with
//! ignore masks matched in posting order, unexpected messages matched in arrival
//! order, peek / claim / discard, tagged and untagged kept apart, rendezvous above the
//! eager limit (up to 4 MiB) and its truncation.

use std::time::Duration;

use fabric::rdm::{OpKind, PeekMode, RdmAttr};
use fabric::{Access, CqErrorKind, ErrorKind};

use super::case;
use super::rdm::{alloc, err, ok, world, NEEDS};
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::payload::pattern;
use crate::{ensure, ensure_eq};

const G: &str = "tagged";

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "posting_order_and_masks", NEEDS, "receives match in posting order, with ignore masks and a directed source", posting_order_and_masks),
        case(G, "unexpected_arrival_order", NEEDS, "messages that arrive before their receive are matched in arrival order", unexpected_arrival_order),
        case(G, "peek_claim_discard", NEEDS, "peek reports without taking, claim reserves for trecv_claimed, discard drops", peek_claim_discard),
        case(G, "tagged_untagged_apart", NEEDS, "a tagged message never matches an untagged receive, nor the reverse", tagged_untagged_apart),
        case(G, "rendezvous_sizes", NEEDS, "1 B to 4 MiB around a 4 KiB eager limit, receive posted before or after, data and CQ data verified", rendezvous_sizes),
        case(G, "rendezvous_truncated", NEEDS, "a rendezvous into a smaller buffer: Truncated at both ends; no REMOTE_READ: refused at the call", rendezvous_truncated),
        case(G, "tsendv_trecvv", NEEDS, "tsendv/trecvv: gathered and scattered tagged messages matched by tag, eager and rendezvous, posted before and after arrival, truncation across ranges", tsendv_trecvv),
    ]
}

fn posting_order_and_masks(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let ma = alloc(&a.domain, 64, Access::LOCAL)?;
    let mb = alloc(&b.domain, 64, Access::LOCAL)?;
    b.ep.trecv(mb.iov(0, 8), None, 0x100, 0xff, 1)
        .ctx("trecv")?;
    b.ep.trecv(mb.iov(8, 8), None, 0x105, 0, 2).ctx("trecv")?;
    b.ep.trecv(mb.iov(16, 8), Some(b.to[0]), 0x105, 0, 3)
        .ctx("trecv")?;
    for (i, (tag, byte)) in [
        (0x105u64, 0xa1u8),
        (0x105, 0xa2),
        (0x1ff, 0xa3),
        (0x105, 0xa4),
    ]
    .into_iter()
    .enumerate()
    {
        ma.fill(i * 8, 8, byte).ctx("fill")?;
        a.ep.tsend(ma.iov(i * 8, 8), a.to[1], tag, i as u64)
            .ctx("tsend")?;
        ok(ctx, &a.ep)?;
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let c = ok(ctx, &b.ep)?;
        got.push((c.context, c.tag, c.kind));
    }
    ensure_eq!(
        got,
        vec![
            (1, 0x105, OpKind::TaggedRecv),
            (2, 0x105, OpKind::TaggedRecv),
            (3, 0x105, OpKind::TaggedRecv)
        ],
        "matches"
    );
    ensure_eq!(mb.to_vec(0, 1).ctx("read")?, vec![0xa1], "first");
    ensure_eq!(mb.to_vec(8, 1).ctx("read")?, vec![0xa2], "second");
    ensure_eq!(
        mb.to_vec(16, 1).ctx("read")?,
        vec![0xa4],
        "third (0x1ff matched none)"
    );
    ensure!(
        b.ep.wait(Duration::from_millis(100)).is_err(),
        "0x1ff matched a receive"
    );
    Ok(())
}

fn unexpected_arrival_order(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let ma = alloc(&a.domain, 64, Access::LOCAL)?;
    let mb = alloc(&b.domain, 64, Access::LOCAL)?;
    for (i, tag) in [7u64, 8, 7].into_iter().enumerate() {
        ma.fill(i * 8, 8, i as u8 + 1).ctx("fill")?;
        a.ep.tsend(ma.iov(i * 8, 8), a.to[1], tag, i as u64)
            .ctx("tsend")?;
        ok(ctx, &a.ep)?;
    }
    std::thread::sleep(Duration::from_millis(50));
    b.ep.trecv(mb.iov(0, 8), None, 7, 0, 10).ctx("trecv")?;
    b.ep.trecv(mb.iov(8, 8), None, 0, u64::MAX, 11)
        .ctx("trecv")?;
    b.ep.trecv(mb.iov(16, 8), None, 7, 0, 12).ctx("trecv")?;
    let got: Vec<(u64, u64)> = (0..3)
        .map(|_| ok(ctx, &b.ep).map(|c| (c.context, c.tag)))
        .collect::<Result<_, _>>()?;
    ensure_eq!(got, vec![(10, 7), (11, 8), (12, 7)], "matches");
    ensure_eq!(
        mb.to_vec(0, 24).ctx("read")?,
        [vec![1; 8], vec![2; 8], vec![3; 8]].concat(),
        "data in arrival order"
    );
    Ok(())
}

fn peek_claim_discard(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let ma = alloc(&a.domain, 64, Access::LOCAL)?;
    let mb = alloc(&b.domain, 64, Access::LOCAL)?;
    for (i, tag) in [0x1ffu64, 0x7, 0x7].into_iter().enumerate() {
        ma.fill(i * 8, 8, 0xb0 + i as u8).ctx("fill")?;
        a.ep.tsenddata(ma.iov(i * 8, 8), 40 + i as u64, a.to[1], tag, i as u64)
            .ctx("tsenddata")?;
        ok(ctx, &a.ep)?;
    }
    // A completed send may still be on its way: peek (which finds only what has
    // arrived, as FI_PEEK) until the first message is there.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pk = loop {
        if let Some(pk) = b.ep.tpeek(None, 0x1ff, 0, PeekMode::Peek).ctx("peek")? {
            break pk;
        }
        if std::time::Instant::now() >= deadline {
            return Err(CaseError::fail("peek found nothing within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    ensure_eq!(
        (pk.len, pk.tag, pk.src, pk.data),
        (8, 0x1ff, Some(b.to[0]), Some(40)),
        "peek"
    );
    ensure!(
        b.ep.tpeek(None, 0x2ff, 0, PeekMode::Peek)
            .ctx("peek")?
            .is_none(),
        "peek of an absent tag"
    );
    ensure!(
        b.ep.tpeek(Some(b.to[1]), 0x1ff, 0, PeekMode::Peek)
            .ctx("peek")?
            .is_none(),
        "peek from another source"
    );
    let cl =
        b.ep.tpeek(None, 0x100, 0xff, PeekMode::Claim)
            .ctx("claim")?
            .ok_or_else(|| CaseError::fail("claim found nothing"))?;
    ensure!(
        b.ep.tpeek(None, 0x1ff, 0, PeekMode::Peek)
            .ctx("peek")?
            .is_none(),
        "a claimed message is still matchable"
    );
    let claim = cl
        .claim
        .ok_or_else(|| CaseError::fail("claim without a reservation"))?;
    b.ep.trecv_claimed(mb.iov(0, 8), claim, 1)
        .ctx("trecv_claimed")?;
    let c = ok(ctx, &b.ep)?;
    ensure_eq!(
        (c.context, c.tag, c.data),
        (1, 0x1ff, Some(40)),
        "claimed receive"
    );
    ensure_eq!(mb.to_vec(0, 1).ctx("read")?, vec![0xb0], "claimed data");
    let d = loop {
        if let Some(d) = b.ep.tpeek(None, 0x7, 0, PeekMode::Discard).ctx("discard")? {
            break d;
        }
        if std::time::Instant::now() >= deadline {
            return Err(CaseError::fail("discard found nothing within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    ensure_eq!(d.data, Some(41), "the first 0x7 is discarded");
    b.ep.trecv(mb.iov(8, 8), None, 0x7, 0, 2).ctx("trecv")?;
    let c = ok(ctx, &b.ep)?;
    ensure_eq!((c.context, c.data), (2, Some(42)), "the second 0x7");
    ensure_eq!(mb.to_vec(8, 1).ctx("read")?, vec![0xb2], "second 0x7 data");
    Ok(())
}

fn tagged_untagged_apart(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let ma = alloc(&a.domain, 16, Access::LOCAL)?;
    let mb = alloc(&b.domain, 16, Access::LOCAL)?;
    b.ep.recv(mb.iov(0, 8), 1).ctx("recv")?;
    a.ep.tsend(ma.iov(0, 8), a.to[1], 0, 2).ctx("tsend")?;
    ok(ctx, &a.ep)?;
    ensure!(
        b.ep.wait(Duration::from_millis(200)).is_err(),
        "a tagged message matched recv"
    );
    b.ep.trecv(mb.iov(8, 8), None, 0, 0, 3).ctx("trecv")?;
    ensure_eq!(ok(ctx, &b.ep)?.context, 3, "the tagged receive");
    a.ep.send_to(ma.iov(0, 8), a.to[1], 4).ctx("send")?;
    ok(ctx, &a.ep)?;
    let c = ok(ctx, &b.ep)?;
    ensure_eq!(
        (c.context, c.kind),
        (1, OpKind::Recv),
        "the untagged receive"
    );
    Ok(())
}

fn rendezvous_sizes(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default().eager_limit(4096))?;
    let (a, b) = (&w[0], &w[1]);
    let big = 4 << 20;
    let ma = alloc(&a.domain, big, Access::LOCAL | Access::REMOTE_READ)?;
    let mb = alloc(&b.domain, big, Access::LOCAL)?;
    for (i, len) in [1usize, 4095, 4096, 4097, 100_000, 1 << 20, big]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, len);
        ma.write_at(0, &data).ctx("fill")?;
        mb.fill(0, len, 0).ctx("clear")?;
        let tag = 40 + i as u64;
        if i % 2 == 0 {
            b.ep.trecv(mb.iov(0, big), None, tag, 0, 1).ctx("trecv")?;
        }
        a.ep.tsenddata(ma.iov(0, len), 77, a.to[1], tag, 2)
            .ctx("tsenddata")?;
        if i % 2 == 1 {
            std::thread::sleep(Duration::from_millis(20));
            b.ep.trecv(mb.iov(0, big), None, tag, 0, 1).ctx("trecv")?;
        }
        let r = ok(ctx, &b.ep)?;
        ensure_eq!(
            (r.len, r.data, r.src, r.tag),
            (len, Some(77), Some(b.to[0]), tag),
            "{len}-byte receive"
        );
        ensure!(mb.to_vec(0, len).ctx("read")? == data, "{len} bytes differ");
        let s = ok(ctx, &a.ep)?;
        ensure_eq!(
            (s.context, s.kind, s.len),
            (2, OpKind::TaggedSend, len),
            "{len}-byte send"
        );
    }
    Ok(())
}

fn rendezvous_truncated(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default().eager_limit(4096))?;
    let (a, b) = (&w[0], &w[1]);
    let ma = alloc(&a.domain, 20_000, Access::LOCAL | Access::REMOTE_READ)?;
    let mb = alloc(&b.domain, 10_000, Access::LOCAL)?;
    b.ep.trecv(mb.iov(0, 10_000), None, 9, 0, 1).ctx("trecv")?;
    a.ep.tsend(ma.iov(0, 20_000), a.to[1], 9, 2).ctx("tsend")?;
    let r = err(ctx, &b.ep, CqErrorKind::Truncated, "receiver")?;
    ensure_eq!(r.len, 10_000, "bytes placed");
    err(ctx, &a.ep, CqErrorKind::Truncated, "sender")?;
    let plain = alloc(&a.domain, 8192, Access::LOCAL)?;
    match a.ep.tsend(plain.iov(0, 8192), a.to[1], 9, 3) {
        Err(e) if e.kind() == ErrorKind::AccessDenied => Ok(()),
        other => Err(CaseError::fail(format!(
            "a rendezvous without REMOTE_READ: {other:?}"
        ))),
    }
}

fn tsendv_trecvv(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default().eager_limit(4096))?;
    let (a, b) = (&w[0], &w[1]);
    for (round, total) in [100usize, 50_000].into_iter().enumerate() {
        let data = pattern(90 + round as u64, total);
        let src = alloc(&a.domain, total + 64, Access::LOCAL | Access::REMOTE_READ)?;
        src.write_at(0, &data[..total / 2]).ctx("fill")?;
        src.write_at(total / 2 + 32, &data[total / 2..])
            .ctx("fill")?;
        let iov = [
            src.iov(0, total / 2),
            src.iov(total / 2 + 32, total - total / 2),
        ];
        let dst = alloc(&b.domain, total + 64, Access::LOCAL | Access::READ)?;
        let cut = total / 4;
        let riov = [dst.iov(0, cut), dst.iov(cut + 16, total - cut)];
        for posted_first in [true, false] {
            dst.fill(0, total + 64, 0).ctx("clear")?;
            let tag = 0x5000 + round as u64 * 2 + posted_first as u64;
            // A decoy receive of another tag stays unmatched.
            let decoy = alloc(&b.domain, 8, Access::LOCAL)?;
            b.ep.trecv(decoy.iov(0, 8), None, tag + 100, 0, 99)
                .ctx("trecv decoy")?;
            if posted_first {
                b.ep.trecvv(&riov, None, tag, 0, 1).ctx("trecvv")?;
            }
            a.ep.tsendv(&iov, a.to[1], tag, 2).ctx("tsendv")?;
            if !posted_first {
                // Let the message arrive unexpected (rendezvous: its request).
                let deadline = std::time::Instant::now() + ctx.timeout();
                while b
                    .ep
                    .tpeek(None, tag, 0, PeekMode::Peek)
                    .ctx("peek")?
                    .is_none()
                {
                    ensure!(
                        std::time::Instant::now() < deadline,
                        "the message never arrived"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                b.ep.trecvv(&riov, None, tag, 0, 1).ctx("trecvv")?;
            }
            let r = ok(ctx, &b.ep)?;
            ensure_eq!(
                (r.context, r.kind, r.len, r.tag),
                (1, OpKind::TaggedRecv, total, tag),
                "round {round} posted_first {posted_first}: receive"
            );
            let mut got = dst.to_vec(0, cut).ctx("read")?;
            got.extend(dst.to_vec(cut + 16, total - cut).ctx("read")?);
            ensure!(
                got == data,
                "round {round} posted_first {posted_first}: data differs"
            );
            ensure_eq!(
                dst.to_vec(cut, 16).ctx("read")?,
                vec![0; 16],
                "the gap between the receive's ranges was written"
            );
            let s = ok(ctx, &a.ep)?;
            ensure_eq!(
                (s.context, s.kind, s.len),
                (2, OpKind::TaggedSend, total),
                "send completion"
            );
            // Take the decoy with a message of its own.
            a.ep.tsend(src.iov(0, 8), a.to[1], tag + 100, 3)
                .ctx("tsend")?;
            ensure_eq!(ok(ctx, &b.ep)?.context, 99, "decoy");
            ok(ctx, &a.ep)?;
        }
        // Truncation across ranges: the receive's two ranges hold total - 10 bytes.
        let tag = 0x6000 + round as u64;
        b.ep.trecvv(&[dst.iov(0, 10), dst.iov(10, total - 20)], None, tag, 0, 4)
            .ctx("trecvv")?;
        a.ep.tsendv(&iov, a.to[1], tag, 5).ctx("tsendv")?;
        let r = err(ctx, &b.ep, CqErrorKind::Truncated, "truncated receive")?;
        ensure_eq!(r.len, total - 10, "round {round}: bytes that fit");
        ensure!(
            dst.to_vec(0, total - 10).ctx("read")? == data[..total - 10],
            "round {round}: truncated data differs"
        );
        let s = a.ep.wait(ctx.timeout()).ctx("send completion")?;
        ensure_eq!(s.context, 5, "truncated send's completion");
    }
    Ok(())
}
