//! `docs/FORMAT.md` against the code, field by field: every row of the document's offset
//! tables (static header, checkpoint slot, bucket page, record header) must give the
//! offset and size that the public constants and `Pod` structs of `mapkv::format` give the
//! same field, in the same order, and the rows must cover their structure without gaps or
//! overlaps.
//!
//! The expected layout is data: [`tables`] lists, per document section, one [`Field`] per
//! table row. A new field in the format is one new row in the document and one new line
//! there.

use std::mem::{offset_of, size_of};

use mapkv::format::{
    Checkpoint, RecordHeader, StaticHeader, BUCKET_COUNT_OFF, BUCKET_HEADER, BUCKET_MAGIC_OFF,
    BUCKET_SIZE, LIVE_COMMITTED_OFF, LIVE_DURABLE_CHECK_OFF, LIVE_DURABLE_OFF, LIVE_INDEX_SEQ_OFF,
    LIVE_LEN, LIVE_OFF, LIVE_SESSION_OFF, LIVE_SWITCH_OFF, RECORD_HEADER, SLOTS_PER_BUCKET,
    SLOT_SIZE,
};

const DOC: &str = include_str!("../docs/FORMAT.md");

/// Where a field sits in its structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offset {
    /// A fixed offset (`24` in the document).
    At(usize),
    /// Once per element of an array: `base + stride * i` (`16 + 16*i` in the document).
    Every { base: usize, stride: usize },
}

/// One table row as the code sees it.
#[derive(Debug)]
struct Field {
    /// The row's field column starts with this (compared without backticks, ignoring case).
    label: &'static str,
    offset: Offset,
    size: usize,
}

/// One offset table of the document and the structure it describes.
#[derive(Debug)]
struct Table {
    /// The first table after the heading that starts with this text is the one checked.
    heading: &'static str,
    /// Size of the whole structure.
    span: usize,
    /// For tables with `Every` rows: how many array elements follow the fixed part.
    repeats: usize,
    fields: Vec<Field>,
}

