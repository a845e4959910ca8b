//! The Open Inference Protocol parser alone: the JSON header, its length header, and the
//! binary tensor data after it, then every input's conversion to the model's tensors.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    // Odd selectors send the binary extension's length header, some fraction of the body.
    let declared =
        (selector & 1 == 1).then(|| ((body.len() * usize::from(selector >> 1)) / 128).to_string());
    match csgd::oip::header_length(declared.as_deref().map(str::as_bytes), body.len()) {
        Ok(json_len) => {
            let _ = csgd::oip::parse_request(body, json_len);
        }
        Err(_) => {
            let _ = csgd::oip::parse_request(body, None);
        }
    }
});
