//! What a session thread calls to run one batch: [`Runner`], and [`ModelRunner`], the ONNX
//! Runtime session that fetches the detector's outputs and reduces its feature maps in place.

use ndarray::{Array2, ArrayView4};

use crate::detect::{Detector, PixelHistogram, reduce_map};
use crate::runtime::{Model, RuntimeError, flatten};

/// What runs a batch. [`ModelRunner`] is the real one; tests use fakes.
pub trait Runner: Send + 'static {
    /// Runs `[N, C, H, W]` and returns each requested output as `[N, D]`.
    fn run(&mut self, input: ArrayView4<f32>) -> Result<Vec<Array2<f32>>, String>;
}

/// A [`Model`] with the outputs the detector needs, in the order it needs them.
pub struct ModelRunner {
    model: Model,
    outputs: Vec<String>,
    /// Per output: the channels of a feature map to hand on as its spatial statistics
    /// ([`reduce_map`]), reduced here while ONNX Runtime's output is still in cache.
    maps: Vec<Option<usize>>,
    /// Where the detector reads the input's pixel histogram: computed here from the batch
    /// in hand and handed on after the outputs ([`Detector::sample`]'s layout).
    histogram: Option<PixelHistogram>,
}

impl ModelRunner {
    /// Runs `model` for `detector`: its [`Detector::fetched_outputs`], with the feature maps
    /// among them reduced as [`Detector::reduce_maps`] does.
    pub fn new(model: Model, detector: &Detector) -> Self {
        let outputs = detector.fetched_outputs(&model.meta().outputs.logits);
        let maps = std::iter::once(None)
            .chain(detector.map_channels().iter().copied())
            .collect();
        Self {
            model,
            outputs,
            maps,
            histogram: detector.pixel_histogram().cloned(),
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The outputs [`Runner::run`] returns, in order.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }
}

impl Runner for ModelRunner {
    fn run(&mut self, input: ArrayView4<f32>) -> Result<Vec<Array2<f32>>, String> {
        let names: Vec<&str> = self.outputs.iter().map(String::as_str).collect();
        let maps = &self.maps;
        let mut outputs = self
            .model
            .run_with(input, &names, |i, view| {
                let flat = flatten(view, names[i])?;
                match maps.get(i).copied().flatten() {
                    // Read where ONNX Runtime wrote it: never copied, still in cache.
                    Some(channels) => reduce_map(flat.view(), channels).map_err(|e| {
                        RuntimeError::Inference(format!("output {:?}: {e}", names[i]))
                    }),
                    None => Ok(flat.into_owned()),
                }
            })
            .map_err(|e| e.to_string())?;
        if let Some(histogram) = &self.histogram {
            outputs.push(histogram.of_batch(input).map_err(|e| e.to_string())?);
        }
        Ok(outputs)
    }
}
