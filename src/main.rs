//! `csgd`: the adversarial-input detection daemon's command line.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use csgd::config::{self, LogFormat, Overrides, Provider, Settings};
use csgd::detect::ScoreKind;

#[derive(Parser)]
#[command(
    name = "csgd",
    version,
    about = "Flags adversarial images for class-specific-gate CNNs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP: detection, model information, health and metrics.
    Serve(ServeArgs),
    /// Fit the detector on clean held-out images and store it in the bundle (in place).
    Calibrate(CalibrateArgs),
    /// Detection figures (AUROC, TPR at fixed FPR) on clean test and adversarial images.
    Eval(EvalArgs),
    /// Explain images: the verdict, the filters that fired, and where (JSON and PNGs).
    Explain(ExplainArgs),
}

#[derive(Args)]
struct ExplainArgs {
    /// PNG or JPEG files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Folder for STEM.json, STEM.gated.png and STEM.cam.png per image (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The model bundle (exported with --feature-map).
    #[arg(long, default_value = "models/fashion-csg.onnx")]
    model: PathBuf,
    /// Verdict score.
    #[arg(long, value_enum, default_value = "combined")]
    score: ScoreKind,
    /// PNG upscaling factor [default: the shorter side reaches 224 pixels].
    #[arg(long)]
    scale: Option<u32>,
    /// How many other-class filters to list.
    #[arg(long, default_value_t = csgd::explain::DEFAULT_OTHER_FILTERS)]
    top: usize,
}

#[derive(Args)]
struct CalibrateArgs {
    /// The model bundle (ONNX file); its calibration section is rewritten atomically.
    model: PathBuf,
    /// Clean data: `fashion-mnist` (the validation split the trainer held out; optionally
    /// `fashion-mnist:DIR`) or an image folder DIR/<class name>/*.png.
    #[arg(long, default_value = "fashion-mnist")]
    data: String,
    /// Target false-positive rate of the thresholds.
    #[arg(long, default_value_t = 0.05)]
    fpr: f64,
    /// Also set thresholds per predicted class where a class has ≥ 10/FPR table images.
    #[arg(long)]
    per_class: bool,
    /// 1-based stages read besides the gated (last) one [default: none]. `--stages 2` adds
    /// stage 2 (through its spatial statistics), the detector's earlier default: it helps
    /// against FGSM without the input histogram (`--input-bins 0`), not with it.
    #[arg(long, value_delimiter = ',')]
    stages: Option<Vec<usize>>,
    /// Describe those stages by their GAP only, not also by their spatial statistics (each
    /// channel's std and share of positions above zero, when the model exports them).
    #[arg(long)]
    no_spatial: bool,
    /// Bins of the input's pixel histogram (share of pixel values per equal bin of the value
    /// range, before normalisation), scored as a Mahalanobis distance to the predicted
    /// class's clean histogram; 0 leaves the input out. Catches L∞ noise that fills a flat
    /// background (FGSM); not CSG evidence (README, Detection).
    #[arg(long, default_value_t = 32)]
    input_bins: usize,
    /// How the combined score merges its components' p-values.
    #[arg(long, value_enum, default_value_t = CombinerArg::HarmonicMean)]
    combiner: CombinerArg,
    /// Covariance shrinkage toward (trace/d)·I.
    #[arg(long, default_value_t = 0.01)]
    shrinkage: f64,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
}

/// `csgd calibrate --combiner`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CombinerArg {
    /// −ln of the harmonic mean p-value.
    HarmonicMean,
    /// −ln of the smallest p-value.
    MinP,
}

#[derive(Args)]
struct EvalArgs {
    /// A model and its attack runs: LABEL=MODEL.onnx:ATTACK_DIR[,ATTACK_DIR…] (repeatable).
    #[arg(long = "run", required = true, value_parser = parse_eval_run)]
    runs: Vec<csgd::eval::EvalModel>,
    /// Clean Fashion-MNIST test images (from the start of the 10,000).
    #[arg(long, default_value_t = 10000)]
    clean_images: usize,
    /// Where eval.json, eval.md and the ROC PNGs go.
    #[arg(long, default_value = "eval")]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Also write every image's components (raw scores, p-values) as LABEL-components.json.
    #[arg(long)]
    dump_components: bool,
}

