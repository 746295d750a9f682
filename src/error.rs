//! The error type of every fallible mapkv operation.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Shorthand for `std::result::Result<T, mapkv::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in mapkv.
///
/// Every variant names what failed and, where a file position is involved, where. The
/// variants about a file carry its path (`path`, also returned by [`Error::path`]):
/// [`Store`](crate::Store) fills it in with the store's path (for
/// [`Store::backup`](crate::Store::backup), the copy's path for I/O errors), and the
/// `Display` text names it. It is an `Option` because an error converted from a plain
/// [`io::Error`] has none. The variants that carry a path are `#[non_exhaustive]`:
/// match them with `{ .. }`.
///
/// Errors about the handle rather than the file ([`Error::ReadOnly`],
/// [`Error::Poisoned`], [`Error::Closed`], [`Error::Reentrant`]) carry no path: the caller
/// knows which handle it used ([`Store::path`](crate::Store::path)).
///
/// The store never panics on bad input or a damaged file; it returns one of these.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed (open, fallocate, msync, fdatasync, ...).
    /// `op` names the call, so "disk full while growing the file" reads as such.
    #[non_exhaustive]
    Io {
        /// The operation that failed, e.g. `"fallocate"` or `"fdatasync"`.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
        /// The file it concerns, when known.
        path: Option<PathBuf>,
    },
    /// The file is damaged: a checksum does not match or a structure is out of bounds.
    #[non_exhaustive]
    Corrupt {
        /// Byte offset in the file where the damage was found.
        offset: u64,
        /// What was expected there.
        what: &'static str,
        /// The store file, when known.
        path: Option<PathBuf>,
    },
    /// The file is not a mapkv store (wrong magic number, or an empty file opened with
    /// [`Options::create(false)`](crate::Options::create) or read-only). mapkv never
    /// turns a file that is not empty into a store.
    #[non_exhaustive]
    NotAStore {
        /// Byte offset of the mismatch (0 for the magic number).
        offset: u64,
        /// The file, when known.
        path: Option<PathBuf>,
    },
    /// The file was written by an incompatible version of the format.
    #[non_exhaustive]
    Version {
        /// Format version (major, minor) found in the file.
        found: (u16, u16),
        /// Format version (major, minor) this build reads and writes.
        supported: (u16, u16),
        /// The store file, when known.
        path: Option<PathBuf>,
    },
    /// No store file exists at the path, and none was created: the store was opened
    /// read-only, or with [`Options::create(false)`](crate::Options::create).
    #[non_exhaustive]
    NotFound {
        /// The path that was opened.
        path: PathBuf,
    },
    /// A key is longer than [`Options::max_key_size`](crate::Options::max_key_size).
    KeyTooLarge {
        /// Length of the rejected key.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A value is longer than [`Options::max_value_size`](crate::Options::max_value_size).
    ValueTooLarge {
        /// Length of the rejected value.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// Another handle (in this or another process) has the store open for writing: a
    /// store has one writer at a time. Readers (`Options::read_only(true)`) never get it.
    #[non_exhaustive]
    Locked {
        /// The store file, when known.
        path: Option<PathBuf>,
    },
    /// A [`Follower`](crate::Follower) in a reader process found that the writer
    /// compacted the store more than once since the reader last called it: the file in
    /// between, and the changes made in it, are gone (compaction folded them into the
    /// current file). The follower has moved on to the current file; the changes it
    /// reports from there are complete. To resynchronize, take a fresh snapshot with
    /// [`Store::follow`](crate::Store::follow).
    #[non_exhaustive]
    Lagged {
        /// The store file, when known.
        path: Option<PathBuf>,
    },
    /// A write was attempted on a store opened with `read_only(true)`.
    ReadOnly,
    /// An earlier sync or write failed, so the durable state is unknown. Close the store
    /// and open it again; recovery restores a consistent state.
    Poisoned,
    /// The store was closed by [`Store::close_shared`](crate::Store::close_shared)
    /// (through this or another clone of its `Arc`); open it again to use it.
    Closed,
    /// A write (or another call that needs the writer lock) was made from inside a
    /// [`Store::update`](crate::Store::update) closure or a
    /// [`SyncObserver`](crate::SyncObserver) callback of the same store. Both run under the
    /// store's locks, so the call would deadlock; it is refused instead.
    Reentrant,
    /// The options are inconsistent (for example an initial size below the minimum).
    InvalidOption(&'static str),
    /// The operation is not supported by this build or this store.
    Unsupported(&'static str),
}

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        Error::Io {
            op,
            source,
            path: None,
        }
    }

    pub(crate) fn corrupt(offset: u64, what: &'static str) -> Self {
        Error::Corrupt {
            offset,
            what,
            path: None,
        }
    }

    pub(crate) fn not_a_store(offset: u64) -> Self {
        Error::NotAStore { offset, path: None }
    }

    pub(crate) fn locked() -> Self {
        Error::Locked { path: None }
    }

    pub(crate) fn version(found: (u16, u16), supported: (u16, u16)) -> Self {
        Error::Version {
            found,
            supported,
            path: None,
        }
    }

    /// True if the error reports a damaged file ([`Error::Corrupt`] or [`Error::NotAStore`]).
    #[must_use]
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::NotAStore { .. })
    }

    /// The file the error concerns, if it concerns one and the path is known.
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Corrupt { path, .. }
            | Error::NotAStore { path, .. }
            | Error::Version { path, .. }
            | Error::Locked { path }
            | Error::Lagged { path } => path.as_deref(),
            Error::NotFound { path } => Some(path),
            _ => None,
        }
    }

    /// Names `file` in an error about a file that does not name one yet. An `open` that
    /// found no file becomes [`Error::NotFound`].
    #[must_use]
    pub(crate) fn with_path(self, file: &Path) -> Self {
        let fill = |p: Option<PathBuf>| p.or_else(|| Some(file.to_path_buf()));
        match self {
            Error::Io {
                op: "open",
                source,
                path: None,
            } if source.kind() == io::ErrorKind::NotFound => Error::NotFound {
                path: file.to_path_buf(),
            },
            Error::Io { op, source, path } => Error::Io {
                op,
                source,
                path: fill(path),
            },
            Error::Corrupt { offset, what, path } => Error::Corrupt {
                offset,
                what,
                path: fill(path),
            },
            Error::NotAStore { offset, path } => Error::NotAStore {
                offset,
                path: fill(path),
            },
            Error::Version {
                found,
                supported,
                path,
            } => Error::Version {
                found,
                supported,
                path: fill(path),
            },
            Error::Locked { path } => Error::Locked { path: fill(path) },
            Error::Lagged { path } => Error::Lagged { path: fill(path) },
            other => other,
        }
    }
}

