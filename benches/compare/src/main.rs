//! mapkv next to the stores a user would pick instead: LMDB (through `heed`), `redb`,
//! `sled` and `fjall`, on one workload, in one run, printed as one table.
//!
//! Workload (16-byte keys, 100-byte values by default):
//! 1. **fill**: `--keys` puts of new keys into an empty store, without syncing, in chunks
//!    of 1,000 (one write transaction per chunk for LMDB and redb, which are
//!    transactional; single puts for mapkv, sled and fjall). Then one sync (timed
//!    separately).
//! 2. **reopen**: close the filled store cleanly and open it again.
//! 3. **random gets**, hits then misses, one thread, for `--read-secs` each (LMDB and
//!    redb open one read transaction per 1,000 gets). Values are read in place where the
//!    engine allows it (mapkv `get_with`, LMDB `&[u8]`, redb `AccessGuard`); sled and
//!    fjall hand out reference-counted buffers.
//! 4. **random gets on two threads**, then **overwrite** of every key and a close, then
//!    **cold gets**: the files dropped from the page cache, the store reopened and
//!    `--cold-gets` random keys read (for mapkv also through `Store::get_many`).
//! 5. **durable puts**: one writer puts new keys into a fresh store, each put durable
//!    before the next (mapkv `Durability::Always`; LMDB and redb one synced transaction
//!    per put; sled `insert` + `flush`; fjall `insert` + `persist(SyncData)`), for
//!    `--durable-secs`; then **group commit**, batches of 100 puts each one durable
//!    commit, beside raw syncs measured right before.
//!
//! Run: `cd benches/compare && cargo run --release -- [--keys N] [--engines a,b]`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn Error>>;

const CHUNK: u64 = 1000;

// The workload's keys and values, rate formatting and the raw sync probe: the same
// definitions `mapkv bench` and the criterion benches compile.
#[path = "../../../src/bin/mapkv/common.rs"]
mod common;
use common::{fmt_rate, key, nanos, raw_sync_latencies, shuffled_keys, stamp};

