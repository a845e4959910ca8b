//! Shared helpers of the integration tests: the real daemon as a child process on a loopback
//! port, an HTTP client, and real Fashion-MNIST test images.
//!
//! Environment:
//! - `CSGD_TEST_MODEL`: the bundle to serve (default `models/fashion-csg.onnx`);
//! - `CSGD_TEST_MIN_ACCURACY`: accuracy the served model must reach on the test images
//!   (default 0.9; lower it for a quick development model);
//! - `ORT_DYLIB_PATH`: the ONNX Runtime library (default `.ort/libonnxruntime.so`);
//! - `CSGD_FASHION_DIR`: the IDX files (default `/usr/share/datasets/fashion-mnist`).
#![allow(dead_code)]

pub mod http;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Name the test model is served under.
pub const MODEL: &str = "fashion-csg";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_path(var: &str, default: &str) -> PathBuf {
    let p = match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(default),
    };
    if p.is_absolute() { p } else { repo().join(p) }
}

pub fn model_path() -> PathBuf {
    let p = env_path("CSGD_TEST_MODEL", "models/fashion-csg.onnx");
    assert!(
        p.is_file(),
        "test model {} not found: set CSGD_TEST_MODEL or build the shipped model (README)",
        p.display()
    );
    p
}

pub fn ort_library() -> PathBuf {
    let p = env_path("ORT_DYLIB_PATH", ".ort/libonnxruntime.so");
    assert!(
        p.exists(),
        "ONNX Runtime library {} not found: run .ci/fetch-ort",
        p.display()
    );
    p
}

