//! BTH opcodes and which extension headers each one carries (after rxe's
//! `rxe_opcode.c` and the IBTA tables).

use core::fmt;

/// A set of extension headers, in the fixed order they appear after the BTH.
///
/// The order on the wire is DETH, FETH, RETH, AtomicETH, AETH, AtomicAckETH, ImmDt,
/// IETH; no opcode carries both ImmDt and IETH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct HeaderSet(u16);

impl HeaderSet {
    /// No extension header.
    pub const NONE: Self = Self(0);
    /// Datagram ETH (8 bytes: Q_Key, source QP).
    pub const DETH: Self = Self(1 << 0);
    /// Flush ETH (4 bytes: selectivity level, placement type).
    pub const FETH: Self = Self(1 << 1);
    /// RDMA ETH (16 bytes: VA, R_Key, DMA length).
    pub const RETH: Self = Self(1 << 2);
    /// Atomic ETH (28 bytes: VA, R_Key, swap/add, compare).
    pub const ATOMIC_ETH: Self = Self(1 << 3);
    /// ACK ETH (4 bytes: syndrome, MSN).
    pub const AETH: Self = Self(1 << 4);
    /// Atomic ACK ETH (8 bytes: original remote value).
    pub const ATOMIC_ACK_ETH: Self = Self(1 << 5);
    /// Immediate data (4 bytes).
    pub const IMM_DT: Self = Self(1 << 6);
    /// Invalidate ETH (4 bytes: R_Key to invalidate).
    pub const IETH: Self = Self(1 << 7);

    /// Whether every header of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Union of two sets.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Total length in bytes of the headers in the set.
    pub const fn len(self) -> usize {
        let mut n = 0;
        if self.contains(Self::DETH) {
            n += 8;
        }
        if self.contains(Self::FETH) {
            n += 4;
        }
        if self.contains(Self::RETH) {
            n += 16;
        }
        if self.contains(Self::ATOMIC_ETH) {
            n += 28;
        }
        if self.contains(Self::AETH) {
            n += 4;
        }
        if self.contains(Self::ATOMIC_ACK_ETH) {
            n += 8;
        }
        if self.contains(Self::IMM_DT) {
            n += 4;
        }
        if self.contains(Self::IETH) {
            n += 4;
        }
        n
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Offset of header `which` after the BTH, if the set holds it.
    pub const fn offset_of(self, which: Self) -> Option<usize> {
        if !self.contains(which) {
            return None;
        }
        // Sum the lengths of the headers that precede `which` in wire order.
        Some(Self(self.0 & (which.0 - 1)).len())
    }
}

impl core::ops::BitOr for HeaderSet {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

/// Position of a packet inside a multi-packet message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// First packet of several.
    First,
    /// Neither first nor last.
    Middle,
    /// Last packet of several.
    Last,
    /// The only packet of the message.
    Only,
}

impl Segment {
    /// Whether this packet starts a message.
    pub const fn is_first(self) -> bool {
        matches!(self, Segment::First | Segment::Only)
    }
    /// Whether this packet ends a message.
    pub const fn is_last(self) -> bool {
        matches!(self, Segment::Last | Segment::Only)
    }
}

/// What a packet's payload is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadRule {
    /// No payload (pad count must be 0).
    None,
    /// Any length (bounded by the MTU, which the transport checks).
    Data,
    /// Exactly this many bytes (ATOMIC WRITE: 8; CNP: 16 reserved bytes).
    Exactly(usize),
}

/// Static facts about one opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpcodeInfo {
    /// Name as in the IBTA tables, e.g. `RC_SEND_ONLY`.
    pub name: &'static str,
    /// Extension headers that follow the BTH.
    pub headers: HeaderSet,
    /// Payload rule.
    pub payload: PayloadRule,
    /// Position in a message.
    pub segment: Segment,
    /// Sent by a requester (true) or a responder (false).
    pub is_request: bool,
}

/// A BTH opcode (transport in bits 7:5, operation in bits 4:0).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Opcode(pub u8);

