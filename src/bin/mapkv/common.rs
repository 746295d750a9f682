//! Helpers that every benchmark of the project shares: `mapkv bench` (this binary), the
//! criterion benches in `benches/` and the comparison crate in `benches/compare`. Each of
//! them compiles this one file with `#[path]`, so all of them write the same keys and
//! values in the same orders, time the same raw sync, and print rates alike.
//!
//! Standard library only and no `unsafe`, so every includer compiles it as it is; the
//! probes that need `libc` or a mapping are in `sys.rs`, which only the binary uses.
#![allow(
    dead_code,
    reason = "each includer (the binary, two benches, the comparison crate) uses a subset"
)]

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// Value size of the standard workload, in bytes (keys are 16 bytes).
pub const VALUE_LEN: usize = 100;

/// `splitmix64`: a bijection on `u64`, so distinct inputs give distinct keys.
#[must_use]
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The 16-byte key of item `i`: 16 lowercase hex digits of a scrambled `i`, so keys are
/// spread over the hash space (and in random order for ordered engines) and readable in
/// `mapkv scan`. Misses use `i >= 1 << 40`.
#[must_use]
pub fn key(i: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    let v = mix(i);
    for (n, b) in out.iter_mut().enumerate() {
        let nib = (v >> (60 - 4 * n)) & 0xf;
        *b = b"0123456789abcdef"[usize::try_from(nib).unwrap_or(0)];
    }
    out
}

