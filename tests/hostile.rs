//! Hostile inputs against the real daemon, beyond the everyday client mistakes of
//! `tests/errors.rs`: corrupted image internals, image kinds that must be converted, JSON built
//! to exhaust the parser or the arithmetic, and path tricks in model names. Each gets a clear
//! answer and the daemon keeps serving.

mod common;

use std::io::Cursor;

use image::{DynamicImage, ImageFormat};
use serde_json::json;

use common::http::raw;
use common::{Daemon, fashion_test, parse, png};

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

#[test]
fn corrupted_and_unusual_images() {
    let d = Daemon::start(&[], &[]);
    let (images, _) = fashion_test(1);
    let pixels = &images[0];
    let good = png(pixels);
    let (status, text) = d.post("/v1/detect", "image/png", &good);
    assert_eq!(status, 200, "{text}");
    let class = parse(&text)["class_id"].clone();

    // The first IDAT chunk: its length, its data, and the CRC after it.
    let idat = find(&good, b"IDAT");
    let len = u32::from_be_bytes(good[idat - 4..idat].try_into().unwrap()) as usize;
    let mut bad_crc = good.clone();
    bad_crc[idat + 4 + len] ^= 0xff;
    let truncated_scanlines = good[..idat + 4 + len / 2].to_vec();
    let gray =
        DynamicImage::ImageLuma8(image::GrayImage::from_raw(28, 28, pixels.clone()).unwrap());
    let jpeg = encode(gray.clone(), ImageFormat::Jpeg);
    let mut bad_huffman = jpeg.clone();
    let dht = find(&jpeg, &[0xff, 0xc4]);
    for b in &mut bad_huffman[dht + 5..dht + 21] {
        *b = 0xff;
    }
    for (what, body, content_type) in [
        ("PNG with a bad CRC", bad_crc, "image/png"),
        (
            "PNG cut inside its image data",
            truncated_scanlines,
            "image/png",
        ),
    ] {
        let (status, text) = d.post("/v1/detect", content_type, &body);
        assert_eq!(status, 422, "{what}: {text}");
        assert_eq!(parse(&text)["kind"], "undecodable_image", "{what}");
    }
    // Broken Huffman code lengths: refused, never a 5xx.
    let (status, text) = d.post("/v1/detect", "image/jpeg", &bad_huffman);
    assert_eq!(status, 422, "JPEG with broken Huffman tables: {text}");

    // 16-bit grayscale and RGBA (alpha) are converted: same class as the 8-bit original.
    let wide: Vec<u16> = pixels.iter().map(|&p| u16::from(p) * 257).collect();
    let gray16 = DynamicImage::ImageLuma16(image::ImageBuffer::from_raw(28, 28, wide).unwrap());
    let rgba = DynamicImage::ImageRgba8(gray.to_rgba8());
    for (what, body) in [
        ("16-bit grayscale", encode(gray16, ImageFormat::Png)),
        ("RGBA", encode(rgba, ImageFormat::Png)),
    ] {
        let (status, text) = d.post("/v1/detect", "image/png", &body);
        assert_eq!(status, 200, "{what}: {text}");
        assert_eq!(parse(&text)["class_id"], class, "{what}");
    }

    // Fixtures made by tests/data/hostile/make.py from the same test image. A CMYK JPEG is
    // converted; an animated PNG (its second frame another garment) is refused, since a client
    // that shows another frame would see an image csgd never judged.
    let cmyk = std::fs::read(hostile_fixture("cmyk.jpg")).unwrap();
    let (status, text) = d.post("/v1/detect", "image/jpeg", &cmyk);
    assert_eq!(status, 200, "CMYK JPEG: {text}");
    assert_eq!(parse(&text)["class_id"], class, "CMYK JPEG");
    let animated = std::fs::read(hostile_fixture("animated.png")).unwrap();
    let (status, text) = d.post("/v1/detect", "image/png", &animated);
    assert_eq!(status, 422, "APNG: {text}");
    assert_eq!(parse(&text)["kind"], "animated_image", "APNG");
    assert!(
        parse(&text)["error"]
            .as_str()
            .unwrap()
            .contains("single still frame"),
        "{text}"
    );
    assert_eq!(d.get("/health/ready").0, 200);
}

fn hostile_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hostile")
        .join(name)
}

#[test]
fn hostile_json_and_model_names() {
    let d = Daemon::start(&[], &[]);
    // 100,000 nested arrays: the parser's depth limit answers, the stack holds.
    let deep = format!(
        "{{\"tensor\": {}0{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let (status, text) = d.post("/v1/detect", "application/json", deep.as_bytes());
    assert_eq!(status, 400, "{text}");
    assert_eq!(parse(&text)["kind"], "malformed");

    // Beyond f64, and finite but absurd for normalised pixels.
    let row = |v: &str| format!("[{}]", vec![v; 28].join(","));
    let plane = |v: &str| format!("[{}]", vec![row(v); 28].join(","));
    let (status, text) = d.post(
        "/v1/detect",
        "application/json",
        format!("{{\"tensor\": [{}]}}", plane("1e999")).as_bytes(),
    );
    assert_eq!(status, 400, "1e999: {text}");
    let huge = json!({ "tensor": vec![vec![vec![1e30f64; 28]; 28]; 1] });
    let (status, body) = d.post_json("/v1/detect", &huge);
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["kind"], "wrong_shape");
    assert!(body["error"].as_str().unwrap().contains("within"), "{body}");

    // Model names that try to leave their path segment.
    let addr = d.base.trim_start_matches("http://").to_owned();
    for path in [
        "/v1/models/..%2F..%2Fetc%2Fpasswd/detect",
        "/v1/models/%2e%2e/detect",
        "/v1/models/fashion-csg%00/detect",
        "/v1/models/fashion-csg/../fashion-csg/detect",
        "/v2/models/..%2Ffashion-csg/infer",
    ] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let (status, _, body) = raw(&addr, request.as_bytes());
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
    }

    // Multipart without any part, and with a part that is not an image.
    let boundary = "b0undary";
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let empty = format!("--{boundary}--\r\n");
    let (status, text) = d.post("/v1/detect", &content_type, empty.as_bytes());
    assert_eq!(status, 400, "{text}");
    let text_part = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    );
    let (status, text) = d.post("/v1/detect", &content_type, text_part.as_bytes());
    assert!(matches!(status, 415 | 422), "{status} {text}");
    assert_eq!(d.get("/health/ready").0, 200);
}
