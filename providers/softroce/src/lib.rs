//! User-space RoCEv2, wire-compatible with Linux rdma_rxe.
//!
//! * [`wire`] – packet views and representations (BTH, extension headers, ICRC,
//!   IPv4/UDP framing), in the style of smoltcp's `wire`.
//!
//! ```
//! use std::net::Ipv4Addr;
//! use fabric_softroce::wire::{BthRepr, IcrcContext, Opcode, RocePacket, RoceRepr};
//!
//! let icrc = IcrcContext::rxe(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 0xC001, 4791);
//! let repr = RoceRepr::new(BthRepr {
//!     opcode: Opcode::RC_SEND_ONLY,
//!     solicited: false,
//!     migreq: false,
//!     pad_count: 0,
//!     pkey: 0xFFFF,
//!     fecn: false,
//!     becn: false,
//!     dest_qpn: 0x11,
//!     ack_req: true,
//!     psn: 0,
//! });
//! let bytes = repr.build(b"hello", &icrc).unwrap();
//! icrc.verify(&bytes).unwrap();
//! let packet = RocePacket::new_checked(&bytes[..]).unwrap();
//! assert_eq!(packet.payload(), b"hello");
//! ```
#![warn(missing_docs)]

pub mod fault;
pub mod pcap;
pub mod rc;
pub mod wire;
