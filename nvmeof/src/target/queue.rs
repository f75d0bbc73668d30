//! One target queue: capsules in, commands dispatched, data moved, responses out
//! (the request life cycle of nvmet's rdma.c, one thread per queue).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use fabric::{Access, Domain, Fabric, MemoryRegion, RemoteIov};

use super::ctrl::{Controller, MAX_TRANSFER};
use super::{admin_cmd, fabrics_cmd, io_cmd, Shared};
use crate::error::Error;
use crate::transport::{Arrival, Link, Rma, SQE_LEN};
use crate::wire::log::ErrorInformationEntry;
use crate::wire::sqe::{Dptr, Fuse};
use crate::wire::{CqeRepr, SglRepr, Sqe, SqeRepr, Status, StatusCode, WireError};

/// How a command ended when it did not fail.
pub(crate) enum Outcome {
    /// Completed; DW0 (low half) and DW1 of the response.
    Done(u64),
    /// Held without a response (Asynchronous Event Request).
    Held,
}

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum CmdError {
    /// Complete the command with this status (DNR set), optional parameter error
    /// location (byte offset in the SQE) and DW0.
    Fail {
        status: StatusCode,
        location: Option<u16>,
        dw0: u32,
    },
    /// The queue cannot go on (its connection failed).
    Fatal(Error),
}

impl CmdError {
    /// A failure at byte `location` of the SQE.
    pub(crate) fn at(status: StatusCode, location: usize) -> CmdError {
        CmdError::Fail {
            status,
            location: u16::try_from(location).ok(),
            dw0: 0,
        }
    }
}

impl From<StatusCode> for CmdError {
    fn from(status: StatusCode) -> Self {
        CmdError::Fail {
            status,
            location: None,
            dw0: 0,
        }
    }
}

impl From<WireError> for CmdError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Invalid { offset, status, .. } => CmdError::at(status, offset),
            WireError::Truncated { .. } => StatusCode::DataSglLengthInvalid.into(),
        }
    }
}

pub(crate) type CmdResult = Result<Outcome, CmdError>;

/// Back-end errors become Internal Error (nvmet maps errno the same way for most).
pub(crate) fn backend(e: Error) -> CmdError {
    tracing::warn!("back end: {e}");
    StatusCode::InternalError.into()
}

/// Registered buffers that data passes through between a back end and the host, one
/// per command in progress, allocated as the queue needs them (a QD1 queue uses two).
/// A Read's RMA write is posted and its response follows at once; the buffer comes
/// back when the write's completion arrives (or, if every buffer is taken, when the
/// oldest write is waited for). A Write's data is fetched by an RMA read into a buffer
/// while the queue serves other commands.
pub(crate) struct BouncePool {
    domain: Domain,
    bufs: Vec<MemoryRegion>,
    free: Vec<usize>,
    /// RMA writes still reading from a buffer: (context, buffer), oldest first.
    writing: VecDeque<(u64, usize)>,
    max: usize,
}

/// Bounce buffers per queue beyond its depth (writes whose completion is not in yet).
const BOUNCE_SPARE: usize = 4;

impl BouncePool {
    fn new(domain: &Domain, depth: usize) -> BouncePool {
        BouncePool {
            domain: domain.clone(),
            bufs: Vec::new(),
            free: Vec::new(),
            writing: VecDeque::new(),
            max: depth.max(1) + BOUNCE_SPARE,
        }
    }

    /// A free buffer: a returned one, a new one, or the oldest write's once done.
    fn take(&mut self, link: &mut Link) -> Result<usize, CmdError> {
        if let Some(i) = self.free.pop() {
            return Ok(i);
        }
        if self.bufs.len() < self.max {
            let mr = self
                .domain
                .alloc(MAX_TRANSFER, Access::LOCAL)
                .map_err(|e| CmdError::Fatal(e.into()))?;
            self.bufs.push(mr);
            return Ok(self.bufs.len() - 1);
        }
        let Some((ctx, i)) = self.writing.pop_front() else {
            return Err(CmdError::Fatal(Error::Protocol(
                "every bounce buffer is held by a command in progress".into(),
            )));
        };
        // The response of that command is gone already: a failed write here means
        // the connection has ended, so the queue ends too.
        link.wait_op(ctx, "RMA write")
            .map_err(|e| CmdError::Fatal(Error::Transfer(e.to_string())))?;
        Ok(i)
    }

