//! A `sqlite::memory:` store's temporary directory and a closed store, in
//! a test binary of their own: the other SQLite tests open memory stores in
//! parallel, which would blur the count of directories.

use std::collections::HashSet;

use taskexec_store::{SqliteStore, StoreError, TaskStore};

#[allow(unused)] // this binary uses two of its helpers
mod conformance;
use conformance::{new_task, submit};

/// After `close`, writes and the reads of the store's own threads answer
/// `Closed`, and `sqlite::memory:` leaves no directory behind once dropped.
#[tokio::test]
async fn a_closed_store_answers_closed_and_a_memory_store_leaves_nothing() {
    let before: HashSet<_> = memory_dirs();
    let store = SqliteStore::open("sqlite::memory:").await.expect("open");
    assert_eq!(memory_dirs().difference(&before).count(), 1);
    submit(&store, vec![new_task("a")]).await;
    assert!(store.get("a").await.expect("get").is_some());
    store.close().await;
    let err = store
        .submit(vec![new_task("b")], 1000)
        .await
        .expect_err("closed");
    assert!(matches!(err, StoreError::Closed), "{err:?}");
    let err = store.get("a").await.expect_err("closed");
    assert!(matches!(err, StoreError::Closed), "{err:?}");
    drop(store);
    assert_eq!(memory_dirs(), before);
}

/// The temporary directories of `sqlite::memory:` stores.
fn memory_dirs() -> HashSet<std::path::PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("taskexec-store-")
        })
        .map(|e| e.path())
        .collect()
}
