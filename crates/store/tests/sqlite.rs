//! The conformance suite on SQLite (a fresh file database per test, and a
//! shared in-memory one), plus SQLite-specific checks: URLs, pragmas,
//! migrations, leases and claimers in separate pools.

mod conformance;

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use taskexec_store::{ErrorClass, SqliteStore, StoreError, TaskStore};
use tempfile::TempDir;

use conformance::{Harness, at, claim, new_task, submit};

/// A fresh database file in a temporary directory.
struct FileDb {
    dir: TempDir,
    url: String,
}

impl FileDb {
    fn new() -> FileDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        FileDb { dir, url }
    }

    async fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.url).await.expect("open")
    }

    /// A plain pool on the same file, to look under the hood.
    async fn raw(&self) -> SqlitePool {
        SqlitePool::connect(&self.url).await.expect("raw pool")
    }
}

#[async_trait]
impl Harness for FileDb {
    async fn open(&self) -> Box<dyn TaskStore> {
        Box::new(self.store().await)
    }
}

/// One in-memory database: every `open` hands out the same store (there is
/// nothing to reopen), so the restart behaviours check nothing more here.
struct MemoryDb(SqliteStore);

#[async_trait]
impl Harness for MemoryDb {
    async fn open(&self) -> Box<dyn TaskStore> {
        Box::new(self.0.clone())
    }
}

mod file {
    super::conformance::conformance_suite!(super::FileDb::new());
}

mod memory {
    super::conformance::conformance_suite!(super::MemoryDb(
        taskexec_store::SqliteStore::open("sqlite::memory:")
            .await
            .expect("open in memory")
    ));
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    for url in [
        "",
        "postgres://localhost/db",
        "sqlite://",
        "sqlite:store.db",
        "store.db",
        "sqlite::memory",
        "sqlite://store.db?synchronous=off",
        "sqlite://store.db?journal_mode=delete",
    ] {
        let err = SqliteStore::open(url).await.expect_err(url);
        assert!(
            matches!(err, StoreError::BadUrl(ref u) if u == url),
            "{url}: {err:?}"
        );
    }
}

#[tokio::test]
async fn synchronous_full_is_an_option_of_the_url() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("full.db");
    let store = SqliteStore::open(&format!("sqlite://{}?synchronous=full", path.display()))
        .await
        .expect("open");
    store.ping().await.expect("ping");
    assert!(path.exists(), "the path is the part before the query");
}

#[tokio::test]
async fn file_is_created_in_wal_mode_and_migrated_once() {
    let db = FileDb::new();
    let path = db.dir.path().join("store.db");
    assert!(!path.exists());
    let store = db.store().await;
    assert!(path.exists());
    drop(store);
    let again = db.store().await;
    again.ping().await.expect("ping");
    let raw = db.raw().await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&raw)
        .await
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&raw)
        .await
        .expect("migrations");
    // Each migration of the schema, applied once.
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .expect("the migrations directory")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    assert_eq!(migrations, i64::try_from(files).expect("a few files"));
    again.close().await;
}

#[tokio::test]
async fn claims_and_renewals_set_leases() {
    let db = FileDb::new();
    let store = db.store().await;
    submit(&store, vec![new_task("a"), new_task("b"), new_task("c")]).await;
    claim(&store, "n1", 2, at(10)).await;
    claim(&store, "n2", 1, at(10)).await;
    let raw = db.raw().await;
    let leases = || async {
        let rows = sqlx::query("SELECT id, lease_until FROM tasks ORDER BY seq")
            .fetch_all(&raw)
            .await
            .expect("leases");
        rows.iter()
            .map(|r| r.get::<Option<i64>, _>("lease_until"))
            .collect::<Vec<_>>()
    };
    let ms = |s: i64| (conformance::T0.unix_timestamp() + s) * 1000;
    // The test lease is 30 s.
    assert_eq!(leases().await, vec![Some(ms(40)); 3]);
    let ids = ["a", "b", "c"].map(str::to_owned);
    store.renew("n1", &ids, at(100)).await.expect("renew");
    assert_eq!(
        leases().await,
        vec![Some(ms(100)), Some(ms(100)), Some(ms(40))]
    );
    store
        .apply(vec![conformance::requeue("a", 1, at(50))])
        .await
        .expect("apply");
    store.renew("n1", &ids, at(200)).await.expect("renew");
    assert_eq!(leases().await, vec![None, Some(ms(200)), Some(ms(40))]);
}

