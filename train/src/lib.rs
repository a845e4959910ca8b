//! csg-train: Class-Specific Gate training (Liang et al., ECCV 2020) on burn, in pure Rust.
//!
//! The backend is chosen in one place, [`device`]: the flex CPU backend with autodiff. A GPU
//! backend is a feature and a match arm away.

pub mod attacks;
pub mod checkpoint;
pub mod csg;
pub mod data;
pub mod metrics;
pub mod model;
pub mod trainer;

/// Re-exported so tests and tools build tensors with the same burn.
pub use burn;

use burn::prelude::Device;

/// The training device (autodiff over the flex CPU backend).
pub fn device() -> Device {
    Device::flex().autodiff()
}

/// The Fashion-MNIST input spec: 1×28×28, pixels / 255, then the dataset's mean and std.
pub fn fashion_input(mean: f32, std: f32) -> csg_bundle::InputSpec {
    csg_bundle::InputSpec::grayscale(28, 28, mean, std)
}
