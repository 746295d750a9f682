//! Readers in other processes: one writer process and two reader processes share one
//! store file, and the readers see the writer's writes as they are made.
//!
//! Run it with:
//!
//! ```text
//! cargo run --release --example readers
//! ```
//!
//! It takes about four seconds. The program starts three copies of itself (the same
//! executable, re-run with an argument) on a store in a new temporary directory:
//!
//! - the **writer** opens the store for writing and, for 3 seconds, sets `counter` to 1,
//!   2, 3, ... every 10 ms; every 25th tick a user joins (`user:N` is set), and every
//!   100th the user who joined two before leaves (`user:N` is deleted); at the end it
//!   sets `done` and closes the store;
//! - **reader 1** opens the store with `read_only(true)` and, every half second, prints
//!   the `counter` and the number of keys it sees;
//! - **reader 2** opens it the same way and follows every committed change with
//!   `Store::changes()`, printing a summary of the changes of each half second.
//!
//! Both readers stop when they see `done`. Nothing tells a reader that something
//! changed: each of its calls first catches up with what the writer had committed, so
//! a `get` right after the writer's `put` returned sees the new value. Under
//! `Durability::Always` a reader sees a write only once it is durable; this example
//! uses the default policy (`Periodic`, one second), under which readers see a write as
//! soon as the writer's call returns.

use std::error::Error;
use std::path::Path;
use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

use mapkv::{Change, Options, Store};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// How long the writer writes.
const WRITE_FOR: Duration = Duration::from_secs(3);
/// How often the readers print.
const EVERY: Duration = Duration::from_millis(500);
/// A reader gives up if it has not seen `done` by then (the writer died).
const GIVE_UP: Duration = Duration::from_secs(20);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("writer") => writer(Path::new(&args[2])),
        Some("reader-1") => reader_1(Path::new(&args[2])),
        Some("reader-2") => reader_2(Path::new(&args[2])),
        _ => parent(),
    }
}

/// Creates the store, starts the three processes and waits for them.
fn parent() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("mapkv-readers-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("example.mkv");
    // A reader never creates a store: make an empty one for all three to open.
    Store::open(&path, Options::default())?.close()?;
    println!("[main]     store {}", path.display());
    println!("[main]     starting a writer and two readers (this program, re-run)");

    let exe = std::env::current_exe()?;
    let start =
        |role: &str| -> Result<Child> { Ok(Command::new(&exe).arg(role).arg(&path).spawn()?) };
    let children = [
        ("writer", start("writer")?),
        ("reader-1", start("reader-1")?),
        ("reader-2", start("reader-2")?),
    ];
    let mut failed = Vec::new();
    for (role, mut child) in children {
        if !child.wait()?.success() {
            failed.push(role);
        }
    }
    remove(&dir);
    if failed.is_empty() {
        println!(
            "[main]     all three processes are done; removed {}",
            dir.display()
        );
        Ok(())
    } else {
        Err(format!("failed: {}", failed.join(", ")).into())
    }
}

fn remove(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("[main]     could not remove {}: {e}", dir.display());
    }
}

/// Writes for [`WRITE_FOR`], then sets `done`.
fn writer(path: &Path) -> Result<()> {
    let store = Store::open(path, Options::default())?;
    println!(
        "[writer]   opened the store for writing (pid {})",
        std::process::id()
    );
    let start = Instant::now();
    let mut next_report = EVERY * 2;
    let mut tick = 0u64;
    while start.elapsed() < WRITE_FOR {
        tick += 1;
        store.put("counter", tick.to_string())?;
        if tick.is_multiple_of(25) {
            let user = tick / 25;
            store.put(format!("user:{user}"), format!("joined at tick {tick}"))?;
        }
        if tick.is_multiple_of(100) {
            store.delete(format!("user:{}", tick / 25 - 2))?;
        }
        if start.elapsed() >= next_report {
            println!("[writer]   counter = {tick}");
            next_report += EVERY * 2;
        }
        sleep(Duration::from_millis(10));
    }
    store.put("done", tick.to_string())?;
    println!("[writer]   set counter 1..={tick} and then `done`; closing the store");
    store.close()?;
    Ok(())
}

fn text(v: Option<Vec<u8>>) -> String {
    v.map_or_else(
        || "(none yet)".into(),
        |b| String::from_utf8_lossy(&b).into_owned(),
    )
}

/// Prints the counter every [`EVERY`] until `done` appears.
fn reader_1(path: &Path) -> Result<()> {
    let store = Store::open(path, Options::default().read_only(true))?;
    println!("[reader 1] opened the store read-only; polling `counter`");
    let start = Instant::now();
    loop {
        // Each call catches up with what the writer committed before it started.
        let counter = text(store.get("counter")?);
        println!(
            "[reader 1] counter = {counter}, {} keys in the store",
            store.len()
        );
        if let Some(done) = store.get("done")? {
            println!(
                "[reader 1] the writer set `done` at counter = {}; stopping",
                String::from_utf8_lossy(&done)
            );
            return Ok(());
        }
        if start.elapsed() > GIVE_UP {
            return Err("reader 1: no `done` from the writer".into());
        }
        sleep(EVERY);
    }
}

/// Follows every change and prints what each [`EVERY`] brought, until `done`.
fn reader_2(path: &Path) -> Result<()> {
    let store = Store::open(path, Options::default().read_only(true))?;
    let mut changes = store.changes()?;
    println!("[reader 2] opened the store read-only; following its changes");
    let start = Instant::now();
    let mut total = 0usize;
    loop {
        sleep(EVERY);
        let batch = changes.poll()?;
        total += batch.len();
        let mut counters = Vec::new();
        let mut events = Vec::new();
        let mut done = false;
        for c in &batch {
            match c {
                Change::Put { key, value } if key == b"counter" => {
                    counters.push(String::from_utf8_lossy(value).into_owned());
                }
                Change::Put { key, .. } if key == b"done" => {
                    done = true;
                    events.push("`done` set".into());
                }
                Change::Put { key, .. } => {
                    events.push(format!("{} joined", String::from_utf8_lossy(key)));
                }
                Change::Delete { key } => {
                    events.push(format!("{} left", String::from_utf8_lossy(key)));
                }
            }
        }
        let range = match (counters.first(), counters.last()) {
            (Some(a), Some(b)) => format!("counter {a}..={b}"),
            _ => "no counter change".into(),
        };
        let events = if events.is_empty() {
            String::new()
        } else {
            format!("; {}", events.join(", "))
        };
        let n = batch.len();
        let plural = if n == 1 { "" } else { "s" };
        println!("[reader 2] {n} change{plural}: {range}{events}");
        if done {
            println!("[reader 2] saw `done` after {total} changes in all; stopping");
            return Ok(());
        }
        if start.elapsed() > GIVE_UP {
            return Err("reader 2: no `done` from the writer".into());
        }
    }
}
