//! `mapkv bench`: what each durability policy and `populate` cost and buy on this machine.
//!
//! One run:
//! 1. Fills a base store of `--keys` keys (`Durability::None`) and closes it cleanly.
//! 2. For each policy x populate: copies the base store, evicts the copy from the page
//!    cache (and checks with `mincore` that nothing is resident), then measures a cold
//!    open, a cold first touch (one `get` of every key), warm random reads, and writes of
//!    new keys under the policy (latency of each write, syncs, data at risk), then the
//!    close.
//! 3. Measures the raw cost of one sync (4 KiB `pwrite` + `fdatasync`) in the same
//!    directory, before the run, before each `always` row and after the run, and states
//!    which of this VM's two sync regimes was observed.
//! 4. Unless `--quick`: group commit (`always` with 1 and 4 writers) and the mmap flag
//!    experiments of [`crate::flags`].
//! 5. Unless `--quick` or `--readers off`: readers in other processes, [`crate::readers`]
//!    (`--readers only` runs that section alone).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comfy_table::{CellAlignment, ContentArrangement, Table};
use mapkv::{Durability, Options, Store};
use serde::Serialize;

use crate::measure::{
    self, faults_since, fmt_bytes, fmt_ns, fmt_rate, fmt_secs, key, nanos, stamp, Percentiles,
    RawSync, Regime, Rng,
};
use crate::Failure;

/// Arguments of `mapkv bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Every row opens a copy of the same store, evicted from the page cache first (a cold open
and a cold first touch); `reads/s` is warm. Latency columns are per write. `at risk` is the
most data a power loss could have taken at any moment of the write phase (sampled every
20 ms): bytes written but not yet synced. Syncs are `fdatasync`/`msync(MS_SYNC)` calls
issued by the store during the write phase.

Examples:
  mapkv bench                               # the full run, about a minute
  mapkv bench --quick --policies none,always
  mapkv bench --threads 4 --policies always # group commit
  mapkv bench --json > bench.json --plot bench.svg
  mapkv bench --readers only                # reader processes beside a writer process
  mapkv bench --sweep 1k,1m,10m             # write stalls and a size sweep (alone; 100m: ~46 GB)
  mapkv bench --dir /mnt/ssd/tmp            # measure another disk")]
pub struct BenchArgs {
    /// Directory for the benchmark's files (default: a new temporary directory, removed
    /// afterwards). Must be on the disk you want to measure; tmpfs makes syncs free.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keys in the store every row of the first value size opens and reads; also the most
    /// writes one such row makes (see `--value-size` for the other sizes).
    #[arg(long, default_value_t = 500_000)]
    pub keys: u64,
    /// Value sizes in bytes, comma-separated (keys are 16 bytes; a size given twice
    /// counts once): the table has the policy x populate rows for each. The first size's
    /// store holds `--keys` keys, each further size's as many bytes of keys and values
    /// (at least 100 keys), and its rows write at most four times that many bytes (so
    /// that a write phase at large values still spans a few `periodic` intervals), for at
    /// most 1 s, and read for at most 0.25 s (so the default run stays near a minute).
    /// Group commit, `--sweep` and `--kill-recovery` use the first size.
    #[arg(long = "value-size", value_name = "BYTES", value_delimiter = ',', default_value = "100,4096", num_args = 1..)]
    pub value_sizes: Vec<usize>,
    /// Writer threads. More than one shows group commit: concurrent `always` writers
    /// share syncs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Durability policies, comma-separated: none, async, periodic[:MS] (default 100 ms),
    /// always.
    #[arg(long, value_delimiter = ',', default_value = "none,async,periodic,always", value_parser = parse_policy)]
    pub policies: Vec<Policy>,
    /// Populate (warm-up) settings to run: off, on or both.
    #[arg(long, value_enum, default_value_t = PopulateSel::Both)]
    pub populate: PopulateSel,
    /// Most seconds of writes per row (`always` and `async` rows usually hit this limit).
    #[arg(long, default_value_t = 3.0)]
    pub write_secs: f64,
    /// Seconds of warm random reads per row.
    #[arg(long, default_value_t = 0.5)]
    pub read_secs: f64,
    /// Only the policy x populate table: skip group commit, the mmap flag experiments and
    /// the reader processes.
    #[arg(long)]
    pub quick: bool,
    /// Readers in other processes (visibility of a write between processes, reads/s of
    /// 1, 2 and 4 reader processes beside a writer process; about 20 s): on, off, or only
    /// (that section alone).
    #[arg(long, value_enum, default_value_t = ReadersSel::On)]
    pub readers: ReadersSel,
    /// Bounded recovery, run alone: kill a writer process with SIGKILL this many times at
    /// random moments (inside checkpoints, index and file growth, compaction) and time
    /// each `Store::open` after it against a clean open (see `killopen.rs`).
    #[arg(long, value_name = "KILLS", value_parser = clap::value_parser!(u64).range(1..=crate::killopen::MAX_KILLS))]
    pub kill_recovery: Option<u64>,
    /// Size of the scratch file for the mmap flag experiments, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(4..=65536))]
    pub flags_mib: u64,
    /// Print the results as JSON on stdout (one object per policy x populate row, plus
    /// the raw sync, group commit, flag experiments and reader processes) instead of
    /// tables.
    #[arg(long)]
    pub json: bool,
    /// Also draw throughput and tail latency per row into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Write stalls and a size sweep, alone: for each key count (comma-separated, k/m/g
    /// suffixes; default 1k,1m,10m), fill a fresh store, overwrite every key, close and
    /// reopen, then the same appends over a plain MAP_SHARED file; every put timed (p50 to
    /// max, puts over 1 ms and 5 ms, the slowest and when).
    #[arg(long, value_name = "SIZES", num_args = 0..=1,
          default_missing_value = crate::sweep::DEFAULT_SIZES, value_parser = crate::sweep::parse_sizes)]
    pub sweep: Option<crate::sweep::Sizes>,
    /// With --sweep: `Options::background_nice` for its stores (nice steps below the
    /// writer for the store's own threads; 0: the writer's priority).
    #[arg(long, value_name = "STEPS", default_value_t = mapkv::Options::DEFAULT_BACKGROUND_NICE)]
    pub background_nice: u8,
}

