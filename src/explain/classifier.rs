//! The classifier's weights, for class-activation maps.
//!
//! A CAM weights each feature map by the fully connected layer's weight for the class; those
//! weights live only in the ONNX graph (the bundle metadata carries the gate, not the
//! classifier), so they are read from it once when a model is loaded for explanations. The
//! graph is checked to have the shape CAM assumes: `logits = Gemm(activations, W, b)`, i.e. the
//! logits are linear in the gated stage's GAP.

use std::path::Path;

use csg_bundle::BundleMeta;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{ModelProto, TensorProto};

use super::ExplainError;

/// The fully connected layer's weights as `[classes][filters]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Classifier {
    pub classes: usize,
    pub filters: usize,
    weights: Vec<f32>,
}

impl Classifier {
    pub fn new(classes: usize, filters: usize, weights: Vec<f32>) -> Option<Classifier> {
        (weights.len() == classes * filters).then_some(Classifier {
            classes,
            filters,
            weights,
        })
    }

    /// Class `c`'s weight for every filter (empty for an unknown class).
    pub fn row(&self, c: usize) -> &[f32] {
        self.weights
            .get(c * self.filters..(c + 1) * self.filters)
            .unwrap_or(&[])
    }

    /// Reads the weights from the model file at `path`.
    pub fn read(path: &Path, meta: &BundleMeta) -> Result<Classifier, ExplainError> {
        let model = csg_bundle::onnx::read_model(path)
            .map_err(|e| ExplainError::Classifier(e.to_string()))?;
        Self::from_model(&model, meta)
    }

    /// Finds the Gemm that produces the logits from the activations and takes its weight.
    pub fn from_model(model: &ModelProto, meta: &BundleMeta) -> Result<Classifier, ExplainError> {
        let bad = |why: String| ExplainError::Classifier(why);
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| bad("the model has no graph".into()))?;
        let logits = &meta.outputs.logits;
        let node = graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == logits))
            .ok_or_else(|| bad(format!("no node computes {logits:?}")))?;
        let acts = &meta.outputs.activations;
        if node.op_type != "Gemm" || node.input.first() != Some(acts) {
            return Err(bad(format!(
                "{logits:?} is computed by a {} of {:?}, not a Gemm of {acts:?}; the class-activation map needs the logits to be linear in the activations",
                node.op_type, node.input
            )));
        }
        let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
        let trans_b = attr("transB").is_some_and(|a| a.i != 0);
        let scaled = attr("alpha").is_some_and(|a| a.f != 1.0);
        if attr("transA").is_some_and(|a| a.i != 0) || scaled {
            return Err(bad("the classifier Gemm uses transA or alpha".into()));
        }
        let name = node
            .input
            .get(1)
            .ok_or_else(|| bad("the classifier Gemm has no weight input".into()))?;
        let tensor = graph
            .initializer
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| bad(format!("the classifier weight {name:?} is not a constant")))?;
        let (classes, filters) = (meta.classes.len(), meta.architecture.filters());
        let dims: Vec<i64> = tensor.dims.clone();
        let want = if trans_b {
            [classes, filters]
        } else {
            [filters, classes]
        };
        if dims.len() != 2 || dims.iter().zip(want).any(|(&d, w)| d != w as i64) {
            return Err(bad(format!(
                "the classifier weight {name:?} has shape {dims:?}, expected {want:?}"
            )));
        }
        let values = floats(tensor).ok_or_else(|| {
            bad(format!(
                "the classifier weight {name:?} is not float32 data"
            ))
        })?;
        let weights = if trans_b {
            values
        } else {
            transpose(&values, filters, classes)
        };
        Classifier::new(classes, filters, weights)
            .ok_or_else(|| bad(format!("the classifier weight {name:?} has the wrong size")))
    }
}

/// The float32 values of an initializer, stored raw (little-endian) or as `float_data`.
fn floats(tensor: &TensorProto) -> Option<Vec<f32>> {
    if tensor.data_type != DataType::FLOAT as i32 {
        return None;
    }
    if !tensor.raw_data.is_empty() {
        let chunks = tensor.raw_data.chunks_exact(4);
        if !chunks.remainder().is_empty() {
            return None;
        }
        return Some(
            chunks
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        );
    }
    Some(tensor.float_data.clone())
}

/// `[rows][cols]` → `[cols][rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| values[r * cols + c]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_transpose() {
        let c = Classifier::new(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(c.row(1), &[4.0, 5.0, 6.0]);
        assert!(c.row(2).is_empty());
        assert!(Classifier::new(2, 3, vec![0.0; 5]).is_none());
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2),
            vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]
        );
    }

    #[test]
    fn floats_read_raw_little_endian_or_float_data() {
        let mut t = TensorProto {
            data_type: DataType::FLOAT as i32,
            raw_data: [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            ..Default::default()
        };
        assert_eq!(floats(&t), Some(vec![1.5, -2.0]));
        t.raw_data.clear();
        t.float_data = vec![0.25];
        assert_eq!(floats(&t), Some(vec![0.25]));
        t.data_type = DataType::DOUBLE as i32;
        assert_eq!(floats(&t), None);
    }
}
