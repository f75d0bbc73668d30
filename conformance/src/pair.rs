//! Connection setup, written once: a listener on 127.0.0.1 port 0, a connector, and a
//! connected [`Pair`] (fabric, domain, eq, cq on both sides, connect, accept, both sides
//! `Connected`). Every case that needs a connection goes through here.

use std::ops::Deref;
use std::time::{Duration, Instant};

use fabric::{
    Address, Caps, Completion, CompletionQueue, ConnRequest, CqAttr, Endpoint, EndpointConfig,
    Event, MemoryRegion, PassiveEndpoint, Progress,
};

use crate::case::{CaseError, CaseResult, Check};
use crate::ctx::{Ctx, Node};

/// How a pair is set up.
#[derive(Debug, Clone)]
pub struct PairConfig {
    /// Capabilities both sides ask for.
    pub caps: Caps,
    /// Progress model (`None`: the provider's default).
    pub progress: Option<Progress>,
    /// Data the client sends with connect.
    pub connect_data: Vec<u8>,
    /// Data the server sends with accept.
    pub accept_data: Vec<u8>,
    /// Give each endpoint a second completion queue for receives ([`Side::rx_cq`]).
    pub split_cq: bool,
    /// Open the endpoints with selective completion.
    pub selective: bool,
}

impl PairConfig {
    /// A pair with `caps`, default progress, no connection data.
    pub fn new(caps: Caps) -> Self {
        PairConfig {
            caps,
            progress: None,
            connect_data: Vec::new(),
            accept_data: Vec::new(),
            split_cq: false,
            selective: false,
        }
    }
    /// Sets the progress model.
    pub fn progress(mut self, p: Progress) -> Self {
        self.progress = Some(p);
        self
    }
}

/// A node with a passive endpoint listening on 127.0.0.1 and a system-chosen port.
pub struct Listener {
    /// The server's objects.
    pub node: Node,
    /// The passive endpoint.
    pub pep: PassiveEndpoint,
    /// Where it listens (port is not 0).
    pub addr: Address,
}

/// A node with an endpoint that has started connecting.
pub struct Connector {
    /// The client's objects.
    pub node: Node,
    /// The endpoint.
    pub ep: Endpoint,
}

impl Ctx {
    /// Opens a listener on 127.0.0.1:0 and checks the port it got.
    pub fn listen(&self, caps: Caps, progress: Option<Progress>) -> Result<Listener, CaseError> {
        let info = self.info(&self.listen_hints(caps, progress))?;
        let node = self.open(info)?;
        let pep = node
            .fabric
            .passive_endpoint(&node.info, &node.eq)
            .ctx("open passive endpoint")?;
        pep.listen().ctx("listen")?;
        let addr = pep.local_addr().ctx("passive endpoint local_addr")?;
        match addr.as_inet() {
            Some(a) if a.port() != 0 && a.ip().is_loopback() => {}
            _ => {
                return Err(CaseError::fail(format!(
                    "listener bound {addr}: expected 127.0.0.1 with a real port"
                )))
            }
        }
        Ok(Listener { node, pep, addr })
    }

    /// Opens a client node and starts connecting to `addr` with `data`.
    pub fn connect(
        &self,
        caps: Caps,
        progress: Option<Progress>,
        addr: &Address,
        data: &[u8],
    ) -> Result<Connector, CaseError> {
        let (c, _) = self.connect_with(&PairConfig::new(caps), progress, addr, data)?;
        Ok(c)
    }

    /// [`connect`](Self::connect) with the endpoint options of `cfg`; returns the
    /// receive queue when `cfg.split_cq`.
    fn connect_with(
        &self,
        cfg: &PairConfig,
        progress: Option<Progress>,
        addr: &Address,
        data: &[u8],
    ) -> Result<(Connector, Option<CompletionQueue>), CaseError> {
        let info = self.info(&self.connect_hints(cfg.caps, progress, addr)?)?;
        let node = self.open(info)?;
        let rx_cq = open_rx_cq(&node, cfg)?;
        let ep = node
            .domain
            .endpoint(&node.info, endpoint_config(&node, rx_cq.as_ref(), cfg))
            .ctx("open client endpoint")?;
        ep.connect(data).ctx("connect")?;
        Ok((Connector { node, ep }, rx_cq))
    }

