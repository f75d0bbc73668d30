//! SGL descriptors (16 bytes), as carried in the SQE's DPTR.
//!
//! Byte 15 is `type << 4 | subtype`. The forms an NVMe-oF RDMA target sees are the
//! keyed data block (`0x40`, `0x4F` with remote invalidate: 64-bit address, 24-bit
//! length, 32-bit key) for data the target moves with RDMA READ/WRITE, and the data
//! block with the offset subtype (`0x01`) for in-capsule data that follows the SQE in
//! the same message. Reserved descriptor types are rejected with *SGL Descriptor Type
//! Invalid*; an unsupported subtype of a known type with *Invalid Field*, as Linux
//! nvmet does.

use super::field::{self, u32_at, u64_at, u8_at};
use super::{StatusCode, WireError};

mod layout {
    pub const ADDRESS: usize = 0;
    pub const LENGTH: usize = 8;
    pub const KEY: usize = 11;
    pub const TYPE: usize = 15;
}

/// Descriptor type: data block.
pub const TYPE_DATA_BLOCK: u8 = 0x0;
/// Descriptor type: bit bucket.
pub const TYPE_BIT_BUCKET: u8 = 0x1;
/// Descriptor type: segment.
pub const TYPE_SEGMENT: u8 = 0x2;
/// Descriptor type: last segment.
pub const TYPE_LAST_SEGMENT: u8 = 0x3;
/// Descriptor type: keyed data block.
pub const TYPE_KEYED_DATA_BLOCK: u8 = 0x4;
/// Descriptor type: transport SGL data block.
pub const TYPE_TRANSPORT_DATA_BLOCK: u8 = 0x5;
/// Subtype: address.
pub const SUBTYPE_ADDRESS: u8 = 0x0;
/// Subtype: offset (in-capsule data).
pub const SUBTYPE_OFFSET: u8 = 0x1;
/// Subtype: transport specific A (NVMe/TCP uses it for host-memory data).
pub const SUBTYPE_TRANSPORT_A: u8 = 0xA;
/// Subtype of a keyed data block: invalidate the key after the transfer.
pub const SUBTYPE_INVALIDATE: u8 = 0xF;

/// A view over a 16-byte SGL descriptor.
#[derive(Debug, Clone)]
pub struct Sgl<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Sgl<T> {
    /// Size of a descriptor.
    pub const LEN: usize = 16;

