//! CPU time of processes and threads, read from `/proc` (Linux).
//!
//! `getrusage` would need `unsafe` (the workspace forbids it), so the figures come from
//! `/proc/<pid>/stat` (all threads of a process, plus its waited-for children) and
//! `/proc/thread-self/stat` (the calling thread). Both count in clock ticks of `USER_HZ`, which
//! Linux fixes at 100 per second for user space on every architecture it supports.

/// Clock ticks per second in `/proc/*/stat` (`USER_HZ`).
const TICKS_PER_S: f64 = 100.0;

/// CPU time read from one `stat` file, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// User plus system time of the process (or thread) itself.
    pub own_s: f64,
    /// User plus system time of its children that it has waited for.
    pub children_s: f64,
}

impl CpuTimes {
    pub fn total_s(&self) -> f64 {
        self.own_s + self.children_s
    }
}

/// Why CPU time could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse {path}")]
    Parse { path: String },
}

/// Parse the content of a `/proc/.../stat` file. The command name (field 2) is in parentheses
/// and may itself contain spaces or parentheses, so fields are counted after the last `)`.
pub fn parse_stat(content: &str) -> Option<CpuTimes> {
    let rest = &content[content.rfind(')')? + 1..];
    // After `)`: field 3 (state) is index 0, so utime (14) is 11, stime 12, cutime 13, cstime 14.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Option<f64> { fields.get(i)?.parse::<u64>().ok().map(|t| t as f64) };
    Some(CpuTimes {
        own_s: (tick(11)? + tick(12)?) / TICKS_PER_S,
        children_s: (tick(13)? + tick(14)?) / TICKS_PER_S,
    })
}

fn read(path: &str) -> Result<CpuTimes, CpuError> {
    let content = std::fs::read_to_string(path).map_err(|source| CpuError::Read {
        path: path.to_string(),
        source,
    })?;
    parse_stat(&content).ok_or_else(|| CpuError::Parse {
        path: path.to_string(),
    })
}

/// This process: every thread of it.
pub fn this_process() -> Result<CpuTimes, CpuError> {
    read("/proc/self/stat")
}

/// The calling thread only.
pub fn this_thread() -> Result<CpuTimes, CpuError> {
    read("/proc/thread-self/stat")
}

/// Another process, by pid.
pub fn process(pid: u32) -> Result<CpuTimes, CpuError> {
    read(&format!("/proc/{pid}/stat"))
}

/// The sum over `pids`, children included.
pub fn processes_total_s(pids: &[u32]) -> Result<f64, CpuError> {
    pids.iter()
        .try_fold(0.0, |sum, pid| Ok(sum + process(*pid)?.total_s()))
}

/// A service the distributed runtime runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Postgres,
    Kafka,
}

/// Which service a process is: a PostgreSQL process (`comm` is `postgres`: the postmaster and
/// its backends) or a Kafka broker (a JVM whose command line runs `kafka.Kafka`).
fn service_of(comm: &str, cmdline: &[u8]) -> Option<Service> {
    if comm == "postgres" {
        Some(Service::Postgres)
    } else if comm == "java" && cmdline.windows(11).any(|w| w == b"kafka.Kafka") {
        Some(Service::Kafka)
    } else {
        None
    }
}

/// CPU seconds used so far by the local services, per service.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServicesCpu {
    pub postgres_s: f64,
    pub kafka_s: f64,
}

impl ServicesCpu {
    pub fn total_s(&self) -> f64 {
        self.postgres_s + self.kafka_s
    }

    /// What was used between `before` and `self` (never negative).
    pub fn since(&self, before: &ServicesCpu) -> ServicesCpu {
        ServicesCpu {
            postgres_s: (self.postgres_s - before.postgres_s).max(0.0),
            kafka_s: (self.kafka_s - before.kafka_s).max(0.0),
        }
    }
}

/// CPU seconds used so far by every PostgreSQL and Kafka broker process on this machine,
/// children included (the postmaster's waited-for children are its exited backends, so a
/// backend that ends between two readings still counts once); `None` when there is none
/// (the services run elsewhere). A process that ends while `/proc` is read is skipped.
pub fn local_services() -> Option<ServicesCpu> {
    let entries = std::fs::read_dir("/proc").ok()?;
    let mut found = false;
    let mut sum = ServicesCpu::default();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let Some(service) = service_of(comm.trim_end(), &cmdline) else {
            continue;
        };
        if let Ok(times) = process(pid) {
            found = true;
            match service {
                Service::Postgres => sum.postgres_s += times.total_s(),
                Service::Kafka => sum.kafka_s += times.total_s(),
            }
        }
    }
    found.then_some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_an_awkward_name() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 4 0 \
                    1000 0 0";
        let t = parse_stat(line).unwrap_or_default();
        assert!((t.own_s - 3.0).abs() < 1e-9, "{t:?}");
        assert!((t.children_s - 0.1).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(parse_stat("no parenthesis here"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn services_are_postgres_and_the_kafka_broker() {
        assert_eq!(
            service_of("postgres", b"postgres: checkpointer"),
            Some(Service::Postgres)
        );
        assert_eq!(
            service_of("java", b"java\0-Xmx512m\0kafka.Kafka\0server.properties"),
            Some(Service::Kafka)
        );
        assert_eq!(service_of("java", b"java\0-jar\0other.jar"), None);
        assert_eq!(service_of("payos-workflows", b"payos-workflows\0api"), None);
    }

    #[test]
    fn services_cpu_since_an_earlier_reading() {
        let before = ServicesCpu {
            postgres_s: 1.0,
            kafka_s: 2.0,
        };
        let after = ServicesCpu {
            postgres_s: 1.5,
            kafka_s: 4.0,
        };
        let used = after.since(&before);
        assert_eq!(
            used,
            ServicesCpu {
                postgres_s: 0.5,
                kafka_s: 2.0
            }
        );
        assert!((used.total_s() - 2.5).abs() < 1e-9);
        // A process that ended between the readings takes its time with it: never negative.
        assert_eq!(before.since(&after), ServicesCpu::default());
    }

    #[test]
    fn reads_its_own_process() {
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(this_process().is_ok());
            assert!(this_thread().is_ok());
        }
    }
}
