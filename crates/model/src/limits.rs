//! Resource limits: the resolved, typed [`Limits`] a task runs under, the
//! operator's [`LimitsConfig`] (maxima and defaults), and
//! [`ResourceRequirements::resolve`], which turns the user's raw request into
//! limits or a [`FieldError`] naming the field and the accepted range.

use std::time::Duration;

use crate::error::FieldError;
use crate::quantity::{
    BYTES_FORM, CPU_FORM, QuantityValue, format_bytes, format_cpu_millis, format_duration,
};
use crate::task::ResourceRequirements;

/// Default CPU request: 0.5 core.
pub const DEFAULT_CPU_MILLIS: u32 = 500;
/// Default memory limit: 128Mi.
pub const DEFAULT_MEMORY_BYTES: u64 = 128 << 20;
/// Default work directory size: 500Mi.
pub const DEFAULT_DISK_BYTES: u64 = 500 << 20;
/// Default wall-clock timeout: 300 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default process/thread limit.
pub const DEFAULT_PIDS: u32 = 128;
/// Default captured output size: 1Mi.
pub const DEFAULT_OUTPUT_BYTES: u64 = 1 << 20;
/// Smallest accepted work directory size: 1Mi.
pub const MIN_DISK_BYTES: u64 = 1 << 20;

/// The limits a task runs under, after defaults and validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU request (scheduling weight), in millicores.
    pub cpu_request_millis: u32,
    /// Hard CPU bandwidth limit, in millicores; `None` for no limit.
    pub cpu_limit_millis: Option<u32>,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Work directory size limit in bytes.
    pub disk_bytes: u64,
    /// Wall-clock timeout of one attempt.
    pub timeout: Duration,
    /// CPU time limit of one attempt; `None` for no limit.
    pub cpu_time: Option<Duration>,
    /// Maximum number of processes and threads.
    pub pids: u32,
    /// Maximum captured bytes of stdout, stderr and output each.
    pub output_bytes: u64,
}

impl Default for Limits {
    /// The seed's defaults: 500m CPU, no CPU limit, 128Mi memory, 500Mi
    /// disk, 300 s timeout, no CPU time limit, 128 pids, 1Mi output.
    fn default() -> Self {
        Limits {
            cpu_request_millis: DEFAULT_CPU_MILLIS,
            cpu_limit_millis: None,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            disk_bytes: DEFAULT_DISK_BYTES,
            timeout: DEFAULT_TIMEOUT,
            cpu_time: None,
            pids: DEFAULT_PIDS,
            output_bytes: DEFAULT_OUTPUT_BYTES,
        }
    }
}

/// Operator configuration: the largest values a task may request and the
/// values used when it requests nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Largest memory limit (default 16Gi).
    pub max_memory_bytes: u64,
    /// Largest work directory size (default 8Gi).
    pub max_disk_bytes: u64,
    /// Longest wall-clock timeout (default 24h).
    pub max_timeout: Duration,
    /// Longest CPU time limit (default 24h).
    pub max_cpu_time: Duration,
    /// Largest pid limit (default 4096).
    pub max_pids: u32,
    /// Largest captured output size (default 64Mi).
    pub max_output_bytes: u64,
    /// Largest CPU request or limit, in millicores (default 64000).
    pub max_cpu_millis: u32,
    /// Smallest memory limit (default 4Mi).
    pub min_memory_bytes: u64,
    /// Values used for fields the task leaves out.
    pub defaults: Limits,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_memory_bytes: 16 << 30,
            max_disk_bytes: 8 << 30,
            max_timeout: Duration::from_secs(24 * 3600),
            max_cpu_time: Duration::from_secs(24 * 3600),
            max_pids: 4096,
            max_output_bytes: 64 << 20,
            max_cpu_millis: 64_000,
            min_memory_bytes: 4 << 20,
            defaults: Limits::default(),
        }
    }
}

