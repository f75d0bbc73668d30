//! The RC (reliable connected) transport as a deterministic, sans-IO state machine.
//!
//! A [`QueuePair`] owns no socket and no clock (in the manner of quinn-proto). The
//! driver around it:
//!
//! 1. feeds every received RoCEv2 packet addressed to this QP with
//!    [`QueuePair::handle_packet`] (ICRC already verified, e.g. with
//!    [`crate::wire::frame::Ipv4UdpFrame::verify_icrc`]) or
//!    [`QueuePair::handle_datagram`] (for a plain UDP socket, which does not see the
//!    IP header: checks the source and solves the ICRC for the sender's IP ID);
//! 2. drains [`QueuePair::poll_transmit`] and sends each [`Transmit`] as a UDP datagram;
//! 3. arms a timer for [`QueuePair::poll_timeout`] and calls
//!    [`QueuePair::handle_timeout`] when it expires;
//! 4. collects [`Completion`]s from [`QueuePair::poll_completion`].
//!
//! Work requests enter with [`QueuePair::post_send`] and [`QueuePair::post_recv`];
//! their buffers are [`LocalSegment`]s of [`LocalMemory`]. Remote access from the peer
//! goes through the [`RemoteMemoryTable`] given at creation.
//!
//! The requester segments messages by path MTU, sets AckReq on the last packet, every
//! 64 packets (every half window when the window is smaller) and on the packet that
//! fills the window, keeps at most 128 PSNs unacknowledged, retransmits go-back-N on
//! timeout, sequence NAK or implicit NAK, and waits out RNR NAKs.
//!
//! **Pacing against a slow peer.** Within those 128 PSNs a congestion window limits
//! what is in flight ([`QueuePair::send_window`]): it starts at 128 (so a peer that
//! keeps up sees exactly rxe's window), halves on a sequence NAK, an implicit NAK, a
//! READ response gap or a duplicate response (the responder re-ACKs a packet it got
//! twice), once per window of packets in flight, and drops to [`MIN_CWND`] on a
//! retransmission timeout; clean ACKs grow it again (a packet per packet acknowledged
//! up to half the window it had, then a packet per window). So a responder that loses
//! what overruns its queue (kernel rxe in a slow VM) receives about what it can take,
//! and go-back-N resends a window's worth, not 128 PSNs, behind each loss. The
//! retransmission timer follows the measured round trip (RFC 6298: smoothed round
//! trip plus four deviations, sampled only from packets sent once, as Karn's rule
//! says; the doubling of a timeout that a duplicate response shows was spurious is
//! kept until the next sample), never below the configured `timeout` and at most
//! [`MAX_RTO`]: a peer that answers later than the timeout (rxe in an emulated VM
//! acknowledges 64 KiB writes after milliseconds) is not sent every window twice.
//!
//! A READ whose responses have a gap keeps what arrived and asks again for the missing packets
//! only (a READ request for the gap's PSN, address and length). Retrying is
//! time-based: a requester gives up (`RetryExceeded`) after
//! `max(timeout * (2^(retry_cnt+1) - 1), MIN_GIVE_UP)` (2 s) without anything new from
//! the peer; losses that NAKs or response gaps reveal cost no retry. `retry_cnt` and
//! `timeout` (rxe's 7 and the provider's 2 ms) change no packet. The responder checks
//! PSNs with signed 24-bit comparison, NAKs a sequence error once and then drops
//! out-of-order packets until the expected PSN arrives, re-ACKs duplicate SEND/WRITE
//! packets, replays READ/atomic/FLUSH responses from its resource ring, sends RNR NAK
//! when no receive is posted, and checks R_Key, bounds and rights before touching
//! memory (NAK remote access error otherwise, and the QP enters ERROR, as in rxe;
//! [`QueuePair::error_cause`] says why a QP entered ERROR). Behaviour follows Linux
//! rdma_rxe.

mod memory;
mod psn;
mod requester;
mod responder;
mod types;

