//! The layer's message header, carried at the front of every message it sends over a
//! connection. Parsing checks the length and the operation code and never panics.

use fabric_core::{Error, ErrorKind, Result};

/// Bytes of a header.
pub(crate) const HDR: usize = 56;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Op {
    /// Eager message (payload follows).
    Eager = 1,
    /// Rendezvous request: `len` bytes at `raddr`/`rkey`, for the receiver to read.
    Rts = 2,
    /// Rendezvous done (`rid`), with a status.
    Fin = 3,
    /// Credit update only.
    Credit = 4,
    /// Atomic request (`rid`), operands follow.
    AtomicReq = 5,
    /// Atomic response (`rid`), with a status and any fetched values.
    AtomicResp = 6,
    /// Remote CQ data (`data`) of an RMA write of `len` bytes that has completed.
    WriteData = 7,
    /// The sender has nothing in flight on this connection and asks to close it.
    CloseReq = 8,
    /// The answer to `CloseReq`: agreed (nothing in flight this way either); the asker
    /// shuts the connection down.
    CloseAck = 9,
    /// The answer to `CloseReq` (or to `CloseAck`): not now; both keep the connection.
    CloseNack = 10,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Eager,
            2 => Op::Rts,
            3 => Op::Fin,
            4 => Op::Credit,
            5 => Op::AtomicReq,
            6 => Op::AtomicResp,
            7 => Op::WriteData,
            8 => Op::CloseReq,
            9 => Op::CloseAck,
            10 => Op::CloseNack,
            _ => return None,
        })
    }
}

/// Header flag: the message is tagged.
pub(crate) const F_TAGGED: u8 = 1;
/// Header flag: `data` carries remote CQ data.
pub(crate) const F_DATA: u8 = 2;

/// Status codes of `Fin` and `AtomicResp`.
pub(crate) const ST_OK: u16 = 0;
pub(crate) const ST_ACCESS: u16 = 1;
pub(crate) const ST_INVALID: u16 = 2;
pub(crate) const ST_TRUNCATED: u16 = 3;
pub(crate) const ST_FAILED: u16 = 4;

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub op: Op,
    pub flags: u8,
    pub status: u16,
    /// Receive buffers the sender has freed since it last said so.
    pub credits: u32,
    pub len: u64,
    pub tag: u64,
    pub data: u64,
    pub rid: u64,
    pub raddr: u64,
    pub rkey: u64,
}

impl Header {
    pub(crate) fn new(op: Op) -> Header {
        Header {
            op,
            flags: 0,
            status: ST_OK,
            credits: 0,
            len: 0,
            tag: 0,
            data: 0,
            rid: 0,
            raddr: 0,
            rkey: 0,
        }
    }

    /// Payload bytes that follow the header: the data of an eager message or atomic,
    /// the ranges of a rendezvous request (`raddr` of them, 24 bytes each), else none.
    /// Saturates, so a hostile header cannot overflow it (the length check fails).
    pub(crate) fn payload_len(&self) -> usize {
        match self.op {
            Op::Eager | Op::AtomicReq | Op::AtomicResp => {
                usize::try_from(self.len).unwrap_or(usize::MAX)
            }
            Op::Rts => usize::try_from(self.raddr)
                .unwrap_or(usize::MAX)
                .saturating_mul(24),
            _ => 0,
        }
    }

    pub(crate) fn emit(&self, out: &mut [u8]) {
        out[0] = self.op as u8;
        out[1] = self.flags;
        out[2..4].copy_from_slice(&self.status.to_le_bytes());
        out[4..8].copy_from_slice(&self.credits.to_le_bytes());
        for (i, v) in [
            self.len, self.tag, self.data, self.rid, self.raddr, self.rkey,
        ]
        .into_iter()
        .enumerate()
        {
            out[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
    }

    pub(crate) fn to_bytes(self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        self.emit(&mut b);
        b
    }

    pub(crate) fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HDR {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!(
                    "rdm: a message of {} bytes is shorter than a header",
                    b.len()
                ),
            ));
        }
        let op = Op::from_u8(b[0]).ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                format!("rdm: unknown operation {}", b[0]),
            )
        })?;
        let u = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[8 + 8 * i..16 + 8 * i]);
            u64::from_le_bytes(x)
        };
        Ok(Header {
            op,
            flags: b[1],
            status: u16::from_le_bytes([b[2], b[3]]),
            credits: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            len: u(0),
            tag: u(1),
            data: u(2),
            rid: u(3),
            raddr: u(4),
            rkey: u(5),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_garbage_is_an_error() {
        let mut h = Header::new(Op::Rts);
        h.flags = F_TAGGED | F_DATA;
        h.credits = 17;
        h.len = 1 << 40;
        h.tag = u64::MAX;
        h.rkey = 9;
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
        assert!(Header::parse(&[1; HDR - 1]).is_err());
        let mut b = h.to_bytes();
        b[0] = 99;
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn close_and_writedata_ops_round_trip_and_payload_lengths_saturate() {
        for op in [Op::WriteData, Op::CloseReq, Op::CloseAck, Op::CloseNack] {
            let h = Header::new(op);
            assert_eq!(Header::parse(&h.to_bytes()).unwrap().op, op);
            assert_eq!(h.payload_len(), 0);
        }
        let mut h = Header::new(Op::Rts);
        h.raddr = 3;
        h.len = 1 << 30;
        assert_eq!(
            h.payload_len(),
            72,
            "a rendezvous request carries its ranges"
        );
        h.raddr = u64::MAX;
        assert_eq!(h.payload_len(), usize::MAX, "a hostile count saturates");
        let mut e = Header::new(Op::Eager);
        e.len = 5;
        assert_eq!(e.payload_len(), 5);
        let mut b = e.to_bytes();
        b[0] = 11;
        assert!(Header::parse(&b).is_err());
    }
}
