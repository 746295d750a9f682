//! Crash points and the crash images built from them: the durable bytes plus a subset of
//! the pages written since, some torn (docs/GUARANTEES.md, "Crash model").

use crate::format::{PAGE, SECTOR};
use crate::SyncEvent;

use super::Rng;

/// A crash point: the durable image and the live file at that moment, and which states
/// a store recovered from an image of it may hold.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The file as of the last completed sync (its length is the durable size).
    pub durable: Vec<u8>,
    /// With a compaction's rename not yet durable: the durable image of the file that the
    /// rename put in place (`durable` is then the file it replaced).
    pub renamed: Option<Vec<u8>>,
    /// The file as it was at the crash point (in the page cache).
    pub live: Vec<u8>,
    /// The recovered store must hold at least this many writes (of the recorder's count).
    pub min_writes: u64,
    /// ... and at most this many (writes started: acknowledged plus one in flight).
    pub max_writes: u64,
    /// Syncs completed before the crash point.
    pub sync_no: u64,
    /// The sync whose completion the crash preempted, if captured inside a sync.
    pub during: Option<SyncEvent>,
}

/// What happens to one changed page in a crash image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageFate {
    /// The write never reached the disk.
    Old,
    /// The whole page reached the disk.
    New,
    /// Torn: each sector's fate.
    Torn([SectorFate; (PAGE / SECTOR) as usize]),
}

/// What happens to one 512-byte sector of a torn page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorFate {
    /// The old content.
    Old,
    /// The new content.
    New,
    /// The bytes the write changed hold garbage (from this seed); the rest are unchanged.
    Garbage(u64),
}

impl Capture {
    /// Indexes of the pages that differ between the durable image and the live file
    /// (pages past the durable size count as changed if the live file has any nonzero
    /// byte there).
    #[must_use]
    pub fn changed_pages(&self) -> Vec<u64> {
        let base = self.renamed.as_ref().unwrap_or(&self.durable);
        let len = base.len().max(self.live.len());
        let page = PAGE as usize;
        (0..len.div_ceil(page))
            .filter(|&p| {
                let r = p * page..((p + 1) * page).min(len);
                r.clone().any(|i| {
                    base.get(i).copied().unwrap_or(0) != self.live.get(i).copied().unwrap_or(0)
                })
            })
            .map(|p| p as u64)
            .collect()
    }

    /// Builds one crash image. `rename_survived` picks the new file when a rename was in
    /// flight; `new_size` keeps the live file's size (else the durable size); `fate` says
    /// what happened to each changed page.
    pub fn image(
        &self,
        rename_survived: bool,
        new_size: bool,
        mut fate: impl FnMut(u64) -> PageFate,
    ) -> Vec<u8> {
        let base = match (&self.renamed, rename_survived) {
            (Some(r), true) => r,
            (Some(_), false) => return self.durable.clone(),
            (None, _) => &self.durable,
        };
        let len = if new_size {
            self.live.len()
        } else {
            base.len()
        };
        let mut img = base.clone();
        img.resize(len, 0);
        let page = PAGE as usize;
        let sector = SECTOR as usize;
        for p in self.changed_pages() {
            let start = p as usize * page;
            if start >= len {
                continue;
            }
            let end = (start + page).min(len);
            let new_byte = |i: usize| self.live.get(i).copied().unwrap_or(0);
            let old_byte = |i: usize| base.get(i).copied().unwrap_or(0);
            match fate(p) {
                PageFate::Old => {}
                PageFate::New => copy_new(&mut img, &self.live, start, end),
                PageFate::Torn(sectors) => {
                    for (s, f) in sectors.iter().enumerate() {
                        let ss = start + s * sector;
                        let se = (ss + sector).min(end);
                        match *f {
                            SectorFate::Old => {}
                            SectorFate::New => copy_new(&mut img, &self.live, ss, se),
                            SectorFate::Garbage(seed) => {
                                let mut r = Rng::new(seed);
                                for (i, b) in img.iter_mut().enumerate().take(se).skip(ss) {
                                    if old_byte(i) != new_byte(i) {
                                        *b = r.next_u64() as u8;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        img
    }

    /// Builds a random crash image. Strategies vary between images: independent random
    /// subsets with various densities, in-order write-back cut at a random page, all or
    /// nothing; chosen pages are torn now and then.
    pub fn random_image(&self, rng: &mut Rng) -> Vec<u8> {
        let changed = self.changed_pages();
        let n = changed.len() as u64;
        let strategy = rng.below(6);
        let density = [0.05, 0.3, 0.5, 0.7, 0.95][rng.index(5)];
        let cut = rng.below(n + 1);
        let tear = [0.0, 0.1, 0.5][rng.index(3)];
        let rename_survived = rng.chance(0.5);
        let new_size = rng.chance(0.5);
        let mut order = 0u64;
        let mut seed_rng = rng.clone();
        rng.next_u64();
        self.image(rename_survived, new_size, |_| {
            let k = order;
            order += 1;
            let reached = match strategy {
                0 => false,
                1 => true,
                2 => k < cut,
                3 => k != cut,
                _ => seed_rng.chance(density),
            };
            if !reached {
                return PageFate::Old;
            }
            if seed_rng.chance(tear) {
                let mut s = [SectorFate::Old; (PAGE / SECTOR) as usize];
                for f in &mut s {
                    *f = match seed_rng.below(4) {
                        0 => SectorFate::Old,
                        1 | 2 => SectorFate::New,
                        _ => SectorFate::Garbage(seed_rng.next_u64()),
                    };
                }
                PageFate::Torn(s)
            } else {
                PageFate::New
            }
        })
    }
}

/// Copies `live[a..b]` into `img[a..b]`, zero past the end of `live`.
fn copy_new(img: &mut [u8], live: &[u8], a: usize, b: usize) {
    let l = b.min(live.len()).max(a);
    if l > a {
        img[a..l].copy_from_slice(&live[a..l]);
    }
    img[l..b].fill(0);
}