fn parse_eval_run(text: &str) -> Result<csgd::eval::EvalModel, String> {
    let (label, rest) = text
        .split_once('=')
        .ok_or("expected LABEL=MODEL.onnx:ATTACK_DIR[,ATTACK_DIR…]")?;
    let (bundle, attacks) = rest.split_once(':').unwrap_or((rest, ""));
    Ok(csgd::eval::EvalModel {
        label: label.to_string(),
        bundle: PathBuf::from(bundle),
        attacks: attacks
            .split(',')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
    })
}

/// Flags override the config file and the `CSGD_*` environment variables.
#[derive(Args)]
struct ServeArgs {
    /// TOML file with settings to merge over the built-in defaults (config/default.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address of the HTTP API (server.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Separate address for /metrics (server.metrics_listen; "" for none).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Serve this model (repeatable); replaces the configured model list.
    #[arg(long = "model", value_name = "NAME=PATH", value_parser = config::parse_model_flag)]
    models: Vec<(String, PathBuf)>,
    /// Model behind POST /v1/detect (models.default).
    #[arg(long, value_name = "NAME")]
    default_model: Option<String>,
    /// Verdict score of every served model.
    #[arg(long, value_enum)]
    score: Option<ScoreKind>,
    /// ONNX Runtime library (runtime.ort_library).
    #[arg(long, value_name = "PATH")]
    ort_library: Option<PathBuf>,
    /// Execution provider, in order of preference (repeatable; runtime.execution_providers).
    #[arg(long = "provider", value_enum)]
    providers: Vec<Provider>,
    /// Log format (logging.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. info or info,csgd=debug (logging.level).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Set any key, e.g. --set batching.max_batch_size=64 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = config::parse_set_flag)]
    set: Vec<(String, String)>,
    /// Print the effective configuration as JSON and exit.
    #[arg(long)]
    print_config: bool,
}

impl ServeArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            config_file: self.config.clone(),
            set: self.set.clone(),
            listen: self.listen.clone(),
            metrics_listen: self.metrics_listen.clone(),
            models: self.models.clone(),
            default_model: self.default_model.clone(),
            score: self.score,
            ort_library: self.ort_library.clone(),
            providers: self.providers.clone(),
            log_format: self.log_format,
            log_level: self.log_level.clone(),
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Calibrate(args) => calibrate(&args),
        Command::Eval(args) => eval(&args),
        Command::Explain(args) => explain(&args),
    }
}

/// The runtime settings of the default configuration (library path, providers, threads).
fn runtime_config() -> Result<config::RuntimeConfig> {
    Ok(Settings::load(&Overrides::default(), std::env::vars())
        .context("invalid configuration")?
        .runtime)
}

fn calibrate(args: &CalibrateArgs) -> Result<()> {
    let options = csgd::calibrate::CalibrateOptions {
        data: csgd::calibrate::CleanData::parse(&args.data),
        stages: args.stages.clone(),
        spatial: !args.no_spatial,
        input_bins: args.input_bins,
        fit: csgd::detect::fit::FitOptions {
            combiner: match args.combiner {
                CombinerArg::HarmonicMean => csg_bundle::calibration::Combiner::HarmonicMean,
                CombinerArg::MinP => csg_bundle::calibration::Combiner::MinP,
            },
            fpr: args.fpr,
            shrinkage: args.shrinkage,
            per_class: args.per_class,
            data: args.data.clone(),
            ..Default::default()
        },
        batch_size: args.batch_size,
    };
    // A session cut down to what calibration reads, as the daemon's are.
    let meta = csgd::runtime::read_bundle_meta(&args.model)?;
    let stages = csgd::calibrate::stage_outputs(&meta, options.stages.as_deref(), options.spatial)?;
    let names = csgd::calibrate::fetched_outputs(&meta, &stages);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut model = csgd::runtime::Model::load_for(&args.model, &runtime_config()?, &names)?;
    let cal = csgd::calibrate::calibrate(&args.model, &mut model, &options)
        .with_context(|| format!("calibrating {}", args.model.display()))?;
    println!(
        "calibrated {} on {} + {} clean images ({}), target FPR {}",
        args.model.display(),
        cal.fit_images,
        cal.table_images,
        cal.data,
        cal.fpr
    );
    for (score, threshold) in &cal.thresholds {
        println!("  threshold {score:<18} {threshold:.4}");
    }
    Ok(())
}

