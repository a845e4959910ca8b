//! Sidecar mode end to end: the real `csgd` with its proxy listener in front of a real upstream
//! process (`csgd-test-upstream`, which echoes and logs what it receives), driven over loopback
//! with Fashion-MNIST test images, committed PGD images (`tests/data/adversarial`) and noise.
//! Which images are adversarial is asked of csgd's own `/v1/detect`, never hard-coded.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::http::{Reply, b64, multipart_named, noise_png, raw, send};
use common::{Daemon, Upstream, fashion_test, fnv1a, logged_header, metric_value, parse, png};
use serde_json::{Value, json};

/// Guarded routes of every kind and policy over the given upstream.
fn config(upstream: &str, proxy: &str, routes: &str) -> String {
    format!(
        "[proxy]\nenabled = true\nlisten = \"127.0.0.1:0\"\nupstream = \"http://{upstream}\"\n{proxy}\n{routes}"
    )
}

const ROUTES: &str = r#"
[[proxy.routes]]
path = "/block"
image = "raw"
policy = "block"
[[proxy.routes]]
path = "/tag"
image = "raw"
policy = "tag"
[[proxy.routes]]
path = "/shadow"
image = "raw"
policy = "shadow"
[[proxy.routes]]
path = "/multipart"
image = "multipart"
field = "image"
policy = "block"
[[proxy.routes]]
path = "/json"
image = "json"
field = "/instances/0/b64"
policy = "block"
[[proxy.routes]]
path = "/v2/models/*/infer"
image = "v2"
policy = "block"
"#;

fn post_png(url: &str, image: &[u8], id: &str) -> Reply {
    send(
        url,
        "POST",
        &[("content-type", "image/png"), ("x-test-id", id)],
        image,
    )
}

/// csgd's own verdict on a PNG: (is_adversarial, score).
fn detect(d: &Daemon, image: &[u8]) -> (bool, f64) {
    let (status, text) = d.post("/v1/detect", "image/png", image);
    assert_eq!(status, 200, "{text}");
    let r = parse(&text);
    let flag = r["is_adversarial"]
        .as_bool()
        .expect("the proxy tests need a calibrated model (csgd calibrate)");
    (flag, r["score"].as_f64().unwrap())
}

/// The ids (`x-test-id`) of the requests the upstream received.
fn received_ids(up: &Upstream) -> Vec<String> {
    up.log()
        .iter()
        .filter_map(|e| logged_header(e, "x-test-id").map(str::to_owned))
        .collect()
}

fn entry_with_id(up: &Upstream, id: &str) -> Value {
    up.log()
        .into_iter()
        .find(|e| logged_header(e, "x-test-id") == Some(id))
        .unwrap_or_else(|| panic!("the upstream never received {id}"))
}

/// The committed PGD images and a few noise images, the candidates for "flagged".
fn suspicious_images() -> Vec<(String, Vec<u8>)> {
    let dir = common::repo().join("tests/data/adversarial");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    paths.sort();
    let mut out: Vec<(String, Vec<u8>)> = paths
        .iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (format!("pgd-{name}"), std::fs::read(p).unwrap())
        })
        .collect();
    out.extend((0..3).map(|s| (format!("noise-{s}"), noise_png(s + 1))));
    out
}

/// Clean test images the detector does not flag (up to `n`), as PNGs.
fn clean_images(d: &Daemon, n: usize) -> Vec<Vec<u8>> {
    let (images, _) = fashion_test(3 * n);
    let clean: Vec<Vec<u8>> = images
        .iter()
        .map(|p| png(p))
        .filter(|img| !detect(d, img).0)
        .take(n)
        .collect();
    assert!(
        clean.len() >= n / 2,
        "only {} of {} test images judged clean",
        clean.len(),
        3 * n
    );
    clean
}

fn v2_bytes_request(images: &[&[u8]]) -> Vec<u8> {
    let data: Vec<String> = images.iter().map(|i| b64(i)).collect();
    json!({"inputs": [{"name": "image_bytes", "shape": [images.len()], "datatype": "BYTES", "data": data}]})
        .to_string()
        .into_bytes()
}

