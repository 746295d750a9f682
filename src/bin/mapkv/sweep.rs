//! The write-stall and size-sweep section of `mapkv bench` (`--sweep SIZES`): does mapkv
//! ever make a writer wait (file growth, index growth, index checkpoints, compaction), at
//! any size, and what is left that the kernel causes?
//!
//! For each key count N, in the bench directory:
//!
//! 1. **fill**: a fresh store (`Options::default().durability(Durability::None)`, every
//!    other option at its default), N puts of new 16-byte keys (`measure::key`, spread
//!    over the hash space) with `--value-size` byte values.
//! 2. **overwrite**: every key once more, in a new random order, with new values; then the
//!    store's [`Stats`] (automatic compaction, if the defaults turn it on, runs here).
//! 3. **close** (timed), the file's length and allocated blocks; **reopen** (timed).
//! 4. **plain mmap**: the same N appends, records of 24 + 16 + value-size bytes, into a
//!    plain file mapped `MAP_SHARED` the way a careful program would: the mapping
//!    reserved for the whole run up front, the file grown with `posix_fallocate` in
//!    64 MiB steps kept ahead of the tail (each step timed on its own, outside the append
//!    latency). Nothing of mapkv runs here, so any stall left in this row is the kernel's
//!    (page faults, and `balance_dirty_pages` throttling a writer that dirties pages
//!    faster than write-back cleans them).
//!
//! Every put (append) is timed on its own with `Instant` into a log-bucketed histogram
//! ([`Hist`]: 128 sub-buckets per power of two, under 1% error, fixed memory at any N),
//! with exact counts over 1 ms and 5 ms, the exact maximum, and the five slowest with
//! their time since the phase started. Beside each loop a sampler thread polls the
//! file's metadata every millisecond (growth, replacement by a compaction) and
//! `/proc/meminfo` every 10 ms (`Dirty`, `Writeback`), so a slow put can be set beside
//! what happened at that moment. A size whose files would not fit on the disk is
//! skipped with a message.
//!
//! `unsafe` here: the plain mapping's appends (raw copies into a `MmapRaw`), and the
//! `posix_fallocate` and `statvfs` calls; each states its contract where it is made.
#![expect(
    unsafe_code,
    reason = "the plain mapping baseline: raw copies into a MmapRaw, posix_fallocate, statvfs"
)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comfy_table::{CellAlignment, ContentArrangement, Table};
use indicatif::ProgressBar;
use mapkv::{Durability, Options, Stats, Store};
use serde::Serialize;

use crate::measure::{self, fmt_bytes, fmt_ns, fmt_rate, fmt_secs, key, nanos, stamp, Rng};
use crate::Failure;

/// `--sweep` with no value.
pub const DEFAULT_SIZES: &str = "1k,1m,10m";
/// Header bytes of a plain-mapping record (mapkv's own header is 16 bytes; the baseline
/// is given a little more, so it writes at least as many bytes per put).
pub const PLAIN_HEADER: usize = 24;
/// Growth step of the plain mapping's file.
const PLAIN_STEP: u64 = 64 << 20;
/// The largest key count `--sweep` takes (the overwrite order is a `u32` permutation).
const MAX_KEYS: u64 = u32::MAX as u64;
/// How many of the slowest puts each phase keeps.
const SLOWEST: usize = 5;

/// The key counts of `--sweep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizes(pub Vec<u64>);

/// Parses `--sweep`: comma-separated key counts, each a whole number with an optional
/// `k` (thousand), `m` (million) or `g` (billion) suffix: `1k,1m,10m`.
///
/// # Errors
/// A message naming the bad item.
pub fn parse_sizes(s: &str) -> Result<Sizes, String> {
    let mut out = Vec::new();
    for item in s.split(',') {
        let t = item.trim().to_ascii_lowercase().replace('_', "");
        if t.is_empty() {
            return Err(format!(
                "empty size in {s:?}: want comma-separated key counts such as 1k,1m,10m"
            ));
        }
        let (digits, mul) = match t.as_bytes()[t.len() - 1] {
            b'k' => (&t[..t.len() - 1], 1_000u64),
            b'm' => (&t[..t.len() - 1], 1_000_000),
            b'g' => (&t[..t.len() - 1], 1_000_000_000),
            _ => (t.as_str(), 1),
        };
        let n: u64 = digits.parse().map_err(|_| {
            format!(
                "bad size {:?}: want a whole number of keys with an optional k, m or g suffix \
                 (1k = 1,000), e.g. 1k,1m,10m",
                item.trim()
            )
        })?;
        let n = n
            .checked_mul(mul)
            .filter(|&n| n <= MAX_KEYS)
            .ok_or_else(|| {
                format!(
                    "size {:?} is too large: at most {MAX_KEYS} keys",
                    item.trim()
                )
            })?;
        if n == 0 {
            return Err(format!("size {:?}: want at least 1 key", item.trim()));
        }
        out.push(n);
    }
    Ok(Sizes(out))
}

/// A key count as written on the command line: `1k`, `10m`, `1500`.
fn fmt_keys(n: u64) -> String {
    for (div, suffix) in [(1_000_000_000, "g"), (1_000_000, "m"), (1_000, "k")] {
        if n >= div && n.is_multiple_of(div) {
            return format!("{}{suffix}", n / div);
        }
    }
    n.to_string()
}

// ---------------------------------------------------------------------------------------
// Latency histogram
// ---------------------------------------------------------------------------------------

/// Sub-buckets per power of two: 2^7 = 128, so a bucket is under 1% wide.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Values below `SUB` have a bucket each; above, 128 per power of two up to 2^64.
const BUCKETS: usize = (SUB as usize) * (65 - SUB_BITS as usize);

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return usize::try_from(v).unwrap_or(0);
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = e - SUB_BITS;
    let m = (v >> shift) - SUB; // 0..SUB
    usize::try_from(SUB + u64::from(shift) * SUB + m).unwrap_or(BUCKETS - 1)
}

/// The largest value that falls into bucket `i`.
fn bucket_high(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = (i - SUB) / SUB;
    let m = (i - SUB) % SUB;
    ((SUB + m) << shift) + ((1u64 << shift) - 1)
}

/// Latencies of one phase: a log-bucketed histogram (fixed memory at any count), exact
/// counts over 1 ms and 5 ms, the exact maximum, and the slowest few with when they
/// happened.
#[derive(Debug)]
struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
    over_1ms: u64,
    over_5ms: u64,
    /// Of those, the ones during which the thread waited for a CPU half the time or more.
    over_1ms_runq: u64,
    over_5ms_runq: u64,
    /// Slowest first.
    slowest: Vec<Slow>,
}

