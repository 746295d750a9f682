//! The kill -9 loop: a writer child process acknowledges each write on a pipe and is
//! killed with SIGKILL at a random moment; the store must reopen to every acknowledged
//! write plus at most the one in flight.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Durability, Error, Options, Store};

use super::{Model, Rng, Workload};

/// Line a [`child_writer`] prints once the store is open.
pub const READY_LINE: &str = "MAPKV-SIM-READY";
/// Prefix of the line a [`child_writer`] prints after each acknowledged write.
pub const ACK_PREFIX: &str = "MAPKV-SIM-ACK ";

/// The workload of the kill -9 rounds (the same on both sides of the process boundary).
#[must_use]
pub fn kill_workload() -> Workload {
    Workload {
        keyspace: 400,
        large_prob: 0.005,
        large_value: 300 << 10,
        ..Workload::default()
    }
}

/// Parses a policy name: `none`, `async`, `periodic` (5 ms), `periodic:MS`, `always`.
#[must_use]
pub fn parse_policy(s: &str) -> Option<Durability> {
    match s {
        "none" => Some(Durability::None),
        "async" => Some(Durability::Async),
        "always" => Some(Durability::Always),
        "periodic" => Some(Durability::Periodic(Duration::from_millis(5))),
        _ => s
            .strip_prefix("periodic:")
            .and_then(|ms| ms.parse().ok())
            .map(|ms| Durability::Periodic(Duration::from_millis(ms))),
    }
}

/// The name [`parse_policy`] reads back.
#[must_use]
pub fn policy_name(d: Durability) -> String {
    match d {
        Durability::None => "none".into(),
        Durability::Async => "async".into(),
        Durability::Always => "always".into(),
        Durability::Periodic(t) => format!("periodic:{}", t.as_millis().max(1)),
    }
}

/// The child side of a kill -9 round: opens the store at `path`, prints [`READY_LINE`],
/// then applies writes `0, 1, ...` of stream `seed` ([`kill_workload`]), printing
/// `ACK_PREFIX i` after write `i` returned, until `max_writes`; then closes cleanly.
/// Every 400 writes it also compacts (so a kill can land inside a compaction). For even
/// seeds the store checkpoints every 48 changed keys (so a kill can land inside a
/// background checkpoint). Meant to be killed at a random moment by the parent
/// ([`KillHarness`]).
///
/// # Errors
/// A failed open or write (printed to stderr by the caller; the parent reports it).
pub fn child_writer(
    path: &Path,
    durability: Durability,
    seed: u64,
    max_writes: u64,
    out: &mut dyn std::io::Write,
) -> Result<(), String> {
    let mut opts = Options::default()
        .durability(durability)
        .initial_size(12 << 10);
    if seed.is_multiple_of(2) {
        opts = opts.checkpoint_keys(48);
    }
    let store = Store::open(path, opts).map_err(|e| format!("child open: {e}"))?;
    writeln!(out, "{READY_LINE}")
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    let wl = kill_workload();
    for i in 0..max_writes {
        wl.stream(seed, i)
            .apply(&store)
            .map_err(|e| format!("child write {i}: {e}"))?;
        // One short line per write(2): atomic on a pipe.
        writeln!(out, "{ACK_PREFIX}{i}")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
        if i % 400 == 399 {
            match store.compact() {
                Ok(()) | Err(Error::Unsupported(_)) => {}
                Err(e) => return Err(format!("child compact after write {i}: {e}")),
            }
        }
    }
    store.close().map_err(|e| format!("child close: {e}"))
}

/// Environment variables that carry a writer child's arguments from [`KillHarness::round`]
/// to [`child_writer_from_env`].
const CHILD_PATH: &str = "MAPKV_SIM_CHILD_PATH";
const CHILD_POLICY: &str = "MAPKV_SIM_CHILD_POLICY";
const CHILD_SEED: &str = "MAPKV_SIM_CHILD_SEED";
const CHILD_MAX: &str = "MAPKV_SIM_CHILD_MAX";

