//! What each durability policy costs per write, next to the raw cost of one sync.
//!
//! For every policy (`None`, `Async`, `Periodic(100 ms)`, `Always`) with 1 and 4 writer
//! threads: writes/s and p50/p99/p99.9 latency of 100-byte puts of new 16-byte keys into
//! a fresh store. The raw cost of one sync (4 KiB `pwrite` + `fdatasync` on a scratch
//! file in the same directory) is measured before, in the middle and after, and the
//! `Always` results are printed as ratios to it. This machine has a fast (~100 µs) and a
//! slow (~4 ms) sync regime; the output says which one each measurement saw.
//!
//! A custom harness (criterion has no latency percentiles). Run:
//! `cargo bench --bench durability` (about 40 s; `-- --secs 5` for longer phases,
//! `-- --dir PATH` for another disk). Under `cargo test --benches` it runs a short smoke.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mapkv::{Durability, Options, Store};

#[path = "../src/bin/mapkv/common.rs"]
mod common;
use common::{in_memory_rate, key, nanos, nearest_rank, raw_sync_latencies, Regime, VALUE_LEN};

#[derive(Debug, Clone, Copy, Default)]
struct Pct {
    n: usize,
    p50: u64,
    p99: u64,
    p999: u64,
}

fn pct(v: &mut [u64]) -> Pct {
    if v.is_empty() {
        return Pct::default();
    }
    v.sort_unstable();
    Pct {
        n: v.len(),
        p50: nearest_rank(v, 0.5),
        p99: nearest_rank(v, 0.99),
        p999: nearest_rank(v, 0.999),
    }
}

fn us(ns: u64) -> String {
    if ns >= 10_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if ns >= 10_000 {
        format!("{:.0} µs", ns as f64 / 1e3)
    } else {
        format!("{:.2} µs", ns as f64 / 1e3)
    }
}

fn regime(ns: u64) -> &'static str {
    match Regime::of(ns) {
        Regime::Fast => "fast regime",
        Regime::Between => "between regimes",
        Regime::Slow => "slow regime (~4 ms tick)",
    }
}

/// 4 KiB pwrite + fdatasync on a scratch file in `dir`, for `budget`.
fn raw_sync(dir: &Path, budget: Duration) -> Pct {
    let mut lat = raw_sync_latencies(dir, 2000, budget).expect("raw sync");
    pct(&mut lat)
}

/// `n` appends of the same record shape (16-byte header, key, value) to a `Vec`, plus a
/// `HashMap` from key to offset if `index`. With `prefault`, the `Vec`'s memory is
/// allocated and touched before the clock starts (the most generous baseline: no page
/// faults are timed); without, it grows as it goes.
fn in_memory(n: u64, index: bool, prefault: bool) -> f64 {
    in_memory_rate(n, &[0x5Au8; VALUE_LEN], index, prefault)
}

