//! What an explanation costs against a detect call.

use std::time::Instant;

use csgd::detect::{Detector, ScoreKind};
use csgd::explain::{Explainer, MapKind, render};
use csgd::runtime::Model;

use super::common::{self, Daemon, fashion_test, parse, png};
use super::deletion::run;
use super::{assert_agrees, cfg, post_accept};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What an explanation costs against a detect call for the same image: one ONNX Runtime run
/// with and without the feature map, and whole HTTP requests (median of N each). The
/// explanation must agree with the detect answer, so this can fail like any other test.
#[test]
fn cost_of_an_explanation_against_a_detect_call() {
    const N: usize = 101;
    let (images, _) = fashion_test(1);
    let path = common::model_path();

    let mut model = Model::load(&path, &cfg()).unwrap();
    let meta = model.meta().clone();
    let detector = Detector::new(&meta, ScoreKind::Combined).unwrap();
    let input = vec![csgd::preprocess::normalise_gray_u8(&images[0], &meta.input)];
    let detect_outputs = detector.fetched_outputs(&meta.outputs.logits);
    let explainer = Explainer::new(&meta, detector, &path).unwrap();
    // Interleaved, so a change in the machine's load hits every figure alike.
    let detect_names: Vec<&str> = detect_outputs.iter().map(String::as_str).collect();
    let explain_names: Vec<&str> = explainer.outputs().iter().map(String::as_str).collect();
    let spec = meta.input.clone();
    let mut local = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for i in 0..=N {
        let t = Instant::now();
        run(&mut model, &input, &detect_names);
        let plain = t.elapsed();
        let t = Instant::now();
        run(&mut model, &input, &explain_names);
        let with_map = t.elapsed();
        let t = Instant::now();
        let e = explainer.run(&mut model, &input[0], 5).unwrap();
        let whole = t.elapsed();
        let t = Instant::now();
        let scale = render::default_scale(&spec);
        render::overlay_png(&input[0], &spec, e.maps.get(MapKind::Gated), scale).unwrap();
        let png = t.elapsed();
        // The first round warms up.
        if i > 0 {
            for (k, d) in [plain, with_map, whole, png].into_iter().enumerate() {
                local[k].push(d.as_secs_f64() * 1e6);
            }
        }
    }
    let [plain, with_map, whole, png_render] = local.map(median);

    let d = Daemon::start(&[("batching.max_wait_us", "0")], &[]);
    let body = png(&images[0]);
    let detected = parse(&d.post("/v1/detect", "image/png", &body).1);
    let explained = parse(&d.post("/v1/explain", "image/png", &body).1);
    assert_agrees(&explained, &detected);
    let mut wall = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let routes = [
        ("/v1/detect", "application/json"),
        ("/v1/explain?png=false", "application/json"),
        ("/v1/explain", "application/json"),
        ("/v1/explain", "image/png"),
    ];
    for _ in 0..N {
        for (k, (route, accept)) in routes.iter().enumerate() {
            let t = Instant::now();
            let (status, _, _) = post_accept(&d, route, &body, accept);
            wall[k].push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(status, 200);
        }
    }
    let [det, exp_plain, exp_json, exp_png] = wall.map(median);
    println!("\ncost, one 28×28 image, median of {N} (1 intra-op thread):");
    println!("  ONNX Runtime run, detect outputs:               {plain:>7.0} µs");
    println!("  ONNX Runtime run, detect outputs + feature_map: {with_map:>7.0} µs");
    println!("  explanation in process (run + maps + ranking):  {whole:>7.0} µs");
    println!("  one 224×224 overlay PNG, drawn and encoded:     {png_render:>7.0} µs");
    println!("  HTTP detect:                                    {det:>7.0} µs");
    println!("  HTTP explain, JSON without PNGs:                {exp_plain:>7.0} µs");
    println!("  HTTP explain, JSON with both PNGs inline:       {exp_json:>7.0} µs");
    println!("  HTTP explain, Accept: image/png:                {exp_png:>7.0} µs");
}
