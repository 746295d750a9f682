//! Operating-system probes of `mapkv bench`: the scratch mappings of the mmap flag
//! experiments (`MAP_POPULATE`, `MAP_NORESERVE`, `MAP_PRIVATE`, `madvise`), page-fault
//! counts, page-cache eviction and residency; for the reader-process section, a clock
//! that processes share and a mapping of atomic words that processes share.
//!
//! This is the binary's only module with `unsafe` code. The library never makes these
//! mappings (it maps its store `MAP_SHARED` only, behind its own protocol), so they live
//! here, next to the experiments, rather than in the library's API. The std-only probes
//! the criterion benches and `benches/compare` share (the raw cost of one sync, the
//! scratch-file opener) are in `common.rs`.
#![expect(
    unsafe_code,
    reason = "mmap of scratch files, getrusage, posix_fadvise, mincore, clock_gettime and \
              setrlimit"
)]

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::AtomicU64;

pub use memmap2::Advice;

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
/// `MAP_NORESERVE` and `MAP_PRIVATE` sections). A mapping borrows the handle mutably, so
/// nothing can write the file through this handle while the mapping lives; the promise
/// made to [`ScratchFile::new`] covers every other writer.
#[derive(Debug)]
pub struct ScratchFile {
    file: File,
}

impl ScratchFile {
    /// Wraps a file created for the experiment, so it can be mapped with
    /// [`ScratchFile::map`].
    ///
    /// # Safety
    /// A mapping hands out the file's bytes as `&[u8]`/`&mut [u8]`, which the compiler
    /// assumes nothing else changes. So for as long as the returned value lives, while a
    /// mapping of it exists, the file must not be written or truncated by any other means:
    /// not through another descriptor or a clone of [`ScratchFile::file`], not by this
    /// process through its path, not by another process. A scratch file this process
    /// created for the experiment and does not hand to anyone satisfies this.
    #[must_use]
    pub unsafe fn new(file: File) -> Self {
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
            // SAFETY: the range lies inside the file (checked above, so no access raises
            // SIGBUS), and `&mut self` keeps this handle from writing or truncating the
            // file while the mapping lives; every other writer is excluded by the promise
            // made to `ScratchFile::new`.
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

/// Minor and major page faults of this process so far (`getrusage(RUSAGE_SELF)`).
#[must_use]
pub fn page_faults() -> (u64, u64) {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a full `rusage` into the pointer we pass, which points at
    // properly sized, writable memory.
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
    let f = File::open(path)?;
    f.sync_data()?;
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is open (owned by
    // `f`, alive until the end of the function).
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
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok((0, 0));
    }
    // A raw mapping hands out no slices, so a concurrent change of the file cannot break
    // any reference: `mincore` only asks the kernel about the range.
    let raw = memmap2::MmapOptions::new().map_raw_read_only(&f)?;
    // Pages of the mapping as made (the file may have changed size since `len` was read).
    let pages = raw.len().div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: `raw` is a live mapping of `raw.len()` bytes from a page-aligned address,
    // and `vec` has one byte for each of its pages, which is what mincore writes.
    let rc = unsafe { libc::mincore(raw.as_mut_ptr().cast(), raw.len(), vec.as_mut_ptr().cast()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((
        vec.iter().filter(|&&b| b & 1 == 1).count() as u64,
        pages as u64,
    ))
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the machine, so a
/// time taken in one process can be subtracted from one taken in another (`Instant` reads
/// the same clock but does not expose its value).
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one `timespec` into the pointer, which points at a
    // live, writable, properly aligned local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A mapping of a small scratch file that two processes share, made with raw `mmap` so it
/// can be `MAP_SHARED` or `MAP_PRIVATE`, and read and written only as atomic 8-byte words
/// ([`WordMap::word`]): no slice of it is ever handed out, so another process changing the
/// file under it breaks no reference. The reader-process section of `mapkv bench` uses it
/// for the floor of cross-process visibility and for what `MAP_PRIVATE` does.
#[derive(Debug)]
pub struct WordMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl WordMap {
    /// Maps the first `len` bytes (`len > 0`, inside the file) of `file`, readable and
    /// writable, `MAP_PRIVATE` (copy-on-write) if `private`, else `MAP_SHARED`. The file
    /// must have been opened for reading and, for a shared mapping, writing.
    ///
    /// # Safety
    /// While the mapping lives, no process may truncate the file below `len` (an access
    /// past the end of a file raises SIGBUS), and every change of those bytes, by any
    /// process, must be an aligned atomic store of whole 8-byte words (another
    /// `WordMap` of the same file) or must happen while no word is being read. A scratch
    /// file that the bench created for the experiment, handed only to its own child
    /// processes, satisfies this.
    ///
    /// # Errors
    /// The `mmap` error, or `InvalidInput` if `len` is 0 or exceeds the file.
    pub unsafe fn new(file: &File, len: usize, private: bool) -> io::Result<Self> {
        let file_len = file.metadata()?.len();
        if len == 0 || u64::try_from(len).map_or(true, |l| l > file_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "word map empty or past end of file",
            ));
        }
        let flags = if private {
            libc::MAP_PRIVATE
        } else {
            libc::MAP_SHARED
        };
        // SAFETY: a fresh mapping at an address the kernel chooses (null hint), so it
        // overlaps nothing of ours; the fd is open for the duration of the call. The
        // result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(WordMap { ptr, len })
    }

    /// The `i`-th 8-byte word of the mapping. Panics if it is not inside the mapping.
    #[must_use]
    pub fn word(&self, i: usize) -> &AtomicU64 {
        let off = i.checked_mul(8).filter(|&o| o + 8 <= self.len);
        let Some(off) = off else {
            panic!("word {i} outside a {}-byte word map", self.len);
        };
        // SAFETY: the mapping starts page-aligned, so `off` (a multiple of 8, checked to
        // lie inside the mapping, which lies inside the file and is never truncated by the
        // promise made to `new`) is an aligned `u64` that stays mapped as long as `&self`.
        // `AtomicU64` has the layout of `u64`. No slice of the mapping exists, and every
        // other access to these bytes is atomic (the promise made to `new`), which is what
        // concurrent changes need.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(off).cast::<u64>()) }
    }
}

impl Drop for WordMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, unmapped only here;
        // references from `word` borrow `self`, so none outlives this call.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Limits the size of the files this process may write to `bytes` (the soft
/// `RLIMIT_FSIZE`) and ignores `SIGXFSZ`, so that a write or `fallocate` past it fails
/// with `EFBIG` instead of killing the process: a disk that fills up, without root
/// (`mapkv crashtest`'s resource faults, in a child process of their own).
pub fn limit_file_size(bytes: u64) -> io::Result<()> {
    let mut lim = std::mem::MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: getrlimit writes one `rlimit` through a pointer to space for exactly one.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, lim.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialized by the successful getrlimit above.
    let mut lim = unsafe { lim.assume_init() };
    lim.rlim_cur = bytes.min(lim.rlim_max);
    // SAFETY: setrlimit reads one valid `rlimit`.
    if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &raw const lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIG_IGN is a valid disposition for SIGXFSZ, and no handler code runs.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
