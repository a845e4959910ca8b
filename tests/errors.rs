//! Client mistakes and overload get the right status and error kind, never a 500 or a panic.

mod common;
#[path = "../src/testing/png_bomb.rs"]
mod png_bomb;

use std::sync::Arc;
use std::thread;

use common::{Daemon, fashion_test, metric_value, multipart, parse, png};
use png_bomb::png_bomb;
use serde_json::json;

#[test]
fn client_mistakes_get_the_right_status_and_kind() {
    let d = Daemon::start(
        &[
            ("server.body_limit_bytes", "65536"),
            ("server.max_pixels", "10000"),
            ("server.max_images_per_request", "4"),
        ],
        &[],
    );
    let (images, _) = fashion_test(5);
    let good = png(&images[0]);
    let big = {
        let img = image::GrayImage::from_fn(200, 200, |x, y| image::Luma([((x * y) % 256) as u8]));
        let mut out = Vec::new();
        image::DynamicImage::ImageLuma8(img)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let bomb = png_bomb(100_000, 100_000);
    let (mp_ct, mp_body) = multipart(&vec![good.clone(); 5]);
    let detect = "/v1/detect";
    type Case<'a> = (&'a str, &'a str, String, Vec<u8>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "text",
            "POST",
            detect.into(),
            b"hello".to_vec(),
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        (
            "gif",
            "POST",
            detect.into(),
            b"GIF89a...".to_vec(),
            415,
            "unsupported_media_type",
            "image/gif",
        ),
        (
            "sniffed junk",
            "POST",
            detect.into(),
            b"not an image".to_vec(),
            415,
            "unsupported_media_type",
            "",
        ),
        (
            "body",
            "POST",
            detect.into(),
            vec![0u8; 100_000],
            413,
            "body_too_large",
            "application/octet-stream",
        ),
        (
            "pixels",
            "POST",
            detect.into(),
            big,
            413,
            "too_many_pixels",
            "image/png",
        ),
        (
            "bomb",
            "POST",
            detect.into(),
            bomb,
            413,
            "too_many_pixels",
            "",
        ),
        (
            "images",
            "POST",
            detect.into(),
            mp_body,
            413,
            "too_many_images",
            mp_ct.as_str(),
        ),
        (
            "garbage png",
            "POST",
            detect.into(),
            b"\x89PNG\r\n\x1a\ngarbage!".to_vec(),
            422,
            "undecodable_image",
            "image/png",
        ),
        (
            "truncated jpeg",
            "POST",
            detect.into(),
            vec![0xff, 0xd8, 0xff, 0xe0, 0, 16],
            422,
            "undecodable_image",
            "image/jpeg",
        ),
        (
            "shape",
            "POST",
            detect.into(),
            json!({"tensor": vec![vec![vec![0.0f32; 28]; 27]]})
                .to_string()
                .into_bytes(),
            422,
            "wrong_shape",
            "application/json",
        ),
        (
            "non-number",
            "POST",
            detect.into(),
            json!({"tensor": vec![vec![vec!["x"; 28]; 28]]})
                .to_string()
                .into_bytes(),
            422,
            "wrong_shape",
            "application/json",
        ),
        (
            "unknown model",
            "POST",
            "/v1/models/nope/detect".into(),
            good.clone(),
            404,
            "unknown_model",
            "image/png",
        ),
        (
            "unknown model info",
            "GET",
            "/v1/models/nope".into(),
            vec![],
            404,
            "unknown_model",
            "",
        ),
        (
            "unknown route",
            "GET",
            "/v2/whatever".into(),
            vec![],
            404,
            "not_found",
            "",
        ),
        (
            "method",
            "GET",
            detect.into(),
            vec![],
            405,
            "method_not_allowed",
            "",
        ),
        (
            "bad json",
            "POST",
            detect.into(),
            b"{\"tensor\": [".to_vec(),
            400,
            "malformed",
            "application/json",
        ),
        (
            "json shape",
            "POST",
            detect.into(),
            b"[1, 2, 3]".to_vec(),
            400,
            "malformed",
            "application/json",
        ),
        (
            "no key",
            "POST",
            detect.into(),
            b"{\"image\": 1}".to_vec(),
            400,
            "malformed",
            "application/json",
        ),
        (
            "bad base64",
            "POST",
            detect.into(),
            b"{\"images\": [\"%%%\"]}".to_vec(),
            400,
            "malformed",
            "application/json",
        ),
        (
            "empty body",
            "POST",
            detect.into(),
            vec![],
            400,
            "malformed",
            "image/png",
        ),
        (
            "empty batch",
            "POST",
            detect.into(),
            b"{\"images\": []}".to_vec(),
            400,
            "malformed",
            "application/json",
        ),
        (
            "bad multipart",
            "POST",
            detect.into(),
            b"--x\r\nnope".to_vec(),
            400,
            "malformed",
            "multipart/form-data",
        ),
    ];
    let agent = common::agent();
    for (what, method, path, body, status, kind, ct) in &cases {
        let url = d.url(path);
        let (got, text) = if *method == "GET" {
            common::get_url(&agent, &url)
        } else {
            common::post_url(&agent, &url, ct, body)
        };
        assert_eq!(got, *status, "{what}: {text}");
        let r = parse(&text);
        assert_eq!(r["kind"], *kind, "{what}: {r}");
        assert!(
            r["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {r}"
        );
    }
    // Limits say which key to raise.
    let r = parse(
        &d.post(detect, "application/octet-stream", &vec![0u8; 100_000])
            .1,
    );
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("server.body_limit_bytes"),
        "{r}"
    );
    let r = parse(&d.post(detect, "image/png", &png_of_size(150)).1);
    assert!(
        r["error"].as_str().unwrap().contains("server.max_pixels"),
        "{r}"
    );
    // The daemon is unharmed, and the failures are counted by cause.
    assert_eq!(d.post(detect, "image/png", &good).0, 200);
    let metrics = d.get("/metrics").1;
    assert!(
        metric_value(
            &metrics,
            "csgd_request_failures_total{cause=\"too_many_pixels\""
        ) >= 2.0
    );
    assert!(
        metric_value(
            &metrics,
            "csgd_request_failures_total{cause=\"unsupported_media_type\""
        ) >= 3.0
    );
    assert_eq!(
        metric_value(&metrics, "csgd_http_requests_total{status=\"500\""),
        0.0
    );
}

