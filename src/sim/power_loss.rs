//! The power-loss loop: random sessions on a store with a [`Recorder`], crash points
//! between calls and inside syncs, and random crash images of each checked against the
//! [`Model`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Durability, Error, Options, Store};

use super::{Capture, Model, Recorder, Rng, Workload};

/// Configuration of [`power_loss`].
#[derive(Debug, Clone)]
pub struct PowerLossConfig {
    /// Durability policy of the store under test.
    pub durability: Durability,
    /// Seed of everything random.
    pub seed: u64,
    /// Directory for the store and the images (a tmpfs makes syncs free).
    pub dir: PathBuf,
    /// Sessions (open → writes → crash or clean close).
    pub sessions: u32,
    /// Writes per session (at most).
    pub writes_per_session: u32,
    /// Crash images built and checked per crash point.
    pub images_per_capture: u32,
    /// Crash points sampled inside syncs per session (at most).
    pub captures_per_session: usize,
    /// Initial file size (small values force growth and index growth).
    pub initial_size: u64,
    /// The write mix.
    pub workload: Workload,
    /// Stop early (between sessions) after this long.
    pub time_limit: Option<Duration>,
    /// Also call `compact()` now and then (skipped if the store says Unsupported).
    pub compact: bool,
    /// [`Options::checkpoint_keys`] of the store: small values make background
    /// checkpoints (and index growth) run, and crash points land in them, many times per
    /// session.
    pub checkpoint_keys: usize,
}

impl PowerLossConfig {
    /// A reasonable configuration for `durability` in `dir`.
    #[must_use]
    pub fn new(durability: Durability, seed: u64, dir: &Path) -> Self {
        PowerLossConfig {
            durability,
            seed,
            dir: dir.to_path_buf(),
            sessions: 12,
            writes_per_session: 150,
            images_per_capture: 20,
            captures_per_session: 6,
            initial_size: 12 << 10,
            workload: Workload::default(),
            time_limit: None,
            compact: true,
            checkpoint_keys: 40,
        }
    }

    /// Switches to one of three workloads by `round % 3`: the default mix (0); few keys
    /// with large values (1: file growth, the `pwrite` path); records of one fixed size
    /// (2: new records line up with stale ones a crash left behind).
    pub fn vary(&mut self, round: u64) {
        match round % 3 {
            1 => {
                self.workload = Workload {
                    keyspace: 40,
                    large_prob: 0.08,
                    large_value: 300 << 10,
                    ..Workload::default()
                };
                self.writes_per_session = 40;
            }
            2 => {
                self.workload = Workload {
                    keyspace: 300,
                    fixed_size: Some(100),
                    ..Workload::default()
                };
            }
            _ => {}
        }
    }
}

/// What [`power_loss`] (or [`power_loss_rounds`]) did and found.
#[derive(Debug, Clone, Default)]
pub struct PowerLossReport {
    /// Runs of [`power_loss`] (one per report it returns; summed by `merge`).
    pub runs: u64,
    /// Sessions run.
    pub sessions: u64,
    /// Writes acknowledged.
    pub writes: u64,
    /// Syncs the store reported.
    pub syncs: u64,
    /// Crash points captured (inside syncs and between calls).
    pub crash_points: u64,
    /// Crash images opened and checked.
    pub images: u64,
    /// Images whose recovered state lost nothing the driver had written (the rest
    /// recovered an older allowed prefix).
    pub images_complete: u64,
    /// Compactions done.
    pub compactions: u64,
    /// Largest index seen (bytes; the store starts with one 4 KiB bucket and the index
    /// doubles at checkpoints as keys accumulate).
    pub max_index_bytes: u64,
    /// Violations of the contract, each with the seed and enough context to reproduce.
    pub violations: Vec<String>,
}

impl PowerLossReport {
    /// Adds `other`'s counts and violations to `self`.
    pub fn merge(&mut self, other: &PowerLossReport) {
        self.runs += other.runs;
        self.sessions += other.sessions;
        self.writes += other.writes;
        self.syncs += other.syncs;
        self.crash_points += other.crash_points;
        self.images += other.images;
        self.images_complete += other.images_complete;
        self.compactions += other.compactions;
        self.max_index_bytes = self.max_index_bytes.max(other.max_index_bytes);
        self.violations.extend(other.violations.iter().cloned());
    }

