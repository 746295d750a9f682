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

/// This test binary re-run as a child process running only the test `entry` (a test
/// that does nothing unless the environment in `envs` asks it to play a role), with its
/// stderr read line by line on a thread, and its stdin piped (closing it is a signal the
/// child can wait for).
pub struct TestChild {
    pub child: std::process::Child,
    pub stdin: Option<std::process::ChildStdin>,
    pub lines: std::sync::mpsc::Receiver<String>,
}

pub fn spawn_test_child(entry: &str, envs: &[(&str, &std::ffi::OsStr)]) -> TestChild {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", entry, "--nocapture", "--test-threads", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn the test binary as a child");
    let stderr = child.stderr.take().expect("piped stderr");
    let stdin = child.stdin.take();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    TestChild {
        child,
        stdin,
        lines: rx,
    }
}
