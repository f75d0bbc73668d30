//! The NVMe-oF transport binding over any fabric provider, after the RDMA transport.
//!
//! * Connection data: the NVMe-oF RDMA CM private data. The host's connect data is a
//!   [`CmRequest`] (RECFMT 0, QID, HRQSIZE, HSQSIZE, CNTLID), the target answers with a
//!   [`CmAccept`] (CRQSIZE) as accept data or a [`CmReject`] as reject data.
//! * Capsules: a 64-byte SQE, followed by in-capsule data up to IOCCSZ, is one fabric
//!   message; a 16-byte CQE is one message back. Each side posts a receive for every
//!   message the peer may send (the host never has more commands outstanding than the
//!   target posted receives for, and posts a receive per outstanding command), and a
//!   receive buffer is posted again as soon as its bytes were copied out.
//! * Data: keyed SGL data block descriptors carry `RemoteMr::iov(offset)` addresses of
//!   host memory registered with the fabric and the region's key, which must fit 32
//!   bits ([`check_keys`]); the target moves data with fabric RMA read/write.
//!
//! * Progress: every queue uses [`Progress::Manual`](fabric::Progress::Manual) and
//!   drives its own endpoint from the thread that waits on it, polling the completion
//!   queue without sleeping for a short while ([`SPIN`]) after recent activity, then
//!   sleeping in `sread`. So a command costs no hand-off to a provider progress thread
//!   and, while commands keep coming, no sleep/wake-up either. A queue idle for 50 ms
//!   polls every 2 ms instead of sleeping on the provider's descriptors, which
//!   softroce shares between all endpoints on one address (every sleeper would wake
//!   for every queue's packets).
//! * Ordering: the target posts a Read's RMA write and the response right after each
//!   other, without waiting for the write's completion (as nvmet-rdma chains the RDMA
//!   WRITE and the SEND). That relies on the providers placing an RMA write before a
//!   message posted after it on the same endpoint is delivered: RC ordering on
//!   softroce and verbs (the responder executes requests in PSN order, IB spec
//!   9.5 "Transaction ordering"), the one ordered stream on tcp. The response is posted
//!   with [`OpFlags::FENCE`](fabric::OpFlags::FENCE), which asks exactly that of a
//!   provider that would not order it anyway. If the write fails, the connection ends
//!   (a refused remote access ends it at both ends) before the response is delivered.
//! * The write is posted at [`OpFlags::TRANSMIT_COMPLETE`](fabric::OpFlags::TRANSMIT_COMPLETE):
//!   its completion is the target's business (its buffer may be reused), not a
//!   promise to the host, which sees the data before the response that follows it.
//!   On tcp that completion comes when the write is handed to the socket and the host
//!   sends no acknowledgement for it (one `sendmsg` less on the host per Read, and no
//!   second wake-up of the target for the ACK); softroce and verbs complete it at the
//!   RC ACK, as before. `NVMEOF_WRITE_DELIVERY=1` posts it at the provider's default
//!   (delivery) level instead, for comparison.
//! * Batching: the RMA write is posted with [`OpFlags::MORE`](fabric::OpFlags::MORE)
//!   (libfabric's `FI_MORE`), and so is a response when the next capsule is already
//!   in the completion queue: tcp then hands data and response (and, at depth,
//!   several commands' worth) to the socket in one `sendmsg`, where it made one
//!   call each; softroce ignores the hint. `NVMEOF_MORE=0` turns it off.
//! * Arrival order: `Link::next_arrival` hands out completions in the order of
//!   the completion queue (messages and RMA completions alike), which is what lets a
//!   target queue serve the capsules behind a command still fetching its data.
//!
//! `Link` (crate-private) is one connected queue's fabric side, shared by target and host.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use fabric::{
    Access, Completion, CompletionQueue, Domain, Endpoint, Event, EventQueue, Info, MemoryRegion,
    Msg, OpFlags, RemoteIov, RmaMsg,
};

use crate::error::{Error, Result};
use crate::wire::rdma_cm::{CmAccept, CmReject, CmRejectStatus, CmRequest, RECFMT_1_0};

/// Bytes of a submission queue entry, the start of every command capsule.
pub const SQE_LEN: usize = 64;
/// Bytes of a response capsule (a completion queue entry).
pub const CQE_LEN: usize = 16;
/// In-capsule data a target accepts by default (as Linux nvmet-rdma: one page).
pub const DEFAULT_INLINE_DATA: usize = 4096;