fn eval(args: &EvalArgs) -> Result<()> {
    let runtime = runtime_config()?;
    let options = csgd::eval::EvalOptions {
        models: args.runs.clone(),
        clean_images: args.clean_images,
        batch_size: args.batch_size,
        fprs: vec![0.01, 0.05],
        dump_dir: args.dump_components.then(|| args.out.clone()),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut results = Vec::new();
    for run in &options.models {
        // The daemon's session: cut down to what the detector reads.
        let meta = csgd::runtime::read_bundle_meta(&run.bundle)?;
        let names = csgd::detect::Detector::new(&meta, csgd::detect::ScoreKind::Combined)?
            .fetched_outputs(&meta.outputs.logits);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut model = csgd::runtime::Model::load_for(&run.bundle, &runtime, &names)?;
        let (result, curves) = csgd::eval::evaluate_model(run, &mut model, &options)
            .with_context(|| format!("evaluating {}", run.bundle.display()))?;
        let png = args.out.join(format!("roc-{}.png", run.label));
        csgd::eval::plot::roc_png(&png, &format!("{}: combined score", run.label), &curves)?;
        results.push(result);
    }
    let json = args.out.join("eval.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let table = csgd::eval::report::markdown(&results, "5%");
    std::fs::write(args.out.join("eval.md"), &table)?;
    println!("{table}");
    Ok(())
}

fn explain(args: &ExplainArgs) -> Result<()> {
    use csgd::explain::{ExplainSession, Explainer, MapKind, render};
    let model = csgd::runtime::Model::load(&args.model, &runtime_config()?)?;
    let meta = model.meta().clone();
    let detector = csgd::detect::Detector::new(&meta, args.score)?;
    let session = ExplainSession::new(Explainer::new(&meta, detector, &args.model)?, model)?;
    let spec = &meta.input;
    let scale = args.scale.unwrap_or_else(|| render::default_scale(spec));
    anyhow::ensure!(
        (1..=render::max_scale(spec)).contains(&scale),
        "--scale must be 1 to {} for this model",
        render::max_scale(spec)
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for path in &args.images {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let input = csgd::preprocess::preprocess_image(&bytes, None, spec, u64::MAX)
            .with_context(|| format!("{}", path.display()))?;
        let (explanation, _) = session.explain(&input, args.top)?;
        let stem = path
            .file_stem()
            .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
        let write = |name: String, bytes: &[u8]| {
            let dest = args.out.join(name);
            std::fs::write(&dest, bytes).with_context(|| format!("writing {}", dest.display()))
        };
        write(
            format!("{stem}.json"),
            serde_json::to_string_pretty(&explanation)?.as_bytes(),
        )?;
        for kind in [MapKind::Gated, MapKind::Cam] {
            let png = render::overlay_png(&input, spec, explanation.maps.get(kind), scale)?;
            write(format!("{stem}.{}.png", kind.name()), &png)?;
        }
        let v = &explanation.verdict;
        let verdict = match v.is_adversarial {
            Some(true) => "ADVERSARIAL",
            Some(false) => "clean",
            None => "unjudged (uncalibrated)",
        };
        let fired: Vec<String> = explanation
            .class_filters
            .iter()
            .take(3)
            .map(|f| format!("{} (z {:+.1})", f.filter, f.z))
            .collect();
        println!(
            "{}: {} ({:.3}), {verdict}, {} {:.2}; top filters {}",
            path.display(),
            v.label,
            v.probability,
            v.score_name,
            v.score,
            fired.join(", ")
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

fn serve(args: &ServeArgs) -> Result<()> {
    let settings =
        Settings::load(&args.overrides(), std::env::vars()).context("invalid configuration")?;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    init_logging(&settings.logging)?;
    tracing::info!(
        cores = config::cores(),
        io_workers = settings.threads.io_workers(),
        preprocess_threads = settings.threads.preprocess_threads(),
        intra_op_threads = settings.runtime.intra_threads(),
        sessions_per_model = settings.runtime.sessions_per_model,
        "thread budget"
    );
    let threads = &settings.threads;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.io_workers())
        .max_blocking_threads(threads.preprocess_threads())
        .enable_all()
        .thread_name("csgd-io")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(csgd::server::run(settings))?;
    Ok(())
}

fn init_logging(logging: &config::LoggingConfig) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&logging.level)
        .with_context(|| format!("logging.level {:?}", logging.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match logging.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
