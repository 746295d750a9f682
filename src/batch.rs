//! [`Batch`]: a group of puts and deletes applied atomically.

/// One operation of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// A group of writes that [`Store::write`](crate::Store::write) applies atomically: after
/// any crash the store holds either all of them or none. Later operations on the same key
/// win, as if applied in order.
///
/// ```
/// let mut b = mapkv::Batch::new();
/// b.put(b"a", b"1");
/// b.delete(b"k");
/// assert_eq!(b.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub(crate) ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    #[must_use]
    pub fn new() -> Self {
        Batch::default()
    }

    /// Adds a put of `key` → `value`.
    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> &mut Self {
        self.ops
            .push(Op::Put(key.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    /// Adds a delete of `key` (a no-op if the key does not exist when the batch is applied).
    pub fn delete(&mut self, key: impl AsRef<[u8]>) -> &mut Self {
        self.ops.push(Op::Delete(key.as_ref().to_vec()));
        self
    }

    /// Number of operations in the batch.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True if the batch holds no operation.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Removes every operation, keeping the allocation.
    pub fn clear(&mut self) {
        self.ops.clear();
    }
}
