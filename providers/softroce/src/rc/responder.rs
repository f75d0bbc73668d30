//! The responder of an RC queue pair: PSN checking, receive matching, remote access
//! checks, RDMA WRITE/READ/atomic/FLUSH execution, duplicate handling with a
//! responder-resource ring, RNR and sequence NAKs, ACK coalescing.

use std::collections::VecDeque;
use std::sync::Arc;

use tracing::{debug, trace};

use super::memory::{
    AtomicOp, MemoryError, RemoteMemoryTable, RemoteNeed, RemoteRegion, RemoteRight, RemoteSpan,
};
use super::psn;
use super::types::{Completion, QpStats, RecvWr, WcOpcode, WcStatus};
use super::{Ctx, Fatal};
use crate::wire::ext::{
    AethRepr, NakCode, Syndrome, FLUSH_PLACEMENT_PERSISTENT, FLUSH_SELECT_REGION,
};
use crate::wire::opcode::Segment;
use crate::wire::{Opcode, RoceRepr};

/// Most responses queued at once; further duplicates are dropped (the requester's
/// timer recovers).
const MAX_QUEUED_RESPONSES: usize = 4096;

enum Resource {
    Read { first_psn: u32, npkts: u32 },
    Atomic { psn: u32, orig: u64 },
    Flush { psn: u32 },
}

struct ReadStream {
    /// A replay for a duplicate request (not counted against the responder
    /// resources).
    replay: bool,
    region: Option<Arc<dyn RemoteRegion>>,
    offset: u64,
    len: u32,
    first_psn: u32,
    npkts: u32,
    next: u32,
    msn: u32,
}

enum Response {
    Ack {
        psn: u32,
        syndrome: Syndrome,
        msn: u32,
    },
    AtomicAck {
        psn: u32,
        orig: u64,
        msn: u32,
    },
    Read(ReadStream),
}

struct CurWrite {
    region: Option<Arc<dyn RemoteRegion>>,
    offset: u64,
    remaining: u32,
    dma_len: u32,
}

struct CurRecv {
    wr: RecvWr,
    /// Message bytes received so far (may exceed the buffer when truncating).
    offset: u32,
    truncated: bool,
}

pub(super) struct Responder {
    epsn: u32,
    msn: u32,
    nak_sent: bool,
    rq: VecDeque<RecvWr>,
    cur_recv: Option<CurRecv>,
    cur_write: Option<CurWrite>,
    resources: VecDeque<Resource>,
    max_resources: usize,
    out: VecDeque<Response>,
    rnr_timer: u8,
    /// Deliver oversized SENDs truncated instead of failing the QP.
    pub(super) truncate: bool,
}

impl Responder {
    pub(super) fn new() -> Self {
        Self {
            epsn: 0,
            msn: 0,
            nak_sent: false,
            rq: VecDeque::new(),
            cur_recv: None,
            cur_write: None,
            resources: VecDeque::new(),
            max_resources: 1,
            out: VecDeque::new(),
            rnr_timer: 1,
            truncate: false,
        }
    }

    pub(super) fn start(&mut self, rq_psn: u32, max_dest_rd_atomic: u8, rnr_timer: u8) {
        self.epsn = rq_psn & psn::PSN_MASK;
        self.max_resources = usize::from(max_dest_rd_atomic.max(1));
        self.rnr_timer = rnr_timer & 0x1F;
    }

    pub(super) fn post_recv(&mut self, wr: RecvWr) {
        self.rq.push_back(wr);
    }

    /// Whether a response is waiting to be sent.
    pub(super) fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Whether everything waiting to be sent is positive ACKs.
    pub(super) fn only_acks(&self) -> bool {
        self.out.iter().all(|o| {
            matches!(
                o,
                Response::Ack {
                    syndrome: Syndrome::Ack { .. },
                    ..
                }
            )
        })
    }

