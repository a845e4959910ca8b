//! Dynamic batching, in the manner of text-embeddings-inference: per model, one task owns a
//! bounded queue of single images, gathers them into a batch, and hands the batch to a free
//! session thread, which makes ONE ONNX Runtime call and sends every caller its own rows back
//! over a oneshot channel. A batch is sealed only when a session is free to run it (or it
//! holds `max_batch_size` images), so batches grow with the load ([`gather`]).
//!
//! Backpressure: a request's images enter the queue all or none (`try_reserve_many`); a full
//! queue is reported as [`BatchError::QueueFull`] (HTTP 429) at once, never waited on. When
//! every session is busy and the next batch is full, the batching task waits, the queue
//! fills, and new requests are turned away.
//!
//! Inference runs on dedicated OS threads (one per ONNX Runtime session, since
//! `Session::run` takes `&mut self`), never on the async I/O threads.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::ArrayView4;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::metrics::Metrics;

mod runner;
pub use runner::{ModelRunner, Runner};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    #[error(
        "the queue of model {model:?} is full ({capacity} images; batching.queue_capacity); retry later"
    )]
    QueueFull { model: String, capacity: usize },
    #[error("model {0:?} is shutting down")]
    Closed(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("image has {got} values, the model takes {expected}")]
    WrongLength { got: usize, expected: usize },
}

/// One image's outputs and what it went through.
#[derive(Debug, Clone)]
pub struct Output {
    /// One row per runner output, in the runner's order.
    pub outputs: Vec<Vec<f32>>,
    /// Time from enqueueing to the start of its ONNX Runtime call.
    pub queue: Duration,
    /// Duration of that call (shared by the whole batch).
    pub inference: Duration,
    pub batch_size: usize,
}

pub type Reply = oneshot::Receiver<Result<Output, BatchError>>;

/// A sealed batch and the permit of the session that will run it.
type Sealed = (Vec<Job>, OwnedSemaphorePermit);

struct Job {
    input: Vec<f32>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Output, BatchError>>,
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch_size: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
}

/// Handle to a model's queue. Dropping every handle stops its task and threads once the queue
/// is drained.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    model: String,
    /// [C, H, W] of one image.
    shape: [usize; 3],
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("model", &self.model)
            .finish()
    }
}

