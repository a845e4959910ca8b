//! HTTP helpers of the proxy tests: requests with any headers, raw HTTP/1.1 exchanges (for
//! headers a client library would not send), request bodies and noise images.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use super::{agent, parse, png};

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        parse(&String::from_utf8_lossy(&self.body))
    }
}

/// One request (GET without a body, POST/PUT with one) with extra headers.
pub fn send(url: &str, method: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let agent = agent();
    let result = match method {
        "GET" => {
            let mut r = agent.get(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
        _ => {
            let mut r = if method == "PUT" {
                agent.put(url)
            } else {
                agent.post(url)
            };
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.send(body)
        }
    };
    match result {
        Ok(mut r) => Reply {
            status: r.status().as_u16(),
            headers: r
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: r
                .body_mut()
                .with_config()
                .limit(u64::MAX)
                .read_to_vec()
                .unwrap_or_default(),
        },
        Err(e) => Reply {
            status: 0,
            headers: vec![],
            body: e.to_string().into_bytes(),
        },
    }
}

/// A raw HTTP/1.1 exchange (for headers an HTTP client library would not send); the request
/// must ask for `Connection: close`. Returns status, headers (lower-case names) and body.
pub fn raw(addr: &str, request: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, buf[split + 4..].to_vec())
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn multipart_named(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "proxy-test-boundary-91c2";
    let mut body = Vec::new();
    for (name, data) in parts {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\nContent-Type: image/png\r\n\r\n")
                .as_bytes(),
        );
        body.extend(*data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub fn noise_png(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let pixels: Vec<u8> = (0..784)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    png(&pixels)
}
