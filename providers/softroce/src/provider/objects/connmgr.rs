//! The connection manager: listeners, half-open connections, the per-endpoint
//! exchange (REQ, REP or REJ, RTU, DISCONNECT over TCP, or IB CM over QP1) and the
//! endpoint's CM calls (connect, accept, shutdown).
//!
//! IB CM ([`crate::ibcm`]): every listener on a specific address is also the rdma_cm
//! service `RDMA_PS_TCP` of its port on its device's QP1 ([`IbListen`]); an endpoint
//! connects over IB CM when its device's configuration says so
//! ([`device::CmProtocol::Ib`], `SOFTROCE_CM=ib`). The device's CM agent delivers
//! events to the listener and the endpoints ([`ibcm::CmOwner`]).

use super::datapath::{not_connected, qp_error, recv_segment};
use super::*;
use crate::ibcm::engine::{AcceptParams, CmEvent, ConnectParams};
use crate::ibcm::wire::{self as ibw, CmaHdr};
use crate::ibcm::CmOwner;

/// A listener's IB CM side: requests for `RDMA_PS_TCP` `port` on its device.
pub(super) struct IbListen {
    pub(super) fid: Fid,
    pub(super) port: u16,
    pub(super) info: Info,
    pub(super) eq: Arc<EqQueue>,
    pub(super) agent: Arc<Agent>,
}

impl IbListen {
    pub(super) fn listen(self: &Arc<Self>) -> Result<()> {
        let sid = ibw::service_id(self.port);
        if !self.agent.call(|e, _| e.listen(sid, self.fid.0)) {
            return Err(Error::new(
                ErrorKind::AddressInUse,
                format!(
                    "softroce: rdma_cm service port {} on {} has another listener",
                    self.port,
                    self.agent.device().ip()
                ),
            ));
        }
        let me: Weak<dyn CmOwner> = Arc::downgrade(self) as Weak<dyn CmOwner>;
        self.agent.register(self.fid.0, me);
        Ok(())
    }

    pub(super) fn close(&self) {
        let sid = ibw::service_id(self.port);
        self.agent.call(|e, now| e.unlisten(sid, self.fid.0, now));
        self.agent.unregister(self.fid.0);
    }
}

impl CmOwner for IbListen {
    fn ib_event(&self, agent: &Arc<Agent>, ev: CmEvent) {
        let CmEvent::Request {
            conn, peer, req, ..
        } = ev
        else {
            return;
        };
        let hdr = match CmaHdr::decode(&req.private_data) {
            Ok(h) => h,
            Err(why) => {
                debug!(%peer, "softroce IB CM: a request without rdma_cm's header: {why}");
                agent.call(|e, now| {
                    let _ = e.reject(conn, ibw::rej::CONSUMER_DEFINED, &[], now);
                });
                return;
            }
        };
        // The path's addresses are the GIDs (RoCEv2: IPv4-mapped); the datagram's
        // source is the same address for every RoCE peer.
        let peer_ip = ibw::ipv4_of_gid(&req.primary_local_gid).unwrap_or(peer);
        // The REQ's path MTU, at most what the link towards the peer carries.
        let mtu = ibw::mtu_bytes(req.path_mtu)
            .and_then(Mtu::from_bytes)
            .unwrap_or(Mtu::Mtu1024);
        let mtu = link_path_mtu(peer_ip).map_or(mtu, |m| m.min(mtu));
        let data = without_len(&req.private_data[ibw::CMA_HDR_LEN..]);
        let mut info = self.info.clone();
        info.dest_addr = Some(Address::Inet(SocketAddr::new(peer_ip.into(), hdr.src_port)));
        info.src_addr = Some(Address::Inet(SocketAddr::new(
            agent.device().ip().into(),
            self.port,
        )));
        let msg = CmMsg {
            kind: Kind::Request,
            qpn: req.local_qpn,
            psn: req.starting_psn,
            ip: peer_ip,
            mtu: mtu.bytes() as u16,
            data: data.clone(),
        };
        let link = IbLink {
            agent: agent.clone(),
            conn,
            // What the requester offered: this side answers READs of at most its
            // initiator depth and issues at most its responder resources.
            rd: (req.initiator_depth, req.responder_resources),
            mtu,
        };
        debug!(%peer_ip, port = hdr.src_port, "softroce: IB CM connection request");
        let info = prov::ConnToken::attach(info, PendingRequest::Ib(link, msg));
        self.eq.push(Event::ConnRequest(Box::new(ConnRequest {
            info,
            data,
            listener: self.fid,
        })));
    }
}

