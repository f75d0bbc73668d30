//! Completion counters (libfabric `fi_cntr`): a success count and an error count that
//! an endpoint bumps as operations of the classes it was bound for complete.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_core::{Error, ErrorKind, Result};
use parking_lot::{Condvar, Mutex};

bitflags::bitflags! {
    /// Which completions a counter counts (libfabric's `FI_SEND`, `FI_RECV`, `FI_READ`,
    /// `FI_WRITE` bind flags). Fetching atomics count as `READ`, the others as `WRITE`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CntrEvents: u32 {
        /// Sends (tagged or not).
        const SEND = 1 << 0;
        /// Receives (tagged or not).
        const RECV = 1 << 1;
        /// Reads and fetching atomics initiated here.
        const READ = 1 << 2;
        /// Writes and non-fetching atomics initiated here.
        const WRITE = 1 << 3;
        /// Peers' writes with remote CQ data announced here (`FI_REMOTE_WRITE`).
        const REMOTE_WRITE = 1 << 4;
    }
}

#[derive(Default)]
struct Counts {
    ok: u64,
    err: u64,
}

struct Shared {
    counts: Mutex<Counts>,
    cv: Condvar,
}

/// A counter; clones share it.
#[derive(Clone)]
pub struct Counter(Arc<Shared>);

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter")
            .field("value", &self.read())
            .field("errors", &self.read_err())
            .finish()
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

impl Counter {
    /// A counter at zero.
    pub fn new() -> Counter {
        Counter(Arc::new(Shared {
            counts: Mutex::new(Counts::default()),
            cv: Condvar::new(),
        }))
    }
    /// Successful completions counted (`fi_cntr_read`).
    pub fn read(&self) -> u64 {
        self.0.counts.lock().ok
    }
    /// Error completions counted (`fi_cntr_readerr`).
    pub fn read_err(&self) -> u64 {
        self.0.counts.lock().err
    }
    /// Adds to the success count (`fi_cntr_add`).
    pub fn add(&self, n: u64) {
        self.update(|c| c.ok = c.ok.wrapping_add(n));
    }
    /// Sets the success count (`fi_cntr_set`).
    pub fn set(&self, n: u64) {
        self.update(|c| c.ok = n);
    }
    /// Adds to the error count (`fi_cntr_adderr`).
    pub fn add_err(&self, n: u64) {
        self.update(|c| c.err = c.err.wrapping_add(n));
    }
    /// Sets the error count (`fi_cntr_seterr`).
    pub fn set_err(&self, n: u64) {
        self.update(|c| c.err = n);
    }

    fn update(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.0.counts.lock());
        self.0.cv.notify_all();
    }

    /// Waits until the success count reaches `threshold` (`fi_cntr_wait`); returns it.
    /// Fails with [`ErrorKind::TimedOut`] after `timeout`, and with
    /// [`ErrorKind::Io`] as soon as the error count grows during the wait (as
    /// `fi_cntr_wait` returns `-FI_EAVAIL`).
    pub fn wait(&self, threshold: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        let mut c = self.0.counts.lock();
        let err0 = c.err;
        loop {
            if c.ok >= threshold {
                return Ok(c.ok);
            }
            if c.err != err0 {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("counter: {} error completions while waiting", c.err - err0),
                ));
            }
            if self.0.cv.wait_until(&mut c, deadline).timed_out() {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("counter: {} of {threshold} after {timeout:?}", c.ok),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_set_wait_and_errors() {
        let c = Counter::new();
        c.add(2);
        assert_eq!(c.read(), 2);
        c.set(10);
        assert_eq!(c.wait(10, Duration::from_millis(1)).unwrap(), 10);
        let e = c.wait(11, Duration::from_millis(20)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut);
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c2.add(5);
        });
        assert_eq!(c.wait(15, Duration::from_secs(5)).unwrap(), 15);
        t.join().unwrap();
        let c3 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c3.add_err(1);
        });
        assert_eq!(
            c.wait(100, Duration::from_secs(5)).unwrap_err().kind(),
            ErrorKind::Io
        );
        t.join().unwrap();
        assert_eq!(c.read_err(), 1);
        c.set_err(0);
        assert_eq!(c.read_err(), 0);
    }
}
