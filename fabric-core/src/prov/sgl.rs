//! Scatter/gather lists: the local buffers of one operation (its [`Segment`](crate::Segment)s) or the
//! verified target ranges of one remote access ([`RemoteRange`]s), seen as one
//! contiguous byte range.
//!
//! Providers copy into and out of them by offset ([`ScatterList::copy_in`],
//! [`ScatterList::copy_out`]), or walk them in order with a [`Cursor`] that fills them
//! from a stream and hands out the raw iovecs of what is left for a vectored read. The
//! bounds of every piece are type invariants of the pieces' types, so every copy here
//! is in bounds; pieces of `UNCACHED` target ranges are written with non-temporal
//! stores.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::memory::{MemoryBacking, Segments};
use crate::prov::key_map::RemoteRange;

/// One piece: a pointer valid for `len` bytes while `keep` lives.
struct Piece {
    ptr: *mut u8,
    len: usize,
    /// The backing and offset of an `UNCACHED` target piece (written non-temporally).
    uncached: Option<(Arc<dyn MemoryBacking>, usize)>,
}

/// What holds the pieces' memory alive (kept for its drop; the remote ranges are also
/// lent out by [`ScatterList::remote_ranges`]).
#[allow(dead_code)]
enum Keep {
    Local(Segments),
    Remote(Vec<RemoteRange>),
}

/// Pieces held inline (no allocation per list): a receive or remote access of up to
/// this many buffers, which is every operation of the common one- or two-buffer kind.
/// Kept small so a list stays a modest value inside the providers' enums (about 150
/// bytes).
const INLINE_PIECES: usize = 2;

/// A scatter/gather list. Holding it holds the memory of every piece.
pub struct ScatterList {
    pieces: SmallVec<[Piece; INLINE_PIECES]>,
    /// Offset of each piece in the concatenation.
    starts: SmallVec<[usize; INLINE_PIECES]>,
    total: usize,
    keep: Keep,
}

// SAFETY: the raw pointers point into memory owned by `keep` (Segments / RemoteRanges,
// which are Send + Sync and keep MemoryBacking: Send + Sync alive); the list itself
// has no interior mutability.
unsafe impl Send for ScatterList {}
// SAFETY: as above; shared access only copies through the pointers, which the memory
// module's rules allow from any thread.
unsafe impl Sync for ScatterList {}

impl std::fmt::Debug for ScatterList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScatterList")
            .field("pieces", &self.pieces.len())
            .field("total", &self.total)
            .finish()
    }
}

impl ScatterList {
    fn build(pieces: SmallVec<[Piece; INLINE_PIECES]>, keep: Keep) -> Self {
        let mut starts = SmallVec::with_capacity(pieces.len());
        let mut total = 0usize;
        for p in &pieces {
            starts.push(total);
            total += p.len;
        }
        ScatterList {
            pieces,
            starts,
            total,
            keep,
        }
    }

    /// The local buffers of an operation, in order.
    pub fn local(segments: impl Into<Segments>) -> Self {
        let segments = segments.into();
        let pieces = segments
            .iter()
            .map(|s| Piece {
                ptr: s.ptr(),
                len: s.len(),
                uncached: None,
            })
            .collect();
        Self::build(pieces, Keep::Local(segments))
    }

    /// The verified target ranges of a remote access, in order.
    pub fn remote(ranges: Vec<RemoteRange>) -> Self {
        let pieces = ranges
            .iter()
            .map(|r| Piece {
                ptr: r.ptr(),
                len: r.len(),
                uncached: r.uncached().then(|| (r.memory().clone(), r.offset())),
            })
            .collect();
        Self::build(pieces, Keep::Remote(ranges))
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.total
    }

    /// The target ranges of a list made by [`remote`](Self::remote) (`None` for a
    /// local one), e.g. to persist them once the payload has landed.
    pub fn remote_ranges(&self) -> Option<&[RemoteRange]> {
        match &self.keep {
            Keep::Remote(r) => Some(r),
            Keep::Local(_) => None,
        }
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Calls `f(piece index, offset in the piece, offset in [offset, offset+len), n)`
    /// for each piece of `[offset, offset + len)`; `false` when the range is not inside
    /// the list.
    fn walk(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(usize, usize, usize, usize),
    ) -> bool {
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.total) else {
            return false;
        };
        let mut i = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        let mut pos = offset;
        while pos < end && i < self.pieces.len() {
            let within = pos - self.starts[i];
            let n = (self.pieces[i].len - within).min(end - pos);
            if n > 0 {
                f(i, within, pos - offset, n);
            }
            pos += n;
            i += 1;
        }
        true
    }

