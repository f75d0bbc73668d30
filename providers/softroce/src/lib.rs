//! User-space RoCEv2, wire-compatible with Linux rdma_rxe.
//!
//! * [`wire`] – packet views and representations (BTH, extension headers, ICRC,
//!   IPv4/UDP framing), in the style of smoltcp's `wire`.
//! * [`rc`] – the RC transport as a deterministic sans-IO state machine
//!   ([`rc::QueuePair`]): packets and the current time in; packets, the next timer
//!   deadline and completions out. Memory is reached through the [`rc::LocalMemory`]
//!   and [`rc::RemoteMemoryTable`] traits, so this crate does not depend on
//!   fabric-core.
//! * [`fault`] – a seeded fault injector (drop, duplicate, reorder, corrupt, delay)
//!   to put between a QP and the wire; [`pcap`] – a capture writer for full frames.
//!
//! Building a packet by hand:
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
//!
//! Driving a queue pair (one side shown; a real driver sends each `Transmit` as a
//! UDP datagram, feeds received ones to `handle_datagram` and sleeps until
//! `poll_timeout`):
//!
//! ```
//! use std::net::{Ipv4Addr, SocketAddrV4};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use fabric_softroce::rc::*;
//!
//! let table = Arc::new(KeyTable::new());
//! let mut qp = QueuePair::new(0x11, table);
//! qp.modify_to_init().unwrap();
//! qp.modify_to_rtr(RtrAttr {
//!     mtu: Mtu::Mtu1024,
//!     dest_qpn: 0x22,
//!     rq_psn: 0,
//!     max_dest_rd_atomic: 16,
//!     min_rnr_timer: 12,
//!     local: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 0xC011),
//!     remote: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 4791),
//! }).unwrap();
//! qp.modify_to_rts(RtsAttr {
//!     sq_psn: 0,
//!     timeout: ib_timeout(14),
//!     retry_cnt: 7,
//!     rnr_retry: 7,
//!     max_rd_atomic: 16,
//! }).unwrap();
//! let buf: Arc<dyn LocalMemory> = Arc::new(VecMemory::from_vec(b"ping".to_vec(), 0, RemoteAccess::NONE));
//! qp.post_send(SendWr { wr_id: 1, op: SendOp::Send, local: Some(LocalSegment::new(buf, 0, 4)) }).unwrap();
//! let now = Time(0);
//! let t = qp.poll_transmit(now).expect("a SEND ONLY packet");
//! assert_eq!(t.dst.port(), 4791);
//! // No ACK arrives: the retransmission timer is armed.
//! assert_eq!(qp.poll_timeout(), Some(now + ib_timeout(14)));
//! # let _ = Duration::ZERO;
//! ```
#![warn(missing_docs)]

pub mod fault;
pub mod pcap;
mod provider;
pub mod rc;
pub mod wire;

pub use provider::device::{
    configure_device, device_stats, parse_faults, DeviceConfig, DeviceStats,
};
pub use provider::{limits, provider, CAPS, MAX_MSG_SIZE};
