//! Many commands in flight on one queue, over softroce and tcp: completions that come
//! back out of order are matched by command ID, and every command's data is checked.
mod common;
use common::*;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use nvmeof::host::{Data, HostQueue, IoFuture, IoRequest};
use nvmeof::wire::opcodes::{IoCommand, IoOpcode};
use nvmeof::wire::SqeRepr;
use nvmeof::wire::StatusCode;

const BS: usize = 512;

fn sqe(op: IoOpcode, slba: u64, blocks: usize) -> SqeRepr {
    let mut sqe = SqeRepr {
        opcode: op.into(),
        nsid: 1,
        ..Default::default()
    };
    IoCommand {
        slba,
        nlb: (blocks - 1) as u16,
        ..Default::default()
    }
    .apply(&mut sqe);
    sqe
}

fn write(q: &mut HostQueue, slba: u64, data: &[u8]) -> u16 {
    q.submit(sqe(IoOpcode::Write, slba, data.len() / BS), Data::Out(data))
        .expect("submit write")
}

fn read(q: &mut HostQueue, slba: u64, blocks: usize) -> u16 {
    q.submit(sqe(IoOpcode::Read, slba, blocks), Data::In(blocks * BS))
        .expect("submit read")
}

/// A Write whose 64 KiB the target must fetch by RMA read, then a Read right behind
/// it: the target serves the Read while the Write's data is on its way, so the Read
/// completes first. The host gets both, matched by command ID, with the right data.
fn out_of_order_completions(provider: &str) {
    let s = setup(provider);
    let ctrl = s.connect();
    let mut q = ctrl.io_queue(0).unwrap();
    let known = pattern(7, 4096);
    let cid = write(&mut q, 4000, &known);
    assert!(q.complete(cid).unwrap().0.status.is_success());

    const TRIALS: u64 = 10;
    let mut read_first = 0;
    for t in 0..TRIALS {
        let big = pattern(1000 + t, 64 << 10);
        let w = write(&mut q, 0, &big);
        let r = read(&mut q, 4000, known.len() / BS);
        assert_ne!(w, r);
        let mut order = Vec::new();
        for _ in 0..2 {
            let (cid, cqe, data) = q.complete_any().unwrap();
            assert!(cqe.status.is_success(), "command {cid}: {:?}", cqe.status);
            if cid == r {
                assert_eq!(data, known, "trial {t}: the read's data");
            } else {
                assert_eq!(cid, w, "trial {t}: a completion for neither command");
                assert!(data.is_empty(), "a write returns no data");
            }
            order.push(cid);
        }
        assert_eq!(q.outstanding(), 0);
        if order == [r, w] {
            read_first += 1;
        }
        assert_eq!(
            s.target.read_namespace(SUBNQN, 1, 0, big.len()).unwrap(),
            big,
            "trial {t}: the write's data in the back end"
        );
    }
    // The Read's capsule is in the target's receive queue before the Write's data can
    // come back (the host sends both before it drives its endpoint again), so the
    // Read goes first unless the target served the Write to the end before looking.
    assert!(
        read_first >= TRIALS / 2,
        "the read completed first in only {read_first} of {TRIALS} trials: the queue \
         serves its commands one at a time"
    );
    eprintln!("{provider}: the read completed first in {read_first} of {TRIALS} trials");
    drop(q);
    ctrl.disconnect().unwrap();
}

struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Queue depth 32 of mixed reads and writes of 1-64 blocks (in-capsule and keyed
/// writes) over 64 regions, one command per region at a time: every read is checked
/// against what the region holds, and at the end every region against the back end.
fn full_queue_data_integrity(provider: &str) {
    let s = setup(provider);
    let ctrl = s.connect();
    let mut q = ctrl.io_queue(1).unwrap();
    let depth = usize::from(q.depth());
    assert!(depth >= 16, "the queue has only {depth} entries");

    const REGIONS: u64 = 64;
    const REGION_BLOCKS: usize = 64;
    const COMMANDS: u64 = 1500;
    let mut model: Vec<Vec<u8>> = vec![vec![0u8; REGION_BLOCKS * BS]; REGIONS as usize];
    // Command ID -> (region, what a read must return, or the bytes a write wrote).
    let mut inflight: HashMap<u16, (usize, bool, Vec<u8>)> = HashMap::new();
    let mut busy = [false; REGIONS as usize];
    let mut rng = Xorshift(0x5DEECE66D);
    let (mut reads, mut writes, mut out_of_order, mut max_inflight) = (0, 0, 0, 0);
    let mut submitted: Vec<u16> = Vec::new();

    let reap = |q: &mut HostQueue,
                inflight: &mut HashMap<u16, (usize, bool, Vec<u8>)>,
                busy: &mut [bool],
                model: &mut [Vec<u8>],
                submitted: &mut Vec<u16>,
                out_of_order: &mut u32| {
        let (cid, cqe, data) = q.complete_any().unwrap();
        assert!(cqe.status.is_success(), "command {cid}: {:?}", cqe.status);
        let (region, is_read, bytes) = inflight.remove(&cid).expect("a command in flight");
        if submitted.first() != Some(&cid) {
            *out_of_order += 1;
        }
        submitted.retain(|&c| c != cid);
        if is_read {
            assert_eq!(data.len(), bytes.len(), "read of region {region}");
            assert!(data == bytes, "read of region {region}: wrong data");
        } else {
            assert!(data.is_empty());
            model[region][..bytes.len()].copy_from_slice(&bytes);
        }
        busy[region] = false;
    };

    for i in 0..COMMANDS {
        let region = (rng.next() % REGIONS) as usize;
        while busy[region] || inflight.len() >= depth {
            reap(
                &mut q,
                &mut inflight,
                &mut busy,
                &mut model,
                &mut submitted,
                &mut out_of_order,
            );
        }
        let blocks = 1 + (rng.next() % REGION_BLOCKS as u64) as usize;
        let slba = region as u64 * REGION_BLOCKS as u64;
        let cid = if rng.next().is_multiple_of(2) {
            let bytes = pattern(i, blocks * BS);
            writes += 1;
            let cid = write(&mut q, slba, &bytes);
            inflight.insert(cid, (region, false, bytes));
            cid
        } else {
            reads += 1;
            let cid = read(&mut q, slba, blocks);
            inflight.insert(cid, (region, true, model[region][..blocks * BS].to_vec()));
            cid
        };
        busy[region] = true;
        submitted.push(cid);
        max_inflight = max_inflight.max(inflight.len());
    }
    while !inflight.is_empty() {
        reap(
            &mut q,
            &mut inflight,
            &mut busy,
            &mut model,
            &mut submitted,
            &mut out_of_order,
        );
    }
    assert!(
        reads > 500 && writes > 500,
        "{reads} reads, {writes} writes"
    );
    assert!(
        max_inflight >= depth / 2,
        "at most {max_inflight} commands were in flight"
    );
    for (r, want) in model.iter().enumerate() {
        let at = (r * REGION_BLOCKS * BS) as u64;
        let have = s.target.read_namespace(SUBNQN, 1, at, want.len()).unwrap();
        assert!(&have == want, "region {r} in the back end");
    }
    eprintln!(
        "{provider}: {COMMANDS} commands, up to {max_inflight} in flight, \
         {out_of_order} completed before an older one"
    );
    drop(q);
    ctrl.disconnect().unwrap();
}

/// Polls every future until all have resolved (at most 30 s); their outputs, and the
/// order in which they resolved (indices).
fn join_all(mut futs: Vec<IoFuture<'_>>) -> (Vec<nvmeof::Result<Vec<u8>>>, Vec<usize>) {
    let mut out: Vec<Option<nvmeof::Result<Vec<u8>>>> = futs.iter().map(|_| None).collect();
    let mut order = Vec::new();
    let mut cx = Context::from_waker(Waker::noop());
    let deadline = Instant::now() + Duration::from_secs(30);
    while order.len() < futs.len() {
        assert!(
            Instant::now() < deadline,
            "futures still pending after 30 s"
        );
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Poll::Ready(r) = Pin::new(f).poll(&mut cx) {
                out[i] = Some(r);
                order.push(i);
            }
        }
    }
    (out.into_iter().map(Option::unwrap).collect(), order)
}

