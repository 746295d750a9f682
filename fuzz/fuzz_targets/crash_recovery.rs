//! Arbitrary operations, then a power loss at an arbitrary point (between calls, or
//! inside one of the store's syncs) with an arbitrary subset of the pages written since
//! the last sync reaching the disk, some torn (`mapkv::sim`). The store must reopen to a
//! state after a prefix of the writes that includes every write the policy promised
//! durable, verify, and keep working.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mapkv::sim::{self, Model, PageFate, Recorder, SectorFate, Write};
use mapkv::{Error, Options, Store};

#[path = "common.rs"]
mod common;
use common::Op;

#[derive(Debug, Arbitrary)]
struct Input {
    policy: u8,
    small_file: bool,
    ops: Vec<Op>,
    /// `Some(i)`: crash inside sync number `i` (mod the syncs seen); else after the ops.
    crash_in_sync: Option<u8>,
    rename_survived: bool,
    new_size: bool,
    /// Fate of each changed page, in order (missing entries: the page reached the disk).
    fates: Vec<u8>,
}

fn write_of(op: &Op) -> Option<Write> {
    Some(match op {
        Op::Put { key, len, fill } => {
            Write::Put(common::key(*key), common::value(*len, *fill, false))
        }
        Op::Big { key, fill } => Write::Put(common::key(*key), common::value(0, *fill, true)),
        Op::Delete { key } => Write::Delete(common::key(*key)),
        Op::Batch(ops) => Write::Batch(
            ops.iter()
                .take(20)
                .map(|(k, v)| (common::key(*k), v.map(|(l, f)| common::value(l, f, false))))
                .collect(),
        ),
        _ => return None,
    })
}

fuzz_target!(|input: Input| {
    let policy = common::policy(input.policy);
    let path = common::fresh("crash.store");
    let img = common::fresh("crash.img");
    let rec = Arc::new(Recorder::new(policy, u64::from(input.policy)));
    rec.baseline(&path).expect("baseline");
    if input.crash_in_sync.is_some() {
        // Each capture holds two copies of the file: keep memory bounded.
        rec.capture_in_syncs(1.0, 16);
    }
    let size = if input.small_file { 12 << 10 } else { 1 << 20 };
    let opts = Options::default().durability(policy).initial_size(size);
    let opts = rec.observe(common::checkpoint_keys(opts, input.policy));
    let mut store = Some(Store::open(&path, opts.clone()).expect("create"));
    rec.mark_durable().expect("creation is durable");
    let mut model = Model::new();
    let mut big = 0;
    for op in input.ops.iter().take(200) {
        let s = store.as_ref().expect("open");
        if matches!(op, Op::Big { .. }) {
            // At most 8 values of 300 KiB: files (and captures) stay a few MiB.
            big += 1;
            if big > 8 {
                continue;
            }
        }
        if let Some(w) = write_of(op) {
            rec.begin_write();
            model.apply(&w);
            w.apply(s).expect("write");
            rec.ack_write();
            continue;
        }
        match op {
            Op::Flush => {
                s.flush().expect("flush");
                rec.flushed();
            }
            Op::Reopen => {
                store.take().expect("open").close().expect("close");
                rec.flushed();
                store = Some(Store::open(&path, opts.clone()).expect("reopen"));
            }
            Op::Compact => match s.compact() {
                Ok(()) | Err(Error::Unsupported(_)) => {}
                Err(e) => panic!("compact: {e}"),
            },
            // Writes are handled above; reads change nothing a crash could leave.
            Op::Put { .. }
            | Op::Big { .. }
            | Op::Delete { .. }
            | Op::Batch(_)
            | Op::Get { .. }
            | Op::Iterate => {}
        }
    }
    let capture = match input.crash_in_sync {
        Some(i) => {
            let mut caps = rec.take_captures();
            if caps.is_empty() {
                rec.crash_point().expect("crash point")
            } else {
                let n = caps.len();
                caps.swap_remove(usize::from(i) % n)
            }
        }
        None => rec.crash_point().expect("crash point"),
    };
    drop(store);
    let mut fates = input.fates.iter();
    let image = capture.image(input.rename_survived, input.new_size, |_| {
        match fates.next() {
            None => PageFate::New,
            Some(b) if b % 4 == 0 => PageFate::Old,
            Some(b) if b % 4 == 1 => PageFate::New,
            Some(b) => {
                let mut s = [SectorFate::Old; 8];
                for (i, f) in s.iter_mut().enumerate() {
                    *f = match (b >> (i % 4)) & 3 {
                        0 => SectorFate::Old,
                        1 | 2 => SectorFate::New,
                        _ => SectorFate::Garbage(u64::from(*b) * 8 + i as u64),
                    };
                }
                PageFate::Torn(s)
            }
        }
    });
    let (lo, hi) = (capture.min_writes as usize, capture.max_writes as usize);
    if let Err(e) = sim::check_image(&image, &img, &model, lo, hi) {
        panic!(
            "{policy:?}, crash {:?} at sync {}: {e}",
            capture.during, capture.sync_no
        );
    }
    assert!(rec.problems().is_empty(), "{:?}", rec.problems());
    let _ = Store::open(&img, Options::default()).map(|s| s.close());
});
