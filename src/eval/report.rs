//! The evaluation's Markdown table (for the README and issue notes).

use std::fmt::Write;

use super::ModelResult;

/// One row per (model, attack), one column pair (AUROC / TPR at `fpr`) per score.
pub fn markdown(results: &[ModelResult], fpr: &str) -> String {
    let mut out = String::new();
    let Some(first) = results.iter().flat_map(|m| m.attacks.first()).next() else {
        return "no attacks evaluated\n".into();
    };
    let scores: Vec<&str> = first.scores.iter().map(|s| s.score).collect();
    let _ = writeln!(
        out,
        "| model | attack | success | mean L2 / L∞ | n | {} |",
        scores
            .iter()
            .map(|s| format!("{s} AUROC / TPR@{fpr}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---|---|---|---|---|{}", "---|".repeat(scores.len()));
    for model in results {
        for attack in &model.attacks {
            let cells: Vec<String> = attack
                .scores
                .iter()
                .map(|s| {
                    format!(
                        "{:.3} / {:.2}",
                        s.auroc,
                        s.tpr.get(fpr).copied().unwrap_or(f64::NAN)
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "| {} | {}{} | {:.2} | {:.3} / {:.3} | {} | {} |",
                model.label,
                attack.attack,
                if attack.targeted { " (targeted)" } else { "" },
                attack.success_rate,
                attack.mean_l2,
                attack.mean_linf,
                attack.adversarial,
                cells.join(" | ")
            );
        }
        let worst: Vec<String> = scores
            .iter()
            .map(|s| {
                model
                    .worst_auroc
                    .get(*s)
                    .map_or("—".into(), |v| format!("{v:.3}"))
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | **worst (non-adaptive)** | | | | {} |",
            model.label,
            worst.join(" | ")
        );
    }
    let _ = writeln!(out);
    for model in results {
        let _ = writeln!(
            out,
            "{} ({} gate): clean test accuracy {:.4} on {} images; clean test images flagged at the {fpr} threshold: {}",
            model.label,
            model.gate,
            model.clean_accuracy,
            model.clean_images,
            model
                .realised_fpr
                .iter()
                .map(|(score, rates)| format!(
                    "{score} {:.3}",
                    rates.get(fpr).copied().unwrap_or(f64::NAN)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    out
}