    /// Wraps `buffer`, which must hold at least 16 bytes.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        field::checked(buffer.as_ref(), Self::LEN, "SGL descriptor")?;
        Ok(Sgl { buffer })
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn buf(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Address (or offset, for the offset subtype), bytes 0-7.
    pub fn address(&self) -> u64 {
        u64_at(self.buf(), layout::ADDRESS)
    }

    /// Length of an unkeyed descriptor, bytes 8-11.
    pub fn length(&self) -> u32 {
        u32_at(self.buf(), layout::LENGTH)
    }

    /// Length of a keyed descriptor, 24 bits in bytes 8-10.
    pub fn keyed_length(&self) -> u32 {
        u32_at(self.buf(), layout::LENGTH) & KeyedSgl::MAX_LENGTH
    }

    /// Key of a keyed descriptor, bytes 11-14.
    pub fn key(&self) -> u32 {
        u32_at(self.buf(), layout::KEY)
    }

    /// Descriptor type, the high nibble of byte 15.
    pub fn descriptor_type(&self) -> u8 {
        u8_at(self.buf(), layout::TYPE) >> 4
    }

    /// Descriptor subtype, the low nibble of byte 15.
    pub fn subtype(&self) -> u8 {
        u8_at(self.buf(), layout::TYPE) & 0xF
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Sgl<T> {
    fn buf_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets bytes 0-7.
    pub fn set_address(&mut self, v: u64) {
        field::set_u64(self.buf_mut(), layout::ADDRESS, v);
    }

    /// Sets bytes 8-11.
    pub fn set_length(&mut self, v: u32) {
        field::set_u32(self.buf_mut(), layout::LENGTH, v);
    }

    /// Sets the 24-bit keyed length (bytes 8-10), leaving byte 11 alone.
    pub fn set_keyed_length(&mut self, v: u32) {
        let b = (v & KeyedSgl::MAX_LENGTH).to_le_bytes();
        field::put(self.buf_mut(), layout::LENGTH, &b[..3]);
    }

    /// Sets the key (bytes 11-14).
    pub fn set_key(&mut self, v: u32) {
        field::set_u32(self.buf_mut(), layout::KEY, v);
    }

    /// Sets byte 15 to `descriptor_type << 4 | subtype`.
    pub fn set_type(&mut self, descriptor_type: u8, subtype: u8) {
        field::set_u8(
            self.buf_mut(),
            layout::TYPE,
            (descriptor_type << 4) | (subtype & 0xF),
        );
    }
}

/// A keyed SGL data block: remote memory the target reads or writes with RDMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyedSgl {
    address: u64,
    length: u32,
    key: u32,
    invalidate: bool,
}

impl KeyedSgl {
    /// Largest length a keyed descriptor can carry (24 bits).
    pub const MAX_LENGTH: u32 = 0xFF_FFFF;

    /// A keyed descriptor; `length` must fit in 24 bits.
    pub fn new(address: u64, length: u32, key: u32, invalidate: bool) -> Result<Self, WireError> {
        if length > Self::MAX_LENGTH {
            return Err(WireError::Invalid {
                structure: "keyed SGL data block",
                field: "length",
                offset: layout::LENGTH,
                status: StatusCode::DataSglLengthInvalid,
            });
        }
        Ok(KeyedSgl {
            address,
            length,
            key,
            invalidate,
        })
    }

    /// Remote address.
    pub fn address(&self) -> u64 {
        self.address
    }

    /// Length in bytes (at most [`KeyedSgl::MAX_LENGTH`]).
    pub fn length(&self) -> u32 {
        self.length
    }

    /// Remote key.
    pub fn key(&self) -> u32 {
        self.key
    }

    /// Whether the host asks the target to invalidate the key (Send with Invalidate).
    pub fn invalidate(&self) -> bool {
        self.invalidate
    }
}

/// A validated SGL descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SglRepr {
    /// Data block, address subtype (`0x00`): host memory at `address`.
    DataBlock {
        /// Address.
        address: u64,
        /// Length in bytes.
        length: u32,
    },
    /// Data block, offset subtype (`0x01`): in-capsule data at `offset` from the
    /// start of the capsule's data (which follows the SQE).
    InCapsule {
        /// Offset into the in-capsule data.
        offset: u64,
        /// Length in bytes.
        length: u32,
    },
    /// Bit bucket (`0x10`): data to discard.
    BitBucket {
        /// Length in bytes.
        length: u32,
    },
    /// Segment (`0x20`): the next segment of descriptors.
    Segment {
        /// Address of the segment.
        address: u64,
        /// Length of the segment in bytes.
        length: u32,
    },
    /// Last segment (`0x30`).
    LastSegment {
        /// Address of the segment.
        address: u64,
        /// Length of the segment in bytes.
        length: u32,
    },
    /// Keyed data block (`0x40`, `0x4F`).
    Keyed(KeyedSgl),
    /// Transport SGL data block (`0x5X`), e.g. NVMe/TCP's `0x5A`.
    TransportDataBlock {
        /// Subtype (low nibble).
        subtype: u8,
        /// Length in bytes.
        length: u32,
    },
}

impl Default for SglRepr {
    /// A zero-length data block: what commands without data carry.
    fn default() -> Self {
        SglRepr::DataBlock {
            address: 0,
            length: 0,
        }
    }
}

impl SglRepr {
    /// Parses a descriptor view.
    pub fn parse<T: AsRef<[u8]>>(sgl: &Sgl<T>) -> Result<SglRepr, WireError> {
        let invalid = |status| WireError::Invalid {
            structure: "SGL descriptor",
            field: "descriptor type",
            offset: layout::TYPE,
            status,
        };
        let bad_subtype = invalid(StatusCode::InvalidField);
        let (address, length) = (sgl.address(), sgl.length());
        Ok(match (sgl.descriptor_type(), sgl.subtype()) {
            (TYPE_DATA_BLOCK, SUBTYPE_ADDRESS) => SglRepr::DataBlock { address, length },
            (TYPE_DATA_BLOCK, SUBTYPE_OFFSET) => SglRepr::InCapsule {
                offset: address,
                length,
            },
            (TYPE_BIT_BUCKET, SUBTYPE_ADDRESS) => SglRepr::BitBucket { length },
            (TYPE_SEGMENT, SUBTYPE_ADDRESS) => SglRepr::Segment { address, length },
            (TYPE_LAST_SEGMENT, SUBTYPE_ADDRESS) => SglRepr::LastSegment { address, length },
            (TYPE_KEYED_DATA_BLOCK, sub @ (SUBTYPE_ADDRESS | SUBTYPE_INVALIDATE)) => {
                SglRepr::Keyed(KeyedSgl {
                    address,
                    length: sgl.keyed_length(),
                    key: sgl.key(),
                    invalidate: sub == SUBTYPE_INVALIDATE,
                })
            }
            (TYPE_TRANSPORT_DATA_BLOCK, subtype) => SglRepr::TransportDataBlock { subtype, length },
            (TYPE_DATA_BLOCK..=TYPE_KEYED_DATA_BLOCK, _) => return Err(bad_subtype),
            _ => return Err(invalid(StatusCode::SglDescriptorTypeInvalid)),
        })
    }

