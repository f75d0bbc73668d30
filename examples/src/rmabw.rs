//! RMA bandwidth, as fabtests' fi_rma_bw measures it: the client keeps a window of RMA
//! writes (or reads, or writes with remote CQ data) outstanding against the server's
//! region and reports bytes moved per second.
//!
//! The server registers a region with remote rights and sends its descriptor
//! ([`fabric::RemoteMr`]) in the accept data; the client sends a configuration message
//! (operation, sizes, transfer counts) and, at the end, a "done" message. For
//! `writedata` the server consumes one posted receive per write, as the target of a
//! write with remote CQ data must.

use std::time::Instant;

use fabric::{Access, RemoteMr};
use serde::Serialize;

use crate::conn::{self, Side};
use crate::pingpong::{linger, next_completion};
use crate::{ctx, Mode, ToolResult};

const MAGIC: &[u8; 4] = b"FRB1";
const CTRL: usize = 4096;
const CTRL_CTX: u64 = 1 << 62;
const DATA_CTX: u64 = 1 << 61;

/// The RMA operation measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RmaOp {
    /// RMA write.
    Write,
    /// RMA read.
    Read,
    /// RMA write with remote CQ data.
    WriteData,
}

impl std::str::FromStr for RmaOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "write" => Ok(RmaOp::Write),
            "read" => Ok(RmaOp::Read),
            "writedata" => Ok(RmaOp::WriteData),
            _ => Err(format!(
                "operation '{s}': expected write, read or writedata"
            )),
        }
    }
}

impl std::fmt::Display for RmaOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RmaOp::Write => "write",
            RmaOp::Read => "read",
            RmaOp::WriteData => "writedata",
        })
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Operation.
    pub op: RmaOp,
    /// Transfer sizes in bytes.
    pub sizes: Vec<usize>,
    /// Transfers per size (`None`: chosen per size).
    pub transfers: Option<usize>,
    /// Operations kept outstanding.
    pub window: usize,
    /// Polling or sleeping waits.
    pub mode: Mode,
    /// Check the data (not timed): every read's bytes against the server's pattern
    /// (the destination is cleared before each read), and after each size the
    /// target's bytes against what was written (read back).
    pub verify: bool,
}

/// Result for one size.
#[derive(Debug, Clone, Serialize)]
pub struct BwResult {
    /// Operation.
    pub op: RmaOp,
    /// Transfer size in bytes.
    pub size: usize,
    /// Transfers timed.
    pub transfers: usize,
    /// Bandwidth, MB/s (10^6 bytes).
    pub mb_per_s: f64,
    /// Mean time per transfer, microseconds.
    pub usec_per_xfer: f64,
    /// CPU cost of the timed transfers (getrusage of this process: both ends with
    /// `--self`), per GB moved and per million transfers.
    pub cpu: crate::CpuCost,
}

/// The bytes at `offset..offset + len` of a region filled by [`fill_pattern`].
fn pattern_at(offset: usize, len: usize, seed: u8) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

/// Fills `len` bytes of a region with the pattern seeded by `seed`.
fn fill_pattern(mr: &fabric::MemoryRegion, len: usize, seed: u8) -> ToolResult<()> {
    mr.write_at(0, &pattern_at(0, len, seed))
        .map_err(ctx("fill pattern"))
}

/// Seed of the server region's pattern (what reads must return).
const READ_SEED: u8 = 0x3C;

/// Default transfer count for a size: about 256 MiB moved, bounded.
pub fn auto_transfers(size: usize) -> usize {
    ((256usize << 20) / size.max(1)).clamp(256, 20_000)
}

