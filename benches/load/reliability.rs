//! Issue 8's load runs against one daemon: a soak at a fraction of the saturated rate (every
//! status counted, resident memory and open file descriptors sampled as it runs), and an
//! overload at a multiple of it followed by a calm phase (429s must come fast, and the daemon
//! must recover by itself).
//!
//! Unlike the throughput client, this one keeps going when a connection fails (it counts the
//! failure and reconnects): counting what goes wrong is the point here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::client::{self, Request};
use crate::daemon::{Daemon, Spec};
use crate::{median, request_pngs};

#[derive(clap::Args)]
pub struct ReliabilityArgs {
    #[arg(long, default_value = "models/fashion-csg.onnx")]
    model: PathBuf,
    #[arg(long, default_value = "target/release/csgd")]
    csgd: PathBuf,
    #[arg(long, default_value = ".ort/libonnxruntime.so")]
    ort_library: PathBuf,
    /// Length of the soak, seconds.
    #[arg(long, default_value_t = 180.0)]
    soak_secs: f64,
    /// Soak rate as a fraction of the saturated rate.
    #[arg(long, default_value_t = 0.8)]
    soak_fraction: f64,
    /// Overload rate as a multiple of the saturated rate.
    #[arg(long, default_value_t = 3.0)]
    overload_factor: f64,
    /// Length of the overload and of the calm phase after it, seconds each.
    #[arg(long, default_value_t = 10.0)]
    overload_secs: f64,
    /// Connections of the overload client: more than server.max_concurrent_requests (512),
    /// so that the offered rate is really sent.
    #[arg(long, default_value_t = 1024)]
    overload_conns: usize,
    #[arg(long)]
    pub out: PathBuf,
}

/// What one open-loop phase saw.
#[derive(Debug, Default, Serialize)]
pub struct Phase {
    pub rate: f64,
    pub secs: f64,
    pub sent: u64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests without an HTTP answer (connection refused, reset or closed).
    pub transport_errors: u64,
    pub ok_p50_ms: f64,
    pub ok_p99_ms: f64,
    /// Latency of the 429 answers: overload must be refused quickly.
    pub rejected_p50_ms: f64,
    pub rejected_p99_ms: f64,
}

impl Phase {
    fn count(&self, pred: impl Fn(u16) -> bool) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| pred(**s))
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Debug, Serialize)]
struct Sample {
    at_s: f64,
    rss_mib: f64,
    fds: usize,
}

/// `rate` requests per second for `secs` over `conns` connections ([`client::scheduled`]):
/// every status counted, failed connections counted and reopened.
async fn open_loop(
    addr: std::net::SocketAddr,
    requests: Arc<Vec<Request>>,
    conns: usize,
    rate: f64,
    secs: f64,
) -> Result<Phase> {
    let answers = client::scheduled(
        addr,
        requests,
        conns,
        rate,
        Duration::from_secs_f64(secs),
        client::Pacing::Timer,
    )
    .await?;
    let mut phase = Phase {
        rate,
        secs,
        sent: answers.len() as u64,
        ..Default::default()
    };
    let (mut ok, mut rejected) = (Vec::new(), Vec::new());
    for answer in answers {
        let Some(status) = answer.status else {
            phase.transport_errors += 1;
            continue;
        };
        *phase.statuses.entry(status).or_default() += 1;
        match status {
            200 => ok.push(answer.latency),
            429 => rejected.push(answer.latency),
            _ => {}
        }
    }
    ok.sort_unstable();
    rejected.sort_unstable();
    phase.ok_p50_ms = client::percentile(&ok, 0.5);
    phase.ok_p99_ms = client::percentile(&ok, 0.99);
    phase.rejected_p50_ms = client::percentile(&rejected, 0.5);
    phase.rejected_p99_ms = client::percentile(&rejected, 0.99);
    Ok(phase)
}

fn open_fds(daemon: &Daemon) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))?.count())
}

