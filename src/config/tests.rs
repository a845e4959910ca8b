//! Unit tests of the configuration: layering, defaults, validation messages.

use super::*;

fn load(o: &Overrides, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load(o, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

fn with_file(text: &str) -> (tempfile::NamedTempFile, Overrides) {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    let o = Overrides {
        config_file: Some(file.path().to_path_buf()),
        ..Overrides::default()
    };
    (file, o)
}

fn err(o: &Overrides, env: &[(&str, &str)]) -> String {
    load(o, env).unwrap_err().to_string()
}

#[test]
fn defaults_load_and_match_runtime_default() {
    let s = Settings::defaults().unwrap();
    assert_eq!(s.server.listen, "127.0.0.1:8080");
    assert_eq!(s.server.body_limit_bytes, 8 << 20);
    assert_eq!(s.batching.max_batch_size, 32);
    assert_eq!(s.batching.max_wait_us, 0);
    assert_eq!(s.models.default_name(), "fashion-csg");
    assert_eq!(s.models.list.len(), 1);
    assert_eq!(s.models.list[0].score, ScoreKind::Combined);
    assert_eq!(s.runtime, RuntimeConfig::default());
    assert_eq!(s.threads, crate::config::ThreadsConfig::default());
    assert_eq!(s.logging.format, LogFormat::Text);
}

#[test]
fn every_default_key_is_commented() {
    // Each `key = value` line of the defaults has a comment line right above it (or is
    // inside a documented array-of-tables entry whose keys the comment above lists).
    let lines: Vec<&str> = DEFAULT_TOML.lines().collect();
    let mut in_list_entry = false;
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        if t.starts_with("[[") {
            in_list_entry = true;
            continue;
        }
        if t.starts_with('[') {
            in_list_entry = false;
            continue;
        }
        if t.is_empty() || t.starts_with('#') || in_list_entry {
            continue;
        }
        let above = lines[i - 1].trim();
        assert!(above.starts_with('#'), "key without comment: {t}");
    }
}

#[test]
fn layers_override_in_order() {
    let (_f, mut o) = with_file(
        "[server]\nlisten = \"127.0.0.1:9000\"\nmax_pixels = 100\n[batching]\nmax_batch_size = 8\n",
    );
    let env = [
        ("CSGD_SERVER__LISTEN", "127.0.0.1:9001"),
        ("CSGD_BATCHING__MAX_WAIT_US", "250"),
        ("CSGD_RUNTIME__EXECUTION_PROVIDERS", "cpu"),
        ("CSGD_TEST_MODEL", "ignored: no section separator"),
    ];
    let s = load(&o, &env).unwrap();
    assert_eq!(s.server.listen, "127.0.0.1:9001"); // env beats file
    assert_eq!(s.server.max_pixels, 100); // file beats default
    assert_eq!(s.batching.max_batch_size, 8);
    assert_eq!(s.batching.max_wait_us, 250);
    assert_eq!(s.runtime.execution_providers, vec![Provider::Cpu]);
    o.listen = Some("127.0.0.1:9002".into());
    o.set = vec![("batching.max_batch_size".into(), "4".into())];
    let s = load(&o, &env).unwrap();
    assert_eq!(s.server.listen, "127.0.0.1:9002"); // flag beats env
    assert_eq!(s.batching.max_batch_size, 4);
}

#[test]
fn a_file_replaces_the_model_list() {
    let (_f, o) = with_file(
        "[models]\ndefault = \"b\"\n[[models.list]]\nname = \"a\"\npath = \"a.onnx\"\n\
         [[models.list]]\nname = \"b\"\npath = \"b.onnx\"\nscore = \"margin\"\n",
    );
    let s = load(&o, &[]).unwrap();
    let names: Vec<&str> = s.models.list.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(s.models.list[0].score, ScoreKind::Combined);
    assert_eq!(s.models.list[1].score, ScoreKind::Margin);
    assert_eq!(s.models.default_name(), "b");

    let (_f, o) = with_file("[[models.list]]\nname = \"only\"\npath = \"x.onnx\"\n");
    let e = err(&o, &[]);
    assert!(
        e.contains("models.default") && e.contains("fashion-csg"),
        "{e}"
    );
}

#[test]
fn model_flags_replace_list_and_default() {
    let o = Overrides {
        models: vec![
            ("m1".into(), "m1.onnx".into()),
            ("m2".into(), "m2.onnx".into()),
        ],
        score: Some(ScoreKind::Msp),
        ..Overrides::default()
    };
    let s = load(&o, &[]).unwrap();
    assert_eq!(s.models.default_name(), "m1");
    assert!(s.models.list.iter().all(|m| m.score == ScoreKind::Msp));
}

#[test]
fn invalid_values_name_their_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "CSGD_BATCHING__MAX_BATCH_SIZE",
            "0",
            "batching.max_batch_size must be ≥ 1",
        ),
        (
            "CSGD_BATCHING__QUEUE_CAPACITY",
            "0",
            "batching.queue_capacity must be ≥ 1",
        ),
        (
            "CSGD_SERVER__LISTEN",
            "localhost",
            "server.listen must be an IP address",
        ),
        (
            "CSGD_SERVER__METRICS_LISTEN",
            "nope",
            "server.metrics_listen",
        ),
        (
            "CSGD_SERVER__BODY_LIMIT_BYTES",
            "0",
            "server.body_limit_bytes must be ≥ 1",
        ),
        (
            "CSGD_SERVER__MAX_PIXELS",
            "0",
            "server.max_pixels must be ≥ 1",
        ),
        (
            "CSGD_SERVER__MAX_CONCURRENT_REQUESTS",
            "0",
            "server.max_concurrent_requests",
        ),
        (
            "CSGD_SERVER__MAX_IMAGES_PER_REQUEST",
            "5000",
            "server.max_images_per_request",
        ),
        (
            "CSGD_RUNTIME__SESSIONS_PER_MODEL",
            "0",
            "runtime.sessions_per_model must be ≥ 1",
        ),
        ("CSGD_RUNTIME__DEVICE_ID", "-1", "runtime.device_id"),
        ("CSGD_LOGGING__LEVEL", "loud!!", "logging.level"),
        ("CSGD_MODELS__DEFAULT", "nope", "models.default"),
        (
            "CSGD_BATCHING__MAX_WAIT_US",
            "99999999",
            "batching.max_wait_us",
        ),
    ];
    for (var, value, expected) in cases {
        let e = err(&Overrides::default(), &[(var, value)]);
        assert!(e.contains(expected), "{var}={value}: {e}");
    }
    let e = err(
        &Overrides::default(),
        &[("CSGD_BATCHING__MAX_BATCH_SIZE", "-3")],
    );
    assert!(e.contains("max_batch_size"), "{e}");
}

