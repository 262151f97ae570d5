//! The host probe: a fixed piece of work timed before a bench, so that figures taken in
//! different hours can be set against the host's speed in each.
//!
//! This machine's speed moves 2-3x between hours: round 8's build made 2,000+ embedded
//! instances/s in its hour and 860-930/s ten sessions later (docs/benchmarks.md, round 18), and
//! the load average does not show it (round 19's slow runs started at 0.5-2). The probe
//! times what the engine's work is made of: hashing (the audit chain), JSON parsed and written
//! (allocator included), and a loopback TCP round trip between two threads (the kernel's socket
//! path and a wake-up, what every HTTP call and every cross-thread hand-off pays). Each is the
//! best of three tries: the host's speed, not the noise of one try. Last, how many cores' worth
//! of work the machine does at once: the same JSON work on every core together against one
//! alone (round 19: this "2-core" machine did 1.2-2.0 cores' worth from one run to the next).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Bytes hashed per try.
const HASH_BYTES: usize = 16 << 20;
/// Times the seed template is parsed and written per try.
const JSON_ROUNDS: usize = 1_000;
/// Round trips per try.
const ROUND_TRIPS: u32 = 2_000;
const TRIES: usize = 3;

/// What the probe measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// SHA-256 of 16 MiB, in 64 KiB updates.
    pub sha256_16mib_ms: f64,
    /// The seed template parsed into a `serde_json::Value` and written back, 1,000 times.
    pub json_1000_ms: f64,
    /// One byte there and back over loopback TCP between two threads; `None` when no socket
    /// could be opened.
    pub loopback_rtt_us: Option<f64>,
    /// The cores' worth of work done when every core does the JSON work at once: `cores` x (the
    /// time one thread alone took) / (the time `cores` threads together took).
    pub parallel_cores: f64,
}

