//! Value encoding (postcard) and the mapping of errors onto [`StorageError`].

use std::path::Path;

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{NodeId, StorageError};

/// Encodes a value stored in a mapkv store.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(value)
}

/// Decodes a value read from a mapkv store.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// A storage error about `subject`, doing `verb`, caused by `source`.
pub(crate) fn err<E>(subject: ErrorSubject<NodeId>, verb: ErrorVerb, source: &E) -> StorageError
where
    E: std::error::Error + 'static,
{
    StorageIOError::new(subject, verb, AnyError::new(source)).into()
}

/// A storage error described by a message (an inconsistency found in stored data).
pub(crate) fn err_msg(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    msg: impl ToString,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::error(msg)).into()
}

/// A file-system error on `path` (snapshot files, directories).
pub(crate) fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    what: &str,
    path: &Path,
    source: &std::io::Error,
) -> StorageError {
    let e = std::io::Error::new(
        source.kind(),
        format!("{what} {}: {source}", path.display()),
    );
    err(subject, verb, &e)
}

/// Syncs a directory, so that a rename or a new file in it survives power loss.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes `path` if it exists.
pub(crate) fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