impl Hist {
    fn new() -> Self {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
            over_1ms: 0,
            over_5ms: 0,
            over_1ms_runq: 0,
            over_5ms_runq: 0,
            slowest: Vec::with_capacity(SLOWEST + 1),
        }
    }

    /// Records one operation (number `op`) that took `ns` and started `at_ns` after the
    /// phase started; `sched`: what the thread went through meanwhile, if known (see
    /// [`RunQueue`]).
    #[inline]
    fn record(&mut self, ns: u64, at_ns: u64, op: u64, sched: Option<Sched>) {
        self.counts[bucket_of(ns)] += 1;
        self.n += 1;
        self.max = self.max.max(ns);
        if ns > 1_000_000 {
            let preempted = u64::from(sched.is_some_and(|d| d.runq_ns.saturating_mul(2) >= ns));
            self.over_1ms += 1;
            self.over_1ms_runq += preempted;
            if ns > 5_000_000 {
                self.over_5ms += 1;
                self.over_5ms_runq += preempted;
            }
        }
        let floor = if self.slowest.len() < SLOWEST {
            0
        } else {
            self.slowest[SLOWEST - 1].ns
        };
        if ns > floor {
            let pos = self.slowest.partition_point(|s| s.ns >= ns);
            self.slowest.insert(
                pos,
                Slow {
                    ns,
                    at_ms: at_ns as f64 / 1e6,
                    op,
                    runq_ns: sched.map(|d| d.runq_ns),
                    sleeps: sched.map(|d| d.sleeps),
                    near: None,
                    slept_in: None,
                },
            );
            self.slowest.truncate(SLOWEST);
        }
    }

    /// The `q` quantile (nearest rank), as the upper edge of its bucket (at most the
    /// maximum).
    fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_high(i).min(self.max);
            }
        }
        self.max
    }

    fn summary(&self) -> Latency {
        Latency {
            n: self.n,
            p50_ns: self.quantile(0.50),
            p99_ns: self.quantile(0.99),
            p999_ns: self.quantile(0.999),
            max_ns: self.max,
            over_1ms: self.over_1ms,
            over_5ms: self.over_5ms,
            over_1ms_runq: self.over_1ms_runq,
            over_5ms_runq: self.over_5ms_runq,
            slowest: self.slowest.clone(),
        }
    }
}

/// Latency of the operations of one phase (percentiles within 1%: log-bucketed).
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Operations timed.
    pub n: u64,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Slowest operation (exact).
    pub max_ns: u64,
    /// Operations over 1 ms (exact).
    pub over_1ms: u64,
    /// Operations over 5 ms (exact).
    pub over_5ms: u64,
    /// Operations over 1 ms during which the thread waited for a CPU (runnable, not
    /// running) for half their time or more: the scheduler's doing, not the write path's.
    pub over_1ms_runq: u64,
    /// The same for operations over 5 ms.
    pub over_5ms_runq: u64,
    /// The slowest operations, slowest first.
    pub slowest: Vec<Slow>,
}

/// One of the slowest operations of a phase.
#[derive(Debug, Clone, Serialize)]
pub struct Slow {
    /// How long it took.
    pub ns: u64,
    /// When it started, milliseconds after the phase started.
    pub at_ms: f64,
    /// Its number in the phase (0-based).
    pub op: u64,
    /// How long the thread waited for a CPU while it ran (from a sample at most 1024
    /// operations earlier; only for operations over [`RUNQ_PROBE_NS`]).
    pub runq_ns: Option<u64>,
    /// How often the thread went to sleep while it ran (voluntary context switches: a
    /// lock, a condition variable, I/O, dirty-page throttling; same window).
    pub sleeps: Option<u64>,
    /// The file event the sampler saw nearest to any moment of it (within 50 ms), if any.
    pub near: Option<Event>,
    /// Where the sampler saw the thread asleep during it (see [`Sleep::place`]), if it did.
    pub slept_in: Option<String>,
}

/// Something the sampler saw happen to the file during a phase.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Milliseconds after the phase started (the sampler polls every millisecond).
    pub at_ms: f64,
    /// What: `grew`, `shrank` or `replaced` (a new file under the same name: compaction's
    /// switch).
    pub what: &'static str,
    /// The file's length after it.
    pub len: u64,
}

// ---------------------------------------------------------------------------------------
// Run-queue waits of the timed thread
// ---------------------------------------------------------------------------------------

/// Operations slower than this are checked for run-queue wait and sleeps.
pub const RUNQ_PROBE_NS: u64 = 250_000;

/// What the timed thread went through during one slow operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sched {
    /// Time it waited for a CPU (runnable, not running).
    runq_ns: u64,
    /// Times it went to sleep (voluntary context switches: a lock, a condition variable,
    /// I/O, `balance_dirty_pages`).
    sleeps: u64,
}

/// Why an operation was slow, as far as the scheduler can tell: how long the timed thread
/// waited for a CPU (runnable but not running; the second field of
/// `/proc/thread-self/schedstat`) and how often it went to sleep (voluntary context
/// switches, `getrusage(RUSAGE_THREAD)`). On a busy machine with few CPUs a writer is
/// often descheduled for a whole scheduler tick (4 ms at 250 Hz), which has nothing to do
/// with its write path; this tells those operations apart. The loop calls
/// [`RunQueue::check`] after each operation: a fast one only counts (a read every 1024 of
/// them, outside the timing), a slow one gets the figures since the last read: its own,
/// plus at most those of the fast operations before it.
#[derive(Debug)]
struct RunQueue {
    file: Option<std::fs::File>,
    last: (u64, u64),
    start: u64,
    since: u32,
}