impl Probe {
    /// Time the pieces of work (about a second on this machine), `cores` threads at once for
    /// [`Probe::parallel_cores`].
    pub fn run(template: &str, cores: usize) -> Probe {
        let cores = cores.max(1);
        Probe {
            sha256_16mib_ms: best_ms(hash),
            json_1000_ms: best_ms(|| json_rounds(template)),
            loopback_rtt_us: (0..TRIES)
                .filter_map(|_| loopback_try().ok())
                .map(|total| total.as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS))
                .reduce(f64::min),
            parallel_cores: parallel_cores(template, cores),
        }
    }

    /// The line printed with the figures.
    pub fn line(&self) -> String {
        let rtt = self
            .loopback_rtt_us
            .map_or_else(|| "n/a".to_string(), |us| format!("{us:.1} µs"));
        format!(
            "host probe (best of {TRIES}): SHA-256 of 16 MiB {:.1} ms, the seed template parsed \
             and written 1,000 times {:.1} ms, a loopback TCP round trip {rtt}; every core \
             at once did {:.2} cores' worth (median of {TRIES})",
            self.sha256_16mib_ms, self.json_1000_ms, self.parallel_cores
        )
    }

    /// The JSON summary's `machine.probe` object.
    pub fn to_json(&self) -> Value {
        json!({
            "sha256_16mib_ms": round2(self.sha256_16mib_ms),
            "json_1000_ms": round2(self.json_1000_ms),
            "loopback_rtt_us": self.loopback_rtt_us.map(round2),
            "parallel_cores": round2(self.parallel_cores),
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The fastest of [`TRIES`] runs of `work`, in milliseconds.
fn best_ms(mut work: impl FnMut() -> usize) -> f64 {
    (0..TRIES)
        .map(|_| seconds(&mut work) * 1e3)
        .fold(f64::INFINITY, f64::min)
}

/// How long `work` took, in seconds.
fn seconds(work: impl FnOnce() -> usize) -> f64 {
    let started = Instant::now();
    // What the work returns is kept alive, so it is not optimised away.
    std::hint::black_box(work());
    started.elapsed().as_secs_f64()
}

fn hash() -> usize {
    let chunk = vec![0x5a_u8; 64 << 10];
    let mut hasher = Sha256::new();
    for _ in 0..HASH_BYTES / chunk.len() {
        hasher.update(&chunk);
    }
    hasher.finalize()[0].into()
}

fn json_rounds(template: &str) -> usize {
    let mut written = 0;
    for _ in 0..JSON_ROUNDS {
        let doc: Value = serde_json::from_str(template).unwrap_or(Value::Null);
        written += serde_json::to_vec(&doc).map_or(0, |bytes| bytes.len());
    }
    written
}

/// The seed template parsed and written per thread for [`parallel_cores`]: branchy code and
/// the allocator, like the engine's, for ~100 ms here, so that the threads' start-up is noise.
/// (SHA-256 on two threads did 1.9 cores' worth in the same minutes as two integer loops of a
/// few seconds did 1.3-1.5: the SHA extensions are not what the cores share.)
const PARALLEL_ROUNDS: usize = 10 * JSON_ROUNDS;

/// `cores` x (one thread alone) / (`cores` threads together), the median of [`TRIES`] such
/// pairs, each timed back to back (the host's speed drifts within a second).
fn parallel_cores(template: &str, cores: usize) -> f64 {
    let work = || -> usize {
        (0..PARALLEL_ROUNDS / JSON_ROUNDS)
            .map(|_| json_rounds(template))
            .sum()
    };
    let mut ratios: Vec<f64> = (0..TRIES)
        .map(|_| {
            let alone = seconds(work);
            let together = seconds(|| {
                std::thread::scope(|scope| {
                    let threads: Vec<_> = (0..cores).map(|_| scope.spawn(work)).collect();
                    threads
                        .into_iter()
                        .map(|t| t.join().unwrap_or_default())
                        .sum()
                })
            });
            if together > 0.0 {
                cores as f64 * alone / together
            } else {
                cores as f64
            }
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[TRIES / 2]
}

/// [`ROUND_TRIPS`] one-byte round trips to an echoing thread; the total time.
fn loopback_try() -> std::io::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut peer, _) = listener.accept()?;
        peer.set_nodelay(true)?;
        let mut byte = [0_u8; 1];
        for _ in 0..ROUND_TRIPS {
            peer.read_exact(&mut byte)?;
            peer.write_all(&byte)?;
        }
        Ok(())
    });
    let mut client = TcpStream::connect(addr)?;
    client.set_nodelay(true)?;
    // A stuck echo thread fails the try instead of hanging the bench.
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [1_u8; 1];
    let started = Instant::now();
    for _ in 0..ROUND_TRIPS {
        client.write_all(&byte)?;
        client.read_exact(&mut byte)?;
    }
    let total = started.elapsed();
    drop(client);
    echo.join()
        .map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_times_each_piece_of_work() {
        let probe = Probe::run(r#"{"name": "t", "steps": [{"type": "condition"}]}"#, 2);
        assert!(probe.sha256_16mib_ms > 0.0 && probe.sha256_16mib_ms.is_finite());
        assert!(probe.json_1000_ms > 0.0 && probe.json_1000_ms.is_finite());
        let rtt = probe.loopback_rtt_us.unwrap_or(-1.0);
        // A round trip is a few µs at best and far below a second even on a loaded host.
        assert!(rtt > 0.0 && rtt < 1e6, "{rtt}");
        // Two threads do more than nothing. Not "at most 2": this host's speed can halve
        // between the timing of one thread alone and of two together.
        let cores = probe.parallel_cores;
        assert!(cores > 0.0 && cores < 8.0, "{cores}");
        let summary = probe.to_json();
        assert_eq!(summary.as_object().map(|o| o.len()), Some(4), "{summary}");
        assert!(probe
            .line()
            .starts_with("host probe (best of 3): SHA-256 of 16 MiB "));
    }

    #[test]
    fn the_summary_rounds_to_hundredths_and_says_when_there_was_no_socket() {
        let probe = Probe {
            sha256_16mib_ms: 41.234_56,
            json_1000_ms: 30.0,
            loopback_rtt_us: None,
            parallel_cores: 1.456,
        };
        assert_eq!(
            probe.to_json(),
            json!({"sha256_16mib_ms": 41.23, "json_1000_ms": 30.0, "loopback_rtt_us": null,
                   "parallel_cores": 1.46})
        );
        assert!(probe.line().ends_with(
            "a loopback TCP round trip n/a; every core at once did 1.46 cores' worth (median of 3)"
        ));
    }
}
