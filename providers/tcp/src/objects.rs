//! The provider objects behind fabric-core's wrappers: fabric, domain, completion and
//! event queues, passive and active endpoints.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;

use fabric_core::prov::{self, KeyedMr, Progress as _, ProviderCq, ProviderEq};
use fabric_core::provider::{
    CmOps, CqOps, DomainOps, EndpointBinding, EndpointOps, EqOps, FabricOps, MrOps, MsgOps,
    PassiveEndpointOps, RmaOps,
};
use fabric_core::{
    Access, Address, CompFlags, CqAttr, EqAttr, Error, ErrorKind, Event, Fid, Info, MemoryBacking,
    MrFlags, OpFlags, Payload, Progress, RecvRequest, Result, RmaRequest, SendRequest,
};
use tracing::debug;

use crate::conn::{
    wire_iovs, AfterTx, Body, CompQueue, Conn, ConnState, PendKind, Pending, Reporting, TxOp,
};
use crate::engine::{connect_failed, take_request, Engine};
use crate::mr;
use crate::sys;
use crate::wire::{Header, Op, Status, FLAG_COMMIT, FLAG_CQ_DATA, FLAG_DELIVERY, FLAG_NO_ACK};
use fabric_core::prov::KeyMap;
use fabric_core::wait::WaitQueue;

/// The fabric: owns the progress engine.
pub(crate) struct TcpFabric {
    engine: Arc<Engine>,
}

impl TcpFabric {
    pub(crate) fn open(info: &Info) -> Result<TcpFabric> {
        let engine = Engine::new()?;
        if info.progress == Progress::Auto {
            engine.start_auto();
        }
        Ok(TcpFabric { engine })
    }
}

impl TcpFabric {
    /// The progress engine (for the crate's tests).
    #[cfg(test)]
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

impl FabricOps for TcpFabric {
    fn open_domain(&self, info: &Info) -> Result<Arc<dyn DomainOps>> {
        if info.progress == Progress::Auto {
            self.engine.start_auto();
        }
        Ok(Arc::new(TcpDomain {
            engine: self.engine.clone(),
            keys: Arc::new(mr::key_map(info.limits.mr_key_size)),
        }))
    }

    fn open_eq(&self, _attr: &EqAttr) -> Result<Arc<dyn EqOps>> {
        TcpEq::open(&self.engine)
    }

