//! Writes a pcap of a simulated exchange (every operation, an RNR NAK, a sequence NAK
//! after a loss) and checks every frame's ICRC with our parser and, when scapy is
//! installed, with scapy's contrib.roce (`tests/check_pcap.py`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use fabric_softroce::fault::FaultConfig;
use fabric_softroce::rc::{FlushPlacement, SendOp, WcStatus};
use fabric_softroce::wire::frame::Ipv4UdpFrame;
use fabric_softroce::wire::{Opcode, RocePacket};

fn capture() -> Vec<u8> {
    let mut sim = Sim::new(Options {
        pcap: true,
        faults: FaultConfig {
            drop: 0.05,
            ..FaultConfig::perfect(Duration::from_micros(10))
        },
        seed: 3,
        ..Options::default()
    });
    let target = mem(1 << 16);
    sim.register(1, 0x55, target);
    let src = mem_with(pattern(5000, 1), 0, fabric_softroce::rc::RemoteAccess::NONE);
    // First SEND meets no receive: RNR NAK, then the receive shows up.
    sim.qps[0]
        .post_send(send_wr(
            0,
            SendOp::SendWithImm { imm: 9 },
            seg(&src, 0, 3000),
        ))
        .unwrap();
    sim.run_until(Duration::from_millis(1), |s| {
        s.qps[0].stats().rnr_naks_received > 0
    });
    let rbuf = mem(8192);
    for i in 0..20 {
        sim.qps[1]
            .post_recv(recv_wr(i, seg(&rbuf, 0, 8192)))
            .unwrap();
    }
    let res = mem(8);
    let ops = [
        SendOp::Send,
        SendOp::Write {
            remote_va: 0,
            rkey: 0x55,
        },
        SendOp::WriteWithImm {
            remote_va: 100,
            rkey: 0x55,
            imm: 1,
        },
        SendOp::Read {
            remote_va: 0,
            rkey: 0x55,
        },
    ];
    let mut n = 1;
    for _ in 0..5 {
        for op in ops {
            sim.qps[0]
                .post_send(send_wr(n, op, seg(&src, 0, 5000)))
                .unwrap();
            n += 1;
        }
    }
    sim.qps[0]
        .post_send(send_wr(
            n,
            SendOp::CompareSwap {
                remote_va: 8,
                rkey: 0x55,
                compare: 0,
                swap: 1,
            },
            seg(&res, 0, 8),
        ))
        .unwrap();
    sim.qps[0]
        .post_send(send_wr(
            n + 1,
            SendOp::FetchAdd {
                remote_va: 8,
                rkey: 0x55,
                add: 1,
            },
            seg(&res, 0, 8),
        ))
        .unwrap();
    sim.qps[0]
        .post_send(send_wr(
            n + 2,
            SendOp::Flush {
                remote_va: 0,
                rkey: 0x55,
                len: 64,
                placement: FlushPlacement::Persistent,
            },
            None,
        ))
        .unwrap();
    let total = n as usize + 3;
    assert!(sim.run_until(Duration::from_secs(10), |s| s.completions[0].len() >= total));
    assert!(sim.completions[0]
        .iter()
        .all(|c| c.status == WcStatus::Success));
    sim.pcap.take().unwrap().into_inner().unwrap()
}

fn frames(pcap: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        out.push(&pcap[at + 16..at + 16 + len]);
        at += 16 + len;
    }
    out
}

#[test]
fn capture_verifies_with_our_parser_and_scapy() {
    let pcap = capture();
    let frames = frames(&pcap);
    let mut opcodes = std::collections::BTreeSet::new();
    for f in &frames {
        let f = Ipv4UdpFrame::new_checked(*f).expect("IPv4/UDP");
        f.verify_icrc().expect("ICRC");
        let p = RocePacket::new_checked(f.udp_payload()).expect("RoCE");
        opcodes.insert(p.opcode());
    }
    for op in [
        Opcode::RC_SEND_FIRST,
        Opcode::RC_SEND_LAST_WITH_IMMEDIATE,
        Opcode::RC_RDMA_WRITE_FIRST,
        Opcode::RC_RDMA_WRITE_LAST_WITH_IMMEDIATE,
        Opcode::RC_RDMA_READ_REQUEST,
        Opcode::RC_RDMA_READ_RESPONSE_MIDDLE,
        Opcode::RC_ACKNOWLEDGE,
        Opcode::RC_ATOMIC_ACKNOWLEDGE,
        Opcode::RC_COMPARE_SWAP,
        Opcode::RC_FETCH_ADD,
        Opcode::RC_FLUSH,
    ] {
        assert!(opcodes.contains(&op), "capture lacks {op:?}");
    }

    let has_scapy = Command::new("python3")
        .args(["-c", "import scapy.contrib.roce"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_scapy {
        println!("SKIP scapy pcap check: python3 with scapy not available (pip install scapy)");
        return;
    }
    let path = std::env::temp_dir().join(format!("softroce-{}.pcap", std::process::id()));
    std::fs::write(&path, &pcap).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/check_pcap.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&path)
        .arg(frames.len().to_string())
        .output()
        .expect("run check_pcap.py");
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scapy rejected the capture: {stdout}");
    assert!(stdout.contains(&format!("checked {} frames, 0 bad", frames.len())));
}
