//! `fabric-pingpong --rc-pingpong`: rdma-core's `ibv_rc_pingpong` on softroce, so that
//! the stock program (kernel rxe, a RoCE NIC) is a peer, in either role.
//!
//! Out of band, as `ibv_rc_pingpong` (libibverbs/examples/rc_pingpong.c): the client
//! connects over TCP (port 18515 by default) and writes its address as the 52-byte
//! text `LLLL:QQQQQQ:PPPPPP:GGGG...` (LID, QPN and PSN in hex, the GID as 32 hex
//! digits of its bytes in order, then a NUL); the server reads it, moves its QP to
//! RTS, answers with its own, and the client writes `done\0`. The GID carries the
//! IPv4 address (`::ffff:a.b.c.d`, RoCEv2); the LID is 0.
//!
//! Then the message pattern: the client sends, and each side sends its next message
//! once its previous send and its receive have completed, `iters` times, every
//! message `size` bytes. The stock program sends from the buffer it receives into,
//! so it echoes what it last received (its first message, as client, is `size`
//! bytes of 0x7b): this side sends a different pattern each time (its k-th message
//! is pattern k, in both roles) and checks every byte of every message it receives
//! against what the peer must have sent (`verified` in the result). A server tells
//! the stock client (first message all 0x7b) from this tool (pattern 0).
//!
//! The QP is a [`fabric_softroce::RawQp`]: the fabric API has no out-of-band connect.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use fabric_softroce::{gid_ipv4, ipv4_gid, DeviceStats, RawQp};

/// Length of the exchanged address text, NUL included.
pub const MSG_LEN: usize = 52;
/// `ibv_rc_pingpong`'s default TCP port.
pub const DEFAULT_PORT: u16 = 18515;
/// What the stock program fills its buffer with before the first receive.
pub const INITIAL_FILL: u8 = 0x7b;

/// Settings of a run (both ends must agree on size, iterations and MTU, as with
/// `ibv_rc_pingpong -s -n -m`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Message size in bytes.
    pub size: usize,
    /// Messages each way.
    pub iters: usize,
    /// Path MTU (256..4096).
    pub mtu: u32,
    /// TCP port of the exchange.
    pub port: u16,
    /// Receives kept posted.
    pub rx_depth: usize,
    /// Longest the whole run may take.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            size: 4096,
            iters: 1000,
            mtu: 1024,
            port: DEFAULT_PORT,
            rx_depth: 64,
            timeout: Duration::from_secs(120),
        }
    }
}

/// The other side's address as exchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dest {
    /// LID (0 on RoCE).
    pub lid: u16,
    /// QP number.
    pub qpn: u32,
    /// First PSN.
    pub psn: u32,
    /// GID.
    pub gid: [u8; 16],
}

impl Dest {
    /// The 52-byte text form, NUL-terminated.
    pub fn encode(&self) -> [u8; MSG_LEN] {
        let gid: String = self.gid.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!(
            "{:04x}:{:06x}:{:06x}:{gid}",
            self.lid,
            self.qpn & 0xFF_FFFF,
            self.psn & 0xFF_FFFF
        );
        let mut out = [0u8; MSG_LEN];
        out[..text.len()].copy_from_slice(text.as_bytes());
        out
    }

