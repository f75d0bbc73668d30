//! Hostile peers against the RC core: crafted packets from a peer that holds a valid
//! R_Key, in the simulated network's queue pairs, with bounded counts. Each test states
//! what the target must hold.

mod common;

use common::*;
use fabric_softroce::rc::{Mtu, Time};
use fabric_softroce::wire::bth::DEFAULT_PKEY;
use fabric_softroce::wire::ext::RethRepr;
use fabric_softroce::wire::frame::rxe_source_port;
use fabric_softroce::wire::{BthRepr, IcrcContext, Opcode, RoceRepr};

/// A READ REQUEST for `len` bytes at `va` under `rkey` with PSN `psn`, to side 1.
fn read_request(psn: u32, va: u64, rkey: u32, len: u32) -> Vec<u8> {
    let mut r = RoceRepr::new(BthRepr {
        opcode: Opcode::RC_RDMA_READ_REQUEST,
        solicited: false,
        migreq: true,
        pad_count: 0,
        pkey: DEFAULT_PKEY,
        fecn: false,
        becn: false,
        dest_qpn: QPN[1],
        ack_req: true,
        psn,
    });
    r.reth = Some(RethRepr {
        va,
        rkey,
        dma_len: len,
    });
    let mut buf = Vec::new();
    r.emit_into(&mut buf).expect("emit");
    IcrcContext::rxe(IP[0], IP[1], rxe_source_port(QPN[0]), 4791)
        .fill(&mut buf)
        .expect("icrc");
    buf
}

/// Issue 11, item 1: a connected peer sends 10,000 READ requests of 1 MiB (about
/// 440 KB of requests) and reads nothing. Before, the responder queued a response for
/// every one: 10,000 reads, 10 GB to send. Held: at most `max_dest_rd_atomic` (16)
/// responses are queued at any time, the next waits (dropped unprocessed, counted as
/// `reads_deferred`) and the ones behind it fail the PSN check, and what the target sends for the flood stays under 17 MiB.
#[test]
fn read_flood_queues_at_most_the_responder_resources() {
    let mut sim = Sim::new(Options {
        mtu: Mtu::Mtu4096,
        ..Options::default()
    });
    let region = mem(1 << 20);
    sim.register(1, 7, region);
    // Side 1 expects PSN 0xFFFFF0 from side 0 (see common::Sim::new); each 1 MiB READ
    // takes 256 PSNs.
    let mut psn = 0xFF_FFF0u32;
    let now = Time(1_000);
    for _ in 0..10_000 {
        let pkt = read_request(psn, 0, 7, 1 << 20);
        let _ = sim.qps[1].handle_packet(now, &pkt);
        psn = (psn + 256) & 0xFF_FFFF;
        let (reads, bytes) = sim.qps[1].response_backlog();
        assert!(reads <= 16, "{reads} READ responses queued");
        assert!(bytes <= 16 << 20, "{bytes} bytes of responses queued");
    }
    let st = sim.qps[1].stats();
    // The 17th READ waited (deferred); the ones after it are ahead of the PSN the
    // responder expects and are dropped by the sequence check (one NAK).
    assert!(st.reads_deferred >= 1, "{st:?}");
    // What the target would put on the wire for the flood: the 16 responses and a NAK.
    let mut packets = 0u64;
    let mut bytes = 0u64;
    while let Some(t) = sim.qps[1].poll_transmit(now) {
        packets += 1;
        bytes += t.payload.len() as u64;
        assert!(
            packets <= 16 * 256 + 16,
            "the responder keeps sending: {packets} packets"
        );
    }
    eprintln!("flood of 10,000 x 1 MiB READs: {packets} packets, {bytes} bytes to send; {st:?}");
    assert!(bytes < 17 << 20);
    assert_eq!(sim.qps[1].response_backlog(), (0, 0));
}
