//! A whole RoCEv2 packet as carried in a UDP datagram:
//! BTH | extension headers | payload | pad (0-3) | ICRC (4).

use super::bth::{Bth, BthRepr};
use super::ext::{
    Aeth, AethRepr, AtomicAckEth, AtomicEth, AtomicEthRepr, Deth, DethRepr, Feth, FethRepr, Ieth,
    ImmDt, Reth, RethRepr,
};
use super::icrc::{IcrcContext, ICRC_LEN};
use super::opcode::{HeaderSet, PayloadRule};
use super::{Error, Opcode, Result};

/// Length of the BTH.
pub const BTH_LEN: usize = 12;

/// View over a RoCEv2 packet (the UDP payload, ICRC included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RocePacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> RocePacket<T> {
    /// Wraps a buffer without checks; accessors may panic on short buffers.
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking that the opcode is known, every extension header
    /// it implies is present, the pad count is consistent and the payload obeys the
    /// opcode's rule. Accessors of a checked packet never panic.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check()?;
        Ok(p)
    }

    /// The checks of [`Self::new_checked`].
    pub fn check(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < BTH_LEN + ICRC_LEN {
            return Err(Error::Truncated);
        }
        let op = self.bth().opcode();
        let info = op.info().ok_or(Error::UnknownOpcode(op.0))?;
        let pad = usize::from(self.bth().pad_count());
        let fixed = BTH_LEN + info.headers.len() + ICRC_LEN;
        if len < fixed + pad {
            return Err(Error::Truncated);
        }
        let payload = len - fixed - pad;
        if (payload + pad) & 3 != 0 {
            return Err(Error::Malformed("pad count does not align the packet"));
        }
        match info.payload {
            PayloadRule::None if payload + pad != 0 => {
                Err(Error::Malformed("payload on an opcode without payload"))
            }
            PayloadRule::Exactly(n) if payload != n => {
                Err(Error::Malformed("payload length fixed by the opcode"))
            }
            _ => Ok(()),
        }
    }

    /// The whole buffer.
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The BTH.
    pub fn bth(&self) -> Bth<&[u8]> {
        Bth::new_unchecked(&self.buffer.as_ref()[..BTH_LEN])
    }

    /// The opcode.
    pub fn opcode(&self) -> Opcode {
        Opcode(self.buffer.as_ref()[0])
    }

    /// Bytes of extension header `which`, if the opcode carries it.
    pub fn header(&self, which: HeaderSet) -> Option<&[u8]> {
        let set = self.opcode().headers();
        let at = BTH_LEN + set.offset_of(which)?;
        self.buffer.as_ref().get(at..at + which.len())
    }

    /// The RETH, if present.
    pub fn reth(&self) -> Option<Reth<&[u8]>> {
        self.header(HeaderSet::RETH).map(Reth::new_unchecked)
    }
    /// The AETH, if present.
    pub fn aeth(&self) -> Option<Aeth<&[u8]>> {
        self.header(HeaderSet::AETH).map(Aeth::new_unchecked)
    }
    /// The immediate data header, if present.
    pub fn imm_dt(&self) -> Option<ImmDt<&[u8]>> {
        self.header(HeaderSet::IMM_DT).map(ImmDt::new_unchecked)
    }
    /// The IETH, if present.
    pub fn ieth(&self) -> Option<Ieth<&[u8]>> {
        self.header(HeaderSet::IETH).map(Ieth::new_unchecked)
    }
    /// The AtomicETH, if present.
    pub fn atomic_eth(&self) -> Option<AtomicEth<&[u8]>> {
        self.header(HeaderSet::ATOMIC_ETH)
            .map(AtomicEth::new_unchecked)
    }
    /// The AtomicAckETH, if present.
    pub fn atomic_ack_eth(&self) -> Option<AtomicAckEth<&[u8]>> {
        self.header(HeaderSet::ATOMIC_ACK_ETH)
            .map(AtomicAckEth::new_unchecked)
    }
    /// The DETH, if present.
    pub fn deth(&self) -> Option<Deth<&[u8]>> {
        self.header(HeaderSet::DETH).map(Deth::new_unchecked)
    }
    /// The FETH, if present.
    pub fn feth(&self) -> Option<Feth<&[u8]>> {
        self.header(HeaderSet::FETH).map(Feth::new_unchecked)
    }

    fn payload_range(&self) -> core::ops::Range<usize> {
        let b = self.buffer.as_ref();
        let start = BTH_LEN + self.opcode().headers().len();
        let end = b
            .len()
            .saturating_sub(ICRC_LEN + usize::from(self.bth().pad_count()));
        start.min(end)..end
    }

    /// The payload (pad and ICRC excluded).
    pub fn payload(&self) -> &[u8] {
        let r = self.payload_range();
        &self.buffer.as_ref()[r]
    }

    /// The stored ICRC.
    pub fn icrc(&self) -> u32 {
        let b = self.buffer.as_ref();
        let mut x = [0u8; 4];
        x.copy_from_slice(&b[b.len() - ICRC_LEN..]);
        u32::from_le_bytes(x)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> RocePacket<T> {
    /// Mutable payload.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let r = self.payload_range();
        &mut self.buffer.as_mut()[r]
    }
}