impl Batcher {
    /// Starts the batching task (on the current tokio runtime) and one thread per runner.
    pub fn start<R: Runner>(
        model: &str,
        runners: Vec<R>,
        shape: [usize; 3],
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Batcher {
        let (tx, rx) = mpsc::channel::<Job>(limits.queue_capacity.max(1));
        // One permit per running session thread; a batch travels with the permit of the
        // session that will run it, so the hand-off never holds more than the sessions take.
        let idle = Arc::new(Semaphore::new(0));
        let (batch_tx, batch_rx) = mpsc::channel(runners.len().max(1));
        let batch_rx = Arc::new(Mutex::new(batch_rx));
        for (i, runner) in runners.into_iter().enumerate() {
            let rx = Arc::clone(&batch_rx);
            let metrics = Arc::clone(&metrics);
            let name = model.to_owned();
            let spawned = std::thread::Builder::new()
                .name(format!("csgd-{model}-{i}"))
                .spawn(move || worker(runner, rx, shape, &name, &metrics));
            match spawned {
                Ok(_) => idle.add_permits(1),
                Err(e) => tracing::error!(model, error = %e, "cannot start a session thread"),
            }
        }
        tokio::spawn(batching_task(
            rx,
            batch_tx,
            idle,
            limits,
            model.to_owned(),
            Arc::clone(&metrics),
        ));
        Batcher {
            tx,
            model: model.to_owned(),
            shape,
            metrics,
        }
    }

    /// Queues `images` (each CHW) all or none, returning one reply per image in order.
    pub fn submit(&self, images: Vec<Vec<f32>>) -> Result<Vec<Reply>, BatchError> {
        let expected = self.shape.iter().product();
        if let Some(bad) = images.iter().find(|i| i.len() != expected) {
            return Err(BatchError::WrongLength {
                got: bad.len(),
                expected,
            });
        }
        let permits = self
            .tx
            .try_reserve_many(images.len())
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(()) => BatchError::QueueFull {
                    model: self.model.clone(),
                    capacity: self.tx.max_capacity(),
                },
                mpsc::error::TrySendError::Closed(()) => BatchError::Closed(self.model.clone()),
            })?;
        let now = Instant::now();
        let mut replies = Vec::with_capacity(images.len());
        for (permit, input) in permits.zip(images) {
            let (reply, rx) = oneshot::channel();
            permit.send(Job {
                input,
                enqueued: now,
                reply,
            });
            replies.push(rx);
        }
        self.metrics
            .queue_depth
            .with_label_values(&[&self.model])
            .set(self.depth() as i64);
        Ok(replies)
    }

    /// Images waiting in the queue (including slots being filled right now).
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Gathers the next batch and a free session to run it.
///
/// A batch is sealed when it is full, or when a session is free and its first image has
/// waited `max_wait` for company. While every session is busy the batch keeps filling
/// instead: an image arriving then waits for a session anyway, so it may as well share the
/// next call, and a batch sealed early would only queue small behind the running one. Under
/// load, batches grow with the load; an idle model waits at most `max_wait`
/// ([`sleep_precisely_until`]) before running what it has.
///
/// `None` once the queue is closed and empty.
async fn gather(
    rx: &mut mpsc::Receiver<Job>,
    idle: &Arc<Semaphore>,
    limits: Limits,
) -> Option<Sealed> {
    let first = rx.recv().await?;
    let deadline = tokio::time::Instant::now() + limits.max_wait;
    let mut batch = vec![first];
    // An image that must wait for a session gets no extra wait for company.
    let mut may_seal = limits.max_wait.is_zero() || idle.available_permits() == 0;
    let mut open = true;
    loop {
        while open && batch.len() < limits.max_batch_size {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let full = !open || batch.len() >= limits.max_batch_size;
        tokio::select! {
            biased;
            permit = Arc::clone(idle).acquire_owned(), if may_seal || full => {
                // The semaphore is never closed; were it, the callers hear of a shutdown.
                return match permit {
                    Ok(permit) => Some((batch, permit)),
                    Err(_) => None,
                };
            }
            job = rx.recv(), if !full => match job {
                Some(job) => batch.push(job),
                None => open = false,
            },
            () = sleep_precisely_until(deadline), if !may_seal => may_seal = true,
        }
    }
}

/// Sleeps until `deadline` to within microseconds. tokio's timer wheel ticks once a
/// millisecond and rounds every sleep up to a tick, which would make a `max_wait` of 100 µs
/// one of 1 to 2 ms; so the timer sleeps all but the last millisecond, and the rest is spent
/// yielding to the scheduler, which polls the I/O driver and every other task between two
/// checks of the clock. That loop occupies a worker only while a session is idle waiting for
/// company, for at most a millisecond per batch.
async fn sleep_precisely_until(deadline: tokio::time::Instant) {
    if let Some(coarse) = deadline.checked_sub(Duration::from_millis(1))
        && coarse > tokio::time::Instant::now()
    {
        tokio::time::sleep_until(coarse).await;
    }
    while tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

async fn batching_task(
    mut rx: mpsc::Receiver<Job>,
    batch_tx: mpsc::Sender<Sealed>,
    idle: Arc<Semaphore>,
    limits: Limits,
    model: String,
    metrics: Arc<Metrics>,
) {
    let depth = metrics.queue_depth.with_label_values(&[&model]);
    while let Some((mut batch, session)) = gather(&mut rx, &idle, limits).await {
        depth.set(rx.len() as i64);
        // Callers that gave up (timeout, disconnect) need no inference.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        if let Err(mpsc::error::SendError((batch, _))) = batch_tx.send((batch, session)).await {
            for job in batch {
                let _ = job.reply.send(Err(BatchError::Closed(model.clone())));
            }
        }
    }
    tracing::debug!(model, "batching task stopped");
}

fn worker<R: Runner>(
    mut runner: R,
    rx: Arc<Mutex<mpsc::Receiver<Sealed>>>,
    shape: [usize; 3],
    model: &str,
    metrics: &Metrics,
) {
    loop {
        // One idle worker waits on the hand-off at a time; the others wait for the lock.
        let next = match rx.lock() {
            Ok(mut guard) => guard.blocking_recv(),
            Err(poisoned) => poisoned.into_inner().blocking_recv(),
        };
        let Some((batch, session)) = next else { break };
        run_batch(&mut runner, batch, shape, model, metrics);
        // Free for the next batch, which has been filling meanwhile.
        drop(session);
    }
    tracing::debug!(model, "session thread stopped");
}

fn run_batch<R: Runner>(
    runner: &mut R,
    batch: Vec<Job>,
    [c, h, w]: [usize; 3],
    model: &str,
    metrics: &Metrics,
) {
    let n = batch.len();
    let mut data = Vec::with_capacity(n * c * h * w);
    for job in &batch {
        data.extend_from_slice(&job.input);
    }
    let started = Instant::now();
    let result = match ArrayView4::from_shape((n, c, h, w), &data) {
        Ok(view) => std::panic::catch_unwind(AssertUnwindSafe(|| runner.run(view)))
            .unwrap_or_else(|_| Err("the inference call panicked".into())),
        Err(e) => Err(format!("batch layout: {e}")),
    };
    let inference = started.elapsed();
    metrics
        .inference_duration
        .with_label_values(&[model])
        .observe(inference.as_secs_f64());
    metrics
        .batch_size
        .with_label_values(&[model])
        .observe(n as f64);
    let queue_hist = metrics.queue_duration.with_label_values(&[model]);
    let outputs = result.and_then(|outs| match outs.iter().find(|o| o.nrows() != n) {
        Some(bad) => Err(format!(
            "an output has {} rows for a batch of {n}",
            bad.nrows()
        )),
        None => Ok(outs),
    });
    for (i, job) in batch.into_iter().enumerate() {
        let queue = started.saturating_duration_since(job.enqueued);
        queue_hist.observe(queue.as_secs_f64());
        let answer = match &outputs {
            Ok(outs) => Ok(Output {
                outputs: outs.iter().map(|o| o.row(i).to_vec()).collect(),
                queue,
                inference,
                batch_size: n,
            }),
            Err(e) => Err(BatchError::Inference(e.clone())),
        };
        // The caller may have gone; nothing to do then.
        let _ = job.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use std::sync::mpsc as std_mpsc;

    /// Output 0: per image the sum of its values and the batch size; output 1: its first value.
    struct Fake {
        sizes: Arc<Mutex<Vec<usize>>>,
        gate: Option<Arc<Mutex<std_mpsc::Receiver<()>>>>,
        fail: bool,
    }

    impl Runner for Fake {
        fn run(&mut self, input: ArrayView4<f32>) -> Result<Vec<Array2<f32>>, String> {
            if let Some(gate) = &self.gate {
                let _ = gate.lock().unwrap().recv();
            }
            if self.fail {
                return Err("boom".into());
            }
            let n = input.dim().0;
            self.sizes.lock().unwrap().push(n);
            let mut a = Array2::zeros((n, 2));
            let mut b = Array2::zeros((n, 1));
            for i in 0..n {
                let img = input.index_axis(ndarray::Axis(0), i);
                a[[i, 0]] = img.sum();
                a[[i, 1]] = n as f32;
                b[[i, 0]] = img.iter().next().copied().unwrap_or(0.0);
            }
            Ok(vec![a, b])
        }
    }

    fn fake() -> (Fake, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        (
            Fake {
                sizes: Arc::clone(&sizes),
                gate: None,
                fail: false,
            },
            sizes,
        )
    }

    fn limits(max_batch_size: usize, max_wait_ms: u64, queue_capacity: usize) -> Limits {
        Limits {
            max_batch_size,
            max_wait: Duration::from_millis(max_wait_ms),
            queue_capacity,
        }
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new().unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_caller_gets_its_own_rows() {
        let (f1, sizes) = fake();
        let f2 = Fake {
            sizes: Arc::clone(&sizes),
            gate: None,
            fail: false,
        };
        let b = Batcher::start("m", vec![f1, f2], [1, 2, 2], limits(8, 5, 256), metrics());
        let mut tasks = Vec::new();
        for t in 0..40 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                let images: Vec<Vec<f32>> = (0..(t % 3 + 1))
                    .map(|k| vec![(t * 10 + k) as f32, 0.0, 0.0, 1.0])
                    .collect();
                let replies = b.submit(images.clone()).unwrap();
                for (img, reply) in images.iter().zip(replies) {
                    let out = reply.await.unwrap().unwrap();
                    assert_eq!(out.outputs[0][0], img.iter().sum::<f32>());
                    assert_eq!(out.outputs[1][0], img[0]);
                    assert_eq!(out.outputs[0][1] as usize, out.batch_size);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let sizes = sizes.lock().unwrap();
        assert!(sizes.iter().all(|&n| (1..=8).contains(&n)), "{sizes:?}");
        assert_eq!(
            sizes.iter().sum::<usize>(),
            (0..40usize).map(|t| t % 3 + 1).sum::<usize>()
        );
        assert!(
            sizes.iter().any(|&n| n > 1),
            "nothing was batched: {sizes:?}"
        );
    }

    #[tokio::test]
    async fn waits_for_max_wait_then_runs_a_partial_batch() {
        let (f, sizes) = fake();
        let b = Batcher::start("m", vec![f], [1, 1, 1], limits(4, 50, 16), metrics());
        let started = Instant::now();
        let replies = b.submit(vec![vec![1.0], vec![2.0]]).unwrap();
        for r in replies {
            r.await.unwrap().unwrap();
        }
        assert!(started.elapsed() >= Duration::from_millis(45));
        // A full batch does not wait.
        let started = Instant::now();
        let replies = b.submit(vec![vec![1.0]; 4]).unwrap();
        for r in replies {
            assert_eq!(r.await.unwrap().unwrap().batch_size, 4);
        }
        assert!(started.elapsed() < Duration::from_millis(45));
        assert_eq!(*sizes.lock().unwrap(), vec![2, 4]);
    }

    #[tokio::test]
    async fn sub_millisecond_waits_are_not_rounded_up_to_the_timer_tick() {
        // tokio's own sleep ends each of these on a later millisecond tick (1.04–2.09 ms
        // when tried); the precise one at 100 µs plus a scheduler pass.
        let mut took = Vec::new();
        for _ in 0..21 {
            let started = tokio::time::Instant::now();
            sleep_precisely_until(started + Duration::from_micros(100)).await;
            took.push(started.elapsed());
        }
        took.sort_unstable();
        assert!(
            took[0] >= Duration::from_micros(100),
            "woke early: {took:?}"
        );
        assert!(
            took[10] < Duration::from_micros(500),
            "rounded up: {took:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_keeps_filling_while_the_session_is_busy() {
        let (gate_tx, gate_rx) = std_mpsc::channel::<()>();
        let (mut f, sizes) = fake();
        f.gate = Some(Arc::new(Mutex::new(gate_rx)));
        let b = Batcher::start("m", vec![f], [1, 1, 1], limits(8, 5, 64), metrics());
        let mut replies = b.submit(vec![vec![0.0]]).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The session is held by the first batch; these arrive twice max_wait apart.
        for i in 1..10 {
            replies.extend(b.submit(vec![vec![i as f32]]).unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let every batch run from here on.
        drop(gate_tx);
        let mut got = Vec::new();
        for r in replies {
            got.push(r.await.unwrap().unwrap().outputs[1][0]);
        }
        assert_eq!(got, (0..10).map(|i| i as f32).collect::<Vec<_>>());
        // Not sealed at max_wait while the session was busy, and never past max_batch_size.
        assert_eq!(*sizes.lock().unwrap(), vec![1, 8, 1]);
    }

    #[tokio::test]
    async fn full_queue_is_refused_not_waited_on() {
        let (gate_tx, gate_rx) = std_mpsc::channel::<()>();
        let (mut f, _) = fake();
        f.gate = Some(Arc::new(Mutex::new(gate_rx)));
        let b = Batcher::start("m", vec![f], [1, 1, 1], limits(1, 0, 2), metrics());
        // More images than the queue holds: refused outright.
        assert!(matches!(
            b.submit(vec![vec![0.0]; 3]),
            Err(BatchError::QueueFull { capacity: 2, .. })
        ));
        // The worker is blocked, so jobs pile up until the queue refuses one.
        let mut accepted = Vec::new();
        let mut refused = false;
        for _ in 0..50 {
            match b.submit(vec![vec![1.0]]) {
                Ok(r) => accepted.extend(r),
                Err(BatchError::QueueFull { .. }) => {
                    refused = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "queue never filled");
        assert!(accepted.len() >= 2);
        for _ in 0..accepted.len() {
            gate_tx.send(()).unwrap();
        }
        for r in accepted {
            r.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn failures_reach_every_caller_and_lengths_are_checked() {
        let (mut f, _) = fake();
        f.fail = true;
        let b = Batcher::start("m", vec![f], [1, 1, 2], limits(4, 1, 8), metrics());
        assert_eq!(
            b.submit(vec![vec![1.0]]).unwrap_err(),
            BatchError::WrongLength {
                got: 1,
                expected: 2
            }
        );
        for r in b.submit(vec![vec![1.0, 2.0]; 3]).unwrap() {
            assert_eq!(
                r.await.unwrap().unwrap_err(),
                BatchError::Inference("boom".into())
            );
        }
    }
}
