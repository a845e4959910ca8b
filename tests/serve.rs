//! `csgd serve` end to end: the real binary on a loopback port, driven over HTTP with real
//! Fashion-MNIST test images. See `common` for the environment variables.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::thread;

use base64::Engine;
use common::{Daemon, MODEL, fashion_test, multipart, parse, png};
use serde_json::{Value, json};

/// The input spec the daemon reports, as a closure normalising IDX bytes.
fn normaliser(d: &Daemon) -> impl Fn(&[u8]) -> Vec<f32> {
    let (status, text) = d.get(&format!("/v1/models/{MODEL}"));
    assert_eq!(status, 200, "{text}");
    let spec: csg_bundle::InputSpec =
        serde_json::from_value(parse(&text)["input"].clone()).unwrap();
    move |pixels| csgd::preprocess::normalise_gray_u8(pixels, &spec)
}

fn chw(values: &[f32]) -> Value {
    let rows: Vec<Value> = values.chunks(28).map(|r| json!(r)).collect();
    json!([rows])
}

#[test]
fn real_images_come_back_with_the_right_class() {
    let d = Daemon::start(&[], &[]);
    let (images, labels) = fashion_test(200);
    let mut correct = 0;
    let mut judged = 0;
    let mut clean = 0;
    for (i, (img, &label)) in images.iter().zip(&labels).enumerate() {
        // Alternate between the default route and the named one.
        let path = if i % 2 == 0 {
            "/v1/detect".to_owned()
        } else {
            format!("/v1/models/{MODEL}/detect")
        };
        let (status, text) = d.post(&path, "image/png", &png(img));
        assert_eq!(status, 200, "{text}");
        let r = parse(&text);
        if r["class_id"] == json!(label) {
            correct += 1;
        }
        assert_eq!(r["model"]["name"], MODEL);
        assert!(r["probability"].as_f64().unwrap() > 0.0);
        assert!(r["label"].is_string() && r["score_name"].is_string());
        assert!(r["components"].is_array() && r["top_filters"].is_array());
        for key in [
            "preprocess_us",
            "queue_us",
            "inference_us",
            "total_us",
            "batch_size",
        ] {
            assert!(r["timings"][key].is_u64(), "timings.{key}: {r}");
        }
        let calibrated = r["calibrated"].as_bool().unwrap();
        if calibrated {
            judged += 1;
            if r["is_adversarial"] == json!(false) {
                clean += 1;
            }
            assert!(r["threshold"].is_number());
            assert!(r["components"][0]["p_value"].is_number(), "{r}");
        } else {
            assert!(
                r["is_adversarial"].is_null() && r["threshold"].is_null(),
                "{r}"
            );
        }
    }
    let accuracy = f64::from(correct) / images.len() as f64;
    let required = common::min_accuracy();
    println!("accuracy {accuracy:.3} (required {required}); judged {judged}, clean {clean}");
    assert!(accuracy >= required, "accuracy {accuracy} < {required}");
    if judged > 0 {
        let clean_share = f64::from(clean) / f64::from(judged);
        assert!(
            clean_share >= 0.8,
            "only {clean_share:.2} of clean test images judged clean"
        );
    } else {
        println!("model uncalibrated: verdicts are null (calibrated: false)");
    }
}

#[test]
fn models_health_and_several_models() {
    let model = common::model_path();
    let d = Daemon::start(
        &[],
        // base_args serves the file as fashion-csg; serve it under a second name too.
        &[
            "--model",
            &format!("second={}", model.display()),
            "--default-model",
            MODEL,
        ],
    );
    assert_eq!(d.get("/health/live").0, 200);
    assert_eq!(d.get("/health/ready").0, 200);
    let (status, text) = d.get("/v1/models");
    assert_eq!(status, 200);
    let list = parse(&text);
    assert_eq!(list["default"], MODEL);
    let names: HashSet<&str> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, HashSet::from([MODEL, "second"]));
    let (status, text) = d.get("/v1/models/second");
    assert_eq!(status, 200);
    let info = parse(&text);
    assert_eq!(info["classes"].as_array().unwrap().len(), 10);
    assert_eq!(info["input"]["channels"], 1);
    assert_eq!(info["input"]["height"], 28);
    assert_eq!(info["provider"], "cpu");
    assert!(info["calibrated"].is_boolean());
    assert!(info["score"].is_string());
    let (images, _) = fashion_test(3);
    let a = parse(
        &d.post("/v1/models/second/detect", "image/png", &png(&images[2]))
            .1,
    );
    let b = parse(&d.post("/v1/detect", "image/png", &png(&images[2])).1);
    assert_eq!(a["model"]["name"], "second");
    assert_eq!(b["model"]["name"], MODEL);
    assert_eq!(a["class_id"], b["class_id"]);
}

