//! Explanations end to end: the explain routes of the real daemon, the `csgd explain` command,
//! the deletion test of the localisation maps on real Fashion-MNIST test images
//! ([`deletion`]), and the cost of an explanation against a detect call ([`cost`]). See
//! `common` for the environment variables.
//!
//! The deletion table and the costs are printed: run with `-- --nocapture` to see them.

#[path = "../common/mod.rs"]
mod common;
mod cost;
mod deletion;

use std::path::PathBuf;

use base64::Engine;
use common::{Daemon, MODEL, fashion_test, multipart, parse, png};
use csgd::config::RuntimeConfig;
use serde_json::Value;

pub fn cfg() -> RuntimeConfig {
    RuntimeConfig {
        ort_library: common::ort_library().display().to_string(),
        intra_op_threads: 1,
        ..RuntimeConfig::default()
    }
}

pub fn std_model_path() -> PathBuf {
    let p = common::repo().join("models/fashion-std.onnx");
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// POSTs with an Accept header; returns (status, content type, body bytes).
pub fn post_accept(d: &Daemon, path: &str, body: &[u8], accept: &str) -> (u16, String, Vec<u8>) {
    let mut r = common::agent()
        .post(&d.url(path))
        .header("Content-Type", "image/png")
        .header("Accept", accept)
        .send(body)
        .expect("request");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (r.status().as_u16(), ct, r.body_mut().read_to_vec().unwrap())
}

fn decode_data_url(url: &Value) -> image::DynamicImage {
    let text = url.as_str().expect("a data URL string");
    let b64 = text
        .strip_prefix("data:image/png;base64,")
        .unwrap_or_else(|| panic!("not a PNG data URL: {}", &text[..text.len().min(40)]));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    image::load_from_memory(&bytes).expect("a decodable PNG")
}

fn ids(filters: &Value) -> Vec<u64> {
    filters
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["filter"].as_u64().unwrap())
        .collect()
}

/// The explanation must give the detect answer's verdict for the same image.
pub fn assert_agrees(explained: &Value, detected: &Value) {
    for key in [
        "class_id",
        "label",
        "is_adversarial",
        "score_name",
        "threshold",
    ] {
        assert_eq!(explained[key], detected[key], "{key}");
    }
    let close = |a: &Value, b: &Value, what: &str| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "{what}: {a} vs {b}"
        );
    };
    close(
        &explained["probability"],
        &detected["probability"],
        "probability",
    );
    close(&explained["score"], &detected["score"], "score");
    let (ec, dc) = (
        explained["components"].as_array().unwrap(),
        detected["components"].as_array().unwrap(),
    );
    assert_eq!(ec.len(), dc.len());
    for (e, d) in ec.iter().zip(dc) {
        assert_eq!(e["name"], d["name"]);
        close(&e["score"], &d["score"], "component score");
        if d["p_value"].is_number() {
            close(&e["p_value"], &d["p_value"], "p-value");
        }
    }
    assert_eq!(
        ids(&explained["top_filters"]),
        ids(&detected["top_filters"])
    );
}

