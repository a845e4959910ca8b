//! What detection costs: the detect route against classify-only (same daemon, model, batching
//! queue and outputs; no detector, a smaller answer), in alternating pairs of runs.
//!
//! Throughput moves with whatever else the machine does, by more than the few percent this
//! is about (an earlier run's rounds spread from −26 % to +1 %). The daemon's own CPU time
//! per answered image, read from /proc around each run, hardly does: it is the precise
//! estimate of the same quantity, since at saturation throughput is CPU time per image.
//! Both are reported, as medians of the per-pair ratios.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::client::{self, Request};
use crate::daemon::Daemon;
use crate::median;

/// One run of one route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteRun {
    pub rps: f64,
    /// Daemon CPU (user + system) per answered image, µs.
    pub cpu_us_per_image: f64,
    /// Mean size of the batches the daemon ran during the run: the tiny model's per-image
    /// ONNX Runtime cost depends on it, so a route that changes how batches fill changes CPU
    /// per image without doing more work itself.
    pub mean_batch: f64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub detect: RouteRun,
    pub classify: RouteRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    /// 1 − detect ÷ classify throughput, median over pairs.
    pub throughput: f64,
    /// Detect ÷ classify daemon CPU per image − 1, median over pairs.
    pub cpu: f64,
    pub detect_cpu_us_per_image: f64,
    pub classify_cpu_us_per_image: f64,
    pub pairs: Vec<Pair>,
}

/// Saturates `daemon` with `requests` for `secs` and reads its CPU time around the run.
async fn route_run(
    daemon: &Daemon,
    requests: &Arc<Vec<Request>>,
    conns: usize,
    secs: Duration,
) -> Result<RouteRun> {
    let before = daemon.cpu_seconds()?;
    let batches_before = daemon.batch_totals()?;
    // No warm-up window: every request of the run is counted, as is all of its CPU time.
    let run = client::closed_loop(
        daemon.addr,
        Arc::clone(requests),
        conns,
        Duration::ZERO,
        secs,
    )
    .await?;
    let cpu = daemon.cpu_seconds()? - before;
    let batches_after = daemon.batch_totals()?;
    let batches = batches_after.1 - batches_before.1;
    Ok(RouteRun {
        rps: run.rps,
        cpu_us_per_image: cpu * 1e6 / run.ok.max(1) as f64,
        mean_batch: (batches_after.0 - batches_before.0) / batches.max(1.0),
        errors: run.errors,
    })
}

/// `pairs` detect/classify pairs; odd pairs run classify first, so a drift in the machine's
/// load does not always favour the same route.
pub async fn measure(
    daemon: &Daemon,
    detect: &Arc<Vec<Request>>,
    classify: &Arc<Vec<Request>>,
    conns: usize,
    pairs: usize,
    secs: Duration,
) -> Result<Cost> {
    let mut runs = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let (d, c) = if i % 2 == 0 {
            let d = route_run(daemon, detect, conns, secs).await?;
            (d, route_run(daemon, classify, conns, secs).await?)
        } else {
            let c = route_run(daemon, classify, conns, secs).await?;
            (route_run(daemon, detect, conns, secs).await?, c)
        };
        eprintln!(
            "  pair {}: detect {:.1} img/s {:.1} µs CPU batch {:.1}, classify {:.1} img/s {:.1} µs \
             CPU batch {:.1}",
            i + 1,
            d.rps,
            d.cpu_us_per_image,
            d.mean_batch,
            c.rps,
            c.cpu_us_per_image,
            c.mean_batch
        );
        runs.push(Pair {
            detect: d,
            classify: c,
        });
    }
    let ratio = |f: &dyn Fn(&Pair) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Ok(Cost {
        throughput: 1.0 - ratio(&|p| p.detect.rps / p.classify.rps),
        cpu: ratio(&|p| p.detect.cpu_us_per_image / p.classify.cpu_us_per_image) - 1.0,
        detect_cpu_us_per_image: ratio(&|p| p.detect.cpu_us_per_image),
        classify_cpu_us_per_image: ratio(&|p| p.classify.cpu_us_per_image),
        pairs: runs,
    })
}
