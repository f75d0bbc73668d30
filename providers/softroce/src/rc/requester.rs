//! The requester (send queue, segmentation, retransmission) and the completer (ACK,
//! NAK and response handling) of an RC queue pair.

use std::collections::VecDeque;
use std::time::Duration;

use tracing::{debug, trace};

use super::memory::LocalSegment;
use super::psn::{self, MAX_PKTS_PER_ACK, MAX_UNACKED_PSNS};
use super::types::{
    Completion, FlushPlacement, QpStats, RtsAttr, SendOp, SendWr, Time, WcOpcode, WcStatus,
};
use super::{Ctx, Fatal};
use crate::wire::ext::{
    rnr_timer_ns, AtomicEthRepr, FethRepr, NakCode, RethRepr, Syndrome, FLUSH_PLACEMENT_GLOBAL,
    FLUSH_PLACEMENT_PERSISTENT, FLUSH_SELECT_RANGE,
};
use crate::wire::opcode::Segment;
use crate::wire::{Opcode, RoceRepr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Send,
    Write,
    Read,
    Atomic,
    Flush,
}

impl Kind {
    fn of(op: &SendOp) -> Kind {
        match op {
            SendOp::Send | SendOp::SendWithImm { .. } => Kind::Send,
            SendOp::Write { .. } | SendOp::WriteWithImm { .. } => Kind::Write,
            SendOp::Read { .. } => Kind::Read,
            SendOp::CompareSwap { .. } | SendOp::FetchAdd { .. } => Kind::Atomic,
            SendOp::Flush { .. } => Kind::Flush,
        }
    }
    /// Read-like: answered by responses rather than ACKs, uses responder resources.
    fn is_rd_atomic(self) -> bool {
        matches!(self, Kind::Read | Kind::Atomic | Kind::Flush)
    }
}

/// A posted send work request and its transmission state.
struct Wqe {
    wr: SendWr,
    kind: Kind,
    len: u32,
    npkts: u32,
    first_psn: u32,
    started: bool,
    /// READ: which response packets have landed (bit k: packet k), so responses after
    /// a gap are kept and only the missing ones are asked for again.
    got: Vec<u64>,
}

impl Wqe {
    fn has(&self, k: u32) -> bool {
        self.got
            .get(k as usize / 64)
            .is_some_and(|w| w & (1u64 << (k % 64)) != 0)
    }
    fn set(&mut self, k: u32) {
        if let Some(w) = self.got.get_mut(k as usize / 64) {
            *w |= 1u64 << (k % 64);
        }
    }
    /// Packets from `k` on that have not landed, up to the next one that has.
    fn missing_run(&self, k: u32) -> u32 {
        (k..self.npkts).take_while(|&j| !self.has(j)).count() as u32
    }
    fn last_psn(&self) -> u32 {
        psn::add(self.first_psn, self.npkts - 1)
    }
    fn contains(&self, p: u32) -> bool {
        self.started && psn::diff(p, self.first_psn) >= 0 && psn::diff(p, self.last_psn()) <= 0
    }
    fn wc_opcode(&self) -> WcOpcode {
        match self.wr.op {
            SendOp::Send | SendOp::SendWithImm { .. } => WcOpcode::Send,
            SendOp::Write { .. } | SendOp::WriteWithImm { .. } => WcOpcode::RdmaWrite,
            SendOp::Read { .. } => WcOpcode::RdmaRead,
            SendOp::CompareSwap { .. } => WcOpcode::CompareSwap,
            SendOp::FetchAdd { .. } => WcOpcode::FetchAdd,
            SendOp::Flush { .. } => WcOpcode::Flush,
        }
    }
    fn completion(&self, status: WcStatus) -> Completion {
        Completion {
            wr_id: self.wr.wr_id,
            opcode: self.wc_opcode(),
            status,
            byte_len: if status == WcStatus::Success {
                self.len
            } else {
                0
            },
            imm: None,
        }
    }
}

