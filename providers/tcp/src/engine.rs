//! The progress engine of a fabric: every socket of its endpoints, listeners and
//! half-open connections, one epoll set, and one lock.
//!
//! Manual progress: reading a completion queue calls the engine's [`poll`](prov::Progress::poll), which tries the
//! lock (a thread already progressing is enough), receives directly on each connection
//! when there are few (one system call per connection, no epoll round trip), and
//! consults epoll only for listeners, connects in progress and blocked writes.
//! Blocking reads sleep in `poll(2)` on the epoll descriptor and the queue's eventfd,
//! never holding the lock. The engine is the [`prov::Progress`] of the provider's
//! queues ([`prov::ProviderCq`], [`prov::ProviderEq`]);
//! [`Progress::Auto`](fabric_core::Progress::Auto) and async waiters start the shared
//! background thread ([`prov::start_progress_thread`]), which sleeps in `poll(2)` on
//! the epoll descriptor.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_core::{Address, ConnRequest, CqErrorKind, Error, ErrorKind, Event, Fid, Info};
use parking_lot::Mutex;
use tracing::{debug, warn};

use crate::conn::{Conn, ConnState, EventQueueShared};
use crate::sys::{self, Epoll, EpollEvent, Interest};
use crate::wire::{Header, Op, BASE_HDR_SIZE, MAX_CM_DATA};
use fabric_core::prov;
use fabric_core::wait::poll_readable;

/// Connections up to which manual progress receives directly instead of asking epoll.
const DIRECT_MAX: usize = 4;
/// Manual progress consults epoll at least every this many polls (for listeners).
const EPOLL_EVERY: u32 = 64;

/// Bounds on what a listener holds for peers that have not finished their handshake.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListenLimits {
    /// Accepted sockets whose connection request has not fully arrived, per engine;
    /// past it the oldest is closed to make room.
    pub(crate) half_open_max: usize,
    /// How long such a socket may take to send its connection request.
    pub(crate) half_open_age: Duration,
    /// How long a listener is left unpolled after accept failed for want of
    /// descriptors (EMFILE / ENFILE), instead of spinning on it.
    pub(crate) accept_backoff: Duration,
}

impl Default for ListenLimits {
    fn default() -> Self {
        ListenLimits {
            half_open_max: prov::HALF_OPEN_MAX,
            half_open_age: prov::HALF_OPEN_AGE,
            accept_backoff: Duration::from_millis(100),
        }
    }
}

/// A listening socket.
struct Listener {
    sock: TcpListener,
    info: Info,
    eq: Arc<EventQueueShared>,
    listening: bool,
    /// Accept ran out of descriptors: the socket is out of the epoll set until then.
    paused_until: Option<Instant>,
}

/// An accepted socket whose CONN_REQ is still arriving (in the capped, aged
/// [`prov::HalfOpen`] set).
struct Incoming {
    sock: TcpStream,
    buf: Vec<u8>,
    listener: Fid,
}

/// Takes the socket out of a connection request's info: the request's
/// [`prov::ConnToken`] holds it until an endpoint adopts it (accept) or the passive
/// endpoint rejects it.
pub(crate) fn take_request(info: &Info) -> fabric_core::Result<TcpStream> {
    prov::ConnToken::<TcpStream>::take(info, "tcp")
}

/// Hashes the engine's tokens (fids: unique, process-local, never chosen by a peer)
/// with one multiplication instead of SipHash: the connection table is looked up on
/// every post.
#[derive(Default, Clone, Copy)]
pub(crate) struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits, which the table uses, depend on every bit.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by engine tokens.
pub(crate) type TokenMap<V> = HashMap<u64, V, BuildHasherDefault<TokenHasher>>;

pub(crate) struct EngineState {
    pub(crate) conns: TokenMap<Conn>,
    listeners: TokenMap<Listener>,
    half_open: prov::HalfOpen<Incoming>,
    events: Vec<EpollEvent>,
    tick: u32,
    limits: ListenLimits,
    /// Some listener is paused (accept backoff).
    paused: bool,
}

