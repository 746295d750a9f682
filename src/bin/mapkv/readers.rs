//! The reader-process section of `mapkv bench`: a writer in one process, readers in
//! others (`Options::read_only`), all of them real processes: this binary re-run with the
//! hidden subcommand `bench-child`.
//!
//! 1. Visibility: a writer process sets one key to an increasing counter every 500 µs
//!    and notes when each `put` was called and when it returned (`CLOCK_MONOTONIC`, one
//!    clock for every process); a reader process busy-polls `get` of that key and notes
//!    when it first saw each value. Under `Durability::None` and `Always`, next to the
//!    floor (a plain `MAP_SHARED` mapping of a scratch file: the writer stores a `u64`,
//!    the reader spins on it) and to what a `MAP_PRIVATE` mapping of the same file shows:
//!    the pages the reader never wrote follow the file, and a page it wrote is its own
//!    copy from then on and never changes again.
//! 2. Reads/s: 1, 2 and 4 reader processes doing random `get`s of a store of
//!    [`LOAD_KEYS`] keys for a fixed time, while a writer process overwrites random keys
//!    at [`WRITE_RATE`] puts/s; in the same run, one thread in the writer's own process
//!    doing the same reads, and both again with the writer idle (no catching up to do)
//!    and with the writer writing as fast as it goes (a reader replays every record).
//!    Mappings are populated at open, so no row times page faults.
//!
//! The section measures how free the CPUs were: on this 2-CPU VM other work often holds
//! one, and then a writer and a reader process take turns instead of running side by
//! side.
//!
//! Protocol with a child: it sets up (opens the store or maps the file), prints
//! `ready`, waits for a `go` line on stdin, runs, and prints one JSON line with what it
//! measured. A child that runs until told to stop stops when its stdin closes (so it also
//! stops if the bench dies).
//!
//! The raw mappings go through [`WordMap`] of `sys.rs`, which holds the `unsafe` code;
//! the one call here makes the promise it asks for, stated where it is made.
#![expect(
    unsafe_code,
    reason = "the WordMap::new call, whose contract is stated at it"
)]

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use comfy_table::{CellAlignment, ContentArrangement, Table};
use indicatif::ProgressBar;
use mapkv::{Durability, Options, Store};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::measure::{self, fmt_ns, fmt_rate, key, stamp, Percentiles, Rng};
use crate::sys::{monotonic_ns, WordMap};
use crate::Failure;

/// Progress steps [`run`] reports.
pub const STEPS: u64 = 12;
/// Keys of the store the reads/s rows read.
pub const LOAD_KEYS: u64 = 200_000;
/// Puts per second of the writer process in the reads/s rows that have one writing.
pub const WRITE_RATE: u64 = 20_000;
/// A load writer stops writing this long after its readers' `--secs` are up.
const WRITE_GRACE_SECS: f64 = 0.5;
/// Value size of the reads/s store.
const VALUE_LEN: usize = 100;
/// Pause between two writes of the visibility rows.
const INTERVAL_US: u64 = 500;
/// The key the visibility rows write.
const SEQ_KEY: &[u8] = b"seq";
/// Words of the raw scratch file: two pages of `u64`.
const WORDS: usize = 1024;
/// The counter word on page 0 (the reader never writes page 0).
const WORD_A: usize = 0;
/// The counter word on page 1.
const WORD_B: usize = 512;
/// The word on page 1 a `MAP_PRIVATE` reader writes, which copies the page.
const WORD_COPY: usize = 513;
/// How long the bench waits for a child's line before it gives up on the child.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The child side: `mapkv bench-child ROLE PATH ...` (hidden).

/// What a child process of the reader-process section does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Creates the store and puts `seq` = counter every `--interval-us` for `--secs`.
    SeqWriter,
    /// Busy-polls `get(seq)` in a read-only store until stopped.
    SeqReader,
    /// Stores the counter into two words of a `MAP_SHARED` scratch file, paced as above.
    RawWriter,
    /// Spins on the counter word of a `MAP_SHARED` (or `--private`) mapping until stopped.
    RawReader,
    /// Overwrites random keys at `--rate` puts/s until stopped; `--threads` threads of
    /// its own do random gets for `--secs`.
    LoadWriter,
    /// Random gets in a read-only store for `--secs`.
    LoadReader,
}

/// Arguments of the hidden `mapkv bench-child` (started by `mapkv bench` only).
#[derive(Debug, clap::Args)]
pub struct ChildArgs {
    /// The role.
    #[arg(value_enum)]
    pub role: Role,
    /// The store or scratch file.
    pub path: PathBuf,
    /// `Durability::Always` instead of `None` (seq writer).
    #[arg(long)]
    pub always: bool,
    /// Writers: seconds of writes (seq, raw). Readers: seconds of reads (load); a
    /// `--private` raw reader copies its page after this many seconds.
    #[arg(long, default_value_t = 1.0)]
    pub secs: f64,
    /// Load writer: puts per second (0: write nothing).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Load writer: write as fast as it goes (ignores `--rate`).
    #[arg(long)]
    pub unpaced: bool,
    /// Keys of the store (load roles).
    #[arg(long, default_value_t = LOAD_KEYS)]
    pub keys: u64,
    /// Load writer: reader threads in its own process.
    #[arg(long, default_value_t = 0)]
    pub threads: u16,
    /// Raw reader: map the file `MAP_PRIVATE`.
    #[arg(long)]
    pub private: bool,
    /// Seed of the random keys.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// What a seq or raw writer reports: per counter value `i` (index `i`; index 0 is the
/// value before the run), when the write was called and when it returned.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct WriterOut {
    called_ns: Vec<u64>,
    returned_ns: Vec<u64>,
}

