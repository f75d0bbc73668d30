//! What a case gets: the provider under test, getinfo helpers that always name that
//! provider and loopback addresses, and opened objects ([`Node`]).
//!
//! ## Addresses
//! Cases write their hints with the loopback address [`LOOPBACK`] (127.0.0.1); a
//! context runs them on *its* address ([`Ctx::addr`]): [`Ctx::open`] moves a listener's
//! 127.0.0.1 source there and gives a connector with no source that address as its
//! source, so every object a case opens lives on it. The default is 127.0.0.1, except
//! for softroce, whose device owns UDP 4791 of its address: there each context picks a
//! free loopback address of its own ([`fabric_softroce::free_loopback_ip`]), so the
//! suite never depends on owning 127.0.0.1:4791 and several runs go on side by side.
//! `fabric-conformance --addr IP` chooses it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fabric::{
    Address, Caps, Completion, CompletionQueue, CqAttr, Domain, EpType, EqAttr, Event, EventQueue,
    Fabric, Hints, Info, Progress, Registry,
};

use crate::case::{CaseError, Check};

/// How long one blocking step of a case (a completion, an event) may take by default.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(10);

/// The loopback address cases write in their hints (see "Addresses" above).
pub const LOOPBACK: &str = "127.0.0.1";

/// A case's view of the provider under test.
#[derive(Clone)]
pub struct Ctx {
    provider: String,
    registry: Registry,
    op_timeout: Duration,
    addr: IpAddr,
}

/// The address a context for `provider` uses unless told otherwise: a free loopback
/// address for softroce (its device needs UDP 4791 of the address to itself), else
/// 127.0.0.1.
pub fn default_addr(provider: &str) -> IpAddr {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if provider != "softroce" {
        return loopback;
    }
    match fabric_softroce::free_loopback_ip() {
        Ok(ip) => IpAddr::V4(ip),
        // Every try was taken (unlikely): 127.0.0.1, whose error then says so.
        Err(_) => loopback,
    }
}

impl Ctx {
    /// A context for `provider` among the providers of `registry`, on
    /// [`default_addr`].
    pub fn new(provider: &str, registry: Registry) -> Self {
        Ctx {
            provider: provider.to_string(),
            registry,
            op_timeout: DEFAULT_OP_TIMEOUT,
            addr: default_addr(provider),
        }
    }

    /// Runs the cases on `addr` (a loopback address) instead.
    pub fn with_addr(mut self, addr: IpAddr) -> Self {
        self.addr = addr;
        self
    }

    /// The address every listener and connector of the cases uses.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Sets the time one completion or event may take.
    pub fn with_op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// The provider under test.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The registry the provider is in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// How long one completion or event may take.
    pub fn timeout(&self) -> Duration {
        self.op_timeout
    }

    /// Hints for a connected endpoint of the provider under test with `caps`.
    pub fn hints(&self, caps: Caps) -> Hints {
        Hints::new()
            .provider(&self.provider)
            .ep_type(EpType::Msg)
            .caps(caps)
    }

    /// Runs getinfo; forces the provider name into the hints so another provider never
    /// answers.
    pub fn getinfo(&self, hints: &Hints) -> Result<Vec<Info>, CaseError> {
        let hints = hints.clone().provider(&self.provider);
        let infos = self
            .registry
            .getinfo(&hints)
            .ctx(format!("getinfo({hints:?})"))?;
        if let Some(bad) = infos.iter().find(|i| i.provider_name != self.provider) {
            return Err(CaseError::fail(format!(
                "getinfo for provider {} answered with provider {}",
                self.provider, bad.provider_name
            )));
        }
        Ok(infos)
    }

    /// This provider's rejection reason for `hints`, or `None` if it answered.
    pub fn rejection(&self, hints: &Hints) -> Option<String> {
        self.registry
            .explain_with_filter(hints, None)
            .into_iter()
            .find(|m| m.provider == self.provider)
            .and_then(|m| m.result.err())
    }

    /// The first answer for `hints`.
    pub fn info(&self, hints: &Hints) -> Result<Info, CaseError> {
        let mut v = self.getinfo(hints)?;
        Ok(v.remove(0))
    }

    /// Hints of a listener on 127.0.0.1, port 0 (the system picks the port).
    pub fn listen_hints(&self, caps: Caps, progress: Option<Progress>) -> Hints {
        let h = self.hints(caps).node(LOOPBACK).service(0).source(true);
        match progress {
            Some(p) => h.progress(p),
            None => h,
        }
    }

    /// Hints of a connector to `addr`.
    pub fn connect_hints(
        &self,
        caps: Caps,
        progress: Option<Progress>,
        addr: &Address,
    ) -> Result<Hints, CaseError> {
        let inet = addr
            .as_inet()
            .ok_or_else(|| CaseError::fail(format!("listener address {addr} is not inet")))?;
        let h = self
            .hints(caps)
            .node(&inet.ip().to_string())
            .service(inet.port());
        Ok(match progress {
            Some(p) => h.progress(p),
            None => h,
        })
    }

