//! Little-endian reads and writes at fixed byte offsets.
//!
//! Every view checks its buffer length once, in its constructor; these helpers still
//! use `get`, so a wrong offset in this crate reads zeros instead of panicking.

use super::WireError;

/// `buf[..len]`, or [`WireError::Truncated`] naming `structure`.
pub(crate) fn checked<'a>(
    buf: &'a [u8],
    len: usize,
    structure: &'static str,
) -> Result<&'a [u8], WireError> {
    buf.get(..len).ok_or(WireError::Truncated {
        structure,
        needed: len,
        got: buf.len(),
    })
}

/// `N` bytes at `at` (zeros if out of range).
pub(crate) fn array<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = at.checked_add(N).and_then(|end| buf.get(at..end)) {
        out.copy_from_slice(src);
    }
    out
}

/// Writes `bytes` at `at` (nothing if out of range).
pub(crate) fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = at
        .checked_add(bytes.len())
        .and_then(|end| buf.get_mut(at..end))
    {
        dst.copy_from_slice(bytes);
    }
}

pub(crate) fn u8_at(buf: &[u8], at: usize) -> u8 {
    buf.get(at).copied().unwrap_or(0)
}

pub(crate) fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(buf, at))
}

pub(crate) fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(buf, at))
}

pub(crate) fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(buf, at))
}

pub(crate) fn set_u8(buf: &mut [u8], at: usize, v: u8) {
    put(buf, at, &[v]);
}

pub(crate) fn set_u16(buf: &mut [u8], at: usize, v: u16) {
    put(buf, at, &v.to_le_bytes());
}

pub(crate) fn set_u32(buf: &mut [u8], at: usize, v: u32) {
    put(buf, at, &v.to_le_bytes());
}

pub(crate) fn set_u64(buf: &mut [u8], at: usize, v: u64) {
    put(buf, at, &v.to_le_bytes());
}

/// Bits `lo..lo+width` of `v`.
pub(crate) const fn bits32(v: u32, lo: u32, width: u32) -> u32 {
    (v >> lo) & ((1u32 << width) - 1)
}

/// `v` with bits `lo..lo+width` replaced by `field` (extra high bits of `field` dropped).
pub(crate) const fn with_bits32(v: u32, lo: u32, width: u32, field: u32) -> u32 {
    let mask = ((1u32 << width) - 1) << lo;
    (v & !mask) | ((field << lo) & mask)
}
