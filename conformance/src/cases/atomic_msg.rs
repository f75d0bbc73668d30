//! atomic (MSG endpoints): a provider's native atomics on connected endpoints
//! (`fi_atomic` on `FI_EP_MSG`), for providers that answer `Caps::ATOMIC`: what
//! `atomicvalid` & co. answer and that the call agrees; every combination the provider
//! claims, with values checked against a model; 4 initiators x 1,000 fetch-adds on one
//! word (exact final value, no old value seen twice); compare-and-swap contention
//! (4 initiators increment through CAS loops: exact count); and the refusals: bounds,
//! key, rights and alignment as error completions that end the connection at both
//! ends, malformed calls refused at the call.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use fabric::{
    Access, AtomicForm, AtomicMsg, AtomicOp, Caps, CompFlags, CqErrorKind, Datatype, Endpoint,
    ErrorKind, OpFlags, RemoteIov,
};

use super::semantics::expect_access_error_shutdown;
use super::{case, expect_cq_error};
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::{Ctx, Node};
use crate::pair::{wait_conn_request, wait_connected, Pair, Who};
use crate::{ensure, ensure_eq};

const G: &str = "atomic";
const NEEDS: Caps = Caps::MSG.union(Caps::RMA).union(Caps::ATOMIC);

/// The cases of this part of the group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "msg_valid", NEEDS, "MSG endpoint: atomicvalid/fetch_atomicvalid/compare_atomicvalid per (op, type): forms no provider has are None, at least one combination is offered, and a combination answered None is refused at the call with NotSupported", msg_valid),
        case(G, "msg_every_native", NEEDS, "MSG endpoint: every (op, type, form) the provider answers as native, with the old value fetched and the target's new value checked against a model, at two offsets", msg_every_native),
        case(G, "msg_four_initiators", NEEDS, "MSG endpoint: 4 initiators (threads, own connections) x 1,000 fetch-adds of u64 on one word, 16 in flight each: final value exact, no old value fetched twice", msg_four_initiators),
        case(G, "msg_cswap_contention", NEEDS, "MSG endpoint: 4 initiators each add 200 to one u64 through compare-and-swap loops: exactly 800 swaps succeed and the final value is 800", msg_cswap_contention),
        case(G, "msg_refused_at_call", NEEDS, "MSG endpoint: length mismatches, a missing or surplus result buffer, compare values outside compare_atomic, INJECT with a fetch, a result region without READ access: refused at the call, nothing posted", msg_refused_at_call),
        case(G, "msg_cpu_coherent", NEEDS, "MSG endpoint whose atomics say atomic_cpu_coherent: 2 initiators x 1,000 native fetch-adds on one u64 while a thread at the target adds 1 to the same word 2,000 times with a CPU atomic: the final value is exact (skipped where the provider does not claim it)", msg_cpu_coherent),
        case(G, "msg_access_errors", NEEDS, "MSG endpoint: out of bounds, wrong key, a region without REMOTE_WRITE: each an error completion RemoteAccess on a fresh pair, target untouched, the connection ended at both ends (Shutdown AccessError), later posts fail with NotConnected; a misaligned address either refused at the call (InvalidArgument, the connection then still works) or the same as the others with RemoteInvalid/RemoteAccess", msg_access_errors),
    ]
}

const FORMS: [AtomicForm; 3] = [AtomicForm::Plain, AtomicForm::Fetch, AtomicForm::Compare];

fn valid(ep: &Endpoint, op: AtomicOp, dt: Datatype, form: AtomicForm) -> Option<usize> {
    match form {
        AtomicForm::Plain => ep.atomicvalid(op, dt),
        AtomicForm::Fetch => ep.fetch_atomicvalid(op, dt),
        AtomicForm::Compare => ep.compare_atomicvalid(op, dt),
    }
}

fn post(ep: &Endpoint, form: AtomicForm, msg: &AtomicMsg<'_>) -> fabric::Result<()> {
    match form {
        AtomicForm::Plain => ep.atomicmsg(msg, OpFlags::COMPLETION),
        AtomicForm::Fetch => ep.fetch_atomicmsg(msg, OpFlags::COMPLETION),
        AtomicForm::Compare => ep.compare_atomicmsg(msg, OpFlags::COMPLETION),
    }
}

