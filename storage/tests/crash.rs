//! Crash safety, for real: a child process commits acknowledged writes in a loop (transactions
//! and group commits in turn) and is SIGKILLed at random moments, many times; after each kill the
//! store reopens cleanly and holds every write the child acknowledged. Damaged files are refused
//! with a clear error, never a panic.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use cellplane_storage::group::{GroupCommitter, GroupOptions, Write};
use cellplane_storage::{Database, EmbeddedOptions, RangeOptions, StorageError};

const CHILD_ENV: &str = "CELLPLANE_CRASH_CHILD_DIR";

fn key(i: u64) -> Vec<u8> {
    format!("acked/{i:08}").into_bytes()
}

/// The child: commit key after key, printing each number only after its commit returned.
/// Runs only when spawned by `kill_at_random_moments_loses_no_acknowledged_write`.
#[tokio::test]
#[ignore = "the child process of a crash test; run by its parent"]
async fn crash_child() {
    let dir = std::env::var(CHILD_ENV).expect("spawned by the crash test");
    let db = Database::open_embedded(std::path::Path::new(&dir)).unwrap();
    let start = {
        let tx = db.begin().await.unwrap();
        let last = tx
            .get_range(
                &RangeOptions::new(b"acked/".to_vec(), b"acked0".to_vec()).reverse().limit(1),
            )
            .await
            .unwrap();
        last.rows
            .first()
            .map_or(0, |(k, _)| std::str::from_utf8(&k[6..]).unwrap().parse::<u64>().unwrap() + 1)
    };
    // Every other write goes through the group committer's blind path instead of a transaction.
    let committer = GroupCommitter::spawn(db.clone(), GroupOptions::default());
    for i in start.. {
        let value = vec![(i % 251) as u8; 1 + (i % 3_000) as usize];
        if i % 2 == 0 {
            let tx = db.begin().await.unwrap();
            tx.set(&key(i), &value).unwrap();
            tx.commit().await.unwrap();
        } else {
            committer.commit(vec![Write::Set(key(i), value)]).await.unwrap();
        }
        println!("ack {i}");
    }
}

#[test]
fn kill_at_random_moments_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<u64> = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..12 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill after a pseudo-random number of acknowledgements (xorshift: reproducible).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after = 1 + seed % 150;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while let Some(Ok(line)) = lines.next() {
            if let Some(n) = line.strip_prefix("ack ") {
                acked.push(n.parse().unwrap());
                seen += 1;
                if seen == kill_after {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let db =
                Database::open_embedded(dir.path()).expect("store reopens cleanly after SIGKILL");
            let tx = db.begin().await.unwrap();
            for i in &acked {
                let value = tx.get(&key(*i)).await.unwrap();
                assert_eq!(
                    value,
                    Some(vec![(i % 251) as u8; 1 + (i % 3_000) as usize]),
                    "round {round}: acknowledged write {i} lost"
                );
            }
        });
    }
    assert!(acked.len() >= 12, "children must have acknowledged writes");
}

fn written_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let db = Database::open_embedded(dir.path()).unwrap();
        for i in 0..200 {
            let tx = db.begin().await.unwrap();
            tx.set(&key(i), &[i as u8; 2_000]).unwrap();
            tx.commit().await.unwrap();
        }
    });
    dir
}

fn data_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let mut files: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 1, "one data file expected: {files:?}");
    files.remove(0)
}

fn open(dir: &tempfile::TempDir) -> Result<Database, StorageError> {
    Database::open_embedded_with(dir.path(), EmbeddedOptions::default())
}

#[test]
fn truncated_file_is_refused_with_a_clear_error() {
    let dir = written_store();
    let file = data_file(&dir);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len / 2).unwrap();
    match open(&dir) {
        Err(StorageError::Open { path, reason }) => {
            assert!(path.ends_with(".redb"), "{path}");
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("expected an Open error, got {other}"),
        Ok(_) => panic!("a truncated store must not open as if whole"),
    }
}

#[test]
fn corrupted_file_is_refused_with_a_clear_error() {
    let dir = written_store();
    let file = data_file(&dir);
    let mut bytes = std::fs::read(&file).unwrap();
    // Damage the middle of the file, where the data pages are.
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 4_096] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, &bytes).unwrap();
    assert!(matches!(open(&dir), Err(StorageError::Open { .. })), "a corrupt store must not open");
}

#[test]
fn garbage_file_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cellplane.redb"), b"this is not a database at all").unwrap();
    assert!(matches!(open(&dir), Err(StorageError::Open { .. })));
}
