//! Extension transport headers (all fields big-endian).
//!
//! | header       | bytes | fields                                               |
//! |--------------|-------|------------------------------------------------------|
//! | RETH         | 16    | VA u64, R_Key u32, DMA length u32                    |
//! | AETH         | 4     | syndrome u8, MSN u24                                 |
//! | ImmDt        | 4     | immediate data u32                                   |
//! | IETH         | 4     | R_Key to invalidate u32                              |
//! | AtomicETH    | 28    | VA u64, R_Key u32, swap/add u64, compare u64         |
//! | AtomicAckETH | 8     | original remote value u64                            |
//! | DETH         | 8     | Q_Key u32, reserved u8, source QP u24                |
//! | FETH         | 4     | reserved 31:6, selectivity level 5:4, placement 3:0  |

use super::{field, fixed_header_view, Error, Result};

fixed_header_view!(
    /// View over an RDMA Extended Transport Header.
    Reth,
    16
);

impl<T: AsRef<[u8]>> Reth<T> {
    /// Remote virtual address.
    pub fn va(&self) -> u64 {
        field::u64_at(self.buffer.as_ref(), 0)
    }
    /// Remote key.
    pub fn rkey(&self) -> u32 {
        field::u32_at(self.buffer.as_ref(), 8)
    }
    /// DMA length of the whole message.
    pub fn dma_len(&self) -> u32 {
        field::u32_at(self.buffer.as_ref(), 12)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Reth<T> {
    /// Sets the remote virtual address.
    pub fn set_va(&mut self, v: u64) {
        field::set_u64(self.buffer.as_mut(), 0, v)
    }
    /// Sets the remote key.
    pub fn set_rkey(&mut self, v: u32) {
        field::set_u32(self.buffer.as_mut(), 8, v)
    }
    /// Sets the DMA length.
    pub fn set_dma_len(&mut self, v: u32) {
        field::set_u32(self.buffer.as_mut(), 12, v)
    }
}

/// Validated RETH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RethRepr {
    /// Remote virtual address.
    pub va: u64,
    /// Remote key.
    pub rkey: u32,
    /// DMA length of the whole message.
    pub dma_len: u32,
}

impl RethRepr {
    /// Parses a view.
    pub fn parse<T: AsRef<[u8]>>(v: &Reth<T>) -> Result<Self> {
        v.check_len()?;
        Ok(Self {
            va: v.va(),
            rkey: v.rkey(),
            dma_len: v.dma_len(),
        })
    }
    /// Emits into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut Reth<T>) {
        v.set_va(self.va);
        v.set_rkey(self.rkey);
        v.set_dma_len(self.dma_len);
    }
}

fixed_header_view!(
    /// View over an ACK Extended Transport Header.
    Aeth,
    4
);

impl<T: AsRef<[u8]>> Aeth<T> {
    /// Raw syndrome byte.
    pub fn syndrome(&self) -> u8 {
        self.buffer.as_ref()[0]
    }
    /// Message sequence number (24 bits).
    pub fn msn(&self) -> u32 {
        field::u24_at(self.buffer.as_ref(), 1)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Aeth<T> {
    /// Sets the raw syndrome.
    pub fn set_syndrome(&mut self, s: u8) {
        self.buffer.as_mut()[0] = s
    }
    /// Sets the MSN (low 24 bits).
    pub fn set_msn(&mut self, msn: u32) {
        field::set_u24(self.buffer.as_mut(), 1, msn & 0x00FF_FFFF)
    }
}

/// NAK codes carried in an AETH syndrome `0b011x_xxxx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NakCode {
    /// PSN sequence error (0x60): the AETH's packet PSN is the expected PSN.
    PsnSequenceError,
    /// Invalid request (0x61).
    InvalidRequest,
    /// Remote access error (0x62): R_Key, bounds or rights violation.
    RemoteAccessError,
    /// Remote operational error (0x63).
    RemoteOperationalError,
    /// Invalid RD request (0x64), unused on RC.
    InvalidRdRequest,
}

impl NakCode {
    fn value(self) -> u8 {
        match self {
            NakCode::PsnSequenceError => 0,
            NakCode::InvalidRequest => 1,
            NakCode::RemoteAccessError => 2,
            NakCode::RemoteOperationalError => 3,
            NakCode::InvalidRdRequest => 4,
        }
    }
}

/// Decoded AETH syndrome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syndrome {
    /// Positive acknowledgement with end-to-end credit count (0x1F = unlimited).
    Ack {
        /// Credit code (5 bits).
        credits: u8,
    },
    /// Receiver-not-ready NAK with the IB RNR timer code (5 bits).
    RnrNak {
        /// RNR timer code, see [`rnr_timer_ns`].
        timer: u8,
    },
    /// Negative acknowledgement.
    Nak(NakCode),
}

