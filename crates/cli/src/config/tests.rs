//! The settings' declarations, their precedence (flags, environment, file,
//! defaults), a worker's refusals, and the validation of each.

use std::net::SocketAddr;
use std::time::Duration;

use super::settings::{WarmInput, concurrency, listen_addr, warm};
use super::*;
use taskexec_sandbox::StartLimit;

/// `taskexec serve`'s (with `http`) or `taskexec worker`'s flags.
fn flags<const HTTP: bool>(argv: &[&str]) -> Result<Flags, clap::Error> {
    #[derive(Debug, clap::Parser)]
    struct One<const HTTP: bool> {
        #[command(flatten)]
        flags: CommandFlags<HTTP>,
    }
    use clap::Parser;
    One::<HTTP>::try_parse_from(std::iter::once("taskexec").chain(argv.iter().copied()))
        .map(|one| one.flags.0)
}

/// No environment.
fn no_env(_: &str) -> Option<String> {
    None
}

/// The settings given by `serve`'s flags alone (no environment).
fn given(argv: &[&str]) -> RawConfig {
    let f = flags::<true>(argv).expect("flags parse");
    load(f, &no_env, true).expect("settings load")
}

#[test]
fn adaptive_concurrency_is_on_by_default_up_to_the_workers() {
    let c = concurrency(None, None, None, 8)
        .expect("valid")
        .expect("on");
    assert_eq!((c.min, c.max, c.memory_signal), (1, None, true));
    let c = concurrency(Some(true), Some(2), Some(6), 8)
        .expect("valid")
        .expect("on");
    assert_eq!((c.min, c.max), (2, Some(6)));
    assert_eq!(
        concurrency(Some(false), None, None, 8).expect("valid"),
        None
    );
}

#[test]
fn the_warm_runner_is_on_by_default_with_fork_servers() {
    let w = warm(WarmInput::default()).expect("valid").expect("on");
    assert!(w.fork_servers);
    assert_eq!(w.pool, taskexec_sandbox::pool::PoolConfig::default());
    let w = warm(WarmInput {
        enabled: Some(true),
        fork_servers: Some(false),
        pool_min: Some(1),
        pool_max: Some(2),
        pool_total: Some(3),
        pool_idle: Some("5m".into()),
        start_rate: None,
    })
    .expect("valid")
    .expect("on");
    assert!(!w.fork_servers);
    assert_eq!(
        (
            w.pool.min_per_key,
            w.pool.max_per_key,
            w.pool.max_total,
            w.pool.idle_after
        ),
        (1, 2, 3, Duration::from_secs(300))
    );
    let off = WarmInput {
        enabled: Some(false),
        fork_servers: Some(false),
        ..WarmInput::default()
    };
    assert!(warm(off).expect("valid").is_none());
}

#[test]
fn a_lower_total_caps_the_default_per_key_cap() {
    let w = warm(WarmInput {
        pool_total: Some(2),
        ..WarmInput::default()
    })
    .expect("valid")
    .expect("on");
    assert_eq!((w.pool.max_per_key, w.pool.max_total), (2, 2));
    let e = warm(WarmInput {
        pool_min: Some(3),
        pool_total: Some(2),
        ..WarmInput::default()
    })
    .expect_err("a floor above the capped cap")
    .to_string();
    assert!(
        e.contains("--warm-pool-max 2 (the default, capped by --warm-pool-total)"),
        "{e}"
    );
    // No pool at all, fork servers still on.
    let w = warm(WarmInput {
        pool_max: Some(0),
        ..WarmInput::default()
    })
    .expect("valid")
    .expect("on");
    assert_eq!(w.pool.max_per_key, 0);
    assert!(w.fork_servers);
}

