//! One target queue: capsules in, commands dispatched, data moved, responses out
//! (the request life cycle of nvmet's rdma.c, one thread per queue).

use std::sync::Arc;
use std::time::Duration;

use fabric::{Access, Domain, Fabric, MemoryRegion, RemoteIov};

use super::ctrl::{Controller, MAX_TRANSFER};
use super::{admin_cmd, fabrics_cmd, io_cmd, Shared};
use crate::error::Error;
use crate::transport::{Link, Rma, SQE_LEN};
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

/// Registered buffers that data passes through between a back end and the host,
/// used in turn: a Read's RMA write is posted and the response follows at once, and
/// the write's completion is only waited for when its buffer comes round again.
pub(crate) struct BounceRing {
    bufs: Vec<MemoryRegion>,
    /// Context of the RMA still reading from each buffer.
    pending: Vec<Option<u64>>,
    next: usize,
}

/// Bounce buffers per queue (at most; fewer for shallow queues).
const BOUNCE_BUFFERS: usize = 4;

impl BounceRing {
    fn new(domain: &Domain, count: usize) -> Result<BounceRing, Error> {
        let count = count.clamp(1, BOUNCE_BUFFERS);
        let mut bufs = Vec::with_capacity(count);
        for _ in 0..count {
            bufs.push(domain.alloc(MAX_TRANSFER, Access::LOCAL)?);
        }
        Ok(BounceRing {
            bufs,
            pending: vec![None; count],
            next: 0,
        })
    }

    /// The next buffer, free (its earlier transfer waited for).
    fn take(&mut self, link: &mut Link) -> Result<usize, CmdError> {
        let i = self.next;
        self.next = (i + 1) % self.bufs.len();
        if let Some(ctx) = self.pending[i].take() {
            // The response of that command is gone already: a failed write here means
            // the connection has ended, so the queue ends too.
            link.wait_op(ctx, "RMA write")
                .map_err(|e| CmdError::Fatal(Error::Transfer(e.to_string())))?;
        }
        Ok(i)
    }
}

/// The data of one command, as its SGL describes it.
pub(crate) struct Xfer<'a> {
    link: &'a mut Link,
    bounce: &'a mut BounceRing,
    sgl: SglRepr,
    inline: &'a [u8],
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
        match self.sgl {
            SglRepr::InCapsule { offset, length } => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                if start > self.inline.len() {
                    return Err(CmdError::at(StatusCode::SglOffsetInvalid, DPTR));
                }
                self.inline
                    .get(start..start.saturating_add(length as usize))
                    .map(<[u8]>::to_vec)
                    .ok_or(CmdError::at(StatusCode::DataSglLengthInvalid, DPTR + 8))
            }
            SglRepr::Keyed(k) => {
                if len == 0 {
                    return Ok(Vec::new());
                }
                let remote = RemoteIov {
                    addr: k.address(),
                    len,
                    key: u64::from(k.key()),
                };
                let i = self.bounce.take(self.link)?;
                let buf = &self.bounce.bufs[i];
                self.link
                    .rma(Rma::Read, buf, 0, remote)
                    .map_err(transfer_failed)?;
                buf.to_vec(0, len).map_err(|e| CmdError::Fatal(e.into()))
            }
            _ => Err(StatusCode::InvalidField.into()),
        }
    }

    /// Data to the host (by RMA write): exactly the descriptor's length.
    pub(crate) fn put(&mut self, data: &[u8]) -> Result<(), CmdError> {
        self.expect(data.len())?;
        match self.sgl {
            SglRepr::Keyed(k) => {
                if data.is_empty() {
                    return Ok(());
                }
                let i = self.bounce.take(self.link)?;
                let buf = &self.bounce.bufs[i];
                buf.write_at(0, data)
                    .map_err(|e| CmdError::Fatal(e.into()))?;
                let remote = RemoteIov {
                    addr: k.address(),
                    len: data.len(),
                    key: u64::from(k.key()),
                };
                // Posted, not waited for: the response follows it in order.
                let ctx = self
                    .link
                    .post_rma(Rma::Write, buf, 0, remote)
                    .map_err(transfer_failed)?;
                self.bounce.pending[i] = Some(ctx);
                Ok(())
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

/// A target queue's state and loop.
pub(crate) struct TargetQueue {
    pub(crate) link: Link,
    pub(crate) shared: Arc<Shared>,
    pub(crate) portid: u16,
    pub(crate) qid: u16,
    pub(crate) depth: u16,
    pub(crate) ctrl: Option<Arc<Controller>>,
    pub(crate) inline_data: usize,
    bounce: BounceRing,
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
            bounce: BounceRing::new(domain, depth.into())?,
            link,
            shared,
            portid,
            qid,
            depth,
            ctrl: None,
            inline_data,
            sq_head: 0,
            _fabric: fabric,
        })
    }

    /// Serves the queue until its connection ends, its controller is torn down or
    /// the target stops.
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
            match self.link.next_message(Duration::from_millis(20)) {
                Ok(Some(capsule)) => {
                    if let Err(e) = self.handle(&capsule) {
                        tracing::debug!("queue {}: {e}", self.qid);
                        break;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!("queue {}: {e}", self.qid);
                    break;
                }
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

    /// One capsule: parse, dispatch, answer. An error ends the queue.
    fn handle(&mut self, capsule: &[u8]) -> Result<(), Error> {
        if capsule.len() < SQE_LEN {
            return Err(Error::Protocol(format!(
                "capsule of {} bytes, shorter than an SQE",
                capsule.len()
            )));
        }
        let view = Sqe::new_checked(capsule)?;
        let cid = view.cid();
        self.sq_head = (self.sq_head + 1) % self.depth.max(1);
        let parsed = SqeRepr::parse(&view);
        let inline = view.in_capsule_data();
        let result = match parsed {
            Err(e) => Err(CmdError::from(e)),
            Ok(sqe) => self.dispatch(sqe, inline),
        };
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
        self.link.send(&cqe.to_bytes())
    }

    fn dispatch(&mut self, sqe: SqeRepr, inline: &[u8]) -> CmdResult {
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
