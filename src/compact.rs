//! Compaction: rewrite the live records into a fresh file and switch to it atomically.

use crate::error::{Error, Result};
use crate::store::Inner;

pub(crate) fn compact(inner: &Inner) -> Result<()> {
    if inner.opts.read_only {
        return Err(Error::ReadOnly);
    }
    Err(Error::Unsupported("compaction is not implemented yet"))
}
