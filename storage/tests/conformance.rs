//! The conformance suite: one body per property, run against every backend available — the
//! embedded store always, FoundationDB when `FDB_CLUSTER_FILE` names a cluster (and the crate
//! is built with `--features fdb`).

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use cellplane_storage::{
    Database, KEY_LEN_MAX, RangeOptions, RetryPolicy, StorageError, TRANSACTION_BYTES_MAX,
    VALUE_LEN_MAX, decode_counter,
};

/// A backend under test, and what keeps it alive.
struct Backend {
    name: &'static str,
    db: Database,
    /// Every key a test writes starts with this, so runs on a shared cluster never collide.
    prefix: Vec<u8>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    fn key(&self, suffix: &str) -> Vec<u8> {
        [self.prefix.as_slice(), suffix.as_bytes()].concat()
    }
}

fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Database::open_embedded(dir.path()).expect("open embedded store");
    let mut all = vec![Backend { name: "embedded", db, prefix: b"t/".to_vec(), _dir: Some(dir) }];
    fdb_backend(&mut all);
    all
}

#[cfg(feature = "fdb")]
fn fdb_backend(all: &mut Vec<Backend>) {
    match std::env::var("FDB_CLUSTER_FILE") {
        Ok(file) => {
            let db = Database::open_fdb(Some(&file)).expect("connect to FoundationDB");
            let prefix = format!("cellplane-test/{}/", std::process::id()).into_bytes();
            all.push(Backend { name: "fdb", db, prefix, _dir: None });
        }
        Err(_) => eprintln!("skipping FoundationDB: FDB_CLUSTER_FILE is not set"),
    }
}

#[cfg(not(feature = "fdb"))]
fn fdb_backend(_: &mut Vec<Backend>) {
    eprintln!("skipping FoundationDB: built without the `fdb` feature");
}

async fn put(b: &Backend, pairs: &[(&str, &str)]) {
    let tx = b.db.begin().await.unwrap();
    for (k, v) in pairs {
        tx.set(&b.key(k), v.as_bytes()).unwrap();
    }
    tx.commit().await.unwrap();
}

async fn read(b: &Backend, k: &str) -> Option<String> {
    let tx = b.db.begin().await.unwrap();
    tx.get(&b.key(k)).await.unwrap().map(|v| String::from_utf8(v).unwrap())
}

fn keys_of(b: &Backend, rows: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
    rows.iter().map(|(k, _)| String::from_utf8(k[b.prefix.len()..].to_vec()).unwrap()).collect()
}

macro_rules! conformance {
    ($($name:ident($b:ident) $body:block)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            for $b in backends() {
                eprintln!("{} on {}", stringify!($name), $b.name);
                let $b = &$b;
                $body
            }
        }
    )*};
}

