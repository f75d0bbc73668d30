//! The 16-byte completion queue entry (CQE), the response capsule of NVMe-oF.
//!
//! | bytes | field |
//! |-------|-------|
//! | 0-3   | DW0, command specific (Connect: controller ID) |
//! | 4-7   | DW1, command specific |
//! | 8-9   | SQ head pointer (SQHD) |
//! | 10-11 | SQ identifier (SQID) |
//! | 12-13 | command identifier (CID) |
//! | 14-15 | phase tag (bit 0) and status ([`Status`]) |

use super::field::{self, u16_at, u32_at};
use super::status::Status;
use super::WireError;

/// Byte offsets of the CQE fields.
pub mod offsets {
    /// Command specific DW0.
    pub const DW0: usize = 0;
    /// Command specific DW1.
    pub const DW1: usize = 4;
    /// SQ head pointer.
    pub const SQ_HEAD: usize = 8;
    /// SQ identifier.
    pub const SQ_ID: usize = 10;
    /// Command identifier.
    pub const CID: usize = 12;
    /// Phase and status field.
    pub const STATUS: usize = 14;
}

/// A view over a 16-byte completion queue entry.
#[derive(Debug, Clone)]
pub struct Cqe<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Cqe<T> {
    /// Size of a CQE.
    pub const LEN: usize = 16;

    /// Wraps `buffer`, which must hold at least 16 bytes.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        field::checked(buffer.as_ref(), Self::LEN, "completion queue entry")?;
        Ok(Cqe { buffer })
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn buf(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Command specific DW0.
    pub fn dw0(&self) -> u32 {
        u32_at(self.buf(), offsets::DW0)
    }

    /// Command specific DW1.
    pub fn dw1(&self) -> u32 {
        u32_at(self.buf(), offsets::DW1)
    }

    /// SQ head pointer.
    pub fn sq_head(&self) -> u16 {
        u16_at(self.buf(), offsets::SQ_HEAD)
    }

    /// SQ identifier.
    pub fn sq_id(&self) -> u16 {
        u16_at(self.buf(), offsets::SQ_ID)
    }

    /// Command identifier.
    pub fn cid(&self) -> u16 {
        u16_at(self.buf(), offsets::CID)
    }

    /// The raw phase + status field.
    pub fn status_field(&self) -> u16 {
        u16_at(self.buf(), offsets::STATUS)
    }

    /// Phase tag (bit 0 of the status field).
    pub fn phase(&self) -> bool {
        self.status_field() & 1 != 0
    }

    /// The status, without the phase tag.
    pub fn status(&self) -> Status {
        Status::from_field(self.status_field())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Cqe<T> {
    fn buf_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets DW0.
    pub fn set_dw0(&mut self, v: u32) {
        field::set_u32(self.buf_mut(), offsets::DW0, v);
    }

    /// Sets DW1.
    pub fn set_dw1(&mut self, v: u32) {
        field::set_u32(self.buf_mut(), offsets::DW1, v);
    }

    /// Sets the SQ head pointer.
    pub fn set_sq_head(&mut self, v: u16) {
        field::set_u16(self.buf_mut(), offsets::SQ_HEAD, v);
    }

    /// Sets the SQ identifier.
    pub fn set_sq_id(&mut self, v: u16) {
        field::set_u16(self.buf_mut(), offsets::SQ_ID, v);
    }

    /// Sets the command identifier.
    pub fn set_cid(&mut self, v: u16) {
        field::set_u16(self.buf_mut(), offsets::CID, v);
    }

    /// Sets the raw phase + status field.
    pub fn set_status_field(&mut self, v: u16) {
        field::set_u16(self.buf_mut(), offsets::STATUS, v);
    }
}

/// A completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CqeRepr {
    /// Command specific DW0.
    pub dw0: u32,
    /// Command specific DW1.
    pub dw1: u32,
    /// SQ head pointer.
    pub sq_head: u16,
    /// SQ identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (meaningful on PCIe; NVMe-oF targets send 0).
    pub phase: bool,
    /// Status.
    pub status: Status,
}

impl CqeRepr {
    /// Parses a CQE view. Every bit pattern is a valid CQE.
    pub fn parse<T: AsRef<[u8]>>(cqe: &Cqe<T>) -> Result<CqeRepr, WireError> {
        Ok(CqeRepr {
            dw0: cqe.dw0(),
            dw1: cqe.dw1(),
            sq_head: cqe.sq_head(),
            sq_id: cqe.sq_id(),
            cid: cqe.cid(),
            phase: cqe.phase(),
            status: cqe.status(),
        })
    }

    /// Writes all 16 bytes of the CQE.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, cqe: &mut Cqe<T>) {
        cqe.set_dw0(self.dw0);
        cqe.set_dw1(self.dw1);
        cqe.set_sq_head(self.sq_head);
        cqe.set_sq_id(self.sq_id);
        cqe.set_cid(self.cid);
        cqe.set_status_field(self.status.to_field(self.phase));
    }

    /// The CQE as 16 bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        if let Ok(mut view) = Cqe::new_checked(&mut out[..]) {
            self.emit(&mut view);
        }
        out
    }

    /// DW0 and DW1 as one 64-bit result (Property Get of an 8-byte property).
    pub fn result(&self) -> u64 {
        u64::from(self.dw0) | (u64::from(self.dw1) << 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::status::{StatusCode, StatusContext};
    use proptest::prelude::*;

    #[test]
    fn invalid_field_completion_exact_bytes() {
        let cqe = CqeRepr {
            sq_head: 5,
            sq_id: 1,
            cid: 0x0102,
            status: Status::new(StatusCode::InvalidField).with_dnr(),
            ..Default::default()
        };
        assert_eq!(
            cqe.to_bytes(),
            [0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 1, 0, 0x02, 0x01, 0x04, 0x80]
        );
        let parsed = CqeRepr::parse(&Cqe::new_checked(&cqe.to_bytes()[..]).unwrap()).unwrap();
        assert_eq!(parsed, cqe);
        assert_eq!(
            parsed.status.code(StatusContext::Io),
            StatusCode::InvalidField
        );
        assert!(parsed.status.dnr);
    }

    #[test]
    fn short_cqe_is_an_error() {
        assert!(Cqe::new_checked(&[0u8; 15][..]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn bytes_round_trip(bytes in any::<[u8; 16]>()) {
            let repr = CqeRepr::parse(&Cqe::new_checked(&bytes[..]).unwrap()).unwrap();
            prop_assert_eq!(repr.to_bytes(), bytes);
        }
    }
}
