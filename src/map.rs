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
//!   under the store's index gate, held exclusively. A reader that holds a slice of such
//!   bytes holds the gate, shared; one that does not (a lookup) reads them a word at a
//!   time, atomically ([`Mapping::shared_words`]), and checks the index sequence
//!   afterwards, as readers in other processes do.
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
use crate::format::{durable_check, LIVE_DURABLE_CHECK_OFF, LIVE_DURABLE_OFF};
use crate::options::AccessPattern;

/// How long [`FileHandle::lock`] waits out a transiently held lock.
pub(crate) const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);

/// The open, locked store file and its system calls.
#[derive(Debug)]
pub(crate) struct FileHandle {
    file: File,
}

/// The byte range of the writer lock: byte 0 (an OFD lock, `l_pid` 0 as required).
fn writer_lock_range(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 1;
    fl
}

/// Filesystem magic numbers (`statfs.f_type`) of copy-on-write filesystems.
pub(crate) fn is_copy_on_write(f_type: u64) -> bool {
    const BTRFS: u64 = 0x9123_683e;
    const BCACHEFS: u64 = 0xca45_1a4e;
    const ZFS: u64 = 0x2fc1_2fc1;
    matches!(f_type, BTRFS | BCACHEFS | ZFS)
}

fn errno_result(op: &'static str, rc: libc::c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::io(op, io::Error::last_os_error()))
    }
}

impl FileHandle {
    /// Wraps an open file and takes the writer lock: an exclusive open-file-description
    /// lock (`F_OFD_SETLK`) on byte 0. Readers take no lock at all, so any number of them
    /// share the store with one writer; a second writer, in this process or another,
    /// conflicts (OFD locks conflict between open file descriptions even within one
    /// process, unlike classic `fcntl` locks).
    ///
    /// A conflicting lock is retried for up to [`LOCK_PATIENCE`] before giving up with
    /// [`Error::Locked`]: the lock belongs to the open file description, so when any
    /// thread of a process forks (e.g. `std::process::Command`), the child holds a copy
    /// of every descriptor until it execs, and a store closed in that window stays locked
    /// for a moment after `drop`.
    pub(crate) fn lock_writer(file: File) -> Result<Self> {
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        loop {
            let mut fl = writer_lock_range(libc::F_WRLCK);
            // SAFETY: `fl` is a valid, initialized `flock` struct that outlives the call;
            // the fd is open (owned by `file`).
            let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &raw mut fl) };
            if rc == 0 {
                return Ok(FileHandle { file });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EACCES) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::locked());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                _ => return Err(Error::io("fcntl(F_OFD_SETLK)", e)),
            }
        }
    }

    /// Wraps a file opened for reading, taking no lock (a reader).
    pub(crate) fn unlocked(file: File) -> Self {
        FileHandle { file }
    }

    /// True if the file lives on a copy-on-write filesystem (btrfs, bcachefs, ZFS), where
    /// a store into an already-written page of a `MAP_SHARED` mapping may need new space:
    /// on a full disk the fault that needs it raises `SIGBUS` instead of returning an
    /// error. The store then appends with `pwrite`, which returns the error. (XFS with
    /// reflink shares blocks only between reflinked copies; mapkv never makes one.)
    /// False if `fstatfs` fails.
    pub(crate) fn copy_on_write_fs(&self) -> bool {
        // SAFETY: `statfs` is plain old data, so all zeroes is a valid value; `fstatfs`
        // writes only into it, and the descriptor is open for as long as `self` lives.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above: a valid descriptor and a pointer to a live `statfs`.
        let rc = unsafe { libc::fstatfs(self.file.as_raw_fd(), &raw mut st) };
        rc == 0 && is_copy_on_write(st.f_type as u64)
    }

    /// True if some open file description (a writer, in any process) holds the writer
    /// lock of this file (`F_OFD_GETLK`). An error counts as "held": the caller then
    /// waits for the writer rather than assuming it is gone.
    pub(crate) fn writer_alive(&self) -> bool {
        let mut fl = writer_lock_range(libc::F_WRLCK);
        // SAFETY: as in `lock_writer`; F_OFD_GETLK only writes into `fl`.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &raw mut fl) };
        rc != 0 || i32::from(fl.l_type) != libc::F_UNLCK
    }

    /// Identity of the open file: (device, inode).
    pub(crate) fn identity(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata().map_err(|e| Error::io("fstat", e))?;
        Ok((m.dev(), m.ino()))
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Bytes the filesystem allocated to the file (`st_blocks * 512`).
    pub(crate) fn allocated(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io("fstat", e))?
            .blocks()
            .saturating_mul(512))
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
    /// (old index regions). Best effort: an unsupported filesystem keeps the blocks
    /// (returns false).
    pub(crate) fn punch_hole(&self, off: u64, len: u64) -> bool {
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return false;
        };
        loop {
            // SAFETY: fallocate only reads its integer arguments; the fd is valid.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    o,
                    l,
                )
            };
            if rc == 0 {
                return true;
            }
            // A signal may interrupt it: a region is punched in many calls.
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false;
            }
        }
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

