//! Measurement helpers of `mapkv bench`: access orders, percentiles, the raw cost of one
//! sync, and readers for the kernel's counters (`/proc`, `/sys`).
//!
//! The helpers the criterion benches and `benches/compare` use too (keys, values,
//! formatting, the raw sync probe) are defined once, in `common.rs`, which this module
//! compiles and re-exports.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

#[path = "common.rs"]
mod common;

pub use common::{
    create_scratch, fmt_bytes, fmt_ns, fmt_rate, fmt_secs, in_memory_rate, key, mix, nanos,
    nearest_rank, proc_status_kb, raw_sync_latencies, stamp, value, Regime,
};

/// A small, fast pseudo-random generator for access orders (not for anything secret).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next pseudo-random `u64`.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A pseudo-random number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: unbiased enough for benchmark access orders.
        let wide = u128::from(self.next_u64()) * u128::from(n);
        u64::try_from(wide >> 64).unwrap_or(0)
    }

    /// A random permutation of `0..n`.
    pub fn permutation(&mut self, n: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).collect();
        for i in (1..v.len()).rev() {
            let j = usize::try_from(self.below(i as u64 + 1)).unwrap_or(0);
            v.swap(i, j);
        }
        v
    }
}

/// Latency percentiles of a set of samples, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest sample.
    pub max_ns: u64,
}

impl Percentiles {
    /// Sorts `samples` and reads the percentiles (nearest rank).
    pub fn of(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        Percentiles {
            n: samples.len(),
            p50_ns: nearest_rank(samples, 0.50),
            p99_ns: nearest_rank(samples, 0.99),
            p999_ns: nearest_rank(samples, 0.999),
            max_ns: samples[samples.len() - 1],
        }
    }
}

/// Which durability-latency regime this VM was in, for the report (see [`Regime`] and
/// `docs/BENCH.md`: a fast regime of well under a millisecond per sync and a slow one of
/// exactly one 4 ms scheduler tick).
pub fn regime(median_ns: u64) -> &'static str {
    match Regime::of(median_ns) {
        Regime::Fast => "fast regime (sub-millisecond syncs)",
        Regime::Between => "between the fast and slow regimes",
        Regime::Slow => {
            "slow regime (~4 ms per sync, one 250 Hz tick: a VM artifact, not the disk)"
        }
    }
}

/// The raw cost of one sync: `pwrite` of 4 KiB then `fdatasync`, on a scratch file in
/// `dir` (same filesystem as the stores), repeated up to `max` times or for `budget`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RawSync {
    /// Latency percentiles of one pwrite + fdatasync.
    pub lat: Percentiles,
}

impl RawSync {
    /// Median in nanoseconds (at least 1, to divide by).
    pub fn median_ns(&self) -> u64 {
        self.lat.p50_ns.max(1)
    }
}

/// Measures [`RawSync`] in `dir` (see [`raw_sync_latencies`]).
pub fn raw_sync(dir: &Path, max: usize, budget: Duration) -> std::io::Result<RawSync> {
    let mut lat = raw_sync_latencies(dir, max, budget)?;
    Ok(RawSync {
        lat: Percentiles::of(&mut lat),
    })
}

/// Appends `n` records of the bench's shape (16-byte header, key, value) into a `Vec`
/// with its memory touched beforehand: the floor for any write path that copies the bytes
/// once. Returns appends per second.
pub fn in_memory_append_rate(n: u64, value_len: usize) -> f64 {
    in_memory_rate(n, &value(1, value_len), false, true)
}

/// Like [`in_memory_append_rate`], plus an in-memory `HashMap` index: the in-memory
/// equivalent of a log-plus-index store (see [`in_memory_rate`] for `prefault`). Returns
/// puts per second.
pub fn in_memory_store_rate(n: u64, value_len: usize, prefault: bool) -> f64 {
    in_memory_rate(n, &value(1, value_len), true, prefault)
}

/// A field of `/proc/meminfo` in kB (e.g. `"Committed_AS"`).
pub fn meminfo_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    common::kb_field(&s, field)
}

