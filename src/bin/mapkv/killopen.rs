//! The bounded-recovery section of `mapkv bench` (`--kill-recovery KILLS`, run alone):
//! how long `Store::open` takes after the writer was killed with SIGKILL at a random
//! moment, over many kills, next to a clean open of the same store, and whether any of
//! those opens rebuilt the index from the whole log.
//!
//! 1. Fills a store of `--keys` keys (`Durability::None`), closes it cleanly and times a
//!    clean open of it.
//! 2. `KILLS` times, on that same store (so its state moves on from kill to kill: dead
//!    records pile up until automatic compaction replaces the file, keys are added until
//!    the index grows): starts a writer process (this binary, hidden subcommand
//!    `bench-kill-child`) that opens the store (`Durability::None`, checkpoints every
//!    [`CHECKPOINT_KEYS`] keys, automatic compaction on) and puts as fast as it can:
//!    mostly overwrites of random keys, one put in [`ADD_ONE_IN`] a new key (keys are
//!    added in order, `key(n)`, `key(n + 1)`, ..., up to twice `--keys`). So index
//!    checkpoints (a background one each time [`CHECKPOINT_KEYS`] keys changed), file
//!    growth, index growth and compaction happen while it runs. Once it reports `ready`
//!    (opened), the bench sleeps a random delay, uniform in
//!    [`KILL_MIN_MS`]..=[`KILL_MAX_MS`] ms, and kills it (SIGKILL).
//! 3. Looks where the kill landed, before anything opens the file: the current checkpoint
//!    slot's state in the superblock (CHECKPOINTING: inside a checkpoint, between its
//!    first slot write and its last) and the live area's index sequence (odd: in the
//!    middle of a bucket run, slot write or punch), a leftover `<name>.compact-*` file
//!    (inside a compaction), the file's inode (a compaction finished during the writer's
//!    life).
//! 4. Times `Store::open` of the killed store (page cache warm, as after a process crash
//!    and restart), keeps its [`mapkv::RecoveryReport`], runs [`mapkv::Store::verify`],
//!    and checks that no acknowledged write was lost: the writer reports, every
//!    [`REPORT_MS`] ms, how many new keys its returned puts added, and the recovered
//!    store must hold at least those (its keys are exactly `key(0..len)`). If more than
//!    half its log is dead (a compaction in a writer was killed before it finished, as it
//!    usually is with a store of 1M keys), compacts it, untimed, so the store stays
//!    bounded and the next writer's automatic compaction starts in the middle of its life
//!    rather than at its first put. Then closes it and times a clean open of the same
//!    store (the baseline).

