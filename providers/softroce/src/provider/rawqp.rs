//! [`RawQp`]: a softroce RC queue pair connected out of band, for peers that are not
//! fabric endpoints (`ibv_rc_pingpong` and other verbs programs that exchange
//! LID:QPN:PSN:GID themselves). The fabric API is untouched: this is a
//! softroce-specific side door onto the same devices.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fabric_core::{CompFlags, Error, ErrorKind, Fid};
use parking_lot::Mutex;

use super::device::{self, CompQueue, Device, Reporting};
use crate::rc::{self, ib_timeout, LocalSegment, Mtu, RemoteAccess, SendOp, SendWr, VecMemory};
use crate::DeviceStats;

/// Longest a [`RawQp::poll`] sleeps before looking again.
const MAX_SLEEP: Duration = Duration::from_millis(10);

/// Receives a [`RawQp`] may have posted at once.
pub const RAW_QP_MAX_RECV: usize = 4096;
/// Sends a [`RawQp`] may have outstanding at once.
pub const RAW_QP_MAX_SEND: usize = 1024;

/// A reliable-connected queue pair on the softroce device of one IPv4 address,
/// connected by the caller with the peer's QPN, PSN and address (exchanged out of
/// band, as `ibv_rc_pingpong` does over TCP), with SEND/RECV only. Its QP number
/// and starting PSN are what the caller sends the peer.
///
/// The peer's packets are accepted from the peer's address only, from the source
/// port given to [`connect`](Self::connect) or, without one, from the port of the
/// peer's first packet (kernel rxe sends from a per-QP port `0xC000 | hash(qpn)`).
/// The QP uses rxe's wire defaults for such peers: retry_cnt 7, rnr_retry 7, the
/// IB timeout code 14 of `ibv_rc_pingpong` (67 ms), max_dest_rd_atomic 16.
///
/// ```no_run
/// # fn main() -> Result<(), fabric_core::Error> {
/// use std::net::Ipv4Addr;
/// use std::time::Duration;
/// use fabric_softroce::RawQp;
/// let qp = RawQp::open(Ipv4Addr::new(192, 168, 100, 1))?;
/// // ... send qp.qpn(), qp.psn() to the peer, receive its QPN and PSN ...
/// # let (peer_qpn, peer_psn) = (0x11, 0);
/// qp.connect(Ipv4Addr::new(192, 168, 100, 2), peer_qpn, peer_psn, 1024, None)?;
/// qp.post_recv(1, 4096)?;
/// qp.post_send(2, b"ping".to_vec())?;
/// while let Some(c) = qp.poll(Duration::from_secs(1))? {
///     println!("{} completed, {} bytes", c.context, c.len);
/// }
/// # Ok(()) }
/// ```
pub struct RawQp {
    dev: Arc<Device>,
    qpn: u32,
    psn: u32,
    rep: Arc<Reporting>,
    recvs: Mutex<HashMap<u64, Arc<VecMemory>>>,
}

/// A completion of a [`RawQp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCompletion {
    /// The context given when posting.
    pub context: u64,
    /// A receive (else a send).
    pub recv: bool,
    /// Bytes sent or received.
    pub len: usize,
    /// For a receive: the bytes received.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for RawQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawQp")
            .field("ip", &self.dev.ip())
            .field("qpn", &self.qpn)
            .field("psn", &self.psn)
            .finish()
    }
}

impl RawQp {
    /// A QP in INIT on the device of `ip` (created, with its socket on `ip:4791`, if
    /// this process has none), with a random starting PSN.
    pub fn open(ip: Ipv4Addr) -> Result<RawQp, Error> {
        let dev = Device::get(ip)?;
        let rep = Arc::new(Reporting {
            fid: Fid::next(),
            tx_cq: Arc::new(CompQueue::new()?),
            rx_cq: Arc::new(CompQueue::new()?),
            owner: OnceLock::new(),
        });
        let table: Arc<dyn rc::RemoteMemoryTable> = Arc::new(rc::KeyTable::new());
        let qpn = dev.create_qp(table, rep.clone())?;
        Ok(RawQp {
            dev,
            qpn,
            psn: rand::random::<u32>() & 0xFF_FFFF,
            rep,
            recvs: Mutex::new(HashMap::new()),
        })
    }

    /// This QP's number (24 bits).
    pub fn qpn(&self) -> u32 {
        self.qpn
    }

    /// The PSN of this QP's first packet (24 bits).
    pub fn psn(&self) -> u32 {
        self.psn
    }

