//! Receive matching: posted receives in FIFO order, messages (and CQ data of writes)
//! that arrived before a receive, buffered up to [`UNEXPECTED_LIMIT`], and the
//! acknowledgements that wait for a match.

use fabric_core::{CompFlags, Completion, CqError, CqErrorKind, RecvRequest};
use tracing::debug;

use super::{AfterRx, Conn, Fatal, Phase, Sink, UNEXPECTED_LIMIT, UNEXPECTED_MAX_ENTRIES};
use crate::wire::{Header, Status, FLAG_CQ_DATA, FLAG_DELIVERY};
use fabric_core::prov::ScatterList;

/// A message (or write-with-data notification) that arrived before a receive.
pub(super) struct Unexpected {
    pub(super) bytes: Vec<u8>,
    pub(super) size: usize,
    pub(super) data: Option<u64>,
    pub(super) ack: Option<u64>,
    pub(super) write_data: bool,
}

impl Conn {
    pub(crate) fn posted_len(&self) -> usize {
        self.posted.len()
    }

    pub(super) fn start_msg(&mut self, h: Header) {
        let size = h.size as usize;
        let data = (h.flags & FLAG_CQ_DATA != 0).then_some(h.data);
        let ack = (h.flags & FLAG_DELIVERY != 0).then_some(h.op_id);
        if let Some(mut recv) = self.posted.pop_front() {
            // The segments move into the sink (no copy of the list per message): the
            // completion needs only the context, and a truncation reports `placed`,
            // which is then the whole buffer.
            let sink = Sink::list(ScatterList::local(std::mem::take(&mut recv.segments)));
            self.expect(
                sink,
                size,
                AfterRx::Msg {
                    recv,
                    size,
                    data,
                    ack,
                },
            );
        } else if self.unexpected_bytes + size <= UNEXPECTED_LIMIT
            && self.unexpected.len() < UNEXPECTED_MAX_ENTRIES
        {
            self.unexpected_bytes += size;
            self.expect(
                Sink::Buffer {
                    data: vec![0; size],
                    filled: 0,
                },
                size,
                AfterRx::Unexpected { data, ack },
            );
        } else {
            debug!(fid = %self.fid, size, "no receive posted and buffer full: pausing reads");
            self.rx.phase = Phase::Stalled(h);
        }
    }

    /// Reports a receive. `placed` is what the buffer took (`size` when a write with
    /// data consumed it), `size` what arrived.
    pub(super) fn complete_recv(
        &mut self,
        recv: RecvRequest,
        size: usize,
        placed: usize,
        data: Option<u64>,
        write_data: bool,
    ) {
        let mut flags = if write_data {
            CompFlags::RMA | CompFlags::REMOTE_WRITE
        } else {
            CompFlags::MSG | CompFlags::RECV
        };
        if data.is_some() {
            flags |= CompFlags::REMOTE_CQ_DATA;
        }
        let truncated = !write_data && size > placed;
        let mut c = if truncated {
            Completion::error(
                recv.context,
                flags,
                CqError::new(
                    CqErrorKind::Truncated,
                    0,
                    // Truncated: the buffer took all it had room for.
                    format!("message of {size} bytes, receive buffer of {placed} bytes"),
                ),
            )
        } else {
            Completion::ok(recv.context, flags, size)
        };
        if truncated {
            c.len = placed;
        }
        c.data = data.unwrap_or(0);
        self.rep.rx_cq.push(c);
    }

    /// Posts a receive: matches the oldest unexpected message first, else queues it
    /// (and resumes a stalled connection).
    pub(crate) fn post_recv(&mut self, recv: RecvRequest) -> Result<(), Fatal> {
        self.posted.push_back(recv);
        self.match_unexpected()?;
        if let Phase::Stalled(h) = self.rx.phase {
            if !self.posted.is_empty()
                || self.unexpected_bytes + h.size as usize <= UNEXPECTED_LIMIT
            {
                self.rx.phase = Phase::Header;
                self.start_msg(h);
                // Data for it may already be buffered.
                self.read()?;
            }
        }
        Ok(())
    }

    /// Pairs posted receives with buffered messages, oldest first.
    pub(super) fn match_unexpected(&mut self) -> Result<(), Fatal> {
        let mut acked = false;
        while !self.posted.is_empty() && !self.unexpected.is_empty() {
            let (Some(mut recv), Some(u)) = (self.posted.pop_front(), self.unexpected.pop_front())
            else {
                break;
            };
            self.unexpected_bytes -= u.bytes.len();
            let placed = if u.write_data {
                0
            } else {
                let l = ScatterList::local(std::mem::take(&mut recv.segments));
                l.cursor().fill(&u.bytes)
            };
            self.complete_recv(recv, u.size, placed, u.data, u.write_data);
            if let Some(id) = u.ack {
                self.ack(id, Status::Ok, 0);
                acked = true;
            }
        }
        if acked && !self.want_write {
            self.flush()?;
        }
        Ok(())
    }

    /// The CQ data of a placed write: consumes a receive and acks the write, or waits
    /// for one. The initiator's completion waits until the data has consumed a receive
    /// (as RNR holds an RC write-with-immediate): the ACK goes out on the match.
    pub(super) fn deliver_write_data(&mut self, op_id: u64, size: usize, data: u64) {
        match self.posted.pop_front() {
            Some(recv) => {
                self.complete_recv(recv, size, 0, Some(data), true);
                self.ack(op_id, Status::Ok, 0);
            }
            None => self.unexpected.push_back(Unexpected {
                bytes: Vec::new(),
                size,
                data: Some(data),
                ack: Some(op_id),
                write_data: true,
            }),
        }
    }
}
