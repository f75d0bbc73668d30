//! Fixed-width text fields.
//!
//! * [`Ascii`] – printable ASCII padded with spaces (serial number, model number,
//!   firmware revision);
//! * [`NulPadded`] – UTF-8 padded with NUL bytes (or spaces), no terminator needed
//!   when full (discovery log TRADDR and TRSVCID);
//! * [`Nqn`] – an NVMe Qualified Name in a 256-byte field: at most 223 bytes of UTF-8
//!   and a NUL terminator inside the field.

use core::fmt;

use super::layout::{FieldCodec, FieldKind};

/// Why a string cannot be stored in a text field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextError {
    /// Longer than the field allows.
    TooLong {
        /// Most bytes allowed.
        max: usize,
        /// Bytes given.
        len: usize,
    },
    /// Contains a NUL byte.
    Nul,
    /// Contains a byte outside printable ASCII (for [`Ascii`] fields).
    NotPrintableAscii,
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextError::TooLong { max, len } => write!(f, "{len} bytes, field holds {max}"),
            TextError::Nul => f.write_str("contains a NUL byte"),
            TextError::NotPrintableAscii => f.write_str("not printable ASCII"),
        }
    }
}

impl std::error::Error for TextError {}

fn check_len(s: &str, max: usize) -> Result<(), TextError> {
    if s.len() > max {
        return Err(TextError::TooLong { max, len: s.len() });
    }
    Ok(())
}

/// Printable ASCII in an `N`-byte field padded with spaces.
///
/// Trailing spaces are padding, so they are not part of the value: `new` drops them,
/// and `decode` also drops trailing NULs, which some devices pad with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Ascii<const N: usize>(String);

impl<const N: usize> Ascii<N> {
    /// The text `s` without trailing spaces, if it is printable ASCII of at most `N` bytes.
    pub fn new(s: &str) -> Result<Self, TextError> {
        let s = s.trim_end_matches(' ');
        check_len(s, N)?;
        if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(TextError::NotPrintableAscii);
        }
        Ok(Self(s.to_owned()))
    }

    /// The text without padding.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const N: usize> FieldCodec for Ascii<N> {
    const SIZE: usize = N;
    const KIND: FieldKind = FieldKind::Text;
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != N {
            return None;
        }
        let end = bytes
            .iter()
            .rposition(|&b| b != b' ' && b != 0)
            .map_or(0, |i| i + 1);
        let s = core::str::from_utf8(&bytes[..end]).ok()?;
        Self::new(s).ok()
    }
    fn encode(&self, bytes: &mut [u8]) {
        bytes.fill(b' ');
        super::field::put(bytes, 0, self.0.as_bytes());
    }
}

/// UTF-8 text in an `N`-byte field padded with NUL bytes; a value of exactly `N`
/// bytes has no terminator. Linux pads discovery log addresses with NULs, other
/// targets with spaces, so trailing spaces are padding too: `new` drops them and
/// `decode` ignores them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NulPadded<const N: usize>(String);

impl<const N: usize> NulPadded<N> {
    /// The text `s` without trailing spaces, if it has no NUL and is at most `N` bytes.
    pub fn new(s: &str) -> Result<Self, TextError> {
        let s = s.trim_end_matches(' ');
        check_len(s, N)?;
        if s.contains('\0') {
            return Err(TextError::Nul);
        }
        Ok(Self(s.to_owned()))
    }

    /// The text without padding.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const N: usize> FieldCodec for NulPadded<N> {
    const SIZE: usize = N;
    const KIND: FieldKind = FieldKind::Text;
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != N {
            return None;
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(N);
        Self::new(core::str::from_utf8(&bytes[..end]).ok()?).ok()
    }
    fn encode(&self, bytes: &mut [u8]) {
        super::field::put(bytes, 0, self.0.as_bytes());
    }
}

/// An NVMe Qualified Name as stored in a 256-byte field: at most [`Nqn::MAX_LEN`]
/// bytes of UTF-8, then a NUL inside the field. The empty NQN stands for "not
/// reported"; Connect rejects it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Nqn(String);

impl Nqn {
    /// Size of an NQN field.
    pub const FIELD_LEN: usize = 256;
    /// Longest NQN (bytes, without the terminator).
    pub const MAX_LEN: usize = 223;
    /// The well-known NQN of discovery controllers.
    pub const DISCOVERY: &'static str = "nqn.2014-08.org.nvmexpress.discovery";

    /// The NQN `s`, if it has no NUL and is at most [`Nqn::MAX_LEN`] bytes.
    pub fn new(s: &str) -> Result<Self, TextError> {
        check_len(s, Self::MAX_LEN)?;
        if s.contains('\0') {
            return Err(TextError::Nul);
        }
        Ok(Self(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the field was empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FieldCodec for Nqn {
    const SIZE: usize = Self::FIELD_LEN;
    const KIND: FieldKind = FieldKind::Text;
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::FIELD_LEN {
            return None;
        }
        // The terminator is required: a full field is not a valid NQN.
        let end = bytes.iter().position(|&b| b == 0)?;
        Self::new(core::str::from_utf8(&bytes[..end]).ok()?).ok()
    }
    fn encode(&self, bytes: &mut [u8]) {
        super::field::put(bytes, 0, self.0.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_pads_with_spaces_and_trims() {
        let sn = Ascii::<20>::new("SN123").unwrap();
        let mut b = [0u8; 20];
        sn.encode(&mut b);
        assert_eq!(&b, b"SN123               ");
        assert_eq!(Ascii::<20>::decode(&b).unwrap(), sn);
        // NUL padding is accepted too.
        let mut z = [0u8; 20];
        z[..5].copy_from_slice(b"SN123");
        assert_eq!(Ascii::<20>::decode(&z).unwrap(), sn);
        assert_eq!(
            Ascii::<4>::new("12345"),
            Err(TextError::TooLong { max: 4, len: 5 })
        );
        assert_eq!(Ascii::<4>::new("é"), Err(TextError::NotPrintableAscii));
        assert!(Ascii::<4>::decode(&[b'a', 0xff, b' ', b' ']).is_none());
        assert!(Ascii::<4>::decode(&[b'a'; 3]).is_none());
    }

    #[test]
    fn nqn_needs_terminator_and_limit() {
        let mut b = [b'a'; 256];
        assert!(Nqn::decode(&b).is_none(), "no NUL in field");
        b[223] = 0;
        assert_eq!(Nqn::decode(&b).unwrap().as_str().len(), 223);
        b[223] = b'a';
        b[224] = 0;
        assert!(Nqn::decode(&b).is_none(), "224 bytes is too long");
        assert!(Nqn::new(&"a".repeat(224)).is_err());
        assert_eq!(Nqn::new("a\0b"), Err(TextError::Nul));
        assert!(Nqn::decode(&[0u8; 256]).unwrap().is_empty());
    }

    #[test]
    fn nul_padded_full_field_has_no_terminator() {
        let b = *b"4420";
        assert_eq!(NulPadded::<4>::decode(&b).unwrap().as_str(), "4420");
        let v = NulPadded::<8>::new("4420").unwrap();
        let mut out = [0u8; 8];
        v.encode(&mut out);
        assert_eq!(&out, b"4420\0\0\0\0");
    }
}