    /// The device's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.dev.ip()
    }

    /// The counters of this QP's device (shared with every other user of the address).
    pub fn device_stats(&self) -> Option<DeviceStats> {
        crate::device_stats(self.dev.ip())
    }

    /// Connects to the peer QP `peer_qpn` at `peer` (RoCEv2, UDP port 4791) whose
    /// first packet has PSN `peer_psn`, with path MTU `mtu` (256..4096). Packets are
    /// accepted from `peer` only and from `peer_port` (`None`: the port of the first
    /// one).
    pub fn connect(
        &self,
        peer: Ipv4Addr,
        peer_qpn: u32,
        peer_psn: u32,
        mtu: u32,
        peer_port: Option<u16>,
    ) -> Result<(), Error> {
        let mtu = Mtu::from_bytes(mtu).ok_or_else(|| {
            Error::invalid(format!("path MTU {mtu}: one of 256, 512, 1024, 2048, 4096"))
        })?;
        if peer_qpn > 0xFF_FFFF || peer_psn > 0xFF_FFFF {
            return Err(Error::invalid("QPN and PSN are 24-bit values"));
        }
        let rtr = self.dev.rtr(mtu, peer_qpn, peer_psn, peer);
        let rts = device::rts(self.psn, ib_timeout(14));
        self.dev.connect_qp(self.qpn, rtr, rts, peer_port)
    }

    /// Posts a SEND of `data`; its completion carries `context`.
    pub fn post_send(&self, context: u64, data: Vec<u8>) -> Result<(), Error> {
        let len = data.len();
        let len32 = u32::try_from(len).map_err(|_| Error::invalid("message over 4 GiB"))?;
        let local = (len > 0).then(|| {
            let mem: Arc<dyn rc::LocalMemory> =
                Arc::new(VecMemory::from_vec(data, 0, RemoteAccess::NONE));
            LocalSegment::new(mem, 0, len32)
        });
        self.dev.with_qp(self.qpn, |slot| {
            if slot.state() != rc::QpState::Rts {
                return Err(Error::new(
                    ErrorKind::NotConnected,
                    format!("the queue pair is {:?}, not RTS", slot.state()),
                ));
            }
            if slot.outstanding() >= RAW_QP_MAX_SEND {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    "too many sends outstanding",
                ));
            }
            let wr_id = slot.track(context, CompFlags::MSG | CompFlags::SEND, len, true, 1);
            slot.post_send(SendWr {
                wr_id,
                op: SendOp::Send,
                local,
            })
            .map_err(|e| {
                slot.untrack(wr_id);
                Error::new(ErrorKind::Other, e.to_string())
            })
        })
    }

    /// Posts a receive of up to `len` bytes; its completion carries `context` (which
    /// must not be that of another receive still posted) and the bytes.
    pub fn post_recv(&self, context: u64, len: usize) -> Result<(), Error> {
        let len32 = u32::try_from(len).map_err(|_| Error::invalid("receive over 4 GiB"))?;
        let mut recvs = self.recvs.lock();
        if recvs.len() >= RAW_QP_MAX_RECV {
            return Err(Error::new(
                ErrorKind::WouldBlock,
                "too many receives posted",
            ));
        }
        if recvs.contains_key(&context) {
            return Err(Error::invalid(format!(
                "receive {context} is already posted"
            )));
        }
        let mem = Arc::new(VecMemory::new(len, 0, RemoteAccess::NONE));
        let local = (len > 0).then(|| {
            let m: Arc<dyn rc::LocalMemory> = mem.clone();
            LocalSegment::new(m, 0, len32)
        });
        self.dev.with_qp_quiet(self.qpn, |slot| {
            slot.post_recv(context, local)
                .map_err(|e| Error::new(ErrorKind::Other, e.to_string()))
        })?;
        recvs.insert(context, mem);
        Ok(())
    }

    /// The next completion, waiting up to `timeout` for one (`Ok(None)`: none came).
    /// An error completion (retries exhausted, the QP in error, a receive too small)
    /// is an `Err` naming the operation's context.
    pub fn poll(&self, timeout: Duration) -> Result<Option<RawCompletion>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            self.dev.progress(true);
            if let Some(c) = self
                .rep
                .rx_cq
                .pop()
                .map(|c| (c, true))
                .or_else(|| self.rep.tx_cq.pop().map(|c| (c, false)))
            {
                return self.complete(c.0, c.1).map(Some);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let mut wait = MAX_SLEEP.min(deadline - now);
            self.dev.release_acks(false);
            if let Some(t) = self.dev.next_timer() {
                wait = wait.min(t);
            }
            let fds = self.dev.fds();
            self.dev.begin_sleep();
            fabric_core::wait::poll_readable(&fds, Some(wait));
            self.dev.end_sleep();
        }
    }

    fn complete(&self, c: fabric_core::Completion, recv: bool) -> Result<RawCompletion, Error> {
        let mem = if recv {
            self.recvs.lock().remove(&c.context)
        } else {
            None
        };
        if let Err(e) = c.status {
            return Err(Error::new(
                ErrorKind::Other,
                format!("operation {}: {e}", c.context),
            ));
        }
        let mut data = Vec::new();
        if let Some(m) = mem {
            data = m.to_vec();
            data.truncate(c.len);
        }
        Ok(RawCompletion {
            context: c.context,
            recv,
            len: c.len,
            data,
        })
    }
}

impl Drop for RawQp {
    fn drop(&mut self) {
        self.dev.error_qp(self.qpn, true);
    }
}

/// The IPv4-mapped GID of `ip` (`::ffff:a.b.c.d`), as RoCEv2 devices list it.
pub fn ipv4_gid(ip: Ipv4Addr) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[10] = 0xFF;
    g[11] = 0xFF;
    g[12..].copy_from_slice(&ip.octets());
    g
}

/// The IPv4 address inside an IPv4-mapped GID, if it is one.
pub fn gid_ipv4(gid: &[u8; 16]) -> Option<Ipv4Addr> {
    (gid[..10].iter().all(|&b| b == 0) && gid[10] == 0xFF && gid[11] == 0xFF)
        .then(|| Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]))
}