    fn give_back(&mut self, i: usize) {
        self.free.push(i);
    }

    /// An operation's completion arrived: if it is an RMA write from a buffer, the
    /// buffer is free again. Returns whether it was one.
    fn write_done(&mut self, ctx: u64) -> bool {
        match self.writing.iter().position(|&(c, _)| c == ctx) {
            Some(at) => {
                if let Some((_, i)) = self.writing.remove(at) {
                    self.free.push(i);
                }
                true
            }
            None => false,
        }
    }
}

/// The data of one command, as its SGL describes it.
pub(crate) struct Xfer<'a> {
    link: &'a mut Link,
    bounce: &'a mut BouncePool,
    sgl: SglRepr,
    inline: &'a [u8],
    /// The bounce buffer holding a keyed SGL's data, already read from the host.
    prefetched: Option<usize>,
}

const DPTR: usize = 24;

impl Xfer<'_> {
    fn check_type(&self) -> Result<(), CmdError> {
        match self.sgl {
            SglRepr::Keyed(_) | SglRepr::InCapsule { .. } => Ok(()),
            SglRepr::DataBlock { .. } => Err(CmdError::at(StatusCode::InvalidField, DPTR)),
            _ => Err(CmdError::at(StatusCode::SglDescriptorTypeInvalid, DPTR)),
        }
    }

    /// The SGL's data length.
    pub(crate) fn len(&self) -> usize {
        match self.sgl {
            SglRepr::Keyed(k) => k.length() as usize,
            SglRepr::InCapsule { length, .. } => length as usize,
            _ => 0,
        }
    }

    /// A command that moves no data: the descriptor must say 0 bytes.
    pub(crate) fn none(&self) -> Result<(), CmdError> {
        self.check_type()?;
        if self.len() != 0 {
            return Err(CmdError::at(StatusCode::DataSglLengthInvalid, DPTR + 8));
        }
        Ok(())
    }

    fn expect(&self, len: usize) -> Result<(), CmdError> {
        self.check_type()?;
        if self.len() != len {
            return Err(CmdError::at(StatusCode::DataSglLengthInvalid, DPTR + 8));
        }
        if len > MAX_TRANSFER {
            return Err(StatusCode::InvalidField.into());
        }
        Ok(())
    }

    /// Data from the host, `len` bytes (in-capsule or by RMA read).
    pub(crate) fn fetch(&mut self, len: usize) -> Result<Vec<u8>, CmdError> {
        self.expect(len)?;
        self.read_host(len)
    }

    /// The first `len` bytes of the host's data, where the SGL may describe more (as
    /// Linux nvmet's `nvmet_check_data_len_lte` allows): Linux hosts send a Dataset
    /// Management range list in a buffer of 256 ranges (4 KiB) whatever NR says.
    pub(crate) fn fetch_prefix(&mut self, len: usize) -> Result<Vec<u8>, CmdError> {
        self.check_type()?;
        if self.len() < len {
            return Err(CmdError::at(StatusCode::DataSglLengthInvalid, DPTR + 8));
        }
        if self.len() > MAX_TRANSFER {
            return Err(StatusCode::InvalidField.into());
        }
        self.read_host(len)
    }

    fn read_host(&mut self, len: usize) -> Result<Vec<u8>, CmdError> {
        match self.sgl {
            SglRepr::InCapsule { offset, length } => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                if start > self.inline.len() {
                    return Err(CmdError::at(StatusCode::SglOffsetInvalid, DPTR));
                }
                // The whole described range must have arrived, even if less is used.
                if start.saturating_add(length as usize) > self.inline.len() {
                    return Err(CmdError::at(StatusCode::DataSglLengthInvalid, DPTR + 8));
                }
                self.inline
                    .get(start..start.saturating_add(len))
                    .map(<[u8]>::to_vec)
                    .ok_or(CmdError::at(StatusCode::DataSglLengthInvalid, DPTR + 8))
            }
            SglRepr::Keyed(k) => {
                if len == 0 {
                    return Ok(Vec::new());
                }
                if let Some(i) = self.prefetched {
                    return self.bounce.bufs[i]
                        .to_vec(0, len)
                        .map_err(|e| CmdError::Fatal(e.into()));
                }
                let remote = RemoteIov {
                    addr: k.address(),
                    len,
                    key: u64::from(k.key()),
                };
                let i = self.bounce.take(self.link)?;
                let buf = &self.bounce.bufs[i];
                let r = self
                    .link
                    .rma(Rma::Read, buf, 0, remote)
                    .map_err(transfer_failed)
                    .and_then(|()| buf.to_vec(0, len).map_err(|e| CmdError::Fatal(e.into())));
                self.bounce.give_back(i);
                r
            }
            _ => Err(StatusCode::InvalidField.into()),
        }
    }

    /// Data to the host (by RMA write): exactly the descriptor's length.
    pub(crate) fn put(&mut self, data: &[u8]) -> Result<(), CmdError> {
        self.put_with(data.len(), |buf| {
            buf.copy_from_slice(data);
            Ok(())
        })
    }

    /// Data to the host (by RMA write), `len` bytes (exactly the descriptor's length)
    /// that `fill` writes straight into the registered buffer the transfer goes from.
    pub(crate) fn put_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), CmdError>,
    ) -> Result<(), CmdError> {
        self.expect(len)?;
        match self.sgl {
            SglRepr::Keyed(k) => {
                if len == 0 {
                    return Ok(());
                }
                let i = self.bounce.take(self.link)?;
                let buf = &self.bounce.bufs[i];
                // SAFETY: buffer `i` is free: no operation is posted on it (its last
                // RMA write completed, or it is new) and no other slice of it lives;
                // the slice ends before the RMA write below is posted.
                let filled = fill(unsafe { &mut buf.as_mut_slice()[..len] });
                if let Err(e) = filled {
                    self.bounce.give_back(i);
                    return Err(e);
                }
                let remote = RemoteIov {
                    addr: k.address(),
                    len,
                    key: u64::from(k.key()),
                };
                // Posted, not waited for: the response follows it in order.
                match self.link.post_write_then_send(buf, remote) {
                    Ok(ctx) => {
                        self.bounce.writing.push_back((ctx, i));
                        Ok(())
                    }
                    Err(e) => {
                        self.bounce.give_back(i);
                        Err(transfer_failed(e))
                    }
                }
            }
            // In-capsule data only flows from the host.
            _ => Err(CmdError::at(StatusCode::InvalidField, DPTR)),
        }
    }
}

