//! The settings of `taskexec serve` and `taskexec worker`, each declared
//! once, in [`settings!`] below: its flag and TOML key (the field's name),
//! its environment variable (`TASKEXEC_` and the name in capitals), its
//! help (the field's doc comment), its default and whether a worker uses it.
//!
//! Reading them takes two steps. The raw settings ([`RawConfig`], every one
//! optional) come from the flags, then the environment, then the TOML file
//! (`--config`), the first one given winning; [`settings::settings`] then
//! validates them, filling in the defaults, into the typed [`settings::Settings`] the
//! program uses.

mod settings;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use clap::{Args, Command, FromArgMatches};
use serde::Deserialize;

pub use settings::settings;

/// Which commands use a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `serve` only: the HTTP API's settings. A worker refuses them as
    /// flags or variables and hides them from its help.
    Http,
    /// `serve` and `worker`: the node's settings.
    Node,
}

/// A setting's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// This value, as it would be given (`30s`, `true`, `16`).
    Fixed(&'static str),
    /// Worked out at start; the words say how (e.g. `all cores`).
    Computed(&'static str),
    /// Not set unless given.
    Unset,
}

use Fallback::{Computed, Fixed, Unset};
use Scope::{Http, Node};

/// One setting as declared in [`settings!`].
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The field's name: the TOML key, and the flag with `-` for `_`.
    pub key: &'static str,
    /// The commands that use it.
    pub scope: Scope,
    /// Its default.
    pub default: Fallback,
}

impl Setting {
    /// The flag, e.g. `--warm-pool-max`.
    pub fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }

    /// The environment variable, e.g. `TASKEXEC_WARM_POOL_MAX`.
    pub fn env(&self) -> String {
        env_name(self.key)
    }
}

/// `TASKEXEC_` and the key in capitals.
fn env_name(key: &str) -> String {
    format!("TASKEXEC_{}", key.to_ascii_uppercase())
}

/// A setting's text as given: a string on the command line and in the
/// environment, a string or a number in the TOML file (`workers = 8` or
/// `workers = "auto"`, `shutdown_grace = "2m"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Text(pub String);

impl FromStr for Text {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A string or a number.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Loose {
            /// "auto", "1500m", "8Gi".
            Text(String),
            /// 8, 2.
            Number(f64),
        }
        Ok(Self(match Loose::deserialize(d)? {
            Loose::Text(s) => s,
            Loose::Number(n) => n.to_string(),
        }))
    }
}