pub use memory::{
    AtomicOp, KeyTable, LocalMemory, LocalSegment, MemoryError, RemoteAccess, RemoteMemoryTable,
    RemoteNeed, RemoteRegion, RemoteRight, RemoteSpan, VecMemory,
};
pub use psn::{MAX_PKTS_PER_ACK, MAX_UNACKED_PSNS, PSN_MASK};
pub use requester::{MAX_RTO, MIN_CWND, MIN_GIVE_UP};
pub use types::{
    ib_timeout, Completion, FlushPlacement, Mtu, QpError, QpState, QpStats, RecvWr, RtrAttr,
    RtsAttr, SendOp, SendWr, Time, Transmit, WcOpcode, WcStatus,
};

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddrV4;
use std::sync::Arc;

use tracing::debug;

use crate::wire::{self, BthRepr, IcrcContext, Opcode, RocePacket, RoceRepr};
use requester::Requester;
use responder::Responder;

/// The QP must enter ERROR; carries the error completion, if one is due, and why.
pub(crate) struct Fatal(pub(crate) Option<Completion>, pub(crate) ErrorCause);

/// Why a queue pair entered ERROR ([`QueuePair::error_cause`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCause {
    /// The driver moved it ([`QueuePair::modify_to_error`]).
    Modified,
    /// A send work request failed with this status: the transport or RNR retries ran
    /// out (`RetryExceeded`, `RnrRetryExceeded`), the peer refused it with a NAK
    /// (`RemoteAccessError`, `RemoteInvalidRequest`, `RemoteOperationalError`), or a
    /// local buffer could not be written (`LocalAccessError`).
    Requester(WcStatus),
    /// The responder refused a remote access of the peer (R_Key, bounds, rights, or a
    /// persistent FLUSH into memory that is not persistent) with this NAK. As in
    /// rdma_rxe, the responder's QP enters ERROR after the NAK is queued.
    AccessRefused(wire::ext::NakCode),
    /// The responder answered a malformed request, or one it could not carry out (a
    /// receive that failed, a memory error), with this NAK.
    RequestFailed(wire::ext::NakCode),
}

/// Per-connection constants used to build packets.
pub(crate) struct Ctx {
    qpn: u32,
    dest_qpn: u32,
    mtu: Mtu,
    icrc: IcrcContext,
    local: SocketAddrV4,
    remote: SocketAddrV4,
    /// Buffers of sent frames, for the next packets ([`QueuePair::recycle`]).
    frames: RefCell<Vec<Vec<u8>>>,
}

impl Ctx {
    fn bth(&self, opcode: Opcode, psn: u32, ack_req: bool) -> BthRepr {
        BthRepr {
            opcode,
            solicited: false,
            migreq: true,
            pad_count: 0,
            pkey: wire::bth::DEFAULT_PKEY,
            fecn: false,
            becn: false,
            dest_qpn: self.dest_qpn,
            ack_req,
            psn,
        }
    }

    fn build(&self, repr: &RoceRepr, payload: &[u8]) -> Option<Vec<u8>> {
        self.build_with(repr, payload.len(), |b| {
            b.copy_from_slice(payload);
            true
        })
    }

