//! Fresh PostgreSQL databases for tests: from `DATABASE_URL`, a local throw-away cluster, or
//! (feature `testcontainers`) a container. See the crate docs for the order and the layout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor, Row};
use tokio::process::Command;
use tokio::sync::OnceCell;

use crate::process::{remove_dir, run, StartLock};
use crate::TestkitError;

const DEFAULT_PORT: u16 = 54329;
/// How long the cluster may take to come up (initdb + start), and to wait for the start lock.
const START_DEADLINE: Duration = Duration::from_secs(120);
/// Test databases of the local cluster older than this are dropped by later runs.
const STALE_AFTER: Duration = Duration::from_secs(3 * 3600);

/// The admin URL this process uses; found once, then shared by every test of the binary.
static ADMIN_URL: OnceCell<String> = OnceCell::const_new();

/// The URL of a FRESH, EMPTY database (`test_<uuidv7>`), created for the caller.
///
/// Fails loudly (never skips) when no PostgreSQL can be had; see the crate docs.
pub async fn postgres_url() -> Result<String, TestkitError> {
    let admin = ADMIN_URL.get_or_try_init(admin_url).await?;
    // UUIDv7: unique across processes, and its timestamp lets later runs drop stale databases.
    let name = format!("test_{}", uuid::Uuid::now_v7().simple());
    let mut conn = PgConnection::connect(admin)
        .await
        .map_err(|source| TestkitError::Database {
            action: format!("connecting to {}", redact(admin)),
            source,
        })?;
    conn.execute(format!("CREATE DATABASE \"{name}\"").as_str())
        .await
        .map_err(|source| TestkitError::Database {
            action: format!("creating database {name}"),
            source,
        })?;
    let _ = conn.close().await;
    Ok(with_database(admin, &name))
}

async fn admin_url() -> Result<String, TestkitError> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.trim().is_empty() {
            return Ok(url);
        }
    }
    let mut attempts = vec!["DATABASE_URL: not set".to_string()];
    match local_cluster().await {
        Ok(url) => {
            drop_stale_databases(&url).await;
            return Ok(url);
        }
        Err(e) => attempts.push(format!("local cluster: {e}")),
    }
    #[cfg(feature = "testcontainers")]
    match container::start().await {
        Ok(url) => return Ok(url),
        Err(e) => attempts.push(format!("testcontainers: {e}")),
    }
    #[cfg(not(feature = "testcontainers"))]
    attempts.push("testcontainers: the `testcontainers` feature is not enabled".to_string());
    Err(TestkitError::NoPostgres { attempts })
}

// ------------------------------------------------------------------------- local cluster

fn port() -> Result<u16, TestkitError> {
    match std::env::var("PAYOS_TEST_PG_PORT") {
        Ok(p) => p.trim().parse().map_err(|_| TestkitError::Command {
            command: "PAYOS_TEST_PG_PORT".into(),
            status: "invalid".into(),
            output: format!("not a port number: {p:?}"),
        }),
        Err(_) => Ok(DEFAULT_PORT),
    }
}

/// Reuse the cluster if it is up; otherwise start it (under a cross-process lock, so the test
/// binaries cargo runs in parallel start it once).
async fn local_cluster() -> Result<String, TestkitError> {
    let port = port()?;
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    if can_connect(&url).await {
        return Ok(url);
    }
    let bindir = find_bindir().await?;
    let root = std::env::temp_dir().join(format!("payos-testkit-pg-{port}"));
    let _lock = StartLock::acquire(&root.with_extension("lock"), START_DEADLINE).await?;
    // Someone else may have started it while we waited for the lock.
    if can_connect(&url).await {
        return Ok(url);
    }
    tracing::info!(root = %root.display(), port, "starting a local PostgreSQL cluster for tests");
    let first = start_cluster(&bindir, &root, port).await;
    if let Err(e) = first {
        // A data dir left by an older PostgreSQL version or a crashed run: start from scratch.
        tracing::warn!(error = %e, "local PostgreSQL did not start; recreating its data dir");
        let _ = pg_ctl_stop(&bindir, &root).await;
        remove_dir(&root)?;
        start_cluster(&bindir, &root, port).await?;
    }
    wait_ready(&url, &root).await?;
    Ok(url)
}

