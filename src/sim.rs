//! Power-loss simulation: turn what a store made durable into crash images, and check that
//! a store recovered from one holds an allowed state.
//!
//! The crash model (see `SPEC.md`, "Crash model"): after power loss the file holds its
//! content as of the last completed sync, plus an arbitrary subset of the 4 KiB pages
//! written since; any such page may be torn (each 512-byte sector old or new
//! independently, and a sector being changed may hold garbage in its changed bytes); a
//! size change not yet made durable may be lost.
//!
//! The pieces:
//!
//! * [`Recorder`] is a [`SyncObserver`]. Install it with [`Recorder::observe`]. On every
//!   sync the store reports, it copies the bytes that the sync made durable from the file
//!   into its *durable image* (the whole file for [`SyncEvent::File`], just the range for
//!   [`SyncEvent::Range`]). It can also *capture* crash points inside sync callbacks (so a
//!   crash can land between two steps of the store's checkpoint protocol, which no caller
//!   can otherwise observe), and [`Recorder::crash_point`] captures one on demand.
//! * A [`Capture`] holds the durable image and the live file at a crash point, plus the
//!   range of write counts the recovered store may hold. [`Capture::random_image`] and
//!   [`Capture::image`] build crash images from it.
//! * [`Model`] is the reference: the writes applied in order, and [`Model::check`] tells
//!   whether a reopened store equals the state after some prefix of them within a range.
//! * [`power_loss`] runs the whole loop (random workload, captures, images, checks) and
//!   [`KillHarness`] / [`child_writer`] the kill -9 loop; the integration tests, the fuzz
//!   targets and `mapkv crashtest` are thin drivers over these.
//!
//! Everything is deterministic from a seed ([`Rng`] is a splitmix64 generator), except
//! where real time is involved (kill timing, the `Periodic` flusher thread).
//!
//! # Precision and limits
//!
//! The recorder reads the file when the store reports a sync, *after* the sync returned.
//! With one thread driving the store (the store's own calls happen on that thread), the
//! bytes read are exactly the bytes the sync made durable. A sync reported from another
//! thread (the `Periodic` flusher) can race with the writer: the recorder may then record
//! a page in a newer state than was synced. Every page state it records did exist, so the
//! images stay legal crash states; for such syncs the promised-durable count is the number
//! of writes acknowledged before that thread's previous sync, which is conservative.
//! Syncs the store does not report (creating a new store) are covered by
//! [`Recorder::baseline`], which declares the file's current content durable.
//!
//! Set `MAPKV_SIM_TRACE=1` to print every sync the recorder sees to stderr.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::format::{PAGE, SECTOR};
use crate::{Batch, Durability, Error, Options, Store, SyncEvent, SyncObserver};

// ---------------------------------------------------------------------------------------
// Random numbers
// ---------------------------------------------------------------------------------------

/// A small deterministic pseudo-random generator (splitmix64). Not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed` (any value, including 0).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed ^ 0x6a09_e667_f3bc_c908,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A `usize` in `0..n` (0 if `n` is 0).
    pub fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }

    /// True with probability `p` (clamped to 0..=1).
    pub fn chance(&mut self, p: f64) -> bool {
        // 53 random bits give a uniform float in [0, 1).
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    /// A derived seed for sub-task `i`, independent of how much this generator was used.
    #[must_use]
    pub fn derive(seed: u64, i: u64) -> u64 {
        Rng::new(seed ^ i.wrapping_mul(0xd1b5_4a32_d192_ed03)).next_u64()
    }
}

// ---------------------------------------------------------------------------------------
// Writes and the reference model
// ---------------------------------------------------------------------------------------

/// One write as the store counts them: a put, a delete, or a whole batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// `Store::put(key, value)`.
    Put(Vec<u8>, Vec<u8>),
    /// `Store::delete(key)`.
    Delete(Vec<u8>),
    /// `Store::write(batch)`: `Some(value)` is a put, `None` a delete, applied in order.
    Batch(Vec<(Vec<u8>, Option<Vec<u8>>)>),
}

impl Write {
    /// Applies the write to `store`.
    ///
    /// # Errors
    /// Whatever the store returns.
    pub fn apply(&self, store: &Store) -> crate::Result<()> {
        match self {
            Write::Put(k, v) => store.put(k, v),
            Write::Delete(k) => store.delete(k).map(drop),
            Write::Batch(ops) => {
                let mut b = Batch::new();
                for (k, v) in ops {
                    match v {
                        Some(v) => b.put(k, v),
                        None => b.delete(k),
                    };
                }
                store.write(&b)
            }
        }
    }

    /// Calls `f` for each operation in order: `(key, Some(value))` for a put,
    /// `(key, None)` for a delete. (A delete of a missing key changes nothing and the
    /// store appends nothing for it; the model still counts it as a write, an identity.)
    fn for_each(&self, mut f: impl FnMut(&[u8], Option<&[u8]>)) {
        match self {
            Write::Put(k, v) => f(k, Some(v)),
            Write::Delete(k) => f(k, None),
            Write::Batch(ops) => {
                for (k, v) in ops {
                    f(k, v.as_deref());
                }
            }
        }
    }

