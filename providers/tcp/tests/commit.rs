//! COMMIT_COMPLETE writes into PMEM regions: persist before ACK, refusal of non-PMEM
//! targets, persist failures, and DELIVERY_COMPLETE staying weaker. The target regions
//! are [`VolatileCache`] backings, whose file holds only what persist wrote, so each
//! test sees exactly which ranges were persisted.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::volatile_cache::VolatileCache;
use common::*;
use fabric_core::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("fabric-tcp-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const LEN: usize = 64 << 10;

fn pmem_target(p: &Pair, dir: &TempDir, flags: MrFlags) -> (Arc<VolatileCache>, MemoryRegion) {
    let vc = Arc::new(VolatileCache::open(&dir.0.join("region"), LEN).unwrap());
    let mr = p
        .server
        .domain
        .register_shared(vc.clone(), Access::REMOTE_WRITE, MrFlags::PMEM | flags)
        .unwrap();
    (vc, mr)
}

fn file_bytes(dir: &TempDir, off: usize, len: usize) -> Vec<u8> {
    std::fs::read(dir.0.join("region")).unwrap()[off..off + len].to_vec()
}

#[test]
fn commit_persists_every_range_before_the_ack() {
    let dir = TempDir::new("commit-ranges");
    let p = pair();
    let (vc, t) = pmem_target(&p, &dir, MrFlags::empty());
    let rx = p.server.domain.alloc(16, Access::RECV).unwrap();
    p.server.ep.recv(rx.full(), 77).unwrap();
    let a = p.client.domain.alloc(5000, Access::WRITE).unwrap();
    let b = p.client.domain.alloc(300, Access::WRITE).unwrap();
    a.write_at(0, &pattern(5000, 1)).unwrap();
    b.write_at(0, &pattern(300, 2)).unwrap();
    let local = [b.iov(0, 300), a.iov(0, 4000), b.iov(100, 50)];
    let mut src = pattern(300, 2);
    src.extend_from_slice(&pattern(5000, 1)[..4000]);
    src.extend_from_slice(&pattern(300, 2)[100..150]);
    let r = t.remote();
    let remote = [r.iov(100, 1000), r.iov(30_000, 3350)];
    let msg = RmaMsg {
        iov: &local,
        rma_iov: &remote,
        context: 5,
        data: 0xC0FFEE,
    };
    p.client
        .ep
        .writemsg(
            &msg,
            OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE | OpFlags::REMOTE_CQ_DATA,
        )
        .unwrap();
    let c = next(&p.client.cq);
    ok(&c);
    assert!(
        c.flags
            .contains(CompFlags::RMA | CompFlags::WRITE | CompFlags::COMMIT),
        "{:?}",
        c.flags
    );
    assert_eq!((c.context, c.len), (5, 4350));
    // What the completion promises: both ranges are in the persistence domain.
    assert_eq!(vc.persisted(), vec![(100, 1000), (30_000, 3350)]);
    assert_eq!(file_bytes(&dir, 100, 1000), src[..1000]);
    assert_eq!(file_bytes(&dir, 30_000, 3350), src[1000..]);
    let n = next(&p.server.cq);
    ok(&n);
    assert_eq!((n.context, n.data), (77, 0xC0FFEE));
    assert!(n
        .flags
        .contains(CompFlags::REMOTE_WRITE | CompFlags::REMOTE_CQ_DATA));
}

#[test]
fn delivery_complete_places_without_persisting() {
    let dir = TempDir::new("delivery");
    let p = pair();
    let (vc, t) = pmem_target(&p, &dir, MrFlags::empty());
    let l = p.client.domain.alloc(4096, Access::WRITE).unwrap();
    l.write_at(0, &pattern(4096, 3)).unwrap();
    let msg = RmaMsg {
        iov: &[l.full()],
        rma_iov: &[t.remote().iov(0, 4096)],
        context: 1,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::DELIVERY_COMPLETE)
        .unwrap();
    let c = next(&p.client.cq);
    ok(&c);
    assert!(!c.flags.contains(CompFlags::COMMIT), "{:?}", c.flags);
    // Visible in memory, not persisted.
    assert_eq!(t.to_vec(0, 4096).unwrap(), pattern(4096, 3));
    assert_eq!(vc.persists(), 0);
    assert_eq!(file_bytes(&dir, 0, 4096), vec![0u8; 4096]);
}

#[test]
fn commit_into_uncached_pmem_region() {
    let dir = TempDir::new("uncached");
    let p = pair();
    let (vc, t) = pmem_target(&p, &dir, MrFlags::UNCACHED);
    let l = p.client.domain.alloc(LEN, Access::WRITE).unwrap();
    let data = pattern(LEN - 7, 4);
    l.write_at(0, &data).unwrap();
    let msg = RmaMsg {
        iov: &[l.iov(0, LEN - 7)],
        rma_iov: &[t.remote().iov(7, LEN - 7)],
        context: 2,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE)
        .unwrap();
    let c = next(&p.client.cq);
    ok(&c);
    assert!(c.flags.contains(CompFlags::COMMIT));
    assert_eq!(vc.persisted(), vec![(7, LEN - 7)]);
    assert_eq!(file_bytes(&dir, 7, LEN - 7), data);
}

#[test]
fn persist_failure_is_a_remote_operation_error() {
    let dir = TempDir::new("persist-fail");
    let p = pair();
    let (vc, t) = pmem_target(&p, &dir, MrFlags::empty());
    vc.set_failing(true);
    let l = p.client.domain.alloc(100, Access::WRITE).unwrap();
    let msg = RmaMsg {
        iov: &[l.full()],
        rma_iov: &[t.remote().iov(0, 100)],
        context: 3,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE)
        .unwrap();
    let c = next(&p.client.cq);
    let e = c
        .status
        .clone()
        .expect_err("a failed persist must not complete ok");
    assert_eq!(e.kind, CqErrorKind::RemoteOperation, "{e}");
    assert!(e.detail.contains("persist"), "{e}");
    assert!(!c.flags.contains(CompFlags::COMMIT), "{:?}", c.flags);
    assert_eq!(c.context, 3);
    assert_eq!(vc.persists(), 1);
    // The connection stays usable: the next commit succeeds once the device recovers.
    vc.set_failing(false);
    p.client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE)
        .unwrap();
    ok(&next(&p.client.cq));
}

