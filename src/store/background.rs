//! The background thread: allocation and prefaulting ahead of the tail, write-back
//! behind it, and the periodic syncs of `Periodic` and `Async`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::inner::{Background, Inner, Writer};

/// Window kept prefaulted writable ahead of the tail under `None`/`Periodic`.
pub(super) const PREFAULT_WINDOW: u64 = 4 << 20;
/// The window is prefaulted this much per `MADV_POPULATE_WRITE`. The call holds the
/// process's memory-map lock (read) throughout, and a page's first write fault into
/// preallocated space can wait for the file system (`ext4_page_mkwrite`: tens of ms
/// seen on the writer's own faults at 20M keys); a thread that maps memory meanwhile
/// (the writer growing its heap with `brk`, for a larger delta table) needs the lock
/// exclusively and waits for the whole call. Smaller calls bound that wait, and the
/// wait of a compaction's switch for `released_to`.
const PREFAULT_PIECE: u64 = 512 << 10;
/// `None`/`Periodic` start write-back of the log behind the tail in steps this large.
pub(super) const WRITEBACK_STEP: u64 = 8 << 20;
/// The background thread submits write-back in pieces this large (see `background`).
pub(super) const WRITEBACK_PIECE: u64 = 1 << 20;
/// The largest page-cache folio the log tail can sit in (see `tail_work`).
pub(super) const TAIL_FOLIO: u64 = 2 << 20;

/// The background thread: runs the tail work the write path hands over (see
/// `Inner::tail_work`) and, every `every`, a sync of everything published.
pub(super) fn background(inner: &Inner, every: Option<std::time::Duration>) {
    // (An interval too long for the clock to reach means no periodic sync at all.)
    inner.background.lock().sync_every =
        every.and_then(|e| Some((e, std::time::Instant::now().checked_add(e)?)));
    loop {
        #[cfg(test)]
        super::tests::background_may_run(inner);
        let (prefault, writeback, allocate, garbage, resolve, next_delta) = {
            let mut bg = inner.background.lock();
            loop {
                if bg.stop {
                    return;
                }
                if bg.prefault.is_some()
                    || bg.writeback.is_some()
                    || bg.allocate.is_some()
                    || !bg.garbage.is_empty()
                    || bg.resolve
                    || bg.spare_ask.is_some()
                    || bg.next_delta_ask.is_some()
                    || bg.compact
                {
                    break;
                }
                match bg.sync_every {
                    Some((_, n)) if std::time::Instant::now() >= n => break,
                    Some((_, n)) => {
                        let _ = inner.background_cv.wait_until(&mut bg, n);
                    }
                    None => inner.background_cv.wait(&mut bg),
                }
            }
            (
                bg.prefault.take(),
                bg.writeback.take(),
                bg.allocate.take(),
                std::mem::take(&mut bg.garbage),
                std::mem::take(&mut bg.resolve),
                bg.next_delta_ask.take(),
            )
        };
        // Freed here, with no lock held.
        drop(garbage);
        inner.spare_asked();
        if let Some(keys) = next_delta {
            inner.prepare_next_delta(keys);
        }
        if let Some((file, from, to)) = allocate {
            inner.allocate_ahead(&file, from, to);
        }
        inner.compaction_asked();
        if resolve {
            inner.resolve_backlog();
            // The write path checks the threshold only as it writes: a writer that
            // stopped with the backlog that crossed it would leave the store as it is.
            if inner.compaction_due() {
                if let Some(me) = inner.me.get().and_then(std::sync::Weak::upgrade) {
                    me.start_auto_compaction();
                }
            }
        }
        if let Some((map, from, to)) = prefault {
            inner.prefault(&map, from, to);
        }
        if let Some((file, from, to)) = writeback {
            // In pieces, prefaulting in between as asked: submitting write-back takes
            // milliseconds per step, long enough for a fast writer to run past a
            // prefault window it waits for.
            let (map, gen) = {
                let st = inner.state.read();
                (Arc::clone(&st.map), inner.file_gen.load(Ordering::Acquire))
            };
            let mut at = from;
            while at < to {
                let piece = (to - at).min(WRITEBACK_PIECE);
                inner.release_behind(&map, gen, at + piece);
                // A hint: the sync that follows reports any write-back error.
                let _ = file.start_writeback(at, piece);
                at += piece;
                inner.urgent_work();
            }
        }
        inner.periodic_sync();
    }
}

impl Inner {
    /// True if appends dirty the log's pages through the mapping (`None`/`Periodic`),
    /// rather than with `pwrite`.
    pub(super) fn appends_through_mapping(&self) -> bool {
        !(self.copy_on_write
            || matches!(
                self.opts.durability,
                crate::Durability::Always | crate::Durability::Async
            ))
    }

