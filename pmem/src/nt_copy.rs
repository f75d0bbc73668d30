//! Non-temporal copy: stores that bypass the CPU caches.
//!
//! Shape of libpmem's SSE2 `memmove_movnt`: an ordinary copy of the head up to
//! the first 64-byte boundary of the destination (then flushed), 64-byte blocks
//! of four `MOVNTDQ` (`_mm_stream_si128`), remaining 16-byte blocks, one
//! 8-byte `MOVNTI` (`_mm_stream_si64`), an ordinary copy of the last < 8 bytes
//! (then flushed), and `SFENCE`.

use crate::flush::FlushMethod;

/// Whether this target has non-temporal stores implemented here.
pub(crate) const AVAILABLE: bool = cfg!(target_arch = "x86_64");

/// Copies `len` bytes with non-temporal stores where the destination allows,
/// flushing the parts copied with ordinary stores with `flush` (nothing for
/// `NoFlush` and `Msync`: the caller msyncs), then drains.
///
/// On targets without non-temporal stores: an ordinary copy and a fence.
///
/// # Safety
/// `src` readable and `dst` writable for `len` bytes, not overlapping; an
/// instruction `flush` supported by this CPU.
pub(crate) unsafe fn copy_nt(dst: *mut u8, src: *const u8, len: usize, flush: FlushMethod) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from this function's contract.
    unsafe {
        copy_nt_x86(dst, src, len, flush)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = flush;
        // SAFETY: forwarded from this function's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        crate::flush::drain();
    }
}

/// The SSE2 implementation of [`copy_nt`].
///
/// # Safety
/// As [`copy_nt`].
#[cfg(target_arch = "x86_64")]
unsafe fn copy_nt_x86(mut dst: *mut u8, mut src: *const u8, mut len: usize, flush: FlushMethod) {
    use crate::flush::{drain, flush_cpu_lines, CACHE_LINE};
    use core::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128, _mm_stream_si64};
    use std::ptr::copy_nonoverlapping;

    // SAFETY: (whole body) every pointer stays inside the `len` bytes the
    // caller vouched for: each step reads and writes at most the bytes still
    // left and then advances both pointers by that many. Stream stores to
    // `dst` are 16-byte aligned because `dst` is 64-byte aligned after the
    // head; loads from `src` are unaligned loads. `flush` is supported.
    unsafe {
        let head = (CACHE_LINE - (dst as usize & (CACHE_LINE - 1))) & (CACHE_LINE - 1);
        if head != 0 {
            let head = head.min(len);
            copy_nonoverlapping(src, dst, head);
            flush_cpu_lines(flush, dst, head);
            dst = dst.add(head);
            src = src.add(head);
            len -= head;
        }
        while len >= 64 {
            let s = src as *const __m128i;
            let a = _mm_loadu_si128(s);
            let b = _mm_loadu_si128(s.add(1));
            let c = _mm_loadu_si128(s.add(2));
            let e = _mm_loadu_si128(s.add(3));
            let d = dst as *mut __m128i;
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
            dst = dst.add(64);
            src = src.add(64);
            len -= 64;
        }
        while len >= 16 {
            _mm_stream_si128(dst as *mut __m128i, _mm_loadu_si128(src as *const __m128i));
            dst = dst.add(16);
            src = src.add(16);
            len -= 16;
        }
        if len >= 8 {
            _mm_stream_si64(dst as *mut i64, (src as *const i64).read_unaligned());
            dst = dst.add(8);
            src = src.add(8);
            len -= 8;
        }
        if len > 0 {
            copy_nonoverlapping(src, dst, len);
            flush_cpu_lines(flush, dst, len);
        }
    }
    drain();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn copies_every_small_size_and_alignment() {
        let method = FlushMethod::detect();
        let src = pattern(400, 7);
        let mut dst = vec![0u8; 512];
        for len in 0..=300 {
            for off in [0usize, 1, 7, 8, 15, 16, 33, 63] {
                dst.fill(0xAA);
                // SAFETY: off + len <= 363 < 512 and src has 400 bytes.
                unsafe { copy_nt(dst.as_mut_ptr().add(off), src.as_ptr().add(3), len, method) };
                assert!(dst[..off].iter().all(|&b| b == 0xAA), "len {len} off {off}");
                assert_eq!(
                    &dst[off..off + len],
                    &src[3..3 + len],
                    "len {len} off {off}"
                );
                assert!(
                    dst[off + len..].iter().all(|&b| b == 0xAA),
                    "len {len} off {off}"
                );
            }
        }
    }
}