/// Requester + completer state.
pub(super) struct Requester {
    sq: VecDeque<Wqe>,
    attr: Option<RtsAttr>,
    /// PSN given to the next WQE that starts.
    next_psn: u32,
    /// Index in `sq` of the WQE to transmit next and the packet within it.
    send_idx: usize,
    send_pkt: u32,
    /// Oldest PSN not yet acknowledged (or expected read response).
    comp_psn: u32,
    rnr_left: u8,
    /// Last time the peer answered something new (or the first request went out):
    /// the requester gives up when it has heard nothing new for [`Self::give_up`].
    last_progress: Time,
    /// A READ's missing response packets to ask for again: (first PSN, packets).
    rerequest: Option<(u32, u32)>,
    /// Go-back-N restart already under way from this PSN (suppresses repeats).
    retry_from: Option<u32>,
    retrans_deadline: Option<Time>,
    rnr_deadline: Option<Time>,
    noack_pkts: u32,
    rd_outstanding: u32,
    /// Consecutive retransmission timeouts without progress: each doubles the next
    /// timer (up to 2^MAX_BACKOFF), so a short timeout recovers single losses fast
    /// while a stalled peer still has the give-up time (`Requester::give_up`) to answer.
    /// Reset by progress, except after a timeout that proved spurious (see
    /// `spurious`).
    backoff: u32,
    /// A retransmission timeout happened and no round trip was measured since.
    unsampled_timeout: bool,
    /// The peer answered a resend with a duplicate response after such a timeout: the
    /// timer is shorter than the round trip, and since resends give no sample (Karn),
    /// the doubled timer is kept (up to 2^MAX_KEPT_BACKOFF) until a packet sent once
    /// is acknowledged in time to measure it.
    spurious: bool,
    /// The backoff of the last timeout (at most MAX_KEPT_BACKOFF).
    kept_backoff: u32,
    /// Congestion window: most PSNs unacknowledged at once (at most
    /// [`MAX_UNACKED_PSNS`], at least [`MIN_CWND`]).
    cwnd: u32,
    /// Slow-start threshold: below it the window grows by a packet per packet
    /// acknowledged, above it by a packet per window.
    ssthresh: u32,
    /// Packets acknowledged toward the next packet of window (congestion avoidance).
    cwnd_acked: u32,
    /// `comp_psn` when the window last grew.
    cwnd_mark: u32,
    /// After a decrease, the PSN that ends its recovery: no further decrease until
    /// everything sent before the loss is acknowledged (one decrease per window).
    recover: Option<u32>,
    /// First PSN never sent (packets before it that go out again are resends).
    high_psn: u32,
    /// A packet sent for the first time and when: its acknowledgement is a round-trip
    /// sample (none is taken from resent packets, whose ACK is ambiguous).
    rtt_probe: Option<(u32, Time)>,
    /// Smoothed round trip and its mean deviation (RFC 6298), once measured.
    srtt: Option<Duration>,
    rttvar: Duration,
    /// Window decreases so far (losses, timeouts, duplicate responses).
    pub(super) cwnd_cuts: u64,
}

/// Largest backoff exponent kept across progress after a spurious timeout (16 times
/// the timeout: 32 ms with the provider's 2 ms).
const MAX_KEPT_BACKOFF: u32 = 4;

/// Smallest congestion window (packets).
pub const MIN_CWND: u32 = 2;

/// Longest retransmission timeout the measured round trip may ask for.
pub const MAX_RTO: Duration = Duration::from_millis(250);

/// Largest exponent of the retransmission timer backoff.
const MAX_BACKOFF: u32 = 10;

/// The shortest silence (nothing new from the peer while something is outstanding)
/// after which a requester gives up with `RetryExceeded` (see `Requester::give_up`):
/// long enough that a loaded machine or a lossy link does not end a live connection,
/// short enough that a vanished peer is noticed within seconds.
pub const MIN_GIVE_UP: Duration = Duration::from_secs(2);

impl Requester {
    pub(super) fn new() -> Self {
        Self {
            sq: VecDeque::new(),
            attr: None,
            next_psn: 0,
            send_idx: 0,
            send_pkt: 0,
            comp_psn: 0,
            rnr_left: 0,
            last_progress: Time(0),
            rerequest: None,
            retry_from: None,
            retrans_deadline: None,
            rnr_deadline: None,
            noack_pkts: 0,
            rd_outstanding: 0,
            backoff: 0,
            unsampled_timeout: false,
            spurious: false,
            kept_backoff: 0,
            cwnd: MAX_UNACKED_PSNS as u32,
            ssthresh: MAX_UNACKED_PSNS as u32,
            cwnd_acked: 0,
            cwnd_mark: 0,
            recover: None,
            high_psn: 0,
            rtt_probe: None,
            srtt: None,
            rttvar: Duration::ZERO,
            cwnd_cuts: 0,
        }
    }

    pub(super) fn start(&mut self, attr: RtsAttr) {
        let sq_psn = attr.sq_psn & psn::PSN_MASK;
        self.attr = Some(attr);
        self.next_psn = sq_psn;
        self.comp_psn = sq_psn;
        self.cwnd_mark = sq_psn;
        self.high_psn = sq_psn;
        self.rnr_left = attr.rnr_retry;
    }

    /// The configured timeout: the least retransmission timeout.
    fn attr_timeout(&self) -> Duration {
        self.attr.map_or(Duration::from_millis(100), |a| a.timeout)
    }

