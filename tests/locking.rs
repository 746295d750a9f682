//! One writer per store: a second writable open, in this process or another one, gets
//! `Error::Locked`. Read-only handles (readers) take no lock: they open beside a writer,
//! before or after it, and a writer opens beside them (docs/GUARANTEES.md, "Processes:
//! one writer, many readers"; tests/readers.rs checks what readers see).
//!
//! Cross-process cases re-run this test binary as a child (`child_process_entry` with the
//! `MAPKV_LOCK_CHILD_ROLE` environment variable set); it reports on stderr.
//!
//! The tests of this file run one at a time (`serial()`): `flock` locks belong to the open
//! file description, which a child process shares between `fork` and `exec`. A test that
//! closes a store and reopens it at once could otherwise get a spurious `Locked` while a
//! concurrent test is spawning its child.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::sync::mpsc;
use std::time::Duration;

use mapkv::{Error, Options, Store};

mod common;
use common::{serial, tmp};

const ROLE_VAR: &str = "MAPKV_LOCK_CHILD_ROLE";
const PATH_VAR: &str = "MAPKV_LOCK_CHILD_PATH";
/// Generous bound against a hung child; never reached when things work.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

fn describe(r: &mapkv::Result<Store>) -> String {
    match r {
        Ok(_) => "Ok".to_string(),
        Err(Error::Locked { .. }) => "Locked".to_string(),
        Err(e) => format!("Err({e})"),
    }
}

fn rw() -> Options {
    Options::default()
}

fn ro() -> Options {
    Options::default().read_only(true)
}

/// The child side. A no-op in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return;
    };
    let path = PathBuf::from(std::env::var(PATH_VAR).expect("child needs a store path"));
    match role.as_str() {
        "try-writer" | "try-reader" => {
            let opts = if role == "try-writer" { rw() } else { ro() };
            let r = Store::open(&path, opts);
            eprintln!("MAPKV-CHILD RESULT {}", describe(&r));
        }
        "hold-writer" | "hold-reader" => {
            let writer = role == "hold-writer";
            let s = Store::open(&path, if writer { rw() } else { ro() }).expect("child open");
            if writer {
                s.put(b"child", b"was here").expect("child put");
            }
            eprintln!("MAPKV-CHILD READY");
            // Hold the store until the parent closes our stdin (or kills us).
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            drop(s);
            eprintln!("MAPKV-CHILD DONE");
        }
        other => panic!("unknown child role {other}"),
    }
}

struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

fn spawn(role: &str, path: &Path) -> ChildProc {
    let c = common::spawn_test_child(
        "child_process_entry",
        &[(ROLE_VAR, role.as_ref()), (PATH_VAR, path.as_os_str())],
    );
    ChildProc {
        child: c.child,
        stdin: c.stdin,
        lines: c.lines,
    }
}

impl ChildProc {
    /// Waits for a protocol line starting with `prefix`; returns the rest of it.
    fn expect_line(&mut self, prefix: &str) -> String {
        let mut other = Vec::new();
        loop {
            match self.lines.recv_timeout(CHILD_TIMEOUT) {
                Ok(line) => {
                    if let Some(pos) = line.find(prefix) {
                        return line[pos + prefix.len()..].trim().to_string();
                    }
                    other.push(line);
                }
                Err(e) => {
                    let _ = self.child.kill();
                    panic!("child never printed {prefix:?} ({e}); its stderr: {other:#?}");
                }
            }
        }
    }

    fn wait_success(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait for child");
        assert!(status.success(), "child failed: {status}");
    }
}

/// Runs a child that only tries to open and reports the result.
fn child_try(role: &str, path: &Path) -> String {
    let mut c = spawn(role, path);
    let r = c.expect_line("MAPKV-CHILD RESULT ");
    c.wait_success();
    r
}

