//! Connection setup shared by the tools: a listener that accepts one peer, a client
//! that connects, each ending with a connected [`Side`].

use std::time::Duration;

use fabric::{
    Caps, CompletionQueue, CqAttr, Domain, Endpoint, EndpointConfig, EpType, EqAttr, Event,
    EventQueue, Fabric, Hints, Info, PassiveEndpoint, Progress,
};

use crate::{ctx, ToolResult};

/// How long connection setup may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One connected end: every object it needs, kept alive together.
pub struct Side {
    /// The answer the endpoint was opened from.
    pub info: Info,
    /// Fabric.
    pub fabric: Fabric,
    /// Domain.
    pub domain: Domain,
    /// Event queue.
    pub eq: EventQueue,
    /// One completion queue for both directions.
    pub cq: CompletionQueue,
    /// The connected endpoint.
    pub ep: Endpoint,
    /// Connection data the peer sent.
    pub peer_data: Vec<u8>,
}

/// Hints for the tools: reliable connected endpoints with messages and RMA.
pub fn hints(provider: &str, node: &str, port: u16, source: bool, progress: Progress) -> Hints {
    Hints::new()
        .caps(Caps::MSG | Caps::RMA)
        .ep_type(EpType::Msg)
        .provider(provider)
        .node(node)
        .service(port)
        .source(source)
        .progress(progress)
}

/// A passive endpoint waiting for one peer.
pub struct Listener {
    info: Info,
    fabric: Fabric,
    eq: EventQueue,
    pep: PassiveEndpoint,
    /// The port actually bound.
    pub port: u16,
}

/// Listens on `node:port` (port 0: any) with `provider`.
pub fn listen(provider: &str, node: &str, port: u16, progress: Progress) -> ToolResult<Listener> {
    let info = fabric::getinfo(&hints(provider, node, port, true, progress))
        .map_err(|e| e.to_string())?
        .remove(0);
    let fabric = Fabric::open(&info).map_err(ctx("open fabric"))?;
    let eq = fabric
        .eq(EqAttr::default())
        .map_err(ctx("open event queue"))?;
    let pep = fabric
        .passive_endpoint(&info, &eq)
        .map_err(ctx("open passive endpoint"))?;
    pep.listen().map_err(ctx("listen"))?;
    let port = pep
        .local_addr()
        .map_err(ctx("local address"))?
        .as_inet()
        .map(|a| a.port())
        .unwrap_or(port);
    Ok(Listener {
        info,
        fabric,
        eq,
        pep,
        port,
    })
}

impl Listener {
    /// Waits for a connection request, accepts it with `data`, and waits until connected.
    pub fn accept(&self, data: &[u8], timeout: Duration) -> ToolResult<Side> {
        let req = match self.eq.wait(timeout).map_err(ctx("waiting for a client"))? {
            Event::ConnRequest(r) => r,
            other => return Err(format!("expected a connection request, got {other:?}")),
        };
        let domain = self.fabric.domain(&req.info).map_err(ctx("open domain"))?;
        let cq = domain.cq(CqAttr::default()).map_err(ctx("open cq"))?;
        let ep = domain
            .endpoint(&req.info, EndpointConfig::new(&cq, &self.eq))
            .map_err(ctx("open endpoint"))?;
        ep.accept(data).map_err(ctx("accept"))?;
        wait_connected(&self.eq, &ep, timeout)?;
        Ok(Side {
            info: self.info.clone(),
            fabric: self.fabric.clone(),
            domain,
            eq: self.eq.clone(),
            cq,
            ep,
            peer_data: req.data.clone(),
        })
    }

    /// The passive endpoint.
    pub fn passive(&self) -> &PassiveEndpoint {
        &self.pep
    }
}

fn wait_connected(eq: &EventQueue, ep: &Endpoint, timeout: Duration) -> ToolResult<Vec<u8>> {
    loop {
        match eq.wait(timeout).map_err(ctx("waiting to connect"))? {
            Event::Connected { fid, data } if fid == ep.fid() => return Ok(data),
            Event::Error { error, .. } => return Err(format!("connection failed: {error}")),
            Event::Shutdown { .. } => return Err("connection closed during setup".into()),
            _ => {}
        }
    }
}

/// Connects to `node:port` with `provider`, sending `data`.
pub fn connect(
    provider: &str,
    node: &str,
    port: u16,
    data: &[u8],
    progress: Progress,
    timeout: Duration,
) -> ToolResult<Side> {
    connect_from(provider, node, port, None, data, progress, timeout)
}

/// Connects to `node:port` with `provider` from the local address `src` (any, when
/// `None`), sending `data`.
pub fn connect_from(
    provider: &str,
    node: &str,
    port: u16,
    src: Option<std::net::IpAddr>,
    data: &[u8],
    progress: Progress,
    timeout: Duration,
) -> ToolResult<Side> {
    let mut h = hints(provider, node, port, false, progress);
    if let Some(ip) = src {
        h = h.src_ip(ip);
    }
    let info = fabric::getinfo(&h).map_err(|e| e.to_string())?.remove(0);
    let fabric = Fabric::open(&info).map_err(ctx("open fabric"))?;
    let domain = fabric.domain(&info).map_err(ctx("open domain"))?;
    let eq = fabric
        .eq(EqAttr::default())
        .map_err(ctx("open event queue"))?;
    let cq = domain.cq(CqAttr::default()).map_err(ctx("open cq"))?;
    let ep = domain
        .endpoint(&info, EndpointConfig::new(&cq, &eq))
        .map_err(ctx("open endpoint"))?;
    ep.connect(data).map_err(ctx("connect"))?;
    let peer_data = wait_connected(&eq, &ep, timeout)?;
    Ok(Side {
        info,
        fabric,
        domain,
        eq,
        cq,
        ep,
        peer_data,
    })
}

