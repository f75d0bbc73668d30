//! The backstop thread: runs a device's transport when no application thread does.

use super::*;

/// Default interval of the progress backstop: short enough that the peer's first
/// retransmission timer (2.1 ms) rarely fires when the application stops polling, long
/// enough that its checks cost a busy-polling application nothing measurable.
pub const DEFAULT_BACKSTOP: Duration = Duration::from_millis(1);
/// Longest the backstop sleeps on an idle device (bounds how long it keeps a dropped
/// device's socket open).
const BACKSTOP_IDLE: Duration = Duration::from_millis(50);
/// The backstop thread of a device, as a NIC's transport never stops: whenever no
/// application thread has run the device's transport (a completion or event queue
/// read, a sleeping wait that woke, the auto-progress thread) for the backstop
/// interval and none sleeps on the device, it runs it: receives, answers (ACK, NAK,
/// RNR NAK, READ responses), retransmits, and tells QP owners of failures. While the
/// application stays away it sleeps on the socket and the next timer, so it answers
/// at once; when the application polls again it steps back and only looks every
/// interval. Ends when the device is dropped.
pub(super) fn backstop(weak: Weak<Device>) {
    debug!("softroce backstop started");
    loop {
        let Some(dev) = weak.upgrade() else { break };
        let every = dev.backstop_ns.load(Ordering::Relaxed);
        if every == 0 {
            drop(dev);
            std::thread::sleep(BACKSTOP_IDLE);
            continue;
        }
        let now = dev.now().0;
        let since = now.saturating_sub(dev.app_progress.load(Ordering::Relaxed));
        if dev.sleepers.load(Ordering::Acquire) > 0 || since < every {
            // An application thread runs the transport, or sleeps on the socket
            // and will: look again when it may have stopped.
            let wait = if since < every { every - since } else { every };
            drop(dev);
            std::thread::sleep(Duration::from_nanos(wait));
            continue;
        }
        dev.run(false, false);
        dev.report_failures();
        dev.backstop_waiting.store(true, Ordering::SeqCst);
        let timeout = dev
            .next_timer()
            .map_or(BACKSTOP_IDLE, |t| t.min(BACKSTOP_IDLE));
        fabric_core::wait::poll_readable(
            &[
                dev.sock.as_raw_fd(),
                dev.backstop_efd.raw(),
                dev.share.raw(),
            ],
            Some(timeout),
        );
        dev.backstop_waiting.store(false, Ordering::Release);
        dev.backstop_efd.drain();
    }
    debug!("softroce backstop stopped");
}