pub fn min_accuracy() -> f64 {
    std::env::var("CSGD_TEST_MIN_ACCURACY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.9)
}

/// The first `n` Fashion-MNIST test images (28×28 bytes each) and labels.
pub fn fashion_test(n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
    let dir = env_path("CSGD_FASHION_DIR", "/usr/share/datasets/fashion-mnist");
    let images = gunzip(&dir.join("t10k-images-idx3-ubyte.gz"));
    let labels = gunzip(&dir.join("t10k-labels-idx1-ubyte.gz"));
    assert_eq!(&images[..4], &[0, 0, 8, 3], "not an IDX image file");
    assert_eq!(&labels[..4], &[0, 0, 8, 1], "not an IDX label file");
    let count = u32::from_be_bytes(images[4..8].try_into().unwrap()) as usize;
    let n = n.min(count);
    let imgs = (0..n)
        .map(|i| images[16 + i * 784..16 + (i + 1) * 784].to_vec())
        .collect();
    (imgs, labels[8..8 + n].to_vec())
}

fn gunzip(path: &Path) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (apt-get install dataset-fashion-mnist)",
            path.display()
        )
    });
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A 28×28 grayscale PNG of IDX pixels.
pub fn png(pixels: &[u8]) -> Vec<u8> {
    let img = image::GrayImage::from_raw(28, 28, pixels.to_vec()).unwrap();
    let mut out = Vec::new();
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// HTTP answers as (status, body).
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// The daemon, killed when dropped.
pub struct Daemon {
    child: Child,
    pub base: String,
    pub metrics_base: Option<String>,
    /// The sidecar proxy's address, when the configuration enables it.
    pub proxy_base: Option<String>,
    pub log: Arc<Mutex<String>>,
    pub agent: ureq::Agent,
    /// Holds a `--config` file written for this daemon.
    _config: Option<tempfile::TempDir>,
}

/// Standard flags: loopback port 0, the test model as `fashion-csg`, the ORT library.
pub fn base_args() -> Vec<String> {
    vec![
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--model".into(),
        format!("fashion-csg={}", model_path().display()),
        "--ort-library".into(),
        ort_library().display().to_string(),
        "--set".into(),
        "runtime.intra_op_threads=1".into(),
    ]
}

pub fn csgd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_csgd"));
    cmd.current_dir(repo());
    // The tests' own configuration must not leak into the daemon's.
    for (k, _) in std::env::vars() {
        if k.starts_with("CSGD_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

impl Daemon {
    /// Starts `csgd` with [`base_args`] plus `--set` for each of `sets` and `extra` flags, and
    /// waits until it is ready.
    pub fn start(sets: &[(&str, &str)], extra: &[&str]) -> Daemon {
        let mut args = base_args();
        for (k, v) in sets {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_args(&args)
    }

    /// Starts `csgd` with [`base_args`], `--config` holding `config` (TOML) and `--set` for
    /// each of `sets`; waits for the proxy listener too when `config` enables it.
    pub fn start_with_config(config: &str, sets: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csgd.toml");
        std::fs::write(&path, config).unwrap();
        let mut args = base_args();
        args.push("--config".into());
        args.push(path.display().to_string());
        for (k, v) in sets {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
        let mut d = Self::start_args_with(&args, config.contains("enabled = true"));
        d._config = Some(dir);
        d
    }

    pub fn start_args(args: &[String]) -> Daemon {
        Self::start_args_with(args, false)
    }

    fn start_args_with(args: &[String], wants_proxy: bool) -> Daemon {
        let mut child = csgd()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn csgd");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<(String, String)>();
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("CSGD_TEST_LOG").is_some() {
                    eprintln!("[csgd] {line}");
                }
                for (marker, kind) in [
                    ("csgd listening on http://", "api"),
                    ("metrics on http://", "metrics"),
                    ("proxy listening on http://", "proxy"),
                ] {
                    if let Some(rest) = line.split(marker).nth(1) {
                        let addr: String = rest
                            .chars()
                            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                            .collect();
                        let _ = tx.send((kind.to_string(), addr));
                    }
                }
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
            }
        });
        let mut base = None;
        let mut metrics_base = None;
        let mut proxy_base = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        let wants_metrics = args
            .iter()
            .any(|a| a.starts_with("server.metrics_listen=") || a == "--metrics-listen");
        while base.is_none()
            || (wants_metrics && metrics_base.is_none())
            || (wants_proxy && proxy_base.is_none())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((kind, addr)) if kind == "api" => base = Some(format!("http://{addr}")),
                Ok((kind, addr)) if kind == "proxy" => proxy_base = Some(format!("http://{addr}")),
                Ok((_, addr)) => metrics_base = Some(format!("http://{addr}")),
                Err(_) => {
                    let _ = child.kill();
                    panic!("csgd did not start:\n{}", log.lock().unwrap());
                }
            }
        }
        let daemon = Daemon {
            child,
            base: base.unwrap(),
            metrics_base,
            proxy_base,
            log,
            agent: agent(),
            _config: None,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.get("/health/ready").0 == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "csgd not ready:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        get_url(&self.agent, &self.url(path))
    }

    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        post_url(&self.agent, &self.url(path), content_type, body)
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) = self.post(path, "application/json", body.to_string().as_bytes());
        (status, parse(&text))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn metric(&self, name_and_labels: &str) -> f64 {
        metric_value(&self.get("/metrics").1, name_and_labels)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn get_url(agent: &ureq::Agent, url: &str) -> (u16, String) {
    match agent.get(url).call() {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

pub fn post_url(agent: &ureq::Agent, url: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    match agent
        .post(url)
        .header("Content-Type", content_type)
        .send(body)
    {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

pub fn parse(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Sum of the samples of `name_and_labels` (a metric name, optionally followed by `{` and a
/// prefix of its labels, e.g. `csgd_verdicts_total{model="fashion-csg"`).
pub fn metric_value(text: &str, name_and_labels: &str) -> f64 {
    let (name, labels) = match name_and_labels.split_once('{') {
        Some((n, l)) => (n, Some(l)),
        None => (name_and_labels, None),
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            if let Some(labels) = labels
                && !labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .all(|p| series_labels.contains(p))
            {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}

/// A multipart/form-data body of PNG parts; returns (content type, body).
pub fn multipart(images: &[Vec<u8>]) -> (String, Vec<u8>) {
    let boundary = "csgd-test-boundary-7d3f";
    let mut body = Vec::new();
    for (i, img) in images.iter().enumerate() {
        body.extend(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image{i}\"; filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n"
        ).as_bytes());
        body.extend(img);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The stand-in upstream classifier (`csgd-test-upstream`), killed when dropped.
pub struct Upstream {
    child: Child,
    /// `host:port`.
    pub addr: String,
    agent: ureq::Agent,
}

impl Upstream {
    pub fn start() -> Upstream {
        let mut child = Command::new(env!("CARGO_BIN_EXE_csgd-test-upstream"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn csgd-test-upstream");
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("upstream listening on http://")
            .unwrap_or_else(|| panic!("unexpected upstream output {line:?}"))
            .to_owned();
        Upstream {
            child,
            addr,
            agent: agent(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request it received so far: method, uri, headers ([name, value] pairs), body_len,
    /// fnv (of the body), conn (connection number).
    pub fn log(&self) -> Vec<serde_json::Value> {
        let (status, text) = get_url(&self.agent, &self.url("/_upstream/log"));
        assert_eq!(status, 200, "{text}");
        match parse(&text) {
            serde_json::Value::Array(items) => items,
            other => panic!("upstream log is not an array: {other}"),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of header `name` in an upstream log entry.
pub fn logged_header<'a>(entry: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    entry["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0].as_str() == Some(name))
        .and_then(|h| h[1].as_str())
}

/// FNV-1a of `bytes`, as the upstream logs it.
pub fn fnv1a(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}
