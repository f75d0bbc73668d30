//! The endpoint's data path: posting sends, receives, writes, reads and atomics on
//! its QP.
//!
//! Atomics are the RC transport's own: a u64 / i64 sum (fetching or not) is one
//! FETCH_ADD, a compare-and-swap one CMP_SWAP, one element per call
//! (`native_atomic`); nothing else is offered natively (the RDM layer emulates the
//! rest). The target's responder checks key, bounds,
//! rights (REMOTE_READ and REMOTE_WRITE) and 8-byte alignment, NAKs a refusal
//! (remote access error; invalid request for a misaligned address), and executes the
//! operation with a CPU compare-exchange on the registered memory. A misaligned remote
//! address is refused at the call here (`InvalidArgument`; the connection is
//! unaffected), as the RC core refuses to post it.

use fabric_core::atomic::{AtomicForm, AtomicOp, AtomicRequest, Datatype};
use fabric_core::provider::AtomicOps;

use super::*;

impl EpInner {
    /// Runs `f` on the connected QP.
    pub(super) fn with_slot(&self, f: impl FnOnce(&mut QpSlot) -> Result<()>) -> Result<()> {
        let (dev, qpn) = self
            .qp
            .get()
            .ok_or_else(|| not_connected("the endpoint is not connected"))?;
        self.check_open()?;
        dev.with_qp(*qpn, |slot| match slot.state() {
            rc::QpState::Rts => f(slot),
            rc::QpState::Error => Err(self.ended_error()),
            _ => Err(not_connected("the endpoint is not connected yet")),
        })
    }

    /// Fails when the connection is known to have ended (rule: posts to an ended
    /// connection fail at the call).
    pub(super) fn check_open(&self) -> Result<()> {
        match self.ended.get() {
            Some(_) => Err(self.ended_error()),
            None => Ok(()),
        }
    }

    /// The error of a post to an endpoint whose connection ended: `Shutdown` after
    /// this side's `shutdown()`, else `NotConnected`, with the reason.
    pub(super) fn ended_error(&self) -> Error {
        match self.ended.get() {
            Some(ShutdownReason::Local) => Error::new(
                ErrorKind::Shutdown,
                "the endpoint was shut down (shutdown() on this side)",
            ),
            Some(r) => Error::new(
                ErrorKind::NotConnected,
                format!("the connection has ended: {r}"),
            ),
            None => not_connected("the connection has ended (its queue pair is in error)"),
        }
    }

    pub(super) fn check_tx(&self, slot: &QpSlot) -> Result<()> {
        if slot.outstanding() >= self.tx_size {
            return Err(Error::new(
                ErrorKind::WouldBlock,
                format!("{} operations outstanding (tx_size)", self.tx_size),
            ));
        }
        Ok(())
    }
}

pub(super) fn not_connected(why: &str) -> Error {
    Error::new(ErrorKind::NotConnected, why.to_string())
}

pub(super) fn qp_error(e: rc::QpError) -> Error {
    match e {
        rc::QpError::InvalidState { .. } => Error::new(ErrorKind::NotConnected, e.to_string()),
        _ => Error::invalid(e.to_string()),
    }
}

pub(super) fn recv_segment(req: RecvRequest) -> Option<LocalSegment> {
    let len = req.len();
    if len == 0 {
        return None;
    }
    let mem: Arc<dyn LocalMemory> = Arc::new(OpMemory::segments(req.segments));
    Some(LocalSegment::new(mem, 0, len as u32))
}

/// Posts the work requests of one operation, tracked as one completion.
pub(super) fn post_op(
    slot: &mut QpSlot,
    context: u64,
    flags: CompFlags,
    len: usize,
    completion: bool,
    wrs: Vec<(SendOp, Option<LocalSegment>)>,
) -> Result<()> {
    let first = slot.track(context, flags, len, completion, wrs.len() as u32);
    for (i, (op, local)) in wrs.into_iter().enumerate() {
        if let Err(e) = slot.post_send(SendWr {
            wr_id: first + i as u64,
            op,
            local,
        }) {
            if i == 0 {
                slot.untrack(first);
                return Err(qp_error(e));
            }
            // Validated above: cannot fail after the first one was accepted.
            warn!("softroce: work request {i} of an operation refused: {e}");
        }
    }
    Ok(())
}

