//! # fabric-tcp
//!
//! The tcp provider of the fabric API: reliable connected endpoints
//! ([`EpType::Msg`]) over TCP sockets, in pure Rust (rustix for epoll, socket2 for
//! socket creation and options; only `readv` / `sendmsg` over registered memory call
//! libc, as `unsafe fn` with their contract). It offers messages with remote CQ data, inject,
//! and RMA write / read / write-with-data emulated over the byte stream with a framing
//! of its own ([`wire`]): the target checks key, rights and bounds of every remote
//! access before touching memory and answers each write with an ACK, so remote access
//! errors always reach the initiator as error completions.
//!
//! - A refused remote access (bad key, bounds, rights, COMMIT into a region not
//!   registered PMEM) ends the connection at both ends, as the NAK of an RC queue pair
//!   does: the target answers with the refusal, ends its side (its outstanding
//!   operations complete `Canceled`, `Event::Shutdown { reason: AccessError }`) and
//!   acts on nothing the peer sends after it; the initiator completes the refused
//!   operation with `RemoteAccess` (`RemoteInvalid` for COMMIT), everything posted
//!   after it `Canceled`, and raises its own `Shutdown { reason: AccessError }`. The
//!   target closes its socket once the refusal is out and the peer has closed, at the
//!   latest after 2 s, so a reset cannot swallow the refusal.
//! - Posts to an endpoint whose connection has ended fail at the call with
//!   `NotConnected` (`Shutdown` when this side called `shutdown()`). Each end raises
//!   exactly one `Event::Shutdown` with its reason (`Local`, `Peer`, `Lost`,
//!   `AccessError`, `Protocol`).
//! - A write with remote CQ data completes at the initiator once the CQ data has
//!   consumed a receive at the target (the target holds its ACK until then), as RNR
//!   holds an RC write-with-immediate.
//!
//! - Completion levels: sends complete when handed to the socket (transmit), or on the
//!   target's ACK after placement with `DELIVERY_COMPLETE`; writes complete on the
//!   target's ACK (delivery: placed and visible, not necessarily durable) unless they
//!   name `TRANSMIT_COMPLETE` or `INJECT_COMPLETE` as their level and carry no CQ
//!   data: those complete when handed to the socket and the target sends no ACK for
//!   them (libfabric's tcp provider acknowledges delivery and commit only). A refused
//!   transmit-level write has completed already; the refusal still ends the
//!   connection at both ends (`Shutdown { reason: AccessError }`), and what was posted
//!   after it completes `Canceled`, as after any refusal. Reads complete
//!   when the response has landed. Writes with `COMMIT_COMPLETE` complete when the data
//!   is durable at the target (see "Persistent memory" below).
//! - Receives match in FIFO order; a message that finds no receive is buffered (up to
//!   64 MiB per endpoint, then the socket is no longer read and TCP flow control
//!   pushes back on the sender).
//! - Large payloads move between registered memory and the socket with
//!   `sendmsg`/`readv` directly, without a staging copy.
//! - Progress is manual (reading a queue moves data) unless the info asks for
//!   [`Progress::Auto`](fabric_core::Progress::Auto) or an async waiter registers,
//!   which starts a background thread. Blocking reads sleep; they never spin.
//! - Limits: max_msg_size 1 GiB, inject_size 4096 (one page: copied at the call, it
//!   fits one socket write next to its header and costs well under a microsecond to
//!   copy), 8-byte keys and CQ data, 8 local and 8 remote iovecs, 256 bytes of
//!   connection data, tx_size / rx_size 1024. Memory registration mode `PROV_KEY`:
//!   keys are random non-zero 64-bit values and remote addresses are offsets
//!   (`base_addr` 0).
//! - `Hints::mr_key_size(4)` (per getinfo call, as libfabric's `domain_attr` hint), or
//!   `FABRIC_TCP_KEY_SIZE=4` in the environment (read by getinfo), narrows
//!   `limits.mr_key_size` to 4: domains opened from that info hand out random non-zero
//!   32-bit keys, for protocols that carry 32-bit keys (NVMe-oF keyed SGLs). `8` or
//!   unset is the default; any other value makes getinfo skip the provider with a
//!   reason.
//! - The provider is built on fabric-core's shared layer (`fabric_core::prov`): its
//!   queues are `ProviderCq`/`ProviderEq` over the engine's `Progress`, its keys a
//!   `KeyMap` whose `verify` is the one remote-access check, payloads land through a
//!   `ScatterList` cursor.
//!
//! ## Limits: what a peer can make this side hold
//! Every queue a peer can fill has a bound; past it the provider stops reading that
//! peer (TCP flow control then slows it) or closes what it holds. The bounds are
//! constants of the provider, not settings yet: to change one, change the constant
//! named and rebuild.
//! - Unexpected messages (no receive posted): 64 MiB and 65,536 messages per
//!   connection (`conn::UNEXPECTED_LIMIT`, `UNEXPECTED_MAX_ENTRIES`); then the
//!   connection is no longer read until receives are posted.
//! - Answers the peer has not read (ACKs, READ responses): 4,096 per connection
//!   (`conn::TX_ANSWER_LIMIT`); then the connection is no longer read until the peer
//!   takes some. A peer within its `tx_size` (1,024 outstanding operations) never
//!   reaches it. Measured (tests/hostile.rs): 500,000 unread READ requests grew the
//!   server by ~140 MiB without the bound, ~4.4 MiB with it.
//! - A peer that closes while its connection is not being read (a full buffer,
//!   unread answers) is still noticed: the socket is watched for the peer's end of
//!   stream (EPOLLRDHUP) and the connection ends (`Shutdown { reason: Peer }`, its
//!   buffers freed) within one progress call. A peer that closes with more unsent
//!   data than the socket buffers hold is noticed only when its kernel gives up and
//!   resets the connection: its FIN waits behind the data this side does not read.
//! - Listener (per fabric): at most 128 accepted connections whose connection request
//!   has not fully arrived ("half-open"); one more closes the oldest. A half-open
//!   connection has 10 s to send its request (as softroce's), then it is closed
//!   (`fabric_core::prov::HALF_OPEN_MAX`, `HALF_OPEN_AGE`). When accept fails for want
//!   of descriptors (EMFILE / ENFILE) the listening socket is left unpolled for 100 ms
//!   (`engine::ListenLimits::accept_backoff`; the pending connection waits in the
//!   kernel's backlog) instead of being polled in a busy loop.
//! - Memory of an operation posted locally is the application's; local posts are
//!   bounded by `tx_size` / `rx_size` (1,024 each).
//!
//! A send completes once handed to the socket, unless a write or read posted before
//! it still waits for its answer: then its success waits for that answer, because a
//! refused access cancels everything posted after it (the target acts on nothing
//! after the refusal).
//!
//!
//! ## Persistent memory (`RMA_PMEM`, `COMMIT_COMPLETE`)
//! The provider offers [`Caps::RMA_PMEM`]: memory whose
//! [`MemoryBacking::supports_persist`](fabric_core::MemoryBacking::supports_persist) is
//! true (a `pmem::Mapping`, or any backing of your own)
//! can be registered [`MrFlags::PMEM`](fabric_core::MrFlags::PMEM), and a write posted
//! with [`OpFlags::COMMIT_COMPLETE`](fabric_core::OpFlags::COMMIT_COMPLETE) carries the
//! wire flag `COMMIT`. The target then
//! 1. checks, with key, rights and bounds and before touching memory, that every remote
//!    iovec lies in a region registered `PMEM`; if one does not, it discards the payload,
//!    leaves memory untouched and answers `NOT_PMEM`, which the initiator reports as
//!    [`CqErrorKind::RemoteInvalid`](fabric_core::CqErrorKind::RemoteInvalid)
//!    ("region is not registered PMEM");
//! 2. places the data (non-temporal stores into `UNCACHED` regions);
//! 3. calls [`MemoryBacking::persist`](fabric_core::MemoryBacking::persist) on every
//!    written range, and only then sends the ACK. If a persist fails the answer is
//!    `OPERATION_FAILED`, reported as
//!    [`CqErrorKind::RemoteOperation`](fabric_core::CqErrorKind::RemoteOperation):
//!    nothing is acknowledged as durable that is not.
//!
//! The successful completion carries
//! [`CompFlags::COMMIT`](fabric_core::CompFlags::COMMIT). Remote CQ data and several
//! local and remote iovecs work as for any write. Persisting runs on the target's
//! progress thread (or whichever thread drives progress), so a slow msync delays the
//! other connections that engine serves.
//!
//! What "durable" means is the backing's persistence domain:
//! - true pmem (`MAP_SYNC` on a DAX file system, or device DAX): durable when the
//!   cache-line flush + SFENCE returns; survives power loss;
//! - a page-cache file mapping (ext4, xfs...): durable after `msync(MS_SYNC)`; survives
//!   a crash of the target process and, on a file system backed by a real block device
//!   that honours cache flushes, a power loss;
//! - tmpfs (`/dev/shm`): msync succeeds but there is no device behind it: the data
//!   survives the target process, not a reboot;
//! - heap memory cannot be registered `PMEM` at all (fabric-core refuses it).
//!
//! `INJECT | COMMIT_COMPLETE` on `writemsg` is accepted: the target persists
//! the data before it acks as for any commit, but an inject generates no success
//! completion, so the initiator learns of durability only through a later operation
//! on the same endpoint: the target handles one connection's writes in order, so the
//! successful COMMIT completion of a later write means the earlier injected ones were
//! persisted too. A refused one still reports an error completion, as errors always do.
//!
//! ## Example
//! A server and a client in one process exchange a message over loopback:
//! ```
//! use fabric_core::*;
//! use std::time::Duration;
//!
//! # fn main() -> Result<()> {
//! let registry = Registry::new().with(fabric_tcp::provider());
//! let t = Duration::from_secs(5);
//! // Server: listen on an ephemeral loopback port.
//! let hints = Hints::new().caps(Caps::MSG).ep_type(EpType::Msg).provider("tcp");
//! let sinfo = registry.getinfo(&hints.clone().source(true).node("127.0.0.1").service(0))?.remove(0);
//! let fabric = Fabric::open(&sinfo)?;
//! let domain = fabric.domain(&sinfo)?;
//! let eq = fabric.eq(EqAttr::default())?;
//! let cq = domain.cq(CqAttr::default())?;
//! let pep = fabric.passive_endpoint(&sinfo, &eq)?;
//! pep.listen()?;
//! let port = pep.local_addr()?.as_inet().unwrap().port();
//!
//! // Client: connect with some connection data.
//! let cinfo = registry.getinfo(&hints.node("127.0.0.1").service(port))?.remove(0);
//! let client = domain.endpoint(&cinfo, EndpointConfig::new(&cq, &eq))?;
//! client.connect(b"hi")?;
//!
//! // Server: accept the request.
//! let req = match eq.wait(t)? {
//!     Event::ConnRequest(r) => r,
//!     other => panic!("{other:?}"),
//! };
//! assert_eq!(req.data, b"hi");
//! let server = domain.endpoint(&req.info, EndpointConfig::new(&cq, &eq))?;
//! server.accept(b"welcome")?;
//! let mut connected = 0;
//! while connected < 2 {
//!     if let Event::Connected { .. } = eq.wait(t)? { connected += 1; }
//! }
//!
//! // A message from client to server.
//! let src = domain.alloc(64, Access::LOCAL)?;
//! let dst = domain.alloc(64, Access::LOCAL)?;
//! src.write_at(0, b"hello")?;
//! server.recv(dst.full(), 1)?;
//! client.send(src.iov(0, 5), 2)?;
//! let mut got = Vec::new();
//! while got.len() < 2 {
//!     let c = cq.wait(t)?;
//!     assert!(c.is_ok(), "{c:?}");
//!     got.push(c.context);
//! }
//! assert_eq!(dst.to_vec(0, 5)?, b"hello");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod conn;
mod engine;
mod mr;
mod objects;
mod sys;
pub mod wire;