#[allow(missing_docs)] // the names are the IBTA opcode names
impl Opcode {
    pub const RC_SEND_FIRST: Self = Self(0x00);
    pub const RC_SEND_MIDDLE: Self = Self(0x01);
    pub const RC_SEND_LAST: Self = Self(0x02);
    pub const RC_SEND_LAST_WITH_IMMEDIATE: Self = Self(0x03);
    pub const RC_SEND_ONLY: Self = Self(0x04);
    pub const RC_SEND_ONLY_WITH_IMMEDIATE: Self = Self(0x05);
    pub const RC_RDMA_WRITE_FIRST: Self = Self(0x06);
    pub const RC_RDMA_WRITE_MIDDLE: Self = Self(0x07);
    pub const RC_RDMA_WRITE_LAST: Self = Self(0x08);
    pub const RC_RDMA_WRITE_LAST_WITH_IMMEDIATE: Self = Self(0x09);
    pub const RC_RDMA_WRITE_ONLY: Self = Self(0x0A);
    pub const RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE: Self = Self(0x0B);
    pub const RC_RDMA_READ_REQUEST: Self = Self(0x0C);
    pub const RC_RDMA_READ_RESPONSE_FIRST: Self = Self(0x0D);
    pub const RC_RDMA_READ_RESPONSE_MIDDLE: Self = Self(0x0E);
    pub const RC_RDMA_READ_RESPONSE_LAST: Self = Self(0x0F);
    pub const RC_RDMA_READ_RESPONSE_ONLY: Self = Self(0x10);
    pub const RC_ACKNOWLEDGE: Self = Self(0x11);
    pub const RC_ATOMIC_ACKNOWLEDGE: Self = Self(0x12);
    pub const RC_COMPARE_SWAP: Self = Self(0x13);
    pub const RC_FETCH_ADD: Self = Self(0x14);
    pub const RC_SEND_LAST_WITH_INVALIDATE: Self = Self(0x16);
    pub const RC_SEND_ONLY_WITH_INVALIDATE: Self = Self(0x17);
    pub const RC_FLUSH: Self = Self(0x1C);
    pub const RC_ATOMIC_WRITE: Self = Self(0x1D);
    pub const UD_SEND_ONLY: Self = Self(0x64);
    pub const UD_SEND_ONLY_WITH_IMMEDIATE: Self = Self(0x65);
    /// RoCEv2 Congestion Notification Packet (16 reserved payload bytes).
    pub const CNP: Self = Self(0x81);
}

const fn info(
    name: &'static str,
    headers: HeaderSet,
    payload: PayloadRule,
    segment: Segment,
    is_request: bool,
) -> Option<OpcodeInfo> {
    Some(OpcodeInfo {
        name,
        headers,
        payload,
        segment,
        is_request,
    })
}

impl Opcode {
    /// Facts about this opcode, or `None` for opcodes this implementation does not know.
    pub const fn info(self) -> Option<OpcodeInfo> {
        use HeaderSet as H;
        use PayloadRule::{Data, Exactly, None as NoPay};
        use Segment::*;
        const RETH_IMM: HeaderSet = HeaderSet::RETH.union(HeaderSet::IMM_DT);
        const FETH_RETH: HeaderSet = HeaderSet::FETH.union(HeaderSet::RETH);
        const AETH_ATOMIC: HeaderSet = HeaderSet::AETH.union(HeaderSet::ATOMIC_ACK_ETH);
        const DETH_IMM: HeaderSet = HeaderSet::DETH.union(HeaderSet::IMM_DT);
        match self.0 {
            0x00 => info("RC_SEND_FIRST", H::NONE, Data, First, true),
            0x01 => info("RC_SEND_MIDDLE", H::NONE, Data, Middle, true),
            0x02 => info("RC_SEND_LAST", H::NONE, Data, Last, true),
            0x03 => info("RC_SEND_LAST_WITH_IMMEDIATE", H::IMM_DT, Data, Last, true),
            0x04 => info("RC_SEND_ONLY", H::NONE, Data, Only, true),
            0x05 => info("RC_SEND_ONLY_WITH_IMMEDIATE", H::IMM_DT, Data, Only, true),
            0x06 => info("RC_RDMA_WRITE_FIRST", H::RETH, Data, First, true),
            0x07 => info("RC_RDMA_WRITE_MIDDLE", H::NONE, Data, Middle, true),
            0x08 => info("RC_RDMA_WRITE_LAST", H::NONE, Data, Last, true),
            0x09 => info(
                "RC_RDMA_WRITE_LAST_WITH_IMMEDIATE",
                H::IMM_DT,
                Data,
                Last,
                true,
            ),
            0x0A => info("RC_RDMA_WRITE_ONLY", H::RETH, Data, Only, true),
            0x0B => info(
                "RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE",
                RETH_IMM,
                Data,
                Only,
                true,
            ),
            0x0C => info("RC_RDMA_READ_REQUEST", H::RETH, NoPay, Only, true),
            0x0D => info("RC_RDMA_READ_RESPONSE_FIRST", H::AETH, Data, First, false),
            0x0E => info("RC_RDMA_READ_RESPONSE_MIDDLE", H::NONE, Data, Middle, false),
            0x0F => info("RC_RDMA_READ_RESPONSE_LAST", H::AETH, Data, Last, false),
            0x10 => info("RC_RDMA_READ_RESPONSE_ONLY", H::AETH, Data, Only, false),
            0x11 => info("RC_ACKNOWLEDGE", H::AETH, NoPay, Only, false),
            0x12 => info("RC_ATOMIC_ACKNOWLEDGE", AETH_ATOMIC, NoPay, Only, false),
            0x13 => info("RC_COMPARE_SWAP", H::ATOMIC_ETH, NoPay, Only, true),
            0x14 => info("RC_FETCH_ADD", H::ATOMIC_ETH, NoPay, Only, true),
            0x16 => info("RC_SEND_LAST_WITH_INVALIDATE", H::IETH, Data, Last, true),
            0x17 => info("RC_SEND_ONLY_WITH_INVALIDATE", H::IETH, Data, Only, true),
            0x1C => info("RC_FLUSH", FETH_RETH, NoPay, Only, true),
            0x1D => info("RC_ATOMIC_WRITE", H::RETH, Exactly(8), Only, true),
            0x64 => info("UD_SEND_ONLY", H::DETH, Data, Only, true),
            0x65 => info("UD_SEND_ONLY_WITH_IMMEDIATE", DETH_IMM, Data, Only, true),
            0x81 => info("CNP", H::NONE, Exactly(16), Only, false),
            _ => None,
        }
    }

