//! `mapkv crashtest`: the crash model of the spec run against temporary stores, using only
//! the public API and `mapkv::sim`:
//!
//! 1. kill -9: for each durability policy, a child process (this binary, `crashtest
//!    --child-writer ...`) writes and acknowledges each write on a pipe; it is killed
//!    with SIGKILL at a random moment, and the store must reopen to every acknowledged
//!    write plus at most the one in flight.
//! 2. power loss: for each policy, `mapkv::sim::power_loss` records what every sync made
//!    durable and checks random crash images (unsynced pages lost or torn, size changes
//!    lost) taken between calls and inside syncs: each must reopen to a prefix of the
//!    writes that holds every write the policy promised durable.
//! 3. damaged files: truncated, bit-flipped, zeroed, random and foreign files must be
//!    refused with a typed error or salvaged, never panic.
//!
//! Prints what it tried and found; returns `Ok(false)` on any violation.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mapkv::sim::{self, KillHarness, PowerLossConfig, PowerLossReport};
use mapkv::Durability;

/// Arguments of `mapkv crashtest`.
#[derive(Debug, clap::Args)]
pub struct CrashtestArgs {
    /// Kill -9 rounds per durability policy (default: as many as fit the time budget).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Stop after about this many seconds (default 45).
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
    /// Internal: run as the writer child of a kill -9 round on this store.
    #[arg(long, hide = true)]
    pub child_writer: Option<PathBuf>,
    /// Internal: the child's durability policy.
    #[arg(long, hide = true)]
    pub policy: Option<String>,
    /// Internal: the child's write stream seed.
    #[arg(long, hide = true)]
    pub child_seed: Option<u64>,
    /// Internal: the child's write limit.
    #[arg(long, hide = true)]
    pub max_writes: Option<u64>,
}

const POLICIES: [Durability; 4] = [
    Durability::None,
    Durability::Async,
    Durability::Periodic(Duration::from_millis(5)),
    Durability::Always,
];

/// Runs the torture test; `Ok(true)` if no violation was found.
pub fn run(args: &CrashtestArgs) -> Result<bool, String> {
    if let Some(path) = &args.child_writer {
        return child(args, path).map(|()| true);
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
        "mapkv crashtest: seed {seed}, about {seconds} s; stores in {}, power-loss images in {}",
        kill_dir.path().display(),
        sim_dir.path().display()
    );
    let mut violations: Vec<String> = Vec::new();

    // 1. kill -9: about 35% of the budget, split between the policies.
    println!("\n[1/3] kill -9 of a writer process, every durability policy");
    let per_policy = budget.mul_f64(0.35) / 4;
    let mut kill_total = (0u64, 0u64);
    for (i, &policy) in POLICIES.iter().enumerate() {
        let path = kill_dir.path().join(format!("kill-{i}.mkv"));
        let mut h = KillHarness::new(&path, policy, sim::Rng::derive(seed, 100 + i as u64));
        let until = Instant::now() + per_policy;
        let mut found = None;
        loop {
            let enough = match args.rounds {
                Some(r) => h.rounds >= u64::from(r),
                None => Instant::now() >= until && h.rounds >= 3,
            };
            if enough {
                break;
            }
            if let Err(e) = h.round(&mut spawn_child) {
                found = Some(e);
                break;
            }
        }
        println!(
            "  {:<14} {:>4} rounds, {:>6} writes acknowledged, in-flight write applied in {:>3} rounds, \
             {:>3} kills during open: {}",
            format!("{policy:?}"),
            h.rounds,
            h.acked,
            h.inflight_applied,
            h.killed_in_open,
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
    println!("\n[2/3] simulated power loss (mapkv::sim), every durability policy");
    let per_policy = budget.mul_f64(0.5) / 4;
    let mut pl_total = PowerLossReport::default();
    for (i, &policy) in POLICIES.iter().enumerate() {
        let policy = match policy {
            Durability::Periodic(_) => Durability::Periodic(Duration::from_millis(3)),
            p => p,
        };
        let until = Instant::now() + per_policy;
        let mut rep = PowerLossReport::default();
        let mut round = 0u64;
        // Three workloads in equal slices: many small keys (index growth, checkpoints);
        // few keys with large values (file growth, pwrite); fixed-size records (new
        // records line up with stale ones a crash left behind).
        while (Instant::now() < until || round < 3) && rep.violations.is_empty() {
            let mut cfg = PowerLossConfig::new(
                policy,
                sim::Rng::derive(seed, 200 + 16 * i as u64 + round),
                sim_dir.path(),
            );
            cfg.time_limit = Some((per_policy / 3).max(Duration::from_millis(300)));
            cfg.sessions = 1000;
            cfg.vary(round);
            match std::panic::catch_unwind(|| sim::power_loss(&cfg)) {
                Ok(r) => rep.merge(&r),
                Err(_) => rep.violations.push(format!(
                    "[{policy:?} seed {:#x}] PANIC inside the store",
                    cfg.seed
                )),
            }
            round += 1;
        }
        println!(
            "  {:<14} {:>3} sessions, {:>5} writes, {:>5} syncs, {:>4} crash points, {:>5} images checked \
             ({:>4} with every write), {:>2} compactions: {}",
            format!("{policy:?}"),
            rep.sessions,
            rep.writes,
            rep.syncs,
            rep.crash_points,
            rep.images,
            rep.images_complete,
            rep.compactions,
            if rep.violations.is_empty() { "ok" } else { "VIOLATION" }
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

    // 3. Damaged files: the rest of the budget (at least a few seconds).
    println!("\n[3/3] damaged files: truncated, bit-flipped, zeroed, random, other formats");
    let until = (start + budget).max(Instant::now() + Duration::from_secs(2));
    let mut drep = sim::DamageReport::default();
    let mut rng = sim::Rng::new(sim::Rng::derive(seed, 300));
    let mut good = Vec::new();
    let dpath = sim_dir.path().join("damaged.mkv");
    let mut i = 0u64;
    while Instant::now() < until {
        if i.is_multiple_of(40) {
            good = sim::sample_store(sim_dir.path(), 30 + rng.below(300), rng.next_u64())
                .map_err(|e| format!("building a sample store: {e}"))?;
        }
        let (bytes, what) = sim::damage(&good, &mut rng);
        sim::damage_round(&bytes, &what, &dpath, &mut drep);
        i += 1;
    }
    println!(
        "  {} damaged files, each opened normally and with salvage: {} refused with a typed \
         error, {} opened, {} salvaged, {} opened but damage found by reads/verify: {}",
        drep.files,
        drep.refused,
        drep.opened,
        drep.salvaged,
        drep.detected_later,
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

/// Starts a writer child: this binary, `crashtest --child-writer ...`.
fn spawn_child(
    path: &Path,
    policy: Durability,
    seed: u64,
    max: u64,
) -> std::io::Result<std::process::Child> {
    Command::new(std::env::current_exe()?)
        .arg("crashtest")
        .arg("--child-writer")
        .arg(path)
        .args(["--policy", &sim::policy_name(policy)])
        .args(["--child-seed", &seed.to_string()])
        .args(["--max-writes", &max.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// The writer child of a kill -9 round.
fn child(args: &CrashtestArgs, path: &Path) -> Result<(), String> {
    let policy = args
        .policy
        .as_deref()
        .and_then(sim::parse_policy)
        .ok_or("--child-writer needs --policy none|async|periodic:MS|always")?;
    let seed = args.child_seed.ok_or("--child-writer needs --child-seed")?;
    let max = args.max_writes.unwrap_or(5000);
    sim::child_writer(path, policy, seed, max, &mut std::io::stdout())
}
