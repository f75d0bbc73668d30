//! Two RC queue pairs over a simulated network: every operation at many sizes and
//! MTUs, multi-MiB messages, loss recovery under seeded faults, errors.

mod common;

use std::time::Duration;

use common::*;
use fabric_softroce::fault::FaultConfig;
use fabric_softroce::rc::{
    ErrorCause, FlushPlacement, LocalMemory, Mtu, QpState, RemoteAccess, SendOp, WcOpcode, WcStatus,
};

const MTUS: [Mtu; 5] = [
    Mtu::Mtu256,
    Mtu::Mtu512,
    Mtu::Mtu1024,
    Mtu::Mtu2048,
    Mtu::Mtu4096,
];
const SIZES: [usize; 11] = [0, 1, 3, 255, 256, 257, 1000, 4096, 4097, 12_345, 65_536];

fn wait(sim: &mut Sim, side: usize, n: usize) {
    assert!(
        sim.run_until(Duration::from_secs(600), |s| s.completions[side].len() >= n),
        "side {side}: {} of {n} completions; stats {:?} {:?}",
        sim.completions[side].len(),
        sim.qps[0].stats(),
        sim.qps[1].stats()
    );
}

#[test]
fn all_operations_all_sizes_all_mtus() {
    for mtu in MTUS {
        let mut sim = Sim::new(Options {
            mtu,
            ..Options::default()
        });
        let target = mem(200_000);
        sim.register(1, 0x77, target.clone());
        for (n, &size) in SIZES.iter().enumerate() {
            let n = n as u64;
            let data = pattern(size, n + 1);
            let src = mem_with(data.clone(), 0, RemoteAccess::NONE);
            // SEND and SEND with immediate.
            for (k, imm) in [(0u64, None), (1, Some(0xABCD_0000 | n as u32))] {
                let rbuf = mem(size + 16);
                sim.qps[1]
                    .post_recv(recv_wr(100 + k, seg(&rbuf, 0, size as u32 + 16)))
                    .unwrap();
                let op = match imm {
                    None => SendOp::Send,
                    Some(imm) => SendOp::SendWithImm { imm },
                };
                let before = (sim.completions[0].len(), sim.completions[1].len());
                sim.qps[0]
                    .post_send(send_wr(k, op, seg(&src, 0, size as u32)))
                    .unwrap();
                wait(&mut sim, 0, before.0 + 1);
                wait(&mut sim, 1, before.1 + 1);
                let c = *sim.completions[1].last().unwrap();
                assert_eq!(
                    (c.status, c.opcode, c.byte_len, c.imm),
                    (WcStatus::Success, WcOpcode::Recv, size as u32, imm),
                    "{mtu:?} {size}"
                );
                assert_eq!(&rbuf.to_vec()[..size], &data[..], "{mtu:?} send {size}");
                let c = *sim.completions[0].last().unwrap();
                assert_eq!(
                    (c.status, c.opcode, c.byte_len),
                    (WcStatus::Success, WcOpcode::Send, size as u32)
                );
            }
            // WRITE and WRITE with immediate (consumes a receive).
            for (k, imm) in [(0u64, None), (1u64, Some(7u32))] {
                let va = 1000 + 3 * n;
                let op = match imm {
                    None => SendOp::Write {
                        remote_va: va,
                        rkey: 0x77,
                    },
                    Some(imm) => {
                        sim.qps[1].post_recv(recv_wr(200, None)).unwrap();
                        SendOp::WriteWithImm {
                            remote_va: va,
                            rkey: 0x77,
                            imm,
                        }
                    }
                };
                let before = (sim.completions[0].len(), sim.completions[1].len());
                sim.qps[0]
                    .post_send(send_wr(10 + k, op, seg(&src, 0, size as u32)))
                    .unwrap();
                wait(&mut sim, 0, before.0 + 1);
                let c = *sim.completions[0].last().unwrap();
                assert_eq!(
                    (c.status, c.opcode),
                    (WcStatus::Success, WcOpcode::RdmaWrite)
                );
                assert_eq!(
                    &target.to_vec()[va as usize..va as usize + size],
                    &data[..],
                    "{mtu:?} write {size}"
                );
                if imm.is_some() {
                    wait(&mut sim, 1, before.1 + 1);
                    let c = *sim.completions[1].last().unwrap();
                    assert_eq!(
                        (c.opcode, c.imm, c.byte_len),
                        (WcOpcode::RecvRdmaWithImm, Some(7), size as u32)
                    );
                }
            }
            // READ back what was written.
            let dst = mem(size + 8);
            let before = sim.completions[0].len();
            sim.qps[0]
                .post_send(send_wr(
                    20,
                    SendOp::Read {
                        remote_va: 1000 + 3 * n,
                        rkey: 0x77,
                    },
                    seg(&dst, 4, size as u32),
                ))
                .unwrap();
            wait(&mut sim, 0, before + 1);
            let c = *sim.completions[0].last().unwrap();
            assert_eq!(
                (c.status, c.opcode, c.byte_len),
                (WcStatus::Success, WcOpcode::RdmaRead, size as u32)
            );
            assert_eq!(&dst.to_vec()[4..4 + size], &data[..], "{mtu:?} read {size}");
        }
        assert_eq!(
            sim.qps[0].stats().retransmissions,
            0,
            "perfect link: no retransmissions"
        );
    }
}