use std::sync::Arc;

use fabric_core::provider::FabricOps;
use fabric_core::{
    Address, Caps, EpType, HintField, Hints, Info, Limits, Mismatch, MrMode, Provider, Result,
};

/// Capabilities the provider offers.
pub const CAPS: Caps = Caps::MSG
    .union(Caps::RMA)
    .union(Caps::READ)
    .union(Caps::WRITE)
    .union(Caps::SEND)
    .union(Caps::RECV)
    .union(Caps::REMOTE_READ)
    .union(Caps::REMOTE_WRITE)
    .union(Caps::REMOTE_CQ_DATA)
    .union(Caps::RMA_PMEM);

/// The provider's limits.
pub const LIMITS: Limits = {
    let mut l = Limits::DEFAULT;
    l.max_msg_size = wire::MAX_MSG_SIZE as usize;
    l.inject_size = 4096;
    l.mr_key_size = 8;
    l.cq_data_size = 8;
    l.tx_size = 1024;
    l.rx_size = 1024;
    l.iov_limit = 8;
    l.rma_iov_limit = wire::MAX_RMA_IOV;
    l.cm_data_size = wire::MAX_CM_DATA as usize;
    l.mtu = 0;
    l
};

struct TcpProvider;

impl Provider for TcpProvider {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn offers(&self) -> Vec<Info> {
        let mut i = Info::new("tcp", CAPS, EpType::Msg, LIMITS);
        i.mr_mode = MrMode::PROV_KEY;
        i.fabric_name = "IP".into();
        i.domain_name = "tcp".into();
        vec![i]
    }

