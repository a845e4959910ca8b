//! What the trainer's integration tests share: the real Fashion-MNIST training images and one
//! small network trained briefly on a subset of them.

use csg_bundle::{Architecture, CnnStage};
use csg_train::csg::{GateConfig, Schedule};
use csg_train::data::{self, Augment, Dataset};
use csg_train::trainer::TrainConfig;

/// Fashion-MNIST's pixel mean and std (the trainer's defaults).
pub const MEAN: f32 = 0.286;
pub const STD: f32 = 0.353;

/// The first `n` of the 60,000 training images.
pub fn train_images(n: usize) -> Dataset {
    let full = Dataset::load(&data::default_data_dir(), "train").unwrap_or_else(|e| {
        panic!("{e}\n(.ci/setup installs the dataset; CSGD_DATA_DIR overrides its path)")
    });
    full.select(&(0..n).collect::<Vec<_>>())
}

/// A three-stage CNN (8-16-32 filters) with settings that train it in seconds.
pub fn tiny_config(gated: bool, epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        architecture: Architecture::cnn(
            1,
            10,
            CnnStage::parse_list("8p,16p,32").expect("valid widths"),
        ),
        gated,
        epochs,
        batch_size: 50,
        lr: 3e-3,
        gate_lr: 3e-3,
        mask_lr: 1e-2,
        cosine: true,
        label_smoothing: None,
        weight_decay: None,
        gate: GateConfig::default(),
        schedule: Schedule::Interleave { every: 2 },
        augment: Augment {
            crop_padding: 1,
            flip: true,
        },
        mean: MEAN,
        std: STD,
        seed,
        max_steps: None,
    }
}
