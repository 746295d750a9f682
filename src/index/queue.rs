//! [`HashQueue`]: the delta's queue of unresolved key hashes, in fixed chunks that come
//! from a pool another thread keeps stocked.
//!
//! Why not a `VecDeque`: the writer pushes onto this queue under the state lock, and a
//! `VecDeque` doubles by reallocating. Past a few MB that is `mmap`/`mremap`/`brk`,
//! which need the process's memory-map lock exclusively, and a copy of everything
//! queued. At 20M keys the queue passed 16M hashes (a 134 MB reallocation), and puts
//! waited 51-105 ms asleep in `brk` (every run of `mapkv bench --sweep 20m`) while other
//! threads held that lock (page faults into the file, `madvise`). A chunk is 64 KiB and
//! never moves: a push either writes into the last chunk or takes a new one from the
//! pool, and a drained chunk goes back to it. The store's background thread keeps the
//! pool stocked ([`stock`]); the writer allocates a chunk itself only if the pool is
//! empty.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Hashes per chunk (64 KiB).
pub(crate) const CHUNK: usize = 8192;

/// One chunk of hashes.
type Chunk = Box<[u64]>;

/// Chunks ready for any queue of the process.
#[derive(Debug)]
pub(crate) struct ChunkPool {
    free: Mutex<Vec<Chunk>>,
}

/// Most chunks the pool keeps (8 MiB, a million hashes): chunks given back beyond it
/// are freed. They stay resident while kept, also after every store closed.
const POOL_MAX: usize = 128;
/// Chunks the background thread keeps ready (2 MiB, 262,144 hashes: a quarter second of
/// new keys at a million puts a second; it wakes at least every 8 MiB of appends).
pub(crate) const POOL_TARGET: usize = 32;

/// The pool every [`HashQueue::default`] uses.
static POOL: ChunkPool = ChunkPool::new();

impl ChunkPool {
    /// An empty pool.
    pub(crate) const fn new() -> ChunkPool {
        ChunkPool {
            free: Mutex::new(Vec::new()),
        }
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Chunk>> {
        // Nothing can be left half done under this lock: a poisoned one is as good.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chunks in the pool.
    pub(crate) fn len(&self) -> usize {
        self.free().len()
    }

    /// A chunk from the pool, or a new one if it is empty.
    fn take(&self) -> Chunk {
        let c = self.free().pop();
        c.unwrap_or_else(|| {
            #[cfg(test)]
            tests::FRESH.with(|f| f.set(f.get() + 1));
            vec![0u64; CHUNK].into_boxed_slice()
        })
    }

    /// Keeps `chunks` for reuse, up to [`POOL_MAX`]; frees the rest after the lock.
    fn give(&self, chunks: impl IntoIterator<Item = Chunk>) {
        let mut spare = Vec::new();
        {
            let mut free = self.free();
            // Room for all it will ever keep, reserved once: the pool's own vector
            // never grows on the writer's thread.
            if free.capacity() < POOL_MAX {
                let more = POOL_MAX - free.len();
                free.reserve_exact(more);
            }
            for c in chunks {
                if free.len() < POOL_MAX {
                    free.push(c);
                } else {
                    spare.push(c);
                }
            }
        }
        drop(spare);
    }

    /// Allocates chunks until the pool holds `target` (at most [`POOL_MAX`]). For a
    /// thread other than the writer's; the allocations are made with no lock held.
    pub(crate) fn stock(&self, target: usize) {
        let target = target.min(POOL_MAX);
        let missing = target.saturating_sub(self.len());
        if missing == 0 {
            return;
        }
        // Each page written here, so that the writer's first push into it is no page
        // fault (fresh memory from the system is mapped on first touch).
        let fresh: Vec<Chunk> = (0..missing)
            .map(|_| {
                let mut c = vec![0u64; CHUNK].into_boxed_slice();
                for page in c.chunks_mut(4096 / std::mem::size_of::<u64>()) {
                    *std::hint::black_box(&mut page[0]) = 0;
                }
                c
            })
            .collect();
        self.give(fresh);
    }
}

/// Fills the process's pool up to `target` chunks (see [`ChunkPool::stock`]).
pub(crate) fn stock(target: usize) {
    POOL.stock(target);
}

/// A FIFO queue of hashes in [`CHUNK`]-sized chunks from a [`ChunkPool`].
#[derive(Debug)]
pub(crate) struct HashQueue {
    chunks: VecDeque<Chunk>,
    /// Position of the first queued hash in the front chunk.
    head: usize,
    len: usize,
    pool: &'static ChunkPool,
}

impl Default for HashQueue {
    fn default() -> HashQueue {
        HashQueue::with_pool(&POOL)
    }
}

impl HashQueue {
    /// An empty queue whose chunks come from and go back to `pool`.
    pub(crate) fn with_pool(pool: &'static ChunkPool) -> HashQueue {
        HashQueue {
            chunks: VecDeque::new(),
            head: 0,
            len: 0,
            pool,
        }
    }

    /// Hashes queued.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Queues `hash` last.
    pub(crate) fn push_back(&mut self, hash: u64) {
        let at = self.head + self.len;
        if at == self.chunks.len() * CHUNK {
            self.chunks.push_back(self.pool.take());
        }
        self.chunks[at / CHUNK][at % CHUNK] = hash;
        self.len += 1;
    }

    /// The queued hashes, first to last.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let (head, len) = (self.head, self.len);
        self.chunks
            .iter()
            .enumerate()
            .flat_map(move |(i, c)| {
                let from = if i == 0 { head } else { 0 };
                c[from..].iter().copied()
            })
            .take(len)
    }

    /// Takes the first `n` hashes (all, if fewer are queued) off the queue.
    pub(crate) fn pop_front(&mut self, n: usize) -> Vec<u64> {
        let n = n.min(self.len);
        let out: Vec<u64> = self.iter().take(n).collect();
        self.head += n;
        self.len -= n;
        let done = if self.len == 0 {
            self.head = 0;
            self.chunks.len()
        } else {
            let done = self.head / CHUNK;
            self.head %= CHUNK;
            done
        };
        self.pool.give(self.chunks.drain(..done));
        out
    }

    /// Empties the queue, its chunks back to the pool.
    pub(crate) fn clear(&mut self) {
        self.pool.give(self.chunks.drain(..));
        self.head = 0;
        self.len = 0;
    }

    /// Bytes of its chunks.
    pub(crate) fn bytes(&self) -> usize {
        self.chunks.len() * CHUNK * std::mem::size_of::<u64>()
    }
}

/// A copy with chunks of its own (a compaction's snapshot of the delta).
impl Clone for HashQueue {
    fn clone(&self) -> HashQueue {
        let mut q = HashQueue::with_pool(self.pool);
        for h in self.iter() {
            q.push_back(h);
        }
        q
    }
}

impl Drop for HashQueue {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Chunks this thread allocated because a pool was empty.
        pub(super) static FRESH: Cell<usize> = const { Cell::new(0) };
    }

