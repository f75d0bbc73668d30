//! Capsule fuzzing through the public API, fixed seed: at least 100,000 random and
//! mutated I/O command capsules (release builds; 5,000 in debug builds) sent raw on
//! an I/O queue. Every mutation has the status the NVMe base and NVMe-oF specs give
//! it, checked; fully random capsules must get a response with their CID and queue,
//! DNR on failure, and never succeed with an opcode the target does not implement.
//! Good commands through the block API are interleaved, and at the end the
//! namespace holds exactly what the good writes put there: no fuzzed capsule
//! changed data, nothing panicked, and the target still serves.
mod common;
use common::*;

use std::time::{Duration, Instant};

use nvmeof::host::Controller;
use nvmeof::wire::opcodes::{IoCommand, IoOpcode};
use nvmeof::wire::sqe::Dptr;
use nvmeof::wire::{CqeRepr, SglRepr, SqeRepr, StatusCode, StatusContext};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// I/O opcodes the target implements (and 0x7F, Fabrics).
const KNOWN: [u8; 9] = [0x00, 0x01, 0x02, 0x05, 0x08, 0x09, 0x0C, 0x19, 0x7F];
const BS: usize = 512;

/// A valid command of a random kind that needs no RMA: Write with one block of
/// in-capsule data, Verify, Write Zeroes or Flush of namespace 1.
fn template(rng: &mut Rng) -> (Vec<u8>, IoOpcode) {
    let op = match rng.below(4) {
        0 => IoOpcode::Write,
        1 => IoOpcode::Verify,
        2 => IoOpcode::WriteZeroes,
        _ => IoOpcode::Flush,
    };
    let write = op == IoOpcode::Write;
    let sgl = if write {
        SglRepr::InCapsule {
            offset: 0,
            length: BS as u32,
        }
    } else {
        SglRepr::Keyed(nvmeof::wire::KeyedSgl::new(0, 0, 0, false).unwrap())
    };
    let mut sqe = SqeRepr {
        opcode: op.into(),
        nsid: 1,
        dptr: Dptr::Sgl(sgl),
        ..Default::default()
    };
    if op != IoOpcode::Flush {
        IoCommand {
            // Zeroing and writing stay in the first half; fuzzed writes never land.
            slba: NS_BLOCKS / 2 + rng.below(NS_BLOCKS / 2 - 8),
            nlb: rng.below(8) as u16 * u16::from(!write),
            ..Default::default()
        }
        .apply(&mut sqe);
    }
    let mut capsule = sqe.to_bytes().to_vec();
    if write {
        capsule.extend((0..BS).map(|_| rng.next() as u8));
    }
    (capsule, op)
}

/// One mutation of a valid template and the status it must get.
fn mutate(rng: &mut Rng, c: &mut [u8], op: IoOpcode) -> Option<StatusCode> {
    let ranged = op != IoOpcode::Flush;
    loop {
        return Some(match rng.below(8) {
            0 => {
                let mut o = rng.next() as u8;
                while KNOWN.contains(&o) {
                    o = rng.next() as u8;
                }
                c[0] = o;
                StatusCode::InvalidOpcode
            }
            1 => {
                let mut n = rng.next() as u32;
                while n == 1 || n == u32::MAX {
                    n = rng.next() as u32;
                }
                c[4..8].copy_from_slice(&n.to_le_bytes());
                StatusCode::InvalidNamespaceOrFormat
            }
            2 if ranged => {
                let slba = NS_BLOCKS + rng.below(u64::MAX - NS_BLOCKS);
                c[40..48].copy_from_slice(&slba.to_le_bytes());
                StatusCode::LbaOutOfRange
            }
            3 => {
                c[1] |= ((rng.below(15) + 1) as u8) << 2; // reserved flag bits 2..5
                StatusCode::InvalidField
            }
            4 => {
                c[1] &= !0xC0; // PSDT 0: PRPs
                StatusCode::InvalidField
            }
            5 => {
                c[1] |= (rng.below(3) + 1) as u8; // fused
                StatusCode::InvalidField
            }
            6 => {
                c[39] = ((rng.below(10) + 6) as u8) << 4 | (c[39] & 0x0F); // types 6..=F
                StatusCode::SglDescriptorTypeInvalid
            }
            7 if op == IoOpcode::Write => {
                // In-capsule length other than the one block.
                let mut len = rng.below(BS as u64 + 1) as u32;
                if len == BS as u32 {
                    len = 0;
                }
                c[32..36].copy_from_slice(&len.to_le_bytes());
                StatusCode::DataSglLengthInvalid
            }
            _ => continue,
        });
    }
}

