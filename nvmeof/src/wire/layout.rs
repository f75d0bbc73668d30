//! Fixed-size little-endian structures described once, as a table of fields.
//!
//! [`fixed_layout!`](crate::fixed_layout) turns
//!
//! ```text
//! pub struct DiscoveryLogHeader: 1024 bytes, "discovery log header", invalid = StatusCode::InvalidField {
//!     /// Generation counter.
//!     genctr: u64 = 0,
//!     ...
//! }
//! ```
//!
//! into a struct with public fields, `Default`, `parse(&[u8])`, `emit(&mut [u8])` and a
//! [`FixedLayout`] implementation whose [`FixedLayout::FIELDS`] lists every field's
//! offset and size. Bytes not covered by a field are reserved: `parse` ignores them and
//! `emit` writes them as zero.

use super::WireError;

/// How a field's bytes relate to its decoded value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Every byte pattern decodes, and encoding gives the same bytes back.
    Exact,
    /// Every byte pattern decodes; encoding writes reserved bits as zero.
    Canonical,
    /// Text: only some byte patterns decode; all zeros always does (empty text).
    Text,
}

/// One field of a [`FixedLayout`]: its name, where it lives and what kind it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldInfo {
    /// Field name as in the struct.
    pub name: &'static str,
    /// Byte offset from the start of the structure.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
    /// How bytes and value relate.
    pub kind: FieldKind,
}

/// A value stored in a fixed number of little-endian bytes of a structure.
pub trait FieldCodec: Sized {
    /// Bytes the value occupies.
    const SIZE: usize;
    /// How bytes and value relate.
    const KIND: FieldKind;
    /// Decodes from `bytes` (exactly [`Self::SIZE`] long); `None` when the bytes are
    /// not a valid value (or the slice has the wrong length).
    fn decode(bytes: &[u8]) -> Option<Self>;
    /// Encodes into `bytes` (exactly [`Self::SIZE`] long, already zeroed).
    fn encode(&self, bytes: &mut [u8]);
}

macro_rules! int_codec {
    ($($t:ty),*) => {$(
        impl FieldCodec for $t {
            const SIZE: usize = core::mem::size_of::<$t>();
            const KIND: FieldKind = FieldKind::Exact;
            fn decode(bytes: &[u8]) -> Option<Self> {
                Some(<$t>::from_le_bytes(bytes.try_into().ok()?))
            }
            fn encode(&self, bytes: &mut [u8]) {
                super::field::put(bytes, 0, &self.to_le_bytes());
            }
        }
    )*};
}

int_codec!(u8, u16, u32, u64, u128);

impl<const N: usize> FieldCodec for [u8; N] {
    const SIZE: usize = N;
    const KIND: FieldKind = FieldKind::Exact;
    fn decode(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok()
    }
    fn encode(&self, bytes: &mut [u8]) {
        super::field::put(bytes, 0, self);
    }
}

impl<const N: usize> FieldCodec for [u16; N] {
    const SIZE: usize = 2 * N;
    const KIND: FieldKind = FieldKind::Exact;
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 2 * N {
            return None;
        }
        let mut out = [0u16; N];
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *v = super::field::u16_at(b, 0);
        }
        Some(out)
    }
    fn encode(&self, bytes: &mut [u8]) {
        for (v, b) in self.iter().zip(bytes.chunks_exact_mut(2)) {
            super::field::set_u16(b, 0, *v);
        }
    }
}

/// The [`FieldKind`] of a fixed layout used as a field of another: `Text` if any of
/// its fields is text, otherwise `Canonical` (its reserved bytes are written as zero).
pub const fn nested_kind(fields: &[FieldInfo]) -> FieldKind {
    let mut i = 0;
    while i < fields.len() {
        if matches!(fields[i].kind, FieldKind::Text) {
            return FieldKind::Text;
        }
        i += 1;
    }
    FieldKind::Canonical
}

/// A structure of fixed size described by a field table (see [`fixed_layout!`](crate::fixed_layout)).
pub trait FixedLayout: Sized {
    /// Human-readable name used in errors.
    const NAME: &'static str;
    /// Size in bytes.
    const LEN: usize;
    /// Every field, in declaration order.
    const FIELDS: &'static [FieldInfo];
    /// Parses the first [`Self::LEN`] bytes of `buf`.
    fn parse_bytes(buf: &[u8]) -> Result<Self, WireError>;
    /// Writes the structure into the first [`Self::LEN`] bytes of `buf`, reserved
    /// bytes as zero.
    fn emit_bytes(&self, buf: &mut [u8]) -> Result<(), WireError>;
}

/// Parses `count` consecutive structures from the start of `buf` (DSM ranges, Copy
/// source ranges, discovery log entries).
pub fn parse_list<T: FixedLayout>(buf: &[u8], count: usize) -> Result<Vec<T>, WireError> {
    let needed = count.saturating_mul(T::LEN);
    if buf.len() < needed {
        return Err(WireError::Truncated {
            structure: T::NAME,
            needed,
            got: buf.len(),
        });
    }
    buf.chunks_exact(T::LEN)
        .take(count)
        .enumerate()
        .map(|(i, chunk)| T::parse_bytes(chunk).map_err(|e| e.within(i * T::LEN)))
        .collect()
}

/// Decodes one field of a layout, mapping failure to [`WireError::Invalid`].
#[doc(hidden)]
pub fn decode_field<T: FieldCodec>(
    buf: &[u8],
    offset: usize,
    structure: &'static str,
    field: &'static str,
    status: super::StatusCode,
) -> Result<T, WireError> {
    offset
        .checked_add(T::SIZE)
        .and_then(|end| buf.get(offset..end))
        .and_then(T::decode)
        .ok_or(WireError::Invalid {
            structure,
            field,
            offset,
            status,
        })
}