pub async fn run(a: &ReliabilityArgs) -> Result<serde_json::Value> {
    let meta = csgd::runtime::read_bundle_meta(&a.model)?;
    let pngs = request_pngs(&meta, 16)?;
    let detect = client::png_posts(&pngs, "/v1/detect");
    let daemon = Daemon::start(&Spec {
        csgd: a.csgd.clone(),
        model_name: "fashion-csg".into(),
        model_path: a.model.clone(),
        ort_library: a.ort_library.clone(),
        providers: vec![],
        sets: vec![],
    })
    .await?;
    let settle = Duration::from_millis(300);
    let mut saturation = Vec::new();
    for _ in 0..3 {
        let run = client::closed_loop(
            daemon.addr,
            Arc::clone(&detect),
            32,
            settle,
            Duration::from_secs(3),
        )
        .await?;
        saturation.push(run.rps);
    }
    let saturated = median(&saturation);
    eprintln!("saturated: {saturated:.1} req/s ({saturation:.1?})");

    // Soak: the load runs as a task while this one samples memory and descriptors.
    let rate = saturated * a.soak_fraction;
    eprintln!("soak: {rate:.1} req/s for {} s", a.soak_secs);
    let load = tokio::spawn(open_loop(
        daemon.addr,
        Arc::clone(&detect),
        64,
        rate,
        a.soak_secs,
    ));
    let started = Instant::now();
    let mut samples = Vec::new();
    while !load.is_finished() {
        samples.push(Sample {
            at_s: started.elapsed().as_secs_f64(),
            rss_mib: daemon.memory_mib()?.0,
            fds: open_fds(&daemon)?,
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let soak = load.await??;
    samples.push(Sample {
        at_s: started.elapsed().as_secs_f64(),
        rss_mib: daemon.memory_mib()?.0,
        fds: open_fds(&daemon)?,
    });
    eprintln!(
        "soak: {} sent, statuses {:?}, {} transport errors",
        soak.sent, soak.statuses, soak.transport_errors
    );

    let rate = saturated * a.overload_factor;
    eprintln!(
        "overload: {rate:.1} req/s for {} s over {} connections",
        a.overload_secs, a.overload_conns
    );
    let overload = open_loop(
        daemon.addr,
        Arc::clone(&detect),
        a.overload_conns,
        rate,
        a.overload_secs,
    )
    .await?;
    let calm_rate = saturated * 0.5;
    let calm = open_loop(
        daemon.addr,
        Arc::clone(&detect),
        64,
        calm_rate,
        a.overload_secs,
    )
    .await?;
    eprintln!(
        "overload: statuses {:?}, 429 p50 {:.2} p99 {:.2} ms; calm after: statuses {:?}, {} transport errors",
        overload.statuses,
        overload.rejected_p50_ms,
        overload.rejected_p99_ms,
        calm.statuses,
        calm.transport_errors
    );
    let first = &samples[0];
    let last = &samples[samples.len() - 1];
    let summary = serde_json::json!({
        "soak": {
            "secs": a.soak_secs,
            "rate": soak.rate,
            "requests": soak.sent,
            "ok": soak.count(|s| s == 200),
            "errors": soak.sent - soak.count(|s| s == 200),
            "server_errors_5xx": soak.count(|s| s >= 500),
            "rss_mib_start_end": [first.rss_mib, last.rss_mib],
            "fds_start_end": [first.fds, last.fds],
        },
        "overload": {
            "factor": a.overload_factor,
            "rejected_429": overload.count(|s| s == 429),
            "ok": overload.count(|s| s == 200),
            "other": overload.count(|s| s != 200 && s != 429),
            "transport_errors": overload.transport_errors,
            "rejected_p99_ms": overload.rejected_p99_ms,
            "ok_p99_ms": overload.ok_p99_ms,
            "calm_after_errors": calm.sent - calm.count(|s| s == 200),
        },
    });
    daemon.stop();
    Ok(serde_json::json!({
        "saturated_rps": saturated,
        "saturation_runs": saturation,
        "summary": summary,
        "soak": soak,
        "samples": samples,
        "overload": overload,
        "calm_after_overload": calm,
        "loadavg_after": crate::loadavg(),
    }))
}