/// Validated RoCEv2 packet headers. The payload is not part of the representation;
/// [`RoceRepr::payload_len`] gives its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoceRepr {
    /// Base transport header. `bth.pad_count` is derived from `payload_len` on emit.
    pub bth: BthRepr,
    /// DETH (UD).
    pub deth: Option<DethRepr>,
    /// FETH (FLUSH).
    pub feth: Option<FethRepr>,
    /// RETH.
    pub reth: Option<RethRepr>,
    /// AtomicETH.
    pub atomic_eth: Option<AtomicEthRepr>,
    /// AETH.
    pub aeth: Option<AethRepr>,
    /// AtomicAckETH (original remote value).
    pub atomic_ack: Option<u64>,
    /// Immediate data.
    pub imm: Option<u32>,
    /// IETH (R_Key to invalidate).
    pub ieth: Option<u32>,
    /// Payload length in bytes.
    pub payload_len: usize,
}

impl RoceRepr {
    /// A representation with only a BTH (no extension headers, no payload).
    pub fn new(bth: BthRepr) -> Self {
        Self {
            bth,
            deth: None,
            feth: None,
            reth: None,
            atomic_eth: None,
            aeth: None,
            atomic_ack: None,
            imm: None,
            ieth: None,
            payload_len: 0,
        }
    }

    /// Extension headers present in the representation.
    pub fn header_set(&self) -> HeaderSet {
        let mut s = HeaderSet::NONE;
        let pairs = [
            (self.deth.is_some(), HeaderSet::DETH),
            (self.feth.is_some(), HeaderSet::FETH),
            (self.reth.is_some(), HeaderSet::RETH),
            (self.atomic_eth.is_some(), HeaderSet::ATOMIC_ETH),
            (self.aeth.is_some(), HeaderSet::AETH),
            (self.atomic_ack.is_some(), HeaderSet::ATOMIC_ACK_ETH),
            (self.imm.is_some(), HeaderSet::IMM_DT),
            (self.ieth.is_some(), HeaderSet::IETH),
        ];
        for (present, h) in pairs {
            if present {
                s = s | h;
            }
        }
        s
    }

    /// Pad bytes needed after the payload.
    pub fn pad_count(&self) -> u8 {
        ((4 - self.payload_len % 4) % 4) as u8
    }

    /// Total packet length (BTH through ICRC).
    pub fn buffer_len(&self) -> usize {
        BTH_LEN
            + self.header_set().len()
            + self.payload_len
            + usize::from(self.pad_count())
            + ICRC_LEN
    }

    /// Checks that the headers present are exactly those of the opcode and that the
    /// payload length obeys the opcode's rule.
    pub fn check(&self) -> Result<()> {
        let info = self
            .bth
            .opcode
            .info()
            .ok_or(Error::UnknownOpcode(self.bth.opcode.0))?;
        if info.headers != self.header_set() {
            return Err(Error::Malformed(
                "extension headers do not match the opcode",
            ));
        }
        match info.payload {
            PayloadRule::None if self.payload_len != 0 => {
                Err(Error::Malformed("payload on an opcode without payload"))
            }
            PayloadRule::Exactly(n) if self.payload_len != n => {
                Err(Error::Malformed("payload length fixed by the opcode"))
            }
            _ => Ok(()),
        }
    }