    /// Writes all 16 bytes of the descriptor (reserved bytes as zero).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, sgl: &mut Sgl<T>) {
        if let Some(b) = sgl.buffer.as_mut().get_mut(..16) {
            b.fill(0);
        }
        let (ty, sub, address, length) = match *self {
            SglRepr::DataBlock { address, length } => {
                (TYPE_DATA_BLOCK, SUBTYPE_ADDRESS, address, length)
            }
            SglRepr::InCapsule { offset, length } => {
                (TYPE_DATA_BLOCK, SUBTYPE_OFFSET, offset, length)
            }
            SglRepr::BitBucket { length } => (TYPE_BIT_BUCKET, SUBTYPE_ADDRESS, 0, length),
            SglRepr::Segment { address, length } => {
                (TYPE_SEGMENT, SUBTYPE_ADDRESS, address, length)
            }
            SglRepr::LastSegment { address, length } => {
                (TYPE_LAST_SEGMENT, SUBTYPE_ADDRESS, address, length)
            }
            SglRepr::TransportDataBlock { subtype, length } => {
                (TYPE_TRANSPORT_DATA_BLOCK, subtype, 0, length)
            }
            SglRepr::Keyed(k) => {
                let sub = if k.invalidate {
                    SUBTYPE_INVALIDATE
                } else {
                    SUBTYPE_ADDRESS
                };
                sgl.set_address(k.address);
                sgl.set_keyed_length(k.length);
                sgl.set_key(k.key);
                sgl.set_type(TYPE_KEYED_DATA_BLOCK, sub);
                return;
            }
        };
        sgl.set_address(address);
        sgl.set_length(length);
        sgl.set_type(ty, sub);
    }

