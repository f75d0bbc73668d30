//! The command line tools as a user runs them: `nvmeof-target` (embedded default and
//! an nvmetcli JSON file), `nvmeof` (discover, id-ctrl, write, read, list-ns, id-ns,
//! a refused host) and `nvmeof-perf --self`. Every target listens on a random
//! 127.x.y.z with service 0 (softroce devices are per address and process).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{pattern, random_loopback};
use serde_json::Value;

const TARGET: &str = env!("CARGO_BIN_EXE_nvmeof-target");
const NVMEOF: &str = env!("CARGO_BIN_EXE_nvmeof");
const PERF: &str = env!("CARGO_BIN_EXE_nvmeof-perf");
const DEFAULT_NQN: &str = "nqn.2024-01.io.fabric:nvmeof-target";
const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-00000000000a";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-4000-8000-00000000000b";

/// A running nvmeof-target; SIGTERM on drop.
struct TargetProc {
    child: Child,
    traddr: String,
    trsvcid: String,
    lines: mpsc::Receiver<String>,
}

impl TargetProc {
    /// Starts the target and waits for "ready", taking the first port's address.
    fn start(cmd: &mut Command) -> TargetProc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nvmeof-target starts");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut traddr, mut trsvcid) = (None, None);
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("nvmeof-target said nothing ready ({e})"));
            if line.contains(" listening: ") && traddr.is_none() {
                let words: Vec<&str> = line.split_whitespace().collect();
                let after = |key: &str| {
                    words
                        .iter()
                        .position(|w| *w == key)
                        .and_then(|i| words.get(i + 1))
                        .map(|s| s.to_string())
                };
                traddr = after("traddr");
                trsvcid = after("trsvcid");
            }
            if line.ends_with("ready (SIGINT or SIGTERM stops it)") {
                break;
            }
        }
        let trsvcid = trsvcid.expect("a printed trsvcid");
        assert_ne!(trsvcid, "0", "the printed port is the one chosen");
        TargetProc {
            child,
            traddr: traddr.expect("a printed traddr"),
            trsvcid,
            lines: rx,
        }
    }

    /// `nvmeof <cmd> -t softroce -a <traddr> <svc_flag> <port> <args>`.
    fn nvmeof(&self, cmd: &str, svc_flag: &str, args: &[&str]) -> Output {
        Command::new(NVMEOF)
            .arg(cmd)
            .args([
                "-t",
                "softroce",
                "-a",
                &self.traddr,
                svc_flag,
                &self.trsvcid,
            ])
            .args(args)
            .output()
            .expect("nvmeof runs")
    }

    /// SIGTERM, then the exit status and the rest of stdout.
    fn stop(mut self) -> (bool, Vec<String>) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        // The reader thread may still be passing on the last lines: take them until it
        // sees the end of the pipe (bounded).
        let mut rest = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => rest.push(l),
                Err(_) => break,
            }
        }
        (status.success(), rest)
    }
}

