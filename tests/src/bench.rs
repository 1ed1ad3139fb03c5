// SPDX-License-Identifier: Apache-2.0
//! What the benchmarks share: the broker they measure and how they sum up
//! a run's samples.

use std::time::Duration;

/// A broker with one `echo` tool that root (the bench) may call and
/// delegate, and a state directory for tokens.
pub const ECHO_CONFIG: &str = r#"
[broker]
socket = "{socket}"
socket_mode = "0666"
state_dir = "{dir}/state"

[[principal]]
name = "bench"
uids = [0]
may_call = ["echo"]
may_delegate = ["echo"]

[[tool]]
name = "echo"
kind = "echo"
params.message = { type = "string", max_len = 100 }
"#;

/// Percentiles and mean of one kind of measurement.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub mean: Duration,
}

impl Stats {
    /// Sum up samples (at least one).
    pub fn of(mut samples: Vec<Duration>) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
        let total: Duration = samples.iter().sum();
        Stats {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            mean: total / samples.len() as u32,
        }
    }
}

/// Microseconds, for printing.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