    /// Parses a checked packet.
    pub fn parse<T: AsRef<[u8]>>(p: &RocePacket<T>) -> Result<Self> {
        p.check()?;
        let bth = BthRepr::parse(&p.bth())?;
        let mut r = Self::new(bth);
        if let Some(h) = p.deth() {
            r.deth = Some(DethRepr::parse(&h)?);
        }
        if let Some(h) = p.feth() {
            r.feth = Some(FethRepr::parse(&h)?);
        }
        if let Some(h) = p.reth() {
            r.reth = Some(RethRepr::parse(&h)?);
        }
        if let Some(h) = p.atomic_eth() {
            r.atomic_eth = Some(AtomicEthRepr::parse(&h)?);
        }
        if let Some(h) = p.aeth() {
            r.aeth = Some(AethRepr::parse(&h)?);
        }
        r.atomic_ack = p.atomic_ack_eth().map(|h| h.orig());
        r.imm = p.imm_dt().map(|h| h.imm());
        r.ieth = p.ieth().map(|h| h.rkey());
        r.payload_len = p.payload().len();
        Ok(r)
    }

    /// Writes BTH, extension headers and zero pad into `buf` (of at least
    /// [`Self::buffer_len`] bytes; only that prefix is written). The payload bytes and
    /// the ICRC are left for the caller ([`RocePacket::payload_mut`],
    /// [`IcrcContext::fill`]).
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        self.check()?;
        let len = self.buffer_len();
        let buf = buf.get_mut(..len).ok_or(Error::Truncated)?;
        let mut bth = self.bth;
        bth.pad_count = self.pad_count();
        bth.emit(&mut Bth::new_unchecked(&mut buf[..BTH_LEN]));
        let set = self.header_set();
        let at = |h: HeaderSet| {
            // `check` made the set equal to the opcode's, so every offset exists.
            let off = BTH_LEN + set.offset_of(h).unwrap_or(0);
            off..off + h.len()
        };
        let (r_deth, r_feth, r_reth, r_atom, r_aeth, r_ack, r_imm, r_ieth) = (
            at(HeaderSet::DETH),
            at(HeaderSet::FETH),
            at(HeaderSet::RETH),
            at(HeaderSet::ATOMIC_ETH),
            at(HeaderSet::AETH),
            at(HeaderSet::ATOMIC_ACK_ETH),
            at(HeaderSet::IMM_DT),
            at(HeaderSet::IETH),
        );
        if let Some(h) = &self.deth {
            h.emit(&mut Deth::new_unchecked(&mut buf[r_deth]));
        }
        if let Some(h) = &self.feth {
            h.emit(&mut Feth::new_unchecked(&mut buf[r_feth]));
        }
        if let Some(h) = &self.reth {
            h.emit(&mut Reth::new_unchecked(&mut buf[r_reth]));
        }
        if let Some(h) = &self.atomic_eth {
            h.emit(&mut AtomicEth::new_unchecked(&mut buf[r_atom]));
        }
        if let Some(h) = &self.aeth {
            h.emit(&mut Aeth::new_unchecked(&mut buf[r_aeth]));
        }
        if let Some(v) = self.atomic_ack {
            AtomicAckEth::new_unchecked(&mut buf[r_ack]).set_orig(v);
        }
        if let Some(v) = self.imm {
            ImmDt::new_unchecked(&mut buf[r_imm]).set_imm(v);
        }
        if let Some(v) = self.ieth {
            Ieth::new_unchecked(&mut buf[r_ieth]).set_rkey(v);
        }
        let pad_start = len - ICRC_LEN - usize::from(self.pad_count());
        buf[pad_start..len - ICRC_LEN].fill(0);
        Ok(())
    }

    /// Builds a complete packet: headers, `payload`, pad and the ICRC for `icrc`.
    /// `self.payload_len` is taken from `payload`.
    pub fn build(&self, payload: &[u8], icrc: &IcrcContext) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let mut repr = *self;
        repr.payload_len = payload.len();
        let range = repr.emit_into(&mut buf)?;
        buf[range].copy_from_slice(payload);
        icrc.fill(&mut buf)?;
        Ok(buf)
    }

    /// Makes `buf` (any earlier content and capacity reused, so a driver can recycle
    /// its frames) a packet of [`Self::buffer_len`] bytes with the headers and pad
    /// written, and returns the range of its `self.payload_len` payload bytes. The
    /// caller writes the payload there, then the ICRC ([`IcrcContext::fill`]): the
    /// payload goes from its source into the frame in one copy.
    pub fn emit_into(&self, buf: &mut Vec<u8>) -> Result<core::ops::Range<usize>> {
        let len = self.buffer_len();
        // Stale bytes of a recycled buffer are all overwritten: headers and pad by
        // `emit`, payload by the caller, ICRC by `fill`.
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        self.emit(buf)?;
        let start = BTH_LEN + self.header_set().len();
        Ok(start..start + self.payload_len)
    }
}