    /// Approximate bytes the write appends to the log.
    #[must_use]
    pub fn size(&self) -> usize {
        let mut n = 0;
        self.for_each(|k, v| n += 16 + k.len() + v.map_or(0, <[u8]>::len));
        n
    }
}

/// A key → value map: a state of the store.
pub type State = BTreeMap<Vec<u8>, Vec<u8>>;

fn pair_hash(k: &[u8], v: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    k.hash(&mut h);
    v.hash(&mut h);
    h.finish()
}

/// Order-independent hash of a whole state (sum of pair hashes), updatable in O(1).
fn state_hash(s: &State) -> u64 {
    s.iter()
        .fold(0u64, |a, (k, v)| a.wrapping_add(pair_hash(k, v)))
}

/// The reference model: a base state and the writes applied after it, in order, with the
/// hash of the state after every prefix, so a recovered store can be matched to a prefix
/// quickly.
#[derive(Debug, Clone, Default)]
pub struct Model {
    base: State,
    writes: Vec<Write>,
    /// `hashes[p]` = hash of the state after the first `p` writes.
    hashes: Vec<u64>,
    cur: State,
    cur_hash: u64,
}

impl Model {
    /// A model starting from the empty store.
    #[must_use]
    pub fn new() -> Self {
        Model::from_state(State::new())
    }

    /// A model starting from `base`.
    #[must_use]
    pub fn from_state(base: State) -> Self {
        let h = state_hash(&base);
        Model {
            cur: base.clone(),
            base,
            writes: Vec::new(),
            hashes: vec![h],
            cur_hash: h,
        }
    }

    /// Number of writes applied since the base state.
    #[must_use]
    pub fn writes(&self) -> usize {
        self.writes.len()
    }

    /// Write `i` (0-based) since the base state.
    #[must_use]
    pub fn write_at(&self, i: usize) -> Option<&Write> {
        self.writes.get(i)
    }

    /// The state after every write so far.
    #[must_use]
    pub fn current(&self) -> &State {
        &self.cur
    }

    /// Records `w` as the next write.
    pub fn apply(&mut self, w: &Write) {
        let (cur, h) = (&mut self.cur, &mut self.cur_hash);
        w.for_each(|k, v| {
            if let Some(old) = cur.get(k) {
                *h = h.wrapping_sub(pair_hash(k, old));
            }
            match v {
                Some(v) => {
                    *h = h.wrapping_add(pair_hash(k, v));
                    cur.insert(k.to_vec(), v.to_vec());
                }
                None => {
                    cur.remove(k);
                }
            }
        });
        self.writes.push(w.clone());
        self.hashes.push(self.cur_hash);
    }

    /// The state after the first `p` writes (clamped to the number of writes).
    #[must_use]
    pub fn state_at(&self, p: usize) -> State {
        if p >= self.writes.len() {
            return self.cur.clone();
        }
        let mut s = self.base.clone();
        for w in &self.writes[..p] {
            w.for_each(|k, v| match v {
                Some(v) => {
                    s.insert(k.to_vec(), v.to_vec());
                }
                None => {
                    s.remove(k);
                }
            });
        }
        s
    }

    /// Makes the state after `p` writes the new base (after a crash recovered to it).
    pub fn rebase(&mut self, p: usize) {
        *self = Model::from_state(self.state_at(p));
    }

    /// Drops every write after the first `p` (a write that failed or was never done).
    pub fn truncate(&mut self, p: usize) {
        if p < self.writes.len() {
            let base = std::mem::take(&mut self.base);
            let writes: Vec<Write> = self.writes.drain(..p).collect();
            *self = Model::from_state(base);
            for w in &writes {
                self.apply(w);
            }
        }
    }

    /// Checks that `store` holds exactly the state after `p` writes for some `p` in
    /// `lo..=hi`, reading it both by iteration and by point lookups. Returns that `p`.
    ///
    /// # Errors
    /// A description of the violation: which prefix (if any) the store matches instead,
    /// and a few differing keys.
    pub fn check(&self, store: &Store, lo: usize, hi: usize) -> Result<usize, String> {
        let got = read_all(store)?;
        let p = self.match_state(&got, lo, hi)?;
        self.check_lookups(store, p)?;
        Ok(p)
    }