/// An endpoint's connection over IB CM: the device's agent, the communication ID,
/// and the peer's offer (initiator depth, responder resources) for a request.
#[derive(Clone)]
pub(super) struct IbLink {
    agent: Arc<Agent>,
    conn: u32,
    rd: (u8, u8),
    /// The path MTU of the connection (the REQ's).
    mtu: Mtu,
}

impl IbLink {
    /// Rejects a request with the consumer-defined reason (28) and `data`.
    pub(super) fn reject(&self, data: &[u8]) -> Result<()> {
        if data.len() > ibw::REJ_PDATA {
            return Err(Error::invalid(format!(
                "reject: {} bytes of data; a REJ carries at most {}",
                data.len(),
                ibw::REJ_PDATA
            )));
        }
        let pd = with_len(data, ibw::REJ_PDATA);
        self.agent
            .call(|e, now| e.reject(self.conn, ibw::rej::CONSUMER_DEFINED, &pd, now))
            .map_err(ib_error)
    }
}

/// Connection data in an IB CM message's fixed-size private data: `data`, zeros, and
/// a 3-byte trailer (length, `S`, `R`) in the last bytes of the `room`, so that a
/// softroce peer gives the application exactly the bytes sent (IB CM has no length
/// field); data too long for the trailer fills the room without one (and arrives
/// zero-padded to it). An rdma_cm peer sees the trailer in the padding, which it does
/// not read.
pub(super) fn with_len(data: &[u8], room: usize) -> Vec<u8> {
    let mut v = data.to_vec();
    if data.len() + LEN_TRAILER <= room && data.len() <= usize::from(u8::MAX) {
        v.resize(room - LEN_TRAILER, 0);
        v.extend_from_slice(&[data.len() as u8, b'S', b'R']);
    }
    v
}

/// The connection data of private data made by [`with_len`]: the exact bytes when it
/// carries a valid trailer (the length fits and only zeros lie between the data and
/// the trailer), else all of it (an rdma_cm peer's, zero-padded).
pub(super) fn without_len(pd: &[u8]) -> Vec<u8> {
    if let [head @ .., n, b'S', b'R'] = pd {
        let n = usize::from(*n);
        if n <= head.len() && head[n..].iter().all(|&b| b == 0) {
            return head[..n].to_vec();
        }
    }
    pd.to_vec()
}

/// Bytes of [`with_len`]'s trailer.
pub(crate) const LEN_TRAILER: usize = 3;

fn ib_error(e: crate::ibcm::engine::CmError) -> Error {
    use crate::ibcm::engine::CmError as C;
    match e {
        C::TooLong { .. } => Error::invalid(e.to_string()),
        C::NoConnection => Error::new(ErrorKind::NotConnected, e.to_string()),
        C::WrongState | C::Full => Error::new(ErrorKind::Other, e.to_string()),
    }
}

/// The largest path MTU (256..4096) whose packets fit the link towards `dest`: the
/// route's MTU (`IP_MTU` of a UDP socket connected there) less the IPv4, UDP, BTH,
/// RETH and ICRC headers. An IB CM peer (kernel rxe: its port's active MTU, 1024 on a
/// 1500-byte link) learns it from the REQ, and packets larger than the link would
/// not leave (DF). `None` when the route cannot be asked.
fn link_path_mtu(dest: Ipv4Addr) -> Option<Mtu> {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((dest, crate::wire::ROCE_UDP_PORT)).ok()?;
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, and an int-sized buffer with its length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || mtu <= 0 {
        return None;
    }
    // IPv4 20 + UDP 8 + BTH 12 + RETH 16 + ICRC 4.
    let room = (mtu as u32).saturating_sub(60);
    [
        Mtu::Mtu4096,
        Mtu::Mtu2048,
        Mtu::Mtu1024,
        Mtu::Mtu512,
        Mtu::Mtu256,
    ]
    .into_iter()
    .find(|m| m.bytes() <= room)
}

/// The local address a connection to `dest` leaves from: the endpoint's source
/// address, else (loopback) [`device::loopback_source`]'s choice, else the route's.
fn source_for(src: Option<SocketAddr>, dest: Ipv4Addr) -> Result<Ipv4Addr> {
    if let Some(ip) = src
        .filter(|s| !s.ip().is_unspecified())
        .map(ipv4_of)
        .transpose()?
    {
        return Ok(ip);
    }
    if dest.is_loopback() {
        return Ok(device::loopback_source(dest).unwrap_or(Ipv4Addr::LOCALHOST));
    }
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect((dest, crate::wire::ROCE_UDP_PORT))?;
    ipv4_of(s.local_addr()?)
}

