//! Maintenance subcommands: `get`, `put`, `del`, `scan`, `stats`, `verify`, `compact`,
//! `backup`.
//!
//! Every command opens the store, does one thing and closes it. The reading ones (`get`,
//! `scan`, `stats`, `verify`, `backup`) open it as a reader (`Options::read_only(true)`):
//! they take no lock and work while an application has the store open for writing,
//! seeing what it committed. The writing ones get "locked" then. Only `put` creates a
//! store; the others open an existing one (`Options::create(false)`).
//!
//! Keys and values are printed in one of three forms (see [`Encoding`]): escaped text
//! (the default, unambiguous), `--hex`, or `--raw` bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use comfy_table::Table;
use mapkv::{Durability, Options, Store};

use crate::measure::fmt_bytes;
use crate::Failure;

/// How keys and values are given on the command line and printed.
///
/// Printed text is escaped so that it decodes unambiguously and each pair stays on one
/// line: valid UTF-8 is printed as is, except that a backslash is printed as `\\`, and
/// each byte of a control character (tab, newline and carriage return included) or of
/// invalid UTF-8 as `\xNN` (two lowercase hex digits). So the text `\x01` prints as
/// `\\x01` and the byte 0x01 as `\x01`. Text given on the command line is taken as is
/// (no escapes are interpreted); use `--hex` for arbitrary bytes.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Encoding {
    /// Keys and values (and a prefix) on the command line are hex (`6b6579` = `key`),
    /// and keys and values are printed as hex. Without it they are UTF-8 text, printed
    /// escaped: a backslash as `\\`, control characters (tab, newline, ...) and bytes
    /// that are not UTF-8 as `\xNN`, everything else as is.
    #[arg(long)]
    pub hex: bool,
}

impl Encoding {
    fn parse(self, what: &str, s: &str) -> Result<Vec<u8>, Failure> {
        if !self.hex {
            return Ok(s.as_bytes().to_vec());
        }
        let s = s.strip_prefix("0x").unwrap_or(s);
        if !s.len().is_multiple_of(2) {
            return Err(Failure::msg(format!(
                "{what} {s:?} is not hex: odd number of digits"
            )));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                s.get(i..i + 2)
                    .and_then(|d| u8::from_str_radix(d, 16).ok())
                    .ok_or_else(|| Failure::msg(format!("{what} {s:?} is not hex")))
            })
            .collect()
    }

    fn show(self, bytes: &[u8]) -> String {
        if self.hex {
            return hex(bytes);
        }
        escape(bytes)
    }
}

/// `bytes` as lowercase hex, two digits a byte.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `bytes` as escaped text (see [`Encoding`]): UTF-8 as is, but `\` for a backslash and
/// `\xNN` for each byte of a control character or of invalid UTF-8.
fn escape(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else if c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// `mapkv get PATH KEY`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The store file.
    pub path: PathBuf,
    /// The key to look up.
    pub key: String,
    /// Write the value's raw bytes to stdout, with no escaping and no newline.
    #[arg(long, conflicts_with = "hex")]
    pub raw: bool,
    #[command(flatten)]
    pub enc: Encoding,
}

/// `mapkv put PATH KEY VALUE`.
#[derive(Debug, clap::Args)]
pub struct PutArgs {
    /// The store file (created if it does not exist).
    pub path: PathBuf,
    /// The key.
    pub key: String,
    /// The value (may be empty: `""`).
    pub value: String,
    #[command(flatten)]
    pub enc: Encoding,
}

/// `mapkv del PATH KEY`.
#[derive(Debug, clap::Args)]
pub struct DelArgs {
    /// The store file.
    pub path: PathBuf,
    /// The key to delete.
    pub key: String,
    #[command(flatten)]
    pub enc: Encoding,
}

