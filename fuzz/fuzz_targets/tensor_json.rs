//! A raw tensor sent as JSON (`{"tensor": ...}` on `/v1`): any JSON value against the model's
//! input shape.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let spec = csg_bundle::InputSpec {
        layout: "NCHW".into(),
        channels: 1,
        height: 4,
        width: 4,
        value_range: [0.0, 1.0],
        mean: vec![0.5],
        std: vec![0.25],
    };
    let _ = csgd::preprocess::tensor_from_json(&value, &spec);
});
