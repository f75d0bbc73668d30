//! NVMe over Fabrics, built on this project's fabric API.
//!
//! This crate is meant to hold an NVMe-oF target, a host and tools. So far it has
//! only their first layer, [`wire`]: the NVMe and NVMe-oF wire formats as pure code
//! with no I/O and no dependency on the fabric crates. The target, host and tools come
//! next and are not here yet.
//!
//! Every format is a typed view over a byte buffer with a checked constructor and
//! accessors that never panic, plus a validated representation with `parse` and
//! `emit`, in the manner of smoltcp's `wire` module:
//!
//! ```
//! use nvmeof::wire::{Dptr, KeyedSgl, Sqe, SqeRepr, SglRepr};
//! use nvmeof::wire::opcodes::{IoCommand, IoOpcode};
//!
//! // A Read of 8 blocks at LBA 0x1000 into remote memory described by a keyed SGL.
//! let sgl = KeyedSgl::new(0x7f00_0000_1000, 8 * 512, 0x1234, false)?;
//! let mut repr = SqeRepr {
//!     opcode: IoOpcode::Read.into(),
//!     cid: 7,
//!     nsid: 1,
//!     dptr: Dptr::Sgl(SglRepr::Keyed(sgl)),
//!     ..Default::default()
//! };
//! IoCommand { slba: 0x1000, nlb: 7, ..Default::default() }.apply(&mut repr); // NLB is 0's based
//!
//! let mut buf = [0u8; 64];
//! repr.emit(&mut Sqe::new_checked(&mut buf[..])?);
//! assert_eq!(buf[0], 0x02); // Read
//! assert_eq!(buf[39], 0x40); // keyed SGL data block
//!
//! let parsed = SqeRepr::parse(&Sqe::new_checked(&buf[..])?)?;
//! assert_eq!(parsed, repr);
//! assert_eq!(IoCommand::from_sqe(&parsed).block_count(), 8);
//! # Ok::<(), nvmeof::wire::WireError>(())
//! ```

#![warn(missing_docs)]

pub mod error;
pub mod host;
pub mod target;
pub mod transport;
pub mod wire;

pub use error::{Error, Result};