#[test]
fn inconsistent_warm_settings_are_refused_with_the_setting() {
    let err = |w: WarmInput| warm(w).expect_err("invalid").to_string();
    let e = err(WarmInput {
        pool_min: Some(3),
        pool_max: Some(2),
        ..WarmInput::default()
    });
    assert!(
        e.contains("--warm-pool-min 3: more than --warm-pool-max 2;"),
        "{e}"
    );
    let e = err(WarmInput {
        pool_min: Some(5),
        ..WarmInput::default()
    });
    assert!(
        e.contains("more than --warm-pool-max 4 (the default)"),
        "{e}"
    );
    let e = err(WarmInput {
        pool_max: Some(20),
        ..WarmInput::default()
    });
    assert!(
        e.contains("--warm-pool-max 20: more than --warm-pool-total 16 (the default)"),
        "{e}"
    );
    let e = err(WarmInput {
        pool_total: Some(100_000),
        ..WarmInput::default()
    });
    assert!(e.contains("--warm-pool-total 100000: expected"), "{e}");
    let e = err(WarmInput {
        pool_idle: Some("soon".into()),
        ..WarmInput::default()
    });
    assert!(e.starts_with("--warm-pool-idle \"soon\":"), "{e}");
    let e = err(WarmInput {
        pool_idle: Some("500ms".into()),
        ..WarmInput::default()
    });
    assert!(e.contains("expected at least 1s"), "{e}");
    let e = err(WarmInput {
        enabled: Some(false),
        pool_max: Some(2),
        ..WarmInput::default()
    });
    assert!(e.contains("--warm-pool-max needs --warm true"), "{e}");
    let e = err(WarmInput {
        enabled: Some(false),
        fork_servers: Some(true),
        ..WarmInput::default()
    });
    assert!(e.contains("--fork-servers true needs --warm true"), "{e}");
}

#[test]
fn the_fork_server_start_rate_is_set_and_checked() {
    let w = warm(WarmInput::default()).expect("valid").expect("on");
    assert_eq!(w.start_limit, StartLimit::default());
    let w = warm(WarmInput {
        start_rate: Some(0.5),
        ..WarmInput::default()
    })
    .expect("valid")
    .expect("on");
    assert_eq!(w.start_limit.node_interval, Duration::from_secs(2));
    assert_eq!(w.start_limit.node_burst, StartLimit::default().node_burst);
    for bad in [0.0, -2.0, 5000.0] {
        let e = format!(
            "{:#}",
            warm(WarmInput {
                start_rate: Some(bad),
                ..WarmInput::default()
            })
            .expect_err("out of range")
        );
        assert!(
            e.contains("--fork-server-start-rate") && e.contains("above 0 and at most 1000"),
            "{e}"
        );
    }
    let e = format!(
        "{:#}",
        warm(WarmInput {
            enabled: Some(false),
            start_rate: Some(1.0),
            ..WarmInput::default()
        })
        .expect_err("warm off")
    );
    assert!(
        e.contains("--fork-server-start-rate needs --warm true"),
        "{e}"
    );
    let args = given(&["--fork-server-start-rate", "4"]);
    let w = settings(args).expect("valid").warm.expect("on");
    assert_eq!(w.start_limit.node_interval, Duration::from_millis(250));
}

#[test]
fn warm_settings_come_from_the_file_under_the_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("serve.toml");
    std::fs::write(
        &path,
        "warm_pool_min = 1\nwarm_pool_max = 3\nwarm_pool_idle = \"2m\"\nfork_servers = false\nfork_server_start_rate = 1\n",
    )
    .expect("write the config");
    let config = path.to_str().expect("a UTF-8 path");
    let args = given(&["--config", config, "--warm-pool-max", "2"]);
    let w = settings(args).expect("valid").warm.expect("on");
    assert_eq!(
        (w.pool.min_per_key, w.pool.max_per_key, w.pool.idle_after),
        (1, 2, Duration::from_secs(120))
    );
    assert!(!w.fork_servers);
    assert_eq!(w.start_limit.node_interval, Duration::from_secs(1));

    std::fs::write(&path, "warm = false\n").expect("write the config");
    let args = given(&["--config", config]);
    assert!(settings(args).expect("valid").warm.is_none());

    std::fs::write(&path, "warm_pool = 3\n").expect("write the config");
    let f = flags::<true>(&["--config", config]).expect("flags parse");
    let e = format!("{:#}", load(f, &no_env, true).expect_err("unknown key"));
    assert!(e.contains("warm_pool"), "{e}");
}

#[test]
fn listen_takes_host_names_and_says_what_it_expects() {
    assert_eq!(
        listen_addr("localhost:8080").expect("a host name"),
        SocketAddr::from(([127, 0, 0, 1], 8080))
    );
    assert_eq!(
        listen_addr("[::1]:9").expect("IPv6"),
        "[::1]:9".parse::<SocketAddr>().expect("valid")
    );
    let e = listen_addr("localhost").expect_err("no port").to_string();
    assert!(
        e.starts_with("--listen \"localhost\": expected HOST:PORT"),
        "{e}"
    );
}

