//! Ping-pong over reliable unconnected (RDM) endpoints (`fabric-pingpong -e rdm`), as
//! fabtests' `fi_pingpong -e rdm` measures it: the RDM layer (`fabric::rdm`, the rxm
//! manner) over a MSG provider, answered by [`fabric::rdm_getinfo`] as `"tcp;rxm"` or
//! `"softroce;rxm"`; untagged (`send_to` / `recv`) or tagged (`tsend` / `trecv`).
//!
//! The client's first message carries its endpoint name (for the server's address
//! vector) and the configuration of [`crate::pingpong`]; the last one ("done") tells
//! the server that every echo has arrived.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use fabric::rdm::{
    av::encode_name, AddressVector, AvAttr, FiAddr, RdmAttr, RdmCompletion, RdmEndpoint, RdmInfo,
};
use fabric::{Access, Address, Caps, Domain, EpType, Fabric, Hints, MemoryRegion};

use crate::pingpong::{
    decode_config, encode_config, plan, Options, PpResult, SizeRun, CONFIG_MAX, OP_TIMEOUT,
};
use crate::{ctx, Mode, ToolResult};

const TAG: u64 = 0x7070;
const CFG_TAG: u64 = 0xC0F1;
const DONE_TAG: u64 = 0xD0E;
const SEND_CTX: u64 = 1;
const RECV_CTX: u64 = 2;
const CFG_CTX: u64 = 3;
const DONE_CTX: u64 = 4;
const BYE_CTX: u64 = 5;
/// How long the last handshake ("done", "bye") may take.
const LINGER: Duration = Duration::from_secs(5);
const NAME_MAX: usize = 258;

/// One RDM end: every object it needs, kept alive together.
pub struct RdmSide {
    /// The RDM answer (`"tcp;rxm"`).
    pub info: RdmInfo,
    /// Fabric (opened from the MSG answer).
    pub fabric: Fabric,
    /// Domain.
    pub domain: Domain,
    /// Address vector.
    pub av: AddressVector,
    /// The endpoint.
    pub ep: RdmEndpoint,
    tagged: bool,
}

/// Opens an RDM endpoint of `provider` (`tcp`, `tcp;rxm`, `softroce;rxm`, ...)
/// listening on `node:port` (port 0: any).
pub fn open(provider: &str, node: &str, port: u16, tagged: bool) -> ToolResult<RdmSide> {
    let hints = Hints::new()
        .ep_type(EpType::Rdm)
        .caps(Caps::MSG | Caps::TAGGED)
        .provider(provider)
        .node(node)
        .service(port)
        .source(true);
    let info = fabric::rdm_getinfo(&hints)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| format!("no RDM answer for provider {provider}"))?;
    let fabric = Fabric::open(info.msg()).map_err(ctx("open fabric"))?;
    let domain = fabric.domain(info.msg()).map_err(ctx("open domain"))?;
    let av = AddressVector::open(&domain, AvAttr::default()).map_err(ctx("open AV"))?;
    let ep = RdmEndpoint::open(&domain, &info, &av, RdmAttr::default())
        .map_err(ctx("open RDM endpoint"))?;
    Ok(RdmSide {
        info,
        fabric,
        domain,
        av,
        ep,
        tagged,
    })
}

impl RdmSide {
    /// The layered provider name (`"tcp;rxm"`).
    pub fn provider_name(&self) -> &str {
        &self.info.info().provider_name
    }

    fn post_send(
        &self,
        mr: &MemoryRegion,
        off: usize,
        len: usize,
        to: FiAddr,
        tag: u64,
        context: u64,
    ) -> ToolResult<()> {
        let iov = mr.iov(off, len);
        if self.tagged {
            self.ep.tsend(iov, to, tag, context)
        } else {
            self.ep.send_to(iov, to, context)
        }
        .map_err(ctx("send"))
    }

    fn post_recv(
        &self,
        mr: &MemoryRegion,
        off: usize,
        len: usize,
        tag: u64,
        context: u64,
    ) -> ToolResult<()> {
        let iov = mr.iov(off, len);
        if self.tagged {
            self.ep.trecv(iov, None, tag, 0, context)
        } else {
            self.ep.recv(iov, context)
        }
        .map_err(ctx("post receive"))
    }

    /// Waits for one successful completion.
    pub fn next(&self, mode: Mode) -> ToolResult<RdmCompletion> {
        let c = self.next_any(mode)?;
        if let Err(e) = &c.status {
            return Err(format!("operation {} failed: {e}", c.context));
        }
        Ok(c)
    }

