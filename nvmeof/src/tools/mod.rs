//! What the command line tools (`nvmeof-target`, `nvmeof`, `nvmeof-perf`) share, as a
//! library so tests and other programs can use it too:
//!
//! * [`config`] – nvmetcli's saved-config JSON to target configuration, and the
//!   embedded default;
//! * [`perf`] – the I/O load generator of `nvmeof-perf` (workloads, queues, progress);
//! * [`stats`] – a log-linear latency histogram (percentiles) and its SVG picture;
//! * [`logging`] – a small `tracing` subscriber writing to stderr, and the
//!   SIGINT/SIGTERM flag;
//! * helpers: sizes with suffixes ([`parse_size`]), numbers in hex or decimal
//!   ([`parse_num`]), random loopback addresses ([`random_loopback`]).

pub mod config;
pub mod logging;
pub mod perf;
pub mod powercut;
pub mod stats;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr};

/// A size in bytes: a number with an optional suffix k/K, m/M, g/G, t/T (powers of
/// 1024; "KiB", "MB" spellings too), or hex with 0x.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|e| format!("size {s:?}: {e}"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num.parse().map_err(|e| format!("size {s:?}: {e}"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("size {s:?}: unknown suffix {other:?}")),
    };
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A number in decimal or, with 0x, hex (as nvme-cli takes them).
pub fn parse_num(s: &str) -> Result<u64, String> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|e| format!("number {s:?}: {e}"))
}

/// A comma separated list of numbers ([`parse_num`] each).
pub fn parse_list(s: &str) -> Result<Vec<u64>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_num)
        .collect()
}

/// A random 127.x.y.z address other than `avoid`: softroce opens one device (UDP
/// port 4791) per address and process, so two processes on one machine need two
/// addresses.
pub fn random_loopback(avoid: Option<IpAddr>) -> Ipv4Addr {
    loop {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        let v = h.finish();
        let ip = Ipv4Addr::new(
            127,
            10 + (v % 240) as u8,
            (v >> 8) as u8,
            1 + ((v >> 16) % 253) as u8,
        );
        if avoid != Some(IpAddr::V4(ip)) {
            return ip;
        }
    }
}

/// The local address a host should connect from to reach `traddr` over
/// `provider`: for softroce and a loopback target, a random other loopback address
/// (the target's process owns the device on its own address); else none (the route
/// decides).
pub fn host_source(provider: &str, traddr: &str) -> Option<IpAddr> {
    let ip: IpAddr = traddr.parse().ok()?;
    (provider == "softroce" && ip.is_loopback()).then(|| IpAddr::V4(random_loopback(Some(ip))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_numbers() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("0x200"), Ok(512));
        assert!(parse_size("4q").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        assert_eq!(parse_num("0xffffffff"), Ok(0xFFFF_FFFF));
        assert_eq!(parse_list("1, 0x10,3"), Ok(vec![1, 16, 3]));
    }

    #[test]
    fn host_source_only_for_loopback_softroce() {
        let src = host_source("softroce", "127.0.0.1").expect("a source");
        assert!(src.is_loopback());
        assert_ne!(src, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(host_source("tcp", "127.0.0.1"), None);
        assert_eq!(host_source("softroce", "10.0.0.1"), None);
    }
}
