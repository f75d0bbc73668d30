//! A simulated network between two queue pairs, in one thread (quinn-proto style):
//! frames go through a fault injector and optionally a pcap writer, the receiver
//! checks IPv4 and ICRC before the QP sees the packet.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use fabric_softroce::fault::{FaultConfig, FaultInjector};
use fabric_softroce::pcap::{PcapWriter, LINKTYPE_RAW};
use fabric_softroce::rc::{
    Completion, KeyTable, LocalSegment, Mtu, QueuePair, RecvWr, RemoteAccess, RtrAttr, RtsAttr,
    SendOp, SendWr, Time, VecMemory,
};
use fabric_softroce::wire::frame::{build_frame, rxe_source_port, FrameInfo, Ipv4UdpFrame};

pub const QPN: [u32; 2] = [0x11, 0x22];
pub const IP: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)];

/// A frame in flight: delivery time, sequence (tie-break), destination side, bytes.
type InFlight = Reverse<(Time, u64, usize, Vec<u8>)>;

pub struct Sim {
    pub now: Time,
    pub qps: [QueuePair; 2],
    pub tables: [Arc<KeyTable>; 2],
    faults: [FaultInjector; 2],
    queue: BinaryHeap<InFlight>,
    seq: u64,
    pub completions: [Vec<Completion>; 2],
    pub pcap: Option<PcapWriter<Vec<u8>>>,
    pub frame_rejects: u64,
    pub icrc_rejects: u64,
    /// Direction i -> 1-i is cut (the peer vanished).
    pub cut: [bool; 2],
}

pub struct Options {
    pub mtu: Mtu,
    pub faults: FaultConfig,
    pub seed: u64,
    pub timeout: Duration,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub min_rnr_timer: u8,
    pub pcap: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mtu: Mtu::Mtu1024,
            faults: FaultConfig::perfect(Duration::from_micros(10)),
            seed: 1,
            timeout: Duration::from_millis(2),
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 1,
            pcap: false,
        }
    }
}

impl Sim {
    pub fn new(o: Options) -> Self {
        let tables = [Arc::new(KeyTable::new()), Arc::new(KeyTable::new())];
        let mut qps = [
            QueuePair::new(QPN[0], tables[0].clone()),
            QueuePair::new(QPN[1], tables[1].clone()),
        ];
        for i in 0..2 {
            let j = 1 - i;
            let qp = &mut qps[i];
            qp.modify_to_init().unwrap();
            qp.modify_to_rtr(RtrAttr {
                mtu: o.mtu,
                dest_qpn: QPN[j],
                rq_psn: 0xFFFFF0 + j as u32, // exercise 24-bit wrap
                max_dest_rd_atomic: 16,
                min_rnr_timer: o.min_rnr_timer,
                local: SocketAddrV4::new(IP[i], rxe_source_port(QPN[i])),
                remote: SocketAddrV4::new(IP[j], 4791),
            })
            .unwrap();
            qp.modify_to_rts(RtsAttr {
                sq_psn: 0xFFFFF0 + i as u32,
                timeout: o.timeout,
                retry_cnt: o.retry_cnt,
                rnr_retry: o.rnr_retry,
                max_rd_atomic: 16,
            })
            .unwrap();
        }
        Self {
            now: Time(0),
            qps,
            tables,
            faults: [
                FaultInjector::new(o.faults, o.seed),
                FaultInjector::new(o.faults, o.seed.wrapping_mul(31).wrapping_add(7)),
            ],
            queue: BinaryHeap::new(),
            seq: 0,
            completions: [Vec::new(), Vec::new()],
            pcap: if o.pcap {
                Some(PcapWriter::new(Vec::new(), LINKTYPE_RAW).unwrap())
            } else {
                None
            },
            frame_rejects: 0,
            icrc_rejects: 0,
            cut: [false, false],
        }
    }

    /// Registers `mem` at side `side` under `rkey`.
    pub fn register(&self, side: usize, rkey: u32, mem: Arc<VecMemory>) {
        self.tables[side].insert(rkey, mem);
    }

    fn flush_transmits(&mut self) {
        for i in 0..2 {
            while let Some(t) = self.qps[i].poll_transmit(self.now) {
                let info = FrameInfo::rxe(*t.src.ip(), *t.dst.ip(), t.src.port());
                let frame = build_frame(&info, &t.payload).unwrap();
                if let Some(p) = self.pcap.as_mut() {
                    p.write_frame(self.now, &frame).unwrap();
                }
                if self.cut[i] {
                    continue;
                }
                for (at, f) in self.faults[i].inject(self.now, frame) {
                    self.seq += 1;
                    self.queue.push(Reverse((at, self.seq, 1 - i, f)));
                }
            }
            while let Some(c) = self.qps[i].poll_completion() {
                self.completions[i].push(c);
            }
        }
    }

    fn deliver(&mut self, dst: usize, frame: &[u8]) {
        let Ok(f) = Ipv4UdpFrame::new_checked(frame) else {
            self.frame_rejects += 1;
            return;
        };
        if f.verify_icrc().is_err() {
            self.icrc_rejects += 1;
            return;
        }
        let _ = self.qps[dst].handle_packet(self.now, f.udp_payload());
    }

    /// Advances to the next event. Returns false when nothing is left to happen.
    pub fn step(&mut self) -> bool {
        self.flush_transmits();
        let next_frame = self.queue.peek().map(|Reverse((t, ..))| *t);
        let next_timer = self.qps.iter().filter_map(|q| q.poll_timeout()).min();
        let next = match (next_frame, next_timer) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(t) => t,
                None => return false,
            },
        };
        self.now = self.now.max(next);
        while let Some(Reverse((t, ..))) = self.queue.peek() {
            if *t > self.now {
                break;
            }
            let Some(Reverse((_, _, dst, frame))) = self.queue.pop() else {
                break;
            };
            self.deliver(dst, &frame);
            self.flush_transmits();
        }
        for i in 0..2 {
            if self.qps[i].poll_timeout().is_some_and(|t| t <= self.now) {
                self.qps[i].handle_timeout(self.now);
            }
        }
        self.flush_transmits();
        true
    }

    /// Runs until `done` holds (true) or nothing is left / `limit` passes (false).
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if self.now > end || !self.step() {
                return done(self);
            }
        }
    }

    pub fn fault_stats(&self, i: usize) -> fabric_softroce::fault::FaultStats {
        self.faults[i].stats()
    }
}

pub fn mem(len: usize) -> Arc<VecMemory> {
    Arc::new(VecMemory::new(len, 0, RemoteAccess::ALL))
}

pub fn mem_with(data: Vec<u8>, base: u64, access: RemoteAccess) -> Arc<VecMemory> {
    Arc::new(VecMemory::from_vec(data, base, access))
}

pub fn seg(m: &Arc<VecMemory>, offset: u64, len: u32) -> Option<LocalSegment> {
    Some(LocalSegment::new(m.clone(), offset, len))
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn send_wr(wr_id: u64, op: SendOp, local: Option<LocalSegment>) -> SendWr {
    SendWr { wr_id, op, local }
}

pub fn recv_wr(wr_id: u64, local: Option<LocalSegment>) -> RecvWr {
    RecvWr { wr_id, local }
}