/// One element's value as raw bits, host order.
fn enc(dt: Datatype, v: u64) -> Vec<u8> {
    if dt.size() == 4 {
        (v as u32).to_ne_bytes().to_vec()
    } else {
        v.to_ne_bytes().to_vec()
    }
}

fn dec(b: &[u8]) -> u64 {
    match b.len() {
        4 => u32::from_ne_bytes(b.try_into().expect("4 bytes")) as u64,
        _ => u64::from_ne_bytes(b.try_into().expect("8 bytes")),
    }
}

/// The model: the target's new bits given old, operand and compare bits.
fn model(op: AtomicOp, dt: Datatype, t: u64, o: u64, c: u64) -> u64 {
    macro_rules! int {
        ($ty:ty, $uty:ty) => {{
            let (t, o, c) = (t as $uty as $ty, o as $uty as $ty, c as $uty as $ty);
            let n: $ty = match op {
                AtomicOp::Min => t.min(o),
                AtomicOp::Max => t.max(o),
                AtomicOp::Sum => t.wrapping_add(o),
                AtomicOp::Bor => t | o,
                AtomicOp::Band => t & o,
                AtomicOp::Bxor => t ^ o,
                AtomicOp::Write => o,
                AtomicOp::Cswap if t == c => o,
                _ => t,
            };
            n as $uty as u64
        }};
    }
    macro_rules! float {
        ($ty:ty, $uty:ty) => {{
            let (t, o, c) = (
                <$ty>::from_bits(t as $uty),
                <$ty>::from_bits(o as $uty),
                <$ty>::from_bits(c as $uty),
            );
            let n: $ty = match op {
                AtomicOp::Min => t.min(o),
                AtomicOp::Max => t.max(o),
                AtomicOp::Sum => t + o,
                AtomicOp::Write => o,
                AtomicOp::Cswap if t == c => o,
                _ => t,
            };
            n.to_bits() as u64
        }};
    }
    match dt {
        Datatype::U32 => int!(u32, u32),
        Datatype::I32 => int!(i32, u32),
        Datatype::U64 => int!(u64, u64),
        Datatype::I64 => int!(i64, u64),
        Datatype::F32 => float!(f32, u32),
        Datatype::F64 => float!(f64, u64),
        _ => t,
    }
}

/// Raw bits of `x` as an element of `dt`.
fn val(dt: Datatype, x: i64) -> u64 {
    match dt {
        Datatype::F32 => (x as f32).to_bits() as u64,
        Datatype::F64 => (x as f64).to_bits(),
        Datatype::U32 | Datatype::I32 => x as i32 as u32 as u64,
        _ => x as u64,
    }
}

fn msg_valid(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(NEEDS)?;
    let ep = &p.client.ep;
    let t = p.server.alloc(64, Access::REMOTE)?;
    let l = p.client.alloc(64, Access::LOCAL)?;
    let mut offered = 0;
    for op in AtomicOp::ALL {
        for dt in Datatype::ALL {
            for form in FORMS {
                let v = valid(ep, op, dt, form);
                if !form.allows(op) {
                    ensure!(
                        v.is_none(),
                        "{op:?} on {dt:?} as {form:?} answered {v:?}: no provider can"
                    );
                }
                match v {
                    Some(n) => {
                        ensure!(n >= 1, "{op:?} {dt:?} {form:?}: count {n}");
                        offered += 1;
                    }
                    None => {
                        let n = dt.size();
                        let zeros = vec![0u8; n];
                        let msg = AtomicMsg {
                            op,
                            datatype: dt,
                            operand: &zeros,
                            compare: if form == AtomicForm::Compare {
                                &zeros
                            } else {
                                &[]
                            },
                            result: (form != AtomicForm::Plain).then(|| l.iov(0, n)),
                            remote: t.remote().iov(0, n),
                            context: 1,
                        };
                        match post(ep, form, &msg) {
                            Err(e) if e.kind() == ErrorKind::NotSupported => {}
                            other => {
                                return Err(CaseError::fail(format!(
                                    "{op:?} on {dt:?} as {form:?} is not valid, yet the call gave {other:?}"
                                )))
                            }
                        }
                    }
                }
            }
        }
    }
    ensure!(
        offered > 0,
        "the provider answers ATOMIC but no combination is valid"
    );
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(50),
        "after refused calls",
    )
}