#[test]
fn bad_model_entries_and_providers_are_rejected() {
    let (_f, o) =
        with_file("[models]\ndefault = \"\"\n[[models.list]]\nname = \"a b\"\npath = \"a.onnx\"\n");
    assert!(err(&o, &[]).contains("models.list[0].name"));
    let (_f, o) = with_file(
        "[models]\ndefault = \"\"\n[[models.list]]\nname = \"a\"\npath = \"a.onnx\"\n\
         [[models.list]]\nname = \"a\"\npath = \"b.onnx\"\n",
    );
    assert!(err(&o, &[]).contains("models.list[1].name"));
    let (_f, o) = with_file("[runtime]\nexecution_providers = []\n");
    assert!(err(&o, &[]).contains("runtime.execution_providers"));
    let (_f, o) = with_file("[runtime]\nexecution_providers = [\"cpu\", \"cpu\"]\n");
    assert!(err(&o, &[]).contains("twice"));
    if !cfg!(feature = "gpu") {
        let e = err(
            &Overrides::default(),
            &[("CSGD_RUNTIME__EXECUTION_PROVIDERS", "cuda,cpu")],
        );
        assert!(
            e.contains("runtime.execution_providers") && e.contains("gpu"),
            "{e}"
        );
    }
}

#[test]
fn unknown_keys_and_missing_files_are_errors() {
    let (_f, o) = with_file("[server]\nlisten_addr = \"127.0.0.1:1\"\n");
    let e = err(&o, &[]);
    assert!(e.contains("listen_addr"), "{e}");
    let o = Overrides {
        config_file: Some("/nonexistent/csgd.toml".into()),
        ..Overrides::default()
    };
    assert!(err(&o, &[]).contains("/nonexistent/csgd.toml"));
}