/// `mapkv scan PATH`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// The store file.
    pub path: PathBuf,
    /// Only keys that start with this prefix (still a scan of the whole store: the index
    /// is a hash, see `Store::iter_prefix`).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Print keys and values as raw bytes, with no escaping: `key<TAB>value<NEWLINE>`.
    /// Ambiguous if keys or values contain tabs or newlines; use it for text you know,
    /// and the default escaped text or `--hex` otherwise.
    #[arg(long, conflicts_with = "hex")]
    pub raw: bool,
    /// Print at most this many pairs.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print only the keys.
    #[arg(long)]
    pub keys_only: bool,
    /// After the live pairs, print every change as the writer commits it, like
    /// `tail -f`, until interrupted: `+<TAB>key<TAB>value` for a put, `-<TAB>key` for a
    /// delete (deletes of keys that did not exist included). No change is missed or
    /// printed twice between the pairs and the changes. If the store is compacted twice
    /// while the scan waits (the changes made in between are then gone), a notice goes
    /// to stderr and the live pairs are printed again, as at the start.
    #[arg(long, conflicts_with = "limit")]
    pub follow: bool,
    #[command(flatten)]
    pub enc: Encoding,
}

/// `mapkv backup SRC DST`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The store to copy (it may be open for writing by an application meanwhile).
    pub src: PathBuf,
    /// Where to write the copy (must not exist).
    pub dst: PathBuf,
}

/// `mapkv stats PATH`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The store file.
    pub path: PathBuf,
    /// Print the counters as one JSON object (the fields of `mapkv::Stats`, byte counts
    /// as integers) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `mapkv verify PATH`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The store file.
    pub path: PathBuf,
    /// Repair a damaged store: open it with `Options::salvage(true)`, which skips damaged
    /// records (covering them with padding), keeps every valid record after them and
    /// rebuilds the index (CHANGES THE FILE: the damaged records are dropped, and so is
    /// everything after damage that reaches the end), then verify the result.
    #[arg(long)]
    pub repair: bool,
}

/// `mapkv compact PATH`.
#[derive(Debug, clap::Args)]
pub struct CompactArgs {
    /// The store file.
    pub path: PathBuf,
}

/// A store error as one line for the user.
fn fail(path: &Path, e: &mapkv::Error) -> Failure {
    match e {
        mapkv::Error::NotFound { .. } => {
            Failure::msg(format!("no such store: {} (no file there)", path.display()))
        }
        e => Failure::store(path, e),
    }
}

fn open_ro(path: &Path) -> Result<Store, Failure> {
    Store::open(path, Options::default().read_only(true)).map_err(|e| fail(path, &e))
}

/// Opens for writing; only `create` makes a new store (an empty file included).
fn open_rw(path: &Path, create: bool) -> Result<Store, Failure> {
    // `None`: no flusher thread; `close()` below syncs before the command returns.
    Store::open(
        path,
        Options::default()
            .durability(Durability::None)
            .create(create),
    )
    .map_err(|e| fail(path, &e))
}

fn close(path: &Path, store: Store) -> Result<(), Failure> {
    store.close().map_err(|e| fail(path, &e))
}

/// Runs `get`; a missing key is a failure (exit 1), like `grep` finding nothing.
pub fn get(a: &GetArgs) -> Result<(), Failure> {
    let key = a.enc.parse("key", &a.key)?;
    let store = open_ro(&a.path)?;
    let mut out = std::io::stdout().lock();
    let found = store
        .get_with(&key, |v| {
            if a.raw {
                out.write_all(v)
            } else {
                writeln!(out, "{}", a.enc.show(v))
            }
        })
        .map_err(|e| fail(&a.path, &e))?;
    match found {
        Some(r) => r.map_err(Failure::stdout),
        None => Err(Failure::msg(format!("key not found: {}", a.key))),
    }
}

/// Runs `put`; the value is durable when the command returns.
pub fn put(a: &PutArgs) -> Result<(), Failure> {
    let key = a.enc.parse("key", &a.key)?;
    let value = a.enc.parse("value", &a.value)?;
    let store = open_rw(&a.path, true)?;
    store.put(&key, &value).map_err(|e| fail(&a.path, &e))?;
    close(&a.path, store)
}

