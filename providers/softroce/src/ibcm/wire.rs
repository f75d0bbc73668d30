//! IB CM MADs on the wire: the 24-byte MAD header, the CM messages (IBTA vol. 1
//! chapter 12, tables 106-113: REQ, MRA, REJ, REP, RTU, DREQ, DREP), rdma_cm's
//! private-data header (`struct cma_hdr`) and the UD packet of QP1 that carries a MAD
//! (BTH + DETH, Q_Key 0x80010000, P_Key 0xffff, ICRC).
//!
//! Offsets are bytes from the start of the 256-byte MAD (the CM tables count from
//! the end of the 24-byte MAD header; [`CM`] is that base). A field narrower than its
//! byte or word sits in the top bits (IBTA's `Byte[Bit]` notation, Linux's
//! `IBA_FIELD*_LOC`). Nothing here panics on peer input: decoding a short, foreign or
//! malformed MAD gives a [`MadError`].

use std::net::Ipv4Addr;

use crate::wire::ext::DethRepr;
use crate::wire::{BthRepr, IcrcContext, Opcode, RocePacket, RoceRepr};

/// Size of a MAD.
pub const MAD_LEN: usize = 256;
/// Size of the MAD header.
pub const MAD_HDR_LEN: usize = 24;
/// Where the CM message's fields start (after the MAD header).
pub const CM: usize = MAD_HDR_LEN;
/// QPN of the General Services Interface (QP1), which carries CM MADs.
pub const GSI_QPN: u32 = 1;
/// Q_Key of QP1.
pub const GSI_QKEY: u32 = 0x8001_0000;
/// Default partition key.
pub const PKEY_DEFAULT: u16 = 0xFFFF;
/// MAD base version.
pub const BASE_VERSION: u8 = 1;
/// Management class of the communication manager.
pub const MGMT_CLASS_CM: u8 = 0x07;
/// CM class version (Linux's `IB_CM_CLASS_VERSION`).
pub const CM_CLASS_VERSION: u8 = 2;
/// MAD method SEND, which every CM message uses.
pub const METHOD_SEND: u8 = 0x03;

/// rdma_cm's port space for TCP-like (RC) connections, `RDMA_PS_TCP`.
pub const RDMA_PS_TCP: u16 = 0x0106;
/// The IB CM service ID rdma_cm listens on for `RDMA_PS_TCP` port `port`
/// (`cma_get_service_id`).
pub const fn service_id(port: u16) -> u64 {
    ((RDMA_PS_TCP as u64) << 16) | port as u64
}
/// The port of an rdma_cm `RDMA_PS_TCP` service ID, if it is one.
pub fn service_port(sid: u64) -> Option<u16> {
    (sid >> 16 == RDMA_PS_TCP as u64).then_some(sid as u16)
}

/// Private data of a REQ.
pub const REQ_PDATA: usize = 92;
/// Private data of a REP.
pub const REP_PDATA: usize = 196;
/// Private data of an RTU.
pub const RTU_PDATA: usize = 224;
/// Private data of a REJ.
pub const REJ_PDATA: usize = 148;
/// Private data of an MRA.
pub const MRA_PDATA: usize = 222;
/// Private data of a DREQ.
pub const DREQ_PDATA: usize = 220;
/// Private data of a DREP.
pub const DREP_PDATA: usize = 224;
/// Size of rdma_cm's header at the front of a REQ's private data.
pub const CMA_HDR_LEN: usize = 36;
/// Connection data an rdma_cm REQ carries after its header (92 - 36).
pub const REQ_USER_DATA: usize = REQ_PDATA - CMA_HDR_LEN;

/// REJ reasons used here (IBTA table 109, Linux `enum ib_cm_rej_reason`).
pub mod rej {
    /// No resources (here: too many requests pending at the listener).
    pub const NO_RESOURCES: u16 = 3;
    /// The peer timed out.
    pub const TIMEOUT: u16 = 4;
    /// Invalid communication ID.
    pub const INVALID_COMM_ID: u16 = 6;
    /// No listener for the service ID.
    pub const INVALID_SERVICE_ID: u16 = 8;
    /// Transport type other than RC.
    pub const INVALID_TRANSPORT_TYPE: u16 = 9;
    /// Stale connection (a REQ for a connection in timewait).
    pub const STALE_CONN: u16 = 10;
    /// The consumer (application) rejected.
    pub const CONSUMER_DEFINED: u16 = 28;
}

/// CM attribute IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrId {
    /// Connection request.
    Req = 0x10,
    /// Message receipt acknowledgement.
    Mra = 0x11,
    /// Reject.
    Rej = 0x12,
    /// Reply.
    Rep = 0x13,
    /// Ready to use.
    Rtu = 0x14,
    /// Disconnect request.
    Dreq = 0x15,
    /// Disconnect reply.
    Drep = 0x16,
}

