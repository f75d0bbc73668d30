//! # fabric-rdm
//!
//! Reliable unconnected endpoints (`FI_EP_RDM`) with address vectors, tagged messages,
//! atomics and counters, as a layer over the connected (MSG) endpoints of **any**
//! provider, built on the public fabric API only, as libfabric's rxm provider is built
//! over verbs or tcp. tcp, softroce and verbs get RDM with no provider code.
//!
//! ## getinfo: "tcp;rxm"
//! [`getinfo`] answers hints with [`EpType::Rdm`]: it asks the registry for MSG
//! endpoints with `MSG | RMA` (the layer needs RMA read for rendezvous) and the hints'
//! other wishes (provider, address, ...), and answers each as an [`RdmInfo`] whose
//! [`info`](RdmInfo::info) says `ep_type: Rdm`, caps `MSG | TAGGED | ATOMIC |
//! REMOTE_CQ_DATA` and the layered provider name (`"tcp;rxm"`, `"softroce;rxm"`), and
//! whose [`msg`](RdmInfo::msg) is the MSG answer to open the fabric and domain from. A
//! provider hint may name the layer (`"tcp;rxm"`) or the provider alone.
//!
//! ## Objects
//! - [`AddressVector`]: opened on a domain; [`insert`](AddressVector::insert) an
//!   endpoint's [`name`](RdmEndpoint::name) to get a [`FiAddr`].
//! - [`RdmEndpoint`]: `send_to`/`senddata_to`/`inject_to`, `recv`/`recv_from`
//!   (directed receive), tagged `tsend`/`tsenddata`/`tinject`/`trecv` with 64-bit tags
//!   and ignore masks matched in posting order, [`tpeek`](RdmEndpoint::tpeek) with
//!   peek, claim and discard, atomics (`atomic`, `fetch_atomic`, `compare_atomic`,
//!   see [`atomic_valid`]) executed natively by the provider where it can, else by the
//!   target's layer on regions bound with [`bind_mr`](RdmEndpoint::bind_mr), and
//!   completions with the sender's address
//!   (`FI_SOURCE`); RMA `write_to`/`read_to` a peer's region. Each endpoint runs a
//!   progress thread (polling and waiting application threads drive progress
//!   themselves, and the thread stays away while they do); completions are read with
//!   [`RdmEndpoint::read`] / [`RdmEndpoint::read_one`] (busy polling:
//!   [`RdmEndpoint::poll_wait`]) or [`RdmEndpoint::wait`] (blocking).
//! - [`Counter`]: completion counters bound per operation class
//!   ([`RdmEndpoint::bind_cntr`]).
//!
//! How messages, credits, rendezvous, progress and connections work is in [`ep`].
//!
//! - Multi-range forms: `sendv_to`, `tsendv`, `recvv`, `trecvv` (up to
//!   [`IOV_LIMIT`] ranges); RMA `writedata_to` (the target gets a `RemoteWrite`
//!   completion with the 64-bit data and the writer's address).
//! - Idle connections close by a handshake (default after 60 s idle; see [`ep`]).
//!
//! ## Atomics: native where the provider has them
//! An atomic whose (operation, datatype, form, element count) the connection's MSG
//! endpoint executes natively (its `fetch_atomicvalid` & co.; softroce: u64/i64
//! fetch-add and compare-swap of one element at an 8-byte aligned address), on a
//! provider whose atomics are coherent with CPU atomics (`atomic_cpu_coherent`:
//! softroce; not verbs over kernel rxe, whose atomics are device-local), is posted
//! on that endpoint: the target's provider executes it and no software of the target's
//! layer runs (it need not be bound with `bind_mr`, and, as any refused remote access
//! on a MSG connection, a refused one ends that connection; the next operation to the
//! peer opens a new one). The rest is emulated by the target's layer on bound regions.
//! Both paths update target memory with CPU atomic instructions, so they are atomic
//! with respect to each other on one word (see [`atomic`]).
//!
//! ## Example
//! ```no_run
//! use fabric_core::*;
//! use fabric_rdm::*;
//! use std::time::Duration;
//!
//! fn run(registry: &Registry) -> Result<()> {
//!     let hints = Hints::new().ep_type(EpType::Rdm).caps(Caps::TAGGED)
//!         .provider("tcp").node("127.0.0.1").service(0).source(true);
//!     let info = fabric_rdm::getinfo(registry, &hints)?.remove(0);
//!     let fabric = Fabric::open(info.msg())?;
//!     let domain = fabric.domain(info.msg())?;
//!     let av = AddressVector::open(&domain, AvAttr::default())?;
//!     let a = RdmEndpoint::open(&domain, &info, &av, RdmAttr::default())?;
//!     let b = RdmEndpoint::open(&domain, &info, &av, RdmAttr::default())?;
//!     let to_b = av.insert(&b.name())?;
//!     let mr = domain.alloc(64, Access::LOCAL)?;
//!     b.trecv(mr.iov(32, 32), None, 7, 0, 1)?;
//!     mr.write_at(0, b"hello")?;
//!     a.tsend(mr.iov(0, 5), to_b, 7, 2)?;
//!     let got = b.wait(Duration::from_secs(5))?;
//!     assert_eq!((got.context, got.len, got.tag), (1, 5, 7));
//!     Ok(())
//! }
//! ```
#![warn(missing_docs)]