const RECV_TAG: u64 = 1 << 62;
const OP_TAG: u64 = 1 << 61;
/// How long one blocking read of the completion queue sleeps at most.
const POLL_SLICE: Duration = Duration::from_millis(5);
/// How long a queue polls its completion queue without sleeping, after it last saw
/// a completion (a command round trip on loopback is tens of microseconds; past this,
/// the queue sleeps and the next completion costs a wake-up). `NVMEOF_SPIN_US`
/// overrides it (0: always sleep).
pub const SPIN: Duration = Duration::from_micros(200);
/// Activity older than this does not make a queue spin.
const SPIN_AFTER_ACTIVITY: Duration = Duration::from_millis(5);
/// A queue this long without a completion is idle: it polls every [`IDLE_NAP`]
/// instead of sleeping on the provider (the first command after idleness waits up to
/// that long).
const IDLE_AFTER: Duration = Duration::from_millis(50);
/// How long an idle queue sleeps between two looks at its completion queue.
const IDLE_NAP: Duration = Duration::from_millis(2);

fn spin_budget() -> Duration {
    std::env::var("NVMEOF_SPIN_US")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(SPIN, Duration::from_micros)
}

/// Refuses a provider whose memory keys do not fit a keyed SGL's 32-bit key.
pub fn check_keys(info: &Info) -> Result<()> {
    if info.limits.mr_key_size > 4 {
        return Err(Error::KeysTooWide {
            provider: info.provider_name.clone(),
            key_size: info.limits.mr_key_size,
        });
    }
    Ok(())
}

/// The 32-bit key of a region, or an error if the provider chose a wider one.
pub fn key32(mr: &MemoryRegion) -> Result<u32> {
    u32::try_from(mr.key()).map_err(|_| Error::KeysTooWide {
        provider: mr.domain().info().provider_name.clone(),
        key_size: 8,
    })
}

/// The host's connect data for queue `qid` with `depth` entries.
pub fn cm_request(qid: u16, depth: u16, cntlid: u16) -> [u8; 32] {
    let mut b = [0u8; 32];
    // 32 bytes is CmRequest's size, so emit cannot fail.
    let _ = CmRequest {
        recfmt: RECFMT_1_0,
        qid,
        hrqsize: depth,
        hsqsize: depth.saturating_sub(1),
        cntlid,
    }
    .emit(&mut b);
    b
}

/// The target's accept data: `crqsize` receives posted.
pub fn cm_accept(crqsize: u16) -> [u8; 32] {
    let mut b = [0u8; 32];
    let _ = CmAccept {
        recfmt: RECFMT_1_0,
        crqsize,
    }
    .emit(&mut b);
    b
}

/// The target's reject data.
pub fn cm_reject(status: CmRejectStatus) -> [u8; 4] {
    let mut b = [0u8; 4];
    let _ = CmReject::new(status).emit(&mut b);
    b
}

/// Direction of an RMA transfer the target waits for (its writes go by
/// [`Link::post_write_then_send`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rma {
    /// From the peer's memory.
    Read,
}

impl Rma {
    fn name(self) -> &'static str {
        match self {
            Rma::Read => "RMA read",
        }
    }
}

/// What [`Link::next_arrival`] found.
#[derive(Debug)]
pub(crate) enum Arrival {
    /// A message in receive slot `slot`, `len` bytes.
    Message {
        /// Receive slot.
        slot: usize,
        /// Bytes received.
        len: usize,
    },
    /// A posted operation ended (an RMA transfer, or a send not waited for).
    Op {
        /// Its context.
        ctx: u64,
        /// Why it failed, if it did.
        error: Option<String>,
    },
}

/// One connected queue: endpoint, its queues, and the receive buffers.
pub(crate) struct Link {
    pub(crate) ep: Endpoint,
    pub(crate) cq: CompletionQueue,
    pub(crate) eq: EventQueue,
    recv_mr: MemoryRegion,
    slot_len: usize,
    slots: usize,
    send_mr: MemoryRegion,
    stash: VecDeque<Completion>,
    next_op: u64,
    closed: Option<String>,
    inject_size: usize,
    spin: Duration,
    more: bool,
    /// A Read's RMA write at transmit level (`NVMEOF_WRITE_DELIVERY=1`: the
    /// provider's default, delivery, for comparison).
    write_transmit: bool,
    last_activity: Instant,
    /// The completion batch of the last poll, kept for its allocation.
    scratch: Vec<Completion>,
}