use std::io::{BufRead, BufReader, Read, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use comfy_table::{CellAlignment, ContentArrangement, Table};
use indicatif::ProgressBar;
use mapkv::format::{
    checkpoint_off, decode_checkpoint, decode_static, LIVE_INDEX_SEQ_OFF, PAGE, SECTOR,
    STATE_CHECKPOINTING, STATE_CLEAN, STATE_DIRTY,
};
use mapkv::{Durability, Options, Store};
use serde::Serialize;

use crate::measure::{self, fmt_bytes, fmt_rate, fmt_secs, key, nearest_rank, stamp, Rng};
use crate::Failure;

/// `Options::checkpoint_keys` of the writer process (the library's default for an
/// index of up to 1M keys, and its floor; set explicitly so that the runs stay
/// comparable whatever the default becomes).
pub const CHECKPOINT_KEYS: usize = 450_000;
/// One put in this many adds a new key; the others overwrite a random existing key.
pub const ADD_ONE_IN: u64 = 16;
/// Shortest delay between the writer's `ready` and its kill.
pub const KILL_MIN_MS: u64 = 50;
/// Longest delay between the writer's `ready` and its kill. A writer puts about 1M/s
/// alone but about 300k/s while a compaction runs beside it on this 2-CPU VM; its first
/// checkpoint starts after about 560k puts (450k distinct keys of 1M+), so lives of up to
/// 1.5 s would rarely reach it with a compaction running. Lives of up to 3 s reach the
/// first checkpoint either way and sample the steady state, not only the start.
pub const KILL_MAX_MS: u64 = 3000;
/// How often the writer reports its acknowledged puts.
pub const REPORT_MS: u64 = 2;
/// Automatic compaction of the writer: when dead bytes exceed this share of the log...
const COMPACT_DEAD_RATIO: f64 = 0.5;
/// ... and the log holds at least this many bytes.
const COMPACT_MIN_LOG: u64 = 16 << 20;
/// How long the bench waits for the writer's `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of the writer's stderr kept for an error message.
const STDERR_LINES: usize = 20;
/// Most kills one run makes.
pub const MAX_KILLS: u64 = 100_000;

// ---------------------------------------------------------------------------------------
// The child side: `mapkv bench-kill-child PATH ...` (hidden).

/// Arguments of the hidden `mapkv bench-kill-child` (started by `mapkv bench
/// --kill-recovery` only).
#[derive(Debug, clap::Args)]
pub struct ChildArgs {
    /// The store (it holds exactly the keys `key(0..first_new)`).
    pub path: PathBuf,
    /// The next new key: the store's number of keys.
    #[arg(long)]
    pub first_new: u64,
    /// Add no keys beyond this many.
    #[arg(long)]
    pub max_keys: u64,
    /// Value size in bytes.
    #[arg(long)]
    pub value_size: usize,
    /// Seed of the random keys.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs `mapkv bench-kill-child`: opens the store, prints `ready`, then puts until killed,
/// printing `PUTS NEXT_NEW` (puts returned, keys `key(0..NEXT_NEW)` all written by
/// returned puts) every [`REPORT_MS`] ms. Exits when its stdin closes (the bench is
/// gone), without closing the store.
pub fn child(a: &ChildArgs) -> Result<(), Failure> {
    let path = &a.path;
    if a.first_new == 0 {
        return Err(Failure::msg(
            "bench-kill-child: --first-new must be at least 1",
        ));
    }
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(CHECKPOINT_KEYS)
        .auto_compact(COMPACT_DEAD_RATIO, COMPACT_MIN_LOG);
    let store = Store::open(path, opts).map_err(|e| Failure::store(path, &e))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")
            .and_then(|()| out.flush())
            .map_err(Failure::stdout)?;
    }
    // The bench went away: stop at once, as a crash would.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
        std::process::exit(3);
    });
    let puts = Arc::new(AtomicU64::new(0));
    let next_new = Arc::new(AtomicU64::new(a.first_new));
    {
        let (puts, next_new) = (Arc::clone(&puts), Arc::clone(&next_new));
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(REPORT_MS));
            let p = puts.load(Ordering::Acquire);
            let n = next_new.load(Ordering::Acquire);
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{p} {n}").and_then(|()| out.flush()).is_err() {
                std::process::exit(3);
            }
        });
    }
    let mut rng = Rng::new(a.seed);
    let mut val = measure::value(a.seed, a.value_size);
    let mut next = a.first_new;
    let mut n = 0u64;
    loop {
        stamp(&mut val, n);
        if next < a.max_keys && rng.below(ADD_ONE_IN) == 0 {
            store
                .put(key(next), &val)
                .map_err(|e| Failure::store(path, &e))?;
            next += 1;
            next_new.store(next, Ordering::Release);
        } else {
            store
                .put(key(rng.below(next)), &val)
                .map_err(|e| Failure::store(path, &e))?;
        }
        n += 1;
        puts.store(n, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------
// The bench side.

/// What one kill and the open after it found.
#[derive(Debug, Clone, Serialize)]
pub struct KillRecord {
    /// Milliseconds between the writer's `ready` and the SIGKILL.
    pub delay_ms: u64,
    /// Puts the writer reported returned (its last report before the kill).
    pub puts: u64,
    /// Keys in the store when the writer started.
    pub keys_before: u64,
    /// State of the current checkpoint slot of the killed file: `clean`, `dirty`,
    /// `checkpointing`, or `unreadable`.
    pub slot_state: String,
    /// Index buckets of that slot.
    pub slot_buckets: u64,
    /// Index buckets when the writer started.
    pub buckets_before: u64,
    /// A compaction's file was left behind: the kill landed inside a compaction.
    pub in_compaction: bool,
    /// A compaction replaced the file during the writer's life.
    pub compacted: bool,
    /// The live area's index sequence was odd: the kill landed in the middle of a change
    /// of the index (a bucket run, a slot write, a punch).
    pub index_seq_odd: bool,
    /// The kill landed inside an index checkpoint: the slot says CHECKPOINTING, or the
    /// index sequence was odd.
    pub in_checkpoint: bool,
    /// `Store::open` of the killed store.
    pub open_ms: f64,
    /// `RecoveryReport::was_clean`.
    pub was_clean: bool,
    /// `RecoveryReport::replayed_writes`.
    pub replayed_writes: u64,
    /// `RecoveryReport::rebuilt_index`.
    pub rebuilt_index: bool,
    /// `RecoveryReport::truncated_at`.
    pub truncated_at: Option<u64>,
    /// Index buckets after the open.
    pub buckets_after: u64,
    /// Keys after the open.
    pub keys_after: u64,
    /// File size after the open.
    pub file_bytes: u64,
    /// `Store::verify` of the recovered store.
    pub verify_ms: f64,
    /// What went wrong (verify error, lost acknowledged writes), if anything.
    pub failure: Option<String>,
    /// The bench compacted the store after the recovery (untimed; more than half its log
    /// was dead).
    pub bench_compacted: bool,
    /// `Store::open` of the same store, closed cleanly after the recovery.
    pub clean_open_ms: f64,
}

/// Median, p90 and worst of a set of times, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Times {
    /// How many.
    pub n: usize,
    /// Median (nearest rank).
    pub median_ms: f64,
    /// 90th percentile (nearest rank).
    pub p90_ms: f64,
    /// Largest.
    pub worst_ms: f64,
}

impl Times {
    fn of(ms: impl Iterator<Item = f64>) -> Times {
        let mut ns: Vec<u64> = ms.map(|m| (m * 1e6) as u64).collect();
        ns.sort_unstable();
        let at = |q| nearest_rank(&ns, q) as f64 / 1e6;
        Times {
            n: ns.len(),
            median_ms: at(0.5),
            p90_ms: at(0.9),
            worst_ms: at(1.0),
        }
    }

    /// Worst over median (0 when there is nothing).
    fn ratio(&self) -> f64 {
        if self.median_ms > 0.0 {
            self.worst_ms / self.median_ms
        } else {
            0.0
        }
    }
}

/// Everything the section measured.
#[derive(Debug, Clone, Serialize)]
pub struct KillReport {
    /// Filesystem of the directory.
    pub filesystem: String,
    /// The directory.
    pub dir: String,
    /// Kernel release.
    pub kernel: String,
    /// Keys the store was filled with.
    pub keys: u64,
    /// Value size.
    pub value_size: usize,
    /// Seed of the kill delays and the writers' keys.
    pub seed: u64,
    /// Clean open of the freshly filled store.
    pub first_clean_open_ms: f64,
    /// Every kill, in order.
    pub kills: Vec<KillRecord>,
    /// Opens after a kill.
    pub open_after_kill: Times,
    /// Worst / median of those.
    pub worst_over_median: f64,
    /// Clean opens of the same store, after each recovery.
    pub clean_open: Times,
    /// Opens that rebuilt the index.
    pub rebuilt: usize,
    /// Opens whose kill landed in a checkpoint.
    pub in_checkpoint: usize,
    /// Opens whose kill landed in a compaction.
    pub in_compaction: usize,
    /// Compactions that finished during a writer's life.
    pub compactions: usize,
    /// Index growths during writers' lives (the killed file's slot has more buckets than
    /// the store had when the writer started).
    pub index_growths_in_writer: usize,
    /// Index growths by the recovering open.
    pub index_growths_in_open: usize,
    /// Opens that cut off a torn tail.
    pub truncated: usize,
    /// Median replayed writes.
    pub replayed_median: u64,
    /// Most replayed writes.
    pub replayed_max: u64,
    /// Median puts a writer made before its kill.
    pub puts_median: u64,
    /// Kills whose recovered store failed verification or lost acknowledged writes.
    pub failures: usize,
    /// Wall time of the section.
    pub wall_secs: f64,
}

fn io_fail(what: &str, e: &std::io::Error) -> Failure {
    Failure::msg(format!("kill-recovery: {what}: {e}"))
}

/// A store error as text, naming the store unless the error does.
fn store_msg(path: &Path, e: &mapkv::Error) -> String {
    if e.path().is_some() {
        e.to_string()
    } else {
        format!("{}: {e}", path.display())
    }
}

/// A writer process and its output.
struct Writer {
    child: Child,
    /// Kept open: the writer exits when it closes.
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_done: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(path: &Path, args: &[String]) -> Result<Writer, Failure> {
        let exe = std::env::current_exe().map_err(|e| io_fail("find this program", &e))?;
        let mut child = Command::new(exe)
            .arg("bench-kill-child")
            .arg(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io_fail("start a writer process", &e))?;
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_done = child.stderr.take().map(|err| {
            let keep = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut v) = keep.lock() {
                        if v.len() == STDERR_LINES {
                            v.remove(0);
                        }
                        v.push(line);
                    }
                }
            })
        });
        Ok(Writer {
            child,
            stdin,
            lines: rx,
            stderr,
            stderr_done,
        })
    }

    /// The last lines of its stderr, for an error message.
    fn stderr_tail(&mut self) -> String {
        if let Some(h) = self.stderr_done.take() {
            let _ = h.join();
        }
        let lines = self.stderr.lock().map(|v| v.join("\n")).unwrap_or_default();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; its stderr:\n{lines}")
        }
    }

    /// Waits for `ready`.
    fn ready(&mut self) -> Result<(), Failure> {
        match self.lines.recv_timeout(READY_TIMEOUT) {
            Ok(l) if l == "ready" => Ok(()),
            Ok(l) => Err(Failure::msg(format!(
                "kill-recovery: the writer process said {l:?} instead of `ready`"
            ))),
            Err(_) => {
                let _ = self.child.kill();
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                let tail = self.stderr_tail();
                Err(Failure::msg(format!(
                    "kill-recovery: the writer process did not open the store ({status}){tail}"
                )))
            }
        }
    }

    /// Kills it with SIGKILL and returns its last report: (puts, next new key). Fails if
    /// it had exited on its own.
    fn kill(mut self) -> Result<(u64, u64), Failure> {
        let early = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_err(|e| io_fail("wait for the writer process", &e))?;
        if early.is_some() || status.signal() != Some(libc::SIGKILL) {
            let tail = self.stderr_tail();
            return Err(Failure::msg(format!(
                "kill-recovery: the writer process ended before it was killed ({status}){tail}"
            )));
        }
        self.stdin = None;
        // Every line it printed is in the pipe: read to the end.
        let mut last = None;
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(10)) {
            last = Some(l);
        }
        let parse = |l: &str| -> Option<(u64, u64)> {
            let (p, n) = l.split_once(' ')?;
            Some((p.parse().ok()?, n.parse().ok()?))
        };
        match last.as_deref() {
            None | Some("ready") => Ok((0, 0)),
            Some(l) => parse(l).ok_or_else(|| {
                Failure::msg(format!("kill-recovery: bad report from the writer: {l:?}"))
            }),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Only on error paths: `kill` has reaped it already, and a second kill of a reaped
        // child is refused by std, not sent.
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the superblock page of a killed file says.
#[derive(Debug, Clone, Copy)]
struct Superblock {
    /// State and index buckets of the current checkpoint slot (`None`: no valid slot).
    slot: Option<(u32, u64)>,
    /// The live area's index sequence is odd.
    seq_odd: bool,
}

/// Reads the superblock page of the file at `path` (`None`: unreadable).
fn superblock(path: &Path) -> Option<Superblock> {
    let f = std::fs::File::open(path).ok()?;
    let mut page = vec![0u8; PAGE as usize];
    f.read_exact_at(&mut page, 0).ok()?;
    let seed = decode_static(&page).ok()?.seed;
    let slot = (0..2)
        .filter_map(|i| {
            let off = usize::try_from(checkpoint_off(i)).ok()?;
            decode_checkpoint(seed, page.get(off..off + SECTOR as usize)?)
        })
        .max_by_key(|c| c.seq)
        .map(|c| (c.state, c.index_buckets));
    let off = usize::try_from(LIVE_INDEX_SEQ_OFF).ok()?;
    let seq = u64::from_le_bytes(page.get(off..off + 8)?.try_into().ok()?);
    Some(Superblock {
        slot,
        seq_odd: seq % 2 == 1,
    })
}

fn state_name(s: Option<u32>) -> String {
    match s {
        Some(STATE_CLEAN) => "clean".into(),
        Some(STATE_DIRTY) => "dirty".into(),
        Some(STATE_CHECKPOINTING) => "checkpointing".into(),
        Some(x) => format!("state {x}"),
        None => "unreadable".into(),
    }
}

/// A leftover `<name>.compact-*` file next to `path`.
fn compaction_leftover(path: &Path) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return false;
    };
    let prefix = format!("{}.compact-", name.to_string_lossy());
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    })
}

