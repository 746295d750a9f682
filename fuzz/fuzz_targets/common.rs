//! Helpers shared by the fuzz targets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use mapkv::Durability;

/// One step of an operation sequence (`ops_model`, `crash_recovery`). Keys are small key
/// numbers ([`key`]), values a length and a fill byte ([`value`]).
///
/// The order of the variants is part of the corpus format (`arbitrary` picks a variant
/// from a number in proportion to their count): adding, removing or reordering variants
/// changes what every committed seed decodes to.
#[derive(Debug, Arbitrary)]
pub enum Op {
    /// `put(key(key), value(len, fill, false))`.
    Put { key: u8, len: u16, fill: u8 },
    /// A put of a value over the store's `pwrite` threshold.
    Big { key: u8, fill: u8 },
    /// `delete(key(key))`.
    Delete { key: u8 },
    /// A batch: `Some((len, fill))` is a put, `None` a delete (the first 20 are used).
    Batch(Vec<(u8, Option<(u16, u8)>)>),
    /// `get(key(key))`, compared with the model (`ops_model`; a no-op in
    /// `crash_recovery`).
    Get { key: u8 },
    /// `flush()`.
    Flush,
    /// A clean close and a reopen.
    Reopen,
    /// `compact()` (`Unsupported` is fine).
    Compact,
    /// A full comparison with the model (`ops_model`; a no-op in `crash_recovery`).
    Iterate,
}

/// A per-process scratch directory, on tmpfs when there is one (stores sync a lot).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        // Remove the scratch directories of fuzz processes that are gone.
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("mapkv-fuzz-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let d = base.join(format!("mapkv-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

/// A fresh path in the scratch directory (the file removed).
pub fn fresh(name: &str) -> PathBuf {
    let p = scratch().join(name);
    let _ = std::fs::remove_file(&p);
    p
}

/// One of the four policies (Periodic with a short interval, so the flusher runs).
pub fn policy(b: u8) -> Durability {
    match b % 4 {
        0 => Durability::None,
        1 => Durability::Async,
        2 => Durability::Periodic(std::time::Duration::from_millis(2)),
        _ => Durability::Always,
    }
}

/// `Options::checkpoint_keys` from the policy byte's upper bits (the low two choose the
/// policy): half the inputs checkpoint every 4 to 32 changed keys, so background
/// checkpoints and index growth run (and crash points land in them) within an input.
pub fn checkpoint_keys(opts: mapkv::Options, b: u8) -> mapkv::Options {
    if b & 0x80 != 0 {
        opts.checkpoint_keys(usize::from((b >> 4) & 0x7) * 4 + 4)
    } else {
        opts
    }
}

/// The key for a small key number (255 is the empty key).
pub fn key(k: u8) -> Vec<u8> {
    if k == 255 {
        Vec::new()
    } else {
        format!("k{}", k % 64).into_bytes()
    }
}

/// A value of `len` bytes derived from `fill` (a length of 0 is an empty value; lengths
/// over 16 KiB are capped to keep runs fast, except `big`, which crosses the store's
/// pwrite threshold).
pub fn value(len: u16, fill: u8, big: bool) -> Vec<u8> {
    let n = if big {
        300 << 10
    } else {
        usize::from(len) % (16 << 10)
    };
    (0..n).map(|i| fill.wrapping_add((i % 251) as u8)).collect()
}
