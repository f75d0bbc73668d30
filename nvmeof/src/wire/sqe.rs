//! The 64-byte submission queue entry (SQE), the command part of a command capsule.
//!
//! | bytes | field |
//! |-------|-------|
//! | 0     | opcode |
//! | 1     | FUSE (bits 1:0), PSDT (bits 7:6) |
//! | 2-3   | command identifier (CID) |
//! | 4-7   | namespace identifier (NSID) |
//! | 8-15  | CDW2, CDW3 |
//! | 16-23 | metadata pointer (MPTR) |
//! | 24-39 | data pointer (DPTR): PRP1/PRP2 or one SGL descriptor |
//! | 40-63 | CDW10 .. CDW15 |
//!
//! NVMe over Fabrics uses SGLs only (PSDT 01b); PRP entries are parsed so the type
//! covers PCIe-style commands too.

use super::field::{self, u16_at, u32_at, u64_at, u8_at};
use super::sgl::{Sgl, SglRepr};
use super::{StatusCode, WireError};

/// Byte offsets of the SQE fields.
pub mod offsets {
    /// Opcode.
    pub const OPCODE: usize = 0;
    /// FUSE and PSDT.
    pub const FLAGS: usize = 1;
    /// Command identifier.
    pub const CID: usize = 2;
    /// Namespace identifier.
    pub const NSID: usize = 4;
    /// Command dword 2.
    pub const CDW2: usize = 8;
    /// Command dword 3.
    pub const CDW3: usize = 12;
    /// Metadata pointer.
    pub const MPTR: usize = 16;
    /// Data pointer (PRP1, or the SGL descriptor).
    pub const DPTR: usize = 24;
    /// PRP entry 2.
    pub const PRP2: usize = 32;
    /// Command dword 10; CDW11..CDW15 follow at 4-byte steps.
    pub const CDW10: usize = 40;
}

/// Fused operation (FLAGS bits 1:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Fuse {
    /// Normal operation.
    #[default]
    Normal,
    /// First command of a fused operation.
    First,
    /// Second command of a fused operation.
    Second,
}

/// PRP or SGL for data transfer (FLAGS bits 7:6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Psdt {
    /// PRPs.
    Prp,
    /// SGLs; MPTR is the address of a contiguous metadata buffer.
    Sgl,
    /// SGLs; MPTR is the address of a metadata SGL segment.
    SglMetadataSegment,
}

/// The data pointer, by the PSDT that says how to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dptr {
    /// PSDT 00b: PRP entries.
    Prp {
        /// PRP entry 1.
        prp1: u64,
        /// PRP entry 2.
        prp2: u64,
    },
    /// PSDT 01b: one SGL descriptor, MPTR a contiguous metadata buffer.
    Sgl(SglRepr),
    /// PSDT 10b: one SGL descriptor, MPTR a metadata SGL segment.
    SglMetadataSegment(SglRepr),
}

impl Default for Dptr {
    fn default() -> Self {
        Dptr::Sgl(SglRepr::default())
    }
}

impl Dptr {
    /// The PSDT this data pointer is read with.
    pub fn psdt(&self) -> Psdt {
        match self {
            Dptr::Prp { .. } => Psdt::Prp,
            Dptr::Sgl(_) => Psdt::Sgl,
            Dptr::SglMetadataSegment(_) => Psdt::SglMetadataSegment,
        }
    }

    /// The SGL descriptor, if PSDT selects SGLs.
    pub fn sgl(&self) -> Option<&SglRepr> {
        match self {
            Dptr::Prp { .. } => None,
            Dptr::Sgl(s) | Dptr::SglMetadataSegment(s) => Some(s),
        }
    }
}

/// A view over a 64-byte submission queue entry.
#[derive(Debug, Clone)]
pub struct Sqe<T: AsRef<[u8]>> {
    buffer: T,
}

