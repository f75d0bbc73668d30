//! # fabric-core
//!
//! One provider-agnostic API for message passing and RDMA, in the spirit of libfabric:
//! [`Registry::getinfo`] matches [`Hints`] against every registered provider and
//! returns [`Info`] answers (capabilities, limits, addresses), or says per provider why
//! it did not match; from an answer you open a [`Fabric`], a [`Domain`], completion and
//! event queues, memory regions and endpoints, and move data with send/recv, inject,
//! remote CQ data, RMA write/read and the `*msg` forms with completion-level flags up
//! to [`OpFlags::COMMIT_COMPLETE`] (durable at the target), and remote atomics where the
//! provider has them ([`atomic`]).
//!
//! Providers implement the traits in [`provider`]; applications normally use the
//! `fabric` facade crate, which registers every enabled provider.
//!
//! ## Memory safety
//! Registered memory is owned by its [`MemoryRegion`], and each posted operation holds
//! the region until it completes, so a buffer cannot be freed under the fabric. Memory
//! that peers can write is only read by copying ([`MemoryRegion::read_at`]); slice
//! views are `unsafe` with their contract stated. See [`memory`].
//!
//! ## Progress
//! By default data moves when the application reads its queues ([`Progress::Manual`]):
//! reading a completion or event queue of a domain (or fabric) moves that side's data
//! and connection handshakes, and nothing else. Two ends in one thread must therefore
//! poll both sides (a connect completes only while the server's event queue is read,
//! and the client's). [`Progress::Auto`] adds a provider thread. Blocking reads (`sread`, `wait`) sleep;
//! [`CompletionQueue::poll_wait`] spins for the lowest latency.
//!
//! ## Async
//! Each data operation has a `*_async` form ([`Endpoint::write_async`],
//! [`Endpoint::recv_async`], [`Endpoint::writemsg_async`], ...) that posts at once and
//! returns an [`OpFuture`] resolving with *that* operation's completion, whichever
//! task drains the queue, so many tasks can share one completion queue
//! (`ep.write_async(mr.iov(0, 8), remote.iov(0, 8))?.await?`); an error completion
//! resolves to `Err` with the [`CqError`] as its source. See [`dispatch`]. The
//! queue-level stream stays: [`AsyncCompletions`] hands completions to whichever task
//! polls next (for a task that owns its queue), and [`AsyncEvents`] awaits events.
//!
//! ## One set of semantics
//! Every provider keeps these rules, so that switching providers changes speed, not
//! behaviour (the conformance suite checks each):
//! - **A refused remote access ends the connection.** A bad key, bounds, rights, or a
//!   COMMIT into memory not registered PMEM: the initiator's operation completes with
//!   [`CqErrorKind::RemoteAccess`] (or `RemoteInvalid`), the target's memory is not
//!   touched, and the connection ends at both ends with
//!   [`Event::Shutdown`] `{ reason: ShutdownReason::AccessError }`. This is what RC
//!   hardware does (the responder NAKs and moves its queue pair to the error state,
//!   the requester's goes to error on the NAK), so the verbs provider can keep it too.
//! - **Every end of a connection is an event** that says why ([`ShutdownReason`]):
//!   local shutdown, the peer's, a lost connection, an access error, a protocol error.
//! - **Posting to an endpoint whose connection has ended fails at the call** with
//!   [`ErrorKind::NotConnected`] ([`ErrorKind::Shutdown`] after a local shutdown), once
//!   the provider knows; operations outstanding then complete `Canceled` or
//!   `ConnectionLost`.
//! - **A write with remote CQ data completes at the initiator only once the target
//!   has matched the CQ data with a posted receive** (RDMA WRITE with immediate
//!   consumes a receive; until the target posts one, the initiator waits, bounded by
//!   its receiver-not-ready retries). CQ data is `cq_data_size` bytes (8 on tcp, 4 on
//!   softroce and verbs).
//! - **The transport keeps answering while the application is busy.** With manual
//!   progress an application that does not read its queues for seconds delays its own
//!   completions, never its peer's connection (softroce runs a progress backstop).
//! - **Addresses:** [`Hints::src_addr`] chooses the local address (and, on softroce,
//!   the device); getinfo refuses one that is not on this machine, and a provider name
//!   that is not built is named as such.
//!
//! ## Extension points
//! Reliable unconnected endpoints, address vectors, tagged messages, atomics and
//! counters live in the `fabric-rdm` crate, a layer over any provider's MSG endpoints
//! through this API only (libfabric rxm's model): [`EpType::Rdm`], [`Caps::TAGGED`]
//! and [`Caps::ATOMIC`] are answered there (as `"tcp;rxm"`), while the providers'
//! own getinfo rejects RDM and TAGGED with a reason (and answers ATOMIC only where it
//! executes atomics natively on MSG endpoints, below). A provider with native RDM, tagged or
//! atomic support can add them without a redesign: the provider's endpoint is split
//! as libfabric's ops tables are ([`provider::EndpointOps`] for what every endpoint
//! has, with accessors to [`provider::CmOps`] for connection management,
//! [`provider::MsgOps`] and [`provider::RmaOps`] for the data path), so an RDM
//! endpoint simply has no `CmOps`, and tagged and atomic classes arrive as further
//! accessors that default to `None`, which existing providers need not touch.
//!
//! The atomic class exists: [`provider::AtomicOps`] (accessor
//! [`provider::EndpointOps::atomic`]) gives connected endpoints `fi_atomic`-style
//! [`Endpoint::atomic`], [`Endpoint::fetch_atomic`], [`Endpoint::compare_atomic`]
//! with `atomicvalid` queries answering what the provider executes natively, for
//! providers that answer [`Caps::ATOMIC`] (softroce: u64/i64 fetch-add and
//! compare-swap on the RC opcodes). See [`atomic`]; the RDM layer shares its
//! [`AtomicOp`] / [`Datatype`] and uses a provider's native atomics where they fit.
//!
//! ## Example
//! A client that connects and writes into the server's region (the server sent its
//! [`RemoteMr`] in the accept data):
//! ```no_run
//! use fabric_core::*;
//! use std::time::Duration;
//!
//! fn client(registry: &Registry) -> Result<()> {
//!     let hints = Hints::new()
//!         .caps(Caps::MSG | Caps::RMA)
//!         .ep_type(EpType::Msg)
//!         .node("127.0.0.1")
//!         .service(9228);
//!     let info = registry.getinfo(&hints)?.remove(0);
//!     let fabric = Fabric::open(&info)?;
//!     let domain = fabric.domain(&info)?;
//!     let eq = fabric.eq(EqAttr::default())?;
//!     let cq = domain.cq(CqAttr::default())?;
//!     let ep = domain.endpoint(&info, EndpointConfig::new(&cq, &eq))?;
//!     ep.connect(b"hello")?;
//!     let remote = match eq.wait(Duration::from_secs(5))? {
//!         Event::Connected { data, .. } => RemoteMr::from_bytes(&data)?,
//!         other => return Err(Error::new(ErrorKind::Protocol, format!("{other:?}"))),
//!     };
//!     let mr = domain.alloc(4096, Access::LOCAL)?;
//!     mr.write_at(0, b"written by RMA")?;
//!     ep.write(mr.iov(0, 14), remote.iov(0, 14), 1)?;
//!     let c = cq.wait(Duration::from_secs(5))?;
//!     assert_eq!(c.context, 1);
//!     c.status.map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
//!     Ok(())
//! }
//! ```
#![warn(missing_docs)]

