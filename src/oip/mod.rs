//! The Open Inference Protocol (KServe v2) wire format: inference requests and responses in
//! JSON, with Triton's binary tensor data extension.
//!
//! The extension matters because the official clients use it by default: Triton's
//! `InferInput.set_data_from_numpy` sends tensors as raw bytes after the JSON header (whose
//! length is the `Inference-Header-Content-Length` header, each input saying its
//! `binary_data_size`), and a request without `outputs` asks for every output in binary form
//! (`binary_data_output`). Both the `/v2` routes and the proxy's v2 guard parse requests here;
//! everything about images and models is left to them.

mod response;

pub use response::{EncodedResponse, Output, OutputData, encode_response};

use serde::Deserialize;
use serde_json::{Map, Value};

/// Header giving the length of the JSON part of a body that carries binary tensor data.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// A request the protocol cannot accept (answered 400 with `{"error": …}`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct OipError(pub String);

fn err(message: impl Into<String>) -> OipError {
    OipError(message.into())
}

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RawInput>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
struct RawInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// An input's values, decoded from JSON or binary form.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Fp32(Vec<f32>),
    /// One byte string per element (encoded images, for csgd).
    Bytes(Vec<Vec<u8>>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// An output the client asked for, and whether it wants it in binary form (`None`: the
/// request's default).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    pub binary: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub id: Option<Value>,
    pub inputs: Vec<Input>,
    /// `None`: every output.
    pub outputs: Option<Vec<RequestedOutput>>,
    /// `parameters.binary_data_output`: binary form for outputs that do not say.
    pub binary_output: bool,
}

impl InferRequest {
    /// Whether output `name` goes in binary form.
    pub fn wants_binary(&self, name: &str) -> bool {
        self.outputs
            .iter()
            .flatten()
            .find(|o| o.name == name)
            .and_then(|o| o.binary)
            .unwrap_or(self.binary_output)
    }

    /// The input called `name`, or the only input when `name` is empty.
    pub fn input(&self, name: &str) -> Result<&Input, OipError> {
        if name.is_empty() {
            return match self.inputs.as_slice() {
                [only] => Ok(only),
                [] => Err(err("the request has no inputs")),
                _ => Err(err(format!(
                    "expected one input, got {}: {:?}",
                    self.inputs.len(),
                    self.inputs
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                ))),
            };
        }
        self.inputs
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| err(format!("the request has no input named {name:?}")))
    }
}

/// The length of the JSON part, from the `Inference-Header-Content-Length` header value.
pub fn header_length(value: Option<&[u8]>, body_len: usize) -> Result<Option<usize>, OipError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let n: usize = std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| err("Inference-Header-Content-Length must be a byte count"))?;
    if n > body_len {
        return Err(err(format!(
            "Inference-Header-Content-Length is {n}, but the body has only {body_len} bytes"
        )));
    }
    Ok(Some(n))
}