impl Drop for TargetProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output, what: &str) -> Value {
    let text = ok(out, what);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "nvmeof-tools-{tag}-{}-{}",
        std::process::id(),
        random_loopback()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn hex_field(v: &Value, key: &str) -> u64 {
    let s = v[key].as_str().unwrap_or_else(|| panic!("{key}: {v}"));
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex")
}

#[test]
fn default_target_discover_identify_write_read() {
    // No arguments: the embedded default. Its address comes from the environment so
    // that this test does not take 127.0.0.1's softroce device from anyone.
    let ip = random_loopback().to_string();
    let t = TargetProc::start(Command::new(TARGET).env("NVMEOF_TARGET_TRADDR", &ip));
    assert_eq!(t.traddr, ip);

    let disc = json(&t.nvmeof("discover", "-s", &["-o", "json"]), "discover");
    let records = disc["records"].as_array().expect("records");
    assert_eq!(records.len(), 1, "{disc}");
    assert_eq!(records[0]["subnqn"], DEFAULT_NQN);
    assert_eq!(records[0]["trsvcid"], t.trsvcid.as_str());
    assert_eq!(records[0]["traddr"], ip.as_str());
    assert_eq!(records[0]["trtype"], "rdma");
    assert_eq!(records[0]["subtype"], "nvme subsystem");
    assert_eq!(records[0]["rdma_prtype"], "roce-v2");
    let text = ok(&t.nvmeof("discover", "-s", &[]), "discover");
    assert!(text.contains("Discovery Log Number of Records 1"), "{text}");

    let id = json(&t.nvmeof("id-ctrl", "-s", &["-o", "json"]), "id-ctrl");
    assert_eq!(id["subnqn"], DEFAULT_NQN);
    assert_eq!(id["sn"].as_str().map(str::trim), Some("fabric0001"));
    assert_eq!(
        id["mn"].as_str().map(str::trim),
        Some("fabric nvmeof memory")
    );
    assert_eq!(id["cntrltype"], 1, "an I/O controller");
    assert_eq!(hex_field(&id, "sqes"), 0x66, "64-byte SQEs");
    assert_eq!(hex_field(&id, "cqes"), 0x44, "16-byte CQEs");
    assert!(hex_field(&id, "ver") >= 0x10300, "NVMe 1.3 or later: {id}");
    assert!(id["nn"].as_u64() >= Some(1));
    assert!(id["cntlid"].as_u64() >= Some(1));
    assert!(id["maxcmd"].as_u64() >= Some(32));
    assert!(id["ioccsz"].as_u64() > Some(4), "in-capsule data: {id}");
    assert_eq!(id["iorcsz"], 1, "16-byte responses");
    assert_eq!(id["icdoff"], 0);
    assert_ne!(hex_field(&id, "sgls"), 0, "fabrics need SGLs");

    // Write 8 blocks of a pattern from a file, read them back to a file and to stdout.
    let dir = temp_dir("default");
    let data = pattern(0xC0FFEE, 4096);
    let src = dir.join("data.bin");
    let back = dir.join("back.bin");
    std::fs::write(&src, &data).expect("write data");
    let src_s = src.to_string_lossy().into_owned();
    let back_s = back.to_string_lossy().into_owned();
    let rw = ["-n", "1", "-s", "16", "-c", "7", "-z", "4096", "-d"];
    let w = t.nvmeof("write", "--trsvcid", &[&rw[..], &[src_s.as_str()]].concat());
    ok(&w, "write");
    assert!(String::from_utf8_lossy(&w.stderr).contains("write: Success"));
    ok(
        &t.nvmeof("read", "--trsvcid", &[&rw[..], &[back_s.as_str()]].concat()),
        "read",
    );
    assert_eq!(std::fs::read(&back).expect("read back"), data);
    let stdout = t.nvmeof("read", "--trsvcid", &["-s", "16", "-c", "7"]);
    ok(&stdout, "read to stdout");
    assert_eq!(stdout.stdout, data);
    // Blocks next to the written ones are untouched (zeros).
    let before = t.nvmeof("read", "--trsvcid", &["-s", "15", "-c", "0"]);
    ok(&before, "read");
    assert_eq!(before.stdout, vec![0u8; 512]);
    // Compare agrees with the data, and refuses other data.
    ok(
        &t.nvmeof("compare", "--trsvcid", &["-s", "16", "-d", &src_s]),
        "compare",
    );
    let wrong = t.nvmeof("compare", "--trsvcid", &["-s", "17", "-d", &src_s]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("CompareFailure"));

    let (clean, rest) = t.stop();
    assert!(clean, "SIGTERM ends the target with status 0");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    let _ = std::fs::remove_dir_all(dir);
}

fn write_config(dir: &Path, ip: &str, nqn: &str) -> PathBuf {
    let file_ns = dir.join("ns2.img");
    let cfg = serde_json::json!({
        "hosts": [{"nqn": HOST_A}],
        "ports": [{
            "addr": {"adrfam": "ipv4", "traddr": ip, "treq": "not specified",
                     "trsvcid": "0", "trtype": "softroce"},
            "portid": 1, "referrals": [], "subsystems": [nqn]
        }],
        "subsystems": [{
            "allowed_hosts": [HOST_A],
            "attr": {"allow_any_host": "0", "serial": "cfg-serial", "model": "cfg model"},
            "namespaces": [
                {"device": {"path": "memory:1M"}, "enable": 1, "nsid": 1},
                {"device": {"path": file_ns.to_string_lossy(), "size": "2M"},
                 "enable": 1, "nsid": 2}
            ],
            "nqn": nqn
        }]
    });
    let path = dir.join("target.json");
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).expect("json")).expect("config");
    path
}

