//! User-space RoCEv2, wire-compatible with Linux rdma_rxe, and the `softroce`
//! provider of the fabric API ([`provider()`], registered by the `fabric` facade).
//!
//! ## The provider
//! Reliable connected endpoints (`EpType::Msg`) over the RC transport below, driven by
//! a user-space *device* per IPv4 address: one unconnected UDP socket on
//! `<ip>:4791` per process (`IP_PMTUDISC_DO`: DF set and IP ID 0, which rxe accepts
//! because it checks the ICRC against the header it received), shared by every domain
//! using that address; packets are demultiplexed by destination QPN, every ICRC is
//! verified (see "Receiving rxe's packets" below; bad packets are dropped and counted,
//! [`device_stats`]), and a connected QP takes packets only from its peer's address
//! and source port (others are dropped and counted as `wrong_source`). Several devices on one machine use several loopback addresses.
//! A device address is shared by every process of the user that opens it, as kernel
//! rxe is shared (below, "One device, many processes"); if 4791 on an address is
//! taken by a program that does not share it (kernel rxe, another user's softroce),
//! opening fails with `AddressInUse` and says to use another one. A client picks its device from
//! `info.src_addr`; without one, from the route to the server (127.0.0.1 for a
//! loopback server), or from a free loopback address when 127.0.0.1:4791 is taken by
//! another process. Tests and tools never depend
//! on owning 127.0.0.1:4791: [`free_loopback_ip`] gives a random 127.x.y.z whose port
//! 4791 is free (the tests, `fabric-conformance` by default and with `--addr`).
//!
//! - Offer: MSG, RMA, READ, WRITE, SEND, RECV, REMOTE_READ, REMOTE_WRITE,
//!   REMOTE_CQ_DATA (4 bytes: the immediate; a write with CQ data completes at the
//!   initiator only once the target has matched the data with a posted receive: the
//!   WRITE with immediate is RNR-NAKed until one is posted), RMA_PMEM; `mr_mode` PROV_KEY | VIRT_ADDR
//!   (remote addresses are virtual addresses, keys random non-zero 32-bit), path MTU
//!   4096 (`SOFTROCE_MTU` = 256..4096), max_msg_size 2^31 (the RC limit), inject 4096,
//!   16 local / 8 remote iovecs, 256 bytes of connection data.
//! - Mapping: send = SEND (with immediate), write = RDMA WRITE (with immediate: the
//!   target consumes a posted receive), read = RDMA READ; several remote iovecs are
//!   several work requests with one completion; `COMMIT_COMPLETE` is a zero-length
//!   persistent IB FLUSH per range (refused with NAK invalid request -> `RemoteInvalid`
//!   by a target region not registered PMEM, before any byte is written), the WRITEs,
//!   and a persistent FLUSH per written range, which the target executes with
//!   `MemoryBacking::persist` before it answers.
//! - Receive not ready: RC semantics. RNR NAK (timer 0.64 ms) and infinite RNR retry
//!   (rnr_retry 7): a message sent before the receive is posted is delivered once it
//!   is; a write with CQ data waits likewise. Retransmission: a 2.1 ms timeout
//!   (`SOFTROCE_TIMEOUT_US`), the floor of a timer that follows the measured round
//!   trip (at most 250 ms) and doubles on consecutive expiries; a congestion window
//!   inside rxe's 128 unacknowledged PSNs paces a peer that cannot keep up (see
//!   [`rc`], "Pacing against a slow peer"); rxe's retry_cnt 7
//!   (`SOFTROCE_RETRY_CNT`), which changes no packet. The retry policy is time-based:
//!   the requester gives up with `RetryExceeded` (and `Shutdown { reason: Lost }`)
//!   only after `max(timeout * (2^(retry_cnt+1) - 1), rc::MIN_GIVE_UP)` = 2 s by
//!   default without hearing anything new from the peer; losses that NAKs or READ
//!   response gaps reveal cost no retry, so a lossy but live link is not given up on.
//!   A READ whose responses have a gap keeps what arrived and asks again for the
//!   missing packets only. A peer whose application merely stops reading its queues
//!   keeps answering (the backstop).
//! - Limits a peer cannot push past: at most `max_dest_rd_atomic` (16) READ responses
//!   are being generated per QP (responder resources, as rxe's ring); a READ request
//!   beyond them waits (dropped unprocessed, `rc::QpStats::reads_deferred`, sent again
//!   by the requester), so 10,000 requests of 1 MiB queue 16 MiB of responses, not
//!   10 GB. Responses are produced packet by packet as the device sends them
//!   (`rc::QueuePair::response_backlog` says what is left). Half-open connections:
//!   128, 10 s (below). These are constants of the provider (`QP_RD_ATOMIC` in
//!   `provider/device.rs`, `fabric_core::prov::HALF_OPEN_MAX`/`HALF_OPEN_AGE`), not
//!   settings yet.
//! - Connections: an `ibv_rc_pingpong`-style exchange over TCP at the listener's
//!   address (`LLLL:QQQQQQ:PPPPPP:GID` text plus an extension with kind, MTU and
//!   connection data; REQ, REP or REJ, RTU). The TCP connection stays open as the
//!   connection's management channel; a side that ends an established connection sends
//!   DISCONNECT with its reason on it before closing it. A listener holds at most 128
//!   accepted connections whose request has not arrived (one more closes the oldest),
//!   each for at most 10 s, as tcp's (`fabric_core::prov::HalfOpen`).
//! - Connection management over IB CM (what Linux's rdma_cm and librdmacm speak; see
//!   "RDMA CM over QP1" below): every listener on a specific address is also the
//!   rdma_cm service `RDMA_PS_TCP` of its port on its device's QP1, so `rping -c`,
//!   `rdma_client` and kernel rdma_cm users connect to it; an endpoint connects over
//!   IB CM when its device says so ([`DeviceConfig::cm`] = [`CmProtocol::Ib`], or
//!   `SOFTROCE_CM=ib` in the environment). The default stays the TCP exchange: a
//!   listener on 0.0.0.0 has no device and so no QP1 to answer a REQ on, and IB CM
//!   has the limits of its messages (below). (`fabric-conformance -p softroce` passes
//!   all 134 cases with `SOFTROCE_CM=ib` as without it.)
//! - End of a connection: every end raises exactly one `Event::Shutdown { fid, reason }`
//!   per endpoint, moves the QP to ERROR (outstanding work completes `Canceled`), and
//!   from then on every post (send, recv, write, read, inject, the `*msg` forms) fails
//!   at the call with `ErrorKind::NotConnected` (`ErrorKind::Shutdown` after this
//!   side's `shutdown()`). Reasons: `Local` (this side's `shutdown()`), `Peer` (the
//!   peer's shutdown, close or exit: DISCONNECT or an orderly TCP closure), `Lost`
//!   (transport or RNR retries exhausted, a reset TCP connection), `AccessError` (a
//!   refused remote access, below), `Protocol` (a malformed CM message or request). The
//!   peer of a side that lost its connection or refused an access hears the same
//!   reason through DISCONNECT.
//! - Refused remote access (unknown key, bounds, rights, a COMMIT/FLUSH into memory not
//!   registered PMEM), as rdma_rxe and RC hardware: the target's responder sends the
//!   NAK and its QP enters ERROR (its posted receives complete `Canceled`); the
//!   initiator's operation completes `RemoteAccess` (`RemoteInvalid` for the FLUSH),
//!   what it posted after completes `Canceled`; both endpoints get `Shutdown {
//!   reason: AccessError }`. Nothing of the refused request touches memory.
//! - Progress: manual by default (completion and event queue reads drive the devices
//!   and the connection manager), sleeping `sread`/`wait` (ppoll on the sockets with
//!   the next timer), `Progress::Auto` or an async waiter start a thread. Under it all,
//!   each device has a *backstop* thread, as a NIC's transport never stops when the
//!   application is busy: whenever no application thread has run the device's
//!   transport for the backstop interval (default 1 ms, [`DEFAULT_BACKSTOP`];
//!   `SOFTROCE_BACKSTOP_US`, or [`DeviceConfig::backstop`], 0 turns it off) and none
//!   sleeps on it, the backstop receives, ACKs, NAKs, answers READs, retransmits and
//!   ends failed connections, then sleeps on the socket and the next timer while the
//!   application stays away. So a peer never loses its connection (nor waits more than
//!   about the interval) because this application does not read its queues, and a busy
//!   poller keeps its latency: the backstop then only wakes once per interval to see
//!   that the application is there. 1 ms is below the peer's first retransmission
//!   timeout (2.1 ms), so stepping in rarely costs a retransmission. Threads
//!   polling one device share it without waiting for each other (a lock per QP; the
//!   receive side is only tried). When a busy-polled completion queue read completes
//!   a one-packet receive, the QP holds its ACK up to 50 µs so that it leaves in the
//!   same `sendmmsg` as the application's answer (released earlier by the next send
//!   posted on the QP or before any sleep). Idle connections cost nothing per
//!   progress round or sleep: the endpoints' CM sockets are in one epoll set
//!   (`fabric_core::wait::ReadySet`; only those with something to say are read, and a
//!   sleeper polls the set's one descriptor), and a device keeps its earliest QP timer
//!   in one word instead of scanning every QP's (with 2,000 idle connections an empty
//!   queue read costs what it costs with none, and setting up the 2,000th connection
//!   what the first did: `tests/idle.rs`).
//! - Environment, read when a device is created (or set per address in a program with
//!   [`configure_device`]): `SOFTROCE_BACKSTOP_US=1000` (the backstop interval, 0: off),
//!   `SOFTROCE_PACE="burst=64,gap_us=0"` (output pacing per QP: packets per turn and
//!   the least time between a QP's turns, [`Pace`]; a 1 MiB READ is answered in turns
//!   of 64 packets, other QPs and the receive side going in between),
//!   `SOFTROCE_GSO=0` (UDP segmentation offload off; on by default where the kernel
//!   has it: runs of packets of one length to one peer leave as one GSO `sendmsg`,
//!   which the kernel splits into datagrams numbered with IP IDs 0, 1, 2, ..., and
//!   each packet's ICRC is built for the ID its datagram carries; the socket also
//!   takes `UDP_GRO`, so such a run arrives as one datagram, split again by its
//!   segment size; the wire is the same either way, [`DeviceConfig::gso`]),
//!   `SOFTROCE_FAULTS="drop=0.1,dup=0.05,reorder=0.05,corrupt=0.01,seed=42"`
//!   (also `delay_us`, `jitter_us`, `reorder_us`) injects faults into every frame the
//!   device sends; `SOFTROCE_PCAP=/path/file.pcap` captures every frame it sends.
//!
//! ## One device, many processes
//! Every process that opens the device on an address binds its own UDP socket on
//! `<ip>:4791` with `SO_REUSEPORT` (the kernel groups only sockets of one user, and
//! refuses the group to a program holding the port without it) and takes a *slot*
//! 1..=255: the abstract Unix datagram socket `@softroce/<ip>/<slot>`, whose bind is
//! exclusive and which the kernel frees when the process exits, so a slot never leaks.
//! Its QP numbers carry the slot in bits 16..24. The kernel hands each arriving
//! datagram to one socket of the group (a hash of its addresses and ports, so one
//! peer device's packets all go to one process); that process dispatches what is for
//! its own QPs and passes the rest, with their source address, to the owner's slot
//! socket, whose process checks them as if it had received them (ICRC, IP ID window,
//! source, PSN). No process is special; when one exits the kernel spreads its flows
//! over the others. Costs and limits: a datagram for another process crosses one more
//! socket (a copy and a system call at each end); the slot sockets take datagrams only
//! from processes of the same user (`SCM_CREDENTIALS` checked on each, others dropped
//! and counted as `forward_refused`), so another local user cannot inject a forged
//! peer address through them; at most 255 processes per address and 65,536 QPs per
//! process. [`DeviceStats`] counts `forwarded`, `forwarded_in` and `forward_refused`.
//! Not shared yet: QP1. IB CM packets (below) are handled by the process the kernel
//! hands them to, so with several processes on one address an rdma_cm listener is
//! reachable only from peers whose flow lands in its process (softroce's own TCP
//! exchange, the default, has no such limit: each listener has its own port).
//! Tested by `tests/shared_device.rs`: four processes on one address, each with its
//! own connection to a server, messages and RMA verified, packets passed between them.
//!
//! ## Receiving rxe's packets
//! Linux rdma_rxe sends its packets with DF and an IP ID that increments per packet
//! (measured on Debian 12's 6.1), and its ICRC covers that ID. A plain UDP socket
//! never shows the IP header, so the receiver cannot simply check the ICRC. Two ways:
//!
//! - **Solve for the ID** (what this crate does): the CRC is affine in the 16 ID bits,
//!   so [`wire::IcrcContext::solve_ip_id`] finds the one ID, if any, that makes the
//!   stored ICRC verify (one CRC plus at most 16 small bit-matrix products; ID 0, what
//!   this crate and any unconnected-socket sender send, costs nothing extra). Alone
//!   that weakens detection from 2^-32 to 2^-16 per corrupted packet (some ID fits);
//!   so the device also requires the ID to be plausible for that peer address
//!   ([`wire::IpIdWindow`]: at most 256 behind the newest accepted ID, at most 4096
//!   plus one per millisecond since it ahead, following how Linux numbers DF packets
//!   per destination), which brings it to about 2^-20 for an active peer (2^-16 for
//!   the first packet of a peer, whose ID cannot be judged). DF is assumed set: a
//!   frame without DF fails. No privileges.
//! - **Read the IP header**: a raw socket (`IPPROTO_UDP` raw, or `AF_PACKET`) sees the
//!   real ID and DF, so the ICRC is checked at full 2^-32 strength with no window and
//!   frames without DF also verify; but it needs `CAP_NET_RAW`, sees every UDP
//!   datagram of the host (a filter per socket, and a copy of each into the process),
//!   and still needs the UDP socket bound to 4791 so the kernel does not answer with
//!   ICMP port unreachable. Not implemented; an option for a privileged device
//!   process (issue 10's shared-device design would be the place).
//!
//! The sans-IO core's [`rc::QueuePair::handle_datagram`] does the same (per QP).
//!
//! ## RDMA CM over QP1
//! [`ibcm`]: each device answers on QPN 1 (UD: BTH + DETH, Q_Key 0x80010000, P_Key
//! 0xffff, sent from and to UDP 4791) with the IB communication manager's MADs
//! (class 0x07, version 2, method SEND): REQ, REP, RTU, REJ, MRA, DREQ, DREP at the
//! offsets of IBTA vol. 1 tables 106-113, as Linux's `ib_cm` lays them out. A REQ's
//! private data starts with rdma_cm's 36-byte header (version 0, IPv4, the source
//! port, source and destination addresses); a listener is found by the service ID
//! `0x0000000001060000 | port`. Mapping: connect = REQ (this side's QPN and PSN, path
//! MTU, the GIDs `::ffff:a.b.c.d`, the header and the connection data); accept = REP.
//! A REQ's or REP's starting PSN is the PSN its sender *receives* first (as Linux's
//! cm.c uses them: the passive side sends from the REQ's, the active side from the
//! REP's). The path MTU asked for (and accepted) is at most what the link towards the
//! peer carries (`IP_MTU` of the route less 60 bytes of headers: 1024 on a 1500-byte
//! Ethernet link, as kernel rxe's active MTU);
//! the client answers with an RTU and is connected; the server is connected when the
//! RTU arrives; reject = REJ with the consumer-defined reason 28 and the data; a REQ
//! for a port nobody listens on gets a REJ "invalid service ID" (`ConnectionRefused`);
//! shutdown = DREQ (the reason's byte in its private data, which rdma_cm peers
//! ignore), answered with a DREP; both sides then keep the connection in timewait for
//! 1 s (a repeated DREQ is answered again). Timers as Linux's cm.c: a REQ is sent
//! again every `remote_cm_response_timeout` (here 18: 1.07 s) up to
//! `max_cm_retries` (15) times, then withdrawn with a REJ (timeout); a REP every
//! `local_cm_response_timeout` of the REQ (ours: 16, 268 ms), a repeated REQ is
//! answered with the REP again (with an MRA while the application has not decided);
//! a DREQ like the REQ. Limits: connection data is at most 56 bytes in a REQ (92 less
//! rdma_cm's header; more fails `connect` with `InvalidArgument`), 196 in a REP, 148
//! in a REJ. IB CM has no length field: an rdma_cm peer's data arrives zero-padded to
//! those sizes (as rdma_cm applications see it too); softroce writes a 3-byte trailer
//! (length, `S`, `R`) at the end of the padding, so that between softroce peers data
//! of up to 53 (REQ), 193 (REP), 145 (REJ) bytes arrives with its exact length (with
//! `SOFTROCE_CM=ib` the offered `cm_data_size` is 53). Bounded: 128 undecided requests per listener
//! (more get a REJ "no resources"), each decided within 10 s (else a REJ timeout),
//! 4096 connections and 1024 timewait entries per device, 1024 MADs waiting for the
//! CM. A malformed MAD (short, another class or version, an attribute the CM does
//! not handle, unknown communication IDs) is dropped and counted
//! ([`ibcm::ibcm_stats`]). A device without any IB CM user in the process (no
//! listener on its address, no IB CM connection) counts QP1 packets as `unknown_qp`
//! and answers nothing. The CM runs when the application drives the connection
//! manager (event-queue reads, and every 256th completion-queue read); the device's
//! backstop only receives the MADs for it.
//!
//! ## Out-of-band peers
//! [`RawQp`] is an RC queue pair connected with the peer's QPN, PSN and address
//! exchanged by the caller (as `ibv_rc_pingpong` and other verbs programs do), SEND
//! and RECV only; `fabric-pingpong --rc-pingpong` speaks `ibv_rc_pingpong`'s exchange
//! with it (the VM tier's step `softroce-rcpp` runs it against kernel rxe). Such a
//! peer's source port is pinned by its first packet (kernel rxe sends from a per-QP
//! port the exchange does not carry).
//!
//! Not rxe-compatible (deliberately): an oversized SEND is delivered truncated
//! (`Truncated`, libfabric semantics) instead of failing both QPs; the retransmission
//! timer backs off exponentially; packets leave from UDP port 4791 rather than rxe's
//! per-QP source port; the fabric connection exchange over TCP extends pingpong's
//! text, so a plain `ibv_rc_pingpong` peer is not a fabric endpoint's peer (it is a
//! [`RawQp`]'s; rdma_cm peers are, over IB CM).
//! On the wire the packets are rxe's.
//!
//! * [`wire`] – packet views and representations (BTH, extension headers, ICRC,
//!   IPv4/UDP framing), in the style of smoltcp's `wire`.
//! * [`rc`] – the RC transport as a deterministic sans-IO state machine
//!   ([`rc::QueuePair`]): packets and the current time in; packets, the next timer
//!   deadline and completions out. Memory is reached through the [`rc::LocalMemory`]
//!   and [`rc::RemoteMemoryTable`] traits; the table's one check is
//!   [`rc::RemoteMemoryTable::verify`] (R_Key, right, bounds, persistence). The
//!   provider implements them with fabric-core's shared provider layer
//!   (`fabric_core::prov`): a `ScatterList` per operation's buffers, and the domain's
//!   `KeyMap`, whose `verify` is the table's, for R_Keys.
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
pub mod ibcm;
pub mod pcap;
mod provider;
pub mod rc;
pub mod wire;

pub use provider::device::{
    configure_device, device_stats, free_loopback_ip, parse_faults, parse_pace, CmProtocol,
    DeviceConfig, DeviceStats, Pace, DEFAULT_BACKSTOP,
};
pub use provider::rawqp::{
    gid_ipv4, ipv4_gid, RawCompletion, RawQp, RAW_QP_MAX_RECV, RAW_QP_MAX_SEND,
};
pub use provider::{limits, provider, CAPS, MAX_MSG_SIZE};