/// The writer child's entry point: if this process was started by
/// [`KillHarness::round`] (its arguments are in the environment), runs [`child_writer`]
/// on stdout and returns its result; otherwise returns `None` at once.
///
/// A driver calls it first thing in the role the harness re-executes (a test of the test
/// binary, `mapkv crashtest`) and exits with a failure status on `Some(Err(_))`, after
/// printing the error to stderr (the parent reports it).
#[must_use]
pub fn child_writer_from_env() -> Option<Result<(), String>> {
    let path = std::env::var_os(CHILD_PATH)?;
    let var = |name: &str| std::env::var(name).ok();
    let policy = var(CHILD_POLICY).and_then(|p| parse_policy(&p));
    let seed = var(CHILD_SEED).and_then(|s| s.parse().ok());
    let max = var(CHILD_MAX).and_then(|s| s.parse().ok());
    let (Some(policy), Some(seed), Some(max)) = (policy, seed, max) else {
        return Some(Err(format!(
            "bad writer child environment: {CHILD_POLICY}, {CHILD_SEED} and {CHILD_MAX} must \
             be set along with {CHILD_PATH}"
        )));
    };
    Some(child_writer(
        Path::new(&path),
        policy,
        seed,
        max,
        &mut std::io::stdout(),
    ))
}

/// Configuration and running totals of kill -9 rounds against one store file.
#[derive(Debug)]
pub struct KillHarness {
    /// Store under test.
    pub path: PathBuf,
    /// Policy the child writes with.
    pub durability: Durability,
    /// Most writes a child does before closing on its own.
    pub max_writes: u64,
    rng: Rng,
    model: Model,
    /// Rounds run.
    pub rounds: u64,
    /// Writes acknowledged by children, all rounds.
    pub acked: u64,
    /// Rounds in which the in-flight write turned out to be applied.
    pub inflight_applied: u64,
    /// Rounds killed before the child reported the store open (kill during recovery).
    pub killed_in_open: u64,
}

impl KillHarness {
    /// A harness for the store at `path` (removed first).
    #[must_use]
    pub fn new(path: &Path, durability: Durability, seed: u64) -> Self {
        let _ = std::fs::remove_file(path);
        KillHarness {
            path: path.to_path_buf(),
            durability,
            max_writes: 5000,
            rng: Rng::new(seed),
            model: Model::new(),
            rounds: 0,
            acked: 0,
            inflight_applied: 0,
            killed_in_open: 0,
        }
    }

    /// Runs rounds until at least `min_rounds` ran and `until` (if any) has passed; stops
    /// at the first violation. `command` is as for [`KillHarness::round`].
    ///
    /// # Errors
    /// The first violation found (or a harness failure), with the seed.
    pub fn run(
        &mut self,
        until: Option<Instant>,
        min_rounds: u64,
        command: &mut dyn FnMut() -> std::io::Result<Command>,
    ) -> Result<(), String> {
        let start = self.rounds;
        while self.rounds - start < min_rounds || until.is_some_and(|u| Instant::now() < u) {
            self.round(command)?;
        }
        Ok(())
    }