#[test]
fn log_filters() {
    for ok in ["info", "WARN", "info,csgd=debug", "csgd::batch=trace,off"] {
        assert!(valid_log_filter(ok), "{ok}");
    }
    for bad in ["", "infp", "loud!!", "csgd=loud", "info,,"] {
        assert!(!valid_log_filter(bad), "{bad}");
    }
}

#[test]
fn flag_parsers() {
    assert_eq!(
        parse_model_flag("a=models/a.onnx").unwrap(),
        ("a".into(), PathBuf::from("models/a.onnx"))
    );
    assert!(parse_model_flag("a").is_err());
    assert!(parse_model_flag("=x").is_err());
    assert_eq!(
        parse_set_flag("server.listen=1.2.3.4:5").unwrap(),
        ("server.listen".into(), "1.2.3.4:5".into())
    );
}

#[test]
fn intra_threads_resolve_from_cores() {
    let rt = RuntimeConfig {
        intra_op_threads: 3,
        ..RuntimeConfig::default()
    };
    assert_eq!(rt.intra_threads(), 3);
    assert!(RuntimeConfig::default().intra_threads() >= 1);
}

#[test]
fn proxy_is_off_by_default_and_routes_parse_from_a_file() {
    let s = Settings::defaults().unwrap();
    assert!(!s.proxy.enabled && s.proxy.routes.is_empty());
    assert_eq!(s.proxy.on_error, FailurePolicy::FailClosed);
    let (_f, o) = with_file(
        "[proxy]\nenabled = true\nlisten = \"127.0.0.1:9100\"\nupstream = \"http://127.0.0.1:9000/api/\"\n\
         on_error = \"fail-open\"\n\
         [[proxy.routes]]\npath = \"/v2/models/*/infer\"\nimage = \"v2\"\npolicy = \"tag\"\n\
         [[proxy.routes]]\npath = \"/predict\"\nmethods = [\"POST\", \"PUT\"]\nimage = \"json\"\n\
         field = \"/image\"\nmodel = \"fashion-csg\"\npolicy = \"block\"\non_error = \"fail-closed\"\n",
    );
    let s = load(&o, &[]).unwrap();
    let p = &s.proxy;
    assert_eq!(p.upstream_uri().unwrap().path(), "/api/");
    assert_eq!(p.routes.len(), 2);
    assert_eq!(p.routes[0].methods, vec!["POST".to_owned()]);
    assert_eq!(
        (p.routes[0].image, p.routes[0].policy),
        (ImageSource::V2, Policy::Tag)
    );
    assert_eq!(p.routes[0].on_error, None);
    assert_eq!(p.routes[1].on_error, Some(FailurePolicy::FailClosed));
    // The environment can switch it on.
    let s = load(
        &Overrides::default(),
        &[
            ("CSGD_PROXY__ENABLED", "true"),
            ("CSGD_PROXY__UPSTREAM", "http://10.0.0.2:8000"),
        ],
    )
    .unwrap();
    assert!(s.proxy.enabled);
}