#[test]
fn batch_forms_answer_each_image_in_order() {
    // Two sessions cut from one reading of the graph: answers do not depend on which runs.
    let d = Daemon::start(&[("runtime.sessions_per_model", "2")], &[]);
    let norm = normaliser(&d);
    let (images, _) = fashion_test(6);
    let pngs: Vec<Vec<u8>> = images.iter().map(|i| png(i)).collect();
    let singles: Vec<Value> = pngs
        .iter()
        .map(|p| parse(&d.post("/v1/detect", "application/octet-stream", p).1))
        .collect();
    let same = |results: &Value, what: &str| {
        let results = results["results"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: {results}"));
        assert_eq!(results.len(), singles.len(), "{what}");
        for (r, s) in results.iter().zip(&singles) {
            assert_eq!(r["class_id"], s["class_id"], "{what}");
            let (p, q) = (
                r["probability"].as_f64().unwrap(),
                s["probability"].as_f64().unwrap(),
            );
            assert!((p - q).abs() < 1e-4, "{what}: {p} vs {q}");
        }
    };

    let (ct, body) = multipart(&pngs);
    let (status, text) = d.post("/v1/detect", &ct, &body);
    assert_eq!(status, 200, "{text}");
    same(&parse(&text), "multipart");

    let b64 = base64::engine::general_purpose::STANDARD;
    let encoded: Vec<String> = pngs.iter().map(|p| b64.encode(p)).collect();
    let (status, r) = d.post_json("/v1/detect", &json!({ "images": encoded }));
    assert_eq!(status, 200, "{r}");
    same(&r, "json images");
    let data_urls: Vec<String> = pngs
        .iter()
        .map(|p| format!("data:image/png;base64,{}", b64.encode(p)))
        .collect();
    same(
        &d.post_json("/v1/detect", &json!({ "images": data_urls })).1,
        "data URLs",
    );

    let tensor: Vec<Value> = images.iter().map(|i| chw(&norm(i))).collect();
    let (status, r) = d.post_json(
        &format!("/v1/models/{MODEL}/detect"),
        &json!({ "tensor": tensor }),
    );
    assert_eq!(status, 200, "{r}");
    same(&r, "tensor [N,C,H,W]");
    let (status, r) = d.post_json("/v1/detect", &json!({ "tensor": chw(&norm(&images[4])) }));
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["class_id"], singles[4]["class_id"],
        "tensor [C,H,W] answers one object"
    );
}

#[test]
fn concurrent_callers_get_their_own_answers() {
    let d = Arc::new(Daemon::start(
        &[
            ("batching.max_wait_us", "3000"),
            ("batching.max_batch_size", "8"),
        ],
        &[],
    ));
    let (images, _) = fashion_test(48);
    let pngs: Arc<Vec<Vec<u8>>> = Arc::new(images.iter().map(|i| png(i)).collect());
    let expected: Arc<Vec<(u64, f64)>> = Arc::new(
        pngs.iter()
            .map(|p| {
                let r = parse(&d.post("/v1/detect", "image/png", p).1);
                (
                    r["class_id"].as_u64().unwrap(),
                    r["probability"].as_f64().unwrap(),
                )
            })
            .collect(),
    );
    let batches_before = d.metric(&format!("csgd_batch_size_count{{model=\"{MODEL}\""));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (d, pngs, expected) = (Arc::clone(&d), Arc::clone(&pngs), Arc::clone(&expected));
            thread::spawn(move || {
                let mut max_batch = 0;
                for round in 0..3 {
                    for k in 0..pngs.len() / 8 {
                        let i = (t * 6 + k + round * 7) % pngs.len();
                        let (status, text) = d.post("/v1/detect", "image/png", &pngs[i]);
                        assert_eq!(status, 200, "{text}");
                        let r = parse(&text);
                        let (class, p) = expected[i];
                        assert_eq!(r["class_id"].as_u64().unwrap(), class, "image {i}");
                        let got = r["probability"].as_f64().unwrap();
                        assert!((got - p).abs() < 1e-4, "image {i}: {got} vs {p}");
                        max_batch = max_batch.max(r["timings"]["batch_size"].as_u64().unwrap());
                    }
                }
                max_batch
            })
        })
        .collect();
    let max_batch = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .max()
        .unwrap();
    let batches = d.metric(&format!("csgd_batch_size_count{{model=\"{MODEL}\"")) - batches_before;
    println!(
        "144 concurrent requests ran in {batches} ONNX Runtime calls; largest batch {max_batch}"
    );
    assert!(max_batch > 1, "no request was batched with another");
}

