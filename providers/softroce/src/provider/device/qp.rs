//! The glue between a QP and its endpoint: operations and receives tracked per work
//! request, completions routed to the endpoint's queues.

use super::*;

/// What a QP's entry into ERROR means for its connection (`None`: the driver moved
/// it, and knows why).
pub(super) fn shutdown_reason(cause: rc::ErrorCause) -> Option<ShutdownReason> {
    use rc::ErrorCause as C;
    use WcStatus as S;
    Some(match cause {
        C::Modified => return None,
        C::AccessRefused(_) => ShutdownReason::AccessError,
        C::Requester(S::RemoteAccessError | S::RemoteInvalidRequest) => ShutdownReason::AccessError,
        C::Requester(_) => ShutdownReason::Lost,
        C::RequestFailed(NakCode::InvalidRequest) => ShutdownReason::Protocol,
        C::RequestFailed(_) => ShutdownReason::Lost,
    })
}

pub(super) fn status_error(s: WcStatus, what: &str) -> CqError {
    let (kind, errno) = match s {
        WcStatus::LocalLengthError => (CqErrorKind::Truncated, 0),
        WcStatus::RemoteAccessError => (CqErrorKind::RemoteAccess, 0x62),
        WcStatus::RemoteInvalidRequest => (CqErrorKind::RemoteInvalid, 0x61),
        WcStatus::RemoteOperationalError => (CqErrorKind::RemoteOperation, 0x63),
        WcStatus::RetryExceeded => (CqErrorKind::RetryExceeded, 0),
        WcStatus::RnrRetryExceeded => (CqErrorKind::RnrRetryExceeded, 0),
        WcStatus::Flushed => (CqErrorKind::Canceled, 0),
        WcStatus::LocalAccessError => (CqErrorKind::LocalProtection, 0),
        WcStatus::Success => (CqErrorKind::Other, 0),
    };
    let why = match s {
        WcStatus::LocalLengthError => "the message was larger than the receive buffer",
        WcStatus::RemoteAccessError => {
            "the target refused the access (NAK remote access error: key, bounds or rights)"
        }
        WcStatus::RemoteInvalidRequest => "the target refused the request (NAK invalid request)",
        WcStatus::RemoteOperationalError => {
            "the target failed to carry out the request (NAK remote operational error)"
        }
        WcStatus::RetryExceeded => "no answer from the peer after 7 retransmissions",
        WcStatus::RnrRetryExceeded => "the peer had no receive posted after the RNR retries",
        WcStatus::Flushed => "the queue pair entered the error state (connection closed or failed)",
        WcStatus::LocalAccessError => "a local buffer could not be accessed",
        WcStatus::Success => "success",
    };
    CqError::new(kind, errno, format!("{what}: {why}"))
}

impl QpSlot {
    /// Starts tracking an operation of `wrs` work requests; returns the id of its
    /// first work request (the others follow).
    pub(crate) fn track(
        &mut self,
        context: u64,
        flags: CompFlags,
        len: usize,
        completion: bool,
        wrs: u32,
    ) -> u64 {
        self.next_op = self.next_op.wrapping_add(1) & ((RECV_BIT - 1) >> WR_BITS);
        let id = self.next_op;
        self.ops.insert(
            id,
            OpTrack {
                context,
                flags,
                len,
                completion,
                remaining: wrs,
                error: None,
            },
        );
        id << WR_BITS
    }

    /// Posts one work request of a tracked operation. A refusal by the QP fails the
    /// operation's remaining count so the caller can undo with [`untrack`].
    pub(crate) fn post_send(&mut self, wr: SendWr) -> Result<(), rc::QpError> {
        self.qp.post_send(wr)
    }

    /// Forgets an operation whose posting failed before any work request was queued.
    pub(crate) fn untrack(&mut self, first_wr: u64) {
        self.ops.remove(&(first_wr >> WR_BITS));
    }

    /// Posts a receive.
    pub(crate) fn post_recv(
        &mut self,
        context: u64,
        local: Option<rc::LocalSegment>,
    ) -> Result<(), rc::QpError> {
        self.next_recv = self.next_recv.wrapping_add(1) & (RECV_BIT - 1);
        let wr_id = RECV_BIT | self.next_recv;
        self.qp.post_recv(RecvWr { wr_id, local })?;
        self.recvs.insert(wr_id, RecvTrack { context });
        Ok(())
    }

    /// The QP state.
    pub(crate) fn state(&self) -> rc::QpState {
        self.qp.state()
    }

    /// Operations outstanding.
    pub(crate) fn outstanding(&self) -> usize {
        self.ops.len()
    }

    /// Receives posted.
    pub(crate) fn posted_recvs(&self) -> usize {
        self.recvs.len()
    }

    pub(super) fn route(&mut self, c: rc::Completion) {
        if c.wr_id & RECV_BIT != 0 {
            let Some(r) = self.recvs.remove(&c.wr_id) else {
                return;
            };
            let mut flags = if c.opcode == WcOpcode::RecvRdmaWithImm {
                CompFlags::RMA | CompFlags::REMOTE_WRITE
            } else {
                CompFlags::MSG | CompFlags::RECV
            };
            if c.imm.is_some() {
                flags |= CompFlags::REMOTE_CQ_DATA;
            }
            let mut out = if c.status == WcStatus::Success {
                Completion::ok(r.context, flags, c.byte_len as usize)
            } else {
                let mut e = Completion::error(r.context, flags, status_error(c.status, "receive"));
                if c.status == WcStatus::LocalLengthError {
                    e.len = c.byte_len as usize;
                }
                e
            };
            out.data = c.imm.map_or(0, u64::from);
            self.rep.rx_cq.push(out);
            return;
        }
        let op_id = c.wr_id >> WR_BITS;
        let Some(op) = self.ops.get_mut(&op_id) else {
            return;
        };
        op.remaining = op.remaining.saturating_sub(1);
        if c.status != WcStatus::Success
            && (op.error.is_none() || op.error == Some(WcStatus::Flushed))
        {
            op.error = Some(c.status);
        }
        if op.remaining > 0 {
            return;
        }
        let Some(op) = self.ops.remove(&op_id) else {
            return;
        };
        match op.error {
            Some(s) => {
                // An error never claims the commit level.
                let flags = op.flags - CompFlags::COMMIT;
                let what = if op.flags.contains(CompFlags::COMMIT)
                    && s == WcStatus::RemoteInvalidRequest
                {
                    "write with COMMIT_COMPLETE: the persistent FLUSH was refused, a target \
                     region is not registered PMEM; nothing was written"
                } else if op.flags.contains(CompFlags::READ) {
                    "read"
                } else if op.flags.contains(CompFlags::WRITE) {
                    "write"
                } else {
                    "send"
                };
                self.rep
                    .tx_cq
                    .push(Completion::error(op.context, flags, status_error(s, what)));
            }
            None if op.completion => {
                self.rep
                    .tx_cq
                    .push(Completion::ok(op.context, op.flags, op.len));
            }
            None => {}
        }
    }

    /// Routes the QP's completions; returns whether one of them was a receive of a
    /// message of one packet (what a ping-pong answers at once).
    pub(super) fn drain_completions(&mut self) -> bool {
        let mtu = self.qp.mtu().map_or(0, |m| m.bytes());
        let mut small_receive = false;
        while let Some(c) = self.qp.poll_completion() {
            small_receive |= c.wr_id & RECV_BIT != 0 && c.byte_len <= mtu;
            self.route(c);
        }
        small_receive
    }
}
