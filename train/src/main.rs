//! `csg-train`: trains CSG and standard networks on Fashion-MNIST, and attacks them.

mod attack_cli;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use csg_bundle::{Architecture, Backbone, BlockKind, CnnStage, Stem};
use csg_train::csg::{GateConfig, Schedule};
use csg_train::data::{self, Augment, Dataset, FASHION_CLASSES};
use csg_train::trainer::{self, TrainConfig};
use csg_train::{checkpoint, device, fashion_input};

/// Fashion-MNIST mean and std of pixels scaled to [0, 1] (training split).
const FASHION_MEAN: f32 = 0.2860;
const FASHION_STD: f32 = 0.3530;

#[derive(Parser)]
#[command(
    version,
    about = "Class-Specific Gate training on Fashion-MNIST, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a CSG network (or, with --std, the standard baseline) and write checkpoint + report.
    Train(TrainArgs),
    /// Attack Fashion-MNIST test images; write 8-bit PNGs and manifest.json into --out.
    Attack(attack_cli::AttackArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum ArchKind {
    Cnn,
    Resnet,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleKind {
    /// A gated step after every N-th standard step (--interleave-every).
    Interleave,
    /// The official code's: warm-up epochs, then gated epochs when epoch % 3 == 2.
    Official,
    /// The paper's joint loss CE + λ1·CE_gated + hinge in every step, one backbone pass
    /// (--gated-weight is λ1).
    Joint,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Output path without extension: writes OUT.safetensors and OUT.report.json.
    #[arg(long)]
    out: PathBuf,
    /// Train the same architecture without a gate (the baseline).
    #[arg(long)]
    std: bool,
    #[arg(long, value_enum, default_value = "cnn")]
    arch: ArchKind,
    /// CNN stage widths; a trailing `p` pools 2×2 after the stage.
    #[arg(long, default_value = "32p,64p,128,128", value_delimiter = ',')]
    cnn: Vec<String>,
    /// ResNet (BasicBlock, small stem) blocks per layer.
    #[arg(long, default_value = "2,2,2", value_delimiter = ',')]
    resnet_layers: Vec<usize>,
    /// ResNet widths per layer.
    #[arg(long, default_value = "32,64,128", value_delimiter = ',')]
    resnet_widths: Vec<usize>,
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Adam learning rate of the standard path.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Adam learning rate of the gated path (official: 1e-3).
    #[arg(long, default_value_t = 1e-3)]
    gate_lr: f64,
    /// Adam learning rate of the gate matrix within the gated path [default: --gate-lr].
    #[arg(long)]
    mask_lr: Option<f64>,
    /// Keep learning rates constant instead of cosine decay.
    #[arg(long)]
    no_cosine: bool,
    /// Label smoothing α of the standard path's cross-entropy, in [0, 1); the gated path keeps
    /// hard labels.
    #[arg(long)]
    label_smoothing: Option<f32>,
    /// L2 weight decay of the network's weights (not the gate) in both paths' Adam.
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Target gate density μ (official 0.2).
    #[arg(long, default_value_t = 0.2)]
    mu: f64,
    /// Weight λ2 of the gate's L1 hinge (official 1e-3).
    #[arg(long, default_value_t = 1e-3)]
    lambda: f64,
    #[arg(long, value_enum, default_value = "interleave")]
    schedule: ScheduleKind,
    /// Weight λ1 of the gated path's loss in the joint schedule.
    #[arg(long, default_value_t = 1.0)]
    gated_weight: f64,
    #[arg(long, default_value_t = 2)]
    interleave_every: usize,
    /// Warm-up epochs of the official schedule.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Random shift augmentation, in pixels (0 disables).
    #[arg(long, default_value_t = 2)]
    crop_padding: usize,
    /// Disable random horizontal flips.
    #[arg(long)]
    no_flip: bool,
    /// Images of the 60,000 training images held out for validation and calibration.
    #[arg(long, default_value_t = data::DEFAULT_VALIDATION)]
    validation: usize,
    /// Seed of the split (fixed: calibration relies on it; change only deliberately).
    #[arg(long, default_value_t = data::DEFAULT_SPLIT_SEED)]
    split_seed: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory with the IDX files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Stop after this many steps (smoke runs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Train on only the first N training images (smoke runs).
    #[arg(long)]
    train_subset: Option<usize>,
}

fn run_train(args: TrainArgs) -> Result<()> {
    let started = Instant::now();
    let backbone = match args.arch {
        ArchKind::Cnn => Backbone::Cnn {
            stages: CnnStage::parse_list(&args.cnn.join(",")).context("--cnn")?,
        },
        ArchKind::Resnet => Backbone::ResNet {
            block: BlockKind::Basic,
            layers: args.resnet_layers.clone(),
            stem: Stem::Small {
                width: args.resnet_widths.first().copied().unwrap_or(16),
            },
            widths: args.resnet_widths.clone(),
        },
    };
    let architecture = Architecture {
        in_channels: 1,
        classes: FASHION_CLASSES.len(),
        bn_eps: 1e-5,
        backbone,
    };
    architecture.validate()?;
    if args.batch_size == 0 || args.epochs == 0 {
        bail!("--batch-size and --epochs must be positive");
    }
    if let Some(alpha) = args.label_smoothing
        && !(0.0..1.0).contains(&alpha)
    {
        bail!("--label-smoothing must be in [0, 1), got {alpha}");
    }
    if let Some(decay) = args.weight_decay
        && !(decay.is_finite() && decay >= 0.0)
    {
        bail!("--weight-decay must be a finite non-negative number, got {decay}");
    }
    let schedule = match args.schedule {
        ScheduleKind::Interleave => Schedule::Interleave {
            every: args.interleave_every.max(1),
        },
        ScheduleKind::Joint => Schedule::Joint {
            weight: args.gated_weight,
        },
        ScheduleKind::Official => Schedule::Epoch {
            warmup: args.warmup,
            period: 3,
            phase: 2,
        },
    };
    let config = TrainConfig {
        architecture,
        gated: !args.std,
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        gate_lr: args.gate_lr,
        mask_lr: args.mask_lr.unwrap_or(args.gate_lr),
        cosine: !args.no_cosine,
        label_smoothing: args.label_smoothing,
        weight_decay: args.weight_decay,
        gate: GateConfig {
            mu: args.mu,
            lambda: args.lambda,
        },
        schedule,
        augment: Augment {
            crop_padding: args.crop_padding,
            flip: !args.no_flip,
        },
        mean: FASHION_MEAN,
        std: FASHION_STD,
        seed: args.seed,
        max_steps: args.max_steps,
    };

    let dir = args.data_dir.unwrap_or_else(data::default_data_dir);
    let full = Dataset::load(&dir, "train")?;
    let test = Dataset::load(&dir, "t10k")?;
    let (mut train, validation) = full.split(args.validation, args.split_seed);
    if let Some(n) = args.train_subset {
        train = train.select(&(0..n.min(train.len())).collect::<Vec<_>>());
    }
    eprintln!(
        "training {} ({}) on {} images, validating on {}, testing on {}",
        config.architecture.summary(),
        if config.gated { "CSG" } else { "standard" },
        train.len(),
        validation.len(),
        test.len()
    );
    let trained = trainer::train(&config, &train, &device(), true)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let wall = started.elapsed().as_secs_f64();
    let split = trainer::Split {
        seed: args.split_seed,
        validation: args.validation,
    };
    let report = trainer::report(
        &config,
        &trained,
        (&train, &validation, &test),
        split,
        wall,
        command,
    );

    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let ckpt = args.out.with_extension("safetensors");
    let classes: Vec<String> = FASHION_CLASSES.iter().map(|s| s.to_string()).collect();
    checkpoint::save(
        &trained.model,
        &classes,
        &fashion_input(FASHION_MEAN, FASHION_STD),
        &ckpt,
    )?;
    let report_path = checkpoint::report_path(&ckpt);
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    eprintln!(
        "test accuracy {:.4}, MIS {:.4}, density {}, wall {:.0}s -> {}",
        report.test_accuracy,
        report.mis,
        report
            .gate_density
            .map_or("n/a".into(), |d| format!("{d:.3}")),
        report.wall_seconds,
        ckpt.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Train(args) => run_train(args),
        Command::Attack(args) => attack_cli::run(args),
    }
}