#[test]
fn atomics_and_flush() {
    let mut sim = Sim::new(Options::default());
    let target = mem_with(vec![0; 64], 0x10_0000, RemoteAccess::ALL);
    sim.register(1, 5, target.clone());
    LocalMemory::write(target.as_ref(), 8, &40u64.to_ne_bytes()).unwrap();
    let res = mem(64);
    let ops = [
        (
            SendOp::FetchAdd {
                remote_va: 0x10_0008,
                rkey: 5,
                add: 2,
            },
            40u64,
        ),
        (
            SendOp::CompareSwap {
                remote_va: 0x10_0008,
                rkey: 5,
                compare: 42,
                swap: 99,
            },
            42,
        ),
        (
            SendOp::CompareSwap {
                remote_va: 0x10_0008,
                rkey: 5,
                compare: 1,
                swap: 5,
            },
            99,
        ),
        (
            SendOp::FetchAdd {
                remote_va: 0x10_0008,
                rkey: 5,
                add: u64::MAX,
            },
            99,
        ),
    ];
    for (i, (op, expect)) in ops.into_iter().enumerate() {
        sim.qps[0]
            .post_send(send_wr(i as u64, op, seg(&res, 8 * i as u64, 8)))
            .unwrap();
        wait(&mut sim, 0, i + 1);
        let c = sim.completions[0][i];
        assert_eq!((c.status, c.byte_len), (WcStatus::Success, 8));
        let mut b = [0u8; 8];
        LocalMemory::read(res.as_ref(), 8 * i as u64, &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), expect, "atomic {i}");
    }
    let mut b = [0u8; 8];
    LocalMemory::read(target.as_ref(), 8, &mut b).unwrap();
    assert_eq!(u64::from_ne_bytes(b), 98);
    // FLUSH (persistent) calls the persistence hook before answering.
    sim.qps[0]
        .post_send(send_wr(
            9,
            SendOp::Flush {
                remote_va: 0x10_0010,
                rkey: 5,
                len: 32,
                placement: FlushPlacement::Persistent,
            },
            None,
        ))
        .unwrap();
    wait(&mut sim, 0, 5);
    assert_eq!(sim.completions[0][4].opcode, WcOpcode::Flush);
    assert_eq!(sim.completions[0][4].status, WcStatus::Success);
    assert_eq!(target.persisted(), vec![(0x10, 32)]);
    // FLUSH global visibility does not call it.
    sim.qps[0]
        .post_send(send_wr(
            10,
            SendOp::Flush {
                remote_va: 0x10_0000,
                rkey: 5,
                len: 8,
                placement: FlushPlacement::Global,
            },
            None,
        ))
        .unwrap();
    wait(&mut sim, 0, 6);
    assert_eq!(sim.completions[0][5].status, WcStatus::Success);
    assert_eq!(target.persisted().len(), 1);
}