pub(super) fn rkey(key: u64) -> u32 {
    // Keys are 32-bit; a wider one cannot be ours: send the never-issued key 0 so the
    // target refuses it (RemoteAccess).
    u32::try_from(key).unwrap_or(0)
}

pub(super) fn op_memory(p: Payload) -> Arc<dyn LocalMemory> {
    Arc::new(match p {
        Payload::Inline(v) => OpMemory::Inline(v),
        Payload::Segments(s) => OpMemory::segments(s),
    })
}

impl MsgOps for SrEndpoint {
    fn post_send(&self, req: SendRequest) -> Result<()> {
        let ep = &self.inner;
        ep.with_slot(|slot| {
            ep.check_tx(slot)?;
            let len = req.payload.len();
            let local = (len > 0).then(|| LocalSegment::new(op_memory(req.payload), 0, len as u32));
            let op = match req.data {
                // cq_data_size is 4: the wrapper checked the value fits.
                Some(d) => SendOp::SendWithImm { imm: d as u32 },
                None => SendOp::Send,
            };
            post_op(
                slot,
                req.context,
                CompFlags::MSG | CompFlags::SEND,
                len,
                req.completion,
                vec![(op, local)],
            )
        })
    }

    fn post_recv(&self, req: RecvRequest) -> Result<()> {
        let ep = &self.inner;
        if ep.qp.get().is_none() {
            let mut cm = ep.cm.lock();
            if ep.qp.get().is_none() {
                if cm.phase == Phase::Closed {
                    return Err(not_connected("the endpoint is closed"));
                }
                if cm.pending.len() >= ep.rx_size {
                    return Err(Error::new(ErrorKind::WouldBlock, "rx_size receives posted"));
                }
                cm.pending.push(req);
                return Ok(());
            }
        }
        let (dev, qpn) = ep
            .qp
            .get()
            .ok_or_else(|| not_connected("the endpoint is not connected"))?;
        ep.check_open()?;
        dev.with_qp_quiet(*qpn, |slot| {
            if slot.state() == rc::QpState::Error {
                return Err(ep.ended_error());
            }
            if slot.posted_recvs() >= ep.rx_size {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!("{} receives posted (rx_size)", ep.rx_size),
                ));
            }
            let ctx = req.context;
            slot.post_recv(ctx, recv_segment(req)).map_err(qp_error)
        })
    }
}

impl RmaOps for SrEndpoint {
    fn post_write(&self, req: RmaRequest) -> Result<()> {
        let ep = &self.inner;
        ep.with_slot(|slot| {
            ep.check_tx(slot)?;
            let len = req.payload.len();
            let mem = op_memory(req.payload);
            let commit = req.flags.contains(OpFlags::COMMIT_COMPLETE);
            let mut wrs = Vec::with_capacity(req.remote.len() * if commit { 3 } else { 1 });
            if commit {
                // A zero-length persistent FLUSH first: the target refuses it for a
                // region not registered PMEM (NAK invalid request) before any byte is
                // written, and the writes behind it are then never executed.
                for r in &req.remote {
                    wrs.push((
                        SendOp::Flush {
                            remote_va: r.addr,
                            rkey: rkey(r.key),
                            len: 0,
                            placement: FlushPlacement::Persistent,
                        },
                        None,
                    ));
                }
            }
            let last = req.remote.len().saturating_sub(1);
            let mut off = 0u64;
            for (i, r) in req.remote.iter().enumerate() {
                let op = match req.data {
                    Some(d) if i == last => SendOp::WriteWithImm {
                        remote_va: r.addr,
                        rkey: rkey(r.key),
                        imm: d as u32,
                    },
                    _ => SendOp::Write {
                        remote_va: r.addr,
                        rkey: rkey(r.key),
                    },
                };
                wrs.push((op, Some(LocalSegment::new(mem.clone(), off, r.len as u32))));
                off += r.len as u64;
            }
            if commit {
                for r in &req.remote {
                    wrs.push((
                        SendOp::Flush {
                            remote_va: r.addr,
                            rkey: rkey(r.key),
                            len: r.len as u32,
                            placement: FlushPlacement::Persistent,
                        },
                        None,
                    ));
                }
            }
            let mut flags = CompFlags::RMA | CompFlags::WRITE;
            if commit {
                flags |= CompFlags::COMMIT;
            }
            post_op(slot, req.context, flags, len, req.completion, wrs)
        })
    }

