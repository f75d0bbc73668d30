//! One host queue: command capsules out, responses in, data in registered memory the
//! target reaches by keyed SGLs (or in the capsule for small writes).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use fabric::{
    Access, Caps, CqAttr, EndpointConfig, EpType, EqAttr, Fabric, Hints, MemoryRegion, Progress,
};

use super::{HostConfig, TransportAddr};
use crate::error::{Error, Result};
use crate::transport::{self, Arrival, Link, CQE_LEN, SQE_LEN};
use crate::wire::rdma_cm::CmAccept;
use crate::wire::sqe::Dptr;
use crate::wire::{Cqe, CqeRepr, KeyedSgl, SglRepr, SqeRepr, StatusContext};

/// Bytes one command moves at most (the target's MDTS, 128 KiB, is the usual limit).
pub const MAX_HOST_TRANSFER: usize = 128 << 10;

/// Data a command carries.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a> {
    /// None.
    None,
    /// Host to controller (a write).
    Out(&'a [u8]),
    /// Controller to host, this many bytes (a read).
    In(usize),
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    read_len: usize,
    /// Given up by its submitter (a dropped future): its response frees the slot.
    orphan: bool,
}

/// A connected host queue.
pub struct HostQueue {
    link: Link,
    qid: u16,
    depth: u16,
    data_mr: MemoryRegion,
    key: u32,
    inline_max: usize,
    pending: Vec<Option<Pending>>,
    /// Responses received and not yet reaped, in the order they arrived.
    done: VecDeque<CqeRepr>,
    /// Reused for every capsule sent and response received.
    capsule: Vec<u8>,
    response: Vec<u8>,
    timeout: Duration,
    // Kept alive for the queue's lifetime (the endpoint's fabric and domain).
    _fabric: Fabric,
}

impl std::fmt::Debug for HostQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostQueue")
            .field("qid", &self.qid)
            .field("depth", &self.depth)
            .finish()
    }
}

pub(crate) fn hints(addr: &TransportAddr, src_ip: Option<IpAddr>) -> Hints {
    let h = Hints::new()
        .caps(Caps::MSG | Caps::RMA)
        .ep_type(EpType::Msg)
        .provider(&addr.provider)
        .node(&addr.addr)
        .service(&addr.service)
        .progress(Progress::Manual)
        // Keyed SGL descriptors carry 32-bit keys: providers that can narrow theirs
        // (tcp) do; the others must have 4-byte keys already.
        .mr_key_size(4);
    match src_ip {
        Some(ip) => h.src_ip(ip),
        None => h,
    }
}

