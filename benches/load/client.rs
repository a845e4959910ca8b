//! A minimal HTTP/1.1 load generator on raw keep-alive TCP connections: closed-loop
//! saturation, open-loop fixed-rate latency, and idle connections.
//!
//! Hand-written rather than an HTTP client library so that the client's own cost per request
//! stays small and known (one write, one parse of the status line and Content-Length): it
//! shares the machine with the daemon under test. It runs on a single-threaded tokio runtime
//! for the same reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::episodes::{self, TailEpisodes};

/// Writes all of `buf` (tokio's `try_write` under readiness: the `io-util` extension traits
/// are not among the daemon's tokio features, and enabling them here would rebuild its
/// dependencies for the benchmarks).
pub async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what is available (at least one byte, or 0 at end of stream).
pub async fn read(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// One prepared request body and its HTTP bytes.
pub struct Request {
    bytes: Vec<u8>,
}

impl Request {
    pub fn post(path: &str, content_type: &str, body: &[u8]) -> Self {
        let mut bytes = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        Self { bytes }
    }
}

/// One POST of each PNG to `path`, in order.
pub fn png_posts(pngs: &[Vec<u8>], path: &str) -> Arc<Vec<Request>> {
    Arc::new(
        pngs.iter()
            .map(|p| Request::post(path, "image/png", p))
            .collect(),
    )
}

/// A keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where the last answer's body lies in `buf`.
    body: std::ops::Range<usize>,
}

impl Conn {
    pub async fn open(addr: std::net::SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.context("connecting")?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(8192),
            body: 0..0,
        })
    }

    /// Sends the request and reads the whole answer; returns the status code.
    pub async fn call(&mut self, req: &Request) -> Result<u16> {
        write_all(&self.stream, &req.bytes).await?;
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        let (head_end, status, length) = loop {
            let n = read(&self.stream, &mut chunk).await?;
            if n == 0 {
                bail!("connection closed by the server");
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).context("response head")?;
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .context("status line")?;
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .context("no Content-Length in the answer")?;
                break (end + 4, status, length);
            }
        };
        while self.buf.len() < head_end + length {
            let n = read(&self.stream, &mut chunk).await?;
            if n == 0 {
                bail!("connection closed mid-answer");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.body = head_end..head_end + length;
        Ok(status)
    }

    /// The `timings` of the last answer (csgd's own time for the request, from the
    /// handler's start to the answer built, and its queue and inference parts), when it has
    /// them.
    pub fn server_timings(&self) -> Option<ServerTimings> {
        let micros = |key| self.number(key).map(Duration::from_micros);
        Some(ServerTimings {
            total: micros(b"\"total_us\":")?,
            queue: micros(b"\"queue_us\":")?,
            inference: micros(b"\"inference_us\":")?,
            batch_size: usize::try_from(self.number(b"\"batch_size\":")?).ok()?,
        })
    }

    /// The unsigned integer after `key` in the answer's body.
    fn number(&self, key: &[u8]) -> Option<u64> {
        let body = self.buf.get(self.body.clone())?;
        let at = find(body, key)? + key.len();
        let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&body[at..at + digits])
            .ok()?
            .parse()
            .ok()
    }
}

/// What an answer's `timings` say of its request.
#[derive(Debug, Clone, Copy)]
pub struct ServerTimings {
    pub total: Duration,
    pub queue: Duration,
    pub inference: Duration,
    /// Images in the batch the request ran in.
    pub batch_size: usize,
}

/// p50, p90 and p99 (ms) of csgd's own timings over a run's answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerPercentiles {
    /// `timings.total_us`: from the handler's start to the answer built.
    pub total_ms: [f64; 3],
    /// `timings.queue_us`: from the batching queue to the start of the ONNX Runtime call.
    pub queue_ms: [f64; 3],
    /// `timings.inference_us`: that call.
    pub inference_ms: [f64; 3],
    /// The same call split by the size of the batch it ran (sizes with at least 1 % of the
    /// answers): whether a slow call is a large batch or a slow run of a small one.
    pub inference_by_batch: Vec<BatchInference>,
}

/// [`ServerPercentiles::inference_by_batch`] for one batch size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchInference {
    pub batch_size: usize,
    /// Share of the answers that ran in batches of this size.
    pub share: f64,
    pub inference_ms: [f64; 3],
}

