//! The IB CM state machine of one device (its QP1), sans-IO: MADs and the time in,
//! MADs to send, the next timer and events for the connection's owners out.
//!
//! Active side: `REQ_SENT` (REQ retransmitted every `remote_cm_response_timeout`
//! the REQ announced, plus the MRA's service timeout once the peer sent one, at most
//! `max_cm_retries` times) → REP received: RTU sent, `ESTABLISHED`. A REJ ends the
//! attempt. Passive side: REQ → `REQ_RCVD` (the owner decides; a repeated REQ is
//! answered with an MRA) → accept: REP sent, retransmitted every
//! `local_cm_response_timeout` of the REQ → RTU (or any data on the QP, which the
//! owner reports with [`Engine::established`]) → `ESTABLISHED`. Either side:
//! DREQ (retransmitted as the REQ) → DREP → timewait; a DREQ received is answered
//! with a DREP, also when repeated in timewait. Bounded: [`MAX_CONNS`]
//! connections, [`MAX_PENDING`] undecided requests per listener (more are rejected
//! with `NO_RESOURCES`), [`MAX_TIMEWAIT`] timewait entries (the oldest goes first),
//! each for [`TIMEWAIT`]. Every dropped message is counted ([`Stats`]).

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::wire::*;

/// Connections (any state but timewait) an engine holds at most.
pub const MAX_CONNS: usize = 4096;
/// Requests a listener holds undecided at most.
pub const MAX_PENDING: usize = 128;
/// Longest a request waits for the owner's decision before it is rejected (timeout).
pub const PENDING_AGE: Duration = Duration::from_secs(10);
/// Timewait entries at most.
pub const MAX_TIMEWAIT: usize = 1024;
/// How long a closed connection stays in timewait (answering a repeated DREQ).
pub const TIMEWAIT: Duration = Duration::from_secs(1);
/// Outgoing MADs queued at most (more are dropped and counted).
pub const MAX_OUT: usize = 1024;
/// Events queued at most.
pub const MAX_EVENTS: usize = 4096;

/// Time code this side announces for its own answers (`local_cm_response_timeout`
/// of its REQs: 16 = 268 ms; the peer retransmits its REP at that interval).
pub const LOCAL_RESPONSE_TIMEOUT: u8 = 16;
/// Time code this side asks the peer to answer a REQ or DREQ within (18 = 1.07 s;
/// rdma_cm's 20 is 4.3 s).
pub const REMOTE_RESPONSE_TIMEOUT: u8 = 18;
/// CM retries announced and used (rdma_cm's 15).
pub const MAX_CM_RETRIES: u8 = 15;
/// Service timeout of the MRAs this side sends for requests its owner has not
/// decided on (24 = 68.7 s).
pub const MRA_SERVICE_TIMEOUT: u8 = 24;

/// What a connection's owner learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmEvent {
    /// A REQ for a listener's service: decide with [`Engine::accept`] or
    /// [`Engine::reject`].
    Request {
        /// The listener's token.
        listener: u64,
        /// The new connection's communication ID.
        conn: u32,
        /// Where the REQ came from.
        peer: Ipv4Addr,
        /// The REQ.
        req: Box<Req>,
    },
    /// Active side: the REP arrived (the RTU is sent).
    Established {
        /// The owner's token.
        owner: u64,
        /// The communication ID.
        conn: u32,
        /// The REP.
        rep: Box<Rep>,
    },
    /// Passive side: the RTU arrived.
    Ready {
        /// The owner's token.
        owner: u64,
        /// The communication ID.
        conn: u32,
    },
    /// A REJ arrived (or no answer came: reason [`rej::TIMEOUT`], no data).
    Rejected {
        /// The owner's token.
        owner: u64,
        /// The communication ID.
        conn: u32,
        /// The REJ's reason.
        reason: u16,
        /// The REJ's private data.
        data: Vec<u8>,
    },
    /// The peer disconnected (its DREQ, answered), or a DREQ this side sent went
    /// unanswered, or the REP this side sent did.
    Disconnected {
        /// The owner's token.
        owner: u64,
        /// The communication ID.
        conn: u32,
        /// The DREQ's private data (empty otherwise).
        data: Vec<u8>,
    },
}

/// Counters of an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// MADs received (every QP1 packet handed to the engine).
    pub received: u64,
    /// MADs sent.
    pub sent: u64,
    /// MADs that did not decode (short, foreign class, unknown attribute, bad field).
    pub malformed: u64,
    /// Messages for no connection, or whose communication IDs do not match.
    pub unmatched: u64,
    /// Messages not expected in the connection's state (late duplicates).
    pub unexpected: u64,
    /// REQs, REPs and DREQs sent again after a timeout.
    pub retransmits: u64,
    /// Requests rejected for want of room.
    pub overflow: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ReqSent,
    ReqRcvd,
    RepSent,
    Established,
    DreqSent,
}