impl AttrId {
    fn from_u16(v: u16) -> Option<AttrId> {
        Some(match v {
            0x10 => AttrId::Req,
            0x11 => AttrId::Mra,
            0x12 => AttrId::Rej,
            0x13 => AttrId::Rep,
            0x14 => AttrId::Rtu,
            0x15 => AttrId::Dreq,
            0x16 => AttrId::Drep,
            _ => return None,
        })
    }
}

/// Why a datagram on QP1 is not a CM message this implementation takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MadError {
    /// Shorter than the headers and the 256-byte MAD.
    Truncated,
    /// Not a UD SEND, or a wrong Q_Key, P_Key or destination QPN.
    NotGsi(&'static str),
    /// Base version, management class or class version not those of the CM.
    WrongClass {
        /// Base version.
        base: u8,
        /// Management class.
        class: u8,
        /// Class version.
        version: u8,
    },
    /// Method other than SEND.
    WrongMethod(u8),
    /// An attribute the CM does not handle (LAP, APR, SIDR, ClassPortInfo, unknown).
    UnknownAttribute(u16),
    /// A field holds a value the message does not allow (named).
    Malformed(&'static str),
}

impl std::fmt::Display for MadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MadError::Truncated => write!(f, "MAD truncated"),
            MadError::NotGsi(w) => write!(f, "not a QP1 datagram: {w}"),
            MadError::WrongClass {
                base,
                class,
                version,
            } => write!(
                f,
                "MAD base version {base}, class {class:#04x}, class version {version}: not the CM's"
            ),
            MadError::WrongMethod(m) => write!(f, "CM MAD method {m:#04x}, not SEND"),
            MadError::UnknownAttribute(a) => write!(f, "CM attribute {a:#06x} not handled"),
            MadError::Malformed(w) => write!(f, "malformed CM message: {w}"),
        }
    }
}

impl std::error::Error for MadError {}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be24(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put24(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 3].copy_from_slice(&v.to_be_bytes()[1..]);
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// The IPv4-mapped GID of an address (`::ffff:a.b.c.d`), as RoCEv2 uses.
pub fn gid_of(ip: Ipv4Addr) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[10] = 0xFF;
    g[11] = 0xFF;
    g[12..].copy_from_slice(&ip.octets());
    g
}

/// The IPv4 address of an IPv4-mapped GID.
pub fn ipv4_of_gid(g: &[u8; 16]) -> Option<Ipv4Addr> {
    (g[..10].iter().all(|&b| b == 0) && g[10] == 0xFF && g[11] == 0xFF)
        .then(|| Ipv4Addr::new(g[12], g[13], g[14], g[15]))
}

/// IB path MTU code (1 = 256 ... 5 = 4096) of a byte count.
pub fn mtu_code(bytes: u32) -> u8 {
    match bytes {
        0..=256 => 1,
        257..=512 => 2,
        513..=1024 => 3,
        1025..=2048 => 4,
        _ => 5,
    }
}

/// Bytes of an IB path MTU code, if valid.
pub fn mtu_bytes(code: u8) -> Option<u32> {
    (1..=5).contains(&code).then(|| 128u32 << code)
}

/// IB time code `t` (4.096 µs × 2^t) in milliseconds, at least 1.
pub fn timeout_ms(t: u8) -> u64 {
    let ns = 4096u64 << t.min(31);
    (ns / 1_000_000).max(1)
}

/// A Connection Request (table 106), primary path only.
///
/// Fields are named as in the IBTA tables (and Linux's `CM_*` field macros).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    pub local_comm_id: u32,
    pub service_id: u64,
    pub local_ca_guid: u64,
    pub local_qkey: u32,
    pub local_qpn: u32,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    /// Time code the sender expects the receiver to answer within.
    pub remote_cm_response_timeout: u8,
    /// 0 = RC, 1 = UC, 3 = XRC.
    pub transport_service_type: u8,
    pub end_to_end_flow_control: bool,
    pub starting_psn: u32,
    /// Time code within which the sender answers.
    pub local_cm_response_timeout: u8,
    pub retry_count: u8,
    pub pkey: u16,
    /// Path MTU code (1..=5).
    pub path_mtu: u8,
    pub rnr_retry_count: u8,
    pub max_cm_retries: u8,
    pub srq: bool,
    pub primary_local_lid: u16,
    pub primary_remote_lid: u16,
    pub primary_local_gid: [u8; 16],
    pub primary_remote_gid: [u8; 16],
    pub primary_flow_label: u32,
    pub primary_packet_rate: u8,
    pub primary_traffic_class: u8,
    pub primary_hop_limit: u8,
    pub primary_sl: u8,
    pub primary_subnet_local: bool,
    pub primary_local_ack_timeout: u8,
    /// 92 bytes.
    pub private_data: [u8; REQ_PDATA],
}