conformance! {
    read_your_writes(b) {
        put(b, &[("a", "1"), ("b", "2"), ("c", "3")]).await;
        let tx = b.db.begin().await.unwrap();
        tx.set(&b.key("a"), b"10").unwrap();
        tx.clear(&b.key("b")).unwrap();
        tx.set(&b.key("bb"), b"new").unwrap();
        assert_eq!(tx.get(&b.key("a")).await.unwrap().as_deref(), Some(&b"10"[..]));
        assert_eq!(tx.get(&b.key("b")).await.unwrap(), None);
        let page = tx.get_range(&RangeOptions::new(b.key("a"), b.key("z"))).await.unwrap();
        assert_eq!(keys_of(b, &page.rows), ["a", "bb", "c"]);
        tx.clear_range(&b.key("a"), &b.key("c")).unwrap();
        tx.set(&b.key("b"), b"back").unwrap();
        let page = tx.get_range(&RangeOptions::new(b.key("a"), b.key("z")).reverse()).await.unwrap();
        assert_eq!(keys_of(b, &page.rows), ["c", "b"]);
        tx.atomic_add(&b.key("n"), 5).unwrap();
        tx.atomic_add(&b.key("n"), 2).unwrap();
        assert_eq!(tx.get(&b.key("n")).await.unwrap().map(|v| decode_counter(&v)), Some(7));
        // Nothing is visible outside before commit; all of it after.
        assert_eq!(read(b, "a").await.as_deref(), Some("1"));
        tx.commit().await.unwrap();
        assert_eq!(read(b, "a").await, None);
        assert_eq!(read(b, "b").await.as_deref(), Some("back"));
        assert_eq!(read(b, "c").await.as_deref(), Some("3"));
    }

    the_last_write_to_a_key_wins_within_a_transaction(b) {
        let tx = b.db.begin().await.unwrap();
        tx.set(&b.key("w/b"), b"1").unwrap();
        tx.set(&b.key("w/a"), b"x").unwrap();
        tx.set(&b.key("w/b"), b"2").unwrap();
        tx.atomic_add(&b.key("w/c"), 5).unwrap();
        tx.set(&b.key("w/c"), &40i64.to_le_bytes()).unwrap();
        tx.atomic_add(&b.key("w/c"), 2).unwrap();
        tx.clear(&b.key("w/a")).unwrap();
        tx.commit().await.unwrap();
        assert_eq!(read(b, "w/b").await.as_deref(), Some("2"));
        assert_eq!(read(b, "w/a").await, None);
        let tx = b.db.begin().await.unwrap();
        assert_eq!(tx.get(&b.key("w/c")).await.unwrap().map(|v| decode_counter(&v)), Some(42));
    }

    reads_see_one_snapshot(b) {
        put(b, &[("x", "old")]).await;
        let reader = b.db.begin().await.unwrap();
        assert_eq!(reader.get(&b.key("x")).await.unwrap().as_deref(), Some(&b"old"[..]));
        put(b, &[("x", "new"), ("y", "new")]).await;
        // The reader's snapshot does not move.
        assert_eq!(reader.get(&b.key("x")).await.unwrap().as_deref(), Some(&b"old"[..]));
        assert_eq!(reader.get(&b.key("y")).await.unwrap(), None);
    }

    snapshot_reads_add_no_conflict(b) {
        put(b, &[("s", "0")]).await;
        let tx = b.db.begin().await.unwrap();
        tx.snapshot_get(&b.key("s")).await.unwrap();
        tx.get_range(&RangeOptions::new(b.key("s"), b.key("t")).snapshot()).await.unwrap();
        put(b, &[("s", "1")]).await;
        tx.set(&b.key("other"), b"v").unwrap();
        tx.commit().await.expect("a snapshot read does not conflict");
    }

    write_skew_is_rejected(b) {
        // Invariant: at least one doctor on call. Each transaction checks the other, then leaves.
        put(b, &[("alice", "on"), ("bob", "on")]).await;
        let t1 = b.db.begin().await.unwrap();
        let t2 = b.db.begin().await.unwrap();
        for t in [&t1, &t2] {
            assert!(t.get(&b.key("alice")).await.unwrap().is_some());
            assert!(t.get(&b.key("bob")).await.unwrap().is_some());
        }
        t1.clear(&b.key("alice")).unwrap();
        t2.clear(&b.key("bob")).unwrap();
        t1.commit().await.unwrap();
        assert!(matches!(t2.commit().await, Err(StorageError::Conflict)));
        assert_eq!(read(b, "bob").await.as_deref(), Some("on"));
    }

    lost_update_is_rejected(b) {
        put(b, &[("c", "0")]).await;
        let t1 = b.db.begin().await.unwrap();
        let t2 = b.db.begin().await.unwrap();
        for t in [&t1, &t2] {
            t.get(&b.key("c")).await.unwrap();
            t.set(&b.key("c"), b"1").unwrap();
        }
        t1.commit().await.unwrap();
        let lost = t2.commit().await;
        assert!(matches!(lost, Err(StorageError::Conflict)), "{lost:?}");
    }

    range_reads_conflict_with_inserts_into_them(b) {
        let t1 = b.db.begin().await.unwrap();
        let page = t1.get_range(&RangeOptions::new(b.key("r/"), b.key("r0"))).await.unwrap();
        assert!(page.rows.is_empty());
        put(b, &[("r/phantom", "x")]).await;
        t1.set(&b.key("r-summary"), b"empty").unwrap();
        assert!(matches!(t1.commit().await, Err(StorageError::Conflict)));
    }

    range_bounds_and_limits_both_ways(b) {
        let pairs: Vec<(String, String)> = (0..10).map(|i| (format!("k{i}"), i.to_string())).collect();
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        put(b, &refs).await;
        let tx = b.db.begin().await.unwrap();
        let all = RangeOptions::new(b.key("k2"), b.key("k7"));
        let page = tx.get_range(&all.clone().limit(3)).await.unwrap();
        assert_eq!((keys_of(b, &page.rows), page.more), (vec!["k2".into(), "k3".into(), "k4".into()], true));
        let next = tx.get_range(&all.after(&page.rows[2].0).limit(3)).await.unwrap();
        assert_eq!((keys_of(b, &next.rows), next.more), (vec!["k5".into(), "k6".into()], false));
        let back = all.clone().reverse().limit(3);
        let page = tx.get_range(&back).await.unwrap();
        assert_eq!((keys_of(b, &page.rows), page.more), (vec!["k6".into(), "k5".into(), "k4".into()], true));
        let next = tx.get_range(&back.after(&page.rows[2].0)).await.unwrap();
        assert_eq!((keys_of(b, &next.rows), next.more), (vec!["k3".into(), "k2".into()], false));
        // Exactly the limit: no more.
        let exact = tx.get_range(&all.clone().limit(5)).await.unwrap();
        assert_eq!((exact.rows.len(), exact.more), (5, false));
        // Empty and inverted ranges, zero limits.
        assert!(tx.get_range(&RangeOptions::new(b.key("k3"), b.key("k3"))).await.unwrap().rows.is_empty());
        assert!(matches!(tx.get_range(&RangeOptions::new(b.key("k7"), b.key("k2"))).await, Err(StorageError::InvalidRange(_))));
        assert!(matches!(tx.get_range(&all.clone().limit(0)).await, Err(StorageError::InvalidRange(_))));
    }

    clear_range_edges(b) {
        put(b, &[("e1", "x"), ("e2", "x"), ("e3", "x"), ("e4", "x")]).await;
        let tx = b.db.begin().await.unwrap();
        tx.clear_range(&b.key("e2"), &b.key("e4")).unwrap();
        tx.clear_range(&b.key("e1"), &b.key("e1")).unwrap();
        assert!(matches!(tx.clear_range(&b.key("e4"), &b.key("e1")), Err(StorageError::InvalidRange(_))));
        tx.commit().await.unwrap();
        let tx = b.db.begin().await.unwrap();
        let page = tx.get_range(&RangeOptions::new(b.key("e"), b.key("f"))).await.unwrap();
        assert_eq!(keys_of(b, &page.rows), ["e1", "e4"]);
    }

    atomic_add_under_contention(b) {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let db = b.db.clone();
                let key = b.key("counter");
                tokio::spawn(async move {
                    for _ in 0..20 {
                        db.run(|tx| { let key = key.clone(); async move { tx.atomic_add(&key, 1) } }).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let tx = b.db.begin().await.unwrap();
        assert_eq!(tx.get(&b.key("counter")).await.unwrap().map(|v| decode_counter(&v)), Some(320));
    }

    empty_and_maximum_sizes(b) {
        let longest_key = [b.prefix.clone(), vec![b'k'; KEY_LEN_MAX - b.prefix.len()]].concat();
        let biggest = vec![7u8; VALUE_LEN_MAX];
        let tx = b.db.begin().await.unwrap();
        tx.set(&b.key(""), b"").unwrap();
        tx.set(&longest_key, &biggest).unwrap();
        assert!(matches!(tx.set(&[longest_key.clone(), vec![0]].concat(), b"v"), Err(StorageError::KeyTooLarge { .. })));
        assert!(matches!(tx.set(&b.key("v"), &vec![0; VALUE_LEN_MAX + 1]), Err(StorageError::ValueTooLarge { .. })));
        assert!(matches!(tx.get(&vec![0; KEY_LEN_MAX + 1]).await, Err(StorageError::KeyTooLarge { .. })));
        tx.commit().await.unwrap();
        let tx = b.db.begin().await.unwrap();
        assert_eq!(tx.get(&b.key("")).await.unwrap(), Some(vec![]));
        assert_eq!(tx.get(&longest_key).await.unwrap(), Some(biggest));
        assert_eq!(tx.get(&b.key("v")).await.unwrap(), None, "a refused write changes nothing");
    }

    oversized_transactions_are_refused(b) {
        let tx = b.db.begin().await.unwrap();
        let value = vec![1u8; VALUE_LEN_MAX];
        let mut refused = None;
        for i in 0..(TRANSACTION_BYTES_MAX / VALUE_LEN_MAX + 2) {
            if let Err(e) = tx.set(&b.key(&format!("big{i}")), &value) {
                refused = Some(e);
                break;
            }
        }
        assert!(matches!(refused, Some(StorageError::TransactionTooLarge { .. })), "{refused:?}");
    }

    finished_transactions_refuse_work(b) {
        let tx = b.db.begin().await.unwrap();
        tx.set(&b.key("f"), b"1").unwrap();
        tx.commit().await.unwrap();
        assert!(matches!(tx.set(&b.key("f"), b"2"), Err(StorageError::Finished)));
        assert!(matches!(tx.commit().await, Err(StorageError::Finished)));
        let cancelled = b.db.begin().await.unwrap();
        cancelled.set(&b.key("g"), b"1").unwrap();
        cancelled.cancel();
        assert!(matches!(cancelled.commit().await, Err(StorageError::Finished)));
        assert_eq!(read(b, "g").await, None);
    }

    retry_loop_gives_up_after_its_cap(b) {
        let attempts = Arc::new(AtomicU32::new(0));
        let policy = RetryPolicy { attempts_max: 3, backoff_initial_ms: 1, backoff_max_ms: 4 };
        let outcome: Result<(), _> = b.db.run_with(&policy, |tx| {
            let (db, key, attempts) = (b.db.clone(), b.key("hot"), attempts.clone());
            async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                tx.get(&key).await?;
                // Someone else writes what we read, every time: we can never commit.
                let other = db.begin().await?;
                other.set(&key, b"theirs")?;
                other.commit().await?;
                tx.set(&key, b"ours")
            }
        }).await;
        match outcome {
            Err(StorageError::RetriesExhausted { attempts: 3, last }) => assert!(matches!(*last, StorageError::Conflict)),
            other => panic!("expected RetriesExhausted after 3, got {other:?}"),
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        assert_eq!(read(b, "hot").await.as_deref(), Some("theirs"));
    }

    retry_loop_does_not_retry_a_real_error(b) {
        let attempts = AtomicU32::new(0);
        let outcome: Result<(), _> = b.db.run(|tx| {
            attempts.fetch_add(1, Ordering::SeqCst);
            let key = b.key("k");
            async move { tx.set(&key, &vec![0; VALUE_LEN_MAX + 1]) }
        }).await;
        assert!(matches!(outcome, Err(StorageError::ValueTooLarge { .. })));
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }
}