async fn start_cluster(bindir: &Path, root: &Path, port: u16) -> Result<(), TestkitError> {
    let data = root.join("data");
    let as_root = is_root().await;
    if !data.join("PG_VERSION").exists() {
        // A partial data dir from an interrupted initdb would make initdb refuse: remove it.
        remove_dir(root)?;
        std::fs::create_dir_all(root).map_err(|source| TestkitError::Io {
            action: format!("creating {}", root.display()),
            source,
        })?;
        if as_root {
            // initdb refuses to run as root; the data must belong to the user that runs it.
            run(
                Command::new("chown").arg("-R").arg("postgres:").arg(root),
                "chown",
            )
            .await?;
        }
        let mut initdb = server_command(as_root, &bindir.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb, "initdb").await?;
    }
    // Sockets go in the data dir: /var/run/postgresql may not exist or not be writable.
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=300",
        data.display()
    );
    let mut pg_ctl = server_command(as_root, &bindir.join("pg_ctl"));
    pg_ctl
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(root.join("server.log"))
        .args(["-w", "-t", "60", "-o"])
        .arg(options)
        .arg("start");
    run(&mut pg_ctl, "pg_ctl start")
        .await
        .map_err(|e| with_log_tail(e, root))?;
    Ok(())
}

async fn pg_ctl_stop(bindir: &Path, root: &Path) -> Result<(), TestkitError> {
    let mut stop = server_command(is_root().await, &bindir.join("pg_ctl"));
    stop.arg("-D")
        .arg(root.join("data"))
        .args(["-m", "immediate", "-w", "stop"]);
    run(&mut stop, "pg_ctl stop").await
}