    fn queue_ack(&mut self, p: u32) {
        if let Some(Response::Ack {
            psn: last,
            syndrome: Syndrome::Ack { .. },
            msn,
        }) = self.out.back_mut()
        {
            // Coalesce: one ACK for the newest PSN acknowledges all before it.
            if psn::diff(p, *last) >= 0 {
                *last = p;
                *msn = self.msn;
            }
            return;
        }
        if self.out.len() < MAX_QUEUED_RESPONSES {
            self.out.push_back(Response::Ack {
                psn: p,
                syndrome: Syndrome::ACK,
                msn: self.msn,
            });
        }
    }

    fn queue_nak(&mut self, p: u32, syndrome: Syndrome) {
        self.out.push_back(Response::Ack {
            psn: p,
            syndrome,
            msn: self.msn,
        });
    }

    fn fatal(&mut self, p: u32, code: NakCode) -> Fatal {
        debug!(psn = p, ?code, "responder error: NAK and QP to ERROR");
        self.queue_nak(p, Syndrome::Nak(code));
        Fatal(None, super::ErrorCause::RequestFailed(code))
    }

    /// Refuses the remote access at `p` (R_Key, bounds, rights, a persistent FLUSH
    /// into memory that is not persistent) as rdma_rxe does: NAK, then the QP enters
    /// ERROR (its posted receives are flushed), and the requester's QP fails on the
    /// NAK. Nothing of the refused request touches memory. A lost NAK is not sent
    /// again (the QP in ERROR drops the retransmissions): the requester then ends
    /// with `RetryExceeded`, as against rxe.
    fn refuse(&mut self, p: u32, code: NakCode) -> Result<(), Fatal> {
        debug!(
            psn = p,
            ?code,
            "responder refuses a remote access: NAK and QP to ERROR"
        );
        self.queue_nak(p, Syndrome::Nak(code));
        Err(Fatal(None, super::ErrorCause::AccessRefused(code)))
    }

    /// READ/FLUSH responses queued (replays included) and their bytes left to send.
    pub(super) fn backlog(&self) -> (usize, u64) {
        self.out.iter().fold((0, 0), |(n, b), o| match o {
            Response::Read(s) => {
                let len = u64::from(s.len);
                let per = len.div_ceil(u64::from(s.npkts.max(1)));
                let left = (per * u64::from(s.npkts - s.next)).min(len);
                (n + 1, b + left)
            }
            _ => (n, b),
        })
    }

    /// READ responses (not replays) still being sent: the responder resources in use.
    fn reads_pending(&self) -> usize {
        self.out
            .iter()
            .filter(|o| matches!(o, Response::Read(s) if !s.replay && s.len > 0))
            .count()
    }

    fn add_resource(&mut self, r: Resource) {
        if self.resources.len() >= self.max_resources {
            self.resources.pop_front();
        }
        self.resources.push_back(r);
    }

    fn complete_recv(&mut self, comps: &mut VecDeque<Completion>, c: Completion) {
        comps.push_back(c);
    }