#[test]
fn commit_into_a_region_not_registered_pmem_is_refused_untouched() {
    let dir = TempDir::new("not-pmem");
    let p = pair();
    let (vc, pm) = pmem_target(&p, &dir, MrFlags::empty());
    let heap = p.server.domain.alloc(4096, Access::REMOTE_WRITE).unwrap();
    heap.fill(0, 4096, 0xA5).unwrap();
    let l = p.client.domain.alloc(200, Access::WRITE).unwrap();
    l.fill(0, 200, 0x11).unwrap();
    // The second remote iovec is the bad one: the first must not be touched either.
    let msg = RmaMsg {
        iov: &[l.full()],
        rma_iov: &[pm.remote().iov(0, 100), heap.remote().iov(0, 100)],
        context: 4,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE)
        .unwrap();
    let c = next(&p.client.cq);
    let e = c
        .status
        .clone()
        .expect_err("COMMIT into heap memory must fail");
    assert_eq!(e.kind, CqErrorKind::RemoteInvalid, "{e}");
    assert!(e.detail.contains("not registered PMEM"), "{e}");
    assert!(e.detail.contains("remote iov 1"), "{e}");
    assert_eq!(heap.to_vec(0, 4096).unwrap(), vec![0xA5; 4096]);
    assert_eq!(pm.to_vec(0, 100).unwrap(), vec![0; 100]);
    assert_eq!(vc.persists(), 0);
    // The refusal ended the connection (as an RC NAK does): later posts fail at the
    // call, and nothing reaches the region.
    let e = p
        .client
        .ep
        .write(l.iov(0, 100), heap.remote().iov(0, 100), 5)
        .expect_err("a write after a refused access");
    assert_eq!(e.kind(), fabric_core::ErrorKind::NotConnected, "{e}");
    assert_eq!(heap.to_vec(0, 4096).unwrap(), vec![0xA5; 4096]);
}
