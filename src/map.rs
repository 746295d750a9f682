//! The mapped file: the only module with `unsafe` code.
//!
//! # The mapping protocol
//!
//! A store maps its file once, `MAP_SHARED`, with a *reservation* larger than the file
//! (reserving address space for a shared file mapping costs nothing: it is never charged
//! against memory commit). Growing the file inside the reservation needs no remap; growing
//! past it maps the file again into a new [`Mapping`] and leaves the old one alive for as
//! long as anyone holds it (`Arc`), so no slice into a mapping can outlive its mapping.
//!
//! Bytes of the file are either *published* (below [`Mapping::published`]) or not:
//!
//! * Readers may only borrow published bytes ([`Mapping::read`] enforces it).
//! * Published bytes are never written through the mapping. In-place updates of published
//!   bytes (index buckets, checkpoint slots) go through `pwrite` ([`FileHandle::write_at`]),
//!   under the store's exclusive state lock, so no reader holds a slice of them meanwhile.
//! * Unpublished bytes are written through the mapping only by the single [`TailWriter`],
//!   which then publishes them with a release store. A reader can only learn an offset
//!   from the index or from `published` itself, after that release.
//!
//! The file is never shrunk while mapped (shrinking under a mapping turns a later access
//! into `SIGBUS`). All space the mapping can touch is allocated with `posix_fallocate`
//! before it is published or written, so a full disk is an `ENOSPC` error from the write
//! that needed the space, not a `SIGBUS` at some later store instruction.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{Advice, MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::options::AccessPattern;

/// What a sync covered, reported to a [`SyncObserver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncEvent {
    /// `fdatasync` of the whole file (data and size).
    File,
    /// `msync(MS_SYNC)` / `sync_file_range`+flush of the byte range `[start, end)`.
    Range {
        /// First byte (page-aligned).
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// The directory holding the store was synced (after create or rename).
    Directory,
    /// A file was renamed over the store path (compaction); `fsync` of it preceded this.
    Renamed,
}

/// Told about every sync the store completes, after it returned successfully. Used by the
/// power-loss simulator to know what was durable when. Must be cheap or the store slows.
pub trait SyncObserver: Send + Sync {
    /// Called after a sync of `event` completed on the file at `path`.
    fn synced(&self, path: &std::path::Path, event: SyncEvent);
}

/// `Debug`-able wrapper so [`Options`](crate::Options) can derive `Debug`.
#[derive(Clone)]
pub(crate) struct SyncObserverRef(pub(crate) Arc<dyn SyncObserver>);

impl std::fmt::Debug for SyncObserverRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncObserver")
    }
}

/// How long [`FileHandle::lock`] waits out a transiently held lock.
pub(crate) const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);

/// The open, locked store file and its system calls.
#[derive(Debug)]
pub(crate) struct FileHandle {
    file: File,
}

fn errno_result(op: &'static str, rc: libc::c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::io(op, io::Error::last_os_error()))
    }
}