/// The progress engine of one fabric.
pub(crate) struct Engine {
    state: Mutex<EngineState>,
    epoll: Epoll,
    auto: AtomicBool,
}

impl Engine {
    pub(crate) fn new() -> io::Result<Arc<Engine>> {
        Engine::with_limits(ListenLimits::default())
    }

    pub(crate) fn with_limits(limits: ListenLimits) -> io::Result<Arc<Engine>> {
        Ok(Arc::new(Engine {
            state: Mutex::new(EngineState {
                conns: TokenMap::default(),
                listeners: TokenMap::default(),
                half_open: prov::HalfOpen::new(limits.half_open_max, limits.half_open_age),
                events: Vec::with_capacity(64),
                tick: 0,
                limits,
                paused: false,
            }),
            epoll: Epoll::new()?,
            auto: AtomicBool::new(false),
        }))
    }

    /// Runs `f` on the state under the lock.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut EngineState, &Epoll) -> R) -> R {
        let mut st = self.state.lock();
        f(&mut st, &self.epoll)
    }

    /// Registers a listening socket.
    pub(crate) fn add_listener(
        &self,
        fid: Fid,
        sock: TcpListener,
        info: Info,
        eq: Arc<EventQueueShared>,
    ) {
        self.state.lock().listeners.insert(
            fid.0,
            Listener {
                sock,
                info,
                eq,
                listening: false,
                paused_until: None,
            },
        );
    }

    pub(crate) fn listen(&self, fid: Fid) -> fabric_core::Result<()> {
        let mut st = self.state.lock();
        let l = st
            .listeners
            .get_mut(&fid.0)
            .ok_or_else(|| Error::new(ErrorKind::Shutdown, "passive endpoint is closed"))?;
        if !l.listening {
            self.epoll.add(l.sock.as_fd(), fid.0, Interest::IN)?;
            l.listening = true;
        }
        Ok(())
    }

    pub(crate) fn listener_addr(&self, fid: Fid) -> fabric_core::Result<SocketAddr> {
        let st = self.state.lock();
        let l = st
            .listeners
            .get(&fid.0)
            .ok_or_else(|| Error::new(ErrorKind::Shutdown, "passive endpoint is closed"))?;
        Ok(l.sock.local_addr()?)
    }

    /// Closes a listener and the requests still arriving on it.
    pub(crate) fn close_listener(&self, fid: Fid) {
        let mut st = self.state.lock();
        st.listeners.remove(&fid.0);
        st.half_open.retain(|h| h.listener != fid);
    }
}

impl prov::Progress for Engine {
    /// Manual progress from a completion-queue read: cheap, skipped when another
    /// thread holds the lock.
    fn poll(&self) {
        if let Some(mut st) = self.state.try_lock() {
            st.progress(&self.epoll, false);
        }
    }

    /// Full progress (event-queue reads, blocking waits, the progress thread): also
    /// consults epoll.
    fn poll_full(&self) {
        let mut st = self.state.lock();
        st.progress(&self.epoll, true);
    }

    /// Sleeps until the engine has socket activity or `queue_fd` is signalled, at most
    /// until `deadline`.
    fn sleep(&self, queue_fd: Option<RawFd>, deadline: Option<Instant>) {
        // Timers of the engine itself (accept backoff, half-open ages, lingering
        // closes) are not in the epoll set: wake for them too.
        let timer = match self.state.try_lock() {
            Some(st) => st.next_timer(),
            None => Some(Instant::now() + Duration::from_millis(10)),
        };
        let wake = match (deadline, timer) {
            (Some(d), Some(t)) => Some(d.min(t)),
            (d, t) => d.or(t),
        };
        let left = wake.map(|d| d.saturating_duration_since(Instant::now()));
        match queue_fd {
            Some(q) => poll_readable(&[self.epoll.raw(), q], left),
            None => poll_readable(&[self.epoll.raw()], left),
        }
    }

    /// Starts the background progress thread (once).
    fn start_auto(self: &Arc<Self>) {
        prov::start_progress_thread(self, &self.auto, "fabric-tcp-progress");
    }
}