/// A Reply (table 110).
///
/// Fields are named as in the IBTA tables (and Linux's `CM_*` field macros).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rep {
    pub local_comm_id: u32,
    pub remote_comm_id: u32,
    pub local_qkey: u32,
    pub local_qpn: u32,
    pub starting_psn: u32,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub target_ack_delay: u8,
    pub failover_accepted: u8,
    pub end_to_end_flow_control: bool,
    pub rnr_retry_count: u8,
    pub srq: bool,
    pub local_ca_guid: u64,
    /// 196 bytes.
    pub private_data: Vec<u8>,
}

/// One CM message.
///
/// Fields are named as in the IBTA tables (and Linux's `CM_*` field macros).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmMessage {
    Req(Box<Req>),
    Rep(Box<Rep>),
    Rtu {
        local_comm_id: u32,
        remote_comm_id: u32,
        private_data: Vec<u8>,
    },
    Rej {
        local_comm_id: u32,
        remote_comm_id: u32,
        /// 0 = REQ, 1 = REP, 2 = other.
        message_rejected: u8,
        reason: u16,
        /// Additional reject information (its length is the field's).
        ari: Vec<u8>,
        private_data: Vec<u8>,
    },
    Mra {
        local_comm_id: u32,
        remote_comm_id: u32,
        /// 0 = REQ, 1 = REP, 2 = LAP.
        message_mraed: u8,
        /// Time code the sender needs before it answers.
        service_timeout: u8,
        private_data: Vec<u8>,
    },
    Dreq {
        local_comm_id: u32,
        remote_comm_id: u32,
        remote_qpn: u32,
        private_data: Vec<u8>,
    },
    Drep {
        local_comm_id: u32,
        remote_comm_id: u32,
        private_data: Vec<u8>,
    },
}

/// A CM MAD: the transaction ID of its header and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmMad {
    /// Transaction ID (a connection's REQ, REP, RTU and REJ share the REQ's; a
    /// DREQ and its DREP have their own).
    pub tid: u64,
    /// The message.
    pub msg: CmMessage,
}

fn pdata_into(buf: &mut [u8], at: usize, room: usize, data: &[u8]) {
    let n = data.len().min(room);
    buf[at..at + n].copy_from_slice(&data[..n]);
}

impl CmMessage {
    /// The attribute ID of the message.
    pub fn attr(&self) -> AttrId {
        match self {
            CmMessage::Req(_) => AttrId::Req,
            CmMessage::Rep(_) => AttrId::Rep,
            CmMessage::Rtu { .. } => AttrId::Rtu,
            CmMessage::Rej { .. } => AttrId::Rej,
            CmMessage::Mra { .. } => AttrId::Mra,
            CmMessage::Dreq { .. } => AttrId::Dreq,
            CmMessage::Drep { .. } => AttrId::Drep,
        }
    }

    /// The sender's communication ID.
    pub fn local_comm_id(&self) -> u32 {
        match self {
            CmMessage::Req(r) => r.local_comm_id,
            CmMessage::Rep(r) => r.local_comm_id,
            CmMessage::Rtu { local_comm_id, .. }
            | CmMessage::Rej { local_comm_id, .. }
            | CmMessage::Mra { local_comm_id, .. }
            | CmMessage::Dreq { local_comm_id, .. }
            | CmMessage::Drep { local_comm_id, .. } => *local_comm_id,
        }
    }

    /// The receiver's communication ID (0 in a REQ).
    pub fn remote_comm_id(&self) -> u32 {
        match self {
            CmMessage::Req(_) => 0,
            CmMessage::Rep(r) => r.remote_comm_id,
            CmMessage::Rtu { remote_comm_id, .. }
            | CmMessage::Rej { remote_comm_id, .. }
            | CmMessage::Mra { remote_comm_id, .. }
            | CmMessage::Dreq { remote_comm_id, .. }
            | CmMessage::Drep { remote_comm_id, .. } => *remote_comm_id,
        }
    }
}

