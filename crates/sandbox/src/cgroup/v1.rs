//! cgroup v1: one hierarchy per controller (memory, pids, cpu, cpuacct),
//! each task cgroup a directory of the same name in each.

use std::fs;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use super::{
    CgroupDriver, CgroupError, CgroupLimits, CgroupMount, CgroupStats, CgroupVersion, TaskCgroup,
    io_err, keyed, kill_procs, read_u64, remove_dir, signal_procs, write,
};

const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];
const CFS_PERIOD_US: u64 = 100_000;

/// The v1 driver: the parent directory in each controller's hierarchy.
#[derive(Debug, Clone)]
pub struct V1Driver {
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
}

impl V1Driver {
    /// Uses explicit parent directories (one per controller).
    pub fn with_dirs(memory: PathBuf, pids: PathBuf, cpu: PathBuf, cpuacct: PathBuf) -> Self {
        Self {
            memory,
            pids,
            cpu,
            cpuacct,
        }
    }

    pub(crate) fn from_mounts(
        mounts: &[CgroupMount],
        own: &[(Vec<String>, String)],
        parent: Option<&str>,
    ) -> Result<Self, V1MountError> {
        let dir_of = |controller: &'static str| {
            let mount = mounts
                .iter()
                .find(|m| m.fs_type == "cgroup" && m.super_options.iter().any(|o| o == controller))
                .ok_or(V1MountError::NotMounted { controller })?;
            let own_path = own
                .iter()
                .find(|(c, _)| c.iter().any(|c| c == controller))
                .map(|(_, p)| p.as_str())
                .unwrap_or("/");
            let rel = parent.unwrap_or(own_path).trim_start_matches('/');
            let dir = mount.mount_point.join(rel);
            if dir.is_dir() {
                Ok(dir)
            } else {
                Err(V1MountError::NotADirectory { dir })
            }
        };
        let [memory, pids, cpu, cpuacct] = CONTROLLERS;
        Ok(Self {
            memory: dir_of(memory)?,
            pids: dir_of(pids)?,
            cpu: dir_of(cpu)?,
            cpuacct: dir_of(cpuacct)?,
        })
    }
}

/// Why the cgroup v1 hierarchies cannot hold task cgroups.
#[derive(Debug, thiserror::Error)]
pub(crate) enum V1MountError {
    /// No v1 hierarchy has the controller.
    #[error("the {controller} controller is not mounted")]
    NotMounted {
        /// The controller, e.g. `memory`.
        controller: &'static str,
    },
    /// The parent cgroup's directory in a hierarchy is missing.
    #[error("{} is not a directory", .dir.display())]
    NotADirectory {
        /// The directory.
        dir: PathBuf,
    },
}

impl CgroupDriver for V1Driver {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn parents(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for d in [&self.memory, &self.pids, &self.cpu, &self.cpuacct] {
            if !dirs.contains(d) {
                dirs.push(d.clone());
            }
        }
        dirs
    }

    fn create(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Box<dyn TaskCgroup>, CgroupError> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for parent in [&self.memory, &self.pids, &self.cpu, &self.cpuacct] {
            let dir = parent.join(name);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        let cg = V1Cgroup {
            memory: self.memory.join(name),
            pids: self.pids.join(name),
            cpu: self.cpu.join(name),
            cpuacct: self.cpuacct.join(name),
            dirs,
        };
        let made = cg.make(limits);
        if made.is_err() {
            // Never leave a half-made cgroup behind.
            let _ = cg.remove();
        }
        made.map(|()| Box::new(cg) as Box<dyn TaskCgroup>)
    }
}

/// One task's cgroup in every v1 hierarchy.
#[derive(Debug)]
struct V1Cgroup {
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
    dirs: Vec<PathBuf>,
}

impl V1Cgroup {
    fn make(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            fs::create_dir(dir).map_err(io_err("create", dir))?;
        }
        self.write_limits(limits, true)
    }

    /// Writes every limit; `fresh` cgroups have no CPU quota to lift.
    fn write_limits(&self, limits: &CgroupLimits, fresh: bool) -> Result<(), CgroupError> {
        let memsw = self.memory.join("memory.memsw.limit_in_bytes");
        if !fresh && memsw.exists() {
            // memory+swap may never be below memory: lift it before the
            // memory limit changes, set it again below.
            write(&memsw, "-1")?;
        }
        write(
            &self.memory.join("memory.limit_in_bytes"),
            &limits.memory_bytes.to_string(),
        )?;
        // Swap off: memsw exists only with swap accounting; without it the host
        // has no swap accounting to bypass, and swappiness 0 is the next best.
        if memsw.exists() {
            write(&memsw, &limits.memory_bytes.to_string())?;
        }
        let _ = write(&self.memory.join("memory.swappiness"), "0");
        write(&self.pids.join("pids.max"), &limits.pids.to_string())?;
        let shares = (u64::from(limits.cpu_request_millis) * 1024 / 1000).max(2);
        write(&self.cpu.join("cpu.shares"), &shares.to_string())?;
        if let Some(limit) = limits.cpu_limit_millis {
            write(
                &self.cpu.join("cpu.cfs_period_us"),
                &CFS_PERIOD_US.to_string(),
            )?;
            let quota = (u64::from(limit) * CFS_PERIOD_US / 1000).max(1000);
            write(&self.cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        } else if !fresh {
            write(&self.cpu.join("cpu.cfs_quota_us"), "-1")?;
        }
        Ok(())
    }
}

impl TaskCgroup for V1Cgroup {
    fn set_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        self.write_limits(limits, false)
    }

