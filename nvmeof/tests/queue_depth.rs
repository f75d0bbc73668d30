//! Many commands in flight on one queue, over softroce and tcp: completions that come
//! back out of order are matched by command ID, and every command's data is checked.
mod common;
use common::*;

use std::collections::HashMap;

use nvmeof::host::{Data, HostQueue};
use nvmeof::wire::opcodes::{IoCommand, IoOpcode};
use nvmeof::wire::SqeRepr;

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
        let cid = if rng.next() % 2 == 0 {
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
    assert!(reads > 500 && writes > 500, "{reads} reads, {writes} writes");
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

over_providers!(out_of_order_completions, full_queue_data_integrity);
