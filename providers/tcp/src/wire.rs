//! The tcp provider's wire format: a fixed header, optional remote iovecs, then the
//! payload, all little-endian.
//!
//! ```text
//!  0       1       2               4               6       7       8
//!  +-------+-------+---------------+---------------+-------+-------+
//!  |version|  op   |    flags      |   hdr_size    |iov_cnt|status |
//!  +-------+-------+---------------+---------------+-------+-------+
//!  |                         op_id (u64)                           |  8
//!  +---------------------------------------------------------------+
//!  |                    size: payload bytes (u64)                  | 16
//!  +---------------------------------------------------------------+
//!  |          data: remote CQ data, or for an error ACK the        | 24
//!  |               index of the refused remote iovec (u64)         |
//!  +---------------------------------------------------------------+
//!  | iov_cnt x { addr u64, len u64, key u64 }   (24 bytes each)    | 32
//!  +---------------------------------------------------------------+
//!  | size bytes of payload                                         |
//! ```
//! `hdr_size` is `32 + 24 * iov_cnt`; `version` is [`VERSION`].
//!
//! Operations ([`Op`]):
//! - `CONN_REQ` (client to server, payload = connection data) and `CONN_RESP` (status
//!   0 accept, 1 reject; payload = accept / reject data) set a connection up.
//! - `MSG`: a message; flag `CQ_DATA` carries `data`, flag `DELIVERY` asks for an `ACK`
//!   once the message has been placed in a posted receive.
//! - `WRITE`: `size` payload bytes for the remote iovecs (their lengths sum to `size`);
//!   answered by an `ACK` carrying a [`Status`] unless flag `NO_ACK` is set (a write
//!   posted at transmit level: the initiator completed it when it handed it to its
//!   socket, as libfabric's tcp provider acknowledges only delivery and commit; a
//!   refusal is still answered, and ends the connection). Flag `CQ_DATA`: the target
//!   consumes a posted receive to report `data`, and sends the `ACK` only once it has
//!   (a write whose data finds no receive waits for one). Flag `COMMIT` (a write posted with
//!   `COMMIT_COMPLETE`): every remote iovec must lie in a region registered `PMEM`,
//!   else the target discards the payload and answers `NOT_PMEM`; otherwise it places
//!   the payload, persists every range, and only then answers `OK` (or
//!   `OPERATION_FAILED` if persisting failed).
//! - `READ_REQ`: no payload; the remote iovecs name what to read. Answered by
//!   `READ_RESP` with the same `op_id`: status OK and the data, or an error status and
//!   no payload.
//! - `ACK`: no payload; `op_id` names the `WRITE` or `MSG` it acknowledges.
//!
//! An `ACK` or `READ_RESP` whose status refuses the access
//! ([`Status::is_access_refusal`]) is the last thing the target sends: it ignores the
//! rest of the stream and closes, and the initiator ends the connection on reading it.
//!
//! Every header from a peer is validated ([`Header::parse`]) before anything acts on
//! it; a malformed header is a protocol error that tears the connection down.

use std::fmt;

/// Protocol version carried in every header.
pub const VERSION: u8 = 1;
/// Size of the fixed part of a header.
pub const BASE_HDR_SIZE: usize = 32;
/// Size of one remote iovec on the wire.
pub const WIRE_IOV_SIZE: usize = 24;
/// Most remote iovecs a header may carry.
pub const MAX_RMA_IOV: usize = 8;
/// Largest header: the fixed part and [`MAX_RMA_IOV`] iovecs.
pub const MAX_HDR_SIZE: usize = BASE_HDR_SIZE + MAX_RMA_IOV * WIRE_IOV_SIZE;
/// Largest payload of a message or RMA operation (1 GiB).
pub const MAX_MSG_SIZE: u64 = 1 << 30;
/// Largest connection data in CONN_REQ / CONN_RESP.
pub const MAX_CM_DATA: u64 = 256;