fn inode(path: &Path) -> Result<u64, Failure> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| io_fail(&format!("stat {}", path.display()), &e))
}

fn buckets(store: &Store) -> u64 {
    store.stats().index_bytes / PAGE
}

/// Times a clean open of `path` and closes it again.
fn clean_open(path: &Path) -> Result<f64, Failure> {
    let t = Instant::now();
    let store = Store::open(path, Options::default().durability(Durability::None))
        .map_err(|e| Failure::store(path, &e))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !store.stats().recovery.was_clean {
        return Err(Failure::msg(format!(
            "kill-recovery: {} was not clean after a clean close",
            path.display()
        )));
    }
    store.close().map_err(|e| Failure::store(path, &e))?;
    Ok(ms)
}

/// What is wrong with the recovered store's keys, if anything: they must be exactly
/// `key(0..n)` with `n` at least the writer's acknowledged `acked` and the `before` the
/// store had when the writer started.
fn check_keys(store: &Store, n: u64, acked: u64, before: u64) -> Result<Option<String>, String> {
    if n < acked.max(before) {
        return Ok(Some(format!(
            "lost acknowledged writes: {n} keys after recovery, the writer had acknowledged \
             {acked} (and the store had {before} before it)"
        )));
    }
    let has = |i: u64| store.contains_key(key(i)).map_err(|e| e.to_string());
    if !has(n - 1)? || has(n)? {
        return Ok(Some(format!(
            "the {n} keys after recovery are not key(0..{n}): not a prefix of the writes"
        )));
    }
    Ok(None)
}

