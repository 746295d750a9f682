//! `mapkv`: the command-line tool of the mapkv key-value store.
//!
//! - `mapkv bench`: measures, on this machine, what each durability policy and each mmap
//!   flag costs and buys (the main job; `mapkv bench --help`).
//! - `mapkv get|put|del|scan|stats|verify|compact PATH ...`: inspect and maintain a store.
//! - `mapkv crashtest`: kill -9 and simulated power-loss rounds against a temporary store.
//!
//! Errors print one line to stderr (`mapkv: error: ...`) and exit with status 1; usage
//! errors exit with status 2.

// The crate root is `src/bin/mapkv.rs`, so its modules live in `src/bin/mapkv/`.
#[path = "mapkv/bench.rs"]
mod bench;
#[path = "mapkv/crashtest.rs"]
mod crashtest;
#[path = "mapkv/flags.rs"]
mod flags;
#[path = "mapkv/killopen.rs"]
mod killopen;
#[path = "mapkv/measure.rs"]
mod measure;
#[path = "mapkv/plot.rs"]
mod plot;
#[path = "mapkv/progress.rs"]
mod progress;
#[path = "mapkv/readers.rs"]
mod readers;
#[path = "mapkv/sweep.rs"]
mod sweep;
#[path = "mapkv/sys.rs"]
mod sys;
#[path = "mapkv/tools.rs"]
mod tools;

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mapkv: an embedded key-value store in one memory-mapped file.
///
/// Start with `mapkv bench` to see what durability costs on this machine, then
/// `mapkv put/get/scan/stats` to look inside a store.
#[derive(Debug, Parser)]
#[command(name = "mapkv", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Measure writes/s, latency, reads, open and first-touch cost, page faults and syncs
    /// for every durability policy with and without populate (about a minute, in a
    /// temporary directory).
    Bench(bench::BenchArgs),
    /// Print the value of a key (exit 1 if the key is missing).
    Get(tools::GetArgs),
    /// Set a key to a value (creates the store if needed; durable when it returns).
    Put(tools::PutArgs),
    /// Delete a key (exit 1 if it was missing).
    Del(tools::DelArgs),
    /// List the live pairs, one `key<TAB>value` per line, in log (write) order; with
    /// `--follow`, then every committed change as it happens.
    Scan(tools::ScanArgs),
    /// Print the store's counters: sizes, dead bytes, resident pages, recovery report.
    Stats(tools::StatsArgs),
    /// Check every checksum and the index against the log; exit 1 on damage.
    Verify(tools::VerifyArgs),
    /// Rewrite the store without dead records and print the file size before and after.
    Compact(tools::CompactArgs),
    /// Write a consistent copy of a store (which may be open for writing elsewhere) to a
    /// new file.
    Backup(tools::BackupArgs),
    /// Crash-test a temporary store: kill -9 rounds and simulated power-loss images;
    /// exit 1 on any violation of the durability contract.
    Crashtest(crashtest::CrashtestArgs),
    /// A writer or reader process of `mapkv bench`'s reader-process section (started by
    /// `mapkv bench` itself).
    #[command(hide = true)]
    BenchChild(readers::ChildArgs),
    /// The writer process of `mapkv bench --kill-recovery` (started by `mapkv bench`
    /// itself, killed with SIGKILL).
    #[command(hide = true)]
    BenchKillChild(killopen::ChildArgs),
}

/// Why a command failed: one line for stderr, or a quiet exit (stdout was closed early,
/// as by `mapkv scan ... | head`).
#[derive(Debug)]
pub enum Failure {
    /// Print `mapkv: error: <message>` and exit 1.
    Message(String),
    /// Exit quietly (the reader of stdout went away).
    BrokenPipe,
}

impl Failure {
    /// A plain message.
    pub fn msg(m: impl Into<String>) -> Self {
        Failure::Message(m.into())
    }

    /// A store error, naming the store (unless the error names its file already).
    pub fn store(path: &Path, e: &mapkv::Error) -> Self {
        if e.path().is_some() {
            return Failure::Message(e.to_string());
        }
        Failure::Message(format!("{}: {e}", path.display()))
    }

    /// An error writing to stdout.
    pub fn stdout(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Failure::BrokenPipe
        } else {
            Failure::Message(format!("cannot write to stdout: {e}"))
        }
    }
}

fn main() -> ExitCode {
    // A bug must still end in one readable line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("mapkv: internal error (a bug, please report it): {msg}{at}");
    }));
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Bench(a) => bench::run(a),
        Cmd::Get(a) => tools::get(a),
        Cmd::Put(a) => tools::put(a),
        Cmd::Del(a) => tools::del(a),
        Cmd::Scan(a) => tools::scan(a),
        Cmd::Stats(a) => tools::stats(a),
        Cmd::Verify(a) => tools::verify(a),
        Cmd::Compact(a) => tools::compact(a),
        Cmd::Backup(a) => tools::backup(a),
        Cmd::Crashtest(a) => match crashtest::run(a) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Failure::msg("crashtest found violations (see above)")),
            Err(e) => Err(Failure::Message(format!("crashtest: {e}"))),
        },
        Cmd::BenchChild(a) => readers::child(a),
        Cmd::BenchKillChild(a) => killopen::child(a),
    };
    match result {
        Ok(()) | Err(Failure::BrokenPipe) => ExitCode::SUCCESS,
        Err(Failure::Message(m)) => {
            eprintln!("mapkv: error: {m}");
            ExitCode::FAILURE
        }
    }
}