#[cfg(test)]
mod tests {
    use super::super::bth::DEFAULT_PKEY;
    use super::super::ext::Syndrome;
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn ctx() -> IcrcContext {
        IcrcContext::rxe(
            Ipv4Addr::new(10, 1, 1, 1),
            Ipv4Addr::new(10, 1, 1, 2),
            0xC00F,
            4791,
        )
    }

    fn bth(op: Opcode) -> BthRepr {
        BthRepr {
            opcode: op,
            solicited: false,
            migreq: false,
            pad_count: 0,
            pkey: DEFAULT_PKEY,
            fecn: false,
            becn: false,
            dest_qpn: 0x11,
            ack_req: true,
            psn: 0xABCDE,
        }
    }

    #[test]
    fn write_only_imm_round_trip() {
        let mut r = RoceRepr::new(bth(Opcode::RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE));
        r.reth = Some(RethRepr {
            va: 0x1000,
            rkey: 0x42,
            dma_len: 5,
        });
        r.imm = Some(0xDEADBEEF);
        let bytes = r.build(b"hello", &ctx()).unwrap();
        assert_eq!(bytes.len(), 12 + 20 + 5 + 3 + 4);
        let p = RocePacket::new_checked(&bytes[..]).unwrap();
        ctx().verify(p.as_bytes()).unwrap();
        assert_eq!(p.payload(), b"hello");
        let mut parsed = RoceRepr::parse(&p).unwrap();
        assert_eq!(parsed.bth.pad_count, 3);
        parsed.bth.pad_count = 0;
        assert_eq!(
            parsed,
            RoceRepr {
                payload_len: 5,
                ..r
            }
        );
    }

    #[test]
    fn emit_rejects_wrong_headers() {
        let r = RoceRepr::new(bth(Opcode::RC_RDMA_WRITE_FIRST));
        assert!(r.build(b"", &ctx()).is_err());
        let mut r = RoceRepr::new(bth(Opcode::RC_ACKNOWLEDGE));
        r.aeth = Some(AethRepr {
            syndrome: Syndrome::ACK,
            msn: 1,
        });
        assert!(r.build(b"x", &ctx()).is_err());
        assert!(r.build(b"", &ctx()).is_ok());
    }

    #[test]
    fn check_rejects_bad_pad_and_payload() {
        let mut r = RoceRepr::new(bth(Opcode::RC_ACKNOWLEDGE));
        r.aeth = Some(AethRepr {
            syndrome: Syndrome::ACK,
            msn: 1,
        });
        let mut b = r.build(b"", &ctx()).unwrap();
        b[1] |= 0x10; // pad 1 with no payload
        assert!(RocePacket::new_checked(&b[..]).is_err());
        let s = RoceRepr::new(bth(Opcode::RC_SEND_ONLY))
            .build(b"abcd", &ctx())
            .unwrap();
        // A packet whose length is not a multiple of 4 cannot be padded correctly.
        assert!(RocePacket::new_checked(&s[..s.len() - 1]).is_err());
    }

