//! The write recorder: a [`SyncObserver`] that keeps the durable image of a store file as
//! the store reports its syncs, and captures crash points (see the `sim` module docs for
//! what it can and cannot see).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;

use parking_lot::Mutex;

use crate::{Durability, Options, SyncEvent, SyncObserver};

use super::{Capture, Rng};

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

/// A [`SyncObserver`] that keeps the durable image of one store file (see the [`sim`](super)
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
