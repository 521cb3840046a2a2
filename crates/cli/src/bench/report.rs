//! The report: its JSON shape, the targets with their baselines, and its
//! two renderings (a table on stdout, a Markdown section of
//! docs/benchmarks.md).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::machine::Machine;
use super::service::Drain;
use super::stats::{Kind, Summary};

/// The start and end markers of the generated section of a Markdown file.
pub const MD_BEGIN: &str =
    "<!-- taskexec bench report: begin (generated; edits are overwritten) -->";
/// See [`MD_BEGIN`].
pub const MD_END: &str = "<!-- taskexec bench report: end -->";

/// Everything one run measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Bumped when the shape changes.
    pub schema_version: u32,
    /// The exact command line.
    pub command: String,
    /// Where it ran.
    pub machine: Machine,
    /// Sizes and filters of the run.
    pub settings: Settings,
    /// The issue's targets, each beside its baseline.
    pub targets: Vec<Target>,
    /// Engine and service groups: contenders measured interleaved.
    pub groups: Vec<Group>,
    /// The drain of many queued tasks (None when skipped).
    pub drain: Option<Drain>,
    /// Wall time of the whole run, s.
    pub wall_seconds: f64,
}

/// Sizes and filters of a run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// Tasks per contender and group (java: `javaTasks`).
    pub tasks: usize,
    /// Tasks per contender and group for java.
    pub java_tasks: usize,
    /// Unmeasured rounds per contender before each group.
    pub warmup: usize,
    /// Concurrency levels of the engine groups.
    pub concurrency: Vec<usize>,
    /// Runtimes measured.
    pub runtimes: Vec<String>,
    /// `--quick`.
    pub quick: bool,
}

/// One comparison: contenders of one runtime, mode and concurrency,
/// measured interleaved; ratios are against the group's bare p50.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    /// "engine" (this process) or "service" (a `taskexec serve` child).
    pub section: String,
    /// Runtime name.
    pub runtime: String,
    /// "script" or "handler".
    pub mode: String,
    /// Tasks in flight.
    pub concurrency: usize,
    /// The contenders.
    pub series: Vec<Summary>,
}

impl Group {
    /// The first series of a kind.
    pub fn get(&self, kind: Kind) -> Option<&Summary> {
        self.series.iter().find(|s| s.kind == kind)
    }
}

/// A figure the issue asks for, next to its baseline.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// What is measured.
    pub name: String,
    /// The figure.
    pub value: Option<f64>,
    /// Its unit ("ms", "tasks/s", "MiB", "s").
    pub unit: String,
    /// What the baseline is.
    pub baseline_name: String,
    /// The baseline, same unit, same run.
    pub baseline: Option<f64>,
    /// value / baseline.
    pub ratio: Option<f64>,
}

impl Target {
    fn new(name: String, unit: &str, value: Option<f64>, bname: String, base: Option<f64>) -> Self {
        let ratio = match (value, base) {
            (Some(v), Some(b)) if b > 0.0 => Some((v / b * 100.0).round() / 100.0),
            _ => None,
        };
        Self {
            name,
            value,
            unit: unit.into(),
            baseline_name: bname,
            baseline: base,
            ratio,
        }
    }
}

/// The targets found in `groups` and `drain`.
pub fn targets(groups: &[Group], drain: Option<&Drain>) -> Vec<Target> {
    let find = |section: &str, runtime: &str, mode: &str, c: usize| {
        groups.iter().find(|g| {
            g.section == section && g.runtime == runtime && g.mode == mode && g.concurrency == c
        })
    };
    let bare = |g: &Group| {
        g.get(Kind::Bare)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    };
    let mut t = Vec::new();
    if let Some(g) = find("engine", "python", "script", 1)
        && let Some(cli) = g.get(Kind::Cli)
    {
        t.push(Target::new(
            "cold script-mode python: `taskexec run` (whole CLI process), p50".into(),
            "ms",
            cli.p50_ms,
            format!("{}, p50", bare(g)),
            g.get(Kind::Bare).and_then(|s| s.p50_ms),
        ));
    }
    if let Some(g) = find("engine", "python", "handler", 1) {
        t.push(Target::new(
            "warm handler-mode python through the engine, end to end, p50".into(),
            "ms",
            g.get(Kind::Warm).and_then(|s| s.p50_ms),
            format!("{}, p50", bare(g)),
            g.get(Kind::Bare).and_then(|s| s.p50_ms),
        ));
    }
    for g in groups.iter().filter(|g| g.section == "service") {
        let what = format!(
            "warm {}-mode {} through the service on SQLite",
            g.mode, g.runtime
        );
        let svc = g.get(Kind::Service);
        let base = g.get(Kind::Bare);
        if g.concurrency == 1 {
            t.push(Target::new(
                format!("{what}, p50 at concurrency 1"),
                "ms",
                svc.and_then(|s| s.p50_ms),
                format!("{}, p50", bare(g)),
                base.and_then(|s| s.p50_ms),
            ));
            let phase =
                |k: &str| svc.and_then(|s| s.sandbox_phases_p50_ms.get(k).copied().flatten());
            if let Some(overhead) = phase("overhead") {
                t.push(Target::new(
                    format!(
                        "service overhead (API, store, scheduling) at concurrency 1: latency less the attempt's own duration, p50 ({what})"
                    ),
                    "ms",
                    Some(overhead),
                    "the same tasks' attempt duration (the sandboxed run), p50".into(),
                    phase("attempt"),
                ));
            }
        } else {
            t.push(Target::new(
                format!("{what}, throughput at concurrency {}", g.concurrency),
                "tasks/s",
                svc.and_then(|s| s.throughput_per_s),
                format!("{}, {} at once", bare(g), g.concurrency),
                base.and_then(|s| s.throughput_per_s),
            ));
        }
    }
    if let Some(d) = drain {
        t.push(Target::new(
            format!(
                "drain of {} queued {}: the server's peak RSS (VmHWM)",
                d.tasks, d.task
            ),
            "MiB",
            d.peak_rss_mib,
            "the same server idle, before any submission (VmRSS)".into(),
            d.idle_rss_mib,
        ));
        t.push(Target::new(
            format!(
                "drain of {} queued {}: time until all final",
                d.tasks, d.task
            ),
            "s",
            Some(d.drain_seconds),
            "none".into(),
            None,
        ));
    }
    t
}

