//! The ONNX graph of a CSG network, built from its [`Plan`] and checked tensors.
//!
//! The graph is the standard (inference) path only: `image` → backbone → GAP → `fc`. The gate
//! is never applied at inference; it travels in the metadata. Normalisation is not in the
//! graph either: the daemon applies [`csg_bundle::InputSpec`] itself. Weights are moved into
//! the protobuf as raw little-endian bytes, one tensor at a time, so building the graph does
//! not hold a second copy of the model.

use csg_bundle::{Architecture, OutputNames, StageOutput};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{Dimension, dimension};
use onnx_protobuf::type_proto::{self, Value};
use onnx_protobuf::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use crate::ExportError;
use crate::plan::{ConvBn, Plan, Stage};
use crate::tensors::{Tensor, TensorMap};

/// The graph's input: `[N, channels, H, W]` float32, already normalised.
pub const INPUT: &str = "image";
pub const LOGITS: &str = "logits";
pub const ACTIVATIONS: &str = "activations";
pub const FEATURE_MAP: &str = "feature_map";
/// Default ONNX opset; 17 is understood by every ONNX Runtime since 1.11.
pub const OPSET: i64 = 17;
/// IR version 8 pairs with opset 17 and is accepted by onnx.checker and ONNX Runtime.
pub const IR_VERSION: i64 = 8;
/// The dynamic batch dimension's name.
const BATCH: &str = "N";

/// Name of the output holding stage `index`'s GAP (0-based index, 1-based in the name, like
/// torchvision's `layer1`…).
pub fn stage_output_name(index: usize) -> String {
    format!("stage{}_activations", index + 1)
}

/// Name of the output holding stage `index`'s feature map (see [`StageOutput::map`]).
pub fn stage_map_name(index: usize) -> String {
    format!("stage{}_map", index + 1)
}

/// What to put in the graph besides logits and activations.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphOptions {
    /// Fold batch norm into the convolutions (default) or emit BatchNormalization nodes.
    pub fold_bn: bool,
    /// 0-based indices of the earlier stages whose GAP to export, ascending.
    pub stages: Vec<usize>,
    /// 0-based indices of the stages among those whose feature map to export as well.
    pub stage_maps: Vec<usize>,
    /// Also export the gated stage's feature map.
    pub feature_map: bool,
    /// Input height and width.
    pub input_hw: (usize, usize),
}

enum Dim {
    Batch,
    Fixed(usize),
}