/// One engine under test. `durable` selects the per-write sync configuration where the
/// engine fixes it at open (mapkv, LMDB).
trait Engine: Sized + Sync {
    const NAME: &'static str;
    fn open(dir: &Path, durable: bool) -> Res<Self>;
    /// Puts keys `first..first + n` without syncing (one transaction if transactional).
    fn load(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> Res<()>;
    /// Looks up `keys`, returns the total length of the values found.
    fn get_many(&self, keys: &[[u8; 16]]) -> Res<usize>;
    /// One put that is durable when it returns.
    fn put_durable(&mut self, k: &[u8], v: &[u8]) -> Res<()>;
    /// Puts keys `first..first + n`, durable together when it returns (one commit: group
    /// commit as an application does it).
    fn put_batch_durable(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()>;
    /// Clean close.
    fn close(self) -> Res<()>;
    /// Looks up `keys` with the engine's batch read, if it has one (total value length).
    fn get_batch(&self, _keys: &[[u8; 16]]) -> Option<Res<usize>> {
        None
    }
}

// ------------------------------------------------------------------------------- mapkv

struct Mapkv(mapkv::Store);

impl Engine for Mapkv {
    const NAME: &'static str = "mapkv";
    fn open(dir: &Path, durable: bool) -> Res<Self> {
        let d = if durable {
            mapkv::Durability::Always
        } else {
            mapkv::Durability::None
        };
        Ok(Mapkv(mapkv::Store::open(
            dir.join("data.mkv"),
            mapkv::Options::default().durability(d),
        )?))
    }
    fn load(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        for i in first..first + n {
            stamp(val, i);
            self.0.put(key(i), &*val)?;
        }
        Ok(())
    }
    fn sync(&mut self) -> Res<()> {
        Ok(self.0.flush()?)
    }
    fn get_many(&self, keys: &[[u8; 16]]) -> Res<usize> {
        let mut sum = 0;
        for k in keys {
            sum += self.0.get_with(k, <[u8]>::len)?.unwrap_or(0);
        }
        Ok(sum)
    }
    fn put_durable(&mut self, k: &[u8], v: &[u8]) -> Res<()> {
        Ok(self.0.put(k, v)?)
    }
    fn put_batch_durable(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        // Opened with `Durability::Always`: one batch is one write and one sync.
        let mut b = mapkv::Batch::new();
        for i in first..first + n {
            stamp(val, i);
            b.put(key(i), &*val);
        }
        Ok(self.0.write(&b)?)
    }
    fn close(self) -> Res<()> {
        Ok(self.0.close()?)
    }
    fn get_batch(&self, keys: &[[u8; 16]]) -> Option<Res<usize>> {
        Some(
            self.0
                .get_many(keys)
                .map(|v| v.iter().flatten().map(Vec::len).sum())
                .map_err(Into::into),
        )
    }
}

// -------------------------------------------------------------------------- LMDB (heed)

struct Lmdb {
    env: heed::Env,
    db: heed::Database<heed::types::Bytes, heed::types::Bytes>,
}

impl Engine for Lmdb {
    const NAME: &'static str = "LMDB (heed)";
    fn open(dir: &Path, durable: bool) -> Res<Self> {
        let mut o = heed::EnvOpenOptions::new();
        o.map_size(16 << 30).max_dbs(1);
        if !durable {
            // SAFETY: NO_SYNC only drops the sync at commit; it is sound for any use
            // (heed marks all flags unsafe because some, like WRITE_MAP, are not).
            unsafe {
                o.flags(heed::EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: heed's open is unsafe because the file must not be changed by another
        // program or opened twice in this process with different options; the directory
        // is a fresh one used only by this handle.
        let env = unsafe { o.open(dir)? };
        let mut w = env.write_txn()?;
        let db = env.create_database(&mut w, None)?;
        w.commit()?;
        Ok(Lmdb { env, db })
    }
    fn load(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        let mut w = self.env.write_txn()?;
        for i in first..first + n {
            stamp(val, i);
            self.db.put(&mut w, &key(i), val)?;
        }
        w.commit()?;
        Ok(())
    }
    fn sync(&mut self) -> Res<()> {
        Ok(self.env.force_sync()?)
    }
    fn get_many(&self, keys: &[[u8; 16]]) -> Res<usize> {
        let r = self.env.read_txn()?;
        let mut sum = 0;
        for k in keys {
            sum += self.db.get(&r, k)?.map_or(0, <[u8]>::len);
        }
        Ok(sum)
    }
    fn put_durable(&mut self, k: &[u8], v: &[u8]) -> Res<()> {
        let mut w = self.env.write_txn()?;
        self.db.put(&mut w, k, v)?;
        w.commit()?;
        Ok(())
    }
    fn put_batch_durable(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        // Opened without NO_SYNC: the commit syncs.
        self.load(first, n, val)
    }
    fn close(self) -> Res<()> {
        self.env.prepare_for_closing().wait();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------- redb

const REDB_TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("t");

struct Redb {
    db: redb::Database,
    durable: bool,
}

impl Redb {
    fn write(&self, f: impl FnOnce(&mut redb::Table<&[u8], &[u8]>) -> Res<()>) -> Res<()> {
        let mut w = self.db.begin_write()?;
        if !self.durable {
            w.set_durability(redb::Durability::None)?;
        }
        {
            let mut t = w.open_table(REDB_TABLE)?;
            f(&mut t)?;
        }
        w.commit()?;
        Ok(())
    }
}

impl Engine for Redb {
    const NAME: &'static str = "redb";
    fn open(dir: &Path, durable: bool) -> Res<Self> {
        let db = redb::Database::create(dir.join("data.redb"))?;
        let r = Redb { db, durable };
        r.write(|_| Ok(()))?;
        Ok(r)
    }
    fn load(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        self.write(|t| {
            for i in first..first + n {
                stamp(val, i);
                t.insert(&key(i)[..], &*val)?;
            }
            Ok(())
        })
    }
    fn sync(&mut self) -> Res<()> {
        // An Immediate commit makes all earlier non-durable commits durable.
        let w = self.db.begin_write()?;
        w.commit()?;
        Ok(())
    }
    fn get_many(&self, keys: &[[u8; 16]]) -> Res<usize> {
        use redb::ReadableDatabase;
        let r = self.db.begin_read()?;
        let t = r.open_table(REDB_TABLE)?;
        let mut sum = 0;
        for k in keys {
            sum += t.get(&k[..])?.map_or(0, |g| g.value().len());
        }
        Ok(sum)
    }
    fn put_durable(&mut self, k: &[u8], v: &[u8]) -> Res<()> {
        self.write(|t| {
            t.insert(k, v)?;
            Ok(())
        })
    }
    fn put_batch_durable(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        // Opened durable: the transaction commits with `Durability::Immediate`.
        self.load(first, n, val)
    }
    fn close(self) -> Res<()> {
        drop(self.db);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------- sled

struct Sled(sled::Db);

impl Engine for Sled {
    const NAME: &'static str = "sled 0.34";
    fn open(dir: &Path, _durable: bool) -> Res<Self> {
        Ok(Sled(sled::Config::new().path(dir.join("sled")).open()?))
    }
    fn load(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        for i in first..first + n {
            stamp(val, i);
            self.0.insert(key(i), &*val)?;
        }
        Ok(())
    }
    fn sync(&mut self) -> Res<()> {
        self.0.flush()?;
        Ok(())
    }
    fn get_many(&self, keys: &[[u8; 16]]) -> Res<usize> {
        let mut sum = 0;
        for k in keys {
            sum += self.0.get(k)?.map_or(0, |v| v.len());
        }
        Ok(sum)
    }
    fn put_durable(&mut self, k: &[u8], v: &[u8]) -> Res<()> {
        self.0.insert(k, v)?;
        self.0.flush()?;
        Ok(())
    }
    fn put_batch_durable(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        self.load(first, n, val)?;
        self.sync()
    }
    fn close(self) -> Res<()> {
        self.0.flush()?;
        Ok(())
    }
}

// --------------------------------------------------------------------------------- fjall

struct Fjall {
    db: fjall::Database,
    ks: fjall::Keyspace,
}

impl Engine for Fjall {
    const NAME: &'static str = "fjall 3";
    fn open(dir: &Path, _durable: bool) -> Res<Self> {
        let db = fjall::Database::builder(dir.join("fjall")).open()?;
        let ks = db.keyspace("t", fjall::KeyspaceCreateOptions::default)?;
        Ok(Fjall { db, ks })
    }
    fn load(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        for i in first..first + n {
            stamp(val, i);
            self.ks.insert(key(i), &*val)?;
        }
        Ok(())
    }
    fn sync(&mut self) -> Res<()> {
        Ok(self.db.persist(fjall::PersistMode::SyncData)?)
    }
    fn get_many(&self, keys: &[[u8; 16]]) -> Res<usize> {
        let mut sum = 0;
        for k in keys {
            sum += self.ks.get(k)?.map_or(0, |v| v.len());
        }
        Ok(sum)
    }
    fn put_durable(&mut self, k: &[u8], v: &[u8]) -> Res<()> {
        self.ks.insert(k, v)?;
        Ok(self.db.persist(fjall::PersistMode::SyncData)?)
    }
    fn put_batch_durable(&mut self, first: u64, n: u64, val: &mut [u8]) -> Res<()> {
        self.load(first, n, val)?;
        self.sync()
    }
    fn close(self) -> Res<()> {
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }
}

// ------------------------------------------------------------------------------ harness

struct Args {
    keys: u64,
    cold_gets: usize,
    value_size: usize,
    read_secs: f64,
    durable_secs: f64,
    engines: Vec<String>,
    dir: Option<PathBuf>,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        keys: 1_000_000,
        cold_gets: 20_000,
        value_size: 100,
        read_secs: 1.0,
        durable_secs: 2.0,
        engines: vec![
            "mapkv".into(),
            "lmdb".into(),
            "redb".into(),
            "sled".into(),
            "fjall".into(),
        ],
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--keys" => a.keys = val()?.parse()?,
            "--cold-gets" => a.cold_gets = val()?.parse()?,
            "--value-size" => a.value_size = val()?.parse()?,
            "--read-secs" => a.read_secs = val()?.parse()?,
            "--durable-secs" => a.durable_secs = val()?.parse()?,
            "--engines" => a.engines = val()?.split(',').map(|s| s.trim().to_lowercase()).collect(),
            "--dir" => a.dir = Some(PathBuf::from(val()?)),
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "mapkv-compare [--keys N=1000000] [--cold-gets N=20000] [--value-size B=100] [--read-secs S=1] \
                     [--durable-secs S=2] [--engines mapkv,lmdb,redb,sled,fjall] [--dir PATH]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    if a.keys == 0 {
        return Err("--keys must be at least 1".into());
    }
    Ok(a)
}

#[derive(Default)]
struct Row {
    engine: &'static str,
    fill_per_s: f64,
    fill_sync_ms: f64,
    reopen_ms: f64,
    hits_per_s: f64,
    hits2_per_s: f64,
    misses_per_s: f64,
    overwrite_per_s: f64,
    cold_per_s: f64,
    cold_majflt: u64,
    cold_read_mb: f64,
    cold_batch_per_s: Option<f64>,
    group_p50_us: f64,
    group_p99_us: f64,
    raw_p50_us: f64,
    raw_p99_us: f64,
    durable_per_s: f64,
    durable_p50_us: f64,
    durable_p99_us: f64,
    disk_bytes: u64,
    disk_after_overwrite: u64,
}

fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(p) else {
        return std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
    };
    rd.flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                disk_usage(&path)
            } else {
                e.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
            }
        })
        .sum()
}

fn reads<E: Engine>(e: &E, keys: &[[u8; 16]], secs: f64) -> Res<(f64, usize)> {
    let budget = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0usize;
    let mut sum = 0usize;
    let mut pos = 0usize;
    while n == 0 || start.elapsed() < budget {
        let end = (pos + CHUNK as usize).min(keys.len());
        sum += e.get_many(&keys[pos..end])?;
        n += end - pos;
        pos = if end == keys.len() { 0 } else { end };
    }
    Ok((n as f64 / start.elapsed().as_secs_f64(), sum))
}

/// [`reads`] on two threads at once (each its own order of `keys`); the total rate.
fn reads2<E: Engine>(e: &E, keys: &[[u8; 16]], secs: f64) -> Res<f64> {
    let (a, b) = keys.split_at(keys.len() / 2);
    let b = if a.is_empty() { b } else { a };
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| reads(e, a, secs).map_err(|e| e.to_string()));
        let rb = reads(e, b, secs).map_err(|e| e.to_string());
        (ta.join(), rb)
    });
    let ra = ra.map_err(|_| "a reader thread panicked")??;
    Ok(ra.0 + rb?.0)
}

/// Puts every key `0..keys` in chunks of [`CHUNK`]; returns puts per second.
fn load_all<E: Engine>(e: &mut E, keys: u64, val: &mut [u8]) -> Res<f64> {
    let t = Instant::now();
    let mut i = 0;
    while i < keys {
        let n = CHUNK.min(keys - i);
        e.load(i, n, val)?;
        i += n;
    }
    Ok(keys as f64 / t.elapsed().as_secs_f64())
}

/// Writes back and drops every file under `dir` from the page cache, so the next open
/// reads from the disk (`POSIX_FADV_DONTNEED` drops clean pages only: synced first).
fn evict(dir: &Path) -> Res<()> {
    use std::os::fd::AsRawFd;
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            evict(&p)?;
            continue;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)?;
        f.sync_all()?;
        // SAFETY: a plain system call on a file descriptor this function owns.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            return Err(format!("posix_fadvise on {}: error {r}", p.display()).into());
        }
    }
    Ok(())
}