/// Voluntary context switches of the calling thread so far.
fn voluntary_switches() -> u64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` into the pointer, which points at writable
    // memory of its size and alignment.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: rc == 0, so getrusage filled the struct (it was zeroed before anyway).
    let ru = unsafe { ru.assume_init() };
    u64::try_from(ru.ru_nvcsw).unwrap_or(0)
}

impl RunQueue {
    /// Opens the calling thread's schedstat (call it on the thread that is timed).
    fn new() -> Self {
        let file = std::fs::File::open("/proc/thread-self/schedstat").ok();
        let mut q = RunQueue {
            file,
            last: (0, 0),
            start: 0,
            since: 0,
        };
        q.last = (q.wait().unwrap_or(0), voluntary_switches());
        q.start = q.last.0;
        q
    }

    /// Time the thread has waited for a CPU so far, ns.
    fn wait(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 128];
        let n = self.file.as_ref()?.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// Checks an operation that took `ns`: what the thread went through if it was slow.
    #[inline]
    fn check(&mut self, ns: u64) -> Option<Sched> {
        if ns > RUNQ_PROBE_NS {
            let now = (self.wait()?, voluntary_switches());
            let d = Sched {
                runq_ns: now.0.saturating_sub(self.last.0),
                sleeps: now.1.saturating_sub(self.last.1),
            };
            self.last = now;
            self.since = 0;
            Some(d)
        } else {
            self.since += 1;
            if self.since >= 1024 {
                self.since = 0;
                if let Some(w) = self.wait() {
                    self.last = (w, voluntary_switches());
                }
            }
            None
        }
    }

    /// Total wait for a CPU since [`RunQueue::new`], ns (`None` without schedstat).
    fn total(&self) -> Option<u64> {
        Some(self.wait()?.saturating_sub(self.start))
    }
}

// ---------------------------------------------------------------------------------------
// The sampler
// ---------------------------------------------------------------------------------------

/// What the sampler saw during one loop.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Watch {
    /// Changes of the file (at most 10,000 kept).
    pub events: Vec<Event>,
    /// Most `Dirty` in `/proc/meminfo` (system-wide), kB.
    pub dirty_max_kb: Option<u64>,
    /// Most `Writeback` in `/proc/meminfo` (system-wide), kB.
    pub writeback_max_kb: Option<u64>,
    /// This process's `RssAnon` (`/proc/self/status`: heap and anonymous mappings, not
    /// the store's file pages) when the loop started, kB.
    pub rss_anon_start_kb: Option<u64>,
    /// The most `RssAnon` the sampler saw during the loop (every 10 ms), kB: with the
    /// start, what the store's checkpoints and compactions held beside the bench's own
    /// arrays.
    pub rss_anon_max_kb: Option<u64>,
    /// CPU time the hypervisor gave to others while the loop ran (`steal` of
    /// `/proc/stat`, all CPUs), ms.
    pub steal_ms: Option<f64>,
    /// Where the timed thread slept, sampled every millisecond (at most 10,000 runs
    /// kept).
    pub sleeps: Vec<Sleep>,
    /// Bytes of pages this process dirtied during the loop (`write_bytes` of
    /// `/proc/self/io`, all threads): what the loop will have written to the disk (the
    /// log, index buckets rewritten by checkpoints, compaction's copy, zeros prefaulted
    /// ahead of the tail that a sync wrote before the log reached them).
    pub written_bytes: Option<u64>,
}

/// A run of samples that found the timed thread asleep in the same place.
#[derive(Debug, Clone, Serialize)]
pub struct Sleep {
    /// First sample, ms after the loop started.
    pub from_ms: f64,
    /// Last sample.
    pub to_ms: f64,
    /// Samples (about one per millisecond).
    pub samples: u64,
    /// Where: the kernel stack (`/proc/PID/task/TID/stack`, innermost frames first, the
    /// scheduler's own left out, `[page fault]` or `[syscall NAME]` for how it got
    /// there), or `wchan` where the stack cannot be read.
    pub place: String,
}

/// Cumulative `steal` ticks of all CPUs (`/proc/stat`), in ms (USER_HZ is 100 on Linux).
fn steal_ms() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(ticks as f64 * 10.0)
}

/// The short form of a kernel stack for [`Sleep::place`].
fn compact_stack(text: &str) -> String {
    let mut frames = Vec::new();
    let mut how = String::new();
    for line in text.lines() {
        let name = line
            .rsplit_once("] ")
            .map_or(line, |(_, n)| n)
            .split('+')
            .next()
            .unwrap_or("")
            .trim();
        if name.is_empty() {
            continue;
        }
        if name.contains("exc_page_fault") {
            how = " [page fault]".into();
            break;
        }
        if let Some(sys) = name
            .strip_prefix("__x64_sys_")
            .or(name.strip_prefix("__arm64_sys_"))
        {
            how = format!(" [syscall {sys}]");
            break;
        }
        if name.starts_with("do_syscall") || name.starts_with("entry_SYSCALL") {
            break;
        }
        if frames.is_empty() && name.contains("schedule") {
            continue;
        }
        if frames.len() < 4 {
            frames.push(name.to_owned());
        }
    }
    frames.join(" < ") + &how
}

/// Reads where the thread of `dir` (`/proc/PID/task/TID`) sleeps: `None` if it is
/// running or runnable.
#[derive(Debug)]
struct SleepProbe {
    wchan: std::fs::File,
    stack: Option<std::fs::File>,
}

impl SleepProbe {
    fn open(dir: &Path) -> Option<Self> {
        Some(SleepProbe {
            wchan: std::fs::File::open(dir.join("wchan")).ok()?,
            stack: std::fs::File::open(dir.join("stack")).ok(),
        })
    }

    fn read(&self) -> Option<String> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 256];
        let n = self.wchan.read_at(&mut buf, 0).ok()?;
        let w = std::str::from_utf8(&buf[..n]).ok()?.trim();
        if w.is_empty() || w == "0" {
            return None;
        }
        let w = w.to_owned();
        let mut big = [0u8; 4096];
        let from_stack = self
            .stack
            .as_ref()
            .and_then(|f| f.read_at(&mut big, 0).ok())
            .and_then(|n| std::str::from_utf8(&big[..n]).ok().map(compact_stack))
            .filter(|s| !s.is_empty());
        Some(from_stack.unwrap_or(w))
    }
}

fn meminfo_dirty() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        s.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    Some((field("Dirty")?, field("Writeback")?))
}

/// Runs `body` on this thread while a sampler thread watches `path`, the system's dirty
/// pages and where this thread sleeps; times are relative to `start`.
fn watched<T>(path: &Path, start: Instant, body: impl FnOnce() -> T) -> (T, Watch) {
    let stop = AtomicBool::new(false);
    // This thread's /proc directory (`PID/task/TID`), for the sampler.
    let me = std::fs::read_link("/proc/thread-self")
        .ok()
        .map(|l| Path::new("/proc").join(l));
    let steal0 = steal_ms();
    let written0 = measure::proc_write_bytes();
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut w = Watch {
                rss_anon_start_kb: measure::proc_status_kb("RssAnon"),
                ..Watch::default()
            };
            let probe = me.as_deref().and_then(SleepProbe::open);
            let mut last = std::fs::metadata(path).ok().map(|m| (m.ino(), m.len()));
            let mut tick = 0u64;
            // One round at least, and one more after the loop ends, so that a loop
            // shorter than a sampling period still has its memory and dirty pages seen.
            loop {
                let last_round = stop.load(Ordering::Relaxed);
                if last_round || tick.is_multiple_of(10) {
                    if let Some((d, wb)) = meminfo_dirty() {
                        w.dirty_max_kb = Some(w.dirty_max_kb.unwrap_or(0).max(d));
                        w.writeback_max_kb = Some(w.writeback_max_kb.unwrap_or(0).max(wb));
                    }
                    if let Some(r) = measure::proc_status_kb("RssAnon") {
                        w.rss_anon_max_kb = Some(w.rss_anon_max_kb.unwrap_or(0).max(r));
                    }
                }
                tick += 1;
                if let Some(place) = probe.as_ref().and_then(SleepProbe::read) {
                    let at = start.elapsed().as_secs_f64() * 1e3;
                    let n = w.sleeps.len();
                    match w.sleeps.last_mut() {
                        Some(l) if l.place == place && at - l.to_ms < 3.0 => {
                            l.to_ms = at;
                            l.samples += 1;
                        }
                        _ if n < 10_000 => w.sleeps.push(Sleep {
                            from_ms: at,
                            to_ms: at,
                            samples: 1,
                            place,
                        }),
                        _ => {}
                    }
                }
                if let Ok(m) = std::fs::metadata(path) {
                    let now = (m.ino(), m.len());
                    if let Some(prev) = last.filter(|&p| p != now) {
                        let what = if prev.0 != now.0 {
                            "replaced"
                        } else if now.1 > prev.1 {
                            "grew"
                        } else {
                            "shrank"
                        };
                        if w.events.len() < 10_000 {
                            w.events.push(Event {
                                at_ms: start.elapsed().as_secs_f64() * 1e3,
                                what,
                                len: now.1,
                            });
                        }
                    }
                    last = Some(now);
                }
                if last_round {
                    break w;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let out = body();
        stop.store(true, Ordering::Relaxed);
        let mut w = sampler.join().unwrap_or_default();
        w.steal_ms = steal0.zip(steal_ms()).map(|(a, b)| (b - a).max(0.0));
        w.written_bytes = written0
            .zip(measure::proc_write_bytes())
            .map(|(a, b)| b.saturating_sub(a));
        (out, w)
    })
}

/// Notes beside each slow operation the file event nearest to it (to any moment of it),
/// within 50 ms, and
/// where the thread was seen asleep during it.
fn annotate(lat: &mut Latency, events: &[Event], sleeps: &[Sleep]) {
    for s in &mut lat.slowest {
        let end = s.at_ms + s.ns as f64 / 1e6;
        s.slept_in = sleeps
            .iter()
            .filter(|z| z.to_ms >= s.at_ms - 0.5 && z.from_ms <= end + 0.5)
            .max_by_key(|z| z.samples)
            .map(|z| z.place.clone());
        // Distance of an event from the operation's interval (0 inside it).
        let dist = |e: &Event| (s.at_ms - e.at_ms).max(e.at_ms - end).max(0.0);
        s.near = events
            .iter()
            .filter(|e| dist(e) <= 50.0)
            .min_by(|a, b| dist(a).total_cmp(&dist(b)))
            .cloned();
    }
}

// ---------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------

/// One timed loop: puts into the store, or appends into the plain mapping.
#[derive(Debug, Clone, Serialize)]
pub struct LoopPhase {
    /// Operations.
    pub ops: u64,
    /// Wall time of the loop (including the timing itself).
    pub secs: f64,
    /// Operations per second.
    pub ops_per_s: f64,
    /// Latency of one operation.
    pub latency: Latency,
    /// How long the timed thread waited for a CPU during the loop, ms (schedstat).
    pub runq_wait_ms: Option<f64>,
    /// What the sampler saw.
    pub watch: Watch,
}

/// The store's figures after a phase (`Stats`), with the whole `Stats` for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct StoreFigures {
    /// `Stats::file_size`.
    pub file_size: u64,
    /// `Stats::log_bytes`.
    pub log_bytes: u64,
    /// `Stats::live_bytes`.
    pub live_bytes: u64,
    /// `Stats::dead_bytes`.
    pub dead_bytes: u64,
    /// `Stats::index_bytes`.
    pub index_bytes: u64,
    /// `Stats::checkpoints` (since open).
    pub checkpoints: u64,
    /// Counters about compaction, checkpoints, stalls and growth found in `Stats`
    /// (by name), as `name=value`.
    pub counters: Vec<String>,
    /// Every field of `Stats`.
    pub stats: serde_json::Value,
}

/// The counters of `stats` (as JSON) whose names speak of compaction, checkpoints,
/// stalls, waits or growth, one level of nesting flattened; `checkpoints` itself left out
/// (it has a column of its own).
fn named_counters(stats: &serde_json::Value) -> Vec<String> {
    const WORDS: [&str; 7] = [
        "maintenance",
        "compact",
        "checkpoint",
        "stall",
        "wait",
        "grow",
        "switch",
    ];
    let mut out = Vec::new();
    let Some(obj) = stats.as_object() else {
        return out;
    };
    let mut push = |name: String, v: &serde_json::Value| {
        let lower = name.to_ascii_lowercase();
        if name == "checkpoints" || !WORDS.iter().any(|w| lower.contains(w)) {
            return;
        }
        match v {
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
                out.push(format!("{name}={v}"));
            }
            serde_json::Value::String(s) => out.push(format!("{name}={s}")),
            // A `Duration`.
            serde_json::Value::Object(d) => {
                if let (Some(secs), Some(nanos)) = (
                    d.get("secs").and_then(serde_json::Value::as_u64),
                    d.get("nanos").and_then(serde_json::Value::as_u64),
                ) {
                    let ms = secs as f64 * 1e3 + nanos as f64 / 1e6;
                    out.push(format!("{name}={ms:.1}ms"));
                }
            }
            _ => {}
        }
    };
    for (k, v) in obj {
        if k == "recovery" || k == "live" {
            continue;
        }
        if let Some(inner) = v.as_object() {
            for (k2, v2) in inner {
                push(format!("{k}.{k2}"), v2);
            }
        } else {
            push(k.clone(), v);
        }
    }
    out
}

fn figures(st: &Stats) -> StoreFigures {
    let stats = serde_json::to_value(st).unwrap_or(serde_json::Value::Null);
    StoreFigures {
        file_size: st.file_size,
        log_bytes: st.log_bytes,
        live_bytes: st.live_bytes,
        dead_bytes: st.dead_bytes,
        index_bytes: st.index_bytes,
        checkpoints: st.checkpoints,
        counters: named_counters(&stats),
        stats,
    }
}

/// The plain mapping's file growth (not part of the append latency).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Growth {
    /// `posix_fallocate` steps taken during the loop.
    pub steps: u64,
    /// Bytes per step.
    pub step_bytes: u64,
    /// Time of all steps, ms.
    pub total_ms: f64,
    /// Slowest step, ms.
    pub max_ms: f64,
}

/// Everything measured for one key count.
#[derive(Debug, Clone, Serialize)]
pub struct SizeReport {
    /// Keys.
    pub keys: u64,
    /// Filling a fresh store.
    pub fill: LoopPhase,
    /// The store after the fill.
    pub after_fill: StoreFigures,
    /// Overwriting every key once, in a new random order.
    pub overwrite: LoopPhase,
    /// The store after the overwrite.
    pub after_overwrite: StoreFigures,
    /// `Store::close` after the overwrite, ms.
    pub close_ms: f64,
    /// The file's length after the close.
    pub file_len: u64,
    /// The file's allocated bytes (`st_blocks * 512`) after the close.
    pub allocated_bytes: u64,
    /// `allocated_bytes / (keys * (16 + value_size))`.
    pub allocated_over_live: f64,
    /// `Store::open` of the closed store, ms.
    pub reopen_ms: f64,
    /// The reopen found the store closed cleanly.
    pub reopen_clean: bool,
    /// The same appends over a plain `MAP_SHARED` file mapping.
    pub plain: LoopPhase,
    /// The plain mapping's file growth.
    pub plain_growth: Growth,
}

/// A size left out.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Keys.
    pub keys: u64,
    /// Bytes the size would need at most (estimate).
    pub needs_bytes: u64,
    /// Bytes free on the filesystem.
    pub free_bytes: u64,
}

/// The kernel's dirty-page limits (`/proc/sys/vm`).
#[derive(Debug, Clone, Serialize)]
pub struct DirtyLimits {
    /// `vm.dirty_background_ratio`, %.
    pub background_ratio: Option<u64>,
    /// `vm.dirty_ratio`, %.
    pub ratio: Option<u64>,
    /// `vm.dirty_background_bytes` (0: the ratio applies).
    pub background_bytes: Option<u64>,
    /// `vm.dirty_bytes` (0: the ratio applies).
    pub bytes: Option<u64>,
    /// `MemAvailable` at the start, kB.
    pub mem_available_kb: Option<u64>,
}

impl DirtyLimits {
    fn read() -> Self {
        let vm = |f: &str| {
            std::fs::read_to_string(format!("/proc/sys/vm/{f}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        DirtyLimits {
            background_ratio: vm("dirty_background_ratio"),
            ratio: vm("dirty_ratio"),
            background_bytes: vm("dirty_background_bytes"),
            bytes: vm("dirty_bytes"),
            mem_available_kb: measure::meminfo_kb("MemAvailable"),
        }
    }

    /// (background, hard) limits in bytes, approximately (the kernel computes them from
    /// its "dirtyable" memory, about `MemAvailable`).
    fn approx_bytes(&self) -> Option<(u64, u64)> {
        let avail = self.mem_available_kb? * 1024;
        let of = |bytes: Option<u64>, ratio: Option<u64>| match bytes {
            Some(b) if b > 0 => Some(b),
            _ => Some(avail / 100 * ratio?),
        };
        Some((
            of(self.background_bytes, self.background_ratio)?,
            of(self.bytes, self.ratio)?,
        ))
    }
}

/// What `mapkv bench --sweep` measured (its `--json` output).
#[derive(Debug, Serialize)]
pub struct SweepReport {
    /// Kernel release.
    pub kernel: String,
    /// Filesystem of the benchmark directory.
    pub filesystem: String,
    /// Benchmark directory.
    pub dir: String,
    /// Value size, bytes (keys are 16 bytes).
    pub value_size: usize,
    /// `Options::background_nice` of the stores (the library's default unless
    /// `--background-nice` set it).
    pub background_nice: u8,
    /// Bytes per plain-mapping record (24-byte header, key, value).
    pub plain_record_bytes: usize,
    /// The kernel's dirty-page limits.
    pub dirty_limits: DirtyLimits,
    /// One entry per size run.
    pub sizes: Vec<SizeReport>,
    /// Sizes skipped for lack of disk space.
    pub skipped: Vec<Skipped>,
    /// Wall time of the section.
    pub wall_secs: f64,
}

// ---------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------

fn io_fail(what: &str, e: &std::io::Error) -> Failure {
    Failure::msg(format!("sweep: {what}: {e}"))
}

/// Bytes free for this user on the filesystem holding `dir` (`statvfs`).
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that lives across the call, and `st` points at
    // writable memory of the size and alignment of a `statvfs`, which is all the call
    // writes.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: rc == 0, so statvfs filled the struct (it was zeroed before anyway).
    let st = unsafe { st.assume_init() };
    #[allow(
        clippy::useless_conversion,
        reason = "the field types are u64 on 64-bit Linux, narrower elsewhere"
    )]
    let (avail, frsize) = (
        u64::try_from(st.f_bavail).ok()?,
        u64::try_from(st.f_frsize).ok()?,
    );
    avail.checked_mul(frsize)
}

/// Most bytes one size may need on the disk: the store's log after the overwrite (every
/// key twice, 16-byte record headers), a compaction's copy of the live records beside
/// it, the index (generously), and slack. The plain file comes after the store is gone.
fn needs_bytes(keys: u64, value_size: usize) -> u64 {
    let rec = 16 + 16 + value_size as u64;
    keys.saturating_mul(rec.saturating_mul(3) + 64)
        .saturating_add(256 << 20)
}

/// Runs `mapkv bench --sweep` alone and prints its report.
pub fn run_only(
    dir: &Path,
    filesystem: &str,
    sizes: &Sizes,
    value_size: usize,
    background_nice: u8,
    json: bool,
) -> Result<(), Failure> {
    let wall = Instant::now();
    if sizes.0.is_empty() {
        return Err(Failure::msg("--sweep: no sizes given"));
    }
    let pb = crate::progress::bar(sizes.0.len() as u64 * 4);
    let dirty_limits = DirtyLimits::read();
    let mut reports = Vec::new();
    let mut skipped = Vec::new();
    for &n in &sizes.0 {
        let needs = needs_bytes(n, value_size);
        if let Some(free) = free_bytes(dir) {
            if needs > free {
                pb.suspend(|| {
                    eprintln!(
                        "mapkv: bench --sweep: skipping {} keys: it needs up to {} on {} and \
                         {} is free",
                        fmt_keys(n),
                        fmt_bytes(needs),
                        dir.display(),
                        fmt_bytes(free)
                    );
                });
                skipped.push(Skipped {
                    keys: n,
                    needs_bytes: needs,
                    free_bytes: free,
                });
                pb.inc(4);
                continue;
            }
        }
        reports.push(run_size(dir, n, value_size, background_nice, &pb)?);
    }
    pb.finish_and_clear();
    let report = SweepReport {
        kernel: measure::kernel(),
        filesystem: filesystem.to_owned(),
        dir: dir.display().to_string(),
        value_size,
        background_nice,
        plain_record_bytes: PLAIN_HEADER + 16 + value_size,
        dirty_limits,
        sizes: reports,
        skipped,
        wall_secs: wall.elapsed().as_secs_f64(),
    };
    let text = if json {
        serde_json::to_string_pretty(&report).map_err(|e| Failure::msg(format!("JSON: {e}")))?
            + "\n"
    } else {
        render(&report)
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
        .map_err(Failure::stdout)
}

/// A random permutation of `0..n` as `u32`s (`n <= 2^32`).
fn permutation_u32(n: u64, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n)
        .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
        .collect();
    let mut rng = Rng::new(seed);
    for i in (1..v.len()).rev() {
        let j = usize::try_from(rng.below(i as u64 + 1)).unwrap_or(0);
        v.swap(i, j);
    }
    v
}

fn run_size(
    dir: &Path,
    n: u64,
    value_size: usize,
    background_nice: u8,
    pb: &ProgressBar,
) -> Result<SizeReport, Failure> {
    let path = dir.join("sweep.mkv");
    let fail = |e: &mapkv::Error| Failure::store(&path, e);
    let _ = std::fs::remove_file(&path);
    let options = || {
        Options::default()
            .durability(Durability::None)
            .background_nice(background_nice)
    };
    let label = fmt_keys(n);

    // 1. Fill.
    pb.set_message(format!("sweep {label}: fill"));
    let store = Store::open(&path, options()).map_err(|e| fail(&e))?;
    let mut val = measure::value(0, value_size);
    let mut hist = Hist::new();
    let mut runq = RunQueue::new();
    let start = Instant::now();
    let (res, watch) = watched(&path, start, || -> mapkv::Result<f64> {
        for i in 0..n {
            stamp(&mut val, i);
            let k = key(i);
            let t0 = Instant::now();
            store.put(k, &val)?;
            let t1 = Instant::now();
            let ns = nanos(t1 - t0);
            hist.record(ns, nanos(t0 - start), i, runq.check(ns));
        }
        Ok(start.elapsed().as_secs_f64())
    });
    let fill = loop_phase(n, res.map_err(|e| fail(&e))?, &hist, &runq, watch);
    let after_fill = figures(&store.stats());
    pb.inc(1);

    // 2. Overwrite, every key once, in a new random order.
    pb.set_message(format!("sweep {label}: overwrite"));
    let order = permutation_u32(n, 0x5eed ^ n);
    let mut val = measure::value(1, value_size);
    let mut hist = Hist::new();
    let mut runq = RunQueue::new();
    let start = Instant::now();
    let (res, watch) = watched(&path, start, || -> mapkv::Result<f64> {
        for (j, &i) in order.iter().enumerate() {
            let j = j as u64;
            stamp(&mut val, n + j);
            let k = key(u64::from(i));
            let t0 = Instant::now();
            store.put(k, &val)?;
            let t1 = Instant::now();
            let ns = nanos(t1 - t0);
            hist.record(ns, nanos(t0 - start), j, runq.check(ns));
        }
        Ok(start.elapsed().as_secs_f64())
    });
    drop(order);
    let overwrite = loop_phase(n, res.map_err(|e| fail(&e))?, &hist, &runq, watch);
    let after_overwrite = figures(&store.stats());
    pb.inc(1);

    // 3. Close, what the file takes, reopen.
    pb.set_message(format!("sweep {label}: close and reopen"));
    let t = Instant::now();
    store.close().map_err(|e| fail(&e))?;
    let close_ms = t.elapsed().as_secs_f64() * 1e3;
    let meta = std::fs::metadata(&path).map_err(|e| io_fail("stat the store", &e))?;
    let file_len = meta.len();
    let allocated_bytes = meta.blocks() * 512;
    let live = n as f64 * (16 + value_size) as f64;
    let t = Instant::now();
    let store = Store::open(&path, options()).map_err(|e| fail(&e))?;
    let reopen_ms = t.elapsed().as_secs_f64() * 1e3;
    let reopen_clean = store.stats().recovery.was_clean;
    let len = store.len() as u64;
    store.close().map_err(|e| fail(&e))?;
    let _ = std::fs::remove_file(&path);
    if len != n {
        return Err(Failure::msg(format!(
            "{}: reopened with {len} keys after {n} were written: the store lost data",
            path.display()
        )));
    }
    pb.inc(1);

    // 4. The same appends over a plain MAP_SHARED file mapping.
    pb.set_message(format!("sweep {label}: plain mapping"));
    let (plain, plain_growth) = plain_mapping(dir, n, value_size)?;
    pb.inc(1);

    Ok(SizeReport {
        keys: n,
        fill,
        after_fill,
        overwrite,
        after_overwrite,
        close_ms,
        file_len,
        allocated_bytes,
        allocated_over_live: allocated_bytes as f64 / live.max(1.0),
        reopen_ms,
        reopen_clean,
        plain,
        plain_growth,
    })
}

fn loop_phase(ops: u64, secs: f64, hist: &Hist, runq: &RunQueue, watch: Watch) -> LoopPhase {
    let mut latency = hist.summary();
    annotate(&mut latency, &watch.events, &watch.sleeps);
    LoopPhase {
        ops,
        secs,
        ops_per_s: ops as f64 / secs.max(1e-9),
        latency,
        runq_wait_ms: runq.total().map(|w| w as f64 / 1e6),
        watch,
    }
}

/// Grows `file` to `new_len` with real allocation (`posix_fallocate`), as mapkv does, so
/// that a full disk is an error here and never a `SIGBUS` in the loop.
fn fallocate(file: &std::fs::File, from: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(from), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "file too large",
        ));
    };
    // SAFETY: posix_fallocate only reads its integer arguments; the descriptor is open
    // (borrowed from `file` for the duration of the call).
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), off, l) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// N appends of `PLAIN_HEADER + 16 + value_size` bytes into a plain file mapped
/// `MAP_SHARED`: the mapping reserved for the whole run up front, the file grown with
/// `posix_fallocate` in [`PLAIN_STEP`] steps kept at least one step ahead of the tail
/// (timed apart from the appends).
fn plain_mapping(dir: &Path, n: u64, value_size: usize) -> Result<(LoopPhase, Growth), Failure> {
    let path = dir.join("sweep-plain.scratch");
    let rec_len = PLAIN_HEADER + 16 + value_size;
    let total = n
        .checked_mul(rec_len as u64)
        .ok_or_else(|| Failure::msg("sweep: plain mapping size overflows"))?;
    let reserve = (total + 2 * PLAIN_STEP).next_multiple_of(PLAIN_STEP);
    let reserve_len = usize::try_from(reserve)
        .map_err(|_| Failure::msg("sweep: plain mapping larger than the address space"))?;
    let file = measure::create_scratch(&path).map_err(|e| io_fail("create the plain file", &e))?;
    let mut alloc = 0u64;
    let mut growth = Growth {
        step_bytes: PLAIN_STEP,
        ..Growth::default()
    };
    fallocate(&file, 0, 2 * PLAIN_STEP).map_err(|e| io_fail("posix_fallocate", &e))?;
    alloc += 2 * PLAIN_STEP;
    // A raw mapping hands out no references: the loop writes through a pointer, below
    // the allocated end only.
    let map = memmap2::MmapOptions::new()
        .len(reserve_len)
        .map_raw(&file)
        .map_err(|e| io_fail("mmap the plain file", &e))?;
    let base = map.as_mut_ptr();

    let mut rec = vec![0u8; rec_len];
    let mut val = measure::value(2, value_size);
    let mut hist = Hist::new();
    let mut runq = RunQueue::new();
    let start = Instant::now();
    let (res, watch) = watched(&path, start, || -> std::io::Result<f64> {
        let mut off = 0u64;
        for i in 0..n {
            // The file stays at least one step ahead of the tail.
            while off + rec_len as u64 + PLAIN_STEP > alloc {
                let t = Instant::now();
                fallocate(&file, alloc, PLAIN_STEP)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                alloc += PLAIN_STEP;
                growth.steps += 1;
                growth.total_ms += ms;
                growth.max_ms = growth.max_ms.max(ms);
            }
            // Build the record outside the timing, as the store loop builds its key and
            // value: header (sequence, lengths, a scrambled word), key, value.
            stamp(&mut val, i);
            rec[..8].copy_from_slice(&i.to_le_bytes());
            rec[8..12].copy_from_slice(&16u32.to_le_bytes());
            rec[12..16].copy_from_slice(&u32::try_from(value_size).unwrap_or(0).to_le_bytes());
            rec[16..24].copy_from_slice(&measure::mix(i).to_le_bytes());
            rec[24..40].copy_from_slice(&key(i));
            rec[40..].copy_from_slice(&val);
            let at = usize::try_from(off).unwrap_or(usize::MAX);
            let t0 = Instant::now();
            // SAFETY: `off + rec_len <= total <= alloc` (the loop above keeps `alloc`
            // ahead), so the destination lies inside the file, whose blocks are allocated
            // (no SIGBUS, not even on a full disk), and inside the mapping
            // (`alloc <= total + 2 * PLAIN_STEP <= reserve`). The file is a scratch file
            // this function created and nothing else opens or truncates. `rec` is a
            // separate heap buffer, so the ranges do not overlap, and no reference to the
            // mapped bytes exists (a raw mapping hands out pointers only).
            unsafe {
                std::ptr::copy_nonoverlapping(rec.as_ptr(), base.add(at), rec_len);
            }
            let t1 = Instant::now();
            let ns = nanos(t1 - t0);
            hist.record(ns, nanos(t0 - start), i, runq.check(ns));
            off += rec_len as u64;
        }
        Ok(start.elapsed().as_secs_f64())
    });
    drop(map);
    drop(file);
    // Removing the file drops its dirty pages unwritten: the next size starts clean.
    let _ = std::fs::remove_file(&path);
    let secs = res.map_err(|e| io_fail("grow the plain file", &e))?;
    Ok((loop_phase(n, secs, &hist, &runq, watch), growth))
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_content_arrangement(ContentArrangement::Dynamic);
    t
}

fn kb(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |k| fmt_bytes(k * 1024))
}

fn loop_row(keys: &str, phase: &str, p: &LoopPhase, notes: String) -> Vec<String> {
    let l = &p.latency;
    vec![
        keys.to_owned(),
        phase.to_owned(),
        fmt_rate(p.ops_per_s),
        fmt_ns(l.p50_ns),
        fmt_ns(l.p99_ns),
        fmt_ns(l.p999_ns),
        fmt_ns(l.max_ns),
        format!("{} ({})", l.over_1ms, l.over_1ms_runq),
        format!("{} ({})", l.over_5ms, l.over_5ms_runq),
        format!(
            "{} / {}",
            p.runq_wait_ms.map_or_else(dash, |ms| fmt_secs(ms / 1e3)),
            p.watch.steal_ms.map_or_else(dash, |ms| fmt_secs(ms / 1e3))
        ),
        kb(p.watch.dirty_max_kb),
        p.watch.written_bytes.map_or_else(dash, fmt_bytes),
        match (p.watch.rss_anon_max_kb, p.watch.rss_anon_start_kb) {
            (Some(max), Some(start)) => format!(
                "{} (+{})",
                fmt_bytes(max * 1024),
                fmt_bytes(max.saturating_sub(start) * 1024)
            ),
            (max, _) => kb(max),
        },
        fmt_secs(p.secs),
        notes,
    ]
}

fn event_counts(events: &[Event]) -> String {
    let grew = events.iter().filter(|e| e.what == "grew").count();
    let replaced = events.iter().filter(|e| e.what == "replaced").count();
    let mut s = format!("file grew {grew}x");
    if replaced > 0 {
        s += &format!(", replaced {replaced}x (compaction)");
    }
    s
}

fn store_notes(f: &StoreFigures, events: &[Event]) -> String {
    let mut s = format!(
        "file {}, live {}, dead {}, index {}, checkpoints {}; {}",
        fmt_bytes(f.file_size),
        fmt_bytes(f.live_bytes),
        fmt_bytes(f.dead_bytes),
        fmt_bytes(f.index_bytes),
        f.checkpoints,
        event_counts(events),
    );
    if !f.counters.is_empty() {
        s += "; ";
        let short: Vec<&str> = f
            .counters
            .iter()
            .map(|c| c.strip_prefix("maintenance.").unwrap_or(c))
            .collect();
        s += &short.join(", ");
    }
    s
}

fn dash() -> String {
    "-".into()
}

/// The human-readable report.
fn render(r: &SweepReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "mapkv bench --sweep: 16 B keys x {} B values, Durability::None, one writer, the \
         store's threads at nice +{}; {} in {}; kernel {}",
        r.value_size, r.background_nice, r.filesystem, r.dir, r.kernel
    );
    let d = &r.dirty_limits;
    let limits = match d.approx_bytes() {
        Some((bg, hard)) => format!(
            "about {} (background write-back starts) and {} (hard limit) of {} available; \
             a writer is throttled once dirty pages pass about halfway between the two",
            fmt_bytes(bg),
            fmt_bytes(hard),
            kb(d.mem_available_kb)
        ),
        None => "unknown".into(),
    };
    let _ = writeln!(s, "Kernel dirty-page limits: {limits}.");

    let mut t = table();
    t.set_header(vec![
        "keys",
        "phase",
        "ops/s",
        "p50",
        "p99",
        "p99.9",
        "max",
        ">1 ms (CPU)",
        ">5 ms (CPU)",
        "CPU wait / steal",
        "dirty max",
        "written",
        "RssAnon max",
        "time",
        "notes",
    ]);
    for z in &r.sizes {
        let k = fmt_keys(z.keys);
        t.add_row(loop_row(
            &k,
            "fill",
            &z.fill,
            store_notes(&z.after_fill, &z.fill.watch.events),
        ));
        t.add_row(loop_row(
            &k,
            "overwrite",
            &z.overwrite,
            store_notes(&z.after_overwrite, &z.overwrite.watch.events),
        ));
        let mut close = vec![k.clone(), "close".into()];
        close.extend(std::iter::repeat_with(dash).take(11));
        close.push(fmt_secs(z.close_ms / 1e3));
        close.push(format!(
            "file {}, allocated {} = {:.2}x the live keys+values ({} x {} B)",
            fmt_bytes(z.file_len),
            fmt_bytes(z.allocated_bytes),
            z.allocated_over_live,
            z.keys,
            16 + r.value_size
        ));
        t.add_row(close);
        let mut reopen = vec![k.clone(), "reopen".into()];
        reopen.extend(std::iter::repeat_with(dash).take(11));
        reopen.push(fmt_secs(z.reopen_ms / 1e3));
        reopen.push(if z.reopen_clean {
            "clean".into()
        } else {
            "NOT clean".into()
        });
        t.add_row(reopen);
        let g = &z.plain_growth;
        t.add_row(loop_row(
            &k,
            "plain mmap",
            &z.plain,
            format!(
                "{} B records appended; {} fallocate steps of {} (slowest {}, not in the latency)",
                r.plain_record_bytes,
                g.steps,
                fmt_bytes(g.step_bytes),
                fmt_secs(g.max_ms / 1e3)
            ),
        ));
    }
    let n = t.column_count();
    for i in 2..n.saturating_sub(1) {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    let _ = writeln!(s, "{t}");

    let _ = writeln!(
        s,
        "Slowest operations of each loop (time, #number in the loop @ start, ms after the loop \
         started; for those over 250 µs, how long the writer waited for a CPU and how often \
         it slept meanwhile; the file event the sampler saw nearest, within 50 ms):"
    );
    for z in &r.sizes {
        for (phase, p) in [
            ("fill", &z.fill),
            ("overwrite", &z.overwrite),
            ("plain mmap", &z.plain),
        ] {
            let items: Vec<String> = p
                .latency
                .slowest
                .iter()
                .map(|x| {
                    let mut it = format!("{} #{} @ {:.1} ms", fmt_ns(x.ns), x.op, x.at_ms);
                    if let (Some(w), Some(z)) = (x.runq_ns, x.sleeps) {
                        let _ = write!(it, " (waited {} for a CPU, slept {z}x)", fmt_ns(w));
                    }
                    if let Some(z) = &x.slept_in {
                        let _ = write!(it, " (asleep in {z})");
                    }
                    if let Some(e) = &x.near {
                        let end = x.at_ms + x.ns as f64 / 1e6;
                        let when = if e.at_ms < x.at_ms {
                            format!("{:.1} ms before it", x.at_ms - e.at_ms)
                        } else if e.at_ms <= end {
                            format!("during it, {:.1} ms in", e.at_ms - x.at_ms)
                        } else {
                            format!("{:.1} ms after it", e.at_ms - end)
                        };
                        let _ = write!(it, " (file {} to {}, {when})", e.what, fmt_bytes(e.len));
                    }
                    it
                })
                .collect();
            let _ = writeln!(
                s,
                "  {} {phase}: {}",
                fmt_keys(z.keys),
                if items.is_empty() {
                    "-".into()
                } else {
                    items.join("; ")
                }
            );
        }
    }
    let _ = writeln!(
        s,
        "Where the writer thread slept (sampled every ms: about one sample per ms asleep; the \
         kernel stack, innermost first):"
    );
    for z in &r.sizes {
        for (phase, p) in [
            ("fill", &z.fill),
            ("overwrite", &z.overwrite),
            ("plain mmap", &z.plain),
        ] {
            let mut by: Vec<(String, u64)> = Vec::new();
            for x in &p.watch.sleeps {
                match by.iter_mut().find(|(place, _)| *place == x.place) {
                    Some(e) => e.1 += x.samples,
                    None => by.push((x.place.clone(), x.samples)),
                }
            }
            by.sort_by_key(|e| std::cmp::Reverse(e.1));
            let items: Vec<String> = by
                .iter()
                .take(3)
                .map(|(place, n)| format!("{n} x {place}"))
                .collect();
            let _ = writeln!(
                s,
                "  {} {phase}: {}",
                fmt_keys(z.keys),
                if items.is_empty() {
                    "never seen asleep".into()
                } else {
                    items.join("; ")
                }
            );
        }
    }
    for k in &r.skipped {
        let _ = writeln!(
            s,
            "Skipped {} keys: it needs up to {} and {} is free.",
            fmt_keys(k.keys),
            fmt_bytes(k.needs_bytes),
            fmt_bytes(k.free_bytes)
        );
    }
    let _ = writeln!(
        s,
        "How to read it: every put (append) is timed on its own; p50-p99.9 come from a \
         log-bucketed histogram (under 1% error), max and the >1 ms/>5 ms counts are exact. \
         `>1 ms (CPU)`: operations over 1 ms, and in parentheses how many of them \
         the writer thread spent at least half waiting for a CPU (runnable, not running: \
         /proc/thread-self/schedstat), which is the scheduler's doing (other processes on \
         few CPUs), not the write path's; `CPU wait / steal`: that wait over the whole loop, \
         and the CPU time the hypervisor took from this VM meanwhile (all CPUs). \
         `fill` puts new keys into a fresh store (its file, index and checkpoints grow as it \
         goes), `overwrite` puts every key again in a new random order (dead records; \
         automatic compaction if enabled). `plain mmap` does the same number of appends into \
         a plain MAP_SHARED file with no store at all: its tail is what the kernel alone \
         costs at that write rate (page faults, dirty-page throttling once `dirty max` \
         nears the limits above). A store row whose tail is far above its plain mmap row's \
         is a stall mapkv caused. `dirty max` is system-wide. `written`: bytes of pages \
         this process dirtied during the loop (/proc/self/io write_bytes), each a page the \
         disk must take: the log itself, the index buckets each checkpoint rewrites (a \
         4 KiB page for every bucket one of its keys lands in), compaction's copy. \
         `RssAnon max`: this \
         process's anonymous memory (heap, the store's deltas and copies; not file pages) \
         at its peak during the loop, and in parentheses above what it was at the start \
         (the bench's own arrays are there from the start)."
    );
    let _ = writeln!(s, "\nTotal wall time: {:.1} s.", r.wall_secs);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(
            parse_sizes("1k, 1m,10M,2_500,3g").expect("sizes").0,
            [1_000, 1_000_000, 10_000_000, 2_500, 3_000_000_000]
        );
    }

    #[test]
    fn bad_sizes_are_errors() {
        for bad in ["", "1k,", "0", "x", "1.5m", "-1", "5g", "1t", "k"] {
            assert!(parse_sizes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_print_as_typed() {
        assert_eq!(fmt_keys(1_000), "1k");
        assert_eq!(fmt_keys(10_000_000), "10m");
        assert_eq!(fmt_keys(1_500), "1500");
    }

    #[test]
    fn buckets_cover_values_tightly() {
        for v in [
            0u64,
            1,
            127,
            128,
            129,
            255,
            256,
            1_000,
            123_456,
            5_000_000,
            u64::MAX,
        ] {
            let b = bucket_of(v);
            assert!(b < BUCKETS, "{v}");
            let hi = bucket_high(b);
            assert!(hi >= v, "{v}: bucket high {hi}");
            assert!(hi - v <= v / 64, "{v}: bucket high {hi} too far");
            if b > 0 {
                assert!(bucket_high(b - 1) < v, "{v}");
            }
        }
    }

    #[test]
    fn histogram_quantiles_and_slowest() {
        let mut h = Hist::new();
        for v in 1..=10_000u64 {
            let sched = (v > 9_000).then_some(Sched {
                runq_ns: v * 1_000,
                sleeps: 0,
            });
            h.record(v * 1_000, v, v, sched);
        }
        let l = h.summary();
        assert_eq!(l.n, 10_000);
        assert_eq!(l.max_ns, 10_000_000);
        assert!(
            l.p50_ns.abs_diff(5_000_000) <= 5_000_000 / 100,
            "{}",
            l.p50_ns
        );
        assert!(
            l.p999_ns.abs_diff(9_990_000) <= 9_990_000 / 100,
            "{}",
            l.p999_ns
        );
        assert_eq!(l.over_1ms, 9_000);
        assert_eq!(l.over_5ms, 5_000);
        assert_eq!((l.over_1ms_runq, l.over_5ms_runq), (1_000, 1_000));
        assert_eq!(l.slowest[0].runq_ns, Some(10_000_000));
        let ops: Vec<u64> = l.slowest.iter().map(|s| s.op).collect();
        assert_eq!(ops, [10_000, 9_999, 9_998, 9_997, 9_996]);
    }

    /// A loop that ends before the sampler's first look still gets its memory and dirty
    /// pages sampled (a 1k-key sweep on CI once reported no RssAnon peak).
    #[test]
    fn a_loop_shorter_than_one_sample_is_still_sampled() {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..20 {
            let ((), w) = watched(dir.path(), Instant::now(), || ());
            assert!(
                w.rss_anon_start_kb.is_some() && w.rss_anon_max_kb.is_some_and(|m| m > 0),
                "{w:?}"
            );
            assert!(w.dirty_max_kb.is_some(), "{w:?}");
        }
    }
}
