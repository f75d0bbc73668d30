//! libfabric as a reference: runs Debian's `fi_pingpong` (package libfabric-bin) on
//! loopback, server and client as two processes, and parses its result line.
//!
//! libfabric's tcp provider binds the machine's external interface unless told
//! otherwise, so both processes run with `FI_TCP_IFACE=lo`.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pingpong::PpResult;

/// The fi_pingpong binary, if installed.
pub fn find_fi_pingpong() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("fi_pingpong"))
        .find(|p| p.is_file())
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                // Only our own child, by its handle.
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Parses fi_pingpong's result line for `size`:
/// `bytes #sent #ack total time MB/sec usec/xfer Mxfers/sec`.
pub fn parse_output(out: &str, size: usize, iterations: usize) -> Option<PpResult> {
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // fi_pingpong prints sizes as 8, 4k, 1m.
        if f.len() >= 8 && crate::sizes::parse_size(f[0]).ok() == Some(size) {
            let mbps: f64 = f[5].parse().ok()?;
            let usec: f64 = f[6].parse().ok()?;
            return Some(PpResult {
                size,
                iterations,
                // fi_pingpong reports the mean only.
                lat_median_us: usec,
                lat_mean_us: usec,
                lat_p99_us: None,
                mb_per_s: mbps,
                cpu: None,
            });
        }
    }
    None
}

/// Runs one fi_pingpong measurement of `size` with its tcp provider on 127.0.0.1.
pub fn fi_pingpong(
    bin: &std::path::Path,
    provider: &str,
    size: usize,
    iterations: usize,
) -> Result<PpResult, String> {
    fi_pingpong_ep(bin, provider, "msg", false, size, iterations)
}

/// Runs one fi_pingpong measurement of `size` with endpoint type `ep_type` (`msg`, or
/// `rdm` with a provider such as `"tcp;ofi_rxm"`), tagged messages (`-m tagged`) when
/// `tagged`, on 127.0.0.1.
pub fn fi_pingpong_ep(
    bin: &std::path::Path,
    provider: &str,
    ep_type: &str,
    tagged: bool,
    size: usize,
    iterations: usize,
) -> Result<PpResult, String> {
    let limit = Duration::from_secs(60);
    for attempt in 0..5 {
        let port = free_port().map_err(|e| format!("free port: {e}"))?;
        let common = |c: &mut Command| {
            c.env("FI_TCP_IFACE", "lo")
                .env("FI_SOCKETS_IFACE", "lo")
                .args(["-p", provider, "-e", ep_type, "-m"])
                .arg(if tagged { "tagged" } else { "msg" })
                .arg("-I")
                .arg(iterations.to_string())
                .arg("-S")
                .arg(size.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        };
        let cpu0 = crate::cpu_seconds(true);
        let t0 = Instant::now();
        let mut sc = Command::new(bin);
        common(&mut sc);
        sc.args(["-B", &port.to_string()]);
        let mut server = sc.spawn().map_err(|e| format!("start fi_pingpong: {e}"))?;
        std::thread::sleep(Duration::from_millis(100 + 100 * attempt));
        let mut cc = Command::new(bin);
        common(&mut cc);
        cc.args(["-P", &port.to_string(), "127.0.0.1"]);
        let mut client = cc.spawn().map_err(|e| format!("start fi_pingpong: {e}"))?;
        let cstatus = wait_or_kill(&mut client, limit);
        let mut out = String::new();
        if let Some(mut o) = client.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        wait_or_kill(&mut server, Duration::from_secs(5));
        // Both processes have been waited for: their CPU is in RUSAGE_CHILDREN (from
        // process start on, warm-up and setup included: an upper bound).
        let cpu = crate::cpu_seconds(true) - cpu0;
        if cstatus.is_some_and(|s| s.success()) {
            let mut r = parse_output(&out, size, iterations)
                .ok_or_else(|| format!("could not parse fi_pingpong output:\n{out}"))?;
            r.cpu = Some(crate::CpuCost::new(
                cpu,
                t0.elapsed().as_secs_f64(),
                (2 * size * iterations) as f64,
                (2 * iterations) as f64,
            ));
            return Ok(r);
        }
    }
    Err(format!(
        "fi_pingpong -p {provider} -e {ep_type} failed for size {size}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fi_pingpong_lines() {
        let out =
            "bytes   #sent   #ack     total       time     MB/sec    usec/xfer   Mxfers/sec\n\
                   8       2k      =2k      31k         0.02s      1.42       5.64       0.18\n";
        let r = parse_output(out, 8, 2000).unwrap();
        assert_eq!(r.lat_mean_us, 5.64);
        assert_eq!(r.mb_per_s, 1.42);
        assert!(parse_output(out, 64, 2000).is_none());
        let big =
            "bytes   #sent   #ack     total       time     MB/sec    usec/xfer   Mxfers/sec\n\
                   4k      100     =100     800k        0.00s    330.06      12.41       0.08\n";
        assert_eq!(parse_output(big, 4096, 100).unwrap().lat_mean_us, 12.41);
        assert!(parse_output("garbage", 8, 1).is_none());
    }
}