/// Size of the field that `f` projects to, e.g. `size_of_field(|h: &StaticHeader| &h.seed)`.
fn size_of_field<T, F>(_f: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// A field of a `Pod` struct: its offset and size come from the struct itself.
macro_rules! field {
    ($label:literal, $ty:ty, $name:ident) => {
        Field {
            label: $label,
            offset: Offset::At(offset_of!($ty, $name)),
            size: size_of_field(|h: &$ty| &h.$name),
        }
    };
}

/// A field given by constants: `at` is an [`Offset`], `size` in bytes.
fn field(label: &'static str, offset: Offset, size: usize) -> Field {
    Field {
        label,
        offset,
        size,
    }
}

/// An 8-byte counter of the live area at absolute offset `at`.
fn live(label: &'static str, at: u64) -> Field {
    field(
        label,
        Offset::At((at - LIVE_OFF) as usize),
        size_of::<u64>(),
    )
}

/// The layout the code defines, one entry per table of `docs/FORMAT.md`.
fn tables() -> Vec<Table> {
    vec![
        Table {
            heading: "Static header",
            span: size_of::<StaticHeader>(),
            repeats: 0,
            fields: vec![
                field!("magic", StaticHeader, magic),
                field!("major version", StaticHeader, major),
                field!("minor version", StaticHeader, minor),
                field!("page size", StaticHeader, page_size),
                field!("seed", StaticHeader, seed),
                field!("log_start", StaticHeader, log_start),
                field!("first_index", StaticHeader, first_index),
                field!("origin_end", StaticHeader, origin_end),
                field!("generation", StaticHeader, generation),
                field!("reserved", StaticHeader, reserved),
                field!("CRC-32", StaticHeader, crc),
            ],
        },
        Table {
            heading: "Checkpoint slots",
            span: size_of::<Checkpoint>(),
            repeats: 0,
            fields: vec![
                field!("seq", Checkpoint, seq),
                field!("state", Checkpoint, state),
                field!("index_style", Checkpoint, index_style),
                field!("index_off", Checkpoint, index_off),
                field!("index_buckets", Checkpoint, index_buckets),
                field!("log_end", Checkpoint, log_end),
                field!("live_keys", Checkpoint, live_keys),
                field!("live_bytes", Checkpoint, live_bytes),
                field!("log_bytes", Checkpoint, log_bytes),
                field!("dead_index_bytes", Checkpoint, dead_index_bytes),
                field!("redo_end", Checkpoint, redo_end),
                field!("redo_live_keys", Checkpoint, redo_live_keys),
                field!("redo_live_bytes", Checkpoint, redo_live_bytes),
                field!("redo_log_bytes", Checkpoint, redo_log_bytes),
                field!("redo_dead_index_bytes", Checkpoint, redo_dead_index_bytes),
                field!("reserved", Checkpoint, reserved),
                field!("keyed CRC-32", Checkpoint, crc),
            ],
        },
        Table {
            // `format` has no struct for a bucket page: its layout is the constants, and
            // the header's `crc u32, count u16` (see `BUCKET_HEADER`).
            heading: "Index region",
            span: BUCKET_SIZE,
            repeats: SLOTS_PER_BUCKET,
            fields: vec![
                field("CRC", Offset::At(0), size_of::<u32>()),
                field(
                    "number of used slots",
                    Offset::At(BUCKET_COUNT_OFF),
                    size_of::<u16>(),
                ),
                field("magic", Offset::At(BUCKET_MAGIC_OFF), size_of::<u16>()),
                field(
                    "reserved",
                    Offset::At(BUCKET_MAGIC_OFF + size_of::<u16>()),
                    BUCKET_HEADER - BUCKET_MAGIC_OFF - size_of::<u16>(),
                ),
                field(
                    "slot i: key hash",
                    Offset::Every {
                        base: BUCKET_HEADER,
                        stride: SLOT_SIZE,
                    },
                    size_of::<u64>(),
                ),
                field(
                    "slot i: offset",
                    Offset::Every {
                        base: BUCKET_HEADER + size_of::<u64>(),
                        stride: SLOT_SIZE,
                    },
                    size_of::<u64>(),
                ),
            ],
        },
        Table {
            // Offsets within the live area, which starts at `LIVE_OFF` of the superblock.
            heading: "Live area",
            span: LIVE_LEN as usize,
            repeats: 0,
            fields: vec![
                live("committed end", LIVE_COMMITTED_OFF),
                live("index sequence", LIVE_INDEX_SEQ_OFF),
                live("writer sessions", LIVE_SESSION_OFF),
                live("switch", LIVE_SWITCH_OFF),
                live("durable end", LIVE_DURABLE_OFF),
                live("durable check", LIVE_DURABLE_CHECK_OFF),
                field(
                    "reserved",
                    Offset::At((LIVE_DURABLE_CHECK_OFF - LIVE_OFF) as usize + 8),
                    (LIVE_LEN - (LIVE_DURABLE_CHECK_OFF - LIVE_OFF) - 8) as usize,
                ),
            ],
        },
        Table {
            heading: "Records",
            span: RECORD_HEADER,
            repeats: 0,
            fields: vec![
                field!("crc", RecordHeader, crc),
                field!("kind", RecordHeader, kind),
                field!("flags", RecordHeader, flags),
                field!("durable", RecordHeader, durable),
                field!("key_len", RecordHeader, key_len),
                field!("val_len", RecordHeader, val_len),
            ],
        },
    ]
}

/// A table row as the document states it.
#[derive(Debug)]
struct Row {
    line: usize,
    offset: Offset,
    size: usize,
    field: String,
}

/// Parses `16`, or `16 + 16*i` (spaces optional).
fn parse_offset(s: &str) -> Option<Offset> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    match s.split_once('+') {
        None => s.parse().ok().map(Offset::At),
        Some((base, rest)) => {
            let stride = rest.strip_suffix("*i")?;
            Some(Offset::Every {
                base: base.parse().ok()?,
                stride: stride.parse().ok()?,
            })
        }
    }
}

/// The rows of the first `| offset | size | field |` table after the heading that starts
/// with `heading`, or a message saying what is missing.
fn doc_rows(doc: &str, heading: &str) -> Result<Vec<Row>, String> {
    let lines: Vec<&str> = doc.lines().collect();
    let start = lines
        .iter()
        .position(|l| {
            l.starts_with('#') && l.trim_start_matches('#').trim_start().starts_with(heading)
        })
        .ok_or_else(|| format!("no heading `{heading}` in docs/FORMAT.md"))?;
    let head = (start + 1..lines.len())
        .take_while(|&i| !lines[i].starts_with('#'))
        .find(|&i| lines[i].trim_start().starts_with('|'))
        .ok_or_else(|| format!("no table under `{heading}` in docs/FORMAT.md"))?;
    let cells = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let header = cells(lines[head]);
    if header.len() < 3 || header[..3] != ["offset", "size", "field"] {
        return Err(format!(
            "docs/FORMAT.md line {}: the table under `{heading}` must start with \
             `| offset | size | field |`, found {header:?}",
            head + 1
        ));
    }
    let mut rows = Vec::new();
    // Skip the header and the `|---|` line; the table ends at the first other line.
    for (i, l) in lines.iter().enumerate().skip(head + 2) {
        if !l.trim_start().starts_with('|') {
            break;
        }
        let c = cells(l);
        let bad = || format!("docs/FORMAT.md line {}: cannot read the row {l:?}", i + 1);
        if c.len() < 3 {
            return Err(bad());
        }
        rows.push(Row {
            line: i + 1,
            offset: parse_offset(&c[0]).ok_or_else(bad)?,
            size: c[1].parse().map_err(|_| bad())?,
            field: c[2].clone(),
        });
    }
    Ok(rows)
}

