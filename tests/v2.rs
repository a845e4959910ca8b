//! The Open Inference Protocol (KServe v2) routes end to end: every route with real requests
//! against the real daemon, JSON and binary tensors, the protocol's error body; and Triton's
//! official HTTP client, unmodified, when Python has it (`tests/clients/triton_v2.py`).

mod common;

use std::process::Command;

use base64::Engine;
use common::{Daemon, MODEL, fashion_test, parse, png};
use serde_json::{Value, json};

fn normaliser(d: &Daemon) -> impl Fn(&[u8]) -> Vec<f32> {
    let (status, text) = d.get(&format!("/v1/models/{MODEL}"));
    assert_eq!(status, 200, "{text}");
    let spec: csg_bundle::InputSpec =
        serde_json::from_value(parse(&text)["input"].clone()).unwrap();
    move |pixels| csgd::preprocess::normalise_gray_u8(pixels, &spec)
}

/// POSTs raw bytes with extra headers; returns status, response headers and body.
fn post(
    d: &Daemon,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut r = common::agent().post(&d.url(path));
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    let mut response = r.send(body).expect("request");
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response.body_mut().read_to_vec().unwrap();
    (response.status().as_u16(), headers, body)
}

fn infer(d: &Daemon, request: &Value) -> (u16, Value) {
    let (status, _, body) = post(
        d,
        &format!("/v2/models/{MODEL}/infer"),
        &[("content-type", "application/json".into())],
        request.to_string().as_bytes(),
    );
    (status, parse(&String::from_utf8_lossy(&body)))
}

fn output<'a>(response: &'a Value, name: &str) -> &'a Value {
    response["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name}: {response}"))
}

