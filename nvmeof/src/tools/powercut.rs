//! The power-cut workload (`nvmeof-powercut`): numbered, checksummed 4 KiB records
//! written through NVMe-oF into a buffered file namespace, each acknowledged
//! (`ACK <id>` on stdout) only once the completion promised it durable, and a
//! checker that lists the records present and intact (`HAVE <first>-<last>`).
//!
//! A record is block `id` of the namespace: magic `NVPCUT01`, the run's tag, the id,
//! then payload bytes derived from (tag, id), and an FNV-1a 64 checksum of
//! everything before it in the last 8 bytes. So a record is intact only if all of
//! its 4 KiB reached the file, and a record of an earlier run does not count.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Bytes of one record (one block of the namespace).
pub const RECORD: usize = 4096;
/// Records a namespace holds (its file is sparse: 64 MiB at most).
pub const RECORDS: u64 = 16384;
const MAGIC: &[u8; 8] = b"NVPCUT01";

/// FNV-1a, 64 bits.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The tag of run `run` (a hash of its name).
pub fn run_tag(run: &str) -> u64 {
    fnv(run.as_bytes())
}

/// The namespace file of run `run` in `dir`.
pub fn image_path(dir: &Path, run: &str) -> PathBuf {
    dir.join(format!("ns-{run}.img"))
}

/// Record `id` of the run tagged `tag`.
pub fn record(tag: u64, id: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(MAGIC);
    r[8..16].copy_from_slice(&tag.to_le_bytes());
    r[16..24].copy_from_slice(&id.to_le_bytes());
    let mut x = tag ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in r[24..RECORD - 8].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let sum = fnv(&r[..RECORD - 8]);
    r[RECORD - 8..].copy_from_slice(&sum.to_le_bytes());
    r
}

/// Whether `block` (read from position `id`) is record `id` of the run, intact.
pub fn is_intact(block: &[u8], tag: u64, id: u64) -> bool {
    block.len() == RECORD
        && &block[..8] == MAGIC
        && block[8..16] == tag.to_le_bytes()
        && block[16..24] == id.to_le_bytes()
        && block[RECORD - 8..] == fnv(&block[..RECORD - 8]).to_le_bytes()
}

/// The ids present and intact in the run's file, as inclusive ranges (empty when
/// there is no file).
pub fn check(dir: &Path, run: &str) -> Result<Vec<(u64, u64)>> {
    let path = image_path(dir, run);
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
    };
    let tag = run_tag(run);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    // 1 MiB at a time: the file may be up to RECORDS records, mostly holes.
    let mut chunk = vec![0u8; 256 * RECORD];
    let mut id = 0u64;
    loop {
        let mut filled = 0;
        while filled < chunk.len() {
            match std::io::Read::read(&mut file, &mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
            }
        }
        for block in chunk[..filled].chunks(RECORD) {
            if is_intact(block, tag, id) {
                match ranges.last_mut() {
                    Some((_, last)) if *last + 1 == id => *last = id,
                    _ => ranges.push((id, id)),
                }
            }
            id += 1;
        }
        if filled < chunk.len() {
            return Ok(ranges);
        }
    }
}

/// How a write is made durable before its ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Even ids with FUA, odd ids with a plain write and then Flush.
    FuaOrFlush,
    /// None: acknowledged at the plain write's completion (the control).
    None,
}

/// Writes records 0, 1, 2, ... through a target (buffered file namespace in `dir`,
/// tcp on 127.0.0.1) and a host in this process, printing `ACK <id>` to `out` after
/// each one is durable as `durability` says; returns after `limit` records (at most
/// [`RECORDS`]).
pub fn write(
    dir: &Path,
    run: &str,
    durability: Durability,
    limit: u64,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    use crate::host::{Controller, HostConfig, TransportAddr};
    use crate::target::{Backing, NamespaceConfig, PortConfig, SubsystemConfig, Target};
    const NQN: &str = "nqn.2024-01.io.fabric:powercut";
    std::fs::create_dir_all(dir)?;
    let target = Target::new();
    let mut sub = SubsystemConfig::new(NQN);
    sub.namespaces.push(NamespaceConfig {
        nsid: 1,
        backing: Backing::File {
            path: image_path(dir, run),
            size: Some(RECORDS * RECORD as u64),
        },
        block_size: RECORD as u32,
    });
    target.add_subsystem(&sub)?;
    let port = target.add_port(&PortConfig::new("tcp", "127.0.0.1"))?;
    let addr = TransportAddr::new("tcp", "127.0.0.1", port.local_addr().port());
    let ctrl = Controller::connect(&addr, NQN, &HostConfig::default())?;
    let ns = ctrl.namespace(1)?;
    let tag = run_tag(run);
    for id in 0..limit.min(RECORDS) {
        let r = record(tag, id);
        match durability {
            Durability::FuaOrFlush if id % 2 == 0 => ctrl.write(&ns, id, &r, true)?,
            Durability::FuaOrFlush => {
                ctrl.write(&ns, id, &r, false)?;
                ctrl.flush(1)?;
            }
            Durability::None => ctrl.write(&ns, id, &r, false)?,
        }
        writeln!(out, "ACK {id}")?;
        out.flush()?;
    }
    let _ = ctrl.disconnect();
    Ok(())
}

/// What the writer does once its records are written: it stays (at most an hour), as
/// the power-cut harness counts a writer that ends before the cut as a failed run.
pub fn hold() {
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_check_themselves() {
        let r = record(7, 42);
        assert!(is_intact(&r, 7, 42));
        assert!(!is_intact(&r, 8, 42), "another run");
        assert!(!is_intact(&r, 7, 43), "another position");
        for at in [0, 9, 17, 100, RECORD - 9, RECORD - 1] {
            let mut bad = r;
            bad[at] ^= 1;
            assert!(!is_intact(&bad, 7, 42), "byte {at} flipped");
        }
        assert!(!is_intact(&[0u8; RECORD], 7, 0));
    }
}
