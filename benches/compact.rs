//! Compaction throughput (MB/s of live data) and the stall it causes: the longest a
//! reader and a writer waited while a compaction ran concurrently.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mapkv::{Durability, Options, Store};

fn fill(s: &Store, keys: u32, rounds: u32, vlen: usize) {
    for r in 0..rounds {
        for i in 0..keys {
            let mut v = vec![(r % 251) as u8; vlen];
            v[..4].copy_from_slice(&i.to_le_bytes());
            s.put(i.to_le_bytes(), v).unwrap();
        }
    }
}

fn main() {
    // `cargo bench --bench compact` passes `--bench`; ignore arguments.
    let dir = tempfile::tempdir().unwrap();
    let (keys, rounds, vlen) = (200_000u32, 3, 200);
    println!("compaction: {keys} keys x {vlen} B values, {rounds} rounds of overwrites");
    for rep in 0..3 {
        let p = dir.path().join(format!("c{rep}.mkv"));
        let s = Arc::new(Store::open(&p, Options::default().durability(Durability::None)).unwrap());
        fill(&s, keys, rounds, vlen);
        let before = s.stats();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut worst = Duration::ZERO;
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let _ = s.get_with((i % keys).to_le_bytes(), <[u8]>::len).unwrap();
                    worst = worst.max(t.elapsed());
                    i = i.wrapping_add(7919);
                }
                worst
            })
        };
        let writer = {
            let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut worst = Duration::ZERO;
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    s.put(format!("w{n}"), b"x").unwrap();
                    worst = worst.max(t.elapsed());
                    n += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                worst
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        s.compact().unwrap();
        let took = t.elapsed();
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        let (rw, ww) = (reader.join().unwrap(), writer.join().unwrap());
        let after = s.stats();
        println!(
            "rep {rep}: {:.0} MB/s of live data ({:.1} MB in {:.0} ms); file {:.1} -> {:.1} MB; \
             worst reader wait {:.2} ms, worst writer wait {:.1} ms",
            after.live_bytes as f64 / 1e6 / took.as_secs_f64(),
            after.live_bytes as f64 / 1e6,
            took.as_secs_f64() * 1e3,
            before.file_size as f64 / 1e6,
            after.file_size as f64 / 1e6,
            rw.as_secs_f64() * 1e3,
            ww.as_secs_f64() * 1e3,
        );
    }
}
