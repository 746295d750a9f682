//! Read path and open cost of a filled store.
//!
//! Fills a store with 1,000,000 keys of 16 bytes and 100-byte values once
//! (`Durability::None`; the fill rate is printed, not sampled), prints `RssAnon`, then
//! benchmarks random `get` and `get_with`, hits and misses, on 1 and 2 threads, and the
//! reopen of the cleanly closed store.
//!
//! Run: `cargo bench --bench store` (about a minute). Under `cargo test --benches` it runs
//! each benchmark once on 20,000 keys.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use mapkv::{Durability, Options, Store};

#[path = "../src/bin/mapkv/common.rs"]
mod common;
use common::{key, proc_status_kb, shuffled_keys, VALUE_LEN};

fn rss_anon_kb() -> Option<u64> {
    proc_status_kb("RssAnon")
}

fn fill(path: &Path, n: u64) -> f64 {
    let _ = std::fs::remove_file(path);
    let store = Store::open(
        path,
        Options::default()
            .durability(Durability::None)
            .initial_size(n * 300),
    )
    .expect("open a new store in a temporary directory");
    let mut val = vec![0x5Au8; VALUE_LEN];
    let t = Instant::now();
    for i in 0..n {
        val[..8].copy_from_slice(&i.to_le_bytes());
        store.put(key(i), &val).expect("put");
    }
    let secs = t.elapsed().as_secs_f64();
    drop(store); // clean close: checkpoint + sync
    n as f64 / secs
}

fn benches(c: &mut Criterion) {
    let full = std::env::args().any(|a| a == "--bench");
    let n: u64 = if full { 1_000_000 } else { 20_000 };
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("store.mkv");

    // The fill, once per run (three times for a median when benchmarking).
    let mut rates: Vec<f64> = (0..if full { 3 } else { 1 })
        .map(|_| fill(&path, n))
        .collect();
    rates.sort_by(f64::total_cmp);
    let store =
        Store::open(&path, Options::default().durability(Durability::None)).expect("reopen");
    let rss = rss_anon_kb();
    println!(
        "fill: {n} puts of 16 B keys / {VALUE_LEN} B values, Durability::None, 1 thread: \
         median {:.2}M puts/s (runs: {})",
        rates[rates.len() / 2] / 1e6,
        rates
            .iter()
            .map(|r| format!("{:.2}M", r / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "RssAnon with the {n}-key store open: {} kB (goal for 1M keys: < 20 MB)",
        rss.map_or_else(|| "n/a".into(), |k| k.to_string())
    );

    let hits = shuffled_keys(n, 0, 1);
    let misses = shuffled_keys(n, 1 << 40, 2);
    let mut g = c.benchmark_group("read");
    g.throughput(Throughput::Elements(1));
    for (name, keys) in [("hit", &hits), ("miss", &misses)] {
        g.bench_function(BenchmarkId::new("get", name), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = if i + 1 == keys.len() { 0 } else { i + 1 };
                black_box(store.get(keys[i]).expect("get"))
            });
        });
        g.bench_function(BenchmarkId::new("get_with", name), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = if i + 1 == keys.len() { 0 } else { i + 1 };
                black_box(store.get_with(keys[i], <[u8]>::len).expect("get_with"))
            });
        });
    }
    g.finish();

    // Two reader threads: one iteration = one get on each thread, so the reported
    // throughput is both threads together.
    let mut g = c.benchmark_group("read_2_threads");
    g.throughput(Throughput::Elements(2));
    for (name, keys) in [("hit", &hits), ("miss", &misses)] {
        g.bench_function(BenchmarkId::new("get_with", name), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..2usize {
                        let store = &store;
                        s.spawn(move || {
                            let mut i = t * keys.len() / 2;
                            for _ in 0..iters {
                                i = if i + 1 == keys.len() { 0 } else { i + 1 };
                                black_box(store.get_with(keys[i], <[u8]>::len).expect("get_with"));
                            }
                        });
                    }
                });
                start.elapsed()
            });
        });
    }
    g.finish();
    drop(store);

    // Reopen of the cleanly closed store (the drop of each handle is not timed).
    let mut g = c.benchmark_group("reopen");
    for (name, ro) in [("read_write", false), ("read_only", true)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let s = Store::open(
                        &path,
                        Options::default()
                            .durability(Durability::None)
                            .read_only(ro),
                    )
                    .expect("reopen");
                    total += t.elapsed();
                    black_box(&s);
                    drop(s);
                }
                total
            });
        });
    }
    g.finish();
    drop((hits, misses));
    let s = Store::open(&path, Options::default().read_only(true)).expect("reopen");
    let st = s.stats();
    println!(
        "reopened store: clean={} replayed={} file={} MiB; RssAnon with only it open: {} kB",
        st.recovery.was_clean,
        st.recovery.replayed_writes,
        st.file_size >> 20,
        rss_anon_kb().map_or_else(|| "n/a".into(), |k| k.to_string())
    );
}

/// Criterion's generated entry points (undocumented public functions).
mod harness {
    #![allow(missing_docs)]
    use std::time::Duration;

    use criterion::{criterion_group, Criterion};

    criterion_group! {
        name = store;
        config = Criterion::default()
            .sample_size(20)
            .warm_up_time(Duration::from_millis(700))
            .measurement_time(Duration::from_secs(3));
        targets = super::benches
    }
}
criterion_main!(harness::store);