impl FileHandle {
    /// Wraps an open file and takes the store lock: exclusive for writers, shared for
    /// read-only opens (`flock`, which also conflicts within one process).
    ///
    /// A conflicting lock is retried for up to [`LOCK_PATIENCE`] before giving up with
    /// [`Error::Locked`]: a `flock` belongs to the open file description, so when any
    /// thread of a process forks (e.g. `std::process::Command`), the child holds a copy
    /// of every descriptor until it execs, and a store closed in that window stays locked
    /// for a moment after `drop`.
    pub(crate) fn lock(file: File, exclusive: bool) -> Result<Self> {
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        loop {
            let r = if exclusive {
                file.try_lock()
            } else {
                file.try_lock_shared()
            };
            match r {
                Ok(()) => return Ok(FileHandle { file }),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::Locked);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("flock", e)),
            }
        }
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io("fstat", e))?
            .len())
    }

    /// `pwrite` of all of `data` at `off`.
    pub(crate) fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        self.file
            .write_all_at(data, off)
            .map_err(|e| Error::io("pwrite", e))
    }

    /// `pread` of exactly `buf.len()` bytes at `off`.
    pub(crate) fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| Error::io("pread", e))
    }

    /// Allocates `[off, off + len)` for real (`posix_fallocate`), extending the file if
    /// needed. Fails with `ENOSPC` up front instead of leaving holes that fault later.
    pub(crate) fn allocate(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(Error::InvalidOption("file offset beyond off_t"));
        };
        // SAFETY: posix_fallocate only reads its integer arguments; the fd is open and
        // owned by `self.file` for the duration of the call.
        let rc = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), o, l) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::io("fallocate", io::Error::from_raw_os_error(rc)))
        }
    }

    /// Zeroes `[off, off + len)` (used by recovery to erase a torn tail so stale bytes can
    /// never be mistaken for records later). Keeps the blocks allocated.
    pub(crate) fn zero_range(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(Error::InvalidOption("file offset beyond off_t"));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is valid.
        let rc =
            unsafe { libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, o, l) };
        if rc == 0 {
            return Ok(());
        }
        // Not every filesystem has ZERO_RANGE (tmpfs does not): write zeros instead.
        let zeros = vec![0u8; 1 << 20];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Releases the disk blocks of `[off, off + len)` without changing the file size
    /// (old index regions). Best effort: an unsupported filesystem keeps the blocks.
    pub(crate) fn punch_hole(&self, off: u64, len: u64) {
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is valid.
        let _ = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
    }

    /// `fdatasync`: data and the metadata needed to read it (the size) are durable.
    pub(crate) fn sync_data(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("fdatasync", e))
    }

    /// Starts write-back of `[off, off + len)` without waiting
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Not durable: no device flush.
    pub(crate) fn start_writeback(&self, off: u64, len: u64) -> Result<()> {
        let (Ok(o), Ok(l)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: sync_file_range only reads its integer arguments; the fd is valid.
        let rc = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE)
        };
        errno_result("sync_file_range", rc)
    }
}

/// Syncs the directory containing `path`, so a newly created or renamed entry is durable.
pub(crate) fn sync_dir(path: &std::path::Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync(directory)", e))
}

/// One mapping of the store file.
#[derive(Debug)]
pub(crate) struct Mapping {
    raw: MmapRaw,
    /// Length of the mapping (the reservation); the file may be shorter.
    reserved: u64,
    /// Bytes `[0, published)` are readable and immutable through the mapping.
    published: AtomicU64,
    writable: bool,
}

impl Mapping {
    /// Maps `reserve` bytes of `file` (at least the file's length), shared. Nothing is
    /// prefaulted here; see [`Mapping::populate_read`].
    pub(crate) fn new(
        file: &FileHandle,
        reserve: u64,
        published: u64,
        writable: bool,
    ) -> Result<Self> {
        let len = usize::try_from(reserve).map_err(|_| Error::InvalidOption("store too large"))?;
        let mut opts = MmapOptions::new();
        opts.len(len);
        let raw = if writable {
            opts.map_raw(file.file())
        } else {
            opts.map_raw_read_only(file.file())
        }
        .map_err(|e| Error::io("mmap", e))?;
        Ok(Mapping {
            raw,
            reserved: reserve,
            published: AtomicU64::new(published),
            writable,
        })
    }

    /// Warms `[0, len)` up: reads it into the page cache and maps it, read-only, like
    /// `MAP_POPULATE` but for a range (`MADV_POPULATE_READ`). Only the used part of the
    /// file is populated: pulling the free tail into the cache too would put it in large
    /// folios, which made later `sync_file_range`/`msync` of small appends write back whole
    /// folios (measured 5-7x slower `Async` writes). Falls back to `MADV_WILLNEED`.
    pub(crate) fn populate_read(&self, len: u64) {
        let len = len.min(self.reserved) as usize;
        if len == 0 {
            return;
        }
        if self.raw.advise_range(Advice::PopulateRead, 0, len).is_err() {
            let _ = self.raw.advise_range(Advice::WillNeed, 0, len);
        }
    }

    pub(crate) fn reserved(&self) -> u64 {
        self.reserved
    }

