//! Every way a request body reaches the image decoder: a raw PNG/JPEG body, a multipart
//! part, base64 behind a JSON Pointer, an Open Inference Protocol request (JSON and binary
//! tensors). The first byte picks the form and its headers; the rest is the body. The sidecar
//! proxy's extractor runs all of them through the same code as `/v1` and `/v2`.

#![no_main]

use std::sync::LazyLock;

use axum::http::{Request, header};
use bytes::Bytes;
use csgd::config::ImageSource;
use csgd::proxy::extract::{Limits, tensors};
use libfuzzer_sys::fuzz_target;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime")
});

fn spec() -> csg_bundle::InputSpec {
    csg_bundle::InputSpec::grayscale(28, 28, 0.286, 0.353)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let (source, content_type, field) = match selector % 8 {
        0 => (ImageSource::Raw, "image/png", ""),
        1 => (ImageSource::Raw, "image/jpeg", ""),
        2 => (ImageSource::Raw, "", ""),
        3 => (
            ImageSource::Multipart,
            "multipart/form-data; boundary=b",
            "",
        ),
        4 => (
            ImageSource::Multipart,
            "multipart/form-data; boundary=b",
            "image",
        ),
        5 => (ImageSource::Json, "application/json", "/image"),
        6 => (ImageSource::V2, "application/json", ""),
        _ => (ImageSource::V2, "application/octet-stream", "input"),
    };
    let mut request = Request::builder().method("POST").uri("/predict");
    if !content_type.is_empty() {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    if selector & 0x80 != 0 {
        // The binary tensor extension: a JSON header of some length, tensor bytes after it.
        let length = body.len() / usize::from(1 + ((selector >> 3) & 0x7));
        request = request.header(csgd::oip::HEADER_LENGTH, length.to_string());
    }
    let Ok(request) = request.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let limits = Limits {
        max_pixels: 1 << 20,
        max_images: 8,
    };
    let _ = RUNTIME.block_on(tensors(
        source,
        field,
        &parts,
        Bytes::copy_from_slice(body),
        &spec(),
        limits,
    ));
});
