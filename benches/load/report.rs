//! The results table: Markdown for the README and the terminal, one JSON file for machines.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

fn num(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}

fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

fn pct1(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

/// `n` with a comma between thousands, as the README writes counts.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Two tables: throughput and ratios; latency, memory and start-up.
pub fn markdown(results: &[Value]) -> String {
    let mut s = String::from(
        "| model | limit img/s (batch) | csgd batched img/s | ÷ limit | csgd unbatched img/s | ÷ limit | classify img/s | detection cost: throughput · CPU per image |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        s += &format!(
            "| {} | {:.1} ({}{}) | {:.1} | **{}** | {:.1} | {} | {:.1} | {} · **{}** ({:.1} vs {:.1} µs) |\n",
            r["label"].as_str().unwrap_or("?"),
            num(r, &["limit", "ips"]),
            r["limit"]["best_batch"],
            if r["limit"]["spinning"] == Value::Bool(true) {
                ", spin"
            } else {
                ""
            },
            num(r, &["csgd_batched_ips"]),
            pct(num(r, &["ratios", "batched_vs_limit"])),
            num(r, &["csgd_unbatched_ips"]),
            pct(num(r, &["ratios", "unbatched_vs_limit"])),
            num(r, &["classify_ips"]),
            pct1(num(r, &["ratios", "detection_cost"])),
            pct1(num(r, &["ratios", "detection_cost_cpu"])),
            num(r, &["detection_cost", "detect_cpu_us_per_image"]),
            num(r, &["detection_cost", "classify_cpu_us_per_image"]),
        );
    }
    // The suite's --idle-conns (1,000 unless a quick run asked for fewer).
    let conns: Vec<u64> = results
        .iter()
        .filter_map(|r| r["memory_mib"]["conns"].as_u64())
        .collect();
    let held = match conns.first() {
        Some(&n) if conns.iter().all(|&c| c == n) => format!("RSS, {} conns", thousands(n)),
        _ => "RSS, open conns".to_owned(),
    };
    s += &format!(
        "\n| model | p50 / p90 / p99 ms at 25 % | at 50 % | at 90 % | p99 ÷ p50 at 50 % | RSS idle MiB | {held} | ready s | load avg before → after |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    for r in results {
        let lat = |i: usize| {
            let run = &r["latency"][i]["run"];
            format!(
                "{:.2} / {:.2} / {:.2}",
                num(run, &["p50_ms"]),
                num(run, &["p90_ms"]),
                num(run, &["p99_ms"])
            )
        };
        let half = &r["latency"][1]["run"];
        s += &format!(
            "| {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.3} | {} → {} |\n",
            r["label"].as_str().unwrap_or("?"),
            lat(0),
            lat(1),
            lat(2),
            num(half, &["p99_ms"]) / num(half, &["p50_ms"]),
            num(r, &["memory_mib", "idle"]),
            num(r, &["memory_mib", "with_conns"]),
            num(r, &["ready_s"]),
            r["loadavg_before"].as_str().unwrap_or("?"),
            r["loadavg_after"].as_str().unwrap_or("?"),
        );
    }
    s
}

pub fn table(inputs: &[PathBuf], json: &Path, md: &Path) -> Result<()> {
    let results: Vec<Value> = inputs
        .iter()
        .map(|p| -> Result<Value> {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(serde_json::from_str(&text)?)
        })
        .collect::<Result<_>>()?;
    let table = markdown(&results);
    std::fs::write(json, serde_json::to_string_pretty(&results)?)?;
    std::fs::write(md, &table)?;
    println!("{table}");
    Ok(())
}