    /// Like [`Model::check`] but for a state already read out of a store.
    ///
    /// # Errors
    /// As for [`Model::check`].
    pub fn match_state(&self, got: &State, lo: usize, hi: usize) -> Result<usize, String> {
        let hi = hi.min(self.writes.len());
        let h = state_hash(got);
        for p in lo..=hi {
            if self.hashes[p] == h && self.state_at(p) == *got {
                return Ok(p);
            }
        }
        // Diagnose: does it match a prefix outside the allowed range?
        let outside =
            (0..=self.writes.len()).find(|&p| self.hashes[p] == h && self.state_at(p) == *got);
        let near = self.state_at(lo.min(self.writes.len()));
        let mut diffs = Vec::new();
        for (k, v) in got {
            if near.get(k) != Some(v) {
                diffs.push(format!(
                    "{}: store has {}, prefix {lo} has {}",
                    show(k),
                    show(v),
                    near.get(k).map_or("nothing".into(), |v| show(v))
                ));
            }
        }
        for (k, v) in &near {
            if !got.contains_key(k) {
                diffs.push(format!(
                    "{}: missing from store, prefix {lo} has {}",
                    show(k),
                    show(v)
                ));
            }
        }
        diffs.truncate(4);
        Err(match outside {
            Some(p) => format!(
                "store holds the state after write {p}, outside the allowed {lo}..={hi} (of {} \
                 writes); first differences vs {lo}: {}",
                self.writes.len(),
                diffs.join("; ")
            ),
            None => format!(
                "store ({} keys) matches no prefix of the {} writes (allowed {lo}..={hi}): a mix, \
                 a torn value or a resurrected key; first differences vs prefix {lo}: {}",
                got.len(),
                self.writes.len(),
                diffs.join("; ")
            ),
        })
    }

    /// Point lookups: every key of prefix `p` has its value, every other key ever touched
    /// is absent.
    fn check_lookups(&self, store: &Store, p: usize) -> Result<(), String> {
        let want = self.state_at(p);
        for (k, v) in &want {
            match store.get(k) {
                Ok(Some(g)) if g == *v => {}
                other => {
                    return Err(format!(
                        "get({}) = {other:?}, but iteration (and prefix {p}) has {}",
                        show(k),
                        show(v)
                    ))
                }
            }
        }
        let mut touched = BTreeSet::new();
        for w in &self.writes {
            w.for_each(|k, _| {
                touched.insert(k.to_vec());
            });
        }
        touched.extend(self.base.keys().cloned());
        for k in touched.iter().filter(|k| !want.contains_key(*k)) {
            match store.get(k) {
                Ok(None) => {}
                other => {
                    return Err(format!(
                        "get({}) = {other:?}: a key absent in prefix {p} (deleted or never \
                         written) is visible",
                        show(k)
                    ))
                }
            }
        }
        if store.len() != want.len() {
            return Err(format!(
                "len() = {} but the store holds {} keys",
                store.len(),
                want.len()
            ));
        }
        Ok(())
    }
}

/// Reads every pair of `store` by iteration.
///
/// # Errors
/// An iteration error, or a key yielded twice.
pub fn read_all(store: &Store) -> Result<State, String> {
    let mut got = State::new();
    for item in store.iter() {
        let (k, v) = item.map_err(|e| format!("iteration failed: {e}"))?;
        if got.insert(k.clone(), v).is_some() {
            return Err(format!("iteration yielded key {} twice", show(&k)));
        }
    }
    if store.len() != got.len() {
        return Err(format!(
            "len() = {} but iteration yields {} pairs",
            store.len(),
            got.len()
        ));
    }
    Ok(got)
}

/// Short printable form of a key or value.
fn show(b: &[u8]) -> String {
    if b.len() <= 24 && b.iter().all(|c| c.is_ascii_graphic()) {
        format!("{:?}", String::from_utf8_lossy(b))
    } else {
        let h = pair_hash(b, b"") & 0xffff_ffff;
        format!("<{} bytes, hash {h:08x}>", b.len())
    }
}

/// Shape of a random workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Keys are drawn from this many distinct keys (plus the empty key).
    pub keyspace: u64,
    /// Probability that a write is a delete.
    pub delete_prob: f64,
    /// Probability that a write is a batch (of 2..=8 operations).
    pub batch_prob: f64,
    /// Probability that a value is large (`large_value` bytes, spanning pages; values of
    /// 256 KiB and more take the store's `pwrite` path in every policy).
    pub large_prob: f64,
    /// Size of a large value.
    pub large_value: usize,
    /// `Some(n)`: every write is a put of an `n`-byte value under a key of fixed length,
    /// so every record has the same size. After a crash, new records then line up exactly
    /// with stale ones from before it, which is what it takes for a recovery that leaves
    /// stale bytes behind to resurrect lost writes.
    pub fixed_size: Option<usize>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            keyspace: 600,
            delete_prob: 0.15,
            batch_prob: 0.15,
            large_prob: 0.01,
            large_value: 9000,
            fixed_size: None,
        }
    }
}

impl Workload {
    fn key(&self, rng: &mut Rng) -> Vec<u8> {
        match rng.below(100) {
            0 => Vec::new(),
            1 => {
                let mut k = format!("long-{}-", rng.below(8)).into_bytes();
                k.resize(300, b'x');
                k
            }
            _ => format!("k{:06}", rng.below(self.keyspace)).into_bytes(),
        }
    }

