//! `load suite`: every figure of the performance table for one model, in one run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::client::{self, Request};
use crate::daemon::{Daemon, Spec};
use crate::{cost, limit, loadavg, median, request_pngs};

#[derive(clap::Args)]
pub struct SuiteArgs {
    /// Label of the model in the table.
    #[arg(long)]
    label: String,
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "target/release/csgd")]
    csgd: PathBuf,
    #[arg(long, default_value = ".ort/libonnxruntime.so")]
    ort_library: PathBuf,
    /// Batch sizes tried for the limit (the best is kept).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32,64")]
    batches: Vec<usize>,
    /// Interleaved rounds of (limit, batched, classify, unbatched); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Alternating detect/classify pairs for the detection cost.
    #[arg(long, default_value_t = 8)]
    cost_pairs: usize,
    /// Seconds per run of a detection-cost pair.
    #[arg(long, default_value_t = 3.0)]
    cost_secs: f64,
    /// Seconds per fixed-rate latency measurement.
    #[arg(long, default_value_t = 10.0)]
    latency_secs: f64,
    /// Connections of the saturating (closed-loop) client.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// Connections held open for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle_conns: usize,
    /// Execution providers of both the limit and the daemon, in order (repeatable).
    #[arg(long = "provider", value_enum, default_values = ["cpu"])]
    providers: Vec<csgd::config::Provider>,
    /// TensorRT engine cache folder (runtime.trt_engine_cache) for both.
    #[arg(long, default_value = "")]
    trt_engine_cache: String,
    /// Extra `csgd serve --set KEY=VALUE` for both daemons (repeatable).
    #[arg(long = "set")]
    sets: Vec<String>,
    /// How the latency levels' fixed-rate client times its sends (`thread` where the machine
    /// has cores to spare for it).
    #[arg(long, value_enum, default_value_t = client::Pacing::Timer)]
    pacing: client::Pacing,
    /// Where the result JSON goes.
    #[arg(long)]
    pub out: PathBuf,
}

