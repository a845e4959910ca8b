//! `csg-train attack`: the command-line side of [`csg_train::attacks`] (a module of the binary).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use csg_train::attacks::adaptive::{AdaptiveParams, ClassLoss};
use csg_train::attacks::detector::DetectorSurrogate;
use csg_train::attacks::run::{self, RunSpec, TargetMode};
use csg_train::attacks::{AttackConfig, CwParams, DeepFoolParams, FgsmParams, PgdParams, Victim};
use csg_train::checkpoint;
use csg_train::data::{self, Dataset};

#[derive(Clone, Copy, ValueEnum)]
pub enum AttackKind {
    Fgsm,
    Pgd,
    Cw,
    Deepfool,
    /// PGD that also drives the bundle's detector score under its threshold.
    Adaptive,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RandomTarget {
    /// A uniformly drawn class other than the true one, per image (from --seed).
    Random,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ClassLossArg {
    Margin,
    Ce,
}

#[derive(clap::Args)]
pub struct AttackArgs {
    /// Checkpoint to attack (safetensors from `csg-train train`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Calibrated bundle (ONNX) whose detector the adaptive attack evades.
    #[arg(long)]
    bundle: Option<PathBuf>,
    #[arg(long, value_enum)]
    attack: AttackKind,
    /// Output directory: one PNG per image and manifest.json.
    #[arg(long)]
    out: PathBuf,

    /// Attack the first N test images.
    #[arg(long, default_value_t = 100)]
    images: usize,
    /// Attack these test indices instead of the first --images.
    #[arg(long, value_delimiter = ',', conflicts_with = "images")]
    indices: Option<Vec<usize>>,
    /// Targeted attack (needs --target-class or --target random).
    #[arg(long)]
    targeted: bool,
    /// Target class for every image (images of that class are skipped).
    #[arg(long, conflicts_with = "target")]
    target_class: Option<usize>,
    /// Per-image random targets.
    #[arg(long, value_enum)]
    target: Option<RandomTarget>,
    /// Seed of random starts and random targets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// Directory with the IDX files.
    #[arg(long)]
    data_dir: Option<PathBuf>,

    /// L∞ budget (FGSM, PGD, adaptive), [0, 1] scale.
    #[arg(long, default_value_t = PgdParams::default().epsilon)]
    eps: f32,
    /// PGD / adaptive step size [default: 0.01 for PGD, 0.005 for adaptive].
    #[arg(long)]
    step_size: Option<f32>,
    /// PGD / adaptive steps [default: 40 for PGD, 200 for adaptive].
    #[arg(long)]
    steps: Option<usize>,
    /// PGD: start at the image instead of a random point of the ball.
    #[arg(long, conflicts_with = "random_start")]
    no_random_start: bool,
    /// Adaptive: start at a random point of the ball instead of the image.
    #[arg(long)]
    random_start: bool,

    /// CW: initial constant c.
    #[arg(long, default_value_t = CwParams::default().initial_c)]
    initial_c: f32,
    /// CW: binary-search steps over c.
    #[arg(long, default_value_t = CwParams::default().search_steps)]
    search_steps: usize,
    /// CW: Adam iterations per search step.
    #[arg(long, default_value_t = CwParams::default().max_iterations)]
    cw_iterations: usize,
    /// CW: Adam learning rate.
    #[arg(long, default_value_t = CwParams::default().learning_rate)]
    cw_lr: f32,
    /// CW: confidence κ (logit margin), e.g. 0 or 20.
    #[arg(long, default_value_t = CwParams::default().confidence)]
    kappa: f32,
    /// CW: run every iteration of every search step.
    #[arg(long)]
    no_abort_early: bool,

    /// DeepFool: maximum iterations.
    #[arg(long, default_value_t = DeepFoolParams::default().max_iterations)]
    df_iterations: usize,
    /// DeepFool: overshoot.
    #[arg(long, default_value_t = DeepFoolParams::default().overshoot)]
    overshoot: f32,
    /// DeepFool: candidate classes per step (untargeted).
    #[arg(long, default_value_t = DeepFoolParams::default().candidates)]
    candidates: usize,
    /// CW / DeepFool: judge success on the float image instead of its 8-bit rounding.
    #[arg(long)]
    no_quantise_aware: bool,

    /// Adaptive: weight λ of the detector term.
    #[arg(long, default_value_t = AdaptiveParams::default().lambda)]
    lambda: f32,
    /// Adaptive: softplus temperature τ.
    #[arg(long, default_value_t = AdaptiveParams::default().temperature)]
    temperature: f32,
    /// Adaptive: slack δ below each component's cutoff.
    #[arg(long, default_value_t = AdaptiveParams::default().slack)]
    slack: f32,
    /// Adaptive: classification term.
    #[arg(long, value_enum, default_value = "margin")]
    class_loss: ClassLossArg,
    /// Adaptive: κ of the margin classification term.
    #[arg(long, default_value_t = AdaptiveParams::default().confidence)]
    adaptive_kappa: f32,
}

impl AttackArgs {
    fn config(&self) -> AttackConfig {
        let base = match self.attack {
            AttackKind::Adaptive => AdaptiveParams::default().pgd,
            _ => PgdParams::default(),
        };
        let pgd = PgdParams {
            epsilon: self.eps,
            step_size: self.step_size.unwrap_or(base.step_size),
            steps: self.steps.unwrap_or(base.steps),
            random_start: (base.random_start || self.random_start) && !self.no_random_start,
        };
        match self.attack {
            AttackKind::Fgsm => AttackConfig::Fgsm(FgsmParams { epsilon: self.eps }),
            AttackKind::Pgd => AttackConfig::Pgd(pgd),
            AttackKind::Cw => AttackConfig::Cw(CwParams {
                initial_c: self.initial_c,
                search_steps: self.search_steps,
                max_iterations: self.cw_iterations,
                learning_rate: self.cw_lr,
                confidence: self.kappa,
                abort_early: !self.no_abort_early,
                quantise_aware: !self.no_quantise_aware,
            }),
            AttackKind::Deepfool => AttackConfig::Deepfool(DeepFoolParams {
                max_iterations: self.df_iterations,
                overshoot: self.overshoot,
                candidates: self.candidates,
                quantise_aware: !self.no_quantise_aware,
            }),
            AttackKind::Adaptive => AttackConfig::Adaptive(AdaptiveParams {
                pgd,
                lambda: self.lambda,
                temperature: self.temperature,
                slack: self.slack,
                class_loss: match self.class_loss {
                    ClassLossArg::Margin => ClassLoss::Margin,
                    ClassLossArg::Ce => ClassLoss::CrossEntropy,
                },
                confidence: self.adaptive_kappa,
            }),
        }
    }

    fn target(&self) -> Result<TargetMode> {
        Ok(match (self.target_class, self.target) {
            (Some(c), _) => TargetMode::Class(c),
            (None, Some(RandomTarget::Random)) => TargetMode::Random,
            (None, None) if self.targeted => {
                bail!("--targeted needs --target-class N or --target random")
            }
            (None, None) => TargetMode::Untargeted,
        })
    }
}

pub fn run(args: AttackArgs) -> Result<()> {
    let config = args.config();
    config.validate()?;
    let target = args.target()?;
    let device = csg_train::device();
    let info = checkpoint::read_info(&args.checkpoint)?;
    let victim = Victim::load(&args.checkpoint, &device)
        .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let detector = match (&config, &args.bundle) {
        (AttackConfig::Adaptive(_), None) => bail!("--attack adaptive needs --bundle"),
        (AttackConfig::Adaptive(_), Some(path)) => {
            let meta = csg_bundle::onnx::read_meta(path)?;
            if meta.architecture != info.architecture {
                bail!(
                    "{} describes {}, the checkpoint {}",
                    path.display(),
                    meta.architecture.summary(),
                    info.architecture.summary()
                );
            }
            let calibration = meta.calibration.with_context(|| {
                format!("{} is not calibrated (csgd calibrate)", path.display())
            })?;
            Some(DetectorSurrogate::new(
                &calibration,
                info.classes.len(),
                &info.architecture.stage_channels(),
                &meta.input,
            )?)
        }
        _ => None,
    };

    let dir = args.data_dir.clone().unwrap_or_else(data::default_data_dir);
    let test = Dataset::load(&dir, "t10k")?;
    let indices: Vec<usize> = match &args.indices {
        Some(list) => list.clone(),
        None => (0..args.images.min(test.len())).collect(),
    };
    let spec = RunSpec {
        attack: config,
        target,
        seed: args.seed,
        batch_size: args.batch_size,
        checkpoint: args.checkpoint.display().to_string(),
        bundle: args.bundle.as_ref().map(|p| p.display().to_string()),
        dataset: "fashion-mnist t10k".into(),
    };
    let outcome = run::run(&victim, &test, &indices, &spec, detector.as_ref(), true)?;
    let shape = [info.input.channels, info.input.height, info.input.width];
    outcome.write(&args.out, shape)?;
    let s = &outcome.manifest.summary;
    eprintln!(
        "{}: {} images, success {:.3} (before 8-bit rounding {:.3}, on correctly classified {:.3}), mean L2 {:.4}, mean L∞ {:.4} over successes on correctly classified{} -> {}",
        outcome.manifest.attack,
        s.images,
        s.success_rate,
        s.success_rate_before_quantisation,
        s.success_rate_on_correct,
        s.mean_l2,
        s.mean_linf,
        s.evasion_rate
            .map(|r| format!(", successful and unflagged {r:.3}"))
            .unwrap_or_default(),
        args.out.join("manifest.json").display()
    );
    Ok(())
}