    /// Parses the text form (up to its NUL).
    pub fn decode(msg: &[u8]) -> Result<Dest, String> {
        let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
        let text = std::str::from_utf8(&msg[..end])
            .map_err(|_| "the peer's address is not text".to_string())?;
        let bad = || format!("the peer's address '{text}' is not LID:QPN:PSN:GID");
        let mut parts = text.split(':');
        let mut hex = |max: u32| -> Result<u32, String> {
            let p = parts.next().ok_or_else(bad)?;
            let v = u32::from_str_radix(p, 16).map_err(|_| bad())?;
            if v > max {
                return Err(bad());
            }
            Ok(v)
        };
        let lid = hex(0xFFFF)? as u16;
        let qpn = hex(0xFF_FFFF)?;
        let psn = hex(0xFF_FFFF)?;
        let g = parts.next().ok_or_else(bad)?;
        if g.len() != 32 || parts.next().is_some() {
            return Err(bad());
        }
        let mut gid = [0u8; 16];
        for (i, b) in gid.iter_mut().enumerate() {
            *b = u8::from_str_radix(&g[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Dest { lid, qpn, psn, gid })
    }

    /// The IPv4 address of a RoCEv2 GID.
    pub fn ipv4(&self) -> Result<Ipv4Addr, String> {
        gid_ipv4(&self.gid).ok_or_else(|| {
            format!(
                "the peer's GID {} is not an IPv4-mapped RoCEv2 GID (run ibv_rc_pingpong \
                 with -g and the index of the device's ::ffff:a.b.c.d GID)",
                self.gid
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
        })
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// This side's address.
    pub local: Dest,
    /// The peer's.
    pub remote: Dest,
    /// Messages received and checked byte for byte.
    pub verified: usize,
    /// Time of the message loop.
    pub elapsed: Duration,
    /// The softroce device's counters after the run.
    pub stats: Option<DeviceStats>,
}

impl Outcome {
    /// `ibv_rc_pingpong`'s two result lines, plus the verification and the device.
    pub fn report(&self, o: &Options) -> String {
        let us = self.elapsed.as_secs_f64() * 1e6;
        let bytes = (o.size * o.iters * 2) as f64;
        let mut s = format!(
            "{} bytes in {:.2} seconds = {:.2} Mbit/sec\n{} iters in {:.2} seconds = {:.2} usec/iter\n\
             verified {} of {} received messages (every byte)\n",
            bytes as u64,
            us / 1e6,
            bytes * 8.0 / us,
            o.iters,
            us / 1e6,
            us / o.iters as f64,
            self.verified,
            o.iters
        );
        if let Some(st) = &self.stats {
            s += &format!(
                "softroce device {}: rx_packets {} tx_packets {} bad_packets {} \
                 wrong_source {} unknown_qp {}\n",
                gid_ipv4(&self.local.gid).map_or_else(String::new, |i| i.to_string()),
                st.rx_packets,
                st.tx_packets,
                st.bad_packets,
                st.wrong_source,
                st.unknown_qp
            );
        }
        s
    }
}

fn pattern(size: usize, k: usize) -> Vec<u8> {
    // Never all 0x7b, different for consecutive k.
    (0..size)
        .map(|j| (j.wrapping_mul(13) ^ k.wrapping_mul(0x9E) ^ (k >> 8)) as u8 ^ 0x5A)
        .collect()
}

fn local_dest(qp: &RawQp) -> Dest {
    Dest {
        lid: 0,
        qpn: qp.qpn(),
        psn: qp.psn(),
        gid: ipv4_gid(qp.ip()),
    }
}

fn v4(a: SocketAddr) -> Result<Ipv4Addr, String> {
    match a.ip() {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(ip) => ip
            .to_ipv4_mapped()
            .ok_or_else(|| format!("{a}: softroce is IPv4 only")),
    }
}

fn read_msg(s: &mut TcpStream) -> Result<[u8; MSG_LEN], String> {
    let mut m = [0u8; MSG_LEN];
    s.read_exact(&mut m)
        .map_err(|e| format!("reading the peer's address: {e}"))?;
    Ok(m)
}

/// The server role: listens on `listen:port`, serves one client.
pub fn server(listen: Ipv4Addr, o: &Options) -> Result<Outcome, String> {
    let l = TcpListener::bind((listen, o.port))
        .map_err(|e| format!("listen on {listen}:{}: {e}", o.port))?;
    eprintln!("rc-pingpong: waiting on {listen}:{}", o.port);
    let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    drop(l);
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let local_ip = v4(s.local_addr().map_err(|e| e.to_string())?)?;
    let qp = RawQp::open(local_ip).map_err(|e| format!("softroce on {local_ip}: {e}"))?;
    let local = local_dest(&qp);
    let remote = Dest::decode(&read_msg(&mut s)?)?;
    print_dests(&local, &remote);
    qp.connect(remote.ipv4()?, remote.qpn, remote.psn, o.mtu, None)
        .map_err(|e| e.to_string())?;
    let mut next_recv = post_recvs(&qp, o, 0)?;
    s.write_all(&local.encode())
        .map_err(|e| format!("sending our address: {e}"))?;
    // The client's "done" (its read of it may be short); then the TCP part is over.
    let mut done = [0u8; 8];
    let _ = s.read(&mut done);
    drop(s);
    let start = Instant::now();
    let deadline = start + o.timeout;
    let mut verified = 0;
    // The stock client's first message is all 0x7b and later ones echo ours; a
    // fabric-pingpong client sends its own k-th pattern.
    let mut stock_peer = None;
    let mut w = Waiter::new(&qp, deadline);
    for k in 0..o.iters {
        let got = w.recv(k)?;
        let expected = match stock_peer {
            None if got.len() == o.size && got.iter().all(|&b| b == INITIAL_FILL) => {
                stock_peer = Some(true);
                None
            }
            None => {
                stock_peer = Some(false);
                Some(pattern(o.size, 0))
            }
            Some(true) => Some(pattern(o.size, k - 1)),
            Some(false) => Some(pattern(o.size, k)),
        };
        check(&got, o.size, expected.as_deref(), k)?;
        verified += 1;
        next_recv = repost(&qp, o, next_recv)?;
        qp.post_send(k as u64, pattern(o.size, k))
            .map_err(|e| format!("send {k}: {e}"))?;
        w.send(k)?;
    }
    let elapsed = start.elapsed();
    linger(&qp);
    Ok(Outcome {
        local,
        remote,
        verified,
        elapsed,
        stats: qp.device_stats(),
    })
}

/// The client role: connects to `server` (host or address, `o.port`).
pub fn client(server: &str, o: &Options) -> Result<Outcome, String> {
    let addr = (server, o.port)
        .to_socket_addrs()
        .map_err(|e| format!("{server}: {e}"))?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| format!("{server}: no IPv4 address"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let local_ip = v4(s.local_addr().map_err(|e| e.to_string())?)?;
    let qp = RawQp::open(local_ip).map_err(|e| format!("softroce on {local_ip}: {e}"))?;
    let local = local_dest(&qp);
    s.write_all(&local.encode())
        .map_err(|e| format!("sending our address: {e}"))?;
    let remote = Dest::decode(&read_msg(&mut s)?)?;
    s.write_all(b"done\0")
        .map_err(|e| format!("sending done: {e}"))?;
    drop(s);
    print_dests(&local, &remote);
    qp.connect(remote.ipv4()?, remote.qpn, remote.psn, o.mtu, None)
        .map_err(|e| e.to_string())?;
    let mut next_recv = post_recvs(&qp, o, 0)?;
    let start = Instant::now();
    let deadline = start + o.timeout;
    let mut verified = 0;
    let mut w = Waiter::new(&qp, deadline);
    for k in 0..o.iters {
        let msg = pattern(o.size, k);
        qp.post_send(k as u64, msg.clone())
            .map_err(|e| format!("send {k}: {e}"))?;
        // The send's and the echo's completions, in either order.
        w.send(k)?;
        let echo = w.recv(k)?;
        check(&echo, o.size, Some(&msg), k)?;
        verified += 1;
        next_recv = repost(&qp, o, next_recv)?;
    }
    let elapsed = start.elapsed();
    linger(&qp);
    Ok(Outcome {
        local,
        remote,
        verified,
        elapsed,
        stats: qp.device_stats(),
    })
}

fn print_dests(local: &Dest, remote: &Dest) {
    for (what, d) in [("local", local), ("remote", remote)] {
        let gid = gid_ipv4(&d.gid).map_or_else(|| "?".into(), |i| format!("::ffff:{i}"));
        println!(
            "  {what} address:  LID 0x{:04x}, QPN 0x{:06x}, PSN 0x{:06x}, GID {gid}",
            d.lid, d.qpn, d.psn
        );
    }
}

/// Posts `rx_depth` receives with contexts from `first` on; returns the next context.
fn post_recvs(qp: &RawQp, o: &Options, first: u64) -> Result<u64, String> {
    for i in 0..o.rx_depth as u64 {
        qp.post_recv(first + i, o.size)
            .map_err(|e| format!("post receive: {e}"))?;
    }
    Ok(first + o.rx_depth as u64)
}

fn repost(qp: &RawQp, o: &Options, next: u64) -> Result<u64, String> {
    qp.post_recv(next, o.size)
        .map_err(|e| format!("post receive: {e}"))?;
    Ok(next + 1)
}

/// Completions in arrival order, handed out by kind (a receive may complete before
/// the send that preceded it is seen complete).
struct Waiter<'a> {
    qp: &'a RawQp,
    deadline: Instant,
    recvs: std::collections::VecDeque<Vec<u8>>,
    sends: usize,
}

impl<'a> Waiter<'a> {
    fn new(qp: &'a RawQp, deadline: Instant) -> Self {
        Waiter {
            qp,
            deadline,
            recvs: Default::default(),
            sends: 0,
        }
    }

    fn fill(&mut self, k: usize, what: &str) -> Result<(), String> {
        match self
            .qp
            .poll(self.deadline.saturating_duration_since(Instant::now()))
            .map_err(|e| format!("iteration {k}: {e}"))?
        {
            Some(c) if c.recv => self.recvs.push_back(c.data),
            Some(_) => self.sends += 1,
            None => return Err(format!("iteration {k}: timed out waiting for a {what}")),
        }
        Ok(())
    }

    fn recv(&mut self, k: usize) -> Result<Vec<u8>, String> {
        loop {
            if let Some(d) = self.recvs.pop_front() {
                return Ok(d);
            }
            self.fill(k, "receive")?;
        }
    }

    fn send(&mut self, k: usize) -> Result<(), String> {
        while self.sends == 0 {
            self.fill(k, "send completion")?;
        }
        self.sends -= 1;
        Ok(())
    }
}

/// Checks a received message: `size` bytes equal to `expected` (`None`: all 0x7b, the
/// stock program's first message, sent before it received anything).
fn check(got: &[u8], size: usize, expected: Option<&[u8]>, k: usize) -> Result<(), String> {
    if got.len() != size {
        return Err(format!(
            "iteration {k}: received {} bytes, expected {size}",
            got.len()
        ));
    }
    let bad = match expected {
        Some(s) => got.iter().zip(s).position(|(a, b)| a != b),
        None => got.iter().position(|&b| b != INITIAL_FILL),
    };
    match bad {
        None => Ok(()),
        Some(i) => Err(format!(
            "iteration {k}: byte {i} of the received message is {:#04x}, expected {:#04x}",
            got[i],
            expected.map_or(INITIAL_FILL, |s| s[i])
        )),
    }
}

/// Keeps the device running briefly so the last ACKs reach the peer (it may still be
/// waiting for the ACK of its last message) before the QP is destroyed.
fn linger(qp: &RawQp) {
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        let _ = qp.poll(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_text_round_trips_and_matches_rc_pingpong() {
        let d = Dest {
            lid: 0,
            qpn: 0x11,
            psn: 0xABCDEF,
            gid: ipv4_gid(Ipv4Addr::new(192, 168, 100, 2)),
        };
        let m = d.encode();
        assert_eq!(
            &m[..MSG_LEN - 1],
            b"0000:000011:abcdef:00000000000000000000ffffc0a86402"
        );
        assert_eq!(m[MSG_LEN - 1], 0);
        assert_eq!(Dest::decode(&m), Ok(d));
        assert_eq!(d.ipv4(), Ok(Ipv4Addr::new(192, 168, 100, 2)));
        for bad in [
            &b"0000:11:22"[..],
            b"zz:1:2:00",
            b"0000:1000000:0:00000000000000000000ffffc0a86402",
        ] {
            assert!(Dest::decode(bad).is_err());
        }
        let zero = Dest { gid: [0; 16], ..d };
        assert!(zero.ipv4().unwrap_err().contains("-g"));
    }

    /// Both roles of this module against each other over loopback softroce.
    #[test]
    fn server_and_client_against_each_other() {
        let ip = fabric_softroce::free_loopback_ip().unwrap();
        let port = {
            let l = TcpListener::bind((ip, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let o = Options {
            size: 5000,
            iters: 50,
            port,
            timeout: Duration::from_secs(30),
            ..Options::default()
        };
        let so = o.clone();
        let srv = std::thread::spawn(move || server(ip, &so));
        // The client uses another loopback address, so two devices talk.
        let mut c = None;
        for _ in 0..100 {
            match client(&ip.to_string(), &o) {
                Ok(r) => {
                    c = Some(r);
                    break;
                }
                Err(e) if e.contains("connect to") => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("client: {e}"),
            }
        }
        let c = c.expect("client ran");
        let s = srv.join().unwrap().expect("server");
        assert_eq!((s.verified, c.verified), (50, 50));
    }
}
