//! The tools' newer flags through their command lines and library: RDM ping-pong
//! (`-e rdm`, `--tagged`) with its data checked, `--sizes` / `--provider` selection,
//! and a fabric-compare run restricted to one provider and one size.

use std::process::Command;

use fabric_examples::{pingpong, rdmpp, Mode};

fn opts(sizes: Vec<usize>) -> pingpong::Options {
    pingpong::Options {
        sizes,
        iterations: Some(20),
        warmup: 2,
        mode: Mode::Poll,
        verify: true,
    }
}

/// Both halves over tcp's RDM endpoints, untagged and tagged, eager (8 B, 4 KiB) and
/// rendezvous (64 KiB, above the 8 KiB eager limit) sizes: every echo is checked byte
/// for byte, with its length, tag and source address.
#[test]
fn rdm_pingpong_self_checks_every_echo() {
    for tagged in [false, true] {
        let res = rdmpp::run_self("tcp", "127.0.0.1", tagged, &opts(vec![8, 4096, 65536]))
            .unwrap_or_else(|e| panic!("tagged {tagged}: {e}"));
        assert_eq!(
            res.iter().map(|r| r.size).collect::<Vec<_>>(),
            vec![8, 4096, 65536]
        );
        assert!(
            res.iter().all(|r| r.iterations == 20
                && r.lat_median_us > 0.0
                && r.lat_p99_us.is_some_and(|p| p >= r.lat_median_us)
                && r.cpu.is_some()),
            "{res:?}"
        );
    }
    // The layered name works as the provider too.
    rdmpp::run_self("tcp;rxm", "127.0.0.1", true, &opts(vec![8])).expect("tcp;rxm");
}

/// A provider the registry does not have is an error, not a hang.
#[test]
fn rdm_pingpong_unknown_provider_fails() {
    let e = rdmpp::run_self("nosuch", "127.0.0.1", false, &opts(vec![8])).unwrap_err();
    assert!(!e.is_empty());
}

fn run(bin: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("start the tool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `fabric-pingpong --self -e rdm --tagged --sizes ...` through the binary: the JSON
/// names the layered provider, the sizes asked for, and a CPU cost per size.
#[test]
fn pingpong_binary_rdm_tagged_and_sizes() {
    let bin = env!("CARGO_BIN_EXE_fabric-pingpong");
    let (ok, out, err) = run(
        bin,
        &[
            "--self", "-e", "rdm", "--tagged", "-p", "tcp", "--sizes", "8,16k", "-I", "20",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["provider"], "tcp;rxm");
    assert_eq!(v["endpoint"], "RDM endpoints, tagged");
    assert_eq!(v["cpu_counts_both_ends"], true);
    let sizes: Vec<u64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![8, 16384]);
    assert!(v["results"][0]["cpu"]["s_per_mmsg"].as_f64().unwrap() >= 0.0);
    // --tagged without -e rdm is refused with a reason; a bad size list too.
    let (ok, _, err) = run(bin, &["--self", "--tagged", "-S", "8"]);
    assert!(!ok && err.contains("--tagged needs -e rdm"), "{err}");
    let (ok, _, err) = run(bin, &["--self", "-S", "8,x"]);
    assert!(!ok && err.contains("not a number"), "{err}");
}

/// A compare run restricted to tcp and one size: only tcp, its RDM row and tcp's
/// limits are measured (no softroce, no UDP), ratios are against raw TCP, the limit
/// lines are dashed, and the table names each row's progress mode.
#[test]
fn compare_restricted_to_one_provider_and_size() {
    let dir = std::env::temp_dir().join(format!("fabric-compare-test-{}", std::process::id()));
    let bin = env!("CARGO_BIN_EXE_fabric-compare");
    let (ok, out, err) = run(
        bin,
        &[
            "--quick",
            "--provider",
            "tcp",
            "--sizes",
            "8",
            "--rma-sizes",
            "64k",
            "--no-libfabric",
            "-o",
            dir.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("compare.json")).unwrap()).unwrap();
    let labels: Vec<&str> = json["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        vec![
            "tcp",
            "tcp;rxm RDM tagged",
            "raw TCP, busy-polled",
            "raw TCP stream"
        ]
    );
    for s in json["series"].as_array().unwrap() {
        let pp = s["pingpong"].as_object().unwrap();
        assert!(pp.keys().all(|k| k == "8"), "{s}");
    }
    assert_eq!(json["series"][0]["limit"], "raw TCP, busy-polled");
    assert_eq!(json["series"][1]["limit"], "tcp");
    assert_eq!(json["errors"].as_array().unwrap().len(), 0);
    assert!(out.contains("tcp / raw TCP, busy-polled"), "{out}");
    assert!(out.contains("tcp;rxm RDM tagged / tcp"), "{out}");
    assert!(out.contains("busy-poll, manual progress"), "{out}");
    assert!(
        !out.contains("softroce") && !out.contains("raw UDP"),
        "{out}"
    );
    let svg = std::fs::read_to_string(dir.join("compare.svg")).unwrap();
    // The one limit with ping-pong points (raw TCP) is dashed in both panels and in
    // the legend.
    assert_eq!(svg.matches("stroke-dasharray").count(), 3, "{svg}");
    let md = std::fs::read_to_string(dir.join("compare.md")).unwrap();
    assert!(
        md.contains("| tcp | provider | busy-poll, manual progress |"),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