#[test]
fn config_file_two_namespaces_and_a_refused_host() {
    let dir = temp_dir("config");
    let ip = random_loopback().to_string();
    let nqn = "nqn.2024-01.io.fabric:tools-config";
    let cfg = write_config(&dir, &ip, nqn);
    let t = TargetProc::start(Command::new(TARGET).arg(&cfg));
    assert_eq!(t.traddr, ip);

    let q_a = ["-q", HOST_A, "-o", "json"];
    let list = json(
        &t.nvmeof(
            "list-ns",
            "--trsvcid",
            &[&["--nqn", nqn][..], &q_a].concat(),
        ),
        "list-ns",
    );
    let nsids: Vec<u64> = list["nsid_list"]
        .as_array()
        .expect("nsid_list")
        .iter()
        .filter_map(|n| n["nsid"].as_u64())
        .collect();
    assert_eq!(nsids, vec![1, 2]);
    for (nsid, blocks, thin) in [("1", 2048, 0), ("2", 4096, 1)] {
        let ns = json(
            &t.nvmeof(
                "id-ns",
                "--trsvcid",
                &[&["--nqn", nqn, "-n", nsid][..], &q_a].concat(),
            ),
            "id-ns",
        );
        assert_eq!(ns["nsze"], blocks, "namespace {nsid}: {ns}");
        assert_eq!(ns["nsfeat"], thin, "files are thin provisioned");
        assert_eq!(ns["lbafs"][0]["ds"], 9);
    }
    let id = json(
        &t.nvmeof("id-ctrl", "-s", &q_a),
        "id-ctrl (NQN from discovery)",
    );
    assert_eq!(id["subnqn"], nqn);
    assert_eq!(id["sn"].as_str().map(str::trim), Some("cfg-serial"));

    // The file namespace takes data.
    let dir_s = dir.join("d.bin");
    std::fs::write(&dir_s, pattern(7, 1024)).expect("data");
    let d = dir_s.to_string_lossy().into_owned();
    ok(
        &t.nvmeof(
            "write",
            "--trsvcid",
            &["--nqn", nqn, "-q", HOST_A, "-n", "2", "-s", "100", "-d", &d],
        ),
        "write to the file namespace",
    );
    let r = t.nvmeof(
        "read",
        "--trsvcid",
        &[
            "--nqn", nqn, "-q", HOST_A, "-n", "2", "-s", "100", "-c", "1",
        ],
    );
    ok(&r, "read");
    assert_eq!(r.stdout, pattern(7, 1024));

    // Host B is not allowed: discovery shows it nothing, and connecting is refused.
    let disc = json(
        &t.nvmeof("discover", "-s", &["-q", HOST_B, "-o", "json"]),
        "discover",
    );
    assert_eq!(disc["records"].as_array().map(Vec::len), Some(0), "{disc}");
    let refused = t.nvmeof("id-ctrl", "-s", &["-n", nqn, "-q", HOST_B]);
    assert!(!refused.status.success(), "host B must be refused");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("ConnectInvalidHost"), "{why}");

    let (clean, _) = t.stop();
    assert!(clean);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_config_is_an_error() {
    let dir = temp_dir("bad");
    let path = dir.join("bad.json");
    std::fs::write(&path, r#"{"subsystems": [], "ports": []}"#).expect("write");
    let out = Command::new(TARGET).arg(&path).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ports"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn perf_self_short_run_gives_sane_json() {
    let dir = temp_dir("perf");
    let svg = dir.join("lat.svg");
    let out = Command::new(PERF)
        .args([
            "--self", "-w", "randrw", "-M", "70", "-o", "4k", "-q", "4", "-P", "2",
        ])
        .args([
            "-t",
            "0.5",
            "--warmup",
            "0",
            "--ns-size",
            "8M",
            "--json",
            "--svg",
        ])
        .arg(&svg)
        .output()
        .expect("nvmeof-perf runs");
    let v = json(&out, "nvmeof-perf --self");
    assert_eq!(v["workload"], "randrw");
    assert_eq!(v["io_size"], 4096);
    assert_eq!(v["queues"], 2);
    assert_eq!(v["queue_depth"], 4);
    assert_eq!(v["target"]["provider"], "softroce");
    assert_eq!(v["target"]["backend"], "memory");
    let ios = v["ios"].as_u64().expect("ios");
    assert!(ios > 0, "{v}");
    let reads = v["read"]["ios"].as_u64().unwrap_or(0);
    let writes = v["write"]["ios"].as_u64().unwrap_or(0);
    assert_eq!(reads + writes, ios);
    assert!(reads > 0 && writes > 0, "a mix: {v}");
    let iops = v["iops"].as_f64().expect("iops");
    assert!((iops - ios as f64 / 0.5).abs() <= 1.0, "{v}");
    let mbs = v["mb_s"].as_f64().expect("mb_s");
    assert!((mbs - iops * 4096.0 / 1e6).abs() < 0.05 * mbs + 0.01, "{v}");
    let lat = &v["latency"];
    let f = |k: &str| lat[k].as_f64().unwrap_or_else(|| panic!("{k}: {lat}"));
    assert_eq!(lat["count"].as_u64(), Some(ios));
    assert!(f("min_us") > 0.0);
    assert!(
        f("min_us") <= f("p50_us") && f("p50_us") <= f("p99_us"),
        "{lat}"
    );
    assert!(
        f("p99_us") <= f("p99_9_us") && f("p99_9_us") <= f("max_us"),
        "{lat}"
    );
    assert!(
        f("min_us") <= f("avg_us") && f("avg_us") <= f("max_us"),
        "{lat}"
    );
    let picture = std::fs::read_to_string(&svg).expect("the SVG exists");
    assert!(picture.starts_with("<svg") && picture.contains("p99.9"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn perf_refuses_out_of_range_options() {
    for args in [
        &["--self", "-q", "0"][..],
        &["--self", "-q", "129"],
        &["--self", "-t", "601"],
        &["--self", "-w", "trim"],
        &["-w", "randread"],
    ] {
        let out = Command::new(PERF).args(args).output().expect("runs");
        assert!(!out.status.success(), "{args:?} must fail");
    }
}

#[test]
fn help_shows_a_working_example() {
    for (bin, want) in [
        (NVMEOF, "nvmeof read "),
        (NVMEOF, "nvmeof discover -t softroce"),
        (TARGET, "nvmetcli"),
        (PERF, "nvmeof-perf --self"),
    ] {
        let out = Command::new(bin).arg("--help").output().expect("runs");
        let text = ok(&out, "--help");
        assert!(text.contains(want), "{bin} --help lacks {want:?}");
    }
}

#[test]
fn hold_keeps_the_controller_only_with_keep_alive() {
    // `nvmeof hold`: idle past KATO (1 s here) with Keep Alive commands every KATO / 2
    // the controller still answers; without them the target ends the association.
    let ip = random_loopback().to_string();
    let t = TargetProc::start(Command::new(TARGET).env("NVMEOF_TARGET_TRADDR", &ip));
    let args = ["--seconds", "3", "-k", "1000", "-o", "json"];
    let kept = json(
        &t.nvmeof("hold", "--trsvcid", &args),
        "hold with keep-alive",
    );
    assert_eq!(kept["kato_ms"], 1000, "the target's KATO: {kept}");
    assert_eq!(kept["alive_after"], true, "{kept}");
    assert_eq!(kept["keep_alive"], true, "{kept}");
    let dropped = t.nvmeof(
        "hold",
        "--trsvcid",
        &[&args[..], &["--no-keep-alive"]].concat(),
    );
    assert!(
        !dropped.status.success(),
        "no keep-alive, yet the controller answered"
    );
    let err = String::from_utf8_lossy(&dropped.stderr);
    assert!(err.contains("controller gone after 3 s idle"), "{err}");
    let v: Value = serde_json::from_slice(&dropped.stdout).expect("JSON even when gone");
    assert_eq!(v["alive_after"], false, "{v}");
    assert_eq!(v["keep_alive"], false, "{v}");
    // --reconnect: the host library connects again and the new association answers.
    let back = json(
        &t.nvmeof(
            "hold",
            "--trsvcid",
            &[&args[..], &["--no-keep-alive", "--reconnect"]].concat(),
        ),
        "hold, then reconnect",
    );
    assert_eq!(back["alive_after"], false, "{back}");
    assert_eq!(back["reconnected"], true, "{back}");
    assert!(back["error"].is_null(), "{back}");
}
