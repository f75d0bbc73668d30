//! The block API: NVM I/O commands at logical-block granularity, one at a time,
//! several in flight on one queue ([`Controller::batch`]), or as futures
//! ([`Controller::submit_async`]) with up to the queue's depth outstanding.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::queue::{Data, HostQueue};
use super::Controller;
use crate::error::{Error, Result};
use crate::wire::opcodes::{
    CopyCommand, CopySourceRange, DsmCommand, DsmRange, IoCommand, IoOpcode,
};
use crate::wire::{SqeRepr, StatusContext};

/// A namespace's geometry, from Identify Namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Namespace ID.
    pub nsid: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in blocks (NSZE).
    pub blocks: u64,
}

/// One I/O command of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoRequest {
    /// Read `blocks` blocks at `slba`.
    Read {
        /// First block.
        slba: u64,
        /// Block count.
        blocks: u32,
    },
    /// Write `data` (a whole number of blocks) at `slba`.
    Write {
        /// First block.
        slba: u64,
        /// Bytes.
        data: Vec<u8>,
        /// Force unit access.
        fua: bool,
    },
    /// Flush the namespace.
    Flush,
    /// Write zeros, or deallocate, `blocks` blocks at `slba`.
    WriteZeroes {
        /// First block.
        slba: u64,
        /// Block count.
        blocks: u32,
        /// Deallocate (DEAC) instead of writing.
        deallocate: bool,
    },
    /// Dataset Management, deallocate: `(slba, blocks)` ranges.
    Deallocate(Vec<(u64, u32)>),
    /// Verify `blocks` blocks at `slba`.
    Verify {
        /// First block.
        slba: u64,
        /// Block count.
        blocks: u32,
    },
    /// Compare `data` with the blocks at `slba`.
    Compare {
        /// First block.
        slba: u64,
        /// Expected bytes.
        data: Vec<u8>,
    },
    /// Copy `(slba, blocks)` source ranges, concatenated, to `sdlba` (format 0).
    Copy {
        /// Source ranges.
        sources: Vec<(u64, u32)>,
        /// Destination block.
        sdlba: u64,
    },
}

fn nlb(blocks: u32) -> Result<u16> {
    blocks
        .checked_sub(1)
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| Error::Config(format!("{blocks} blocks in one command (1..=65536)")))
}

