//! Inferring a torchvision ResNet's [`Architecture`] from the names and shapes of its tensors.
//!
//! Official checkpoints carry no description of the network, only the state dict. The stem
//! kernel tells the stem, `conv3` tells Bottleneck from BasicBlock, the blocks present per
//! layer give the depths, and each layer's first `conv1` gives its width. The full check of
//! every name and shape against the inferred plan happens afterwards ([`crate::plan`]).

use csg_bundle::{Architecture, Backbone, BlockKind, GATE_TENSOR, Stem};

use crate::ExportError;
use crate::tensors::TensorMap;

const EXPECTED: &str = "torchvision ResNet tensors (conv1.weight, layer1.0.conv1.weight, …, \
                        fc.weight [classes, K])";

fn found(tensors: &TensorMap) -> String {
    let names: Vec<&str> = tensors.names().take(6).collect();
    if names.is_empty() {
        return "no tensors".into();
    }
    let more = tensors.len().saturating_sub(names.len());
    let tail = if more > 0 {
        format!(" … ({more} more)")
    } else {
        String::new()
    };
    format!("{} tensors: {}{tail}", tensors.len(), names.join(", "))
}

fn fail(expected: impl Into<String>, found: impl Into<String>) -> ExportError {
    ExportError::Architecture {
        expected: expected.into(),
        found: found.into(),
    }
}

/// The shape of `name` if it is a tensor of `rank` dimensions.
fn shape_of<'a>(t: &'a TensorMap, name: &str, rank: usize) -> Result<&'a [usize], ExportError> {
    match t.shape(name) {
        Some(s) if s.len() == rank => Ok(s),
        Some(s) => Err(fail(
            format!("{name} to have {rank} dimensions"),
            format!("shape {s:?}"),
        )),
        None => Err(fail(EXPECTED, format!("no {name}; {}", found(t)))),
    }
}

/// Infers a torchvision ResNet from a state dict (keys already stripped of `module.`).
pub fn infer_resnet(t: &TensorMap) -> Result<Architecture, ExportError> {
    let stem_shape = shape_of(t, "conv1.weight", 4)?;
    let (stem_width, in_channels) = (stem_shape[0], stem_shape[1]);
    let stem = match (stem_shape[2], stem_shape[3]) {
        (7, 7) => Stem::ImageNet { width: stem_width },
        (3, 3) => Stem::Small { width: stem_width },
        (h, w) => {
            return Err(fail(
                "a 7×7 (ImageNet) or 3×3 (small-input) stem convolution conv1.weight",
                format!("a {h}×{w} kernel"),
            ));
        }
    };
    let block = if t.contains("layer1.0.conv3.weight") {
        BlockKind::Bottleneck
    } else if t.contains("layer1.0.conv2.weight") {
        BlockKind::Basic
    } else {
        return Err(fail(
            "layer1.0.conv2.weight (BasicBlock) or layer1.0.conv3.weight (Bottleneck)",
            found(t),
        ));
    };
    let mut layers = Vec::new();
    let mut widths = Vec::new();
    for l in 1.. {
        let depth = (0..)
            .take_while(|b| t.contains(&format!("layer{l}.{b}.conv1.weight")))
            .count();
        if depth == 0 {
            break;
        }
        layers.push(depth);
        widths.push(shape_of(t, &format!("layer{l}.0.conv1.weight"), 4)?[0]);
    }
    if layers.is_empty() {
        return Err(fail(
            EXPECTED,
            format!("no layer1.0.conv1.weight; {}", found(t)),
        ));
    }
    let fc = shape_of(t, "fc.weight", 2)?;
    let arch = Architecture {
        in_channels,
        classes: fc[0],
        bn_eps: 1e-5,
        backbone: Backbone::ResNet {
            block,
            layers,
            widths,
            stem,
        },
    };
    arch.validate()?;
    if fc[1] != arch.filters() {
        return Err(fail(
            format!(
                "fc.weight [classes, K] with K = {} (the last layer's width × {})",
                arch.filters(),
                block.expansion()
            ),
            format!("shape {fc:?}"),
        ));
    }
    Ok(arch)
}

/// Whether the checkpoint holds a learned gate (a CSG model) rather than a baseline.
pub fn has_gate(t: &TensorMap) -> bool {
    t.contains(GATE_TENSOR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::Tensor;

    fn put(t: &mut TensorMap, name: &str, shape: &[usize]) {
        let n = shape.iter().product();
        t.insert(name, Tensor::new(shape.to_vec(), vec![0.0; n]));
    }

    #[test]
    fn infers_bottleneck_depths_and_widths() {
        let mut t = TensorMap::new();
        put(&mut t, "conv1.weight", &[8, 3, 7, 7]);
        for (l, (depth, width)) in [(2, 8), (3, 16)].into_iter().enumerate() {
            for b in 0..depth {
                let inputs = if b == 0 { 8 } else { width * 4 };
                put(
                    &mut t,
                    &format!("layer{}.{b}.conv1.weight", l + 1),
                    &[width, inputs, 1, 1],
                );
                put(
                    &mut t,
                    &format!("layer{}.{b}.conv3.weight", l + 1),
                    &[width * 4, width, 1, 1],
                );
                put(
                    &mut t,
                    &format!("layer{}.{b}.conv2.weight", l + 1),
                    &[width, width, 3, 3],
                );
            }
        }
        put(&mut t, "fc.weight", &[5, 64]);
        let arch = infer_resnet(&t).unwrap();
        assert_eq!(arch.classes, 5);
        assert_eq!(
            arch.backbone,
            Backbone::ResNet {
                block: BlockKind::Bottleneck,
                layers: vec![2, 3],
                widths: vec![8, 16],
                stem: Stem::ImageNet { width: 8 },
            }
        );
        assert!(!has_gate(&t));
    }

    #[test]
    fn explains_what_it_could_not_infer() {
        let mut t = TensorMap::new();
        put(&mut t, "encoder.weight", &[4, 4]);
        let err = infer_resnet(&t).unwrap_err().to_string();
        assert!(err.contains("expected torchvision ResNet") && err.contains("encoder.weight"));

        put(&mut t, "conv1.weight", &[8, 3, 5, 5]);
        let err = infer_resnet(&t).unwrap_err().to_string();
        assert!(err.contains("found a 5×5 kernel"), "{err}");
    }
}
