//! The RC requester against a slow peer: how many request packets a transfer costs
//! when the responder cannot keep up, per packet of data delivered.
//!
//! Two models of the slow peers seen in the VM tier (kernel rxe under TCG):
//! - a **bottleneck**: the responder takes one packet per `service` from a queue of
//!   `queue` packets and loses what arrives while the queue is full (a socket buffer
//!   or rxe's packet queue overflowing), so a window larger than the queue plus what
//!   the link holds is lost in bulk and go-back-N resends everything behind the loss;
//! - a **slow answer**: nothing is lost, but the round trip (3 ms each way) is longer
//!   than the 2 ms retransmission timeout the provider configures, so a requester
//!   whose timer does not follow the measured round trip resends every window it
//!   sent, and the responder counts each as a duplicate.
//!
//! Every transfer must complete with the right bytes; the cost in request packets per
//! packet of data and the responder's duplicate count must stay near 1 and 0.

mod common;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use common::{mem, mem_with, pattern, seg, send_wr, Options, Sim};
use fabric_softroce::rc::{LocalMemory, Mtu, QueuePair, RemoteAccess, SendOp, Time, WcStatus};

/// A packet on the wire: delivery time, sequence, destination side, bytes.
type InFlight = Reverse<(Time, u64, usize, Vec<u8>)>;

/// The link between the two QPs.
#[derive(Clone, Copy)]
struct Link {
    /// One-way latency, both directions.
    delay: Duration,
    /// Time the responder takes per request packet (zero: no bottleneck).
    service: Duration,
    /// Request packets the responder's queue holds (tail drop beyond).
    queue: usize,
}

/// What a run cost.
#[derive(Debug)]
struct Cost {
    /// Request packets the requester sent.
    sent: u64,
    /// Packets the data needs (4 KiB each).
    useful: u64,
    /// Request packets lost at the bottleneck.
    lost: u64,
    /// Duplicate requests the responder saw.
    duplicates: u64,
    /// Times the requester cut its window.
    cuts: u64,
    /// The requester's smoothed round trip at the end.
    srtt: Option<Duration>,
}

impl Cost {
    fn per_packet(&self) -> f64 {
        self.sent as f64 / self.useful as f64
    }
}

/// `n` RDMA WRITEs of `size` bytes, at most `window` outstanding, from side 0 into a
/// region of side 1 over `link`; checks every completion and the target's bytes.
fn writes(link: Link, size: usize, n: usize, window: usize) -> Cost {
    // The QPs as the provider configures them (path MTU 4096, 2 ms timeout).
    let sim = Sim::new(Options {
        mtu: Mtu::Mtu4096,
        timeout: Duration::from_millis(2),
        ..Options::default()
    });
    let slots = window.min(n);
    let target = mem_with(vec![0; size * slots], 0, RemoteAccess::ALL);
    sim.register(1, 7, target.clone());
    let local = mem(size * slots);
    let mut qps: [QueuePair; 2] = sim.qps;
    let mut now = Time(0);
    // (delivery time, sequence, destination side, packet)
    let mut wire: BinaryHeap<InFlight> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut departures: VecDeque<Time> = VecDeque::new();
    let mut lost = 0u64;
    let (mut posted, mut done) = (0usize, 0usize);
    let mut last_source = vec![Vec::new(); slots];
    let limit = Time(0) + Duration::from_secs(60);
    while done < n {
        assert!(now < limit, "transfers stalled: {done} of {n} done");
        while let Some(c) = qps[0].poll_completion() {
            assert_eq!((c.wr_id, c.status), (done as u64, WcStatus::Success));
            let slot = done % slots;
            let got = target.to_vec()[slot * size..(slot + 1) * size].to_vec();
            assert!(got == last_source[slot], "write {done}: wrong bytes");
            done += 1;
        }
        if done == n {
            break;
        }
        while posted < n && posted - done < window {
            let slot = posted % slots;
            let data = pattern(size, posted as u64 + 1);
            LocalMemory::write(local.as_ref(), (slot * size) as u64, &data).unwrap();
            last_source[slot] = data;
            qps[0]
                .post_send(send_wr(
                    posted as u64,
                    SendOp::Write {
                        remote_va: (slot * size) as u64,
                        rkey: 7,
                    },
                    seg(&local, (slot * size) as u64, size as u32),
                ))
                .unwrap();
            posted += 1;
        }
        // Everything both sides have to send leaves now.
        for (side, qp) in qps.iter_mut().enumerate() {
            while let Some(t) = qp.poll_transmit(now) {
                let mut at = now + link.delay;
                if side == 0 && !link.service.is_zero() {
                    while departures.front().is_some_and(|&d| d <= at) {
                        departures.pop_front();
                    }
                    if departures.len() >= link.queue {
                        lost += 1;
                        continue;
                    }
                    let start = departures.back().map_or(at, |&d| d.max(at));
                    at = start + link.service;
                    departures.push_back(at);
                }
                seq += 1;
                wire.push(Reverse((at, seq, 1 - side, t.payload)));
            }
        }
        // The next event: a delivery or a timer.
        let next_frame = wire.peek().map(|Reverse((t, ..))| *t);
        let next_timer = qps.iter().filter_map(|q| q.poll_timeout()).min();
        now = match (next_frame, next_timer) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or_else(|| {
                panic!(
                    "stalled at {now:?} with {done} of {n} done: window {}, queued {}, {:?}",
                    qps[0].send_window(),
                    qps[0].send_queue_len(),
                    qps[0].stats()
                )
            }),
        }
        .max(now);
        while wire.peek().is_some_and(|Reverse((t, ..))| *t <= now) {
            let Reverse((_, _, dst, p)) = wire.pop().unwrap();
            let _ = qps[dst].handle_packet(now, &p);
        }
        for qp in qps.iter_mut() {
            if qp.poll_timeout().is_some_and(|t| t <= now) {
                qp.handle_timeout(now);
            }
        }
    }
    Cost {
        sent: qps[0].stats().packets_sent,
        useful: (n * size).div_ceil(4096) as u64,
        lost,
        duplicates: qps[1].stats().duplicates,
        cuts: qps[0].window_cuts(),
        srtt: qps[0].smoothed_rtt(),
    }
}

