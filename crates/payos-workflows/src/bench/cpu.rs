//! CPU time of processes and threads, and of the whole machine, read from `/proc` (Linux).
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

/// The busy CPU time of the whole machine so far: every core, every process (ours, the
/// services', and whatever else shares the cores).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineCpu {
    pub busy_s: f64,
    /// The cores `/proc/stat` counts.
    pub cores: usize,
    /// When it was read.
    pub at: std::time::Instant,
}

/// What the rest of the machine used while a bench measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Others {
    /// CPU seconds not accounted to the processes the bench measures.
    pub cpu_s: f64,
    /// Between the two readings, in seconds.
    pub window_s: f64,
}

impl Others {
    /// How many cores the rest of the machine kept busy on average.
    pub fn cores(&self) -> f64 {
        self.cpu_s / self.window_s.max(0.001)
    }
}

/// Parse `/proc/stat`: its first line sums every core (user, nice, system, idle, iowait, irq,
/// softirq, steal...; guest time is already inside user); busy is all but idle and iowait.
pub fn parse_proc_stat(content: &str) -> Option<MachineCpu> {
    let mut lines = content.lines();
    let total = lines.next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = total
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let tick = |i: usize| ticks.get(i).copied().unwrap_or(0);
    if ticks.len() < 4 {
        return None;
    }
    let busy = tick(0) + tick(1) + tick(2) + tick(5) + tick(6) + tick(7);
    let cores = lines
        .map_while(|l| l.strip_prefix("cpu"))
        .filter(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        .count();
    Some(MachineCpu {
        busy_s: busy as f64 / TICKS_PER_S,
        cores,
        at: std::time::Instant::now(),
    })
}

/// The machine's busy CPU so far, when `/proc/stat` can be read.
pub fn machine() -> Option<MachineCpu> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The CPU the machine spent between `before` and `after` on anything but `measured_s`
/// seconds of the processes a bench accounts for: other tenants of a shared host, other
/// processes. `None` unless `/proc/stat` counts exactly the cores this process may use (in a
/// container limited to some of a host's cores it counts them all, and the figure would mix
/// in cores the bench never ran on).
pub fn others(
    before: Option<MachineCpu>,
    after: Option<MachineCpu>,
    measured_s: f64,
) -> Option<Others> {
    let (before, after) = (before?, after?);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    (after.cores == cores && before.cores == cores).then(|| Others {
        cpu_s: (after.busy_s - before.busy_s - measured_s).max(0.0),
        window_s: after.at.saturating_duration_since(before.at).as_secs_f64(),
    })
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
    fn the_machine_is_busy_outside_idle_and_iowait() {
        let stat = "cpu  4941464 10 598334 7758107 32797 5 66649 26294 0 0\n\
                    cpu0 2465714 0 286654 3905027 7097 0 34814 13207 0 0\n\
                    cpu1 2475750 10 311680 3853079 25700 5 31834 13087 0 0\n\
                    intr 123 4 5\nctxt 99\n";
        let m = parse_proc_stat(stat).expect("parses");
        let busy = 4941464 + 10 + 598334 + 5 + 66649 + 26294;
        assert!((m.busy_s - busy as f64 / 100.0).abs() < 1e-6, "{m:?}");
        assert_eq!(m.cores, 2);
        assert_eq!(parse_proc_stat("intr 1 2\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 x 3 4\n"), None);
    }

    #[test]
    fn others_are_the_busy_time_not_measured() {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let start = std::time::Instant::now();
        let at = |busy_s, after_s| {
            Some(MachineCpu {
                busy_s,
                cores,
                at: start + std::time::Duration::from_secs(after_s),
            })
        };
        let o = others(at(100.0, 0), at(110.0, 5), 7.5).expect("same cores");
        assert_eq!(o.cpu_s, 2.5);
        assert_eq!(o.window_s, 5.0);
        assert_eq!(o.cores(), 0.5);
        // Never negative: readings are not taken at the same instant.
        assert_eq!(
            others(at(100.0, 0), at(110.0, 5), 12.0).map(|o| o.cpu_s),
            Some(0.0)
        );
        // A /proc/stat that counts other cores than this process may use says nothing.
        let host = Some(MachineCpu {
            busy_s: 120.0,
            cores: cores + 4,
            at: start,
        });
        assert_eq!(others(at(100.0, 0), host, 1.0), None);
        assert_eq!(others(None, at(110.0, 5), 1.0), None);
    }

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