impl Syndrome {
    /// Credit code meaning "no credit limit".
    pub const UNLIMITED_CREDITS: u8 = 0x1F;

    /// ACK with unlimited credits (what rxe sends).
    pub const ACK: Self = Syndrome::Ack {
        credits: Self::UNLIMITED_CREDITS,
    };

    /// Decodes a raw syndrome byte.
    pub fn from_byte(b: u8) -> Result<Self> {
        let low = b & 0x1F;
        match b >> 5 {
            0 => Ok(Syndrome::Ack { credits: low }),
            1 => Ok(Syndrome::RnrNak { timer: low }),
            3 => match low {
                0 => Ok(Syndrome::Nak(NakCode::PsnSequenceError)),
                1 => Ok(Syndrome::Nak(NakCode::InvalidRequest)),
                2 => Ok(Syndrome::Nak(NakCode::RemoteAccessError)),
                3 => Ok(Syndrome::Nak(NakCode::RemoteOperationalError)),
                4 => Ok(Syndrome::Nak(NakCode::InvalidRdRequest)),
                _ => Err(Error::Malformed("reserved NAK code in AETH")),
            },
            _ => Err(Error::Malformed("reserved AETH syndrome")),
        }
    }

    /// Encodes to a raw syndrome byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Syndrome::Ack { credits } => credits & 0x1F,
            Syndrome::RnrNak { timer } => 0x20 | (timer & 0x1F),
            Syndrome::Nak(code) => 0x60 | code.value(),
        }
    }
}

/// The IB RNR NAK timer table (code -> delay in nanoseconds).
pub fn rnr_timer_ns(code: u8) -> u64 {
    // Values in units of 10 µs, from the IBTA "RNR NAK timer field" table.
    const TABLE_10US: [u64; 32] = [
        65536, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
        1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152,
    ];
    TABLE_10US[usize::from(code & 0x1F)] * 10_000
}

/// Validated AETH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AethRepr {
    /// Syndrome.
    pub syndrome: Syndrome,
    /// Message sequence number (24 bits).
    pub msn: u32,
}

impl AethRepr {
    /// Parses a view.
    pub fn parse<T: AsRef<[u8]>>(v: &Aeth<T>) -> Result<Self> {
        v.check_len()?;
        Ok(Self {
            syndrome: Syndrome::from_byte(v.syndrome())?,
            msn: v.msn(),
        })
    }
    /// Emits into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut Aeth<T>) {
        v.set_syndrome(self.syndrome.to_byte());
        v.set_msn(self.msn);
    }
}