    /// Before write-back or a sync of the log up to `upto` (at most the start of the
    /// tail's folio, where the writer still writes): drops this process's mapping of the
    /// log's pages written since the last release (`Mapping::release_pages`). Write-back
    /// write-protects every page still mapped writable with a TLB shootdown of its own,
    /// an IPI to each other CPU running this process (a VM exit each on the development
    /// VM): those took a third of all the store's CPU time in a 1M-key fill, and a 1M-key
    /// fill went from 1.06-1.15M to 1.44-1.77M puts/s without them. Reads of those pages
    /// map them again (a minor fault per page). Only where appends go through the
    /// mapping: `pwrite` leaves no writable entries behind. `map` belongs to file
    /// generation `gen`; a map of a file that compaction has replaced since is left
    /// alone (its offsets would hold the new file's mark back).
    pub(super) fn release_behind(&self, map: &crate::map::Mapping, gen: u64, upto: u64) {
        if !self.appends_through_mapping() {
            return;
        }
        let upto = upto.min(map.published() & !(TAIL_FOLIO - 1));
        // The release happens under the mark's lock: a caller that finds the mark at or
        // past its range knows the pages are released (a sync after a release that was
        // only claimed would find them still mapped).
        let mut mark = self.released_to.lock();
        if mark.0 != gen || upto <= mark.1 {
            return;
        }
        map.release_pages(mark.1, upto - mark.1);
        mark.1 = upto;
    }

    /// Between pieces of longer work on the background thread: the work a writer may
    /// soon wait for, the allocation of the next growth step and the prefault ahead of
    /// the tail. (Resolving counters during a long overwrite can go on for seconds; the
    /// writer then ran out of allocated space and grew the file itself.)
    pub(super) fn urgent_work(&self) {
        // The promise of `Periodic` and `Async` first: counter resolution during a long
        // overwrite went on for seconds, and the syncs due meanwhile waited for it.
        self.periodic_sync();
        self.prefault_asked();
        self.spare_asked();
        // The delta tables retired meanwhile, hundreds of MB at 20M keys: resolution
        // that went on through a whole 20M-key fill kept 205 of them, and the fill's
        // anonymous memory peaked at 1 GiB rather than about 300 MiB.
        let garbage = std::mem::take(&mut self.background.lock().garbage);
        drop(garbage);
        let next_delta = self.background.lock().next_delta_ask.take();
        if let Some(keys) = next_delta {
            self.prepare_next_delta(keys);
        }
        self.compaction_asked();
        let allocate = self.background.lock().allocate.take();
        if let Some((file, from, to)) = allocate {
            self.allocate_ahead(&file, from, to);
        }
    }

    /// True under `Periodic` if the flusher's next sync is a whole interval late.
    pub(super) fn periodic_overdue(&self, bg: &Background) -> bool {
        match (self.opts.durability, bg.sync_every) {
            (crate::Durability::Periodic(_), Some((every, next))) => next
                .checked_add(every)
                .is_some_and(|late| std::time::Instant::now() > late),
            _ => false,
        }
    }

    /// The sync of everything published, if `Periodic`'s or `Async`'s interval says one
    /// is due.
    pub(super) fn periodic_sync(&self) {
        {
            let mut bg = self.background.lock();
            let now = std::time::Instant::now();
            match bg.sync_every {
                Some((every, next)) if now >= next => {
                    bg.sync_every = now.checked_add(every).map(|n| (every, n));
                }
                _ => return,
            }
        }
        let (gen, end) = self.published_end();
        // An error poisons the store; writers will report it.
        let _ = self.sync_to(gen, end);
    }

