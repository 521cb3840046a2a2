//! Host memory pressure, as the concurrency limiter ([`crate::limiter`])
//! sees it: the kernel's pressure stall information (`some avg10` of
//! `/proc/pressure/memory`, the share of the last 10 s in which at least one
//! task waited for memory) and the share of memory still available
//! (`MemAvailable / MemTotal` of `/proc/meminfo`).
//!
//! The parsers take the files' text, so they are tested on strings;
//! [`read_host`] is the only function here that touches the host.

use std::path::Path;

/// One reading of the host's memory. Either part is `None` when the host
/// does not provide it (no PSI: a kernel without `CONFIG_PSI`, or booted
/// with `psi=0`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryReading {
    /// PSI `some avg10` of memory, in percent (0 to 100).
    pub stall_percent: Option<f64>,
    /// `MemAvailable / MemTotal`, from 0 to 1.
    pub available_ratio: Option<f64>,
}

/// The `some avg10` value (percent) of a `/proc/pressure/memory` text:
///
/// ```text
/// some avg10=1.53 avg60=0.87 avg300=0.22 total=123456
/// full avg10=0.00 avg60=0.00 avg300=0.00 total=0
/// ```
pub fn parse_psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let value = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("avg10="))?
        .parse::<f64>()
        .ok()?;
    (value.is_finite() && value >= 0.0).then_some(value.min(100.0))
}

/// `MemAvailable / MemTotal` of a `/proc/meminfo` text (values in kB):
///
/// ```text
/// MemTotal:       24684084 kB
/// MemFree:         1234567 kB
/// MemAvailable:   20034772 kB
/// ```
pub fn parse_meminfo_available_ratio(text: &str) -> Option<f64> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable")?;
    (total > 0).then(|| (available as f64 / total as f64).min(1.0))
}

/// Reads the host's memory pressure from `/proc`. A file that cannot be
/// read or parsed leaves its part `None`. Both are small procfs files, read
/// in microseconds.
pub fn read_host() -> MemoryReading {
    read_from(Path::new("/proc"))
}

fn read_from(proc: &Path) -> MemoryReading {
    let read = |name: &str| std::fs::read_to_string(proc.join(name)).ok();
    MemoryReading {
        stall_percent: read("pressure/memory").and_then(|t| parse_psi_some_avg10(&t)),
        available_ratio: read("meminfo").and_then(|t| parse_meminfo_available_ratio(&t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_some_avg10_is_read_from_the_some_line() {
        let text = "some avg10=12.50 avg60=3.10 avg300=0.80 total=987654\n\
                    full avg10=40.00 avg60=1.00 avg300=0.20 total=12345\n";
        assert_eq!(parse_psi_some_avg10(text), Some(12.5));
    }

    #[test]
    fn psi_of_an_idle_host_is_zero() {
        let text = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi_some_avg10(text), Some(0.0));
    }

    #[test]
    fn psi_without_a_some_line_or_avg10_is_none() {
        assert_eq!(parse_psi_some_avg10(""), None);
        assert_eq!(
            parse_psi_some_avg10("full avg10=5.00 avg60=0.00 avg300=0.00 total=0\n"),
            None
        );
        assert_eq!(
            parse_psi_some_avg10("some avg60=1.00 avg300=0.00 total=0\n"),
            None
        );
        assert_eq!(parse_psi_some_avg10("some avg10=lots total=0\n"), None);
        assert_eq!(parse_psi_some_avg10("some avg10=-1.0 total=0\n"), None);
    }

    #[test]
    fn meminfo_gives_the_available_share() {
        let text = "MemTotal:       1000000 kB\n\
                    MemFree:         100000 kB\n\
                    MemAvailable:    250000 kB\n\
                    Buffers:          10000 kB\n";
        assert_eq!(parse_meminfo_available_ratio(text), Some(0.25));
    }

    #[test]
    fn meminfo_does_not_confuse_similar_names() {
        // "MemAvailableX" or a field that only starts with the name must not match.
        let text = "MemTotalX: 1 kB\nMemTotal: 400 kB\nMemAvailable: 100 kB\n";
        assert_eq!(parse_meminfo_available_ratio(text), Some(0.25));
    }

    #[test]
    fn meminfo_without_mem_available_or_with_zero_total_is_none() {
        // Kernels before 3.14 have no MemAvailable.
        assert_eq!(
            parse_meminfo_available_ratio("MemTotal: 1000 kB\nMemFree: 10 kB\n"),
            None
        );
        assert_eq!(
            parse_meminfo_available_ratio("MemTotal: 0 kB\nMemAvailable: 0 kB\n"),
            None
        );
        assert_eq!(parse_meminfo_available_ratio(""), None);
    }

    #[test]
    fn a_missing_proc_gives_an_empty_reading() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(read_from(dir.path()), MemoryReading::default());
    }

    #[test]
    fn files_laid_out_as_in_proc_are_read() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("pressure")).expect("mkdir");
        std::fs::write(
            dir.path().join("pressure/memory"),
            "some avg10=2.00 avg60=0.00 avg300=0.00 total=1\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal: 200 kB\nMemAvailable: 50 kB\n",
        )
        .expect("write");
        assert_eq!(
            read_from(dir.path()),
            MemoryReading {
                stall_percent: Some(2.0),
                available_ratio: Some(0.25),
            }
        );
    }
}