#[test]
fn explanations_have_their_shape_and_agree_with_detect() {
    let d = Daemon::start(&[], &[]);
    let (info_status, info) = d.get(&format!("/v1/models/{MODEL}"));
    assert_eq!(info_status, 200);
    assert_eq!(parse(&info)["explain"]["available"], true, "{info}");
    let (images, _) = fashion_test(12);
    for (i, img) in images.iter().enumerate() {
        let body = png(img);
        let (status, text) = d.post("/v1/detect", "image/png", &body);
        assert_eq!(status, 200, "{text}");
        let detected = parse(&text);
        let path = if i % 2 == 0 {
            "/v1/explain".to_owned()
        } else {
            format!("/v1/models/{MODEL}/explain")
        };
        let (status, text) = d.post(&path, "image/png", &body);
        assert_eq!(status, 200, "{text}");
        let e = parse(&text);
        assert_agrees(&e, &detected);
        assert_eq!(e["model"]["name"], MODEL);
        assert_eq!(e["gate"], "learned");
        for key in ["preprocess_us", "inference_us", "total_us"] {
            assert!(e["timings"][key].is_u64(), "timings.{key}");
        }

        // The predicted class's gated filters, all of them, largest |z| first.
        let class_filters = e["class_filters"].as_array().unwrap();
        assert!(!class_filters.is_empty());
        let z: Vec<f64> = class_filters
            .iter()
            .map(|f| f["z"].as_f64().unwrap().abs())
            .collect();
        assert!(z.windows(2).all(|p| p[0] >= p[1]), "{z:?}");
        assert!(
            class_filters
                .iter()
                .all(|f| f["gate"].as_f64().unwrap() >= 0.5)
        );
        let top = ids(&e["top_filters"]);
        assert_eq!(ids(&e["class_filters"])[..top.len()], top[..]);
        // Other classes' filters: never the predicted class's, highest z first.
        let others = e["other_filters"].as_array().unwrap();
        assert!(!others.is_empty() && others.len() <= 5);
        let own = ids(&e["class_filters"]);
        for f in others {
            assert!(!own.contains(&f["filter"].as_u64().unwrap()));
            let classes = f["classes"].as_array().unwrap();
            assert!(!classes.is_empty() && !classes.contains(&e["label"]), "{f}");
        }
        let oz: Vec<f64> = others.iter().map(|f| f["z"].as_f64().unwrap()).collect();
        assert!(oz.windows(2).all(|p| p[0] >= p[1]), "{oz:?}");

        // Both maps as 28 rows of 28 numbers within their stated range, and as 224×224 PNGs.
        assert_eq!(e["maps"]["feature_size"], serde_json::json!([7, 7]));
        for kind in ["gated", "cam"] {
            let map = &e["maps"][kind];
            let rows = map["values"].as_array().unwrap();
            assert_eq!(rows.len(), 28, "{kind}");
            let (lo, hi) = (map["min"].as_f64().unwrap(), map["max"].as_f64().unwrap());
            assert!(hi > lo, "{kind}: flat map");
            for row in rows {
                let row = row.as_array().unwrap();
                assert_eq!(row.len(), 28);
                assert!(row.iter().all(|v| {
                    let v = v.as_f64().unwrap();
                    v >= lo - 1e-4 && v <= hi + 1e-4
                }));
            }
            let img = decode_data_url(&e["png"][kind]);
            assert_eq!((img.width(), img.height()), (224, 224), "{kind}");
        }
        // The gated map sums non-negative feature maps with non-negative weights.
        assert!(e["maps"]["gated"]["min"].as_f64().unwrap() >= 0.0);
    }
}

#[test]
fn png_answers_options_and_errors() {
    let d = Daemon::start(&[], &[]);
    let (images, _) = fashion_test(2);
    let body = png(&images[0]);
    let explain = format!("/v1/models/{MODEL}/explain");

    let (status, ct, gated) = post_accept(&d, &explain, &body, "image/png");
    assert_eq!((status, ct.as_str()), (200, "image/png"));
    let img = image::load_from_memory(&gated).expect("decodable PNG");
    assert_eq!((img.width(), img.height()), (224, 224));
    let (status, _, cam) = post_accept(
        &d,
        &format!("{explain}?map=cam&scale=2"),
        &body,
        "image/png",
    );
    assert_eq!(status, 200);
    let cam = image::load_from_memory(&cam).unwrap();
    assert_eq!((cam.width(), cam.height()), (56, 56));
    let gated_small = image::load_from_memory(
        &post_accept(&d, &format!("{explain}?scale=2"), &body, "image/png").2,
    )
    .unwrap();
    assert_ne!(
        gated_small.to_rgb8(),
        cam.to_rgb8(),
        "map=cam drew the gated map"
    );
    // JSON wins when listed first; png=false leaves the PNGs out.
    let (status, ct, json) = post_accept(
        &d,
        &format!("{explain}?png=false&top=3"),
        &body,
        "application/json, image/png",
    );
    assert_eq!((status, ct.as_str()), (200, "application/json"));
    let e: Value = serde_json::from_slice(&json).unwrap();
    assert!(e.get("png").is_none());
    assert_eq!(e["other_filters"].as_array().unwrap().len(), 3);

    let expect = |path: &str, ct: &str, body: &[u8], status: u16, kind: &str| {
        let (got, text) = d.post(path, ct, body);
        assert_eq!(got, status, "{path}: {text}");
        let v = parse(&text);
        assert_eq!(v["kind"], kind, "{path}: {text}");
        assert!(!v["error"].as_str().unwrap().is_empty());
    };
    expect(
        "/v1/models/nope/explain",
        "image/png",
        &body,
        404,
        "unknown_model",
    );
    for bad in [
        "scale=0",
        "scale=17",
        "scale=x",
        "map=heat",
        "top=1000",
        "colour=red",
        "png=maybe",
    ] {
        expect(
            &format!("{explain}?{bad}"),
            "image/png",
            &body,
            400,
            "bad_option",
        );
    }
    expect(
        &explain,
        "image/png",
        b"not a png",
        422,
        "undecodable_image",
    );
    expect(&explain, "image/gif", &body, 415, "unsupported_media_type");
    let (ct, two) = multipart(&[body.clone(), png(&images[1])]);
    expect(&explain, &ct, &two, 413, "too_many_images");
    expect(
        &explain,
        "application/json",
        b"{\"tensor\": [1, 2]}",
        422,
        "wrong_shape",
    );

    // Counted like every route, by its template and the model.
    let metrics = d.get("/metrics").1;
    let ok = common::metric_value(
        &metrics,
        &format!(
            "csgd_http_requests_total{{model=\"{MODEL}\",route=\"/v1/models/{{name}}/explain\",status=\"200\""
        ),
    );
    let bad = common::metric_value(
        &metrics,
        &format!("csgd_request_failures_total{{model=\"{MODEL}\",cause=\"bad_option\""),
    );
    assert_eq!(ok, 4.0, "{metrics}");
    assert_eq!(bad, 7.0);
}

