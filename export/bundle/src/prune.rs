//! A bundle's graph cut down to the outputs one caller reads.
//!
//! ONNX Runtime runs every node of a graph on every call, whether or not the call asks for the
//! node's output: a bundle's extra outputs (earlier stages' GAPs, the feature map that only
//! explanations read) cost the detection path about 5 % of the tiny model's forward pass.
//! And a graph output produced by an `Identity` (how the exporter names a tensor that also
//! feeds the next layer) is a full copy of that tensor, which ONNX Runtime does not fold away
//! because graph outputs keep their names. [`keep_outputs`] removes both: nodes that no kept
//! output depends on, and `Identity` nodes in front of kept outputs (the tensor they copy is
//! renamed to the output instead). The kept outputs' values are unchanged.

use std::collections::HashSet;

use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{GraphProto, ModelProto};
use protobuf::Message;

use crate::BundleError;

/// Why a graph cannot be cut down to the requested outputs.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("the model has no graph")]
    NoGraph,
    #[error(transparent)]
    Read(#[from] BundleError),
    #[error("serialising the cut-down graph: {0}")]
    Encode(String),
    #[error("the graph has no output {name:?} (it has {available:?})")]
    UnknownOutput {
        name: String,
        available: Vec<String>,
    },
}

/// A model cut down by [`pruned`].
#[derive(Debug)]
pub struct Pruned {
    /// The cut-down model, serialised for ONNX Runtime.
    pub bytes: Vec<u8>,
    /// Every output of the file's graph, before the cut.
    pub graph_outputs: Vec<String>,
}

/// `model` (parsed from its file, [`crate::onnx::read_model`]) with its graph cut down to
/// `keep` ([`keep_outputs`]), serialised. `None` for a model whose weights live in external
/// files: ONNX Runtime finds those relative to the model's own path, so such a model must be
/// loaded from its file, whole.
pub fn pruned(mut model: ModelProto, keep: &[&str]) -> Result<Option<Pruned>, PruneError> {
    if has_external_data(&model) {
        return Ok(None);
    }
    let graph_outputs = model.graph.output.iter().map(|o| o.name.clone()).collect();
    keep_outputs(&mut model, keep)?;
    let bytes = model
        .write_to_bytes()
        .map_err(|e| PruneError::Encode(e.to_string()))?;
    Ok(Some(Pruned {
        bytes,
        graph_outputs,
    }))
}

fn has_external_data(model: &ModelProto) -> bool {
    model.graph.initializer.iter().any(|t| {
        t.data_location.enum_value() == Ok(DataLocation::EXTERNAL) || !t.external_data.is_empty()
    })
}

/// Restricts `model`'s graph to the outputs named in `keep` (kept in the graph's own order),
/// with every node, initializer and value annotation that none of them needs removed, and
/// `Identity` nodes in front of kept outputs folded into the tensor they copy.
///
/// A graph with subgraphs (`If`, `Loop`, `Scan`), whose nodes can read tensors without naming
/// them as inputs, only loses its unkept outputs.
pub fn keep_outputs(model: &mut ModelProto, keep: &[&str]) -> Result<(), PruneError> {
    let graph = model.graph.as_mut().ok_or(PruneError::NoGraph)?;
    if let Some(missing) = keep
        .iter()
        .find(|k| !graph.output.iter().any(|o| o.name == **k))
    {
        return Err(PruneError::UnknownOutput {
            name: (*missing).to_owned(),
            available: graph.output.iter().map(|o| o.name.clone()).collect(),
        });
    }
    graph.output.retain(|o| keep.contains(&o.name.as_str()));
    let has_subgraphs = graph
        .node
        .iter()
        .flat_map(|n| &n.attribute)
        .any(|a| a.g.is_some() || !a.graphs.is_empty());
    if has_subgraphs {
        return Ok(());
    }
    fold_output_identities(graph);
    remove_unused(graph);
    Ok(())
}

/// Renames the tensor an `Identity` copies to the graph output it produces, and drops the
/// node, where that is safe: the copied tensor is produced by a node (not a graph input or
/// initializer) and is not itself a graph output, and no other output has claimed it first.
fn fold_output_identities(graph: &mut GraphProto) {
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let external: HashSet<&str> = graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .chain(graph.initializer.iter().map(|t| t.name.as_str()))
        .collect();
    let mut renames: Vec<(String, String)> = Vec::new();
    let mut folded: Vec<usize> = Vec::new();
    for (i, node) in graph.node.iter().enumerate() {
        let ([copied], [output]) = (node.input.as_slice(), node.output.as_slice()) else {
            continue;
        };
        if node.op_type != "Identity"
            || !outputs.contains(output)
            || outputs.contains(copied)
            || external.contains(copied.as_str())
            || renames.iter().any(|(from, _)| from == copied)
        {
            continue;
        }
        renames.push((copied.clone(), output.clone()));
        folded.push(i);
    }
    let mut index = 0;
    graph.node.retain(|_| {
        index += 1;
        !folded.contains(&(index - 1))
    });
    // The output's own declaration now describes the tensor.
    graph
        .value_info
        .retain(|v| !renames.iter().any(|(from, _)| *from == v.name));
    for (from, to) in &renames {
        let names = graph
            .node
            .iter_mut()
            .flat_map(|n| n.input.iter_mut().chain(n.output.iter_mut()));
        for name in names {
            if name == from {
                name.clone_from(to);
            }
        }
    }
}