/// Builds the model (graph, opset, IR version, producer; no metadata yet). `tensors` must have
/// passed [`TensorMap::check`] against `plan`; the gate, if any, must already be removed.
pub fn build_model(
    arch: &Architecture,
    tensors: TensorMap,
    options: &GraphOptions,
) -> Result<(ModelProto, OutputNames), ExportError> {
    let plan = Plan::new(arch);
    let last = plan.stages.len().saturating_sub(1);
    if let Some(&bad) = options.stages.iter().find(|&&s| s >= last) {
        return Err(ExportError::Options(format!(
            "stage {} cannot be exported as an extra output: expected one of 1..={} (stage {} \
             is the gated stage, always exported as `{ACTIVATIONS}`)",
            bad + 1,
            last,
            last + 1
        )));
    }
    let mut b = Builder {
        nodes: Vec::new(),
        initializers: Vec::new(),
        tensors,
        fold: options.fold_bn,
        eps: arch.bn_eps,
    };
    let stage_channels = arch.stage_channels();
    let mut x = INPUT.to_owned();
    if let Some(stem) = &plan.stem {
        x = b.conv_bn(&x, &stem.unit)?;
        x = b.relu(&x, "stem.relu");
        if stem.max_pool {
            x = b.max_pool(&x, "stem.maxpool", 3, 2, 1);
        }
    }
    let mut stage_outputs = Vec::new();
    let mut graph_outputs = Vec::new();
    for (i, stage) in plan.stages.iter().enumerate() {
        let out = match stage {
            Stage::Cnn { unit, .. } => {
                let y = b.conv_bn(&x, unit)?;
                b.relu(&y, &format!("features.{i}.relu"))
            }
            Stage::Residual { blocks } => {
                for block in blocks {
                    x = b.residual(&x, block)?;
                }
                x.clone()
            }
        };
        if options.stages.contains(&i) {
            let name = stage_output_name(i);
            b.gap(&out, &name);
            let channels = stage_channels.get(i).copied().unwrap_or(0);
            graph_outputs.push(value_info(&name, &[Dim::Batch, Dim::Fixed(channels)]));
            let map = options.stage_maps.contains(&i).then(|| {
                let map = stage_map_name(i);
                b.node("Identity", &map, &[&out], &map, vec![]);
                let (h, w) = options.input_hw;
                let size = |side: usize| arch.stage_sizes(side).get(i).copied().unwrap_or(0);
                graph_outputs.push(value_info(
                    &map,
                    &[
                        Dim::Batch,
                        Dim::Fixed(channels),
                        Dim::Fixed(size(h)),
                        Dim::Fixed(size(w)),
                    ],
                ));
                map
            });
            stage_outputs.push(StageOutput {
                stage: i,
                name,
                channels,
                map,
            });
        }
        x = match stage {
            Stage::Cnn { pool: true, .. } if i < last => {
                b.max_pool(&out, &format!("features.{i}.pool"), 2, 2, 0)
            }
            _ => out,
        };
    }
    b.gap(&x, ACTIVATIONS);
    let fc_w = b.tensors.take("fc.weight", &[plan.classes, plan.filters])?;
    let fc_b = b.tensors.take("fc.bias", &[plan.classes])?;
    b.initializer("fc.weight", fc_w);
    b.initializer("fc.bias", fc_b);
    b.node(
        "Gemm",
        "fc",
        &[ACTIVATIONS, "fc.weight", "fc.bias"],
        LOGITS,
        vec![int_attr("transB", 1)],
    );

    let mut outputs = vec![
        value_info(LOGITS, &[Dim::Batch, Dim::Fixed(plan.classes)]),
        value_info(ACTIVATIONS, &[Dim::Batch, Dim::Fixed(plan.filters)]),
    ];
    outputs.extend(graph_outputs);
    let feature_map = options.feature_map.then(|| {
        b.node("Identity", FEATURE_MAP, &[&x], FEATURE_MAP, vec![]);
        let (h, w) = options.input_hw;
        let size = |s: usize| arch.stage_sizes(s).last().copied().unwrap_or(0);
        outputs.push(value_info(
            FEATURE_MAP,
            &[
                Dim::Batch,
                Dim::Fixed(plan.filters),
                Dim::Fixed(size(h)),
                Dim::Fixed(size(w)),
            ],
        ));
        FEATURE_MAP.to_owned()
    });
    let (h, w) = options.input_hw;
    let graph = GraphProto {
        name: arch.summary(),
        node: b.nodes,
        initializer: b.initializers,
        input: vec![value_info(
            INPUT,
            &[
                Dim::Batch,
                Dim::Fixed(arch.in_channels),
                Dim::Fixed(h),
                Dim::Fixed(w),
            ],
        )],
        output: outputs,
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
            ..Default::default()
        }],
        producer_name: "csg-export".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: "Class-specific-gate CNN, standard inference path; see metadata csgd.bundle"
            .into(),
        graph: Some(graph).into(),
        ..Default::default()
    };
    let names = OutputNames {
        logits: LOGITS.into(),
        activations: ACTIVATIONS.into(),
        stages: stage_outputs,
        feature_map,
    };
    Ok((model, names))
}

struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    tensors: TensorMap,
    fold: bool,
    eps: f64,
}