/// Generates a 4-byte header holding one big-endian u32.
macro_rules! u32_header {
    ($(#[$doc:meta])* $view:ident, $get:ident, $set:ident) => {
        fixed_header_view!($(#[$doc])* $view, 4);

        impl<T: AsRef<[u8]>> $view<T> {
            /// The 32-bit value.
            pub fn $get(&self) -> u32 {
                field::u32_at(self.buffer.as_ref(), 0)
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> $view<T> {
            /// Sets the 32-bit value.
            pub fn $set(&mut self, v: u32) {
                field::set_u32(self.buffer.as_mut(), 0, v)
            }
        }
    };
}

u32_header!(
    /// View over an Immediate Data header.
    ImmDt,
    imm,
    set_imm
);
u32_header!(
    /// View over an Invalidate ETH (R_Key to invalidate).
    Ieth,
    rkey,
    set_rkey
);

fixed_header_view!(
    /// View over an Atomic Extended Transport Header.
    AtomicEth,
    28
);

impl<T: AsRef<[u8]>> AtomicEth<T> {
    /// Remote virtual address (must be 8-byte aligned).
    pub fn va(&self) -> u64 {
        field::u64_at(self.buffer.as_ref(), 0)
    }
    /// Remote key.
    pub fn rkey(&self) -> u32 {
        field::u32_at(self.buffer.as_ref(), 8)
    }
    /// Swap value (CMP_SWAP) or addend (FETCH_ADD).
    pub fn swap_add(&self) -> u64 {
        field::u64_at(self.buffer.as_ref(), 12)
    }
    /// Compare value (CMP_SWAP only).
    pub fn compare(&self) -> u64 {
        field::u64_at(self.buffer.as_ref(), 20)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> AtomicEth<T> {
    /// Sets the remote virtual address.
    pub fn set_va(&mut self, v: u64) {
        field::set_u64(self.buffer.as_mut(), 0, v)
    }
    /// Sets the remote key.
    pub fn set_rkey(&mut self, v: u32) {
        field::set_u32(self.buffer.as_mut(), 8, v)
    }
    /// Sets the swap/add value.
    pub fn set_swap_add(&mut self, v: u64) {
        field::set_u64(self.buffer.as_mut(), 12, v)
    }
    /// Sets the compare value.
    pub fn set_compare(&mut self, v: u64) {
        field::set_u64(self.buffer.as_mut(), 20, v)
    }
}

/// Validated AtomicETH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AtomicEthRepr {
    /// Remote virtual address.
    pub va: u64,
    /// Remote key.
    pub rkey: u32,
    /// Swap value or addend.
    pub swap_add: u64,
    /// Compare value.
    pub compare: u64,
}

impl AtomicEthRepr {
    /// Parses a view.
    pub fn parse<T: AsRef<[u8]>>(v: &AtomicEth<T>) -> Result<Self> {
        v.check_len()?;
        Ok(Self {
            va: v.va(),
            rkey: v.rkey(),
            swap_add: v.swap_add(),
            compare: v.compare(),
        })
    }
    /// Emits into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut AtomicEth<T>) {
        v.set_va(self.va);
        v.set_rkey(self.rkey);
        v.set_swap_add(self.swap_add);
        v.set_compare(self.compare);
    }
}

fixed_header_view!(
    /// View over an Atomic ACK Extended Transport Header.
    AtomicAckEth,
    8
);

impl<T: AsRef<[u8]>> AtomicAckEth<T> {
    /// Value of the remote location before the atomic operation.
    pub fn orig(&self) -> u64 {
        field::u64_at(self.buffer.as_ref(), 0)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> AtomicAckEth<T> {
    /// Sets the original value.
    pub fn set_orig(&mut self, v: u64) {
        field::set_u64(self.buffer.as_mut(), 0, v)
    }
}

fixed_header_view!(
    /// View over a Datagram Extended Transport Header.
    Deth,
    8
);

impl<T: AsRef<[u8]>> Deth<T> {
    /// Queue key.
    pub fn qkey(&self) -> u32 {
        field::u32_at(self.buffer.as_ref(), 0)
    }
    /// Source QP number (24 bits).
    pub fn src_qpn(&self) -> u32 {
        field::u24_at(self.buffer.as_ref(), 5)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Deth<T> {
    /// Sets the queue key.
    pub fn set_qkey(&mut self, v: u32) {
        field::set_u32(self.buffer.as_mut(), 0, v)
    }
    /// Sets the source QPN and clears the reserved byte.
    pub fn set_src_qpn(&mut self, v: u32) {
        self.buffer.as_mut()[4] = 0;
        field::set_u24(self.buffer.as_mut(), 5, v & 0x00FF_FFFF)
    }
}

/// Validated DETH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DethRepr {
    /// Queue key.
    pub qkey: u32,
    /// Source QPN.
    pub src_qpn: u32,
}

impl DethRepr {
    /// Parses a view.
    pub fn parse<T: AsRef<[u8]>>(v: &Deth<T>) -> Result<Self> {
        v.check_len()?;
        Ok(Self {
            qkey: v.qkey(),
            src_qpn: v.src_qpn(),
        })
    }
    /// Emits into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut Deth<T>) {
        v.set_qkey(self.qkey);
        v.set_src_qpn(self.src_qpn);
    }
}

u32_header!(
    /// View over a FLUSH Extended Transport Header (rxe's `rxe_feth`: one big-endian
    /// word, placement type in bits 3:0, selectivity level in bits 5:4).
    Feth,
    bits,
    set_bits
);

impl<T: AsRef<[u8]>> Feth<T> {
    /// Placement type bits (bit 0 global visibility, bit 1 persistence).
    pub fn placement(&self) -> u8 {
        (self.bits() & 0x0F) as u8
    }
    /// Selectivity level (0 = memory region range, 1 = whole memory region).
    pub fn selectivity(&self) -> u8 {
        ((self.bits() >> 4) & 0x3) as u8
    }
}

/// FLUSH placement type: make data globally visible.
pub const FLUSH_PLACEMENT_GLOBAL: u8 = 1;
/// FLUSH placement type: make data persistent.
pub const FLUSH_PLACEMENT_PERSISTENT: u8 = 2;
/// FLUSH selectivity: the range given by the RETH.
pub const FLUSH_SELECT_RANGE: u8 = 0;
/// FLUSH selectivity: the whole memory region named by the R_Key.
pub const FLUSH_SELECT_REGION: u8 = 1;

/// Validated FETH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FethRepr {
    /// Placement type bits ([`FLUSH_PLACEMENT_GLOBAL`], [`FLUSH_PLACEMENT_PERSISTENT`]).
    pub placement: u8,
    /// Selectivity level ([`FLUSH_SELECT_RANGE`], [`FLUSH_SELECT_REGION`]).
    pub selectivity: u8,
}

impl FethRepr {
    /// Parses a view; rejects placement 0, placement bits above 1 and selectivity
    /// levels above 1 (reserved).
    pub fn parse<T: AsRef<[u8]>>(v: &Feth<T>) -> Result<Self> {
        v.check_len()?;
        let placement = v.placement();
        let selectivity = v.selectivity();
        if placement == 0 || placement > 3 {
            return Err(Error::Malformed("FETH placement type"));
        }
        if selectivity > 1 {
            return Err(Error::Malformed("FETH selectivity level"));
        }
        Ok(Self {
            placement,
            selectivity,
        })
    }
    /// Emits into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut Feth<T>) {
        v.set_bits((u32::from(self.selectivity & 3) << 4) | u32::from(self.placement & 0x0F));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reth_round_trip() {
        let r = RethRepr {
            va: 0x1122_3344_5566_7788,
            rkey: 0xAABBCCDD,
            dma_len: 4096,
        };
        let mut b = [0u8; 16];
        r.emit(&mut Reth::new_unchecked(&mut b[..]));
        assert_eq!(&b[..8], &0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(RethRepr::parse(&Reth::new_checked(&b[..]).unwrap()), Ok(r));
        assert_eq!(Reth::new_checked(&b[..15]), Err(Error::Truncated));
    }

    #[test]
    fn syndromes() {
        for b in 0u8..=255 {
            if let Ok(s) = Syndrome::from_byte(b) {
                assert_eq!(s.to_byte(), b);
            }
        }
        assert_eq!(Syndrome::from_byte(0x1F), Ok(Syndrome::ACK));
        assert_eq!(
            Syndrome::from_byte(0x62),
            Ok(Syndrome::Nak(NakCode::RemoteAccessError))
        );
        assert_eq!(
            Syndrome::from_byte(0x2E),
            Ok(Syndrome::RnrNak { timer: 14 })
        );
        assert!(Syndrome::from_byte(0x40).is_err());
        assert!(Syndrome::from_byte(0x6F).is_err());
        assert_eq!(rnr_timer_ns(1), 10_000);
        assert_eq!(rnr_timer_ns(0), 655_360_000);
        assert_eq!(rnr_timer_ns(31), 491_520_000);
    }

    #[test]
    fn feth_bits_as_rxe() {
        let f = FethRepr {
            placement: FLUSH_PLACEMENT_PERSISTENT,
            selectivity: FLUSH_SELECT_REGION,
        };
        let mut b = [0u8; 4];
        f.emit(&mut Feth::new_unchecked(&mut b[..]));
        assert_eq!(b, [0, 0, 0, 0x12]);
        assert_eq!(FethRepr::parse(&Feth::new_unchecked(&b[..])), Ok(f));
        assert!(FethRepr::parse(&Feth::new_unchecked(&[0u8, 0, 0, 0x30][..])).is_err());
    }

    #[test]
    fn atomic_and_deth() {
        let a = AtomicEthRepr {
            va: 8,
            rkey: 7,
            swap_add: u64::MAX,
            compare: 3,
        };
        let mut b = [0u8; 28];
        a.emit(&mut AtomicEth::new_unchecked(&mut b[..]));
        assert_eq!(
            AtomicEthRepr::parse(&AtomicEth::new_unchecked(&b[..])),
            Ok(a)
        );
        let d = DethRepr {
            qkey: 0x80010000,
            src_qpn: 1,
        };
        let mut b = [0xEEu8; 8];
        d.emit(&mut Deth::new_unchecked(&mut b[..]));
        assert_eq!(b, [0x80, 1, 0, 0, 0, 0, 0, 1]);
        assert_eq!(DethRepr::parse(&Deth::new_unchecked(&b[..])), Ok(d));
    }
}
