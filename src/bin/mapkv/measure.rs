//! Measurement helpers shared by `mapkv bench`: keys, percentiles, the raw cost of one
//! sync, and readers for the kernel's counters (`/proc`, `/sys`).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// `splitmix64`: a bijection on `u64`, so distinct inputs give distinct keys.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The 16-byte key of item `i`: 16 lowercase hex digits of a scrambled `i`, so keys are
/// spread over the hash space and readable in `mapkv scan`.
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
        let at = |q: f64| {
            let rank = (q * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        Percentiles {
            n: samples.len(),
            p50_ns: at(0.50),
            p99_ns: at(0.99),
            p999_ns: at(0.999),
            max_ns: samples[samples.len() - 1],
        }
    }
}

/// Which durability-latency regime this VM was in (see `MMAP-FACTS`: a fast ~80-200 µs
/// regime and a slow one of exactly one 4 ms scheduler tick).
pub fn regime(median_ns: u64) -> &'static str {
    match median_ns {
        0..=1_000_000 => "fast regime (sub-millisecond syncs)",
        1_000_001..=2_500_000 => "between the fast and slow regimes",
        _ => "slow regime (~4 ms per sync, one 250 Hz tick: a VM artifact, not the disk)",
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

/// Measures [`RawSync`] in `dir` (see [`mapkv::sys::raw_sync_latencies`]).
pub fn raw_sync(dir: &Path, max: usize, budget: Duration) -> std::io::Result<RawSync> {
    let mut lat = mapkv::sys::raw_sync_latencies(dir, max, budget)?;
    Ok(RawSync {
        lat: Percentiles::of(&mut lat),
    })
}

/// Duration as whole nanoseconds (saturating).
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Appends `n` records of the bench's shape (16-byte header, key, value) into a `Vec`
/// with room reserved: the floor for any write path that copies the bytes once.
/// Returns appends per second.
pub fn in_memory_append_rate(n: u64, value_len: usize) -> f64 {
    let val = value(1, value_len);
    let rec = 16 + 16 + value_len;
    let cap = usize::try_from(n).unwrap_or(0) * rec;
    // Touch the buffer first (non-zero fill, so the pages are really written) so the
    // timed loop measures the copy, not page faults; the store's file is likewise
    // already allocated.
    let mut log: Vec<u8> = vec![1u8; cap];
    log.clear();
    let t = Instant::now();
    for i in 0..n {
        let k = key(i);
        log.extend_from_slice(&(i as u32).to_le_bytes());
        log.extend_from_slice(&[0u8; 12]);
        log.extend_from_slice(&k);
        log.extend_from_slice(&val);
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(&log);
    n as f64 / secs.max(1e-9)
}

/// Like [`in_memory_append_rate`], plus an in-memory index: a `HashMap` from key to
/// offset (std's default hasher, no capacity reserved), the in-memory equivalent of a
/// log-plus-index store. With `prefault`, the log's memory is allocated and touched before
/// the clock starts (no page fault is timed); without, the log grows as it goes, getting
/// its memory from the kernel as the store's file mapping must. Returns puts per second.
pub fn in_memory_store_rate(n: u64, value_len: usize, prefault: bool) -> f64 {
    let val = value(1, value_len);
    let rec = 16 + 16 + value_len;
    let mut log: Vec<u8> = if prefault {
        let mut v = vec![1u8; usize::try_from(n).unwrap_or(0) * rec];
        v.clear();
        v
    } else {
        Vec::new()
    };
    let mut index: std::collections::HashMap<[u8; 16], u64> = std::collections::HashMap::new();
    let t = Instant::now();
    for i in 0..n {
        let k = key(i);
        let off = log.len() as u64;
        log.extend_from_slice(&(i as u32).to_le_bytes());
        log.extend_from_slice(&[0u8; 12]);
        log.extend_from_slice(&k);
        log.extend_from_slice(&val);
        index.insert(k, off);
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box((&log, &index));
    n as f64 / secs.max(1e-9)
}

/// A field of `/proc/self/status` in kB (e.g. `"RssAnon"`), if present.
pub fn proc_status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    kb_field(&s, field)
}

/// A field of `/proc/meminfo` in kB (e.g. `"Committed_AS"`).
pub fn meminfo_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    kb_field(&s, field)
}

fn kb_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
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
    let now = mapkv::sys::page_faults();
    (
        now.0.saturating_sub(before.0),
        now.1.saturating_sub(before.1),
    )
}

/// Writes a file of `len` bytes (pattern data) with `chunk`-sized `pwrite`s and syncs it.
/// The chunk size sets the page-cache folio size of the cached pages on ext4.
pub fn write_file(path: &Path, len: u64, chunk: usize) -> std::io::Result<File> {
    let mut f = mapkv::sys::create_scratch(path)?;
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

/// Human-readable nanoseconds: `850 ns`, `12.3 µs`, `4.10 ms`, `1.20 s`.
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

/// Human-readable milliseconds from seconds.
pub fn fmt_secs(s: f64) -> String {
    fmt_ns((s * 1e9) as u64)
}

/// Human-readable rate: `1.52M`, `5.3k`, `310`.
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
    fn permutation_is_a_permutation() {
        let mut p = Rng::new(3).permutation(1000);
        p.sort_unstable();
        assert!(p.iter().copied().eq(0..1000));
    }
}
