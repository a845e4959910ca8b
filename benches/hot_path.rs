//! Micro-benchmarks of what csgd does per image besides running the model: decoding and
//! preprocessing, the detector's scoring, the batching queue's own overhead, and encoding the
//! JSON answer. `cargo bench --bench hot_path` (criterion; medians in its report).
//!
//! They use the shipped Fashion-MNIST bundle's metadata and calibration (no ONNX Runtime: the
//! model's outputs are synthetic values of the right widths, since scoring cost does not
//! depend on them), real Fashion-MNIST test images where the Debian package is installed and
//! synthetic ones otherwise, and a 128×128 RGB image for the ResNet-sized input.
//! The end-to-end figures against the in-process limit are `benches/load.sh`'s.
//! What detection adds to a classifier's whole forward pass is `load -- forward-cost`.

use std::hint::black_box;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use csg_bundle::{BundleMeta, InputSpec};
use csgd::batch::{Batcher, Limits, Runner};
use csgd::detect::{Detector, ScoreKind, reduce_map};
use csgd::metrics::Metrics;
use csgd::preprocess;
use ndarray::{Array2, ArrayView4};

const MODEL: &str = "models/fashion-csg.onnx";

fn meta() -> BundleMeta {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(MODEL);
    csgd::runtime::read_bundle_meta(&path)
        .unwrap_or_else(|e| panic!("{e} (the shipped model is needed for the benchmarks)"))
}

fn png(width: u32, height: u32, channels: usize, seed: u32) -> Vec<u8> {
    let pixel = |x: u32, y: u32, c: u32| ((x * 7 + y * 13 + c * 29 + seed * 31) % 251) as u8;
    let mut out = Cursor::new(Vec::new());
    let image = if channels == 1 {
        image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(width, height, |x, y| {
            image::Luma([pixel(x, y, 0)])
        }))
    } else {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([pixel(x, y, 0), pixel(x, y, 1), pixel(x, y, 2)])
        }))
    };
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding a PNG in memory");
    out.into_inner()
}

/// A real Fashion-MNIST test image as a PNG, or a synthetic 28×28 one.
fn fashion_png() -> Vec<u8> {
    let dir = Path::new(csg_bundle::dataset::DEFAULT_DATA_DIR);
    match csg_bundle::dataset::Dataset::load(dir, "t10k") {
        Ok(data) if !data.is_empty() => {
            let gray =
                image::GrayImage::from_raw(28, 28, data.image(0).to_vec()).expect("28×28 bytes");
            let mut out = Cursor::new(Vec::new());
            image::DynamicImage::ImageLuma8(gray)
                .write_to(&mut out, image::ImageFormat::Png)
                .expect("encoding a PNG in memory");
            out.into_inner()
        }
        _ => png(28, 28, 1, 0),
    }
}

fn rgb_spec(side: usize) -> InputSpec {
    InputSpec {
        layout: "NCHW".into(),
        channels: 3,
        height: side,
        width: side,
        value_range: [0.0, 1.0],
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    }
}

fn decode(c: &mut Criterion) {
    let meta = meta();
    let mut group = c.benchmark_group("decode_preprocess");
    group.throughput(Throughput::Elements(1));
    let cases = [
        ("fashion_28x28_gray", fashion_png(), meta.input.clone()),
        ("rgb_128x128", png(128, 128, 3, 1), rgb_spec(128)),
        (
            "rgb_256x256_resized_to_128",
            png(256, 256, 3, 2),
            rgb_spec(128),
        ),
    ];
    for (name, bytes, spec) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| {
                preprocess::preprocess_image(black_box(bytes), Some("image/png"), spec, u64::MAX)
                    .expect("a valid PNG")
            })
        });
    }
    group.finish();
}

/// Synthetic outputs as the detector receives them, in [`Detector::sample`]'s order: logits,
/// then each stage's GAP (or the spatial statistics of its feature map, where the detector
/// reads them), then a real image's pixel histogram where the calibration reads one.
fn sample_rows(meta: &BundleMeta, detector: &Detector) -> Vec<Vec<f32>> {
    let (logits, fetched) = fetched_outputs(meta, detector);
    let mut arrays: Vec<Array2<f32>> = fetched
        .into_iter()
        .map(|row| Array2::from_shape_vec((1, row.len()), row).expect("one row"))
        .collect();
    detector
        .reduce_maps(&mut arrays)
        .expect("maps of the model's shape");
    let image =
        preprocess::preprocess_image(&fashion_png(), Some("image/png"), &meta.input, u64::MAX)
            .expect("a 28×28 PNG");
    let image = Array2::from_shape_vec((1, image.len()), image).expect("one row");
    let histogram = detector
        .input_histograms(image.view())
        .map(|h| h.expect("the model's size"));
    std::iter::once(logits)
        .chain(arrays.iter().chain(&histogram).map(|a| a.row(0).to_vec()))
        .collect()
}