impl BenchArgs {
    /// The first of `--value-size` (what the sections with one size use).
    pub fn value_size(&self) -> usize {
        self.value_sizes.first().copied().unwrap_or(100)
    }

    /// The value sizes, each once, in the order given.
    fn sizes(&self) -> Vec<usize> {
        let mut sizes = Vec::new();
        for &s in &self.value_sizes {
            if !sizes.contains(&s) {
                sizes.push(s);
            }
        }
        sizes
    }

    /// Keys of the store for the rows of values of `size` bytes, and the most writes one
    /// of those rows makes: `--keys` both for the first size; for the others, as many
    /// bytes of keys and values (at least 100 keys) and four times as many writes.
    fn keys_for(&self, size: usize) -> (u64, u64) {
        if size == self.value_size() {
            return (self.keys, self.keys);
        }
        let bytes = u128::from(self.keys) * (16 + self.value_size() as u128);
        let keys = u64::try_from(bytes / (16 + size as u128))
            .unwrap_or(u64::MAX)
            .max(self.keys.min(100));
        (keys, keys.saturating_mul(4))
    }
}

/// A durability policy chosen on the command line.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Its name in tables: `none`, `async`, `periodic(100ms)`, `always`.
    pub label: String,
    /// The policy.
    pub durability: Durability,
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    let s = s.trim().to_ascii_lowercase();
    let (name, arg) = match s.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (s.as_str(), None),
    };
    let durability = match (name, arg) {
        ("none", None) => Durability::None,
        ("async", None) => Durability::Async,
        ("always", None) => Durability::Always,
        ("periodic", a) => {
            let ms: u64 = match a {
                None => 100,
                Some(a) => a.trim_end_matches("ms").parse().map_err(|_| {
                    format!("bad periodic interval {a:?}: want milliseconds, e.g. periodic:100")
                })?,
            };
            if ms == 0 {
                return Err("the periodic interval must be at least 1 ms".into());
            }
            Durability::Periodic(Duration::from_millis(ms))
        }
        _ => {
            return Err(format!(
                "unknown policy {s:?}: use none, async, periodic[:MS] or always"
            ))
        }
    };
    let label = match durability {
        Durability::Periodic(d) => format!("periodic({}ms)", d.as_millis()),
        _ => name.to_owned(),
    };
    Ok(Policy { label, durability })
}

/// Which populate settings to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PopulateSel {
    /// `populate(false)` only.
    Off,
    /// `populate(true)` only.
    On,
    /// Both, off first.
    Both,
}

impl PopulateSel {
    fn values(self) -> &'static [bool] {
        match self {
            PopulateSel::Off => &[false],
            PopulateSel::On => &[true],
            PopulateSel::Both => &[false, true],
        }
    }
}

/// Whether to run the reader-process section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadersSel {
    /// With the rest (unless `--quick`).
    On,
    /// Skip it.
    Off,
    /// Only it.
    Only,
}

