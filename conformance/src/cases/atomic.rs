//! atomic: atomics of the RDM layer (libfabric `fi_atomic`), executed by the target's
//! layer on regions bound to its endpoint: every operation on every type it supports
//! (fetching and not), compare-and-swap, several elements per call, `atomic_valid`,
//! fetch-add from four initiators at once, and the key / bounds / rights refusals.

use std::collections::HashSet;

use fabric::rdm::{atomic_valid, AtomicForm, AtomicOp, Datatype, OpKind, RdmAttr};
use fabric::{Access, CqErrorKind, RemoteIov};

use super::case;
use super::rdm::{alloc, err, ok, world, NEEDS};
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::pair::Who;
use crate::{ensure, ensure_eq};

const G: &str = "atomic";

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "every_op_and_type", NEEDS, "min/max/sum/bor/band/bxor/read/write on u32/u64/i32/i64 and the float ones on f32/f64, fetching and not", every_op_and_type),
        case(G, "compare_swap", NEEDS, "compare-and-swap on every integer type: a miss leaves the target, a hit swaps; both fetch", compare_swap),
        case(G, "vector_and_valid", NEEDS, "several elements in one call; atomic_valid refuses bitwise floats and wrong forms, and so does the call", vector_and_valid),
        case(G, "four_initiators", NEEDS, "4 initiators x 1,000 fetch-adds on one u64: the final value is exact, no old value fetched twice", four_initiators),
        case(G, "access_refused", NEEDS, "bounds, a wrong key and a region without REMOTE_WRITE: RemoteAccess, memory untouched", access_refused),
        case(G, "native_path", NEEDS, "where the MSG provider executes u64 fetch-add natively (its fetch_atomicvalid) and coherently with CPU atomics (atomic_cpu_coherent), the layer uses it: a fetch-add into a region registered but not bound to the target's endpoint works (no target-side software); elsewhere it is refused RemoteAccess (the emulated path takes bound regions only)", native_path),
        case(G, "mixed_paths", NEEDS, "one u64 word updated by single-element fetch-adds (native where the provider has them) and by 2-element vector fetch-adds (always emulated) from 4 initiators at once: both words exact", mixed_paths),
    ]
}

const TYPES: [Datatype; 6] = Datatype::ALL;

fn enc(dt: Datatype, x: f64) -> Vec<u8> {
    match dt {
        Datatype::U32 => (x as u32).to_le_bytes().to_vec(),
        Datatype::I32 => (x as i32).to_le_bytes().to_vec(),
        Datatype::U64 => (x as u64).to_le_bytes().to_vec(),
        Datatype::I64 => (x as i64).to_le_bytes().to_vec(),
        Datatype::F32 => (x as f32).to_le_bytes().to_vec(),
        _ => x.to_le_bytes().to_vec(),
    }
}

fn every_op_and_type(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let target = alloc(&b.domain, 64, Access::LOCAL | Access::REMOTE)?;
    b.ep.bind_mr(&target).ctx("bind_mr")?;
    let remote = target.remote();
    let res = alloc(&a.domain, 64, Access::LOCAL)?;
    let ops = [
        (AtomicOp::Min, 10.0),
        (AtomicOp::Max, 12.0),
        (AtomicOp::Sum, 22.0),
        (AtomicOp::Bor, 14.0),
        (AtomicOp::Band, 8.0),
        (AtomicOp::Bxor, 6.0),
        (AtomicOp::Read, 12.0),
        (AtomicOp::Write, 10.0),
    ];
    let mut checked = 0;
    for dt in TYPES {
        let s = dt.size();
        for (op, want) in ops {
            if atomic_valid(op, dt, AtomicForm::Fetch).is_none() {
                continue;
            }
            target.write_at(0, &enc(dt, 12.0)).ctx("fill")?;
            a.ep.fetch_atomic(
                op,
                dt,
                &enc(dt, 10.0),
                res.iov(0, s),
                a.to[1],
                remote.iov(0, s),
                1,
            )
            .ctx("fetch_atomic")?;
            let c = ok(ctx, &a.ep)?;
            ensure_eq!(
                (c.kind, c.len),
                (OpKind::Atomic, s),
                "{op:?} {dt:?} completion"
            );
            ensure_eq!(
                res.to_vec(0, s).ctx("read")?,
                enc(dt, 12.0),
                "{op:?} {dt:?} fetched"
            );
            ensure_eq!(
                target.to_vec(0, s).ctx("read")?,
                enc(dt, want),
                "{op:?} {dt:?} result"
            );
            checked += 1;
            if atomic_valid(op, dt, AtomicForm::Plain).is_some() {
                target.write_at(0, &enc(dt, 12.0)).ctx("fill")?;
                a.ep.atomic(op, dt, &enc(dt, 10.0), a.to[1], remote.iov(0, s), 2)
                    .ctx("atomic")?;
                ok(ctx, &a.ep)?;
                ensure_eq!(
                    target.to_vec(0, s).ctx("read")?,
                    enc(dt, want),
                    "{op:?} {dt:?} (no fetch)"
                );
                checked += 1;
            }
        }
    }
    ensure_eq!(checked, 4 * 15 + 2 * 9, "combinations checked");
    Ok(())
}

