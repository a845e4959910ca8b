//! The exporter's checkpoint readers: a torch.save archive (zip + pickle) of the official
//! code, and csg-train's safetensors. Both read from a path, so each input is written to a
//! temporary file first.

#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = tempfile::NamedTempFile::new() else {
        return;
    };
    if file.write_all(data).is_err() {
        return;
    }
    let path = file.path();
    let _ = csg_export::torch::read_torch(path);
    let _ = csg_export::safetensors_ckpt::read_csg(path);
});