/// Parses an infer request: the JSON header (`json_len` bytes of `body`, or all of it) and the
/// binary tensor data after it.
pub fn parse_request(body: &[u8], json_len: Option<usize>) -> Result<InferRequest, OipError> {
    let split = json_len.unwrap_or(body.len()).min(body.len());
    let (header, mut binary) = body.split_at(split);
    let raw: RawRequest = serde_json::from_slice(header)
        .map_err(|e| err(format!("invalid inference request JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(raw.inputs.len());
    for input in raw.inputs {
        inputs.push(parse_input(input, &mut binary)?);
    }
    if !binary.is_empty() {
        return Err(err(format!(
            "{} bytes of binary data follow the JSON but no input claims them (binary_data_size)",
            binary.len()
        )));
    }
    let parameters = raw.parameters.unwrap_or_default();
    if parameters.contains_key("classification") {
        return Err(err("the classification extension is not supported"));
    }
    let binary_output = bool_parameter(&parameters, "binary_data_output")?.unwrap_or(false);
    let outputs = match raw.outputs {
        None => None,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for o in list {
                let p = o.parameters.unwrap_or_default();
                if p.contains_key("classification") {
                    return Err(err(format!(
                        "output {:?}: the classification extension is not supported",
                        o.name
                    )));
                }
                let binary = bool_parameter(&p, "binary_data")?;
                out.push(RequestedOutput {
                    name: o.name,
                    binary,
                });
            }
            Some(out)
        }
    };
    Ok(InferRequest {
        id: raw.id,
        inputs,
        outputs,
        binary_output,
    })
}

fn bool_parameter(p: &Map<String, Value>, key: &str) -> Result<Option<bool>, OipError> {
    match p.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(err(format!(
            "parameter {key:?} must be true or false, not {other}"
        ))),
    }
}

/// Largest element count of one input; far above any image batch, it keeps a malicious shape
/// from turning into a huge allocation before the data is checked.
const MAX_ELEMENTS: usize = 1 << 28;

fn parse_input(raw: RawInput, binary: &mut &[u8]) -> Result<Input, OipError> {
    let name = raw.name;
    let mut shape = Vec::with_capacity(raw.shape.len());
    for d in &raw.shape {
        let d = usize::try_from(*d).map_err(|_| {
            err(format!(
                "input {name:?}: shape {:?} has a negative dimension",
                raw.shape
            ))
        })?;
        shape.push(d);
    }
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            err(format!(
                "input {name:?}: shape {:?} is too large",
                raw.shape
            ))
        })?;
    let params = raw.parameters.unwrap_or_default();
    let binary_size = match params.get("binary_data_size") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    err(format!(
                        "input {name:?}: binary_data_size must be a byte count"
                    ))
                })?,
        ),
    };
    let data = match (binary_size, raw.data) {
        (Some(_), Some(_)) => {
            return Err(err(format!(
                "input {name:?} has both \"data\" and binary_data_size; send one"
            )));
        }
        (Some(size), None) => {
            if size > binary.len() {
                return Err(err(format!(
                    "input {name:?}: binary_data_size {size} exceeds the {} bytes left in the body",
                    binary.len()
                )));
            }
            let (mine, rest) = binary.split_at(size);
            *binary = rest;
            decode_binary(&name, &raw.datatype, mine, count)?
        }
        (None, Some(data)) => decode_json(&name, &raw.datatype, &data, count)?,
        (None, None) => {
            return Err(err(format!(
                "input {name:?} has no \"data\" and no binary_data_size"
            )));
        }
    };
    Ok(Input { name, shape, data })
}

fn unsupported(name: &str, datatype: &str) -> OipError {
    err(format!(
        "input {name:?}: datatype {datatype} is not supported; send FP32 in the model's shape or BYTES holding encoded images"
    ))
}

fn decode_binary(
    name: &str,
    datatype: &str,
    bytes: &[u8],
    count: usize,
) -> Result<TensorData, OipError> {
    match datatype {
        "FP32" => {
            if bytes.len() != count * 4 {
                return Err(err(format!(
                    "input {name:?}: {} bytes of FP32 data for {count} elements (need {})",
                    bytes.len(),
                    count * 4
                )));
            }
            let values = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(TensorData::Fp32(values))
        }
        "BYTES" => {
            // Each element: a 4-byte little-endian length, then that many bytes.
            let mut items = Vec::with_capacity(count.min(1024));
            let mut rest = bytes;
            while !rest.is_empty() {
                let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                    return Err(err(format!(
                        "input {name:?}: truncated BYTES element length"
                    )));
                };
                let len = u32::from_le_bytes(*len) as usize;
                if len > tail.len() {
                    return Err(err(format!(
                        "input {name:?}: a BYTES element runs past the data"
                    )));
                }
                let (item, tail) = tail.split_at(len);
                items.push(item.to_vec());
                rest = tail;
            }
            if items.len() != count {
                return Err(err(format!(
                    "input {name:?}: {} BYTES elements for shape of {count}",
                    items.len()
                )));
            }
            Ok(TensorData::Bytes(items))
        }
        other => Err(unsupported(name, other)),
    }
}

/// JSON data, flat or nested in row-major order.
fn decode_json(
    name: &str,
    datatype: &str,
    data: &Value,
    count: usize,
) -> Result<TensorData, OipError> {
    let mut leaves = Vec::new();
    collect_leaves(data, &mut leaves, count).map_err(|()| {
        err(format!(
            "input {name:?}: more data than its shape holds ({count})"
        ))
    })?;
    if leaves.len() != count {
        return Err(err(format!(
            "input {name:?}: {} values for a shape of {count} elements",
            leaves.len()
        )));
    }
    match datatype {
        "FP32" => {
            let mut values = Vec::with_capacity(count);
            for v in leaves {
                let x = v
                    .as_f64()
                    .ok_or_else(|| err(format!("input {name:?}: {v} is not a number (FP32)")))?;
                values.push(x as f32);
            }
            Ok(TensorData::Fp32(values))
        }
        "BYTES" => {
            let mut items = Vec::with_capacity(count);
            for v in leaves {
                let s = v.as_str().ok_or_else(|| {
                    err(format!(
                        "input {name:?}: BYTES elements in JSON must be strings (base64 images)"
                    ))
                })?;
                items.push(s.as_bytes().to_vec());
            }
            Ok(TensorData::Bytes(items))
        }
        other => Err(unsupported(name, other)),
    }
}