impl Text {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Declares the settings: each field becomes a flag of [`RawConfig`] (its
/// doc comment the help), a TOML key and an entry of [`SETTINGS`] with its
/// scope and default.
macro_rules! settings {
    ($(
        $(#[$meta:meta])*
        $key:ident: $ty:ty, $scope:expr, $default:expr;
    )*) => {
        /// The settings as given, every one optional: from the flags, from
        /// the environment or from the TOML file, or those merged
        /// ([`RawConfig::or`]).
        #[derive(Debug, Clone, Default, PartialEq, Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RawConfig {
            $(
                $(#[$meta])*
                #[arg(long)]
                pub $key: Option<$ty>,
            )*
        }

        /// Every setting, in the order of the help.
        pub const SETTINGS: &[Setting] = &[$(Setting {
            key: stringify!($key),
            scope: $scope,
            default: $default,
        }),*];

        impl RawConfig {
            /// Each setting from `self`, else from `lower`.
            pub fn or(self, lower: Self) -> Self {
                Self { $($key: self.$key.or(lower.$key),)* }
            }

            /// The keys of the settings given.
            pub fn given(&self) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $(if self.$key.is_some() {
                    keys.push(stringify!($key));
                })*
                keys
            }

            /// The fixed defaults ([`Fallback::Fixed`]), the others unset.
            pub fn defaults() -> anyhow::Result<Self> {
                Ok(Self {$(
                    $key: match $default {
                        Fixed(text) => Some(text.parse::<$ty>().map_err(|e| {
                            anyhow::anyhow!("the default of --{} {text:?}: {e}", stringify!($key))
                        })?),
                        Computed(_) | Unset => None,
                    },
                )*})
            }
        }
    };
}

settings! {
    /// Address to listen on: HOST:PORT, the host an IP address or a name
    /// (e.g. 127.0.0.1:8080, localhost:8080, [::1]:8080).
    #[arg(value_name = "HOST:PORT")]
    listen: String, Http, Fixed("127.0.0.1:8080");
    /// Database URL: sqlite://PATH (embedded) or postgres://USER@HOST/DB
    /// (shared by the nodes).
    #[arg(value_name = "URL")]
    database: String, Node, Fixed("sqlite://taskexec.db");
    /// Tasks run at once: a number, or "auto" (two per core).
    #[arg(value_name = "N|auto")]
    workers: Text, Node, Fixed("auto");
    /// Require this bearer token on every endpoint but /healthz and /readyz.
    #[arg(value_name = "TOKEN")]
    auth_token: String, Http, Unset;
    /// Read the bearer token from this file.
    #[arg(value_name = "FILE")]
    auth_token_file: PathBuf, Http, Unset;
    /// Most tasks waiting in the queue; past it, submissions get 429.
    #[arg(value_name = "N")]
    max_queued: u64, Http, Fixed("10000");
    /// CPU this node admits tasks against, e.g. 2 or 1500m.
    #[arg(value_name = "CPU")]
    cpu_capacity: Text, Node, Computed("all cores");
    /// Memory this node admits tasks against, e.g. 8Gi.
    #[arg(value_name = "BYTES")]
    memory_capacity: Text, Node, Computed("90% of RAM");
    /// This node's name in the store; keep it stable across restarts so a
    /// restart recovers the tasks it was running.
    #[arg(value_name = "NAME")]
    node_id: String, Node, Computed("local with SQLite, else HOSTNAME-PID");
    /// How long running tasks may finish after SIGTERM before they are
    /// cancelled.
    #[arg(value_name = "DURATION")]
    shutdown_grace: Text, Node, Fixed("30s");
    /// Group store writes into transactions (true/false).
    batch_writes: bool, Node, Fixed("true");
    /// Largest request body accepted, e.g. 8Mi.
    #[arg(value_name = "BYTES")]
    max_body: Text, Http, Fixed("8Mi");
    /// Largest task output stored as a result, in bytes of compact JSON,
    /// e.g. 16Mi; a larger one fails the task's attempt.
    #[arg(value_name = "BYTES")]
    max_result_bytes: Text, Node, Fixed("16Mi");
    /// Adapt the number of tasks started at once to the host's sandbox
    /// start latency and memory pressure, within --workers (true/false).
    adaptive_concurrency: bool, Node, Fixed("true");
    /// Lowest adaptive concurrency limit.
    #[arg(value_name = "N")]
    concurrency_min: usize, Node, Fixed("1");
    /// Highest adaptive concurrency limit.
    #[arg(value_name = "N")]
    concurrency_max: usize, Node, Computed("--workers");
    /// Lease of a claimed task, renewed every third of it while the task
    /// runs; a node silent this long loses its tasks to another node (at
    /// least 1s). Hidden: for tests and tuning.
    #[arg(value_name = "DURATION", hide = true)]
    lease: Text, Node, Fixed("30s");
    /// How often a follower of a task (`?wait`, the event stream) re-reads
    /// it when nothing woke it; with PostgreSQL, a change made on another
    /// node wakes it through a database notification, so this bounds only
    /// the delay after a lost notification (at least 100ms). Hidden: for
    /// tests and tuning.
    #[arg(value_name = "DURATION", hide = true)]
    follow_fallback: Text, Http, Fixed("1s");
    /// Quarantine a task (end it FAILED) once this many of its attempts
    /// were lost with their node, instead of retrying it onto the next one
    /// (at least 1).
    #[arg(value_name = "N")]
    quarantine_after: u32, Node, Fixed("3");
    /// Keep sandboxes built ahead of time and fork servers, so tasks start
    /// faster (true/false); off, every task runs in a sandbox built for it.
    warm: bool, Node, Fixed("true");
    /// Pre-built sandboxes kept per runtime and limit class even when idle.
    #[arg(value_name = "N")]
    warm_pool_min: usize, Node, Fixed("0");
    /// Pre-built sandboxes at most per runtime and limit class (0 turns the
    /// pools off; at most --warm-pool-total).
    #[arg(value_name = "N")]
    warm_pool_max: usize, Node, Fixed("4");
    /// Pre-built sandboxes at most in all.
    #[arg(value_name = "N")]
    warm_pool_total: usize, Node, Fixed("16");
    /// A runtime and limit class without tasks this long shrinks to
    /// --warm-pool-min, e.g. 30s or 5m.
    #[arg(value_name = "DURATION")]
    warm_pool_idle: Text, Node, Fixed("30s");
    /// Run handler-mode tasks of runtimes with a fork server in children of
    /// a pre-started interpreter (true/false).
    fork_servers: bool, Node, Fixed("true");
    /// Fork-server starts per second this node may make, sustained, after
    /// a burst of 16 (e.g. 0.5; at most 1000). A task whose server may not
    /// start yet runs in a sandbox instead.
    #[arg(value_name = "N")]
    fork_server_start_rate: f64, Node, Fixed("2");
    /// Time a request's head may take from its first byte, e.g. 10s.
    #[arg(value_name = "DURATION")]
    header_timeout: Text, Http, Fixed("10s");
    /// Time a request's body may take after its head, e.g. 60s.
    #[arg(value_name = "DURATION")]
    body_timeout: Text, Http, Fixed("60s");
    /// Time a keep-alive connection without a request in flight stays open,
    /// e.g. 60s.
    #[arg(value_name = "DURATION")]
    idle_timeout: Text, Http, Fixed("60s");
    /// Connections open at most; the last 1/64 of them (at most 16) only
    /// answer /healthz and /readyz.
    #[arg(value_name = "N")]
    max_connections: usize, Http, Fixed("1024");
}

/// The flags of `serve` and `worker`: every setting, and the file.
#[derive(Debug, Clone, Default, Args)]
pub struct Flags {
    #[command(flatten)]
    pub raw: RawConfig,
    /// A TOML file with any of the settings above, under their names with
    /// `_` for `-` (e.g. warm_pool_max = 8).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The `--config` flag's key (the file cannot name itself).
const CONFIG: &str = "config";

/// The flags of `serve` (`HTTP`) or `worker`, their help annotated with
/// each setting's default and variable; a worker's hides the HTTP ones.
#[derive(Debug, Clone, Default)]
pub struct CommandFlags<const HTTP: bool>(pub Flags);

/// `taskexec serve`'s flags.
pub type ServeFlags = CommandFlags<true>;
/// `taskexec worker`'s flags.
pub type WorkerFlags = CommandFlags<false>;

impl<const HTTP: bool> FromArgMatches for CommandFlags<HTTP> {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Flags::from_arg_matches(m).map(Self)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }
}

impl<const HTTP: bool> Args for CommandFlags<HTTP> {
    fn augment_args(cmd: Command) -> Command {
        annotate(Flags::augment_args(cmd), HTTP)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        annotate(Flags::augment_args_for_update(cmd), HTTP)
    }
}

/// Each setting's help followed by its default and variable; without
/// `http`, the HTTP settings hidden (a worker refuses them:
/// [`refuse_http`]).
fn annotate(mut cmd: Command, http: bool) -> Command {
    let note = |arg: clap::Arg, default: Option<String>, env: String| {
        let tail = match default {
            Some(d) => format!(" [default: {d}] [env: {env}]"),
            None => format!(" [env: {env}]"),
        };
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let long = arg.get_long_help().map(ToString::to_string);
        let arg = arg.help(format!("{help}{tail}"));
        match long {
            Some(l) => arg.long_help(format!("{l}{tail}")),
            None => arg,
        }
    };
    for s in SETTINGS {
        let default = match s.default {
            Fixed(d) | Computed(d) => Some(d.to_string()),
            Unset => None,
        };
        cmd = cmd.mut_arg(s.key, |a| {
            let a = note(a, default, s.env());
            if !http && s.scope == Http {
                a.hide(true)
            } else {
                a
            }
        });
    }
    cmd.mut_arg(CONFIG, |a| note(a, None, env_name(CONFIG)))
}

/// The settings given in the environment (`TASKEXEC_LISTEN`...), read
/// through `lookup`; an empty variable counts as unset. Each is parsed as
/// its flag is.
pub fn from_env(lookup: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Flags> {
    let mut flags = Flags::default();
    let keys = SETTINGS.iter().map(|s| s.key).chain([CONFIG]);
    for key in keys {
        let name = env_name(key);
        let Some(value) = lookup(&name).filter(|v| !v.is_empty()) else {
            continue;
        };
        let argv = [
            "taskexec".to_string(),
            format!("--{}={value}", key.replace('_', "-")),
        ];
        let one = Flags::augment_args(Command::new("taskexec"))
            .try_get_matches_from(argv)
            .and_then(|m| Flags::from_arg_matches(&m))
            .map_err(|e| {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                anyhow::anyhow!("{name}: {}", first.trim_start_matches("error: "))
            })?;
        flags = Flags {
            raw: flags.raw.or(one.raw),
            config: flags.config.or(one.config),
        };
    }
    Ok(flags)
}

/// The settings in a TOML file.
pub fn from_file(path: &Path) -> anyhow::Result<RawConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--config: cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("--config {}", path.display()))
}

/// A worker serves no HTTP: the HTTP settings given as flags or variables
/// are refused rather than silently ignored. (A TOML file may hold them, so
/// that `serve` and `worker` can share one.)
pub fn refuse_http(flags: &RawConfig, env: &RawConfig) -> anyhow::Result<()> {
    let http = || SETTINGS.iter().filter(|s| s.scope == Http);
    let (by_flag, by_env) = (flags.given(), env.given());
    if let Some(s) = http().find(|s| by_flag.contains(&s.key)) {
        let flag = s.flag();
        bail!(
            "{flag}: `taskexec worker` serves no HTTP API, so it takes no HTTP settings; \
             pass {flag} to `taskexec serve`"
        );
    }
    if let Some(s) = http().find(|s| by_env.contains(&s.key)) {
        let (flag, var) = (s.flag(), s.env());
        bail!(
            "{var} ({flag}): `taskexec worker` serves no HTTP API, so it takes no HTTP \
             settings; unset {var}, or give it to `taskexec serve`"
        );
    }
    Ok(())
}

/// The settings given: the flags, then the variables read through `env`,
/// then the file named by either, the first one given winning. A worker
/// (without `http`) refuses HTTP flags and variables.
pub fn load(
    flags: Flags,
    env: &dyn Fn(&str) -> Option<String>,
    http: bool,
) -> anyhow::Result<RawConfig> {
    let from_env = from_env(env)?;
    if !http {
        refuse_http(&flags.raw, &from_env.raw)?;
    }
    let file = match flags.config.or(from_env.config) {
        Some(path) => from_file(&path)?,
        None => RawConfig::default(),
    };
    Ok(flags.raw.or(from_env.raw).or(file))
}

/// The process's environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests;