fn msg_every_native(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(NEEDS)?;
    let ep = &p.client.ep;
    let t = p.server.alloc(256, Access::REMOTE | Access::LOCAL)?;
    let res = p.client.alloc(256, Access::LOCAL)?;
    let remote = t.remote();
    let mut checked = 0;
    let mut ctxv = 100u64;
    for op in AtomicOp::ALL {
        for dt in Datatype::ALL {
            for form in FORMS {
                let Some(max) = valid(ep, op, dt, form) else {
                    continue;
                };
                let s = dt.size();
                // Two cases: a compare that hits and one that misses (compare form),
                // operands that move the value both ways otherwise.
                for (i, (start, operand, compare)) in
                    [(17i64, 5i64, 17i64), (-3, 40, 99)].into_iter().enumerate()
                {
                    let count = max.min(2);
                    let off = 64 * i + 8;
                    let (t0, o, c) = (val(dt, start), val(dt, operand), val(dt, compare));
                    let mut init = Vec::new();
                    let mut ops = Vec::new();
                    let mut cmps = Vec::new();
                    for k in 0..count as u64 {
                        init.extend(enc(dt, model(AtomicOp::Sum, dt, t0, val(dt, k as i64), 0)));
                        ops.extend(enc(dt, o));
                        cmps.extend(enc(
                            dt,
                            if k == 0 {
                                c
                            } else {
                                model(AtomicOp::Sum, dt, t0, val(dt, k as i64), 0)
                            },
                        ));
                    }
                    let n = count * s;
                    t.write_at(off, &init).ctx("init target")?;
                    res.fill(0, 256, 0xEE).ctx("fill result")?;
                    ctxv += 1;
                    let msg = AtomicMsg {
                        op,
                        datatype: dt,
                        operand: &ops,
                        compare: if form == AtomicForm::Compare {
                            &cmps
                        } else {
                            &[]
                        },
                        result: (form != AtomicForm::Plain).then(|| res.iov(off, n)),
                        remote: remote.iov(off as u64, n),
                        context: ctxv,
                    };
                    let what = format!("{op:?} on {dt:?} as {form:?} (case {i}, {count} elements)");
                    post(ep, form, &msg).ctx(&what)?;
                    let comp = p.wait_ok(Who::Client).map_err(|e| e.context(&what))?;
                    ensure_eq!(comp.context, ctxv, "{what}: context");
                    let want_flags = CompFlags::ATOMIC
                        | if form == AtomicForm::Plain {
                            CompFlags::WRITE
                        } else {
                            CompFlags::READ
                        };
                    ensure!(
                        comp.flags.contains(want_flags),
                        "{what}: completion flags {:?} lack {want_flags:?}",
                        comp.flags
                    );
                    let now = t.to_vec(off, n).ctx("read target")?;
                    let got = res.to_vec(off, n).ctx("read result")?;
                    for k in 0..count {
                        let r = k * s..(k + 1) * s;
                        let old = dec(&init[r.clone()]);
                        let want = model(op, dt, old, dec(&ops[r.clone()]), dec(&cmps[r.clone()]));
                        ensure_eq!(
                            dec(&now[r.clone()]),
                            want,
                            "{what}: element {k}: target after"
                        );
                        if form == AtomicForm::Plain {
                            ensure_eq!(
                                got[r.clone()].to_vec(),
                                vec![0xEE; s],
                                "{what}: result buffer of a non-fetching atomic touched"
                            );
                        } else {
                            ensure_eq!(
                                dec(&got[r.clone()]),
                                old,
                                "{what}: element {k}: fetched old value"
                            );
                        }
                    }
                    // Nothing around the range changed.
                    ensure_eq!(
                        t.to_vec(off - 8, 8).ctx("read")?,
                        vec![0; 8],
                        "{what}: bytes before the range"
                    );
                    checked += 1;
                }
            }
        }
    }
    ensure!(checked > 0, "no native combination to check");
    Ok(())
}

/// A server with `n` clients connected to it, each client on its own node.
struct Star {
    server: Node,
    accepted: Vec<Endpoint>,
    clients: Vec<(Node, Endpoint)>,
    _pep: fabric::PassiveEndpoint,
}