/// One row of the table: one value size and policy, with populate on or off.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Value size in bytes.
    pub value_size: usize,
    /// Keys in the store the row opened.
    pub keys: u64,
    /// Durability policy.
    pub policy: String,
    /// `Options::populate`.
    pub populate: bool,
    /// Writer threads.
    pub threads: u16,
    /// Pages of the store file resident before the open (0 = cold).
    pub resident_pages_before_open: u64,
    /// Pages of the store file.
    pub file_pages: u64,
    /// `Store::open` of the cold, cleanly closed store.
    pub open_ms: f64,
    /// Minor/major faults during the open.
    pub open_faults: (u64, u64),
    /// One `get` of every key, in random order, right after the open.
    pub first_touch_ms: f64,
    /// Minor/major faults during the first touch.
    pub touch_faults: (u64, u64),
    /// Bytes of the file resident after the first touch (`Stats::resident_bytes`).
    pub resident_bytes_after_touch: u64,
    /// Warm random `get`s per second (one thread).
    pub reads_per_s: f64,
    /// Random `get`s of absent keys per second (one thread, after the reads).
    pub misses_per_s: f64,
    /// Writes made.
    pub writes: u64,
    /// Wall time of the write phase.
    pub write_secs: f64,
    /// Writes per second (all writer threads together).
    pub writes_per_s: f64,
    /// Latency of one write.
    pub latency: Percentiles,
    /// Minor/major faults during the write phase.
    pub write_faults: (u64, u64),
    /// Syncs the store issued during the write phase.
    pub syncs: u64,
    /// Log bytes those syncs covered.
    pub bytes_synced: u64,
    /// Most bytes at risk seen during the write phase.
    pub at_risk_max_bytes: u64,
    /// Most writes at risk seen during the write phase.
    pub at_risk_max_writes: u64,
    /// Bytes at risk right after the last write returned.
    pub at_risk_end_bytes: u64,
    /// Writes at risk right after the last write returned.
    pub at_risk_end_writes: u64,
    /// `Store::close` after the writes (a clean close syncs).
    pub close_ms: f64,
    /// For `always`: the raw sync measured just before this row.
    pub raw_sync: Option<RawSync>,
    /// For `always`: p50 write latency / raw sync median.
    pub p50_over_raw_sync: Option<f64>,
    /// For `always`: p99 / p50 write latency.
    pub p99_over_p50: Option<f64>,
}

/// A group-commit measurement.
#[derive(Debug, Clone, Serialize)]
pub struct GroupCommit {
    /// Writer threads.
    pub threads: u16,
    /// Writes per second, all threads.
    pub writes_per_s: f64,
    /// Latency of one write.
    pub latency: Percentiles,
    /// Syncs issued.
    pub syncs: u64,
    /// Writes per sync.
    pub writes_per_sync: f64,
}

/// The fill of one value size's base store.
#[derive(Debug, Clone, Serialize)]
pub struct SizeFill {
    /// Value size in bytes.
    pub value_size: usize,
    /// Keys put.
    pub keys: u64,
    /// Puts per second (`Durability::None`, one thread, the close not included).
    pub puts_per_s: f64,
}

/// Everything one `mapkv bench` run measured (the `--json` output).
#[derive(Debug, Serialize)]
pub struct Report {
    /// Kernel release.
    pub kernel: String,
    /// Filesystem type of the benchmark directory.
    pub filesystem: String,
    /// Benchmark directory.
    pub dir: String,
    /// Keys in the store of the first value size.
    pub keys: u64,
    /// The first value size (the in-memory baselines and group commit use it).
    pub value_size: usize,
    /// Every value size of the table, in order.
    pub value_sizes: Vec<usize>,
    /// Puts per second filling the base store of the first value size
    /// (`Durability::None`, one thread).
    pub unsynced_fill_per_s: f64,
    /// The same for each value size.
    pub unsynced_fill_by_size: Vec<SizeFill>,
    /// Appends per second of the same records into a `Vec` (the memcpy floor).
    pub in_memory_append_per_s: f64,
    /// Puts per second into a `Vec` log (memory touched beforehand) plus a `HashMap`
    /// index: an in-memory store that takes no page fault.
    pub in_memory_store_per_s: f64,
    /// The same with a `Vec` log that grows as it goes (it takes its page faults, as the
    /// store's mapping does).
    pub in_memory_store_growing_per_s: f64,
    /// Raw sync before the matrix.
    pub raw_sync_start: RawSync,
    /// Raw sync after the matrix.
    pub raw_sync_end: RawSync,
    /// The policy x populate rows.
    pub rows: Vec<Row>,
    /// `always` with 1 and 4 writers (unless `--quick`).
    pub group_commit: Vec<GroupCommit>,
    /// The mmap flag experiments (unless `--quick`).
    pub flags: Option<crate::flags::FlagsReport>,
    /// Readers in other processes (unless `--quick` or `--readers off`).
    pub readers: Option<crate::readers::ReadersReport>,
    /// Wall time of the whole run.
    pub wall_secs: f64,
}

fn io_fail(what: &str, e: &std::io::Error) -> Failure {
    Failure::msg(format!("{what}: {e}"))
}

fn store_fail(path: &Path, e: &mapkv::Error) -> Failure {
    Failure::store(path, e)
}