#[test]
fn second_writer_in_same_process_is_locked() {
    let _serial = serial();
    let (dir, path) = tmp();
    let first = Store::open(&path, rw()).unwrap();
    first.put(b"k", b"v").unwrap();
    assert!(matches!(
        Store::open(&path, rw()),
        Err(Error::Locked { .. })
    ));
    // Another spelling of the same path, and a hard link: the lock is on the file.
    let other_spelling = dir.path().join(".").join("store.mkv");
    assert!(matches!(
        Store::open(&other_spelling, rw()),
        Err(Error::Locked { .. })
    ));
    let link = dir.path().join("link.mkv");
    std::fs::hard_link(&path, &link).unwrap();
    assert!(matches!(
        Store::open(&link, rw()),
        Err(Error::Locked { .. })
    ));
    // A reader opens beside the writer and sees its committed writes.
    let reader = Store::open(&path, ro()).expect("a reader beside a writer");
    assert_eq!(reader.get(b"k").unwrap(), Some(b"v".to_vec()));

    // The failed opens did not disturb the first handle.
    first.put(b"k2", b"v2").unwrap();
    assert_eq!(first.get(b"k").unwrap(), Some(b"v".to_vec()));
    assert_eq!(first.len(), 2);
    assert_eq!(reader.get(b"k2").unwrap(), Some(b"v2".to_vec()));
    drop(first);
    drop(reader);

    // Once the writer is gone, a new one may open, and sees everything.
    let second = Store::open(&path, rw()).unwrap();
    assert!(second.stats().recovery.was_clean);
    assert_eq!(second.get(b"k2").unwrap(), Some(b"v2".to_vec()));
    assert!(matches!(
        Store::open(&path, rw()),
        Err(Error::Locked { .. })
    ));
}

#[test]
fn locked_until_close_returns() {
    let _serial = serial();
    let (_dir, path) = tmp();
    let first = Store::open(&path, rw()).unwrap();
    first.put(b"a", b"1").unwrap();
    for _ in 0..3 {
        assert!(matches!(
            Store::open(&path, rw()),
            Err(Error::Locked { .. })
        ));
    }
    first.close().unwrap();
    let s = Store::open(&path, rw()).unwrap();
    assert_eq!(s.get(b"a").unwrap(), Some(b"1".to_vec()));
}

#[test]
fn readers_share_with_each_other_and_with_one_writer() {
    let _serial = serial();
    let (_dir, path) = tmp();
    Store::open(&path, rw()).unwrap().put(b"k", b"v").unwrap();

    let r1 = Store::open(&path, ro()).unwrap();
    let r2 = Store::open(&path, ro()).expect("two read-only opens at once are fine");
    assert_eq!(r1.get(b"k").unwrap(), Some(b"v".to_vec()));
    assert_eq!(r2.get(b"k").unwrap(), Some(b"v".to_vec()));
    let w = Store::open(&path, rw()).expect("a writer opens beside readers");
    w.put(b"k", b"v2").unwrap();
    assert_eq!(r1.get(b"k").unwrap(), Some(b"v2".to_vec()));
    drop(r1);
    assert!(
        matches!(Store::open(&path, rw()), Err(Error::Locked { .. })),
        "a second writer, with readers open"
    );
    assert_eq!(r2.get(b"k").unwrap(), Some(b"v2".to_vec()));
}

#[test]
fn writer_in_other_process_is_locked_out() {
    let _serial = serial();
    let (_dir, path) = tmp();
    let s = Store::open(&path, rw()).unwrap();
    s.put(b"parent", b"1").unwrap();
    assert_eq!(child_try("try-writer", &path), "Locked");
    assert_eq!(child_try("try-reader", &path), "Ok");
    // Neither child changed anything.
    assert_eq!(s.get(b"parent").unwrap(), Some(b"1".to_vec()));
    s.put(b"parent", b"2").unwrap();
    drop(s);
    assert_eq!(child_try("try-writer", &path), "Ok");
    assert_eq!(child_try("try-reader", &path), "Ok");
    let s = Store::open(&path, rw()).unwrap();
    assert_eq!(s.get(b"parent").unwrap(), Some(b"2".to_vec()));
}

