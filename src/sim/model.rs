//! The writes the simulator issues and the reference model of the state they lead to:
//! which states a recovered store may hold, and the checks that it holds one.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use crate::{Batch, Store};

/// One write as the store counts them: a put, a delete, or a whole batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// `Store::put(key, value)`.
    Put(Vec<u8>, Vec<u8>),
    /// `Store::delete(key)`.
    Delete(Vec<u8>),
    /// `Store::write(batch)`: `Some(value)` is a put, `None` a delete, applied in order.
    Batch(Vec<(Vec<u8>, Option<Vec<u8>>)>),
}

impl Write {
    /// Applies the write to `store`.
    ///
    /// # Errors
    /// Whatever the store returns.
    pub fn apply(&self, store: &Store) -> crate::Result<()> {
        match self {
            Write::Put(k, v) => store.put(k, v),
            Write::Delete(k) => store.delete(k).map(drop),
            Write::Batch(ops) => {
                let mut b = Batch::new();
                for (k, v) in ops {
                    match v {
                        Some(v) => b.put(k, v),
                        None => b.delete(k),
                    };
                }
                store.write(&b)
            }
        }
    }

    /// Calls `f` for each operation in order: `(key, Some(value))` for a put,
    /// `(key, None)` for a delete. (A delete of a missing key changes nothing and the
    /// store appends nothing for it; the model still counts it as a write, an identity.)
    pub fn for_each(&self, mut f: impl FnMut(&[u8], Option<&[u8]>)) {
        match self {
            Write::Put(k, v) => f(k, Some(v)),
            Write::Delete(k) => f(k, None),
            Write::Batch(ops) => {
                for (k, v) in ops {
                    f(k, v.as_deref());
                }
            }
        }
    }

    /// Approximate bytes the write appends to the log.
    #[must_use]
    pub fn size(&self) -> usize {
        let mut n = 0;
        self.for_each(|k, v| n += 16 + k.len() + v.map_or(0, <[u8]>::len));
        n
    }
}

/// A key → value map: a state of the store.
pub type State = BTreeMap<Vec<u8>, Vec<u8>>;

fn pair_hash(k: &[u8], v: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    k.hash(&mut h);
    v.hash(&mut h);
    h.finish()
}

/// Order-independent hash of a whole state (sum of pair hashes), updatable in O(1).
fn state_hash(s: &State) -> u64 {
    s.iter()
        .fold(0u64, |a, (k, v)| a.wrapping_add(pair_hash(k, v)))
}

/// The reference model: a base state and the writes applied after it, in order, with the
/// hash of the state after every prefix, so a recovered store can be matched to a prefix
/// quickly.
#[derive(Debug, Clone, Default)]
pub struct Model {
    base: State,
    writes: Vec<Write>,
    /// `hashes[p]` = hash of the state after the first `p` writes.
    hashes: Vec<u64>,
    cur: State,
    cur_hash: u64,
}

impl Model {
    /// A model starting from the empty store.
    #[must_use]
    pub fn new() -> Self {
        Model::from_state(State::new())
    }

    /// A model starting from `base`.
    #[must_use]
    pub fn from_state(base: State) -> Self {
        let h = state_hash(&base);
        Model {
            cur: base.clone(),
            base,
            writes: Vec::new(),
            hashes: vec![h],
            cur_hash: h,
        }
    }

    /// Number of writes applied since the base state.
    #[must_use]
    pub fn writes(&self) -> usize {
        self.writes.len()
    }

    /// Write `i` (0-based) since the base state.
    #[must_use]
    pub fn write_at(&self, i: usize) -> Option<&Write> {
        self.writes.get(i)
    }

    /// The state after every write so far.
    #[must_use]
    pub fn current(&self) -> &State {
        &self.cur
    }

    /// Records `w` as the next write.
    pub fn apply(&mut self, w: &Write) {
        let (cur, h) = (&mut self.cur, &mut self.cur_hash);
        w.for_each(|k, v| {
            if let Some(old) = cur.get(k) {
                *h = h.wrapping_sub(pair_hash(k, old));
            }
            match v {
                Some(v) => {
                    *h = h.wrapping_add(pair_hash(k, v));
                    cur.insert(k.to_vec(), v.to_vec());
                }
                None => {
                    cur.remove(k);
                }
            }
        });
        self.writes.push(w.clone());
        self.hashes.push(self.cur_hash);
    }

    /// The state after the first `p` writes (clamped to the number of writes).
    #[must_use]
    pub fn state_at(&self, p: usize) -> State {
        if p >= self.writes.len() {
            return self.cur.clone();
        }
        let mut s = self.base.clone();
        for w in &self.writes[..p] {
            w.for_each(|k, v| match v {
                Some(v) => {
                    s.insert(k.to_vec(), v.to_vec());
                }
                None => {
                    s.remove(k);
                }
            });
        }
        s
    }

    /// Makes the state after `p` writes the new base (after a crash recovered to it).
    pub fn rebase(&mut self, p: usize) {
        *self = Model::from_state(self.state_at(p));
    }

    /// Drops every write after the first `p` (a write that failed or was never done).
    pub fn truncate(&mut self, p: usize) {
        if p < self.writes.len() {
            let base = std::mem::take(&mut self.base);
            let writes: Vec<Write> = self.writes.drain(..p).collect();
            *self = Model::from_state(base);
            for w in &writes {
                self.apply(w);
            }
        }
    }