impl LimitsConfig {
    /// Checks that the configuration is coherent: minima below maxima and
    /// every default within its range. Field names are the Rust field paths
    /// (e.g. `defaults.memory_bytes`).
    pub fn validate(&self) -> Result<(), FieldError> {
        let d = &self.defaults;
        let check = |ok: bool, field: &str, msg: String| {
            if ok {
                Ok(())
            } else {
                Err(FieldError::new(field, msg))
            }
        };
        check(
            self.min_memory_bytes <= self.max_memory_bytes,
            "min_memory_bytes",
            format!(
                "{} exceeds max_memory_bytes {}",
                format_bytes(self.min_memory_bytes),
                format_bytes(self.max_memory_bytes)
            ),
        )?;
        check(
            (1..=self.max_cpu_millis).contains(&d.cpu_request_millis),
            "defaults.cpu_request_millis",
            format!("expected 1m to {}", format_cpu_millis(self.max_cpu_millis)),
        )?;
        check(
            d.cpu_limit_millis
                .is_none_or(|l| l >= d.cpu_request_millis && l <= self.max_cpu_millis),
            "defaults.cpu_limit_millis",
            format!(
                "expected none or from the CPU request to {}",
                format_cpu_millis(self.max_cpu_millis)
            ),
        )?;
        check(
            (self.min_memory_bytes..=self.max_memory_bytes).contains(&d.memory_bytes),
            "defaults.memory_bytes",
            format!(
                "expected {} to {}",
                format_bytes(self.min_memory_bytes),
                format_bytes(self.max_memory_bytes)
            ),
        )?;
        check(
            (MIN_DISK_BYTES..=self.max_disk_bytes).contains(&d.disk_bytes),
            "defaults.disk_bytes",
            format!(
                "expected {} to {}",
                format_bytes(MIN_DISK_BYTES),
                format_bytes(self.max_disk_bytes)
            ),
        )?;
        check(
            !d.timeout.is_zero() && d.timeout <= self.max_timeout,
            "defaults.timeout",
            format!(
                "expected more than 0s and at most {}",
                format_duration(self.max_timeout)
            ),
        )?;
        check(
            d.cpu_time
                .is_none_or(|t| !t.is_zero() && t <= self.max_cpu_time),
            "defaults.cpu_time",
            format!(
                "expected none or more than 0s and at most {}",
                format_duration(self.max_cpu_time)
            ),
        )?;
        check(
            (1..=self.max_pids).contains(&d.pids),
            "defaults.pids",
            format!("expected 1 to {}", self.max_pids),
        )?;
        check(
            (1..=self.max_output_bytes).contains(&d.output_bytes),
            "defaults.output_bytes",
            format!("expected 1 to {}", format_bytes(self.max_output_bytes)),
        )
    }
}

const RR: &str = "executionConfig.resourceRequirements";

fn field(name: &str) -> String {
    format!("{RR}.{name}")
}

fn cpu_field(name: &str, v: &QuantityValue, max: u32) -> Result<u32, FieldError> {
    let millis = v
        .to_cpu_millis()
        .map_err(|e| FieldError::new(field(name), e.to_string()))?;
    if millis > max {
        return Err(FieldError::new(
            field(name),
            format!(
                "{v} is out of range; expected {CPU_FORM} from 1m to {}",
                format_cpu_millis(max)
            ),
        ));
    }
    Ok(millis)
}

fn bytes_field(name: &str, v: &QuantityValue, min: u64, max: u64) -> Result<u64, FieldError> {
    let bytes = v
        .to_bytes()
        .map_err(|e| FieldError::new(field(name), e.to_string()))?;
    if !(min..=max).contains(&bytes) {
        return Err(FieldError::new(
            field(name),
            format!(
                "{v} is out of range; expected {BYTES_FORM} from {} to {}",
                format_bytes(min),
                format_bytes(max)
            ),
        ));
    }
    Ok(bytes)
}

fn seconds_field(name: &str, secs: f64, max: Duration) -> Result<Duration, FieldError> {
    let err = || {
        FieldError::new(
            field(name),
            format!(
                "{secs} is out of range; expected a number of seconds greater than 0 and at most {} ({})",
                max.as_secs_f64(),
                format_duration(max)
            ),
        )
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(err());
    }
    let d = Duration::try_from_secs_f64(secs).map_err(|_| err())?;
    if d.is_zero() || d > max {
        return Err(err());
    }
    Ok(d)
}

