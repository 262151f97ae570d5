//! Helpers for the services tests start as local processes: a cross-process start lock, running
//! a setup command, removing a stale directory.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::TestkitError;

/// An exclusive lock on a file, held while one process starts a shared service. The OS
/// releases it if the holder dies, so a crashed start never wedges later runs.
pub(crate) struct StartLock {
    file: std::fs::File,
}

impl StartLock {
    /// Wait up to `deadline` for the lock.
    pub(crate) async fn acquire(
        path: &Path,
        deadline: Duration,
    ) -> Result<StartLock, TestkitError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| TestkitError::Io {
                action: format!("opening lock file {}", path.display()),
                source,
            })?;
        let started = Instant::now();
        loop {
            // Fully qualified: newer std has an inherent `File::try_lock` with another signature.
            match fs4::FileExt::try_lock(&file) {
                Ok(()) => return Ok(StartLock { file }),
                Err(fs4::TryLockError::WouldBlock) if started.elapsed() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(fs4::TryLockError::WouldBlock) => {
                    return Err(TestkitError::Timeout {
                        what: format!("locking {}", path.display()),
                        seconds: deadline.as_secs(),
                        detail: String::new(),
                    })
                }
                Err(fs4::TryLockError::Error(source)) => {
                    return Err(TestkitError::Io {
                        action: format!("locking {}", path.display()),
                        source,
                    })
                }
            }
        }
    }
}

impl Drop for StartLock {
    fn drop(&mut self) {
        let _ = fs4::FileExt::unlock(&self.file);
    }
}

/// Run a setup command to completion; its output is in the error when it fails.
pub(crate) async fn run(cmd: &mut Command, what: &str) -> Result<(), TestkitError> {
    let command = format!("{:?}", cmd.as_std());
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| TestkitError::Io {
            action: format!("running {what} ({command})"),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TestkitError::Command {
            command,
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// Remove a directory tree; a missing one is fine.
pub(crate) fn remove_dir(dir: &Path) -> Result<(), TestkitError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TestkitError::Io {
            action: format!("removing {}", dir.display()),
            source,
        }),
    }
}
