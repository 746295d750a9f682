//! Replicated writes through a 3-node openraft cluster (in one process, in-process
//! network): writes per second and latency (p50/p99), on mapkv storage (both log sync
//! modes) and on in-memory storage, printed side by side.
//!
//! ```text
//! cargo run --release --manifest-path examples/raft/Cargo.toml --example bench [-- --seconds N --clients N]
//! ```
//!
//! Each storage gets a fresh cluster (files in a temporary directory), 500 warm-up writes,
//! then two timed phases of `--seconds` each (default 5): one client writing one key at a
//! time (latency of a single replicated write), and `--clients` concurrent clients
//! (default 32; openraft batches their entries into shared appends and syncs). A write is
//! a `Set` of a key among 100,000 to a 100-byte value, acknowledged once committed (on a
//! majority, durable on mapkv) and applied on the leader. Snapshots every 5,000 entries
//! (openraft's default), 1,000 entries kept after each.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mapkv_raft::cluster::{config, Backend, BoxError, Cluster};
use mapkv_raft::{LogSync, Request};

/// One timed phase's result.
struct Phase {
    writes: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Phase {
    fn per_sec(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `clients` tasks writing through the leader for `secs`.
async fn phase(
    raft: &openraft::Raft<mapkv_raft::TypeConfig>,
    clients: usize,
    secs: u64,
    seed: usize,
) -> Result<Phase, BoxError> {
    let value = "v".repeat(100);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let raft = raft.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = seed + c * 7919;
            while Instant::now() < deadline {
                n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let req = Request::Set {
                    key: format!("key-{:06}", (n >> 33) % 100_000),
                    value: value.clone(),
                };
                let t = Instant::now();
                raft.client_write(req).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, BoxError>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    Ok(Phase {
        writes: all.len(),
        elapsed,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    })
}

async fn run(backend: Backend, clients: usize, secs: u64) -> Result<(Phase, Phase), BoxError> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(5000);
    cfg.max_in_snapshot_log_to_keep = 1000;
    let mut cluster = Cluster::new(dir.path(), backend, cfg)?;
    for id in [1, 2, 3] {
        cluster.start_node(id).await?;
    }
    cluster.initialize(&[1, 2, 3]).await?;
    let leader = cluster.wait_for_leader(None).await?;
    let raft = cluster
        .node(leader)
        .map(|n| n.raft.clone())
        .ok_or("no leader")?;
    for i in 0..500 {
        cluster.write(&format!("warm-{i}"), "w").await?;
    }
    let one = phase(&raft, 1, secs, 1).await?;
    let many = phase(&raft, clients, secs, 2).await?;
    drop(raft);
    cluster.shutdown().await?;
    Ok((one, many))
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let mut secs = 5;
    let mut clients = 32;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next();
        let n = v.as_deref().and_then(|v| v.parse::<u64>().ok());
        match (a.as_str(), n) {
            ("--seconds", Some(n)) if n > 0 => secs = n,
            ("--clients", Some(n)) if n > 0 => clients = n as usize,
            ("--storage", _) if v.is_some() => only = v,
            _ => {
                eprintln!(
                    "usage: bench [--seconds N] [--clients N] [--storage group-commit|always|memory]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let backends = [
        (
            "group-commit",
            "mapkv, group commit",
            Backend::Mapkv(LogSync::GroupCommit),
        ),
        ("always", "mapkv, Always", Backend::Mapkv(LogSync::Always)),
        ("memory", "in-memory", Backend::Memory),
    ];
    let backends = backends
        .into_iter()
        .filter(|(key, _, _)| only.as_deref().is_none_or(|o| o == *key))
        .map(|(_, name, b)| (name, b));
    println!(
        "3-node openraft cluster in one process, writes through the leader, {secs} s per phase"
    );
    let mut rows = Vec::new();
    for (name, backend) in backends {
        eprintln!("running: {name} ...");
        match run(backend, clients, secs).await {
            Ok(r) => rows.push((name, r)),
            Err(e) => {
                eprintln!("{name}: FAILED: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let c = format!("{clients} clients");
    println!();
    println!(
        "| {:<20} | {:>10} | {:>9} | {:>9} | {:>10} | {:>9} | {:>9} |",
        "storage", "1 client/s", "p50", "p99", c, "p50", "p99"
    );
    println!(
        "| {:-<20} | {:->10} | {:->9} | {:->9} | {:->10} | {:->9} | {:->9} |",
        "", "", "", "", "", "", ""
    );
    for (name, (one, many)) in &rows {
        println!(
            "| {:<20} | {:>10.0} | {:>9} | {:>9} | {:>10.0} | {:>9} | {:>9} |",
            name,
            one.per_sec(),
            us(one.p50),
            us(one.p99),
            many.per_sec(),
            us(many.p50),
            us(many.p99),
        );
    }
    println!();
    println!("(writes/s; p50/p99: latency of one acknowledged write as its client saw it)");
    ExitCode::SUCCESS
}