impl Link {
    /// Wraps a (connecting or accepted) endpoint and posts `slots` receives of
    /// `slot_len` bytes each.
    pub(crate) fn new(
        domain: &Domain,
        ep: Endpoint,
        cq: CompletionQueue,
        eq: EventQueue,
        slots: usize,
        slot_len: usize,
    ) -> Result<Link> {
        let recv_mr = domain.alloc(slots.max(1) * slot_len, Access::LOCAL)?;
        let send_mr = domain.alloc(slot_len.max(SQE_LEN + DEFAULT_INLINE_DATA), Access::LOCAL)?;
        let inject_size = ep.info().limits.inject_size;
        let link = Link {
            ep,
            cq,
            eq,
            recv_mr,
            slot_len,
            slots,
            send_mr,
            stash: VecDeque::new(),
            next_op: 0,
            closed: None,
            inject_size,
            spin: spin_budget(),
            more: std::env::var("NVMEOF_MORE").map_or(true, |v| v.trim() != "0"),
            write_transmit: std::env::var("NVMEOF_WRITE_DELIVERY")
                .map_or(true, |v| v.trim() != "1"),
            last_activity: Instant::now(),
            scratch: Vec::with_capacity(64),
        };
        for slot in 0..slots {
            link.post_recv(slot)?;
        }
        Ok(link)
    }

    fn post_recv(&self, slot: usize) -> Result<()> {
        self.ep.recv(
            self.recv_mr.iov(slot * self.slot_len, self.slot_len),
            RECV_TAG | slot as u64,
        )?;
        Ok(())
    }

    fn dead(&self) -> Error {
        Error::Disconnected(self.closed.clone().unwrap_or_default())
    }

    /// Reads connection events: a shutdown marks the link closed.
    fn check_events(&mut self) {
        while let Ok(Some(ev)) = self.eq.read() {
            match ev {
                Event::Shutdown { reason, .. } => {
                    self.closed.get_or_insert_with(|| reason.to_string());
                }
                Event::Error { error, .. } => {
                    self.closed.get_or_insert_with(|| error.to_string());
                }
                _ => {}
            }
        }
    }

