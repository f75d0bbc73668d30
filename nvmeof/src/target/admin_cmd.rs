//! Admin commands: Identify, Get/Set Features, Get Log Page, Keep Alive,
//! Asynchronous Event Request (nvmet's admin-cmd.c and discovery.c's admin half).

use super::ctrl::{Controller, MAX_IO_QUEUES};
use super::queue::{Cmd, CmdError, CmdResult, Outcome};
use super::subsys::MAX_NSID;
use super::Shared;
use crate::wire::identify::{
    Cns, IdentifyCommand, NamespaceIdDescriptor, NamespaceList, IDENTIFY_DATA_LEN,
};
use crate::wire::log::{GetLogPage, LogPageId};
use crate::wire::opcodes::{AdminOpcode, FeatureId, NumberOfQueues, NSID_ALL};
use crate::wire::StatusCode;

/// Byte offsets in the SQE, for parameter error locations.
const NSID: usize = 4;
const CDW10: usize = 40;
const CDW11: usize = 44;

pub(crate) fn handle(mut cmd: Cmd<'_>, ctrl: &Controller, shared: &Shared) -> CmdResult {
    match AdminOpcode::from(cmd.sqe.opcode) {
        AdminOpcode::Identify => identify(&mut cmd, ctrl),
        AdminOpcode::GetLogPage => get_log_page(&mut cmd, ctrl, shared),
        AdminOpcode::SetFeatures => set_features(&cmd, ctrl),
        AdminOpcode::GetFeatures => get_features(&cmd, ctrl),
        AdminOpcode::KeepAlive => {
            cmd.xfer.none()?;
            ctrl.keep_alive();
            Ok(Outcome::Done(0))
        }
        AdminOpcode::AsyncEventRequest => {
            cmd.xfer.none()?;
            let mut s = ctrl.state();
            // AERL is 3: four requests held at most.
            if s.held_aers.len() >= 4 {
                return Err(StatusCode::AsyncEventLimitExceeded.into());
            }
            s.held_aers.push(cmd.sqe.cid);
            Ok(Outcome::Held)
        }
        _ => Err(CmdError::at(StatusCode::InvalidOpcode, 0)),
    }
}

fn identify(cmd: &mut Cmd<'_>, ctrl: &Controller) -> CmdResult {
    let id = IdentifyCommand::from_sqe(&cmd.sqe);
    let nsid = cmd.sqe.nsid;
    let mut page = vec![0u8; IDENTIFY_DATA_LEN];
    let subsys = &ctrl.subsys;
    match id.cns {
        Cns::Controller => {
            ctrl.identify()
                .emit(&mut page)
                .map_err(|_| StatusCode::InternalError)?;
        }
        Cns::Namespace if !subsys.discovery => {
            if nsid == 0 || nsid > MAX_NSID {
                return Err(CmdError::at(StatusCode::InvalidNamespaceOrFormat, NSID));
            }
            // An inactive NSID in range reads as all zeros.
            if let Some(ns) = subsys.namespace(nsid) {
                ns.identify()
                    .emit(&mut page)
                    .map_err(|_| StatusCode::InternalError)?;
            }
        }
        Cns::ActiveNamespaceList if !subsys.discovery => {
            if nsid >= 0xFFFF_FFFE {
                return Err(CmdError::at(StatusCode::InvalidNamespaceOrFormat, NSID));
            }
            let ids: Vec<u32> = subsys
                .all_namespaces()
                .iter()
                .map(|n| n.nsid)
                .filter(|&n| n > nsid)
                .take(NamespaceList::MAX_ENTRIES)
                .collect();
            NamespaceList::new(ids)
                .and_then(|l| l.emit(&mut page))
                .map_err(|_| StatusCode::InternalError)?;
        }
        Cns::NamespaceIdDescriptors if !subsys.discovery => {
            let Some(ns) = subsys.namespace(nsid) else {
                return Err(CmdError::at(StatusCode::InvalidNamespaceOrFormat, NSID));
            };
            NamespaceIdDescriptor::emit_list(&ns.descriptors(), &mut page)
                .map_err(|_| StatusCode::InternalError)?;
        }
        _ => return Err(CmdError::at(StatusCode::InvalidField, CDW10)),
    }
    cmd.xfer.put(&page)?;
    Ok(Outcome::Done(0))
}