/// Runs a server half and a client half in this process over `node` (a loopback
/// address, ephemeral port): the server in a thread, the client here, which also
/// binds `node` (so `--self -s 127.0.0.5` uses that address at both ends, as
/// softroce's device per address needs). Returns the client's result, or the first
/// error of either half.
pub fn run_self<T>(
    provider: &str,
    node: &str,
    server: impl FnOnce(&Side) -> ToolResult<()> + Send + 'static,
    client: impl FnOnce(&Side) -> ToolResult<T>,
) -> ToolResult<T> {
    let listener = listen(provider, node, 0, Progress::Manual)?;
    let port = listener.port;
    let srv = std::thread::spawn(move || -> ToolResult<()> {
        let side = listener.accept(b"", CONNECT_TIMEOUT)?;
        server(&side)
    });
    let src = node.parse::<std::net::IpAddr>().ok();
    let res = connect_from(
        provider,
        node,
        port,
        src,
        b"",
        Progress::Manual,
        CONNECT_TIMEOUT,
    )
    .and_then(|side| client(&side));
    let srv = srv
        .join()
        .map_err(|_| "the server thread panicked".to_string())?;
    let res = res?;
    srv?;
    Ok(res)
}

/// What a tool does with the connection: the role chosen by its command line.
pub enum Role<'a> {
    /// Both halves in this process, over this (loopback) address.
    SelfTest(&'a str),
    /// Connect to this server address.
    Client(&'a str),
    /// Listen at this address and serve one client.
    Server(&'a str),
}

/// Runs a tool's halves in the role the command line chose (`--self`, a destination
/// address, or neither for a server), on `port`. Returns the client's result, or `None`
/// for a server.
pub fn run_role<T>(
    tool: &str,
    provider: &str,
    role: Role<'_>,
    port: u16,
    server: impl FnOnce(&Side) -> ToolResult<()> + Send + 'static,
    client: impl FnOnce(&Side) -> ToolResult<T>,
) -> ToolResult<Option<T>> {
    match role {
        Role::SelfTest(addr) => run_self(provider, addr, server, client).map(Some),
        Role::Client(dest) => {
            let side = connect(provider, dest, port, b"", Progress::Manual, CONNECT_TIMEOUT)?;
            let r = client(&side).map(Some);
            report_device(&side);
            r
        }
        Role::Server(addr) => {
            let l = listen(provider, addr, port, Progress::Manual)?;
            eprintln!(
                "{tool}: {provider} server on {addr}:{}, waiting for a client",
                l.port
            );
            let side = l.accept(b"", Duration::from_secs(3600))?;
            let r = server(&side).map(|()| None);
            report_device(&side);
            r
        }
    }
}

/// The counters of the softroce device `side` uses and of its IB CM, as one line
/// (`bad_packets 0 wrong_source 0 ...`).
pub fn device_line(side: &Side) -> Option<String> {
    let ip = match side.ep.local_addr()?.as_inet()?.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => return None,
    };
    let d = fabric_softroce::device_stats(ip)?;
    let cm = fabric_softroce::ibcm::ibcm_stats(ip)
        .map(|c| {
            format!(
                " ibcm_received {} ibcm_sent {} ibcm_malformed {} ibcm_unmatched {} ibcm_retransmits {}",
                c.engine.received,
                c.engine.sent,
                c.engine.malformed,
                c.engine.unmatched,
                c.engine.retransmits
            )
        })
        .unwrap_or_default();
    Some(format!(
        "softroce device {ip}: rx_packets {} tx_packets {} bad_packets {} wrong_source {} unknown_qp {}{cm}",
        d.rx_packets, d.tx_packets, d.bad_packets, d.wrong_source, d.unknown_qp
    ))
}

/// Prints the softroce device's counters to stderr (nothing for other providers): a
/// peer's packets that this end refused (bad ICRC, off-path) show there.
fn report_device(side: &Side) {
    if let Some(line) = device_line(side) {
        eprintln!("{line}");
    }
}

/// The role from the usual flags: `--self`, an optional destination, the source
/// address.
pub fn role<'a>(self_mode: bool, dest: Option<&'a str>, src_addr: &'a str) -> Role<'a> {
    match (self_mode, dest) {
        (true, _) => Role::SelfTest(src_addr),
        (false, Some(d)) => Role::Client(d),
        (false, None) => Role::Server(src_addr),
    }
}

/// The command-line flags every client/server tool shares: provider, role and address.
#[derive(Debug, Clone, clap::Args)]
pub struct RoleArgs {
    /// Provider.
    #[arg(short = 'p', long, default_value = "tcp")]
    pub provider: String,
    /// Server address to connect to (client mode). Without it (and without --self) the
    /// tool is the server.
    pub dest: Option<String>,
    /// Run the server and the client in this process over loopback.
    #[arg(long = "self")]
    pub self_mode: bool,
    /// Address the server listens on (and, with --self, both ends use).
    #[arg(short = 's', long = "src-addr", default_value = "127.0.0.1")]
    pub src_addr: String,
    /// Port of the server (default: the tool's own).
    #[arg(short = 'P', long)]
    pub port: Option<u16>,
}

impl RoleArgs {
    /// The role these flags choose.
    pub fn role(&self) -> Role<'_> {
        role(self.self_mode, self.dest.as_deref(), &self.src_addr)
    }
}
