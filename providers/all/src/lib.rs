//! # fabric
//!
//! One import for the fabric API ([`fabric_core`], re-exported here) and every provider
//! enabled by cargo features: `tcp` and `softroce` (both default, pure Rust), and
//! `verbs` (libibverbs + librdmacm through rdma-sys; needs the C libraries).
//! [`getinfo`] searches them all; set `FABRIC_PROVIDER` (like libfabric's `FI_PROVIDER`)
//! to narrow the set. Reliable unconnected endpoints ([`EpType::Rdm`]) come from the
//! [`rdm`] layer over any of them: [`rdm_getinfo`] answers as `"tcp;rxm"` etc.
//!
//! ```
//! use fabric::{Caps, EpType, Hints};
//! // Which providers can do reliable connected messaging with RMA?
//! for m in fabric::registry().explain(&Hints::new().caps(Caps::MSG | Caps::RMA).ep_type(EpType::Msg)) {
//!     match m.result {
//!         Ok(infos) => println!("{}: {} answer(s)", m.provider, infos.len()),
//!         Err(why) => println!("{}: no ({why})", m.provider),
//!     }
//! }
//! ```

use std::sync::OnceLock;

pub use fabric_core::*;
/// RDM endpoints, address vectors, tagged messages, atomics and counters over every
/// MSG provider (the `fabric-rdm` crate).
pub use fabric_rdm as rdm;

/// The registry of every provider compiled in.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        #[allow(unused_mut)]
        let mut r = Registry::new();
        #[cfg(feature = "tcp")]
        r.register(fabric_tcp::provider());
        #[cfg(feature = "softroce")]
        r.register(fabric_softroce::provider());
        #[cfg(feature = "verbs")]
        r.register(fabric_verbs::provider());
        r
    })
}

/// getinfo over every compiled-in provider (see [`Registry::getinfo`]).
pub fn getinfo(hints: &Hints) -> std::result::Result<Vec<Info>, GetInfoError> {
    registry().getinfo(hints)
}

/// RDM getinfo over every compiled-in provider (see [`rdm::getinfo`]).
pub fn rdm_getinfo(hints: &Hints) -> std::result::Result<Vec<rdm::RdmInfo>, GetInfoError> {
    rdm::getinfo(registry(), hints)
}

/// Names of the compiled-in providers.
pub fn provider_names() -> Vec<&'static str> {
    registry().providers().iter().map(|p| p.name()).collect()
}

/// The README's example, compiled and run as a doctest so it stays true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