    /// Whether the opcode is in the table.
    pub const fn is_known(self) -> bool {
        self.info().is_some()
    }

    /// Extension headers carried (empty for unknown opcodes).
    pub const fn headers(self) -> HeaderSet {
        match self.info() {
            Some(i) => i.headers,
            None => HeaderSet::NONE,
        }
    }

    /// Whether this is an RC opcode (transport bits 000).
    pub const fn is_rc(self) -> bool {
        self.0 >> 5 == 0
    }

    /// Whether this is a SEND of any kind (FIRST/MIDDLE/LAST/ONLY, imm, inv).
    pub const fn is_send(self) -> bool {
        matches!(self.0, 0x00..=0x05 | 0x16 | 0x17 | 0x64 | 0x65)
    }

    /// Whether this is an RDMA WRITE of any kind.
    pub const fn is_write(self) -> bool {
        matches!(self.0, 0x06..=0x0B)
    }

    /// Whether this is an RDMA READ RESPONSE of any kind.
    pub const fn is_read_response(self) -> bool {
        matches!(self.0, 0x0D..=0x10)
    }

    /// Whether this is an atomic request (CMP_SWAP or FETCH_ADD).
    pub const fn is_atomic(self) -> bool {
        matches!(self.0, 0x13 | 0x14)
    }
}

impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.info() {
            Some(i) => write!(f, "{}({:#04x})", i.name, self.0),
            None => write!(f, "Opcode({:#04x})", self.0),
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths_match_rxe() {
        // rxe_opcode.c lengths minus the 12-byte BTH.
        let cases = [
            (Opcode::RC_SEND_ONLY, 0),
            (Opcode::RC_SEND_ONLY_WITH_IMMEDIATE, 4),
            (Opcode::RC_RDMA_WRITE_FIRST, 16),
            (Opcode::RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE, 20),
            (Opcode::RC_RDMA_READ_REQUEST, 16),
            (Opcode::RC_RDMA_READ_RESPONSE_FIRST, 4),
            (Opcode::RC_RDMA_READ_RESPONSE_MIDDLE, 0),
            (Opcode::RC_ATOMIC_ACKNOWLEDGE, 12),
            (Opcode::RC_COMPARE_SWAP, 28),
            (Opcode::RC_SEND_LAST_WITH_INVALIDATE, 4),
            (Opcode::RC_FLUSH, 20),
            (Opcode::RC_ATOMIC_WRITE, 16),
            (Opcode::UD_SEND_ONLY, 8),
            (Opcode::UD_SEND_ONLY_WITH_IMMEDIATE, 12),
        ];
        for (op, len) in cases {
            assert_eq!(op.headers().len(), len, "{op:?}");
        }
    }

    #[test]
    fn header_offsets_follow_wire_order() {
        let h = Opcode::RC_FLUSH.headers();
        assert_eq!(h.offset_of(HeaderSet::FETH), Some(0));
        assert_eq!(h.offset_of(HeaderSet::RETH), Some(4));
        let h = Opcode::RC_ATOMIC_ACKNOWLEDGE.headers();
        assert_eq!(h.offset_of(HeaderSet::AETH), Some(0));
        assert_eq!(h.offset_of(HeaderSet::ATOMIC_ACK_ETH), Some(4));
        let h = Opcode::RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE.headers();
        assert_eq!(h.offset_of(HeaderSet::IMM_DT), Some(16));
        assert_eq!(h.offset_of(HeaderSet::AETH), None);
    }

    #[test]
    fn classification() {
        assert!(Opcode::RC_SEND_LAST_WITH_INVALIDATE.is_send());
        assert!(Opcode::RC_RDMA_WRITE_MIDDLE.is_write());
        assert!(Opcode::RC_RDMA_READ_RESPONSE_ONLY.is_read_response());
        assert!(!Opcode(0x15).is_known());
        assert!(!Opcode::UD_SEND_ONLY.is_rc());
        assert_eq!(format!("{:?}", Opcode(0x11)), "RC_ACKNOWLEDGE(0x11)");
    }
}
