//! The `mapkv` command-line tool as a user runs it, beside an application that holds the
//! store open for writing (this test process): the reading commands work and see what
//! the application committed, the writing ones say the store is locked, `scan --follow`
//! prints the changes as they are committed, `backup` copies the store.
#![cfg(feature = "cli")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mapkv::{Options, Store};

mod common;
use common::tmp;

fn mapkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mapkv"))
        .args(args)
        .output()
        .expect("run mapkv")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn reading_commands_work_beside_a_writer_and_writing_ones_are_locked() {
    let (dir, path) = tmp();
    let p = path.to_str().expect("utf-8 path");
    let w = Store::open(&path, Options::default()).expect("writer");
    w.put(b"alpha", b"1").expect("put");
    w.put(b"beta", b"2").expect("put");

    let o = mapkv(&["get", p, "alpha"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "1\n");
    w.put(b"alpha", b"one").expect("put");
    let o = mapkv(&["get", p, "alpha"]);
    assert_eq!(stdout(&o), "one\n", "a later commit is seen");

    let o = mapkv(&["scan", p]);
    assert!(o.status.success(), "{o:?}");
    let mut lines: Vec<_> = stdout(&o).lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines, ["alpha\tone", "beta\t2"]);

    let o = mapkv(&["stats", p]);
    assert!(o.status.success(), "{o:?}");
    let s = stdout(&o);
    assert!(s.contains("writer: running") && s.contains("true"), "{s}");

    let o = mapkv(&["verify", p]);
    assert!(o.status.success(), "{o:?}");

    let copy = dir.path().join("copy.mkv");
    let o = mapkv(&["backup", p, copy.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{o:?}");
    let c = Store::open(&copy, Options::default().read_only(true)).expect("copy");
    assert_eq!(c.get(b"alpha").expect("get").as_deref(), Some(&b"one"[..]));

    for args in [
        vec!["put", p, "x", "y"],
        vec!["del", p, "alpha"],
        vec!["compact", p],
    ] {
        let o = mapkv(&args);
        assert!(!o.status.success(), "{args:?} beside a writer must fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("open for writing by another"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(w.get(b"x").expect("get"), None, "nothing was written");
}

/// `mapkv scan --follow PATH`, its stdout piped.
fn follow(path: &std::path::Path, stderr: Stdio) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_mapkv"))
        .args(["scan", "--follow", path.to_str().expect("utf-8")])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn scan --follow")
}

/// Sends each line read from `r`, after `prefix`, to `tx`, on a thread of its own.
fn forward_lines(
    r: impl std::io::Read + Send + 'static,
    prefix: &'static str,
    tx: std::sync::mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(format!("{prefix}{line}")).is_err() {
                break;
            }
        }
    });
}

#[test]
fn scan_follow_prints_the_pairs_then_each_change_once() {
    let (_dir, path) = tmp();
    let w = Store::open(&path, Options::default()).expect("writer");
    for i in 0..50 {
        w.put(format!("k{i:02}"), format!("v{i}")).expect("put");
    }
    let mut child = follow(&path, Stdio::null());
    let (tx, rx) = std::sync::mpsc::channel();
    forward_lines(child.stdout.take().expect("stdout"), "", tx);
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines.len() < 50 && Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    lines.sort();
    let want: Vec<String> = (0..50).map(|i| format!("k{i:02}\tv{i}")).collect();
    assert_eq!(lines, want, "the live pairs first");
    w.put(b"k00", b"new").expect("put");
    w.delete(b"k01").expect("delete");
    let mut b = mapkv::Batch::new();
    b.put(b"k50", b"v50").delete(b"k02");
    w.write(&b).expect("batch");
    w.compact().expect("compact");
    w.put(b"after-compaction", b"yes").expect("put");
    let mut changes = Vec::new();
    while changes.len() < 5 && Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            changes.push(l);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        changes,
        [
            "+\tk00\tnew",
            "-\tk01",
            "+\tk50\tv50",
            "-\tk02",
            "+\tafter-compaction\tyes"
        ],
        "every change once, in order, across a compaction"
    );
}