impl EpInner {
    /// Opens an endpoint from an IB CM request (its QP on the request's device).
    pub(super) fn open_accepting_ib(
        self: &Arc<Self>,
        info: &Info,
        link: IbLink,
        req: CmMsg,
    ) -> Result<()> {
        let dev = link.agent.device().clone();
        self.shared.add_device(&dev);
        self.shared.add_agent(&link.agent);
        let qpn = dev.create_qp(self.table.clone(), self.rep.clone())?;
        let _ = self.qp.set((dev, qpn));
        let me: Weak<dyn CmOwner> = Arc::downgrade(self) as Weak<dyn CmOwner>;
        link.agent.register(self.fid.0, me);
        let mut cm = self.cm.lock();
        cm.local = info.src_addr.as_ref().and_then(Address::as_inet);
        cm.peer = info.dest_addr.as_ref().and_then(Address::as_inet);
        cm.phase = Phase::Accepting;
        cm.request = Some(req);
        cm.ib = Some(link);
        Ok(())
    }

    fn ib_connect(
        self: &Arc<Self>,
        cm: &mut EpCm,
        src: Ipv4Addr,
        sa: SocketAddr,
        data: &[u8],
    ) -> Result<()> {
        if data.len() > ibw::REQ_USER_DATA {
            return Err(Error::invalid(format!(
                "connect: {} bytes of connection data; over IB CM (rdma_cm's REQ) at most {}",
                data.len(),
                ibw::REQ_USER_DATA
            )));
        }
        let dest = ipv4_of(sa)?;
        // The path MTU this side asks for: its own, at most what the link carries.
        let mtu = link_path_mtu(dest).map_or(self.mtu(), |m| m.min(self.mtu()));
        let dev = Device::get(src)?;
        let agent = Agent::of(&dev);
        self.shared.add_agent(&agent);
        self.create_qp(cm, dev)?;
        let (_, qpn) = self.qp.get().ok_or_else(|| not_connected("no QP"))?;
        // rdma_cm's source port: an ephemeral one (nothing binds it; it names the
        // connection in the peer's address).
        let src_port = 32768 + (rand::random::<u16>() % 28000);
        let mut pd = CmaHdr {
            src_port,
            src,
            dst: dest,
        }
        .encode()
        .to_vec();
        pd.extend_from_slice(&with_len(data, ibw::REQ_USER_DATA));
        let me: Weak<dyn CmOwner> = Arc::downgrade(self) as Weak<dyn CmOwner>;
        agent.register(self.fid.0, me);
        let params = ConnectParams {
            owner: self.fid.0,
            peer: dest,
            service_id: ibw::service_id(sa.port()),
            qpn: *qpn,
            psn: cm.psn,
            mtu: mtu.bytes(),
            responder_resources: device::QP_RD_ATOMIC,
            initiator_depth: device::QP_RD_ATOMIC,
            private_data: pd,
        };
        let conn = agent
            .call(|e, now| e.connect(params, now))
            .map_err(ib_error)?;
        cm.ib = Some(IbLink {
            agent,
            conn,
            rd: (device::QP_RD_ATOMIC, device::QP_RD_ATOMIC),
            mtu,
        });
        cm.local = Some(SocketAddr::new(src.into(), src_port));
        cm.peer = Some(sa);
        cm.phase = Phase::AwaitReply;
        debug!(fid = %self.fid, %sa, "softroce: IB CM connection request sent");
        Ok(())
    }

    fn ib_accept(&self, cm: &mut EpCm, link: IbLink, data: &[u8]) -> Result<()> {
        if data.len() > ibw::REP_PDATA {
            return Err(Error::invalid(format!(
                "accept: {} bytes of connection data; over IB CM (REP) at most {}",
                data.len(),
                ibw::REP_PDATA
            )));
        }
        let req = cm
            .request
            .take()
            .ok_or_else(|| Error::invalid("accept: no request"))?;
        // IB CM's starting PSNs are receive PSNs (Linux's cm.c: the passive side's
        // sq_psn is the REQ's starting PSN, its rq_psn the REP's): this side sends
        // from the REQ's and receives from its own, which the REP advertises.
        let ours = CmMsg {
            psn: cm.psn,
            ..req.clone()
        };
        self.establish_from(req.psn, &ours, None)?;
        let (_, qpn) = self.qp.get().ok_or_else(|| not_connected("no QP"))?;
        let params = AcceptParams {
            owner: self.fid.0,
            qpn: *qpn,
            psn: cm.psn,
            responder_resources: link.rd.0.min(device::QP_RD_ATOMIC),
            initiator_depth: link.rd.1.min(device::QP_RD_ATOMIC),
            private_data: with_len(data, ibw::REP_PDATA),
        };
        if let Err(e) = link.agent.call(|e, now| e.accept(link.conn, params, now)) {
            cm.ib = None;
            self.teardown(cm, false);
            return Err(ib_error(e).context("accept"));
        }
        cm.phase = Phase::AwaitRtu;
        Ok(())
    }
}

