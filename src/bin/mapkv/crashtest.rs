//! `mapkv crashtest`: the crash model of the spec run against temporary stores, using only
//! the public API and `mapkv::sim`:
//!
//! 1. kill -9: for each durability policy, `mapkv::sim::KillHarness` starts a child
//!    process (this binary, `mapkv crashtest` with the child's arguments in its
//!    environment) that writes and acknowledges each write on a pipe; it is killed with
//!    SIGKILL at a random moment, and the store must reopen to every acknowledged write
//!    plus at most the one in flight.
//! 2. power loss: for each policy, `mapkv::sim::power_loss_rounds` records what every
//!    sync made durable and checks random crash images (unsynced pages lost or torn, size
//!    changes lost) taken between calls and inside syncs: each must reopen to a prefix of
//!    the writes that holds every write the policy promised durable.
//! 3. damaged files: truncated, bit-flipped, zeroed, random and foreign files must be
//!    refused with a typed error or salvaged, never panic.
//! 4. resource faults: a second writer gets `Error::Locked` (a reader still opens); and
//!    for each policy, a writer child whose files may not grow past a limit
//!    (`RLIMIT_FSIZE`: a full disk, without root) writes until the growth fails. It must
//!    get an error, never a signal (`SIGBUS`), still read every write it made, and the
//!    store must reopen to all of them.
//!
//! Prints what it tried and found; returns `Ok(false)` on any violation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mapkv::sim::{self, KillHarness, PowerLossReport};
use mapkv::Durability;

/// Arguments of `mapkv crashtest`.
#[derive(Debug, clap::Args)]
pub struct CrashtestArgs {
    /// Kill -9 rounds per durability policy (default: as many as fit the time budget).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Time budget in seconds (default 45), shared out between the phases. It is a
    /// floor, not a cap: every phase runs each durability policy at least once (the
    /// power-loss phase each of its three workloads, a few seconds each), about 70 s on
    /// a 2-vCPU VM, and a budget beyond that runs more rounds.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Directory for the temporary stores (default: a fresh temporary directory; the
    /// power-loss images go to /dev/shm when it exists, since the simulator needs no real
    /// syncs).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the random choices (default: from the clock; printed, to reproduce a run).
    #[arg(long)]
    pub seed: Option<u64>,
}

const POLICIES: [Durability; 4] = [
    Durability::None,
    Durability::Async,
    Durability::Periodic(Duration::from_millis(5)),
    Durability::Always,
];