/// Sends `sig` to process `pid` (`kill -SIG PID`) and, for a stop, waits until it is
/// stopped.
fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    if sig == "STOP" {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
            // The state follows the parenthesized command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            if state == Some("T") || state == Some("t") {
                break;
            }
            assert!(Instant::now() < deadline, "the scan did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `scan --follow` that sleeps through two compactions (the file in between, and its
/// changes, are gone when it looks again): a notice on stderr, then the live pairs again,
/// which hold what the lost changes did; then changes as before.
#[test]
fn scan_follow_lists_the_pairs_again_after_missing_a_file() {
    let (_dir, path) = tmp();
    let w = Store::open(&path, Options::default()).expect("writer");
    for i in 0..5 {
        w.put(format!("k{i}"), format!("v{i}")).expect("put");
    }
    let mut child = follow(&path, Stdio::piped());
    let (tx, rx) = std::sync::mpsc::channel();
    forward_lines(child.stdout.take().expect("stdout"), "", tx.clone());
    forward_lines(child.stderr.take().expect("stderr"), "stderr: ", tx);
    let deadline = Instant::now() + Duration::from_secs(60);
    let next = |n: usize| {
        let mut lines = Vec::new();
        while lines.len() < n && Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                lines.push(l);
            }
        }
        lines
    };
    let mut first = next(5);
    first.sort();
    assert_eq!(first, ["k0\tv0", "k1\tv1", "k2\tv2", "k3\tv3", "k4\tv4"]);
    signal(child.id(), "STOP");
    w.put(b"before", b"1").expect("put");
    w.compact().expect("compact");
    w.put(b"lost", b"2").expect("put");
    w.delete(b"k0").expect("delete");
    w.compact().expect("compact");
    w.put(b"after", b"3").expect("put");
    signal(child.id(), "CONT");
    // The change before the gap, the notice, then the seven live pairs.
    let got = next(9);
    w.put(b"later", b"4").expect("put");
    let later = next(1);
    let _ = child.kill();
    let _ = child.wait();
    // (Two pipes, read by two threads: the notice may come in anywhere.)
    let (notice, out): (Vec<&String>, Vec<&String>) =
        got.iter().partition(|l| l.starts_with("stderr: "));
    assert!(notice.len() == 1 && notice[0].contains("lost"), "{got:?}");
    assert_eq!(
        out.first().map(|l| l.as_str()),
        Some("+\tbefore\t1"),
        "{got:?}"
    );
    let mut pairs: Vec<&str> = out.iter().skip(1).map(|l| l.as_str()).collect();
    pairs.sort_unstable();
    assert_eq!(
        pairs,
        [
            "after\t3",
            "before\t1",
            "k1\tv1",
            "k2\tv2",
            "k3\tv3",
            "k4\tv4",
            "lost\t2"
        ],
        "{got:?}"
    );
    assert_eq!(later, ["+\tlater\t4"]);
}

/// A damaged record in the middle of a store's durable log: `mapkv get` and `verify`
/// name the damage (the store is left as it was), `verify --repair` skips the damaged
/// record and keeps every other pair.
#[test]
fn verify_repair_keeps_the_records_after_a_damaged_one() {
    let (_dir, path) = tmp();
    let p = path.to_str().expect("utf-8 path");
    let s = Store::open(&path, Options::default()).expect("open");
    for i in 0..200u32 {
        s.put(format!("k{i:03}"), format!("value-{i:03}"))
            .expect("put");
    }
    s.flush().expect("flush");
    // A crash now: the checkpoint is older than these writes, the log holds them all.
    let mut bytes = std::fs::read(&path).expect("read");
    drop(s);
    // Record 100 (each record: 16-byte header, 4-byte key, 9-byte value).
    let info = mapkv::format::decode_static(&bytes).expect("header");
    let rec = info.log_start as usize + 100 * (16 + 4 + 9);
    assert_eq!(&bytes[rec + 16..rec + 20], b"k100");
    bytes[rec + 22] ^= 0x20;
    std::fs::write(&path, &bytes).expect("write damaged");

    let o = mapkv(&["get", p, "k150"]);
    assert!(!o.status.success(), "open must refuse: {o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{}", rec)), "names the offset: {err}");
    assert_eq!(std::fs::read(&path).expect("read"), bytes, "file unchanged");

    let o = mapkv(&["verify", "--repair", p]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("damaged range"), "{}", stdout(&o));
    for i in (0..200u32).filter(|&i| i != 100) {
        let o = mapkv(&["get", p, &format!("k{i:03}")]);
        assert_eq!(stdout(&o), format!("value-{i:03}\n"), "k{i:03}");
    }
    let o = mapkv(&["get", p, "k100"]);
    assert!(stdout(&o).is_empty(), "the damaged pair is gone: {o:?}");
}