macro_rules! cdw_accessors {
    ($( $get:ident, $set:ident, $n:literal; )*) => {
        impl<T: AsRef<[u8]>> Sqe<T> {
            $(
                #[doc = concat!("Command dword ", $n, ".")]
                pub fn $get(&self) -> u32 {
                    u32_at(self.buf(), offsets::CDW10 + 4 * ($n - 10))
                }
            )*
        }
        impl<T: AsRef<[u8]> + AsMut<[u8]>> Sqe<T> {
            $(
                #[doc = concat!("Sets command dword ", $n, ".")]
                pub fn $set(&mut self, v: u32) {
                    field::set_u32(self.buf_mut(), offsets::CDW10 + 4 * ($n - 10), v);
                }
            )*
        }
    };
}

cdw_accessors! {
    cdw10, set_cdw10, 10;
    cdw11, set_cdw11, 11;
    cdw12, set_cdw12, 12;
    cdw13, set_cdw13, 13;
    cdw14, set_cdw14, 14;
    cdw15, set_cdw15, 15;
}

impl<T: AsRef<[u8]>> Sqe<T> {
    /// Size of an SQE.
    pub const LEN: usize = 64;

    /// Wraps `buffer`, which must hold at least 64 bytes (a capsule's in-capsule
    /// data may follow).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        field::checked(buffer.as_ref(), Self::LEN, "submission queue entry")?;
        Ok(Sqe { buffer })
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub(crate) fn buf(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Opcode.
    pub fn opcode(&self) -> u8 {
        u8_at(self.buf(), offsets::OPCODE)
    }

    /// Byte 1: FUSE and PSDT.
    pub fn flags(&self) -> u8 {
        u8_at(self.buf(), offsets::FLAGS)
    }

    /// FUSE, bits 1:0 of byte 1.
    pub fn fuse_bits(&self) -> u8 {
        self.flags() & 0x3
    }

    /// PSDT, bits 7:6 of byte 1.
    pub fn psdt_bits(&self) -> u8 {
        self.flags() >> 6
    }

    /// Command identifier.
    pub fn cid(&self) -> u16 {
        u16_at(self.buf(), offsets::CID)
    }

    /// Namespace identifier.
    pub fn nsid(&self) -> u32 {
        u32_at(self.buf(), offsets::NSID)
    }

    /// Command dword 2.
    pub fn cdw2(&self) -> u32 {
        u32_at(self.buf(), offsets::CDW2)
    }

    /// Command dword 3.
    pub fn cdw3(&self) -> u32 {
        u32_at(self.buf(), offsets::CDW3)
    }

    /// Metadata pointer.
    pub fn mptr(&self) -> u64 {
        u64_at(self.buf(), offsets::MPTR)
    }

    /// PRP entry 1 (the first 8 bytes of DPTR).
    pub fn prp1(&self) -> u64 {
        u64_at(self.buf(), offsets::DPTR)
    }

    /// PRP entry 2.
    pub fn prp2(&self) -> u64 {
        u64_at(self.buf(), offsets::PRP2)
    }

    /// DPTR as an SGL descriptor view.
    pub fn dptr_sgl(&self) -> Sgl<&[u8]> {
        Sgl::new_checked(self.dptr_bytes()).expect("view holds 64 bytes, DPTR is 24..40")
    }

    fn dptr_bytes(&self) -> &[u8] {
        self.buf()
            .get(offsets::DPTR..offsets::CDW10)
            .unwrap_or_default()
    }

    /// CDW10 .. CDW15.
    pub fn cdws(&self) -> [u32; 6] {
        [
            self.cdw10(),
            self.cdw11(),
            self.cdw12(),
            self.cdw13(),
            self.cdw14(),
            self.cdw15(),
        ]
    }

    /// Bytes after the SQE in the buffer (a capsule's in-capsule data).
    pub fn in_capsule_data(&self) -> &[u8] {
        self.buf().get(Self::LEN..).unwrap_or_default()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Sqe<T> {
    pub(crate) fn buf_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets the opcode.
    pub fn set_opcode(&mut self, v: u8) {
        field::set_u8(self.buf_mut(), offsets::OPCODE, v);
    }

    /// Sets byte 1 (FUSE and PSDT).
    pub fn set_flags(&mut self, v: u8) {
        field::set_u8(self.buf_mut(), offsets::FLAGS, v);
    }

    /// Sets the command identifier.
    pub fn set_cid(&mut self, v: u16) {
        field::set_u16(self.buf_mut(), offsets::CID, v);
    }

    /// Sets the namespace identifier.
    pub fn set_nsid(&mut self, v: u32) {
        field::set_u32(self.buf_mut(), offsets::NSID, v);
    }

    /// Sets command dword 2.
    pub fn set_cdw2(&mut self, v: u32) {
        field::set_u32(self.buf_mut(), offsets::CDW2, v);
    }

    /// Sets command dword 3.
    pub fn set_cdw3(&mut self, v: u32) {
        field::set_u32(self.buf_mut(), offsets::CDW3, v);
    }

    /// Sets the metadata pointer.
    pub fn set_mptr(&mut self, v: u64) {
        field::set_u64(self.buf_mut(), offsets::MPTR, v);
    }

    /// Sets PRP entry 1.
    pub fn set_prp1(&mut self, v: u64) {
        field::set_u64(self.buf_mut(), offsets::DPTR, v);
    }

    /// Sets PRP entry 2.
    pub fn set_prp2(&mut self, v: u64) {
        field::set_u64(self.buf_mut(), offsets::PRP2, v);
    }

    /// DPTR as a mutable SGL descriptor view.
    pub fn dptr_sgl_mut(&mut self) -> Sgl<&mut [u8]> {
        let bytes = self
            .buf_mut()
            .get_mut(offsets::DPTR..offsets::CDW10)
            .unwrap_or_default();
        Sgl::new_checked(bytes).expect("view holds 64 bytes, DPTR is 24..40")
    }

    /// Zeroes the 64 bytes of the SQE (not any in-capsule data after it).
    pub fn clear(&mut self) {
        if let Some(b) = self.buf_mut().get_mut(..Self::LEN) {
            b.fill(0);
        }
    }

    /// Sets CDW10 .. CDW15.
    pub fn set_cdws(&mut self, cdws: [u32; 6]) {
        for (i, v) in cdws.into_iter().enumerate() {
            field::set_u32(self.buf_mut(), offsets::CDW10 + 4 * i, v);
        }
    }
}

/// A validated submission queue entry.
///
/// Fields whose meaning depends on the opcode (NSID, CDW2-3, CDW10-15) are kept raw;
/// [`opcodes`](super::opcodes), [`fabrics`](super::fabrics),
/// [`identify`](super::identify) and [`log`](super::log) give them types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SqeRepr {
    /// Opcode (admin or I/O, by queue).
    pub opcode: u8,
    /// Fused operation.
    pub fuse: Fuse,
    /// Command identifier.
    pub cid: u16,
    /// Namespace identifier.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer; its variant gives PSDT.
    pub dptr: Dptr,
    /// CDW10 .. CDW15.
    pub cdw10_15: [u32; 6],
}

impl SqeRepr {
    /// Parses an SQE view. Reserved FUSE or PSDT values, and an SGL descriptor that
    /// does not parse, are errors whose offset is from the start of the SQE.
    pub fn parse<T: AsRef<[u8]>>(sqe: &Sqe<T>) -> Result<SqeRepr, WireError> {
        let flags_error = |field| WireError::Invalid {
            structure: "submission queue entry",
            field,
            offset: offsets::FLAGS,
            status: StatusCode::InvalidField,
        };
        let fuse = match sqe.fuse_bits() {
            0 => Fuse::Normal,
            1 => Fuse::First,
            2 => Fuse::Second,
            _ => return Err(flags_error("FUSE")),
        };
        if sqe.flags() & 0x3C != 0 {
            return Err(flags_error("reserved flag bits"));
        }
        let sgl = || SglRepr::parse(&sqe.dptr_sgl()).map_err(|e| e.within(offsets::DPTR));
        let dptr = match sqe.psdt_bits() {
            0 => Dptr::Prp {
                prp1: sqe.prp1(),
                prp2: sqe.prp2(),
            },
            1 => Dptr::Sgl(sgl()?),
            2 => Dptr::SglMetadataSegment(sgl()?),
            _ => return Err(flags_error("PSDT")),
        };
        Ok(SqeRepr {
            opcode: sqe.opcode(),
            fuse,
            cid: sqe.cid(),
            nsid: sqe.nsid(),
            cdw2: sqe.cdw2(),
            cdw3: sqe.cdw3(),
            mptr: sqe.mptr(),
            dptr,
            cdw10_15: sqe.cdws(),
        })
    }

    /// Writes all 64 bytes of the SQE.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, sqe: &mut Sqe<T>) {
        sqe.clear();
        let fuse = match self.fuse {
            Fuse::Normal => 0,
            Fuse::First => 1,
            Fuse::Second => 2,
        };
        let psdt: u8 = match self.dptr.psdt() {
            Psdt::Prp => 0,
            Psdt::Sgl => 1,
            Psdt::SglMetadataSegment => 2,
        };
        sqe.set_opcode(self.opcode);
        sqe.set_flags((psdt << 6) | fuse);
        sqe.set_cid(self.cid);
        sqe.set_nsid(self.nsid);
        sqe.set_cdw2(self.cdw2);
        sqe.set_cdw3(self.cdw3);
        sqe.set_mptr(self.mptr);
        match &self.dptr {
            Dptr::Prp { prp1, prp2 } => {
                sqe.set_prp1(*prp1);
                sqe.set_prp2(*prp2);
            }
            Dptr::Sgl(s) | Dptr::SglMetadataSegment(s) => s.emit(&mut sqe.dptr_sgl_mut()),
        }
        sqe.set_cdws(self.cdw10_15);
    }

    /// The SQE as 64 bytes.
    pub fn to_bytes(&self) -> [u8; 64] {
        sqe_bytes(|view| self.emit(view))
    }

    /// The 64-bit value in CDW`n` (low half) and CDW`n+1` (high half), for `n` in
    /// 10..=14 (SLBA in CDW10-11, LPO in CDW12-13); 0 for other `n`.
    pub fn cdw_u64(&self, n: usize) -> u64 {
        let lo = n.checked_sub(10).and_then(|i| self.cdw10_15.get(i..i + 2));
        lo.map_or(0, |d| u64::from(d[0]) | (u64::from(d[1]) << 32))
    }

    /// Sets CDW`n` and CDW`n+1` to the low and high halves of `v`, for `n` in
    /// 10..=14; nothing for other `n`.
    pub fn set_cdw_u64(&mut self, n: usize, v: u64) {
        if let Some(d) = n
            .checked_sub(10)
            .and_then(|i| self.cdw10_15.get_mut(i..i + 2))
        {
            d[0] = v as u32;
            d[1] = (v >> 32) as u32;
        }
    }
}

/// 64 bytes written by `emit` through an SQE view.
pub(crate) fn sqe_bytes(emit: impl FnOnce(&mut Sqe<&mut [u8]>)) -> [u8; 64] {
    let mut out = [0u8; 64];
    if let Ok(mut view) = Sqe::new_checked(&mut out[..]) {
        emit(&mut view);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::sgl::tests::arb_sgl;
    use crate::wire::sgl::KeyedSgl;
    use proptest::prelude::*;

    #[test]
    fn read_command_exact_bytes() {
        let k = KeyedSgl::new(0x1000, 4096, 0x1234, false).unwrap();
        let repr = SqeRepr {
            opcode: 0x02,
            cid: 0xBEEF,
            nsid: 1,
            dptr: Dptr::Sgl(SglRepr::Keyed(k)),
            cdw10_15: [0x10, 0, 7, 0, 0, 0],
            ..Default::default()
        };
        let b = repr.to_bytes();
        assert_eq!(b[0], 0x02);
        assert_eq!(b[1], 0x40, "PSDT 01b");
        assert_eq!(&b[2..4], &[0xEF, 0xBE]);
        assert_eq!(&b[4..8], &[1, 0, 0, 0]);
        assert_eq!(&b[24..32], &0x1000u64.to_le_bytes());
        assert_eq!(&b[32..35], &[0x00, 0x10, 0x00], "24-bit length 4096");
        assert_eq!(&b[35..39], &0x1234u32.to_le_bytes());
        assert_eq!(b[39], 0x40);
        assert_eq!(&b[40..44], &[0x10, 0, 0, 0]);
        assert_eq!(&b[48..52], &[7, 0, 0, 0]);
        assert_eq!(
            SqeRepr::parse(&Sqe::new_checked(&b[..]).unwrap()).unwrap(),
            repr
        );
    }

    #[test]
    fn malformed_sqe_is_an_error() {
        assert!(matches!(
            Sqe::new_checked(&[0u8; 63][..]),
            Err(WireError::Truncated {
                needed: 64,
                got: 63,
                ..
            })
        ));
        let mut b = [0u8; 64];
        b[1] = 0xC0; // PSDT 11b
        let e = SqeRepr::parse(&Sqe::new_checked(&b[..]).unwrap()).unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::InvalidField));
        b[1] = 0x03; // FUSE 11b
        assert!(SqeRepr::parse(&Sqe::new_checked(&b[..]).unwrap()).is_err());
        b[1] = 0x40;
        b[39] = 0x70; // reserved SGL type
        let e = SqeRepr::parse(&Sqe::new_checked(&b[..]).unwrap()).unwrap_err();
        assert!(matches!(
            e,
            WireError::Invalid {
                offset: 39,
                status: StatusCode::SglDescriptorTypeInvalid,
                ..
            }
        ));
    }

