//! The error type of every fallible mapkv operation.

use std::fmt;
use std::io;

/// Shorthand for `std::result::Result<T, mapkv::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in mapkv.
///
/// Every variant names what failed and, where a file position is involved, where.
/// The store never panics on bad input or a damaged file; it returns one of these.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed (open, fallocate, msync, fdatasync, ...).
    /// `op` names the call, so "disk full while growing the file" reads as such.
    Io {
        /// The operation that failed, e.g. `"fallocate"` or `"fdatasync"`.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The file is damaged: a checksum does not match or a structure is out of bounds.
    Corrupt {
        /// Byte offset in the file where the damage was found.
        offset: u64,
        /// What was expected there.
        what: &'static str,
    },
    /// The file is not a mapkv store (wrong magic number).
    NotAStore {
        /// Byte offset of the mismatch (0 for the magic number).
        offset: u64,
    },
    /// The file was written by an incompatible version of the format.
    Version {
        /// Format version (major, minor) found in the file.
        found: (u16, u16),
        /// Format version (major, minor) this build reads and writes.
        supported: (u16, u16),
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
    Locked,
    /// A write was attempted on a store opened with `read_only(true)`.
    ReadOnly,
    /// An earlier sync or write failed, so the durable state is unknown. Close the store
    /// and open it again; recovery restores a consistent state.
    Poisoned,
    /// The options are inconsistent (for example an initial size below the minimum).
    InvalidOption(&'static str),
    /// The operation is not supported by this build or this store.
    Unsupported(&'static str),
}

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        Error::Io { op, source }
    }

    pub(crate) fn corrupt(offset: u64, what: &'static str) -> Self {
        Error::Corrupt { offset, what }
    }

    /// True if the error reports a damaged file ([`Error::Corrupt`] or [`Error::NotAStore`]).
    #[must_use]
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::NotAStore { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { op, source } => write!(f, "I/O error in {op}: {source}"),
            Error::Corrupt { offset, what } => write!(
                f,
                "store is damaged at byte offset {offset}: {what} (run `mapkv verify`, or open \
                 with Options::salvage(true) to keep the valid prefix)"
            ),
            Error::NotAStore { offset } => {
                write!(
                    f,
                    "not a mapkv store (bad magic number at byte offset {offset})"
                )
            }
            Error::Version { found, supported } => write!(
                f,
                "incompatible format version {}.{} (this build supports {}.{} and older minors)",
                found.0, found.1, supported.0, supported.1
            ),
            Error::KeyTooLarge { len, max } => {
                write!(f, "key of {len} bytes exceeds the limit of {max} bytes")
            }
            Error::ValueTooLarge { len, max } => {
                write!(f, "value of {len} bytes exceeds the limit of {max} bytes")
            }
            Error::Locked => write!(
                f,
                "store is open for writing by another handle (in another process or this one); \
                 a store has one writer at a time. Readers (Options::read_only(true), and the \
                 mapkv get/scan/stats/verify/backup commands) work beside it"
            ),
            Error::ReadOnly => write!(f, "store was opened read-only; writes are refused"),
            Error::Poisoned => write!(
                f,
                "an earlier sync or write failed, so the durable state is unknown; close the \
                 store and open it again"
            ),
            Error::InvalidOption(what) => write!(f, "invalid option: {what}"),
            Error::Unsupported(what) => write!(f, "unsupported: {what}"),
        }
    }
}

impl From<io::Error> for Error {
    /// Wraps an I/O error from outside mapkv (for `?` in application code).
    fn from(source: io::Error) -> Self {
        Error::Io { op: "io", source }
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