    fn fresh() -> usize {
        FRESH.with(Cell::get)
    }

    fn pool() -> &'static ChunkPool {
        Box::leak(Box::new(ChunkPool::new()))
    }

    /// First in, first out, across chunk boundaries, with pops of every size.
    #[test]
    fn hashes_come_out_in_the_order_they_went_in() {
        let mut q = HashQueue::with_pool(pool());
        let mut model = std::collections::VecDeque::new();
        let mut next = 1u64;
        for round in 0..40usize {
            let pushes = (round * 977) % (3 * CHUNK);
            for _ in 0..pushes {
                q.push_back(next);
                model.push_back(next);
                next += 1;
            }
            let pops = (round * 1231) % (2 * CHUNK + 5);
            let got = q.pop_front(pops);
            let want: Vec<u64> = (0..pops.min(model.len()))
                .filter_map(|_| model.pop_front())
                .collect();
            assert_eq!(got, want, "round {round}");
            assert_eq!(q.len(), model.len());
            assert!(q.iter().eq(model.iter().copied()), "round {round}");
            // Never more chunks than the queued hashes need, plus the partial ends.
            assert!(q.chunks.len() <= model.len() / CHUNK + 2);
        }
        let copy = q.clone();
        assert!(copy.iter().eq(model.iter().copied()));
    }

    /// Regression: the queue was a `VecDeque` that the writer grew by reallocating
    /// (a 134 MB `mremap` or `brk` at 20M keys, which waits for the process's
    /// memory-map lock). From a stocked pool, a million pushes allocate nothing, and
    /// the chunks drained go back for the next queue.
    #[test]
    fn pushes_take_chunks_from_a_stocked_pool_and_give_them_back() {
        let pool = pool();
        let need = 1_000_000usize.div_ceil(CHUNK);
        pool.stock(need);
        assert_eq!(pool.len(), need);
        let before = fresh();
        let mut q = HashQueue::with_pool(pool);
        for h in 0..1_000_000u64 {
            q.push_back(h);
        }
        assert_eq!(fresh(), before, "a push allocated a chunk");
        assert_eq!(pool.len(), 0);
        let first = q.pop_front(3 * CHUNK + 1);
        assert_eq!(first[3 * CHUNK], 3 * CHUNK as u64);
        assert_eq!(pool.len(), 3, "drained chunks go back");
        drop(q);
        assert_eq!(pool.len(), need);
        // An empty pool: the writer allocates for itself rather than fail.
        let mut q = HashQueue::with_pool(self::pool());
        q.push_back(7);
        assert_eq!(fresh(), before + 1);
        assert_eq!(q.pop_front(5), vec![7]);
    }

    /// The pool keeps at most `POOL_MAX` chunks, and stocking stops there.
    #[test]
    fn the_pool_is_bounded() {
        let pool = pool();
        pool.stock(usize::MAX);
        assert_eq!(pool.len(), POOL_MAX);
        let mut q = HashQueue::with_pool(pool);
        for h in 0..(POOL_MAX * CHUNK + 1) as u64 {
            q.push_back(h);
        }
        assert_eq!(pool.len(), 0);
        drop(q);
        assert_eq!(pool.len(), POOL_MAX);
    }
}
