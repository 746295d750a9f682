//! Helpers shared by the integration tests (`mod common;` in each test file). Each test
//! binary compiles its own copy, and uses only some of the helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A fresh temporary directory and the path of a store in it (not created). The store
/// lives as long as the directory: keep the `TempDir`.
pub fn tmp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let path = dir.path().join("store.mkv");
    (dir, path)
}

/// A scratch directory on tmpfs (`/dev/shm`) when there is one, for tests that sync a lot
/// or need no real syncs; else the default temporary directory.
pub fn shm_tempdir(prefix: &str) -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/dev/shm")
        {
            return d;
        }
    }
    tempfile::tempdir().expect("create a temporary directory")
}

/// Runs the tests of one test binary that take it one at a time. A child process spawned
/// by one test holds copies of every open file descriptor of the test process between its
/// fork and its exec, including the locked store file of another test (`flock` locks
/// belong to the open file description), which would then see a spurious
/// `Error::Locked`.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}
