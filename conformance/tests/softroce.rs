//! The conformance suite against the softroce provider, one test per group so failures are
//! easy to read. Each test prints every case line and asserts no failure and at least
//! one pass (a provider that cannot run here fails the test rather than skipping it).

use fabric_conformance::cases::{all, GROUPS};
use fabric_conformance::{ctx_for, run, RunOptions};

const PROVIDER: &str = "softroce";

fn group(name: &str) {
    let opts = RunOptions {
        filter: Some(format!("{name}/*")),
        ..RunOptions::default()
    };
    let report = run(&ctx_for(PROVIDER), &all(), &opts, |r| println!("{r}"))
        .expect("softroce is compiled in");
    println!("{name}: {}", report.summary());
    assert!(report.cases.iter().all(|c| c.group == name));
    assert!(
        report.failed == 0,
        "{} of {} {name} cases failed against {PROVIDER}:\n{}",
        report.failed,
        report.cases.len(),
        report.failures().join("\n")
    );
    assert!(
        report.passed > 0,
        "no {name} case passed against {PROVIDER}: {}",
        report.summary()
    );
}

#[test]
fn getinfo() {
    group("getinfo");
}

#[test]
fn mr() {
    group("mr");
}

#[test]
fn cq() {
    group("cq");
}

#[test]
fn eq() {
    group("eq");
}

#[test]
fn msg() {
    group("msg");
}

#[test]
fn rma() {
    group("rma");
}

#[test]
fn errors() {
    group("errors");
}

#[test]
fn pmem() {
    group("pmem");
}

/// The per-group tests above together run every case.
#[test]
fn groups_cover_every_case() {
    let tested = ["getinfo", "mr", "cq", "eq", "msg", "rma", "errors", "pmem"];
    assert_eq!(GROUPS, tested);
    for c in all() {
        assert!(
            tested.contains(&c.group),
            "{} is in no tested group",
            c.id()
        );
    }
}