/// Header flag: `data` holds remote CQ data.
pub const FLAG_CQ_DATA: u16 = 1 << 0;
/// Header flag: the initiator wants an ACK once the operation took effect (MSG).
pub const FLAG_DELIVERY: u16 = 1 << 1;
/// Header flag: commit (persist) the written ranges before the ACK (WRITE only).
pub const FLAG_COMMIT: u16 = 1 << 2;
/// Header flag: the initiator wants no `ACK` for this write when it succeeds (WRITE
/// only, never with `CQ_DATA` or `COMMIT`, whose ACKs carry their meaning).
pub const FLAG_NO_ACK: u16 = 1 << 3;
const KNOWN_FLAGS: u16 = FLAG_CQ_DATA | FLAG_DELIVERY | FLAG_COMMIT | FLAG_NO_ACK;

/// Operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Connection request with connection data.
    ConnReq = 1,
    /// Connection response: accept or reject, with data.
    ConnResp = 2,
    /// A message.
    Msg = 3,
    /// An RMA write.
    Write = 4,
    /// An RMA read request.
    ReadReq = 5,
    /// The response to a read request.
    ReadResp = 6,
    /// Acknowledgement of a write or a delivery-complete message.
    Ack = 7,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::ConnReq,
            2 => Op::ConnResp,
            3 => Op::Msg,
            4 => Op::Write,
            5 => Op::ReadReq,
            6 => Op::ReadResp,
            7 => Op::Ack,
            _ => return None,
        })
    }
}

/// Outcome carried by ACK, READ_RESP and CONN_RESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done (or: connection accepted).
    Ok = 0,
    /// No region with this key (or: connection rejected, in CONN_RESP).
    BadKey = 1,
    /// The range is outside the region.
    OutOfBounds = 2,
    /// The region lacks the remote access right.
    NoAccess = 3,
    /// The request is not valid at the target.
    Invalid = 4,
    /// The target failed to carry the request out (e.g. persisting failed).
    OperationFailed = 5,
    /// A COMMIT write named a region that is not registered PMEM.
    NotPmem = 6,
}

impl Status {
    /// CONN_RESP status meaning "rejected".
    pub const REJECTED: Status = Status::BadKey;

    fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::BadKey,
            2 => Status::OutOfBounds,
            3 => Status::NoAccess,
            4 => Status::Invalid,
            5 => Status::OperationFailed,
            6 => Status::NotPmem,
            _ => return None,
        })
    }

    /// Whether the status refuses a remote access (key, bounds, rights, COMMIT into a
    /// region not registered PMEM, or a malformed request): such a refusal ends the
    /// connection at both ends, as the NAK of an RC queue pair does.
    pub fn is_access_refusal(self) -> bool {
        matches!(
            self,
            Status::BadKey
                | Status::OutOfBounds
                | Status::NoAccess
                | Status::Invalid
                | Status::NotPmem
        )
    }

    /// Human-readable reason, for error completions.
    pub fn describe(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadKey => "no region with that key",
            Status::OutOfBounds => "range outside the region",
            Status::NoAccess => "region lacks the remote access right",
            Status::Invalid => "invalid request",
            Status::OperationFailed => "operation failed at the target",
            Status::NotPmem => "region is not registered PMEM (COMMIT refused)",
        }
    }
}

/// A remote iovec on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireIov {
    /// Remote address (offset into the region).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Region key.
    pub key: u64,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "protocol error: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

fn perr(msg: impl Into<String>) -> ProtocolError {
    ProtocolError(msg.into())
}

/// A validated header (the high-level form of the bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Operation.
    pub op: Op,
    /// Flags (`FLAG_*`).
    pub flags: u16,
    /// Status (ACK, READ_RESP, CONN_RESP).
    pub status: Status,
    /// Initiator's operation id.
    pub op_id: u64,
    /// Payload bytes that follow the header.
    pub size: u64,
    /// Remote CQ data, or the refused iovec index in an error ACK.
    pub data: u64,
    /// Number of valid entries in `iovs`.
    pub iov_count: u8,
    /// Remote iovecs (WRITE, READ_REQ).
    pub iovs: [WireIov; MAX_RMA_IOV],
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(x)
}

