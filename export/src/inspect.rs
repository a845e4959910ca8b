//! A readable summary of a bundle's metadata, for `csg-export inspect`.

use std::fmt::Write;

use csg_bundle::{Backbone, BlockKind, BundleMeta, Stem};

/// At most this many scalar fields of the training report and calibration are shown.
const HIGHLIGHTS: usize = 12;

/// Formats the summary of a bundle: what it is, what it expects, what it outputs, its gate,
/// its training and its calibration state.
pub fn summary(meta: &BundleMeta) -> String {
    let mut s = String::new();
    let arch = &meta.architecture;
    let input = &meta.input;
    let mut line = |key: &str, value: String| {
        let _ = writeln!(s, "{key:<14}{value}");
    };
    line("model", format!("{} (version {})", meta.name, meta.version));
    line("schema", meta.schema.clone());
    line(
        "source",
        format!(
            "{} checkpoint {} (sha256 {}), by {}",
            meta.source.format,
            meta.source.file,
            short(&meta.source.sha256),
            meta.source.exporter
        ),
    );
    line(
        "classes",
        format!("{}: {}", meta.classes.len(), meta.classes.join(", ")),
    );
    line(
        "input",
        format!(
            "{} {}×{}×{}, values in [{}, {}], mean {:?}, std {:?}",
            input.layout,
            input.channels,
            input.height,
            input.width,
            input.value_range[0],
            input.value_range[1],
            input.mean,
            input.std
        ),
    );
    line("architecture", describe_arch(meta));
    line(
        "filters",
        format!("K = {} (the gated stage's channels)", arch.filters()),
    );
    let mut outputs = vec![
        format!("{} [N, {}]", meta.outputs.logits, arch.classes),
        format!("{} [N, {}]", meta.outputs.activations, arch.filters()),
    ];
    outputs.extend(
        meta.outputs
            .stages
            .iter()
            .map(|st| format!("{} [N, {}]", st.name, st.channels)),
    );
    if let Some(fm) = &meta.outputs.feature_map {
        outputs.push(format!("{fm} [N, {}, h, w]", arch.filters()));
    }
    line("outputs", outputs.join(", "));
    match &meta.gate {
        Some(gate) => {
            let owned = gate.owned_filters_per_class();
            let per_class: Vec<String> = meta
                .classes
                .iter()
                .zip(&owned)
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            line(
                "gate",
                format!(
                    "{}×{}, density {:.3}",
                    gate.filters,
                    gate.classes,
                    gate.density()
                ),
            );
            line("filters/class", format!("(G = 1) {}", per_class.join(", ")));
        }
        None => line(
            "gate",
            "none (standard-trained baseline; the detector uses an empirical gate)".into(),
        ),
    }
    match &meta.training {
        Some(report) => line("training", highlights(report)),
        None => line("training", "no report".into()),
    }
    match &meta.calibration {
        None => line("calibration", "uncalibrated (run `csgd calibrate`)".into()),
        Some(cal) => {
            let thresholds: Vec<String> = cal
                .thresholds
                .iter()
                .map(|(score, t)| format!("{score} {t:.3}"))
                .collect();
            line(
                "calibration",
                format!(
                    "calibrated for FPR {} on {} + {} clean images ({}); thresholds: {}",
                    cal.fpr,
                    cal.fit_images,
                    cal.table_images,
                    cal.data,
                    thresholds.join(", ")
                ),
            )
        }
    }
    s
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn describe_arch(meta: &BundleMeta) -> String {
    let arch = &meta.architecture;
    let detail = match &arch.backbone {
        Backbone::Cnn { stages } => {
            let pools = stages.iter().filter(|s| s.pool).count();
            format!("{} conv stages, {pools} max-pools", stages.len())
        }
        Backbone::ResNet {
            block,
            widths,
            stem,
            ..
        } => {
            let block = match block {
                BlockKind::Basic => "BasicBlock",
                BlockKind::Bottleneck => "Bottleneck",
            };
            let widths: Vec<String> = widths.iter().map(|w| w.to_string()).collect();
            let stem = match stem {
                Stem::ImageNet { width } => format!("ImageNet stem {width}"),
                Stem::Small { width } => format!("small stem {width}"),
            };
            format!("{block}, widths {}, {stem}", widths.join("/"))
        }
    };
    format!(
        "{} ({detail}), {} input channels, BN eps {}",
        arch.summary(),
        arch.in_channels,
        arch.bn_eps
    )
}

/// The top-level scalar fields of a JSON object (accuracy, density, threshold …).
fn highlights(value: &serde_json::Value) -> String {
    let Some(object) = value.as_object() else {
        return value.to_string();
    };
    let fields: Vec<String> = object
        .iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Number(n) => Some(match n.as_f64() {
                Some(f) if n.is_f64() => format!("{k} {f:.4}"),
                _ => format!("{k} {n}"),
            }),
            serde_json::Value::String(t) if t.len() <= 40 => Some(format!("{k} {t}")),
            serde_json::Value::Bool(b) => Some(format!("{k} {b}")),
            _ => None,
        })
        .take(HIGHLIGHTS)
        .collect();
    if fields.is_empty() {
        format!("{} fields", object.len())
    } else {
        fields.join(", ")
    }
}