/// `program` as itself, or via `runuser -u postgres --` when we are root.
fn server_command(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

async fn is_root() -> bool {
    match Command::new("id").arg("-u").output().await {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim() == "0",
        Err(_) => false,
    }
}

/// The PostgreSQL server binaries: `PAYOS_TEST_PG_BINDIR`, `pg_config --bindir`, or the newest
/// `/usr/lib/postgresql/<major>/bin` (Debian's layout; `pg_config` there may come from libpq-dev
/// alone).
async fn find_bindir() -> Result<PathBuf, TestkitError> {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("PAYOS_TEST_PG_BINDIR") {
        candidates.push(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output().await {
        if out.status.success() {
            candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    Some((major, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    debian.sort();
    candidates.extend(debian.into_iter().rev().map(|(_, dir)| dir));
    candidates
        .iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .cloned()
        .ok_or_else(|| TestkitError::Command {
            command: "find PostgreSQL server binaries (initdb, pg_ctl)".into(),
            status: "not found".into(),
            output: format!(
                "looked in: {} (install the `postgresql` package or set PAYOS_TEST_PG_BINDIR)",
                candidates
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

async fn can_connect(url: &str) -> bool {
    match tokio::time::timeout(Duration::from_secs(3), PgConnection::connect(url)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            true
        }
        _ => false,
    }
}

/// Poll until the server accepts connections, up to a deadline.
async fn wait_ready(url: &str, root: &Path) -> Result<(), TestkitError> {
    let started = Instant::now();
    let mut last_error = String::new();
    while started.elapsed() < START_DEADLINE {
        match tokio::time::timeout(Duration::from_secs(3), PgConnection::connect(url)).await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Ok(Err(e)) => last_error = e.to_string(),
            Err(_) => last_error = "connect timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(TestkitError::Timeout {
        what: format!("PostgreSQL accepting connections at {url}"),
        seconds: START_DEADLINE.as_secs(),
        detail: format!(": {last_error}\n{}", log_tail(root)),
    })
}

/// Drop the local cluster's test databases that earlier runs left behind (their UUIDv7 names
/// carry the creation time). Best effort: failures are logged, never fatal.
async fn drop_stale_databases(admin: &str) {
    let Ok(mut conn) = PgConnection::connect(admin).await else {
        return;
    };
    let names: Vec<String> =
        match sqlx::query("SELECT datname FROM pg_database WHERE datname LIKE 'test\\_%'")
            .fetch_all(&mut conn)
            .await
        {
            Ok(rows) => rows
                .iter()
                .filter_map(|r| r.try_get("datname").ok())
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing stale test databases");
                return;
            }
        };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for name in names {
        let created = name
            .strip_prefix("test_")
            .and_then(|id| uuid::Uuid::parse_str(id).ok())
            .and_then(|id| id.get_timestamp())
            .map(|ts| ts.to_unix().0);
        let Some(created) = created else { continue };
        if now.saturating_sub(created) > STALE_AFTER.as_secs() {
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            if let Err(e) = conn.execute(sql.as_str()).await {
                tracing::warn!(error = %e, database = %name, "dropping a stale test database");
            }
        }
    }
    let _ = conn.close().await;
}

fn log_tail(root: &Path) -> String {
    let path = root.join("server.log");
    match std::fs::read_to_string(&path) {
        Ok(log) => {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            format!("last lines of {}:\n{tail}", path.display())
        }
        Err(_) => format!("(no server log at {})", path.display()),
    }
}

fn with_log_tail(e: TestkitError, root: &Path) -> TestkitError {
    match e {
        TestkitError::Command {
            command,
            status,
            output,
        } => TestkitError::Command {
            command,
            status,
            output: format!("{output}\n{}", log_tail(root)),
        },
        other => other,
    }
}

// ------------------------------------------------------------------------- URLs

/// `admin` with its database (path) replaced by `name`, query string kept.
fn with_database(admin: &str, name: &str) -> String {
    let (base, query) = match admin.find('?') {
        Some(q) => (&admin[..q], &admin[q..]),
        None => (admin, ""),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .unwrap_or(base.len());
    format!("{}/{name}{query}", &base[..authority_end])
}

/// A URL fit for an error message: the password, if any, replaced.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

// ------------------------------------------------------------------------- testcontainers

#[cfg(feature = "testcontainers")]
mod container {
    //! A `postgres` container on a local Docker engine, started once per test process. The
    //! container handle is leaked on purpose so it outlives the test that started it;
    //! testcontainers' reaper removes it when the process ends.

    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;

    pub(super) async fn start() -> Result<String, String> {
        let container = Postgres::default()
            .start()
            .await
            .map_err(|e| format!("starting a postgres container: {e}"))?;
        let host = container
            .get_host()
            .await
            .map_err(|e| format!("container host: {e}"))?;
        let port = container
            .get_host_port_ipv4(5432)
            .await
            .map_err(|e| format!("container port: {e}"))?;
        std::mem::forget(container);
        Ok(format!(
            "postgres://postgres:postgres@{host}:{port}/postgres"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "test_1"),
            "postgres://u:p@h:5432/test_1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "t"), "postgres://u@h/t");
        assert_eq!(
            with_database("postgresql://h:1/", "t"),
            "postgresql://h:1/t"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[tokio::test]
    async fn fresh_databases_are_distinct_and_empty() -> Result<(), Box<dyn std::error::Error>> {
        let a = postgres_url().await?;
        let b = postgres_url().await?;
        assert_ne!(a, b);
        let mut conn = PgConnection::connect(&a).await?;
        let row = sqlx::query("SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&mut conn)
            .await?;
        let n: i64 = row.try_get("n")?;
        assert_eq!(n, 0);
        Ok(())
    }
}