impl Header {
    /// A header with no iovecs.
    pub fn new(op: Op, op_id: u64, size: u64) -> Header {
        Header {
            op,
            flags: 0,
            status: Status::Ok,
            op_id,
            size,
            data: 0,
            iov_count: 0,
            iovs: [WireIov::default(); MAX_RMA_IOV],
        }
    }

    /// Bytes this header occupies on the wire.
    pub fn wire_len(&self) -> usize {
        BASE_HDR_SIZE + self.iov_count as usize * WIRE_IOV_SIZE
    }

    /// The remote iovecs.
    pub fn iovs(&self) -> &[WireIov] {
        &self.iovs[..self.iov_count as usize]
    }

    /// Total length named by the remote iovecs (validated not to overflow).
    pub fn iov_total(&self) -> u64 {
        self.iovs().iter().map(|v| v.len).sum()
    }

    /// From the fixed part of a header, the full header size (fixed part plus iovecs).
    /// Checks the version and the size so the caller knows how many bytes to wait for.
    pub fn peek_size(base: &[u8]) -> Result<usize, ProtocolError> {
        if base.len() < BASE_HDR_SIZE {
            return Err(perr("short header"));
        }
        if base[0] != VERSION {
            return Err(perr(format!(
                "version {} (this side speaks {VERSION})",
                base[0]
            )));
        }
        let count = base[6] as usize;
        if count > MAX_RMA_IOV {
            return Err(perr(format!("{count} remote iovecs (max {MAX_RMA_IOV})")));
        }
        let hdr_size = u16_at(base, 4) as usize;
        if hdr_size != BASE_HDR_SIZE + count * WIRE_IOV_SIZE {
            return Err(perr(format!(
                "header size {hdr_size} does not match {count} iovecs"
            )));
        }
        Ok(hdr_size)
    }

