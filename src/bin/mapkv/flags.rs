//! The mmap flag experiments of `mapkv bench`: what `MAP_POPULATE`,
//! `MADV_POPULATE_WRITE`, `MAP_NORESERVE` and `MAP_PRIVATE` really do on this machine, and
//! how many bytes one sync really writes, raw and through mapkv's own write paths.
//!
//! These experiments need mappings that mapkv itself never makes (private, no-reserve,
//! populated scratch files); they go through [`ScratchFile`] of `sys.rs`, which holds the
//! `unsafe` code. Every mapping here is of a scratch file this module created in the
//! benchmark directory, which nothing else opens: that is the promise
//! [`ScratchFile::new`] asks for, made at its two calls below.
#![expect(
    unsafe_code,
    reason = "the two ScratchFile::new calls, whose contract is stated at each"
)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::measure::{self, faults_since, fmt_bytes, fmt_ns, fmt_secs, nanos, BlockDev};
use crate::sys::{Advice, ScratchFile, ScratchFlags};
use crate::Failure;

/// Progress steps [`run`] reports.
pub const STEPS: u64 = 4;

const PAGE: usize = 4096;
const MIB: u64 = 1 << 20;

/// Everything the flag experiments measured.
#[derive(Debug, Clone, Serialize)]
pub struct FlagsReport {
    /// Size of the scratch file, MiB.
    pub file_mib: u64,
    /// Populate modes on a hot file with 1 MiB page-cache folios.
    pub populate: Vec<PopulateRow>,
    /// Commit charge of a 1 GiB mapping, with and without `MAP_NORESERVE`.
    pub noreserve: Vec<CommitRow>,
    /// Writing one byte per page through a private vs a shared mapping.
    pub private_vs_shared: Vec<PrivateRow>,
    /// Bytes one small write + sync really sends to storage.
    pub sync_bytes: Vec<SyncBytesRow>,
    /// Block device whose write counter was read.
    pub block_device: Option<String>,
}

/// One populate mode (medians over the repetitions).
#[derive(Debug, Clone, Serialize)]
pub struct PopulateRow {
    /// `plain`, `MAP_POPULATE` or `MADV_POPULATE_WRITE`.
    pub mode: String,
    /// Time of `mmap` plus the prefault, ms.
    pub map_ms: f64,
    /// Faults taken by the map/prefault call.
    pub map_faults: u64,
    /// Reading one byte per page of the whole file, ms.
    pub read_touch_ms: f64,
    /// Faults during the read touch.
    pub read_touch_faults: u64,
    /// Writing one byte per page of the whole file (fresh mapping), ms.
    pub write_touch_ms: f64,
    /// Faults during the write touch.
    pub write_touch_faults: u64,
}

/// Commit charge of one mapping kind.
#[derive(Debug, Clone, Serialize)]
pub struct CommitRow {
    /// The mapping kind.
    pub mapping: String,
    /// Change of `Committed_AS` (system-wide) while the 1 GiB mapping exists, kB (median).
    pub committed_delta_kb: i64,
}

/// Writing through a private or shared mapping.
#[derive(Debug, Clone, Serialize)]
pub struct PrivateRow {
    /// `MAP_SHARED` or `MAP_PRIVATE`.
    pub mapping: String,
    /// Time to write one byte per page, ms.
    pub write_touch_ms: f64,
    /// Faults during it.
    pub faults: u64,
    /// Growth of `RssAnon` (private copies of pages), kB.
    pub rss_anon_delta_kb: i64,
    /// Whether `pread` of the file sees the written bytes.
    pub file_sees_write: bool,
}

/// One small write followed by a sync.
#[derive(Debug, Clone, Serialize)]
pub struct SyncBytesRow {
    /// What was done.
    pub case: String,
    /// Operations measured.
    pub ops: u64,
    /// Median time of write + sync.
    pub median_ns: u64,
    /// Mean `/proc/self/io` `write_bytes` per op (whole folios dirtied).
    pub dirtied_bytes_per_op: u64,
    /// Mean device bytes written per op (`/sys/block/*/stat`; device-wide, noisy).
    pub device_bytes_per_op: Option<u64>,
}