/// Runs the torture test; `Ok(true)` if no violation was found.
pub fn run(args: &CrashtestArgs) -> Result<bool, String> {
    // Started by a kill -9 round as its writer child.
    if let Some(r) = sim::child_writer_from_env() {
        return r.map(|()| true);
    }
    // Started by the resource faults as a writer on a full disk.
    if let Some(r) = disk_full_child_from_env() {
        return r;
    }
    let seconds = args.seconds.unwrap_or(45).max(3);
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let (kill_dir, sim_dir) = dirs(args.dir.as_deref())?;
    let start = Instant::now();
    let budget = Duration::from_secs(seconds);
    println!(
        "mapkv crashtest: seed {seed}, budget {seconds} s (every case runs at least once \
         whatever the budget); stores in {}, power-loss images in {}",
        kill_dir.path().display(),
        sim_dir.path().display()
    );
    let mut violations: Vec<String> = Vec::new();

    // 1. kill -9: about 35% of the budget, split between the policies.
    println!("\n[1/4] kill -9 of a writer process, every durability policy");
    let per_policy = budget.mul_f64(0.35) / 4;
    let mut kill_total = (0u64, 0u64);
    for (i, &policy) in POLICIES.iter().enumerate() {
        let path = kill_dir.path().join(format!("kill-{i}.mkv"));
        let mut h = KillHarness::new(&path, policy, sim::Rng::derive(seed, 100 + i as u64));
        let found = match args.rounds {
            Some(r) => h.run(None, u64::from(r), &mut child_command),
            None => h.run(Some(Instant::now() + per_policy), 3, &mut child_command),
        }
        .err();
        println!(
            "  {:<14} {}: {}",
            format!("{policy:?}"),
            h.summary(),
            if found.is_some() { "VIOLATION" } else { "ok" }
        );
        kill_total.0 += h.rounds;
        kill_total.1 += h.acked;
        if let Some(e) = found {
            println!("    {e}");
            violations.push(e);
        }
        let _ = std::fs::remove_file(&path);
    }

    // 2. Power loss: about 50% of the budget.
    println!("\n[2/4] simulated power loss (mapkv::sim), every durability policy");
    let per_policy = budget.mul_f64(0.5) / 4;
    let mut pl_total = PowerLossReport::default();
    for (i, &policy) in POLICIES.iter().enumerate() {
        let policy = match policy {
            Durability::Periodic(_) => Durability::Periodic(Duration::from_millis(3)),
            p => p,
        };
        // Three workloads in equal slices (`PowerLossConfig::vary`).
        let rep = sim::power_loss_rounds(
            policy,
            seed,
            200 + 16 * i as u64,
            sim_dir.path(),
            per_policy,
        );
        println!(
            "  {:<14} {}: {}",
            format!("{policy:?}"),
            rep.summary(),
            if rep.violations.is_empty() {
                "ok"
            } else {
                "VIOLATION"
            }
        );
        for v in rep.violations.iter().take(5) {
            println!("    {v}");
        }
        violations.extend(rep.violations.iter().cloned());
        pl_total.merge(&PowerLossReport {
            violations: Vec::new(),
            ..rep
        });
    }

    // 3. Damaged files: the rest of the budget (at least a few seconds), less the few
    //    seconds of the resource faults.
    println!("\n[3/4] damaged files: truncated, bit-flipped, zeroed, random, other formats");
    let until = (start + budget.saturating_sub(RESOURCE_FAULTS))
        .max(Instant::now() + Duration::from_secs(2));
    let mut rng = sim::Rng::new(sim::Rng::derive(seed, 300));
    let drep = sim::damage_rounds(sim_dir.path(), &mut rng, |_| Instant::now() < until)?;
    println!(
        "  {} damaged files, each opened normally and with salvage: {} refused with a typed \
         error, {} opened, {} salvaged, {} opened but damage found by reads/verify; \
         targeted flips reported, never read as missing or wrong: {} in buckets, {} in \
         records: {}",
        drep.files,
        drep.refused,
        drep.opened,
        drep.salvaged,
        drep.detected_later,
        drep.bucket_flips,
        drep.record_flips,
        if drep.violations.is_empty() {
            "ok"
        } else {
            "VIOLATION"
        }
    );
    for v in drep.violations.iter().take(5) {
        println!("    {v}");
    }
    violations.extend(drep.violations);

    // 4. Resource faults.
    println!("\n[4/4] resource faults: a second writer, a disk that fills up");
    let rv = resource_faults(kill_dir.path());
    for v in &rv {
        println!("    {v}");
    }
    violations.extend(rv);

    println!(
        "\nsummary: {} kill -9 rounds ({} acknowledged writes), {} power-loss images from {} crash \
         points, {} damaged files, {:.0} s: {} violation(s)",
        kill_total.0,
        kill_total.1,
        pl_total.images,
        pl_total.crash_points,
        drep.files,
        start.elapsed().as_secs_f64(),
        violations.len()
    );
    if !violations.is_empty() {
        println!("reproduce with: mapkv crashtest --seed {seed} --seconds {seconds}");
    }
    Ok(violations.is_empty())
}

/// Directories for the kill -9 stores and the simulator's images.
fn dirs(dir: Option<&Path>) -> Result<(tempfile::TempDir, tempfile::TempDir), String> {
    let mk = |base: &Path| {
        tempfile::Builder::new()
            .prefix("mapkv-crashtest")
            .tempdir_in(base)
            .map_err(|e| format!("creating a directory in {}: {e}", base.display()))
    };
    match dir {
        Some(d) => Ok((mk(d)?, mk(d)?)),
        None => {
            let kill = tempfile::Builder::new()
                .prefix("mapkv-crashtest")
                .tempdir()
                .map_err(|e| format!("creating a temporary directory: {e}"))?;
            let shm = Path::new("/dev/shm");
            let sim = if shm.is_dir() {
                mk(shm).or_else(|_| mk(&std::env::temp_dir()))?
            } else {
                mk(&std::env::temp_dir())?
            };
            Ok((kill, sim))
        }
    }
}

/// The writer child of a kill -9 round: this binary, `mapkv crashtest` (which finds the
/// child's arguments in its environment, `sim::child_writer_from_env`).
fn child_command() -> std::io::Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.arg("crashtest");
    Ok(c)
}

/// About how long the resource faults take (taken off the damaged files' share).
const RESOURCE_FAULTS: Duration = Duration::from_secs(3);
/// The environment variables that make `mapkv crashtest` a writer on a full disk.
const DISK_FULL_PATH: &str = "MAPKV_CRASHTEST_DISK_FULL_PATH";
const DISK_FULL_POLICY: &str = "MAPKV_CRASHTEST_DISK_FULL_POLICY";
/// The file size the disk-full child may not exceed.
const DISK_FULL_LIMIT: u64 = 24 << 20;
/// Value size of the disk-full child's writes.
const DISK_FULL_VALUE: usize = 1_000;

fn disk_full_key(i: u64) -> [u8; 8] {
    i.to_le_bytes()
}

fn disk_full_value(i: u64) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; DISK_FULL_VALUE];
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

