//! Endpoints: passive (listening) and active (connected, reliable), and the data
//! operations: send/recv, inject, remote CQ data, RMA write/read and the `*msg` forms
//! (atomics are in [`atomic`](crate::atomic)).
//!
//! Every operation is checked here before the provider sees it: local ranges inside
//! their regions, local access rights (SEND for send sources, RECV for receive
//! buffers, WRITE for RMA-write sources, READ for RMA-read destinations), the provider's
//! size and iovec limits, and the capabilities the flags need. The provider receives
//! [`Segment`]s that hold their regions alive until the operation completes.

use std::sync::Arc;

use crate::cq::CompletionQueue;
use crate::domain::Domain;
use crate::eq::{ConnRequest, EventQueue};
use crate::error::{Error, ErrorKind, Result};
use crate::flags::{Access, Caps, OpFlags};
use crate::info::{Address, Info};
use crate::memory::{LocalIov, RemoteIov, Segment, Segments};
use crate::provider::{CmOps, EndpointOps, MsgOps, PassiveEndpointOps, RmaOps};
use crate::Fid;

/// Which queues an endpoint reports to.
#[derive(Clone, Copy)]
pub struct EndpointConfig<'a> {
    /// Transmit completions (sends, writes, reads).
    pub tx_cq: &'a CompletionQueue,
    /// Receive completions (receives, remote writes with CQ data).
    pub rx_cq: &'a CompletionQueue,
    /// Connection events.
    pub eq: &'a EventQueue,
    /// When true, transmit operations (sends, writes, reads) posted through the `*msg`
    /// forms generate a successful completion only if their flags contain
    /// [`OpFlags::COMPLETION`] (libfabric `FI_SELECTIVE_COMPLETION` on the transmit
    /// queue); the plain forms always ask for one. Receives always complete. Errors
    /// always generate a completion.
    pub selective_completion: bool,
}

impl<'a> EndpointConfig<'a> {
    /// One queue for both directions.
    pub fn new(cq: &'a CompletionQueue, eq: &'a EventQueue) -> Self {
        EndpointConfig {
            tx_cq: cq,
            rx_cq: cq,
            eq,
            selective_completion: false,
        }
    }
}

/// The source data of a transmit operation, as the provider receives it.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Copied at the call (inject): the application's buffer is already free.
    Inline(Vec<u8>),
    /// Ranges of registered regions, held until completion.
    Segments(Segments),
}

impl Payload {
    /// Total length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Inline(v) => v.len(),
            Payload::Segments(s) => s.iter().map(Segment::len).sum(),
        }
    }
    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A send, validated, as the provider receives it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SendRequest {
    /// The message.
    pub payload: Payload,
    /// Remote CQ data, if any.
    pub data: Option<u64>,
    /// The application's context.
    pub context: u64,
    /// Flags (completion level, fence...).
    pub flags: OpFlags,
    /// Whether a successful completion is wanted.
    pub completion: bool,
}

/// A receive, validated, as the provider receives it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RecvRequest {
    /// Where the message goes, in order.
    pub segments: Segments,
    /// The application's context.
    pub context: u64,
}

impl RecvRequest {
    /// A receive into `segments` (validated ranges: see [`Segment::new`]), for a
    /// provider's own tests and layers that post below the [`Endpoint`] checks.
    pub fn new(segments: impl Into<Segments>, context: u64) -> Self {
        RecvRequest {
            segments: segments.into(),
            context,
        }
    }
    /// Total buffer space.
    pub fn len(&self) -> usize {
        self.segments.iter().map(Segment::len).sum()
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An RMA write or read, validated, as the provider receives it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RmaRequest {
    /// Local data: the source of a write, the destination of a read (always
    /// `Segments` for a read).
    pub payload: Payload,
    /// Remote ranges, in order; their total length equals the local one.
    pub remote: Vec<RemoteIov>,
    /// Remote CQ data (writes only).
    pub data: Option<u64>,
    /// The application's context.
    pub context: u64,
    /// Flags (completion level, fence...).
    pub flags: OpFlags,
    /// Whether a successful completion is wanted.
    pub completion: bool,
}

/// A message for [`Endpoint::sendmsg`] / [`Endpoint::recvmsg`].
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    /// Local buffers.
    pub iov: &'a [LocalIov<'a>],
    /// The application's context.
    pub context: u64,
    /// Remote CQ data, sent when flags contain [`OpFlags::REMOTE_CQ_DATA`].
    pub data: u64,
}