#[test]
fn clean_images_reach_upstream_and_answers_come_back_byte_for_byte() {
    let up = Upstream::start();
    let d = Daemon::start_with_config(&config(&up.addr, "", ROUTES), &[]);
    let proxy = d.proxy_base.clone().unwrap();
    let clean = clean_images(&d, 10);

    for (i, img) in clean.iter().enumerate() {
        let id = format!("clean-{i}");
        let via = post_png(&format!("{proxy}/block?i={i}"), img, &id);
        let direct = post_png(
            &up.url(&format!("/block?i={i}")),
            img,
            &format!("direct-{i}"),
        );
        assert_eq!(via.status, 200, "{}", String::from_utf8_lossy(&via.body));
        assert_eq!(direct.status, 200);
        assert_eq!(via.body, direct.body, "image {i}: answers differ");
        assert_eq!(via.body, *img, "the upstream echoes what it received");
        let entry = entry_with_id(&up, &id);
        assert_eq!(entry["uri"], format!("/block?i={i}"));
        assert_eq!(entry["fnv"], fnv1a(img));
        assert_eq!(logged_header(&entry, "x-csgd-verdict"), Some("clean"));
    }

    // The other image locations, each forwarded byte for byte.
    let img = &clean[0];
    let (ct, body) = multipart_named(&[("meta", b"{}"), ("image", img)]);
    let json_body = json!({"instances": [{"b64": b64(img)}]})
        .to_string()
        .into_bytes();
    let v2_body = v2_bytes_request(&[img, &clean[1]]);
    for (path, ct, body) in [
        ("/multipart", ct.as_str(), &body),
        ("/json", "application/json", &json_body),
        ("/v2/models/classifier/infer", "application/json", &v2_body),
    ] {
        let via = send(
            &format!("{proxy}{path}"),
            "POST",
            &[("content-type", ct), ("x-test-id", path)],
            body,
        );
        assert_eq!(
            via.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&via.body)
        );
        assert_eq!(&via.body, body, "{path}");
        let entry = entry_with_id(&up, path);
        assert_eq!(
            logged_header(&entry, "x-csgd-verdict"),
            Some("clean"),
            "{path}"
        );
    }

    // tag: the verdict and the very score csgd computes travel in headers; shadow: untouched.
    let (_, score) = detect(&d, img);
    assert_eq!(post_png(&format!("{proxy}/tag"), img, "tag-0").status, 200);
    let entry = entry_with_id(&up, "tag-0");
    assert_eq!(logged_header(&entry, "x-csgd-verdict"), Some("clean"));
    let tagged: f64 = logged_header(&entry, "x-csgd-score")
        .unwrap()
        .parse()
        .unwrap();
    assert!((tagged - score).abs() < 1e-6, "{tagged} vs {score}");
    assert!(logged_header(&entry, "x-csgd-threshold").is_some());
    assert_eq!(logged_header(&entry, "x-csgd-model"), Some(common::MODEL));
    assert_eq!(
        post_png(&format!("{proxy}/shadow"), img, "shadow-0").status,
        200
    );
    let entry = entry_with_id(&up, "shadow-0");
    let tags: Vec<&str> = entry["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h[0].as_str())
        .filter(|k| k.starts_with("x-csgd-"))
        .collect();
    assert!(tags.is_empty(), "shadow added {tags:?}");

    // Keep-alive: sequential requests share pooled upstream connections.
    let conns: BTreeSet<u64> = up
        .log()
        .iter()
        .filter(|e| logged_header(e, "x-test-id").is_some_and(|id| id.starts_with("clean-")))
        .filter_map(|e| e["conn"].as_u64())
        .collect();
    assert!(
        conns.len() <= 2,
        "{} requests used connections {conns:?}",
        clean.len()
    );

    let metrics = d.get("/metrics").1;
    let n = clean.len() as f64;
    assert_eq!(
        metric_value(&metrics, "csgd_proxy_forwarded_total{route=\"/block\""),
        n
    );
    assert_eq!(
        metric_value(
            &metrics,
            "csgd_proxy_tagged_total{route=\"/block\",verdict=\"clean\""
        ),
        n
    );
    assert!(
        metric_value(
            &metrics,
            "csgd_proxy_upstream_duration_seconds_count{route=\"/block\""
        ) >= n
    );
}