    fn value(&self, rng: &mut Rng) -> Vec<u8> {
        let len = if rng.chance(self.large_prob) {
            self.large_value
        } else {
            match rng.below(10) {
                0 => 0,
                1..=6 => 1 + rng.index(40),
                7 | 8 => 40 + rng.index(400),
                _ => 400 + rng.index(3000),
            }
        };
        let mut v = vec![0u8; len];
        rng.fill(&mut v);
        v
    }

    /// A random write.
    pub fn next(&self, rng: &mut Rng) -> Write {
        if let Some(n) = self.fixed_size {
            let mut v = vec![0u8; n];
            rng.fill(&mut v);
            return Write::Put(format!("k{:06}", rng.below(self.keyspace)).into_bytes(), v);
        }
        if rng.chance(self.batch_prob) {
            let n = 2 + rng.below(7);
            Write::Batch(
                (0..n)
                    .map(|_| {
                        let k = self.key(rng);
                        let v = if rng.chance(self.delete_prob) {
                            None
                        } else {
                            Some(self.value(rng))
                        };
                        (k, v)
                    })
                    .collect(),
            )
        } else if rng.chance(self.delete_prob) {
            Write::Delete(self.key(rng))
        } else {
            Write::Put(self.key(rng), self.value(rng))
        }
    }

    /// Write number `i` of the deterministic stream `seed` (the same on both sides of a
    /// process boundary).
    #[must_use]
    pub fn stream(&self, seed: u64, i: u64) -> Write {
        self.next(&mut Rng::new(Rng::derive(seed, i)))
    }
}

// ---------------------------------------------------------------------------------------
// Recorder and captures
// ---------------------------------------------------------------------------------------

/// A crash point: the durable image and the live file at that moment, and which states
/// a store recovered from an image of it may hold.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The file as of the last completed sync (its length is the durable size).
    pub durable: Vec<u8>,
    /// With a compaction's rename not yet durable: the durable image of the file that the
    /// rename put in place (`durable` is then the file it replaced).
    pub renamed: Option<Vec<u8>>,
    /// The file as it was at the crash point (in the page cache).
    pub live: Vec<u8>,
    /// The recovered store must hold at least this many writes (of the recorder's count).
    pub min_writes: u64,
    /// ... and at most this many (writes started: acknowledged plus one in flight).
    pub max_writes: u64,
    /// Syncs completed before the crash point.
    pub sync_no: u64,
    /// The sync whose completion the crash preempted, if captured inside a sync.
    pub during: Option<SyncEvent>,
}

/// What happens to one changed page in a crash image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageFate {
    /// The write never reached the disk.
    Old,
    /// The whole page reached the disk.
    New,
    /// Torn: each sector's fate.
    Torn([SectorFate; (PAGE / SECTOR) as usize]),
}

/// What happens to one 512-byte sector of a torn page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorFate {
    /// The old content.
    Old,
    /// The new content.
    New,
    /// The bytes the write changed hold garbage (from this seed); the rest are unchanged.
    Garbage(u64),
}

impl Capture {
    /// Indexes of the pages that differ between the durable image and the live file
    /// (pages past the durable size count as changed if the live file has any nonzero
    /// byte there).
    #[must_use]
    pub fn changed_pages(&self) -> Vec<u64> {
        let base = self.renamed.as_ref().unwrap_or(&self.durable);
        let len = base.len().max(self.live.len());
        let page = PAGE as usize;
        (0..len.div_ceil(page))
            .filter(|&p| {
                let r = p * page..((p + 1) * page).min(len);
                r.clone().any(|i| {
                    base.get(i).copied().unwrap_or(0) != self.live.get(i).copied().unwrap_or(0)
                })
            })
            .map(|p| p as u64)
            .collect()
    }