/// What a seq or raw reader reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ReaderOut {
    /// When it started polling.
    started_ns: u64,
    /// Per counter value `i`: when the reader first saw `i` or a later value.
    first_seen_ns: Vec<u64>,
    /// Reads made.
    polls: u64,
    /// Seconds it polled.
    secs: f64,
    /// `--private`: what happened to the page it wrote.
    private: Option<PrivateOut>,
}

/// What a `MAP_PRIVATE` raw reader saw of its pages.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct PrivateOut {
    /// The page-1 counter changed while the reader had not written page 1.
    page1_followed_before_copy: bool,
    /// The page-1 counter right after the reader wrote another word of page 1.
    page1_value_at_copy: u64,
    /// Changes of the page-1 counter seen after that.
    page1_changes_after_copy: u64,
    /// The page-0 counter (a page it never wrote) at the end.
    page0_value_at_end: u64,
}

/// What a load writer reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LoadWriterOut {
    puts: u64,
    /// Seconds it wrote.
    secs: f64,
    /// It stopped writing at its cap, `--secs` + [`WRITE_GRACE_SECS`], before the
    /// readers were done.
    capped: bool,
    /// Its own reader threads.
    readers: Vec<LoadReaderOut>,
}

/// What a load reader (process or thread) reports.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct LoadReaderOut {
    reads: u64,
    secs: f64,
    misses: u64,
    /// The longest time [`BATCH`] consecutive gets took.
    slowest_batch_ns: u64,
}

/// Gets between two looks at the clock in the reads/s rows.
const BATCH: u64 = 256;

fn store_fail(path: &Path, e: &mapkv::Error) -> Failure {
    Failure::store(path, e)
}

fn io_fail(what: &str, e: &std::io::Error) -> Failure {
    Failure::msg(format!("reader processes: {what}: {e}"))
}

/// Prints `ready`, waits for `go`, and returns the flag set once stdin closes.
fn ready() -> Result<Arc<AtomicBool>, Failure> {
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")
            .and_then(|()| out.flush())
            .map_err(Failure::stdout)?;
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| io_fail("read stdin", &e))?;
    if line.trim() != "go" {
        return Err(Failure::msg("bench-child: no `go` from the bench"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::stdin().lock().read_line(&mut rest);
        flag.store(true, Ordering::Relaxed);
    });
    Ok(stop)
}

fn report<T: Serialize>(out: &T) -> Result<(), Failure> {
    let text = serde_json::to_string(out).map_err(|e| Failure::msg(format!("JSON: {e}")))?;
    let mut o = std::io::stdout().lock();
    writeln!(o, "{text}")
        .and_then(|()| o.flush())
        .map_err(Failure::stdout)
}

/// Runs `mapkv bench-child`.
pub fn child(a: &ChildArgs) -> Result<(), Failure> {
    match a.role {
        Role::SeqWriter => report(&seq_writer(a)?),
        Role::SeqReader => report(&seq_reader(a)?),
        Role::RawWriter => report(&raw_writer(a)?),
        Role::RawReader => report(&raw_reader(a)?),
        Role::LoadWriter => report(&load_writer(a)?),
        Role::LoadReader => report(&load_reader(a)?),
    }
}

/// Calls `write(i)` for `i = 1, 2, ...` every [`INTERVAL_US`] for `secs` (or until
/// stopped), noting when each call started and returned.
fn paced_writes(
    secs: f64,
    stop: &AtomicBool,
    mut write: impl FnMut(u64, u64) -> Result<(), Failure>,
) -> Result<WriterOut, Failure> {
    let interval = Duration::from_micros(INTERVAL_US);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut out = WriterOut {
        called_ns: vec![0],
        returned_ns: vec![0],
    };
    let mut next = start;
    let mut i = 1u64;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let c = monotonic_ns();
        write(i, c)?;
        let r = monotonic_ns();
        out.called_ns.push(c);
        out.returned_ns.push(r);
        i += 1;
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(out)
}

fn seq_writer(a: &ChildArgs) -> Result<WriterOut, Failure> {
    let durability = if a.always {
        Durability::Always
    } else {
        Durability::None
    };
    let path = &a.path;
    let store = Store::open(path, Options::default().durability(durability))
        .map_err(|e| store_fail(path, &e))?;
    // The first write marks the store in use (under `Always`, an extra sync): not timed.
    store
        .put(SEQ_KEY, [0u8; 16])
        .map_err(|e| store_fail(path, &e))?;
    let stop = ready()?;
    let mut val = [0u8; 16];
    let out = paced_writes(a.secs, &stop, |i, called| {
        val[..8].copy_from_slice(&i.to_le_bytes());
        // The value carries its own timestamp, for anyone reading the store by hand.
        val[8..].copy_from_slice(&called.to_le_bytes());
        store.put(SEQ_KEY, val).map_err(|e| store_fail(path, &e))
    })?;
    store.close().map_err(|e| store_fail(path, &e))?;
    Ok(out)
}