    /// Handles a request packet.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn handle_request(
        &mut self,
        repr: &RoceRepr,
        payload: &[u8],
        ctx: &Ctx,
        table: &dyn RemoteMemoryTable,
        comps: &mut VecDeque<Completion>,
        stats: &mut QpStats,
    ) -> Result<(), Fatal> {
        let p = repr.bth.psn;
        let d = psn::diff(p, self.epsn);
        if d > 0 {
            if !self.nak_sent {
                trace!(psn = p, epsn = self.epsn, "out of sequence: NAK");
                self.nak_sent = true;
                stats.seq_naks_sent += 1;
                self.queue_nak(self.epsn, Syndrome::Nak(NakCode::PsnSequenceError));
            }
            return Ok(());
        }
        if d < 0 {
            stats.duplicates += 1;
            self.duplicate(repr, ctx, table);
            return Ok(());
        }
        let op = repr.bth.opcode;
        let Some(info) = op.info() else {
            return Err(self.fatal(p, NakCode::InvalidRequest));
        };
        // Opcode sequence: the middle/last packets of a message must follow its first.
        let in_order = if self.cur_recv.is_some() {
            op.is_send() && !info.segment.is_first()
        } else if self.cur_write.is_some() {
            op.is_write() && !info.segment.is_first()
        } else {
            info.segment.is_first()
        };
        let supported = op.is_rc()
            && !matches!(
                op,
                Opcode::RC_SEND_LAST_WITH_INVALIDATE
                    | Opcode::RC_SEND_ONLY_WITH_INVALIDATE
                    | Opcode::RC_ATOMIC_WRITE
            );
        if !in_order || !supported {
            return Err(self.fatal(p, NakCode::InvalidRequest));
        }
        if op.is_send() || op.is_write() {
            let mtu = ctx.mtu.bytes() as usize;
            let ok = match info.segment {
                Segment::First | Segment::Middle => payload.len() == mtu,
                Segment::Last => !payload.is_empty() && payload.len() <= mtu,
                Segment::Only => payload.len() <= mtu,
            };
            if !ok {
                return Err(self.fatal(p, NakCode::InvalidRequest));
            }
        }
        if op.is_send() {
            self.send(repr, payload, info.segment, comps, stats)?;
        } else if op.is_write() {
            self.write(repr, payload, info.segment, table, comps, stats)?;
        } else if op == Opcode::RC_RDMA_READ_REQUEST {
            if self.reads_pending() >= self.max_resources {
                // Every responder resource is still answering: as rxe, which takes
                // the next request only once the current response is out, the
                // request waits; here it is dropped unprocessed (its PSN stays
                // expected) and the requester sends it again. A requester within its
                // max_rd_atomic never gets here; one that floods READs gets no more
                // than `max_dest_rd_atomic` responses queued.
                trace!(psn = p, "READ beyond the responder resources: dropped");
                stats.packets_dropped += 1;
                stats.reads_deferred += 1;
                return Ok(());
            }
            self.read(repr, ctx, table)?;
            return Ok(());
        } else if op.is_atomic() {
            self.atomic(repr, table)?;
            return Ok(());
        } else if op == Opcode::RC_FLUSH {
            self.flush_request(repr, table)?;
            return Ok(());
        } else {
            return Err(self.fatal(p, NakCode::InvalidRequest));
        }
        Ok(())
    }

    /// Finishes an in-order SEND/WRITE packet that was accepted (not RNR'd).
    fn advance(&mut self, p: u32, ack_req: bool) {
        self.epsn = psn::add(self.epsn, 1);
        self.nak_sent = false;
        if ack_req {
            self.queue_ack(p);
        }
    }

    fn rnr(&mut self, p: u32, stats: &mut QpStats) {
        trace!(psn = p, "no receive posted: RNR NAK");
        stats.rnr_naks_sent += 1;
        self.nak_sent = true;
        self.queue_nak(
            p,
            Syndrome::RnrNak {
                timer: self.rnr_timer,
            },
        );
    }

    fn send(
        &mut self,
        repr: &RoceRepr,
        payload: &[u8],
        seg: Segment,
        comps: &mut VecDeque<Completion>,
        stats: &mut QpStats,
    ) -> Result<(), Fatal> {
        let p = repr.bth.psn;
        if seg.is_first() {
            match self.rq.pop_front() {
                Some(wr) => {
                    self.cur_recv = Some(CurRecv {
                        wr,
                        offset: 0,
                        truncated: false,
                    })
                }
                None => {
                    self.rnr(p, stats);
                    return Ok(());
                }
            }
        }
        let Some(cur) = self.cur_recv.as_mut() else {
            return Err(self.fatal(p, NakCode::InvalidRequest));
        };
        let cap = cur.wr.local.as_ref().map_or(0, |l| l.len);
        let end = cur.offset as usize + payload.len();
        let mut status = WcStatus::Success;
        // With truncation on, place what fits and discard the rest.
        let fit = if end > cap as usize && self.truncate {
            cur.truncated = true;
            (cap as usize).saturating_sub(cur.offset as usize)
        } else {
            payload.len()
        };
        if end > cap as usize && !self.truncate {
            status = WcStatus::LocalLengthError;
        } else if let Some(l) = &cur.wr.local {
            if fit > 0
                && l.memory
                    .write(l.offset + u64::from(cur.offset), &payload[..fit])
                    .is_err()
            {
                status = WcStatus::LocalAccessError;
            }
        }
        if status != WcStatus::Success {
            let wr_id = cur.wr.wr_id;
            self.cur_recv = None;
            self.complete_recv(
                comps,
                Completion {
                    wr_id,
                    opcode: WcOpcode::Recv,
                    status,
                    byte_len: 0,
                    imm: None,
                },
            );
            return Err(self.fatal(
                p,
                if status == WcStatus::LocalLengthError {
                    NakCode::InvalidRequest
                } else {
                    NakCode::RemoteOperationalError
                },
            ));
        }
        cur.offset = end as u32;
        if seg.is_last() {
            let c = Completion {
                wr_id: cur.wr.wr_id,
                opcode: WcOpcode::Recv,
                status: if cur.truncated {
                    WcStatus::LocalLengthError
                } else {
                    WcStatus::Success
                },
                byte_len: cur.offset.min(cap),
                imm: repr.imm,
            };
            self.cur_recv = None;
            self.msn = psn::add(self.msn, 1);
            self.complete_recv(comps, c);
        }
        self.advance(p, repr.bth.ack_req);
        Ok(())
    }

    fn write(
        &mut self,
        repr: &RoceRepr,
        payload: &[u8],
        seg: Segment,
        table: &dyn RemoteMemoryTable,
        comps: &mut VecDeque<Completion>,
        stats: &mut QpStats,
    ) -> Result<(), Fatal> {
        let p = repr.bth.psn;
        // A WRITE with immediate consumes a receive: check before touching anything.
        if seg.is_last() && repr.imm.is_some() && self.rq.is_empty() {
            self.rnr(p, stats);
            return Ok(());
        }
        if seg.is_first() {
            let Some(reth) = repr.reth else {
                return Err(self.fatal(p, NakCode::InvalidRequest));
            };
            let need = RemoteRight::Write.into();
            let region = match check_access(table, reth.rkey, reth.va, reth.dma_len, need) {
                Ok(x) => x,
                Err(code) => return self.refuse(p, code),
            };
            self.cur_write = Some(CurWrite {
                region,
                offset: 0,
                remaining: reth.dma_len,
                dma_len: reth.dma_len,
            });
        }
        let Some(cur) = self.cur_write.as_mut() else {
            return Err(self.fatal(p, NakCode::InvalidRequest));
        };
        let n = payload.len() as u32;
        if n > cur.remaining || (seg.is_last() && n != cur.remaining) {
            self.cur_write = None;
            return Err(self.fatal(p, NakCode::InvalidRequest));
        }
        if n > 0 {
            let written = cur
                .region
                .as_ref()
                .is_some_and(|r| r.write(cur.offset, payload).is_ok());
            if !written {
                self.cur_write = None;
                return Err(self.fatal(p, NakCode::RemoteOperationalError));
            }
        }
        cur.offset += u64::from(n);
        cur.remaining -= n;
        if seg.is_last() {
            let dma_len = cur.dma_len;
            self.cur_write = None;
            self.msn = psn::add(self.msn, 1);
            if let Some(imm) = repr.imm {
                if let Some(wr) = self.rq.pop_front() {
                    self.complete_recv(
                        comps,
                        Completion {
                            wr_id: wr.wr_id,
                            opcode: WcOpcode::RecvRdmaWithImm,
                            status: WcStatus::Success,
                            byte_len: dma_len,
                            imm: Some(imm),
                        },
                    );
                }
            }
        }
        self.advance(p, repr.bth.ack_req);
        Ok(())
    }

    fn read(
        &mut self,
        repr: &RoceRepr,
        ctx: &Ctx,
        table: &dyn RemoteMemoryTable,
    ) -> Result<(), Fatal> {
        let p = repr.bth.psn;
        let Some(reth) = repr.reth else {
            return Err(self.fatal(p, NakCode::InvalidRequest));
        };
        let need = RemoteRight::Read.into();
        let region = match check_access(table, reth.rkey, reth.va, reth.dma_len, need) {
            Ok(x) => x,
            Err(code) => return self.refuse(p, code),
        };
        let npkts = ctx.mtu.packets(reth.dma_len);
        self.add_resource(Resource::Read {
            first_psn: p,
            npkts,
        });
        self.msn = psn::add(self.msn, 1);
        self.out.push_back(Response::Read(ReadStream {
            replay: false,
            region,
            offset: 0,
            len: reth.dma_len,
            first_psn: p,
            npkts,
            next: 0,
            msn: self.msn,
        }));
        self.epsn = psn::add(self.epsn, npkts);
        self.nak_sent = false;
        Ok(())
    }

    fn atomic(&mut self, repr: &RoceRepr, table: &dyn RemoteMemoryTable) -> Result<(), Fatal> {
        let p = repr.bth.psn;
        let Some(a) = repr.atomic_eth else {
            return Err(self.fatal(p, NakCode::InvalidRequest));
        };
        if a.va & 7 != 0 {
            return Err(self.fatal(p, NakCode::InvalidRequest));
        }
        let span = RemoteSpan::Range { va: a.va, len: 8 };
        let region = match table.verify(a.rkey, span, RemoteRight::Atomic.into()) {
            Ok(r) => r,
            Err(code) => return self.refuse(p, code),
        };
        let op = if repr.bth.opcode == Opcode::RC_COMPARE_SWAP {
            AtomicOp::CompareSwap {
                compare: a.compare,
                swap: a.swap_add,
            }
        } else {
            AtomicOp::FetchAdd { add: a.swap_add }
        };
        let orig = match region.atomic(0, op) {
            Ok(v) => v,
            Err(_) => return Err(self.fatal(p, NakCode::RemoteOperationalError)),
        };
        self.add_resource(Resource::Atomic { psn: p, orig });
        self.msn = psn::add(self.msn, 1);
        self.out.push_back(Response::AtomicAck {
            psn: p,
            orig,
            msn: self.msn,
        });
        self.epsn = psn::add(self.epsn, 1);
        self.nak_sent = false;
        Ok(())
    }

    fn flush_request(
        &mut self,
        repr: &RoceRepr,
        table: &dyn RemoteMemoryTable,
    ) -> Result<(), Fatal> {
        let p = repr.bth.psn;
        let (Some(feth), Some(reth)) = (repr.feth, repr.reth) else {
            return Err(self.fatal(p, NakCode::InvalidRequest));
        };
        // A FLUSH needs its key even when it is zero-length.
        let span = if feth.selectivity == FLUSH_SELECT_REGION {
            RemoteSpan::Region
        } else {
            RemoteSpan::Range {
                va: reth.va,
                len: u64::from(reth.dma_len),
            }
        };
        let persistent = feth.placement & FLUSH_PLACEMENT_PERSISTENT != 0;
        let need = RemoteNeed {
            right: RemoteRight::Flush,
            persistent,
        };
        let region = match table.verify(reth.rkey, span, need) {
            Ok(r) => r,
            Err(code) => return self.refuse(p, code),
        };
        if persistent {
            match region.persist(0, region.len()) {
                Ok(()) => {}
                Err(MemoryError::NotPersistent) => {
                    return self.refuse(p, NakCode::InvalidRequest);
                }
                Err(_) => return Err(self.fatal(p, NakCode::RemoteOperationalError)),
            }
        }
        self.add_resource(Resource::Flush { psn: p });
        self.msn = psn::add(self.msn, 1);
        self.out.push_back(Response::Read(ReadStream {
            replay: false,
            region: None,
            offset: 0,
            len: 0,
            first_psn: p,
            npkts: 1,
            next: 0,
            msn: self.msn,
        }));
        self.epsn = psn::add(self.epsn, 1);
        self.nak_sent = false;
        Ok(())
    }

    /// A request with a PSN before the expected one.
    fn duplicate(&mut self, repr: &RoceRepr, ctx: &Ctx, table: &dyn RemoteMemoryTable) {
        let p = repr.bth.psn;
        let op = repr.bth.opcode;
        if op.is_send() || op.is_write() {
            self.queue_ack(psn::add(self.epsn, psn::PSN_MASK));
            return;
        }
        if self.out.len() >= MAX_QUEUED_RESPONSES {
            return;
        }
        if op == Opcode::RC_RDMA_READ_REQUEST {
            let Some(reth) = repr.reth else { return };
            let npkts = ctx.mtu.packets(reth.dma_len);
            let known = self.resources.iter().any(|r| match *r {
                Resource::Read {
                    first_psn,
                    npkts: n,
                } => {
                    psn::diff(p, first_psn) >= 0
                        && psn::diff(psn::add(p, npkts - 1), psn::add(first_psn, n - 1)) <= 0
                }
                _ => false,
            });
            let end = psn::add(p, npkts - 1);
            let queued = self.out.iter().any(|o| {
                matches!(o, Response::Read(s) if s.first_psn == p && s.next == 0
                    && psn::diff(psn::add(s.first_psn, s.npkts - 1), end) >= 0)
            });
            if !known || queued {
                return;
            }
            // Replay just what was asked (the requester keeps the responses it has
            // and asks again from a gap): drop queued replays that this one covers,
            // leave every other response alone, and send the replay before the
            // responses for later PSNs, so a go-back-N requester (rxe) gets the gap
            // first.
            self.out.retain(|o| match o {
                Response::Read(s) if s.replay => {
                    let from = psn::add(s.first_psn, s.next);
                    let last = psn::add(s.first_psn, s.npkts - 1);
                    !(psn::diff(from, p) >= 0 && psn::diff(last, end) <= 0)
                }
                _ => true,
            });
            let need = RemoteRight::Read.into();
            if let Ok(region) = check_access(table, reth.rkey, reth.va, reth.dma_len, need) {
                trace!(psn = p, npkts, "duplicate READ: replaying");
                let at = self
                    .out
                    .iter()
                    .position(|o| {
                        matches!(o, Response::Read(s)
                            if psn::diff(psn::add(s.first_psn, s.next), p) > 0)
                    })
                    .unwrap_or(self.out.len());
                self.out.insert(
                    at,
                    Response::Read(ReadStream {
                        replay: true,
                        region,
                        offset: 0,
                        len: reth.dma_len,
                        first_psn: p,
                        npkts,
                        next: 0,
                        msn: self.msn,
                    }),
                );
            }
        } else if op.is_atomic() {
            let orig = self.resources.iter().find_map(|r| match *r {
                Resource::Atomic { psn, orig } if psn == p => Some(orig),
                _ => None,
            });
            if let Some(orig) = orig {
                self.out.push_back(Response::AtomicAck {
                    psn: p,
                    orig,
                    msn: self.msn,
                });
            }
        } else if op == Opcode::RC_FLUSH {
            let known = self
                .resources
                .iter()
                .any(|r| matches!(*r, Resource::Flush { psn } if psn == p));
            if known {
                self.out.push_back(Response::Read(ReadStream {
                    replay: true,
                    region: None,
                    offset: 0,
                    len: 0,
                    first_psn: p,
                    npkts: 1,
                    next: 0,
                    msn: self.msn,
                }));
            }
        }
    }

    /// Produces the next response packet.
    pub(super) fn next_packet(&mut self, ctx: &Ctx) -> Option<Vec<u8>> {
        let mtu = ctx.mtu.bytes();
        let front = self.out.front_mut()?;
        let (repr, read, done) = match front {
            Response::Ack { psn, syndrome, msn } => {
                let mut r = RoceRepr::new(ctx.bth(Opcode::RC_ACKNOWLEDGE, *psn, false));
                r.aeth = Some(AethRepr {
                    syndrome: *syndrome,
                    msn: *msn,
                });
                (r, None, true)
            }
            Response::AtomicAck { psn, orig, msn } => {
                let mut r = RoceRepr::new(ctx.bth(Opcode::RC_ATOMIC_ACKNOWLEDGE, *psn, false));
                r.aeth = Some(AethRepr {
                    syndrome: Syndrome::ACK,
                    msn: *msn,
                });
                r.atomic_ack = Some(*orig);
                (r, None, true)
            }
            Response::Read(s) => {
                let k = s.next;
                let off = k * mtu;
                let plen = mtu.min(s.len - off);
                let read = (s.region.clone(), s.offset + u64::from(off), plen as usize);
                let opcode = if s.npkts == 1 {
                    Opcode::RC_RDMA_READ_RESPONSE_ONLY
                } else if k == 0 {
                    Opcode::RC_RDMA_READ_RESPONSE_FIRST
                } else if k + 1 == s.npkts {
                    Opcode::RC_RDMA_READ_RESPONSE_LAST
                } else {
                    Opcode::RC_RDMA_READ_RESPONSE_MIDDLE
                };
                let mut r = RoceRepr::new(ctx.bth(opcode, psn::add(s.first_psn, k), false));
                if opcode != Opcode::RC_RDMA_READ_RESPONSE_MIDDLE {
                    r.aeth = Some(AethRepr {
                        syndrome: Syndrome::ACK,
                        msn: s.msn,
                    });
                }
                s.next += 1;
                (r, Some(read), s.next == s.npkts)
            }
        };
        if done {
            self.out.pop_front();
        }
        let Some((region, offset, plen)) = read else {
            return ctx.build(&repr, &[]);
        };
        // The payload goes from the region straight into the frame.
        ctx.build_with(&repr, plen, |buf| {
            if plen > 0 && region.is_none_or(|r| r.read(offset, buf).is_err()) {
                debug!("region read failed while answering a READ");
                buf.fill(0);
            }
            true
        })
    }

    /// Flushes receives (QP to ERROR); only ACK/NAK responses are kept so the NAK
    /// that explains the error still goes out.
    pub(super) fn flush(&mut self, comps: &mut VecDeque<Completion>) {
        if let Some(cur) = self.cur_recv.take() {
            self.rq.push_front(cur.wr);
        }
        while let Some(wr) = self.rq.pop_front() {
            comps.push_back(Completion {
                wr_id: wr.wr_id,
                opcode: WcOpcode::Recv,
                status: WcStatus::Flushed,
                byte_len: 0,
                imm: None,
            });
        }
        self.cur_write = None;
        self.resources.clear();
        self.out.retain(|o| matches!(o, Response::Ack { .. }));
    }
}

/// The table's one check for `len` bytes at `va`; `None` for a zero-length access,
/// which needs no key (IBTA 9.4.1.1).
fn check_access(
    table: &dyn RemoteMemoryTable,
    rkey: u32,
    va: u64,
    len: u32,
    need: RemoteNeed,
) -> Result<Option<Arc<dyn RemoteRegion>>, NakCode> {
    if len == 0 {
        return Ok(None);
    }
    let span = RemoteSpan::Range {
        va,
        len: u64::from(len),
    };
    table.verify(rkey, span, need).map(Some)
}