#[test]
fn a_bundle_without_feature_map_is_served_but_not_explained() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = csg_bundle::onnx::read_meta(&common::model_path()).unwrap();
    meta.outputs.feature_map = None;
    let path = dir.path().join("plain.onnx");
    std::fs::copy(common::model_path(), &path).unwrap();
    csg_bundle::onnx::write_meta(&path, &meta).unwrap();
    let d = Daemon::start(&[], &["--model", &format!("plain={}", path.display())]);
    let (images, _) = fashion_test(1);
    let body = png(&images[0]);
    let (status, text) = d.post("/v1/models/plain/explain", "image/png", &body);
    assert_eq!(status, 409, "{text}");
    let v = parse(&text);
    assert_eq!(v["kind"], "not_explainable");
    assert!(
        v["error"].as_str().unwrap().contains("--feature-map"),
        "{v}"
    );
    let info = parse(&d.get("/v1/models/plain").1);
    assert_eq!(info["explain"]["available"], false);
    assert_eq!(d.post("/v1/models/plain/detect", "image/png", &body).0, 200);
    assert_eq!(
        d.post(&format!("/v1/models/{MODEL}/explain"), "image/png", &body)
            .0,
        200
    );
}

#[test]
fn the_command_line_writes_json_and_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let (images, _) = fashion_test(3);
    let inputs: Vec<PathBuf> = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let p = dir.path().join(format!("img{i}.png"));
            std::fs::write(&p, png(img)).unwrap();
            p
        })
        .collect();
    let out = dir.path().join("out");
    let result = common::csgd()
        .arg("explain")
        .args(&inputs)
        .args(["--out", out.to_str().unwrap()])
        .args(["--model", common::model_path().to_str().unwrap()])
        .env("ORT_DYLIB_PATH", common::ort_library())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let d = Daemon::start(&[], &[]);
    for (i, img) in images.iter().enumerate() {
        let json: Value =
            serde_json::from_slice(&std::fs::read(out.join(format!("img{i}.json"))).unwrap())
                .unwrap();
        let served = parse(&d.post("/v1/detect", "image/png", &png(img)).1);
        assert_agrees(&json, &served);
        assert_eq!(
            json["maps"]["gated"]["values"].as_array().unwrap().len(),
            28
        );
        for kind in ["gated", "cam"] {
            let img = image::open(out.join(format!("img{i}.{kind}.png"))).unwrap();
            assert_eq!((img.width(), img.height()), (224, 224));
        }
        assert!(stdout.contains(&format!("img{i}.png")), "{stdout}");
    }
}