    fn open_passive_ep(
        &self,
        info: &Info,
        eq: &Arc<dyn EqOps>,
    ) -> Result<Arc<dyn PassiveEndpointOps>> {
        let eq = downcast_eq(eq, &self.engine)?;
        let sock = prov::bind_listener(prov::listen_addr(info, "tcp")?)?;
        let fid = Fid::next();
        debug!(%fid, addr = %sock.local_addr()?, "passive endpoint bound");
        self.engine.add_listener(fid, sock, info.clone(), eq);
        Ok(Arc::new(TcpPep {
            fid,
            engine: self.engine.clone(),
        }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn downcast_eq(eq: &Arc<dyn EqOps>, engine: &Arc<Engine>) -> Result<Arc<WaitQueue<Event>>> {
    TcpEq::queue_of(eq, engine, "tcp")
}

fn downcast_cq(cq: &Arc<dyn CqOps>, engine: &Arc<Engine>) -> Result<Arc<CompQueue>> {
    TcpCq::queue_of(cq, engine, "tcp")
}

/// A domain: the key map of its registrations.
pub(crate) struct TcpDomain {
    engine: Arc<Engine>,
    keys: Arc<KeyMap>,
}

impl TcpDomain {
    /// The key table (for the crate's tests).
    #[cfg(test)]
    pub(crate) fn keys(&self) -> &Arc<KeyMap> {
        &self.keys
    }
}

impl DomainOps for TcpDomain {
    fn open_cq(&self, _attr: &CqAttr) -> Result<Arc<dyn CqOps>> {
        TcpCq::open(&self.engine)
    }

    fn register(
        &self,
        memory: Arc<dyn MemoryBacking>,
        access: Access,
        flags: MrFlags,
    ) -> Result<Arc<dyn MrOps>> {
        // PMEM: fabric-core has checked that the memory can persist; COMMIT writes into
        // the region persist through MemoryBacking::persist before they are acked.
        Ok(Arc::new(KeyedMr::register(
            &self.keys, memory, access, flags,
        )))
    }

    fn open_endpoint(&self, info: &Info, bind: EndpointBinding) -> Result<Arc<dyn EndpointOps>> {
        let rep = Reporting {
            tx_cq: downcast_cq(&bind.tx_cq, &self.engine)?,
            rx_cq: downcast_cq(&bind.rx_cq, &self.engine)?,
            eq: downcast_eq(&bind.eq, &self.engine)?,
            keys: self.keys.clone(),
        };
        let fid = Fid::next();
        let mut conn = Conn::new(fid, rep, info.limits.tx_size, info.limits.rx_size);
        let mut local = None;
        let mut peer = None;
        if info.conn_handle().is_some() {
            let sock = take_request(info)?;
            local = sock.local_addr().ok();
            peer = sock.peer_addr().ok();
            conn.sock = Some(sock);
            conn.state = ConnState::Accepting;
        }
        self.engine.with(|st, _| st.conns.insert(fid.0, conn));
        Ok(Arc::new(TcpEndpoint {
            fid,
            engine: self.engine.clone(),
            addrs: parking_lot::Mutex::new((local, peer)),
        }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A completion queue: the shared queue object over the engine.
pub(crate) type TcpCq = ProviderCq<Engine>;
/// An event queue.
pub(crate) type TcpEq = ProviderEq<Engine>;

/// A passive endpoint.
pub(crate) struct TcpPep {
    fid: Fid,
    engine: Arc<Engine>,
}

impl PassiveEndpointOps for TcpPep {
    fn fid(&self) -> Fid {
        self.fid
    }

    fn listen(&self) -> Result<()> {
        self.engine.listen(self.fid)
    }

    fn local_addr(&self) -> Result<Address> {
        Ok(Address::Inet(self.engine.listener_addr(self.fid)?))
    }

    fn reject(&self, request: &Info, data: &[u8]) -> Result<()> {
        let sock = take_request(request)?;
        let h = Header {
            status: Status::REJECTED,
            ..Header::new(Op::ConnResp, 0, data.len() as u64)
        };
        let mut buf = [0u8; crate::wire::MAX_HDR_SIZE];
        let n = h.emit(&mut buf);
        let iov = [
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: n,
            },
            libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            },
        ];
        use std::os::fd::AsRawFd;
        // A fresh socket's buffer takes a header and 256 bytes; if it does not, the
        // peer sees the connection close, which it also reports as refused.
        // SAFETY: both iovecs point at live local buffers (buf, data) for the call.
        let r = unsafe { sys::sendv(sock.as_raw_fd(), &iov) };
        debug!(fid = %self.fid, "rejected a connection request: {r:?}");
        sys::shutdown_both(&sock);
        Ok(())
    }

    fn close(&self) {
        self.engine.close_listener(self.fid);
    }
}

impl Drop for TcpPep {
    fn drop(&mut self) {
        self.engine.close_listener(self.fid);
    }
}

/// An active endpoint: a handle on its connection inside the engine.
pub(crate) struct TcpEndpoint {
    fid: Fid,
    engine: Arc<Engine>,
    addrs: parking_lot::Mutex<(Option<SocketAddr>, Option<SocketAddr>)>,
}

fn closed() -> Error {
    Error::new(ErrorKind::NotConnected, "the endpoint is shut down")
}

impl TcpEndpoint {
    /// Runs `f` on the connection under the engine lock, then refreshes its epoll
    /// registration.
    fn with_conn<R>(&self, f: impl FnOnce(&mut Conn) -> Result<R>) -> Result<R> {
        self.engine.with(|st, ep| {
            let c = st.conns.get_mut(&self.fid.0).ok_or_else(closed)?;
            let r = f(c);
            c.update_interest(ep);
            r
        })
    }

    /// Queues an operation and sends at once, or with `more` (`OpFlags::MORE`)
    /// leaves it queued for the next post without `MORE` to send in the same
    /// `sendmsg` (as libfabric's `FI_MORE`, the caller owes that post).
    fn post_tx(&self, more: bool, op_builder: impl FnOnce(&mut Conn) -> TxOp) -> Result<()> {
        self.with_conn(|c| {
            if let Some(e) = c.post_refusal() {
                return Err(e);
            }
            if c.tx_outstanding() >= c.tx_size {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!("{} operations outstanding (tx_size)", c.tx_size),
                ));
            }
            let op = op_builder(c);
            if more {
                c.queue(op, false);
            } else if let Err(f) = c.send_or_queue(op) {
                c.fail(f);
            }
            Ok(())
        })
    }
}

fn body_of(p: Payload) -> Body {
    match p {
        Payload::Inline(v) => Body::Bytes(v),
        Payload::Segments(s) => Body::Segs(s),
    }
}

impl CmOps for TcpEndpoint {
    fn connect(&self, addr: &Address, data: &[u8]) -> Result<()> {
        let sa = addr.as_inet().ok_or_else(|| {
            Error::new(
                ErrorKind::AddressNotAvailable,
                format!("tcp connects to IP addresses only, not {addr}"),
            )
        })?;
        self.with_conn(|c| {
            if c.state != ConnState::Idle {
                return Err(Error::invalid(format!(
                    "connect: the endpoint is {:?}, not idle",
                    c.state
                )));
            }
            c.connect_data = data.to_vec();
            match sys::connect_nonblocking(&sa) {
                Ok((sock, done)) => {
                    sys::tune_stream(&sock)?;
                    *self.addrs.lock() = (sock.local_addr().ok(), Some(sa));
                    c.sock = Some(sock);
                    c.state = ConnState::Connecting;
                    if done {
                        if let Err(f) = c.start_handshake() {
                            c.fail(f);
                        }
                    }
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    connect_failed(c, e);
                    Ok(())
                }
                Err(e) => Err(Error::from(e).context(format!("connect to {sa}"))),
            }
        })
    }

    fn accept(&self, data: &[u8]) -> Result<()> {
        self.with_conn(|c| {
            if c.state != ConnState::Accepting {
                return Err(Error::invalid(format!(
                    "accept: the endpoint is {:?}, not a pending request",
                    c.state
                )));
            }
            let h = Header::new(Op::ConnResp, 0, data.len() as u64);
            c.queue(
                TxOp::new(&h, Body::Bytes(data.to_vec()), AfterTx::Nothing),
                true,
            );
            c.state = ConnState::Connected;
            if let Err(f) = c.flush() {
                c.fail(f);
                return Err(Error::new(ErrorKind::NotConnected, "the peer went away"));
            }
            c.rep.eq.push(Event::Connected {
                fid: c.fid,
                data: Vec::new(),
            });
            // Anything the client sent after our accept is read on the next progress.
            Ok(())
        })
    }

    fn shutdown(&self) -> Result<()> {
        self.with_conn(|c| {
            c.shutdown();
            Ok(())
        })
    }

    fn peer_addr(&self) -> Option<Address> {
        self.addrs.lock().1.map(Address::Inet)
    }
}

impl MsgOps for TcpEndpoint {
    fn post_send(&self, req: SendRequest) -> Result<()> {
        self.post_tx(req.flags.contains(OpFlags::MORE), |c| {
            let op_id = c.next_id();
            let len = req.payload.len();
            let mut h = Header::new(Op::Msg, op_id, len as u64);
            if let Some(d) = req.data {
                h.flags |= FLAG_CQ_DATA;
                h.data = d;
            }
            let flags = CompFlags::MSG | CompFlags::SEND;
            let delivery = req
                .flags
                .intersects(OpFlags::DELIVERY_COMPLETE | OpFlags::COMMIT_COMPLETE);
            let then = if delivery {
                h.flags |= FLAG_DELIVERY;
                AfterTx::Await(Pending {
                    op_id,
                    kind: PendKind::Send,
                    context: req.context,
                    flags,
                    len,
                    completion: req.completion,
                    hold: Body::Empty,
                    remote: Vec::new(),
                    commit: false,
                })
            } else {
                AfterTx::Complete {
                    context: req.context,
                    flags,
                    len,
                    completion: req.completion,
                }
            };
            TxOp::new(&h, body_of(req.payload), then)
        })
    }

    fn post_recv(&self, req: RecvRequest) -> Result<()> {
        self.with_conn(|c| {
            if let Some(e) = c.post_refusal() {
                return Err(e);
            }
            if c.posted_len() >= c.rx_size {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!("{} receives posted (rx_size)", c.rx_size),
                ));
            }
            if let Err(f) = c.post_recv(req) {
                c.fail(f);
            }
            Ok(())
        })
    }
}

/// Whether a write completes at transmit level, without an ACK from the target: it
/// names `TRANSMIT_COMPLETE` or `INJECT_COMPLETE` as its level (no stronger one), and
/// carries no CQ data (whose completion means a receive matched it). Writes posted
/// without a level, and injected writes, keep delivery completion.
pub(crate) fn transmit_level_write(req: &RmaRequest) -> bool {
    req.data.is_none()
        && !req.flags.contains(OpFlags::INJECT)
        && matches!(
            req.flags.completion_level(),
            Some(fabric_core::CompletionLevel::Transmit | fabric_core::CompletionLevel::Inject)
        )
}

impl RmaOps for TcpEndpoint {
    fn post_write(&self, req: RmaRequest) -> Result<()> {
        self.post_tx(req.flags.contains(OpFlags::MORE), |c| {
            let op_id = c.next_id();
            let len = req.payload.len();
            let mut h = Header::new(Op::Write, op_id, len as u64);
            wire_iovs(&mut h, &req.remote);
            if let Some(d) = req.data {
                h.flags |= FLAG_CQ_DATA;
                h.data = d;
            }
            let commit = req.flags.contains(OpFlags::COMMIT_COMPLETE);
            if commit {
                h.flags |= FLAG_COMMIT;
            }
            if transmit_level_write(&req) {
                // Completes once handed to the socket, and the target sends no ACK
                // (libfabric's tcp provider acknowledges delivery and commit only).
                h.flags |= FLAG_NO_ACK;
                let then = AfterTx::Complete {
                    context: req.context,
                    flags: CompFlags::RMA | CompFlags::WRITE,
                    len,
                    completion: req.completion,
                };
                return TxOp::new(&h, body_of(req.payload), then);
            }
            let then = AfterTx::Await(Pending {
                op_id,
                kind: PendKind::Write,
                context: req.context,
                flags: CompFlags::RMA | CompFlags::WRITE,
                len,
                completion: req.completion,
                hold: Body::Empty,
                remote: req.remote,
                commit,
            });
            TxOp::new(&h, body_of(req.payload), then)
        })
    }

    fn post_read(&self, req: RmaRequest) -> Result<()> {
        self.post_tx(req.flags.contains(OpFlags::MORE), |c| {
            let op_id = c.next_id();
            let len = req.payload.len();
            let mut h = Header::new(Op::ReadReq, op_id, 0);
            wire_iovs(&mut h, &req.remote);
            let then = AfterTx::Await(Pending {
                op_id,
                kind: PendKind::Read,
                context: req.context,
                flags: CompFlags::RMA | CompFlags::READ,
                len,
                completion: req.completion,
                hold: body_of(req.payload),
                remote: req.remote,
                commit: false,
            });
            TxOp::new(&h, Body::Empty, then)
        })
    }
}

impl EndpointOps for TcpEndpoint {
    fn fid(&self) -> Fid {
        self.fid
    }

    fn local_addr(&self) -> Option<Address> {
        self.addrs.lock().0.map(Address::Inet)
    }

    fn close(&self) {
        let conn = self
            .engine
            .with(|st, _| match st.conns.get_mut(&self.fid.0) {
                // Still sending its refusal of a remote access: the engine finishes that
                // and drops the connection when its socket closes.
                Some(c) if c.is_closing() => {
                    c.detached = true;
                    None
                }
                _ => st.conns.remove(&self.fid.0),
            });
        if let Some(mut c) = conn {
            c.teardown(fabric_core::CqErrorKind::Canceled, "endpoint closed", None);
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn cm(&self) -> Option<&dyn CmOps> {
        Some(self)
    }

    fn msg(&self) -> Option<&dyn MsgOps> {
        Some(self)
    }

    fn rma(&self) -> Option<&dyn RmaOps> {
        Some(self)
    }
}

impl Drop for TcpEndpoint {
    fn drop(&mut self) {
        self.close();
    }
}
