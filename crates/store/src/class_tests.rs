//! Tests of the classification of [`StoreError`]: what a retry can fix.

use super::{ErrorClass, StoreError, postgres_class, sqlite_class};

fn sqlite(code: std::ffi::c_int) -> StoreError {
    StoreError::Sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(code),
        None,
    ))
}

#[test]
fn lost_connections_and_pool_timeouts_are_transient() {
    for e in [
        sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed,
        sqlx::Error::WorkerCrashed,
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
    ] {
        let e = StoreError::Database(e);
        assert!(e.is_transient(), "{e:?}");
    }
    assert!(StoreError::Closed.is_transient());
}

#[test]
fn sqlite_busy_and_locked_are_transient_full_and_constraints_are_not() {
    for code in [
        rusqlite::ffi::SQLITE_BUSY,
        rusqlite::ffi::SQLITE_LOCKED,
        rusqlite::ffi::SQLITE_BUSY_SNAPSHOT,
        rusqlite::ffi::SQLITE_CANTOPEN,
    ] {
        assert!(sqlite(code).is_transient(), "code {code}");
    }
    let full = sqlite(rusqlite::ffi::SQLITE_FULL);
    assert_eq!(full.class(), ErrorClass::Full);
    assert!(!full.is_transient());
    for code in [
        rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE,
        rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY,
        rusqlite::ffi::SQLITE_CORRUPT,
        rusqlite::ffi::SQLITE_MISMATCH,
    ] {
        assert!(!sqlite(code).is_transient(), "code {code}");
    }
    assert!(sqlite(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE).is_unique_violation());
    assert_eq!(
        sqlite_class(rusqlite::ffi::SQLITE_IOERR_WRITE),
        ErrorClass::Other
    );
}

#[test]
fn postgres_connection_serialization_and_deadlock_states_are_unavailable() {
    for state in [
        "08000", "08003", "08006", "53300", "57P01", "57P02", "57P03", "40001", "40P01",
    ] {
        assert_eq!(postgres_class(state), ErrorClass::Unavailable, "{state}");
    }
    assert_eq!(postgres_class("53100"), ErrorClass::Full);
    // unique_violation, foreign_key_violation, not_null_violation,
    // invalid_text_representation, undefined_table.
    for state in ["23505", "23503", "23502", "22P02", "42P01"] {
        assert_eq!(postgres_class(state), ErrorClass::Other, "{state}");
    }
}

#[test]
fn data_and_usage_errors_are_permanent() {
    let json = serde_json::from_str::<u32>("x").expect_err("not JSON");
    let permanent = [
        StoreError::Json {
            id: "t".to_owned(),
            source: json,
        },
        StoreError::Database(sqlx::Error::RowNotFound),
        StoreError::Database(sqlx::Error::ColumnNotFound("status".to_owned())),
        StoreError::Setup {
            what: "creating the temporary directory",
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        },
        StoreError::QueueFull { depth: 3, max: 3 },
        StoreError::IdempotencyConflict {
            index: 0,
            key: "k".to_owned(),
            existing: "t".to_owned(),
        },
        StoreError::BadCursor("x".to_owned()),
        StoreError::NoDirectory {
            dir: "/nonexistent".into(),
        },
        StoreError::NoDatabase {
            name: "tasks".to_owned(),
        },
        StoreError::BadUrl("mysql://".to_owned()),
    ];
    for e in permanent {
        assert!(!e.is_transient(), "{e:?}");
    }
}

#[tokio::test]
async fn a_unique_violation_reported_through_sqlx_is_permanent() {
    let pool = sqlx::SqlitePool::connect("sqlite::memory:")
        .await
        .expect("in-memory database");
    sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY)")
        .execute(&pool)
        .await
        .expect("create");
    sqlx::query("INSERT INTO t VALUES ('a')")
        .execute(&pool)
        .await
        .expect("first insert");
    let e: StoreError = sqlx::query("INSERT INTO t VALUES ('a')")
        .execute(&pool)
        .await
        .expect_err("a duplicate id")
        .into();
    assert!(e.is_unique_violation(), "{e:?}");
    assert_eq!(e.class(), ErrorClass::Other);
    assert!(!e.is_transient());
}