/// Runs `mapkv bench`.
pub fn run(a: &BenchArgs) -> Result<(), Failure> {
    let wall = Instant::now();
    if a.keys == 0 {
        return Err(Failure::msg("--keys must be at least 1"));
    }
    if !(a.write_secs > 0.0 && a.read_secs > 0.0) {
        return Err(Failure::msg(
            "--write-secs and --read-secs must be positive",
        ));
    }
    if a.policies.is_empty() {
        return Err(Failure::msg("--policies is empty"));
    }
    if a.value_sizes.is_empty() {
        return Err(Failure::msg("--value-size is empty"));
    }
    // The temporary directory (if any) lives until the end of the run.
    let (_tmp, dir) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| io_fail(&format!("create {}", d.display()), &e))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("mapkv-bench-")
                .tempdir()
                .map_err(|e| io_fail("create a temporary directory", &e))?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let filesystem = measure::fs_type(&dir)
        .map(|(t, m)| {
            let dev = measure::BlockDev::of(&dir)
                .map(|b| format!(" on {}", b.name))
                .unwrap_or_default();
            format!("{t}{dev} (mounted at {m})")
        })
        .unwrap_or_else(|| "unknown".into());
    if filesystem.starts_with("tmpfs") {
        eprintln!(
            "mapkv: warning: {} is on tmpfs, where syncs cost nothing; use --dir on a real disk",
            dir.display()
        );
    }
    if let Some(sizes) = &a.sweep {
        return crate::sweep::run_only(
            &dir,
            &filesystem,
            sizes,
            a.value_size(),
            a.background_nice,
            a.json,
        );
    }
    if a.readers == ReadersSel::Only {
        return crate::readers::run_only(&dir, &filesystem, a.json);
    }
    if let Some(kills) = a.kill_recovery {
        return crate::killopen::run_only(a, kills, &dir, &filesystem);
    }
    let with_readers = !a.quick && a.readers == ReadersSel::On;

    let sizes = a.sizes();
    let rows_n = sizes.len() * a.policies.len() * a.populate.values().len();
    let steps = 2
        + sizes.len() as u64
        + rows_n as u64
        + if a.quick { 0 } else { 2 + crate::flags::STEPS }
        + if with_readers {
            crate::readers::STEPS
        } else {
            0
        };
    let pb = crate::progress::bar(steps);

    pb.set_message("raw sync cost");
    let raw_start = measure::raw_sync(&dir, 200, Duration::from_millis(700))
        .map_err(|e| io_fail("raw sync measurement", &e))?;
    pb.inc(1);

    pb.set_message("in-memory append baseline");
    let (n_mem, size0) = (a.keys.min(1_000_000), a.value_size());
    let append_rate = measure::in_memory_append_rate(n_mem, size0);
    let mem_store_rate = measure::in_memory_store_rate(n_mem, size0, true);
    let mem_growing_rate = measure::in_memory_store_rate(n_mem, size0, false);
    pb.inc(1);

    let base = dir.join("base.mkv");
    let mut rows = Vec::new();
    let mut fills = Vec::new();
    for &size in &sizes {
        let (keys, writes) = a.keys_for(size);
        pb.set_message(format!("filling the base store ({keys} keys x {size} B)"));
        fills.push(SizeFill {
            value_size: size,
            keys,
            puts_per_s: fill_base(&base, keys, size)?,
        });
        pb.inc(1);
        let perm = Rng::new(42).permutation(keys);
        for p in &a.policies {
            for &populate in a.populate.values() {
                pb.set_message(format!(
                    "{size} B, {} populate={}",
                    p.label,
                    if populate { "on" } else { "off" }
                ));
                let first = size == a.value_size();
                let sized = Sized {
                    size,
                    keys,
                    writes,
                    write_secs: if first {
                        a.write_secs
                    } else {
                        a.write_secs.min(1.0)
                    },
                    read_secs: if first {
                        a.read_secs
                    } else {
                        a.read_secs.min(0.25)
                    },
                };
                rows.push(run_row(a, sized, &dir, &base, &perm, p, populate)?);
                pb.inc(1);
            }
        }
    }

    let mut group = Vec::new();
    let mut flags = None;
    if !a.quick {
        for threads in [1u16, 4] {
            pb.set_message(format!("group commit: always, {threads} writer(s)"));
            group.push(group_commit(
                &dir,
                threads,
                a.value_size(),
                a.write_secs.min(2.0),
            )?);
            pb.inc(1);
        }
        flags = Some(crate::flags::run(&dir, a.flags_mib, &pb)?);
    }
    let readers = if with_readers {
        Some(crate::readers::run(&dir, &pb)?)
    } else {
        None
    };
    pb.set_message("raw sync cost");
    let raw_end = measure::raw_sync(&dir, 200, Duration::from_millis(700))
        .map_err(|e| io_fail("raw sync measurement", &e))?;
    let _ = std::fs::remove_file(&base);
    pb.finish_and_clear();

    let report = Report {
        kernel: measure::kernel(),
        filesystem,
        dir: dir.display().to_string(),
        keys: a.keys,
        value_size: a.value_size(),
        value_sizes: sizes,
        unsynced_fill_per_s: fills.first().map_or(0.0, |f| f.puts_per_s),
        unsynced_fill_by_size: fills,
        in_memory_append_per_s: append_rate,
        in_memory_store_per_s: mem_store_rate,
        in_memory_store_growing_per_s: mem_growing_rate,
        raw_sync_start: raw_start,
        raw_sync_end: raw_end,
        rows,
        group_commit: group,
        flags,
        readers,
        wall_secs: wall.elapsed().as_secs_f64(),
    };
    if let Some(svg) = &a.plot {
        crate::plot::draw(svg, &report)
            .map_err(|e| Failure::msg(format!("--plot {}: {e}", svg.display())))?;
    }
    let mut out = std::io::stdout().lock();
    let text = if a.json {
        serde_json::to_string_pretty(&report).map_err(|e| Failure::msg(format!("JSON: {e}")))?
            + "\n"
    } else {
        render(a, &report)
    };
    std::io::Write::write_all(&mut out, text.as_bytes()).map_err(Failure::stdout)
}

