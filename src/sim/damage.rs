//! Damaged files: truncated, bit-flipped, zeroed, random and foreign files must be refused
//! with a typed error or salvaged, never panic.

use std::path::Path;

use crate::format::PAGE;
use crate::{Durability, Error, Options, Store};

use super::{Rng, Workload};

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
    /// Targeted flips ([`targeted_round`]) in an index bucket, found by reads or verify.
    pub bucket_flips: u64,
    /// Targeted flips in a log record below the durable end: refused by open, or (in the
    /// checkpointed log, which the O(1) open does not read) found by reads and verify.
    pub record_flips: u64,
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

/// Where a flip goes in [`targeted_round`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A byte of an index bucket in use by the current checkpoint.
    Bucket,
    /// A byte of a log record (the whole log of a sample store is durable).
    Record,
}

/// One flipped byte in a bucket or a record of `good` (a [`sample_store`], whose whole
/// log is durable), with the outcome checked against the pairs `good` holds: the open
/// is refused with `Error::Corrupt` and leaves the file as it was, or it opens and every
/// `get` returns the right value or a corruption error (never `Ok(None)` or another
/// value), and a `verify()` finds the damage. Violations go to `rep`.
pub fn targeted_round(
    good: &[u8],
    target: Target,
    path: &Path,
    rng: &mut Rng,
    rep: &mut DamageReport,
) {
    use crate::format::{
        checkpoint_off, decode_checkpoint, decode_record, decode_static, jump_target, KIND_JUMP,
    };
    let Ok(info) = decode_static(good) else {
        rep.violations
            .push("targeted: sample store has no valid header".into());
        return;
    };
    let truth = {
        let _ = std::fs::remove_file(path);
        let r = std::fs::write(path, good)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                Store::open(path, Options::default().read_only(true)).map_err(|e| e.to_string())
            })
            .and_then(|s| super::read_all(&s));
        match r {
            Ok(t) => t,
            Err(e) => {
                rep.violations
                    .push(format!("targeted: sample store unreadable: {e}"));
                return;
            }
        }
    };
    let pos = match target {
        Target::Bucket => {
            let ckpt = (0..2)
                .filter_map(|i| {
                    good.get(checkpoint_off(i) as usize..)
                        .and_then(|b| decode_checkpoint(info.seed, b))
                })
                .max_by_key(|c| c.seq);
            let Some(c) = ckpt else { return };
            c.index_off as usize + rng.index((c.index_buckets * PAGE) as usize)
        }
        Target::Record => {
            let mut recs = Vec::new();
            let mut at = info.log_start;
            while let Ok(r) = decode_record(good, info.seed, at, good.len() as u64) {
                at = match jump_target(good, &r) {
                    Some(t) if r.kind == KIND_JUMP => t,
                    _ => r.end(),
                };
                if r.kind != KIND_JUMP {
                    recs.push(r);
                }
            }
            if recs.is_empty() {
                return;
            }
            let r = recs[rng.index(recs.len())];
            (r.offset + rng.below(r.len())) as usize
        }
    };
    let mut bytes = good.to_vec();
    bytes[pos] ^= 1 << rng.below(8);
    let what = format!("{target:?} flip at byte {pos}");
    let _ = std::fs::remove_file(path);
    if let Err(e) = std::fs::write(path, &bytes) {
        rep.violations.push(format!("writing damaged file: {e}"));
        return;
    }
    let r = std::panic::catch_unwind(|| -> Result<(), String> {
        let store = match Store::open(path, Options::default().read_only(true)) {
            Err(Error::Corrupt { .. }) => {
                let now = std::fs::read(path).map_err(|e| e.to_string())?;
                return if now == bytes {
                    Ok(())
                } else {
                    Err("a refused open changed the file".into())
                };
            }
            Err(e) => return Err(format!("open failed with {e}")),
            Ok(s) => s,
        };
        for (k, v) in &truth {
            match store.get(k) {
                Ok(Some(g)) if g == *v => {}
                Err(e) if e.is_corruption() => {}
                Ok(other) => {
                    return Err(format!(
                        "get of a key with {} bytes returned {:?} bytes: damage hidden",
                        v.len(),
                        other.map(|g| g.len())
                    ))
                }
                Err(e) => return Err(format!("get failed with {e}")),
            }
        }
        match store.verify() {
            Err(e) if e.is_corruption() => Ok(()),
            other => Err(format!("verify missed the damage: {other:?}")),
        }
    });
    match r {
        Ok(Ok(())) => match target {
            Target::Bucket => rep.bucket_flips += 1,
            Target::Record => rep.record_flips += 1,
        },
        Ok(Err(e)) => rep.violations.push(format!("{what}: {e}")),
        Err(_) => rep.violations.push(format!("{what}: PANIC")),
    }
}

/// Damaged-file rounds: while `more(i)` (`i` counts files from 0), damages a small valid
/// store ([`sample_store`] in `dir`, of 30 to 330 keys, a new one every 40 files) at
/// random ([`damage`]) and checks it ([`damage_round`], on `dir/damaged.mkv`); every
/// fourth round also flips a byte of a bucket or a record ([`targeted_round`]).
///
/// # Errors
/// A sample store could not be built (violations are in the report).
pub fn damage_rounds(
    dir: &Path,
    rng: &mut Rng,
    mut more: impl FnMut(u64) -> bool,
) -> Result<DamageReport, String> {
    let mut rep = DamageReport::default();
    let path = dir.join("damaged.mkv");
    let mut good = Vec::new();
    let mut i = 0u64;
    while more(i) {
        if i.is_multiple_of(40) {
            good = sample_store(dir, 30 + rng.below(300), rng.next_u64())
                .map_err(|e| format!("building a sample store: {e}"))?;
        }
        let (bytes, what) = damage(&good, rng);
        damage_round(&bytes, &what, &path, &mut rep);
        if i.is_multiple_of(4) {
            let target = if i.is_multiple_of(8) {
                Target::Bucket
            } else {
                Target::Record
            };
            targeted_round(&good, target, &path, rng, &mut rep);
        }
        i += 1;
    }
    let _ = std::fs::remove_file(&path);
    Ok(rep)
}