#[test]
fn classify_answers_the_detect_class_without_the_detector() {
    let d = Daemon::start(&[], &[]);
    let (images, _) = fashion_test(4);
    for (i, img) in images.iter().enumerate() {
        let detect = parse(&d.post("/v1/detect", "image/png", &png(img)).1);
        let path = if i % 2 == 0 {
            "/v1/classify".to_owned()
        } else {
            format!("/v1/models/{MODEL}/classify")
        };
        let (status, text) = d.post(&path, "image/png", &png(img));
        assert_eq!(status, 200, "{text}");
        let c = parse(&text);
        assert_eq!(c["class_id"], detect["class_id"]);
        assert_eq!(c["label"], detect["label"]);
        assert_eq!(c["model"]["name"], MODEL);
        assert!(
            (c["probability"].as_f64().unwrap() - detect["probability"].as_f64().unwrap()).abs()
                < 1e-6
        );
        for absent in ["is_adversarial", "score", "components", "top_filters"] {
            assert!(
                c.get(absent).is_none(),
                "{absent} in a classify answer: {c}"
            );
        }
        assert!(c["timings"]["inference_us"].is_u64(), "{c}");
    }
    let encoded: Vec<String> = images
        .iter()
        .map(|i| base64::engine::general_purpose::STANDARD.encode(png(i)))
        .collect();
    let (status, r) = d.post_json("/v1/classify", &json!({ "images": encoded }));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["results"].as_array().unwrap().len(), images.len());
    // Both answers are labelled JSON, single and batched.
    for (path, content_type, body) in [
        ("/v1/detect", "image/png", png(&images[0])),
        (
            "/v1/classify",
            "application/json",
            json!({ "images": encoded }).to_string().into_bytes(),
        ),
    ] {
        let mut answer = d
            .agent
            .post(&d.url(path))
            .header("content-type", content_type)
            .send(&body[..])
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(
            answer.headers().get("content-type").unwrap(),
            "application/json"
        );
        let text = answer.body_mut().read_to_string().unwrap();
        assert!(parse(&text).is_object(), "{text}");
    }
    assert_eq!(
        d.post("/v1/models/nope/classify", "image/png", &png(&images[0]))
            .0,
        404
    );
}

#[test]
fn inline_and_pooled_decoding_give_the_same_answers() {
    // Default: a single 28×28 image decodes on the I/O thread; 0: always the blocking pool.
    let inline = Daemon::start(&[], &[]);
    let pooled = Daemon::start(&[("threads.inline_decode_max_pixels", "0")], &[]);
    let (images, _) = fashion_test(24);
    let verdict = |text: &str| {
        let mut r = parse(text);
        r.as_object_mut().unwrap().remove("timings");
        r
    };
    for img in &images {
        let body = png(img);
        let (a, ta) = inline.post("/v1/detect", "image/png", &body);
        let (b, tb) = pooled.post("/v1/detect", "image/png", &body);
        assert_eq!((a, b), (200, 200), "{ta} {tb}");
        assert_eq!(verdict(&ta), verdict(&tb));
    }
    // A batch over the inline budget, and a broken image, answered alike by both.
    let (content_type, body) = multipart(&images[..8].iter().map(|i| png(i)).collect::<Vec<_>>());
    let (a, ta) = inline.post("/v1/detect", &content_type, &body);
    let (b, tb) = pooled.post("/v1/detect", &content_type, &body);
    assert_eq!((a, b), (200, 200), "{ta} {tb}");
    let results = |text: &str| -> Vec<Value> {
        parse(text)["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| verdict(&r.to_string()))
            .collect()
    };
    assert_eq!(results(&ta), results(&tb));
    let mut broken = png(&images[0]);
    broken.truncate(broken.len() - 20);
    let (a, ta) = inline.post("/v1/detect", "image/png", &broken);
    let (b, tb) = pooled.post("/v1/detect", "image/png", &broken);
    assert_eq!((a, b), (422, 422), "{ta} {tb}");
    assert_eq!(parse(&ta)["kind"], parse(&tb)["kind"]);
}

#[test]
fn intra_op_spinning_follows_the_config_and_the_measured_forward_pass() {
    let info = |d: &Daemon| -> Value {
        let (status, text) = d.get(&format!("/v1/models/{MODEL}"));
        assert_eq!(status, 200, "{text}");
        parse(&text)["intra_op_spinning"].clone()
    };
    // auto: decided on one image's forward pass, timed at load.
    let auto = info(&Daemon::start(&[], &[]));
    assert_eq!(auto["mode"], "auto", "{auto}");
    let forward_ms = auto["forward_ms"]
        .as_f64()
        .expect("auto reports its measurement");
    assert!(forward_ms > 0.0, "{auto}");
    let threshold_ms = csgd::config::SPIN_FROM_FORWARD.as_secs_f64() * 1e3;
    assert_eq!(auto["enabled"], json!(forward_ms >= threshold_ms), "{auto}");
    // on and off are taken as said, unmeasured; a spinning session answers as any other.
    let (images, labels) = fashion_test(1);
    for (mode, enabled) in [("on", true), ("off", false)] {
        let d = Daemon::start(&[("runtime.intra_op_spinning", mode)], &[]);
        assert_eq!(
            info(&d),
            json!({"mode": mode, "enabled": enabled, "forward_ms": null})
        );
        let (status, text) = d.post("/v1/detect", "image/png", &png(&images[0]));
        assert_eq!(status, 200, "{text}");
        assert_eq!(parse(&text)["class_id"], json!(labels[0]), "{text}");
    }
}