/// The live area of one store file (see [`crate::format::LIVE_OFF`]), through a mapping
/// of its own: the superblock page, mapped `MAP_SHARED` on its own, read-write for the
/// writer and read-only for readers. Its address never changes while the file is open
/// (the main mapping moves when the file outgrows it), and it is the only place where
/// this process changes mapped bytes other than through the [`TailWriter`].
#[derive(Debug)]
pub(crate) struct LiveArea {
    raw: MmapRaw,
    writable: bool,
}

impl LiveArea {
    /// Maps the superblock page of `file` (which must be at least one page long: the
    /// caller has read a valid superblock from it).
    pub(crate) fn new(file: &FileHandle, writable: bool) -> Result<Self> {
        if file.len()? < crate::format::PAGE {
            return Err(Error::not_a_store(0));
        }
        let mut opts = MmapOptions::new();
        opts.len(crate::format::PAGE as usize);
        let raw = if writable {
            opts.map_raw(file.file())
        } else {
            opts.map_raw_read_only(file.file())
        }
        .map_err(|e| Error::io("mmap(superblock)", e))?;
        Ok(LiveArea { raw, writable })
    }

    /// The counter at `field` (one of the `LIVE_*_OFF` constants).
    fn word(&self, field: u64) -> &AtomicU64 {
        use crate::format::{LIVE_LEN, LIVE_OFF};
        // A programming error, not input: the offsets are constants of the format.
        assert!(
            (LIVE_OFF..LIVE_OFF + LIVE_LEN).contains(&field) && field.is_multiple_of(8),
            "not a live-area field"
        );
        // SAFETY: `field` is 8-aligned and lies in the live area, inside the one page this
        // mapping covers and inside the file (checked at `new`), and the mapping lives as
        // long as `&self`; `AtomicU64` has the layout of `u64`. These bytes are only ever
        // accessed atomically: through this mapping here, through the same page mapped by
        // other processes, and never through slices of the main mapping (nothing reads
        // sector 4 through it). Concurrent changes are what atomics are for.
        unsafe { AtomicU64::from_ptr(self.raw.as_mut_ptr().add(field as usize).cast::<u64>()) }
    }

    /// Acquire load of `field`.
    pub(crate) fn load(&self, field: u64) -> u64 {
        self.word(field).load(Ordering::Acquire)
    }

    /// Release store of `v` into `field` (writers only; a no-op on a read-only mapping).
    pub(crate) fn store(&self, field: u64, v: u64) {
        if self.writable {
            self.word(field).store(v, Ordering::Release);
        }
    }

    /// Raises `field` to at least `v` (writers only).
    pub(crate) fn raise(&self, field: u64, v: u64) {
        if self.writable {
            self.word(field).fetch_max(v, Ordering::AcqRel);
        }
    }

    /// Raises the durable end to at least `end` and rewrites its check word (see
    /// [`durable_check`](crate::format::durable_check)) for the value now there.
    pub(crate) fn raise_durable(&self, seed: u64, end: u64) {
        self.raise(LIVE_DURABLE_OFF, end);
        let d = self.load(LIVE_DURABLE_OFF);
        self.store(LIVE_DURABLE_CHECK_OFF, durable_check(seed, d));
    }

