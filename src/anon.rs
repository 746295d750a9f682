//! [`AnonVec`]: a growable array of plain-old-data values in an anonymous mapping of its
//! own, for a checkpoint's large buffers (the delta's entries, sorted by bucket), which a
//! checkpoint thread allocates and frees.
//!
//! Why not `Vec`: glibc's `malloc` serves a thread other than the main one from an arena
//! of its own, and a large block freed there stays resident once glibc's mmap threshold
//! has risen (it rises to the size of each large block freed, up to 32 MiB). Measured:
//! three 1 M-key fills left 28-34 MB of `RssAnon` behind after the stores closed (goal:
//! under 20 MB with a 1 M-key store open); with these buffers mapped and unmapped
//! directly, 0.6-1.6 MB. The delta itself stays in `Vec`s: allocated on the writer's
//! thread, the blocks one delta frees are reused by the next, which measured ~8% faster
//! than fresh mappings (whose pages fault in when first touched).

use std::marker::PhantomData;

use bytemuck::Pod;

/// A growable array of `T` whose memory is an anonymous mapping (see the module docs).
/// New memory reads as zeros (which must be a valid `T`: `Pod` guarantees it).
pub(crate) struct AnonVec<T: Pod> {
    map: Option<memmap2::MmapMut>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> std::fmt::Debug for AnonVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AnonVec {{ len: {}, capacity: {} }}",
            self.len,
            self.capacity()
        )
    }
}

impl<T: Pod> Default for AnonVec<T> {
    fn default() -> Self {
        AnonVec {
            map: None,
            len: 0,
            _t: PhantomData,
        }
    }
}

impl<T: Pod> AnonVec<T> {
    /// Room for `n` values (at least a page), length 0.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let mut v = Self::default();
        v.reserve_exact(n);
        v
    }

    /// `n` zeroed values.
    pub(crate) fn zeroed(n: usize) -> Self {
        let mut v = Self::with_capacity(n);
        v.len = n;
        v
    }

    /// How many values fit without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.map
            .as_ref()
            .map_or(0, |m| m.len() / std::mem::size_of::<T>().max(1))
    }

    /// Appends `v`, doubling the capacity when full.
    pub(crate) fn push(&mut self, v: T) {
        if self.len == self.capacity() {
            self.reserve_exact((self.len * 2).max(1));
        }
        let at = self.len;
        self.len += 1;
        self[at] = v;
    }

    /// Grows the capacity to at least `n` values (rounded up to whole pages).
    fn reserve_exact(&mut self, n: usize) {
        if n <= self.capacity() {
            return;
        }
        let size = std::mem::size_of::<T>().max(1);
        let bytes = n
            .checked_mul(size)
            .map(|b| b.next_multiple_of(4096))
            .unwrap_or(usize::MAX);
        let map = memmap2::MmapOptions::new().len(bytes).map_anon();
        let mut map = map.unwrap_or_else(|_| {
            // Out of memory, as a failed `Vec` growth would be.
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(bytes, 4096)
                    .unwrap_or(std::alloc::Layout::new::<u64>()),
            )
        });
        // Populated up front, one call per piece instead of a fault per page (every page
        // gets written soon anyway); see `populate_pieces`.
        for (off, len) in populate_pieces(bytes) {
            let _ = map.advise_range(memmap2::Advice::PopulateWrite, off, len);
        }
        #[cfg(test)]
        if self.map.is_some() {
            GROWTHS.with(|g| g.set(g.get() + 1));
        }
        let old: &[u8] = bytemuck::cast_slice(&self[..]);
        map[..old.len()].copy_from_slice(old);
        if let Some(mut old) = self.map.replace(map) {
            crate::map::discard_anon(&mut old, POPULATE_PIECE);
        }
    }
}