#[test]
fn concurrency_bounds_outside_the_workers_are_refused() {
    let err = |min, max| {
        concurrency(None, min, max, 4)
            .expect_err("invalid")
            .to_string()
    };
    assert!(err(Some(0), None).contains("--concurrency-min 0"));
    assert!(err(Some(3), Some(2)).contains("less than --concurrency-min 3"));
    assert!(err(None, Some(5)).contains("more than the 4 workers"));
    assert!(err(Some(5), None).contains("more than the 4 workers"));
    assert!(
        concurrency(Some(false), Some(2), None, 4)
            .expect_err("bounds without the limiter")
            .to_string()
            .contains("--adaptive-concurrency true")
    );
}

/// An environment of these variables.
fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// A TOML file holding `text`, in a directory kept while the test runs.
fn toml_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("serve.toml");
    std::fs::write(&path, text).expect("write the config");
    let path = path.to_str().expect("a UTF-8 path").to_string();
    (dir, path)
}

#[test]
fn a_flag_wins_over_a_variable_over_the_file_over_the_default() {
    let (_dir, path) = toml_file("shutdown_grace = \"3s\"\nworkers = 3\nmax_queued = 30\n");
    let env = env_of(&[
        ("TASKEXEC_SHUTDOWN_GRACE", "2s"),
        ("TASKEXEC_WORKERS", "2"),
        ("TASKEXEC_CONFIG", &path),
    ]);
    let load_with = |argv: &[&str], env: &dyn Fn(&str) -> Option<String>| {
        let given = load(flags::<true>(argv).expect("flags parse"), env, true).expect("load");
        settings(given).expect("valid")
    };
    // Flag over variable over file.
    let s = load_with(&["--shutdown-grace", "1s", "--workers", "1"], &env);
    assert_eq!(s.shutdown_grace, Duration::from_secs(1));
    assert_eq!(s.service.workers, 1);
    // Variable over file; the file named by a variable.
    let s = load_with(&[], &env);
    assert_eq!(s.shutdown_grace, Duration::from_secs(2));
    assert_eq!(s.service.workers, 2);
    assert_eq!(s.service.max_queued, 30);
    // File over default; the file named by the flag.
    let s = load_with(&["--config", &path], &no_env);
    assert_eq!(s.shutdown_grace, Duration::from_secs(3));
    assert_eq!(s.service.workers, 3);
    // The default.
    let s = load_with(&[], &no_env);
    assert_eq!(s.shutdown_grace, Duration::from_secs(30));
    assert_eq!(s.service.max_queued, 10_000);
    // An empty variable counts as unset.
    let s = load_with(&[], &env_of(&[("TASKEXEC_SHUTDOWN_GRACE", "")]));
    assert_eq!(s.shutdown_grace, Duration::from_secs(30));
    // The flag's file over the variable's.
    let (_other, other) = toml_file("shutdown_grace = \"4s\"\n");
    let s = load_with(
        &["--config", &other],
        &env_of(&[("TASKEXEC_CONFIG", &path)]),
    );
    assert_eq!(s.shutdown_grace, Duration::from_secs(4));
}

#[test]
fn every_setting_has_a_flag_a_variable_and_a_key() {
    for s in SETTINGS {
        let value = match s.key {
            "listen" => "127.0.0.1:1",
            "database" => "sqlite://x.db",
            "auth_token" => "t",
            "auth_token_file" => "/token",
            "workers" | "cpu_capacity" => "2",
            "memory_capacity" | "max_body" | "max_result_bytes" => "4Mi",
            "shutdown_grace" | "lease" | "warm_pool_idle" | "header_timeout" | "body_timeout"
            | "idle_timeout" => "5s",
            "node_id" => "n",
            "batch_writes" | "adaptive_concurrency" | "warm" | "fork_servers" => "false",
            _ => "3",
        };
        let by_flag = given(&[&s.flag(), value]);
        assert_eq!(by_flag.given(), vec![s.key], "{}", s.flag());
        let by_env = from_env(&env_of(&[(&s.env(), value)])).expect("parses");
        assert_eq!(by_env.raw, by_flag, "{}", s.env());
        let toml_value = match value.parse::<f64>() {
            Ok(_) => value.to_string(),
            Err(_) if value == "false" => value.to_string(),
            Err(_) => format!("{value:?}"),
        };
        let by_file: RawConfig =
            toml::from_str(&format!("{} = {toml_value}", s.key)).expect("a TOML key");
        assert_eq!(by_file, by_flag, "{}", s.key);
    }
}