    /// Builds one crash image. `rename_survived` picks the new file when a rename was in
    /// flight; `new_size` keeps the live file's size (else the durable size); `fate` says
    /// what happened to each changed page.
    pub fn image(
        &self,
        rename_survived: bool,
        new_size: bool,
        mut fate: impl FnMut(u64) -> PageFate,
    ) -> Vec<u8> {
        let base = match (&self.renamed, rename_survived) {
            (Some(r), true) => r,
            (Some(_), false) => return self.durable.clone(),
            (None, _) => &self.durable,
        };
        let len = if new_size {
            self.live.len()
        } else {
            base.len()
        };
        let mut img = base.clone();
        img.resize(len, 0);
        let page = PAGE as usize;
        let sector = SECTOR as usize;
        for p in self.changed_pages() {
            let start = p as usize * page;
            if start >= len {
                continue;
            }
            let end = (start + page).min(len);
            let new_byte = |i: usize| self.live.get(i).copied().unwrap_or(0);
            let old_byte = |i: usize| base.get(i).copied().unwrap_or(0);
            match fate(p) {
                PageFate::Old => {}
                PageFate::New => copy_new(&mut img, &self.live, start, end),
                PageFate::Torn(sectors) => {
                    for (s, f) in sectors.iter().enumerate() {
                        let ss = start + s * sector;
                        let se = (ss + sector).min(end);
                        match *f {
                            SectorFate::Old => {}
                            SectorFate::New => copy_new(&mut img, &self.live, ss, se),
                            SectorFate::Garbage(seed) => {
                                let mut r = Rng::new(seed);
                                for (i, b) in img.iter_mut().enumerate().take(se).skip(ss) {
                                    if old_byte(i) != new_byte(i) {
                                        *b = r.next_u64() as u8;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        img
    }

    /// Builds a random crash image. Strategies vary between images: independent random
    /// subsets with various densities, in-order write-back cut at a random page, all or
    /// nothing; chosen pages are torn now and then.
    pub fn random_image(&self, rng: &mut Rng) -> Vec<u8> {
        let changed = self.changed_pages();
        let n = changed.len() as u64;
        let strategy = rng.below(6);
        let density = [0.05, 0.3, 0.5, 0.7, 0.95][rng.index(5)];
        let cut = rng.below(n + 1);
        let tear = [0.0, 0.1, 0.5][rng.index(3)];
        let rename_survived = rng.chance(0.5);
        let new_size = rng.chance(0.5);
        let mut order = 0u64;
        let mut seed_rng = rng.clone();
        rng.next_u64();
        self.image(rename_survived, new_size, |_| {
            let k = order;
            order += 1;
            let reached = match strategy {
                0 => false,
                1 => true,
                2 => k < cut,
                3 => k != cut,
                _ => seed_rng.chance(density),
            };
            if !reached {
                return PageFate::Old;
            }
            if seed_rng.chance(tear) {
                let mut s = [SectorFate::Old; (PAGE / SECTOR) as usize];
                for f in &mut s {
                    *f = match seed_rng.below(4) {
                        0 => SectorFate::Old,
                        1 | 2 => SectorFate::New,
                        _ => SectorFate::Garbage(seed_rng.next_u64()),
                    };
                }
                PageFate::Torn(s)
            } else {
                PageFate::New
            }
        })
    }
}

/// Copies `live[a..b]` into `img[a..b]`, zero past the end of `live`.
fn copy_new(img: &mut [u8], live: &[u8], a: usize, b: usize) {
    let l = b.min(live.len()).max(a);
    if l > a {
        img[a..l].copy_from_slice(&live[a..l]);
    }
    img[l..b].fill(0);
}

#[derive(Debug, Default)]
struct RecState {
    path: Option<PathBuf>,
    durable: Vec<u8>,
    renamed: Option<Vec<u8>>,
    syncs: u64,
    /// Writes acknowledged before a sync that covered them.
    synced_writes: u64,
    /// Writes acknowledged before the last `flush()` (or clean close) returned.
    flushed_writes: u64,
    thread_floor: HashMap<ThreadId, u64>,
    rng: Option<Rng>,
    capture_rate: f64,
    max_captures: usize,
    events_seen: u64,
    captures: Vec<Capture>,
    problems: Vec<String>,
}

/// A [`SyncObserver`] that keeps the durable image of one store file (see the module
/// docs). The thread that creates it is taken to be the thread driving the store.
#[derive(Debug)]
pub struct Recorder {
    driver: ThreadId,
    durability: Durability,
    started: AtomicU64,
    acked: AtomicU64,
    state: Mutex<RecState>,
}

fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

impl Recorder {
    /// A recorder for a store run with `durability` (which decides what a crash may
    /// lose). `seed` drives the sampling of crash points inside syncs.
    #[must_use]
    pub fn new(durability: Durability, seed: u64) -> Self {
        Recorder {
            driver: std::thread::current().id(),
            durability,
            started: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            state: Mutex::new(RecState {
                rng: Some(Rng::new(seed)),
                ..RecState::default()
            }),
        }
    }

    /// Returns `opts` with this recorder installed as the sync observer.
    #[must_use]
    pub fn observe(self: &Arc<Self>, opts: Options) -> Options {
        opts.sync_observer(Arc::clone(self) as Arc<dyn SyncObserver>)
    }

    /// Starts a new "boot": the file at `path` as it is now is durable (as after a power
    /// cycle, or right after the store created it, which it does not report), the write
    /// counters restart at 0, and pending captures are dropped.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn baseline(&self, path: &Path) -> std::io::Result<()> {
        let bytes = read_file(path)?;
        let mut s = self.state.lock();
        s.path = Some(path.to_path_buf());
        s.durable = bytes;
        s.renamed = None;
        s.synced_writes = 0;
        s.flushed_writes = 0;
        s.thread_floor.clear();
        s.captures.clear();
        s.events_seen = 0;
        self.started.store(0, Ordering::SeqCst);
        self.acked.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// Declares the file's current content durable without resetting the counters (for
    /// syncs the store does not report, e.g. creating the file).
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn mark_durable(&self) -> std::io::Result<()> {
        let mut s = self.state.lock();
        if let Some(p) = s.path.clone() {
            s.durable = read_file(&p)?;
            s.renamed = None;
        }
        Ok(())
    }

    /// Samples crash points inside sync callbacks: each sync is captured with probability
    /// `rate`, keeping at most `max` captures until [`Recorder::take_captures`].
    pub fn capture_in_syncs(&self, rate: f64, max: usize) {
        let mut s = self.state.lock();
        s.capture_rate = rate;
        s.max_captures = max;
    }

    /// The driver is about to issue a write.
    pub fn begin_write(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }

    /// The write begun last was acknowledged (returned `Ok`).
    pub fn ack_write(&self) {
        self.acked.fetch_add(1, Ordering::SeqCst);
    }

    /// `flush()` (or a clean close) returned `Ok`: every acknowledged write is durable.
    pub fn flushed(&self) {
        let a = self.acked.load(Ordering::SeqCst);
        let mut s = self.state.lock();
        s.flushed_writes = s.flushed_writes.max(a);
    }

    /// Writes started and acknowledged since the last baseline.
    #[must_use]
    pub fn counts(&self) -> (u64, u64) {
        (
            self.started.load(Ordering::SeqCst),
            self.acked.load(Ordering::SeqCst),
        )
    }

    /// Syncs reported so far (all boots).
    #[must_use]
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Inconsistencies in what the store reported (e.g. a range sync past the durable
    /// size, which the crash model says is not durable). Empty when all is well.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        self.state.lock().problems.clone()
    }

    /// The crash points captured inside syncs since the last call.
    pub fn take_captures(&self) -> Vec<Capture> {
        std::mem::take(&mut self.state.lock().captures)
    }

    fn floor(&self, s: &RecState) -> u64 {
        let acked = self.acked.load(Ordering::SeqCst);
        let policy = match self.durability {
            Durability::Always => acked,
            Durability::None => s.flushed_writes,
            Durability::Async | Durability::Periodic(_) => s.synced_writes,
        };
        policy.max(s.synced_writes).max(s.flushed_writes)
    }

    /// A crash point now (between two calls of the driver, or at any moment).
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn crash_point(&self) -> std::io::Result<Capture> {
        let s = self.state.lock();
        let live = match &s.path {
            Some(p) => read_file(p)?,
            None => Vec::new(),
        };
        Ok(Capture {
            durable: s.durable.clone(),
            renamed: s.renamed.clone(),
            live,
            min_writes: self.floor(&s),
            max_writes: self.started.load(Ordering::SeqCst),
            sync_no: s.syncs,
            during: None,
        })
    }
}

impl SyncObserver for Recorder {
    fn synced(&self, path: &Path, event: SyncEvent) {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        if s.path.is_none() {
            s.path = Some(path.to_path_buf());
        }
        if s.path.as_deref() != Some(path) {
            // A compaction's temporary file: its content reaches the store path by the
            // rename, reported as `Renamed`.
            return;
        }
        if std::env::var_os("MAPKV_SIM_TRACE").is_some() {
            eprintln!(
                "sim: sync #{} {event:?} on {:?}: durable {} bytes, file {:?} bytes, {:?} writes acked",
                s.syncs,
                std::thread::current().id(),
                s.durable.len(),
                std::fs::metadata(path).map(|m| m.len()).ok(),
                self.acked.load(Ordering::SeqCst)
            );
        }
        let tid = std::thread::current().id();
        let acked = self.acked.load(Ordering::SeqCst);
        // Writes this sync surely covers: on the driver thread, every acknowledged write
        // (the driver is inside a call); on another thread, only those acknowledged before
        // that thread's previous sync returned (this sync started after that).
        let covered = if tid == self.driver {
            acked
        } else {
            s.thread_floor.insert(tid, acked).unwrap_or(0)
        };
        s.events_seen += 1;
        let keep = match s.rng.as_mut() {
            Some(r) if s.capture_rate > 0.0 && s.max_captures > 0 => {
                if s.captures.len() < s.max_captures {
                    r.chance(s.capture_rate).then_some(None)
                } else if r.chance(s.capture_rate) {
                    // Reservoir-like replacement keeps late syncs (close, checkpoints) in.
                    Some(Some(r.index(s.max_captures)))
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(slot) = keep {
            match read_file(path) {
                Ok(live) => {
                    // During a rename the live file is the new file, synced in full
                    // before the rename: its durable image is the live content.
                    let renamed = if event == SyncEvent::Renamed {
                        Some(live.clone())
                    } else {
                        s.renamed.clone()
                    };
                    let c = Capture {
                        durable: s.durable.clone(),
                        renamed,
                        live,
                        min_writes: self.floor(s),
                        max_writes: self.started.load(Ordering::SeqCst),
                        sync_no: s.syncs,
                        during: Some(event),
                    };
                    match slot {
                        None => s.captures.push(c),
                        Some(i) => s.captures[i] = c,
                    }
                }
                Err(e) => s
                    .problems
                    .push(format!("capture: reading {}: {e}", path.display())),
            }
        }
        let mut covers_writes = true;
        match event {
            SyncEvent::File => match read_file(path) {
                Ok(b) => {
                    s.durable = b;
                    s.renamed = None;
                }
                Err(e) => s.problems.push(format!("reading {}: {e}", path.display())),
            },
            SyncEvent::Range { start, end } => {
                let durable_len = s.durable.len() as u64;
                if end > durable_len {
                    s.problems.push(format!(
                        "range sync {start}..{end} reaches past the durable file size \
                         {durable_len}: the size change was never made durable"
                    ));
                }
                let end = end.min(durable_len);
                if start < end {
                    let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
                    let r = std::fs::File::open(path).and_then(|f| {
                        use std::os::unix::fs::FileExt;
                        f.read_exact_at(&mut buf, start)
                    });
                    match r {
                        Ok(()) => {
                            let (a, b) = (start as usize, end as usize);
                            s.durable[a..b].copy_from_slice(&buf);
                        }
                        Err(e) => s.problems.push(format!("reading {}: {e}", path.display())),
                    }
                }
            }
            SyncEvent::Renamed => match read_file(path) {
                Ok(b) => {
                    s.renamed = Some(b);
                    covers_writes = false;
                }
                Err(e) => s.problems.push(format!("reading {}: {e}", path.display())),
            },
            SyncEvent::Directory => {
                if let Some(r) = s.renamed.take() {
                    s.durable = r;
                }
            }
        }
        s.syncs += 1;
        if covers_writes && s.renamed.is_none() {
            s.synced_writes = s.synced_writes.max(covered);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The power-loss loop
// ---------------------------------------------------------------------------------------

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

/// What [`power_loss`] did and found.
#[derive(Debug, Clone, Default)]
pub struct PowerLossReport {
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

/// Runs the power-loss simulation described by `cfg` (see the module docs): sessions of
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
        rep: PowerLossReport::default(),
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

// ---------------------------------------------------------------------------------------
// kill -9
// ---------------------------------------------------------------------------------------

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

    /// One round: `spawn(path, durability, seed, max_writes)` must start a child running
    /// [`child_writer`] with those arguments and its stdout piped. The child is killed
    /// (SIGKILL) at a random moment; then the store is opened (read-only or read-write,
    /// at random) and must hold every acknowledged write plus at most the one in flight.
    ///
    /// # Errors
    /// The violation found (or a harness failure), with the seed.
    pub fn round(
        &mut self,
        spawn: &mut dyn FnMut(&Path, Durability, u64, u64) -> std::io::Result<Child>,
    ) -> Result<(), String> {
        self.rounds += 1;
        let seed = self.rng.next_u64();
        let ctx = format!(
            "[kill -9 {:?} round {} seed {seed:#x}]",
            self.durability, self.rounds
        );
        let mut child = spawn(&self.path, self.durability, seed, self.max_writes)
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
}

fn killed_by_signal(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal().is_some()
}

// ---------------------------------------------------------------------------------------
// Damaged files
// ---------------------------------------------------------------------------------------

/// Totals of [`damage_round`].
#[derive(Debug, Clone, Default)]
pub struct DamageReport {
    /// Damaged files tried.
    pub files: u64,
    /// Opens refused with a typed error naming the damage.
    pub refused: u64,
    /// Normal opens that succeeded (damage in a region open does not read).
    pub opened: u64,
    /// Salvage opens that succeeded.
    pub salvaged: u64,
    /// Damage found by `verify()` or reads after an open succeeded.
    pub detected_later: u64,
    /// Violations (a panic, an untyped error, a salvage that failed).
    pub violations: Vec<String>,
}

/// Builds a small valid store in `dir` with about `keys` keys (a checkpointed index plus
/// a log tail after it; left dirty or clean at random) and returns its bytes.
///
/// # Errors
/// The store could not be built.
pub fn sample_store(dir: &Path, keys: u64, seed: u64) -> Result<Vec<u8>, String> {
    let path = dir.join(format!("sample-{seed:x}.mkv"));
    let _ = std::fs::remove_file(&path);
    let wl = Workload {
        keyspace: keys.max(1),
        ..Workload::default()
    };
    let mut rng = Rng::new(seed);
    let opts = Options::default()
        .durability(Durability::None)
        .initial_size(12 << 10);
    let store = Store::open(&path, opts.clone()).map_err(|e| e.to_string())?;
    for _ in 0..keys {
        wl.next(&mut rng).apply(&store).map_err(|e| e.to_string())?;
    }
    // A clean close checkpoints: the index in the file covers these writes.
    store.close().map_err(|e| e.to_string())?;
    let store = Store::open(&path, opts).map_err(|e| e.to_string())?;
    for _ in 0..keys / 2 {
        wl.next(&mut rng).apply(&store).map_err(|e| e.to_string())?;
    }
    store.flush().map_err(|e| e.to_string())?;
    // Half the time leave it as a crash would (DIRTY checkpoint, a log tail to replay).
    let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
    let clean = rng.chance(0.5);
    drop(store);
    let bytes = if clean {
        std::fs::read(&path).map_err(|e| e.to_string())?
    } else {
        bytes
    };
    let _ = std::fs::remove_file(&path);
    Ok(bytes)
}

/// One random damage of `good` (truncate, bit flips, zeroed or random ranges, swapped
/// pages, another format) and a description of it.
pub fn damage(good: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = good.to_vec();
    let len = b.len();
    let what = match rng.below(7) {
        0 => {
            let at = match rng.below(3) {
                0 => rng.index(4096.min(len)),
                _ => rng.index(len),
            };
            b.truncate(at);
            format!("truncated to {at}")
        }
        1 => {
            let n = 1 + rng.index(8);
            let mut at = Vec::new();
            for _ in 0..n {
                let i = rng.index(len);
                b[i] ^= 1 << rng.below(8);
                at.push(i);
            }
            format!("bits flipped at {at:?}")
        }
        2 => {
            let i = rng.index(len);
            let n = 1 + rng.index(8192).min(len - i - 1);
            b[i..i + n].fill(0);
            format!("zeroed {i}..{}", i + n)
        }
        3 => {
            let i = rng.index(len);
            let n = 1 + rng.index(8192).min(len - i - 1);
            rng.fill(&mut b[i..i + n]);
            format!("random bytes at {i}..{}", i + n)
        }
        4 => {
            let pages = len / PAGE as usize;
            let (x, y) = (rng.index(pages), rng.index(pages));
            let p = PAGE as usize;
            for i in 0..p {
                b.swap(x * p + i, y * p + i);
            }
            format!("pages {x} and {y} swapped")
        }
        5 => {
            b = vec![0u8; rng.index(3 * PAGE as usize)];
            rng.fill(&mut b);
            format!("random file of {} bytes", b.len())
        }
        _ => {
            let mut f = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
            f.resize(rng.index(20_000) + 16, 0);
            b = f;
            format!("a PNG header, {} bytes", b.len())
        }
    };
    (b, what)
}

/// Opens `bytes` (written to `path`) normally and with salvage, reads everything and
/// verifies; records the outcome in `rep`. A panic is caught and reported.
pub fn damage_round(bytes: &[u8], what: &str, path: &Path, rep: &mut DamageReport) {
    rep.files += 1;
    for salvage in [false, true] {
        let _ = std::fs::remove_file(path);
        if let Err(e) = std::fs::write(path, bytes) {
            rep.violations.push(format!("writing damaged file: {e}"));
            return;
        }
        let r = std::panic::catch_unwind(|| -> Result<&'static str, String> {
            let opts = Options::default()
                .salvage(salvage)
                .durability(Durability::None);
            match Store::open(path, opts) {
                // Salvage cannot help a damaged static header (it holds the seed that
                // keys every checksum) or a file without a log: typed errors there too.
                Err(Error::Corrupt { .. } | Error::NotAStore { .. } | Error::Version { .. }) => {
                    Ok("refused")
                }
                Err(e) => Err(format!(
                    "open (salvage={salvage}) returned an unexpected error: {e}"
                )),
                Ok(store) => {
                    let mut bad = false;
                    for item in store.iter() {
                        match item {
                            Ok((k, v)) => {
                                if store.get(&k).map_err(|e| e.to_string()).is_err() {
                                    bad = true;
                                }
                                drop(v);
                            }
                            Err(e) if e.is_corruption() => bad = true,
                            Err(e) => {
                                return Err(format!("iteration error is not typed corruption: {e}"))
                            }
                        }
                    }
                    match store.verify() {
                        Ok(_) => {}
                        Err(e) if e.is_corruption() => bad = true,
                        Err(e) => return Err(format!("verify error is not typed corruption: {e}")),
                    }
                    if salvage && bad {
                        return Err("a salvaged store still fails verification".into());
                    }
                    // Writes must work (or be refused with an error) after either open.
                    match store.put(b"after-damage", b"x") {
                        Ok(()) | Err(Error::Poisoned) => {}
                        Err(e) if e.is_corruption() => {}
                        Err(e) => return Err(format!("put after damaged open: {e}")),
                    }
                    drop(store);
                    Ok(if bad {
                        "detected later"
                    } else if salvage {
                        "salvaged"
                    } else {
                        "opened"
                    })
                }
            }
        });
        match r {
            Ok(Ok("refused")) => rep.refused += 1,
            Ok(Ok("detected later")) => rep.detected_later += 1,
            Ok(Ok("salvaged")) => rep.salvaged += 1,
            Ok(Ok(_)) => rep.opened += 1,
            Ok(Err(e)) => rep.violations.push(format!("{what}: {e}")),
            Err(_) => rep
                .violations
                .push(format!("{what}: PANIC (salvage={salvage})")),
        }
    }
}