/// Notes, at `now`, that counter values up to `v` are visible.
fn saw(seen: &mut Vec<u64>, v: u64, now: u64) {
    let v = usize::try_from(v).unwrap_or(usize::MAX).min(1 << 28);
    while seen.len() <= v {
        seen.push(now);
    }
}

fn seq_reader(a: &ChildArgs) -> Result<ReaderOut, Failure> {
    let path = &a.path;
    let store =
        Store::open(path, Options::default().read_only(true)).map_err(|e| store_fail(path, &e))?;
    let counter = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[..8]);
        u64::from_le_bytes(w)
    };
    store
        .get_with(SEQ_KEY, counter)
        .map_err(|e| store_fail(path, &e))?;
    let stop = ready()?;
    let mut out = ReaderOut {
        started_ns: monotonic_ns(),
        ..ReaderOut::default()
    };
    while !stop.load(Ordering::Relaxed) {
        let v = store
            .get_with(SEQ_KEY, counter)
            .map_err(|e| store_fail(path, &e))?;
        let now = monotonic_ns();
        out.polls += 1;
        if let Some(v) = v {
            saw(&mut out.first_seen_ns, v, now);
        }
    }
    out.secs = monotonic_ns().saturating_sub(out.started_ns) as f64 / 1e9;
    Ok(out)
}

fn open_scratch(path: &Path, write: bool) -> Result<std::fs::File, Failure> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| io_fail(&format!("open {}", path.display()), &e))
}

fn map_words(file: &std::fs::File, private: bool) -> Result<WordMap, Failure> {
    // SAFETY: the file is the bench's scratch file in its own directory, created at its
    // full size before any child started and never truncated while they run; the only
    // processes that touch it are the bench's raw writer and raw reader children, and
    // both access it only through `WordMap::word`, that is with atomic 8-byte accesses.
    unsafe { WordMap::new(file, WORDS * 8, private) }
        .map_err(|e| io_fail("mmap the scratch file", &e))
}

fn raw_writer(a: &ChildArgs) -> Result<WriterOut, Failure> {
    let file = open_scratch(&a.path, true)?;
    let m = map_words(&file, false)?;
    let stop = ready()?;
    paced_writes(a.secs, &stop, |i, _| {
        m.word(WORD_A).store(i, Ordering::Release);
        m.word(WORD_B).store(i, Ordering::Release);
        Ok(())
    })
}

fn raw_reader(a: &ChildArgs) -> Result<ReaderOut, Failure> {
    // A shared mapping is made writable, which needs a descriptor open for writing.
    let file = open_scratch(&a.path, !a.private)?;
    let m = map_words(&file, a.private)?;
    let (wa, wb) = (m.word(WORD_A), m.word(WORD_B));
    // Fault both pages in before the clock starts.
    let b0 = wa.load(Ordering::Acquire) + wb.load(Ordering::Acquire);
    std::hint::black_box(b0);
    let stop = ready()?;
    let mut out = ReaderOut {
        started_ns: monotonic_ns(),
        ..ReaderOut::default()
    };
    let copy_at = Instant::now() + Duration::from_secs_f64(a.secs);
    let b_start = wb.load(Ordering::Acquire);
    let mut p = PrivateOut::default();
    let mut copied = false;
    let mut b_last = b_start;
    while !stop.load(Ordering::Relaxed) {
        let v = wa.load(Ordering::Acquire);
        let now = monotonic_ns();
        out.polls += 1;
        saw(&mut out.first_seen_ns, v, now);
        if !a.private {
            continue;
        }
        let b = wb.load(Ordering::Acquire);
        if b != b_last {
            if copied {
                p.page1_changes_after_copy += 1;
            } else {
                p.page1_followed_before_copy = true;
            }
            b_last = b;
        }
        if !copied && out.polls.is_multiple_of(1024) && Instant::now() >= copy_at {
            // A store into page 1 of a private mapping copies the page for this process.
            m.word(WORD_COPY).store(1, Ordering::Release);
            copied = true;
            p.page1_value_at_copy = wb.load(Ordering::Acquire);
            b_last = p.page1_value_at_copy;
        }
    }
    out.secs = monotonic_ns().saturating_sub(out.started_ns) as f64 / 1e9;
    if a.private {
        p.page0_value_at_end = wa.load(Ordering::Acquire);
        out.private = Some(p);
    }
    Ok(out)
}

/// Random `get_with`s of keys `0..keys` for `secs`.
fn random_gets(store: &Store, keys: u64, secs: f64, seed: u64) -> mapkv::Result<LoadReaderOut> {
    let mut rng = Rng::new(seed);
    let budget = Duration::from_secs_f64(secs);
    let t = Instant::now();
    let (mut reads, mut misses, mut sum, mut slowest) = (0u64, 0u64, 0usize, Duration::ZERO);
    let mut last = t;
    loop {
        for _ in 0..BATCH {
            match store.get_with(key(rng.below(keys)), <[u8]>::len)? {
                Some(n) => sum += n,
                None => misses += 1,
            }
        }
        reads += BATCH;
        let now = Instant::now();
        slowest = slowest.max(now - last);
        last = now;
        if now - t >= budget {
            break;
        }
    }
    std::hint::black_box(sum);
    Ok(LoadReaderOut {
        reads,
        secs: t.elapsed().as_secs_f64(),
        misses,
        slowest_batch_ns: measure::nanos(slowest),
    })
}

