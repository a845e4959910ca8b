//! The load benchmark: csgd end to end over HTTP against the raw ONNX Runtime limit, in one
//! run on one machine, for one model per `suite` invocation. `benches/load.sh` drives it for
//! both benchmark models and assembles the table (`table`); run that, not this directly.
//!
//! Why ratios: absolute times on shared machines move with the load; csgd and the limit
//! measured in interleaved rounds of the same run see the same conditions, so their ratio is
//! what the targets are stated in. Every figure is a median over the rounds.

mod client;
mod cost;
mod daemon;
mod episodes;
mod forward;
mod latency;
mod limit;
mod reliability;
mod report;
mod suite;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "csgd load benchmark (see benches/load.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Passed by `cargo bench` (after the subcommand's arguments); ignored.
    #[arg(long, hide = true, global = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure one model: the limit, csgd batched/unbatched/classify, latency, memory, start.
    Suite(suite::SuiteArgs),
    /// Give a random-weight bundle a stand-in calibration (in place), so the detector runs.
    StandInCalibration {
        model: PathBuf,
        #[arg(long, default_value = ".ort/libonnxruntime.so")]
        ort_library: PathBuf,
        #[arg(long, default_value_t = 240)]
        images: usize,
    },
    /// Soak at a fraction of saturation, then overload at a multiple of it (issue 8).
    Reliability(reliability::ReliabilityArgs),
    /// What detection adds to a plain classifier's forward pass, in-process on one thread.
    ForwardCost {
        #[arg(long, default_value = "models/fashion-csg.onnx")]
        model: PathBuf,
        #[arg(long, default_value = ".ort/libonnxruntime.so")]
        ort_library: PathBuf,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 15)]
        rounds: usize,
        /// Calls per variant per round.
        #[arg(long, default_value_t = 20)]
        calls: usize,
        /// Where the result JSON goes.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Latency A/B: daemons with different settings, alternating rounds at one load level.
    Latency(latency::LatencyArgs),
    /// Merge suite results into one JSON file and a Markdown table.
    Table {
        inputs: Vec<PathBuf>,
        #[arg(long)]
        json: PathBuf,
        #[arg(long)]
        md: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => {
            eprintln!("load: run benches/load.sh (this binary needs a subcommand; see --help)");
            Ok(())
        }
        Some(Cmd::StandInCalibration {
            model,
            ort_library,
            images,
        }) => stand_in_calibration(&model, &ort_library, images),
        Some(Cmd::Table { inputs, json, md }) => report::table(&inputs, &json, &md),
        Some(Cmd::ForwardCost {
            model,
            ort_library,
            batch,
            rounds,
            calls,
            out,
        }) => {
            let cost = forward::run(&model, &ort_library, batch, rounds, calls)?;
            if let Some(out) = out {
                std::fs::write(&out, serde_json::to_string_pretty(&cost)?)
                    .with_context(|| format!("writing {}", out.display()))?;
            }
            println!("{}", forward::markdown(&cost));
            Ok(())
        }
        Some(Cmd::Reliability(args)) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(reliability::run(&args))?;
            std::fs::write(&args.out, serde_json::to_string_pretty(&result)?)
                .with_context(|| format!("writing {}", args.out.display()))?;
            println!("{}", serde_json::to_string_pretty(&result["summary"])?);
            Ok(())
        }
        Some(Cmd::Latency(args)) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(latency::run(&args))
        }
        Some(Cmd::Suite(args)) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(suite::run(&args))?;
            std::fs::write(&args.out, serde_json::to_string_pretty(&result)?)
                .with_context(|| format!("writing {}", args.out.display()))?;
            println!("{}", report::markdown(std::slice::from_ref(&result)));
            Ok(())
        }
    }
}