#[derive(Debug)]
struct Conn {
    state: State,
    owner: u64,
    /// For a passive connection: the listener it came to.
    listener: Option<u64>,
    peer: Ipv4Addr,
    remote_comm_id: u32,
    remote_qpn: u32,
    tid: u64,
    /// What is retransmitted on timeout.
    last: Option<CmMad>,
    retries_left: u8,
    interval: Duration,
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct TimeWait {
    until: Instant,
    peer: Ipv4Addr,
    local_comm_id: u32,
    remote_comm_id: u32,
    /// Answer to a repeated message (a DREP, or the REJ that ended it).
    answer: Option<CmMad>,
}

/// Parameters of a connection this side requests.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// Token of the connection's owner (its events carry it).
    pub owner: u64,
    /// The peer's address.
    pub peer: Ipv4Addr,
    /// The service to connect to ([`service_id`]).
    pub service_id: u64,
    /// This side's QPN.
    pub qpn: u32,
    /// This side's starting PSN.
    pub psn: u32,
    /// Path MTU in bytes.
    pub mtu: u32,
    /// RDMA READs this side answers at once.
    pub responder_resources: u8,
    /// RDMA READs this side has outstanding at once.
    pub initiator_depth: u8,
    /// Up to 92 bytes (rdma_cm: its 36-byte header and 56 bytes of the application's).
    pub private_data: Vec<u8>,
}

/// Parameters of an accepted connection.
#[derive(Debug, Clone)]
pub struct AcceptParams {
    /// Token of the connection's owner from now on.
    pub owner: u64,
    /// This side's QPN.
    pub qpn: u32,
    /// This side's starting PSN.
    pub psn: u32,
    /// RDMA READs this side answers at once.
    pub responder_resources: u8,
    /// RDMA READs this side has outstanding at once.
    pub initiator_depth: u8,
    /// Up to 196 bytes.
    pub private_data: Vec<u8>,
}

/// Why an engine call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmError {
    /// No such connection (gone: timed out, rejected, closed).
    NoConnection,
    /// The connection is not in a state that allows the call.
    WrongState,
    /// Private data longer than the message carries.
    TooLong {
        /// Bytes given.
        len: usize,
        /// Bytes the message carries.
        max: usize,
    },
    /// No room for another connection.
    Full,
}

impl std::fmt::Display for CmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CmError::NoConnection => write!(f, "no such IB CM connection (it ended)"),
            CmError::WrongState => write!(f, "the IB CM connection is in another state"),
            CmError::TooLong { len, max } => write!(
                f,
                "connection data of {len} bytes; IB CM carries at most {max} here"
            ),
            CmError::Full => write!(f, "too many IB CM connections"),
        }
    }
}

impl std::error::Error for CmError {}

/// The CM of one device.
#[derive(Debug)]
pub struct Engine {
    ip: Ipv4Addr,
    guid: u64,
    conns: HashMap<u32, Conn>,
    /// Passive connections by (peer, the peer's communication ID): repeated REQs.
    by_remote: HashMap<(Ipv4Addr, u32), u32>,
    listeners: HashMap<u64, u64>,
    timewait: VecDeque<TimeWait>,
    out: VecDeque<(Ipv4Addr, CmMad)>,
    events: VecDeque<CmEvent>,
    next_tid: u32,
    tid_hi: u32,
    stats: Stats,
}

impl Engine {
    /// The CM of the device on `ip`.
    pub fn new(ip: Ipv4Addr) -> Engine {
        Engine {
            ip,
            guid: 0x0200_00FF_0000_0000 | u64::from(u32::from(ip)),
            conns: HashMap::new(),
            by_remote: HashMap::new(),
            listeners: HashMap::new(),
            timewait: VecDeque::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            next_tid: rand::random(),
            tid_hi: rand::random(),
            stats: Stats::default(),
        }
    }

    /// The device's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Connections held (not counting timewait), and timewait entries.
    pub fn sizes(&self) -> (usize, usize) {
        (self.conns.len(), self.timewait.len())
    }

    /// Requests for `service_id` go to `listener` (a token the caller chooses).
    /// `false` if another listener has the service.
    pub fn listen(&mut self, service_id: u64, listener: u64) -> bool {
        match self.listeners.get(&service_id) {
            Some(&l) if l != listener => false,
            _ => {
                self.listeners.insert(service_id, listener);
                true
            }
        }
    }

