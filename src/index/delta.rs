//! The delta: changes since the last checkpoint, an in-memory map from key hash to the
//! newest record for that key.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::queue::HashQueue;
use crate::anon::AnonVec;
use crate::format::bucket_of;

/// `Hasher` for keys that already are good 64-bit hashes.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdentityHasher>>;

/// Delta values carry "this is a delete" in the top bit (file offsets stay below 2^62), so
/// a checkpoint knows each entry's kind without reading the record.
const DELETE_TAG: u64 = 1 << 63;
/// "The key's state in the index is not yet known": see [`Delta::set`].
const UNRESOLVED_TAG: u64 = 1 << 62;

fn untag(v: u64) -> (u64, bool) {
    (v & !(DELETE_TAG | UNRESOLVED_TAG), v & DELETE_TAG != 0)
}

/// One key's entry in the [`Delta`] (16 bytes: checkpoints sort hundreds of thousands).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub(crate) struct DeltaEntry {
    /// The key's hash.
    pub(crate) hash: u64,
    /// The offset with the delete and unresolved tags.
    tagged: u64,
}

impl DeltaEntry {
    /// Offset of the newest record for the key.
    pub(crate) fn off(&self) -> u64 {
        untag(self.tagged).0
    }

    /// That record is a delete.
    pub(crate) fn delete(&self) -> bool {
        self.tagged & DELETE_TAG != 0
    }

    /// The key's old state in the index is not yet in the counters.
    pub(crate) fn unresolved(&self) -> bool {
        self.tagged & UNRESOLVED_TAG != 0
    }

    /// Marks this copy of the entry resolved (its old state was counted).
    pub(crate) fn settle(&mut self) {
        self.tagged &= !UNRESOLVED_TAG;
    }
}

/// Sorts delta entries by their bucket in an index of `buckets` buckets (a power of two).
/// Many entries per bucket (a bulk load) take a counting sort, O(entries + buckets), that
/// reads `entries` sequentially twice.
pub(crate) fn sort_by_bucket(
    mut entries: AnonVec<DeltaEntry>,
    buckets: u64,
) -> AnonVec<DeltaEntry> {
    let nb = usize::try_from(buckets).unwrap_or(usize::MAX);
    if nb > entries.len().saturating_mul(4) {
        entries.sort_unstable_by_key(|e| bucket_of(e.hash, buckets));
        return entries;
    }
    let mut start = vec![0u32; nb + 1];
    for e in entries.iter() {
        start[bucket_of(e.hash, buckets) as usize + 1] += 1;
    }
    for i in 0..nb {
        start[i + 1] += start[i];
    }
    let mut sorted = AnonVec::zeroed(entries.len());
    for &e in entries.iter() {
        let at = &mut start[bucket_of(e.hash, buckets) as usize];
        sorted[*at as usize] = e;
        *at += 1;
    }
    sorted
}

/// One slot of a [`Table`]: a key hash and its tagged offset (0: empty).
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Slot {
    hash: u64,
    tagged: u64,
}

/// The delta's main table: key hash → tagged offset, open addressing with linear
/// probing. A delta never removes an entry (it replaces them, or is dropped whole), so
/// there are no tombstones. A slot whose value is 0 is empty (no record lives at offset
/// 0). Unlike a `HashMap`, its layout is known: the writer prefetches the slot a key
/// will probe first before it takes the state lock (see [`Delta::slot_hint`]), so the
/// cache miss of the insert overlaps the write's other work instead of stalling under
/// the lock.
///
/// Growth is incremental: a full table moves into one twice its size a few slots per
/// insert ([`Table::MOVE_PER_INSERT`]) rather than all at once, which took 15-21 ms
/// under the state lock at 367k entries (every write and read waited for it). While
/// entries move, a lookup tries the new table, then the old one's unmoved part.
#[derive(Debug, Default)]
struct Table {
    /// 0 or a power of two of them.
    slots: Vec<Slot>,
    /// Entries in both tables.
    len: usize,
    /// The table being moved out of (empty when none).
    old: Vec<Slot>,
    /// `old[..moved]` is in `slots` already.
    moved: usize,
    /// An old table whose entries have all moved, not freed yet (see
    /// [`Delta::take_retired`]).
    retired: Option<Vec<Slot>>,
    /// The next table (twice `slots`), allocated once `slots` is half full (by the table
    /// itself up to `LOCAL_SPARE_MAX` slots, else handed in: [`Table::give_spare`]):
    /// one page of it is written per insert, so that its pages are mapped by a write before growth
    /// (empty when none). Left to first touches, a fresh table's page is read first (a
    /// lookup maps the shared zero page) and written next: a copy-on-write fault that
    /// flushes the TLBs of every CPU running the store's threads, an IPI each on a VM.
    spare: Vec<Slot>,
    /// Pages of `spare` written so far.
    spare_pages: usize,
}

/// Largest table a prepared delta starts with (see [`Delta::prepared`]): 16 MiB.
const PREPARED_MAX_SLOTS: usize = 1 << 20;

/// Slots in a 4 KiB page.
const SLOTS_PER_PAGE: usize = 4096 / std::mem::size_of::<Slot>();