/// Runs `del`; a missing key is a failure (exit 1).
pub fn del(a: &DelArgs) -> Result<(), Failure> {
    let key = a.enc.parse("key", &a.key)?;
    let store = open_rw(&a.path, false)?;
    let existed = store.delete(&key).map_err(|e| fail(&a.path, &e))?;
    close(&a.path, store)?;
    if existed {
        Ok(())
    } else {
        Err(Failure::msg(format!(
            "key not found (nothing deleted): {}",
            a.key
        )))
    }
}

/// Writes one line: `fields` joined by tabs, each in the chosen form (raw, hex or
/// escaped text).
fn line(out: &mut impl Write, a: &ScanArgs, fields: &[&[u8]]) -> std::io::Result<()> {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.write_all(b"\t")?;
        }
        if a.raw {
            out.write_all(f)?;
        } else {
            out.write_all(a.enc.show(f).as_bytes())?;
        }
    }
    out.write_all(b"\n")
}

/// Runs `scan`: one `key<TAB>value` line per pair, in log order.
pub fn scan(a: &ScanArgs) -> Result<(), Failure> {
    let prefix = match &a.prefix {
        Some(p) => a.enc.parse("prefix", p)?,
        None => Vec::new(),
    };
    let store = open_ro(&a.path)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (pairs, follower): (Box<dyn Iterator<Item = mapkv::Result<_>>>, _) = if a.follow {
        let (it, f) = follow_prefix(&store, a, &prefix)?;
        (it, Some(f))
    } else {
        (Box::new(store.iter_prefix(&prefix)), None)
    };
    let limit = a
        .limit
        .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    pair_lines(&mut out, a, pairs.take(limit))?;
    let Some(mut follower) = follower else {
        return Ok(());
    };
    loop {
        let changes = match follower.wait(std::time::Duration::from_millis(200)) {
            Err(mapkv::Error::Lagged { .. }) => {
                // Compacted twice while this scan did not look: the changes made in the
                // file in between are gone. Start over from a fresh snapshot, listed as
                // at the start (lines without a `+`/`-` mark).
                eprintln!(
                    "mapkv: {}: changes were lost to this scan (the store was compacted \
                     twice while it waited); the live pairs again:",
                    a.path.display()
                );
                let (it, f) = follow_prefix(&store, a, &prefix)?;
                pair_lines(&mut out, a, it)?;
                follower = f;
                continue;
            }
            r => r.map_err(|e| fail(&a.path, &e))?,
        };
        for c in changes {
            let r = match c {
                mapkv::Change::Put { key, value } if key.starts_with(&prefix) => {
                    if a.keys_only {
                        line(&mut out, a, &[b"+", &key])
                    } else {
                        line(&mut out, a, &[b"+", &key, &value])
                    }
                }
                mapkv::Change::Delete { key } if key.starts_with(&prefix) => {
                    line(&mut out, a, &[b"-", &key])
                }
                _ => Ok(()),
            };
            r.map_err(Failure::stdout)?;
        }
        out.flush().map_err(Failure::stdout)?;
    }
}

/// A snapshot of the pairs whose key starts with `prefix`, and a follower of every
/// change after it.
fn follow_prefix<'p>(
    store: &Store,
    a: &ScanArgs,
    prefix: &'p [u8],
) -> Result<(PairIter<'p>, mapkv::Follower), Failure> {
    let (it, f) = store.follow().map_err(|e| fail(&a.path, &e))?;
    let it = it.filter(move |item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)));
    Ok((Box::new(it), f))
}

/// Pairs as `scan` lists them.
type PairIter<'p> = Box<dyn Iterator<Item = mapkv::Result<(Vec<u8>, Vec<u8>)>> + 'p>;