    /// Checks that `store` holds exactly the state after `p` writes for some `p` in
    /// `lo..=hi`, reading it both by iteration and by point lookups. Returns that `p`.
    ///
    /// # Errors
    /// A description of the violation: which prefix (if any) the store matches instead,
    /// and a few differing keys.
    pub fn check(&self, store: &Store, lo: usize, hi: usize) -> Result<usize, String> {
        let got = read_all(store)?;
        let p = self.match_state(&got, lo, hi)?;
        self.check_lookups(store, p)?;
        Ok(p)
    }

    /// Like [`Model::check`] but for a state already read out of a store.
    ///
    /// # Errors
    /// As for [`Model::check`].
    pub fn match_state(&self, got: &State, lo: usize, hi: usize) -> Result<usize, String> {
        let hi = hi.min(self.writes.len());
        let h = state_hash(got);
        for p in lo..=hi {
            if self.hashes[p] == h && self.state_at(p) == *got {
                return Ok(p);
            }
        }
        // Diagnose: does it match a prefix outside the allowed range?
        let outside =
            (0..=self.writes.len()).find(|&p| self.hashes[p] == h && self.state_at(p) == *got);
        let near = self.state_at(lo.min(self.writes.len()));
        let mut diffs = Vec::new();
        for (k, v) in got {
            if near.get(k) != Some(v) {
                diffs.push(format!(
                    "{}: store has {}, prefix {lo} has {}",
                    show(k),
                    show(v),
                    near.get(k).map_or("nothing".into(), |v| show(v))
                ));
            }
        }
        for (k, v) in &near {
            if !got.contains_key(k) {
                diffs.push(format!(
                    "{}: missing from store, prefix {lo} has {}",
                    show(k),
                    show(v)
                ));
            }
        }
        diffs.truncate(4);
        Err(match outside {
            Some(p) => format!(
                "store holds the state after write {p}, outside the allowed {lo}..={hi} (of {} \
                 writes); first differences vs {lo}: {}",
                self.writes.len(),
                diffs.join("; ")
            ),
            None => format!(
                "store ({} keys) matches no prefix of the {} writes (allowed {lo}..={hi}): a mix, \
                 a torn value or a resurrected key; first differences vs prefix {lo}: {}",
                got.len(),
                self.writes.len(),
                diffs.join("; ")
            ),
        })
    }

    /// Checks a store salvaged past damage in its log (`Options::salvage(true)`), whose
    /// log held every write: each key not in `hit` (the keys of the records the damage
    /// covered) has its value after every write; a key in `hit` is absent or holds a value
    /// it had at some point (the damaged record is lost, so an older version shows).
    ///
    /// # Errors
    /// The first key that breaks the rule.
    pub fn match_salvaged(&self, got: &State, hit: &BTreeSet<Vec<u8>>) -> Result<(), String> {
        let want = &self.cur;
        for k in got.keys().chain(want.keys()) {
            let (g, w) = (got.get(k), want.get(k));
            if g == w {
                continue;
            }
            if !hit.contains(k) {
                return Err(format!(
                    "{}: store has {}, every write gives {}, and no damage hit it",
                    show(k),
                    g.map_or("nothing".into(), |v| show(v)),
                    w.map_or("nothing".into(), |v| show(v)),
                ));
            }
            let Some(g) = g else { continue };
            let mut had = self.base.get(k) == Some(g);
            for wr in &self.writes {
                wr.for_each(|wk, wv| had |= wk == k.as_slice() && wv == Some(g.as_slice()));
            }
            if !had {
                return Err(format!(
                    "{}: store has {}, a value this key never had",
                    show(k),
                    show(g)
                ));
            }
        }
        Ok(())
    }

    /// Point lookups: every key of prefix `p` has its value, every other key ever touched
    /// is absent.
    fn check_lookups(&self, store: &Store, p: usize) -> Result<(), String> {
        let want = self.state_at(p);
        for (k, v) in &want {
            match store.get(k) {
                Ok(Some(g)) if g == *v => {}
                other => {
                    return Err(format!(
                        "get({}) = {other:?}, but iteration (and prefix {p}) has {}",
                        show(k),
                        show(v)
                    ))
                }
            }
        }
        let mut touched = BTreeSet::new();
        for w in &self.writes {
            w.for_each(|k, _| {
                touched.insert(k.to_vec());
            });
        }
        touched.extend(self.base.keys().cloned());
        for k in touched.iter().filter(|k| !want.contains_key(*k)) {
            match store.get(k) {
                Ok(None) => {}
                other => {
                    return Err(format!(
                        "get({}) = {other:?}: a key absent in prefix {p} (deleted or never \
                         written) is visible",
                        show(k)
                    ))
                }
            }
        }
        if store.len() != want.len() {
            return Err(format!(
                "len() = {} but the store holds {} keys",
                store.len(),
                want.len()
            ));
        }
        Ok(())
    }
}

/// Reads every pair of `store` by iteration.
///
/// # Errors
/// An iteration error, or a key yielded twice.
pub fn read_all(store: &Store) -> Result<State, String> {
    let mut got = State::new();
    for item in store.iter() {
        let (k, v) = item.map_err(|e| format!("iteration failed: {e}"))?;
        if got.insert(k.clone(), v).is_some() {
            return Err(format!("iteration yielded key {} twice", show(&k)));
        }
    }
    if store.len() != got.len() {
        return Err(format!(
            "len() = {} but iteration yields {} pairs",
            store.len(),
            got.len()
        ));
    }
    Ok(got)
}

/// Short printable form of a key or value.
fn show(b: &[u8]) -> String {
    if b.len() <= 24 && b.iter().all(|c| c.is_ascii_graphic()) {
        format!("{:?}", String::from_utf8_lossy(b))
    } else {
        let h = pair_hash(b, b"") & 0xffff_ffff;
        format!("<{} bytes, hash {h:08x}>", b.len())
    }
}