    /// Copies `data` into the list at `offset`; `false` (nothing copied) when it does
    /// not fit.
    pub fn copy_in(&self, offset: usize, data: &[u8]) -> bool {
        if offset
            .checked_add(data.len())
            .is_none_or(|e| e > self.total)
        {
            return false;
        }
        self.walk(offset, data.len(), |i, within, at, n| {
            let p = &self.pieces[i];
            match &p.uncached {
                // SAFETY: base + within + n <= the backing's length (the range's
                // invariant: within + n <= p.len).
                Some((mem, base)) => unsafe {
                    mem.write_uncached(base + within, &data[at..at + n])
                },
                // SAFETY: within + n <= p.len, valid while the list lives; data is a
                // distinct allocation.
                None => unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr().add(at), p.ptr.add(within), n)
                },
            }
        })
    }

    /// Copies `buf.len()` bytes at `offset` out of the list; `false` (nothing copied)
    /// when the range is not inside it.
    pub fn copy_out(&self, offset: usize, buf: &mut [u8]) -> bool {
        let dst = buf.as_mut_ptr();
        let n_total = buf.len();
        self.walk(offset, n_total, |i, within, at, n| {
            // SAFETY: within + n <= piece length; at + n <= buf.len().
            unsafe { std::ptr::copy_nonoverlapping(self.pieces[i].ptr.add(within), dst.add(at), n) }
        })
    }

    /// All bytes, copied.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.total];
        self.copy_out(0, &mut v);
        v
    }

    /// A cursor at the start of the list.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor { list: self, pos: 0 }
    }

    /// A cursor `pos` bytes in (clamped to the end): a provider that owns the list
    /// keeps the position and makes the cursor when it needs one.
    pub fn cursor_at(&self, pos: usize) -> Cursor<'_> {
        Cursor {
            list: self,
            pos: pos.min(self.total),
        }
    }
}

/// A position in a [`ScatterList`] that data is streamed into (or out of) in order.
#[derive(Debug)]
pub struct Cursor<'a> {
    list: &'a ScatterList,
    pos: usize,
}