/// Fills `path` with `keys` keys under `Durability::None`, closes it cleanly, and
/// returns puts per second (the close's sync not included).
pub(crate) fn fill_base(path: &Path, keys: u64, value_size: usize) -> Result<f64, Failure> {
    let _ = std::fs::remove_file(path);
    // Room for the records and their index up front (at most 1 GiB: the store grows).
    let est = keys
        .saturating_mul(value_size as u64 + 16 + 32)
        .saturating_mul(2);
    let store = Store::open(
        path,
        Options::default()
            .durability(Durability::None)
            .initial_size(est.clamp(1 << 20, 1 << 30)),
    )
    .map_err(|e| store_fail(path, &e))?;
    let mut val = measure::value(0, value_size);
    let t = Instant::now();
    for i in 0..keys {
        stamp(&mut val, i);
        store.put(key(i), &val).map_err(|e| store_fail(path, &e))?;
    }
    let rate = keys as f64 / t.elapsed().as_secs_f64().max(1e-9);
    store.close().map_err(|e| store_fail(path, &e))?;
    Ok(rate)
}

/// The value size of a row, the keys of its store, the most writes it makes, and its
/// write and read phases' most seconds.
#[derive(Debug, Clone, Copy)]
struct Sized {
    size: usize,
    keys: u64,
    writes: u64,
    write_secs: f64,
    read_secs: f64,
}

fn run_row(
    a: &BenchArgs,
    sized: Sized,
    dir: &Path,
    base: &Path,
    perm: &[u64],
    p: &Policy,
    populate: bool,
) -> Result<Row, Failure> {
    let path = dir.join("row.mkv");
    std::fs::copy(base, &path).map_err(|e| io_fail("copy the base store", &e))?;
    crate::sys::evict(&path).map_err(|e| io_fail("evict the store from the page cache", &e))?;
    let (resident, file_pages) = crate::sys::resident(&path).map_err(|e| io_fail("mincore", &e))?;

    // Cold open.
    let f0 = crate::sys::page_faults();
    let t = Instant::now();
    let store = Store::open(
        &path,
        Options::default()
            .durability(p.durability)
            .populate(populate),
    )
    .map_err(|e| store_fail(&path, &e))?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let open_faults = faults_since(f0);

    // Cold first touch: every key once, in random order.
    let f0 = crate::sys::page_faults();
    let t = Instant::now();
    let mut sum = 0usize;
    for &i in perm {
        sum += store
            .get_with(key(i), <[u8]>::len)
            .map_err(|e| store_fail(&path, &e))?
            .unwrap_or(0);
    }
    let first_touch_ms = t.elapsed().as_secs_f64() * 1e3;
    let touch_faults = faults_since(f0);
    if sum != perm.len() * sized.size {
        return Err(Failure::msg(format!(
            "{}: read back {sum} value bytes, expected {}: the store lost data",
            path.display(),
            perm.len() * sized.size
        )));
    }
    let resident_bytes_after_touch = store.stats().resident_bytes;

    // Warm random reads, then of keys the store does not hold.
    let keys = sized.keys;
    let reads_per_s =
        random_reads(&store, 0, keys, sized.read_secs).map_err(|e| store_fail(&path, &e))?;
    let misses_per_s =
        random_reads(&store, keys, keys, sized.read_secs).map_err(|e| store_fail(&path, &e))?;

    // Writes under the policy.
    let raw_sync = if p.durability == Durability::Always {
        Some(
            measure::raw_sync(dir, 100, Duration::from_millis(300))
                .map_err(|e| io_fail("raw sync measurement", &e))?,
        )
    } else {
        None
    };
    let before = store.stats();
    let f0 = crate::sys::page_faults();
    let w = write_phase(
        &store,
        keys,
        sized.writes,
        a.threads,
        sized.size,
        sized.write_secs,
    )
    .map_err(|e| store_fail(&path, &e))?;
    let write_faults = faults_since(f0);
    let after = store.stats();
    let t = Instant::now();
    store.close().map_err(|e| store_fail(&path, &e))?;
    let close_ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(&path);

    let p50 = w.latency.p50_ns.max(1) as f64;
    Ok(Row {
        value_size: sized.size,
        keys,
        policy: p.label.clone(),
        populate,
        threads: a.threads,
        resident_pages_before_open: resident,
        file_pages,
        open_ms,
        open_faults,
        first_touch_ms,
        touch_faults,
        resident_bytes_after_touch,
        reads_per_s,
        misses_per_s,
        writes: w.writes,
        write_secs: w.secs,
        writes_per_s: w.writes as f64 / w.secs.max(1e-9),
        latency: w.latency,
        write_faults,
        syncs: after.syncs - before.syncs,
        bytes_synced: after.bytes_synced - before.bytes_synced,
        at_risk_max_bytes: w.max_risk.0.max(after.bytes_at_risk),
        at_risk_max_writes: w.max_risk.1.max(after.writes_at_risk),
        at_risk_end_bytes: after.bytes_at_risk,
        at_risk_end_writes: after.writes_at_risk,
        close_ms,
        p50_over_raw_sync: raw_sync.map(|r| p50 / r.median_ns() as f64),
        p99_over_p50: raw_sync.map(|_| w.latency.p99_ns as f64 / p50),
        raw_sync,
    })
}

