//! NVM I/O commands over a namespace's back end (nvmet's io-cmd-file.c and
//! io-cmd-bdev.c): Read, Write (FUA), Flush (one namespace or all), Write Zeroes,
//! Dataset Management, Verify, Compare, Copy (format 0).

use std::sync::Arc;

use super::ctrl::{Controller, MAX_TRANSFER};
use super::queue::{backend, Cmd, CmdError, CmdResult, Outcome};
use super::subsys::{Namespace, COPY_MCL, COPY_MSRC, COPY_MSSRL};
use crate::wire::opcodes::{
    CopyCommand, CopySourceRange, DsmCommand, DsmRange, IoCommand, IoOpcode, NSID_ALL,
};
use crate::wire::StatusCode;

const NSID: usize = 4;
const CDW10: usize = 40;
const CDW12: usize = 48;

pub(crate) fn handle(mut cmd: Cmd<'_>, ctrl: &Controller) -> CmdResult {
    let op = IoOpcode::from(cmd.sqe.opcode);
    if op == IoOpcode::Flush && cmd.sqe.nsid == NSID_ALL {
        cmd.xfer.none()?;
        for ns in ctrl.subsys.all_namespaces() {
            ns.store.flush().map_err(backend)?;
        }
        return Ok(Outcome::Done(0));
    }
    let known = matches!(
        op,
        IoOpcode::Flush
            | IoOpcode::Write
            | IoOpcode::Read
            | IoOpcode::Compare
            | IoOpcode::WriteZeroes
            | IoOpcode::DatasetManagement
            | IoOpcode::Verify
            | IoOpcode::Copy
    );
    if !known {
        return Err(CmdError::at(StatusCode::InvalidOpcode, 0));
    }
    let Some(ns) = ctrl.subsys.namespace(cmd.sqe.nsid) else {
        return Err(CmdError::at(StatusCode::InvalidNamespaceOrFormat, NSID));
    };
    match op {
        IoOpcode::Flush => {
            cmd.xfer.none()?;
            ns.store.flush().map_err(backend)?;
        }
        IoOpcode::Read => {
            let (offset, len) = range(&cmd, &ns)?;
            // Straight from the back end into the registered buffer the RMA write
            // goes from: no allocation, no copy.
            cmd.xfer
                .put_with(len, |buf| ns.store.read(offset, buf).map_err(backend))?;
            ctrl.count_io(len as u64, 0);
        }
        IoOpcode::Write => {
            let (offset, len) = range(&cmd, &ns)?;
            let data = cmd.xfer.fetch(len)?;
            if IoCommand::from_sqe(&cmd.sqe).fua {
                ns.store.write_durable(offset, &data).map_err(backend)?;
            } else {
                ns.store.write(offset, &data).map_err(backend)?;
            }
            ctrl.count_io(0, len as u64);
        }
        IoOpcode::Compare => {
            let (offset, len) = range(&cmd, &ns)?;
            let data = cmd.xfer.fetch(len)?;
            let mut have = vec![0u8; len];
            ns.store.read(offset, &mut have).map_err(backend)?;
            if have != data {
                return Err(StatusCode::CompareFailure.into());
            }
        }
        IoOpcode::Verify => {
            cmd.xfer.none()?;
            let io = lba_range(&cmd, &ns)?;
            // Reading every block is the check a memory or file back end can make.
            let mut buf = vec![0u8; MAX_TRANSFER];
            let mut at = io.0;
            let end = io.0 + io.1;
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                ns.store.read(at, &mut buf[..n]).map_err(backend)?;
                at += n as u64;
            }
        }
        IoOpcode::WriteZeroes => {
            cmd.xfer.none()?;
            let (offset, len) = lba_range(&cmd, &ns)?;
            if IoCommand::from_sqe(&cmd.sqe).deac {
                ns.store.deallocate(offset, len).map_err(backend)?;
            } else {
                ns.store.zero(offset, len).map_err(backend)?;
            }
        }
        IoOpcode::DatasetManagement => dsm(&mut cmd, &ns)?,
        IoOpcode::Copy => copy(&mut cmd, &ns)?,
        _ => return Err(CmdError::at(StatusCode::InvalidOpcode, 0)),
    }
    Ok(Outcome::Done(0))
}