    /// One line of totals: sessions, writes, syncs, crash points, images checked (and how
    /// many recovered every write), compactions.
    #[must_use]
    pub fn summary(&self) -> String {
        format!(
            "{:>3} sessions, {:>5} writes, {:>5} syncs, {:>4} crash points, {:>5} images checked \
             ({:>4} with every write), {:>2} compactions",
            self.sessions,
            self.writes,
            self.syncs,
            self.crash_points,
            self.images,
            self.images_complete,
            self.compactions
        )
    }
}

/// Opens `image` (written to `img_path`) with normal options and checks that it holds a
/// prefix of `model` in `lo..=hi`; also checks `verify()` and that the recovered store
/// takes a write and reopens cleanly. Returns the prefix.
///
/// # Errors
/// A description of the violation.
pub fn check_image(
    image: &[u8],
    img_path: &Path,
    model: &Model,
    lo: usize,
    hi: usize,
) -> Result<usize, String> {
    let _ = std::fs::remove_file(img_path);
    std::fs::write(img_path, image).map_err(|e| format!("writing image: {e}"))?;
    let opts = Options::default().durability(Durability::None);
    let store = Store::open(img_path, opts.clone())
        .map_err(|e| format!("crash image does not open: {e}"))?;
    // Recovery protocol, step 5: nothing but zeros may follow the log's end, or appends
    // could later line up with stale records and bring lost writes back.
    let end = usize::try_from(store.stats().log_end).unwrap_or(usize::MAX);
    let file = std::fs::read(img_path).map_err(|e| format!("reading the recovered image: {e}"))?;
    if let Some(i) = file.iter().skip(end).position(|&b| b != 0) {
        return Err(format!(
            "after recovery, byte {} past the log end {end} is not zero: stale data that a later \
             append could make reachable again",
            end + i
        ));
    }
    let p = model.check(&store, lo, hi)?;
    store
        .verify()
        .map_err(|e| format!("verify() after recovery to prefix {p}: {e}"))?;
    // The recovered store must keep working: a write, a clean close, a clean reopen.
    let marker = b"\xffsim-marker";
    store
        .put(marker, b"1")
        .map_err(|e| format!("put after recovery: {e}"))?;
    store
        .close()
        .map_err(|e| format!("close after recovery: {e}"))?;
    let store = Store::open(img_path, opts).map_err(|e| format!("reopen after recovery: {e}"))?;
    if store
        .get(marker)
        .map_err(|e| format!("get after reopen: {e}"))?
        != Some(b"1".to_vec())
    {
        return Err("a write made after recovery was lost by a clean close".into());
    }
    store
        .delete(marker)
        .map_err(|e| format!("delete after reopen: {e}"))?;
    model
        .check(&store, p, p)
        .map_err(|e| format!("after reopen: {e}"))?;
    drop(store);
    Ok(p)
}

struct Session<'a> {
    cfg: &'a PowerLossConfig,
    rng: Rng,
    rec: Arc<Recorder>,
    model: Model,
    path: PathBuf,
    img: PathBuf,
    rep: PowerLossReport,
    deadline: Option<Instant>,
}