/// Random `get`s of keys `first..first + keys` for `secs`, per second.
fn random_reads(store: &Store, first: u64, keys: u64, secs: f64) -> mapkv::Result<f64> {
    let mut rng = Rng::new(7);
    let t = Instant::now();
    let budget = Duration::from_secs_f64(secs);
    let mut n = 0u64;
    let mut sum = 0usize;
    loop {
        for _ in 0..1024 {
            sum += store
                .get_with(key(first + rng.below(keys)), <[u8]>::len)?
                .unwrap_or(0);
        }
        n += 1024;
        if t.elapsed() >= budget {
            break;
        }
    }
    std::hint::black_box(sum);
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// What a write phase measured.
struct WritePhase {
    writes: u64,
    secs: f64,
    latency: Percentiles,
    /// Most (bytes, writes) at risk seen by the sampler.
    max_risk: (u64, u64),
}

/// Writes new keys `first..first + max` from `threads` threads for at most `secs`.
fn write_phase(
    store: &Store,
    first: u64,
    max: u64,
    threads: u16,
    value_size: usize,
    secs: f64,
) -> mapkv::Result<WritePhase> {
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let nt = u64::from(threads);
    let (results, max_risk) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut m = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let st = store.stats();
                m = (m.0.max(st.bytes_at_risk), m.1.max(st.writes_at_risk));
                std::thread::sleep(Duration::from_millis(20));
            }
            m
        });
        let writers: Vec<_> = (0..nt)
            .map(|t| {
                s.spawn(move || -> mapkv::Result<Vec<u64>> {
                    let per = max.div_ceil(nt);
                    let mut lat =
                        Vec::with_capacity(usize::try_from(per.min(4_000_000)).unwrap_or(0));
                    let mut val = measure::value(t, value_size);
                    let mut i = t;
                    while i < max {
                        stamp(&mut val, i);
                        let k = key(first + i);
                        let t0 = Instant::now();
                        store.put(k, &val)?;
                        let now = Instant::now();
                        lat.push(nanos(now - t0));
                        if now >= deadline {
                            break;
                        }
                        i += nt;
                    }
                    Ok(lat)
                })
            })
            .collect();
        let results: Vec<_> = writers
            .into_iter()
            .map(std::thread::ScopedJoinHandle::join)
            .collect();
        stop.store(true, Ordering::Relaxed);
        let m = sampler.join().unwrap_or((0, 0));
        (results, m)
    });
    let secs = start.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for r in results {
        match r {
            Ok(Ok(l)) => all.extend(l),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(mapkv::Error::Unsupported("a writer thread panicked")),
        }
    }
    Ok(WritePhase {
        writes: all.len() as u64,
        secs,
        latency: Percentiles::of(&mut all),
        max_risk,
    })
}

