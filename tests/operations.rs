//! Operations: metrics change as requests arrive (and pass `promtool check metrics` when it is
//! installed), and SIGTERM drains requests in flight, also under load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// One client request of the load below: whether it was answered before SIGTERM was sent,
/// and its status (0: no HTTP answer at all).
struct Outcome {
    before_signal: bool,
    status: u16,
    body: String,
}

#[test]
fn sigterm_under_load_answers_every_accepted_request() {
    let mut d = Daemon::start(&[("server.shutdown_grace_seconds", "20")], &[]);
    let (images, _) = fashion_test(8);
    let signalled = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = images
        .iter()
        .map(|image| {
            let (url, body, signalled) = (d.url("/v1/detect"), png(image), Arc::clone(&signalled));
            thread::spawn(move || {
                let agent = common::agent();
                let mut outcomes = Vec::new();
                let mut after_signal = 0;
                // Until the daemon stops answering, or 200 requests after the signal.
                while after_signal < 200 {
                    let (status, text) = common::post_url(&agent, &url, "image/png", &body);
                    let before_signal = !signalled.load(Ordering::SeqCst);
                    after_signal += usize::from(!before_signal);
                    outcomes.push(Outcome {
                        before_signal,
                        status,
                        body: text,
                    });
                    if status == 0 && !before_signal {
                        break;
                    }
                }
                outcomes
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(1500));
    // The flag goes up first: an answer counted as before the signal certainly was.
    signalled.store(true, Ordering::SeqCst);
    let signal_sent = Instant::now();
    d.sigterm();
    let code = d.wait_exit(Duration::from_secs(20));
    let exited_after = signal_sent.elapsed();
    let outcomes: Vec<Outcome> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let log = d.log.lock().unwrap().clone();
    assert_eq!(code, Some(0), "exit code; log:\n{log}");
    assert!(exited_after < Duration::from_secs(20), "{exited_after:?}");

    let before: Vec<&Outcome> = outcomes.iter().filter(|o| o.before_signal).collect();
    assert!(before.len() > 20, "the load ran: {} answers", before.len());
    for o in &before {
        assert_eq!(o.status, 200, "before the signal: {}", o.body);
    }
    // After it: complete answers (200, or 503 for a request that arrived while draining) or
    // no answer at all once the listener is gone; never another error.
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| !o.before_signal).collect();
    for o in &after {
        assert!(
            matches!(o.status, 0 | 200 | 503),
            "after the signal: {} {}",
            o.status,
            o.body
        );
        if o.status == 503 {
            assert!(o.body.contains("shutting_down"), "{}", o.body);
        }
    }
    // Every request in flight when the signal arrived was answered in full.
    let in_flight: usize = log
        .lines()
        .find(|l| l.contains("shutting down"))
        .and_then(|l| l.split("in_flight=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no in-flight count in the log:\n{log}"));
    let completed_after = after.iter().filter(|o| o.status == 200).count();
    assert!(
        completed_after >= in_flight,
        "{in_flight} in flight at SIGTERM, {completed_after} answered 200 after it"
    );
    eprintln!(
        "shutdown under load: {} answers before SIGTERM, {in_flight} in flight at it, {completed_after} answered 200 after it, {} 503, {} refused; exit after {exited_after:?}",
        before.len(),
        after.iter().filter(|o| o.status == 503).count(),
        after.iter().filter(|o| o.status == 0).count(),
    );
    assert!(log.contains("all requests finished"), "{log}");
}