fn io_fail(what: &str, e: &std::io::Error) -> Failure {
    Failure::msg(format!("flag experiments: {what}: {e}"))
}

fn median_f(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn median_u(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn read_touch(m: &[u8]) -> u64 {
    let mut sum = 0u64;
    for off in (0..m.len()).step_by(PAGE) {
        sum += u64::from(m[off]);
    }
    std::hint::black_box(sum)
}

fn write_touch(m: &mut [u8], byte: u8) {
    for off in (0..m.len()).step_by(PAGE) {
        m[off] = byte;
    }
    std::hint::black_box(&m[..]);
}

/// Runs all experiments in `dir` with a scratch file of `mib` MiB.
pub fn run(dir: &Path, mib: u64, pb: &ProgressBar) -> Result<FlagsReport, Failure> {
    let path = dir.join("flags.scratch");
    let len = mib * MIB;
    let ulen = usize::try_from(len).map_err(|_| Failure::msg("--flags-mib too large"))?;
    pb.set_message(format!(
        "flags: writing a {mib} MiB scratch file with 1 MiB pwrites"
    ));
    let file = measure::write_file(&path, len, 1 << 20).map_err(|e| io_fail("scratch file", &e))?;
    // SAFETY: `write_file` just created (truncating) this file in the benchmark directory
    // and this function keeps the only handle; nothing else opens the path, and it is
    // removed below once the last mapping is gone.
    let mut file = unsafe { ScratchFile::new(file) };

    pb.set_message("flags: MAP_POPULATE / MADV_POPULATE_WRITE");
    let populate = populate_rows(&mut file, ulen).map_err(|e| io_fail("populate", &e))?;
    pb.inc(1);

    pb.set_message("flags: MAP_NORESERVE");
    let noreserve = noreserve_rows(dir).map_err(|e| io_fail("noreserve", &e))?;
    pb.inc(1);

    pb.set_message("flags: MAP_PRIVATE vs MAP_SHARED");
    let private_vs_shared = private_rows(&mut file, ulen).map_err(|e| io_fail("private", &e))?;
    pb.inc(1);

    pb.set_message("flags: bytes per sync");
    let dev = BlockDev::of(dir);
    let sync_bytes = sync_rows(dir, &mut file, len, dev.as_ref())?;
    pb.inc(1);
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(FlagsReport {
        file_mib: mib,
        populate,
        noreserve,
        private_vs_shared,
        sync_bytes,
        block_device: dev.map(|d| d.name),
    })
}

fn populate_rows(file: &mut ScratchFile, len: usize) -> std::io::Result<Vec<PopulateRow>> {
    const REPS: usize = 3;
    let mut rows = Vec::new();
    for mode in ["plain", "MAP_POPULATE", "MADV_POPULATE_WRITE"] {
        let (mut map_ms, mut map_f, mut rt, mut rf, mut wt, mut wf) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for rep in 0..REPS {
            for write in [false, true] {
                let f0 = crate::sys::page_faults();
                let t = Instant::now();
                let flags = ScratchFlags {
                    populate: mode == "MAP_POPULATE",
                    ..ScratchFlags::default()
                };
                let mut m = file.map(len, flags)?;
                if mode == "MADV_POPULATE_WRITE" {
                    m.advise(Advice::PopulateWrite)?;
                }
                let mt = t.elapsed().as_secs_f64() * 1e3;
                let mf = faults_since(f0).0;
                let f0 = crate::sys::page_faults();
                let t = Instant::now();
                if write {
                    write_touch(&mut m, u8::try_from(rep).unwrap_or(0));
                } else {
                    read_touch(&m);
                }
                let tt = t.elapsed().as_secs_f64() * 1e3;
                let tf = faults_since(f0).0;
                drop(m);
                if write {
                    wt.push(tt);
                    wf.push(tf);
                    // Clean the pages again so every repetition starts alike.
                    file.file().sync_data()?;
                } else {
                    map_ms.push(mt);
                    map_f.push(mf);
                    rt.push(tt);
                    rf.push(tf);
                }
            }
        }
        rows.push(PopulateRow {
            mode: mode.into(),
            map_ms: median_f(&mut map_ms),
            map_faults: median_u(&mut map_f),
            read_touch_ms: median_f(&mut rt),
            read_touch_faults: median_u(&mut rf),
            write_touch_ms: median_f(&mut wt),
            write_touch_faults: median_u(&mut wf),
        });
    }
    Ok(rows)
}

fn noreserve_rows(dir: &Path) -> std::io::Result<Vec<CommitRow>> {
    const GIB: u64 = 1 << 30;
    let path = dir.join("noreserve.scratch");
    let f = measure::create_scratch(&path)?;
    // A sparse 1 GiB file: every mapped byte is inside the file, none is ever touched.
    f.set_len(GIB)?;
    // SAFETY: created (truncating) just above, its only handle is this one, and it is
    // never written at all (the experiment only maps it); nothing else opens the path.
    let mut f = unsafe { ScratchFile::new(f) };
    let len = usize::try_from(GIB).unwrap_or(usize::MAX);
    let mut rows = Vec::new();
    for (name, private, noreserve) in [
        ("MAP_SHARED", false, false),
        ("MAP_SHARED | MAP_NORESERVE", false, true),
        ("MAP_PRIVATE (writable)", true, false),
        ("MAP_PRIVATE | MAP_NORESERVE", true, true),
    ] {
        let mut deltas = Vec::new();
        for _ in 0..3 {
            let before = measure::meminfo_kb("Committed_AS").unwrap_or(0);
            let m = f.map(
                len,
                ScratchFlags {
                    populate: false,
                    noreserve,
                    private,
                },
            )?;
            let during = measure::meminfo_kb("Committed_AS").unwrap_or(0);
            drop(m);
            deltas.push(i64::try_from(during).unwrap_or(0) - i64::try_from(before).unwrap_or(0));
        }
        deltas.sort_unstable();
        rows.push(CommitRow {
            mapping: name.into(),
            committed_delta_kb: deltas[1],
        });
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(rows)
}

fn private_rows(file: &mut ScratchFile, len: usize) -> std::io::Result<Vec<PrivateRow>> {
    let mut rows = Vec::new();
    file.file().sync_data()?;
    for (name, private) in [("MAP_SHARED", false), ("MAP_PRIVATE", true)] {
        let marker = if private { 0x5A } else { 0xA5 };
        let mut m = file.map(
            len,
            ScratchFlags {
                private,
                ..ScratchFlags::default()
            },
        )?;
        let rss0 = measure::proc_status_kb("RssAnon").unwrap_or(0);
        let f0 = crate::sys::page_faults();
        let t = Instant::now();
        write_touch(&mut m, marker);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let faults = faults_since(f0).0;
        let rss1 = measure::proc_status_kb("RssAnon").unwrap_or(0);
        drop(m);
        // A shared mapping's stores stay in the page cache after unmapping; a private
        // mapping's copies are gone with it.
        let mut b = [0u8; 1];
        file.file().read_exact_at(&mut b, 0)?;
        rows.push(PrivateRow {
            mapping: name.into(),
            write_touch_ms: ms,
            faults,
            rss_anon_delta_kb: i64::try_from(rss1).unwrap_or(0) - i64::try_from(rss0).unwrap_or(0),
            file_sees_write: b[0] == marker,
        });
    }
    file.file().sync_data()?;
    Ok(rows)
}

/// Counters around a series of write + sync operations.
struct Meter<'a> {
    dev: Option<&'a BlockDev>,
    io0: u64,
    dev0: Option<u64>,
    lat: Vec<u64>,
}

impl<'a> Meter<'a> {
    fn start(dev: Option<&'a BlockDev>) -> Self {
        Meter {
            dev,
            io0: measure::proc_write_bytes().unwrap_or(0),
            dev0: dev.and_then(BlockDev::written),
            lat: Vec::new(),
        }
    }

    fn finish(mut self, case: &str) -> SyncBytesRow {
        let ops = self.lat.len() as u64;
        let io = measure::proc_write_bytes()
            .unwrap_or(0)
            .saturating_sub(self.io0);
        let dev = match (self.dev0, self.dev.and_then(BlockDev::written)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) / ops.max(1)),
            _ => None,
        };
        SyncBytesRow {
            case: case.into(),
            ops,
            median_ns: median_u(&mut self.lat),
            dirtied_bytes_per_op: io / ops.max(1),
            device_bytes_per_op: dev,
        }
    }
}