/// `mapkv bench`'s table is the matrix of value sizes x policies x populate: by default
/// 100 B and 4 KiB values, each size's store holding about the same bytes; the JSON has
/// one row per cell, each naming its size.
#[test]
fn bench_rows_cover_every_value_size() {
    let (dir, _path) = tmp();
    let d = dir.path().to_str().expect("utf-8 path");
    let args = [
        "bench",
        "--quick",
        "--keys",
        "20000",
        "--policies",
        "none,always",
        "--write-secs",
        "0.2",
        "--read-secs",
        "0.05",
        "--dir",
        d,
    ];
    let o = mapkv(&[&args[..], &["--json"]].concat());
    assert!(o.status.success(), "{o:?}");
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    let rows = j["rows"].as_array().expect("rows");
    let mut cells: Vec<(u64, String, bool)> = rows
        .iter()
        .map(|r| {
            (
                r["value_size"].as_u64().expect("value_size"),
                r["policy"].as_str().expect("policy").to_owned(),
                r["populate"].as_bool().expect("populate"),
            )
        })
        .collect();
    cells.sort();
    let mut want = Vec::new();
    for size in [100u64, 4096] {
        for policy in ["always", "none"] {
            for populate in [false, true] {
                want.push((size, policy.to_owned(), populate));
            }
        }
    }
    assert_eq!(cells, want);
    // The same bytes at each size: 20,000 keys of 100 B, 564 of 4 KiB.
    let keys = |size: u64| {
        rows.iter()
            .find(|r| r["value_size"].as_u64() == Some(size))
            .and_then(|r| r["keys"].as_u64())
    };
    assert_eq!(keys(100), Some(20_000));
    assert_eq!(keys(4096), Some(564));
    assert_eq!(j["value_sizes"], serde_json::json!([100, 4096]));
    let fills = j["unsynced_fill_by_size"].as_array().expect("fills");
    assert_eq!(fills.len(), 2);
    assert_eq!(fills[1]["value_size"], 4096);
    assert_eq!(fills[1]["keys"], 564);
    assert!(fills[1]["puts_per_s"].as_f64().is_some_and(|r| r > 0.0));

    // The table names the size of each row; one size alone gives its rows only.
    let o = mapkv(&[&args[..], &["--value-size", "512"]].concat());
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    assert!(out.contains("20000 keys x 512 B values"), "{out}");
    let table_rows = out.lines().filter(|l| l.starts_with("│ 512 B ")).count();
    assert_eq!(table_rows, 4, "{out}");
    // A size given twice counts once.
    let o = mapkv(&[&args[..], &["--value-size", "512,512", "--json"]].concat());
    assert!(o.status.success(), "{o:?}");
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    assert_eq!(j["rows"].as_array().map(Vec::len), Some(4), "{j}");
    let o = mapkv(&["bench", "--value-size", "", "--dir", d]);
    assert!(!o.status.success(), "{o:?}");
}

/// `mapkv bench` shows its progress on stderr also where stderr is not a terminal (a CI
/// log, a script): one line per step, each naming what runs.
#[test]
fn bench_progress_goes_to_stderr_when_it_is_a_pipe() {
    let (dir, _path) = tmp();
    let d = dir.path().to_str().expect("utf-8 path");
    let o = mapkv(&[
        "bench",
        "--quick",
        "--keys",
        "20000",
        "--policies",
        "none",
        "--populate",
        "off",
        "--write-secs",
        "0.3",
        "--readers",
        "off",
        "--dir",
        d,
    ]);
    assert!(o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    for step in [
        "raw sync cost",
        "filling the base store",
        "none populate=off",
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with("mapkv: [") && l.contains(step)),
            "no progress line for {step}:\n{err}"
        );
    }
    assert!(stdout(&o).contains("none"), "{o:?}");
}