/// `write_bytes` of `/proc/self/io`: bytes this process caused to be sent to storage
/// (charged when a page-cache folio goes from clean to dirty, so a whole folio at a time).
pub fn proc_write_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("write_bytes:")?.trim().parse().ok())
}

/// Sectors written to the block device holding `path` (`/sys/dev/block/M:m/stat`
/// field 7), in bytes. Device-wide: other tenants add noise.
#[derive(Debug, Clone)]
pub struct BlockDev {
    stat: std::path::PathBuf,
    /// Device name, e.g. `vda`.
    pub name: String,
}

impl BlockDev {
    /// The block device of the filesystem holding `path`, if `/sys` knows it.
    pub fn of(path: &Path) -> Option<BlockDev> {
        let dev = std::fs::metadata(path).ok()?.dev();
        // Linux encodes major/minor in dev_t like this (glibc's gnu_dev_major/minor).
        let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
        let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
        let sys = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let stat = sys.join("stat");
        std::fs::metadata(&stat).ok()?;
        let name = std::fs::canonicalize(&sys)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| format!("{major}:{minor}"));
        Some(BlockDev { stat, name })
    }

    /// Bytes written to the device so far.
    pub fn written(&self) -> Option<u64> {
        let s = std::fs::read_to_string(&self.stat).ok()?;
        let sectors: u64 = s.split_whitespace().nth(6)?.parse().ok()?;
        Some(sectors * 512)
    }
}

/// Minor/major faults since `before` (getrusage, whole process).
pub fn faults_since(before: (u64, u64)) -> (u64, u64) {
    let now = crate::sys::page_faults();
    (
        now.0.saturating_sub(before.0),
        now.1.saturating_sub(before.1),
    )
}

/// Writes a file of `len` bytes (pattern data) with `chunk`-sized `pwrite`s and syncs it.
/// The chunk size sets the page-cache folio size of the cached pages on ext4.
pub fn write_file(path: &Path, len: u64, chunk: usize) -> std::io::Result<File> {
    let mut f = create_scratch(path)?;
    let buf = value(7, chunk);
    let mut off = 0u64;
    while off < len {
        let n = usize::try_from((len - off).min(chunk as u64)).unwrap_or(chunk);
        f.write_all(&buf[..n])?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(f)
}

/// Filesystem type and mount point of the filesystem holding `path`, from
/// `/proc/self/mountinfo` (longest mount point that is a prefix of the path).
pub fn fs_type(path: &Path) -> Option<(String, String)> {
    let path = std::fs::canonicalize(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(mnt), Some(dash)) = (fields.get(4), fields.iter().position(|f| *f == "-")) else {
            continue;
        };
        let Some(fstype) = fields.get(dash + 1) else {
            continue;
        };
        let mnt = mnt.replace("\\040", " ");
        if path.starts_with(&mnt) && best.as_ref().is_none_or(|b| mnt.len() > b.0) {
            best = Some((mnt.len(), (*fstype).to_owned(), mnt));
        }
    }
    best.map(|(_, t, m)| (t, m))
}

/// The kernel release (`/proc/sys/kernel/osrelease`).
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!(
            (p.p50_ns, p.p99_ns, p.p999_ns, p.max_ns),
            (500, 990, 999, 1000)
        );
    }

    #[test]
    fn keys_are_distinct_and_hex() {
        let a = key(1);
        assert_ne!(a, key(2));
        assert_ne!(a, key(1 << 40));
        assert!(a.iter().all(u8::is_ascii_hexdigit));
    }

    #[test]
    fn shuffled_keys_are_a_permutation() {
        let mut s = common::shuffled_keys(1000, 5, 1);
        let mut k: Vec<[u8; 16]> = (5..1005).map(key).collect();
        s.sort_unstable();
        k.sort_unstable();
        assert_eq!(s, k);
    }

    #[test]
    fn nearest_rank_of_nothing_is_zero() {
        assert_eq!(nearest_rank(&[], 0.5), 0);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = Rng::new(3).permutation(1000);
        p.sort_unstable();
        assert!(p.iter().copied().eq(0..1000));
    }
}
