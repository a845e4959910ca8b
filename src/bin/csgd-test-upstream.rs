//! A small upstream HTTP server for the proxy's integration tests (`tests/proxy.rs`): the
//! "production classifier" csgd sits in front of. It echoes, logs what it received, and can be
//! slow or reset connections on demand, so the tests see what really crossed the wire. Not
//! part of the daemon.
//!
//! Usage: `csgd-test-upstream [ADDR]` (default `127.0.0.1:0`); prints
//! `upstream listening on http://ADDR` once bound.
//!
//! - `GET /_upstream/log`: every request received so far, as JSON (method, uri, headers, body
//!   length and FNV-1a hash, number of the connection it came on); not logged itself.
//! - `/reset…`: the connection is reset (TCP RST) without an answer.
//! - `GET /blob?bytes=N`: N bytes `i % 251`, streamed in 64 KiB frames.
//! - anything else: the body echoed with its Content-Type; `?status=NNN` sets the status,
//!   `?delay_ms=N` waits first, `?hop=1` adds hop-by-hop headers to the answer.

use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

type Log = Arc<Mutex<Vec<Value>>>;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("upstream listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let log: Log = Arc::default();
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(serve(stream, Arc::clone(&log)));
    }
}

/// Connections accepted so far.
static CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Serves one connection (HTTP/1.1 keep-alive).
async fn serve(stream: TcpStream, log: Log) {
    let conn = CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1;
    // A second handle on the socket, to ask for a reset from inside a request.
    let control = stream
        .into_std()
        .and_then(|s| Ok((s.try_clone()?, s)))
        .and_then(|(ctl, s)| Ok((TcpStream::from_std(ctl)?, TcpStream::from_std(s)?)));
    let Ok((control, stream)) = control else {
        return;
    };
    let control = Arc::new(control);
    let service = service_fn(move |req| handle(req, Arc::clone(&log), Arc::clone(&control), conn));
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset requested")
    }
}

impl std::error::Error for Reset {}

type Reply = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

async fn handle(
    req: Request<Incoming>,
    log: Log,
    control: Arc<TcpStream>,
    conn: usize,
) -> Result<Reply, Reset> {
    let path = req.uri().path().to_owned();
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let param = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    if path == "/_upstream/log" {
        let body = Value::Array(log.lock().map(|l| l.clone()).unwrap_or_default()).to_string();
        return Ok(reply(StatusCode::OK, "application/json", Bytes::from(body)));
    }
    if path.starts_with("/reset") {
        // Zero linger: closing the socket sends RST instead of FIN. Failing the service makes
        // hyper drop the connection without answering.
        let _ = control.set_zero_linger();
        return Err(Reset);
    }
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let headers: Vec<Value> = req
        .headers()
        .iter()
        .map(|(k, v)| json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())]))
        .collect();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let seq = {
        let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
        l.push(json!({
            "method": method,
            "uri": uri,
            "headers": headers,
            "body_len": body.len(),
            "fnv": format!("{:016x}", fnv1a(&body)),
            "conn": conn,
        }));
        l.len()
    };
    if let Some(ms) = param("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if path == "/blob" {
        let n = param("bytes").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut r = Response::new(Blob { left: n, pos: 0 }.boxed());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/octet-stream"),
        );
        return Ok(r);
    }
    let status = param("status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut r = reply(status, &content_type, body);
    let h = r.headers_mut();
    if let Ok(v) = hyper::header::HeaderValue::from_str(&seq.to_string()) {
        h.insert("x-upstream-seq", v);
    }
    if param("hop").is_some() {
        for (k, v) in [
            ("connection", "x-hop-test"),
            ("x-hop-test", "1"),
            ("keep-alive", "timeout=30"),
            ("x-end-to-end", "1"),
        ] {
            if let (Ok(k), Ok(v)) = (
                hyper::header::HeaderName::from_bytes(k.as_bytes()),
                hyper::header::HeaderValue::from_str(v),
            ) {
                h.insert(k, v);
            }
        }
    }
    Ok(r)
}

fn reply(status: StatusCode, content_type: &str, body: Bytes) -> Reply {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// FNV-1a, 64 bits: a cheap fingerprint of what arrived (the tests compute the same).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `left` more bytes of the pattern `i % 251`, in 64 KiB frames, length unknown to the client.
struct Blob {
    left: usize,
    pos: usize,
}

impl Body for Blob {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(64 << 10);
        let start = self.pos;
        let chunk: Vec<u8> = (start..start + n).map(|i| (i % 251) as u8).collect();
        self.left -= n;
        self.pos += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