    fn attach(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn self_join_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("tasks")).collect()
    }

    fn cpu_time(&self) -> Result<Duration, CgroupError> {
        read_u64(&self.cpuacct.join("cpuacct.usage")).map(Duration::from_nanos)
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let peak = self.memory.join("memory.max_usage_in_bytes");
        // Hits of the memory limit, and of memory+swap where it exists.
        let memory_max_hits = ["memory.failcnt", "memory.memsw.failcnt"]
            .iter()
            .filter_map(|f| read_u64(&self.memory.join(f)).ok())
            .sum();
        Ok(CgroupStats {
            cpu_time: self.cpu_time()?,
            peak_memory_bytes: read_u64(&peak).ok(),
            oom_kills: keyed(&self.memory.join("memory.oom_control"), "oom_kill")?,
            pids_max_hits: keyed(&self.pids.join("pids.events"), "max")?,
            memory_max_hits,
        })
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        kill_procs(&self.pids.join("cgroup.procs"))?;
        kill_procs(&self.memory.join("cgroup.procs"))
    }

    fn signal_all(&self) -> Result<(), CgroupError> {
        signal_procs(&self.pids.join("cgroup.procs"))
    }

    fn remove(&self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for dir in &self.dirs {
            if let Err(e) = remove_dir(dir) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Fake-tree helper shared by the tests: a parent dir per controller.
#[cfg(test)]
pub(crate) fn fake_driver(root: &Path) -> V1Driver {
    let d = |c: &str| {
        let p = root.join(c).join("parent");
        fs::create_dir_all(&p).expect("mkdir");
        p
    };
    V1Driver::with_dirs(d("memory"), d("pids"), d("cpu"), d("cpuacct"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CgroupLimits {
        CgroupLimits {
            memory_bytes: 64 << 20,
            pids: 16,
            cpu_request_millis: 500,
            cpu_limit_millis: Some(250),
        }
    }

    #[test]
    fn create_writes_every_limit() {
        let root = tempfile::tempdir().expect("tmp");
        let driver = fake_driver(root.path());
        let _cg = driver.create("t1", &limits()).expect("create");
        let f = |c: &str, file: &str| {
            fs::read_to_string(root.path().join(c).join("parent/t1").join(file)).expect("read")
        };
        assert_eq!(
            f("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(f("pids", "pids.max"), "16");
        assert_eq!(f("cpu", "cpu.shares"), "512");
        assert_eq!(f("cpu", "cpu.cfs_quota_us"), "25000");
    }

    #[test]
    fn stats_are_read_from_the_v1_files() {
        let root = tempfile::tempdir().expect("tmp");
        let driver = fake_driver(root.path());
        let cg = driver.create("t2", &limits()).expect("create");
        let p = |c: &str, file: &str| root.path().join(c).join("parent/t2").join(file);
        fs::write(p("cpuacct", "cpuacct.usage"), "1500000\n").expect("w");
        fs::write(p("memory", "memory.max_usage_in_bytes"), "4096\n").expect("w");
        fs::write(
            p("memory", "memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .expect("w");
        fs::write(p("pids", "pids.events"), "max 7\n").expect("w");
        fs::write(p("memory", "memory.failcnt"), "3\n").expect("w");
        let s = cg.stats().expect("stats");
        assert_eq!(
            s,
            CgroupStats {
                cpu_time: Duration::from_micros(1500),
                peak_memory_bytes: Some(4096),
                oom_kills: 1,
                pids_max_hits: 7,
                memory_max_hits: 3,
            }
        );
    }

    #[test]
    fn a_failed_create_leaves_nothing_behind() {
        let root = tempfile::tempdir().expect("tmp");
        let driver = fake_driver(root.path());
        // A directory where the limit file should be makes the write fail.
        fs::create_dir_all(root.path().join("pids/parent/t3/pids.max")).expect("mkdir");
        assert!(driver.create("t3", &limits()).is_err());
        assert!(!root.path().join("memory/parent/t3").exists());
    }
}
