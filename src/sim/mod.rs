//! Crash simulation for torture tests: turn what a store made durable into crash images,
//! kill writer processes, damage files, and check that a store recovered from any of it
//! holds an allowed state.
//!
//! This module is a testing tool, not part of the store's API: it is compiled only with
//! the cargo feature `sim` (off by default; the `cli` feature turns it on, for
//! `mapkv crashtest`). The integration tests, the fuzz targets and `mapkv crashtest` are
//! thin drivers over it. Its items may change in any release.
//!
//! The crash model (docs/GUARANTEES.md, "Crash model"): after power loss the file holds
//! its content as of the last completed sync, plus an arbitrary subset of the 4 KiB pages
//! written since; any such page may be torn (each 512-byte sector old or new
//! independently, and a sector being changed may hold garbage in its changed bytes); a
//! size change not yet made durable may be lost.
//!
//! The pieces, one file each:
//!
//! * `recorder`: [`Recorder`] is a [`SyncObserver`](crate::SyncObserver). Install it with
//!   [`Recorder::observe`]. On every sync the store reports, it copies the bytes that the
//!   sync made durable from the file into its *durable image* (the whole file for
//!   [`SyncEvent::File`](crate::SyncEvent::File), just the range for
//!   [`SyncEvent::Range`](crate::SyncEvent::Range)). It can also *capture* crash points
//!   inside sync callbacks (so a crash can land between two steps of the store's
//!   checkpoint protocol, which no caller can otherwise observe), and
//!   [`Recorder::crash_point`] captures one on demand.
//! * `image`: a [`Capture`] holds the durable image and the live file at a crash point,
//!   plus the range of write counts the recovered store may hold.
//!   [`Capture::random_image`] and [`Capture::image`] build crash images from it.
//! * `model`: [`Model`] is the reference: the [`Write`]s applied in order, and
//!   [`Model::check`] tells whether a reopened store equals the state after some prefix
//!   of them within a range.
//! * `workload`: [`Workload`], the random mix of writes.
//! * `power_loss`: [`power_loss`] runs the whole loop (random workload, captures, images,
//!   checks) once; [`power_loss_rounds`] runs it over a time budget, rotating workloads.
//! * `kill`: [`KillHarness`] and [`child_writer`] run the kill -9 loop, the writer child
//!   started by [`child_writer_from_env`] in a re-executed test binary or `mapkv`.
//! * `damage`: [`damage`] and [`damage_round`] (driven by [`damage_rounds`]) check that
//!   damaged files are refused with a typed error or salvaged, never a panic.
//! * `rng`: [`Rng`], the generator everything random draws from.
//!
//! Everything is deterministic from a seed ([`Rng`] is a splitmix64 generator), except
//! where real time is involved (kill timing, the `Periodic` flusher thread).
//!
//! # Precision and limits
//!
//! The recorder reads the file when the store reports a sync, *after* the sync returned.
//! With one thread driving the store (the store's own calls happen on that thread), the
//! bytes read are exactly the bytes the sync made durable. A sync reported from another
//! thread (the `Periodic` flusher) can race with the writer: the recorder may then record
//! a page in a newer state than was synced. Every page state it records did exist, so the
//! images stay legal crash states; for such syncs the promised-durable count is the number
//! of writes acknowledged before that thread's previous sync, which is conservative.
//! Syncs the store does not report (creating a new store) are covered by
//! [`Recorder::baseline`], which declares the file's current content durable.
//!
//! Set `MAPKV_SIM_TRACE=1` to print every sync the recorder sees to stderr.

mod damage;
mod image;
mod kill;
mod model;
mod power_loss;
mod recorder;
mod rng;
mod workload;

pub use damage::{
    damage, damage_round, damage_rounds, sample_store, targeted_round, DamageReport, Target,
};
pub use image::{Capture, PageFate, SectorFate};
pub use kill::{
    child_writer, child_writer_from_env, kill_workload, parse_policy, policy_name, KillHarness,
    ACK_PREFIX, READY_LINE,
};
pub use model::{read_all, Model, State, Write};
pub use power_loss::{
    check_image, power_loss, power_loss_rounds, PowerLossConfig, PowerLossReport,
};
pub use recorder::Recorder;
pub use rng::Rng;
pub use workload::Workload;
