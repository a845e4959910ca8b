//! Latency A/B: daemons started with different settings (or binaries), measured in
//! alternating rounds at the same fraction of each one's saturated rate, so that a
//! latency-shaping change can be judged on this noisy machine. Each round re-measures
//! saturation first (the host's capacity drifts) and reports p50/p90/p99, the mean batch,
//! the machine's steal time during the fixed-rate run, which tells a stall of the host from
//! one of the daemon, and how the slowest answers bunch in time ([`crate::episodes`];
//! `--timeline` writes every answer).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::client::{self, Answer};
use crate::daemon::{Daemon, Spec};
use crate::{median, request_pngs};

#[derive(clap::Args)]
pub struct LatencyArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "target/release/csgd")]
    csgd: PathBuf,
    #[arg(long, default_value = ".ort/libonnxruntime.so")]
    ort_library: PathBuf,
    /// `LABEL[@BINARY][:KEY=VALUE,KEY=VALUE...]`: a daemon with these `--set` overrides
    /// (and another csgd binary); repeatable, at least one.
    #[arg(long = "variant", required = true)]
    variants: Vec<String>,
    /// Fraction of the saturated rate to measure at.
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per fixed-rate run.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Connections of the saturating client and of the fixed-rate one.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    #[arg(long, default_value_t = 64)]
    open_conns: usize,
    /// How the fixed-rate client times its sends; repeatable: every variant is measured with
    /// each, in the same rounds (to compare the generators themselves).
    #[arg(long = "pacing", value_enum, default_values_t = [client::Pacing::Timer])]
    pacings: Vec<client::Pacing>,
    /// Where the result JSON goes.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A CSV of every answer of every round (scheduled time, latency, csgd's timings), to see
    /// where in time the slow ones fall.
    #[arg(long)]
    timeline: Option<PathBuf>,
}

struct Variant {
    label: String,
    csgd: PathBuf,
    sets: Vec<String>,
}