    /// Starts the automatic compaction a writer asked for, if it did (see
    /// `Inner::ask_auto_compaction`).
    fn compaction_asked(&self) {
        if !std::mem::take(&mut self.background.lock().compact) {
            return;
        }
        if let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) {
            me.start_auto_compaction();
        }
    }

    /// The writer's asks for memory: the delta table it asked for (see
    /// `Delta::spare_wanted`), and chunks for its queue of unresolved keys (see
    /// `index::queue`). Also between the pieces of longer work (allocation, prefault,
    /// write-back): a table that came late made the writer allocate 2-13 MB itself.
    pub(super) fn spare_asked(&self) {
        crate::index::queue::stock(crate::index::queue::POOL_TARGET);
        let spare = self.background.lock().spare_ask.take();
        if let Some(slots) = spare {
            self.prepare_spare(slots);
        }
    }

    /// Prepares the delta of `keys` keys a checkpoint's freeze will take (see
    /// `Background::next_delta`).
    fn prepare_next_delta(&self, keys: usize) {
        let d = crate::index::Delta::prepared(keys);
        let old = self.background.lock().next_delta.replace(d);
        drop(old);
    }

    /// Allocates the delta table of `slots` slots that the writer asked for (see
    /// `Delta::spare_wanted`), for the writer to take.
    fn prepare_spare(&self, slots: usize) {
        let t = crate::index::SpareTable::allocate(slots);
        let old = self.background.lock().spare.replace(t);
        self.spare_ready.store(true, Ordering::Release);
        drop(old);
    }

    /// Prefaults the window ahead of the tail that the writer asked for, if it did.
    pub(super) fn prefault_asked(&self) {
        let asked = self.background.lock().prefault.take();
        if let Some((map, from, to)) = asked {
            self.prefault(&map, from, to);
        }
    }

    /// Prefaults `[from, to)` of `map` writable, never at the same time as a release
    /// (see `Inner::released_to`), a [`PREFAULT_PIECE`] at a time.
    fn prefault(&self, map: &crate::map::Mapping, from: u64, to: u64) {
        let mut at = from;
        while at < to {
            let end = (at + PREFAULT_PIECE).min(to);
            let mark = self.released_to.lock();
            map.prefault_write(at, end - at);
            self.prefaulted_bytes.fetch_add(end - at, Ordering::Relaxed);
            at = end;
            drop(mark);
            self.spare_asked();
        }
    }

    /// Looks up the old records of the delta's unresolved keys (see `crate::resolve`),
    /// a piece at a time (see `Inner::resolve_piece`), keeping the log tail prefaulted
    /// in between as asked. On the background thread, at close, and after a
    /// compaction's switch.
    pub(super) fn resolve_backlog(&self) {
        while self.resolve_piece() {
            self.urgent_work();
        }
        self.resolve_asked
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Under `None`/`Periodic`, asks the background thread to keep the log ahead of the
    /// tail prefaulted writable and to start write-back of what the tail has left behind.
    ///
    /// - Ahead: `MADV_POPULATE_WRITE` of the next `PREFAULT_WINDOW` (the only real write
    ///   prefault: `MAP_POPULATE` maps shared pages read-only), so appends take no page
    ///   fault. Those pages are dirty zeros until written; a sync meanwhile writes them.
    /// - Behind: `sync_file_range(WRITE)` in steps of `WRITEBACK_STEP` (no wait, no device
    ///   flush). The next checkpoint's (or periodic) sync must write those pages anyway;
    ///   started early, the device does it while the writer goes on, and that sync finds
    ///   them clean: the first sync of a checkpoint after 450k puts fell from ~35 ms to
    ///   ~5 ms. The tail's own (up to 2 MiB) folio is left alone: writing it back would
    ///   write-protect the page that the next append stores into.
    ///
    /// A sync writes the prefaulted pages too (dirty zeros) and write-protects them, so
    /// the writer's next store into each took a fault of its own (`ext4_page_mkwrite`,
    /// once 249 ms at 30M keys). After a sync the pages the writer will soon reach are
    /// prefaulted again: an eighth of what it wrote since the sync before, at most the
    /// window, so a slow writer under `Periodic` does not have megabytes of zeros
    /// written at every sync.
    ///
    /// Returns true if `Periodic`'s sync is overdue by a whole interval (checked every
    /// `WRITEBACK_STEP` of appends): the flusher cannot keep up with the writer (the
    /// disk is slower than the writes), and the caller makes this write durable itself
    /// before it returns, which bounds what a power loss can take to about two
    /// intervals and a sync.
    pub(super) fn tail_work(&self, w: &mut Writer) -> bool {
        let mut prefault = None;
        let syncs = self.syncs.load(Ordering::Relaxed);
        if syncs != w.syncs_seen {
            let again = (w.end.saturating_sub(w.end_at_sync) / 8).min(PREFAULT_WINDOW);
            let from = crate::format::page_down(w.end);
            let to = crate::format::page_up(w.end + again).min(w.prefaulted);
            if to > from {
                prefault = Some((Arc::clone(w.tail.mapping()), from, to));
            }
            w.syncs_seen = syncs;
            w.end_at_sync = w.end;
        }
        // (Not both at once: joined into one range, they would dirty again the synced
        // pages between them too. The window is topped up at the next write.)
        if prefault.is_none() && w.end + PREFAULT_WINDOW / 2 >= w.prefaulted {
            let from = crate::format::page_down(w.end.max(w.prefaulted));
            let to = (from + PREFAULT_WINDOW).min(w.alloc);
            if to > from {
                prefault = Some((Arc::clone(w.tail.mapping()), from, to));
                w.prefaulted = to;
            }
        }
        let mut writeback = None;
        let behind = w.end & !(TAIL_FOLIO - 1);
        if behind >= w.written_back + WRITEBACK_STEP {
            writeback = Some((Arc::clone(&w.file), w.written_back, behind));
            w.written_back = behind;
        }
        if prefault.is_none() && writeback.is_none() {
            return false;
        }
        let mut bg = self.background.lock();
        if let Some(p) = prefault {
            Background::merge(&mut bg.prefault, p);
        }
        let mut overdue = false;
        if let Some(wb) = writeback {
            Background::merge(&mut bg.writeback, wb);
            overdue = self.periodic_overdue(&bg);
        }
        self.background_cv.notify_all();
        overdue
    }
}