impl Builder {
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        output: &str,
        a: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.to_owned()],
            attribute: a,
            ..Default::default()
        });
    }

    /// Moves a tensor into the graph as an initializer.
    fn initializer(&mut self, name: &str, tensor: Tensor) {
        let Tensor { shape, data } = tensor;
        let mut raw = Vec::with_capacity(data.len() * 4);
        for v in &data {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        drop(data);
        self.initializers.push(TensorProto {
            name: name.into(),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: DataType::FLOAT as i32,
            raw_data: raw,
            ..Default::default()
        });
    }

    fn relu(&mut self, x: &str, name: &str) -> String {
        self.node("Relu", name, &[x], name, vec![]);
        name.to_owned()
    }

    fn max_pool(&mut self, x: &str, name: &str, kernel: i64, stride: i64, pad: i64) -> String {
        let attrs = vec![
            ints_attr("kernel_shape", &[kernel, kernel]),
            ints_attr("strides", &[stride, stride]),
            ints_attr("pads", &[pad; 4]),
        ];
        self.node("MaxPool", name, &[x], name, attrs);
        name.to_owned()
    }

    /// GlobalAveragePool then Flatten: `[N, C, h, w]` → `[N, C]` named `output`.
    fn gap(&mut self, x: &str, output: &str) {
        let pooled = format!("{output}.gap");
        self.node("GlobalAveragePool", &pooled, &[x], &pooled, vec![]);
        self.node(
            "Flatten",
            &format!("{output}.flatten"),
            &[&pooled],
            output,
            vec![int_attr("axis", 1)],
        );
    }

    /// Convolution followed by batch norm, folded into one biased convolution or not.
    fn conv_bn(&mut self, x: &str, unit: &ConvBn) -> Result<String, ExportError> {
        let channels = [unit.out_channels];
        let mut weight = self.tensors.take(&unit.conv, &unit.weight_shape())?;
        let [gamma, beta, mean, var] = unit.bn_names();
        let gamma_t = self.tensors.take(&gamma, &channels)?;
        let beta_t = self.tensors.take(&beta, &channels)?;
        let mean_t = self.tensors.take(&mean, &channels)?;
        let var_t = self.tensors.take(&var, &channels)?;
        let conv_name = unit.conv.trim_end_matches(".weight").to_owned();
        let k = unit.kernel as i64;
        let s = unit.stride as i64;
        let p = unit.pad as i64;
        let attrs = vec![
            ints_attr("kernel_shape", &[k, k]),
            ints_attr("strides", &[s, s]),
            ints_attr("pads", &[p; 4]),
        ];
        if self.fold {
            // y = γ (conv(x) − μ) / √(σ² + ε) + β = conv'(x) + b' with
            // W' = W · γ/√(σ² + ε) per output channel and b' = β − μ · γ/√(σ² + ε).
            let per_out = weight.data.len() / unit.out_channels.max(1);
            let mut bias = Vec::with_capacity(unit.out_channels);
            for (o, w) in weight.data.chunks_mut(per_out.max(1)).enumerate() {
                let scale =
                    f64::from(gamma_t.data[o]) / (f64::from(var_t.data[o]) + self.eps).sqrt();
                w.iter_mut()
                    .for_each(|v| *v = (f64::from(*v) * scale) as f32);
                bias.push((f64::from(beta_t.data[o]) - f64::from(mean_t.data[o]) * scale) as f32);
            }
            let bias_name = format!("{conv_name}.bias");
            self.initializer(&unit.conv, weight);
            self.initializer(&bias_name, Tensor::new(channels.to_vec(), bias));
            self.node(
                "Conv",
                &conv_name,
                &[x, &unit.conv, &bias_name],
                &conv_name,
                attrs,
            );
            Ok(conv_name)
        } else {
            self.initializer(&unit.conv, weight);
            self.node("Conv", &conv_name, &[x, &unit.conv], &conv_name, attrs);
            for (name, t) in [
                (&gamma, gamma_t),
                (&beta, beta_t),
                (&mean, mean_t),
                (&var, var_t),
            ] {
                self.initializer(name, t);
            }
            self.node(
                "BatchNormalization",
                &unit.bn,
                &[&conv_name, &gamma, &beta, &mean, &var],
                &unit.bn,
                vec![float_attr("epsilon", self.eps as f32)],
            );
            Ok(unit.bn.clone())
        }
    }

    /// A residual block: convs with ReLUs between, shortcut added, final ReLU.
    fn residual(&mut self, x: &str, block: &crate::plan::Block) -> Result<String, ExportError> {
        let mut y = x.to_owned();
        for (i, unit) in block.convs.iter().enumerate() {
            y = self.conv_bn(&y, unit)?;
            if i + 1 < block.convs.len() {
                y = self.relu(&y, &format!("{}.relu{}", block.name, i + 1));
            }
        }
        let shortcut = match &block.downsample {
            Some(unit) => self.conv_bn(x, unit)?,
            None => x.to_owned(),
        };
        let sum = format!("{}.add", block.name);
        self.node("Add", &sum, &[&y, &shortcut], &sum, vec![]);
        Ok(self.relu(&sum, &format!("{}.relu", block.name)))
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::INT.into(),
        i: v,
        ..Default::default()
    }
}

fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::INTS.into(),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn float_attr(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::FLOAT.into(),
        f: v,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Batch => dimension::Value::DimParam(BATCH.into()),
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
            }),
            ..Default::default()
        })
        .collect();
    let tensor = type_proto::Tensor {
        elem_type: DataType::FLOAT as i32,
        shape: Some(TensorShapeProto {
            dim,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        type_: Some(TypeProto {
            value: Some(Value::TensorType(tensor)),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}
