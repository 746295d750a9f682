//! Following a store's committed changes: [`Store::follow`](crate::Store::follow) and
//! [`Follower`].
//!
//! The log is the truth: a follower scans it from a position, as recovery and readers in
//! other processes do, and reports each committed write. It holds the file it is reading
//! (a `FileGen`), so compaction, which moves the store to a new file, never makes it miss
//! or repeat a change: it finishes the old file, then goes on where the new one's own
//! writes start.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::inner::Inner;
use crate::error::{Error, Result};
use crate::format::KIND_DELETE;
use crate::log::{scan, StopReason};
use crate::state::FileGen;

/// One committed change, as a [`Follower`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `key` was set to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// Its new value.
        value: Vec<u8>,
    },
    /// `key` was deleted (reported even if it did not exist: the log records the call).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// Reads, in commit order, every change committed after a position of the store: the
/// end of the snapshot [`Store::follow`](crate::Store::follow) returned with it, or the
/// end of the log when [`Store::changes`](crate::Store::changes) made it. Changes of one
/// [`Batch`](crate::Batch) come together, in the batch's order, in one call.
///
/// Works in the writer's process (it sees writes as they are published) and in readers
/// (it sees what the writer committed: under `Always`, durable writes), across file
/// growth and compaction. It holds the files it has not finished reading: one left
/// behind by compaction stays allocated until the follower has read past it.
#[derive(Debug)]
pub struct Follower {
    inner: Arc<Inner>,
    gen: Arc<FileGen>,
    pos: u64,
}

impl Follower {
    pub(super) fn new(inner: Arc<Inner>, gen: Arc<FileGen>, pos: u64) -> Follower {
        Follower { inner, gen, pos }
    }

    /// The changes committed since the last call (or since the follower's start); empty
    /// if there are none. Never blocks on the writer.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if a record the writer committed fails its checksum; I/O errors
    /// of a reader catching up. The follower stays where it was and may be polled again.
    /// [`Error::Lagged`] (in a reader process) once, after the changes before it, if the
    /// writer compacted the store more than once since the reader last called it: the
    /// changes made in the file in between are lost; the follower goes on from the
    /// current file.
    pub fn poll(&mut self) -> Result<Vec<Change>> {
        // A reader first catches up with its writer (which moves it to a new file after
        // compaction, and publishes what it replayed).
        drop(self.inner.view()?);
        let mut out = Vec::new();
        loop {
            let seed = self.gen.seed;
            // `next` first: once it is set, the file's published end is final.
            let next = self.gen.next.get().cloned();
            let map = Arc::clone(&self.gen.map.lock());
            let end = map.published();
            if end > self.pos {
                let mut batch = Vec::new();
                let scanned = scan(map.published_bytes(), seed, self.pos, end, |recs| {
                    for r in recs {
                        let key = map
                            .read(r.key_off(), u64::from(r.key_len))
                            .unwrap_or(&[])
                            .to_vec();
                        batch.push(if r.kind == KIND_DELETE {
                            Change::Delete { key }
                        } else {
                            let value = map
                                .read(r.val_off(), u64::from(r.val_len))
                                .unwrap_or(&[])
                                .to_vec();
                            Change::Put { key, value }
                        });
                    }
                });
                if scanned.valid_end != end || scanned.stop != StopReason::End {
                    return Err(Error::corrupt(
                        scanned.valid_end,
                        "damaged record below the committed end (following changes)",
                    ));
                }
                out.append(&mut batch);
                self.pos = end;
            }
            match next {
                Some(n) if n.after_gap.load(Ordering::Acquire) => {
                    // The changes of the files in between are lost: report that after
                    // the ones before (the next call), then go on from the new file.
                    if !out.is_empty() {
                        return Ok(out);
                    }
                    self.pos = n.start;
                    self.gen = n;
                    return Err(Error::Lagged {
                        path: Some(self.inner.path.clone()),
                    });
                }
                Some(n) => {
                    self.pos = n.start;
                    self.gen = n;
                }
                None => return Ok(out),
            }
        }
    }

    /// Like [`Follower::poll`], but waits up to `timeout` for at least one change
    /// (polling every millisecond or so: followers register nowhere, so nothing wakes
    /// them).
    ///
    /// # Errors
    /// As for [`Follower::poll`].
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Change>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(200);
        loop {
            let changes = self.poll()?;
            if !changes.is_empty() || Instant::now() >= deadline {
                return Ok(changes);
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}
