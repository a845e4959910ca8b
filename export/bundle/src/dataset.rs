//! Fashion-MNIST (or any IDX image/label pair): reading and the seeded train/validation split.
//! Shared because the trainer holds the validation split out and `csgd calibrate` fits its
//! clean statistics on exactly that split.
//!
//! The IDX format is four bytes of magic (0, 0, dtype, rank), `rank` big-endian u32 dimensions,
//! then the data. Hand-written because it is 40 lines and no maintained crate reads it with the
//! error messages we want (which file, what was wrong, which package to install).

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const DEFAULT_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// The Debian package that provides [`DEFAULT_DATA_DIR`].
pub const DATA_PACKAGE: &str = "dataset-fashion-mnist";

/// Images of the 60,000 training images held out for validation and calibration.
pub const DEFAULT_VALIDATION: usize = 5000;
/// Seed of the train/validation split. Calibration relies on it: change only deliberately.
pub const DEFAULT_SPLIT_SEED: u64 = 20201;

/// Fashion-MNIST's class names, index = label.
pub const FASHION_CLASSES: [&str; 10] = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "{path}: not found; install the Debian package `{DATA_PACKAGE}` (apt-get install {DATA_PACKAGE}) or pass --data-dir"
    )]
    Missing { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an IDX file: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("{images} has {n_images} images but {labels} has {n_labels} labels")]
    CountMismatch {
        images: PathBuf,
        labels: PathBuf,
        n_images: usize,
        n_labels: usize,
    },
}

/// A decoded IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file of u8 values, gzipped (by magic bytes, not by name) or not.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let raw = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_owned(),
            }
        } else {
            DataError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Malformed {
                path: path.to_owned(),
                why: format!("corrupt gzip stream: {e}"),
            })?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|why| DataError::Malformed {
        path: path.to_owned(),
        why,
    })
}

fn parse_idx(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "{} bytes is shorter than the 4-byte header",
            bytes.len()
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "magic starts {:#04x} {:#04x}, expected 0x00 0x00",
            bytes[0], bytes[1]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "element type {:#04x}, expected 0x08 (u8)",
            bytes[2]
        ));
    }
    let rank = usize::from(bytes[3]);
    if rank == 0 || rank > 4 {
        return Err(format!("rank {rank}, expected 1 to 4"));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(format!(
            "truncated header: {} bytes for rank {rank}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    let body = &bytes[header..];
    if body.len() != expected {
        return Err(format!(
            "dimensions {dims:?} need {expected} data bytes, found {}",
            body.len()
        ));
    }
    Ok(IdxArray {
        dims,
        data: body.to_vec(),
    })
}

/// Grayscale images with labels, stored as bytes (what the files hold, and what an 8-bit PNG
/// a client sends holds).
#[derive(Debug, Clone)]
pub struct Dataset {
    pub rows: usize,
    pub cols: usize,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }

    pub fn image(&self, index: usize) -> &[u8] {
        let n = self.pixels();
        &self.images[index * n..(index + 1) * n]
    }

    /// Loads one split (`train` or `t10k`) from `dir`.
    pub fn load(dir: &Path, split: &str) -> Result<Self, DataError> {
        let images_path = find(dir, &format!("{split}-images-idx3-ubyte"));
        let labels_path = find(dir, &format!("{split}-labels-idx1-ubyte"));
        let images = read_idx(&images_path)?;
        let labels = read_idx(&labels_path)?;
        if images.dims.len() != 3 {
            return Err(DataError::Malformed {
                path: images_path,
                why: format!("image file has rank {}, expected 3", images.dims.len()),
            });
        }
        if labels.dims.len() != 1 {
            return Err(DataError::Malformed {
                path: labels_path,
                why: format!("label file has rank {}, expected 1", labels.dims.len()),
            });
        }
        if images.dims[0] != labels.dims[0] {
            return Err(DataError::CountMismatch {
                images: images_path,
                labels: labels_path,
                n_images: images.dims[0],
                n_labels: labels.dims[0],
            });
        }
        Ok(Self {
            rows: images.dims[1],
            cols: images.dims[2],
            images: images.data,
            labels: labels.data,
        })
    }

    /// The subset at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let mut images = Vec::with_capacity(indices.len() * self.pixels());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Self {
            rows: self.rows,
            cols: self.cols,
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// The fixed, seeded split of a training set into (train, validation).
    ///
    /// The validation part is what `csgd calibrate` later fits clean statistics on, so it must be
    /// the same for a given seed and size whatever else changes.
    pub fn split(&self, validation: usize, seed: u64) -> (Self, Self) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let validation = validation.min(self.len());
        let (val, train) = order.split_at(validation);
        let mut train = train.to_vec();
        let mut val = val.to_vec();
        train.sort_unstable();
        val.sort_unstable();
        (self.select(&train), self.select(&val))
    }
}

/// Accepts `NAME-ubyte.gz` or `NAME-ubyte`, preferring the file that exists.
fn find(dir: &Path, stem: &str) -> PathBuf {
    let gz = dir.join(format!("{stem}.gz"));
    if gz.exists() {
        gz
    } else {
        let plain = dir.join(stem);
        if plain.exists() { plain } else { gz }
    }
}

/// The default data directory, overridable for tests and other machines by `CSGD_DATA_DIR`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("CSGD_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_plain_and_gzipped_idx() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = idx_bytes(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let plain = dir.path().join("a-ubyte");
        std::fs::write(&plain, &bytes).unwrap();
        let gz = dir.path().join("a-ubyte.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        for path in [plain, gz] {
            let arr = read_idx(&path).unwrap();
            assert_eq!(arr.dims, vec![2, 2, 3]);
            assert_eq!(arr.data[11], 12);
        }
    }

    #[test]
    fn bad_files_name_the_file_and_the_fault() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, Vec<u8>, &str); 4] = [
            ("short", vec![0, 0], "shorter than"),
            ("magic", vec![1, 0, 8, 1, 0, 0, 0, 1, 5], "magic"),
            ("type", vec![0, 0, 0x0d, 1, 0, 0, 0, 1, 5], "element type"),
            (
                "trunc",
                idx_bytes(&[3], &[1, 2]),
                "need 3 data bytes, found 2",
            ),
        ];
        for (name, bytes, needle) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let err = read_idx(&path).unwrap_err().to_string();
            assert!(err.contains(needle), "{name}: {err}");
            assert!(err.contains(name), "{name}: {err}");
        }
        let gz = dir.path().join("bad.gz");
        std::fs::write(&gz, [0x1f, 0x8b, 1, 2, 3]).unwrap();
        assert!(read_idx(&gz).unwrap_err().to_string().contains("gzip"));
    }

    #[test]
    fn missing_dataset_names_the_package() {
        let err = Dataset::load(Path::new("/nonexistent"), "train")
            .unwrap_err()
            .to_string();
        assert!(err.contains("train-images-idx3-ubyte"), "{err}");
        assert!(err.contains(DATA_PACKAGE), "{err}");
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let data = Dataset {
            rows: 1,
            cols: 1,
            images: (0..100).collect(),
            labels: (0..100).map(|i| i % 10).collect(),
        };
        let (train, val) = data.split(20, 7);
        let (train2, val2) = data.split(20, 7);
        assert_eq!(val.images, val2.images);
        assert_eq!(train.images, train2.images);
        assert_eq!((train.len(), val.len()), (80, 20));
        let mut all: Vec<u8> = train.images.iter().chain(&val.images).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<u8>>());
        assert_ne!(data.split(20, 8).1.images, val.images);
    }
}