fn star(ctx: &Ctx, n: usize) -> Result<Star, CaseError> {
    let t = ctx.timeout();
    let l = ctx.listen(NEEDS, None)?;
    let mut clients = Vec::new();
    let mut accepted = Vec::new();
    for i in 0..n {
        let c = ctx.connect(NEEDS, None, &l.addr, &[])?;
        let req = wait_conn_request(&l.node, &[&c.node], t)
            .map_err(|e| e.context(format!("client {i}")))?;
        let ep = l
            .node
            .domain
            .endpoint(
                &req.info,
                fabric::EndpointConfig::new(&l.node.cq, &l.node.eq),
            )
            .ctx("open server endpoint")?;
        ep.accept(&[]).ctx("accept")?;
        wait_connected(&c.node, &c.ep, &[&l.node], t)
            .map_err(|e| e.context(format!("client {i}")))?;
        wait_connected(&l.node, &ep, &[&c.node], t)
            .map_err(|e| e.context(format!("server for {i}")))?;
        accepted.push(ep);
        clients.push((c.node, c.ep));
    }
    Ok(Star {
        server: l.node,
        accepted,
        clients,
        _pep: l.pep,
    })
}

/// Runs `work` on each client in its own thread while this thread drives the server's
/// queues (manual progress) until all are done.
/// The 64-byte region on the star's server that the initiators' atomics target.
fn server_target(s: &Star) -> Result<fabric::MemoryRegion, CaseError> {
    s.server
        .domain
        .alloc(64, Access::REMOTE | Access::LOCAL)
        .ctx("target")
}

fn run_clients<T: Send>(
    s: Star,
    work: impl Fn(usize, &Node, &Endpoint) -> Result<T, CaseError> + Sync,
) -> Result<(Vec<T>, Node), CaseError> {
    let Star {
        server,
        accepted,
        clients,
        _pep,
    } = s;
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = std::thread::scope(|sc| {
        let work = &work;
        let hs: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, (node, ep))| sc.spawn(move || work(i, &node, &ep)))
            .collect();
        while !hs.iter().all(|h| h.is_finished()) && Instant::now() < deadline {
            let mut v = Vec::new();
            let _ = server.cq.sread(&mut v, 256, Some(Duration::from_millis(1)));
            let _ = server.eq.read();
        }
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CaseError::fail("an initiator panicked")))
            })
            .collect::<Result<Vec<T>, CaseError>>()
    });
    drop(accepted);
    Ok((out?, server))
}

fn need_u64(ctx: &Ctx, form: AtomicForm, op: AtomicOp) -> CaseResult {
    let p = ctx.pair(NEEDS)?;
    if valid(&p.client.ep, op, Datatype::U64, form).is_none() {
        return Err(CaseError::skip(format!(
            "the provider has no native {op:?} on u64 as {form:?}"
        )));
    }
    Ok(())
}

fn read_u64(mr: &fabric::MemoryRegion, off: usize) -> Result<u64, CaseError> {
    Ok(dec(&mr.to_vec(off, 8).ctx("read")?))
}

/// Posts `per` fetch-adds of 1 to `remote` from one initiator, at most 16 in flight,
/// and returns the old values fetched, in completion order.
fn fetch_add_ones(
    node: &Node,
    ep: &Endpoint,
    remote: fabric::RemoteIov,
    per: u64,
    t: Duration,
) -> Result<Vec<u64>, CaseError> {
    let res = node.domain.alloc(8 * 16, Access::LOCAL).ctx("result")?;
    let one = node.domain.alloc(8, Access::LOCAL).ctx("operand")?;
    one.write_at(0, &1u64.to_ne_bytes()).ctx("operand")?;
    let mut seen = Vec::new();
    let (mut posted, mut done) = (0u64, 0u64);
    while done < per {
        while posted < per && posted - done < 16 {
            let slot = (posted % 16) as usize * 8;
            ep.fetch_atomic(
                AtomicOp::Sum,
                Datatype::U64,
                one.iov(0, 8),
                res.iov(slot, 8),
                remote,
                posted,
            )
            .ctx("fetch_atomic")?;
            posted += 1;
        }
        let c = node.wait_completion(&[], t)?;
        c.status
            .map_err(|e| CaseError::fail(format!("fetch-add {}: {e}", c.context)))?;
        seen.push(read_u64(&res, (c.context % 16) as usize * 8)?);
        done += 1;
    }
    Ok(seen)
}

