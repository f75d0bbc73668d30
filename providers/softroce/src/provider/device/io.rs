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
        if !still_held {
            self.acks_held.store(false, Ordering::Release);
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
        self.app_progress.store(self.now().0, Ordering::Relaxed);
        self.run(wait_lock, !wait_lock);
    }

    /// Receives, runs timers, sends. `wait_lock` false: skip when another thread is
    /// receiving; `hold_acks`: see [`Self::dispatch`].
    pub(super) fn run(&self, wait_lock: bool, hold_acks: bool) {
        self.release_acks(hold_acks || wait_lock);
        let mut rx = if wait_lock {
            self.rx.lock()
        } else {
            match self.rx.try_lock() {
                Some(s) => s,
                None => return,
            }
        };
        let fd = self.sock.as_raw_fd();
        let mut now = self.now();
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
                now = self.now();
                self.dispatch(&mut rx, now, n, hold_acks);
            }
            if n < BATCH {
                break;
            }
        }
        self.timers(now);
        drop(rx);
    }

    /// Tells the owners of QPs that entered ERROR on their own (a refused access, a
    /// NAK, retries exhausted). Call with no lock held: owners take their own.
    pub(crate) fn report_failures(&self) {
        if !self.has_failed.swap(false, Ordering::AcqRel) {
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
        } = st;
        {
            let qps = self.qps.read();
            let mut last: Option<(u32, &Arc<QpCell>)> = None;
            let mut slot_guard = None;
            for i in 0..n {
                let (src, bytes) = rx.get(i);
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
                        self.counters.unknown_qp.fetch_add(1, Ordering::Relaxed);
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
        self.counters
            .rx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
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
                cell.deadline.store(
                    slot.qp.poll_timeout().map_or(u64::MAX, |t| t.0),
                    Ordering::Release,
                );
                continue;
            }
            self.flush_qp(&cell, &mut slot, now);
        }
    }

    /// Runs the QP timers that are due and releases delayed frames.
    pub(super) fn timers(&self, now: Time) {
        let due: Vec<Arc<QpCell>> = {
            let qps = self.qps.read();
            if !qps
                .values()
                .any(|c| c.deadline.load(Ordering::Acquire) <= now.0)
            {
                Vec::new()
            } else {
                qps.values()
                    .filter(|c| c.deadline.load(Ordering::Acquire) <= now.0)
                    .cloned()
                    .collect()
            }
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
                out.reserve(BATCH);
            }
            out.push((t.dst, t.payload));
            if out.len() >= BATCH {
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
        cell.deadline.store(deadline, Ordering::Release);
    }

    /// Sends frames, through the fault injector and capture when configured. `out`
    /// keeps the frames that passed (whose buffers the caller may reuse).
    pub(super) fn send(&self, out: &mut Vec<(SocketAddrV4, Vec<u8>)>, now: Time) {
        if out.is_empty() {
            return;
        }
        if !self.has_extras.load(Ordering::Acquire) {
            let n = sys::send_batch(self.sock.as_raw_fd(), out);
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
        let n = sys::send_batch(self.sock.as_raw_fd(), out);
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
            for (dst, payload) in out.iter().take(n) {
                let info = FrameInfo::rxe(self.ip, *dst.ip(), ROCE_UDP_PORT);
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
}
