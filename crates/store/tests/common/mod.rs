//! What the store's integration suites share: a migrated store per backend (SQLite on a
//! temporary file, PostgreSQL on a fresh database from `workflow-testkit`) and the
//! `both_backends!` macro that runs each test, written once, against both.

// Each suite is its own crate and uses part of this module.
#![allow(dead_code)]

use workflow_store::{Backend, Store};
use workflow_testkit::TempDir;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A migrated store, the URL it was opened with, and whatever must live as long as it.
pub struct TestDb {
    pub store: Store,
    pub url: String,
    _dir: Option<TempDir>,
}

pub async fn sqlite_db() -> Result<TestDb, Box<dyn std::error::Error + Send + Sync>> {
    let (dir, url) = workflow_testkit::temp_sqlite()?;
    let store = Store::connect(&url).await?;
    assert_eq!(store.backend(), Backend::Sqlite);
    store.migrate().await?;
    Ok(TestDb {
        store,
        url,
        _dir: Some(dir),
    })
}

pub async fn postgres_db() -> Result<TestDb, Box<dyn std::error::Error + Send + Sync>> {
    let url = workflow_testkit::postgres_url().await?;
    let store = Store::connect(&url).await?;
    assert_eq!(store.backend(), Backend::Postgres);
    store.migrate().await?;
    Ok(TestDb {
        store,
        url,
        _dir: None,
    })
}

/// `both_backends!(a, b)` runs `async fn a(store: Store) -> TestResult` (and `b`) on SQLite and
/// on PostgreSQL; `both_backends!(url; a)` passes `(store, &url)`.
#[macro_export]
macro_rules! both_backends {
    (@each $module:ident, $make:ident, $args:ident, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> $crate::common::TestResult {
                    let db = $crate::common::$make().await?;
                    $crate::both_backends!(@call $args, super::$name, db)
                }
            )*
        }
    };
    (@call store, $f:path, $db:ident) => { $f($db.store.clone()).await };
    (@call url, $f:path, $db:ident) => { $f($db.store.clone(), &$db.url).await };
    (url; $($name:ident),* $(,)?) => {
        $crate::both_backends!(@each sqlite, sqlite_db, url, $($name),*);
        $crate::both_backends!(@each postgres, postgres_db, url, $($name),*);
    };
    ($($name:ident),* $(,)?) => {
        $crate::both_backends!(@each sqlite, sqlite_db, store, $($name),*);
        $crate::both_backends!(@each postgres, postgres_db, store, $($name),*);
    };
}
