//! The device's I/O loop: receive a batch, check and dispatch it, run timers, send
//! (paced) what the QPs produce.

use super::*;

impl Device {
    /// Sends the ACKs QPs hold back: all of them (`due` false: before anyone
    /// sleeps), or those held for [`ACK_HOLD`] already (every progress call).
    pub(crate) fn release_acks(&self, due: bool) {
        if !self.acks_held.load(Ordering::Acquire) {
            return;
        }
        let now = self.now();
        let limit = if due {
            now.0.saturating_sub(ACK_HOLD.as_nanos() as u64)
        } else {
            u64::MAX - 1
        };
        // The hint is cleared before the scan and set again if a QP still holds:
        // a QP that starts holding meanwhile (dispatch: its stamp, then the hint) is
        // either seen by the scan or leaves the hint set. (Clearing it after the
        // scan lost such a QP's ACK for good: nothing looked at it again until its
        // peer retransmitted, and a busy peer's connection stalled for seconds.)
        self.acks_held.swap(false, Ordering::AcqRel);
        let mut still_held = false;
        let release: Vec<Arc<QpCell>> = {
            let qps = self.qps.read();
            let mut v = Vec::new();
            for c in qps.values() {
                let since = c.acks_held.load(Ordering::Acquire);
                if since <= limit {
                    v.push(c.clone());
                } else if since != u64::MAX {
                    still_held = true;
                }
            }
            v
        };
        if still_held {
            self.acks_held.store(true, Ordering::Release);
        }
        for cell in release {
            let mut slot = cell.slot.lock();
            if cell.acks_held.load(Ordering::Acquire) != u64::MAX {
                self.flush_qp(&cell, &mut slot, now);
            }
        }
    }

    /// Manual progress: receive, run timers, send, complete. `wait_lock` false skips
    /// the work when another thread is already receiving on this device, and lets a
    /// QP that just received a one-packet message hold its ACK back for the
    /// application's answer (the caller is a busy poller; see [`Self::dispatch`]).
    pub(crate) fn progress(&self, wait_lock: bool) {
        // One clock read per poll: a busy poller's loop is this call, and every
        // read of the clock lengthens the time until it sees the next packet.
        let now = self.now();
        // Written only when it moved by a while: the backstop judges in intervals of
        // a millisecond, and a store on every poll would take the cache line from the
        // other threads polling this device each time.
        let grain = self.backstop_ns.load(Ordering::Relaxed) / APP_PROGRESS_GRAIN;
        if now
            .0
            .saturating_sub(self.app_progress.load(Ordering::Relaxed))
            > grain
        {
            self.app_progress.store(now.0, Ordering::Relaxed);
        }
        self.run_at(now, wait_lock, !wait_lock);
    }

    /// Receives, runs timers, sends. `wait_lock` false: skip when another thread is
    /// receiving; `hold_acks`: see [`Self::dispatch`].
    pub(super) fn run(&self, wait_lock: bool, hold_acks: bool) {
        self.run_at(self.now(), wait_lock, hold_acks);
    }