/// The store as one kill finds it.
#[derive(Debug, Clone, Copy)]
struct Before {
    /// Seed of the writer's keys.
    seed: u64,
    /// Keys in the store.
    keys: u64,
}

/// One kill and the recovery after it.
fn one_kill(
    path: &Path,
    a: &crate::bench::BenchArgs,
    rng: &mut Rng,
    before: &Before,
    pb: &ProgressBar,
    label: &str,
) -> Result<KillRecord, Failure> {
    let Before {
        seed,
        keys: keys_before,
    } = *before;
    let max_keys = a.keys.saturating_mul(2);
    let args = vec![
        "--first-new".to_owned(),
        keys_before.to_string(),
        "--max-keys".into(),
        max_keys.max(keys_before).to_string(),
        "--value-size".into(),
        a.value_size().to_string(),
        "--seed".into(),
        seed.to_string(),
    ];
    let ino_before = inode(path)?;
    let buckets_before = superblock(path).and_then(|s| s.slot).map_or(0, |s| s.1);
    pb.set_message(format!("{label}: writer running"));
    let mut w = Writer::start(path, &args)?;
    w.ready()?;
    let delay_ms = KILL_MIN_MS + rng.below(KILL_MAX_MS - KILL_MIN_MS + 1);
    std::thread::sleep(Duration::from_millis(delay_ms));
    let (puts, acked) = w.kill()?;

    // Where the kill landed, before anything opens the file.
    let sb = superblock(path);
    let slot = sb.and_then(|s| s.slot);
    let index_seq_odd = sb.is_some_and(|s| s.seq_odd);
    let in_compaction = compaction_leftover(path);
    let compacted = inode(path)? != ino_before;

    pb.set_message(format!("{label}: recovering"));
    let t = Instant::now();
    let store =
        Store::open(path, Options::default().durability(Durability::None)).map_err(|e| {
            Failure::msg(format!(
                "kill-recovery: open after the kill failed: {}",
                store_msg(path, &e)
            ))
        })?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let st = store.stats();
    let rec = st.recovery.clone();

    pb.set_message(format!("{label}: verifying"));
    let t = Instant::now();
    let verified = store.verify();
    let verify_ms = t.elapsed().as_secs_f64() * 1e3;
    let keys_after = store.len() as u64;
    let mut failure = match verified {
        Err(e) => Some(format!("verify: {e}")),
        Ok(_) => None,
    };
    if failure.is_none() {
        failure = check_keys(&store, keys_after, acked, keys_before)
            .unwrap_or_else(|e| Some(format!("reading keys back: {e}")));
    }
    let buckets_after = buckets(&store);
    let file_bytes = st.file_size;
    let bench_compacted = failure.is_none() && store.stats().dead_ratio() > COMPACT_DEAD_RATIO;
    if bench_compacted {
        pb.set_message(format!("{label}: compacting (untimed)"));
        store.compact().map_err(|e| Failure::store(path, &e))?;
    }
    store.close().map_err(|e| Failure::store(path, &e))?;
    let clean_open_ms = clean_open(path)?;

    Ok(KillRecord {
        delay_ms,
        puts,
        keys_before,
        slot_state: state_name(slot.map(|s| s.0)),
        slot_buckets: slot.map_or(0, |s| s.1),
        buckets_before,
        in_compaction,
        compacted,
        index_seq_odd,
        in_checkpoint: slot.is_some_and(|s| s.0 == STATE_CHECKPOINTING) || index_seq_odd,
        open_ms,
        was_clean: rec.was_clean,
        replayed_writes: rec.replayed_writes,
        rebuilt_index: rec.rebuilt_index,
        truncated_at: rec.truncated_at,
        buckets_after,
        keys_after,
        file_bytes,
        verify_ms,
        failure,
        bench_compacted,
        clean_open_ms,
    })
}