impl CmMad {
    /// The 256-byte MAD. Private data longer than the message's room is cut (callers
    /// check lengths first).
    pub fn encode(&self) -> [u8; MAD_LEN] {
        let mut b = [0u8; MAD_LEN];
        b[0] = BASE_VERSION;
        b[1] = MGMT_CLASS_CM;
        b[2] = CM_CLASS_VERSION;
        b[3] = METHOD_SEND;
        put64(&mut b, 8, self.tid);
        put16(&mut b, 16, self.msg.attr() as u16);
        let c = CM;
        match &self.msg {
            CmMessage::Req(r) => {
                put32(&mut b, c, r.local_comm_id);
                put64(&mut b, c + 8, r.service_id);
                put64(&mut b, c + 16, r.local_ca_guid);
                put32(&mut b, c + 28, r.local_qkey);
                put24(&mut b, c + 32, r.local_qpn);
                b[c + 35] = r.responder_resources;
                b[c + 39] = r.initiator_depth;
                b[c + 43] = (r.remote_cm_response_timeout & 0x1F) << 3
                    | (r.transport_service_type & 3) << 1
                    | u8::from(r.end_to_end_flow_control);
                put24(&mut b, c + 44, r.starting_psn);
                b[c + 47] = (r.local_cm_response_timeout & 0x1F) << 3 | (r.retry_count & 7);
                put16(&mut b, c + 48, r.pkey);
                b[c + 50] = (r.path_mtu & 0xF) << 4 | (r.rnr_retry_count & 7);
                b[c + 51] = (r.max_cm_retries & 0xF) << 4 | u8::from(r.srq) << 3;
                put16(&mut b, c + 52, r.primary_local_lid);
                put16(&mut b, c + 54, r.primary_remote_lid);
                b[c + 56..c + 72].copy_from_slice(&r.primary_local_gid);
                b[c + 72..c + 88].copy_from_slice(&r.primary_remote_gid);
                put32(&mut b, c + 88, (r.primary_flow_label & 0xF_FFFF) << 12);
                b[c + 91] |= r.primary_packet_rate & 0x3F;
                b[c + 92] = r.primary_traffic_class;
                b[c + 93] = r.primary_hop_limit;
                b[c + 94] = (r.primary_sl & 0xF) << 4 | u8::from(r.primary_subnet_local) << 3;
                b[c + 95] = (r.primary_local_ack_timeout & 0x1F) << 3;
                b[c + 140..c + 232].copy_from_slice(&r.private_data);
            }
            CmMessage::Rep(r) => {
                put32(&mut b, c, r.local_comm_id);
                put32(&mut b, c + 4, r.remote_comm_id);
                put32(&mut b, c + 8, r.local_qkey);
                put24(&mut b, c + 12, r.local_qpn);
                put24(&mut b, c + 20, r.starting_psn);
                b[c + 24] = r.responder_resources;
                b[c + 25] = r.initiator_depth;
                b[c + 26] = (r.target_ack_delay & 0x1F) << 3
                    | (r.failover_accepted & 3) << 1
                    | u8::from(r.end_to_end_flow_control);
                b[c + 27] = (r.rnr_retry_count & 7) << 5 | u8::from(r.srq) << 4;
                put64(&mut b, c + 28, r.local_ca_guid);
                pdata_into(&mut b, c + 36, REP_PDATA, &r.private_data);
            }
            CmMessage::Rtu {
                local_comm_id,
                remote_comm_id,
                private_data,
            }
            | CmMessage::Drep {
                local_comm_id,
                remote_comm_id,
                private_data,
            } => {
                put32(&mut b, c, *local_comm_id);
                put32(&mut b, c + 4, *remote_comm_id);
                pdata_into(&mut b, c + 8, RTU_PDATA, private_data);
            }
            CmMessage::Rej {
                local_comm_id,
                remote_comm_id,
                message_rejected,
                reason,
                ari,
                private_data,
            } => {
                put32(&mut b, c, *local_comm_id);
                put32(&mut b, c + 4, *remote_comm_id);
                b[c + 8] = (message_rejected & 3) << 6;
                let ari_len = ari.len().min(72);
                b[c + 9] = (ari_len as u8) << 1;
                put16(&mut b, c + 10, *reason);
                b[c + 12..c + 12 + ari_len].copy_from_slice(&ari[..ari_len]);
                pdata_into(&mut b, c + 84, REJ_PDATA, private_data);
            }
            CmMessage::Mra {
                local_comm_id,
                remote_comm_id,
                message_mraed,
                service_timeout,
                private_data,
            } => {
                put32(&mut b, c, *local_comm_id);
                put32(&mut b, c + 4, *remote_comm_id);
                b[c + 8] = (message_mraed & 3) << 6;
                b[c + 9] = (service_timeout & 0x1F) << 3;
                pdata_into(&mut b, c + 10, MRA_PDATA, private_data);
            }
            CmMessage::Dreq {
                local_comm_id,
                remote_comm_id,
                remote_qpn,
                private_data,
            } => {
                put32(&mut b, c, *local_comm_id);
                put32(&mut b, c + 4, *remote_comm_id);
                put24(&mut b, c + 8, *remote_qpn);
                pdata_into(&mut b, c + 12, DREQ_PDATA, private_data);
            }
        }
        b
    }