fn transfer_failed(e: Error) -> CmdError {
    tracing::debug!("data transfer: {e}");
    StatusCode::DataTransferError.into()
}

/// What a command handler sees.
pub(crate) struct Cmd<'a> {
    pub(crate) sqe: SqeRepr,
    pub(crate) qid: u16,
    pub(crate) xfer: Xfer<'a>,
}

/// A command waiting for its data: the RMA read of its keyed SGL is in flight.
struct Deferred {
    /// Context of the RMA read.
    ctx: u64,
    /// Bounce buffer it reads into.
    buf: usize,
    /// The command capsule's SQE.
    sqe: [u8; SQE_LEN],
}

/// A target queue's state and loop.
pub(crate) struct TargetQueue {
    pub(crate) link: Link,
    pub(crate) shared: Arc<Shared>,
    pub(crate) portid: u16,
    pub(crate) qid: u16,
    pub(crate) depth: u16,
    pub(crate) ctrl: Option<Arc<Controller>>,
    pub(crate) inline_data: usize,
    bounce: BouncePool,
    /// Commands whose data is being fetched, in the order they arrived.
    deferred: Vec<Deferred>,
    /// The capsule being served (reused: no allocation per command).
    capsule: Vec<u8>,
    sq_head: u16,
    // The queue's own progress engine, alive as long as the queue.
    _fabric: Fabric,
}

