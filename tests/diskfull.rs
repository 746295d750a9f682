//! Disk full (docs/GUARANTEES.md, "Crash model", item 4): a write that needs space the
//! disk does not have returns an error, never SIGBUS; the store stays readable and
//! consistent, nothing written before is lost, and it reopens.
//!
//! As root, a 1 MiB tmpfs is mounted for the store (and unmounted at the end, also on
//! failure). Where mounting is not permitted, the same check runs under `RLIMIT_FSIZE`
//! (with `SIGXFSZ` ignored, so the limit shows up as `EFBIG`); `file_size_limit` always
//! runs that variant. The filling happens in a child process (this test binary,
//! re-executed), so that a SIGBUS shows up as a finding instead of killing the test run.
#![cfg(feature = "sim")]
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use mapkv::sim::{self, Rng};
use mapkv::{Batch, Durability, Error, Options, Store};

const CHILD_DIR: &str = "MAPKV_DISKFULL_DIR";
const CHILD_MODE: &str = "MAPKV_DISKFULL_MODE";

/// Makes room again: tmpfs by deleting the filler file, rlimit by raising the limit.
fn make_room(dir: &Path, mode: &str) {
    if mode == "tmpfs" {
        std::fs::remove_file(dir.join("filler")).expect("remove filler");
    } else {
        set_fsize_limit(libc::RLIM_INFINITY);
    }
}