/// Runs the section alone (`mapkv bench --kill-recovery KILLS`) and prints its report.
pub fn run_only(
    a: &crate::bench::BenchArgs,
    kills: u64,
    dir: &Path,
    filesystem: &str,
) -> Result<(), Failure> {
    let wall = Instant::now();
    if !(1..=MAX_KILLS).contains(&kills) {
        return Err(Failure::msg(format!(
            "--kill-recovery must be between 1 and {MAX_KILLS} kills, not {kills}"
        )));
    }
    if a.keys < 2 {
        return Err(Failure::msg("--kill-recovery needs --keys of at least 2"));
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| {
            u64::try_from(d.as_nanos() & 0xffff_ffff_ffff).unwrap_or(1)
        });
    let pb = crate::progress::bar(kills + 1);
    pb.set_message(format!("filling the store ({} keys)", a.keys));
    let path = dir.join("kill.mkv");
    crate::bench::fill_base(&path, a.keys, a.value_size())?;
    let first_clean_open_ms = clean_open(&path)?;
    pb.inc(1);

    let mut rng = Rng::new(seed);
    let mut records = Vec::new();
    let mut keys_before = a.keys;
    for i in 0..kills {
        let label = format!("kill {}/{kills}", i + 1);
        let before = Before {
            seed: seed.wrapping_add(i + 1),
            keys: keys_before,
        };
        let r = one_kill(&path, a, &mut rng, &before, &pb, &label)?;
        keys_before = r.keys_after.max(keys_before);
        records.push(r);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let _ = std::fs::remove_file(&path);

    let report = summarize(a, seed, dir, filesystem, first_clean_open_ms, records, wall);
    let text = if a.json {
        serde_json::to_string_pretty(&report).map_err(|e| Failure::msg(format!("JSON: {e}")))?
            + "\n"
    } else {
        render(&report)
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
        .map_err(Failure::stdout)?;
    if report.failures > 0 {
        return Err(Failure::msg(format!(
            "kill-recovery: {} of {} recovered stores failed (see the report)",
            report.failures,
            report.kills.len()
        )));
    }
    Ok(())
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    nearest_rank(&v, 0.5)
}

fn summarize(
    a: &crate::bench::BenchArgs,
    seed: u64,
    dir: &Path,
    filesystem: &str,
    first_clean_open_ms: f64,
    kills: Vec<KillRecord>,
    wall: Instant,
) -> KillReport {
    let open_after_kill = Times::of(kills.iter().map(|k| k.open_ms));
    KillReport {
        filesystem: filesystem.to_owned(),
        dir: dir.display().to_string(),
        kernel: measure::kernel(),
        keys: a.keys,
        value_size: a.value_size(),
        seed,
        first_clean_open_ms,
        worst_over_median: open_after_kill.ratio(),
        open_after_kill,
        clean_open: Times::of(kills.iter().map(|k| k.clean_open_ms)),
        rebuilt: kills.iter().filter(|k| k.rebuilt_index).count(),
        in_checkpoint: kills.iter().filter(|k| k.in_checkpoint).count(),
        in_compaction: kills.iter().filter(|k| k.in_compaction).count(),
        compactions: kills.iter().filter(|k| k.compacted).count(),
        index_growths_in_writer: kills
            .iter()
            .filter(|k| k.slot_buckets > k.buckets_before && !k.compacted)
            .count(),
        index_growths_in_open: kills
            .iter()
            .filter(|k| k.slot_buckets > 0 && k.buckets_after > k.slot_buckets)
            .count(),
        truncated: kills.iter().filter(|k| k.truncated_at.is_some()).count(),
        replayed_median: median_u64(kills.iter().map(|k| k.replayed_writes).collect()),
        replayed_max: kills.iter().map(|k| k.replayed_writes).max().unwrap_or(0),
        puts_median: median_u64(kills.iter().map(|k| k.puts).collect()),
        failures: kills.iter().filter(|k| k.failure.is_some()).count(),
        wall_secs: wall.elapsed().as_secs_f64(),
        kills,
    }
}

fn ms(x: f64) -> String {
    fmt_secs(x / 1e3)
}

/// The human-readable report.
fn render(r: &KillReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let last = r.kills.last();
    let _ = writeln!(
        s,
        "mapkv bench --kill-recovery {}: a store of {} keys x {} B values, written by a \
         writer process (Durability::None, checkpoint every {} keys, auto-compaction at {:.0}% \
         dead) killed with SIGKILL {}-{} ms after it opened; {} in {}; kernel {}; seed {}",
        r.kills.len(),
        r.keys,
        r.value_size,
        CHECKPOINT_KEYS,
        COMPACT_DEAD_RATIO * 100.0,
        KILL_MIN_MS,
        KILL_MAX_MS,
        r.filesystem,
        r.dir,
        r.kernel,
        r.seed,
    );
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_content_arrangement(ContentArrangement::Dynamic);
    t.set_header(vec![
        "Store::open",
        "n",
        "median",
        "p90",
        "worst",
        "worst/median",
    ]);
    let mut row = |what: &str, x: Times| {
        if x.n == 0 {
            t.add_row(vec![
                what.to_owned(),
                "0".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        } else {
            t.add_row(vec![
                what.to_owned(),
                x.n.to_string(),
                ms(x.median_ms),
                ms(x.p90_ms),
                ms(x.worst_ms),
                format!("{:.1}x", x.ratio()),
            ]);
        }
    };
    row("after kill -9, all", r.open_after_kill);
    let sub = |f: &dyn Fn(&KillRecord) -> bool| {
        Times::of(r.kills.iter().filter(|k| f(k)).map(|k| k.open_ms))
    };
    row(
        "  kill inside an index checkpoint",
        sub(&|k| k.in_checkpoint),
    );
    row("  kill inside a compaction", sub(&|k| k.in_compaction));
    row(
        "  kill elsewhere (writes only)",
        sub(&|k| !k.in_checkpoint && !k.in_compaction),
    );
    row("  index rebuilt from the log", sub(&|k| k.rebuilt_index));
    row("  index not rebuilt", sub(&|k| !k.rebuilt_index));
    row("clean (same store, after each recovery)", r.clean_open);
    for i in 1..t.column_count() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    let _ = writeln!(s, "{t}");

    let rebuilt: Vec<String> = r
        .kills
        .iter()
        .filter(|k| k.rebuilt_index)
        .map(|k| format!("{} ({} replayed)", ms(k.open_ms), k.replayed_writes))
        .collect();
    let _ = writeln!(
        s,
        "Index rebuilt from the whole log: {} of {} opens{}.",
        r.rebuilt,
        r.kills.len(),
        if rebuilt.is_empty() {
            String::new()
        } else {
            format!(": {}", rebuilt.join(", "))
        }
    );
    let _ = writeln!(
        s,
        "Replayed writes: median {}, max {}. Torn tails cut: {}. Not clean: {} of {}.",
        r.replayed_median,
        r.replayed_max,
        r.truncated,
        r.kills.iter().filter(|k| !k.was_clean).count(),
        r.kills.len(),
    );
    let mut states: Vec<(String, usize)> = Vec::new();
    for k in &r.kills {
        match states.iter_mut().find(|(n, _)| *n == k.slot_state) {
            Some((_, c)) => *c += 1,
            None => states.push((k.slot_state.clone(), 1)),
        }
    }
    let states: Vec<String> = states.iter().map(|(n, c)| format!("{n} {c}")).collect();
    let _ = writeln!(
        s,
        "Where the kills landed: slot state at the kill: {}; index sequence odd {}; inside a \
         checkpoint {}, inside a compaction {}; during the writers' lives {} compactions finished and the index grew {} \
         times (recovery opens grew it {} times). Writers: median {} puts before the kill \
         ({} puts/s).",
        states.join(", "),
        r.kills.iter().filter(|k| k.index_seq_odd).count(),
        r.in_checkpoint,
        r.in_compaction,
        r.compactions,
        r.index_growths_in_writer,
        r.index_growths_in_open,
        r.puts_median,
        fmt_rate(median_rate(&r.kills)),
    );
    let _ = writeln!(
        s,
        "Store: {} -> {} keys, file {} at the end; clean open of the fresh store {}; verify \
         took {} (median); the bench compacted it (untimed, between kills) {} times.",
        r.keys,
        last.map_or(r.keys, |k| k.keys_after),
        fmt_bytes(last.map_or(0, |k| k.file_bytes)),
        ms(r.first_clean_open_ms),
        ms(Times::of(r.kills.iter().map(|k| k.verify_ms)).median_ms),
        r.kills.iter().filter(|k| k.bench_compacted).count(),
    );
    if r.failures == 0 {
        let _ = writeln!(
            s,
            "Every recovered store passed Store::verify and held every acknowledged write \
             ({} of {}).",
            r.kills.len(),
            r.kills.len()
        );
    } else {
        let _ = writeln!(s, "FAILURES: {} recovered stores:", r.failures);
        for (i, k) in r.kills.iter().enumerate() {
            if let Some(f) = &k.failure {
                let _ = writeln!(s, "  kill {}: {f}", i + 1);
            }
        }
    }
    let _ = writeln!(s, "Wall time: {:.1} s.", r.wall_secs);
    s
}

fn median_rate(kills: &[KillRecord]) -> f64 {
    let mut r: Vec<u64> = kills
        .iter()
        .map(|k| (k.puts as f64 / (k.delay_ms.max(1) as f64 / 1e3)) as u64)
        .collect();
    r.sort_unstable();
    nearest_rank(&r, 0.5) as f64
}
