//! Three mapkv-backed openraft nodes in one process: writes through the leader, the leader
//! stopped, a new leader elected, every acknowledged write read back on the survivors, the
//! stopped node restarted from its mapkv files and caught up, and a fresh learner that
//! can only catch up by snapshot. Prints each step; exits nonzero if any check fails.
//!
//! ```text
//! cargo run --release --manifest-path examples/raft/Cargo.toml --example cluster [-- --dir DIR]
//! ```
//!
//! The node files go to a temporary directory, removed at the end, or to `DIR` (kept).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use mapkv_raft::cluster::{failover, Scenario};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut keep: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--dir", Some(d)) => keep = Some(PathBuf::from(d)),
            _ => {
                eprintln!("usage: cluster [--dir DIR]");
                return ExitCode::from(2);
            }
        }
    }
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot create a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = keep.unwrap_or_else(|| tmp.path().to_path_buf());

    let scenario = Scenario {
        writes_before: 500,
        writes_during: 2000,
        writes_after: 200,
        snapshot_every: 500,
    };
    let start = Instant::now();
    let mut say = |line: &str| println!("[{:>7.3}s] {line}", start.elapsed().as_secs_f64());
    match failover(&dir, &scenario, &mut say).await {
        Ok(report) => {
            println!(
                "OK: leader {} stopped, leader {} elected in {} ms; node {} restarted from disk and caught up ({}); {} acknowledged writes, {} reads checked",
                report.first_leader,
                report.second_leader,
                report.failover.as_millis(),
                report.first_leader,
                if report.restarted_by_snapshot {
                    "by snapshot"
                } else {
                    "by log replication"
                },
                report.acked,
                report.reads_checked
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