fn msg_four_initiators(ctx: &Ctx) -> CaseResult {
    need_u64(ctx, AtomicForm::Fetch, AtomicOp::Sum)?;
    let per = 1000u64;
    let s = star(ctx, 4)?;
    let target = server_target(&s)?;
    target.write_at(8, &7u64.to_ne_bytes()).ctx("init")?;
    let remote = target.remote().iov(8, 8);
    let t = ctx.timeout();
    let (seen, _server) = run_clients(s, |_, node, ep| fetch_add_ones(node, ep, remote, per, t))?;
    let mut all = HashSet::new();
    for v in seen.into_iter().flatten() {
        ensure!(all.insert(v), "old value {v} fetched twice");
    }
    ensure_eq!(all.len() as u64, 4 * per, "distinct old values");
    ensure!(
        all.iter().all(|v| (7..7 + 4 * per).contains(v)),
        "an old value outside 7..{}",
        7 + 4 * per
    );
    ensure_eq!(read_u64(&target, 8)?, 7 + 4 * per, "final value");
    Ok(())
}

fn msg_cswap_contention(ctx: &Ctx) -> CaseResult {
    need_u64(ctx, AtomicForm::Compare, AtomicOp::Cswap)?;
    let per = 200u64;
    let s = star(ctx, 4)?;
    let target = server_target(&s)?;
    let remote = target.remote().iov(16, 8);
    let t = ctx.timeout();
    let (wins, _server) = run_clients(s, |i, node, ep| {
        let res = node.domain.alloc(8, Access::LOCAL).ctx("result")?;
        let mut guess = 0u64;
        let (mut won, mut tries) = (0u64, 0u64);
        while won < per {
            tries += 1;
            ensure!(
                tries < 200_000,
                "initiator {i}: {tries} tries for {won} swaps"
            );
            let msg = AtomicMsg {
                op: AtomicOp::Cswap,
                datatype: Datatype::U64,
                operand: &(guess + 1).to_ne_bytes(),
                compare: &guess.to_ne_bytes(),
                result: Some(res.iov(0, 8)),
                remote,
                context: tries,
            };
            ep.compare_atomicmsg(&msg, OpFlags::COMPLETION)
                .ctx("compare_atomic")?;
            let c = node.wait_completion(&[], t)?;
            c.status
                .map_err(|e| CaseError::fail(format!("compare-swap: {e}")))?;
            let old = read_u64(&res, 0)?;
            if old == guess {
                won += 1;
                guess += 1;
            } else {
                // The counter only grows: what we see now is past what we saw.
                ensure!(old > guess, "initiator {i}: value went back to {old}");
                guess = old;
            }
        }
        Ok(won)
    })?;
    ensure_eq!(wins.iter().sum::<u64>(), 4 * per, "successful swaps");
    ensure_eq!(read_u64(&target, 16)?, 4 * per, "final value");
    Ok(())
}