/// The SQE and data of a request.
fn build(ns: &NamespaceInfo, req: &IoRequest) -> Result<(SqeRepr, Vec<u8>, usize)> {
    let mut sqe = SqeRepr {
        nsid: ns.nsid,
        ..Default::default()
    };
    let bs = ns.block_size as usize;
    let blocks_of = |data: &[u8]| -> Result<u32> {
        if data.is_empty() || !data.len().is_multiple_of(bs) {
            return Err(Error::Config(format!(
                "{} bytes is not a whole number of {bs}-byte blocks",
                data.len()
            )));
        }
        u32::try_from(data.len() / bs).map_err(|_| Error::Config("too many blocks".into()))
    };
    let io = |slba: u64, blocks: u32| -> Result<IoCommand> {
        Ok(IoCommand {
            slba,
            nlb: nlb(blocks)?,
            ..Default::default()
        })
    };
    let mut out = Vec::new();
    let mut read_len = 0;
    match req {
        IoRequest::Read { slba, blocks } => {
            sqe.opcode = IoOpcode::Read.into();
            io(*slba, *blocks)?.apply(&mut sqe);
            read_len = *blocks as usize * bs;
        }
        IoRequest::Write { slba, data, fua } => {
            sqe.opcode = IoOpcode::Write.into();
            IoCommand {
                fua: *fua,
                ..io(*slba, blocks_of(data)?)?
            }
            .apply(&mut sqe);
            out = data.clone();
        }
        IoRequest::Flush => sqe.opcode = IoOpcode::Flush.into(),
        IoRequest::WriteZeroes {
            slba,
            blocks,
            deallocate,
        } => {
            sqe.opcode = IoOpcode::WriteZeroes.into();
            IoCommand {
                deac: *deallocate,
                ..io(*slba, *blocks)?
            }
            .apply(&mut sqe);
        }
        IoRequest::Deallocate(ranges) => {
            sqe.opcode = IoOpcode::DatasetManagement.into();
            let nr = ranges
                .len()
                .checked_sub(1)
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| Error::Config("1..=256 ranges".into()))?;
            DsmCommand {
                nr,
                ad: true,
                ..Default::default()
            }
            .apply(&mut sqe);
            out = vec![0u8; ranges.len() * DsmRange::LEN];
            for (&(slba, nlb), chunk) in ranges.iter().zip(out.chunks_exact_mut(DsmRange::LEN)) {
                DsmRange {
                    cattr: 0,
                    nlb,
                    slba,
                }
                .emit(chunk)?;
            }
        }
        IoRequest::Verify { slba, blocks } => {
            sqe.opcode = IoOpcode::Verify.into();
            io(*slba, *blocks)?.apply(&mut sqe);
        }
        IoRequest::Compare { slba, data } => {
            sqe.opcode = IoOpcode::Compare.into();
            io(*slba, blocks_of(data)?)?.apply(&mut sqe);
            out = data.clone();
        }
        IoRequest::Copy { sources, sdlba } => {
            sqe.opcode = IoOpcode::Copy.into();
            let nr = sources
                .len()
                .checked_sub(1)
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| Error::Config("1..=256 source ranges".into()))?;
            CopyCommand {
                sdlba: *sdlba,
                nr,
                ..Default::default()
            }
            .apply(&mut sqe);
            out = vec![0u8; sources.len() * CopySourceRange::LEN];
            for (&(slba, blocks), chunk) in sources
                .iter()
                .zip(out.chunks_exact_mut(CopySourceRange::LEN))
            {
                CopySourceRange {
                    slba,
                    nlb: nlb(blocks)?,
                    ..Default::default()
                }
                .emit(chunk)?;
            }
        }
    }
    Ok((sqe, out, read_len))
}

/// One I/O command as a future (from [`Controller::submit_async`]): it is submitted
/// on its first poll that finds a free slot in its queue, and resolves with a read's
/// data (empty for other commands) once its response arrives, whatever the order of
/// the responses to the queue's other commands. Polling drives the queue (the
/// fabric's manual progress): a poll that finds nothing asks to be polled again at
/// once, so any executor works, busy-polling as SPDK's does. Dropping a submitted
/// future gives its command up: its response, when it comes, frees the slot.
///
/// While futures use a queue, do not reap it with
/// [`HostQueue::complete_any`](super::HostQueue::complete_any), which would take
/// their completions.
#[must_use = "a future does nothing unless polled"]
pub struct IoFuture<'a> {
    ctrl: &'a Controller,
    queue: usize,
    state: State,
}

enum State {
    /// Built, not yet submitted (the queue was full).
    Ready {
        sqe: SqeRepr,
        out: Vec<u8>,
        read_len: usize,
    },
    /// Submitted as this command ID.
    InFlight(u16),
    /// Resolved, or failed before it could be submitted.
    Finished,
    Failed(Error),
}

impl IoFuture<'_> {
    fn step(&mut self) -> Poll<Result<Vec<u8>>> {
        let mut q = match self.ctrl.io_queue(self.queue) {
            Ok(q) => q,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let State::Ready { sqe, out, read_len } = &self.state {
            match q.try_submit(*sqe, data(out, *read_len)) {
                Ok(Some(cid)) => self.state = State::InFlight(cid),
                Ok(None) => return Poll::Pending,
                Err(e) => {
                    self.state = State::Finished;
                    return Poll::Ready(Err(e));
                }
            }
        }
        let cid = match std::mem::replace(&mut self.state, State::Finished) {
            State::InFlight(cid) => cid,
            State::Failed(e) => return Poll::Ready(Err(e)),
            _ => return Poll::Ready(Err(Error::Config("future polled after it resolved".into()))),
        };
        match q.try_complete(cid) {
            Ok(Some((cqe, data))) => {
                Poll::Ready(super::check(&cqe, StatusContext::Io).map(|()| data))
            }
            Ok(None) => {
                self.state = State::InFlight(cid);
                Poll::Pending
            }
            Err(e) => {
                // The queue failed (connection lost, timeout): the command is gone.
                q.abandon(cid);
                Poll::Ready(Err(e))
            }
        }
    }
}

