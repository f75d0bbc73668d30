//! Building blocks for providers' completion and event queues (Linux): a FIFO that the
//! progress code fills and applications drain, which a sleeping reader can wait on with
//! `poll(2)` together with the provider's sockets, and which wakes async waiters.
//!
//! The queue's eventfd works like a condition variable that `poll` understands: a
//! producer signals it only while someone sleeps and the queue is non-empty, and a
//! consumer drains it when it empties the queue. Sleepers register under the queue
//! lock and re-check emptiness, so no wake-up is lost.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A non-blocking eventfd: a counter that `poll` sees as readable while non-zero.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// Creates the eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    /// Makes the eventfd readable.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A failure (counter
        // overflow) still leaves it readable, which is all a signal needs.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    /// Makes the eventfd unreadable again.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd; EAGAIN
        // (already drained) is fine.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
    /// The descriptor, to poll.
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Sleeps until one of `fds` is readable (or hung up, or in error) or `timeout`
/// (`None`: forever) passes, with microsecond resolution. Interruptions end the sleep
/// early, which callers treat like a spurious wake-up.
pub fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: p is a live array of pollfd of the given length; tsp is null or points
    // to a live timespec.
    unsafe {
        libc::ppoll(
            p.as_mut_ptr(),
            p.len() as libc::nfds_t,
            tsp,
            std::ptr::null(),
        );
    }
}

/// A set of descriptors watched for readability (an epoll instance, level-triggered),
/// each reported with the `u64` token it was added with. Providers use it where they
/// would otherwise poll many mostly idle sockets one by one: asking which of n
/// descriptors are ready costs O(ready), not O(n), and the set's own descriptor is
/// readable while any member is, so a sleeper polls one descriptor for all of them.
/// A descriptor leaves the set when it is closed (or by [`ReadySet::remove`]).
#[derive(Debug)]
pub struct ReadySet(OwnedFd);

impl ReadySet {
    /// An empty set.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(ReadySet(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for input, hang-up and errors, reported as `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: ev is a live epoll_event; the kernel only reads it. A bad or closed
        // fd is an error return, not undefined behaviour.
        let r = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (closing it has the same effect).
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer (null is allowed since 2.6.9).
        let _ = unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Appends to `out` the tokens of members that are ready now (at most 256 per
    /// call; call again for more), without waiting.
    pub fn ready(&self, out: &mut Vec<u64>) {
        const BATCH: usize = 256;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        // SAFETY: evs is a live array of BATCH epoll_events the kernel writes into.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                evs.as_mut_ptr(),
                BATCH as libc::c_int,
                0,
            )
        };
        for e in evs.iter().take(n.max(0) as usize) {
            out.push(e.u64);
        }
    }

    /// The set's descriptor: readable while a member is ready (to `poll` with others).
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

struct Inner<T> {
    items: VecDeque<T>,
    sleepers: usize,
    signaled: bool,
    wakers: Vec<Waker>,
}

/// A FIFO with sleep and async-wake support: what a provider's completion queue or
/// event queue holds.
pub struct WaitQueue<T> {
    inner: Mutex<Inner<T>>,
    /// Items queued, readable without the lock: a poller of an empty queue (the common
    /// case while spinning) does not touch the lock the producer takes.
    len: AtomicUsize,
    efd: EventFd,
}

