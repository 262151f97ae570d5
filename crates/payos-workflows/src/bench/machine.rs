//! The machine a bench ran on, as printed with its figures: the CPU model, the cores this
//! process may use, and the load average when the run started (what other tenants of a shared
//! host were doing). Figures from different machines, or taken under different loads, are not
//! comparable; the report says which they were. The [`Probe`] adds the host's speed in the hour.

use serde_json::{json, Value};

use super::probe::Probe;

/// What the bench saw of its machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// `model name` of the first processor in `/proc/cpuinfo`, or `unknown`.
    pub cpu: String,
    pub cores: usize,
    /// The 1-minute load average from `/proc/loadavg`, when there is one.
    pub load_1m: Option<f64>,
    /// The host probe, when the bench ran it.
    pub probe: Option<Probe>,
}

impl Machine {
    /// Read it now (Linux's `/proc`; elsewhere the CPU is `unknown` and the load absent).
    pub fn observe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        Machine {
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_string()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_1m: load_1m(&loadavg),
            probe: None,
        }
    }

    /// The line printed before the JSON summary.
    pub fn line(&self) -> String {
        let load = self
            .load_1m
            .map(|l| format!("; load average {l:.2} at the start"))
            .unwrap_or_default();
        let probe = self
            .probe
            .as_ref()
            .map(|p| format!("\n{}", p.line()))
            .unwrap_or_default();
        format!("machine: {}, {} cores{load}{probe}", self.cpu, self.cores)
    }

    /// The JSON summary's `machine` object.
    pub fn to_json(&self) -> Value {
        let mut summary = json!({ "cpu": self.cpu, "cores": self.cores, "load_1m": self.load_1m });
        if let Some(probe) = &self.probe {
            summary["probe"] = probe.to_json();
        }
        summary
    }
}

/// The first `model name` of a `/proc/cpuinfo` text.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    })
}

/// The first field of a `/proc/loadavg` text.
fn load_1m(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_model_is_the_first_model_name() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.50GHz\n\nprocessor\t: 1\nmodel name\t: Other\n";
        assert_eq!(
            cpu_model(text).as_deref(),
            Some("Intel(R) Xeon(R) Processor @ 2.50GHz")
        );
        assert_eq!(cpu_model("processor\t: 0\n"), None);
    }

    #[test]
    fn the_load_is_the_first_field_of_loadavg() {
        assert_eq!(load_1m("3.17 3.53 2.96 4/812 12345\n"), Some(3.17));
        assert_eq!(load_1m(""), None);
        assert_eq!(load_1m("busy 1 2"), None);
    }

    #[test]
    fn the_summary_names_cpu_cores_and_load() {
        let m = Machine {
            cpu: "AMD EPYC".into(),
            cores: 2,
            load_1m: Some(1.5),
            probe: None,
        };
        assert_eq!(
            m.line(),
            "machine: AMD EPYC, 2 cores; load average 1.50 at the start"
        );
        assert_eq!(
            m.to_json(),
            json!({"cpu": "AMD EPYC", "cores": 2, "load_1m": 1.5})
        );
    }

    #[test]
    fn the_probe_follows_the_machine_line_and_sits_in_its_object() {
        let m = Machine {
            cpu: "AMD EPYC".into(),
            cores: 2,
            load_1m: None,
            probe: Some(Probe {
                sha256_16mib_ms: 40.0,
                json_1000_ms: 30.0,
                loopback_rtt_us: Some(20.0),
                parallel_cores: 1.5,
            }),
        };
        let line = m.line();
        assert!(
            line.starts_with("machine: AMD EPYC, 2 cores\nhost probe (best of 3): "),
            "{line}"
        );
        assert_eq!(m.to_json()["probe"]["loopback_rtt_us"], json!(20.0));
    }
}
