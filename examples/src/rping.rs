//! rdma-core's `rping` (librdmacm/examples/rping.c) over the fabric API, so that a
//! stock `rping` on Linux (kernel rxe or RoCE hardware, connected through rdma_cm)
//! is a peer of softroce, in both roles.
//!
//! The protocol, per ping (rping.c's comment and code):
//! 1. the client fills its source buffer (`rdma-ping-<n>: ` and then the letters
//!    `A`..`z` cycling from a start that moves by one per ping, the last byte 0) and
//!    SENDs `struct rping_rdma_info { be64 buf; be32 rkey; be32 size; }` for it;
//! 2. the server RDMA READs that many bytes, then SENDs a 16-byte "go ahead";
//! 3. the client SENDs the same info for its sink buffer;
//! 4. the server RDMA WRITEs the data it read (its `strlen + 1` bytes) into the sink,
//!    then SENDs another "go ahead";
//! 5. with `-V` the client compares source and sink.
//!
//! Every receive must be exactly 16 bytes (rping calls anything else bogus). The
//! client ends with a disconnect (IB CM DREQ); the server ends when it sees it. Here
//! both roles also check every ping's data against the pattern with `-V` (rping's
//! server checks nothing). Connection management is IB CM over QP1 with rdma_cm's
//! header, service `RDMA_PS_TCP` port (default 7174), as `rping` uses: [`run`] sets
//! `SOFTROCE_CM=ib` unless the environment chose.

use std::time::{Duration, Instant};

use fabric::{Access, CompFlags, Completion, Event, MemoryRegion, Progress, RemoteIov};

use crate::conn::{self, Side};
use crate::ToolResult;

/// rping's default port.
pub const DEFAULT_PORT: u16 = 7174;
/// rping's smallest size (`sizeof "2147483647" + sizeof "rdma-ping-%d: "`).
pub const MIN_SIZE: usize = 26;
/// rping's largest size (`RPING_BUFSIZE - 1`).
pub const MAX_SIZE: usize = 64 * 1024 - 1;
/// Size of `struct rping_rdma_info`.
pub const INFO_LEN: usize = 16;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Provider (softroce: the one that speaks IB CM).
    pub provider: String,
    /// Server: the address to listen on; client: the server's.
    pub addr: String,
    /// Client: the local address to connect from (rping -I).
    pub src: Option<std::net::IpAddr>,
    /// Port (rping -p).
    pub port: u16,
    /// Ping size (rping -S).
    pub size: usize,
    /// Pings (rping -C); the server serves until the client disconnects, or this
    /// many when non-zero.
    pub count: usize,
    /// Check the data (rping -V).
    pub validate: bool,
    /// Print each ping's data (rping -v).
    pub verbose: bool,
    /// How long to wait for the peer to connect and for each step.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            provider: "softroce".into(),
            addr: String::new(),
            src: None,
            port: DEFAULT_PORT,
            size: 64,
            count: 0,
            validate: false,
            verbose: false,
            timeout: Duration::from_secs(30),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The softroce device's counters and its IB CM's, read at the end (softroce
    /// only), as one line of text.
    pub device: Option<String>,
    /// Pings completed.
    pub pings: usize,
    /// Pings whose data was checked and matched.
    pub verified: usize,
    /// The peer disconnected (server: how a run ends).
    pub peer_disconnected: bool,
}

/// The data of ping `n` as rping's client writes it into its `size`-byte buffer.
pub fn ping_data(n: usize, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    let text = format!("rdma-ping-{n}: ");
    let cc = text.len();
    let k = cc.min(size.saturating_sub(1));
    b[..k].copy_from_slice(&text.as_bytes()[..k]);
    // rping: `start` begins at 65 and moves by one per ping, wrapping after 122.
    let mut c = 65 + (n % 58) as u8;
    for x in b.iter_mut().take(size).skip(cc) {
        *x = c;
        c += 1;
        if c > 122 {
            c = 65;
        }
    }
    if size > 0 {
        b[size - 1] = 0;
    }
    b
}

fn encode_info(addr: u64, key: u64, size: u32) -> [u8; INFO_LEN] {
    let mut b = [0u8; INFO_LEN];
    b[..8].copy_from_slice(&addr.to_be_bytes());
    b[8..12].copy_from_slice(&(key as u32).to_be_bytes());
    b[12..].copy_from_slice(&size.to_be_bytes());
    b
}

fn decode_info(b: &[u8]) -> (u64, u32, u32) {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (
        u64::from_be_bytes(a),
        u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
    )
}

