//! Random workloads: the mix of writes the power-loss and kill -9 loops issue.

use super::{Rng, Write};

/// Shape of a random workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Keys are drawn from this many distinct keys (plus the empty key).
    pub keyspace: u64,
    /// Probability that a write is a delete.
    pub delete_prob: f64,
    /// Probability that a write is a batch (of 2..=8 operations).
    pub batch_prob: f64,
    /// Probability that a value is large (`large_value` bytes, spanning pages; values of
    /// 256 KiB and more take the store's `pwrite` path in every policy).
    pub large_prob: f64,
    /// Size of a large value.
    pub large_value: usize,
    /// `Some(n)`: every write is a put of an `n`-byte value under a key of fixed length,
    /// so every record has the same size. After a crash, new records then line up exactly
    /// with stale ones from before it, which is what it takes for a recovery that leaves
    /// stale bytes behind to resurrect lost writes.
    pub fixed_size: Option<usize>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            keyspace: 600,
            delete_prob: 0.15,
            batch_prob: 0.15,
            large_prob: 0.01,
            large_value: 9000,
            fixed_size: None,
        }
    }
}

impl Workload {
    fn key(&self, rng: &mut Rng) -> Vec<u8> {
        match rng.below(100) {
            0 => Vec::new(),
            1 => {
                let mut k = format!("long-{}-", rng.below(8)).into_bytes();
                k.resize(300, b'x');
                k
            }
            _ => format!("k{:06}", rng.below(self.keyspace)).into_bytes(),
        }
    }

    fn value(&self, rng: &mut Rng) -> Vec<u8> {
        let len = if rng.chance(self.large_prob) {
            self.large_value
        } else {
            match rng.below(10) {
                0 => 0,
                1..=6 => 1 + rng.index(40),
                7 | 8 => 40 + rng.index(400),
                _ => 400 + rng.index(3000),
            }
        };
        let mut v = vec![0u8; len];
        rng.fill(&mut v);
        v
    }

    /// A random write.
    pub fn next(&self, rng: &mut Rng) -> Write {
        if let Some(n) = self.fixed_size {
            let mut v = vec![0u8; n];
            rng.fill(&mut v);
            return Write::Put(format!("k{:06}", rng.below(self.keyspace)).into_bytes(), v);
        }
        if rng.chance(self.batch_prob) {
            let n = 2 + rng.below(7);
            Write::Batch(
                (0..n)
                    .map(|_| {
                        let k = self.key(rng);
                        let v = if rng.chance(self.delete_prob) {
                            None
                        } else {
                            Some(self.value(rng))
                        };
                        (k, v)
                    })
                    .collect(),
            )
        } else if rng.chance(self.delete_prob) {
            Write::Delete(self.key(rng))
        } else {
            Write::Put(self.key(rng), self.value(rng))
        }
    }

    /// Write number `i` of the deterministic stream `seed` (the same on both sides of a
    /// process boundary).
    #[must_use]
    pub fn stream(&self, seed: u64, i: u64) -> Write {
        self.next(&mut Rng::new(Rng::derive(seed, i)))
    }
}
