//! Hot reload against the real daemon: a broken bundle leaves the serving one in place and
//! says why; a good one is swapped in by `POST /admin/reload` and by SIGHUP; a request in
//! flight during the swap finishes on the model it started on; the admin route needs its
//! token and does not exist unless enabled.

mod common;

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::http::send;
use common::{Daemon, base_args, fashion_test, parse, png, repo};

const TOKEN: &str = "reload-test-token-0123456789";

/// Replaces `path` atomically (write beside, rename), as a deployment tool would.
fn install(bundle: &[u8], path: &Path) {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bundle).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn bundle(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("models").join(name)).unwrap()
}

/// The daemon serving `path` as `fashion-csg`, with the admin route on; every lone request
/// waits `wait_ms` in the batching queue, so that one can be caught in flight.
fn start(path: &Path, wait_ms: u64) -> Daemon {
    let mut args = base_args();
    let i = args.iter().position(|a| a == "--model").unwrap();
    args[i + 1] = format!("fashion-csg={}", path.display());
    for set in [
        "admin.enabled=true".to_owned(),
        format!("admin.token={TOKEN}"),
        format!("batching.max_wait_us={}", wait_ms * 1000),
    ] {
        args.push("--set".into());
        args.push(set);
    }
    Daemon::start_args(&args)
}

fn reload(d: &Daemon, auth: Option<&str>) -> (u16, Value) {
    let header = auth.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = header
        .as_deref()
        .map(|h| vec![("authorization", h)])
        .unwrap_or_default();
    let reply = send(&d.url("/admin/reload"), "POST", &headers, b"");
    (reply.status, reply.json())
}

fn bundle_name(d: &Daemon) -> String {
    let (status, text) = d.get("/v1/models/fashion-csg");
    assert_eq!(status, 200, "{text}");
    parse(&text)["bundle_name"].as_str().unwrap().to_owned()
}

/// The probability the serving model gives `image` (one detect call).
fn probability(d: &Daemon, image: &[u8]) -> f64 {
    let (status, text) = d.post("/v1/detect", "image/png", image);
    assert_eq!(status, 200, "{text}");
    parse(&text)["probability"].as_f64().unwrap()
}

#[test]
fn admin_reload_swaps_good_bundles_and_keeps_broken_ones_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    install(&bundle("fashion-csg.onnx"), &path);
    let d = start(&path, 0);
    let (images, _) = fashion_test(1);
    let image = png(&images[0]);
    let before = probability(&d, &image);
    assert_eq!(bundle_name(&d), "fashion-csg");

    // The route needs the token.
    let (status, body) = reload(&d, None);
    assert_eq!((status, body["kind"].as_str()), (401, Some("unauthorized")));
    let (status, body) = reload(&d, Some("not-the-token-at-all-000"));
    assert_eq!((status, body["kind"].as_str()), (403, Some("forbidden")));

    // Broken bundles: the old model keeps serving, and the answer says what is wrong.
    let good = bundle("fashion-std.onnx");
    for (what, broken) in [
        ("truncated", good[..good.len() / 3].to_vec()),
        ("not ONNX", b"this is not a model".to_vec()),
    ] {
        install(&broken, &path);
        let (status, body) = reload(&d, Some(TOKEN));
        assert_eq!(status, 500, "{what}: {body}");
        assert_eq!(body["kind"], "reload_failed", "{what}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains("fashion-csg") && message.contains("serving models stay"),
            "{what}: {message}"
        );
        assert_eq!(bundle_name(&d), "fashion-csg", "{what}");
        assert_eq!(probability(&d, &image), before, "{what}");
    }
    assert_eq!(
        d.metric("csgd_reloads_total{result=\"failed\",trigger=\"admin\"}"),
        2.0
    );

    // A good bundle is swapped in.
    install(&good, &path);
    let (status, body) = reload(&d, Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let model = &body["models"][0];
    assert_eq!(model["name"], "fashion-csg");
    assert_eq!(model["bundle_name"], "fashion-std");
    assert_eq!(bundle_name(&d), "fashion-std");
    let after = probability(&d, &image);
    assert_ne!(after, before, "the new model answers");
    let metrics = d.get("/metrics").1;
    let info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("csgd_model_info{"))
        .collect();
    assert_eq!(info.len(), 1, "one series per served model: {info:?}");
    assert_eq!(
        d.metric("csgd_reloads_total{result=\"ok\",trigger=\"admin\"}"),
        1.0
    );
}

#[test]
fn sighup_reloads_while_a_request_in_flight_finishes_on_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    install(&bundle("fashion-csg.onnx"), &path);
    // A lone request waits 1.5 s in the queue: long enough to reload meanwhile.
    let d = start(&path, 1500);
    let (images, _) = fashion_test(1);
    let image = png(&images[0]);
    let old = probability(&d, &image);

    let url = d.url("/v1/detect");
    let body = image.clone();
    let in_flight = thread::spawn(move || {
        let (status, text) = common::post_url(&common::agent(), &url, "image/png", &body);
        (status, text, Instant::now())
    });
    thread::sleep(Duration::from_millis(200));
    install(&bundle("fashion-std.onnx"), &path);
    let status = Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while bundle_name(&d) != "fashion-std" {
        assert!(
            Instant::now() < deadline,
            "no reload after SIGHUP:\n{}",
            d.log.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let swapped = Instant::now();

    let (status, text, finished) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(
        finished > swapped,
        "the request finished before the swap; the test proves nothing"
    );
    assert_eq!(
        parse(&text)["probability"].as_f64().unwrap(),
        old,
        "the in-flight request was answered by the model it started on"
    );
    assert_ne!(
        probability(&d, &image),
        old,
        "new requests reach the new model"
    );
    assert_eq!(
        d.metric("csgd_reloads_total{result=\"ok\",trigger=\"sighup\"}"),
        1.0
    );
    assert!(d.log.lock().unwrap().contains("models reloaded"));
}

#[test]
fn admin_routes_are_off_by_default() {
    let d = Daemon::start(&[], &[]);
    let reply = send(
        &d.url("/admin/reload"),
        "POST",
        &[("authorization", "Bearer whatever-it-is-0000000")],
        b"",
    );
    assert_eq!(reply.status, 404);
    assert_eq!(d.get("/health/ready").0, 200);
}