/// The async host API: 100 futures on one queue of 32 entries (more wait for a
/// slot); writes whose data the target fetches (8 KiB) interleaved with reads of
/// earlier data resolve in the order the target answers, each with its own data;
/// a bad command fails alone; a dropped in-flight future frees its slot.
fn async_futures(provider: &str) {
    let s = setup(provider);
    let ctrl = s.connect();
    let ns = ctrl.namespace(1).unwrap();
    let depth = usize::from(ctrl.io_queue(0).unwrap().depth());
    const N: u64 = 50;
    const BLOCKS: u32 = 16;
    let at = |i: u64| i * u64::from(BLOCKS);
    let data = |seed: u64| pattern(seed, BLOCKS as usize * BS);

    // Phase 1: N writes, more than the queue holds at once.
    let futs = (0..N)
        .map(|i| {
            let req = IoRequest::Write {
                slba: at(i),
                data: data(i),
                fua: false,
            };
            ctrl.submit_async(0, &ns, &req)
        })
        .collect();
    let (results, _) = join_all(futs);
    for (i, r) in results.into_iter().enumerate() {
        assert!(r.unwrap().is_empty(), "write {i}");
    }

    // Phase 2: writes to new places interleaved with reads of phase 1, and one
    // read beyond the end of the namespace.
    let mut reqs = Vec::new();
    for i in 0..N {
        reqs.push(IoRequest::Write {
            slba: at(N + i),
            data: data(1000 + i),
            fua: false,
        });
        reqs.push(IoRequest::Read {
            slba: at(i),
            blocks: BLOCKS,
        });
    }
    reqs.push(IoRequest::Read {
        slba: ns.blocks,
        blocks: 1,
    });
    let futs = reqs.iter().map(|r| ctrl.submit_async(0, &ns, r)).collect();
    let (results, order) = join_all(futs);
    let bad = results.len() - 1;
    for (k, r) in results.into_iter().enumerate() {
        if k == bad {
            let e = r.expect_err("a read beyond the end");
            assert_eq!(e.status_code(), Some(StatusCode::LbaOutOfRange), "{e}");
        } else if k % 2 == 0 {
            assert!(r.unwrap().is_empty(), "write {k}");
        } else {
            assert_eq!(r.unwrap(), data(k as u64 / 2), "read {k}");
        }
    }
    let pos: HashMap<usize, usize> = order.iter().enumerate().map(|(p, &k)| (k, p)).collect();
    let overtaken = (0..N as usize)
        .filter(|i| pos[&(2 * i + 1)] < pos[&(2 * i)])
        .count();
    assert!(
        overtaken > 0,
        "no read resolved before the write submitted just before it"
    );
    for i in 0..N {
        let have = s
            .target
            .read_namespace(SUBNQN, 1, at(N + i) * BS as u64, BLOCKS as usize * BS)
            .unwrap();
        assert_eq!(have, data(1000 + i), "phase 2 write {i} in the back end");
    }

    // A future dropped while its command is in flight: the slot comes back.
    let mut cx = Context::from_waker(Waker::noop());
    let mut f = ctrl.submit_async(
        0,
        &ns,
        &IoRequest::Read {
            slba: 0,
            blocks: BLOCKS,
        },
    );
    if Pin::new(&mut f).poll(&mut cx).is_pending() {
        assert_eq!(
            ctrl.io_queue(0).unwrap().outstanding(),
            1,
            "submitted on its first poll"
        );
    }
    drop(f);
    assert_eq!(ctrl.io_queue(0).unwrap().outstanding(), 0, "given up");
    let futs = (0..depth as u64 + 8)
        .map(|i| {
            ctrl.submit_async(
                0,
                &ns,
                &IoRequest::Read {
                    slba: at(i % N),
                    blocks: BLOCKS,
                },
            )
        })
        .collect();
    let (results, _) = join_all(futs);
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(
            r.unwrap(),
            data(i as u64 % N),
            "read {i} after a dropped future"
        );
    }
    assert_eq!(ctrl.io_queue(0).unwrap().outstanding(), 0);
    eprintln!("{provider}: {overtaken} of {N} reads resolved before the write ahead of them");
    ctrl.disconnect().unwrap();
}

over_providers!(
    out_of_order_completions,
    full_queue_data_integrity,
    async_futures
);