fn collect_leaves<'a>(v: &'a Value, out: &mut Vec<&'a Value>, max: usize) -> Result<(), ()> {
    match v {
        Value::Array(items) => {
            for item in items {
                collect_leaves(item, out, max)?;
            }
            Ok(())
        }
        leaf => {
            if out.len() == max {
                return Err(());
            }
            out.push(leaf);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_inputs_flat_or_nested() {
        let body = br#"{"id":"7","inputs":[{"name":"image","shape":[1,2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}]}"#;
        let r = parse_request(body, None).unwrap();
        assert_eq!(r.id, Some(json!("7")));
        assert_eq!(r.inputs[0].shape, vec![1, 2, 2]);
        assert_eq!(r.inputs[0].data, TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.5]));
        assert!(r.outputs.is_none() && !r.binary_output);
        assert_eq!(r.input("").unwrap().name, "image");
        assert!(r.input("other").is_err());
    }

    #[test]
    fn binary_inputs_follow_the_header() {
        let head = br#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"b","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":11}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = head.to_vec();
        body.extend(1.5f32.to_le_bytes());
        body.extend((-2f32).to_le_bytes());
        body.extend(3u32.to_le_bytes());
        body.extend(b"png");
        body.extend(0u32.to_le_bytes());
        let r = parse_request(&body, Some(head.len())).unwrap();
        assert_eq!(r.inputs[0].data, TensorData::Fp32(vec![1.5, -2.0]));
        assert_eq!(
            r.inputs[1].data,
            TensorData::Bytes(vec![b"png".to_vec(), vec![]])
        );
        assert!(r.binary_output && r.wants_binary("anything"));
        assert!(r.input("").is_err(), "two inputs need a name");
    }

    #[test]
    fn shape_and_datatype_errors_say_what_is_wrong() {
        let cases: [(&str, &str); 7] = [
            (
                r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#,
                "2 values",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1,2]}]}"#,
                "more data",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#,
                "negative",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[1]}]}"#,
                "INT8 is not supported",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
                "not a number",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
                "no \"data\"",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[4294967296,4294967296],"datatype":"FP32","data":[]}]}"#,
                "too large",
            ),
        ];
        for (body, want) in cases {
            let e = parse_request(body.as_bytes(), None).unwrap_err().0;
            assert!(e.contains(want), "{body}: {e}");
        }
        let head = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = head.to_vec();
        body.extend([0u8; 4]);
        assert!(
            parse_request(&body, Some(head.len()))
                .unwrap_err()
                .0
                .contains("exceeds")
        );
        assert!(header_length(Some(b"x"), 10).is_err());
        assert!(header_length(Some(b"11"), 10).is_err());
        assert_eq!(header_length(Some(b"10"), 10).unwrap(), Some(10));
    }

    #[test]
    fn responses_in_json_and_binary() {
        let outputs = vec![
            Output {
                name: "score".into(),
                shape: vec![2],
                data: OutputData::Fp64(vec![0.5, 1.0]),
            },
            Output {
                name: "flag".into(),
                shape: vec![2],
                data: OutputData::Bool(vec![true, false]),
            },
        ];
        let plain = encode_response("m", "1", Some(&json!("id")), &outputs, |_| false);
        assert!(plain.header_length.is_none());
        let v: Value = serde_json::from_slice(&plain.body).unwrap();
        assert_eq!(v["id"], "id");
        assert_eq!(v["outputs"][1]["data"], json!([true, false]));
        let bin = encode_response("m", "1", None, &outputs, |n| n == "flag");
        let n = bin.header_length.unwrap();
        let v: Value = serde_json::from_slice(&bin.body[..n]).unwrap();
        assert_eq!(v["outputs"][1]["parameters"]["binary_data_size"], 2);
        assert_eq!(v["outputs"][0]["data"], json!([0.5, 1.0]));
        assert_eq!(&bin.body[n..], &[1, 0]);
    }
}
