//! The machine a report was measured on: CPU model, cores, RAM, kernel,
//! cgroup version, distribution, runtime versions, build profile; and the
//! exact command line.

use std::collections::BTreeMap;

use serde::Serialize;

/// What the report says about the machine.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// CPUs this process may use.
    pub cores: usize,
    /// MemTotal, GiB.
    pub ram_gib: f64,
    /// /proc/sys/kernel/osrelease.
    pub kernel: String,
    /// "cgroup v1", "cgroup v2", or why none was found.
    pub cgroup: String,
    /// PRETTY_NAME of /etc/os-release.
    pub os: String,
    /// Runtime name → version, of the runtimes measured.
    pub runtimes: BTreeMap<String, String>,
    /// "release" or "debug" (a debug build's numbers are not the product's).
    pub build: String,
    /// Load averages (1, 5, 15 min) when the run started.
    pub load_average: String,
    /// The sandbox launcher binary the engines start.
    pub launcher: String,
}

impl Machine {
    /// Reads the machine description.
    pub fn detect(cgroup: String, runtimes: BTreeMap<String, String>, launcher: String) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let ram_kib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "unknown".into());
        let load = read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            cpu_model,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            ram_gib: (ram_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cgroup,
            os,
            runtimes,
            build: if cfg!(debug_assertions) {
                "debug".into()
            } else {
                "release".into()
            },
            load_average: load,
            launcher,
        }
    }

    /// One line for the report's header.
    pub fn describe(&self) -> String {
        let rts: Vec<String> = self
            .runtimes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        format!(
            "{}, {} cores, {} GiB RAM, Linux {}, {}, {}; {}; {} build, launcher {}; load {} at start",
            self.cpu_model,
            self.cores,
            self.ram_gib,
            self.kernel,
            self.cgroup,
            self.os,
            rts.join(", "),
            self.build,
            self.launcher,
            self.load_average
        )
    }
}

/// The command line as typed, quoted for a POSIX shell where needed.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--runtimes=bash,node"), "--runtimes=bash,node");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