    /// The descriptor as 16 bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        // A 16-byte array always passes the length check.
        if let Ok(mut view) = Sgl::new_checked(&mut out[..]) {
            self.emit(&mut view);
        }
        out
    }

    /// Bytes of data the descriptor describes (segment lengths are descriptor-list
    /// lengths, not data).
    pub fn data_length(&self) -> u32 {
        match *self {
            SglRepr::DataBlock { length, .. }
            | SglRepr::InCapsule { length, .. }
            | SglRepr::BitBucket { length }
            | SglRepr::Segment { length, .. }
            | SglRepr::LastSegment { length, .. }
            | SglRepr::TransportDataBlock { length, .. } => length,
            SglRepr::Keyed(k) => k.length,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keyed_descriptor_exact_bytes() {
        let k = KeyedSgl::new(0x1122_3344_5566_7788, 0x00AB_CDEF, 0xDEAD_BEEF, false).unwrap();
        let bytes = SglRepr::Keyed(k).to_bytes();
        assert_eq!(
            bytes,
            [
                0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // address
                0xEF, 0xCD, 0xAB, // 24-bit length
                0xEF, 0xBE, 0xAD, 0xDE, // key
                0x40, // keyed data block, address subtype
            ]
        );
        let inv = KeyedSgl::new(1, 2, 3, true).unwrap();
        assert_eq!(SglRepr::Keyed(inv).to_bytes()[15], 0x4F);
        let parsed = SglRepr::parse(&Sgl::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(parsed, SglRepr::Keyed(k));
    }

    #[test]
    fn in_capsule_descriptor_exact_bytes() {
        let d = SglRepr::InCapsule {
            offset: 0,
            length: 1024,
        };
        let mut want = [0u8; 16];
        want[8..12].copy_from_slice(&1024u32.to_le_bytes());
        want[15] = 0x01;
        assert_eq!(d.to_bytes(), want);
    }

    #[test]
    fn keyed_length_over_24_bits_rejected() {
        let e = KeyedSgl::new(0, 0x100_0000, 0, false).unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::DataSglLengthInvalid));
    }

    #[test]
    fn reserved_types_and_subtypes_rejected() {
        for ty in 6u8..=0xF {
            let mut b = [0u8; 16];
            b[15] = ty << 4;
            let e = SglRepr::parse(&Sgl::new_checked(&b[..]).unwrap()).unwrap_err();
            assert_eq!(
                e.status(),
                Some(StatusCode::SglDescriptorTypeInvalid),
                "{ty}"
            );
        }
        for byte in [0x02u8, 0x0A, 0x11, 0x21, 0x41, 0x4A] {
            let mut b = [0u8; 16];
            b[15] = byte;
            let e = SglRepr::parse(&Sgl::new_checked(&b[..]).unwrap()).unwrap_err();
            assert_eq!(e.status(), Some(StatusCode::InvalidField), "{byte:#x}");
        }
        assert!(Sgl::new_checked(&[0u8; 15][..]).is_err());
    }

    pub(crate) fn arb_sgl() -> impl Strategy<Value = SglRepr> {
        prop_oneof![
            (any::<u64>(), any::<u32>())
                .prop_map(|(address, length)| SglRepr::DataBlock { address, length }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(offset, length)| SglRepr::InCapsule { offset, length }),
            any::<u32>().prop_map(|length| SglRepr::BitBucket { length }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(address, length)| SglRepr::Segment { address, length }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(address, length)| SglRepr::LastSegment { address, length }),
            (
                any::<u64>(),
                0..=KeyedSgl::MAX_LENGTH,
                any::<u32>(),
                any::<bool>()
            )
                .prop_map(|(a, l, k, i)| SglRepr::Keyed(KeyedSgl::new(a, l, k, i).unwrap())),
            (0u8..16, any::<u32>())
                .prop_map(|(subtype, length)| SglRepr::TransportDataBlock { subtype, length }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn round_trip(repr in arb_sgl()) {
            let bytes = repr.to_bytes();
            prop_assert_eq!(SglRepr::parse(&Sgl::new_checked(&bytes[..]).unwrap()).unwrap(), repr);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(view) = Sgl::new_checked(&bytes[..]) {
                if let Ok(repr) = SglRepr::parse(&view) {
                    let again = repr.to_bytes();
                    prop_assert_eq!(SglRepr::parse(&Sgl::new_checked(&again[..]).unwrap()).unwrap(), repr);
                }
            } else {
                prop_assert!(bytes.len() < 16);
            }
        }
    }
}