impl CmOwner for EpInner {
    fn ib_event(&self, _agent: &Arc<Agent>, ev: CmEvent) {
        let mut cm = self.cm.lock();
        let conn = match &ev {
            CmEvent::Established { conn, .. }
            | CmEvent::Ready { conn, .. }
            | CmEvent::Rejected { conn, .. }
            | CmEvent::Disconnected { conn, .. } => *conn,
            CmEvent::Request { .. } => return,
        };
        if cm.ib.as_ref().is_none_or(|l| l.conn != conn) {
            return;
        }
        match (cm.phase, ev) {
            (Phase::AwaitReply, CmEvent::Established { rep, .. }) => {
                let peer = cm.peer.and_then(|p| ipv4_of(p).ok());
                let mtu = cm.ib.as_ref().map_or(self.mtu(), |l| l.mtu);
                let r = peer
                    .ok_or_else(|| not_connected("no peer address"))
                    .and_then(|ip| {
                        // IB CM's starting PSNs are receive PSNs: this side sends
                        // from the REP's, receives from its own (the REQ's).
                        let msg = CmMsg {
                            kind: Kind::Accept,
                            qpn: rep.local_qpn,
                            psn: cm.psn,
                            ip,
                            mtu: mtu.bytes() as u16,
                            data: Vec::new(),
                        };
                        self.establish_from(rep.starting_psn, &msg, None)
                    });
                match r {
                    Ok(()) => {
                        cm.phase = Phase::Connected;
                        debug!(fid = %self.fid, "softroce: connected (IB CM)");
                        self.event(Event::Connected {
                            fid: self.fid,
                            data: without_len(&rep.private_data),
                        });
                    }
                    Err(e) => {
                        self.event(Event::Error {
                            fid: self.fid,
                            error: e.context("establishing the connection"),
                            data: Vec::new(),
                        });
                        self.teardown(&mut cm, false);
                    }
                }
            }
            (Phase::AwaitRtu, CmEvent::Ready { .. }) => {
                cm.phase = Phase::Connected;
                debug!(fid = %self.fid, "softroce: connected (accepted, IB CM)");
                self.event(Event::Connected {
                    fid: self.fid,
                    data: Vec::new(),
                });
            }
            (Phase::AwaitReply, CmEvent::Rejected { reason, data, .. }) => {
                cm.ib = None;
                let why = match reason {
                    ibw::rej::CONSUMER_DEFINED => "the peer rejected the connection".to_string(),
                    ibw::rej::INVALID_SERVICE_ID => {
                        "nobody listens on that port (IB CM: invalid service ID)".to_string()
                    }
                    ibw::rej::TIMEOUT => "no answer from the peer (IB CM timeout)".to_string(),
                    r => format!("the peer rejected the connection (IB CM reason {r})"),
                };
                self.event(Event::Error {
                    fid: self.fid,
                    error: Error::new(ErrorKind::ConnectionRefused, why),
                    data: without_len(&data),
                });
                self.teardown(&mut cm, false);
            }
            (Phase::AwaitRtu | Phase::Connected, CmEvent::Disconnected { data, .. }) => {
                cm.ib = None;
                if let Some((dev, _)) = self.qp.get() {
                    dev.progress(true);
                }
                self.end(&mut cm, cm::peer_reason(data.first().copied()), false);
            }
            (Phase::Accepting, CmEvent::Disconnected { .. }) => {
                cm.ib = None;
            }
            (phase, ev) => {
                debug!(fid = %self.fid, ?phase, ?ev, "softroce: IB CM event ignored");
            }
        }
    }
}