    /// Waits until the connection is established (the `Connected` event).
    pub(crate) fn wait_connected(&mut self, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.eq.sread(Some(POLL_SLICE))? {
                Some(Event::Connected { data, .. }) => return Ok(data),
                Some(Event::Error { error, data, .. }) => {
                    if data.is_empty() {
                        return Err(Error::Fabric(error));
                    }
                    let status = CmReject::parse(&data).ok().map(|r| r.status);
                    return Err(Error::Rejected(status));
                }
                Some(Event::Shutdown { reason, .. }) => {
                    return Err(Error::Disconnected(reason.to_string()))
                }
                _ => {}
            }
            // Drives progress for providers with manual progress.
            let mut v = Vec::new();
            let _ = self.cq.read(&mut v, 16);
            self.stash.extend(v);
            if Instant::now() >= deadline {
                return Err(Error::Timeout("connection not established".into()));
            }
        }
    }

    /// Reads completions into the stash: polls without sleeping for up to the spin
    /// budget when the queue was recently active, otherwise (or then) sleeps up to
    /// `slice`.
    fn poll(&mut self, slice: Duration) -> Result<()> {
        // Reused between polls: a busy poll allocates nothing.
        let mut v = std::mem::take(&mut self.scratch);
        v.clear();
        let now = Instant::now();
        if slice.is_zero() {
            // One look, no waiting (a future's poll).
            match self.cq.read(&mut v, 64) {
                Ok(0) => {}
                Ok(_) => self.last_activity = now,
                Err(e) => {
                    self.check_events();
                    if self.closed.is_some() {
                        return Err(self.dead());
                    }
                    return Err(e.into());
                }
            }
            self.stash.extend(v.drain(..));
            self.scratch = v;
            self.check_events();
            return Ok(());
        }
        if !self.spin.is_zero() && now.duration_since(self.last_activity) < SPIN_AFTER_ACTIVITY {
            let until = now + self.spin.min(slice);
            let mut n = 0u32;
            loop {
                match self.cq.read(&mut v, 64) {
                    Ok(0) => {}
                    Ok(_) => {
                        self.last_activity = Instant::now();
                        self.stash.extend(v.drain(..));
                        self.scratch = v;
                        return Ok(());
                    }
                    Err(e) => {
                        self.check_events();
                        if self.closed.is_some() {
                            return Err(self.dead());
                        }
                        return Err(e.into());
                    }
                }
                n = n.wrapping_add(1);
                if n.is_multiple_of(16) {
                    if Instant::now() >= until {
                        break;
                    }
                    self.check_events();
                    if self.closed.is_some() {
                        return Err(self.dead());
                    }
                }
                // Yielding, never a bare spin: on two cores shared with other work a
                // spinning host holds the core its target thread needs (a 30 µs
                // bare spin before yielding made the QD1 median 4-5 × worse at load
                // average 9).
                std::thread::yield_now();
            }
        }
        if now.duration_since(self.last_activity) >= IDLE_AFTER {
            // Idle: look without sleeping on the provider's descriptors (softroce
            // shares its socket between every endpoint on an address, so a sleeping
            // read would wake for the other queues' packets), then nap.
            match self.cq.read(&mut v, 64) {
                Ok(0) => std::thread::sleep(IDLE_NAP.min(slice)),
                Ok(_) => self.last_activity = Instant::now(),
                Err(e) => {
                    self.check_events();
                    if self.closed.is_some() {
                        return Err(self.dead());
                    }
                    return Err(e.into());
                }
            }
            self.stash.extend(v.drain(..));
            self.scratch = v;
            self.check_events();
            return Ok(());
        }
        match self.cq.sread(&mut v, 64, Some(slice)) {
            Ok(_) => {}
            Err(e) => {
                self.check_events();
                if self.closed.is_some() {
                    return Err(self.dead());
                }
                return Err(e.into());
            }
        }
        if !v.is_empty() {
            self.last_activity = Instant::now();
        }
        self.stash.extend(v.drain(..));
        self.scratch = v;
        self.check_events();
        Ok(())
    }

    /// The next completion in the order the completion queue gave them: a received
    /// message (still in its receive slot: [`take_message`](Self::take_message)
    /// copies it out and posts the receive again) or a posted operation's end.
    /// `None` when nothing arrived within `timeout`.
    pub(crate) fn next_arrival(&mut self, timeout: Duration) -> Result<Option<Arrival>> {
        let deadline = Instant::now() + timeout;
        let mut polled = false;
        loop {
            if let Some(c) = self.stash.pop_front() {
                if c.context & RECV_TAG != 0 {
                    if let Err(e) = &c.status {
                        self.closed
                            .get_or_insert_with(|| format!("receive failed: {e:?}"));
                        return Err(self.dead());
                    }
                    let slot = (c.context & !RECV_TAG) as usize;
                    if slot >= self.slots {
                        return Err(Error::Protocol(format!("unknown receive context {slot}")));
                    }
                    return Ok(Some(Arrival::Message {
                        slot,
                        len: c.len.min(self.slot_len),
                    }));
                }
                return Ok(Some(Arrival::Op {
                    ctx: c.context,
                    error: c.status.err().map(|e| format!("{e:?}")),
                }));
            }
            if self.closed.is_some() {
                return Err(self.dead());
            }
            let now = Instant::now();
            // A zero timeout still looks at the completion queue once.
            if now >= deadline && polled {
                return Ok(None);
            }
            self.poll(POLL_SLICE.min(deadline.saturating_duration_since(now)))?;
            polled = true;
        }
    }

    /// Copies the message of an [`Arrival::Message`] into `out` (replacing its
    /// contents, reusing its allocation) and posts the receive again.
    pub(crate) fn take_message(
        &mut self,
        slot: usize,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.clear();
        out.resize(len, 0);
        self.recv_mr.read_at(slot * self.slot_len, out)?;
        self.post_recv(slot)
    }

    /// Sends one message (a capsule or a response), delivered after every RMA write
    /// posted before it (see the module docs on ordering).
    pub(crate) fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.send_hinted(bytes, false)
    }

    /// Whether the next arrival is a message already received (a capsule the
    /// target serves at once, so a response it sends now may wait to go with the
    /// next one).
    pub(crate) fn message_waiting(&self) -> bool {
        self.stash
            .front()
            .is_some_and(|c| c.context & RECV_TAG != 0 && c.status.is_ok())
    }

    /// [`send`](Self::send), with `more`: another send or RMA write without it
    /// follows at once, so a short message goes with [`OpFlags::MORE`] (tcp hands
    /// both to the socket in one `sendmsg`). The caller must post that one.
    pub(crate) fn send_hinted(&mut self, bytes: &[u8], more: bool) -> Result<()> {
        if self.closed.is_some() {
            return Err(self.dead());
        }
        if bytes.len() <= self.inject_size {
            let flags = if more && self.more {
                OpFlags::INJECT | OpFlags::FENCE | OpFlags::MORE
            } else {
                OpFlags::INJECT | OpFlags::FENCE
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            // Injected: copied at the call, so the buffer is free again at once.
            self.send_mr.write_at(0, bytes)?;
            loop {
                let iov = [self.send_mr.iov(0, bytes.len())];
                let msg = Msg {
                    iov: &iov,
                    context: 0,
                    data: 0,
                };
                match self.ep.sendmsg(&msg, flags) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == fabric::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            return Err(e.into());
                        }
                        self.poll(Duration::from_micros(200))?;
                    }
                    Err(e) => {
                        self.check_events();
                        return Err(e.into());
                    }
                }
            }
        }
        if bytes.len() > self.send_mr.len() {
            return Err(Error::Config(format!(
                "message of {} bytes exceeds the send buffer",
                bytes.len()
            )));
        }
        self.send_mr.write_at(0, bytes)?;
        let ctx = self.op_context();
        let iov = [self.send_mr.iov(0, bytes.len())];
        let msg = Msg {
            iov: &iov,
            context: ctx,
            data: 0,
        };
        self.ep
            .sendmsg(&msg, OpFlags::COMPLETION | OpFlags::FENCE)?;
        self.wait_op(ctx, "send")
    }

    fn op_context(&mut self) -> u64 {
        self.next_op = self.next_op.wrapping_add(1) & (OP_TAG - 1);
        OP_TAG | self.next_op
    }

    /// One RMA transfer between `local[offset..offset + remote.len]` and `remote`
    /// (read: remote to local; write: local to remote); returns when done.
    pub(crate) fn rma(
        &mut self,
        dir: Rma,
        local: &MemoryRegion,
        offset: usize,
        remote: RemoteIov,
    ) -> Result<()> {
        let ctx = self.post_rma(dir, local, offset, remote)?;
        self.wait_op(ctx, dir.name())
    }

    /// Posts one RMA transfer and returns its context for
    /// [`wait_op`](Self::wait_op); `local` must not be reused before that.
    pub(crate) fn post_rma(
        &mut self,
        dir: Rma,
        local: &MemoryRegion,
        offset: usize,
        remote: RemoteIov,
    ) -> Result<u64> {
        let ctx = self.op_context();
        let iov = local.iov(offset, remote.len);
        match dir {
            Rma::Read => self.ep.read(iov, remote, ctx)?,
        }
        Ok(ctx)
    }

    /// Posts an RMA write that a [`send`](Self::send) follows at once (a Read's
    /// data, then its response): with [`OpFlags::MORE`], so a provider that can
    /// hands both to the wire together (tcp: one `sendmsg` instead of two). The
    /// caller must send next.
    pub(crate) fn post_write_then_send(
        &mut self,
        local: &MemoryRegion,
        remote: RemoteIov,
    ) -> Result<u64> {
        let ctx = self.op_context();
        let iov = [local.iov(0, remote.len)];
        // Transmit level: the target needs the completion only to reuse its buffer,
        // and the host learns of the data from the response behind it on the same
        // connection, so no delivery acknowledgement is asked of the host (tcp then
        // sends none; softroce and verbs complete an RC write at its ACK anyway).
        let mut flags = OpFlags::COMPLETION;
        if self.write_transmit {
            flags |= OpFlags::TRANSMIT_COMPLETE;
        }
        if self.more {
            flags |= OpFlags::MORE;
        }
        self.ep.writemsg(
            &RmaMsg {
                iov: &iov,
                rma_iov: &[remote],
                context: ctx,
                data: 0,
            },
            flags,
        )?;
        Ok(ctx)
    }

    /// Waits for the operation posted with context `ctx`.
    pub(crate) fn wait_op(&mut self, ctx: u64, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.stash.iter().position(|c| c.context == ctx) {
                let c = self.stash.remove(i).unwrap_or_else(|| unreachable!());
                return match c.status {
                    Ok(()) => Ok(()),
                    Err(e) => Err(Error::Transfer(format!("{what}: {e:?}"))),
                };
            }
            if self.closed.is_some() {
                return Err(Error::Transfer(format!(
                    "{what}: {}",
                    self.closed.clone().unwrap_or_default()
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!("{what} did not complete")));
            }
            self.poll(POLL_SLICE)?;
        }
    }

    /// Ends the connection (both sides get a shutdown event).
    pub(crate) fn shutdown(&mut self) {
        let _ = self.ep.shutdown();
        self.closed
            .get_or_insert_with(|| "shut down locally".into());
    }
}