    pub(crate) fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Borrows `[off, off + len)`. `None` unless the whole range is published (hence inside
    /// the file and the mapping). Offsets read from the file are untrusted: this is the
    /// bounds check that keeps a damaged index from reading outside the mapping.
    pub(crate) fn read(&self, off: u64, len: u64) -> Option<&[u8]> {
        let end = off.checked_add(len)?;
        if end > self.published() {
            return None;
        }
        // SAFETY: `end <= published <= reserved` (published never exceeds the allocated
        // file length, which never exceeds the reservation), so the range lies inside the
        // mapping and inside the file (no SIGBUS unless the file is truncated from
        // outside, which the README declares unsupported). Published bytes are never
        // written through the mapping (module docs), so no `&mut` aliases this slice; the
        // returned lifetime is tied to `&self`, which keeps the mapping alive.
        Some(unsafe {
            std::slice::from_raw_parts(self.raw.as_ptr().add(off as usize), len as usize)
        })
    }

    /// Everything published, as one slice (for scans).
    pub(crate) fn published_bytes(&self) -> &[u8] {
        self.read(0, self.published()).unwrap_or(&[])
    }

    /// Advises the kernel about the access pattern of the whole mapping.
    pub(crate) fn advise(&self, a: AccessPattern) -> Result<()> {
        let adv = match a {
            AccessPattern::Normal => Advice::Normal,
            AccessPattern::Random => Advice::Random,
            AccessPattern::Sequential => Advice::Sequential,
            AccessPattern::WillNeed => Advice::WillNeed,
        };
        self.raw.advise(adv).map_err(|e| Error::io("madvise", e))
    }

    /// Prefaults `[off, off + len)` writable (`MADV_POPULATE_WRITE`), so the first appends
    /// there take no write fault. Best effort (older kernels lack it).
    pub(crate) fn prefault_write(&self, off: u64, len: u64) {
        if self.writable && off + len <= self.reserved && len > 0 {
            let _ = self
                .raw
                .advise_range(Advice::PopulateWrite, off as usize, len as usize);
        }
    }

    /// `msync(MS_SYNC)` of the pages covering `[off, off + len)`.
    pub(crate) fn sync_range(&self, off: u64, len: u64) -> Result<()> {
        let end = (off + len).min(self.reserved);
        let start = off.min(end);
        self.raw
            .flush_range(start as usize, (end - start) as usize)
            .map_err(|e| Error::io("msync", e))
    }

    /// Counts resident pages of `[0, len)` with `mincore`.
    pub(crate) fn resident_pages(&self, len: u64) -> u64 {
        let len = len.min(self.reserved) as usize;
        if len == 0 {
            return 0;
        }
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: the address is the start of our live mapping and `len` lies inside it;
        // `vec` has one byte per page of the range, as mincore requires.
        let rc =
            unsafe { libc::mincore(self.raw.as_mut_ptr().cast(), len, vec.as_mut_ptr().cast()) };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|&&b| b & 1 == 1).count() as u64
    }
}

/// The single writer of a mapping's unpublished tail.
#[derive(Debug)]
pub(crate) struct TailWriter {
    map: Arc<Mapping>,
}

impl TailWriter {
    /// Takes the write capability for `map`. The store creates exactly one per mapping and
    /// keeps it inside its writer mutex.
    pub(crate) fn new(map: Arc<Mapping>) -> Self {
        TailWriter { map }
    }

    pub(crate) fn mapping(&self) -> &Arc<Mapping> {
        &self.map
    }

    /// Copies `data` to `off` through the mapping. `off` must be at or past the published
    /// end and the range must be allocated (`alloc_end` is the allocated file length).
    pub(crate) fn write(&mut self, off: u64, data: &[u8], alloc_end: u64) -> Result<()> {
        let end = off.checked_add(data.len() as u64).ok_or(Error::corrupt(
            off,
            "write past the end of the address space",
        ))?;
        if !self.map.writable {
            return Err(Error::ReadOnly);
        }
        if off < self.map.published() || end > alloc_end || end > self.map.reserved {
            return Err(Error::corrupt(
                off,
                "internal: write outside the unpublished tail",
            ));
        }
        // SAFETY: the range is inside the mapping (`end <= reserved`) and inside the
        // allocated file (`end <= alloc_end`), so no SIGBUS; it is unpublished
        // (`off >= published`), so no reader holds a slice of it (readers only borrow
        // published bytes); and `&mut self` makes this the only writer of the tail.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.raw.as_mut_ptr().add(off as usize),
                data.len(),
            );
        }
        Ok(())
    }

    /// Hints the CPU to fetch `[off, off + len)` of the unpublished tail for writing
    /// (`prefetchw`), so that the next append finds its cache lines owned instead of
    /// missing on each of them while the store holds its locks. A hint only: nothing
    /// happens outside the allocated, reserved tail, or off x86-64.
    pub(crate) fn prefetch_write(&self, off: u64, len: u64, alloc_end: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
            let end = off
                .saturating_add(len)
                .min(alloc_end)
                .min(self.map.reserved);
            let mut at = off & !63;
            while at < end {
                let p = self.map.raw.as_ptr().wrapping_add(at as usize).cast::<i8>();
                // SAFETY: a prefetch is a hint that never faults and never reads or
                // writes memory as far as the program can observe; `p` is inside the
                // reserved mapping anyway (`at < end <= reserved`).
                unsafe { _mm_prefetch::<_MM_HINT_ET0>(p) };
                at += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (off, len, alloc_end);
    }

    /// Publishes `[0, end)`: every byte below `end` was written and becomes immutable.
    pub(crate) fn publish(&mut self, end: u64) {
        debug_assert!(end <= self.map.reserved);
        self.map.published.store(end, Ordering::Release);
    }

    /// Switches to a new mapping (growth past the reservation). The new mapping starts
    /// with the same published end.
    pub(crate) fn replace(&mut self, map: Arc<Mapping>) {
        map.published.store(self.map.published(), Ordering::Release);
        self.map = map;
    }
}

