//! Where incoming payload bytes go: scatter lists over registered memory (placed
//! directly by `readv` or copied, with non-temporal stores for UNCACHED regions), a
//! buffer for unexpected messages and connection data, or nowhere.

use std::sync::Arc;

use fabric_core::Segment;

use crate::wire::MAX_RMA_IOV;
use fabric_core::prov::RemoteRange;

/// A pointer + length into memory that the owning operation keeps alive.
#[derive(Clone, Copy)]
pub(super) struct RawIov {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

// SAFETY: a RawIov points into registered memory held alive (through Segment or
// Arc<dyn MemoryBacking>) by the operation that owns it; MemoryBacking is Send + Sync
// and all access happens under the engine lock.
unsafe impl Send for RawIov {}

/// Scatter list of a payload's destination; data beyond its capacity is discarded.
pub(super) struct IovList {
    pub(super) v: [RawIov; MAX_RMA_IOV],
    pub(super) n: usize,
    pub(super) idx: usize,
    pub(super) off: usize,
    pub(super) placed: usize,
    /// For regions registered UNCACHED: the backing and offset of each piece, so the
    /// payload is copied in with `write_uncached` (and never received into it directly).
    pub(super) nt: Vec<(Arc<dyn fabric_core::MemoryBacking>, usize)>,
}

impl IovList {
    pub(super) fn new() -> IovList {
        IovList {
            v: [RawIov {
                ptr: std::ptr::null_mut(),
                len: 0,
            }; MAX_RMA_IOV],
            n: 0,
            idx: 0,
            off: 0,
            placed: 0,
            nt: Vec::new(),
        }
    }
    pub(super) fn push(&mut self, ptr: *mut u8, len: usize) {
        if len > 0 && self.n < MAX_RMA_IOV {
            self.v[self.n] = RawIov { ptr, len };
            self.n += 1;
        }
    }
    pub(super) fn from_segments(segs: &[Segment]) -> IovList {
        let mut l = IovList::new();
        for s in segs {
            l.push(s.ptr(), s.len());
        }
        l
    }
    pub(super) fn from_ranges(r: &[RemoteRange]) -> IovList {
        let mut l = IovList::new();
        let uncached = r.iter().any(|x| x.uncached());
        for x in r {
            if uncached && !x.is_empty() {
                l.nt.push((x.memory().clone(), x.offset()));
            }
            l.push(x.ptr(), x.len());
        }
        l
    }
    /// Copies as much of `src` as fits; returns the bytes taken.
    pub(super) fn write(&mut self, mut src: &[u8]) -> usize {
        let mut taken = 0;
        while !src.is_empty() && self.idx < self.n {
            let cur = self.v[self.idx];
            let k = (cur.len - self.off).min(src.len());
            if let Some((mem, base)) = self.nt.get(self.idx) {
                // SAFETY: base + off + k <= the region's length (checked with the
                // range); the memory is held alive by `mem`.
                unsafe { mem.write_uncached(base + self.off, &src[..k]) };
            } else {
                // SAFETY: cur.ptr..cur.ptr+cur.len lies in memory the owning operation
                // keeps alive and that was bounds-checked when the list was built;
                // off + k <= len.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), cur.ptr.add(self.off), k) };
            }
            self.advance(k);
            src = &src[k..];
            taken += k;
        }
        taken
    }
    pub(super) fn advance(&mut self, mut k: usize) {
        self.placed += k;
        while k > 0 && self.idx < self.n {
            let left = self.v[self.idx].len - self.off;
            if k >= left {
                k -= left;
                self.idx += 1;
                self.off = 0;
            } else {
                self.off += k;
                k = 0;
            }
        }
    }
    /// iovecs for the next `limit` bytes of free space.
    pub(super) fn iovecs(&self, mut limit: usize, out: &mut Vec<libc::iovec>) -> usize {
        if !self.nt.is_empty() {
            // Uncached targets are filled through the receive buffer.
            return 0;
        }
        let mut total = 0;
        let mut off = self.off;
        for i in self.idx..self.n {
            if limit == 0 {
                break;
            }
            let k = (self.v[i].len - off).min(limit);
            out.push(libc::iovec {
                // SAFETY: within the bounds-checked range (see `write`).
                iov_base: unsafe { self.v[i].ptr.add(off) }.cast(),
                iov_len: k,
            });
            limit -= k;
            total += k;
            off = 0;
        }
        total
    }
}

/// Where an incoming payload goes.
pub(super) enum Sink {
    Discard,
    Iov(IovList),
    Buffer { data: Vec<u8>, filled: usize },
}

impl Sink {
    pub(super) fn write(&mut self, src: &[u8]) {
        match self {
            Sink::Discard => {}
            Sink::Iov(l) => {
                l.write(src);
            }
            Sink::Buffer { data, filled } => {
                let k = (data.len() - *filled).min(src.len());
                data[*filled..*filled + k].copy_from_slice(&src[..k]);
                *filled += k;
            }
        }
    }
    pub(super) fn iovecs(&mut self, limit: usize, out: &mut Vec<libc::iovec>) -> usize {
        match self {
            Sink::Discard => 0,
            Sink::Iov(l) => l.iovecs(limit, out),
            Sink::Buffer { data, filled } => {
                let k = (data.len() - *filled).min(limit);
                if k > 0 {
                    out.push(libc::iovec {
                        iov_base: data[*filled..].as_mut_ptr().cast(),
                        iov_len: k,
                    });
                }
                k
            }
        }
    }
    pub(super) fn advance(&mut self, k: usize) {
        match self {
            Sink::Discard => {}
            Sink::Iov(l) => l.advance(k),
            Sink::Buffer { filled, .. } => *filled += k,
        }
    }
}