fn raw(ctrl: &Controller, capsule: &[u8]) -> CqeRepr {
    ctrl.io_queue(0)
        .unwrap()
        .execute_raw(capsule)
        .expect("every capsule gets a response")
}

fn fuzz(provider: &str, count: u64, seed: u64) {
    let s = setup(provider);
    let ctrl = s.connect();
    let ns = ctrl.namespace(1).unwrap();
    let mut rng = Rng(seed);
    let mut shadow = s
        .target
        .read_namespace(SUBNQN, 1, 0, NS_BLOCKS as usize * BS)
        .unwrap();
    let start = Instant::now();
    let (mut mutated, mut random, mut good) = (0u64, 0u64, 0u64);
    for i in 0..count {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{i} capsules in 300 s: too slow"
        );
        if i % 997 == 0 {
            // A good command through the block API, data checked.
            let slba = rng.below(NS_BLOCKS / 2 - 8);
            let data = pattern(i, 4 * BS);
            ctrl.write(&ns, slba, &data, false).unwrap();
            shadow[slba as usize * BS..][..data.len()].copy_from_slice(&data);
            let mut back = vec![0u8; data.len()];
            ctrl.read(&ns, slba, &mut back).unwrap();
            assert_eq!(back, data);
            good += 1;
        }
        let (mut c, op) = template(&mut rng);
        match rng.below(10) {
            // Fully random SQE bytes (the CID is the host's).
            0..=2 => {
                for b in c[..64].iter_mut() {
                    *b = rng.next() as u8;
                }
                c.truncate(64 + rng.below(2) as usize * BS);
                let cqe = raw(&ctrl, &c);
                assert_eq!(cqe.sq_id, 1);
                if cqe.status.is_success() {
                    assert!(KNOWN.contains(&c[0]), "opcode {:#x} succeeded", c[0]);
                } else {
                    assert!(cqe.status.dnr, "{cqe:?}");
                }
                random += 1;
            }
            // One mutation of a valid command: its exact status.
            3..=8 => {
                let want = mutate(&mut rng, &mut c, op).unwrap();
                let cqe = raw(&ctrl, &c);
                assert!(cqe.status.dnr, "{cqe:?}");
                assert_eq!(
                    cqe.status.code(StatusContext::Io),
                    want,
                    "capsule {i}: {:02x?}",
                    &c[..64]
                );
                mutated += 1;
            }
            // The valid template itself.
            _ => {
                let cqe = raw(&ctrl, &c);
                assert!(cqe.status.is_success(), "{op:?}: {cqe:?}");
                let io = IoCommand::from_sqe(
                    &SqeRepr::parse(&nvmeof::wire::Sqe::new_checked(&c[..64]).unwrap()).unwrap(),
                );
                let at = io.slba as usize * BS;
                match op {
                    IoOpcode::Write => shadow[at..at + BS].copy_from_slice(&c[64..64 + BS]),
                    IoOpcode::WriteZeroes => {
                        shadow[at..at + io.block_count() as usize * BS].fill(0)
                    }
                    _ => {}
                }
                good += 1;
            }
        }
    }
    let now = s
        .target
        .read_namespace(SUBNQN, 1, 0, NS_BLOCKS as usize * BS)
        .unwrap();
    assert!(
        now == shadow,
        "the namespace holds only what good commands wrote"
    );
    // Still serving, on the same connection and on a new one.
    let data = pattern(7, 8 * BS);
    ctrl.write(&ns, 3, &data, true).unwrap();
    let again = s.connect();
    let mut back = vec![0u8; data.len()];
    again.read(&ns, 3, &mut back).unwrap();
    assert_eq!(back, data);
    eprintln!(
        "{provider}: {count} capsules ({mutated} mutated, {random} random, {good} good) in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

fn count(release: u64) -> u64 {
    if cfg!(debug_assertions) {
        5_000
    } else {
        release
    }
}

#[test]
fn fuzz_capsules_over_tcp() {
    fuzz("tcp", count(100_000), 0x5EED_0001);
}

#[test]
fn fuzz_capsules_over_softroce() {
    fuzz("softroce", count(20_000), 0x5EED_0002);
}