/// Synthetic outputs of the widths `detector` fetches from the model: logits, then each
/// stage's GAP (and feature map, where the detector reads its spatial statistics).
fn fetched_outputs(meta: &BundleMeta, detector: &Detector) -> (Vec<f32>, Vec<Vec<f32>>) {
    let logits: Vec<f32> = (0..meta.classes.len())
        .map(|i| (i as f32 * 0.37).sin() * 3.0)
        .collect();
    let stages = detector
        .stage_outputs()
        .iter()
        .map(|name| {
            let side = |stage: usize| {
                let size = |input: usize| meta.architecture.stage_sizes(input)[stage];
                size(meta.input.height) * size(meta.input.width)
            };
            let width = if *name == meta.outputs.activations {
                meta.architecture.filters()
            } else if let Some(s) = meta.outputs.stages.iter().find(|s| s.name == *name) {
                s.channels
            } else if let Some(s) = meta
                .outputs
                .stages
                .iter()
                .find(|s| s.map.as_deref() == Some(name.as_str()))
            {
                s.channels * side(s.stage)
            } else {
                0
            };
            (0..width)
                .map(|i| ((i as f32) * 0.11).cos().abs())
                .collect()
        })
        .collect();
    (logits, stages)
}

fn scoring(c: &mut Criterion) {
    let meta = meta();
    let mut group = c.benchmark_group("score");
    group.throughput(Throughput::Elements(1));
    for kind in [
        ScoreKind::Combined,
        ScoreKind::GatedMahalanobis,
        ScoreKind::Msp,
    ] {
        let detector = Detector::new(&meta, kind).expect("the shipped bundle's detector");
        let rows = sample_rows(&meta, &detector);
        // Every component must be computed, or the benchmark times a shortcut.
        let verdict = detector.judge(&detector.sample(&rows).expect("the detector's layout"));
        assert!(
            verdict.components.iter().all(|c| c.score.is_finite()),
            "{:?}",
            verdict.components
        );
        group.bench_function(kind.name(), |b| {
            b.iter(|| {
                let sample = detector
                    .sample(black_box(&rows))
                    .expect("the detector's layout");
                detector.judge(&sample)
            })
        });
    }

    // Reducing a batch of 16 stage-2 feature maps to their statistics, as the inference
    // thread does on ONNX Runtime's output before the verdicts (per image) for a detector
    // calibrated with `--stages 2` (the shipped one reads no map).
    let detector = Detector::new(&meta, ScoreKind::Combined).expect("detector");
    let stage = meta
        .outputs
        .stages
        .iter()
        .find(|s| s.map.is_some())
        .expect("the shipped model exports a stage map");
    let side = |input: usize| meta.architecture.stage_sizes(input)[stage.stage];
    let (channels, plane) = (
        stage.channels,
        side(meta.input.height) * side(meta.input.width),
    );
    let map: Vec<f32> = (0..channels * plane)
        .map(|i| ((i as f32) * 0.11).cos().max(0.0))
        .collect();
    let rows: Vec<f32> = (0..16).flat_map(|_| map.iter().copied()).collect();
    let batch = Array2::from_shape_vec((16, map.len()), rows).expect("16 rows");
    group.throughput(Throughput::Elements(16));
    group.bench_function("reduce_maps", |b| {
        b.iter(|| reduce_map(black_box(batch.view()), channels).expect("maps"))
    });
    // The pixel histograms of a batch of 16 inputs, also computed on the inference thread.
    let image =
        preprocess::preprocess_image(&fashion_png(), Some("image/png"), &meta.input, u64::MAX)
            .expect("a 28×28 PNG");
    let images: Vec<f32> = (0..16).flat_map(|_| image.iter().copied()).collect();
    let images = Array2::from_shape_vec((16, image.len()), images).expect("16 rows");
    if detector.pixel_histogram().is_some() {
        group.bench_function("pixel_histograms", |b| {
            b.iter(|| detector.input_histograms(black_box(images.view())))
        });
    }
    group.finish();

    let rows = sample_rows(&meta, &detector);
    let verdict = detector.judge(&detector.sample(&rows).expect("the detector's layout"));
    let mut group = c.benchmark_group("json");
    group.throughput(Throughput::Elements(1));
    group.bench_function("detect_verdict", |b| {
        b.iter(|| serde_json::to_vec(black_box(&verdict)).expect("serialisable"))
    });
    let class_only = serde_json::json!({
        "class_id": verdict.class_id, "label": verdict.label, "probability": verdict.probability,
    });
    group.bench_function("classify_answer", |b| {
        b.iter(|| serde_json::to_vec(black_box(&class_only)).expect("serialisable"))
    });
    group.finish();
}

/// A runner that returns zeros at once: what is left is the queue's own cost.
struct Instant2 {
    widths: [usize; 2],
}

impl Runner for Instant2 {
    fn run(&mut self, input: ArrayView4<f32>) -> Result<Vec<Array2<f32>>, String> {
        let n = input.dim().0;
        Ok(self.widths.iter().map(|&w| Array2::zeros((n, w))).collect())
    }
}

fn batching(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let shape = [1, 28, 28];
    let mut group = c.benchmark_group("batch_queue");
    for (name, max_batch_size, concurrent) in [("single", 1, 1), ("batched_32", 32, 32)] {
        let limits = Limits {
            max_batch_size,
            max_wait: Duration::ZERO,
            queue_capacity: 1024,
        };
        let batcher = rt.block_on(async {
            Batcher::start(
                "bench",
                vec![Instant2 { widths: [10, 128] }],
                shape,
                limits,
                Arc::clone(&metrics),
            )
        });
        group.throughput(Throughput::Elements(concurrent as u64));
        group.bench_with_input(BenchmarkId::new(name, concurrent), &concurrent, |b, &k| {
            b.iter(|| {
                rt.block_on(async {
                    let replies = batcher
                        .submit(vec![vec![0.5f32; 784]; k])
                        .expect("queue has room");
                    for reply in replies {
                        let out = reply.await.expect("reply").expect("output");
                        black_box(out.batch_size);
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = decode, scoring, batching
}
criterion_main!(benches);
