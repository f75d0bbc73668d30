//! The progress thread's "is the application still polling?" timer.
//!
//! While an application thread busy-polls an RDM endpoint, the endpoint's progress
//! thread stays away (see `ep`'s "Progress"). It must notice when the application
//! stops, without waking up periodically to look: on a machine with as many busy
//! pollers as cores, each such wake-up preempts a poller, and a ping-pong waits for
//! whichever end was preempted.
//!
//! So the thread sleeps on a one-shot timer that the application itself keeps
//! pushing into the future while it polls ([`Watchdog::postpone`]: one clock read per
//! [`Watchdog::CHECK_EVERY`] calls, one `timerfd_settime` per half window): the timer
//! fires only once the application has been away for about a window, and the thread,
//! not the application, pays for the wake-up. Rearming a timerfd does not wake a
//! thread blocked on it. The deadline and the timer are set under one small lock, so
//! they always agree (an early fire only makes the thread look again).
//!
//! Where no timerfd can be made, [`Watchdog::wait`] sleeps until the deadline instead
//! (the thread then looks periodically).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub(crate) struct Watchdog {
    fd: Option<OwnedFd>,
    /// When the armed timer expires (nanoseconds on the owner's clock; 0: unarmed).
    deadline: AtomicU64,
    /// The application's latest clock check (nanoseconds on the owner's clock).
    app_last: AtomicU64,
    /// Held while `deadline` and the timer are set, so they always agree (the
    /// application and the thread both set them; taken about once per millisecond).
    arming: parking_lot::Mutex<()>,
}

impl Watchdog {
    /// The application reads the clock once per this many calls.
    pub(crate) const CHECK_EVERY: u64 = 16;

    pub(crate) fn new() -> Watchdog {
        // SAFETY: plain system call; the descriptor is owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        let fd = if fd >= 0 {
            // SAFETY: a fresh descriptor this process owns and nothing else holds.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        } else {
            tracing::debug!(
                "rdm: timerfd_create: {}; the progress thread polls instead",
                std::io::Error::last_os_error()
            );
            None
        };
        Watchdog {
            fd,
            deadline: AtomicU64::new(0),
            app_last: AtomicU64::new(0),
            arming: parking_lot::Mutex::new(()),
        }
    }

    /// The application's side, at a clock check (`now` on the owner's clock): keeps
    /// the timer at least half a `window` ahead.
    pub(crate) fn postpone(&self, now: u64, window: Duration) {
        self.app_last.store(now, Ordering::Relaxed);
        let w = window.as_nanos() as u64;
        if now + w / 2 >= self.deadline.load(Ordering::Relaxed) {
            let _g = self.arming.lock();
            self.arm(now, now + w);
        }
    }

    /// The application's latest clock check.
    pub(crate) fn app_last(&self) -> u64 {
        self.app_last.load(Ordering::Relaxed)
    }

    /// The thread's side: makes sure the timer fires no earlier than `at` and no later
    /// than the later of `at` and the deadline already set.
    pub(crate) fn arm_at_least(&self, now: u64, at: u64) {
        let _g = self.arming.lock();
        if self.deadline.load(Ordering::Relaxed) < at {
            self.arm(now, at);
        }
    }

    /// Wakes the thread now (the endpoint closes).
    pub(crate) fn fire(&self, now: u64) {
        let _g = self.arming.lock();
        self.arm(now, now);
    }

    /// Sets the deadline and the timer; the caller holds `arming`.
    fn arm(&self, now: u64, at: u64) {
        self.deadline.store(at.max(1), Ordering::Relaxed);
        let Some(fd) = &self.fd else { return };
        // A zero it_value disarms: fire in 1 ns at the least.
        let ns = at.saturating_sub(now).max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: a valid descriptor and a valid itimerspec; no old value asked for.
        let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            tracing::debug!("rdm: timerfd_settime: {}", std::io::Error::last_os_error());
        }
    }

    /// The thread's side: sleeps until the timer fires, or `timeout` (without a
    /// timerfd: sleeps until the deadline, at most `timeout`).
    pub(crate) fn wait(&self, now: u64, timeout: Duration) {
        let Some(fd) = &self.fd else {
            let left = self.deadline.load(Ordering::Relaxed).saturating_sub(now);
            std::thread::sleep(
                Duration::from_nanos(left).clamp(Duration::from_micros(100), timeout),
            );
            return;
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            let mut buf = [0u8; 8];
            // SAFETY: reads at most 8 bytes into an 8-byte buffer (non-blocking fd).
            let _ = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn ns(t0: Instant) -> u64 {
        t0.elapsed().as_nanos() as u64
    }

    #[test]
    fn fires_after_the_window_unless_postponed() {
        let w = Watchdog::new();
        assert!(w.fd.is_some(), "timerfd_create failed on Linux");
        let t0 = Instant::now();
        // A window far above any scheduling delay, so only a missing postponement
        // can let the timer fire early.
        let window = Duration::from_millis(200);
        w.postpone(ns(t0), window);
        // Postponed for 600 ms by an "application" thread: the waiter must not wake.
        std::thread::scope(|s| {
            let app = s.spawn(|| {
                while t0.elapsed() < Duration::from_millis(600) {
                    w.postpone(ns(t0), window);
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            w.wait(ns(t0), Duration::from_secs(5));
            let woke = t0.elapsed();
            app.join().unwrap();
            assert!(
                woke >= Duration::from_millis(600),
                "woke after {woke:?}, while the application still postponed"
            );
            assert!(
                woke < Duration::from_secs(4),
                "the timer never fired: {woke:?}"
            );
        });
        assert!(w.app_last() > 0);
    }

    #[test]
    fn fire_wakes_a_waiter_and_timeout_bounds_the_wait() {
        let w = Watchdog::new();
        let t0 = Instant::now();
        w.arm_at_least(ns(t0), ns(t0) + 10_000_000_000);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                w.fire(ns(t0));
            });
            w.wait(ns(t0), Duration::from_secs(5));
        });
        assert!(t0.elapsed() < Duration::from_secs(4));
        // Armed far ahead, nothing fires: the timeout ends the wait.
        let t1 = Instant::now();
        w.arm_at_least(ns(t0), ns(t0) + 10_000_000_000);
        w.wait(ns(t0), Duration::from_millis(50));
        let took = t1.elapsed();
        assert!(took >= Duration::from_millis(45), "{took:?}");
    }
}