    /// Parses and validates a complete header (`buf` may hold more bytes after it).
    pub fn parse(buf: &[u8]) -> Result<Header, ProtocolError> {
        let hdr_size = Self::peek_size(buf)?;
        if buf.len() < hdr_size {
            return Err(perr("short header"));
        }
        let op = Op::from_u8(buf[1]).ok_or_else(|| perr(format!("unknown op {}", buf[1])))?;
        let flags = u16_at(buf, 2);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(perr(format!("unknown flags {flags:#x}")));
        }
        let status =
            Status::from_u8(buf[7]).ok_or_else(|| perr(format!("unknown status {}", buf[7])))?;
        let iov_count = buf[6];
        let mut h = Header {
            op,
            flags,
            status,
            op_id: u64_at(buf, 8),
            size: u64_at(buf, 16),
            data: u64_at(buf, 24),
            iov_count,
            iovs: [WireIov::default(); MAX_RMA_IOV],
        };
        for i in 0..iov_count as usize {
            let o = BASE_HDR_SIZE + i * WIRE_IOV_SIZE;
            h.iovs[i] = WireIov {
                addr: u64_at(buf, o),
                len: u64_at(buf, o + 8),
                key: u64_at(buf, o + 16),
            };
        }
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        let op = self.op;
        let has_iovs = matches!(op, Op::Write | Op::ReadReq);
        if has_iovs && self.iov_count == 0 {
            return Err(perr(format!("{op:?} without remote iovecs")));
        }
        if !has_iovs && self.iov_count != 0 {
            return Err(perr(format!("{op:?} with remote iovecs")));
        }
        if self.status != Status::Ok && !matches!(op, Op::Ack | Op::ReadResp | Op::ConnResp) {
            return Err(perr(format!("{op:?} with a status")));
        }
        if self.flags & FLAG_CQ_DATA != 0 && !matches!(op, Op::Msg | Op::Write) {
            return Err(perr(format!("{op:?} with CQ data")));
        }
        if self.flags & FLAG_DELIVERY != 0 && op != Op::Msg {
            return Err(perr(format!("{op:?} with the delivery flag")));
        }
        if self.flags & FLAG_COMMIT != 0 && op != Op::Write {
            return Err(perr(format!("{op:?} with the commit flag")));
        }
        if self.flags & FLAG_NO_ACK != 0
            && (op != Op::Write || self.flags & (FLAG_CQ_DATA | FLAG_COMMIT) != 0)
        {
            return Err(perr(format!(
                "{op:?} with the no-ack flag (a write without CQ data or commit only)"
            )));
        }
        if self.size > MAX_MSG_SIZE {
            return Err(perr(format!(
                "payload of {} bytes exceeds {MAX_MSG_SIZE}",
                self.size
            )));
        }
        let mut total: u64 = 0;
        for v in self.iovs() {
            total = total
                .checked_add(v.len)
                .filter(|t| *t <= MAX_MSG_SIZE)
                .ok_or_else(|| perr("remote iovec lengths exceed the largest transfer"))?;
        }
        match op {
            Op::ConnReq | Op::ConnResp if self.size > MAX_CM_DATA => Err(perr(format!(
                "connection data of {} bytes (max {MAX_CM_DATA})",
                self.size
            ))),
            Op::Write if total != self.size => Err(perr(format!(
                "write of {} bytes for iovecs of {total}",
                self.size
            ))),
            Op::ReadReq | Op::Ack if self.size != 0 => Err(perr(format!("{op:?} with a payload"))),
            Op::ReadResp if self.status != Status::Ok && self.size != 0 => {
                Err(perr("error READ_RESP with a payload"))
            }
            _ => Ok(()),
        }
    }

    /// Writes the header into `out` (at least [`wire_len`](Self::wire_len) bytes);
    /// returns the bytes written.
    pub fn emit(&self, out: &mut [u8]) -> usize {
        let n = self.wire_len();
        out[0] = VERSION;
        out[1] = self.op as u8;
        out[2..4].copy_from_slice(&self.flags.to_le_bytes());
        out[4..6].copy_from_slice(&(n as u16).to_le_bytes());
        out[6] = self.iov_count;
        out[7] = self.status as u8;
        out[8..16].copy_from_slice(&self.op_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.size.to_le_bytes());
        out[24..32].copy_from_slice(&self.data.to_le_bytes());
        for (i, v) in self.iovs().iter().enumerate() {
            let o = BASE_HDR_SIZE + i * WIRE_IOV_SIZE;
            out[o..o + 8].copy_from_slice(&v.addr.to_le_bytes());
            out[o + 8..o + 16].copy_from_slice(&v.len.to_le_bytes());
            out[o + 16..o + 24].copy_from_slice(&v.key.to_le_bytes());
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_hdr() -> Header {
        let mut h = Header::new(Op::Write, 7, 300);
        h.flags = FLAG_CQ_DATA;
        h.data = 0xfeed;
        h.iov_count = 2;
        h.iovs[0] = WireIov {
            addr: 0,
            len: 100,
            key: 0xabc,
        };
        h.iovs[1] = WireIov {
            addr: 4096,
            len: 200,
            key: 0xdef,
        };
        h
    }

    #[test]
    fn round_trip() {
        let h = write_hdr();
        let mut b = [0u8; MAX_HDR_SIZE];
        let n = h.emit(&mut b);
        assert_eq!(n, 32 + 48);
        assert_eq!(Header::peek_size(&b[..32]).unwrap(), n);
        assert_eq!(Header::parse(&b[..n]).unwrap(), h);
        for op in [Op::ConnReq, Op::ConnResp, Op::Msg, Op::ReadResp, Op::Ack] {
            let h = Header::new(op, 1, 0);
            let n = h.emit(&mut b);
            assert_eq!(Header::parse(&b[..n]).unwrap(), h);
        }
    }

    #[test]
    fn layout_is_little_endian() {
        let mut h = Header::new(Op::Msg, 0x0102, 5);
        h.data = 9;
        let mut b = [0u8; MAX_HDR_SIZE];
        h.emit(&mut b);
        assert_eq!(&b[..8], &[1, 3, 0, 0, 32, 0, 0, 0]);
        assert_eq!(&b[8..10], &[2, 1]);
        assert_eq!(b[16], 5);
        assert_eq!(b[24], 9);
    }

    fn corrupt(f: impl Fn(&mut [u8])) -> Result<Header, ProtocolError> {
        let mut b = [0u8; MAX_HDR_SIZE];
        let n = write_hdr().emit(&mut b);
        f(&mut b);
        Header::parse(&b[..n])
    }

    #[test]
    fn rejects_malformed_headers() {
        assert!(corrupt(|b| b[0] = 2).is_err(), "version");
        assert!(corrupt(|b| b[1] = 0).is_err(), "op");
        assert!(corrupt(|b| b[1] = 99).is_err(), "op");
        assert!(corrupt(|b| b[2] = 0x80).is_err(), "flags");
        assert!(corrupt(|b| b[4] = 33).is_err(), "hdr size");
        assert!(corrupt(|b| b[6] = 9).is_err(), "iov count");
        assert!(corrupt(|b| b[6] = 1).is_err(), "count vs size");
        assert!(corrupt(|b| b[7] = 1).is_err(), "status on write");
        assert!(corrupt(|b| b[7] = 200).is_err(), "unknown status");
        assert!(corrupt(|b| b[16] = 1).is_err(), "size vs iovs");
        assert!(corrupt(|b| b[16..24].copy_from_slice(&u64::MAX.to_le_bytes())).is_err());
        // iov lengths that overflow u64 when summed
        assert!(corrupt(|b| {
            b[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
            b[64..72].copy_from_slice(&2u64.to_le_bytes());
        })
        .is_err());
        assert!(Header::parse(&[1u8; 10]).is_err(), "short");
    }

    #[test]
    fn per_op_rules() {
        let mut b = [0u8; MAX_HDR_SIZE];
        let mut h = Header::new(Op::ConnReq, 0, 257);
        let n = h.emit(&mut b);
        assert!(Header::parse(&b[..n]).is_err(), "cm data too large");
        h = Header::new(Op::Ack, 0, 1);
        let n = h.emit(&mut b);
        assert!(Header::parse(&b[..n]).is_err(), "ack with payload");
        h = Header::new(Op::Msg, 0, 1);
        h.flags = FLAG_COMMIT;
        let n = h.emit(&mut b);
        assert!(Header::parse(&b[..n]).is_err(), "commit on msg");
        h = Header::new(Op::ReadReq, 0, 0);
        let n = h.emit(&mut b);
        assert!(Header::parse(&b[..n]).is_err(), "read without iovs");
        h = Header::new(Op::ReadResp, 0, 8);
        h.status = Status::OutOfBounds;
        let n = h.emit(&mut b);
        assert!(
            Header::parse(&b[..n]).is_err(),
            "error response with payload"
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut b = [0u8; MAX_HDR_SIZE];
        for _ in 0..20_000 {
            rng.fill(&mut b[..]);
            b[0] = VERSION;
            if rng.gen_bool(0.5) {
                b[6] %= 9;
                let size = (BASE_HDR_SIZE + b[6] as usize * WIRE_IOV_SIZE) as u16;
                b[4..6].copy_from_slice(&size.to_le_bytes());
            }
            let len = rng.gen_range(0..=MAX_HDR_SIZE);
            let _ = Header::parse(&b[..len]);
            let _ = Header::peek_size(&b[..len.min(BASE_HDR_SIZE)]);
        }
    }
}