    /// Sets the durable end to `end` (recovery, compaction), with its check word.
    pub(crate) fn store_durable(&self, seed: u64, end: u64) {
        self.store(LIVE_DURABLE_CHECK_OFF, 0);
        self.store(LIVE_DURABLE_OFF, end);
        self.store(LIVE_DURABLE_CHECK_OFF, durable_check(seed, end));
    }

    /// The durable end if its check word matches, else 0 (unknown). The area is never
    /// synced on purpose and has no checksum: after a power loss its sector may be torn,
    /// and recovery must not take garbage for a claim that bytes were durable.
    pub(crate) fn checked_durable(&self, seed: u64) -> u64 {
        let d = self.load(LIVE_DURABLE_OFF);
        if self.load(LIVE_DURABLE_CHECK_OFF) == durable_check(seed, d) {
            d
        } else {
            0
        }
    }

    /// Adds `v` to `field` (writers only); returns the new value.
    pub(crate) fn add(&self, field: u64, v: u64) -> u64 {
        if self.writable {
            self.word(field)
                .fetch_add(v, Ordering::AcqRel)
                .wrapping_add(v)
        } else {
            self.load(field)
        }
    }
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

    /// The `n` 8-byte words at `off` of the published range, as atomics: for bytes that
    /// may be rewritten while this thread reads them (index buckets: by a writer
    /// process, or by this process's checkpoint, see the module docs). Each load reads
    /// either the old or the new word, never a torn one. `None` if `off` is unaligned or
    /// the words are not all published.
    pub(crate) fn shared_words(&self, off: u64, n: usize) -> Option<&[AtomicU64]> {
        let end = off.checked_add(u64::try_from(n).ok()?.checked_mul(8)?)?;
        if !off.is_multiple_of(8) || end > self.published() {
            return None;
        }
        // SAFETY: 8-aligned (the mapping is page-aligned and `off` is a multiple of 8)
        // and inside the published range, hence inside the mapping and the file (no
        // SIGBUS unless the file is truncated from outside, which the README declares
        // unsupported). `AtomicU64` has the size and alignment of `u64` and allows
        // shared mutation, so a concurrent `pwrite` (the kernel's stores) into these
        // bytes is no data race for loads through it; this process never writes
        // published bytes through the mapping. The lifetime is tied to `&self`, which
        // keeps the mapping alive.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.raw.as_mut_ptr().add(off as usize).cast::<AtomicU64>(),
                n,
            )
        })
    }

    /// Copies `out.len()` bytes (a multiple of 8) from `off` of the published range into
    /// `out`, a word at a time, atomically (see [`Mapping::shared_words`]): a copy of
    /// bytes that may be rewritten meanwhile, which the caller validates. False if the
    /// range is unaligned or not published.
    pub(crate) fn copy_shared(&self, off: u64, out: &mut [u8]) -> bool {
        if !out.len().is_multiple_of(8) {
            return false;
        }
        let Some(words) = self.shared_words(off, out.len() / 8) else {
            return false;
        };
        for (w, chunk) in words.iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        true
    }

    /// Moves the published end of a reader's (read-only) mapping to `end`, which the
    /// caller checked lies inside the file and the reservation. Readers never write, so
    /// what this makes readable are bytes a writer has finished with.
    pub(crate) fn follow_to(&self, end: u64) {
        if !self.writable && end <= self.reserved {
            self.published.store(end, Ordering::Release);
        }
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
    /// there take no write fault. Best effort (older kernels lack it). Whole pages below
    /// the published end are skipped: they hold records already, and a window asked for
    /// while it was ahead of the tail may run after the tail passed it, when faulting
    /// its pages in writable would undo their release (`Mapping::release_pages`).
    pub(crate) fn prefault_write(&self, off: u64, len: u64) {
        let end = off.saturating_add(len);
        let off = off.max(crate::format::page_down(self.published()));
        if self.writable && end <= self.reserved && end > off {
            let _ =
                self.raw
                    .advise_range(Advice::PopulateWrite, off as usize, (end - off) as usize);
        }
    }

    /// Asks the kernel to drop `file`'s clean, unmapped pages from the page cache
    /// (`POSIX_FADV_DONTNEED`), so the next read of them comes from the disk (tests).
    #[cfg(test)]
    pub(crate) fn drop_clean_cache(file: &std::fs::File) {
        // SAFETY: a plain system call on a descriptor the caller keeps open; it changes
        // no memory of this process.
        let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    /// The mapping's address: for prefetch hints (see [`prefetch_read_addr`]), and for
    /// tests, which look its pages up in `/proc/self/pagemap`.
    pub(crate) fn base_addr(&self) -> usize {
        self.raw.as_ptr() as usize
    }

    /// Drops this process's page-table entries for the pages inside `[off, off + len)`
    /// (`MADV_DONTNEED`): the pages stay in the page cache, dirty ones stay dirty, and
    /// the next access maps them again. Done before write-back of a range the writer has
    /// left behind: write-back write-protects each page still mapped writable with a TLB
    /// flush of its own, an IPI to every other CPU running this process's threads (a VM
    /// exit each here), where dropping the entries flushes once for the range. Best
    /// effort.
    pub(crate) fn release_pages(&self, off: u64, len: u64) {
        let start = crate::format::page_up(off);
        let end = crate::format::page_down(off.saturating_add(len).min(self.reserved));
        if end > start {
            // SAFETY: this is a `MAP_SHARED` mapping of a file. `MADV_DONTNEED` on such a
            // mapping only removes page-table entries (moving their dirty bits to the
            // page-cache pages); it neither discards nor changes the file's pages, so
            // every byte reads the same before and after, and a slice borrowed into the
            // range stays valid (its next access faults the same page back in). It would
            // zero a private or anonymous mapping, which this never is.
            let _ = unsafe {
                self.raw.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start as usize,
                    (end - start) as usize,
                )
            };
        }
    }

    /// Reads the pages at `offs` (each `len` bytes) into the page cache and maps them:
    /// `MADV_WILLNEED` for all first (their reads go to the disk together), then
    /// `MADV_POPULATE_READ` for each, which waits for them. For a thread about to read
    /// scattered pages of a file the page cache does not hold: a fault there reads the
    /// kernel's read-around window (128 KiB) for each 4 KiB page asked for, and the
    /// faults wait one after another. Best effort; offsets outside the published range
    /// are skipped.
    pub(crate) fn prefetch(&self, offs: &[u64], len: u64) {
        let page = |o: u64| {
            let start = crate::format::page_down(o);
            let end = crate::format::page_up(o.saturating_add(len)).min(self.published());
            (end > start).then_some((start as usize, (end - start) as usize))
        };
        for &o in offs {
            if let Some((at, n)) = page(o) {
                let _ = self.raw.advise_range(Advice::WillNeed, at, n);
            }
        }
        for &o in offs {
            if let Some((at, n)) = page(o) {
                let _ = self.raw.advise_range(Advice::PopulateRead, at, n);
            }
        }
    }

    /// Hints the CPU to fetch the cache lines of `[off, off + len)` (at most four) for
    /// reading: a lookup that learns a record's offset asks for the record's lines at
    /// once, so their misses overlap instead of each waiting for the header that says
    /// where the next one is. A hint only: lines past the published end are skipped,
    /// and nothing happens off x86-64.
    #[inline]
    pub(crate) fn prefetch_lines(&self, off: u64, len: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let end = off.saturating_add(len).min(self.published());
            let mut at = off & !63;
            for _ in 0..4 {
                if at >= end {
                    break;
                }
                let p = self.raw.as_ptr().wrapping_add(at as usize).cast::<i8>();
                // SAFETY: a prefetch is a hint that never faults and never reads or
                // writes memory as far as the program can observe; `p` is inside the
                // published range of the mapping anyway (`at < end <= published`).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
                at += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (off, len);
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

/// Zeroed 32-bit atomic words in an anonymous mapping of their own, with transparent huge
/// pages asked for (the key filter: a few megabytes read at random, where 4 KiB pages
/// would cost a TLB miss per lookup).
pub(crate) struct AtomicWords {
    raw: MmapRaw,
    len: usize,
}

impl AtomicWords {
    /// `len` zeroed words, or `None` if the memory cannot be mapped.
    pub(crate) fn zeroed(len: usize) -> Option<AtomicWords> {
        let bytes = len.checked_mul(4)?.max(4);
        let map = MmapOptions::new().len(bytes).map_anon().ok()?;
        // A hint, ignored where transparent huge pages are off.
        let _ = map.advise(Advice::HugePage);
        Some(AtomicWords {
            raw: MmapRaw::from(map),
            len,
        })
    }

    /// The words.
    pub(crate) fn words(&self) -> &[std::sync::atomic::AtomicU32] {
        // SAFETY: the mapping is page-aligned (so 4-aligned), at least `len * 4` bytes,
        // zero-initialized (a valid `AtomicU32`), private to this value and alive as long
        // as `&self`. Its bytes are only ever accessed through these atomics (no plain
        // reference to them exists), so shared references to them are sound.
        unsafe {
            std::slice::from_raw_parts(
                self.raw.as_mut_ptr().cast::<std::sync::atomic::AtomicU32>(),
                self.len,
            )
        }
    }
}

impl std::fmt::Debug for AtomicWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AtomicWords({})", self.len)
    }
}

/// Frees the pages of the anonymous mapping `map` (`MADV_DONTNEED`), `piece` bytes per
/// call, before it is unmapped: unmapping frees whatever is left under the process's
/// memory-map lock, which a thread changing the address space meanwhile (`brk`,
/// `mmap`) waits for (see `anon::POPULATE_PIECE`); each piece holds it only briefly.
/// Best effort. Afterwards the mapping reads as zeros.
pub(crate) fn discard_anon(map: &mut memmap2::MmapMut, piece: usize) {
    let (len, piece) = (map.len(), piece.max(4096));
    if len <= piece {
        return;
    }
    for off in (0..len).step_by(piece) {
        // SAFETY: `map` is an anonymous private mapping borrowed exclusively, so no
        // reference into its bytes exists while this runs. `MADV_DONTNEED` on such a
        // mapping frees its pages, which then read as zeros: the mapping stays valid
        // memory, only its contents change, and the caller is about to unmap it (or
        // keeps it as zeros, which every value it holds allows).
        let _ = unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                off,
                piece.min(len - off),
            )
        };
    }
}