/// The disk-full writer of `mapkv crashtest` (a child whose files may not grow past 24
/// MiB): growth fails with an I/O error, never a signal; every write made before is read
/// back there and after reopening.
#[test]
fn a_writer_on_a_full_disk_gets_an_error_and_loses_nothing() {
    let (_dir, path) = tmp();
    for policy in ["None", "Always"] {
        let _ = std::fs::remove_file(&path);
        let o = Command::new(env!("CARGO_BIN_EXE_mapkv"))
            .arg("crashtest")
            .env("MAPKV_CRASHTEST_DISK_FULL_PATH", &path)
            .env("MAPKV_CRASHTEST_DISK_FULL_POLICY", policy)
            .output()
            .expect("run the disk-full child");
        assert!(o.status.success(), "{policy}: {o:?}");
        let out = stdout(&o);
        let acked: u64 = out
            .strip_prefix("acked ")
            .and_then(|t| t.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{policy}: {out}"));
        assert!(out.contains("fallocate"), "{policy}: {out}");
        assert!(acked > 1_000, "{policy}: {out}");
        let s = Store::open(&path, Options::default()).expect("reopen");
        for i in 0..acked {
            let v = s.get(i.to_le_bytes()).expect("get").expect("a write made");
            assert_eq!(v[..8], i.to_le_bytes());
        }
        s.close().expect("close");
    }
}

/// `mapkv bench --sweep`: one table row per size and phase, the plain-mapping baseline
/// beside each size, `--json` with both sizes, and a clear error for a bad size.
#[test]
fn bench_sweep_reports_every_size_and_the_plain_mapping() {
    let (dir, _path) = tmp();
    let d = dir.path().to_str().expect("utf-8 path");
    let o = mapkv(&["bench", "--sweep", "1k,2k", "--dir", d]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    for phase in ["fill", "overwrite", "close", "reopen", "plain mmap"] {
        for size in ["1k", "2k"] {
            assert!(
                out.lines()
                    .any(|l| l.contains(&format!(" {size} ")) && l.contains(phase)),
                "no {size} {phase} row:\n{out}"
            );
        }
    }
    let o = mapkv(&["bench", "--sweep", "1k,2k", "--dir", d, "--json"]);
    assert!(o.status.success(), "{o:?}");
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let sizes = json["sizes"].as_array().expect("sizes");
    assert_eq!(
        sizes.iter().map(|s| s["keys"].as_u64()).collect::<Vec<_>>(),
        [Some(1_000), Some(2_000)]
    );
    assert!(out.contains("RssAnon max"), "no RssAnon column:\n{out}");
    for s in sizes {
        // The store's memory at its peak during each loop, and where it started.
        for phase in ["fill", "overwrite"] {
            let w = &s[phase]["watch"];
            let (start, max) = (
                w["rss_anon_start_kb"].as_u64(),
                w["rss_anon_max_kb"].as_u64(),
            );
            assert!(
                start.is_some() && max.is_some_and(|m| m > 0),
                "{phase}: RssAnon start {start:?} max {max:?}"
            );
        }
        assert_eq!(s["plain"]["ops"].as_u64(), s["keys"].as_u64(), "{s}");
        assert_eq!(
            s["fill"]["latency"]["n"].as_u64(),
            s["keys"].as_u64(),
            "{s}"
        );
    }
    let o = mapkv(&["bench", "--sweep", "1k,0", "--dir", d]);
    assert_eq!(o.status.code(), Some(2), "a usage error: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("at least 1 key"),
        "{o:?}"
    );
    assert!(
        std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
        "the sweep leaves no files behind"
    );
}

/// `mapkv bench --kill-recovery`: writer processes killed with SIGKILL, every open after a
/// kill timed and verified; the report prints, no recovered store fails, and a bad count
/// is a usage error.
#[test]
fn bench_kill_recovery_reports_opens_after_kills() {
    let (dir, _path) = tmp();
    let d = dir.path().to_str().expect("utf-8 path");
    let o = mapkv(&[
        "bench",
        "--kill-recovery",
        "3",
        "--keys",
        "20000",
        "--dir",
        d,
    ]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    for want in [
        "after kill -9, all",
        "clean (same store, after each recovery)",
        "worst/median",
        "Every recovered store passed Store::verify",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    assert!(!out.contains("FAILURES"), "{out}");
    assert!(
        std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
        "the run leaves no files behind"
    );
    let o = mapkv(&["bench", "--kill-recovery", "0", "--dir", d]);
    assert_eq!(o.status.code(), Some(2), "a usage error: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--kill-recovery"),
        "{o:?}"
    );
}