/// `n` puts of new keys into a fresh store opened with `Options::default()` and
/// `Durability::None`, timed the same way as [`in_memory`] (one clock for the loop).
fn store_none(dir: &Path, n: u64) -> f64 {
    let path = dir.join("none.mkv");
    let _ = std::fs::remove_file(&path);
    let store = Store::open(&path, Options::default().durability(Durability::None))
        .expect("open a new store");
    let mut val = [0x5Au8; VALUE_LEN];
    let t = Instant::now();
    for i in 0..n {
        val[..8].copy_from_slice(&i.to_le_bytes());
        store.put(key(i), val).expect("put");
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    drop(store);
    let _ = std::fs::remove_file(&path);
    rate
}

/// `None` next to in-memory appends: `rounds` rounds of each, interleaved so that all
/// see the same machine; medians of the rates, and of each round's ratios (a round's
/// loops run back to back, so their ratio cancels the machine's slower drifts).
struct NoneVsMemory {
    n: u64,
    rounds: usize,
    append: f64,
    store_prefaulted: f64,
    store_growing: f64,
    none: f64,
    /// Per-round ratios baseline / store, sorted: prefaulted, growing, bare append.
    ratios: [Vec<f64>; 3],
}

fn none_vs_memory(dir: &Path, n: u64, rounds: usize) -> NoneVsMemory {
    let mut runs: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        runs[0].push(in_memory(n, false, true));
        runs[1].push(in_memory(n, true, true));
        runs[2].push(in_memory(n, true, false));
        runs[3].push(store_none(dir, n));
    }
    let mut ratios: [Vec<f64>; 3] = Default::default();
    for (i, base) in [1, 2, 0].into_iter().enumerate() {
        ratios[i] = runs[base]
            .iter()
            .zip(&runs[3])
            .map(|(b, s)| b / s)
            .collect();
    }
    for v in &mut ratios {
        v.sort_by(f64::total_cmp);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    NoneVsMemory {
        n,
        rounds,
        append: median(&mut runs[0]),
        store_prefaulted: median(&mut runs[1]),
        store_growing: median(&mut runs[2]),
        none: median(&mut runs[3]),
        ratios,
    }
}

struct Run {
    policy: &'static str,
    threads: u64,
    writes_per_s: f64,
    lat: Pct,
    syncs: u64,
    writes: u64,
}

fn run(dir: &Path, policy: &'static str, d: Durability, threads: u64, secs: f64, max: u64) -> Run {
    let path = dir.join("durability.mkv");
    let _ = std::fs::remove_file(&path);
    let store = Store::open(
        &path,
        Options::default().durability(d).initial_size(256 << 20),
    )
    .expect("open a new store");
    // The first write marks the store dirty (one extra sync): not timed.
    store.put(b"warm-up", b"").expect("put");
    let syncs0 = store.stats().syncs;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let lats: Vec<Vec<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let store = &store;
                let stop = &stop;
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(1 << 16);
                    let mut val = [0x5Au8; VALUE_LEN];
                    let mut i = t;
                    while i < max && !stop.load(Ordering::Relaxed) {
                        val[..8].copy_from_slice(&i.to_le_bytes());
                        let t0 = Instant::now();
                        store.put(key(i), val).expect("put");
                        let now = Instant::now();
                        lat.push(nanos(now - t0));
                        if now >= deadline {
                            stop.store(true, Ordering::Relaxed);
                        }
                        i += threads;
                    }
                    lat
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let syncs = store.stats().syncs - syncs0;
    drop(store);
    let _ = std::fs::remove_file(&path);
    let mut all: Vec<u64> = lats.into_iter().flatten().collect();
    let writes = all.len() as u64;
    Run {
        policy,
        threads,
        writes_per_s: writes as f64 / elapsed,
        lat: pct(&mut all),
        syncs,
        writes,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let secs: f64 = arg("--secs")
        .and_then(|s| s.parse().ok())
        .unwrap_or(if full { 3.0 } else { 0.2 });
    let max: u64 = if full { 5_000_000 } else { 20_000 };
    let tmp;
    let dir = match arg("--dir") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().expect("temporary directory");
            tmp.path().to_path_buf()
        }
    };
    let raw_budget = Duration::from_secs_f64((secs / 3.0).max(0.1));

    let raw0 = raw_sync(&dir, raw_budget);
    let nvm = if full {
        none_vs_memory(&dir, 1_000_000, 9)
    } else {
        none_vs_memory(&dir, 20_000, 1)
    };
    let mut runs = Vec::new();
    let mut raw_before_always = Pct::default();
    for (name, d) in [
        ("None", Durability::None),
        ("Async", Durability::Async),
        (
            "Periodic(100ms)",
            Durability::Periodic(Duration::from_millis(100)),
        ),
        ("Always", Durability::Always),
    ] {
        if name == "Always" {
            raw_before_always = raw_sync(&dir, raw_budget);
        }
        for threads in [1, 4] {
            runs.push(run(&dir, name, d, threads, secs, max));
        }
    }
    let raw1 = raw_sync(&dir, raw_budget);

    println!(
        "durability: {VALUE_LEN} B values, 16 B keys, fresh store per line, {secs} s per line"
    );
    println!(
        "{:<16} {:>7} {:>12} {:>10} {:>10} {:>10} {:>9} {:>11}",
        "policy", "threads", "writes/s", "p50", "p99", "p99.9", "syncs", "writes/sync"
    );
    for r in &runs {
        println!(
            "{:<16} {:>7} {:>12.0} {:>10} {:>10} {:>10} {:>9} {:>11.2}",
            r.policy,
            r.threads,
            r.writes_per_s,
            us(r.lat.p50),
            us(r.lat.p99),
            us(r.lat.p999),
            r.syncs,
            r.writes as f64 / r.syncs.max(1) as f64
        );
    }
    for (when, r) in [
        ("start", raw0),
        ("before Always", raw_before_always),
        ("end", raw1),
    ] {
        println!(
            "raw sync (4 KiB pwrite + fdatasync) at {when}: median {} p99 {} (n={}) -> {}",
            us(r.p50),
            us(r.p99),
            r.n,
            regime(r.p50)
        );
    }
    let find = |p: &str, t: u64| runs.iter().find(|r| r.policy == p && r.threads == t);
    if let (Some(a1), Some(a4)) = (find("Always", 1), find("Always", 4)) {
        let raw = raw_before_always.p50.max(1) as f64;
        println!(
            "Always, 1 writer: p50 = {:.2}x one raw sync (goal <= 1.3x); p99/p50 = {:.2} (goal <= 2); \
             {:.0} writes/s = {:.2}x the raw sync rate",
            a1.lat.p50 as f64 / raw,
            a1.lat.p99 as f64 / a1.lat.p50.max(1) as f64,
            a1.writes_per_s,
            a1.writes_per_s * raw / 1e9
        );
        println!(
            "Always, 4 writers: {:.2}x the single writer's throughput (goal >= 3x), {:.2} writes per sync",
            a4.writes_per_s / a1.writes_per_s,
            a4.writes as f64 / a4.syncs.max(1) as f64
        );
    }
    println!(
        "None vs in memory ({} puts of new keys, median of {} interleaved rounds, one clock per loop):",
        nvm.n, nvm.rounds
    );
    println!(
        "  store, None, Options::default():            {:>10.0} puts/s",
        nvm.none
    );
    for (i, (what, rate)) in [
        ("Vec log (prefaulted) + HashMap index", nvm.store_prefaulted),
        ("Vec log (growing) + HashMap index", nvm.store_growing),
        ("Vec log (prefaulted), no index", nvm.append),
    ]
    .into_iter()
    .enumerate()
    {
        let r = &nvm.ratios[i];
        println!(
            "  in-memory {what:<36} {rate:>10.0} puts/s = {:.2}x the store; per round: median {:.2}x, {:.2}-{:.2}x",
            rate / nvm.none,
            r[r.len() / 2],
            r[0],
            r[r.len() - 1]
        );
    }
    println!("  (goal: None within 1.2x of the in-memory log + index)");
}