    /// [`Self::run`] with the time read by the caller.
    fn run_at(&self, mut now: Time, wait_lock: bool, hold_acks: bool) {
        self.release_acks(hold_acks || wait_lock);
        let mut rx = if wait_lock {
            self.rx.lock()
        } else {
            // Looked at before the attempt: a failed try is a read-modify-write too.
            if self.rx.is_locked() {
                return;
            }
            match self.rx.try_lock() {
                Some(s) => s,
                None => return,
            }
        };
        let fd = self.sock.as_raw_fd();
        let mut received = false;
        for _ in 0..MAX_ROUNDS {
            let n = match rx.rx.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    // e.g. ECONNREFUSED reported for an earlier datagram: harmless.
                    debug!("recvmmsg: {e}");
                    0
                }
            };
            if n > 0 {
                received = true;
                now = self.now();
                self.dispatch(&mut rx, now, n, hold_acks);
            }
            if !rx.rx.full() {
                break;
            }
        }
        if wait_lock || received || now.0.saturating_sub(rx.share_at) >= SHARE_POLL_NS {
            rx.share_at = now.0;
            self.take_forwarded(&mut rx, hold_acks);
        }
        self.timers(now);
        drop(rx);
    }

    /// Receives what other processes sharing the device passed to this one (frames
    /// for its QPs that the kernel gave to their sockets) and dispatches it as if
    /// received here.
    fn take_forwarded(&self, st: &mut RxState, hold_acks: bool) {
        for _ in 0..MAX_ROUNDS {
            let mut fwd = std::mem::take(&mut st.fwd);
            let mut n = 0;
            while n < sys::BATCH {
                if fwd.len() <= n {
                    fwd.push((
                        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                        vec![0; FORWARDED_MAX],
                    ));
                }
                let (src, buf) = &mut fwd[n];
                buf.resize(FORWARDED_MAX, 0);
                match self.share.recv(buf) {
                    Ok(Some((from, len))) => {
                        *src = from;
                        buf.truncate(len);
                        n += 1;
                    }
                    Ok(None) => break,
                    Err(()) => {
                        self.counters
                            .forward_refused
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if n > 0 {
                self.counters
                    .forwarded_in
                    .fetch_add(n as u64, Ordering::Relaxed);
                let RxState {
                    touched, ip_ids, ..
                } = st;
                let now = self.now();
                self.dispatch_frames(
                    fwd[..n].iter().map(|(a, b)| (*a, &b[..])),
                    touched,
                    ip_ids,
                    now,
                    hold_acks,
                );
            }
            st.fwd = fwd;
            if n < sys::BATCH {
                break;
            }
        }
    }

    /// Tells the owners of QPs that entered ERROR on their own (a refused access, a
    /// NAK, retries exhausted). Call with no lock held: owners take their own.
    pub(crate) fn report_failures(&self) {
        // Read before the swap: this runs on every poll, and a read-modify-write
        // would take the cache line from every other poller each time.
        if !self.has_failed.load(Ordering::Acquire)
            || !self.has_failed.swap(false, Ordering::AcqRel)
        {
            return;
        }
        let failed = std::mem::take(&mut *self.failed.lock());
        for (rep, reason) in failed {
            if let Some(owner) = rep.owner.get().and_then(Weak::upgrade) {
                owner.qp_failed(reason);
            }
        }
    }

    /// Hands a received batch to the QPs, then sends what they produced.
    ///
    /// With `hold_acks`, a QP that completed the receive of a one-packet message and
    /// has nothing but ACKs to send keeps them for the moment: a busy-polling
    /// application typically answers at once, and the ACK then leaves in the same
    /// `sendmmsg` as the answer (one system call per message on the critical path of
    /// a ping-pong instead of two). Held ACKs leave with the next post of a send on
    /// that QP, after [`ACK_HOLD`] at the next progress call on the device, or before
    /// anyone sleeps. Only when the peer's work completes changes: the ACK covers the
    /// same PSNs, and the peer's retransmission timer (milliseconds) bounds the wait.
    pub(super) fn dispatch(&self, st: &mut RxState, now: Time, n: usize, hold_acks: bool) {
        let RxState {
            rx,
            touched,
            ip_ids,
            ..
        } = st;
        self.dispatch_frames((0..n).map(|i| rx.get(i)), touched, ip_ids, now, hold_acks);
        self.counters
            .rx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
        if rx.gro > 0 {
            self.counters
                .gro_packets
                .fetch_add(rx.gro as u64, Ordering::Relaxed);
        }
        if rx.truncated > 0 {
            self.counters
                .bad_packets
                .fetch_add(rx.truncated as u64, Ordering::Relaxed);
        }
    }

    /// [`Self::dispatch`] for any source of frames (the socket's batch, or frames
    /// other processes passed on).
    fn dispatch_frames<'a>(
        &self,
        frames: impl Iterator<Item = (SocketAddrV4, &'a [u8])>,
        touched: &mut Vec<Arc<QpCell>>,
        ip_ids: &mut HashMap<Ipv4Addr, IpIdWindow>,
        now: Time,
        hold_acks: bool,
    ) {
        {
            let qps = self.qps.read();
            let mut last: Option<(u32, &Arc<QpCell>)> = None;
            let mut slot_guard = None;
            for (src, bytes) in frames {
                let icrc = IcrcContext::rxe(*src.ip(), self.ip, src.port(), ROCE_UDP_PORT);
                let ip_id = match icrc.solve_ip_id(bytes) {
                    Ok(id) if bytes.len() >= 16 => id,
                    _ => {
                        self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let qpn = u32::from_be_bytes([0, bytes[5], bytes[6], bytes[7]]);
                if qpn == crate::ibcm::wire::GSI_QPN {
                    (slot_guard, last) = (None, None);
                    self.gsi_receive(ip_ids, src, ip_id, bytes, now);
                    continue;
                }
                if last.is_none_or(|(q, _)| q != qpn) {
                    slot_guard = None;
                    let Some(cell) = qps.get(&qpn) else {
                        // Another process's QP on this shared device: pass it on.
                        let owner = share::Share::owner(qpn);
                        if owner != 0
                            && owner != self.share.slot()
                            && self.share.forward(owner, src, bytes)
                        {
                            self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.counters.unknown_qp.fetch_add(1, Ordering::Relaxed);
                        }
                        last = None;
                        continue;
                    };
                    if !touched.iter().any(|c| Arc::ptr_eq(c, cell)) {
                        touched.push(cell.clone());
                    }
                    last = Some((qpn, cell));
                    slot_guard = Some(cell.slot.lock());
                }
                if let Some((_, cell)) = last {
                    if !cell.source_ok(src) {
                        self.counters.wrong_source.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                // Judged per peer address: the sender numbers its IDs per
                // destination, across all its QPs.
                if ip_ids.len() >= MAX_ID_PEERS && !ip_ids.contains_key(src.ip()) {
                    ip_ids.clear();
                }
                if !ip_ids.entry(*src.ip()).or_default().accept(ip_id, now.0) {
                    self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // The guard belongs to `last`, set just above.
                if let Some(slot) = slot_guard.as_mut() {
                    if slot.qp.handle_packet(now, bytes).is_err() {
                        self.counters.bad_packets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        for cell in touched.drain(..) {
            let mut slot = cell.slot.lock();
            // Completions first, so the application sees the receive now.
            if hold_acks
                && slot.qp.only_acks_pending()
                && slot.drain_completions()
                && slot.qp.only_acks_pending()
            {
                if cell.acks_held.load(Ordering::Acquire) == u64::MAX {
                    cell.acks_held.store(now.0, Ordering::Release);
                }
                self.acks_held.store(true, Ordering::Release);
                self.publish_deadline(&cell, slot.qp.poll_timeout().map_or(u64::MAX, |t| t.0));
                continue;
            }
            self.flush_qp(&cell, &mut slot, now);
        }
    }

    /// Runs the QP timers that are due and releases delayed frames.
    pub(super) fn timers(&self, now: Time) {
        // Nothing due before the earliest deadline published since the last pass:
        // no lock, no scan (the common case of a busy poller).
        if self.next_deadline.load(Ordering::SeqCst) > now.0
            && self.delayed_deadline.load(Ordering::Acquire) > now.0
        {
            return;
        }
        let due: Vec<Arc<QpCell>> = {
            let qps = self.qps.read();
            // Recomputed from every QP; a QP publishing a deadline meanwhile lowers
            // it again itself (`publish_deadline`), so none is lost.
            self.next_deadline.store(u64::MAX, Ordering::SeqCst);
            let mut due = Vec::new();
            for c in qps.values() {
                let d = c.deadline.load(Ordering::SeqCst);
                if d <= now.0 {
                    due.push(c.clone());
                } else {
                    self.next_deadline.fetch_min(d, Ordering::SeqCst);
                }
            }
            due
        };
        for cell in due {
            let mut slot = cell.slot.lock();
            if slot.qp.poll_timeout().is_some_and(|t| t <= now) {
                slot.qp.handle_timeout(now);
            }
            self.flush_qp(&cell, &mut slot, now);
        }
        if self.delayed_deadline.load(Ordering::Acquire) <= now.0 {
            let mut x = self.extras.lock();
            let mut out = Vec::new();
            while x.delayed.peek().is_some_and(|d| d.0 .0 <= now) {
                if let Some(std::cmp::Reverse((_, _, dst, frame))) = x.delayed.pop() {
                    out.push((dst, frame));
                }
            }
            self.delayed_deadline.store(
                x.delayed.peek().map_or(u64::MAX, |d| d.0 .0 .0),
                Ordering::Release,
            );
            self.send_raw(&mut out, &mut x.pcap, now);
            self.has_extras.store(
                x.faults.is_some() || x.pcap.is_some() || !x.delayed.is_empty(),
                Ordering::Release,
            );
        }
    }

    /// Sends what a QP has to send (through the fault injector, if any), routes its
    /// completions and publishes its next timer. Called with the QP's lock held, so
    /// its packets leave in order.
    pub(super) fn flush_qp(&self, cell: &QpCell, slot: &mut QpSlot, now: Time) {
        let mut out: Vec<(SocketAddrV4, Vec<u8>)> = Vec::new();
        // Pacing (see [`Pace`]): at most a burst per turn; the rest on a later turn.
        let burst = self.pace_burst.load(Ordering::Relaxed);
        let gap = self.pace_gap_ns.load(Ordering::Relaxed);
        let mut sent = 0usize;
        let until = cell.paced_until.load(Ordering::Acquire);
        // Within the gap after a turn nothing leaves (ACKs wait too, at most the gap).
        // Judged on a fresh clock: `now` may be stale by a batch's dispatch.
        let clock = if gap > 0 {
            self.now().0.max(now.0)
        } else {
            now.0
        };
        let mut paused = clock < until;
        while !paused {
            if sent >= burst {
                paused = true;
                break;
            }
            let Some(t) = slot.qp.poll_transmit(now) else {
                break;
            };
            sent += 1;
            if out.capacity() == 0 {
                out.reserve(GATHER);
            }
            out.push((t.dst, t.payload));
            if out.len() >= GATHER {
                self.send(&mut out, now);
                for (_, frame) in out.drain(..) {
                    slot.qp.recycle(frame);
                }
            }
        }
        self.send(&mut out, now);
        for (_, frame) in out.drain(..) {
            slot.qp.recycle(frame);
        }
        cell.acks_held.store(u64::MAX, Ordering::Release);
        slot.drain_completions();
        if !slot.ended && slot.qp.state() == rc::QpState::Error {
            slot.ended = true;
            if let Some(reason) = slot.qp.error_cause().and_then(shutdown_reason) {
                self.failed.lock().push((slot.rep.clone(), reason));
                self.has_failed.store(true, Ordering::Release);
            }
        }
        let mut deadline = slot.qp.poll_timeout().map_or(u64::MAX, |t| t.0);
        let mut resume = until;
        if sent > 0 && gap > 0 {
            // A turn was taken: the next one no earlier than the gap after it left.
            resume = self.now().0 + gap;
            cell.paced_until.store(resume, Ordering::Release);
        }
        if paused {
            // Come back for the rest (the timer pass flushes it).
            deadline = deadline.min(resume.max(now.0));
        }
        self.publish_deadline(cell, deadline);
    }

    /// Publishes a QP's next timer (ns since the epoch, `u64::MAX`: none) for the
    /// timer pass ([`Self::timers`]).
    pub(super) fn publish_deadline(&self, cell: &QpCell, deadline: u64) {
        cell.deadline.store(deadline, Ordering::SeqCst);
        if deadline != u64::MAX {
            self.next_deadline.fetch_min(deadline, Ordering::SeqCst);
        }
    }

    /// Sends frames, through the fault injector and capture when configured. `out`
    /// keeps the frames that passed (whose buffers the caller may reuse).
    pub(super) fn send(&self, out: &mut Vec<(SocketAddrV4, Vec<u8>)>, now: Time) {
        if out.is_empty() {
            return;
        }
        if !self.has_extras.load(Ordering::Acquire) {
            let n = self.transmit(out, None);
            self.counters
                .tx_packets
                .fetch_add(n as u64, Ordering::Relaxed);
            return;
        }
        let mut x = self.extras.lock();
        let TxExtras {
            faults,
            delayed,
            seq,
            pcap,
        } = &mut *x;
        if let Some(f) = faults.as_mut() {
            let mut passed = Vec::with_capacity(out.len());
            for (dst, payload) in out.drain(..) {
                for (at, frame) in f.inject(now, payload) {
                    if at <= now {
                        passed.push((dst, frame));
                    } else {
                        *seq += 1;
                        delayed.push(std::cmp::Reverse((at, *seq, dst, frame)));
                    }
                }
            }
            *out = passed;
            self.delayed_deadline.store(
                delayed.peek().map_or(u64::MAX, |d| d.0 .0 .0),
                Ordering::Release,
            );
        }
        self.send_raw(out, pcap, now);
    }

    /// Sends frames as they are and captures them.
    pub(super) fn send_raw(
        &self,
        out: &mut [(SocketAddrV4, Vec<u8>)],
        pcap: &mut Option<Capture>,
        now: Time,
    ) {
        if out.is_empty() {
            return;
        }
        let mut ids = Vec::new();
        let want_ids = pcap.is_some();
        let n = self.transmit(out, want_ids.then_some(&mut ids));
        self.counters
            .tx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
        if let Some(c) = pcap.as_ref() {
            let wall = Time(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(now.0, |d| d.as_nanos() as u64),
            );
            let mut w = c.lock();
            let mut ok = true;
            for ((dst, payload), &ip_id) in out.iter().zip(&ids) {
                let info = FrameInfo {
                    ip_id,
                    ..FrameInfo::rxe(self.ip, *dst.ip(), ROCE_UDP_PORT)
                };
                let written = build_frame(&info, payload).map(|f| w.write_frame(wall, &f));
                if !matches!(written, Ok(Ok(()))) {
                    ok = false;
                    break;
                }
            }
            ok &= std::io::Write::flush(w.get_mut()).is_ok();
            drop(w);
            if !ok {
                warn!("softroce: capture write failed; capture stopped");
                *pcap = None;
            }
        }
    }

    /// Hands frames to the kernel; returns how many it took. Where the device may
    /// ([`DeviceConfig::gso`], and the kernel has it), runs of frames to one peer of
    /// one length leave as one UDP segmentation offload send each
    /// ([`sys::gso_groups`]): the kernel numbers the IP IDs of the datagrams of a GSO
    /// send from this unconnected DF socket 0, 1, 2, ... (one ID-0 datagram otherwise),
    /// and the ICRC covers the ID, so each frame's ICRC (built for ID 0) is first
    /// moved to the ID it will carry ([`IpIdDelta`]). A kernel that refuses the offload
    /// on this path turns it off for the device; the frames are then sent one by one
    /// with their ICRCs moved back. With `ids`, the ID each frame was sent with (in
    /// `out`'s order, for the capture).
    pub(super) fn transmit(
        &self,
        out: &mut [(SocketAddrV4, Vec<u8>)],
        ids: Option<&mut Vec<u16>>,
    ) -> usize {
        let fd = self.sock.as_raw_fd();
        let mut groups: Vec<(usize, usize)> = Vec::new();
        if out.len() > 1 && self.gso.load(Ordering::Relaxed) {
            sys::gso_groups(out, &mut groups);
        }
        if groups.len() == out.len() || groups.is_empty() {
            if let Some(ids) = ids {
                ids.clear();
                ids.resize(out.len(), 0);
            }
            return sys::send_batch(fd, out);
        }
        for &(start, count) in groups.iter().filter(|g| g.1 > 1) {
            set_gso_ids(&mut out[start..start + count], true);
        }
        let r = sys::send_groups(fd, out, &groups);
        let sent_gso = groups[..r.groups].iter().filter(|g| g.1 > 1).count();
        self.counters
            .gso_sends
            .fetch_add(sent_gso as u64, Ordering::Relaxed);
        let mut n = r.frames;
        // Where the frames from `from` on went out one by one (ID 0).
        let mut from = out.len();
        if r.gso_refused {
            self.gso.store(false, Ordering::Relaxed);
            warn!(
                ip = %self.ip,
                "softroce: the kernel refused UDP segmentation offload on this path; \
                 sending packets one by one from now on"
            );
            from = groups[r.groups].0;
            for &(start, count) in groups[r.groups..].iter().filter(|g| g.1 > 1) {
                set_gso_ids(&mut out[start..start + count], false);
            }
            n += sys::send_batch(fd, &out[from..]);
        }
        if let Some(ids) = ids {
            ids.clear();
            for &(start, count) in &groups {
                for i in 0..count {
                    let gso = count > 1 && start < from;
                    ids.push(if gso { i as u16 } else { 0 });
                }
            }
        }
        n
    }
}

/// How stale [`Device::progress`] lets the time of the application's last progress
/// get before it writes it again: this fraction of the backstop interval (31 µs of
/// the default 1 ms).
const APP_PROGRESS_GRAIN: u64 = 32;

/// Largest frame another process passes on (a packet of path MTU 4096 and its
/// headers, with room to spare; a longer one is refused as malformed).
const FORWARDED_MAX: usize = 4096 + 256;

/// Frames a QP's output is gathered into before it is handed to the kernel: a pacing
/// turn (64 packets) in at most a few GSO sends.
const GATHER: usize = 64;

/// Moves the ICRCs of one GSO group's frames from ID 0 to the IDs the segments will
/// carry (`to_gso`), or back.
fn set_gso_ids(frames: &mut [(SocketAddrV4, Vec<u8>)], to_gso: bool) {
    thread_local! {
        /// The columns of the last few packet lengths (a stream has two or three).
        static DELTAS: std::cell::RefCell<Vec<IpIdDelta>> = const {
            std::cell::RefCell::new(Vec::new())
        };
    }
    DELTAS.with(|cache| {
        let mut cache = cache.borrow_mut();
        for (i, (_, f)) in frames.iter_mut().enumerate().skip(1) {
            let len = f.len();
            let d = match cache.iter().position(|d| d.roce_len() == len) {
                Some(k) => cache[k],
                None => {
                    let d = IpIdDelta::new(len);
                    if cache.len() >= 8 {
                        cache.remove(0);
                    }
                    cache.push(d);
                    d
                }
            };
            let id = i as u16;
            if to_gso {
                d.apply(f, 0, id);
            } else {
                d.apply(f, id, 0);
            }
        }
    });
}