fn compare_swap(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let target = alloc(&b.domain, 8, Access::LOCAL | Access::REMOTE)?;
    b.ep.bind_mr(&target).ctx("bind_mr")?;
    let remote = target.remote();
    let res = alloc(&a.domain, 8, Access::LOCAL)?;
    for dt in TYPES {
        if atomic_valid(AtomicOp::Cswap, dt, AtomicForm::Compare).is_none() {
            continue;
        }
        let s = dt.size();
        target.write_at(0, &enc(dt, 5.0)).ctx("fill")?;
        a.ep.compare_atomic(
            dt,
            &enc(dt, 9.0),
            &enc(dt, 4.0),
            res.iov(0, s),
            a.to[1],
            remote.iov(0, s),
            1,
        )
        .ctx("compare_atomic")?;
        ok(ctx, &a.ep)?;
        ensure_eq!(
            target.to_vec(0, s).ctx("read")?,
            enc(dt, 5.0),
            "{dt:?} miss"
        );
        ensure_eq!(
            res.to_vec(0, s).ctx("read")?,
            enc(dt, 5.0),
            "{dt:?} miss fetched"
        );
        a.ep.compare_atomic(
            dt,
            &enc(dt, 9.0),
            &enc(dt, 5.0),
            res.iov(0, s),
            a.to[1],
            remote.iov(0, s),
            2,
        )
        .ctx("compare_atomic")?;
        ok(ctx, &a.ep)?;
        ensure_eq!(target.to_vec(0, s).ctx("read")?, enc(dt, 9.0), "{dt:?} hit");
    }
    Ok(())
}