/// Crash model item 4, with violations returned as messages.
fn resource_faults(dir: &Path) -> Vec<String> {
    let mut violations = Vec::new();
    // A second writer is refused; a reader opens beside the writer.
    let path = dir.join("locked.mkv");
    match mapkv::Store::open(&path, mapkv::Options::default()) {
        Ok(w) => {
            let second = mapkv::Store::open(&path, mapkv::Options::default());
            let reader = mapkv::Store::open(&path, mapkv::Options::default().read_only(true));
            let ok = matches!(second, Err(mapkv::Error::Locked { .. })) && reader.is_ok();
            println!(
                "  second writer: {}; reader beside the writer: {}: {}",
                match &second {
                    Err(e @ mapkv::Error::Locked { .. }) => format!("refused ({e})"),
                    Err(e) => format!("other error: {e}"),
                    Ok(_) => "opened".to_owned(),
                },
                if reader.is_ok() { "opened" } else { "refused" },
                if ok { "ok" } else { "VIOLATION" }
            );
            if !ok {
                violations.push("a second writer was not refused with Locked".to_owned());
            }
            drop((second, reader));
            if let Err(e) = w.close() {
                violations.push(format!("close after the Locked check: {e}"));
            }
        }
        Err(e) => violations.push(format!("opening {}: {e}", path.display())),
    }
    let _ = std::fs::remove_file(&path);
    // A full disk, per policy, in a child whose files may not grow past the limit.
    for (i, &policy) in POLICIES.iter().enumerate() {
        let path = dir.join(format!("full-{i}.mkv"));
        let label = format!("{policy:?}");
        match disk_full_round(&path, &label) {
            Ok(line) => println!("  {label:<14} disk full: {line}: ok"),
            Err(e) => {
                println!("  {label:<14} disk full: VIOLATION: {e}");
                violations.push(format!("{label}, disk full: {e}"));
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    violations
}

/// One disk-full round: the child writes until growth fails, then the store must reopen
/// (without the limit) to every write the child made.
fn disk_full_round(path: &Path, policy: &str) -> Result<String, String> {
    let out = child_command()
        .and_then(|mut c| {
            c.env(DISK_FULL_PATH, path)
                .env(DISK_FULL_POLICY, policy)
                .stderr(std::process::Stdio::inherit())
                .output()
        })
        .map_err(|e| format!("starting the child: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "the child ended with {} ({})",
            out.status,
            text.trim()
        ));
    }
    // "acked N: ERROR"
    let acked: u64 = text
        .strip_prefix("acked ")
        .and_then(|t| t.split(':').next())
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("unexpected child output {text:?}"))?;
    let store = mapkv::Store::open(path, mapkv::Options::default())
        .map_err(|e| format!("reopening after the full disk: {e}"))?;
    for i in 0..acked {
        match store.get(disk_full_key(i)) {
            Ok(Some(v)) if v == disk_full_value(i) => {}
            other => return Err(format!("write {i} of {acked} after reopening: {other:?}")),
        }
    }
    store
        .put(b"after", b"reopen")
        .map_err(|e| format!("a write after reopening: {e}"))?;
    store
        .close()
        .map_err(|e| format!("close after reopening: {e}"))?;
    Ok(format!(
        "{}, all {acked} writes there after reopening",
        text.trim()
    ))
}

/// The disk-full child, if this process is one: writes until a growth fails (it must be
/// an error, not a signal), then reads every write back. Prints `acked N: ERROR`.
fn disk_full_child_from_env() -> Option<Result<bool, String>> {
    let path = std::env::var_os(DISK_FULL_PATH)?;
    let policy = std::env::var(DISK_FULL_POLICY).ok()?;
    let policy = POLICIES
        .iter()
        .copied()
        .find(|p| format!("{p:?}") == policy)?;
    Some(disk_full_child(Path::new(&path), policy))
}

fn disk_full_child(path: &Path, policy: Durability) -> Result<bool, String> {
    crate::sys::limit_file_size(DISK_FULL_LIMIT).map_err(|e| format!("setrlimit: {e}"))?;
    let store = mapkv::Store::open(path, mapkv::Options::default().durability(policy))
        .map_err(|e| format!("open: {e}"))?;
    let mut acked = 0u64;
    let err = loop {
        if let Err(e) = store.put(disk_full_key(acked), disk_full_value(acked)) {
            break e;
        }
        acked += 1;
        if acked > 10 * DISK_FULL_LIMIT / DISK_FULL_VALUE as u64 {
            return Err(format!("{acked} writes and no error past the limit"));
        }
    };
    if !matches!(err, mapkv::Error::Io { .. }) {
        return Err(format!("the full disk gave {err:?}, not an I/O error"));
    }
    for i in 0..acked {
        match store.get(disk_full_key(i)) {
            Ok(Some(v)) if v == disk_full_value(i) => {}
            other => return Err(format!("write {i} of {acked} on the full disk: {other:?}")),
        }
    }
    println!("acked {acked}: {err}");
    // (Close may fail as well: no room for what it would write.)
    let _ = store.close();
    Ok(true)
}
