//! Test payloads: reproducible byte patterns and comparisons that say where data differs.

use crate::case::CaseError;

/// `len` pseudo-random bytes determined by `seed` (xorshift64), so every size and offset
/// carries data that a misplaced copy cannot match by accident.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        let n = (len - out.len()).min(8);
        out.extend_from_slice(&bytes[..n]);
    }
    out
}

/// Fails with the first differing offset unless `got == expected`.
pub fn same(what: &str, expected: &[u8], got: &[u8]) -> Result<(), CaseError> {
    if expected.len() != got.len() {
        return Err(CaseError::fail(format!(
            "{what}: expected {} bytes, got {}",
            expected.len(),
            got.len()
        )));
    }
    if let Some(i) = expected.iter().zip(got).position(|(a, b)| a != b) {
        return Err(CaseError::fail(format!(
            "{what}: first difference at byte {i} of {} (expected {:#04x}, got {:#04x})",
            expected.len(),
            expected[i],
            got[i]
        )));
    }
    Ok(())
}

/// Fails unless every byte of `got` is `byte`.
pub fn all_bytes(what: &str, got: &[u8], byte: u8) -> Result<(), CaseError> {
    match got.iter().position(|&b| b != byte) {
        None => Ok(()),
        Some(i) => Err(CaseError::fail(format!(
            "{what}: byte {i} of {} is {:#04x}, expected {byte:#04x} (memory was touched)",
            got.len(),
            got[i]
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_seed_and_are_reproducible() {
        assert_eq!(pattern(1, 100), pattern(1, 100));
        assert_ne!(pattern(1, 100), pattern(2, 100));
        assert_eq!(pattern(3, 13).len(), 13);
        assert_eq!(&pattern(3, 100)[..13], &pattern(3, 13)[..]);
    }

    #[test]
    fn same_names_the_first_difference() {
        assert!(same("x", b"abc", b"abc").is_ok());
        let e = same("x", b"abc", b"abd").unwrap_err();
        assert!(e.to_string().contains("byte 2"), "{e}");
        assert!(same("x", b"abc", b"ab").is_err());
        assert!(all_bytes("y", &[7, 7, 7], 7).is_ok());
        assert!(all_bytes("y", &[7, 8, 7], 7)
            .unwrap_err()
            .to_string()
            .contains("byte 1"));
    }
}
