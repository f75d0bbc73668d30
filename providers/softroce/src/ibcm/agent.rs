//! The CM agent of a device: the [`Engine`] of its QP1, fed by the device's receive
//! path (which hands every packet for QPN 1 to [`deliver`]), driven by whoever runs
//! the connection manager ([`Agent::progress`]), sending through the device's socket
//! (port 4791, so faults and captures configured on the device apply).

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use parking_lot::Mutex;
use tracing::debug;

use super::engine::{CmEvent, Engine, Stats};
use super::wire::{build_gsi_packet, rej, MAD_LEN};
use crate::provider::device::Device;

/// QP1 packets waiting for the CM at most (more are dropped and counted).
pub const MAX_INBOX: usize = 1024;

/// Who hears a connection's or a listener's events (an endpoint, a listener).
pub(crate) trait CmOwner: Send + Sync {
    /// An event for this owner; called with no agent lock held.
    fn ib_event(&self, agent: &Arc<Agent>, ev: CmEvent);
}

/// The CM of one device.
pub(crate) struct Agent {
    dev: Arc<Device>,
    engine: Mutex<Engine>,
    inbox: Mutex<VecDeque<(Ipv4Addr, Vec<u8>)>>,
    owners: Mutex<HashMap<u64, Weak<dyn CmOwner>>>,
    psn: AtomicU32,
    inbox_dropped: AtomicU64,
}

type Registry = Mutex<HashMap<Ipv4Addr, Weak<Agent>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Hands a packet for QPN 1 (ICRC verified) that arrived on the device at `ip` from
/// `src` to the device's CM. `false` if the device has no CM (nobody in the
/// process uses IB CM on it).
pub(crate) fn deliver(ip: Ipv4Addr, src: SocketAddrV4, packet: &[u8]) -> bool {
    let Some(agent) = registry().lock().get(&ip).and_then(Weak::upgrade) else {
        return false;
    };
    let mut inbox = agent.inbox.lock();
    if inbox.len() >= MAX_INBOX {
        agent.inbox_dropped.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    inbox.push_back((*src.ip(), packet.to_vec()));
    true
}

/// Counters of the IB CM of the device on `ip`, if one exists in this process.
pub fn ibcm_stats(ip: Ipv4Addr) -> Option<AgentStats> {
    let agent = registry().lock().get(&ip).and_then(Weak::upgrade)?;
    Some(agent.stats())
}

/// Counters of a device's IB CM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// The engine's counters.
    pub engine: Stats,
    /// Packets dropped because the CM's inbox was full.
    pub inbox_dropped: u64,
    /// Connections held (not in timewait).
    pub connections: usize,
    /// Timewait entries.
    pub timewait: usize,
}

impl Agent {
    /// The CM of `dev`, created if the process has none for it.
    pub(crate) fn of(dev: &Arc<Device>) -> Arc<Agent> {
        let mut r = registry().lock();
        if let Some(a) = r.get(&dev.ip()).and_then(Weak::upgrade) {
            if Arc::ptr_eq(&a.dev, dev) {
                return a;
            }
        }
        let a = Arc::new(Agent {
            dev: dev.clone(),
            engine: Mutex::new(Engine::new(dev.ip())),
            inbox: Mutex::new(VecDeque::new()),
            owners: Mutex::new(HashMap::new()),
            psn: AtomicU32::new(rand::random::<u32>() & 0xFF_FFFF),
            inbox_dropped: AtomicU64::new(0),
        });
        r.insert(dev.ip(), Arc::downgrade(&a));
        a
    }

    pub(crate) fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    pub(crate) fn stats(&self) -> AgentStats {
        let e = self.engine.lock();
        let (connections, timewait) = e.sizes();
        AgentStats {
            engine: e.stats(),
            inbox_dropped: self.inbox_dropped.load(Ordering::Relaxed),
            connections,
            timewait,
        }
    }

    /// Events for `token` go to `owner`.
    pub(crate) fn register(&self, token: u64, owner: Weak<dyn CmOwner>) {
        let mut o = self.owners.lock();
        o.retain(|_, w| w.strong_count() > 0);
        o.insert(token, owner);
    }

    pub(crate) fn unregister(&self, token: u64) {
        self.owners.lock().remove(&token);
    }

    /// Runs `f` on the engine (a call of the connection's owner: connect, accept,
    /// reject, disconnect) and sends what it queued. Events stay queued for
    /// [`Self::progress`], so an owner may call this with its own lock held.
    pub(crate) fn call<R>(&self, f: impl FnOnce(&mut Engine, Instant) -> R) -> R {
        let now = Instant::now();
        let mut e = self.engine.lock();
        let r = f(&mut e, now);
        let mut out = Vec::new();
        while let Some((to, mad)) = e.poll_transmit() {
            out.push((to, mad.encode()));
        }
        drop(e);
        self.send(out);
        r
    }

    fn send(&self, out: Vec<(Ipv4Addr, [u8; MAD_LEN])>) {
        let ip = self.dev.ip();
        for (to, mad) in out {
            let psn = self.psn.fetch_add(1, Ordering::Relaxed);
            self.dev.send_gsi(to, build_gsi_packet(&mad, psn, ip, to));
        }
    }

    fn drain(e: &mut Engine) -> (Vec<(Ipv4Addr, [u8; MAD_LEN])>, Vec<CmEvent>) {
        let mut out = Vec::new();
        while let Some((to, mad)) = e.poll_transmit() {
            out.push((to, mad.encode()));
        }
        let mut events = Vec::new();
        while let Some(ev) = e.poll_event() {
            events.push(ev);
        }
        (out, events)
    }

    fn flush(self: &Arc<Self>, out: Vec<(Ipv4Addr, [u8; MAD_LEN])>, events: Vec<CmEvent>) {
        self.send(out);
        for ev in events {
            let token = match &ev {
                CmEvent::Request { listener, .. } => *listener,
                CmEvent::Established { owner, .. }
                | CmEvent::Ready { owner, .. }
                | CmEvent::Rejected { owner, .. }
                | CmEvent::Disconnected { owner, .. } => *owner,
            };
            let owner = self.owners.lock().get(&token).and_then(Weak::upgrade);
            match owner {
                Some(o) => o.ib_event(self, ev),
                None => {
                    debug!(?ev, "softroce IB CM: event for an owner that is gone");
                    if let CmEvent::Request { conn, .. } = ev {
                        self.call(|e, now| {
                            let _ = e.reject(conn, rej::CONSUMER_DEFINED, &[], now);
                        });
                    }
                }
            }
        }
    }

    /// Handles what arrived and the timers that are due, sends the answers and
    /// delivers the events to their owners (call with no owner's lock held).
    pub(crate) fn progress(self: &Arc<Self>) {
        let pkts: Vec<(Ipv4Addr, Vec<u8>)> = self.inbox.lock().drain(..).collect();
        let now = Instant::now();
        let mut e = self.engine.lock();
        for (src, p) in &pkts {
            e.handle_packet(*src, p, now);
        }
        if e.poll_timeout().is_some_and(|t| t <= now) {
            e.handle_timeout(now);
        }
        let (out, events) = Self::drain(&mut e);
        drop(e);
        self.flush(out, events);
    }
}
