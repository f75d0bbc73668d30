//! Fabrics commands: Connect, Property Get and Property Set (nvmet's fabrics-cmd.c).

use std::sync::Arc;

use super::ctrl::{Controller, MAX_QUEUE_DEPTH};
use super::queue::{Cmd, CmdError, CmdResult, Outcome};
use super::Shared;
use crate::wire::fabrics::{
    ConnectData, ConnectResponse, FabricsCommand, InvalidParameterLocation, PropertySize,
};
use crate::wire::properties::{CAP, CC, CSTS, VS};
use crate::wire::{Sqe, StatusCode, WireError};

fn parse(cmd: &Cmd<'_>) -> Result<FabricsCommand, CmdError> {
    let bytes = cmd.sqe.to_bytes();
    let view = Sqe::new_checked(&bytes[..]).map_err(CmdError::from)?;
    FabricsCommand::parse(&view).map_err(|e| with_ipo(e, false))
}

/// A Connect failure with the invalid parameter location in DW0.
fn with_ipo(e: WireError, in_data: bool) -> CmdError {
    let dw0 = InvalidParameterLocation::from_error(&e, in_data).map_or(0, |l| l.to_dw0());
    match CmdError::from(e) {
        CmdError::Fail {
            status, location, ..
        } => CmdError::Fail {
            status,
            location: if in_data { None } else { location },
            dw0,
        },
        fatal => fatal,
    }
}

fn ipo(status: StatusCode, in_data: bool, offset: u16) -> CmdError {
    CmdError::Fail {
        status,
        location: (!in_data).then_some(offset),
        dw0: InvalidParameterLocation { in_data, offset }.to_dw0(),
    }
}

/// The first command of a queue, which must be Connect. Returns the controller the
/// queue now belongs to, if it succeeded.
pub(crate) fn connect(
    mut cmd: Cmd<'_>,
    shared: &Arc<Shared>,
    portid: u16,
    depth: u16,
    inline_data: usize,
) -> (Option<Arc<Controller>>, CmdResult) {
    match connect_inner(&mut cmd, shared, portid, depth, inline_data) {
        Ok(ctrl) => {
            let dw0 = ConnectResponse {
                cntlid: ctrl.cntlid,
                authreq: 0,
            }
            .to_dw0();
            (Some(ctrl), Ok(Outcome::Done(dw0.into())))
        }
        Err(e) => (None, Err(e)),
    }
}

fn connect_inner(
    cmd: &mut Cmd<'_>,
    shared: &Arc<Shared>,
    portid: u16,
    depth: u16,
    inline_data: usize,
) -> Result<Arc<Controller>, CmdError> {
    let FabricsCommand::Connect(c) = parse(cmd)? else {
        return Err(StatusCode::CommandSequenceError.into());
    };
    let raw = cmd.xfer.fetch(ConnectData::LEN)?;
    let data = ConnectData::parse(&raw)
        .and_then(|d| d.validate().map(|()| d))
        .map_err(|e| with_ipo(e, true))?;
    if c.qid != cmd.qid {
        return Err(ipo(StatusCode::ConnectInvalidParameters, false, 42));
    }
    if c.sqsize >= MAX_QUEUE_DEPTH || c.sqsize >= depth {
        return Err(ipo(StatusCode::ConnectInvalidParameters, false, 44));
    }
    let subnqn = data.subnqn.as_str();
    let hostnqn = data.hostnqn.as_str();
    let Some(subsys) = shared.subsystem(subnqn, portid) else {
        return Err(ipo(StatusCode::ConnectInvalidParameters, true, 256));
    };
    if !subsys.host_allowed(hostnqn) {
        return Err(ipo(StatusCode::ConnectInvalidHost, true, 512));
    }
    if c.qid == 0 {
        if data.cntlid != ConnectData::DYNAMIC_CNTLID {
            return Err(ipo(StatusCode::ConnectInvalidParameters, true, 16));
        }
        return shared
            .new_controller(subsys, hostnqn, data.hostid, c.kato, inline_data)
            .ok_or_else(|| StatusCode::ConnectControllerBusy.into());
    }
    let Some(ctrl) = shared.controller(subnqn, data.cntlid) else {
        return Err(ipo(StatusCode::ConnectInvalidParameters, true, 16));
    };
    if ctrl.hostnqn != hostnqn || ctrl.hostid != data.hostid {
        return Err(ipo(StatusCode::ConnectInvalidParameters, true, 512));
    }
    if ctrl.subsys.discovery || c.qid > ctrl.state().io_queues {
        return Err(ipo(StatusCode::ConnectInvalidParameters, false, 42));
    }
    if !ctrl.is_ready() {
        return Err(StatusCode::CommandSequenceError.into());
    }
    Ok(ctrl)
}

/// Fabrics commands on a connected queue.
pub(crate) fn handle(cmd: Cmd<'_>, ctrl: &Controller) -> CmdResult {
    let parsed = parse(&cmd)?;
    if cmd.qid != 0 {
        // I/O queues take no Fabrics command after Connect.
        return Err(CmdError::at(StatusCode::InvalidOpcode, 4));
    }
    match parsed {
        FabricsCommand::Connect(_) => Err(StatusCode::CommandSequenceError.into()),
        FabricsCommand::PropertyGet(p) => {
            cmd.xfer.none()?;
            let value = match (p.offset, p.size) {
                (CAP, PropertySize::Eight) => ctrl.cap().0,
                (VS, PropertySize::Four) => u64::from(Controller::vs().0),
                (CC, PropertySize::Four) => u64::from(ctrl.state().cc.0),
                (CSTS, PropertySize::Four) => u64::from(ctrl.state().csts.0),
                (CAP | VS | CC | CSTS, _) => {
                    return Err(CmdError::at(StatusCode::InvalidField, 40))
                }
                _ => return Err(CmdError::at(StatusCode::InvalidField, 44)),
            };
            Ok(Outcome::Done(value))
        }
        FabricsCommand::PropertySet(p) => {
            cmd.xfer.none()?;
            match (p.offset, p.size) {
                (CC, PropertySize::Four) => {
                    ctrl.set_cc(p.value as u32);
                    Ok(Outcome::Done(0))
                }
                (CC, _) => Err(CmdError::at(StatusCode::InvalidField, 40)),
                _ => Err(CmdError::at(StatusCode::InvalidField, 44)),
            }
        }
    }
}