#[test]
fn store_held_by_child_process_is_locked() {
    let _serial = serial();
    let (_dir, path) = tmp();
    let mut child = spawn("hold-writer", &path);
    child.expect_line("MAPKV-CHILD READY");
    assert!(matches!(
        Store::open(&path, rw()),
        Err(Error::Locked { .. })
    ));
    let r = Store::open(&path, ro()).expect("a reader beside another process's writer");
    assert_eq!(r.get(b"child").unwrap(), Some(b"was here".to_vec()));
    drop(r);
    // Let the child close cleanly.
    drop(child.stdin.take());
    child.expect_line("MAPKV-CHILD DONE");
    child.wait_success();
    let s = Store::open(&path, rw()).unwrap();
    assert!(s.stats().recovery.was_clean);
    assert_eq!(s.get(b"child").unwrap(), Some(b"was here".to_vec()));
}

#[test]
fn lock_is_released_when_holder_is_killed() {
    let _serial = serial();
    let (_dir, path) = tmp();
    let mut child = spawn("hold-writer", &path);
    child.expect_line("MAPKV-CHILD READY");
    assert!(matches!(
        Store::open(&path, rw()),
        Err(Error::Locked { .. })
    ));
    child.child.kill().expect("SIGKILL the child");
    let status = child.child.wait().unwrap();
    assert!(!status.success());
    drop(child.stdin.take());
    // The kernel drops the lock with the process; the child's returned put survives.
    // A read-only handle recovers it in memory without changing the file.
    let bytes = std::fs::read(&path).unwrap();
    {
        let r = Store::open(&path, ro()).unwrap();
        assert_eq!(r.get(b"child").unwrap(), Some(b"was here".to_vec()));
        assert_eq!(r.len(), 1);
        assert!(matches!(r.put(b"x", b"y"), Err(Error::ReadOnly)));
    }
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "read-only open changed the file"
    );
    let s = Store::open(&path, rw()).unwrap();
    assert_eq!(s.get(b"child").unwrap(), Some(b"was here".to_vec()));
    assert_eq!(s.len(), 1);
    s.put(b"parent", b"after").unwrap();
    drop(s);
    let s = Store::open(&path, rw()).unwrap();
    assert!(s.stats().recovery.was_clean);
    assert_eq!(s.len(), 2);
}

#[test]
fn readers_in_other_processes_never_lock_out_a_writer() {
    let _serial = serial();
    let (_dir, path) = tmp();
    Store::open(&path, rw()).unwrap().put(b"k", b"v").unwrap();
    let r = Store::open(&path, ro()).unwrap();
    assert_eq!(child_try("try-reader", &path), "Ok");
    assert_eq!(child_try("try-writer", &path), "Ok");
    drop(r);

    let mut child = spawn("hold-reader", &path);
    child.expect_line("MAPKV-CHILD READY");
    let r = Store::open(&path, ro()).expect("read-only next to another process's reader");
    assert_eq!(r.get(b"k").unwrap(), Some(b"v".to_vec()));
    let w = Store::open(&path, rw()).expect("a writer beside another process's reader");
    w.put(b"k", b"v2").unwrap();
    assert_eq!(r.get(b"k").unwrap(), Some(b"v2".to_vec()));
    drop(w);
    drop(r);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"bye");
    }
    child.wait_success();
    Store::open(&path, rw()).unwrap().put(b"k", b"w").unwrap();
}

/// Regression: a process trying to open the store for writing while its writer compacted
/// in a loop made compaction fail (`rename compacted file: No such file or directory`):
/// the open took the lock of the old, unlinked file and cleaned up "leftovers", deleting
/// the running writer's compaction file. Leftovers are now cleaned only by the holder of
/// the current file's lock, and never while their own lock is held.
#[test]
fn opening_for_writing_during_compactions_never_breaks_them() {
    let _serial = serial();
    let (_dir, path) = tmp();
    let w = Store::open(&path, rw()).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let compacted = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match Store::open(&path, rw()) {
                    Err(Error::Locked { .. }) => {}
                    other => panic!("a second writer during compaction: {other:?}"),
                }
            }
        });
        let r = (0..2_000u32).try_for_each(|i| {
            w.put(format!("k{}", i % 300), [b'v'; 64])?;
            if i % 100 == 99 {
                w.compact()?;
            }
            Ok::<(), Error>(())
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    compacted.expect("compaction beside a would-be second writer");
    assert_eq!(w.len(), 300);
    w.verify().unwrap();
}
