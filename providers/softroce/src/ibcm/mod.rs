//! RDMA CM over QP1: the InfiniBand communication manager (IBTA vol. 1 ch. 12) as
//! Linux's `ib_cm` and rdma_cm speak it on RoCEv2, so that librdmacm programs and
//! kernel rdma_cm users (on kernel rxe or RoCE hardware) connect to softroce
//! endpoints and softroce endpoints to them.
//!
//! * [`wire`]: MAD header, the CM messages REQ, MRA, REJ, REP, RTU, DREQ, DREP at
//!   their table offsets, rdma_cm's private-data header ([`wire::CmaHdr`]) and the UD
//!   packet of QP1 (BTH + DETH, Q_Key 0x80010000, P_Key 0xffff, ICRC);
//! * [`engine`]: the state machine of one device's QP1, sans-IO (MADs and time in;
//!   MADs, timers and events out), with retransmissions, MRA, timewait and bounded
//!   tables;
//! * the agent (crate-internal): the engine of a device, fed by the device's receive
//!   path (packets for QPN 1) and driven by the provider's connection manager.
//!
//! A listener is found by service ID: rdma_cm's `RDMA_PS_TCP` port space,
//! `0x0000000001060000 | port` ([`wire::service_id`]). The REQ's private data is
//! rdma_cm's 36-byte header and then up to 56 bytes of the application's
//! connection data ([`wire::REQ_USER_DATA`]).

mod agent;
pub mod engine;
pub mod wire;

pub(crate) use agent::{deliver, Agent, CmOwner};
pub use agent::{ibcm_stats, AgentStats, MAX_INBOX};