fn encode(op: RmaOp, plan: &[(usize, usize)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(MAGIC);
    v.push(match op {
        RmaOp::Write => 0,
        RmaOp::Read => 1,
        RmaOp::WriteData => 2,
    });
    v.extend_from_slice(&[0, 0, 0]);
    v.extend_from_slice(&(plan.len() as u64).to_le_bytes());
    for &(s, n) in plan {
        v.extend_from_slice(&(s as u64).to_le_bytes());
        v.extend_from_slice(&(n as u64).to_le_bytes());
    }
    v
}

fn decode(b: &[u8]) -> ToolResult<(RmaOp, Vec<(usize, usize)>)> {
    let bad = || "malformed rma-bw configuration from the client".to_string();
    if b.len() < 16 || &b[0..4] != MAGIC {
        return Err(bad());
    }
    let op = match b[4] {
        0 => RmaOp::Write,
        1 => RmaOp::Read,
        2 => RmaOp::WriteData,
        _ => return Err(bad()),
    };
    let u = |i: usize| -> ToolResult<usize> {
        let x = b.get(i..i + 8).ok_or_else(bad)?;
        Ok(u64::from_le_bytes(x.try_into().map_err(|_| bad())?) as usize)
    };
    let n = u(8)?;
    if n > (CTRL - 16) / 16 {
        return Err(bad());
    }
    let plan = (0..n)
        .map(|k| Ok((u(16 + 16 * k)?, u(24 + 16 * k)?)))
        .collect::<ToolResult<Vec<_>>>()?;
    Ok((op, plan))
}

/// The server half: receives the configuration, registers a region large enough,
/// sends its descriptor, and serves until the client says "done".
pub fn serve(side: &Side, mode: Mode) -> ToolResult<()> {
    let ctrl = side
        .domain
        .alloc(CTRL, Access::LOCAL)
        .map_err(ctx("register"))?;
    side.ep
        .recv(ctrl.full(), CTRL_CTX)
        .map_err(ctx("post receive"))?;
    let c = next_completion(&side.cq, mode)?;
    let (op, plan) = decode(&ctrl.to_vec(0, c.len).map_err(ctx("config"))?)?;
    let max = plan.iter().map(|p| p.0).max().unwrap_or(0);
    if max > side.info.limits.max_msg_size {
        return Err(format!("size {max} exceeds max_msg_size"));
    }
    let region = side
        .domain
        .alloc(max.max(1), Access::LOCAL | Access::REMOTE)
        .map_err(ctx("register target region"))?;
    // What reads return (and verify against).
    fill_pattern(&region, max, READ_SEED)?;
    ctrl.write_at(0, &region.remote().to_bytes())
        .map_err(ctx("descriptor"))?;
    side.ep
        .send(ctrl.iov(0, RemoteMr::WIRE_SIZE), CTRL_CTX)
        .map_err(ctx("send descriptor"))?;
    next_completion(&side.cq, mode)?;
    if op == RmaOp::WriteData {
        let total: usize = plan.iter().map(|p| p.1).sum();
        let notify = side
            .domain
            .alloc(1, Access::RECV)
            .map_err(ctx("register"))?;
        let depth = total.min(side.info.limits.rx_size.max(1));
        for _ in 0..depth {
            side.ep
                .recv(notify.iov(0, 0), DATA_CTX)
                .map_err(ctx("post receive"))?;
        }
        let mut posted = depth;
        let mut seen = 0usize;
        while seen < total {
            let c = next_completion(&side.cq, mode)?;
            if c.context == DATA_CTX {
                seen += 1;
                if posted < total {
                    side.ep
                        .recv(notify.iov(0, 0), DATA_CTX)
                        .map_err(ctx("post receive"))?;
                    posted += 1;
                }
            }
        }
    }
    side.ep
        .recv(ctrl.full(), CTRL_CTX)
        .map_err(ctx("post receive"))?;
    wait_done(side, mode)?;
    // Keep the endpoint (and the region) until the client has closed: under loss the
    // ACK of its "done" may need to be sent again.
    linger(side)?;
    drop(region);
    Ok(())
}

/// Waits for the client's "done": as long as the client takes (writes and reads are
/// silent at the target, so no completion comes meanwhile; under loss a run can take
/// minutes), ending early only if the connection ends.
fn wait_done(side: &Side, mode: Mode) -> ToolResult<()> {
    loop {
        let c = match mode {
            Mode::Poll => side.cq.poll_wait(std::time::Duration::from_secs(1)),
            Mode::Sleep => side.cq.wait(std::time::Duration::from_secs(1)),
        };
        match c {
            Ok(c) => {
                if let Err(e) = &c.status {
                    return Err(format!("operation {} failed: {e}", c.context));
                }
                if c.context == CTRL_CTX {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == fabric::ErrorKind::TimedOut => {
                if let Some(fabric::Event::Shutdown { reason, .. }) =
                    side.eq.read().map_err(ctx("eq"))?
                {
                    return Err(format!("the client went away ({reason:?})"));
                }
            }
            Err(e) => return Err(format!("waiting for the client: {e}")),
        }
    }
}

/// The client half: sends the configuration, receives the server's region
/// descriptor, and measures each size.
pub fn client(side: &Side, opts: &Options) -> ToolResult<Vec<BwResult>> {
    let max = opts.sizes.iter().copied().max().unwrap_or(0);
    if max > side.info.limits.max_msg_size {
        return Err(format!(
            "size {max} exceeds max_msg_size {}",
            side.info.limits.max_msg_size
        ));
    }
    let plan: Vec<(usize, usize)> = opts
        .sizes
        .iter()
        .map(|&s| (s, opts.transfers.unwrap_or_else(|| auto_transfers(s))))
        .collect();
    let cfg = encode(opts.op, &plan);
    if cfg.len() > CTRL {
        return Err("too many sizes".into());
    }
    let ctrl = side
        .domain
        .alloc(2 * CTRL, Access::LOCAL)
        .map_err(ctx("register"))?;
    ctrl.write_at(0, &cfg).map_err(ctx("config"))?;
    side.ep
        .recv(ctrl.iov(CTRL, CTRL), CTRL_CTX + 1)
        .map_err(ctx("post receive"))?;
    side.ep
        .send(ctrl.iov(0, cfg.len()), CTRL_CTX)
        .map_err(ctx("send config"))?;
    // Wait for the server's descriptor (the config's send completion may come first).
    let remote = loop {
        let c = next_completion(&side.cq, opts.mode)?;
        if c.context == CTRL_CTX + 1 {
            let b = ctrl.to_vec(CTRL, c.len).map_err(ctx("descriptor"))?;
            break RemoteMr::from_bytes(&b).map_err(ctx("descriptor"))?;
        }
    };

    let window = opts.window.clamp(1, side.info.limits.tx_size.max(1));
    // Reads land in a slot per outstanding operation when verifying, so each one's
    // bytes can be checked; otherwise every transfer uses the first.
    let slots = if opts.verify && opts.op == RmaOp::Read {
        window
    } else {
        1
    };
    let local = side
        .domain
        .alloc(max.max(1) * slots, Access::LOCAL)
        .map_err(ctx("register"))?;
    let check = side
        .domain
        .alloc(if opts.verify { max.max(1) } else { 1 }, Access::LOCAL)
        .map_err(ctx("register"))?;
    let mut out = Vec::new();
    for (k, &(size, n)) in plan.iter().enumerate() {
        let write_seed = 0x80 | k as u8;
        if opts.op != RmaOp::Read {
            // What the writes carry (and the target must hold after them).
            local
                .write_at(0, &pattern_at(0, size, write_seed))
                .map_err(ctx("fill"))?;
        }
        let expect_read = if opts.verify && opts.op == RmaOp::Read {
            pattern_at(0, size, READ_SEED)
        } else {
            Vec::new()
        };
        let mut untimed = std::time::Duration::ZERO;
        let cpu0 = crate::cpu_seconds(false);
        let start = Instant::now();
        let (mut posted, mut done) = (0usize, 0usize);
        while done < n {
            while posted < n && posted - done < window {
                let slot = posted % slots;
                if opts.verify && opts.op == RmaOp::Read {
                    let t = Instant::now();
                    local.fill(slot * size, size, 0).map_err(ctx("clear"))?;
                    untimed += t.elapsed();
                }
                let l = local.iov(slot * size, size);
                let r = remote.iov(0, size);
                let ctx_id = posted as u64;
                match opts.op {
                    RmaOp::Write => side.ep.write(l, r, ctx_id),
                    RmaOp::Read => side.ep.read(l, r, ctx_id),
                    RmaOp::WriteData => side.ep.writedata(l, r, posted as u64, ctx_id),
                }
                .map_err(ctx("post RMA"))?;
                posted += 1;
            }
            let c = next_completion(&side.cq, opts.mode)?;
            if c.context >= CTRL_CTX {
                // The configuration send completing late (under loss) is no transfer.
                continue;
            }
            if c.context != done as u64 {
                return Err(format!(
                    "size {size}: completion of transfer {}, expected {done}",
                    c.context
                ));
            }
            if opts.verify && opts.op == RmaOp::Read {
                let t = Instant::now();
                let got = local
                    .to_vec((done % slots) * size, size)
                    .map_err(ctx("read back"))?;
                if let Some(at) = got.iter().zip(&expect_read).position(|(a, b)| a != b) {
                    return Err(format!("size {size}, read {done}: wrong data at byte {at}"));
                }
                untimed += t.elapsed();
            }
            done += 1;
        }
        let wall = start.elapsed();
        let cpu = crate::cpu_seconds(false) - cpu0;
        let secs = wall.saturating_sub(untimed).as_secs_f64();
        if opts.verify && opts.op != RmaOp::Read {
            // The target holds what the writes carried.
            side.ep
                .read(check.iov(0, size), remote.iov(0, size), CTRL_CTX + 2)
                .map_err(ctx("read back"))?;
            loop {
                if next_completion(&side.cq, opts.mode)?.context == CTRL_CTX + 2 {
                    break;
                }
            }
            let got = check.to_vec(0, size).map_err(ctx("read back"))?;
            let want = pattern_at(0, size, write_seed);
            if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
                return Err(format!(
                    "size {size}: the target holds wrong data at byte {at} after the writes"
                ));
            }
        }
        out.push(BwResult {
            op: opts.op,
            size,
            transfers: n,
            mb_per_s: (size * n) as f64 / secs / 1e6,
            usec_per_xfer: secs * 1e6 / n as f64,
            cpu: crate::CpuCost::new(cpu, wall.as_secs_f64(), (size * n) as f64, n as f64),
        });
    }
    ctrl.write_at(0, b"done").map_err(ctx("done"))?;
    side.ep
        .send(ctrl.iov(0, 4), CTRL_CTX + 3)
        .map_err(ctx("send done"))?;
    while next_completion(&side.cq, opts.mode)?.context != CTRL_CTX + 3 {}
    Ok(out)
}

/// Runs both halves in this process over `node`.
pub fn run_self(provider: &str, node: &str, opts: &Options) -> ToolResult<Vec<BwResult>> {
    let mode = opts.mode;
    conn::run_self(
        provider,
        node,
        move |side| serve(side, mode),
        |side| client(side, opts),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trip() {
        let plan = vec![(65536, 100), (1 << 20, 10)];
        let (op, p) = decode(&encode(RmaOp::WriteData, &plan)).unwrap();
        assert_eq!(op, RmaOp::WriteData);
        assert_eq!(p, plan);
        assert!(decode(b"FRB1\x09\0\0\0\0\0\0\0\0\0\0\0").is_err());
    }
}