    fn arb_repr() -> impl Strategy<Value = (RoceRepr, Vec<u8>)> {
        let ops: Vec<u8> = (0u8..=0xFF).filter(|o| Opcode(*o).is_known()).collect();
        (
            proptest::sample::select(ops),
            any::<(bool, bool, u16, bool, bool, u32, bool, u32)>(),
            any::<(u64, u32, u32, u64, u64, u32, u32)>(),
            (0u8..5, 1u8..3, 0u8..2),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(op, b, e, (syn, plt, sel), mut payload)| {
                let opcode = Opcode(op);
                let info = opcode.info().unwrap();
                let mut r = RoceRepr::new(BthRepr {
                    opcode,
                    solicited: b.0,
                    migreq: b.1,
                    pad_count: 0,
                    pkey: b.2,
                    fecn: b.3,
                    becn: b.4,
                    dest_qpn: b.5 & 0xFF_FFFF,
                    ack_req: b.6,
                    psn: b.7 & 0xFF_FFFF,
                });
                let h = info.headers;
                if h.contains(HeaderSet::DETH) {
                    r.deth = Some(DethRepr {
                        qkey: e.1,
                        src_qpn: e.2 & 0xFF_FFFF,
                    });
                }
                if h.contains(HeaderSet::FETH) {
                    r.feth = Some(FethRepr {
                        placement: plt,
                        selectivity: sel,
                    });
                }
                if h.contains(HeaderSet::RETH) {
                    r.reth = Some(RethRepr {
                        va: e.0,
                        rkey: e.1,
                        dma_len: e.2,
                    });
                }
                if h.contains(HeaderSet::ATOMIC_ETH) {
                    r.atomic_eth = Some(AtomicEthRepr {
                        va: e.0,
                        rkey: e.1,
                        swap_add: e.3,
                        compare: e.4,
                    });
                }
                if h.contains(HeaderSet::AETH) {
                    let syndrome = match syn {
                        0 => Syndrome::ACK,
                        1 => Syndrome::RnrNak {
                            timer: (e.5 & 31) as u8,
                        },
                        2 => Syndrome::Nak(super::super::ext::NakCode::PsnSequenceError),
                        3 => Syndrome::Nak(super::super::ext::NakCode::RemoteAccessError),
                        _ => Syndrome::Ack {
                            credits: (e.6 & 31) as u8,
                        },
                    };
                    r.aeth = Some(AethRepr {
                        syndrome,
                        msn: e.6 & 0xFF_FFFF,
                    });
                }
                if h.contains(HeaderSet::ATOMIC_ACK_ETH) {
                    r.atomic_ack = Some(e.3);
                }
                if h.contains(HeaderSet::IMM_DT) {
                    r.imm = Some(e.5);
                }
                if h.contains(HeaderSet::IETH) {
                    r.ieth = Some(e.6);
                }
                match info.payload {
                    PayloadRule::None => payload.clear(),
                    PayloadRule::Exactly(n) => payload.resize(n, 0),
                    PayloadRule::Data => {}
                }
                r.payload_len = payload.len();
                (r, payload)
            })
    }

    proptest! {
        #[test]
        fn repr_round_trip((repr, payload) in arb_repr()) {
            let bytes = repr.build(&payload, &ctx()).unwrap();
            prop_assert_eq!(bytes.len() % 4, 0);
            let p = RocePacket::new_checked(&bytes[..]).unwrap();
            prop_assert!(ctx().verify(&bytes).is_ok());
            prop_assert_eq!(p.payload(), &payload[..]);
            let mut parsed = RoceRepr::parse(&p).unwrap();
            prop_assert_eq!(parsed.bth.pad_count, repr.pad_count());
            parsed.bth.pad_count = repr.bth.pad_count;
            prop_assert_eq!(parsed, repr);
            let again = parsed.build(p.payload(), &ctx()).unwrap();
            prop_assert_eq!(again, bytes);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(p) = RocePacket::new_checked(&bytes[..]) {
                let _ = RoceRepr::parse(&p);
                let _ = p.payload();
                let _ = p.icrc();
                let _ = (p.reth().map(|r| r.va()), p.aeth().map(|a| a.msn()));
                let _ = p.atomic_eth().map(|a| a.compare());
                let _ = p.feth().map(|f| f.placement());
            }
            let _ = ctx().verify(&bytes);
            let _ = super::super::frame::Ipv4UdpFrame::new_checked(&bytes[..]).map(|f| f.verify_icrc());
        }

        #[test]
        fn random_bytes_after_valid_opcode_never_panic(op in 0u8..=0xFF, bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut b = bytes;
            if !b.is_empty() { b[0] = op; }
            if let Ok(p) = RocePacket::new_checked(&b[..]) {
                let _ = RoceRepr::parse(&p);
                let _ = p.payload().len();
            }
        }
    }
}