/// A value of `len` bytes derived from `i` (not all zeros, so nothing compresses it away).
#[must_use]
pub fn value(i: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = i;
    while v.len() < len {
        x = mix(x);
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `i` into the first bytes of `val`, so every value differs.
pub fn stamp(val: &mut [u8], i: u64) {
    let n = val.len().min(8);
    val[..n].copy_from_slice(&i.to_le_bytes()[..n]);
}

/// The keys of items `base..base + n` in a random order fixed by `seed` (Fisher-Yates
/// driven by [`mix`]), built up front so a timed loop does no key formatting.
#[must_use]
pub fn shuffled_keys(n: u64, base: u64, seed: u64) -> Vec<[u8; 16]> {
    let mut order: Vec<u64> = (0..n).collect();
    let mut s = seed;
    for i in (1..order.len()).rev() {
        s = mix(s);
        let j = usize::try_from(s % (i as u64 + 1)).unwrap_or(0);
        order.swap(i, j);
    }
    order.into_iter().map(|i| key(base + i)).collect()
}

/// Duration as whole nanoseconds (saturating).
#[must_use]
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The `q` quantile (`0 < q <= 1`) of ascending `sorted` samples, by nearest rank; 0 if
/// there are none.
#[must_use]
pub fn nearest_rank(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The two durability-latency regimes of the development VM (see `docs/BENCH.md`, "Sync
/// regimes"): syncs well under a millisecond, or one 4 ms scheduler tick each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regime {
    /// Sub-millisecond syncs.
    Fast,
    /// Between the two.
    Between,
    /// About 4 ms per sync: one 250 Hz tick, a VM artifact rather than the disk.
    Slow,
}

impl Regime {
    /// The regime a median raw-sync latency (in nanoseconds) belongs to.
    #[must_use]
    pub fn of(median_ns: u64) -> Self {
        match median_ns {
            0..=1_000_000 => Regime::Fast,
            1_000_001..=2_500_000 => Regime::Between,
            _ => Regime::Slow,
        }
    }
}

/// `n` appends of records shaped like the store's (16-byte header, key `key(i)`, `val`)
/// to a `Vec`, plus, with `index`, a `HashMap` from key to offset (std's default hasher,
/// no capacity reserved): the in-memory equivalent of a log-plus-index store, timed as
/// one clock around the loop. With `prefault`, the log's memory is allocated and touched
/// (non-zero fill, so the pages are really written) before the clock starts, so no page
/// fault is timed; without, the log grows as it goes and gets its memory from the kernel,
/// as the store's mapping must. Returns appends per second.
#[must_use]
pub fn in_memory_rate(n: u64, val: &[u8], index: bool, prefault: bool) -> f64 {
    let rec = 16 + 16 + val.len();
    let mut log: Vec<u8> = if prefault {
        let mut v = vec![1u8; usize::try_from(n).unwrap_or(0) * rec];
        v.clear();
        v
    } else {
        Vec::new()
    };
    let mut map: HashMap<[u8; 16], u64> = HashMap::new();
    let t = Instant::now();
    for i in 0..n {
        let k = key(i);
        let off = log.len() as u64;
        log.extend_from_slice(&(i as u32).to_le_bytes());
        log.extend_from_slice(&[0u8; 12]);
        log.extend_from_slice(&k);
        log.extend_from_slice(val);
        if index {
            map.insert(k, off);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box((&log, &map));
    n as f64 / secs.max(1e-9)
}

/// A `field: N kB` line of a `/proc` file's text, as `N`.
#[must_use]
pub fn kb_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// A field of `/proc/self/status` in kB (e.g. `"RssAnon"`), if present.
#[must_use]
pub fn proc_status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    kb_field(&s, field)
}

/// Creates (or truncates) `path` for reading and writing: a scratch file for the
/// benchmarks' experiments.
///
/// # Errors
/// The `open` error.
pub fn create_scratch(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// The raw cost of one durable write on the disk holding `dir`: latencies, in
/// nanoseconds and in measurement order, of a 4 KiB `pwrite` + `fdatasync` on a scratch
/// file there (removed afterwards). The writes overwrite 64 blocks written and synced
/// beforehand, as the store overwrites preallocated space, so no block allocation is
/// timed. Measures at least 5 and at most `max` syncs, stopping after `budget`.
/// Durability benchmarks report their results as ratios to this.
///
/// # Errors
/// I/O errors creating, writing or syncing the scratch file.
pub fn raw_sync_latencies(dir: &Path, max: usize, budget: Duration) -> io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("raw-sync.scratch");
    let f = create_scratch(&path)?;
    let page = [0xA5u8; 4096];
    for i in 0..64u64 {
        f.write_all_at(&page, i * 4096)?;
    }
    f.sync_all()?;
    let start = Instant::now();
    let mut lat = Vec::with_capacity(max.min(1 << 16));
    let mut i = 0u64;
    while lat.len() < max.max(5) && (lat.len() < 5 || start.elapsed() < budget) {
        let mut buf = page;
        buf[..8].copy_from_slice(&i.to_le_bytes());
        let t = Instant::now();
        f.write_all_at(&buf, (i % 64) * 4096)?;
        f.sync_data()?;
        lat.push(nanos(t.elapsed()));
        i += 1;
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(lat)
}

/// Human-readable nanoseconds: `850 ns`, `12.3 µs`, `4.10 ms`, `1.20 s`.
#[must_use]
pub fn fmt_ns(ns: u64) -> String {
    let x = ns as f64;
    if x < 1e3 {
        format!("{ns} ns")
    } else if x < 1e4 {
        format!("{:.2} µs", x / 1e3)
    } else if x < 1e6 {
        format!("{:.0} µs", x / 1e3)
    } else if x < 1e7 {
        format!("{:.2} ms", x / 1e6)
    } else if x < 1e9 {
        format!("{:.0} ms", x / 1e6)
    } else {
        format!("{:.2} s", x / 1e9)
    }
}

/// Human-readable duration from seconds (as [`fmt_ns`]).
#[must_use]
pub fn fmt_secs(s: f64) -> String {
    fmt_ns((s * 1e9) as u64)
}

/// Human-readable rate: `1.52M`, `5.3k`, `310`.
#[must_use]
pub fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.0}k", r / 1e3)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// Human-readable bytes: `512 B`, `4.0 KiB`, `1.7 MiB`.
#[must_use]
pub fn fmt_bytes(b: u64) -> String {
    let x = b as f64;
    if b < 1024 {
        format!("{b} B")
    } else if x < 1024.0 * 1024.0 {
        format!("{:.1} KiB", x / 1024.0)
    } else if x < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", x / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", x / (1024.0 * 1024.0 * 1024.0))
    }
}