fn normalize(s: &str) -> String {
    s.replace('`', "").to_lowercase()
}

/// Every disagreement between the document's table and the code's layout.
fn check_table(doc: &str, t: &Table) -> Vec<String> {
    let rows = match doc_rows(doc, t.heading) {
        Ok(r) => r,
        Err(e) => return vec![e],
    };
    let mut errors = Vec::new();
    if rows.len() != t.fields.len() {
        errors.push(format!(
            "`{}`: docs/FORMAT.md has {} rows, the code {} fields",
            t.heading,
            rows.len(),
            t.fields.len()
        ));
    }
    for (row, f) in rows.iter().zip(&t.fields) {
        let at = format!(
            "docs/FORMAT.md line {} (`{}`, {})",
            row.line, t.heading, f.label
        );
        if !normalize(&row.field).starts_with(&normalize(f.label)) {
            errors.push(format!(
                "{at}: the field column {:?} should start with {:?} (rows out of order?)",
                row.field, f.label
            ));
        }
        if row.offset != f.offset {
            errors.push(format!(
                "{at}: offset {:?} in the document, {:?} in the code",
                row.offset, f.offset
            ));
        }
        if row.size != f.size {
            errors.push(format!(
                "{at}: size {} in the document, {} in the code",
                row.size, f.size
            ));
        }
    }
    errors
}

/// The code's own fields must tile the structure: fixed fields from 0 up to the first
/// array element (or the end), array fields from the element's start to its end, and the
/// elements to the end of the structure. So a table that matches the code also leaves no
/// byte undescribed.
fn check_coverage(t: &Table) -> Vec<String> {
    let mut errors = Vec::new();
    let mut end = 0;
    for f in &t.fields {
        if let Offset::At(off) = f.offset {
            if off != end {
                errors.push(format!(
                    "`{}`: `{}` starts at {off}, not {end}",
                    t.heading, f.label
                ));
            }
            end = off + f.size;
        }
    }
    let mut element = None;
    for f in &t.fields {
        if let Offset::Every { base, stride } = f.offset {
            let (start, in_element, _) = *element.get_or_insert((base, 0, stride));
            if base != start + in_element {
                errors.push(format!(
                    "`{}`: `{}` starts at {base} in each element, not {}",
                    t.heading,
                    f.label,
                    start + in_element
                ));
            }
            element = Some((start, base - start + f.size, stride));
        }
    }
    match element {
        None => {
            if end != t.span {
                errors.push(format!(
                    "`{}`: the fields end at {end}, not {}",
                    t.heading, t.span
                ));
            }
        }
        Some((start, len, stride)) => {
            if start != end {
                errors.push(format!(
                    "`{}`: the array starts at {start}, the fixed fields end at {end}",
                    t.heading
                ));
            }
            if len != stride {
                errors.push(format!(
                    "`{}`: an element's fields cover {len} bytes of its {stride}",
                    t.heading
                ));
            }
            if start + stride * t.repeats != t.span {
                errors.push(format!(
                    "`{}`: {start} + {stride} * {} is not the size {}",
                    t.heading, t.repeats, t.span
                ));
            }
        }
    }
    errors
}

#[test]
fn every_table_row_matches_the_code() {
    let errors: Vec<String> = tables().iter().flat_map(|t| check_table(DOC, t)).collect();
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

#[test]
fn the_code_layout_covers_each_structure() {
    let errors: Vec<String> = tables().iter().flat_map(check_coverage).collect();
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

/// The check itself: a document whose row disagrees with the code is caught.
#[test]
fn a_wrong_row_is_reported() {
    let cases = [
        // A wrong offset, a wrong size, a wrong array stride, a missing row.
        ("| 24 | 8 | `log_start`", "| 25 | 8 | `log_start`", "offset"),
        ("| 24 | 8 | `log_start`", "| 24 | 4 | `log_start`", "size"),
        ("| 16 + 16*i | 8 |", "| 16 + 15*i | 8 |", "offset"),
        ("| 5 | 1 | `flags`: BATCH_MORE or 0 |\n", "", "rows"),
    ];
    for (from, to, what) in cases {
        assert!(
            DOC.contains(from),
            "the document no longer has {from:?}: update this test"
        );
        let doc = DOC.replacen(from, to, 1);
        let errors: Vec<String> = tables().iter().flat_map(|t| check_table(&doc, t)).collect();
        assert!(
            errors.iter().any(|e| e.contains(what)),
            "changing {from:?} to {to:?} was not reported as a wrong {what}: {errors:?}"
        );
    }
}

#[test]
fn offsets_parse() {
    assert_eq!(parse_offset("508"), Some(Offset::At(508)));
    assert_eq!(
        parse_offset("24 + 16*i"),
        Some(Offset::Every {
            base: 24,
            stride: 16
        })
    );
    assert_eq!(parse_offset("16*i"), None);
    assert_eq!(parse_offset("key_len"), None);
}