fn png_of_size(side: u32) -> Vec<u8> {
    let img = image::GrayImage::new(side, side);
    let mut out = Vec::new();
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[test]
fn overload_is_answered_429() {
    // One request at a time, and each waits 300 ms in the batcher: concurrent ones are refused.
    let d = Arc::new(Daemon::start(
        &[
            ("server.max_concurrent_requests", "1"),
            ("batching.max_wait_us", "300000"),
        ],
        &[],
    ));
    let (images, _) = fashion_test(1);
    let body = Arc::new(png(&images[0]));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (d, body) = (Arc::clone(&d), Arc::clone(&body));
            thread::spawn(move || d.post("/v1/detect", "image/png", &body))
        })
        .collect();
    let answers: Vec<(u16, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let overloaded: Vec<&String> = answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, t)| t)
        .collect();
    assert!(ok >= 1, "{answers:?}");
    assert!(!overloaded.is_empty(), "{answers:?}");
    assert_eq!(ok + overloaded.len(), answers.len(), "{answers:?}");
    let r = parse(overloaded[0]);
    assert_eq!(r["kind"], "overloaded");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("server.max_concurrent_requests")
    );
}

#[test]
fn slow_requests_time_out_with_503() {
    // Batches wait 400 ms for company; the request may take 100 ms.
    let d = Daemon::start(
        &[
            ("server.request_timeout_ms", "100"),
            ("batching.max_wait_us", "400000"),
        ],
        &[],
    );
    let (images, _) = fashion_test(1);
    let (status, text) = d.post("/v1/detect", "image/png", &png(&images[0]));
    assert_eq!(status, 503, "{text}");
    let r = parse(&text);
    assert_eq!(r["kind"], "timeout");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("server.request_timeout_ms")
    );
    // Health is not subject to it.
    assert_eq!(d.get("/health/ready").0, 200);
}

/// Reads from `stream` until the server closes it or `limit` passes; what it sent.
fn read_until_closed(stream: &mut std::net::TcpStream, limit: std::time::Duration) -> Vec<u8> {
    use std::io::Read;
    stream
        .set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return got,
        }
    }
    panic!("the connection was still open after {limit:?}");
}

#[test]
fn slow_and_oversized_request_heads_and_connection_floods_are_bounded() {
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let d = Daemon::start(
        &[
            ("server.header_read_timeout_ms", "500"),
            ("server.max_header_bytes", "16384"),
            ("server.max_connections", "4"),
        ],
        &[],
    );
    let addr = d.base.trim_start_matches("http://").to_owned();

    // A head trickled a byte at a time is cut off after the timeout, without an answer.
    let mut slow = TcpStream::connect(&addr).unwrap();
    let started = Instant::now();
    for byte in b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nX-Slow: 0123456789" {
        if slow.write_all(&[*byte]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(40));
    }
    let got = read_until_closed(&mut slow, Duration::from_secs(5));
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(started.elapsed() < Duration::from_secs(5));

    // A head that fills server.max_header_bytes without ending gets 431. Exactly that many
    // bytes, so the daemon has read all of them when it closes (unread bytes would make the
    // kernel reset the connection and drop the answer).
    let mut big = TcpStream::connect(&addr).unwrap();
    let mut head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    head.resize(16384, b'a');
    big.write_all(&head).unwrap();
    let got = read_until_closed(&mut big, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");

    // Four connections held open take every slot: a fifth waits until one closes.
    let live = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(live).unwrap();
            s
        })
        .collect();
    for s in &mut held {
        use std::io::Read;
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    let mut fifth = TcpStream::connect(&addr).unwrap();
    fifth.write_all(live).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(
        std::io::Read::read(&mut fifth, &mut buf).is_err(),
        "a fifth connection was served beyond server.max_connections = 4"
    );
    held.pop();
    fifth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = std::io::Read::read(&mut fifth, &mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(held);
    drop(fifth);
    // The daemon serves as before.
    thread::sleep(Duration::from_millis(100));
    assert_eq!(d.get("/health/ready").0, 200);
}
