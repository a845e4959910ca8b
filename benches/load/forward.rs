//! What detection adds to classification itself, in-process and on one thread: the cost that
//! issue 5 bounds ("detection adds ≤ 2 % to the cost of classification, one forward pass").
//!
//! Four ways of running the same batch, interleaved in rounds so that the host's drift hits
//! them alike, each reported as a median of its per-round ratio to `classify`:
//! - `classify`: the graph cut down to the logits, all a plain classifier computes;
//! - `gap_outputs`: also the GAP outputs the detector reads, without any feature map;
//! - `served_outputs`: the session the daemon serves with (every output the detector reads,
//!   feature maps reduced to their statistics straight from ONNX Runtime's buffer);
//! - `detect`: that, plus a verdict on every image.
//!
//! The detect/classify pairs of `suite` measure something else: the daemon's two routes,
//! which share the session and so both pay for the map.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use csgd::batch::{ModelRunner, Runner};
use csgd::config::RuntimeConfig;
use csgd::detect::{Detector, ScoreKind};
use csgd::runtime::Model;
use ndarray::{Array2, ArrayView4};
use serde::Serialize;

use crate::median;

#[derive(Debug, Serialize)]
pub struct Variant {
    pub name: &'static str,
    /// Median wall time per image, µs (one thread, so also CPU time).
    pub us_per_image: f64,
    /// Median over rounds of this variant's time ÷ `classify`'s.
    pub vs_classify: f64,
}

#[derive(Debug, Serialize)]
pub struct ForwardCost {
    pub model: String,
    pub batch: usize,
    pub rounds: usize,
    pub calls_per_round: usize,
    pub variants: Vec<Variant>,
}

/// Runs the comparison for the bundle at `path` (it must be calibrated).
pub fn run(
    path: &Path,
    ort_library: &Path,
    batch: usize,
    rounds: usize,
    calls: usize,
) -> Result<ForwardCost> {
    let cfg = RuntimeConfig {
        ort_library: ort_library.display().to_string(),
        intra_op_threads: 1,
        ..Default::default()
    };
    let meta = csgd::runtime::read_bundle_meta(path)?;
    let detector = Detector::new(&meta, ScoreKind::Combined)?;
    anyhow::ensure!(
        detector.is_calibrated(),
        "{} has no calibration to judge with",
        path.display()
    );
    let served = detector.fetched_outputs(&meta.outputs.logits);
    // The served outputs less the feature maps (the logits are never one).
    let maps = detector.map_channels();
    let is_map = |i: usize| i > 0 && maps.get(i - 1).is_some_and(Option::is_some);
    let gaps: Vec<&str> = served
        .iter()
        .enumerate()
        .filter(|&(i, _)| !is_map(i))
        .map(|(_, name)| name.as_str())
        .collect();
    let load = |keep: &[&str]| {
        Model::load_for(path, &cfg, keep).with_context(|| format!("loading {}", path.display()))
    };
    let logits = [meta.outputs.logits.as_str()];
    let mut classifier = load(&logits)?;
    let mut gap_model = load(&gaps)?;
    let served_names: Vec<&str> = served.iter().map(String::as_str).collect();
    let mut runner = ModelRunner::new(load(&served_names)?, &detector);

    let pngs = crate::request_pngs(&meta, batch)?;
    let spec = &meta.input;
    let mut data = Vec::with_capacity(batch * spec.len());
    for i in 0..batch {
        let png = &pngs[i % pngs.len()];
        data.extend(
            csgd::preprocess::preprocess_image(png, Some("image/png"), spec, u64::MAX)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    let input = ArrayView4::from_shape((batch, spec.channels, spec.height, spec.width), &data)?;

    // Each image's rows as the daemon hands them to the verdict (`batch::Output`).
    let judge_all = |outputs: &[Array2<f32>]| -> Result<()> {
        for i in 0..batch {
            let rows: Vec<Vec<f32>> = outputs.iter().map(|o| o.row(i).to_vec()).collect();
            let sample = detector.sample(&rows)?;
            std::hint::black_box(detector.judge(&sample));
        }
        Ok(())
    };
    let mut step = |variant: usize| -> Result<()> {
        match variant {
            0 => drop(std::hint::black_box(classifier.run(input, &logits)?)),
            1 => drop(std::hint::black_box(gap_model.run(input, &gaps)?)),
            2 => drop(std::hint::black_box(
                runner.run(input).map_err(anyhow::Error::msg)?,
            )),
            _ => judge_all(&runner.run(input).map_err(anyhow::Error::msg)?)?,
        }
        Ok(())
    };
    const NAMES: [&str; 4] = ["classify", "gap_outputs", "served_outputs", "detect"];
    for variant in 0..NAMES.len() {
        step(variant)?; // warm-up
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); NAMES.len()];
    for round in 0..rounds {
        // Rotate the order, so that no variant always runs first.
        for offset in 0..NAMES.len() {
            let variant = (round + offset) % NAMES.len();
            let started = Instant::now();
            for _ in 0..calls {
                step(variant)?;
            }
            let us = started.elapsed().as_secs_f64() * 1e6 / (calls * batch) as f64;
            times[variant].push(us);
        }
    }
    let variants = NAMES
        .iter()
        .zip(&times)
        .map(|(&name, t)| Variant {
            name,
            us_per_image: median(t),
            vs_classify: median(
                &t.iter()
                    .zip(&times[0])
                    .map(|(a, b)| a / b)
                    .collect::<Vec<_>>(),
            ),
        })
        .collect();
    Ok(ForwardCost {
        model: meta.name.clone(),
        batch,
        rounds,
        calls_per_round: calls,
        variants,
    })
}

/// The result as a Markdown table.
pub fn markdown(cost: &ForwardCost) -> String {
    let mut out = format!(
        "{} (batch {}, one thread, {} rounds of {} calls)\n\n| variant | µs per image | vs classify |\n|---|---|---|\n",
        cost.model, cost.batch, cost.rounds, cost.calls_per_round
    );
    for v in &cost.variants {
        out.push_str(&format!(
            "| {} | {:.1} | {:+.1} % |\n",
            v.name,
            v.us_per_image,
            (v.vs_classify - 1.0) * 100.0
        ));
    }
    out
}
