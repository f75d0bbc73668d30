//! The conformance suite against the softroce provider, one test per group so failures are
//! easy to read. Each test prints every case line and asserts no failure and at least
//! one pass (a provider that cannot run here fails the test rather than skipping it).
//!
//! Each group runs on a free loopback address of its own (the context's default for
//! softroce, `fabric_conformance::ctx::default_addr`), and the `fabric-conformance`
//! children of [`capture_checked_by_scapy`] pick their own: nothing depends on owning
//! 127.0.0.1:4791 ([`runs_while_127_0_0_1_4791_is_held`]). The tests of this file
//! still run one at a time: the suite is timing-sensitive (bounded waits) and the
//! machines it runs on have few cores.

const PROVIDER: &str = "softroce";

/// Serializes the tests of this file (see the module docs).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fabric_conformance::group_tests!(
    PROVIDER,
    guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
);

/// With 127.0.0.1:4791 held (by this test, or already by another process, which
/// proves the point as well), a group of the suite passes on this process's own free
/// address, and the `fabric-conformance` binary passes on the address `--addr` names.
#[test]
fn runs_while_127_0_0_1_4791_is_held() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let held = std::net::UdpSocket::bind("127.0.0.1:4791");
    println!(
        "127.0.0.1:4791 {}",
        if held.is_ok() {
            "held by this test"
        } else {
            "already held by another process"
        }
    );
    fabric_conformance::assert_group(PROVIDER, "eq");
    let addr = fabric_softroce::free_loopback_ip().expect("a free loopback address");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric-conformance"))
        .args(["-p", PROVIDER, "--filter", "rma/write_sizes*", "--addr"])
        .arg(addr.to_string())
        .env_remove("SOFTROCE_FAULTS")
        .output()
        .expect("run fabric-conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains(&format!("on {addr}")),
        "fabric-conformance --addr {addr} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(held);
}

/// Captures a representative part of the suite (the errors group and message and RMA
/// cases, sizes up to 64 KiB) with `SOFTROCE_PCAP` in a child process, and checks every
/// frame with scapy's RoCE layer (`providers/softroce/tests/check_pcap.py`): each one
/// must parse as RoCEv2 and its ICRC must verify.
#[test]
fn capture_checked_by_scapy() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let has_scapy = std::process::Command::new("python3")
        .args(["-c", "import scapy.contrib.roce"])
        .output()
        .is_ok_and(|o| o.status.success());
    let dir = std::env::temp_dir().join(format!("softroce-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let filters = [
        "errors/*",
        "msg/size_6*",
        "msg/size_409*",
        "msg/senddata",
        "msg/injectdata",
        "msg/sendv_gather",
        "msg/recvv_scatter",
        "msg/unexpected",
        "msg/*truncation",
        "msg/zero_length_no_iov",
        "rma/write_sizes_offsets",
        "rma/read_sizes_offsets",
        "rma/*msg_iovs",
        "rma/writedata*",
        "rma/zero_length",
        "rma/inject_write",
        "rma/delivery_complete",
    ];
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../providers/softroce/tests/check_pcap.py"
    );
    for (i, f) in filters.iter().enumerate() {
        let pcap = dir.join(format!("run{i}.pcap"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric-conformance"))
            .args(["-p", PROVIDER, "--filter", f])
            .env("SOFTROCE_PCAP", &pcap)
            .env_remove("SOFTROCE_FAULTS")
            .output()
            .expect("run fabric-conformance");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "fabric-conformance --filter {f} failed under capture:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let size = std::fs::metadata(&pcap).map(|m| m.len()).unwrap_or(0);
        assert!(size > 24, "{f}: empty capture");
        if !has_scapy {
            continue;
        }
        let check = std::process::Command::new("python3")
            .arg(script)
            .arg(&pcap)
            .output()
            .expect("run check_pcap.py");
        let report = String::from_utf8_lossy(&check.stdout);
        println!("{f}: {}", report.trim());
        assert!(
            check.status.success() && report.contains(" 0 bad"),
            "scapy rejected the capture of {f}:\n{report}{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !has_scapy {
        println!("SKIP scapy check of the conformance capture: python3 with scapy not available (.ci/install-test-deps installs it)");
    }
}