impl Session<'_> {
    fn open(&self) -> crate::Result<Store> {
        let opts = Options::default()
            .durability(self.cfg.durability)
            .initial_size(self.cfg.initial_size)
            .checkpoint_keys(self.cfg.checkpoint_keys);
        Store::open(&self.path, self.rec.observe(opts))
    }

    fn violation(&mut self, what: &str, detail: &str) {
        self.rep.violations.push(format!(
            "[{:?} seed {:#x} session {}] {what}: {detail}",
            self.cfg.durability, self.cfg.seed, self.rep.sessions
        ));
    }

    /// Checks `n` images of `c`; returns one (image, prefix) to continue from.
    fn check_capture(&mut self, c: &Capture, n: u32, want_boot: bool) -> Option<(Vec<u8>, usize)> {
        self.rep.crash_points += 1;
        let lo = usize::try_from(c.min_writes).unwrap_or(usize::MAX);
        let hi = usize::try_from(c.max_writes).unwrap_or(usize::MAX);
        let mut boot = None;
        let pick = self.rng.below(u64::from(n.max(1)));
        for i in 0..n {
            if self
                .deadline
                .is_some_and(|d| Instant::now() > d + Duration::from_secs(30))
            {
                break;
            }
            let image = c.random_image(&mut self.rng);
            self.rep.images += 1;
            match check_image(&image, &self.img, &self.model, lo, hi) {
                Ok(p) => {
                    if p == self.model.writes() {
                        self.rep.images_complete += 1;
                    }
                    if want_boot && u64::from(i) == pick {
                        boot = Some((image, p));
                    }
                }
                Err(e) => {
                    let keep = self.cfg.dir.join(format!(
                        "violation-{:x}-{}-{}.img",
                        self.cfg.seed, self.rep.sessions, self.rep.images
                    ));
                    let _ = std::fs::write(&keep, &image);
                    let during = c
                        .during
                        .map_or("between calls".to_string(), |e| format!("during {e:?}"));
                    self.violation(
                        &format!(
                            "image {} (crash {during}, sync #{}, kept at {})",
                            self.rep.images,
                            c.sync_no,
                            keep.display()
                        ),
                        &e,
                    );
                    if self.rep.violations.len() > 20 {
                        return None;
                    }
                }
            }
        }
        boot
    }
}

/// Runs the power-loss simulation described by `cfg` (see the [`sim`](super) docs): sessions of
/// random writes, flushes, compactions and clean reopens on a store with a [`Recorder`];
/// crash points inside syncs and between calls; for each, random crash images opened and
/// checked against the [`Model`]; each session but the first starts from a crash image
/// (or a clean close) of the previous one.
#[must_use]
pub fn power_loss(cfg: &PowerLossConfig) -> PowerLossReport {
    let start = Instant::now();
    let path = cfg.dir.join(format!("pl-{:x}.mkv", cfg.seed));
    let img = cfg.dir.join(format!("pl-{:x}.img", cfg.seed));
    let _ = std::fs::remove_file(&path);
    let rec = Arc::new(Recorder::new(cfg.durability, Rng::derive(cfg.seed, 1)));
    let mut s = Session {
        cfg,
        rng: Rng::new(cfg.seed),
        rec,
        model: Model::new(),
        path,
        img,
        rep: PowerLossReport {
            runs: 1,
            ..PowerLossReport::default()
        },
        deadline: cfg.time_limit.map(|t| start + t),
    };
    let mut unsupported_compact = !cfg.compact;
    for _ in 0..cfg.sessions {
        if s.deadline.is_some_and(|d| Instant::now() > d) || s.rep.violations.len() > 20 {
            break;
        }
        s.rep.sessions += 1;
        if let Err(e) = s.rec.baseline(&s.path) {
            s.violation("baseline", &e.to_string());
            break;
        }
        let capture_rate = [0.05, 0.2, 0.5][s.rng.index(3)];
        s.rec
            .capture_in_syncs(capture_rate, cfg.captures_per_session);
        let store = match s.open() {
            Ok(st) => st,
            Err(e) => {
                s.violation("open of the store failed", &e.to_string());
                break;
            }
        };
        // The creation (or a recovery that changed nothing) is not reported: declare it.
        let _ = s.rec.mark_durable();
        if let Err(e) = s.model.check(&store, 0, 0) {
            s.violation(
                "state after (re)open differs from the recovered image's state",
                &e,
            );
            break;
        }
        let mut store = Some(store);
        let mut between: Vec<Capture> = Vec::new();
        let n = 1 + s.rng.below(u64::from(cfg.writes_per_session));
        let mut failed = false;
        for _ in 0..n {
            let st = store.as_ref().expect("store is open inside the loop");
            let roll = s.rng.below(1000);
            if roll < 15 {
                match st.flush() {
                    Ok(()) => s.rec.flushed(),
                    Err(e) => {
                        s.violation("flush failed", &e.to_string());
                        failed = true;
                        break;
                    }
                }
            } else if roll < 20 && !unsupported_compact {
                match st.compact() {
                    Ok(()) => s.rep.compactions += 1,
                    Err(Error::Unsupported(_)) => unsupported_compact = true,
                    Err(e) => {
                        s.violation("compact failed", &e.to_string());
                        failed = true;
                        break;
                    }
                }
            } else if roll < 28 {
                // Clean close and reopen: a checkpoint, with crash points inside it.
                let st = store.take().expect("open");
                match st.close() {
                    Ok(()) => s.rec.flushed(),
                    Err(e) => {
                        s.violation("close failed", &e.to_string());
                        failed = true;
                        break;
                    }
                }
                match s.open() {
                    Ok(st) => store = Some(st),
                    Err(e) => {
                        s.violation("reopen after a clean close failed", &e.to_string());
                        failed = true;
                        break;
                    }
                }
            } else if roll < 36 && between.len() < 3 {
                match s.rec.crash_point() {
                    Ok(c) => between.push(c),
                    Err(e) => s.violation("crash point", &e.to_string()),
                }
            } else {
                let w = cfg.workload.next(&mut s.rng);
                s.rec.begin_write();
                s.model.apply(&w);
                match w.apply(st) {
                    Ok(()) => {
                        s.rec.ack_write();
                        s.rep.writes += 1;
                    }
                    Err(e) => {
                        s.violation("write failed", &e.to_string());
                        failed = true;
                        break;
                    }
                }
            }
        }
        if failed {
            break;
        }
        // End of session: a power loss now, or a clean close.
        let crash = s.rng.chance(0.75);
        let final_capture = if crash {
            match s.rec.crash_point() {
                Ok(c) => Some(c),
                Err(e) => {
                    s.violation("crash point", &e.to_string());
                    break;
                }
            }
        } else {
            None
        };
        if let Some(st) = store.take() {
            s.rep.max_index_bytes = s.rep.max_index_bytes.max(st.stats().index_bytes);
            match st.close() {
                Ok(()) => s.rec.flushed(),
                Err(e) => s.violation("close failed", &e.to_string()),
            }
        }
        s.rep.syncs = s.rec.syncs();
        for p in s.rec.problems() {
            s.violation("sync report", &p);
        }
        let mut caps = s.rec.take_captures();
        caps.append(&mut between);
        for c in &caps {
            s.check_capture(c, cfg.images_per_capture, false);
        }
        if let Some(c) = final_capture {
            match s.check_capture(&c, cfg.images_per_capture.max(1), true) {
                Some((image, p)) => {
                    if let Err(e) = std::fs::write(&s.path, &image) {
                        s.violation("writing the boot image", &e.to_string());
                        break;
                    }
                    s.model.rebase(p);
                }
                None => break,
            }
        } else {
            let all = s.model.writes();
            s.model.rebase(all);
        }
    }
    let _ = std::fs::remove_file(&s.path);
    let _ = std::fs::remove_file(&s.img);
    s.rep
}