/// A table the delta no longer uses: freeing it (returning tens of MB to the system)
/// took 3-17 ms, so the store drops it away from its locks and its writer.
#[derive(Debug)]
pub(crate) struct Retired(#[allow(dead_code)] Vec<Slot>);

/// A delta's next table, allocated by another thread than the writer's (see
/// [`Delta::spare_wanted`]). Its pages are left untouched: the table writes them a page
/// per insert as it fills ([`Table::prepare_spare`]), so a table that is never grown
/// into (the delta is frozen first) costs mostly address space, not memory (where the
/// allocator maps it fresh, as it does for tables above its mmap threshold).
#[derive(Debug)]
pub(crate) struct SpareTable(Vec<Slot>);

impl SpareTable {
    /// A zeroed table of `slots` slots.
    pub(crate) fn allocate(slots: usize) -> SpareTable {
        SpareTable(bytemuck::zeroed_vec(slots))
    }

    /// Its slots, as memory to free away from the writer.
    pub(crate) fn retire(self) -> Retired {
        Retired(self.0)
    }
}

/// A copy without the next table: a copy (a compaction's snapshot, a frozen delta's
/// copy) is read, never grown.
impl Clone for Table {
    fn clone(&self) -> Table {
        Table {
            slots: self.slots.clone(),
            len: self.len,
            old: self.old.clone(),
            moved: self.moved,
            retired: None,
            spare: Vec::new(),
            spare_pages: 0,
        }
    }
}

impl Table {
    /// Slots of the first allocation (one 16 KiB mapping).
    const MIN_SLOTS: usize = 1024;
    /// Largest next table that the table allocates itself (1 MiB); larger ones are
    /// handed in ([`Table::give_spare`]). Allocating tens of MB on the writer's thread
    /// grows the heap or maps memory (`brk`, `mmap`), which needs the process's
    /// memory-map lock exclusively: a put waited for it 194-272 ms at 100M keys while
    /// other threads held it (page faults into the file, `madvise`, `munmap`).
    const LOCAL_SPARE_MAX: usize = 1 << 16;
    /// Old slots moved per insert while growing. Entries fill the new table from 35% to
    /// 70% in (old slots x 0.7) inserts, so 2 would do; 8 ends the move sooner.
    const MOVE_PER_INSERT: usize = 8;

    fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The slot holding `hash` in `slots`, if any.
    fn probe(slots: &[Slot], hash: u64) -> Option<usize> {
        if slots.is_empty() {
            return None;
        }
        let mask = slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let s = slots[i];
            if s.tagged == 0 {
                return None;
            }
            if s.hash == hash {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Where `hash` lives: in the new table (`false`) or the old one's unmoved part.
    fn find(&self, hash: u64) -> Option<(bool, usize)> {
        if let Some(i) = Self::probe(&self.slots, hash) {
            return Some((false, i));
        }
        // A moved entry is in `slots`, so a hit below `moved` cannot happen here; the
        // check keeps a stale copy from ever being returned.
        Self::probe(&self.old, hash)
            .filter(|&i| i >= self.moved)
            .map(|i| (true, i))
    }

    fn get(&self, hash: u64) -> Option<u64> {
        self.find(hash).map(|(old, i)| {
            if old {
                self.old[i].tagged
            } else {
                self.slots[i].tagged
            }
        })
    }

    fn get_mut(&mut self, hash: u64) -> Option<&mut u64> {
        match self.find(hash)? {
            (true, i) => Some(&mut self.old[i].tagged),
            (false, i) => Some(&mut self.slots[i].tagged),
        }
    }

    /// An empty table of `slots` slots (a power of two, at least [`Table::MIN_SLOTS`])
    /// with every page written once, so that no insert into it faults (see `spare`).
    fn prepared(slots: usize) -> Table {
        let mut t = Table {
            slots: bytemuck::zeroed_vec(slots),
            ..Table::default()
        };
        for page in t.slots.chunks_mut(SLOTS_PER_PAGE) {
            std::hint::black_box(&mut page[0]).tagged = 0;
        }
        t
    }

    /// Inserts `hash` (not present) with value `tagged` (not 0).
    fn insert_new(&mut self, hash: u64, tagged: u64) {
        self.move_some(Self::MOVE_PER_INSERT);
        // At most 70% full: an insert then probes about 6 slots, within 2 cache lines.
        // A large table whose next one was asked for but not handed in yet waits for it
        // up to 85% (about 20 slots a probe for that while) rather than allocate tens of
        // MB on the writer's thread (see `LOCAL_SPARE_MAX`).
        let full = (self.len + 1) * 10 > self.slots.len() * 7;
        if full && !(self.spare_late() && (self.len + 1) * 20 <= self.slots.len() * 17) {
            self.grow();
        } else {
            self.prepare_spare();
        }
        Self::place(&mut self.slots, Slot { hash, tagged });
        self.len += 1;
    }

    /// Writes one more page of the next table, allocating it first, once this one is
    /// half full (it grows at 70%: the 20% in between are about 50x more inserts than
    /// the next table has pages).
    fn prepare_spare(&mut self) {
        if self.len * 2 < self.slots.len() {
            return;
        }
        let want = self.slots.len() * 2;
        if self.spare.len() != want {
            if want > Self::LOCAL_SPARE_MAX {
                // Handed in (`give_spare`); or, if it does not come in time, allocated
                // by `grow`.
                return;
            }
            self.spare = bytemuck::zeroed_vec(want);
            self.spare_pages = 0;
        }
        if let Some(s) = self.spare.get_mut(self.spare_pages * SLOTS_PER_PAGE) {
            // A write of the zero that is there: the page's first touch is a write. (A
            // `black_box`ed reference, so the compiler cannot drop the store.)
            std::hint::black_box(s).tagged = 0;
            self.spare_pages += 1;
        }
    }

    /// The size of the next table, in slots, if this table is half full, the next one
    /// is one it does not allocate itself, and none was handed in yet.
    fn spare_wanted(&self) -> Option<usize> {
        (self.len * 2 >= self.slots.len() && self.spare_late()).then_some(self.slots.len() * 2)
    }

    /// True if the next table is one that is handed in, and it has not been.
    fn spare_late(&self) -> bool {
        let want = self.slots.len() * 2;
        want > Self::LOCAL_SPARE_MAX && self.spare.len() != want
    }

    /// Takes `t` as the next table if it is the size growth needs and none is prepared
    /// yet; otherwise gives it back.
    fn give_spare(&mut self, t: SpareTable) -> Option<SpareTable> {
        let want = self.slots.len() * 2;
        if t.0.len() != want || self.spare.len() == want || want <= Self::LOCAL_SPARE_MAX {
            return Some(t);
        }
        self.spare = t.0;
        self.spare_pages = 0;
        None
    }

    /// Puts `slot` into the first empty slot of its probe run.
    fn place(slots: &mut [Slot], slot: Slot) {
        let mask = slots.len() - 1;
        let mut i = slot.hash as usize & mask;
        while slots[i].tagged != 0 {
            i = (i + 1) & mask;
            #[cfg(test)]
            tests::PLACE_STEPS.with(|c| c.set(c.get() + 1));
        }
        slots[i] = slot;
    }

    /// Moves up to `n` old slots into the new table; frees the old one when done.
    fn move_some(&mut self, n: usize) {
        if self.old.is_empty() {
            return;
        }
        let to = (self.moved + n).min(self.old.len());
        for i in self.moved..to {
            let s = self.old[i];
            if s.tagged != 0 {
                Self::place(&mut self.slots, s);
            }
        }
        self.moved = to;
        if to == self.old.len() {
            self.retired = Some(std::mem::take(&mut self.old));
            self.moved = 0;
        }
    }

    /// Starts moving into a table twice the size: the one prepared ahead (see
    /// [`Table::prepare_spare`]) if there is one, else a zeroed allocation whose pages are
    /// mapped as the entries land.
    fn grow(&mut self) {
        // Not reached while moving (the new table is then at most 70% full with the old
        // entries in), but finishing first keeps one old table at most.
        self.move_some(usize::MAX);
        let want = (self.slots.len() * 2).max(Self::MIN_SLOTS);
        let new = if self.spare.len() == want {
            self.spare_pages = 0;
            std::mem::take(&mut self.spare)
        } else {
            // `calloc`: no pass that writes the zeros when the memory comes fresh from
            // mmap.
            bytemuck::zeroed_vec(want)
        };
        self.old = std::mem::replace(&mut self.slots, new);
        self.moved = 0;
        self.move_some(Self::MOVE_PER_INSERT);
    }

    /// The old table's slots not moved yet.
    fn unmoved(&self) -> &[Slot] {
        self.old.get(self.moved..).unwrap_or(&[])
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots
            .iter()
            .chain(self.unmoved())
            .filter(|s| s.tagged != 0)
            .map(|s| (s.hash, s.tagged))
    }

    /// The slots at positions `from..from + n` of [`Table::iter`]'s order (the table,
    /// then the unmoved part of the old one), empty ones included; and the position
    /// after them.
    fn slots_at(&self, from: usize, n: usize) -> (impl Iterator<Item = (u64, u64)> + '_, usize) {
        let total = self.slots.len() + self.unmoved().len();
        let to = from.saturating_add(n).min(total);
        let from = from.min(to);
        let it = self
            .slots
            .iter()
            .chain(self.unmoved())
            .skip(from)
            .take(to - from)
            .filter(|s| s.tagged != 0)
            .map(|s| (s.hash, s.tagged));
        (it, to)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut u64> + '_ {
        let moved = self.moved.min(self.old.len());
        self.slots
            .iter_mut()
            .chain(self.old[moved..].iter_mut())
            .filter(|s| s.tagged != 0)
            .map(|s| &mut s.tagged)
    }

    /// Bytes of the slots.
    fn bytes(&self) -> usize {
        (self.slots.capacity() + self.old.capacity() + self.spare.capacity())
            * std::mem::size_of::<Slot>()
    }
}

/// Where the probes of a [`Delta`]'s table start, as plain numbers: the writer keeps one
/// between writes to prefetch the next insert's slot before it locks the state. It may
/// be stale (the table grew, or the delta was frozen): then the prefetch is wasted, and
/// nothing else happens (a prefetch never faults).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SlotHint {
    base: usize,
    mask: usize,
}

impl SlotHint {
    /// Address of the slot where a probe for `hash` starts, if there is a table.
    pub(crate) fn addr(&self, hash: u64) -> Option<usize> {
        (self.base != 0)
            .then(|| self.base + (hash as usize & self.mask) * std::mem::size_of::<Slot>())
    }
}

/// Changes since the last checkpoint: key hash → offset of the newest record (put or
/// delete) for each key changed. Distinct keys with equal 64-bit hashes are kept apart in
/// a side table (`more`), which is almost always empty.
///
/// The write path does not look a key up in the index: it only records the new offset.
/// An entry added that way is *unresolved* (its key may or may not have a live record in
/// the index buckets), and its hash is queued in `unresolved`. The store's counters treat
/// an unresolved key as new until [`Delta::claim_unresolved`] hands it to a lookup; see
/// `State::resolve`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Delta {
    first: Table,
    more: IdMap<Vec<u64>>,
    len: usize,
    unresolved: HashQueue,
    /// Set once a checkpoint has taken every entry's old state into the counters: the
    /// per-entry marks no longer count.
    all_resolved: bool,
    id: DeltaId,
}

/// Tells a delta from every other delta value this process made: a new one, a cleared
/// one and a clone each get a fresh id. Work prepared against a delta without the
/// state lock (see `state::resolve`) checks that it is still the same delta.
#[derive(Debug, PartialEq, Eq)]
struct DeltaId(u64);

impl DeltaId {
    fn fresh() -> DeltaId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        DeltaId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl Default for DeltaId {
    fn default() -> DeltaId {
        DeltaId::fresh()
    }
}

impl Clone for DeltaId {
    fn clone(&self) -> DeltaId {
        DeltaId::fresh()
    }
}

impl Delta {
    /// Number of keys in the delta.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// This delta's identity (see [`DeltaId`]): another delta, or this one cleared,
    /// never has the same.
    pub(crate) fn id(&self) -> u64 {
        self.id.0
    }

    pub(crate) fn clear(&mut self) {
        self.id = DeltaId::fresh();
        self.first = Table::default();
        self.more = IdMap::default();
        self.unresolved.clear();
        self.len = 0;
        self.all_resolved = false;
    }

    /// Marks every entry resolved in place (their old states were taken into the
    /// counters). Unlike [`Delta::mark_all_resolved`], keys added later start unresolved
    /// as usual: for a delta that stays in use.
    pub(crate) fn settle_all(&mut self) {
        let more = self.more.values_mut().flatten();
        for v in self.first.values_mut().chain(more) {
            *v &= !UNRESOLVED_TAG;
        }
        self.unresolved.clear();
    }

    /// Marks every entry resolved (their old states were taken into the counters), and
    /// every key added later too: only for a delta about to be frozen for good or
    /// cleared.
    pub(crate) fn mark_all_resolved(&mut self) {
        self.all_resolved = true;
        self.unresolved.clear();
    }

    /// The newest records of all keys with this hash: (offset, is a delete).
    pub(crate) fn candidates(&self, hash: u64) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.first
            .get(hash)
            .into_iter()
            .chain(self.more.get(&hash).into_iter().flatten().copied())
            .map(untag)
    }

    /// Records that the newest record for the key is at `off` (a delete if `delete`).
    /// `same_key(prev)` tells whether the record at a previous offset with the same hash
    /// holds the same key. Returns the previous entry for the key, (offset, is a delete),
    /// if the delta had one.
    ///
    /// A key new to the delta is queued as unresolved unless `resolved` says the caller
    /// already knows its state in the index (or there is no index to consult).
    pub(crate) fn set(
        &mut self,
        hash: u64,
        off: u64,
        delete: bool,
        resolved: bool,
        mut same_key: impl FnMut(u64) -> bool,
    ) -> Option<(u64, bool)> {
        debug_assert!(off & (DELETE_TAG | UNRESOLVED_TAG) == 0);
        let tagged = off | if delete { DELETE_TAG } else { 0 };
        let fresh = if resolved || self.all_resolved {
            tagged
        } else {
            tagged | UNRESOLVED_TAG
        };
        // A replaced entry keeps its resolution state: the index has not changed.
        let replace = |p: &mut u64| {
            let prev = *p;
            *p = tagged | (prev & UNRESOLVED_TAG);
            Some(untag(prev))
        };
        match self.first.get_mut(hash) {
            None => self.first.insert_new(hash, fresh),
            Some(p) if same_key(untag(*p).0) => return replace(p),
            Some(_) => {
                let v = self.more.entry(hash).or_default();
                if let Some(p) = v.iter_mut().find(|p| same_key(untag(**p).0)) {
                    return replace(p);
                }
                v.push(fresh);
            }
        }
        self.len += 1;
        if fresh & UNRESOLVED_TAG != 0 {
            self.unresolved.push_back(hash);
        }
        None
    }

    /// Where [`Delta::set`] starts its probes (see [`SlotHint`]).
    pub(crate) fn slot_hint(&self) -> SlotHint {
        let slots = self.first.slots();
        if slots.is_empty() {
            return SlotHint::default();
        }
        SlotHint {
            base: slots.as_ptr() as usize,
            mask: slots.len() - 1,
        }
    }

    /// Number of queued unresolved hashes (an upper bound on unresolved entries).
    pub(crate) fn unresolved_len(&self) -> usize {
        self.unresolved.len()
    }

    /// Takes up to `max` hashes off the unresolved queue, oldest first (the ones
    /// [`Delta::peek_unresolved`] shows), ordered by `order` so that their lookups walk
    /// the index in order.
    pub(crate) fn take_unresolved(&mut self, max: usize, order: impl Fn(u64) -> u64) -> Vec<u64> {
        let mut out = self.unresolved.pop_front(max);
        out.sort_unstable_by_key(|&h| order(h));
        out
    }

    /// The hashes the next [`Delta::take_unresolved`] of `max` takes (unless it is
    /// cleared meanwhile): to prefetch their buckets before taking a lock.
    pub(crate) fn peek_unresolved(&self, max: usize) -> impl Iterator<Item = u64> + '_ {
        self.unresolved.iter().take(max)
    }

    /// The offsets of the unresolved entries with this hash (the ones
    /// [`Delta::claim_unresolved`] would claim), without claiming them.
    pub(crate) fn unresolved_offsets(&self, hash: u64) -> impl Iterator<Item = u64> + '_ {
        let more = self.more.get(&hash).into_iter().flatten();
        let keep = !self.all_resolved;
        self.first
            .get(hash)
            .into_iter()
            .chain(more.copied())
            .filter(move |v| keep && v & UNRESOLVED_TAG != 0)
            .map(|v| untag(v).0)
    }

    /// Marks every unresolved entry with this hash resolved and pushes its offset to `out`.
    pub(crate) fn claim_unresolved(&mut self, hash: u64, out: &mut Vec<u64>) {
        let first = self.first.get_mut(hash).into_iter();
        let more = self.more.get_mut(&hash).into_iter().flatten();
        for v in first.chain(more) {
            if *v & UNRESOLVED_TAG != 0 {
                *v &= !UNRESOLVED_TAG;
                out.push(untag(*v).0);
            }
        }
    }

    /// Every entry of the delta.
    pub(crate) fn iter(&self) -> impl Iterator<Item = DeltaEntry> + '_ {
        let first = self.first.iter();
        let more = self
            .more
            .iter()
            .flat_map(|(&h, v)| v.iter().map(move |&o| (h, o)));
        let keep = if self.all_resolved {
            !UNRESOLVED_TAG
        } else {
            u64::MAX
        };
        first.chain(more).map(move |(hash, o)| DeltaEntry {
            hash,
            tagged: o & keep,
        })
    }

    /// Every entry, in a buffer of its own (see [`AnonVec`]).
    pub(crate) fn entries(&self) -> AnonVec<DeltaEntry> {
        let mut out = AnonVec::with_capacity(self.len);
        for e in self.iter() {
            out.push(e);
        }
        out
    }

    /// Copies the entries at `*cursor` (see [`Delta::entries`]) into `out`, about
    /// `budget` slots' worth, and advances the cursor; returns false once all are copied.
    /// For a delta that does not change between calls (a frozen one): the copy can be
    /// made in pieces, each under a short lock, instead of under one long one.
    pub(crate) fn copy_entries(
        &self,
        cursor: &mut usize,
        budget: usize,
        out: &mut AnonVec<DeltaEntry>,
    ) -> bool {
        let keep = if self.all_resolved {
            !UNRESOLVED_TAG
        } else {
            u64::MAX
        };
        let table_len = self.first.slots.len() + self.first.unmoved().len();
        if *cursor < table_len {
            let (it, next) = self.first.slots_at(*cursor, budget);
            for (hash, o) in it {
                out.push(DeltaEntry {
                    hash,
                    tagged: o & keep,
                });
            }
            *cursor = next;
            return true;
        }
        if *cursor == table_len {
            // Colliding keys: few, copied at once.
            for (&hash, v) in &self.more {
                for &o in v {
                    out.push(DeltaEntry {
                        hash,
                        tagged: o & keep,
                    });
                }
            }
            *cursor += 1;
        }
        false
    }

    /// A delta of `entries` (as [`Delta::copy_entries`] copied them from one delta:
    /// distinct keys, resolved as they were), for lookups.
    ///
    /// They go in in the order of their whole hash. In the source table's slot order
    /// (the hash's low bits), the inserts walked long probe runs while the new table
    /// was smaller than the source (3 s for 600k entries, minutes for a few million).
    pub(crate) fn from_entries(entries: &AnonVec<DeltaEntry>) -> Delta {
        let mut order: Vec<u32> = (0..u32::try_from(entries.len()).unwrap_or(u32::MAX)).collect();
        order.sort_unstable_by_key(|&i| entries[i as usize].hash);
        let mut d = Delta::default();
        for e in order.iter().map(|&i| &entries[i as usize]) {
            // Entries of one delta are distinct keys, even where their hashes collide.
            d.set(e.hash, e.off(), e.delete(), !e.unresolved(), |_| false);
        }
        d
    }

    /// An empty delta made ready for about `keys` keys, by another thread than the
    /// writer's (the store's background thread, before a checkpoint freezes the current
    /// one): its table at most half full with `keys` keys, up to [`PREPARED_MAX_SLOTS`]
    /// (16 MiB, 734,000 keys before it grows), every page written once, and the pool of
    /// queue chunks stocked for `keys` unresolved keys (see [`HashQueue`]). Larger
    /// tables come from that thread too ([`Delta::spare_wanted`]), so a writer that
    /// starts from such a delta allocates nothing for it: growing the heap (`brk`,
    /// `mremap`) needs the process's memory-map lock exclusively, and a put waited
    /// 369 ms in `brk` at 30M keys while other threads held it. (Prepared only up to
    /// [`Table::LOCAL_SPARE_MAX`] slots, the next table, asked for at half of those,
    /// had 20-30 ms to come before the writer allocated it itself, and at 20M keys it
    /// often did not: 1.6-2.1 MB `brk`s on the writer's thread in every fill.)
    pub(crate) fn prepared(keys: usize) -> Delta {
        // Under half full with `keys` keys: from half full on, a table writes a page of
        // its next one per insert, allocating it first if it is small.
        let slots = keys
            .saturating_mul(2)
            .saturating_add(1)
            .checked_next_power_of_two()
            .unwrap_or(PREPARED_MAX_SLOTS)
            .clamp(Table::MIN_SLOTS, PREPARED_MAX_SLOTS);
        super::queue::stock(
            keys.div_ceil(super::queue::CHUNK)
                .max(super::queue::POOL_TARGET),
        );
        Delta {
            first: Table::prepared(slots),
            ..Delta::default()
        }
    }

    /// The size of the table the delta's table grows into next, in slots, when another
    /// thread should allocate it now (see [`SpareTable`]): the table is half full and
    /// large, and no next table was handed in yet. The store's background thread
    /// allocates it; if it comes too late, growth allocates it itself.
    pub(crate) fn spare_wanted(&self) -> Option<usize> {
        self.first.spare_wanted()
    }

    /// The next table prepared for growth, if any, for the caller to free where no
    /// lock is held: for a delta that will not grow again (frozen for a checkpoint).
    pub(crate) fn take_spare(&mut self) -> Option<Retired> {
        self.first.spare_pages = 0;
        let spare = std::mem::take(&mut self.first.spare);
        (!spare.is_empty()).then_some(Retired(spare))
    }

    /// Slots of the delta's table (tests).
    #[cfg(test)]
    pub(crate) fn table_slots(&self) -> usize {
        self.first.slots.len()
    }

    /// Hands in the next table; gives it back if it does not fit (the delta was
    /// replaced or grew meanwhile, or has one).
    pub(crate) fn give_spare(&mut self, t: SpareTable) -> Option<SpareTable> {
        self.first.give_spare(t)
    }

    /// The table that growth finished moving out of, if any, for the caller to free
    /// where no lock is held (left here, it is freed when the next one retires).
    pub(crate) fn take_retired(&mut self) -> Option<Retired> {
        self.first.retired.take().map(Retired)
    }

    /// Approximate heap bytes used.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.first.bytes() + self.more.capacity() * 33 + self.unresolved.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inserts key number `*next` (its hash a multiple of a large odd constant, its
    /// value the number) and counts it.
    fn insert_numbered(t: &mut Table, next: &mut u64) {
        t.insert_new(next.wrapping_mul(0x9E37_79B9_7F4A_7C15), *next);
        *next += 1;
    }

    /// Every key `insert_numbered` put in before number `next` holds its value.
    fn assert_numbered(t: &Table, next: u64) {
        for i in 1..next {
            assert_eq!(t.get(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)), Some(i));
        }
    }

    /// Regression: a table that grew was a fresh zeroed allocation whose pages were first
    /// read (a lookup maps the shared zero page) and then written (a copy-on-write fault
    /// that must flush the other CPUs' TLBs): on the 2-vCPU VM those shootdowns were a
    /// fifth of the writer's time in a 1M-key fill. The next table is now written a page
    /// per insert once the table is half full, and growth takes it.
    #[test]
    fn a_growing_table_takes_the_next_table_written_ahead() {
        let mut t = Table::default();
        let mut next = 1u64;
        let mut insert = |t: &mut Table| insert_numbered(t, &mut next);
        insert(&mut t);
        for _ in 0..6 {
            let slots = t.slots.len();
            // Up to the insert that grows the table.
            while (t.len + 1) * 10 <= slots * 7 {
                insert(&mut t);
            }
            assert_eq!(
                t.spare.len(),
                slots * 2,
                "no next table prepared at {slots} slots"
            );
            assert_eq!(
                t.spare_pages,
                (slots * 2).div_ceil(SLOTS_PER_PAGE),
                "the next table was not written through before growth"
            );
            let prepared = t.spare.as_ptr();
            insert(&mut t);
            assert_eq!(t.slots.len(), slots * 2);
            assert_eq!(
                t.slots.as_ptr(),
                prepared,
                "growth did not take the prepared table"
            );
            assert!(t.spare.is_empty());
        }
        assert_numbered(&t, next);
    }

    /// A prepared delta takes `keys` keys without allocating a table: its table does
    /// not grow (nor, below `LOCAL_SPARE_MAX` slots, prepare a next one of its own). (Its
    /// queue of unresolved keys takes chunks from a pool: see `queue`.) Regression: up
    /// to 450,000 keys (the default `checkpoint_keys`), not only up to the tables the
    /// writer would allocate itself: the next one came too late at 20M keys.
    #[test]
    fn a_prepared_delta_takes_its_keys_without_growing() {
        for keys in [1usize, 1000, 30_000, 450_000, 1 << 20] {
            let mut d = Delta::prepared(keys);
            let slots = d.table_slots();
            let fits = keys.min(slots * 7 / 10 - 1);
            for i in 0..fits as u64 {
                let hash = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                d.set(hash, 8 * (i + 1), false, false, |_| false);
            }
            assert_eq!(d.len(), fits);
            assert!(
                fits == keys || keys > 700_000,
                "{keys} keys: only {fits} fit"
            );
            assert_eq!(d.table_slots(), slots, "{keys} keys: the table grew");
            if slots < Table::LOCAL_SPARE_MAX {
                assert!(
                    d.first.spare.is_empty(),
                    "{keys} keys: a next table was made"
                );
            }
            assert_eq!(d.unresolved_len(), fits);
            for i in 0..fits as u64 {
                let hash = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                assert_eq!(d.candidates(hash).next(), Some((8 * (i + 1), false)));
            }
        }
    }

    /// Regression: a large table's next one was allocated on the writer's thread, whose
    /// `brk`/`mmap` then waited for the memory-map lock (194-272 ms at 100M keys). Past
    /// `LOCAL_SPARE_MAX` the table asks for it instead, takes one of the right size when
    /// handed in (and gives back any other), and still grows if none came, later (85%
    /// full instead of 70%: the writer's own allocation is the last resort).
    #[test]
    fn a_large_table_asks_for_its_next_table() {
        let mut t = Table::default();
        let mut next = 1u64;
        let mut insert = |t: &mut Table| insert_numbered(t, &mut next);
        // Up to a table of LOCAL_SPARE_MAX slots, half full.
        while t.slots.len() < Table::LOCAL_SPARE_MAX || t.len * 2 < t.slots.len() {
            assert_eq!(t.spare_wanted(), None, "at {} slots", t.slots.len());
            insert(&mut t);
        }
        let want = Table::LOCAL_SPARE_MAX * 2;
        assert_eq!(t.spare_wanted(), Some(want));
        insert(&mut t);
        assert!(
            t.spare.is_empty(),
            "the table allocated its next one itself"
        );
        // A table of another size is given back; the right one is taken.
        let wrong = t.give_spare(SpareTable::allocate(want * 2));
        assert_eq!(wrong.map(|w| w.0.len()), Some(want * 2));
        assert!(t.give_spare(SpareTable::allocate(want)).is_none());
        assert_eq!(t.spare_wanted(), None);
        let prepared = t.spare.as_ptr();
        // Up to the insert that grows the table: by then the table wrote every page
        // of the handed-in one (see `a_growing_table_takes_the_next_table_written_ahead`).
        while (t.len + 1) * 10 <= t.slots.len() * 7 {
            insert(&mut t);
        }
        assert_eq!(t.spare_pages, want.div_ceil(SLOTS_PER_PAGE));
        insert(&mut t);
        assert_eq!(t.slots.len(), want);
        assert_eq!(
            t.slots.as_ptr(),
            prepared,
            "growth did not take the handed-in table"
        );
        // None handed in: the table waits for one up to 85% full, then allocates the
        // next table itself.
        while (t.len + 1) * 20 <= t.slots.len() * 17 {
            insert(&mut t);
        }
        assert_eq!(
            t.slots.len(),
            want,
            "grew at 70% with no next table handed in"
        );
        insert(&mut t);
        assert_eq!(t.slots.len(), want * 2);
        assert_numbered(&t, next);
    }

    #[test]
    fn sort_by_bucket_orders_and_keeps_every_entry() {
        // Both paths: few entries per bucket (comparison sort) and many (counting sort).
        for (n, buckets) in [(10u64, 1024u64), (5000, 64), (5000, 1), (0, 8)] {
            let entries: AnonVec<DeltaEntry> = (0..n)
                .map(|i| DeltaEntry {
                    hash: i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i << 7),
                    tagged: i + 1,
                })
                .collect();
            let sorted = sort_by_bucket(entries.iter().copied().collect(), buckets);
            assert!(
                sorted
                    .windows(2)
                    .all(|w| bucket_of(w[0].hash, buckets) <= bucket_of(w[1].hash, buckets)),
                "{n} entries, {buckets} buckets: not sorted"
            );
            let mut a: Vec<u64> = entries.iter().map(|e| e.tagged).collect();
            let mut b: Vec<u64> = sorted.iter().map(|e| e.tagged).collect();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(
                a, b,
                "{n} entries, {buckets} buckets: entries lost or repeated"
            );
        }
    }

    #[test]
    fn table_finds_every_entry_across_growth_and_clustered_hashes() {
        let mut t = Table::default();
        assert_eq!(t.get(7), None);
        // Hashes sharing their low bits pile up in one probe run, wrapping the end.
        let hashes: Vec<u64> = (0..5000u64)
            .map(|i| {
                if i % 3 == 0 {
                    (i << 40) | 1023
                } else {
                    i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                }
            })
            .collect();
        for (n, &h) in hashes.iter().enumerate() {
            t.insert_new(h, n as u64 + 1);
            assert_eq!(t.len, n + 1);
        }
        assert!(t.slots().len().is_power_of_two());
        assert!(t.len * 10 <= t.slots().len() * 7, "load kept at most 70%");
        for (n, &h) in hashes.iter().enumerate() {
            assert_eq!(t.get(h), Some(n as u64 + 1), "hash {h:#x}");
        }
        *t.get_mut(hashes[9]).expect("present") = 99;
        assert_eq!(t.get(hashes[9]), Some(99));
        assert_eq!(t.iter().count(), hashes.len());
        assert_eq!(t.get(0xdead_beef_0000_0000), None);
        let hint = SlotHint {
            base: t.slots().as_ptr() as usize,
            mask: t.slots().len() - 1,
        };
        let start = hint.addr(hashes[1]).expect("a table");
        assert!(start >= hint.base && start < hint.base + t.slots().len() * 16);
        assert_eq!(SlotHint::default().addr(5), None);
    }

    #[test]
    fn table_finds_and_updates_entries_while_it_grows() {
        let mut t = Table::default();
        let h = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) | 1;
        let mut seen_moving = 0;
        for i in 0..20_000u64 {
            t.insert_new(h(i), i + 1);
            if !t.old.is_empty() {
                seen_moving += 1;
                // Every entry so far, in whichever table, and updates land where the
                // lookups go.
                if i % 97 == 0 {
                    for j in 0..=i {
                        assert_eq!(t.get(h(j)), Some(j + 1), "entry {j} after {i} inserts");
                    }
                    *t.get_mut(h(i / 2)).expect("present") = i / 2 + 1;
                }
            }
            assert_eq!(t.len, i as usize + 1);
        }
        assert!(seen_moving > 1000, "growth moved entries across inserts");
        assert_eq!(t.iter().count(), 20_000);
        let mut values: Vec<u64> = t.iter().map(|(_, v)| v).collect();
        values.sort_unstable();
        assert_eq!(values, (1..=20_000).collect::<Vec<_>>());
        assert_eq!(t.values_mut().count(), 20_000);
    }

    thread_local! {
        /// Slots `Table::place` stepped over on this thread (tests only).
        pub(super) static PLACE_STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_delta_rebuilt_from_copied_entries_finds_them_in_few_probes() {
        // Regression: compaction rebuilds a frozen delta from its copied entries, which
        // come in the source table's slot order; inserted in that order, they walked
        // long probe runs (3 s for 600k entries, minutes for millions).
        let mut src = Delta::default();
        let n = 600_000u64;
        for i in 0..n {
            // Random-looking hashes, as keys have (splitmix64's finalizer).
            let mut h = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
            h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            h ^= h >> 31;
            src.set(h, (i + 1) * 64, i % 7 == 0, i % 2 == 0, |_| false);
        }
        let mut entries = AnonVec::with_capacity(0);
        let mut cursor = 0;
        while src.copy_entries(&mut cursor, 1 << 12, &mut entries) {}
        assert_eq!(entries.len(), n as usize);
        let before = PLACE_STEPS.with(std::cell::Cell::get);
        let copy = Delta::from_entries(&entries);
        let steps = PLACE_STEPS.with(std::cell::Cell::get) - before;
        assert_eq!(copy.len(), src.len());
        for e in src.iter() {
            let c: Vec<(u64, bool)> = copy.candidates(e.hash).collect();
            assert_eq!(c, vec![(e.off(), e.delete())], "hash {:#x}", e.hash);
        }
        assert_eq!(copy.unresolved_len(), src.unresolved_len());
        // Random inserts into a table at most 70% full step over a few slots each.
        assert!(steps < 10 * n, "{steps} probe steps for {n} inserts");
    }

    #[test]
    fn delta_keeps_colliding_keys_apart() {
        let mut d = Delta::default();
        // Pretend offsets 1 and 2 hold key "a", 3 holds key "b"; all with hash 9.
        let key_of = |o: u64| if o == 3 { 'b' } else { 'a' };
        assert_eq!(d.set(9, 1, false, false, |_| true), None);
        assert_eq!(d.set(9, 3, false, false, |p| key_of(p) == 'b'), None);
        assert_eq!(
            d.set(9, 2, true, false, |p| key_of(p) == 'a'),
            Some((1, false))
        );
        assert_eq!(d.len(), 2);
        // Both keys were new to the delta: both are unresolved, once each.
        assert_eq!(d.unresolved_len(), 2);
        let mut offs = Vec::new();
        d.claim_unresolved(9, &mut offs);
        offs.sort_unstable();
        assert_eq!(offs, vec![2, 3], "claimed with their newest offsets");
        d.claim_unresolved(9, &mut offs);
        assert_eq!(offs.len(), 2, "a claimed entry is not claimed again");
        let mut c: Vec<(u64, bool)> = d.candidates(9).collect();
        c.sort_unstable();
        assert_eq!(c, vec![(2, true), (3, false)]);
        assert_eq!(d.iter().count(), 2);
    }
}