impl Cursor<'_> {
    /// Bytes placed (or taken) so far.
    pub fn position(&self) -> usize {
        self.pos
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.list.total - self.pos
    }
    /// Copies as much of `src` as fits at the cursor and advances; returns the bytes
    /// taken.
    pub fn fill(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.remaining());
        self.list.copy_in(self.pos, &src[..n]);
        self.pos += n;
        n
    }
    /// Moves the cursor `n` bytes on (after a vectored read placed them); clamps at
    /// the end.
    pub fn advance(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.list.total);
    }
    /// Whether any piece left at the cursor must be written with non-temporal stores
    /// (then a provider copies through [`fill`](Self::fill) instead of reading into
    /// [`iovecs`](Self::iovecs)).
    pub fn needs_copy(&self) -> bool {
        self.list.pieces.iter().any(|p| p.uncached.is_some())
    }
    /// Appends the iovecs of up to `limit` bytes from the cursor (at most `max_iov`
    /// entries); returns the bytes they cover. The pointers are valid for writes and
    /// reads of their lengths while the list lives; use them only through `unsafe`
    /// system calls whose contract says so.
    pub fn iovecs(&self, limit: usize, max_iov: usize, out: &mut Vec<libc::iovec>) -> usize {
        let limit = limit.min(self.remaining());
        let mut covered = 0;
        self.list.walk(self.pos, limit, |i, within, _, n| {
            if out.len() < max_iov {
                out.push(libc::iovec {
                    // SAFETY (pointer arithmetic only): within + n <= piece length.
                    iov_base: unsafe { self.list.pieces[i].ptr.add(within) }.cast(),
                    iov_len: n,
                });
                covered += n;
            }
        });
        covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::{Access, MrFlags};
    use crate::prov::key_map::{AddrMode, KeyMap};

    #[test]
    fn remote_pieces_copy_in_and_out_across_boundaries() {
        let m = KeyMap::new(8, AddrMode::Offset);
        let a: Arc<dyn MemoryBacking> = Arc::new(crate::HeapMemory::new(10).unwrap());
        let b: Arc<dyn MemoryBacking> = Arc::new(crate::HeapMemory::new(10).unwrap());
        let (ka, _) = m.insert(a, Access::REMOTE, MrFlags::empty());
        let (kb, _) = m.insert(b, Access::REMOTE, MrFlags::UNCACHED);
        let ranges = m
            .verify_all([(ka, 2, 5), (kb, 0, 0), (kb, 3, 7)], Access::REMOTE_WRITE)
            .unwrap();
        let l = ScatterList::remote(ranges);
        assert_eq!(l.len(), 12);
        assert!(l.copy_in(0, b"abcdefghijkl"));
        assert!(!l.copy_in(1, b"abcdefghijkl"), "one byte past the end");
        assert_eq!(l.to_vec(), b"abcdefghijkl");
        let mut mid = [0u8; 4];
        assert!(l.copy_out(3, &mut mid));
        assert_eq!(&mid, b"defg");
        assert!(!l.copy_out(usize::MAX, &mut mid));
        // Only the verified ranges were written.
        let mut whole = [0u8; 10];
        m.verify(ka, 0, 10, Access::REMOTE_READ)
            .unwrap()
            .read(0, &mut whole)
            .unwrap();
        assert_eq!(&whole, b"\0\0abcde\0\0\0");
        m.verify(kb, 0, 10, Access::REMOTE_READ)
            .unwrap()
            .read(0, &mut whole)
            .unwrap();
        assert_eq!(&whole, b"\0\0\0fghijkl");
    }

    #[test]
    fn cursor_fills_and_describes_the_rest() {
        let m = KeyMap::new(8, AddrMode::Offset);
        let (k, _) = m.insert(
            Arc::new(crate::HeapMemory::new(32).unwrap()),
            Access::REMOTE,
            MrFlags::empty(),
        );
        let ranges = m
            .verify_all([(k, 0, 4), (k, 8, 4), (k, 16, 8)], Access::REMOTE_WRITE)
            .unwrap();
        let l = ScatterList::remote(ranges);
        let mut c = l.cursor();
        assert_eq!(c.fill(b"xyz"), 3);
        let mut iov = Vec::new();
        assert_eq!(c.iovecs(100, 8, &mut iov), 13);
        assert_eq!(iov.iter().map(|v| v.iov_len).collect::<Vec<_>>(), [1, 4, 8]);
        iov.clear();
        assert_eq!(c.iovecs(100, 2, &mut iov), 5, "max_iov caps the entries");
        c.advance(5);
        assert_eq!(c.remaining(), 8);
        assert_eq!(c.fill(&[7u8; 20]), 8);
        assert_eq!(c.remaining(), 0);
        assert!(!c.needs_copy());
        // A cursor made again at a kept position continues where the last one was.
        let mut c = l.cursor_at(5);
        assert_eq!((c.position(), c.remaining()), (5, 11));
        assert_eq!(c.fill(b"!"), 1);
        let mut b = [0u8; 2];
        assert!(l.copy_out(4, &mut b));
        assert_eq!(&b, &[0, b'!']);
        assert_eq!(l.cursor_at(usize::MAX).remaining(), 0);
    }

    #[test]
    fn lists_past_the_inline_pieces_and_the_ranges_they_lend() {
        // More pieces than are held inline (they move to the heap): the same
        // copies, in order, and a remote list lends its verified ranges.
        let m = KeyMap::new(8, AddrMode::Offset);
        let (k, _) = m.insert(
            Arc::new(crate::HeapMemory::new(64).unwrap()),
            Access::REMOTE,
            MrFlags::empty(),
        );
        let n = INLINE_PIECES * 2 + 1;
        let ranges = m
            .verify_all(
                (0..n).map(|i| (k, 60 - 6 * i as u64, 3)),
                Access::REMOTE_WRITE,
            )
            .unwrap();
        let l = ScatterList::remote(ranges);
        assert_eq!(l.len(), 3 * n);
        let data: Vec<u8> = (1..=3 * n as u8).collect();
        assert!(l.copy_in(0, &data));
        assert_eq!(l.to_vec(), data);
        let lent = l.remote_ranges().expect("a remote list lends its ranges");
        assert_eq!(lent.len(), n);
        assert_eq!(
            lent.iter().map(|r| r.offset()).collect::<Vec<_>>()[..2],
            [60, 54]
        );
        let mut whole = [0u8; 64];
        m.verify(k, 0, 64, Access::REMOTE_READ)
            .unwrap()
            .read(0, &mut whole)
            .unwrap();
        // Piece i (bytes 3i+1..=3i+3) went to offset 60 - 6i.
        for i in 0..n {
            let at = 60 - 6 * i;
            assert_eq!(&whole[at..at + 3], &data[3 * i..3 * i + 3], "piece {i}");
        }
        // A local list lends none.
        let local = ScatterList::local(Vec::new());
        assert!(local.remote_ranges().is_none());
        assert!(local.is_empty());
    }
}
