//! Where incoming payload bytes go: a [`ScatterList`] over registered memory (placed
//! directly by `readv` through its cursor's iovecs, or copied, with non-temporal
//! stores for UNCACHED regions), a buffer for unexpected messages and connection
//! data, or nowhere.

use fabric_core::prov::ScatterList;

/// At most this many iovecs of a destination per `readv`.
const RX_IOV_MAX: usize = 64;

/// Where an incoming payload goes.
pub(super) enum Sink {
    Discard,
    /// Registered memory; `placed` bytes have landed so far. Data beyond its capacity
    /// is discarded.
    Iov {
        list: ScatterList,
        placed: usize,
    },
    Buffer {
        data: Vec<u8>,
        filled: usize,
    },
}

impl Sink {
    /// A destination in registered memory.
    pub(super) fn list(list: ScatterList) -> Sink {
        Sink::Iov { list, placed: 0 }
    }
    pub(super) fn write(&mut self, src: &[u8]) {
        match self {
            Sink::Discard => {}
            Sink::Iov { list, placed } => {
                *placed += list.cursor_at(*placed).fill(src);
            }
            Sink::Buffer { data, filled } => {
                let k = (data.len() - *filled).min(src.len());
                data[*filled..*filled + k].copy_from_slice(&src[..k]);
                *filled += k;
            }
        }
    }
    /// iovecs for the next `limit` bytes of free space (none for UNCACHED targets,
    /// which are filled through the receive buffer with non-temporal stores).
    pub(super) fn iovecs(&mut self, limit: usize, out: &mut Vec<libc::iovec>) -> usize {
        match self {
            Sink::Discard => 0,
            Sink::Iov { list, placed } => {
                let c = list.cursor_at(*placed);
                if c.needs_copy() {
                    0
                } else {
                    c.iovecs(limit, RX_IOV_MAX, out)
                }
            }
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
            Sink::Iov { list, placed } => *placed = (*placed + k).min(list.len()),
            Sink::Buffer { filled, .. } => *filled += k,
        }
    }
}