/// `path` for a message: `the store file` when unknown.
struct Name<'a>(Option<&'a Path>, &'static str);

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => write!(f, "{}", p.display()),
            None => f.write_str(self.1),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { op, source, path } => {
                let on = match path {
                    Some(p) => format!(" on {}", p.display()),
                    None => String::new(),
                };
                match source.kind() {
                    io::ErrorKind::IsADirectory => write!(
                        f,
                        "{} is a directory; a mapkv store is a single file: give the path of \
                         a file (for example {}/data.mkv)",
                        Name(path.as_deref(), "the path"),
                        Name(path.as_deref(), "DIR"),
                    ),
                    io::ErrorKind::NotFound => write!(
                        f,
                        "I/O error in {op}{on}: {source} (check that the directory exists)"
                    ),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                        write!(
                            f,
                            "I/O error in {op}{on}: {source} (check the permissions of the file \
                             and its directory, or open it with Options::read_only(true))"
                        )
                    }
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => write!(
                        f,
                        "I/O error in {op}{on}: {source} (free some disk space and retry; \
                         Store::compact reclaims the space of dead records)"
                    ),
                    _ => write!(f, "I/O error in {op}{on}: {source}"),
                }
            }
            Error::Corrupt { offset, what, path } => {
                let verify = match path {
                    Some(p) => format!("`mapkv verify {}`", p.display()),
                    None => "`mapkv verify`".to_owned(),
                };
                write!(
                    f,
                    "{} is damaged at byte offset {offset}: {what} (run {verify} to check it, \
                     and `mapkv verify --repair` or Options::salvage(true) to skip the damage \
                     and keep the valid records)",
                    Name(path.as_deref(), "the store"),
                )
            }
            Error::NotAStore { offset, path } => write!(
                f,
                "{} is not a mapkv store (no mapkv header at byte offset {offset}): check the \
                 path. mapkv never overwrites a file that is not a store; an empty file \
                 becomes one only when opened for writing with Options::create(true)",
                Name(path.as_deref(), "the file"),
            ),
            Error::Version {
                found,
                supported,
                path,
            } => write!(
                f,
                "{} has format version {}.{}, which this build cannot open (it supports {}.{} \
                 and older minors): use a mapkv release that supports it",
                Name(path.as_deref(), "the store"),
                found.0,
                found.1,
                supported.0,
                supported.1
            ),
            Error::NotFound { path } => write!(
                f,
                "no mapkv store at {}: the file does not exist (check the path; a writer \
                 opened with Options::create(true), the default, creates it)",
                path.display()
            ),
            Error::KeyTooLarge { len, max } => write!(
                f,
                "key of {len} bytes exceeds the limit of {max} bytes (Options::max_key_size)"
            ),
            Error::ValueTooLarge { len, max } => write!(
                f,
                "value of {len} bytes exceeds the limit of {max} bytes \
                 (Options::max_value_size)"
            ),
            Error::Locked { path } => write!(
                f,
                "{} is locked: it is open for writing by another handle (in another process \
                 or this one); a store has one writer at a time: close that handle first, or \
                 open this one with Options::read_only(true) to read beside the writer (as \
                 the mapkv get/scan/stats/verify/backup commands do)",
                Name(path.as_deref(), "the store"),
            ),
            Error::Lagged { path } => write!(
                f,
                "{} was compacted more than once since this reader last called it: the \
                 changes made in the file in between are lost to this follower, which goes \
                 on from the current file (call Store::follow for a fresh snapshot)",
                Name(path.as_deref(), "the store"),
            ),
            Error::ReadOnly => write!(
                f,
                "the store was opened read-only (Options::read_only(true)); writes are refused"
            ),
            Error::Poisoned => write!(
                f,
                "an earlier sync or write failed, so the durable state is unknown; close the \
                 store and open it again (recovery restores a consistent state)"
            ),
            Error::Closed => write!(
                f,
                "the store was closed (Store::close_shared); open it again to use it"
            ),
            Error::Reentrant => write!(
                f,
                "a Store::update closure or a sync observer called a method of its own \
                 store that needs a lock it holds (it would deadlock): return the new \
                 value from the closure, or hand the work to another thread"
            ),
            Error::InvalidOption(what) => write!(f, "invalid option: {what}"),
            Error::Unsupported(what) => write!(f, "unsupported: {what}"),
        }
    }
}

impl From<io::Error> for Error {
    /// Wraps an I/O error from outside mapkv (for `?` in application code).
    fn from(source: io::Error) -> Self {
        Error::io("io", source)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