fn set_fsize_limit(bytes: libc::rlim_t) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass by pointer; it lives for the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &raw const lim) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// Fills a store until a write fails, then checks everything. Runs in the child.
fn fill_and_check(dir: &Path, mode: &str, policy: Durability) -> Result<(), String> {
    let name = sim::policy_name(policy).replace(':', "-");
    let path = dir.join(format!("full-{name}.mkv"));
    let mut opts = Options::default().durability(policy).initial_size(12 << 10);
    if matches!(policy, Durability::None | Durability::Periodic(_)) {
        // Background checkpoints and index growth run out of space too; a failed one is
        // retried later (not by every write), and never loses or refuses a write.
        opts = opts.checkpoint_keys(16);
    }
    let store = Store::open(&path, opts.clone()).map_err(|e| format!("open: {e}"))?;
    let mut rng = Rng::new(7);
    let mut acked: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let value = |rng: &mut Rng| {
        let mut v = vec![0u8; 200 + rng.index(3000)];
        rng.fill(&mut v);
        v
    };
    let (failed_key, err) = loop {
        let k = format!("key{:06}", acked.len()).into_bytes();
        let v = value(&mut rng);
        match store.put(&k, &v) {
            Ok(()) => acked.push((k, v)),
            Err(e) => break (k, e),
        }
        if acked.len() > 100_000 {
            return Err("the disk never filled up".into());
        }
    };
    println!("{policy:?}: write {} failed: {err}", acked.len());
    match &err {
        Error::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EFBIG)) => {}
        e => {
            return Err(format!(
                "the failing write returned {e:?}, not an ENOSPC/EFBIG I/O error"
            ))
        }
    }
    let check = |store: &Store, acked: &[(Vec<u8>, Vec<u8>)], what: &str| -> Result<(), String> {
        for (k, v) in acked {
            match store.get(k) {
                Ok(Some(g)) if g == *v => {}
                other => {
                    return Err(format!(
                        "{what}: {} = {other:?}",
                        String::from_utf8_lossy(k)
                    ))
                }
            }
        }
        if store.len() != acked.len() {
            let extra: Vec<String> = sim::read_all(store)?
                .into_iter()
                .filter(|(k, _)| !acked.iter().any(|(ak, _)| ak == k))
                .map(|(k, v)| format!("{} ({} bytes)", String::from_utf8_lossy(&k), v.len()))
                .collect();
            return Err(format!(
                "{what}: len() = {}, {} acknowledged; not acknowledged but present: {extra:?}",
                store.len(),
                acked.len()
            ));
        }
        let n = sim::read_all(store)
            .map_err(|e| format!("{what}: {e}"))?
            .len();
        if n != acked.len() {
            return Err(format!("{what}: iteration yields {n}"));
        }
        store.verify().map_err(|e| format!("{what}: verify: {e}"))?;
        Ok(())
    };
    check(&store, &acked, "after the failed write")?;
    if store.get(&failed_key).map_err(|e| e.to_string())?.is_some() {
        return Err("the failed write is visible".into());
    }
    // More writes of every kind: each returns Ok or an error, and Ok ones stay.
    let mut later_errors = 0;
    for j in 0..30 {
        let k = format!("later{j}").into_bytes();
        let v = if j % 2 == 0 {
            vec![b'x'; 10]
        } else {
            value(&mut rng)
        };
        let r = match j % 3 {
            0 => store.put(&k, &v),
            1 => {
                let mut b = Batch::new();
                b.put(&k, &v).put(b"later-batch", b"y");
                store.write(&b)
            }
            _ => store.delete(b"nonexistent").map(drop),
        };
        match r {
            Ok(()) if j % 3 == 2 => {}
            Ok(()) => {
                acked.push((k, v));
                if j % 3 == 1 {
                    acked.retain(|(ak, _)| ak != b"later-batch");
                    acked.push((b"later-batch".to_vec(), b"y".to_vec()));
                }
            }
            Err(e) => {
                println!("{policy:?}: later write {j} failed: {e}");
                later_errors += 1;
            }
        }
    }
    check(&store, &acked, "after more writes on a full disk")?;
    println!(
        "{policy:?}: {} writes acknowledged, {later_errors} of 30 later writes failed",
        acked.len()
    );
    match store.close() {
        Ok(()) => println!("{policy:?}: close on a full disk: ok"),
        Err(e) => println!("{policy:?}: close on a full disk: {e}"),
    }
    // Reopen on the still-full disk: read-write if it can, read-only in any case.
    match Store::open(&path, opts.clone()) {
        Ok(s) => {
            check(&s, &acked, "read-write reopen on a full disk")?;
            println!("{policy:?}: read-write reopen on a full disk: ok");
        }
        Err(e) => {
            println!("{policy:?}: read-write reopen on a full disk: {e}");
            if !matches!(e, Error::Io { .. }) {
                return Err(format!("read-write reopen on a full disk: {e:?}"));
            }
        }
    }
    let s = Store::open(&path, Options::default().read_only(true))
        .map_err(|e| format!("read-only reopen: {e}"))?;
    check(&s, &acked, "read-only reopen on a full disk")?;
    drop(s);
    // With room again, everything works.
    make_room(dir, mode);
    let s = Store::open(&path, opts).map_err(|e| format!("reopen with room: {e}"))?;
    check(&s, &acked, "reopen with room")?;
    s.put(b"room", b"again")
        .map_err(|e| format!("put with room: {e}"))?;
    s.close().map_err(|e| format!("close with room: {e}"))?;
    let _ = std::fs::remove_file(&path);
    if mode == "tmpfs" {
        std::fs::write(dir.join("filler"), vec![0u8; 256 << 10]).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The child role; does nothing unless started by `disk_full` or `file_size_limit`.
#[test]
fn diskfull_child() {
    let (Ok(dir), Ok(mode)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_MODE)) else {
        return;
    };
    let dir = PathBuf::from(dir);
    if mode == "rlimit" {
        // SAFETY: setting a signal disposition to SIG_IGN has no handler code to race.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    }
    for policy in [
        Durability::None,
        Durability::Always,
        Durability::Periodic(std::time::Duration::from_millis(5)),
    ] {
        if mode == "rlimit" {
            set_fsize_limit(1 << 20);
        }
        if let Err(e) = fill_and_check(&dir, &mode, policy) {
            eprintln!("{policy:?}: {e}");
            std::process::exit(3);
        }
    }
    println!("DISKFULL-CHILD-OK");
    std::process::exit(0);
}

fn run_child(dir: &Path, mode: &str) {
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "diskfull_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert_eq!(
        out.status.signal(),
        None,
        "the child died of a signal ({:?}): {stderr}",
        out.status
    );
    assert!(
        out.status.success() && stdout.contains("DISKFULL-CHILD-OK"),
        "child failed: {stderr}"
    );
}

/// Unmounts on drop, so a failing test does not leave the mount behind.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn mount_tmpfs(dir: &Path) -> Option<Mount> {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    st.success().then(|| Mount(dir.to_path_buf()))
}

/// A full disk while growing the file: a 1 MiB tmpfs, or `RLIMIT_FSIZE` where mounting
/// is not permitted.
#[test]
fn disk_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    match mount_tmpfs(&mnt) {
        Some(m) => {
            println!(
                "disk_full: ran on a 1 MiB tmpfs mounted at {}",
                mnt.display()
            );
            // Part of the space goes to a filler file, deleted later to make room.
            std::fs::write(mnt.join("filler"), vec![0u8; 256 << 10]).expect("filler");
            run_child(&mnt, "tmpfs");
            drop(m);
        }
        None => {
            println!("disk_full: mounting a tmpfs is not permitted; ran the RLIMIT_FSIZE fallback");
            run_child(dir.path(), "rlimit");
        }
    }
}

/// The same under `RLIMIT_FSIZE` (1 MiB), always.
#[test]
fn file_size_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    println!("file_size_limit: RLIMIT_FSIZE of 1 MiB, SIGXFSZ ignored");
    run_child(dir.path(), "rlimit");
}