    /// One round: `command()` must return a command that starts this program in the role
    /// that calls [`child_writer_from_env`] first thing (a test binary re-executing one
    /// test, `mapkv crashtest`); the harness adds the child's arguments (environment
    /// variables) and pipes, and starts it. The child is killed (SIGKILL) at a random
    /// moment; then the store is opened (read-only or read-write, at random) and must hold
    /// every acknowledged write plus at most the one in flight.
    ///
    /// # Errors
    /// The violation found (or a harness failure), with the seed.
    pub fn round(
        &mut self,
        command: &mut dyn FnMut() -> std::io::Result<Command>,
    ) -> Result<(), String> {
        self.rounds += 1;
        let seed = self.rng.next_u64();
        let ctx = format!(
            "[kill -9 {:?} round {} seed {seed:#x}]",
            self.durability, self.rounds
        );
        let mut child = command()
            .map_err(|e| format!("{ctx} spawn: {e}"))?
            .env(CHILD_PATH, &self.path)
            .env(CHILD_POLICY, policy_name(self.durability))
            .env(CHILD_SEED, seed.to_string())
            .env(CHILD_MAX, self.max_writes.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{ctx} spawn: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or(format!("{ctx} child stdout not piped"))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.ends_with('\n') => {
                        if tx.send(line.trim_end().to_string()).is_err() {
                            break;
                        }
                    }
                    // A partial last line: the kill cut it; it acknowledges nothing.
                    Ok(_) => break,
                }
            }
        });
        // Kill after a random number of acknowledged writes (0 = possibly during open),
        // then a random extra delay, or at a deadline.
        let target = match self.rng.below(10) {
            0 => 0,
            1..=5 => self.rng.below(60),
            _ => self.rng.below(600),
        };
        let extra = Duration::from_micros(self.rng.below(3000));
        let deadline = Instant::now() + Duration::from_millis(400 + self.rng.below(400));
        let mut acked = 0u64;
        let mut ready = false;
        let mut exited_early = false;
        while acked < target || (target == 0 && !ready && self.rng.chance(0.5)) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(l) => {
                    ready |= l.ends_with(READY_LINE);
                    acked += u64::from(l.contains(ACK_PREFIX));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    exited_early = true;
                    break;
                }
            }
        }
        std::thread::sleep(extra);
        let _ = child.kill();
        let status = child.wait().map_err(|e| format!("{ctx} wait: {e}"))?;
        let _ = reader.join();
        // Lines are matched anywhere: a test harness may print a prefix without a newline.
        for l in rx.try_iter() {
            ready |= l.ends_with(READY_LINE);
            acked += u64::from(l.contains(ACK_PREFIX));
        }
        if !status.success() && !killed_by_signal(&status) {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(format!(
                "{ctx} child failed on its own ({status}): {}",
                err.trim()
            ));
        }
        if exited_early && !status.success() && acked < self.max_writes {
            return Err(format!(
                "{ctx} child stopped writing after {acked} writes ({status})"
            ));
        }
        if !ready {
            self.killed_in_open += 1;
        }
        self.acked += acked;
        // The model: acknowledged writes, plus the one that may have been in flight.
        let wl = kill_workload();
        let base = self.model.writes();
        for i in 0..=acked {
            self.model.apply(&wl.stream(seed, i));
        }
        let lo = base + usize::try_from(acked).unwrap_or(usize::MAX);
        // Killed before the store file was created: only the empty state is allowed, and a
        // read-only open of a missing file fails, so open read-write (creating it).
        let read_only = self.rng.chance(0.5) && self.path.exists();
        let store = Store::open(
            &self.path,
            Options::default()
                .read_only(read_only)
                .durability(Durability::None),
        )
        .map_err(|e| format!("{ctx} open after kill ({acked} writes acknowledged): {e}"))?;
        let p = self.model.check(&store, lo, lo + 1).map_err(|e| {
            format!("{ctx} after {acked} acknowledged writes (read_only={read_only}): {e}")
        })?;
        if p > lo {
            self.inflight_applied += 1;
        }
        if !read_only {
            store
                .verify()
                .map_err(|e| format!("{ctx} verify after kill: {e}"))?;
        }
        drop(store);
        self.model.rebase(p);
        Ok(())
    }

    /// One line of totals: rounds, acknowledged writes, rounds where the in-flight write
    /// was applied, kills during open.
    #[must_use]
    pub fn summary(&self) -> String {
        format!(
            "{:>4} rounds, {:>6} writes acknowledged, in-flight write applied in {:>3} rounds, \
             {:>3} kills during open",
            self.rounds, self.acked, self.inflight_applied, self.killed_in_open
        )
    }
}

fn killed_by_signal(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal().is_some()
}