impl Shared {
    pub(super) fn cm_progress(&self) {
        // IB CM first, with no lock held: its events take the owners' locks.
        let agents = self.agents.lock().clone();
        for a in &agents {
            a.progress();
        }
        let mut cm = self.cm.lock();
        let CmState {
            listeners,
            half_open,
            eps,
            ready,
            ..
        } = &mut *cm;
        // One poll(2) tells whether any CM socket has something to say: accept(2) on
        // an idle listener costs several µs (the kernel sets up a socket and a file
        // before it finds the queue empty), and this runs every CM_EVERY CQ reads.
        let mut fds: Vec<RawFd> = Vec::with_capacity(8);
        fds.extend(
            listeners
                .values()
                .filter(|l| l.listening)
                .map(|l| l.sock.as_raw_fd()),
        );
        fds.extend(half_open.iter().map(|h| h.sock.as_raw_fd()));
        fds.push(ready.raw());
        let now = Instant::now();
        let overdue = half_open.next_deadline().is_some_and(|d| now >= d);
        if !overdue && !sys::any_readable(&fds) {
            return;
        }
        for (id, l) in listeners.iter() {
            if !l.listening {
                continue;
            }
            for _ in 0..64 {
                match l.sock.accept() {
                    Ok((sock, peer)) => {
                        if sock.set_nonblocking(true).is_err() {
                            continue;
                        }
                        let _ = sock.set_nodelay(true);
                        debug!(%peer, "softroce: incoming connection");
                        let incoming = Incoming {
                            sock,
                            buf: Vec::new(),
                            listener: *id,
                        };
                        let evicted = half_open.insert(Fid::next().0, incoming, Instant::now());
                        if !evicted.is_empty() {
                            debug!("softroce: too many connections without a request: closed the oldest");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        for _ in half_open.expire(now) {
            debug!("softroce: dropping an incoming connection: no request in time");
        }
        for hid in half_open.ids() {
            let Some(h) = half_open.get_mut(hid) else {
                continue;
            };
            let mut tmp = [0u8; 512];
            let outcome = loop {
                match CmMsg::decode(&h.buf) {
                    Err(e) => break Err(e.to_string()),
                    Ok(Some((msg, _))) if msg.kind == Kind::Request => break Ok(Some(msg)),
                    Ok(Some((msg, _))) => {
                        break Err(format!("expected a request, got {:?}", msg.kind))
                    }
                    Ok(None) => {}
                }
                match h.sock.read(&mut tmp) {
                    Ok(0) => break Err("closed before its request".into()),
                    Ok(n) => h.buf.extend_from_slice(&tmp[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e.to_string()),
                }
            };
            match outcome {
                Ok(None) => {}
                Err(why) => {
                    debug!("softroce: dropping an incoming connection: {why}");
                    half_open.remove(hid);
                }
                Ok(Some(msg)) => {
                    let Some(h) = half_open.remove(hid) else {
                        continue;
                    };
                    let Some(l) = listeners.get(&h.listener) else {
                        continue;
                    };
                    let mut info = l.info.clone();
                    info.dest_addr = h.sock.peer_addr().ok().map(Address::Inet);
                    info.src_addr = h.sock.local_addr().ok().map(Address::Inet);
                    let data = msg.data.clone();
                    let info = prov::ConnToken::attach(info, PendingRequest::Tcp(h.sock, msg));
                    l.eq.push(Event::ConnRequest(Box::new(ConnRequest {
                        info,
                        data,
                        listener: Fid(h.listener),
                    })));
                }
            }
        }
        // Only the endpoints whose CM socket is ready (a message, the peer's closure).
        let mut tokens = Vec::new();
        ready.ready(&mut tokens);
        for t in tokens {
            match eps.get(&t).and_then(Weak::upgrade) {
                Some(ep) => ep.cm_poll(),
                None => {
                    eps.remove(&t);
                }
            }
        }
    }
}

impl EpInner {
    pub(super) fn mtu(&self) -> Mtu {
        self.shared.config.mtu
    }

    /// Pushes a connection event.
    pub(super) fn event(&self, ev: Event) {
        self.eq.push(ev);
    }

    /// Tears the connection down: closes the CM socket, moves the QP to ERROR
    /// (outstanding work completes `Canceled`) and, with `remove`, frees the QP.
    pub(super) fn teardown(&self, cm: &mut EpCm, remove: bool) {
        cm.phase = Phase::Closed;
        if let Some(link) = cm.ib.take() {
            // Established: DREQ; being set up: REJ. Gone already: nothing.
            link.agent.call(|e, now| {
                let _ = e.disconnect(link.conn, &[], now);
            });
            link.agent.unregister(self.fid.0);
        }
        // First what the QP still has to send (ACKs held for an answer that will not
        // come): on the peer's side they then arrive before the CM socket's closure,
        // so a message this side received completes there as sent, not canceled.
        if let Some((dev, qpn)) = self.qp.get() {
            let _ = dev.with_qp(*qpn, |_| Ok(()));
        }
        if let Some(s) = cm.sock.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for r in std::mem::take(&mut cm.pending) {
            self.rep.rx_cq.push(Completion::error(
                r.context,
                CompFlags::MSG | CompFlags::RECV,
                fabric_core::CqError::new(
                    fabric_core::CqErrorKind::Canceled,
                    0,
                    "the endpoint closed before it connected",
                ),
            ));
        }
        if let Some((dev, qpn)) = self.qp.get() {
            dev.error_qp(*qpn, remove);
        }
    }

    /// Reads the CM socket: replies, ready-to-use, closure.
    pub(super) fn cm_poll(&self) {
        let mut cm = self.cm.lock();
        let Some(sock) = cm.sock.as_mut() else {
            return;
        };
        // Why the TCP connection closed, if it did: an orderly closure is the peer's
        // shutdown (or exit), a reset or error a lost connection.
        let mut closed = None;
        let mut tmp = [0u8; 1024];
        let mut got = Vec::new();
        loop {
            match sock.read(&mut tmp) {
                Ok(0) => {
                    closed = Some(ShutdownReason::Peer);
                    break;
                }
                Ok(n) => got.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = Some(ShutdownReason::Lost);
                    break;
                }
            }
        }
        cm.rbuf.extend_from_slice(&got);
        loop {
            match CmMsg::decode(&cm.rbuf) {
                Ok(None) => break,
                Ok(Some((msg, n))) => {
                    cm.rbuf.drain(..n);
                    if msg.kind == Kind::Disconnect {
                        closed = Some(cm::peer_reason(msg.data.first().copied()));
                        break;
                    }
                    self.on_message(&mut cm, msg);
                }
                Err(why) => {
                    debug!(fid = %self.fid, "softroce CM protocol error: {why}");
                    closed = Some(ShutdownReason::Protocol);
                    break;
                }
            }
        }
        if let Some(reason) = closed.filter(|_| cm.sock.is_some()) {
            match cm.phase {
                Phase::AwaitReply => {
                    self.event(Event::Error {
                        fid: self.fid,
                        error: Error::new(
                            ErrorKind::ConnectionRefused,
                            "the peer closed the connection without accepting",
                        ),
                        data: Vec::new(),
                    });
                }
                Phase::AwaitRtu | Phase::Connected => {
                    debug!(fid = %self.fid, %reason, "softroce: the peer ended the connection");
                    // A NAK the peer sent before it said goodbye may wait in the
                    // device's socket: let it complete the operation it refused
                    // (with its error kind) before the rest is canceled.
                    if let Some((dev, _)) = self.qp.get() {
                        dev.progress(true);
                    }
                    self.end(&mut cm, reason, false);
                    return;
                }
                _ => {}
            }
            self.teardown(&mut cm, false);
        }
    }

    pub(super) fn on_message(&self, cm: &mut EpCm, msg: CmMsg) {
        match (cm.phase, msg.kind) {
            (Phase::AwaitReply, Kind::Accept) => {
                let r = self.establish(cm.psn, &msg).and_then(|_| {
                    let (dev, qpn) = self.qp.get().ok_or_else(|| not_connected("no QP"))?;
                    let rtu = CmMsg {
                        kind: Kind::ReadyToUse,
                        qpn: *qpn,
                        psn: cm.psn,
                        ip: dev.ip(),
                        mtu: msg.mtu,
                        data: Vec::new(),
                    };
                    match cm.sock.as_mut() {
                        Some(s) => write_all_nb(s, &rtu.encode()).map_err(Error::from),
                        None => Err(not_connected("CM socket closed")),
                    }
                });
                match r {
                    Ok(()) => {
                        cm.phase = Phase::Connected;
                        debug!(fid = %self.fid, "softroce: connected");
                        self.event(Event::Connected {
                            fid: self.fid,
                            data: msg.data,
                        });
                    }
                    Err(e) => {
                        self.event(Event::Error {
                            fid: self.fid,
                            error: e.context("establishing the connection"),
                            data: Vec::new(),
                        });
                        self.teardown(cm, false);
                    }
                }
            }
            (Phase::AwaitReply, Kind::Reject) => {
                self.event(Event::Error {
                    fid: self.fid,
                    error: Error::new(
                        ErrorKind::ConnectionRefused,
                        "the peer rejected the connection",
                    ),
                    data: msg.data,
                });
                self.teardown(cm, false);
            }
            (Phase::AwaitRtu, Kind::ReadyToUse) => {
                cm.phase = Phase::Connected;
                debug!(fid = %self.fid, "softroce: connected (accepted)");
                self.event(Event::Connected {
                    fid: self.fid,
                    data: Vec::new(),
                });
            }
            (phase, kind) => {
                debug!(fid = %self.fid, ?phase, ?kind, "softroce: unexpected CM message ignored");
            }
        }
    }

    /// Moves the QP to RTS towards the peer described by `msg`.
    pub(super) fn establish(&self, sq_psn: u32, msg: &CmMsg) -> Result<()> {
        // A fabric peer is a softroce device: it sends from port 4791.
        self.establish_from(sq_psn, msg, Some(crate::wire::frame::ROCE_UDP_PORT))
    }

    /// Moves the QP to RTS towards the peer described by `msg`, which sends from UDP
    /// port `peer_port` (`None`: the port its first packet comes from; kernel rxe
    /// sends from a port of its choosing per QP).
    pub(super) fn establish_from(
        &self,
        sq_psn: u32,
        msg: &CmMsg,
        peer_port: Option<u16>,
    ) -> Result<()> {
        let (dev, qpn) = self.qp.get().ok_or_else(|| not_connected("no QP"))?;
        let theirs = Mtu::from_bytes(u32::from(msg.mtu)).unwrap_or(Mtu::Mtu1024);
        let mtu = self.mtu().min(theirs);
        let rtr = dev.rtr(mtu, msg.qpn, msg.psn, msg.ip);
        dev.connect_qp(
            *qpn,
            rtr,
            device::rts(sq_psn, self.shared.config.timeout),
            peer_port,
        )
    }

    /// Creates the QP on `dev` and posts the receives that waited for it.
    pub(super) fn create_qp(&self, cm: &mut EpCm, dev: Arc<Device>) -> Result<()> {
        self.shared.add_device(&dev);
        let qpn = dev.create_qp(self.table.clone(), self.rep.clone())?;
        let pending = std::mem::take(&mut cm.pending);
        dev.with_qp(qpn, |slot| {
            for r in pending {
                let ctx = r.context;
                slot.post_recv(ctx, recv_segment(r)).map_err(qp_error)?;
            }
            Ok(())
        })?;
        let _ = self.qp.set((dev, qpn));
        Ok(())
    }

    /// Ends an established or establishing connection once: tells the peer why
    /// (`tell_peer`), tears it down, and raises `Shutdown { reason }` if it was
    /// connected (or accepted). Later ends (the peer's closure after an access error,
    /// a local `shutdown()` after a loss) change nothing.
    pub(super) fn end(&self, cm: &mut EpCm, reason: ShutdownReason, tell_peer: bool) {
        if cm.phase == Phase::Closed || self.ended.set(reason).is_err() {
            return;
        }
        let was = cm.phase;
        if tell_peer && matches!(was, Phase::AwaitRtu | Phase::Connected) {
            if let Some(link) = cm.ib.take() {
                // The reason rides in the DREQ's private data (rdma_cm peers ignore it).
                let code = [cm::reason_code(reason)];
                link.agent.call(|e, now| {
                    let _ = e.disconnect(link.conn, &code, now);
                });
                link.agent.unregister(self.fid.0);
            }
            if let (Some(s), Some((dev, qpn))) = (cm.sock.as_mut(), self.qp.get()) {
                let bye = CmMsg {
                    kind: Kind::Disconnect,
                    qpn: *qpn,
                    psn: 0,
                    ip: dev.ip(),
                    mtu: 0,
                    data: vec![cm::reason_code(reason)],
                };
                let _ = write_all_nb(s, &bye.encode());
            }
        }
        debug!(fid = %self.fid, %reason, "softroce: connection ends");
        self.teardown(cm, false);
        if matches!(was, Phase::AwaitRtu | Phase::Connected) {
            self.event(Event::Shutdown {
                fid: self.fid,
                reason,
            });
        }
    }
}

impl QpOwner for EpInner {
    fn qp_failed(&self, reason: ShutdownReason) {
        let mut cm = self.cm.lock();
        self.end(&mut cm, reason, true);
    }
}

impl CmOps for SrEndpoint {
    fn connect(&self, addr: &Address, data: &[u8]) -> Result<()> {
        let ep = &self.inner;
        let sa = addr.as_inet().ok_or_else(|| {
            Error::new(
                ErrorKind::AddressNotAvailable,
                format!("softroce connects to IPv4 addresses only, not {addr}"),
            )
        })?;
        ipv4_of(sa)?;
        let mut cm = ep.cm.lock();
        if cm.phase != Phase::Idle {
            return Err(Error::invalid(format!(
                "connect: the endpoint is {:?}, not idle",
                cm.phase
            )));
        }
        let src_ip = source_for(ep.src, ipv4_of(sa)?)?;
        if device::cm_protocol(src_ip) == device::CmProtocol::Ib {
            return ep.ib_connect(&mut cm, src_ip, sa, data);
        }
        let src = ep.src.filter(|s| !s.ip().is_unspecified()).or_else(|| {
            let dest = ipv4_of(sa).ok()?;
            device::loopback_source(dest).map(|ip| SocketAddr::new(ip.into(), 0))
        });
        let connected = match src {
            Some(src) => {
                sys::connect_from(SocketAddr::new(src.ip(), 0), sa, Duration::from_secs(5))
            }
            None => TcpStream::connect_timeout(&sa, Duration::from_secs(5)),
        };
        let mut sock = match connected {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                ep.event(Event::Error {
                    fid: ep.fid,
                    error: Error::new(ErrorKind::ConnectionRefused, format!("connect {sa}: {e}")),
                    data: Vec::new(),
                });
                ep.teardown(&mut cm, false);
                return Ok(());
            }
            Err(e) => return Err(Error::from(e).context(format!("connect to {sa}"))),
        };
        let _ = sock.set_nodelay(true);
        let local = sock.local_addr()?;
        let dev = Device::get(ipv4_of(local)?)?;
        ep.create_qp(&mut cm, dev.clone())?;
        let (_, qpn) = ep.qp.get().ok_or_else(|| not_connected("no QP"))?;
        let req = CmMsg {
            kind: Kind::Request,
            qpn: *qpn,
            psn: cm.psn,
            ip: dev.ip(),
            mtu: ep.mtu().bytes() as u16,
            data: data.to_vec(),
        };
        write_all_nb(&mut sock, &req.encode())
            .map_err(|e| Error::from(e).context("sending the connection request"))?;
        sock.set_nonblocking(true)?;
        cm.local = Some(local);
        cm.peer = Some(sa);
        let fd = sock.as_raw_fd();
        cm.sock = Some(sock);
        cm.phase = Phase::AwaitReply;
        drop(cm);
        ep.shared.cm.lock().watch(&self.inner, fd)?;
        Ok(())
    }

    fn accept(&self, data: &[u8]) -> Result<()> {
        let ep = &self.inner;
        let mut cm = ep.cm.lock();
        if cm.phase != Phase::Accepting {
            return Err(Error::invalid(format!(
                "accept: the endpoint is {:?}, not a pending request",
                cm.phase
            )));
        }
        if let Some(link) = cm.ib.clone() {
            return ep.ib_accept(&mut cm, link, data);
        }
        let req = cm
            .request
            .take()
            .ok_or_else(|| Error::invalid("accept: no request"))?;
        ep.establish(cm.psn, &req)?;
        let (dev, qpn) = ep.qp.get().ok_or_else(|| not_connected("no QP"))?;
        let theirs = Mtu::from_bytes(u32::from(req.mtu)).unwrap_or(Mtu::Mtu1024);
        let rep = CmMsg {
            kind: Kind::Accept,
            qpn: *qpn,
            psn: cm.psn,
            ip: dev.ip(),
            mtu: ep.mtu().min(theirs).bytes() as u16,
            data: data.to_vec(),
        };
        let sent = match cm.sock.as_mut() {
            Some(s) => write_all_nb(s, &rep.encode()),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        };
        if let Err(e) = sent {
            ep.teardown(&mut cm, false);
            return Err(Error::new(
                ErrorKind::NotConnected,
                format!("the peer went away: {e}"),
            ));
        }
        cm.phase = Phase::AwaitRtu;
        Ok(())
    }

    fn shutdown(&self) -> Result<()> {
        let ep = &self.inner;
        let mut cm = ep.cm.lock();
        if cm.phase == Phase::Closed {
            return Ok(());
        }
        ep.end(&mut cm, ShutdownReason::Local, true);
        Ok(())
    }

    fn peer_addr(&self) -> Option<Address> {
        self.inner.cm.lock().peer.map(Address::Inet)
    }
}

#[cfg(test)]
mod tests {
    use super::{with_len, without_len};

    #[test]
    fn connection_data_keeps_its_length_in_fixed_private_data() {
        for n in [0usize, 1, 5, 53] {
            let d: Vec<u8> = (1..=n as u8).collect();
            let pd = with_len(&d, 56);
            assert_eq!(pd.len(), 56);
            assert_eq!(without_len(&pd), d);
        }
        // Data ending in zeros keeps them.
        assert_eq!(without_len(&with_len(&[7, 0, 0], 56)), vec![7, 0, 0]);
        // Too long for the trailer: the room as it is.
        let d = vec![9u8; 55];
        assert_eq!(with_len(&d, 56), d);
        // An rdma_cm peer's zero-padded data passes unchanged.
        let mut pd = vec![0u8; 56];
        pd[..4].copy_from_slice(b"rdma");
        assert_eq!(without_len(&pd), pd);
        // A trailer whose gap is not zeros is not one.
        let mut pd = with_len(b"ab", 56);
        pd[10] = 1;
        assert_eq!(without_len(&pd).len(), 56);
    }
}
