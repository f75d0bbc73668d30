//! The conformance suite against the verbs provider, one test per group, when built
//! with `--features verbs` (`cargo test -p fabric-conformance --features verbs --test
//! verbs`). It needs an RDMA device (kernel `rdma_rxe` will do): where getinfo finds
//! none, every test fails with the provider's reason ("no RDMA device: ..."), so run it
//! only where one exists, e.g. inside the VM tier (providers/verbs/vm/verbs-step.sh
//! runs the `fabric-conformance` binary instead). Without the feature this file is
//! empty.
#![cfg(feature = "verbs")]

/// The tests of this file share the host's RDMA device: one at a time.
static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fabric_conformance::group_tests!(
    "verbs",
    guard = DEVICE.lock().unwrap_or_else(|e| e.into_inner())
);
