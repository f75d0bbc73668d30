//! NVMe over Fabrics, built only on this project's fabric API.
//!
//! What exists:
//!
//! * [`wire`] – the NVMe and NVMe-oF wire formats as pure code (no I/O): SQE, CQE,
//!   status, SGLs, Fabrics commands and Connect data, properties, Identify, log pages,
//!   the RDMA CM private data. Field offsets are pinned against libnvme's `types.h`
//!   (`tests/reference_offsets.rs`).
//! * [`transport`] – the binding to any fabric provider, after the NVMe-oF RDMA
//!   transport: CM private data as connect/accept/reject data, capsules and responses
//!   as messages, data by RMA against keyed SGLs (32-bit keys: getinfo asks for
//!   `mr_key_size(4)`, which tcp narrows its keys to; a provider whose keys stay wider
//!   is refused with [`Error::KeysTooWide`]),
//!   in-capsule data for small writes.
//! * [`target`] – subsystems (NQN, serial, model, allowed hosts), namespaces in memory,
//!   in a file (buffered, or `O_DIRECT`) or in a pmem mapping, ports, the discovery subsystem, controllers with dynamic
//!   IDs, admin and I/O queues. Fabrics: Connect, Property Get/Set (CAP, VS, CC, CSTS).
//!   Admin: Identify (controller, namespace, active list, descriptors), Get/Set
//!   Features (number of queues, keep-alive timer, volatile write cache, async event
//!   configuration), Keep Alive (timeout enforced), Get Log Page (error, SMART,
//!   changed namespaces, discovery), Asynchronous Event Request (held, never
//!   completed). I/O: Read, Write (FUA), Flush (one or all namespaces), Write Zeroes
//!   (DEAC), Dataset Management (deallocate punches holes in files), Verify, Compare,
//!   Copy (format 0). The Linux kernel's nvme-rdma host (nvme-cli) uses it over RDMA
//!   CM: softroce answers the kernel's IB CM requests on QP1 (the VM tier's step
//!   `nvme-kernel-host`; `tests/linux_host.rs` pins the capsules Linux builds
//!   differently from this crate's host). Responses never carry a remote invalidate:
//!   Linux hosts invalidate their keys themselves then.
//! * [`host`] – discovery, controller bring-up (Connect, its data always by keyed SGL
//!   as Linux nvmet-rdma's admin queue requires; CC.EN, CSTS.RDY, Identify,
//!   number of queues, I/O queues), keep-alive, reconnect after a lost association,
//!   and a block API: synchronous, batched, or asynchronous
//!   ([`Controller::submit_async`](host::Controller::submit_async) returns a future;
//!   up to the queue depth outstanding per queue). Completions are matched by
//!   command ID, in whatever order the target sends them
//!   ([`HostQueue::complete_any`](host::HostQueue::complete_any)).
//! * Queue depth: a target queue serves capsules in the order they arrive, and a
//!   command whose data it must fetch from the host (a Write, Compare, Dataset
//!   Management or Copy with a keyed SGL) waits for its RMA read while the queue
//!   serves the commands behind it, so responses leave out of order as NVMe allows.
//!   A Read's back end fills the registered buffer its RMA write goes from, and the
//!   write is posted with `OpFlags::MORE` so that tcp sends data and response in
//!   one `sendmsg`.
//! * [`tools`] – what the command line tools share: nvmetcli's saved-config JSON
//!   ([`tools::config`]), the `nvmeof-perf` load generator ([`tools::perf`]), latency
//!   histograms with an SVG picture ([`tools::stats`]), stderr logging and signals.
//!
//! The tools (`src/bin`):
//!
//! * `nvmeof-target [CONFIG.json]` – a target from nvmetcli's saved-config format
//!   (`trtype` names the fabric provider: softroce, tcp, rdma = verbs), or with no
//!   file an embedded default (64 MiB memory namespace, softroce on 127.0.0.1, a free
//!   port, printed); logs through `tracing` (`NVMEOF_LOG`); stops cleanly on SIGINT
//!   or SIGTERM.
//! * `nvmeof` – a user-space host in the manner of nvme-cli: `discover`,
//!   `connect-all`, `list`, `id-ctrl`, `id-ns`, `list-ns`, `get-log`, `get-feature`,
//!   `read`, `write`, `flush`, `write-zeroes`, `dsm`, `verify`, `compare`, `copy`,
//!   and `hold` (a keep-alive check: idle past KATO, with or without Keep Alive
//!   commands, then whether the controller still answers),
//!   with nvme-cli's option names (`-t -a -s -n`; `read`/`write` take `-s` start
//!   block, `-c` 0's based block count, `-z` data size, `-d` data file) and `-o json`.
//! * `nvmeof-perf` – in the manner of spdk_nvme_perf/fio: random or sequential
//!   read/write/mix, I/O size, queue depth 1..=128, queues, bounded duration; IOPS,
//!   MB/s, latency min/avg/p50/p99/p99.9/max, progress, `--json`, an SVG histogram;
//!   `--self` runs its own target in-process.
//! * `nvmeof-powercut` – `write|check DIR RUN`: checksummed records through a
//!   buffered file namespace, acked after FUA or Flush, for the VM tier's power cut
//!   ([`tools::powercut`]).
//!
//! ```text
//! $ nvmeof-target &
//! nvmeof-target: port 1 listening: trtype softroce traddr 127.0.0.1 trsvcid 41234 ...
//! $ nvmeof discover -t softroce -a 127.0.0.1 -s 41234
//! $ nvmeof write -a 127.0.0.1 --trsvcid 41234 -n 1 -s 0 -c 7 -z 4096 -d data.bin
//! $ nvmeof read  -a 127.0.0.1 --trsvcid 41234 -n 1 -s 0 -c 7 -z 4096 -d back.bin
//! $ nvmeof-perf --self -w randread -o 4k -q 32
//! ```
//!
//! Not here: in-band authentication, asynchronous events ever firing, ANA,
//! reservations, persistent (kernel) host connections, automatic resubmission after
//! a reconnect, back-end work on more than one thread per queue (a queue's back-end
//! reads and writes run one after another on its thread; only data transfers
//! overlap).
//!
//! A target with a memory namespace and a host reading it back, over softroce:
//!
//! ```no_run
//! use nvmeof::host::{Controller, HostConfig, TransportAddr};
//! use nvmeof::target::{NamespaceConfig, PortConfig, SubsystemConfig, Target};
//!
//! let target = Target::new();
//! let mut subsys = SubsystemConfig::new("nqn.2024-01.io.example:disk");
//! subsys.namespaces.push(NamespaceConfig::memory(1, 1 << 20));
//! target.add_subsystem(&subsys)?;
//! let port = target.add_port(&PortConfig::new("softroce", "127.0.0.1"))?;
//!
//! let addr = TransportAddr::new("softroce", "127.0.0.1", port.local_addr().port());
//! let ctrl = Controller::connect(&addr, "nqn.2024-01.io.example:disk", &HostConfig::default())?;
//! let ns = ctrl.namespace(1)?;
//! ctrl.write(&ns, 8, &[0xAB; 512], false)?;
//! let mut back = [0u8; 512];
//! ctrl.read(&ns, 8, &mut back)?;
//! assert_eq!(back, [0xAB; 512]);
//! ctrl.disconnect()?;
//! # Ok::<(), nvmeof::Error>(())
//! ```
//!
//! The wire layer, on its own:
//!
//! Every format is a typed view over a byte buffer with a checked constructor and
//! accessors that never panic, plus a validated representation with `parse` and
//! `emit`, in the manner of smoltcp's `wire` module:
//!
//! ```
//! use nvmeof::wire::{Dptr, KeyedSgl, Sqe, SqeRepr, SglRepr};
//! use nvmeof::wire::opcodes::{IoCommand, IoOpcode};
//!
//! // A Read of 8 blocks at LBA 0x1000 into remote memory described by a keyed SGL.
//! let sgl = KeyedSgl::new(0x7f00_0000_1000, 8 * 512, 0x1234, false)?;
//! let mut repr = SqeRepr {
//!     opcode: IoOpcode::Read.into(),
//!     cid: 7,
//!     nsid: 1,
//!     dptr: Dptr::Sgl(SglRepr::Keyed(sgl)),
//!     ..Default::default()
//! };
//! IoCommand { slba: 0x1000, nlb: 7, ..Default::default() }.apply(&mut repr); // NLB is 0's based
//!
//! let mut buf = [0u8; 64];
//! repr.emit(&mut Sqe::new_checked(&mut buf[..])?);
//! assert_eq!(buf[0], 0x02); // Read
//! assert_eq!(buf[39], 0x40); // keyed SGL data block
//!
//! let parsed = SqeRepr::parse(&Sqe::new_checked(&buf[..])?)?;
//! assert_eq!(parsed, repr);
//! assert_eq!(IoCommand::from_sqe(&parsed).block_count(), 8);
//! # Ok::<(), nvmeof::wire::WireError>(())
//! ```

#![warn(missing_docs)]

pub mod error;
pub mod host;
pub mod target;
pub mod tools;
pub mod transport;
pub mod wire;

pub use error::{Error, Result};
