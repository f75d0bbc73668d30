//! The FIFO behind completion and event queues: filled by whichever thread makes
//! progress, with an eventfd that sleepers `poll` together with the device sockets,
//! and async wakers.
//!
//! A producer signals the eventfd only while someone sleeps and the queue is
//! non-empty; a consumer drains it when it empties the queue. Sleepers register under
//! the lock and re-check emptiness, so no wake-up is lost.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;

use parking_lot::Mutex;

use super::sys::EventFd;

struct Inner<T> {
    items: VecDeque<T>,
    sleepers: usize,
    signaled: bool,
    wakers: Vec<Waker>,
}

/// A FIFO with sleep / wake support.
pub(crate) struct WaitQueue<T> {
    inner: Mutex<Inner<T>>,
    /// Items queued, readable without the lock: a poller of an empty queue (the
    /// common case while spinning) does not touch the lock the producer takes.
    len: AtomicUsize,
    efd: EventFd,
}

impl<T> WaitQueue<T> {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(WaitQueue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                sleepers: 0,
                signaled: false,
                wakers: Vec::new(),
            }),
            len: AtomicUsize::new(0),
            efd: EventFd::new()?,
        })
    }

    /// Appends an item and wakes sleepers and async waiters.
    pub(crate) fn push(&self, item: T) {
        let wakers = {
            let mut g = self.inner.lock();
            g.items.push_back(item);
            self.len.store(g.items.len(), Ordering::Release);
            if g.sleepers > 0 && !g.signaled {
                g.signaled = true;
                self.efd.signal();
            }
            if g.wakers.is_empty() {
                return;
            }
            std::mem::take(&mut g.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Moves up to `max` items into `out`.
    pub(crate) fn pop_into(&self, out: &mut Vec<T>, max: usize) -> usize {
        // Empty means nothing to drain either: the eventfd is only signalled while
        // items are queued, and drained below when the queue empties.
        if self.len.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut g = self.inner.lock();
        let n = g.items.len().min(max);
        out.extend(g.items.drain(..n));
        self.len.store(g.items.len(), Ordering::Release);
        if g.items.is_empty() && g.signaled {
            g.signaled = false;
            self.efd.drain();
        }
        n
    }

    /// Takes the next item.
    pub(crate) fn pop(&self) -> Option<T> {
        let mut v = Vec::with_capacity(1);
        self.pop_into(&mut v, 1);
        v.pop()
    }

    /// Registers a sleeper unless items are waiting; returns whether to sleep. Pair
    /// with [`end_sleep`](Self::end_sleep).
    pub(crate) fn begin_sleep(&self) -> bool {
        let mut g = self.inner.lock();
        if !g.items.is_empty() {
            return false;
        }
        g.sleepers += 1;
        true
    }

    pub(crate) fn end_sleep(&self) {
        let mut g = self.inner.lock();
        g.sleepers = g.sleepers.saturating_sub(1);
    }

    /// Remembers an async waker, woken on the next push.
    pub(crate) fn register_waker(&self, waker: &Waker) {
        let mut g = self.inner.lock();
        if !g.items.is_empty() {
            drop(g);
            waker.wake_by_ref();
            return;
        }
        if !g.wakers.iter().any(|w| w.will_wake(waker)) {
            g.wakers.push(waker.clone());
        }
    }

    /// The eventfd sleepers poll.
    pub(crate) fn efd(&self) -> std::os::fd::RawFd {
        self.efd.raw()
    }
}