pub mod atomic;
pub mod av;
pub mod cntr;
pub mod ep;
mod watchdog;
mod wire;

pub use atomic::{atomic_valid, AtomicForm, AtomicOp, Datatype, MAX_ATOMIC_COUNT};
pub use av::{AddressVector, AvAttr, FiAddr};
pub use cntr::{CntrEvents, Counter};
pub use ep::{Claim, OpKind, PeekMode, Peeked, RdmAttr, RdmCompletion, RdmEndpoint, IOV_LIMIT};

use fabric_core::{Caps, EpType, GetInfoError, Hints, Info, Registry};

/// The layer's name in provider names (`"tcp;rxm"`).
pub const LAYER: &str = "rxm";

/// An RDM answer: what the layer offers, over the MSG answer it runs on.
#[derive(Debug, Clone)]
pub struct RdmInfo {
    info: Info,
    msg: Info,
}

impl RdmInfo {
    /// The RDM description (`ep_type: Rdm`, the layered provider name, the layer's
    /// capabilities).
    pub fn info(&self) -> &Info {
        &self.info
    }
    /// The MSG answer the layer runs on: open the fabric and domain from it.
    pub fn msg(&self) -> &Info {
        &self.msg
    }
}

/// What the layer adds to a MSG provider's capabilities.
pub const LAYER_CAPS: Caps = Caps::MSG
    .union(Caps::TAGGED)
    .union(Caps::ATOMIC)
    .union(Caps::REMOTE_CQ_DATA)
    .union(Caps::SEND)
    .union(Caps::RECV)
    .union(Caps::READ)
    .union(Caps::WRITE)
    .union(Caps::REMOTE_READ)
    .union(Caps::REMOTE_WRITE);

/// getinfo for RDM endpoints: see the crate docs. Hints with an endpoint type other
/// than `Rdm` (or none) are answered with the MSG providers' RDM layering too.
pub fn getinfo(registry: &Registry, hints: &Hints) -> Result<Vec<RdmInfo>, GetInfoError> {
    let mut msg_hints = hints.clone();
    msg_hints.ep_type = Some(EpType::Msg);
    let layer_only = Caps::TAGGED | Caps::ATOMIC;
    msg_hints.caps = (hints.caps - layer_only) | Caps::MSG | Caps::RMA;
    if let Some(p) = &hints.provider {
        let names: Vec<&str> = p
            .split([',', ';'])
            .map(str::trim)
            .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case(LAYER))
            .collect();
        msg_hints.provider = (!names.is_empty()).then(|| names.join(","));
    }
    let answers = registry.getinfo(&msg_hints)?;
    Ok(answers
        .into_iter()
        .map(|msg| {
            let mut info = msg.clone();
            info.ep_type = EpType::Rdm;
            info.caps = LAYER_CAPS | (msg.caps & Caps::REMOTE_CQ_DATA);
            info.provider_name = format!("{};{LAYER}", msg.provider_name);
            RdmInfo { info, msg }
        })
        .collect())
}
