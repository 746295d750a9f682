//! The library API example of the product contract, verbatim, compiled with every
//! warning denied (a statement such as `store.len();` must not warn) and run in a
//! temporary directory. Its own test binary: it changes the working directory.
#![deny(warnings)]

#[test]
fn the_api_example_compiles_without_warnings_and_runs() -> mapkv::Result<()> {
    let dir = tempfile::tempdir()?;
    std::env::set_current_dir(dir.path())?;
    use mapkv::{Batch, Options, Store};
    let store = Store::open("data.mkv", Options::default())?; // creates the file if missing
    store.put(b"k", b"v")?; // -> Result<()>
    let v: Option<Vec<u8>> = store.get(b"k")?; // owned copy
    let n: Option<usize> = store.get_with(b"k", |v: &[u8]| v.len())?; // zero-copy read
    let existed: bool = store.delete(b"k")?;
    let mut b = Batch::new();
    b.put(b"a", b"1");
    b.delete(b"k");
    store.write(&b)?; // atomic: all or nothing, also after a crash
    store.flush()?; // everything written before it returns is durable
    store.len(); // live keys
    for item in store.iter() {
        let (_k, _v) = item?;
    } // every live pair, each once
    store.compact()?; // reclaim space of overwritten/deleted records
    store.stats(); // live/dead bytes, file size, mapped size, resident pages, syncs, ...
    store.backup("copy.mkv")?; // consistent copy of the committed state while writes go on
    drop(store); // clean close: flush + mark clean

    assert_eq!((v.as_deref(), n, existed), (Some(&b"v"[..]), Some(1), true));
    let store = Store::open("data.mkv", Options::default().read_only(true))?;
    assert_eq!(store.len(), 1);
    assert_eq!(store.get(b"a")?.as_deref(), Some(&b"1"[..]));
    let copy = Store::open("copy.mkv", Options::default().read_only(true))?;
    assert_eq!(copy.get(b"a")?.as_deref(), Some(&b"1"[..]));
    Ok(())
}