#[test]
fn proxy_mistakes_name_their_key() {
    let route = |body: &str| {
        format!(
            "[proxy]\nenabled = true\nupstream = \"http://127.0.0.1:9000\"\n[[proxy.routes]]\n{body}\n"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        ("[proxy]\nenabled = true\n".into(), "proxy.upstream"),
        (
            "[proxy]\nenabled = true\nupstream = \"https://x:1\"\n".into(),
            "https upstreams are not supported",
        ),
        (
            "[proxy]\nenabled = true\nupstream = \"ftp://x:1\"\n".into(),
            "proxy.upstream",
        ),
        (
            "[proxy]\nenabled = true\nupstream = \"http://x:1\"\nlisten = \"127.0.0.1:8080\"\n"
                .into(),
            "proxy.listen must differ from server.listen",
        ),
        (
            "[proxy]\nupstream_timeout_ms = 0\n".into(),
            "proxy.upstream_timeout_ms",
        ),
        ("[proxy]\nlisten = \"nowhere\"\n".into(), "proxy.listen"),
        (
            route("path = \"predict\"\nimage = \"raw\"\npolicy = \"block\""),
            "proxy.routes[0].path",
        ),
        (
            route("path = \"/a/**/b\"\nimage = \"raw\"\npolicy = \"block\""),
            "proxy.routes[0].path",
        ),
        (
            route("path = \"/a\"\nimage = \"json\"\npolicy = \"block\""),
            "proxy.routes[0].field",
        ),
        (
            route("path = \"/a\"\nimage = \"raw\"\npolicy = \"block\"\nmodel = \"other\""),
            "proxy.routes[0].model",
        ),
        (
            route("path = \"/a\"\nimage = \"raw\"\npolicy = \"block\"\nmethods = [\"post\"]"),
            "proxy.routes[0].methods",
        ),
        (
            route("path = \"/a\"\nimage = \"raw\"\npolicy = \"block\"\nmethods = []"),
            "proxy.routes[0].methods",
        ),
    ];
    for (text, want) in cases {
        let (_f, o) = with_file(&text);
        let e = err(&o, &[]);
        assert!(e.contains(want), "{text}\n→ {e}");
    }
    // Unknown values and keys are parse errors, not silently ignored.
    for text in [
        route("path = \"/a\"\nimage = \"raw\"\npolicy = \"deny\""),
        route("path = \"/a\"\nimage = \"base64\"\npolicy = \"block\""),
        route("path = \"/a\"\nimage = \"raw\"\npolicy = \"block\"\nfeild = \"x\""),
    ] {
        let (_f, o) = with_file(&text);
        assert!(load(&o, &[]).is_err(), "{text}");
    }
}

#[test]
fn spinning_is_auto_by_default_and_takes_words_or_booleans() {
    assert_eq!(
        Settings::defaults().unwrap().runtime.intra_op_spinning,
        Spinning::Auto
    );
    let spinning = |toml: &str| -> Result<Spinning, String> {
        let (_f, o) = with_file(&format!("[runtime]\nintra_op_spinning = {toml}\n"));
        load(&o, &[])
            .map(|s| s.runtime.intra_op_spinning)
            .map_err(|e| e.to_string())
    };
    assert_eq!(spinning("true"), Ok(Spinning::On));
    assert_eq!(spinning("false"), Ok(Spinning::Off));
    assert_eq!(spinning("\"on\""), Ok(Spinning::On));
    assert_eq!(spinning("\"Off\""), Ok(Spinning::Off));
    assert_eq!(spinning("\"auto\""), Ok(Spinning::Auto));
    let e = spinning("\"sometimes\"").unwrap_err();
    assert!(
        e.contains("intra_op_spinning") && e.contains("sometimes"),
        "{e}"
    );
    // From the environment and `--set`, everything arrives as text.
    let env = load(
        &Overrides::default(),
        &[("CSGD_RUNTIME__INTRA_OP_SPINNING", "true")],
    )
    .unwrap();
    assert_eq!(env.runtime.intra_op_spinning, Spinning::On);
    let set = Overrides {
        set: vec![("runtime.intra_op_spinning".into(), "off".into())],
        ..Overrides::default()
    };
    assert_eq!(
        load(&set, &[]).unwrap().runtime.intra_op_spinning,
        Spinning::Off
    );
    // Only `on` spins from the start; `auto` decides after measuring.
    assert!(Spinning::On.at_creation());
    assert!(!Spinning::Off.at_creation() && !Spinning::Auto.at_creation());
}