impl Future for IoFuture<'_> {
    type Output = Result<Vec<u8>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let r = this.step();
        if r.is_pending() {
            cx.waker().wake_by_ref();
        }
        r
    }
}

impl Drop for IoFuture<'_> {
    fn drop(&mut self) {
        if let State::InFlight(cid) = self.state {
            if let Ok(mut q) = self.ctrl.io_queue(self.queue) {
                q.abandon(cid);
            }
        }
    }
}

impl std::fmt::Debug for IoFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Ready { .. } => "not submitted".to_string(),
            State::InFlight(cid) => format!("in flight as command {cid}"),
            State::Finished => "resolved".into(),
            State::Failed(e) => format!("failed: {e}"),
        };
        f.debug_struct("IoFuture")
            .field("queue", &self.queue)
            .field("state", &state)
            .finish()
    }
}

fn data<'a>(out: &'a [u8], read_len: usize) -> Data<'a> {
    if read_len > 0 {
        Data::In(read_len)
    } else if !out.is_empty() {
        Data::Out(out)
    } else {
        Data::None
    }
}

fn run(q: &mut HostQueue, ns: &NamespaceInfo, req: &IoRequest) -> Result<Vec<u8>> {
    let (sqe, out, read_len) = build(ns, req)?;
    Ok(q.execute(sqe, data(&out, read_len), StatusContext::Io)?.1)
}

impl Controller {
    /// A namespace's geometry.
    pub fn namespace(&self, nsid: u32) -> Result<NamespaceInfo> {
        let id = self.identify_namespace(nsid)?;
        let block_size = id
            .block_size()
            .ok_or_else(|| Error::Protocol(format!("namespace {nsid}: no usable LBA format")))?;
        if id.nsze == 0 {
            return Err(Error::Config(format!("namespace {nsid} is not active")));
        }
        Ok(NamespaceInfo {
            nsid,
            block_size,
            blocks: id.nsze,
        })
    }