fn load_writer(a: &ChildArgs) -> Result<LoadWriterOut, Failure> {
    let path = &a.path;
    // Its reader threads read a mapping populated at open, as the reader processes do.
    let opts = Options::default()
        .durability(Durability::None)
        .populate(a.threads > 0);
    let store = Store::open(path, opts).map_err(|e| store_fail(path, &e))?;
    let stop = ready()?;
    let done = AtomicUsize::new(0);
    let threads = usize::from(a.threads);
    let (puts, secs, capped, readers) = std::thread::scope(|s| -> Result<_, Failure> {
        let handles: Vec<_> = (0..a.threads)
            .map(|t| {
                let (store, done) = (&store, &done);
                s.spawn(move || {
                    let r = random_gets(store, a.keys, a.secs, a.seed + u64::from(t));
                    done.fetch_add(1, Ordering::Relaxed);
                    r
                })
            })
            .collect();
        let mut rng = Rng::new(a.seed ^ 0xabcd);
        let mut val = measure::value(9, VALUE_LEN);
        let start = Instant::now();
        let mut puts = 0u64;
        // Writing stops on its own a little after the readers' time is up, so a reader
        // stuck catching up with an unpaced writer cannot keep it (and the file) going.
        let write_until = start + Duration::from_secs_f64(a.secs + WRITE_GRACE_SECS);
        let finished = || {
            stop.load(Ordering::Relaxed) || (threads > 0 && done.load(Ordering::Relaxed) == threads)
        };
        let writing = || !finished() && Instant::now() < write_until;
        while a.unpaced && writing() {
            for _ in 0..256 {
                stamp(&mut val, puts);
                store
                    .put(key(rng.below(a.keys)), &val)
                    .map_err(|e| store_fail(path, &e))?;
                puts += 1;
            }
        }
        while !a.unpaced && writing() {
            // Catch up with the rate, then sleep a millisecond.
            let due = (start.elapsed().as_secs_f64() * a.rate as f64) as u64;
            while puts < due {
                stamp(&mut val, puts);
                store
                    .put(key(rng.below(a.keys)), &val)
                    .map_err(|e| store_fail(path, &e))?;
                puts += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let write_secs = start.elapsed().as_secs_f64();
        while !finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let wrote_to_the_cap = Instant::now() >= write_until;
        let mut readers = Vec::new();
        for h in handles {
            match h.join() {
                Ok(r) => readers.push(r.map_err(|e| store_fail(path, &e))?),
                Err(_) => return Err(Failure::msg("a reader thread panicked")),
            }
        }
        Ok((puts, write_secs, wrote_to_the_cap, readers))
    })?;
    store.close().map_err(|e| store_fail(path, &e))?;
    Ok(LoadWriterOut {
        puts,
        secs,
        capped,
        readers,
    })
}

fn load_reader(a: &ChildArgs) -> Result<LoadReaderOut, Failure> {
    let path = &a.path;
    // Populated at open: no page faults in the timed reads.
    let opts = Options::default().read_only(true).populate(true);
    let store = Store::open(path, opts).map_err(|e| store_fail(path, &e))?;
    let _stop = ready()?;
    random_gets(&store, a.keys, a.secs, a.seed).map_err(|e| store_fail(path, &e))
}

// ---------------------------------------------------------------------------------------
// The bench side.

/// A child process and its lines of stdout.
struct Kid {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Kid {
    /// Starts `mapkv bench-child ROLE PATH ARGS...` and waits for its `ready`.
    fn start(role: &str, path: &Path, args: &[String]) -> Result<Kid, Failure> {
        let exe = std::env::current_exe().map_err(|e| io_fail("find this program", &e))?;
        let mut child = Command::new(exe)
            .arg("bench-child")
            .arg(role)
            .arg(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| io_fail(&format!("start a {role} process"), &e))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut kid = Kid {
            name: role.to_owned(),
            child,
            stdin,
            lines: rx,
        };
        let line = kid.line()?;
        if line != "ready" {
            return Err(Failure::msg(format!(
                "{} process: expected `ready`, got {line:?}",
                kid.name
            )));
        }
        Ok(kid)
    }

    /// The next line of its stdout.
    fn line(&mut self) -> Result<String, Failure> {
        self.lines.recv_timeout(CHILD_TIMEOUT).map_err(|_| {
            let status = self.child.try_wait().ok().flatten();
            Failure::msg(format!(
                "{} process: no answer ({})",
                self.name,
                status.map_or_else(|| "still running".to_owned(), |s| s.to_string())
            ))
        })
    }

    fn go(&mut self) -> Result<(), Failure> {
        let name = &self.name;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Failure::msg(format!("{name} process: stdin gone")))?;
        writeln!(stdin, "go")
            .and_then(|()| stdin.flush())
            .map_err(|e| io_fail(&format!("start the {name} process"), &e))
    }

    /// Closes its stdin: a child that runs until stopped stops.
    fn stop(&mut self) {
        self.stdin = None;
    }

    /// Its JSON result line, once it exits.
    fn result<T: DeserializeOwned>(mut self) -> Result<T, Failure> {
        let line = self.line()?;
        self.stop();
        let status = self
            .child
            .wait()
            .map_err(|e| io_fail(&format!("wait for the {} process", self.name), &e))?;
        if !status.success() {
            return Err(Failure::msg(format!(
                "{} process failed ({status})",
                self.name
            )));
        }
        serde_json::from_str(&line)
            .map_err(|e| Failure::msg(format!("{} process: bad result {line:?}: {e}", self.name)))
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        // Only a child not yet waited for (an error path): std does not signal a child
        // it has already reaped.
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One visibility row: a writer process, a reader process.
#[derive(Debug, Clone, Serialize)]
pub struct VisibilityRow {
    /// What was written and read.
    pub what: String,
    /// Writes made.
    pub writes: usize,
    /// Writes whose visibility was measured (made after the reader started polling).
    pub measured: usize,
    /// Writes the reader never saw.
    pub never_seen: usize,
    /// From the writer's call returning to the reader first seeing the value (or a
    /// later one); 0 when the reader saw it before the call returned.
    pub after_return: Percentiles,
    /// From the writer's call starting to the reader first seeing it.
    pub after_call: Percentiles,
    /// Writes the reader saw before the writer's call returned.
    pub seen_before_return: usize,
    /// Latency of the writer's call.
    pub write_call: Percentiles,
    /// Reads the reader made per second.
    pub reader_polls_per_s: f64,
}

/// What the `MAP_PRIVATE` reader saw.
#[derive(Debug, Clone, Serialize)]
pub struct PrivateFacts {
    /// The page-1 counter moved while the reader had not written page 1.
    pub untouched_page_followed: bool,
    /// The page-1 counter when the reader wrote another word of page 1.
    pub frozen_at: u64,
    /// Changes of the page-1 counter the reader saw after that (0 = frozen).
    pub changes_after_copy: u64,
    /// Writes the writer made to page 1 after the copy.
    pub later_writes: u64,
    /// The page-0 counter, which the reader never wrote, reached the writer's last
    /// value.
    pub page0_saw_last_write: bool,
}

/// A reads/s row.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    /// Reader processes (0: one thread in the writer's own process).
    pub reader_processes: usize,
    /// Target puts/s of the writer process (0: idle, but open).
    pub write_rate: u64,
    /// The writer wrote as fast as it went (`write_rate` does not apply).
    pub unpaced: bool,
    /// Puts/s the writer made.
    pub writer_puts_per_s: f64,
    /// Reads/s of all readers together.
    pub reads_per_s: f64,
    /// Reads/s of each reader.
    pub per_reader: Vec<f64>,
    /// The writer stopped writing at its cap (0.5 s after the readers' time was up)
    /// because a reader was not done yet: that reader's last reads had no writer.
    pub writer_capped: bool,
    /// Gets that found no value (must be 0: every key exists).
    pub misses: u64,
    /// Seconds each reader meant to read (a reader stops at the first look at the clock
    /// after that).
    pub secs: f64,
    /// The longest time 256 consecutive gets of one reader took (about 0.1 ms when no
    /// get waited).
    pub slowest_256_gets_ns: u64,
}

/// Everything the reader-process section measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReadersReport {
    /// CPUs available to this process.
    pub cores: usize,
    /// Visibility rows.
    pub visibility: Vec<VisibilityRow>,
    /// The `MAP_PRIVATE` facts.
    pub private: PrivateFacts,
    /// Keys of the reads/s store.
    pub keys: u64,
    /// Work two threads of a pure CPU loop did, over the work of one (measured at the
    /// start of the section): about 2 when two CPUs are free, about 1 when other work
    /// holds one. With one CPU free, a writer and a reader process take turns, and a
    /// reader sees a write only once the writer's process sleeps again.
    pub cpu_scaling: f64,
    /// Reads/s rows.
    pub throughput: Vec<ThroughputRow>,
    /// Wall time of the section.
    pub wall_secs: f64,
}

fn visibility(what: &str, w: &WriterOut, r: &ReaderOut) -> VisibilityRow {
    let mut after_return = Vec::new();
    let mut after_call = Vec::new();
    let mut call = Vec::new();
    let (mut never, mut before) = (0, 0);
    for i in 1..w.returned_ns.len() {
        let (c, ret) = (w.called_ns[i], w.returned_ns[i]);
        call.push(ret.saturating_sub(c));
        if c < r.started_ns {
            continue;
        }
        match r.first_seen_ns.get(i) {
            None => never += 1,
            Some(&s) => {
                if s < ret {
                    before += 1;
                }
                after_return.push(s.saturating_sub(ret));
                after_call.push(s.saturating_sub(c));
            }
        }
    }
    VisibilityRow {
        what: what.to_owned(),
        writes: w.returned_ns.len().saturating_sub(1),
        measured: after_return.len(),
        never_seen: never,
        after_return: Percentiles::of(&mut after_return),
        after_call: Percentiles::of(&mut after_call),
        seen_before_return: before,
        write_call: Percentiles::of(&mut call),
        reader_polls_per_s: r.polls as f64 / r.secs.max(1e-9),
    }
}

/// A writer and a reader child for `secs` of writes; returns both reports.
fn pair(
    writer: (&str, &[String]),
    reader: (&str, &[String]),
    path: &Path,
) -> Result<(WriterOut, ReaderOut), Failure> {
    let mut w = Kid::start(writer.0, path, writer.1)?;
    let mut r = Kid::start(reader.0, path, reader.1)?;
    r.go()?;
    w.go()?;
    let wo: WriterOut = w.result()?;
    // Both policies publish a write before its call returns: the reader has seen the last
    // one long before this.
    std::thread::sleep(Duration::from_millis(20));
    r.stop();
    let ro: ReaderOut = r.result()?;
    Ok((wo, ro))
}

fn secs_arg(secs: f64) -> Vec<String> {
    vec!["--secs".into(), format!("{secs}")]
}

/// What the writer process does during a reads/s row.
#[derive(Debug, Clone, Copy)]
enum Writing {
    /// Holds the store open, writes nothing.
    Idle,
    /// Overwrites random keys at this many puts/s.
    Rate(u64),
    /// Overwrites random keys as fast as it goes.
    Unpaced,
}

/// One reads/s row: copies `base`, starts the writer (with `threads` reader threads of
/// its own) and `procs` reader processes.
fn throughput(
    dir: &Path,
    base: &Path,
    procs: usize,
    threads: u16,
    writing: Writing,
    secs: f64,
) -> Result<ThroughputRow, Failure> {
    let (rate, unpaced) = match writing {
        Writing::Idle => (0, false),
        Writing::Rate(r) => (r, false),
        Writing::Unpaced => (0, true),
    };
    let path = dir.join("readers-load.mkv");
    let _ = std::fs::remove_file(&path);
    std::fs::copy(base, &path).map_err(|e| io_fail("copy the base store", &e))?;
    let mut wargs = secs_arg(secs);
    wargs.extend([
        "--rate".into(),
        rate.to_string(),
        "--keys".into(),
        LOAD_KEYS.to_string(),
        "--threads".into(),
        threads.to_string(),
    ]);
    if unpaced {
        wargs.push("--unpaced".into());
    }
    let mut w = Kid::start("load-writer", &path, &wargs)?;
    let mut kids = Vec::new();
    for i in 0..procs {
        let mut args = secs_arg(secs);
        args.extend([
            "--keys".into(),
            LOAD_KEYS.to_string(),
            "--seed".into(),
            (100 + i).to_string(),
        ]);
        kids.push(Kid::start("load-reader", &path, &args)?);
    }
    w.go()?;
    for k in &mut kids {
        k.go()?;
    }
    let mut outs = Vec::new();
    for k in kids {
        outs.push(k.result::<LoadReaderOut>()?);
    }
    if threads == 0 {
        w.stop();
    }
    let wo: LoadWriterOut = w.result()?;
    outs.extend(wo.readers.iter().copied());
    let _ = std::fs::remove_file(&path);
    let per_reader: Vec<f64> = outs
        .iter()
        .map(|o| o.reads as f64 / o.secs.max(1e-9))
        .collect();
    Ok(ThroughputRow {
        reader_processes: procs,
        write_rate: rate,
        unpaced,
        writer_puts_per_s: wo.puts as f64 / wo.secs.max(1e-9),
        reads_per_s: per_reader.iter().sum(),
        per_reader,
        writer_capped: wo.capped,
        misses: outs.iter().map(|o| o.misses).sum(),
        secs,
        slowest_256_gets_ns: outs.iter().map(|o| o.slowest_batch_ns).max().unwrap_or(0),
    })
}

/// Runs the section in `dir`.
pub fn run(dir: &Path, pb: &ProgressBar) -> Result<ReadersReport, Failure> {
    let wall = Instant::now();
    let mut vis = Vec::new();
    pb.set_message("reader processes: are both CPUs free?");
    let cpu_scaling = cpu_scaling();

    // The floor and MAP_PRIVATE: a scratch file of two zeroed pages.
    let scratch = dir.join("readers.scratch");
    measure::create_scratch(&scratch)
        .and_then(|f| f.set_len((WORDS * 8) as u64))
        .map_err(|e| io_fail("create the scratch file", &e))?;
    pb.set_message("reader processes: raw MAP_SHARED visibility");
    let (w, r) = pair(
        ("raw-writer", &secs_arg(0.8)),
        ("raw-reader", &[]),
        &scratch,
    )?;
    vis.push(visibility(
        "raw MAP_SHARED: u64 store, reader spins on it (the floor)",
        &w,
        &r,
    ));
    pb.inc(1);

    pb.set_message("reader processes: MAP_PRIVATE");
    measure::create_scratch(&scratch)
        .and_then(|f| f.set_len((WORDS * 8) as u64))
        .map_err(|e| io_fail("create the scratch file", &e))?;
    let mut pargs = secs_arg(0.5);
    pargs.push("--private".into());
    let (w, r) = pair(
        ("raw-writer", &secs_arg(1.0)),
        ("raw-reader", &pargs),
        &scratch,
    )?;
    vis.push(visibility(
        "raw MAP_PRIVATE: u64 store, on a page the reader never wrote",
        &w,
        &r,
    ));
    let last = w.returned_ns.len().saturating_sub(1) as u64;
    let p = r.private.unwrap_or_default();
    let private = PrivateFacts {
        untouched_page_followed: p.page1_followed_before_copy,
        frozen_at: p.page1_value_at_copy,
        changes_after_copy: p.page1_changes_after_copy,
        later_writes: last.saturating_sub(p.page1_value_at_copy),
        page0_saw_last_write: p.page0_value_at_end == last,
    };
    let _ = std::fs::remove_file(&scratch);
    pb.inc(1);

    for (always, label) in [(false, "None"), (true, "Always")] {
        pb.set_message(format!("reader processes: visibility, Durability::{label}"));
        let path = dir.join("readers-seq.mkv");
        let _ = std::fs::remove_file(&path);
        let mut wargs = secs_arg(1.2);
        if always {
            wargs.push("--always".into());
        }
        let (w, r) = pair(("seq-writer", &wargs), ("seq-reader", &[]), &path)?;
        vis.push(visibility(
            &format!("mapkv put, Durability::{label}; reader busy-polls get"),
            &w,
            &r,
        ));
        let _ = std::fs::remove_file(&path);
        pb.inc(1);
    }

    // Reads/s.
    pb.set_message(format!("reader processes: filling a {LOAD_KEYS}-key store"));
    let base = dir.join("readers-base.mkv");
    fill(&base)?;
    let mut rows = Vec::new();
    let paced = Writing::Rate(WRITE_RATE);
    for (procs, writing, secs) in [
        (0, Writing::Idle, 0.8),
        (1, Writing::Idle, 0.8),
        (0, paced, 2.0),
        (1, paced, 2.0),
        (2, paced, 2.0),
        (4, paced, 2.0),
        (0, Writing::Unpaced, 1.2),
        (1, Writing::Unpaced, 1.2),
    ] {
        pb.set_message(format!(
            "reader processes: reads/s, {} beside a writer process ({})",
            if procs == 0 {
                "1 thread in the writer's process".to_owned()
            } else {
                format!("{procs} reader process(es)")
            },
            match writing {
                Writing::Idle => "idle".to_owned(),
                Writing::Rate(r) => format!("{r} puts/s"),
                Writing::Unpaced => "writing as fast as it goes".to_owned(),
            }
        ));
        let threads = u16::from(procs == 0);
        rows.push(throughput(dir, &base, procs, threads, writing, secs)?);
        pb.inc(1);
    }
    let _ = std::fs::remove_file(&base);
    Ok(ReadersReport {
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        visibility: vis,
        private,
        keys: LOAD_KEYS,
        cpu_scaling,
        throughput: rows,
        wall_secs: wall.elapsed().as_secs_f64(),
    })
}

/// Iterations of a pure CPU loop in `threads` threads for a quarter second.
fn spin(threads: u64) -> u64 {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let stop = &stop;
                s.spawn(move || {
                    let (mut x, mut n) = (t, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..1024 {
                            x = measure::mix(x);
                        }
                        n += 1024;
                    }
                    std::hint::black_box(x);
                    n
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(250));
        stop.store(true, Ordering::Relaxed);
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    })
}

/// [`ReadersReport::cpu_scaling`].
fn cpu_scaling() -> f64 {
    let one = spin(1);
    spin(2) as f64 / one.max(1) as f64
}

fn fill(path: &Path) -> Result<(), Failure> {
    let _ = std::fs::remove_file(path);
    let store = Store::open(
        path,
        Options::default()
            .durability(Durability::None)
            .initial_size(LOAD_KEYS * 400),
    )
    .map_err(|e| store_fail(path, &e))?;
    let mut val = measure::value(0, VALUE_LEN);
    for i in 0..LOAD_KEYS {
        stamp(&mut val, i);
        store.put(key(i), &val).map_err(|e| store_fail(path, &e))?;
    }
    store.close().map_err(|e| store_fail(path, &e))
}

fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_content_arrangement(ContentArrangement::Dynamic);
    t
}