    /// The retransmission timeout: the configured one, or the measured round trip
    /// plus four deviations (RFC 6298) where that is longer, at most [`MAX_RTO`].
    fn timeout(&self) -> Duration {
        let floor = self.attr_timeout();
        match self.srtt {
            Some(srtt) => (srtt + self.rttvar * 4).min(MAX_RTO).max(floor),
            None => floor,
        }
    }

    /// The timer of the next expiry: [`Self::timeout`] doubled per timeout since
    /// the last round-trip sample.
    fn rto(&self) -> Duration {
        self.timeout() * (1u32 << self.backoff)
    }

    /// The congestion window (packets).
    pub(super) fn cwnd(&self) -> u32 {
        self.cwnd
    }

    /// The smoothed round trip, once one was measured.
    pub(super) fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    fn rtt_sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let dev = s.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + dev) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
        self.backoff = 0;
        self.unsampled_timeout = false;
        self.spurious = false;
        self.kept_backoff = 0;
    }

    /// A sign the peer or the path is overrun (a sequence NAK, an implicit NAK, a
    /// READ response gap, a duplicate response; `timeout`: the retransmission timer):
    /// the window halves (a timeout: drops to [`MIN_CWND`]), once per window of
    /// packets in flight.
    fn congestion(&mut self, timeout: bool) {
        let in_recovery = self
            .recover
            .is_some_and(|r| psn::diff(self.comp_psn, r) < 0);
        if in_recovery && !timeout {
            return;
        }
        if !in_recovery {
            self.ssthresh = (self.cwnd / 2).max(MIN_CWND);
        }
        self.cwnd = if timeout { MIN_CWND } else { self.ssthresh };
        self.cwnd_acked = 0;
        self.recover = Some(self.high_psn);
        self.cwnd_cuts += 1;
    }

    /// New packets acknowledged: the window grows (slow start below `ssthresh`,
    /// a packet per window above), and a round trip is measured if the probe is
    /// covered.
    fn grow(&mut self, now: Time) {
        let acked = psn::diff(self.comp_psn, self.cwnd_mark).max(0) as u32;
        self.cwnd_mark = self.comp_psn;
        if let Some((p, sent)) = self.rtt_probe {
            if psn::diff(self.comp_psn, p) > 0 {
                self.rtt_probe = None;
                self.rtt_sample(now - sent);
            }
        }
        if let Some(r) = self.recover {
            if psn::diff(self.comp_psn, r) < 0 {
                return;
            }
            self.recover = None;
        }
        let max = MAX_UNACKED_PSNS as u32;
        if self.cwnd < self.ssthresh {
            self.cwnd = (self.cwnd + acked).min(self.ssthresh).min(max);
        } else {
            self.cwnd_acked += acked;
            while self.cwnd_acked >= self.cwnd && self.cwnd < max {
                self.cwnd_acked -= self.cwnd;
                self.cwnd += 1;
            }
            if self.cwnd >= max {
                self.cwnd_acked = 0;
            }
        }
    }

    /// How long the requester keeps retrying without hearing anything new from the
    /// peer: `timeout * (2^(retry_cnt+1) - 1)` (the time `retry_cnt` doubling timeouts
    /// take; 510 ms with rxe's 7 and the 2 ms timeout), and at least [`MIN_GIVE_UP`]
    /// (2 s). The policy is time-based: losses answered by NAKs or noticed as a READ
    /// response gap cost no retry, only silence counts.
    fn give_up(&self) -> Duration {
        let n = u32::from(self.attr.map_or(7, |a| a.retry_cnt)).min(MAX_BACKOFF + 10);
        self.attr_timeout()
            .saturating_mul((1u32 << (n + 1)) - 1)
            .max(MIN_GIVE_UP)
    }

    /// Queues a validated work request.
    pub(super) fn post(&mut self, wr: SendWr, ctx: &Ctx) {
        let kind = Kind::of(&wr.op);
        let len = match wr.op {
            SendOp::Flush { .. } => 0,
            _ => wr.local.as_ref().map_or(0, |l| l.len),
        };
        let npkts = match kind {
            Kind::Send | Kind::Write | Kind::Read => ctx.mtu.packets(len),
            Kind::Atomic | Kind::Flush => 1,
        };
        self.sq.push_back(Wqe {
            wr,
            kind,
            len,
            npkts,
            first_psn: 0,
            started: false,
            got: Vec::new(),
        });
    }

    fn outstanding(&self) -> bool {
        self.sq.front().is_some_and(|w| w.started)
    }

    /// Next deadline of the requester's timers.
    pub(super) fn poll_timeout(&self) -> Option<Time> {
        match (self.retrans_deadline, self.rnr_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Produces the next request packet, if the window and limits allow one.
    pub(super) fn next_packet(&mut self, now: Time, ctx: &Ctx) -> Result<Option<Vec<u8>>, Fatal> {
        if self.rnr_deadline.is_some() {
            return Ok(None);
        }
        if let Some((p, n)) = self.rerequest.take() {
            if let Some(idx) = self
                .sq
                .iter()
                .position(|w| w.kind == Kind::Read && w.contains(p))
            {
                let k = psn::diff(p, self.sq[idx].first_psn) as u32;
                trace!(
                    qpn = ctx.qpn,
                    psn = p,
                    packets = n,
                    "READ: asking again for a gap"
                );
                if let Ok(b) = self.build(idx, k, Some(n), ctx) {
                    if self.retrans_deadline.is_none() {
                        self.retrans_deadline = Some(now + self.rto());
                    }
                    return Ok(Some(b));
                }
            }
        }
        if self.send_idx >= self.sq.len() {
            return Ok(None);
        }
        let max_rd = u32::from(self.attr.map_or(1, |a| a.max_rd_atomic.max(1)));
        let idx = self.send_idx;
        let (started, kind, first_psn) = {
            let w = &self.sq[idx];
            (w.started, w.kind, w.first_psn)
        };
        let p = if started {
            psn::add(first_psn, self.send_pkt)
        } else {
            if kind.is_rd_atomic() && self.rd_outstanding >= max_rd {
                return Ok(None);
            }
            self.next_psn
        };
        if psn::diff(p, self.comp_psn) >= self.cwnd as i32 {
            return Ok(None);
        }
        if !started {
            let w = &mut self.sq[idx];
            w.started = true;
            w.first_psn = self.next_psn;
            self.next_psn = psn::add(self.next_psn, w.npkts);
            if kind == Kind::Read {
                w.got = vec![0; (w.npkts as usize).div_ceil(64)];
            }
            if kind.is_rd_atomic() {
                self.rd_outstanding += 1;
            }
        }
        let k = self.send_pkt;
        let bytes = match self.build(idx, k, None, ctx) {
            Ok(b) => b,
            Err(status) => {
                debug!(
                    qpn = ctx.qpn,
                    "local buffer unreadable: failing the work request"
                );
                return Err(self.fail_front(status));
            }
        };
        let sent_psn = psn::add(self.sq[idx].first_psn, k);
        if psn::diff(sent_psn, self.high_psn) >= 0 {
            self.high_psn = psn::add(sent_psn, 1);
            if self.rtt_probe.is_none() {
                self.rtt_probe = Some((sent_psn, now));
            }
        }
        let w = &self.sq[idx];
        if matches!(w.kind, Kind::Send | Kind::Write) && k + 1 < w.npkts {
            self.send_pkt += 1;
        } else {
            self.send_idx += 1;
            self.send_pkt = 0;
        }
        if self.retrans_deadline.is_none() {
            // Nothing was outstanding: the silence the give-up time measures starts now.
            self.retrans_deadline = Some(now + self.rto());
            self.last_progress = now;
        }
        Ok(Some(bytes))
    }

    /// Builds packet `k` of WQE `idx`; for a READ, the request for its response
    /// packets from `k` on (at most `count` of them).
    fn build(
        &mut self,
        idx: usize,
        k: u32,
        count: Option<u32>,
        ctx: &Ctx,
    ) -> Result<Vec<u8>, WcStatus> {
        let mtu = ctx.mtu.bytes();
        let w = &self.sq[idx];
        let p = psn::add(w.first_psn, k);
        let seg = if w.npkts == 1 {
            Segment::Only
        } else if k == 0 {
            Segment::First
        } else if k + 1 == w.npkts {
            Segment::Last
        } else {
            Segment::Middle
        };
        let mut data: Option<(u32, u32)> = None;
        let repr = match w.wr.op {
            SendOp::Send
            | SendOp::SendWithImm { .. }
            | SendOp::Write { .. }
            | SendOp::WriteWithImm { .. } => {
                let off = k * mtu;
                data = Some((off, mtu.min(w.len - off)));
                // AckReq twice per window (every 64 packets at the full window), and
                // on the packet that fills the window, so a small window is not left
                // waiting for the timer.
                let every = (self.cwnd / 2).clamp(1, MAX_PKTS_PER_ACK);
                let fills = psn::diff(p, self.comp_psn) + 1 >= self.cwnd as i32;
                let ack_req = seg.is_last() || fills || self.noack_pkts + 1 >= every;
                self.noack_pkts = if ack_req { 0 } else { self.noack_pkts + 1 };
                let (opcode, imm, reth) = data_opcode(&w.wr.op, seg, w.len);
                let mut r = RoceRepr::new(ctx.bth(opcode, p, ack_req));
                r.imm = imm;
                r.reth = reth;
                r
            }
            SendOp::Read { remote_va, rkey } => {
                let off = k * mtu;
                let rest = w.len - off;
                let dma_len = count.map_or(rest, |n| rest.min(n.saturating_mul(mtu)));
                let mut r = RoceRepr::new(ctx.bth(Opcode::RC_RDMA_READ_REQUEST, p, true));
                r.reth = Some(RethRepr {
                    va: remote_va.wrapping_add(u64::from(off)),
                    rkey,
                    dma_len,
                });
                r
            }
            SendOp::CompareSwap {
                remote_va,
                rkey,
                compare,
                swap,
            } => {
                let mut r = RoceRepr::new(ctx.bth(Opcode::RC_COMPARE_SWAP, p, true));
                r.atomic_eth = Some(AtomicEthRepr {
                    va: remote_va,
                    rkey,
                    swap_add: swap,
                    compare,
                });
                r
            }
            SendOp::FetchAdd {
                remote_va,
                rkey,
                add,
            } => {
                let mut r = RoceRepr::new(ctx.bth(Opcode::RC_FETCH_ADD, p, true));
                r.atomic_eth = Some(AtomicEthRepr {
                    va: remote_va,
                    rkey,
                    swap_add: add,
                    compare: 0,
                });
                r
            }
            SendOp::Flush {
                remote_va,
                rkey,
                len,
                placement,
            } => {
                let mut r = RoceRepr::new(ctx.bth(Opcode::RC_FLUSH, p, true));
                r.feth = Some(FethRepr {
                    placement: match placement {
                        FlushPlacement::Global => FLUSH_PLACEMENT_GLOBAL,
                        FlushPlacement::Persistent => FLUSH_PLACEMENT_PERSISTENT,
                    },
                    selectivity: FLUSH_SELECT_RANGE,
                });
                r.reth = Some(RethRepr {
                    va: remote_va,
                    rkey,
                    dma_len: len,
                });
                r
            }
        };
        trace!(qpn = ctx.qpn, psn = p, opcode = ?repr.bth.opcode, "request");
        let Some((off, plen)) = data else {
            return ctx.build(&repr, &[]).ok_or(WcStatus::LocalAccessError);
        };
        // The payload goes from the local buffer straight into the frame.
        let local = w.wr.local.as_ref();
        ctx.build_with(&repr, plen as usize, |buf| match local {
            Some(l) => l.memory.read(l.offset + u64::from(off), buf).is_ok(),
            None => {
                buf.fill(0);
                true
            }
        })
        .ok_or(WcStatus::LocalAccessError)
    }

    /// Rewinds transmission to `p` (go-back-N).
    fn go_back(&mut self, p: u32) {
        self.noack_pkts = 0;
        // Karn: what is sent again gives no round-trip sample.
        self.rtt_probe = None;
        if let Some(i) = self.sq.iter().position(|w| w.contains(p)) {
            self.send_idx = i;
            self.send_pkt = psn::diff(p, self.sq[i].first_psn) as u32;
        } else {
            self.send_idx = self
                .sq
                .iter()
                .position(|w| !w.started)
                .unwrap_or(self.sq.len());
            self.send_pkt = 0;
        }
    }

    /// Pops the front WQE, completing it with `status`.
    fn pop_front(&mut self, status: WcStatus, comps: &mut VecDeque<Completion>) {
        if let Some(w) = self.sq.pop_front() {
            if w.started && w.kind.is_rd_atomic() {
                self.rd_outstanding = self.rd_outstanding.saturating_sub(1);
            }
            if status == WcStatus::Success {
                self.comp_psn = psn::add(w.last_psn(), 1);
            }
            if self.send_idx > 0 {
                self.send_idx -= 1;
            } else {
                self.send_pkt = 0;
            }
            comps.push_back(w.completion(status));
        }
    }

    fn fail_front(&mut self, status: WcStatus) -> Fatal {
        let mut comps = VecDeque::new();
        self.pop_front(status, &mut comps);
        Fatal(comps.pop_front(), super::ErrorCause::Requester(status))
    }

    /// Completes every SEND/WRITE WQE whose packets all precede `upto_excl`; returns
    /// whether anything new was acknowledged.
    fn retire(&mut self, upto_excl: u32, comps: &mut VecDeque<Completion>) -> bool {
        let mut progress = false;
        while let Some(w) = self.sq.front() {
            if !w.started || w.kind.is_rd_atomic() {
                break;
            }
            if psn::diff(w.last_psn(), upto_excl) < 0 {
                self.pop_front(WcStatus::Success, comps);
                progress = true;
            } else {
                if psn::diff(upto_excl, self.comp_psn) > 0 {
                    self.comp_psn = upto_excl;
                    progress = true;
                    // Skip retransmitting packets of this WQE that are now acknowledged.
                    if self.send_idx == 0 {
                        let acked = psn::diff(upto_excl, w.first_psn) as u32;
                        self.send_pkt = self.send_pkt.max(acked);
                    }
                }
                break;
            }
        }
        progress
    }

    fn on_progress(&mut self, now: Time) {
        if let Some(a) = self.attr {
            self.rnr_left = a.rnr_retry;
        }
        self.last_progress = now;
        self.retry_from = None;
        self.backoff = if self.spurious { self.kept_backoff } else { 0 };
        // May measure a round trip, which ends a kept backoff.
        self.grow(now);
        self.retrans_deadline = if self.outstanding() {
            Some(now + self.rto())
        } else {
            None
        };
    }

    /// Go back to the oldest unacknowledged PSN, counting a retry. `force` restarts
    /// even when a restart from that PSN is already under way (timer expiry).
    fn retry(&mut self, now: Time, force: bool, stats: &mut QpStats) -> Result<(), Fatal> {
        if !self.outstanding() {
            return Ok(());
        }
        if !force && self.retry_from == Some(self.comp_psn) {
            return Ok(());
        }
        if force && now - self.last_progress >= self.give_up() {
            debug!(
                psn = self.comp_psn,
                "nothing new from the peer for {:?}: retry exceeded",
                self.give_up()
            );
            return Err(self.fail_front(WcStatus::RetryExceeded));
        }
        stats.retransmissions += 1;
        self.congestion(force);
        self.rerequest = None;
        self.go_back(self.comp_psn);
        self.retry_from = Some(self.comp_psn);
        if force {
            self.backoff = (self.backoff + 1).min(MAX_BACKOFF);
            self.unsampled_timeout = true;
            self.kept_backoff = self.backoff.min(MAX_KEPT_BACKOFF);
        }
        self.retrans_deadline = Some(now + self.rto());
        Ok(())
    }

    /// Retransmission and RNR timers.
    pub(super) fn handle_timeout(&mut self, now: Time, stats: &mut QpStats) -> Result<(), Fatal> {
        if self.rnr_deadline.is_some_and(|d| d <= now) {
            self.rnr_deadline = None;
        }
        if self.retrans_deadline.is_some_and(|d| d <= now) {
            self.retrans_deadline = None;
            if self.outstanding() && self.rnr_deadline.is_none() {
                stats.timeouts += 1;
                debug!(psn = self.comp_psn, "retransmission timeout");
                self.retry(now, true, stats)?;
            }
        }
        Ok(())
    }

    /// Whether `p` lies in the window of PSNs this requester has used and not retired.
    fn in_flight(&self, p: u32) -> bool {
        psn::diff(p, self.comp_psn) >= 0 && psn::diff(p, self.next_psn) < 0
    }

    /// Handles a response packet (ACK, NAK, READ RESPONSE, ATOMIC ACK).
    pub(super) fn handle_response(
        &mut self,
        now: Time,
        repr: &RoceRepr,
        payload: &[u8],
        ctx: &Ctx,
        comps: &mut VecDeque<Completion>,
        stats: &mut QpStats,
    ) -> Result<bool, Fatal> {
        let p = repr.bth.psn;
        if !self.outstanding() || !self.in_flight(p) {
            // An ACK of PSNs already acknowledged: the responder got a packet twice
            // (it re-ACKs duplicates), so something was resent that had arrived.
            if self.outstanding()
                && repr.bth.opcode == Opcode::RC_ACKNOWLEDGE
                && repr
                    .aeth
                    .is_some_and(|a| matches!(a.syndrome, Syndrome::Ack { .. }))
                && psn::diff(p, self.comp_psn) < 0
                && psn::diff(p, self.comp_psn) >= -(MAX_UNACKED_PSNS * 2)
            {
                self.congestion(false);
                if self.unsampled_timeout {
                    self.spurious = true;
                    self.backoff = self.backoff.max(self.kept_backoff);
                }
            }
            return Ok(false);
        }
        let op = repr.bth.opcode;
        if op == Opcode::RC_ACKNOWLEDGE {
            let Some(aeth) = repr.aeth else {
                return Ok(false);
            };
            match aeth.syndrome {
                Syndrome::Ack { .. } => {
                    let mut progress = self.retire(psn::add(p, 1), comps);
                    if progress {
                        self.on_progress(now);
                    }
                    // An ACK beyond a read/atomic whose response never came: the
                    // responses were lost (implicit NAK).
                    if let Some(w) = self.sq.front() {
                        if w.started && w.kind.is_rd_atomic() && psn::diff(w.first_psn, p) <= 0 {
                            self.retry(now, false, stats)?;
                            progress = true;
                        }
                    }
                    Ok(progress)
                }
                Syndrome::RnrNak { timer } => {
                    if self.retire(p, comps) {
                        self.last_progress = now;
                    }
                    stats.rnr_naks_received += 1;
                    if self.rnr_left == 0 {
                        return Err(self.fail_front(WcStatus::RnrRetryExceeded));
                    }
                    if self.attr.is_some_and(|a| a.rnr_retry != 7) {
                        self.rnr_left -= 1;
                    }
                    self.go_back(self.comp_psn);
                    self.retry_from = None;
                    self.retrans_deadline = None;
                    self.rnr_deadline = Some(now + Duration::from_nanos(rnr_timer_ns(timer)));
                    debug!(psn = p, timer, "RNR NAK: waiting");
                    Ok(true)
                }
                Syndrome::Nak(NakCode::PsnSequenceError) => {
                    if self.retire(p, comps) {
                        self.on_progress(now);
                    }
                    self.retry(now, false, stats)?;
                    Ok(true)
                }
                Syndrome::Nak(code) => {
                    self.retire(p, comps);
                    let status = match code {
                        NakCode::RemoteAccessError => WcStatus::RemoteAccessError,
                        NakCode::RemoteOperationalError => WcStatus::RemoteOperationalError,
                        _ => WcStatus::RemoteInvalidRequest,
                    };
                    debug!(psn = p, ?code, "NAK: failing the work request");
                    Err(self.fail_front(status))
                }
            }
        } else if op.is_read_response() {
            self.handle_read_response(now, repr, payload, ctx, comps, stats)
        } else if op == Opcode::RC_ATOMIC_ACKNOWLEDGE {
            let progress = self.retire(p, comps);
            let Some(w) = self.sq.front() else {
                return Ok(progress);
            };
            if w.kind != Kind::Atomic || !w.started || w.first_psn != p {
                if progress {
                    self.on_progress(now);
                }
                return Ok(progress);
            }
            let orig = repr.atomic_ack.unwrap_or(0);
            if let Some(l) = &w.wr.local {
                if l.memory.write(l.offset, &orig.to_ne_bytes()).is_err() {
                    return Err(self.fail_front(WcStatus::LocalAccessError));
                }
            }
            self.pop_front(WcStatus::Success, comps);
            self.on_progress(now);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn handle_read_response(
        &mut self,
        now: Time,
        repr: &RoceRepr,
        payload: &[u8],
        ctx: &Ctx,
        comps: &mut VecDeque<Completion>,
        stats: &mut QpStats,
    ) -> Result<bool, Fatal> {
        let p = repr.bth.psn;
        let mut progress = self.retire(p, comps);
        if progress {
            self.on_progress(now);
        }
        let Some(i) = self
            .sq
            .iter()
            .take_while(|w| w.started)
            .position(|w| w.contains(p))
        else {
            return Ok(progress);
        };
        let seg_last = repr.bth.opcode.info().is_some_and(|i| i.segment.is_last());
        match self.sq[i].kind {
            Kind::Flush => {
                if i != 0 || p != self.comp_psn {
                    if psn::diff(p, self.comp_psn) > 0 {
                        self.retry(now, false, stats)?;
                    }
                    return Ok(progress);
                }
                if !seg_last || !payload.is_empty() {
                    return Ok(progress);
                }
                self.pop_front(WcStatus::Success, comps);
                self.on_progress(now);
                return Ok(true);
            }
            Kind::Read => {}
            _ => return Ok(progress),
        }
        // A READ response: placed wherever it falls in its read (a response after a
        // gap is kept, not dropped as go-back-N would), then the front read advances
        // over what has landed, and a gap is asked for again from its first packet.
        let w = &self.sq[i];
        let k = psn::diff(p, w.first_psn) as u32;
        let mtu = ctx.mtu.bytes();
        let off = k * mtu;
        let expected = mtu.min(w.len - off) as usize;
        // The read's last packet ends a response; any packet may end a replay of a
        // part of it (a gap asked for again).
        if (k + 1 == w.npkts && !seg_last) || payload.len() != expected {
            return Ok(progress);
        }
        if !w.has(k) {
            if let Some(LocalSegment { memory, offset, .. }) = &w.wr.local {
                if memory.write(offset + u64::from(off), payload).is_err() {
                    if i == 0 {
                        return Err(self.fail_front(WcStatus::LocalAccessError));
                    }
                    return Ok(progress);
                }
            }
            self.sq[i].set(k);
            // Something new from the peer: the give-up clock restarts and the timer
            // waits a full timeout again (the gap is asked for below).
            self.last_progress = now;
            self.backoff = 0;
            self.retrans_deadline = Some(now + self.timeout());
            progress = true;
        }
        if self.advance_reads(comps) {
            self.on_progress(now);
        }
        if self.outstanding() && psn::diff(p, self.comp_psn) > 0 {
            self.ask_for_gap(now, stats)?;
        }
        Ok(progress)
    }

    /// Moves `comp_psn` over the response packets of the front READs that have landed,
    /// completing each READ that is whole; returns whether it moved.
    fn advance_reads(&mut self, comps: &mut VecDeque<Completion>) -> bool {
        let mut moved = false;
        while let Some(w) = self.sq.front() {
            if !w.started || w.kind != Kind::Read {
                break;
            }
            let from = psn::diff(self.comp_psn, w.first_psn).max(0) as u32;
            let mut k = from;
            while k < w.npkts && w.has(k) {
                k += 1;
            }
            if k == w.npkts {
                self.pop_front(WcStatus::Success, comps);
                moved = true;
                continue;
            }
            if k > from {
                self.comp_psn = psn::add(w.first_psn, k);
                moved = true;
            }
            break;
        }
        moved
    }

    /// Responses after a gap arrived: asks again for the front READ's missing packets
    /// from `comp_psn` up to the next one that landed (once per gap; the timer covers
    /// a lost request).
    fn ask_for_gap(&mut self, now: Time, stats: &mut QpStats) -> Result<(), Fatal> {
        if self.retry_from == Some(self.comp_psn) {
            return Ok(());
        }
        let Some(w) = self.sq.front() else {
            return Ok(());
        };
        if w.kind != Kind::Read || !w.contains(self.comp_psn) {
            // The gap is a request the responder never saw: go back to it.
            return self.retry(now, false, stats);
        }
        let k = psn::diff(self.comp_psn, w.first_psn) as u32;
        let n = w.missing_run(k).max(1);
        stats.retransmissions += 1;
        self.congestion(false);
        self.rerequest = Some((self.comp_psn, n));
        self.retry_from = Some(self.comp_psn);
        Ok(())
    }

    /// Completes every queued work request with `Flushed` (QP entered ERROR).
    pub(super) fn flush(&mut self, comps: &mut VecDeque<Completion>) {
        while let Some(w) = self.sq.pop_front() {
            comps.push_back(w.completion(WcStatus::Flushed));
        }
        self.send_idx = 0;
        self.send_pkt = 0;
        self.rd_outstanding = 0;
        self.rerequest = None;
        self.retrans_deadline = None;
        self.rnr_deadline = None;
    }

    /// Whether a request packet may be waiting to be sent (conservative: the window
    /// or the read limit may still hold it back).
    pub(super) fn may_transmit(&self) -> bool {
        self.rnr_deadline.is_none() && (self.send_idx < self.sq.len() || self.rerequest.is_some())
    }

    /// Number of queued send work requests.
    pub(super) fn queued(&self) -> usize {
        self.sq.len()
    }
}

/// Opcode, immediate and RETH of packet `seg` of a SEND or WRITE.
fn data_opcode(op: &SendOp, seg: Segment, len: u32) -> (Opcode, Option<u32>, Option<RethRepr>) {
    match *op {
        SendOp::Send => (
            match seg {
                Segment::First => Opcode::RC_SEND_FIRST,
                Segment::Middle => Opcode::RC_SEND_MIDDLE,
                Segment::Last => Opcode::RC_SEND_LAST,
                Segment::Only => Opcode::RC_SEND_ONLY,
            },
            None,
            None,
        ),
        SendOp::SendWithImm { imm } => match seg {
            Segment::First => (Opcode::RC_SEND_FIRST, None, None),
            Segment::Middle => (Opcode::RC_SEND_MIDDLE, None, None),
            Segment::Last => (Opcode::RC_SEND_LAST_WITH_IMMEDIATE, Some(imm), None),
            Segment::Only => (Opcode::RC_SEND_ONLY_WITH_IMMEDIATE, Some(imm), None),
        },
        SendOp::Write { remote_va, rkey }
        | SendOp::WriteWithImm {
            remote_va, rkey, ..
        } => {
            let imm = match *op {
                SendOp::WriteWithImm { imm, .. } => Some(imm),
                _ => None,
            };
            let reth = Some(RethRepr {
                va: remote_va,
                rkey,
                dma_len: len,
            });
            match (seg, imm) {
                (Segment::First, _) => (Opcode::RC_RDMA_WRITE_FIRST, None, reth),
                (Segment::Middle, _) => (Opcode::RC_RDMA_WRITE_MIDDLE, None, None),
                (Segment::Last, None) => (Opcode::RC_RDMA_WRITE_LAST, None, None),
                (Segment::Last, Some(i)) => {
                    (Opcode::RC_RDMA_WRITE_LAST_WITH_IMMEDIATE, Some(i), None)
                }
                (Segment::Only, None) => (Opcode::RC_RDMA_WRITE_ONLY, None, reth),
                (Segment::Only, Some(i)) => {
                    (Opcode::RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE, Some(i), reth)
                }
            }
        }
        // Only called for SEND and WRITE work requests.
        _ => (Opcode::RC_SEND_ONLY, None, None),
    }
}
