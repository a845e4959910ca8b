//! The limit: images per second of the same model called in-process through `ort`, with the
//! daemon's thread budget, fetching the same outputs the daemon fetches from the same
//! cut-down graph, decoding the PNGs included. Nothing of HTTP, queueing or scoring.
//!
//! "The same thread budget" is the daemon's: ONNX Runtime with `runtime.intra_op_threads`
//! resolved exactly as `csgd serve` resolves it, and decoding on `threads.preprocess_threads`
//! threads that run alongside inference (as the daemon's blocking pool does). Decoding on
//! the inference thread instead would make the limit slower than the daemon it bounds.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use csgd::config::{RuntimeConfig, ThreadsConfig};
use csgd::detect::{Detector, ScoreKind};
use csgd::runtime::Model;
use ndarray::ArrayView4;

pub struct Limit {
    model: Model,
    outputs: Vec<String>,
    pub intra_threads: usize,
    pub decode_threads: usize,
}

impl Limit {
    /// `cfg` is the daemon's runtime section (library, providers), so the thread count
    /// resolves exactly as `csgd serve` resolves it.
    pub fn load(path: &Path, cfg: &RuntimeConfig) -> Result<Self> {
        let intra_threads = cfg.intra_threads();
        let meta = csgd::runtime::read_bundle_meta(path)?;
        let detector = Detector::new(&meta, ScoreKind::Combined)?;
        let outputs = detector.fetched_outputs(&meta.outputs.logits);
        // Cut down to those outputs, as the daemon's sessions are.
        let names: Vec<&str> = outputs.iter().map(String::as_str).collect();
        let model = Model::load_for(path, cfg, &names)
            .with_context(|| format!("loading {}", path.display()))?;
        Ok(Self {
            model,
            outputs,
            intra_threads,
            decode_threads: ThreadsConfig::default().preprocess_threads(),
        })
    }

    /// Decoder threads turn `pngs` (cycling) into tensors; this thread gathers `batch` of them
    /// and runs them as one call, again and again for `secs` after one warm-up call.
    /// Images per second.
    pub fn measure(&mut self, pngs: &[Vec<u8>], batch: usize, secs: Duration) -> Result<f64> {
        let spec = self.model.meta().input.clone();
        let names: Vec<&str> = self.outputs.iter().map(String::as_str).collect();
        let stop = AtomicBool::new(false);
        let next = AtomicUsize::new(0);
        let (tx, rx) = mpsc::sync_channel::<Result<Vec<f32>, String>>(2 * batch);
        std::thread::scope(|scope| {
            for _ in 0..self.decode_threads {
                let tx = tx.clone();
                let (spec, stop, next) = (&spec, &stop, &next);
                scope.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let png = &pngs[i % pngs.len()];
                        let tensor = csgd::preprocess::preprocess_image(
                            png,
                            Some("image/png"),
                            spec,
                            u64::MAX,
                        )
                        .map_err(|e| e.to_string());
                        if tx.send(tensor).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            let result = (|| -> Result<f64> {
                let mut data = Vec::with_capacity(batch * spec.len());
                let (mut images, mut first) = (0usize, true);
                let mut counted_from = Instant::now();
                while first || counted_from.elapsed() < secs {
                    data.clear();
                    for _ in 0..batch {
                        let tensor = rx.recv().context("decoders stopped")?;
                        data.extend(tensor.map_err(anyhow::Error::msg)?);
                    }
                    let view = ArrayView4::from_shape(
                        (batch, spec.channels, spec.height, spec.width),
                        &data,
                    )?;
                    std::hint::black_box(self.model.run(view, &names)?);
                    if first {
                        first = false;
                        counted_from = Instant::now();
                    } else {
                        images += batch;
                    }
                }
                Ok(images as f64 / counted_from.elapsed().as_secs_f64())
            })();
            stop.store(true, Ordering::Relaxed);
            // Unblock decoders waiting on a full channel.
            while rx.try_recv().is_ok() {}
            drop(rx);
            result
        })
    }
}