/// Two stores (as two processes would) on one file never claim the same
/// task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimers_in_separate_pools_never_share() {
    let db = FileDb::new();
    let stores: Vec<Arc<SqliteStore>> =
        vec![Arc::new(db.store().await), Arc::new(db.store().await)];
    let tasks = (0..120).map(|i| new_task(&format!("t{i:03}"))).collect();
    submit(&*stores[0], tasks).await;
    let mut workers = Vec::new();
    for w in 0..6 {
        let store = Arc::clone(&stores[w % 2]);
        workers.push(tokio::spawn(async move {
            let node = format!("node-{w}");
            let mut got = Vec::new();
            loop {
                let claimed = claim(&*store, &node, 2, at(1)).await;
                if claimed.is_empty() {
                    return got;
                }
                got.extend(conformance::ids(&claimed));
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("claimer"));
    }
    assert_eq!(all.len(), 120);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 120);
}

/// A tmpfs of `size` mounted on a temporary directory, unmounted when
/// dropped; `None` (with a notice) where mounting is not allowed.
struct SmallDisk {
    dir: TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(SmallDisk { dir }),
            other => {
                eprintln!("skipped: cannot mount a tmpfs here ({other:?}); run as root");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// A store whose disk fills up refuses the submission that does not fit
/// as `Full` (what the API answers 507 STORAGE_FULL), stores nothing of
/// it, and still answers reads of what it stored.
#[tokio::test]
async fn a_full_disk_is_classed_full_and_stores_nothing() {
    let Some(disk) = SmallDisk::mount("1m") else {
        return;
    };
    let url = format!("sqlite://{}", disk.dir.path().join("store.db").display());
    let store = SqliteStore::open(&url).await.expect("open");
    let big = "x".repeat(64 << 10);
    let mut stored = Vec::new();
    let err = loop {
        let id = format!("t{}", stored.len());
        let mut t = new_task(&id);
        t.task.input = serde_json::json!({ "pad": big });
        match store.submit(vec![t], 1_000_000).await {
            Ok(_) => stored.push(id),
            Err(e) => break (id, e),
        }
        assert!(stored.len() < 64, "a 1 MiB disk never filled up");
    };
    let (refused, err) = err;
    assert_eq!(err.class(), ErrorClass::Full, "{err:?}");
    assert!(!stored.is_empty());
    assert_eq!(store.get(&refused).await.expect("get"), None);
    for id in &stored {
        assert!(store.get(id).await.expect("get").is_some(), "{id}");
    }
    store.close().await;
}

#[test]
fn busy_and_closed_are_unavailable() {
    let busy = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
        None,
    ));
    assert_eq!(busy.class(), ErrorClass::Unavailable);
    assert_eq!(StoreError::Closed.class(), ErrorClass::Unavailable);
    let full = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
        None,
    ));
    assert_eq!(full.class(), ErrorClass::Full);
    assert_eq!(
        StoreError::BadCursor("x".to_owned()).class(),
        ErrorClass::Other
    );
}

#[tokio::test]
async fn a_database_in_a_missing_directory_names_it_and_the_fix() {
    let dir = TempDir::new().expect("temp dir");
    let missing = dir.path().join("not-here");
    let url = format!("sqlite://{}/tasks.db", missing.display());
    let err = SqliteStore::open(&url)
        .await
        .expect_err("no such directory");
    assert!(
        matches!(&err, StoreError::NoDirectory { dir } if *dir == missing),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("`mkdir -p {}`", missing.display())),
        "{msg}"
    );
    assert!(!missing.exists(), "nothing created");
}
