//! The power-cut workload on the host: `nvmeof-powercut write` is SIGKILLed (by PID)
//! after some acknowledgements, then `check` must list every acknowledged record as
//! present and intact, and must not list a record whose bytes were damaged. (Killing
//! a process cannot lose page-cache data; the VM tier's power cut tests that part:
//! tests/vm/cuts/nvmeof-vwc.sh.)

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_nvmeof-powercut");

fn have(dir: &Path, run: &str) -> Vec<(u64, u64)> {
    let out = Command::new(BIN)
        .args(["check", dir.to_str().unwrap(), run])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (a, b) = l.strip_prefix("HAVE ").unwrap().split_once('-').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect()
}

fn kill_after_acks(dir: &Path, run: &str, extra: &[&str], acks: usize) -> Vec<u64> {
    let mut child = Command::new(BIN)
        .arg("write")
        .args(extra)
        .args([dir.to_str().unwrap(), run])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        got.push(line.strip_prefix("ACK ").unwrap().parse::<u64>().unwrap());
        if got.len() >= acks || start.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL, by PID
    child.wait().unwrap();
    got
}

#[test]
fn acked_records_survive_a_kill_and_damage_is_seen() {
    let dir = std::env::temp_dir().join(format!("nvmeof-powercut-{}", std::process::id()));
    let acked = kill_after_acks(&dir, "r1", &[], 200);
    assert!(acked.len() >= 200, "{} acknowledgements", acked.len());
    assert_eq!(acked, (0..acked.len() as u64).collect::<Vec<_>>());
    let ranges = have(&dir, "r1");
    for id in &acked {
        assert!(
            ranges.iter().any(|(a, b)| a <= id && id <= b),
            "acknowledged record {id} missing: {ranges:?}"
        );
    }
    // Damage one byte of record 5: it is no longer listed.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("ns-r1.img"))
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 5 * 4096 + 1000).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], 5 * 4096 + 1000).unwrap();
    let ranges = have(&dir, "r1");
    assert!(
        !ranges.iter().any(|(a, b)| *a <= 5 && 5 <= *b),
        "{ranges:?}"
    );
    assert!(ranges.iter().any(|(a, b)| *a <= 4 && 4 <= *b));
    assert!(ranges.iter().any(|(a, b)| *a <= 6 && 6 <= *b));
    // Another run's name sees nothing of this one; a missing file is no record.
    assert!(have(&dir, "r2").is_empty());

    // The control acknowledges at plain write completion.
    let acked = kill_after_acks(&dir, "r3", &["--no-flush"], 100);
    assert!(acked.len() >= 100);
    let ranges = have(&dir, "r3");
    assert!(ranges
        .iter()
        .any(|(a, b)| *a == 0 && *b + 1 >= acked.len() as u64));
    let _ = std::fs::remove_dir_all(dir);
}