/// Prints `pairs` as `scan` does (`key<TAB>value`, or the key alone), then flushes.
fn pair_lines(
    out: &mut impl Write,
    a: &ScanArgs,
    pairs: impl Iterator<Item = mapkv::Result<(Vec<u8>, Vec<u8>)>>,
) -> Result<(), Failure> {
    for item in pairs {
        let (k, v) = item.map_err(|e| fail(&a.path, &e))?;
        let r = if a.keys_only {
            line(out, a, &[&k])
        } else {
            line(out, a, &[&k, &v])
        };
        r.map_err(Failure::stdout)?;
    }
    out.flush().map_err(Failure::stdout)
}

/// Runs `backup`: a consistent copy of the committed state, beside a running writer.
pub fn backup(a: &BackupArgs) -> Result<(), Failure> {
    let store = open_ro(&a.src)?;
    store.backup(&a.dst).map_err(|e| fail(&a.src, &e))?;
    let copy =
        Store::open(&a.dst, Options::default().read_only(true)).map_err(|e| fail(&a.dst, &e))?;
    let s = copy.stats();
    println!(
        "{} -> {}: {} live keys, {} (the copy is compacted)",
        a.src.display(),
        a.dst.display(),
        s.live_keys,
        fmt_bytes(s.file_size)
    );
    Ok(())
}

/// Runs `stats`: every counter of [`mapkv::Stats`], explained (or, with `--json`, as
/// JSON).
pub fn stats(a: &StatsArgs) -> Result<(), Failure> {
    let store = open_ro(&a.path)?;
    let s = store.stats();
    if a.json {
        let json = serde_json::to_string_pretty(&s)
            .map_err(|e| Failure::msg(format!("cannot encode the stats as JSON: {e}")))?;
        let mut out = std::io::stdout().lock();
        return writeln!(out, "{json}").map_err(Failure::stdout);
    }
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header(vec!["stat", "value", "meaning"]);
    let rows: Vec<(&str, String, &str)> = vec![
        ("live keys", s.live_keys.to_string(), "keys with a value"),
        (
            "live bytes",
            fmt_bytes(s.live_bytes),
            "records of live keys, headers included",
        ),
        (
            "dead bytes",
            fmt_bytes(s.dead_bytes),
            "overwritten/deleted records; `compact` reclaims them",
        ),
        (
            "log bytes",
            fmt_bytes(s.log_bytes),
            "all records in the log",
        ),
        (
            "index bytes",
            fmt_bytes(s.index_bytes),
            "the hash index region",
        ),
        (
            "dead index bytes",
            fmt_bytes(s.dead_index_bytes),
            "old index regions left by growth",
        ),
        (
            "released index bytes",
            fmt_bytes(s.released_index_bytes),
            "of those, punched out (no disk space; compaction gains nothing)",
        ),
        (
            "file size",
            fmt_bytes(s.file_size),
            "allocated size of the file",
        ),
        (
            "log end",
            s.log_end.to_string(),
            "offset of the next append",
        ),
        (
            "mapped",
            fmt_bytes(s.mapped_bytes),
            "address space reserved (costs no memory)",
        ),
        (
            "resident",
            fmt_bytes(s.resident_bytes),
            "file bytes in the page cache (mincore)",
        ),
        (
            "space amplification",
            format!("{:.2}", s.space_amplification),
            "file size / live bytes (live bytes counted as at least 1 MiB)",
        ),
        (
            "dead ratio",
            format!("{:.1}%", s.dead_ratio() * 100.0),
            "share of the log (and unreleased old index regions) that `compact` reclaims",
        ),
        (
            "delta entries",
            s.delta_entries.to_string(),
            "changes not yet checkpointed into the index",
        ),
        (
            "recovery: clean",
            s.recovery.was_clean.to_string(),
            "the store had been closed cleanly",
        ),
        (
            "recovery: replayed",
            s.recovery.replayed_writes.to_string(),
            "writes replayed at open",
        ),
        (
            "recovery: rebuilt index",
            s.recovery.rebuilt_index.to_string(),
            "index rebuilt from the log",
        ),
        (
            "recovery: torn tail cut at",
            s.recovery
                .truncated_at
                .map_or_else(|| "-".into(), |o| o.to_string()),
            "offset where an incomplete tail was dropped",
        ),
    ];
    let l = &s.live;
    let live_rows: Vec<(&str, String, &str)> = vec![
        (
            "reader: view end",
            l.view_end.to_string(),
            "log end this reader has caught up with",
        ),
        (
            "writer: committed end",
            l.committed_end.to_string(),
            "log end the writer has committed (published for readers)",
        ),
        (
            "reader: behind by",
            fmt_bytes(l.behind_bytes),
            "committed log this reader has not replayed yet",
        ),
        (
            "writer: durable end",
            l.durable_end.to_string(),
            "log end the writer last made durable",
        ),
        (
            "writer: running",
            l.writer_alive.to_string(),
            "a process holds the store open for writing",
        ),
        (
            "writer: sessions",
            l.writer_sessions.to_string(),
            "writers that opened the file since it was made",
        ),
    ];
    let rows = rows.into_iter().chain(live_rows);
    for (k, v, m) in rows {
        t.add_row(vec![k.to_owned(), v, m.to_owned()]);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}\n{t}", a.path.display()).map_err(Failure::stdout)
}

