//! Named f32 tensors as read from a checkpoint, and the check of them against what an
//! architecture expects.
//!
//! Both checkpoint readers produce a [`TensorMap`] with torchvision names; the graph builder
//! takes tensors out of it by name. Checking every name and shape up front, before anything is
//! built, lets one error list every missing tensor rather than the first.

use std::collections::BTreeMap;

use crate::ExportError;

/// A dense row-major f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// Decodes little-endian f32 bytes; `bytes.len()` must be 4 × the element count.
    pub fn from_le_bytes(shape: Vec<usize>, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != shape.iter().product::<usize>() * 4 {
            return None;
        }
        let data = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Some(Self { shape, data })
    }
}

/// Expected name and shape of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }
}

/// Tensors by name. Ordered so that error messages and graphs are deterministic.
#[derive(Debug, Default)]
pub struct TensorMap {
    tensors: BTreeMap<String, Tensor>,
}

impl TensorMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total bytes of tensor data held.
    pub fn data_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.data.len() * 4).sum()
    }

    /// Removes and returns a tensor, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ExportError> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| ExportError::MissingKeys {
                arch: "the graph".into(),
                names: vec![name.to_owned()],
            })?;
        if tensor.shape != shape {
            return Err(ExportError::Misshapen {
                name: name.to_owned(),
                expected: shape.to_vec(),
                found: tensor.shape,
            });
        }
        Ok(tensor)
    }

    /// Checks that exactly the tensors in `specs` are present with their shapes, naming every
    /// missing tensor, the first misshapen one, or every unused one.
    pub fn check(&self, specs: &[TensorSpec], arch: &str) -> Result<(), ExportError> {
        let missing: Vec<String> = specs
            .iter()
            .filter(|s| !self.contains(&s.name))
            .map(|s| s.name.clone())
            .collect();
        if !missing.is_empty() {
            return Err(ExportError::MissingKeys {
                arch: arch.to_owned(),
                names: missing,
            });
        }
        for spec in specs {
            if let Some(found) = self.shape(&spec.name)
                && found != spec.shape.as_slice()
            {
                return Err(ExportError::Misshapen {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    found: found.to_vec(),
                });
            }
        }
        let wanted: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        let extra: Vec<String> = self
            .names()
            .filter(|n| !wanted.contains(n))
            .map(str::to_owned)
            .collect();
        if !extra.is_empty() {
            return Err(ExportError::UnexpectedKeys {
                arch: arch.to_owned(),
                names: extra,
            });
        }
        Ok(())
    }
}

/// Batch-norm buffers that carry no weights and that we drop on reading.
pub(crate) fn is_ignored(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_missing_misshapen_and_extra() {
        let mut map = TensorMap::new();
        map.insert("a", Tensor::new(vec![2], vec![1.0, 2.0]));
        map.insert("b", Tensor::new(vec![1], vec![1.0]));
        let specs = [TensorSpec::new("a", &[2]), TensorSpec::new("c", &[3])];
        let err = map.check(&specs, "net").unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains('c'), "{err}");

        let specs = [TensorSpec::new("a", &[3]), TensorSpec::new("b", &[1])];
        let err = map.check(&specs, "net").unwrap_err().to_string();
        assert!(err.contains("expected shape [3], found [2]"), "{err}");

        let specs = [TensorSpec::new("a", &[2])];
        let err = map.check(&specs, "net").unwrap_err().to_string();
        assert!(err.contains("unexpected") && err.contains('b'), "{err}");

        assert_eq!(map.take("a", &[2]).unwrap().data, vec![1.0, 2.0]);
        assert!(map.take("a", &[2]).is_err());
    }

    #[test]
    fn decodes_little_endian() {
        let bytes: Vec<u8> = [1.0f32, -0.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = Tensor::from_le_bytes(vec![2], &bytes).unwrap();
        assert_eq!(t.data, vec![1.0, -0.5]);
        assert!(Tensor::from_le_bytes(vec![3], &bytes).is_none());
    }
}