/// Measures one model: the limit, csgd batched, unbatched and classify-only in interleaved
/// rounds, the detection cost, the latency levels, memory and time to ready.
pub async fn run(a: &SuiteArgs) -> Result<serde_json::Value> {
    let load_before = loadavg();
    let secs = Duration::from_secs_f64(a.secs);
    let meta = csgd::runtime::read_bundle_meta(&a.model)?;
    let pngs = request_pngs(&meta, 16)?;
    let calibrated = meta.calibration.is_some();

    // The limit is the best the runtime does with this thread budget: every batch size, with
    // ONNX Runtime's idle threads spinning (its default) and not (the daemon's default).
    eprintln!("[{}] limit: searching the best batch size", a.label);
    let mut per_batch = serde_json::Map::new();
    let (mut best, mut best_ips, mut best_spin) = (1, 0.0, false);
    let mut candidates = Vec::new();
    for spinning in [false, true] {
        let runtime = csgd::config::RuntimeConfig {
            ort_library: a.ort_library.display().to_string(),
            execution_providers: a.providers.clone(),
            trt_engine_cache: a.trt_engine_cache.clone(),
            intra_op_spinning: spinning.into(),
            ..Default::default()
        };
        let mut candidate = limit::Limit::load(&a.model, &runtime)?;
        for &b in &a.batches {
            let ips = candidate.measure(&pngs, b, secs.mul_f64(0.4))?;
            eprintln!("  batch {b:>3}, spinning {spinning}: {ips:.1} img/s");
            per_batch.insert(
                format!("{b}{}", if spinning { "-spin" } else { "" }),
                ips.into(),
            );
            if ips > best_ips {
                (best, best_ips, best_spin) = (b, ips, spinning);
            }
        }
        candidates.push(candidate);
    }
    let mut limit = candidates.swap_remove(usize::from(best_spin));
    drop(candidates);

    let providers: Vec<&str> = a.providers.iter().map(|p| p.name()).collect();
    let mut common = a.sets.clone();
    if !a.trt_engine_cache.is_empty() {
        common.push(format!("runtime.trt_engine_cache={}", a.trt_engine_cache));
    }
    let spec = |sets: &[&str]| Spec {
        csgd: a.csgd.clone(),
        model_name: "bench".into(),
        model_path: a.model.clone(),
        ort_library: a.ort_library.clone(),
        providers: providers.iter().map(|p| p.to_string()).collect(),
        sets: common
            .iter()
            .cloned()
            .chain(sets.iter().map(|s| s.to_string()))
            .collect(),
    };
    let mut ready = Vec::new();
    let probe = Daemon::start(&spec(&[])).await?;
    ready.push(probe.ready_after.as_secs_f64());
    probe.stop();
    let batched = Daemon::start(&spec(&[])).await?;
    ready.push(batched.ready_after.as_secs_f64());
    let unbatched = Daemon::start(&spec(&["batching.max_batch_size=1"])).await?;
    ready.push(unbatched.ready_after.as_secs_f64());

    let detect = client::png_posts(&pngs, "/v1/models/bench/detect");
    let classify = client::png_posts(&pngs, "/v1/models/bench/classify");
    // Warm both daemons (first requests allocate buffers), then read idle memory.
    let warm = Duration::from_millis(500);
    client::closed_loop(
        batched.addr,
        Arc::clone(&detect),
        a.conns,
        Duration::ZERO,
        warm,
    )
    .await?;
    client::closed_loop(
        unbatched.addr,
        Arc::clone(&detect),
        a.conns,
        Duration::ZERO,
        warm,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_rss, _) = batched.memory_mib()?;

    let (mut lim, mut bat, mut cls, mut unb) = (vec![], vec![], vec![], vec![]);
    let mut runs = Vec::new();
    let settle = Duration::from_millis(300);
    // Odd rounds run the four measurements in reverse order, so a drift in the machine's
    // load during a round does not always favour the same one.
    let (mut r_bat, mut r_unb, mut r_det) = (vec![], vec![], vec![]);
    for round in 0..a.rounds {
        eprintln!("[{}] round {}/{}", a.label, round + 1, a.rounds);
        let mut order = [0, 1, 2, 3];
        if round % 2 == 1 {
            order.reverse();
        }
        let (mut l, mut b, mut c, mut u) = (0.0, None, None, None);
        for step in order {
            match step {
                0 => l = limit.measure(&pngs, best, secs)?,
                1 => {
                    b = Some(
                        client::closed_loop(
                            batched.addr,
                            Arc::clone(&detect),
                            a.conns,
                            settle,
                            secs,
                        )
                        .await?,
                    )
                }
                2 => {
                    c = Some(
                        client::closed_loop(
                            batched.addr,
                            Arc::clone(&classify),
                            a.conns,
                            settle,
                            secs,
                        )
                        .await?,
                    )
                }
                _ => {
                    u = Some(
                        client::closed_loop(
                            unbatched.addr,
                            Arc::clone(&detect),
                            a.conns,
                            settle,
                            secs,
                        )
                        .await?,
                    )
                }
            }
        }
        let (Some(b), Some(c), Some(u)) = (b, c, u) else {
            anyhow::bail!("a measurement of the round did not run");
        };
        eprintln!(
            "  limit {l:.1}  batched {:.1}  classify {:.1}  unbatched {:.1} img/s",
            b.rps, c.rps, u.rps
        );
        lim.push(l);
        bat.push(b.rps);
        cls.push(c.rps);
        unb.push(u.rps);
        r_bat.push(b.rps / l);
        r_unb.push(u.rps / l);
        r_det.push(b.rps / c.rps);
        runs.push(serde_json::json!({"limit": l, "batched": b, "classify": c, "unbatched": u}));
    }
    let saturated = median(&bat);

    eprintln!("[{}] detection cost: detect vs classify pairs", a.label);
    let cost = cost::measure(
        &batched,
        &detect,
        &classify,
        a.conns,
        a.cost_pairs,
        Duration::from_secs_f64(a.cost_secs),
    )
    .await?;

    // Each latency level is a fraction of the saturated rate measured just before it: the
    // capacity of a shared machine drifts, and a rate above it only measures a growing queue.
    let mut latency = Vec::new();
    for fraction in [0.25, 0.5, 0.9] {
        let now = client::closed_loop(
            batched.addr,
            Arc::clone(&detect),
            a.conns,
            settle,
            secs.mul_f64(0.5),
        )
        .await?;
        let rate = now.rps * fraction;
        let (run, _) = client::open_loop(
            batched.addr,
            Arc::clone(&detect),
            64,
            rate,
            Duration::from_secs_f64(a.latency_secs),
            a.pacing,
        )
        .await?;
        eprintln!(
            "[{}] {:.0} % of {:.1} ({rate:.1} req/s): p50 {:.2} p90 {:.2} p99 {:.2} ms",
            a.label,
            fraction * 100.0,
            now.rps,
            run.p50_ms,
            run.p90_ms,
            run.p99_ms
        );
        latency.push(serde_json::json!({"fraction": fraction, "saturated": now.rps, "rate": rate, "pacing": a.pacing, "run": run}));
    }

    eprintln!("[{}] opening {} idle connections", a.label, a.idle_conns);
    let one = Arc::new(Request::post(
        "/v1/models/bench/detect",
        "image/png",
        &pngs[0],
    ));
    let held = client::open_idle(batched.addr, one, a.idle_conns, 64).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (conns_rss, _) = batched.memory_mib()?;
    drop(held);
    let (_, peak_rss) = batched.memory_mib()?;
    batched.stop();
    unbatched.stop();

    let lim_m = median(&lim);
    let cls_m = median(&cls);
    Ok(serde_json::json!({
        "label": a.label,
        "providers": providers,
        "model": a.model,
        "input": meta.input,
        "calibrated": calibrated,
        "cores": csgd::config::cores(),
        "threads": {
            "intra_op": limit.intra_threads,
            "io_workers": csgd::config::ThreadsConfig::default().io_workers(),
            "preprocess": csgd::config::ThreadsConfig::default().preprocess_threads(),
            "limit_decoders": limit.decode_threads,
        },
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "daemon_sets": a.sets,
        "secs_per_measurement": a.secs,
        "rounds": a.rounds,
        "conns": a.conns,
        "limit": {"best_batch": best, "spinning": best_spin, "search": per_batch, "ips": lim_m},
        "csgd_batched_ips": saturated,
        "csgd_unbatched_ips": median(&unb),
        "classify_ips": cls_m,
        // Medians of the per-round ratios: each round's figures saw the same conditions.
        "ratios": {
            "batched_vs_limit": median(&r_bat),
            "unbatched_vs_limit": median(&r_unb),
            "detect_vs_classify_rounds": median(&r_det),
            "detection_cost": cost.throughput,
            "detection_cost_cpu": cost.cpu,
        },
        "detection_cost": cost,
        "ratios_of_medians": {
            "batched_vs_limit": saturated / lim_m,
            "unbatched_vs_limit": median(&unb) / lim_m,
            "detection_cost_rounds": 1.0 - saturated / cls_m,
        },
        "latency": latency,
        "memory_mib": {"idle": idle_rss, "conns": a.idle_conns, "with_conns": conns_rss, "peak": peak_rss},
        "ready_s": median(&ready),
        "ready_samples_s": ready,
        "rounds_raw": runs,
    }))
}