/// Runs `verify` (and `verify --repair`).
pub fn verify(a: &VerifyArgs) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    let store = if a.repair {
        let size_before = std::fs::metadata(&a.path).map(|m| m.len()).unwrap_or(0);
        let store = Store::open(
            &a.path,
            Options::default()
                .durability(Durability::None)
                .create(false)
                .salvage(true),
        )
        .map_err(|e| fail(&a.path, &e))?;
        let r = store.stats().recovery;
        let mut lines = vec![format!(
            "repair of {} (file was {size_before} bytes):",
            a.path.display()
        )];
        lines.push(format!("  closed cleanly before: {}", r.was_clean));
        lines.push(format!(
            "  writes replayed after the last checkpoint: {}",
            r.replayed_writes
        ));
        lines.push(format!("  index rebuilt from the log: {}", r.rebuilt_index));
        lines.push(match r.truncated_at {
            Some(o) => format!("  log cut at byte offset {o} (incomplete or invalid tail dropped)"),
            None => "  log cut: no".into(),
        });
        lines.push(format!("  damaged bytes dropped: {}", r.salvaged_bytes));
        lines.push(format!(
            "  log durable up to byte offset: {} (below it an invalid record is damage)",
            r.durable_end
        ));
        for g in &r.damaged {
            lines.push(format!(
                "  damaged range {}..{} skipped (covered with padding); the records after it kept",
                g.start, g.end
            ));
        }
        writeln!(out, "{}", lines.join("\n")).map_err(Failure::stdout)?;
        store
    } else {
        open_ro(&a.path)?
    };
    let rep = store.verify().map_err(|e| fail(&a.path, &e))?;
    writeln!(
        out,
        "ok: {}: {} records ({} writes, {}) checksummed, {} index buckets checked, {} live keys all found by the index",
        a.path.display(),
        rep.records,
        rep.writes,
        fmt_bytes(rep.log_bytes),
        rep.buckets,
        rep.live_keys
    )
    .map_err(Failure::stdout)?;
    close(&a.path, store)
}

/// Runs `compact`: prints the file size before and after.
pub fn compact(a: &CompactArgs) -> Result<(), Failure> {
    let store = open_rw(&a.path, false)?;
    let before = store.stats();
    let res = store.compact();
    let after = store.stats();
    close(&a.path, store)?;
    res.map_err(|e| fail(&a.path, &e))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "compacted {}: file {} -> {} ({} dead bytes before, {} after)",
        a.path.display(),
        fmt_bytes(before.file_size),
        fmt_bytes(after.file_size),
        fmt_bytes(before.dead_bytes + before.dead_index_bytes),
        fmt_bytes(after.dead_bytes + after.dead_index_bytes),
    )
    .map_err(Failure::stdout)
}