/// Hints the CPU to fetch the cache line at `addr` for writing (`prefetchw`). Any
/// address is fine, even a stale or unmapped one: a prefetch never faults and has no
/// effect the program can observe. Nothing happens off x86-64.
pub(crate) fn prefetch_write_addr(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_addr::<{ std::arch::x86_64::_MM_HINT_ET0 }>(addr);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Hints the CPU to fetch the cache line at `addr` for reading. Any address is fine, as
/// for [`prefetch_write_addr`].
pub(crate) fn prefetch_read_addr(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_addr::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// `_mm_prefetch` with hint `HINT` of the line at `addr`, whatever the address.
#[cfg(target_arch = "x86_64")]
fn prefetch_addr<const HINT: i32>(addr: usize) {
    let p = std::ptr::without_provenance::<i8>(addr);
    // SAFETY: a prefetch is a hint that never faults and never reads or writes memory
    // as far as the program can observe, whatever the address.
    unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn copy_on_write_filesystems_are_recognized() {
        assert!(super::is_copy_on_write(0x9123_683e), "btrfs");
        assert!(!super::is_copy_on_write(0xef53), "ext4");
        assert!(!super::is_copy_on_write(0x0102_1994), "tmpfs");
    }

    #[test]
    fn discarding_an_anonymous_mapping_frees_every_piece() {
        let piece = 64 << 10;
        let mut map = memmap2::MmapOptions::new()
            .len(3 * piece + 4096)
            .map_anon()
            .unwrap();
        map.fill(0xFF);
        super::discard_anon(&mut map, piece);
        assert!(map.iter().all(|&b| b == 0), "every piece reads as zeros");
        // A mapping of one piece or less is left to `munmap`.
        let mut small = memmap2::MmapOptions::new().len(piece).map_anon().unwrap();
        small.fill(0xFF);
        super::discard_anon(&mut small, piece);
        assert!(small.iter().all(|&b| b == 0xFF));
    }
}