    /// Sets up a connected pair with `caps` and the provider's default progress.
    pub fn pair(&self, caps: Caps) -> Result<Pair, CaseError> {
        self.pair_with(&PairConfig::new(caps))
    }

    /// Sets up a connected pair as configured.
    pub fn pair_with(&self, cfg: &PairConfig) -> Result<Pair, CaseError> {
        let t = self.timeout();
        let listener = self.listen(cfg.caps, cfg.progress)?;
        let (client, client_rx_cq) =
            self.connect_with(cfg, cfg.progress, &listener.addr, &cfg.connect_data)?;
        let req = wait_conn_request(&listener.node, &[&client.node], t)?;
        let server_rx_cq = open_rx_cq(&listener.node, cfg)?;
        let server_ep = listener
            .node
            .domain
            .endpoint(
                &req.info,
                endpoint_config(&listener.node, server_rx_cq.as_ref(), cfg),
            )
            .ctx("open server endpoint from the connection request")?;
        server_ep.accept(&cfg.accept_data).ctx("accept")?;
        let client_data = wait_connected(&client.node, &client.ep, &[&listener.node], t)
            .map_err(|e| e.context("client"))?;
        let server_data = wait_connected(&listener.node, &server_ep, &[&client.node], t)
            .map_err(|e| e.context("server"))?;
        Ok(Pair {
            server: Side {
                node: listener.node,
                ep: server_ep,
                peer_data: req.data,
                connected_data: server_data,
                rx_cq: server_rx_cq,
            },
            client: Side {
                node: client.node,
                ep: client.ep,
                peer_data: client_data.clone(),
                connected_data: client_data,
                rx_cq: client_rx_cq,
            },
            listener: listener.pep,
            timeout: t,
        })
    }
}

fn open_rx_cq(node: &Node, cfg: &PairConfig) -> Result<Option<CompletionQueue>, CaseError> {
    if !cfg.split_cq {
        return Ok(None);
    }
    node.domain
        .cq(CqAttr::default())
        .map(Some)
        .ctx("open receive completion queue")
}

fn endpoint_config<'a>(
    node: &'a Node,
    rx_cq: Option<&'a CompletionQueue>,
    cfg: &PairConfig,
) -> EndpointConfig<'a> {
    let mut c = EndpointConfig::new(&node.cq, &node.eq);
    if let Some(rx) = rx_cq {
        c.rx_cq = rx;
    }
    c.selective_completion = cfg.selective;
    c
}

/// Waits for a connection request on a listener's node.
pub fn wait_conn_request(
    listener: &Node,
    others: &[&Node],
    timeout: Duration,
) -> Result<ConnRequest, CaseError> {
    match listener.wait_event(others, timeout)? {
        Event::ConnRequest(r) => Ok(*r),
        other => Err(CaseError::fail(format!(
            "expected a connection request, got {other:?}"
        ))),
    }
}

/// Waits for `Connected` of `ep`; returns the connection data it carries.
pub fn wait_connected(
    node: &Node,
    ep: &Endpoint,
    others: &[&Node],
    timeout: Duration,
) -> Result<Vec<u8>, CaseError> {
    match node.wait_event(others, timeout)? {
        Event::Connected { fid, data } => {
            if fid != ep.fid() {
                return Err(CaseError::fail(format!(
                    "Connected event for {fid}, but the endpoint is {}",
                    ep.fid()
                )));
            }
            Ok(data)
        }
        other => Err(CaseError::fail(format!(
            "expected Connected, got {other:?}"
        ))),
    }
}