/// Encodes one field of a layout (nothing if the range is out of the buffer, which
/// the layout's length check rules out).
#[doc(hidden)]
pub fn encode_field<T: FieldCodec>(value: &T, buf: &mut [u8], offset: usize) {
    if let Some(dst) = offset
        .checked_add(T::SIZE)
        .and_then(|end| buf.get_mut(offset..end))
    {
        value.encode(dst);
    }
}

/// Defines a fixed-size structure from a table of `field: Type = offset` entries.
///
/// `invalid = Status` names the status code a field that fails to decode is
/// reported with. See the [module documentation](crate::wire::layout).
#[macro_export]
macro_rules! fixed_layout {
    (
        $(#[$meta:meta])*
        pub struct $name:ident : $len:literal bytes, $label:literal, invalid = $status:path {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $off:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// Size of the structure in bytes.
            pub const LEN: usize = $len;

            /// Parses the first `LEN` bytes of `buf`.
            pub fn parse(buf: &[u8]) -> Result<Self, $crate::wire::WireError> {
                let Some(buf) = buf.get(..$len) else {
                    return Err($crate::wire::WireError::Truncated {
                        structure: $label,
                        needed: $len,
                        got: buf.len(),
                    });
                };
                Ok(Self {
                    $( $field: $crate::wire::layout::decode_field::<$ty>(
                        buf, $off, $label, stringify!($field), $status,
                    )?, )*
                })
            }

            /// Writes the structure into the first `LEN` bytes of `buf`, reserved bytes
            /// as zero.
            pub fn emit(&self, buf: &mut [u8]) -> Result<(), $crate::wire::WireError> {
                let got = buf.len();
                let Some(buf) = buf.get_mut(..$len) else {
                    return Err($crate::wire::WireError::Truncated {
                        structure: $label,
                        needed: $len,
                        got,
                    });
                };
                buf.fill(0);
                $( $crate::wire::layout::encode_field(&self.$field, buf, $off); )*
                Ok(())
            }
        }

        impl $crate::wire::layout::FieldCodec for $name {
            const SIZE: usize = $len;
            const KIND: $crate::wire::layout::FieldKind = $crate::wire::layout::nested_kind(
                <Self as $crate::wire::layout::FixedLayout>::FIELDS,
            );
            fn decode(bytes: &[u8]) -> Option<Self> {
                Self::parse(bytes).ok()
            }
            fn encode(&self, bytes: &mut [u8]) {
                // `bytes` is exactly `SIZE` long, so emit cannot fail.
                let _ = self.emit(bytes);
            }
        }

        impl $crate::wire::layout::FixedLayout for $name {
            const NAME: &'static str = $label;
            const LEN: usize = $len;
            const FIELDS: &'static [$crate::wire::layout::FieldInfo] = &[
                $( $crate::wire::layout::FieldInfo {
                    name: stringify!($field),
                    offset: $off,
                    size: <$ty as $crate::wire::layout::FieldCodec>::SIZE,
                    kind: <$ty as $crate::wire::layout::FieldCodec>::KIND,
                }, )*
            ];
            fn parse_bytes(buf: &[u8]) -> Result<Self, $crate::wire::WireError> {
                Self::parse(buf)
            }
            fn emit_bytes(&self, buf: &mut [u8]) -> Result<(), $crate::wire::WireError> {
                self.emit(buf)
            }
        }
    };
}

/// Checks shared by the tests of every fixed layout.
#[cfg(test)]
pub(crate) mod checks {
    use super::{FieldKind, FixedLayout};

    /// Fields lie inside the structure and do not overlap.
    pub(crate) fn field_table_is_sound<T: FixedLayout>() {
        let mut fields: Vec<_> = T::FIELDS.to_vec();
        fields.sort_by_key(|f| f.offset);
        for f in &fields {
            assert!(
                f.offset + f.size <= T::LEN,
                "{}: {} past end",
                T::NAME,
                f.name
            );
        }
        for pair in fields.windows(2) {
            assert!(
                pair[0].offset + pair[0].size <= pair[1].offset,
                "{}: {} overlaps {}",
                T::NAME,
                pair[0].name,
                pair[1].name
            );
        }
    }

    /// Random bytes with text fields blanked parse; emitting gives back every
    /// `Exact` field's bytes, and parsing the emitted bytes gives the same value.
    pub(crate) fn random_bytes_round_trip<T: FixedLayout + PartialEq + core::fmt::Debug>(
        mut bytes: Vec<u8>,
    ) {
        bytes.resize(T::LEN, 0);
        for f in T::FIELDS.iter().filter(|f| f.kind == FieldKind::Text) {
            bytes[f.offset..f.offset + f.size].fill(0);
        }
        let value = T::parse_bytes(&bytes).expect("blank text and any numbers parse");
        let mut out = vec![0xAAu8; T::LEN];
        value.emit_bytes(&mut out).unwrap();
        for f in T::FIELDS.iter().filter(|f| f.kind == FieldKind::Exact) {
            let r = f.offset..f.offset + f.size;
            assert_eq!(bytes[r.clone()], out[r], "{}: {}", T::NAME, f.name);
        }
        assert_eq!(T::parse_bytes(&out).unwrap(), value);
        // Short buffers are errors, never panics.
        assert!(T::parse_bytes(&bytes[..T::LEN - 1]).is_err());
        assert!(value.emit_bytes(&mut out[..T::LEN - 1]).is_err());
    }
}