/// A responder that takes 20 µs per 4 KiB packet (about 200 MB/s) from a 16-packet
/// queue, 20 µs away: 32 writes of 1 MiB, 4 outstanding. The fixed 128-PSN window
/// lost most of every burst here (3.7 request packets per packet of data before the
/// congestion window).
#[test]
fn bottleneck_responder_costs_few_resends() {
    let link = Link {
        delay: Duration::from_micros(20),
        service: Duration::from_micros(20),
        queue: 16,
    };
    let c = writes(link, 1 << 20, 32, 4);
    eprintln!(
        "bottleneck: {c:?}: {:.2} request packets per packet of data",
        c.per_packet()
    );
    // The window was cut (the burst did overrun the queue) and settled near what the
    // queue holds: losses are a small fraction of the data.
    assert!(c.cuts > 0, "{c:?}");
    assert!(c.lost * 10 < c.useful, "{c:?}");
    assert!(
        c.per_packet() < 1.5,
        "{:.2} request packets per packet of data ({c:?})",
        c.per_packet()
    );
}

/// No loss, but a round trip of 6 ms against the 2 ms timeout: 50 writes of 64 KiB one
/// after another (what the VM tier's `softroce-verbs` step does against rxe under
/// TCG), then 8 writes of 1 MiB with 4 outstanding.
#[test]
fn slow_answers_cause_few_duplicates() {
    let link = Link {
        delay: Duration::from_millis(3),
        service: Duration::ZERO,
        queue: 0,
    };
    for (size, n, window) in [(64 << 10, 50, 1), (1 << 20, 8, 4)] {
        let c = writes(link, size, n, window);
        eprintln!(
            "slow answers, {n} x {size} B, window {window}: {c:?}: {:.2} request packets \
             per packet of data",
            c.per_packet()
        );
        assert!(
            c.per_packet() < 1.25,
            "{:.2} request packets per packet of data ({c:?})",
            c.per_packet()
        );
        // The timer learnt the 6 ms round trip (plus the time a window takes to leave).
        let srtt = c.srtt.expect("a round trip was measured");
        assert!(
            srtt >= Duration::from_millis(6) && srtt < Duration::from_millis(9),
            "{c:?}"
        );
        assert!(
            c.duplicates * 10 < c.useful,
            "{} duplicates for {} packets of data ({c:?})",
            c.duplicates,
            c.useful
        );
    }
}