    /// Decodes a MAD (at least 256 bytes; more is ignored).
    pub fn decode(b: &[u8]) -> Result<CmMad, MadError> {
        if b.len() < MAD_LEN {
            return Err(MadError::Truncated);
        }
        let b = &b[..MAD_LEN];
        if b[0] != BASE_VERSION || b[1] != MGMT_CLASS_CM || b[2] != CM_CLASS_VERSION {
            return Err(MadError::WrongClass {
                base: b[0],
                class: b[1],
                version: b[2],
            });
        }
        if b[3] != METHOD_SEND {
            return Err(MadError::WrongMethod(b[3]));
        }
        let tid = be64(b, 8);
        let attr = be16(b, 16);
        let attr = AttrId::from_u16(attr).ok_or(MadError::UnknownAttribute(attr))?;
        let c = CM;
        let ids = (be32(b, c), be32(b, c + 4));
        let msg = match attr {
            AttrId::Req => {
                let mut lg = [0u8; 16];
                lg.copy_from_slice(&b[c + 56..c + 72]);
                let mut rg = [0u8; 16];
                rg.copy_from_slice(&b[c + 72..c + 88]);
                let mut pd = [0u8; REQ_PDATA];
                pd.copy_from_slice(&b[c + 140..c + 232]);
                CmMessage::Req(Box::new(Req {
                    local_comm_id: ids.0,
                    service_id: be64(b, c + 8),
                    local_ca_guid: be64(b, c + 16),
                    local_qkey: be32(b, c + 28),
                    local_qpn: be24(b, c + 32),
                    responder_resources: b[c + 35],
                    initiator_depth: b[c + 39],
                    remote_cm_response_timeout: b[c + 43] >> 3,
                    transport_service_type: (b[c + 43] >> 1) & 3,
                    end_to_end_flow_control: b[c + 43] & 1 != 0,
                    starting_psn: be24(b, c + 44),
                    local_cm_response_timeout: b[c + 47] >> 3,
                    retry_count: b[c + 47] & 7,
                    pkey: be16(b, c + 48),
                    path_mtu: b[c + 50] >> 4,
                    rnr_retry_count: b[c + 50] & 7,
                    max_cm_retries: b[c + 51] >> 4,
                    srq: b[c + 51] & 8 != 0,
                    primary_local_lid: be16(b, c + 52),
                    primary_remote_lid: be16(b, c + 54),
                    primary_local_gid: lg,
                    primary_remote_gid: rg,
                    primary_flow_label: be32(b, c + 88) >> 12,
                    primary_packet_rate: b[c + 91] & 0x3F,
                    primary_traffic_class: b[c + 92],
                    primary_hop_limit: b[c + 93],
                    primary_sl: b[c + 94] >> 4,
                    primary_subnet_local: b[c + 94] & 8 != 0,
                    primary_local_ack_timeout: b[c + 95] >> 3,
                    private_data: pd,
                }))
            }
            AttrId::Rep => CmMessage::Rep(Box::new(Rep {
                local_comm_id: ids.0,
                remote_comm_id: ids.1,
                local_qkey: be32(b, c + 8),
                local_qpn: be24(b, c + 12),
                starting_psn: be24(b, c + 20),
                responder_resources: b[c + 24],
                initiator_depth: b[c + 25],
                target_ack_delay: b[c + 26] >> 3,
                failover_accepted: (b[c + 26] >> 1) & 3,
                end_to_end_flow_control: b[c + 26] & 1 != 0,
                rnr_retry_count: b[c + 27] >> 5,
                srq: b[c + 27] & 0x10 != 0,
                local_ca_guid: be64(b, c + 28),
                private_data: b[c + 36..c + 36 + REP_PDATA].to_vec(),
            })),
            AttrId::Rtu => CmMessage::Rtu {
                local_comm_id: ids.0,
                remote_comm_id: ids.1,
                private_data: b[c + 8..c + 8 + RTU_PDATA].to_vec(),
            },
            AttrId::Drep => CmMessage::Drep {
                local_comm_id: ids.0,
                remote_comm_id: ids.1,
                private_data: b[c + 8..c + 8 + DREP_PDATA].to_vec(),
            },
            AttrId::Rej => {
                let ari_len = usize::from(b[c + 9] >> 1);
                if ari_len > 72 {
                    return Err(MadError::Malformed("REJ additional information > 72 bytes"));
                }
                CmMessage::Rej {
                    local_comm_id: ids.0,
                    remote_comm_id: ids.1,
                    message_rejected: b[c + 8] >> 6,
                    reason: be16(b, c + 10),
                    ari: b[c + 12..c + 12 + ari_len].to_vec(),
                    private_data: b[c + 84..c + 84 + REJ_PDATA].to_vec(),
                }
            }
            AttrId::Mra => CmMessage::Mra {
                local_comm_id: ids.0,
                remote_comm_id: ids.1,
                message_mraed: b[c + 8] >> 6,
                service_timeout: b[c + 9] >> 3,
                private_data: b[c + 10..c + 10 + MRA_PDATA].to_vec(),
            },
            AttrId::Dreq => CmMessage::Dreq {
                local_comm_id: ids.0,
                remote_comm_id: ids.1,
                remote_qpn: be24(b, c + 8),
                private_data: b[c + 12..c + 12 + DREQ_PDATA].to_vec(),
            },
        };
        if msg.local_comm_id() == 0 {
            return Err(MadError::Malformed("local communication ID 0"));
        }
        Ok(CmMad { tid, msg })
    }
}