impl EngineState {
    fn progress(&mut self, ep: &Epoll, full: bool) {
        self.tick = self.tick.wrapping_add(1);
        let direct = self.conns.len() <= DIRECT_MAX;
        let mut need_epoll = full || !direct || !self.half_open.is_empty();
        let mut reap = false;
        if direct {
            for c in self.conns.values_mut() {
                reap |= c.is_closing() || c.detached;
                let r = if c.readable() { c.read() } else { Ok(()) };
                let r = r.and_then(|_| if c.want_write { c.flush() } else { Ok(()) });
                if let Err(f) = r {
                    c.fail(f);
                }
                if c.state == ConnState::Connecting {
                    need_epoll = true;
                }
                c.update_interest(ep);
            }
        }
        if reap || self.tick.is_multiple_of(EPOLL_EVERY) {
            self.reap_closing(ep);
        }
        if self.paused || !self.half_open.is_empty() {
            self.listener_timers(ep, Instant::now());
        }
        if need_epoll || self.tick.is_multiple_of(EPOLL_EVERY) {
            let mut events = std::mem::take(&mut self.events);
            match ep.wait(&mut events, 0) {
                Ok(_) => self.dispatch_events(ep, &events),
                Err(e) => warn!("epoll_wait: {e}"),
            }
            events.clear();
            self.events = events;
        }
    }

    /// The earliest moment a timer of the engine needs progress.
    fn next_timer(&self) -> Option<Instant> {
        let paused = self.listeners.values().filter_map(|l| l.paused_until);
        let aged = self.half_open.next_deadline();
        let closing = self.conns.values().filter_map(|c| c.closing_deadline());
        paused.chain(aged).chain(closing).min()
    }

    /// Closes half-open sockets past their age and puts paused listeners back.
    fn listener_timers(&mut self, ep: &Epoll, now: Instant) {
        let age = self.half_open.age();
        for _ in self.half_open.expire(now) {
            debug!("closing a connection whose request did not arrive within {age:?}");
        }
        if !self.paused {
            return;
        }
        self.paused = false;
        for (token, l) in &mut self.listeners {
            match l.paused_until {
                Some(t) if now >= t => {
                    l.paused_until = None;
                    if let Err(e) = ep.add(l.sock.as_fd(), *token, Interest::IN) {
                        warn!("cannot resume the listener: {e}");
                    }
                }
                Some(_) => self.paused = true,
                None => {}
            }
        }
    }

    /// Connections that refused a remote access and are sending their refusal: closes
    /// the ones past their deadline and drops the closed ones whose endpoint is gone.
    fn reap_closing(&mut self, ep: &Epoll) {
        let now = Instant::now();
        self.conns.retain(|_, c| {
            if c.is_closing() {
                c.check_linger(now);
                c.update_interest(ep);
            }
            // Keep all but detached connections whose socket has closed.
            !c.detached || c.is_closing()
        });
    }

    fn dispatch_events(&mut self, ep: &Epoll, events: &[EpollEvent]) {
        for ev in events {
            let token = ev.token;
            let flags = ev.flags;
            if let Some(c) = self.conns.get_mut(&token) {
                let r = if c.state == ConnState::Connecting {
                    finish_connect(c)
                } else {
                    let mut r = Ok(());
                    if c.readable() {
                        r = c.read();
                    } else if c.rx_held()
                        && flags.intersects(Interest::RDHUP | Interest::HUP | Interest::ERR)
                    {
                        // Reading is paused (a full buffer, answers not taken) and the
                        // peer has gone: what it sent can never be matched or
                        // answered, so the connection ends now, freeing its buffers.
                        r = Err(crate::conn::Fatal::PeerClosed);
                    }
                    if r.is_ok() && flags.contains(Interest::OUT) {
                        r = c.flush();
                    }
                    r
                };
                if let Err(f) = r {
                    c.fail(f);
                }
                c.update_interest(ep);
            } else if self.listeners.contains_key(&token) {
                self.accept_all(ep, token);
            } else if self.half_open.contains(token) {
                self.read_request(ep, token);
            }
        }
    }