/// Drops the nodes no graph output depends on, then the initializers and value annotations
/// nothing reads any more.
fn remove_unused(graph: &mut GraphProto) {
    let mut needed: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut keep_node = vec![false; graph.node.len()];
    // Nodes are stored in topological order, so one backward pass finds every producer.
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            keep_node[i] = true;
            needed.extend(node.input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    let mut flags = keep_node.into_iter();
    graph.node.retain(|_| flags.next().unwrap_or(true));
    graph.initializer.retain(|t| needed.contains(&t.name));
    graph.value_info.retain(|v| needed.contains(&v.name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use onnx_protobuf::{NodeProto, TensorProto, ValueInfoProto};

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: output.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn value(name: &str) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            ..Default::default()
        }
    }

    /// image → conv(w1) → relu ─┬→ Identity → map
    ///                          ├→ GAP → early
    ///                          └→ conv(w2) → late ─→ Identity → copy
    fn model() -> ModelProto {
        let weight = |name: &str| TensorProto {
            name: name.into(),
            ..Default::default()
        };
        ModelProto {
            graph: Some(GraphProto {
                node: vec![
                    node("Conv", &["image", "w1"], "conv"),
                    node("Relu", &["conv"], "relu"),
                    node("Identity", &["relu"], "map"),
                    node("GlobalAveragePool", &["relu"], "early"),
                    node("Conv", &["relu", "w2"], "late"),
                    node("Identity", &["late"], "copy"),
                ],
                initializer: vec![weight("w1"), weight("w2")],
                input: vec![value("image")],
                output: ["map", "early", "late", "copy"].map(value).to_vec(),
                value_info: vec![value("relu"), value("conv")],
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }

    fn ops(model: &ModelProto) -> Vec<(String, Vec<String>, Vec<String>)> {
        model
            .graph
            .node
            .iter()
            .map(|n| (n.op_type.clone(), n.input.clone(), n.output.clone()))
            .collect()
    }

    /// The graph's outputs, initializers and value annotations, by name.
    fn listed(model: &ModelProto) -> [Vec<String>; 3] {
        let g = &model.graph;
        [
            g.output.iter().map(|o| o.name.clone()).collect(),
            g.initializer.iter().map(|t| t.name.clone()).collect(),
            g.value_info.iter().map(|v| v.name.clone()).collect(),
        ]
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unread_branches_go_and_the_identity_in_front_of_a_kept_output_is_folded() {
        let mut m = model();
        keep_outputs(&mut m, &["map"]).unwrap();
        // The ReLU now writes `map` itself; the GAP, the second conv and both copies are gone,
        // with the weight only the second conv read and the annotation of the renamed tensor.
        assert_eq!(
            ops(&m),
            [
                ("Conv".into(), strings(&["image", "w1"]), strings(&["conv"])),
                ("Relu".into(), strings(&["conv"]), strings(&["map"])),
            ]
        );
        assert_eq!(
            listed(&m),
            [strings(&["map"]), strings(&["w1"]), strings(&["conv"])]
        );
    }

    #[test]
    fn a_renamed_tensor_keeps_feeding_its_other_readers() {
        let mut m = model();
        keep_outputs(&mut m, &["early", "map", "copy"]).unwrap();
        // Graph order is kept, not the order asked for.
        let names: Vec<&str> = m.graph.output.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["map", "early", "copy"]);
        assert_eq!(
            ops(&m),
            [
                ("Conv".into(), strings(&["image", "w1"]), strings(&["conv"])),
                ("Relu".into(), strings(&["conv"]), strings(&["map"])),
                (
                    "GlobalAveragePool".into(),
                    strings(&["map"]),
                    strings(&["early"])
                ),
                ("Conv".into(), strings(&["map", "w2"]), strings(&["copy"])),
            ]
        );
    }

    #[test]
    fn an_identity_of_another_kept_output_stays_a_copy() {
        // `late` is itself kept, so `copy` cannot take its name.
        let mut m = model();
        keep_outputs(&mut m, &["late", "copy"]).unwrap();
        assert!(ops(&m).iter().any(|(op, i, o)| op == "Identity"
            && i == &strings(&["late"])
            && o == &strings(&["copy"])));
        assert_eq!(m.graph.node.len(), 4);
    }

    #[test]
    fn a_model_with_external_weights_is_left_to_be_loaded_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let write = |model: &ModelProto| {
            std::fs::write(&path, model.write_to_bytes().unwrap()).unwrap();
        };
        write(&model());
        let read = || crate::onnx::read_model(&path).unwrap();
        let kept = pruned(read(), &["early"]).unwrap().unwrap();
        assert_eq!(kept.graph_outputs, ["map", "early", "late", "copy"]);
        let cut = ModelProto::parse_from_bytes(&kept.bytes).unwrap();
        assert_eq!(cut.graph.node.len(), 3);

        let mut external = model();
        external.graph.as_mut().unwrap().initializer[0].data_location =
            DataLocation::EXTERNAL.into();
        write(&external);
        assert!(pruned(read(), &["early"]).unwrap().is_none());
    }

    #[test]
    fn an_unknown_output_is_refused_with_the_ones_there_are() {
        let mut m = model();
        let e = keep_outputs(&mut m, &["map", "logits"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the graph has no output \"logits\" (it has [\"map\", \"early\", \"late\", \"copy\"])"
        );
        assert_eq!(m, model(), "a refused cut leaves the model as it was");
        assert!(matches!(
            keep_outputs(&mut ModelProto::default(), &[]),
            Err(PruneError::NoGraph)
        ));
    }
}