    /// Stops listening; undecided requests of the listener are rejected.
    pub fn unlisten(&mut self, service_id: u64, listener: u64, now: Instant) {
        if self.listeners.get(&service_id) == Some(&listener) {
            self.listeners.remove(&service_id);
        }
        let ids: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.listener == Some(listener) && c.state == State::ReqRcvd)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let _ = self.reject(id, rej::CONSUMER_DEFINED, &[], now);
        }
    }

    fn tid(&mut self) -> u64 {
        self.next_tid = self.next_tid.wrapping_add(1);
        u64::from(self.tid_hi) << 32 | u64::from(self.next_tid)
    }

    fn new_comm_id(&self) -> u32 {
        loop {
            let id: u32 = rand::random();
            if id != 0
                && !self.conns.contains_key(&id)
                && !self.timewait.iter().any(|t| t.local_comm_id == id)
            {
                return id;
            }
        }
    }

    fn push_out(&mut self, to: Ipv4Addr, mad: CmMad) {
        if self.out.len() >= MAX_OUT {
            self.out.pop_front();
        }
        self.out.push_back((to, mad));
    }

    fn push_event(&mut self, ev: CmEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    /// The next MAD to send and its destination.
    pub fn poll_transmit(&mut self) -> Option<(Ipv4Addr, CmMad)> {
        let r = self.out.pop_front();
        if r.is_some() {
            self.stats.sent += 1;
        }
        r
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<CmEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = self.conns.values().filter_map(|c| c.deadline).min();
        let t = self.timewait.front().map(|t| t.until);
        match (c, t) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sends a REQ; returns the connection's communication ID.
    pub fn connect(&mut self, p: ConnectParams, now: Instant) -> Result<u32, CmError> {
        if p.private_data.len() > REQ_PDATA {
            return Err(CmError::TooLong {
                len: p.private_data.len(),
                max: REQ_PDATA,
            });
        }
        if self.conns.len() >= MAX_CONNS {
            return Err(CmError::Full);
        }
        let id = self.new_comm_id();
        let mut pd = [0u8; REQ_PDATA];
        pd[..p.private_data.len()].copy_from_slice(&p.private_data);
        let req = Req {
            local_comm_id: id,
            service_id: p.service_id,
            local_ca_guid: self.guid,
            local_qkey: 0,
            local_qpn: p.qpn,
            responder_resources: p.responder_resources,
            initiator_depth: p.initiator_depth,
            remote_cm_response_timeout: REMOTE_RESPONSE_TIMEOUT,
            transport_service_type: 0,
            end_to_end_flow_control: false,
            starting_psn: p.psn,
            local_cm_response_timeout: LOCAL_RESPONSE_TIMEOUT,
            retry_count: 7,
            pkey: PKEY_DEFAULT,
            path_mtu: mtu_code(p.mtu),
            rnr_retry_count: 7,
            max_cm_retries: MAX_CM_RETRIES,
            srq: false,
            primary_local_lid: 0xFFFF,
            primary_remote_lid: 0xFFFF,
            primary_local_gid: gid_of(self.ip),
            primary_remote_gid: gid_of(p.peer),
            primary_flow_label: 0,
            primary_packet_rate: 3,
            primary_traffic_class: 0,
            primary_hop_limit: 64,
            primary_sl: 0,
            primary_subnet_local: false,
            primary_local_ack_timeout: 14,
            private_data: pd,
        };
        let tid = self.tid();
        let mad = CmMad {
            tid,
            msg: CmMessage::Req(Box::new(req)),
        };
        let interval = Duration::from_millis(timeout_ms(REMOTE_RESPONSE_TIMEOUT));
        self.conns.insert(
            id,
            Conn {
                state: State::ReqSent,
                owner: p.owner,
                listener: None,
                peer: p.peer,
                remote_comm_id: 0,
                remote_qpn: 0,
                tid,
                last: Some(mad.clone()),
                retries_left: MAX_CM_RETRIES,
                interval,
                deadline: Some(now + interval),
            },
        );
        self.push_out(p.peer, mad);
        Ok(id)
    }

    /// Accepts a request: sends the REP.
    pub fn accept(&mut self, conn: u32, p: AcceptParams, now: Instant) -> Result<(), CmError> {
        if p.private_data.len() > REP_PDATA {
            return Err(CmError::TooLong {
                len: p.private_data.len(),
                max: REP_PDATA,
            });
        }
        let guid = self.guid;
        let c = self.conns.get_mut(&conn).ok_or(CmError::NoConnection)?;
        if c.state != State::ReqRcvd {
            return Err(CmError::WrongState);
        }
        let mad = CmMad {
            tid: c.tid,
            msg: CmMessage::Rep(Box::new(Rep {
                local_comm_id: conn,
                remote_comm_id: c.remote_comm_id,
                local_qkey: 0,
                local_qpn: p.qpn,
                starting_psn: p.psn,
                responder_resources: p.responder_resources,
                initiator_depth: p.initiator_depth,
                target_ack_delay: 15,
                failover_accepted: 0,
                end_to_end_flow_control: false,
                rnr_retry_count: 7,
                srq: false,
                local_ca_guid: guid,
                private_data: p.private_data,
            })),
        };
        c.state = State::RepSent;
        c.owner = p.owner;
        c.last = Some(mad.clone());
        c.deadline = Some(now + c.interval);
        let peer = c.peer;
        self.push_out(peer, mad);
        Ok(())
    }

    /// Rejects a request (or, on the active side, a REP not yet answered) with
    /// `reason` and private data (at most 148 bytes).
    pub fn reject(
        &mut self,
        conn: u32,
        reason: u16,
        data: &[u8],
        now: Instant,
    ) -> Result<(), CmError> {
        if data.len() > REJ_PDATA {
            return Err(CmError::TooLong {
                len: data.len(),
                max: REJ_PDATA,
            });
        }
        let c = self.conns.get(&conn).ok_or(CmError::NoConnection)?;
        let rejected = match c.state {
            State::ReqRcvd => 0,
            State::ReqSent | State::RepSent => 2,
            _ => return Err(CmError::WrongState),
        };
        let c = self.remove(conn).ok_or(CmError::NoConnection)?;
        let mad = CmMad {
            tid: c.tid,
            msg: CmMessage::Rej {
                local_comm_id: conn,
                remote_comm_id: c.remote_comm_id,
                message_rejected: rejected,
                reason,
                ari: Vec::new(),
                private_data: data.to_vec(),
            },
        };
        if c.remote_comm_id != 0 {
            self.push_out(c.peer, mad.clone());
            self.enter_timewait(&c, conn, Some(mad), now);
        } else if c.state == State::ReqSent {
            // Nothing from the peer yet: tell it the request is withdrawn.
            self.push_out(c.peer, mad);
        }
        Ok(())
    }

    /// Ends a connection from this side: DREQ (with `data`, at most 220 bytes) on an
    /// established one; REJ (timeout) on one being set up. Its owner hears nothing
    /// more except, for an established one, nothing at all: the caller already knows.
    pub fn disconnect(&mut self, conn: u32, data: &[u8], now: Instant) -> Result<(), CmError> {
        let tid = self.tid();
        let c = self.conns.get_mut(&conn).ok_or(CmError::NoConnection)?;
        match c.state {
            State::Established => {
                let mad = CmMad {
                    tid,
                    msg: CmMessage::Dreq {
                        local_comm_id: conn,
                        remote_comm_id: c.remote_comm_id,
                        remote_qpn: c.remote_qpn,
                        private_data: data[..data.len().min(DREQ_PDATA)].to_vec(),
                    },
                };
                c.state = State::DreqSent;
                c.tid = tid;
                c.last = Some(mad.clone());
                c.retries_left = MAX_CM_RETRIES;
                c.interval = Duration::from_millis(timeout_ms(REMOTE_RESPONSE_TIMEOUT));
                c.deadline = Some(now + c.interval);
                c.owner = 0;
                let peer = c.peer;
                self.push_out(peer, mad);
                Ok(())
            }
            State::DreqSent => Ok(()),
            State::ReqSent | State::ReqRcvd | State::RepSent => {
                self.reject(conn, rej::TIMEOUT, &[], now)
            }
        }
    }

    /// The owner saw the connection work (data arrived on the QP) before the RTU:
    /// as an RTU (IBTA's "communication established").
    pub fn established(&mut self, conn: u32) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.state == State::RepSent {
                c.state = State::Established;
                c.deadline = None;
                c.last = None;
            }
        }
    }

    fn remove(&mut self, conn: u32) -> Option<Conn> {
        let c = self.conns.remove(&conn)?;
        if c.listener.is_some() {
            self.by_remote.remove(&(c.peer, c.remote_comm_id));
        }
        Some(c)
    }

    fn enter_timewait(&mut self, c: &Conn, local: u32, answer: Option<CmMad>, now: Instant) {
        if self.timewait.len() >= MAX_TIMEWAIT {
            self.timewait.pop_front();
        }
        self.timewait.push_back(TimeWait {
            until: now + TIMEWAIT,
            peer: c.peer,
            local_comm_id: local,
            remote_comm_id: c.remote_comm_id,
            answer,
        });
    }

    /// Runs the timers: retransmissions, their exhaustion, undecided requests that
    /// waited too long, timewait's end.
    pub fn handle_timeout(&mut self, now: Instant) {
        while self.timewait.front().is_some_and(|t| t.until <= now) {
            self.timewait.pop_front();
        }
        let due: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.state == State::ReqRcvd {
                // The owner did not decide in time.
                let _ = self.reject(id, rej::TIMEOUT, &[], now);
                continue;
            }
            if c.retries_left > 0 {
                c.retries_left -= 1;
                c.deadline = Some(now + c.interval);
                if let Some(m) = c.last.clone() {
                    let peer = c.peer;
                    self.stats.retransmits += 1;
                    self.push_out(peer, m);
                }
                continue;
            }
            let Some(c) = self.remove(id) else { continue };
            match c.state {
                State::ReqSent => {
                    // As Linux: a REQ that timed out is withdrawn with a REJ.
                    let mad = CmMad {
                        tid: c.tid,
                        msg: CmMessage::Rej {
                            local_comm_id: id,
                            remote_comm_id: c.remote_comm_id,
                            message_rejected: 2,
                            reason: rej::TIMEOUT,
                            ari: Vec::new(),
                            private_data: Vec::new(),
                        },
                    };
                    self.push_out(c.peer, mad);
                    self.push_event(CmEvent::Rejected {
                        owner: c.owner,
                        conn: id,
                        reason: rej::TIMEOUT,
                        data: Vec::new(),
                    });
                }
                State::RepSent => {
                    let mad = CmMad {
                        tid: c.tid,
                        msg: CmMessage::Rej {
                            local_comm_id: id,
                            remote_comm_id: c.remote_comm_id,
                            message_rejected: 1,
                            reason: rej::TIMEOUT,
                            ari: Vec::new(),
                            private_data: Vec::new(),
                        },
                    };
                    self.push_out(c.peer, mad);
                    self.push_event(CmEvent::Disconnected {
                        owner: c.owner,
                        conn: id,
                        data: Vec::new(),
                    });
                }
                State::DreqSent => self.enter_timewait(&c, id, None, now),
                State::Established | State::ReqRcvd => {}
            }
        }
    }

    /// Handles a QP1 packet (BTH through ICRC, the ICRC verified) from `src`.
    pub fn handle_packet(&mut self, src: Ipv4Addr, packet: &[u8], now: Instant) {
        match gsi_payload(packet) {
            Ok((mad, _)) => self.handle_mad(src, mad, now),
            Err(_) => {
                self.stats.received += 1;
                self.stats.malformed += 1;
            }
        }
    }

    /// Handles a MAD that arrived on QP1 from `src`.
    pub fn handle_mad(&mut self, src: Ipv4Addr, mad: &[u8], now: Instant) {
        self.stats.received += 1;
        let mad = match CmMad::decode(mad) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        let tid = mad.tid;
        match mad.msg {
            CmMessage::Req(req) => self.on_req(src, tid, req, now),
            msg => {
                let local = msg.remote_comm_id();
                let remote = msg.local_comm_id();
                let Some(c) = self.conns.get_mut(&local) else {
                    self.on_unmatched(src, tid, local, remote, msg);
                    return;
                };
                if c.peer != src || (c.remote_comm_id != 0 && c.remote_comm_id != remote) {
                    self.stats.unmatched += 1;
                    return;
                }
                self.on_conn_msg(local, tid, msg, now);
            }
        }
    }

    fn on_unmatched(&mut self, src: Ipv4Addr, tid: u64, local: u32, remote: u32, msg: CmMessage) {
        let tw = self
            .timewait
            .iter()
            .find(|t| t.local_comm_id == local && t.peer == src && t.remote_comm_id == remote);
        match (msg, tw) {
            (CmMessage::Dreq { .. }, Some(_)) => {
                // Our DREP got lost: say it again (with the DREQ's transaction ID).
                let drep = CmMad {
                    tid,
                    msg: CmMessage::Drep {
                        local_comm_id: local,
                        remote_comm_id: remote,
                        private_data: Vec::new(),
                    },
                };
                self.push_out(src, drep);
            }
            (CmMessage::Rep(_), Some(t)) => {
                if let Some(a) = t.answer.clone() {
                    self.push_out(src, a);
                }
            }
            (CmMessage::Drep { .. } | CmMessage::Rtu { .. } | CmMessage::Rej { .. }, Some(_)) => {
                self.stats.unexpected += 1;
            }
            (CmMessage::Dreq { .. }, None) => {
                // Linux answers a DREQ for an unknown connection with a DREP, so the
                // peer stops retrying.
                self.stats.unmatched += 1;
                let drep = CmMad {
                    tid,
                    msg: CmMessage::Drep {
                        local_comm_id: local.max(1),
                        remote_comm_id: remote,
                        private_data: Vec::new(),
                    },
                };
                self.push_out(src, drep);
            }
            _ => self.stats.unmatched += 1,
        }
    }

    fn on_req(&mut self, src: Ipv4Addr, tid: u64, req: Box<Req>, now: Instant) {
        // A repeated REQ?
        if let Some(&id) = self.by_remote.get(&(src, req.local_comm_id)) {
            let Some(c) = self.conns.get(&id) else {
                self.stats.unexpected += 1;
                return;
            };
            match c.state {
                State::ReqRcvd => {
                    let mra = CmMad {
                        tid: c.tid,
                        msg: CmMessage::Mra {
                            local_comm_id: id,
                            remote_comm_id: c.remote_comm_id,
                            message_mraed: 0,
                            service_timeout: MRA_SERVICE_TIMEOUT,
                            private_data: Vec::new(),
                        },
                    };
                    self.push_out(src, mra);
                }
                State::RepSent => {
                    if let Some(m) = c.last.clone() {
                        self.push_out(src, m);
                    }
                }
                _ => self.stats.unexpected += 1,
            }
            return;
        }
        if let Some(t) = self
            .timewait
            .iter()
            .find(|t| t.peer == src && t.remote_comm_id == req.local_comm_id)
        {
            let answer = t.answer.clone().unwrap_or(CmMad {
                tid,
                msg: CmMessage::Rej {
                    local_comm_id: t.local_comm_id,
                    remote_comm_id: req.local_comm_id,
                    message_rejected: 0,
                    reason: rej::STALE_CONN,
                    ari: Vec::new(),
                    private_data: Vec::new(),
                },
            });
            self.push_out(src, answer);
            return;
        }
        let refuse = |reason: u16| CmMad {
            tid,
            msg: CmMessage::Rej {
                local_comm_id: rand::random::<u32>() | 1,
                remote_comm_id: req.local_comm_id,
                message_rejected: 0,
                reason,
                ari: Vec::new(),
                private_data: Vec::new(),
            },
        };
        let Some(&listener) = self.listeners.get(&req.service_id) else {
            self.stats.unmatched += 1;
            self.push_out(src, refuse(rej::INVALID_SERVICE_ID));
            return;
        };
        if req.transport_service_type != 0 {
            self.push_out(src, refuse(rej::INVALID_TRANSPORT_TYPE));
            return;
        }
        let pending = self
            .conns
            .values()
            .filter(|c| c.listener == Some(listener) && c.state == State::ReqRcvd)
            .count();
        if pending >= MAX_PENDING || self.conns.len() >= MAX_CONNS {
            self.stats.overflow += 1;
            self.push_out(src, refuse(rej::NO_RESOURCES));
            return;
        }
        let id = self.new_comm_id();
        let interval = Duration::from_millis(timeout_ms(req.local_cm_response_timeout));
        self.conns.insert(
            id,
            Conn {
                state: State::ReqRcvd,
                owner: 0,
                listener: Some(listener),
                peer: src,
                remote_comm_id: req.local_comm_id,
                remote_qpn: req.local_qpn,
                tid,
                last: None,
                retries_left: req.max_cm_retries.min(MAX_CM_RETRIES),
                interval,
                deadline: Some(now + PENDING_AGE),
            },
        );
        self.by_remote.insert((src, req.local_comm_id), id);
        self.push_event(CmEvent::Request {
            listener,
            conn: id,
            peer: src,
            req,
        });
    }

    fn on_conn_msg(&mut self, id: u32, tid: u64, msg: CmMessage, now: Instant) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match (c.state, msg) {
            (State::ReqSent, CmMessage::Rep(rep)) => {
                c.remote_comm_id = rep.local_comm_id;
                c.remote_qpn = rep.local_qpn;
                c.state = State::Established;
                c.deadline = None;
                let rtu = CmMad {
                    tid: c.tid,
                    msg: CmMessage::Rtu {
                        local_comm_id: id,
                        remote_comm_id: rep.local_comm_id,
                        private_data: Vec::new(),
                    },
                };
                // Kept: a repeated REP (our RTU lost) is answered with it again.
                c.last = Some(rtu.clone());
                let (peer, owner) = (c.peer, c.owner);
                self.push_out(peer, rtu);
                self.push_event(CmEvent::Established {
                    owner,
                    conn: id,
                    rep,
                });
            }
            (State::Established, CmMessage::Rep(_)) => {
                if let Some(m) = c.last.clone().filter(|m| m.msg.attr() == AttrId::Rtu) {
                    let peer = c.peer;
                    self.push_out(peer, m);
                } else {
                    self.stats.unexpected += 1;
                }
            }
            (
                State::ReqSent,
                CmMessage::Mra {
                    service_timeout,
                    message_mraed: 0,
                    ..
                },
            ) => {
                // The peer needs longer: wait its service timeout plus ours, once more.
                let wait = Duration::from_millis(
                    timeout_ms(service_timeout) + timeout_ms(REMOTE_RESPONSE_TIMEOUT),
                );
                c.deadline = Some(now + wait);
            }
            (State::RepSent, CmMessage::Mra { .. }) => {
                c.deadline = Some(now + c.interval * 4);
            }
            (
                State::ReqSent | State::RepSent,
                CmMessage::Rej {
                    reason,
                    private_data,
                    ..
                },
            ) => {
                let state = c.state;
                if let Some(c) = self.remove(id) {
                    let ev = if state == State::ReqSent {
                        CmEvent::Rejected {
                            owner: c.owner,
                            conn: id,
                            reason,
                            data: private_data,
                        }
                    } else {
                        CmEvent::Disconnected {
                            owner: c.owner,
                            conn: id,
                            data: Vec::new(),
                        }
                    };
                    self.push_event(ev);
                }
            }
            (State::RepSent, CmMessage::Rtu { .. }) => {
                c.state = State::Established;
                c.deadline = None;
                c.last = None;
                let owner = c.owner;
                self.push_event(CmEvent::Ready { owner, conn: id });
            }
            (
                State::Established | State::RepSent | State::DreqSent,
                CmMessage::Dreq { private_data, .. },
            ) => {
                let state = c.state;
                // A DREP answers with the DREQ's transaction ID (as Linux's cm.c).
                let drep = CmMad {
                    tid,
                    msg: CmMessage::Drep {
                        local_comm_id: id,
                        remote_comm_id: c.remote_comm_id,
                        private_data: Vec::new(),
                    },
                };
                let Some(c) = self.remove(id) else { return };
                self.push_out(c.peer, drep.clone());
                self.enter_timewait(&c, id, Some(drep), now);
                if state != State::DreqSent {
                    self.push_event(CmEvent::Disconnected {
                        owner: c.owner,
                        conn: id,
                        data: private_data,
                    });
                }
            }
            (State::DreqSent, CmMessage::Drep { .. }) => {
                if let Some(c) = self.remove(id) {
                    self.enter_timewait(&c, id, None, now);
                }
            }
            (State::Established | State::DreqSent, CmMessage::Rej { .. }) => {
                // A REJ for an established connection (the peer timed out on its
                // side): the connection is gone.
                let state = c.state;
                if let Some(c) = self.remove(id) {
                    self.enter_timewait(&c, id, None, now);
                    if state == State::Established {
                        self.push_event(CmEvent::Disconnected {
                            owner: c.owner,
                            conn: id,
                            data: Vec::new(),
                        });
                    }
                }
            }
            _ => self.stats.unexpected += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn params(owner: u64) -> ConnectParams {
        ConnectParams {
            owner,
            peer: B,
            service_id: service_id(7174),
            qpn: 0x11,
            psn: 0x100,
            mtu: 1024,
            responder_resources: 1,
            initiator_depth: 1,
            private_data: vec![1, 2, 3],
        }
    }

    /// Moves every MAD `from` queued to `to` (dropping those `lose` says).
    fn pump(from: &mut Engine, to: &mut Engine, now: Instant, lose: impl Fn(&CmMad) -> bool) {
        while let Some((dst, mad)) = from.poll_transmit() {
            assert_eq!(dst, to.ip());
            if !lose(&mad) {
                to.handle_mad(from.ip(), &mad.encode(), now);
            }
        }
    }

    #[test]
    fn connect_lost_rep_retransmitted_then_disconnect() {
        let t0 = Instant::now();
        let (mut a, mut b) = (Engine::new(A), Engine::new(B));
        assert!(b.listen(service_id(7174), 99));
        let id = a.connect(params(5), t0).unwrap();
        pump(&mut a, &mut b, t0, |_| false);
        let Some(CmEvent::Request {
            listener,
            conn,
            req,
            ..
        }) = b.poll_event()
        else {
            panic!("no request")
        };
        assert_eq!((listener, req.local_comm_id, req.local_qpn), (99, id, 0x11));
        let acc = AcceptParams {
            owner: 7,
            qpn: 0x22,
            psn: 0x200,
            responder_resources: 1,
            initiator_depth: 1,
            private_data: b"ok".to_vec(),
        };
        b.accept(conn, acc, t0).unwrap();
        // The REP is lost.
        pump(&mut b, &mut a, t0, |m| m.msg.attr() == AttrId::Rep);
        assert_eq!(a.poll_event(), None);
        // B retransmits after the REQ's local_cm_response_timeout.
        let due = b.poll_timeout().unwrap();
        assert_eq!(
            due - t0,
            Duration::from_millis(timeout_ms(LOCAL_RESPONSE_TIMEOUT))
        );
        b.handle_timeout(due);
        assert_eq!(b.stats().retransmits, 1);
        pump(&mut b, &mut a, due, |_| false);
        let Some(CmEvent::Established { owner, rep, .. }) = a.poll_event() else {
            panic!("no REP")
        };
        assert_eq!(
            (owner, rep.local_qpn, &rep.private_data[..2]),
            (5, 0x22, &b"ok"[..])
        );
        pump(&mut a, &mut b, due, |_| false);
        assert_eq!(b.poll_event(), Some(CmEvent::Ready { owner: 7, conn }));
        // B disconnects with a reason byte; A answers and hears it.
        b.disconnect(conn, &[3], due).unwrap();
        pump(&mut b, &mut a, due, |_| false);
        match a.poll_event() {
            Some(CmEvent::Disconnected { owner: 5, data, .. }) => assert_eq!(data[0], 3),
            other => panic!("{other:?}"),
        }
        pump(&mut a, &mut b, due, |_| false);
        assert_eq!(a.sizes(), (0, 1));
        assert_eq!(b.sizes(), (0, 1));
        // Timewait ends.
        a.handle_timeout(due + TIMEWAIT);
        assert_eq!(a.sizes(), (0, 0));
        assert_eq!(a.stats().unmatched + b.stats().unmatched, 0);
    }

    #[test]
    fn unanswered_req_gives_up_after_its_retries_with_a_rej() {
        let mut now = Instant::now();
        let mut a = Engine::new(A);
        let id = a.connect(params(5), now).unwrap();
        let mut sent = 0;
        while a.poll_transmit().is_some() {
            sent += 1;
        }
        for _ in 0..100 {
            let Some(t) = a.poll_timeout() else { break };
            now = t;
            a.handle_timeout(now);
            while let Some((_, m)) = a.poll_transmit() {
                sent += 1;
                if let CmMessage::Rej { reason, .. } = m.msg {
                    assert_eq!(reason, rej::TIMEOUT);
                }
            }
        }
        // The REQ, MAX_CM_RETRIES retransmissions, the REJ that withdraws it.
        assert_eq!(sent, 1 + usize::from(MAX_CM_RETRIES) + 1);
        assert_eq!(
            a.poll_event(),
            Some(CmEvent::Rejected {
                owner: 5,
                conn: id,
                reason: rej::TIMEOUT,
                data: vec![]
            })
        );
        assert_eq!(a.sizes(), (0, 0));
    }

    #[test]
    fn mra_extends_the_wait_and_timewait_is_bounded() {
        let t0 = Instant::now();
        let (mut a, mut b) = (Engine::new(A), Engine::new(B));
        b.listen(service_id(7174), 1);
        a.connect(params(5), t0).unwrap();
        let (_, req) = a.poll_transmit().unwrap();
        b.handle_mad(A, &req.encode(), t0);
        // The same REQ again while B's owner has not decided: an MRA.
        b.handle_mad(A, &req.encode(), t0);
        let (_, mra) = b.poll_transmit().unwrap();
        assert_eq!(mra.msg.attr(), AttrId::Mra);
        a.handle_mad(B, &mra.encode(), t0);
        let wait = a.poll_timeout().unwrap() - t0;
        assert!(wait > Duration::from_secs(60), "{wait:?}");

        // Timewait holds at most MAX_TIMEWAIT entries: the oldest goes first.
        let mut e = Engine::new(A);
        for i in 0..MAX_TIMEWAIT as u32 + 10 {
            let c = Conn {
                state: State::Established,
                owner: 0,
                listener: None,
                peer: B,
                remote_comm_id: i + 1,
                remote_qpn: 0,
                tid: 0,
                last: None,
                retries_left: 0,
                interval: Duration::ZERO,
                deadline: None,
            };
            e.enter_timewait(&c, i + 1, None, t0);
        }
        assert_eq!(e.sizes(), (0, MAX_TIMEWAIT));
    }

    #[test]
    fn garbage_is_counted_never_a_panic() {
        let now = Instant::now();
        let mut b = Engine::new(B);
        b.listen(service_id(1), 1);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..600 {
            let mut m = vec![0u8; len % 300];
            for byte in m.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            if m.len() >= 4 && len % 2 == 0 {
                m[..4].copy_from_slice(&[1, 7, 2, 3]); // CM header, random rest
            }
            b.handle_mad(A, &m, now);
            b.handle_packet(A, &m, now);
        }
        let s = b.stats();
        assert_eq!(s.received, 1200);
        assert!(s.malformed + s.unmatched + s.unexpected > 0);
        assert!(b.sizes().0 <= MAX_CONNS);
    }
}
