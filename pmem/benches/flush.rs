//! Cost per MiB of each flush path, msync, and memcpy vs non-temporal copy.
//!
//! `cargo bench -p pmem --bench flush`. Files go to a temporary directory
//! under `$PMEM_BENCH_DIR` (default: the system temp dir) and, for the tmpfs
//! msync case, `/dev/shm`. Medians land in
//! `$CARGO_TARGET_DIR/criterion/<group>/<case>/new/estimates.json`.

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pmem::{CpuFeatures, FlushMethod, Mapping, PersistStrategy};

const MIB: usize = 1 << 20;

/// Writes all of `m` (so every cache line / page is dirty), a different byte
/// each time.
fn dirty(m: &Mapping, seed: &mut u8) {
    *seed = seed.wrapping_add(1);
    // SAFETY: the whole mapping, which nothing else accesses during the bench.
    unsafe { std::ptr::write_bytes(m.as_ptr(), *seed, m.len()) };
}

fn temp_dir() -> tempfile::TempDir {
    match std::env::var_os("PMEM_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("creating the bench directory")
}

fn report_setup(map: &Mapping) {
    let s = PersistStrategy::global();
    eprintln!(
        "pmem bench: cpu {:?}; best flush method {}; in use {}; eADR {}; movnt {} (threshold {} B); \
         bench file {} is {:?} (is_pmem {})",
        CpuFeatures::host(),
        FlushMethod::detect(),
        s.flush_method(),
        pmem::has_eadr(),
        s.uses_movnt(),
        s.movnt_threshold(),
        map.path().display(),
        map.kind(),
        map.is_pmem(),
    );
}

fn flush_paths(c: &mut Criterion) {
    let dir = temp_dir();
    let map = Mapping::create(dir.path().join("flush"), MIB).expect("mapping the bench file");
    report_setup(&map);
    let mut seed = 0u8;
    let mut g = c.benchmark_group("flush_drain_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64));
    for method in FlushMethod::ALL
        .into_iter()
        .filter(|m| m.is_instruction() && m.is_supported())
    {
        let strategy = PersistStrategy::global()
            .with_flush_method(method)
            .expect("method is supported");
        g.bench_function(method.name(), |b| {
            b.iter_batched(
                || dirty(&map, &mut seed),
                // SAFETY: the whole mapping, which is mapped.
                |()| unsafe { strategy.persist(map.as_ptr(), MIB) }.expect("flush"),
                BatchSize::PerIteration,
            )
        });
    }
    // What one SFENCE costs after the lines were written (eADR's persist).
    g.bench_function("drain_only", |b| {
        b.iter_batched(
            || dirty(&map, &mut seed),
            |()| pmem::drain(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn msync_paths(c: &mut Criterion) {
    let mut g = c.benchmark_group("msync_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64));
    let disk = temp_dir();
    let mut places = vec![("temp_dir_fs", disk.path().to_path_buf())];
    let shm = Path::new("/dev/shm");
    let shm_dir = shm
        .is_dir()
        .then(|| tempfile::tempdir_in(shm).ok())
        .flatten();
    if let Some(d) = &shm_dir {
        places.push(("tmpfs_dev_shm", d.path().to_path_buf()));
    }
    let mut seed = 0u8;
    for (name, dir) in places {
        let map = Mapping::create(dir.join("msync"), MIB).expect("mapping the bench file");
        g.bench_function(name, |b| {
            b.iter_batched(
                || dirty(&map, &mut seed),
                |()| pmem::msync(map.as_ptr(), MIB).expect("msync"),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn copies(c: &mut Criterion) {
    let dir = temp_dir();
    let map = Mapping::create(dir.path().join("copy"), MIB).expect("mapping the bench file");
    let src: Vec<u8> = (0..MIB).map(|i| (i * 13) as u8).collect();
    let global = *PersistStrategy::global();
    let nt = global.with_movnt(true);
    let no_nt = global.with_movnt(false);
    let mut g = c.benchmark_group("copy_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("memcpy", |b| {
        // SAFETY: src and the mapping are distinct, both MIB long, and nothing
        // else touches the mapping during the bench.
        b.iter(|| unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), map.as_ptr(), MIB) })
    });
    g.bench_function(format!("memcpy_persist_{}", global.flush_method()), |b| {
        b.iter(|| {
            // SAFETY: as for memcpy.
            unsafe { no_nt.memcpy_persist(map.as_ptr(), src.as_ptr(), MIB) }.expect("persist")
        })
    });
    if nt.uses_movnt() {
        g.bench_function("memcpy_nt", |b| {
            // SAFETY: as for memcpy.
            b.iter(|| unsafe { nt.memcpy_nt(map.as_ptr(), src.as_ptr(), MIB) })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = flush_paths, msync_paths, copies
}
criterion_main!(benches);
