//! The spec's benchmark matrix under criterion: writes for every durability policy at
//! each value size, and opening a store then reading it with `populate` off and on.
//!
//! - `put/<policy>/<value bytes>`: one `put` of a new key into a store of that policy
//!   (`Always` pays a sync per put; `Async` a write-back start; `Periodic(100 ms)` and
//!   `None` a copy into the mapping).
//! - `open_then_read/populate_<off|on>/<value bytes>`: opening a closed store of 50,000
//!   keys and reading 5,000 random ones. The file is in the page cache (criterion
//!   repeats the open), so this measures what `populate(true)` really changes when
//!   nothing must come from the disk: the page-table entries made at open, against
//!   a minor fault at each first touch. (`mapkv bench` measures the cold case, with
//!   the page cache evicted.)
//!
//! Run: `cargo bench --bench matrix` (about two minutes). Under `cargo test --benches`
//! each benchmark runs once.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use mapkv::{Durability, Options, Store};

#[path = "../src/bin/mapkv/common.rs"]
mod common;
use common::{key, shuffled_keys, value};

/// Value sizes of the matrix.
const VALUE_SIZES: [usize; 3] = [100, 1_024, 16_384];

fn policies() -> [(&'static str, Durability); 4] {
    [
        ("none", Durability::None),
        (
            "periodic_100ms",
            Durability::Periodic(Duration::from_millis(100)),
        ),
        ("async", Durability::Async),
        ("always", Durability::Always),
    ]
}

fn benches(c: &mut Criterion) {
    let full = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().expect("temporary directory");

    let mut g = c.benchmark_group("put");
    g.throughput(Throughput::Elements(1));
    for (name, policy) in policies() {
        for len in VALUE_SIZES {
            let path = dir.path().join(format!("put-{name}-{len}.mkv"));
            let store = Store::open(&path, Options::default().durability(policy)).expect("open");
            let mut i = 0u64;
            let val = value(7, len);
            g.bench_function(BenchmarkId::new(name, len), |b| {
                b.iter(|| {
                    i += 1;
                    store.put(key(i), &val).expect("put");
                });
            });
            store.close().expect("close");
            let _ = std::fs::remove_file(&path);
        }
    }
    g.finish();

    let keys: u64 = if full { 50_000 } else { 2_000 };
    let reads = shuffled_keys(keys, 0, 3);
    let reads = &reads[..(keys as usize / 10)];
    let mut g = c.benchmark_group("open_then_read");
    g.throughput(Throughput::Elements(reads.len() as u64));
    for len in VALUE_SIZES {
        let path = dir.path().join(format!("read-{len}.mkv"));
        {
            let s =
                Store::open(&path, Options::default().durability(Durability::None)).expect("open");
            for i in 0..keys {
                s.put(key(i), value(i, len)).expect("put");
            }
            s.close().expect("close");
        }
        for populate in [false, true] {
            let name = if populate {
                "populate_on"
            } else {
                "populate_off"
            };
            g.bench_function(BenchmarkId::new(name, len), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        let s = Store::open(
                            &path,
                            Options::default().read_only(true).populate(populate),
                        )
                        .expect("open");
                        for k in reads {
                            black_box(s.get_with(k, <[u8]>::len).expect("get"));
                        }
                        total += t.elapsed();
                        drop(s);
                    }
                    total
                });
            });
        }
        let _ = std::fs::remove_file(&path);
    }
    g.finish();
}

/// Criterion's generated entry points (undocumented public functions).
mod harness {
    #![allow(missing_docs)]
    use std::time::Duration;

    use criterion::{criterion_group, Criterion};

    criterion_group! {
        name = matrix;
        config = Criterion::default()
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        targets = super::benches
    }
}
criterion_main!(harness::matrix);