fn vector_and_valid(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let target = alloc(&b.domain, 32, Access::LOCAL | Access::REMOTE)?;
    b.ep.bind_mr(&target).ctx("bind_mr")?;
    let remote = target.remote();
    let le = |v: &[u64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    target.write_at(0, &le(&[1, 2, 3, 4])).ctx("fill")?;
    a.ep.atomic(
        AtomicOp::Sum,
        Datatype::U64,
        &le(&[10, 20, 30, 40]),
        a.to[1],
        remote.iov(0, 32),
        1,
    )
    .ctx("atomic")?;
    ok(ctx, &a.ep)?;
    ensure_eq!(
        target.to_vec(0, 32).ctx("read")?,
        le(&[11, 22, 33, 44]),
        "vector sum"
    );
    ensure!(
        atomic_valid(AtomicOp::Bxor, Datatype::F32, AtomicForm::Plain).is_none(),
        "bitwise float valid"
    );
    ensure!(
        atomic_valid(AtomicOp::Cswap, Datatype::U64, AtomicForm::Fetch).is_none(),
        "cswap as fetch valid"
    );
    ensure!(
        atomic_valid(AtomicOp::Read, Datatype::U64, AtomicForm::Plain).is_none(),
        "read without fetch valid"
    );
    ensure!(
        atomic_valid(AtomicOp::Sum, Datatype::F64, AtomicForm::Fetch).is_some(),
        "float sum invalid"
    );
    ensure!(
        a.ep.atomic(
            AtomicOp::Bxor,
            Datatype::F64,
            &le(&[1]),
            a.to[1],
            remote.iov(0, 8),
            2
        )
        .is_err(),
        "bitwise float accepted"
    );
    ensure!(
        a.ep.atomic(
            AtomicOp::Sum,
            Datatype::U64,
            &[1, 2, 3],
            a.to[1],
            remote.iov(0, 3),
            3
        )
        .is_err(),
        "a partial element accepted"
    );
    ensure!(
        a.ep.atomic(
            AtomicOp::Sum,
            Datatype::U64,
            &le(&[1]),
            a.to[1],
            remote.iov(0, 16),
            4
        )
        .is_err(),
        "operand and remote lengths differ, accepted"
    );
    Ok(())
}

fn four_initiators(ctx: &Ctx) -> CaseResult {
    let n = 5;
    let per = 1000u64;
    let w = world(ctx, n, RdmAttr::default())?;
    let target = alloc(&w[0].domain, 8, Access::LOCAL | Access::REMOTE)?;
    w[0].ep.bind_mr(&target).ctx("bind_mr")?;
    let remote = target.remote();
    let results: Vec<Result<HashSet<u64>, CaseError>> = std::thread::scope(|s| {
        let hs: Vec<_> = w[1..]
            .iter()
            .map(|x| {
                s.spawn(move || -> Result<HashSet<u64>, CaseError> {
                    let res = alloc(&x.domain, 8 * 16, Access::LOCAL)?;
                    let mut seen = HashSet::new();
                    let (mut posted, mut done) = (0u64, 0u64);
                    while done < per {
                        while posted < per && posted - done < 16 {
                            let slot = (posted % 16) as usize * 8;
                            x.ep.fetch_atomic(
                                AtomicOp::Sum,
                                Datatype::U64,
                                &1u64.to_le_bytes(),
                                res.iov(slot, 8),
                                x.to[0],
                                remote.iov(0, 8),
                                posted,
                            )
                            .ctx("fetch_atomic")?;
                            posted += 1;
                        }
                        let c = ok(ctx, &x.ep)?;
                        let slot = (c.context % 16) as usize * 8;
                        let old = res.to_vec(slot, 8).ctx("read")?;
                        let old = u64::from_le_bytes(
                            old.try_into().map_err(|_| CaseError::fail("8 bytes"))?,
                        );
                        seen.insert(old);
                        done += 1;
                    }
                    Ok(seen)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CaseError::fail("an initiator panicked")))
            })
            .collect()
    });
    let mut all = HashSet::new();
    for r in results {
        let seen = r?;
        ensure_eq!(seen.len() as u64, per, "distinct old values per initiator");
        for v in seen {
            ensure!(all.insert(v), "old value {v} fetched by two initiators");
        }
    }
    let v = u64::from_le_bytes(
        target
            .to_vec(0, 8)
            .ctx("read")?
            .try_into()
            .map_err(|_| CaseError::fail("8 bytes"))?,
    );
    ensure_eq!(v, per * (n as u64 - 1), "final value");
    Ok(())
}

fn access_refused(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let target = alloc(&b.domain, 64, Access::LOCAL | Access::REMOTE)?;
    b.ep.bind_mr(&target).ctx("bind_mr")?;
    let remote = target.remote();
    target.fill(0, 64, 0x11).ctx("fill")?;
    let one = 1u64.to_le_bytes();
    let wrong_key = RemoteIov {
        key: remote.key ^ 0x5a5a,
        ..remote.iov(0, 8)
    };
    for (r, what) in [
        (remote.iov(60, 8), "out of bounds"),
        (wrong_key, "wrong key"),
    ] {
        a.ep.atomic(AtomicOp::Sum, Datatype::U64, &one, a.to[1], r, 1)
            .ctx("atomic")?;
        err(ctx, &a.ep, CqErrorKind::RemoteAccess, what)?;
    }
    let ro = alloc(&b.domain, 8, Access::LOCAL | Access::REMOTE_READ)?;
    b.ep.bind_mr(&ro).ctx("bind_mr")?;
    a.ep.atomic(
        AtomicOp::Sum,
        Datatype::U64,
        &one,
        a.to[1],
        ro.remote().iov(0, 8),
        2,
    )
    .ctx("atomic")?;
    err(ctx, &a.ep, CqErrorKind::RemoteAccess, "no REMOTE_WRITE")?;
    // A read-only region still answers an atomic read.
    let res = alloc(&a.domain, 8, Access::LOCAL)?;
    a.ep.fetch_atomic(
        AtomicOp::Read,
        Datatype::U64,
        &one,
        res.iov(0, 8),
        a.to[1],
        ro.remote().iov(0, 8),
        3,
    )
    .ctx("fetch_atomic read")?;
    ok(ctx, &a.ep)?;
    ensure_eq!(
        target.to_vec(0, 64).ctx("read")?,
        vec![0x11; 64],
        "target untouched"
    );
    ensure_eq!(
        ro.to_vec(0, 8).ctx("read")?,
        vec![0; 8],
        "read-only region untouched"
    );
    Ok(())
}

/// Whether the provider's MSG endpoints execute u64 fetch-add natively (then the layer
/// uses them).
fn msg_native_fetch_add(ctx: &Ctx) -> Result<bool, CaseError> {
    let caps = fabric::Caps::MSG | fabric::Caps::RMA | fabric::Caps::ATOMIC;
    if ctx.rejection(&ctx.hints(caps)).is_some() {
        return Ok(false);
    }
    let p = ctx.pair(caps)?;
    let ep = &p.side(Who::Client).ep;
    // The layer takes the native path only where it is coherent with CPU atomics.
    Ok(ep.fetch_atomicvalid(AtomicOp::Sum, Datatype::U64).is_some() && ep.atomic_cpu_coherent())
}

fn native_path(ctx: &Ctx) -> CaseResult {
    let native = msg_native_fetch_add(ctx)?;
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    // Registered with remote rights, never bound to b's endpoint.
    let target = alloc(&b.domain, 16, Access::LOCAL | Access::REMOTE)?;
    target.write_at(8, &40u64.to_le_bytes()).ctx("init")?;
    let res = alloc(&a.domain, 8, Access::LOCAL)?;
    a.ep.fetch_atomic(
        AtomicOp::Sum,
        Datatype::U64,
        &2u64.to_le_bytes(),
        res.iov(0, 8),
        a.to[1],
        target.remote().iov(8, 8),
        5,
    )
    .ctx("fetch_atomic")?;
    let now = u64::from_le_bytes(
        target
            .to_vec(8, 8)
            .ctx("read")?
            .try_into()
            .map_err(|_| CaseError::fail("8 bytes"))?,
    );
    if native {
        let c = ok(ctx, &a.ep)?;
        ensure_eq!(c.kind, OpKind::Atomic, "completion kind");
        ensure_eq!(
            res.to_vec(0, 8).ctx("read")?,
            40u64.to_le_bytes().to_vec(),
            "old value"
        );
        let now = u64::from_le_bytes(
            target
                .to_vec(8, 8)
                .ctx("read")?
                .try_into()
                .map_err(|_| CaseError::fail("8 bytes"))?,
        );
        ensure_eq!(
            now,
            42,
            "target after a native fetch-add into an unbound region"
        );
    } else {
        err(
            ctx,
            &a.ep,
            CqErrorKind::RemoteAccess,
            "emulated fetch-add into an unbound region",
        )?;
        ensure_eq!(now, 40, "target untouched");
    }
    Ok(())
}

fn mixed_paths(ctx: &Ctx) -> CaseResult {
    let per = 500u64;
    let w = world(ctx, 5, RdmAttr::default())?;
    let target = alloc(&w[0].domain, 16, Access::LOCAL | Access::REMOTE)?;
    w[0].ep.bind_mr(&target).ctx("bind_mr")?;
    let remote = target.remote();
    let results: Vec<CaseResult> = std::thread::scope(|s| {
        let hs: Vec<_> = w[1..]
            .iter()
            .enumerate()
            .map(|(i, x)| {
                s.spawn(move || -> CaseResult {
                    // Initiators 0 and 1: one element (native where offered); 2 and 3:
                    // two elements, always the layer's emulated path.
                    let elems = if i < 2 { 1 } else { 2 };
                    let n = 8 * elems;
                    let operand: Vec<u8> = (0..elems).flat_map(|_| 1u64.to_le_bytes()).collect();
                    let res = alloc(&x.domain, 16 * 16, Access::LOCAL)?;
                    let (mut posted, mut done) = (0u64, 0u64);
                    while done < per {
                        while posted < per && posted - done < 16 {
                            let slot = (posted % 16) as usize * 16;
                            x.ep.fetch_atomic(
                                AtomicOp::Sum,
                                Datatype::U64,
                                &operand,
                                res.iov(slot, n),
                                x.to[0],
                                remote.iov(0, n),
                                posted,
                            )
                            .ctx("fetch_atomic")?;
                            posted += 1;
                        }
                        ok(ctx, &x.ep)?;
                        done += 1;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CaseError::fail("an initiator panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    let v = target.to_vec(0, 16).ctx("read")?;
    let w0 = u64::from_le_bytes(v[..8].try_into().map_err(|_| CaseError::fail("8 bytes"))?);
    let w1 = u64::from_le_bytes(v[8..].try_into().map_err(|_| CaseError::fail("8 bytes"))?);
    ensure_eq!(w0, 4 * per, "word 0 (both paths)");
    ensure_eq!(w1, 2 * per, "word 1 (emulated only)");
    Ok(())
}
