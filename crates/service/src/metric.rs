//! Every metric the service emits, in one list: its name, type, labels and
//! help text. The code records metrics through these constants
//! (`counter!(metric::RETRIES_TOTAL.name)`), never through a literal name,
//! and [`describe`] registers the help texts with the recorder. The HTTP
//! metrics of `taskexec-api` are listed here too, so that one list covers
//! the whole `/metrics` page.
//!
//! docs/metrics.md documents the same list; the tests of this module check
//! that both agree (names, types, labels) and that every call site of the
//! `metrics` macros in the workspace names a metric of this list, with its
//! type and labels.

/// The type of a metric, as Prometheus exports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows (or is set to a total kept elsewhere).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution, exported with buckets.
    Histogram,
}

impl Kind {
    /// The type's name in docs/metrics.md and in Prometheus.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric: what a call site records and what docs/metrics.md documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The exported name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// The label keys every recording sets, in docs order.
    pub labels: &'static [&'static str],
    /// One line of help, exported as `# HELP`.
    pub help: &'static str,
}

/// Registers the help text of every metric with the installed recorder (a
/// no-op without one). The Prometheus exporter prints it as `# HELP` for the
/// metrics that have been recorded.
pub fn describe() {
    for m in ALL {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

// Tasks

pub const TASKS_SUBMITTED_TOTAL: Metric = Metric {
    name: "taskexec_tasks_submitted_total",
    kind: Kind::Counter,
    labels: &["runtime"],
    help: "Tasks stored by a submission, by runtime.",
};

pub const TASKS_REJECTED_TOTAL: Metric = Metric {
    name: "taskexec_tasks_rejected_total",
    kind: Kind::Counter,
    labels: &["error_type"],
    help: "Submissions refused with 422 (nothing stored), by the rejection's error type.",
};

pub const TASKS_REFUSED_QUEUE_FULL_TOTAL: Metric = Metric {
    name: "taskexec_tasks_refused_queue_full_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Submissions refused with 429 because the queue was full.",
};

pub const TASKS_FINISHED_TOTAL: Metric = Metric {
    name: "taskexec_tasks_finished_total",
    kind: Kind::Counter,
    labels: &["runtime", "status", "error_type"],
    help: "Tasks that reached a final status, by runtime, status and error type.",
};

pub const RETRIES_TOTAL: Metric = Metric {
    name: "taskexec_retries_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Attempts that failed and were put back in the queue for another attempt.",
};

pub const SANDBOX_SETUP_FAILURES_TOTAL: Metric = Metric {
    name: "taskexec_sandbox_setup_failures_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Attempts that ended with ENVIRONMENT_SETUP: the sandbox could not be built.",
};

// Queue and capacity

pub const QUEUE_DEPTH: Metric = Metric {
    name: "taskexec_queue_depth",
    kind: Kind::Gauge,
    labels: &[],
    help: "Tasks waiting in the queue, as counted in the database.",
};

pub const TASKS_RUNNING: Metric = Metric {
    name: "taskexec_tasks_running",
    kind: Kind::Gauge,
    labels: &[],
    help: "Tasks claimed and running on this node.",
};

pub const CPU_CAPACITY_MILLIS: Metric = Metric {
    name: "taskexec_cpu_capacity_millis",
    kind: Kind::Gauge,
    labels: &[],
    help: "CPU this node admits tasks against, in millicores.",
};

pub const MEMORY_CAPACITY_BYTES: Metric = Metric {
    name: "taskexec_memory_capacity_bytes",
    kind: Kind::Gauge,
    labels: &[],
    help: "Memory this node admits tasks against, in bytes.",
};

pub const CPU_ADMITTED_MILLIS: Metric = Metric {
    name: "taskexec_cpu_admitted_millis",
    kind: Kind::Gauge,
    labels: &[],
    help: "Sum of the CPU requests of the tasks running on this node, in millicores.",
};

pub const MEMORY_ADMITTED_BYTES: Metric = Metric {
    name: "taskexec_memory_admitted_bytes",
    kind: Kind::Gauge,
    labels: &[],
    help: "Sum of the memory limits of the tasks running on this node, in bytes.",
};

// Adaptive concurrency

pub const CONCURRENCY_LIMIT: Metric = Metric {
    name: "taskexec_concurrency_limit",
    kind: Kind::Gauge,
    labels: &[],
    help: "Most tasks this node starts to have in flight at once now.",
};

pub const MEMORY_STALL_RATIO: Metric = Metric {
    name: "taskexec_memory_stall_ratio",
    kind: Kind::Gauge,
    labels: &[],
    help: "The host's memory stall, PSI some avg10, as a ratio.",
};

pub const MEMORY_AVAILABLE_RATIO: Metric = Metric {
    name: "taskexec_memory_available_ratio",
    kind: Kind::Gauge,
    labels: &[],
    help: "MemAvailable / MemTotal of the host.",
};

// Warm runner

pub const WARM_POOL_READY: Metric = Metric {
    name: "taskexec_warm_pool_ready",
    kind: Kind::Gauge,
    labels: &[],
    help: "Pre-built sandboxes ready for a task now, all keys together.",
};

pub const WARM_POOL_TARGET: Metric = Metric {
    name: "taskexec_warm_pool_target",
    kind: Kind::Gauge,
    labels: &[],
    help: "Pre-built sandboxes the pools aim to keep ready now, all keys together.",
};

pub const WARM_POOL_KEYS: Metric = Metric {
    name: "taskexec_warm_pool_keys",
    kind: Kind::Gauge,
    labels: &[],
    help: "Keys (runtime and mode, user, limit class) the pools know.",
};

pub const WARM_POOL_HITS_TOTAL: Metric = Metric {
    name: "taskexec_warm_pool_hits_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Tasks that ran in a pre-built sandbox.",
};

pub const WARM_POOL_MISSES_TOTAL: Metric = Metric {
    name: "taskexec_warm_pool_misses_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Tasks that found no ready sandbox of their key and ran in one built for them.",
};

pub const WARM_POOL_CREATED_TOTAL: Metric = Metric {
    name: "taskexec_warm_pool_created_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Sandboxes built ahead of time.",
};

pub const WARM_POOL_DISCARDED_TOTAL: Metric = Metric {
    name: "taskexec_warm_pool_discarded_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Pre-built sandboxes found dead and thrown away.",
};

pub const WARM_POOL_RETIRED_TOTAL: Metric = Metric {
    name: "taskexec_warm_pool_retired_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Pre-built sandboxes destroyed unused.",
};

pub const WARM_POOL_BUILD_FAILURES_TOTAL: Metric = Metric {
    name: "taskexec_warm_pool_build_failures_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Attempts to build a sandbox ahead of time that failed.",
};

pub const FORK_SERVERS: Metric = Metric {
    name: "taskexec_fork_servers",
    kind: Kind::Gauge,
    labels: &[],
    help: "Fork servers running.",
};

pub const FORK_SERVER_SPARES: Metric = Metric {
    name: "taskexec_fork_server_spares",
    kind: Kind::Gauge,
    labels: &[],
    help: "Forked children waiting for a task, all servers together.",
};

pub const FORK_SERVER_RUNS_TOTAL: Metric = Metric {
    name: "taskexec_fork_server_runs_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Tasks handed to a fork-server child.",
};

pub const FORK_SERVER_FALLBACKS_TOTAL: Metric = Metric {
    name: "taskexec_fork_server_fallbacks_total",
    kind: Kind::Counter,
    labels: &["reason"],
    help: "Handler tasks a fork server should have run that ran through the pools or cold instead, by reason.",
};

pub const FORK_SERVERS_RECYCLED_TOTAL: Metric = Metric {
    name: "taskexec_fork_servers_recycled_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Fork servers replaced by a fresh one after their runs or their age.",
};

pub const FORK_SERVER_START_FAILURES_TOTAL: Metric = Metric {
    name: "taskexec_fork_server_start_failures_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Fork servers that failed to start.",
};

pub const FORK_SERVER_STARTS_TOTAL: Metric = Metric {
    name: "taskexec_fork_server_starts_total",
    kind: Kind::Counter,
    labels: &["outcome"],
    help: "Fork-server starts, by outcome: started, failed or refused by the start limits.",
};

pub const FORK_SERVER_START_CPU_SECONDS_TOTAL: Metric = Metric {
    name: "taskexec_fork_server_start_cpu_seconds_total",
    kind: Kind::Gauge,
    labels: &[],
    help: "CPU seconds the fork servers' processes spent starting (only grows).",
};

// Phases and the store

pub const TASK_PHASE_SECONDS: Metric = Metric {
    name: "taskexec_task_phase_seconds",
    kind: Kind::Histogram,
    labels: &["phase"],
    help: "Time per attempt in each phase, in seconds.",
};

pub const STORE_BATCH_WRITES: Metric = Metric {
    name: "taskexec_store_batch_writes",
    kind: Kind::Histogram,
    labels: &[],
    help: "Writes committed per store transaction by the writer task.",
};

// HTTP

pub const HTTP_REQUESTS_TOTAL: Metric = Metric {
    name: "taskexec_http_requests_total",
    kind: Kind::Counter,
    labels: &["method", "route", "status"],
    help: "HTTP requests answered, by method, route template and status.",
};

pub const HTTP_REQUEST_DURATION_SECONDS: Metric = Metric {
    name: "taskexec_http_request_duration_seconds",
    kind: Kind::Histogram,
    labels: &["method", "route"],
    help: "Time from receiving an HTTP request to sending the response's head, in seconds.",
};

pub const HTTP_CONNECTIONS_OPEN: Metric = Metric {
    name: "taskexec_http_connections_open",
    kind: Kind::Gauge,
    labels: &[],
    help: "HTTP connections open now.",
};

pub const HTTP_CONNECTIONS_REFUSED_TOTAL: Metric = Metric {
    name: "taskexec_http_connections_refused_total",
    kind: Kind::Counter,
    labels: &[],
    help: "HTTP connections past the connection limit, answered 503.",
};

pub const HTTP_REQUESTS_REFUSED_TOTAL: Metric = Metric {
    name: "taskexec_http_requests_refused_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Requests on a reserved connection slot for another route, answered 503.",
};

pub const HTTP_CONNECTIONS_TIMED_OUT_TOTAL: Metric = Metric {
    name: "taskexec_http_connections_timed_out_total",
    kind: Kind::Counter,
    labels: &["phase"],
    help: "HTTP connections closed or requests failed for time, by phase.",
};

pub const HTTP_ACCEPT_ERRORS_TOTAL: Metric = Metric {
    name: "taskexec_http_accept_errors_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Failed accept calls.",
};

// Durability

pub const TASKS_SELF_FENCED_TOTAL: Metric = Metric {
    name: "taskexec_tasks_self_fenced_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Running tasks this node stopped because it lost, or could not renew in time, their lease.",
};

pub const TASKS_TAKEN_OVER_TOTAL: Metric = Metric {
    name: "taskexec_tasks_taken_over_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Attempts of other nodes whose lease expired, taken over by this node.",
};

pub const TASKS_QUARANTINED_TOTAL: Metric = Metric {
    name: "taskexec_tasks_quarantined_total",
    kind: Kind::Counter,
    labels: &[],
    help: "Tasks ended FAILED as poison: the attempts lost with their node reached the quarantine threshold.",
};

pub const STORE_PENDING_WRITES: Metric = Metric {
    name: "taskexec_store_pending_writes",
    kind: Kind::Gauge,
    labels: &[],
    help: "Store writes sent to this node's writer and not yet committed.",
};

/// Every metric the service emits, in the order of docs/metrics.md.
pub const ALL: &[Metric] = &[
    TASKS_SUBMITTED_TOTAL,
    TASKS_REJECTED_TOTAL,
    TASKS_REFUSED_QUEUE_FULL_TOTAL,
    TASKS_FINISHED_TOTAL,
    RETRIES_TOTAL,
    SANDBOX_SETUP_FAILURES_TOTAL,
    QUEUE_DEPTH,
    TASKS_RUNNING,
    CPU_CAPACITY_MILLIS,
    MEMORY_CAPACITY_BYTES,
    CPU_ADMITTED_MILLIS,
    MEMORY_ADMITTED_BYTES,
    CONCURRENCY_LIMIT,
    MEMORY_STALL_RATIO,
    MEMORY_AVAILABLE_RATIO,
    WARM_POOL_READY,
    WARM_POOL_TARGET,
    WARM_POOL_KEYS,
    WARM_POOL_HITS_TOTAL,
    WARM_POOL_MISSES_TOTAL,
    WARM_POOL_CREATED_TOTAL,
    WARM_POOL_DISCARDED_TOTAL,
    WARM_POOL_RETIRED_TOTAL,
    WARM_POOL_BUILD_FAILURES_TOTAL,
    FORK_SERVERS,
    FORK_SERVER_SPARES,
    FORK_SERVER_RUNS_TOTAL,
    FORK_SERVER_FALLBACKS_TOTAL,
    FORK_SERVERS_RECYCLED_TOTAL,
    FORK_SERVER_START_FAILURES_TOTAL,
    FORK_SERVER_STARTS_TOTAL,
    FORK_SERVER_START_CPU_SECONDS_TOTAL,
    TASK_PHASE_SECONDS,
    STORE_BATCH_WRITES,
    HTTP_REQUESTS_TOTAL,
    HTTP_REQUEST_DURATION_SECONDS,
    HTTP_CONNECTIONS_OPEN,
    HTTP_CONNECTIONS_REFUSED_TOTAL,
    HTTP_REQUESTS_REFUSED_TOTAL,
    HTTP_CONNECTIONS_TIMED_OUT_TOTAL,
    HTTP_ACCEPT_ERRORS_TOTAL,
    TASKS_SELF_FENCED_TOTAL,
    TASKS_TAKEN_OVER_TOTAL,
    TASKS_QUARANTINED_TOTAL,
    STORE_PENDING_WRITES,
];

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    use super::{ALL, Kind, Metric};

    const KINDS: [Kind; 3] = [Kind::Counter, Kind::Gauge, Kind::Histogram];

    fn crates_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The constant's name of a metric: its name without the prefix, upper case.
    fn const_name(m: &Metric) -> String {
        m.name.trim_start_matches("taskexec_").to_uppercase()
    }

    fn labels(m: &Metric) -> BTreeSet<String> {
        m.labels.iter().map(|l| (*l).to_owned()).collect()
    }

    #[test]
    fn names_are_unique_and_prefixed() {
        let mut seen = BTreeSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("taskexec_"), "{}", m.name);
            assert!(
                m.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                m.name
            );
            if m.kind == Kind::Counter {
                assert!(m.name.ends_with("_total"), "counter {}", m.name);
            }
            assert!(!m.help.is_empty() && !m.help.contains('\n'), "{}", m.name);
        }
    }

    /// The rows of the tables `| metric | type | labels | meaning |` of
    /// docs/metrics.md.
    fn documented() -> BTreeMap<String, (String, BTreeSet<String>)> {
        let path = crates_dir().join("../docs/metrics.md");
        let text = std::fs::read_to_string(&path).expect("docs/metrics.md");
        let mut rows = BTreeMap::new();
        let mut in_table = false;
        for line in text.lines() {
            if line.starts_with("| metric | type | labels |") {
                in_table = true;
                continue;
            }
            in_table &= line.starts_with('|');
            if !in_table || line.starts_with("|---") {
                continue;
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_owned();
            let kind = cells[2].to_owned();
            let labels = cells[3]
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect();
            assert!(
                rows.insert(name.clone(), (kind, labels)).is_none(),
                "{name} documented twice"
            );
        }
        rows
    }

    #[test]
    fn docs_list_every_metric_with_its_type_and_labels() {
        let mut docs = documented();
        for m in ALL {
            let Some((kind, labels)) = docs.remove(m.name) else {
                panic!("{} is not in docs/metrics.md", m.name);
            };
            assert_eq!(
                kind,
                m.kind.as_str(),
                "type of {} in docs/metrics.md",
                m.name
            );
            assert_eq!(
                labels,
                self::labels(m),
                "labels of {} in docs/metrics.md",
                m.name
            );
        }
        assert!(
            docs.is_empty(),
            "documented in docs/metrics.md but not in the list: {:?}",
            docs.keys()
        );
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable source directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The arguments of the macro call whose `(` is at the start of `rest`,
    /// split at the commas outside brackets.
    fn arguments(rest: &str) -> Vec<String> {
        let (mut depth, mut in_str, mut args, mut cur) = (0u32, false, Vec::new(), String::new());
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' if in_str => {
                    cur.push(c);
                    cur.extend(chars.next());
                    continue;
                }
                '"' => in_str = !in_str,
                '(' | '[' | '{' if !in_str => {
                    depth += 1;
                    if depth == 1 {
                        continue;
                    }
                }
                ')' | ']' | '}' if !in_str => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                ',' if !in_str && depth == 1 => {
                    args.push(std::mem::take(&mut cur).trim().to_owned());
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        if !cur.trim().is_empty() {
            args.push(cur.trim().to_owned());
        }
        args
    }

    #[test]
    fn every_call_site_records_a_listed_metric_with_its_type_and_labels() {
        let by_const: BTreeMap<String, &Metric> = ALL.iter().map(|m| (const_name(m), m)).collect();
        let mut files = Vec::new();
        for krate in std::fs::read_dir(crates_dir()).expect("crates directory") {
            let src = krate.expect("directory entry").path().join("src");
            if src.is_dir() {
                rust_files(&src, &mut files);
            }
        }
        let mut used = BTreeSet::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("readable source");
            let code: String = text
                .lines()
                .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
                .collect::<Vec<_>>()
                .join("\n");
            for kind in KINDS {
                let needle = format!("{}!(", kind.as_str());
                for (at, _) in code.match_indices(&needle) {
                    let before = code[..at].chars().next_back();
                    if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        continue; // describe_counter!( and the like
                    }
                    let site = format!("{}: {}", file.display(), &code[at..]);
                    let site = site.lines().next().unwrap_or_default();
                    let args = arguments(&code[at + needle.len() - 1..]);
                    let name = args[0].strip_suffix(".name").unwrap_or_else(|| {
                        panic!("{site}: the name must be a constant of the metric list")
                    });
                    let ident = name.rsplit("::").next().unwrap_or(name);
                    let m = by_const
                        .get(ident)
                        .unwrap_or_else(|| panic!("{site}: {ident} is not in the metric list"));
                    assert_eq!(m.kind, kind, "{site}: {} is a {:?}", m.name, m.kind);
                    let keys: BTreeSet<String> = args[1..]
                        .iter()
                        .map(|a| {
                            let (key, _) = a.split_once("=>").unwrap_or_else(|| {
                                panic!("{site}: label {a} is not `key => value`")
                            });
                            key.trim().trim_matches('"').to_owned()
                        })
                        .collect();
                    assert_eq!(keys, labels(m), "{site}: labels of {}", m.name);
                    used.insert(m.name);
                }
            }
        }
        let unused: Vec<&str> = ALL
            .iter()
            .map(|m| m.name)
            .filter(|n| !used.contains(n))
            .collect();
        assert!(unused.is_empty(), "listed but never recorded: {unused:?}");
    }

    #[test]
    fn constants_are_named_after_their_metric() {
        let text = include_str!("metric.rs");
        for m in ALL {
            let decl = format!(
                "pub const {}: Metric = Metric {{\n    name: \"{}\",",
                const_name(m),
                m.name
            );
            assert!(
                text.contains(&decl),
                "the constant of {} is not named {}",
                m.name,
                const_name(m)
            );
        }
    }
}
