//! The RMA target: every remote write and read is checked (key, rights, bounds, PMEM
//! for COMMIT) before a byte is touched, then placed or answered; a refused one ends
//! the connection ([`Conn::refuse`]).

use fabric_core::prov::{AccessError, Need, RemoteRange, ScatterList};
use fabric_core::Access;
use tracing::{debug, warn};

use super::{AfterRx, AfterTx, Body, Conn, Sink, TxOp};
use crate::mr;
use crate::wire::{Header, Op, Status, FLAG_COMMIT, FLAG_CQ_DATA, FLAG_NO_ACK};

impl Conn {
    /// A WRITE header: checks every remote iovec, then streams the payload into the
    /// regions (or refuses the write, touching nothing).
    pub(super) fn on_write(&mut self, h: &Header) {
        let size = h.size as usize;
        let data = (h.flags & FLAG_CQ_DATA != 0).then_some(h.data);
        let commit = h.flags & FLAG_COMMIT != 0;
        // A COMMIT write must target PMEM regions only: checked here, with key,
        // rights and bounds, before a byte is placed.
        let need = if commit {
            Need::COMMIT
        } else {
            Need::from(Access::REMOTE_WRITE)
        };
        match mr::check(&self.rep.keys, h.iovs(), need) {
            Ok(ranges) => {
                let sink = Sink::list(ScatterList::remote(ranges));
                self.expect(
                    sink,
                    size,
                    AfterRx::Write {
                        op_id: h.op_id,
                        size,
                        data,
                        commit,
                        no_ack: h.flags & FLAG_NO_ACK != 0,
                    },
                );
            }
            Err((status, index)) => {
                debug!(fid = %self.fid, ?status, index, "refusing remote write");
                let mut nak = Header::new(Op::Ack, h.op_id, 0);
                nak.status = status;
                nak.data = index as u64;
                self.refuse(&nak);
            }
        }
    }

    /// A READ_REQ: checks every remote iovec and queues the response, which streams
    /// from the regions; or refuses the read.
    pub(super) fn on_read_req(&mut self, h: &Header) {
        let mut resp = Header::new(Op::ReadResp, h.op_id, 0);
        match mr::check(&self.rep.keys, h.iovs(), Need::from(Access::REMOTE_READ)) {
            Ok(ranges) => {
                resp.size = h.iov_total();
                let op = TxOp::new(&resp, Body::Regions(ranges), AfterTx::Nothing);
                self.queue(op, false);
            }
            Err((status, index)) => {
                debug!(fid = %self.fid, ?status, index, "refusing remote read");
                resp.status = status;
                resp.data = index as u64;
                self.refuse(&resp);
            }
        }
    }

    /// A write's payload has been placed: persist it for COMMIT, report its CQ data,
    /// and acknowledge.
    pub(super) fn finish_write(
        &mut self,
        op_id: u64,
        size: usize,
        data: Option<u64>,
        commit: bool,
        ranges: &[RemoteRange],
    ) {
        if commit {
            // Durable before acknowledged: persist every written range (CPU cache flush
            // on true pmem, msync on a page-cache mapping) and answer only once all of
            // them succeeded. A failure is reported, never acked as durable; the data
            // stays placed (visible) but the initiator learns it may not be durable.
            if let Some((i, e)) = persist_all(ranges) {
                warn!(fid = %self.fid, op_id, index = i, "persisting a COMMIT write failed: {e}");
                self.ack(op_id, Status::OperationFailed, i as u64);
                return;
            }
        }
        match data {
            Some(d) => self.deliver_write_data(op_id, size, d),
            None => self.ack(op_id, Status::Ok, 0),
        }
    }
}

/// Persists every range in order; the first failure and the index of its range.
fn persist_all(ranges: &[RemoteRange]) -> Option<(usize, AccessError)> {
    ranges
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.persist().err().map(|e| (i, e)))
}