fn msg_cpu_coherent(ctx: &Ctx) -> CaseResult {
    {
        let p = ctx.pair(NEEDS)?;
        let ep = &p.client.ep;
        if ep.fetch_atomicvalid(AtomicOp::Sum, Datatype::U64).is_none() {
            return Err(CaseError::skip("no native u64 fetch-add"));
        }
        if !ep.atomic_cpu_coherent() {
            return Err(CaseError::skip(
                "the provider's atomics are not coherent with CPU atomics (atomic_cpu_coherent)",
            ));
        }
    }
    let per = 1000u64;
    let s = star(ctx, 2)?;
    let target = server_target(&s)?;
    let remote = target.remote().iov(24, 8);
    // SAFETY: offset 24 of a live page-aligned region is an aligned u64; everyone
    // touches it through atomic instructions only while the case runs.
    let word = unsafe { &*(target.as_ptr().add(24) as *const std::sync::atomic::AtomicU64) };
    let t = ctx.timeout();
    let (r, cpu) = std::thread::scope(|sc| {
        let cpu = sc.spawn(|| {
            let mut n = 0u64;
            while n < 2 * per {
                word.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                n += 1;
                if n.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
            n
        });
        let r = run_clients(s, |_, node, ep| {
            fetch_add_ones(node, ep, remote, per, t).map(|_| ())
        });
        (r, cpu.join().unwrap_or(0))
    });
    r?;
    ensure_eq!(cpu, 2 * per, "CPU adds");
    ensure_eq!(
        read_u64(&target, 24)?,
        4 * per,
        "final value (2,000 native + 2,000 CPU adds)"
    );
    Ok(())
}

fn msg_refused_at_call(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(NEEDS)?;
    let ep = &p.client.ep;
    let Some((op, dt, _)) = AtomicOp::ALL
        .into_iter()
        .flat_map(|o| Datatype::ALL.into_iter().map(move |d| (o, d)))
        .find_map(|(o, d)| valid(ep, o, d, AtomicForm::Fetch).map(|_| (o, d, AtomicForm::Fetch)))
    else {
        return Err(CaseError::skip("no native fetching atomic"));
    };
    let t = p.server.alloc(64, Access::REMOTE)?;
    t.fill(0, 64, 0x3C).ctx("fill")?;
    let res = p.client.alloc(64, Access::LOCAL)?;
    let no_read = p.client.alloc(64, Access::SEND | Access::RECV)?;
    let n = dt.size();
    let operand = vec![1u8; n];
    let good = AtomicMsg {
        op,
        datatype: dt,
        operand: &operand,
        compare: &[],
        result: Some(res.iov(0, n)),
        remote: t.remote().iov(0, n),
        context: 9,
    };
    let longer = vec![1u8; n + 1];
    let tries: Vec<(&str, fabric::Result<()>)> = vec![
        (
            "remote length differs",
            ep.fetch_atomicmsg(
                &AtomicMsg {
                    remote: t.remote().iov(0, n * 2),
                    ..good
                },
                OpFlags::COMPLETION,
            ),
        ),
        (
            "operand not whole elements",
            ep.fetch_atomicmsg(
                &AtomicMsg {
                    operand: &longer,
                    remote: t.remote().iov(0, n + 1),
                    ..good
                },
                OpFlags::COMPLETION,
            ),
        ),
        (
            "empty operand",
            ep.fetch_atomicmsg(
                &AtomicMsg {
                    operand: &[],
                    remote: t.remote().iov(0, 0),
                    ..good
                },
                OpFlags::COMPLETION,
            ),
        ),
        (
            "no result buffer",
            ep.fetch_atomicmsg(
                &AtomicMsg {
                    result: None,
                    ..good
                },
                OpFlags::COMPLETION,
            ),
        ),
        (
            "result length differs",
            ep.fetch_atomicmsg(
                &AtomicMsg {
                    result: Some(res.iov(0, n * 2)),
                    ..good
                },
                OpFlags::COMPLETION,
            ),
        ),
        (
            "compare values on a fetch",
            ep.fetch_atomicmsg(
                &AtomicMsg {
                    compare: &operand,
                    ..good
                },
                OpFlags::COMPLETION,
            ),
        ),
        (
            "INJECT with a fetch",
            ep.fetch_atomicmsg(&good, OpFlags::INJECT),
        ),
        (
            "result region without READ",
            ep.fetch_atomicmsg(
                &AtomicMsg {
                    result: Some(no_read.iov(0, n)),
                    ..good
                },
                OpFlags::COMPLETION,
            ),
        ),
        (
            "result buffer on a non-fetching atomic",
            ep.atomicmsg(&good, OpFlags::COMPLETION),
        ),
        (
            "REMOTE_CQ_DATA",
            ep.fetch_atomicmsg(&good, OpFlags::COMPLETION | OpFlags::REMOTE_CQ_DATA),
        ),
    ];
    for (what, r) in tries {
        match r {
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::InvalidArgument | ErrorKind::AccessDenied | ErrorKind::NotSupported
                ) => {}
            other => {
                return Err(CaseError::fail(format!(
                    "{what}: accepted or wrong error: {other:?}"
                )))
            }
        }
    }
    p.expect_no_completion(
        Who::Client,
        Duration::from_millis(50),
        "after refused calls",
    )?;
    ensure_eq!(
        t.to_vec(0, 64).ctx("read")?,
        vec![0x3C; 64],
        "target untouched"
    );
    // The pair still works.
    ep.fetch_atomicmsg(&good, OpFlags::COMPLETION)
        .ctx("a good call")?;
    p.wait_ok(Who::Client)?;
    Ok(())
}