/// An RMA message for [`Endpoint::writemsg`] / [`Endpoint::readmsg`].
#[derive(Debug, Clone, Copy)]
pub struct RmaMsg<'a> {
    /// Local buffers.
    pub iov: &'a [LocalIov<'a>],
    /// Remote ranges.
    pub rma_iov: &'a [RemoteIov],
    /// The application's context.
    pub context: u64,
    /// Remote CQ data, sent when flags contain [`OpFlags::REMOTE_CQ_DATA`].
    pub data: u64,
}

/// A connected, reliable endpoint. Dropping it closes the connection.
pub struct Endpoint {
    pub(crate) ops: Arc<dyn EndpointOps>,
    pub(crate) info: Info,
    domain: Domain,
    selective: bool,
    pub(crate) tx_cq: CompletionQueue,
    rx_cq: CompletionQueue,
    _eq: EventQueue,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("fid", &self.fid())
            .field("provider", &self.info.provider_name)
            .finish()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.ops.close();
    }
}

pub(crate) fn segments(
    iov: &[LocalIov<'_>],
    domain: &Domain,
    need: Access,
    what: &str,
) -> Result<Segments> {
    let mut out = Segments::with_capacity(iov.len());
    for (i, v) in iov.iter().enumerate() {
        let end = v.offset.checked_add(v.len);
        if end.is_none_or(|e| e > v.mr.len()) {
            return Err(Error::invalid(format!(
                "{what}: iov {i} ({}+{}) is outside its region of {} bytes",
                v.offset,
                v.len,
                v.mr.len()
            )));
        }
        if !v.mr.access().contains(need) {
            return Err(Error::new(
                ErrorKind::AccessDenied,
                format!(
                    "{what}: iov {i}'s region lacks {} access (has {})",
                    crate::info::flag_names(need),
                    crate::info::flag_names(v.mr.access())
                ),
            ));
        }
        if !v.mr.domain().same_as(domain) {
            return Err(Error::invalid(format!(
                "{what}: iov {i}'s region belongs to another domain"
            )));
        }
        out.push(Segment::new(v.mr, v.offset, v.len)?);
    }
    Ok(out)
}

impl Endpoint {
    pub(crate) fn new(
        ops: Arc<dyn EndpointOps>,
        info: Info,
        domain: Domain,
        config: &EndpointConfig<'_>,
    ) -> Self {
        Endpoint {
            ops,
            info,
            domain,
            selective: config.selective_completion,
            tx_cq: config.tx_cq.clone(),
            rx_cq: config.rx_cq.clone(),
            _eq: config.eq.clone(),
        }
    }

    /// Identifier that events about this endpoint carry.
    pub fn fid(&self) -> Fid {
        self.ops.fid()
    }
    /// The answer the endpoint was opened from.
    pub fn info(&self) -> &Info {
        &self.info
    }
    /// The domain.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }
    /// Local address, once bound.
    pub fn local_addr(&self) -> Option<Address> {
        self.ops.local_addr()
    }
    /// Peer address, once connected.
    pub fn peer_addr(&self) -> Option<Address> {
        self.ops.cm().and_then(|cm| cm.peer_addr())
    }

    fn cm_ops(&self, what: &str) -> Result<&dyn CmOps> {
        self.ops.cm().ok_or_else(|| {
            Error::unsupported(format!(
                "{what}: a {:?} endpoint has no connection management",
                self.info.ep_type
            ))
        })
    }

    fn msg_ops(&self, what: &str) -> Result<&dyn MsgOps> {
        self.ops.msg().ok_or_else(|| {
            Error::unsupported(format!(
                "{what}: the provider's endpoint has no message operations"
            ))
        })
    }

    fn rma_ops(&self, what: &str) -> Result<&dyn RmaOps> {
        self.ops.rma().ok_or_else(|| {
            Error::unsupported(format!(
                "{what}: the provider's endpoint has no RMA operations"
            ))
        })
    }

    /// Connects to the info's `dest_addr`, sending `data` (at most `cm_data_size`
    /// bytes). Wait for [`Event::Connected`](crate::Event::Connected) on the event queue.
    pub fn connect(&self, data: &[u8]) -> Result<()> {
        let addr = self.info.dest_addr.clone().ok_or_else(|| {
            Error::invalid("connect: the info has no dest_addr (give node/service in hints)")
        })?;
        self.connect_to(&addr, data)
    }

    /// Connects to `addr`, sending `data`.
    pub fn connect_to(&self, addr: &Address, data: &[u8]) -> Result<()> {
        self.check_cm_data(data)?;
        self.cm_ops("connect")?.connect(addr, data)
    }

    /// Accepts the connection request the endpoint was opened from, sending `data`.
    pub fn accept(&self, data: &[u8]) -> Result<()> {
        if self.info.conn_handle().is_none() {
            return Err(Error::invalid(
                "accept: the endpoint was not opened from a connection request",
            ));
        }
        self.check_cm_data(data)?;
        self.cm_ops("accept")?.accept(data)
    }

    /// Shuts the connection down. Outstanding operations complete in error and both
    /// sides get a shutdown event. Operations posted afterwards fail with
    /// [`ErrorKind::NotConnected`] or [`ErrorKind::Shutdown`].
    pub fn shutdown(&self) -> Result<()> {
        self.cm_ops("shutdown")?.shutdown()
    }

    fn check_cm_data(&self, data: &[u8]) -> Result<()> {
        if data.len() > self.info.limits.cm_data_size {
            return Err(Error::invalid(format!(
                "connection data of {} bytes exceeds cm_data_size {}",
                data.len(),
                self.info.limits.cm_data_size
            )));
        }
        Ok(())
    }

    pub(crate) fn check_caps(&self, caps: Caps, what: &str) -> Result<()> {
        if !self.info.caps.contains(caps) {
            return Err(Error::unsupported(format!(
                "{what} needs capability {} that the endpoint's info lacks",
                crate::info::flag_names(caps - self.info.caps)
            )));
        }
        Ok(())
    }

    fn check_len(&self, n_iov: usize, limit: usize, total: usize, what: &str) -> Result<()> {
        if n_iov > limit {
            return Err(Error::invalid(format!(
                "{what}: {n_iov} iovecs exceed the limit of {limit}"
            )));
        }
        if total > self.info.limits.max_msg_size {
            return Err(Error::invalid(format!(
                "{what}: {total} bytes exceed max_msg_size {}",
                self.info.limits.max_msg_size
            )));
        }
        Ok(())
    }

    fn check_data(&self, flags: OpFlags, data: u64, what: &str) -> Result<Option<u64>> {
        if !flags.contains(OpFlags::REMOTE_CQ_DATA) {
            return Ok(None);
        }
        self.check_caps(Caps::REMOTE_CQ_DATA, what)?;
        let bits = self.info.limits.cq_data_size * 8;
        if bits < 64 && data >> bits != 0 {
            return Err(Error::invalid(format!(
                "{what}: CQ data {data:#x} does not fit in cq_data_size {} bytes",
                self.info.limits.cq_data_size
            )));
        }
        Ok(Some(data))
    }

    fn check_level(&self, flags: OpFlags, what: &str) -> Result<()> {
        if flags.contains(OpFlags::COMMIT_COMPLETE) {
            self.check_caps(Caps::RMA_PMEM, what)?;
        }
        Ok(())
    }

    pub(crate) fn wants_completion(&self, flags: OpFlags) -> bool {
        !flags.contains(OpFlags::INJECT) && (!self.selective || flags.contains(OpFlags::COMPLETION))
    }

    fn inline(&self, iov: &[LocalIov<'_>], need: Access, what: &str) -> Result<Payload> {
        let segs = segments(iov, &self.domain, need, what)?;
        let total: usize = segs.iter().map(Segment::len).sum();
        if total > self.info.limits.inject_size {
            return Err(Error::invalid(format!(
                "{what}: inject of {total} bytes exceeds inject_size {}",
                self.info.limits.inject_size
            )));
        }
        let mut v = Vec::with_capacity(total);
        for s in &segs {
            s.extend_vec(&mut v);
        }
        Ok(Payload::Inline(v))
    }

    /// Sends a message; `context` comes back in the completion.
    pub fn send(&self, iov: LocalIov<'_>, context: u64) -> Result<()> {
        self.sendmsg(
            &Msg {
                iov: &[iov],
                context,
                data: 0,
            },
            OpFlags::COMPLETION,
        )
    }

    /// Sends a message with remote CQ data.
    pub fn senddata(&self, iov: LocalIov<'_>, data: u64, context: u64) -> Result<()> {
        self.sendmsg(
            &Msg {
                iov: &[iov],
                context,
                data,
            },
            OpFlags::COMPLETION | OpFlags::REMOTE_CQ_DATA,
        )
    }

    /// Sends a message gathered from several buffers.
    pub fn sendv(&self, iov: &[LocalIov<'_>], context: u64) -> Result<()> {
        self.sendmsg(
            &Msg {
                iov,
                context,
                data: 0,
            },
            OpFlags::COMPLETION,
        )
    }

    /// Sends a small message copied at the call, with no completion (at most
    /// `inject_size` bytes).
    pub fn inject(&self, buf: &[u8]) -> Result<()> {
        self.inject_inner(buf, None)
    }

    /// [`inject`](Self::inject) with remote CQ data.
    pub fn injectdata(&self, buf: &[u8], data: u64) -> Result<()> {
        let data = self.check_data(OpFlags::REMOTE_CQ_DATA, data, "injectdata")?;
        self.inject_inner(buf, data)
    }

    fn inject_inner(&self, buf: &[u8], data: Option<u64>) -> Result<()> {
        self.check_caps(Caps::MSG, "inject")?;
        if buf.len() > self.info.limits.inject_size {
            return Err(Error::invalid(format!(
                "inject of {} bytes exceeds inject_size {}",
                buf.len(),
                self.info.limits.inject_size
            )));
        }
        self.msg_ops("inject")?.post_send(SendRequest {
            payload: Payload::Inline(buf.to_vec()),
            data,
            context: 0,
            flags: OpFlags::INJECT,
            completion: false,
        })
    }

    /// Sends with explicit flags (`COMPLETION`, `REMOTE_CQ_DATA`, `INJECT`,
    /// `INJECT_COMPLETE`, `TRANSMIT_COMPLETE`, `DELIVERY_COMPLETE`, `FENCE`).
    pub fn sendmsg(&self, msg: &Msg<'_>, flags: OpFlags) -> Result<()> {
        self.check_caps(Caps::MSG, "send")?;
        let data = self.check_data(flags, msg.data, "send")?;
        if flags.contains(OpFlags::COMMIT_COMPLETE) {
            return Err(Error::invalid(
                "send: COMMIT_COMPLETE applies to RMA writes into persistent memory",
            ));
        }
        let payload = if flags.contains(OpFlags::INJECT) {
            self.inline(msg.iov, Access::SEND, "send")?
        } else {
            Payload::Segments(segments(msg.iov, &self.domain, Access::SEND, "send")?)
        };
        self.check_len(
            msg.iov.len(),
            self.info.limits.iov_limit,
            payload.len(),
            "send",
        )?;
        self.msg_ops("send")?.post_send(SendRequest {
            payload,
            data,
            context: msg.context,
            flags,
            completion: self.wants_completion(flags),
        })
    }

    /// Posts a receive buffer.
    pub fn recv(&self, iov: LocalIov<'_>, context: u64) -> Result<()> {
        self.recvv(&[iov], context)
    }

    /// Posts a receive scattering into several buffers.
    pub fn recvv(&self, iov: &[LocalIov<'_>], context: u64) -> Result<()> {
        self.recvmsg(
            &Msg {
                iov,
                context,
                data: 0,
            },
            OpFlags::COMPLETION,
        )
    }

    /// Posts a receive with explicit flags.
    pub fn recvmsg(&self, msg: &Msg<'_>, _flags: OpFlags) -> Result<()> {
        self.check_caps(Caps::MSG, "recv")?;
        let segs = segments(msg.iov, &self.domain, Access::RECV, "recv")?;
        let total = segs.iter().map(Segment::len).sum();
        self.check_len(msg.iov.len(), self.info.limits.iov_limit, total, "recv")?;
        self.msg_ops("recv")?.post_recv(RecvRequest {
            segments: segs,
            context: msg.context,
        })
    }

    /// Writes a local range into a peer's region.
    pub fn write(&self, iov: LocalIov<'_>, remote: RemoteIov, context: u64) -> Result<()> {
        self.writemsg(
            &RmaMsg {
                iov: &[iov],
                rma_iov: &[remote],
                context,
                data: 0,
            },
            OpFlags::COMPLETION,
        )
    }

    /// Writes, and delivers `data` to the peer's receive completion queue. The target
    /// consumes a posted receive for the notification (as verbs' write with immediate).
    pub fn writedata(
        &self,
        iov: LocalIov<'_>,
        remote: RemoteIov,
        data: u64,
        context: u64,
    ) -> Result<()> {
        self.writemsg(
            &RmaMsg {
                iov: &[iov],
                rma_iov: &[remote],
                context,
                data,
            },
            OpFlags::COMPLETION | OpFlags::REMOTE_CQ_DATA,
        )
    }

    /// Writes a small buffer copied at the call, with no completion.
    pub fn inject_write(&self, buf: &[u8], remote: RemoteIov) -> Result<()> {
        self.check_caps(Caps::RMA, "inject_write")?;
        if buf.len() > self.info.limits.inject_size {
            return Err(Error::invalid(format!(
                "inject_write of {} bytes exceeds inject_size {}",
                buf.len(),
                self.info.limits.inject_size
            )));
        }
        if buf.len() != remote.len {
            return Err(Error::invalid(format!(
                "inject_write: {} local bytes but the remote range has {}",
                buf.len(),
                remote.len
            )));
        }
        self.rma_ops("inject_write")?.post_write(RmaRequest {
            payload: Payload::Inline(buf.to_vec()),
            remote: vec![remote],
            data: None,
            context: 0,
            flags: OpFlags::INJECT,
            completion: false,
        })
    }

    /// Writes with explicit flags: `COMPLETION`, `REMOTE_CQ_DATA`, `INJECT`,
    /// `INJECT_COMPLETE`, `TRANSMIT_COMPLETE`, `DELIVERY_COMPLETE`, `COMMIT_COMPLETE`,
    /// `FENCE`. With `COMMIT_COMPLETE` the completion means the data is durable at the
    /// target; the target refuses it for a region not registered `PMEM`.
    pub fn writemsg(&self, msg: &RmaMsg<'_>, flags: OpFlags) -> Result<()> {
        self.check_caps(Caps::RMA, "write")?;
        self.check_level(flags, "write with COMMIT_COMPLETE")?;
        let data = self.check_data(flags, msg.data, "write")?;
        let payload = if flags.contains(OpFlags::INJECT) {
            self.inline(msg.iov, Access::WRITE, "write")?
        } else {
            Payload::Segments(segments(msg.iov, &self.domain, Access::WRITE, "write")?)
        };
        self.check_rma(msg, payload.len(), "write")?;
        self.rma_ops("write")?.post_write(RmaRequest {
            payload,
            remote: msg.rma_iov.to_vec(),
            data,
            context: msg.context,
            flags,
            completion: self.wants_completion(flags),
        })
    }

    /// Reads a peer's range into a local range.
    pub fn read(&self, iov: LocalIov<'_>, remote: RemoteIov, context: u64) -> Result<()> {
        self.readmsg(
            &RmaMsg {
                iov: &[iov],
                rma_iov: &[remote],
                context,
                data: 0,
            },
            OpFlags::COMPLETION,
        )
    }

    /// Reads with explicit flags.
    pub fn readmsg(&self, msg: &RmaMsg<'_>, flags: OpFlags) -> Result<()> {
        self.check_caps(Caps::RMA, "read")?;
        if flags.intersects(OpFlags::INJECT | OpFlags::REMOTE_CQ_DATA | OpFlags::COMMIT_COMPLETE) {
            return Err(Error::invalid(
                "read: INJECT, REMOTE_CQ_DATA and COMMIT_COMPLETE do not apply to reads",
            ));
        }
        let segs = segments(msg.iov, &self.domain, Access::READ, "read")?;
        let total = segs.iter().map(Segment::len).sum();
        self.check_rma(msg, total, "read")?;
        self.rma_ops("read")?.post_read(RmaRequest {
            payload: Payload::Segments(segs),
            remote: msg.rma_iov.to_vec(),
            data: None,
            context: msg.context,
            flags,
            completion: self.wants_completion(flags),
        })
    }

    // Per-operation futures (see `fabric_core::dispatch`): each posts at once with a
    // context allocated by its completion queue's dispatcher and resolves with that
    // operation's completion, whichever task drains the queue.

    fn async_flags(flags: OpFlags, what: &str) -> Result<OpFlags> {
        if flags.contains(OpFlags::INJECT) {
            return Err(Error::invalid(format!(
                "{what}: an inject has no completion to await; use the blocking form"
            )));
        }
        Ok(flags | OpFlags::COMPLETION)
    }

    /// Sends a message and returns the future of its completion. An error completion
    /// resolves to `Err` (its [`CqError`](crate::CqError) as the source).
    pub fn send_async(&self, iov: LocalIov<'_>) -> Result<crate::OpFuture> {
        crate::OpFuture::post(&self.tx_cq, |ctx| self.send(iov, ctx))
    }
    /// Posts a receive and returns the future of its completion (its `len` is the
    /// bytes received, `data` any remote CQ data).
    pub fn recv_async(&self, iov: LocalIov<'_>) -> Result<crate::OpFuture> {
        crate::OpFuture::post(&self.rx_cq, |ctx| self.recv(iov, ctx))
    }
    /// RMA write; the future of its completion.
    pub fn write_async(&self, iov: LocalIov<'_>, remote: RemoteIov) -> Result<crate::OpFuture> {
        crate::OpFuture::post(&self.tx_cq, |ctx| self.write(iov, remote, ctx))
    }
    /// RMA read; the future of its completion (the data is in `iov` once it resolves).
    pub fn read_async(&self, iov: LocalIov<'_>, remote: RemoteIov) -> Result<crate::OpFuture> {
        crate::OpFuture::post(&self.tx_cq, |ctx| self.read(iov, remote, ctx))
    }
    /// [`sendmsg`](Self::sendmsg) with a completion to await (`msg.context` is
    /// replaced by the dispatcher's; `COMPLETION` is implied; `INJECT` is refused).
    pub fn sendmsg_async(&self, msg: &Msg<'_>, flags: OpFlags) -> Result<crate::OpFuture> {
        let flags = Self::async_flags(flags, "sendmsg_async")?;
        crate::OpFuture::post(&self.tx_cq, |ctx| {
            self.sendmsg(
                &Msg {
                    context: ctx,
                    ..*msg
                },
                flags,
            )
        })
    }
    /// [`writemsg`](Self::writemsg) with a completion to await, at the completion
    /// level the flags ask for (e.g. `COMMIT_COMPLETE`: resolves once durable at the
    /// target).
    pub fn writemsg_async(&self, msg: &RmaMsg<'_>, flags: OpFlags) -> Result<crate::OpFuture> {
        let flags = Self::async_flags(flags, "writemsg_async")?;
        crate::OpFuture::post(&self.tx_cq, |ctx| {
            self.writemsg(
                &RmaMsg {
                    context: ctx,
                    ..*msg
                },
                flags,
            )
        })
    }
    /// [`readmsg`](Self::readmsg) with a completion to await.
    pub fn readmsg_async(&self, msg: &RmaMsg<'_>, flags: OpFlags) -> Result<crate::OpFuture> {
        let flags = Self::async_flags(flags, "readmsg_async")?;
        crate::OpFuture::post(&self.tx_cq, |ctx| {
            self.readmsg(
                &RmaMsg {
                    context: ctx,
                    ..*msg
                },
                flags,
            )
        })
    }

    fn check_rma(&self, msg: &RmaMsg<'_>, local: usize, what: &str) -> Result<()> {
        self.check_len(msg.iov.len(), self.info.limits.iov_limit, local, what)?;
        if msg.rma_iov.is_empty() || msg.rma_iov.len() > self.info.limits.rma_iov_limit {
            return Err(Error::invalid(format!(
                "{what}: {} remote iovecs (1 to {} allowed)",
                msg.rma_iov.len(),
                self.info.limits.rma_iov_limit
            )));
        }
        let remote: usize = msg.rma_iov.iter().map(|r| r.len).sum();
        if remote != local {
            return Err(Error::invalid(format!(
                "{what}: {local} local bytes but {remote} remote bytes"
            )));
        }
        Ok(())
    }
}

/// A passive endpoint: listens for connection requests. Dropping it stops listening.
pub struct PassiveEndpoint {
    ops: Arc<dyn PassiveEndpointOps>,
    _eq: EventQueue,
}

impl Drop for PassiveEndpoint {
    fn drop(&mut self) {
        self.ops.close();
    }
}

impl PassiveEndpoint {
    pub(crate) fn new(ops: Arc<dyn PassiveEndpointOps>, eq: EventQueue) -> Self {
        PassiveEndpoint { ops, _eq: eq }
    }
    /// Identifier that connection requests arriving here carry
    /// ([`ConnRequest::listener`]).
    pub fn fid(&self) -> Fid {
        self.ops.fid()
    }
    /// Starts listening.
    pub fn listen(&self) -> Result<()> {
        self.ops.listen()
    }
    /// The bound address (with the actual port when port 0 was asked for).
    pub fn local_addr(&self) -> Result<Address> {
        self.ops.local_addr()
    }
    /// Rejects a connection request, sending `data` to the peer.
    pub fn reject(&self, request: &ConnRequest, data: &[u8]) -> Result<()> {
        self.ops.reject(&request.info, data)
    }
}