/// One side of a connected pair.
pub struct Side {
    /// Fabric, domain, queues.
    pub node: Node,
    /// The connected endpoint.
    pub ep: Endpoint,
    /// Connection data from the peer: the connect data (server) or accept data (client).
    pub peer_data: Vec<u8>,
    /// The data carried by this side's `Connected` event.
    pub connected_data: Vec<u8>,
    /// The receive completion queue, when the pair was set up with `split_cq` (then
    /// `cq` gets only transmit completions; the pair's waits see only `cq`).
    pub rx_cq: Option<CompletionQueue>,
}

impl Deref for Side {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Side {
    /// Allocates and registers `len` bytes.
    pub fn alloc(&self, len: usize, access: fabric::Access) -> Result<MemoryRegion, CaseError> {
        self.domain
            .alloc(len, access)
            .ctx(format!("register {len} bytes with {access:?}"))
    }
}

/// Which side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The accepting side.
    Server,
    /// The connecting side.
    Client,
}

/// A connected pair.
pub struct Pair {
    /// The accepting side.
    pub server: Side,
    /// The connecting side.
    pub client: Side,
    /// The passive endpoint the server accepted on (still listening).
    pub listener: PassiveEndpoint,
    /// How long one completion or event may take.
    pub timeout: Duration,
}

impl Pair {
    /// One side.
    pub fn side(&self, who: Who) -> &Side {
        match who {
            Who::Server => &self.server,
            Who::Client => &self.client,
        }
    }

    fn split(&self, who: Who) -> (&Side, &Side) {
        match who {
            Who::Server => (&self.server, &self.client),
            Who::Client => (&self.client, &self.server),
        }
    }

    /// The next completion on `who`, driving both sides.
    pub fn wait(&self, who: Who) -> Result<Completion, CaseError> {
        let (me, peer) = self.split(who);
        me.wait_completion(&[&peer.node], self.timeout)
            .map_err(|e| e.context(format!("{who:?}")))
    }

    /// The next completion on `who`, which must be successful.
    pub fn wait_ok(&self, who: Who) -> Result<Completion, CaseError> {
        let c = self.wait(who)?;
        if let Err(e) = &c.status {
            return Err(CaseError::fail(format!(
                "{who:?}: error completion (context {:#x}): {e}",
                c.context
            )));
        }
        Ok(c)
    }

    /// `n` successful completions on `who`, in arrival order.
    pub fn wait_ok_n(&self, who: Who, n: usize) -> Result<Vec<Completion>, CaseError> {
        (0..n)
            .map(|i| {
                self.wait_ok(who)
                    .map_err(|e| e.context(format!("{i} of {n}")))
            })
            .collect()
    }

    /// The next event on `who`, driving both sides.
    pub fn wait_event(&self, who: Who) -> Result<Event, CaseError> {
        let (me, peer) = self.split(who);
        me.wait_event(&[&peer.node], self.timeout)
            .map_err(|e| e.context(format!("{who:?}")))
    }

    /// Drives both sides for `dur`.
    pub fn drive_for(&self, dur: Duration) -> Result<(), CaseError> {
        self.server.drive_for(&[&self.client.node], dur)
    }

    /// Fails if `who` gets a completion within `dur`.
    pub fn expect_no_completion(&self, who: Who, dur: Duration, what: &str) -> CaseResult {
        let (me, peer) = self.split(who);
        me.expect_no_completion(&[&peer.node], dur, what)
    }

    /// Drives both sides until `cond` holds or the timeout passes.
    pub fn drive_until(
        &self,
        what: &str,
        mut cond: impl FnMut() -> Result<bool, CaseError>,
    ) -> CaseResult {
        let deadline = Instant::now() + self.timeout;
        loop {
            if cond()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CaseError::fail(format!(
                    "{what}: not within {:?}",
                    self.timeout
                )));
            }
            self.drive_for(Duration::from_millis(1))?;
        }
    }
}
