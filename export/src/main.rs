//! `csg-export`: checkpoint → ONNX bundle, and bundle inspection.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use csg_export::{ExportOptions, Format, StageSelection, export, render_gate, summary};

#[derive(Parser)]
#[command(
    version,
    about = "Export CSG-trained networks to self-describing ONNX bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a checkpoint (csg-train .safetensors or official PyTorch .pt) to ONNX.
    Export(ExportArgs),
    /// Print a bundle's metadata summary; optionally render its gate as a PNG heat-map.
    Inspect {
        model: PathBuf,
        /// Write the gate matrix as a heat-map PNG here.
        #[arg(long, value_name = "OUT.png")]
        gate_png: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Auto,
    CsgTrain,
    Pytorch,
}

#[derive(clap::Args)]
struct ExportArgs {
    checkpoint: PathBuf,
    /// Output ONNX file.
    #[arg(short, long, value_name = "OUT.onnx")]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    /// Class names, comma-separated, in label order (official default:
    /// bird,cat,dog,cow,horse,sheep).
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Square input side in pixels (official default 128).
    #[arg(long)]
    input_size: Option<usize>,
    /// Per-channel mean, comma-separated (official default: ImageNet's).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    mean: Option<Vec<f32>>,
    /// Per-channel std, comma-separated (official default: ImageNet's).
    #[arg(long, value_delimiter = ',')]
    std: Option<Vec<f32>>,
    /// Model name (default: the checkpoint's file stem).
    #[arg(long)]
    name: Option<String>,
    /// Model version (default 1).
    #[arg(long)]
    version: Option<String>,
    /// Earlier stages whose GAP to export: all, none, or 1-based numbers like 1,2.
    #[arg(long, default_value = "all")]
    stages: String,
    /// Earlier stages whose feature map to export as `stageN_map` (calibration computes
    /// spatial statistics from it): default (the stages the detector reads by default), all,
    /// none, or 1-based numbers like 2,3. Each must also be in --stages.
    #[arg(long, default_value = "default")]
    stage_maps: String,
    /// Also export the gated stage's feature map [N, K, h, w] as `feature_map`.
    #[arg(long)]
    feature_map: bool,
    /// Keep BatchNormalization nodes instead of folding them into the convolutions.
    #[arg(long)]
    no_fold_bn: bool,
}

fn parse_stages(text: &str, flag: &str) -> Result<StageSelection> {
    match text.trim() {
        "all" => Ok(StageSelection::All),
        "none" | "" => Ok(StageSelection::None),
        list => {
            let numbers = list
                .split(',')
                .map(|s| {
                    s.trim().parse::<usize>().with_context(|| {
                        format!("{flag} expects all, none or numbers like 1,2; found {s:?}")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(StageSelection::List(numbers))
        }
    }
}

fn run_export(args: ExportArgs) -> Result<()> {
    let options = ExportOptions {
        format: match args.format {
            FormatArg::Auto => Format::Auto,
            FormatArg::CsgTrain => Format::CsgTrain,
            FormatArg::Pytorch => Format::Pytorch,
        },
        classes: args.classes,
        input_size: args.input_size,
        mean: args.mean,
        std: args.std,
        name: args.name,
        version: args.version,
        stages: parse_stages(&args.stages, "--stages")?,
        stage_maps: match args.stage_maps.trim() {
            "default" => None,
            text => Some(parse_stages(text, "--stage-maps")?),
        },
        feature_map: args.feature_map,
        fold_bn: !args.no_fold_bn,
    };
    let start = Instant::now();
    let done = export(&args.checkpoint, &args.output, &options).with_context(|| {
        format!(
            "exporting {} to {}",
            args.checkpoint.display(),
            args.output.display()
        )
    })?;
    for warning in &done.warnings {
        eprintln!("warning: {warning}");
    }
    let meta = &done.meta;
    println!(
        "wrote {} ({:.1} MB) in {:.2} s: {}, {} classes, K = {}, gate {}",
        done.path.display(),
        done.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        meta.architecture.summary(),
        meta.classes.len(),
        meta.architecture.filters(),
        match &meta.gate {
            Some(g) => format!("density {:.3}", g.density()),
            None => "none (baseline)".into(),
        }
    );
    Ok(())
}

fn run_inspect(model: PathBuf, gate_png: Option<PathBuf>) -> Result<()> {
    let meta = csg_bundle::onnx::read_meta(&model)?;
    print!("{}", summary(&meta));
    if let Some(png) = gate_png {
        let Some(gate) = &meta.gate else {
            bail!(
                "{} has no gate (a baseline model); nothing to render",
                model.display()
            );
        };
        let (w, h) = render_gate(gate, &meta.classes, &png)?;
        println!("gate heat-map {w}×{h} written to {}", png.display());
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Export(args) => run_export(args),
        Command::Inspect { model, gate_png } => run_inspect(model, gate_png),
    }
}