/// Major page faults of this process so far.
fn major_faults() -> u64 {
    // SAFETY: `getrusage` fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u64::try_from(u.ru_majflt).unwrap_or(0)
}

/// Bytes this process caused to be read from storage so far (`/proc/self/io`).
fn read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("read_bytes: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

fn percentile_us(sorted: &[u64], pct: usize) -> f64 {
    sorted[(sorted.len() * pct / 100).min(sorted.len() - 1)] as f64 / 1e3
}

fn bench<E: Engine>(a: &Args, root: &Path, hits: &[[u8; 16]], misses: &[[u8; 16]]) -> Res<Row> {
    let dir = root.join(format!("{}-fill", E::NAME.split(' ').next().unwrap_or("x")));
    std::fs::create_dir_all(&dir)?;
    let mut row = Row {
        engine: E::NAME,
        ..Row::default()
    };
    let mut val = vec![0x5Au8; a.value_size];

    // 1. Fill.
    let mut e = E::open(&dir, false)?;
    row.fill_per_s = load_all(&mut e, a.keys, &mut val)?;
    let t = Instant::now();
    e.sync()?;
    row.fill_sync_ms = t.elapsed().as_secs_f64() * 1e3;
    e.close()?;
    row.disk_bytes = disk_usage(&dir);

    // 2. Reopen.
    let t = Instant::now();
    let e = E::open(&dir, false)?;
    row.reopen_ms = t.elapsed().as_secs_f64() * 1e3;

    // 3. Random gets.
    let (h, sum) = reads(&e, hits, a.read_secs)?;
    if sum == 0 {
        return Err(format!("{}: no hits found after reopen", E::NAME).into());
    }
    let (m, sum) = reads(&e, misses, a.read_secs)?;
    if sum != 0 {
        return Err(format!("{}: a miss found a value", E::NAME).into());
    }
    row.hits_per_s = h;
    row.misses_per_s = m;
    row.hits2_per_s = reads2(&e, hits, a.read_secs)?;
    e.close()?;

    // 4. Overwrite every key once with a new value (so the file holds two versions of
    //    each), then close.
    let mut e = E::open(&dir, false)?;
    val.fill(0xA5);
    row.overwrite_per_s = load_all(&mut e, a.keys, &mut val)?;
    e.sync()?;
    e.close()?;
    row.disk_after_overwrite = disk_usage(&dir);

    // 5. Cold random gets: evicted from the page cache, reopened, the first gets.
    evict(&dir)?;
    let (f0, r0) = (major_faults(), read_bytes());
    let t = Instant::now();
    let e = E::open(&dir, false)?;
    let cold = &hits[..a.cold_gets.min(hits.len())];
    let mut sum = 0;
    for c in cold.chunks(CHUNK as usize) {
        sum += e.get_many(c)?;
    }
    row.cold_per_s = cold.len() as f64 / t.elapsed().as_secs_f64();
    row.cold_majflt = major_faults() - f0;
    row.cold_read_mb = (read_bytes() - r0) as f64 / 1e6;
    if sum == 0 {
        return Err(format!("{}: no hits found cold", E::NAME).into());
    }
    e.close()?;

    // 5b. The same cold gets through the engine's batch read, if it has one.
    evict(&dir)?;
    let t = Instant::now();
    let e = E::open(&dir, false)?;
    let mut batched = Some(0);
    for c in cold.chunks(CHUNK as usize) {
        match e.get_batch(c) {
            Some(r) => batched = batched.map(|s| s + r.unwrap_or(0)),
            None => {
                batched = None;
                break;
            }
        }
    }
    if batched.is_some() {
        if batched != Some(sum) {
            return Err(format!("{}: the batch read found other values", E::NAME).into());
        }
        row.cold_batch_per_s = Some(cold.len() as f64 / t.elapsed().as_secs_f64());
    }
    e.close()?;
    let _ = std::fs::remove_dir_all(&dir);

    // 6. Durable single-writer puts into a fresh store.
    let dir = root.join(format!(
        "{}-durable",
        E::NAME.split(' ').next().unwrap_or("x")
    ));
    std::fs::create_dir_all(&dir)?;
    let mut e = E::open(&dir, true)?;
    e.put_durable(b"warm-up", b"")?;
    let budget = Duration::from_secs_f64(a.durable_secs);
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut i = 0u64;
    while lat.len() < 3 || start.elapsed() < budget {
        stamp(&mut val, i);
        let t = Instant::now();
        e.put_durable(&key(i), &val)?;
        lat.push(nanos(t.elapsed()));
        i += 1;
    }
    row.durable_per_s = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    row.durable_p50_us = lat[lat.len() / 2] as f64 / 1e3;
    row.durable_p99_us = lat[(lat.len() * 99 / 100).min(lat.len() - 1)] as f64 / 1e3;

    // 7. Group commit: batches of 100 puts, one durable commit each, beside the raw
    //    sync's own latencies measured right before (this VM's syncs are bimodal).
    let mut raw = raw_sync_latencies(&dir, 200, Duration::from_secs(30))?;
    raw.sort_unstable();
    row.raw_p50_us = percentile_us(&raw, 50);
    row.raw_p99_us = percentile_us(&raw, 99);
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut first = 1u64 << 41;
    while lat.len() < 3 || start.elapsed() < budget {
        let t = Instant::now();
        e.put_batch_durable(first, 100, &mut val)?;
        lat.push(nanos(t.elapsed()));
        first += 100;
    }
    lat.sort_unstable();
    row.group_p50_us = percentile_us(&lat, 50);
    row.group_p99_us = percentile_us(&lat, 99);
    e.close()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

/// Median of 100 raw syncs (4 KiB `pwrite` + `fdatasync`) in `dir`, in µs.
fn raw_sync_median_us(dir: &Path) -> Res<f64> {
    let mut lat = raw_sync_latencies(dir, 100, Duration::from_secs(60))?;
    lat.sort_unstable();
    Ok(lat[lat.len() / 2] as f64 / 1e3)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("mapkv-compare: error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let a = parse_args()?;
    let tmp;
    let root = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let hits = shuffled_keys(a.keys, 0, 1);
    let misses = shuffled_keys(a.keys.min(1_000_000), 1 << 40, 2);
    let raw0 = raw_sync_median_us(&root)?;
    let mut rows = Vec::new();
    for name in &a.engines {
        eprintln!("mapkv-compare: {name} ...");
        let row = match name.as_str() {
            "mapkv" => bench::<Mapkv>(&a, &root, &hits, &misses),
            "lmdb" | "heed" => bench::<Lmdb>(&a, &root, &hits, &misses),
            "redb" => bench::<Redb>(&a, &root, &hits, &misses),
            "sled" => bench::<Sled>(&a, &root, &hits, &misses),
            "fjall" => bench::<Fjall>(&a, &root, &hits, &misses),
            other => {
                Err(format!("unknown engine {other:?}: use mapkv, lmdb, redb, sled, fjall").into())
            }
        };
        rows.push(row.map_err(|e| format!("{name}: {e}"))?);
    }
    let raw1 = raw_sync_median_us(&root)?;

    println!(
        "{} keys x 16 B, {} B values; fill in chunks of {CHUNK}; raw 4 KiB pwrite+fdatasync median {raw0:.0} µs \
         before, {raw1:.0} µs after",
        a.keys, a.value_size
    );
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>11} {:>11} {:>10}",
        "engine",
        "fill/s",
        "fill sync",
        "reopen",
        "hits/s",
        "hits/s x2",
        "misses/s",
        "durable/s",
        "durable p50",
        "durable p99",
        "disk"
    );
    for r in &rows {
        println!(
            "{:<12} {:>10} {:>8.1}ms {:>8.2}ms {:>10} {:>10} {:>10} {:>12} {:>9.0}µs {:>9.0}µs {:>8.0}MB",
            r.engine,
            fmt_rate(r.fill_per_s),
            r.fill_sync_ms,
            r.reopen_ms,
            fmt_rate(r.hits_per_s),
            fmt_rate(r.hits2_per_s),
            fmt_rate(r.misses_per_s),
            fmt_rate(r.durable_per_s),
            r.durable_p50_us,
            r.durable_p99_us,
            r.disk_bytes as f64 / 1e6
        );
    }
    println!();
    println!(
        "{:<12} {:>11} {:>10} {:>11} {:>11} {:>9} {:>11} {:>11} {:>9} {:>10} {:>10} {:>9}",
        "engine",
        "overwrite/s",
        "disk after",
        "cold gets/s",
        "cold majflt",
        "cold read",
        "group p50",
        "group p99",
        "p99/p50",
        "raw p50",
        "raw p99",
        "p99/p50"
    );
    for r in &rows {
        println!(
            "{:<12} {:>11} {:>8.0}MB {:>11} {:>11} {:>7.0}MB {:>9.0}µs {:>9.0}µs {:>8.1}x {:>8.0}µs {:>8.0}µs {:>8.1}x",
            r.engine,
            fmt_rate(r.overwrite_per_s),
            r.disk_after_overwrite as f64 / 1e6,
            fmt_rate(r.cold_per_s),
            r.cold_majflt,
            r.cold_read_mb,
            r.group_p50_us,
            r.group_p99_us,
            r.group_p99_us / r.group_p50_us.max(1e-9),
            r.raw_p50_us,
            r.raw_p99_us,
            r.raw_p99_us / r.raw_p50_us.max(1e-9),
        );
    }
    for r in &rows {
        if let Some(b) = r.cold_batch_per_s {
            println!(
                "{}: the same cold gets through its batch read (chunks of {CHUNK}): {}/s",
                r.engine,
                fmt_rate(b)
            );
        }
    }
    if let (Some(m), Some(l)) = (
        rows.iter().find(|r| r.engine == Mapkv::NAME),
        rows.iter().find(|r| r.engine == Lmdb::NAME),
    ) {
        println!(
            "mapkv / LMDB: fill {:.2}x, hits {:.2}x, hits on 2 threads {:.2}x, misses {:.2}x, \
             cold gets {:.2}x, durable puts {:.2}x, reopen {:.2}x faster",
            m.fill_per_s / l.fill_per_s,
            m.hits_per_s / l.hits_per_s,
            m.hits2_per_s / l.hits2_per_s,
            m.misses_per_s / l.misses_per_s,
            m.cold_per_s / l.cold_per_s,
            m.durable_per_s / l.durable_per_s,
            l.reopen_ms / m.reopen_ms.max(1e-6)
        );
    }
    Ok(())
}