fn parse_variant(text: &str, default_csgd: &Path) -> Result<Variant> {
    let (head, sets) = text.split_once(':').unwrap_or((text, ""));
    let (label, csgd) = match head.split_once('@') {
        Some((label, binary)) => (label, PathBuf::from(binary)),
        None => (head, default_csgd.to_path_buf()),
    };
    if label.is_empty() {
        bail!("variant {text:?} has no label");
    }
    Ok(Variant {
        label: label.to_owned(),
        csgd,
        sets: sets
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

#[derive(Debug, Serialize)]
struct Round {
    saturated: f64,
    rate: f64,
    run: client::Run,
    ratio: f64,
    mean_batch: f64,
    /// Share of the machine's CPU time stolen by the hypervisor during the run.
    steal: f64,
}

#[derive(Debug, Serialize)]
struct Summary {
    label: String,
    sets: Vec<String>,
    pacing: client::Pacing,
    median_p50_ms: f64,
    median_p99_ms: f64,
    median_ratio: f64,
    rounds: Vec<Round>,
}

/// (steal, total) jiffies of all CPUs, from /proc/stat.
fn cpu_jiffies() -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guests are in user.
    let steal = values.get(7).copied().unwrap_or(0.0);
    Ok((steal, values.iter().take(8).sum()))
}

/// Runs the A/B, prints its table and writes its JSON to `--out`, if given.
pub async fn run(a: &LatencyArgs) -> Result<()> {
    let meta = csgd::runtime::read_bundle_meta(&a.model)?;
    let pngs = request_pngs(&meta, 16)?;
    let detect = client::png_posts(&pngs, "/v1/models/bench/detect");
    let variants: Vec<Variant> = a
        .variants
        .iter()
        .map(|v| parse_variant(v, &a.csgd))
        .collect::<Result<_>>()?;
    let mut daemons = Vec::new();
    for v in &variants {
        let daemon = Daemon::start(&Spec {
            csgd: v.csgd.clone(),
            model_name: "bench".into(),
            model_path: a.model.clone(),
            ort_library: a.ort_library.clone(),
            providers: vec!["cpu".into()],
            sets: v.sets.clone(),
        })
        .await
        .with_context(|| format!("starting variant {}", v.label))?;
        client::closed_loop(
            daemon.addr,
            Arc::clone(&detect),
            a.conns,
            Duration::ZERO,
            Duration::from_millis(500),
        )
        .await?;
        daemons.push(daemon);
    }
    // An arm is a daemon measured with one pacing.
    let arms: Vec<(usize, client::Pacing)> = (0..variants.len())
        .flat_map(|i| a.pacings.iter().map(move |&p| (i, p)))
        .collect();
    let arm_label = |(i, pacing): (usize, client::Pacing)| {
        let label = &variants[i].label;
        if a.pacings.len() > 1 {
            format!("{label}/{pacing:?}").to_lowercase()
        } else {
            label.clone()
        }
    };
    let mut timeline = match &a.timeline {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            writeln!(out, "{}", TIMELINE_HEADER)?;
            Some(out)
        }
        None => None,
    };
    let mut rounds: Vec<Vec<Round>> = arms.iter().map(|_| Vec::new()).collect();
    for round in 0..a.rounds {
        let mut order: Vec<usize> = (0..arms.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for arm in order {
            let (i, pacing) = arms[arm];
            let label = arm_label(arms[arm]);
            let daemon = &daemons[i];
            let now = client::closed_loop(
                daemon.addr,
                Arc::clone(&detect),
                a.conns,
                Duration::from_millis(300),
                Duration::from_secs_f64(2.5),
            )
            .await?;
            let rate = now.rps * a.fraction;
            let batches_before = daemon.batch_totals()?;
            let jiffies_before = cpu_jiffies()?;
            let (run, answers) = client::open_loop(
                daemon.addr,
                Arc::clone(&detect),
                a.open_conns,
                rate,
                Duration::from_secs_f64(a.secs),
                pacing,
            )
            .await?;
            let jiffies_after = cpu_jiffies()?;
            let batches_after = daemon.batch_totals()?;
            let steal = (jiffies_after.0 - jiffies_before.0)
                / (jiffies_after.1 - jiffies_before.1).max(1.0);
            let mean_batch = (batches_after.0 - batches_before.0)
                / (batches_after.1 - batches_before.1).max(1.0);
            let nan = [f64::NAN; 3];
            let server = run.server.as_ref();
            let [t50, _, t99] = server.map_or(nan, |s| s.total_ms);
            let [q50, _, q99] = server.map_or(nan, |s| s.queue_ms);
            let [i50, _, i99] = server.map_or(nan, |s| s.inference_ms);
            eprintln!(
                "round {}: {:<12} {:.0} % of {:.0}: p50 {:.2} p90 {:.2} p99 {:.2} ms (÷ {:.2}); \
                 in csgd p50/p99 {t50:.2}/{t99:.2}, queue {q50:.2}/{q99:.2}, inference \
                 {i50:.2}/{i99:.2}; batch {mean_batch:.1}, steal {:.1} %",
                round + 1,
                label,
                a.fraction * 100.0,
                now.rps,
                run.p50_ms,
                run.p90_ms,
                run.p99_ms,
                run.p99_ms / run.p50_ms,
                steal * 100.0
            );
            if let Some(server) = server {
                let sizes: Vec<String> = server
                    .inference_by_batch
                    .iter()
                    .map(|b| {
                        let [p50, _, p99] = b.inference_ms;
                        format!(
                            "{} ({:.0} %) {p50:.2}/{p99:.2}",
                            b.batch_size,
                            b.share * 100.0
                        )
                    })
                    .collect();
                eprintln!(
                    "         inference p50/p99 by batch size: {}",
                    sizes.join(", ")
                );
            }
            if let Some(tail) = &run.tail {
                eprintln!(
                    "         slowest 1 %: {} answers in {} episodes, the largest three hold {:.0} %; \
                     the largest spans {:.1} ms from {:.0} ms",
                    tail.tail,
                    tail.episodes,
                    tail.top3_share * 100.0,
                    tail.largest_span_ms,
                    tail.largest_at_ms
                );
            }
            if let Some(out) = timeline.as_mut() {
                write_timeline(out, &label, round + 1, &answers)?;
            }
            rounds[arm].push(Round {
                saturated: now.rps,
                rate,
                ratio: run.p99_ms / run.p50_ms,
                run,
                mean_batch,
                steal,
            });
        }
    }
    for daemon in daemons {
        daemon.stop();
    }
    if let Some(mut out) = timeline {
        out.flush().context("writing the timeline")?;
    }
    let summaries: Vec<Summary> = arms
        .iter()
        .zip(rounds)
        .map(|(&(i, pacing), rounds)| {
            let of = |f: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
            Summary {
                median_p50_ms: of(&|r| r.run.p50_ms),
                median_p99_ms: of(&|r| r.run.p99_ms),
                median_ratio: of(&|r| r.ratio),
                label: arm_label((i, pacing)),
                sets: variants[i].sets.clone(),
                pacing,
                rounds,
            }
        })
        .collect();
    println!("| variant | p50 ms | p99 ms | p99 ÷ p50 (median) | per round |");
    println!("|---|---|---|---|---|");
    for s in &summaries {
        let per_round: Vec<String> = s.rounds.iter().map(|r| format!("{:.2}", r.ratio)).collect();
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {} |",
            s.label,
            s.median_p50_ms,
            s.median_p99_ms,
            s.median_ratio,
            per_round.join(", ")
        );
    }
    let result = serde_json::json!({
        "model": a.model,
        "fraction": a.fraction,
        "secs": a.secs,
        "variants": summaries,
    });
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// Appends one CSV row per answer: `arm,round,due_ms,status,latency_ms,queue_ms,
/// inference_ms,batch_size` (csgd's timings empty where the answer carried none).
fn write_timeline(out: &mut impl Write, arm: &str, round: usize, answers: &[Answer]) -> Result<()> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut sorted: Vec<&Answer> = answers.iter().collect();
    sorted.sort_by_key(|a| a.due);
    for a in sorted {
        let status = a.status.map_or(String::new(), |s| s.to_string());
        let server = a.server.as_ref().map_or(String::from(",,"), |t| {
            format!("{:.3},{:.3},{}", ms(t.queue), ms(t.inference), t.batch_size)
        });
        writeln!(
            out,
            "{arm},{round},{:.3},{status},{:.3},{server}",
            ms(a.due),
            ms(a.latency)
        )?;
    }
    Ok(())
}

/// The header of [`write_timeline`]'s CSV.
const TIMELINE_HEADER: &str = "arm,round,due_ms,status,latency_ms,queue_ms,inference_ms,batch_size";