/// Byte offset and length of SLBA/NLB, range-checked (no transfer-size limit).
fn lba_range(cmd: &Cmd<'_>, ns: &Namespace) -> Result<(u64, u64), CmdError> {
    let io = IoCommand::from_sqe(&cmd.sqe);
    io.check_range(ns.blocks())
        .map_err(|s| CmdError::at(s, CDW10))?;
    Ok((
        io.slba * ns.block_size(),
        u64::from(io.block_count()) * ns.block_size(),
    ))
}

/// Byte offset and length of a command that moves its blocks as data.
fn range(cmd: &Cmd<'_>, ns: &Namespace) -> Result<(u64, usize), CmdError> {
    let (offset, len) = lba_range(cmd, ns)?;
    if len > MAX_TRANSFER as u64 {
        return Err(CmdError::at(StatusCode::InvalidField, CDW12));
    }
    Ok((offset, len as usize))
}

fn dsm(cmd: &mut Cmd<'_>, ns: &Arc<Namespace>) -> Result<(), CmdError> {
    let d = DsmCommand::from_sqe(&cmd.sqe);
    let raw = cmd.xfer.fetch_prefix(d.range_count() * DsmRange::LEN)?;
    let mut ranges = Vec::with_capacity(d.range_count());
    for chunk in raw.chunks_exact(DsmRange::LEN) {
        let r = DsmRange::parse(chunk)?;
        match r.slba.checked_add(u64::from(r.nlb)) {
            Some(end) if end <= ns.blocks() => ranges.push(r),
            _ => return Err(StatusCode::LbaOutOfRange.into()),
        }
    }
    if d.ad {
        for r in ranges {
            ns.store
                .deallocate(r.slba * ns.block_size(), u64::from(r.nlb) * ns.block_size())
                .map_err(backend)?;
        }
    }
    Ok(())
}

fn copy(cmd: &mut Cmd<'_>, ns: &Arc<Namespace>) -> Result<(), CmdError> {
    let c = CopyCommand::from_sqe(&cmd.sqe);
    if c.format != 0 {
        return Err(CmdError::at(StatusCode::InvalidField, CDW12));
    }
    if c.nr > COPY_MSRC {
        return Err(StatusCode::CommandSizeLimitExceeded.into());
    }
    let raw = cmd.xfer.fetch(c.range_count() * CopySourceRange::LEN)?;
    let mut ranges = Vec::with_capacity(c.range_count());
    let mut total: u64 = 0;
    for chunk in raw.chunks_exact(CopySourceRange::LEN) {
        let r = CopySourceRange::parse(chunk)?;
        let blocks = u64::from(r.nlb) + 1;
        if blocks > u64::from(COPY_MSSRL) {
            return Err(StatusCode::CommandSizeLimitExceeded.into());
        }
        match r.slba.checked_add(blocks) {
            Some(end) if end <= ns.blocks() => {}
            _ => return Err(StatusCode::LbaOutOfRange.into()),
        }
        total += blocks;
        ranges.push((r.slba, blocks));
    }
    if total > u64::from(COPY_MCL) {
        return Err(StatusCode::CommandSizeLimitExceeded.into());
    }
    match c.sdlba.checked_add(total) {
        Some(end) if end <= ns.blocks() => {}
        _ => return Err(CmdError::at(StatusCode::LbaOutOfRange, CDW10)),
    }
    // Read every source first, so overlapping ranges copy what was there before.
    let bs = ns.block_size();
    let mut data = vec![0u8; (total * bs) as usize];
    let mut at = 0usize;
    for (slba, blocks) in ranges {
        let n = (blocks * bs) as usize;
        ns.store
            .read(slba * bs, &mut data[at..at + n])
            .map_err(backend)?;
        at += n;
    }
    ns.store.write(c.sdlba * bs, &data).map_err(backend)?;
    if c.fua {
        ns.store.flush().map_err(backend)?;
    }
    Ok(())
}
