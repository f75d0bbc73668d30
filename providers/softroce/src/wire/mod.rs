//! RoCEv2 wire format: typed views over byte buffers and validated representations.
//!
//! Written in the manner of smoltcp's `wire` module. For every header there is
//!
//! * a *packet view* `Foo<T: AsRef<[u8]>>` over a byte buffer. `Foo::new_checked`
//!   verifies that the buffer is long enough, after which the field accessors never
//!   panic; `new_unchecked` skips the check (accessors may then panic on a short
//!   buffer, so only use it on buffers you sized yourself);
//! * a *representation* `FooRepr`, the validated high-level form, with `parse` (from a
//!   checked view) and `emit` (into a view over a buffer of at least `buffer_len()`
//!   bytes).
//!
//! The layers are:
//!
//! * [`Bth`] – the 12-byte Base Transport Header, [`Opcode`] – the opcode table
//!   (which extension headers each opcode carries, as rxe's `rxe_opcode.c`);
//! * [`ext`] – extension headers RETH, AETH, ImmDt, IETH, AtomicETH, AtomicAckETH,
//!   DETH and FETH;
//! * [`RocePacket`] / [`RoceRepr`] – a whole RoCEv2 packet as carried in a UDP datagram
//!   (BTH, extension headers, payload, pad, ICRC);
//! * [`frame`] – the IPv4 + UDP encapsulation, to build and parse full frames for pcap
//!   output and for ICRC computation;
//! * [`icrc`] – the invariant CRC, computed exactly as Linux rdma_rxe does.
//!
//! Nothing in this module panics on peer input: malformed buffers produce [`Error`].

pub mod bth;
pub mod ext;
pub mod frame;
pub mod icrc;
pub mod opcode;
pub mod roce;

pub use bth::{Bth, BthRepr};
pub use frame::{FrameInfo, Ipv4UdpFrame, ROCE_UDP_PORT};
pub use icrc::{IcrcContext, IpIdDelta, IpIdWindow, IP_ID_AHEAD, IP_ID_BEHIND};
pub use opcode::{HeaderSet, Opcode};
pub use roce::{RocePacket, RoceRepr};

use core::fmt;

/// Why a buffer could not be parsed as (or emitted into) a RoCEv2 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer is shorter than the headers it must contain.
    Truncated,
    /// A field holds a value the format does not allow (named).
    Malformed(&'static str),
    /// The BTH opcode is not one this implementation knows.
    UnknownOpcode(u8),
    /// The invariant CRC does not match the packet contents.
    BadIcrc {
        /// ICRC stored in the packet.
        stored: u32,
        /// ICRC computed over the packet.
        computed: u32,
    },
    /// The datagram does not come from the queue pair's connected peer (another
    /// address, or another source port than the one the peer uses).
    WrongSource,
    /// The IP ID that makes the ICRC verify is not plausible for the sender
    /// ([`IpIdWindow`]): treated as a bad ICRC.
    ImplausibleIpId(u16),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated => write!(f, "buffer too short for the RoCEv2 headers"),
            Error::Malformed(what) => write!(f, "malformed RoCEv2 packet: {what}"),
            Error::UnknownOpcode(op) => write!(f, "unknown BTH opcode {op:#04x}"),
            Error::BadIcrc { stored, computed } => write!(
                f,
                "ICRC mismatch: packet holds {stored:#010x}, computed {computed:#010x}"
            ),
            Error::WrongSource => write!(f, "datagram not from the connected peer"),
            Error::ImplausibleIpId(id) => write!(
                f,
                "the ICRC verifies only with IP ID {id:#06x}, not plausible for the sender"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Result type of the wire module.
pub type Result<T> = core::result::Result<T, Error>;

/// Big-endian field helpers. Callers guarantee the range is in bounds (checked views).
pub(crate) mod field {
    pub fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }
    pub fn u24_at(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]])
    }
    pub fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }
    pub fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(x)
    }
    pub fn set_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u24(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 3].copy_from_slice(&v.to_be_bytes()[1..]);
    }
    pub fn set_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
}

/// Generates the buffer plumbing shared by every fixed-length header view.
macro_rules! fixed_header_view {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name<T: AsRef<[u8]>> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> $name<T> {
            /// Length of this header in bytes.
            pub const LEN: usize = $len;

            /// Wraps a buffer without checking its length (accessors may panic if it
            /// is shorter than [`Self::LEN`]).
            pub const fn new_unchecked(buffer: T) -> Self {
                Self { buffer }
            }

            /// Wraps a buffer, failing with [`Error::Truncated`](crate::wire::Error)
            /// when it is shorter than [`Self::LEN`].
            pub fn new_checked(buffer: T) -> crate::wire::Result<Self> {
                let view = Self::new_unchecked(buffer);
                view.check_len()?;
                Ok(view)
            }

            /// Verifies that the buffer holds the whole header.
            pub fn check_len(&self) -> crate::wire::Result<()> {
                if self.buffer.as_ref().len() < Self::LEN {
                    Err(crate::wire::Error::Truncated)
                } else {
                    Ok(())
                }
            }

            /// Returns the underlying buffer.
            pub fn into_inner(self) -> T {
                self.buffer
            }
        }
    };
}
pub(crate) use fixed_header_view;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_name_the_problem() {
        assert!(Error::UnknownOpcode(0x99).to_string().contains("0x99"));
        let e = Error::BadIcrc {
            stored: 1,
            computed: 2,
        };
        assert!(e.to_string().contains("0x00000001"));
    }
}