fn sync_rows(
    dir: &Path,
    file: &mut ScratchFile,
    len: u64,
    dev: Option<&BlockDev>,
) -> Result<Vec<SyncBytesRow>, Failure> {
    const OPS: u64 = 24;
    let mut rows = Vec::new();
    let ulen = usize::try_from(len).unwrap_or(usize::MAX);
    let ops = OPS.min(len / MIB);
    file.file()
        .sync_data()
        .map_err(|e| io_fail("fdatasync", &e))?;

    // 1. 128 bytes stored through a shared mapping, then msync of that 4 KiB page. Each
    //    op lands in a different (clean) 1 MiB folio.
    {
        let mut m = file
            .map(ulen, ScratchFlags::default())
            .map_err(|e| io_fail("mmap", &e))?;
        let mut meter = Meter::start(dev);
        for i in 0..ops {
            let off = usize::try_from(i * MIB).unwrap_or(0) + 8192 + 100;
            let t = Instant::now();
            m[off..off + 128].fill(0x42);
            let page = off / PAGE * PAGE;
            m.flush_range(page, PAGE)
                .map_err(|e| io_fail("msync", &e))?;
            meter.lat.push(nanos(t.elapsed()));
        }
        rows.push(
            meter.finish(
                "raw: 128 B store into a MAP_SHARED page + msync(MS_SYNC) of that 4 KiB page",
            ),
        );
    }
    // 2. The same change written with pwrite, then fdatasync.
    {
        let buf = [0x24u8; 128];
        let mut meter = Meter::start(dev);
        for i in 0..ops {
            let off = i * MIB + 3 * 8192 + 100;
            let t = Instant::now();
            let f = file.file();
            f.write_all_at(&buf, off)
                .map_err(|e| io_fail("pwrite", &e))?;
            f.sync_data().map_err(|e| io_fail("fdatasync", &e))?;
            meter.lat.push(nanos(t.elapsed()));
        }
        rows.push(meter.finish("raw: 128 B pwrite + fdatasync"));
    }
    // 3/4. mapkv's own write paths: a put then a sync, per op.
    for (case, durability) in [
        (
            "mapkv: put (memcpy into the mapping) + flush(), Durability::None",
            mapkv::Durability::None,
        ),
        (
            "mapkv: put under Durability::Always (pwrite + fdatasync)",
            mapkv::Durability::Always,
        ),
    ] {
        let path = dir.join("syncbytes.mkv");
        let _ = std::fs::remove_file(&path);
        let store = mapkv::Store::open(
            &path,
            mapkv::Options::default()
                .durability(durability)
                .initial_size(16 << 20),
        )
        .map_err(|e| Failure::store(&path, &e))?;
        let val = measure::value(3, 100);
        // Past the first write's checkpoint mark.
        store
            .put(b"warm-up", &val)
            .map_err(|e| Failure::store(&path, &e))?;
        store.flush().map_err(|e| Failure::store(&path, &e))?;
        let mut meter = Meter::start(dev);
        for i in 0..OPS {
            let t = Instant::now();
            store
                .put(measure::key(i), &val)
                .map_err(|e| Failure::store(&path, &e))?;
            if durability == mapkv::Durability::None {
                store.flush().map_err(|e| Failure::store(&path, &e))?;
            }
            meter.lat.push(nanos(t.elapsed()));
        }
        rows.push(meter.finish(case));
        store.close().map_err(|e| Failure::store(&path, &e))?;
        let _ = std::fs::remove_file(&path);
    }
    Ok(rows)
}