    /// Waits for one completion, successful or not.
    fn next_any(&self, mode: Mode) -> ToolResult<RdmCompletion> {
        match mode {
            Mode::Sleep => self.ep.wait(OP_TIMEOUT).map_err(ctx("waiting")),
            Mode::Poll => self.ep.poll_wait(OP_TIMEOUT).map_err(ctx("polling")),
        }
    }

    /// Waits for the successful completion with `context`. Others that come first are
    /// dropped whatever their status: they are send completions of echoes the peer
    /// has already answered or checked (the RDM layer may complete the server's last
    /// echo with an error when the client, which has it, leaves first).
    fn until(&self, mode: Mode, context: u64) -> ToolResult<RdmCompletion> {
        loop {
            let c = self.next_any(mode)?;
            if c.context == context {
                if let Err(e) = &c.status {
                    return Err(format!("operation {context} failed: {e}"));
                }
                return Ok(c);
            }
        }
    }
}

/// The server half: receives the client's name and configuration, echoes every
/// message, and ends on the client's "done".
pub fn server(side: &RdmSide, mode: Mode) -> ToolResult<()> {
    let cfg = side
        .domain
        .alloc(NAME_MAX + 2 + CONFIG_MAX, Access::LOCAL)
        .map_err(ctx("register"))?;
    side.post_recv(&cfg, 0, NAME_MAX + 2 + CONFIG_MAX, CFG_TAG, CFG_CTX)?;
    let c = side
        .until(mode, CFG_CTX)
        .map_err(|e| format!("configuration: {e}"))?;
    let b = cfg.to_vec(0, c.len).map_err(ctx("config"))?;
    let bad = || "malformed RDM ping-pong configuration from the client".to_string();
    let n = usize::from(u16::from_le_bytes([
        *b.first().ok_or_else(bad)?,
        *b.get(1).ok_or_else(bad)?,
    ]));
    let name = b.get(2..2 + n).ok_or_else(bad)?;
    let (plan, warmup) = decode_config(b.get(2 + n..).ok_or_else(bad)?)?;
    let peer = side.av.insert(name).map_err(ctx("insert the client"))?;
    let max = plan.iter().map(|p| p.0).max().unwrap_or(0).max(1);
    // Messages above the eager limit go by rendezvous: the receiver reads them from
    // the sender's region, which needs REMOTE_READ.
    let mr = side
        .domain
        .alloc(2 * max, Access::LOCAL | Access::REMOTE_READ)
        .map_err(ctx("register buffers"))?;
    for (size, iters) in plan {
        let total = warmup + iters;
        side.post_recv(&mr, 0, size, TAG, RECV_CTX)?;
        for i in 0..total {
            loop {
                let c = side
                    .next(mode)
                    .map_err(|e| format!("size {size}, message {i}: {e}"))?;
                if c.context == RECV_CTX {
                    break;
                }
            }
            // Echo first (the critical path), then post the next receive.
            side.post_send(&mr, (i % 2) * max, size, peer, TAG, SEND_CTX)?;
            if i + 1 < total {
                side.post_recv(&mr, ((i + 1) % 2) * max, size, TAG, RECV_CTX)?;
            }
        }
    }
    // The "done" message: every echo has reached the client. Answered with "bye",
    // which the client waits for before it leaves: the RDM layer can lose a message
    // that is still being received when its sender closes the connection (seen: the
    // "done" of a client that left at once never completed here).
    side.post_recv(&cfg, 0, 4, DONE_TAG, DONE_CTX)?;
    side.until(mode, DONE_CTX)?;
    cfg.write_at(0, b"bye!").map_err(ctx("bye"))?;
    side.post_send(&cfg, 0, 4, peer, DONE_TAG, BYE_CTX)?;
    // Its completion, successful or not (the client may leave once it has it), at
    // most LINGER; then a moment for the bytes to be read before this end closes.
    let _ = wait_for(side, mode, BYE_CTX, LINGER);
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

/// Waits up to `limit` for the completion with `context`, whatever its status;
/// whether it came.
fn wait_for(side: &RdmSide, mode: Mode, context: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut v = Vec::with_capacity(4);
    while Instant::now() < deadline {
        v.clear();
        side.ep.read(&mut v, 4);
        if v.iter().any(|c| c.context == context) {
            return true;
        }
        if mode == Mode::Sleep {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    false
}

/// The client half: sends its name and the configuration to `server`, then measures
/// each size (checking every echo with `opts.verify`).
pub fn client(side: &RdmSide, server: &[u8], opts: &Options) -> ToolResult<Vec<PpResult>> {
    let peer = side.av.insert(server).map_err(ctx("insert the server"))?;
    let plan = plan(opts);
    let cfg = encode_config(&plan, opts.warmup);
    let name = side.ep.name();
    if cfg.len() > CONFIG_MAX || name.len() > NAME_MAX {
        return Err("too many sizes".into());
    }
    let max = opts.sizes.iter().copied().max().unwrap_or(0).max(1);
    let mr = side
        .domain
        .alloc(
            2 * max + NAME_MAX + 2 + CONFIG_MAX,
            Access::LOCAL | Access::REMOTE_READ,
        )
        .map_err(ctx("register buffers"))?;
    let mut msg = (name.len() as u16).to_le_bytes().to_vec();
    msg.extend_from_slice(&name);
    msg.extend_from_slice(&cfg);
    mr.write_at(2 * max, &msg).map_err(ctx("config"))?;
    side.post_send(&mr, 2 * max, msg.len(), peer, CFG_TAG, CFG_CTX)?;
    side.until(opts.mode, CFG_CTX)
        .map_err(|e| format!("configuration: {e}"))?;

    let mut results = Vec::with_capacity(plan.len());
    for &(size, iters) in &plan {
        let pattern: Vec<u8> = (0..size).map(|i| (i * 13 + size) as u8).collect();
        mr.write_at(0, &pattern).map_err(ctx("fill"))?;
        mr.fill(max, size, 0).map_err(ctx("clear"))?;
        let mut run = SizeRun::new(&mr, max, &pattern, iters, opts.warmup, opts.verify);
        for i in 0..run.rounds() {
            run.begin(i)?;
            side.post_recv(&mr, max, size, TAG, RECV_CTX)?;
            let t0 = Instant::now();
            side.post_send(&mr, 0, size, peer, TAG, SEND_CTX)?;
            let (mut sent, mut got) = (false, false);
            while !(sent && got) {
                let c = side
                    .next(opts.mode)
                    .map_err(|e| format!("size {size}, round trip {i}: {e}"))?;
                match c.context {
                    SEND_CTX => sent = true,
                    RECV_CTX => {
                        if c.len != size {
                            return Err(format!("echo of {} bytes, expected {size}", c.len));
                        }
                        if side.tagged && c.tag != TAG {
                            return Err(format!("echo with tag {:#x}, expected {TAG:#x}", c.tag));
                        }
                        if c.src != Some(peer) {
                            return Err(format!(
                                "echo from {:?}, expected the server {peer:?}",
                                c.src
                            ));
                        }
                        got = true
                    }
                    other => return Err(format!("unexpected completion context {other}")),
                }
            }
            run.end(i, t0)?;
        }
        results.push(run.result());
    }
    mr.write_at(2 * max, b"done").map_err(ctx("done"))?;
    // "done", and the server's "bye" before leaving (see `server`). Every echo was
    // checked already: a "done" or "bye" that does not come within LINGER only ends
    // the run later, it is not an error of the measurement.
    side.post_recv(&mr, 2 * max + 8, 4, DONE_TAG, BYE_CTX)?;
    side.post_send(&mr, 2 * max, 4, peer, DONE_TAG, DONE_CTX)?;
    wait_for(side, opts.mode, BYE_CTX, LINGER);
    Ok(results)
}

/// The name of the server endpoint at `dest:port`, for a client.
pub fn server_name(dest: &str, port: u16) -> ToolResult<Vec<u8>> {
    let ip: std::net::IpAddr = dest
        .parse()
        .map_err(|_| format!("{dest}: not an IP address"))?;
    encode_name(&Address::Inet(std::net::SocketAddr::new(ip, port))).map_err(ctx("name"))
}

/// Runs both halves in this process over `node` (a loopback address): the server in a
/// thread, the client here, each with its own fabric.
pub fn run_self(
    provider: &str,
    node: &str,
    tagged: bool,
    opts: &Options,
) -> ToolResult<Vec<PpResult>> {
    let (tx, rx) = mpsc::channel::<ToolResult<Vec<u8>>>();
    let (p, n, mode) = (provider.to_string(), node.to_string(), opts.mode);
    let srv = std::thread::spawn(move || -> ToolResult<()> {
        let side = match open(&p, &n, 0, tagged) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let _ = tx.send(Ok(side.ep.name()));
        server(&side, mode)
    });
    let res = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "the server endpoint did not open".to_string())
        .and_then(|name| {
            let name = name?;
            let side = open(provider, node, 0, tagged)?;
            client(&side, &name, opts)
        });
    let srv = srv
        .join()
        .map_err(|_| "the server thread panicked".to_string())?;
    match (res, srv) {
        (Ok(r), Ok(())) => Ok(r),
        (Ok(_), Err(e)) => Err(format!("server: {e}")),
        (Err(e), Ok(())) => Err(format!("client: {e}")),
        (Err(c), Err(s)) => Err(format!("client: {c}; server: {s}")),
    }
}
