//! Thread budgets of `csgd serve`: how the cores are shared between the async I/O workers
//! (HTTP, the batching queues), the threads that decode and preprocess images, and ONNX
//! Runtime (`runtime.intra_op_threads` per session × `runtime.sessions_per_model`).
//!
//! Every budget defaults (0) to a value derived from the core count rather than a constant,
//! so the same configuration suits a 2-core container and a 64-core host; each can be set
//! explicitly where a deployment wants to pin the split (for example fewer I/O workers on a
//! compute-bound model). The benchmarks (`benches/load.sh`) measure with the defaults.

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// Largest explicit thread count accepted for any budget.
const MAX_THREADS: usize = 1024;

/// The `[threads]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThreadsConfig {
    /// tokio worker threads (HTTP parsing, JSON, scoring, batching). 0: the number of cores.
    pub io_workers: usize,
    /// Most images decoded and preprocessed at once (and explanations drawn): the size of
    /// the blocking thread pool. 0: the number of cores. CPU-bound work gains nothing from
    /// more threads than cores; tokio's own default (512) would let a burst of large images
    /// crowd out inference.
    pub preprocess_threads: usize,
    /// A request whose images, together, decode from and to at most this many pixels is
    /// preprocessed on the I/O thread that read it instead of the blocking pool. Decoding a
    /// 28×28 PNG takes about 12 µs, less than the two thread switches of a hand-off; capping
    /// the pixels bounds how long an I/O thread is held (a 64×64 decode stays well under
    /// 100 µs). 0: always the pool.
    pub inline_decode_max_pixels: u64,
}

impl Default for ThreadsConfig {
    /// The values of `config/default.toml`.
    fn default() -> Self {
        Self {
            io_workers: 0,
            preprocess_threads: 0,
            inline_decode_max_pixels: DEFAULT_INLINE_DECODE_MAX_PIXELS,
        }
    }
}

/// 64×64: a 28×28 model's image, or a few of them, decode inline; a 128×128 model's never.
const DEFAULT_INLINE_DECODE_MAX_PIXELS: u64 = 4096;

/// Cores this process may use (its CPU affinity and cgroup quota, as the standard library
/// sees them); 1 when unknown.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl ThreadsConfig {
    /// tokio worker threads, resolving 0 from the core count.
    pub fn io_workers(&self) -> usize {
        resolve(self.io_workers)
    }

    /// Blocking-pool threads for decoding, resolving 0 from the core count.
    pub fn preprocess_threads(&self) -> usize {
        resolve(self.preprocess_threads)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("threads.io_workers", self.io_workers),
            ("threads.preprocess_threads", self.preprocess_threads),
        ] {
            if value > MAX_THREADS {
                return Err(invalid(
                    key,
                    format!("must be ≤ {MAX_THREADS} (0: the number of cores)"),
                ));
            }
        }
        Ok(())
    }
}

fn resolve(configured: usize) -> usize {
    if configured > 0 { configured } else { cores() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_the_core_count() {
        let t = ThreadsConfig::default();
        assert_eq!(t.io_workers(), cores());
        assert_eq!(t.preprocess_threads(), cores());
        let t = ThreadsConfig {
            io_workers: 3,
            preprocess_threads: 5,
            ..ThreadsConfig::default()
        };
        assert_eq!((t.io_workers(), t.preprocess_threads()), (3, 5));
    }

    #[test]
    fn too_many_is_rejected_naming_the_key() {
        let t = ThreadsConfig {
            io_workers: 0,
            preprocess_threads: 5000,
            ..ThreadsConfig::default()
        };
        let e = t.validate().unwrap_err().to_string();
        assert!(e.starts_with("threads.preprocess_threads"), "{e}");
    }
}