    /// Builds a packet with `plen` payload bytes written in place by `fill` (false:
    /// the payload could not be read, no packet), in a recycled buffer if one is free.
    fn build_with(
        &self,
        repr: &RoceRepr,
        plen: usize,
        fill: impl FnOnce(&mut [u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let mut buf = self.frames.borrow_mut().pop().unwrap_or_default();
        let mut r = *repr;
        r.payload_len = plen;
        let ok = match r.emit_into(&mut buf) {
            Ok(range) => fill(&mut buf[range]) && self.icrc.fill(&mut buf).is_ok(),
            Err(_) => false,
        };
        if ok {
            Some(buf)
        } else {
            self.recycle(buf);
            None
        }
    }

    fn recycle(&self, buf: Vec<u8>) {
        let mut frames = self.frames.borrow_mut();
        if frames.len() < MAX_FREE_FRAMES {
            frames.push(buf);
        }
    }
}

/// Sent frames kept for reuse per QP: a window of full-size packets, so a steady
/// stream allocates nothing (freeing and reallocating them made the allocator give
/// memory back to the kernel and fault it in again, batch after batch).
const MAX_FREE_FRAMES: usize = 256;

/// An RC queue pair: requester, completer and responder of one connection.
pub struct QueuePair {
    qpn: u32,
    state: QpState,
    table: Arc<dyn RemoteMemoryTable>,
    ctx: Option<Ctx>,
    rtr: Option<RtrAttr>,
    req: Requester,
    resp: Responder,
    comps: VecDeque<Completion>,
    stats: QpStats,
    cause: Option<ErrorCause>,
    /// IP IDs seen from the peer by `handle_datagram`.
    ip_ids: wire::IpIdWindow,
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qpn", &self.qpn)
            .field("state", &self.state)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl QueuePair {
    /// A QP in state RESET with number `qpn` (24 bits); the peer's R_Keys are looked up
    /// in `table`.
    pub fn new(qpn: u32, table: Arc<dyn RemoteMemoryTable>) -> Self {
        Self {
            qpn: qpn & PSN_MASK,
            state: QpState::Reset,
            table,
            ctx: None,
            rtr: None,
            req: Requester::new(),
            resp: Responder::new(),
            comps: VecDeque::new(),
            stats: QpStats::default(),
            cause: None,
            ip_ids: wire::IpIdWindow::new(),
        }
    }

    /// This QP's number.
    pub fn qpn(&self) -> u32 {
        self.qpn
    }

    /// Current state.
    pub fn state(&self) -> QpState {
        self.state
    }

    /// Why the QP entered ERROR (`None` while it has not).
    pub fn error_cause(&self) -> Option<ErrorCause> {
        self.cause
    }

    /// Protocol counters.
    pub fn stats(&self) -> QpStats {
        self.stats
    }

    /// The requester's congestion window: how many PSNs it may have unacknowledged
    /// now (between [`MIN_CWND`] and [`MAX_UNACKED_PSNS`]; see the module docs).
    pub fn send_window(&self) -> u32 {
        self.req.cwnd()
    }

    /// How many times the requester cut its window (a sequence NAK, an implicit NAK,
    /// a READ response gap or a duplicate response, once per window; a timeout).
    pub fn window_cuts(&self) -> u64 {
        self.req.cwnd_cuts
    }

    /// The requester's smoothed round trip (sent to acknowledged), once measured.
    pub fn smoothed_rtt(&self) -> Option<std::time::Duration> {
        self.req.srtt()
    }

    /// Send work requests queued and not yet completed.
    pub fn send_queue_len(&self) -> usize {
        self.req.queued()
    }

    fn transition(&self, from: QpState, action: &'static str) -> Result<(), QpError> {
        if self.state == from {
            Ok(())
        } else {
            Err(QpError::InvalidState {
                state: self.state,
                action,
            })
        }
    }

    /// RESET -> INIT.
    pub fn modify_to_init(&mut self) -> Result<(), QpError> {
        self.transition(QpState::Reset, "move to INIT")?;
        self.state = QpState::Init;
        Ok(())
    }

    /// INIT -> RTR: the responder starts accepting requests.
    pub fn modify_to_rtr(&mut self, attr: RtrAttr) -> Result<(), QpError> {
        self.transition(QpState::Init, "move to RTR")?;
        if attr.dest_qpn > PSN_MASK {
            return Err(QpError::InvalidAttribute("dest_qpn wider than 24 bits"));
        }
        if attr.rq_psn > PSN_MASK {
            return Err(QpError::InvalidAttribute("rq_psn wider than 24 bits"));
        }
        if attr.min_rnr_timer > 31 {
            return Err(QpError::InvalidAttribute("min_rnr_timer above 31"));
        }
        self.ctx = Some(Ctx {
            qpn: self.qpn,
            dest_qpn: attr.dest_qpn,
            mtu: attr.mtu,
            icrc: IcrcContext::rxe(
                *attr.local.ip(),
                *attr.remote.ip(),
                attr.local.port(),
                attr.remote.port(),
            ),
            local: attr.local,
            remote: attr.remote,
            frames: RefCell::new(Vec::new()),
        });
        self.resp
            .start(attr.rq_psn, attr.max_dest_rd_atomic, attr.min_rnr_timer);
        self.rtr = Some(attr);
        self.state = QpState::Rtr;
        Ok(())
    }

    /// RTR -> RTS: the requester starts sending.
    pub fn modify_to_rts(&mut self, attr: RtsAttr) -> Result<(), QpError> {
        self.transition(QpState::Rtr, "move to RTS")?;
        if attr.rnr_retry > 7 {
            return Err(QpError::InvalidAttribute("rnr_retry is 0..=7"));
        }
        if attr.sq_psn > PSN_MASK {
            return Err(QpError::InvalidAttribute("sq_psn wider than 24 bits"));
        }
        if attr.timeout.is_zero() {
            return Err(QpError::InvalidAttribute("timeout must be positive"));
        }
        self.req.start(attr);
        self.state = QpState::Rts;
        Ok(())
    }

    /// Any state -> ERROR: every queued work request completes with `Flushed`.
    pub fn modify_to_error(&mut self) {
        self.enter_error(ErrorCause::Modified);
    }

    /// Any state -> RESET: queues are emptied without completions.
    pub fn reset(&mut self) {
        let qpn = self.qpn;
        let table = self.table.clone();
        let stats = self.stats;
        *self = Self::new(qpn, table);
        self.stats = stats;
    }

    fn enter_error(&mut self, cause: ErrorCause) {
        if self.state != QpState::Error {
            debug!(qpn = self.qpn, ?cause, "QP enters ERROR");
            self.cause = Some(cause);
        }
        self.state = QpState::Error;
        self.req.flush(&mut self.comps);
        self.resp.flush(&mut self.comps);
    }

    fn fatal(&mut self, f: Fatal) {
        if let Some(c) = f.0 {
            self.comps.push_back(c);
        }
        self.enter_error(f.1);
    }

    /// Posts a send work request (RTS). In ERROR it completes at once with `Flushed`.
    pub fn post_send(&mut self, wr: SendWr) -> Result<(), QpError> {
        if let Some(l) = &wr.local {
            if !l.in_bounds() {
                return Err(QpError::LocalOutOfBounds);
            }
            if l.len > 1 << 31 {
                return Err(QpError::InvalidWorkRequest("message longer than 2 GiB"));
            }
        }
        match wr.op {
            SendOp::CompareSwap { remote_va, .. } | SendOp::FetchAdd { remote_va, .. } => {
                if wr.local.as_ref().map(|l| l.len) != Some(8) {
                    return Err(QpError::InvalidWorkRequest(
                        "atomics need an 8-byte local segment",
                    ));
                }
                if remote_va & 7 != 0 {
                    return Err(QpError::InvalidWorkRequest(
                        "atomic target not 8-byte aligned",
                    ));
                }
            }
            SendOp::Flush { .. } if wr.local.is_some() => {
                return Err(QpError::InvalidWorkRequest("FLUSH takes no local segment"));
            }
            _ => {}
        }
        match self.state {
            QpState::Rts => {
                // RTS implies the RTR context exists.
                let Some(ctx) = self.ctx.as_ref() else {
                    return Err(QpError::InvalidState {
                        state: self.state,
                        action: "post a send",
                    });
                };
                self.req.post(wr, ctx);
                Ok(())
            }
            QpState::Error => {
                let opcode = match wr.op {
                    SendOp::Send | SendOp::SendWithImm { .. } => WcOpcode::Send,
                    SendOp::Write { .. } | SendOp::WriteWithImm { .. } => WcOpcode::RdmaWrite,
                    SendOp::Read { .. } => WcOpcode::RdmaRead,
                    SendOp::CompareSwap { .. } => WcOpcode::CompareSwap,
                    SendOp::FetchAdd { .. } => WcOpcode::FetchAdd,
                    SendOp::Flush { .. } => WcOpcode::Flush,
                };
                self.comps.push_back(Completion {
                    wr_id: wr.wr_id,
                    opcode,
                    status: WcStatus::Flushed,
                    byte_len: 0,
                    imm: None,
                });
                Ok(())
            }
            state => Err(QpError::InvalidState {
                state,
                action: "post a send",
            }),
        }
    }

    /// Posts a receive (INIT, RTR, RTS). In ERROR it completes at once with `Flushed`.
    pub fn post_recv(&mut self, wr: RecvWr) -> Result<(), QpError> {
        if let Some(l) = &wr.local {
            if !l.in_bounds() {
                return Err(QpError::LocalOutOfBounds);
            }
        }
        match self.state {
            QpState::Init | QpState::Rtr | QpState::Rts => {
                self.resp.post_recv(wr);
                Ok(())
            }
            QpState::Error => {
                self.comps.push_back(Completion {
                    wr_id: wr.wr_id,
                    opcode: WcOpcode::Recv,
                    status: WcStatus::Flushed,
                    byte_len: 0,
                    imm: None,
                });
                Ok(())
            }
            QpState::Reset => Err(QpError::InvalidState {
                state: QpState::Reset,
                action: "post a receive",
            }),
        }
    }

    /// Handles a UDP datagram received on a plain socket, which sees neither the IP
    /// ID nor DF that the ICRC covers: the source must be the connected peer's address
    /// (any port: rxe sends from a per-QP port), DF is assumed, and the ICRC is solved
    /// for the IP ID ([`IcrcContext::solve_ip_id`]; 0 for this crate's own senders,
    /// numbered by Linux rdma_rxe), which must be plausible for the peer
    /// ([`wire::IpIdWindow`], per QP). See the crate docs, "Receiving rxe's packets",
    /// for what this costs in detection strength.
    pub fn handle_datagram(
        &mut self,
        now: Time,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
    ) -> Result<(), wire::Error> {
        if let Some(ctx) = &self.ctx {
            if ctx.remote.ip() != src.ip() {
                self.stats.packets_dropped += 1;
                return Err(wire::Error::WrongSource);
            }
        }
        let id =
            IcrcContext::rxe(*src.ip(), *dst.ip(), src.port(), dst.port()).solve_ip_id(payload)?;
        if !self.ip_ids.accept(id, now.0) {
            self.stats.packets_dropped += 1;
            return Err(wire::Error::ImplausibleIpId(id));
        }
        self.handle_packet(now, payload)
    }

    /// Handles one RoCEv2 packet (BTH through ICRC) whose ICRC the caller verified.
    /// Malformed packets are dropped and reported; protocol-level surprises (wrong
    /// QPN, stale PSNs) are dropped silently and counted.
    pub fn handle_packet(&mut self, now: Time, packet: &[u8]) -> Result<(), wire::Error> {
        let parsed = RocePacket::new_checked(packet).and_then(|p| {
            let r = RoceRepr::parse(&p)?;
            Ok((r, p))
        });
        let (repr, p) = match parsed {
            Ok(x) => x,
            Err(e) => {
                self.stats.packets_dropped += 1;
                return Err(e);
            }
        };
        let op = repr.bth.opcode;
        let is_request = op.info().is_some_and(|i| i.is_request);
        let accepted = op.is_rc()
            && op != Opcode::CNP
            && repr.bth.dest_qpn == self.qpn
            && match self.state {
                QpState::Rtr => is_request,
                QpState::Rts => true,
                _ => false,
            };
        let Some(ctx) = self.ctx.as_ref().filter(|_| accepted) else {
            self.stats.packets_dropped += 1;
            return Ok(());
        };
        self.stats.packets_received += 1;
        let result = if is_request {
            self.resp.handle_request(
                &repr,
                p.payload(),
                ctx,
                self.table.as_ref(),
                &mut self.comps,
                &mut self.stats,
            )
        } else {
            self.req
                .handle_response(
                    now,
                    &repr,
                    p.payload(),
                    ctx,
                    &mut self.comps,
                    &mut self.stats,
                )
                .map(|_| ())
        };
        if let Err(f) = result {
            self.fatal(f);
        }
        Ok(())
    }

    /// What the responder still has to send: READ responses (and replays) queued,
    /// and their bytes not yet sent. New READs beyond `max_dest_rd_atomic` responses in
    /// progress wait (they are dropped unprocessed and sent again by the requester),
    /// so the count stays bounded; the bytes are at most that many reads' lengths. A
    /// driver serving several QPs takes a bounded number of packets from each in turn
    /// ([`QueuePair::poll_transmit`] produces them one at a time, as the wire drains)
    /// rather than draining one QP's backlog before the others.
    pub fn response_backlog(&self) -> (usize, u64) {
        self.resp.backlog()
    }

    /// The next packet to send, if any. Responses go before new requests.
    pub fn poll_transmit(&mut self, now: Time) -> Option<Transmit> {
        let ctx = self.ctx.as_ref()?;
        let payload = match self.state {
            QpState::Rtr | QpState::Error => self.resp.next_packet(ctx),
            QpState::Rts => {
                if self.resp.has_output() {
                    self.resp.next_packet(ctx)
                } else {
                    match self.req.next_packet(now, ctx) {
                        Ok(p) => p,
                        Err(f) => {
                            self.fatal(f);
                            None
                        }
                    }
                }
            }
            _ => None,
        }?;
        self.stats.packets_sent += 1;
        let ctx = self.ctx.as_ref()?;
        Some(Transmit {
            src: ctx.local,
            dst: ctx.remote,
            payload,
        })
    }

    /// Whether the only packets waiting in [`Self::poll_transmit`] (if any) are
    /// positive ACKs of received requests. A driver may hold those back for a
    /// moment to send them in one batch with what the application posts next: an
    /// ACK covers every PSN up to its own, so holding it changes nothing but when the
    /// peer's work requests complete (the peer's retransmission timer bounds the
    /// moment).
    pub fn only_acks_pending(&self) -> bool {
        match self.state {
            QpState::Rts => self.resp.only_acks() && !self.req.may_transmit(),
            QpState::Rtr => self.resp.only_acks(),
            _ => false,
        }
    }

    /// Gives back the buffer of a [`Transmit`] once it was sent, for a later packet
    /// (optional: a driver that keeps its frames loses nothing but allocations).
    pub fn recycle(&mut self, frame: Vec<u8>) {
        if let Some(ctx) = self.ctx.as_ref() {
            ctx.recycle(frame);
        }
    }

    /// When [`Self::handle_timeout`] must next be called, if at all.
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.state == QpState::Rts {
            self.req.poll_timeout()
        } else {
            None
        }
    }

    /// Runs expired timers (retransmission, RNR wait).
    pub fn handle_timeout(&mut self, now: Time) {
        if self.state != QpState::Rts {
            return;
        }
        if let Err(f) = self.req.handle_timeout(now, &mut self.stats) {
            self.fatal(f);
        }
    }

    /// The next completion, if any.
    pub fn poll_completion(&mut self) -> Option<Completion> {
        self.comps.pop_front()
    }

    /// Chooses what the responder does with a SEND larger than the receive buffer it
    /// consumed. Off (rxe, IBTA): the receive completes `LocalLengthError`, the
    /// requester gets NAK invalid request and both QPs enter ERROR. On (libfabric's
    /// `FI_ETRUNC` semantics): the bytes that fit are placed, the rest is discarded,
    /// the receive completes `LocalLengthError` with `byte_len` = bytes placed, the
    /// message is acknowledged normally and the connection goes on.
    pub fn set_truncate_receives(&mut self, on: bool) {
        self.resp.truncate = on;
    }

    /// The path MTU (after RTR).
    pub fn mtu(&self) -> Option<Mtu> {
        self.rtr.map(|a| a.mtu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn rtr() -> RtrAttr {
        RtrAttr {
            mtu: Mtu::Mtu1024,
            dest_qpn: 2,
            rq_psn: 0,
            max_dest_rd_atomic: 4,
            min_rnr_timer: 1,
            local: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0xC001),
            remote: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 4791),
        }
    }

    fn rts() -> RtsAttr {
        RtsAttr {
            sq_psn: 0,
            timeout: Duration::from_millis(1),
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 4,
        }
    }

    #[test]
    fn transitions_are_checked() {
        let mut qp = QueuePair::new(1, Arc::new(KeyTable::new()));
        assert!(qp.modify_to_rtr(rtr()).is_err());
        assert!(qp.modify_to_rts(rts()).is_err());
        assert!(qp
            .post_recv(RecvWr {
                wr_id: 1,
                local: None
            })
            .is_err());
        qp.modify_to_init().unwrap();
        assert!(qp.modify_to_init().is_err());
        assert!(qp
            .post_send(SendWr {
                wr_id: 1,
                op: SendOp::Send,
                local: None
            })
            .is_err());
        qp.post_recv(RecvWr {
            wr_id: 1,
            local: None,
        })
        .unwrap();
        assert!(qp
            .modify_to_rtr(RtrAttr {
                min_rnr_timer: 32,
                ..rtr()
            })
            .is_err());
        qp.modify_to_rtr(rtr()).unwrap();
        assert_eq!(qp.state(), QpState::Rtr);
        assert!(qp
            .modify_to_rts(RtsAttr {
                rnr_retry: 8,
                ..rts()
            })
            .is_err());
        qp.modify_to_rts(rts()).unwrap();
        assert_eq!(qp.state(), QpState::Rts);
        qp.modify_to_error();
        let c = qp.poll_completion().unwrap();
        assert_eq!((c.wr_id, c.status), (1, WcStatus::Flushed));
        assert!(qp.modify_to_init().is_err());
        qp.reset();
        assert_eq!(qp.state(), QpState::Reset);
        assert!(qp.poll_completion().is_none());
    }

    #[test]
    fn work_requests_are_validated() {
        let mut qp = QueuePair::new(1, Arc::new(KeyTable::new()));
        qp.modify_to_init().unwrap();
        qp.modify_to_rtr(rtr()).unwrap();
        qp.modify_to_rts(rts()).unwrap();
        let m: Arc<dyn LocalMemory> = Arc::new(VecMemory::new(16, 0, RemoteAccess::NONE));
        let atomic = SendOp::FetchAdd {
            remote_va: 8,
            rkey: 1,
            add: 1,
        };
        let wr = |op, off, len| SendWr {
            wr_id: 0,
            op,
            local: Some(LocalSegment::new(m.clone(), off, len)),
        };
        assert_eq!(
            qp.post_send(wr(SendOp::Send, 8, 9)),
            Err(QpError::LocalOutOfBounds)
        );
        assert!(qp.post_send(wr(atomic, 0, 4)).is_err());
        let misaligned = SendOp::CompareSwap {
            remote_va: 4,
            rkey: 1,
            compare: 0,
            swap: 0,
        };
        assert!(qp.post_send(wr(misaligned, 0, 8)).is_err());
        qp.post_send(wr(atomic, 8, 8)).unwrap();
        assert_eq!(qp.send_queue_len(), 1);
        // Garbage and misaddressed packets are dropped without effect.
        assert!(qp.handle_packet(Time(0), &[0u8; 3]).is_err());
        let t = qp.poll_transmit(Time(0)).unwrap();
        assert!(qp.handle_packet(Time(0), &t.payload).is_ok()); // our own request: wrong QPN
        assert_eq!(qp.stats().packets_dropped, 2);
        assert!(qp.poll_timeout().is_some());
    }
}