impl ResourceRequirements {
    /// Resolves the raw request against the operator's configuration: parses
    /// quantities, fills in defaults (clamped to the maxima) and rejects
    /// values out of range. Errors name the field, e.g.
    /// `executionConfig.resourceRequirements.timeoutSeconds`, and state the
    /// accepted range.
    ///
    /// When only `cpuLimit` is given, the CPU request is the smaller of the
    /// default request and the limit; a `cpu` request above `cpuLimit` is
    /// rejected.
    pub fn resolve(&self, cfg: &LimitsConfig) -> Result<Limits, FieldError> {
        let d = &cfg.defaults;

        let cpu_limit_millis = match &self.cpu_limit {
            Some(v) => Some(cpu_field("cpuLimit", v, cfg.max_cpu_millis)?),
            None => d.cpu_limit_millis.map(|l| l.min(cfg.max_cpu_millis)),
        };
        let cpu_request_millis = match &self.cpu {
            Some(v) => {
                let req = cpu_field("cpu", v, cfg.max_cpu_millis)?;
                if let Some(limit) = cpu_limit_millis
                    && req > limit
                {
                    return Err(FieldError::new(
                        field("cpu"),
                        format!(
                            "{v} exceeds the CPU limit {}; expected {CPU_FORM} no greater than `{RR}.cpuLimit`",
                            format_cpu_millis(limit)
                        ),
                    ));
                }
                req
            }
            None => {
                let default = d.cpu_request_millis.clamp(1, cfg.max_cpu_millis.max(1));
                cpu_limit_millis.map_or(default, |l| default.min(l))
            }
        };

        let memory_bytes = match &self.memory {
            Some(v) => bytes_field("memory", v, cfg.min_memory_bytes, cfg.max_memory_bytes)?,
            None => d.memory_bytes.min(cfg.max_memory_bytes),
        };
        let disk_bytes = match &self.disk {
            Some(v) => bytes_field("disk", v, MIN_DISK_BYTES, cfg.max_disk_bytes)?,
            None => d.disk_bytes.min(cfg.max_disk_bytes),
        };
        let output_bytes = match &self.output_bytes {
            Some(v) => bytes_field("outputBytes", v, 1, cfg.max_output_bytes)?,
            None => d.output_bytes.min(cfg.max_output_bytes),
        };
        let timeout = match self.timeout_seconds {
            Some(s) => seconds_field("timeoutSeconds", s, cfg.max_timeout)?,
            None => d.timeout.min(cfg.max_timeout),
        };
        let cpu_time = match self.cpu_time_seconds {
            Some(s) => Some(seconds_field("cpuTimeSeconds", s, cfg.max_cpu_time)?),
            None => d.cpu_time.map(|t| t.min(cfg.max_cpu_time)),
        };
        let pids = match self.pids {
            Some(p) => match u32::try_from(p) {
                Ok(p) if (1..=cfg.max_pids).contains(&p) => p,
                _ => {
                    return Err(FieldError::new(
                        field("pids"),
                        format!(
                            "{p} is out of range; expected an integer from 1 to {}",
                            cfg.max_pids
                        ),
                    ));
                }
            },
            None => d.pids.min(cfg.max_pids),
        };

        Ok(Limits {
            cpu_request_millis,
            cpu_limit_millis,
            memory_bytes,
            disk_bytes,
            timeout,
            cpu_time,
            pids,
            output_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LimitsConfig {
        LimitsConfig::default()
    }

    fn err_of(rr: &ResourceRequirements) -> FieldError {
        rr.resolve(&cfg()).expect_err("should be rejected")
    }

    #[test]
    fn defaults_match_the_seed() {
        let l = ResourceRequirements::default()
            .resolve(&cfg())
            .expect("defaults");
        assert_eq!(
            l,
            Limits {
                cpu_request_millis: 500,
                cpu_limit_millis: None,
                memory_bytes: 134_217_728,
                disk_bytes: 524_288_000,
                timeout: Duration::from_secs(300),
                cpu_time: None,
                pids: 128,
                output_bytes: 1_048_576,
            }
        );
        assert_eq!(cfg().validate(), Ok(()));
        let c = cfg();
        assert_eq!(c.max_memory_bytes, 16 << 30);
        assert_eq!(c.max_disk_bytes, 8 << 30);
        assert_eq!(c.max_timeout, Duration::from_secs(86_400));
        assert_eq!(c.max_cpu_time, Duration::from_secs(86_400));
        assert_eq!(c.max_pids, 4096);
        assert_eq!(c.max_output_bytes, 64 << 20);
        assert_eq!(c.max_cpu_millis, 64_000);
        assert_eq!(c.min_memory_bytes, 4 << 20);
    }

    #[test]
    fn explicit_values() {
        let rr = ResourceRequirements {
            cpu: Some("250m".into()),
            cpu_limit: Some("2".into()),
            memory: Some("1Gi".into()),
            disk: Some(QuantityValue::from(1u64 << 30)),
            timeout_seconds: Some(0.5),
            cpu_time_seconds: Some(60.0),
            pids: Some(4096),
            output_bytes: Some("64Mi".into()),
        };
        let l = rr.resolve(&cfg()).expect("valid");
        assert_eq!(l.cpu_request_millis, 250);
        assert_eq!(l.cpu_limit_millis, Some(2000));
        assert_eq!(l.memory_bytes, 1 << 30);
        assert_eq!(l.disk_bytes, 1 << 30);
        assert_eq!(l.timeout, Duration::from_millis(500));
        assert_eq!(l.cpu_time, Some(Duration::from_secs(60)));
        assert_eq!(l.pids, 4096);
        assert_eq!(l.output_bytes, 64 << 20);
    }

    #[test]
    fn cpu_limit_alone_lowers_the_default_request() {
        let rr = ResourceRequirements {
            cpu_limit: Some("200m".into()),
            ..Default::default()
        };
        let l = rr.resolve(&cfg()).expect("valid");
        assert_eq!(l.cpu_request_millis, 200);
        assert_eq!(l.cpu_limit_millis, Some(200));
    }

    #[test]
    fn cpu_request_above_limit_is_rejected() {
        let rr = ResourceRequirements {
            cpu: Some("2".into()),
            cpu_limit: Some("1".into()),
            ..Default::default()
        };
        let e = err_of(&rr);
        assert_eq!(e.field, "executionConfig.resourceRequirements.cpu");
        assert!(e.message.contains("cpuLimit"), "{}", e.message);
    }

    #[test]
    fn timeouts_out_of_range() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 86_400.001, 1e300, 1e-12] {
            let rr = ResourceRequirements {
                timeout_seconds: Some(bad),
                ..Default::default()
            };
            let e = err_of(&rr);
            assert_eq!(
                e.field, "executionConfig.resourceRequirements.timeoutSeconds",
                "{bad}"
            );
            assert!(
                e.message.contains("greater than 0 and at most 86400"),
                "{}",
                e.message
            );
        }
        let rr = ResourceRequirements {
            timeout_seconds: Some(86_400.0),
            ..Default::default()
        };
        assert_eq!(
            rr.resolve(&cfg()).expect("max is inclusive").timeout,
            Duration::from_secs(86_400)
        );
    }

    #[test]
    fn cpu_time_out_of_range() {
        for bad in [0.0, -5.0, f64::NAN, 1e9] {
            let rr = ResourceRequirements {
                cpu_time_seconds: Some(bad),
                ..Default::default()
            };
            assert_eq!(
                err_of(&rr).field,
                "executionConfig.resourceRequirements.cpuTimeSeconds"
            );
        }
    }

    #[test]
    fn memory_out_of_range_or_malformed() {
        for bad in ["1Mi", "17Gi", "12Zi", "-1Gi", "", "lots"] {
            let rr = ResourceRequirements {
                memory: Some(bad.into()),
                ..Default::default()
            };
            let e = err_of(&rr);
            assert_eq!(
                e.field, "executionConfig.resourceRequirements.memory",
                "{bad}"
            );
            assert!(e.message.contains(BYTES_FORM), "{}", e.message);
        }
        let e = err_of(&ResourceRequirements {
            memory: Some("17Gi".into()),
            ..Default::default()
        });
        assert!(e.message.contains("from 4Mi to 16Gi"), "{}", e.message);
        let min_ok = ResourceRequirements {
            memory: Some("4Mi".into()),
            ..Default::default()
        };
        assert_eq!(
            min_ok.resolve(&cfg()).expect("min inclusive").memory_bytes,
            4 << 20
        );
    }

    #[test]
    fn disk_and_output_out_of_range() {
        let e = err_of(&ResourceRequirements {
            disk: Some("9Gi".into()),
            ..Default::default()
        });
        assert_eq!(e.field, "executionConfig.resourceRequirements.disk");
        assert!(e.message.contains("to 8Gi"), "{}", e.message);
        let e = err_of(&ResourceRequirements {
            disk: Some(QuantityValue::from(0u64)),
            ..Default::default()
        });
        assert_eq!(e.field, "executionConfig.resourceRequirements.disk");
        let e = err_of(&ResourceRequirements {
            output_bytes: Some("65Mi".into()),
            ..Default::default()
        });
        assert_eq!(e.field, "executionConfig.resourceRequirements.outputBytes");
        let e = err_of(&ResourceRequirements {
            output_bytes: Some("0".into()),
            ..Default::default()
        });
        assert_eq!(e.field, "executionConfig.resourceRequirements.outputBytes");
    }

    #[test]
    fn cpu_out_of_range_or_malformed() {
        for bad in ["0", "-1", "65", "0.0001", "2 cores"] {
            let e = err_of(&ResourceRequirements {
                cpu: Some(bad.into()),
                ..Default::default()
            });
            assert_eq!(e.field, "executionConfig.resourceRequirements.cpu", "{bad}");
            assert!(e.message.contains(CPU_FORM), "{}", e.message);
        }
        let e = err_of(&ResourceRequirements {
            cpu_limit: Some("100".into()),
            ..Default::default()
        });
        assert_eq!(e.field, "executionConfig.resourceRequirements.cpuLimit");
        assert!(e.message.contains("from 1m to 64"), "{}", e.message);
    }

    #[test]
    fn pids_out_of_range() {
        for bad in [0, -1, 4097, i64::MAX, i64::MIN] {
            let e = err_of(&ResourceRequirements {
                pids: Some(bad),
                ..Default::default()
            });
            assert_eq!(e.field, "executionConfig.resourceRequirements.pids");
            assert!(e.message.contains("from 1 to 4096"), "{}", e.message);
        }
    }

    #[test]
    fn defaults_are_clamped_to_maxima() {
        let c = LimitsConfig {
            max_memory_bytes: 64 << 20,
            max_pids: 16,
            max_timeout: Duration::from_secs(10),
            ..LimitsConfig::default()
        };
        assert_eq!(
            c.validate().expect_err("default memory above max").field,
            "defaults.memory_bytes"
        );
        let l = ResourceRequirements::default()
            .resolve(&c)
            .expect("clamped");
        assert_eq!(l.memory_bytes, 64 << 20);
        assert_eq!(l.pids, 16);
        assert_eq!(l.timeout, Duration::from_secs(10));
    }

    #[test]
    fn config_validation_catches_incoherent_settings() {
        let c = LimitsConfig {
            min_memory_bytes: 32 << 30,
            ..LimitsConfig::default()
        };
        assert_eq!(
            c.validate().expect_err("min > max").field,
            "min_memory_bytes"
        );
        let mut c = LimitsConfig::default();
        c.defaults.timeout = Duration::ZERO;
        assert_eq!(
            c.validate().expect_err("zero timeout").field,
            "defaults.timeout"
        );
        let mut c = LimitsConfig::default();
        c.defaults.cpu_limit_millis = Some(100);
        assert_eq!(
            c.validate().expect_err("limit < request").field,
            "defaults.cpu_limit_millis"
        );
    }
}
