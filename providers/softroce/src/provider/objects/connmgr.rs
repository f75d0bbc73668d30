//! The connection manager: listeners, half-open connections, the per-endpoint
//! exchange (REQ, REP or REJ, RTU, DISCONNECT over TCP) and the endpoint's CM calls
//! (connect, accept, shutdown).

use super::datapath::{not_connected, qp_error, recv_segment};
use super::*;

impl Shared {
    pub(super) fn cm_progress(&self) {
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
                    let info = prov::ConnToken::attach(info, (h.sock, msg));
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
        let (dev, qpn) = self.qp.get().ok_or_else(|| not_connected("no QP"))?;
        let theirs = Mtu::from_bytes(u32::from(msg.mtu)).unwrap_or(Mtu::Mtu1024);
        let mtu = self.mtu().min(theirs);
        let rtr = dev.rtr(mtu, msg.qpn, msg.psn, msg.ip);
        // A fabric peer is a softroce device: it sends from port 4791.
        dev.connect_qp(
            *qpn,
            rtr,
            device::rts(sq_psn, self.shared.config.timeout),
            Some(crate::wire::frame::ROCE_UDP_PORT),
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
