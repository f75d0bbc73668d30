//! # fabric-verbs
//!
//! The `verbs` provider of the fabric API: libibverbs and librdmacm (rdma-core)
//! through the [`rdma-sys`](https://docs.rs/rdma-sys) binding, for RDMA NICs
//! (InfiniBand, RoCE, iWARP) and kernel soft-RoCE (`rdma_rxe`).
//!
//! **Status: runs over kernel soft-RoCE** (`rdma_rxe`, Debian 12's 6.1 kernel) in the
//! project's VM tier (`tests/vm/run`, step `verbs`: the conformance suite, the
//! device-only checks of `conformance/tests/verbs.rs`, `fabric-pingpong` and
//! `fabric-rma-bw`). Not yet run on RDMA hardware (the development hosts have none).
//!
//! ## Building
//! The binding is behind this crate's cargo feature `verbs` (the `fabric` facade's
//! feature `verbs` turns it on), so `cargo build --workspace` needs no C library.
//! With it: `apt-get install libibverbs-dev librdmacm-dev libclang-dev pkg-config`
//! (rdma-sys 0.3 runs bindgen at build time; Debian 12's libclang 14 works). Without
//! it the provider is still registered and getinfo rejects it with "built without its
//! `verbs` cargo feature".
//!
//! ## getinfo
//! One answer per device, active port and GID (RoCE v1 GIDs are skipped: they repeat
//! the v2 GIDs' addresses and rdma_cm uses v2), with `domain_name` the device
//! ("rxe0"), `fabric_name` like `RoCEv2 port 1 gid 1 (10.0.2.15)`, `src_addr` the
//! GID's IP address. Limits come from the device: `max_msg_size` = the port's
//! `max_msg_sz`; `inject_size` = the inline size an RC queue pair accepted when probed
//! (devices report it only through `ibv_create_qp`); `mr_key_size` 4; `cq_data_size` 4
//! (the immediate); `rx_size` = min(`max_qp_wr`, 1024) and `tx_size` that divided by 9
//! (an operation may take 8 work requests, one per remote iovec, plus a read);
//! `iov_limit` = min(`max_sge`, 16); `rma_iov_limit` 8; `cm_data_size` 55 (the 56
//! bytes an RDMA CM REQ carries in the TCP port space, less a length byte, since IB CM
//! pads private data); `mtu` = the port's active MTU. `mr_mode` LOCAL | VIRT_ADDR |
//! PROV_KEY. No device: "no RDMA device: load rdma_rxe ... or plug in a NIC". A source
//! address in the hints must be the GID's (or unspecified, or loopback); an address
//! of the other family than the GID's is not served by that answer.
//!
//! ## Loopback
//! rdma_cm cannot bind or resolve 127.0.0.1 on RoCE: no device has a GID for `lo`
//! (`rdma_bind_addr` fails with ENODEV; librpma's answer is "loopback will never
//! work"). The provider gives loopback its usual meaning, *this machine*, by serving
//! it with the answer's own GID address of the same family (IPv6 link-local cannot
//! serve `::1`): a listener on 127.0.0.1:P binds GID:P, a connect to 127.0.0.1:P
//! resolves GID:P, and such endpoints report the GID's address as the loopback
//! address they were opened on (so `local_addr` says 127.0.0.1:P). Traffic between
//! two ids on the device's own address never leaves the device (rxe loops it back).
//! A listener on loopback refuses requests from any other address than the GID's,
//! since, unlike `lo`, that address is reachable from other machines.
//!
//! ## Mapping
//! - Connections: librdmacm on one event channel per fabric (RDMA_PS_TCP). Connect is
//!   asynchronous (address, route, queue pair, `rdma_connect`); the accept and reject
//!   data come back in `Connected`/`Error` events; a rejected or unanswered connect is
//!   `ConnectionRefused`. Connection data is framed with a length byte.
//! - Queue pairs: RC, every work request signaled, `retry_count` 7 and `rnr_retry` 7
//!   (infinite): a send or a write with immediate waits for the target's receive; the
//!   RNR NAK timer is lowered to 0.64 ms after establishment (the CM leaves 655 ms).
//! - send / inject = SEND (with immediate for remote CQ data; inject is
//!   `IBV_SEND_INLINE`); write = one RDMA WRITE per remote iovec (the last WITH_IMM for
//!   CQ data: the target consumes a receive); read = RDMA READ per remote iovec. One
//!   completion per operation, after its last work request.
//! - Atomics (`Caps::ATOMIC`, when the device's `atomic_cap` is not NONE): u64/i64
//!   sum = `IBV_WR_ATOMIC_FETCH_AND_ADD`, compare-and-swap =
//!   `IBV_WR_ATOMIC_CMP_AND_SWP`, one element per call (the set softroce offers);
//!   the old value lands in the result range (a non-fetching one's in the domain's
//!   scratch buffer); a misaligned remote address is refused at the call. Regions with
//!   both remote rights are registered `REMOTE_ATOMIC`. `atomic_cpu_coherent` is true
//!   only on `IBV_ATOMIC_GLOB` devices (kernel rxe says `IBV_ATOMIC_HCA`: its responder
//!   serializes atomics under its own lock), so the RDM layer keeps emulating atomics
//!   over rxe (its two paths must be atomic with respect to each other).
//! - Memory registration: `ibv_reg_mr` with LOCAL_WRITE for receive/read destinations
//!   and REMOTE_WRITE regions, REMOTE_READ/REMOTE_WRITE as asked (REMOTE_ATOMIC with
//!   both); PMEM and UNCACHED are
//!   carried by the region (a NIC's DMA writes cannot be made non-temporal from here:
//!   with Intel DDIO they land in the last-level cache, which is why COMMIT needs the
//!   platform statement below).
//! - Completions: an `ibv_cq` per completion queue with its own completion channel.
//!   The queues themselves are the shared provider layer's
//!   (`fabric_core::prov::ProviderCq`/`ProviderEq`) over the fabric's progress engine
//!   (`prov::Progress`): reads poll the CQs (and every 64th the CM channel); `sread`
//!   and async wakers arm the CQs and sleep in `poll` on their fds, the CM fd and the
//!   queue's eventfd. Manual progress by default; `Progress::Auto` or an async waiter
//!   starts the shared layer's progress thread (`prov::start_progress_thread`). The
//!   provider writes only the device side: work completions to `Completion`s.
//! - Work-completion statuses map to the kinds of the other providers
//!   ([`mapping::cq_error_kind`]): REM_ACCESS_ERR → `RemoteAccess`, REM_INV_REQ_ERR →
//!   `RemoteInvalid`, WR_FLUSH_ERR → `Canceled`, RETRY_EXC_ERR → `RetryExceeded`, ...
//!
//! ## The project's rules on verbs
//! - *A refused remote access ends the connection at both ends.* The responder NAKs
//!   and its QP goes to error; the requester's work request fails `RemoteAccess` and
//!   its QP goes to error. The requester, on that completion, disconnects (posts fail
//!   `NotConnected` at once) and reports `Shutdown { AccessError }`; the target, on the
//!   peer's disconnect, finds its own QP already in error with no failed work request of
//!   its own and reports `AccessError` too (else `Peer`).
//! - Posting to a dead endpoint fails at the call: `NotConnected`, `Shutdown` after a
//!   local shutdown. Outstanding work is flushed by the QP (`Canceled`).
//! - A write with CQ data that the target refuses has already taken one of the
//!   target's receives (rxe completes it with `REM_ACCESS_ERR` at the responder): that
//!   receive is reported `Canceled` (flushed by the end of the connection, nothing
//!   placed), and the target knows at once that its connection ended `AccessError`.
//! - Differences from tcp/softroce that RC hardware imposes: an oversized SEND fails
//!   the receive with `Truncated` *and ends the connection* (RC cannot truncate: the
//!   responder's QP goes to error and NAKs the SEND, whose completion fails
//!   `RemoteInvalid`); both ends report `Shutdown` (the receiver `Protocol`, the sender
//!   `AccessError`, from `REM_INV_REQ_ERR`), and later posts fail at the call. The
//!   answers state it (`Limits::truncation_ends_connection`), and the conformance case
//!   `msg/after_truncation` checks exactly that for such providers; the target's
//!   posted receives are flushed (`Canceled`) when its QP goes to error. rxe reports
//!   the too-short receive as `LOC_QP_OP_ERR`, hardware as `LOC_LEN_ERR`: on a receive
//!   both are `Truncated` ([`mapping::recv_error_kind`]).
//!
//! ## Completion levels and COMMIT
//! - Default, INJECT_COMPLETE, TRANSMIT_COMPLETE: the RC completion (the responder's
//!   ACK).
//! - DELIVERY_COMPLETE on a write: the writes, then a zero-length RDMA READ on the same
//!   QP; the responder executes requests in order, so its response comes after the
//!   writes were executed. On rxe (software) that means copied into the target's memory.
//!   On a PCIe NIC it means issued towards memory, not necessarily visible.
//! - COMMIT_COMPLETE: offered (`RMA_PMEM`) only when the operator states, with
//!   `VERBS_DIRECT_PMEM=1`, that the *target* platforms put NIC writes into their
//!   persistence domain (librpma's "direct write to PMem": Intel DDIO off for the NIC's
//!   root port with ADR, or eADR). Then a COMMIT write is the writes followed by an
//!   8-byte RDMA READ of the last written range (librpma's read-after-write): the NIC's
//!   PCIe read cannot pass its posted writes, so when the read returns every write has
//!   reached the memory controller, which on such a platform is persistent. On rxe the
//!   writes are CPU copies into the page (cache), so read-after-write gives visibility,
//!   not durability, unless the VM's platform has eADR; on an ordinary page-cache
//!   mapping nothing makes it durable without target software (msync), which one-sided
//!   verbs cannot run. A PMEM region registered on verbs gets REMOTE_READ added (the
//!   read targets it, as librpma requires). What verbs cannot do: refuse a COMMIT into a
//!   region not registered PMEM (the target NIC does not know which regions are PMEM),
//!   so that rule of the project holds only for tcp and softroce.
//! - Native IB FLUSH (`ibv_wr_flush`, opcode 0x1C; rdma-core 45+, kernels 6.2+ with a
//!   device reporting `IB_UVERBS_DEVICE_FLUSH_PERSISTENT`) is the right mechanism and
//!   would also give the refusal (a FLUSH into a region registered without
//!   `IBV_ACCESS_FLUSH_PERSISTENT` is NAKed). The scan detects the device capability,
//!   but this build's binding (rdma-sys over Debian 12's rdma-core 44) has no
//!   `ibv_wr_flush` and no extended-QP flush entry, so it is **not implemented**: COMMIT
//!   uses read-after-write everywhere for now.
//!
//! ## What rdma-sys lacks, and the shim
//! rdma-sys 0.3 provides the static-inline verbs by hand (`ibv_post_send`,
//! `ibv_post_recv`, `ibv_poll_cq`, `ibv_req_notify_cq`, `___ibv_query_port`), so no C
//! shim is needed. Missing: `ibv_query_gid_ex` (a static inline): GID types are read from
//! sysfs (`/sys/class/infiniband/DEV/ports/N/gid_attrs/types/I`); `ibv_wr_flush` (see
//! above). [`sys`](self) wraps each object in an owner that frees it on drop; every
//! unsafe block states its contract; no safe function takes a raw pointer.
//!
//! ## Memory safety of posted work
//! Each posted operation keeps its [`fabric_core::Segment`]s (and so their regions and
//! registrations) in the domain's table until its last work completion. A `Segment`
//! is a range checked to lie inside its region when it was made, which is what makes the
//! scatter/gather entries built from it (address, length, the region's lkey) sound.
//! Inline data is copied by `ibv_post_send`.
//!
//! ## The VM step
//! `tests/vm/steps/50-verbs.sh` is what the VM tier runs inside a VM with `rdma_rxe`
//! (`tests/vm/run --steps verbs`): the binaries `fabric-conformance`,
//! `fabric-pingpong` and `fabric-rma-bw` built with the facade's `verbs` feature, the
//! `verbs` test target of `fabric-conformance`, and this crate's `commit_crash` test
//! (COMMIT writes into a `MAP_SYNC` DAX mapping on the emulated NVDIMM, with
//! `VERBS_DIRECT_PMEM=1`, the target process SIGKILLed at random moments: every acked
//! write must be re-read intact; what that does and does not show is in the test's
//! docs) (lines in `tests/vm/binaries`),
//! with `libibverbs.so.1`, `librdmacm.so.1`, the rxe provider and glibc from the
//! guest's Debian packages.
//!
//! ```
//! // Without a device (or without the `verbs` feature) getinfo says why.
//! let r = fabric_core::Registry::new().with(fabric_verbs::provider());
//! let hints = fabric_core::Hints::new().provider("verbs");
//! if let Err(e) = r.getinfo(&hints) {
//!     println!("{e}");
//! }
//! ```
#![warn(missing_docs)]

pub mod mapping;
mod provider;
pub mod wr;

#[cfg(feature = "verbs")]
mod objects;
#[cfg(feature = "verbs")]
mod sys;

pub use provider::{
    caps, check_pmem, check_source, provider, raw_commit_declared, CAPS, DIRECT_PMEM_ENV,
    NO_DEVICE, NO_PMEM,
};