impl<T> WaitQueue<T> {
    /// An empty queue.
    pub fn new() -> io::Result<Self> {
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
    pub fn push(&self, item: T) {
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

    /// Moves up to `max` items into `out`; returns how many.
    pub fn pop_into(&self, out: &mut Vec<T>, max: usize) -> usize {
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

    /// Takes the next item (allocating nothing).
    pub fn pop(&self) -> Option<T> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut g = self.inner.lock();
        let item = g.items.pop_front();
        self.len.store(g.items.len(), Ordering::Release);
        if g.items.is_empty() && g.signaled {
            g.signaled = false;
            self.efd.drain();
        }
        item
    }

    /// Number of queued items.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a sleeper unless items are waiting; returns whether to sleep. Pair
    /// with [`end_sleep`](Self::end_sleep).
    pub fn begin_sleep(&self) -> bool {
        let mut g = self.inner.lock();
        if !g.items.is_empty() {
            return false;
        }
        g.sleepers += 1;
        true
    }

    /// Ends a sleep begun with [`begin_sleep`](Self::begin_sleep).
    pub fn end_sleep(&self) {
        let mut g = self.inner.lock();
        g.sleepers = g.sleepers.saturating_sub(1);
    }

    /// Remembers an async waker, woken on the next push (at once if items wait).
    pub fn register_waker(&self, waker: &Waker) {
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

    /// The eventfd a sleeper polls (readable while a sleeper waits and items are
    /// queued).
    pub fn efd(&self) -> RawFd {
        self.efd.raw()
    }

    /// The blocking read of a completion or event queue: makes progress, takes up to
    /// `max` items, and otherwise sleeps until the queue or the provider has something
    /// or `timeout` (`None`: forever) passes; returns how many items it moved (0 on
    /// timeout). `progress` moves the provider's data; `sleep(efd, deadline)` sleeps
    /// until `efd` or one of the provider's descriptors is readable, at most until
    /// `deadline`.
    pub fn sread(
        &self,
        out: &mut Vec<T>,
        max: usize,
        timeout: Option<Duration>,
        mut progress: impl FnMut(),
        mut sleep: impl FnMut(RawFd, Option<Instant>),
    ) -> usize {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            progress();
            let n = self.pop_into(out, max);
            if n > 0 {
                return n;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return 0;
            }
            if self.begin_sleep() {
                sleep(self.efd(), deadline);
                self.end_sleep();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn ready_set_reports_only_ready_members() {
        let set = ReadySet::new().unwrap();
        let fds: Vec<EventFd> = (0..100).map(|_| EventFd::new().unwrap()).collect();
        for (i, f) in fds.iter().enumerate() {
            set.add(f.raw(), i as u64).unwrap();
        }
        let mut out = Vec::new();
        set.ready(&mut out);
        assert!(out.is_empty());
        assert!(!is_readable(set.raw()));
        fds[7].signal();
        fds[42].signal();
        assert!(is_readable(set.raw()));
        set.ready(&mut out);
        out.sort();
        assert_eq!(out, [7, 42]);
        // Level-triggered: still ready until drained; removed members are not reported.
        set.remove(fds[7].raw());
        out.clear();
        set.ready(&mut out);
        assert_eq!(out, [42]);
        fds[42].drain();
        out.clear();
        set.ready(&mut out);
        assert!(out.is_empty());
        // A closed member leaves the set by itself.
        let extra = EventFd::new().unwrap();
        set.add(extra.raw(), 1000).unwrap();
        extra.signal();
        drop(extra);
        out.clear();
        set.ready(&mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    fn is_readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn fifo_signal_and_drain() {
        let q = WaitQueue::new().unwrap();
        assert!(q.begin_sleep());
        q.push(1);
        q.push(2);
        // Signalled while a sleeper waits: the eventfd is readable, so this returns at
        // once rather than after the timeout.
        let t = Instant::now();
        poll_readable(&[q.efd()], Some(Duration::from_secs(5)));
        assert!(t.elapsed() < Duration::from_secs(4));
        q.end_sleep();
        let mut v = Vec::new();
        assert_eq!(q.pop_into(&mut v, 10), 2);
        assert_eq!(v, vec![1, 2]);
        assert!(q.pop().is_none());
        assert!(q.is_empty());
        // Items waiting: no sleep.
        q.push(3);
        assert!(!q.begin_sleep());
        assert_eq!(q.pop(), Some(3));
    }

    #[test]
    fn pop_takes_in_order_and_drains_the_signal_when_empty() {
        let q = WaitQueue::new().unwrap();
        assert!(q.pop().is_none());
        assert!(q.begin_sleep());
        q.push(1);
        q.push(2);
        assert!(is_readable(q.efd()), "signalled for the sleeper");
        q.end_sleep();
        assert_eq!(q.pop(), Some(1));
        assert!(is_readable(q.efd()), "still an item: still signalled");
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop(), Some(2));
        assert!(!is_readable(q.efd()), "emptied: the eventfd is drained");
        assert!(q.is_empty());
        assert!(q.pop().is_none());
    }

    #[test]
    fn sread_times_out_and_is_woken_from_another_thread() {
        let q = Arc::new(WaitQueue::<u32>::new().unwrap());
        let mut out = Vec::new();
        let t = Instant::now();
        let n = q.sread(
            &mut out,
            1,
            Some(Duration::from_millis(30)),
            || {},
            |fd, d| {
                poll_readable(
                    &[fd],
                    d.map(|d| d.saturating_duration_since(Instant::now())),
                )
            },
        );
        assert_eq!(n, 0);
        assert!(t.elapsed() >= Duration::from_millis(30));

        let q2 = q.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            q2.push(7);
        });
        let n = q.sread(
            &mut out,
            4,
            Some(Duration::from_secs(10)),
            || {},
            |fd, d| {
                poll_readable(
                    &[fd],
                    d.map(|d| d.saturating_duration_since(Instant::now())),
                )
            },
        );
        h.join().unwrap();
        assert_eq!((n, out.as_slice()), (1, &[7][..]));
    }
}