impl HostQueue {
    /// Connects queue `qid` with `depth` entries (RDMA CM private data as connection
    /// data) and posts a receive per entry.
    pub(crate) fn connect(
        addr: &TransportAddr,
        cfg: &HostConfig,
        qid: u16,
        depth: u16,
        cntlid: u16,
    ) -> Result<HostQueue> {
        let info = fabric::getinfo(&hints(addr, cfg.src_ip))
            .map_err(|e| Error::Fabric(e.into()))?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Config("getinfo gave no answer".into()))?;
        transport::check_keys(&info)?;
        let depth = depth.clamp(2, info.limits.rx_size.min(u16::MAX as usize) as u16);
        let fab = Fabric::open(&info)?;
        let domain = fab.domain(&info)?;
        let eq = fab.eq(EqAttr::default())?;
        let cq = domain.cq(CqAttr::default())?;
        let ep = domain.endpoint(&info, EndpointConfig::new(&cq, &eq))?;
        let data_mr = domain.alloc(
            usize::from(depth) * MAX_HOST_TRANSFER,
            Access::LOCAL | Access::REMOTE,
        )?;
        let key = transport::key32(&data_mr)?;
        let mut link = Link::new(&domain, ep, cq, eq, depth.into(), SQE_LEN)?;
        link.ep
            .connect(&transport::cm_request(qid, depth, cntlid))?;
        let accept = link.wait_connected(cfg.timeout)?;
        let crqsize = CmAccept::parse(&accept).map(|a| a.crqsize).unwrap_or(depth);
        let depth = depth.min(crqsize.max(1));
        Ok(HostQueue {
            link,
            qid,
            depth,
            data_mr,
            key,
            inline_max: 0,
            pending: vec![None; depth.into()],
            done: VecDeque::new(),
            capsule: Vec::with_capacity(SQE_LEN + transport::DEFAULT_INLINE_DATA),
            response: Vec::with_capacity(SQE_LEN),
            timeout: cfg.timeout,
            _fabric: fab,
        })
    }

    /// Queue ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands that may be outstanding at once.
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Sends writes of at most `bytes` in the capsule (IOCCSZ allowing).
    pub(crate) fn set_inline_max(&mut self, bytes: usize) {
        self.inline_max = bytes;
    }

    fn free_slot(&mut self) -> Result<usize> {
        loop {
            if let Some(i) = self.pending.iter().position(Option::is_none) {
                return Ok(i);
            }
            // Every slot is taken: a completion that nobody reaped yet still holds
            // its slot, so wait for responses (a caller must reap them).
            if self.pending.iter().flatten().count() == self.done.len() {
                return Err(Error::Config(format!(
                    "all {} commands of queue {} are complete but not reaped",
                    self.depth, self.qid
                )));
            }
            self.receive(self.timeout)?;
        }
    }

    /// Submits a command; returns its command ID (for [`complete`](Self::complete)).
    pub fn submit(&mut self, mut sqe: SqeRepr, data: Data<'_>) -> Result<u16> {
        let slot = self.free_slot()?;
        let base = slot * MAX_HOST_TRANSFER;
        let mut inline: &[u8] = &[];
        let (sgl, read_len) = match data {
            Data::None => (SglRepr::Keyed(KeyedSgl::new(0, 0, 0, false)?), 0),
            Data::Out(bytes) if !bytes.is_empty() && bytes.len() <= self.inline_max => {
                inline = bytes;
                (
                    SglRepr::InCapsule {
                        offset: 0,
                        length: bytes.len() as u32,
                    },
                    0,
                )
            }
            Data::Out(bytes) => {
                self.check_len(bytes.len())?;
                self.data_mr.write_at(base, bytes)?;
                (self.keyed(base, bytes.len())?, 0)
            }
            Data::In(len) => {
                self.check_len(len)?;
                (self.keyed(base, len)?, len)
            }
        };
        let cid = slot as u16;
        sqe.cid = cid;
        sqe.dptr = Dptr::Sgl(sgl);
        let mut capsule = std::mem::take(&mut self.capsule);
        capsule.clear();
        capsule.extend_from_slice(&sqe.to_bytes());
        capsule.extend_from_slice(inline);
        let sent = self.link.send(&capsule);
        self.capsule = capsule;
        sent?;
        self.pending[slot] = Some(Pending {
            read_len,
            orphan: false,
        });
        Ok(cid)
    }

    /// [`execute`](Self::execute) with the data always behind a keyed SGL, never in
    /// the capsule (a Connect: see [`connect_command`](super::connect_command)).
    pub(crate) fn execute_keyed(
        &mut self,
        sqe: SqeRepr,
        data: &[u8],
        context: StatusContext,
    ) -> Result<(CqeRepr, Vec<u8>)> {
        let inline_max = std::mem::replace(&mut self.inline_max, 0);
        let r = self.execute(sqe, Data::Out(data), context);
        self.inline_max = inline_max;
        r
    }

    /// Sends a capsule exactly as given (after putting a free command ID in bytes
    /// 2-3) and waits for its response: for tests of malformed commands.
    pub fn execute_raw(&mut self, capsule: &[u8]) -> Result<CqeRepr> {
        if capsule.len() < SQE_LEN {
            return Err(Error::Config("a capsule starts with a 64-byte SQE".into()));
        }
        let slot = self.free_slot()?;
        let mut bytes = capsule.to_vec();
        bytes[2..4].copy_from_slice(&(slot as u16).to_le_bytes());
        self.link.send(&bytes)?;
        self.pending[slot] = Some(Pending {
            read_len: 0,
            orphan: false,
        });
        Ok(self.complete(slot as u16)?.0)
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len > MAX_HOST_TRANSFER {
            return Err(Error::Config(format!(
                "{len} bytes in one command; at most {MAX_HOST_TRANSFER}"
            )));
        }
        Ok(())
    }

    fn keyed(&self, offset: usize, len: usize) -> Result<SglRepr> {
        let remote = self.data_mr.remote().iov(offset as u64, len);
        Ok(SglRepr::Keyed(KeyedSgl::new(
            remote.addr,
            len as u32,
            self.key,
            false,
        )?))
    }

    /// Reads one response into the completed set.
    fn receive(&mut self, timeout: Duration) -> Result<()> {
        if self.receive_within(timeout)? {
            Ok(())
        } else {
            Err(Error::Timeout(format!(
                "no response on queue {} within {timeout:?}",
                self.qid
            )))
        }
    }

    /// Reads one response into the completed set if one comes within `timeout`
    /// (zero: only what is there already); whether one came.
    fn receive_within(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let (slot, len) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.link.next_arrival(left)? {
                Some(Arrival::Message { slot, len }) => break (slot, len),
                // The host posts no operation it does not wait for by context.
                Some(Arrival::Op { .. }) => {}
                None => return Ok(false),
            }
        };
        let mut msg = std::mem::take(&mut self.response);
        let parsed = self.link.take_message(slot, len, &mut msg).and_then(|()| {
            if msg.len() < CQE_LEN {
                return Err(Error::Protocol(format!("response of {} bytes", msg.len())));
            }
            Ok(CqeRepr::parse(&Cqe::new_checked(&msg[..])?)?)
        });
        self.response = msg;
        let cqe = parsed?;
        let cid = cqe.cid;
        match self.pending.get(usize::from(cid)) {
            Some(Some(p)) if p.orphan => {
                self.pending[usize::from(cid)] = None;
                Ok(true)
            }
            Some(Some(_)) if !self.done.iter().any(|d| d.cid == cid) => {
                self.done.push_back(cqe);
                Ok(true)
            }
            _ => Err(Error::Protocol(format!(
                "response for command {} that is not outstanding",
                cqe.cid
            ))),
        }
    }

    /// Waits for command `cid`: its completion and, for a read, its data.
    pub fn complete(&mut self, cid: u16) -> Result<(CqeRepr, Vec<u8>)> {
        let slot = usize::from(cid);
        let Some(Some(p)) = self.pending.get(slot).copied() else {
            return Err(Error::Config(format!("command {cid} is not outstanding")));
        };
        let deadline = Instant::now() + self.timeout;
        let at = loop {
            if let Some(at) = self.done.iter().position(|d| d.cid == cid) {
                break at;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(format!(
                    "command {cid} on queue {}",
                    self.qid
                )));
            }
            self.receive(left)?;
        };
        let cqe = self.done.remove(at).unwrap_or_default();
        let mut data = Vec::new();
        self.reap(cqe, p, &mut data)?;
        Ok((cqe, data))
    }

    /// Frees a completed command's slot, after copying a successful read's data
    /// into `data` (cleared first).
    fn reap(&mut self, cqe: CqeRepr, p: Pending, data: &mut Vec<u8>) -> Result<()> {
        let slot = usize::from(cqe.cid);
        self.pending[slot] = None;
        data.clear();
        if p.read_len > 0 && cqe.status.is_success() {
            data.resize(p.read_len, 0);
            self.data_mr.read_at(slot * MAX_HOST_TRANSFER, data)?;
        }
        Ok(())
    }

    /// Commands submitted and not yet reaped (given-up ones not counted).
    pub fn outstanding(&self) -> usize {
        self.pending.iter().flatten().filter(|p| !p.orphan).count()
    }

    /// Submits a command if a slot is free, after taking in the responses that
    /// are there already; `None` when every slot is taken (no waiting).
    pub fn try_submit(&mut self, sqe: SqeRepr, data: Data<'_>) -> Result<Option<u16>> {
        if !self.pending.iter().any(Option::is_none) {
            while self.receive_within(Duration::ZERO)? {}
            if !self.pending.iter().any(Option::is_none) {
                return Ok(None);
            }
        }
        self.submit(sqe, data).map(Some)
    }

    /// Command `cid`'s completion and data if it has completed, after taking in the
    /// responses that are there already; `None` if it has not (no waiting).
    pub fn try_complete(&mut self, cid: u16) -> Result<Option<(CqeRepr, Vec<u8>)>> {
        let slot = usize::from(cid);
        let Some(Some(p)) = self.pending.get(slot).copied() else {
            return Err(Error::Config(format!("command {cid} is not outstanding")));
        };
        if !self.done.iter().any(|d| d.cid == cid) {
            while self.receive_within(Duration::ZERO)? {}
        }
        let Some(at) = self.done.iter().position(|d| d.cid == cid) else {
            return Ok(None);
        };
        let cqe = self.done.remove(at).unwrap_or_default();
        let mut data = Vec::new();
        self.reap(cqe, p, &mut data)?;
        Ok(Some((cqe, data)))
    }

    /// Gives up command `cid` without waiting: its slot is freed when its response
    /// arrives (or now, if it has arrived), and its result is dropped.
    pub fn abandon(&mut self, cid: u16) {
        let slot = usize::from(cid);
        if let Some(at) = self.done.iter().position(|d| d.cid == cid) {
            self.done.remove(at);
            self.pending[slot] = None;
        } else if let Some(Some(p)) = self.pending.get_mut(slot) {
            p.orphan = true;
        }
    }

    /// Waits for whichever outstanding command completes first (the target may
    /// complete commands in any order; responses are matched by command ID) and
    /// returns its command ID, its completion and, for a successful read, its data.
    pub fn complete_any(&mut self) -> Result<(u16, CqeRepr, Vec<u8>)> {
        let mut data = Vec::new();
        let (cid, cqe) = self.complete_any_into(&mut data)?;
        Ok((cid, cqe, data))
    }

    /// [`complete_any`](Self::complete_any), with a read's data copied into `data`
    /// (cleared first; its allocation is reused, so a loop allocates nothing).
    pub fn complete_any_into(&mut self, data: &mut Vec<u8>) -> Result<(u16, CqeRepr)> {
        if self.outstanding() == 0 {
            return Err(Error::Config(format!(
                "no command is outstanding on queue {}",
                self.qid
            )));
        }
        let deadline = Instant::now() + self.timeout;
        let cqe = loop {
            if let Some(cqe) = self.done.pop_front() {
                break cqe;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(format!(
                    "no completion on queue {}",
                    self.qid
                )));
            }
            self.receive(left)?;
        };
        let Some(Some(p)) = self.pending.get(usize::from(cqe.cid)).copied() else {
            return Err(Error::Protocol(format!(
                "completion for command {} that is not outstanding",
                cqe.cid
            )));
        };
        self.reap(cqe, p, data)?;
        Ok((cqe.cid, cqe))
    }

    /// Submits and waits; a failed status is [`Error::Command`].
    pub fn execute(
        &mut self,
        sqe: SqeRepr,
        data: Data<'_>,
        context: StatusContext,
    ) -> Result<(CqeRepr, Vec<u8>)> {
        let cid = self.submit(sqe, data)?;
        let (cqe, out) = self.complete(cid)?;
        check(&cqe, context)?;
        Ok((cqe, out))
    }

    /// Ends the queue's connection.
    pub fn disconnect(&mut self) {
        self.link.shutdown();
    }
}

/// [`Error::Command`] for a completion that did not succeed.
pub fn check(cqe: &CqeRepr, context: StatusContext) -> Result<()> {
    if cqe.status.is_success() {
        Ok(())
    } else {
        Err(Error::Command {
            status: cqe.status,
            context,
            dw0: cqe.dw0,
        })
    }
}