    /// `req` as a future on I/O queue `queue` (see [`IoFuture`]): as many may be
    /// outstanding as the queue has entries (more wait for a free slot), and
    /// each resolves with a read's data, or empty, when its own response comes.
    pub fn submit_async(&self, queue: usize, ns: &NamespaceInfo, req: &IoRequest) -> IoFuture<'_> {
        let state = match build(ns, req) {
            Ok((sqe, out, read_len)) => State::Ready { sqe, out, read_len },
            Err(e) => State::Failed(e),
        };
        IoFuture {
            ctrl: self,
            queue,
            state,
        }
    }

    /// Runs one request on the next I/O queue; returns the data of a read.
    pub fn submit_one(&self, ns: &NamespaceInfo, req: &IoRequest) -> Result<Vec<u8>> {
        run(&mut *self.any_io_queue()?, ns, req)
    }

    /// Runs requests with up to the queue depth in flight on one I/O queue; results
    /// in order (a read's data, else empty). Requests in flight together execute in
    /// any order, as NVMe allows (a Write waiting for its data can finish after a
    /// later command): a Flush covers the writes completed before it was submitted,
    /// and overlapping requests in one batch need separate batches to be ordered.
    pub fn batch(&self, ns: &NamespaceInfo, reqs: &[IoRequest]) -> Vec<Result<Vec<u8>>> {
        let mut q = match self.any_io_queue() {
            Ok(q) => q,
            Err(e) => {
                return reqs
                    .iter()
                    .map(|_| Err(Error::Config(e.to_string())))
                    .collect()
            }
        };
        let depth = usize::from(q.depth());
        let mut results: Vec<Option<Result<Vec<u8>>>> = reqs.iter().map(|_| None).collect();
        let mut inflight: Vec<(usize, u16)> = Vec::new();
        let reap = |q: &mut HostQueue,
                    (i, cid): (usize, u16),
                    results: &mut Vec<Option<Result<Vec<u8>>>>| {
            let r = q.complete(cid).and_then(|(cqe, data)| {
                super::check(&cqe, StatusContext::Io)?;
                Ok(data)
            });
            results[i] = Some(r);
        };
        for (i, req) in reqs.iter().enumerate() {
            if inflight.len() >= depth {
                let first = inflight.remove(0);
                reap(&mut q, first, &mut results);
            }
            match build(ns, req) {
                Ok((sqe, out, read_len)) => match q.submit(sqe, data(&out, read_len)) {
                    Ok(cid) => inflight.push((i, cid)),
                    Err(e) => results[i] = Some(Err(e)),
                },
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for entry in inflight {
            reap(&mut q, entry, &mut results);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Config("not run".into()))))
            .collect()
    }

    /// Reads `buf.len()` bytes (whole blocks) at `slba`.
    pub fn read(&self, ns: &NamespaceInfo, slba: u64, buf: &mut [u8]) -> Result<()> {
        let bs = ns.block_size as usize;
        if buf.is_empty() || !buf.len().is_multiple_of(bs) {
            return Err(Error::Config("read of a partial block".into()));
        }
        let data = self.submit_one(
            ns,
            &IoRequest::Read {
                slba,
                blocks: (buf.len() / bs) as u32,
            },
        )?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Writes `data` (whole blocks) at `slba`, with force unit access if `fua`.
    pub fn write(&self, ns: &NamespaceInfo, slba: u64, data: &[u8], fua: bool) -> Result<()> {
        self.submit_one(
            ns,
            &IoRequest::Write {
                slba,
                data: data.to_vec(),
                fua,
            },
        )
        .map(drop)
    }

    /// Flushes namespace `nsid`, or every namespace with
    /// [`NSID_ALL`](crate::wire::opcodes::NSID_ALL).
    pub fn flush(&self, nsid: u32) -> Result<()> {
        let ns = NamespaceInfo {
            nsid,
            block_size: 512,
            blocks: 0,
        };
        self.submit_one(&ns, &IoRequest::Flush).map(drop)
    }

    /// Writes zeros (or deallocates, with `deallocate`) over `blocks` blocks.
    pub fn write_zeroes(
        &self,
        ns: &NamespaceInfo,
        slba: u64,
        blocks: u32,
        deallocate: bool,
    ) -> Result<()> {
        self.submit_one(
            ns,
            &IoRequest::WriteZeroes {
                slba,
                blocks,
                deallocate,
            },
        )
        .map(drop)
    }

    /// Deallocates ranges `(slba, blocks)` (Dataset Management, AD).
    pub fn deallocate(&self, ns: &NamespaceInfo, ranges: &[(u64, u32)]) -> Result<()> {
        self.submit_one(ns, &IoRequest::Deallocate(ranges.to_vec()))
            .map(drop)
    }

    /// Verifies `blocks` blocks at `slba`.
    pub fn verify(&self, ns: &NamespaceInfo, slba: u64, blocks: u32) -> Result<()> {
        self.submit_one(ns, &IoRequest::Verify { slba, blocks })
            .map(drop)
    }

    /// Compares `data` with the blocks at `slba`: a mismatch is
    /// [`Error::Command`] with Compare Failure.
    pub fn compare(&self, ns: &NamespaceInfo, slba: u64, data: &[u8]) -> Result<()> {
        self.submit_one(
            ns,
            &IoRequest::Compare {
                slba,
                data: data.to_vec(),
            },
        )
        .map(drop)
    }

    /// Copies source ranges `(slba, blocks)`, concatenated, to `sdlba`.
    pub fn copy(&self, ns: &NamespaceInfo, sources: &[(u64, u32)], sdlba: u64) -> Result<()> {
        self.submit_one(
            ns,
            &IoRequest::Copy {
                sources: sources.to_vec(),
                sdlba,
            },
        )
        .map(drop)
    }
}