impl TargetQueue {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        fabric: Fabric,
        domain: &Domain,
        link: Link,
        shared: Arc<Shared>,
        portid: u16,
        qid: u16,
        depth: u16,
        inline_data: usize,
    ) -> Result<TargetQueue, Error> {
        Ok(TargetQueue {
            bounce: BouncePool::new(domain, depth.into()),
            link,
            shared,
            portid,
            qid,
            depth,
            ctrl: None,
            inline_data,
            deferred: Vec::new(),
            capsule: Vec::with_capacity(SQE_LEN + inline_data),
            sq_head: 0,
            _fabric: fabric,
        })
    }

    /// Serves the queue until its connection ends, its controller is torn down or
    /// the target stops. Completions are taken in the order the completion queue
    /// gives them: a capsule is served at once, except a command whose data must be
    /// read from the host, which waits for that RMA read while the queue serves
    /// the capsules behind it (so responses can leave out of order, as NVMe allows).
    pub(crate) fn run(mut self) {
        if let Err(e) = self.link.wait_connected(Duration::from_secs(10)) {
            tracing::debug!("queue {} never connected: {e}", self.qid);
            return;
        }
        loop {
            if self.shared.stopping() {
                break;
            }
            if let Some(ctrl) = &self.ctrl {
                if ctrl.is_dead() {
                    break;
                }
                if self.qid == 0 && ctrl.keep_alive_expired() {
                    ctrl.kill("keep-alive timeout expired");
                    break;
                }
            }
            let step = match self.link.next_arrival(Duration::from_millis(20)) {
                Ok(Some(Arrival::Message { slot, len })) => {
                    let mut capsule = std::mem::take(&mut self.capsule);
                    let r = self
                        .link
                        .take_message(slot, len, &mut capsule)
                        .and_then(|()| self.serve(&capsule));
                    self.capsule = capsule;
                    r
                }
                Ok(Some(Arrival::Op { ctx, error })) => self.op_done(ctx, error),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                tracing::debug!("queue {}: {e}", self.qid);
                break;
            }
        }
        self.link.shutdown();
        if let Some(ctrl) = &self.ctrl {
            if self.qid == 0 {
                ctrl.kill("admin queue disconnected");
                self.shared.remove_controller(ctrl);
            }
        }
    }

    /// A capsule: starts the RMA read of a command that needs its data from the
    /// host, or handles the command now.
    fn serve(&mut self, capsule: &[u8]) -> Result<(), Error> {
        if let Some(remote) = self.needs_fetch(capsule) {
            if let Ok(buf) = self.bounce.take(&mut self.link) {
                match self
                    .link
                    .post_rma(Rma::Read, &self.bounce.bufs[buf], 0, remote)
                {
                    Ok(ctx) => {
                        let mut sqe = [0u8; SQE_LEN];
                        sqe.copy_from_slice(&capsule[..SQE_LEN]);
                        self.deferred.push(Deferred { ctx, buf, sqe });
                        return Ok(());
                    }
                    // Handled now, where the transfer fails with the usual status.
                    Err(_) => self.bounce.give_back(buf),
                }
            }
        }
        self.handle(capsule, None)
    }

    /// The remote data of an I/O command that transfers from the host by a keyed
    /// SGL (opcode bits 1:0 = 01b: Write, Compare, Dataset Management, Copy), on a
    /// ready controller; `None` for every other capsule, which is handled at once.
    fn needs_fetch(&self, capsule: &[u8]) -> Option<RemoteIov> {
        if self.qid == 0 || capsule.len() != SQE_LEN {
            return None;
        }
        let ctrl = self.ctrl.as_ref()?;
        if !ctrl.is_ready() || ctrl.is_dead() {
            return None;
        }
        let sqe = SqeRepr::parse(&Sqe::new_checked(capsule).ok()?).ok()?;
        if sqe.opcode & 0b11 != 0b01
            || sqe.opcode == crate::wire::fabrics::FABRICS_OPCODE
            || sqe.fuse != Fuse::Normal
        {
            return None;
        }
        match sqe.dptr {
            Dptr::Sgl(SglRepr::Keyed(k))
                if k.length() > 0 && k.length() as usize <= MAX_TRANSFER =>
            {
                Some(RemoteIov {
                    addr: k.address(),
                    len: k.length() as usize,
                    key: u64::from(k.key()),
                })
            }
            _ => None,
        }
    }

    /// An operation ended: a deferred command's data is in (or failed to come), or
    /// an RMA write's buffer is free again.
    fn op_done(&mut self, ctx: u64, error: Option<String>) -> Result<(), Error> {
        if let Some(at) = self.deferred.iter().position(|d| d.ctx == ctx) {
            let d = self.deferred.remove(at);
            let r = match error {
                None => self.handle(&d.sqe, Some(d.buf)),
                Some(e) => {
                    tracing::debug!("queue {}: RMA read: {e}", self.qid);
                    self.respond(&d.sqe, Err(StatusCode::DataTransferError.into()))
                }
            };
            self.bounce.give_back(d.buf);
            return r;
        }
        if self.bounce.write_done(ctx) {
            if let Some(e) = error {
                // The response of that command is gone already: the connection has
                // ended, so the queue ends too.
                return Err(Error::Transfer(format!("RMA write: {e}")));
            }
        }
        Ok(())
    }

    /// One capsule: parse, dispatch, answer. An error ends the queue.
    fn handle(&mut self, capsule: &[u8], prefetched: Option<usize>) -> Result<(), Error> {
        if capsule.len() < SQE_LEN {
            return Err(Error::Protocol(format!(
                "capsule of {} bytes, shorter than an SQE",
                capsule.len()
            )));
        }
        let view = Sqe::new_checked(capsule)?;
        let parsed = SqeRepr::parse(&view);
        let inline = view.in_capsule_data();
        let result = match parsed {
            Err(e) => Err(CmdError::from(e)),
            Ok(sqe) => self.dispatch(sqe, inline, prefetched),
        };
        self.respond(capsule, result)
    }

    /// Sends the response of the command whose capsule starts with `capsule` (none
    /// for a held command).
    fn respond(&mut self, capsule: &[u8], result: CmdResult) -> Result<(), Error> {
        let view = Sqe::new_checked(capsule)?;
        let cid = view.cid();
        self.sq_head = (self.sq_head + 1) % self.depth.max(1);
        let mut cqe = CqeRepr {
            sq_head: self.sq_head,
            sq_id: self.qid,
            cid,
            ..Default::default()
        };
        match result {
            Ok(Outcome::Held) => return Ok(()),
            Ok(Outcome::Done(result)) => {
                cqe.dw0 = result as u32;
                cqe.dw1 = (result >> 32) as u32;
            }
            Err(CmdError::Fatal(e)) => return Err(e),
            Err(CmdError::Fail {
                status,
                location,
                dw0,
            }) => {
                cqe.status = Status::new(status).with_dnr();
                cqe.dw0 = dw0;
                if let Some(ctrl) = &self.ctrl {
                    ctrl.log_error(ErrorInformationEntry {
                        sqid: self.qid,
                        cid,
                        status_field: cqe.status.to_field(false),
                        parameter_error_location: location.map_or(0xFFFF, |l| {
                            ErrorInformationEntry::parameter_location(l as u8, 0)
                        }),
                        nsid: view.nsid(),
                        ..Default::default()
                    });
                }
            }
        }
        // A capsule already received is served next: on an I/O queue this response
        // may go to the wire with that command's first transfer or response (its
        // handling always posts one: a response, an RMA read, or the queue ends).
        let more = self.qid != 0 && self.link.message_waiting();
        self.link.send_hinted(&cqe.to_bytes(), more)
    }

    fn dispatch(&mut self, sqe: SqeRepr, inline: &[u8], prefetched: Option<usize>) -> CmdResult {
        // Fabrics transports carry SGLs only (PSDT 01b), and this target has no fused
        // operations.
        let sgl = match sqe.dptr {
            Dptr::Sgl(sgl) => sgl,
            _ => return Err(CmdError::at(StatusCode::InvalidField, 1)),
        };
        if sqe.fuse != Fuse::Normal {
            return Err(CmdError::at(StatusCode::InvalidField, 1));
        }
        let cmd = Cmd {
            sqe,
            qid: self.qid,
            xfer: Xfer {
                link: &mut self.link,
                bounce: &mut self.bounce,
                sgl,
                inline,
                prefetched,
            },
        };
        let fabrics = sqe.opcode == crate::wire::fabrics::FABRICS_OPCODE;
        let Some(ctrl) = self.ctrl.clone() else {
            if !fabrics {
                return Err(StatusCode::CommandSequenceError.into());
            }
            let (ctrl, result) =
                fabrics_cmd::connect(cmd, &self.shared, self.portid, self.depth, self.inline_data);
            self.ctrl = ctrl;
            return result;
        };
        if fabrics {
            return fabrics_cmd::handle(cmd, &ctrl);
        }
        if !ctrl.is_ready() {
            return Err(StatusCode::CommandSequenceError.into());
        }
        if self.qid == 0 {
            admin_cmd::handle(cmd, &ctrl, &self.shared)
        } else {
            io_cmd::handle(cmd, &ctrl)
        }
    }
}