fn msg_access_errors(ctx: &Ctx) -> CaseResult {
    let probe = ctx.pair(NEEDS)?;
    let Some((op, dt)) = [
        (AtomicOp::Sum, Datatype::U64),
        (AtomicOp::Sum, Datatype::I64),
    ]
    .into_iter()
    .chain(
        AtomicOp::ALL
            .into_iter()
            .flat_map(|o| Datatype::ALL.into_iter().map(move |d| (o, d))),
    )
    .find(|(o, d)| probe.client.ep.fetch_atomicvalid(*o, *d).is_some()) else {
        return Err(CaseError::skip("no native fetching atomic"));
    };
    drop(probe);
    let n = dt.size();
    let cases: [(&str, CqErrorKind); 4] = [
        ("out of bounds", CqErrorKind::RemoteAccess),
        ("wrong key", CqErrorKind::RemoteAccess),
        ("no REMOTE_WRITE", CqErrorKind::RemoteAccess),
        ("misaligned", CqErrorKind::RemoteInvalid),
    ];
    for (what, kind) in cases {
        let p: Pair = ctx.pair(NEEDS).map_err(|e| e.context(what))?;
        let rights = if what == "no REMOTE_WRITE" {
            Access::REMOTE_READ | Access::LOCAL
        } else {
            Access::REMOTE | Access::LOCAL
        };
        let t = p.server.alloc(64, rights)?;
        t.fill(0, 64, 0x5A).ctx("fill")?;
        let res = p.client.alloc(64, Access::LOCAL)?;
        let r = t.remote();
        let remote = match what {
            "out of bounds" => r.iov(64 - n as u64 + 8, n),
            "wrong key" => RemoteIov {
                key: r.key ^ 0x5A5A_5A5A,
                ..r.iov(0, n)
            },
            "misaligned" => r.iov(4 + 8, n),
            _ => r.iov(8, n),
        };
        let operand = vec![1u8; n];
        let msg = AtomicMsg {
            op,
            datatype: dt,
            operand: &operand,
            compare: &[],
            result: Some(res.iov(0, n)),
            remote,
            context: 77,
        };
        match p.client.ep.fetch_atomicmsg(&msg, OpFlags::COMPLETION) {
            Err(e) if what == "misaligned" && e.kind() == ErrorKind::InvalidArgument => {
                // Refused at the call: nothing happened, the connection still works.
                p.expect_no_completion(Who::Client, Duration::from_millis(50), what)?;
                let ok = AtomicMsg {
                    remote: r.iov(8, n),
                    ..msg
                };
                p.client
                    .ep
                    .fetch_atomicmsg(&ok, OpFlags::COMPLETION)
                    .ctx("aligned, after the refusal")?;
                p.wait_ok(Who::Client).map_err(|e| e.context(what))?;
                ensure_eq!(
                    res.to_vec(0, n).ctx("read")?,
                    t.to_vec(0, n).ctx("read")?,
                    "{what}: the old value fetched after the refusal"
                );
                continue;
            }
            r => r.ctx(what)?,
        }
        let c = p.wait(Who::Client).map_err(|e| e.context(what))?;
        ensure_eq!(c.context, 77, "{what}: context");
        if what == "misaligned" {
            // A provider may refuse alignment as an invalid request or as an access
            // error; either way the connection ends.
            match &c.status {
                Err(e)
                    if matches!(
                        e.kind,
                        CqErrorKind::RemoteInvalid | CqErrorKind::RemoteAccess
                    ) => {}
                _ => expect_cq_error(&c, kind, what)?,
            }
        } else {
            expect_cq_error(&c, kind, what)?;
        }
        ensure_eq!(
            t.to_vec(0, 64).ctx("read")?,
            vec![0x5A; 64],
            "{what}: target untouched"
        );
        expect_access_error_shutdown(&p, r.iov(0, 8)).map_err(|e| e.context(what))?;
    }
    Ok(())
}