/// Hints the CPU to fetch the cache line at `addr` for writing (`prefetchw`). Any
/// address is fine, even a stale or unmapped one: a prefetch never faults and has no
/// effect the program can observe. Nothing happens off x86-64.
pub(crate) fn prefetch_write_addr(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        let p = std::ptr::without_provenance::<i8>(addr);
        // SAFETY: a prefetch is a hint that never faults and never reads or writes
        // memory as far as the program can observe, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_ET0>(p) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Operating-system probes used by benchmarks and the CLI.
pub mod sys {
    use std::fs::File;
    use std::io;
    use std::marker::PhantomData;
    use std::ops::{Deref, DerefMut};
    use std::os::unix::io::AsRawFd;
    use std::path::Path;

    pub use memmap2::Advice;

    /// Creates (or truncates) `path` for reading and writing: a scratch file for the
    /// benchmarks' experiments.
    ///
    /// # Errors
    /// The `open` error.
    pub fn create_scratch(path: &Path) -> io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
    }

    /// How [`ScratchFile::map`] maps the file.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct ScratchFlags {
        /// `MAP_POPULATE`.
        pub populate: bool,
        /// `MAP_NORESERVE`.
        pub noreserve: bool,
        /// `MAP_PRIVATE` (copy-on-write) instead of `MAP_SHARED`.
        pub private: bool,
    }

    /// A file for experiments with mapping flags (the benchmark's `MAP_POPULATE`,
    /// `MAP_NORESERVE` and `MAP_PRIVATE` sections). A mapping borrows the handle mutably,
    /// so nothing can write the file through it while the mapping lives.
    ///
    /// The contract is the one of a store file: the file must not be changed through
    /// another handle or by another process while it is mapped.
    #[derive(Debug)]
    pub struct ScratchFile {
        file: File,
    }

    impl ScratchFile {
        /// Wraps a file created for the experiment (see the type's contract).
        #[must_use]
        pub fn new(file: File) -> Self {
            ScratchFile { file }
        }

        /// The file, for `pwrite`/`pread`/`fdatasync` while it is not mapped.
        #[must_use]
        pub fn file(&self) -> &File {
            &self.file
        }

        /// Maps the first `len` bytes (which must lie inside the file) writable.
        ///
        /// # Errors
        /// The `mmap` error, or `InvalidInput` if `len` exceeds the file.
        pub fn map(&mut self, len: usize, flags: ScratchFlags) -> io::Result<ScratchMap<'_>> {
            let file_len = self.file.metadata()?.len();
            if u64::try_from(len).map_or(true, |l| l > file_len) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "map past end of file",
                ));
            }
            let mut o = memmap2::MmapOptions::new();
            o.len(len);
            if flags.populate {
                o.populate();
            }
            if flags.noreserve {
                o.no_reserve_swap();
            }
            let map = if flags.private {
                // SAFETY: the range lies inside the file (checked above, so no SIGBUS), and
                // `&mut self` keeps this handle from writing the file while the mapping
                // lives; other writers are excluded by the type's documented contract.
                unsafe { o.map_copy(&self.file) }
            } else {
                // SAFETY: as above.
                unsafe { o.map_mut(&self.file) }
            }?;
            Ok(ScratchMap {
                map,
                _file: PhantomData,
            })
        }
    }

    /// A mapping of a [`ScratchFile`]; dereferences to its bytes.
    #[derive(Debug)]
    pub struct ScratchMap<'a> {
        map: memmap2::MmapMut,
        _file: PhantomData<&'a mut File>,
    }

    impl ScratchMap<'_> {
        /// `madvise` of the whole mapping.
        ///
        /// # Errors
        /// The `madvise` error.
        pub fn advise(&self, advice: Advice) -> io::Result<()> {
            self.map.advise(advice)
        }

        /// `msync(MS_SYNC)` of the pages covering `[off, off + len)`.
        ///
        /// # Errors
        /// The `msync` error.
        pub fn flush_range(&self, off: usize, len: usize) -> io::Result<()> {
            self.map.flush_range(off, len)
        }
    }

    impl Deref for ScratchMap<'_> {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            &self.map
        }
    }

    impl DerefMut for ScratchMap<'_> {
        fn deref_mut(&mut self) -> &mut [u8] {
            &mut self.map
        }
    }

    /// The raw cost of one durable write on the disk holding `dir`: latencies, in
    /// nanoseconds and in measurement order, of a 4 KiB `pwrite` + `fdatasync` on a
    /// scratch file there (removed afterwards). The writes overwrite 64 blocks written
    /// and synced beforehand, as the store overwrites preallocated space, so no block
    /// allocation is timed. Measures at least 5 and at most `max` syncs, stopping after
    /// `budget`. Durability benchmarks report their results as ratios to this.
    ///
    /// # Errors
    /// I/O errors creating, writing or syncing the scratch file.
    pub fn raw_sync_latencies(
        dir: &Path,
        max: usize,
        budget: std::time::Duration,
    ) -> io::Result<Vec<u64>> {
        use std::os::unix::fs::FileExt;
        let path = dir.join("raw-sync.scratch");
        let f = create_scratch(&path)?;
        let page = [0xA5u8; 4096];
        for i in 0..64u64 {
            f.write_all_at(&page, i * 4096)?;
        }
        f.sync_all()?;
        let start = std::time::Instant::now();
        let mut lat = Vec::with_capacity(max.min(1 << 16));
        let mut i = 0u64;
        while lat.len() < max.max(5) && (lat.len() < 5 || start.elapsed() < budget) {
            let mut buf = page;
            buf[..8].copy_from_slice(&i.to_le_bytes());
            let t = std::time::Instant::now();
            f.write_all_at(&buf, (i % 64) * 4096)?;
            f.sync_data()?;
            lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
            i += 1;
        }
        drop(f);
        let _ = std::fs::remove_file(&path);
        Ok(lat)
    }

    /// Minor and major page faults of this process so far (`getrusage(RUSAGE_SELF)`).
    #[must_use]
    pub fn page_faults() -> (u64, u64) {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a full `rusage` into the pointer we pass, which points
        // at properly sized, writable memory.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
        if rc != 0 {
            return (0, 0);
        }
        // SAFETY: rc == 0, so getrusage initialized the struct (and it was zeroed anyway).
        let ru = unsafe { ru.assume_init() };
        (
            u64::try_from(ru.ru_minflt).unwrap_or(0),
            u64::try_from(ru.ru_majflt).unwrap_or(0),
        )
    }

    /// Writes back and drops the file's pages from the page cache
    /// (`fdatasync` + `posix_fadvise(POSIX_FADV_DONTNEED)`), so the next access is cold.
    ///
    /// # Errors
    /// Fails if the file cannot be opened or synced.
    pub fn evict(path: &Path) -> io::Result<()> {
        let f = std::fs::File::open(path)?;
        f.sync_data()?;
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is valid.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    /// Resident pages of the file in the page cache, and its total pages (`mincore` on a
    /// temporary read-only mapping).
    ///
    /// # Errors
    /// Fails if the file cannot be opened or mapped.
    pub fn resident(path: &Path) -> io::Result<(u64, u64)> {
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        if len == 0 {
            return Ok((0, 0));
        }
        let raw = memmap2::MmapOptions::new().map_raw_read_only(&f)?;
        let pages = usize::try_from(len.div_ceil(4096)).unwrap_or(0);
        let mut vec = vec![0u8; pages];
        // SAFETY: `raw` maps the whole file (length `len`), and `vec` has one byte per page.
        let rc =
            unsafe { libc::mincore(raw.as_mut_ptr().cast(), raw.len(), vec.as_mut_ptr().cast()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((
            vec.iter().filter(|&&b| b & 1 == 1).count() as u64,
            pages as u64,
        ))
    }
}