fn table() -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
    t
}

/// The human-readable sections.
pub fn render(r: &FlagsReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let mib = r.file_mib;

    let mut t = table();
    t.set_header(vec![
        "mapping (hot file, 1 MiB folios)",
        "mmap + prefault",
        "read 1 B/page",
        "write 1 B/page (fresh map)",
    ]);
    for p in &r.populate {
        t.add_row(vec![
            p.mode.clone(),
            format!("{} ({} faults)", fmt_secs(p.map_ms / 1e3), p.map_faults),
            format!(
                "{} ({} faults)",
                fmt_secs(p.read_touch_ms / 1e3),
                p.read_touch_faults
            ),
            format!(
                "{} ({} faults)",
                fmt_secs(p.write_touch_ms / 1e3),
                p.write_touch_faults
            ),
        ]);
    }
    let plain = r.populate.iter().find(|p| p.mode == "plain");
    let pop = r.populate.iter().find(|p| p.mode == "MAP_POPULATE");
    let verdict = match (plain, pop) {
        (Some(a), Some(b)) => format!(
            "MAP_POPULATE cost {} at mmap and saved {} read faults; first writes after it took {:.1}x \
             as long as without it ({} vs {} write faults: it maps pages read-only, so each 4 KiB page \
             takes its own write-protect fault). MADV_POPULATE_WRITE is the real write prefault, but it \
             dirties every page it touches, so mapkv applies it only to a window just ahead of the log tail.",
            fmt_secs((b.map_ms - a.map_ms).max(0.0) / 1e3),
            a.read_touch_faults.saturating_sub(b.read_touch_faults),
            b.write_touch_ms / a.write_touch_ms.max(1e-9),
            b.write_touch_faults,
            a.write_touch_faults,
        ),
        _ => String::new(),
    };
    let _ = writeln!(
        s,
        "\nPopulate on a {mib} MiB MAP_SHARED file already in the page cache (written with 1 MiB \
         pwrites), medians of 3:\n{t}\n{verdict}"
    );

    let mut t = table();
    t.set_header(vec![
        "1 GiB writable mapping of a file",
        "Committed_AS change",
    ]);
    for c in &r.noreserve {
        t.add_row(vec![
            c.mapping.clone(),
            format!("{:+} MiB", c.committed_delta_kb / 1024),
        ]);
    }
    let _ = writeln!(
        s,
        "\nMAP_NORESERVE (commit charge while the mapping exists, system-wide counter, median of 3):\n{t}\n\
         Shared file mappings are never charged (their pages are the file's page cache), so \
         MAP_NORESERVE changes nothing for mapkv's MAP_SHARED mapping; it matters only for private \
         writable and anonymous mappings."
    );

    let mut t = table();
    t.set_header(vec![
        "write 1 B/page",
        "time",
        "faults",
        "RssAnon change",
        "file sees the write",
    ]);
    for p in &r.private_vs_shared {
        t.add_row(vec![
            p.mapping.clone(),
            fmt_secs(p.write_touch_ms / 1e3),
            p.faults.to_string(),
            format!("{:+} MiB", p.rss_anon_delta_kb / 1024),
            if p.file_sees_write { "yes" } else { "no" }.into(),
        ]);
    }
    let _ = writeln!(
        s,
        "\nMAP_PRIVATE vs MAP_SHARED ({mib} MiB file):\n{t}\nA private mapping copies every written page \
         into anonymous memory and never writes it to the file: useless for a store's writes, and \
         it costs RAM. mapkv maps MAP_SHARED."
    );

    let mut t = table();
    t.set_header(vec![
        "write + sync",
        "median time",
        "dirtied per op",
        "device writes per op",
    ]);
    for b in &r.sync_bytes {
        t.add_row(vec![
            b.case.clone(),
            fmt_ns(b.median_ns),
            fmt_bytes(b.dirtied_bytes_per_op),
            b.device_bytes_per_op
                .map_or_else(|| "n/a".into(), fmt_bytes),
        ]);
    }
    let _ = writeln!(
        s,
        "\nBytes one small write + sync really sends to storage ({} ops each; `dirtied` is \
         /proc/self/io write_bytes, charged a whole page-cache folio at a time; device writes are \
         /sys/block/{}/stat deltas, device-wide, so other tenants add noise):\n{t}\n\
         msync writes back whole folios: a small change through the mapping can cost up to a \
         folio (1-2 MiB with large folios) of device writes per sync, while pwrite dirties only the \
         blocks it touches. That is why Always and Async append with pwrite.",
        r.sync_bytes.first().map_or(0, |b| b.ops),
        r.block_device.as_deref().unwrap_or("?"),
    );
    s
}