#[test]
fn every_v2_route_answers_real_requests() {
    let d = Daemon::start(&[("server.max_images_per_request", "32")], &[]);
    let norm = normaliser(&d);

    let (status, text) = d.get("/v2");
    assert_eq!(status, 200);
    assert_eq!(parse(&text)["name"], "csgd");
    assert!(parse(&text)["extensions"].is_array());
    assert_eq!(d.get("/v2/health/live").0, 200);
    assert_eq!(d.get("/v2/health/ready").0, 200);
    let (status, text) = d.get(&format!("/v2/models/{MODEL}"));
    assert_eq!(status, 200, "{text}");
    let meta = parse(&text);
    assert_eq!(meta["name"], MODEL);
    let version = meta["versions"][0].as_str().unwrap().to_owned();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 1, 28, 28]));
    assert_eq!(meta["inputs"][1]["datatype"], "BYTES");
    let classes = meta["parameters"]["classes"].as_array().unwrap().len();
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, classes]));
    let calibrated = meta["parameters"]["calibrated"].as_bool().unwrap();
    for path in [
        format!("/v2/models/{MODEL}/ready"),
        format!("/v2/models/{MODEL}/versions/{version}"),
        format!("/v2/models/{MODEL}/versions/{version}/ready"),
    ] {
        assert_eq!(d.get(&path).0, 200, "{path}");
    }
    for path in [
        "/v2/models/nope".to_owned(),
        "/v2/models/nope/ready".to_owned(),
        format!("/v2/models/{MODEL}/versions/999999"),
    ] {
        let (status, text) = d.get(&path);
        assert_eq!(status, 404, "{path}");
        assert!(parse(&text)["error"].is_string(), "{path}: {text}");
    }

    // FP32 in the model's shape: the same classes and scores as /v1/detect.
    let (images, _) = fashion_test(20);
    let n = images.len();
    let flat: Vec<f32> = images.iter().flat_map(|p| norm(p)).collect();
    let request = json!({"id": "batch-1", "inputs": [{"name": "image", "shape": [n, 1, 28, 28], "datatype": "FP32", "data": flat}]});
    let (status, r) = infer(&d, &request);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["id"], "batch-1");
    assert_eq!(r["model_name"], MODEL);
    assert_eq!(output(&r, "logits")["shape"], json!([n, classes]));
    let predicted = output(&r, "predicted_class")["data"].clone();
    let scores = output(&r, "score")["data"].clone();
    for (i, img) in images.iter().enumerate() {
        let (status, text) = d.post("/v1/detect", "image/png", &png(img));
        assert_eq!(status, 200);
        let v1 = parse(&text);
        assert_eq!(predicted[i], v1["class_id"], "image {i}");
        let (a, b) = (scores[i].as_f64().unwrap(), v1["score"].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
            "image {i}: {a} vs {b}"
        );
        if calibrated {
            let flag = output(&r, "is_adversarial")["data"][i].clone();
            let threshold = v1["threshold"].as_f64().unwrap();
            if (b - threshold).abs() > 1e-3 {
                assert_eq!(flag, v1["is_adversarial"], "image {i}");
            }
        }
    }

    // BYTES holding PNGs (base64 in JSON), asking for one output.
    let data: Vec<String> = images
        .iter()
        .map(|p| base64::engine::general_purpose::STANDARD.encode(png(p)))
        .collect();
    let request = json!({
        "inputs": [{"name": "image_bytes", "shape": [n], "datatype": "BYTES", "data": data}],
        "outputs": [{"name": "predicted_class"}],
    });
    let (status, r) = infer(&d, &request);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(output(&r, "predicted_class")["data"], predicted);

    // The binary tensor extension, both ways.
    let head = json!({
        "inputs": [{"name": "image", "shape": [2, 1, 28, 28], "datatype": "FP32", "parameters": {"binary_data_size": 2 * 784 * 4}}],
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend(flat[..2 * 784].iter().flat_map(|x| x.to_le_bytes()));
    let (status, headers, reply) = post(
        &d,
        &format!("/v2/models/{MODEL}/versions/{version}/infer"),
        &[("inference-header-content-length", head.len().to_string())],
        &body,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    let json_len: usize = headers
        .iter()
        .find(|(k, _)| k == "inference-header-content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("binary answer has the header-length header");
    let r = parse(&String::from_utf8_lossy(&reply[..json_len]));
    let mut offset = json_len;
    let mut tensors = std::collections::HashMap::new();
    for o in r["outputs"].as_array().unwrap() {
        let size = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        tensors.insert(
            o["name"].as_str().unwrap().to_owned(),
            reply[offset..offset + size].to_vec(),
        );
        offset += size;
    }
    assert_eq!(offset, reply.len());
    let class: Vec<i64> = tensors["predicted_class"]
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(json!(class), json!(predicted.as_array().unwrap()[..2]));
    let logits: Vec<f32> = tensors["logits"]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (row, c) in logits.chunks(classes).zip(&class) {
        let argmax = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(argmax as i64, *c);
    }

    // Protocol errors: 400 (404 for a model) with exactly {"error": "..."}.
    let one = norm(&images[0]);
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"inputs": [{"name": "image", "shape": [1, 1, 27, 28], "datatype": "FP32", "data": one[..756]}]}),
            400,
            "shape",
        ),
        (
            json!({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "INT32", "data": vec![0; 784]}]}),
            400,
            "INT32",
        ),
        (
            json!({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": one[..700]}]}),
            400,
            "values",
        ),
        (
            json!({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}]}),
            400,
            "image",
        ),
        (json!({"inputs": []}), 400, "no inputs"),
        (
            json!({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": one}], "outputs": [{"name": "nope"}]}),
            400,
            "unknown output",
        ),
        (json!({"nothing": 1}), 400, "inputs"),
    ];
    for (request, want, text) in cases {
        let (status, r) = infer(&d, &request);
        assert_eq!(status, want, "{request}: {r}");
        let message = r["error"].as_str().unwrap_or_else(|| panic!("{r}"));
        assert!(message.contains(text), "{message}");
        assert_eq!(r.as_object().unwrap().len(), 1, "only error: {r}");
    }
    let (status, _, body) = post(&d, "/v2/models/nope/infer", &[], b"{}");
    assert_eq!(status, 404);
    assert!(parse(&String::from_utf8_lossy(&body))["error"].is_string());
    let (status, _, _) = post(&d, &format!("/v2/models/{MODEL}/infer"), &[], b"{not json");
    assert_eq!(status, 400);

    let metrics = d.get("/metrics").1;
    assert!(
        common::metric_value(
            &metrics,
            &format!(
                "csgd_http_requests_total{{model=\"{MODEL}\",route=\"/v2/models/{{name}}/infer\",status=\"200\""
            )
        ) >= 2.0
    );
}

/// The interpreter with `tritonclient[http]` (CSGD_TEST_PYTHON, default python3).
fn python() -> String {
    std::env::var("CSGD_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn triton_client_available() -> bool {
    Command::new(python())
        .args(["-c", "import tritonclient.http, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn tritons_http_client_works_unmodified() {
    if !triton_client_available() {
        println!(
            "SKIP tritons_http_client_works_unmodified: {} cannot import tritonclient.http and numpy \
             (pip install 'tritonclient[http]' numpy, or point CSGD_TEST_PYTHON at such an interpreter)",
            python()
        );
        return;
    }
    let d = Daemon::start(&[], &[]);
    let data = std::env::var("CSGD_FASHION_DIR")
        .unwrap_or_else(|_| "/usr/share/datasets/fashion-mnist".into());
    let out = Command::new(python())
        .arg(common::repo().join("tests/clients/triton_v2.py"))
        .arg(d.base.trim_start_matches("http://"))
        .arg(MODEL)
        .arg(data)
        .output()
        .expect("run the Triton client script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Triton client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = parse(stdout.lines().last().unwrap_or(""));
    println!("Triton client: {summary}");
    assert_eq!(summary["server"]["name"], "csgd");
    assert!(summary["correct"].as_u64().unwrap() >= 6, "{summary}");
}
