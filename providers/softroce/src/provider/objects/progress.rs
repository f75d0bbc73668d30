//! Progress: how the fabric's devices and connection manager are driven (manual
//! progress from queue reads, sleeping waits, the auto-progress thread).

use super::*;

impl Shared {
    /// Manual progress. `full` also runs the connection manager and waits for device
    /// locks held by other threads.
    pub(super) fn progress(&self, full: bool) {
        for d in self.devices.read().iter() {
            d.progress(full);
            d.report_failures();
        }
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        if full || t.is_multiple_of(CM_EVERY) {
            self.cm_progress();
        }
    }

    /// Sleeps until a device socket or CM socket is readable, `queue_fd` is
    /// signalled, a device timer is due or `deadline` passes.
    pub(super) fn sleep(&self, queue_fd: Option<RawFd>, deadline: Option<Instant>) {
        let devices = self.devices.read().clone();
        let mut fds: Vec<RawFd> = Vec::with_capacity(8);
        let mut timeout = MAX_SLEEP;
        if let Some(d) = deadline {
            timeout = timeout.min(d.saturating_duration_since(Instant::now()));
        }
        for d in &devices {
            d.release_acks(false);
            fds.extend_from_slice(&d.fds());
            if let Some(t) = d.next_timer() {
                timeout = timeout.min(t);
            }
            d.begin_sleep();
        }
        {
            let cm = self.cm.lock();
            fds.extend(
                cm.listeners
                    .values()
                    .filter(|l| l.listening)
                    .map(|l| l.sock.as_raw_fd()),
            );
            fds.extend(cm.half_open.iter().map(|h| h.sock.as_raw_fd()));
            // Every endpoint's CM socket, as one descriptor.
            fds.push(cm.ready.raw());
        }
        if let Some(q) = queue_fd {
            fds.push(q);
        }
        fabric_core::wait::poll_readable(&fds, Some(timeout));
        for d in &devices {
            d.end_sleep();
        }
    }
}

/// Manual progress consults the connection manager every this many CQ reads.
const CM_EVERY: u32 = 256;
/// Longest a sleeper waits before looking again (connection housekeeping).
const MAX_SLEEP: Duration = Duration::from_millis(100);
impl prov::Progress for Shared {
    fn poll(&self) {
        self.progress(false);
    }

    fn poll_full(&self) {
        self.progress(true);
    }

    fn sleep(&self, queue_fd: Option<RawFd>, deadline: Option<Instant>) {
        Shared::sleep(self, queue_fd, deadline);
    }

    fn start_auto(self: &Arc<Self>) {
        prov::start_progress_thread(self, &self.auto, "softroce-progress");
    }
}
