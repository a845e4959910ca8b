//! Infer responses in the Open Inference Protocol: outputs as JSON arrays, or as raw bytes
//! after the JSON header (the binary tensor data extension) where the request asked for it.

use serde_json::{Value, json};

/// An output tensor of a response.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputData {
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    Int64(Vec<i64>),
    Bool(Vec<bool>),
}

impl OutputData {
    pub fn datatype(&self) -> &'static str {
        match self {
            OutputData::Fp32(_) => "FP32",
            OutputData::Fp64(_) => "FP64",
            OutputData::Int64(_) => "INT64",
            OutputData::Bool(_) => "BOOL",
        }
    }

    fn json(&self) -> Value {
        match self {
            OutputData::Fp32(v) => json!(v),
            OutputData::Fp64(v) => json!(v),
            OutputData::Int64(v) => json!(v),
            OutputData::Bool(v) => json!(v),
        }
    }

    /// Little-endian bytes as the binary extension lays them out (BOOL: one byte each).
    fn bytes(&self) -> Vec<u8> {
        match self {
            OutputData::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::Fp64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::Int64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: OutputData,
}

/// An encoded response: the body, and the JSON header's length when binary data follows it
/// (to be sent as `Inference-Header-Content-Length`).
pub struct EncodedResponse {
    pub body: Vec<u8>,
    pub header_length: Option<usize>,
}

/// Encodes an infer response; `binary(name)` says which outputs go in binary form.
pub fn encode_response(
    model_name: &str,
    model_version: &str,
    id: Option<&Value>,
    outputs: &[Output],
    binary: impl Fn(&str) -> bool,
) -> EncodedResponse {
    let mut tail = Vec::new();
    let json_outputs: Vec<Value> = outputs
        .iter()
        .map(|o| {
            let mut v = json!({
                "name": o.name,
                "datatype": o.data.datatype(),
                "shape": o.shape,
            });
            if binary(&o.name) {
                let bytes = o.data.bytes();
                v["parameters"] = json!({ "binary_data_size": bytes.len() });
                tail.extend(bytes);
            } else {
                v["data"] = o.data.json();
            }
            v
        })
        .collect();
    let mut head = json!({
        "model_name": model_name,
        "model_version": model_version,
        "outputs": json_outputs,
    });
    if let Some(id) = id {
        head["id"] = id.clone();
    }
    let mut body = head.to_string().into_bytes();
    let header_length = if tail.is_empty() {
        None
    } else {
        let n = body.len();
        body.extend(tail);
        Some(n)
    };
    EncodedResponse {
        body,
        header_length,
    }
}