/// rdma_cm's header at the front of a REQ's private data (`struct cma_hdr`, IPv4):
/// version 0, IP version 4 in the high nibble, the source port, and the source and
/// destination addresses as 16-byte unions with IPv4 in the last four bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmaHdr {
    /// The connecting side's port.
    pub src_port: u16,
    /// The connecting side's address.
    pub src: Ipv4Addr,
    /// The listening side's address.
    pub dst: Ipv4Addr,
}

impl CmaHdr {
    /// Writes the 36-byte header.
    pub fn encode(&self) -> [u8; CMA_HDR_LEN] {
        let mut b = [0u8; CMA_HDR_LEN];
        b[0] = 0x00;
        b[1] = 0x40;
        put16(&mut b, 2, self.src_port);
        b[16..20].copy_from_slice(&self.src.octets());
        b[32..36].copy_from_slice(&self.dst.octets());
        b
    }

    /// Reads the header (IPv4 only; an IPv6 header or another version is an error).
    pub fn decode(b: &[u8]) -> Result<CmaHdr, MadError> {
        if b.len() < CMA_HDR_LEN {
            return Err(MadError::Truncated);
        }
        if b[0] != 0 {
            return Err(MadError::Malformed("cma_hdr version is not 0"));
        }
        if b[1] >> 4 != 4 {
            return Err(MadError::Malformed("cma_hdr is not IPv4"));
        }
        Ok(CmaHdr {
            src_port: be16(b, 2),
            src: Ipv4Addr::new(b[16], b[17], b[18], b[19]),
            dst: Ipv4Addr::new(b[32], b[33], b[34], b[35]),
        })
    }
}

/// The UD packet (BTH + DETH + MAD + ICRC) that carries `mad` from QP1 of `src` to
/// QP1 of `dst`, sent from UDP port 4791 to port 4791 (the ICRC covers the UDP
/// header but its checksum, so the ports must be those the datagram carries).
pub fn build_gsi_packet(mad: &[u8; MAD_LEN], psn: u32, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut repr = RoceRepr::new(BthRepr {
        opcode: Opcode::UD_SEND_ONLY,
        solicited: false,
        migreq: false,
        pad_count: 0,
        pkey: PKEY_DEFAULT,
        fecn: false,
        becn: false,
        dest_qpn: GSI_QPN,
        ack_req: false,
        psn: psn & 0xFF_FFFF,
    });
    repr.deth = Some(DethRepr {
        qkey: GSI_QKEY,
        src_qpn: GSI_QPN,
    });
    let icrc = IcrcContext::rxe(
        src,
        dst,
        crate::wire::ROCE_UDP_PORT,
        crate::wire::ROCE_UDP_PORT,
    );
    // The representation is valid by construction (UD SEND with DETH), so `build`
    // cannot fail; an empty packet would be dropped by any receiver.
    repr.build(mad, &icrc).unwrap_or_default()
}