std::thread_local! {
    /// Buffers this thread grew (mapped anew and copied; unit tests only).
    #[cfg(test)]
    static GROWTHS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has grown a buffer (unit tests only).
#[cfg(test)]
pub(crate) fn growths_on_this_thread() -> usize {
    GROWTHS.with(std::cell::Cell::get)
}

impl<T: Pod> Drop for AnonVec<T> {
    fn drop(&mut self) {
        if let Some(map) = &mut self.map {
            crate::map::discard_anon(map, POPULATE_PIECE);
        }
    }
}

/// The most bytes populated (or freed) per system call. Populating a mapping, like
/// `MAP_POPULATE`, holds the process's memory-map lock (read) for the whole call, and
/// unmapping frees the pages under it too. A thread that changes the address space
/// meanwhile (the writer's `malloc` growing the heap with `brk`, any `mmap`) waits for
/// the lock exclusively, and the writer's page faults that cannot do with the
/// mapping's own lock queue behind that waiter. Measured (`perf record -e
/// 'mmap_lock:*'` of `mapkv bench --sweep 20m`): a checkpoint's buffers populated with
/// `MAP_POPULATE` held the lock up to 317 ms (a niced thread zeroing hundreds of MB),
/// and the writer waited up to 97 ms in `brk` and up to 149 ms in page faults. In
/// pieces, each call holds the lock for about a millisecond.
const POPULATE_PIECE: usize = 2 << 20;

/// `(offset, len)` of the pieces covering `bytes`, each at most [`POPULATE_PIECE`].
fn populate_pieces(bytes: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..bytes)
        .step_by(POPULATE_PIECE)
        .map(move |off| (off, POPULATE_PIECE.min(bytes - off)))
}

impl<T: Pod> std::ops::Deref for AnonVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.map {
            // A mapping is page-aligned and sized in whole values, so the cast holds.
            Some(m) => bytemuck::cast_slice(&m[..self.len * std::mem::size_of::<T>()]),
            None => &[],
        }
    }
}

impl<T: Pod> std::ops::DerefMut for AnonVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let len = self.len * std::mem::size_of::<T>();
        match &mut self.map {
            Some(m) => bytemuck::cast_slice_mut(&mut m[..len]),
            None => &mut [],
        }
    }
}

impl<T: Pod> FromIterator<T> for AnonVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut v = Self::with_capacity(iter.size_hint().0);
        for x in iter {
            v.push(x);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_keeps_values_and_reads_zeros() {
        let mut v: AnonVec<u64> = AnonVec::default();
        assert!(v.is_empty());
        for i in 0..10_000u64 {
            v.push(i * 3);
        }
        assert_eq!(v.len(), 10_000);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));
        assert!(v.capacity() >= 10_000);
        let z: AnonVec<[u64; 2]> = AnonVec::zeroed(300);
        assert!(z.iter().all(|s| *s == [0, 0]));
        let c: AnonVec<u32> = (0..7u32).collect();
        assert_eq!(&c[..], &[0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn population_goes_in_pieces_that_cover_the_buffer() {
        for bytes in [
            4096,
            POPULATE_PIECE,
            POPULATE_PIECE + 4096,
            5 * POPULATE_PIECE - 8192,
        ] {
            let pieces: Vec<_> = populate_pieces(bytes).collect();
            assert!(pieces
                .iter()
                .all(|&(_, len)| len > 0 && len <= POPULATE_PIECE));
            let mut at = 0;
            for &(off, len) in &pieces {
                assert_eq!(off, at, "pieces are contiguous");
                at += len;
            }
            assert_eq!(at, bytes, "pieces cover {bytes} bytes");
        }
        assert_eq!(populate_pieces(0).count(), 0);
    }

    #[test]
    fn a_buffer_larger_than_a_piece_grows_and_keeps_its_values() {
        // Three pieces and more, grown twice (each growth copies and frees the old
        // mapping in pieces).
        let n = 3 * POPULATE_PIECE / 8 + 5;
        let mut v: AnonVec<u64> = AnonVec::with_capacity(n / 4);
        for i in 0..n as u64 {
            v.push(i ^ 0xA5A5);
        }
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 ^ 0xA5A5));
        let z: AnonVec<u64> = AnonVec::zeroed(n);
        assert!(z.iter().all(|&x| x == 0));
    }
}