/// Layout of the one registered region: send info, receive info, then the buffers.
const SEND_OFF: usize = 0;
const RECV_OFF: usize = 64;
const BUF_OFF: usize = 128;

/// Contexts of the operations.
const CTX_SEND: u64 = 1;
const CTX_RECV: u64 = 2;
const CTX_RMA: u64 = 3;

enum Waited {
    Done(Completion),
    Disconnected,
}

/// One end's connection, its region and the completions read but not yet waited
/// for (a receive may complete before the send that preceded it is seen complete).
struct Ping<'a> {
    side: &'a Side,
    mr: MemoryRegion,
    pending: Vec<Completion>,
    t: Duration,
}

/// Waits for the completion with `context`, watching the event queue for the peer's
/// disconnect.
fn wait_for(p: &mut Ping<'_>, context: u64) -> ToolResult<Waited> {
    let (side, timeout) = (p.side, p.t);
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        got.clear();
        side.cq
            .read(&mut got, 16)
            .map_err(|e| format!("cq read: {e}"))?;
        p.pending.append(&mut got);
        if p.pending.len() > 2 {
            return Err(format!("unexpected completions: {:?}", p.pending));
        }
        if let Some(i) = p.pending.iter().position(|c| c.context == context) {
            let c = p.pending.remove(i);
            if let Err(e) = &c.status {
                return Err(format!("operation {context} failed: {e}"));
            }
            return Ok(Waited::Done(c));
        }
        let pending = &p.pending;
        if let Some(c) = pending.iter().find(|c| c.status.is_err()) {
            return Err(format!("completion failed: {c:?}"));
        }
        match side.eq.read().map_err(|e| format!("eq read: {e}"))? {
            Some(Event::Shutdown { .. }) => return Ok(Waited::Disconnected),
            Some(Event::Error { error, .. }) => return Err(format!("connection error: {error}")),
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("no completion {context} within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

fn done(w: Waited, what: &str) -> ToolResult<Completion> {
    match w {
        Waited::Done(c) => Ok(c),
        Waited::Disconnected => Err(format!("the peer disconnected while {what}")),
    }
}

fn region(side: &Side, len: usize) -> ToolResult<MemoryRegion> {
    side.domain
        .alloc(
            len,
            Access::SEND | Access::RECV | Access::READ | Access::WRITE | Access::REMOTE,
        )
        .map_err(|e| format!("register memory: {e}"))
}

fn post_recv(p: &Ping<'_>) -> ToolResult<()> {
    p.side
        .ep
        .recv(p.mr.iov(RECV_OFF, INFO_LEN), CTX_RECV)
        .map_err(|e| format!("post receive: {e}"))
}

fn recv_info(p: &mut Ping<'_>) -> ToolResult<Option<[u8; INFO_LEN]>> {
    let c = match wait_for(p, CTX_RECV)? {
        Waited::Done(c) => c,
        Waited::Disconnected => return Ok(None),
    };
    if !c.flags.contains(CompFlags::RECV) || c.len != INFO_LEN {
        return Err(format!("received bogus data, size {}", c.len));
    }
    let mut b = [0u8; INFO_LEN];
    p.mr.read_at(RECV_OFF, &mut b).map_err(|e| e.to_string())?;
    post_recv(p)?;
    Ok(Some(b))
}

fn send(p: &mut Ping<'_>, info: &[u8; INFO_LEN]) -> ToolResult<()> {
    p.mr.write_at(SEND_OFF, info).map_err(|e| e.to_string())?;
    p.side
        .ep
        .send(p.mr.iov(SEND_OFF, INFO_LEN), CTX_SEND)
        .map_err(|e| format!("post send: {e}"))?;
    done(wait_for(p, CTX_SEND)?, "sending")?;
    Ok(())
}

/// Makes softroce connect over IB CM (rdma_cm's wire), unless the environment chose.
pub fn use_ib_cm() {
    if std::env::var_os("SOFTROCE_CM").is_none() {
        std::env::set_var("SOFTROCE_CM", "ib");
    }
}

/// rping's server: accepts one client and serves it until it disconnects (or
/// `count` pings).
pub fn server(o: &Options) -> ToolResult<Outcome> {
    let l = conn::listen(&o.provider, &o.addr, o.port, Progress::Manual)?;
    eprintln!("fabric-rping: listening on {}:{}", o.addr, l.port);
    let side = l.accept(b"", o.timeout)?;
    serve(&side, o)
}

fn serve(side: &Side, o: &Options) -> ToolResult<Outcome> {
    // The READ lands in a buffer as large as any rping size.
    let mut p = Ping {
        side,
        mr: region(side, BUF_OFF + MAX_SIZE + 1)?,
        pending: Vec::new(),
        t: o.timeout,
    };
    post_recv(&p)?;
    let mut out = Outcome::default();
    let t = o.timeout;
    loop {
        if o.count != 0 && out.pings == o.count {
            break;
        }
        // 1. The client's source buffer.
        let Some(info) = recv_info(&mut p)? else {
            out.peer_disconnected = true;
            break;
        };
        let (addr, rkey, len) = decode_info(&info);
        let len = len as usize;
        if len == 0 || len > MAX_SIZE + 1 {
            return Err(format!("the client advertised {len} bytes"));
        }
        // 2. RDMA READ it.
        side.ep
            .read(
                p.mr.iov(BUF_OFF, len),
                RemoteIov {
                    addr,
                    len,
                    key: u64::from(rkey),
                },
                CTX_RMA,
            )
            .map_err(|e| format!("post RDMA READ: {e}"))?;
        done(wait_for(&mut p, CTX_RMA)?, "reading")?;
        let data = p.mr.to_vec(BUF_OFF, len).map_err(|e| e.to_string())?;
        if o.verbose {
            let end = data.iter().position(|&b| b == 0).unwrap_or(len);
            println!(
                "server ping data: {}",
                String::from_utf8_lossy(&data[..end])
            );
        }
        if o.validate {
            if data != ping_data(out.pings, len) {
                return Err(format!("ping {}: the data read is not rping's", out.pings));
            }
            out.verified += 1;
        }
        // 3. Go ahead.
        send(&mut p, &[0u8; INFO_LEN])?;
        // 4. The client's sink buffer, then RDMA WRITE strlen + 1 bytes into it.
        let Some(info) = recv_info(&mut p)? else {
            out.peer_disconnected = true;
            break;
        };
        let (addr, rkey, sink_len) = decode_info(&info);
        let n = data.iter().position(|&b| b == 0).map_or(len, |p| p + 1);
        if n > sink_len as usize {
            return Err(format!(
                "the client's sink of {sink_len} bytes is too small"
            ));
        }
        side.ep
            .write(
                p.mr.iov(BUF_OFF, n),
                RemoteIov {
                    addr,
                    len: n,
                    key: u64::from(rkey),
                },
                CTX_RMA,
            )
            .map_err(|e| format!("post RDMA WRITE: {e}"))?;
        done(wait_for(&mut p, CTX_RMA)?, "writing")?;
        // 5. Go ahead.
        send(&mut p, &[0u8; INFO_LEN])?;
        out.pings += 1;
    }
    if !out.peer_disconnected {
        // Served `count` pings: wait for the client's disconnect.
        let deadline = Instant::now() + t;
        while Instant::now() < deadline {
            if let Some(Event::Shutdown { .. }) = side.eq.read().map_err(|e| e.to_string())? {
                out.peer_disconnected = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let _ = side.ep.shutdown();
    out.device = conn::device_line(side);
    Ok(out)
}

/// rping's client: `count` pings (at least one), then a disconnect.
pub fn client(o: &Options) -> ToolResult<Outcome> {
    let side = conn::connect_from(
        &o.provider,
        &o.addr,
        o.port,
        o.src,
        b"",
        Progress::Manual,
        o.timeout,
    )?;
    ping(&side, o)
}

fn ping(side: &Side, o: &Options) -> ToolResult<Outcome> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&o.size) {
        return Err(format!(
            "size {}: rping's range is {MIN_SIZE} to {MAX_SIZE}",
            o.size
        ));
    }
    let size = o.size;
    let mut p = Ping {
        side,
        mr: region(side, BUF_OFF + 2 * size)?,
        pending: Vec::new(),
        t: o.timeout,
    };
    let (start_off, sink_off) = (BUF_OFF, BUF_OFF + size);
    let base = p.mr.remote();
    post_recv(&p)?;
    let mut out = Outcome::default();
    for n in 0..o.count.max(1) {
        let data = ping_data(n, size);
        p.mr.write_at(start_off, &data).map_err(|e| e.to_string())?;
        p.mr.fill(sink_off, size, 0).map_err(|e| e.to_string())?;
        let info = encode_info(base.addr + start_off as u64, base.key, size as u32);
        send(&mut p, &info)?;
        if recv_info(&mut p)?.is_none() {
            out.peer_disconnected = true;
            break;
        }
        let info = encode_info(base.addr + sink_off as u64, base.key, size as u32);
        send(&mut p, &info)?;
        if recv_info(&mut p)?.is_none() {
            out.peer_disconnected = true;
            break;
        }
        let sink = p.mr.to_vec(sink_off, size).map_err(|e| e.to_string())?;
        if o.verbose {
            let end = sink.iter().position(|&b| b == 0).unwrap_or(size);
            println!("ping data: {}", String::from_utf8_lossy(&sink[..end]));
        }
        if o.validate {
            if sink != data {
                return Err(format!("ping {n}: data mismatch"));
            }
            out.verified += 1;
        }
        out.pings += 1;
    }
    side.ep.shutdown().map_err(|e| format!("disconnect: {e}"))?;
    // The DREP, for the CM's counters (bounded: an answer or its timeout).
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        let _ = side.eq.read();
        std::thread::sleep(Duration::from_millis(1));
    }
    out.device = conn::device_line(side);
    Ok(out)
}

/// Runs the role `o` asks for (`server` true: rping -s).
pub fn run(server_role: bool, o: &Options) -> ToolResult<Outcome> {
    use_ib_cm();
    if server_role {
        server(o)
    } else {
        client(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_data_is_rpings() {
        // Ping 0: the text, then letters from 'A' (65); the last byte 0.
        let d = ping_data(0, 64);
        assert_eq!(&d[..13], b"rdma-ping-0: ");
        assert_eq!(&d[13..16], b"ABC");
        assert_eq!(d[63], 0);
        // Each ping starts one letter later.
        assert_eq!(&ping_data(1, 64)[13..16], b"BCD");
        // The start wraps after 'z' (122), and so do the letters.
        let d = ping_data(57, 64);
        assert_eq!(&d[..14], b"rdma-ping-57: ");
        assert_eq!(&d[14..17], b"zAB");
        assert_eq!(ping_data(58, 64)[14], b'A');
        assert!(d[..63].iter().all(|&b| b != 0));
        // A size shorter than the text: the text cut, no letters.
        assert_eq!(ping_data(5, 8), b"rdma-pi\0");
    }

    #[test]
    fn info_round_trip() {
        let b = encode_info(0x1122_3344_5566_7788, 0xAABB_CCDD, 64);
        assert_eq!(&b[..8], &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        assert_eq!(decode_info(&b), (0x1122_3344_5566_7788, 0xAABB_CCDD, 64));
    }

    /// Both roles in one process over softroce and IB CM on a loopback address:
    /// 20 pings of 1000 bytes, data checked on both sides.
    #[test]
    fn server_and_client_over_ib_cm() {
        // The client's device connects over IB CM (as SOFTROCE_CM=ib, which `run`
        // sets; the environment is left alone here, other tests share it).
        let sip = fabric_softroce::free_loopback_ip().unwrap();
        let cip = loop {
            let c = fabric_softroce::free_loopback_ip().unwrap();
            if c != sip {
                break c;
            }
        };
        fabric_softroce::configure_device(
            cip,
            fabric_softroce::DeviceConfig {
                cm: Some(fabric_softroce::CmProtocol::Ib),
                ..Default::default()
            },
        )
        .unwrap();
        let o = Options {
            addr: sip.to_string(),
            port: 0,
            size: 1000,
            count: 20,
            validate: true,
            timeout: Duration::from_secs(20),
            ..Options::default()
        };
        let l = conn::listen(&o.provider, &o.addr, 0, Progress::Manual).unwrap();
        let port = l.port;
        let so = o.clone();
        let srv = std::thread::spawn(move || {
            let side = l.accept(b"", so.timeout)?;
            let out = serve(&side, &Options { count: 0, ..so });
            Ok::<_, String>((out?, fabric_softroce::ibcm::ibcm_stats(sip)))
        });
        let side = conn::connect_from(
            &o.provider,
            &o.addr,
            port,
            Some(cip.into()),
            b"",
            Progress::Manual,
            o.timeout,
        )
        .unwrap();
        let c = ping(&side, &o).unwrap();
        // Over QP1: the client's CM got the REP (and the DREP, maybe).
        let cst = fabric_softroce::ibcm::ibcm_stats(cip).expect("the client's IB CM");
        assert!(cst.engine.received >= 1, "{cst:?}");
        let (s, sst) = srv.join().unwrap().unwrap();
        let sst = sst.expect("the server's IB CM");
        assert!(sst.engine.received >= 3, "REQ, RTU, DREQ: {sst:?}");
        assert_eq!(sst.engine.malformed + cst.engine.malformed, 0);
        assert_eq!((c.pings, c.verified), (20, 20));
        assert_eq!((s.pings, s.verified), (20, 20));
        assert!(s.peer_disconnected);
    }
}