#[test]
fn multi_mib_messages() {
    let mut sim = Sim::new(Options {
        mtu: Mtu::Mtu4096,
        ..Options::default()
    });
    let size = 6 << 20;
    let data = pattern(size, 42);
    let src = mem_with(data.clone(), 0, RemoteAccess::NONE);
    let target = mem(size);
    sim.register(1, 1, target.clone());
    let rbuf = mem(size);
    sim.qps[1]
        .post_recv(recv_wr(1, seg(&rbuf, 0, size as u32)))
        .unwrap();
    sim.qps[0]
        .post_send(send_wr(1, SendOp::Send, seg(&src, 0, size as u32)))
        .unwrap();
    sim.qps[0]
        .post_send(send_wr(
            2,
            SendOp::Write {
                remote_va: 0,
                rkey: 1,
            },
            seg(&src, 0, size as u32),
        ))
        .unwrap();
    let back = mem(size);
    sim.qps[0]
        .post_send(send_wr(
            3,
            SendOp::Read {
                remote_va: 0,
                rkey: 1,
            },
            seg(&back, 0, size as u32),
        ))
        .unwrap();
    wait(&mut sim, 0, 3);
    assert!(sim.completions[0]
        .iter()
        .all(|c| c.status == WcStatus::Success));
    assert_eq!(
        sim.completions[0]
            .iter()
            .map(|c| c.wr_id)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(rbuf.to_vec() == data && target.to_vec() == data && back.to_vec() == data);
}

fn lossy(seed: u64) -> Options {
    Options {
        mtu: Mtu::Mtu1024,
        faults: FaultConfig {
            drop: 0.10,
            duplicate: 0.05,
            reorder: 0.05,
            corrupt: 0.01,
            delay: Duration::from_micros(10),
            jitter: Duration::from_micros(4),
            reorder_delay: Duration::from_micros(30),
        },
        seed,
        ..Options::default()
    }
}

/// Runs the lossy workload and returns a fingerprint of what happened.
fn lossy_workload(seed: u64, messages: usize) -> (u64, u64, u64) {
    let mut sim = Sim::new(lossy(seed));
    let target = mem(3 << 20);
    sim.register(1, 9, target.clone());
    let mut expected = Vec::new();
    let mut bufs = Vec::new();
    for i in 0..messages {
        let size = (i * 7919) % 9000;
        let data = pattern(size, i as u64);
        let rbuf = mem(9000);
        sim.qps[1]
            .post_recv(recv_wr(i as u64, seg(&rbuf, 0, 9000)))
            .unwrap();
        let src = mem_with(data.clone(), 0, RemoteAccess::NONE);
        let op = if i % 3 == 0 {
            SendOp::SendWithImm { imm: i as u32 }
        } else {
            SendOp::Send
        };
        sim.qps[0]
            .post_send(send_wr(i as u64, op, seg(&src, 0, size as u32)))
            .unwrap();
        expected.push(data);
        bufs.push(rbuf);
    }
    // Large RMA under the same faults.
    let big = pattern(2 << 20, 99);
    let bsrc = mem_with(big.clone(), 0, RemoteAccess::NONE);
    sim.qps[0]
        .post_send(send_wr(
            1_000_000,
            SendOp::Write {
                remote_va: 4096,
                rkey: 9,
            },
            seg(&bsrc, 0, big.len() as u32),
        ))
        .unwrap();
    let back = mem(big.len());
    sim.qps[0]
        .post_send(send_wr(
            1_000_001,
            SendOp::Read {
                remote_va: 4096,
                rkey: 9,
            },
            seg(&back, 0, big.len() as u32),
        ))
        .unwrap();
    // Atomics are exactly-once even when requests and responses are lost/duplicated.
    let res = mem(8);
    for k in 0..50u64 {
        sim.qps[0]
            .post_send(send_wr(
                2_000_000 + k,
                SendOp::FetchAdd {
                    remote_va: 0,
                    rkey: 9,
                    add: 1,
                },
                seg(&res, 0, 8),
            ))
            .unwrap();
    }
    wait(&mut sim, 0, messages + 52);
    wait(&mut sim, 1, messages);
    for c in &sim.completions[0] {
        assert_eq!(c.status, WcStatus::Success, "{c:?}");
    }
    let ids: Vec<u64> = sim.completions[0].iter().map(|c| c.wr_id).collect();
    let mut want: Vec<u64> = (0..messages as u64).collect();
    want.extend([1_000_000, 1_000_001]);
    want.extend((0..50).map(|k| 2_000_000 + k));
    assert_eq!(ids, want, "completions in order, each once");
    for (i, c) in sim.completions[1].iter().enumerate() {
        assert_eq!((c.wr_id, c.status), (i as u64, WcStatus::Success));
        let size = expected[i].len();
        assert_eq!(c.byte_len as usize, size);
        assert_eq!(c.imm, if i % 3 == 0 { Some(i as u32) } else { None });
        assert_eq!(&bufs[i].to_vec()[..size], &expected[i][..], "message {i}");
    }
    assert_eq!(&target.to_vec()[4096..4096 + big.len()], &big[..]);
    assert_eq!(back.to_vec(), big);
    let mut b = [0u8; 8];
    LocalMemory::read(target.as_ref(), 0, &mut b).unwrap();
    let counter = u64::from_ne_bytes(b);
    // The big write covers bytes 4096.., the counter at 0 is the atomics' alone.
    assert_eq!(counter, 50, "each FETCH_ADD applied exactly once");
    let f = sim.fault_stats(0);
    assert!(
        f.dropped > 0 && f.duplicated > 0 && f.reordered > 0 && f.corrupted > 0,
        "{f:?}"
    );
    assert!(
        sim.icrc_rejects + sim.frame_rejects > 0,
        "corrupted frames must be rejected"
    );
    let s = sim.qps[0].stats();
    assert!(s.retransmissions > 0);
    (
        s.packets_sent,
        sim.qps[1].stats().packets_sent,
        sim.now.as_nanos(),
    )
}

#[test]
fn lossy_network_delivers_everything_exactly() {
    lossy_workload(2024, 2000);
}

#[test]
fn lossy_network_is_deterministic_and_other_seeds_pass() {
    // Same seed, same run: the core and the simulation are deterministic.
    assert_eq!(lossy_workload(7, 300), lossy_workload(7, 300));
    lossy_workload(99, 300);
}

#[test]
fn vanished_peer_gives_retry_exceeded_not_a_hang() {
    let mut sim = Sim::new(Options {
        retry_cnt: 3,
        ..Options::default()
    });
    let src = mem(5000);
    sim.cut = [true, true];
    for i in 0..3 {
        sim.qps[0]
            .post_send(send_wr(i, SendOp::Send, seg(&src, 0, 5000)))
            .unwrap();
    }
    wait(&mut sim, 0, 3);
    let st: Vec<_> = sim.completions[0]
        .iter()
        .map(|c| (c.wr_id, c.status))
        .collect();
    assert_eq!(
        st,
        vec![
            (0, WcStatus::RetryExceeded),
            (1, WcStatus::Flushed),
            (2, WcStatus::Flushed)
        ]
    );
    assert_eq!(sim.qps[0].state(), QpState::Error);
    // Time-based: it gave up after MIN_GIVE_UP (2 s) of silence (timeout * (2^4 - 1)
    // = 30 ms is shorter), at the first timer expiry past it: 2 ms doubling, 10 expiries
    // (2,046 ms).
    let gave_up = Duration::from_nanos(sim.now.as_nanos());
    assert!(
        gave_up >= fabric_softroce::rc::MIN_GIVE_UP
            && gave_up < 3 * fabric_softroce::rc::MIN_GIVE_UP,
        "gave up after {gave_up:?}"
    );
    assert_eq!(sim.qps[0].stats().timeouts, 10);
    // Later work requests are flushed at once.
    sim.qps[0]
        .post_send(send_wr(7, SendOp::Send, None))
        .unwrap();
    wait(&mut sim, 0, 4);
    assert_eq!(sim.completions[0][3].status, WcStatus::Flushed);
    assert!(!sim.step() || sim.qps[0].poll_timeout().is_none());
}

#[test]
fn rnr_then_receive_posted() {
    let mut sim = Sim::new(Options {
        min_rnr_timer: 14,
        ..Options::default()
    }); // 1.28 ms
    let src = mem_with(pattern(3000, 1), 0, RemoteAccess::NONE);
    sim.qps[0]
        .post_send(send_wr(1, SendOp::Send, seg(&src, 0, 3000)))
        .unwrap();
    sim.run_until(Duration::from_millis(5), |s| {
        s.qps[0].stats().rnr_naks_received >= 2
    });
    assert!(sim.qps[0].stats().rnr_naks_received >= 2);
    assert!(sim.completions[0].is_empty());
    let rbuf = mem(3000);
    sim.qps[1]
        .post_recv(recv_wr(5, seg(&rbuf, 0, 3000)))
        .unwrap();
    wait(&mut sim, 0, 1);
    wait(&mut sim, 1, 1);
    assert_eq!(sim.completions[0][0].status, WcStatus::Success);
    assert_eq!(rbuf.to_vec(), pattern(3000, 1));
}

#[test]
fn rnr_retry_exhausted() {
    let mut sim = Sim::new(Options {
        rnr_retry: 2,
        ..Options::default()
    });
    sim.qps[0]
        .post_send(send_wr(1, SendOp::Send, None))
        .unwrap();
    sim.qps[0]
        .post_send(send_wr(2, SendOp::Send, None))
        .unwrap();
    wait(&mut sim, 0, 2);
    assert_eq!(sim.completions[0][0].status, WcStatus::RnrRetryExceeded);
    assert_eq!(sim.completions[0][1].status, WcStatus::Flushed);
    assert_eq!(sim.qps[1].stats().rnr_naks_sent, 3);
}

fn access_case(op: SendOp, access: RemoteAccess, expect: WcStatus) {
    let mut sim = Sim::new(Options::default());
    let target = mem_with(vec![0xEE; 4096], 0x8000, access);
    sim.register(1, 3, target.clone());
    let src = mem_with(vec![1; 4096], 0, RemoteAccess::NONE);
    let len = if matches!(op, SendOp::FetchAdd { .. }) {
        8
    } else {
        2048
    };
    sim.qps[0]
        .post_send(send_wr(1, op, seg(&src, 0, len)))
        .unwrap();
    sim.qps[0]
        .post_send(send_wr(2, SendOp::Send, None))
        .unwrap();
    wait(&mut sim, 0, 2);
    assert_eq!(sim.completions[0][0].status, expect, "{op:?}");
    assert_eq!(sim.completions[0][1].status, WcStatus::Flushed);
    assert_eq!(target.to_vec(), vec![0xEE; 4096], "nothing written");
    assert_eq!(sim.qps[0].state(), QpState::Error);
    assert_eq!(
        sim.qps[0].error_cause(),
        Some(ErrorCause::Requester(expect))
    );
    // As in rxe, the responder NAKs and its QP enters ERROR too: the connection ends
    // at both ends.
    assert_eq!(sim.qps[1].state(), QpState::Error);
    assert!(matches!(
        sim.qps[1].error_cause(),
        Some(ErrorCause::AccessRefused(_))
    ));
}

#[test]
fn remote_access_errors() {
    use SendOp::*;
    let bad = WcStatus::RemoteAccessError;
    access_case(
        Write {
            remote_va: 0x8000,
            rkey: 4,
        },
        RemoteAccess::ALL,
        bad,
    ); // unknown key
    access_case(
        Write {
            remote_va: 0x8000 + 3000,
            rkey: 3,
        },
        RemoteAccess::ALL,
        bad,
    ); // past the end
    access_case(
        Write {
            remote_va: 0x7000,
            rkey: 3,
        },
        RemoteAccess::ALL,
        bad,
    ); // before the start
    access_case(
        Write {
            remote_va: 0x8000,
            rkey: 3,
        },
        RemoteAccess::READ,
        bad,
    ); // no write right
    access_case(
        Read {
            remote_va: 0x8000,
            rkey: 3,
        },
        RemoteAccess::WRITE,
        bad,
    ); // no read right
    access_case(
        FetchAdd {
            remote_va: 0x8000,
            rkey: 3,
            add: 1,
        },
        RemoteAccess::READ,
        bad,
    );
    access_case(
        Write {
            remote_va: u64::MAX - 10,
            rkey: 3,
        },
        RemoteAccess::ALL,
        bad,
    ); // overflow
}

#[test]
fn receive_too_small() {
    let mut sim = Sim::new(Options::default());
    let rbuf = mem(100);
    sim.qps[1]
        .post_recv(recv_wr(1, seg(&rbuf, 0, 100)))
        .unwrap();
    sim.qps[1]
        .post_recv(recv_wr(2, seg(&rbuf, 0, 100)))
        .unwrap();
    let src = mem(5000);
    sim.qps[0]
        .post_send(send_wr(1, SendOp::Send, seg(&src, 0, 5000)))
        .unwrap();
    wait(&mut sim, 0, 1);
    wait(&mut sim, 1, 2);
    assert_eq!(sim.completions[0][0].status, WcStatus::RemoteInvalidRequest);
    assert_eq!(sim.completions[1][0].status, WcStatus::LocalLengthError);
    assert_eq!(sim.completions[1][1].status, WcStatus::Flushed);
}