/// Runs [`power_loss`] for `durability` again and again for about `budget` (at least three
/// runs), stopping at the first run that finds a violation, and returns the merged report.
/// Run `r` (from 0) is seeded with `Rng::derive(seed, first_round + r)` and uses workload
/// `r % 3` ([`PowerLossConfig::vary`]), each for about a third of the budget: many small
/// keys (index growth, checkpoints); few keys with large values (file growth, the `pwrite`
/// path); fixed-size records (new records line up with stale ones a crash left behind).
/// A panic inside a run is caught and reported as a violation.
#[must_use]
pub fn power_loss_rounds(
    durability: Durability,
    seed: u64,
    first_round: u64,
    dir: &Path,
    budget: Duration,
) -> PowerLossReport {
    let until = Instant::now() + budget;
    let mut rep = PowerLossReport::default();
    let mut round = 0u64;
    while (Instant::now() < until || round < 3) && rep.violations.is_empty() {
        let mut cfg = PowerLossConfig::new(durability, Rng::derive(seed, first_round + round), dir);
        cfg.time_limit = Some((budget / 3).max(Duration::from_millis(300)));
        cfg.sessions = 1000;
        cfg.vary(round);
        match std::panic::catch_unwind(|| power_loss(&cfg)) {
            Ok(r) => rep.merge(&r),
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                rep.runs += 1;
                rep.violations.push(format!(
                    "[{durability:?} seed {:#x}] PANIC inside the store: {msg}",
                    cfg.seed
                ));
            }
        }
        round += 1;
    }
    rep
}