fn group_commit(
    dir: &Path,
    threads: u16,
    value_size: usize,
    secs: f64,
) -> Result<GroupCommit, Failure> {
    let path = dir.join("group.mkv");
    let _ = std::fs::remove_file(&path);
    let store = Store::open(
        &path,
        Options::default()
            .durability(Durability::Always)
            .initial_size(64 << 20),
    )
    .map_err(|e| store_fail(&path, &e))?;
    // The first write marks the store dirty (one extra sync): keep it out of the timing.
    store
        .put(b"warm-up", b"")
        .map_err(|e| store_fail(&path, &e))?;
    let before = store.stats().syncs;
    let w = write_phase(&store, 0, 10_000_000, threads, value_size, secs)
        .map_err(|e| store_fail(&path, &e))?;
    let syncs = store.stats().syncs - before;
    store.close().map_err(|e| store_fail(&path, &e))?;
    let _ = std::fs::remove_file(&path);
    Ok(GroupCommit {
        threads,
        writes_per_s: w.writes as f64 / w.secs.max(1e-9),
        latency: w.latency,
        syncs,
        writes_per_sync: w.writes as f64 / syncs.max(1) as f64,
    })
}

fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_content_arrangement(ContentArrangement::Dynamic);
    t
}

fn right_align(t: &mut Table, from: usize) {
    let n = t.column_count();
    for i in from..n {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn faults(f: (u64, u64)) -> String {
    format!("{}/{}", f.0, f.1)
}

/// The human-readable report.
fn render(a: &BenchArgs, r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let sizes = r
        .unsynced_fill_by_size
        .iter()
        .map(|f| format!("{} keys x {} B", f.keys, f.value_size))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        s,
        "mapkv bench: {sizes} values, {} writer thread(s); {} in {}; kernel {}",
        a.threads, r.filesystem, r.dir, r.kernel
    );
    let mut t = table();
    t.set_header(vec![
        "value",
        "policy",
        "populate",
        "writes/s",
        "p50",
        "p99",
        "p99.9",
        "reads/s",
        "misses/s",
        "open (cold)",
        "first touch (cold)",
        "faults open+touch (minor/major)",
        "write faults",
        "resident",
        "syncs",
        "at risk (max)",
        "close",
    ]);
    for row in &r.rows {
        t.add_row(vec![
            fmt_bytes(row.value_size as u64),
            row.policy.clone(),
            if row.populate { "on" } else { "off" }.into(),
            fmt_rate(row.writes_per_s),
            fmt_ns(row.latency.p50_ns),
            fmt_ns(row.latency.p99_ns),
            fmt_ns(row.latency.p999_ns),
            fmt_rate(row.reads_per_s),
            fmt_rate(row.misses_per_s),
            fmt_secs(row.open_ms / 1e3),
            fmt_secs(row.first_touch_ms / 1e3),
            format!("{} + {}", faults(row.open_faults), faults(row.touch_faults)),
            row.write_faults.0.to_string(),
            fmt_bytes(row.resident_bytes_after_touch),
            row.syncs.to_string(),
            format!(
                "{} ({} writes)",
                fmt_bytes(row.at_risk_max_bytes),
                row.at_risk_max_writes
            ),
            fmt_secs(row.close_ms / 1e3),
        ]);
    }
    right_align(&mut t, 3);
    let _ = writeln!(s, "{t}");

    // Cache state.
    let cold = r.rows.iter().all(|x| x.resident_pages_before_open == 0);
    let mut pages = Vec::new();
    for row in &r.rows {
        let p = format!("{} pages at {} B", row.file_pages, row.value_size);
        if !pages.contains(&p) {
            pages.push(p);
        }
    }
    let _ =
        writeln!(
        s,
        "Cache: every row opened a copy of the same cleanly closed store of its value size ({}), \
         evicted first (fdatasync + POSIX_FADV_DONTNEED); mincore before open: {}. `open` and \
         `first touch` (one get of every key, random order) are cold; reads/s is warm (second \
         pass, 1 thread).",
        pages.join(", "),
        if cold {
            "0 pages resident in every row, so cold".to_owned()
        } else {
            let worst = r.rows.iter().map(|x| x.resident_pages_before_open).max().unwrap_or(0);
            format!("up to {worst} pages still resident, so NOT fully cold")
        }
    );

    // Raw sync and the `always` rows.
    let (r0, r1) = (r.raw_sync_start.median_ns(), r.raw_sync_end.median_ns());
    let _ =
        writeln!(
        s,
        "Raw sync (4 KiB pwrite + fdatasync on a scratch file in the same directory): median {} \
         (p99 {}, n={}) at the start, {} (p99 {}, n={}) at the end: {}{}.",
        fmt_ns(r0),
        fmt_ns(r.raw_sync_start.lat.p99_ns),
        r.raw_sync_start.lat.n,
        fmt_ns(r1),
        fmt_ns(r.raw_sync_end.lat.p99_ns),
        r.raw_sync_end.lat.n,
        measure::regime(r0),
        if measure::regime(r0) == measure::regime(r1) {
            String::new()
        } else {
            format!("; by the end: {} (the regime changed during the run)", measure::regime(r1))
        }
    );
    for row in r.rows.iter().filter(|x| x.raw_sync.is_some()) {
        if let (Some(raw), Some(ratio), Some(tail)) =
            (row.raw_sync, row.p50_over_raw_sync, row.p99_over_p50)
        {
            let _ = writeln!(
                s,
                "  {} B, always, populate {}: p50 write = {ratio:.2}x one raw sync ({} measured just before, {}); \
                 p99/p50 = {tail:.2}; {:.2} syncs per write; {} writes/s = {:.2}x the raw sync rate.",
                row.value_size,
                if row.populate { "on " } else { "off" },
                fmt_ns(raw.median_ns()),
                if Regime::of(raw.median_ns()) == Regime::Fast { "fast regime" } else { "slow regime" },
                row.syncs as f64 / row.writes.max(1) as f64,
                fmt_rate(row.writes_per_s),
                row.writes_per_s * raw.median_ns() as f64 / 1e9,
            );
        }
    }

    // None vs the in-memory floors: like for like, the fill of the fresh base store (one
    // clock around the loop, as for the in-memory loops). The rows above time every write
    // and write into a cold copy of the store, so they are not comparable to these.
    let fill = r.unsynced_fill_per_s.max(1e-9);
    let _ = writeln!(
        s,
        "Unsynced fill of the fresh base store of {} B values (Durability::None, 1 thread, one \
         clock for the loop): {} puts/s. In memory, the same records ({} of them): {} puts/s into a Vec \
         log + HashMap index (log memory touched beforehand) = {:.2}x the store; {} puts/s \
         with the log grown as it goes = {:.2}x; {} appends/s into a Vec alone (memcpy floor) \
         = {:.1}x.",
        r.value_size,
        fmt_rate(r.unsynced_fill_per_s),
        r.keys.min(1_000_000),
        fmt_rate(r.in_memory_store_per_s),
        r.in_memory_store_per_s / fill,
        fmt_rate(r.in_memory_store_growing_per_s),
        r.in_memory_store_growing_per_s / fill,
        fmt_rate(r.in_memory_append_per_s),
        r.in_memory_append_per_s / fill,
    );

    // Populate: what it costs at open and saves on first touch, per policy.
    let mut lines = Vec::new();
    for off in r.rows.iter().filter(|x| !x.populate) {
        if let Some(on) = r
            .rows
            .iter()
            .find(|x| x.populate && x.policy == off.policy && x.value_size == off.value_size)
        {
            lines.push(format!(
                "  {} B, {}: open {} -> {} (+{}), first touch {} -> {}, faults on first touch {} -> {}, \
                 write faults {} -> {}, writes/s {} -> {}",
                off.value_size,
                off.policy,
                fmt_secs(off.open_ms / 1e3),
                fmt_secs(on.open_ms / 1e3),
                fmt_secs((on.open_ms - off.open_ms).max(0.0) / 1e3),
                fmt_secs(off.first_touch_ms / 1e3),
                fmt_secs(on.first_touch_ms / 1e3),
                off.touch_faults.0 + off.touch_faults.1,
                on.touch_faults.0 + on.touch_faults.1,
                off.write_faults.0,
                on.write_faults.0,
                fmt_rate(off.writes_per_s),
                fmt_rate(on.writes_per_s),
            ));
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(
            s,
            "populate(true) moves the cold read of the data into open (MADV_POPULATE_READ of the \
             used range: MAP_POPULATE for a range; the write prefault of the tail, \
             MADV_POPULATE_WRITE, runs for the memcpy policies whatever the option):\n{}",
            lines.join("\n")
        );
    }

    if !r.group_commit.is_empty() {
        let mut t = table();
        t.set_header(vec![
            "always, writers",
            "writes/s",
            "p50",
            "p99",
            "p99.9",
            "syncs",
            "writes/sync",
        ]);
        for g in &r.group_commit {
            t.add_row(vec![
                g.threads.to_string(),
                fmt_rate(g.writes_per_s),
                fmt_ns(g.latency.p50_ns),
                fmt_ns(g.latency.p99_ns),
                fmt_ns(g.latency.p999_ns),
                g.syncs.to_string(),
                format!("{:.2}", g.writes_per_sync),
            ]);
        }
        right_align(&mut t, 1);
        let speedup = match (r.group_commit.first(), r.group_commit.last()) {
            (Some(a1), Some(a4)) if r.group_commit.len() > 1 => {
                format!(
                    " {:.2}x the single writer's throughput.",
                    a4.writes_per_s / a1.writes_per_s.max(1e-9)
                )
            }
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "\nGroup commit (Durability::Always, empty store, new keys): concurrent writers share \
             syncs.{speedup}\n{t}"
        );
    }
    if let Some(f) = &r.flags {
        let _ = write!(s, "{}", crate::flags::render(f));
    }
    if let Some(x) = &r.readers {
        let _ = write!(s, "{}", crate::readers::render(x));
    }
    let _ = writeln!(s, "\nTotal wall time: {:.1} s.", r.wall_secs);
    s
}