/// The MAD of a QP1 packet whose ICRC the caller has verified: checks opcode, P_Key,
/// destination QPN and Q_Key, and returns the first 256 payload bytes with the
/// sender's QPN.
pub fn gsi_payload(packet: &[u8]) -> Result<(&[u8], u32), MadError> {
    let p = RocePacket::new_checked(packet).map_err(|_| MadError::Truncated)?;
    if p.opcode() != Opcode::UD_SEND_ONLY {
        return Err(MadError::NotGsi("not a UD SEND ONLY"));
    }
    let bth = p.bth();
    if bth.dest_qpn() != GSI_QPN {
        return Err(MadError::NotGsi("destination QPN is not 1"));
    }
    if bth.pkey() & 0x7FFF != PKEY_DEFAULT & 0x7FFF {
        return Err(MadError::NotGsi("P_Key is not the default partition"));
    }
    let deth = p.deth().ok_or(MadError::NotGsi("no DETH"))?;
    if deth.qkey() != GSI_QKEY {
        return Err(MadError::NotGsi("Q_Key is not 0x80010000"));
    }
    let src_qpn = deth.src_qpn();
    let payload = p.payload();
    if payload.len() < MAD_LEN {
        return Err(MadError::Truncated);
    }
    // Re-borrow from the caller's buffer: `payload` borrows `p`, which borrows it.
    let off = payload.as_ptr() as usize - packet.as_ptr() as usize;
    Ok((&packet[off..off + MAD_LEN], src_qpn))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A REQ as Linux's cm_format_req + cma_format_hdr build it for an rdma_cm
    /// client on kernel rxe (rping -c -a 10.0.2.1 -p 7174 from 10.0.2.2): every field
    /// set by hand at its table-106 offset, then decoded.
    #[test]
    fn decodes_a_req_laid_out_by_hand_as_rxe_sends_it() {
        let mut m = [0u8; MAD_LEN];
        m[..4].copy_from_slice(&[1, 0x07, 2, 0x03]);
        m[8..16].copy_from_slice(&0x0000_0001_0000_0007u64.to_be_bytes()); // tid
        m[16..18].copy_from_slice(&[0x00, 0x10]); // attr REQ
        let c = 24;
        m[c..c + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // local comm id
        m[c + 8..c + 16].copy_from_slice(&0x0000_0000_0106_1C06u64.to_be_bytes()); // sid port 7174
        m[c + 16..c + 24].copy_from_slice(&0x5054_00ff_fe12_3456u64.to_be_bytes()); // guid
        m[c + 28..c + 32].copy_from_slice(&0u32.to_be_bytes()); // qkey (RC: 0)
        m[c + 32..c + 35].copy_from_slice(&[0x00, 0x00, 0x11]); // qpn 0x11
        m[c + 35] = 1; // responder resources
        m[c + 39] = 1; // initiator depth
        m[c + 43] = 20 << 3; // remote cm response timeout 20, RC, no e2e
        m[c + 44..c + 47].copy_from_slice(&[0xAB, 0xCD, 0xEF]); // psn
        m[c + 47] = (20 << 3) | 7; // local timeout 20, retry 7
        m[c + 48..c + 50].copy_from_slice(&[0xFF, 0xFF]); // pkey
        m[c + 50] = (3 << 4) | 7; // MTU 1024, rnr retry 7
        m[c + 51] = 15 << 4; // max cm retries 15
        m[c + 52..c + 56].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]); // permissive LIDs
        m[c + 56..c + 72].copy_from_slice(&gid_of(Ipv4Addr::new(10, 0, 2, 2)));
        m[c + 72..c + 88].copy_from_slice(&gid_of(Ipv4Addr::new(10, 0, 2, 1)));
        m[c + 91] = 3; // rate 10 Gb/s
        m[c + 93] = 64; // hop limit
        m[c + 95] = 18 << 3; // ack timeout 18
                             // cma_hdr
        m[c + 140] = 0;
        m[c + 141] = 0x40;
        m[c + 142..c + 144].copy_from_slice(&50000u16.to_be_bytes());
        m[c + 156..c + 160].copy_from_slice(&[10, 0, 2, 2]);
        m[c + 172..c + 176].copy_from_slice(&[10, 0, 2, 1]);
        m[c + 176..c + 181].copy_from_slice(b"hello");

        let mad = CmMad::decode(&m).unwrap();
        assert_eq!(mad.tid, 0x0000_0001_0000_0007);
        let CmMessage::Req(r) = &mad.msg else {
            panic!("{mad:?}")
        };
        assert_eq!(r.local_comm_id, 0x1234_5678);
        assert_eq!(service_port(r.service_id), Some(7174));
        assert_eq!(r.local_qpn, 0x11);
        assert_eq!(r.starting_psn, 0xABCDEF);
        assert_eq!(r.responder_resources, 1);
        assert_eq!(r.initiator_depth, 1);
        assert_eq!(r.remote_cm_response_timeout, 20);
        assert_eq!(r.transport_service_type, 0);
        assert_eq!(r.local_cm_response_timeout, 20);
        assert_eq!(r.retry_count, 7);
        assert_eq!(r.pkey, 0xFFFF);
        assert_eq!(mtu_bytes(r.path_mtu), Some(1024));
        assert_eq!(r.rnr_retry_count, 7);
        assert_eq!(r.max_cm_retries, 15);
        assert_eq!(
            ipv4_of_gid(&r.primary_local_gid),
            Some(Ipv4Addr::new(10, 0, 2, 2))
        );
        assert_eq!(
            ipv4_of_gid(&r.primary_remote_gid),
            Some(Ipv4Addr::new(10, 0, 2, 1))
        );
        assert_eq!(r.primary_packet_rate, 3);
        assert_eq!(r.primary_hop_limit, 64);
        assert_eq!(r.primary_local_ack_timeout, 18);
        let h = CmaHdr::decode(&r.private_data).unwrap();
        assert_eq!(
            h,
            CmaHdr {
                src_port: 50000,
                src: Ipv4Addr::new(10, 0, 2, 2),
                dst: Ipv4Addr::new(10, 0, 2, 1)
            }
        );
        assert_eq!(&r.private_data[36..41], b"hello");
        // And back, byte for byte.
        assert_eq!(mad.encode(), m);
    }

    #[test]
    fn every_message_round_trips_at_its_offsets() {
        let msgs = vec![
            CmMessage::Rep(Box::new(Rep {
                local_comm_id: 7,
                remote_comm_id: 9,
                local_qkey: 0,
                local_qpn: 0xABCDE,
                starting_psn: 0x123456,
                responder_resources: 16,
                initiator_depth: 4,
                target_ack_delay: 15,
                failover_accepted: 0,
                end_to_end_flow_control: true,
                rnr_retry_count: 7,
                srq: false,
                local_ca_guid: 0x1122_3344_5566_7788,
                private_data: vec![0xEE; REP_PDATA],
            })),
            CmMessage::Rtu {
                local_comm_id: 1,
                remote_comm_id: 2,
                private_data: vec![3; RTU_PDATA],
            },
            CmMessage::Rej {
                local_comm_id: 1,
                remote_comm_id: 2,
                message_rejected: 0,
                reason: rej::CONSUMER_DEFINED,
                ari: vec![],
                private_data: vec![4; REJ_PDATA],
            },
            CmMessage::Mra {
                local_comm_id: 1,
                remote_comm_id: 2,
                message_mraed: 0,
                service_timeout: 23,
                private_data: vec![0; MRA_PDATA],
            },
            CmMessage::Dreq {
                local_comm_id: 1,
                remote_comm_id: 2,
                remote_qpn: 0x42,
                private_data: vec![5; DREQ_PDATA],
            },
            CmMessage::Drep {
                local_comm_id: 1,
                remote_comm_id: 2,
                private_data: vec![0; DREP_PDATA],
            },
        ];
        for msg in msgs {
            let mad = CmMad { tid: 77, msg };
            let b = mad.encode();
            assert_eq!(CmMad::decode(&b).unwrap(), mad);
        }
        // Spot checks against the tables.
        let b = CmMad {
            tid: 1,
            msg: CmMessage::Rej {
                local_comm_id: 0xAABBCCDD,
                remote_comm_id: 0x11223344,
                message_rejected: 1,
                reason: 28,
                ari: vec![],
                private_data: b"no".to_vec(),
            },
        }
        .encode();
        assert_eq!(&b[16..18], &[0, 0x12]);
        assert_eq!(
            &b[24..32],
            &[0xAA, 0xBB, 0xCC, 0xDD, 0x11, 0x22, 0x33, 0x44]
        );
        assert_eq!(b[32], 0x40);
        assert_eq!(&b[34..36], &[0, 28]);
        assert_eq!(&b[108..110], b"no");
    }

    #[test]
    fn foreign_and_short_mads_are_errors() {
        let good = CmMad {
            tid: 1,
            msg: CmMessage::Drep {
                local_comm_id: 1,
                remote_comm_id: 2,
                private_data: vec![],
            },
        }
        .encode();
        assert_eq!(CmMad::decode(&good[..255]), Err(MadError::Truncated));
        let mut b = good;
        b[1] = 0x81; // SMP
        assert!(matches!(
            CmMad::decode(&b),
            Err(MadError::WrongClass { .. })
        ));
        let mut b = good;
        b[16..18].copy_from_slice(&[0, 0x19]); // LAP
        assert_eq!(CmMad::decode(&b), Err(MadError::UnknownAttribute(0x19)));
        let mut b = good;
        b[3] = 0x01; // GET
        assert_eq!(CmMad::decode(&b), Err(MadError::WrongMethod(1)));
        let mut b = good;
        b[24..28].fill(0);
        assert!(matches!(CmMad::decode(&b), Err(MadError::Malformed(_))));
    }

    #[test]
    fn gsi_packet_round_trip() {
        let mad = [0x5Au8; MAD_LEN];
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let pkt = build_gsi_packet(&mad, 5, a, b);
        assert_eq!(pkt.len(), 12 + 8 + 256 + 4);
        assert_eq!(pkt[0], 0x64);
        assert_eq!(&pkt[2..4], &[0xFF, 0xFF]);
        assert_eq!(&pkt[5..8], &[0, 0, 1]);
        assert_eq!(&pkt[12..16], &0x8001_0000u32.to_be_bytes());
        IcrcContext::rxe(a, b, 4791, 4791).verify(&pkt).unwrap();
        let (m, src) = gsi_payload(&pkt).unwrap();
        assert_eq!((m, src), (&mad[..], 1));
        let mut bad = pkt.clone();
        bad[12] = 0; // Q_Key
        assert!(gsi_payload(&bad).is_err());
        assert!(gsi_payload(&pkt[..100]).is_err());
    }

    #[test]
    fn service_ids_and_codes() {
        assert_eq!(service_id(7471), 0x0000_0000_0106_1D2F);
        assert_eq!(service_port(0x0000_0000_0106_1D2F), Some(7471));
        assert_eq!(service_port(0x0000_0000_0111_1D2F), None);
        assert_eq!(mtu_code(4096), 5);
        assert_eq!(mtu_bytes(3), Some(1024));
        assert_eq!(mtu_bytes(6), None);
        assert_eq!(timeout_ms(20), 4294);
        assert_eq!(timeout_ms(0), 1);
    }
}
