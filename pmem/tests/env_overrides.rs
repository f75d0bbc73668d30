//! The real environment is read once per process, so each case runs this test
//! binary again as a child with `PMEM_*` variables set.

mod common;

use std::process::Command;

use pmem::{CpuFeatures, FlushMethod, Mapping, MappingKind, Overrides, PersistStrategy};

const CASE_VAR: &str = "PMEM_TEST_ENV_CASE";
const TEST_NAME: &str = "env_is_read_by_a_fresh_process";

/// Runs in the child: checks what the case's variables must have done.
fn child(case: &str) {
    let ov = Overrides::global();
    let s = PersistStrategy::global();
    let expect_method = FlushMethod::select(CpuFeatures::host(), pmem::has_eadr(), ov);
    assert_eq!(s.flush_method(), expect_method, "{case}");
    assert_eq!(pmem::flush_method(), expect_method, "{case}");
    match case {
        "force_on" | "force_off" => {
            let want = case == "force_on";
            assert_eq!(ov.is_pmem_force, Some(want));
            let dir = common::tempdir();
            let m = Mapping::create(dir.path().join("f"), 4096).unwrap();
            assert_eq!(m.is_pmem(), want);
            // Forcing is_pmem changes nothing about what the kernel gave.
            let kind = if common::on_dax() {
                MappingKind::Sync
            } else {
                MappingKind::PageCache
            };
            assert_eq!(m.kind(), kind, "PMEM_TEST_DAX={}", common::on_dax());
        }
        "no_clwb" => {
            assert!(ov.no_clwb);
            assert_ne!(s.flush_method(), FlushMethod::Clwb);
        }
        "no_clwb_no_clflushopt" => {
            assert!(ov.no_clwb && ov.no_clflushopt);
            assert!(!matches!(
                s.flush_method(),
                FlushMethod::Clwb | FlushMethod::ClflushOpt
            ));
            #[cfg(target_arch = "x86_64")]
            if !pmem::has_eadr() {
                assert_eq!(s.flush_method(), FlushMethod::Clflush);
            }
        }
        "no_flush" => assert_eq!(s.flush_method(), FlushMethod::NoFlush),
        "no_movnt" => {
            assert!(!s.uses_movnt());
            assert_eq!(s.movnt_threshold(), 4096);
        }
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn env_is_read_by_a_fresh_process() {
    if let Ok(case) = std::env::var(CASE_VAR) {
        child(&case);
        return;
    }
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("force_on", &[("PMEM_IS_PMEM_FORCE", "1")]),
        ("force_off", &[("PMEM_IS_PMEM_FORCE", "0")]),
        ("no_clwb", &[("PMEM_NO_CLWB", "1")]),
        (
            "no_clwb_no_clflushopt",
            &[("PMEM_NO_CLWB", "1"), ("PMEM_NO_CLFLUSHOPT", "1")],
        ),
        ("no_flush", &[("PMEM_NO_FLUSH", "1")]),
        (
            "no_movnt",
            &[("PMEM_NO_MOVNT", "1"), ("PMEM_MOVNT_THRESHOLD", "4096")],
        ),
    ];
    let exe = std::env::current_exe().unwrap();
    for (case, vars) in cases {
        let mut cmd = Command::new(&exe);
        cmd.args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"]);
        for (k, _) in std::env::vars() {
            // The library's variables go; the tests' own (PMEM_TEST_*) stay.
            if k.starts_with("PMEM_") && !k.starts_with("PMEM_TEST_") {
                cmd.env_remove(k);
            }
        }
        cmd.env(CASE_VAR, case).envs(vars.iter().copied());
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "case {case} failed:\n{stdout}\n{stderr}"
        );
        // Make sure the child really ran the test rather than filtering it out.
        assert!(
            stdout.contains("1 passed"),
            "case {case}: child ran no test:\n{stdout}"
        );
    }
}