fn get_log_page(cmd: &mut Cmd<'_>, ctrl: &Controller, shared: &Shared) -> CmdResult {
    let glp = GetLogPage::from_sqe(&cmd.sqe);
    let len = usize::try_from(glp.transfer_len()).unwrap_or(usize::MAX);
    let discovery = ctrl.subsys.discovery;
    let page: Vec<u8> = match glp.lid {
        LogPageId::Discovery if discovery => shared.discovery_log(&ctrl.hostnqn).to_vec(),
        LogPageId::ErrorInformation => {
            let s = ctrl.state();
            let mut out = vec![0u8; s.errors.len().max(1) * 64];
            for (e, chunk) in s.errors.iter().zip(out.chunks_exact_mut(64)) {
                let _ = e.emit(chunk);
            }
            out
        }
        LogPageId::SmartHealth if !discovery => {
            if cmd.sqe.nsid != 0 && cmd.sqe.nsid != NSID_ALL {
                // Per-namespace SMART data is not supported (LPA bit 0 clear).
                return Err(CmdError::at(StatusCode::InvalidField, NSID));
            }
            let mut out = vec![0u8; 512];
            ctrl.smart_log()
                .emit(&mut out)
                .map_err(|_| StatusCode::InternalError)?;
            out
        }
        LogPageId::ChangedNamespaceList if !discovery => vec![0u8; 4096],
        _ => return Err(CmdError::at(StatusCode::InvalidLogPage, CDW10)),
    };
    if !glp.lpo.is_multiple_of(4) || glp.lpo > page.len() as u64 {
        return Err(CmdError::at(StatusCode::InvalidField, 48));
    }
    let start = glp.lpo as usize;
    let mut data = vec![0u8; len.min(super::ctrl::MAX_TRANSFER)];
    if len != data.len() {
        return Err(CmdError::at(StatusCode::InvalidField, CDW10));
    }
    let avail = page.len() - start;
    let n = avail.min(len);
    data[..n].copy_from_slice(&page[start..start + n]);
    cmd.xfer.put(&data)?;
    Ok(Outcome::Done(0))
}

fn feature_id(cmd: &Cmd<'_>) -> FeatureId {
    FeatureId::from(cmd.sqe.cdw10_15[0] as u8)
}

fn set_features(cmd: &Cmd<'_>, ctrl: &Controller) -> CmdResult {
    cmd.xfer.none()?;
    let cdw10 = cmd.sqe.cdw10_15[0];
    let cdw11 = cmd.sqe.cdw10_15[1];
    if cdw10 & (1 << 31) != 0 {
        return Err(StatusCode::FeatureNotSaveable.into());
    }
    let discovery = ctrl.subsys.discovery;
    let mut s = ctrl.state();
    match feature_id(cmd) {
        FeatureId::NumberOfQueues if !discovery => {
            let want = NumberOfQueues::from_dword(cdw11);
            if want.nsqr == 0xFFFF || want.ncqr == 0xFFFF {
                return Err(CmdError::at(StatusCode::InvalidField, CDW11));
            }
            let n = (want.nsqr.max(want.ncqr) + 1).min(MAX_IO_QUEUES);
            s.io_queues = n;
            Ok(Outcome::Done(granted(n)))
        }
        FeatureId::VolatileWriteCache if !discovery => {
            s.wce = cdw11 & 1 != 0;
            Ok(Outcome::Done(0))
        }
        FeatureId::KeepAliveTimer => {
            s.kato_ms = cdw11.div_ceil(100).saturating_mul(100);
            s.last_keep_alive = std::time::Instant::now();
            Ok(Outcome::Done(0))
        }
        FeatureId::AsyncEventConfig => {
            s.aec = cdw11;
            Ok(Outcome::Done(0))
        }
        _ => Err(CmdError::at(StatusCode::InvalidField, CDW10)),
    }
}

fn granted(n: u16) -> u64 {
    let z = u64::from(n.saturating_sub(1));
    z | (z << 16)
}

fn get_features(cmd: &Cmd<'_>, ctrl: &Controller) -> CmdResult {
    cmd.xfer.none()?;
    let select = (cmd.sqe.cdw10_15[0] >> 8) & 0x7;
    let discovery = ctrl.subsys.discovery;
    let s = ctrl.state();
    let value = match feature_id(cmd) {
        FeatureId::NumberOfQueues if !discovery => granted(s.io_queues),
        FeatureId::VolatileWriteCache if !discovery => u64::from(s.wce),
        FeatureId::KeepAliveTimer => u64::from(s.kato_ms),
        FeatureId::AsyncEventConfig => u64::from(s.aec),
        _ => return Err(CmdError::at(StatusCode::InvalidField, CDW10)),
    };
    match select {
        // Current, default and saved (nothing is saveable: the current value).
        0..=2 => Ok(Outcome::Done(value)),
        // Supported capabilities: changeable, not saveable, not per namespace.
        3 => Ok(Outcome::Done(0b100)),
        _ => Err(CmdError::at(StatusCode::InvalidField, CDW10)),
    }
}