#[test]
fn a_bad_variable_is_refused_naming_it() {
    let e = from_env(&env_of(&[("TASKEXEC_WARM", "maybe")]))
        .expect_err("not a boolean")
        .to_string();
    assert!(e.starts_with("TASKEXEC_WARM: "), "{e}");
    assert!(e.contains("maybe") && e.contains("--warm"), "{e}");
    let e = from_env(&env_of(&[("TASKEXEC_WARM_POOL_MAX", "-1")]))
        .expect_err("not a count")
        .to_string();
    assert!(e.starts_with("TASKEXEC_WARM_POOL_MAX: "), "{e}");
    // A negative number reaches the setting's own check.
    let env = from_env(&env_of(&[("TASKEXEC_FORK_SERVER_START_RATE", "-2")])).expect("a number");
    assert_eq!(env.raw.fork_server_start_rate, Some(-2.0));
}

#[test]
fn the_file_cannot_name_a_file() {
    let (_dir, path) = toml_file("config = \"other.toml\"\n");
    let e = format!(
        "{:#}",
        from_file(Path::new(&path)).expect_err("unknown key")
    );
    assert!(e.contains("config"), "{e}");
}

#[test]
fn a_worker_refuses_http_flags_and_variables_and_hides_them() {
    let worker = |argv: &[&str], env: &[(&str, &str)]| {
        load(
            flags::<false>(argv).expect("flags parse"),
            &env_of(env),
            false,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    for s in SETTINGS.iter().filter(|s| s.scope == Http) {
        let e = worker(&[&s.flag(), "1"], &[]).expect_err("an HTTP flag");
        assert!(
            e.starts_with(&format!(
                "{}: `taskexec worker` serves no HTTP API",
                s.flag()
            )),
            "{e}"
        );
        assert!(e.contains("taskexec serve"), "{e}");
        let e = worker(&[], &[(&s.env(), "1")]).expect_err("an HTTP variable");
        assert!(
            e.starts_with(&format!("{} ({}): `taskexec worker`", s.env(), s.flag())),
            "{e}"
        );
    }
    worker(&["--workers", "2"], &[("TASKEXEC_WARM", "true")]).expect("a worker's own settings");
    // A shared file may hold HTTP settings; the worker leaves them.
    let (_dir, path) = toml_file("listen = \"127.0.0.1:9\"\nworkers = 2\n");
    worker(&["--config", &path], &[]).expect("a shared file");
    // Serve takes them.
    load(
        flags::<true>(&["--listen", "127.0.0.1:9"]).expect("flags parse"),
        &no_env,
        true,
    )
    .expect("serve's own setting");

    use clap::CommandFactory;
    #[derive(Debug, clap::Parser)]
    struct Worker {
        #[command(flatten)]
        flags: WorkerFlags,
    }
    let mut cmd = Worker::command();
    let help = cmd.render_long_help().to_string();
    for s in SETTINGS {
        assert_eq!(
            help.contains(&format!("{} ", s.flag())),
            s.scope == Node && s.key != "lease",
            "{} in a worker's help:\n{help}",
            s.flag()
        );
    }
}

#[test]
fn the_help_shows_each_default_and_variable() {
    use clap::CommandFactory;
    #[derive(Debug, clap::Parser)]
    struct Serve {
        #[command(flatten)]
        flags: ServeFlags,
    }
    let help = Serve::command().render_long_help().to_string();
    assert!(
        help.contains("[default: 30s] [env: TASKEXEC_SHUTDOWN_GRACE]"),
        "{help}"
    );
    assert!(
        help.contains("[default: all cores] [env: TASKEXEC_CPU_CAPACITY]"),
        "{help}"
    );
    assert!(help.contains("[env: TASKEXEC_AUTH_TOKEN]"), "{help}");
    assert!(help.contains("[env: TASKEXEC_CONFIG]"), "{help}");
}

#[test]
fn the_declared_defaults_are_the_libraries_defaults() {
    let s = settings(RawConfig::default()).expect("the defaults are valid");
    let service = taskexec_service::ServiceConfig::new(
        "n".to_string(),
        taskexec_store::Capacity {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        },
    );
    assert_eq!(s.service.max_queued, service.max_queued);
    assert_eq!(s.service.lease, service.lease);
    assert_eq!(s.service.batch_writes, service.batch_writes);
    assert_eq!(
        s.max_result_bytes,
        taskexec_engine::DEFAULT_MAX_RESULT_BYTES
    );
    assert_eq!(
        format!("{:?}", s.http),
        format!("{:?}", taskexec_api::server::ServerConfig::default())
    );
    assert_eq!(s.database, "sqlite://taskexec.db");
    assert_eq!(s.service.node, "local");
    // The groups checked as given: their declared defaults given change
    // nothing.
    let d = RawConfig::defaults().expect("the declared defaults parse");
    let declared = settings(RawConfig {
        warm: d.warm,
        warm_pool_min: d.warm_pool_min,
        warm_pool_max: d.warm_pool_max,
        warm_pool_total: d.warm_pool_total,
        warm_pool_idle: d.warm_pool_idle,
        fork_servers: d.fork_servers,
        fork_server_start_rate: d.fork_server_start_rate,
        adaptive_concurrency: d.adaptive_concurrency,
        concurrency_min: d.concurrency_min,
        ..RawConfig::default()
    })
    .expect("the declared defaults are valid");
    assert_eq!(
        format!("{:?}", declared.warm),
        format!("{:?}", s.warm),
        "the warm runner's declared defaults"
    );
    assert_eq!(
        format!("{:?}", declared.service.concurrency),
        format!("{:?}", s.service.concurrency),
        "the concurrency limit's declared defaults"
    );
}

#[test]
fn the_operations_guide_lists_every_setting() {
    let guide = include_str!("../../../../docs/operations.md");
    for s in SETTINGS {
        let row = guide
            .lines()
            .find(|l| {
                l.starts_with(&format!("| `{} ", s.flag()))
                    || l.starts_with(&format!("| `{}`", s.flag()))
            })
            .unwrap_or_else(|| panic!("no row for {} in docs/operations.md", s.flag()));
        assert!(row.contains(&format!("| `{}` |", s.env())), "{row}");
        assert!(row.contains(&format!("| `{}` |", s.key)), "{row}");
        if let Fixed(d) = s.default {
            assert!(row.contains(&format!("| `{d}`")), "default {d} in {row}");
        }
        let worker = if s.scope == Node { "| yes |" } else { "| no |" };
        assert!(row.contains(worker), "worker column in {row}");
    }
}

#[test]
fn a_token_given_directly_wins_over_a_token_file_wherever_each_comes_from() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "from-file\n").expect("write the token");
    let token_file = token_file.to_str().expect("a UTF-8 path");
    let (_config_dir, config) = toml_file("auth_token = \"from-toml\"\n");
    let token = |argv: &[&str], env: &[(&str, &str)]| {
        let f = flags::<true>(argv).expect("flags parse");
        settings(load(f, &env_of(env), true).expect("load"))
            .expect("valid")
            .auth_token
    };
    assert_eq!(
        token(&["--auth-token-file", token_file, "--config", &config], &[]).as_deref(),
        Some("from-toml")
    );
    assert_eq!(
        token(&["--auth-token-file", token_file], &[]).as_deref(),
        Some("from-file")
    );
    assert_eq!(
        token(
            &["--auth-token", "from-flag"],
            &[("TASKEXEC_AUTH_TOKEN", "from-env")]
        )
        .as_deref(),
        Some("from-flag")
    );
    assert_eq!(
        token(
            &[],
            &[
                ("TASKEXEC_AUTH_TOKEN", "from-env"),
                ("TASKEXEC_CONFIG", &config)
            ]
        )
        .as_deref(),
        Some("from-env")
    );
    assert_eq!(token(&[], &[]), None);
}

#[test]
fn a_boolean_follows_the_same_precedence() {
    let (_dir, path) = toml_file("warm = false\n");
    let warm = |argv: &[&str], env: &[(&str, &str)]| {
        let f = flags::<false>(argv).expect("flags parse");
        settings(load(f, &env_of(env), false).expect("load"))
            .expect("valid")
            .warm
            .is_some()
    };
    assert!(!warm(&["--config", &path], &[]), "the file's false");
    assert!(
        warm(&["--config", &path], &[("TASKEXEC_WARM", "true")]),
        "the variable's true"
    );
    assert!(
        !warm(
            &["--config", &path, "--warm", "false"],
            &[("TASKEXEC_WARM", "true")]
        ),
        "the flag's false"
    );
    assert!(warm(&[], &[]), "the default");
}
