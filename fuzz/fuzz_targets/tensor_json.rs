//! A raw tensor sent as JSON (`{"tensor": ...}` on `/v1`): any JSON value against the model's
//! input shape.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let spec = csg_bundle::InputSpec::grayscale(4, 4, 0.5, 0.25);
    let _ = csgd::preprocess::tensor_from_json(&value, &spec);
});
