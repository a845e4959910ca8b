//! Finding the image(s) in a guarded request, as the route declares, and turning them into the
//! model's input tensors. Anything that does not hold what the route says is the client's
//! mistake and comes back as a 4xx [`ApiError`].

use axum::body::Bytes;
use axum::http::header;
use axum::http::request::Parts;
use serde_json::Value;

use crate::config::ImageSource;
use crate::http::ApiError;
use crate::http::input;
use crate::http::v2::input_tensors;
use crate::oip;

/// Limits that apply to a guarded request, as on the API.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_pixels: u64,
    pub max_images: usize,
    /// `threads.inline_decode_max_pixels`.
    pub inline_decode_max_pixels: u64,
}

/// The tensors of every image the request carries where `source` and `field` say.
pub async fn tensors(
    source: ImageSource,
    field: &str,
    parts: &Parts,
    bytes: Bytes,
    spec: &csg_bundle::InputSpec,
    limits: Limits,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let spec = spec.clone();
    let field = field.to_owned();
    match source {
        ImageSource::Raw => {
            if bytes.is_empty() {
                return Err(ApiError::malformed(
                    "empty request body: this route expects an image",
                ));
            }
            input::preprocess_encoded(
                vec![(bytes, content_type)],
                spec,
                limits.max_pixels,
                limits.inline_decode_max_pixels,
            )
            .await
        }
        ImageSource::Multipart => {
            let wanted = (!field.is_empty()).then_some(field.as_str());
            let images =
                input::multipart_images(parts.clone(), bytes, limits.max_images, wanted).await?;
            if images.is_empty() {
                return Err(ApiError::malformed(match wanted {
                    Some(f) => format!("the multipart body has no part named {f:?}"),
                    None => "the multipart body has no parts".to_owned(),
                }));
            }
            input::preprocess_encoded(
                images,
                spec,
                limits.max_pixels,
                limits.inline_decode_max_pixels,
            )
            .await
        }
        ImageSource::Json => {
            input::blocking(move || json_images(&bytes, &field, &spec, limits)).await
        }
        ImageSource::V2 => {
            let json_len = oip::header_length(
                parts.headers.get(oip::HEADER_LENGTH).map(|v| v.as_bytes()),
                bytes.len(),
            )
            .map_err(|e| ApiError::malformed(e.0))?;
            input::blocking(move || {
                let request =
                    oip::parse_request(&bytes, json_len).map_err(|e| ApiError::malformed(e.0))?;
                let input = request
                    .input(&field)
                    .map_err(|e| ApiError::malformed(e.0))?;
                input_tensors(input, &spec, limits.max_pixels, limits.max_images)
            })
            .await
        }
    }
}

/// The base64 image (or array of them) at JSON Pointer `pointer`.
fn json_images(
    bytes: &[u8],
    pointer: &str,
    spec: &csg_bundle::InputSpec,
    limits: Limits,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::malformed(format!("invalid JSON: {e}")))?;
    let found = value
        .pointer(pointer)
        .ok_or_else(|| ApiError::malformed(format!("the JSON body has nothing at {pointer:?}")))?;
    let items: Vec<&Value> = match found {
        Value::Array(items) => items.iter().collect(),
        one => vec![one],
    };
    input::preprocess_base64(
        items.into_iter(),
        spec,
        limits.max_pixels,
        limits.max_images,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use base64::Engine;

    fn spec() -> csg_bundle::InputSpec {
        csg_bundle::InputSpec {
            layout: "NCHW".into(),
            channels: 1,
            height: 4,
            width: 4,
            value_range: [0.0, 1.0],
            mean: vec![0.0],
            std: vec![1.0],
        }
    }

    fn png(value: u8) -> Vec<u8> {
        let img = image::GrayImage::from_pixel(4, 4, image::Luma([value]));
        let mut out = Vec::new();
        image::DynamicImage::ImageLuma8(img)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn parts(content_type: &str, extra: &[(&str, String)]) -> Parts {
        let mut b = Request::builder().header(header::CONTENT_TYPE, content_type);
        for (k, v) in extra {
            b = b.header(*k, v);
        }
        b.body(()).unwrap().into_parts().0
    }

    const LIMITS: Limits = Limits {
        max_pixels: 1 << 20,
        max_images: 4,
        inline_decode_max_pixels: 4096,
    };

    async fn run(
        source: ImageSource,
        field: &str,
        p: &Parts,
        body: Vec<u8>,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        tensors(source, field, p, Bytes::from(body), &spec(), LIMITS).await
    }

    #[tokio::test]
    async fn each_source_finds_its_images() {
        let b64 = |v| base64::engine::general_purpose::STANDARD.encode(png(v));
        let t = run(ImageSource::Raw, "", &parts("image/png", &[]), png(255))
            .await
            .unwrap();
        assert_eq!(t, vec![vec![1.0; 16]]);

        let json = serde_json::json!({"req": {"img": b64(0)}, "many": [b64(0), b64(255)]});
        let p = parts("application/json", &[]);
        let body = json.to_string().into_bytes();
        assert_eq!(
            run(ImageSource::Json, "/req/img", &p, body.clone())
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            run(ImageSource::Json, "/many", &p, body.clone())
                .await
                .unwrap()
                .len(),
            2
        );
        let e = run(ImageSource::Json, "/missing", &p, body)
            .await
            .unwrap_err();
        assert_eq!(e.status, 400);

        let boundary = "b0undary";
        let mut body = Vec::new();
        for (name, v) in [("meta", None), ("image", Some(255u8))] {
            body.extend(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                    .as_bytes(),
            );
            match v {
                Some(v) => body.extend(png(v)),
                None => body.extend(b"{}"),
            }
            body.extend(b"\r\n");
        }
        body.extend(format!("--{boundary}--\r\n").as_bytes());
        let p = parts(&format!("multipart/form-data; boundary={boundary}"), &[]);
        let t = run(ImageSource::Multipart, "image", &p, body.clone())
            .await
            .unwrap();
        assert_eq!(t, vec![vec![1.0; 16]]);
        let e = run(ImageSource::Multipart, "photo", &p, body)
            .await
            .unwrap_err();
        assert!(e.message.contains("no part named"), "{}", e.message);

        let v2 = serde_json::json!({"inputs": [{"name": "x", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": vec![0.5; 16]}]});
        let t = run(
            ImageSource::V2,
            "x",
            &parts("application/json", &[]),
            v2.to_string().into_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(t, vec![vec![0.5; 16]]);
        let e = run(
            ImageSource::V2,
            "y",
            &parts("application/json", &[]),
            v2.to_string().into_bytes(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[tokio::test]
    async fn garbage_is_the_clients_mistake() {
        let e = run(
            ImageSource::Raw,
            "",
            &parts("image/png", &[]),
            b"not a png".to_vec(),
        )
        .await
        .unwrap_err();
        assert!(e.status.is_client_error(), "{e:?}");
        let e = run(ImageSource::Raw, "", &parts("image/png", &[]), vec![])
            .await
            .unwrap_err();
        assert_eq!(e.status, 400);
        let e = run(
            ImageSource::Json,
            "/x",
            &parts("application/json", &[]),
            b"{".to_vec(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, 400);
    }
}
