//! Base Transport Header (12 bytes).
//!
//! ```text
//!  0      opcode
//!  1      SE(7) M(6) PadCnt(5:4) TVer(3:0)
//!  2..4   P_Key
//!  4      FECN(7) BECN(6) resv6      <- "resv8a", masked to 0xFF in the ICRC
//!  5..8   DestQP
//!  8      AckReq(7) resv7
//!  9..12  PSN
//! ```

use super::{field, fixed_header_view, Error, Opcode, Result};

mod off {
    pub const OPCODE: usize = 0;
    pub const FLAGS: usize = 1;
    pub const PKEY: usize = 2;
    pub const RESV8A: usize = 4;
    pub const DQPN: usize = 5;
    pub const ACKREQ: usize = 8;
    pub const PSN: usize = 9;
}

/// Default partition key (full member, default partition).
pub const DEFAULT_PKEY: u16 = 0xFFFF;
/// PSNs and QPNs are 24-bit.
pub const MASK_24: u32 = 0x00FF_FFFF;

fixed_header_view!(
    /// View over a Base Transport Header.
    Bth,
    12
);

impl<T: AsRef<[u8]>> Bth<T> {
    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    /// Opcode.
    pub fn opcode(&self) -> Opcode {
        Opcode(self.b()[off::OPCODE])
    }
    /// Solicited event bit.
    pub fn solicited(&self) -> bool {
        self.b()[off::FLAGS] & 0x80 != 0
    }
    /// Migration state bit.
    pub fn migreq(&self) -> bool {
        self.b()[off::FLAGS] & 0x40 != 0
    }
    /// Number of pad bytes (0-3) before the ICRC.
    pub fn pad_count(&self) -> u8 {
        (self.b()[off::FLAGS] >> 4) & 0x3
    }
    /// Transport header version (0).
    pub fn tver(&self) -> u8 {
        self.b()[off::FLAGS] & 0x0F
    }
    /// Partition key.
    pub fn pkey(&self) -> u16 {
        field::u16_at(self.b(), off::PKEY)
    }
    /// Forward explicit congestion notification.
    pub fn fecn(&self) -> bool {
        self.b()[off::RESV8A] & 0x80 != 0
    }
    /// Backward explicit congestion notification.
    pub fn becn(&self) -> bool {
        self.b()[off::RESV8A] & 0x40 != 0
    }
    /// Whole byte 4 (FECN, BECN, 6 reserved bits).
    pub fn resv8a(&self) -> u8 {
        self.b()[off::RESV8A]
    }
    /// Destination queue pair number (24 bits).
    pub fn dest_qpn(&self) -> u32 {
        field::u24_at(self.b(), off::DQPN)
    }
    /// Acknowledge request bit.
    pub fn ack_req(&self) -> bool {
        self.b()[off::ACKREQ] & 0x80 != 0
    }
    /// The 7 reserved bits after AckReq.
    pub fn resv7(&self) -> u8 {
        self.b()[off::ACKREQ] & 0x7F
    }
    /// Packet sequence number (24 bits).
    pub fn psn(&self) -> u32 {
        field::u24_at(self.b(), off::PSN)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Bth<T> {
    fn bm(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    /// Sets the opcode.
    pub fn set_opcode(&mut self, op: Opcode) {
        self.bm()[off::OPCODE] = op.0;
    }
    /// Sets SE, M, PadCnt and TVer at once.
    pub fn set_flags(&mut self, solicited: bool, migreq: bool, pad_count: u8, tver: u8) {
        self.bm()[off::FLAGS] = (u8::from(solicited) << 7)
            | (u8::from(migreq) << 6)
            | ((pad_count & 3) << 4)
            | (tver & 0x0F);
    }
    /// Sets the partition key.
    pub fn set_pkey(&mut self, pkey: u16) {
        field::set_u16(self.bm(), off::PKEY, pkey);
    }
    /// Sets byte 4 (FECN/BECN/reserved).
    pub fn set_resv8a(&mut self, v: u8) {
        self.bm()[off::RESV8A] = v;
    }
    /// Sets the destination QPN (low 24 bits).
    pub fn set_dest_qpn(&mut self, qpn: u32) {
        field::set_u24(self.bm(), off::DQPN, qpn & MASK_24);
    }
    /// Sets AckReq and clears the reserved bits.
    pub fn set_ack_req(&mut self, ack_req: bool) {
        self.bm()[off::ACKREQ] = u8::from(ack_req) << 7;
    }
    /// Sets the PSN (low 24 bits).
    pub fn set_psn(&mut self, psn: u32) {
        field::set_u24(self.bm(), off::PSN, psn & MASK_24);
    }
}

/// Validated Base Transport Header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BthRepr {
    /// Opcode (must be known to parse).
    pub opcode: Opcode,
    /// Solicited event.
    pub solicited: bool,
    /// Migration state (rxe sets it on RC packets: APM "migrated").
    pub migreq: bool,
    /// Pad bytes before the ICRC (0-3).
    pub pad_count: u8,
    /// Partition key.
    pub pkey: u16,
    /// FECN bit.
    pub fecn: bool,
    /// BECN bit.
    pub becn: bool,
    /// Destination QPN (24 bits).
    pub dest_qpn: u32,
    /// Acknowledge request.
    pub ack_req: bool,
    /// PSN (24 bits).
    pub psn: u32,
}

impl BthRepr {
    /// Length of the emitted header.
    pub const fn buffer_len(&self) -> usize {
        12
    }

    /// Parses a checked view. Rejects unknown opcodes and a non-zero TVer.
    /// Reserved bits are ignored on receive, as rxe does.
    pub fn parse<T: AsRef<[u8]>>(bth: &Bth<T>) -> Result<Self> {
        bth.check_len()?;
        let opcode = bth.opcode();
        if !opcode.is_known() {
            return Err(Error::UnknownOpcode(opcode.0));
        }
        if bth.tver() != 0 {
            return Err(Error::Malformed("BTH transport version is not 0"));
        }
        Ok(Self {
            opcode,
            solicited: bth.solicited(),
            migreq: bth.migreq(),
            pad_count: bth.pad_count(),
            pkey: bth.pkey(),
            fecn: bth.fecn(),
            becn: bth.becn(),
            dest_qpn: bth.dest_qpn(),
            ack_req: bth.ack_req(),
            psn: bth.psn(),
        })
    }

    /// Writes the header; reserved bits are written as zero.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, bth: &mut Bth<T>) {
        bth.set_opcode(self.opcode);
        bth.set_flags(self.solicited, self.migreq, self.pad_count, 0);
        bth.set_pkey(self.pkey);
        bth.set_resv8a((u8::from(self.fecn) << 7) | (u8::from(self.becn) << 6));
        bth.set_dest_qpn(self.dest_qpn);
        bth.set_ack_req(self.ack_req);
        bth.set_psn(self.psn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BYTES: [u8; 12] = [
        0x0A, 0xB0, 0xFF, 0xFF, 0x40, 0x00, 0x01, 0x18, 0x80, 0x12, 0x34, 0x56,
    ];

    #[test]
    fn parse_fields() {
        let bth = Bth::new_checked(&BYTES[..]).unwrap();
        let r = BthRepr::parse(&bth).unwrap();
        assert_eq!(r.opcode, Opcode::RC_RDMA_WRITE_ONLY);
        assert!(r.solicited);
        assert!(!r.migreq);
        assert_eq!(r.pad_count, 3);
        assert_eq!(r.pkey, 0xFFFF);
        assert!(r.becn && !r.fecn);
        assert_eq!(r.dest_qpn, 0x118);
        assert!(r.ack_req);
        assert_eq!(r.psn, 0x123456);
        let mut out = [0u8; 12];
        r.emit(&mut Bth::new_unchecked(&mut out[..]));
        assert_eq!(out, BYTES);
    }

    #[test]
    fn short_and_bad() {
        assert_eq!(Bth::new_checked(&BYTES[..11]), Err(Error::Truncated));
        let mut b = BYTES;
        b[0] = 0x15;
        assert_eq!(
            BthRepr::parse(&Bth::new_unchecked(&b[..])),
            Err(Error::UnknownOpcode(0x15))
        );
        let mut b = BYTES;
        b[1] |= 1;
        assert!(BthRepr::parse(&Bth::new_unchecked(&b[..])).is_err());
    }
}