    /// Opens fabric, domain, event queue and completion queue from an answer, placed
    /// on this context's address: a source of 127.0.0.1 moves there (port kept), and a
    /// connector with no source gets it as source (see "Addresses" above).
    pub fn open(&self, mut info: Info) -> Result<Node, CaseError> {
        self.place(&mut info);
        let fabric = Fabric::open(&info).ctx("open fabric")?;
        let domain = fabric.domain(&info).ctx("open domain")?;
        let eq = fabric.eq(EqAttr::default()).ctx("open event queue")?;
        let cq = domain.cq(CqAttr::default()).ctx("open completion queue")?;
        Ok(Node {
            info,
            fabric,
            domain,
            eq,
            cq,
            completions: RefCell::new(VecDeque::new()),
            events: RefCell::new(VecDeque::new()),
        })
    }

    fn place(&self, info: &mut Info) {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        if self.addr == loopback {
            return;
        }
        match info.src_addr.as_ref().and_then(Address::as_inet) {
            Some(sa) if sa.ip() == loopback => {
                info.src_addr = Some(Address::Inet(SocketAddr::new(self.addr, sa.port())));
            }
            Some(_) => {}
            None if info.dest_addr.is_some() => {
                info.src_addr = Some(Address::Inet(SocketAddr::new(self.addr, 0)));
            }
            None => {}
        }
    }

    /// Opens a node for `caps` (no address), for cases that need only a domain.
    pub fn node(&self, caps: Caps) -> Result<Node, CaseError> {
        let info = self.info(&self.hints(caps))?;
        self.open(info)
    }
}

/// An opened fabric, domain, event queue and completion queue of one side, with the
/// completions and events read while driving progress but not yet consumed.
pub struct Node {
    /// The answer it was opened from.
    pub info: Info,
    /// The fabric.
    pub fabric: Fabric,
    /// The domain.
    pub domain: Domain,
    /// The event queue.
    pub eq: EventQueue,
    /// The completion queue (both directions).
    pub cq: CompletionQueue,
    completions: RefCell<VecDeque<Completion>>,
    events: RefCell<VecDeque<Event>>,
}

/// How long one blocking read lasts while several nodes are driven in turn.
const SLICE: Duration = Duration::from_millis(1);

impl Node {
    /// Reads whatever is ready on the queues without blocking, keeping it for later
    /// (this is what makes progress in `Progress::Manual`).
    pub fn drive(&self) -> Result<(), CaseError> {
        let mut v = Vec::new();
        self.cq.read(&mut v, 256).ctx("cq read")?;
        self.completions.borrow_mut().extend(v);
        if let Some(ev) = self.eq.read().ctx("eq read")? {
            self.events.borrow_mut().push_back(ev);
        }
        Ok(())
    }

    /// Takes a completion already read, if any.
    pub fn take_completion(&self) -> Option<Completion> {
        self.completions.borrow_mut().pop_front()
    }

    /// Takes an event already read, if any.
    pub fn take_event(&self) -> Option<Event> {
        self.events.borrow_mut().pop_front()
    }

    /// The next completion, waiting up to `timeout` while driving `others` (pass the
    /// peer so a single thread moves both sides in manual progress).
    pub fn wait_completion(
        &self,
        others: &[&Node],
        timeout: Duration,
    ) -> Result<Completion, CaseError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.take_completion() {
                return Ok(c);
            }
            for o in others {
                o.drive()?;
            }
            let mut v = Vec::new();
            self.cq.sread(&mut v, 256, Some(SLICE)).ctx("cq sread")?;
            self.completions.borrow_mut().extend(v);
            if self.completions.borrow().is_empty() && Instant::now() >= deadline {
                return Err(CaseError::fail(format!("no completion within {timeout:?}")));
            }
        }
    }

    /// The next event, waiting up to `timeout` while driving this node's completion
    /// queue and `others`.
    pub fn wait_event(&self, others: &[&Node], timeout: Duration) -> Result<Event, CaseError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.take_event() {
                return Ok(e);
            }
            for o in others {
                o.drive()?;
            }
            let mut v = Vec::new();
            self.cq.read(&mut v, 256).ctx("cq read")?;
            self.completions.borrow_mut().extend(v);
            if let Some(ev) = self.eq.sread(Some(SLICE)).ctx("eq sread")? {
                return Ok(ev);
            }
            if Instant::now() >= deadline {
                return Err(CaseError::fail(format!("no event within {timeout:?}")));
            }
        }
    }

    /// Drives this node and `others` for `dur`, keeping what arrives.
    pub fn drive_for(&self, others: &[&Node], dur: Duration) -> Result<(), CaseError> {
        let deadline = Instant::now() + dur;
        while Instant::now() < deadline {
            self.drive()?;
            for o in others {
                o.drive()?;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    }

    /// Fails if a completion arrives within `dur` (driving `others` too).
    pub fn expect_no_completion(
        &self,
        others: &[&Node],
        dur: Duration,
        what: &str,
    ) -> Result<(), CaseError> {
        self.drive_for(others, dur)?;
        match self.take_completion() {
            None => Ok(()),
            Some(c) => Err(CaseError::fail(format!(
                "{what}: unexpected completion {c:?}"
            ))),
        }
    }
}