#[test]
fn block_mode_keeps_flagged_images_from_upstream() {
    let up = Upstream::start();
    let d = Daemon::start_with_config(&config(&up.addr, "", ROUTES), &[]);
    let proxy = d.proxy_base.clone().unwrap();
    let candidates = suspicious_images();
    let verdicts: Vec<(bool, f64)> = candidates.iter().map(|(_, img)| detect(&d, img)).collect();
    let flagged: BTreeSet<String> = candidates
        .iter()
        .zip(&verdicts)
        .filter(|(_, v)| v.0)
        .map(|((name, _), _)| name.clone())
        .collect();
    println!(
        "{} of {} candidates flagged: {flagged:?}",
        flagged.len(),
        candidates.len()
    );
    assert!(
        !flagged.is_empty(),
        "the detector flags none of the candidates"
    );

    for ((name, img), (flag, score)) in candidates.iter().zip(&verdicts) {
        let r = post_png(&format!("{proxy}/block"), img, &format!("block-{name}"));
        if *flag {
            assert_eq!(r.status, 403, "{name}");
            let body = r.json();
            assert_eq!(body["kind"], "adversarial");
            assert!(body["error"].is_string());
            let blocked_score = body["verdicts"][0]["score"].as_f64().unwrap();
            assert!((blocked_score - score).abs() < 1e-6, "{name}");
        } else {
            assert_eq!(r.status, 200, "{name}");
            assert_eq!(r.body, *img);
        }
        // tag forwards everything, saying what csgd found.
        let id = format!("tag-{name}");
        assert_eq!(post_png(&format!("{proxy}/tag"), img, &id).status, 200);
        let want = if *flag { "adversarial" } else { "clean" };
        assert_eq!(
            logged_header(&entry_with_id(&up, &id), "x-csgd-verdict"),
            Some(want)
        );
        assert_eq!(
            post_png(&format!("{proxy}/shadow"), img, &format!("shadow-{name}")).status,
            200
        );
    }
    let received: BTreeSet<String> = received_ids(&up).into_iter().collect();
    for (name, _) in &candidates {
        let through = received.contains(&format!("block-{name}"));
        assert_eq!(through, !flagged.contains(name), "{name} via /block");
        assert!(
            received.contains(&format!("shadow-{name}")),
            "{name} via /shadow"
        );
    }

    // The same flagged image in other disguises: a batch, other locations, other paths.
    let bad_name = flagged.iter().next().unwrap();
    let bad = &candidates.iter().find(|(n, _)| n == bad_name).unwrap().1;
    let clean = png(&fashion_test(1).0[0]);
    let (ct, mp) = multipart_named(&[("image", &clean), ("image", bad)]);
    let json_body = json!({"instances": [{"b64": format!("data:image/png;base64,{}", b64(bad))}]})
        .to_string()
        .into_bytes();
    let v2_body = v2_bytes_request(&[&clean, bad]);
    for (path, ct, body) in [
        ("/multipart", ct.as_str(), &mp),
        ("/json", "application/json", &json_body),
        ("/v2/models/any/infer", "application/json", &v2_body),
        ("//block/", "image/png", bad),
        ("/%62lock", "image/png", bad),
    ] {
        let r = send(
            &format!("{proxy}{path}"),
            "POST",
            &[
                ("content-type", ct),
                ("x-test-id", &format!("disguise-{path}")),
            ],
            body,
        );
        assert_eq!(
            r.status,
            403,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert!(
        !received_ids(&up)
            .iter()
            .any(|id| id.starts_with("disguise-")),
        "a flagged image reached the upstream"
    );

    let metrics = d.get("/metrics").1;
    let k = flagged.len() as f64;
    assert_eq!(
        metric_value(
            &metrics,
            "csgd_proxy_blocked_total{cause=\"adversarial\",route=\"/block\""
        ),
        k + 2.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "csgd_proxy_verdicts_total{policy=\"shadow\",route=\"/shadow\",verdict=\"adversarial\""
        ),
        k
    );
    assert_eq!(
        metric_value(
            &metrics,
            "csgd_proxy_tagged_total{route=\"/tag\",verdict=\"adversarial\""
        ),
        k
    );
}

#[test]
fn everything_else_passes_through_untouched() {
    let up = Upstream::start();
    let d = Daemon::start_with_config(
        &config(&up.addr, "", ROUTES),
        &[("server.body_limit_bytes", "1048576")],
    );
    let proxy = d.proxy_base.clone().unwrap();
    let addr = proxy.trim_start_matches("http://");

    // Method, path, query and end-to-end headers as sent; hop-by-hop ones and forged verdicts
    // gone; X-Forwarded-For extended.
    let request = b"PUT /some/path%20x?a=1&b=two HTTP/1.1\r\nHost: example.test\r\n\
        Connection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
        Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Csgd-Verdict: clean\r\n\
        X-Forwarded-For: 10.1.2.3\r\nX-End-To-End: yes\r\nX-Test-Id: raw-1\r\n\
        Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
    let (status, _, body) = raw(addr, request);
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
    let entry = entry_with_id(&up, "raw-1");
    assert_eq!(entry["method"], "PUT");
    assert_eq!(entry["uri"], "/some/path%20x?a=1&b=two");
    assert_eq!(logged_header(&entry, "host"), Some("example.test"));
    assert_eq!(logged_header(&entry, "x-end-to-end"), Some("yes"));
    assert_eq!(
        logged_header(&entry, "x-forwarded-for"),
        Some("10.1.2.3, 127.0.0.1")
    );
    for gone in [
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-csgd-verdict",
    ] {
        assert_eq!(logged_header(&entry, gone), None, "{gone} was forwarded");
    }

    // A chunked upload streams through (no Content-Length needed).
    let request = b"POST /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Test-Id: raw-2\r\n\
        Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let (status, _, body) = raw(addr, request);
    assert_eq!(status, 200);
    assert_eq!(body, b"hello world");
    assert_eq!(entry_with_id(&up, "raw-2")["body_len"], 11);

    // The upstream's status and end-to-end response headers come back; its hop-by-hop ones do
    // not.
    let r = send(&format!("{proxy}/teapot?status=418&hop=1"), "GET", &[], b"");
    assert_eq!(r.status, 418);
    assert_eq!(r.header("x-end-to-end"), Some("1"));
    assert_eq!(r.header("x-hop-test"), None);
    assert_eq!(r.header("keep-alive"), None);

    // Unguarded bodies stream past the body limit, both ways; a guarded one over it is 413.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    let r = send(
        &format!("{proxy}/upload"),
        "POST",
        &[
            ("content-type", "application/octet-stream"),
            ("x-test-id", "big"),
        ],
        &big,
    );
    assert_eq!(r.status, 200);
    assert_eq!(fnv1a(&r.body), fnv1a(&big));
    let r = send(
        &format!("{proxy}/block"),
        "POST",
        &[("content-type", "image/png"), ("x-test-id", "big-guarded")],
        &big,
    );
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["kind"], "body_too_large");
    assert!(!received_ids(&up).contains(&"big-guarded".to_owned()));
    let via = send(&format!("{proxy}/blob?bytes=20000000"), "GET", &[], b"");
    let direct = send(&up.url("/blob?bytes=20000000"), "GET", &[], b"");
    assert_eq!(via.status, 200);
    assert_eq!(via.body.len(), 20_000_000);
    assert_eq!(fnv1a(&via.body), fnv1a(&direct.body));

    // A guarded route that does not hold what it declares: a 4xx from csgd, not forwarded.
    let r = post_png(&format!("{proxy}/block"), b"not an image", "garbage");
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(!received_ids(&up).contains(&"garbage".to_owned()));
    // Methods a route does not guard pass through.
    let r = send(
        &format!("{proxy}/block"),
        "GET",
        &[("x-test-id", "get-block")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(received_ids(&up).contains(&"get-block".to_owned()));
}

#[test]
fn each_failure_policy_gives_its_documented_answer() {
    // Images wait 2 s for a batch that never fills, far past the 100 ms request timeout: csgd
    // cannot judge any of them.
    let routes = r#"
[[proxy.routes]]
path = "/open"
image = "raw"
policy = "tag"
on_error = "fail-open"
[[proxy.routes]]
path = "/block-open"
image = "raw"
policy = "block"
on_error = "fail-open"
[[proxy.routes]]
path = "/closed"
image = "raw"
policy = "block"
[[proxy.routes]]
path = "/shadow"
image = "raw"
policy = "shadow"
"#;
    let up = Upstream::start();
    let d = Daemon::start_with_config(
        &config(&up.addr, "on_error = \"fail-closed\"", routes),
        &[
            ("server.request_timeout_ms", "100"),
            ("batching.max_wait_us", "2000000"),
            ("batching.max_batch_size", "64"),
        ],
    );
    let proxy = d.proxy_base.clone().unwrap();
    let img = png(&fashion_test(1).0[0]);
    for path in ["/open", "/block-open"] {
        let r = post_png(&format!("{proxy}{path}"), &img, path);
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.body, img);
        let entry = entry_with_id(&up, path);
        assert_eq!(logged_header(&entry, "x-csgd-verdict"), Some("unchecked"));
        assert_eq!(logged_header(&entry, "x-csgd-error"), Some("timeout"));
    }
    let started = Instant::now();
    let r = post_png(&format!("{proxy}/closed"), &img, "closed");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(r.status, 503);
    let body = r.json();
    assert_eq!(body["kind"], "unchecked");
    assert_eq!(body["cause"], "timeout");
    assert!(body["error"].as_str().unwrap().contains("fails closed"));
    assert!(!received_ids(&up).contains(&"closed".to_owned()));
    assert_eq!(
        post_png(&format!("{proxy}/shadow"), &img, "shadow").status,
        200
    );
    let entry = entry_with_id(&up, "shadow");
    assert_eq!(logged_header(&entry, "x-csgd-verdict"), None);

    let metrics = d.get("/metrics").1;
    assert_eq!(
        metric_value(&metrics, "csgd_proxy_unchecked_total{cause=\"timeout\""),
        4.0
    );
    assert_eq!(
        metric_value(&metrics, "csgd_proxy_blocked_total{cause=\"fail_closed\""),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "csgd_proxy_tagged_total{verdict=\"unchecked\""),
        2.0
    );
}

