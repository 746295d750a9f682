use mapkv::{Batch, Durability, Options, Store};

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.mkv");
    for d in [Durability::None, Durability::Always] {
        let _ = std::fs::remove_file(&p);
        let s = Store::open(&p, Options::default().durability(d)).unwrap();
        for i in 0..50_000u32 {
            s.put(format!("key{i}"), format!("value{i}")).unwrap();
            if d == Durability::Always && i > 300 { break; }
        }
        let n = s.len();
        assert_eq!(s.get(b"key7").unwrap(), Some(b"value7".to_vec()));
        assert!(s.delete(b"key7").unwrap());
        assert!(!s.delete(b"key7").unwrap());
        assert_eq!(s.get(b"key7").unwrap(), None);
        let mut b = Batch::new();
        b.put(b"a", b"").delete(b"key8");
        s.write(&b).unwrap();
        assert_eq!(s.len(), n - 1);
        assert_eq!(s.iter().count(), n - 1);
        s.verify().unwrap();
        drop(s);
        let s = Store::open(&p, Options::default()).unwrap();
        assert!(s.stats().recovery.was_clean, "{:?}", s.stats());
        assert_eq!(s.len(), n - 1);
        assert_eq!(s.get(b"a").unwrap(), Some(vec![]));
        assert_eq!(s.get(b"key9").unwrap(), Some(b"value9".to_vec()));
        s.verify().unwrap();
        assert_eq!(s.iter().count(), n - 1);
    }
}