    fn post_read(&self, req: RmaRequest) -> Result<()> {
        let ep = &self.inner;
        ep.with_slot(|slot| {
            ep.check_tx(slot)?;
            let len = req.payload.len();
            let mem = op_memory(req.payload);
            let mut off = 0u64;
            let mut wrs = Vec::with_capacity(req.remote.len());
            for r in &req.remote {
                wrs.push((
                    SendOp::Read {
                        remote_va: r.addr,
                        rkey: rkey(r.key),
                    },
                    Some(LocalSegment::new(mem.clone(), off, r.len as u32)),
                ));
                off += r.len as u64;
            }
            post_op(
                slot,
                req.context,
                CompFlags::RMA | CompFlags::READ,
                len,
                req.completion,
                wrs,
            )
        })
    }
}

/// The (operation, datatype, form) combinations the RC opcodes execute: one element
/// per call.
pub(crate) fn native_atomic(op: AtomicOp, dt: Datatype, form: AtomicForm) -> Option<usize> {
    let word = matches!(dt, Datatype::U64 | Datatype::I64);
    let ok = matches!(
        (form, op),
        (AtomicForm::Plain | AtomicForm::Fetch, AtomicOp::Sum)
            | (AtomicForm::Compare, AtomicOp::Cswap)
    );
    (word && ok).then_some(1)
}

/// Where the old value of a non-fetching atomic goes: nowhere (the RC core writes
/// every ATOMIC ACKNOWLEDGE's value into the work request's 8-byte segment).
struct Discard;

impl LocalMemory for Discard {
    fn len(&self) -> u64 {
        8
    }
    fn read(&self, _offset: u64, buf: &mut [u8]) -> std::result::Result<(), rc::MemoryError> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> std::result::Result<(), rc::MemoryError> {
        Ok(())
    }
}

fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_ne_bytes(w)
}

impl AtomicOps for SrEndpoint {
    fn valid(&self, op: AtomicOp, dt: Datatype, form: AtomicForm) -> Option<usize> {
        native_atomic(op, dt, form)
    }

    fn cpu_coherent(&self) -> bool {
        // The responder applies them with a CPU compare-exchange on the memory.
        true
    }

    fn post_atomic(&self, req: AtomicRequest) -> Result<()> {
        // The RC core refuses to post a misaligned one: refused here, at the call.
        req.check_rc(
            "softroce",
            native_atomic(req.op, req.datatype, req.form).is_some(),
        )?;
        let ep = &self.inner;
        let (remote_va, key) = (req.remote.addr, rkey(req.remote.key));
        let op = match req.op {
            AtomicOp::Cswap => SendOp::CompareSwap {
                remote_va,
                rkey: key,
                compare: word(&req.compare),
                swap: word(&req.operand),
            },
            _ => SendOp::FetchAdd {
                remote_va,
                rkey: key,
                add: word(&req.operand),
            },
        };
        let fetch = req.result.is_some();
        let mem: Arc<dyn LocalMemory> = match req.result {
            Some(seg) => Arc::new(OpMemory::segments(vec![seg])),
            None => Arc::new(Discard),
        };
        let local = Some(LocalSegment::new(mem, 0, 8));
        let flags = CompFlags::ATOMIC
            | if fetch {
                CompFlags::READ
            } else {
                CompFlags::WRITE
            };
        ep.with_slot(|slot| {
            ep.check_tx(slot)?;
            post_op(
                slot,
                req.context,
                flags,
                if fetch { 8 } else { 0 },
                req.completion,
                vec![(op, local)],
            )
        })
    }
}
