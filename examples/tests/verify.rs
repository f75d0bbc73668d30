//! The bandwidth and latency tools check their data when asked (`verify`, on by
//! default with `--self`): both halves in this process over tcp and softroce, every
//! echo and every transfer checked, the servers ending cleanly.

use fabric_examples::rmabw::{self, RmaOp};
use fabric_examples::{pingpong, Mode};

/// A loopback address of this test's own (softroce has one device per address, and
/// another process may hold 127.0.0.1).
fn addr(k: u32) -> String {
    let b = 20 + std::process::id() % 200;
    format!("127.{b}.{}.{k}", std::process::id() % 250 + 1)
}

fn pingpong_verified(provider: &str, node: &str) {
    let opts = pingpong::Options {
        sizes: vec![8, 4096, 65536],
        iterations: Some(20),
        warmup: 2,
        mode: Mode::Poll,
        verify: true,
    };
    let res = pingpong::run_self(provider, node, &opts).expect("pingpong");
    assert_eq!(res.len(), 3);
    assert!(res.iter().all(|r| r.iterations == 20), "{res:?}");
}

fn rmabw_verified(provider: &str, node: &str, op: RmaOp) {
    let opts = rmabw::Options {
        op,
        sizes: vec![4096, 65536],
        transfers: Some(16),
        window: 8,
        mode: Mode::Poll,
        verify: true,
    };
    let res = rmabw::run_self(provider, node, &opts).expect("rma-bw");
    assert_eq!(res.len(), 2);
    assert!(
        res.iter().all(|r| r.transfers == 16 && r.mb_per_s > 0.0),
        "{res:?}"
    );
}

#[test]
fn tcp_tools_verify_their_data() {
    pingpong_verified("tcp", "127.0.0.1");
    for op in [RmaOp::Write, RmaOp::Read, RmaOp::WriteData] {
        rmabw_verified("tcp", "127.0.0.1", op);
    }
}

#[test]
fn softroce_tools_verify_their_data() {
    pingpong_verified("softroce", &addr(1));
    for (k, op) in [RmaOp::Write, RmaOp::Read, RmaOp::WriteData]
        .into_iter()
        .enumerate()
    {
        rmabw_verified("softroce", &addr(2 + k as u32), op);
    }
}
