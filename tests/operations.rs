//! Operations: metrics change as requests arrive (and pass `promtool check metrics` when it is
//! installed), and SIGTERM drains requests in flight.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, MODEL, fashion_test, metric_value, png};

#[test]
fn metrics_change_as_requests_arrive() {
    let d = Daemon::start(&[("server.metrics_listen", "127.0.0.1:0")], &[]);
    let metrics_url = format!("{}/metrics", d.metrics_base.as_ref().expect("metrics port"));
    let agent = common::agent();
    let scrape = || {
        let (status, text) = common::get_url(&agent, &metrics_url);
        assert_eq!(status, 200);
        text
    };
    let before = scrape();
    let (images, _) = fashion_test(3);
    for img in &images {
        assert_eq!(d.post("/v1/detect", "image/png", &png(img)).0, 200);
    }
    assert_eq!(d.post("/v1/detect", "text/plain", b"x").0, 415);
    let after = scrape();
    let delta = |series: &str| metric_value(&after, series) - metric_value(&before, series);
    let m = format!("model=\"{MODEL}\"");
    assert_eq!(
        delta(&format!(
            "csgd_http_requests_total{{{m},route=\"/v1/detect\",status=\"200\""
        )),
        3.0
    );
    assert_eq!(
        delta(&format!(
            "csgd_http_requests_total{{{m},route=\"/v1/detect\",status=\"415\""
        )),
        1.0
    );
    assert_eq!(
        delta(&format!(
            "csgd_request_failures_total{{{m},cause=\"unsupported_media_type\""
        )),
        1.0
    );
    assert_eq!(delta(&format!("csgd_verdicts_total{{{m}")), 3.0);
    assert_eq!(
        delta(&format!(
            "csgd_request_duration_seconds_count{{{m},route=\"/v1/detect\""
        )),
        4.0
    );
    assert_eq!(
        delta(&format!("csgd_queue_duration_seconds_count{{{m}")),
        3.0
    );
    assert_eq!(
        delta(&format!("csgd_preprocess_duration_seconds_count{{{m}")),
        3.0
    );
    assert!(delta(&format!("csgd_inference_duration_seconds_count{{{m}")) >= 3.0);
    assert!(delta(&format!("csgd_batch_size_sum{{{m}")) >= 3.0);
    assert!(delta(&format!("csgd_detection_score_count{{{m}")) >= 3.0);
    assert_eq!(
        metric_value(&after, &format!("csgd_model_info{{{m},provider=\"cpu\"")),
        1.0
    );
    assert_eq!(metric_value(&after, "csgd_ready"), 1.0);
    assert!(after.contains("csgd_queue_depth{"));
    assert!(!after.contains("summary"));
    // Also on the main port; the metrics port serves nothing else.
    assert!(d.get("/metrics").1.contains("csgd_http_requests_total"));
    let metrics_base = d.metrics_base.clone().unwrap();
    assert_eq!(
        common::get_url(&agent, &format!("{metrics_base}/v1/models")).0,
        404
    );
    assert_eq!(
        common::get_url(&agent, &format!("{metrics_base}/health/ready")).0,
        200
    );

    promtool_check(&after);
}

fn promtool_check(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        println!("SKIP promtool check: promtool not installed (Debian package prometheus)");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("promtool check metrics: ok");
}

#[test]
fn sigterm_drains_requests_in_flight() {
    // Each batch waits 700 ms for company, so a request is in flight when SIGTERM arrives.
    let mut d = Daemon::start(
        &[
            ("batching.max_wait_us", "700000"),
            ("server.shutdown_grace_seconds", "20"),
        ],
        &[],
    );
    let (images, _) = fashion_test(1);
    let body = png(&images[0]);
    let url = d.url("/v1/detect");
    let started = Instant::now();
    let request =
        thread::spawn(move || common::post_url(&common::agent(), &url, "image/png", &body));
    thread::sleep(Duration::from_millis(250));
    d.sigterm();
    let (status, text) = request.join().unwrap();
    assert_eq!(status, 200, "in-flight request was dropped: {text}");
    assert!(started.elapsed() >= Duration::from_millis(600));
    let code = d.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "exit code; log:\n{}", d.log.lock().unwrap());
    // Nothing listens any more.
    assert_eq!(d.get("/health/live").0, 0);
    let log = d.log.lock().unwrap().clone();
    assert!(log.contains("SIGTERM"), "{log}");
}