    fn check(&self, hints: &Hints, info: &mut Info) -> std::result::Result<(), Mismatch> {
        for (field, what, a) in [
            (HintField::SrcAddr, "source", &info.src_addr),
            (HintField::DestAddr, "destination", &info.dest_addr),
        ] {
            if let Some(a @ Address::Raw(_)) = a {
                return Err(Mismatch::new(
                    field,
                    format!("{what} address {a} is not an IP address (tcp needs Address::Inet)"),
                ));
            }
        }
        let loopback = [&info.src_addr, &info.dest_addr]
            .iter()
            .filter_map(|a| a.as_ref().and_then(|a| a.as_inet()))
            .all(|a| a.ip().is_loopback());
        info.domain_name = if loopback { "lo" } else { "tcp" }.into();
        info.limits.mr_key_size = key_size_from_env()
            .map_err(|why| Mismatch::new(HintField::Config, why))?
            .unwrap_or(info.limits.mr_key_size);
        // `Hints::mr_key_size(4)` (libfabric's domain_attr hint) asks for 32-bit keys.
        if hints.mr_key_size.is_some_and(|m| (4..8).contains(&m)) {
            info.limits.mr_key_size = 4;
        }
        Ok(())
    }

    fn open_fabric(&self, info: &Info) -> Result<Arc<dyn FabricOps>> {
        Ok(Arc::new(objects::TcpFabric::open(info)?))
    }
}

/// The environment variable that narrows memory keys to 4 bytes (see the crate docs).
pub const KEY_SIZE_ENV: &str = "FABRIC_TCP_KEY_SIZE";

/// `FABRIC_TCP_KEY_SIZE`: `4` or `8` (bytes per memory key), unset or empty for the
/// default.
fn key_size_from_env() -> std::result::Result<Option<usize>, String> {
    match std::env::var(KEY_SIZE_ENV) {
        Ok(s) if !s.trim().is_empty() => match s.trim() {
            "4" => Ok(Some(4)),
            "8" => Ok(Some(8)),
            other => Err(format!(
                "{KEY_SIZE_ENV}={other}: memory keys are 4 or 8 bytes"
            )),
        },
        _ => Ok(None),
    }
}

/// The tcp provider, for [`Registry::register`](fabric_core::Registry::register).
pub fn provider() -> Arc<dyn Provider> {
    Arc::new(TcpProvider)
}