#[test]
fn upstream_faults_get_clear_answers_never_hangs() {
    // Down: nothing listens on the upstream port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::start_with_config(&config(&format!("127.0.0.1:{port}"), "", ROUTES), &[]);
    let proxy = d.proxy_base.clone().unwrap();
    let img = png(&fashion_test(1).0[0]);
    for r in [
        send(&format!("{proxy}/anything"), "GET", &[], b""),
        post_png(&format!("{proxy}/block"), &img, "down"),
    ] {
        assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["kind"], "upstream_unavailable");
    }
    let metrics = d.get("/metrics").1;
    assert_eq!(
        metric_value(
            &metrics,
            "csgd_proxy_upstream_errors_total{kind=\"connect\""
        ),
        2.0
    );
    drop(d);

    // Slow and reset, with a short upstream timeout.
    let up = Upstream::start();
    let mut d =
        Daemon::start_with_config(&config(&up.addr, "upstream_timeout_ms = 500", ROUTES), &[]);
    let proxy = d.proxy_base.clone().unwrap();
    let started = Instant::now();
    let r = send(&format!("{proxy}/slow?delay_ms=10000"), "GET", &[], b"");
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["kind"], "upstream_timeout");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("proxy.upstream_timeout_ms")
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let r = post_png(&format!("{proxy}/block"), &img, "slow-guarded");
    assert_eq!(r.status, 200, "fast requests still pass");
    let r = send(&format!("{proxy}/reset"), "GET", &[], b"");
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["kind"], "upstream_reset");
    assert_eq!(send(&format!("{proxy}/after"), "GET", &[], b"").status, 200);
    let metrics = d.get("/metrics").1;
    assert_eq!(
        metric_value(
            &metrics,
            "csgd_proxy_upstream_errors_total{kind=\"timeout\""
        ),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "csgd_proxy_upstream_errors_total{kind=\"reset\""),
        1.0
    );

    // Shutdown drains the proxy too: a request in flight finishes, then the daemon exits.
    let url = format!("{proxy}/draining?delay_ms=300");
    let in_flight = std::thread::spawn(move || send(&url, "GET", &[], b"").status);
    std::thread::sleep(Duration::from_millis(100));
    d.sigterm();
    assert_eq!(in_flight.join().unwrap(), 200);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}