    fn accept_all(&mut self, ep: &Epoll, token: u64) {
        for _ in 0..64 {
            let Some(l) = self.listeners.get(&token) else {
                return;
            };
            match l.sock.accept() {
                Ok((sock, peer)) => {
                    if let Err(e) = sys::tune_stream(&sock) {
                        warn!("cannot configure accepted socket from {peer}: {e}");
                        continue;
                    }
                    let id = Fid::next().0;
                    if let Err(e) = ep.add(sock.as_fd(), id, Interest::IN) {
                        warn!("epoll add: {e}");
                        continue;
                    }
                    debug!(%peer, "incoming connection");
                    let incoming = Incoming {
                        sock,
                        buf: Vec::with_capacity(BASE_HDR_SIZE + MAX_CM_DATA as usize),
                        listener: Fid(token),
                    };
                    let evicted = self.half_open.insert(id, incoming, Instant::now());
                    if !evicted.is_empty() {
                        debug!(
                            "{} connections without a request: closed the oldest",
                            self.half_open.len()
                        );
                    }
                    self.read_request(ep, id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // The pending connection stays in the backlog and the socket stays
                    // readable: polling it now would spin. Rest for a while.
                    let backoff = self.limits.accept_backoff;
                    warn!("accept: {e}; not accepting for {backoff:?}");
                    if let Some(l) = self.listeners.get_mut(&token) {
                        let _ = ep.delete(l.sock.as_fd());
                        l.paused_until = Some(Instant::now() + backoff);
                        self.paused = true;
                    }
                    return;
                }
                Err(e) => {
                    warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads a CONN_REQ from a half-open connection; when complete, raises ConnRequest.
    fn read_request(&mut self, ep: &Epoll, id: u64) {
        let Some(h) = self.half_open.get_mut(id) else {
            return;
        };
        let outcome = loop {
            // Read exactly what the request still needs, never beyond it.
            let need = if h.buf.len() < BASE_HDR_SIZE {
                BASE_HDR_SIZE
            } else {
                match Header::parse(&h.buf[..BASE_HDR_SIZE]) {
                    Ok(hdr) if hdr.op == Op::ConnReq => BASE_HDR_SIZE + hdr.size as usize,
                    Ok(hdr) => break Err(format!("expected CONN_REQ, got {:?}", hdr.op)),
                    Err(e) => break Err(e.to_string()),
                }
            };
            if h.buf.len() >= need {
                break Ok(true);
            }
            let mut tmp = [0u8; BASE_HDR_SIZE + MAX_CM_DATA as usize];
            let want = need - h.buf.len();
            match sys::recv(h.sock.as_fd(), &mut tmp[..want]) {
                Ok(0) => break Err("peer closed before its connection request".into()),
                Ok(n) => h.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        match outcome {
            Ok(false) => {}
            Err(why) => {
                debug!("dropping incoming connection: {why}");
                self.half_open.remove(id);
            }
            Ok(true) => {
                let Some(h) = self.half_open.remove(id) else {
                    return;
                };
                let _ = ep.delete(h.sock.as_fd());
                let Some(l) = self.listeners.get(&h.listener.0) else {
                    return;
                };
                let peer = h.sock.peer_addr().ok();
                let mut info = l.info.clone();
                info.dest_addr = peer.map(Address::Inet);
                if let Ok(local) = h.sock.local_addr() {
                    info.src_addr = Some(Address::Inet(local));
                }
                let info = prov::ConnToken::attach(info, h.sock);
                l.eq.push(Event::ConnRequest(Box::new(ConnRequest {
                    info,
                    data: h.buf[BASE_HDR_SIZE..].to_vec(),
                    listener: h.listener,
                })));
            }
        }
    }
}

/// Completes a non-blocking connect: on success sends CONN_REQ, else reports the
/// error on the event queue.
pub(crate) fn finish_connect(c: &mut Conn) -> Result<(), crate::conn::Fatal> {
    let Some(sock) = &c.sock else { return Ok(()) };
    match sys::take_socket_error(sock) {
        Ok(()) => c.start_handshake(),
        Err(e) => {
            connect_failed(c, e);
            Ok(())
        }
    }
}

/// Reports a failed TCP connect and closes the endpoint.
pub(crate) fn connect_failed(c: &mut Conn, e: io::Error) {
    let kind = if e.kind() == io::ErrorKind::ConnectionRefused {
        ErrorKind::ConnectionRefused
    } else {
        ErrorKind::Io
    };
    debug!(fid = %c.fid, "connect failed: {e}");
    c.rep.eq.push(Event::Error {
        fid: c.fid,
        error: Error::new(kind, format!("connect: {e}")).with_source(e),
        data: Vec::new(),
    });
    c.teardown(CqErrorKind::Canceled, "connect failed", None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_core::prov::Progress as _;
    use fabric_core::wait::WaitQueue;
    use fabric_core::EpType;
    use std::io::{Read, Write};

    fn listener(limits: ListenLimits) -> (Arc<Engine>, Arc<EventQueueShared>, SocketAddr) {
        let engine = Engine::with_limits(limits).unwrap();
        let sock = TcpListener::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let addr = sock.local_addr().unwrap();
        let eq = Arc::new(WaitQueue::new().unwrap());
        let fid = Fid::next();
        let info = Info::new("tcp", crate::CAPS, EpType::Msg, crate::LIMITS);
        engine.add_listener(fid, sock, info, eq.clone());
        engine.listen(fid).unwrap();
        (engine, eq, addr)
    }

    fn half_open(engine: &Engine) -> usize {
        engine.with(|st, _| st.half_open.len())
    }

    /// Polls the engine until `cond` holds (at most 5 s).
    fn poll_until(engine: &Engine, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}: not within 5 s");
            engine.poll_full();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether the peer closed `s` (end of stream or reset), waiting up to `wait`.
    fn closed_by_peer(s: &mut TcpStream, wait: Duration) -> bool {
        if wait.is_zero() {
            s.set_nonblocking(true).unwrap();
        } else {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(wait)).unwrap();
        }
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }

    fn conn_req(data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; BASE_HDR_SIZE];
        Header::new(Op::ConnReq, 0, data.len() as u64).emit(&mut b);
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn half_open_connections_are_capped_and_a_client_still_connects() {
        let cap = 8;
        let (engine, eq, addr) = listener(ListenLimits {
            half_open_max: cap,
            ..ListenLimits::default()
        });
        let n = 20;
        let mut silent: Vec<TcpStream> =
            (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut closed = 0;
        poll_until(&engine, "the excess half-open connections closed", || {
            assert!(
                half_open(&engine) <= cap,
                "{} half-open over the cap",
                half_open(&engine)
            );
            closed = silent
                .iter_mut()
                .filter_map(|s| closed_by_peer(s, Duration::ZERO).then_some(()))
                .count();
            closed >= n - cap
        });
        assert_eq!(half_open(&engine), cap);
        // A legitimate client still gets through (it displaces the oldest silent one).
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(&conn_req(b"hi")).unwrap();
        let mut req = None;
        poll_until(&engine, "the legitimate request", || {
            req = eq.pop();
            req.is_some()
        });
        match req {
            Some(Event::ConnRequest(r)) => assert_eq!(r.data, b"hi"),
            other => panic!("expected a connection request, got {other:?}"),
        }
        assert!(half_open(&engine) <= cap);
    }

    #[test]
    fn aged_half_open_connection_is_closed() {
        let (engine, _eq, addr) = listener(ListenLimits {
            half_open_age: Duration::from_millis(200),
            ..ListenLimits::default()
        });
        let mut silent = TcpStream::connect(addr).unwrap();
        poll_until(&engine, "accepted", || half_open(&engine) == 1);
        let accepted = Instant::now();
        // A sleeping waiter wakes for the age timer: next_timer bounds its sleep.
        let timer = engine.with(|st, _| st.next_timer()).expect("an age timer");
        assert!(timer <= accepted + Duration::from_millis(200));
        poll_until(&engine, "the aged connection closed", || {
            half_open(&engine) == 0
        });
        assert!(accepted.elapsed() >= Duration::from_millis(150));
        assert!(closed_by_peer(&mut silent, Duration::from_secs(2)));
    }
}