fn right_align(t: &mut Table, from: usize) {
    for i in from..t.column_count() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// The human-readable section.
pub fn render(r: &ReadersReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nReader processes: a writer process and reader processes (`read_only(true)`), this \
         program re-run; {} CPU(s), and two threads of a CPU loop did {:.2}x the work of one \
         at the start (about 1x: other work holds a CPU, so processes take turns). \
         Visibility: the writer writes every {INTERVAL_US} µs; times are CLOCK_MONOTONIC, \
         shared by all processes.",
        r.cores, r.cpu_scaling
    );
    let mut t = table();
    t.set_header(vec![
        "writer process -> reader process",
        "writes seen",
        "returned -> seen p50",
        "p99",
        "max",
        "seen before the write returned",
        "called -> seen p50",
        "write call p50",
    ]);
    for v in &r.visibility {
        t.add_row(vec![
            v.what.clone(),
            if v.never_seen == 0 {
                v.measured.to_string()
            } else {
                format!("{} ({} never)", v.measured, v.never_seen)
            },
            fmt_ns(v.after_return.p50_ns),
            fmt_ns(v.after_return.p99_ns),
            fmt_ns(v.after_return.max_ns),
            format!(
                "{:.0}%",
                100.0 * v.seen_before_return as f64 / v.measured.max(1) as f64
            ),
            fmt_ns(v.after_call.p50_ns),
            fmt_ns(v.write_call.p50_ns),
        ]);
    }
    right_align(&mut t, 1);
    let _ = writeln!(s, "{t}");
    let p = &r.private;
    let untouched = r
        .visibility
        .iter()
        .find(|v| v.what.starts_with("raw MAP_PRIVATE"));
    let _ = writeln!(
        s,
        "MAP_PRIVATE, untouched page: {} (seen after {} p50, {} max).",
        if p.untouched_page_followed && p.page0_saw_last_write {
            "follows the file"
        } else {
            "did NOT follow the file"
        },
        untouched.map_or_else(String::new, |v| fmt_ns(v.after_return.p50_ns)),
        untouched.map_or_else(String::new, |v| fmt_ns(v.after_return.max_ns)),
    );
    let _ = writeln!(
        s,
        "MAP_PRIVATE, page the reader wrote: {} at {} (never saw the {} later writes; \
         the untouched page of the same mapping {}).",
        if p.changes_after_copy == 0 {
            "frozen".to_owned()
        } else {
            format!("NOT frozen ({} changes seen)", p.changes_after_copy)
        },
        p.frozen_at,
        p.later_writes,
        if p.page0_saw_last_write {
            "saw all of them"
        } else {
            "missed some"
        },
    );

    let mut t = table();
    t.set_header(vec![
        "readers",
        "writer process",
        "reads/s (total)",
        "per reader",
        "vs 1 thread in the writer's process",
        "slowest 256 gets",
    ]);
    let base = |rate: u64, unpaced: bool| {
        r.throughput
            .iter()
            .find(|x| x.reader_processes == 0 && x.write_rate == rate && x.unpaced == unpaced)
            .map_or(0.0, |x| x.reads_per_s)
    };
    for x in &r.throughput {
        let who = if x.reader_processes == 0 {
            "1 thread in the writer's process".to_owned()
        } else {
            let mut w = format!(
                "{} process{}",
                x.reader_processes,
                if x.reader_processes == 1 { "" } else { "es" }
            );
            if x.reader_processes > r.cores {
                let _ = write!(w, " ({} CPUs: time-shared)", r.cores);
            }
            w
        };
        let writer = if x.unpaced {
            format!(
                "as fast as it goes: {} puts/s",
                fmt_rate(x.writer_puts_per_s)
            )
        } else if x.write_rate == 0 {
            "open, idle".to_owned()
        } else {
            format!("{} puts/s", fmt_rate(x.writer_puts_per_s))
        };
        let writer = if x.writer_capped {
            format!("{writer} (*)")
        } else {
            writer
        };
        let per = x
            .per_reader
            .iter()
            .map(|&v| fmt_rate(v))
            .collect::<Vec<_>>()
            .join(" + ");
        let b = base(x.write_rate, x.unpaced);
        t.add_row(vec![
            who,
            writer,
            fmt_rate(x.reads_per_s),
            per,
            if b > 0.0 {
                format!("{:.2}x", x.reads_per_s / b)
            } else {
                "-".into()
            },
            fmt_ns(x.slowest_256_gets_ns),
        ]);
    }
    right_align(&mut t, 2);
    let misses: u64 = r.throughput.iter().map(|x| x.misses).sum();
    let _ = writeln!(
        s,
        "\nReads beside a writer process: random get_with of {} keys x {VALUE_LEN} B \
         (warm: every mapping populated at open); the writer overwrites random keys \
         (Durability::None). {}\n{t}",
        r.keys,
        if misses == 0 {
            "Every get found its key.".to_owned()
        } else {
            format!("{misses} gets found NO value: a bug.")
        }
    );
    if r.throughput.iter().any(|x| x.writer_capped) {
        let _ = writeln!(
            s,
            "(*) A reader ran over its time, stuck in one call catching up with the writer; \
             the writer stopped writing {WRITE_GRACE_SECS} s after the readers' time was up, \
             which let that call return. `slowest 256 gets` shows how long it waited."
        );
    }
    let _ = writeln!(s, "Reader-process section: {:.1} s.", r.wall_secs);
    s
}

/// `mapkv bench --readers only`: the section alone, in `dir`.
pub fn run_only(dir: &Path, filesystem: &str, json: bool) -> Result<(), Failure> {
    let pb = crate::progress::bar(STEPS);
    let report = run(dir, &pb)?;
    pb.finish_and_clear();
    #[derive(Serialize)]
    struct Only<'a> {
        kernel: String,
        filesystem: &'a str,
        dir: String,
        readers: &'a ReadersReport,
    }
    let text = if json {
        let only = Only {
            kernel: measure::kernel(),
            filesystem,
            dir: dir.display().to_string(),
            readers: &report,
        };
        serde_json::to_string_pretty(&only).map_err(|e| Failure::msg(format!("JSON: {e}")))? + "\n"
    } else {
        format!(
            "mapkv bench --readers only: {filesystem} in {}; kernel {}{}",
            dir.display(),
            measure::kernel(),
            render(&report)
        )
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
        .map_err(Failure::stdout)
}