pub mod atomic;
pub mod cq;
pub mod dispatch;
pub mod domain;
pub mod endpoint;
pub mod eq;
pub mod error;
pub mod flags;
pub mod info;
pub mod memory;
pub mod prov;
pub mod provider;
#[cfg(target_os = "linux")]
pub mod wait;

use std::sync::atomic::{AtomicU64, Ordering};

pub use atomic::{AtomicForm, AtomicMsg, AtomicOp, AtomicRequest, Datatype};
pub use cq::{AsyncCompletions, Completion, CompletionQueue, CqAttr};
pub use dispatch::{OpFuture, DISPATCH_CONTEXT_BIT};
pub use domain::{Domain, Fabric};
pub use endpoint::{
    Endpoint, EndpointConfig, Msg, PassiveEndpoint, Payload, RecvRequest, RmaMsg, RmaRequest,
    SendRequest,
};
pub use eq::{AsyncEvents, ConnRequest, EqAttr, Event, EventQueue, ShutdownReason};
pub use error::{CqError, CqErrorKind, Error, ErrorKind, Result};
pub use flags::{Access, Caps, CompFlags, CompletionLevel, MrFlags, MrMode, OpFlags};
pub use info::{
    Address, ConnHandle, EpType, GetInfoError, HintField, Hints, Info, Limits, Mismatch, Progress,
    Rejection,
};
pub use memory::{
    HeapMemory, LocalIov, MemoryBacking, MemoryRegion, RemoteIov, RemoteMr, Segment, Segments,
};
pub use provider::{Provider, ProviderMatch, Registry, PROVIDER_ENV};

/// Identifies an endpoint or passive endpoint in events (libfabric's fid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fid(pub u64);

impl Fid {
    /// A fresh identifier, unique in this process.
    pub fn next() -> Fid {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Fid(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for Fid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fid{}", self.0)
    }
}
