//! What the daemon reads from a model file before anything else: the ONNX protobuf and the
//! bundle metadata JSON in it (a truncated or hand-edited bundle must be an error, not a
//! panic, at start-up and on hot reload).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let origin = std::path::Path::new("fuzz.onnx");
    if let Ok(meta) = csg_bundle::onnx::meta_from_bytes(data, origin) {
        // Metadata that parses must also survive the detector's consistency checks.
        let _ = csgd::detect::Detector::new(&meta, csgd::detect::ScoreKind::Combined);
    }
});