    #[test]
    fn cdw_u64_pairs() {
        let mut r = SqeRepr::default();
        r.set_cdw_u64(12, 0x1122_3344_5566_7788);
        assert_eq!(r.cdw10_15[2..4], [0x5566_7788, 0x1122_3344]);
        assert_eq!(r.cdw_u64(12), 0x1122_3344_5566_7788);
        r.set_cdw_u64(15, 1); // no CDW16: ignored
        r.set_cdw_u64(9, 1);
        assert_eq!((r.cdw_u64(15), r.cdw_u64(9), r.cdw10_15[5]), (0, 0, 0));
    }

    pub(crate) fn arb_sqe() -> impl Strategy<Value = SqeRepr> {
        let dptr = prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(prp1, prp2)| Dptr::Prp { prp1, prp2 }),
            arb_sgl().prop_map(Dptr::Sgl),
            arb_sgl().prop_map(Dptr::SglMetadataSegment),
        ];
        (
            any::<(u8, u16, u32, u32, u32, u64)>(),
            0u8..3,
            dptr,
            any::<[u32; 6]>(),
        )
            .prop_map(
                |((opcode, cid, nsid, cdw2, cdw3, mptr), fuse, dptr, cdw10_15)| SqeRepr {
                    opcode,
                    fuse: [Fuse::Normal, Fuse::First, Fuse::Second][usize::from(fuse)],
                    cid,
                    nsid,
                    cdw2,
                    cdw3,
                    mptr,
                    dptr,
                    cdw10_15,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn round_trip(repr in arb_sqe()) {
            let b = repr.to_bytes();
            prop_assert_eq!(SqeRepr::parse(&Sqe::new_checked(&b[..]).unwrap()).unwrap(), repr);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            match Sqe::new_checked(&bytes[..]) {
                Ok(view) => {
                    if let Ok(repr) = SqeRepr::parse(&view) {
                        let again = repr.to_bytes();
                        prop_assert_eq!(SqeRepr::parse(&Sqe::new_checked(&again[..]).unwrap()).unwrap(), repr);
                    }
                    let _ = view.in_capsule_data();
                }
                Err(_) => prop_assert!(bytes.len() < 64),
            }
        }
    }
}