impl ServerPercentiles {
    fn of(timings: &[ServerTimings]) -> Self {
        let of = |f: fn(&ServerTimings) -> Duration| p50_p90_p99(timings.iter().map(f).collect());
        let mut by_size: std::collections::BTreeMap<usize, Vec<Duration>> = Default::default();
        for t in timings {
            by_size.entry(t.batch_size).or_default().push(t.inference);
        }
        let inference_by_batch = by_size
            .into_iter()
            .map(|(batch_size, v)| BatchInference {
                batch_size,
                share: v.len() as f64 / timings.len() as f64,
                inference_ms: p50_p90_p99(v),
            })
            .filter(|b| b.share >= 0.01)
            .collect();
        Self {
            total_ms: of(|t| t.total),
            queue_ms: of(|t| t.queue),
            inference_ms: of(|t| t.inference),
            inference_by_batch,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What a load run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    /// Successful answers per second.
    pub rps: f64,
    pub ok: u64,
    pub errors: u64,
    /// Latency percentiles in milliseconds (from the scheduled send time in open loop).
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// The same percentiles of csgd's own timings, where every answer carries them
    /// (fixed-rate runs): how much of the latency is spent inside its handler rather than in
    /// the kernel, the HTTP I/O or the load generator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerPercentiles>,
    /// Fixed-rate runs: how the slowest 1 % of answers bunch in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tail: Option<TailEpisodes>,
}

/// The `q` quantile of sorted latencies, in milliseconds.
pub fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// p50, p90 and p99 of `values`, in milliseconds.
fn p50_p90_p99(mut values: Vec<Duration>) -> [f64; 3] {
    values.sort_unstable();
    [0.5, 0.9, 0.99].map(|q| percentile(&values, q))
}

fn summarise(mut lat: Vec<Duration>, errors: u64, elapsed: Duration) -> Run {
    lat.sort_unstable();
    Run {
        rps: lat.len() as f64 / elapsed.as_secs_f64(),
        ok: lat.len() as u64,
        errors,
        p50_ms: percentile(&lat, 0.50),
        p90_ms: percentile(&lat, 0.90),
        p99_ms: percentile(&lat, 0.99),
        server: None,
        tail: None,
    }
}

/// `conns` connections each send requests back to back for `secs` (after `warmup`).
pub async fn closed_loop(
    addr: std::net::SocketAddr,
    requests: Arc<Vec<Request>>,
    conns: usize,
    warmup: Duration,
    secs: Duration,
) -> Result<Run> {
    let start = Instant::now() + warmup;
    let end = start + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let requests = Arc::clone(&requests);
        tasks.spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let (mut lat, mut errors, mut i) = (Vec::new(), 0u64, c);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let status = conn.call(&requests[i % requests.len()]).await?;
                i += conns;
                if sent >= start {
                    if status == 200 {
                        lat.push(sent.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            anyhow::Ok((lat, errors))
        });
    }
    gather(tasks, secs).await
}

/// What one scheduled request got: its status, or `None` when the connection failed (refused,
/// reset, closed before the answer), and its latency.
pub struct Answer {
    /// When it was scheduled, from the run's first request.
    pub due: Duration,
    pub status: Option<u16>,
    pub latency: Duration,
    /// [`Conn::server_timings`] of the answer.
    pub server: Option<ServerTimings>,
}

/// How [`scheduled`] times its sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pacing {
    /// tokio's timer: its wheel ticks once a millisecond, so every slot due within a tick is
    /// released on it, and at thousands of requests per second they arrive a few at once.
    /// The default: on this two-core machine it disturbs the daemon least (the tiny model at
    /// half load, six alternating rounds against `thread`: p99 ÷ p50 2.17–3.16 against
    /// 2.97–5.03, and a lower p50 inside csgd).
    #[default]
    Timer,
    /// A pacing thread sleeping on the kernel's high-resolution timer (tens of microseconds of
    /// slack) releases each slot at its time, so requests arrive evenly spaced. It wakes the
    /// client once per request instead of once per millisecond, which costs a shared machine
    /// more than the bursts do; for a machine with cores to spare.
    Thread,
}

/// Requests at a fixed `rate` per second for `secs`, spread over `conns` connections (each
/// takes every conns-th slot of the schedule), timed by `pacing`. When the connection was
/// still busy at a request's scheduled time, its latency counts from that time, so a slow
/// answer that delays the next send is charged to it (no coordinated omission); otherwise
/// from the moment it is sent, so the pacing's own wake-up delay is not charged to the
/// daemon. A failed connection is recorded and reopened for the next slot.
pub async fn scheduled(
    addr: std::net::SocketAddr,
    requests: Arc<Vec<Request>>,
    conns: usize,
    rate: f64,
    secs: Duration,
    pacing: Pacing,
) -> Result<Vec<Answer>> {
    let start = Instant::now() + Duration::from_millis(200);
    let total = (rate * secs.as_secs_f64()).round() as usize;
    let due = move |slot: usize| start + Duration::from_secs_f64(slot as f64 / rate);
    let conns = conns.min(total.max(1));
    let mut releases: Vec<Option<mpsc::UnboundedReceiver<()>>> = Vec::with_capacity(conns);
    if pacing == Pacing::Thread {
        let mut senders = Vec::with_capacity(conns);
        for _ in 0..conns {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            releases.push(Some(rx));
        }
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                for slot in 0..total {
                    let wait = due(slot).saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                    // A closed channel is a connection task that ended early: nothing to pace.
                    let _ = senders[slot % conns].send(());
                }
            })
            .context("starting the pacing thread")?;
    } else {
        releases.resize_with(conns, || None);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (c, mut release) in releases.into_iter().enumerate() {
        let requests = Arc::clone(&requests);
        tasks.spawn(async move {
            let mut conn: Option<Conn> = None;
            let mut answers = Vec::new();
            for slot in (c..total).step_by(conns) {
                let due = due(slot);
                let late = Instant::now() > due;
                match release.as_mut() {
                    Some(release) => {
                        if release.recv().await.is_none() {
                            break;
                        }
                    }
                    None => tokio::time::sleep_until(due.into()).await,
                }
                let from = if late { due } else { Instant::now() };
                if conn.is_none() {
                    conn = Conn::open(addr).await.ok();
                }
                let status = match conn.as_mut() {
                    Some(open) => open.call(&requests[slot % requests.len()]).await.ok(),
                    None => None,
                };
                let latency = from.elapsed();
                let server = conn.as_ref().and_then(Conn::server_timings);
                if status.is_none() {
                    conn = None;
                }
                answers.push(Answer {
                    due: due.duration_since(start),
                    status,
                    latency,
                    server,
                });
            }
            answers
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = tasks.join_next().await {
        answers.extend(done?);
    }
    Ok(answers)
}

/// [`scheduled`] for the latency levels: latency of the 200s; any failed connection is an
/// error of the measurement. Also returns the answers, for a timeline.
pub async fn open_loop(
    addr: std::net::SocketAddr,
    requests: Arc<Vec<Request>>,
    conns: usize,
    rate: f64,
    secs: Duration,
    pacing: Pacing,
) -> Result<(Run, Vec<Answer>)> {
    let answers = scheduled(addr, requests, conns, rate, secs, pacing).await?;
    // (scheduled time, latency) of each 200.
    let (mut points, mut server, mut errors) = (Vec::new(), Vec::new(), 0);
    for answer in &answers {
        match answer.status {
            Some(200) => {
                points.push((answer.due, answer.latency));
                server.extend(answer.server);
            }
            Some(_) => errors += 1,
            None => bail!("a connection failed during the fixed-rate run"),
        }
    }
    let complete = server.len() == points.len();
    let mut run = summarise(points.iter().map(|p| p.1).collect(), errors, secs);
    if complete {
        run.server = Some(ServerPercentiles::of(&server));
    }
    run.tail = episodes::tail_episodes(&points, 0.99);
    Ok((run, answers))
}

async fn gather(
    mut tasks: tokio::task::JoinSet<Result<(Vec<Duration>, u64)>>,
    secs: Duration,
) -> Result<Run> {
    let (mut lat, mut errors) = (Vec::new(), 0);
    while let Some(done) = tasks.join_next().await {
        let (l, e) = done??;
        lat.extend(l);
        errors += e;
    }
    Ok(summarise(lat, errors, secs))
}

/// Opens `n` connections, each answered once (at most `parallel` at a time, so that the
/// daemon's concurrency limit is not what is measured), and returns them open.
pub async fn open_idle(
    addr: std::net::SocketAddr,
    request: Arc<Request>,
    n: usize,
    parallel: usize,
) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let mut wave = tokio::task::JoinSet::new();
        for _ in 0..parallel.min(n - conns.len()) {
            let request = Arc::clone(&request);
            wave.spawn(async move {
                let mut conn = Conn::open(addr).await?;
                let status = conn.call(&request).await?;
                if status != 200 {
                    bail!("an idle-connection request got {status}");
                }
                anyhow::Ok(conn)
            });
        }
        while let Some(conn) = wave.join_next().await {
            conns.push(conn??);
        }
    }
    Ok(conns)
}
