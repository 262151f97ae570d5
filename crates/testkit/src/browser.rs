//! A WebDriver endpoint and a headless Chromium for browser tests (the dashboard's).
//!
//! [`webdriver`] finds one in this order:
//! 1. `WEBDRIVER_URL`, if set: a chromedriver (or Selenium) you run.
//! 2. Debian's `chromedriver` (package `chromium-driver`; `CHROMEDRIVER` names another binary)
//!    started as a child process on a free local port, killed when the [`WebDriver`] drops.
//!
//! The browser is Debian's `chromium` (`CHROMIUM` names another binary); chromedriver starts
//! one per session with [`CHROMIUM_ARGS`]. If either is missing, the error says how to install
//! them: browser tests fail, never skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::TestkitError;

/// Headless, without the sandbox (CI runs as root, where Chromium's sandbox refuses to start),
/// and without the background connections a closed network answers with errors.
pub const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
];

/// How long chromedriver may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A WebDriver server: its URL, and the process when this harness started it.
pub struct WebDriver {
    pub url: String,
    /// The browser binary sessions should start.
    pub chromium: PathBuf,
    _process: Option<Child>,
}

/// The browser binary: `CHROMIUM`, else the first of `/usr/bin/chromium`,
/// `/usr/bin/chromium-browser` that exists.
pub fn chromium_binary() -> Result<PathBuf, TestkitError> {
    find(
        "CHROMIUM",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    )
}

/// A WebDriver endpoint (see the module docs).
pub async fn webdriver() -> Result<WebDriver, TestkitError> {
    let chromium = chromium_binary()?;
    if let Ok(url) = std::env::var("WEBDRIVER_URL") {
        return Ok(WebDriver {
            url,
            chromium,
            _process: None,
        });
    }
    let driver = find("CHROMEDRIVER", &["/usr/bin/chromedriver"])?;
    let port = free_port()?;
    let mut process = Command::new(&driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| TestkitError::Io {
            action: format!("starting {}", driver.display()),
            source,
        })?;
    let deadline = Instant::now() + START_TIMEOUT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = process.try_wait() {
            return Err(TestkitError::Command {
                command: format!("{} --port={port}", driver.display()),
                status: status.to_string(),
                output: "it exited before listening".into(),
            });
        }
        if Instant::now() > deadline {
            return Err(TestkitError::Timeout {
                what: format!("{} listening on port {port}", driver.display()),
                seconds: START_TIMEOUT.as_secs(),
                detail: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(WebDriver {
        url: format!("http://127.0.0.1:{port}"),
        chromium,
        _process: Some(process),
    })
}

fn find(env: &str, candidates: &[&str]) -> Result<PathBuf, TestkitError> {
    if let Ok(path) = std::env::var(env) {
        return Ok(PathBuf::from(path));
    }
    candidates
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(Path::to_path_buf)
        .ok_or_else(|| TestkitError::NoBrowser {
            missing: format!("none of {} (or set {env})", candidates.join(", ")),
        })
}

/// A port nothing listens on now (the OS picks it; a race with another binder is possible
/// but harmless here: chromedriver would fail to start and the test say so).
fn free_port() -> Result<u16, TestkitError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| TestkitError::Io {
            action: "finding a free port".into(),
            source,
        })
}