fn f(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "-".into())
}

fn ratio(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into())
}

impl Report {
    /// The engine and service groups, each section with any.
    fn sections(&self) -> Vec<(&'static str, Vec<&Group>)> {
        ["engine", "service"]
            .into_iter()
            .map(|section| {
                let groups = self
                    .groups
                    .iter()
                    .filter(|g| g.section == section)
                    .collect();
                (section, groups)
            })
            .filter(|(_, groups): &(&str, Vec<&Group>)| !groups.is_empty())
            .collect()
    }

    /// The readable table.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "taskexec bench report ({:.0} s)", self.wall_seconds);
        let _ = writeln!(o, "machine: {}", self.machine.describe());
        let _ = writeln!(o, "command: {}", self.command);
        let _ = writeln!(o);
        let _ = writeln!(o, "TARGETS (medians; baselines measured in the same run)");
        for t in &self.targets {
            let _ = writeln!(
                o,
                "  {}: {} {}\n      baseline {}: {}   ratio {}",
                t.name,
                f(t.value, 2),
                t.unit,
                t.baseline_name,
                f(t.baseline, 2),
                ratio(t.ratio)
            );
        }
        for (section, groups) in self.sections() {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "{} (ms per task; tasks/s over the series' wall time; ratio = p50 / bare p50)",
                section.to_uppercase()
            );
            let _ = writeln!(
                o,
                "{:<7} {:<8} {:>4}  {:<44} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7}",
                "runtime", "mode", "conc", "series", "n", "p50", "p99", "mean", "tasks/s", "ratio"
            );
            for g in groups {
                for (i, s) in g.series.iter().enumerate() {
                    let (r, m, c) = if i == 0 {
                        (
                            g.runtime.as_str(),
                            g.mode.as_str(),
                            g.concurrency.to_string(),
                        )
                    } else {
                        ("", "", String::new())
                    };
                    let _ = writeln!(
                        o,
                        "{r:<7} {m:<8} {c:>4}  {:<44} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7}",
                        truncate(&s.name, 44),
                        s.n,
                        f(s.p50_ms, 2),
                        f(s.p99_ms, 2),
                        f(s.mean_ms, 2),
                        f(s.throughput_per_s, 1),
                        ratio(s.p50_ratio)
                    );
                }
            }
        }
        if let Some(d) = &self.drain {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "DRAIN ({} {}; serve {})",
                d.tasks,
                d.task,
                d.serve_flags.join(" ")
            );
            let _ = writeln!(
                o,
                "  submitted in {:.2} s; all final after {:.2} s ({:.1} tasks/s); {} completed, {} not",
                d.submit_seconds, d.drain_seconds, d.throughput_per_s, d.completed, d.not_completed
            );
            let _ = writeln!(
                o,
                "  server RSS: idle {} MiB, peak (VmHWM) {} MiB, after {} MiB",
                f(d.idle_rss_mib, 1),
                f(d.peak_rss_mib, 1),
                f(d.final_rss_mib, 1)
            );
        }
        if let Some(phases) = self.phases() {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "sandbox phases of cold python script tasks, p50 ms: {phases}"
            );
        }
        o
    }

    fn phases(&self) -> Option<String> {
        let g = self.groups.iter().find(|g| {
            g.section == "engine"
                && g.runtime == "python"
                && g.mode == "script"
                && g.concurrency == 1
        })?;
        let s = g.get(Kind::Cold)?;
        if s.sandbox_phases_p50_ms.is_empty() {
            return None;
        }
        Some(
            s.sandbox_phases_p50_ms
                .iter()
                .map(|(k, v)| format!("{k} {}", f(*v, 2)))
                .collect::<Vec<_>>()
                .join(", "),
        )
    }

    /// The Markdown section (between [`MD_BEGIN`] and [`MD_END`]).
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut o = String::new();
        let _ = writeln!(o, "{MD_BEGIN}");
        let _ = writeln!(o, "## The report (`taskexec bench`)");
        let _ = writeln!(o);
        let _ = writeln!(o, "```sh\n{}\n```", self.command);
        let _ = writeln!(o);
        let rts: Vec<String> = m.runtimes.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            o,
            "**Machine**: {}, {} cores, {} GiB RAM, Linux {}, {}, {}; {}; {} build, \
             launcher `{}`, load average {} at the start; the run took {:.0} s.",
            m.cpu_model,
            m.cores,
            m.ram_gib,
            m.kernel,
            m.cgroup,
            m.os,
            rts.join(", "),
            m.build,
            m.launcher,
            m.load_average,
            self.wall_seconds
        );
        let _ = writeln!(o);
        let _ = writeln!(o, "### Targets");
        let _ = writeln!(o);
        let _ = writeln!(o, "| figure | value | baseline (same run) | ratio |");
        let _ = writeln!(o, "|---|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                o,
                "| {} | {} {} | {}: {} | {} |",
                t.name,
                f(t.value, 2),
                t.unit,
                t.baseline_name,
                f(t.baseline, 2),
                ratio(t.ratio)
            );
        }
        for (section, groups) in self.sections() {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "### {}",
                if section == "engine" {
                    "Per task through the engine (ms; ratio = p50 / bare p50)"
                } else {
                    "The service on SQLite, submit → result stored (ms)"
                }
            );
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "| runtime | mode | conc. | series | n | p50 | p99 | tasks/s | ratio |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
            for g in groups {
                for s in &g.series {
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        g.runtime,
                        g.mode,
                        g.concurrency,
                        s.name,
                        s.n,
                        f(s.p50_ms, 2),
                        f(s.p99_ms, 2),
                        f(s.throughput_per_s, 1),
                        ratio(s.p50_ratio)
                    );
                }
            }
        }
        if let Some(d) = &self.drain {
            let _ = writeln!(o);
            let _ = writeln!(o, "### Drain of {} queued tasks", d.tasks);
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "{} {}, submitted in batches of 1,000 to a fresh `taskexec serve {}`: \
                 submitted in {:.2} s, all final after {:.2} s ({:.1} tasks/s; {} completed, {} not). \
                 The server process's RSS: {} MiB idle, **{} MiB peak** (VmHWM), {} MiB after.",
                d.tasks,
                d.task,
                d.serve_flags.join(" "),
                d.submit_seconds,
                d.drain_seconds,
                d.throughput_per_s,
                d.completed,
                d.not_completed,
                f(d.idle_rss_mib, 1),
                f(d.peak_rss_mib, 1),
                f(d.final_rss_mib, 1)
            );
        }
        if let Some(phases) = self.phases() {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "Sandbox phases of the cold python script tasks, p50 ms: {phases}."
            );
        }
        let _ = writeln!(o, "{MD_END}");
        o
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// Replaces the generated section of `text` with `section`, or appends it.
pub fn splice(text: &str, section: &str) -> String {
    if let (Some(b), Some(e)) = (text.find(MD_BEGIN), text.find(MD_END))
        && b < e
    {
        let end = e + MD_END.len();
        let rest = text[end..].strip_prefix('\n').unwrap_or(&text[end..]);
        return format!("{}{section}{rest}", &text[..b]);
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push_str(if out.ends_with('\n') { "\n" } else { "\n\n" });
    }
    out.push_str(section);
    out
}

/// Writes `report`'s section into the Markdown file at `path`.
pub fn write_markdown(path: &Path, report: &Report) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    std::fs::write(path, splice(&text, &report.markdown()))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_or_appends() {
        let sec = format!("{MD_BEGIN}\nnew\n{MD_END}\n");
        let appended = splice("# B\n\ntext\n", &sec);
        assert_eq!(appended, format!("# B\n\ntext\n\n{sec}"));
        let old = format!("# B\n\n{MD_BEGIN}\nold\n{MD_END}\n\n## After\n");
        assert_eq!(splice(&old, &sec), format!("# B\n\n{sec}\n## After\n"));
        assert_eq!(splice("", &sec), sec);
    }

    #[test]
    fn target_ratio() {
        let t = Target::new("x".into(), "ms", Some(3.0), "b".into(), Some(2.0));
        assert_eq!(t.ratio, Some(1.5));
        let t = Target::new("x".into(), "s", Some(3.0), "none".into(), None);
        assert_eq!(t.ratio, None);
    }
}