/// A deterministic picture of the model's input size: a tinted, striped pattern with noise,
/// each aspect drawn from `seed`, so that a set of them spreads over a model's classes.
fn synthetic_png(spec: &csg_bundle::InputSpec, seed: u32) -> Result<Vec<u8>> {
    let (w, h) = (spec.width as u32, spec.height as u32);
    let mut state = seed.wrapping_mul(2_654_435_761) ^ 0x9e37_79b9;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let tint: [f32; 3] = [0, 1, 2].map(|_| (rand() % 256) as f32 / 255.0);
    let (fx, fy) = (1 + rand() % 9, 1 + rand() % 9);
    let amplitude = (rand() % 200) as f32;
    let noise_level = (rand() % 128) as f32;
    let mut pixel = |x: u32, y: u32, c: usize| -> u8 {
        let wave = (((x * fx + y * fy) % 32) as f32 / 31.0) * amplitude;
        let noise = (rand() % 256) as f32 / 255.0 * noise_level;
        (tint[c] * 128.0 + wave * 0.5 + noise).clamp(0.0, 255.0) as u8
    };
    let image = if spec.channels == 1 {
        image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([pixel(x, y, 0)])
        }))
    } else {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([pixel(x, y, 0), pixel(x, y, 1), pixel(x, y, 2)])
        }))
    };
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// The request images: Fashion-MNIST test images for a 28×28 grayscale model when the
/// Debian package is installed, synthetic ones otherwise.
pub(crate) fn request_pngs(meta: &csg_bundle::BundleMeta, n: usize) -> Result<Vec<Vec<u8>>> {
    let spec = &meta.input;
    if (spec.channels, spec.height, spec.width) == (1, 28, 28) {
        let dir = Path::new(csg_bundle::dataset::DEFAULT_DATA_DIR);
        if let Ok(data) = csg_bundle::dataset::Dataset::load(dir, "t10k") {
            return (0..n.min(data.len()))
                .map(|i| {
                    let gray = image::GrayImage::from_raw(28, 28, data.image(i).to_vec())
                        .context("28×28 image")?;
                    let mut out = Cursor::new(Vec::new());
                    image::DynamicImage::ImageLuma8(gray)
                        .write_to(&mut out, image::ImageFormat::Png)?;
                    Ok(out.into_inner())
                })
                .collect();
        }
    }
    (0..n as u32).map(|i| synthetic_png(spec, i)).collect()
}

/// Gives a bundle a stand-in calibration so that the benchmark runs the real detector on it.
///
/// `csgd calibrate` fits on correctly classified clean images of every class, and a model with
/// random weights (the ResNet-18 fixture) predicts one class for nearly every input, so no
/// image folder can calibrate it. Here synthetic images are run through the model, assigned
/// classes round-robin, and each image's logits are permuted so that its assigned class is the
/// top one; the real fitting code then runs on those outputs. The statistics mean nothing;
/// their shapes (per-class gated filters, stages, score tables) are the real ones, and the
/// scoring cost per image depends only on those.
fn stand_in_calibration(model: &Path, ort_library: &Path, images: usize) -> Result<()> {
    use csgd::detect::fit::{self, CleanOutputs};
    let runtime = csgd::config::RuntimeConfig {
        ort_library: ort_library.display().to_string(),
        ..Default::default()
    };
    let mut session = csgd::runtime::Model::load(model, &runtime)?;
    let meta = session.meta().clone();
    let spec = &meta.input;
    let classes = meta.classes.len();
    let stages = csgd::calibrate::stage_outputs(&meta, None, true)?;
    let names = csgd::calibrate::fetched_outputs(&meta, &stages);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // The default calibration's input histogram too (`csgd calibrate --input-bins`).
    const BINS: usize = 32;
    let empty = || CleanOutputs {
        bins: BINS,
        ..CleanOutputs::for_stages(&stages)
    };
    let mut sets = [empty(), empty()];
    for start in (0..images).step_by(16) {
        let n = 16.min(images - start);
        let mut data = Vec::with_capacity(n * spec.len());
        for i in start..start + n {
            let png = synthetic_png(spec, i as u32)?;
            data.extend(csgd::preprocess::preprocess_image(
                &png,
                Some("image/png"),
                spec,
                u64::MAX,
            )?);
        }
        let view =
            ndarray::ArrayView4::from_shape((n, spec.channels, spec.height, spec.width), &data)?;
        let outputs = session.run(view, &names)?;
        let Some((logits, stage_values)) = outputs.split_first() else {
            anyhow::bail!("the model returned no outputs");
        };
        for (k, row) in logits.rows().into_iter().enumerate() {
            let i = start + k;
            let label = (i / 2) % classes;
            let set = &mut sets[i % 2];
            let mut row = row.to_vec();
            let (top, _) = csgd::detect::scores::top_class(&row);
            row.swap(top, label);
            set.labels.push(label);
            set.logits.extend(row);
            let image = &data[k * spec.len()..(k + 1) * spec.len()];
            set.histograms.extend(
                csg_bundle::score::pixel_histogram(image, spec, BINS)
                    .context("an image of the model's input size")?,
            );
            for (stage, values) in set.stages.iter_mut().zip(stage_values) {
                let row = values.row(k);
                let row = row.as_slice().context("model output is not contiguous")?;
                stage.push_image(row)?;
            }
        }
    }
    let [fit_set, table_set] = sets;
    let options = fit::FitOptions {
        data: format!(
            "benchmark stand-in: {images} synthetic images, classes assigned round-robin"
        ),
        ..Default::default()
    };
    let calibration = fit::fit(&meta, &fit_set, &table_set, &options)?;
    let mut meta = meta;
    meta.calibration = Some(calibration);
    csg_bundle::onnx::write_meta(model, &meta)?;
    println!(
        "{}: stand-in calibration from {images} synthetic images",
        model.display()
    );
    Ok(())
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
